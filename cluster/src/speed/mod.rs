//! How fast this node runs the parts of a decode step, measured without a model: what
//! [`crate::predict`] turns into predicted tokens per second.
//!
//! - The matrix-vector kernels, per weight format ([`measure_speed`], at start, sent in the
//!   node's advert): a product of one row with a matrix of `b` bytes costs
//!   `call_ns + b / bytes_per_s`. The two figures come from two sets of random matrices streamed
//!   from memory, one of large matrices (a dense model's projections) and one of small ones (an
//!   expert's), fitted to that line: a model of many small experts pays the fixed cost per
//!   product far more often than its bytes alone say.
//! - Attention over the cache, for a given model and position ([`measure_attention`]): the
//!   engine's own attention on random keys and values of the model's shape.

use engine::ModelConfig;

use crate::wire::Rate;

mod model;

pub use model::{ModelTimes, TimingError, measure_model};

/// Bytes of each set of matrices a format's rate is measured on: four times the last-level
/// cache, 64–256 MiB, so that the products stream from memory as a model's weights do (at 48 MiB
/// on a 32 MiB L3 the rates came out about a sixth above a model's). In a debug build, whose
/// kernels are no measure of anything, a small set that costs little.
fn speed_bytes() -> usize {
    if cfg!(debug_assertions) {
        return 2 << 20;
    }
    (4 * last_level_cache().unwrap_or(32 << 20)).clamp(64 << 20, 256 << 20)
}

/// The size of this CPU's largest cache, where the system says (Linux's sysfs).
fn last_level_cache() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let size = std::fs::read_to_string(e.ok()?.path().join("size")).ok()?;
        let size = size.trim();
        let (n, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
        let n: usize = n.parse().ok()?;
        match unit {
            "K" => Some(n << 10),
            "M" => Some(n << 20),
            _ => None,
        }
    })
    .max()
}

/// How long each format's products run.
const RATE_WINDOW: std::time::Duration =
    std::time::Duration::from_millis(if cfg!(debug_assertions) { 20 } else { 300 });

static SPEED: std::sync::OnceLock<Vec<Rate>> = std::sync::OnceLock::new();

/// Starts measuring this node's kernel rates ([`measure_speed`]) on a thread of its own, once
/// per process; [`speed_now`] and [`speed_wait`] read the result.
pub fn measure_speed_in_background() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("sinew-speed".into())
            .spawn(|| {
                // test-only: how the tests make a worker join before its rates are measured
                if let Some(ms) = std::env::var("SINEW_TEST_SPEED_DELAY_MS")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                let rates = measure_speed();
                let text: Vec<String> = rates
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {:.1} GB/s + {:.1} µs",
                            r.format,
                            r.bytes_per_s as f64 / 1e9,
                            r.call_ns as f64 / 1e3
                        )
                    })
                    .collect();
                tracing::info!(rates = %text.join(", "), "kernel rates measured");
                let _ = SPEED.set(rates);
            });
    });
}

/// The kernel rates if measured by now (empty if not yet).
pub fn speed_now() -> Vec<Rate> {
    SPEED.get().cloned().unwrap_or_default()
}

/// The kernel rates, measuring them first if no measurement has started, waiting at most
/// `timeout` for one under way (then empty).
pub fn speed_wait(timeout: std::time::Duration) -> Vec<Rate> {
    measure_speed_in_background();
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if let Some(s) = SPEED.get() {
            return s.clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Vec::new()
}

/// Random matrices of one format, each with its activation row.
struct MatrixSet {
    mats: Vec<(engine::linear::Mat, candle_core::Tensor)>,
    bytes: usize,
}

impl MatrixSet {
    /// Matrices of `shapes` (rows, columns) in turn, `total` bytes or more (every shape once at
    /// least); `None` where the kernels do not take the format.
    fn new(
        dtype: candle_core::quantized::GgmlDType,
        shapes: &[(usize, usize)],
        total: usize,
        seed: &mut u64,
    ) -> Option<Self> {
        let f = engine::kernels::Format::of(dtype)?;
        // a random 64 KiB pattern, repeated; finite scales and values: every 16-bit half's
        // exponent below all ones
        let mut pattern = vec![0u8; 64 << 10];
        for c in pattern.chunks_mut(8) {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            c.copy_from_slice(&(*seed & 0x3fff_3fff_3fff_3fff).to_le_bytes());
        }
        let mut set = MatrixSet {
            mats: Vec::new(),
            bytes: 0,
        };
        for &(rows, cols) in shapes.iter().cycle() {
            if set.bytes >= total && set.mats.len() >= shapes.len() {
                break;
            }
            let row = f.row_bytes(cols);
            let mut bytes = vec![0u8; rows * row];
            for c in bytes.chunks_mut(pattern.len()) {
                c.copy_from_slice(&pattern[..c.len()]);
            }
            let m = engine::linear::Mat::from_blocks(dtype, &bytes, rows, cols)?;
            let x = candle_core::Tensor::ones(
                (1, cols),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .ok()?;
            set.bytes += rows * row;
            set.mats.push((m, x));
        }
        Some(set)
    }

    /// One product with every matrix, one after the other: the seconds, `None` on an error.
    fn pass(&self) -> Option<f64> {
        let t = std::time::Instant::now();
        for (m, x) in &self.mats {
            m.forward(x).ok()?;
        }
        Some(t.elapsed().as_secs_f64())
    }
}

/// The line `n · call + bytes / rate` through two sets' (matrices, bytes, seconds): the rate in
/// bytes per second and the cost per product in seconds. Where the noise puts the fixed cost below
/// zero, none, and the rate of both sets together.
fn fit(large: (usize, usize, f64), small: (usize, usize, f64)) -> (f64, f64) {
    let ((nl, bl, tl), (ns, bs, ts)) = (large, small);
    let (nl, bl, ns, bs) = (nl as f64, bl as f64, ns as f64, bs as f64);
    let det = ns * bl - nl * bs;
    if det > 0.0 {
        let call = (ts * bl - tl * bs) / det;
        let per_byte = (ns * tl - nl * ts) / det;
        if call >= 0.0 && per_byte > 0.0 {
            return (1.0 / per_byte, call);
        }
    }
    ((bl + bs) / (tl + ts).max(1e-12), 0.0)
}

/// A matrix's rows and columns.
type Shape = (usize, usize);

/// The large and the small matrices a format's rate is fitted over (rows, columns): a dense
/// model's projections, and an expert's. In a debug build, whose kernels are no measure of
/// anything, smaller ones.
fn probe_shapes() -> (&'static [Shape], &'static [Shape]) {
    if cfg!(debug_assertions) {
        (&[(1024, 1024)], &[(256, 256)])
    } else {
        (
            &[(8192, 2048), (2048, 8192), (4096, 4096)],
            &[(768, 2048), (2048, 768)],
        )
    }
}

/// One format's two sets of matrices, timed pass after pass: the rate and the fixed cost per
/// product they fit.
struct FormatProbe {
    format: String,
    large: MatrixSet,
    small: MatrixSet,
    large_s: Vec<f64>,
    small_s: Vec<f64>,
}

impl FormatProbe {
    /// Both sets, four times the last-level cache each; `None` where the kernels do not take
    /// the format.
    fn new(dtype: candle_core::quantized::GgmlDType, seed: &mut u64) -> Option<Self> {
        let (large, small) = probe_shapes();
        Some(FormatProbe {
            format: engine::stage_file::format_name(dtype),
            large: MatrixSet::new(dtype, large, speed_bytes(), seed)?,
            small: MatrixSet::new(dtype, small, speed_bytes(), seed)?,
            large_s: Vec::new(),
            small_s: Vec::new(),
        })
    }

    /// Passes timed so far.
    fn passes(&self) -> usize {
        self.large_s.len()
    }

    /// Times one pass over each set; `None` on an error.
    fn pass(&mut self) -> Option<()> {
        let (a, b) = (self.large.pass()?, self.small.pass()?);
        self.large_s.push(a);
        self.small_s.push(b);
        Some(())
    }

    /// The rate the passes' medians fit; `None` before any pass.
    fn rate(mut self) -> Option<Rate> {
        if self.large_s.is_empty() {
            return None;
        }
        let (bytes_per_s, call_s) = fit(
            (
                self.large.mats.len(),
                self.large.bytes,
                median(&mut self.large_s),
            ),
            (
                self.small.mats.len(),
                self.small.bytes,
                median(&mut self.small_s),
            ),
        );
        Some(Rate {
            format: self.format,
            bytes_per_s: bytes_per_s as u64,
            call_ns: (call_s * 1e9) as u64,
        })
    }
}

/// The formats the kernels may run, in the order they are measured.
const FORMATS: [candle_core::quantized::GgmlDType; 6] = {
    use candle_core::quantized::GgmlDType as D;
    [D::Q4K, D::Q6K, D::Q8_0, D::BF16, D::F16, D::F32]
};

/// How fast this node's matrix-vector kernels run each weight format (one activation row, the
/// process's compute threads): the bytes per second and the fixed cost per product, fitted over
/// a set of large matrices (8192 × 2048, 2048 × 8192, 4096 × 4096) and one of small ones
/// (768 × 2048, 2048 × 768: an expert's), each four times the last-level cache (64–256 MiB).
/// The two sets run in turn for 300 ms per format (in a debug build, 2 MiB sets of smaller
/// matrices and 20 ms); each set's median time goes into the fit. Formats the kernels do not
/// run here are left out.
pub fn measure_speed() -> Vec<Rate> {
    let mut out = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for dtype in FORMATS {
        let Some(mut probe) = FormatProbe::new(dtype, &mut seed) else {
            continue;
        };
        // sustained, not the luckiest moment: passes for at least RATE_WINDOW (and 5)
        let started = std::time::Instant::now();
        while probe.passes() < 5 || (started.elapsed() < RATE_WINDOW && probe.passes() < 1000) {
            if probe.pass().is_none() {
                break;
            }
        }
        out.extend(probe.rate());
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds one decode row's attention takes in one layer of a model of `config` at context
/// position `position`, on this node: the engine's attention over random keys and values of the
/// model's shape, run layer after layer over caches of four times the last-level cache in all
/// (as a decode step finds them: evicted by the weights streamed since), the median of passes
/// over 100 ms (20 in a debug build). `None` for a configuration without heads.
pub fn measure_attention(config: &ModelConfig, position: usize) -> Option<f64> {
    let (heads, kv, d) = (config.num_heads, config.num_kv_heads, config.head_dim);
    let positions = position.max(1);
    let per_layer = positions
        .saturating_mul(kv)
        .saturating_mul(d)
        .saturating_mul(2 * std::mem::size_of::<f32>());
    let layers = (speed_bytes() / per_layer.max(1)).clamp(1, 4096);
    let probe = engine::AttentionProbe::new(heads, kv, d, positions, layers)?;
    let window = std::time::Duration::from_millis(if cfg!(debug_assertions) { 20 } else { 100 });
    let mut times = Vec::new();
    let started = std::time::Instant::now();
    while times.len() < 3 || (started.elapsed() < window && times.len() < 1000) {
        let t = std::time::Instant::now();
        std::hint::black_box(probe.run());
        times.push(t.elapsed().as_secs_f64() / probe.layers() as f64);
    }
    Some(median(&mut times))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_last_level_cache_is_read_where_the_system_says() {
        if std::path::Path::new("/sys/devices/system/cpu/cpu0/cache").exists() {
            let c = last_level_cache();
            assert!(c.is_some_and(|c| c >= 64 << 10), "{c:?}");
        }
        let set = speed_bytes();
        if cfg!(debug_assertions) {
            assert_eq!(set, 2 << 20);
        } else {
            assert!((64 << 20..=256 << 20).contains(&set), "{set}");
        }
    }

    #[test]
    fn speed_is_measured_for_the_formats_the_kernels_run() {
        let s = measure_speed();
        if engine::kernels::Format::Q4K.native() {
            assert!(
                s.iter().any(|r| r.format == "q4_k" && r.bytes_per_s > 0),
                "{s:?}"
            );
        }
    }

    #[test]
    fn attention_is_measured_for_a_shape_and_grows_with_the_position() {
        let mut c = engine::gguf::SynthShape {
            architecture: engine::Architecture::Llama,
            vocab_size: 512,
            hidden_size: 512,
            intermediate_size: 1024,
            num_layers: 2,
            num_heads: 8,
            num_kv_heads: 2,
            head_dim: 64,
            num_experts: 0,
            top_k: 0,
            expert_intermediate_size: 0,
            seed: 1,
        }
        .config();
        let short = measure_attention(&c, 4).unwrap();
        let long = measure_attention(&c, 4096).unwrap();
        assert!(short > 0.0 && long > short, "{short} {long}");
        c.num_kv_heads = 3;
        assert!(measure_attention(&c, 4).is_none());
    }

    proptest! {
        /// Times made exactly by a line are fitted back to it; noise that would make the fixed
        /// cost negative gives none and a positive rate.
        #[test]
        fn the_fit_recovers_a_line(
            rate in 1e8f64..1e11,
            call in 0f64..1e-4,
            nl in 1usize..10,
            ns in 20usize..400,
            bytes in 1usize << 20..1 << 28,
        ) {
            let t = |n: usize| n as f64 * call + bytes as f64 / rate;
            let (r, c) = fit((nl, bytes, t(nl)), (ns, bytes, t(ns)));
            prop_assert!((r / rate - 1.0).abs() < 1e-6, "{r} {rate}");
            prop_assert!((c - call).abs() < 1e-9 + call * 1e-6, "{c} {call}");
            // the small set faster than the large one: no line with a fixed cost ≥ 0
            let (r, c) = fit((nl, bytes, t(nl)), (ns, bytes, t(nl) * 0.5));
            prop_assert!(c == 0.0 && r > 0.0);
        }
    }
}
