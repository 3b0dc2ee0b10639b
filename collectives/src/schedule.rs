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

/// The piece size, in bytes, for a message of `len` bytes: half the message, so that a receiver
/// can work on (reduce, forward) the first half while the second is still arriving, but never
/// below `min` (a piece costs a frame and its system calls, so small pieces lose more to
/// overhead than pipelining wins) nor above `max`. `min` above `max` counts as `max`. Both ends
/// of a message compute the same size from its length, so they cut it alike.
pub fn piece_bytes(len: usize, min: usize, max: usize) -> usize {
    let max = max.max(1);
    len.div_ceil(2).clamp(min.clamp(1, max), max)
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

    #[test]
    fn pieces_halve_a_message_within_their_bounds() {
        let (k, m) = (1usize << 10, 1usize << 20);
        // small messages go whole, mid-sized ones in two halves, large ones in max-sized pieces
        assert_eq!(piece_bytes(100 * k, 256 * k, m), 256 * k);
        assert_eq!(piece_bytes(512 * k, 256 * k, m), 256 * k);
        assert_eq!(piece_bytes(m, 256 * k, m), 512 * k);
        assert_eq!(piece_bytes(16 * m, 256 * k, m), m);
        // a floor above the ceiling is the ceiling: a fixed piece size
        assert_eq!(piece_bytes(16 * m, 4 * m, m), m);
        assert_eq!(piece_bytes(0, 0, 0), 1);
    }

    proptest! {
        #[test]
        fn piece_bytes_stays_in_bounds_and_cuts_at_most_in_two_below_the_ceiling(
            len in 0usize..1 << 30, min in 0usize..1 << 22, max in 0usize..1 << 22,
        ) {
            let p = piece_bytes(len, min, max);
            let (lo, hi) = (min.clamp(1, max.max(1)), max.max(1));
            prop_assert!(lo <= p && p <= hi, "piece {} outside {}..={}", p, lo, hi);
            if p < hi {
                prop_assert!(piece_count(len, p) <= 2, "{} pieces of {}", piece_count(len, p), p);
            }
            // fixed-size pieces when the bounds meet
            prop_assert_eq!(piece_bytes(len, max, max), max.max(1));
        }

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
