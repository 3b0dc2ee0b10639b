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
use crate::frame::{FrameError, FrameHeader, HEADER_LEN, MAGIC};
use crate::handshake::{
    Capability, Established, HANDSHAKE_MAX_PAYLOAD, Handshake, HandshakeConfig, HandshakeError,
    TransportKind,
};
use crate::link::{Link, LinkConfig, LinkInfo, RecvHalf, SendHalf};
use crate::rdma;
use crate::select::{self, Offer, TransportChoice};
use crate::shm;
use crate::stream::{
    ByteSink, ByteSource, FramedReceiver, FramedSender, Partial, READ_BUFFER, read_full, write_all,
};
use crate::uring::{self, UringSink, UringSource};
use crate::wait::{WaitStrategy, Waiter};

/// The TCP receiver's read-ahead while messages are small (`stream::ReadPolicy`): a small message
/// costs one `recv`.
const WINDOW: usize = 4096;
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
    let offer = offer_for(cfg)?;
    let (stream, peer) = connect_stream(&addr, cfg)?;
    establish(stream, peer, &offer, Role::Client, cfg)
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
                    match connect_once(a, deadline, cfg) {
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

fn connect_once(addr: SocketAddr, deadline: Deadline, cfg: &LinkConfig) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    set_congestion(&socket, cfg);
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
    offer: Offer,
}

/// An accepted connection whose handshake has not run yet. Run it with
/// [`Incoming::establish`], typically on its own thread so a stalling peer cannot hold up others.
#[derive(Debug)]
pub struct Incoming {
    stream: TcpStream,
    peer: SocketAddr,
    cfg: LinkConfig,
    offer: Offer,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port).
    ///
    /// # Errors
    /// [`Error::Io`] when the address cannot be bound.
    pub fn bind(addr: impl ToSocketAddrs + std::fmt::Display, cfg: &LinkConfig) -> Result<Self> {
        let offer = offer_for(cfg)?;
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
        if a.is_ipv6() && a.ip().is_unspecified() {
            // `[::]` takes IPv4 connections too, whatever the host's default
            socket.set_only_v6(false).map_err(io_err)?;
        }
        // accepted connections inherit it from their start
        set_congestion(&socket, cfg);
        socket.bind(&a.into()).map_err(io_err)?;
        socket.listen(128).map_err(io_err)?;
        socket.set_nonblocking(true).map_err(io_err)?;
        Ok(Listener {
            inner: socket.into(),
            cfg: cfg.clone(),
            offer,
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
                        offer: self.offer.clone(),
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
        establish(self.stream, self.peer, &self.offer, Role::Server, &self.cfg)
    }
}

fn handshake_config(cfg: &LinkConfig, offer: &Offer) -> HandshakeConfig {
    let mut hc = HandshakeConfig::new(cfg.key.clone(), cfg.node_id, cfg.max_payload);
    hc.capabilities = offer.capabilities.clone();
    hc
}

/// What this side offers for `cfg`; a forced backend this process cannot run is an error here,
/// before any connection is made.
fn offer_for(cfg: &LinkConfig) -> Result<Offer> {
    select::local_offer_on(cfg.transport, cfg.rdma_device.as_deref()).map_err(|(kind, reason)| {
        Error::Unavailable {
            transport: kind.to_string(),
            reason,
        }
    })
}

/// This link's own offer: when RDMA is offered, its queue pairs are made now and their
/// addresses go into the handshake. When they cannot be made (a device budget is spent), RDMA
/// is withheld with the reason — or, when forced, the link fails.
fn prepare_rdma(offer: &Offer, cfg: &LinkConfig) -> Result<(Offer, Option<rdma::Pending>)> {
    let mut offer = offer.clone();
    let Some(cap) = offer
        .capabilities
        .iter_mut()
        .find(|c| c.transport == TransportKind::RDMA)
    else {
        return Ok((offer, None));
    };
    match rdma::Pending::new(cfg.rdma_device.as_deref()) {
        Ok(pending) => {
            cap.blob = pending.blob();
            Ok((offer, Some(pending)))
        }
        Err(reason) => {
            if cfg.transport == TransportChoice::Only(TransportKind::RDMA) {
                return Err(Error::Unavailable {
                    transport: "rdma".into(),
                    reason,
                });
            }
            offer
                .capabilities
                .retain(|c| c.transport != TransportKind::RDMA);
            offer.withheld.push((TransportKind::RDMA, reason));
            Ok((offer, None))
        }
    }
}

/// Which end of the connection this side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Client,
    Server,
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
    set_congestion(&sock, cfg);
    Ok(())
}

/// Sets the configured congestion control, logging a refusal (the system's then stays). Set on
/// a socket before it connects (or on the listener, whose connections inherit it), the algorithm
/// runs from the first packet: switching an established connection away from BBR leaves BBR's
/// pacing switched on under the new algorithm (the kernel keeps `sk_pacing_status`), which on
/// loopback slowed 4 MiB all-reduces to half speed in some runs (2 of 5 vs 0 of 5 with the
/// algorithm set first, interleaved).
fn set_congestion(sock: &Socket, cfg: &LinkConfig) {
    #[cfg(target_os = "linux")]
    if let Some(cc) = &cfg.congestion
        && let Err(e) = sock.set_tcp_congestion(cc.as_bytes())
    {
        tracing::warn!(congestion = %cc, error = %e, "congestion control refused; the system's stays");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (sock, cfg);
}

/// Configures the socket, runs the handshake over it, selects the backend and assembles the link.
fn establish(
    stream: TcpStream,
    peer: SocketAddr,
    offer: &Offer,
    role: Role,
    cfg: &LinkConfig,
) -> Result<Link> {
    let peer_s = peer.to_string();
    let handshake_error = |error| Error::Handshake {
        peer: peer_s.clone(),
        error,
    };
    let (offer, mut pending) = prepare_rdma(offer, cfg)?;
    let offer = &offer;
    let hs = match role {
        Role::Client => Handshake::client(handshake_config(cfg, offer)),
        Role::Server => Handshake::server(handshake_config(cfg, offer)),
    }
    .map_err(handshake_error)?;
    configure(&stream, cfg).map_err(|error| Error::Io {
        op: "configure socket",
        peer: peer_s.clone(),
        error,
    })?;
    let stream = Arc::new(stream);
    let mut conn = Conn::new(stream.clone(), peer_s.clone(), WaitStrategy::Block);
    let deadline = Deadline::after(cfg.handshake_timeout);
    let est = drive_handshake(&mut conn, hs, cfg.handshake_timeout).map_err(handshake_error)?;
    let no_common = |reason: String| {
        tracing::warn!(peer = %peer_s, %reason, "no transport in common; closing the connection");
        Error::Unavailable {
            transport: cfg.transport.to_string(),
            reason,
        }
    };
    let mut selection = select::choose(offer, &est.peer_capabilities).map_err(no_common)?;
    let max = est.max_payload;
    let mut rdma_halves = None;
    if selection.chosen == TransportKind::RDMA {
        let peer_blob = est
            .peer_capabilities
            .iter()
            .find(|c| c.transport == TransportKind::RDMA)
            .map(|c| c.blob.clone())
            .unwrap_or_default();
        let prepared = pending.take().ok_or_else(|| Error::Unavailable {
            transport: "rdma".into(),
            reason: "no queue pairs were prepared".into(),
        })?;
        match rdma::establish(
            prepared,
            &peer_blob,
            &mut conn,
            stream.clone(),
            max,
            cfg.wait,
            deadline,
        )? {
            Ok(halves) => rdma_halves = Some(halves),
            Err(reason) if cfg.transport == TransportChoice::Only(TransportKind::RDMA) => {
                return Err(Error::Unavailable {
                    transport: "rdma".into(),
                    reason,
                });
            }
            Err(reason) => {
                // Both sides saw the probe fail and fall back alike.
                let without = |caps: &[Capability]| -> Vec<Capability> {
                    caps.iter()
                        .filter(|c| c.transport != TransportKind::RDMA)
                        .cloned()
                        .collect()
                };
                let mut fallback = offer.clone();
                fallback.capabilities = without(&offer.capabilities);
                fallback.withheld.push((TransportKind::RDMA, reason));
                selection = select::choose(&fallback, &without(&est.peer_capabilities))
                    .map_err(no_common)?;
            }
        }
    }
    drop(pending);
    let skipped: Vec<String> = selection
        .skipped
        .iter()
        .map(|(k, why)| format!("{k}: {why}"))
        .collect();
    tracing::info!(
        peer = %peer_s,
        node = format_args!("{:#x}", est.peer_node_id),
        transport = %selection.chosen,
        skipped = ?skipped,
        "link established"
    );
    let info = LinkInfo {
        transport: selection.chosen,
        peer_addr: peer_s.clone(),
        local_addr: stream.local_addr().ok(),
        peer_node_id: est.peer_node_id,
        version: est.version,
        max_payload: est.max_payload,
        wait: cfg.wait,
    };
    let (tx, rx): (Box<dyn SendHalf>, Box<dyn RecvHalf>) = match selection.chosen {
        TransportKind::RDMA => {
            let (tx, rx) = rdma_halves.ok_or_else(|| Error::Unavailable {
                transport: "rdma".into(),
                reason: "the RDMA link was not set up".into(),
            })?;
            (Box::new(tx), Box::new(rx))
        }
        TransportKind::URING => (
            Box::new(FramedSender::new(
                UringSink::new(stream.clone(), peer_s.clone(), cfg.wait)?,
                max,
                false,
            )),
            Box::new(FramedReceiver::new(
                UringSource::new(stream, peer_s, cfg.wait)?,
                max,
                uring::WINDOW,
                READ_BUFFER,
            )?),
        ),
        TransportKind::SHM => {
            let shm_role = match role {
                Role::Server => shm::Role::Creator,
                Role::Client => shm::Role::Joiner,
            };
            let (tx, rx) = shm::establish(
                &mut conn,
                stream,
                shm_role,
                shm::Params {
                    ring_bytes: cfg.shm_ring_bytes,
                    single_copy: cfg.shm_single_copy,
                    max_payload: max,
                    wait: cfg.wait,
                },
                deadline,
            )?;
            (Box::new(tx), Box::new(rx))
        }
        _ => {
            let conn = Conn {
                wait: cfg.wait,
                ..conn
            };
            (
                Box::new(FramedSender::new(conn.clone(), max, false)),
                Box::new(FramedReceiver::new(conn, max, WINDOW, READ_BUFFER)?),
            )
        }
    };
    Ok(Link::from_halves(tx, rx, info, cfg.timeout))
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
            if write_all(conn, &[&frame], grace).is_err() {
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
            write_all(conn, &[&frame], deadline).map_err(|e| io_failure(hs, e))?;
        }
        if let Some(est) = hs.established() {
            return Ok(est.clone());
        }
        let mut header = [0u8; HEADER_LEN];
        // The magic first, so that a peer speaking another protocol is told apart at once rather
        // than waited on until the deadline.
        read_full(conn, &mut header[..MAGIC.len()], deadline).map_err(|e| io_failure(hs, e))?;
        if header[..MAGIC.len()] != MAGIC {
            let found = [header[0], header[1], header[2], header[3]];
            return Err(hs.frame_error(FrameError::BadMagic { found }));
        }
        read_full(conn, &mut header[MAGIC.len()..], deadline).map_err(|e| io_failure(hs, e))?;
        let h =
            FrameHeader::decode(&header, HANDSHAKE_MAX_PAYLOAD).map_err(|e| hs.frame_error(e))?;
        // Bounded by HANDSHAKE_MAX_PAYLOAD, checked by `decode` before this allocation.
        let mut payload = vec![0u8; h.payload_len()];
        read_full(conn, &mut payload, deadline).map_err(|e| io_failure(hs, e))?;
        hs.handle_frame(&h, &payload)?;
    }
}

/// Which socket timeout option a blocking call relies on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Send,
    Recv,
}

/// Owed bytes from which a blocking receive raises the socket's low-water mark.
const LOWAT_MIN: usize = 256 << 10;
/// The highest low-water mark a blocking receive sets.
const LOWAT_MAX: usize = 1 << 20;

/// A socket's receive low-water mark (`SO_RCVLOWAT`) as this side last set it.
///
/// A receiver asleep in a blocking receive is woken by every segment that arrives, and on
/// loopback the waking (a cross-core wakeup, a VM exit under virtualisation) is paid by the
/// sending core, the one that limits throughput. The kernel wakes a receiver only once the
/// bytes queued and not yet copied reach the mark (or its buffer is under pressure, or the
/// stream ends) — counting none it already copied during the call — so a mark is only safe
/// when that much is certain to arrive after the receiver empties the queue.
///
/// [`LowWater::plan`] makes it so: a blocking receive of `R` ≥ [`LOWAT_MIN`] bytes the peer
/// owes sets the mark `m = min(R / 2, LOWAT_MAX)` and reads at most `R - m` bytes. Whenever it
/// sleeps it has emptied the queue having taken fewer than `R - m`, so more than `m` owed
/// bytes are still to come and will wake it. The caller's next call plans again for what is
/// left. Any other blocking receive puts the mark back to 1 first, so a message shorter than a
/// stale mark is never slept through; non-blocking receives ignore the mark.
#[derive(Clone, Debug)]
pub(crate) struct LowWater {
    current: usize,
}

impl LowWater {
    pub(crate) fn new() -> Self {
        LowWater { current: 1 }
    }

    /// For a blocking receive into `len` bytes, of which the peer owes all (`owed`) or not: how
    /// many bytes it may take, and the mark it runs with.
    pub(crate) fn plan(owed: bool, len: usize) -> (usize, usize) {
        if owed && len >= LOWAT_MIN {
            let mark = (len / 2).min(LOWAT_MAX);
            (len - mark, mark)
        } else {
            (len, 1)
        }
    }

    /// Sets the mark of `fd` to `mark` unless it already is. A raised mark the socket refuses
    /// is only an optimisation lost: the mark goes back to 1 instead, and only a failure to do
    /// that is an error (a stale raised mark would be unsafe).
    pub(crate) fn set(&mut self, fd: RawFd, mark: usize) -> io::Result<()> {
        match self.apply(fd, mark) {
            Err(e) if mark > 1 => {
                tracing::debug!(error = %e, mark, "SO_RCVLOWAT refused; receiving without it");
                self.apply(fd, 1)
            }
            other => other,
        }
    }

    /// Sets the mark of `fd` to `mark` unless it already is.
    fn apply(&mut self, fd: RawFd, mark: usize) -> io::Result<()> {
        if mark == self.current {
            return Ok(());
        }
        let value = libc::c_int::try_from(mark).unwrap_or(libc::c_int::MAX);
        // SAFETY: `value` is a live c_int and the length passed is its size; the kernel only
        // reads it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.current = mark;
        Ok(())
    }
}

/// A socket shared by the two halves, with the helpers that wait by the link's strategy.
///
/// The socket stays in blocking mode: a spinning attempt passes `MSG_DONTWAIT`, a blocking one
/// sleeps in the kernel bounded by `SO_SNDTIMEO` / `SO_RCVTIMEO`. Those options are per
/// direction, so each half manages its own without disturbing the other, and a blocking send of
/// a large message stays in one system call instead of a write/poll loop.
#[derive(Clone)]
pub(crate) struct Conn {
    stream: Arc<TcpStream>,
    peer: String,
    wait: WaitStrategy,
    /// The socket timeout currently set for each direction (zero: never set).
    send_timeout: Duration,
    recv_timeout: Duration,
    /// The receive low-water mark (only the receiving half changes it).
    low_water: LowWater,
}

impl Conn {
    pub(crate) fn new(stream: Arc<TcpStream>, peer: String, wait: WaitStrategy) -> Self {
        Conn {
            stream,
            peer,
            wait,
            send_timeout: Duration::ZERO,
            recv_timeout: Duration::ZERO,
            low_water: LowWater::new(),
        }
    }

    fn map_io(&self, op: &'static str, error: io::Error) -> Error {
        Error::from_socket(op, &self.peer, error)
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
    /// passes; a blocking receive runs with the low-water mark `mark` (see [`LowWater::plan`]).
    fn retry(
        &mut self,
        dir: Direction,
        deadline: Deadline,
        op: &'static str,
        mark: usize,
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
                if dir == Direction::Recv {
                    self.low_water
                        .set(fd, mark)
                        .map_err(|e| self.map_io(op, e))?;
                }
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
}

impl ByteSink for Conn {
    fn peer(&self) -> &str {
        &self.peer
    }

    fn write_some(&mut self, parts: &[&[u8]], deadline: Deadline) -> Result<usize> {
        let slices: [IoSlice<'_>; 2] = [
            IoSlice::new(parts.first().copied().unwrap_or(&[])),
            IoSlice::new(parts.get(1).copied().unwrap_or(&[])),
        ];
        let n = parts.len().min(2);
        self.retry(Direction::Send, deadline, "send", 1, |fd, flags| {
            sendmsg::<()>(fd, &slices[..n], &[], flags, None)
        })
    }

    fn try_write_some(&mut self, parts: &[&[u8]]) -> Result<usize> {
        let slices: [IoSlice<'_>; 2] = [
            IoSlice::new(parts.first().copied().unwrap_or(&[])),
            IoSlice::new(parts.get(1).copied().unwrap_or(&[])),
        ];
        let n = parts.len().min(2);
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        loop {
            match sendmsg::<()>(self.stream.as_raw_fd(), &slices[..n], &[], flags, None) {
                Ok(k) => return Ok(k),
                Err(Errno::EAGAIN) => return Ok(0),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(self.map_io("send", io::Error::from(e))),
            }
        }
    }

    fn close(&mut self, farewell: &[u8]) {
        let _ = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(farewell)],
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        );
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

impl ByteSource for Conn {
    fn peer(&self) -> &str {
        &self.peer
    }

    fn try_read_some(&mut self, buf: &mut [u8], mid_frame: bool) -> Result<Option<usize>> {
        loop {
            match recv(self.stream.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) if !buf.is_empty() => return Err(Error::stream_ended(&self.peer, mid_frame)),
                Ok(k) => return Ok(Some(k)),
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(self.map_io("recv", io::Error::from(e))),
            }
        }
    }

    fn read_some(&mut self, buf: &mut [u8], deadline: Deadline, mid_frame: bool) -> Result<usize> {
        self.read(buf, deadline, mid_frame, false)
    }

    fn read_owed(&mut self, buf: &mut [u8], deadline: Deadline, mid_frame: bool) -> Result<usize> {
        self.read(buf, deadline, mid_frame, true)
    }
}

impl Conn {
    /// A receive of at least one byte into `buf`, of which the peer owes all (`owed`) or not.
    fn read(
        &mut self,
        buf: &mut [u8],
        deadline: Deadline,
        mid_frame: bool,
        owed: bool,
    ) -> Result<usize> {
        let (limit, mark) = LowWater::plan(owed, buf.len());
        match self.retry(Direction::Recv, deadline, "recv", mark, |fd, flags| {
            if flags.contains(MsgFlags::MSG_DONTWAIT) {
                recv(fd, buf, flags)
            } else {
                recv(fd, &mut buf[..limit], flags)
            }
        })? {
            0 => Err(Error::stream_ended(&self.peer, mid_frame)),
            k => Ok(k),
        }
    }
}

#[cfg(test)]
mod tests;
