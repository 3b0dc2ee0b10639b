//! How a backend waits for its peer: spin (lowest latency, burns a core), block (sleeps in the
//! kernel; a cross-core wake-up costs tens of µs on a VM) or adaptive (spin for a bounded time,
//! then block). Every wait is bounded by a [`Deadline`].

use std::fmt;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::deadline::Deadline;

/// Default spin budget of [`WaitStrategy::Adaptive`]: longer than a typical busy-polled round
/// trip, shorter than a scheduler tick.
pub const DEFAULT_ADAPTIVE_SPIN: Duration = Duration::from_micros(50);

/// How to wait for a socket (or ring) to become ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Busy-poll until ready or the deadline.
    Spin,
    /// Sleep in `poll(2)` until ready or the deadline.
    Block,
    /// Busy-poll for up to `spin`, then sleep.
    Adaptive {
        /// How long to spin before blocking.
        spin: Duration,
    },
}

impl Default for WaitStrategy {
    fn default() -> Self {
        WaitStrategy::Adaptive {
            spin: DEFAULT_ADAPTIVE_SPIN,
        }
    }
}

impl fmt::Display for WaitStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitStrategy::Spin => f.write_str("spin"),
            WaitStrategy::Block => f.write_str("block"),
            WaitStrategy::Adaptive { .. } => f.write_str("adaptive"),
        }
    }
}

impl FromStr for WaitStrategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spin" => Ok(WaitStrategy::Spin),
            "block" => Ok(WaitStrategy::Block),
            "adaptive" => Ok(WaitStrategy::default()),
            other => Err(format!(
                "unknown wait strategy {other:?}: expected spin, block or adaptive"
            )),
        }
    }
}

/// The state of one blocking call's waiting: created when the call starts.
pub(crate) struct Waiter {
    strategy: WaitStrategy,
    started: Instant,
}

impl Waiter {
    pub(crate) fn new(strategy: WaitStrategy) -> Self {
        Waiter {
            strategy,
            started: Instant::now(),
        }
    }

    /// Whether the next attempt should sleep in the kernel rather than spin.
    pub(crate) fn should_block(&self) -> bool {
        match self.strategy {
            WaitStrategy::Spin => false,
            WaitStrategy::Block => true,
            WaitStrategy::Adaptive { spin } => self.started.elapsed() >= spin,
        }
    }

    /// Time since the call started.
    pub(crate) fn waited(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until `fd` may be readable (or may accept a connection) or the deadline passes.
    /// Returns `Ok(false)` once the deadline has passed; `Ok(true)` means "try again" (readiness
    /// is a hint).
    pub(crate) fn wait_readable(&mut self, fd: RawFd, deadline: Deadline) -> std::io::Result<bool> {
        if deadline.expired() {
            return Ok(false);
        }
        if !self.should_block() {
            std::hint::spin_loop();
            return Ok(true);
        }
        poll_readable(fd, deadline.remaining())?;
        Ok(true)
    }
}

/// Sleeps in `poll(2)` until `fd` is readable or `timeout` passes (rounded up to whole ms).
pub(crate) fn poll_readable(fd: RawFd, timeout: Duration) -> std::io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is a valid, initialised pollfd that outlives the call, and we pass a count of 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line_names() {
        assert_eq!("spin".parse::<WaitStrategy>().unwrap(), WaitStrategy::Spin);
        assert_eq!(
            "block".parse::<WaitStrategy>().unwrap(),
            WaitStrategy::Block
        );
        assert!(matches!(
            "adaptive".parse::<WaitStrategy>().unwrap(),
            WaitStrategy::Adaptive { .. }
        ));
        assert!("busy".parse::<WaitStrategy>().is_err());
    }

    #[test]
    fn every_strategy_gives_up_at_the_deadline() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        for s in [
            WaitStrategy::Spin,
            WaitStrategy::Block,
            WaitStrategy::default(),
        ] {
            let mut w = Waiter::new(s);
            let t = Instant::now();
            let d = Deadline::after(Duration::from_millis(30));
            while w.wait_readable(a.as_raw_fd(), d).unwrap() {}
            assert!(t.elapsed() >= Duration::from_millis(30));
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{s}: waited {:?}",
                t.elapsed()
            );
        }
    }
}
