//! The engine's error type: every failure names the file and, where there is one, the tensor.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A configuration file (config.json, tokenizer_config.json, GGUF metadata) is malformed or
    /// lacks a field the model needs.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model's architecture is not one this engine implements.
    #[error("{path}: unknown architecture {name:?} (supported: {supported})")]
    UnknownArchitecture {
        /// The file that names it.
        path: PathBuf,
        /// The name found.
        name: String,
        /// The names this engine accepts.
        supported: &'static str,
    },
    /// A weight file is malformed: a bad header, a truncated body, an unsupported dtype.
    #[error("{path}: {message}")]
    WeightFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is in none of the weight files.
    #[error("{path}: tensor {name:?} is missing")]
    MissingTensor {
        /// The weight file (or directory) searched.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("{path}: tensor {name:?} has shape {actual:?}, the configuration needs {expected:?}")]
    Shape {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },
    /// Tokenizing or detokenizing failed, or the tokenizer could not be built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A request the model cannot serve (token id out of range, context too long, bad sampling
    /// parameters).
    #[error("{0}")]
    Request(String),
    /// A sequence longer than the context (or the whole KV budget) allows: it can never run.
    #[error("the request needs {requested} positions, the context holds {ctx}")]
    ContextLength {
        /// The most positions a sequence may have.
        ctx: usize,
        /// The positions the request needs.
        requested: usize,
    },
    /// The KV budget has no room for the sequence now; it will once other sequences end.
    #[error("no room in the KV cache yet: {needed} positions needed, {free} free")]
    NoRoom {
        /// Positions asked for.
        needed: usize,
        /// Positions free now.
        free: usize,
    },
    /// The scheduler's queue is full: try again later.
    #[error("the request queue is full")]
    QueueFull,
    /// A tensor operation failed.
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::WeightFile {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
