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
        let mut m = open(&dir);
        let logits = m.model.logits(&r.prompt_ids, Logits::All).unwrap();
        let d = max_diff(&rows(&logits), &r.logits);
        assert!(d <= 1e-4, "{}: max |Δlogit| = {d}", dir.display());
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    for dir in fixtures() {
        let r = reference(&dir);
        let mut m = open(&dir);
        let options = GenerateOptions {
            max_tokens: r.greedy_ids.len(),
            ..Default::default()
        };
        let g = generate(&mut m.model, &m.text, &r.prompt_ids, &options, &mut |_| {}).unwrap();
        assert_eq!(g.tokens, r.greedy_ids, "{}", dir.display());
    }
}

#[test]
fn prefill_then_decode_equals_one_full_pass() {
    for dir in fixtures() {
        let r = reference(&dir);
        let mut m = open(&dir);
        let mut all = r.prompt_ids.clone();
        all.extend(&r.greedy_ids);
        let full = rows(&m.model.logits(&all, Logits::All).unwrap());
        m.model.reset();
        // a prefill of the prompt in two chunks, then one token at a time
        let split = r.prompt_ids.len() / 2;
        let mut got = rows(&m.model.logits(&all[..split], Logits::All).unwrap());
        got.extend(rows(
            &m.model
                .logits(&all[split..r.prompt_ids.len()], Logits::All)
                .unwrap(),
        ));
        for &t in &r.greedy_ids {
            got.extend(rows(&m.model.logits(&[t], Logits::Last).unwrap()));
        }
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
        let mut a = stage(0..cut);
        let mut b = stage(cut..n);
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
            .forward(Input::Tokens(&r.prompt_ids), Logits::All)
            .unwrap()
        else {
            panic!("the first stage returned logits")
        };
        let Output::Logits(l) = b.model.forward(Input::Hidden(h), Logits::All).unwrap() else {
            panic!("the last stage returned hidden states")
        };
        let d = max_diff(&rows(&l), &r.logits);
        assert!(d <= 1e-4, "{}: max |Δlogit| = {d}", dir.display());
        // the first stage cannot produce logits, the last cannot take tokens
        assert!(
            b.model
                .forward(Input::Tokens(&r.prompt_ids), Logits::All)
                .is_err()
        );
    }
}
