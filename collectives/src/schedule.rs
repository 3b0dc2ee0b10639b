//! Collective schedules as pure functions: how a buffer is cut into chunks and pieces, and which
//! chunk a rank sends and receives at each ring step.

use std::ops::Range;

/// The `k`-th of `parts` near-equal consecutive ranges of `0..len` (the first ones shorter when
/// `len` does not divide; empty when `len < parts`).
pub fn chunk(len: usize, parts: usize, k: usize) -> Range<usize> {
    let at = |i: usize| (i as u128 * len as u128 / parts as u128) as usize;
    at(k)..at(k + 1)
}

/// `range` cut into consecutive pieces of at most `piece` elements (one empty piece for an empty
/// range, so every message pair still meets).
pub fn pieces(range: Range<usize>, piece: usize) -> impl Iterator<Item = Range<usize>> {
    let piece = piece.max(1);
    let n = range.len().div_ceil(piece).max(1);
    (0..n).map(move |i| {
        let start = (range.start + i * piece).min(range.end);
        start..(start + piece).min(range.end)
    })
}

/// How many pieces of at most `piece` elements [`pieces`] cuts `0..len` into (at least one).
pub fn piece_count(len: usize, piece: usize) -> usize {
    len.div_ceil(piece.max(1)).max(1)
}

/// The `i`-th piece of `0..len` (as [`pieces`] would yield it), computed without iterating.
pub fn piece_at(len: usize, piece: usize, i: usize) -> Range<usize> {
    let piece = piece.max(1);
    let start = (i * piece).min(len);
    start..(start + piece).min(len)
}

/// Ring reduce-scatter, step `step` of `world - 1`: the chunk rank `rank` sends to `rank + 1`
/// and the chunk it receives from `rank - 1` and reduces. After the last step `rank` holds chunk
/// `rank` fully reduced; chunk `k` is folded in ring order starting at rank `k + 1`.
pub fn reduce_scatter_step(rank: usize, world: usize, step: usize) -> (usize, usize) {
    let send = (rank + 2 * world - 1 - step) % world;
    let recv = (rank + 2 * world - 2 - step) % world;
    (send, recv)
}

/// Ring all-gather, step `step` of `world - 1`: the chunk `rank` forwards to `rank + 1` and the
/// chunk it receives from `rank - 1` (starting from its own chunk `rank`).
pub fn all_gather_step(rank: usize, world: usize, step: usize) -> (usize, usize) {
    let send = (rank + world - step) % world;
    let recv = (rank + 2 * world - step - 1) % world;
    (send, recv)
}

/// The rank order in which chunk `k` of a ring reduce-scatter is folded.
pub fn reduce_scatter_order(world: usize, k: usize) -> impl Iterator<Item = usize> {
    (1..=world).map(move |i| (k + i) % world)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunks_cover_the_range_in_order() {
        for len in [0, 1, 5, 7, 100] {
            for parts in 1..9 {
                let all: Vec<usize> = (0..parts).flat_map(|k| chunk(len, parts, k)).collect();
                assert_eq!(all, (0..len).collect::<Vec<_>>());
            }
        }
        let p: Vec<_> = pieces(3..10, 3).collect();
        assert_eq!(p, vec![3..6, 6..9, 9..10]);
        assert_eq!(pieces(4..4, 8).collect::<Vec<_>>(), vec![4..4]);
        for (len, piece) in [(0, 8), (1, 8), (7, 3), (9, 3), (100, 7)] {
            let it: Vec<_> = pieces(0..len, piece).collect();
            let indexed: Vec<_> = (0..piece_count(len, piece))
                .map(|i| piece_at(len, piece, i))
                .collect();
            assert_eq!(it, indexed, "len {len}, piece {piece}");
        }
    }

    proptest! {
        #[test]
        fn ring_steps_match_between_neighbours_and_cover_every_chunk(world in 1usize..12) {
            for step in 0..world.saturating_sub(1) {
                for r in 0..world {
                    let left = (r + world - 1) % world;
                    prop_assert_eq!(reduce_scatter_step(r, world, step).1, reduce_scatter_step(left, world, step).0);
                    prop_assert_eq!(all_gather_step(r, world, step).1, all_gather_step(left, world, step).0);
                }
            }
            for r in 0..world {
                // The last reduce-scatter step delivers chunk r to rank r; all-gather receives
                // every other chunk exactly once.
                if world > 1 {
                    prop_assert_eq!(reduce_scatter_step(r, world, world - 2).1, r);
                }
                let mut got: Vec<usize> = (0..world.saturating_sub(1)).map(|s| all_gather_step(r, world, s).1).collect();
                got.push(r);
                got.sort();
                prop_assert_eq!(got, (0..world).collect::<Vec<_>>());
                let order: Vec<usize> = reduce_scatter_order(world, r).collect();
                prop_assert_eq!(order.last().copied(), Some(r));
            }
        }
    }
}
