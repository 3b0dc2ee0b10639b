//! The head's supervisor thread: it connects to the workers (retrying the ones not up), places
//! the layers, has each worker load its range (sending stage files to those without the model),
//! loads the head's own range and installs the pipeline; it pings every worker and re-plans when
//! one fails or comes back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::stage_file::Layout;
use engine::{LoadOptions, Loaded};
use sha2::{Digest, Sha256};
use transport::Deadline;

use crate::error::{Error, Result};
use crate::head::{ClusterOptions, NodeState, Shared};
use crate::io::{SharedSender, send_shared};
use crate::node::{self, hex};
use crate::pipeline::{Cmd, Pipeline};
use crate::plan::{NodeBudget, Serving, StagePlan};
use crate::stage::StageRunner;
use crate::wire::{Advert, Assign, Hash, Msg};

mod join;
mod members;
mod prediction;
mod watch;

/// Bytes per weights message.
const CHUNK: usize = 4 << 20;
/// How long joins under way may hold a plan up.
const JOIN_HOLD: Duration = Duration::from_secs(3);

/// What a worker's reader tells the supervisor.
enum SupEv {
    Msg {
        member: usize,
        generation: u64,
        msg: Msg,
    },
    Gone {
        member: usize,
        generation: u64,
        why: String,
    },
    /// Discovery heard something.
    Heard(crate::discovery::Heard),
    /// A join attempt at `addr` ended.
    Joined {
        member: usize,
        addr: String,
        result: Box<Result<join::Handshaken>>,
    },
}

/// A connected worker.
struct Up {
    generation: u64,
    tx: SharedSender,
    advert: Advert,
    alive: Arc<AtomicBool>,
    /// The link from the head, measured at join.
    report: crate::wire::LinkReport,
    /// Probe answers and link samples, from the reader.
    samples: Receiver<Msg>,
    /// Set while the head's own probe fills the link: pongs may queue behind it, so the reader
    /// waits on (the probe has deadlines of its own).
    probing: Arc<AtomicBool>,
    /// The head's address on this link (what the worker's next stage dials when it runs beside
    /// the head: [`crate::addr::next_for`]).
    local: Option<std::net::SocketAddr>,
}

struct Member {
    addr: String,
    up: Option<Up>,
    last_try: Option<Instant>,
    last_error: Option<String>,
    /// Found by discovery.
    discovered: bool,
    /// Its last announcement (discovered members).
    last_heard: Instant,
    /// A join attempt runs (on its own thread).
    joining: bool,
    /// Left the state: discovered, then down and silent past `forget_after`.
    forgotten: bool,
    /// Left the state: discovered, but a worker that serves this head through another member
    /// (listed in `--workers` under another address); tried again when another process announces.
    duplicate: bool,
    /// Left out of plans until then: a link to it no longer usable.
    benched_until: Option<Instant>,
    /// The process that announced it (node id and instance), heard perhaps at several addresses.
    announced: Option<(String, u64)>,
    /// The addresses that process announced from, in the order heard: tried in turn while the
    /// one in use does not connect.
    heard_at: Vec<String>,
}

impl Member {
    fn new(addr: String, discovered: bool) -> Self {
        Member {
            addr,
            up: None,
            last_try: None,
            last_error: None,
            discovered,
            last_heard: Instant::now(),
            joining: false,
            forgotten: false,
            duplicate: false,
            benched_until: None,
            announced: None,
            heard_at: Vec::new(),
        }
    }
}

pub(crate) struct Supervisor {
    opts: ClusterOptions,
    ctx: usize,
    cmd: Sender<Cmd>,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    members: Vec<Member>,
    ev_tx: Sender<SupEv>,
    ev_rx: Receiver<SupEv>,
    generation: u64,
    head_id: u64,
    /// Members in the serving plan, and its epoch.
    plan: Option<(Vec<usize>, u64)>,
    /// The head's stage, kept between plans.
    held: Option<StageRunner>,
    model_hash: Option<Hash>,
    layout: Option<Layout>,
    /// Works out each plan's predicted speed in the background.
    predictor: prediction::Predictor,
    /// The plan last predicted, with its epoch, for predicting it again.
    planned: Option<(u64, StagePlan)>,
    /// Whether membership changed since the last plan.
    dirty: bool,
    retry_plan_at: Option<Instant>,
    stats: Arc<Mutex<crate::pipeline::PipelineStats>>,
    watch: watch::Watch,
    /// Since when joins under way have held a plan up.
    hold_since: Option<Instant>,
    /// When a refusal was last logged (milliseconds since the epoch): a flood from many
    /// sources logs a line a second.
    refusal_logged_ms: std::sync::atomic::AtomicU64,
}

impl Supervisor {
    pub(crate) fn new(
        opts: ClusterOptions,
        ctx: usize,
        cmd: Sender<Cmd>,
        shared: Arc<Mutex<Shared>>,
        stop: Arc<AtomicBool>,
        stats: Arc<Mutex<crate::pipeline::PipelineStats>>,
    ) -> Result<Self> {
        let (ev_tx, ev_rx) = mpsc::channel();
        let members = opts
            .workers
            .iter()
            .map(|a| Member::new(a.clone(), false))
            .collect();
        // discovery listens from the start; a port it cannot have is an error, not silence
        if let Some(port) = opts.ops.discover {
            let ev = Mutex::new(ev_tx.clone());
            crate::discovery::listen(opts.link.key.clone(), port, stop.clone(), move |h| {
                let _ = ev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(SupEv::Heard(h));
            })
            .map_err(|e| Error::io(format!("discovery on UDP port {port}"), e))?;
            tracing::info!(port, "discovering workers");
        }
        Ok(Supervisor {
            opts,
            ctx,
            cmd,
            shared,
            stop,
            members,
            ev_tx,
            ev_rx,
            generation: 0,
            head_id: random_u64(),
            plan: None,
            held: None,
            model_hash: None,
            layout: None,
            predictor: prediction::Predictor::default(),
            planned: None,
            dirty: true,
            retry_plan_at: None,
            stats,
            watch: watch::Watch::default(),
            refusal_logged_ms: std::sync::atomic::AtomicU64::new(0),
            hold_since: None,
        })
    }

    pub(crate) fn run(mut self) {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            self.connect_missing();
            while let Ok(ev) = self.ev_rx.try_recv() {
                self.event(ev);
            }
            self.forget_departed();
            self.unbench();
            let retry_due = self.retry_plan_at.is_some_and(|t| Instant::now() >= t);
            // joins under way end first (a plan with the workers that answer, not one without
            // them and another a moment later), but a slow one holds a plan up JOIN_HOLD at most
            let holding = if self.members.iter().any(|m| m.joining) {
                self.hold_since.get_or_insert_with(Instant::now).elapsed() < JOIN_HOLD
            } else {
                self.hold_since = None;
                false
            };
            if (self.dirty || retry_due) && !holding {
                self.dirty = false;
                self.retry_plan_at = None;
                if let Err(e) = self.replan() {
                    tracing::error!(error = %e, "no plan serves; waiting for nodes");
                    self.set_degraded(&e.to_string());
                    self.retry_plan_at = Some(Instant::now() + Duration::from_secs(5));
                }
            }
            if !self.dirty {
                self.watch_links();
            }
            match self.ev_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(ev) => self.event(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn set_degraded(&self, why: &str) {
        let _ = self.cmd.send(Cmd::NodeDown {
            epoch: self.plan.as_ref().map_or(0, |p| p.1),
            why: why.to_string(),
        });
    }

    fn event(&mut self, ev: SupEv) {
        match ev {
            SupEv::Heard(h) => self.heard(h),
            SupEv::Joined {
                member,
                addr,
                result,
            } => self.joined(member, addr, *result),
            SupEv::Gone {
                member,
                generation,
                why,
            } => {
                let m = &mut self.members[member];
                if m.up.as_ref().is_none_or(|u| u.generation != generation) {
                    return;
                }
                if let Some(u) = m.up.take() {
                    u.alive.store(false, Ordering::Release);
                }
                tracing::warn!(worker = %m.addr, %why, "worker lost");
                m.last_error = Some(why.clone());
                m.last_try = Some(Instant::now());
                self.update_node(member, |n| {
                    n.up = false;
                    n.error = Some(why.clone());
                    n.rtt_us = None;
                });
                self.check_duplicates();
                if let Some((members, epoch)) = &self.plan
                    && members.contains(&member)
                {
                    let _ = self.cmd.send(Cmd::NodeDown {
                        epoch: *epoch,
                        why: format!("worker {} failed: {why}", self.members[member].addr),
                    });
                    self.plan = None;
                }
                self.dirty = true;
            }
            SupEv::Msg {
                member,
                generation,
                msg,
            } => {
                if self.members[member]
                    .up
                    .as_ref()
                    .is_none_or(|u| u.generation != generation)
                {
                    return;
                }
                match msg {
                    Msg::StageError(e) => {
                        tracing::error!(worker = %self.members[member].addr, error = %e, "stage error")
                    }
                    Msg::Rates(rates) => self.rates_arrived(member, rates),
                    other => tracing::debug!("unexpected message from a worker: {other:?}"),
                }
            }
        }
    }

    /// A worker's kernel rates, measured after it joined: kept, shown, and the plan that holds
    /// it predicted again.
    fn rates_arrived(&mut self, member: usize, rates: Vec<crate::wire::Rate>) {
        if let Some(u) = self.members[member].up.as_mut() {
            u.advert.speed = rates.clone();
        }
        self.update_node(member, |n| n.speed = rates);
        if let (Some((up, epoch)), Some((planned, plan))) =
            (self.plan.clone(), self.planned.clone())
            && planned == epoch
            && up.contains(&member)
        {
            let links = self
                .shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .links
                .clone();
            self.predict(&plan, &up, &links, epoch);
        }
    }

    fn update_node(&self, member: usize, f: impl FnOnce(&mut NodeState)) {
        let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = sh.nodes.get_mut(member + 1) {
            f(n);
        }
    }

    fn layout(&mut self) -> Result<Option<Layout>> {
        if self.layout.is_none() && self.opts.model.is_file() {
            self.layout = Some(engine::stage_file::layout(&self.opts.model)?);
        }
        Ok(self.layout.clone())
    }

    fn model_hash(&mut self) -> Result<Hash> {
        if let Some(h) = self.model_hash {
            return Ok(h);
        }
        let f = node::file_hash(&self.opts.model, &self.opts.cache_dir)?;
        self.model_hash = Some(f.hash);
        Ok(f.hash)
    }

    fn usable(&self, available: u64) -> u64 {
        self.opts
            .memory_limit
            .unwrap_or_else(|| crate::plan::usable(available))
    }

    /// Plans over the nodes up now, has them load, and installs the pipeline.
    fn replan(&mut self) -> Result<()> {
        let up: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].up.is_some() && self.members[i].benched_until.is_none())
            .collect();
        if let Some((members, _)) = &self.plan
            && *members == up
        {
            return Ok(());
        }
        // retire the pipeline that serves (let its requests finish)
        if self.plan.take().is_some() || self.held.is_none() {
            let (done_tx, done_rx) = mpsc::channel();
            let _ = self.cmd.send(Cmd::Retire {
                deadline: Duration::from_secs(30),
                done: done_tx,
            });
            if let Ok(Some(r)) = done_rx.recv_timeout(Duration::from_secs(40)) {
                self.held = Some(r);
            }
        }
        let plan = match self.place(&up)? {
            Ok(p) => p,
            // a Hugging Face directory on a single node: the whole model here
            Err(serving) => return self.single_dir(serving),
        };
        tracing::info!("plan:\n{plan}");
        let epoch = random_u64();
        let hash = self.model_hash()?;
        let name = self
            .opts
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // workers first (they load in parallel), then the head
        for (k, &i) in up.iter().enumerate() {
            let st = &plan.stages[k + 1];
            let next = up.get(k + 1).map(|&j| {
                let via = self.members[i].up.as_ref().and_then(|u| u.local);
                crate::addr::next_for(&self.members[j].addr, &self.members[i].addr, via)
            });
            let a = Assign {
                stage: (k + 1) as u32,
                stages: plan.stages.len() as u32,
                layer_start: st.layers.start as u32,
                layer_end: st.layers.end as u32,
                model_name: name.clone(),
                model_hash: hash,
                ctx: self.ctx as u32,
                kv_bytes: st.kv_bytes,
                next,
                epoch,
            };
            let tx = self.members[i].up.as_ref().expect("up").tx.clone();
            send_shared(&tx, &Msg::Assign(a))?;
        }
        let st0 = &plan.stages[0];
        let runner = self.head_stage(st0.layers.clone(), st0.kv_bytes as usize)?;
        let mut capacity = runner.kv().capacity_tokens();
        // wait for every worker's Ready, sending weights to those that ask
        let mut ready: HashMap<usize, u64> = HashMap::new();
        let mut next_links: HashMap<usize, crate::wire::LinkReport> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        while ready.len() < up.len() {
            if self.stop.load(Ordering::Acquire) {
                self.held = Some(runner);
                return Err(Error::Degraded("the head is stopping".into()));
            }
            if Instant::now() >= deadline {
                return Err(Error::Degraded(
                    "workers did not load within 10 minutes".into(),
                ));
            }
            let ev = match self.ev_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(ev) => ev,
                Err(_) => continue,
            };
            let (member, generation, msg) = match ev {
                SupEv::Msg {
                    member,
                    generation,
                    msg,
                } => (member, generation, msg),
                gone @ SupEv::Gone { .. } => {
                    self.held = Some(runner);
                    self.event(gone);
                    return Err(Error::Degraded("a worker failed while loading".into()));
                }
                SupEv::Heard(h) => {
                    self.heard(h);
                    continue;
                }
                // a worker joining meanwhile: in the next plan
                SupEv::Joined {
                    member,
                    addr,
                    result,
                } => {
                    self.joined(member, addr, *result);
                    continue;
                }
            };
            if self.members[member]
                .up
                .as_ref()
                .is_none_or(|u| u.generation != generation)
            {
                continue;
            }
            let k = up.iter().position(|&i| i == member);
            match (msg, k) {
                (Msg::Ready(r), Some(_)) => {
                    tracing::info!(
                        worker = %self.members[member].addr,
                        load_ms = r.load_ms,
                        received = r.received_bytes,
                        kv_capacity_tokens = r.kv_capacity_tokens,
                        "worker ready"
                    );
                    capacity = capacity.min(r.kv_capacity_tokens as usize);
                    ready.insert(member, r.kv_capacity_tokens);
                    if let Some(l) = r.next_link {
                        next_links.insert(member, l);
                    }
                }
                (Msg::NeedWeights, Some(k)) => {
                    let layers = plan.stages[k + 1].layers.clone();
                    let tx = self.members[member].up.as_ref().expect("up").tx.clone();
                    if let Err(e) =
                        self.send_weights(&tx, layers, &self.members[member].addr.clone())
                    {
                        self.held = Some(runner);
                        return Err(e);
                    }
                }
                (Msg::StageError(e), _) => {
                    self.held = Some(runner);
                    return Err(Error::StageFailed(format!(
                        "worker {}: {e}",
                        self.members[member].addr
                    )));
                }
                (other, _) => tracing::debug!("ignored while loading: {other:?}"),
            }
        }
        let next = up
            .first()
            .map(|&i| self.members[i].up.as_ref().expect("up").tx.clone());
        {
            let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            sh.epoch = epoch;
            sh.plan = Some(plan.to_string());
            for n in sh.nodes.iter_mut() {
                n.layers = None;
            }
            sh.nodes[0].layers = Some((st0.layers.start, st0.layers.end));
            for (k, &i) in up.iter().enumerate() {
                let l = &plan.stages[k + 1].layers;
                sh.nodes[i + 1].layers = Some((l.start, l.end));
            }
            // head → stage 1 → … → last stage → head
            let mut links = Vec::new();
            let state =
                |r: &crate::wire::LinkReport, from: String, to: String| crate::head::LinkState {
                    from,
                    to,
                    transport: r.transport.clone(),
                    rtt_us: f64::from(r.rtt_us),
                    bytes_per_s: r.bytes_per_s as f64,
                    baseline_rtt_us: f64::from(r.rtt_us),
                    baseline_bytes_per_s: r.bytes_per_s as f64,
                    samples: 0,
                    warning: None,
                };
            for (k, &i) in up.iter().enumerate() {
                let addr = self.members[i].addr.clone();
                if k == 0 {
                    let r = &self.members[i].up.as_ref().expect("up").report;
                    links.push(state(r, "head".into(), addr.clone()));
                }
                match (next_links.get(&i), up.get(k + 1)) {
                    (Some(r), Some(&j)) => links.push(state(r, addr, self.members[j].addr.clone())),
                    _ if k + 1 == up.len() => {
                        let r = &self.members[i].up.as_ref().expect("up").report;
                        links.push(state(r, addr, "head".into()));
                    }
                    _ => {}
                }
            }
            sh.links = links;
        }
        let links = self
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .links
            .clone();
        let _ = self.cmd.send(Cmd::Install(Box::new(Pipeline {
            epoch,
            runner,
            next,
            stages: plan.stages.len(),
            capacity,
        })));
        // in the background: the first prediction times the model's products
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prediction = None;
        self.predict(&plan, &up, &links, epoch);
        self.planned = Some((epoch, plan));
        self.plan = Some((up, epoch));
        // the links were just measured: the first health sample is one period away
        self.watch.started();
        Ok(())
    }

    /// Starts predicting the plan's decode speed, from the nodes' kernel rates and the links as
    /// measured at join ([`crate::predict`]); the result lands in the shared state.
    fn predict(
        &mut self,
        plan: &StagePlan,
        up: &[usize],
        links: &[crate::head::LinkState],
        epoch: u64,
    ) {
        if !self.opts.ops.predict {
            return;
        }
        let Ok(Some(layout)) = self.layout() else {
            return;
        };
        let mut worker_rates = Vec::new();
        for &i in up {
            match self.members[i].up.as_ref() {
                Some(u) => worker_rates.push(u.advert.speed.clone()),
                None => return,
            }
        }
        let links = links
            .iter()
            .map(|l| crate::predict::LinkSpeed {
                rtt_us: l.baseline_rtt_us,
                bytes_per_s: l.baseline_bytes_per_s,
            })
            .collect();
        let inputs = prediction::Inputs {
            model: self.opts.model.clone(),
            hidden_bytes: layout.config.hidden_size as u64 * if self.opts.bf16 { 2 } else { 4 },
            layout,
            plan: plan.clone(),
            worker_rates,
            links,
            seqs: self.opts.batch.max_seqs,
            position: crate::predict::DEFAULT_POSITION.min(self.ctx),
            epoch,
            stats: self.stats.clone(),
        };
        self.predictor.start(inputs, self.shared.clone());
    }

    /// Places the layers over the head and the members `up`: the plan, or (a Hugging Face
    /// directory, which has no layout) the serving settings for one node.
    fn place(&mut self, up: &[usize]) -> Result<std::result::Result<StagePlan, Serving>> {
        let mut serving = Serving::new(
            self.ctx,
            self.opts.batch.max_seqs,
            self.opts.batch.max_step_tokens,
        );
        if let (Some(bytes), Some(l)) = (self.opts.kv_memory, self.layout()?) {
            let per_token = crate::plan::kv_bytes_per_layer_token(&l) * l.layer_bytes.len() as u64;
            serving.kv_tokens = (bytes / per_token.max(1)) as usize;
        }
        let held_bytes = self
            .held
            .as_ref()
            .map_or(0, |r| r.model().weight_bytes() as u64);
        let (_, head_avail) = node::memory();
        let mut budgets = vec![NodeBudget {
            name: format!("head ({})", node::hostname()),
            usable: self.usable(head_avail + held_bytes),
        }];
        for &i in up {
            let a = &self.members[i].up.as_ref().expect("up").advert;
            budgets.push(NodeBudget {
                name: self.members[i].addr.clone(),
                usable: self.usable(a.mem_available),
            });
        }
        let layout = self.layout()?;
        let plan = match &layout {
            Some(l) => {
                let split = self
                    .opts
                    .split
                    .as_ref()
                    .filter(|s| s.len() == budgets.len());
                let place = |sv: Serving| match split {
                    Some(s) => StagePlan::split(l, &budgets, sv, s),
                    None => StagePlan::place(l, &budgets, sv),
                };
                match place(serving) {
                    Ok(p) => p,
                    // with no KV budget given, a cache smaller than ctx × max_seqs that fits
                    // beats no plan: the largest that fits, at least one whole context
                    Err(e) if self.opts.kv_memory.is_none() => {
                        let fits = |t: usize| {
                            place(Serving {
                                kv_tokens: t,
                                ..serving
                            })
                            .is_ok()
                        };
                        if !fits(serving.ctx) {
                            return Err(e.into());
                        }
                        let (mut lo, mut hi) = (serving.ctx, serving.kv_tokens);
                        while hi - lo > serving.ctx / 16 + 1 {
                            let mid = lo + (hi - lo) / 2;
                            if fits(mid) {
                                lo = mid;
                            } else {
                                hi = mid;
                            }
                        }
                        tracing::warn!(
                            wanted = serving.kv_tokens,
                            kv_tokens = lo,
                            "the KV cache for ctx × max-seqs does not fit these nodes: it holds {lo} positions instead (set --kv-memory, --ctx or --max-seqs to choose)"
                        );
                        serving.kv_tokens = lo;
                        place(serving)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            None => return Ok(Err(serving)),
        };
        Ok(Ok(plan))
    }

    /// A Hugging Face directory on one node.
    fn single_dir(&mut self, serving: Serving) -> Result<()> {
        let c = engine::ModelConfig::from_hf_file(&self.opts.model.join("config.json"))?;
        let kv =
            2 * c.num_kv_heads * c.head_dim * 4 * c.num_layers * serving.ctx * serving.max_seqs;
        let runner = self.head_stage(0..c.num_layers, kv)?;
        let capacity = runner.kv().capacity_tokens();
        let epoch = random_u64();
        {
            let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            sh.epoch = epoch;
            sh.nodes[0].layers = Some((0, c.num_layers));
            sh.links.clear();
        }
        let _ = self.cmd.send(Cmd::Install(Box::new(Pipeline {
            epoch,
            runner,
            next: None,
            stages: 1,
            capacity,
        })));
        self.plan = Some((Vec::new(), epoch));
        Ok(())
    }

    /// The head's stage for `layers`: the one it holds when the range is the same, else loaded.
    fn head_stage(
        &mut self,
        layers: std::ops::Range<usize>,
        kv_bytes: usize,
    ) -> Result<StageRunner> {
        if let Some(r) = self.held.take() {
            if r.model().layers() == layers {
                let kv = r.model().kv_pool(kv_bytes, Some(self.ctx))?;
                return Ok(StageRunner::new(
                    r.model().clone(),
                    kv,
                    self.opts.bf16,
                    self.opts.keep_warm,
                ));
            }
            drop(r);
        }
        let started = Instant::now();
        let loaded = Loaded::open(
            &self.opts.model,
            &LoadOptions {
                layers: Some(layers.clone()),
                kv_memory: Some(kv_bytes),
                ctx: Some(self.ctx),
                progress: true,
                ..Default::default()
            },
        )?;
        tracing::info!(
            layers = %format!("{}..{}", layers.start, layers.end),
            load_ms = started.elapsed().as_millis() as u64,
            "head stage loaded"
        );
        Ok(StageRunner::new(
            Arc::new(loaded.model),
            loaded.kv,
            self.opts.bf16,
            self.opts.keep_warm,
        ))
    }

    /// Sends the stage file of `layers` to a worker that lacks the model.
    fn send_weights(
        &mut self,
        tx: &SharedSender,
        layers: std::ops::Range<usize>,
        who: &str,
    ) -> Result<()> {
        let hash = self.model_hash()?;
        let dir = self.opts.cache_dir.join("stages");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!(
            "{}-{}-{}.gguf",
            hex(&hash),
            layers.start,
            layers.end
        ));
        if !path.exists() {
            let part = path.with_extension("part");
            engine::stage_file::write_stage(&self.opts.model, &part, layers.clone())?;
            std::fs::rename(&part, &path).map_err(|e| Error::io(&path, e))?;
        }
        let size = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        // remembered by path, size and mtime: a stage sent again is not hashed again
        let sha = node::file_hash(&path, &self.opts.cache_dir)?.hash;
        tracing::info!(worker = %who, bytes = size, "sending the stage's tensors");
        send_shared(tx, &Msg::WeightsBegin { size, hash: sha })?;
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut check = Sha256::new();
        while offset < size {
            if self.stop.load(Ordering::Acquire) {
                return Err(Error::Degraded("the head is stopping".into()));
            }
            let n = (size - offset).min(CHUNK as u64) as usize;
            std::io::Read::read_exact(&mut f, &mut buf[..n]).map_err(|e| Error::io(&path, e))?;
            check.update(&buf[..n]);
            let (tag, payload) = crate::wire::weights_chunk(offset, &buf[..n]);
            tx.lock().unwrap_or_else(|e| e.into_inner()).send_until(
                tag,
                &payload,
                Deadline::after(Duration::from_secs(30)),
            )?;
            offset += n as u64;
            if last_log.elapsed() > Duration::from_secs(1) || offset == size {
                last_log = Instant::now();
                let rate = offset as f64 / started.elapsed().as_secs_f64().max(1e-6) / 1e6;
                tracing::info!(worker = %who, sent = offset, of = size, "sending weights at {rate:.0} MB/s");
            }
        }
        let sent: Hash = check.finalize().into();
        if sent != sha {
            return Err(Error::Corrupt(
                "the stage file changed while it was sent".into(),
            ));
        }
        Ok(())
    }
}

/// A random number for ids and plan epochs (only unlikely collisions matter: the time and pid
/// stand in if the system's random source fails).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    match getrandom::fill(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            t ^ (u64::from(std::process::id()) << 32)
        }
    }
}
