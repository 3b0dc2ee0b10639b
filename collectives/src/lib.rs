//! sinew's collectives: what NCCL, gloo and MLX's distributed layer are to their frameworks.
//!
//! A [`Communicator`] is one rank of a world of N over a full mesh of authenticated
//! [`transport::Link`]s, built from a [`rendezvous`] or from links handed in. Its operations —
//! send/recv, broadcast, all-gather, reduce-scatter, all-reduce, all-to-all, barrier — are
//! blocking calls with deadlines over `f32`, `f16`, `bf16` or bytes, each recorded in a latency
//! histogram ([`Stats`]). The schedules are pure functions in [`schedule`].

pub mod communicator;
pub mod element;
pub mod error;
pub mod rendezvous;
pub mod schedule;
pub mod stats;
#[cfg(test)]
mod tests;

pub use communicator::{AllReduceAlgorithm, CommConfig, Communicator, Topology};
pub use element::{Element, Reduce, ReduceOp};
pub use error::{CollectiveError, Result};
pub use stats::{OpLatency, Stats};
