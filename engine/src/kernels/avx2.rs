//! The AVX2 kernels (Haswell, Zen 1–3 and later, and AVX-512 CPUs with `SINEW_KERNELS=avx2`):
//! the same packed tiles as the AVX-512 kernels, a tile's 16 rows as two halves of 8. The 8-bit
//! products go through `vpmaddubsw` (u8 × i8 → pairs summed into i16, saturating) and
//! `vpmaddwd`; every sum below is bounded so that the i16 stage cannot saturate or wrap.

use std::arch::x86_64::*;

use super::kind::{BF16, F16, F32};
use super::{
    F32_TILE, FloatOut, HALF_TILE, Q4K_MN, Q4K_QS, Q4K_SC, Q4K_TILE, Q6K_Q, Q6K_SC, Q6K_SUB,
    Q6K_TILE, Q8_0_BYTES, Q8_0_TILE, QK_K, QK8_0, QuantRow, ROWS_PER_PASS, STREAMS, TILE_ROWS,
};

/// 1..=[`STREAMS`] float tile slabs of weight kind `kind` times 1..=[`ROWS_PER_PASS`] rows `xs`,
/// into `out[slab][row]`. With 16 registers, the slabs read side by side are as many as keep
/// the accumulators (two per slab and row) at eight: four for one row, two for two, one for
/// three or four.
///
/// # Safety
/// AVX2, FMA and F16C available; every slab holds `xs[i].len()` tiles of `kind` for every `i`.
pub(super) unsafe fn float_rows(kind: u8, slabs: &[&[u8]], xs: &[&[f32]], out: &mut FloatOut) {
    let group = match xs.len() {
        1 => STREAMS,
        2 => 2,
        _ => 1,
    };
    let x = |j: usize| xs[j.min(xs.len() - 1)];
    for (g, sl) in slabs.chunks(group).enumerate() {
        let out = &mut out[g * group..];
        let s = |i: usize| sl[i.min(sl.len() - 1)];
        macro_rules! call {
            ($W:expr) => {
                match (xs.len(), sl.len()) {
                    (1, 1) => tile_rows_f32::<1, 1, $W>([s(0)], [x(0)], out),
                    (1, 2) => tile_rows_f32::<2, 1, $W>([s(0), s(1)], [x(0)], out),
                    (1, 3) => tile_rows_f32::<3, 1, $W>([s(0), s(1), s(2)], [x(0)], out),
                    (1, _) => tile_rows_f32::<4, 1, $W>([s(0), s(1), s(2), s(3)], [x(0)], out),
                    (2, 1) => tile_rows_f32::<1, 2, $W>([s(0)], [x(0), x(1)], out),
                    (2, _) => tile_rows_f32::<2, 2, $W>([s(0), s(1)], [x(0), x(1)], out),
                    (3, _) => tile_rows_f32::<1, 3, $W>([s(0)], [x(0), x(1), x(2)], out),
                    _ => tile_rows_f32::<1, 4, $W>([s(0)], [x(0), x(1), x(2), x(3)], out),
                }
            };
        }
        // SAFETY: the caller's contract, passed on; `out` keeps a row per slab of the group.
        unsafe {
            match kind {
                BF16 => call!(BF16),
                F16 => call!(F16),
                _ => call!(F32),
            }
        }
    }
}

/// `S` float tile slabs (weights of kind `W`) times each of the `N` rows `x`, into
/// `out[slab][row]`: per row one fused multiply-add per weight in input order, as the AVX-512
/// kernel does, so the two give the same bits.
///
/// # Safety
/// AVX2, FMA and F16C available; every slab holds `x[i].len()` tiles of kind `W` for every
/// `i`; `out` has at least `S` entries.
#[target_feature(enable = "avx2,fma,f16c")]
// `s`, `n` and `h` index the slabs, the rows and the accumulators together
#[allow(clippy::needless_range_loop)]
unsafe fn tile_rows_f32<const S: usize, const N: usize, const W: u8>(
    slabs: [&[u8]; S],
    x: [&[f32]; N],
    out: &mut [[[f32; TILE_ROWS]; ROWS_PER_PASS]],
) {
    let cols = x[0].len();
    let tile = if W == F32 { F32_TILE } else { HALF_TILE };
    debug_assert!(S <= STREAMS && N <= ROWS_PER_PASS && out.len() >= S);
    debug_assert!(x.iter().all(|r| r.len() == cols));
    debug_assert!(slabs.iter().all(|s| s.len() == cols * tile));
    let w = slabs.map(|s| s.as_ptr());
    let mut acc = [[[_mm256_setzero_ps(); 2]; N]; S];
    // SAFETY: k < cols, so every load lies in its slab (a tile is 16 values: two halves of 8)
    // and every read in each row.
    unsafe {
        for k in 0..cols {
            let xv: [__m256; N] = std::array::from_fn(|n| _mm256_set1_ps(*x[n].get_unchecked(k)));
            for s in 0..S {
                let p = w[s].add(k * tile);
                for h in 0..2 {
                    let wv = match W {
                        F32 => _mm256_loadu_ps((p as *const f32).add(8 * h)),
                        // bf16 is the top half of an f32
                        BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                            _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16 * h) as *const _)),
                        )),
                        _ => _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * h) as *const _)),
                    };
                    for n in 0..N {
                        acc[s][n][h] = _mm256_fmadd_ps(wv, xv[n], acc[s][n][h]);
                    }
                }
            }
        }
        for s in 0..S {
            for n in 0..N {
                for h in 0..2 {
                    _mm256_storeu_ps(out[s][n].as_mut_ptr().add(8 * h), acc[s][n][h]);
                }
            }
        }
    }
}

/// Each slab's two half-tile accumulators into its output row (as many as `out` has).
///
/// # Safety
/// AVX available.
#[target_feature(enable = "avx2")]
unsafe fn store_rows(out: &mut [[f32; TILE_ROWS]], accs: &[[__m256; 2]; STREAMS]) {
    for (o, acc) in out.iter_mut().zip(accs) {
        let (lo, hi) = o.split_at_mut(8);
        // SAFETY: each half holds 8 f32.
        unsafe {
            _mm256_storeu_ps(lo.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(hi.as_mut_ptr(), acc[1]);
        }
    }
}

/// The 8 f16 values at `p` (one per row of a half tile) as f32.
///
/// # Safety
/// F16C available; 16 bytes readable at `p`.
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16x8(p: *const u8) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const _)) }
}

/// The 8 unsigned bytes at `p` (one per row of a half tile), each widened to an i32 lane.
///
/// # Safety
/// AVX2 available; 8 bytes readable at `p`.
#[target_feature(enable = "avx2")]
unsafe fn u8x8(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const _)) }
}

/// The 8 signed bytes at `p`, each widened to an i32 lane.
///
/// # Safety
/// AVX2 available; 8 bytes readable at `p`.
#[target_feature(enable = "avx2")]
unsafe fn i8x8(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const _)) }
}

/// Four activation bytes at `p` in every 32-bit lane.
///
/// # Safety
/// AVX2 available; 4 bytes readable at `p`.
#[target_feature(enable = "avx2")]
unsafe fn bcast4(p: *const i8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
}

/// Stores each row's accumulators, `accs[row][slab]`, into `out[row][slab]`.
///
/// # Safety
/// AVX2 available.
#[target_feature(enable = "avx2")]
unsafe fn store_rows_n<const N: usize>(
    out: &mut [[[f32; TILE_ROWS]; STREAMS]; N],
    accs: &[[[__m256; 2]; STREAMS]; N],
) {
    for (o, a) in out.iter_mut().zip(accs) {
        // SAFETY: the caller's contract.
        unsafe { store_rows(o, a) };
    }
}

/// Up to [`STREAMS`] Q4_K tile row-slabs (16 rows each, every block of the input) times each of
/// the `N` rows `a`, into `out[row][slab]`, read side by side a tile at a time (on Zen 3 one core
/// streams more from several places at once than from one); each weight load is unpacked once
/// for every row, and each row's sums run in the same order whatever `N` is.
///
/// Per sub-block of 32 values, each i16 lane of the `vpmaddubsw` sums collects 8 products of a
/// 4-bit value and an activation (|·| ≤ 15 · 127): at most 30,480, inside i16. The scales
/// multiply those sums in `vpmaddwd` (≤ 63 · 2 · 30,480 per row and sub-block), so a block's
/// Σ scale · dot is exact in i32, as in the scalar reference; the mins' Σ min · Σy (≤ 8 · 63 ·
/// 4,064 < 2²⁴) is exact in f32.
///
/// # Safety
/// AVX2, FMA and F16C available; at most [`STREAMS`] slabs, each `a[i].len() / 256` Q4_K tiles
/// for every `i`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `n` indexes the rows and their accumulators together
pub(super) unsafe fn tile_rows_q4k<const N: usize>(
    slabs: &[&[u8]],
    a: [&QuantRow; N],
    out: &mut [[[f32; TILE_ROWS]; STREAMS]; N],
) {
    let blocks = a[0].len() / QK_K;
    debug_assert!(slabs.len() <= STREAMS);
    debug_assert!(slabs.iter().all(|s| s.len() == blocks * Q4K_TILE));
    debug_assert!(a.iter().all(|r| r.len() == a[0].len()));
    let m4 = _mm256_set1_epi8(0x0F);
    let mut accs = [[[_mm256_setzero_ps(); 2]; STREAMS]; N];
    for b in 0..blocks {
        for (si, slab) in slabs.iter().enumerate() {
            // SAFETY: tile b is within the slab and block b within every activation row (the
            // caller's contract); every offset below is inside one tile.
            unsafe {
                let t = slab.as_ptr().add(b * Q4K_TILE);
                let mut sumi = [[_mm256_setzero_si256(); 2]; N];
                let mut summ = [[_mm256_setzero_ps(); 2]; N];
                for j in 0..8 {
                    let q = t.add(Q4K_QS + j * 256);
                    let mut s16 = [[_mm256_setzero_si256(); 2]; N];
                    for g in 0..4 {
                        for h in 0..2 {
                            let v = _mm256_loadu_si256(q.add(64 * g + 32 * h) as *const _);
                            let lo = _mm256_and_si256(v, m4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                            for n in 0..N {
                                let y = a[n].qs.as_ptr().add(b * QK_K + 32 * j);
                                s16[n][h] = _mm256_add_epi16(
                                    s16[n][h],
                                    _mm256_add_epi16(
                                        _mm256_maddubs_epi16(lo, bcast4(y.add(4 * g))),
                                        _mm256_maddubs_epi16(hi, bcast4(y.add(16 + 4 * g))),
                                    ),
                                );
                            }
                        }
                    }
                    for h in 0..2 {
                        // each row's scale in both i16 halves of its lane
                        let sc = u8x8(t.add(Q4K_SC + 16 * j + 8 * h));
                        let sc = _mm256_or_si256(sc, _mm256_slli_epi32::<16>(sc));
                        let mn = _mm256_cvtepi32_ps(u8x8(t.add(Q4K_MN + 16 * j + 8 * h)));
                        for n in 0..N {
                            let bsum = _mm256_set1_ps(*a[n].bsum.get_unchecked(b * 8 + j) as f32);
                            sumi[n][h] =
                                _mm256_add_epi32(sumi[n][h], _mm256_madd_epi16(s16[n][h], sc));
                            summ[n][h] = _mm256_fmadd_ps(mn, bsum, summ[n][h]);
                        }
                    }
                }
                for h in 0..2 {
                    let dt = f16x8(t.add(16 * h));
                    let dmt = f16x8(t.add(32 + 16 * h));
                    for n in 0..N {
                        let dy = _mm256_set1_ps(*a[n].d.get_unchecked(b));
                        let acc = &mut accs[n][si][h];
                        *acc = _mm256_fmadd_ps(
                            _mm256_mul_ps(dt, dy),
                            _mm256_cvtepi32_ps(sumi[n][h]),
                            *acc,
                        );
                        *acc = _mm256_fnmadd_ps(_mm256_mul_ps(dmt, dy), summ[n][h], *acc);
                    }
                }
            }
        }
    }
    // SAFETY: AVX2 is available (the caller's contract).
    unsafe { store_rows_n(out, &accs) };
}

/// Up to [`STREAMS`] Q6_K tile row-slabs (16 rows each, every block of the input) times each of
/// the `N` rows `a`, into `out[row][slab]`, read side by side a tile at a time, each weight load
/// unpacked once for every row. The 6-bit values go unsigned into `vpmaddubsw` (an i16 lane sums
/// 2 products ≤ 63 · 127, and two groups are added before widening: ≤ 32,004) and the offset of
/// 32 comes off per 16 values (`32 · Σ y`); a block's sum stays in i32 (|sum| < 2³⁰) until its
/// one f32 step, as in the AVX-512 kernel.
///
/// # Safety
/// AVX2, FMA and F16C available; at most [`STREAMS`] slabs, each `a[i].len() / 256` Q6_K tiles
/// for every `i`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `n` indexes the rows and their accumulators together
pub(super) unsafe fn tile_rows_q6k<const N: usize>(
    slabs: &[&[u8]],
    a: [&QuantRow; N],
    out: &mut [[[f32; TILE_ROWS]; STREAMS]; N],
) {
    let blocks = a[0].len() / QK_K;
    debug_assert!(slabs.len() <= STREAMS);
    debug_assert!(slabs.iter().all(|s| s.len() == blocks * Q6K_TILE));
    debug_assert!(a.iter().all(|r| r.len() == a[0].len()));
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let ones = _mm256_set1_epi16(1);
    let mut accs = [[[_mm256_setzero_ps(); 2]; STREAMS]; N];
    for b in 0..blocks {
        for (si, slab) in slabs.iter().enumerate() {
            // SAFETY: tile b is within the slab and block b within every activation row (the
            // caller's contract); every offset below is inside one tile.
            unsafe {
                let t = slab.as_ptr().add(b * Q6K_TILE);
                let mut total = [[_mm256_setzero_si256(); 2]; N];
                for j in 0..8 {
                    let q = t.add(Q6K_Q + Q6K_SUB * j);
                    for h in 0..2 {
                        // bits 4 and 5 of each byte of high(hb)[g]: the high 2 bits of value
                        // 4g + i, stored at bit 2g
                        let high = |hb: __m256i| {
                            [
                                _mm256_and_si256(_mm256_slli_epi16::<4>(hb), m30),
                                _mm256_and_si256(_mm256_slli_epi16::<2>(hb), m30),
                                _mm256_and_si256(hb, m30),
                                _mm256_and_si256(_mm256_srli_epi16::<2>(hb), m30),
                            ]
                        };
                        let h0 = high(_mm256_loadu_si256(q.add(32 * h) as *const _));
                        let h1 = high(_mm256_loadu_si256(q.add(64 + 32 * h) as *const _));
                        let mut lo_acc = [_mm256_setzero_si256(); N];
                        let mut hi_acc = [_mm256_setzero_si256(); N];
                        for pair in 0..2 {
                            let mut lo16 = [_mm256_setzero_si256(); N];
                            let mut hi16 = [_mm256_setzero_si256(); N];
                            for g in 2 * pair..2 * pair + 2 {
                                let v =
                                    _mm256_loadu_si256(q.add(128 + 64 * g + 32 * h) as *const _);
                                let lo = _mm256_or_si256(_mm256_and_si256(v, m4), h0[g]);
                                let hi = _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4),
                                    h1[g],
                                );
                                for n in 0..N {
                                    let y = a[n].qs.as_ptr().add(b * QK_K + 32 * j);
                                    lo16[n] = _mm256_add_epi16(
                                        lo16[n],
                                        _mm256_maddubs_epi16(lo, bcast4(y.add(4 * g))),
                                    );
                                    hi16[n] = _mm256_add_epi16(
                                        hi16[n],
                                        _mm256_maddubs_epi16(hi, bcast4(y.add(16 + 4 * g))),
                                    );
                                }
                            }
                            for n in 0..N {
                                lo_acc[n] =
                                    _mm256_add_epi32(lo_acc[n], _mm256_madd_epi16(lo16[n], ones));
                                hi_acc[n] =
                                    _mm256_add_epi32(hi_acc[n], _mm256_madd_epi16(hi16[n], ones));
                            }
                        }
                        let sc_lo = i8x8(t.add(Q6K_SC + 32 * j + 8 * h));
                        let sc_hi = i8x8(t.add(Q6K_SC + 32 * j + 16 + 8 * h));
                        for n in 0..N {
                            let s = a[n].bsum.as_ptr().add(b * 16 + 2 * j);
                            let off_lo = _mm256_set1_epi32(32 * *s);
                            let off_hi = _mm256_set1_epi32(32 * *s.add(1));
                            let lo = _mm256_mullo_epi32(sc_lo, _mm256_sub_epi32(lo_acc[n], off_lo));
                            let hi = _mm256_mullo_epi32(sc_hi, _mm256_sub_epi32(hi_acc[n], off_hi));
                            total[n][h] = _mm256_add_epi32(total[n][h], _mm256_add_epi32(lo, hi));
                        }
                    }
                }
                for h in 0..2 {
                    let dt = f16x8(t.add(16 * h));
                    for n in 0..N {
                        let d = _mm256_mul_ps(dt, _mm256_set1_ps(*a[n].d.get_unchecked(b)));
                        let acc = &mut accs[n][si][h];
                        *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(total[n][h]), *acc);
                    }
                }
            }
        }
    }
    // SAFETY: AVX2 is available (the caller's contract).
    unsafe { store_rows_n(out, &accs) };
}

/// Up to [`STREAMS`] Q8_0 tile row-slabs (16 rows each, every block of the input) times each of
/// the `N` rows `a`, into `out[row][slab]`, read side by side a tile at a time, each weight load
/// shared by every row. The tiles hold each value + 128; flipping the top bit gives the signed
/// value back, and `vpmaddubsw` takes |w| against y with w's sign (an i16 lane ≤ 2 · 128 · 127,
/// so -128 neither saturates nor wraps).
///
/// # Safety
/// AVX2, FMA and F16C available; at most [`STREAMS`] slabs, each `a[i].len() / 32` Q8_0 tiles
/// for every `i`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `n` indexes the rows and their accumulators together
pub(super) unsafe fn tile_rows_q8_0<const N: usize>(
    slabs: &[&[u8]],
    a: [&QuantRow; N],
    out: &mut [[[f32; TILE_ROWS]; STREAMS]; N],
) {
    let blocks = a[0].len() / QK8_0;
    debug_assert!(slabs.len() <= STREAMS);
    debug_assert!(slabs.iter().all(|s| s.len() == blocks * Q8_0_TILE));
    debug_assert!(a.iter().all(|r| r.len() == a[0].len()));
    let flip = _mm256_set1_epi8(i8::MIN);
    let ones = _mm256_set1_epi16(1);
    let mut accs = [[[_mm256_setzero_ps(); 2]; STREAMS]; N];
    for b in 0..blocks {
        for (si, slab) in slabs.iter().enumerate() {
            // SAFETY: tile b is within the slab and block b within every activation row (the
            // caller's contract); every offset below is inside one tile.
            unsafe {
                let t = slab.as_ptr().add(b * Q8_0_TILE);
                let mut dot = [[_mm256_setzero_si256(); 2]; N];
                for g in 0..8 {
                    for h in 0..2 {
                        let w = _mm256_xor_si256(
                            _mm256_loadu_si256(t.add(32 + 64 * g + 32 * h) as *const _),
                            flip,
                        );
                        let aw = _mm256_abs_epi8(w);
                        for n in 0..N {
                            let y4 = bcast4(a[n].qs.as_ptr().add(b * QK8_0 + 4 * g));
                            let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(y4, w));
                            dot[n][h] = _mm256_add_epi32(dot[n][h], _mm256_madd_epi16(p, ones));
                        }
                    }
                }
                for h in 0..2 {
                    let dt = f16x8(t.add(16 * h));
                    for n in 0..N {
                        let d = _mm256_mul_ps(dt, _mm256_set1_ps(*a[n].d.get_unchecked(b)));
                        let acc = &mut accs[n][si][h];
                        *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot[n][h]), *acc);
                    }
                }
            }
        }
    }
    // SAFETY: AVX2 is available (the caller's contract).
    unsafe { store_rows_n(out, &accs) };
}

/// 16 consecutive Q8_0 rows in the file's own layout (`rows`: each `row_bytes` long, 34-byte
/// blocks of an f16 scale and 32 i8 values), times each of the `N` rows `a`, into `out[n]`,
/// read where they lie. Two weight rows go side by side, a block per register: |w| times y
/// with w's sign in `vpmaddubsw` (each i16 pair at most 2 · 128 · 127, so no saturation), then
/// `vpmaddwd`, scaled per block into per-lane f32 sums; each row ends in one horizontal sum, in
/// the same order whatever `N` is.
///
/// # Safety
/// AVX2, FMA and F16C available; `rows` holds 16 rows of `row_bytes` = `a[i].len() / 32 · 34`
/// bytes for every `i`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `r` and `n` index the rows and their accumulators
pub(super) unsafe fn block_rows_q8_0<const N: usize>(
    rows: &[u8],
    row_bytes: usize,
    a: [&QuantRow; N],
    out: &mut [[f32; TILE_ROWS]; N],
) {
    const GROUP: usize = 2;
    let blocks = a[0].len() / QK8_0;
    debug_assert_eq!(row_bytes, blocks * Q8_0_BYTES);
    debug_assert_eq!(rows.len(), TILE_ROWS * row_bytes);
    debug_assert!(a.iter().all(|r| r.len() == a[0].len()));
    let ones = _mm256_set1_epi16(1);
    for g in 0..TILE_ROWS / GROUP {
        let mut acc = [[_mm256_setzero_ps(); N]; GROUP];
        for b in 0..blocks {
            // SAFETY: block b of row r lies at r · row_bytes + 34 · b, inside `rows`, and values
            // 32 · b.. of every activation row exist (the caller's contract).
            unsafe {
                let y: [__m256i; N] = std::array::from_fn(|n| {
                    _mm256_loadu_si256(a[n].qs.as_ptr().add(b * QK8_0) as *const _)
                });
                for r in 0..GROUP {
                    let q = rows
                        .as_ptr()
                        .add((g * GROUP + r) * row_bytes + b * Q8_0_BYTES);
                    let w = _mm256_loadu_si256(q.add(2) as *const _);
                    let aw = _mm256_abs_epi8(w);
                    let dw = _mm256_cvtph_ps(_mm_set1_epi16((q as *const i16).read_unaligned()));
                    for n in 0..N {
                        let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(y[n], w));
                        let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                        let d = _mm256_mul_ps(dw, _mm256_set1_ps(*a[n].d.get_unchecked(b)));
                        acc[r][n] = _mm256_fmadd_ps(dot, d, acc[r][n]);
                    }
                }
            }
        }
        for r in 0..GROUP {
            for n in 0..N {
                out[n][g * GROUP + r] = hsum(acc[r][n]);
            }
        }
    }
}

/// The sum of the 8 lanes of `v`, in a fixed order.
#[target_feature(enable = "avx2")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}
