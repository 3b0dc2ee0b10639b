//! The plan's predicted decode speed ([`crate::predict`]), worked out on a thread of its own after
//! each plan is installed: the first one times the model's products and attention on this node
//! (a few seconds the supervisor and the pipeline need not wait for), the later ones reuse them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::stage_file::Layout;

use crate::head::Shared;
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
}

impl Predictor {
    /// Predicts `inputs` on a thread of its own; the result goes into `shared` if its plan still
    /// serves, and into the log.
    pub(super) fn start(&self, inputs: Inputs, shared: Arc<Mutex<Shared>>) {
        let measured = self.measured.clone();
        let spawned = std::thread::Builder::new()
            .name("sinew-predict".into())
            .spawn(move || {
                let p = predict(&measured, &inputs);
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

fn predict(
    measured: &Mutex<Option<Measured>>,
    inputs: &Inputs,
) -> Option<crate::predict::Prediction> {
    // this node's rates, measured at start (the model is timed after them, not beside them)
    let here = crate::speed::speed_wait(Duration::from_secs(60));
    let m = {
        // one thread measures; one predicting a later plan meanwhile waits for it
        let mut m = measured.lock().unwrap_or_else(|e| e.into_inner());
        if m.is_none() {
            let times = crate::speed::measure_model(&inputs.model)
                .inspect_err(|e| tracing::info!(error = %e, "the model's products not timed"))
                .ok();
            let attention_s =
                crate::speed::measure_attention(&inputs.layout.config, inputs.position)?;
            *m = Some(Measured {
                times,
                position: inputs.position,
                attention_s,
            });
        }
        m.clone()?
    };
    let timed = m.times.map(|t| Timed::new(t, &here));
    // the head's rates: those measured with its products, where they were timed
    let mut rates = vec![timed.as_ref().map_or(here, |t| t.rates.clone())];
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
