//! The decoder: embedding, attention with RoPE over per-sequence KV caches, dense or
//! mixture-of-experts MLPs, final norm and output head, for any contiguous range of layers (a
//! pipeline stage).
//!
//! The weights are read-only: [`Model::step`] runs one batched step for any number of sequences,
//! each bringing its own [`KvCache`] and its new positions (a prompt chunk or one decode token).
//! Matrix products see every row of the step at once; attention runs per sequence; MoE layers group
//! the rows by expert, so each chosen expert's weights are read once per step.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use crate::attention::{Heads, Rope, SeqAttention, attend};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::{self, Job, PackedMatrix, QuantRow};
use crate::kv::{KvCache, KvPool, KvShape};
use crate::linear::{Acts, Mat};
use crate::weights::{Proj, Store, W};

/// What a stage consumes: token ids (the first stage) or the previous stage's hidden states.
pub enum Input<'a> {
    /// Token ids of the new positions.
    Tokens(&'a [u32]),
    /// Hidden states [positions, hidden] from the previous stage.
    Hidden(Tensor),
}

/// What a stage produces: logits (the last stage) or hidden states for the next stage.
#[derive(Debug)]
pub enum Output {
    /// Logits [positions, vocab] (all positions or only the last, as asked).
    Logits(Tensor),
    /// Hidden states [positions, hidden].
    Hidden(Tensor),
}

/// Which positions' logits the last stage computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the prompt's last).
    Skip,
    /// Only the last position (generation).
    Last,
    /// Every position (scoring, `--logits-out`).
    All,
}

/// A linear layer: a (possibly quantized) matrix and an optional bias.
struct Linear {
    w: Mat,
    b: Option<Tensor>,
}

impl Linear {
    fn bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Mat,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

struct Mlp {
    gate: Mat,
    up: Mat,
    down: Mat,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut gu = Mat::forward_shared(&[&self.gate, &self.up], x)?;
        let u = gu.pop().expect("two outputs");
        let g = candle_nn::ops::silu(&gu.pop().expect("two outputs"))?;
        self.down.forward(&(g * u)?)
    }

    /// The three matrices, when all are packed for sinew's kernels.
    fn packed(&self) -> Option<[&PackedMatrix; 3]> {
        Some([self.gate.packed()?, self.up.packed()?, self.down.packed()?])
    }
}

struct Moe {
    router: Mat,
    experts: Vec<Mlp>,
    top_k: usize,
    norm_topk_prob: bool,
}

enum Ffn {
    Dense(Mlp),
    Sparse(Moe),
}

struct Block {
    attn_norm: Tensor,
    attn: Attention,
    mlp_norm: Tensor,
    ffn: Ffn,
}

/// A model, or the share of one pipeline stage: layers `layers`, plus the embedding when the range
/// starts at 0 and the final norm and head when it ends at the last layer. Read-only once loaded:
/// sequences keep their state in [`KvCache`]s.
pub struct Model {
    config: ModelConfig,
    layers: Range<usize>,
    embed: Option<Embed>,
    blocks: Vec<Block>,
    norm: Option<Tensor>,
    head: Option<Mat>,
    device: Device,
}

/// One sequence's part of a batched step ([`Model::step`]): its cache, how many new positions
/// (rows of the step's input, in order) it brings, and which of their logits the last stage
/// returns.
pub struct Chunk<'a> {
    /// The sequence's cache; the new positions follow the ones it holds.
    pub cache: &'a mut KvCache,
    /// New positions: a prompt chunk, or 1 for a decode token.
    pub rows: usize,
    /// Which of them get logits (at the last stage).
    pub logits: Logits,
}

/// Where a first stage reads token embeddings.
enum Embed {
    /// Its own embedding matrix.
    Matrix(QMatMul),
    /// Rows of the tied output head, which the kernels hold packed: the matrix is kept once.
    Head(Arc<PackedMatrix>),
}

impl Embed {
    /// The embeddings of `ids` (checked against the vocabulary by the caller), [ids, hidden].
    fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embed::Matrix(m) => Ok(m.embedding(&Tensor::new(ids, device)?)?),
            Embed::Head(p) => {
                let mut rows = Vec::with_capacity(ids.len() * p.cols());
                for &id in ids {
                    rows.extend(p.dequantize_row(id as usize));
                }
                Ok(Tensor::from_vec(rows, (ids.len(), p.cols()), device)?)
            }
        }
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?)
}

impl Model {
    /// Loads layers `layers` of the model in `store`. `progress` is called once per tensor group
    /// loaded, with (done, total), for a progress bar.
    pub fn load(
        config: &ModelConfig,
        store: &Store,
        layers: Range<usize>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let c = config;
        if layers.start >= layers.end || layers.end > c.num_layers {
            return Err(Error::Request(format!(
                "layer range {}..{} is not within the model's {} layers",
                layers.start, layers.end, c.num_layers
            )));
        }
        let device = Device::Cpu;
        let total = layers.len() + 2;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let first = layers.start == 0;
        let last = layers.end == c.num_layers;
        // the output head is the embedding matrix (no head tensor of its own)
        let tied = c.tie_word_embeddings && !store.has(W::Head);
        progress(1, total);
        let eps = c.rms_norm_eps as f32;
        let mut blocks = Vec::with_capacity(layers.len());
        for (n, l) in layers.clone().enumerate() {
            let bias = |w: W, n: usize| -> Result<Option<Tensor>> {
                if c.attention_bias || store.has(w) {
                    Ok(Some(store.tensor(w, &[n])?))
                } else {
                    Ok(None)
                }
            };
            let norms = c.architecture.has_qk_norm();
            let attn = Attention {
                q: Linear {
                    w: store.mat(W::Q(l), c.num_heads * hd, h)?,
                    b: bias(W::QBias(l), c.num_heads * hd)?,
                },
                k: Linear {
                    w: store.mat(W::K(l), c.num_kv_heads * hd, h)?,
                    b: bias(W::KBias(l), c.num_kv_heads * hd)?,
                },
                v: Linear {
                    w: store.mat(W::V(l), c.num_kv_heads * hd, h)?,
                    b: bias(W::VBias(l), c.num_kv_heads * hd)?,
                },
                o: store.mat(W::O(l), h, c.num_heads * hd)?,
                q_norm: norms
                    .then(|| store.tensor(W::QNorm(l), &[hd]))
                    .transpose()?,
                k_norm: norms
                    .then(|| store.tensor(W::KNorm(l), &[hd]))
                    .transpose()?,
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                head_dim: hd,
                eps,
            };
            let ffn = if c.is_sparse_layer(l) {
                let moe = c.moe.as_ref().expect("sparse layers imply an MoE config");
                let (e, i) = (moe.num_experts, moe.expert_intermediate_size);
                let gate = store.experts(l, Proj::Gate, e, i, h)?;
                let up = store.experts(l, Proj::Up, e, i, h)?;
                let down = store.experts(l, Proj::Down, e, h, i)?;
                let experts = gate
                    .into_iter()
                    .zip(up)
                    .zip(down)
                    .map(|((gate, up), down)| Mlp { gate, up, down })
                    .collect();
                Ffn::Sparse(Moe {
                    router: store.mat(W::Router(l), e, h)?,
                    experts,
                    top_k: moe.top_k,
                    norm_topk_prob: moe.norm_topk_prob,
                })
            } else {
                let i = c.intermediate_size;
                Ffn::Dense(Mlp {
                    gate: store.mat(W::Gate(l), i, h)?,
                    up: store.mat(W::Up(l), i, h)?,
                    down: store.mat(W::Down(l), h, i)?,
                })
            };
            blocks.push(Block {
                attn_norm: store.tensor(W::AttnNorm(l), &[h])?,
                attn,
                mlp_norm: store.tensor(W::MlpNorm(l), &[h])?,
                ffn,
            });
            progress(n + 2, total);
        }
        let (norm, head) = if last {
            let norm = store.tensor(W::FinalNorm, &[h])?;
            let head = store.mat(if tied { W::Embed } else { W::Head }, c.vocab_size, h)?;
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        // A tied head serves the embedding rows too — from the packed tiles (unpacking is
        // exact) or candle's matrix — so the embedding is read and kept once.
        let embed = match &head {
            _ if !first => None,
            Some(Mat::Packed(p)) if tied => Some(Embed::Head(p.clone())),
            Some(Mat::Candle(q)) if tied => Some(Embed::Matrix(q.clone())),
            _ => Some(Embed::Matrix(store.matrix(W::Embed, c.vocab_size, h)?)),
        };
        progress(total, total);
        Ok(Model {
            config: c.clone(),
            embed,
            layers,
            blocks,
            norm,
            head,
            device,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The layers this model (stage) holds.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// The shape of the KV cache this stage keeps per position.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.layers.clone(),
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// A KV pool of `budget_bytes` for this stage, sequences at most `ctx` positions long
    /// (`None`: the model's `max_position_embeddings`; a larger value is lowered to it).
    ///
    /// # Errors
    /// [`Error::Request`] when the budget holds no position.
    pub fn kv_pool(&self, budget_bytes: usize, ctx: Option<usize>) -> Result<KvPool> {
        let max = self.config.max_position_embeddings;
        KvPool::new(self.kv_shape(), budget_bytes, ctx.unwrap_or(max).min(max))
    }

    /// Bytes of this stage's weight matrices.
    pub fn weight_bytes(&self) -> usize {
        self.matrix_formats().iter().map(|m| m.2).sum()
    }

    /// Whether token embeddings are read from the packed output head (a tied model whose head
    /// the kernels hold), so the embedding matrix is not kept twice.
    pub fn embeds_from_head(&self) -> bool {
        matches!(self.embed, Some(Embed::Head(_)))
    }

    /// How this stage's weight matrices are held: for each kind — a packed format of sinew's
    /// kernels (`"Q4K"`, `"Q6K"`, `"Q8_0"`, `"F32"`, `"BF16"`, `"F16"`) or `"candle"` (candle's
    /// matmul) — the number of matrices and their bytes, sorted by kind.
    pub fn matrix_formats(&self) -> Vec<(String, usize, usize)> {
        let mut kinds: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
        for m in self.mats() {
            let (kind, bytes) = match m {
                Mat::Packed(p) => (format!("{:?}", p.format()), p.size_in_bytes()),
                // counted as packed: the budget holds them once routed to
                Mat::Lazy(l) => (format!("{:?}", l.format()), l.size_in_bytes()),
                Mat::Candle(q) => ("candle".to_string(), qmatmul_bytes(q)),
            };
            let e = kinds.entry(kind).or_default();
            e.0 += 1;
            e.1 += bytes;
        }
        kinds.into_iter().map(|(k, (n, b))| (k, n, b)).collect()
    }

    /// Bytes of weights outside this process's own memory: experts not packed yet (memory this
    /// stage will take as requests route to them) and matrices read in place from the model
    /// file's page cache (which the system counts as available, but which must stay
    /// resident). A KV budget taken from the memory available now must leave them free.
    pub fn unpacked_bytes(&self) -> usize {
        self.mats()
            .into_iter()
            .map(|m| match m {
                Mat::Lazy(l) if !l.is_packed() => l.size_in_bytes(),
                Mat::Packed(p) if p.is_in_place() => p.size_in_bytes(),
                _ => 0,
            })
            .sum()
    }

    /// Every weight matrix of the stage.
    fn mats(&self) -> Vec<&Mat> {
        let mut all: Vec<&Mat> = Vec::new();
        for b in &self.blocks {
            let a = &b.attn;
            all.extend([&a.q.w, &a.k.w, &a.v.w, &a.o]);
            match &b.ffn {
                Ffn::Dense(m) => all.extend([&m.gate, &m.up, &m.down]),
                Ffn::Sparse(m) => {
                    all.push(&m.router);
                    all.extend(m.experts.iter().flat_map(|e| [&e.gate, &e.up, &e.down]));
                }
            }
        }
        all.extend(self.head.as_ref());
        all
    }

    /// Runs one sequence's new positions through this stage, appending them to `cache`.
    ///
    /// # Errors
    /// As [`Model::step`].
    pub fn forward(&self, cache: &mut KvCache, input: Input<'_>, logits: Logits) -> Result<Output> {
        let rows = match &input {
            Input::Tokens(ids) => ids.len(),
            Input::Hidden(h) => h.dim(0)?,
        };
        self.step(
            &mut [Chunk {
                cache,
                rows,
                logits,
            }],
            input,
        )
    }

    /// Convenience for a whole model: the logits of `ids` appended to `cache`.
    ///
    /// # Errors
    /// As [`Model::step`], and when this stage does not hold the output head.
    pub fn logits(&self, cache: &mut KvCache, ids: &[u32], which: Logits) -> Result<Tensor> {
        match self.forward(cache, Input::Tokens(ids), which)? {
            Output::Logits(l) => Ok(l),
            Output::Hidden(_) => Err(Error::Request(
                "this stage does not hold the output head".into(),
            )),
        }
    }

    /// One batched step: every chunk's new positions, in chunk order, are the rows of `input`
    /// (token ids at the first stage, hidden states `[rows, hidden]` after it). Each row runs at
    /// its sequence's next position and is appended to that sequence's cache.
    ///
    /// The last stage returns the logits of the rows the chunks ask for, chunk by chunk
    /// ([`Logits::Skip`]: none, `Last`: its last row, `All`: every row); other stages return every
    /// row's hidden state. On an error no cache changes.
    ///
    /// # Errors
    /// [`Error::Request`] for an input that does not match the chunks or the stage (tokens past
    /// the vocabulary, hidden states of the wrong width, a cache of another stage, an empty
    /// chunk); [`Error::ContextLength`] or [`Error::NoRoom`] when a cache cannot take its rows.
    pub fn step(&self, chunks: &mut [Chunk<'_>], input: Input<'_>) -> Result<Output> {
        let total: usize = chunks.iter().map(|c| c.rows).sum();
        let shape = self.kv_shape();
        for c in chunks.iter() {
            if c.rows == 0 {
                return Err(Error::Request(
                    "a sequence in the step has no positions".into(),
                ));
            }
            if *c.cache.shape() != shape {
                return Err(Error::Request(format!(
                    "a KV cache for layers {:?} given to the stage holding layers {:?}",
                    c.cache.shape().layers,
                    shape.layers
                )));
            }
        }
        if total == 0 {
            return Err(Error::Request("no positions to run".into()));
        }
        let x = self.embed_input(input, total)?;
        for c in chunks.iter_mut() {
            c.cache.ensure(c.rows)?;
        }
        let result = self.run_blocks(chunks, x);
        match result {
            Ok(x) => {
                for c in chunks.iter_mut() {
                    c.cache.commit(c.rows);
                }
                self.finish(chunks, x)
            }
            Err(e) => {
                for c in chunks.iter_mut() {
                    let len = c.cache.len();
                    c.cache.rollback(len);
                }
                Err(e)
            }
        }
    }

    /// The step's input as f32 rows `[total, hidden]`.
    fn embed_input(&self, input: Input<'_>, total: usize) -> Result<Tensor> {
        let x = match input {
            Input::Tokens(ids) => {
                let embed = self.embed.as_ref().ok_or_else(|| {
                    Error::Request(format!(
                        "this stage holds layers {}..{}: it takes hidden states, not tokens",
                        self.layers.start, self.layers.end
                    ))
                })?;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                    return Err(Error::Request(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.config.vocab_size
                    )));
                }
                if ids.len() != total {
                    return Err(Error::Request(format!(
                        "{} token ids for a step of {total} positions",
                        ids.len()
                    )));
                }
                embed.lookup(ids, &self.device)?
            }
            Input::Hidden(h) => {
                if self.embed.is_some() && self.layers.start == 0 {
                    return Err(Error::Request(
                        "the first stage takes tokens, not hidden states".into(),
                    ));
                }
                let (rows, width) = h.dims2()?;
                if width != self.config.hidden_size {
                    return Err(Error::Request(format!(
                        "hidden states of width {width}, the model's is {}",
                        self.config.hidden_size
                    )));
                }
                if rows != total {
                    return Err(Error::Request(format!(
                        "{rows} hidden-state rows for a step of {total} positions"
                    )));
                }
                h.to_dtype(DType::F32)?
            }
        };
        Ok(x)
    }

    /// Every layer of the stage over the step's rows; appends each layer's keys and values to the
    /// caches (the caller commits or rolls back).
    fn run_blocks(&self, chunks: &mut [Chunk<'_>], mut x: Tensor) -> Result<Tensor> {
        let positions: Vec<usize> = chunks
            .iter()
            .flat_map(|c| c.cache.len()..c.cache.len() + c.rows)
            .collect();
        let c = &self.config;
        let rope = Rope::new(&positions, c.head_dim, c.rope_theta, c.rope_style);
        let eps = c.rms_norm_eps as f32;
        for (l, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.attn_norm, eps)?;
            let a = b.attn.forward(&h, &rope, l, chunks)?;
            x = (x + a)?;
            let h = rms_norm(&x, &b.mlp_norm, eps)?;
            let f = match &b.ffn {
                Ffn::Dense(m) => m.forward(&h)?,
                Ffn::Sparse(m) => m.forward(&h)?,
            };
            x = (x + f)?;
        }
        Ok(x)
    }

    /// The last stage's logits for the rows the chunks ask for; other stages' hidden states.
    fn finish(&self, chunks: &[Chunk<'_>], x: Tensor) -> Result<Output> {
        let (Some(norm), Some(head)) = (&self.norm, &self.head) else {
            return Ok(Output::Hidden(x));
        };
        let mut rows: Vec<u32> = Vec::new();
        let mut at = 0u32;
        for c in chunks {
            let n = c.rows as u32;
            match c.logits {
                Logits::Skip => {}
                Logits::Last => rows.push(at + n - 1),
                Logits::All => rows.extend(at..at + n),
            }
            at += n;
        }
        let vocab = self.config.vocab_size;
        if rows.is_empty() {
            return Ok(Output::Logits(Tensor::zeros(
                (0, vocab),
                DType::F32,
                &self.device,
            )?));
        }
        let x = if rows.len() == at as usize {
            x
        } else {
            x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
        };
        let x = rms_norm(&x, norm, self.config.rms_norm_eps as f32)?;
        Ok(Output::Logits(head.forward(&x)?))
    }
}

/// Bytes of a matrix on candle's path.
fn qmatmul_bytes(q: &QMatMul) -> usize {
    match q {
        QMatMul::QTensor(t) => t.storage_size_in_bytes(),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() * t.dtype().size_in_bytes(),
    }
}

impl Attention {
    /// Attention of the step's rows `x`, layer `layer` of the stage: their keys and values are
    /// appended to each chunk's cache, then each sequence attends over its own.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        layer: usize,
        chunks: &mut [Chunk<'_>],
    ) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let (hs, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let flat = |t: Tensor, n: usize, norm: &Option<Tensor>| -> Result<Vec<f32>> {
            let t = match norm {
                Some(w) => rms_norm(&t.reshape((rows, n, d))?, w, self.eps)?,
                None => t,
            };
            Ok(t.flatten_all()?.to_vec1()?)
        };
        let mut qkv = Mat::forward_shared(&[&self.q.w, &self.k.w, &self.v.w], x)?;
        let v = flat(self.v.bias(qkv.pop().expect("three outputs"))?, kvh, &None)?;
        let mut k = flat(
            self.k.bias(qkv.pop().expect("three outputs"))?,
            kvh,
            &self.k_norm,
        )?;
        let mut q = flat(
            self.q.bias(qkv.pop().expect("three outputs"))?,
            hs,
            &self.q_norm,
        )?;
        rope.apply(&mut q, hs);
        rope.apply(&mut k, kvh);
        let row = kvh * d;
        let mut at = 0;
        for c in chunks.iter_mut() {
            let kv = &mut c.cache.layers[layer];
            kv.k.extend_from_slice(&k[at * row..(at + c.rows) * row]);
            kv.v.extend_from_slice(&v[at * row..(at + c.rows) * row]);
            at += c.rows;
        }
        let mut at = 0;
        let seqs: Vec<SeqAttention<'_>> = chunks
            .iter()
            .map(|c| {
                let kv = &c.cache.layers[layer];
                let s = SeqAttention {
                    row: at,
                    rows: c.rows,
                    start: c.cache.len(),
                    k: &kv.k,
                    v: &kv.v,
                };
                at += c.rows;
                s
            })
            .collect();
        let heads = Heads {
            heads: hs,
            kv_heads: kvh,
            head_dim: d,
        };
        let y = attend(&q, &seqs, heads);
        self.o
            .forward(&Tensor::from_vec(y, (rows, hs * d), x.device())?)
    }
}

impl Moe {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (seq, hidden) = x.dims2()?;
        let logits = self.router.forward(x)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        let n = self.experts.len();
        // Per expert: the tokens routed to it and their weights.
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n];
        for (t, row) in probs.iter().enumerate() {
            let chosen = top_k(row, self.top_k);
            let sum: f32 = chosen.iter().map(|&e| row[e]).sum();
            for e in chosen {
                let w = if self.norm_topk_prob {
                    row[e] / sum
                } else {
                    row[e]
                };
                routed[e].0.push(t as u32);
                routed[e].1.push(w);
            }
        }
        // experts no token chose are not computed
        let active: Vec<usize> = (0..n).filter(|&e| !routed[e].0.is_empty()).collect();
        // experts routed to for the first time are packed now, over the worker threads
        Mat::pack_pending(active.iter().flat_map(|&e| {
            [
                &self.experts[e].gate,
                &self.experts[e].up,
                &self.experts[e].down,
            ]
        }));
        if active.iter().all(|&e| self.experts[e].packed().is_some()) {
            return self.forward_packed(x, &active, &routed);
        }
        let mut out = Tensor::zeros((seq, hidden), DType::F32, x.device())?;
        for e in active {
            let (tokens, weights) = &routed[e];
            let count = tokens.len();
            let idx = Tensor::from_slice(tokens, count, x.device())?;
            let xs = if count == seq && seq == 1 {
                x.clone()
            } else {
                x.index_select(&idx, 0)?
            };
            let y = self.experts[e].forward(&xs)?;
            let w = Tensor::from_slice(weights, (count, 1), x.device())?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out)
    }

    /// The routed experts on sinew's kernels: every expert's gate and up projections in one
    /// parallel region, then every down projection in another, with each input row quantized
    /// once per weight format.
    fn forward_packed(
        &self,
        x: &Tensor,
        active: &[usize],
        routed: &[(Vec<u32>, Vec<f32>)],
    ) -> Result<Tensor> {
        let (seq, hidden) = x.dims2()?;
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut acts = Acts::new(&xs, hidden);
        let mats: Vec<[&PackedMatrix; 3]> = active
            .iter()
            .map(|&e| self.experts[e].packed().expect("checked by the caller"))
            .collect();
        for [g, u, _] in &mats {
            acts.prepare(g.format());
            acts.prepare(u.format());
        }
        // an expert's input rows: all of them when it took every token, else its tokens'
        let rows_for = |f, tokens: &[u32]| -> Option<Vec<QuantRow>> {
            (tokens.len() != seq).then(|| {
                tokens
                    .iter()
                    .map(|&t| acts.get(f)[t as usize].clone())
                    .collect()
            })
        };
        let selected: Vec<[Option<Vec<QuantRow>>; 2]> = active
            .iter()
            .zip(&mats)
            .map(|(&e, [g, u, _])| {
                [
                    rows_for(g.format(), &routed[e].0),
                    rows_for(u.format(), &routed[e].0),
                ]
            })
            .collect();
        let mut gate_up: Vec<[Vec<f32>; 2]> = active
            .iter()
            .zip(&mats)
            .map(|(&e, [g, u, _])| {
                let count = routed[e].0.len();
                [vec![0f32; count * g.rows()], vec![0f32; count * u.rows()]]
            })
            .collect();
        // one job per (expert, projection): gate is projection 0, up is 1
        let acts = &acts;
        let mut jobs: Vec<Job<'_>> = mats
            .iter()
            .zip(&selected)
            .zip(gate_up.iter_mut())
            .flat_map(|((m, sel), outs)| {
                outs.iter_mut().enumerate().map(move |(p, out)| Job {
                    mat: m[p],
                    acts: sel[p].as_deref().unwrap_or_else(|| acts.get(m[p].format())),
                    out,
                })
            })
            .collect();
        kernels::run(&mut jobs);
        drop(jobs);
        // silu(gate) · up, quantized for each down projection
        let hidden_rows: Vec<Vec<QuantRow>> = mats
            .iter()
            .zip(&gate_up)
            .map(|([g, _, d], [go, uo])| {
                go.chunks_exact(g.rows())
                    .zip(uo.chunks_exact(g.rows()))
                    .map(|(gr, ur)| {
                        let h: Vec<f32> = gr
                            .iter()
                            .zip(ur)
                            .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                            .collect();
                        QuantRow::new(d.format(), &h)
                    })
                    .collect()
            })
            .collect();
        let mut downs: Vec<Vec<f32>> = active
            .iter()
            .zip(&mats)
            .map(|(&e, [_, _, d])| vec![0f32; routed[e].0.len() * d.rows()])
            .collect();
        let mut jobs: Vec<Job<'_>> = mats
            .iter()
            .zip(&hidden_rows)
            .zip(downs.iter_mut())
            .map(|(([_, _, d], rows), out)| Job {
                mat: d,
                acts: rows,
                out,
            })
            .collect();
        kernels::run(&mut jobs);
        drop(jobs);
        let mut out = vec![0f32; seq * hidden];
        for (&e, y) in active.iter().zip(&downs) {
            let (tokens, weights) = &routed[e];
            for ((&t, &w), yr) in tokens.iter().zip(weights).zip(y.chunks_exact(hidden)) {
                let o = &mut out[t as usize * hidden..(t as usize + 1) * hidden];
                o.iter_mut().zip(yr).for_each(|(o, &y)| *o += w * y);
            }
        }
        Ok(Tensor::from_vec(out, (seq, hidden), x.device())?)
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub(crate) fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// The output of [`Model::forward`] at the last stage as a Vec of rows, for callers on the host.
pub fn logits_rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}
