//! A model's own products, timed on this node: what its shapes cost the kernels beyond what the
//! node's rates say (narrow or wide rows, small experts, the fixed cost of each product).

use std::collections::BTreeMap;

use candle_core::quantized::GgmlDType;
use engine::linear::Mat;
use engine::stage_file::{Layout, MatrixInfo};

use super::{FORMATS, FormatProbe, MatrixSet, median, speed_bytes};
use crate::wire::Rate;

/// Seconds one decode row's products take on this node, per layer of a model and for its
/// output head ([`measure_model`]), with the node's kernel rates measured alongside.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelTimes {
    /// Per decoder layer.
    pub layer_s: Vec<f64>,
    /// The output head.
    pub head_s: f64,
    /// This node's rates for the formats holding most of the model's bytes, measured in turn
    /// with the products (so that both see the machine alike): what other nodes' rates are
    /// compared with.
    pub rates: Vec<Rate>,
}

/// Why a model's products were not timed.
#[derive(Debug, thiserror::Error)]
pub enum TimingError {
    /// Asked to stop.
    #[error("stopped: the node has other work")]
    Stopped,
    /// The model or its matrices.
    #[error(transparent)]
    Engine(#[from] engine::Error),
}

/// A layer's products: (group, columns) → (format as GGML's number, rows) → count.
type Products = BTreeMap<(&'static str, usize), BTreeMap<(u32, usize), usize>>;

/// Times one decode row's products for every layer of the model at `path` and for its output
/// head, on this node: random matrices of each layer's shapes and formats (its tensors, and
/// `top_k` matrices of each expert shape), in the groups a decode step runs together (the
/// query, key and value projections; the output projection; the router; the MLP's or the
/// routed experts' gate and up projections; their down projections), repeated over copies of
/// four times the last-level cache in all (so that they stream from memory). Layers alike are
/// timed once. Each format holding 5% or more of a token's bytes has its rate measured
/// ([`super::measure_speed`]'s sets), pass for pass in turn with the products, 300 ms per
/// format (20 in a debug build); the times are the medians of all passes.
///
/// `stop` is asked between each set of matrices made and each pass: true gives up (the node has
/// other work, which the timing would slow and which would skew it).
///
/// # Errors
/// [`TimingError::Stopped`]; the file's header cannot be read, a matrix cannot be made in its
/// format, or the matrices would take more than a quarter of the memory available.
pub fn measure_model(
    path: &std::path::Path,
    stop: &dyn Fn() -> bool,
) -> Result<ModelTimes, TimingError> {
    let layout = engine::stage_file::layout(path)?;
    let infos = engine::stage_file::matrices(path)?;
    let dtypes: Vec<GgmlDType> = infos.iter().map(|m| m.dtype).collect();
    // the layers alike, and the head (`None`), timed once each
    let mut kinds: Vec<Products> = Vec::new();
    let mut kind_of = Vec::new();
    for part in (0..layout.config.num_layers).map(Some).chain([None]) {
        let p = products(&layout, &infos, part);
        let k = match kinds.iter().position(|q| *q == p) {
            Some(k) => k,
            None => {
                kinds.push(p);
                kinds.len() - 1
            }
        };
        kind_of.push(k);
    }
    // what the timing holds at once: every kind's copies (the set, or one copy where a kind is
    // larger) and one format's two sets; a quarter of the memory available at most, so that
    // timing never crowds out a loaded stage
    let dtypes = &dtypes;
    let bytes = |p: &Products| -> usize {
        p.iter()
            .flat_map(|(&(_, cols), shapes)| {
                shapes.iter().map(move |(&(d, rows), &count)| {
                    let dtype = dtypes.iter().find(|t| **t as u32 == d);
                    dtype.map_or(0, |t| rows * cols / t.block_size() * t.type_size() * count)
                })
            })
            .sum()
    };
    let need: usize = kinds
        .iter()
        .map(|p| bytes(p).max(speed_bytes()))
        .sum::<usize>()
        + 2 * speed_bytes();
    let (_, available) = crate::node::memory();
    if available > 0 && need as u64 > available / 4 {
        return Err(engine::Error::Request(format!(
            "timing the model's products needs {} MiB, over a quarter of the {} MiB available",
            need >> 20,
            available >> 20
        ))
        .into());
    }
    let mut seed = 0x6a09_e667_f3bc_c908u64;
    let mut timed = Vec::with_capacity(kinds.len());
    for p in &kinds {
        if stop() {
            return Err(TimingError::Stopped);
        }
        timed.push(Timed::new(p, dtypes, &mut seed)?);
    }
    let window = std::time::Duration::from_millis(if cfg!(debug_assertions) { 20 } else { 300 });
    let mut rates = Vec::new();
    let formats = main_formats(&layout, &infos);
    let rounds: Vec<Option<GgmlDType>> = if formats.is_empty() {
        vec![None]
    } else {
        formats.into_iter().map(Some).collect()
    };
    for dtype in rounds {
        let mut probe = dtype.and_then(|d| FormatProbe::new(d, &mut seed));
        let started = std::time::Instant::now();
        let mut passes = 0;
        while passes < 3 || (started.elapsed() < window && passes < 1000) {
            if stop() {
                return Err(TimingError::Stopped);
            }
            for t in &mut timed {
                t.pass()?;
            }
            if let Some(p) = probe.as_mut() {
                p.pass()
                    .ok_or_else(|| engine::Error::Request("a timed product failed".into()))?;
            }
            passes += 1;
        }
        rates.extend(probe.and_then(FormatProbe::rate));
    }
    let mut seconds: Vec<f64> = timed.iter_mut().map(|t| median(&mut t.times)).collect();
    let (head, layers) = kind_of.split_last().expect("the head is always timed");
    Ok(ModelTimes {
        layer_s: layers.iter().map(|&k| seconds[k]).collect(),
        head_s: std::mem::take(&mut seconds[*head]),
        rates,
    })
}

/// The formats the kernels run that hold 5% or more of the bytes a token reads.
fn main_formats(layout: &Layout, infos: &[MatrixInfo]) -> Vec<GgmlDType> {
    let (n, k) = experts(layout);
    let mut bytes: Vec<(GgmlDType, f64)> = Vec::new();
    for m in infos {
        let b = (m.rows * m.cols * m.count / m.dtype.block_size() * m.dtype.type_size()) as f64;
        let b = if m.expert { b * k as f64 / n as f64 } else { b };
        match bytes.iter_mut().find(|(d, _)| *d == m.dtype) {
            Some((_, t)) => *t += b,
            None => bytes.push((m.dtype, b)),
        }
    }
    let total: f64 = bytes.iter().map(|(_, b)| b).sum();
    FORMATS
        .into_iter()
        .filter(|d| bytes.iter().any(|(x, b)| x == d && *b >= 0.05 * total))
        .collect()
}

/// Experts per layer and per token (1 and 1 for a dense model).
fn experts(layout: &Layout) -> (usize, usize) {
    layout
        .config
        .moe
        .as_ref()
        .map_or((1, 1), |m| (m.num_experts.max(1), m.top_k.max(1)))
}

/// A layer's (or, for `None`, the head's) products for one decode row.
fn products(layout: &Layout, infos: &[MatrixInfo], layer: Option<usize>) -> Products {
    let (n, k) = experts(layout);
    let mut experts = Products::new();
    let mut all = Products::new();
    for m in infos.iter().filter(|m| m.layer == layer) {
        let to = if m.expert { &mut experts } else { &mut all };
        *to.entry((group(&m.name), m.cols))
            .or_default()
            .entry((m.dtype as u32, m.rows))
            .or_default() += m.count;
    }
    for (g, shapes) in experts {
        for (shape, count) in shapes {
            // a token runs k of every n experts' matrices of each shape
            *all.entry(g).or_default().entry(shape).or_default() += (count * k).div_ceil(n);
        }
    }
    all
}

/// The group a tensor's product runs in: those of one group share their input and run in one
/// parallel region of the engine.
fn group(name: &str) -> &'static str {
    if ["attn_q.", "attn_k.", "attn_v."]
        .iter()
        .any(|p| name.contains(p))
    {
        "qkv"
    } else if name.contains("ffn_gate_inp") {
        "router"
    } else if name.contains("ffn_gate") || name.contains("ffn_up") {
        "mlp in"
    } else if name.contains("ffn_down") {
        "mlp out"
    } else if name.contains("attn_output") {
        "attention out"
    } else {
        "other"
    }
}

/// A matrix of `dtype` on candle's path (or packed, where the engine would pack it).
fn candle_mat(dtype: GgmlDType, rows: usize, cols: usize) -> engine::Result<Mat> {
    let t = candle_core::Tensor::ones(
        (rows, cols),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let q = candle_core::quantized::QTensor::quantize(&t, dtype)?;
    Mat::new(candle_core::quantized::QMatMul::from_qtensor(q)?)
}

/// One kind of layer's products as random matrices, copied to fill the set, and their times.
struct Timed {
    /// Per group: its matrices and their shared input row.
    groups: Vec<(Vec<Mat>, candle_core::Tensor)>,
    copies: usize,
    times: Vec<f64>,
}

impl Timed {
    fn new(products: &Products, dtypes: &[GgmlDType], seed: &mut u64) -> engine::Result<Self> {
        let unsupported = |what: String| engine::Error::Request(format!("no {what} matrix"));
        let mut groups = Vec::new();
        let (mut bytes, mut copies) = (0usize, 0usize);
        // copies of the products until they fill the set (one at least)
        while bytes < speed_bytes() || copies == 0 {
            let before = bytes;
            for (&(_, cols), shapes) in products {
                let mut mats = Vec::new();
                for (&(d, rows), &count) in shapes {
                    let dtype = dtypes
                        .iter()
                        .copied()
                        .find(|t| *t as u32 == d)
                        .ok_or_else(|| unsupported(format!("format {d}")))?;
                    match MatrixSet::new(dtype, &vec![(rows, cols); count], 0, seed) {
                        Some(set) => {
                            bytes += set.bytes;
                            mats.extend(set.mats.into_iter().map(|(m, _)| m));
                        }
                        // a shape the kernels do not tile (a small router): candle's matmul,
                        // as the engine runs it
                        None => {
                            for _ in 0..count {
                                mats.push(candle_mat(dtype, rows, cols)?);
                                bytes += rows * cols / dtype.block_size() * dtype.type_size();
                            }
                        }
                    }
                }
                let x = candle_core::Tensor::ones(
                    (1, cols),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )?;
                groups.push((mats, x));
            }
            copies += 1;
            if bytes == before {
                break;
            }
        }
        Ok(Timed {
            groups,
            copies,
            times: Vec::new(),
        })
    }

    /// Times one pass: each group's product with its shared input.
    fn pass(&mut self) -> engine::Result<()> {
        let t = std::time::Instant::now();
        for (mats, x) in &self.groups {
            let mats: Vec<&Mat> = mats.iter().collect();
            Mat::forward_shared(&mats, x)?;
        }
        self.times
            .push(t.elapsed().as_secs_f64() / self.copies as f64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_s_products_are_timed_per_layer_and_for_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let mut shape = engine::gguf::SynthShape {
            architecture: engine::Architecture::Qwen3Moe,
            vocab_size: 512,
            hidden_size: 256,
            intermediate_size: 512,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            num_experts: 8,
            top_k: 2,
            expert_intermediate_size: 256,
            seed: 3,
        };
        let write = |shape: &engine::gguf::SynthShape, name: &str| {
            let path = dir.path().join(name);
            engine::gguf::write_synthetic(
                shape,
                &path,
                engine::gguf::WriteOptions {
                    quant: engine::gguf::Quant::Q8_0,
                    experts: engine::gguf::ExpertLayout::Stacked,
                },
            )
            .unwrap();
            path
        };
        let moe = measure_model(&write(&shape, "moe.gguf"), &|| false).unwrap();
        assert_eq!(moe.layer_s.len(), 3);
        // layers alike are timed once
        assert!(moe.layer_s.iter().all(|&t| t > 0.0 && t == moe.layer_s[0]));
        assert!(moe.head_s > 0.0);
        // the rate of the format holding the bytes, measured alongside
        assert!(
            moe.rates
                .iter()
                .any(|r| r.format == "q8_0" && r.bytes_per_s > 0),
            "{:?}",
            moe.rates
        );
        assert!(measure_model(&dir.path().join("absent.gguf"), &|| false).is_err());
        // asked to stop: stops
        assert!(matches!(
            measure_model(&dir.path().join("moe.gguf"), &|| true),
            Err(TimingError::Stopped)
        ));
        // the products a layer runs: q, k, v, o, the router, and 2 experts' three matrices
        let l = engine::stage_file::layout(&dir.path().join("moe.gguf")).unwrap();
        let infos = engine::stage_file::matrices(&dir.path().join("moe.gguf")).unwrap();
        let p = products(&l, &infos, Some(0));
        let count: usize = p.values().flat_map(|s| s.values()).sum();
        assert_eq!(count, 5 + 2 * 3, "{p:?}");
        assert_eq!(p.len(), 5, "{p:?}");
        shape.num_experts = 0;
        let dense = write(&shape, "dense.gguf");
        let l = engine::stage_file::layout(&dense).unwrap();
        let infos = engine::stage_file::matrices(&dense).unwrap();
        let p = products(&l, &infos, Some(1));
        assert_eq!(p.values().flat_map(|s| s.values()).sum::<usize>(), 7);
        assert_eq!(products(&l, &infos, None).len(), 1);
    }
}
