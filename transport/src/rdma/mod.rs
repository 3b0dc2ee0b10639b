//! The RDMA backend: links over verbs queue pairs, written to Apple's Thunderbolt 5 rules (UC,
//! SEND/RECV only, one SGE, a send lands only in a receive of the same number of 4 KiB frames,
//! no acknowledgement, no error when the peer dies) so that it runs unchanged on rdma-core
//! devices and on the software device.
//!
//! Each link has two queue pairs on one completion queue, and four buffers registered once:
//!
//! - **control**: every receive is one frame. Each message starts with a control packet (a
//!   72-byte [`wire::Packet`] header); one of up to [`wire::INLINE_MAX`] bytes travels inline in
//!   it. Credit-based flow control: every packet carries the sender's cumulative count of posted
//!   control and bulk receives, so a side never sends into a receive the peer has not posted.
//!   A message may use a control credit only while [`CTRL_RESERVE`] stay free for credit
//!   updates and heartbeats, so that the two sides can never starve each other of credit.
//! - **bulk**: a larger message is announced by its control packet; the receiver then posts
//!   receives of exactly the sizes of its chunks (each at most the agreed chunk, itself at most
//!   the device's largest message: 16,773,120 B on Apple), so the frame counts always match, and
//!   the sender streams the chunks as those receives are advertised.
//!
//! UC promises nothing, so integrity and liveness are checked here: control packets carry a
//! sequence number and a header CRC (a gap means a packet was lost, e.g. dropped for a frame
//! mismatch), every message carries a CRC-32C of its payload, a bulk chunk that the peer reports
//! sent but that never arrives is an error after [`LOSS_GRACE`], a heartbeat goes out every
//! [`HEARTBEAT_EVERY`] and a peer silent for [`SILENCE`] is declared gone, and the TCP connection
//! the link was set up over is watched: its closing means the peer process is gone.
//!
//! Queue-pair addresses travel in the RDMA capability blob of the authenticated handshake. After
//! the queue pairs are connected, one packet must cross each way within [`PROBE_TIMEOUT`]; when
//! it does not (the two devices are not on one fabric), both sides fall back to the next backend
//! they share.

pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdma_sys::Verbs;
use rdma_sys::safe::{
    CompletionQueue, Context, Endpoint, Gid, MemoryRegion, ProtectionDomain, QueuePair,
};
use rdma_sys::types::{ibv_gid, ibv_link_layer, ibv_port_state, ibv_wc};

use crate::codec::{Reader, Writer};
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::link::{Message, RecvHalf, SendHalf, check_len};
use crate::shm::{peer_gone, setup_recv, setup_send};
use crate::stream::{ByteSink, ByteSource};
use crate::wait::{WaitStrategy, Waiter};
use wire::{FRAME, FrameRing, HEADER, INLINE_MAX, Kind, Packet};

/// The software verbs device's name: `--rdma-device softrdma0` (or `SINEW_RDMA_DEVICE`) runs
/// the RDMA backend without hardware.
pub const SOFTWARE_DEVICE: &str = "softrdma0";
/// The environment variable naming the RDMA device links use (default: the first device).
pub const DEVICE_ENV: &str = "SINEW_RDMA_DEVICE";

const PORT: u8 = 1;
/// Control receives a message may use.
const CTRL_WINDOW: usize = 128;
/// Control receives kept for credit updates and heartbeats.
pub const CTRL_RESERVE: usize = 8;
const CTRL_RECV: usize = CTRL_WINDOW + CTRL_RESERVE;
const CTRL_SEND: usize = 64;
/// Bytes of each direction's bulk ring (frames of it are the bulk queue's depth, ≤ 4095).
const BULK_RING: usize = 12 << 20;
/// The largest bulk chunk this side sends or receives.
const CHUNK_MAX: usize = 1 << 20;
/// A heartbeat goes out when nothing else has for this long.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(200);
/// A peer heard nothing from for this long is gone (a dead UC peer produces no error).
pub const SILENCE: Duration = Duration::from_secs(3);
/// A bulk chunk the peer reports sent and that has not arrived after this long was lost.
pub const LOSS_GRACE: Duration = Duration::from_millis(1500);
/// How long the first packet may take to cross, each way, when the link is set up.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// After the peer's TCP connection closes, how long a close packet still in flight is awaited.
const CLOSE_GRACE: Duration = Duration::from_millis(200);
const BLOB_VERSION: u8 = 1;

/// Work-request ids: the buffer in the high bits, the slot or offset in the low ones.
const WR_CTRL_RX: u64 = 1 << 40;
const WR_CTRL_TX: u64 = 2 << 40;
const WR_BULK_RX: u64 = 3 << 40;
const WR_BULK_TX: u64 = 4 << 40;
const WR_KIND: u64 = 0xff << 40;

/// An opened device, shared by every link of this process that uses it: the budgets Apple
/// imposes (queue pairs, memory regions) are per device.
struct Device {
    name: String,
    ctx: Context,
    pd: ProtectionDomain,
    gid: Gid,
    link_layer: ibv_link_layer,
    max_msg: usize,
}

fn devices() -> &'static Mutex<HashMap<String, Weak<Device>>> {
    static DEVICES: OnceLock<Mutex<HashMap<String, Weak<Device>>>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The device to use: `name`, else `SINEW_RDMA_DEVICE`, else the first one the verbs list.
fn device(name: Option<&str>) -> std::result::Result<Arc<Device>, String> {
    let env = std::env::var(DEVICE_ENV).ok().filter(|s| !s.is_empty());
    let name = name.map(str::to_string).or(env);
    let key = name.clone().unwrap_or_default();
    let mut cache = devices().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dev) = cache.get(&key).and_then(Weak::upgrade) {
        return Ok(dev);
    }
    let verbs = if name.as_deref() == Some(SOFTWARE_DEVICE) {
        Verbs::software()
    } else {
        Verbs::load().map_err(|e| e.to_string())?
    };
    let dev_name = verbs
        .require_device(name.as_deref())
        .map_err(|e| e.to_string())?
        .0;
    let ctx = Context::open(Arc::new(verbs), Some(&dev_name)).map_err(|e| e.to_string())?;
    let port = ctx
        .query_port(PORT)
        .map_err(|e| format!("{dev_name}: {e}"))?;
    if port.state != ibv_port_state::ACTIVE {
        return Err(format!(
            "{dev_name}: port {PORT} is not active (state {}): is the cable in and the link up?",
            port.state.0
        ));
    }
    let gid = ctx.ipv4_gid(PORT).map_err(|e| {
        format!("{dev_name}: {e} (give the interface an IPv4 address, e.g. link-local)")
    })?;
    let pd = ctx.alloc_pd().map_err(|e| format!("{dev_name}: {e}"))?;
    let max_msg = (port.max_msg_sz as usize).max(FRAME);
    let dev = Arc::new(Device {
        name: dev_name,
        ctx,
        pd,
        gid,
        link_layer: port.link_layer,
        max_msg,
    });
    cache.insert(key, Arc::downgrade(&dev));
    Ok(dev)
}

/// Whether this process can run RDMA links on `name` (the check a link makes when it opens the
/// device), or why not.
///
/// # Errors
/// The reason, one line: no verbs library, no RDMA in the kernel, no such device, port down, no
/// IPv4 GID.
pub fn probe(name: Option<&str>) -> std::result::Result<(), String> {
    device(name).map(|_| ())
}

/// A link's queue pairs and buffers, made before the handshake so that their addresses can go
/// into it.
pub(crate) struct Pending {
    dev: Arc<Device>,
    cq: CompletionQueue,
    ctrl: QueuePair,
    bulk: QueuePair,
    psn: [u32; 2],
    chunk: usize,
    ctrl_rx: MemoryRegion,
    ctrl_tx: MemoryRegion,
    bulk_rx: MemoryRegion,
    bulk_tx: MemoryRegion,
}

impl Pending {
    /// Creates the queue pairs and registers the buffers on `name`'s device.
    ///
    /// # Errors
    /// Why not, one line (a budget of the device spent, a refused verb).
    pub(crate) fn new(name: Option<&str>) -> std::result::Result<Pending, String> {
        let dev = device(name)?;
        let what = |step: &str, e: rdma_sys::Error| format!("{}: {step}: {e}", dev.name);
        let cq = dev
            .ctx
            .create_cq(2 * (CTRL_RECV + CTRL_SEND + BULK_RING / FRAME))
            .map_err(|e| what("completion queue", e))?;
        let ctrl = dev
            .pd
            .create_qp(&cq, CTRL_SEND, CTRL_RECV, dev.link_layer)
            .map_err(|e| what("control queue pair (a device allows few: Apple ~10)", e))?;
        let bulk = dev
            .pd
            .create_qp(&cq, BULK_RING / FRAME, BULK_RING / FRAME, dev.link_layer)
            .map_err(|e| what("bulk queue pair (a device allows few: Apple ~10)", e))?;
        let reg = |len: usize| {
            dev.pd
                .register(len)
                .map_err(|e| what("registering link buffers", e))
        };
        let mut psn = [0u8; 8];
        getrandom::fill(&mut psn).map_err(|e| format!("random PSN: {e}"))?;
        let word = |i: usize| u32::from_le_bytes(psn[i..i + 4].try_into().expect("4")) & 0xff_ffff;
        let chunk = (dev.max_msg / FRAME * FRAME).min(CHUNK_MAX);
        Ok(Pending {
            ctrl_rx: reg(CTRL_RECV * FRAME)?,
            ctrl_tx: reg(CTRL_SEND * FRAME)?,
            bulk_rx: reg(BULK_RING)?,
            bulk_tx: reg(BULK_RING)?,
            psn: [word(0), word(4)],
            chunk,
            cq,
            ctrl,
            bulk,
            dev,
        })
    }

    /// The capability blob: this side's queue-pair addresses and limits.
    pub(crate) fn blob(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u8(BLOB_VERSION);
        v.extend_from_slice(&self.dev.gid.gid.raw);
        v.put_u32(self.ctrl.qpn());
        v.put_u32(self.psn[0]);
        v.put_u32(self.bulk.qpn());
        v.put_u32(self.psn[1]);
        v.put_u32(self.chunk as u32);
        v.put_u32(CTRL_RECV as u32);
        v
    }
}

/// The peer's half of [`Pending::blob`].
#[derive(Debug, PartialEq, Eq)]
struct PeerInfo {
    ctrl: Endpoint,
    bulk: Endpoint,
    chunk: usize,
    ctrl_posted: usize,
}

fn parse_blob(blob: &[u8]) -> std::result::Result<PeerInfo, String> {
    let mut r = Reader::new(blob);
    let parsed = (|| {
        let version = r.u8("version")?;
        let gid = ibv_gid {
            raw: r.array::<16>("gid")?,
        };
        let (cq, cp, bq, bp) = (r.u32("qpn")?, r.u32("psn")?, r.u32("qpn")?, r.u32("psn")?);
        let (chunk, posted) = (r.u32("chunk")?, r.u32("ctrl receives")?);
        Ok::<_, crate::codec::DecodeError>((version, gid, cq, cp, bq, bp, chunk, posted))
    })();
    let (version, gid, cq, cp, bq, bp, chunk, posted) = parsed.map_err(|e| e.to_string())?;
    if version != BLOB_VERSION {
        return Err(format!(
            "RDMA blob version {version}, expected {BLOB_VERSION}"
        ));
    }
    let chunk = chunk as usize;
    if chunk < FRAME || !chunk.is_multiple_of(FRAME) || posted as usize <= CTRL_RESERVE {
        return Err(format!(
            "RDMA limits out of range: chunk {chunk}, {posted} control receives"
        ));
    }
    Ok(PeerInfo {
        ctrl: Endpoint {
            gid,
            qpn: cq,
            psn: cp,
        },
        bulk: Endpoint {
            gid,
            qpn: bq,
            psn: bp,
        },
        chunk,
        ctrl_posted: posted as usize,
    })
}

/// Connects a pending link to the peer described by `peer_blob`, over the authenticated TCP
/// connection `conn` (kept as the liveness signal). `Ok(Err(reason))`: both sides agree that no
/// packet crossed, and fall back to another backend.
///
/// # Errors
/// A malformed blob, a refused verb or a failure of the TCP connection during setup.
#[allow(clippy::too_many_arguments)]
pub(crate) fn establish<S: ByteSink + ByteSource>(
    pending: Pending,
    peer_blob: &[u8],
    conn: &mut S,
    bootstrap: Arc<TcpStream>,
    max_payload: u32,
    wait: WaitStrategy,
    deadline: Deadline,
) -> Result<std::result::Result<(RdmaSender, RdmaReceiver), String>> {
    let peer = ByteSink::peer(conn).to_string();
    let violation = |detail: String| Error::ProtocolViolation {
        peer: peer.clone(),
        detail,
    };
    let verb = |e: rdma_sys::Error| Error::Unavailable {
        transport: "rdma".into(),
        reason: format!("{}: {e}", pending.dev.name),
    };
    let info = parse_blob(peer_blob).map_err(|e| violation(format!("RDMA setup: {e}")))?;
    let gid_index = pending.dev.gid.index;
    pending
        .ctrl
        .connect(PORT, gid_index, pending.psn[0], info.ctrl)
        .map_err(verb)?;
    pending
        .bulk
        .connect(PORT, gid_index, pending.psn[1], info.bulk)
        .map_err(verb)?;
    for slot in 0..CTRL_RECV {
        pending
            .ctrl
            .post_recv(
                WR_CTRL_RX | slot as u64,
                &pending.ctrl_rx,
                slot * FRAME..(slot + 1) * FRAME,
            )
            .map_err(verb)?;
    }
    // Both sides have posted their receives before either sends.
    setup_send(conn, &[1], deadline)?;
    setup_recv(conn, deadline)?;
    let chunk = pending.chunk.min(info.chunk);
    let mut engine = Engine::new(pending, &info, chunk, peer.clone(), max_payload);
    let probe = Deadline::after(PROBE_TIMEOUT).min(deadline);
    let crossed = engine.probe(probe);
    let ours = crossed
        .as_ref()
        .map_or_else(|e| e.clone(), |()| String::new());
    setup_send(conn, ours.as_bytes(), deadline)?;
    let theirs = String::from_utf8_lossy(&setup_recv(conn, deadline)?).into_owned();
    if !ours.is_empty() || !theirs.is_empty() {
        let reason = if ours.is_empty() { theirs } else { ours };
        return Ok(Err(reason));
    }
    let shared = Arc::new(Shared {
        engine: Mutex::new(engine),
        bootstrap,
        peer,
        wait,
        abandoned: AtomicBool::new(false),
        silent: AtomicBool::new(false),
    });
    spawn_heartbeat(Arc::downgrade(&shared));
    Ok(Ok((
        RdmaSender {
            shared: shared.clone(),
        },
        RdmaReceiver { shared },
    )))
}

/// A message arriving or arrived.
struct Incoming {
    tag: u32,
    len: usize,
    crc: u32,
    body: Body,
}

enum Body {
    /// In a control receive slot, after the header.
    Inline { slot: usize },
    /// In bulk chunks: how many are still to be consumed, bytes copied out and their CRC so far.
    Bulk {
        chunks_left: usize,
        copied: usize,
        crc: u32,
    },
}

/// The message being sent.
struct Outgoing {
    tag: u32,
    len: usize,
    announced: bool,
    offset: usize,
}

/// Everything a link's halves and its heartbeat share, behind one lock.
struct Engine {
    peer: String,
    max_payload: u32,
    chunk: usize,
    cq: CompletionQueue,
    ctrl: QueuePair,
    bulk: QueuePair,
    ctrl_rx: MemoryRegion,
    ctrl_tx: MemoryRegion,
    bulk_rx: MemoryRegion,
    bulk_tx: MemoryRegion,
    // Control, sending.
    tx_seq: u64,
    peer_ctrl_posted: u64,
    ctrl_tx_next: usize,
    ctrl_tx_inflight: usize,
    last_sent: Instant,
    // Control, receiving.
    rx_seq: u64,
    ctrl_posted: u64,
    ctrl_posted_told: u64,
    // Bulk, receiving.
    bulk_plan: VecDeque<usize>,
    bulk_rx_ring: FrameRing,
    bulk_posted_fifo: VecDeque<(usize, usize)>,
    bulk_arrived: VecDeque<(usize, usize)>,
    bulk_posted: u64,
    bulk_posted_told: u64,
    bulk_received: u64,
    peer_bulk_sent: u64,
    behind_since: Option<Instant>,
    // Bulk, sending.
    bulk_tx_ring: FrameRing,
    bulk_sent: u64,
    peer_bulk_posted: u64,
    // Messages.
    incoming: VecDeque<Incoming>,
    out: Option<Outgoing>,
    peer_closed: bool,
    last_heard: Instant,
    last_progress: Instant,
    gone_since: Option<Instant>,
    last_liveness: Instant,
    broken: Option<String>,
    /// Test hook: the next bulk chunk is sent one frame longer than announced.
    #[cfg(test)]
    skew_next_chunk: bool,
    _dev: Arc<Device>,
}

impl Engine {
    fn new(p: Pending, info: &PeerInfo, chunk: usize, peer: String, max_payload: u32) -> Engine {
        let now = Instant::now();
        Engine {
            peer,
            max_payload,
            chunk,
            cq: p.cq,
            ctrl: p.ctrl,
            bulk: p.bulk,
            ctrl_rx: p.ctrl_rx,
            ctrl_tx: p.ctrl_tx,
            bulk_rx: p.bulk_rx,
            bulk_tx: p.bulk_tx,
            tx_seq: 0,
            peer_ctrl_posted: info.ctrl_posted as u64,
            ctrl_tx_next: 0,
            ctrl_tx_inflight: 0,
            last_sent: now,
            rx_seq: 0,
            ctrl_posted: CTRL_RECV as u64,
            ctrl_posted_told: CTRL_RECV as u64,
            bulk_plan: VecDeque::new(),
            bulk_rx_ring: FrameRing::new(BULK_RING),
            bulk_posted_fifo: VecDeque::new(),
            bulk_arrived: VecDeque::new(),
            bulk_posted: 0,
            bulk_posted_told: 0,
            bulk_received: 0,
            peer_bulk_sent: 0,
            behind_since: None,
            bulk_tx_ring: FrameRing::new(BULK_RING),
            bulk_sent: 0,
            peer_bulk_posted: 0,
            incoming: VecDeque::new(),
            out: None,
            peer_closed: false,
            last_heard: now,
            last_progress: now,
            gone_since: None,
            last_liveness: now,
            broken: None,
            #[cfg(test)]
            skew_next_chunk: false,
            _dev: p.dev,
        }
    }

    fn violation(&self, detail: String) -> Error {
        Error::ProtocolViolation {
            peer: self.peer.clone(),
            detail,
        }
    }

    fn verb(&self, op: &'static str, e: rdma_sys::Error) -> Error {
        Error::Io {
            op,
            peer: self.peer.clone(),
            error: std::io::Error::other(e.to_string()),
        }
    }

    /// Sends one packet, then waits for one from the peer: the two devices reach each other.
    fn probe(&mut self, deadline: Deadline) -> std::result::Result<(), String> {
        let mut sent = false;
        loop {
            if let Err(e) = self.progress() {
                return Err(format!("RDMA probe failed: {e}"));
            }
            if !sent {
                sent = self.try_control(Kind::Heartbeat, false).unwrap_or(false);
            }
            if sent && self.rx_seq > 0 {
                return Ok(());
            }
            if deadline.expired() {
                return Err(format!(
                    "RDMA queue pairs connected but no packet crossed within {PROBE_TIMEOUT:?}: \
                     the two devices are not on one RDMA fabric"
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Control credits free at the peer; a message leaves [`CTRL_RESERVE`] of them untouched.
    fn ctrl_credits(&self) -> u64 {
        self.peer_ctrl_posted.saturating_sub(self.tx_seq)
    }

    /// Sends a control packet of `kind` with `payload` inline, if credit and a send slot allow.
    fn send_packet(&mut self, mut p: Packet, payload: &[u8]) -> Result<bool> {
        let needed = if p.kind == Kind::Data {
            CTRL_RESERVE as u64 + 1
        } else {
            1
        };
        if self.ctrl_credits() < needed || self.ctrl_tx_inflight >= CTRL_SEND {
            return Ok(false);
        }
        let slot = self.ctrl_tx_next;
        p.seq = self.tx_seq;
        p.ctrl_posted = self.ctrl_posted;
        p.bulk_posted = self.bulk_posted;
        p.bulk_sent = self.bulk_sent;
        p.inline_len = payload.len() as u32;
        let base = slot * FRAME;
        let buf = &mut self.ctrl_tx.bytes_mut()[base..base + FRAME];
        p.encode(buf);
        buf[HEADER..HEADER + payload.len()].copy_from_slice(payload);
        let len = HEADER + payload.len();
        self.post_ctrl(slot, len)?;
        self.tx_seq += 1;
        self.ctrl_posted_told = self.ctrl_posted;
        self.bulk_posted_told = self.bulk_posted;
        self.last_sent = Instant::now();
        Ok(true)
    }

    fn post_ctrl(&mut self, slot: usize, len: usize) -> Result<()> {
        let base = slot * FRAME;
        self.ctrl
            .post_send(WR_CTRL_TX | slot as u64, &self.ctrl_tx, base..base + len)
            .map_err(|e| self.verb("post control send", e))?;
        self.ctrl_tx_next = (slot + 1) % CTRL_SEND;
        self.ctrl_tx_inflight += 1;
        Ok(())
    }

    /// Sends a packet carrying no message (credit, heartbeat, close) if credit allows;
    /// `only_if_due`: a heartbeat only after [`HEARTBEAT_EVERY`] of quiet.
    fn try_control(&mut self, kind: Kind, only_if_due: bool) -> Result<bool> {
        if only_if_due && self.last_sent.elapsed() < HEARTBEAT_EVERY {
            return Ok(false);
        }
        self.send_packet(Packet::new(kind), &[])
    }

    /// Polls completions, handles what arrived, posts bulk receives and tells the peer of new
    /// receives when it matters. Any error breaks the link.
    fn progress(&mut self) -> Result<()> {
        if let Some(cause) = &self.broken {
            return Err(Error::Broken {
                peer: self.peer.clone(),
                cause: cause.clone(),
            });
        }
        let result = self.progress_inner();
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
        }
        result
    }

    fn progress_inner(&mut self) -> Result<()> {
        let now = Instant::now();
        if now.duration_since(self.last_progress) > SILENCE / 2 {
            // This side did not look for a while (a stalled process): do not blame the peer.
            self.last_heard = now;
        }
        self.last_progress = now;
        let mut wc = [ibv_wc::default(); 32];
        for _ in 0..8 {
            let n = self
                .cq
                .poll(&mut wc)
                .map_err(|e| self.verb("poll completions", e))?;
            for w in &wc[..n] {
                self.complete(w)?;
            }
            if n < wc.len() {
                break;
            }
        }
        self.post_bulk_receives()?;
        let bulk_news = self.bulk_posted > self.bulk_posted_told;
        let ctrl_news = self.ctrl_posted - self.ctrl_posted_told >= (CTRL_WINDOW / 4) as u64;
        if bulk_news || ctrl_news {
            self.try_control(Kind::Credit, false)?;
        }
        Ok(())
    }

    fn complete(&mut self, w: &ibv_wc) -> Result<()> {
        let index = (w.wr_id & !WR_KIND) as usize;
        match w.wr_id & WR_KIND {
            WR_CTRL_TX => {
                self.ctrl.completed(1, 0);
                self.ctrl_tx_inflight = self.ctrl_tx_inflight.saturating_sub(1);
            }
            WR_BULK_TX => {
                self.bulk.completed(1, 0);
                self.bulk_tx_ring.free_front();
            }
            WR_CTRL_RX => {
                self.ctrl.completed(0, 1);
                self.ctrl_packet(index, w.byte_len as usize)?;
            }
            WR_BULK_RX => {
                self.bulk.completed(0, 1);
                let Some((off, len)) = self.bulk_posted_fifo.pop_front() else {
                    return Err(
                        self.violation("a bulk chunk arrived with no receive posted".into())
                    );
                };
                if off != index || w.byte_len as usize != len {
                    return Err(self.violation(format!(
                        "a bulk chunk of {} bytes arrived where {len} were due",
                        w.byte_len
                    )));
                }
                self.bulk_arrived.push_back((off, len));
                self.bulk_received += 1;
                self.behind_since = None;
                self.last_heard = Instant::now();
            }
            other => {
                return Err(self.violation(format!("unknown work request id {other:#x}")));
            }
        }
        Ok(())
    }

    fn ctrl_packet(&mut self, slot: usize, len: usize) -> Result<()> {
        if slot >= CTRL_RECV || len > FRAME {
            return Err(self.violation(format!("control completion for slot {slot}, {len} B")));
        }
        let bytes = &self.ctrl_rx.bytes()[slot * FRAME..slot * FRAME + len];
        let p = Packet::decode(bytes)
            .map_err(|e| self.violation(format!("control packet refused: {e}")))?;
        if p.seq != self.rx_seq {
            return Err(self.violation(format!(
                "control packet {} arrived where {} was due: a packet was lost on the fabric \
                 (UC does not retransmit; a send into a receive of another frame count is dropped)",
                p.seq, self.rx_seq
            )));
        }
        if p.ctrl_posted < self.peer_ctrl_posted
            || p.bulk_posted < self.peer_bulk_posted
            || p.bulk_sent < self.peer_bulk_sent
        {
            return Err(self.violation("the peer's counters went backwards".into()));
        }
        if p.bulk_posted > self.bulk_sent + self.bulk_tx_plan_bound() {
            return Err(
                self.violation("the peer posted bulk receives for chunks never announced".into())
            );
        }
        self.rx_seq += 1;
        self.peer_ctrl_posted = p.ctrl_posted;
        self.peer_bulk_posted = p.bulk_posted;
        self.peer_bulk_sent = p.bulk_sent;
        self.last_heard = Instant::now();
        match p.kind {
            Kind::Data => {
                let len = p.msg_len as usize;
                if len > self.max_payload as usize {
                    return Err(self.violation(format!(
                        "a message of {len} bytes exceeds the negotiated maximum {}",
                        self.max_payload
                    )));
                }
                if self.peer_closed {
                    return Err(self.violation("a message after the close".into()));
                }
                if len <= INLINE_MAX {
                    if p.inline_len as usize != len {
                        return Err(self.violation(format!(
                            "a {len}-byte message carried {} bytes inline",
                            p.inline_len
                        )));
                    }
                    self.incoming.push_back(Incoming {
                        tag: p.tag,
                        len,
                        crc: p.payload_crc,
                        body: Body::Inline { slot },
                    });
                    // The slot holds the payload until the message is taken.
                    return Ok(());
                }
                if p.inline_len != 0 {
                    return Err(self.violation("a bulk announcement carried payload".into()));
                }
                let n = len.div_ceil(self.chunk);
                for i in 0..n {
                    self.bulk_plan
                        .push_back(self.chunk.min(len - i * self.chunk));
                }
                self.incoming.push_back(Incoming {
                    tag: p.tag,
                    len,
                    crc: p.payload_crc,
                    body: Body::Bulk {
                        chunks_left: n,
                        copied: 0,
                        crc: 0,
                    },
                });
            }
            Kind::Close => self.peer_closed = true,
            Kind::Credit | Kind::Heartbeat => {}
        }
        self.repost_ctrl(slot)
    }

    /// An upper bound of bulk chunks this side may still owe for messages it has announced.
    fn bulk_tx_plan_bound(&self) -> u64 {
        self.out
            .as_ref()
            .map_or(0, |o| o.len.div_ceil(self.chunk) as u64)
    }

    fn repost_ctrl(&mut self, slot: usize) -> Result<()> {
        self.ctrl
            .post_recv(
                WR_CTRL_RX | slot as u64,
                &self.ctrl_rx,
                slot * FRAME..(slot + 1) * FRAME,
            )
            .map_err(|e| self.verb("post control receive", e))?;
        self.ctrl_posted += 1;
        Ok(())
    }

    fn post_bulk_receives(&mut self) -> Result<()> {
        while let Some(&len) = self.bulk_plan.front() {
            let Some(off) = self.bulk_rx_ring.alloc(len) else {
                break;
            };
            self.bulk
                .post_recv(WR_BULK_RX | off as u64, &self.bulk_rx, off..off + len)
                .map_err(|e| self.verb("post bulk receive", e))?;
            self.bulk_plan.pop_front();
            self.bulk_posted_fifo.push_back((off, len));
            self.bulk_posted += 1;
        }
        Ok(())
    }

    /// Whether the peer is alive, checked at most every few milliseconds. `Err` when its TCP
    /// connection closed (after [`CLOSE_GRACE`] for a close packet in flight), when it has been
    /// silent for [`SILENCE`], or when a bulk chunk it sent is overdue by [`LOSS_GRACE`]; such
    /// an error breaks the link.
    fn liveness(&mut self, bootstrap: &TcpStream) -> Result<()> {
        let result = self.liveness_inner(bootstrap);
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
        }
        result
    }

    fn liveness_inner(&mut self, bootstrap: &TcpStream) -> Result<()> {
        let now = Instant::now();
        if now.duration_since(self.last_liveness) < Duration::from_millis(2) {
            return Ok(());
        }
        self.last_liveness = now;
        if self.peer_bulk_sent > self.bulk_received {
            let since = *self.behind_since.get_or_insert(now);
            if now.duration_since(since) > LOSS_GRACE {
                return Err(self.violation(format!(
                    "bulk chunks lost: the peer sent {}, {} arrived (UC drops a send into a \
                     receive of another frame count, and any packet the fabric loses)",
                    self.peer_bulk_sent, self.bulk_received
                )));
            }
        }
        if now.duration_since(self.last_heard) > SILENCE {
            return Err(Error::PeerGone {
                peer: self.peer.clone(),
                detail: format!(
                    "silent for {SILENCE:?}: no packet or heartbeat (a dead or hung node \
                     produces no RDMA error)"
                ),
            });
        }
        if !self.peer_closed && peer_gone(bootstrap) {
            let since = *self.gone_since.get_or_insert(now);
            if now.duration_since(since) > CLOSE_GRACE {
                return Err(Error::PeerGone {
                    peer: self.peer.clone(),
                    detail: "the peer process is gone (its link connection closed)".into(),
                });
            }
        }
        Ok(())
    }

    /// Moves the message in progress (starting it if none is) as far as credit allows.
    fn try_send(&mut self, tag: u32, payload: &[u8]) -> Result<bool> {
        self.progress()?;
        let out = self.out.get_or_insert(Outgoing {
            tag,
            len: payload.len(),
            announced: false,
            offset: 0,
        });
        if out.tag != tag || out.len != payload.len() {
            return Err(Error::ProtocolViolation {
                peer: self.peer.clone(),
                detail: "try_send called with another message while one is in progress".into(),
            });
        }
        let announced = out.announced;
        if !announced {
            let mut p = Packet::new(Kind::Data);
            p.tag = tag;
            p.msg_len = payload.len() as u32;
            p.payload_crc = crc32c::crc32c(payload);
            let inline = if payload.len() <= INLINE_MAX {
                payload
            } else {
                &[][..]
            };
            if !self.send_packet(p, inline)? {
                return Ok(false);
            }
            if payload.len() <= INLINE_MAX {
                self.out = None;
                return Ok(true);
            }
            if let Some(out) = self.out.as_mut() {
                out.announced = true;
            }
        }
        loop {
            let offset = self.out.as_ref().map_or(0, |o| o.offset);
            if offset == payload.len() {
                self.out = None;
                return Ok(true);
            }
            if self.bulk_sent >= self.peer_bulk_posted {
                return Ok(false);
            }
            let len = self.chunk.min(payload.len() - offset);
            #[cfg(test)]
            let wire_len = if std::mem::take(&mut self.skew_next_chunk) {
                len + FRAME
            } else {
                len
            };
            #[cfg(not(test))]
            let wire_len = len;
            let Some(at) = self.bulk_tx_ring.alloc(wire_len) else {
                return Ok(false);
            };
            self.bulk_tx.bytes_mut()[at..at + len].copy_from_slice(&payload[offset..offset + len]);
            self.bulk
                .post_send(WR_BULK_TX | at as u64, &self.bulk_tx, at..at + wire_len)
                .map_err(|e| self.verb("post bulk send", e))?;
            self.bulk_sent += 1;
            if let Some(out) = self.out.as_mut() {
                out.offset += len;
            }
        }
    }

    /// Moves the next message into `buf` as far as it has arrived.
    fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Message>> {
        self.progress()?;
        let Some(front) = self.incoming.front_mut() else {
            if self.peer_closed {
                self.broken = Some("the peer closed the link".into());
                return Err(Error::Closed {
                    peer: self.peer.clone(),
                });
            }
            return Ok(None);
        };
        let (tag, len, want_crc) = (front.tag, front.len, front.crc);
        let fresh = match front.body {
            Body::Inline { .. } => true,
            Body::Bulk { copied, .. } => copied == 0,
        };
        if fresh && len > buf.len() {
            return Err(Error::BufferTooSmall {
                needed: len,
                capacity: buf.len(),
            });
        }
        let done = match &mut front.body {
            Body::Inline { slot } => {
                let slot = *slot;
                let base = slot * FRAME + HEADER;
                buf[..len].copy_from_slice(&self.ctrl_rx.bytes()[base..base + len]);
                if crc32c::crc32c(&buf[..len]) != want_crc {
                    return Err(self.violation("a message's payload checksum mismatches".into()));
                }
                self.incoming.pop_front();
                self.repost_ctrl(slot)?;
                true
            }
            Body::Bulk {
                chunks_left,
                copied,
                crc,
            } => {
                while *chunks_left > 0 {
                    let Some((off, n)) = self.bulk_arrived.pop_front() else {
                        break;
                    };
                    let chunk = &self.bulk_rx.bytes()[off..off + n];
                    buf[*copied..*copied + n].copy_from_slice(chunk);
                    *crc = crc32c::crc32c_append(*crc, chunk);
                    *copied += n;
                    *chunks_left -= 1;
                    self.bulk_rx_ring.free_front();
                }
                if *chunks_left > 0 {
                    if self.peer_closed && self.peer_bulk_sent <= self.bulk_received {
                        // The close came after every chunk the peer sent: the rest never will.
                        self.broken = Some("the peer closed the link mid-message".into());
                        return Err(Error::PeerGone {
                            peer: self.peer.clone(),
                            detail: format!(
                                "the peer closed the link after {copied} of {len} bytes of a message"
                            ),
                        });
                    }
                    false
                } else if *copied != len || *crc != want_crc {
                    return Err(self.violation(
                        "a message's payload checksum mismatches (a chunk was lost or misplaced)"
                            .into(),
                    ));
                } else {
                    self.incoming.pop_front();
                    true
                }
            }
        };
        // Freed ring space lets more chunks be posted at once.
        self.post_bulk_receives()?;
        Ok(done.then_some(Message { tag, len }))
    }

    /// Whether a message is partly copied out (a timeout then would lose it).
    fn mid_message(&self) -> bool {
        matches!(
            self.incoming.front(),
            Some(Incoming {
                body: Body::Bulk { copied: 1.., .. },
                ..
            })
        )
    }
}

/// What the halves and the heartbeat thread share.
struct Shared {
    engine: Mutex<Engine>,
    bootstrap: Arc<TcpStream>,
    peer: String,
    wait: WaitStrategy,
    abandoned: AtomicBool,
    silent: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `step` until it yields, the deadline passes or it fails; liveness is checked while
    /// it makes no progress.
    fn drive<T>(
        &self,
        op: &'static str,
        deadline: Deadline,
        mut step: impl FnMut(&mut Engine) -> Result<Option<T>>,
    ) -> Result<T> {
        let waiter = Waiter::new(self.wait);
        loop {
            {
                let mut e = self.lock();
                if let Some(v) = step(&mut e)? {
                    return Ok(v);
                }
                e.liveness(&self.bootstrap)?;
            }
            if deadline.expired() {
                return Err(Error::Timeout {
                    op,
                    waited: waiter.waited(),
                    peer: self.peer.clone(),
                });
            }
            if waiter.should_block() {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = self.bootstrap.shutdown(std::net::Shutdown::Both);
    }
}

/// Every link's heartbeat: progress (so credit flows while the application is busy elsewhere)
/// and a heartbeat packet after [`HEARTBEAT_EVERY`] of quiet. Ends with the link.
fn spawn_heartbeat(shared: Weak<Shared>) {
    let _ = std::thread::Builder::new()
        .name("sinew-rdma-heartbeat".into())
        .spawn(move || {
            loop {
                std::thread::sleep(HEARTBEAT_EVERY / 4);
                let Some(s) = shared.upgrade() else { return };
                if s.abandoned.load(Ordering::Relaxed) {
                    return;
                }
                if s.silent.load(Ordering::Relaxed) {
                    continue;
                }
                let mut e = s.lock();
                if e.progress().is_ok() {
                    let _ = e.try_control(Kind::Heartbeat, true);
                }
            }
        });
}

/// The RDMA backend's sending half.
pub struct RdmaSender {
    shared: Arc<Shared>,
}

/// The RDMA backend's receiving half.
pub struct RdmaReceiver {
    shared: Arc<Shared>,
}

impl SendHalf for RdmaSender {
    fn send(&mut self, tag: u32, payload: &[u8], deadline: Deadline) -> Result<()> {
        check_len(payload.len(), self.shared.lock().max_payload)?;
        let result = self.shared.drive("rdma send", deadline, |e| {
            Ok(e.try_send(tag, payload)?.then_some(()))
        });
        if let Err(Error::Timeout { .. }) = &result {
            let mut e = self.shared.lock();
            if e.out.as_ref().is_some_and(|o| o.announced) {
                // The peer has the announcement and maybe some chunks: the stream is torn.
                e.broken = Some("a send timed out mid-message".into());
            } else {
                e.out = None;
            }
        }
        result
    }

    fn try_send(&mut self, tag: u32, payload: &[u8]) -> Result<bool> {
        let mut e = self.shared.lock();
        check_len(payload.len(), e.max_payload)?;
        let done = e.try_send(tag, payload)?;
        if !done {
            e.liveness(&self.shared.bootstrap)?;
        }
        Ok(done)
    }

    #[cfg(test)]
    fn inject_raw(&mut self, bytes: &[u8], deadline: Deadline) -> Result<()> {
        self.shared.drive("rdma inject", deadline, |e| {
            if e.ctrl_credits() == 0 || e.ctrl_tx_inflight >= CTRL_SEND {
                e.progress()?;
                return Ok(None);
            }
            let slot = e.ctrl_tx_next;
            let n = bytes.len().min(FRAME);
            e.ctrl_tx.bytes_mut()[slot * FRAME..slot * FRAME + n].copy_from_slice(&bytes[..n]);
            e.post_ctrl(slot, n)?;
            e.tx_seq += 1;
            Ok(Some(()))
        })
    }

    #[cfg(test)]
    fn abandon(&mut self) {
        self.shared.abandoned.store(true, Ordering::Relaxed);
        let _ = self.shared.bootstrap.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for RdmaSender {
    fn drop(&mut self) {
        if self.shared.abandoned.load(Ordering::Relaxed) {
            return;
        }
        // An orderly close: tell the peer, briefly waiting for credit if none is free.
        let _ = self.shared.drive(
            "rdma close",
            Deadline::after(Duration::from_millis(100)),
            |e| Ok(e.try_control(Kind::Close, false)?.then_some(())),
        );
    }
}

impl RecvHalf for RdmaReceiver {
    fn recv(&mut self, buf: &mut [u8], deadline: Deadline) -> Result<Message> {
        let result = self
            .shared
            .drive("rdma recv", deadline, |e| e.try_recv(buf));
        if let Err(Error::Timeout { .. }) = &result {
            let mut e = self.shared.lock();
            if e.mid_message() {
                e.broken = Some("a receive timed out mid-message".into());
            }
        }
        result
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Message>> {
        let mut e = self.shared.lock();
        let got = e.try_recv(buf)?;
        if got.is_none() {
            e.liveness(&self.shared.bootstrap)?;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests;
