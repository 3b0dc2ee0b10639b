//! The collectives' one error type.

use thiserror::Error;

/// Why a collective operation failed.
#[derive(Debug, Error)]
pub enum CollectiveError {
    /// A link to a peer failed (dead, stalled past the deadline, closed, garbage).
    #[error("{op} on rank {rank}: link to rank {peer} failed: {error}")]
    Link {
        /// The operation.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// The transport's error.
        error: transport::Error,
    },
    /// A peer sent something this operation does not expect: the ranks are not running the same
    /// sequence of collectives, or their arguments disagree.
    #[error("{op} on rank {rank}: rank {peer} {detail}")]
    Mismatch {
        /// The operation.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// What was wrong.
        detail: String,
    },
    /// The arguments are inconsistent (lengths, counts, ranks). The communicator stays usable.
    #[error("{op}: invalid arguments: {reason}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An earlier failure poisoned the communicator.
    #[error("communicator of rank {rank} is poisoned by an earlier failure: {cause}")]
    Poisoned {
        /// This rank.
        rank: usize,
        /// The first failure.
        cause: String,
    },
    /// Building the communicator failed.
    #[error("rendezvous of rank {rank}: {detail}")]
    Rendezvous {
        /// This rank.
        rank: usize,
        /// What failed.
        detail: String,
    },
}

/// Collectives result.
pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;
