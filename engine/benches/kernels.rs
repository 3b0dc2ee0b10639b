//! Decode-shaped matrix–vector products: sinew's packed kernels against candle's own quantized
//! matmul on the same GGUF blocks, per format, one activation row — what a decode step does for
//! every active matrix (for f32, candle's `x · Wᵀ`, what candle-nn's `Linear` runs). Reported as bytes of weights streamed per second (criterion's
//! throughput), so the two rows of a group compare directly and against the machine's memory
//! bandwidth.
//!
//! `cargo bench -p engine --bench kernels` (set `RAYON_NUM_THREADS` for the thread count; both
//! sides use candle's worker pool). sinew's row runs on `Isa::selected` (`SINEW_KERNELS=avx2` on an
//! AVX-512 CPU measures the AVX2 kernels); on a CPU with neither only candle's row is measured.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use engine::kernels::{Format, Job, PackedMatrix, QuantRow, run};

/// The routed experts' down projections of twelve layers of a Qwen3-30B-A3B-shaped decode step:
/// 96 matrices of [2048, 768], 85–160 MB in all depending on the format, so the set does not sit
/// in the caches.
const ROWS: usize = 2048;
const COLS: usize = 768;
const MATRICES: usize = 96;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let x: Vec<f32> = (0..COLS).map(|i| (i as f32 * 0.37).sin()).collect();
    let xt = Tensor::from_slice(&x, (1, COLS), &dev).expect("activation tensor");
    for (format, dtype) in [
        (Format::Q4K, GgmlDType::Q4K),
        (Format::Q6K, GgmlDType::Q6K),
        (Format::Q8_0, GgmlDType::Q8_0),
        (Format::F32, GgmlDType::F32),
    ] {
        let mut packed = Vec::with_capacity(MATRICES);
        let mut candle = Vec::with_capacity(MATRICES);
        let mut all = Vec::new();
        for _ in 0..MATRICES {
            let w = Tensor::randn(0f32, 1.0, (ROWS, COLS), &dev).expect("random weights");
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let blocks = q.data().expect("blocks").into_owned();
            packed.push(PackedMatrix::pack(format, &blocks, ROWS, COLS).expect("tiles"));
            all.extend_from_slice(&blocks);
            candle.push(QMatMul::from_qtensor(q).expect("qmatmul"));
        }
        let bytes = all.len();
        // the same blocks read where they lie in a mapping, as a GGUF file's Q8_0 experts are
        let mut in_place = Vec::new();
        if format.reads_in_place() && format.native() {
            let mut map = memmap2::MmapMut::map_anon(bytes).expect("anonymous map");
            map.copy_from_slice(&all);
            let map = Arc::new(map.make_read_only().expect("read-only"));
            let per = bytes / MATRICES;
            in_place = (0..MATRICES)
                .map(|m| PackedMatrix::in_place(map.clone(), m * per, format, ROWS, COLS))
                .collect::<Option<Vec<_>>>()
                .expect("in place");
        }
        drop(all);
        let mut group = c.benchmark_group(format!("gemv {format:?} {MATRICES}x[{ROWS}, {COLS}]"));
        group.throughput(Throughput::Bytes(bytes as u64));
        if format.native() {
            let mut outs = vec![vec![0f32; 4 * ROWS]; MATRICES];
            let xs: Vec<Vec<f32>> = (0..4)
                .map(|r| x.iter().map(|v| v * (1.0 + r as f32 * 0.1)).collect())
                .collect();
            for (name, mats) in [("sinew", &packed), ("sinew in place", &in_place)] {
                if mats.is_empty() {
                    continue;
                }
                // one activation row (a decode step), and four (a batched step)
                for n in [1, 4] {
                    let label = if n == 1 {
                        name.to_string()
                    } else {
                        format!("{name}, {n} rows")
                    };
                    group.bench_function(label, |b| {
                        b.iter(|| {
                            let acts: Vec<QuantRow> =
                                xs[..n].iter().map(|x| QuantRow::new(format, x)).collect();
                            let mut jobs: Vec<Job<'_>> = mats
                                .iter()
                                .zip(outs.iter_mut())
                                .map(|(mat, out)| Job {
                                    mat,
                                    acts: &acts,
                                    out: &mut out[..n * ROWS],
                                })
                                .collect();
                            run(&mut jobs);
                        })
                    });
                }
            }
        }
        group.bench_function("candle", |b| {
            b.iter(|| {
                for m in &candle {
                    std::hint::black_box(m.forward(&xt).expect("matmul"));
                }
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
