//! sinew's OpenAI-compatible HTTP API over a [`cluster::Cluster`] (a single node or a head with
//! workers): axum on tokio for HTTP only. Each request's tokens are read on a blocking task from
//! the cluster's channels, so the token path never runs on the executor.
//!
//! Routes: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /metrics` (Prometheus), `GET /v1/cluster` (the cluster's state as
//! JSON, what `sinew status` reads). Errors use OpenAI's envelope; nothing a client sends gets a
//! 5xx.

pub mod error;
pub mod metrics;
pub mod request;
pub mod respond;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Request as HttpRequest, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cluster::Cluster;
use engine::Request;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

pub use error::ApiError;
pub use metrics::Metrics;
use request::Prompt;
use respond::{Choice, Job, Kind};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The id clients name the model by.
    pub model_id: String,
    /// The bearer key every route but `/health` needs; `None`: no key.
    pub api_key: Option<String>,
    /// The origin CORS headers allow; `None`: no CORS headers.
    pub cors: Option<String>,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    cluster: Arc<Cluster>,
    opts: Arc<ServeOptions>,
    metrics: Arc<Metrics>,
    created: u64,
}

impl AppState {
    /// State over a started cluster.
    pub fn new(cluster: Arc<Cluster>, opts: ServeOptions) -> Self {
        AppState {
            cluster,
            opts: Arc::new(opts),
            metrics: Arc::new(Metrics::new()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// The router with every route, authentication, CORS and request counting.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/metrics", get(metrics_route))
        .route("/v1/cluster", get(cluster_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .layer(axum::extract::DefaultBodyLimit::max(32 << 20))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` resolves.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn count(State(s): State<AppState>, req: HttpRequest, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let mut r = next.run(req).await;
    // axum's own refusals (a body over the limit) in OpenAI's envelope too
    let json = r.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes().starts_with(b"application/json")
            || v.as_bytes().starts_with(b"text/event-stream")
            || v.as_bytes().starts_with(b"application/openmetrics")
    });
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE && !json {
        r = ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..ApiError::bad(
                None,
                "the request body is larger than the server accepts (32 MiB)",
            )
        }
        .into_response();
    }
    s.metrics.request(&route, r.status().as_u16());
    r
}

async fn cors(State(s): State<AppState>, req: HttpRequest, next: Next) -> Response {
    let Some(origin) = s.opts.cors.clone() else {
        return next.run(req).await;
    };
    let preflight = req.method() == Method::OPTIONS;
    let mut r = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
    }
    r
}

async fn auth(State(s): State<AppState>, req: HttpRequest, next: Next) -> Response {
    let Some(key) = s.opts.api_key.as_deref() else {
        return next.run(req).await;
    };
    // the status page holds no data: its script reads /v1/cluster with the key
    if matches!(req.uri().path(), "/health" | "/") {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        next.run(req).await
    } else if given.is_empty() {
        ApiError::unauthorized("no API key: send 'Authorization: Bearer KEY'").into_response()
    } else {
        ApiError::unauthorized("the API key is not valid").into_response()
    }
}

async fn not_found(req: HttpRequest) -> ApiError {
    ApiError::not_found(
        format!("no route {} {}", req.method(), req.uri().path()),
        "unknown_url",
    )
}

async fn method_not_allowed(req: HttpRequest) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad(
            None,
            format!("{} is not allowed on {}", req.method(), req.uri().path()),
        )
    }
}

async fn health(State(s): State<AppState>) -> Response {
    let st = s.cluster.state();
    let status = if st.ready {
        "ready"
    } else if st.epoch == 0 {
        "loading"
    } else {
        "degraded"
    };
    let code = if st.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(json!({"status": status, "reason": st.degraded})),
    )
        .into_response()
}

fn model_object(s: &AppState) -> Value {
    json!({"id": s.opts.model_id, "object": "model", "created": s.created, "owned_by": "sinew"})
}

async fn models(State(s): State<AppState>) -> axum::Json<Value> {
    axum::Json(json!({"object": "list", "data": [model_object(&s)]}))
}

async fn model(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    if id == s.opts.model_id {
        Ok(axum::Json(model_object(&s)))
    } else {
        Err(unknown_model(&id))
    }
}

fn unknown_model(id: &str) -> ApiError {
    ApiError {
        param: Some("model".into()),
        ..ApiError::not_found(
            format!("the model '{id}' does not exist"),
            "model_not_found",
        )
    }
}

async fn metrics_route(State(s): State<AppState>) -> Response {
    let body = s.metrics.render(&s.cluster.state());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The status page: static HTML whose script polls `/v1/cluster` every second (with an API key,
/// open it as `/#key=KEY`).
async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("status.html"),
    )
        .into_response()
}

async fn cluster_route(State(s): State<AppState>) -> axum::Json<cluster::ClusterState> {
    axum::Json(s.cluster.state())
}

fn parse(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(None, format!("the body is not valid JSON: {e}")))
}

async fn chat(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req = request::chat(&parse(&body)?)?;
    if req.common.model != s.opts.model_id {
        return Err(unknown_model(&req.common.model));
    }
    let text = s.cluster.text().clone();
    let rendered = text
        .render_chat(&req.messages, true)
        .map_err(|e| ApiError::bad(Some("messages".into()), e.to_string()))?;
    let prompt = text
        .encode(&rendered, false)
        .map_err(|e| ApiError::bad(Some("messages".into()), e.to_string()))?;
    let choices = submit_choices(
        &s,
        &prompt,
        &req.common,
        req.logprobs,
        None,
        false,
        "messages",
    )?;
    let job = Job {
        kind: Kind::Chat,
        id: respond::new_id("chatcmpl"),
        model: s.opts.model_id.clone(),
        choices,
        include_usage: req.common.include_usage,
        started,
    };
    run(s, job, req.common.stream).await
}

async fn completions(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req = request::completion(&parse(&body)?)?;
    if req.common.model != s.opts.model_id {
        return Err(unknown_model(&req.common.model));
    }
    let text = s.cluster.text().clone();
    let mut choices = Vec::new();
    for p in &req.prompts {
        let ids = match p {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(t) => text
                .encode(t, true)
                .map_err(|e| ApiError::bad(Some("prompt".into()), e.to_string()))?,
        };
        choices.extend(submit_choices(
            &s,
            &ids,
            &req.common,
            req.logprobs,
            req.logprobs.filter(|_| req.echo),
            req.echo,
            "prompt",
        )?);
    }
    let job = Job {
        kind: Kind::Completion,
        id: respond::new_id("cmpl"),
        model: s.opts.model_id.clone(),
        choices,
        include_usage: req.common.include_usage,
        started,
    };
    run(s, job, req.common.stream).await
}

/// Submits `common.n` choices of one prompt, seeds `seed..seed + n`. A refusal is answered as
/// the error of the field `param`; the choices already submitted are cancelled as they drop.
fn submit_choices(
    s: &AppState,
    prompt: &[u32],
    common: &request::Common,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    echo: bool,
    param: &str,
) -> Result<Vec<Choice>, ApiError> {
    (0..common.n)
        .map(|i| {
            let mut params = common.params.clone();
            params.sampling.seed = params.sampling.seed.wrapping_add(i as u64);
            params.logprobs = logprobs;
            let stream = s
                .cluster
                .submit(Request {
                    prompt: prompt.to_vec(),
                    params,
                    prompt_logprobs,
                })
                .map_err(|e| ApiError::from_cluster(e, param))?;
            Ok(Choice {
                stream,
                prompt: prompt.to_vec(),
                echo,
                logprobs,
            })
        })
        .collect()
}

async fn run(s: AppState, job: Job, stream: bool) -> Result<Response, ApiError> {
    let text = s.cluster.text().clone();
    let metrics = s.metrics.clone();
    if stream {
        let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
        tokio::task::spawn_blocking(move || respond::stream(job, &text, &metrics, tx));
        let events =
            ReceiverStream::new(rx).map(|d| Ok::<_, Infallible>(SseEvent::default().data(d)));
        return Ok(Sse::new(events).into_response());
    }
    let out = tokio::task::spawn_blocking(move || respond::collect(job, &text, &metrics))
        .await
        .map_err(|e| ApiError::unavailable(format!("the request's task failed: {e}")))??;
    Ok(axum::Json(out).into_response())
}
