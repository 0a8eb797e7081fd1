//! `exp` over a slice, eight lanes at a time with AVX2 + FMA for f32.
//!
//! The softmax, the cross-entropy and SwiGLU's sigmoid spend most of their non-GEMM time in
//! `exp`; libm's is scalar. The vector version reduces `x = n ln 2 + r` with `|r| <= ln 2 / 2`,
//! evaluates a degree-6 polynomial for `e^r` and scales by `2^n` through the exponent bits:
//! within 2 ulp of libm on the normal range, 0 below `ln(f32::MIN_POSITIVE)` (the additive
//! attention mask lands there) and infinity above `ln(f32::MAX)`.

/// `xs[i] = exp(xs[i] - shift)` in place; returns the sum of the results (lane-wise partial sums
/// added in a fixed order).
pub(crate) fn exp_shifted_f32(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::linear::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        #[allow(unsafe_code)]
        return unsafe { exp_shifted_avx2(xs, shift) };
    }
    exp_shifted_scalar(xs, shift)
}

/// The portable version of [`exp_shifted_f32`], for any float type.
pub(crate) fn exp_shifted_scalar<T: num_traits::Float + std::ops::AddAssign>(
    xs: &mut [T],
    shift: T,
) -> T {
    let mut sum = T::zero();
    for x in xs.iter_mut() {
        *x = (*x - shift).exp();
        sum += *x;
    }
    sum
}

/// Below this `exp` is not a normal f32: the result is 0.
const EXP_MIN: f32 = -87.336_54;
/// Above this `exp` overflows: the result is infinity.
const EXP_MAX: f32 = 88.722_83;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
fn exp_shifted_avx2(xs: &mut [f32], shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = xs.len();
    let p = xs.as_mut_ptr();
    let mut i = 0;
    // SAFETY: every load and store touches `i..i + 8` with `i + 8 <= n`, inside `xs`.
    let mut sum = unsafe {
        let shift_v = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        while i + 8 <= n {
            let x = _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), shift_v);
            let y = exp8(x);
            _mm256_storeu_ps(p.add(i), y);
            acc = _mm256_add_ps(acc, y);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().sum::<f32>()
    };
    for x in &mut xs[i..] {
        *x = (*x - shift).exp();
        sum += *x;
    }
    sum
}

/// `exp` of eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // ln 2 split in a part exact in f32 and the rest, so `x - n ln 2` loses nothing.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Taylor coefficients 1/k! for k = 2..6 (their truncation error is below f32 rounding for
    // |r| <= ln 2 / 2).
    const C2: f32 = 0.5;
    const C3: f32 = 1.0 / 6.0;
    const C4: f32 = 1.0 / 24.0;
    const C5: f32 = 1.0 / 120.0;
    const C6: f32 = 1.0 / 720.0;
    let too_small = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_MIN));
    let too_large = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(EXP_MAX));
    let xc = _mm256_max_ps(
        _mm256_min_ps(x, _mm256_set1_ps(EXP_MAX)),
        _mm256_set1_ps(EXP_MIN),
    );
    let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_HI), xc);
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_LO), r);
    let mut poly = _mm256_set1_ps(C6);
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(C5));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(C4));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(C3));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(C2));
    let r2 = _mm256_mul_ps(r, r);
    // e^r = 1 + r + r² (C2 + C3 r + ...).
    let er = _mm256_add_ps(_mm256_fmadd_ps(poly, r2, r), _mm256_set1_ps(1.0));
    // 2^k through the exponent field; k is in [-126, 128] after the clamp, and 2^128 is split
    // as 2 * 2^127 to stay representable.
    let k_i = _mm256_cvtps_epi32(k);
    let half_k = _mm256_srai_epi32::<1>(k_i);
    let rest_k = _mm256_sub_epi32(k_i, half_k);
    let bias = _mm256_set1_epi32(127);
    let pow_a = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(half_k, bias)));
    let pow_b = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(rest_k, bias)));
    let y = _mm256_mul_ps(_mm256_mul_ps(er, pow_a), pow_b);
    let y = _mm256_andnot_ps(too_small, y);
    let y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), too_large);
    // NaN in, NaN out (the clamp above would have turned it into a number).
    _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_within_two_ulp() {
        let mut worst = 0f64;
        // Dense over the normal range, plus the edges and the attention mask's value.
        let mut xs: Vec<f32> = (0..200_003)
            .map(|i| -87.0 + 175.0 * i as f32 / 200_003.0)
            .collect();
        xs.extend([
            0.0, -0.0, 1e-30, -1e-30, 88.7, -87.3, 0.5, -0.34657, 0.34657,
        ]);
        let mut ys = xs.clone();
        exp_shifted_f32(&mut ys, 0.0);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = f64::from(x).exp();
            let ulp = f64::from(f32::EPSILON) * want;
            worst = worst.max((f64::from(y) - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        // The sum (the whole range above would overflow f32).
        let mut small: Vec<f32> = (0..10_001).map(|i| -20.0 + i as f32 * 0.004).collect();
        let want: f64 = small.iter().map(|&x| f64::from(x).exp()).sum();
        let got = exp_shifted_f32(&mut small, 0.0);
        assert!(
            (f64::from(got) - want).abs() <= 1e-5 * want,
            "{got} vs {want}"
        );
        // Underflow to 0, overflow to infinity, and NaN stays NaN.
        let mut edges = [
            f32::MIN,
            -100.0,
            -87.5,
            89.0,
            f32::MAX,
            f32::NAN,
            0.0,
            1.0,
            -1.0,
        ];
        exp_shifted_f32(&mut edges, 0.0);
        assert_eq!(&edges[..5], &[0.0, 0.0, 0.0, f32::INFINITY, f32::INFINITY]);
        assert!(edges[5].is_nan());
        assert_eq!(edges[6], 1.0);
        // A shift is subtracted first.
        let mut shifted = [3.0f32, 1.0];
        let s = exp_shifted_f32(&mut shifted, 3.0);
        assert!((shifted[0] - 1.0).abs() < 1e-7 && (shifted[1] - (-2f32).exp()).abs() < 1e-7);
        assert!((s - shifted[0] - shifted[1]).abs() < 1e-7);
    }
}
