//! Weight matrices as the model multiplies by them: packed for sinew's kernels
//! ([`crate::kernels`]: Q4_K, Q6_K, Q8_0, f32) where the format and CPU allow, candle's matmul
//! otherwise.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Module, Storage, Tensor};

use crate::error::Result;
use crate::kernels::{Format, Job, PackedMatrix, QuantRow, run};

/// A matrix packed for sinew's kernels on first use, from its GGUF blocks in the model file's
/// mapping: a mixture-of-experts layer's experts, most of which a short prompt never routes to,
/// cost nothing at load.
pub struct LazyPacked {
    map: Arc<memmap2::Mmap>,
    start: usize,
    format: Format,
    rows: usize,
    cols: usize,
    /// Called with each part of the blocks once packed (the loader drops those pages).
    release: fn(&[u8]),
    packed: std::sync::OnceLock<PackedMatrix>,
}

impl LazyPacked {
    /// The `[rows, cols]` matrix of `format` whose blocks start at `start` in `map`, if the
    /// kernels take that shape and the blocks lie inside the mapping.
    pub fn new(
        map: Arc<memmap2::Mmap>,
        start: usize,
        format: Format,
        (rows, cols): (usize, usize),
        release: fn(&[u8]),
    ) -> Option<Self> {
        PackedMatrix::blocks_within(format, rows, cols, start, map.len())?;
        Some(LazyPacked {
            map,
            start,
            format,
            rows,
            cols,
            release,
            packed: std::sync::OnceLock::new(),
        })
    }

    /// The packed matrix, packed now if this is its first use.
    pub fn get(&self) -> &PackedMatrix {
        self.packed.get_or_init(|| {
            let len = self.rows * self.format.row_bytes(self.cols);
            let blocks = &self.map[self.start..self.start + len];
            PackedMatrix::pack_with(self.format, blocks, self.rows, self.cols, self.release)
                .expect("the shape and length were checked when the matrix was made")
        })
    }

    /// Whether it has been packed.
    pub fn is_packed(&self) -> bool {
        self.packed.get().is_some()
    }

    /// Its format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes it holds once packed.
    pub fn size_in_bytes(&self) -> usize {
        PackedMatrix::packed_bytes(self.format, self.rows, self.cols).unwrap_or(0)
    }
}

/// A weight matrix [out, in].
pub enum Mat {
    /// Q4_K, Q6_K, Q8_0 or f32 repacked for sinew's kernels.
    Packed(Arc<PackedMatrix>),
    /// The same, packed on first use.
    Lazy(Arc<LazyPacked>),
    /// Anything else (f32, other quantizations, CPUs without the kernels): candle's matmul.
    Candle(QMatMul),
}

impl Mat {
    /// Packs `q` for the kernels when it is a Q4_K / Q6_K / Q8_0 / f32 matrix of a shape that tiles,
    /// on the CPU, and the CPU runs them; keeps candle's matmul otherwise.
    pub fn new(q: QMatMul) -> Result<Self> {
        match &q {
            QMatMul::QTensor(t) => {
                if let Ok((rows, cols)) = t.shape().dims2()
                    && t.device().is_cpu()
                    && let Some(m) = Self::from_blocks(t.dtype(), &t.data()?, rows, cols)
                {
                    return Ok(m);
                }
            }
            QMatMul::Tensor(t) => {
                if let Ok((rows, cols)) = t.dims2()
                    && t.device().is_cpu()
                    && t.dtype() == DType::F32
                    && Format::F32.native()
                {
                    // packed straight from the tensor's storage (no intermediate copy: a real
                    // model's f32 output head is over a GB)
                    let (storage, layout) = t.storage_and_layout();
                    let packed = match (&*storage, layout.contiguous_offsets()) {
                        (Storage::Cpu(cpu), Some((from, to))) => {
                            PackedMatrix::pack_f32(&cpu.as_slice::<f32>()?[from..to], rows, cols)
                        }
                        _ => None,
                    };
                    if let Some(p) = packed {
                        return Ok(Mat::Packed(Arc::new(p)));
                    }
                }
            }
            QMatMul::TensorF16(_) => {}
        }
        Ok(Mat::Candle(q))
    }

    /// A matrix from GGUF blocks `bytes` of type `dtype`, if the kernels take it.
    pub fn from_blocks(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let f = Format::of(dtype).filter(|f| f.native())?;
        PackedMatrix::pack(f, bytes, rows, cols).map(|p| Mat::Packed(Arc::new(p)))
    }

    /// Packs the lazy matrices among `mats` not packed yet, spread over the engine's worker
    /// threads (candle's thread count): the first step that routes to many new experts packs
    /// them in parallel.
    pub fn pack_pending<'a>(mats: impl IntoIterator<Item = &'a Mat>) {
        let pending: Vec<&LazyPacked> = mats
            .into_iter()
            .filter_map(|m| match m {
                Mat::Lazy(l) if !l.is_packed() => Some(&**l),
                _ => None,
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        let threads = candle_core::utils::get_num_threads().clamp(1, pending.len());
        if threads <= 1 {
            for l in pending {
                l.get();
            }
            return;
        }
        let per = pending.len().div_ceil(threads);
        std::thread::scope(|s| {
            for part in pending.chunks(per) {
                s.spawn(move || {
                    for l in part {
                        l.get();
                    }
                });
            }
        });
    }

    /// The packed matrix (packing a lazy one now), if the kernels hold it.
    pub fn packed(&self) -> Option<&PackedMatrix> {
        match self {
            Mat::Packed(p) => Some(p),
            Mat::Lazy(l) => Some(l.get()),
            Mat::Candle(_) => None,
        }
    }

    /// `x` [.., in] times this matrix transposed: [.., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Self::forward_shared(&[self], x)?.remove(0))
    }

    /// Several matrices applied to the same input (q/k/v, gate/up), the packed ones in one
    /// parallel region with the input quantized once per format.
    pub fn forward_shared(mats: &[&Mat], x: &Tensor) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows: Option<Vec<f32>> = if mats.iter().any(|m| m.packed().is_some()) {
            Some(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        } else {
            None
        };
        let m = x.elem_count().checked_div(k).unwrap_or(0);
        let mut acts = Acts::new(rows.as_deref().unwrap_or(&[]), k);
        let mut outs: Vec<Vec<f32>> = mats
            .iter()
            .map(|mat| match mat.packed() {
                Some(p) => vec![0f32; m * p.rows()],
                None => Vec::new(),
            })
            .collect();
        for mat in mats {
            if let Some(p) = mat.packed() {
                acts.prepare(p.format());
            }
        }
        let mut jobs: Vec<Job<'_>> = mats
            .iter()
            .zip(outs.iter_mut())
            .filter_map(|(mat, out)| {
                let p = mat.packed()?;
                Some(Job {
                    mat: p,
                    acts: acts.get(p.format()),
                    out,
                })
            })
            .collect();
        run(&mut jobs);
        drop(jobs);
        mats.iter()
            .zip(outs)
            .map(|(mat, out)| match mat {
                Mat::Candle(q) => candle_rows(q, x),
                Mat::Packed(_) | Mat::Lazy(_) => {
                    let mut shape = dims.clone();
                    let n: usize = shape[..shape.len().saturating_sub(1)].iter().product();
                    *shape.last_mut().expect("a matrix input has a last dim") =
                        out.len() / n.max(1);
                    Ok(Tensor::from_vec(out, shape, x.device())?)
                }
            })
            .collect()
    }
}

/// Matrices on candle's path with at most this many values (routers, small heads) multiply one
/// row at a time: candle's matmul blocks by the number of rows, which changes the summation order,
/// and a router's near-tied logits would then pick other experts for a sequence depending on what
/// else is in the batch. One row at a time, a row's result never depends on its neighbours.
const ROW_BY_ROW_MAX: usize = 1 << 20;

/// `x` [rows, in] times `q` transposed on candle's path, row-independent for small matrices.
fn candle_rows(q: &QMatMul, x: &Tensor) -> Result<Tensor> {
    let small = match q {
        QMatMul::QTensor(t) => t.shape().elem_count() <= ROW_BY_ROW_MAX,
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() <= ROW_BY_ROW_MAX,
    };
    match x.dims() {
        [rows, _] if *rows > 1 && small => {
            let parts = (0..*rows)
                .map(|r| q.forward(&x.narrow(0, r, 1)?))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        }
        _ => Ok(q.forward(x)?),
    }
}

/// f32 rows prepared on demand for each weight format.
pub(crate) struct Acts<'a> {
    rows: &'a [f32],
    k: usize,
    /// The rows prepared for each format asked for so far (a handful at most).
    prepared: Vec<(Format, Vec<QuantRow>)>,
}

impl<'a> Acts<'a> {
    /// `rows`: consecutive rows of `k` values.
    pub(crate) fn new(rows: &'a [f32], k: usize) -> Self {
        Acts {
            rows,
            k,
            prepared: Vec::new(),
        }
    }

    /// Quantizes the rows for `f` (once).
    pub(crate) fn prepare(&mut self, f: Format) {
        if self.k > 0 && !self.prepared.iter().any(|(g, _)| *g == f) {
            let rows = self.rows.chunks_exact(self.k);
            self.prepared
                .push((f, rows.map(|r| QuantRow::new(f, r)).collect()));
        }
    }

    /// The rows quantized for `f` (after [`Acts::prepare`]).
    pub(crate) fn get(&self, f: Format) -> &[QuantRow] {
        self.prepared
            .iter()
            .find(|(g, _)| *g == f)
            .map_or(&[], |(_, rows)| rows)
    }
}
