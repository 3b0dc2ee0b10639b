//! Peers for `bench/engine.sh`.
//!
//! `engine-peer membw THREADS` — memory read bandwidth: THREADS threads each sum their share of a
//! 2 GiB buffer, best of 5 passes; prints `{"threads", "gb_per_s"}`.
//!
//! `engine-peer candle-qwen3-moe DIR THREADS PROMPT_LEN TOKENS` — candle-transformers' qwen3_moe in
//! f32 on the model directory DIR: a prefill of PROMPT_LEN tokens, then TOKENS greedy decode steps;
//! prints `{"decode_tokens_per_s", "prefill_tokens_per_s"}`. THREADS is applied by the caller
//! through RAYON_NUM_THREADS.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen3_moe::{Config, ModelForCausalLM};

fn membw(threads: usize) {
    let bytes = 2usize << 30;
    let n = bytes / 8;
    let data: Vec<u64> = (0..n as u64).collect();
    let chunk = n.div_ceil(threads);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = data
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{}", serde_json::json!({"threads": threads, "gb_per_s": bytes as f64 / best / 1e9}));
}

/// The greedy token of the last position, whatever leading dimensions the logits carry.
fn last_argmax(logits: &Tensor, vocab: usize) -> candle_core::Result<u32> {
    let flat = logits.flatten_all()?;
    flat.narrow(0, flat.dim(0)? - vocab, vocab)?.argmax(0)?.to_scalar::<u32>()
}

fn candle_qwen3_moe(dir: &str, prompt_len: usize, tokens: usize) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let text = std::fs::read_to_string(format!("{dir}/config.json"))?;
    let cfg: Config = serde_json::from_str(&text).map_err(candle_core::Error::wrap)?;
    let files = vec![format!("{dir}/model.safetensors")];
    // SAFETY: the benchmark's own freshly written model file, mapped read-only.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev)? };
    let mut model = ModelForCausalLM::new(&cfg, vb)?;
    let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| 3 + i * 7 % 300).collect();
    let t = Instant::now();
    let input = Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?;
    let logits = model.forward(&input, 0)?;
    let mut next = last_argmax(&logits, cfg.vocab_size)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..tokens {
        let input = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
        let logits = model.forward(&input, prompt_len + i)?;
        next = last_argmax(&logits, cfg.vocab_size)?;
    }
    let decode = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "prefill_tokens_per_s": prompt_len as f64 / prefill,
            "decode_tokens_per_s": tokens as f64 / decode,
        })
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: engine-peer membw THREADS | candle-qwen3-moe DIR THREADS PROMPT_LEN TOKENS";
    let num = |i: usize| -> usize {
        args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            eprintln!("{usage}");
            std::process::exit(2)
        })
    };
    match args.get(1).map(String::as_str) {
        Some("membw") => membw(num(2)),
        Some("candle-qwen3-moe") => {
            if let Err(e) = candle_qwen3_moe(&args[2], num(4), num(5)) {
                eprintln!("candle-transformers qwen3_moe: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
