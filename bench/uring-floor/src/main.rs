//! What synchronous io_uring operations cost against the socket calls they replace, with nothing
//! of sinew in between: the floor under the `uring` backend's bandwidth against the `tcp` backend.
//!
//! ```text
//! uring-floor MODE SIZE SECONDS [SENDER_CPU RECEIVER_CPU [RECEIVER]]
//! ```
//!
//! A sender on SENDER_CPU (default 1) streams frames of a 32-byte header and SIZE payload bytes
//! over loopback TCP for SECONDS, one call per frame, waiting for each to complete before the
//! next, as a framed link's `send` does; a receiver thread on RECEIVER_CPU (default 0) takes them
//! by RECEIVER (below; default `recv`). MODE is how a frame goes:
//!
//! - `sendmsg`: `sendmsg(2)` of the header and the payload (the `tcp` backend's call);
//! - `send`: `send(2)` of one contiguous buffer holding both;
//! - `uring-sendmsg`: an io_uring `SENDMSG` of the two (the `uring` backend's operation:
//!   `MSG_WAITALL`, the socket a fixed file, a single-issuer ring with deferred task work entered
//!   through the thread's registered ring table, submitted and waited for in one
//!   `io_uring_enter`);
//! - `uring-sendv`: an io_uring `SEND` of the two with `IORING_SEND_VECTORIZED` (no `msghdr`;
//!   newer kernels only);
//! - `uring-send`: an io_uring `SEND` of the contiguous buffer;
//! - `uring-send-zc`: an io_uring `SEND_ZC` (zero copy) of the contiguous buffer, waiting for
//!   the operation's completion and then for its notification — the kernel letting go of the
//!   buffer's pages — before the next, as a synchronous send must. The notification reports
//!   whether the kernel copied the pages after all (`IORING_SEND_ZC_REPORT_USAGE`), as it does
//!   for a local receiver; the count of frames it copied is printed as `zc_copied`.
//!
//! RECEIVER is how the stream is taken, every receive non-blocking and retried at once while
//! nothing is queued (a spinning receive, as both backends' with `--wait spin`):
//!
//! - `recv`: `recv(2)` of up to 1 MiB; `uring-recv`: an io_uring `RECV` of up to 1 MiB;
//! - `recv-framed`, `uring-framed`: frame by frame as sinew's framed receiver takes a large
//!   message — the header with at most 4 KiB after it into a small buffer (io_uring: `READ_FIXED`
//!   into a registered one), then the rest of the payload — by `recv(2)` or io_uring `RECV`.
//!
//! Prints one JSON object: the mode, the receiver, the sizes, the frames and bytes sent, the
//! seconds, GB/s and nanoseconds per frame. Any failure (a refused ring, a short send, a lost
//! byte, a receiver that stalls past its deadline) is an error on stderr and exit status 1.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// The frame header's size, as sinew's.
const HEADER: usize = 32;
/// `IORING_SEND_VECTORIZED` (sqe->ioprio of `SEND`): `addr` points at an iovec array.
const SEND_VECTORIZED: u16 = 1 << 5;
const ENTER_GETEVENTS: u32 = 1 << 0;
const ENTER_REGISTERED_RING: u32 = 1 << 4;
const REGISTER_RING_FDS: libc::c_long = 20;
/// `IORING_SEND_ZC_REPORT_USAGE` (sqe->ioprio of `SEND_ZC`): the notification says whether
/// the kernel copied the pages after all.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a `SEND_ZC` notification's result.
const NOTIF_USAGE_ZC_COPIED: i32 = i32::MIN;
/// How long the receiver may go past the sender's time before it is declared stalled.
const RECEIVER_GRACE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    SendMsg,
    Send,
    UringSendMsg,
    UringSendV,
    UringSend,
    UringSendZc,
}

impl Mode {
    const ALL: [(&'static str, Mode); 6] = [
        ("sendmsg", Mode::SendMsg),
        ("send", Mode::Send),
        ("uring-sendmsg", Mode::UringSendMsg),
        ("uring-sendv", Mode::UringSendV),
        ("uring-send", Mode::UringSend),
        ("uring-send-zc", Mode::UringSendZc),
    ];

    fn parse(s: &str) -> Result<Mode, String> {
        lookup(&Self::ALL, s, "mode")
    }

    fn name(self) -> &'static str {
        name_of(&Self::ALL, self)
    }

    /// Whether the frame goes as one contiguous buffer (else as header and payload).
    fn contiguous(self) -> bool {
        matches!(self, Mode::Send | Mode::UringSend | Mode::UringSendZc)
    }
}

/// The value named `s` in `table`, or an error listing the names.
fn lookup<T: Copy>(table: &[(&'static str, T)], s: &str, what: &str) -> Result<T, String> {
    table
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<_> = table.iter().map(|(n, _)| *n).collect();
            format!("unknown {what} {s:?}; one of {}", names.join(", "))
        })
}

/// The name of `value` in `table`.
fn name_of<T: PartialEq>(table: &[(&'static str, T)], value: T) -> &'static str {
    table
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("?", |(n, _)| n)
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn pin(cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("cpu {cpu} is out of range"));
    }
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET stays within it (checked above),
    // and sched_setaffinity reads `size_of` bytes of it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(os_error(&format!("pinning to cpu {cpu}")));
    }
    Ok(())
}

/// How the receiver takes the stream: with `recv(2)` calls or io_uring operations, each
/// non-blocking and retried at once while nothing is queued (a spinning receive, as both sinew
/// backends' with `--wait spin`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Receiver {
    /// io_uring operations instead of `recv(2)`.
    uring: bool,
    /// Frame by frame as sinew's framed receiver takes a large message: the header with at most
    /// 4 KiB after it into a small buffer (io_uring: `READ_FIXED` into a registered one), then
    /// the rest of the payload into the payload buffer. Otherwise receives of up to 1 MiB.
    framed: bool,
}

impl Receiver {
    const ALL: [(&'static str, Receiver); 4] = [
        (
            "recv",
            Receiver {
                uring: false,
                framed: false,
            },
        ),
        (
            "uring-recv",
            Receiver {
                uring: true,
                framed: false,
            },
        ),
        (
            "recv-framed",
            Receiver {
                uring: false,
                framed: true,
            },
        ),
        (
            "uring-framed",
            Receiver {
                uring: true,
                framed: true,
            },
        ),
    ];

    fn parse(s: &str) -> Result<Receiver, String> {
        lookup(&Self::ALL, s, "receiver")
    }

    fn name(self) -> &'static str {
        name_of(&Self::ALL, self)
    }
}

/// Bytes a framed receiver reads after a header, at most (sinew's `READ_AHEAD`).
const READ_AHEAD: usize = 4096;

/// Takes everything the peer sends (frames of `frame` bytes) until it shuts its side down; the
/// bytes received.
fn receive(
    how: Receiver,
    stream: TcpStream,
    frame: usize,
    deadline: Instant,
) -> Result<u64, String> {
    let fd = stream.as_raw_fd();
    let mut ahead = vec![0u8; HEADER + READ_AHEAD];
    let mut ring = match how.uring {
        false => None,
        true => {
            let ring = Ring::new(fd).map_err(|e| format!("receiver: {e}"))?;
            let bufs = [libc::iovec {
                iov_base: ahead.as_mut_ptr().cast(),
                iov_len: ahead.len(),
            }];
            // SAFETY: `ahead` is neither moved nor freed before the ring is dropped below.
            unsafe { ring.ring.submitter().register_buffers(&bufs) }
                .map_err(|e| format!("receiver: registering the read-ahead buffer: {e}"))?;
            Some(ring)
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut polls = 0u32;
    loop {
        let at = (total % frame as u64) as usize;
        let into_ahead = how.framed && at < HEADER;
        let (ptr, len) = match (how.framed, into_ahead) {
            (false, _) => (buf.as_mut_ptr(), buf.len()),
            (true, true) => (ahead.as_mut_ptr(), (frame - at).min(ahead.len())),
            (true, false) => (buf.as_mut_ptr(), (frame - at).min(buf.len())),
        };
        let r = match ring.as_mut() {
            // SAFETY: `ptr` is valid for writes of `len` bytes for the duration of the call.
            None => match unsafe { libc::recv(fd, ptr.cast(), len, libc::MSG_DONTWAIT) } {
                n if n >= 0 => n as i64,
                _ => -i64::from(
                    io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO),
                ),
            },
            Some(ring) => {
                let entry = if into_ahead {
                    opcode::ReadFixed::new(types::Fixed(0), ptr, len as u32, 0)
                        .offset(u64::MAX)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build()
                } else {
                    opcode::Recv::new(types::Fixed(0), ptr, len as u32)
                        .flags(libc::MSG_DONTWAIT)
                        .build()
                };
                // SAFETY: the buffer outlives the operation, which `run` reaps before returning.
                i64::from(unsafe { ring.run(&entry) }.map_err(|e| format!("receiver: {e}"))?)
            }
        };
        match r {
            0 => break,
            n if n > 0 => total += n as u64,
            e if e == -i64::from(libc::EAGAIN) => {
                polls = polls.wrapping_add(1);
                if polls.is_multiple_of(1024) && Instant::now() > deadline {
                    return Err("receiver: the sender neither sent nor closed in time".into());
                }
                std::hint::spin_loop();
            }
            e => {
                let e = io::Error::from_raw_os_error(-e as i32);
                return Err(format!("receiver ({}): {e}", how.name()));
            }
        }
    }
    drop(ring);
    let _ = stream.shutdown(Shutdown::Both);
    Ok(total)
}

/// `struct io_uring_rsrc_update`, the argument of REGISTER_RING_FDS.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// A ring set up as sinew's `uring` backend sets up its rings (the sender's, or the receiver's).
struct Ring {
    ring: IoUring,
    /// The ring's index in this thread's ring table.
    index: u32,
}

impl Ring {
    fn new(fd: RawFd) -> Result<Ring, String> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(8)
            .map_err(|e| format!("io_uring_setup: {e}"))?;
        ring.submitter()
            .register_files(&[fd])
            .map_err(|e| format!("registering the socket as a fixed file: {e}"))?;
        let mut update = RsrcUpdate {
            offset: u32::MAX,
            resv: 0,
            data: ring.as_raw_fd() as u64,
        };
        // SAFETY: `update` is one valid io_uring_rsrc_update (offset u32::MAX: the kernel picks
        // the index and writes it back) and outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                ring.as_raw_fd(),
                REGISTER_RING_FDS,
                &mut update as *mut RsrcUpdate,
                1,
            )
        };
        if r != 1 {
            return Err(os_error("registering the ring in the thread's ring table"));
        }
        Ok(Ring {
            ring,
            index: update.offset,
        })
    }

    /// Submits `entry` and waits for its completion in one `io_uring_enter`; its result.
    ///
    /// # Safety
    /// Every buffer `entry` points at must stay valid until this returns.
    unsafe fn run(&mut self, entry: &squeue::Entry) -> Result<i32, String> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.run_zc(entry) }.map(|(result, _)| result)
    }

    /// As [`Ring::run`], and for an operation that posts a notification after its completion
    /// (`SEND_ZC`), waits for that too. Its result, and whether the notification said the
    /// kernel copied the data (`None` without a notification).
    ///
    /// # Safety
    /// Every buffer `entry` points at must stay valid until this returns.
    unsafe fn run_zc(&mut self, entry: &squeue::Entry) -> Result<(i32, Option<bool>), String> {
        // SAFETY: the caller keeps the entry's buffers alive until the completion is reaped.
        unsafe { self.ring.submission().push(entry) }.map_err(|_| "submission queue full")?;
        let mut result = None;
        let mut notification_owed = false;
        let mut copied = None;
        loop {
            // SAFETY: `index` is this ring's entry in this thread's ring table; no argument.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.index,
                    self.ring.submission().len() as u32,
                    1u32,
                    ENTER_GETEVENTS | ENTER_REGISTERED_RING,
                    std::ptr::null::<libc::c_void>(),
                    0usize,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("io_uring_enter: {e}"));
            }
            for cqe in self.ring.completion() {
                if cqueue::notif(cqe.flags()) {
                    copied = Some(cqe.result() & NOTIF_USAGE_ZC_COPIED != 0);
                    notification_owed = false;
                } else {
                    result = Some(cqe.result());
                    notification_owed = cqueue::more(cqe.flags());
                }
            }
            if let Some(result) = result
                && !notification_owed
            {
                return Ok((result, copied));
            }
        }
    }
}

struct Report {
    frames: u64,
    /// Frames whose zero-copy send the kernel copied after all (`uring-send-zc` only).
    zc_copied: Option<u64>,
    bytes: u64,
    seconds: f64,
}

/// Sends frames for `secs`, one call each.
fn stream(mode: Mode, fd: RawFd, size: usize, secs: f64) -> Result<Report, String> {
    let total = HEADER + size;
    let header = [0x5au8; HEADER];
    let payload = vec![0xa5u8; size];
    let mut whole = vec![0u8; total];
    whole[..HEADER].copy_from_slice(&header);
    whole[HEADER..].copy_from_slice(&payload);
    let iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: HEADER,
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: size,
        },
    ];
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    let mut ring = match mode {
        Mode::SendMsg | Mode::Send => None,
        _ => Some(Ring::new(fd)?),
    };
    let wait_all = (libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32;
    let entry = match mode {
        Mode::UringSendMsg => Some(
            opcode::SendMsg::new(types::Fixed(0), &msg)
                .flags(wait_all)
                .build(),
        ),
        Mode::UringSendV => Some(
            opcode::Send::new(types::Fixed(0), iov.as_ptr().cast(), iov.len() as u32)
                .ioprio(SEND_VECTORIZED)
                .flags(wait_all as i32)
                .build(),
        ),
        Mode::UringSend => Some(
            opcode::Send::new(types::Fixed(0), whole.as_ptr(), total as u32)
                .flags(wait_all as i32)
                .build(),
        ),
        Mode::UringSendZc => Some(
            opcode::SendZc::new(types::Fixed(0), whole.as_ptr(), total as u32)
                .flags(wait_all as i32)
                .zc_flags(SEND_ZC_REPORT_USAGE)
                .build(),
        ),
        Mode::SendMsg | Mode::Send => None,
    };
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut frames = 0u64;
    let mut zc_copied = (mode == Mode::UringSendZc).then_some(0u64);
    while Instant::now() < end {
        let moved: isize = match (mode, ring.as_mut(), entry.as_ref()) {
            // SAFETY: `msg` and the buffers it names live for the whole loop.
            (Mode::SendMsg, _, _) => unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) },
            // SAFETY: `whole` is valid for reads of `total` bytes.
            (Mode::Send, _, _) => unsafe {
                libc::send(fd, whole.as_ptr().cast(), total, libc::MSG_NOSIGNAL)
            },
            (_, Some(ring), Some(entry)) => {
                // SAFETY: every buffer the entry names lives for the whole loop.
                let (r, copied) = unsafe { ring.run_zc(entry)? };
                if let (Some(n), Some(true)) = (zc_copied.as_mut(), copied) {
                    *n += 1;
                }
                if r < 0 {
                    let e = io::Error::from_raw_os_error(-r);
                    return Err(if mode == Mode::UringSendV && r == -libc::EINVAL {
                        format!(
                            "{}: this kernel refuses IORING_SEND_VECTORIZED ({e})",
                            mode.name()
                        )
                    } else {
                        format!("{}: {e}", mode.name())
                    });
                }
                r as isize
            }
            _ => unreachable!("every io_uring mode has a ring and an entry"),
        };
        if moved < 0 {
            return Err(os_error(mode.name()));
        }
        if moved as usize != total {
            return Err(format!(
                "{}: a frame of {total} bytes went out as {moved}",
                mode.name()
            ));
        }
        frames += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(ring);
    Ok(Report {
        frames,
        zc_copied,
        bytes: frames * total as u64,
        seconds,
    })
}

fn parse_size(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let n: usize = digits.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        _ => return Err(format!("bad size unit in {s:?} (K or M)")),
    };
    n.checked_mul(mult)
        .filter(|&b| b <= 1 << 30)
        .ok_or_else(|| format!("size {s:?} is over 1 GiB"))
}

fn run(args: &[String]) -> Result<(), String> {
    if !(3..=6).contains(&args.len()) || args.len() == 4 {
        return Err(
            "usage: uring-floor MODE SIZE SECONDS [SENDER_CPU RECEIVER_CPU [RECEIVER]]".into(),
        );
    }
    let mode = Mode::parse(&args[0])?;
    let size = parse_size(&args[1])?;
    let secs: f64 = args[2]
        .parse()
        .ok()
        .filter(|s: &f64| *s > 0.0 && *s <= 3600.0)
        .ok_or_else(|| format!("bad duration {:?} (seconds, at most 3600)", args[2]))?;
    let how = match args.get(5) {
        Some(r) => Receiver::parse(r)?,
        None => Receiver::ALL[0].1,
    };
    let (sender_cpu, receiver_cpu) = if args.len() >= 5 {
        let cpu = |s: &str| s.parse::<usize>().map_err(|_| format!("bad cpu {s:?}"));
        (cpu(&args[3])?, cpu(&args[4])?)
    } else {
        (1, 0)
    };
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let sender = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let (accepted, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    sender.set_nodelay(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs) + RECEIVER_GRACE;
    let receiver = std::thread::spawn(move || {
        pin(receiver_cpu)?;
        receive(how, accepted, HEADER + size, deadline)
    });
    pin(sender_cpu)?;
    let sent = stream(mode, sender.as_raw_fd(), size, secs);
    let _ = sender.shutdown(Shutdown::Write);
    let received = receiver
        .join()
        .map_err(|_| "the receiver panicked".to_string())?;
    // The receiver's failure first: it is the cause when both fail (a broken pipe follows it).
    let received = received?;
    let report = sent?;
    if received != report.bytes {
        return Err(format!("sent {} bytes, received {received}", report.bytes));
    }
    println!(
        "{{\"mode\":\"{}\",\"receiver\":\"{}\",\"size\":{size},\"header\":{HEADER},\"contiguous\":{},\"frames\":{},\"bytes\":{},\"seconds\":{:.6},\"gbytes_per_s\":{:.6},\"ns_per_frame\":{:.3},\"zc_copied\":{}}}",
        mode.name(),
        how.name(),
        mode.contiguous(),
        report.frames,
        report.bytes,
        report.seconds,
        report.bytes as f64 / report.seconds / 1e9,
        report.seconds * 1e9 / report.frames.max(1) as f64,
        report
            .zc_copied
            .map_or_else(|| "null".to_string(), |n| n.to_string()),
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uring-floor: {e}");
            ExitCode::FAILURE
        }
    }
}
