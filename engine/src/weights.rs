//! Weight stores: a Hugging Face directory of memory-mapped safetensors files, or one GGUF file.
//!
//! The model asks for weights by role ([`W`]); each store maps a role to its own tensor naming,
//! checks the shape the configuration implies, and records which tensors it read, so a pipeline
//! stage can prove it touched only its share.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::config::Architecture;
use crate::error::{Error, Result};
use crate::kernels::{Format, PackedMatrix};
use crate::linear::{LazyPacked, Mat};

/// A weight's role in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W {
    /// Token embedding [vocab, hidden].
    Embed,
    /// Final RMSNorm \[hidden\].
    FinalNorm,
    /// Output head [vocab, hidden].
    Head,
    /// Pre-attention RMSNorm of a layer.
    AttnNorm(usize),
    /// Query projection.
    Q(usize),
    /// Key projection.
    K(usize),
    /// Value projection.
    V(usize),
    /// Attention output projection.
    O(usize),
    /// Query bias.
    QBias(usize),
    /// Key bias.
    KBias(usize),
    /// Value bias.
    VBias(usize),
    /// Per-head query RMSNorm (Qwen3).
    QNorm(usize),
    /// Per-head key RMSNorm (Qwen3).
    KNorm(usize),
    /// Pre-MLP RMSNorm of a layer.
    MlpNorm(usize),
    /// Dense MLP gate projection.
    Gate(usize),
    /// Dense MLP up projection.
    Up(usize),
    /// Dense MLP down projection.
    Down(usize),
    /// MoE router [experts, hidden].
    Router(usize),
    /// One expert's projection: (layer, expert, which).
    Expert(usize, usize, Proj),
}

/// Which of an MLP's three projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    /// The gate projection (SiLU side).
    Gate,
    /// The up projection.
    Up,
    /// The down projection.
    Down,
}

impl Proj {
    fn gguf(self) -> &'static str {
        match self {
            Proj::Gate => "gate",
            Proj::Up => "up",
            Proj::Down => "down",
        }
    }
}

/// The tensor name a Hugging Face checkpoint of `arch` uses for `w`.
pub fn hf_name(arch: Architecture, w: W) -> String {
    let l = |i: usize, rest: &str| format!("model.layers.{i}.{rest}");
    match w {
        W::Embed => "model.embed_tokens.weight".into(),
        W::FinalNorm => "model.norm.weight".into(),
        W::Head => "lm_head.weight".into(),
        W::AttnNorm(i) => l(i, "input_layernorm.weight"),
        W::Q(i) => l(i, "self_attn.q_proj.weight"),
        W::K(i) => l(i, "self_attn.k_proj.weight"),
        W::V(i) => l(i, "self_attn.v_proj.weight"),
        W::O(i) => l(i, "self_attn.o_proj.weight"),
        W::QBias(i) => l(i, "self_attn.q_proj.bias"),
        W::KBias(i) => l(i, "self_attn.k_proj.bias"),
        W::VBias(i) => l(i, "self_attn.v_proj.bias"),
        W::QNorm(i) => l(i, "self_attn.q_norm.weight"),
        W::KNorm(i) => l(i, "self_attn.k_norm.weight"),
        W::MlpNorm(i) => l(i, "post_attention_layernorm.weight"),
        W::Gate(i) => l(i, "mlp.gate_proj.weight"),
        W::Up(i) => l(i, "mlp.up_proj.weight"),
        W::Down(i) => l(i, "mlp.down_proj.weight"),
        W::Router(i) => match arch {
            Architecture::Mixtral => l(i, "block_sparse_moe.gate.weight"),
            _ => l(i, "mlp.gate.weight"),
        },
        W::Expert(i, e, p) => match arch {
            Architecture::Mixtral => {
                let w = match p {
                    Proj::Gate => "w1",
                    Proj::Down => "w2",
                    Proj::Up => "w3",
                };
                l(i, &format!("block_sparse_moe.experts.{e}.{w}.weight"))
            }
            _ => l(i, &format!("mlp.experts.{e}.{}_proj.weight", p.gguf())),
        },
    }
}

/// The tensor name llama.cpp's GGUF files use for `w` (per-expert form for experts).
pub fn gguf_name(w: W) -> String {
    let b = |i: usize, rest: &str| format!("blk.{i}.{rest}");
    match w {
        W::Embed => "token_embd.weight".into(),
        W::FinalNorm => "output_norm.weight".into(),
        W::Head => "output.weight".into(),
        W::AttnNorm(i) => b(i, "attn_norm.weight"),
        W::Q(i) => b(i, "attn_q.weight"),
        W::K(i) => b(i, "attn_k.weight"),
        W::V(i) => b(i, "attn_v.weight"),
        W::O(i) => b(i, "attn_output.weight"),
        W::QBias(i) => b(i, "attn_q.bias"),
        W::KBias(i) => b(i, "attn_k.bias"),
        W::VBias(i) => b(i, "attn_v.bias"),
        W::QNorm(i) => b(i, "attn_q_norm.weight"),
        W::KNorm(i) => b(i, "attn_k_norm.weight"),
        W::MlpNorm(i) => b(i, "ffn_norm.weight"),
        W::Gate(i) => b(i, "ffn_gate.weight"),
        W::Up(i) => b(i, "ffn_up.weight"),
        W::Down(i) => b(i, "ffn_down.weight"),
        W::Router(i) => b(i, "ffn_gate_inp.weight"),
        W::Expert(i, e, p) => b(i, &format!("ffn_{}.{e}.weight", p.gguf())),
    }
}

/// The stacked GGUF tensor holding projection `p` of every expert of layer `layer`.
pub fn gguf_stacked_name(layer: usize, p: Proj) -> String {
    format!("blk.{layer}.ffn_{}_exps.weight", p.gguf())
}

/// Where a model's weights come from.
pub struct Store {
    kind: Kind,
    device: Device,
    dequantize: bool,
    read: Mutex<Vec<String>>,
}

enum Kind {
    Safetensors {
        dir: PathBuf,
        arch: Architecture,
        files: Vec<(PathBuf, MmapedSafetensors)>,
        index: HashMap<String, usize>,
    },
    Gguf {
        path: PathBuf,
        content: Box<gguf_file::Content>,
        file: Mutex<File>,
        /// The whole file, read-only: matrices sinew's kernels take are packed straight from it
        /// (no intermediate copy of each tensor); experts keep it, to be packed when routed to.
        map: Arc<Mmap>,
    },
}

impl Store {
    /// Opens the safetensors files of a Hugging Face model directory: those listed in
    /// `model.safetensors.index.json` if it exists, else `model.safetensors`, else every
    /// `*.safetensors` in `dir`.
    pub fn safetensors(dir: &Path, arch: Architecture, device: &Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut paths: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&index_path, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index_path, "no `weight_map` object"))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .map(|f| {
                    f.as_str().map(|f| dir.join(f)).ok_or_else(|| {
                        Error::config(&index_path, "a `weight_map` value is not a file name")
                    })
                })
                .collect::<Result<_>>()?;
            files.sort();
            files.dedup();
            files
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        };
        paths.sort();
        if paths.is_empty() {
            return Err(Error::weights(dir, "no *.safetensors files"));
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            if !path.exists() {
                return Err(Error::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "listed in the index but absent",
                    ),
                ));
            }
            // SAFETY: the file is mapped read-only and only read through the safetensors parser,
            // which checks every tensor's offsets against the mapping's length. Like every
            // memory-mapping loader, it relies on nobody truncating the file while it is loaded.
            let st = unsafe { MmapedSafetensors::new(&path) }
                .map_err(|e| Error::weights(&path, format!("not a valid safetensors file: {e}")))?;
            for (name, _) in st.tensors() {
                index.insert(name, i);
            }
            files.push((path, st));
        }
        Ok(Store {
            kind: Kind::Safetensors {
                dir: dir.to_path_buf(),
                arch,
                files,
                index,
            },
            device: device.clone(),
            dequantize: true,
            read: Mutex::new(Vec::new()),
        })
    }

    /// Opens a GGUF file: reads its header and checks that every tensor lies inside the file.
    /// With `dequantize`, quantized matrices are expanded to f32 as they load (the "twin" of the
    /// quantized model); otherwise they stay quantized and run through candle's k-quant kernels.
    pub fn gguf(path: &Path, device: &Device, dequantize: bool) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::weights(path, format!("not a valid GGUF file: {e}")))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        for (name, info) in &content.tensor_infos {
            let dtype = info.ggml_dtype;
            let elems = info.shape.elem_count();
            if elems % dtype.block_size() != 0 {
                return Err(Error::weights(
                    path,
                    format!(
                        "tensor {name:?}: {elems} elements is not a whole number of {dtype:?} blocks"
                    ),
                ));
            }
            let bytes = (elems / dtype.block_size()) as u64 * dtype.type_size() as u64;
            // Offsets come from the file: add without overflowing.
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|x| x.checked_add(bytes))
                .unwrap_or(u64::MAX);
            if end > len {
                return Err(Error::weights(
                    path,
                    format!("truncated: tensor {name:?} ends at byte {end}, the file has {len}"),
                ));
            }
        }
        // SAFETY: the mapping is read-only and only read within the tensor ranges checked above
        // against the file's length. Like every memory-mapping loader (and the safetensors store),
        // it relies on nobody truncating the file while it is loaded.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Store {
            kind: Kind::Gguf {
                path: path.to_path_buf(),
                content: Box::new(content),
                file: Mutex::new(file),
                map: Arc::new(map),
            },
            device: device.clone(),
            dequantize,
            read: Mutex::new(Vec::new()),
        })
    }

    /// The GGUF header, for a GGUF store.
    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match &self.kind {
            Kind::Gguf { content, .. } => Some(content),
            Kind::Safetensors { .. } => None,
        }
    }

    /// The file or directory the weights come from.
    pub fn path(&self) -> &Path {
        match &self.kind {
            Kind::Safetensors { dir, .. } => dir,
            Kind::Gguf { path, .. } => path,
        }
    }

    /// Names of the tensors read so far, in the order they were read (a layer's per-expert
    /// tensors load on several threads, so their order among themselves varies).
    pub fn tensors_read(&self) -> Vec<String> {
        self.read.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn name(&self, w: W) -> String {
        match &self.kind {
            Kind::Safetensors { arch, .. } => hf_name(*arch, w),
            Kind::Gguf { .. } => gguf_name(w),
        }
    }

    /// Whether the store holds `w`.
    pub fn has(&self, w: W) -> bool {
        self.has_name(&self.name(w))
    }

    fn has_name(&self, name: &str) -> bool {
        match &self.kind {
            Kind::Safetensors { index, .. } => index.contains_key(name),
            Kind::Gguf { content, .. } => content.tensor_infos.contains_key(name),
        }
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor {
            path: self.path().to_path_buf(),
            name: name.to_string(),
        }
    }

    fn check_shape(&self, name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
        if actual != expected {
            return Err(Error::Shape {
                path: self.path().to_path_buf(),
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: actual.to_vec(),
            });
        }
        Ok(())
    }

    fn note(&self, name: &str) {
        if let Ok(mut r) = self.read.lock() {
            r.push(name.to_string());
        }
    }

    /// A safetensors tensor as f32, or a GGUF tensor as it is stored.
    fn load_raw(&self, name: &str, expected: &[usize]) -> Result<Raw> {
        self.note(name);
        match &self.kind {
            Kind::Safetensors { files, index, .. } => {
                let &i = index.get(name).ok_or_else(|| self.missing(name))?;
                let (path, st) = &files[i];
                let view = st
                    .get(name)
                    .map_err(|e| Error::weights(path, format!("{name}: {e}")))?;
                self.check_shape(name, view.shape(), expected)?;
                let t = st
                    .load(name, &self.device)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| Error::weights(path, format!("tensor {name:?}: {e}")))?;
                // the tensor owns a copy: the file's pages need not stay in this process
                release_pages(view.data());
                Ok(Raw::Dense(t))
            }
            Kind::Gguf {
                path,
                content,
                file,
                ..
            } => {
                let info = content
                    .tensor_infos
                    .get(name)
                    .ok_or_else(|| self.missing(name))?;
                self.check_shape(name, info.shape.dims(), expected)?;
                let mut file = file
                    .lock()
                    .map_err(|_| Error::weights(path.clone(), "file lock poisoned"))?;
                let q = content
                    .tensor(&mut *file, name, &self.device)
                    .map_err(|e| Error::weights(path, format!("tensor {name:?}: {e}")))?;
                Ok(Raw::Quant(q))
            }
        }
    }

    /// A tensor needed in f32 (norms, biases, routers), of shape `shape`.
    pub fn tensor(&self, w: W, shape: &[usize]) -> Result<Tensor> {
        let name = self.name(w);
        self.load_raw(&name, shape)?.into_dense(&self.device)
    }

    /// The stored blocks of GGUF tensor `name` when the store keeps quantized matrices and
    /// sinew's kernels take their format and the [rows, cols] matrices it holds: the format and
    /// the bytes in the file's mapping (the shape is checked against `expected` and the read
    /// noted). `None` otherwise.
    fn packable_blocks(
        &self,
        name: &str,
        expected: &[usize],
        (rows, cols): (usize, usize),
    ) -> Result<Option<(Format, &[u8])>> {
        let Kind::Gguf { content, map, .. } = &self.kind else {
            return Ok(None);
        };
        let Some(info) = content.tensor_infos.get(name) else {
            return Ok(None);
        };
        let dtype = info.ggml_dtype;
        // float formats pack as they are; quantized ones unless the store dequantizes (the twin)
        let format = match Format::of(dtype) {
            Some(f)
                if f.native()
                    && self.device.is_cpu()
                    && (!self.dequantize || !is_quantized(dtype))
                    && PackedMatrix::tiles_shape(f, rows, cols) =>
            {
                f
            }
            _ => return Ok(None),
        };
        self.check_shape(name, info.shape.dims(), expected)?;
        let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        // in range: `Store::gguf` checked every tensor against the file's length
        let start = (content.tensor_data_offset + info.offset) as usize;
        self.note(name);
        Ok(Some((format, &map[start..start + bytes])))
    }

    /// A matrix [out, in] as the model multiplies by it: packed for sinew's kernels straight
    /// from a GGUF file's mapping when they take it, else as [`Store::matrix`] gives it.
    pub fn mat(&self, w: W, out: usize, inp: usize) -> Result<Mat> {
        let name = self.name(w);
        if let Kind::Safetensors { files, index, .. } = &self.kind
            && let Some(&i) = index.get(&name)
        {
            let (path, st) = &files[i];
            let view = st
                .get(&name)
                .map_err(|e| Error::weights(path, format!("{name}: {e}")))?;
            let format = match view.dtype() {
                safetensors::Dtype::F32 => Some(Format::F32),
                safetensors::Dtype::BF16 => Some(Format::BF16),
                safetensors::Dtype::F16 => Some(Format::F16),
                _ => None,
            };
            if let Some(format) = format.filter(|&f| {
                f.native() && self.device.is_cpu() && PackedMatrix::tiles_shape(f, out, inp)
            }) {
                // straight from the mapping, in the file's own precision (bf16 stays 2 bytes)
                self.check_shape(&name, view.shape(), &[out, inp])?;
                self.note(&name);
                let m = pack(format, view.data(), out, inp, &name);
                release_pages(view.data());
                return m;
            }
        }
        match self.packable_blocks(&name, &[out, inp], (out, inp))? {
            Some((format, bytes)) => {
                let m = pack(format, bytes, out, inp, &name);
                release_pages(bytes);
                m
            }
            None => Mat::new(self.matrix(w, out, inp)?),
        }
    }

    /// A matrix [out, in] to multiply activations by, quantized if the file is.
    pub fn matrix(&self, w: W, out: usize, inp: usize) -> Result<QMatMul> {
        let name = self.name(w);
        let raw = self.load_raw(&name, &[out, inp])?;
        self.to_matmul(raw)
    }

    /// Keeps a block-quantized GGUF tensor quantized unless the store dequantizes; everything
    /// else (safetensors, f32/f16 GGUF tensors) becomes an f32 tensor.
    fn to_matmul(&self, raw: Raw) -> Result<QMatMul> {
        Ok(match raw {
            Raw::Quant(q) if !self.dequantize && is_quantized(q.dtype()) => {
                QMatMul::from_qtensor(q)?
            }
            raw => QMatMul::Tensor(raw.into_dense(&self.device)?),
        })
    }

    /// Projection `p` of every expert of `layer`, each [out, in]: per-expert tensors, or a GGUF
    /// stacked `ffn_*_exps` tensor split by expert (packed for sinew's kernels straight from the
    /// stacked blocks when they take the format).
    pub fn experts(
        &self,
        layer: usize,
        p: Proj,
        n: usize,
        out: usize,
        inp: usize,
    ) -> Result<Vec<Mat>> {
        if let Kind::Gguf { .. } = &self.kind {
            let stacked = gguf_stacked_name(layer, p);
            if let Some((format, data)) =
                self.packable_blocks(&stacked, &[n, out, inp], (out, inp))?
                && let Kind::Gguf { map, .. } = &self.kind
            {
                // read in place (Q8_0: an expert sees a few rows of a step, where the file's
                // blocks stream as fast as tiles) or packed when first routed to (a prompt
                // routes to a fraction of the experts): loading copies none of them
                let per = data.len() / n.max(1);
                let base = data.as_ptr() as usize - map.as_ptr() as usize;
                return (0..n)
                    .map(|e| {
                        let start = base + e * per;
                        let m = if format.reads_in_place() {
                            PackedMatrix::in_place(map.clone(), start, format, out, inp)
                                .map(|p| Mat::Packed(Arc::new(p)))
                        } else {
                            LazyPacked::new(map.clone(), start, format, (out, inp), release_pages)
                                .map(|l| Mat::Lazy(Arc::new(l)))
                        };
                        m.ok_or_else(|| {
                            let shape = format!("[{out}, {inp}] {format:?}");
                            Error::Candle(candle_core::Error::Msg(format!(
                                "tensor {stacked:?}: expert {e} does not fit a {shape} matrix"
                            )))
                        })
                    })
                    .collect();
            }
            if self.has_name(&stacked) {
                return match self.load_raw(&stacked, &[n, out, inp])? {
                    Raw::Quant(q) if !self.dequantize && is_quantized(q.dtype()) => {
                        let data = q.data()?;
                        let per = data.len() / n.max(1);
                        let packed: Option<Vec<Mat>> = (0..n)
                            .map(|e| {
                                Mat::from_blocks(q.dtype(), &data[e * per..(e + 1) * per], out, inp)
                            })
                            .collect();
                        match packed {
                            Some(m) => Ok(m),
                            None => split_experts(&q, n, out, inp, &self.device),
                        }
                    }
                    raw => {
                        let t = raw.into_dense(&self.device)?;
                        (0..n)
                            .map(|e| Mat::new(QMatMul::Tensor(t.get(e)?)))
                            .collect()
                    }
                };
            }
        }
        pack_all(n, |e| self.mat(W::Expert(layer, e, p), out, inp))
    }
}

/// Drops this process's mapping of the whole pages inside `bytes`, a range of a read-only file
/// mapping whose contents were copied (packed, or loaded into a tensor), so the model's file does
/// not stay resident beside its copy; the page cache keeps the pages for the kernel to reclaim.
fn release_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let start = (bytes.as_ptr() as usize).next_multiple_of(page);
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside `bytes`, part of a read-only mapping of a file
            // that is never written: after MADV_DONTNEED a later access faults the same file
            // contents back in, so no reference into the mapping can observe a change.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
}

/// Packs the blocks of a [rows, cols] matrix whose shape tiles (checked by the caller).
/// Every part of `bytes` packed is released ([`release_pages`]) as the packing goes, so a large
/// matrix is never resident twice.
fn pack(format: Format, bytes: &[u8], rows: usize, cols: usize, name: &str) -> Result<Mat> {
    PackedMatrix::pack_with(format, bytes, rows, cols, release_pages)
        .map(|p| Mat::Packed(Arc::new(p)))
        .ok_or_else(|| {
            Error::Candle(candle_core::Error::Msg(format!(
                "tensor {name:?}: {} bytes do not pack as a [{rows}, {cols}] {format:?} matrix",
                bytes.len()
            )))
        })
}

/// `make(0..n)` in order, spread over the engine's worker threads (candle's thread count) in
/// contiguous runs: packing a layer's experts is independent per expert, and the page faults of
/// the fresh tiles parallelize with it.
fn pack_all(n: usize, make: impl Fn(usize) -> Result<Mat> + Sync) -> Result<Vec<Mat>> {
    let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
    if threads == 1 {
        return (0..n).map(make).collect();
    }
    let run = n.div_ceil(threads);
    let make = &make;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..n)
            .step_by(run)
            .map(|start| {
                s.spawn(move || {
                    (start..(start + run).min(n))
                        .map(make)
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for w in workers {
            let part = w.join().map_err(|_| {
                Error::Candle(candle_core::Error::Msg("a packing thread panicked".into()))
            })??;
            all.extend(part);
        }
        Ok(all)
    })
}

enum Raw {
    Dense(Tensor),
    Quant(QTensor),
}

impl Raw {
    /// The tensor in f32 (a GGUF tensor dequantized).
    fn into_dense(self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Raw::Dense(t) => t,
            Raw::Quant(q) => q.dequantize(device)?,
        })
    }
}

fn is_quantized(d: GgmlDType) -> bool {
    !matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Splits a stacked quantized [n, out, in] tensor into n quantized [out, in] tensors; each
/// expert's blocks are contiguous because `in` is a whole number of blocks.
fn split_experts(
    q: &QTensor,
    n: usize,
    out: usize,
    inp: usize,
    device: &Device,
) -> Result<Vec<Mat>> {
    let dtype = q.dtype();
    let data = q.data()?;
    let per = data.len() / n;
    if !inp.is_multiple_of(dtype.block_size()) || per * n != data.len() {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "stacked experts of width {inp} do not split into whole {dtype:?} blocks"
        ))));
    }
    (0..n)
        .map(|e| {
            let bytes = &data[e * per..(e + 1) * per];
            let storage = QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?;
            Ok(Mat::Candle(QMatMul::from_qtensor(QTensor::new(
                storage,
                (out, inp),
            )?)?))
        })
        .collect()
}
