//! sinew's model engine: Qwen3-MoE, Mixtral, dense Qwen3 and Llama on candle-core, loaded from a
//! Hugging Face directory (safetensors) or a GGUF file, whole or one pipeline stage's layer range,
//! serving many sequences at once.
//!
//! The pieces, bottom up:
//! - [`Model`]: the read-only weights of a model or stage. [`Model::step`] runs one batched step:
//!   several sequences' new positions (prompt chunks and decode tokens mixed), each against its
//!   own [`KvCache`].
//! - [`KvPool`]: the KV byte budget, fixed at start, counted in positions; it hands out one
//!   [`KvCache`] per sequence and takes the positions back when the cache is dropped.
//! - [`Decoder`]: a sans-IO state machine per request: a logits row in; the token, the text that
//!   became final, its logprobs and why it finished out.
//! - [`Scheduler`]: continuous batching on its own thread; each request's events stream through a
//!   channel.
//!
//! One sequence by hand:
//!
//! ```no_run
//! use engine::{DecodeParams, Decoder, LoadOptions, Loaded, Logits};
//! let m = Loaded::open("model_dir".as_ref(), &LoadOptions::default())?;
//! let prompt = m.text.encode("Hello", false)?;
//! let params = DecodeParams { max_tokens: 16, ..Default::default() };
//! let mut cache = m.kv.sequence(prompt.len() + params.max_tokens)?;
//! let mut decoder = Decoder::new(&m.text, &prompt, params, m.kv.ctx())?;
//! let mut logits = m.model.logits(&mut cache, &prompt, Logits::Last)?;
//! loop {
//!     let out = decoder.step(&m.text, &logits.get(0)?.to_vec1::<f32>()?)?;
//!     print!("{}", out.text);
//!     if out.finish.is_some() {
//!         break;
//!     }
//!     logits = m.model.logits(&mut cache, &[out.token], Logits::Last)?;
//! }
//! # Ok::<(), engine::Error>(())
//! ```
//!
//! Many sequences: hand the model and its pool to a [`Scheduler`] and [`Scheduler::submit`]
//! requests; each returns a receiver of [`Event`]s (dropping it cancels the request).

mod attention;
pub mod config;
pub mod decode;
pub mod error;
pub mod kv;
pub mod model;
pub mod scheduler;
pub mod weights;

pub use attention::AttentionProbe;
pub use config::{Architecture, ModelConfig};
pub use decode::{DecodeParams, Decoded, Decoder, TokenLogprob, prompt_logprobs};
pub use error::{Error, Result};
pub use kv::{KvCache, KvPool, KvShape};
pub use model::{Chunk, Input, Logits, Model, Output};
pub use scheduler::{
    Event, Request, Scheduler, SchedulerOptions, SchedulerStats, Sink, Stream, channel,
};
pub mod generate;
pub mod load;
pub mod sampling;
pub mod text;

pub use generate::{Finish, GenerateOptions, Generation, generate};
pub use load::{LoadOptions, Loaded};
pub use sampling::{Sampler, SamplingParams};
pub use text::{Message, Text};
pub mod gguf;
pub mod kernels;
pub mod linear;
pub mod stage_file;
