//! sinew's cluster: one model served by several nodes as a pipeline of stages.
//!
//! - [`Cluster`] (the head, stage 0): connects to the workers, places the layers ([`StagePlan`]),
//!   has every worker load its range (sending the tensors to one without the model), and serves
//!   requests through a pipelined scheduler: [`Cluster::submit`] gives a stream of
//!   [`engine::Event`]s, [`Cluster::state`] the nodes, plan and counters. With no workers it is a
//!   single node and the same API holds.
//! - [`worker::run`] (`sinew worker`): a node that waits for a head and serves as a stage.
//! - [`plan`]: placement, a pure function; [`predict`]: the decode speed of a plan, from what
//!   [`speed`] measures on each node.
//! - [`wire`]: the protocol's messages, sans-IO.
//!
//! The token path is synchronous threads and binary messages: each micro-batch's hidden states go
//! from stage to stage directly, the last stage samples and sends back only token ids (and
//! logprobs when asked) — no all-gather of hidden states, no logits on the wire, no stage boundary
//! routed through the head.
//!
//! ```no_run
//! use cluster::{Cluster, ClusterOptions, BatchOptions};
//! use engine::{DecodeParams, Event, Request};
//! # fn opts() -> ClusterOptions { unimplemented!() }
//! let cluster = Cluster::start(opts())?;
//! assert!(cluster.wait_ready(std::time::Duration::from_secs(60)));
//! let prompt = cluster.text().encode("Hello", false)?;
//! let stream = cluster.submit(Request { prompt, params: DecodeParams::default(), prompt_logprobs: None })?;
//! while let Some(ev) = stream.recv_timeout(std::time::Duration::from_secs(10)) {
//!     match ev {
//!         Event::Token(t) => print!("{}", t.text),
//!         Event::Finished { .. } | Event::Error(_) => break,
//!         _ => {}
//!     }
//! }
//! # Ok::<(), cluster::Error>(())
//! ```

pub mod addr;
pub mod discovery;
pub mod error;
pub mod head;
pub mod io;
pub mod node;
pub mod pipeline;
pub mod plan;
pub mod predict;
pub mod speed;
pub mod stage;
mod supervisor;
pub mod survey;
pub mod warm;
pub mod wire;
pub mod worker;

pub use error::{Error, Result};
pub use head::{Cluster, ClusterOptions, ClusterState, LinkState, NodeState, Operations, Refused};
pub use pipeline::BatchOptions;
pub use plan::{NodeBudget, PlanError, Serving, StagePlan};
pub use worker::WorkerOptions;
