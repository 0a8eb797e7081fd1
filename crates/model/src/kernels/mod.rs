//! Fused CPU kernels with hand-written backward passes, for f32 and f64; the projections also
//! read bf16/f16 weights with f32 activations, widened as they are read (`widen.rs`).
//!
//! Each kernel replaces a chain of small candle ops (one allocation and one pass over memory
//! each, forward and backward) by one pass. They run as candle custom ops, so autograd calls
//! their `bwd`; the backward kernels are custom ops themselves (without a backward). Other
//! dtypes and devices use the plain-op versions in [`crate::models`], which the tests use as the
//! reference: every kernel has a parity test against them and a finite-difference check.

mod adamw;
mod cross_entropy;
mod exp;
mod fixed_linear;
mod flash_attention;
mod gemm;
mod linear;
mod logprobs;
mod paged_attention;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;
mod widen;

pub use adamw::{AdamWStep, adamw_update, sum_squares};
pub use cross_entropy::cross_entropy_sum;
pub use fixed_linear::{FixedOrder, linear_fixed};
pub use flash_attention::flash_attention;
pub use gemm::{linear, linear_frozen};
pub use linear::{MAX_ROWS as LINEAR_ROWS_MAX, linear_rows};
pub use logprobs::target_logprobs;
pub use paged_attention::{PagedShape, paged_attention};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::scaled_softmax;
pub use swiglu::swiglu;
pub use widen::is_half;

use candle_core::{CpuStorage, DType, Layout, Tensor, WithDType};

/// The float types the kernels are written for.
pub(crate) trait Real:
    WithDType + num_traits::Float + linear::RowDots + Send + Sync
{
    /// The elements of a storage of this type, writable (for in-place kernels).
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;

    /// `xs[i] = exp(xs[i] - shift)` in place; returns the sum of the results.
    fn exp_shifted(xs: &mut [Self], shift: Self) -> Self;
}
impl Real for f32 {
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }

    fn exp_shifted(xs: &mut [Self], shift: Self) -> Self {
        exp::exp_shifted_f32(xs, shift)
    }
}
impl Real for f64 {
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }

    fn exp_shifted(xs: &mut [Self], shift: Self) -> Self {
        exp::exp_shifted_scalar(xs, shift)
    }
}

/// Whether the fused kernels handle `t`: a CPU tensor of f32 or f64.
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Whether the projection kernels ([`linear_rows`], [`linear_fixed`]) take `x` with the weight
/// `w` as stored: both CPU f32 or both f64, or `x` f32 and `w` bf16 or f16 (widened as read).
pub fn supported_projection(x: &Tensor, w: &Tensor) -> bool {
    supported(x)
        && w.device().is_cpu()
        && (w.dtype() == x.dtype() || (x.dtype() == DType::F32 && is_half(w.dtype())))
}

/// Tensors at least this large are split across the rayon pool.
const PARALLEL_MIN: usize = 1 << 15;

/// The contiguous data of one kernel argument.
fn data<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: expects contiguous inputs")))?;
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// Dispatches `$body` with `$t` bound to the float type of `$storage` (f32 or f64).
macro_rules! by_float {
    ($storage:expr, $op:expr, $t:ident => $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                #[allow(unused_imports)]
                use {candle_core::WithDType as _, num_traits::One as _, num_traits::Zero as _};
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                #[allow(unused_imports)]
                use {candle_core::WithDType as _, num_traits::One as _, num_traits::Zero as _};
                type $t = f64;
                $body
            }
            _ => Err(candle_core::Error::Msg(format!(
                "{}: f32 or f64 expected",
                $op
            ))),
        }
    };
}
pub(crate) use by_float;

/// The largest element of a row (`-inf` for an empty one).
fn row_max<T: Real>(row: &[T]) -> T {
    row.iter()
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m })
}

/// Runs `f(row_index, row)` over the `row_len`-sized rows of `out`, in parallel when large.
fn for_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    use rayon::prelude::*;
    if row_len == 0 {
        return;
    }
    if out.len() >= PARALLEL_MIN {
        out.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        out.chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    }
}

#[cfg(test)]
mod tests;
