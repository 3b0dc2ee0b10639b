//! sinew's transport: authenticated, framed, message-oriented links between nodes.
//!
//! - [`frame`]: the wire frame, sans-IO.
//! - [`handshake`]: version negotiation, capabilities and HMAC mutual authentication, sans-IO.
//! - [`key`]: where the pre-shared cluster key comes from.
//! - [`link`]: the backend-agnostic [`Link`] with its send and receive halves.
//! - [`select`]: which backend a link uses: the best both sides offer.
//! - [`tcp`]: connector and listener (every link starts as an authenticated TCP connection) and
//!   the TCP backend.
//! - [`uring`]: the io_uring backend.
//! - [`shm`]: the shared-memory backend, for two ranks on one host.
//! - [`rdma`]: the RDMA backend (rdma-sys verbs, Apple's Thunderbolt rules), with a software
//!   device for machines without RDMA.
//!
//! Every blocking call takes a [`Deadline`] or inherits the link's timeout; every failure is an
//! [`Error`], never a panic or a hang.

pub mod codec;
pub mod deadline;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod key;
pub mod link;
pub mod rdma;
pub mod select;
pub mod shm;
mod stream;
#[cfg(test)]
mod suite;
pub mod tcp;
pub mod uring;
pub mod wait;

pub use deadline::Deadline;
pub use error::{Error, Result};
pub use handshake::TransportKind;
pub use key::ClusterKey;
pub use link::{Link, LinkConfig, LinkInfo, LinkReceiver, LinkSender, Message};
pub use select::TransportChoice;
pub use wait::WaitStrategy;
