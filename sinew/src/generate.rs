//! `sinew generate`: load a model (a Hugging Face directory or a GGUF file), run one prompt, stream
//! the text, report prefill and decode speed.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use engine::{GenerateOptions, LoadOptions, Loaded, Message, SamplingParams, generate};

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
    /// Seed of the sampler (the same seed gives the same tokens).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Compute threads (default: all cores). Applied by `main` before any thread starts.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Keep generating past end-of-sequence tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Write the prompt's logits, f32 [prompt_len, vocab] named `logits`, to this safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

/// Runs `sinew generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let options = LoadOptions {
        layers: None,
        dequantize: false,
        progress: !args.json,
    };
    let mut m = Loaded::open(&args.model, &options)?;
    let prompt: Vec<u32> = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) if args.raw => m.text.encode(text, true)?,
        (None, Some(text)) => {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(Message {
                    role: "system".into(),
                    content: system.clone(),
                });
            }
            messages.push(Message {
                role: "user".into(),
                content: text.clone(),
            });
            let rendered = m.text.render_chat(&messages, true)?;
            m.text.encode(&rendered, false)?
        }
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let gen_options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop: args.stop.clone(),
        prompt_logits: args.logits_out.is_some(),
        ignore_eos: args.ignore_eos,
    };
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let g = generate(&mut m.model, &m.text, &prompt, &gen_options, &mut |piece| {
        if stream {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
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
