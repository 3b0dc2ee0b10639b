//! The transport's one error type.

use std::time::Duration;

use thiserror::Error;

use crate::frame::FrameError;
use crate::handshake::HandshakeError;
use crate::key::KeyError;

/// Why a transport operation failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The deadline passed before the operation finished. If no byte of the message had moved,
    /// the link is still usable; otherwise it is broken (see [`Error::Broken`]).
    #[error("{op} timed out after {waited:?} (peer {peer})")]
    Timeout {
        /// The operation: "send", "recv", "accept".
        op: &'static str,
        /// How long the call waited.
        waited: Duration,
        /// The peer's address.
        peer: String,
    },
    /// A socket call failed.
    #[error("{op} to/from {peer} failed: {error}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The peer's address.
        peer: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The peer closed the link in an orderly way.
    #[error("peer {peer} closed the link")]
    Closed {
        /// The peer's address.
        peer: String,
    },
    /// The peer vanished without closing the link (process died, connection reset or cut).
    #[error("peer {peer} is gone: {detail}")]
    PeerGone {
        /// The peer's address.
        peer: String,
        /// What was observed.
        detail: String,
    },
    /// A frame from the peer was malformed or corrupted.
    #[error("bad frame from {peer}: {error}")]
    Frame {
        /// The peer's address.
        peer: String,
        /// What was wrong.
        error: FrameError,
    },
    /// A frame arrived out of sequence, or of a kind not allowed here.
    #[error("protocol violation by {peer}: {detail}")]
    ProtocolViolation {
        /// The peer's address.
        peer: String,
        /// What happened.
        detail: String,
    },
    /// The receive buffer cannot hold the next message. Nothing was consumed: call again with a
    /// buffer of at least `needed` bytes.
    #[error(
        "receive buffer of {capacity} bytes is too small for the next message of {needed} bytes"
    )]
    BufferTooSmall {
        /// Length of the next message.
        needed: usize,
        /// Length of the buffer given.
        capacity: usize,
    },
    /// The message is longer than the link's negotiated maximum. Nothing was sent.
    #[error("message of {len} bytes exceeds the link's negotiated maximum of {max} bytes")]
    MessageTooLarge {
        /// Length of the message.
        len: usize,
        /// The negotiated maximum.
        max: u32,
    },
    /// An earlier error left the byte stream mid-frame; the link cannot be used again.
    #[error("link to {peer} is broken by an earlier error: {cause}")]
    Broken {
        /// The peer's address.
        peer: String,
        /// The earlier error.
        cause: String,
    },
    /// Authentication or negotiation with the peer failed.
    #[error("handshake with {peer} failed: {error}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// Why.
        error: HandshakeError,
    },
    /// No connection could be made before the connect deadline.
    #[error("could not connect to {addr} ({attempts} attempts over {elapsed:?}): {error}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last attempt's error.
        error: std::io::Error,
    },
    /// The cluster key could not be had.
    #[error("{0}")]
    Key(KeyError),
    /// A requested backend cannot be used.
    #[error("transport {transport} is unavailable: {reason}")]
    Unavailable {
        /// The backend.
        transport: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// A failed socket operation: a reset, aborted or broken connection means the peer is gone;
    /// anything else is an I/O error.
    pub(crate) fn from_socket(op: &'static str, peer: &str, error: std::io::Error) -> Error {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                Error::PeerGone {
                    peer: peer.to_string(),
                    detail: format!("{op}: {error}"),
                }
            }
            _ => Error::Io {
                op,
                peer: peer.to_string(),
                error,
            },
        }
    }

    /// The byte stream ended without a close frame: `mid_frame` says whether a frame was cut
    /// short.
    pub(crate) fn stream_ended(peer: &str, mid_frame: bool) -> Error {
        Error::PeerGone {
            peer: peer.to_string(),
            detail: if mid_frame {
                "connection closed mid-frame".into()
            } else {
                "connection closed without a close frame (peer died?)".into()
            },
        }
    }

    /// Whether this error says the peer is dead or gone (as opposed to a local or protocol fault).
    pub fn is_peer_failure(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::Closed { .. }
                | Error::PeerGone { .. }
                | Error::Broken { .. }
        )
    }
}

/// Transport result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<KeyError> for Error {
    fn from(e: KeyError) -> Self {
        Error::Key(e)
    }
}
