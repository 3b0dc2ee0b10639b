//! A broken Hugging Face model directory is a clear error naming the file and tensor, never a
//! panic: truncated or garbage safetensors, a missing or mis-shaped tensor, a bad config.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use engine::{LoadOptions, Loaded};

/// A copy of a fixture in a temporary directory, to break.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let src = common::fixture(name);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

fn error(dir: &Path) -> String {
    match Loaded::open(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn truncated_and_garbage_safetensors() {
    let (_t, dir) = copy_fixture("qwen3_moe_gqa");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = error(&dir);
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    assert!(error(&dir).contains("model.safetensors"));

    std::fs::remove_file(&p).unwrap();
    std::fs::remove_file(dir.join("logits.safetensors")).unwrap();
    assert!(error(&dir).contains("no *.safetensors"));
}

#[test]
fn a_missing_tensor_is_named() {
    let (_t, dir) = copy_fixture("mixtral");
    let p = dir.join("model.safetensors");
    let mut all = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    let gone = "model.layers.3.block_sparse_moe.experts.2.w3.weight";
    assert!(all.remove(gone).is_some());
    candle_core::safetensors::save(&all, &p).unwrap();
    let e = error(&dir);
    assert!(e.contains(gone) && e.contains("missing"), "{e}");
}

#[test]
fn a_mis_shaped_tensor_is_named_with_both_shapes() {
    let (_t, dir) = copy_fixture("qwen3_dense");
    edit_config(&dir, |v| v["intermediate_size"] = 100.into());
    let e = error(&dir);
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("100"),
        "{e}"
    );
}

#[test]
fn bad_configs() {
    let (_t, dir) = copy_fixture("llama_dense");
    edit_config(&dir, |v| {
        v["architectures"] = serde_json::json!(["BertModel"])
    });
    let e = error(&dir);
    assert!(e.contains("BertModel") && e.contains("config.json"), "{e}");

    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(error(&dir).contains("not valid JSON"));

    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(error(&dir).contains("config.json"));
}

#[test]
fn a_missing_or_broken_tokenizer() {
    let (_t, dir) = copy_fixture("qwen3_dense");
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    assert!(error(&dir).contains("tokenizer.json"));
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert!(error(&dir).contains("tokenizer.json"));
}

#[test]
fn sharded_checkpoints_load_through_the_index() {
    // Split the fixture into two shards with an index, as large checkpoints are published.
    let (_t, dir) = copy_fixture("qwen3_moe_sparse_step");
    let p = dir.join("model.safetensors");
    let all = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    std::fs::remove_file(&p).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let shard: std::collections::HashMap<String, candle_core::Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), file.into());
        }
    }
    // a stray file that the index does not list must not be read
    std::fs::write(dir.join("stray.safetensors"), b"junk").unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let r = common::reference(&dir);
    let m = Loaded::open(&dir, &LoadOptions::default()).unwrap();
    let logits = common::logits(&m, &r.prompt_ids, engine::Logits::All).unwrap();
    let d = common::max_diff(&logits.to_vec2::<f32>().unwrap(), &r.logits);
    assert!(d <= 1e-4, "{d}");

    // an index naming a shard that is gone
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert!(error(&dir).contains("model-00002-of-00002.safetensors"));
}
