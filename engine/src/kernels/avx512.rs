//! The AVX-512 F/BW/VNNI kernels (Zen 4, Ice Lake and later): one 64-byte load holds a tile's 16
//! rows, `vpdpbusd` multiplies them by four broadcast activation values.

use std::arch::x86_64::*;

use super::kind::{BF16, F16, F32};
use super::{
    F32_TILE, FloatOut, HALF_TILE, Q4K_MN, Q4K_QS, Q4K_SC, Q4K_TILE, Q6K_Q, Q6K_SC, Q6K_SUB,
    Q6K_TILE, Q8_0_BYTES, Q8_0_TILE, QK_K, QK8_0, QuantRow, ROWS_PER_PASS, STREAMS, TILE_ROWS,
};

/// 1..=[`STREAMS`] float tile slabs of weight kind `kind` times 1..=[`ROWS_PER_PASS`] rows `xs`,
/// into `out[slab][row]`: every slab read side by side (16 accumulators at most, of 32
/// registers).
///
/// # Safety
/// AVX-512 F and F16C available; every slab holds `xs[i].len()` tiles of `kind` for every `i`.
pub(super) unsafe fn float_rows(kind: u8, slabs: &[&[u8]], xs: &[&[f32]], out: &mut FloatOut) {
    let s = |i: usize| slabs[i.min(slabs.len() - 1)];
    let x = |j: usize| xs[j.min(xs.len() - 1)];
    macro_rules! rows {
        ($S:literal, $W:expr, $sl:expr) => {
            match xs.len() {
                1 => tile_rows_f32::<$S, 1, $W>($sl, [x(0)], out),
                2 => tile_rows_f32::<$S, 2, $W>($sl, [x(0), x(1)], out),
                3 => tile_rows_f32::<$S, 3, $W>($sl, [x(0), x(1), x(2)], out),
                _ => tile_rows_f32::<$S, 4, $W>($sl, [x(0), x(1), x(2), x(3)], out),
            }
        };
    }
    macro_rules! streams {
        ($W:expr) => {
            match slabs.len() {
                1 => rows!(1, $W, [s(0)]),
                2 => rows!(2, $W, [s(0), s(1)]),
                3 => rows!(3, $W, [s(0), s(1), s(2)]),
                _ => rows!(4, $W, [s(0), s(1), s(2), s(3)]),
            }
        };
    }
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match kind {
            BF16 => streams!(BF16),
            F16 => streams!(F16),
            _ => streams!(F32),
        }
    }
}

/// `S` float tile slabs (16 rows each, every input value; weights of kind `W`) times each of
/// the `N` rows `x`, into `out[slab][row]`. The slabs are read side by side, one sequential
/// stream each. bf16 and f16 weights widen to f32 exactly, so the products and their order
/// are the f32 kernel's on the same values.
///
/// # Safety
/// AVX-512 F and F16C available; every slab holds `x[i].len()` tiles of kind `W` for every
/// `i`.
#[target_feature(enable = "avx512f,f16c")]
// `s` and `n` index the slabs, the rows and the accumulators together
#[allow(clippy::needless_range_loop)]
unsafe fn tile_rows_f32<const S: usize, const N: usize, const W: u8>(
    slabs: [&[u8]; S],
    x: [&[f32]; N],
    out: &mut FloatOut,
) {
    let cols = x[0].len();
    let tile = if W == F32 { F32_TILE } else { HALF_TILE };
    debug_assert!(S <= STREAMS && N <= ROWS_PER_PASS);
    debug_assert!(x.iter().all(|r| r.len() == cols));
    debug_assert!(slabs.iter().all(|s| s.len() == cols * tile));
    let w = slabs.map(|s| s.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); N]; S];
    // SAFETY: k < cols, so every load lies in its slab and every read in each row.
    unsafe {
        for k in 0..cols {
            let xv: [__m512; N] = std::array::from_fn(|n| _mm512_set1_ps(*x[n].get_unchecked(k)));
            for s in 0..S {
                let p = w[s].add(k * tile);
                let wv = match W {
                    F32 => _mm512_loadu_ps(p as *const f32),
                    // bf16 is the top half of an f32
                    BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                        _mm256_loadu_si256(p as *const _),
                    ))),
                    _ => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const _)),
                };
                for n in 0..N {
                    acc[s][n] = _mm512_fmadd_ps(wv, xv[n], acc[s][n]);
                }
            }
        }
        for s in 0..S {
            for n in 0..N {
                _mm512_storeu_ps(out[s][n].as_mut_ptr(), acc[s][n]);
            }
        }
    }
}

/// One Q4_K tile row-slab (16 rows, every block of the input) times each of the `N` rows `a`,
/// into `out[n]`. Each 64-byte load of weights is unpacked once and multiplied by every row (this
/// is where several sequences in a step pay off); each row's sums run in the same order whatever
/// `N` is, so a row's result does not depend on the rows beside it.
///
/// # Safety
/// AVX-512 F/BW/VNNI and F16C available; `slab` holds `a[i].len() / 256` Q4_K tiles for every
/// `i`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
#[allow(clippy::needless_range_loop)] // `n` indexes the rows and their accumulators together
pub(super) unsafe fn tile_rows_q4k<const N: usize>(
    slab: &[u8],
    a: [&QuantRow; N],
    out: &mut [[f32; TILE_ROWS]; N],
) {
    let blocks = a[0].len() / QK_K;
    debug_assert_eq!(slab.len(), blocks * Q4K_TILE);
    debug_assert!(a.iter().all(|r| r.len() == a[0].len()));
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        // SAFETY: tile b is within the slab and block b within every activation row (the
        // caller's contract).
        unsafe {
            let t = slab.as_ptr().add(b * Q4K_TILE);
            let dt = _mm512_cvtph_ps(_mm256_loadu_si256(t as *const _));
            let dmt = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(32) as *const _));
            let d: [__m512; N] = std::array::from_fn(|n| {
                _mm512_mul_ps(dt, _mm512_set1_ps(*a[n].d.get_unchecked(b)))
            });
            let dmin: [__m512; N] = std::array::from_fn(|n| {
                _mm512_mul_ps(dmt, _mm512_set1_ps(*a[n].d.get_unchecked(b)))
            });
            for j in 0..8 {
                let q = t.add(Q4K_QS + j * 256);
                let mut lo_acc = [_mm512_setzero_si512(); N];
                let mut hi_acc = [_mm512_setzero_si512(); N];
                for g in 0..4 {
                    let v = _mm512_loadu_si512(q.add(64 * g) as *const _);
                    let lo = _mm512_and_si512(v, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                    for n in 0..N {
                        let y = a[n].qs.as_ptr().add(b * QK_K + 32 * j);
                        let ylo = _mm512_set1_epi32((y.add(4 * g) as *const i32).read_unaligned());
                        let yhi =
                            _mm512_set1_epi32((y.add(16 + 4 * g) as *const i32).read_unaligned());
                        lo_acc[n] = _mm512_dpbusd_epi32(lo_acc[n], lo, ylo);
                        hi_acc[n] = _mm512_dpbusd_epi32(hi_acc[n], hi, yhi);
                    }
                }
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    t.add(Q4K_SC + 16 * j) as *const _,
                )));
                let mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    t.add(Q4K_MN + 16 * j) as *const _,
                )));
                for n in 0..N {
                    let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[n], hi_acc[n]));
                    let bsum = _mm512_set1_ps(*a[n].bsum.get_unchecked(b * 8 + j) as f32);
                    acc[n] = _mm512_fmadd_ps(_mm512_mul_ps(d[n], sc), dot, acc[n]);
                    acc[n] = _mm512_fnmadd_ps(_mm512_mul_ps(dmin[n], mn), bsum, acc[n]);
                }
            }
        }
    }
    for n in 0..N {
        // SAFETY: out[n] holds 16 f32.
        unsafe { _mm512_storeu_ps(out[n].as_mut_ptr(), acc[n]) };
    }
}

/// One Q6_K tile row-slab (16 rows, every block of the input) times each of the `N` rows `a`,
/// into `out[n]`, each weight load unpacked once for every row. The 6-bit values go unsigned
/// into `vpdpbusd` and the offset of 32 comes off per 16 values (`32 · Σ y`); a block's sum
/// stays in i32 (|sum| < 2³⁰) until its one f32 step.
///
/// # Safety
/// AVX-512 F/BW/VNNI and F16C available; `slab` holds `a[i].len() / 256` Q6_K tiles for every
/// `i`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
#[allow(clippy::needless_range_loop)] // `n` indexes the rows and their accumulators together
pub(super) unsafe fn tile_rows_q6k<const N: usize>(
    slab: &[u8],
    a: [&QuantRow; N],
    out: &mut [[f32; TILE_ROWS]; N],
) {
    let blocks = a[0].len() / QK_K;
    debug_assert_eq!(slab.len(), blocks * Q6K_TILE);
    debug_assert!(a.iter().all(|r| r.len() == a[0].len()));
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        // SAFETY: tile b is within the slab and block b within every activation row (the
        // caller's contract).
        unsafe {
            let t = slab.as_ptr().add(b * Q6K_TILE);
            let mut total = [_mm512_setzero_si512(); N];
            for j in 0..8 {
                // bits 4 and 5 of each byte of high(h)[g]: the high 2 bits of value 4g + i,
                // stored at bit 2g
                let high = |h: __m512i| {
                    [
                        _mm512_and_si512(_mm512_slli_epi16::<4>(h), m30),
                        _mm512_and_si512(_mm512_slli_epi16::<2>(h), m30),
                        _mm512_and_si512(h, m30),
                        _mm512_and_si512(_mm512_srli_epi16::<2>(h), m30),
                    ]
                };
                let q = t.add(Q6K_Q + Q6K_SUB * j);
                let h0 = high(_mm512_loadu_si512(q as *const _));
                let h1 = high(_mm512_loadu_si512(q.add(64) as *const _));
                let mut lo_acc = [_mm512_setzero_si512(); N];
                let mut hi_acc = [_mm512_setzero_si512(); N];
                for g in 0..4 {
                    let v = _mm512_loadu_si512(q.add(128 + 64 * g) as *const _);
                    let lo = _mm512_or_si512(_mm512_and_si512(v, m4), h0[g]);
                    let hi =
                        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(v), m4), h1[g]);
                    for n in 0..N {
                        let y = a[n].qs.as_ptr().add(b * QK_K + 32 * j);
                        let ylo = _mm512_set1_epi32((y.add(4 * g) as *const i32).read_unaligned());
                        let yhi =
                            _mm512_set1_epi32((y.add(16 + 4 * g) as *const i32).read_unaligned());
                        lo_acc[n] = _mm512_dpbusd_epi32(lo_acc[n], lo, ylo);
                        hi_acc[n] = _mm512_dpbusd_epi32(hi_acc[n], hi, yhi);
                    }
                }
                let sc_lo =
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(t.add(Q6K_SC + 32 * j) as *const _));
                let sc_hi =
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(t.add(Q6K_SC + 32 * j + 16) as *const _));
                for n in 0..N {
                    let s = a[n].bsum.as_ptr().add(b * 16 + 2 * j);
                    let lo = _mm512_sub_epi32(lo_acc[n], _mm512_set1_epi32(32 * *s));
                    let hi = _mm512_sub_epi32(hi_acc[n], _mm512_set1_epi32(32 * *s.add(1)));
                    total[n] = _mm512_add_epi32(total[n], _mm512_mullo_epi32(sc_lo, lo));
                    total[n] = _mm512_add_epi32(total[n], _mm512_mullo_epi32(sc_hi, hi));
                }
            }
            let dt = _mm512_cvtph_ps(_mm256_loadu_si256(t as *const _));
            for n in 0..N {
                let d = _mm512_mul_ps(dt, _mm512_set1_ps(*a[n].d.get_unchecked(b)));
                acc[n] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(total[n]), acc[n]);
            }
        }
    }
    for n in 0..N {
        // SAFETY: out[n] holds 16 f32.
        unsafe { _mm512_storeu_ps(out[n].as_mut_ptr(), acc[n]) };
    }
}

/// One Q8_0 tile row-slab (16 rows, every block of the input) times each of the `N` rows `a`,
/// into `out[n]`, each weight load shared by every row.
///
/// # Safety
/// AVX-512 F/BW/VNNI and F16C available; `slab` holds `a[i].len() / 32` Q8_0 tiles for every
/// `i`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
#[allow(clippy::needless_range_loop)] // `n` indexes the rows and their accumulators together
pub(super) unsafe fn tile_rows_q8_0<const N: usize>(
    slab: &[u8],
    a: [&QuantRow; N],
    out: &mut [[f32; TILE_ROWS]; N],
) {
    let blocks = a[0].len() / QK8_0;
    debug_assert_eq!(slab.len(), blocks * Q8_0_TILE);
    debug_assert!(a.iter().all(|r| r.len() == a[0].len()));
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        // SAFETY: as in `tile_rows_q4k`.
        unsafe {
            let t = slab.as_ptr().add(b * Q8_0_TILE);
            let mut acc0 = [_mm512_setzero_si512(); N];
            let mut acc1 = [_mm512_setzero_si512(); N];
            for g in (0..8).step_by(2) {
                let q = t.add(32 + 64 * g);
                let w0 = _mm512_loadu_si512(q as *const _);
                let w1 = _mm512_loadu_si512(q.add(64) as *const _);
                for n in 0..N {
                    let y = a[n].qs.as_ptr().add(b * QK8_0);
                    let y0 = _mm512_set1_epi32((y.add(4 * g) as *const i32).read_unaligned());
                    let y1 = _mm512_set1_epi32((y.add(4 * g + 4) as *const i32).read_unaligned());
                    acc0[n] = _mm512_dpbusd_epi32(acc0[n], w0, y0);
                    acc1[n] = _mm512_dpbusd_epi32(acc1[n], w1, y1);
                }
            }
            let dt = _mm512_cvtph_ps(_mm256_loadu_si256(t as *const _));
            for n in 0..N {
                // the values are stored + 128: subtract 128 · Σ y
                let dot = _mm512_sub_ps(
                    _mm512_cvtepi32_ps(_mm512_add_epi32(acc0[n], acc1[n])),
                    _mm512_set1_ps(128.0 * *a[n].bsum.get_unchecked(b) as f32),
                );
                let d = _mm512_mul_ps(dt, _mm512_set1_ps(*a[n].d.get_unchecked(b)));
                acc[n] = _mm512_fmadd_ps(d, dot, acc[n]);
            }
        }
    }
    for n in 0..N {
        // SAFETY: out[n] holds 16 f32.
        unsafe { _mm512_storeu_ps(out[n].as_mut_ptr(), acc[n]) };
    }
}

/// 16 consecutive Q8_0 rows in the file's own layout (`rows`: each `row_bytes` long, 34-byte
/// blocks of an f16 scale and 32 i8 values), times each of the `N` rows `a`, into `out[n]` —
/// read where they lie, nothing repacked, one row after the other (so the rows stream front to
/// back). One 64-byte register holds two blocks of a row; `vpdpbusd` multiplies the activations
/// plus 128 (u8) by the weights (i8) starting from −128 · Σw, so each lane's sum of four
/// products is exact. Per lane the sums are scaled by the two blocks' scales and accumulated; each row
/// ends in one horizontal sum, in the same order whatever `N` is.
///
/// # Safety
/// AVX-512 F/BW/VNNI and F16C available; `rows` holds 16 rows of `row_bytes` =
/// `a[i].len() / 32 · 34` bytes for every `i`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
#[allow(clippy::needless_range_loop)] // `n` indexes the rows and their accumulators together
pub(super) unsafe fn block_rows_q8_0<const N: usize>(
    rows: &[u8],
    row_bytes: usize,
    a: [&QuantRow; N],
    out: &mut [[f32; TILE_ROWS]; N],
) {
    let blocks = a[0].len() / QK8_0;
    debug_assert_eq!(row_bytes, blocks * Q8_0_BYTES);
    debug_assert_eq!(rows.len(), TILE_ROWS * row_bytes);
    debug_assert!(
        a.iter()
            .all(|r| r.len() == a[0].len() && r.dpair.len() >= blocks * 8)
    );
    let zero = _mm512_setzero_si512();
    let m128 = _mm512_set1_epi8(i8::MIN);
    for r in 0..TILE_ROWS {
        let mut acc = [_mm512_setzero_ps(); N];
        // SAFETY: row r lies inside `rows`, blocks b (and b + 1 for a pair) inside it and
        // inside every activation row (the caller's contract); a lone block's activations are
        // loaded masked to it, and `dpair` holds 16 scales per two blocks, padded.
        unsafe {
            let row = rows.as_ptr().add(r * row_bytes);
            let mut step = |b: usize, pair: bool| {
                let q = row.add(b * Q8_0_BYTES);
                let lo = _mm256_loadu_si256(q.add(2) as *const _);
                let (w, h1) = if pair {
                    let hi = _mm256_loadu_si256(q.add(Q8_0_BYTES + 2) as *const _);
                    let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    (w, (q.add(Q8_0_BYTES) as *const i16).read_unaligned())
                } else {
                    (_mm512_zextsi256_si512(lo), 0)
                };
                let h0 = (q as *const i16).read_unaligned();
                let dw = _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_set1_epi16(h0)),
                    _mm_set1_epi16(h1),
                ));
                // (y + 128) · w summed from −128 · Σw is Σ y · w
                let bias = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, m128, w));
                for n in 0..N {
                    let p = a[n].xu.as_ptr().add(b * QK8_0);
                    let x = if pair {
                        _mm512_loadu_si512(p as *const _)
                    } else {
                        _mm512_maskz_loadu_epi8(u32::MAX as u64, p as *const i8)
                    };
                    let dot = _mm512_dpbusd_epi32(bias, x, w);
                    let dx = _mm512_loadu_ps(a[n].dpair.as_ptr().add(b * 8));
                    acc[n] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, dx), acc[n]);
                }
            };
            for p in 0..blocks / 2 {
                step(2 * p, true);
            }
            if blocks % 2 == 1 {
                step(blocks - 1, false);
            }
        }
        for n in 0..N {
            out[n][r] = _mm512_reduce_add_ps(acc[n]);
        }
    }
}
