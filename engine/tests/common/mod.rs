//! What the engine's integration tests share: the committed fixtures and their references.

#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};

use candle_core::Device;

/// The fixture directory `name` (engine/fixtures/NAME).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Every fixture directory with a reference.json, sorted.
pub fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.json").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "fixtures missing under {}", root.display());
    dirs
}

/// A fixture's transformers reference.
pub struct Reference {
    /// The prompt text.
    pub prompt: String,
    /// Its token ids.
    pub prompt_ids: Vec<u32>,
    /// The 12-token greedy continuation.
    pub greedy_ids: Vec<u32>,
    /// Logits at every prompt position.
    pub logits: Vec<Vec<f32>>,
}

/// Reads reference.json and logits.safetensors of the fixture in `dir`.
pub fn reference(dir: &Path) -> Reference {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids = |k: &str| -> Vec<u32> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let t = candle_core::safetensors::load(dir.join("logits.safetensors"), &Device::Cpu).unwrap();
    Reference {
        prompt: r["prompt"].as_str().unwrap().to_string(),
        prompt_ids: ids("prompt_ids"),
        greedy_ids: ids("greedy_ids"),
        logits: t["logits"].to_vec2::<f32>().unwrap(),
    }
}

/// The largest absolute difference between two equally shaped matrices.
pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// The logits of `ids` in a new sequence of `m`.
pub fn logits(
    m: &engine::Loaded,
    ids: &[u32],
    which: engine::Logits,
) -> engine::Result<candle_core::Tensor> {
    let mut cache = m.kv.sequence(0)?;
    m.model.logits(&mut cache, ids, which)
}

/// A small synthetic model of `arch` (hidden 256, 2 layers; `experts` experts, top-2, for the MoE
/// architectures), seeded.
pub fn synth(arch: engine::Architecture, experts: usize) -> engine::gguf::SynthShape {
    engine::gguf::SynthShape {
        architecture: arch,
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        num_experts: experts,
        top_k: 2.min(experts),
        expert_intermediate_size: 256,
        seed: 11,
    }
}
