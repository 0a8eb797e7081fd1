//! [`flash_attention`] against the dense plain-op attention (scores, the bias of
//! [`AttentionMask::bias`], `scaled_softmax_plain`), and against finite differences, with tiles
//! small enough that every shape below spans several of them and ends in a partial one.

use candle_core::{DType, Device, Tensor, Var};

use super::super::flash_attention::flash_attention_tiled;
use super::{check, flash_attention, max_abs, random};
use crate::models::{AttentionMask, scaled_softmax_plain};

/// One attention problem: sizes, mask, scale, tiles.
#[derive(Clone)]
struct Case {
    name: &'static str,
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    s: usize,
    d: usize,
    causal: bool,
    /// Leading padding keys of each batch row.
    left_pad: Vec<usize>,
    tiles: (usize, usize),
}

impl Case {
    fn past(&self) -> usize {
        if self.causal { self.s - self.t } else { 0 }
    }

    /// `[b, s]`, 0 for padding keys; `None` without padding.
    fn key_mask(&self, dtype: DType) -> Option<Tensor> {
        if self.left_pad.iter().all(|&p| p == 0) {
            return None;
        }
        let values: Vec<f64> = (0..self.b)
            .flat_map(|bi| (0..self.s).map(move |j| f64::from(u8::from(j >= self.left_pad[bi]))))
            .collect();
        let mask = Tensor::from_vec(values, (self.b, self.s), &Device::Cpu).unwrap();
        Some(mask.to_dtype(dtype).unwrap())
    }

    /// `[b, 1, t, 1]`: 1 for queries that have a key to attend.
    fn query_mask(&self, dtype: DType) -> Tensor {
        let past = self.past();
        let values: Vec<f64> = (0..self.b)
            .flat_map(|bi| {
                (0..self.t).map(move |i| {
                    let last = if self.causal { past + i } else { self.s - 1 };
                    f64::from(u8::from(self.left_pad[bi] <= last))
                })
            })
            .collect();
        Tensor::from_vec(values, (self.b, 1, self.t, 1), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn scale(&self) -> f64 {
        0.9 / (self.d as f64).sqrt()
    }

    /// The kernel, padding queries zeroed (they are zero already).
    fn fused(&self, a: &[Tensor]) -> candle_core::Result<Tensor> {
        let keys = self.key_mask(DType::U8);
        let out = flash_attention_tiled(
            &a[0],
            &a[1],
            &a[2],
            keys.as_ref(),
            self.causal,
            self.scale(),
            self.tiles,
        )?;
        out.broadcast_mul(&self.query_mask(a[0].dtype()))
    }

    /// Dense scores, bias and `scaled_softmax_plain`, padding queries zeroed (the dense path
    /// spreads them uniformly over every key).
    fn plain(&self, a: &[Tensor]) -> candle_core::Result<Tensor> {
        let (q, k, v) = (&a[0], &a[1], &a[2]);
        let groups = self.heads / self.kv_heads;
        let mask = AttentionMask {
            causal: self.causal,
            keys: self.key_mask(DType::F32),
        };
        let bias = mask
            .bias(self.b, self.t, self.s, q.dtype(), q.device())
            .unwrap();
        let q = q.reshape((self.b, self.kv_heads, groups * self.t, self.d))?;
        let scores = q
            .matmul(&k.t()?)?
            .reshape((self.b, self.heads, self.t, self.s))?;
        let probs = scaled_softmax_plain(&scores, bias.as_ref(), self.scale()).unwrap();
        let probs = probs.reshape((self.b, self.kv_heads, groups * self.t, self.s))?;
        let out = probs
            .matmul(v)?
            .reshape((self.b, self.heads, self.t, self.d))?;
        out.broadcast_mul(&self.query_mask(out.dtype()))
    }

    fn check(&self) {
        let q = [self.b, self.heads, self.t, self.d];
        let kv = [self.b, self.kv_heads, self.s, self.d];
        check(
            self.name,
            &|a| self.fused(a),
            &|a| self.plain(a),
            &[&q, &kv, &kv],
            3,
            &q,
        );
    }
}

fn case(name: &'static str) -> Case {
    Case {
        name,
        b: 2,
        heads: 2,
        kv_heads: 2,
        t: 13,
        s: 13,
        d: 8,
        causal: true,
        left_pad: vec![0, 0],
        tiles: (4, 3),
    }
}

#[test]
fn causal_matches_plain_and_finite_differences() {
    case("causal").check();
    // Square tiles, so the diagonal runs through their corners.
    Case {
        tiles: (4, 4),
        t: 12,
        s: 12,
        ..case("causal, square tiles")
    }
    .check();
}

#[test]
fn causal_with_past_matches_plain_and_finite_differences() {
    Case {
        t: 5,
        s: 17,
        tiles: (2, 4),
        ..case("causal with past")
    }
    .check();
    // One query over a cache, as in decoding.
    Case {
        t: 1,
        s: 9,
        ..case("one query with past")
    }
    .check();
}

#[test]
fn grouped_query_attention_matches_plain_and_finite_differences() {
    Case {
        heads: 6,
        kv_heads: 2,
        t: 11,
        s: 11,
        ..case("gqa")
    }
    .check();
    Case {
        heads: 4,
        kv_heads: 1,
        t: 6,
        s: 10,
        ..case("gqa with past")
    }
    .check();
}

#[test]
fn key_padding_matches_plain_and_finite_differences() {
    // Left padding as in batched scoring: row 1's first queries attend nothing.
    Case {
        left_pad: vec![0, 5],
        ..case("left padding")
    }
    .check();
    Case {
        left_pad: vec![3, 7],
        t: 4,
        s: 14,
        heads: 4,
        ..case("left padding with past, gqa")
    }
    .check();
    Case {
        causal: false,
        left_pad: vec![2, 0],
        t: 3,
        s: 10,
        ..case("not causal, padding")
    }
    .check();
}

#[test]
fn default_tiles_match_plain_and_finite_differences() {
    // Longer than one 64-row tile in both directions, not a multiple of it.
    Case {
        b: 1,
        heads: 2,
        kv_heads: 1,
        t: 70,
        s: 70,
        d: 4,
        left_pad: vec![3],
        tiles: (64, 64),
        ..case("default tiles")
    }
    .check();
}

#[test]
fn padding_queries_give_zero_output_and_no_gradient() {
    let c = Case {
        left_pad: vec![4, 0],
        t: 6,
        s: 6,
        ..case("padding queries")
    };
    let q = Var::from_tensor(&random(&[2, 2, 6, 8], 1, DType::F32)).unwrap();
    let k = Var::from_tensor(&random(&[2, 2, 6, 8], 2, DType::F32)).unwrap();
    let v = Var::from_tensor(&random(&[2, 2, 6, 8], 3, DType::F32)).unwrap();
    let keys = c.key_mask(DType::F32);
    let out = flash_attention_tiled(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        keys.as_ref(),
        true,
        0.5,
        (4, 3),
    )
    .unwrap();
    // Batch row 0, queries 0..4 see only padding.
    let padded = out.narrow(0, 0, 1).unwrap().narrow(2, 0, 4).unwrap();
    assert_eq!(max_abs(&padded), 0.0, "padding queries have a zero output");
    let real = out.narrow(0, 1, 1).unwrap();
    assert!(max_abs(&real) > 0.0);
    // A loss on the padding queries alone leaves every gradient zero (and finite).
    let grads = padded.sum_all().unwrap().backward().unwrap();
    for var in [&q, &k, &v] {
        let g = grads.get(var.as_tensor()).expect("gradient");
        let values = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|x| *x == 0.0), "gradient {values:?}");
    }
    // A loss on everything stays finite.
    let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for var in [&q, &k, &v] {
        let g = grads.get(var.as_tensor()).expect("gradient");
        let values = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn reads_key_and_value_views_in_place() {
    // Views of a larger cache buffer, as `KvCache::append` hands out.
    let q = random(&[2, 4, 3, 8], 1, DType::F32);
    let k_buf = random(&[2, 2, 20, 8], 2, DType::F32);
    let v_buf = random(&[2, 2, 20, 8], 3, DType::F32);
    let (k, v) = (
        k_buf.narrow(2, 0, 12).unwrap(),
        v_buf.narrow(2, 0, 12).unwrap(),
    );
    assert!(!k.is_contiguous());
    let viewed = flash_attention(&q, &k, &v, None, true, 0.3).unwrap();
    let copied = flash_attention(
        &q,
        &k.contiguous().unwrap(),
        &v.contiguous().unwrap(),
        None,
        true,
        0.3,
    )
    .unwrap();
    assert_eq!(super::max_abs_diff(&viewed, &copied), 0.0);
}

#[test]
fn rejects_what_it_cannot_do() {
    let q = random(&[1, 3, 4, 8], 1, DType::F32);
    let k = random(&[1, 2, 4, 8], 2, DType::F32);
    // 3 query heads over 2 kv heads.
    assert!(flash_attention(&q, &k, &k, None, true, 1.0).is_err());
    // More queries than keys under a causal mask.
    let q = random(&[1, 2, 5, 8], 1, DType::F32);
    assert!(flash_attention(&q, &k, &k, None, true, 1.0).is_err());
    assert!(flash_attention(&q, &k, &k, None, false, 1.0).is_ok());
    // A key mask of the wrong shape.
    let mask = Tensor::ones((1, 5), DType::U8, &Device::Cpu).unwrap();
    assert!(flash_attention(&q, &k, &k, Some(&mask), false, 1.0).is_err());
    // Mixed dtypes.
    let k64 = k.to_dtype(DType::F64).unwrap();
    assert!(flash_attention(&q, &k64, &k64, None, false, 1.0).is_err());
}

/// Forward and backward of one layer's attention over one 8,192-token sequence (4 heads, 2 kv
/// heads, head dim 64): prints the time and the process's peak RSS. `RETORT_ATTENTION_DENSE=1`
/// runs the dense path instead. A measurement, run one path per process in release:
/// `cargo test --release -p retort-model --lib long_sequence -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: minutes in debug, gigabytes on the dense path"]
fn long_sequence_time_and_peak_memory() {
    let (t, heads, kv_heads, d) = (8192, 4, 2, 64);
    let q = Var::from_tensor(&random(&[1, heads, t, d], 1, DType::F32)).unwrap();
    let k = Var::from_tensor(&random(&[1, kv_heads, t, d], 2, DType::F32)).unwrap();
    let v = Var::from_tensor(&random(&[1, kv_heads, t, d], 3, DType::F32)).unwrap();
    let dense = std::env::var_os("RETORT_ATTENTION_DENSE").is_some();
    let mask = AttentionMask::causal(None, 1, t).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let start = std::time::Instant::now();
    let out = if dense {
        let bias = mask.bias(1, t, t, DType::F32, &Device::Cpu).unwrap();
        crate::models::attention_dense(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            bias.as_ref(),
            scale,
        )
    } else {
        crate::models::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scale)
    }
    .unwrap();
    let forward = start.elapsed();
    let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let total = start.elapsed();
    let dq = grads.get(q.as_tensor()).expect("dq");
    let status = fs_err::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: unknown");
    eprintln!(
        "{} attention, t {t}: forward {:.2} s, forward+backward {:.2} s, {peak}, |dq| max {:e}",
        if dense { "dense" } else { "tiled" },
        forward.as_secs_f64(),
        total.as_secs_f64(),
        max_abs(dq),
    );
}
