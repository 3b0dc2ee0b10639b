//! Many sequences at once: a batched step gives each sequence what it gets alone, the scheduler
//! reproduces the committed references with other sequences beside them, prompt logprobs match
//! the references, and budgets, cancellations and bad requests end cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{fixture, fixtures, reference};
use engine::gguf::{ExpertLayout, Quant, WriteOptions, write_synthetic};
use engine::scheduler::collect;
use engine::{
    Architecture, Chunk, DecodeParams, Error, Event, Input, LoadOptions, Loaded, Logits, Output,
    Request, SamplingParams, Scheduler, SchedulerOptions,
};
use proptest::prelude::*;

const DEADLINE: Duration = Duration::from_secs(120);

fn open(dir: &Path) -> Loaded {
    Loaded::open(dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// A small synthetic Qwen3-MoE in Q4_K (the 8-bit kernels with several rows), made once.
fn synthetic_moe() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sinew-batch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("moe-q4k.gguf");
        let shape = common::synth(Architecture::Qwen3Moe, 8);
        let opts = WriteOptions {
            quant: Quant::Q4K,
            experts: ExpertLayout::Stacked,
        };
        write_synthetic(&shape, &path, opts).unwrap();
        path
    })
    .clone()
}

/// The models the batch properties are checked on: every fixture and the synthetic MoE.
fn models() -> &'static Vec<Loaded> {
    static MODELS: std::sync::OnceLock<Vec<Loaded>> = std::sync::OnceLock::new();
    MODELS.get_or_init(|| {
        let mut dirs = fixtures();
        dirs.push(synthetic_moe());
        dirs.iter().map(|d| open(d)).collect()
    })
}

/// Each sequence's tokens alone, in one pass: the logits of every position.
fn alone(m: &Loaded, ids: &[u32]) -> Vec<Vec<f32>> {
    common::logits(m, ids, Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// A mix of sequences: (step it joins at, its tokens).
fn mix() -> impl Strategy<Value = (Vec<(usize, Vec<u32>)>, usize)> {
    (
        prop::collection::vec((0usize..4, prop::collection::vec(0u32..384, 1..=64)), 1..=8),
        1usize..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Sequences joining and leaving between steps, prompts in chunks of `chunk` positions
    /// beside single decode positions: every position's logits equal what the sequence gets
    /// alone.
    #[test]
    fn a_batched_step_gives_each_sequence_what_it_gets_alone((seqs, chunk) in mix()) {
        for m in models() {
            let want: Vec<Vec<Vec<f32>>> = seqs.iter().map(|(_, ids)| alone(m, ids)).collect();
            let mut caches: Vec<Option<engine::KvCache>> = seqs.iter().map(|_| None).collect();
            let mut fed = vec![0usize; seqs.len()];
            let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); seqs.len()];
            for step in 0.. {
                // who runs this step, and how many positions each brings
                let mut plan: Vec<(usize, usize)> = Vec::new();
                for (i, (join, ids)) in seqs.iter().enumerate() {
                    if step < *join || fed[i] == ids.len() {
                        // not joined yet, or done: a finished sequence leaves (frees its cache)
                        if fed[i] == ids.len() {
                            caches[i] = None;
                        }
                        continue;
                    }
                    if caches[i].is_none() {
                        caches[i] = Some(m.kv.sequence(ids.len()).unwrap());
                    }
                    // a prompt in chunks; every 3rd sequence decodes one position at a time
                    let n = if i % 3 == 2 { 1 } else { chunk.min(ids.len() - fed[i]) };
                    plan.push((i, n));
                }
                if plan.is_empty() {
                    if fed.iter().zip(&seqs).all(|(f, s)| *f == s.1.len()) {
                        break;
                    }
                    continue;
                }
                let ids: Vec<u32> = plan
                    .iter()
                    .flat_map(|&(i, n)| seqs[i].1[fed[i]..fed[i] + n].iter().copied())
                    .collect();
                let mut refs: Vec<Option<&mut engine::KvCache>> =
                    caches.iter_mut().map(|c| c.as_mut()).collect();
                let mut chunks: Vec<Chunk<'_>> = plan
                    .iter()
                    .map(|&(i, n)| Chunk {
                        cache: refs[i].take().unwrap(),
                        rows: n,
                        logits: Logits::All,
                    })
                    .collect();
                let Output::Logits(l) = m.model.step(&mut chunks, Input::Tokens(&ids)).unwrap() else {
                    panic!("a whole model returns logits")
                };
                let mut rows = l.to_vec2::<f32>().unwrap().into_iter();
                for &(i, n) in &plan {
                    got[i].extend(rows.by_ref().take(n));
                    fed[i] += n;
                }
            }
            prop_assert_eq!(m.kv.used_tokens(), 0, "every finished sequence gave its positions back");
            for (g, w) in got.iter().zip(&want) {
                let d = common::max_diff(g, w);
                prop_assert!(d <= 1e-5, "{:?}: max |Δlogit| = {}", m.config.architecture, d);
            }
        }
    }
}

fn scheduler(m: Loaded, options: SchedulerOptions) -> Scheduler {
    Scheduler::new(Arc::new(m.model), Arc::new(m.text), m.kv, options).unwrap()
}

fn greedy(max_tokens: usize) -> DecodeParams {
    DecodeParams {
        max_tokens,
        ..Default::default()
    }
}

/// The tokens of a finished stream.
fn tokens(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token(t) => Some(t.token),
            _ => None,
        })
        .collect()
}

#[test]
fn every_fixture_continues_as_its_reference_with_seven_sequences_beside_it() {
    for dir in fixtures() {
        let r = reference(&dir);
        let s = scheduler(
            open(&dir),
            SchedulerOptions {
                max_seqs: 8,
                prefill_chunk: 7,
                ..Default::default()
            },
        );
        // seven sampled sequences with other prompts, submitted first, then the reference
        let others: Vec<_> = (0..7u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..5 + 3 * i).map(|j| (j * 31 + i * 7) % 380 + 3).collect();
                let params = DecodeParams {
                    max_tokens: 20,
                    sampling: SamplingParams {
                        temperature: 1.0,
                        seed: i as u64,
                        ..Default::default()
                    },
                    ignore_eos: true,
                    ..Default::default()
                };
                s.submit(Request {
                    prompt,
                    params,
                    prompt_logprobs: None,
                })
                .unwrap()
            })
            .collect();
        let mine = s
            .submit(Request {
                prompt: r.prompt_ids.clone(),
                params: greedy(r.greedy_ids.len()),
                prompt_logprobs: None,
            })
            .unwrap();
        let (events, _) = collect(&mine, DEADLINE).unwrap();
        assert_eq!(tokens(&events), r.greedy_ids, "{}", dir.display());
        for o in &others {
            collect(o, DEADLINE).unwrap();
        }
    }
}

#[test]
fn prompt_logprobs_are_the_log_softmax_of_the_reference_logits() {
    for dir in fixtures() {
        let r = reference(&dir);
        let s = scheduler(open(&dir), SchedulerOptions::default());
        let stream = s
            .submit(Request {
                prompt: r.prompt_ids.clone(),
                params: greedy(0),
                prompt_logprobs: Some(3),
            })
            .unwrap();
        let (events, finish) = collect(&stream, DEADLINE).unwrap();
        assert_eq!(finish, engine::Finish::Length);
        let Some(Event::PromptLogprobs(lp)) = events.first() else {
            panic!("{}: no prompt logprobs first", dir.display())
        };
        assert_eq!(lp.len(), r.prompt_ids.len());
        assert!(lp[0].is_none());
        for (i, e) in lp.iter().enumerate().skip(1) {
            let e = e.as_ref().unwrap();
            let row = &r.logits[i - 1];
            let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let want = row[r.prompt_ids[i] as usize] as f64 - lse;
            assert_eq!(e.token, r.prompt_ids[i]);
            assert!(
                (e.logprob as f64 - want).abs() <= 1e-4,
                "{} position {i}: {} vs {want}",
                dir.display(),
                e.logprob
            );
            assert_eq!(e.top.len(), 3);
            assert!(e.top.windows(2).all(|w| w[0].1 >= w[1].1));
        }
        // no generated tokens with max_tokens 0
        assert_eq!(tokens(&events), Vec::<u32>::new());
    }
}

#[test]
fn the_same_seed_gives_the_same_tokens_whatever_runs_beside_it() {
    let dir = fixture("qwen3_moe_gqa");
    let params = DecodeParams {
        max_tokens: 24,
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: Some(0.95),
            seed: 42,
            ..Default::default()
        },
        ignore_eos: true,
        logprobs: Some(2),
        ..Default::default()
    };
    let req = Request {
        prompt: vec![5, 6, 7, 8],
        params,
        prompt_logprobs: None,
    };
    let alone = {
        let s = scheduler(open(&dir), SchedulerOptions::default());
        let st = s.submit(req.clone()).unwrap();
        tokens(&collect(&st, DEADLINE).unwrap().0)
    };
    let s = scheduler(open(&dir), SchedulerOptions::default());
    let crowd: Vec<_> = (0..5)
        .map(|i| {
            let mut r = req.clone();
            r.prompt = vec![9 + i, 10, 11];
            r.params.sampling.seed = i as u64;
            s.submit(r).unwrap()
        })
        .collect();
    let st = s.submit(req).unwrap();
    let (events, _) = collect(&st, DEADLINE).unwrap();
    assert_eq!(tokens(&events), alone);
    // logprobs came with every token
    assert!(events.iter().all(|e| match e {
        Event::Token(t) => t.logprob.as_ref().is_some_and(|l| l.top.len() == 2),
        _ => true,
    }));
    drop(crowd);
}

#[test]
fn requests_that_can_never_fit_or_are_malformed_are_refused_at_once() {
    let dir = fixture("qwen3_moe_gqa");
    let mut m = open(&dir);
    m.kv = m.model.kv_pool(64 << 20, Some(32)).unwrap();
    let s = scheduler(m, SchedulerOptions::default());
    let long = Request {
        prompt: vec![5; 40],
        params: greedy(4),
        prompt_logprobs: None,
    };
    match s.submit(long) {
        Err(Error::ContextLength { ctx, requested }) => assert_eq!((ctx, requested), (32, 40)),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted"),
    }
    let bad = |sampling: SamplingParams| Request {
        prompt: vec![5, 6],
        params: DecodeParams {
            sampling,
            ..greedy(4)
        },
        prompt_logprobs: None,
    };
    for sampling in [
        SamplingParams {
            temperature: -0.5,
            ..Default::default()
        },
        SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        },
        SamplingParams {
            presence_penalty: 3.0,
            ..Default::default()
        },
    ] {
        let e = s.submit(bad(sampling)).err().expect("refused");
        assert!(matches!(e, Error::Request(_)), "{e}");
    }
    assert!(
        s.submit(Request {
            prompt: Vec::new(),
            params: greedy(4),
            prompt_logprobs: None,
        })
        .is_err()
    );
    assert!(
        s.submit(Request {
            prompt: vec![5],
            params: greedy(4),
            prompt_logprobs: Some(21),
        })
        .is_err()
    );
    // a token id past the vocabulary
    let e = s
        .submit(Request {
            prompt: vec![5, 100_000],
            params: greedy(4),
            prompt_logprobs: None,
        })
        .err()
        .expect("refused");
    assert!(e.to_string().contains("vocabulary"), "{e}");
    let ok = s
        .submit(Request {
            prompt: vec![5, 6],
            params: greedy(4),
            prompt_logprobs: None,
        })
        .unwrap();
    assert_eq!(tokens(&collect(&ok, DEADLINE).unwrap().0).len(), 4);
    // a context that ends generation
    let st = s
        .submit(Request {
            prompt: vec![5; 30],
            params: DecodeParams {
                ignore_eos: true,
                ..greedy(10)
            },
            prompt_logprobs: None,
        })
        .unwrap();
    let (events, finish) = collect(&st, DEADLINE).unwrap();
    assert_eq!(finish, engine::Finish::ContextFull);
    assert_eq!(tokens(&events).len(), 3);
    assert_eq!(s.kv().used_tokens(), 0);
}

#[test]
fn a_full_kv_budget_queues_requests_until_room_returns() {
    let dir = fixture("qwen3_moe_gqa");
    let mut m = open(&dir);
    let per = m.model.kv_shape().bytes_per_token();
    // room for 40 positions; a sequence outside the scheduler holds 35 of them
    m.kv = m.model.kv_pool(40 * per, None).unwrap();
    let hog = m.kv.sequence(35).unwrap();
    let s = scheduler(m, SchedulerOptions::default());
    let req = Request {
        prompt: vec![5; 10],
        params: DecodeParams {
            ignore_eos: true,
            ..greedy(21)
        },
        prompt_logprobs: None,
    };
    let streams: Vec<_> = (0..2).map(|_| s.submit(req.clone()).unwrap()).collect();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while s.stats().queued != 2 {
        assert!(std::time::Instant::now() < until, "{:?}", s.stats());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(s.stats().running, 0);
    assert!(streams[0].try_recv().is_none(), "nothing runs without room");
    drop(hog);
    // 30 positions each: one at a time
    for st in &streams {
        assert_eq!(tokens(&collect(st, DEADLINE).unwrap().0).len(), 21);
        let stats = s.stats();
        assert!(stats.running <= 1, "{stats:?}");
    }
    // a request larger than the whole budget can never run
    let huge = Request {
        prompt: vec![5; 10],
        params: greedy(100),
        prompt_logprobs: None,
    };
    assert!(matches!(s.submit(huge), Err(Error::ContextLength { .. })));
}

#[test]
fn a_dropped_stream_frees_its_sequence_within_a_step() {
    let dir = fixture("qwen3_moe_gqa");
    let s = scheduler(open(&dir), SchedulerOptions::default());
    let req = Request {
        prompt: vec![5; 8],
        params: DecodeParams {
            ignore_eos: true,
            ..greedy(504)
        },
        prompt_logprobs: None,
    };
    let st = s.submit(req.clone()).unwrap();
    // wait for the first token: it is running
    match st.recv_timeout(DEADLINE) {
        Some(Event::Token(_)) => {}
        other => panic!("{other:?}"),
    }
    drop(st);
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while s.kv().used_tokens() > 0 || s.stats().running > 0 {
        assert!(
            std::time::Instant::now() < until,
            "not freed: {:?}",
            s.stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        s.stats().generated_tokens < 504,
        "cut short: {:?}",
        s.stats()
    );
    // and the scheduler carries on
    let st = s
        .submit(Request {
            params: greedy(3),
            ..req
        })
        .unwrap();
    assert_eq!(tokens(&collect(&st, DEADLINE).unwrap().0).len(), 3);
}
