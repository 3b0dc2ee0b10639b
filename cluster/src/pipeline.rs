//! The head's scheduler: continuous batching over a pipeline of stages. It admits requests while
//! every stage's KV budget has room, forms micro-batches (decode tokens first, then prompt
//! chunks), runs stage 0 itself and hands the hidden states to stage 1; the last stage answers
//! with token ids, which this thread turns into text, stop decisions and each request's events.
//!
//! Several micro-batches are in the pipeline at once (as many as there are stages), each with
//! its own sequences — a sequence is in at most one, since its next token depends on the last —
//! so stage k works on one while stage k+1 works on another.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::{Decoder, Event, Finish, Request, Sink, Text, TokenLogprob};

use crate::io::{SharedSender, send_shared};
use crate::stage::{StageOut, StageRunner};
use crate::wire::{Batch, ChunkDesc, Hidden, HiddenData, Msg, Open, Rows, Sampled, StageTiming};

/// A pipeline the supervisor built: the head's stage and the link to stage 1.
pub struct Pipeline {
    /// The plan's number.
    pub epoch: u64,
    /// The head's stage.
    pub runner: StageRunner,
    /// Stage 1's control link (`None`: the head is the only stage).
    pub next: Option<SharedSender>,
    /// Stages in all.
    pub stages: usize,
    /// KV positions every stage can hold (the smallest stage's).
    pub capacity: usize,
}

/// What the pipeline thread is told.
pub enum Cmd {
    /// A new request.
    Submit(Box<Pending>),
    /// The last stage's (or a failing stage's) answer.
    Sampled(Sampled),
    /// A node of the plan `epoch` failed.
    NodeDown {
        /// The plan.
        epoch: u64,
        /// What happened.
        why: String,
    },
    /// Serve with this pipeline from now on.
    Install(Box<Pipeline>),
    /// Stop admitting, let running requests finish (failing them after `deadline`), then drop
    /// the pipeline and answer.
    Retire {
        /// How long running requests may take.
        deadline: Duration,
        /// Answered once retired, with the head's stage (its model may serve the next plan).
        done: std::sync::mpsc::Sender<Option<StageRunner>>,
    },
    /// End.
    Shutdown,
}

/// A request accepted by [`crate::Cluster::submit`], waiting to run.
pub struct Pending {
    pub(crate) prompt: Vec<u32>,
    pub(crate) decoder: Decoder,
    pub(crate) prompt_logprobs: Option<usize>,
    pub(crate) sink: Sink,
    pub(crate) queued_at: Instant,
}

impl Pending {
    pub(crate) fn new(req: Request, decoder: Decoder, sink: Sink) -> Self {
        Pending {
            prompt: req.prompt,
            decoder,
            prompt_logprobs: req.prompt_logprobs,
            sink,
            queued_at: Instant::now(),
        }
    }
}

struct Seq {
    p: Pending,
    reserve: usize,
    fed: usize,
    next: Option<u32>,
    opened: bool,
    in_flight: bool,
    cancelled: bool,
    prompt_lp: Vec<Option<TokenLogprob>>,
}

impl Seq {
    fn prefilling(&self) -> bool {
        self.fed < self.p.prompt.len()
    }

    fn has_work(&self) -> bool {
        !self.in_flight
            && !self.cancelled
            && (self.prefilling() || (self.next.is_some() && self.p.decoder.finish().is_none()))
    }
}

/// One stage's counters: its step time and the activation bytes it sent on.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageStats {
    /// Micro-batches it ran.
    pub steps: u64,
    /// Its step time, a moving average over recent micro-batches, milliseconds.
    pub step_ms: f64,
    /// Hidden-state bytes it sent to the next stage since the plan began.
    pub sent_bytes: u64,
}

/// Counters the pipeline publishes.
#[derive(Clone, Debug, Default)]
pub struct PipelineStats {
    /// Requests running.
    pub running: usize,
    /// Requests waiting.
    pub queued: usize,
    /// KV positions reserved.
    pub kv_used_tokens: usize,
    /// KV positions of the smallest stage.
    pub kv_capacity_tokens: usize,
    /// Micro-batches run.
    pub batches: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Tokens generated per second over the last few seconds.
    pub tokens_per_s: f64,
    /// Per stage, in stage order.
    pub stages: Vec<StageStats>,
    /// Whether a pipeline serves.
    pub serving: bool,
    /// Why not, when it does not.
    pub degraded: Option<String>,
}

/// Batching settings.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Sequences running at once.
    pub max_seqs: usize,
    /// Prompt positions of one sequence per micro-batch.
    pub prefill_chunk: usize,
    /// Rows per micro-batch.
    pub max_step_tokens: usize,
    /// Requests waiting at most.
    pub max_queue: usize,
    /// How long a request may wait for a pipeline (while the cluster is degraded) or for room.
    pub queue_timeout: Duration,
}

pub(crate) struct Core {
    text: Arc<Text>,
    opts: BatchOptions,
    pipe: Option<Pipeline>,
    waiting: VecDeque<Pending>,
    running: HashMap<u64, Seq>,
    /// Batch id → (sequence, rows) in it.
    in_flight: HashMap<u64, Vec<(u64, usize)>>,
    releases: Vec<u64>,
    used: usize,
    next_seq: u64,
    next_batch: u64,
    retiring: Option<(Instant, std::sync::mpsc::Sender<Option<StageRunner>>)>,
    /// The head's stage of a pipeline that failed, for the next plan.
    retired: Option<StageRunner>,
    stats: Arc<Mutex<PipelineStats>>,
    batches: u64,
    generated: u64,
    degraded: Option<String>,
    /// (when, tokens generated by then), for the rate.
    rate: VecDeque<(Instant, u64)>,
    stage_stats: Vec<StageStats>,
}

/// The window of [`PipelineStats::tokens_per_s`].
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// How long a micro-batch may be in the pipeline before the pipeline counts as failed (the
/// heartbeats notice a dead node sooner; this bounds a live node that lost a batch).
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

impl Core {
    pub(crate) fn new(
        text: Arc<Text>,
        opts: BatchOptions,
        stats: Arc<Mutex<PipelineStats>>,
    ) -> Self {
        Core {
            text,
            opts,
            pipe: None,
            waiting: VecDeque::new(),
            running: HashMap::new(),
            in_flight: HashMap::new(),
            releases: Vec::new(),
            used: 0,
            next_seq: 1,
            next_batch: 1,
            retiring: None,
            retired: None,
            stats,
            batches: 0,
            generated: 0,
            degraded: Some("loading".into()),
            rate: VecDeque::new(),
            stage_stats: Vec::new(),
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Cmd>) {
        let mut oldest_in_flight: Option<Instant> = None;
        let mut wait = Duration::ZERO;
        loop {
            let first = match rx.recv_timeout(wait) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            for c in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                if !self.command(c) {
                    self.fail_all("the cluster shut down");
                    return;
                }
            }
            self.expire_waiting();
            self.drop_cancelled();
            self.check_retire();
            if self.retiring.is_none() {
                self.admit();
            }
            // at most one micro-batch per free slot, then back to the commands: new requests,
            // cancellations and results are taken between steps (on a single node every step
            // completes at once and the slot is free again)
            let mut launched = false;
            for _ in 0..self.depth() {
                if self.pipe.is_none() || self.in_flight.len() >= self.depth() || !self.launch() {
                    break;
                }
                launched = true;
            }
            // nothing more to start: sleep until a result or a request comes (or a cancellation
            // or a queue deadline needs a look)
            wait = if launched {
                Duration::ZERO
            } else if self.in_flight.is_empty() {
                Duration::from_millis(250)
            } else {
                Duration::from_millis(20)
            };
            if self.in_flight.is_empty() {
                oldest_in_flight = None;
            } else {
                let t = *oldest_in_flight.get_or_insert_with(Instant::now);
                if t.elapsed() > BATCH_TIMEOUT {
                    self.node_down(None, "a micro-batch got no answer within 30 s");
                    oldest_in_flight = None;
                }
            }
            self.publish();
        }
    }

    fn depth(&self) -> usize {
        self.pipe.as_ref().map_or(1, |p| p.stages)
    }

    fn publish(&mut self) {
        let now = Instant::now();
        if self
            .rate
            .back()
            .is_none_or(|b| now.duration_since(b.0) > Duration::from_millis(100))
        {
            self.rate.push_back((now, self.generated));
        }
        while self
            .rate
            .front()
            .is_some_and(|f| now.duration_since(f.0) > RATE_WINDOW)
        {
            self.rate.pop_front();
        }
        let tokens_per_s = match self.rate.front() {
            Some(&(t, n)) if now.duration_since(t) > Duration::from_millis(500) => {
                (self.generated - n) as f64 / now.duration_since(t).as_secs_f64()
            }
            _ => 0.0,
        };
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        *s = PipelineStats {
            running: self.running.len(),
            queued: self.waiting.len(),
            kv_used_tokens: self.used,
            kv_capacity_tokens: self.pipe.as_ref().map_or(0, |p| p.capacity),
            batches: self.batches,
            generated_tokens: self.generated,
            tokens_per_s,
            stages: self.stage_stats.clone(),
            serving: self.pipe.is_some() && self.retiring.is_none(),
            degraded: self.degraded.clone(),
        };
    }

    /// Handles a command; `false` to stop.
    fn command(&mut self, c: Cmd) -> bool {
        match c {
            Cmd::Submit(p) => {
                if self.waiting.len() >= self.opts.max_queue {
                    p.sink.send(Event::Error(engine::Error::QueueFull));
                } else {
                    self.waiting.push_back(*p);
                }
            }
            Cmd::Sampled(s) => self.sampled(s),
            Cmd::NodeDown { epoch, why } => {
                if self.pipe.as_ref().is_some_and(|p| p.epoch == epoch) {
                    self.node_down(Some(epoch), &why);
                } else if self.pipe.is_none() {
                    // no plan serves: say why
                    self.degraded = Some(why);
                }
            }
            Cmd::Install(p) => {
                self.fail_running("the cluster changed its plan");
                self.used = 0;
                self.degraded = None;
                tracing::info!(
                    epoch = p.epoch,
                    stages = p.stages,
                    capacity = p.capacity,
                    "serving"
                );
                self.pipe = Some(*p);
            }
            Cmd::Retire { deadline, done } => {
                self.retiring = Some((Instant::now() + deadline, done));
                self.check_retire();
            }
            Cmd::Shutdown => return false,
        }
        true
    }

    fn check_retire(&mut self) {
        let Some((deadline, _)) = &self.retiring else {
            return;
        };
        let overdue = Instant::now() >= *deadline;
        if !self.running.is_empty() && !overdue {
            return;
        }
        if overdue {
            self.fail_running("the cluster changed its plan");
        }
        let (_, done) = self.retiring.take().expect("checked");
        let runner = self
            .pipe
            .take()
            .map(|p| p.runner)
            .or_else(|| self.retired.take());
        self.degraded = Some("changing the plan".into());
        let _ = done.send(runner);
    }

    fn node_down(&mut self, _epoch: Option<u64>, why: &str) {
        tracing::warn!(%why, "a stage failed: requests in flight end with an error");
        self.fail_running(&format!("a pipeline stage failed: {why}"));
        if let Some(mut p) = self.pipe.take() {
            p.runner.clear();
            self.retired = Some(p.runner);
        }
        self.degraded = Some(why.to_string());
    }

    fn fail_running(&mut self, why: &str) {
        for (_, s) in self.running.drain() {
            s.p.sink
                .send(Event::Error(engine::Error::Request(why.to_string())));
        }
        self.in_flight.clear();
        self.releases.clear();
        self.used = 0;
        if let Some(p) = self.pipe.as_mut() {
            p.runner.clear();
        }
    }

    fn fail_all(&mut self, why: &str) {
        self.fail_running(why);
        for p in self.waiting.drain(..) {
            p.sink
                .send(Event::Error(engine::Error::Request(why.to_string())));
        }
    }

    fn expire_waiting(&mut self) {
        let t = self.opts.queue_timeout;
        let degraded = self.degraded.clone();
        self.waiting.retain(|p| {
            if p.sink.cancelled() {
                return false;
            }
            if p.queued_at.elapsed() > t {
                let why = match &degraded {
                    Some(d) => format!("no pipeline within {t:?}: {d}"),
                    None => format!("no room for the request within {t:?}"),
                };
                p.sink.send(Event::Error(engine::Error::Request(why)));
                return false;
            }
            true
        });
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .running
            .iter_mut()
            .filter_map(|(id, s)| {
                if s.p.sink.cancelled() {
                    s.cancelled = true;
                }
                (s.cancelled && !s.in_flight).then_some(*id)
            })
            .collect();
        for id in gone {
            self.finish_seq(id);
        }
    }

    /// Removes a sequence and frees its positions everywhere.
    fn finish_seq(&mut self, id: u64) {
        self.take_seq(id);
    }

    /// Removes a sequence, frees its positions everywhere, and hands it back.
    fn take_seq(&mut self, id: u64) -> Option<Seq> {
        let s = self.running.remove(&id)?;
        self.used -= s.reserve;
        if s.opened {
            self.releases.push(id);
        }
        if let Some(p) = self.pipe.as_mut() {
            p.runner.release(&[id]);
        }
        Some(s)
    }

    fn admit(&mut self) {
        let Some(pipe) = &self.pipe else { return };
        let cap = pipe.capacity;
        while self.running.len() < self.opts.max_seqs {
            let Some(p) = self.waiting.front() else { break };
            let reserve = p.decoder.positions_needed();
            if reserve > cap {
                let p = self.waiting.pop_front().expect("looked at");
                p.sink.send(Event::Error(engine::Error::ContextLength {
                    ctx: cap,
                    requested: reserve,
                }));
                continue;
            }
            if self.used + reserve > cap {
                break;
            }
            let p = self.waiting.pop_front().expect("looked at");
            self.used += reserve;
            let id = self.next_seq;
            self.next_seq += 1;
            let lp = if p.prompt_logprobs.is_some() {
                vec![None]
            } else {
                Vec::new()
            };
            self.running.insert(
                id,
                Seq {
                    p,
                    reserve,
                    fed: 0,
                    next: None,
                    opened: false,
                    in_flight: false,
                    cancelled: false,
                    prompt_lp: lp,
                },
            );
        }
    }

    /// Forms and starts one micro-batch; `false` when there is nothing to start.
    fn launch(&mut self) -> bool {
        let depth = self.depth();
        let active = self.running.len();
        let per_batch = active.div_ceil(depth).max(1);
        let mut ids: Vec<u64> = self
            .running
            .iter()
            .filter(|(_, s)| s.has_work())
            .map(|(id, _)| *id)
            .collect();
        // decodes first, oldest first
        ids.sort_by_key(|id| (self.running[id].prefilling(), *id));
        let mut budget = self.opts.max_step_tokens;
        let mut chunks = Vec::new();
        let mut tokens = Vec::new();
        let mut members = Vec::new();
        for id in ids.into_iter().take(per_batch) {
            if budget == 0 {
                break;
            }
            let s = self.running.get_mut(&id).expect("listed");
            let (rows, logits, sample) = if s.prefilling() {
                let n = (s.p.prompt.len() - s.fed)
                    .min(self.opts.prefill_chunk)
                    .min(budget);
                let ends = s.fed + n == s.p.prompt.len();
                let sample = ends && s.p.decoder.finish().is_none();
                let logits = if s.p.prompt_logprobs.is_some() {
                    Rows::All
                } else if sample {
                    Rows::Last
                } else {
                    Rows::Skip
                };
                tokens.extend_from_slice(&s.p.prompt[s.fed..s.fed + n]);
                (n, logits, sample)
            } else {
                tokens.push(s.next.expect("has work"));
                (1, Rows::Last, true)
            };
            budget -= rows;
            let open = (!s.opened).then(|| {
                let params = s.p.decoder.params();
                Open {
                    reserve: s.reserve as u32,
                    sampling: params.sampling.clone(),
                    logprobs: params.logprobs.map(|n| n as u8),
                    prompt_logprobs: s.p.prompt_logprobs.map(|n| n as u8),
                    prompt: s.p.prompt.clone(),
                }
            });
            s.opened = true;
            s.in_flight = true;
            chunks.push(ChunkDesc {
                seq: id,
                pos: s.fed as u32
                    + if s.prefilling() {
                        0
                    } else {
                        s.p.decoder.tokens().len() as u32 - 1
                    },
                rows: rows as u32,
                logits,
                sample,
                open,
            });
            members.push((id, rows));
        }
        let releases = std::mem::take(&mut self.releases);
        if chunks.is_empty()
            && (releases.is_empty() || self.pipe.as_ref().is_some_and(|p| p.next.is_none()))
        {
            return false;
        }
        let pipe = self.pipe.as_mut().expect("launch needs a pipeline");
        let id = self.next_batch;
        self.next_batch += 1;
        let mut batch = Batch {
            id,
            epoch: pipe.epoch,
            releases,
            chunks,
            timings: Vec::new(),
            hidden: Hidden {
                width: 0,
                data: HiddenData::F32(Vec::new()),
            },
        };
        self.batches += 1;
        let started = Instant::now();
        let out = pipe.runner.run(&mut batch, Some(&tokens));
        let step_us = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        match out {
            Ok(StageOut::Sampled(results)) => {
                self.in_flight.insert(id, members);
                self.sampled(Sampled {
                    id,
                    results,
                    timings: vec![StageTiming {
                        step_us,
                        sent_bytes: 0,
                    }],
                });
            }
            Ok(StageOut::Hidden(h)) => {
                batch.timings.push(StageTiming {
                    step_us,
                    sent_bytes: crate::worker::hidden_bytes(&h),
                });
                batch.hidden = h;
                let next = pipe
                    .next
                    .clone()
                    .expect("a stage that is not the last has a next");
                let epoch = pipe.epoch;
                self.in_flight.insert(id, members);
                if let Err(e) = send_shared(&next, &Msg::Batch(batch)) {
                    self.node_down(Some(epoch), &format!("stage 1 is unreachable: {e}"));
                }
            }
            Err(e) => {
                let why = e.to_string();
                for (sid, _) in members {
                    if let Some(s) = self.running.get_mut(&sid) {
                        s.in_flight = false;
                        s.p.sink.send(Event::Error(engine::Error::Request(format!(
                            "stage 0 failed: {why}"
                        ))));
                    }
                    self.finish_seq(sid);
                }
            }
        }
        true
    }

    fn sampled(&mut self, s: Sampled) {
        let Some(members) = self.in_flight.remove(&s.id) else {
            return;
        };
        for (k, t) in s.timings.iter().enumerate() {
            if self.stage_stats.len() <= k {
                self.stage_stats.resize(k + 1, StageStats::default());
            }
            let st = &mut self.stage_stats[k];
            let ms = f64::from(t.step_us) / 1000.0;
            st.step_ms = if st.steps == 0 {
                ms
            } else {
                0.9 * st.step_ms + 0.1 * ms
            };
            st.steps += 1;
            st.sent_bytes += u64::from(t.sent_bytes);
        }
        let mut results: HashMap<u64, crate::wire::SeqResult> =
            s.results.into_iter().map(|r| (r.seq, r)).collect();
        for (id, rows) in members {
            let Some(seq) = self.running.get_mut(&id) else {
                continue;
            };
            seq.in_flight = false;
            if seq.cancelled {
                self.finish_seq(id);
                continue;
            }
            let Some(r) = results.remove(&id) else {
                seq.p.sink.send(Event::Error(engine::Error::Request(
                    "the last stage sent no result for the request".into(),
                )));
                self.finish_seq(id);
                continue;
            };
            if let Some(e) = r.error {
                seq.p.sink.send(Event::Error(engine::Error::Request(e)));
                self.finish_seq(id);
                continue;
            }
            match advance(&self.text, seq, rows, r.token, r.logprob, r.prompt_logprobs) {
                Ok((n, finish)) => {
                    self.generated += n as u64;
                    // free first, then tell the client
                    if let Some(f) = finish
                        && let Some(s) = self.take_seq(id)
                    {
                        s.p.sink.send(Event::Finished {
                            finish: f,
                            prompt_tokens: s.p.prompt.len(),
                            completion_tokens: s.p.decoder.tokens().len(),
                        });
                    }
                }
                Err(e) => {
                    seq.p.sink.send(Event::Error(e));
                    self.finish_seq(id);
                }
            }
        }
    }
}

/// Applies a chunk's result to its sequence: prompt logprobs, then the sampled token. Returns
/// the tokens generated (0 or 1) and why the request finished, if it did.
fn advance(
    text: &Text,
    s: &mut Seq,
    rows: usize,
    token: Option<u32>,
    logprob: Option<TokenLogprob>,
    prompt_lp: Vec<TokenLogprob>,
) -> engine::Result<(usize, Option<Finish>)> {
    if s.prefilling() {
        s.fed += rows;
        if s.p.prompt_logprobs.is_some() {
            s.prompt_lp.extend(prompt_lp.into_iter().map(Some));
            if !s.prefilling() {
                let lp = std::mem::take(&mut s.prompt_lp);
                s.p.sink.send(Event::PromptLogprobs(lp));
            }
        }
        if s.prefilling() {
            return Ok((0, None));
        }
        if let Some(f) = s.p.decoder.finish() {
            return Ok((0, Some(f)));
        }
    }
    let Some(token) = token else {
        return Err(engine::Error::Request(
            "the last stage sent no token where one was due".into(),
        ));
    };
    let out = s.p.decoder.accept(text, token, logprob)?;
    s.next = Some(out.token);
    let finish = out.finish;
    s.p.sink.send(Event::Token(out));
    Ok((1, finish))
}
