//! Running a request's choices and shaping what comes back: a blocking task (never the
//! executor's threads) reads each choice's engine stream and produces the JSON the route returns,
//! either once (non-streaming) or as server-sent events. A client that goes away cancels every
//! choice at once: the task sees the channel closed and drops the streams.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use engine::{Event, Finish, Stream, Text, TokenLogprob};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Which API shapes the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `chat.completion`.
    Chat,
    /// `text_completion`.
    Completion,
}

/// One choice being run.
pub struct Choice {
    /// Its engine stream.
    pub stream: Stream,
    /// Its prompt's token ids.
    pub prompt: Vec<u32>,
    /// Echo the prompt (completions).
    pub echo: bool,
    /// Report logprobs with this many alternatives.
    pub logprobs: Option<usize>,
}

/// What a request's task needs.
pub struct Job {
    /// The API.
    pub kind: Kind,
    /// The response id.
    pub id: String,
    /// The model id.
    pub model: String,
    /// The choices, in index order.
    pub choices: Vec<Choice>,
    /// Send a last chunk with usage (streaming).
    pub include_usage: bool,
    /// When the request arrived.
    pub started: Instant,
}

/// A new response id.
pub fn new_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let a = RandomState::new().hash_one(Instant::now());
    format!("{prefix}-{a:016x}")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// OpenAI's name of a finish reason.
pub fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Eos | Finish::Stop => "stop",
        Finish::Length | Finish::ContextFull => "length",
    }
}

fn token_text(text: &Text, t: u32) -> String {
    text.decode(&[t]).unwrap_or_default()
}

fn chat_logprob(text: &Text, lp: &TokenLogprob) -> Value {
    let tok = token_text(text, lp.token);
    json!({
        "token": tok,
        "logprob": lp.logprob,
        "bytes": tok.as_bytes(),
        "top_logprobs": lp.top.iter().map(|&(t, l)| {
            let s = token_text(text, t);
            json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
        }).collect::<Vec<_>>(),
    })
}

/// Completion-style logprobs, accumulated token by token.
#[derive(Default)]
struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    text_offset: Vec<usize>,
    offset: usize,
}

impl CompletionLogprobs {
    fn push(&mut self, text: &Text, token: u32, lp: Option<&TokenLogprob>) {
        let s = token_text(text, token);
        self.text_offset.push(self.offset);
        self.offset += s.len();
        self.tokens.push(s);
        self.token_logprobs.push(lp.map(|l| l.logprob));
        self.top_logprobs.push(lp.map(|l| {
            l.top
                .iter()
                .map(|&(t, v)| (token_text(text, t), json!(v)))
                .collect()
        }));
    }

    fn value(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }

    fn since(&self, from: usize) -> Value {
        json!({
            "tokens": self.tokens[from..],
            "token_logprobs": self.token_logprobs[from..],
            "top_logprobs": self.top_logprobs[from..],
            "text_offset": self.text_offset[from..],
        })
    }
}

/// A choice's state while it runs.
struct Run {
    c: Choice,
    text: String,
    chat_lp: Vec<Value>,
    comp_lp: CompletionLogprobs,
    finish: Option<Finish>,
    prompt_tokens: usize,
    completion_tokens: usize,
    last_token: Option<Instant>,
    error: Option<String>,
    done: bool,
}

/// How long a request may go without any event before it counts as stuck.
const STALL: Duration = Duration::from_secs(600);

/// Runs `job` to the end and returns the response body (non-streaming).
///
/// # Errors
/// A 503 envelope when a choice failed in the cluster.
pub fn collect(job: Job, text: &Text, metrics: &Metrics) -> Result<Value, ApiError> {
    let mut runs: Vec<Run> = job.choices.into_iter().map(new_run).collect();
    for r in runs.iter_mut() {
        let echo_text = r.c.echo.then(|| prompt_echo(text, r));
        let end = Instant::now() + STALL;
        while !r.done {
            let left = end.saturating_duration_since(Instant::now());
            let Some(ev) = r.c.stream.recv_timeout(left) else {
                r.error = Some("the request stalled".into());
                break;
            };
            apply(text, r, ev, job.started, metrics);
        }
        if let Some(e) = &r.error {
            return Err(ApiError::unavailable(e.clone()));
        }
        if let Some(t) = echo_text {
            r.text.insert_str(0, &t);
        }
    }
    let usage = usage(&runs);
    metrics.tokens(usage.0, usage.1);
    let created = now();
    let choices: Vec<Value> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let reason = r.finish.map(finish_reason);
            match job.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": r.c.logprobs.map(|_| json!({"content": r.chat_lp})),
                    "finish_reason": reason,
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": r.text,
                    "logprobs": r.c.logprobs.map(|_| r.comp_lp.value()),
                    "finish_reason": reason,
                }),
            }
        })
        .collect();
    Ok(json!({
        "id": job.id,
        "object": if job.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": job.model,
        "choices": choices,
        "usage": {"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1},
        "system_fingerprint": null,
    }))
}

fn new_run(c: Choice) -> Run {
    Run {
        prompt_tokens: c.prompt.len(),
        c,
        text: String::new(),
        chat_lp: Vec::new(),
        comp_lp: CompletionLogprobs::default(),
        finish: None,
        completion_tokens: 0,
        last_token: None,
        error: None,
        done: false,
    }
}

/// The prompt text to echo; its logprobs are filled in when the prompt logprobs arrive.
fn prompt_echo(text: &Text, r: &Run) -> String {
    text.decode(&r.c.prompt).unwrap_or_default()
}

fn usage(runs: &[Run]) -> (usize, usize) {
    // each prompt counts once, however many choices it has
    let mut seen: Vec<&[u32]> = Vec::new();
    let mut prompt = 0;
    for r in runs {
        if !seen.contains(&r.c.prompt.as_slice()) {
            seen.push(&r.c.prompt);
            prompt += r.prompt_tokens;
        }
    }
    (prompt, runs.iter().map(|r| r.completion_tokens).sum())
}

/// Applies one event to a choice.
fn apply(text: &Text, r: &mut Run, ev: Event, started: Instant, metrics: &Metrics) {
    match ev {
        Event::PromptLogprobs(lp) => {
            if r.c.echo && r.c.logprobs.is_some() {
                for (t, l) in r.c.prompt.clone().into_iter().zip(lp.iter()) {
                    r.comp_lp.push(text, t, l.as_ref());
                }
            }
        }
        Event::Token(d) => {
            let now = Instant::now();
            match r.last_token {
                None => metrics.ttft(now.duration_since(started)),
                Some(t) => metrics.itl(now.duration_since(t)),
            }
            r.last_token = Some(now);
            r.text.push_str(&d.text);
            if let Some(lp) = &d.logprob {
                r.chat_lp.push(chat_logprob(text, lp));
            }
            if r.c.logprobs.is_some() {
                r.comp_lp.push(text, d.token, d.logprob.as_ref());
            }
        }
        Event::Finished {
            finish,
            prompt_tokens,
            completion_tokens,
        } => {
            r.finish = Some(finish);
            r.prompt_tokens = prompt_tokens;
            r.completion_tokens = completion_tokens;
            r.done = true;
        }
        Event::Error(e) => {
            r.error = Some(e.to_string());
            r.done = true;
        }
    }
}

/// Runs `job`, sending each server-sent event's data (JSON text, then `[DONE]`) into `tx`. Stops
/// and cancels every choice as soon as `tx` is closed (the client went away).
pub fn stream(job: Job, text: &Text, metrics: &Metrics, tx: mpsc::Sender<String>) {
    let created = now();
    let n = job.choices.len();
    let mut runs: Vec<Run> = job.choices.into_iter().map(new_run).collect();
    let usage_field = job.include_usage;
    let chunk = |choices: Vec<Value>, usage: Option<Value>| -> String {
        let mut v = json!({
            "id": job.id,
            "object": if job.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": created,
            "model": job.model,
            "choices": choices,
            "system_fingerprint": null,
        });
        if usage_field {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        v.to_string()
    };
    let send = |s: String| tx.blocking_send(s).is_ok();
    // the role first (chat), the echoed prompt first (completions)
    for (i, r) in runs.iter_mut().enumerate() {
        let first = match job.kind {
            Kind::Chat => {
                json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})
            }
            Kind::Completion if r.c.echo => {
                let t = prompt_echo(text, r);
                json!({"index": i, "text": t, "logprobs": null, "finish_reason": null})
            }
            Kind::Completion => continue,
        };
        if !send(chunk(vec![first], None)) {
            return;
        }
    }
    let mut finished = 0;
    let mut last_event = Instant::now();
    while finished < n {
        let mut progressed = false;
        for (i, r) in runs.iter_mut().enumerate() {
            if r.done {
                continue;
            }
            let wait = if n == 1 {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(2)
            };
            let Some(ev) = r.c.stream.recv_timeout(wait) else {
                continue;
            };
            progressed = true;
            let lp_from = r.comp_lp.tokens.len();
            let chat_from = r.chat_lp.len();
            let before = r.text.len();
            let is_token = matches!(ev, Event::Token(_));
            apply(text, r, ev, job.started, metrics);
            if let Some(e) = &r.error {
                let err = ApiError::unavailable(e.clone());
                let _ = send(err.body().to_string());
                return;
            }
            if is_token || r.done {
                let piece = r.text[before..].to_string();
                let reason = if r.done {
                    r.finish.map(finish_reason)
                } else {
                    None
                };
                let c = match job.kind {
                    Kind::Chat => {
                        let lp =
                            r.c.logprobs
                                .map(|_| json!({"content": r.chat_lp[chat_from..]}));
                        json!({"index": i, "delta": if piece.is_empty() && r.done { json!({}) } else { json!({"content": piece}) }, "logprobs": lp, "finish_reason": reason})
                    }
                    Kind::Completion => {
                        let lp = r.c.logprobs.map(|_| r.comp_lp.since(lp_from));
                        json!({"index": i, "text": piece, "logprobs": lp, "finish_reason": reason})
                    }
                };
                if !send(chunk(vec![c], None)) {
                    return;
                }
            }
            if r.done {
                finished += 1;
            }
        }
        if progressed {
            last_event = Instant::now();
        } else if tx.is_closed() {
            return; // the client went away: dropping the runs cancels the choices
        } else if last_event.elapsed() > STALL {
            let _ = send(
                ApiError::unavailable("the request stalled")
                    .body()
                    .to_string(),
            );
            return;
        }
    }
    let usage = usage(&runs);
    metrics.tokens(usage.0, usage.1);
    if job.include_usage {
        let u = json!({"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1});
        if !send(chunk(Vec::new(), Some(u))) {
            return;
        }
    }
    let _ = send("[DONE]".into());
}
