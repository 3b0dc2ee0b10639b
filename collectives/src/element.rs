//! Element types and reductions. Every element is plain old data (sent as bytes, no copy), and
//! every reduction is applied pairwise in an order the algorithms document, so results are
//! bitwise reproducible and identical on every rank.

use half::{bf16, f16};

/// A type that collectives can move: plain old data.
pub trait Element: bytemuck::Pod + Send + Sync + PartialEq + std::fmt::Debug {
    /// The name used in benchmarks and errors.
    const NAME: &'static str;
}

/// A type that collectives can also reduce.
pub trait Reduce: Element {
    /// `op(a, b)` for one pair of elements.
    fn apply(op: ReduceOp, a: Self, b: Self) -> Self;
}

/// A reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum (in the element type, rounding after each addition).
    Sum,
    /// Maximum (NaN-propagating like IEEE `maximum`: a NaN in either input gives NaN).
    Max,
    /// Minimum (NaN-propagating).
    Min,
}

impl std::str::FromStr for ReduceOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sum" => Ok(ReduceOp::Sum),
            "max" => Ok(ReduceOp::Max),
            "min" => Ok(ReduceOp::Min),
            other => Err(format!(
                "unknown reduction {other:?}: expected sum, max or min"
            )),
        }
    }
}

#[inline(always)]
fn max_f32(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

#[inline(always)]
fn min_f32(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.min(b)
    }
}

impl Element for u8 {
    const NAME: &'static str = "bytes";
}

impl Element for f32 {
    const NAME: &'static str = "f32";
}

impl Reduce for f32 {
    #[inline(always)]
    fn apply(op: ReduceOp, a: f32, b: f32) -> f32 {
        match op {
            ReduceOp::Sum => a + b,
            ReduceOp::Max => max_f32(a, b),
            ReduceOp::Min => min_f32(a, b),
        }
    }
}

impl Element for f16 {
    const NAME: &'static str = "f16";
}

impl Reduce for f16 {
    #[inline(always)]
    fn apply(op: ReduceOp, a: f16, b: f16) -> f16 {
        f16::from_f32(f32::apply(op, a.to_f32(), b.to_f32()))
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
}

impl Reduce for bf16 {
    #[inline(always)]
    fn apply(op: ReduceOp, a: bf16, b: bf16) -> bf16 {
        bf16::from_f32(f32::apply(op, a.to_f32(), b.to_f32()))
    }
}

/// Applies `f` element-wise; `op` is matched once outside the loop so each loop is a plain,
/// vectorisable kernel.
#[inline(always)]
fn zip_with<T: Reduce>(acc: &mut [T], other: &[T], op: ReduceOp, other_first: bool) {
    macro_rules! kernel {
        ($op:expr) => {
            if other_first {
                for (a, b) in acc.iter_mut().zip(other) {
                    *a = T::apply($op, *b, *a);
                }
            } else {
                for (a, b) in acc.iter_mut().zip(other) {
                    *a = T::apply($op, *a, *b);
                }
            }
        };
    }
    match op {
        ReduceOp::Sum => kernel!(ReduceOp::Sum),
        ReduceOp::Max => kernel!(ReduceOp::Max),
        ReduceOp::Min => kernel!(ReduceOp::Min),
    }
}

/// `acc[i] = op(acc[i], other[i])` for every element.
pub fn reduce_into<T: Reduce>(op: ReduceOp, acc: &mut [T], other: &[T]) {
    zip_with(acc, other, op, false);
}

/// `acc[i] = op(other[i], acc[i])`: `other` is the earlier partial result.
pub fn reduce_after<T: Reduce>(op: ReduceOp, earlier: &[T], acc: &mut [T]) {
    zip_with(acc, earlier, op, true);
}

/// `out[i] = op(earlier[i], mine[i])`: [`reduce_after`] into a third buffer.
pub fn reduce_after_to<T: Reduce>(op: ReduceOp, earlier: &[T], mine: &[T], out: &mut [T]) {
    macro_rules! kernel {
        ($op:expr) => {
            for ((o, e), m) in out.iter_mut().zip(earlier).zip(mine) {
                *o = T::apply($op, *e, *m);
            }
        };
    }
    match op {
        ReduceOp::Sum => kernel!(ReduceOp::Sum),
        ReduceOp::Max => kernel!(ReduceOp::Max),
        ReduceOp::Min => kernel!(ReduceOp::Min),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_and_min_propagate_nan_and_order_is_explicit() {
        assert!(f32::apply(ReduceOp::Max, f32::NAN, 1.0).is_nan());
        assert!(f32::apply(ReduceOp::Min, 1.0, f32::NAN).is_nan());
        let mut acc = [1.0f32, 5.0];
        reduce_into(ReduceOp::Max, &mut acc, &[3.0, 2.0]);
        assert_eq!(acc, [3.0, 5.0]);
        let h = f16::apply(ReduceOp::Sum, f16::from_f32(1.0), f16::from_f32(2.0));
        assert_eq!(h.to_f32(), 3.0);
    }
}
