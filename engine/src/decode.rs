//! The per-request decode state machine, sans IO: a logits row in; the sampled token, the text that
//! became final, its log-probability and why the request finished out. It never touches the model,
//! so the local scheduler, `sinew generate` and the last stage of a pipeline drive it alike.

use crate::error::{Error, Result};
use crate::sampling::{Sampler, SamplingParams};
use crate::text::{Detokenizer, Step, Text};

/// The most alternatives a logprob entry carries (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Why a request finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-sequence token was produced.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` were produced.
    Length,
    /// The sequence reached the context length.
    ContextFull,
}

/// What a request decodes with.
#[derive(Clone, Debug)]
pub struct DecodeParams {
    /// Most new tokens (0: none; only prompt logprobs, if asked).
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Strings that end generation; never shown, even in part.
    pub stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens (benchmarks: always produce `max_tokens`).
    pub ignore_eos: bool,
    /// Log-probabilities of each generated token with this many alternatives (0..=20); `None`:
    /// none.
    pub logprobs: Option<usize>,
}

impl Default for DecodeParams {
    fn default() -> Self {
        DecodeParams {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

impl DecodeParams {
    /// Checks the values.
    ///
    /// # Errors
    /// [`Error::Request`] naming the bad value.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(Error::Request(format!(
                "at most {MAX_TOP_LOGPROBS} top logprobs, not {n}"
            )));
        }
        Ok(())
    }
}

/// A token's log-probability under the model (the logits before penalties and temperature) and
/// the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens and their logprobs, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `token` and the `top` most likely tokens, from one logits row.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> Result<TokenLogprob> {
    let Some(&x) = logits.get(token as usize) else {
        return Err(Error::Request(format!(
            "token {token} is outside the vocabulary of {}",
            logits.len()
        )));
    };
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let lse = max as f64
        + logits
            .iter()
            .map(|&v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let lp = |v: f32| (v as f64 - lse) as f32;
    let top = if top == 0 {
        Vec::new()
    } else {
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let mut c: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect();
        let n = top.min(c.len());
        if n < c.len() {
            c.select_nth_unstable_by(n - 1, order);
            c.truncate(n);
        }
        c.sort_unstable_by(order);
        c.into_iter().map(|(t, v)| (t, lp(v))).collect()
    };
    Ok(TokenLogprob {
        token,
        logprob: lp(x),
        top,
    })
}

/// Each prompt token's log-probability given the tokens before it, from the logits of every
/// prompt position (row i predicts token i + 1). The first token has none.
///
/// # Errors
/// [`Error::Request`] when the rows do not match the prompt.
pub fn prompt_logprobs(
    rows: &[Vec<f32>],
    prompt: &[u32],
    top: usize,
) -> Result<Vec<Option<TokenLogprob>>> {
    if rows.len() != prompt.len() {
        return Err(Error::Request(format!(
            "{} logits rows for a prompt of {} tokens",
            rows.len(),
            prompt.len()
        )));
    }
    let mut out = Vec::with_capacity(prompt.len());
    out.push(None);
    for (row, &t) in rows.iter().zip(&prompt[1..]) {
        out.push(Some(token_logprob(row, t, top)?));
    }
    Ok(out)
}

/// What one logits row did to a request.
#[derive(Clone, Debug)]
pub struct Decoded {
    /// The sampled token.
    pub token: u32,
    /// Text that became final with it (possibly empty).
    pub text: String,
    /// Its logprob, when the request asks.
    pub logprob: Option<TokenLogprob>,
    /// Set when the request is finished: the token is its last.
    pub finish: Option<Finish>,
}

/// A request's decode state: sampler, detokenizer, stop conditions.
pub struct Decoder {
    params: DecodeParams,
    sampler: Sampler,
    detok: Detokenizer,
    eos: Vec<u32>,
    prompt_len: usize,
    ctx: usize,
    tokens: Vec<u32>,
    finish: Option<Finish>,
}

impl Decoder {
    /// A decoder for a request with `prompt` on a model whose sequences hold `ctx` positions.
    ///
    /// # Errors
    /// [`Error::Request`] for bad parameters or an empty prompt; [`Error::ContextLength`] for a
    /// prompt longer than `ctx`.
    pub fn new(text: &Text, prompt: &[u32], params: DecodeParams, ctx: usize) -> Result<Self> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::Request("the prompt is empty".into()));
        }
        if prompt.len() > ctx {
            return Err(Error::ContextLength {
                ctx,
                requested: prompt.len(),
            });
        }
        let mut sampler = Sampler::new(params.sampling.clone())?;
        sampler.set_prompt(prompt);
        let finish = (params.max_tokens == 0).then_some(Finish::Length);
        Ok(Decoder {
            detok: Detokenizer::new(&params.stop),
            params,
            sampler,
            eos: text.eos_ids().to_vec(),
            prompt_len: prompt.len(),
            ctx,
            tokens: Vec::new(),
            finish,
        })
    }

    /// The positions the request's cache needs at most: the prompt and every generated token
    /// but the last (which is never fed back), within the context.
    pub fn positions_needed(&self) -> usize {
        (self.prompt_len + self.params.max_tokens.saturating_sub(1)).min(self.ctx)
    }

    /// Samples from `logits` (the row after the prompt or after the last token) and advances.
    ///
    /// # Errors
    /// [`Error::Request`] when the request already finished, or for NaN or empty logits;
    /// tokenizer errors.
    pub fn step(&mut self, text: &Text, logits: &[f32]) -> Result<Decoded> {
        if let Some(f) = self.finish {
            return Err(Error::Request(format!(
                "the request already finished ({f:?})"
            )));
        }
        let token = self.sampler.sample(logits)?;
        let logprob = match self.params.logprobs {
            Some(n) => Some(token_logprob(logits, token, n)?),
            None => None,
        };
        self.accept(text, token, logprob)
    }

    /// The sampling parameters (a pipeline's last stage samples with them; the head then calls
    /// [`Decoder::accept`]).
    pub fn params(&self) -> &DecodeParams {
        &self.params
    }

    /// Advances with a token sampled elsewhere (a pipeline's last stage, with these parameters
    /// and seed) and its logprob: the text that became final and whether the request finished,
    /// as [`Decoder::step`] after sampling.
    ///
    /// # Errors
    /// [`Error::Request`] when the request already finished; tokenizer errors.
    pub fn accept(
        &mut self,
        text: &Text,
        token: u32,
        logprob: Option<TokenLogprob>,
    ) -> Result<Decoded> {
        if let Some(f) = self.finish {
            return Err(Error::Request(format!(
                "the request already finished ({f:?})"
            )));
        }
        self.tokens.push(token);
        let mut out = String::new();
        let mut finish = None;
        if !self.params.ignore_eos && self.eos.contains(&token) {
            finish = Some(Finish::Eos);
        } else {
            match self.detok.push(text, token)? {
                Step::Text(s) => out = s,
                Step::Stop(s) => {
                    out = s;
                    finish = Some(Finish::Stop);
                }
            }
        }
        if finish.is_none() {
            if self.tokens.len() >= self.params.max_tokens {
                finish = Some(Finish::Length);
            } else if self.prompt_len + self.tokens.len() > self.ctx {
                // the next token would need a position past the context
                finish = Some(Finish::ContextFull);
            }
        }
        if matches!(
            finish,
            Some(Finish::Eos | Finish::Length | Finish::ContextFull)
        ) {
            out.push_str(&self.detok.finish(text)?);
        }
        self.finish = finish;
        Ok(Decoded {
            token,
            text: out,
            logprob,
            finish,
        })
    }

    /// Generated tokens, including the end-of-sequence token that ended generation.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The prompt's length.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Why the request finished, once it has.
    pub fn finish(&self) -> Option<Finish> {
        self.finish
    }

    /// The whole generated text, up to any stop string.
    ///
    /// # Errors
    /// Tokenizer errors.
    pub fn text(&self, text: &Text) -> Result<String> {
        self.detok.text(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn builtin() -> Text {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3_moe_gqa");
        Text::from_hf_dir(&dir, &[]).unwrap()
    }

    /// Logits that make `t` the greedy pick in a vocabulary of 384.
    fn pick(t: u32) -> Vec<f32> {
        let mut l = vec![0f32; 384];
        l[t as usize] = 10.0;
        l
    }

    fn run(d: &mut Decoder, text: &Text, ids: &[u32]) -> (String, Option<Finish>) {
        let mut shown = String::new();
        for &t in ids {
            let o = d.step(text, &pick(t)).unwrap();
            assert_eq!(o.token, t);
            shown.push_str(&o.text);
            if o.finish.is_some() {
                return (shown, o.finish);
            }
        }
        (shown, None)
    }

    #[test]
    fn finishes_on_eos_max_tokens_stop_strings_and_the_context() {
        let text = builtin();
        let ids = text.encode("hello brown fox, the end", false).unwrap();
        let prompt = [5u32, 6, 7];
        // max tokens: the text of exactly that many tokens, all of it shown
        let p = DecodeParams {
            max_tokens: 3,
            ..Default::default()
        };
        let mut d = Decoder::new(&text, &prompt, p, 512).unwrap();
        let (shown, f) = run(&mut d, &text, &ids);
        assert_eq!(f, Some(Finish::Length));
        assert_eq!(shown, text.decode(&ids[..3]).unwrap());
        assert!(
            d.step(&text, &pick(1)).is_err(),
            "finished requests take no more"
        );
        // end of sequence (id 2 here): the text before it
        let mut d = Decoder::new(&text, &prompt, DecodeParams::default(), 512).unwrap();
        let mut with_eos = ids[..4].to_vec();
        with_eos.push(2);
        let (shown, f) = run(&mut d, &text, &with_eos);
        assert_eq!(f, Some(Finish::Eos));
        assert_eq!(shown, text.decode(&ids[..4]).unwrap());
        assert_eq!(d.tokens().len(), 5);
        // a stop string across tokens is never shown
        let p = DecodeParams {
            stop: vec!["fox,".into()],
            ..Default::default()
        };
        let mut d = Decoder::new(&text, &prompt, p, 512).unwrap();
        let (shown, f) = run(&mut d, &text, &ids);
        assert_eq!(f, Some(Finish::Stop));
        assert_eq!(shown, "hello brown ");
        // the context: a prompt of 3 in a context of 5 leaves 3 tokens (the last is not fed back)
        let mut d = Decoder::new(&text, &prompt, DecodeParams::default(), 5).unwrap();
        assert_eq!(d.positions_needed(), 5);
        let (_, f) = run(&mut d, &text, &ids);
        assert_eq!(f, Some(Finish::ContextFull));
        assert_eq!(d.tokens().len(), 3);
    }

    #[test]
    fn bad_requests_are_refused() {
        let text = builtin();
        let p = DecodeParams {
            logprobs: Some(21),
            ..Default::default()
        };
        assert!(Decoder::new(&text, &[1], p, 512).is_err());
        assert!(Decoder::new(&text, &[], DecodeParams::default(), 512).is_err());
        match Decoder::new(&text, &[1; 10], DecodeParams::default(), 8) {
            Err(Error::ContextLength { ctx, requested }) => assert_eq!((ctx, requested), (8, 10)),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        }
        let p = DecodeParams {
            max_tokens: 0,
            ..Default::default()
        };
        let d = Decoder::new(&text, &[1], p, 8).unwrap();
        assert_eq!(d.finish(), Some(Finish::Length));
    }

    #[test]
    fn logprobs_are_log_softmax_with_sorted_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = token_logprob(&logits, 2, 3).unwrap();
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        assert!((lp.logprob as f64 - (2f64 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert!(token_logprob(&logits, 4, 0).is_err());
        let rows = vec![logits.to_vec(), logits.to_vec()];
        let p = prompt_logprobs(&rows, &[0, 1], 0).unwrap();
        assert!(p[0].is_none());
        assert_eq!(p[1].as_ref().unwrap().token, 1);
        assert!(prompt_logprobs(&rows, &[0], 0).is_err());
    }
}
