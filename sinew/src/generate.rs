//! `sinew generate`: load a model (a Hugging Face directory or a GGUF file), run one prompt, stream
//! the text, report prefill and decode speed; with `--parallel N`, the prompt as N sequences at once
//! through the engine's scheduler (how batching is measured from outside).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use engine::{
    DecodeParams, Event, GenerateOptions, LoadOptions, Loaded, Message, Request, SamplingParams,
    Scheduler, SchedulerOptions, generate,
};

use crate::units::parse_size;

/// Arguments of `sinew generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text; the chat template is applied (a user turn) unless --raw.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids (no template).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    prompt_ids: Option<Vec<u32>>,
    /// Tokenize the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// System message placed before the prompt in the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy; above 0 samples.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens reaching this probability.
    #[arg(long)]
    top_p: Option<f32>,
    /// Sample among tokens at least this fraction as likely as the most likely one.
    #[arg(long)]
    min_p: Option<f32>,
    /// Subtracted from the logit of every token generated so far (-2..2).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated (-2..2).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    /// Divides the logits of tokens already in the prompt or output (1 is off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed of the sampler (the same seed gives the same tokens; sequence i of --parallel uses
    /// seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run the prompt as this many sequences at once through the scheduler.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// KV cache budget in bytes (K/M/G suffixes); default: half the memory available after the
    /// weights are loaded.
    #[arg(long, value_parser = parse_size)]
    kv_memory: Option<usize>,
    /// Longest sequence in positions (default and maximum: the model's max_position_embeddings).
    #[arg(long)]
    ctx: Option<usize>,
    /// Prompt positions a sequence brings to one step at most (--parallel).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Compute threads (default: all cores). Applied by `main` before any thread starts.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Keep generating past end-of-sequence tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Run the request once, unmeasured, before the measured run (as llama-bench warms up):
    /// experts a GGUF model routes to for the first time are packed then (on every stage, with
    /// --workers).
    #[arg(long)]
    warmup: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Write the prompt's logits, f32 [prompt_len, vocab] named `logits`, to this safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// With --workers or --cluster: report each prompt token's logprob (and this many
    /// alternatives) in the JSON output.
    #[arg(long)]
    prompt_logprobs: Option<usize>,
    #[command(flatten)]
    head: crate::cluster_cmd::HeadArgs,
}

/// Runs `sinew generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if args.parallel > 1 && args.logits_out.is_some() {
        bail!("--logits-out takes one sequence, not --parallel");
    }
    if args.head.enabled() {
        return run_cluster(&args);
    }
    if args.prompt_logprobs.is_some() {
        bail!("--prompt-logprobs needs --workers or --cluster");
    }
    let options = LoadOptions {
        layers: None,
        dequantize: false,
        progress: !args.json,
        kv_memory: args.kv_memory,
        ctx: args.ctx,
    };
    let load_start = Instant::now();
    let m = Loaded::open(&args.model, &options)?;
    let load_secs = load_start.elapsed().as_secs_f64();
    let prompt = prompt_ids(&args, &m.text)?;
    let sampling = sampling(&args);
    if args.parallel > 1 {
        if args.warmup {
            let once = GenerateOptions {
                max_tokens: args.max_tokens,
                sampling: sampling.clone(),
                stop: args.stop.clone(),
                prompt_logits: false,
                ignore_eos: args.ignore_eos,
            };
            warm_up(&m, &prompt, &once)?;
        }
        return run_parallel(&args, m, prompt, sampling, load_secs);
    }
    let gen_options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        stop: args.stop.clone(),
        prompt_logits: args.logits_out.is_some(),
        ignore_eos: args.ignore_eos,
    };
    if args.warmup {
        warm_up(&m, &prompt, &gen_options)?;
    }
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let g = generate(
        &m.model,
        &m.kv,
        &m.text,
        &prompt,
        &gen_options,
        &mut |piece| {
            if stream {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
    )?;
    if let (Some(path), Some(logits)) = (&args.logits_out, &g.prompt_logits) {
        let t = logits.to_dtype(candle_core::DType::F32)?;
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("logits".to_string(), t)]),
            path,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        let v = serde_json::json!({
            "tokens": g.tokens,
            "text": g.text,
            "finish_reason": g.finish,
            "prompt_tokens": g.prompt_tokens,
            "prefill_tokens_per_s": g.prefill_tokens_per_s(),
            "decode_tokens_per_s": g.decode_tokens_per_s(),
            "prefill_s": g.prefill_secs,
            "decode_s": g.decode_secs,
            "load_s": load_secs,
            "kv_capacity_tokens": m.kv.capacity_tokens(),
            "weights": m.model.matrix_formats().into_iter().map(|(format, matrices, bytes)| {
                serde_json::json!({"format": format, "matrices": matrices, "bytes": bytes})
            }).collect::<Vec<_>>(),
        });
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout)?;
        stdout.flush()?;
        drop(stdout);
        eprintln!(
            "prefill: {} tokens, {:.1} tok/s; decode: {} tokens, {:.1} tok/s ({:?})",
            g.prompt_tokens,
            g.prefill_tokens_per_s(),
            g.tokens.len(),
            g.decode_tokens_per_s(),
            g.finish
        );
    }
    Ok(())
}

fn prompt_ids(args: &GenerateArgs, text: &engine::Text) -> anyhow::Result<Vec<u32>> {
    Ok(match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(t)) if args.raw => text.encode(t, true)?,
        (None, Some(t)) => {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(Message {
                    role: "system".into(),
                    content: system.clone(),
                });
            }
            messages.push(Message {
                role: "user".into(),
                content: t.clone(),
            });
            let rendered = text.render_chat(&messages, true)?;
            text.encode(&rendered, false)?
        }
        (None, None) => bail!("give --prompt or --prompt-ids"),
    })
}

fn sampling(args: &GenerateArgs) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    }
}

/// The requests of a run: the prompt N times, seeds seed..seed+N.
fn requests(args: &GenerateArgs, prompt: &[u32], sampling: &SamplingParams) -> Vec<Request> {
    (0..args.parallel)
        .map(|i| Request {
            prompt: prompt.to_vec(),
            params: DecodeParams {
                max_tokens: args.max_tokens,
                sampling: SamplingParams {
                    seed: sampling.seed.wrapping_add(i as u64),
                    ..sampling.clone()
                },
                stop: args.stop.clone(),
                ignore_eos: args.ignore_eos,
                logprobs: None,
            },
            prompt_logprobs: args.prompt_logprobs,
        })
        .collect()
}

/// A prompt through a cluster (`--workers`, or `--cluster` for a single-node one).
/// Runs the request once, unmeasured, as llama-bench's warm-up run does: experts first routed to
/// are packed then, not inside the timed run.
fn warm_up(m: &Loaded, prompt: &[u32], options: &GenerateOptions) -> anyhow::Result<()> {
    generate(&m.model, &m.kv, &m.text, prompt, options, &mut |_| {})?;
    Ok(())
}

fn run_cluster(args: &GenerateArgs) -> anyhow::Result<()> {
    if args.logits_out.is_some() {
        bail!("--logits-out runs on one node without --workers");
    }
    let load_start = Instant::now();
    let n = args.parallel;
    let c = args.head.start(
        &args.model,
        args.ctx,
        n,
        args.prefill_chunk,
        (n * args.prefill_chunk).max(n),
    )?;
    let load_secs = load_start.elapsed().as_secs_f64();
    let prompt = prompt_ids(args, c.text())?;
    let run_all = || -> anyhow::Result<Vec<SeqRun>> {
        let streams = requests(args, &prompt, &sampling(args))
            .into_iter()
            .map(|r| c.submit(r))
            .collect::<cluster::Result<Vec<_>>>()?;
        collect_runs(streams)
    };
    if args.warmup {
        // every stage packs the experts the requests route to, outside the measured run
        run_all()?;
    }
    let started = Instant::now();
    let runs = run_all()?;
    let t = Timing::of(&runs, started, prompt.len());
    let state = c.state();
    if args.head.hold_s > 0 {
        eprintln!(
            "generation done; holding the head for {} s",
            args.head.hold_s
        );
    }
    std::thread::sleep(Duration::from_secs(args.head.hold_s));
    drop(c);
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "tokens": runs[0].tokens,
            "text": runs[0].text,
            "finish_reason": runs[0].finish,
            "prompt_tokens": prompt.len(),
            "parallel": n,
            "prefill_tokens_per_s": t.prefill_tokens_per_s,
            "decode_tokens_per_s": t.aggregate / n as f64,
            "aggregate_decode_tokens_per_s": t.aggregate,
            "prefill_s": t.prefill_secs,
            "decode_s": t.decode_secs,
            "load_s": load_secs,
            "kv_capacity_tokens": state.kv_capacity_tokens,
            "batches": state.batches,
            "stages": state.nodes.iter().filter(|n| n.layers.is_some()).map(|n| serde_json::json!({
                "node": n.addr, "layers": n.layers, "link": n.link,
            })).collect::<Vec<_>>(),
            "sequences": runs.iter().map(|r| serde_json::json!({
                "tokens": r.tokens, "text": r.text, "finish_reason": r.finish,
                "prompt_logprobs": r.prompt_logprobs,
            })).collect::<Vec<_>>(),
        });
        writeln!(stdout, "{v}")?;
    } else {
        for (i, r) in runs.iter().enumerate() {
            if n > 1 {
                write!(stdout, "[{i}] ")?;
            }
            writeln!(stdout, "{}", r.text)?;
        }
        stdout.flush()?;
        drop(stdout);
        if let Some(plan) = &state.plan {
            eprintln!("{plan}");
        }
        eprintln!(
            "{n} sequence(s) over {} stage(s): prefill {:.1} tok/s; decode {:.1} tok/s in all",
            state.nodes.iter().filter(|n| n.layers.is_some()).count(),
            t.prefill_tokens_per_s,
            t.aggregate
        );
    }
    Ok(())
}

/// Prefill and decode rates of a run: the prefill phase ends when every sequence has its first
/// token; tokens after it are decode.
struct Timing {
    prefill_secs: f64,
    prefill_tokens_per_s: f64,
    decode_secs: f64,
    aggregate: f64,
    decoded: usize,
}

impl Timing {
    fn of(runs: &[SeqRun], started: Instant, prompt_len: usize) -> Timing {
        let end = Instant::now();
        let prefilled = runs
            .iter()
            .filter_map(|r| r.times.first().copied())
            .max()
            .unwrap_or(end);
        let decoded: usize = runs
            .iter()
            .map(|r| r.times.iter().filter(|&&t| t > prefilled).count())
            .sum();
        let decode_secs = end.duration_since(prefilled).as_secs_f64();
        let aggregate = if decode_secs > 0.0 {
            decoded as f64 / decode_secs
        } else {
            0.0
        };
        let prefill_secs = prefilled.duration_since(started).as_secs_f64();
        Timing {
            prefill_secs,
            prefill_tokens_per_s: (runs.len() * prompt_len) as f64
                / prefill_secs.max(f64::MIN_POSITIVE),
            decode_secs,
            aggregate,
            decoded,
        }
    }
}

/// Reads every stream to its end, one thread each.
fn collect_runs(streams: Vec<engine::Stream>) -> anyhow::Result<Vec<SeqRun>> {
    // no token for this long means the engine is stuck, not slow
    let stall = Duration::from_secs(600);
    let runs: Vec<anyhow::Result<SeqRun>> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|stream| {
                s.spawn(move || {
                    let mut r = SeqRun {
                        tokens: Vec::new(),
                        text: String::new(),
                        finish: None,
                        times: Vec::new(),
                        prompt_logprobs: None,
                    };
                    loop {
                        match stream.recv_timeout(stall) {
                            Some(Event::Token(t)) => {
                                r.times.push(Instant::now());
                                r.tokens.push(t.token);
                                r.text.push_str(&t.text);
                            }
                            Some(Event::Finished { finish, .. }) => {
                                r.finish = Some(finish);
                                return Ok(r);
                            }
                            Some(Event::Error(e)) => return Err(e.into()),
                            Some(Event::PromptLogprobs(lp)) => {
                                r.prompt_logprobs = Some(
                                    lp.into_iter()
                                        .map(|l| l.map(|l| (l.token, l.logprob)))
                                        .collect(),
                                );
                            }
                            None => bail!("no token for {stall:?}"),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a reader thread panicked")))
            })
            .collect()
    });
    runs.into_iter().collect()
}

/// One sequence of a `--parallel` run, as its stream delivered it.
struct SeqRun {
    prompt_logprobs: Option<Vec<Option<(u32, f32)>>>,
    tokens: Vec<u32>,
    text: String,
    finish: Option<engine::Finish>,
    /// When each token arrived.
    times: Vec<Instant>,
}

/// `--parallel N`: the prompt as N sequences through the scheduler (seeds seed..seed+N).
fn run_parallel(
    args: &GenerateArgs,
    m: Loaded,
    prompt: Vec<u32>,
    sampling: SamplingParams,
    load_secs: f64,
) -> anyhow::Result<()> {
    let n = args.parallel;
    let formats = m.model.matrix_formats();
    let kv = m.kv.clone();
    let options = SchedulerOptions {
        max_seqs: n,
        prefill_chunk: args.prefill_chunk,
        max_step_tokens: (n * prompt.len().min(args.prefill_chunk)).max(n),
        ..Default::default()
    };
    let scheduler = Scheduler::new(Arc::new(m.model), Arc::new(m.text), kv.clone(), options)?;
    let started = Instant::now();
    let streams = requests(args, &prompt, &sampling)
        .into_iter()
        .map(|r| scheduler.submit(r))
        .collect::<engine::Result<Vec<_>>>()?;
    let runs = collect_runs(streams)?;
    let Timing {
        prefill_secs,
        prefill_tokens_per_s,
        decode_secs,
        aggregate,
        decoded,
    } = Timing::of(&runs, started, prompt.len());
    let stats = scheduler.stats();
    drop(scheduler);
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "tokens": runs[0].tokens,
            "text": runs[0].text,
            "finish_reason": runs[0].finish,
            "prompt_tokens": prompt.len(),
            "parallel": n,
            "prefill_tokens_per_s": prefill_tokens_per_s,
            "decode_tokens_per_s": aggregate / n as f64,
            "aggregate_decode_tokens_per_s": aggregate,
            "prefill_s": prefill_secs,
            "decode_s": decode_secs,
            "load_s": load_secs,
            "steps": stats.steps,
            "kv_capacity_tokens": kv.capacity_tokens(),
            "sequences": runs.iter().map(|r| serde_json::json!({
                "tokens": r.tokens, "text": r.text, "finish_reason": r.finish,
            })).collect::<Vec<_>>(),
            "weights": formats.into_iter().map(|(format, matrices, bytes)| {
                serde_json::json!({"format": format, "matrices": matrices, "bytes": bytes})
            }).collect::<Vec<_>>(),
        });
        writeln!(stdout, "{v}")?;
    } else {
        for (i, r) in runs.iter().enumerate() {
            writeln!(stdout, "[{i}] {}", r.text)?;
        }
        stdout.flush()?;
        drop(stdout);
        eprintln!(
            "{n} sequences: prefill {prefill_tokens_per_s:.1} tok/s; decode {decoded} tokens, {aggregate:.1} tok/s in all",
        );
    }
    Ok(())
}
