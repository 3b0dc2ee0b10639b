//! Opening a model from a path: a Hugging Face directory or a `.gguf` file, whole or one layer
//! range, with a progress bar on a terminal.

use std::io::IsTerminal;
use std::ops::Range;
use std::path::Path;

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv::{DEFAULT_KV_SHARE, KvPool, available_memory};
use crate::model::Model;
use crate::text::Text;
use crate::weights::Store;

/// How to load a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Load only these decoder layers (a pipeline stage); `None` loads them all.
    pub layers: Option<Range<usize>>,
    /// Expand quantized GGUF weights to f32 at load time (the f32 "twin" of a quantized model).
    pub dequantize: bool,
    /// Draw a progress bar on stderr while loading, if stderr is a terminal.
    pub progress: bool,
    /// The KV cache budget in bytes; `None`: [`DEFAULT_KV_SHARE`] of the memory available once
    /// the weights are loaded.
    pub kv_memory: Option<usize>,
    /// The longest sequence; `None` (or more than the model's `max_position_embeddings`): the
    /// model's.
    pub ctx: Option<usize>,
}

/// A loaded model with its configuration and text handling.
pub struct Loaded {
    /// The configuration.
    pub config: ModelConfig,
    /// The model (or stage).
    pub model: Model,
    /// Tokenizer, chat template and end-of-sequence ids.
    pub text: Text,
    /// Names of the tensors read while loading.
    pub tensors_read: Vec<String>,
    /// The KV budget of this model or stage.
    pub kv: KvPool,
}

impl Loaded {
    /// Opens `path`: a directory with config.json, tokenizer.json and safetensors, or a GGUF file.
    pub fn open(path: &Path, options: &LoadOptions) -> Result<Self> {
        let device = Device::Cpu;
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let (config, store, text) = if meta.is_dir() {
            let config = ModelConfig::from_hf_file(&path.join("config.json"))?;
            let store = Store::safetensors(path, config.architecture, &device)?;
            let text = Text::from_hf_dir(path, &config.eos_token_ids)?;
            (config, store, text)
        } else {
            let store = Store::gguf(path, &device, options.dequantize)?;
            let content = store.gguf_content().expect("a GGUF store has a header");
            let config = ModelConfig::from_gguf(content, path)?;
            let text = Text::from_gguf(content, path)?;
            (config, store, text)
        };
        let layers = options.layers.clone().unwrap_or(0..config.num_layers);
        let bar = if options.progress && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(layers.len() as u64 + 2);
            bar.set_style(
                ProgressStyle::with_template("loading {msg} [{bar:40}] {pos}/{len} {elapsed}")
                    .expect("a valid progress template")
                    .progress_chars("=> "),
            );
            bar.set_message(
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let model = Model::load(&config, &store, layers, &mut |done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        let tensors_read = store.tensors_read();
        drop(store);
        let budget = match options.kv_memory {
            Some(b) => b,
            // the experts not packed yet will take their share of what is available now
            None => default_kv_budget_after(model.unpacked_bytes()),
        };
        let kv = model.kv_pool(budget, options.ctx)?;
        Ok(Loaded {
            config,
            model,
            text,
            tensors_read,
            kv,
        })
    }
}

/// [`DEFAULT_KV_SHARE`] of the memory available now (1 GiB where the system does not say).
pub fn default_kv_budget() -> usize {
    default_kv_budget_after(0)
}

/// [`DEFAULT_KV_SHARE`] of the memory available now less `reserved` bytes still to be taken
/// (1 GiB where the system does not say).
pub fn default_kv_budget_after(reserved: usize) -> usize {
    available_memory().map_or(1 << 30, |m| {
        (m.saturating_sub(reserved) as f64 * DEFAULT_KV_SHARE) as usize
    })
}
