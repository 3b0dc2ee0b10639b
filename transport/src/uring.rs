//! The io_uring backend: the link's TCP socket driven through io_uring rings, one per half so the
//! two halves never contend.
//!
//! The socket is a registered (fixed) file in each ring. The receiver's read-ahead buffer and the
//! sender's staging buffer for small messages are registered buffers (`READ_FIXED`,
//! `WRITE_FIXED`); large payloads move straight between the socket and the caller's buffer
//! (`SENDMSG` / `RECV` with `MSG_WAITALL`, so one submission moves the whole payload). When a
//! call's deadline passes with its operation in flight, the operation is cancelled and its
//! completion reaped before the call returns: the caller's buffer is never left in flight. No
//! timer is armed on the fast path (timers cost VM exits); completions are awaited by the link's
//! wait strategy: spinning on the completion ring in user space (entering the kernel only when it
//! flags pending work), or sleeping in `io_uring_enter`.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use io_uring::{IoUring, Probe, opcode, squeue, types};
use nix::sys::socket::{MsgFlags, sendmsg};

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::stream::{ByteSink, ByteSource};
use crate::wait::{WaitStrategy, Waiter};

const RING_ENTRIES: u32 = 8;
const OP: u64 = 1;
const CANCEL: u64 = 2;
/// Messages up to this size (header included) are copied into a registered buffer and sent with
/// `WRITE_FIXED`; larger ones are sent from the caller's memory.
const STAGE: usize = 16 << 10;
/// The most bytes one operation moves: large payloads go as a sequence of operations of this
/// size, each completed as the socket drains or fills. The slack keeps a 1 MiB message and its
/// frame header in one operation.
const MAX_OP: usize = (1 << 20) + 4096;
/// The receiver's registered read-ahead buffer.
pub(crate) const READ_AHEAD: usize = 16 << 10;

/// Whether io_uring can be used here, and if not, why — probed once per process.
///
/// # Errors
/// A one-line reason: no kernel support (ENOSYS), refused by seccomp or sysctl (EPERM), the
/// locked-memory limit (ENOMEM), or a missing operation on an old kernel.
pub fn probe() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let ring = new_ring().map_err(|e| describe("io_uring_setup", &e))?;
            let mut probe = Probe::new();
            ring.submitter()
                .register_probe(&mut probe)
                .map_err(|e| describe("io_uring_register(PROBE)", &e))?;
            if !ring.params().is_feature_ext_arg() {
                return Err(
                    "this kernel's io_uring lacks timed waits (EXT_ARG, Linux 5.11+)".into(),
                );
            }
            for (code, name) in [
                (opcode::ReadFixed::CODE, "READ_FIXED"),
                (opcode::WriteFixed::CODE, "WRITE_FIXED"),
                (opcode::Recv::CODE, "RECV"),
                (opcode::SendMsg::CODE, "SENDMSG"),
                (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
            ] {
                if !probe.is_supported(code) {
                    return Err(format!(
                        "this kernel's io_uring lacks {name} (needs Linux 5.11+)"
                    ));
                }
            }
            let mut page = vec![0u8; 4096];
            let iov = [libc::iovec {
                iov_base: page.as_mut_ptr().cast(),
                iov_len: page.len(),
            }];
            // SAFETY: `page` outlives the registration: the ring (and with it the registration)
            // is dropped at the end of this closure, before `page`.
            unsafe { ring.submitter().register_buffers(&iov) }
                .map_err(|e| describe("io_uring_register(BUFFERS)", &e))?;
            drop(ring);
            Ok(())
        })
        .clone()
}

/// A ring whose completions are announced by a flag in shared memory rather than by an
/// inter-processor interrupt (COOP_TASKRUN + TASKRUN_FLAG, Linux 5.19+), so a spinning waiter
/// sees them without a VM exit; older kernels get a plain ring.
fn new_ring() -> io::Result<IoUring> {
    match IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(RING_ENTRIES)
    {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(RING_ENTRIES),
        Err(e) => Err(e),
    }
}

fn describe(call: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => format!("{call}: ENOSYS: this kernel has no io_uring support"),
        Some(libc::EPERM) => {
            format!(
                "{call}: EPERM: io_uring is refused here (a seccomp policy, or the kernel.io_uring_disabled sysctl)"
            )
        }
        Some(libc::ENOMEM) => {
            format!(
                "{call}: ENOMEM: the locked-memory limit is too low for io_uring buffers (raise ulimit -l)"
            )
        }
        Some(libc::EINVAL) => {
            format!("{call}: EINVAL: this kernel's io_uring is too old for the features used")
        }
        _ => format!("{call}: {e}"),
    }
}

/// One ring driving the link's socket in one direction.
struct Ring {
    ring: IoUring,
    peer: String,
    wait: WaitStrategy,
    /// Keeps the socket open while it is registered.
    stream: Arc<TcpStream>,
    /// The timeout of a blocking wait.
    timespec: Box<types::Timespec>,
    /// A registered buffer: (address, length).
    registered: Option<(*mut u8, usize)>,
    /// Set when an enter failed with an entry possibly still queued.
    poisoned: Option<String>,
}

// SAFETY: the raw pointer in `registered` designates memory owned by the half that owns this ring
// (moved together between threads), and is only dereferenced by the kernel for operations this
// ring submits while that half is borrowed mutably.
unsafe impl Send for Ring {}

impl Ring {
    fn new(stream: Arc<TcpStream>, peer: String, wait: WaitStrategy) -> Result<Ring> {
        let unavailable = |reason: String| Error::Unavailable {
            transport: "uring".into(),
            reason,
        };
        let ring = new_ring().map_err(|e| unavailable(describe("io_uring_setup", &e)))?;
        ring.submitter()
            .register_files(&[stream.as_raw_fd()])
            .map_err(|e| unavailable(describe("io_uring_register(FILES)", &e)))?;
        Ok(Ring {
            ring,
            peer,
            wait,
            stream,
            timespec: Box::new(types::Timespec::new()),
            registered: None,
            poisoned: None,
        })
    }

    /// Registers `buf` as fixed buffer 0.
    ///
    /// # Safety
    /// `buf` must stay allocated, at the same address, for as long as this ring exists.
    unsafe fn register(&mut self, buf: &mut [u8]) -> Result<()> {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the caller guarantees the buffer outlives the ring, hence the registration.
        unsafe { self.ring.submitter().register_buffers(&iov) }.map_err(|e| {
            Error::Unavailable {
                transport: "uring".into(),
                reason: describe("io_uring_register(BUFFERS)", &e),
            }
        })?;
        self.registered = Some((buf.as_mut_ptr(), buf.len()));
        Ok(())
    }

    /// Whether `buf` lies inside the registered buffer.
    fn is_registered(&self, buf: &[u8]) -> bool {
        self.registered.is_some_and(|(p, n)| {
            let (start, end) = (p as usize, p as usize + n);
            let b = buf.as_ptr() as usize;
            b >= start && b + buf.len() <= end
        })
    }

    /// Runs the operation `make_op` builds until it moves bytes, fails, or the deadline passes,
    /// and returns the bytes moved. While the strategy spins, the operation is built non-blocking
    /// (`make_op(true)`: it completes at once, with `EAGAIN` when the socket is not ready, and is
    /// retried at once — as a spinning socket call would be, never waiting for a readiness
    /// event); once it blocks, the operation waits in the kernel.
    ///
    /// # Safety
    /// Every buffer the operations reference must stay valid until this function returns; it
    /// returns only after the kernel has completed (or cancelled) each of them.
    unsafe fn run(
        &mut self,
        make_op: impl Fn(bool) -> squeue::Entry,
        deadline: Deadline,
        what: &'static str,
    ) -> Result<usize> {
        let waiter = Waiter::new(self.wait);
        let mut spins = 0u32;
        loop {
            let spinning = !waiter.should_block();
            // SAFETY: forwarded from the caller.
            let raw = unsafe { self.execute(make_op(spinning), deadline, &waiter, what)? };
            if spinning && raw == -libc::EAGAIN {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && deadline.expired() {
                    return Err(self.timeout(what, &waiter));
                }
                std::hint::spin_loop();
                continue;
            }
            return self.interpret(raw, what, &waiter);
        }
    }

    /// Submits `op` and waits for its completion (result as the kernel gives it). At the deadline
    /// the operation is cancelled and its completion reaped before returning.
    ///
    /// # Safety
    /// As for [`Ring::run`].
    unsafe fn execute(
        &mut self,
        op: squeue::Entry,
        deadline: Deadline,
        waiter: &Waiter,
        what: &'static str,
    ) -> Result<i32> {
        if let Some(cause) = &self.poisoned {
            return Err(Error::Broken {
                peer: self.peer.clone(),
                cause: format!("io_uring_enter failed earlier: {cause}"),
            });
        }
        if deadline.expired() {
            return Err(self.timeout(what, waiter));
        }
        let op = op.user_data(OP);
        // SAFETY: the buffers `op` references stay valid until its completion is reaped below
        // (the caller's contract); every path out of this function reaps it first.
        if unsafe { self.ring.submission().push(&op) }.is_err() {
            // Cannot happen: every call reaps all it submitted, so the queue is empty here.
            return Err(self.io_error(what, io::Error::other("submission queue full")));
        }
        if let Err(e) = self.enter(0) {
            // The entry may still sit in the submission queue: never enter this ring again, so it
            // can never be submitted after the caller's buffer is gone.
            self.poisoned = Some(e.to_string());
            return Err(self.io_error(what, e));
        }
        let mut spins = 0u32;
        loop {
            let done = self.ring.completion().next().map(|cqe| cqe.result());
            if let Some(result) = done {
                return Ok(result);
            }
            if waiter.should_block() {
                let remaining = deadline.remaining();
                if remaining.is_zero() {
                    break;
                }
                *self.timespec = types::Timespec::from(remaining);
                let ts: &types::Timespec = &self.timespec;
                // ETIME (the wait timed out) and EINTR just mean "look again".
                let _ = self
                    .ring
                    .submitter()
                    .submit_with_args(1, &types::SubmitArgs::new().timespec(ts));
            } else {
                if self.ring.submission().taskrun() {
                    // The completion is pending as task work: any enter runs it.
                    let _ = self.enter(0);
                }
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && deadline.expired() {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        // The deadline passed with the operation in flight: cancel it, and reap its completion
        // before the caller's buffer can go away.
        let cancel = opcode::AsyncCancel::new(OP).build().user_data(CANCEL);
        // SAFETY: a cancel request references no memory.
        let _ = unsafe { self.ring.submission().push(&cancel) };
        let mut result = None;
        let mut cancel_reaped = false;
        while result.is_none() || !cancel_reaped {
            if self.enter(1).is_err() {
                std::hint::spin_loop();
            }
            for cqe in self.ring.completion() {
                match cqe.user_data() {
                    OP => result = Some(cqe.result()),
                    _ => cancel_reaped = true,
                }
            }
        }
        match result {
            // Completed (fully or in part) just before the cancel took effect.
            Some(n) if n > 0 => Ok(n),
            _ => Err(self.timeout(what, waiter)),
        }
    }

    /// [`Ring::run`] until `deadline`, or with `None` one non-blocking attempt: `Ok(None)` when
    /// the socket was not ready.
    ///
    /// # Safety
    /// As for [`Ring::run`].
    unsafe fn dispatch(
        &mut self,
        make_op: impl Fn(bool) -> squeue::Entry,
        deadline: Option<Deadline>,
        what: &'static str,
    ) -> Result<Option<usize>> {
        match deadline {
            // SAFETY: forwarded from the caller.
            Some(d) => unsafe { self.run(make_op, d, what) }.map(Some),
            None => {
                let waiter = Waiter::new(WaitStrategy::Spin);
                // A non-blocking operation completes at once; the deadline only bounds a kernel
                // that misbehaves.
                let far = Deadline::after(std::time::Duration::from_secs(5));
                // SAFETY: forwarded from the caller.
                match unsafe { self.execute(make_op(true), far, &waiter, what)? } {
                    r if r == -libc::EAGAIN => Ok(None),
                    r => self.interpret(r, what, &waiter).map(Some),
                }
            }
        }
    }

    /// `io_uring_enter`, retrying when interrupted.
    fn enter(&mut self, want: usize) -> io::Result<usize> {
        loop {
            match self.ring.submit_and_wait(want) {
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                other => return other,
            }
        }
    }

    fn interpret(&self, result: i32, what: &'static str, waiter: &Waiter) -> Result<usize> {
        match result {
            n if n >= 0 => Ok(n as usize),
            e if e == -libc::ECANCELED || e == -libc::ETIME => Err(self.timeout(what, waiter)),
            e => Err(self.io_error(what, io::Error::from_raw_os_error(-e))),
        }
    }

    fn timeout(&self, op: &'static str, waiter: &Waiter) -> Error {
        Error::Timeout {
            op,
            waited: waiter.waited(),
            peer: self.peer.clone(),
        }
    }

    fn io_error(&self, op: &'static str, error: io::Error) -> Error {
        Error::from_socket(op, &self.peer, error)
    }
}

/// The sending end: a ring and a registered staging buffer for small messages.
pub(crate) struct UringSink {
    // Dropped before `stage`, which it has registered.
    ring: Ring,
    stage: Box<[u8]>,
}

impl UringSink {
    pub(crate) fn new(stream: Arc<TcpStream>, peer: String, wait: WaitStrategy) -> Result<Self> {
        let mut ring = Ring::new(stream, peer, wait)?;
        let mut stage = vec![0u8; STAGE].into_boxed_slice();
        // SAFETY: `stage` is a heap allocation owned by the sink next to the ring and dropped
        // after it (field order), so it outlives the registration.
        unsafe { ring.register(&mut stage)? };
        Ok(UringSink { ring, stage })
    }
}

impl UringSink {
    /// One send: waiting by the strategy until `deadline`, or (`None`) one attempt that takes
    /// only what fits now.
    fn write(&mut self, parts: &[&[u8]], deadline: Option<Deadline>) -> Result<usize> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total <= self.stage.len() {
            let mut at = 0;
            for p in parts {
                self.stage[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            let stage = self.stage.as_ptr();
            let op = |nowait: bool| {
                opcode::WriteFixed::new(types::Fixed(0), stage, total as u32, 0)
                    .offset(u64::MAX)
                    .rw_flags(if nowait { libc::RWF_NOWAIT } else { 0 })
                    .build()
            };
            // SAFETY: `stage` is registered buffer 0 and lives as long as the ring.
            return unsafe { self.ring.dispatch(op, deadline, "send") }.map(|n| n.unwrap_or(0));
        }
        // At most MAX_OP bytes per operation: the caller loops.
        let mut budget = MAX_OP;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len());
        for p in parts {
            let n = p.len().min(budget);
            if n == 0 {
                break;
            }
            iov.push(libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: n,
            });
            budget -= n;
        }
        // SAFETY: an all-zero msghdr is a valid empty message header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        let msg_ptr: *const libc::msghdr = &msg;
        // A large payload is one submission that the kernel completes as the socket drains,
        // whatever the strategy: waiting on its completion beats re-submitting partial sends.
        // A single attempt (no deadline) takes only what fits now.
        let attempt = deadline.is_none();
        let op = |_nowait: bool| {
            let flags = if attempt {
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL
            } else {
                libc::MSG_WAITALL | libc::MSG_NOSIGNAL
            };
            opcode::SendMsg::new(types::Fixed(0), msg_ptr)
                .flags(flags as u32)
                .build()
        };
        // SAFETY: `msg`, `iov` and the caller's `parts` live until `dispatch` returns, which is
        // after the operation completed.
        unsafe { self.ring.dispatch(op, deadline, "send") }.map(|n| n.unwrap_or(0))
    }
}

impl ByteSink for UringSink {
    fn peer(&self) -> &str {
        &self.ring.peer
    }

    fn write_some(&mut self, parts: &[&[u8]], deadline: Deadline) -> Result<usize> {
        self.write(parts, Some(deadline))
    }

    fn try_write_some(&mut self, parts: &[&[u8]]) -> Result<usize> {
        self.write(parts, None)
    }

    fn close(&mut self, farewell: &[u8]) {
        let fd = self.ring.stream.as_raw_fd();
        let _ = sendmsg::<()>(
            fd,
            &[io::IoSlice::new(farewell)],
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        );
        let _ = self.ring.stream.shutdown(std::net::Shutdown::Write);
    }
}

/// The receiving end: a ring whose registered buffer is the receiver's read-ahead.
pub(crate) struct UringSource {
    ring: Ring,
}

impl UringSource {
    /// One receive: waiting by the strategy until `deadline`, or (`None`) one attempt that
    /// takes only what has arrived (`Ok(None)` when nothing has).
    fn read(
        &mut self,
        buf: &mut [u8],
        deadline: Option<Deadline>,
        mid_frame: bool,
    ) -> Result<Option<usize>> {
        let registered = self.ring.is_registered(buf);
        let len = buf.len().min(MAX_OP) as u32;
        let ptr = buf.as_mut_ptr();
        let attempt = deadline.is_none();
        let op = |nowait: bool| {
            if registered {
                opcode::ReadFixed::new(types::Fixed(0), ptr, len, 0)
                    .offset(u64::MAX)
                    .rw_flags(if nowait { libc::RWF_NOWAIT } else { 0 })
                    .build()
            } else {
                // The rest of a large payload: one submission the kernel completes as data
                // arrives (see the send side); a single attempt takes what is there.
                let flags = if attempt {
                    libc::MSG_DONTWAIT
                } else {
                    libc::MSG_WAITALL
                };
                opcode::Recv::new(types::Fixed(0), ptr, len)
                    .flags(flags)
                    .build()
            }
        };
        // SAFETY: `buf` is borrowed mutably for this whole call and `dispatch` returns only
        // after the operation completed.
        match unsafe { self.ring.dispatch(op, deadline, "recv")? } {
            Some(0) if len > 0 => Err(Error::PeerGone {
                peer: self.ring.peer.clone(),
                detail: if mid_frame {
                    "connection closed mid-frame".into()
                } else {
                    "connection closed without a close frame (peer died?)".into()
                },
            }),
            other => Ok(other),
        }
    }

    pub(crate) fn new(stream: Arc<TcpStream>, peer: String, wait: WaitStrategy) -> Result<Self> {
        Ok(UringSource {
            ring: Ring::new(stream, peer, wait)?,
        })
    }
}

impl ByteSource for UringSource {
    fn peer(&self) -> &str {
        &self.ring.peer
    }

    fn register_read_ahead(&mut self, buf: &mut [u8]) -> Result<()> {
        // SAFETY: the framed receiver owns `buf` (a boxed slice that never moves) and drops this
        // source before it (field order), so the buffer outlives the ring's registration.
        unsafe { self.ring.register(buf) }
    }

    fn read_some(&mut self, buf: &mut [u8], deadline: Deadline, mid_frame: bool) -> Result<usize> {
        self.read(buf, Some(deadline), mid_frame)?
            .ok_or_else(|| Error::Io {
                op: "recv",
                peer: self.ring.peer.clone(),
                error: io::Error::other("io_uring completed a waiting read without a result"),
            })
    }

    fn try_read_some(&mut self, buf: &mut [u8], mid_frame: bool) -> Result<Option<usize>> {
        self.read(buf, None, mid_frame)
    }
}
