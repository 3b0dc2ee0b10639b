//! The cluster's error type.

use std::path::PathBuf;

use thiserror::Error;

/// Why a cluster operation failed.
#[derive(Debug, Error)]
pub enum Error {
    /// A link failed.
    #[error(transparent)]
    Transport(#[from] transport::Error),
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] engine::Error),
    /// A message could not be decoded.
    #[error("bad message from {peer}: {error}")]
    Decode {
        /// Who sent it.
        peer: String,
        /// What was wrong.
        error: transport::codec::DecodeError,
    },
    /// A peer broke the protocol (a message out of turn, a batch that does not match).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A peer refused us, or we it.
    #[error("{0}")]
    Refused(String),
    /// No plan fits.
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Received weights did not match their checksum.
    #[error("weights received from the head are corrupt: {0}")]
    Corrupt(String),
    /// The cluster cannot serve now (a stage is down and no plan over the rest fits yet).
    #[error("the cluster is degraded: {0}")]
    Degraded(String),
    /// A stage failed while a request was in it.
    #[error("stage failed: {0}")]
    StageFailed(String),
    /// Too many requests wait.
    #[error("the request queue is full")]
    QueueFull,
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Engine(engine::Error::from(e))
    }
}

/// Cluster result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
