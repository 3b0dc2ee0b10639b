//! sinew's transport: authenticated, framed, message-oriented links between nodes.
//!
//! - [`frame`]: the wire frame, sans-IO.
//! - [`handshake`]: version negotiation, capabilities and HMAC mutual authentication, sans-IO.
//! - [`key`]: where the pre-shared cluster key comes from.
//! - [`link`]: the backend-agnostic [`Link`] with its send and receive halves.
//! - [`tcp`]: the TCP backend, connector and listener.
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
pub mod tcp;
pub mod wait;

pub use deadline::Deadline;
pub use error::{Error, Result};
pub use handshake::TransportKind;
pub use key::ClusterKey;
pub use link::{Link, LinkConfig, LinkInfo, LinkReceiver, LinkSender, Message};
pub use wait::WaitStrategy;
