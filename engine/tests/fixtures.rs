//! The engine against the committed transformers references (engine/fixtures, built by
//! make_fixtures.py): logits at every prompt position, greedy continuations, cache consistency
//! and pipeline-stage equivalence, for every fixture model.

mod common;

use std::path::Path;

use candle_core::Tensor;
use common::{fixtures, max_diff, reference};
use engine::{GenerateOptions, Input, LoadOptions, Loaded, Logits, Output, generate};

fn open(dir: &Path) -> Loaded {
    Loaded::open(dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

#[test]
fn logits_match_transformers_at_every_position() {
    for dir in fixtures() {
        let r = reference(&dir);
        let m = open(&dir);
        let logits = common::logits(&m, &r.prompt_ids, Logits::All).unwrap();
        let d = max_diff(&rows(&logits), &r.logits);
        assert!(d <= 1e-4, "{}: max |Δlogit| = {d}", dir.display());
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    for dir in fixtures() {
        let r = reference(&dir);
        let m = open(&dir);
        let options = GenerateOptions {
            max_tokens: r.greedy_ids.len(),
            ..Default::default()
        };
        let g = generate(
            &m.model,
            &m.kv,
            &m.text,
            &r.prompt_ids,
            &options,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(g.tokens, r.greedy_ids, "{}", dir.display());
    }
}

#[test]
fn prefill_then_decode_equals_one_full_pass() {
    for dir in fixtures() {
        let r = reference(&dir);
        let m = open(&dir);
        let mut all = r.prompt_ids.clone();
        all.extend(&r.greedy_ids);
        let full = rows(&common::logits(&m, &all, Logits::All).unwrap());
        // a prefill of the prompt in two chunks, then one token at a time, in a fresh sequence
        let mut c = m.kv.sequence(all.len()).unwrap();
        let split = r.prompt_ids.len() / 2;
        let mut got = rows(&m.model.logits(&mut c, &all[..split], Logits::All).unwrap());
        got.extend(rows(
            &m.model
                .logits(&mut c, &all[split..r.prompt_ids.len()], Logits::All)
                .unwrap(),
        ));
        for &t in &r.greedy_ids {
            got.extend(rows(&m.model.logits(&mut c, &[t], Logits::Last).unwrap()));
        }
        assert_eq!(c.len(), all.len());
        let d = max_diff(&got, &full);
        assert!(d <= 1e-4, "{}: max |Δlogit| = {d}", dir.display());
    }
}

#[test]
fn two_pipeline_stages_equal_the_whole_model_and_read_only_their_share() {
    for dir in fixtures() {
        let r = reference(&dir);
        let n = open(&dir).config.num_layers;
        let cut = n / 2;
        let stage = |layers| {
            Loaded::open(
                &dir,
                &LoadOptions {
                    layers: Some(layers),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let a = stage(0..cut);
        let b = stage(cut..n);
        for (s, range) in [(&a, 0..cut), (&b, cut..n)] {
            for name in &s.tensors_read {
                let layer = name
                    .strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|l| l.parse::<usize>().ok());
                match layer {
                    Some(l) => assert!(range.contains(&l), "{name} read by stage {range:?}"),
                    None if range.start == 0 => assert_eq!(name, "model.embed_tokens.weight"),
                    None => assert!(
                        [
                            "model.norm.weight",
                            "lm_head.weight",
                            "model.embed_tokens.weight"
                        ]
                        .contains(&name.as_str()),
                        "{name} read by the last stage"
                    ),
                }
            }
        }
        let Output::Hidden(h) = a
            .model
            .forward(
                &mut a.kv.sequence(0).unwrap(),
                Input::Tokens(&r.prompt_ids),
                Logits::All,
            )
            .unwrap()
        else {
            panic!("the first stage returned logits")
        };
        let Output::Logits(l) = b
            .model
            .forward(
                &mut b.kv.sequence(0).unwrap(),
                Input::Hidden(h),
                Logits::All,
            )
            .unwrap()
        else {
            panic!("the last stage returned hidden states")
        };
        let d = max_diff(&rows(&l), &r.logits);
        assert!(d <= 1e-4, "{}: max |Δlogit| = {d}", dir.display());
        // the first stage cannot produce logits, the last cannot take tokens
        assert!(
            b.model
                .forward(
                    &mut b.kv.sequence(0).unwrap(),
                    Input::Tokens(&r.prompt_ids),
                    Logits::All
                )
                .is_err()
        );
    }
}

/// Writes `src`'s model with every weight rounded to `half` twice: stored in that precision in
/// `half_dir`, and widened back to f32 in `f32_dir` (the same values), beside `src`'s other files.
fn write_rounded(src: &Path, half_dir: &Path, f32_dir: &Path, dtype: safetensors::Dtype) {
    for dir in [half_dir, f32_dir] {
        std::fs::create_dir_all(dir).unwrap();
        for e in std::fs::read_dir(src).unwrap().flatten() {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if (n.ends_with(".json") || n.ends_with(".jinja")) && n != "reference.json" {
                std::fs::copy(e.path(), dir.join(&name)).unwrap();
            }
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut halves = Vec::new();
    let mut widened = Vec::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let (h, w): (Vec<[u8; 2]>, Vec<[u8; 4]>) = values
            .map(|v| match dtype {
                safetensors::Dtype::BF16 => {
                    let h = half::bf16::from_f32(v);
                    (h.to_le_bytes(), h.to_f32().to_le_bytes())
                }
                _ => {
                    let h = half::f16::from_f32(v);
                    (h.to_le_bytes(), h.to_f32().to_le_bytes())
                }
            })
            .unzip();
        halves.push((name.clone(), view.shape().to_vec(), h.concat()));
        widened.push((name, view.shape().to_vec(), w.concat()));
    }
    let write = |dir: &Path, dtype, tensors: &[(String, Vec<usize>, Vec<u8>)]| {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, shape, data)| {
                let v = safetensors::tensor::TensorView::new(dtype, shape.clone(), data).unwrap();
                (n.clone(), v)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    };
    write(half_dir, dtype, &halves);
    write(f32_dir, safetensors::Dtype::F32, &widened);
}

#[test]
fn bf16_and_f16_checkpoints_give_the_f32_logits_of_the_same_values() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in fixtures() {
        let r = reference(&dir);
        for (tag, dtype) in [
            ("bf16", safetensors::Dtype::BF16),
            ("f16", safetensors::Dtype::F16),
        ] {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            let half_dir = tmp.path().join(format!("{name}-{tag}"));
            let f32_dir = tmp.path().join(format!("{name}-{tag}-as-f32"));
            write_rounded(&dir, &half_dir, &f32_dir, dtype);
            let (hm, fm) = (open(&half_dir), open(&f32_dir));
            // held in the file's precision where the CPU has the kernels: half the bytes
            // (matrices whose shape does not tile, such as a 4-expert router, stay on candle's
            // matmul in both; a tied head is packed from the f32 embedding in both)
            if engine::kernels::Format::F32.native() {
                let (hk, fk) = (hm.model.matrix_formats(), fm.model.matrix_formats());
                let packed = |k: &[(String, usize, usize)], kind: &str| {
                    k.iter()
                        .find(|e| e.0 == kind)
                        .map_or((0, 0), |e| (e.1, e.2))
                };
                let (hn, hb) = packed(&hk, &tag.to_uppercase());
                let (tied_n, tied_b) = packed(&hk, "F32");
                let (fn_, fb) = packed(&fk, "F32");
                assert!(hn > 0, "{name}: {hk:?}");
                assert_eq!((hn + tied_n, 2 * hb + tied_b), (fn_, fb), "{name}");
                assert_eq!(packed(&hk, "candle"), packed(&fk, "candle"), "{name}");
            }
            let h = rows(&common::logits(&hm, &r.prompt_ids, Logits::All).unwrap());
            let f = rows(&common::logits(&fm, &r.prompt_ids, Logits::All).unwrap());
            // widening is exact and the kernels add in the same order: the same bits (the f32
            // path is the one checked against transformers above)
            assert_eq!(h, f, "{name} {tag}");
        }
    }
}

#[test]
fn a_tied_packed_head_serves_the_embedding_rows_so_the_matrix_is_kept_once() {
    let mut tied = 0;
    for dir in fixtures() {
        let m = open(&dir);
        let expect = m.model.config().tie_word_embeddings && engine::kernels::Format::F32.native();
        assert_eq!(m.model.embeds_from_head(), expect, "{}", dir.display());
        tied += usize::from(expect);
    }
    if engine::kernels::Format::F32.native() {
        assert!(tied >= 2, "the fixtures cover tied embeddings");
    }
}
