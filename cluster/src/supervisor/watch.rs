//! The link health watch: while no request runs, the head measures every link of the plan (the
//! probe used at join: three empty round trips, then the better of two transfers — of 8 MiB, or
//! about 0.2 s of the link's baseline where that is less) every `watch_every`. A link below
//! `min_fraction` of its baseline bandwidth, or whose round trip rose past `max_rtt_rise_us`, twice
//! in a row, gets a warning (logged naming both nodes and the figures, shown in the state,
//! `/metrics` and `sinew status`) until it recovers. A link that fails its probe or falls below a
//! tenth of its baseline, twice in a row, is no longer usable: when the nodes left can hold the
//! model, the head re-plans without the node at its far end (benched for [`BENCH`], then tried
//! again). While the head's own probe fills a worker's link, that worker's late pongs are not a
//! failure (the probe's deadlines stand in for the heartbeat): a slow link is measured, not
//! mistaken for a dead node.

use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use super::Supervisor;
use crate::io::{PROBE_BYTES, measure_with, send_shared};
use crate::wire::{LinkReport, Msg};

/// How long a node behind an unusable link is left out of plans.
const BENCH: Duration = Duration::from_secs(300);
/// Below this fraction of its baseline a link is unusable.
const UNUSABLE: f64 = 0.1;
/// Samples in a row that make a verdict.
const STREAK: u32 = 2;
/// About how long one bandwidth probe of a healthy link takes.
const PROBE_TIME: Duration = Duration::from_millis(200);

/// The watch's state across rounds.
#[derive(Default)]
pub(super) struct Watch {
    last: Option<Instant>,
    epoch: u64,
    low: Vec<u32>,
    unusable: Vec<u32>,
}

impl Watch {
    /// A plan was installed now.
    pub(super) fn started(&mut self) {
        self.last = Some(Instant::now());
    }
}

impl Supervisor {
    fn idle(&self) -> bool {
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.serving && s.running == 0 && s.queued == 0
    }

    /// One round of the watch, when due and idle.
    pub(super) fn watch_links(&mut self) {
        // called every turn of the supervisor's loop: the cheap checks first
        let every = self.opts.ops.watch_every;
        if every.is_zero() || self.watch.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        let Some((up, epoch)) = self.plan.clone() else {
            return;
        };
        if up.is_empty() || !self.idle() {
            return;
        }
        self.watch.last = Some(Instant::now());
        let n = up.len() + 1;
        if self.watch.epoch != epoch {
            self.watch.epoch = epoch;
            self.watch.low = vec![0; n];
            self.watch.unusable = vec![0; n];
        }
        let mut control: Vec<(usize, Result<LinkReport, String>)> = Vec::new();
        for k in 0..n {
            // paused while requests run
            if !self.idle() || self.plan.as_ref().map(|p| p.1) != Some(epoch) {
                return;
            }
            let sample = if k == 0 || k == up.len() {
                let m = up[k.min(up.len() - 1)];
                match control.iter().find(|(i, _)| *i == m) {
                    Some((_, r)) => r.clone(),
                    None => {
                        let r = self.sample_control(m, self.probe_bytes(k));
                        control.push((m, r.clone()));
                        r
                    }
                }
            } else {
                self.sample_next(up[k - 1], self.probe_bytes(k))
            };
            self.judge(k, sample, &up);
        }
    }

    /// Measures the head's link to member `m` (probes on its control link, answers through
    /// its reader).
    /// Bytes of link `k`'s bandwidth probes: about [`PROBE_TIME`] of its baseline, between 1 MiB
    /// and [`PROBE_BYTES`] (what the join measured with), so a round's cost is bounded in time on
    /// a slow link too.
    fn probe_bytes(&self, k: usize) -> usize {
        let sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let baseline = sh.links.get(k).map_or(0.0, |l| l.baseline_bytes_per_s);
        ((baseline * PROBE_TIME.as_secs_f64()) as usize).clamp(1 << 20, PROBE_BYTES)
    }

    fn sample_control(&self, m: usize, bytes: usize) -> Result<LinkReport, String> {
        let Some(u) = self.members[m].up.as_ref() else {
            return Err("not connected".into());
        };
        while u.samples.try_recv().is_ok() {}
        let tx = u.tx.clone();
        u.probing.store(true, Ordering::Release);
        let r = measure_with(
            u.report.transport.clone(),
            |msg, _| send_shared(&tx, msg),
            |deadline| recv(&u.samples, deadline.remaining()),
            bytes,
        )
        .map_err(|e| e.to_string());
        u.probing.store(false, Ordering::Release);
        r
    }

    /// Has member `m` measure its link to the next stage.
    fn sample_next(&self, m: usize, bytes: usize) -> Result<LinkReport, String> {
        let Some(u) = self.members[m].up.as_ref() else {
            return Err("not connected".into());
        };
        while u.samples.try_recv().is_ok() {}
        send_shared(
            &u.tx,
            &Msg::SampleNext {
                bytes: bytes as u64,
            },
        )
        .map_err(|e| e.to_string())?;
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            match recv(&u.samples, end.saturating_duration_since(Instant::now())) {
                Ok(Msg::LinkSample(r)) => return r,
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Records link `k`'s sample and decides: warn, recover, or re-plan around it.
    fn judge(&mut self, k: usize, sample: Result<LinkReport, String>, up: &[usize]) {
        let ops = self.opts.ops.clone();
        let (from, to, verdict) = {
            let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let Some(l) = sh.links.get_mut(k) else {
                return;
            };
            let verdict = match &sample {
                Ok(r) => {
                    l.bytes_per_s = r.bytes_per_s as f64;
                    l.rtt_us = f64::from(r.rtt_us);
                    l.samples += 1;
                    let fraction = l.bytes_per_s / l.baseline_bytes_per_s.max(1.0);
                    let slow = fraction < ops.min_fraction;
                    let late = l.rtt_us > l.baseline_rtt_us + ops.max_rtt_rise_us;
                    let what = (slow || late).then(|| {
                        format!(
                            "link {} → {}: {:.0} MB/s, {:.0}% of its baseline {:.0} MB/s; round trip {:.0} µs (baseline {:.0} µs)",
                            l.from,
                            l.to,
                            l.bytes_per_s / 1e6,
                            fraction * 100.0,
                            l.baseline_bytes_per_s / 1e6,
                            l.rtt_us,
                            l.baseline_rtt_us
                        )
                    });
                    (what, fraction < UNUSABLE)
                }
                Err(e) => (
                    Some(format!("link {} → {}: its probe failed: {e}", l.from, l.to)),
                    true,
                ),
            };
            (l.from.clone(), l.to.clone(), verdict)
        };
        let (what, unusable) = verdict;
        let low = &mut self.watch.low[k];
        *low = if what.is_some() { *low + 1 } else { 0 };
        let streak = *low;
        let bad = &mut self.watch.unusable[k];
        *bad = if unusable { *bad + 1 } else { 0 };
        let unusable_streak = *bad;
        {
            let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let l = &mut sh.links[k];
            match &what {
                Some(w) if streak >= STREAK => {
                    if l.warning.is_none() {
                        tracing::warn!(%from, %to, "link degraded: {w}");
                    }
                    l.warning = Some(w.clone());
                }
                None if l.warning.is_some() => {
                    tracing::info!(%from, %to, mb_per_s = l.bytes_per_s / 1e6, "link recovered");
                    l.warning = None;
                }
                _ => {}
            }
        }
        if unusable_streak >= STREAK {
            // the node at the link's far end (the last link's far end is the head: its near end)
            let far = up[k.min(up.len() - 1)];
            let rest: Vec<usize> = up.iter().copied().filter(|&i| i != far).collect();
            if matches!(self.place(&rest), Ok(Ok(_))) {
                tracing::warn!(%from, %to, worker = %self.members[far].addr, "the link is no longer usable: re-planning without the worker");
                self.members[far].benched_until = Some(Instant::now() + BENCH);
                self.update_node(far, |n| {
                    n.error = Some(format!(
                        "left out of the plan: the link {from} → {to} is no longer usable"
                    ));
                });
                self.watch.unusable[k] = 0;
                self.dirty = true;
            } else if unusable_streak == STREAK {
                tracing::warn!(%from, %to, "the link is no longer usable, but the other nodes cannot hold the model: keeping it");
            }
        }
    }
}

fn recv(rx: &std::sync::mpsc::Receiver<Msg>, timeout: Duration) -> crate::error::Result<Msg> {
    rx.recv_timeout(timeout).map_err(|e| match e {
        RecvTimeoutError::Timeout => {
            crate::error::Error::Degraded("no answer to a link probe within its deadline".into())
        }
        RecvTimeoutError::Disconnected => {
            crate::error::Error::Degraded("the worker's link closed".into())
        }
    })
}
