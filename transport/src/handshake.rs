//! The link handshake, sans-IO: version negotiation, capabilities and mutual authentication.
//!
//! ```text
//! client                                   server
//!   ClientHello {versions, node, nonce_c, max payload, capabilities}  →
//!   ←  ServerHello {versions, node, nonce_s, max payload, capabilities, proof_s}
//!   ClientProof {proof_c}  →
//!   ←  Accept                                 (or Refuse {reason} from either side, at any step)
//! ```
//! `proof_s = HMAC-SHA256(key, "sinew server proof" ‖ ClientHello ‖ ServerHello-without-proof)`,
//! `proof_c` likewise with the client label. Both nonces and both capability lists are bound into
//! both proofs, each side checks the other's proof in constant time, and the key itself never
//! travels. The machine consumes whole frames and queues whole frames to send; a driver (see
//! [`crate::tcp`]) moves them and enforces the deadline.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::frame::{FrameError, FrameHeader, FrameKind, encode_frame};
use crate::key::ClusterKey;

/// The newest link protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest link protocol version this build speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The largest handshake frame payload accepted before negotiation.
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 64 * 1024;
/// Length of a nonce and of a proof.
pub const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;
const MAX_CAPABILITIES: usize = 16;
const MAX_DETAIL: usize = 1024;

const SERVER_LABEL: &[u8] = b"sinew server proof";
const CLIENT_LABEL: &[u8] = b"sinew client proof";

/// A transport backend, as offered in the handshake. An integer newtype so that a peer offering a
/// backend this build does not know is not an error: it is simply not shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransportKind(pub u8);

impl TransportKind {
    /// TCP over sockets.
    pub const TCP: TransportKind = TransportKind(0);
    /// io_uring over sockets.
    pub const URING: TransportKind = TransportKind(1);
    /// Shared memory (same host).
    pub const SHM: TransportKind = TransportKind(2);
    /// RDMA verbs.
    pub const RDMA: TransportKind = TransportKind(3);

    /// The backend's name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::TCP => "tcp",
            Self::URING => "uring",
            Self::SHM => "shm",
            Self::RDMA => "rdma",
            _ => "unknown",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            "unknown" => write!(f, "transport#{}", self.0),
            n => f.write_str(n),
        }
    }
}

/// One backend a side offers, with an opaque blob for that backend (e.g. RDMA queue-pair info).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    /// The backend.
    pub transport: TransportKind,
    /// Backend-specific data, at most 65,535 bytes.
    pub blob: Vec<u8>,
}

/// Which side of a link found a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// This process.
    Local,
    /// The peer, which told us so.
    Peer,
}

/// Why a side refuses a handshake; sent to the peer before closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefuseReason(pub u8);

impl RefuseReason {
    /// The other side's proof did not verify.
    pub const WRONG_KEY: RefuseReason = RefuseReason(1);
    /// No protocol version in common.
    pub const INCOMPATIBLE_VERSION: RefuseReason = RefuseReason(2);
    /// A message could not be decoded or came out of order.
    pub const PROTOCOL_VIOLATION: RefuseReason = RefuseReason(3);
    /// The handshake did not finish in time.
    pub const TIMEOUT: RefuseReason = RefuseReason(4);
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::WRONG_KEY => f.write_str("wrong cluster key"),
            Self::INCOMPATIBLE_VERSION => f.write_str("incompatible protocol version"),
            Self::PROTOCOL_VIOLATION => f.write_str("protocol violation"),
            Self::TIMEOUT => f.write_str("handshake timed out"),
            RefuseReason(n) => write!(f, "reason #{n}"),
        }
    }
}

/// Why a handshake failed. Each case a user can cause is its own variant.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The two sides hold different cluster keys.
    #[error("{}", match detected_by {
        Side::Local => "wrong cluster key: the peer could not prove it holds our cluster key",
        Side::Peer => "wrong cluster key: the peer refused our proof (the cluster keys differ)",
    })]
    WrongKey {
        /// Which side's check failed.
        detected_by: Side,
    },
    /// No protocol version in common.
    #[error("incompatible protocol version: we speak {}..={}, the peer {}..={}", ours.0, ours.1, theirs.0, theirs.1)]
    IncompatibleVersion {
        /// Our supported range.
        ours: (u16, u16),
        /// The peer's supported range.
        theirs: (u16, u16),
    },
    /// The peer sent bytes that are not a sinew handshake (another protocol, noise, a bad frame).
    #[error("peer is not speaking the sinew protocol: {0}")]
    Garbage(String),
    /// A well-formed message arrived out of order.
    #[error("handshake protocol violation: {0}")]
    ProtocolViolation(String),
    /// The peer refused for another reason.
    #[error("peer refused the handshake: {reason}: {detail}")]
    Refused {
        /// The reason code.
        reason: RefuseReason,
        /// The peer's explanation.
        detail: String,
    },
    /// The peer stalled: the handshake did not finish before its deadline.
    #[error("handshake timed out after {after:?} while {stage}: the peer stalled")]
    Timeout {
        /// What we were waiting for.
        stage: &'static str,
        /// The handshake deadline.
        after: Duration,
    },
    /// The peer closed the connection before the handshake finished.
    #[error("peer closed the connection during the handshake while {stage}")]
    Truncated {
        /// What we were waiting for.
        stage: &'static str,
    },
    /// The socket failed.
    #[error("i/o error during the handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The random source failed.
    #[error("random source failed: {0}")]
    Random(String),
}

/// Parameters of one side of a handshake.
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    /// The pre-shared cluster key.
    pub key: ClusterKey,
    /// This node's id.
    pub node_id: u64,
    /// Backends offered, best first.
    pub capabilities: Vec<Capability>,
    /// The largest data payload this side accepts.
    pub max_payload: u32,
    /// Protocol versions spoken, inclusive.
    pub versions: (u16, u16),
}

impl HandshakeConfig {
    /// A config speaking this build's protocol versions and offering TCP.
    pub fn new(key: ClusterKey, node_id: u64, max_payload: u32) -> Self {
        HandshakeConfig {
            key,
            node_id,
            capabilities: vec![Capability {
                transport: TransportKind::TCP,
                blob: Vec::new(),
            }],
            max_payload,
            versions: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
        }
    }
}

/// What a finished handshake established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Established {
    /// The protocol version both speak (the highest in common).
    pub version: u16,
    /// The peer's node id.
    pub peer_node_id: u64,
    /// The peer's offered backends.
    pub peer_capabilities: Vec<Capability>,
    /// The negotiated maximum payload: the smaller of the two sides' limits.
    pub max_payload: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Hello {
    versions: (u16, u16),
    node_id: u64,
    nonce: [u8; NONCE_LEN],
    max_payload: u32,
    capabilities: Vec<Capability>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Message {
    ClientHello(Hello),
    ServerHello(Hello, [u8; PROOF_LEN]),
    ClientProof([u8; PROOF_LEN]),
    Accept,
    Refuse {
        reason: RefuseReason,
        versions: (u16, u16),
        detail: String,
    },
}

const MSG_CLIENT_HELLO: u8 = 1;
const MSG_SERVER_HELLO: u8 = 2;
const MSG_CLIENT_PROOF: u8 = 3;
const MSG_ACCEPT: u8 = 4;
const MSG_REFUSE: u8 = 5;

impl Hello {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u16(self.versions.0);
        out.put_u16(self.versions.1);
        out.put_u64(self.node_id);
        out.extend_from_slice(&self.nonce);
        out.put_u32(self.max_payload);
        out.put_u8(self.capabilities.len() as u8);
        for c in &self.capabilities {
            out.put_u8(c.transport.0);
            out.put_u16(c.blob.len() as u16);
            out.extend_from_slice(&c.blob);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let versions = (r.u16("min version")?, r.u16("max version")?);
        let node_id = r.u64("node id")?;
        let nonce = r.array("nonce")?;
        let max_payload = r.u32("max payload")?;
        let n = r.u8("capability count")? as usize;
        if n > MAX_CAPABILITIES {
            return Err(DecodeError::InvalidValue {
                field: "capability count",
                value: n.to_string(),
            });
        }
        let mut capabilities = Vec::with_capacity(n);
        for _ in 0..n {
            let transport = TransportKind(r.u8("transport")?);
            let len = r.u16("capability blob length")? as usize;
            let blob = r.bytes(len, "capability blob")?.to_vec();
            capabilities.push(Capability { transport, blob });
        }
        Ok(Hello {
            versions,
            node_id,
            nonce,
            max_payload,
            capabilities,
        })
    }
}

impl Message {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        match self {
            Message::ClientHello(h) => {
                out.put_u8(MSG_CLIENT_HELLO);
                h.encode(&mut out);
            }
            Message::ServerHello(h, proof) => {
                out.put_u8(MSG_SERVER_HELLO);
                h.encode(&mut out);
                out.extend_from_slice(proof);
            }
            Message::ClientProof(proof) => {
                out.put_u8(MSG_CLIENT_PROOF);
                out.extend_from_slice(proof);
            }
            Message::Accept => out.put_u8(MSG_ACCEPT),
            Message::Refuse {
                reason,
                versions,
                detail,
            } => {
                out.put_u8(MSG_REFUSE);
                out.put_u8(reason.0);
                out.put_u16(versions.0);
                out.put_u16(versions.1);
                let mut end = detail.len().min(MAX_DETAIL);
                while !detail.is_char_boundary(end) {
                    end -= 1;
                }
                out.put_u16(end as u16);
                out.extend_from_slice(&detail.as_bytes()[..end]);
            }
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let msg = match r.u8("message type")? {
            MSG_CLIENT_HELLO => Message::ClientHello(Hello::decode(&mut r)?),
            MSG_SERVER_HELLO => {
                let h = Hello::decode(&mut r)?;
                Message::ServerHello(h, r.array("server proof")?)
            }
            MSG_CLIENT_PROOF => Message::ClientProof(r.array("client proof")?),
            MSG_ACCEPT => Message::Accept,
            MSG_REFUSE => {
                let reason = RefuseReason(r.u8("refuse reason")?);
                let versions = (r.u16("min version")?, r.u16("max version")?);
                let len = r.u16("detail length")? as usize;
                let detail = String::from_utf8_lossy(r.bytes(len, "detail")?).into_owned();
                Message::Refuse {
                    reason,
                    versions,
                    detail,
                }
            }
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "message type",
                    value: other.to_string(),
                });
            }
        };
        r.finish()?;
        Ok(msg)
    }

    fn name(&self) -> &'static str {
        match self {
            Message::ClientHello(_) => "ClientHello",
            Message::ServerHello(..) => "ServerHello",
            Message::ClientProof(_) => "ClientProof",
            Message::Accept => "Accept",
            Message::Refuse { .. } => "Refuse",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientAwaitServerHello,
    ClientAwaitAccept,
    ServerAwaitClientHello,
    ServerAwaitProof,
    Done,
    Failed,
}

/// One side of a handshake in progress.
pub struct Handshake {
    config: HandshakeConfig,
    state: State,
    nonce: [u8; NONCE_LEN],
    /// Encoded ClientHello, as sent or received: part of the transcript.
    client_hello: Vec<u8>,
    /// Encoded ServerHello without its proof: part of the transcript.
    server_hello: Vec<u8>,
    peer: Option<Hello>,
    outgoing: VecDeque<Vec<u8>>,
    send_seq: u64,
    recv_seq: u64,
    established: Option<Established>,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    fn new(config: HandshakeConfig, state: State) -> Result<Self, HandshakeError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| HandshakeError::Random(e.to_string()))?;
        Ok(Handshake {
            config,
            state,
            nonce,
            client_hello: Vec::new(),
            server_hello: Vec::new(),
            peer: None,
            outgoing: VecDeque::new(),
            send_seq: 0,
            recv_seq: 0,
            established: None,
        })
    }

    /// Starts the connecting side; its ClientHello is queued at once.
    ///
    /// # Errors
    /// [`HandshakeError::Random`] when no nonce can be drawn.
    pub fn client(config: HandshakeConfig) -> Result<Self, HandshakeError> {
        let mut hs = Handshake::new(config, State::ClientAwaitServerHello)?;
        let hello = Message::ClientHello(hs.local_hello()).encode();
        hs.client_hello = hello.clone();
        hs.queue_encoded(hello);
        Ok(hs)
    }

    /// Starts the accepting side; it waits for the ClientHello.
    ///
    /// # Errors
    /// [`HandshakeError::Random`] when no nonce can be drawn.
    pub fn server(config: HandshakeConfig) -> Result<Self, HandshakeError> {
        Handshake::new(config, State::ServerAwaitClientHello)
    }

    /// The next frame to send, if any. Drain this after every call, including failed ones: a
    /// refusal is queued for the peer before an error is returned.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.outgoing.pop_front()
    }

    /// The outcome, once both sides are authenticated.
    pub fn established(&self) -> Option<&Established> {
        self.established.as_ref()
    }

    /// Whether the handshake needs another frame from the peer.
    pub fn wants_input(&self) -> bool {
        !matches!(self.state, State::Done | State::Failed)
    }

    /// What this side is waiting for, for error messages.
    pub fn stage(&self) -> &'static str {
        match self.state {
            State::ClientAwaitServerHello => "waiting for the server's hello",
            State::ClientAwaitAccept => "waiting for the server to accept our proof",
            State::ServerAwaitClientHello => "waiting for the client's hello",
            State::ServerAwaitProof => "waiting for the client's proof",
            State::Done => "done",
            State::Failed => "failed",
        }
    }

    /// Feeds one frame received from the peer.
    ///
    /// # Errors
    /// Any [`HandshakeError`]; the handshake is then failed and a refusal may be queued.
    pub fn handle_frame(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
    ) -> Result<(), HandshakeError> {
        if !self.wants_input() {
            return Err(HandshakeError::ProtocolViolation(format!(
                "frame received after the handshake {}",
                self.stage()
            )));
        }
        if header.kind != FrameKind::HANDSHAKE {
            return Err(self.violation(format!(
                "expected a handshake frame, got kind {}",
                header.kind.0
            )));
        }
        if header.seq != self.recv_seq {
            return Err(self.violation(format!(
                "handshake frame {} out of sequence (expected {})",
                header.seq, self.recv_seq
            )));
        }
        self.recv_seq += 1;
        if let Err(e) = header.verify_payload(payload) {
            return Err(self.garbage(e.to_string()));
        }
        let msg = match Message::decode(payload) {
            Ok(m) => m,
            Err(e) => return Err(self.garbage(format!("malformed handshake message: {e}"))),
        };
        match (self.state, msg) {
            (
                _,
                Message::Refuse {
                    reason,
                    versions,
                    detail,
                },
            ) => {
                self.state = State::Failed;
                Err(match reason {
                    RefuseReason::WRONG_KEY => HandshakeError::WrongKey {
                        detected_by: Side::Peer,
                    },
                    RefuseReason::INCOMPATIBLE_VERSION => HandshakeError::IncompatibleVersion {
                        ours: self.config.versions,
                        theirs: versions,
                    },
                    _ => HandshakeError::Refused { reason, detail },
                })
            }
            (State::ServerAwaitClientHello, Message::ClientHello(hello)) => {
                self.check_versions(hello.versions)?;
                self.client_hello = payload.to_vec();
                let mut server_hello = vec![MSG_SERVER_HELLO];
                self.local_hello().encode(&mut server_hello);
                self.server_hello = server_hello;
                let proof = self.proof(SERVER_LABEL);
                let mut frame = self.server_hello.clone();
                frame.extend_from_slice(&proof);
                self.queue_encoded(frame);
                self.peer = Some(hello);
                self.state = State::ServerAwaitProof;
                Ok(())
            }
            (State::ClientAwaitServerHello, Message::ServerHello(hello, proof)) => {
                self.check_versions(hello.versions)?;
                self.server_hello = payload[..payload.len() - PROOF_LEN].to_vec();
                self.verify(SERVER_LABEL, &proof)?;
                let mine = self.proof(CLIENT_LABEL);
                self.queue(&Message::ClientProof(mine));
                self.peer = Some(hello);
                self.state = State::ClientAwaitAccept;
                Ok(())
            }
            (State::ServerAwaitProof, Message::ClientProof(proof)) => {
                self.verify(CLIENT_LABEL, &proof)?;
                self.queue(&Message::Accept);
                self.finish();
                Ok(())
            }
            (State::ClientAwaitAccept, Message::Accept) => {
                self.finish();
                Ok(())
            }
            (_, msg) => {
                let name = msg.name();
                let stage = self.stage();
                Err(self.violation(format!("unexpected {name} while {stage}")))
            }
        }
    }

    /// Turns a frame that could not be decoded into the handshake error it means, queueing a
    /// refusal for the peer.
    pub fn frame_error(&mut self, err: FrameError) -> HandshakeError {
        match err {
            FrameError::UnsupportedVersion { found } => {
                self.refuse(
                    RefuseReason::INCOMPATIBLE_VERSION,
                    "unsupported wire version".into(),
                );
                HandshakeError::IncompatibleVersion {
                    ours: self.config.versions,
                    theirs: (u16::from(found), u16::from(found)),
                }
            }
            other => self.garbage(other.to_string()),
        }
    }

    /// Fails the handshake because its deadline passed, queueing a refusal for the peer.
    pub fn timed_out(&mut self, after: Duration) -> HandshakeError {
        let stage = self.stage();
        self.refuse(
            RefuseReason::TIMEOUT,
            format!("no progress within {after:?} while {stage}"),
        );
        HandshakeError::Timeout { stage, after }
    }

    fn local_hello(&self) -> Hello {
        Hello {
            versions: self.config.versions,
            node_id: self.config.node_id,
            nonce: self.nonce,
            max_payload: self.config.max_payload,
            capabilities: self
                .config
                .capabilities
                .iter()
                .take(MAX_CAPABILITIES)
                .cloned()
                .collect(),
        }
    }

    fn mac(&self, label: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(self.config.key.expose())
            .expect("HMAC accepts keys of any length");
        mac.update(label);
        mac.update(&(self.client_hello.len() as u64).to_le_bytes());
        mac.update(&self.client_hello);
        mac.update(&self.server_hello);
        mac
    }

    fn proof(&self, label: &[u8]) -> [u8; PROOF_LEN] {
        self.mac(label).finalize().into_bytes().into()
    }

    fn verify(&mut self, label: &[u8], proof: &[u8; PROOF_LEN]) -> Result<(), HandshakeError> {
        // `verify_slice` compares in constant time.
        if self.mac(label).verify_slice(proof).is_err() {
            self.refuse(RefuseReason::WRONG_KEY, "proof does not verify".into());
            return Err(HandshakeError::WrongKey {
                detected_by: Side::Local,
            });
        }
        Ok(())
    }

    fn check_versions(&mut self, theirs: (u16, u16)) -> Result<(), HandshakeError> {
        let ours = self.config.versions;
        if theirs.0 > theirs.1 || ours.1.min(theirs.1) < ours.0.max(theirs.0) {
            self.refuse(
                RefuseReason::INCOMPATIBLE_VERSION,
                format!("this side speaks {}..={}", ours.0, ours.1),
            );
            return Err(HandshakeError::IncompatibleVersion { ours, theirs });
        }
        Ok(())
    }

    fn finish(&mut self) {
        let peer = self
            .peer
            .take()
            .expect("peer hello recorded before finishing");
        self.established = Some(Established {
            version: self.config.versions.1.min(peer.versions.1),
            peer_node_id: peer.node_id,
            peer_capabilities: peer.capabilities,
            max_payload: self.config.max_payload.min(peer.max_payload),
        });
        self.state = State::Done;
    }

    fn garbage(&mut self, detail: String) -> HandshakeError {
        self.refuse(RefuseReason::PROTOCOL_VIOLATION, detail.clone());
        HandshakeError::Garbage(detail)
    }

    fn violation(&mut self, detail: String) -> HandshakeError {
        self.refuse(RefuseReason::PROTOCOL_VIOLATION, detail.clone());
        HandshakeError::ProtocolViolation(detail)
    }

    fn refuse(&mut self, reason: RefuseReason, detail: String) {
        self.state = State::Failed;
        let versions = self.config.versions;
        self.queue(&Message::Refuse {
            reason,
            versions,
            detail,
        });
    }

    fn queue(&mut self, msg: &Message) {
        self.queue_encoded(msg.encode());
    }

    fn queue_encoded(&mut self, payload: Vec<u8>) {
        let header =
            FrameHeader::try_for_payload(FrameKind::HANDSHAKE, 0, self.send_seq, &payload, true)
                .expect("handshake messages are small");
        self.send_seq += 1;
        self.outgoing.push_back(encode_frame(&header, &payload));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{HEADER_LEN, decode_frame};
    use proptest::prelude::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes(&[b; 32]).unwrap()
    }

    fn config(k: u8, node: u64) -> HandshakeConfig {
        HandshakeConfig::new(key(k), node, 1 << 20)
    }

    /// Delivers every queued frame from `from` to `to`; returns the first error `to` reports.
    fn pump(from: &mut Handshake, to: &mut Handshake) -> Result<usize, HandshakeError> {
        let mut n = 0;
        while let Some(bytes) = from.poll_transmit() {
            let (h, p, _) = decode_frame(&bytes, HANDSHAKE_MAX_PAYLOAD).unwrap();
            n += 1;
            if to.wants_input() {
                to.handle_frame(&h, p)?;
            }
        }
        Ok(n)
    }

    fn run(
        mut c: Handshake,
        mut s: Handshake,
    ) -> (
        Result<(), HandshakeError>,
        Result<(), HandshakeError>,
        Handshake,
        Handshake,
    ) {
        let (mut rc, mut rs) = (Ok(()), Ok(()));
        for _ in 0..4 {
            if let Err(e) = pump(&mut c, &mut s) {
                rs = Err(e);
            }
            if let Err(e) = pump(&mut s, &mut c) {
                rc = Err(e);
            }
        }
        (rc, rs, c, s)
    }

    #[test]
    fn same_key_establishes_both_sides() {
        let mut ccfg = config(1, 10);
        ccfg.max_payload = 4096;
        ccfg.capabilities.push(Capability {
            transport: TransportKind::RDMA,
            blob: vec![9, 9],
        });
        let (rc, rs, c, s) = run(
            Handshake::client(ccfg).unwrap(),
            Handshake::server(config(1, 20)).unwrap(),
        );
        rc.unwrap();
        rs.unwrap();
        let (ce, se) = (c.established().unwrap(), s.established().unwrap());
        assert_eq!((ce.peer_node_id, se.peer_node_id), (20, 10));
        assert_eq!((ce.max_payload, se.max_payload), (4096, 4096));
        assert_eq!(se.peer_capabilities[1].blob, vec![9, 9]);
    }

    #[test]
    fn wrong_key_is_refused_on_both_sides() {
        let (rc, rs, c, s) = run(
            Handshake::client(config(1, 1)).unwrap(),
            Handshake::server(config(2, 2)).unwrap(),
        );
        assert!(
            matches!(
                rc,
                Err(HandshakeError::WrongKey {
                    detected_by: Side::Local
                })
            ),
            "{rc:?}"
        );
        assert!(
            matches!(
                rs,
                Err(HandshakeError::WrongKey {
                    detected_by: Side::Peer
                })
            ),
            "{rs:?}"
        );
        assert!(c.established().is_none() && s.established().is_none());
    }

    #[test]
    fn incompatible_version_is_refused_on_both_sides() {
        let mut old = config(1, 1);
        old.versions = (0, 0);
        let (rc, rs, ..) = run(
            Handshake::client(old).unwrap(),
            Handshake::server(config(1, 2)).unwrap(),
        );
        assert!(
            matches!(
                rc,
                Err(HandshakeError::IncompatibleVersion {
                    ours: (0, 0),
                    theirs: (1, 1)
                })
            ),
            "{rc:?}"
        );
        assert!(
            matches!(
                rs,
                Err(HandshakeError::IncompatibleVersion {
                    ours: (1, 1),
                    theirs: (0, 0)
                })
            ),
            "{rs:?}"
        );
    }

    #[test]
    fn overlapping_versions_pick_the_highest_common() {
        let mut newer = config(1, 1);
        newer.versions = (1, 5);
        let mut older = config(1, 2);
        older.versions = (1, 3);
        let (rc, rs, c, _) = run(
            Handshake::client(newer).unwrap(),
            Handshake::server(older).unwrap(),
        );
        rc.unwrap();
        rs.unwrap();
        assert_eq!(c.established().unwrap().version, 3);
    }

    #[test]
    fn the_key_never_appears_on_the_wire() {
        let k = [0x5au8; 32];
        let mut cfg = config(0, 1);
        cfg.key = ClusterKey::from_bytes(&k).unwrap();
        let mut c = Handshake::client(cfg.clone()).unwrap();
        let mut s = Handshake::server(cfg).unwrap();
        let mut wire = Vec::new();
        for _ in 0..3 {
            while let Some(b) = c.poll_transmit() {
                wire.extend_from_slice(&b);
                let (h, p, _) = decode_frame(&b, HANDSHAKE_MAX_PAYLOAD).unwrap();
                let _ = s.handle_frame(&h, p);
            }
            while let Some(b) = s.poll_transmit() {
                wire.extend_from_slice(&b);
                let (h, p, _) = decode_frame(&b, HANDSHAKE_MAX_PAYLOAD).unwrap();
                let _ = c.handle_frame(&h, p);
            }
        }
        assert!(c.established().is_some());
        assert!(!wire.windows(8).any(|w| w == &k[..8]));
    }

    #[test]
    fn a_replayed_server_hello_from_another_session_does_not_verify() {
        // An attacker without the key replays a genuine ServerHello recorded for another client
        // nonce: the proof binds the ClientHello, so it fails.
        let mut c1 = Handshake::client(config(1, 1)).unwrap();
        let mut s = Handshake::server(config(1, 2)).unwrap();
        pump(&mut c1, &mut s).unwrap();
        let recorded = s.poll_transmit().unwrap();
        let mut c2 = Handshake::client(config(1, 1)).unwrap();
        let (h, p, _) = decode_frame(&recorded, HANDSHAKE_MAX_PAYLOAD).unwrap();
        assert!(matches!(
            c2.handle_frame(&h, p),
            Err(HandshakeError::WrongKey { .. })
        ));
    }

    #[test]
    fn out_of_order_message_is_a_protocol_violation() {
        let mut s = Handshake::server(config(1, 2)).unwrap();
        let payload = Message::Accept.encode();
        let h = FrameHeader::try_for_payload(FrameKind::HANDSHAKE, 0, 0, &payload, true).unwrap();
        assert!(matches!(
            s.handle_frame(&h, &payload),
            Err(HandshakeError::ProtocolViolation(_))
        ));
        assert!(
            s.poll_transmit().is_some(),
            "a refusal is queued for the peer"
        );
    }

    #[test]
    fn refusal_detail_is_truncated_on_a_char_boundary() {
        let msg = Message::Refuse {
            reason: RefuseReason(9),
            versions: (1, 1),
            detail: "é".repeat(600),
        };
        let back = Message::decode(&msg.encode()).unwrap();
        let Message::Refuse { detail, .. } = back else {
            panic!("not a refusal")
        };
        assert!(detail.len() <= MAX_DETAIL && detail.chars().all(|c| c == 'é'));
    }

    fn arb_hello() -> impl Strategy<Value = Hello> {
        (
            any::<(u16, u16)>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<u32>(),
            proptest::collection::vec(
                (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)),
                0..MAX_CAPABILITIES,
            ),
        )
            .prop_map(|(versions, node_id, nonce, max_payload, caps)| Hello {
                versions,
                node_id,
                nonce,
                max_payload,
                capabilities: caps
                    .into_iter()
                    .map(|(t, blob)| Capability {
                        transport: TransportKind(t),
                        blob,
                    })
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn any_message_round_trips(h in arb_hello(), proof: [u8; 32], which in 0u8..5, detail in ".{0,40}") {
            let msg = match which {
                0 => Message::ClientHello(h),
                1 => Message::ServerHello(h, proof),
                2 => Message::ClientProof(proof),
                3 => Message::Accept,
                _ => Message::Refuse { reason: RefuseReason(3), versions: (1, 2), detail },
            };
            prop_assert_eq!(Message::decode(&msg.encode()).unwrap(), msg);
        }

        #[test]
        fn arbitrary_payloads_never_panic_either_side(payload in proptest::collection::vec(any::<u8>(), 0..300), seq in 0u64..2) {
            for mut hs in [Handshake::client(config(1, 1)).unwrap(), Handshake::server(config(1, 1)).unwrap()] {
                let h = FrameHeader::try_for_payload(FrameKind::HANDSHAKE, 0, seq, &payload, true).unwrap();
                let _ = hs.handle_frame(&h, &payload);
                let _ = hs.poll_transmit();
            }
        }

        #[test]
        fn arbitrary_frame_bytes_become_a_handshake_error(bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN..200)) {
            let mut hs = Handshake::server(config(1, 1)).unwrap();
            match decode_frame(&bytes, HANDSHAKE_MAX_PAYLOAD) {
                Ok((h, p, _)) => { let _ = hs.handle_frame(&h, p); }
                Err(e) => { let _ = hs.frame_error(e); }
            }
        }
    }
}
