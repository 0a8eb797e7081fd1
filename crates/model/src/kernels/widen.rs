//! Linear weights stored in 16 bits (bf16, f16) and widened to f32 as the projection kernels
//! read them: batch-1 decoding reads every weight once per token, so half the bytes is close to
//! half the time, while activations and sums stay f32.
//!
//! Widening is exact (every bf16 and f16 value is an f32 value), so a kernel that widens and then
//! runs its f32 arithmetic gives the same bits as the f32 kernel on the widened weight. [`Weight`]
//! names the three storage types; [`load16`] and [`load8`] are its AVX-512 and AVX2 loads.

use candle_core::{CpuStorage, DType, WithDType};
use half::{bf16, f16};

/// How a weight element is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    F32,
    Bf16,
    F16,
}

/// A weight element the f32 projection kernels read: f32 as is, bf16 and f16 widened.
pub(crate) trait Weight: WithDType + Copy + Send + Sync {
    /// The storage, for the SIMD loads.
    const STORED: Stored;

    /// The exact f32 value.
    fn widen(self) -> f32;
}

impl Weight for f32 {
    const STORED: Stored = Stored::F32;

    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Weight for bf16 {
    const STORED: Stored = Stored::Bf16;

    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Weight for f16 {
    const STORED: Stored = Stored::F16;

    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Whether `dtype` is a 16-bit float the kernels widen.
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// Dispatches `$body` with `$w` bound to the element type of a 16-bit weight storage.
macro_rules! by_half {
    ($storage:expr, $op:expr, $w:ident => $body:expr) => {
        match $storage {
            candle_core::CpuStorage::BF16(_) => {
                type $w = half::bf16;
                $body
            }
            candle_core::CpuStorage::F16(_) => {
                type $w = half::f16;
                $body
            }
            _ => Err(candle_core::Error::Msg(format!(
                "{}: a bf16 or f16 weight expected",
                $op
            ))),
        }
    };
}
pub(crate) use by_half;

/// Whether `storage` holds a 16-bit float.
pub(crate) fn is_half_storage(storage: &CpuStorage) -> bool {
    matches!(storage, CpuStorage::BF16(_) | CpuStorage::F16(_))
}

/// Whether the CPU has the AVX2 path of the half loads ([`load8`]).
pub(crate) fn has_avx2_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED
            .get_or_init(|| super::linear::has_avx2_fma() && std::is_x86_feature_detected!("f16c"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Sixteen weights from `p` as f32 (AVX-512F).
///
/// # Safety
/// The CPU has AVX-512F and `p` points at 16 readable elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(unsafe_code)]
pub(crate) unsafe fn load16<W: Weight>(p: *const W) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: 16 elements at `p` are readable (the caller's contract).
    unsafe {
        match W::STORED {
            Stored::F32 => _mm512_loadu_ps(p.cast()),
            // bf16 is the top half of an f32: zero-extend to 32 bits, shift up.
            Stored::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p.cast()),
            ))),
            Stored::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
        }
    }
}

/// Eight weights from `p` as f32 (AVX2, F16C).
///
/// # Safety
/// The CPU has AVX2 and F16C and `p` points at 8 readable elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(unsafe_code)]
pub(crate) unsafe fn load8<W: Weight>(p: *const W) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: 8 elements at `p` are readable (the caller's contract).
    unsafe {
        match W::STORED {
            Stored::F32 => _mm256_loadu_ps(p.cast()),
            Stored::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p.cast()),
            ))),
            Stored::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
        }
    }
}
