//! The TCP backend: a connector that retries with backoff, a listener, the handshake driven over
//! a socket, and non-blocking send and receive halves that wait by the link's [`WaitStrategy`].
//!
//! Sends write the frame header and the caller's payload with one vectored write; receives read
//! the header, validate it, then read the payload straight into the caller's buffer. TCP already
//! guarantees integrity, so data payloads carry no checksum (headers always do).

use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::frame::{FrameError, FrameHeader, FrameKind, HEADER_LEN, MAGIC};
use crate::handshake::{
    Established, HANDSHAKE_MAX_PAYLOAD, Handshake, HandshakeConfig, HandshakeError, TransportKind,
};
use crate::link::{Link, LinkConfig, LinkInfo, Message, RecvHalf, SendHalf, check_len};
use crate::wait::{Readiness, WaitStrategy, Waiter};

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
    let hs = Handshake::client(handshake_config(cfg)).map_err(|source| Error::Handshake {
        peer: peer.to_string(),
        source,
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
                source: error,
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
        let io_err = |source| Error::Io {
            op: "bind",
            peer: addr.to_string(),
            source,
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
        self.inner.local_addr().map_err(|source| Error::Io {
            op: "local_addr",
            peer: String::new(),
            source,
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
                        .wait(self.inner.as_raw_fd(), Readiness::Readable, deadline)
                        .map_err(|source| Error::Io {
                            op: "accept",
                            peer: String::new(),
                            source,
                        })?;
                    if !more {
                        return Err(Error::Timeout {
                            op: "accept",
                            waited: waiter.waited(),
                            peer: "(none)".into(),
                        });
                    }
                }
                Err(source) => {
                    return Err(Error::Io {
                        op: "accept",
                        peer: String::new(),
                        source,
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
            Handshake::server(handshake_config(&self.cfg)).map_err(|source| Error::Handshake {
                peer: self.peer.to_string(),
                source,
            })?;
        establish(self.stream, self.peer, hs, &self.cfg)
    }
}

fn handshake_config(cfg: &LinkConfig) -> HandshakeConfig {
    HandshakeConfig::new(cfg.key.clone(), cfg.node_id, cfg.max_payload)
}

fn configure(stream: &TcpStream, cfg: &LinkConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
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
    configure(&stream, cfg).map_err(|source| Error::Io {
        op: "configure socket",
        peer: peer_s.clone(),
        source,
    })?;
    let stream = Arc::new(stream);
    let conn = Conn {
        stream,
        peer: peer_s.clone(),
        wait: WaitStrategy::Block,
    };
    let est =
        drive_handshake(&conn, hs, cfg.handshake_timeout).map_err(|source| Error::Handshake {
            peer: peer_s.clone(),
            source,
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
    let rx = TcpReceiver {
        conn,
        seq: 0,
        max_payload: est.max_payload,
        pending: None,
        broken: None,
    };
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
    conn: &Conn,
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
    conn: &Conn,
    hs: &mut Handshake,
    deadline: Deadline,
    timeout: Duration,
) -> Result<Established, HandshakeError> {
    let io_failure = |hs: &mut Handshake, e: Partial| match e.error {
        Error::Timeout { .. } => hs.timed_out(timeout),
        Error::PeerGone { .. } | Error::Closed { .. } => {
            HandshakeError::Truncated { stage: hs.stage() }
        }
        Error::Io { source, .. } => HandshakeError::Io(source),
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

/// A socket shared by the two halves, with the helpers that wait by the link's strategy.
#[derive(Clone)]
struct Conn {
    stream: Arc<TcpStream>,
    peer: String,
    wait: WaitStrategy,
}

impl Conn {
    fn map_io(&self, op: &'static str, source: io::Error) -> Error {
        match source.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => Error::PeerGone {
                peer: self.peer.clone(),
                detail: format!("{op}: {source}"),
            },
            _ => Error::Io {
                op,
                peer: self.peer.clone(),
                source,
            },
        }
    }

    /// Waits for readiness; `Err` when the deadline passes or poll fails.
    fn wait(
        &self,
        waiter: &mut Waiter,
        readiness: Readiness,
        deadline: Deadline,
        op: &'static str,
    ) -> Result<()> {
        match waiter.wait(self.stream.as_raw_fd(), readiness, deadline) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Timeout {
                op,
                waited: waiter.waited(),
                peer: self.peer.clone(),
            }),
            Err(e) => Err(self.map_io(op, e)),
        }
    }

    /// Writes all of `parts`, in order, with vectored writes.
    fn write_all(
        &self,
        parts: &[&[u8]],
        deadline: Deadline,
        op: &'static str,
    ) -> std::result::Result<(), Partial> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut written = 0usize;
        let mut waiter = Waiter::new(self.wait);
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
            match (&*self.stream).write_vectored(&slices[..n]) {
                Ok(0) => {
                    return Err(Partial {
                        moved: written,
                        error: Error::PeerGone {
                            peer: self.peer.clone(),
                            detail: format!("{op}: connection accepts no more data"),
                        },
                    });
                }
                Ok(k) => written += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(error) = self.wait(&mut waiter, Readiness::Writable, deadline, op) {
                        return Err(Partial {
                            moved: written,
                            error,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Partial {
                        moved: written,
                        error: self.map_io(op, e),
                    });
                }
            }
        }
        Ok(())
    }

    /// Fills `buf` completely.
    fn read_full(
        &self,
        buf: &mut [u8],
        deadline: Deadline,
        op: &'static str,
    ) -> std::result::Result<(), Partial> {
        let mut filled = 0usize;
        let mut waiter = Waiter::new(self.wait);
        while filled < buf.len() {
            match (&*self.stream).read(&mut buf[filled..]) {
                Ok(0) => {
                    let detail = if filled == 0 {
                        format!("{op}: connection closed without a close frame (peer died?)")
                    } else {
                        format!(
                            "{op}: connection closed mid-frame after {filled} of {} bytes",
                            buf.len()
                        )
                    };
                    return Err(Partial {
                        moved: filled,
                        error: Error::PeerGone {
                            peer: self.peer.clone(),
                            detail,
                        },
                    });
                }
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(error) = self.wait(&mut waiter, Readiness::Readable, deadline, op) {
                        return Err(Partial {
                            moved: filled,
                            error,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Partial {
                        moved: filled,
                        error: self.map_io(op, e),
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
            .map_err(|source| Error::Frame {
                peer: self.conn.peer.clone(),
                source,
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
        let _ = (&*self.conn.stream).write(&header);
        let _ = self.conn.stream.shutdown(std::net::Shutdown::Write);
    }
}

struct TcpReceiver {
    conn: Conn,
    seq: u64,
    max_payload: u32,
    /// A header already read whose payload did not fit the caller's buffer.
    pending: Option<FrameHeader>,
    broken: Option<String>,
}

impl TcpReceiver {
    fn broken_error(&self) -> Option<Error> {
        self.broken.as_ref().map(|cause| Error::Broken {
            peer: self.conn.peer.clone(),
            cause: cause.clone(),
        })
    }

    fn next_header(&mut self, deadline: Deadline) -> Result<FrameHeader> {
        if let Some(h) = self.pending.take() {
            return Ok(h);
        }
        let mut bytes = [0u8; HEADER_LEN];
        if let Err(p) = self.conn.read_full(&mut bytes, deadline, "recv") {
            return Err(record(&mut self.broken, p.error, p.moved > 0));
        }
        let header = match FrameHeader::decode(&bytes, self.max_payload) {
            Ok(h) => h,
            Err(source) => {
                let e = Error::Frame {
                    peer: self.conn.peer.clone(),
                    source,
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
            if let Err(p) = self.conn.read_full(payload, deadline, "recv") {
                return Err(record(&mut self.broken, p.error, true));
            }
            if let Err(source) = header.verify_payload(payload) {
                let e = Error::Frame {
                    peer: self.conn.peer.clone(),
                    source,
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
