//! The plan's predicted decode speed ([`crate::predict`]), worked out on a thread of its own after
//! each plan is installed. The first one times the model's products and attention on this node —
//! a few seconds of the cores the pipeline computes on, so only while no request runs: a request
//! that arrives meanwhile stops the timing, which starts again at the next idle moment. The later
//! ones reuse those times.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::stage_file::Layout;

use crate::head::Shared;
use crate::pipeline::PipelineStats;
use crate::plan::StagePlan;
use crate::predict::{LinkSpeed, Timed, Workload};
use crate::speed::ModelTimes;
use crate::wire::Rate;

/// What the first prediction measured on this node, kept for the later ones.
#[derive(Clone)]
struct Measured {
    times: Option<ModelTimes>,
    position: usize,
    attention_s: f64,
}

/// Works out predictions in the background, measuring the model once.
#[derive(Default)]
pub(super) struct Predictor {
    measured: Arc<Mutex<Option<Measured>>>,
}

/// A plan to predict, with what the supervisor knows of its nodes.
pub(super) struct Inputs {
    /// The model file (for timing its products).
    pub(super) model: PathBuf,
    pub(super) layout: Layout,
    pub(super) plan: StagePlan,
    /// The rates of the nodes of stages 1.. (the head, stage 0, uses its own).
    pub(super) worker_rates: Vec<Vec<Rate>>,
    pub(super) links: Vec<LinkSpeed>,
    pub(super) hidden_bytes: u64,
    pub(super) seqs: usize,
    pub(super) position: usize,
    /// The plan's epoch: a prediction for a plan since replaced is dropped.
    pub(super) epoch: u64,
    /// The pipeline's counters: whether requests run.
    pub(super) stats: Arc<Mutex<PipelineStats>>,
}

impl Predictor {
    /// Predicts `inputs` on a thread of its own; the result goes into `shared` if its plan still
    /// serves, and into the log.
    pub(super) fn start(&self, inputs: Inputs, shared: Arc<Mutex<Shared>>) {
        let measured = self.measured.clone();
        let spawned = std::thread::Builder::new()
            .name("sinew-predict".into())
            .spawn(move || {
                let p = predict(&measured, &inputs, &shared);
                if let Some(p) = &p {
                    tracing::info!(
                        single = format!("{:.1}", p.single_tokens_per_s),
                        aggregate = format!("{:.1}", p.aggregate_tokens_per_s),
                        seqs = p.seqs,
                        position = p.position,
                        "predicted decode tok/s"
                    );
                }
                let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
                if sh.epoch == inputs.epoch {
                    sh.prediction = p;
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to predict the plan's speed on");
        }
    }
}

/// Whether the pipeline serves with nothing running or queued.
fn idle(stats: &Mutex<PipelineStats>) -> bool {
    let s = stats.lock().unwrap_or_else(|e| e.into_inner());
    s.serving && s.running == 0 && s.queued == 0
}

/// This node's measurements for `inputs`, made once (while idle, as often as requests stop
/// them), then kept; `None` once `inputs`' plan no longer serves, or for a model without
/// attention heads.
fn measure(
    measured: &Mutex<Option<Measured>>,
    inputs: &Inputs,
    shared: &Mutex<Shared>,
) -> Option<Measured> {
    let current = || shared.lock().unwrap_or_else(|e| e.into_inner()).epoch == inputs.epoch;
    // one thread measures; one predicting a later plan meanwhile waits for it
    let mut m = measured.lock().unwrap_or_else(|e| e.into_inner());
    while m.is_none() {
        if !current() {
            return None;
        }
        if !idle(&inputs.stats) {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let busy = || !idle(&inputs.stats);
        let times = match crate::speed::measure_model(&inputs.model, &busy) {
            Ok(t) => Some(t),
            Err(crate::speed::TimingError::Stopped) => continue,
            Err(e) => {
                tracing::info!(error = %e, "the model's products not timed");
                None
            }
        };
        let attention_s = crate::speed::measure_attention(&inputs.layout.config, inputs.position)?;
        if busy() {
            continue;
        }
        *m = Some(Measured {
            times,
            position: inputs.position,
            attention_s,
        });
    }
    m.clone()
}

fn predict(
    measured: &Mutex<Option<Measured>>,
    inputs: &Inputs,
    shared: &Mutex<Shared>,
) -> Option<crate::predict::Prediction> {
    let m = measure(measured, inputs, shared)?;
    let timed = m.times.map(|t| Timed::new(t, &crate::speed::speed_now()));
    // the head's rates: those measured with its products; where they could not be timed, its
    // rates measured on their own
    let head = match &timed {
        Some(t) => t.rates.clone(),
        None => crate::speed::speed_wait(Duration::from_secs(60)),
    };
    shared.lock().unwrap_or_else(|e| e.into_inner()).nodes[0].speed = head.clone();
    let mut rates = vec![head];
    rates.extend(inputs.worker_rates.iter().cloned());
    let work = Workload {
        hidden_bytes: inputs.hidden_bytes,
        seqs: inputs.seqs,
        position: m.position,
        attention_s: m.attention_s,
        timed,
    };
    crate::predict::predict(&inputs.layout, &inputs.plan, &rates, &inputs.links, &work)
}
