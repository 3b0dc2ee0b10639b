//! Quantized matrix–vector products for decoding, on a compact tiled copy of GGUF's blocks.
//!
//! Decoding one token multiplies every active weight matrix by one activation row, so its speed
//! is how fast the weights stream through the core. Reading GGUF's blocks one row at a time
//! spends most instructions on per-row work (unpacking scales, horizontal sums); candle's x86
//! repack avoids that with 16-row tiles but widens every Q4_K scale and min to f32 (6 bits per
//! weight instead of 4.5) and builds its copy lazily during the first tokens.
//!
//! [`PackedMatrix`] is built once at load: 16 rows × one block of the input dimension per tile,
//! the 4-bit (Q4_K), 6-bit (Q6_K) or 8-bit (Q8_0) values interleaved four bytes per row, so that
//! one AVX-512 VNNI `vpdpbusd` multiplies 16 rows by 4 broadcast activation values (AVX2: two
//! `vpmaddubsw` on halves of 8 rows), the scales kept as compact as the file has them (Q4_K:
//! f16 `d`/`dmin` per row and superblock, 6-bit scales widened to one byte — 4.625 bits per
//! weight; Q6_K and Q8_0: exactly the file's 6.5625 and 8.5). Activations are quantized to 8
//! bits once per row ([`QuantRow`]). Each tile row-slab is read front to back, which the
//! hardware prefetcher follows well: software prefetch ahead of it measured slower here (Zen 4).
//! [`run`] spreads a batch of products (all experts of a layer, or q/k/v) over candle's
//! persistent worker pool in one parallel region. Several activation rows (the sequences of a
//! batched step, a prompt chunk) share each pass over a slab: each weight load is unpacked once
//! and multiplied by up to four rows, each row summed in the same order as alone, so a row's
//! result never depends on the rows beside it.
//!
//! f32 matrices take the same path ([`Format::F32`]): 16-row tiles stored column by column, so
//! one 64-byte line holds the 16 rows' weights for one input value and the slab streams front to
//! back with one fused multiply-add per weight (up to 4 activation rows share each load, for
//! prefill); bf16 and f16 tiles hold the same values in 2 bytes, widened exactly in the kernel.
//!
//! Two instruction sets ([`Isa`]) read the same tiles: AVX-512 F/BW/VNNI (`avx512`) and AVX2 +
//! FMA (`avx2`), each with F16C. Where the CPU has neither ([`Format::native`] is false),
//! callers keep candle's matmul. A scalar reference on the file's own blocks ([`dot_scalar`]) is
//! what both are tested against.

use std::ops::Range;
use std::sync::OnceLock;

use half::f16;

/// Values per Q4_K superblock.
pub const QK_K: usize = 256;
/// Values per Q8_0 block.
pub const QK8_0: usize = 32;
/// Rows per tile.
pub const TILE_ROWS: usize = 16;
const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;
const Q8_0_BYTES: usize = 34;
/// Q4_K tile: d[16] f16, dmin[16] f16, scales[8][16] u8, mins[8][16] u8, values.
const Q4K_TILE: usize = 32 + 32 + 128 + 128 + TILE_ROWS * QK_K / 2;
const Q4K_SC: usize = 64;
const Q4K_MN: usize = 192;
const Q4K_QS: usize = 320;
/// Q6_K tile: d[16] f16, scales[16][16] i8 (one per 16 values), then per sub-block of 32
/// values the low 4 bits (4 × 64 bytes, laid out as Q4_K's) and the high 2 bits (2 × 64), so a
/// tile is read strictly front to back.
const Q6K_TILE: usize = 32 + 256 + TILE_ROWS * QK_K / 2 + TILE_ROWS * QK_K / 4;
const Q6K_SC: usize = 32;
const Q6K_Q: usize = 288;
/// Bytes of one sub-block's values in a Q6_K tile.
const Q6K_SUB: usize = 6 * 64;
/// Q8_0 tile: d[16] f16, values + 128 as u8.
const Q8_0_TILE: usize = 32 + TILE_ROWS * QK8_0;
/// f32 tile: one input value of 16 rows.
const F32_TILE: usize = 4 * TILE_ROWS;
/// bf16 / f16 tile: one input value of 16 rows, two bytes each.
const HALF_TILE: usize = 2 * TILE_ROWS;
/// Row tiles per unit of parallel work, read side by side: a matrix's tiles are cut into this
/// many contiguous runs and a unit takes one tile of each, so every unit streams from several
/// places at once (more of the memory system busy than one sequential stream).
const STREAMS: usize = 4;
/// Activation rows that share one pass over the tile slabs.
const ROWS_PER_PASS: usize = 4;

/// A weight block format with a kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// llama.cpp's Q4_K: 256-value superblocks, 4-bit values, 6-bit scales and mins.
    Q4K,
    /// llama.cpp's Q6_K: 256-value superblocks, 6-bit values, an 8-bit scale per 16 values
    /// (what Q4_K_M files use for the output head and some `ffn_down` / `attn_v` matrices).
    Q6K,
    /// llama.cpp's Q8_0: 32-value blocks of i8 with an f16 scale.
    Q8_0,
    /// Plain f32 (a "block" is one value); activations stay f32.
    F32,
    /// bfloat16 weights (what Hugging Face checkpoints ship), widened to f32 in the kernel —
    /// exactly, so the products are the f32 path's on the same values, at half the bytes.
    BF16,
    /// IEEE half weights, widened to f32 in the kernel (exactly, as bf16).
    F16,
}

impl Format {
    /// The format of a candle dtype, if it has a kernel here.
    pub fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as D;
        match dtype {
            D::Q4K => Some(Format::Q4K),
            D::Q6K => Some(Format::Q6K),
            D::Q8_0 => Some(Format::Q8_0),
            D::F32 => Some(Format::F32),
            D::BF16 => Some(Format::BF16),
            D::F16 => Some(Format::F16),
            _ => None,
        }
    }

    /// Values per block.
    pub fn block_elems(self) -> usize {
        match self {
            Format::Q4K | Format::Q6K => QK_K,
            Format::Q8_0 => QK8_0,
            Format::F32 | Format::BF16 | Format::F16 => 1,
        }
    }

    /// Bytes per block in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4K => Q4K_BYTES,
            Format::Q6K => Q6K_BYTES,
            Format::Q8_0 => Q8_0_BYTES,
            Format::F32 => 4,
            Format::BF16 | Format::F16 => 2,
        }
    }

    /// Bytes of one GGUF row of `cols` values (`cols` a whole number of blocks).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    /// Tiles a unit of work reads side by side: four for the float formats, and for Q8_0 and
    /// Q4_K on AVX2 (Zen 3, one thread: Q8_0 12.4 → 17.4 GiB/s, Q4_K 9.9 → 11.0, in
    /// `benches/kernels.rs`); one for Q6_K on AVX2 (four measured 10% slower: its kernel is
    /// bound by arithmetic, not by the stream) and for every 8-bit format on AVX-512, whose
    /// tile slabs jumped between cost more than the extra streams brought (Zen 4).
    fn streams(self, isa: Isa) -> usize {
        match (self, isa) {
            (Format::F32 | Format::BF16 | Format::F16, _) => STREAMS,
            (Format::Q4K | Format::Q8_0, Isa::Avx2) => STREAMS,
            (Format::Q6K, Isa::Avx2) | (_, Isa::Avx512) => 1,
        }
    }

    /// Whether the activations stay f32 (weights f32, bf16 or f16): several rows share a pass.
    fn is_float(self) -> bool {
        matches!(self, Format::F32 | Format::BF16 | Format::F16)
    }

    fn tile_bytes(self) -> usize {
        match self {
            Format::Q4K => Q4K_TILE,
            Format::Q6K => Q6K_TILE,
            Format::Q8_0 => Q8_0_TILE,
            Format::F32 => F32_TILE,
            Format::BF16 | Format::F16 => HALF_TILE,
        }
    }

    /// Whether this CPU runs the kernels ([`Isa::selected`] is some; the same for every
    /// format). Where it is false, callers keep candle's matmul.
    pub fn native(self) -> bool {
        Isa::selected().is_some()
    }
}

/// An instruction set with kernels here. Both read the same packed tiles and give the same
/// results up to f32 rounding order (the float kernels bitwise: one fused multiply-add per
/// weight, in input order, on either).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 F/BW/VNNI and F16C (Zen 4, Ice Lake and later): a tile's 16 rows in one register,
    /// `vpdpbusd` multiplying them by four activation values.
    Avx512,
    /// AVX2, FMA and F16C (Haswell, Zen 1–3 and later): 8 rows per register, `vpmaddubsw` and
    /// `vpmaddwd` for the 8-bit products.
    Avx2,
}

impl Isa {
    /// Whether this CPU has the features the kernels of `self` need.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512 => {
                    has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("f16c")
                }
                Isa::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// Every instruction set with kernels here that this CPU runs, best first.
    pub fn supported() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|i| i.runs_here())
            .collect()
    }

    /// The kernels the engine uses: the best this CPU runs, or `None` (candle's matmul).
    /// `SINEW_KERNELS` in the environment at the first call overrides: `candle` turns the
    /// kernels off, `avx2` keeps an AVX-512 CPU on the AVX2 kernels (to compare the two).
    pub fn selected() -> Option<Isa> {
        static SELECTED: OnceLock<Option<Isa>> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let pick = std::env::var("SINEW_KERNELS").unwrap_or_default();
            match pick.as_str() {
                "candle" => None,
                "avx2" => Some(Isa::Avx2).filter(|i| i.runs_here()),
                _ => Isa::supported().first().copied(),
            }
        })
    }
}

/// One activation row prepared for a weight format: for Q4_K, Q6_K and Q8_0 quantized to 8 bits
/// — a scale per block (256 values for the k-quants, 32 for Q8_0), the values, and the sum of
/// each 32 values (each 16 for Q6_K, whose scales cover 16); for f32 kept as it is.
#[derive(Clone, Debug)]
pub struct QuantRow {
    format: Format,
    d: Vec<f32>,
    qs: Vec<i8>,
    bsum: Vec<i32>,
    f: Vec<f32>,
    /// Q8_0 only, for matrices read in place: the values + 128 as u8, and the block scales
    /// spread over a 64-byte register per two blocks (8 lanes each, zero past the last block).
    xu: Vec<u8>,
    dpair: Vec<f32>,
}

impl QuantRow {
    /// Quantizes `x` (a whole number of `format` blocks long): per block, scale = max |x| / 127
    /// and each value rounded to the nearest step. Non-finite inputs quantize to 0. For
    /// [`Format::F32`], [`Format::BF16`] and [`Format::F16`] the row is copied unchanged.
    pub fn new(format: Format, x: &[f32]) -> Self {
        if format.is_float() {
            return QuantRow {
                format,
                d: Vec::new(),
                qs: Vec::new(),
                bsum: Vec::new(),
                f: x.to_vec(),
                xu: Vec::new(),
                dpair: Vec::new(),
            };
        }
        let be = format.block_elems();
        assert!(x.len().is_multiple_of(be), "row of {} values", x.len());
        let mut d = Vec::with_capacity(x.len() / be);
        let mut qs = vec![0i8; x.len()];
        for (xb, out) in x.chunks_exact(be).zip(qs.chunks_exact_mut(be)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = if amax > 0.0 && amax.is_finite() {
                127.0 / amax
            } else {
                0.0
            };
            d.push(if inv > 0.0 { amax / 127.0 } else { 0.0 });
            for (o, &v) in out.iter_mut().zip(xb) {
                *o = round_to_i8(v * inv);
            }
        }
        let bsum = qs
            .chunks_exact(if format == Format::Q6K { 16 } else { 32 })
            .map(|c| c.iter().map(|&v| v as i32).sum())
            .collect();
        let (mut xu, mut dpair) = (Vec::new(), Vec::new());
        if format.reads_in_place() {
            xu = qs.iter().map(|&v| (v as u8) ^ 0x80).collect();
            dpair = vec![0f32; d.len().div_ceil(2) * 16];
            for (b, &s) in d.iter().enumerate() {
                dpair[b * 8..b * 8 + 8].fill(s);
            }
        }
        QuantRow {
            format,
            d,
            qs,
            bsum,
            f: Vec::new(),
            xu,
            dpair,
        }
    }

    /// Values in the row.
    pub fn len(&self) -> usize {
        self.qs.len().max(self.f.len())
    }

    /// Whether the row is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The format this row was quantized for.
    pub fn format(&self) -> Format {
        self.format
    }
}

/// `v` (|v| ≤ 127, or NaN) rounded to the nearest integer, ties to even: adding and removing
/// 1.5 · 2²³ leaves an f32 no fraction bits (without a libm call). NaN becomes 0.
fn round_to_i8(v: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    // float → int `as` saturates and maps NaN to 0
    ((v + MAGIC) - MAGIC) as i8
}

fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn bf16_at(b: &[u8], i: usize) -> f32 {
    half::bf16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K superblock (llama.cpp's layout).
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 256 4-bit values of a Q4_K superblock in order.
fn q4k_values(blk: &[u8]) -> [u8; QK_K] {
    let qs = &blk[16..Q4K_BYTES];
    let mut v = [0u8; QK_K];
    for c in 0..4 {
        for j in 0..32 {
            v[64 * c + j] = qs[32 * c + j] & 0x0F;
            v[64 * c + 32 + j] = qs[32 * c + j] >> 4;
        }
    }
    v
}

/// The 256 6-bit values of a Q6_K superblock in order (llama.cpp's layout: `ql` holds the low 4
/// bits, `qh` the high 2, in two halves of 128 values).
fn q6k_values(blk: &[u8]) -> [u8; QK_K] {
    let (ql, qh) = (&blk[..128], &blk[128..192]);
    let mut v = [0u8; QK_K];
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let v = &mut v[128 * half..];
        for l in 0..32 {
            v[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            v[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            v[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            v[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    v
}

/// Reference dot product of one GGUF weight row (`w`, its blocks as stored) with `a`, one value
/// at a time in exact integer arithmetic per block: what the packed kernels must reproduce.
pub fn dot_scalar(format: Format, w: &[u8], a: &QuantRow) -> f32 {
    assert_eq!(
        a.format, format,
        "activation row quantized for another format"
    );
    assert_eq!(w.len(), format.row_bytes(a.len()), "weight row length");
    let mut total = 0f32;
    for (b, blk) in w.chunks_exact(format.block_bytes()).enumerate() {
        match format {
            Format::Q8_0 => {
                let y = &a.qs[b * QK8_0..(b + 1) * QK8_0];
                let s: i32 = (0..QK8_0)
                    .map(|j| (blk[2 + j] as i8) as i32 * y[j] as i32)
                    .sum();
                total += f16_at(blk, 0) * a.d[b] * s as f32;
            }
            Format::Q4K => {
                let q = q4k_values(blk);
                let y = &a.qs[b * QK_K..(b + 1) * QK_K];
                let (mut sumi, mut summ) = (0i32, 0i32);
                for sub in 0..8 {
                    let (sc, mn) = q4k_scale_min(sub, &blk[4..16]);
                    let s: i32 = (32 * sub..32 * (sub + 1))
                        .map(|i| q[i] as i32 * y[i] as i32)
                        .sum();
                    sumi += sc as i32 * s;
                    summ += mn as i32 * a.bsum[b * 8 + sub];
                }
                total += a.d[b] * (f16_at(blk, 0) * sumi as f32 - f16_at(blk, 2) * summ as f32);
            }
            Format::Q6K => {
                let q = q6k_values(blk);
                let y = &a.qs[b * QK_K..(b + 1) * QK_K];
                let s: i32 = (0..QK_K)
                    .map(|i| blk[192 + i / 16] as i8 as i32 * (q[i] as i32 - 32) * y[i] as i32)
                    .sum();
                total += f16_at(blk, 208) * a.d[b] * s as f32;
            }
            Format::F32 => total += f32_at(blk, 0) * a.f[b],
            Format::BF16 => total += bf16_at(blk, 0) * a.f[b],
            Format::F16 => total += f16_at(blk, 0) * a.f[b],
        }
    }
    total
}

/// A weight matrix [rows, cols] as the kernels read it: repacked into 16-row tiles, or (Q8_0
/// from a file mapping, [`PackedMatrix::in_place`]) the file's own blocks where they lie.
pub struct PackedMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    store: Store,
}

/// Where a [`PackedMatrix`]'s bytes are.
enum Store {
    /// Tiles in an owned buffer, from `off`, the first cache-line boundary of the allocation.
    Tiles {
        data: Vec<u8>,
        off: usize,
        len: usize,
    },
    /// GGUF blocks, row after row, at `start..start + len` of a read-only file mapping.
    InPlace(InPlace),
}

/// Asks the kernel to back the 2 MiB-aligned interior of a freshly allocated (untouched) buffer
/// with transparent huge pages (honoured where THP is `madvise` or `always`).
fn advise_huge_pages(buf: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_ptr() as usize;
        let (lo, hi) = (
            start.next_multiple_of(HUGE),
            (start + buf.len()) / HUGE * HUGE,
        );
        if hi > lo {
            // SAFETY: [lo, hi) lies inside `buf`'s allocation; MADV_HUGEPAGE changes only how the
            // kernel backs those pages, not their contents or validity.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

impl PackedMatrix {
    /// Whether a [rows, cols] matrix of `format` tiles: rows a non-zero multiple of 16, cols a
    /// non-zero whole number of blocks.
    pub fn tiles_shape(format: Format, rows: usize, cols: usize) -> bool {
        rows > 0
            && cols > 0
            && rows.is_multiple_of(TILE_ROWS)
            && cols.is_multiple_of(format.block_elems())
    }

    /// Bytes of the GGUF blocks of a [rows, cols] matrix of `format` starting at `start` in a
    /// buffer of `available` bytes, if the shape tiles and the blocks lie inside the buffer.
    pub fn blocks_within(
        format: Format,
        rows: usize,
        cols: usize,
        start: usize,
        available: usize,
    ) -> Option<usize> {
        let len = rows.checked_mul(format.row_bytes(cols))?;
        let inside = start.checked_add(len).is_some_and(|end| end <= available);
        (Self::tiles_shape(format, rows, cols) && inside).then_some(len)
    }

    /// Bytes a packed `[rows, cols]` matrix of `format` holds, if the shape tiles.
    pub fn packed_bytes(format: Format, rows: usize, cols: usize) -> Option<usize> {
        Self::tiles_shape(format, rows, cols)
            .then(|| rows / TILE_ROWS * (cols / format.block_elems()) * format.tile_bytes())
    }

    fn zeroed(format: Format, rows: usize, cols: usize) -> Option<Self> {
        let len = Self::packed_bytes(format, rows, cols)?;
        let data = vec![0u8; len + 63];
        advise_huge_pages(&data);
        let off = data.as_ptr().align_offset(64).min(63);
        Some(PackedMatrix {
            format,
            rows,
            cols,
            store: Store::Tiles { data, off, len },
        })
    }

    /// The tiles (empty for a matrix read in place).
    fn tiles(&self) -> &[u8] {
        match &self.store {
            Store::Tiles { data, off, len } => &data[*off..*off + *len],
            Store::InPlace(_) => &[],
        }
    }

    /// The tiles, to fill while packing (only packing makes a tiled store).
    fn tiles_mut(&mut self) -> &mut [u8] {
        match &mut self.store {
            Store::Tiles { data, off, len } => &mut data[*off..*off + *len],
            Store::InPlace(_) => unreachable!("a matrix read in place is never packed"),
        }
    }

    /// Repacks the GGUF blocks `gguf` of a [rows, cols] matrix (for [`Format::F32`], its
    /// little-endian values). `None` when the shape does not tile (rows not a multiple of 16,
    /// cols not of the block size) or `gguf` has the wrong length; the caller then keeps
    /// candle's matmul.
    pub fn pack(format: Format, gguf: &[u8], rows: usize, cols: usize) -> Option<Self> {
        Self::pack_with(format, gguf, rows, cols, |_| {})
    }

    /// [`PackedMatrix::pack`], calling `done` with each part of `gguf` (a run of whole rows,
    /// about a megabyte) once it has been packed and will not be read again — so a caller
    /// packing from a file mapping can drop those pages while the rest is packed.
    pub fn pack_with(
        format: Format,
        gguf: &[u8],
        rows: usize,
        cols: usize,
        done: impl FnMut(&[u8]),
    ) -> Option<Self> {
        Self::pack_grouped(format, gguf, rows, cols, 1 << 20, done)
    }

    /// [`PackedMatrix::pack_with`] in parts of about `part_bytes` of `gguf`.
    fn pack_grouped(
        format: Format,
        gguf: &[u8],
        rows: usize,
        cols: usize,
        part_bytes: usize,
        mut done: impl FnMut(&[u8]),
    ) -> Option<Self> {
        let mut m = Self::zeroed(format, rows, cols)?;
        let row_bytes = format.row_bytes(cols);
        if gguf.len() != rows * row_bytes {
            return None;
        }
        // 16-row slabs depend on their own 16 rows only: pack a group of slabs at a time
        let group = (part_bytes / (TILE_ROWS * row_bytes)).max(1);
        let slabs = rows / TILE_ROWS;
        for start in (0..slabs).step_by(group) {
            let part = start..(start + group).min(slabs);
            m.fill_slabs(gguf, part.clone());
            done(&gguf[part.start * TILE_ROWS * row_bytes..part.end * TILE_ROWS * row_bytes]);
        }
        Some(m)
    }

    /// Packs slabs (16-row groups) `slabs` from the whole matrix's GGUF blocks `gguf`.
    fn fill_slabs(&mut self, gguf: &[u8], slabs: Range<usize>) {
        let format = self.format;
        let rows = slabs.start * TILE_ROWS..slabs.end * TILE_ROWS;
        match format {
            Format::F32 => {
                self.fill_f32(rows, |i| f32_at(gguf, 4 * i));
                return;
            }
            Format::BF16 | Format::F16 => {
                self.fill_half(rows, |i| [gguf[2 * i], gguf[2 * i + 1]]);
                return;
            }
            _ => {}
        }
        let kb = self.cols / format.block_elems();
        let tb = format.tile_bytes();
        let tiles = self.tiles_mut().chunks_exact_mut(tb).enumerate();
        for (t, tile) in tiles.skip(slabs.start * kb).take(slabs.len() * kb) {
            let (rt, b) = (t / kb, t % kb);
            for r in 0..TILE_ROWS {
                let row = rt * TILE_ROWS + r;
                let at = (row * kb + b) * format.block_bytes();
                let blk = &gguf[at..at + format.block_bytes()];
                match format {
                    Format::Q8_0 => {
                        tile[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                        // load g holds values 4g..4g+4 of each row, each + 128 (for an i8,
                        // flipping the sign bit), four at a time
                        for (g, q) in blk[2..].chunks_exact(4).enumerate() {
                            let at = 32 + g * 64 + r * 4;
                            let v = u32::from_le_bytes(q.try_into().expect("4 bytes"));
                            tile[at..at + 4].copy_from_slice(&(v ^ 0x8080_8080).to_le_bytes());
                        }
                    }
                    Format::Q4K => {
                        tile[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                        tile[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
                        for j in 0..8 {
                            let (sc, mn) = q4k_scale_min(j, &blk[4..16]);
                            tile[Q4K_SC + 16 * j + r] = sc;
                            tile[Q4K_MN + 16 * j + r] = mn;
                        }
                        let q = q4k_values(blk);
                        // per sub-block j, 4 loads of 64 bytes: load g holds values 4g..4g+4
                        // (low nibbles) and 16+4g..16+4g+4 (high nibbles) of each row
                        for j in 0..8 {
                            for g in 0..4 {
                                for i in 0..4 {
                                    let lo = q[32 * j + 4 * g + i];
                                    let hi = q[32 * j + 16 + 4 * g + i];
                                    tile[Q4K_QS + (4 * j + g) * 64 + r * 4 + i] = lo | (hi << 4);
                                }
                            }
                        }
                    }
                    Format::Q6K => {
                        tile[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
                        for g in 0..16 {
                            tile[Q6K_SC + 16 * g + r] = blk[192 + g];
                        }
                        let q = q6k_values(blk);
                        // low 4 bits as Q4_K's values; the high 2 bits of sub-block j in two
                        // loads, h = 0 for its first 16 values and 1 for the rest: byte (r, i)
                        // holds value 16h + 4g + i's bits at 2g
                        for j in 0..8 {
                            for g in 0..4 {
                                for i in 0..4 {
                                    let lo = q[32 * j + 4 * g + i];
                                    let hi = q[32 * j + 16 + 4 * g + i];
                                    let sub = Q6K_Q + Q6K_SUB * j;
                                    tile[sub + 128 + g * 64 + r * 4 + i] =
                                        (lo & 0x0F) | ((hi & 0x0F) << 4);
                                    for (h, v) in [lo, hi].into_iter().enumerate() {
                                        tile[sub + h * 64 + r * 4 + i] |= (v >> 4) << (2 * g);
                                    }
                                }
                            }
                        }
                    }
                    Format::F32 | Format::BF16 | Format::F16 => unreachable!("packed above"),
                }
            }
        }
    }

    /// Packs an f32 [rows, cols] matrix given row-major; `None` when the shape does not tile or
    /// `w` has the wrong length.
    pub fn pack_f32(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        let mut m = Self::zeroed(Format::F32, rows, cols)?;
        if w.len() != rows * cols {
            return None;
        }
        m.fill_f32(0..rows, |i| w[i]);
        Some(m)
    }

    /// Fills rows `rows` of an f32 matrix from its row-major values: value (row, c) goes to
    /// slab row / 16 at c · 16 + row % 16.
    fn fill_f32(&mut self, rows: Range<usize>, value: impl Fn(usize) -> f32) {
        let cols = self.cols;
        let slab = cols * F32_TILE;
        let tiles = self.tiles_mut();
        for row in rows {
            let (rt, r) = (row / TILE_ROWS, row % TILE_ROWS);
            let s = &mut tiles[rt * slab..(rt + 1) * slab];
            for c in 0..cols {
                let at = c * F32_TILE + 4 * r;
                s[at..at + 4].copy_from_slice(&value(row * cols + c).to_le_bytes());
            }
        }
    }

    /// Fills rows `rows` of a bf16 / f16 matrix from its row-major values (little-endian
    /// bytes): value (row, c) goes to slab row / 16 at c · 16 + row % 16.
    fn fill_half(&mut self, rows: Range<usize>, value: impl Fn(usize) -> [u8; 2]) {
        let cols = self.cols;
        let slab = cols * HALF_TILE;
        let tiles = self.tiles_mut();
        for row in rows {
            let (rt, r) = (row / TILE_ROWS, row % TILE_ROWS);
            let s = &mut tiles[rt * slab..(rt + 1) * slab];
            for c in 0..cols {
                let at = c * HALF_TILE + 2 * r;
                s[at..at + 2].copy_from_slice(&value(row * cols + c));
            }
        }
    }

    /// The weight format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes it reads: the tiles, or the file's blocks read in place.
    pub fn size_in_bytes(&self) -> usize {
        match &self.store {
            Store::Tiles { len, .. } => *len,
            Store::InPlace(p) => p.len(),
        }
    }

    /// Tiles a unit of work reads side by side ([`Format::streams`]; one for a matrix read in
    /// place).
    fn streams(&self, isa: Isa) -> usize {
        match self.store {
            Store::Tiles { .. } => self.format.streams(isa),
            Store::InPlace(_) => 1,
        }
    }

    /// Whether it reads the file's blocks in place ([`PackedMatrix::in_place`]) rather than a
    /// packed copy.
    pub fn is_in_place(&self) -> bool {
        matches!(self.store, Store::InPlace(_))
    }

    /// Row `row` dequantized from the packed tiles or the blocks read in place (portable; for
    /// tests and checks).
    pub fn dequantize_row(&self, row: usize) -> Vec<f32> {
        if let Store::InPlace(p) = &self.store {
            return self.dequantize_in_place(p, row);
        }
        let (rt, r) = (row / TILE_ROWS, row % TILE_ROWS);
        let kb = self.cols / self.format.block_elems();
        let tb = self.format.tile_bytes();
        let mut out = Vec::with_capacity(self.cols);
        for b in 0..kb {
            let tile = &self.tiles()[(rt * kb + b) * tb..(rt * kb + b + 1) * tb];
            match self.format {
                Format::F32 => out.push(f32_at(tile, 4 * r)),
                Format::BF16 => out.push(bf16_at(tile, 2 * r)),
                Format::F16 => out.push(f16_at(tile, 2 * r)),
                Format::Q8_0 => {
                    let d = f16_at(tile, 2 * r);
                    for k in 0..QK8_0 {
                        let q = tile[32 + (k / 4) * 64 + r * 4 + k % 4] as i32 - 128;
                        out.push(d * q as f32);
                    }
                }
                Format::Q6K => {
                    let d = f16_at(tile, 2 * r);
                    for k in 0..QK_K {
                        let (j, h, g, i) = (k / 32, (k % 32) / 16, (k % 16) / 4, k % 4);
                        let sub = Q6K_Q + Q6K_SUB * j;
                        let lo = tile[sub + 128 + g * 64 + r * 4 + i];
                        let lo = if h == 1 { lo >> 4 } else { lo & 0x0F };
                        let hi = (tile[sub + h * 64 + r * 4 + i] >> (2 * g)) & 3;
                        let sc = tile[Q6K_SC + 16 * (k / 16) + r] as i8 as f32;
                        out.push(d * sc * ((lo | (hi << 4)) as i32 - 32) as f32);
                    }
                }
                Format::Q4K => {
                    let (d, dmin) = (f16_at(tile, 2 * r), f16_at(tile, 32 + 2 * r));
                    for j in 0..8 {
                        let sc = tile[Q4K_SC + 16 * j + r] as f32;
                        let mn = tile[Q4K_MN + 16 * j + r] as f32;
                        for k in 0..32 {
                            let (g, i, high) = ((k % 16) / 4, k % 4, k >= 16);
                            let byte = tile[Q4K_QS + (4 * j + g) * 64 + r * 4 + i];
                            let q = if high { byte >> 4 } else { byte & 0x0F };
                            out.push(d * sc * q as f32 - dmin * mn);
                        }
                    }
                }
            }
        }
        out
    }

    /// The row tiles `tiles` (at most [`STREAMS`]) of this matrix times each row of `acts` (at
    /// most [`ROWS_PER_PASS`]), into `out` laid out [acts.len(), tiles.len() * 16], on `isa`
    /// (which this CPU runs: [`run_on`] checked).
    fn gemv(&self, isa: Isa, tiles: &[usize], acts: &[QuantRow], out: &mut [f32]) {
        let n = tiles.len() * TILE_ROWS;
        assert!(tiles.len() <= STREAMS && acts.len() <= ROWS_PER_PASS);
        assert!(out.len() == acts.len() * n);
        assert!(tiles.iter().all(|&t| (t + 1) * TILE_ROWS <= self.rows));
        for a in acts {
            assert_eq!(
                a.format, self.format,
                "activation row quantized for another format"
            );
            assert_eq!(a.len(), self.cols, "activation row length");
        }
        if acts.is_empty() || tiles.is_empty() {
            return;
        }
        if let Store::InPlace(p) = &self.store {
            debug_assert_eq!(tiles.len(), 1, "a matrix read in place is one stream");
            self.gemv_in_place(p, isa, tiles[0], acts, out);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let kb = self.cols / self.format.block_elems();
            let tb = self.format.tile_bytes();
            // tile t's row-slab: every block of the input for its 16 rows
            let mut slabs: [&[u8]; STREAMS] = [&[]; STREAMS];
            for (s, &t) in slabs.iter_mut().zip(tiles) {
                *s = &self.tiles()[t * kb * tb..(t + 1) * kb * tb];
            }
            let slabs = &slabs[..tiles.len()];
            if self.format.is_float() {
                let mut tmp: FloatOut = [[[0f32; TILE_ROWS]; ROWS_PER_PASS]; STREAMS];
                let mut xs: [&[f32]; ROWS_PER_PASS] = [&[]; ROWS_PER_PASS];
                for (x, a) in xs.iter_mut().zip(acts) {
                    *x = &a.f;
                }
                let xs = &xs[..acts.len()];
                let kind = match self.format {
                    Format::BF16 => kind::BF16,
                    Format::F16 => kind::F16,
                    _ => kind::F32,
                };
                // SAFETY: `run_on` checked that the CPU runs `isa`; 1..=STREAMS slabs and
                // 1..=ROWS_PER_PASS rows, every row `cols` long (asserted above) and every
                // slab `cols` tiles of this format.
                unsafe {
                    match isa {
                        Isa::Avx512 => avx512::float_rows(kind, slabs, xs, &mut tmp),
                        Isa::Avx2 => avx2::float_rows(kind, slabs, xs, &mut tmp),
                    }
                }
                for (i, per_tile) in tmp.iter().take(tiles.len()).enumerate() {
                    for (j, t) in per_tile.iter().take(acts.len()).enumerate() {
                        let at = j * n + i * TILE_ROWS;
                        out[at..at + TILE_ROWS].copy_from_slice(t);
                    }
                }
                return;
            }
            if isa == Isa::Avx2 {
                // every slab side by side, every activation row in one pass over them
                let mut tmp = [[[0f32; TILE_ROWS]; STREAMS]; ROWS_PER_PASS];
                macro_rules! rows {
                    ($kernel:ident) => {
                        // SAFETY: `run_on` checked that the CPU runs AVX2; at most STREAMS slabs
                        // of kb tiles, every row of `acts` kb blocks (lengths asserted above).
                        unsafe {
                            match acts {
                                [a] => avx2::$kernel::<1>(
                                    slabs,
                                    [a],
                                    (&mut tmp[..1]).try_into().expect("1 row"),
                                ),
                                [a, b] => avx2::$kernel::<2>(
                                    slabs,
                                    [a, b],
                                    (&mut tmp[..2]).try_into().expect("2 rows"),
                                ),
                                [a, b, c] => avx2::$kernel::<3>(
                                    slabs,
                                    [a, b, c],
                                    (&mut tmp[..3]).try_into().expect("3 rows"),
                                ),
                                [a, b, c, d] => avx2::$kernel::<4>(slabs, [a, b, c, d], &mut tmp),
                                _ => unreachable!("1..=ROWS_PER_PASS rows, asserted above"),
                            }
                        }
                    };
                }
                match self.format {
                    Format::Q4K => rows!(tile_rows_q4k),
                    Format::Q6K => rows!(tile_rows_q6k),
                    Format::Q8_0 => rows!(tile_rows_q8_0),
                    Format::F32 | Format::BF16 | Format::F16 => unreachable!("handled above"),
                }
                for (j, per_slab) in tmp.iter().take(acts.len()).enumerate() {
                    for (i, t) in per_slab.iter().take(tiles.len()).enumerate() {
                        let at = j * n + i * TILE_ROWS;
                        out[at..at + TILE_ROWS].copy_from_slice(t);
                    }
                }
                return;
            }
            // AVX-512: one slab, every activation row in one pass over it
            let slab = slabs[0];
            let mut tmp = [[0f32; TILE_ROWS]; ROWS_PER_PASS];
            macro_rules! rows {
                ($kernel:ident) => {
                    // SAFETY: `run_on` checked that the CPU runs AVX-512; the slab holds kb
                    // tiles and every row of `acts` kb blocks (lengths asserted above).
                    unsafe {
                        match acts {
                            [a] => avx512::$kernel::<1>(
                                slab,
                                [a],
                                (&mut tmp[..1]).try_into().expect("1 row"),
                            ),
                            [a, b] => avx512::$kernel::<2>(
                                slab,
                                [a, b],
                                (&mut tmp[..2]).try_into().expect("2 rows"),
                            ),
                            [a, b, c] => avx512::$kernel::<3>(
                                slab,
                                [a, b, c],
                                (&mut tmp[..3]).try_into().expect("3 rows"),
                            ),
                            [a, b, c, d] => avx512::$kernel::<4>(slab, [a, b, c, d], &mut tmp),
                            _ => unreachable!("1..=ROWS_PER_PASS rows, asserted above"),
                        }
                    }
                };
            }
            debug_assert_eq!(tiles.len(), 1, "AVX-512 reads one slab at a time");
            match self.format {
                Format::Q4K => rows!(tile_rows_q4k),
                Format::Q6K => rows!(tile_rows_q6k),
                Format::Q8_0 => rows!(tile_rows_q8_0),
                Format::F32 | Format::BF16 | Format::F16 => unreachable!("handled above"),
            }
            for (j, t) in tmp.iter().take(acts.len()).enumerate() {
                out[j * n..j * n + TILE_ROWS].copy_from_slice(t);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, out);
            unreachable!("no ISA has kernels off x86_64");
        }
    }
}

/// What the float kernels write: `[slab][activation row][tile row]`.
type FloatOut = [[[f32; TILE_ROWS]; ROWS_PER_PASS]; STREAMS];

/// Weight kinds of the float kernels (a const parameter, so each kind is its own loop).
mod kind {
    /// f32 weights.
    pub(super) const F32: u8 = 0;
    /// bf16 weights: the top half of an f32.
    pub(super) const BF16: u8 = 1;
    /// IEEE half weights.
    pub(super) const F16: u8 = 2;
}
/// One product of a batch: `mat` times each row of `acts`, into `out` laid out
/// [acts.len(), mat.rows()].
pub struct Job<'a> {
    /// The weights.
    pub mat: &'a PackedMatrix,
    /// Input rows, quantized for `mat`'s format.
    pub acts: &'a [QuantRow],
    /// Output, `acts.len() * mat.rows()` values.
    pub out: &'a mut [f32],
}

/// Raw output pointers shared with the worker threads.
struct Outputs(Vec<*mut f32>);
// SAFETY: each (job, activation row, tile) output range is written by exactly one work unit,
// and `run` does not return before every unit has finished.
unsafe impl Sync for Outputs {}

impl Outputs {
    fn get(&self, job: usize) -> *mut f32 {
        self.0[job]
    }
}

/// Runs a batch of products in one parallel region on candle's worker pool (its size follows
/// `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS`), on [`Isa::selected`].
///
/// # Panics
/// If there are jobs but the CPU runs no kernels here ([`Format::native`] is false: nothing
/// was packed), or a job's shapes disagree.
pub fn run(jobs: &mut [Job<'_>]) {
    if jobs.is_empty() {
        return;
    }
    let isa = Isa::selected().expect("sinew's kernels need AVX2/FMA/F16C or AVX-512 VNNI");
    run_on(isa, jobs);
}

/// [`run`] on the kernels of `isa`, for comparing instruction sets on one machine.
///
/// # Panics
/// If this CPU does not run `isa` ([`Isa::supported`]) or a job's shapes disagree.
pub fn run_on(isa: Isa, jobs: &mut [Job<'_>]) {
    assert!(isa.runs_here(), "this CPU does not run the {isa:?} kernels");
    // a unit: job j, tile i of each of the job's STREAMS runs of `run_len` tiles
    let mut units: Vec<(usize, usize)> = Vec::new();
    let mut run_lens = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.iter().enumerate() {
        assert_eq!(
            job.out.len(),
            job.acts.len() * job.mat.rows,
            "job output size"
        );
        let run_len = (job.mat.rows / TILE_ROWS).div_ceil(job.mat.streams(isa));
        run_lens.push(run_len);
        units.extend((0..run_len).map(|i| (j, i)));
    }
    let outs = Outputs(jobs.iter_mut().map(|j| j.out.as_mut_ptr()).collect());
    let jobs = &*jobs;
    let work = |range: Range<usize>| {
        let mut tmp = [0f32; ROWS_PER_PASS * TILE_ROWS * STREAMS];
        for &(j, i) in &units[range] {
            let job = &jobs[j];
            let rows = job.mat.rows;
            let mut picked = [0usize; STREAMS];
            let mut count = 0;
            for r in 0..job.mat.streams(isa) {
                let t = r * run_lens[j] + i;
                if t < rows / TILE_ROWS {
                    picked[count] = t;
                    count += 1;
                }
            }
            let tiles = &picked[..count];
            let n = tiles.len() * TILE_ROWS;
            // several activation rows share each pass over the weights: each weight is read
            // (and unpacked) once for all of them
            let pass = ROWS_PER_PASS;
            for (c, acts) in job.acts.chunks(pass).enumerate() {
                job.mat.gemv(isa, tiles, acts, &mut tmp[..acts.len() * n]);
                for (a, row) in (c * pass..).take(acts.len()).enumerate() {
                    for (k, &t) in tiles.iter().enumerate() {
                        let src = &tmp[a * n + k * TILE_ROWS..a * n + (k + 1) * TILE_ROWS];
                        // SAFETY: the destination, tile t of row `row` of job j's output, is
                        // written by this unit only and outlives the parallel region.
                        unsafe {
                            let dst = outs.get(j).add(row * rows + t * TILE_ROWS);
                            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, TILE_ROWS);
                        }
                    }
                }
            }
        }
    };
    if units.len() <= 1 {
        work(0..units.len());
    } else {
        candle_core::utils::barrier_pool().execute_chunked(units.len(), work);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
mod in_place;
use in_place::InPlace;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;

    /// Quantizes [rows, cols] values with candle (llama.cpp's quantizer): the GGUF blocks and
    /// the dequantized values.
    fn quantize(dtype: GgmlDType, vals: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
        let t = Tensor::from_slice(vals, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let deq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (q.data().unwrap().into_owned(), deq)
    }

    fn dtype(f: Format) -> GgmlDType {
        match f {
            Format::Q4K => GgmlDType::Q4K,
            Format::Q6K => GgmlDType::Q6K,
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::F32 => GgmlDType::F32,
            Format::BF16 => GgmlDType::BF16,
            Format::F16 => GgmlDType::F16,
        }
    }

    /// Activation value `i` as the kernels see it.
    fn act(a: &QuantRow, i: usize) -> f64 {
        match a.format {
            Format::F32 | Format::BF16 | Format::F16 => a.f[i] as f64,
            f => a.d[i / f.block_elems()] as f64 * a.qs[i] as f64,
        }
    }

    /// `w` (dequantized) · the activation row as prepared, in f64, and the sum of the terms'
    /// magnitudes (the scale of the rounding error).
    fn exact(w: &[f32], a: &QuantRow) -> (f64, f64) {
        let terms = w.iter().enumerate().map(|(i, &w)| w as f64 * act(a, i));
        (terms.clone().sum(), terms.map(f64::abs).sum::<f64>() + 1e-6)
    }

    /// `packed` times each row of `acts` on every instruction set this CPU runs.
    fn on_each_isa(packed: &PackedMatrix, acts: &[QuantRow]) -> Vec<(Isa, Vec<f32>)> {
        Isa::supported()
            .into_iter()
            .map(|isa| {
                let mut out = vec![0f32; acts.len() * packed.rows()];
                run_on(
                    isa,
                    &mut [Job {
                        mat: packed,
                        acts,
                        out: &mut out,
                    }],
                );
                (isa, out)
            })
            .collect()
    }

    /// Packs a random [rows, cols] matrix, checks the packed copy dequantizes to candle's values,
    /// and that the scalar reference and (where the CPU has it) the packed kernel give each
    /// row's dot product with `x`.
    fn check(format: Format, w: &[f32], x: &[f32], rows: usize) {
        let cols = x.len();
        let (blocks, deq) = quantize(dtype(format), w, rows, cols);
        let a = QuantRow::new(format, x);
        let rb = format.row_bytes(cols);
        for packed in matrices(format, &blocks, rows, cols) {
            let simd = on_each_isa(&packed, std::slice::from_ref(&a));
            let how = if packed.is_in_place() {
                "in place"
            } else {
                "packed"
            };
            for r in 0..rows {
                let wr = &deq[r * cols..(r + 1) * cols];
                assert_eq!(packed.dequantize_row(r), wr, "row {r} {how}");
                let (want, scale) = exact(wr, &a);
                let s = dot_scalar(format, &blocks[r * rb..(r + 1) * rb], &a) as f64;
                assert!(
                    (s - want).abs() <= 1e-4 * scale,
                    "row {r}: scalar {s} vs {want}"
                );
                for (isa, out) in &simd {
                    let v = out[r] as f64;
                    assert!(
                        (v - want).abs() <= 1e-4 * scale,
                        "row {r}: {how} ({isa:?}) {v} vs {want}"
                    );
                }
            }
        }
        // the quantized activations stay within half a step of x (f32: exactly x), up to the f32
        // rounding of x · 127/amax: |x · inv| ≤ 127, so a value a few ulps from a half step may
        // round to the far side (seen: 0.500003 steps); 1e-4 of a step covers it many times over
        let step = a.d.iter().fold(0f32, |m, &d| m.max(d)) as f64;
        for (i, &xi) in x.iter().enumerate() {
            let err = (act(&a, i) - xi as f64).abs();
            assert!(err <= (0.5 + 1e-4) * step, "x[{i}]: {err} off, step {step}");
        }
    }

    /// Several activation rows through `run` (up to four share each pass over the weights):
    /// every output is within rounding of the exact product, and bitwise what that row gets
    /// alone. On every instruction set the CPU runs; the float formats give the same bits on
    /// each.
    fn check_rows(format: Format, w: &[f32], xs: &[Vec<f32>], rows: usize) {
        let cols = xs[0].len();
        let (blocks, deq) = quantize(dtype(format), w, rows, cols);
        let acts: Vec<QuantRow> = xs.iter().map(|x| QuantRow::new(format, x)).collect();
        for packed in matrices(format, &blocks, rows, cols) {
            let mut first: Option<Vec<f32>> = None;
            for (isa, out) in on_each_isa(&packed, &acts) {
                for (i, a) in acts.iter().enumerate() {
                    let mut alone = vec![0f32; rows];
                    run_on(
                        isa,
                        &mut [Job {
                            mat: &packed,
                            acts: std::slice::from_ref(a),
                            out: &mut alone,
                        }],
                    );
                    assert!(
                        alone
                            .iter()
                            .map(|v| v.to_bits())
                            .eq(out[i * rows..(i + 1) * rows].iter().map(|v| v.to_bits())),
                        "{isa:?} input {i}: not what it gets alone"
                    );
                    for r in 0..rows {
                        let (want, scale) = exact(&deq[r * cols..(r + 1) * cols], a);
                        let v = out[i * rows + r] as f64;
                        assert!(
                            (v - want).abs() <= 1e-4 * scale,
                            "{isa:?} input {i} row {r}: {v} vs {want}"
                        );
                    }
                }
                if format.is_float()
                    && let Some(first) = &first
                {
                    assert!(
                        first
                            .iter()
                            .map(|v| v.to_bits())
                            .eq(out.iter().map(|v| v.to_bits())),
                        "{isa:?} float products differ from the first ISA's"
                    );
                }
                first.get_or_insert(out);
            }
        }
    }

    /// The matrix of GGUF blocks `blocks` as the kernels read it: packed, and for a format read
    /// in place also in place (from an anonymous mapping holding the blocks at an odd offset).
    pub(super) fn matrices(
        format: Format,
        blocks: &[u8],
        rows: usize,
        cols: usize,
    ) -> Vec<PackedMatrix> {
        let mut out = vec![PackedMatrix::pack(format, blocks, rows, cols).expect("tiles")];
        if format.reads_in_place() {
            let mut map = memmap2::MmapMut::map_anon(blocks.len() + 3).expect("anonymous map");
            map[3..].copy_from_slice(blocks);
            let map = std::sync::Arc::new(map.make_read_only().expect("read-only"));
            out.push(PackedMatrix::in_place(map, 3, format, rows, cols).expect("in place"));
        }
        out
    }

    fn case(format: Format) -> impl Strategy<Value = (Vec<f32>, Vec<f32>, usize)> {
        let be = format.block_elems();
        // f32 widths from 1 to 70; 1 to 7 row tiles (runs of unequal length for f32 units)
        let blocks = if format.is_float() { 1usize..71 } else { 1..4 };
        (blocks, 1usize..8).prop_flat_map(move |(blocks, tiles)| {
            let (cols, rows) = (
                blocks * be * if be == QK8_0 { 3 } else { 1 },
                tiles * TILE_ROWS,
            );
            (
                prop::collection::vec(-4.0f32..4.0, rows * cols),
                prop::collection::vec(-4.0f32..4.0, cols),
                Just(rows),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn q4k_packed_and_reference((w, x, rows) in case(Format::Q4K)) {
            check(Format::Q4K, &w, &x, rows);
        }

        #[test]
        fn q8_0_packed_and_reference((w, x, rows) in case(Format::Q8_0)) {
            check(Format::Q8_0, &w, &x, rows);
        }

        #[test]
        fn q6k_packed_and_reference((w, x, rows) in case(Format::Q6K)) {
            check(Format::Q6K, &w, &x, rows);
        }

        #[test]
        fn f32_packed_and_reference((w, x, rows) in case(Format::F32)) {
            check(Format::F32, &w, &x, rows);
        }

        #[test]
        fn bf16_and_f16_packed_and_reference((w, x, rows) in case(Format::BF16)) {
            check(Format::BF16, &w, &x, rows);
            check(Format::F16, &w, &x, rows);
        }

        #[test]
        fn several_rows_share_a_pass(
            (w, x, rows) in prop_oneof![case(Format::F32), case(Format::Q8_0), case(Format::Q4K)],
            extra in prop::collection::vec(-4.0f32..4.0, 0..8 * 256),
        ) {
            // 1..=9 input rows of x's width: whole passes of 4 and a remainder
            let cols = x.len();
            let mut xs = vec![x];
            xs.extend(extra.chunks_exact(cols).take(8).map(<[f32]>::to_vec));
            check_rows(Format::F32, &w, &xs, rows);
            check_rows(Format::BF16, &w, &xs, rows);
            check_rows(Format::F16, &w, &xs, rows);
            if cols.is_multiple_of(QK8_0) {
                check_rows(Format::Q8_0, &w, &xs, rows);
            }
            if cols.is_multiple_of(QK_K) {
                check_rows(Format::Q4K, &w, &xs, rows);
                check_rows(Format::Q6K, &w, &xs, rows);
            }
        }
    }

    #[test]
    fn packing_in_parts_gives_the_same_tiles_and_hands_back_every_byte_once_in_order() {
        for format in [
            Format::Q4K,
            Format::Q6K,
            Format::Q8_0,
            Format::F32,
            Format::BF16,
            Format::F16,
        ] {
            let (rows, cols) = (5 * TILE_ROWS, 2 * format.block_elems().max(16));
            let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let (blocks, _) = quantize(dtype(format), &w, rows, cols);
            let whole = PackedMatrix::pack(format, &blocks, rows, cols).unwrap();
            let row_bytes = format.row_bytes(cols);
            // one slab, two slabs (the last part short), and everything at once
            for part in [1, 2 * TILE_ROWS * row_bytes, usize::MAX / 2] {
                let mut seen = Vec::new();
                let m = PackedMatrix::pack_grouped(format, &blocks, rows, cols, part, |p| {
                    seen.push((p.as_ptr() as usize - blocks.as_ptr() as usize, p.len()))
                })
                .unwrap();
                assert!(m.tiles() == whole.tiles(), "{format:?} in parts of {part}");
                let mut at = 0;
                for (start, len) in seen {
                    assert_eq!(start, at, "{format:?}: parts out of order or overlapping");
                    at += len;
                }
                assert_eq!(at, blocks.len(), "{format:?}: not every byte handed back");
            }
        }
    }

    #[test]
    fn zero_rows_and_uneven_blocks() {
        let rows = TILE_ROWS;
        check(
            Format::Q4K,
            &vec![1.0; rows * 2 * QK_K],
            &vec![0.0; 2 * QK_K],
            rows,
        );
        let x: Vec<f32> = (0..4 * QK8_0)
            .map(|i| if i < QK8_0 { 1e-3 } else { 300.0 })
            .collect();
        let w: Vec<f32> = (0..rows).flat_map(|_| x.iter().copied()).collect();
        check(Format::Q8_0, &w, &x, rows);
    }

    #[test]
    fn q8_0_minus_128_does_not_wrap() {
        // llama.cpp never writes -128 into Q8_0, but a file may hold it
        let mut blk = vec![0u8; Q8_0_BYTES];
        blk[..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        blk[2..].iter_mut().for_each(|b| *b = 0x80);
        let gguf: Vec<u8> = (0..TILE_ROWS).flat_map(|_| blk.iter().copied()).collect();
        let a = QuantRow::new(Format::Q8_0, &[1.0; QK8_0]);
        let want = -128.0 * 127.0 * QK8_0 as f32 * a.d[0];
        assert!((dot_scalar(Format::Q8_0, &blk, &a) - want).abs() < 1e-3 * want.abs());
        for packed in matrices(Format::Q8_0, &gguf, TILE_ROWS, QK8_0) {
            assert_eq!(packed.dequantize_row(3), vec![-128.0; QK8_0]);
            for (isa, out) in on_each_isa(&packed, std::slice::from_ref(&a)) {
                assert!(
                    out.iter().all(|v| (v - want).abs() < 1e-3 * want.abs()),
                    "{isa:?} (in place: {}): {out:?}",
                    packed.is_in_place()
                );
            }
        }
    }

    /// GGUF blocks of `format` with every byte `fill` and a scale of 1: the largest values and
    /// scales the format holds (Q4_K 15 · 63 with mins 63, Q6_K 63 with scale byte `fill`,
    /// Q8_0 `fill` as i8).
    fn extreme_block(format: Format, fill: u8) -> Vec<u8> {
        let mut blk = vec![fill; format.block_bytes()];
        let one = f16::from_f32(1.0).to_bits().to_le_bytes();
        match format {
            Format::Q4K => {
                blk[..2].copy_from_slice(&one);
                blk[2..4].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
            }
            Format::Q6K => blk[208..].copy_from_slice(&one),
            _ => blk[..2].copy_from_slice(&one),
        }
        blk
    }

    #[test]
    fn extreme_values_and_scales_neither_saturate_nor_wrap() {
        // the 8-bit products' intermediate sums are at their largest when every weight, scale
        // and activation is: each ISA must still give the exact integer reference
        for (format, fills) in [
            (Format::Q4K, vec![0xFF]),
            (Format::Q6K, vec![0xFF, 0x7F, 0x80]),
            (Format::Q8_0, vec![0x7F, 0x80, 0x81]),
        ] {
            let blocks = 2;
            let cols = blocks * format.block_elems();
            for fill in fills {
                let row: Vec<u8> = (0..blocks)
                    .flat_map(|_| extreme_block(format, fill))
                    .collect();
                let gguf: Vec<u8> = (0..TILE_ROWS).flat_map(|_| row.iter().copied()).collect();
                for packed in matrices(format, &gguf, TILE_ROWS, cols) {
                    let signs: [fn(usize) -> f32; 3] =
                        [|_| 1.0, |_| -1.0, |i| if i % 4 == 3 { -1.0 } else { 1.0 }];
                    for sign in signs {
                        let x: Vec<f32> = (0..cols).map(sign).collect();
                        let a = QuantRow::new(format, &x);
                        let want = dot_scalar(format, &row, &a);
                        assert!(want != 0.0);
                        for (isa, out) in on_each_isa(&packed, std::slice::from_ref(&a)) {
                            for v in out {
                                assert!(
                                    (v - want).abs() <= 1e-5 * want.abs().max(1.0),
                                    "{format:?} fill {fill:#x} {isa:?} (in place: {}): {v} vs {want}",
                                    packed.is_in_place()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        for (v, want) in [
            (0.5f32, 0i8),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (126.6, 127),
            (-127.0, -127),
            (3.49, 3),
            (f32::NAN, 0),
        ] {
            assert_eq!(round_to_i8(v), want, "{v}");
            if !v.is_nan() {
                assert_eq!(round_to_i8(v), v.round_ties_even() as i8, "{v}");
            }
        }
    }

    #[test]
    fn shapes_that_do_not_tile_are_refused() {
        let row = vec![0u8; Q8_0_BYTES];
        assert!(PackedMatrix::pack(Format::Q8_0, &row, 1, QK8_0).is_none());
        let rows: Vec<u8> = vec![0u8; TILE_ROWS * Q8_0_BYTES];
        assert!(PackedMatrix::pack(Format::Q8_0, &rows, TILE_ROWS, QK8_0 + 1).is_none());
        assert!(PackedMatrix::pack(Format::Q8_0, &rows[1..], TILE_ROWS, QK8_0).is_none());
        assert!(PackedMatrix::pack(Format::Q8_0, &rows, TILE_ROWS, QK8_0).is_some());
    }
}
