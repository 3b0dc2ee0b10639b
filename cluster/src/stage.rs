//! One pipeline stage's work on a micro-batch, the same on the head (stage 0, fed token ids) and
//! on a worker (fed hidden states): drop released sequences, open new ones (a KV reservation of
//! their own), run the layers over every row at once, then either hand the hidden states on or —
//! at the last stage — compute logits only for the rows that need them and sample each sequence
//! with its own parameters and seed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;
use engine::decode::token_logprob;
use engine::{Chunk, Input, KvCache, KvPool, Logits, Model, Output, Sampler};

use crate::error::{Error, Result};
use crate::warm::KeepWarm;
use crate::wire::{Batch, Hidden, HiddenData, Rows, SeqResult};

/// A sequence's state at one stage.
struct SeqState {
    cache: KvCache,
    /// The last stage's sampler.
    sampler: Option<Sampler>,
    prompt: Vec<u32>,
    logprobs: Option<u8>,
    prompt_logprobs: Option<u8>,
}

/// What a stage hands on.
#[derive(Debug)]
pub enum StageOut {
    /// Hidden states for the next stage.
    Hidden(Hidden),
    /// The last stage's results, one per chunk.
    Sampled(Vec<SeqResult>),
}

/// A stage: its layers and the sequences it holds caches for.
pub struct StageRunner {
    model: Arc<Model>,
    kv: KvPool,
    seqs: HashMap<u64, SeqState>,
    last: bool,
    bf16: bool,
    /// Spinners keeping the cores awake between micro-batches (a stage of a pipeline only).
    warm: Option<KeepWarm>,
}

impl StageRunner {
    /// A stage over `model` (its layer range decides whether it is the last), drawing caches
    /// from `kv`; hidden states go on in bf16 when `bf16`. A stage holding part of the layers
    /// keeps its cores awake for `keep_warm` after each micro-batch ([`KeepWarm`]; zero: not).
    pub fn new(model: Arc<Model>, kv: KvPool, bf16: bool, keep_warm: Duration) -> Self {
        let layers = model.layers();
        let last = layers.end == model.config().num_layers;
        let whole = layers.start == 0 && last;
        let warm = if whole {
            None
        } else {
            KeepWarm::start(candle_core::utils::get_num_threads(), keep_warm)
        };
        StageRunner {
            model,
            kv,
            seqs: HashMap::new(),
            last,
            bf16,
            warm,
        }
    }

    /// The stage's model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The stage's KV pool.
    pub fn kv(&self) -> &KvPool {
        &self.kv
    }

    /// Sequences holding a cache here.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Drops every sequence (a plan ends).
    pub fn clear(&mut self) {
        self.seqs.clear();
    }

    /// Drops the sequences `ids` (ids it does not hold are ignored: they failed before reaching
    /// this stage).
    pub fn release(&mut self, ids: &[u64]) {
        for id in ids {
            self.seqs.remove(id);
        }
    }

    /// Runs `batch` (its hidden states are ignored at stage 0, which takes `tokens`). The hidden
    /// states move out of the batch into the step (left empty), so they are not copied.
    ///
    /// # Errors
    /// A batch that does not match the stage's sequences (an unknown sequence, a position that
    /// differs from the cache's, a sequence twice), no room for a new sequence, or a failed step.
    /// On an error no sequence's cache changes, and new sequences of the batch are dropped.
    pub fn run(&mut self, batch: &mut Batch, tokens: Option<&[u32]>) -> Result<StageOut> {
        self.release(&batch.releases);
        let hidden = std::mem::replace(&mut batch.hidden.data, HiddenData::F32(Vec::new()));
        let mut opened = Vec::new();
        let result = self.run_inner(batch, tokens, hidden, &mut opened);
        // the window runs from the end of the step: the gap to the next one is the other
        // stages' work
        if let Some(w) = &self.warm {
            w.touch();
        }
        if result.is_err() {
            for id in opened {
                self.seqs.remove(&id);
            }
        }
        result
    }

    fn run_inner(
        &mut self,
        batch: &Batch,
        tokens: Option<&[u32]>,
        hidden: HiddenData,
        opened: &mut Vec<u64>,
    ) -> Result<StageOut> {
        for c in &batch.chunks {
            if let Some(o) = &c.open {
                if self.seqs.contains_key(&c.seq) {
                    return Err(Error::Protocol(format!("sequence {} opened twice", c.seq)));
                }
                let cache = self.kv.sequence(o.reserve as usize)?;
                let sampler = if self.last {
                    let mut s = Sampler::new(o.sampling.clone())?;
                    s.set_prompt(&o.prompt);
                    Some(s)
                } else {
                    None
                };
                self.seqs.insert(
                    c.seq,
                    SeqState {
                        cache,
                        sampler,
                        prompt: if self.last {
                            o.prompt.clone()
                        } else {
                            Vec::new()
                        },
                        logprobs: o.logprobs,
                        prompt_logprobs: o.prompt_logprobs,
                    },
                );
                opened.push(c.seq);
            }
        }
        if batch.chunks.is_empty() {
            return Ok(if self.last {
                StageOut::Sampled(Vec::new())
            } else {
                StageOut::Hidden(Hidden {
                    width: self.model.config().hidden_size as u32,
                    data: HiddenData::F32(Vec::new()),
                })
            });
        }
        // every chunk's sequence, once, at the position the head expects
        let mut states: Vec<&mut SeqState> = Vec::with_capacity(batch.chunks.len());
        {
            let mut seen = std::collections::HashSet::new();
            for c in &batch.chunks {
                if !seen.insert(c.seq) {
                    return Err(Error::Protocol(format!(
                        "sequence {} twice in one batch",
                        c.seq
                    )));
                }
            }
            let mut by_id: HashMap<u64, &mut SeqState> =
                self.seqs.iter_mut().map(|(k, v)| (*k, v)).collect();
            for c in &batch.chunks {
                let s = by_id.remove(&c.seq).ok_or_else(|| {
                    Error::Protocol(format!("sequence {} is not open at this stage", c.seq))
                })?;
                if s.cache.len() != c.pos as usize {
                    return Err(Error::Protocol(format!(
                        "sequence {} is at position {} here, the batch says {}",
                        c.seq,
                        s.cache.len(),
                        c.pos
                    )));
                }
                states.push(s);
            }
        }
        let total: usize = batch.chunks.iter().map(|c| c.rows as usize).sum();
        let input = match tokens {
            Some(ids) => Input::Tokens(ids),
            None => {
                let h = &batch.hidden;
                let width = self.model.config().hidden_size;
                if h.width as usize != width {
                    return Err(Error::Protocol(format!(
                        "hidden states {} wide for a model of {width}",
                        h.width
                    )));
                }
                Input::Hidden(Tensor::from_vec(
                    hidden.into_f32(),
                    (total, width),
                    &candle_core::Device::Cpu,
                )?)
            }
        };
        let logits_of = |r: Rows| match r {
            Rows::Skip => Logits::Skip,
            Rows::Last => Logits::Last,
            Rows::All => Logits::All,
        };
        let out = {
            let mut chunks: Vec<Chunk<'_>> = states
                .iter_mut()
                .zip(&batch.chunks)
                .map(|(s, c)| Chunk {
                    cache: &mut s.cache,
                    rows: c.rows as usize,
                    logits: logits_of(c.logits),
                })
                .collect();
            self.model.step(&mut chunks, input)?
        };
        match out {
            Output::Hidden(h) => {
                let v = h.flatten_all()?.to_vec1::<f32>()?;
                let width = self.model.config().hidden_size as u32;
                let data = if self.bf16 {
                    HiddenData::Bf16(v.iter().map(|&x| half::bf16::from_f32(x)).collect())
                } else {
                    HiddenData::F32(v)
                };
                Ok(StageOut::Hidden(Hidden { width, data }))
            }
            Output::Logits(l) => {
                let rows = if l.dim(0)? == 0 {
                    Vec::new()
                } else {
                    l.to_vec2::<f32>()?
                };
                let mut it = rows.iter();
                let mut results = Vec::with_capacity(batch.chunks.len());
                for (s, c) in states.iter_mut().zip(&batch.chunks) {
                    let mine: Vec<&Vec<f32>> = match c.logits {
                        Rows::Skip => Vec::new(),
                        Rows::Last => it.by_ref().take(1).collect(),
                        Rows::All => it.by_ref().take(c.rows as usize).collect(),
                    };
                    results.push(sample(s, c.seq, c.pos as usize, c.logits, c.sample, &mine));
                }
                Ok(StageOut::Sampled(results))
            }
        }
    }
}

/// The last stage's work for one chunk: prompt logprobs of its rows, then the next token.
fn sample(
    s: &mut SeqState,
    seq: u64,
    pos: usize,
    which: Rows,
    want_token: bool,
    rows: &[&Vec<f32>],
) -> SeqResult {
    let mut r = SeqResult {
        seq,
        token: None,
        logprob: None,
        prompt_logprobs: Vec::new(),
        error: None,
    };
    let mut run = || -> engine::Result<(Option<u32>, Option<engine::TokenLogprob>, Vec<engine::TokenLogprob>)> {
        let mut plp = Vec::new();
        if which == Rows::All
            && let Some(top) = s.prompt_logprobs
        {
            // row j (position pos + j) predicts prompt token pos + j + 1
            for (j, row) in rows.iter().enumerate() {
                if let Some(&t) = s.prompt.get(pos + j + 1) {
                    plp.push(token_logprob(row, t, top as usize)?);
                }
            }
        }
        if !want_token {
            return Ok((None, None, plp));
        }
        let Some(row) = rows.last() else {
            return Err(engine::Error::Request(
                "a token was asked for without logits".into(),
            ));
        };
        let sampler = s
            .sampler
            .as_mut()
            .ok_or_else(|| engine::Error::Request("no sampler at this stage".into()))?;
        let token = sampler.sample(row)?;
        let lp = match s.logprobs {
            Some(n) => Some(token_logprob(row, token, n as usize)?),
            None => None,
        };
        Ok((Some(token), lp, plp))
    };
    match run() {
        Ok((token, logprob, plp)) => {
            r.token = token;
            r.logprob = logprob;
            r.prompt_logprobs = plp;
        }
        Err(e) => r.error = Some(e.to_string()),
    }
    r
}
