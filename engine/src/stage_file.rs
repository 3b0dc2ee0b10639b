//! A GGUF model cut along its layers: how many bytes each layer, the embedding and the output
//! head take (what a pipeline's placement needs), and a GGUF file holding only one stage's
//! tensors (what a node without the model receives).

use std::fs::File;
use std::io::BufWriter;
use std::ops::Range;
use std::path::Path;

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
    /// Per layer, the bytes of its tensors other than the stacked experts, by format (`q4_k`,
    /// `q6_k`, …): what every token reads.
    pub layer_reads: Vec<Vec<(String, u64)>>,
    /// Per layer, the bytes of its stacked expert tensors (`*_exps`), by format: a token reads
    /// `top_k / num_experts` of them.
    pub layer_expert_reads: Vec<Vec<(String, u64)>>,
    /// The bytes the output head reads per token, by format (the last stage).
    pub head_reads: Vec<(String, u64)>,
    /// Per layer, how many matrices (tensors of two or more dimensions) of each format hold its
    /// `layer_reads`: a token runs one product with each.
    pub layer_matrices: Vec<Vec<(String, u64)>>,
    /// Per layer, how many expert matrices of each format hold its `layer_expert_reads` (a
    /// stacked tensor counts one per expert): a token runs products with `top_k / num_experts`
    /// of them.
    pub layer_expert_matrices: Vec<Vec<(String, u64)>>,
    /// The output head's matrices, by format.
    pub head_matrices: Vec<(String, u64)>,
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

/// The name sinew uses for a weight format (lowercase, as llama.cpp writes them).
pub fn format_name(dtype: candle_core::quantized::GgmlDType) -> String {
    use candle_core::quantized::GgmlDType as D;
    match dtype {
        D::Q2K => "q2_k".into(),
        D::Q3K => "q3_k".into(),
        D::Q4K => "q4_k".into(),
        D::Q5K => "q5_k".into(),
        D::Q6K => "q6_k".into(),
        D::Q8K => "q8_k".into(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

fn add_read(reads: &mut Vec<(String, u64)>, format: String, bytes: u64) {
    match reads.iter_mut().find(|(f, _)| *f == format) {
        Some((_, b)) => *b += bytes,
        None => reads.push((format, bytes)),
    }
}

fn info_bytes(info: &TensorInfo) -> u64 {
    (info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
}

/// Whether a GGUF tensor holds experts: stacked (`blk.N.ffn_gate_exps.weight`) or one expert's
/// (`blk.N.ffn_gate.E.weight`).
fn is_expert(name: &str) -> bool {
    if name.contains("_exps") {
        return true;
    }
    let mut parts = name.split('.');
    parts.next() == Some("blk")
        && parts.next().is_some_and(|l| l.parse::<usize>().is_ok())
        && parts.next().is_some_and(|p| p.starts_with("ffn_"))
        && parts.next().is_some_and(|e| e.parse::<usize>().is_ok())
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
    let mut layer_reads = vec![Vec::new(); config.num_layers];
    let mut layer_expert_reads = vec![Vec::new(); config.num_layers];
    let mut layer_matrices = vec![Vec::new(); config.num_layers];
    let mut layer_expert_matrices = vec![Vec::new(); config.num_layers];
    let mut head_reads = Vec::new();
    let mut head_matrices = Vec::new();
    let mut embed_read = None;
    let experts = config.moe.as_ref().map_or(1, |m| m.num_experts.max(1)) as u64;
    let (mut embed, mut head, mut has_output) = (0u64, 0u64, false);
    for (name, info) in &content.tensor_infos {
        let b = info_bytes(info);
        let format = format_name(info.ggml_dtype);
        // products: a stacked expert tensor is one matrix per expert
        let matrices = match info.shape.rank() {
            0 | 1 => 0,
            _ if name.contains("_exps") => experts,
            _ => 1,
        };
        if let Some(l) = layer_of(name)
            && l < config.num_layers
        {
            let (reads, counts) = if is_expert(name) {
                (&mut layer_expert_reads[l], &mut layer_expert_matrices[l])
            } else {
                (&mut layer_reads[l], &mut layer_matrices[l])
            };
            add_read(reads, format.clone(), b);
            if matrices > 0 {
                add_read(counts, format.clone(), matrices);
            }
        } else if name == "token_embd.weight" {
            embed_read = Some((format.clone(), b));
        } else {
            add_read(&mut head_reads, format.clone(), b);
            if matrices > 0 {
                add_read(&mut head_matrices, format.clone(), matrices);
            }
        }
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
        if let Some((f, b)) = embed_read {
            add_read(&mut head_reads, f.clone(), b);
            add_read(&mut head_matrices, f, 1);
        }
    }
    Ok(Layout {
        config,
        layer_bytes,
        embed_bytes: embed,
        head_bytes: head,
        layer_reads,
        layer_expert_reads,
        head_reads,
        layer_matrices,
        layer_expert_matrices,
        head_matrices,
    })
}

/// A matrix (or a stack of experts' matrices) a decode step runs products with.
#[derive(Clone, Debug, PartialEq)]
pub struct MatrixInfo {
    /// The tensor's name.
    pub name: String,
    /// Its layer; `None` for the output head.
    pub layer: Option<usize>,
    /// Its format.
    pub dtype: candle_core::quantized::GgmlDType,
    /// Output rows of one matrix.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// Matrices it holds: the experts of a stacked tensor, else 1.
    pub count: usize,
    /// Whether it holds experts (a token runs `top_k / num_experts` of them).
    pub expert: bool,
}

/// The matrices of `path`'s decoder layers and output head (the embedding, when tied), from
/// its GGUF header: what a decode step multiplies by.
///
/// # Errors
/// As [`layout`].
pub fn matrices(path: &Path) -> Result<Vec<MatrixInfo>> {
    let (content, _) = read_content(path)?;
    let config = ModelConfig::from_gguf(&content, path)?;
    let has_output = content.tensor_infos.contains_key("output.weight");
    let mut out = Vec::new();
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        if dims.len() < 2 {
            continue;
        }
        let layer = layer_of(name).filter(|&l| l < config.num_layers);
        let head = name == "output.weight" || (name == "token_embd.weight" && !has_output);
        if layer.is_none() && !head {
            continue;
        }
        let stacked = dims.len() > 2;
        let count = if stacked { dims[0] } else { 1 };
        let cols = dims[dims.len() - 1];
        out.push(MatrixInfo {
            name: name.clone(),
            layer,
            dtype: info.ggml_dtype,
            rows: info.shape.elem_count() / cols.max(1) / count.max(1),
            cols,
            count,
            expert: layer.is_some() && is_expert(name),
        });
    }
    Ok(out)
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
/// The file is streamed: the metadata section and each kept tensor's description are copied as
/// they are in `src` (with new data offsets), and each tensor's bytes are copied in pieces, so a
/// stage larger than this machine's memory can be written.
///
/// # Errors
/// I/O errors, a source that is not GGUF (or not little-endian v2/v3), a range outside the model.
pub fn write_stage(src: &Path, out: &Path, layers: Range<usize>) -> Result<()> {
    let (content, _) = read_content(src)?;
    let config = ModelConfig::from_gguf(&content, src)?;
    let n = config.num_layers;
    if layers.start >= layers.end || layers.end > n {
        return Err(Error::Request(format!(
            "layer range {}..{} is not within the model's {n} layers",
            layers.start, layers.end
        )));
    }
    let has_output = content.tensor_infos.contains_key("output.weight");
    let bytes = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
    // SAFETY: the mapping is read-only and private to this call; every read below is bounds
    // checked against its length.
    let map = unsafe { memmap2::Mmap::map(&bytes) }.map_err(|e| Error::io(src, e))?;
    let raw = RawGguf::parse(&map).map_err(|m| Error::weights(src, m))?;
    let kept: Vec<&RawTensor> = raw
        .tensors
        .iter()
        .filter(|t| stage_tensor(&t.name, &layers, n, has_output))
        .collect();
    let align = raw.alignment;
    let pad = |x: u64| x.div_ceil(align) * align;
    let f = File::create(out).map_err(|e| Error::io(out, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let io = |e: std::io::Error| Error::io(out, e);
    use std::io::Write;
    // header: magic, version 3, tensor count, the source's metadata count and entries
    w.write_all(b"GGUF").map_err(io)?;
    w.write_all(&3u32.to_le_bytes()).map_err(io)?;
    w.write_all(&(kept.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&map[16..raw.kv_end]).map_err(io)?;
    let mut offset = 0u64;
    let mut pos = 24 + (raw.kv_end - 24) as u64;
    for t in &kept {
        let info = &map[t.info.clone()];
        // everything but the trailing data offset, then the new offset
        w.write_all(&info[..info.len() - 8]).map_err(io)?;
        w.write_all(&offset.to_le_bytes()).map_err(io)?;
        pos += info.len() as u64;
        offset = pad(offset + t.size);
    }
    w.write_all(&vec![0u8; (pad(pos) - pos) as usize])
        .map_err(io)?;
    for t in &kept {
        let start = raw.data_start + t.offset as usize;
        let data = map.get(start..start + t.size as usize).ok_or_else(|| {
            Error::weights(
                src,
                format!("tensor {} lies past the end of the file", t.name),
            )
        })?;
        for piece in data.chunks(8 << 20) {
            w.write_all(piece).map_err(io)?;
        }
        w.write_all(&vec![0u8; (pad(t.size) - t.size) as usize])
            .map_err(io)?;
    }
    let f = w.into_inner().map_err(|e| Error::io(out, e.into_error()))?;
    f.sync_all().map_err(|e| Error::io(out, e))?;
    Ok(())
}

/// One tensor's description in a GGUF file, where it lies.
struct RawTensor {
    name: String,
    /// The bytes of its description (name, dims, type, offset).
    info: Range<usize>,
    /// Its data's offset from the start of the data section.
    offset: u64,
    /// Its data's size.
    size: u64,
}

/// The layout of a little-endian GGUF v2/v3 file, read by hand: where the metadata section ends,
/// each tensor's description and data, the alignment.
struct RawGguf {
    kv_end: usize,
    tensors: Vec<RawTensor>,
    data_start: usize,
    alignment: u64,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("the GGUF header ends early")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    /// Skips a value of GGUF type `t`; returns it when it is an integer (for the alignment).
    fn value(&mut self, t: u32, depth: u32) -> std::result::Result<Option<u64>, String> {
        Ok(match t {
            0 | 1 | 7 => Some(u64::from(self.take(1)?[0])),
            2 | 3 => Some(u64::from(u16::from_le_bytes(
                self.take(2)?.try_into().expect("2 bytes"),
            ))),
            4 | 5 => Some(u64::from(self.u32()?)),
            6 => {
                self.take(4)?;
                None
            }
            8 => {
                self.string()?;
                None
            }
            9 => {
                if depth > 4 {
                    return Err("GGUF arrays nested too deep".into());
                }
                let et = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.value(et, depth + 1)?;
                }
                None
            }
            10 | 11 => Some(self.u64()?),
            12 => {
                self.take(8)?;
                None
            }
            other => return Err(format!("unknown GGUF value type {other}")),
        })
    }
}

impl RawGguf {
    fn parse(b: &[u8]) -> std::result::Result<Self, String> {
        let mut c = Cursor { b, at: 0 };
        if c.take(4)? != b"GGUF" {
            return Err("not a GGUF file".into());
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version}: stage files are written from v2 or v3"
            ));
        }
        let tensor_count = c.u64()?;
        let kv_count = c.u64()?;
        let mut alignment = 32u64;
        for _ in 0..kv_count {
            let key = c.string()?;
            let t = c.u32()?;
            let v = c.value(t, 0)?;
            if key == "general.alignment"
                && let Some(a) = v.filter(|&a| a > 0)
            {
                alignment = a;
            }
        }
        let kv_end = c.at;
        let mut tensors = Vec::new();
        for _ in 0..tensor_count {
            let start = c.at;
            let name = c.string()?;
            let dims = c.u32()?;
            if dims > 8 {
                return Err(format!("tensor {name} has {dims} dimensions"));
            }
            let mut elems = 1u64;
            for _ in 0..dims {
                elems = elems.saturating_mul(c.u64()?);
            }
            let t = c.u32()?;
            let offset = c.u64()?;
            let (block, size) =
                ggml_block(t).ok_or_else(|| format!("tensor {name}: unknown ggml type {t}"))?;
            tensors.push(RawTensor {
                name,
                info: start..c.at,
                offset,
                size: elems / block * size,
            });
        }
        let data_start = (c.at as u64).div_ceil(alignment) * alignment;
        Ok(RawGguf {
            kv_end,
            tensors,
            data_start: data_start as usize,
            alignment,
        })
    }
}

/// Elements per block and bytes per block of a ggml type.
fn ggml_block(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        30 => (1, 2),     // BF16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        _ => return None,
    })
}
