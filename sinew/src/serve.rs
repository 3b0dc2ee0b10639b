//! `sinew serve` (the head with the OpenAI-compatible HTTP API), `sinew status` (the cluster as a
//! table, from `GET /v1/cluster`) and `sinew demo` (a local cluster on a built-in synthetic model).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use cluster::{BatchOptions, Cluster, ClusterOptions, ClusterState};
use server::{AppState, ServeOptions};

use crate::cluster_cmd::{LinkArgs, OpsArgs};
use crate::units::parse_size;

/// Arguments of `sinew serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model: a GGUF file (or, on a single node, a Hugging Face directory).
    #[arg(long)]
    pub model: PathBuf,
    /// Workers (host:port, comma-separated, in pipeline order); none: a single node.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: String,
    /// The id clients name the model by (default: the model's file or directory name, e.g.
    /// `qwen3-30b-a3b-q4_k.gguf`).
    #[arg(long)]
    pub model_id: Option<String>,
    /// File holding the API key every route but /health needs (or set SINEW_API_KEY).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Send CORS headers allowing this origin.
    #[arg(long)]
    pub cors: Option<String>,
    /// Longest sequence (default: the model's, at most 8192).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Sequences running at once.
    #[arg(long, default_value_t = 16)]
    pub max_seqs: usize,
    /// KV cache bytes for the whole model, over all stages (K/M/G); default: ctx × max-seqs
    /// positions.
    #[arg(long, value_parser = parse_size)]
    pub kv_memory: Option<usize>,
    /// Compute threads (default: all cores). Applied by `main` before any thread starts.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Layers per stage, in stage order (overrides placement), e.g. 3,3,2.
    #[arg(long, value_delimiter = ',')]
    pub split: Option<Vec<usize>>,
    /// Prompt positions of one sequence per micro-batch.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Requests waiting at most; more get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Memory each node may use, bytes (K/M/G); default: 90% of what it has available.
    #[arg(long, value_parser = parse_size)]
    pub node_memory: Option<usize>,
    /// Where stage files sent to workers are kept (default: ~/.cache/sinew).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub ops: OpsArgs,
    #[command(flatten)]
    pub link: LinkArgs,
}

/// The model's directory or file name, as clients name it by default.
fn model_id(model: &Path) -> String {
    model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn api_key(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        let k = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let k = k.trim().to_string();
        if k.is_empty() {
            bail!("{} holds no API key", f.display());
        }
        return Ok(Some(k));
    }
    Ok(std::env::var("SINEW_API_KEY")
        .ok()
        .filter(|k| !k.is_empty()))
}

/// Starts the cluster and the HTTP API; runs until `stop` resolves. `on_ready` gets the bound
/// address once the cluster serves.
pub fn run_until(
    args: &ServeArgs,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(std::net::SocketAddr, &Cluster, &str),
) -> anyhow::Result<()> {
    if args.max_seqs == 0 || args.prefill_chunk == 0 || args.max_queue == 0 {
        bail!("--max-seqs, --prefill-chunk and --max-queue must be at least 1");
    }
    let key = api_key(args.api_key_file.as_deref())?;
    let opts = ClusterOptions {
        model: args.model.clone(),
        workers: args.workers.clone(),
        link: args.link.config()?,
        ctx: args.ctx,
        batch: BatchOptions {
            max_seqs: args.max_seqs,
            prefill_chunk: args.prefill_chunk,
            max_step_tokens: args.max_seqs + args.prefill_chunk,
            max_queue: args.max_queue,
            queue_timeout: Duration::from_secs(300),
        },
        split: args.split.clone(),
        bf16: args.link.bf16,
        keep_warm: std::time::Duration::from_millis(args.link.keep_warm_ms),
        cache_dir: args
            .cache_dir
            .clone()
            .unwrap_or_else(cluster::node::default_cache_dir),
        memory_limit: args.node_memory.map(|m| m as u64),
        kv_memory: args.kv_memory.map(|m| m as u64),
        ops: args.ops.operations()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("sinew-http")
        .build()
        .context("starting the HTTP runtime")?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&args.http))
        .with_context(|| format!("binding {}", args.http))?;
    let addr = listener.local_addr()?;
    let cluster = Arc::new(Cluster::start(opts)?);
    let id = args
        .model_id
        .clone()
        .unwrap_or_else(|| model_id(&args.model));
    let state = AppState::new(
        cluster.clone(),
        ServeOptions {
            model_id: id.clone(),
            api_key: key,
            cors: args.cors.clone(),
        },
    );
    let server = rt.spawn(server::serve(listener, state, stop));
    // /health says "loading" meanwhile
    while !cluster.wait_ready(Duration::from_millis(500)) {
        if server.is_finished() {
            break;
        }
    }
    if cluster.state().ready {
        on_ready(addr, &cluster, &id);
    }
    rt.block_on(server)
        .context("the HTTP server's task failed")?
        .context("the HTTP server failed")?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Runs `sinew serve` until Ctrl-C.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    run_until(&args, interrupted(), |addr, c, id| {
        let st = c.state();
        println!("sinew serving {id} at http://{addr}/v1");
        println!("status page: http://{addr}/");
        if let Some(plan) = &st.plan {
            println!("{plan}");
        }
    })
}

/// Arguments of `sinew status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The head's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// File holding the API key (or set SINEW_API_KEY).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Print the JSON of `GET /v1/cluster`.
    #[arg(long)]
    json: bool,
}

/// Fetches `GET /v1/cluster`.
pub fn fetch_state(url: &str, key: Option<&str>) -> anyhow::Result<ClusterJson> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut req = agent.get(format!("{}/v1/cluster", url.trim_end_matches('/')));
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = req.call().with_context(|| format!("reaching {url}"))?;
    let status = resp.status();
    let body = resp.body_mut().read_to_string()?;
    if !status.is_success() {
        bail!("{url} answered {status}: {body}");
    }
    serde_json::from_str(&body).context("reading the cluster state")
}

/// The cluster state as `GET /v1/cluster` returns it.
pub type ClusterJson = serde_json::Value;

/// Runs `sinew status`.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let key = api_key(args.api_key_file.as_deref())?;
    let v = fetch_state(&args.url, key.as_deref())?;
    if args.json {
        println!("{v}");
        return Ok(());
    }
    print!("{}", status_table(&v));
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The state as a table.
pub fn status_table(v: &serde_json::Value) -> String {
    let Ok(s) = serde_json::from_value::<ClusterState>(v.clone()) else {
        // a head of another version: show what it said
        return format!("{v}\n");
    };
    let mut out = String::new();
    out.push_str(&format!(
        "model {}: {}{}\n",
        s.model,
        if s.ready { "ready" } else { "not serving" },
        s.degraded
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    ));
    // as wide as the longest address (an IPv6 one with its scope is)
    let w = s
        .nodes
        .iter()
        .map(|n| n.addr.len())
        .max()
        .unwrap_or(0)
        .max(24);
    out.push_str(&format!(
        "{:<w$} {:<14} {:>4} {:>8} {:>10} {:>10} {:>5} {:>7} {:>10}\n",
        "node", "host", "up", "layers", "mem total", "mem avail", "cores", "link", "rtt µs"
    ));
    for n in &s.nodes {
        out.push_str(&format!(
            "{:<w$} {:<14} {:>4} {:>8} {:>10} {:>10} {:>5} {:>7} {:>10}\n",
            n.addr,
            n.hostname,
            if n.up { "yes" } else { "no" },
            n.layers
                .map(|(a, b)| format!("{a}..{b}"))
                .unwrap_or_else(|| "-".into()),
            gib(n.mem_total),
            gib(n.mem_available),
            n.cores,
            n.link.as_deref().unwrap_or("-"),
            n.rtt_us
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
        ));
        if let Some(e) = &n.error {
            out.push_str(&format!("    {e}\n"));
        }
        if let Some(w) = &n.warning {
            out.push_str(&format!("    warning: {w}\n"));
        }
    }
    for l in &s.links {
        out.push_str(&format!(
            "link {} → {}: {}, rtt {:.0} µs, {:.0} MB/s (baseline {:.0} MB/s){}\n",
            l.from,
            l.to,
            l.transport,
            l.rtt_us,
            l.bytes_per_s / 1e6,
            l.baseline_bytes_per_s / 1e6,
            l.warning
                .as_deref()
                .map(|w| format!("\n    DEGRADED: {w}"))
                .unwrap_or_default()
        ));
    }
    for r in &s.refused {
        out.push_str(&format!(
            "refused {} ({}×): {}\n",
            r.from, r.count, r.reason
        ));
    }
    if let Some(p) = &s.prediction {
        out.push_str(&format!(
            "predicted decode: {:.1} tok/s single stream, {:.1} tok/s over {} sequences\n",
            p.single_tokens_per_s, p.aggregate_tokens_per_s, p.seqs
        ));
    }
    for (k, st) in s.stages.iter().enumerate() {
        out.push_str(&format!(
            "stage {k}: step {:.2} ms (moving average), {} micro-batches, {:.1} MB sent on\n",
            st.step_ms,
            st.steps,
            st.sent_bytes as f64 / 1e6
        ));
    }
    out.push_str(&format!(
        "requests: {} running, {} queued; KV {} of {} positions; {:.1} tok/s; {} tokens since start\n",
        s.running, s.queued, s.kv_used_tokens, s.kv_capacity_tokens, s.tokens_per_s, s.generated_tokens
    ));
    out
}
