//! Keeping a stage's cores from idling between its micro-batches.
//!
//! In a pipeline a stage computes in bursts: it waits while the other stages work on the
//! micro-batch, then runs its layers. A core left idle in that gap goes to sleep — a C-state on
//! bare metal, a halted vCPU handed back to the host in a VM — and the next burst pays for waking
//! it and for caches and TLBs others used meanwhile. On this project's VMs that cost a 2-stage
//! single stream about a tenth of its rate (`bench/CLUSTER.md`). llama.cpp's thread pool spins
//! between graphs for the same reason (`--poll`).
//!
//! Spinning on the link would take the core from the stage's own compute, so the spinning is
//! done by idle-priority threads (`SCHED_IDLE`, one per compute thread): the scheduler runs them
//! only on a core nothing else wants, and a waking compute thread preempts them at once. They
//! spin for `window` after each micro-batch, then sleep until the next, so an idle cluster costs
//! nothing. Linux only; elsewhere there is no idle priority to spin at, and nothing is started.
//! Nor under a cgroup CPU quota, which spinning time would count against.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The default spinning window after a micro-batch.
pub const DEFAULT_KEEP_WARM: Duration = Duration::from_millis(200);

const NEVER: u64 = u64::MAX;

/// Idle-priority spinners for one stage; they stop when this is dropped.
pub struct KeepWarm {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Shared {
    epoch: Instant,
    window_us: u64,
    /// Microseconds since `epoch` of the last micro-batch ([`NEVER`] before the first).
    last_us: AtomicU64,
    /// Spinners asleep (or about to be): while any, `touch` must wake them.
    sleeping: AtomicUsize,
    stop: AtomicBool,
    /// Rounds of spinning so far (a few microseconds each).
    rounds: AtomicU64,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn warm(&self) -> bool {
        let last = self.last_us.load(Ordering::SeqCst);
        last != NEVER && self.now_us().saturating_sub(last) < self.window_us
    }

    fn spin(&self) {
        if !set_idle_priority() {
            // at normal priority a spinner would take the core from the compute
            return;
        }
        while !self.stop.load(Ordering::Acquire) {
            if self.warm() {
                for _ in 0..256 {
                    std::hint::spin_loop();
                }
                self.rounds.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.sleeping.fetch_add(1, Ordering::SeqCst);
            // checked again under the lock: a `touch` after this sees `sleeping` and notifies
            // under the lock, so the wake-up cannot be lost (a count, not a flag: one spinner
            // waking must not hide another that still sleeps)
            while !self.stop.load(Ordering::Acquire) && !self.warm() {
                g = self
                    .wake
                    .wait_timeout(g, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            self.sleeping.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl KeepWarm {
    /// `threads` spinners that spin for `window` after each [`KeepWarm::touch`]; `None` when
    /// `window` or `threads` is zero, or where threads cannot take the idle priority.
    pub fn start(threads: usize, window: Duration) -> Option<Self> {
        if threads == 0 || window.is_zero() || !cfg!(target_os = "linux") {
            return None;
        }
        if let Some(quota) = cpu_quota() {
            // spinning time would count against the quota and throttle the compute
            tracing::info!(%quota, "a CPU quota is set: the stage does not keep its cores awake");
            return None;
        }
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            window_us: window.as_micros() as u64,
            last_us: AtomicU64::new(NEVER),
            sleeping: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            rounds: AtomicU64::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let threads = (0..threads)
            .filter_map(|_| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name("sinew-warm".into())
                    .spawn(move || s.spin())
                    .ok()
            })
            .collect();
        Some(KeepWarm { shared, threads })
    }

    /// A micro-batch ran: spin for the window from now.
    pub fn touch(&self) {
        let s = &self.shared;
        s.last_us.store(s.now_us(), Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
    }

    /// Whether the spinners are spinning now (the window since the last micro-batch is open).
    pub fn is_warm(&self) -> bool {
        self.shared.warm()
    }

    /// Rounds of spinning so far, over all spinners.
    pub fn rounds(&self) -> u64 {
        self.shared.rounds.load(Ordering::Relaxed)
    }
}

impl Drop for KeepWarm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// This process's cgroup v2 CPU quota (`cpu.max` other than `max`), if one is set.
fn cpu_quota() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2: the line "0::/path"
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{}/cpu.max", path.trim_end())).ok()?;
    quota_of(&max).map(str::to_string)
}

/// The quota in a `cpu.max` text ("QUOTA PERIOD"), unless it is "max" (none).
fn quota_of(cpu_max: &str) -> Option<&str> {
    let quota = cpu_max.split_whitespace().next()?;
    (quota != "max").then_some(cpu_max.trim())
}

/// Puts the calling thread at the idle scheduling priority; false where it cannot.
fn set_idle_priority() -> bool {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_quota_is_read_from_cpu_max() {
        assert_eq!(quota_of("max 100000\n"), None);
        assert_eq!(quota_of("200000 100000\n"), Some("200000 100000"));
        assert_eq!(quota_of(""), None);
    }

    #[test]
    fn spins_after_a_touch_then_sleeps_and_stops_when_dropped() {
        if cpu_quota().is_some() {
            // under a quota nothing is started (checked below in its own terms)
            assert!(KeepWarm::start(1, DEFAULT_KEEP_WARM).is_none());
            return;
        }
        assert!(KeepWarm::start(0, DEFAULT_KEEP_WARM).is_none());
        assert!(KeepWarm::start(1, Duration::ZERO).is_none());
        if !cfg!(target_os = "linux") {
            assert!(KeepWarm::start(1, DEFAULT_KEEP_WARM).is_none());
            return;
        }
        let w = KeepWarm::start(2, Duration::from_millis(200)).unwrap();
        assert!(!w.is_warm(), "cold before the first micro-batch");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(w.rounds(), 0, "spun before the first micro-batch");
        // touched: the spinners spin (at idle priority: on a busy machine, slowly)
        w.touch();
        assert!(w.is_warm());
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.rounds() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(w.rounds() > 0, "no spinning in a warm window");
        // the window closes and they sleep: no more rounds
        std::thread::sleep(Duration::from_millis(400));
        assert!(!w.is_warm());
        let before = w.rounds();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(w.rounds(), before, "spinning after the window");
        // a touch wakes them again; dropping joins them mid-window
        w.touch();
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.rounds() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(w.rounds() > before, "not woken by a touch");
        let started = Instant::now();
        drop(w);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
