//! The `Communicator`: one rank of a world of N over a full mesh or a ring of links, and the
//! operations.
//!
//! Every operation is a blocking call. Messages are cut into pieces, and in each step where a rank
//! both sends and receives, one thread drives both directions at once with the links'
//! non-blocking calls (`try_send` / `try_recv`), as a progress engine does: every link carries
//! data both ways, and no cycle of ranks can wait on itself whatever the links buffer. Every
//! message has a deadline ([`CommConfig::timeout`] without progress); the first failure poisons
//! the communicator and closes all its links, so every other rank's pending call fails promptly
//! too, and later calls fail fast.
//!
//! Reduction order (so float sums are reproducible and identical on every rank):
//! - all-reduce of at most [`CommConfig::small_bytes`]: every rank folds all contributions in
//!   rank order, `((x₀ ⊕ x₁) ⊕ x₂) ⊕ …`;
//! - larger all-reduce and every reduce-scatter: the buffer is cut into `world` chunks
//!   ([`schedule::chunk`]) and chunk `k` is folded in ring order starting at rank `k + 1`:
//!   `((x₍ₖ₊₁₎ ⊕ x₍ₖ₊₂₎) ⊕ …) ⊕ xₖ`.

use std::time::{Duration, Instant};

use transport::{Deadline, Link, LinkReceiver, LinkSender, Message};

use crate::element::{Element, Reduce, ReduceOp, reduce_after, reduce_after_to, reduce_into};
use crate::error::{CollectiveError, Result};
use crate::schedule::{self, chunk, piece_at, piece_count, pieces};
use crate::stats::Stats;

/// Tunables of a communicator.
#[derive(Clone, Debug)]
pub struct CommConfig {
    /// How long any single message may take before the operation fails (a stalled or dead peer).
    pub timeout: Duration,
    /// The largest piece, in bytes: a message is cut into pieces that stream through a link
    /// one after another, so that the receiver works on one while the next arrives
    /// ([`schedule::piece_bytes`]): a message no larger than [`CommConfig::min_piece_bytes`]
    /// goes whole; one up to twice this goes in two pieces (halves, or the minimum and the rest
    /// when half would be shorter); a longer one in pieces of this size. Must be the same on
    /// every rank.
    pub piece_bytes: usize,
    /// The smallest piece a message is cut into, in bytes (a shorter message goes whole); equal
    /// to [`CommConfig::piece_bytes`] (or above it), every piece has that fixed size. Must be the
    /// same on every rank.
    pub min_piece_bytes: usize,
    /// All-reduce payloads up to this size use the latency-optimised algorithm.
    pub small_bytes: usize,
}

impl Default for CommConfig {
    fn default() -> Self {
        CommConfig {
            timeout: Duration::from_secs(5),
            // Measured with 2 ranks on TCP loopback (`sinew bench --piece`, interleaved): with
            // the out-of-place ring, 1 MiB pieces beat 256 KiB ones in 17 of 18 pairs of 4–64
            // MiB all-reduce and sendrecv runs (by 5–80%) on one machine; on another, 1 MiB
            // all-reduces (512 KiB per ring step) ran 1.4x faster in 256 KiB pieces than whole,
            // and 64 KiB pieces lost to whole 128 KiB messages by 20%.
            piece_bytes: 1 << 20,
            min_piece_bytes: 256 << 10,
            small_bytes: 64 << 10,
        }
    }
}

/// Which all-reduce algorithm a payload size gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllReduceAlgorithm {
    /// Everyone exchanges whole vectors and folds them in rank order: one round of messages.
    Direct,
    /// Ring reduce-scatter then ring all-gather, pipelined: bandwidth-optimal.
    Ring,
}

/// Message tags: the operation, so ranks running different operations are told apart.
mod tag {
    pub const SEND: u32 = 1;
    pub const BROADCAST: u32 = 2;
    pub const ALL_GATHER: u32 = 3;
    pub const REDUCE_SCATTER: u32 = 4;
    pub const ALL_REDUCE: u32 = 5;
    pub const ALL_TO_ALL: u32 = 6;
    pub const BARRIER: u32 = 7;
}

/// How the ranks are linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Every rank has a link to every other.
    FullMesh,
    /// Every rank has links to the ranks before and after it only.
    Ring,
}

/// One rank of a world of `world` ranks.
pub struct Communicator {
    rank: usize,
    world: usize,
    topology: Topology,
    /// `tx[p]` and `rx[p]` are the halves of the link to rank `p`; `None` for `rank` itself
    /// (and for every rank once poisoned).
    tx: Vec<Option<LinkSender>>,
    rx: Vec<Option<LinkReceiver>>,
    config: CommConfig,
    poisoned: Option<String>,
    stats: Stats,
    /// Reused receive space for reductions, as 8-byte words (aligned for every element type).
    scratch: Vec<u64>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

fn as_bytes<T: Element>(s: &[T]) -> &[u8] {
    bytemuck::cast_slice(s)
}

fn as_bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    bytemuck::cast_slice_mut(s)
}

impl Communicator {
    /// A communicator over established links: `links[p]` reaches rank `p`, `links[rank]` is
    /// `None`. With a link to every other rank it is a full mesh; with links only to the ranks
    /// before and after it (`rank ± 1` modulo the world), a ring, which runs every operation but
    /// all-to-all (ring algorithms at every size).
    ///
    /// # Errors
    /// [`CollectiveError::InvalidArgument`] when `rank` is not in the world, a link to itself is
    /// given, or the links form neither a mesh nor a ring.
    pub fn from_links(rank: usize, links: Vec<Option<Link>>, config: CommConfig) -> Result<Self> {
        let world = links.len();
        let invalid = |reason: String| CollectiveError::InvalidArgument {
            op: "from_links",
            reason,
        };
        if rank >= world {
            return Err(invalid(format!("rank {rank} in a world of {world}")));
        }
        if links[rank].is_some() {
            return Err(invalid(format!("rank {rank} was given a link to itself")));
        }
        let neighbours = [(rank + 1) % world, (rank + world - 1) % world];
        let topology = if links
            .iter()
            .enumerate()
            .all(|(p, l)| p == rank || l.is_some())
        {
            Topology::FullMesh
        } else if neighbours.iter().all(|&p| p == rank || links[p].is_some()) {
            Topology::Ring
        } else {
            return Err(invalid(format!(
                "rank {rank}: the links form neither a full mesh nor a ring (ranks {} and {} are needed)",
                neighbours[1], neighbours[0]
            )));
        };
        let (tx, rx) = links
            .into_iter()
            .map(|l| match l.map(Link::split) {
                Some((t, r)) => (Some(t), Some(r)),
                None => (None, None),
            })
            .unzip();
        Ok(Communicator {
            rank,
            world,
            topology,
            tx,
            rx,
            config,
            poisoned: None,
            stats: Stats::default(),
            scratch: Vec::new(),
        })
    }

    /// How the ranks are linked.
    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The configuration.
    pub fn config(&self) -> &CommConfig {
        &self.config
    }

    /// Latency of every operation so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Latency statistics, mutable (to clear after a warm-up).
    pub fn stats_mut(&mut self) -> &mut Stats {
        &mut self.stats
    }

    /// Why the communicator is poisoned, if it is.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// The algorithm an all-reduce of `bytes` uses.
    pub fn all_reduce_algorithm(&self, bytes: usize) -> AllReduceAlgorithm {
        if self.world <= 1
            || (bytes <= self.config.small_bytes && self.topology == Topology::FullMesh)
        {
            AllReduceAlgorithm::Direct
        } else {
            AllReduceAlgorithm::Ring
        }
    }

    fn check(&self) -> Result<()> {
        match &self.poisoned {
            Some(cause) => Err(CollectiveError::Poisoned {
                rank: self.rank,
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Poisons the communicator and closes every link, so the other ranks' pending operations
    /// fail now rather than at their deadline.
    fn poison(&mut self, e: CollectiveError) -> CollectiveError {
        if self.poisoned.is_none() {
            tracing::warn!(rank = self.rank, error = %e, "collective failed; closing all links");
            self.poisoned = Some(e.to_string());
            self.tx.iter_mut().for_each(|t| *t = None);
            self.rx.iter_mut().for_each(|r| *r = None);
        }
        e
    }

    /// Runs `body` as operation `op` of `bytes`: checks the poison, records the latency, poisons
    /// on a failure of the links (not on invalid arguments).
    fn run<R>(
        &mut self,
        op: &'static str,
        bytes: usize,
        body: impl FnOnce(&mut Self) -> Result<R>,
    ) -> Result<R> {
        self.check()?;
        let start = Instant::now();
        match body(self) {
            Ok(r) => {
                self.stats.record(op, bytes, start.elapsed());
                Ok(r)
            }
            Err(e @ CollectiveError::InvalidArgument { .. }) => Err(e),
            Err(e) => Err(self.poison(e)),
        }
    }

    fn ctx(&self, op: &'static str, tag: u32, peer: usize) -> Ctx {
        Ctx {
            op,
            tag,
            rank: self.rank,
            peer,
            timeout: self.config.timeout,
        }
    }

    fn no_link(&self, op: &'static str, peer: usize) -> CollectiveError {
        CollectiveError::InvalidArgument {
            op,
            reason: format!("rank {} has no link to rank {peer}", self.rank),
        }
    }

    fn send_piece(&mut self, op: &'static str, tag: u32, peer: usize, bytes: &[u8]) -> Result<()> {
        let ctx = self.ctx(op, tag, peer);
        match self.tx.get_mut(peer) {
            Some(Some(tx)) => ctx.send(tx, bytes),
            _ => Err(self.no_link(op, peer)),
        }
    }

    fn recv_piece(
        &mut self,
        op: &'static str,
        tag: u32,
        peer: usize,
        buf: &mut [u8],
    ) -> Result<()> {
        let ctx = self.ctx(op, tag, peer);
        match self.rx.get_mut(peer) {
            Some(Some(rx)) => ctx.recv(rx, buf),
            _ => Err(self.no_link(op, peer)),
        }
    }

    /// The sending half to `to` and the receiving half from `from`, borrowed together.
    fn halves(
        &mut self,
        op: &'static str,
        to: usize,
        from: usize,
    ) -> Result<(&mut LinkSender, &mut LinkReceiver)> {
        if !matches!(self.tx.get(to), Some(Some(_))) {
            return Err(self.no_link(op, to));
        }
        if !matches!(self.rx.get(from), Some(Some(_))) {
            return Err(self.no_link(op, from));
        }
        match (self.tx[to].as_mut(), self.rx[from].as_mut()) {
            (Some(t), Some(r)) => Ok((t, r)),
            _ => Err(CollectiveError::InvalidArgument {
                op,
                reason: "link halves vanished".into(),
            }),
        }
    }

    /// Sends `send` to `to` while receiving `recv` from `from`, both at once, piece by piece.
    fn exchange(
        &mut self,
        op: &'static str,
        tag: u32,
        to: usize,
        send: &[u8],
        from: usize,
        recv: &mut [u8],
    ) -> Result<()> {
        let (send_len, recv_len) = (send.len(), recv.len());
        let (send_piece, recv_piece) = (self.piece(send_len), self.piece(recv_len));
        let n_send = piece_count(send_len, send_piece);
        let n_recv = piece_count(recv_len, recv_piece);
        let (sctx, rctx) = (self.ctx(op, tag, to), self.ctx(op, tag, from));
        let mut idle = Idle::new(self.config.timeout);
        let (tx, rx) = self.halves(op, to, from)?;
        pump(
            (tx, &sctx, n_send, |i| {
                &send[piece_at(send_len, send_piece, i)]
            }),
            (rx, &rctx, n_recv, |rx: &mut LinkReceiver, i| {
                rctx.try_recv(rx, &mut recv[piece_at(recv_len, recv_piece, i)])
            }),
            &mut idle,
        )
    }

    /// The piece size, in bytes, of a message of `len` bytes ([`schedule::piece_bytes`]).
    fn piece(&self, len: usize) -> usize {
        schedule::piece_bytes(len, self.config.min_piece_bytes, self.config.piece_bytes)
    }

    /// The piece size, in elements, of a message of `len` elements of `T`.
    fn piece_elements<T>(&self, len: usize) -> usize {
        let size = std::mem::size_of::<T>();
        (self.piece(len * size) / size).max(1)
    }

    fn check_peer(&self, op: &'static str, peer: usize) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(CollectiveError::InvalidArgument {
                op,
                reason: format!(
                    "peer {peer} is not another rank of a world of {}",
                    self.world
                ),
            });
        }
        Ok(())
    }

    /// Sends `data` to rank `peer`, cut into pieces that stream through the link.
    ///
    /// # Errors
    /// [`CollectiveError::Link`] when the peer is dead or stalled; the communicator is then
    /// poisoned.
    pub fn send<T: Element>(&mut self, peer: usize, data: &[T]) -> Result<()> {
        self.check_peer("send", peer)?;
        let bytes = as_bytes(data);
        let piece = self.piece(bytes.len());
        self.run("send", bytes.len(), |c| {
            for r in pieces(0..bytes.len(), piece) {
                c.send_piece("send", tag::SEND, peer, &bytes[r])?;
            }
            Ok(())
        })
    }

    /// Receives exactly `buf.len()` elements from rank `peer`.
    ///
    /// # Errors
    /// [`CollectiveError::Mismatch`] when the peer sent another length; link failures as
    /// [`Communicator::send`].
    pub fn recv<T: Element>(&mut self, peer: usize, buf: &mut [T]) -> Result<()> {
        self.check_peer("recv", peer)?;
        let bytes = as_bytes_mut(buf);
        let len = bytes.len();
        let piece = self.piece(len);
        self.run("recv", len, |c| {
            for r in pieces(0..len, piece) {
                c.recv_piece("recv", tag::SEND, peer, &mut bytes[r])?;
            }
            Ok(())
        })
    }

    /// Sends `send` to rank `to` while receiving `recv` from rank `from` (a ring shift or a halo
    /// exchange), pipelined and deadlock-free when every rank shifts by the same amount.
    ///
    /// # Errors
    /// As [`Communicator::send`] and [`Communicator::recv`].
    pub fn sendrecv<T: Element>(
        &mut self,
        to: usize,
        send: &[T],
        from: usize,
        recv: &mut [T],
    ) -> Result<()> {
        self.check_peer("sendrecv", to)?;
        self.check_peer("sendrecv", from)?;
        let bytes = std::mem::size_of_val(send);
        self.run("sendrecv", bytes, |c| {
            c.exchange(
                "sendrecv",
                tag::SEND,
                to,
                as_bytes(send),
                from,
                as_bytes_mut(recv),
            )
        })
    }

    /// Copies `buf` of rank `root` to every rank's `buf` (all `buf`s the same length). Small
    /// buffers go straight from the root to each rank; large ones are pipelined along a chain
    /// starting at the root.
    ///
    /// # Errors
    /// As [`Communicator::send`].
    pub fn broadcast<T: Element>(&mut self, root: usize, buf: &mut [T]) -> Result<()> {
        if root >= self.world {
            return Err(CollectiveError::InvalidArgument {
                op: "broadcast",
                reason: format!("root {root} in a world of {}", self.world),
            });
        }
        let bytes = as_bytes_mut(buf);
        let len = bytes.len();
        let piece = self.piece(len);
        self.run("broadcast", len, |c| {
            let (rank, world) = (c.rank, c.world);
            if world == 1 {
                return Ok(());
            }
            if len <= c.config.small_bytes && c.topology == Topology::FullMesh {
                if rank == root {
                    for p in (0..world).filter(|&p| p != root) {
                        c.send_piece("broadcast", tag::BROADCAST, p, bytes)?;
                    }
                } else {
                    c.recv_piece("broadcast", tag::BROADCAST, root, bytes)?;
                }
                return Ok(());
            }
            let position = (rank + world - root) % world;
            let prev = (rank + world - 1) % world;
            let next = (rank + 1) % world;
            for r in pieces(0..len, piece) {
                if position > 0 {
                    c.recv_piece("broadcast", tag::BROADCAST, prev, &mut bytes[r.clone()])?;
                }
                if position + 1 < world {
                    c.send_piece("broadcast", tag::BROADCAST, next, &bytes[r])?;
                }
            }
            Ok(())
        })
    }

    /// Ring all-gather in place: `buf` holds `world` equal chunks, this rank's at position
    /// `rank`; afterwards every chunk holds its rank's data.
    ///
    /// # Errors
    /// [`CollectiveError::InvalidArgument`] when `buf.len()` is not a multiple of `world`; link
    /// failures as [`Communicator::send`].
    pub fn all_gather_in_place<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        if !buf.len().is_multiple_of(self.world) {
            return Err(CollectiveError::InvalidArgument {
                op: "all_gather",
                reason: format!(
                    "{} elements do not split into {} equal chunks",
                    buf.len(),
                    self.world
                ),
            });
        }
        let per = buf.len() / self.world;
        let bytes = as_bytes_mut(buf);
        let per_bytes = per * std::mem::size_of::<T>();
        self.run("all_gather", per_bytes, |c| {
            c.ring_all_gather(bytes, per_bytes, "all_gather", tag::ALL_GATHER)
        })
    }

    /// All-gather: every rank contributes `input` (the same length everywhere); `output`
    /// (`world × input.len()`) receives rank `p`'s input at position `p`.
    ///
    /// # Errors
    /// As [`Communicator::all_gather_in_place`].
    pub fn all_gather<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        if output.len() != input.len() * self.world {
            return Err(CollectiveError::InvalidArgument {
                op: "all_gather",
                reason: format!(
                    "output of {} elements for {} ranks of {}",
                    output.len(),
                    self.world,
                    input.len()
                ),
            });
        }
        let n = input.len();
        output[self.rank * n..(self.rank + 1) * n].copy_from_slice(input);
        self.all_gather_in_place(output)
    }

    /// Ring all-gather over `bytes` cut in `world` chunks of `per` bytes.
    fn ring_all_gather(
        &mut self,
        bytes: &mut [u8],
        per: usize,
        op: &'static str,
        tag: u32,
    ) -> Result<()> {
        let (rank, world) = (self.rank, self.world);
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        for step in 0..world.saturating_sub(1) {
            let (s, r) = schedule::all_gather_step(rank, world, step);
            let (send, recv) = split_pair(bytes, s * per..(s + 1) * per, r * per..(r + 1) * per);
            self.exchange(op, tag, next, send, prev, recv)?;
        }
        Ok(())
    }

    /// Ring reduce-scatter over `buf` cut by [`schedule::chunk`]: afterwards chunk `rank` of
    /// `buf` holds the reduction (other chunks hold partial results). With `src`, this rank's
    /// contribution is read from `src` (as long as `buf`) and `buf`'s prior contents are
    /// ignored: each step reduces what arrives with `src`'s chunk into `buf`, and only the
    /// first step sends from `src` (later ones forward the chunk reduced the step before), so an
    /// out-of-place operation needs no copy of its input. The result is bitwise the in-place one.
    fn ring_reduce_scatter<T: Reduce>(
        &mut self,
        src: Option<&[T]>,
        buf: &mut [T],
        op: ReduceOp,
        name: &'static str,
        tag: u32,
    ) -> Result<()> {
        debug_assert!(src.is_none_or(|s| s.len() == buf.len()));
        if let (Some(src), 1) = (src, self.world) {
            buf.copy_from_slice(src);
            return Ok(());
        }
        let (rank, world) = (self.rank, self.world);
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let len = buf.len();
        let mut scratch = std::mem::take(&mut self.scratch);
        let (sctx, rctx) = (self.ctx(name, tag, next), self.ctx(name, tag, prev));
        let mut idle = Idle::new(self.config.timeout);
        let result = (|| {
            for step in 0..world.saturating_sub(1) {
                let (s, r) = schedule::reduce_scatter_step(rank, world, step);
                let (send, recv) = split_pair(buf, chunk(len, world, s), chunk(len, world, r));
                // this rank's own contribution to the received chunk, when not in `recv` itself
                let mine = src.map(|src| &src[chunk(len, world, r)]);
                let send = match src {
                    Some(src) if step == 0 => &src[chunk(len, world, s)],
                    _ => send,
                };
                // each direction cut by its own length, as the rank at its other end cuts it
                let send_piece = self.piece_elements::<T>(send.len());
                let recv_piece = self.piece_elements::<T>(recv.len());
                let words = (recv_piece * std::mem::size_of::<T>()).div_ceil(8);
                if scratch.len() < words {
                    scratch.resize(words, 0);
                }
                let (n_send, n_recv) = (
                    piece_count(send.len(), send_piece),
                    piece_count(recv.len(), recv_piece),
                );
                let (tx, rx) = self.halves(name, next, prev)?;
                pump(
                    (tx, &sctx, n_send, |i| {
                        as_bytes(&send[piece_at(send.len(), send_piece, i)])
                    }),
                    (rx, &rctx, n_recv, |rx: &mut LinkReceiver, i| {
                        let p = piece_at(recv.len(), recv_piece, i);
                        let tmp: &mut [T] =
                            &mut bytemuck::cast_slice_mut::<u64, T>(&mut scratch)[..p.len()];
                        let done = rctx.try_recv(rx, as_bytes_mut(tmp))?;
                        if done {
                            // The received partial result comes earlier in the fold.
                            match mine {
                                Some(mine) => {
                                    reduce_after_to(op, tmp, &mine[p.clone()], &mut recv[p])
                                }
                                None => reduce_after(op, tmp, &mut recv[p]),
                            }
                        }
                        Ok(done)
                    }),
                    &mut idle,
                )?;
            }
            Ok(())
        })();
        self.scratch = scratch;
        result
    }

    /// Reduce-scatter: `input` (the same length on every rank) is reduced element-wise across
    /// ranks, and this rank receives chunk `rank` of the result ([`schedule::chunk`] of
    /// `input.len()` into `world` parts) in `output`.
    ///
    /// # Errors
    /// [`CollectiveError::InvalidArgument`] when `output` is not that chunk's length; link
    /// failures as [`Communicator::send`].
    pub fn reduce_scatter<T: Reduce>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let mine = chunk(input.len(), self.world, self.rank);
        if output.len() != mine.len() {
            return Err(CollectiveError::InvalidArgument {
                op: "reduce_scatter",
                reason: format!("output of {} elements for chunk {:?}", output.len(), mine),
            });
        }
        // the ring passes partial results through every chunk: a working buffer, filled by the
        // reduction itself (no copy of `input`)
        let mut work = vec![T::zeroed(); input.len()];
        let bytes = std::mem::size_of_val(input);
        self.run("reduce_scatter", bytes, |c| {
            c.ring_reduce_scatter(
                Some(input),
                &mut work,
                op,
                "reduce_scatter",
                tag::REDUCE_SCATTER,
            )
        })?;
        output.copy_from_slice(&work[mine]);
        Ok(())
    }

    /// Reduce-scatter in place: afterwards chunk `rank` of `buf` holds the reduction; the other
    /// chunks hold partial results.
    ///
    /// # Errors
    /// Link failures as [`Communicator::send`].
    pub fn reduce_scatter_in_place<T: Reduce>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let bytes = std::mem::size_of_val(buf);
        self.run("reduce_scatter", bytes, |c| {
            c.ring_reduce_scatter(None, buf, op, "reduce_scatter", tag::REDUCE_SCATTER)
        })
    }

    /// All-reduce in place: every rank's `buf` becomes the element-wise reduction of all ranks'
    /// `buf`s, bitwise identical on every rank (see the module docs for the order).
    ///
    /// # Errors
    /// Link failures as [`Communicator::send`]; a length that differs between ranks is a
    /// [`CollectiveError::Mismatch`].
    pub fn all_reduce<T: Reduce>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let bytes = std::mem::size_of_val(buf);
        let algorithm = self.all_reduce_algorithm(bytes);
        self.run("all_reduce", bytes, |c| match algorithm {
            AllReduceAlgorithm::Direct => c.all_reduce_direct(buf, op),
            AllReduceAlgorithm::Ring => {
                c.ring_reduce_scatter(None, buf, op, "all_reduce", tag::ALL_REDUCE)?;
                c.ring_all_gather_uneven(buf)
            }
        })
    }

    /// All-reduce out of place: `output` receives the reduction of every rank's `input`,
    /// bitwise what [`Communicator::all_reduce`] gives. The ring reads `input` where it is (no
    /// copy into `output` first); the small-message algorithm copies.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`]; `output` must be as long as `input`.
    pub fn all_reduce_into<T: Reduce>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        if output.len() != input.len() {
            return Err(CollectiveError::InvalidArgument {
                op: "all_reduce",
                reason: format!(
                    "output of {} elements for an input of {}",
                    output.len(),
                    input.len()
                ),
            });
        }
        let bytes = std::mem::size_of_val(input);
        match self.all_reduce_algorithm(bytes) {
            AllReduceAlgorithm::Direct => {
                output.copy_from_slice(input);
                self.all_reduce(output, op)
            }
            AllReduceAlgorithm::Ring => self.run("all_reduce", bytes, |c| {
                c.ring_reduce_scatter(Some(input), output, op, "all_reduce", tag::ALL_REDUCE)?;
                c.ring_all_gather_uneven(output)
            }),
        }
    }

    /// The all-gather half of a ring all-reduce, over chunks of unequal length.
    fn ring_all_gather_uneven<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        let (rank, world) = (self.rank, self.world);
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let len = buf.len();
        for step in 0..world.saturating_sub(1) {
            let (s, r) = schedule::all_gather_step(rank, world, step);
            let (send, recv) = split_pair(buf, chunk(len, world, s), chunk(len, world, r));
            self.exchange(
                "all_reduce",
                tag::ALL_REDUCE,
                next,
                as_bytes(send),
                prev,
                as_bytes_mut(recv),
            )?;
        }
        Ok(())
    }

    /// Small all-reduce: exchange whole vectors with every rank, fold in rank order.
    fn all_reduce_direct<T: Reduce>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let (rank, world) = (self.rank, self.world);
        if world == 1 {
            return Ok(());
        }
        let n = buf.len();
        let mut all: Vec<T> = vec![T::zeroed(); n * world];
        all[rank * n..(rank + 1) * n].copy_from_slice(buf);
        for shift in 1..world {
            let to = (rank + shift) % world;
            let from = (rank + world - shift) % world;
            let (mine, theirs) =
                split_pair(&mut all, rank * n..(rank + 1) * n, from * n..(from + 1) * n);
            self.exchange(
                "all_reduce",
                tag::ALL_REDUCE,
                to,
                as_bytes(mine),
                from,
                as_bytes_mut(theirs),
            )?;
        }
        buf.copy_from_slice(&all[..n]);
        for p in 1..world {
            reduce_into(op, buf, &all[p * n..(p + 1) * n]);
        }
        Ok(())
    }

    /// All-to-all with per-rank counts: `send[send_displ(p)..][..send_counts[p]]` goes to rank
    /// `p`, and what rank `p` sends here lands in `recv` at the prefix sum of `recv_counts`.
    ///
    /// # Errors
    /// [`CollectiveError::InvalidArgument`] when the counts do not match the buffers;
    /// [`CollectiveError::Mismatch`] when a peer sends a count other than `recv_counts[p]`; link
    /// failures as [`Communicator::send`].
    pub fn all_to_all<T: Element>(
        &mut self,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        if self.topology != Topology::FullMesh && self.world > 2 {
            return Err(CollectiveError::InvalidArgument {
                op: "all_to_all",
                reason: "all-to-all needs a link between every pair of ranks (a full mesh)".into(),
            });
        }
        let world = self.world;
        let invalid = |reason: String| CollectiveError::InvalidArgument {
            op: "all_to_all",
            reason,
        };
        if send_counts.len() != world || recv_counts.len() != world {
            return Err(invalid(format!(
                "{} send and {} receive counts for {world} ranks",
                send_counts.len(),
                recv_counts.len()
            )));
        }
        if send_counts.iter().sum::<usize>() != send.len()
            || recv_counts.iter().sum::<usize>() != recv.len()
        {
            return Err(invalid("counts do not add up to the buffer lengths".into()));
        }
        let displ = |counts: &[usize]| -> Vec<usize> {
            counts
                .iter()
                .scan(0, |acc, &c| {
                    let at = *acc;
                    *acc += c;
                    Some(at)
                })
                .collect()
        };
        let (sd, rd) = (displ(send_counts), displ(recv_counts));
        let bytes = std::mem::size_of_val(send);
        self.run("all_to_all", bytes, |c| {
            let rank = c.rank;
            if send_counts[rank] != recv_counts[rank] {
                return Err(CollectiveError::InvalidArgument {
                    op: "all_to_all",
                    reason: format!(
                        "rank {rank} sends itself {} but expects {}",
                        send_counts[rank], recv_counts[rank]
                    ),
                });
            }
            recv[rd[rank]..rd[rank] + recv_counts[rank]]
                .copy_from_slice(&send[sd[rank]..sd[rank] + send_counts[rank]]);
            for shift in 1..world {
                let to = (rank + shift) % world;
                let from = (rank + world - shift) % world;
                let out = &send[sd[to]..sd[to] + send_counts[to]];
                let inn = &mut recv[rd[from]..rd[from] + recv_counts[from]];
                c.exchange(
                    "all_to_all",
                    tag::ALL_TO_ALL,
                    to,
                    as_bytes(out),
                    from,
                    as_bytes_mut(inn),
                )?;
            }
            Ok(())
        })
    }

    /// Returns once every rank has entered the barrier.
    ///
    /// # Errors
    /// Link failures as [`Communicator::send`].
    pub fn barrier(&mut self) -> Result<()> {
        self.run("barrier", 0, |c| {
            let (rank, world) = (c.rank, c.world);
            // On a mesh, one message from every rank; on a ring, world − 1 hops around it (a
            // rank passes hop k only once the rank k before it has entered).
            let shifts: Vec<usize> = match c.topology {
                Topology::FullMesh => (1..world).collect(),
                Topology::Ring => vec![1; world.saturating_sub(1)],
            };
            for shift in shifts {
                let to = (rank + shift) % world;
                let from = (rank + world - shift) % world;
                c.exchange("barrier", tag::BARRIER, to, &[], from, &mut [])?;
            }
            Ok(())
        })
    }
}

/// What a single message belongs to: for its deadline and its errors.
struct Ctx {
    op: &'static str,
    tag: u32,
    rank: usize,
    peer: usize,
    timeout: Duration,
}

impl Ctx {
    fn link_error(&self, error: transport::Error) -> CollectiveError {
        CollectiveError::Link {
            op: self.op,
            rank: self.rank,
            peer: self.peer,
            error,
        }
    }

    fn mismatch(&self, detail: String) -> CollectiveError {
        CollectiveError::Mismatch {
            op: self.op,
            rank: self.rank,
            peer: self.peer,
            detail,
        }
    }

    /// Progresses one piece without waiting; `Ok(true)` once it is handed over.
    fn try_send(&self, tx: &mut LinkSender, bytes: &[u8]) -> Result<bool> {
        tx.try_send(self.tag, bytes).map_err(|e| self.link_error(e))
    }

    /// What a receive of `expected` bytes means for this operation: the message must carry this
    /// operation's tag and exactly that length.
    fn check(&self, got: transport::Result<Message>, expected: usize) -> Result<()> {
        match got {
            Ok(m) if m.tag != self.tag => Err(self.mismatch(format!(
                "sent a message of operation #{} during operation #{}",
                m.tag, self.tag
            ))),
            Ok(m) if m.len != expected => Err(self.mismatch(format!(
                "sent {} bytes where {expected} were expected",
                m.len
            ))),
            Ok(_) => Ok(()),
            Err(transport::Error::BufferTooSmall { needed, .. }) => Err(self.mismatch(format!(
                "sent {needed} bytes where {expected} were expected"
            ))),
            Err(e) => Err(self.link_error(e)),
        }
    }

    /// Progresses one piece without waiting; `Ok(true)` once `buf` is filled by a message of
    /// this operation and exactly its length.
    fn try_recv(&self, rx: &mut LinkReceiver, buf: &mut [u8]) -> Result<bool> {
        let expected = buf.len();
        match rx.try_recv(buf) {
            Ok(None) => Ok(false),
            Ok(Some(m)) => self.check(Ok(m), expected).map(|()| true),
            Err(e) => self.check(Err(e), expected).map(|()| false),
        }
    }

    fn send(&self, tx: &mut LinkSender, bytes: &[u8]) -> Result<()> {
        tx.send_until(self.tag, bytes, Deadline::after(self.timeout))
            .map_err(|e| self.link_error(e))
    }

    fn recv(&self, rx: &mut LinkReceiver, buf: &mut [u8]) -> Result<()> {
        let expected = buf.len();
        self.check(rx.recv_until(buf, Deadline::after(self.timeout)), expected)
    }
}

/// Drives one step's two directions at once until every piece has moved: the sending side is
/// the link half, its context, the number of pieces and piece `i`'s bytes; the receiving side
/// is the link half, its context, the number of pieces and a call that progresses receive `i`
/// without waiting (`Ok(true)` once it is complete).
fn pump<'a>(
    send: (&mut LinkSender, &Ctx, usize, impl Fn(usize) -> &'a [u8]),
    recv: (
        &mut LinkReceiver,
        &Ctx,
        usize,
        impl FnMut(&mut LinkReceiver, usize) -> Result<bool>,
    ),
    idle: &mut Idle,
) -> Result<()> {
    let (tx, sctx, n_send, piece) = send;
    let (rx, rctx, n_recv, mut receive) = recv;
    let (mut si, mut ri) = (0, 0);
    while si < n_send || ri < n_recv {
        let mut moved = false;
        if si < n_send && sctx.try_send(tx, piece(si))? {
            si += 1;
            moved = true;
        }
        if ri < n_recv && receive(rx, ri)? {
            ri += 1;
            moved = true;
        }
        if moved {
            idle.progressed();
        } else {
            idle.wait(if si < n_send { sctx } else { rctx })?;
        }
    }
    Ok(())
}

/// How long a progress loop has gone without completing a piece; past the timeout, the peer it
/// waits for is taken as dead or stalled.
struct Idle {
    last: Instant,
    spins: u32,
    timeout: Duration,
}

/// Spinning this long without progress starts yielding the core.
const YIELD_AFTER: Duration = Duration::from_micros(50);

impl Idle {
    fn new(timeout: Duration) -> Self {
        Idle {
            last: Instant::now(),
            spins: 0,
            timeout,
        }
    }

    fn progressed(&mut self) {
        self.last = Instant::now();
        self.spins = 0;
    }

    fn wait(&mut self, waiting_on: &Ctx) -> Result<()> {
        self.spins = self.spins.wrapping_add(1);
        if self.spins.is_multiple_of(64) {
            let waited = self.last.elapsed();
            if waited > self.timeout {
                return Err(waiting_on.link_error(transport::Error::Timeout {
                    op: waiting_on.op,
                    waited,
                    peer: format!("rank {}", waiting_on.peer),
                }));
            }
            if waited > YIELD_AFTER {
                std::thread::yield_now();
            }
        }
        std::hint::spin_loop();
        Ok(())
    }
}

/// Two disjoint ranges of one slice, the first shared, the second mutable.
fn split_pair<T>(
    buf: &mut [T],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&[T], &mut [T]) {
    if b.is_empty() {
        return (&buf[a], &mut []);
    }
    if a.is_empty() {
        return (&[], &mut buf[b]);
    }
    if a.end <= b.start {
        let (left, right) = buf.split_at_mut(b.start);
        (&left[a], &mut right[..b.len()])
    } else {
        debug_assert!(b.end <= a.start, "ranges overlap");
        let (left, right) = buf.split_at_mut(a.start);
        (&right[..a.len()], &mut left[b])
    }
}
