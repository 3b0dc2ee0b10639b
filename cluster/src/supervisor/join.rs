//! Joining workers: connecting to the members not up (at each address a discovered one was heard
//! at, in turn), the hello and the link measured at join, and each worker's reader and pinger
//! threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use transport::{Deadline, tcp};

use super::{SupEv, Supervisor, Up};
use crate::error::{Error, Result};
use crate::head::{HEARTBEAT_TIMEOUT, PING_EVERY, Shared};
use crate::io::{Rx, SharedSender, is_timeout, send_shared};
use crate::node;
use crate::pipeline::Cmd;
use crate::wire::Msg;

/// A worker's link after the hello, the advert and the link's measurement: ready to be admitted.
pub(super) struct Handshaken {
    tx: transport::LinkSender,
    rx: Rx,
    info: transport::LinkInfo,
    advert: crate::wire::Advert,
    report: crate::wire::LinkReport,
}

/// The head's side of a worker joining, on a thread of its own: connects to `addr` (a 500 ms
/// window), says hello, reads the advert and measures the link (each with its deadline).
fn handshake(addr: &str, cfg: &transport::LinkConfig, head_id: u64) -> Result<Handshaken> {
    let mut cfg = cfg.clone();
    cfg.connect_timeout = Duration::from_millis(500);
    let link = tcp::connect(addr, &cfg)?;
    let info = link.info().clone();
    let (mut tx, rx) = link.split();
    let mut rx = Rx::new(rx);
    let mine = node::protocol_version();
    crate::io::send(
        &mut tx,
        &Msg::HeadHello {
            version: mine,
            head_id,
        },
    )?;
    let mut advert = match rx.recv(Deadline::after(Duration::from_secs(10)))? {
        Msg::Advert(a) => a,
        Msg::Refuse(why) => {
            return Err(Error::Refused(format!("worker {addr} refused: {why}")));
        }
        other => return Err(Error::Protocol(format!("worker {addr} answered {other:?}"))),
    };
    if advert.version != mine {
        let why = format!(
            "protocol mismatch: the head speaks cluster protocol v{mine}, the worker at {addr} v{}",
            advert.version
        );
        let _ = crate::io::send(&mut tx, &Msg::Refuse(why.clone()));
        return Err(Error::Refused(why));
    }
    let (report, early_rates) = crate::io::measure_join(&mut tx, &mut rx, crate::io::PROBE_BYTES)?;
    if let Some(rates) = early_rates {
        advert.speed = rates;
    }
    Ok(Handshaken {
        tx,
        rx,
        info,
        advert,
        report,
    })
}

impl Supervisor {
    /// Tries the workers not connected (each at most once a second), each on a thread of its
    /// own: a worker that does not answer holds up nothing else ([`Self::joined`] takes the
    /// outcome).
    pub(super) fn connect_missing(&mut self) {
        for i in 0..self.members.len() {
            let m = &self.members[i];
            if m.up.is_some()
                || m.joining
                || m.forgotten
                || m.duplicate
                || m.last_try
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            {
                continue;
            }
            let addr = m.addr.clone();
            let (cfg, head_id, ev) = (self.opts.link.clone(), self.head_id, self.ev_tx.clone());
            let spawned = std::thread::Builder::new()
                .name("sinew-join".into())
                .spawn(move || {
                    // the outcome is always sent: a member is never left joining
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        handshake(&addr, &cfg, head_id)
                    }))
                    .unwrap_or_else(|_| Err(Error::Protocol("the join thread panicked".into())));
                    let result = Box::new(result);
                    let _ = ev.send(SupEv::Joined {
                        member: i,
                        addr,
                        result,
                    });
                });
            let m = &mut self.members[i];
            m.last_try = Some(Instant::now());
            match spawned {
                Ok(_) => m.joining = true,
                Err(e) => {
                    tracing::warn!(worker = %m.addr, error = %e, "no thread to join a worker from")
                }
            }
        }
    }

    /// A join attempt's outcome: the worker admitted, or the failure recorded (listed when the
    /// worker answered but refused, its next address tried when it did not answer).
    pub(super) fn joined(&mut self, i: usize, addr: String, result: Result<Handshaken>) {
        let m = &mut self.members[i];
        m.joining = false;
        if m.addr != addr || m.up.is_some() || m.forgotten || m.duplicate {
            // the member changed meanwhile: this link closes as it drops
            return;
        }
        match result.and_then(|h| self.admit(i, h)) {
            Ok(()) => {
                self.dirty = true;
            }
            Err(Error::Refused(why))
                if why.contains(&crate::worker::serving_already(self.head_id))
                    && self.serves_as_another(i) =>
            {
                self.hide_duplicate(i);
            }
            Err(e) => {
                let why = e.to_string();
                if self.members[i].last_error.as_deref() != Some(&why) {
                    tracing::warn!(worker = %self.members[i].addr, error = %why, "worker not joined");
                }
                // a node that answers but will not be a member: listed with the reason
                if matches!(
                    e,
                    Error::Refused(_) | Error::Transport(transport::Error::Handshake { .. })
                ) {
                    let addr = self.members[i].addr.clone();
                    self.refuse(&addr, &why);
                }
                self.members[i].last_error = Some(why.clone());
                self.update_node(i, |n| {
                    n.up = false;
                    n.error = Some(why);
                });
                if !matches!(e, Error::Refused(_)) {
                    self.next_address(i);
                }
            }
        }
    }

    /// Makes a handshaken worker member `i`: its reader and pinger threads, its state.
    fn admit(&mut self, i: usize, h: Handshaken) -> Result<()> {
        let Handshaken {
            tx,
            rx,
            info,
            advert,
            report,
        } = h;
        let addr = self.members[i].addr.clone();
        let (samples_tx, samples) = mpsc::channel();
        self.generation += 1;
        let generation = self.generation;
        let tx = Arc::new(Mutex::new(tx));
        let alive = Arc::new(AtomicBool::new(true));
        let probing = Arc::new(AtomicBool::new(false));
        let base = Instant::now();
        tracing::info!(
            worker = %addr,
            id = %advert.node_id,
            host = %advert.hostname,
            memory = advert.mem_available,
            cores = advert.cores,
            link = %info.transport,
            rtt_us = report.rtt_us,
            mb_per_s = report.bytes_per_s / 1_000_000,
            "worker joined"
        );
        self.update_node(i, |n| {
            n.up = true;
            n.id = advert.node_id.clone();
            n.speed = advert.speed.clone();
            n.hostname = advert.hostname.clone();
            n.mem_total = advert.mem_total;
            n.mem_available = advert.mem_available;
            n.cores = advert.cores;
            n.cpu_features = advert.cpu_features.clone();
            n.link = Some(info.transport.to_string());
            n.rtt_us = Some(f64::from(report.rtt_us));
            n.bytes_per_s = Some(report.bytes_per_s as f64);
            n.error = None;
        });
        // the reader: pongs, the last stage's tokens, setup messages; silence is failure
        {
            let ev = self.ev_tx.clone();
            let cmd = self.cmd.clone();
            let shared = self.shared.clone();
            let alive = alive.clone();
            let probing = probing.clone();
            std::thread::Builder::new()
                .name("sinew-worker-rx".into())
                .spawn(move || {
                    reader(
                        rx,
                        ReaderCtx {
                            member: i,
                            generation,
                            ev,
                            cmd,
                            shared,
                            alive,
                            base,
                            samples: samples_tx,
                            probing,
                        },
                    )
                })
                .map_err(|e| Error::io("thread", e))?;
        }
        {
            let tx = tx.clone();
            let alive = alive.clone();
            std::thread::Builder::new()
                .name("sinew-ping".into())
                .spawn(move || pinger(tx, alive, base))
                .map_err(|e| Error::io("thread", e))?;
        }
        self.members[i].up = Some(Up {
            generation,
            tx,
            advert,
            alive,
            report,
            samples,
            probing,
            local: info.local_addr,
        });
        self.members[i].last_error = None;
        self.check_duplicates();
        Ok(())
    }
}

/// What a worker's reader thread reports to and shares with.
struct ReaderCtx {
    member: usize,
    generation: u64,
    ev: Sender<SupEv>,
    cmd: Sender<Cmd>,
    shared: Arc<Mutex<Shared>>,
    alive: Arc<AtomicBool>,
    base: Instant,
    samples: Sender<Msg>,
    probing: Arc<AtomicBool>,
}

/// Reads a worker's control link: pongs (round trip), the last stage's tokens (to the pipeline),
/// the rest to the supervisor. Silence past [`HEARTBEAT_TIMEOUT`] or a failed link is the
/// worker's failure.
fn reader(mut rx: Rx, ctx: ReaderCtx) {
    let ReaderCtx {
        member,
        generation,
        ev,
        cmd,
        shared,
        alive,
        base,
        samples,
        probing,
    } = ctx;
    loop {
        if !alive.load(Ordering::Acquire) {
            return;
        }
        match rx.recv(Deadline::after(HEARTBEAT_TIMEOUT)) {
            Ok(Msg::Pong(t)) => {
                let now = base.elapsed().as_micros() as u64;
                let rtt = now.saturating_sub(t) as f64;
                let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(n) = sh.nodes.get_mut(member + 1) {
                    n.rtt_us = Some(rtt);
                }
            }
            Ok(Msg::Sampled(s)) => {
                let _ = cmd.send(Cmd::Sampled(s));
            }
            Ok(m @ (Msg::ProbeAck { .. } | Msg::LinkSample(_))) => {
                let _ = samples.send(m);
            }
            Ok(msg) => {
                if ev
                    .send(SupEv::Msg {
                        member,
                        generation,
                        msg,
                    })
                    .is_err()
                {
                    return;
                }
            }
            // the head's own link probe holds the pongs up; it has deadlines of its own
            Err(e) if is_timeout(&e) && probing.load(Ordering::Acquire) => continue,
            Err(e) => {
                let why = if is_timeout(&e) {
                    format!("no answer for {HEARTBEAT_TIMEOUT:?}")
                } else {
                    e.to_string()
                };
                alive.store(false, Ordering::Release);
                let _ = ev.send(SupEv::Gone {
                    member,
                    generation,
                    why,
                });
                return;
            }
        }
    }
}

/// Pings a worker until it is gone. A ping carries the time since `base`, which the reader
/// shares, so its pong gives the round trip.
fn pinger(tx: SharedSender, alive: Arc<AtomicBool>, base: Instant) {
    while alive.load(Ordering::Acquire) {
        let t = base.elapsed().as_micros() as u64;
        if send_shared(&tx, &Msg::Ping(t)).is_err() {
            return;
        }
        std::thread::sleep(PING_EVERY);
    }
}
