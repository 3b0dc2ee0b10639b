//! A GGUF model cut along its layers: how many bytes each layer, the embedding and the output
//! head take (what a pipeline's placement needs), and a GGUF file holding only one stage's
//! tensors (what a node without the model receives).

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::ops::Range;
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file::{self, TensorInfo};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Where a GGUF model's bytes lie, layer by layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// The model's configuration.
    pub config: ModelConfig,
    /// Bytes of each decoder layer's tensors.
    pub layer_bytes: Vec<u64>,
    /// Bytes of the token embedding (the first stage holds it; with tied embeddings the last
    /// stage reads it as the output head too).
    pub embed_bytes: u64,
    /// Bytes of the final norm and the output head (the last stage); with tied embeddings, the
    /// embedding's bytes.
    pub head_bytes: u64,
}

impl Layout {
    /// Bytes of the weights a stage holding `layers` loads.
    pub fn stage_bytes(&self, layers: Range<usize>) -> u64 {
        let n = self.layer_bytes.len();
        let mut b: u64 = self.layer_bytes[layers.clone()].iter().sum();
        let first = layers.start == 0;
        let last = layers.end == n;
        if first {
            b += self.embed_bytes;
        }
        if last {
            // a tied head serves the first stage's embedding rows too: kept once
            let tied_and_held = first && self.tied();
            if !tied_and_held {
                b += self.head_bytes;
            }
        }
        b
    }

    /// Bytes of the whole model.
    pub fn total_bytes(&self) -> u64 {
        self.stage_bytes(0..self.layer_bytes.len())
    }

    fn tied(&self) -> bool {
        self.config.tie_word_embeddings && self.head_bytes >= self.embed_bytes
    }
}

fn info_bytes(info: &TensorInfo) -> u64 {
    (info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
}

/// The layer of a GGUF tensor name (`blk.N.…`), if it belongs to one.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

fn read_content(path: &Path) -> Result<(gguf_file::Content, File)> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| Error::weights(path, format!("reading the GGUF header: {e}")))?;
    Ok((content, file))
}

/// Reads `path`'s GGUF header and sums its tensors' bytes by layer.
///
/// # Errors
/// I/O errors, a file that is not GGUF, a configuration the engine does not know, a tensor of a
/// layer the configuration does not have.
pub fn layout(path: &Path) -> Result<Layout> {
    let (content, _) = read_content(path)?;
    let config = ModelConfig::from_gguf(&content, path)?;
    let mut layer_bytes = vec![0u64; config.num_layers];
    let (mut embed, mut head, mut has_output) = (0u64, 0u64, false);
    for (name, info) in &content.tensor_infos {
        let b = info_bytes(info);
        match layer_of(name) {
            Some(l) => {
                let slot = layer_bytes.get_mut(l).ok_or_else(|| {
                    Error::weights(
                        path,
                        format!(
                            "tensor {name} of layer {l}, but the model has {} layers",
                            config.num_layers
                        ),
                    )
                })?;
                *slot += b;
            }
            None if name == "token_embd.weight" => embed += b,
            None if name == "output.weight" => {
                head += b;
                has_output = true;
            }
            None => head += b,
        }
    }
    if !has_output {
        // tied: the last stage reads the embedding as its head
        head += embed;
    }
    Ok(Layout {
        config,
        layer_bytes,
        embed_bytes: embed,
        head_bytes: head,
    })
}

/// The names of the tensors a stage holding `layers` of a model with `n` layers reads.
fn stage_tensor(name: &str, layers: &Range<usize>, n: usize, has_output: bool) -> bool {
    match layer_of(name) {
        Some(l) => layers.contains(&l),
        None if name == "token_embd.weight" => {
            layers.start == 0 || (layers.end == n && !has_output)
        }
        None => layers.end == n,
    }
}

/// Writes to `out` a GGUF file with every metadata entry of `src` and only the tensors a stage
/// holding `layers` reads (its layers; the embedding for the first stage; the final norm and
/// head for the last). Loading `out` with the same layer range gives the same stage.
///
/// # Errors
/// I/O errors, a source that is not GGUF, a range outside the model.
pub fn write_stage(src: &Path, out: &Path, layers: Range<usize>) -> Result<()> {
    let (content, file) = read_content(src)?;
    let config = ModelConfig::from_gguf(&content, src)?;
    let n = config.num_layers;
    if layers.start >= layers.end || layers.end > n {
        return Err(Error::Request(format!(
            "layer range {}..{} is not within the model's {n} layers",
            layers.start, layers.end
        )));
    }
    let has_output = content.tensor_infos.contains_key("output.weight");
    let mut reader = BufReader::new(file);
    let mut names: Vec<&String> = content
        .tensor_infos
        .keys()
        .filter(|name| stage_tensor(name, &layers, n, has_output))
        .collect();
    // file order, so the subset reads like the source
    names.sort_by_key(|name| content.tensor_infos[*name].offset);
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| Error::weights(src, format!("reading {name}: {e}")))?;
        tensors.push((name.as_str(), t));
    }
    let mut meta: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    meta.sort_by_key(|(k, _)| *k);
    let f = File::create(out).map_err(|e| Error::io(out, e))?;
    let mut w = BufWriter::new(f);
    let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut w, &meta, &refs).map_err(|e| Error::weights(out, e.to_string()))?;
    let mut f = w.into_inner().map_err(|e| Error::io(out, e.into_error()))?;
    // candle writes version 2; the bytes are a little-endian version 3 file (see `gguf`)
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(4))
        .and_then(|_| f.write_all(&3u32.to_le_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(out, e))?;
    Ok(())
}
