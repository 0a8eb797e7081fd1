//! Every kernel against its plain-op reference (forward and autograd backward, f32) and against
//! finite differences of itself (f64).

use candle_core::{DType, Device, Tensor, Var};

use super::*;
use crate::models::{Rope, apply_rope_plain, rms_norm_plain, scaled_softmax_plain, swiglu_plain};

/// The tiled attention kernel against the dense attention.
mod attention;

type Kernel<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    // A small LCG keeps the inputs identical across runs without a global seed.
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f64> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_vec0::<f64>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f64 {
    max_abs_diff(a, &a.zeros_like().unwrap())
}

/// Output and gradients of `sum(f(inputs) * weights)` with respect to the first `n_grad` inputs.
fn value_and_grads(
    f: Kernel<'_>,
    inputs: &[Tensor],
    n_grad: usize,
    weights: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs[..n_grad]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    args.extend(inputs[n_grad..].iter().cloned());
    let out = f(&args).unwrap();
    let loss = out.broadcast_mul(weights).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("gradient").clone())
        .collect();
    (out, grads)
}

/// Checks `fused` against `plain` in f32 and the fused gradient against central differences
/// in f64. `shapes[..n_grad]` are differentiated; `out_shape` is the output's shape.
fn check(
    name: &str,
    fused: Kernel<'_>,
    plain: Kernel<'_>,
    shapes: &[&[usize]],
    n_grad: usize,
    out_shape: &[usize],
) {
    let make = |dtype| -> Vec<Tensor> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| random(s, 11 + i as u64, dtype))
            .collect()
    };
    // Parity with the plain ops, f32.
    let inputs = make(DType::F32);
    let weights = random(out_shape, 97, DType::F32);
    let (out_f, grads_f) = value_and_grads(fused, &inputs, n_grad, &weights);
    let (out_p, grads_p) = value_and_grads(plain, &inputs, n_grad, &weights);
    // Relative to the largest reference value (sums over thousands of f32 terms round).
    let d = max_abs_diff(&out_f, &out_p) / max_abs(&out_p).max(1.0);
    assert!(
        d < 1e-6,
        "{name}: forward differs from plain ops by {d} (relative)"
    );
    for (i, (gf, gp)) in grads_f.iter().zip(&grads_p).enumerate() {
        let d = max_abs_diff(gf, gp) / max_abs(gp).max(1.0);
        assert!(
            d < 1e-5,
            "{name}: gradient {i} differs from autograd by {d} (relative)"
        );
    }
    // Finite differences, f64: directional derivative along a random direction.
    let inputs = make(DType::F64);
    let weights = random(out_shape, 97, DType::F64);
    let (_, grads) = value_and_grads(fused, &inputs, n_grad, &weights);
    let loss_at = |args: &[Tensor]| -> f64 {
        fused(args)
            .unwrap()
            .broadcast_mul(&weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_vec0::<f64>()
            .unwrap()
    };
    for i in 0..n_grad {
        let dir = random(inputs[i].dims(), 1000 + i as u64, DType::F64);
        let eps = 1e-6;
        let mut plus = inputs.clone();
        let mut minus = inputs.clone();
        plus[i] = (&inputs[i] + (&dir * eps).unwrap()).unwrap();
        minus[i] = (&inputs[i] - (&dir * eps).unwrap()).unwrap();
        let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps);
        let analytic = (&grads[i] * &dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_vec0::<f64>()
            .unwrap();
        let rel = (numeric - analytic).abs() / numeric.abs().max(1e-8);
        assert!(
            rel < 1e-6,
            "{name}: input {i}: numeric {numeric} vs analytic {analytic} (rel {rel})"
        );
    }
}

#[test]
fn rms_norm_matches_plain_and_finite_differences() {
    // Large enough to take the parallel path too.
    for rows in [3, 400] {
        check(
            "rms_norm",
            &|a| rms_norm(&a[0], &a[1], 1e-6),
            &|a| Ok(rms_norm_plain(&a[0], &a[1], 1e-6).unwrap()),
            &[&[rows, 96], &[96]],
            2,
            &[rows, 96],
        );
    }
}

#[test]
fn rope_matches_plain_and_finite_differences() {
    let rope_of = |a: &[Tensor]| Rope {
        cos: a[1].cos().unwrap(),
        sin: a[1].sin().unwrap(),
    };
    for (b, cos_b) in [(2, 2), (3, 1)] {
        check(
            "rope",
            &|a| {
                let r = rope_of(a);
                super::rope(&a[0], &r.cos, &r.sin)
            },
            &|a| Ok(apply_rope_plain(&a[0], &rope_of(a)).unwrap()),
            &[&[b, 3, 5, 8], &[cos_b, 1, 5, 8]],
            1,
            &[b, 3, 5, 8],
        );
    }
}

#[test]
fn scaled_softmax_matches_plain_and_finite_differences() {
    let causal = |b: usize, t: usize, dtype: DType| -> Tensor {
        let mut bias = vec![0f64; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    // Causal, and the last key of batch row 1 is padding (no row is fully
                    // masked: such a row is constant, and its queries never reach a loss).
                    if j > i || (bi == 1 && j == t - 1) {
                        bias[(bi * t + i) * t + j] = f64::from(f32::MIN);
                    }
                }
            }
        }
        Tensor::from_vec(bias, (b, 1, t, t), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    check(
        "scaled_softmax (masked)",
        &|a| scaled_softmax(&a[0], Some(&causal(2, 6, a[0].dtype())), 0.3),
        &|a| Ok(scaled_softmax_plain(&a[0], Some(&causal(2, 6, a[0].dtype())), 0.3).unwrap()),
        &[&[2, 3, 6, 6]],
        1,
        &[2, 3, 6, 6],
    );
    check(
        "scaled_softmax",
        &|a| scaled_softmax(&a[0], None, 0.7),
        &|a| Ok(scaled_softmax_plain(&a[0], None, 0.7).unwrap()),
        &[&[2, 3, 1, 9]],
        1,
        &[2, 3, 1, 9],
    );
}

#[test]
fn swiglu_matches_plain_and_finite_differences() {
    for n in [7, 9000] {
        check(
            "swiglu",
            &|a| swiglu(&a[0], &a[1]),
            &|a| Ok(swiglu_plain(&a[0], &a[1]).unwrap()),
            &[&[n, 5], &[n, 5]],
            2,
            &[n, 5],
        );
    }
}

#[test]
fn cross_entropy_matches_plain_and_finite_differences() {
    let targets = |rows: usize| -> Vec<i64> {
        (0..rows)
            .map(|r| if r % 4 == 3 { -1 } else { (r * 7 % 11) as i64 })
            .collect()
    };
    let plain = |a: &[Tensor]| -> candle_core::Result<Tensor> {
        let rows = a[0].dim(0)?;
        let t = targets(rows);
        let mask: Vec<f64> = t.iter().map(|&v| f64::from(u8::from(v >= 0))).collect();
        let idx: Vec<u32> = t.iter().map(|&v| v.max(0) as u32).collect();
        let idx = Tensor::from_vec(idx, (rows, 1), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, rows, &Device::Cpu)?.to_dtype(a[0].dtype())?;
        let logp = crate::train::log_softmax(&a[0]).unwrap();
        logp.gather(&idx, 1)?
            .squeeze(1)?
            .mul(&mask)?
            .sum_all()?
            .neg()
    };
    for rows in [6, 3000] {
        check(
            "cross_entropy_sum",
            &|a| cross_entropy_sum(&a[0], targets(a[0].dim(0)?)),
            &plain,
            &[&[rows, 11]],
            1,
            &[],
        );
    }
}

#[test]
fn kernels_reject_what_they_cannot_do() {
    let x = random(&[2, 4], 1, DType::F32);
    assert!(rms_norm(&x, &random(&[3], 2, DType::F32), 1e-6).is_err());
    assert!(cross_entropy_sum(&x, vec![0]).is_err());
    assert!(cross_entropy_sum(&x, vec![0, 4]).is_err());
    assert!(swiglu(&x, &random(&[4, 2], 3, DType::F32)).is_err());
    let half = x.to_dtype(DType::BF16).unwrap();
    assert!(!supported(&half));
    assert!(rms_norm(&half, &random(&[4], 2, DType::BF16), 1e-6).is_err());
}

#[test]
fn linear_rows_matches_matmul_and_finite_differences() {
    // 45 inputs: two 16-wide steps, one 8-wide step and a tail; 130 outputs: three blocks.
    for rows in [1, 8] {
        check(
            "linear_rows",
            &|a| linear_rows(&a[0], &a[1]),
            &|a| a[0].matmul(&a[1].t()?),
            &[&[rows, 45], &[130, 45]],
            2,
            &[rows, 130],
        );
    }
    let x = random(&[17, 4], 1, DType::F32);
    assert!(linear_rows(&x, &random(&[3, 4], 2, DType::F32)).is_err());
}

/// `linear_rows` and `linear_fixed` with a bf16/f16 weight against the same kernel on the widened
/// f32 weight (bit for bit: widening is exact and the arithmetic is the f32 kernel's), and against
/// candle's matmul.
#[test]
fn projections_widen_half_weights_exactly() {
    for dtype in [DType::BF16, DType::F16] {
        // 45 inputs: 16-wide steps, an 8-wide step and a tail; 100: lanes and a tail of 4.
        for in_dim in [45, 100] {
            let w = random(&[130, in_dim], 2, dtype);
            let wide = w.to_dtype(DType::F32).unwrap();
            for rows in [1, 3, 8, 16, 37] {
                let x = random(&[rows, in_dim], 1, DType::F32);
                let reference = x.matmul(&wide.t().unwrap()).unwrap();
                let fixed = |a: &[Tensor]| linear_fixed(&a[0], &a[1]);
                let few = |a: &[Tensor]| linear_rows(&a[0], &a[1]);
                let mut kernels: Vec<(&str, Kernel<'_>)> = vec![("linear_fixed", &fixed)];
                if rows <= LINEAR_ROWS_MAX {
                    kernels.push(("linear_rows", &few));
                }
                for (name, kernel) in kernels {
                    let narrow = kernel(&[x.clone(), w.clone()]).unwrap();
                    let widened = kernel(&[x.clone(), wide.clone()]).unwrap();
                    assert_eq!(narrow.dtype(), DType::F32);
                    assert_eq!(
                        max_abs_diff(&narrow, &widened),
                        0.0,
                        "{name} {dtype:?} {rows}x{in_dim}: not the widened weight's bits"
                    );
                    let d = max_abs_diff(&narrow, &reference);
                    assert!(
                        d < 1e-5,
                        "{name} {dtype:?} {rows}x{in_dim}: {d} from matmul"
                    );
                }
            }
        }
    }
    // A half weight takes f32 inputs only.
    let x = random(&[2, 8], 1, DType::F64);
    let w = random(&[3, 8], 2, DType::BF16);
    assert!(!supported_projection(&x, &w));
    assert!(linear_rows(&x, &w).is_err());
    assert!(linear_fixed(&x, &w).is_err());
}

/// The input gradient of `linear_rows` with a frozen bf16 weight, against autograd through the
/// widened weight and against central differences (f32: the map is linear in `x`, so a large
/// step is exact up to rounding).
#[test]
fn linear_rows_with_a_half_weight_has_the_input_gradient() {
    let w = random(&[130, 45], 2, DType::BF16);
    let wide = w.to_dtype(DType::F32).unwrap();
    let x = random(&[4, 45], 1, DType::F32);
    let weights = random(&[4, 130], 97, DType::F32);
    let narrow_kernel: Kernel<'_> = &|a| linear_rows(&a[0], &w);
    let (out, grads) = value_and_grads(narrow_kernel, std::slice::from_ref(&x), 1, &weights);
    let (out_ref, grads_ref) = value_and_grads(
        &|a| a[0].matmul(&wide.t()?),
        std::slice::from_ref(&x),
        1,
        &weights,
    );
    assert!(max_abs_diff(&out, &out_ref) < 1e-5);
    let d = max_abs_diff(&grads[0], &grads_ref[0]);
    eprintln!("linear_rows bf16: dx max_abs_diff {d:e}");
    assert!(d < 1e-5, "{d}");
    let loss_at = |x: &Tensor| -> f64 {
        let y = linear_rows(x, &w).unwrap().to_dtype(DType::F64).unwrap();
        let weights = weights.to_dtype(DType::F64).unwrap();
        (y * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_vec0::<f64>()
            .unwrap()
    };
    let dir = random(&[4, 45], 1000, DType::F32);
    let eps = 0.5;
    let numeric = (loss_at(&(&x + (&dir * eps).unwrap()).unwrap())
        - loss_at(&(&x - (&dir * eps).unwrap()).unwrap()))
        / (2.0 * eps);
    let analytic = (&grads[0].to_dtype(DType::F64).unwrap() * dir.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_vec0::<f64>()
        .unwrap();
    let rel = (numeric - analytic).abs() / numeric.abs().max(1e-8);
    assert!(
        rel < 1e-4,
        "numeric {numeric} vs analytic {analytic} (rel {rel})"
    );
}

#[test]
fn adamw_update_matches_plain_ops() {
    for dtype in [DType::F32, DType::F64] {
        let shape = [37, 300];
        let param = Var::from_tensor(&random(&shape, 31, dtype)).unwrap();
        let m = random(&shape, 32, dtype).affine(0.1, 0.0).unwrap();
        let v = random(&shape, 33, dtype)
            .abs()
            .unwrap()
            .affine(0.01, 0.0)
            .unwrap();
        let (m_k, v_k) = (m.copy().unwrap(), v.copy().unwrap());
        let (mut p_ref, mut m_ref, mut v_ref) = (param.as_tensor().copy().unwrap(), m, v);
        for (step, decay) in [(1, 0.999), (2, 1.0), (3, 0.98)] {
            let grad = random(&shape, 40 + step, dtype);
            let c = AdamWStep {
                grad_scale: 0.37,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                step_size: 0.01 / (1.0 - 0.9f64.powi(step as i32)),
                bias_correction2_sqrt: (1.0 - 0.95f64.powi(step as i32)).sqrt(),
                decay,
            };
            adamw_update(param.as_tensor(), &m_k, &v_k, &grad, c).unwrap();
            (p_ref, m_ref, v_ref) =
                crate::train::optimizer::adamw_plain(&p_ref, &m_ref, &v_ref, &grad, c).unwrap();
        }
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-13 };
        assert!(
            max_abs_diff(param.as_tensor(), &p_ref) < tol,
            "{dtype:?} weights"
        );
        assert!(max_abs_diff(&m_k, &m_ref) < tol, "{dtype:?} first moment");
        assert!(max_abs_diff(&v_k, &v_ref) < tol, "{dtype:?} second moment");
        assert!(max_abs_diff(param.as_tensor(), &random(&shape, 31, dtype)) > 1e-3);
    }
}

#[test]
fn sum_squares_matches_plain_ops() {
    for dtype in [DType::F32, DType::F64] {
        // Longer than one chunk, so the partial sums are combined.
        let t = random(&[3, 70_001], 50, dtype);
        let want = t
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_vec0::<f64>()
            .unwrap();
        let got = sum_squares(&t).unwrap();
        assert!(
            (got - want).abs() < 1e-9 * want,
            "{dtype:?}: {got} vs {want}"
        );
    }
}

#[test]
fn linear_matches_plain_and_finite_differences() {
    let plain = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| -> candle_core::Result<Tensor> {
        let (rows, in_dim) = (x.elem_count() / x.dim(2)?, x.dim(2)?);
        let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?.reshape((
            x.dim(0)?,
            x.dim(1)?,
            w.dim(0)?,
        ))?;
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    };
    // More rows than the decoding kernel takes, with and without a bias.
    check(
        "linear",
        &|a| linear(&a[0], &a[1], None),
        &|a| plain(&a[0], &a[1], None),
        &[&[3, 7, 24], &[10, 24]],
        2,
        &[3, 7, 10],
    );
    // A frozen weight and bias (not differentiated): the input's gradient alone.
    check(
        "linear (frozen weight)",
        &|a| linear(&a[0], &a[1], Some(&a[2])),
        &|a| plain(&a[0], &a[1], Some(&a[2])),
        &[&[2, 20, 9], &[5, 9], &[5]],
        1,
        &[2, 20, 5],
    );
    check(
        "linear (bias)",
        &|a| linear(&a[0], &a[1], Some(&a[2])),
        &|a| plain(&a[0], &a[1], Some(&a[2])),
        &[&[3, 50, 33], &[17, 33], &[17]],
        3,
        &[3, 50, 17],
    );
}

#[test]
fn lora_linear_matches_the_merged_weight_and_finite_differences() {
    use candle_core::Module;

    use crate::lora::LoraAdapter;
    use crate::models::Linear;
    let scale = 2.5;
    // Inputs: x, A [r, in], B [out, r] (differentiated), then the frozen W [out, in] and bias.
    let adapted = |a: &[Tensor]| {
        let adapter = LoraAdapter::new(a[1].clone(), a[2].clone(), scale);
        Linear::new(a[3].detach(), Some(a[4].detach()))
            .with_adapter(Some(adapter))
            .forward(&a[0])
    };
    // The reference: the merged weight `W + scale · B · A` through candle's matmul.
    let merged = |a: &[Tensor]| {
        let w = (&a[3] + (a[2].matmul(&a[1])? * scale)?)?;
        let (b_sz, seq_len, in_dim) = a[0].dims3()?;
        a[0].reshape((b_sz * seq_len, in_dim))?
            .matmul(&w.t()?)?
            .broadcast_add(&a[4])?
            .reshape((b_sz, seq_len, w.dim(0)?))
    };
    check(
        "lora linear",
        &adapted,
        &merged,
        &[&[2, 20, 12], &[3, 12], &[7, 3], &[7, 12], &[7]],
        3,
        &[2, 20, 7],
    );
}

#[test]
fn frozen_linear_widens_a_bf16_weight() {
    let x = random(&[2, 20, 16], 5, DType::F32);
    let w = random(&[9, 16], 6, DType::BF16);
    let wide = w.to_dtype(DType::F32).unwrap();
    let var = Var::from_tensor(&x).unwrap();
    let y = linear_frozen(var.as_tensor(), &w).unwrap();
    let y_ref = linear(&x, &wide, None).unwrap();
    let d = max_abs_diff(&y, &y_ref);
    eprintln!("linear_frozen bf16: forward max_abs_diff {d:e}");
    assert!(d < 1e-6, "{d}");
    let weights = random(&[2, 20, 9], 7, DType::F32);
    let grads = y
        .broadcast_mul(&weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx = grads.get(var.as_tensor()).expect("dx");
    let dx_ref = weights.reshape((40, 9)).unwrap().matmul(&wide).unwrap();
    let d = max_abs_diff(dx, &dx_ref.reshape((2, 20, 16)).unwrap());
    eprintln!("linear_frozen bf16: dx max_abs_diff {d:e}");
    assert!(d < 1e-5, "{d}");
}

#[test]
fn target_logprobs_matches_plain_and_finite_differences() {
    // Targets cover the first, last and middle ids; more rows than one block.
    let targets: Vec<u32> = (0..2 * 21).map(|i| (i * 7 % 13) as u32).collect();
    let targets = Tensor::from_vec(targets, (2, 21), &Device::Cpu).unwrap();
    let plain = |z: &Tensor| -> candle_core::Result<Tensor> {
        let lp = candle_nn::ops::log_softmax(z, 2)?;
        lp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)
    };
    check(
        "target_logprobs",
        &|a| target_logprobs(&a[0], &targets),
        &|a| plain(&a[0]),
        &[&[2, 21, 13]],
        1,
        &[2, 21],
    );
}
