//! The shared-memory backend, for two ranks on one host: no system call on the fast path.
//!
//! Each direction has, in one shared segment:
//! - a **slot ring**: one 64-byte cache line per message, holding its sequence word, tag, length
//!   and — for payloads up to [`INLINE`] bytes — the payload itself, so a small message crosses
//!   cores as a single cache line (the way OpenMPI's fast boxes do);
//! - a **byte ring** through which larger payloads stream, so a message larger than the ring
//!   flows through it;
//! - where the kernel lets the peer read this process (same user, no ptrace restriction), a
//!   **single-copy rendezvous**: the receiver copies straight from the sender's buffer with
//!   `process_vm_readv`, and the sender returns once the copy is done (or abandoned at its
//!   deadline, which the receiver then reports as an error rather than use the data).
//!
//! Payloads over 256 KiB go whichever way the sender measures faster (`CarryChooser`,
//! [`SingleCopy::Auto`], the default; `LinkConfig::shm_single_copy`): with a shared cache the
//! ring's two copies overlap on two cores while the ring stays in that cache; without one each
//! ring line crosses between the caches twice per pass, and the single copy wins
//! (bench/TRANSPORTS.md, "shm: ring or single copy").
//!
//! The accepting side creates the segment in `/dev/shm` (mode 0600, a random name), tells the
//! peer its name over the already authenticated TCP link, and unlinks it once the peer has mapped
//! it. Every counter has its own cache line; a waiting side spins, then (after the strategy's spin
//! budget) sleeps on a futex its peer wakes only when a sleeper said so. Everything read from
//! shared memory is checked, so a corrupted ring is an error, never an out-of-bounds access; and
//! the TCP link stays open as the liveness signal: when the peer process dies the kernel closes
//! it, and a waiting side notices within milliseconds.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use memmap2::{MmapMut, MmapOptions};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

use crate::codec::{Reader, Writer};
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::frame::{FrameHeader, FrameKind, HEADER_LEN, encode_frame};
use crate::link::{Message, RecvHalf, SendHalf, check_len};
use crate::stream::{ByteSink, ByteSource, read_full, write_all};
use crate::wait::{WaitStrategy, Waiter};

/// Marks an initialised segment, and its layout: a peer whose build lays the segment out
/// differently (rendezvous states in three bits since "SINEWRN2") is refused at setup.
const RING_MAGIC: u64 = 0x5349_4e45_5752_4e32; // "SINEWRN2"
/// Messages in flight per direction.
const SLOTS: usize = 256;
const SLOT: usize = 64;
/// Payloads up to this many bytes travel inside their slot.
pub const INLINE: usize = 40;
/// Bytes of control block before each direction's slots (a page).
const CONTROL: usize = 4096;
const OFF_MAGIC: usize = 0;
const OFF_CAPACITY: usize = 8;
const OFF_DATA_TAIL: usize = 128;
const OFF_DATA_HEAD: usize = 256;
const OFF_SLOTS_DONE: usize = 384;
const OFF_RDV: usize = 512;
const OFF_READER_SLEEPS: usize = 640;
const OFF_WRITER_SLEEPS: usize = 768;
/// Nanoseconds the reader has spent taking payloads over [`STREAM_CHUNKS`]`[0]` (copying them
/// out of the ring, or by single copy): the receiving side's share of the carrying the sender's
/// [`CarryChooser`] times.
const OFF_READER_NANOS: usize = 896;
/// Slot layout.
const SLOT_SEQ: usize = 0;
const SLOT_TAG: usize = 8;
const SLOT_KIND: usize = 12;
const SLOT_LEN: usize = 16;
const SLOT_BODY: usize = 24;

/// The sizes the byte ring's writer may copy before publishing what it copied, so that a large
/// message flows through in pieces the reader copies out while the writer copies the next one in,
/// instead of the writer filling the whole ring while the reader waits and the reader draining it
/// while the writer waits. Which size streams faster depends on where the two cores sit: with
/// no shared cache (two sockets, two Zen CCDs, or a VM's vCPUs placed so) 256 KiB pieces (≈ 7
/// GB/s at 4 MiB where unpieced streaming made 2.2–2.9 and 1 MiB pieces 2.5–3.9); with one, 1 MiB
/// pieces (≈ 40 GB/s where 256 KiB ones sometimes made 12). The sender measures both and keeps
/// the faster ([`CarryChooser`]; bench/TRANSPORTS.md, "shm streaming").
const STREAM_CHUNKS: [usize; 2] = [256 << 10, 1 << 20];

/// How a payload larger than the small chunk crosses to the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carry {
    /// Streamed through the byte ring, published in pieces of this many bytes.
    Ring(usize),
    /// Copied once, by the receiver straight from the sender's buffer.
    SingleCopy,
}

/// The ways a sender may carry a large payload, in the order a new link measures them: the two
/// ring piece sizes, then (where the peer may read this process) the single copy.
const CARRIES: [Carry; 3] = [
    Carry::Ring(STREAM_CHUNKS[0]),
    Carry::Ring(STREAM_CHUNKS[1]),
    Carry::SingleCopy,
];

/// Bytes carried per measurement of one way.
const CHUNK_EPOCH: u64 = 32 << 20;

/// One epoch in this many goes to a way not in use (in turn), so a change of placement is
/// noticed.
const CHUNK_EXPLORE_EVERY: u32 = 64;

/// Picks how the sender carries large payloads, among the first `usable` of [`CARRIES`], by
/// measured throughput: each epoch of [`CHUNK_EPOCH`] carried bytes is timed and credited to the
/// way in use; the fastest is used, each other one retried in turn every
/// [`CHUNK_EXPLORE_EVERY`]th epoch. The time is both sides' time on those payloads: the sender's
/// (its copy into the ring, or its wait for the receiver's single copy, waits for ring space
/// included) plus the receiver's (its copy out of the ring, or its single copy), which the
/// receiver adds up in shared memory ([`OFF_READER_NANOS`]). Without the receiver's share, a ring
/// with room would look as fast as the sender's copy into it while the slow part, the copy out
/// across the caches, went unseen (a two-way exchange of 1 MiB messages ran 2.5 GB/s on the ring
/// where the single copy made 12). Only payloads larger than the small chunk are timed, so small
/// messages pay no clock reads.
///
/// Which wins depends on the placement of the two cores: with a shared cache the ring's two
/// copies overlap on two cores while the ring stays in that cache (35–40 GB/s at 1–4 MiB here);
/// without one, every ring line crosses between the caches twice per pass (2.5–5 GB/s) while the
/// single copy moves each byte across once (10–12 GB/s).
#[derive(Debug)]
struct CarryChooser {
    /// How many of [`CARRIES`] this link may use: the two ring sizes, or all three.
    usable: usize,
    /// Index into [`CARRIES`] of the way in use.
    current: usize,
    /// Bytes per second each way last measured (an average of its last two epochs).
    rate: [Option<f64>; 3],
    epoch_bytes: u64,
    epoch_time: Duration,
    epochs: u32,
    /// Exploration epochs so far: which of the other ways the next one goes to.
    explored: u32,
}

impl CarryChooser {
    /// A chooser among the ring sizes, and the single copy when `single_copy` is set.
    fn new(single_copy: bool) -> Self {
        CarryChooser {
            usable: if single_copy { 3 } else { 2 },
            current: 0,
            rate: [None; 3],
            epoch_bytes: 0,
            epoch_time: Duration::ZERO,
            epochs: 0,
            explored: 0,
        }
    }

    /// The way in use.
    fn carry(&self) -> Carry {
        CARRIES[self.current]
    }

    /// The ring's piece size: the one in use, or (while the single copy is) the faster measured.
    fn chunk(&self) -> usize {
        match self.carry() {
            Carry::Ring(chunk) => chunk,
            Carry::SingleCopy => {
                let slower = self.rate[0].unwrap_or(0.0) < self.rate[1].unwrap_or(0.0);
                STREAM_CHUNKS[usize::from(slower)]
            }
        }
    }

    /// Whether a payload of `len` bytes is worth timing: one that spans more than a small chunk.
    fn times(len: usize) -> bool {
        len > STREAM_CHUNKS[0]
    }

    /// The time now, if a payload of `len` bytes is timed.
    fn clock(len: usize) -> Option<Instant> {
        Self::times(len).then(Instant::now)
    }

    /// Credits `bytes` carried in `took` to the way in use; at the end of an epoch, picks the
    /// way for the next one.
    fn record(&mut self, bytes: usize, took: Duration) {
        self.epoch_bytes += bytes as u64;
        self.epoch_time += took;
        if self.epoch_bytes < CHUNK_EPOCH {
            return;
        }
        let measured = self.epoch_bytes as f64 / self.epoch_time.as_secs_f64().max(1e-9);
        let slot = &mut self.rate[self.current];
        *slot = Some(slot.map_or(measured, |old| (old + measured) / 2.0));
        self.epoch_bytes = 0;
        self.epoch_time = Duration::ZERO;
        self.epochs = self.epochs.wrapping_add(1);
        let next = self.next_choice();
        if next != self.current {
            tracing::trace!(
                from = ?CARRIES[self.current],
                to = ?CARRIES[next],
                measured_gbps = measured / 1e9,
                rates_gbps = ?self.rate.map(|r| r.map(|r| (r / 1e8).round() / 10.0)),
                "shm carry"
            );
        }
        self.current = next;
    }

    fn next_choice(&mut self) -> usize {
        if let Some(unmeasured) = (0..self.usable).find(|&i| self.rate[i].is_none()) {
            return unmeasured;
        }
        let rate = |i: usize| self.rate[i].unwrap_or(0.0);
        let best = (0..self.usable)
            .max_by(|&a, &b| rate(a).total_cmp(&rate(b)))
            .unwrap_or(0);
        if !self.epochs.is_multiple_of(CHUNK_EXPLORE_EVERY) {
            return best;
        }
        // The others in turn (there is at least one: `usable` is 2 or 3).
        let turn = self.explored as usize % (self.usable - 1);
        self.explored = self.explored.wrapping_add(1);
        (0..self.usable)
            .filter(|&i| i != best)
            .nth(turn)
            .unwrap_or(best)
    }
}

/// Slot kinds.
const KIND_INLINE: u32 = 1;
const KIND_STREAM: u32 = 2;
const KIND_RENDEZVOUS: u32 = 3;
const KIND_CLOSE: u32 = 4;
/// Rendezvous states, in the low [`RDV_BITS`] bits of the rendezvous word (the message index
/// above them; see [`rdv`]). The sender posts; the receiver claims, copies and marks it done. A
/// posted message the receiver has not claimed within [`RDV_GRACE`] the sender may withdraw, and
/// then streams its payload through the byte ring; at its deadline, or when dropped, it
/// abandons a posted or claimed one (the receiver discards whatever it copied).
const RDV_BITS: u32 = 3;
const RDV_POSTED: u64 = 1;
const RDV_DONE: u64 = 2;
const RDV_ABANDONED: u64 = 3;
const RDV_CLAIMED: u64 = 4;
const RDV_WITHDRAWN: u64 = 5;
/// How long a posted single copy waits for the receiver to claim it before the sender, when the
/// byte ring has room for the whole payload, withdraws it and streams it through the ring: a
/// receiver busy elsewhere (computing, or blocked in its own send) then holds the sender up no
/// longer than this, as a ring with room never would.
const RDV_GRACE: Duration = Duration::from_millis(1);

/// The rendezvous word for message `index` in `state`.
fn rdv(index: u64, state: u64) -> u64 {
    index << RDV_BITS | state
}
/// Smallest and largest byte ring accepted from a peer.
const MIN_RING: usize = 4096;
const MAX_RING: usize = 1 << 30;
/// How often a waiting side checks that the peer process is still there.
const LIVENESS_EVERY: Duration = Duration::from_millis(1);
/// Longest single futex sleep early in a wait, so liveness and the deadline are checked between
/// sleeps.
const MAX_SLEEP: Duration = Duration::from_millis(2);
/// Longest single futex sleep in a long wait (an idle link): a quarter of the time waited so
/// far, up to this. A message wakes the sleeper at once whatever the bound (the writer wakes the
/// futex); the bound only spaces the liveness checks, so an idle link costs ~20 wake-ups a second
/// instead of 500, and a dead peer is still noticed within 50 ms.
const MAX_IDLE_SLEEP: Duration = Duration::from_millis(50);
/// Spins between clock reads (deadline, liveness, end of the spin budget).
const CLOCK_EVERY: u32 = 32;
const SETUP_MAX: u32 = 4096;

/// This host, user and `/dev/shm`, as offered in the handshake: two sides with equal identities
/// can share a segment.
///
/// # Errors
/// Why shared memory cannot be offered (no `/dev/shm`, no boot id).
pub fn host_identity() -> std::result::Result<Vec<u8>, String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| format!("cannot read the boot id ({e}), so this host cannot be identified"))?;
    let shm = std::fs::metadata("/dev/shm").map_err(|e| format!("no /dev/shm: {e}"))?;
    let mut id = boot.trim().as_bytes().to_vec();
    id.put_u32(nix::unistd::geteuid().as_raw());
    id.put_u64(shm.dev());
    id.put_u64(shm.ino());
    Ok(id)
}

/// A mapped segment holding both directions.
struct Segment {
    map: MmapMut,
}

impl Segment {
    fn direction_len(capacity: usize) -> usize {
        CONTROL + SLOTS * SLOT + capacity
    }

    fn len_for(capacity: usize) -> usize {
        2 * Self::direction_len(capacity)
    }
}

/// One direction of the segment, as seen by one side.
struct Direction {
    /// Keeps the mapping alive while the pointers below are in use.
    _segment: Arc<Segment>,
    control: *mut u8,
    slots: *mut u8,
    data: *mut u8,
    /// The byte ring's capacity as this side agreed to it; shared memory is never trusted for it.
    capacity: usize,
}

// SAFETY: the pointers designate the shared mapping that `_segment` keeps alive; shared counters
// are accessed atomically, and slot and data bytes only within the region the protocol gives this
// side at that moment.
unsafe impl Send for Direction {}
// SAFETY: `Direction` itself is immutable; what its pointers reach is shared memory whose counters
// are atomics and whose byte regions each belong to one writer or one reader at a time.
unsafe impl Sync for Direction {}

impl Direction {
    fn new(segment: Arc<Segment>, d: usize, capacity: usize) -> Self {
        // SAFETY: `d` is 0 or 1 and the mapping holds two directions of `direction_len` bytes.
        let control = unsafe {
            segment
                .map
                .as_ptr()
                .cast_mut()
                .add(d * Segment::direction_len(capacity))
        };
        // SAFETY: slots follow the control block, data the slots, all inside the direction.
        let (slots, data) = unsafe { (control.add(CONTROL), control.add(CONTROL + SLOTS * SLOT)) };
        Direction {
            _segment: segment,
            control,
            slots,
            data,
            capacity,
        }
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is an OFF_* constant, 8-aligned and inside the page-aligned control block
        // of a mapping that lives as long as `self`.
        unsafe { &*self.control.add(off).cast::<AtomicU64>() }
    }

    fn flag(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as for `word`, with 4-byte alignment.
        unsafe { &*self.control.add(off).cast::<AtomicU32>() }
    }

    /// Adds the reader's time taking one large payload to [`OFF_READER_NANOS`].
    fn reader_took(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.word(OFF_READER_NANOS)
            .fetch_add(nanos, Ordering::Relaxed);
    }

    /// [`Direction::reader_took`] the time since `start`, if the payload was timed
    /// ([`CarryChooser::clock`]).
    fn reader_took_since(&self, start: Option<Instant>) {
        if let Some(start) = start {
            self.reader_took(start.elapsed());
        }
    }

    fn slot(&self, index: u64) -> *mut u8 {
        // SAFETY: the index is reduced modulo SLOTS, so the slot lies inside the slot area.
        unsafe { self.slots.add((index % SLOTS as u64) as usize * SLOT) }
    }

    fn slot_seq(&self, index: u64) -> &AtomicU64 {
        // SAFETY: a slot is 64-aligned (page-aligned area, 64-byte slots); its first 8 bytes are
        // the sequence word.
        unsafe { &*self.slot(index).add(SLOT_SEQ).cast::<AtomicU64>() }
    }

    /// Whether slot `index` holds message `index` (the writer publishes it by storing
    /// `index + 1` in its sequence word).
    fn published(&self, index: u64) -> bool {
        self.slot_seq(index).load(Ordering::Acquire) == index + 1
    }

    fn init(&self) {
        for off in [
            OFF_DATA_TAIL,
            OFF_DATA_HEAD,
            OFF_SLOTS_DONE,
            OFF_RDV,
            OFF_READER_NANOS,
        ] {
            self.word(off).store(0, Ordering::Relaxed);
        }
        self.flag(OFF_READER_SLEEPS).store(0, Ordering::Relaxed);
        self.flag(OFF_WRITER_SLEEPS).store(0, Ordering::Relaxed);
        for i in 0..SLOTS as u64 {
            self.slot_seq(i).store(0, Ordering::Relaxed);
        }
        self.word(OFF_CAPACITY)
            .store(self.capacity as u64, Ordering::Relaxed);
        self.word(OFF_MAGIC).store(RING_MAGIC, Ordering::Release);
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let magic = self.word(OFF_MAGIC).load(Ordering::Acquire);
        let cap = self.word(OFF_CAPACITY).load(Ordering::Relaxed);
        if magic != RING_MAGIC {
            return Err(format!("bad ring magic {magic:#x}"));
        }
        if cap != self.capacity as u64 {
            return Err(format!(
                "ring header says capacity {cap}, the setup said {}",
                self.capacity
            ));
        }
        Ok(())
    }

    /// Copies `src` into the byte ring at logical position `pos`, wrapping.
    fn copy_in(&self, pos: u64, src: &[u8]) {
        let at = (pos % self.capacity as u64) as usize;
        let first = src.len().min(self.capacity - at);
        // SAFETY: `at + first <= capacity` and the rest (`src.len() - first <= at`) wraps to the
        // start, so both copies stay in the data area; callers never pass more than the free
        // space, which the protocol gives the writer alone.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.data.add(at), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), self.data, src.len() - first);
        }
    }

    /// Copies from the byte ring at logical position `pos` into `dst`, wrapping.
    fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        let at = (pos % self.capacity as u64) as usize;
        let first = dst.len().min(self.capacity - at);
        // SAFETY: bounds as in `copy_in`; callers never read more than is available, which the
        // protocol gives the reader alone.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data.add(at), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(
                self.data,
                dst.as_mut_ptr().add(first),
                dst.len() - first,
            );
        }
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 in a shared mapping (hence no FUTEX_PRIVATE_FLAG);
    // the kernel only reads it and `ts`, both valid for the call. Every error (EAGAIN when the
    // value changed, ETIMEDOUT, EINTR) means "look again", which the caller does.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32 in a shared mapping; FUTEX_WAKE only uses its
    // address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0,
            0,
            0,
        );
    }
}

/// Wakes the peer if it said it sleeps on `flag`. The fence orders our preceding publication
/// before reading the flag (the sleeper sets the flag, fences, then re-checks our publication).
fn wake_if_sleeping(flag: &AtomicU32) {
    fence(Ordering::SeqCst);
    if flag.load(Ordering::Relaxed) != 0 {
        flag.store(0, Ordering::Relaxed);
        futex_wake(flag);
    }
}

/// Names the side and operation in errors.
#[derive(Clone)]
struct Side {
    peer: String,
    op: &'static str,
}

fn corrupted(peer: &str, what: String) -> Error {
    Error::ProtocolViolation {
        peer: peer.to_string(),
        detail: format!("shared-memory ring corrupted: {what}"),
    }
}

/// Waiting for the peer: the strategy's spin, futex sleeps, liveness checks and the deadline.
struct Wait<'a> {
    waiter: Waiter,
    bootstrap: &'a TcpStream,
    liveness: Liveness,
    spinning: bool,
    spins: u32,
}

impl<'a> Wait<'a> {
    fn new(strategy: WaitStrategy, bootstrap: &'a TcpStream) -> Self {
        let waiter = Waiter::new(strategy);
        Wait {
            spinning: !waiter.should_block(),
            waiter,
            bootstrap,
            liveness: Liveness::new(),
            spins: 0,
        }
    }

    /// Waits a little for `ready` (sleeping on `sleeps` once the spin budget is spent). `Err`
    /// when the deadline passed or the peer is gone; `Ok` means "look again".
    fn pause(
        &mut self,
        sleeps: &AtomicU32,
        ready: impl Fn() -> bool,
        deadline: Deadline,
        side: &Side,
    ) -> Result<()> {
        self.spins = self.spins.wrapping_add(1);
        if self.spinning && !self.spins.is_multiple_of(CLOCK_EVERY) {
            std::hint::spin_loop();
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline.instant() {
            return Err(Error::Timeout {
                op: side.op,
                waited: self.waiter.waited(),
                peer: side.peer.clone(),
            });
        }
        self.liveness.check_at(now, self.bootstrap, side, &ready)?;
        self.spinning = !self.waiter.should_block();
        if self.spinning {
            std::hint::spin_loop();
            return Ok(());
        }
        sleeps.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !ready() {
            let bound = (self.waiter.waited() / 4).clamp(MAX_SLEEP, MAX_IDLE_SLEEP);
            futex_wait(sleeps, 1, deadline.remaining().min(bound));
        }
        sleeps.store(0, Ordering::Relaxed);
        Ok(())
    }
}

/// Whether the peer's end of the bootstrap socket is gone: the kernel closed it, so the peer
/// process is dead (or dropped its link).
pub(crate) fn peer_gone(bootstrap: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match recv(bootstrap.as_raw_fd(), &mut byte, flags) {
        Ok(0) => true,
        Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => false,
        Err(_) => true,
    }
}

/// Liveness checks, at most every [`LIVENESS_EVERY`], for [`Wait`] and the non-blocking paths.
struct Liveness {
    last: Instant,
}

impl Liveness {
    fn new() -> Self {
        Liveness {
            last: Instant::now(),
        }
    }

    /// `Err` when, at `now`, the peer is gone and `ready` (what its last writes may still have
    /// left to read) is false.
    fn check_at(
        &mut self,
        now: Instant,
        bootstrap: &TcpStream,
        side: &Side,
        ready: impl Fn() -> bool,
    ) -> Result<()> {
        if now.duration_since(self.last) < LIVENESS_EVERY {
            return Ok(());
        }
        self.last = now;
        if peer_gone(bootstrap) && !ready() {
            return Err(Error::PeerGone {
                peer: side.peer.clone(),
                detail: format!(
                    "{}: the peer process is gone (its link socket closed)",
                    side.op
                ),
            });
        }
        Ok(())
    }

    /// [`Liveness::check_at`] now, with nothing left to read: for a sender, which a gone peer
    /// will never read for.
    fn check(&mut self, bootstrap: &TcpStream, side: &Side) -> Result<()> {
        self.check_at(Instant::now(), bootstrap, side, || false)
    }
}

/// The writing end of a direction's byte ring.
struct ByteRingWriter {
    dir: Arc<Direction>,
    tail: u64,
    /// Bytes copied in before each publication ([`STREAM_CHUNKS`]; the sender's choice).
    chunk: usize,
    bootstrap: Arc<TcpStream>,
    wait: WaitStrategy,
    side: Side,
}

impl ByteRingWriter {
    fn free(&self) -> Result<usize> {
        let head = self.dir.word(OFF_DATA_HEAD).load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.dir.capacity as u64 {
            return Err(corrupted(
                &self.side.peer,
                format!("head {head} is not within a ring of the tail {}", self.tail),
            ));
        }
        Ok(self.dir.capacity - used as usize)
    }
}

impl ByteRingWriter {
    /// Copies up to `free` bytes of `parts` in and publishes them, a chunk at a time.
    fn put(&mut self, parts: &[&[u8]], free: usize) -> usize {
        let chunk = self.chunk;
        let mut written = 0;
        for p in parts {
            let mut from = 0;
            while from < p.len() && written < free {
                let n = (p.len() - from).min(free - written).min(chunk);
                self.dir.copy_in(self.tail, &p[from..from + n]);
                from += n;
                written += n;
                self.tail += n as u64;
                self.dir
                    .word(OFF_DATA_TAIL)
                    .store(self.tail, Ordering::Release);
                wake_if_sleeping(self.dir.flag(OFF_READER_SLEEPS));
            }
            if written == free {
                break;
            }
        }
        written
    }
}

impl ByteSink for ByteRingWriter {
    fn peer(&self) -> &str {
        &self.side.peer
    }

    fn write_some(&mut self, parts: &[&[u8]], deadline: Deadline) -> Result<usize> {
        let mut wait = None;
        let free = loop {
            let free = self.free()?;
            if free > 0 {
                break free;
            }
            // Only a writer that has to wait reads the clock.
            let wait = wait.get_or_insert_with(|| Wait::new(self.wait, &self.bootstrap));
            let (dir, tail) = (&self.dir, self.tail);
            let ready = || {
                tail.wrapping_sub(dir.word(OFF_DATA_HEAD).load(Ordering::Acquire))
                    < dir.capacity as u64
            };
            wait.pause(dir.flag(OFF_WRITER_SLEEPS), ready, deadline, &self.side)?;
        };
        Ok(self.put(parts, free))
    }

    fn try_write_some(&mut self, parts: &[&[u8]]) -> Result<usize> {
        match self.free()? {
            0 => Ok(0),
            free => Ok(self.put(parts, free)),
        }
    }

    fn close(&mut self, _farewell: &[u8]) {}
}

/// The reading end of a direction's byte ring.
struct ByteRingReader {
    dir: Arc<Direction>,
    head: u64,
    bootstrap: Arc<TcpStream>,
    wait: WaitStrategy,
    side: Side,
}

impl ByteRingReader {
    fn available(&self) -> Result<usize> {
        let tail = self.dir.word(OFF_DATA_TAIL).load(Ordering::Acquire);
        let avail = tail.wrapping_sub(self.head);
        if avail > self.dir.capacity as u64 {
            return Err(corrupted(
                &self.side.peer,
                format!("tail {tail} is not within a ring of the head {}", self.head),
            ));
        }
        Ok(avail as usize)
    }
}

impl ByteRingReader {
    /// Whether the writer has published bytes this reader has not taken (no bounds check: a
    /// readiness hint for waits; [`ByteRingReader::available`] checks the tail).
    fn has_unread(&self) -> bool {
        self.dir.word(OFF_DATA_TAIL).load(Ordering::Acquire) != self.head
    }

    /// Copies up to `avail` bytes out into `buf` and releases them. (The writer publishes a
    /// chunk at a time, so a reader that keeps up takes a chunk at a time; releasing in smaller
    /// pieces measured slower.)
    fn take(&mut self, buf: &mut [u8], avail: usize) -> usize {
        let n = avail.min(buf.len());
        self.dir.copy_out(self.head, &mut buf[..n]);
        self.head += n as u64;
        self.dir
            .word(OFF_DATA_HEAD)
            .store(self.head, Ordering::Release);
        wake_if_sleeping(self.dir.flag(OFF_WRITER_SLEEPS));
        n
    }
}

impl ByteSource for ByteRingReader {
    fn peer(&self) -> &str {
        &self.side.peer
    }

    fn read_some(&mut self, buf: &mut [u8], deadline: Deadline, _mid_frame: bool) -> Result<usize> {
        let mut wait = None;
        let avail = loop {
            let avail = self.available()?;
            if avail > 0 {
                break avail;
            }
            let wait = wait.get_or_insert_with(|| Wait::new(self.wait, &self.bootstrap));
            let ready = || self.has_unread();
            wait.pause(
                self.dir.flag(OFF_READER_SLEEPS),
                ready,
                deadline,
                &self.side,
            )?;
        };
        Ok(self.take(buf, avail))
    }

    fn try_read_some(&mut self, buf: &mut [u8], _mid_frame: bool) -> Result<Option<usize>> {
        match self.available()? {
            0 => Ok(None),
            avail => Ok(Some(self.take(buf, avail))),
        }
    }
}

/// The sending half of a shared-memory link.
pub(crate) struct ShmSender {
    dir: Arc<Direction>,
    stream: ByteRingWriter,
    /// Index of the next message.
    next: u64,
    /// The consumer's progress as last read; refreshed only when the slots look full.
    slots_done: u64,
    max_payload: u32,
    /// When payloads go by single-copy rendezvous: as configured, or [`SingleCopy::Off`] where
    /// the receiver cannot copy from this process's memory.
    single_copy: SingleCopy,
    /// How large payloads are carried, by measurement.
    carries: CarryChooser,
    /// [`OFF_READER_NANOS`] as last credited to the chooser.
    reader_seen: u64,
    /// How long a posted single copy waits to be claimed before it may be withdrawn
    /// ([`RDV_GRACE`]; tests that need a message to stay posted lengthen it).
    grace: Duration,
    broken: Option<String>,
    side: Side,
    /// A message `try_send` has started.
    outgoing: Option<Outgoing>,
    liveness: Liveness,
}

/// The state of a message `try_send` has announced but not finished.
#[derive(Clone, Copy, Debug)]
enum Outgoing {
    /// Payload bytes streamed through the byte ring so far.
    Stream {
        written: usize,
        /// When the message was announced, if its carrying is timed for the chooser.
        started: Option<Instant>,
    },
    /// Waiting for the receiver to copy rendezvous message `index`.
    Rendezvous {
        index: u64,
        /// As for `Stream`.
        started: Option<Instant>,
        /// When it was posted: [`RDV_GRACE`] later it may be withdrawn.
        posted: Instant,
    },
}

impl ShmSender {
    fn broken_error(&self) -> Result<()> {
        match &self.broken {
            Some(cause) => Err(Error::Broken {
                peer: self.side.peer.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Waits for a free slot.
    /// Whether a slot is free, refreshing the consumer's progress only when the cached view
    /// says the ring is full.
    fn slot_free(&mut self) -> Result<bool> {
        if self.next - self.slots_done < SLOTS as u64 {
            return Ok(true);
        }
        let done = self.dir.word(OFF_SLOTS_DONE).load(Ordering::Acquire);
        if done > self.next || done < self.slots_done {
            return Err(corrupted(
                &self.side.peer,
                format!("slots done {done} beyond sent {}", self.next),
            ));
        }
        self.slots_done = done;
        Ok(self.next - done < SLOTS as u64)
    }

    fn reserve(&mut self, deadline: Deadline) -> Result<()> {
        let (strategy, bootstrap) = (self.stream.wait, self.stream.bootstrap.clone());
        let mut wait = None;
        while !self.slot_free()? {
            let wait = wait.get_or_insert_with(|| Wait::new(strategy, &bootstrap));
            let (dir, next) = (&self.dir, self.next);
            let ready = || next - dir.word(OFF_SLOTS_DONE).load(Ordering::Acquire) < SLOTS as u64;
            wait.pause(dir.flag(OFF_WRITER_SLEEPS), ready, deadline, &self.side)?;
        }
        Ok(())
    }

    /// Fills and publishes the next slot.
    fn publish(&mut self, tag: u32, kind: u32, len: usize, body: &[u8]) {
        let slot = self.dir.slot(self.next);
        // SAFETY: the slot is free (reserved) and belongs to the writer until its sequence word
        // is published below; the body fits the slot (`body.len() <= SLOT - SLOT_BODY`).
        unsafe {
            slot.add(SLOT_TAG).cast::<u32>().write(tag);
            slot.add(SLOT_KIND).cast::<u32>().write(kind);
            slot.add(SLOT_LEN).cast::<u64>().write(len as u64);
            std::ptr::copy_nonoverlapping(body.as_ptr(), slot.add(SLOT_BODY), body.len());
        }
        self.dir
            .slot_seq(self.next)
            .store(self.next + 1, Ordering::Release);
        self.next += 1;
        wake_if_sleeping(self.dir.flag(OFF_READER_SLEEPS));
    }

    /// Publishes the slot of a message (a slot must be free): an inline message is then
    /// delivered (`None`); a larger one still needs its payload streamed or copied.
    fn announce(&mut self, tag: u32, payload: &[u8]) -> Option<Outgoing> {
        let len = payload.len();
        if len <= INLINE {
            self.publish(tag, KIND_INLINE, len, payload);
            return None;
        }
        let (carry, timed) = self.carry_for(len);
        let started = timed.then(Instant::now);
        if carry == Carry::SingleCopy {
            let index = self.next;
            self.dir
                .word(OFF_RDV)
                .store(rdv(index, RDV_POSTED), Ordering::Release);
            self.publish(
                tag,
                KIND_RENDEZVOUS,
                len,
                &(payload.as_ptr() as u64).to_le_bytes(),
            );
            return Some(Outgoing::Rendezvous {
                index,
                started,
                posted: Instant::now(),
            });
        }
        if let Carry::Ring(chunk) = carry {
            self.stream.chunk = chunk;
        }
        self.publish(tag, KIND_STREAM, len, &[]);
        Some(Outgoing::Stream {
            written: 0,
            started,
        })
    }

    /// Takes rendezvous message `index` back, to stream its `len` bytes through the byte ring
    /// instead: only when it is still unclaimed and the ring has room for all of it now. `false`
    /// when it stays posted (no room) or the receiver has claimed it.
    fn withdraw(&mut self, index: u64, len: usize) -> Result<bool> {
        if self.stream.free()? < len {
            return Ok(false);
        }
        if self
            .dir
            .word(OFF_RDV)
            .compare_exchange(
                rdv(index, RDV_POSTED),
                rdv(index, RDV_WITHDRAWN),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return Ok(false);
        }
        self.stream.chunk = self.carries.chunk();
        Ok(true)
    }

    /// Takes rendezvous message `index` back for good, posted or claimed, unless the receiver
    /// has finished copying it: whether it had.
    fn abandon_rendezvous(&self, index: u64) -> bool {
        let word = self.dir.word(OFF_RDV);
        let mut now = word.load(Ordering::Acquire);
        loop {
            if now == rdv(index, RDV_DONE) {
                return true;
            }
            if now != rdv(index, RDV_POSTED) && now != rdv(index, RDV_CLAIMED) {
                return false;
            }
            match word.compare_exchange(
                now,
                rdv(index, RDV_ABANDONED),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return false,
                Err(changed) => now = changed,
            }
        }
    }

    /// How a payload of `len` (> [`INLINE`]) bytes goes, and whether its time goes to the
    /// chooser.
    fn carry_for(&self, len: usize) -> (Carry, bool) {
        match self.single_copy {
            SingleCopy::From(min) if len >= min => (Carry::SingleCopy, false),
            _ if CarryChooser::times(len) => (self.carries.carry(), true),
            _ => (Carry::Ring(self.carries.chunk()), false),
        }
    }

    /// A message of `len` bytes announced at `started` (when timed) has been carried: its time,
    /// and the receiver's time on large payloads since the last one, go to the chooser.
    fn carried(&mut self, len: usize, started: Option<Instant>) {
        if let Some(started) = started {
            let reader = self.dir.word(OFF_READER_NANOS).load(Ordering::Relaxed);
            // The peer's count only steers a choice; a corrupted one is bounded, not trusted.
            let reader_took = reader.wrapping_sub(self.reader_seen).min(1_000_000_000);
            self.reader_seen = reader;
            self.carries
                .record(len, started.elapsed() + Duration::from_nanos(reader_took));
        }
    }

    /// Waits until the receiver has copied rendezvous message `index` (posted at `posted`):
    /// `Ok(true)`. `Ok(false)` when, unclaimed after [`RDV_GRACE`], it was withdrawn for the
    /// ring ([`ShmSender::withdraw`]). At the deadline, takes the buffer back (the receiver then
    /// discards whatever it copied).
    fn await_rendezvous(
        &mut self,
        index: u64,
        len: usize,
        posted: Instant,
        deadline: Deadline,
    ) -> Result<bool> {
        let dir = Arc::clone(&self.dir);
        let word = dir.word(OFF_RDV);
        let bootstrap = Arc::clone(&self.stream.bootstrap);
        let mut wait = Wait::new(self.stream.wait, &bootstrap);
        let grace = Deadline::at(posted + self.grace);
        loop {
            let state = word.load(Ordering::Acquire);
            if state == rdv(index, RDV_DONE) {
                return Ok(true);
            }
            let unclaimed = state == rdv(index, RDV_POSTED);
            if !unclaimed && state != rdv(index, RDV_CLAIMED) {
                return Err(corrupted(
                    &self.side.peer,
                    format!("rendezvous word {state:#x} for message {index}"),
                ));
            }
            if unclaimed && grace.expired() && self.withdraw(index, len)? {
                return Ok(false);
            }
            // Until the grace is over, wake for it; after, only for the receiver.
            let until = if unclaimed && !grace.expired() {
                deadline.min(grace)
            } else {
                deadline
            };
            let ready = || word.load(Ordering::Acquire) != state;
            match wait.pause(dir.flag(OFF_WRITER_SLEEPS), ready, until, &self.side) {
                Ok(()) => {}
                Err(Error::Timeout { .. }) if !deadline.expired() => {}
                Err(e) => {
                    // Take the buffer back unless the copy finished in the meantime.
                    return if self.abandon_rendezvous(index) {
                        Ok(true)
                    } else {
                        Err(e)
                    };
                }
            }
        }
    }
}

impl SendHalf for ShmSender {
    fn try_send(&mut self, tag: u32, payload: &[u8]) -> Result<bool> {
        self.broken_error()?;
        let len = payload.len();
        let state = match self.outgoing {
            Some(state) => state,
            None => {
                check_len(len, self.max_payload)?;
                if !self.slot_free()? {
                    self.liveness.check(&self.stream.bootstrap, &self.side)?;
                    return Ok(false);
                }
                match self.announce(tag, payload) {
                    Some(state) => state,
                    None => return Ok(true),
                }
            }
        };
        let (written, started) = match state {
            Outgoing::Stream { written, started } => (written, started),
            Outgoing::Rendezvous {
                index,
                started,
                posted,
            } => {
                let now = self.dir.word(OFF_RDV).load(Ordering::Acquire);
                if now == rdv(index, RDV_DONE) {
                    self.outgoing = None;
                    self.carried(len, started);
                    return Ok(true);
                }
                let unclaimed = now == rdv(index, RDV_POSTED);
                if !unclaimed && now != rdv(index, RDV_CLAIMED) {
                    let e = corrupted(&self.side.peer, format!("rendezvous word {now:#x}"));
                    self.broken = Some(e.to_string());
                    return Err(e);
                }
                let withdrawn = unclaimed
                    && posted.elapsed() >= self.grace
                    && self
                        .withdraw(index, len)
                        .inspect_err(|e| self.broken = Some(e.to_string()))?;
                if !withdrawn {
                    self.outgoing = Some(state);
                    // A dead receiver never copies: keep the buffer posted (the drop takes it
                    // back) and report the peer gone.
                    self.liveness.check(&self.stream.bootstrap, &self.side)?;
                    return Ok(false);
                }
                // Taken back: the payload streams through the ring from here.
                (0, started)
            }
        };
        let written = match self.stream.try_write_some(&[&payload[written..]]) {
            Ok(n) => written + n,
            Err(e) => {
                self.broken = Some(e.to_string());
                return Err(e);
            }
        };
        self.outgoing = (written < len).then_some(Outgoing::Stream { written, started });
        if written == len {
            self.carried(len, started);
        }
        if written < len
            && let Err(e) = self.liveness.check(&self.stream.bootstrap, &self.side)
        {
            self.broken = Some(e.to_string());
            return Err(e);
        }
        Ok(written == len)
    }

    fn send(&mut self, tag: u32, payload: &[u8], deadline: Deadline) -> Result<()> {
        self.broken_error()?;
        if self.outgoing.is_some() {
            return Err(Error::ProtocolViolation {
                peer: self.side.peer.clone(),
                detail: "a non-blocking send is in progress on this half: finish it first".into(),
            });
        }
        let len = payload.len();
        check_len(len, self.max_payload)?;
        self.reserve(deadline)?;
        let (streams, started) = match self.announce(tag, payload) {
            None => return Ok(()),
            Some(Outgoing::Rendezvous {
                index,
                started,
                posted,
            }) => {
                let copied = self
                    .await_rendezvous(index, len, posted, deadline)
                    .inspect_err(|e| self.broken = Some(e.to_string()))?;
                (!copied, started)
            }
            Some(Outgoing::Stream { started, .. }) => (true, started),
        };
        if streams {
            // The message is announced: a failure while streaming its payload breaks the link.
            write_all(&mut self.stream, &[payload], deadline).map_err(|p| {
                self.broken = Some(p.error.to_string());
                p.error
            })?;
        }
        self.carried(len, started);
        Ok(())
    }

    #[cfg(test)]
    fn inject_raw(&mut self, bytes: &[u8], _deadline: Deadline) -> Result<()> {
        // Garbage in the next slot: a kind and length no sender writes.
        let slot = self.dir.slot(self.next);
        let n = bytes.len().min(SLOT - SLOT_TAG);
        // SAFETY: the slot belongs to the writer until published; `n` fits the slot.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), slot.add(SLOT_TAG), n) };
        self.dir
            .slot_seq(self.next)
            .store(self.next + 1, Ordering::Release);
        self.next += 1;
        wake_if_sleeping(self.dir.flag(OFF_READER_SLEEPS));
        Ok(())
    }

    #[cfg(test)]
    fn abandon(&mut self) {
        self.broken = Some("abandoned".into());
    }
}

impl Drop for ShmSender {
    fn drop(&mut self) {
        if let Some(Outgoing::Rendezvous { index, .. }) = self.outgoing {
            // The buffer the receiver would copy from is about to go away: take it back, so the
            // receiver discards the copy instead of delivering it.
            self.abandon_rendezvous(index);
            return;
        }
        if self.outgoing.is_some() {
            return;
        }
        // An orderly close, if a slot is free right now; otherwise the closing link socket says
        // the peer is gone.
        if self.broken.is_none()
            && self.next - self.dir.word(OFF_SLOTS_DONE).load(Ordering::Acquire) < SLOTS as u64
        {
            self.publish(0, KIND_CLOSE, 0, &[]);
        }
    }
}

/// The receiving half of a shared-memory link.
pub(crate) struct ShmReceiver {
    dir: Arc<Direction>,
    stream: ByteRingReader,
    /// Index of the next message.
    next: u64,
    max_payload: u32,
    /// The sender's process, for single-copy rendezvous reads; `None` when unavailable.
    sender_pid: Option<Pid>,
    broken: Option<String>,
    side: Side,
    /// A streamed message `try_recv` has started: tag, length, bytes received.
    incoming: Option<(u32, usize, usize)>,
    liveness: Liveness,
}

impl ShmReceiver {
    fn fail(&mut self, e: Error) -> Error {
        self.broken = Some(e.to_string());
        e
    }

    /// Whether the next slot is published; `Err` when its sequence number is one no sender
    /// could have written there (a corrupted ring).
    fn next_published(&self) -> Result<bool> {
        if self.dir.published(self.next) {
            return Ok(true);
        }
        let want = self.next + 1;
        let s = self.dir.slot_seq(self.next).load(Ordering::Acquire);
        if s > want || (s != 0 && s + (SLOTS as u64) < want) {
            return Err(corrupted(
                &self.side.peer,
                format!("slot sequence {s}, expected {want}"),
            ));
        }
        Ok(false)
    }

    /// Waits for the next slot to be published.
    fn await_slot(&self, deadline: Deadline) -> Result<()> {
        if self.next_published()? {
            return Ok(());
        }
        let mut wait = Wait::new(self.stream.wait, &self.stream.bootstrap);
        while !self.next_published()? {
            wait.pause(
                self.dir.flag(OFF_READER_SLEEPS),
                || self.dir.published(self.next),
                deadline,
                &self.side,
            )?;
        }
        Ok(())
    }

    /// Copies a rendezvous payload straight from the sender's memory.
    fn pull(&self, pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let remote = [RemoteIoVec {
                base: addr as usize + done,
                len: buf.len() - done,
            }];
            let mut local = [io::IoSliceMut::new(&mut buf[done..])];
            match process_vm_readv(pid, &mut local, &remote) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(Error::PeerGone {
                        peer: self.side.peer.clone(),
                        detail: format!("recv: reading the sender's buffer failed: {e}"),
                    });
                }
            }
        }
        if done < buf.len() {
            return Err(Error::PeerGone {
                peer: self.side.peer.clone(),
                detail: format!(
                    "recv: the sender's buffer ended after {done} of {} bytes",
                    buf.len()
                ),
            });
        }
        Ok(())
    }

    fn consume_slot(&mut self) {
        self.next += 1;
        self.dir
            .word(OFF_SLOTS_DONE)
            .store(self.next, Ordering::Release);
        wake_if_sleeping(self.dir.flag(OFF_WRITER_SLEEPS));
    }
}

/// A published slot, read and checked.
struct Slot {
    tag: u32,
    kind: u32,
    len: usize,
    body: [u8; SLOT - SLOT_BODY],
}

impl ShmReceiver {
    fn broken_error(&self) -> Result<()> {
        match &self.broken {
            Some(cause) => Err(Error::Broken {
                peer: self.side.peer.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Reads and checks the published slot `next`; a close is `Closed`, a message longer than
    /// `capacity` is `BufferTooSmall` (the slot stays unconsumed for the next call).
    fn read_slot(&mut self, capacity: usize) -> Result<Slot> {
        let slot = self.dir.slot(self.next);
        let mut body = [0u8; SLOT - SLOT_BODY];
        // SAFETY: the published slot belongs to the reader until it is consumed; all offsets are
        // within the 64-byte slot.
        let (tag, kind, len) = unsafe {
            std::ptr::copy_nonoverlapping(slot.add(SLOT_BODY), body.as_mut_ptr(), body.len());
            (
                slot.add(SLOT_TAG).cast::<u32>().read(),
                slot.add(SLOT_KIND).cast::<u32>().read(),
                slot.add(SLOT_LEN).cast::<u64>().read(),
            )
        };
        let valid = match kind {
            KIND_INLINE => len <= INLINE as u64,
            KIND_STREAM | KIND_RENDEZVOUS => len <= u64::from(self.max_payload),
            KIND_CLOSE => len == 0,
            _ => false,
        };
        if !valid {
            let e = corrupted(
                &self.side.peer,
                format!("slot of kind {kind} with length {len}"),
            );
            return Err(self.fail(e));
        }
        if kind == KIND_CLOSE {
            let e = Error::Closed {
                peer: self.side.peer.clone(),
            };
            return Err(self.fail(e));
        }
        let len = len as usize;
        if len > capacity {
            return Err(Error::BufferTooSmall {
                needed: len,
                capacity,
            });
        }
        Ok(Slot {
            tag,
            kind,
            len,
            body,
        })
    }

    /// Claims rendezvous message `next` for its single copy: `true`. `false` when the sender has
    /// withdrawn it, so its payload comes through the byte ring: the word says so, or it already
    /// belongs to a later message (a sender moves on from a rendezvous only once it is done,
    /// which needs this claim, withdrawn, or abandoned, after which it sends nothing more).
    fn claim(&mut self) -> Result<bool> {
        let index = self.next;
        let word = self.dir.word(OFF_RDV);
        let now = match word.compare_exchange(
            rdv(index, RDV_POSTED),
            rdv(index, RDV_CLAIMED),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Ok(true),
            Err(now) => now,
        };
        // A later message the receiver has not reached yet can only be posted, withdrawn too, or
        // abandoned by a sender that went away.
        let (at, state) = (now >> RDV_BITS, now & ((1 << RDV_BITS) - 1));
        let later = at > index
            && at - index < SLOTS as u64
            && matches!(state, RDV_POSTED | RDV_WITHDRAWN | RDV_ABANDONED);
        if now == rdv(index, RDV_WITHDRAWN) || later {
            return Ok(false);
        }
        let e = if now == rdv(index, RDV_ABANDONED) {
            Error::PeerGone {
                peer: self.side.peer.clone(),
                detail: "recv: the sender gave up on this message at its deadline".into(),
            }
        } else {
            corrupted(
                &self.side.peer,
                format!("rendezvous word {now:#x} for message {index}"),
            )
        };
        Err(self.fail(e))
    }

    /// Whether the message in `slot` comes through the byte ring: a streamed one, or a
    /// rendezvous the sender withdrew. A rendezvous it did not is claimed here.
    fn streams(&mut self, slot: &Slot) -> Result<bool> {
        match slot.kind {
            KIND_STREAM => Ok(true),
            KIND_RENDEZVOUS => Ok(!self.claim()?),
            _ => Ok(false),
        }
    }

    /// Delivers an inline or claimed rendezvous message into `buf` and consumes its slot.
    fn deliver_now(&mut self, slot: &Slot, buf: &mut [u8]) -> Result<Message> {
        let len = slot.len;
        if slot.kind == KIND_INLINE {
            buf[..len].copy_from_slice(&slot.body[..len]);
        } else {
            let addr = u64::from_le_bytes(slot.body[..8].try_into().expect("8 bytes"));
            let index = self.next;
            let Some(pid) = self.sender_pid else {
                let e = corrupted(
                    &self.side.peer,
                    "a rendezvous message on a link without single copy".into(),
                );
                return Err(self.fail(e));
            };
            let start = CarryChooser::clock(len);
            if let Err(e) = self.pull(pid, addr, &mut buf[..len]) {
                return Err(self.fail(e));
            }
            self.dir.reader_took_since(start);
            let word = self.dir.word(OFF_RDV);
            let finished = word.compare_exchange(
                rdv(index, RDV_CLAIMED),
                rdv(index, RDV_DONE),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            wake_if_sleeping(self.dir.flag(OFF_WRITER_SLEEPS));
            if finished.is_err() {
                let e = Error::PeerGone {
                    peer: self.side.peer.clone(),
                    detail: "recv: the sender gave up on this message at its deadline".into(),
                };
                return Err(self.fail(e));
            }
        }
        self.consume_slot();
        Ok(Message { tag: slot.tag, len })
    }
}

impl RecvHalf for ShmReceiver {
    fn recv(&mut self, buf: &mut [u8], deadline: Deadline) -> Result<Message> {
        self.broken_error()?;
        if self.incoming.is_some() {
            return Err(Error::ProtocolViolation {
                peer: self.side.peer.clone(),
                detail: "a non-blocking receive is in progress on this half: finish it first"
                    .into(),
            });
        }
        self.await_slot(deadline)?;
        let slot = self.read_slot(buf.len())?;
        if !self.streams(&slot)? {
            return self.deliver_now(&slot, buf);
        }
        let start = CarryChooser::clock(slot.len);
        if let Err(p) = read_full(&mut self.stream, &mut buf[..slot.len], deadline) {
            return Err(self.fail(p.error));
        }
        self.dir.reader_took_since(start);
        self.consume_slot();
        Ok(Message {
            tag: slot.tag,
            len: slot.len,
        })
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Message>> {
        self.broken_error()?;
        let (tag, len, mut done) = match self.incoming.take() {
            Some(state) => state,
            None => {
                if !self.next_published()? {
                    // The slot may have been published between the load above and the peer's
                    // exit: a gone peer is an error only if it left nothing to read.
                    let (dir, next) = (&self.dir, self.next);
                    let ready = || dir.published(next);
                    self.liveness.check_at(
                        Instant::now(),
                        &self.stream.bootstrap,
                        &self.side,
                        ready,
                    )?;
                    return Ok(None);
                }
                let slot = self.read_slot(buf.len())?;
                if !self.streams(&slot)? {
                    return self.deliver_now(&slot, buf).map(Some);
                }
                (slot.tag, slot.len, 0)
            }
        };
        if len > buf.len() {
            self.incoming = Some((tag, len, done));
            return Err(Error::BufferTooSmall {
                needed: len,
                capacity: buf.len(),
            });
        }
        // The receiver's share of a large payload's carrying: the time this call spent copying.
        let start = CarryChooser::clock(len);
        while done < len {
            match self.stream.try_read_some(&mut buf[done..len], true) {
                Ok(Some(k)) => done += k,
                Ok(None) => {
                    self.dir.reader_took_since(start);
                    self.incoming = Some((tag, len, done));
                    // as above: bytes written just before the peer exited are still to be read
                    let stream = &self.stream;
                    let now = Instant::now();
                    if let Err(e) =
                        self.liveness
                            .check_at(now, &stream.bootstrap, &self.side, || stream.has_unread())
                    {
                        return Err(self.fail(e));
                    }
                    return Ok(None);
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        self.dir.reader_took_since(start);
        self.consume_slot();
        Ok(Some(Message { tag, len }))
    }
}

/// Which side of the link sets the segment up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The accepting side: creates the segment.
    Creator,
    /// The connecting side: maps it.
    Joiner,
}

/// Removes the segment's name on drop, so an error never leaves it in `/dev/shm`.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(crate) fn setup_send<S: ByteSink>(
    sink: &mut S,
    payload: &[u8],
    deadline: Deadline,
) -> Result<()> {
    let header = FrameHeader::try_for_payload(FrameKind::HANDSHAKE, 0, 0, payload, true).map_err(
        |error| Error::Frame {
            peer: sink.peer().to_string(),
            error,
        },
    )?;
    write_all(sink, &[&encode_frame(&header, payload)], deadline).map_err(|p| p.error)
}

pub(crate) fn setup_recv<S: ByteSource>(source: &mut S, deadline: Deadline) -> Result<Vec<u8>> {
    let mut head = [0u8; HEADER_LEN];
    read_full(source, &mut head, deadline).map_err(|p| p.error)?;
    let peer = source.peer().to_string();
    let frame_error = |error| Error::Frame {
        peer: peer.clone(),
        error,
    };
    let header = FrameHeader::decode(&head, SETUP_MAX).map_err(frame_error)?;
    let mut payload = vec![0u8; header.payload_len()];
    read_full(source, &mut payload, deadline).map_err(|p| p.error)?;
    header.verify_payload(&payload).map_err(frame_error)?;
    Ok(payload)
}

fn io_err(peer: &str, op: &'static str, error: io::Error) -> Error {
    Error::Io {
        op,
        peer: peer.to_string(),
        error,
    }
}

fn map(file: &File, len: usize, peer: &str) -> Result<Arc<Segment>> {
    // SAFETY: the file is a private 0600 segment of exactly `len` bytes shared only with the
    // authenticated peer; its contents change under us by design and are only accessed through
    // atomics and bounds-checked copies.
    // Populated up front: otherwise the first lap around each ring takes a page fault per 4 KiB
    // on both sides, which dominates short runs.
    let map = unsafe { MmapOptions::new().populate().map_mut(file) }
        .map_err(|e| io_err(peer, "mmap shared segment", e))?;
    if map.len() != len {
        return Err(corrupted(
            peer,
            format!("segment is {} bytes, expected {len}", map.len()),
        ));
    }
    Ok(Arc::new(Segment { map }))
}

/// A random value at a known address, so the peer can test whether it may read this process's
/// memory (and that the pid it was told names this process).
struct Probe {
    value: Box<u64>,
}

impl Probe {
    fn new(peer: &str) -> Result<Self> {
        let mut v = [0u8; 8];
        getrandom::fill(&mut v)
            .map_err(|e| io_err(peer, "random probe", io::Error::other(e.to_string())))?;
        Ok(Probe {
            value: Box::new(u64::from_le_bytes(v)),
        })
    }

    fn describe(&self, out: &mut Vec<u8>) {
        out.put_u32(std::process::id());
        out.put_u64(&*self.value as *const u64 as u64);
        out.put_u64(*self.value);
    }
}

/// Whether this process can copy from the peer described by `(pid, addr, value)`.
fn can_read(pid: u32, addr: u64, value: u64) -> Option<Pid> {
    let pid = Pid::from_raw(i32::try_from(pid).ok()?);
    let mut got = [0u8; 8];
    let remote = [RemoteIoVec {
        base: addr as usize,
        len: 8,
    }];
    let mut local = [io::IoSliceMut::new(&mut got)];
    match process_vm_readv(pid, &mut local, &remote) {
        Ok(8) if u64::from_le_bytes(got) == value => Some(pid),
        _ => None,
    }
}

fn read_probe(
    r: &mut Reader<'_>,
) -> std::result::Result<(u32, u64, u64), crate::codec::DecodeError> {
    Ok((
        r.u32("pid")?,
        r.u64("probe address")?,
        r.u64("probe value")?,
    ))
}

/// When a shared-memory sender copies a payload once — the receiver reading it straight from the
/// sender's buffer with `process_vm_readv`, the sender's call returning once that copy is done —
/// instead of streaming it through the byte ring. Single copy needs the kernel to let the peer
/// read this process (same user, no ptrace restriction); where it does not, every payload
/// streams. A receiver that does not start the copy within a millisecond (busy elsewhere, or
/// blocked in a send of its own) does not hold the sender: when the ring has room for the whole
/// payload, the sender takes the message back and streams it, as the ring alone would have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SingleCopy {
    /// Never: every payload streams through the ring.
    Off,
    /// Payloads over 256 KiB go whichever way the sender measures faster on this link — the ring
    /// in 256 KiB or 1 MiB pieces, or the single copy — each way re-measured now and then, so a
    /// change of core placement is followed.
    #[default]
    Auto,
    /// Payloads from this many bytes up always go by single copy.
    From(usize),
}

impl std::fmt::Display for SingleCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SingleCopy::Off => f.write_str("off"),
            SingleCopy::Auto => f.write_str("auto"),
            SingleCopy::From(min) => write!(f, "from {min} bytes"),
        }
    }
}

/// What one side asks of a shared-memory link.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params {
    /// Bytes of each direction's byte ring (the creator's value is used).
    pub ring_bytes: usize,
    /// When this side sends by single-copy rendezvous.
    pub single_copy: SingleCopy,
    /// The negotiated largest message.
    pub max_payload: u32,
    /// How this side waits.
    pub wait: WaitStrategy,
}

/// Sets up both directions over the authenticated `bootstrap_io` and returns this side's halves.
pub(crate) fn establish<S: ByteSink + ByteSource>(
    bootstrap_io: &mut S,
    bootstrap: Arc<TcpStream>,
    role: Role,
    params: Params,
    deadline: Deadline,
) -> Result<(ShmSender, ShmReceiver)> {
    let Params {
        ring_bytes,
        single_copy,
        max_payload,
        wait,
    } = params;
    let peer = ByteSink::peer(bootstrap_io).to_string();
    let bad = |what: String| Error::ProtocolViolation {
        peer: peer.clone(),
        detail: format!("shm setup: {what}"),
    };
    let probe = Probe::new(&peer)?;
    // Whether the peer can read from us (so we may send by rendezvous), and the pid to read from
    // when we may receive by rendezvous.
    let (segment, capacity, peer_reads_us, we_read_peer) = match role {
        Role::Creator => {
            let capacity = ring_bytes.clamp(MIN_RING, MAX_RING).next_power_of_two();
            let mut nonce = [0u8; 16];
            getrandom::fill(&mut nonce).map_err(|e| {
                io_err(
                    &peer,
                    "random segment name",
                    io::Error::other(e.to_string()),
                )
            })?;
            let name: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
            let path = Path::new("/dev/shm").join(format!("sinew-{}-{name}", std::process::id()));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io_err(&peer, "create shared segment", e))?;
            let _unlink = Unlink(path.clone());
            let len = Segment::len_for(capacity);
            file.set_len(len as u64)
                .map_err(|e| io_err(&peer, "size shared segment", e))?;
            let segment = map(&file, len, &peer)?;
            for d in 0..2 {
                Direction::new(segment.clone(), d, capacity).init();
            }
            let mut offer = Vec::new();
            offer.put_u64(capacity as u64);
            probe.describe(&mut offer);
            offer.extend_from_slice(path.as_os_str().as_encoded_bytes());
            setup_send(bootstrap_io, &offer, deadline)?;
            let answer = setup_recv(bootstrap_io, deadline)?;
            let mut r = Reader::new(&answer);
            let parsed = (|| {
                let reads_us = r.u8("can read")? == 1;
                let probe = read_probe(&mut r)?;
                Ok::<_, crate::codec::DecodeError>((reads_us, probe))
            })();
            let (peer_reads_us, (pid, addr, value)) = parsed.map_err(|e| bad(e.to_string()))?;
            let we_read_peer = can_read(pid, addr, value);
            setup_send(bootstrap_io, &[u8::from(we_read_peer.is_some())], deadline)?;
            // `_unlink` removes the name now: both sides hold the mapping.
            (segment, capacity, peer_reads_us, we_read_peer)
        }
        Role::Joiner => {
            let offer = setup_recv(bootstrap_io, deadline)?;
            let mut r = Reader::new(&offer);
            let capacity = r.u64("ring capacity").map_err(|e| bad(e.to_string()))? as usize;
            let (pid, addr, value) = read_probe(&mut r).map_err(|e| bad(e.to_string()))?;
            let rest = offer.len().saturating_sub(8 + 4 + 8 + 8);
            let path = r
                .bytes(rest, "segment path")
                .map_err(|e| bad(e.to_string()))?;
            let path = PathBuf::from(String::from_utf8_lossy(path).into_owned());
            if !capacity.is_power_of_two() || !(MIN_RING..=MAX_RING).contains(&capacity) {
                return Err(bad(format!("ring capacity {capacity} out of range")));
            }
            if path.parent() != Some(Path::new("/dev/shm")) {
                return Err(bad(format!(
                    "segment {} is not in /dev/shm",
                    path.display()
                )));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_err(&peer, "open shared segment", e))?;
            let segment = map(&file, Segment::len_for(capacity), &peer)?;
            for d in 0..2 {
                Direction::new(segment.clone(), d, capacity)
                    .validate()
                    .map_err(|what| corrupted(&peer, what))?;
            }
            let we_read_peer = can_read(pid, addr, value);
            let mut answer = vec![u8::from(we_read_peer.is_some())];
            probe.describe(&mut answer);
            setup_send(bootstrap_io, &answer, deadline)?;
            let verdict = setup_recv(bootstrap_io, deadline)?;
            let peer_reads_us = verdict.first() == Some(&1);
            (segment, capacity, peer_reads_us, we_read_peer)
        }
    };
    // The probe must stay readable until the peer has tested it: it has, once setup is done.
    drop(probe);
    let (out_dir, in_dir) = match role {
        Role::Creator => (0, 1),
        Role::Joiner => (1, 0),
    };
    let out = Arc::new(Direction::new(segment.clone(), out_dir, capacity));
    let inn = Arc::new(Direction::new(segment, in_dir, capacity));
    let send_side = Side {
        peer: peer.clone(),
        op: "send",
    };
    let recv_side = Side { peer, op: "recv" };
    let sender = ShmSender {
        dir: out.clone(),
        stream: ByteRingWriter {
            dir: out,
            tail: 0,
            chunk: STREAM_CHUNKS[0],
            bootstrap: bootstrap.clone(),
            wait,
            side: send_side.clone(),
        },
        next: 0,
        slots_done: 0,
        max_payload,
        single_copy: match single_copy {
            _ if !peer_reads_us => SingleCopy::Off,
            // Inline messages never take the rendezvous: their slot is the whole message.
            SingleCopy::From(min) => SingleCopy::From(min.max(INLINE + 1)),
            other => other,
        },
        carries: CarryChooser::new(single_copy == SingleCopy::Auto && peer_reads_us),
        reader_seen: 0,
        grace: RDV_GRACE,
        broken: None,
        side: send_side,
        outgoing: None,
        liveness: Liveness::new(),
    };
    let receiver = ShmReceiver {
        dir: inn.clone(),
        stream: ByteRingReader {
            dir: inn,
            head: 0,
            bootstrap,
            wait,
            side: recv_side.clone(),
        },
        next: 0,
        max_payload,
        sender_pid: we_read_peer,
        broken: None,
        side: recv_side,
        incoming: None,
        liveness: Liveness::new(),
    };
    tracing::debug!(
        single_copy_send = ?sender.single_copy,
        single_copy_recv = we_read_peer.is_some(),
        capacity,
        "shm link set up"
    );
    Ok((sender, receiver))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::Conn;

    /// The single-copy threshold the tests ask for.
    const RENDEZVOUS_MIN: usize = 256 << 10;

    /// Both sides' halves, single copy asked for from [`RENDEZVOUS_MIN`].
    fn ends(capacity: usize) -> ((ShmSender, ShmReceiver), (ShmSender, ShmReceiver)) {
        ends_with(capacity, SingleCopy::From(RENDEZVOUS_MIN))
    }

    fn params(ring_bytes: usize, single_copy: SingleCopy) -> Params {
        Params {
            ring_bytes,
            single_copy,
            max_payload: 1 << 30,
            wait: WaitStrategy::default(),
        }
    }

    /// Both sides' halves over a loopback TCP bootstrap connection, with this single-copy
    /// threshold on both sides.
    fn ends_with(
        capacity: usize,
        single_copy: SingleCopy,
    ) -> ((ShmSender, ShmReceiver), (ShmSender, ShmReceiver)) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let joiner = std::thread::spawn(move || {
            let s = Arc::new(TcpStream::connect(addr).unwrap());
            let mut conn = Conn::new(s.clone(), "creator".into(), WaitStrategy::Block);
            let d = Deadline::after(Duration::from_secs(5));
            establish(&mut conn, s, Role::Joiner, params(capacity, single_copy), d).unwrap()
        });
        let (s, _) = l.accept().unwrap();
        let s = Arc::new(s);
        let mut conn = Conn::new(s.clone(), "joiner".into(), WaitStrategy::Block);
        let d = Deadline::after(Duration::from_secs(5));
        let creator = establish(
            &mut conn,
            s,
            Role::Creator,
            params(capacity, single_copy),
            d,
        )
        .unwrap();
        (creator, joiner.join().unwrap())
    }

    fn round_trip(tx: &mut ShmSender, rx: &mut ShmReceiver, sizes: &[usize]) {
        std::thread::scope(|s| {
            let sizes2 = sizes.to_vec();
            let reader = s.spawn(move || {
                let mut buf = vec![0u8; 4 << 20];
                for (i, n) in sizes2.into_iter().enumerate() {
                    let m = rx
                        .recv(&mut buf, Deadline::after(Duration::from_secs(10)))
                        .unwrap();
                    assert_eq!((m.tag, m.len), (i as u32, n));
                    assert!(buf[..n] == pattern(i, n));
                }
            });
            for (i, &n) in sizes.iter().enumerate() {
                tx.send(
                    i as u32,
                    &pattern(i, n),
                    Deadline::after(Duration::from_secs(10)),
                )
                .unwrap();
            }
            reader.join().unwrap();
        });
    }

    #[test]
    fn every_path_carries_messages_in_order() {
        let ((mut tx, _), (_, mut rx)) = ends(4096);
        // Inline, streamed through a ring smaller than the message, and single copy.
        let sizes = [
            0,
            1,
            INLINE,
            INLINE + 1,
            4096,
            100_000,
            RENDEZVOUS_MIN,
            3 << 20,
        ];
        round_trip(&mut tx, &mut rx, &sizes);
    }

    #[test]
    fn a_ring_larger_than_a_chunk_streams_in_pieces_across_its_wrap() {
        // Sizes around each chunk, and several rings' worth, through a ring of four large chunks,
        // with each chunk size in turn: the writer publishes piece by piece, across the wrap.
        for (choice, &chunk) in STREAM_CHUNKS.iter().enumerate() {
            let ((mut tx, _), (_, mut rx)) = ends(4 * STREAM_CHUNKS[1]);
            tx.single_copy = SingleCopy::Off;
            tx.carries.current = choice;
            round_trip(
                &mut tx,
                &mut rx,
                &[
                    chunk - 1,
                    chunk,
                    chunk + 1,
                    3 * chunk + 5,
                    (3 << 20) + 7,
                    100,
                    4 * STREAM_CHUNKS[1] - 3,
                ],
            );
        }
    }

    /// Feeds `chooser` one epoch carried at `rate` bytes per second (per way), in 1 MiB
    /// messages; which way it used.
    fn epoch_at(chooser: &mut CarryChooser, rate: [f64; 3]) -> usize {
        let used = chooser.current;
        let write = 1usize << 20;
        for _ in 0..CHUNK_EPOCH / write as u64 {
            chooser.record(write, Duration::from_secs_f64(write as f64 / rate[used]));
        }
        used
    }

    #[test]
    fn the_chooser_measures_every_way_then_keeps_the_fastest_and_retries_the_others() {
        let period = CHUNK_EXPLORE_EVERY as usize;
        for usable in [2, 3] {
            for faster in 0..usable {
                let mut rate = [1e9, 2e9, 1.5e9];
                rate[faster] = 4e9;
                let mut chooser = CarryChooser::new(usable == 3);
                let used: Vec<usize> = (0..4 * period)
                    .map(|_| epoch_at(&mut chooser, rate))
                    .collect();
                // The first epochs measure each way, in order.
                assert_eq!(&used[..usable], &(0..usable).collect::<Vec<_>>()[..]);
                // After that the slower ways get one epoch per period between them, in turn:
                // each retried, none kept.
                let retried: Vec<usize> = used[usable..]
                    .iter()
                    .copied()
                    .filter(|&u| u != faster)
                    .collect();
                assert!((3..=5).contains(&retried.len()), "{used:?}");
                for other in (0..usable).filter(|&u| u != faster) {
                    assert!(retried.contains(&other), "{other} never retried: {used:?}");
                }
            }
        }
    }

    #[test]
    fn without_single_copy_the_chooser_never_picks_it() {
        let mut chooser = CarryChooser::new(false);
        for _ in 0..4 * CHUNK_EXPLORE_EVERY {
            assert_ne!(epoch_at(&mut chooser, [1e9, 1e9, 100e9]), 2);
        }
    }

    #[test]
    fn the_chooser_follows_a_change_of_placement() {
        // No shared cache (single copy fastest, small pieces next), then a shared one (large
        // pieces fastest): within two retry periods the chooser is on the large pieces for good;
        // and back: within a few epochs it is on the single copy again.
        let period = CHUNK_EXPLORE_EVERY as usize;
        let apart = [7e9, 3e9, 10e9];
        let shared = [12e9, 40e9, 11e9];
        let mut chooser = CarryChooser::new(true);
        let before: Vec<usize> = (0..period).map(|_| epoch_at(&mut chooser, apart)).collect();
        assert!(
            before.iter().filter(|&&u| u != 2).count() <= 3,
            "{before:?}"
        );
        let after: Vec<usize> = (0..4 * period)
            .map(|_| epoch_at(&mut chooser, shared))
            .collect();
        let settled = &after[2 * period + 1..];
        assert!(
            settled.iter().filter(|&&u| u != 1).count() <= 2,
            "{after:?}"
        );
        let back: Vec<usize> = (0..period).map(|_| epoch_at(&mut chooser, apart)).collect();
        assert!(
            back[8..].iter().filter(|&&u| u != 2).count() <= 2,
            "{back:?}"
        );
    }

    #[test]
    fn while_the_single_copy_is_in_use_the_ring_keeps_its_faster_piece_size() {
        let mut chooser = CarryChooser::new(true);
        for _ in 0..3 {
            epoch_at(&mut chooser, [2e9, 3e9, 9e9]);
        }
        assert_eq!(chooser.carry(), Carry::SingleCopy);
        assert_eq!(chooser.chunk(), STREAM_CHUNKS[1]);
        let mut chooser = CarryChooser::new(true);
        for _ in 0..3 {
            epoch_at(&mut chooser, [3e9, 2e9, 9e9]);
        }
        assert_eq!(chooser.chunk(), STREAM_CHUNKS[0]);
    }

    #[test]
    fn only_payloads_larger_than_a_small_chunk_are_timed() {
        assert!(!CarryChooser::times(40));
        assert!(!CarryChooser::times(STREAM_CHUNKS[0]));
        assert!(CarryChooser::times(STREAM_CHUNKS[0] + 1));
    }

    #[test]
    fn the_receivers_time_on_large_payloads_reaches_the_senders_chooser() {
        // A streamed and a single-copy payload, each through recv and through try_recv: the
        // receiver's time lands in shared memory, and the sender's next timed message takes it.
        let ((mut tx, _), (_, mut rx)) = ends_with(4 << 20, SingleCopy::Auto);
        let size = 2 << 20;
        let data = vec![3u8; size];
        let mut buf = vec![0u8; size];
        let d = || Deadline::after(Duration::from_secs(10));
        let reader_nanos = |rx: &ShmReceiver| rx.dir.word(OFF_READER_NANOS).load(Ordering::Relaxed);
        let mut seen = 0;
        for (carry, polled) in [(0, false), (0, true), (2, false), (2, true)] {
            tx.carries.current = carry;
            std::thread::scope(|s| {
                s.spawn(|| {
                    if polled {
                        poll_send(&mut tx, 1, &data);
                    } else {
                        tx.send(1, &data, d()).unwrap();
                    }
                });
                let m = if polled {
                    poll_recv(&mut rx, &mut buf)
                } else {
                    rx.recv(&mut buf, d()).unwrap()
                };
                assert_eq!(m.len, size);
            });
            let now = reader_nanos(&rx);
            assert!(now > seen, "way {carry}, polled {polled}: no receiver time");
            seen = now;
        }
        // The sender credits the receiver's time since its last timed message with the next.
        rx.dir.reader_took(Duration::from_millis(50));
        let before = tx.carries.epoch_time;
        tx.carried(size, Some(Instant::now()));
        assert_eq!(tx.carries.epochs, 0, "still the first epoch");
        assert!(tx.carries.epoch_time - before >= Duration::from_millis(50));
        assert_eq!(tx.reader_seen, reader_nanos(&rx));
    }

    #[test]
    fn an_auto_link_measures_every_way_on_real_messages_and_delivers_them_intact() {
        // Enough 1 MiB messages for every way's first epoch and then some, through send and
        // through try_send: each way gets a measured rate, and every message arrives intact.
        let ((mut tx, _), (_, mut rx)) = ends_with(4 << 20, SingleCopy::Auto);
        assert_eq!((tx.single_copy, tx.carries.usable), (SingleCopy::Auto, 3));
        let n = 4 * (CHUNK_EPOCH >> 20) as usize;
        let size = 1 << 20;
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = vec![0u8; size];
                for i in 0..n {
                    let m = rx
                        .recv(&mut buf, Deadline::after(Duration::from_secs(10)))
                        .unwrap();
                    assert_eq!((m.tag, m.len), (i as u32, size));
                    assert!(buf.iter().all(|&b| b == i as u8), "message {i}");
                }
            });
            let mut used = std::collections::BTreeSet::new();
            for i in 0..n {
                used.insert(tx.carries.current);
                let data = vec![i as u8; size];
                if i % 2 == 0 {
                    tx.send(i as u32, &data, Deadline::after(Duration::from_secs(10)))
                        .unwrap();
                } else {
                    poll_send(&mut tx, i as u32, &data);
                }
            }
            assert_eq!(used.len(), 3, "ways used: {used:?}");
        });
        assert!(
            tx.carries.rate.iter().all(Option::is_some),
            "{:?}",
            tx.carries
        );
    }

    #[test]
    fn a_rendezvous_word_no_sender_writes_is_an_error_on_both_sides() {
        let ((mut tx, _), (_, mut rx)) = ends_with(4 << 20, SingleCopy::From(RENDEZVOUS_MIN));
        tx.grace = Duration::from_secs(60);
        let data = pattern(0, 512 << 10);
        assert!(!tx.try_send(0, &data).unwrap());
        // The word says a later message was already copied, which needs this one done first.
        tx.dir
            .word(OFF_RDV)
            .store(rdv(1, RDV_DONE), Ordering::Release);
        let mut buf = vec![0u8; 512 << 10];
        let err = rx
            .recv(&mut buf, Deadline::after(Duration::from_secs(1)))
            .unwrap_err();
        assert_corrupted(&err);
        let err = tx.try_send(0, &data).unwrap_err();
        assert_corrupted(&err);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        /// Any ring size and any sequence of message sizes stream through intact and in order.
        #[test]
        fn any_ring_and_message_sizes_stream_intact(
            ring_log2 in 12u32..21,
            sizes in proptest::collection::vec(0usize..(3 << 20), 1..6),
        ) {
            let ((mut tx, _), (_, mut rx)) = ends(1 << ring_log2);
            tx.single_copy = SingleCopy::Off;
            round_trip(&mut tx, &mut rx, &sizes);
        }

        /// Whatever it is told (zero durations, huge payloads), the chooser never panics, only
        /// ever picks a way the link may use, and its ring piece is one of the sizes.
        #[test]
        fn the_chooser_picks_only_usable_ways(
            single_copy: bool,
            writes in proptest::collection::vec((0usize..(64 << 20), 0u64..10_000_000), 0..200),
        ) {
            let mut chooser = CarryChooser::new(single_copy);
            for (bytes, nanos) in writes {
                chooser.record(bytes, Duration::from_nanos(nanos));
                proptest::prop_assert!(single_copy || chooser.carry() != Carry::SingleCopy);
                proptest::prop_assert!(STREAM_CHUNKS.contains(&chooser.chunk()));
            }
        }
    }

    #[test]
    fn without_single_copy_large_messages_stream_through_the_ring() {
        let ((mut tx, _), (_, mut rx)) = ends_with(4096, SingleCopy::Off);
        assert_eq!((tx.single_copy, tx.carries.usable), (SingleCopy::Off, 2));
        round_trip(&mut tx, &mut rx, &[RENDEZVOUS_MIN, 3 << 20, 5]);
    }

    #[test]
    fn single_copy_is_used_only_when_asked_for_and_never_for_inline_messages() {
        let ((tx, _), (back_tx, _)) = ends_with(4096, SingleCopy::Off);
        assert_eq!(
            (tx.single_copy, back_tx.single_copy),
            (SingleCopy::Off, SingleCopy::Off)
        );
        let ((tx, _), _) = ends_with(4096, SingleCopy::From(1));
        assert_eq!(tx.single_copy, SingleCopy::From(INLINE + 1));
        assert_eq!(tx.carry_for(INLINE + 1), (Carry::SingleCopy, false));
        // Auto: only payloads over a small chunk follow the chooser, even while it is on the
        // single copy.
        let ((mut tx, _), _) = ends_with(4096, SingleCopy::Auto);
        tx.carries.current = 2;
        assert_eq!(
            tx.carry_for(STREAM_CHUNKS[0] + 1),
            (Carry::SingleCopy, true)
        );
        assert!(matches!(
            tx.carry_for(STREAM_CHUNKS[0]),
            (Carry::Ring(_), false)
        ));
        // One direction by rendezvous, the other through the ring, on one link.
        let ((mut tx, mut back_rx), (mut back_tx, mut rx)) = ends(4096);
        back_tx.single_copy = SingleCopy::Off;
        round_trip(&mut tx, &mut rx, &[RENDEZVOUS_MIN + 1, 7]);
        round_trip(&mut back_tx, &mut back_rx, &[RENDEZVOUS_MIN + 1, 7]);
    }

    #[test]
    fn more_messages_than_slots_wait_for_the_reader() {
        let ((mut tx, _), (_, mut rx)) = ends(4096);
        round_trip(&mut tx, &mut rx, &[8; SLOTS * 3]);
    }

    #[test]
    fn the_segment_name_is_gone_once_both_sides_mapped_it() {
        // The kernel's view of each side's own mapping (other tests in this process create
        // segments concurrently, so the directory listing alone would race with them).
        let mapping_of = |addr: usize| -> String {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            maps.lines()
                .find(|line| {
                    let range = line.split_whitespace().next().unwrap_or("");
                    let (start, end) = range.split_once('-').unwrap();
                    let start = usize::from_str_radix(start, 16).unwrap();
                    let end = usize::from_str_radix(end, 16).unwrap();
                    (start..end).contains(&addr)
                })
                .unwrap_or_else(|| panic!("no mapping holds {addr:#x}"))
                .to_string()
        };
        let ((creator, _), (joiner, _)) = ends(4096);
        for side in [&creator, &joiner] {
            let line = mapping_of(side.dir.control as usize);
            assert!(line.contains("/dev/shm/sinew-"), "{line}");
            assert!(line.ends_with(" (deleted)"), "{line}");
        }
    }

    #[test]
    fn a_corrupted_ring_header_is_an_error_not_undefined_behaviour() {
        let ((tx, _), (_, mut rx)) = ends(4096);
        // A slot sequence from the far future, and a byte ring tail beyond the capacity.
        tx.dir.slot_seq(0).store(1_000_000, Ordering::Release);
        let mut buf = [0u8; 64];
        let err = rx
            .recv(&mut buf, Deadline::after(Duration::from_secs(1)))
            .unwrap_err();
        assert_corrupted(&err);

        let ((_, _), (_, mut rx)) = ends(4096);
        rx.dir.word(OFF_DATA_TAIL).store(1 << 40, Ordering::Release);
        let err = rx
            .stream
            .read_some(&mut buf, Deadline::after(Duration::from_secs(1)), false)
            .unwrap_err();
        assert_corrupted(&err);
    }

    #[test]
    fn a_rendezvous_the_sender_abandoned_is_not_delivered() {
        let ((mut tx, _), (_, mut rx)) = ends(4096);
        assert!(
            matches!(tx.single_copy, SingleCopy::From(_)),
            "single copy works between threads of one process"
        );
        let data = vec![5u8; RENDEZVOUS_MIN];
        // Nobody receives: the sender gives up at its deadline and takes its buffer back.
        let err = tx
            .send(1, &data, Deadline::after(Duration::from_millis(100)))
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        let mut buf = vec![0u8; RENDEZVOUS_MIN];
        let err = rx
            .recv(&mut buf, Deadline::after(Duration::from_secs(1)))
            .unwrap_err();
        assert!(
            matches!(&err, Error::PeerGone { detail, .. } if detail.contains("gave up")),
            "{err}"
        );
    }

    /// `try_send` until it has sent the whole message (at most 10 s).
    fn poll_send(tx: &mut ShmSender, tag: u32, data: &[u8]) {
        let give_up = Instant::now() + Duration::from_secs(10);
        while !tx.try_send(tag, data).unwrap() {
            assert!(Instant::now() < give_up, "try_send never finished");
            std::hint::spin_loop();
        }
    }

    /// `try_recv` until a message has arrived (at most 10 s).
    fn poll_recv(rx: &mut ShmReceiver, buf: &mut [u8]) -> Message {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = rx.try_recv(buf).unwrap() {
                return m;
            }
            assert!(Instant::now() < give_up, "try_recv never finished");
            std::hint::spin_loop();
        }
    }

    fn assert_corrupted(err: &Error) {
        assert!(
            matches!(err, Error::ProtocolViolation { detail, .. } if detail.contains("corrupted")),
            "{err}"
        );
    }

    /// `n` bytes of message `i`'s pattern.
    fn pattern(i: usize, n: usize) -> Vec<u8> {
        (0..n).map(|j| (j * 7 + i) as u8).collect()
    }

    /// Receives the next message and checks it is message `i` of `n` bytes, intact.
    fn expect(rx: &mut ShmReceiver, i: usize, n: usize) {
        let mut buf = vec![0u8; n];
        let m = rx
            .recv(&mut buf, Deadline::after(Duration::from_secs(5)))
            .unwrap();
        assert_eq!((m.tag, m.len), (i as u32, n));
        assert!(buf == pattern(i, n), "message {i} arrived damaged");
    }

    #[test]
    fn a_blocking_single_copy_the_ring_can_hold_does_not_wait_for_the_receiver() {
        let ((mut tx, _), (_, mut rx)) = ends_with(4 << 20, SingleCopy::From(RENDEZVOUS_MIN));
        assert!(matches!(tx.single_copy, SingleCopy::From(_)));
        // Nobody receives yet: each send is taken back after the grace and streamed, where it
        // would otherwise wait out its deadline.
        for (i, n) in [1 << 20, RENDEZVOUS_MIN, 2 << 20].into_iter().enumerate() {
            tx.send(
                i as u32,
                &pattern(i, n),
                Deadline::after(Duration::from_secs(2)),
            )
            .unwrap();
        }
        for (i, n) in [1 << 20, RENDEZVOUS_MIN, 2 << 20].into_iter().enumerate() {
            expect(&mut rx, i, n);
        }
    }

    #[test]
    fn both_ends_may_send_a_single_copy_before_receiving() {
        let ((mut a_tx, mut a_rx), (mut b_tx, mut b_rx)) =
            ends_with(4 << 20, SingleCopy::From(RENDEZVOUS_MIN));
        let n = 1 << 20;
        std::thread::scope(|s| {
            for (tx, rx, i) in [(&mut a_tx, &mut a_rx, 0), (&mut b_tx, &mut b_rx, 1)] {
                s.spawn(move || {
                    tx.send(
                        i as u32,
                        &pattern(i, n),
                        Deadline::after(Duration::from_secs(5)),
                    )
                    .unwrap();
                    // `rx` receives what the other end sent
                    expect(rx, 1 - i, n);
                });
            }
        });
    }

    #[test]
    fn a_non_blocking_single_copy_is_streamed_once_the_grace_is_over() {
        let ((mut tx, _), (_, mut rx)) = ends_with(4 << 20, SingleCopy::From(RENDEZVOUS_MIN));
        let data = pattern(0, 1 << 20);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !tx.try_send(0, &data).unwrap() {
            assert!(Instant::now() < deadline, "never taken back");
            std::thread::sleep(Duration::from_micros(200));
        }
        assert_eq!(
            tx.dir.word(OFF_RDV).load(Ordering::Acquire),
            rdv(0, RDV_WITHDRAWN),
            "streamed, not copied"
        );
        expect(&mut rx, 0, 1 << 20);
    }

    #[test]
    fn a_withdrawn_rendezvous_is_streamed_even_once_a_later_one_is_posted() {
        let ((mut tx, _), (_, mut rx)) = ends_with(4 << 20, SingleCopy::From(RENDEZVOUS_MIN));
        tx.send(
            0,
            &pattern(0, 1 << 20),
            Deadline::after(Duration::from_secs(2)),
        )
        .unwrap();
        // The next rendezvous is posted before the receiver looked at the first (and stays
        // posted however long this thread is held up): the word now names message 1.
        tx.grace = Duration::from_secs(60);
        let second = pattern(1, 512 << 10);
        assert!(!tx.try_send(1, &second).unwrap());
        assert_eq!(
            tx.dir.word(OFF_RDV).load(Ordering::Acquire),
            rdv(1, RDV_POSTED)
        );
        expect(&mut rx, 0, 1 << 20);
        // The second is still posted: the receiver copies it from the sender's buffer.
        expect(&mut rx, 1, 512 << 10);
        assert!(tx.try_send(1, &second).unwrap());
    }

    #[test]
    fn a_single_copy_larger_than_the_ring_has_room_for_stays_posted() {
        let ((mut tx, _), (_, mut rx)) = ends_with(256 << 10, SingleCopy::From(RENDEZVOUS_MIN));
        let data = pattern(0, 1 << 20);
        assert!(!tx.try_send(0, &data).unwrap());
        std::thread::sleep(RDV_GRACE * 3);
        assert!(
            !tx.try_send(0, &data).unwrap(),
            "no room in the ring: still posted"
        );
        assert_eq!(
            tx.dir.word(OFF_RDV).load(Ordering::Acquire),
            rdv(0, RDV_POSTED)
        );
        expect(&mut rx, 0, 1 << 20);
        assert!(tx.try_send(0, &data).unwrap());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        /// Receivers arriving before, around and after the grace: every message arrives once,
        /// intact and in order, whether it was copied or taken back and streamed.
        #[test]
        fn late_receivers_get_every_single_copy_intact(
            messages in proptest::collection::vec(
                (RENDEZVOUS_MIN..(3 << 20), 0u64..2_500, proptest::bool::ANY),
                1..12,
            ),
        ) {
            let ((mut tx, _), (_, mut rx)) =
                ends_with(2 << 20, SingleCopy::From(RENDEZVOUS_MIN));
            std::thread::scope(|s| {
                let plan = messages.clone();
                s.spawn(move || {
                    for (i, &(n, delay_us, polled)) in plan.iter().enumerate() {
                        std::thread::sleep(Duration::from_micros(delay_us));
                        if !polled {
                            expect(&mut rx, i, n);
                            continue;
                        }
                        let mut buf = vec![0u8; n];
                        let m = poll_recv(&mut rx, &mut buf);
                        assert_eq!((m.tag, m.len), (i as u32, n));
                        assert!(buf == pattern(i, n), "message {i} arrived damaged");
                    }
                });
                for (i, &(n, _, _)) in messages.iter().enumerate() {
                    tx.send(i as u32, &pattern(i, n), Deadline::after(Duration::from_secs(5)))
                        .unwrap();
                }
            });
        }
    }

    #[test]
    fn a_gone_peer_is_an_error_only_once_nothing_it_left_is_ready() {
        // the peer's end of the bootstrap socket is closed: it exited
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        drop(l.accept().unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !peer_gone(&ours) {
            assert!(
                Instant::now() < deadline,
                "the closed socket was never seen"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let side = Side {
            peer: "peer".into(),
            op: "recv",
        };
        let mut liveness = Liveness::new();
        let later = Instant::now() + LIVENESS_EVERY;
        // what it published just before exiting is still delivered (a receiver that looked
        // before the publication and checks liveness after it)
        liveness.check_at(later, &ours, &side, || true).unwrap();
        let err = liveness
            .check_at(later + LIVENESS_EVERY, &ours, &side, || false)
            .unwrap_err();
        assert!(matches!(err, Error::PeerGone { .. }), "{err}");
    }

    #[test]
    fn host_identity_is_stable() {
        assert_eq!(host_identity().unwrap(), host_identity().unwrap());
    }
}
