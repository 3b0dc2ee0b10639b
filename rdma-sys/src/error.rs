//! rdma-sys's one error type.

use thiserror::Error;

/// Why a verbs call failed.
#[derive(Debug, Error)]
pub enum Error {
    /// No verbs library could be loaded.
    #[error("no RDMA verbs library: tried {tried}: {reason}")]
    LibraryMissing {
        /// The names tried, in order.
        tried: String,
        /// The loader's last error.
        reason: String,
    },
    /// The library lacks a function sinew needs.
    #[error("the verbs library {library} lacks {symbol}: {reason}")]
    SymbolMissing {
        /// The library.
        library: String,
        /// The missing function.
        symbol: &'static str,
        /// The loader's error.
        reason: String,
    },
    /// The kernel has no RDMA support (`ibv_get_device_list` fails with ENOSYS).
    #[error("no RDMA support in this kernel (ibv_get_device_list: ENOSYS)")]
    NoKernelSupport,
    /// The kernel supports RDMA but no device is present (or none by the requested name).
    #[error("no RDMA device{}", match .name { Some(n) => format!(" named {n}"), None => String::new() })]
    NoDevice {
        /// The name asked for, if any.
        name: Option<String>,
    },
    /// A verb failed.
    #[error("{verb} failed: {source}")]
    Verb {
        /// The verb.
        verb: &'static str,
        /// The errno it left.
        #[source]
        source: std::io::Error,
    },
}

/// rdma-sys result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
