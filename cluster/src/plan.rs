//! Placement: which node holds which layers. A pure function of the model's layout, each node's
//! usable memory and the serving settings, so it is proptested and `sinew plan` can show it
//! before a weight is loaded.
//!
//! Every stage needs its layers' weights, their KV cache for `ctx × max_seqs` positions, and
//! activation buffers for one step; the first stage adds the embedding, the last the final norm
//! and output head (and the logits of a step). The layers are split in proportion to each node's
//! memory left after its fixed costs, contiguous and in node order; a split where a node would
//! overflow falls back to filling nodes in order. A plan that cannot fit says by how much and
//! what would make it fit.

use std::fmt;
use std::ops::Range;

use engine::stage_file::Layout;

/// One node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeBudget {
    /// A name for tables and errors (address or host).
    pub name: String,
    /// Memory the node may use, bytes.
    pub usable: u64,
}

/// What the cluster serves with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Serving {
    /// Longest sequence, positions.
    pub ctx: usize,
    /// Sequences at once.
    pub max_seqs: usize,
    /// Rows in one step at most.
    pub max_step_tokens: usize,
    /// KV positions every stage holds: `ctx × max_seqs` unless a KV byte budget says otherwise.
    pub kv_tokens: usize,
}

impl Serving {
    /// Settings whose KV holds `ctx × max_seqs` positions.
    pub fn new(ctx: usize, max_seqs: usize, max_step_tokens: usize) -> Self {
        Serving {
            ctx,
            max_seqs,
            max_step_tokens,
            kv_tokens: ctx * max_seqs,
        }
    }
}

/// One stage of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    /// Index of its node in the list given.
    pub node: usize,
    /// Its layers.
    pub layers: Range<usize>,
    /// Weight bytes.
    pub weight_bytes: u64,
    /// KV bytes for `ctx × max_seqs` positions.
    pub kv_bytes: u64,
    /// Activation bytes of one step.
    pub act_bytes: u64,
    /// The node's usable memory.
    pub usable: u64,
}

impl Stage {
    /// Everything the stage needs.
    pub fn need(&self) -> u64 {
        self.weight_bytes + self.kv_bytes + self.act_bytes
    }
}

/// A placement: one stage per node, in pipeline order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePlan {
    /// The stages.
    pub stages: Vec<Stage>,
    /// Node names, as given.
    pub names: Vec<String>,
    /// The serving settings planned for.
    pub serving: Serving,
}

/// Why no plan fits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The nodes together hold less than the model needs.
    #[error(
        "the model does not fit: it needs {} (weights {}, KV cache {} for {} positions, \
         activations {}), the nodes offer {} — {}. {}",
        gib(*need), gib(*weights), gib(*kv), serving.kv_tokens, gib(*act), gib(*have),
        shortfall(*need, *have), hints.join("; ")
    )]
    DoesNotFit {
        /// Bytes needed in all.
        need: u64,
        /// Of which weights.
        weights: u64,
        /// Of which KV.
        kv: u64,
        /// Of which activations.
        act: u64,
        /// Bytes the nodes offer.
        have: u64,
        /// The settings.
        serving: Serving,
        /// What would make it fit.
        hints: Vec<String>,
    },
    /// One stage of a split overflows its node.
    #[error(
        "stage {stage} (layers {}..{} on {node}) needs {}, the node offers {} — {} short",
        layers.start, layers.end, gib(*need), gib(*have), gib(need.saturating_sub(*have))
    )]
    StageTooBig {
        /// The stage.
        stage: usize,
        /// Its node's name.
        node: String,
        /// Its layers.
        layers: Range<usize>,
        /// Bytes it needs.
        need: u64,
        /// Bytes its node offers.
        have: u64,
    },
    /// A `--split` that does not match the model or the nodes.
    #[error("bad split: {0}")]
    BadSplit(String),
    /// More nodes than layers, or none.
    #[error("{nodes} nodes for a model of {layers} layers: every node needs at least one layer")]
    Nodes {
        /// Nodes given.
        nodes: usize,
        /// Layers of the model.
        layers: usize,
    },
}

fn shortfall(need: u64, have: u64) -> String {
    if need > have {
        format!("{} short", gib(need - have))
    } else {
        "enough in all, but not in any split in node order".into()
    }
}

fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// The memory a node may use by default: 90% of what it reports available.
pub fn usable(available: u64) -> u64 {
    available / 10 * 9
}

/// KV bytes of one layer for one position (keys and values, f32).
pub fn kv_bytes_per_layer_token(layout: &Layout) -> u64 {
    let c = &layout.config;
    (2 * c.num_kv_heads * c.head_dim * 4) as u64
}

/// Activation bytes one step of `rows` rows needs at a stage (hidden states, attention and MLP
/// intermediates, in f32), plus the logits at the last stage.
pub fn act_bytes(layout: &Layout, serving: &Serving, last: bool) -> u64 {
    let c = &layout.config;
    let rows = serving.max_step_tokens as u64;
    let inter = c
        .moe
        .as_ref()
        .map_or(c.intermediate_size, |m| {
            m.expert_intermediate_size * m.top_k
        })
        .max(c.intermediate_size) as u64;
    let qkv = ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim) as u64;
    let per_row = 4 * (4 * c.hidden_size as u64 + qkv + 3 * inter);
    let logits = if last {
        4 * c.vocab_size as u64 * rows.min(serving.max_seqs as u64 + 64)
    } else {
        0
    };
    rows * per_row + logits
}

fn stage(
    layout: &Layout,
    serving: &Serving,
    node: usize,
    usable: u64,
    layers: Range<usize>,
) -> Stage {
    let n = layout.layer_bytes.len();
    let kv = kv_bytes_per_layer_token(layout) * layers.len() as u64 * serving.kv_tokens as u64;
    Stage {
        node,
        weight_bytes: layout.stage_bytes(layers.clone()),
        kv_bytes: kv,
        act_bytes: act_bytes(layout, serving, layers.end == n),
        usable,
        layers,
    }
}

impl StagePlan {
    /// Places `layout`'s layers on `nodes` (in pipeline order; the head first) for `serving`.
    ///
    /// # Errors
    /// [`PlanError::DoesNotFit`] with hints, [`PlanError::Nodes`].
    pub fn place(
        layout: &Layout,
        nodes: &[NodeBudget],
        serving: Serving,
    ) -> Result<StagePlan, PlanError> {
        let n = layout.layer_bytes.len();
        if nodes.is_empty() || nodes.len() > n {
            return Err(PlanError::Nodes {
                nodes: nodes.len(),
                layers: n,
            });
        }
        let k = nodes.len();
        let kv_layer = kv_bytes_per_layer_token(layout) * serving.kv_tokens as u64;
        let cost: Vec<u64> = layout.layer_bytes.iter().map(|&b| b + kv_layer).collect();
        let total_cost: u64 = cost.iter().sum();
        // fixed costs: activations everywhere, embedding first, head last
        let fixed = |i: usize| -> u64 {
            let mut f = act_bytes(layout, &serving, i + 1 == k);
            if i == 0 {
                f += layout.embed_bytes;
            }
            if i + 1 == k
                && !(k == 1
                    && layout.config.tie_word_embeddings
                    && layout.head_bytes >= layout.embed_bytes)
            {
                f += layout.head_bytes;
            }
            f
        };
        let room: Vec<u64> = (0..k)
            .map(|i| nodes[i].usable.saturating_sub(fixed(i)))
            .collect();
        let have: u64 = nodes.iter().map(|nb| nb.usable).sum();
        let need: u64 = total_cost + (0..k).map(fixed).sum::<u64>();
        let names: Vec<String> = nodes.iter().map(|nb| nb.name.clone()).collect();
        let finish = |bounds: Vec<Range<usize>>| StagePlan {
            stages: bounds
                .into_iter()
                .enumerate()
                .map(|(i, r)| stage(layout, &serving, i, nodes[i].usable, r))
                .collect(),
            names: names.clone(),
            serving,
        };
        if need > have {
            return Err(does_not_fit(layout, nodes, serving, need, have));
        }
        // proportional: node i's share of the layers' cost follows its room
        let room_sum: u64 = room.iter().sum::<u64>().max(1);
        let mut bounds = Vec::with_capacity(k);
        let mut start = 0usize;
        let mut cum = 0u128;
        let mut target = 0u128;
        for (i, &r) in room.iter().enumerate() {
            let left_nodes = k - i - 1;
            if left_nodes == 0 {
                bounds.push(start..n);
                break;
            }
            target += u128::from(total_cost) * u128::from(r) / u128::from(room_sum);
            let mut end = start + 1;
            cum += u128::from(cost[start]);
            // take the next layer while its midpoint lies within the target, leaving one each
            while end < n - left_nodes && cum + u128::from(cost[end]) / 2 <= target {
                cum += u128::from(cost[end]);
                end += 1;
            }
            bounds.push(start..end);
            start = end;
        }
        let plan = finish(bounds);
        if plan.stages.iter().all(|s| s.need() <= s.usable) {
            return Ok(plan);
        }
        // first fit in node order, leaving a layer for each node after
        let mut bounds = Vec::with_capacity(k);
        let mut start = 0usize;
        for (i, &r) in room.iter().enumerate() {
            let left_nodes = k - i - 1;
            if left_nodes == 0 {
                bounds.push(start..n);
                break;
            }
            let mut end = start + 1;
            let mut used = cost[start];
            while end < n - left_nodes && used + cost[end] <= r {
                used += cost[end];
                end += 1;
            }
            bounds.push(start..end);
            start = end;
        }
        let plan = finish(bounds);
        match plan
            .stages
            .iter()
            .enumerate()
            .find(|(_, s)| s.need() > s.usable)
        {
            None => Ok(plan),
            Some(_) => Err(does_not_fit(layout, nodes, serving, need, have)),
        }
    }

    /// The plan `split` (layers per stage, in stage order) gives on `nodes`.
    ///
    /// # Errors
    /// [`PlanError::BadSplit`] when the split does not match the model or the nodes;
    /// [`PlanError::StageTooBig`] when a stage overflows its node.
    pub fn split(
        layout: &Layout,
        nodes: &[NodeBudget],
        serving: Serving,
        split: &[usize],
    ) -> Result<StagePlan, PlanError> {
        let n = layout.layer_bytes.len();
        if split.len() != nodes.len() {
            return Err(PlanError::BadSplit(format!(
                "{} stages for {} nodes",
                split.len(),
                nodes.len()
            )));
        }
        if split.contains(&0) {
            return Err(PlanError::BadSplit(
                "every stage needs at least one layer".into(),
            ));
        }
        let sum: usize = split.iter().sum();
        if sum != n {
            return Err(PlanError::BadSplit(format!(
                "the stages hold {sum} layers, the model has {n}"
            )));
        }
        let mut start = 0;
        let mut stages = Vec::with_capacity(split.len());
        for (i, &len) in split.iter().enumerate() {
            let s = stage(layout, &serving, i, nodes[i].usable, start..start + len);
            if s.need() > s.usable {
                return Err(PlanError::StageTooBig {
                    stage: i,
                    node: nodes[i].name.clone(),
                    layers: s.layers.clone(),
                    need: s.need(),
                    have: s.usable,
                });
            }
            stages.push(s);
            start += len;
        }
        Ok(StagePlan {
            stages,
            names: nodes.iter().map(|nb| nb.name.clone()).collect(),
            serving,
        })
    }
}

fn does_not_fit(
    layout: &Layout,
    nodes: &[NodeBudget],
    serving: Serving,
    need: u64,
    have: u64,
) -> PlanError {
    let k = nodes.len();
    let weights = layout.total_bytes();
    let kv_token = kv_bytes_per_layer_token(layout) * layout.layer_bytes.len() as u64;
    let kv = kv_token * serving.kv_tokens as u64;
    let act: u64 = (0..k)
        .map(|i| act_bytes(layout, &serving, i + 1 == k))
        .sum();
    let mut hints = Vec::new();
    // what the KV would have to shrink to (ignores per-node granularity, so it is a bound)
    let spare = have.saturating_sub(weights + act);
    let positions = spare.checked_div(kv_token).unwrap_or(0);
    if positions >= serving.ctx as u64 && serving.max_seqs > 1 {
        hints.push(format!(
            "--max-seqs {} (at most) fits",
            (positions / serving.ctx as u64).max(1)
        ));
    }
    if positions >= serving.max_seqs as u64
        && positions / (serving.max_seqs as u64) < serving.ctx as u64
    {
        hints.push(format!(
            "--ctx {} (at most) fits",
            positions / serving.max_seqs as u64
        ));
    }
    if weights + act > have {
        hints.push(format!(
            "the weights alone need {} with the activations, {} more than the nodes offer: a \
             smaller quant (Q4_K is about 0.56 bytes per weight) or more nodes",
            gib(weights + act),
            gib(weights + act - have)
        ));
    }
    if need > have {
        hints.push(format!(
            "as configured it fits with another node of {} free",
            gib(need - have)
        ));
    } else {
        // enough in all, but no split in node order gives every node what it holds
        hints.push(
            "the nodes hold enough in all, but no contiguous split fits each one: --split to \
             place the layers by hand, a larger node, or fewer --ctx / --max-seqs"
                .to_string(),
        );
    }
    PlanError::DoesNotFit {
        need,
        weights,
        kv,
        act,
        have,
        serving,
        hints,
    }
}

impl fmt::Display for StagePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // as wide as the longest node name (an IPv6 address with its scope is)
        let w = self
            .names
            .iter()
            .map(|n| n.len())
            .max()
            .unwrap_or(0)
            .max(24);
        writeln!(
            f,
            "{:<6} {:<w$} {:>10} {:>11} {:>11} {:>11} {:>11}",
            "stage", "node", "layers", "weights", "kv cache", "activations", "usable"
        )?;
        for (i, s) in self.stages.iter().enumerate() {
            writeln!(
                f,
                "{:<6} {:<w$} {:>10} {:>11} {:>11} {:>11} {:>11}",
                i,
                self.names[s.node],
                format!("{}..{}", s.layers.start, s.layers.end),
                gib(s.weight_bytes),
                gib(s.kv_bytes),
                gib(s.act_bytes),
                gib(s.usable)
            )?;
        }
        write!(
            f,
            "KV capacity: {} positions ({} sequences of up to {})",
            self.serving.kv_tokens, self.serving.max_seqs, self.serving.ctx
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::config::{Architecture, ModelConfig, RopeStyle};
    use proptest::prelude::*;

    fn layout(layers: Vec<u64>, embed: u64, head: u64) -> Layout {
        Layout {
            config: ModelConfig {
                architecture: Architecture::Llama,
                vocab_size: 1000,
                hidden_size: 64,
                intermediate_size: 128,
                num_layers: layers.len(),
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
                rope_style: RopeStyle::Interleaved,
                max_position_embeddings: 4096,
                tie_word_embeddings: false,
                attention_bias: false,
                moe: None,
                eos_token_ids: vec![],
            },
            layer_reads: layers
                .iter()
                .map(|&b| vec![("q4_k".to_string(), b)])
                .collect(),
            layer_expert_reads: vec![Vec::new(); layers.len()],
            layer_matrices: vec![vec![("q4_k".to_string(), 7)]; layers.len()],
            layer_expert_matrices: vec![Vec::new(); layers.len()],
            layer_bytes: layers,
            embed_bytes: embed,
            head_bytes: head,
            head_reads: vec![("q6_k".to_string(), head)],
            head_matrices: vec![("q6_k".to_string(), 1)],
        }
    }

    fn serving() -> Serving {
        Serving::new(256, 4, 64)
    }

    proptest! {
        #[test]
        fn a_plan_covers_every_layer_once_and_fits(
            layers in proptest::collection::vec(1u64 << 20..64 << 20, 1..40),
            mems in proptest::collection::vec(64u64 << 20..4 << 30, 1..6),
        ) {
            let l = layout(layers.clone(), 8 << 20, 8 << 20);
            let nodes: Vec<NodeBudget> = mems.iter().enumerate()
                .map(|(i, &m)| NodeBudget { name: format!("n{i}"), usable: m }).collect();
            match StagePlan::place(&l, &nodes, serving()) {
                Ok(p) => {
                    prop_assert_eq!(p.stages.len(), nodes.len());
                    let mut next = 0;
                    for (i, s) in p.stages.iter().enumerate() {
                        prop_assert_eq!(s.node, i);
                        prop_assert_eq!(s.layers.start, next);
                        prop_assert!(!s.layers.is_empty());
                        prop_assert!(s.need() <= s.usable, "stage {} needs {} of {}", i, s.need(), s.usable);
                        next = s.layers.end;
                    }
                    prop_assert_eq!(next, layers.len());
                    let w: u64 = p.stages.iter().map(|s| s.weight_bytes).sum();
                    prop_assert_eq!(w, l.total_bytes());
                }
                Err(PlanError::Nodes { .. }) => prop_assert!(nodes.len() > layers.len()),
                Err(PlanError::DoesNotFit { need, have, hints, .. }) => {
                    // either short in all, or no contiguous split fits: then check exhaustively
                    // for two nodes that none does
                    prop_assert!(!hints.is_empty());
                    if need <= have && nodes.len() == 2 {
                        for cut in 1..layers.len() {
                            let s = StagePlan::split(&l, &nodes, serving(), &[cut, layers.len() - cut]);
                            prop_assert!(s.is_err(), "split at {} fits but place refused", cut);
                        }
                    }
                }
                Err(e) => prop_assert!(false, "unexpected {}", e),
            }
        }

        #[test]
        fn equal_nodes_get_balanced_layers(n in 2usize..5, per in 2usize..8) {
            let l = layout(vec![10 << 20; n * per], 1 << 20, 1 << 20);
            let nodes: Vec<NodeBudget> = (0..n).map(|i| NodeBudget { name: format!("n{i}"), usable: 8 << 30 }).collect();
            let p = StagePlan::place(&l, &nodes, serving()).unwrap();
            for s in &p.stages {
                prop_assert!((s.layers.len() as i64 - per as i64).abs() <= 1, "{:?}", p.stages);
            }
        }
    }

    #[test]
    fn the_table_widens_for_a_long_node_name() {
        let l = layout(vec![10 << 20; 4], 1 << 20, 1 << 20);
        let nodes =
            ["head (vm)", "[fe80::fc:ff:fe00:1%4]:17471", "10.0.0.7:7471"].map(|n| NodeBudget {
                name: n.into(),
                usable: 1 << 30,
            });
        let text = StagePlan::place(&l, &nodes, serving()).unwrap().to_string();
        let lines: Vec<&str> = text.lines().collect();
        // header and stages: fixed columns, so one width; the names are whole
        let widths: Vec<usize> = lines[..lines.len() - 1]
            .iter()
            .map(|l| l.chars().count())
            .collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{text}");
        assert!(text.contains("[fe80::fc:ff:fe00:1%4]:17471 "), "{text}");
    }

    #[test]
    fn more_memory_gets_more_layers() {
        let l = layout(vec![100 << 20; 12], 1 << 20, 1 << 20);
        let nodes = [
            NodeBudget {
                name: "big".into(),
                usable: 3 << 30,
            },
            NodeBudget {
                name: "small".into(),
                usable: 1 << 30,
            },
        ];
        let p = StagePlan::place(&l, &nodes, serving()).unwrap();
        assert!(p.stages[0].layers.len() > p.stages[1].layers.len(), "{p}");
    }

    #[test]
    fn too_big_says_by_how_much_and_what_helps() {
        let l = layout(vec![100 << 20; 8], 1 << 20, 1 << 20);
        let nodes = [NodeBudget {
            name: "a".into(),
            usable: 500 << 20,
        }];
        let e = StagePlan::place(&l, &nodes, serving())
            .unwrap_err()
            .to_string();
        assert!(e.contains("short"), "{e}");
        assert!(
            e.contains("smaller quant") && e.contains("another node"),
            "{e}"
        );
        // weights fit, the KV does not: fewer sequences help
        let s = Serving::new(32768, 64, 64);
        let nodes = [NodeBudget {
            name: "a".into(),
            usable: 4 << 30,
        }];
        let e = StagePlan::place(&l, &nodes, s).unwrap_err().to_string();
        assert!(e.contains("--max-seqs"), "{e}");
    }

    #[test]
    fn splits_are_checked() {
        let l = layout(vec![10 << 20; 8], 1 << 20, 1 << 20);
        let nodes: Vec<NodeBudget> = (0..3)
            .map(|i| NodeBudget {
                name: format!("n{i}"),
                usable: 1 << 30,
            })
            .collect();
        let p = StagePlan::split(&l, &nodes, serving(), &[3, 3, 2]).unwrap();
        assert_eq!(p.stages[2].layers, 6..8);
        assert!(StagePlan::split(&l, &nodes, serving(), &[3, 3]).is_err());
        assert!(StagePlan::split(&l, &nodes, serving(), &[3, 3, 3]).is_err());
        assert!(StagePlan::split(&l, &nodes, serving(), &[8, 0, 0]).is_err());
        let small = [
            NodeBudget {
                name: "a".into(),
                usable: 1 << 30,
            },
            NodeBudget {
                name: "b".into(),
                usable: 30 << 20,
            },
        ];
        let e = StagePlan::split(&l, &small, serving(), &[4, 4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("stage 1") && e.contains("short"), "{e}");
        assert!(p.to_string().contains("6..8"));
    }
}
