//! Stage files: a GGUF holding one layer range's tensors gives the same stage as the whole file,
//! and the layout sums every tensor once.

mod common;

use engine::gguf::{ExpertLayout, Quant, WriteOptions, write_synthetic};
use engine::stage_file::{layout, write_stage};
use engine::{Architecture, Input, LoadOptions, Loaded, Output};

fn stage_out(path: &std::path::Path, layers: std::ops::Range<usize>, input: Input<'_>) -> Vec<f32> {
    let m = Loaded::open(
        path,
        &LoadOptions {
            layers: Some(layers),
            kv_memory: Some(8 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let mut cache = m.kv.sequence(16).unwrap();
    let rows = match &input {
        Input::Tokens(t) => t.len(),
        Input::Hidden(h) => h.dim(0).unwrap(),
    };
    let logits = if m.model.layers().end == m.config.num_layers {
        engine::Logits::All
    } else {
        engine::Logits::Skip
    };
    let _ = rows;
    match m.model.forward(&mut cache, input, logits).unwrap() {
        Output::Hidden(h) | Output::Logits(h) => h.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    }
}

#[test]
fn a_stage_file_loads_the_same_stage_and_holds_only_its_tensors() {
    let dir = tempfile::tempdir().unwrap();
    for (quant, experts, layout_kind) in [
        (Quant::Q4K, 4, ExpertLayout::Stacked),
        (Quant::Q8_0, 0, ExpertLayout::Stacked),
        (Quant::F32, 4, ExpertLayout::PerExpert),
    ] {
        let mut shape = common::synth(
            if experts > 0 {
                Architecture::Qwen3Moe
            } else {
                Architecture::Llama
            },
            experts,
        );
        shape.num_layers = 4;
        let full = dir.path().join(format!("{quant:?}-{experts}.gguf"));
        write_synthetic(
            &shape,
            &full,
            WriteOptions {
                quant,
                experts: layout_kind,
            },
        )
        .unwrap();
        let l = layout(&full).unwrap();
        // products per token: q, k, v, o and the router or the dense MLP; every expert's three
        // matrices, stacked or one tensor each; the output head
        let count = |c: &[(String, u64)]| c.iter().map(|(_, n)| n).sum::<u64>();
        for layer in 0..4 {
            let dense = if experts > 0 { 5 } else { 7 };
            assert_eq!(count(&l.layer_matrices[layer]), dense, "{quant:?} {layer}");
            assert_eq!(
                count(&l.layer_expert_matrices[layer]),
                3 * experts as u64,
                "{quant:?} {layer}"
            );
            assert_eq!(l.layer_expert_reads[layer].is_empty(), experts == 0);
        }
        assert_eq!(count(&l.head_matrices), 1);
        // the same matrices, one by one, with their shapes
        let m = engine::stage_file::matrices(&full).unwrap();
        let h = shape.hidden_size;
        assert!(
            m.iter()
                .any(|x| x.layer.is_none() && (x.rows, x.cols) == (shape.vocab_size, h))
        );
        for layer in 0..4 {
            let of = |expert: bool| -> usize {
                m.iter()
                    .filter(|x| x.layer == Some(layer) && x.expert == expert)
                    .map(|x| x.count)
                    .sum()
            };
            assert_eq!(of(false), if experts > 0 { 5 } else { 7 });
            assert_eq!(of(true), 3 * experts);
            let i = if experts > 0 {
                shape.expert_intermediate_size
            } else {
                shape.intermediate_size
            };
            // gate and up [i, h], down [h, i]: for experts, each matrix of the stack
            for x in m.iter().filter(|x| x.layer == Some(layer)) {
                let ffn = x.expert || (experts == 0 && (x.rows == i || x.cols == i));
                if ffn {
                    assert!(
                        (x.rows, x.cols) == (i, h) || (x.rows, x.cols) == (h, i),
                        "{x:?}"
                    );
                }
            }
            assert!(
                m.iter()
                    .any(|x| x.layer == Some(layer) && (x.rows, x.cols) == (h, i))
            );
        }
        let whole = std::fs::metadata(&full).unwrap().len();
        let sum: u64 = l.layer_bytes.iter().sum::<u64>() + l.embed_bytes;
        assert!(
            sum <= whole && sum * 10 > whole * 9,
            "{quant:?}: tensors {sum} of a {whole}-byte file"
        );
        for range in [0..1, 1..3, 3..4] {
            let part = dir.path().join(format!(
                "{quant:?}-{experts}-{}-{}.gguf",
                range.start, range.end
            ));
            write_stage(&full, &part, range.clone()).unwrap();
            let size = std::fs::metadata(&part).unwrap().len();
            assert!(size < whole, "{quant:?} {range:?}: {size} of {whole}");
            // the stage's tensors, and nothing else
            let mut f = std::fs::File::open(&part).unwrap();
            let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
            for name in c.tensor_infos.keys() {
                if let Some(layer) = name.strip_prefix("blk.").and_then(|n| n.split('.').next()) {
                    assert!(
                        range.contains(&layer.parse().unwrap()),
                        "{name} in a {range:?} stage"
                    );
                }
            }
            // the same stage from either file
            let input = |n: usize| -> Input<'static> {
                if range.start == 0 {
                    Input::Tokens(&[3, 7, 11, 5])
                } else {
                    let h: Vec<f32> = (0..4 * n)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                        .collect();
                    Input::Hidden(
                        candle_core::Tensor::from_vec(h, (4, n), &candle_core::Device::Cpu)
                            .unwrap(),
                    )
                }
            };
            let a = stage_out(&full, range.clone(), input(shape.hidden_size));
            let b = stage_out(&part, range.clone(), input(shape.hidden_size));
            assert_eq!(a, b, "{quant:?} {range:?}");
        }
    }
}

#[test]
fn a_range_outside_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("m.gguf");
    write_synthetic(
        &common::synth(Architecture::Llama, 0),
        &full,
        WriteOptions {
            quant: Quant::Q8_0,
            experts: ExpertLayout::Stacked,
        },
    )
    .unwrap();
    assert!(write_stage(&full, &dir.path().join("x.gguf"), 1..5).is_err());
    assert!(write_stage(&full, &dir.path().join("x.gguf"), 1..1).is_err());
    std::fs::write(dir.path().join("bad.gguf"), b"GGUF\x03\x00\x00\x00garbage").unwrap();
    assert!(
        write_stage(
            &dir.path().join("bad.gguf"),
            &dir.path().join("y.gguf"),
            0..1
        )
        .is_err()
    );
}
