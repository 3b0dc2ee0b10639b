//! The io_uring backend: the link's TCP socket driven through io_uring rings, one per half so the
//! two halves never contend.
//!
//! The socket is a registered (fixed) file in each ring. The receiver's buffer (1 MiB, read by
//! `stream::ReadPolicy`; left unregistered when the locked-memory limit refuses it) and the
//! sender's staging buffer for small messages are registered buffers (`READ_FIXED`,
//! `WRITE_FIXED`); large payloads move straight between the socket and the caller's buffer: a
//! frame goes out as one `SENDMSG` with `MSG_WAITALL` gathering its header and payload. It comes
//! in by `RECV`s: while the strategy blocks, one that sleeps until the receive low-water mark is
//! queued and then takes all there is, as a blocking `recv(2)` does; a receiver that spins
//! retries non-blocking ones instead, leaving no poll armed for the sender to wake. A write
//! larger than one operation goes as a chain of up to seven linked operations in one
//! `io_uring_enter`, the kernel starting each as the one before it completes. When a
//! call's deadline passes with its operation in flight, the operation is cancelled and its
//! completion reaped before the call returns: the caller's buffer is never left in flight (should
//! the cancel not end it within a second, the socket is shut down under it). No
//! timer is armed on the fast path (timers cost VM exits); completions are awaited by the link's
//! wait strategy: spinning on the completion ring in user space (entering the kernel only when it
//! flags pending work), or sleeping in the `io_uring_enter` that submitted the operation.
//!
//! Each ring belongs to the thread that first submits to it. Where the kernel allows (Linux 6.1+)
//! it is set up single-issuer with deferred task work — completions are run in that thread's own
//! `io_uring_enter` calls, never by an interrupt — and its file descriptor is registered in that
//! thread's ring table, so `io_uring_enter` skips the file lookup every plain system call pays.
//! When a half moves to another thread, its next call builds a fresh ring there (the socket and
//! buffer registered again); the old ring is released when the thread that registered it exits
//! (at most 16 per thread: the kernel's table size, past which rings are entered by plain file
//! descriptor).

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, squeue, types};
use nix::sys::socket::{MsgFlags, sendmsg};

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::frame::ABSOLUTE_MAX_PAYLOAD;
use crate::stream::{ByteSink, ByteSource};
use crate::tcp::LowWater;
use crate::wait::{WaitStrategy, Waiter};

const RING_ENTRIES: u32 = 8;
/// User data of a submission's first operation; a chain's next ones count up from it.
const OP: u64 = 1;
/// User data of a cancel request.
const CANCEL: u64 = u64::MAX;
/// The most operations one submission chains (a ring entry stays free for a cancel): a large
/// write's operations go in one `io_uring_enter`.
const CHAIN: usize = RING_ENTRIES as usize - 1;
/// How long an operation may stay in flight after its cancel before the socket is shut down
/// under it. A cancel on a socket completes at once; this bounds a kernel that does not.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
/// A result slot no completion has filled yet (no kernel result is this negative).
const PENDING: i32 = i32::MIN;
/// Messages up to this size (header included) are copied into a registered buffer and sent with
/// `WRITE_FIXED`; larger ones are sent from the caller's memory.
const STAGE: usize = 16 << 10;
/// The most bytes one non-blocking receive attempt moves (a spinning receiver retries at once,
/// so the size only bounds one copy). The slack keeps a 1 MiB message and its frame header in
/// one attempt.
const MAX_OP: usize = (1 << 20) + 4096;
/// The most bytes one operation that waits in the kernel moves: a frame of the largest payload
/// and its header.
/// - A send goes as one operation the kernel completes as the socket drains. Split into linked
///   operations of [`MAX_OP`], 4–64 MiB messages ran 7–16% slower. The cost is per operation,
///   not per pushed segment (`MSG_MORE` on all but the last changed nothing); where in an
///   operation's completion and the next one's start it goes is not established. A write larger
///   than this (never a frame) goes as a chain.
/// - A blocking receive takes up to this much of what is queued when it wakes.
const WAIT_OP: usize = ABSOLUTE_MAX_PAYLOAD as usize + 4096;
const _: () = assert!(WAIT_OP <= i32::MAX as usize && MAX_OP <= WAIT_OP);
/// The most parts one send operation gathers (a frame is a header and a payload).
const IOV: usize = 4;
/// The receiver's read-ahead while messages are small (`stream::ReadPolicy`): 4 KiB instead cost
/// 5–10% streaming 1 KiB messages.
pub(crate) const WINDOW: usize = 16 << 10;

/// Whether io_uring can be used here, and if not, why — probed once per process.
///
/// # Errors
/// A one-line reason: no kernel support (ENOSYS), refused by seccomp or sysctl (EPERM), the
/// locked-memory limit (ENOMEM), or a missing operation on an old kernel.
pub fn probe() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let (ring, _) = new_ring().map_err(|e| describe("io_uring_setup", &e))?;
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

/// How a ring was set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    /// SINGLE_ISSUER + DEFER_TASKRUN + TASKRUN_FLAG, created disabled (Linux 6.1+): completions
    /// run only in the owning thread's `io_uring_enter`, announced by a flag in shared memory.
    /// Enabled by the thread that first submits, which becomes its only submitter.
    Deferred,
    /// COOP_TASKRUN + TASKRUN_FLAG (Linux 5.19+): completions are announced by the flag rather
    /// than by an inter-processor interrupt, so a spinning waiter sees them without a VM exit.
    Cooperative,
    /// Neither: older kernels.
    Plain,
}

/// The best ring this kernel sets up (see [`Flavor`]), falling back on `EINVAL`.
fn new_ring() -> io::Result<(IoUring, Flavor)> {
    let deferred = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_r_disabled()
        .build(RING_ENTRIES);
    let cooperative = || {
        IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)
    };
    let older = |e: &io::Error| e.raw_os_error() == Some(libc::EINVAL);
    match deferred {
        Ok(ring) => Ok((ring, Flavor::Deferred)),
        Err(e) if older(&e) => match cooperative() {
            Ok(ring) => Ok((ring, Flavor::Cooperative)),
            Err(e) if older(&e) => Ok((IoUring::new(RING_ENTRIES)?, Flavor::Plain)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// This thread's identity, never reused within the process (unlike thread-local addresses or
/// kernel thread ids).
fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

const ENTER_GETEVENTS: u32 = 1 << 0;
const ENTER_EXT_ARG: u32 = 1 << 3;
const ENTER_REGISTERED_RING: u32 = 1 << 4;
const REGISTER_RING_FDS: libc::c_long = 20;
const UNREGISTER_RING_FDS: libc::c_long = 21;

/// `struct io_uring_rsrc_update`, the argument of (UN)REGISTER_RING_FDS.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// `struct __kernel_timespec`.
#[repr(C)]
struct KernelTimespec {
    sec: i64,
    nsec: i64,
}

/// `struct io_uring_getevents_arg`: the timeout of a waiting `io_uring_enter` (EXT_ARG).
#[repr(C)]
struct GeteventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// Registers `ring`'s file descriptor in this thread's ring table: its index, or `None` when the
/// kernel refuses (older than 5.18, or the table is full).
fn register_ring_fd(ring: &IoUring) -> Option<u32> {
    let mut update = RsrcUpdate {
        offset: u32::MAX,
        resv: 0,
        data: ring.as_raw_fd() as u64,
    };
    // SAFETY: `update` is a valid io_uring_rsrc_update for the duration of the call, and the
    // count (1) matches it; the kernel writes the chosen index into `offset`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            REGISTER_RING_FDS,
            &mut update as *mut RsrcUpdate,
            1,
        )
    };
    (r == 1).then_some(update.offset)
}

/// Removes the entry `index` from this thread's ring table.
fn unregister_ring_fd(ring: &IoUring, index: u32) {
    let update = RsrcUpdate {
        offset: index,
        resv: 0,
        data: 0,
    };
    // SAFETY: as for `register_ring_fd`; the kernel only reads `update`.
    unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            UNREGISTER_RING_FDS,
            &update as *const RsrcUpdate,
            1,
        );
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

fn unavailable(call: &str, e: &io::Error) -> Error {
    Error::Unavailable {
        transport: "uring".into(),
        reason: describe(call, e),
    }
}

/// A new ring (see [`new_ring`]) with `stream` as its fixed file 0.
fn ring_for(stream: &TcpStream) -> Result<(IoUring, Flavor)> {
    let (ring, flavor) = new_ring().map_err(|e| unavailable("io_uring_setup", &e))?;
    ring.submitter()
        .register_files(&[stream.as_raw_fd()])
        .map_err(|e| unavailable("io_uring_register(FILES)", &e))?;
    Ok((ring, flavor))
}

/// Registers the `len` bytes at `ptr` as `ring`'s fixed buffer 0; returns whether it did. When
/// `optional` and the locked-memory limit refuses it, the buffer stays unregistered (operations on
/// it then pass its address, as a socket call would) and the reason is logged.
///
/// # Safety
/// The memory must stay allocated, at the same address, for as long as `ring` exists.
unsafe fn register_buffer(
    ring: &IoUring,
    ptr: *mut u8,
    len: usize,
    optional: bool,
    peer: &str,
) -> Result<bool> {
    let iov = [libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    }];
    // SAFETY: forwarded from the caller.
    match unsafe { ring.submitter().register_buffers(&iov) } {
        Ok(()) => Ok(true),
        Err(e) if optional && over_memlock(&e) => {
            let why = describe("io_uring_register(BUFFERS)", &e);
            tracing::info!(
                peer,
                bytes = len,
                "io_uring receive buffer left unregistered: {why}"
            );
            Ok(false)
        }
        Err(e) => Err(unavailable("io_uring_register(BUFFERS)", &e)),
    }
}

/// Whether a buffer registration failed for the locked-memory limit (`ulimit -l`), which the
/// kernel charges registered buffers to unless the process has `CAP_IPC_LOCK`.
fn over_memlock(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOMEM)
}

/// One ring driving the link's socket in one direction.
struct Ring {
    ring: IoUring,
    flavor: Flavor,
    /// The thread that submits to this ring, once one has ([`thread_tag`]).
    owner: Option<u64>,
    /// The ring's index in its owner's ring table, when it is registered there.
    ring_index: Option<u32>,
    peer: String,
    wait: WaitStrategy,
    /// Keeps the socket open while it is registered.
    stream: Arc<TcpStream>,
    /// A registered buffer: (address, length).
    registered: Option<(*mut u8, usize)>,
    /// Whether the buffer may go unregistered when the locked-memory limit refuses it.
    optional: bool,
    /// Set when an enter failed with an entry possibly still queued.
    poisoned: Option<String>,
    /// How long a cancelled operation may stay in flight before the socket is shut down under
    /// it ([`CANCEL_GRACE`]; tests shorten it).
    cancel_grace: Duration,
    /// Tests: cancel requests cancel nothing, as from a kernel that ignores them.
    #[cfg(test)]
    cancel_ignored: bool,
    /// The socket's receive low-water mark, and the mark the next blocking operation wants
    /// (raised by the receiving end for a large owed payload; 1 otherwise, and always on the
    /// sending end).
    low_water: LowWater,
    mark: usize,
}

// SAFETY: the raw pointer in `registered` designates memory owned by the half that owns this ring
// (moved together between threads), and is only dereferenced by the kernel for operations this
// ring submits while that half is borrowed mutably.
unsafe impl Send for Ring {}

impl Ring {
    fn new(stream: Arc<TcpStream>, peer: String, wait: WaitStrategy) -> Result<Ring> {
        let (ring, flavor) = ring_for(&stream)?;
        Ok(Ring {
            ring,
            flavor,
            owner: None,
            ring_index: None,
            peer,
            wait,
            stream,
            registered: None,
            optional: false,
            poisoned: None,
            cancel_grace: CANCEL_GRACE,
            #[cfg(test)]
            cancel_ignored: false,
            low_water: LowWater::new(),
            mark: 1,
        })
    }

    /// Gives the socket the low-water mark this ring's next blocking operation wants.
    fn lower_water(&mut self, what: &'static str) -> Result<()> {
        let fd = self.stream.as_raw_fd();
        self.low_water
            .set(fd, self.mark)
            .map_err(|e| self.io_error(what, e))
    }

    /// Makes the calling thread this ring's owner: on first use it enables the ring and registers
    /// its descriptor in the thread's ring table; on a thread other than the owner it first
    /// replaces the ring with a fresh one holding the same registrations (a single-issuer ring
    /// refuses other threads, and ring table entries are per thread).
    fn claim(&mut self) -> Result<()> {
        let me = thread_tag();
        match self.owner {
            Some(owner) if owner == me => return Ok(()),
            Some(_) => self.rebuild()?,
            None => {}
        }
        if self.flavor == Flavor::Deferred {
            self.ring
                .submitter()
                .register_enable_rings()
                .map_err(|e| unavailable("io_uring_register(ENABLE_RINGS)", &e))?;
        }
        self.ring_index = register_ring_fd(&self.ring);
        self.owner = Some(me);
        Ok(())
    }

    /// Replaces the ring with a fresh one: the socket and the registered buffer registered again.
    /// The old ring goes away now, or — when its descriptor is in another thread's ring table,
    /// which only that thread can change — when that thread exits.
    fn rebuild(&mut self) -> Result<()> {
        let (ring, flavor) = ring_for(&self.stream)?;
        if let Some((ptr, len)) = self.registered {
            // SAFETY: the buffer is the one `register` was given, which its caller guaranteed
            // outlives this ring (the struct, whichever io_uring instance it holds). An optional
            // one may be refused here even so: the old ring may still hold its registration
            // (until the thread whose ring table has it exits), charged to the same limit.
            if !unsafe { register_buffer(&ring, ptr, len, self.optional, &self.peer)? } {
                self.registered = None;
            }
        }
        self.ring = ring;
        self.flavor = flavor;
        self.owner = None;
        self.ring_index = None;
        Ok(())
    }

    /// `io_uring_enter(to_submit = what is queued, min_complete, flags, arg)`, through the ring
    /// table entry when there is one.
    fn enter_raw(
        &mut self,
        min_complete: u32,
        flags: u32,
        arg: Option<&GeteventsArg>,
    ) -> io::Result<usize> {
        let to_submit = self.ring.submission().len() as u32;
        let (fd, flags) = match self.ring_index {
            Some(index) => (index as libc::c_int, flags | ENTER_REGISTERED_RING),
            None => (self.ring.as_raw_fd(), flags),
        };
        let (arg, argsz) = match arg {
            Some(a) => (
                a as *const GeteventsArg,
                std::mem::size_of::<GeteventsArg>(),
            ),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `fd` designates this ring (its descriptor, or its entry in this thread's ring
        // table: `claim` ran on this thread); `arg`, when given, is a valid getevents argument
        // whose timespec outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                fd,
                to_submit,
                min_complete,
                flags,
                arg,
                argsz,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Registers `buf` as fixed buffer 0; returns whether it is registered. An `optional` one
    /// the locked-memory limit refuses stays unregistered ([`register_buffer`]), here and on a
    /// rebuild.
    ///
    /// # Safety
    /// `buf` must stay allocated, at the same address, for as long as this ring exists.
    unsafe fn register(&mut self, buf: &mut [u8], optional: bool) -> Result<bool> {
        self.optional = optional;
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: the caller guarantees the buffer outlives the ring, hence the registration.
        let registered = unsafe { register_buffer(&self.ring, ptr, len, optional, &self.peer)? };
        if registered {
            self.registered = Some((ptr, len));
        }
        Ok(registered)
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
            if !spinning {
                self.lower_water(what)?;
            }
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
        let mut result = [0i32];
        // SAFETY: forwarded from the caller.
        let timed_out = unsafe {
            self.execute_all(
                std::slice::from_ref(&op),
                &mut result,
                deadline,
                waiter,
                what,
            )?
        };
        match result[0] {
            // Completed (fully or in part) just before the cancel took effect.
            n if timed_out && n <= 0 => Err(self.timeout(what, waiter)),
            n => Ok(n),
        }
    }

    /// Submits `ops` in one `io_uring_enter` — a single operation, or a chain the kernel runs in
    /// order, each linked to the next so that a short or failed one cancels the rest — and waits
    /// for every completion: `results[i]` gets operation `i`'s result as the kernel gives it. At
    /// the deadline the operation in flight is cancelled (a chain's later ones with it) and every
    /// completion reaped before returning `Ok(true)`.
    ///
    /// # Safety
    /// As for [`Ring::run`], for every operation.
    unsafe fn execute_all(
        &mut self,
        ops: &[squeue::Entry],
        results: &mut [i32],
        deadline: Deadline,
        waiter: &Waiter,
        what: &'static str,
    ) -> Result<bool> {
        let n = ops.len();
        debug_assert!((1..=CHAIN).contains(&n) && results.len() == n);
        if let Some(cause) = &self.poisoned {
            return Err(Error::Broken {
                peer: self.peer.clone(),
                cause: format!("io_uring_enter failed earlier: {cause}"),
            });
        }
        if deadline.expired() {
            return Err(self.timeout(what, waiter));
        }
        self.claim()?;
        for (i, op) in ops.iter().enumerate() {
            let mut op = op.clone().user_data(OP + i as u64);
            if i + 1 < n {
                op = op.flags(squeue::Flags::IO_LINK);
            }
            // SAFETY: the buffers `op` references stay valid until its completion is reaped
            // below (the caller's contract); every path out of this function reaps it first.
            if unsafe { self.ring.submission().push(&op) }.is_err() {
                // Cannot happen: every call reaps all it submitted, and a chain leaves a free
                // entry, so the queue has room for it.
                return Err(self.io_error(what, io::Error::other("submission queue full")));
            }
        }
        // A blocking wait submits and sleeps in the same `io_uring_enter`. Once the entries are
        // submitted, the kernel reports how many rather than why the wait ended, so the loop
        // below looks at the completions either way.
        let submitted = if waiter.should_block() {
            self.wait_until(n as u32, deadline)
        } else {
            self.enter_raw(0, 0, None)
        };
        if submitted.is_err()
            && !self.ring.submission().is_empty()
            && let Err(e) = self.enter(0)
        {
            // The entries may still sit in the submission queue: never enter this ring again, so
            // they can never be submitted after the caller's buffers are gone.
            self.poisoned = Some(e.to_string());
            return Err(self.io_error(what, e));
        }
        results.fill(PENDING);
        let mut reaped = 0;
        let mut spins = 0u32;
        loop {
            reaped += self.reap(results).0;
            if reaped == n {
                return Ok(false);
            }
            if waiter.should_block() {
                if deadline.expired() {
                    break;
                }
                // ETIME (the wait timed out) and EINTR just mean "look again".
                let _ = self.wait_until((n - reaped) as u32, deadline);
            } else {
                if self.ring.submission().taskrun() {
                    // The completion is pending as task work, which an enter that gets events
                    // runs (deferred task work runs in no other).
                    let _ = self.enter_raw(0, ENTER_GETEVENTS, None);
                }
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && deadline.expired() {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        // The deadline passed with operations in flight: cancel the first one not completed (a
        // chain's later ones then fail with it), and reap every completion before the caller's
        // buffers can go away. A cancel that found its operation already done (the next one of
        // the chain started meanwhile) is followed by another.
        self.cancel_in_flight(results, reaped, what);
        Ok(true)
    }

    /// Cancels the operations of `results` still [`PENDING`] (`reaped` have completed) and
    /// reaps every completion. A cancel on a socket completes at once; should an operation
    /// still be in flight [`Ring::cancel_grace`] later, the socket is shut down under it (which
    /// ends any receive or send on it), and the wait goes on, logging each further grace
    /// period. Returning earlier would leave the kernel free to use a buffer its caller may
    /// free.
    fn cancel_in_flight(&mut self, results: &mut [i32], mut reaped: usize, what: &'static str) {
        let n = results.len();
        let mut grace = Deadline::after(self.cancel_grace);
        let mut shut_down = false;
        // The operation the last cancel targeted, and whether that cancel is still in flight.
        let (mut target, mut cancel_out) = (None, false);
        while reaped < n {
            let first = results.iter().position(|&r| r == PENDING).unwrap_or(0);
            if !cancel_out && target != Some(first) {
                let cancel = self.cancel_op(OP + first as u64);
                // SAFETY: a cancel request references no memory.
                if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
                    (target, cancel_out) = (Some(first), true);
                }
            }
            // Submits the cancel and sleeps until a completion or the grace period's end (ETIME
            // and EINTR just mean "look again").
            let _ = self.wait_until(1, grace);
            let (got, cancel) = self.reap(results);
            reaped += got;
            match cancel {
                // The operation was not found: it completed meanwhile (its completion may still
                // be on its way), or a chain's next one has started; look again.
                Some(r) if r == -libc::ENOENT => (target, cancel_out) = (None, false),
                // Cancelled, or too far along to stop: its completion follows.
                Some(_) => cancel_out = false,
                None => {}
            }
            if reaped < n && grace.expired() {
                let pending = n - reaped;
                if shut_down {
                    tracing::error!(
                        peer = %self.peer,
                        op = what,
                        pending,
                        "io_uring operation still in flight after its cancel and a shutdown of \
                         the socket; waiting on, as returning would free memory it uses"
                    );
                } else {
                    tracing::warn!(
                        peer = %self.peer,
                        op = what,
                        pending,
                        "io_uring operation still in flight {:?} after its cancel; shutting the \
                         link's socket down under it",
                        self.cancel_grace
                    );
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    shut_down = true;
                }
                grace = Deadline::after(self.cancel_grace);
            }
        }
    }

    /// The request that cancels the operation with user data `user_data`.
    fn cancel_op(&self, user_data: u64) -> squeue::Entry {
        #[cfg(test)]
        if self.cancel_ignored {
            // A request that cancels nothing: the kernel that ignores a cancel, for tests.
            return opcode::Nop::new().build().user_data(CANCEL);
        }
        opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(CANCEL)
    }

    /// `io_uring_enter` submitting what is queued and sleeping until `want` completions are
    /// there or the deadline passes.
    fn wait_until(&mut self, want: u32, deadline: Deadline) -> io::Result<usize> {
        let remaining = deadline.remaining();
        let ts = KernelTimespec {
            sec: remaining.as_secs() as i64,
            nsec: i64::from(remaining.subsec_nanos()),
        };
        let arg = GeteventsArg {
            sigmask: 0,
            sigmask_sz: 0,
            min_wait_usec: 0,
            ts: &ts as *const KernelTimespec as u64,
        };
        self.enter_raw(want, ENTER_GETEVENTS | ENTER_EXT_ARG, Some(&arg))
    }

    /// Takes every queued completion: an operation's result into `results` (by user data), a
    /// cancel's as seen. How many operations completed, and a cancel's result if one completed.
    fn reap(&mut self, results: &mut [i32]) -> (usize, Option<i32>) {
        let (mut got, mut cancel) = (0, None);
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            if ud == CANCEL {
                cancel = Some(cqe.result());
            } else if let Some(slot) = ud.checked_sub(OP).and_then(|i| results.get_mut(i as usize))
            {
                *slot = cqe.result();
                got += 1;
            }
        }
        (got, cancel)
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

    /// `io_uring_enter` submitting what is queued and waiting for `want` completions, retrying
    /// when interrupted.
    fn enter(&mut self, want: u32) -> io::Result<usize> {
        let flags = if want > 0 { ENTER_GETEVENTS } else { 0 };
        loop {
            match self.enter_raw(want, flags, None) {
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                other => return other,
            }
        }
    }

    /// Runs the chain `ops` (operation `i` to move `sizes[i]` bytes) until it completes or the
    /// deadline passes: the bytes the chain moved, counted up to its first short or failed
    /// operation. A failure after some bytes moved comes back on the caller's next call.
    ///
    /// # Safety
    /// As for [`Ring::run`], for every operation.
    unsafe fn run_chain(
        &mut self,
        ops: &[squeue::Entry],
        sizes: &[usize],
        deadline: Deadline,
        what: &'static str,
    ) -> Result<usize> {
        let waiter = Waiter::new(self.wait);
        let mut results = [0i32; CHAIN];
        let results = &mut results[..ops.len()];
        // SAFETY: forwarded from the caller.
        let timed_out = unsafe { self.execute_all(ops, results, deadline, &waiter, what)? };
        let mut total = 0;
        for (&r, &want) in results.iter().zip(sizes) {
            if r < 0 {
                return match (total, timed_out) {
                    (0, true) => Err(self.timeout(what, &waiter)),
                    (0, false) => self.interpret(r, what, &waiter),
                    _ => Ok(total),
                };
            }
            total += r as usize;
            if (r as usize) < want {
                break;
            }
        }
        if total == 0 && timed_out {
            return Err(self.timeout(what, &waiter));
        }
        Ok(total)
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

impl Drop for Ring {
    fn drop(&mut self) {
        // Only the owner can take the ring out of its own ring table; elsewhere the entry (and
        // with it the ring) lasts until the owner exits.
        if let (Some(owner), Some(index)) = (self.owner, self.ring_index)
            && owner == thread_tag()
        {
            unregister_ring_fd(&self.ring, index);
        }
    }
}

const EMPTY_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// Fills `iov` with the next operation's share of `parts` — up to `limit` bytes in up to [`IOV`]
/// pieces — from position `from` (part, offset), which it advances past them; how many pieces
/// and bytes. Empty parts are skipped.
fn gather(
    parts: &[&[u8]],
    from: &mut (usize, usize),
    iov: &mut [libc::iovec; IOV],
    limit: usize,
) -> (usize, usize) {
    let (mut k, mut size) = (0, 0);
    let (part, at) = from;
    while size < limit && k < IOV && *part < parts.len() {
        let p = parts[*part];
        let n = (p.len() - *at).min(limit - size);
        if n > 0 {
            iov[k] = libc::iovec {
                iov_base: p[*at..].as_ptr() as *mut libc::c_void,
                iov_len: n,
            };
            k += 1;
            size += n;
        }
        *at += n;
        if *at == p.len() {
            (*part, *at) = (*part + 1, 0);
        }
    }
    (k, size)
}

/// The sending end: a ring and a registered staging buffer for small messages.
pub(crate) struct UringSink {
    // Dropped before `stage`, which it has registered.
    ring: Ring,
    stage: Box<[u8]>,
    /// The most bytes one send operation moves: [`WAIT_OP`] (tests lower it to make chains).
    op_limit: usize,
}

impl UringSink {
    pub(crate) fn new(stream: Arc<TcpStream>, peer: String, wait: WaitStrategy) -> Result<Self> {
        let mut ring = Ring::new(stream, peer, wait)?;
        let mut stage = vec![0u8; STAGE].into_boxed_slice();
        // SAFETY: `stage` is a heap allocation owned by the sink next to the ring and dropped
        // after it (field order), so it outlives the registration.
        unsafe { ring.register(&mut stage, false)? };
        Ok(UringSink {
            ring,
            stage,
            op_limit: WAIT_OP,
        })
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
        if let Some(deadline) = deadline {
            return self.write_chain(parts, deadline);
        }
        // A single attempt takes only what fits now: one operation's worth.
        let mut iov = [EMPTY_IOV; IOV];
        let (count, _) = gather(parts, &mut (0, 0), &mut iov, self.op_limit);
        // SAFETY: an all-zero msghdr is a valid empty message header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = count as _;
        let msg_ptr: *const libc::msghdr = &msg;
        let op = |_nowait: bool| {
            opcode::SendMsg::new(types::Fixed(0), msg_ptr)
                .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
                .build()
        };
        // SAFETY: `msg`, `iov` and the caller's `parts` live until `dispatch` returns, which is
        // after the operation completed.
        unsafe { self.ring.dispatch(op, None, "send") }.map(|n| n.unwrap_or(0))
    }
}

impl UringSink {
    /// A send too large for the staging buffer: one `SENDMSG` with `MSG_WAITALL` (a whole frame;
    /// a larger write takes one per [`WAIT_OP`] bytes, up to [`CHAIN`] of them linked in one
    /// `io_uring_enter`), completed by the kernel as the socket drains, whatever the strategy
    /// (waiting on a completion beats re-submitting partial sends); the bytes moved (the caller
    /// loops).
    fn write_chain(&mut self, parts: &[&[u8]], deadline: Deadline) -> Result<usize> {
        let mut iov = [[EMPTY_IOV; IOV]; CHAIN];
        // SAFETY: an all-zero msghdr is a valid empty message header.
        let mut msgs: [libc::msghdr; CHAIN] = unsafe { std::mem::zeroed() };
        let mut sizes = [0usize; CHAIN];
        let (mut ops, mut from) = (0, (0, 0));
        while ops < CHAIN {
            let (k, size) = gather(parts, &mut from, &mut iov[ops], self.op_limit);
            if k == 0 {
                break;
            }
            msgs[ops].msg_iov = iov[ops].as_mut_ptr();
            msgs[ops].msg_iovlen = k as _;
            sizes[ops] = size;
            ops += 1;
        }
        let flags = (libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32;
        let entries: [squeue::Entry; CHAIN] = std::array::from_fn(|i| {
            opcode::SendMsg::new(types::Fixed(0), &msgs[i] as *const libc::msghdr)
                .flags(flags)
                .build()
        });
        // SAFETY: `msgs`, `iov` and the caller's `parts` live until `run_chain` returns, which is
        // after every operation completed or was cancelled; only the first `ops` are submitted.
        unsafe {
            self.ring
                .run_chain(&entries[..ops], &sizes[..ops], deadline, "send")
        }
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
        owed: bool,
    ) -> Result<Option<usize>> {
        let registered = self.ring.is_registered(buf);
        // A blocking wait for a large owed payload takes part of it and wakes once per mark,
        // not per segment (`LowWater::plan`); every other blocking wait has the mark at 1.
        let (limit, mark) = LowWater::plan(owed && !registered, buf.len());
        self.ring.mark = mark;
        let len = buf.len().min(MAX_OP) as u32;
        let blocking_len = limit.min(WAIT_OP) as u32;
        let ptr = buf.as_mut_ptr();
        let attempt = deadline.is_none();
        let op = |nowait: bool| {
            if registered {
                opcode::ReadFixed::new(types::Fixed(0), ptr, len, 0)
                    .offset(u64::MAX)
                    .rw_flags(if nowait { libc::RWF_NOWAIT } else { 0 })
                    .build()
            } else if attempt || nowait {
                // The rest of a large payload while the strategy spins: a non-blocking attempt
                // retried at once, as a spinning socket call would be. A waiting receive keeps a
                // poll armed on the socket, and on loopback the sending core pays for its wakeup
                // on every segment (16 MiB messages ran 1.09x faster without, 19 of 20 paired
                // rounds). A single attempt takes what is there.
                opcode::Recv::new(types::Fixed(0), ptr, len)
                    .flags(libc::MSG_DONTWAIT)
                    .build()
            } else {
                // Blocking: one receive that sleeps until the mark is queued, then takes all
                // there is, as a blocking `recv(2)` does; the caller comes back at once for what
                // arrived meanwhile. Not `MSG_WAITALL`: a partly done operation waits for the
                // whole mark again each time the queue runs dry during its copy, where a
                // blocking `recv(2)` would go on copying (16 MiB messages slept once per MiB
                // instead of TCP's 0.6 times).
                opcode::Recv::new(types::Fixed(0), ptr, blocking_len).build()
            }
        };
        // SAFETY: `buf` is borrowed mutably for this whole call and `dispatch` returns only
        // after the operation completed.
        match unsafe { self.ring.dispatch(op, deadline, "recv")? } {
            Some(0) if len > 0 => Err(self.closed(mid_frame)),
            other => Ok(other),
        }
    }

    fn closed(&self, mid_frame: bool) -> Error {
        Error::stream_ended(&self.ring.peer, mid_frame)
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
        unsafe { self.ring.register(buf, true) }.map(drop)
    }

    fn read_some(&mut self, buf: &mut [u8], deadline: Deadline, mid_frame: bool) -> Result<usize> {
        self.read_waiting(buf, deadline, mid_frame, false)
    }

    fn read_owed(&mut self, buf: &mut [u8], deadline: Deadline, mid_frame: bool) -> Result<usize> {
        self.read_waiting(buf, deadline, mid_frame, true)
    }

    fn try_read_some(&mut self, buf: &mut [u8], mid_frame: bool) -> Result<Option<usize>> {
        self.read(buf, None, mid_frame, false)
    }
}

impl UringSource {
    fn read_waiting(
        &mut self,
        buf: &mut [u8],
        deadline: Deadline,
        mid_frame: bool,
        owed: bool,
    ) -> Result<usize> {
        self.read(buf, Some(deadline), mid_frame, owed)?
            .ok_or_else(|| Error::Io {
                op: "recv",
                peer: self.ring.peer.clone(),
                error: io::Error::other("io_uring completed a waiting read without a result"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The running kernel's (major, minor) version.
    fn kernel() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release.trim().split(['.', '-']);
        let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (next(), next())
    }

    fn ring() -> Ring {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        Ring::new(Arc::new(stream), "test".into(), WaitStrategy::Spin).unwrap()
    }

    /// A connected pair: the sending end as a `UringSink` with `wait`, the plain receiving end.
    fn sink(wait: WaitStrategy) -> (UringSink, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        (
            UringSink::new(Arc::new(stream), "test".into(), wait).unwrap(),
            peer,
        )
    }

    #[test]
    fn only_the_locked_memory_limit_lets_a_receive_buffer_go_unregistered() {
        assert!(over_memlock(&io::Error::from_raw_os_error(libc::ENOMEM)));
        for errno in [libc::EFAULT, libc::EINVAL, libc::EPERM, libc::EBUSY] {
            assert!(
                !over_memlock(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        // Where the limit allows (here), the buffer is registered, and reads use it as such.
        let mut r = ring();
        let mut buf = vec![0u8; 1 << 20].into_boxed_slice();
        // SAFETY: `buf` outlives `r`, dropped first below.
        assert!(unsafe { r.register(&mut buf, true) }.unwrap());
        assert!(r.is_registered(&buf[4096..8192]));
        assert!(!r.is_registered(&[0u8; 16]));
        // (A ring rebuilt on another thread registers it again: the link suite's
        // `a_link_moves_between_threads` reads into it by `READ_FIXED` after each move.)
        drop(r);
    }

    /// A connected pair: the receiving end as a `UringSource` with `wait`, the plain sending end.
    fn source(wait: WaitStrategy) -> (UringSource, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        (
            UringSource::new(Arc::new(stream), "test".into(), wait).unwrap(),
            peer,
        )
    }

    /// Reads from `peer` until it has been quiet for 200 ms.
    fn drain(peer: &mut TcpStream, into: &mut Vec<u8>) {
        use std::io::Read;
        peer.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => into.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    proptest::proptest! {
        /// Gathering operation after operation walks every byte of the parts once, in order,
        /// each operation within its byte limit and [`IOV`] non-empty pieces.
        #[test]
        fn gathering_covers_the_parts_in_order_within_an_operations_bounds(
            lens in proptest::collection::vec(
                proptest::prop_oneof![0usize..64, 0usize..(3 * MAX_OP)],
                0..9,
            ),
            limit in proptest::prop_oneof![1usize..4096, proptest::strategy::Just(MAX_OP)],
        ) {
            let data: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
                .collect();
            let parts: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
            let (mut from, mut out) = ((0, 0), Vec::new());
            loop {
                let mut iov = [EMPTY_IOV; IOV];
                let (k, size) = gather(&parts, &mut from, &mut iov, limit);
                if k == 0 {
                    break;
                }
                proptest::prop_assert!(size <= limit);
                let mut sum = 0;
                for v in &iov[..k] {
                    proptest::prop_assert!(v.iov_len > 0);
                    sum += v.iov_len;
                    // SAFETY: the piece lies inside one of `parts`, alive here.
                    out.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                    });
                }
                proptest::prop_assert_eq!(sum, size);
            }
            proptest::prop_assert!(out == parts.concat());
        }
    }

    #[test]
    fn a_frame_of_the_largest_payload_goes_in_one_send_operation() {
        let header = [7u8; crate::frame::HEADER_LEN];
        // Zeroed, so never touched: gathering reads only addresses and lengths.
        let payload = vec![0u8; ABSOLUTE_MAX_PAYLOAD as usize];
        let mut iov = [EMPTY_IOV; IOV];
        let mut from = (0, 0);
        let (k, size) = gather(&[&header, &payload], &mut from, &mut iov, WAIT_OP);
        assert_eq!((k, size), (2, header.len() + payload.len()));
        assert_eq!(
            gather(&[&header, &payload], &mut from, &mut iov, WAIT_OP).0,
            0
        );
    }

    #[test]
    fn a_send_cut_by_its_deadline_reports_exactly_the_bytes_it_sent() {
        if let Err(reason) = probe() {
            eprintln!("skipping: io_uring is unavailable here: {reason}");
            return;
        }
        // A chain (operations lowered to 1 MiB) and the single operation a frame takes.
        for (wait, op_limit) in [
            (WaitStrategy::Spin, MAX_OP),
            (WaitStrategy::Block, MAX_OP),
            (WaitStrategy::Spin, WAIT_OP),
            (WaitStrategy::Block, WAIT_OP),
        ] {
            let (mut tx, mut peer) = sink(wait);
            tx.op_limit = op_limit;
            // Larger than a chain, and than the socket buffers of a peer that does not read.
            let data: Vec<u8> = (0..(CHAIN * MAX_OP + 12345))
                .map(|i| (i % 251) as u8)
                .collect();
            let deadline = Deadline::after(std::time::Duration::from_millis(300));
            let sent = match tx.write_some(&[&data[..100], &data[100..]], deadline) {
                Ok(n) => n,
                Err(Error::Timeout { .. }) => 0,
                Err(e) => panic!("{e}"),
            };
            assert!(
                sent < CHAIN * MAX_OP,
                "{sent} bytes went to a peer that reads nothing"
            );
            // What reached the peer is exactly what the call reported: nothing from the
            // cancelled operations beyond it.
            let mut got = Vec::new();
            drain(&mut peer, &mut got);
            assert_eq!(got.len(), sent);
            assert!(got == data[..sent], "the bytes sent arrived damaged");
            // The ring took nothing in flight with it: the rest goes through it (in chains or
            // one operation) while the peer reads.
            std::thread::scope(|s| {
                let reader = s.spawn(|| {
                    use std::io::Read;
                    let mut rest = vec![0u8; data.len() - sent];
                    peer.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                        .unwrap();
                    peer.read_exact(&mut rest).unwrap();
                    rest
                });
                let mut at = sent;
                while at < data.len() {
                    at += tx
                        .write_some(
                            &[&data[at..]],
                            Deadline::after(std::time::Duration::from_secs(10)),
                        )
                        .unwrap();
                }
                assert!(reader.join().unwrap() == data[sent..]);
            });
        }
    }

    /// With cancels that cancel nothing, a call cut by its deadline still returns, about one
    /// grace period late: the socket is shut down under its operation, which then completes.
    #[test]
    fn an_operation_its_cancel_cannot_stop_ends_by_a_shutdown_of_the_socket() {
        use std::io::Read;
        use std::time::Instant;
        if let Err(reason) = probe() {
            eprintln!("skipping: io_uring is unavailable here: {reason}");
            return;
        }
        let grace = Duration::from_millis(200);
        let bound = Duration::from_secs(2);
        for wait in [WaitStrategy::Block, WaitStrategy::default()] {
            // A receive waiting on a peer that sends nothing.
            let (mut rx, mut peer) = source(wait);
            rx.ring.cancel_ignored = true;
            rx.ring.cancel_grace = grace;
            let mut buf = vec![0u8; 4096];
            let started = Instant::now();
            let r = rx.read_some(&mut buf, Deadline::after(Duration::from_millis(100)), false);
            let took = started.elapsed();
            assert!(
                matches!(r, Err(Error::Timeout { op: "recv", .. })),
                "{wait:?}: {r:?}"
            );
            assert!(
                took >= grace && took < bound,
                "{wait:?}: returned after {took:?}"
            );
            // The shutdown reached the peer.
            peer.set_read_timeout(Some(bound)).unwrap();
            assert_eq!(peer.read(&mut buf).unwrap(), 0, "{wait:?}");

            // A send waiting on a peer that reads nothing: whatever it reports as sent is what
            // the peer got.
            let (mut tx, mut peer) = sink(wait);
            tx.ring.cancel_ignored = true;
            tx.ring.cancel_grace = grace;
            let data: Vec<u8> = (0..(64 << 20)).map(|i| (i % 251) as u8).collect();
            let started = Instant::now();
            let r = tx.write_some(&[&data], Deadline::after(Duration::from_millis(100)));
            let took = started.elapsed();
            assert!(
                took >= grace && took < bound,
                "{wait:?}: returned after {took:?}"
            );
            let sent = match r {
                Ok(n) => n,
                Err(Error::Timeout { .. }) => 0,
                Err(e) => panic!("{wait:?}: {e}"),
            };
            assert!(sent < data.len(), "{wait:?}");
            let mut got = Vec::new();
            drain(&mut peer, &mut got);
            assert_eq!(got.len(), sent, "{wait:?}");
            assert!(
                got == data[..sent],
                "{wait:?}: the bytes sent arrived damaged"
            );
        }
    }

    #[test]
    fn a_waiting_receive_of_owed_bytes_returns_what_arrived_without_holding_out_for_more() {
        if let Err(reason) = probe() {
            eprintln!("skipping: io_uring is unavailable here: {reason}");
            return;
        }
        use std::io::Write;
        use std::time::{Duration, Instant};
        for wait in [
            WaitStrategy::Block,
            WaitStrategy::Adaptive {
                spin: Duration::from_millis(1),
            },
            WaitStrategy::Spin,
        ] {
            let (mut rx, mut peer) = source(wait);
            // The peer owes 4 MiB but sends 1.5 MiB and pauses: more than the mark (1 MiB),
            // less than the receive may take (3 MiB) and than two 1 MiB operations.
            let sent: Vec<u8> = (0..(3 << 19)).map(|i| (i % 253) as u8).collect();
            peer.write_all(&sent).unwrap();
            let mut buf = vec![0u8; 4 << 20];
            let started = Instant::now();
            let mut got = 0;
            while got < sent.len() {
                let deadline = Deadline::after(Duration::from_secs(20));
                got += rx.read_owed(&mut buf[got..], deadline, got > 0).unwrap();
            }
            // Each call returned once bytes were there, not at its deadline.
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{wait}: 1.5 MiB took {:?}",
                started.elapsed()
            );
            assert_eq!(got, sent.len(), "{wait}");
            assert!(buf[..got] == sent[..], "{wait}: the bytes arrived damaged");
            // Nothing more is coming: the next wait ends at its deadline, and the rest of the
            // payload still goes through after it.
            let short = Deadline::after(Duration::from_millis(100));
            match rx.read_owed(&mut buf[got..], short, true) {
                Err(Error::Timeout { .. }) => {}
                other => panic!("{wait}: {other:?}"),
            }
            peer.write_all(&sent[..(1 << 20)]).unwrap();
            let mut more = 0;
            while more < 1 << 20 {
                let deadline = Deadline::after(Duration::from_secs(20));
                more += rx
                    .read_owed(&mut buf[got + more..], deadline, true)
                    .unwrap();
            }
            assert!(buf[got..got + more] == sent[..(1 << 20)], "{wait}");
        }
    }

    #[test]
    fn a_new_enough_kernel_gets_deferred_single_issuer_rings_entered_through_the_ring_table() {
        if let Err(reason) = probe() {
            eprintln!("skipping: io_uring is unavailable here: {reason}");
            return;
        }
        let mut r = ring();
        r.claim().unwrap();
        if kernel() >= (6, 1) {
            assert_eq!(r.flavor, Flavor::Deferred);
        }
        if kernel() >= (5, 18) {
            assert!(r.ring_index.is_some(), "the ring fd was not registered");
        }
        assert_eq!(r.owner, Some(thread_tag()));
    }

    #[test]
    fn a_dropped_ring_leaves_its_threads_ring_table() {
        if probe().is_err() || kernel() < (5, 18) {
            eprintln!("skipping: no io_uring ring table here");
            return;
        }
        // The table has 16 entries: without the removal on drop the 17th ring finds it full.
        for i in 0..40 {
            let mut r = ring();
            r.claim().unwrap();
            assert!(
                r.ring_index.is_some(),
                "ring {i} found this thread's table full"
            );
        }
    }

    #[test]
    fn thread_tags_differ_between_threads_and_stay_put_within_one() {
        let here = thread_tag();
        assert_eq!(here, thread_tag());
        let there = std::thread::spawn(thread_tag).join().unwrap();
        assert_ne!(here, there);
    }
}
