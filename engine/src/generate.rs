//! The generation loop: prefill the prompt in one batch, then decode one token at a time until
//! an end-of-sequence token, a stop string, the token budget or the context length.

use std::time::Instant;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::{Logits, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::text::{Detokenizer, Step, Text};

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

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-sequence token was produced.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` were produced, or the context is full.
    Length,
}

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

/// Generates from `prompt` (token ids) with a fresh KV cache, calling `on_text` with each piece of
/// text as it becomes final.
pub fn generate(
    model: &mut Model,
    text: &Text,
    prompt: &[u32],
    options: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::Request("the prompt is empty".into()));
    }
    let max_ctx = model.config().max_position_embeddings;
    if prompt.len() > max_ctx {
        return Err(Error::Request(format!(
            "the prompt has {} tokens, the model's context is {max_ctx}",
            prompt.len()
        )));
    }
    let mut sampler = Sampler::new(options.sampling.clone())?;
    model.reset();
    let mut detok = Detokenizer::new(&options.stop);
    let mut tokens = Vec::new();
    let started = Instant::now();
    let which = if options.prompt_logits {
        Logits::All
    } else {
        Logits::Last
    };
    let logits = model.logits(prompt, which)?;
    let last = logits.get(logits.dim(0)? - 1)?.to_vec1::<f32>()?;
    let prompt_logits = options.prompt_logits.then_some(logits);
    let mut next = sampler.sample(&last)?;
    let prefill_secs = started.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut decode_steps = 0;
    let finish = loop {
        if options.max_tokens == 0 {
            break Finish::Length;
        }
        tokens.push(next);
        if !options.ignore_eos && text.eos_ids().contains(&next) {
            break Finish::Eos;
        }
        match detok.push(text, next)? {
            Step::Text(s) => {
                if !s.is_empty() {
                    on_text(&s)
                }
            }
            Step::Stop(s) => {
                if !s.is_empty() {
                    on_text(&s)
                }
                break Finish::Stop;
            }
        }
        if tokens.len() >= options.max_tokens || model.position() >= max_ctx {
            let rest = detok.finish(text)?;
            if !rest.is_empty() {
                on_text(&rest);
            }
            break Finish::Length;
        }
        let logits = model.logits(&[next], Logits::Last)?;
        decode_steps += 1;
        next = sampler.sample(&logits.get(0)?.to_vec1::<f32>()?)?;
    };
    let decode_secs = decode_start.elapsed().as_secs_f64();
    Ok(Generation {
        prompt_tokens: prompt.len(),
        text: detok.text(text)?,
        tokens,
        finish,
        prefill_secs,
        decode_secs,
        decode_steps,
        prompt_logits,
    })
}
