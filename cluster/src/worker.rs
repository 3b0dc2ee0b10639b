//! `sinew worker`: a node that waits for a head, advertises itself, loads the layer range it is
//! assigned (from its own copy of the model, from its cache, or from tensors the head sends), and
//! then serves as a pipeline stage until the head goes away or assigns another range.
//!
//! Threads: the main thread accepts links (a head's, or the previous stage's); one reader per
//! link forwards messages to the stage thread and answers the head's pings at once (so a long
//! step or load never looks like a dead node); the stage thread loads, runs micro-batches and
//! sends their results on. Every wait has a deadline; a head silent for [`HEAD_TIMEOUT`] is
//! dropped and the worker waits for the next one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::{LoadOptions, Loaded};
use sha2::{Digest, Sha256};
use transport::{Deadline, Link, LinkConfig, LinkSender, tcp};

use crate::error::{Error, Result};
use crate::io::{Rx, SharedSender, is_timeout, send, send_shared};
use crate::node::{self, hex};
use crate::stage::{StageOut, StageRunner};
use crate::wire::{
    Advert, Assign, Batch, Hidden, HiddenData, LinkReport, Msg, Ready, Sampled, SeqResult,
    StageTiming,
};

/// A head that sends nothing (not even a ping) for this long is gone.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a new link has to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Where it listens.
    pub listen: String,
    /// Model files it holds.
    pub models: Vec<PathBuf>,
    /// Where received stage files (and file hashes) are kept.
    pub cache_dir: PathBuf,
    /// Compute threads (advertised).
    pub threads: usize,
    /// Link settings (the cluster key among them).
    pub link: LinkConfig,
    /// Send hidden states in bf16.
    pub bf16: bool,
    /// How long the stage keeps its cores awake after a micro-batch ([`crate::warm`]; zero:
    /// not at all).
    pub keep_warm: Duration,
    /// Announce this worker on the LAN to this UDP port ([`crate::discovery`]); `None`: do not.
    pub announce: Option<u16>,
}

enum Ev {
    /// A head said hello on this link.
    Head {
        head_id: u64,
        tx: SharedSender,
        generation: u64,
        /// This end's address on the head's link.
        local: Option<SocketAddr>,
    },
    /// A message from the head.
    Control { generation: u64, msg: Msg },
    /// The head's link failed.
    HeadGone { generation: u64, why: String },
    /// A batch from the previous stage.
    Up { epoch: u64, batch: Box<Batch> },
    /// The previous stage's link failed.
    UpGone { epoch: u64, why: String },
}

/// Runs a worker until the process ends. `on_listening` is called with the bound address once
/// links are accepted.
///
/// # Errors
/// Binding the listener, reading the model files.
pub fn run(opts: WorkerOptions, on_listening: impl FnOnce(SocketAddr)) -> Result<()> {
    std::fs::create_dir_all(&opts.cache_dir).map_err(|e| Error::io(&opts.cache_dir, e))?;
    let advert = node::advert(&opts.models, &opts.cache_dir, opts.threads)?;
    // after hashing the model files, which would share the cores with it
    crate::speed::measure_speed_in_background();
    for f in &advert.files {
        tracing::info!(file = %f.name, size = f.size, hash = %hex(&f.hash), "holding model file");
    }
    let listener = match tcp::Listener::bind(opts.listen.as_str(), &opts.link) {
        // every IPv6 address, on a host without IPv6: every IPv4 one
        Err(e) if opts.listen.starts_with("[::]:") => {
            let v4 = opts.listen.replacen("[::]", "0.0.0.0", 1);
            tracing::info!(error = %e, listen = %v4, "no IPv6; listening on IPv4 alone");
            tcp::Listener::bind(v4.as_str(), &opts.link)?
        }
        r => r?,
    };
    let addr = listener.local_addr()?;
    tracing::info!(node_id = %advert.node_id, %addr, "worker up");
    if let Some(port) = opts.announce {
        crate::discovery::announce(
            opts.link.key.clone(),
            advert.node_id.clone(),
            addr.port(),
            port,
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )
        .map_err(|e| Error::io("the discovery socket", e))?;
        tracing::info!(port, "announcing on the LAN");
    }
    on_listening(addr);
    let (ev_tx, ev_rx) = mpsc::channel::<Ev>();
    let brain_opts = opts.clone();
    let brain_advert = advert.clone();
    std::thread::Builder::new()
        .name("sinew-stage".into())
        .spawn(move || Brain::new(brain_opts, brain_advert).run(ev_rx))
        .map_err(|e| Error::io("thread", e))?;
    let mut generation = 0u64;
    loop {
        let incoming = match listener.incoming_until(Deadline::after(Duration::from_secs(3600))) {
            Ok(i) => i,
            Err(transport::Error::Timeout { .. }) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a link failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // the handshake and hello run on their own thread, so a stalled peer blocks no one
        generation += 1;
        let ev_tx = ev_tx.clone();
        let advert = advert.clone();
        let cfg = opts.link.clone();
        let _ = std::thread::Builder::new()
            .name("sinew-accept".into())
            .spawn(move || {
                let peer = incoming.peer_addr().to_string();
                match incoming.establish() {
                    Ok(link) => greet(link, generation, &advert, &ev_tx, &cfg),
                    Err(e) => tracing::warn!(%peer, error = %e, "refused a link"),
                }
            });
    }
}

/// Reads a new link's first message and hands the link on.
fn greet(link: Link, generation: u64, advert: &Advert, ev: &Sender<Ev>, cfg: &LinkConfig) {
    let peer = link.info().peer_addr.clone();
    let local = link.info().local_addr;
    let (mut tx, rx) = link.split();
    let mut rx = Rx::new(rx);
    let first = match rx.recv(Deadline::after(HELLO_TIMEOUT)) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "a link said nothing");
            return;
        }
    };
    let mine = advert.version;
    match first {
        Msg::HeadHello { version, head_id } => {
            if version != mine {
                let why = format!(
                    "protocol mismatch: this worker speaks cluster protocol v{mine}, the head at {peer} v{version}"
                );
                tracing::error!("{why}");
                let _ = send(&mut tx, &Msg::Refuse(why));
                return;
            }
            // the rates measured so far: a join never waits for them
            let mut advert = advert.clone();
            advert.speed = crate::speed::speed_now();
            let later = advert.speed.is_empty();
            if send(&mut tx, &Msg::Advert(advert)).is_err() {
                return;
            }
            tracing::info!(%peer, head = %format!("{head_id:#x}"), "a head connected");
            let tx = Arc::new(Mutex::new(tx));
            if later {
                send_rates_when_measured(tx.clone());
            }
            let _ = ev.send(Ev::Head {
                head_id,
                tx: tx.clone(),
                generation,
                local,
            });
            control_reader(rx, tx, generation, ev);
        }
        Msg::PeerHello {
            version,
            epoch,
            stage,
        } => {
            if version != mine {
                let why = format!(
                    "protocol mismatch: this worker speaks cluster protocol v{mine}, the stage at {peer} v{version}"
                );
                tracing::error!("{why}");
                let _ = send(&mut tx, &Msg::Refuse(why));
                return;
            }
            tracing::info!(%peer, stage, "previous stage connected");
            up_reader(rx, tx, epoch, ev.clone());
        }
        Msg::Survey { version } => {
            if version != mine {
                let why = format!(
                    "protocol mismatch: this worker speaks cluster protocol v{mine}, the observer at {peer} v{version}"
                );
                let _ = send(&mut tx, &Msg::Refuse(why));
                return;
            }
            tracing::debug!(%peer, "surveyed");
            let mut advert = advert.clone();
            advert.speed = crate::speed::speed_wait(crate::survey::SURVEY_IDLE);
            if send(&mut tx, &Msg::Advert(advert)).is_err() {
                return;
            }
            crate::survey::serve(rx, tx, mine, cfg, local);
        }
        other => tracing::warn!(%peer, "a link opened with {other:?}; dropped"),
    }
}

/// A worker's refusal of a second link from the head it serves (the head reached it at two
/// addresses): the head, finding its own id in it, knows the member for a duplicate.
pub(crate) fn serving_already(head_id: u64) -> String {
    format!("this worker already serves head {head_id:#x} through another link")
}

/// Sends the head this node's kernel rates once measured (within a minute), on a thread of its
/// own: an advert sent before they were sent none.
fn send_rates_when_measured(tx: SharedSender) {
    let spawned = std::thread::Builder::new()
        .name("sinew-rates".into())
        .spawn(move || {
            let rates = crate::speed::speed_wait(Duration::from_secs(60));
            if !rates.is_empty() {
                let _ = send_shared(&tx, &Msg::Rates(rates));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to send the kernel rates from");
    }
}

/// Forwards the head's messages; answers pings.
fn control_reader(mut rx: Rx, tx: SharedSender, generation: u64, ev: &Sender<Ev>) {
    loop {
        match rx.recv(Deadline::after(HEAD_TIMEOUT)) {
            Ok(Msg::Probe { id, pad }) => {
                let ack = crate::io::probe_ack(id, &pad);
                if send_shared(&tx, &ack).is_err() {
                    let _ = ev.send(Ev::HeadGone {
                        generation,
                        why: "a probe could not be answered".into(),
                    });
                    return;
                }
            }
            Ok(Msg::Ping(t)) => {
                if send_shared(&tx, &Msg::Pong(t)).is_err() {
                    let _ = ev.send(Ev::HeadGone {
                        generation,
                        why: "a pong could not be sent".into(),
                    });
                    return;
                }
            }
            Ok(msg) => {
                if ev.send(Ev::Control { generation, msg }).is_err() {
                    return;
                }
            }
            Err(e) => {
                let why = if is_timeout(&e) {
                    format!("silent for {HEAD_TIMEOUT:?}")
                } else {
                    e.to_string()
                };
                let _ = ev.send(Ev::HeadGone { generation, why });
                return;
            }
        }
    }
}

/// Forwards the previous stage's batches and answers its probes, until the link closes (the
/// previous stage dropped it: a new plan).
fn up_reader(mut rx: Rx, mut tx: LinkSender, epoch: u64, ev: Sender<Ev>) {
    loop {
        match rx.recv(Deadline::after(Duration::from_secs(3600))) {
            Ok(Msg::Probe { id, pad }) => {
                let ack = crate::io::probe_ack(id, &pad);
                if send(&mut tx, &ack).is_err() {
                    return;
                }
            }
            Ok(Msg::Batch(b)) => {
                if ev
                    .send(Ev::Up {
                        epoch,
                        batch: Box::new(b),
                    })
                    .is_err()
                {
                    return;
                }
            }
            Ok(other) => {
                let _ = ev.send(Ev::UpGone {
                    epoch,
                    why: format!("unexpected {other:?}"),
                });
                return;
            }
            Err(e) if is_timeout(&e) => continue,
            Err(e) => {
                let _ = ev.send(Ev::UpGone {
                    epoch,
                    why: e.to_string(),
                });
                return;
            }
        }
    }
}

/// A stage file being received.
struct Receiving {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    hash: [u8; 32],
    got: u64,
    sha: Sha256,
    started: Instant,
    last_log: Instant,
}

/// The stage thread's state.
struct Brain {
    opts: WorkerOptions,
    advert: Advert,
    /// The link to the next stage, as measured when it opened.
    next_link: Option<LinkReport>,
    /// The current head: its link generation and sender.
    head: Option<(u64, SharedSender)>,
    /// The id of the head served (kept until another head connects).
    head_id: Option<u64>,
    /// This end's address on the head's link (the scope of a link-local next stage).
    head_local: Option<SocketAddr>,
    assign: Option<Assign>,
    /// The loaded stage: its model file hash and range, and the runner.
    runner: Option<([u8; 32], u32, u32, StageRunner)>,
    down: Option<LinkSender>,
    /// The next stage's answers to probes on `down`.
    down_rx: Option<Rx>,
    receiving: Option<Receiving>,
    load_started: Instant,
}

impl Brain {
    fn new(opts: WorkerOptions, advert: Advert) -> Self {
        Brain {
            opts,
            advert,
            next_link: None,
            head: None,
            head_id: None,
            head_local: None,
            assign: None,
            runner: None,
            down: None,
            down_rx: None,
            receiving: None,
            load_started: Instant::now(),
        }
    }

    fn run(mut self, rx: Receiver<Ev>) {
        loop {
            let ev = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            self.handle(ev);
        }
    }

    fn epoch(&self) -> Option<u64> {
        self.assign.as_ref().map(|a| a.epoch)
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Head {
                head_id,
                tx,
                generation,
                local,
            } => {
                // the same head again, through another address (listed and discovered under
                // two spellings): one membership only; a link of it that died ends the session
                // within HEAD_TIMEOUT, and then it may connect again
                if self.head_id == Some(head_id) && self.head.is_some() {
                    tracing::info!(head = %format!("{head_id:#x}"), "refused a second link from the head it serves");
                    let _ = send_shared(&tx, &Msg::Refuse(serving_already(head_id)));
                    return;
                }
                // a new head replaces the old one (a head restarted before the old link failed)
                self.end_session(&format!("head {head_id:#x} connected"));
                self.head = Some((generation, tx));
                self.head_id = Some(head_id);
                self.head_local = local;
            }
            Ev::HeadGone { generation, why } => {
                if self.head.as_ref().is_some_and(|h| h.0 == generation) {
                    tracing::warn!(%why, "the head is gone; waiting for a head");
                    self.end_session(&why);
                }
            }
            Ev::Control { generation, msg } => {
                if self.head.as_ref().is_some_and(|h| h.0 == generation) {
                    self.control(msg);
                }
            }
            Ev::Up { epoch, batch } => {
                if Some(epoch) == self.epoch() && batch.epoch == epoch {
                    self.batch(*batch);
                }
            }
            Ev::UpGone { epoch, why } => {
                if Some(epoch) == self.epoch() {
                    tracing::warn!(%why, "the previous stage's link failed");
                }
            }
        }
    }

    fn end_session(&mut self, why: &str) {
        if self.head.is_some() {
            tracing::info!(%why, "session ended");
        }
        self.head = None;
        self.assign = None;
        self.down = None;
        self.down_rx = None;
        self.next_link = None;
        self.receiving = None;
        if let Some(r) = self.runner.as_mut() {
            r.3.clear();
        }
    }

    fn tell_head(&mut self, m: &Msg) {
        if let Some((_, tx)) = &self.head
            && let Err(e) = send_shared(tx, m)
        {
            tracing::warn!(error = %e, "sending to the head failed");
        }
    }

    fn control(&mut self, msg: Msg) {
        match msg {
            Msg::Assign(a) => {
                let r = self.assign(a);
                if let Err(e) = r {
                    tracing::error!(error = %e, "loading the stage failed");
                    self.assign = None;
                    self.tell_head(&Msg::StageError(format!("loading the stage failed: {e}")));
                }
            }
            Msg::WeightsBegin { size, hash } => {
                if let Err(e) = self.begin_receive(size, hash) {
                    self.tell_head(&Msg::StageError(e.to_string()));
                }
            }
            Msg::WeightsChunk { offset, crc, bytes } => {
                match self.receive_chunk(offset, crc, &bytes) {
                    Ok(Some(path)) => {
                        let r = self.load_and_ready(&path);
                        if let Err(e) = r {
                            self.tell_head(&Msg::StageError(format!(
                                "loading the received stage failed: {e}"
                            )));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.receiving = None;
                        tracing::error!(error = %e, "receiving weights failed");
                        self.tell_head(&Msg::StageError(e.to_string()));
                    }
                }
            }
            Msg::Batch(b) => {
                if self.epoch() == Some(b.epoch) {
                    self.batch(b);
                }
            }
            Msg::SampleNext { bytes } => {
                let bytes = (bytes as usize).clamp(1, crate::io::PROBE_BYTES);
                let r = match (self.down.as_mut(), self.down_rx.as_mut()) {
                    (Some(tx), Some(rx)) => {
                        crate::io::measure(tx, rx, bytes).map_err(|e| e.to_string())
                    }
                    _ => Err("this stage has no next stage".to_string()),
                };
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "measuring the link to the next stage failed");
                }
                self.tell_head(&Msg::LinkSample(r));
            }
            Msg::Refuse(why) => {
                tracing::error!(%why, "the head refused this worker");
                self.end_session(&why);
            }
            other => tracing::warn!("unexpected message from the head: {other:?}"),
        }
    }

    fn stage_file(&self, a: &Assign) -> PathBuf {
        self.opts.cache_dir.join("stages").join(format!(
            "{}-{}-{}.gguf",
            hex(&a.model_hash),
            a.layer_start,
            a.layer_end
        ))
    }

    fn assign(&mut self, a: Assign) -> Result<()> {
        tracing::info!(
            stage = a.stage,
            layers = %format!("{}..{}", a.layer_start, a.layer_end),
            model = %a.model_name,
            "assigned"
        );
        self.load_started = Instant::now();
        self.down = None;
        self.down_rx = None;
        self.next_link = None;
        self.assign = Some(a.clone());
        // the next stage first: it listens from its start
        if let Some(next) = &a.next {
            let mut cfg = self.opts.link.clone();
            cfg.connect_timeout = Duration::from_secs(10);
            let next = crate::addr::with_scope(next, self.head_local);
            let mut link = tcp::connect(next.as_str(), &cfg)?;
            let (tag, payload) = Msg::PeerHello {
                version: self.advert.version,
                epoch: a.epoch,
                stage: a.stage,
            }
            .encode();
            link.send_until(tag, &payload, Deadline::after(crate::io::SEND_TIMEOUT))?;
            let (mut tx, rx) = link.split();
            let mut rx = Rx::new(rx);
            let report = crate::io::measure(&mut tx, &mut rx, crate::io::PROBE_BYTES)?;
            self.down_rx = Some(rx);
            tracing::info!(
                next = %next,
                transport = %report.transport,
                rtt_us = report.rtt_us,
                mb_per_s = report.bytes_per_s / 1_000_000,
                "link to the next stage measured"
            );
            self.next_link = Some(report);
            self.down = Some(tx);
        }
        // the same stage loaded already (a head restarted, a re-plan): keep its weights, with a
        // KV budget of the new assignment
        if let Some((h, s, e, runner)) = self.runner.take()
            && h == a.model_hash
            && s == a.layer_start
            && e == a.layer_end
        {
            let model = runner.model().clone();
            drop(runner);
            let kv = model.kv_pool(a.kv_bytes as usize, Some(a.ctx as usize))?;
            let runner = StageRunner::new(model, kv, self.opts.bf16, self.opts.keep_warm);
            let cap = runner.kv().capacity_tokens() as u64;
            self.runner = Some((h, s, e, runner));
            tracing::info!(kv_capacity_tokens = cap, "stage ready (weights kept)");
            self.tell_head(&Msg::Ready(Ready {
                kv_capacity_tokens: cap,
                load_ms: self.load_started.elapsed().as_millis() as u64,
                received_bytes: 0,
                next_link: self.next_link.clone(),
            }));
            return Ok(());
        }
        self.runner = None;
        let own = self
            .opts
            .models
            .iter()
            .zip(&self.advert.files)
            .find(|(_, f)| f.hash == a.model_hash)
            .map(|(p, _)| p.clone());
        let cached = self.stage_file(&a);
        if let Some(path) = own {
            return self.load_and_ready(&path);
        }
        if cached.exists() {
            tracing::info!(file = %cached.display(), "loading the stage from the cache");
            return self.load_and_ready(&cached);
        }
        tracing::info!("this worker lacks the model: asking the head for the stage's tensors");
        self.tell_head(&Msg::NeedWeights);
        Ok(())
    }

    fn begin_receive(&mut self, size: u64, hash: [u8; 32]) -> Result<()> {
        let Some(a) = &self.assign else {
            return Err(Error::Protocol("weights before an assignment".into()));
        };
        let path = self.stage_file(a);
        let dir = path.parent().expect("a stage file has a directory");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let part = path.with_extension("part");
        let file = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
        file.set_len(size).map_err(|e| Error::io(&part, e))?;
        tracing::info!(bytes = size, "receiving the stage's tensors");
        self.receiving = Some(Receiving {
            path,
            file,
            size,
            hash,
            got: 0,
            sha: Sha256::new(),
            started: Instant::now(),
            last_log: Instant::now(),
        });
        Ok(())
    }

    /// Writes a chunk; the stage file's path once the last one is in and checked.
    fn receive_chunk(&mut self, offset: u64, crc: u32, bytes: &[u8]) -> Result<Option<PathBuf>> {
        use std::io::Write;
        let Some(r) = self.receiving.as_mut() else {
            return Err(Error::Protocol("weights chunk without a beginning".into()));
        };
        if offset != r.got || r.got + bytes.len() as u64 > r.size {
            return Err(Error::Protocol(format!(
                "weights chunk at {offset} of {} bytes; expected offset {} of {}",
                bytes.len(),
                r.got,
                r.size
            )));
        }
        if crc32c::crc32c(bytes) != crc {
            return Err(Error::Corrupt(format!(
                "chunk at offset {offset} fails its CRC"
            )));
        }
        let part = r.path.with_extension("part");
        r.file.write_all(bytes).map_err(|e| Error::io(&part, e))?;
        r.sha.update(bytes);
        r.got += bytes.len() as u64;
        if r.last_log.elapsed() > Duration::from_secs(1) || r.got == r.size {
            r.last_log = Instant::now();
            let rate = r.got as f64 / r.started.elapsed().as_secs_f64().max(1e-6) / 1e6;
            tracing::info!(
                received = r.got,
                of = r.size,
                "receiving weights: {:.0}% at {rate:.0} MB/s",
                100.0 * r.got as f64 / r.size.max(1) as f64
            );
        }
        if r.got < r.size {
            return Ok(None);
        }
        let r = self.receiving.take().expect("checked above");
        let got: [u8; 32] = r.sha.finalize().into();
        if got != r.hash {
            let _ = std::fs::remove_file(&part);
            return Err(Error::Corrupt(format!(
                "the stage file's SHA-256 is {}, the head's is {}",
                hex(&got),
                hex(&r.hash)
            )));
        }
        r.file.sync_all().map_err(|e| Error::io(&part, e))?;
        std::fs::rename(&part, &r.path).map_err(|e| Error::io(&r.path, e))?;
        tracing::info!(file = %r.path.display(), "stage file received and checked");
        Ok(Some(r.path))
    }

    fn load_and_ready(&mut self, path: &Path) -> Result<()> {
        let Some(a) = self.assign.clone() else {
            return Err(Error::Protocol("loading without an assignment".into()));
        };
        let received = if path.starts_with(&self.opts.cache_dir) {
            std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        } else {
            0
        };
        let loaded = Loaded::open(
            path,
            &LoadOptions {
                layers: Some(a.layer_start as usize..a.layer_end as usize),
                kv_memory: Some(a.kv_bytes as usize),
                ctx: Some(a.ctx as usize),
                ..Default::default()
            },
        )?;
        let runner = StageRunner::new(
            Arc::new(loaded.model),
            loaded.kv,
            self.opts.bf16,
            self.opts.keep_warm,
        );
        let cap = runner.kv().capacity_tokens() as u64;
        self.runner = Some((a.model_hash, a.layer_start, a.layer_end, runner));
        let load_ms = self.load_started.elapsed().as_millis() as u64;
        tracing::info!(load_ms, kv_capacity_tokens = cap, "stage ready");
        self.tell_head(&Msg::Ready(Ready {
            kv_capacity_tokens: cap,
            load_ms,
            received_bytes: received,
            next_link: self.next_link.clone(),
        }));
        Ok(())
    }

    fn batch(&mut self, mut batch: Batch) {
        let Some((_, _, _, runner)) = self.runner.as_mut() else {
            return;
        };
        let started = Instant::now();
        let out = runner.run(&mut batch, None);
        let step_us = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let id = batch.id;
        let seqs: Vec<u64> = batch.chunks.iter().map(|c| c.seq).collect();
        let fail = |why: String| {
            Msg::Sampled(Sampled {
                id,
                timings: Vec::new(),
                results: seqs
                    .iter()
                    .map(|&seq| SeqResult {
                        seq,
                        token: None,
                        logprob: None,
                        prompt_logprobs: Vec::new(),
                        error: Some(why.clone()),
                    })
                    .collect(),
            })
        };
        match out {
            Ok(StageOut::Hidden(h)) => {
                let Some(down) = self.down.as_mut() else {
                    let m = fail("no link to the next stage".into());
                    self.tell_head(&m);
                    return;
                };
                let sent_bytes = hidden_bytes(&h);
                let mut next = batch;
                next.timings.push(StageTiming {
                    step_us,
                    sent_bytes,
                });
                next.hidden = h;
                if let Err(e) = send(down, &Msg::Batch(next)) {
                    tracing::warn!(error = %e, "sending to the next stage failed");
                    let m = fail(format!("the next stage is unreachable: {e}"));
                    self.tell_head(&m);
                }
            }
            Ok(StageOut::Sampled(results)) => {
                let mut timings = batch.timings;
                timings.push(StageTiming {
                    step_us,
                    sent_bytes: 0,
                });
                self.tell_head(&Msg::Sampled(Sampled {
                    id,
                    results,
                    timings,
                }));
            }
            Err(e) => {
                tracing::warn!(error = %e, "a batch failed");
                let m = fail(format!(
                    "stage {}: {e}",
                    self.assign.as_ref().map_or(0, |a| a.stage)
                ));
                self.tell_head(&m);
            }
        }
    }
}

/// Bytes of hidden states on the wire.
pub(crate) fn hidden_bytes(h: &Hidden) -> u32 {
    let b = match &h.data {
        HiddenData::F32(v) => v.len() * 4,
        HiddenData::Bf16(v) => v.len() * 2,
    };
    b.min(u32::MAX as usize) as u32
}
