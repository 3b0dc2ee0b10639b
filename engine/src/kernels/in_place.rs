//! Q8_0 matrices read where they lie in a model file's mapping, with no packed copy.
//!
//! Packing a matrix costs a pass over its bytes and a second copy in memory. For Q8_0 that copy
//! buys little where a matrix sees one activation row at a time: the file's blocks are already
//! bytes of i8 with a scale per 32, and a kernel that reads them row by row (two blocks per
//! 64-byte register, one horizontal sum per row) streams them as fast as the tiles
//! (`benches/kernels.rs`). A mixture-of-experts layer's experts are such matrices — a step
//! routes a few rows to each — so a GGUF file's stacked Q8_0 experts are read in place: loading
//! copies nothing, the first token does not wait for experts to be packed, and the weights are
//! in memory once, as the file's page cache. The tiles keep their edge where many rows share
//! each weight load (four rows: about twice the in-place rate), so dense matrices, which every
//! row of a step goes through, stay packed.

use std::sync::Arc;

use super::{Format, Isa, PackedMatrix, QK8_0, QuantRow, ROWS_PER_PASS, Store, TILE_ROWS, f16_at};

/// A matrix's GGUF blocks, row after row, in a read-only file mapping.
pub(super) struct InPlace {
    map: Arc<memmap2::Mmap>,
    start: usize,
    len: usize,
}

impl InPlace {
    /// The blocks.
    fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    /// Bytes of blocks.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Format {
    /// Whether the kernels read this format's GGUF blocks in place ([`PackedMatrix::in_place`]):
    /// Q8_0 only (the k-quants' scales and split bits are what the tiles unpack once).
    pub fn reads_in_place(self) -> bool {
        self == Format::Q8_0
    }
}

impl PackedMatrix {
    /// The `[rows, cols]` matrix of `format` whose GGUF blocks start at `start` in `map`, read
    /// there by the kernels with nothing copied; `None` unless `format` reads in place
    /// ([`Format::reads_in_place`]), the shape tiles (rows a multiple of 16, cols of the block
    /// size) and the blocks lie inside the mapping. The mapping stays alive as long as the
    /// matrix; its pages must stay mapped (not released after a copy).
    pub fn in_place(
        map: Arc<memmap2::Mmap>,
        start: usize,
        format: Format,
        rows: usize,
        cols: usize,
    ) -> Option<Self> {
        if !format.reads_in_place() {
            return None;
        }
        let len = Self::blocks_within(format, rows, cols, start, map.len())?;
        Some(PackedMatrix {
            format,
            rows,
            cols,
            store: Store::InPlace(InPlace { map, start, len }),
        })
    }

    /// Row `row` of a matrix read in place, dequantized from its blocks.
    pub(super) fn dequantize_in_place(&self, p: &InPlace, row: usize) -> Vec<f32> {
        let rb = self.format.row_bytes(self.cols);
        let blocks = &p.bytes()[row * rb..(row + 1) * rb];
        let mut out = Vec::with_capacity(self.cols);
        for blk in blocks.chunks_exact(self.format.block_bytes()) {
            let d = f16_at(blk, 0);
            out.extend(blk[2..2 + QK8_0].iter().map(|&q| d * (q as i8) as f32));
        }
        out
    }

    /// Rows `16 · tile..16 · tile + 16` of a matrix read in place times each row of `acts` (at
    /// most [`ROWS_PER_PASS`], checked by the caller), into `out` laid out [acts.len(), 16].
    pub(super) fn gemv_in_place(
        &self,
        p: &InPlace,
        isa: Isa,
        tile: usize,
        acts: &[QuantRow],
        out: &mut [f32],
    ) {
        debug_assert_eq!(self.format, Format::Q8_0);
        let rb = self.format.row_bytes(self.cols);
        let rows = &p.bytes()[tile * TILE_ROWS * rb..(tile + 1) * TILE_ROWS * rb];
        #[cfg(target_arch = "x86_64")]
        {
            use super::{avx2, avx512};
            let mut tmp = [[0f32; TILE_ROWS]; ROWS_PER_PASS];
            macro_rules! rows {
                ($isa:ident) => {
                    // SAFETY: the caller checked that the CPU runs `isa`; `rows` holds 16 rows of
                    // `rb` bytes, the blocks of every row of `acts` (lengths checked by the
                    // caller against `cols`).
                    unsafe {
                        match acts {
                            [a] => $isa::block_rows_q8_0::<1>(
                                rows,
                                rb,
                                [a],
                                (&mut tmp[..1]).try_into().expect("1 row"),
                            ),
                            [a, b] => $isa::block_rows_q8_0::<2>(
                                rows,
                                rb,
                                [a, b],
                                (&mut tmp[..2]).try_into().expect("2 rows"),
                            ),
                            [a, b, c] => $isa::block_rows_q8_0::<3>(
                                rows,
                                rb,
                                [a, b, c],
                                (&mut tmp[..3]).try_into().expect("3 rows"),
                            ),
                            [a, b, c, d] => {
                                $isa::block_rows_q8_0::<4>(rows, rb, [a, b, c, d], &mut tmp)
                            }
                            _ => unreachable!("1..=ROWS_PER_PASS rows, checked by the caller"),
                        }
                    }
                };
            }
            match isa {
                Isa::Avx512 => rows!(avx512),
                Isa::Avx2 => rows!(avx2),
            }
            for (j, t) in tmp.iter().take(acts.len()).enumerate() {
                out[j * TILE_ROWS..(j + 1) * TILE_ROWS].copy_from_slice(t);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, rows, acts, out);
            unreachable!("no ISA has kernels off x86_64");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Q8_0_BYTES;

    fn map(len: usize) -> Arc<memmap2::Mmap> {
        let m = memmap2::MmapMut::map_anon(len).expect("anonymous map");
        Arc::new(m.make_read_only().expect("read-only"))
    }

    #[test]
    fn only_q8_0_of_a_tiling_shape_inside_the_mapping_reads_in_place() {
        let len = TILE_ROWS * Q8_0_BYTES;
        let m = map(len + 1);
        let at = |start, format, rows, cols| {
            PackedMatrix::in_place(m.clone(), start, format, rows, cols).is_some()
        };
        assert!(at(0, Format::Q8_0, TILE_ROWS, QK8_0));
        assert!(at(1, Format::Q8_0, TILE_ROWS, QK8_0));
        assert!(
            !at(2, Format::Q8_0, TILE_ROWS, QK8_0),
            "one byte past the end"
        );
        assert!(
            !at(usize::MAX, Format::Q8_0, TILE_ROWS, QK8_0),
            "start overflows"
        );
        assert!(
            !at(0, Format::Q8_0, TILE_ROWS - 1, QK8_0),
            "rows not a multiple of 16"
        );
        assert!(
            !at(0, Format::Q8_0, TILE_ROWS, QK8_0 + 1),
            "cols not whole blocks"
        );
        assert!(!at(0, Format::Q8_0, usize::MAX, QK8_0), "size overflows");
        assert!(!at(0, Format::Q4K, TILE_ROWS, 256), "Q4_K is packed");
        let p = PackedMatrix::in_place(m, 0, Format::Q8_0, TILE_ROWS, QK8_0).unwrap();
        assert!(p.is_in_place());
        assert_eq!(p.size_in_bytes(), len);
        assert_eq!(p.dequantize_row(TILE_ROWS - 1), vec![0.0; QK8_0]);
    }
}
