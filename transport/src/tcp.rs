//! The TCP backend: a connector that retries with backoff, a listener, the handshake driven over
//! a socket, and non-blocking send and receive halves that wait by the link's [`WaitStrategy`].
//!
//! Sends write the frame header and the caller's payload with one vectored write. Receives read
//! ahead a few KiB, validate the header, copy what of the payload came with it and read the rest
//! straight into the caller's buffer, so a small message costs one system call and a large one
//! no hidden copy. TCP already guarantees integrity, so data payloads carry no checksum (headers
//! always do).

use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv, sendmsg};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::frame::{FrameError, FrameHeader, FrameKind, HEADER_LEN, MAGIC};
use crate::handshake::{
    Established, HANDSHAKE_MAX_PAYLOAD, Handshake, HandshakeConfig, HandshakeError, TransportKind,
};
use crate::link::{Link, LinkConfig, LinkInfo, Message, RecvHalf, SendHalf, check_len};
use crate::wait::{WaitStrategy, Waiter};

const MAX_BACKOFF: Duration = Duration::from_millis(500);
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refusal may take to reach a peer we are hanging up on.
const REFUSAL_GRACE: Duration = Duration::from_millis(200);

/// Connects to `addr`, retrying with exponential backoff while nobody listens there yet (so a node
/// may start before its peer), then runs the handshake as the client.
///
/// # Errors
/// [`Error::Connect`] when no connection is made within `cfg.connect_timeout`;
/// [`Error::Handshake`] when the peer is not a sinew node with the same key and a compatible
/// version (never retried: retrying cannot fix a wrong key).
pub fn connect(addr: impl ToSocketAddrs + std::fmt::Display, cfg: &LinkConfig) -> Result<Link> {
    let (stream, peer) = connect_stream(&addr, cfg)?;
    let hs = Handshake::client(handshake_config(cfg)).map_err(|error| Error::Handshake {
        peer: peer.to_string(),
        error,
    })?;
    establish(stream, peer, hs, cfg)
}

fn connect_stream(
    addr: &(impl ToSocketAddrs + std::fmt::Display),
    cfg: &LinkConfig,
) -> Result<(TcpStream, SocketAddr)> {
    let started = Instant::now();
    let deadline = Deadline::after(cfg.connect_timeout);
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let error = match addr.to_socket_addrs() {
            Ok(addrs) => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
                for a in addrs {
                    match connect_once(a, deadline) {
                        Ok(s) => return Ok((s, a)),
                        Err(e) => last = e,
                    }
                }
                last
            }
            Err(e) => e,
        };
        let retryable = matches!(
            error.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::TimedOut
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
                | io::ErrorKind::NotFound
        );
        if !retryable || deadline.expired() {
            return Err(Error::Connect {
                addr: addr.to_string(),
                attempts,
                elapsed: started.elapsed(),
                error,
            });
        }
        tracing::debug!(%addr, attempts, ?backoff, %error, "peer not reachable yet, retrying");
        std::thread::sleep(backoff.min(deadline.remaining()));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn connect_once(addr: SocketAddr, deadline: Deadline) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    let timeout = deadline
        .remaining()
        .min(ATTEMPT_TIMEOUT)
        .max(Duration::from_millis(1));
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// A bound TCP listener that accepts authenticated links.
#[derive(Debug)]
pub struct Listener {
    inner: std::net::TcpListener,
    cfg: LinkConfig,
}

/// An accepted connection whose handshake has not run yet. Run it with
/// [`Incoming::establish`], typically on its own thread so a stalling peer cannot hold up others.
#[derive(Debug)]
pub struct Incoming {
    stream: TcpStream,
    peer: SocketAddr,
    cfg: LinkConfig,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port).
    ///
    /// # Errors
    /// [`Error::Io`] when the address cannot be bound.
    pub fn bind(addr: impl ToSocketAddrs + std::fmt::Display, cfg: &LinkConfig) -> Result<Self> {
        let io_err = |error| Error::Io {
            op: "bind",
            peer: addr.to_string(),
            error,
        };
        let a = addr
            .to_socket_addrs()
            .map_err(io_err)?
            .next()
            .ok_or_else(|| {
                io_err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "address resolved to nothing",
                ))
            })?;
        let socket = Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol::TCP))
            .map_err(io_err)?;
        socket.set_reuse_address(true).map_err(io_err)?;
        socket.bind(&a.into()).map_err(io_err)?;
        socket.listen(128).map_err(io_err)?;
        socket.set_nonblocking(true).map_err(io_err)?;
        Ok(Listener {
            inner: socket.into(),
            cfg: cfg.clone(),
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// [`Error::Io`] if the socket cannot report it.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.inner.local_addr().map_err(|error| Error::Io {
            op: "local_addr",
            peer: String::new(),
            error,
        })
    }

    /// Accepts one connection before `deadline`, without running the handshake.
    ///
    /// # Errors
    /// [`Error::Timeout`] when nobody connects in time, [`Error::Io`] on a socket error.
    pub fn incoming_until(&self, deadline: Deadline) -> Result<Incoming> {
        let mut waiter = Waiter::new(WaitStrategy::Block);
        loop {
            match self.inner.accept() {
                Ok((stream, peer)) => {
                    return Ok(Incoming {
                        stream,
                        peer,
                        cfg: self.cfg.clone(),
                    });
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    let more = waiter
                        .wait_readable(self.inner.as_raw_fd(), deadline)
                        .map_err(|error| Error::Io {
                            op: "accept",
                            peer: String::new(),
                            error,
                        })?;
                    if !more {
                        return Err(Error::Timeout {
                            op: "accept",
                            waited: waiter.waited(),
                            peer: "(none)".into(),
                        });
                    }
                }
                Err(error) => {
                    return Err(Error::Io {
                        op: "accept",
                        peer: String::new(),
                        error,
                    });
                }
            }
        }
    }

    /// Accepts one connection and authenticates it, before `deadline` for the accept (the
    /// handshake has its own deadline).
    ///
    /// # Errors
    /// As [`Listener::incoming_until`] and [`Incoming::establish`].
    pub fn accept_until(&self, deadline: Deadline) -> Result<Link> {
        self.incoming_until(deadline)?.establish()
    }
}

impl Incoming {
    /// The connecting peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Runs the handshake as the server.
    ///
    /// # Errors
    /// [`Error::Handshake`] for a wrong key, an incompatible version, garbage, a truncated
    /// handshake or a peer that stalls past the handshake deadline; the socket is closed.
    pub fn establish(self) -> Result<Link> {
        let hs =
            Handshake::server(handshake_config(&self.cfg)).map_err(|error| Error::Handshake {
                peer: self.peer.to_string(),
                error,
            })?;
        establish(self.stream, self.peer, hs, &self.cfg)
    }
}

fn handshake_config(cfg: &LinkConfig) -> HandshakeConfig {
    HandshakeConfig::new(cfg.key.clone(), cfg.node_id, cfg.max_payload)
}

fn configure(stream: &TcpStream, cfg: &LinkConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(false)?;
    let sock = SockRef::from(stream);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)?;
    if let Some(size) = cfg.socket_buffer {
        sock.set_send_buffer_size(size)?;
        sock.set_recv_buffer_size(size)?;
    }
    Ok(())
}

/// Configures the socket, runs `hs` over it and assembles the link.
fn establish(stream: TcpStream, peer: SocketAddr, hs: Handshake, cfg: &LinkConfig) -> Result<Link> {
    let peer_s = peer.to_string();
    configure(&stream, cfg).map_err(|error| Error::Io {
        op: "configure socket",
        peer: peer_s.clone(),
        error,
    })?;
    let mut conn = Conn::new(Arc::new(stream), peer_s.clone(), WaitStrategy::Block);
    let est = drive_handshake(&mut conn, hs, cfg.handshake_timeout).map_err(|error| {
        Error::Handshake {
            peer: peer_s.clone(),
            error,
        }
    })?;
    tracing::debug!(peer = %peer_s, node = est.peer_node_id, max_payload = est.max_payload, "link established");
    let info = LinkInfo {
        transport: TransportKind::TCP,
        peer_addr: peer_s,
        peer_node_id: est.peer_node_id,
        version: est.version,
        max_payload: est.max_payload,
        wait: cfg.wait,
    };
    let conn = Conn {
        wait: cfg.wait,
        ..conn
    };
    let tx = TcpSender {
        conn: conn.clone(),
        seq: 0,
        max_payload: est.max_payload,
        broken: None,
    };
    let rx = TcpReceiver::new(conn, est.max_payload);
    Ok(Link::from_halves(
        Box::new(tx),
        Box::new(rx),
        info,
        cfg.timeout,
    ))
}

/// Runs a handshake state machine over a connection until it is established or fails. On failure
/// any refusal the machine queued is sent (briefly) before the caller drops the socket, and the
/// failure is logged.
fn drive_handshake(
    conn: &mut Conn,
    mut hs: Handshake,
    timeout: Duration,
) -> Result<Established, HandshakeError> {
    let deadline = Deadline::after(timeout);
    let result = run_handshake(conn, &mut hs, deadline, timeout);
    if let Err(e) = &result {
        let grace = Deadline::after(REFUSAL_GRACE);
        while let Some(frame) = hs.poll_transmit() {
            if conn.write_all(&[&frame], grace, "send refusal").is_err() {
                break;
            }
        }
        tracing::warn!(peer = %conn.peer, error = %e, "handshake failed; closing the connection");
    }
    result
}

fn run_handshake(
    conn: &mut Conn,
    hs: &mut Handshake,
    deadline: Deadline,
    timeout: Duration,
) -> Result<Established, HandshakeError> {
    let io_failure = |hs: &mut Handshake, e: Partial| match e.error {
        Error::Timeout { .. } => hs.timed_out(timeout),
        Error::PeerGone { .. } | Error::Closed { .. } => {
            HandshakeError::Truncated { stage: hs.stage() }
        }
        Error::Io { error: source, .. } => HandshakeError::Io(source),
        other => HandshakeError::Io(io::Error::other(other.to_string())),
    };
    loop {
        while let Some(frame) = hs.poll_transmit() {
            conn.write_all(&[&frame], deadline, "handshake send")
                .map_err(|e| io_failure(hs, e))?;
        }
        if let Some(est) = hs.established() {
            return Ok(est.clone());
        }
        let mut header = [0u8; HEADER_LEN];
        // The magic first, so that a peer speaking another protocol is told apart at once rather
        // than waited on until the deadline.
        conn.read_full(&mut header[..MAGIC.len()], deadline, "handshake recv")
            .map_err(|e| io_failure(hs, e))?;
        if header[..MAGIC.len()] != MAGIC {
            let found = [header[0], header[1], header[2], header[3]];
            return Err(hs.frame_error(FrameError::BadMagic { found }));
        }
        conn.read_full(&mut header[MAGIC.len()..], deadline, "handshake recv")
            .map_err(|e| io_failure(hs, e))?;
        let h =
            FrameHeader::decode(&header, HANDSHAKE_MAX_PAYLOAD).map_err(|e| hs.frame_error(e))?;
        // Bounded by HANDSHAKE_MAX_PAYLOAD, checked by `decode` before this allocation.
        let mut payload = vec![0u8; h.payload_len()];
        conn.read_full(&mut payload, deadline, "handshake recv")
            .map_err(|e| io_failure(hs, e))?;
        hs.handle_frame(&h, &payload)?;
    }
}

/// An I/O failure after `moved` bytes of the operation had been transferred.
struct Partial {
    moved: usize,
    error: Error,
}

/// Which socket timeout option a blocking call relies on.
#[derive(Clone, Copy)]
enum Direction {
    Send,
    Recv,
}

/// A socket shared by the two halves, with the helpers that wait by the link's strategy.
///
/// The socket stays in blocking mode: a spinning attempt passes `MSG_DONTWAIT`, a blocking one
/// sleeps in the kernel bounded by `SO_SNDTIMEO` / `SO_RCVTIMEO`. Those options are per
/// direction, so each half manages its own without disturbing the other, and a blocking send of
/// a large message stays in one system call instead of a write/poll loop.
#[derive(Clone)]
struct Conn {
    stream: Arc<TcpStream>,
    peer: String,
    wait: WaitStrategy,
    /// The socket timeout currently set for each direction (zero: never set).
    send_timeout: Duration,
    recv_timeout: Duration,
}

impl Conn {
    fn new(stream: Arc<TcpStream>, peer: String, wait: WaitStrategy) -> Self {
        Conn {
            stream,
            peer,
            wait,
            send_timeout: Duration::ZERO,
            recv_timeout: Duration::ZERO,
        }
    }

    fn map_io(&self, op: &'static str, error: io::Error) -> Error {
        match error.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => Error::PeerGone {
                peer: self.peer.clone(),
                detail: format!("{op}: {error}"),
            },
            _ => Error::Io {
                op,
                peer: self.peer.clone(),
                error,
            },
        }
    }

    /// Makes sure a blocking call in `dir` returns by `remaining` (it may return earlier, with
    /// `EAGAIN`, and is then retried). The option is only rewritten when it would overshoot or
    /// is far shorter than needed, so steady traffic costs no extra system call.
    fn bound_blocking(&mut self, dir: Direction, remaining: Duration) -> io::Result<()> {
        let current = match dir {
            Direction::Send => &mut self.send_timeout,
            Direction::Recv => &mut self.recv_timeout,
        };
        if *current != Duration::ZERO && *current <= remaining && *current * 2 >= remaining {
            return Ok(());
        }
        // Zero would mean "forever" to the kernel.
        let t = remaining.max(Duration::from_micros(1));
        match dir {
            Direction::Send => self.stream.set_write_timeout(Some(t))?,
            Direction::Recv => self.stream.set_read_timeout(Some(t))?,
        }
        *current = t;
        Ok(())
    }

    /// Runs `attempt` (given whether it may block) until it moves bytes, fails, or the deadline
    /// passes.
    fn retry(
        &mut self,
        dir: Direction,
        deadline: Deadline,
        op: &'static str,
        mut attempt: impl FnMut(RawFd, MsgFlags) -> nix::Result<usize>,
    ) -> Result<usize> {
        let waiter = Waiter::new(self.wait);
        let fd = self.stream.as_raw_fd();
        loop {
            let remaining = deadline.remaining();
            if remaining.is_zero() {
                return Err(Error::Timeout {
                    op,
                    waited: waiter.waited(),
                    peer: self.peer.clone(),
                });
            }
            let block = waiter.should_block();
            let mut flags = MsgFlags::MSG_NOSIGNAL;
            if block {
                self.bound_blocking(dir, remaining)
                    .map_err(|e| self.map_io(op, e))?;
            } else {
                flags |= MsgFlags::MSG_DONTWAIT;
            }
            match attempt(fd, flags) {
                Ok(k) => return Ok(k),
                Err(Errno::EAGAIN) => {
                    if !block {
                        std::hint::spin_loop();
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(self.map_io(op, io::Error::from(e))),
            }
        }
    }

    /// Writes all of `parts`, in order, with vectored writes.
    fn write_all(
        &mut self,
        parts: &[&[u8]],
        deadline: Deadline,
        op: &'static str,
    ) -> std::result::Result<(), Partial> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut written = 0usize;
        while written < total {
            let mut skip = written;
            let mut slices = [IoSlice::new(&[]), IoSlice::new(&[])];
            let mut n = 0;
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                if n == slices.len() {
                    break;
                }
                slices[n] = IoSlice::new(&p[skip..]);
                skip = 0;
                n += 1;
            }
            let sent = self.retry(Direction::Send, deadline, op, |fd, flags| {
                sendmsg::<()>(fd, &slices[..n], &[], flags, None)
            });
            match sent {
                Ok(0) => {
                    let error = Error::PeerGone {
                        peer: self.peer.clone(),
                        detail: format!("{op}: connection accepts no more data"),
                    };
                    return Err(Partial {
                        moved: written,
                        error,
                    });
                }
                Ok(k) => written += k,
                Err(error) => {
                    return Err(Partial {
                        moved: written,
                        error,
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads at least one byte into `buf`. End of stream is [`Error::PeerGone`], with
    /// `mid_frame` saying whether a frame was cut short.
    fn read_some(
        &mut self,
        buf: &mut [u8],
        deadline: Deadline,
        op: &'static str,
        mid_frame: bool,
    ) -> Result<usize> {
        match self.retry(Direction::Recv, deadline, op, |fd, flags| {
            recv(fd, buf, flags)
        })? {
            0 => {
                let detail = if mid_frame {
                    format!("{op}: connection closed mid-frame")
                } else {
                    format!("{op}: connection closed without a close frame (peer died?)")
                };
                Err(Error::PeerGone {
                    peer: self.peer.clone(),
                    detail,
                })
            }
            k => Ok(k),
        }
    }

    /// Fills `buf` completely.
    fn read_full(
        &mut self,
        buf: &mut [u8],
        deadline: Deadline,
        op: &'static str,
    ) -> std::result::Result<(), Partial> {
        let mut filled = 0usize;
        while filled < buf.len() {
            match self.read_some(&mut buf[filled..], deadline, op, filled > 0) {
                Ok(k) => filled += k,
                Err(error) => {
                    return Err(Partial {
                        moved: filled,
                        error,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Marks a half broken when an error left the stream mid-frame, and returns the error.
fn record(broken: &mut Option<String>, error: Error, mid_frame: bool) -> Error {
    if mid_frame {
        *broken = Some(error.to_string());
    }
    error
}

struct TcpSender {
    conn: Conn,
    seq: u64,
    max_payload: u32,
    broken: Option<String>,
}

impl SendHalf for TcpSender {
    fn send(&mut self, tag: u32, payload: &[u8], deadline: Deadline) -> Result<()> {
        if let Some(cause) = &self.broken {
            return Err(Error::Broken {
                peer: self.conn.peer.clone(),
                cause: cause.clone(),
            });
        }
        check_len(payload.len(), self.max_payload)?;
        let header = FrameHeader::try_for_payload(FrameKind::DATA, tag, self.seq, payload, false)
            .map_err(|error| Error::Frame {
                peer: self.conn.peer.clone(),
                error,
            })?
            .encode();
        match self.conn.write_all(&[&header, payload], deadline, "send") {
            Ok(()) => {
                self.seq += 1;
                Ok(())
            }
            Err(p) => Err(record(&mut self.broken, p.error, p.moved > 0)),
        }
    }
}

impl Drop for TcpSender {
    fn drop(&mut self) {
        if self.broken.is_some() {
            return;
        }
        // Best effort, never blocking: tell the peer this is an orderly close, then half-close.
        let header = FrameHeader {
            kind: FrameKind::CLOSE,
            flags: crate::frame::FrameFlags::NONE,
            tag: 0,
            seq: self.seq,
            len: 0,
            payload_crc: 0,
        }
        .encode();
        let _ = sendmsg::<()>(
            self.conn.stream.as_raw_fd(),
            &[IoSlice::new(&header)],
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        );
        let _ = self.conn.stream.shutdown(std::net::Shutdown::Write);
    }
}

/// Bytes read ahead of the frame being decoded. A receive reads up to this much at once, so a
/// small message costs one system call; at most this much of a large payload is copied, the rest
/// is read straight into the caller's buffer.
const READ_AHEAD: usize = 4096;

struct TcpReceiver {
    conn: Conn,
    seq: u64,
    max_payload: u32,
    /// A header already read whose payload did not fit the caller's buffer.
    pending: Option<FrameHeader>,
    broken: Option<String>,
    ahead: Box<[u8; READ_AHEAD]>,
    /// Unconsumed read-ahead bytes are `ahead[start..end]`.
    start: usize,
    end: usize,
}

impl TcpReceiver {
    fn new(conn: Conn, max_payload: u32) -> Self {
        TcpReceiver {
            conn,
            seq: 0,
            max_payload,
            pending: None,
            broken: None,
            ahead: Box::new([0u8; READ_AHEAD]),
            start: 0,
            end: 0,
        }
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn broken_error(&self) -> Option<Error> {
        self.broken.as_ref().map(|cause| Error::Broken {
            peer: self.conn.peer.clone(),
            cause: cause.clone(),
        })
    }

    /// Reads until at least `need` (≤ READ_AHEAD) bytes are buffered.
    fn fill(&mut self, need: usize, deadline: Deadline) -> Result<()> {
        if self.buffered() >= need {
            return Ok(());
        }
        if READ_AHEAD - self.start < need {
            self.ahead.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.buffered() < need {
            let mid_frame = self.buffered() > 0;
            let k =
                self.conn
                    .read_some(&mut self.ahead[self.end..], deadline, "recv", mid_frame)?;
            self.end += k;
        }
        Ok(())
    }

    fn next_header(&mut self, deadline: Deadline) -> Result<FrameHeader> {
        if let Some(h) = self.pending.take() {
            return Ok(h);
        }
        if let Err(e) = self.fill(HEADER_LEN, deadline) {
            let mid_frame = self.buffered() > 0;
            return Err(record(&mut self.broken, e, mid_frame));
        }
        let decoded = FrameHeader::decode(&self.ahead[self.start..self.end], self.max_payload);
        self.start += HEADER_LEN;
        let header = match decoded {
            Ok(h) => h,
            Err(error) => {
                let e = Error::Frame {
                    peer: self.conn.peer.clone(),
                    error,
                };
                return Err(record(&mut self.broken, e, true));
            }
        };
        if header.seq != self.seq {
            let e = Error::ProtocolViolation {
                peer: self.conn.peer.clone(),
                detail: format!(
                    "frame {} out of sequence, expected {}",
                    header.seq, self.seq
                ),
            };
            return Err(record(&mut self.broken, e, true));
        }
        self.seq += 1;
        Ok(header)
    }

    /// Moves a payload into `payload`: first what was read ahead, then straight from the socket.
    fn read_payload(&mut self, payload: &mut [u8], deadline: Deadline) -> Result<()> {
        let from_ahead = payload.len().min(self.buffered());
        payload[..from_ahead].copy_from_slice(&self.ahead[self.start..self.start + from_ahead]);
        self.start += from_ahead;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if from_ahead < payload.len() {
            self.conn
                .read_full(&mut payload[from_ahead..], deadline, "recv")
                .map_err(|p| p.error)?;
        }
        Ok(())
    }
}

impl RecvHalf for TcpReceiver {
    fn recv(&mut self, buf: &mut [u8], deadline: Deadline) -> Result<Message> {
        if let Some(e) = self.broken_error() {
            return Err(e);
        }
        loop {
            let header = self.next_header(deadline)?;
            let len = header.payload_len();
            match header.kind {
                FrameKind::DATA => {}
                FrameKind::CLOSE => {
                    let e = Error::Closed {
                        peer: self.conn.peer.clone(),
                    };
                    return Err(record(&mut self.broken, e, true));
                }
                FrameKind::HEARTBEAT if len == 0 => continue,
                other => {
                    let e = Error::ProtocolViolation {
                        peer: self.conn.peer.clone(),
                        detail: format!(
                            "frame kind {} with {len} bytes on an established link",
                            other.0
                        ),
                    };
                    return Err(record(&mut self.broken, e, true));
                }
            }
            if len > buf.len() {
                self.pending = Some(header);
                return Err(Error::BufferTooSmall {
                    needed: len,
                    capacity: buf.len(),
                });
            }
            let payload = &mut buf[..len];
            if let Err(e) = self.read_payload(payload, deadline) {
                return Err(record(&mut self.broken, e, true));
            }
            if let Err(error) = header.verify_payload(payload) {
                let e = Error::Frame {
                    peer: self.conn.peer.clone(),
                    error,
                };
                return Err(record(&mut self.broken, e, true));
            }
            return Ok(Message {
                tag: header.tag,
                len,
            });
        }
    }
}

#[cfg(test)]
mod tests;
