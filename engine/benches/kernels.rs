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
        let mut bytes = 0;
        for _ in 0..MATRICES {
            let w = Tensor::randn(0f32, 1.0, (ROWS, COLS), &dev).expect("random weights");
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let blocks = q.data().expect("blocks").into_owned();
            bytes += blocks.len();
            packed.push(PackedMatrix::pack(format, &blocks, ROWS, COLS).expect("tiles"));
            candle.push(QMatMul::from_qtensor(q).expect("qmatmul"));
        }
        let mut group = c.benchmark_group(format!("gemv {format:?} {MATRICES}x[{ROWS}, {COLS}]"));
        group.throughput(Throughput::Bytes(bytes as u64));
        if format.native() {
            let mut outs = vec![vec![0f32; ROWS]; MATRICES];
            group.bench_function("sinew", |b| {
                b.iter(|| {
                    let a = QuantRow::new(format, &x);
                    let acts = std::slice::from_ref(&a);
                    let mut jobs: Vec<Job<'_>> = packed
                        .iter()
                        .zip(outs.iter_mut())
                        .map(|(mat, out)| Job { mat, acts, out })
                        .collect();
                    run(&mut jobs);
                })
            });
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
