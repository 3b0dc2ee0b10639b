//! sinew's model engine: Qwen3-MoE, Mixtral, dense Qwen3 and Llama on candle-core, loaded from a
//! Hugging Face directory (safetensors) or a GGUF file, whole or one pipeline stage's layer range.
//!
//! ```no_run
//! use engine::{LoadOptions, Loaded};
//! let mut m = Loaded::open("model_dir".as_ref(), &LoadOptions::default())?;
//! let ids = m.text.encode("Hello", false)?;
//! let logits = m.model.logits(&ids, engine::Logits::Last)?;
//! # Ok::<(), engine::Error>(())
//! ```

pub mod config;
pub mod error;
pub mod model;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use error::{Error, Result};
pub use model::{Input, Logits, Model, Output};
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
