//! Weight matrices as the model multiplies by them: packed for sinew's kernels
//! ([`crate::kernels`]: Q4_K, Q6_K, Q8_0, f32) where the format and CPU allow, candle's matmul
//! otherwise.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Module, Storage, Tensor};

use crate::error::Result;
use crate::kernels::{Format, Job, PackedMatrix, QuantRow, run};

/// A weight matrix [out, in].
pub enum Mat {
    /// Q4_K, Q6_K, Q8_0 or f32 repacked for sinew's kernels.
    Packed(Arc<PackedMatrix>),
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

    fn packed(&self) -> Option<&PackedMatrix> {
        match self {
            Mat::Packed(p) => Some(p),
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
                Mat::Packed(p) => {
                    let mut shape = dims.clone();
                    *shape.last_mut().expect("a matrix input has a last dim") = p.rows();
                    Ok(Tensor::from_vec(out, shape, x.device())?)
                }
                Mat::Candle(q) => Ok(q.forward(x)?),
            })
            .collect()
    }
}

/// f32 rows prepared on demand for each weight format.
pub(crate) struct Acts<'a> {
    rows: &'a [f32],
    k: usize,
    q4k: Vec<QuantRow>,
    q6k: Vec<QuantRow>,
    q8_0: Vec<QuantRow>,
    f32: Vec<QuantRow>,
    bf16: Vec<QuantRow>,
    f16: Vec<QuantRow>,
}

impl<'a> Acts<'a> {
    /// `rows`: consecutive rows of `k` values.
    pub(crate) fn new(rows: &'a [f32], k: usize) -> Self {
        Acts {
            rows,
            k,
            q4k: Vec::new(),
            q6k: Vec::new(),
            q8_0: Vec::new(),
            f32: Vec::new(),
            bf16: Vec::new(),
            f16: Vec::new(),
        }
    }

    /// Quantizes the rows for `f` (once).
    pub(crate) fn prepare(&mut self, f: Format) {
        let (k, rows) = (self.k, self.rows);
        let slot = match f {
            Format::Q4K => &mut self.q4k,
            Format::Q6K => &mut self.q6k,
            Format::Q8_0 => &mut self.q8_0,
            Format::F32 => &mut self.f32,
            Format::BF16 => &mut self.bf16,
            Format::F16 => &mut self.f16,
        };
        if slot.is_empty() && k > 0 {
            *slot = rows.chunks_exact(k).map(|r| QuantRow::new(f, r)).collect();
        }
    }

    /// The rows quantized for `f` (after [`Acts::prepare`]).
    pub(crate) fn get(&self, f: Format) -> &[QuantRow] {
        match f {
            Format::Q4K => &self.q4k,
            Format::Q6K => &self.q6k,
            Format::Q8_0 => &self.q8_0,
            Format::F32 => &self.f32,
            Format::BF16 => &self.bf16,
            Format::F16 => &self.f16,
        }
    }
}
