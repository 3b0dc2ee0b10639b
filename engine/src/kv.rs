//! Per-sequence KV caches drawn from a byte budget fixed at start.
//!
//! A [`KvPool`] belongs to one loaded model (or pipeline stage): it knows the stage's layers and
//! the bytes one position costs there, and hands out [`KvCache`]s, one per sequence. A cache
//! reserves its positions from the pool when it is made (and more as it grows, if there is room);
//! dropping it returns them at once. The weights know nothing of sequences, so one model serves
//! any number of them.
//!
//! Why a reserved handle per sequence rather than a paged pool with block tables: on a CPU the
//! operating system already pages lazily — a reservation is a `Vec` capacity whose pages become
//! resident only as positions are written — so a sequence's keys and values stay one contiguous
//! run per layer, which attention streams without a block-table indirection, and no copy happens
//! while a sequence stays within its reservation. What paging buys on a GPU (no fragmentation of
//! a preallocated arena) the allocator and the kernel give here for free; what the budget must
//! give — a hard cap, a capacity in tokens, memory back the moment a sequence ends — the pool's
//! accounting does.
//!
//! Errors a scheduler tells apart: [`Error::ContextLength`] (can never fit: refuse the request)
//! and [`Error::NoRoom`] (does not fit now: wait for a sequence to finish).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// The share of the memory available after the weights that the KV budget takes by default.
pub const DEFAULT_KV_SHARE: f64 = 0.5;

/// The shape of the cache one stage keeps per position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// The stage's layers.
    pub layers: Range<usize>,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

impl KvShape {
    /// f32 values of one position's keys (or values) in one layer.
    pub fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes one position costs in this stage: keys and values, f32, every layer.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.row() * std::mem::size_of::<f32>()
    }
}

struct PoolInner {
    shape: KvShape,
    ctx: usize,
    capacity: usize,
    used: AtomicUsize,
}

impl PoolInner {
    /// Takes `n` positions from the budget, or says how many are free.
    fn take(&self, n: usize) -> std::result::Result<(), usize> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.capacity).then_some(u + n)
            })
            .map(|_| ())
            .map_err(|u| self.capacity - u)
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The KV budget of one model or stage: a capacity in positions, shared by every sequence.
/// Cheap to clone (the clones share the budget).
#[derive(Clone)]
pub struct KvPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("shape", &self.inner.shape)
            .field("ctx", &self.inner.ctx)
            .field("capacity_tokens", &self.inner.capacity)
            .field("used_tokens", &self.used_tokens())
            .finish()
    }
}

impl KvPool {
    /// A pool of `budget_bytes` for caches of `shape`, sequences at most `ctx` positions long.
    ///
    /// # Errors
    /// [`Error::Request`] when the budget does not hold even one position or `ctx` is 0.
    pub fn new(shape: KvShape, budget_bytes: usize, ctx: usize) -> Result<Self> {
        if ctx == 0 {
            return Err(Error::Request(
                "the context length must be at least 1".into(),
            ));
        }
        let per = shape.bytes_per_token().max(1);
        let capacity = budget_bytes / per;
        if capacity == 0 {
            return Err(Error::Request(format!(
                "a KV budget of {budget_bytes} bytes holds no position ({per} bytes each)"
            )));
        }
        Ok(KvPool {
            inner: Arc::new(PoolInner {
                shape,
                ctx,
                capacity,
                used: AtomicUsize::new(0),
            }),
        })
    }

    /// The cache shape of the stage this pool serves.
    pub fn shape(&self) -> &KvShape {
        &self.inner.shape
    }

    /// The longest sequence, in positions.
    pub fn ctx(&self) -> usize {
        self.inner.ctx
    }

    /// Positions the budget holds, across all sequences.
    pub fn capacity_tokens(&self) -> usize {
        self.inner.capacity
    }

    /// Positions reserved by live sequences.
    pub fn used_tokens(&self) -> usize {
        self.inner.used.load(Ordering::Acquire)
    }

    /// Positions not reserved.
    pub fn free_tokens(&self) -> usize {
        self.capacity_tokens().saturating_sub(self.used_tokens())
    }

    /// Whether a sequence of `tokens` positions can ever fit (context and whole budget).
    ///
    /// # Errors
    /// [`Error::ContextLength`] when `tokens` exceeds the context or the whole budget.
    pub fn check_fits(&self, tokens: usize) -> Result<()> {
        let limit = self.inner.ctx.min(self.inner.capacity);
        if tokens > limit {
            return Err(Error::ContextLength {
                ctx: limit,
                requested: tokens,
            });
        }
        Ok(())
    }

    /// A new, empty sequence with `tokens` positions reserved (0 reserves nothing: the cache
    /// then takes positions as it grows).
    ///
    /// # Errors
    /// [`Error::ContextLength`] when `tokens` can never fit; [`Error::NoRoom`] when it does not
    /// fit until other sequences end.
    pub fn sequence(&self, tokens: usize) -> Result<KvCache> {
        self.check_fits(tokens)?;
        self.inner.take(tokens).map_err(|free| Error::NoRoom {
            needed: tokens,
            free,
        })?;
        let row = self.inner.shape.row();
        let layers = (0..self.inner.shape.layers.len())
            .map(|_| LayerKv {
                k: Vec::with_capacity(tokens * row),
                v: Vec::with_capacity(tokens * row),
            })
            .collect();
        Ok(KvCache {
            pool: self.inner.clone(),
            layers,
            len: 0,
            reserved: tokens,
        })
    }

    /// Whether `cache` was made by this pool.
    pub fn owns(&self, cache: &KvCache) -> bool {
        Arc::ptr_eq(&self.inner, &cache.pool)
    }
}

/// One layer's keys and values, each `[position][kv head][head_dim]` f32.
pub(crate) struct LayerKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

/// One sequence's keys and values in the layers of one stage. Dropping it returns its positions
/// to the pool.
pub struct KvCache {
    pool: Arc<PoolInner>,
    pub(crate) layers: Vec<LayerKv>,
    len: usize,
    reserved: usize,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl KvCache {
    /// Positions in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions reserved from the pool (at least [`KvCache::len`]).
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// The shape of the stage this cache belongs to.
    pub fn shape(&self) -> &KvShape {
        &self.pool.shape
    }

    /// Makes room for `n` more positions: within the context, taking positions from the pool
    /// past the reservation.
    ///
    /// # Errors
    /// [`Error::ContextLength`] past the context; [`Error::NoRoom`] when the pool is short.
    pub fn ensure(&mut self, n: usize) -> Result<()> {
        let want = self.len + n;
        if want > self.pool.ctx {
            return Err(Error::ContextLength {
                ctx: self.pool.ctx,
                requested: want,
            });
        }
        if want > self.reserved {
            let more = want - self.reserved;
            self.pool
                .take(more)
                .map_err(|free| Error::NoRoom { needed: more, free })?;
            self.reserved = want;
            let row = self.pool.shape.row();
            for l in &mut self.layers {
                l.k.reserve_exact(want * row - l.k.len());
                l.v.reserve_exact(want * row - l.v.len());
            }
        }
        Ok(())
    }

    /// Forgets positions from `len` on (keeps the reservation).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        self.rollback(len);
        self.len = len;
    }

    /// Cuts every layer back to `len` positions (after a failed step).
    pub(crate) fn rollback(&mut self, len: usize) {
        let row = self.pool.shape.row();
        for l in &mut self.layers {
            l.k.truncate(len * row);
            l.v.truncate(len * row);
        }
    }

    /// Records `n` positions appended to every layer.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.reserved);
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.pool.give_back(self.reserved);
    }
}

/// Bytes of memory the system reports available (`MemAvailable`), if it says.
pub fn available_memory() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape() -> KvShape {
        KvShape {
            layers: 2..4,
            kv_heads: 2,
            head_dim: 4,
        }
    }

    #[test]
    fn the_budget_is_counted_in_positions_and_returned_on_drop() {
        let per = shape().bytes_per_token();
        assert_eq!(per, 2 * 2 * 8 * 4);
        let pool = KvPool::new(shape(), 100 * per + per / 2, 64).unwrap();
        assert_eq!(pool.capacity_tokens(), 100);
        let a = pool.sequence(60).unwrap();
        assert_eq!(pool.used_tokens(), 60);
        match pool.sequence(50) {
            Err(Error::NoRoom { needed, free }) => assert_eq!((needed, free), (50, 40)),
            other => panic!("{other:?}"),
        }
        match pool.sequence(65) {
            Err(Error::ContextLength { ctx, requested }) => assert_eq!((ctx, requested), (64, 65)),
            other => panic!("{other:?}"),
        }
        drop(a);
        assert_eq!(pool.used_tokens(), 0);
        assert!(pool.sequence(50).is_ok());
        assert_eq!(pool.used_tokens(), 0, "the temporary was dropped");
    }

    #[test]
    fn a_cache_grows_past_its_reservation_while_there_is_room() {
        let per = shape().bytes_per_token();
        let pool = KvPool::new(shape(), 10 * per, 8).unwrap();
        let mut c = pool.sequence(2).unwrap();
        c.ensure(5).unwrap();
        assert_eq!(c.reserved(), 5);
        assert_eq!(pool.used_tokens(), 5);
        let other = pool.sequence(5).unwrap();
        c.commit(5);
        assert!(matches!(c.ensure(1), Err(Error::NoRoom { .. })));
        drop(other);
        c.ensure(3).unwrap();
        assert!(matches!(c.ensure(4), Err(Error::ContextLength { .. })));
        drop(c);
        assert_eq!(pool.used_tokens(), 0);
    }

    #[test]
    fn empty_budgets_and_contexts_are_refused() {
        assert!(KvPool::new(shape(), 10, 8).is_err());
        assert!(KvPool::new(shape(), 1 << 20, 0).is_err());
    }

    proptest! {
        /// Whatever sequences come and go, the pool's count is the sum of live reservations and
        /// never passes the capacity.
        #[test]
        fn used_is_the_sum_of_live_reservations(ops in prop::collection::vec((0usize..40, any::<bool>()), 1..60)) {
            let per = shape().bytes_per_token();
            let pool = KvPool::new(shape(), 100 * per, 50).unwrap();
            let mut live: Vec<KvCache> = Vec::new();
            for (n, drop_one) in ops {
                if drop_one && !live.is_empty() {
                    live.remove(n % live.len());
                } else if let Ok(c) = pool.sequence(n) {
                    live.push(c);
                }
                let sum: usize = live.iter().map(KvCache::reserved).sum();
                prop_assert_eq!(pool.used_tokens(), sum);
                prop_assert!(sum <= pool.capacity_tokens());
            }
            live.clear();
            prop_assert_eq!(pool.used_tokens(), 0);
        }
    }
}
