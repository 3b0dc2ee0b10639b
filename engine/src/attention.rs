//! Rotary position embedding and causal attention for a batched step: every row at its own
//! position, each sequence attending over its own cache only.
//!
//! The work for one (sequence, query head) pair depends on nothing else in the batch and runs the
//! same operations in the same order however the batch is made up, so a sequence's attention
//! output is bitwise what it gets alone.

use std::sync::Mutex;

use crate::config::RopeStyle;

/// cos and sin per (row, frequency) for rows at arbitrary positions, computed in f32 the way
/// transformers does.
pub(crate) struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    style: RopeStyle,
}

impl Rope {
    /// Tables for `positions` (one per row), heads of `head_dim` values.
    pub(crate) fn new(positions: &[usize], head_dim: usize, theta: f64, style: RopeStyle) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Rope {
            half,
            cos,
            sin,
            style,
        }
    }

    /// Rotates `x`, laid out `[row][head][head_dim]`, in place.
    pub(crate) fn apply(&self, x: &mut [f32], heads: usize) {
        let d = 2 * self.half;
        for (r, row) in x.chunks_exact_mut(heads * d).enumerate() {
            let cos = &self.cos[r * self.half..(r + 1) * self.half];
            let sin = &self.sin[r * self.half..(r + 1) * self.half];
            for head in row.chunks_exact_mut(d) {
                match self.style {
                    RopeStyle::Half => {
                        let (a, b) = head.split_at_mut(self.half);
                        for i in 0..self.half {
                            let (x1, x2) = (a[i], b[i]);
                            a[i] = x1 * cos[i] - x2 * sin[i];
                            b[i] = x1 * sin[i] + x2 * cos[i];
                        }
                    }
                    RopeStyle::Interleaved => {
                        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                            let (x1, x2) = (pair[0], pair[1]);
                            pair[0] = x1 * cos[i] - x2 * sin[i];
                            pair[1] = x1 * sin[i] + x2 * cos[i];
                        }
                    }
                }
            }
        }
    }
}

/// One sequence's share of a step: its query rows and its whole cache in this layer.
#[derive(Clone, Copy)]
pub(crate) struct SeqAttention<'a> {
    /// First row of the step that belongs to the sequence.
    pub(crate) row: usize,
    /// Its rows in the step.
    pub(crate) rows: usize,
    /// Positions cached before this step (its first row's position).
    pub(crate) start: usize,
    /// Keys `[position][kv head][head_dim]`, this step's rows included.
    pub(crate) k: &'a [f32],
    /// Values, as the keys.
    pub(crate) v: &'a [f32],
}

/// Shapes of one layer's attention.
#[derive(Clone, Copy)]
pub(crate) struct Heads {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// Causal attention of every sequence's rows of `q` (`[row][head][head_dim]`, rotated) over its
/// cache: the output `[row][head][head_dim]`. One unit of work is a sequence's key/value head with
/// the query heads that share it (grouped-query attention), so each cached key and value is read
/// once for the whole group; units run in parallel on candle's worker pool when there is enough
/// work to share.
pub(crate) fn attend(q: &[f32], seqs: &[SeqAttention<'_>], h: Heads) -> Vec<f32> {
    let Heads {
        heads,
        kv_heads,
        head_dim: d,
    } = h;
    let group = heads / kv_heads;
    let total_rows: usize = seqs.iter().map(|s| s.rows).sum();
    // per (sequence, head): the output rows of that head, contiguous; a unit's query heads
    // (kv · group ..) are adjacent
    let mut by_head = vec![0f32; total_rows * heads * d];
    let mut units: Vec<(usize, usize, Mutex<&mut [f32]>)> =
        Vec::with_capacity(seqs.len() * kv_heads);
    let mut rest = by_head.as_mut_slice();
    let mut work = 0usize;
    for (si, s) in seqs.iter().enumerate() {
        work += s.rows * (s.start + s.rows) * heads;
        for kv in 0..kv_heads {
            let (mine, tail) = rest.split_at_mut(group * s.rows * d);
            rest = tail;
            units.push((si, kv, Mutex::new(mine)));
        }
    }
    let run = |range: std::ops::Range<usize>| {
        let mut scores = Vec::new();
        for (si, kv, out) in &units[range] {
            let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
            unit(q, &seqs[*si], *kv, h, &mut out, &mut scores);
        }
    };
    // below this many (row, position, head) triples a parallel region costs more than it saves
    if units.len() <= 1 || work * d < 1 << 16 {
        run(0..units.len());
    } else {
        candle_core::utils::barrier_pool().execute_chunked(units.len(), run);
    }
    drop(units);
    // back to [row][head][head_dim]
    let mut y = vec![0f32; total_rows * heads * d];
    let mut from = 0;
    for s in seqs {
        for head in 0..heads {
            for i in 0..s.rows {
                let dst = ((s.row + i) * heads + head) * d;
                y[dst..dst + d].copy_from_slice(&by_head[from + i * d..from + (i + 1) * d]);
            }
            from += s.rows * d;
        }
    }
    y
}

/// One unit of [`attend`] with the widest vector code this CPU runs. Which code runs depends on
/// the CPU only, never on the batch.
fn unit(
    q: &[f32],
    s: &SeqAttention<'_>,
    kv: usize,
    h: Heads,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU runs AVX2 and FMA, checked just above.
        return unsafe { unit_avx2(q, s, kv, h, out, scores) };
    }
    unit_body::<false>(q, s, kv, h, out, scores)
}

/// [`unit_body`] compiled for AVX2 with fused multiply-adds.
///
/// # Safety
/// The CPU runs AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unit_avx2(
    q: &[f32],
    s: &SeqAttention<'_>,
    kv: usize,
    h: Heads,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    unit_body::<true>(q, s, kv, h, out, scores)
}

/// Sequence `s`'s rows for key/value head `kv` and the `group` query heads that share it, into
/// `out` laid out `[query head of the group][row][head_dim]`. Each (query head, row) is scored
/// against every visible position in order, softmaxed, and sums the values in order: the same
/// operations whatever else the step holds. `FMA`: fused multiply-adds (only where the CPU has
/// them: elsewhere `mul_add` is a library call).
#[inline(always)]
fn unit_body<const FMA: bool>(
    q: &[f32],
    s: &SeqAttention<'_>,
    kv: usize,
    h: Heads,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let (heads, d) = (h.heads, h.head_dim);
    let group = heads / h.kv_heads;
    let stride = h.kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let mut inv = vec![0f32; group];
    for i in 0..s.rows {
        let visible = s.start + i + 1;
        let qs: Vec<&[f32]> = (0..group)
            .map(|g| &q[((s.row + i) * heads + kv * group + g) * d..][..d])
            .collect();
        // scores [query head][position]
        scores.clear();
        scores.resize(group * visible, 0.0);
        for j in 0..visible {
            let kr = &s.k[j * stride + kv * d..][..d];
            for (g, qr) in qs.iter().enumerate() {
                scores[g * visible + j] = dot::<FMA>(qr, kr) * scale;
            }
        }
        for (g, row) in scores.chunks_exact_mut(visible).enumerate() {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            inv[g] = 1.0 / sum;
            out[(g * s.rows + i) * d..][..d].fill(0.0);
        }
        for j in 0..visible {
            let vr = &s.v[j * stride + kv * d..][..d];
            for g in 0..group {
                let p = scores[g * visible + j];
                let o = &mut out[(g * s.rows + i) * d..][..d];
                for (o, &v) in o.iter_mut().zip(vr) {
                    *o = if FMA { p.mul_add(v, *o) } else { *o + p * v };
                }
            }
        }
        for (g, &inv) in inv.iter().enumerate() {
            out[(g * s.rows + i) * d..][..d]
                .iter_mut()
                .for_each(|o| *o *= inv);
        }
    }
}

/// a · b, summed in 16 lanes (so the compiler vectorizes it) and then across them pairwise in a
/// fixed tree (16 → 8 → 4 → 2 → 1: four dependent vector adds, where summing the lanes in turn
/// was fifteen dependent scalar adds per score).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is true only inside `unit_avx2`, which runs where the CPU has AVX2 and FMA.
        return unsafe { dot_avx2(a, b) };
    }
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] = if FMA {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    let mut n = 16;
    while n > 1 {
        n /= 2;
        for l in 0..n {
            acc[l] += acc[l + n];
        }
    }
    acc[0] + tail
}

/// [`dot`]'s fused multiply-add path in AVX2 registers, the same operations in the same order
/// (the 16 lanes as two registers of 8, then the same tree): the compiler turned the portable
/// loop into 2-lane code.
///
/// # Safety
/// The CPU runs AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let whole = n / 16 * 16;
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < whole {
        // SAFETY: i + 16 ≤ n, inside both slices.
        unsafe {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), hi);
        }
        i += 16;
    }
    let tail: f32 = a[whole..n]
        .iter()
        .zip(&b[whole..n])
        .map(|(x, y)| x * y)
        .sum();
    // 16 → 8 → 4 → 2 → 1, lane l plus lane l + half at each step
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
    _mm_cvtss_f32(s1) + tail
}

/// A decode step's attention, set up to be timed: one query row over `positions` cached
/// positions in each of `layers` caches of its own (random keys and values), the way a model's
/// decode step runs it layer after layer. How a node measures what attention costs it
/// (`cluster::node::measure_speed`) without a model.
pub struct AttentionProbe {
    heads: Heads,
    positions: usize,
    q: Vec<f32>,
    caches: Vec<(Vec<f32>, Vec<f32>)>,
}

impl AttentionProbe {
    /// A probe of `heads` query heads sharing `kv_heads` key/value heads of `head_dim` values,
    /// `positions` cached (at least 1), over `layers` caches (at least 1). `None` where the
    /// heads do not divide into groups or a size is 0.
    pub fn new(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        positions: usize,
        layers: usize,
    ) -> Option<Self> {
        if heads == 0 || kv_heads == 0 || head_dim == 0 || !heads.is_multiple_of(kv_heads) {
            return None;
        }
        let positions = positions.max(1);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        let q = random(heads * head_dim);
        let per = positions * kv_heads * head_dim;
        let caches = (0..layers.max(1))
            .map(|_| (random(per), random(per)))
            .collect();
        Some(Self {
            heads: Heads {
                heads,
                kv_heads,
                head_dim,
            },
            positions,
            q,
            caches,
        })
    }

    /// Multiply-adds of one layer's attention: scores and weighted values,
    /// `2 · heads · head_dim · positions`.
    pub fn multiply_adds(&self) -> u64 {
        2 * (self.heads.heads * self.heads.head_dim * self.positions) as u64
    }

    /// Layers the probe runs.
    pub fn layers(&self) -> usize {
        self.caches.len()
    }

    /// Runs every layer's attention once (the last cached position is the query's own); returns
    /// a sum of the outputs, so that the work cannot be skipped.
    pub fn run(&self) -> f32 {
        let mut sum = 0f32;
        for (k, v) in &self.caches {
            let seq = SeqAttention {
                row: 0,
                rows: 1,
                start: self.positions - 1,
                k,
                v,
            };
            sum += attend(&self.q, &[seq], self.heads).iter().sum::<f32>();
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Attention of one row computed plainly in f64.
    fn naive(q: &[f32], k: &[f32], v: &[f32], visible: usize, d: usize, stride: usize) -> Vec<f64> {
        let s: Vec<f64> = (0..visible)
            .map(|j| {
                (0..d)
                    .map(|x| q[x] as f64 * k[j * stride + x] as f64)
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..d)
            .map(|x| {
                (0..visible)
                    .map(|j| e[j] * v[j * stride + x] as f64)
                    .sum::<f64>()
                    / sum
            })
            .collect()
    }

    proptest! {
        /// Each sequence's rows attend causally over their own cache, with query heads grouped
        /// onto key/value heads; a batch gives each sequence the bits it gets alone.
        #[test]
        fn attention_is_causal_per_sequence_and_independent_of_the_batch(
            lens in prop::collection::vec((0usize..12, 1usize..6), 1..5),
            seed in any::<u64>(),
        ) {
            let h = Heads { heads: 4, kv_heads: 2, head_dim: 8 };
            let d = h.head_dim;
            let stride = h.kv_heads * d;
            let mut rng = seed;
            let mut next = || {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((rng >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            };
            let total: usize = lens.iter().map(|l| l.1).sum();
            let q: Vec<f32> = (0..total * h.heads * d).map(|_| next()).collect();
            let caches: Vec<(Vec<f32>, Vec<f32>)> = lens
                .iter()
                .map(|&(start, rows)| {
                    let n = (start + rows) * stride;
                    ((0..n).map(|_| next()).collect(), (0..n).map(|_| next()).collect())
                })
                .collect();
            let mut row = 0;
            let seqs: Vec<SeqAttention<'_>> = lens
                .iter()
                .zip(&caches)
                .map(|(&(start, rows), (k, v))| {
                    let s = SeqAttention { row, rows, start, k, v };
                    row += rows;
                    s
                })
                .collect();
            let y = attend(&q, &seqs, h);
            for s in &seqs {
                let alone_q = &q[s.row * h.heads * d..(s.row + s.rows) * h.heads * d];
                let alone = attend(alone_q, &[SeqAttention { row: 0, ..*s }], h);
                prop_assert_eq!(&y[s.row * h.heads * d..(s.row + s.rows) * h.heads * d], &alone[..]);
                for i in 0..s.rows {
                    for head in 0..h.heads {
                        let kv = head / 2;
                        let qr = &alone_q[(i * h.heads + head) * d..][..d];
                        let want = naive(qr, &s.k[kv * d..], &s.v[kv * d..], s.start + i + 1, d, stride);
                        let got = &alone[(i * h.heads + head) * d..][..d];
                        for (g, w) in got.iter().zip(&want) {
                            prop_assert!((*g as f64 - w).abs() < 1e-5, "{} vs {}", g, w);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn probe_shapes_and_runs() {
        assert!(AttentionProbe::new(6, 4, 8, 3, 1).is_none());
        assert!(AttentionProbe::new(4, 0, 8, 3, 1).is_none());
        let p = AttentionProbe::new(8, 2, 16, 5, 3).unwrap();
        assert_eq!(p.multiply_adds(), 2 * 8 * 16 * 5);
        assert_eq!(p.layers(), 3);
        // softmax weights sum to 1: each output is a convex mix of values in [-0.5, 0.5]
        let s = p.run();
        assert!(s.is_finite() && s.abs() <= 0.5 * 8.0 * 16.0 * 3.0, "{s}");
        assert_eq!(s.to_bits(), p.run().to_bits());
    }
}
