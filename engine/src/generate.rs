//! One sequence, start to end: prefill the prompt in one batch, then decode one token at a time
//! through the [`Decoder`] until an end-of-sequence token, a stop string, the token budget or the
//! context length.

use std::time::Instant;

use candle_core::Tensor;

use crate::decode::{DecodeParams, Decoder};
use crate::error::Result;
use crate::kv::KvPool;
use crate::model::{Logits, Model};
use crate::sampling::SamplingParams;
use crate::text::Text;

/// What to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Strings that end generation (not included in the text).
    pub stop: Vec<String>,
    /// Keep the logits of every prompt position.
    pub prompt_logits: bool,
    /// Do not stop at end-of-sequence tokens (benchmarks: always produce `max_tokens`).
    pub ignore_eos: bool,
}

pub use crate::decode::Finish;

/// The result of a generation.
#[derive(Debug)]
pub struct Generation {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated token ids, including the end-of-sequence token that ended generation, as
    /// transformers reports them.
    pub tokens: Vec<u32>,
    /// Generated text, up to any stop string.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Seconds spent on the prompt (one batched forward pass and the first sample).
    pub prefill_secs: f64,
    /// Seconds spent on single-token decode steps.
    pub decode_secs: f64,
    /// Single-token decode steps run.
    pub decode_steps: usize,
    /// Logits of every prompt position [prompt_len, vocab], if asked for.
    pub prompt_logits: Option<Tensor>,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }

    /// Tokens per second of decode.
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// Generates from `prompt` (token ids) in a new sequence of `kv`, calling `on_text` with each
/// piece of text as it becomes final. The sequence's positions go back to the pool at the end.
///
/// # Errors
/// Bad parameters, an empty prompt, a prompt past the context ([`crate::Error::ContextLength`]),
/// no room in the pool ([`crate::Error::NoRoom`]), model errors.
pub fn generate(
    model: &Model,
    kv: &KvPool,
    text: &Text,
    prompt: &[u32],
    options: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let params = DecodeParams {
        max_tokens: options.max_tokens,
        sampling: options.sampling.clone(),
        stop: options.stop.clone(),
        ignore_eos: options.ignore_eos,
        logprobs: None,
    };
    let mut decoder = Decoder::new(text, prompt, params, kv.ctx())?;
    let mut cache = kv.sequence(decoder.positions_needed())?;
    let started = Instant::now();
    let which = if options.prompt_logits {
        Logits::All
    } else {
        Logits::Last
    };
    let logits = model.logits(&mut cache, prompt, which)?;
    let mut last = logits.get(logits.dim(0)? - 1)?.to_vec1::<f32>()?;
    let prompt_logits = options.prompt_logits.then_some(logits);
    let mut prefill_secs = 0.0;
    let mut decode_start = Instant::now();
    let mut decode_steps = 0;
    let finish = loop {
        if let Some(f) = decoder.finish() {
            break f;
        }
        let out = decoder.step(text, &last)?;
        if decoder.tokens().len() == 1 {
            // the prompt's pass and the first sample
            prefill_secs = started.elapsed().as_secs_f64();
            decode_start = Instant::now();
        }
        if !out.text.is_empty() {
            on_text(&out.text);
        }
        if let Some(f) = out.finish {
            break f;
        }
        let logits = model.logits(&mut cache, &[out.token], Logits::Last)?;
        decode_steps += 1;
        last = logits.get(0)?.to_vec1::<f32>()?;
    };
    if decoder.tokens().is_empty() {
        prefill_secs = started.elapsed().as_secs_f64();
    }
    let decode_secs = decode_start.elapsed().as_secs_f64();
    Ok(Generation {
        prompt_tokens: prompt.len(),
        text: decoder.text(text)?,
        tokens: decoder.tokens().to_vec(),
        finish,
        prefill_secs,
        decode_secs,
        decode_steps,
        prompt_logits,
    })
}
