//! `Link`: an established, authenticated, bidirectional message channel to one peer.
//!
//! A link is backend-agnostic: each backend supplies a [`SendHalf`] and a [`RecvHalf`], and the
//! collectives above never know which backend they run on (NCCL's shape). Messages are sent from
//! the caller's buffer and received into the caller's buffer, so a backend with registered memory
//! (RDMA) needs no hidden copy. Every call takes a deadline, or inherits the link's timeout.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::handshake::TransportKind;
use crate::wait::WaitStrategy;

/// Default timeout of a link's calls that are given no deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A received message: its tag and its length (the bytes are in the caller's buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sender's tag.
    pub tag: u32,
    /// Payload length: the first `len` bytes of the buffer hold it.
    pub len: usize,
}

/// Facts about an established link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// The backend carrying the link.
    pub transport: TransportKind,
    /// The peer's address, printable.
    pub peer_addr: String,
    /// This end's address on the connection that set the link up (which interface, and on an
    /// IPv6 link-local connection, which scope, reaches the peer); `None` where it is unknown.
    pub local_addr: Option<std::net::SocketAddr>,
    /// The peer's node id, as it proved in the handshake.
    pub peer_node_id: u64,
    /// The protocol version in use.
    pub version: u16,
    /// The largest message either side may send.
    pub max_payload: u32,
    /// How the link waits.
    pub wait: WaitStrategy,
}

impl fmt::Display for LinkInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} link to node {:#x} at {} (protocol v{}, max message {} B, wait {})",
            self.transport,
            self.peer_node_id,
            self.peer_addr,
            self.version,
            self.max_payload,
            self.wait
        )
    }
}

/// The sending half of a backend.
pub trait SendHalf: Send {
    /// Sends one message from `payload`, blocking until it is handed to the medium or the
    /// deadline passes.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`], [`Error::Timeout`], [`Error::PeerGone`], [`Error::Broken`], ...
    fn send(&mut self, tag: u32, payload: &[u8], deadline: Deadline) -> Result<()>;

    /// Moves as much of one message as the medium takes right now, without waiting; `Ok(true)`
    /// once all of it is handed over. Call again with the same `tag` and `payload` until then:
    /// the message is in progress, and other sends on this half are refused meanwhile.
    ///
    /// # Errors
    /// As [`SendHalf::send`], without timeouts.
    fn try_send(&mut self, tag: u32, payload: &[u8]) -> Result<bool>;

    /// Writes raw bytes into the medium, bypassing framing (tests inject garbage with it).
    #[cfg(test)]
    fn inject_raw(&mut self, bytes: &[u8], deadline: Deadline) -> Result<()>;

    /// Makes the half go away without an orderly close, as a crashed process would.
    #[cfg(test)]
    fn abandon(&mut self);
}

/// The receiving half of a backend.
pub trait RecvHalf: Send {
    /// Receives the next message into `buf`.
    ///
    /// # Errors
    /// [`Error::BufferTooSmall`] (nothing consumed), [`Error::Timeout`], [`Error::Closed`],
    /// [`Error::PeerGone`], [`Error::Frame`], [`Error::Broken`], ...
    fn recv(&mut self, buf: &mut [u8], deadline: Deadline) -> Result<Message>;

    /// Moves as much of the next message into `buf` as has arrived, without waiting;
    /// `Ok(Some(message))` once it is complete. Call again with the same buffer until then.
    ///
    /// # Errors
    /// As [`RecvHalf::recv`], without timeouts.
    fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Message>>;
}

/// The sending half of a [`Link`], usable from its own thread.
pub struct LinkSender {
    half: Box<dyn SendHalf>,
    timeout: Duration,
    info: Arc<LinkInfo>,
}

/// The receiving half of a [`Link`], usable from its own thread.
pub struct LinkReceiver {
    half: Box<dyn RecvHalf>,
    timeout: Duration,
    info: Arc<LinkInfo>,
}

/// An established, authenticated, bidirectional message link to one peer.
///
/// ```no_run
/// use std::time::Duration;
/// use transport::{ClusterKey, LinkConfig, tcp};
///
/// let key = ClusterKey::from_hex(&"00".repeat(32), "example")?;
/// let mut link = tcp::connect("10.0.0.2:7470", &LinkConfig::new(key))?;
/// link.send(7, b"hello")?;
/// let mut buf = vec![0u8; 1 << 20];
/// let msg = link.recv(&mut buf)?;
/// println!("tag {} carried {:?}", msg.tag, &buf[..msg.len]);
/// # Ok::<(), transport::Error>(())
/// ```
pub struct Link {
    tx: LinkSender,
    rx: LinkReceiver,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("info", &*self.tx.info)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Assembles a link from a backend's halves. Used by backends.
    pub fn from_halves(
        tx: Box<dyn SendHalf>,
        rx: Box<dyn RecvHalf>,
        info: LinkInfo,
        timeout: Duration,
    ) -> Self {
        let info = Arc::new(info);
        Link {
            tx: LinkSender {
                half: tx,
                timeout,
                info: info.clone(),
            },
            rx: LinkReceiver {
                half: rx,
                timeout,
                info,
            },
        }
    }

    /// Facts about the link.
    pub fn info(&self) -> &LinkInfo {
        &self.tx.info
    }

    /// Sets the timeout of calls given no deadline.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.tx.timeout = timeout;
        self.rx.timeout = timeout;
    }

    /// Sends `payload` with `tag`, within the link's timeout.
    ///
    /// # Errors
    /// As [`SendHalf::send`].
    pub fn send(&mut self, tag: u32, payload: &[u8]) -> Result<()> {
        self.tx.send(tag, payload)
    }

    /// Sends `payload` with `tag` before `deadline`.
    ///
    /// # Errors
    /// As [`SendHalf::send`].
    pub fn send_until(&mut self, tag: u32, payload: &[u8], deadline: Deadline) -> Result<()> {
        self.tx.send_until(tag, payload, deadline)
    }

    /// Receives the next message into `buf`, within the link's timeout.
    ///
    /// # Errors
    /// As [`RecvHalf::recv`].
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Message> {
        self.rx.recv(buf)
    }

    /// Receives the next message into `buf` before `deadline`.
    ///
    /// # Errors
    /// As [`RecvHalf::recv`].
    pub fn recv_until(&mut self, buf: &mut [u8], deadline: Deadline) -> Result<Message> {
        self.rx.recv_until(buf, deadline)
    }

    /// Writes raw bytes into the medium, bypassing framing.
    #[cfg(test)]
    pub(crate) fn inject_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.tx
            .half
            .inject_raw(bytes, Deadline::after(self.tx.timeout))
    }

    /// Drops the link without an orderly close, as a crashed process would.
    #[cfg(test)]
    pub(crate) fn abandon(mut self) {
        self.tx.half.abandon();
    }

    /// [`LinkSender::try_send`] on the link's sending half.
    #[cfg(test)]
    pub(crate) fn tx_try_send(&mut self, tag: u32, payload: &[u8]) -> Result<bool> {
        self.tx.try_send(tag, payload)
    }

    /// [`LinkReceiver::try_recv`] on the link's receiving half.
    #[cfg(test)]
    pub(crate) fn rx_try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Message>> {
        self.rx.try_recv(buf)
    }

    /// Splits the link into halves that two threads can use at once.
    pub fn split(self) -> (LinkSender, LinkReceiver) {
        (self.tx, self.rx)
    }

    /// Reassembles halves split from the same link.
    ///
    /// # Errors
    /// Gives the halves back when they come from different links.
    pub fn unsplit(
        tx: LinkSender,
        rx: LinkReceiver,
    ) -> std::result::Result<Link, (LinkSender, LinkReceiver)> {
        if Arc::ptr_eq(&tx.info, &rx.info) {
            Ok(Link { tx, rx })
        } else {
            Err((tx, rx))
        }
    }
}

impl LinkSender {
    /// Facts about the link.
    pub fn info(&self) -> &LinkInfo {
        &self.info
    }

    /// Sends within the link's timeout.
    ///
    /// # Errors
    /// As [`SendHalf::send`].
    pub fn send(&mut self, tag: u32, payload: &[u8]) -> Result<()> {
        self.half.send(tag, payload, Deadline::after(self.timeout))
    }

    /// Sends before `deadline`.
    ///
    /// # Errors
    /// As [`SendHalf::send`].
    pub fn send_until(&mut self, tag: u32, payload: &[u8], deadline: Deadline) -> Result<()> {
        self.half.send(tag, payload, deadline)
    }

    /// Progresses one message without waiting; see [`SendHalf::try_send`].
    ///
    /// # Errors
    /// As [`SendHalf::try_send`].
    pub fn try_send(&mut self, tag: u32, payload: &[u8]) -> Result<bool> {
        self.half.try_send(tag, payload)
    }
}

impl LinkReceiver {
    /// Facts about the link.
    pub fn info(&self) -> &LinkInfo {
        &self.info
    }

    /// Receives within the link's timeout.
    ///
    /// # Errors
    /// As [`RecvHalf::recv`].
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Message> {
        self.half.recv(buf, Deadline::after(self.timeout))
    }

    /// Receives before `deadline`.
    ///
    /// # Errors
    /// As [`RecvHalf::recv`].
    pub fn recv_until(&mut self, buf: &mut [u8], deadline: Deadline) -> Result<Message> {
        self.half.recv(buf, deadline)
    }

    /// Progresses the next message without waiting; see [`RecvHalf::try_recv`].
    ///
    /// # Errors
    /// As [`RecvHalf::try_recv`].
    pub fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Message>> {
        self.half.try_recv(buf)
    }
}

/// Settings shared by every link a node opens or accepts.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The pre-shared cluster key.
    pub key: crate::key::ClusterKey,
    /// This node's id, sent in the handshake.
    pub node_id: u64,
    /// How to wait for the peer.
    pub wait: WaitStrategy,
    /// Timeout of link calls given no deadline.
    pub timeout: Duration,
    /// Deadline of the whole handshake; a peer that stalls longer is dropped.
    pub handshake_timeout: Duration,
    /// How long a connector keeps retrying while the peer is not listening yet.
    pub connect_timeout: Duration,
    /// The largest message this side accepts; the link uses the smaller of the two sides'.
    pub max_payload: u32,
    /// Socket send and receive buffer size; `None` leaves the kernel's autotuning on.
    pub socket_buffer: Option<usize>,
    /// TCP congestion control of the link's socket (Linux, `TCP_CONGESTION`); `None` keeps the
    /// system's. Defaults to `cubic`: on cluster links the traffic is bursts (a collective's
    /// pieces, a stage's activations) and a pacing controller such as BBR spreads each burst out
    /// (on loopback, 2 ranks: 1–4 MiB all-reduce ≈ 1.3–2× faster under cubic than under BBR). A
    /// name the kernel refuses (not loaded, or not in `tcp_allowed_congestion_control`) is logged
    /// and the system's stays. It is set on the socket before it connects (on the listener for
    /// accepted links), so the connection never starts under the system's algorithm.
    pub congestion: Option<String>,
    /// Which backends links may use.
    pub transport: crate::select::TransportChoice,
    /// Bytes of each direction's shared-memory ring (rounded up to a power of two).
    pub shm_ring_bytes: usize,
    /// When shared-memory messages are copied once, by the receiver straight from the sender's
    /// buffer (`process_vm_readv`), instead of streamed through the ring. The default,
    /// [`SingleCopy::Auto`](crate::shm::SingleCopy::Auto), measures both on each link (with a
    /// shared cache the ring's two overlapping copies are faster; without one the single copy
    /// is — bench/TRANSPORTS.md, "shm: ring or single copy").
    pub shm_single_copy: crate::shm::SingleCopy,
    /// The RDMA device links use (`softrdma0`: the built-in software device); `None`: the
    /// first device the verbs library lists. Defaults to `SINEW_RDMA_DEVICE`.
    pub rdma_device: Option<String>,
}

impl LinkConfig {
    /// Defaults: a random node id, adaptive waiting, 30 s call timeout, 5 s handshake, 30 s of
    /// connect retries, 256 MiB maximum message, kernel-tuned socket buffers, cubic congestion
    /// control, the best backend both
    /// sides offer, 4 MiB shared-memory rings with single copy where measured faster, the RDMA
    /// device named by `SINEW_RDMA_DEVICE`.
    pub fn new(key: crate::key::ClusterKey) -> Self {
        let mut id = [0u8; 8];
        // A node id only needs to be unlikely to collide; fall back to the pid if the random
        // source fails.
        let node_id = match getrandom::fill(&mut id) {
            Ok(()) => u64::from_le_bytes(id),
            Err(_) => u64::from(std::process::id()),
        };
        LinkConfig {
            key,
            node_id,
            wait: WaitStrategy::default(),
            timeout: DEFAULT_TIMEOUT,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            max_payload: 256 << 20,
            socket_buffer: None,
            congestion: Some("cubic".into()),
            transport: crate::select::TransportChoice::Auto,
            shm_ring_bytes: 4 << 20,
            shm_single_copy: crate::shm::SingleCopy::Auto,
            rdma_device: std::env::var(crate::rdma::DEVICE_ENV)
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }
}

/// Checks a message against the negotiated maximum before anything is sent.
pub(crate) fn check_len(len: usize, max: u32) -> Result<()> {
    if len > max as usize {
        return Err(Error::MessageTooLarge { len, max });
    }
    Ok(())
}
