//! Predicted decode speed of a plan, before a weight is loaded: what `sinew plan` prints and the
//! head logs with every plan.
//!
//! A decode step on a CPU streams weights through the matrix-vector kernels and reads each
//! sequence's cache in attention. Each stage's time for a token is, per layer it holds:
//! - every product the layer runs — each tensor, and `top_k / num_experts` of the experts — at
//!   the node's measured cost for that format ([`crate::speed::measure_speed`]: a fixed cost
//!   per product plus its bytes over the rate the kernels stream them at);
//!
//!   Where the planning node has timed the model's own products
//!   ([`crate::speed::measure_model`]: narrow and wide rows, small experts and the fixed cost
//!   of each product do not stream at one rate), a layer takes its timed seconds, scaled for
//!   each node by what the rates say of that node against the planning node.
//! - attention at the predicted context position ([`crate::speed::measure_attention`], measured
//!   on the planning node for the model's shape and assumed the same on every node).
//!
//! The last stage adds the output head. Each hop adds half a round trip and the hidden state over
//! the link's measured bandwidth. Single stream: one token's trip through every stage and link.
//! Aggregate, with `seqs` sequences in micro-batches of `seqs / stages` rows: a micro-batch runs
//! each dense product once and the experts its rows route to (expected `n·(1 − (1 − k/n)^rows)`
//! of `n`), attention once per row, and the pipeline delivers one micro-batch per cycle — the
//! slowest stage's time, or the trip time over the stages in flight, whichever is longer.

use engine::stage_file::Layout;

use crate::plan::StagePlan;
use crate::wire::Rate;

/// A link's measured speed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSpeed {
    /// Round trip, microseconds.
    pub rtt_us: f64,
    /// Bandwidth, bytes per second.
    pub bytes_per_s: f64,
}

/// The context position predictions are for unless told otherwise (capped at the context):
/// a conversation a few turns in.
pub const DEFAULT_POSITION: usize = 256;

/// One decode row's products timed on the planning node, with that node's rates.
#[derive(Clone, Debug, PartialEq)]
pub struct Timed {
    /// Seconds per layer and for the output head ([`crate::speed::measure_model`]).
    pub times: crate::speed::ModelTimes,
    /// The planning node's rates: those measured with the products, then the others.
    pub rates: Vec<Rate>,
}

impl Timed {
    /// `times`, with the rates measured alongside them and, for the other formats, `here`
    /// (the node's rates measured at start).
    pub fn new(times: crate::speed::ModelTimes, here: &[Rate]) -> Self {
        let mut rates = times.rates.clone();
        for r in here {
            if !rates.iter().any(|x| x.format == r.format) {
                rates.push(r.clone());
            }
        }
        Timed { times, rates }
    }
}

/// What a prediction is for.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// One row's hidden state on the wire, bytes.
    pub hidden_bytes: u64,
    /// Sequences the aggregate figure assumes.
    pub seqs: usize,
    /// The context position decode is predicted at (tokens already in the sequence).
    pub position: usize,
    /// Seconds one decode row's attention takes in one layer at `position`
    /// ([`crate::speed::measure_attention`]).
    pub attention_s: f64,
    /// The model's products as timed here, if they were.
    pub timed: Option<Timed>,
}

/// The prediction for a plan.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    /// Per stage, milliseconds of compute for one decode token.
    pub stage_ms: Vec<f64>,
    /// Per hop (stage k → k+1, the last back to the head), milliseconds for one token.
    pub link_ms: Vec<f64>,
    /// The context position the figures are for.
    pub position: usize,
    /// Single-stream decode, tokens per second.
    pub single_tokens_per_s: f64,
    /// Sequences the aggregate figure assumes.
    pub seqs: usize,
    /// Aggregate decode with `seqs` sequences, tokens per second.
    pub aggregate_tokens_per_s: f64,
}

/// The rate for `format` among `rates`; a format not measured gets the slowest rate measured
/// (a conservative guess). `None` when nothing was measured.
fn rate<'a>(rates: &'a [Rate], format: &str) -> Option<&'a Rate> {
    rates
        .iter()
        .find(|r| r.format == format)
        .or_else(|| rates.iter().min_by_key(|r| r.bytes_per_s))
}

/// Seconds of `products` products (by format) reading `reads` bytes (by format), both scaled by
/// `share`.
fn seconds(
    reads: &[(String, u64)],
    products: &[(String, u64)],
    rates: &[Rate],
    share: f64,
) -> Option<f64> {
    let bytes = reads.iter().try_fold(0.0, |t, (f, b)| {
        Some(t + *b as f64 * share / rate(rates, f)?.bytes_per_s.max(1) as f64)
    })?;
    products.iter().try_fold(bytes, |t, (f, n)| {
        Some(t + *n as f64 * share * rate(rates, f)?.call_ns as f64 / 1e9)
    })
}

/// One layer's products for a micro-batch of `rows` rows, seconds, from `rates` alone: its
/// tensors, and the share of its experts the rows route to.
fn layer_seconds(layout: &Layout, l: usize, rates: &[Rate], rows: usize) -> Option<f64> {
    let expert_share = match &layout.config.moe {
        Some(m) if m.num_experts > 0 => {
            let (n, k) = (m.num_experts as f64, m.top_k as f64);
            // distinct experts the rows route to, expected, over those held
            (1.0 - (1.0 - k / n).powi(rows.max(1) as i32)).min(1.0)
        }
        _ => 1.0,
    };
    Some(
        seconds(
            layout.layer_reads.get(l)?,
            layout.layer_matrices.get(l)?,
            rates,
            1.0,
        )? + seconds(
            layout.layer_expert_reads.get(l)?,
            layout.layer_expert_matrices.get(l)?,
            rates,
            expert_share,
        )?,
    )
}

/// One stage's seconds for a micro-batch of `rows` decode rows on a node of `rates`.
fn stage_seconds(
    layout: &Layout,
    layers: std::ops::Range<usize>,
    rates: &[Rate],
    rows: usize,
    work: &Workload,
) -> Option<f64> {
    // the timed seconds, scaled by this node and these rows against the planning node and one
    // row; the rates alone where nothing was timed
    let scaled = |timed: Option<f64>, here: Option<f64>, there: f64| match (timed, here) {
        (Some(t), Some(h)) if h > 0.0 => t * there / h,
        _ => there,
    };
    let timed = work.timed.as_ref();
    let mut t = 0.0;
    for l in layers.clone() {
        let there = layer_seconds(layout, l, rates, rows)?;
        let here = timed.and_then(|x| layer_seconds(layout, l, &x.rates, 1));
        t += scaled(
            timed.and_then(|x| x.times.layer_s.get(l).copied()),
            here,
            there,
        );
        t += work.attention_s.max(0.0) * rows.max(1) as f64;
    }
    if layers.end == layout.layer_bytes.len() {
        let head = |r: &[Rate]| seconds(&layout.head_reads, &layout.head_matrices, r, 1.0);
        let here = timed.and_then(|x| head(&x.rates));
        t += scaled(timed.map(|x| x.times.head_s), here, head(rates)?);
    }
    Some(t)
}

/// Predicts `plan`'s decode speed for `work` from each stage's node rates (`rates[k]` for stage
/// k) and the links (`links[k]` from stage k to k+1, the last from the last stage back to the
/// head; none on one node). `None` when a stage has no measured rates.
pub fn predict(
    layout: &Layout,
    plan: &StagePlan,
    rates: &[Vec<Rate>],
    links: &[LinkSpeed],
    work: &Workload,
) -> Option<Prediction> {
    let stages = plan.stages.len();
    let link_time = |l: &LinkSpeed, rows: usize, hidden: bool| {
        let bytes = if hidden {
            work.hidden_bytes * rows as u64
        } else {
            16 * rows as u64
        };
        l.rtt_us / 2e6 + bytes as f64 / l.bytes_per_s.max(1.0)
    };
    let mut stage_s = Vec::with_capacity(stages);
    for (k, st) in plan.stages.iter().enumerate() {
        stage_s.push(stage_seconds(
            layout,
            st.layers.clone(),
            rates.get(k)?,
            1,
            work,
        )?);
    }
    let link_s: Vec<f64> = links
        .iter()
        .enumerate()
        .map(|(k, l)| link_time(l, 1, k + 1 < stages))
        .collect();
    let trip: f64 = stage_s.iter().sum::<f64>() + link_s.iter().sum::<f64>();
    let seqs = work.seqs.max(1);
    let rows = seqs.div_ceil(stages);
    let in_flight = seqs.div_ceil(rows);
    let mut slowest: f64 = 0.0;
    let mut batch_trip = 0.0;
    for (k, st) in plan.stages.iter().enumerate() {
        let t = stage_seconds(layout, st.layers.clone(), rates.get(k)?, rows, work)?;
        slowest = slowest.max(t);
        batch_trip += t;
    }
    for (k, l) in links.iter().enumerate() {
        let t = link_time(l, rows, k + 1 < stages);
        batch_trip += t;
    }
    let cycle = slowest.max(batch_trip / in_flight as f64);
    Some(Prediction {
        stage_ms: stage_s.iter().map(|s| s * 1e3).collect(),
        link_ms: link_s.iter().map(|s| s * 1e3).collect(),
        position: work.position,
        single_tokens_per_s: 1.0 / trip.max(1e-9),
        seqs,
        aggregate_tokens_per_s: rows as f64 / cycle.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{NodeBudget, Serving};
    use engine::config::{Architecture, ModelConfig, MoeConfig, RopeStyle};
    use proptest::prelude::*;

    fn layout(layers: usize, moe: bool) -> Layout {
        Layout {
            config: ModelConfig {
                architecture: Architecture::Qwen3Moe,
                vocab_size: 1000,
                hidden_size: 64,
                intermediate_size: 128,
                num_layers: layers,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
                rope_style: RopeStyle::Half,
                max_position_embeddings: 4096,
                tie_word_embeddings: false,
                attention_bias: false,
                moe: moe.then(|| MoeConfig {
                    num_experts: 8,
                    top_k: 2,
                    expert_intermediate_size: 32,
                    norm_topk_prob: true,
                    decoder_sparse_step: 1,
                    mlp_only_layers: vec![],
                }),
                eos_token_ids: vec![],
            },
            layer_bytes: vec![9_000_000; layers],
            embed_bytes: 1_000_000,
            head_bytes: 1_000_000,
            layer_reads: vec![vec![("q4_k".into(), 1_000_000)]; layers],
            layer_expert_reads: vec![vec![("q4_k".into(), 8_000_000)]; layers],
            head_reads: vec![("q6_k".into(), 1_000_000)],
            layer_matrices: vec![vec![("q4_k".into(), if moe { 5 } else { 7 })]; layers],
            layer_expert_matrices: vec![
                if moe {
                    vec![("q4_k".into(), 24)]
                } else {
                    vec![]
                };
                layers
            ],
            head_matrices: vec![("q6_k".into(), 1)],
        }
    }

    fn rates(gb: f64) -> Vec<Rate> {
        vec![Rate {
            format: "q4_k".into(),
            bytes_per_s: (gb * 1e9) as u64,
            call_ns: 0,
        }]
    }

    fn work(hidden_bytes: u64, seqs: usize) -> Workload {
        Workload {
            hidden_bytes,
            seqs,
            position: 100,
            attention_s: 0.0,
            timed: None,
        }
    }

    fn plan(l: &Layout, nodes: usize) -> StagePlan {
        let budgets: Vec<NodeBudget> = (0..nodes)
            .map(|i| NodeBudget {
                name: format!("n{i}"),
                usable: 1 << 34,
            })
            .collect();
        StagePlan::place(l, &budgets, Serving::new(256, 4, 64)).unwrap()
    }

    #[test]
    fn a_dense_single_node_is_bytes_over_rate() {
        let l = layout(4, false);
        let p = plan(&l, 1);
        // 4 × 9 MB + 1 MB head (q6_k not measured: the slowest rate) at 1 GB/s
        let r = predict(&l, &p, &[rates(1.0)], &[], &work(256, 1)).unwrap();
        assert!((r.single_tokens_per_s - 1.0 / 0.037).abs() < 1e-6, "{r:?}");
    }

    #[test]
    fn experts_count_by_the_share_a_token_reads() {
        let l = layout(4, true);
        let p = plan(&l, 1);
        // per layer 1 MB + 8 MB × 2/8 = 3 MB; head 1 MB
        let r = predict(&l, &p, &[rates(1.0)], &[], &work(256, 1)).unwrap();
        assert!((r.single_tokens_per_s - 1.0 / 0.013).abs() < 1e-6, "{r:?}");
        assert!(predict(&l, &p, &[Vec::new()], &[], &work(256, 1)).is_none());
    }

    #[test]
    fn each_product_and_each_layer_s_attention_adds_its_cost() {
        let l = layout(4, true);
        let p = plan(&l, 1);
        let base = predict(&l, &p, &[rates(1.0)], &[], &work(256, 4)).unwrap();
        // 10 µs per product: per layer 5 + 24 × 2/8 = 11 products, the head 1 (the slowest
        // rate's cost stands in for q6_k, not measured)
        let mut r = rates(1.0);
        r[0].call_ns = 10_000;
        let costly = predict(&l, &p, &[r], &[], &work(256, 4)).unwrap();
        let extra = 1.0 / costly.single_tokens_per_s - 1.0 / base.single_tokens_per_s;
        assert!((extra - 45.0 * 10e-6).abs() < 1e-9, "{extra}");
        // 1 ms of attention per layer and row
        let mut w = work(256, 4);
        w.attention_s = 1e-3;
        let attending = predict(&l, &p, &[rates(1.0)], &[], &w).unwrap();
        let extra = 1.0 / attending.single_tokens_per_s - 1.0 / base.single_tokens_per_s;
        assert!((extra - 4e-3).abs() < 1e-9, "{extra}");
        assert_eq!(attending.position, 100);
        // four rows in one micro-batch: attention four times, the weights once
        let batch = 4.0 / attending.aggregate_tokens_per_s - 4.0 / base.aggregate_tokens_per_s;
        assert!((batch - 16e-3).abs() < 1e-9, "{batch}");
    }

    proptest! {
        #[test]
        fn more_stages_never_predict_a_faster_single_stream_and_batches_help(
            nodes in 1usize..4, seqs in 1usize..16, rtt in 0.0f64..2000.0, gb in 0.5f64..50.0,
        ) {
            let l = layout(8, true);
            let one = predict(&l, &plan(&l, 1), &[rates(gb)], &[], &work(4096, seqs)).unwrap();
            let p = plan(&l, nodes);
            let links = vec![LinkSpeed { rtt_us: rtt, bytes_per_s: 1e9 }; if nodes > 1 { nodes } else { 0 }];
            let many = predict(&l, &p, &vec![rates(gb); nodes], &links, &work(4096, seqs)).unwrap();
            prop_assert!(many.single_tokens_per_s <= one.single_tokens_per_s * (1.0 + 1e-9));
            prop_assert!(many.aggregate_tokens_per_s >= many.single_tokens_per_s * (1.0 - 1e-9));
            prop_assert_eq!(many.stage_ms.len(), nodes);
            prop_assert_eq!(many.link_ms.len(), links.len());
        }
    }
}
