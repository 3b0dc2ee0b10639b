//! Model configuration, read from a Hugging Face `config.json` (the field names of transformers
//! 4.x and of v5) or from GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::Value;

use crate::error::{Error, Result};

/// The architectures this engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Qwen3-MoE: q/k RMSNorm, GQA, softmax top-k routing, optional dense layers.
    Qwen3Moe,
    /// Mixtral: Llama attention with a sparse mixture of experts in every layer.
    Mixtral,
    /// Dense Qwen3: Llama-like with q/k RMSNorm.
    Qwen3,
    /// Dense Llama.
    Llama,
}

/// The architecture names accepted, for error messages.
pub const SUPPORTED: &str = "Qwen3MoeForCausalLM/qwen3_moe/qwen3moe, MixtralForCausalLM/mixtral, \
                             Qwen3ForCausalLM/qwen3, LlamaForCausalLM/llama";

impl Architecture {
    /// Maps a Hugging Face `architectures[0]` or `model_type`, or a GGUF `general.architecture`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "Qwen3MoeForCausalLM" | "qwen3_moe" | "qwen3moe" => Architecture::Qwen3Moe,
            "MixtralForCausalLM" | "mixtral" => Architecture::Mixtral,
            "Qwen3ForCausalLM" | "qwen3" => Architecture::Qwen3,
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            _ => return None,
        })
    }

    /// Whether attention normalizes q and k per head with RMSNorm (Qwen3 family).
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Architecture::Qwen3Moe | Architecture::Qwen3)
    }

    /// The GGUF `general.architecture` string llama.cpp uses for it.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Qwen3Moe => "qwen3moe",
            Architecture::Qwen3 => "qwen3",
            Architecture::Mixtral | Architecture::Llama => "llama",
        }
    }
}

/// How rotary position embedding pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension i pairs with i + d/2 (`rotate_half`, as in transformers and Qwen GGUFs).
    Half,
    /// Dimension 2i pairs with 2i + 1 (llama.cpp's Llama GGUFs, whose q/k rows are permuted).
    Interleaved,
}

/// The mixture-of-experts part of a configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Experts per MoE layer.
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Hidden width of one expert.
    pub expert_intermediate_size: usize,
    /// Renormalize the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is sparse (Qwen3-MoE).
    pub decoder_sparse_step: usize,
    /// Layers that use a dense MLP although the step would make them sparse (Qwen3-MoE).
    pub mlp_only_layers: Vec<usize>,
}

/// A model's shape and hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding and of the output head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Hidden width of the dense MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE dimension pairing.
    pub rope_style: RopeStyle,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// The output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias.
    pub attention_bias: bool,
    /// The MoE part; `None` for dense models.
    pub moe: Option<MoeConfig>,
    /// End-of-sequence token ids from the model configuration.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Whether decoder layer `layer` uses the sparse expert block.
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        match &self.moe {
            None => false,
            Some(moe) => {
                moe.num_experts > 0
                    && !moe.mlp_only_layers.contains(&layer)
                    && (layer + 1).is_multiple_of(moe.decoder_sparse_step.max(1))
            }
        }
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        Self::from_hf_json(&value, path)
    }

    /// Interprets a parsed Hugging Face `config.json`; `path` is only used in errors.
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let f = Fields { v, path };
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| v.get("model_type").and_then(Value::as_str))
            .ok_or_else(|| Error::config(path, "neither `architectures` nor `model_type` is set"))?
            .to_string();
        let architecture =
            Architecture::from_name(&arch_name).ok_or_else(|| Error::UnknownArchitecture {
                path: path.to_path_buf(),
                name: arch_name.clone(),
                supported: SUPPORTED,
            })?;
        let hidden_size = f.usize(&["hidden_size"])?;
        let num_heads = f.usize(&["num_attention_heads"])?;
        let num_kv_heads = f.opt_usize(&["num_key_value_heads"])?.unwrap_or(num_heads);
        let head_dim = match f.opt_usize(&["head_dim"])? {
            Some(d) => d,
            None => {
                if num_heads == 0 || hidden_size % num_heads != 0 {
                    return Err(Error::config(
                        path,
                        "`head_dim` is unset and hidden_size is not a multiple of the head count",
                    ));
                }
                hidden_size / num_heads
            }
        };
        // transformers v5 moved the RoPE fields under `rope_parameters`.
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = match rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            Some(t) => t,
            None => f.opt_f64(&["rope_theta"])?.unwrap_or(10_000.0),
        };
        let scaling = rope
            .map(|r| r.get("rope_type").or_else(|| r.get("type")))
            .unwrap_or_else(|| {
                v.get("rope_scaling")
                    .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            })
            .and_then(Value::as_str);
        if let Some(kind) = scaling
            && kind != "default"
        {
            return Err(Error::config(
                path,
                format!("RoPE scaling {kind:?} is not supported (only the default RoPE)"),
            ));
        }
        let moe = match architecture {
            Architecture::Qwen3Moe | Architecture::Mixtral => {
                let num_experts = f.usize(&["num_experts", "num_local_experts"])?;
                let top_k = f.usize(&["num_experts_per_tok"])?;
                if top_k == 0 || top_k > num_experts {
                    return Err(Error::config(
                        path,
                        format!("num_experts_per_tok {top_k} must be in 1..={num_experts}"),
                    ));
                }
                let (expert_intermediate_size, norm_topk_prob, step, only) =
                    if architecture == Architecture::Mixtral {
                        (f.usize(&["intermediate_size"])?, true, 1, Vec::new())
                    } else {
                        let only = match v.get("mlp_only_layers") {
                            None | Some(Value::Null) => Vec::new(),
                            Some(Value::Array(a)) => a
                                .iter()
                                .map(|x| {
                                    x.as_u64().map(|x| x as usize).ok_or_else(|| {
                                        Error::config(path, "`mlp_only_layers` holds a non-integer")
                                    })
                                })
                                .collect::<Result<Vec<_>>>()?,
                            Some(_) => {
                                return Err(Error::config(path, "`mlp_only_layers` is not a list"));
                            }
                        };
                        (
                            f.usize(&["moe_intermediate_size"])?,
                            f.opt_bool("norm_topk_prob")?.unwrap_or(false),
                            f.opt_usize(&["decoder_sparse_step"])?.unwrap_or(1).max(1),
                            only,
                        )
                    };
                Some(MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate_size,
                    norm_topk_prob,
                    decoder_sparse_step: step,
                    mlp_only_layers: only,
                })
            }
            _ => None,
        };
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        };
        let config = ModelConfig {
            architecture,
            vocab_size: f.usize(&["vocab_size"])?,
            hidden_size,
            intermediate_size: f.opt_usize(&["intermediate_size"])?.unwrap_or(0),
            num_layers: f.usize(&["num_hidden_layers"])?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.opt_f64(&["rms_norm_eps"])?.unwrap_or(1e-6),
            rope_theta,
            rope_style: RopeStyle::Half,
            max_position_embeddings: f.opt_usize(&["max_position_embeddings"])?.unwrap_or(4096),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
            moe,
            eos_token_ids,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the relations between fields that the forward pass relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(path, m));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "{} query heads cannot be grouped over {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        let needs_dense = (0..self.num_layers).any(|l| !self.is_sparse_layer(l));
        if needs_dense && self.intermediate_size == 0 {
            return bad("a dense layer needs `intermediate_size`".into());
        }
        Ok(())
    }
}

/// A GGUF metadata number as u64 (any integer type).
fn gguf_u64(v: &gguf_file::Value) -> Option<u64> {
    use gguf_file::Value as V;
    match *v {
        V::U8(x) => Some(x as u64),
        V::U16(x) => Some(x as u64),
        V::U32(x) => Some(x as u64),
        V::U64(x) => Some(x),
        V::I8(x) => u64::try_from(x).ok(),
        V::I16(x) => u64::try_from(x).ok(),
        V::I32(x) => u64::try_from(x).ok(),
        V::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// A GGUF metadata number as f64 (any numeric type).
fn gguf_f64(v: &gguf_file::Value) -> Option<f64> {
    use gguf_file::Value as V;
    match *v {
        V::F32(x) => Some(x as f64),
        V::F64(x) => Some(x),
        _ => gguf_u64(v).map(|x| x as f64),
    }
}

impl ModelConfig {
    /// Reads the configuration from GGUF metadata (llama.cpp's key names). Which layers are
    /// sparse is read off the tensors: a layer with a router (`ffn_gate_inp`) is an MoE layer.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| Error::config(path, "missing metadata `general.architecture`"))?
            .clone();
        let known = Architecture::from_name(&arch_name).filter(|a| a.gguf_name() == arch_name);
        let Some(base) = known else {
            return Err(Error::UnknownArchitecture {
                path: path.to_path_buf(),
                name: arch_name,
                supported: "GGUF architectures qwen3moe, qwen3, llama (Llama and Mixtral)",
            });
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match md.get(&key(k)) {
                None => Ok(None),
                Some(v) => gguf_u64(v).map(|x| Some(x as usize)).ok_or_else(|| {
                    Error::config(path, format!("metadata `{}` is not an integer", key(k)))
                }),
            }
        };
        let usize_ = |k: &str| -> Result<usize> {
            opt_usize(k)?
                .ok_or_else(|| Error::config(path, format!("missing metadata `{}`", key(k))))
        };
        let opt_f64 = |k: &str| md.get(&key(k)).and_then(gguf_f64);
        let num_layers = usize_("block_count")?;
        let hidden_size = usize_("embedding_length")?;
        let num_heads = usize_("attention.head_count")?;
        let num_kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(num_heads);
        let head_dim = match opt_usize("attention.key_length")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let vocab_size = match opt_usize("vocab_size")? {
            Some(v) => v,
            None => match content.tensor_infos.get("token_embd.weight") {
                Some(info) => *info.shape.dims().first().ok_or_else(|| {
                    Error::config(path, "tensor token_embd.weight has no dimensions")
                })?,
                None => {
                    return Err(Error::MissingTensor {
                        path: path.to_path_buf(),
                        name: "token_embd.weight".into(),
                    });
                }
            },
        };
        let num_experts = opt_usize("expert_count")?.unwrap_or(0);
        let architecture = match base {
            Architecture::Llama if num_experts > 0 => Architecture::Mixtral,
            a => a,
        };
        let ffn = opt_usize("feed_forward_length")?.unwrap_or(0);
        let moe = if num_experts > 0 {
            let top_k = usize_("expert_used_count")?;
            if top_k == 0 || top_k > num_experts {
                return Err(Error::config(
                    path,
                    format!("expert_used_count {top_k} must be in 1..={num_experts}"),
                ));
            }
            let mlp_only_layers = (0..num_layers)
                .filter(|l| {
                    !content
                        .tensor_infos
                        .contains_key(&format!("blk.{l}.ffn_gate_inp.weight"))
                })
                .collect();
            Some(MoeConfig {
                num_experts,
                top_k,
                expert_intermediate_size: opt_usize("expert_feed_forward_length")?.unwrap_or(ffn),
                norm_topk_prob: md
                    .get(&key("expert_weights_norm"))
                    .and_then(|v| v.to_bool().ok())
                    .unwrap_or(true),
                decoder_sparse_step: 1,
                mlp_only_layers,
            })
        } else {
            None
        };
        let eos_token_ids = md
            .get("tokenizer.ggml.eos_token_id")
            .and_then(gguf_u64)
            .map(|x| vec![x as u32])
            .unwrap_or_default();
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: ffn,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_theta: opt_f64("rope.freq_base").unwrap_or(10_000.0),
            rope_style: match base {
                Architecture::Llama | Architecture::Mixtral => RopeStyle::Interleaved,
                _ => RopeStyle::Half,
            },
            max_position_embeddings: opt_usize("context_length")?.unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: false,
            moe,
            eos_token_ids,
        };
        config.validate(path)?;
        Ok(config)
    }
}

/// Typed access to a JSON object's fields, with the file named in every error.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn find<'n>(&self, names: &[&'n str]) -> Option<(&'n str, &Value)> {
        names
            .iter()
            .find_map(|n| self.v.get(*n).filter(|x| !x.is_null()).map(|x| (*n, x)))
    }

    fn opt_usize(&self, names: &[&str]) -> Result<Option<usize>> {
        match self.find(names) {
            None => Ok(None),
            Some((n, x)) => x.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("`{n}` is not a non-negative integer: {x}"),
                )
            }),
        }
    }

    fn usize(&self, names: &[&str]) -> Result<usize> {
        self.opt_usize(names)?.ok_or_else(|| {
            Error::config(
                self.path,
                format!("missing field `{}`", names.join("` or `")),
            )
        })
    }

    fn opt_f64(&self, names: &[&str]) -> Result<Option<f64>> {
        match self.find(names) {
            None => Ok(None),
            Some((n, x)) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::config(self.path, format!("`{n}` is not a number: {x}"))),
        }
    }

    fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        match self.find(&[name]) {
            None => Ok(None),
            Some((n, x)) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| Error::config(self.path, format!("`{n}` is not a boolean: {x}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&v, Path::new("config.json"))
    }

    fn qwen3_moe() -> Value {
        json!({
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16, "norm_topk_prob": true, "decoder_sparse_step": 2,
            "mlp_only_layers": [3], "rope_theta": 1000000.0, "eos_token_id": [5, 7]
        })
    }

    #[test]
    fn qwen3_moe_fields_and_sparse_layers() {
        let c = parse(qwen3_moe()).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3Moe);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.eos_token_ids, vec![5, 7]);
        // step 2: layers 1 and 3 would be sparse; 3 is listed as dense.
        let sparse: Vec<bool> = (0..4).map(|l| c.is_sparse_layer(l)).collect();
        assert_eq!(sparse, vec![false, true, false, false]);
    }

    #[test]
    fn transformers_v5_field_names() {
        let mut v = qwen3_moe();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": 5e5}),
        );
        o.remove("num_experts");
        o.insert("num_local_experts".into(), json!(4));
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.moe.unwrap().num_experts, 4);
    }

    #[test]
    fn bad_configs_are_named_errors() {
        let mut v = qwen3_moe();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("config.json"),
            "{e}"
        );

        let mut v = qwen3_moe();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(parse(v).unwrap_err().to_string().contains("hidden_size"));

        let mut v = qwen3_moe();
        v["num_key_value_heads"] = json!(3);
        assert!(parse(v).unwrap_err().to_string().contains("grouped"));

        let mut v = qwen3_moe();
        v["num_experts_per_tok"] = json!(9);
        assert!(parse(v).is_err());

        let mut v = qwen3_moe();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(parse(v).unwrap_err().to_string().contains("yarn"));

        let mut v = qwen3_moe();
        v["hidden_size"] = json!("wide");
        assert!(parse(v).unwrap_err().to_string().contains("hidden_size"));
    }
}
