//! `sinew demo`: a local cluster of N processes — this one the head, N-1 `sinew worker`s — on a
//! built-in synthetic MoE model (or `--model`), one chat request streamed through the HTTP API, and
//! then the cluster keeps serving until Ctrl-C, which stops every process it started.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use engine::config::Architecture;
use engine::gguf::{ExpertLayout, Quant, SynthShape, WriteOptions};

use crate::serve::{ServeArgs, interrupted};

/// Arguments of `sinew demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Processes in the cluster: the head and N-1 workers.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// A model to serve instead of the built-in synthetic one (a GGUF file).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// The prompt of the first request.
    #[arg(long, default_value = "Tell me about clusters of small machines.")]
    prompt: String,
    /// Tokens of the first reply.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
}

/// The built-in model: a small Qwen3-MoE shape with random weights and the built-in tokenizer.
fn demo_shape() -> SynthShape {
    SynthShape {
        architecture: Architecture::Qwen3Moe,
        vocab_size: 384,
        hidden_size: 512,
        intermediate_size: 1024,
        num_layers: 6,
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
        num_experts: 16,
        top_k: 4,
        expert_intermediate_size: 256,
        seed: 7,
    }
}

/// The worker processes; killed (and reaped) when dropped.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_worker(key: &Path, cache: &Path) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe().context("locating the sinew binary")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "worker",
        "--threads",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--no-announce",
        "--cluster-key-file",
    ])
    .arg(key)
    .arg("--cache-dir")
    .arg(cache)
    .env("SINEW_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe; it makes the worker die with the demo, so no process
    // is left behind even when the demo is killed outright.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting a worker")?;
    let out = child.stdout.take().context("the worker's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if let Some(addr) = line.strip_prefix("worker listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Ok((child, addr)),
        Err(_) => {
            let _ = child.kill();
            bail!("a worker did not start within 30 s")
        }
    }
}

/// Sends one streamed chat request and prints the reply as it comes; returns (tokens, seconds
/// from the first token to the last).
fn first_request(
    url: &str,
    model: &str,
    prompt: &str,
    max_tokens: usize,
) -> anyhow::Result<(usize, f64)> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut resp = ureq::post(format!("{url}/chat/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .context("sending the first request")?;
    let reader = BufReader::new(resp.body_mut().as_reader());
    let mut stdout = std::io::stdout();
    let mut tokens = 0;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        if let Some(e) = v.get("error") {
            bail!("the request failed: {e}");
        }
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str()
            && !piece.is_empty()
        {
            print!("{piece}");
            stdout.flush()?;
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        } else if v["choices"][0]["delta"].get("content").is_some() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
        }
    }
    println!();
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok((tokens, secs))
}

/// Runs `sinew demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let cache = cluster::node::default_cache_dir();
    // removed when the demo ends, however it ends (the workers are stopped first)
    let tmp = tempfile::Builder::new()
        .prefix("sinew-demo-")
        .tempdir()
        .context("making the demo's directory")?;
    let run_dir = tmp.path().to_path_buf();
    // an ephemeral cluster key: the demo's processes only talk to each other
    let key = run_dir.join("cluster.key");
    transport::ClusterKey::generate()
        .and_then(|k| k.store_new(&key))
        .context("making the demo's cluster key")?;
    let (model, synthetic) = match &args.model {
        Some(m) => (m.clone(), false),
        None => {
            let m = cache.join("demo").join("sinew-demo-moe-q4_k.gguf");
            if !m.exists() {
                std::fs::create_dir_all(m.parent().expect("a parent"))?;
                println!(
                    "making the demo model (a small Qwen3-MoE shape with random weights) in {}",
                    m.display()
                );
                let part = m.with_extension("part");
                engine::gguf::write_synthetic(
                    &demo_shape(),
                    &part,
                    WriteOptions {
                        quant: Quant::Q4K,
                        experts: ExpertLayout::Stacked,
                    },
                )?;
                std::fs::rename(&part, &m)?;
            }
            (m, true)
        }
    };
    println!("starting {} worker(s) on this machine", args.nodes - 1);
    let mut workers = Workers(Vec::new());
    let mut addrs = Vec::new();
    for i in 1..args.nodes {
        let (child, addr) = spawn_worker(&key, &run_dir.join(format!("worker{i}")))?;
        println!("  worker {i} at {addr} (no model file: it receives its layers from the head)");
        workers.0.push(child);
        addrs.push(addr);
    }
    let serve = ServeArgs {
        model: model.clone(),
        workers: addrs,
        http: args.http.clone(),
        model_id: synthetic.then(|| "sinew-demo".to_string()),
        api_key_file: None,
        cors: None,
        ctx: Some(4096),
        max_seqs: 8,
        kv_memory: None,
        threads: None,
        split: None,
        prefill_chunk: 256,
        max_queue: 64,
        node_memory: None,
        cache_dir: Some(run_dir.join("head")),
        ops: crate::cluster_cmd::OpsArgs::default(),
        link: crate::cluster_cmd::LinkArgs::with_key_file(&key),
    };
    let prompt = args.prompt.clone();
    let max_tokens = args.max_tokens;
    let result = crate::serve::run_until(&serve, interrupted(), |addr, c, id| {
        let st = c.state();
        println!();
        if let Some(plan) = &st.plan {
            println!("{plan}");
        }
        for l in &st.links {
            println!(
                "link {} → {}: {}, round trip {:.0} µs, {:.0} MB/s (measured when it opened)",
                l.from,
                l.to,
                l.transport,
                l.rtt_us,
                l.bytes_per_s / 1e6
            );
        }
        let url = format!("http://{addr}/v1");
        println!("\nserving {id} at {url}");
        println!("status page: http://{addr}/");
        if synthetic {
            println!("(the weights are random: the reply is gibberish, the machinery is real)");
        }
        println!("\n> {prompt}");
        match first_request(&url, id, &prompt, max_tokens) {
            Ok((tokens, secs)) if secs > 0.0 => {
                println!(
                    "\n{tokens} tokens, {:.1} tok/s through {} stage(s)",
                    tokens as f64 / secs,
                    st.nodes.iter().filter(|n| n.layers.is_some()).count()
                );
            }
            Ok((tokens, _)) => println!("\n{tokens} tokens"),
            Err(e) => eprintln!("sinew demo: the first request failed: {e:#}"),
        }
        println!("\ntry it (Ctrl-C stops the cluster):");
        println!(
            "  curl {url}/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"
        );
        println!(
            "  python3 -c 'from openai import OpenAI; c = OpenAI(base_url=\"{url}\", api_key=\"none\"); print(c.chat.completions.create(model=\"{id}\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}]).choices[0].message.content)'"
        );
        println!("  sinew status --url http://{addr}");
    });
    drop(workers);
    drop(tmp);
    println!("stopped");
    result
}
