//! Writing GGUF files: a synthetic model of any shape with random weights (for tests and
//! benchmarks), or the conversion of a Hugging Face model directory, in f32, f16, Q8_0 or Q4_K,
//! with llama.cpp's tensor names and metadata and the tokenizer and chat template embedded.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{Architecture, ModelConfig, MoeConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::weights::{Proj, Store, W, gguf_name, gguf_stacked_name};

/// The built-in tokenizer (a byte-level BPE of 384 tokens with `<|im_start|>`/`<|im_end|>`) and
/// chat template used by synthetic models.
pub const BUILTIN_TOKENIZER: &str = include_str!("../fixtures/qwen3_moe_gqa/tokenizer.json");
/// The built-in chat template (ChatML).
pub const BUILTIN_CHAT_TEMPLATE: &str =
    include_str!("../fixtures/qwen3_moe_gqa/chat_template.jinja");
/// The built-in tokenizer's end-of-sequence id (`<|im_end|>`).
pub const BUILTIN_EOS: u32 = 2;

/// The weight formats the writer produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// 8-bit blocks of 32 with one scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit k-quant super-blocks of 256 (4.5 bits per weight).
    Q4K,
    /// 6-bit k-quant super-blocks of 256 (6.5625 bits per weight).
    Q6K,
    /// llama.cpp's Q4_K_M mix: Q4_K, except Q6_K for the output head and for `attn_v` and
    /// `ffn_down` (experts' too) in the layers llama.cpp gives more bits (the first and last
    /// eighth, and every third between).
    Q4KM,
}

impl Quant {
    /// llama.cpp's `general.file_type` (`llama_ftype`) for a file of this format: what its own
    /// quantizer records (plain Q4_K is its `Q4_K_S`).
    pub fn file_type(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q8_0 => 7,
            Quant::Q4K => 14,
            Quant::Q4KM => 15,
            Quant::Q6K => 18,
        }
    }

    /// Parses `f32`, `f16`, `q8_0`, `q4_k`, `q6_k`, `q4_k_m` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => Quant::F32,
            "f16" => Quant::F16,
            "q8_0" | "q8" => Quant::Q8_0,
            "q4_k" | "q4k" | "q4_k_s" => Quant::Q4K,
            "q6_k" | "q6k" => Quant::Q6K,
            "q4_k_m" => Quant::Q4KM,
            _ => return None,
        })
    }

    /// The format of matrix `w` of a model with `layers` layers.
    fn ggml(self, w: W, layers: usize) -> GgmlDType {
        match self {
            Quant::F32 => GgmlDType::F32,
            Quant::F16 => GgmlDType::F16,
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4K => GgmlDType::Q4K,
            Quant::Q6K => GgmlDType::Q6K,
            Quant::Q4KM => {
                // llama.cpp's use_more_bits
                let more =
                    |l: usize| l < layers / 8 || l >= 7 * layers / 8 || (l - layers / 8) % 3 == 2;
                match w {
                    W::Head => GgmlDType::Q6K,
                    W::V(l) | W::Down(l) | W::Expert(l, _, Proj::Down) if more(l) => GgmlDType::Q6K,
                    _ => GgmlDType::Q4K,
                }
            }
        }
    }
}

/// How experts are laid out in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertLayout {
    /// One `blk.N.ffn_{gate,up,down}_exps` tensor per projection (current llama.cpp).
    Stacked,
    /// One `blk.N.ffn_{gate,up,down}.E` tensor per expert (older Mixtral files).
    PerExpert,
}

/// Options of the writer.
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    /// Format of the matrices (norms and routers always stay f32).
    pub quant: Quant,
    /// Expert layout.
    pub experts: ExpertLayout,
}

/// A tensor to write: quantize matrices whose inner width allows it, keep the rest f32.
fn encode(t: &Tensor, quant: Quant, w: W, layers: usize, matrix: bool) -> Result<QTensor> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let inner = *t.dims().last().unwrap_or(&1);
    let dtype = quant.ggml(w, layers);
    if !matrix || inner % dtype.block_size() != 0 {
        if matrix && quant != Quant::F32 && quant != Quant::F16 {
            return Err(Error::Request(format!(
                "a matrix of width {inner} cannot be stored as {quant:?} (blocks of {})",
                dtype.block_size()
            )));
        }
        return Ok(QTensor::quantize(
            &t,
            if matrix { dtype } else { GgmlDType::F32 },
        )?);
    }
    Ok(QTensor::quantize(&t, dtype)?)
}

/// llama.cpp's row permutation of q/k for Llama-family GGUFs, whose RoPE pairs adjacent
/// dimensions: rows (h, 2, d/2) become (h, d/2, 2).
fn permute_for_interleaved_rope(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

/// The special tokens a file records.
struct Specials {
    eos: Option<u32>,
    /// The model's BOS id; `None`: `<|endoftext|>` where the vocabulary has it, as llama.cpp's
    /// converter does for Qwen tokenizers (which have no BOS), so llama.cpp does not fall back to
    /// an arbitrary id.
    bos: Option<u32>,
    /// Whether the tokenizer puts BOS before a prompt, when known.
    add_bos: Option<bool>,
}

/// GGUF metadata for `c` stored as `quant`, with the tokenizer (a tokenizer.json text) and chat
/// template embedded: the keys llama.cpp's converter writes for these architectures.
fn metadata(
    c: &ModelConfig,
    tokenizer_json: &str,
    template: Option<&str>,
    specials: Specials,
    name: &str,
    quant: Quant,
) -> Result<Vec<(String, Value)>> {
    let arch = c.architecture.gguf_name();
    let k = |x: &str| format!("{arch}.{x}");
    let u = |x: usize| Value::U32(x as u32);
    let mut m = vec![
        ("general.architecture".to_string(), s(arch)),
        ("general.name".to_string(), s(name)),
        ("general.alignment".to_string(), Value::U32(32)),
        (
            "general.file_type".to_string(),
            Value::U32(quant.file_type()),
        ),
        (k("block_count"), u(c.num_layers)),
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("feed_forward_length"), u(c.intermediate_size)),
        (k("attention.head_count"), u(c.num_heads)),
        (k("attention.head_count_kv"), u(c.num_kv_heads)),
        (k("attention.key_length"), u(c.head_dim)),
        (k("attention.value_length"), u(c.head_dim)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("vocab_size"), u(c.vocab_size)),
    ];
    if !matches!(quant, Quant::F32 | Quant::F16) {
        // the block layouts' version (ggml's GGML_QNT_VERSION)
        m.push(("general.quantization_version".into(), Value::U32(2)));
    }
    if let Some(moe) = &c.moe {
        m.push((k("expert_count"), u(moe.num_experts)));
        m.push((k("expert_used_count"), u(moe.top_k)));
        m.push((
            k("expert_feed_forward_length"),
            u(moe.expert_intermediate_size),
        ));
        m.push((k("expert_weights_norm"), Value::Bool(moe.norm_topk_prob)));
    }
    // llama.cpp's own tokenizer keys, from the Hugging Face tokenizer.json.
    let tj: serde_json::Value = serde_json::from_str(tokenizer_json)
        .map_err(|e| Error::Tokenizer(format!("tokenizer.json: {e}")))?;
    let model = &tj["model"];
    if model["type"] == "BPE" {
        let mut vocab: Vec<(String, u64)> = model["vocab"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(t, i)| Some((t.clone(), i.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut special = std::collections::HashSet::new();
        for a in tj["added_tokens"].as_array().into_iter().flatten() {
            if let (Some(t), Some(i)) = (a["content"].as_str(), a["id"].as_u64()) {
                vocab.push((t.to_string(), i));
                if a["special"].as_bool() == Some(true) {
                    special.insert(i);
                }
            }
        }
        vocab.sort_by_key(|(_, i)| *i);
        vocab.dedup_by_key(|(_, i)| *i);
        let contiguous = vocab.iter().enumerate().all(|(n, (_, i))| n as u64 == *i);
        if contiguous {
            let merges: Vec<Value> = model["merges"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| match m {
                    serde_json::Value::String(x) => Some(s(x)),
                    serde_json::Value::Array(p) => Some(s(&format!(
                        "{} {}",
                        p.first()?.as_str()?,
                        p.get(1)?.as_str()?
                    ))),
                    _ => None,
                })
                .collect();
            // an embedding with more rows than the tokenizer has tokens (padded for alignment,
            // or a synthetic model's vocabulary): llama.cpp wants a token per row, so the rest
            // are placeholders of type unused (5), as its own converter writes them
            let tokens = vocab.len();
            vocab.extend((tokens..c.vocab_size).map(|i| (format!("[PAD{i}]"), i as u64)));
            let types: Vec<Value> = vocab
                .iter()
                .map(|(_, i)| {
                    Value::I32(match i {
                        i if *i as usize >= tokens => 5,
                        i if special.contains(i) => 3,
                        _ => 1,
                    })
                })
                .collect();
            m.push(("tokenizer.ggml.model".into(), s("gpt2")));
            m.push(("tokenizer.ggml.pre".into(), s("qwen2")));
            m.push((
                "tokenizer.ggml.tokens".into(),
                Value::Array(vocab.iter().map(|(t, _)| s(t)).collect()),
            ));
            m.push(("tokenizer.ggml.token_type".into(), Value::Array(types)));
            m.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
        }
    }
    m.push(("tokenizer.huggingface.json".into(), s(tokenizer_json)));
    if let Some(eos) = specials.eos {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    let endoftext = tj["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["content"] == "<|endoftext|>")
        .and_then(|a| a["id"].as_u64())
        .map(|i| i as u32);
    if let Some(bos) = specials.bos.or(endoftext) {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(add) = specials.add_bos {
        m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add)));
    }
    if let Some(t) = template {
        m.push(("tokenizer.chat_template".into(), s(t)));
    }
    Ok(m)
}

fn write_file(path: &Path, meta: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::new(file);
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &meta, &tensors).map_err(|e| Error::weights(path, e.to_string()))?;
    std::io::Write::flush(&mut w).map_err(|e| Error::io(path, e))?;
    // candle writes version 2. Version 3 changed nothing in a little-endian file's layout (it
    // added big-endian files), so the same bytes are a version 3 file, as llama.cpp writes.
    let mut file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(4))
        .and_then(|_| file.write_all(&3u32.to_le_bytes()))
        .map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// A source of one weight per role, as f32 [out, in] (or [n] for vectors).
trait Weights {
    fn get(&mut self, w: W, shape: &[usize]) -> Result<Tensor>;
}

/// One weight of a model: its role, shape, and whether it is a matrix (quantizable) or a vector.
struct Role {
    w: W,
    shape: Vec<usize>,
    matrix: bool,
}

/// Every weight of a model with configuration `c`, in file order (an MoE layer's experts by
/// projection, then by expert). Both writers walk this list, so a synthetic model drawn for
/// GGUF and for safetensors gets the same random weights.
fn roles(c: &ModelConfig) -> Vec<Role> {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let mut v = Vec::new();
    let mut add = |w: W, shape: &[usize], matrix: bool| {
        v.push(Role {
            w,
            shape: shape.to_vec(),
            matrix,
        })
    };
    add(W::Embed, &[c.vocab_size, h], true);
    for l in 0..c.num_layers {
        add(W::AttnNorm(l), &[h], false);
        add(W::Q(l), &[c.num_heads * hd, h], true);
        add(W::K(l), &[c.num_kv_heads * hd, h], true);
        add(W::V(l), &[c.num_kv_heads * hd, h], true);
        add(W::O(l), &[h, c.num_heads * hd], true);
        if c.architecture.has_qk_norm() {
            add(W::QNorm(l), &[hd], false);
            add(W::KNorm(l), &[hd], false);
        }
        add(W::MlpNorm(l), &[h], false);
        match &c.moe {
            Some(moe) if c.is_sparse_layer(l) => {
                let (n, i) = (moe.num_experts, moe.expert_intermediate_size);
                add(W::Router(l), &[n, h], false);
                for (p, o, inp) in [(Proj::Gate, i, h), (Proj::Up, i, h), (Proj::Down, h, i)] {
                    for e in 0..n {
                        add(W::Expert(l, e, p), &[o, inp], true);
                    }
                }
            }
            _ => {
                let i = c.intermediate_size;
                add(W::Gate(l), &[i, h], true);
                add(W::Up(l), &[i, h], true);
                add(W::Down(l), &[h, i], true);
            }
        }
    }
    add(W::FinalNorm, &[h], false);
    if !c.tie_word_embeddings {
        add(W::Head, &[c.vocab_size, h], true);
    }
    v
}

/// Collects the tensors of a model with configuration `c` from `src` under GGUF names.
fn collect(
    c: &ModelConfig,
    src: &mut dyn Weights,
    opts: WriteOptions,
    permute: bool,
) -> Result<Vec<(String, QTensor)>> {
    let experts = c.moe.as_ref().map_or(0, |m| m.num_experts);
    let mut out = Vec::new();
    let mut stack = Vec::with_capacity(experts);
    for r in roles(c) {
        let mut t = src.get(r.w, &r.shape)?;
        match r.w {
            W::Q(_) if permute => t = permute_for_interleaved_rope(&t, c.num_heads)?,
            W::K(_) if permute => t = permute_for_interleaved_rope(&t, c.num_kv_heads)?,
            W::Expert(l, e, p) if opts.experts == ExpertLayout::Stacked => {
                stack.push(t);
                if e + 1 == experts {
                    let all = Tensor::stack(&stack, 0)?;
                    out.push((
                        gguf_stacked_name(l, p),
                        encode(&all, opts.quant, r.w, c.num_layers, true)?,
                    ));
                    stack.clear();
                }
                continue;
            }
            _ => {}
        }
        out.push((
            gguf_name(r.w),
            encode(&t, opts.quant, r.w, c.num_layers, r.matrix)?,
        ));
    }
    Ok(out)
}

struct FromStore<'a>(&'a Store);

impl Weights for FromStore<'_> {
    fn get(&mut self, w: W, shape: &[usize]) -> Result<Tensor> {
        self.0.tensor(w, shape)
    }
}

/// Converts the Hugging Face model directory `dir` to a GGUF file at `out`.
pub fn convert_hf(dir: &Path, out: &Path, opts: WriteOptions) -> Result<()> {
    let c = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    if c.attention_bias {
        return Err(Error::Request(
            "converting models with attention biases is not supported".into(),
        ));
    }
    let store = Store::safetensors(dir, c.architecture, &Device::Cpu)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = std::fs::read_to_string(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
    let text = crate::text::Text::from_hf_dir(dir, &c.eos_token_ids)?;
    let permute = matches!(c.architecture, Architecture::Llama | Architecture::Mixtral);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let specials = Specials {
        eos: text.eos_ids().first().copied(),
        bos: text.bos_id(),
        add_bos: None,
    };
    let mut meta = metadata(&c, &tokenizer, text.template(), specials, &name, opts.quant)?;
    // Qwen3-MoE's sparse-layer pattern (decoder_sparse_step, mlp_only_layers) survives as the
    // presence of a router in exactly the sparse layers.
    meta.push((
        "general.source.url".into(),
        s("converted by sinew from a Hugging Face directory"),
    ));
    let tensors = collect(&c, &mut FromStore(&store), opts, permute)?;
    write_file(out, &meta, &tensors)
}

/// The shape of a synthetic model.
#[derive(Clone, Debug)]
pub struct SynthShape {
    /// Architecture (decides names, q/k norms and the RoPE layout).
    pub architecture: Architecture,
    /// Vocabulary size; at least the built-in tokenizer's 384.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Dense MLP width (dense layers and dense models).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Experts per layer (0: dense).
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Expert MLP width.
    pub expert_intermediate_size: usize,
    /// Seed of the random weights.
    pub seed: u64,
}

impl SynthShape {
    /// The configuration a model of this shape has.
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            architecture: self.architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            rope_style: RopeStyle::Half,
            max_position_embeddings: 32768,
            tie_word_embeddings: false,
            attention_bias: false,
            moe: (self.num_experts > 0).then(|| MoeConfig {
                num_experts: self.num_experts,
                top_k: self.top_k,
                expert_intermediate_size: self.expert_intermediate_size,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: Vec::new(),
            }),
            eos_token_ids: vec![BUILTIN_EOS],
        }
    }
}

/// Random weights: uniform with the standard deviation a trained model's layer would have, norms
/// near one, and an output head scaled so logits spread over several units (not flat).
struct Random {
    rng: StdRng,
    hidden: usize,
    layers: usize,
    embedding: Option<Tensor>,
}

impl Weights for Random {
    fn get(&mut self, w: W, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let std = match w {
            W::AttnNorm(_) | W::MlpNorm(_) | W::FinalNorm | W::QNorm(_) | W::KNorm(_) => {
                let v: Vec<f32> = (0..n).map(|_| self.rng.random_range(0.8f32..1.2)).collect();
                return Ok(Tensor::from_vec(v, shape, &Device::Cpu)?);
            }
            W::Embed => {
                let v: Vec<f32> = (0..n)
                    .map(|_| self.rng.random_range(-1.7320508f32..1.7320508))
                    .collect();
                let t = Tensor::from_vec(v, shape, &Device::Cpu)?;
                self.embedding = Some(t.clone());
                return Ok(t);
            }
            W::Head => {
                // Rows of log-normal norms: as in trained models, a few tokens dominate the
                // logits, so the top-1 token usually stands clear of the rest.
                let (rows, cols) = (shape[0], shape[1]);
                let base = 4.0 / (self.hidden as f32).sqrt() * 3f32.sqrt();
                let mut v = Vec::with_capacity(n);
                for _ in 0..rows {
                    let z: f32 = (0..12).map(|_| self.rng.random::<f32>()).sum::<f32>() - 6.0;
                    let a = base * (HEAD_SPREAD * z).exp();
                    v.extend((0..cols).map(|_| self.rng.random_range(-a..a)));
                }
                let head = Tensor::from_vec(v, shape, &Device::Cpu)?;
                // Plus a copy of the embedding: the stream still carries the current token, so its
                // logit stands out by about COPY_LOGIT, giving the confident top-1 of a trained
                // model rather than the near-ties of a flat random one.
                return Ok(match &self.embedding {
                    Some(e) => (head + (e * (COPY_LOGIT / self.hidden as f64))?)?,
                    None => head,
                });
            }
            W::Router(_) => 2.0 / (self.hidden as f32).sqrt(),
            // Projections back into the residual stream are scaled by 1/sqrt(2 * layers), as in
            // GPT-2's initialization, so the stream does not grow with depth.
            W::O(_) | W::Down(_) | W::Expert(_, _, Proj::Down) => {
                1.0 / (shape[shape.len() - 1] as f32).sqrt() / ((2 * self.layers) as f32).sqrt()
            }
            _ => 1.0 / (shape[shape.len() - 1] as f32).sqrt(),
        };
        let a = std * 3f32.sqrt();
        let v: Vec<f32> = (0..n).map(|_| self.rng.random_range(-a..a)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

/// How far the synthetic head lifts the current token's logit (about twice the logits' spread).
const COPY_LOGIT: f64 = 16.0;

/// Log-normal spread of the synthetic output head's row norms.
const HEAD_SPREAD: f32 = 0.0;

/// Writes a synthetic model of `shape` with the built-in tokenizer and chat template to `out`.
pub fn write_synthetic(shape: &SynthShape, out: &Path, opts: WriteOptions) -> Result<()> {
    let c = shape.config();
    c.validate(out)?;
    if c.vocab_size < 384 {
        return Err(Error::Request(
            "a synthetic model needs a vocabulary of at least 384 (the built-in tokenizer's)"
                .into(),
        ));
    }
    let specials = Specials {
        eos: Some(BUILTIN_EOS),
        bos: None,
        add_bos: Some(false),
    };
    let meta = metadata(
        &c,
        BUILTIN_TOKENIZER,
        Some(BUILTIN_CHAT_TEMPLATE),
        specials,
        "sinew-synthetic",
        opts.quant,
    )?;
    let mut rng = Random {
        rng: StdRng::seed_from_u64(shape.seed),
        hidden: c.hidden_size,
        layers: c.num_layers,
        embedding: None,
    };
    let tensors = collect(&c, &mut rng, opts, false)?;
    write_file(out, &meta, &tensors)
}

/// What a GGUF file's header says, read without loading any weight.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The model's configuration.
    pub config: ModelConfig,
    /// Bytes of weights one token's decode step reads: everything except the embedding table
    /// (one row) and the experts not selected (top_k of num_experts per layer).
    pub active_weight_bytes: u64,
}

/// Reads `path`'s header (checking, as loading does, that every tensor lies inside the file)
/// and summarizes it.
pub fn summary(path: &Path) -> Result<Summary> {
    let store = Store::gguf(path, &Device::Cpu, false)?;
    let content = store
        .gguf_content()
        .ok_or_else(|| Error::weights(path, "not a GGUF store"))?;
    let c = ModelConfig::from_gguf(content, path)?;
    let bytes = |info: &gguf_file::TensorInfo| {
        (info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size())
            as u64
    };
    let mut experts = 0u64;
    let mut total = 0u64;
    for (name, info) in &content.tensor_infos {
        if name == "token_embd.weight" {
            total += bytes(info) / c.vocab_size as u64;
        } else if name.contains("_exps.")
            || name
                .split('.')
                .nth(3)
                .is_some_and(|e| e.parse::<usize>().is_ok())
        {
            experts += bytes(info);
        } else {
            total += bytes(info);
        }
    }
    if let Some(moe) = &c.moe {
        total += experts * moe.top_k as u64 / moe.num_experts as u64;
    }
    Ok(Summary {
        config: c,
        active_weight_bytes: total,
    })
}

/// Writes a synthetic model of `shape` as a Hugging Face directory (config.json, one
/// model.safetensors in `dtype` — f32, bf16 or f16 —, the built-in tokenizer and chat template),
/// with the same random weights [`write_synthetic`] would quantize. For comparisons with engines
/// that read only safetensors.
pub fn write_synthetic_hf(shape: &SynthShape, dir: &Path, dtype: DType) -> Result<()> {
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => {
            return Err(Error::Request(format!(
                "a Hugging Face directory in {other:?}: f32, bf16 or f16 only"
            )));
        }
    };
    let c = shape.config();
    c.validate(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let arch = c.architecture;
    let (name, model_type) = match arch {
        Architecture::Qwen3Moe => ("Qwen3MoeForCausalLM", "qwen3_moe"),
        Architecture::Mixtral => ("MixtralForCausalLM", "mixtral"),
        Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
    };
    let moe = c.moe.clone();
    let config = serde_json::json!({
        "architectures": [name], "model_type": model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": if arch == Architecture::Mixtral {
            moe.as_ref().map_or(c.intermediate_size, |m| m.expert_intermediate_size) } else { c.intermediate_size },
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": false,
        "attention_bias": false, "hidden_act": "silu", "eos_token_id": BUILTIN_EOS,
        "sliding_window": null, "use_sliding_window": false, "max_window_layers": c.num_layers,
        "num_experts": moe.as_ref().map_or(0, |m| m.num_experts),
        "num_local_experts": moe.as_ref().map_or(0, |m| m.num_experts),
        "num_experts_per_tok": moe.as_ref().map_or(0, |m| m.top_k),
        "moe_intermediate_size": moe.as_ref().map_or(0, |m| m.expert_intermediate_size),
        "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "torch_dtype": torch_dtype,
    });
    let mut rng = Random {
        rng: StdRng::seed_from_u64(shape.seed),
        hidden: c.hidden_size,
        layers: c.num_layers,
        embedding: None,
    };
    let mut tensors = std::collections::HashMap::new();
    for r in roles(&c) {
        let t = rng.get(r.w, &r.shape)?.to_dtype(dtype)?;
        tensors.insert(crate::weights::hf_name(arch, r.w), t);
    }
    let st = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st)
        .map_err(|e| Error::weights(&st, e.to_string()))?;
    let write = |file: &str, text: &str| -> Result<()> {
        let p = dir.join(file);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write(
        "config.json",
        &serde_json::to_string_pretty(&config).unwrap_or_default(),
    )?;
    write("tokenizer.json", BUILTIN_TOKENIZER)?;
    write("chat_template.jinja", BUILTIN_CHAT_TEMPLATE)?;
    write(
        "tokenizer_config.json",
        r#"{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": null}"#,
    )?;
    Ok(())
}
