//! `sinew gguf`: write synthetic GGUF models of any shape, convert Hugging Face directories.

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use engine::Architecture;
use engine::gguf::{ExpertLayout, Quant, SynthShape, WriteOptions};

/// `sinew gguf` subcommands.
#[derive(Subcommand, Debug)]
pub enum GgufCommand {
    /// Write a model of the given shape with random weights and the built-in tokenizer.
    Synth(SynthArgs),
    /// Convert a Hugging Face model directory to GGUF.
    Convert(ConvertArgs),
    /// Print a GGUF model's configuration and the weight bytes one decode step reads, as JSON.
    Info {
        /// The GGUF file.
        file: PathBuf,
    },
}

/// Format and layout flags shared by both subcommands.
#[derive(Args, Debug)]
pub struct FormatArgs {
    /// Matrix format: f32, f16, q8_0, q4_k, q6_k or q4_k_m (llama.cpp's mix: q4_k with q6_k for
    /// the output head and some attn_v / ffn_down); norms and routers stay f32.
    #[arg(long, default_value = "q8_0")]
    quant: String,
    /// Store experts one tensor per expert instead of stacked `ffn_*_exps`.
    #[arg(long)]
    per_expert: bool,
}

impl FormatArgs {
    fn options(&self) -> anyhow::Result<WriteOptions> {
        Ok(WriteOptions {
            quant: Quant::parse(&self.quant).ok_or_else(|| {
                anyhow!(
                    "unknown --quant {:?} (f32, f16, q8_0, q4_k, q6_k, q4_k_m)",
                    self.quant
                )
            })?,
            experts: if self.per_expert {
                ExpertLayout::PerExpert
            } else {
                ExpertLayout::Stacked
            },
        })
    }
}

/// Arguments of `sinew gguf synth`. Defaults: a small Qwen3-MoE.
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// qwen3_moe, mixtral, qwen3 or llama.
    #[arg(long, default_value = "qwen3_moe")]
    arch: String,
    /// Vocabulary (at least the built-in tokenizer's 384).
    #[arg(long, default_value_t = 384)]
    vocab: usize,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Dense MLP width.
    #[arg(long, default_value_t = 512)]
    intermediate: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Query heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// Head width.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Experts per layer (MoE architectures).
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Expert MLP width.
    #[arg(long, default_value_t = 256)]
    moe_intermediate: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a Hugging Face directory (safetensors) at --out instead of a GGUF file.
    #[arg(long)]
    hf: bool,
    /// Precision of the --hf weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32", requires = "hf")]
    hf_dtype: String,
    #[command(flatten)]
    format: FormatArgs,
}

/// Arguments of `sinew gguf convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The Hugging Face model directory.
    dir: PathBuf,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    format: FormatArgs,
}

/// Runs `sinew gguf`.
pub fn run(cmd: GgufCommand) -> anyhow::Result<()> {
    match cmd {
        GgufCommand::Synth(a) => {
            let architecture = Architecture::from_name(&a.arch).ok_or_else(|| {
                anyhow!(
                    "unknown --arch {:?} (qwen3_moe, mixtral, qwen3, llama)",
                    a.arch
                )
            })?;
            let moe = matches!(architecture, Architecture::Qwen3Moe | Architecture::Mixtral);
            let shape = SynthShape {
                architecture,
                vocab_size: a.vocab,
                hidden_size: a.hidden,
                intermediate_size: a.intermediate,
                num_layers: a.layers,
                num_heads: a.heads,
                num_kv_heads: a.kv_heads,
                head_dim: a.head_dim,
                num_experts: if moe { a.experts } else { 0 },
                top_k: a.top_k,
                expert_intermediate_size: a.moe_intermediate,
                seed: a.seed,
            };
            if a.hf {
                let dtype = match a.hf_dtype.to_ascii_lowercase().as_str() {
                    "f32" => candle_core::DType::F32,
                    "bf16" => candle_core::DType::BF16,
                    "f16" => candle_core::DType::F16,
                    other => bail!("unknown --hf-dtype {other:?} (f32, bf16, f16)"),
                };
                engine::gguf::write_synthetic_hf(&shape, &a.out, dtype)
            } else {
                engine::gguf::write_synthetic(&shape, &a.out, a.format.options()?)
            }
            .with_context(|| format!("writing {}", a.out.display()))?;
            eprintln!("wrote {}", a.out.display());
        }
        GgufCommand::Info { file } => {
            // the header alone: no weight is read
            let summary = engine::gguf::summary(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let c = &summary.config;
            let active = summary.active_weight_bytes;
            let total = std::fs::metadata(&file)?.len();
            println!(
                "{}",
                serde_json::json!({
                    "architecture": format!("{:?}", c.architecture),
                    "layers": c.num_layers, "hidden": c.hidden_size, "vocab": c.vocab_size,
                    "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
                    "experts": c.moe.as_ref().map(|m| m.num_experts),
                    "top_k": c.moe.as_ref().map(|m| m.top_k),
                    "file_bytes": total,
                    "active_weight_bytes_per_token": active,
                })
            );
        }
        GgufCommand::Convert(a) => {
            engine::gguf::convert_hf(&a.dir, &a.out, a.format.options()?)
                .with_context(|| format!("converting {}", a.dir.display()))?;
            eprintln!("wrote {}", a.out.display());
        }
    }
    Ok(())
}
