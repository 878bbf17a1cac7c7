//! The fused scaled-dot-product attention kernel: f64 finite-difference gradients, and equality
//! with the composed candle-primitive path (forward and every gradient) with and without masks,
//! odd sizes, Lq ≠ Lk, several row blocks and work chunks, f32 and f64.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, check_grads, to_vec, Rng};
use ops::attention::{
    scaled_dot_product_attention, scaled_dot_product_attention_composed, MultiheadAttention,
};

/// The mask kinds MultiheadAttention accepts.
#[derive(Clone, Copy, Debug)]
enum MaskKind {
    None,
    /// u8 (B, Lq, Lk), nonzero = not attended.
    Bool,
    /// u8 (B·heads, Lq, Lk).
    BoolPerHead,
    /// u32 (B, Lq, Lk), nonzero = not attended.
    BoolU32,
    /// f32 additive (B, Lq, Lk) with some -inf.
    Float,
    /// f64 additive (B·heads, Lq, Lk), finite.
    FloatPerHead,
}

/// A mask that never masks a whole row (key 0 stays attended).
fn make_mask(
    kind: MaskKind,
    b: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    rng: &mut Rng,
) -> Option<Tensor> {
    let dev = &Device::Cpu;
    let slabs = |per_head: bool| if per_head { b * heads } else { b };
    match kind {
        MaskKind::None => None,
        MaskKind::Bool | MaskKind::BoolPerHead | MaskKind::BoolU32 => {
            let n = slabs(matches!(kind, MaskKind::BoolPerHead));
            let m: Vec<u8> = (0..n * lq * lk)
                .map(|i| (i % lk != 0 && rng.uniform(0.0, 1.0) < 0.4) as u8)
                .collect();
            let m = Tensor::from_vec(m, (n, lq, lk), dev).unwrap();
            Some(if matches!(kind, MaskKind::BoolU32) {
                (m.to_dtype(DType::U32).unwrap() * 3.0).unwrap()
            } else {
                m
            })
        }
        MaskKind::Float => {
            let m: Vec<f32> = (0..b * lq * lk)
                .map(|i| {
                    let u = rng.uniform(0.0, 1.0);
                    if i % lk != 0 && u < 0.25 {
                        f32::NEG_INFINITY
                    } else {
                        (u * 2.0 - 1.0) as f32
                    }
                })
                .collect();
            Some(Tensor::from_vec(m, (b, lq, lk), dev).unwrap())
        }
        MaskKind::FloatPerHead => {
            let m = rng.vec(b * heads * lq * lk, -2.0, 2.0);
            Some(Tensor::from_vec(m, (b * heads, lq, lk), dev).unwrap())
        }
    }
}

const KINDS: [MaskKind; 6] = [
    MaskKind::None,
    MaskKind::Bool,
    MaskKind::BoolPerHead,
    MaskKind::BoolU32,
    MaskKind::Float,
    MaskKind::FloatPerHead,
];

#[test]
fn fused_attention_gradient_fd() {
    let mut rng = Rng::new(300);
    // Odd head dim (3), Lq != Lk, B = 2.
    let (b, heads, dh, lq, lk) = (2usize, 2usize, 3usize, 5usize, 7usize);
    let e = heads * dh;
    let q = rng.var(&[b, lq, e], -1.5, 1.5);
    let k = rng.var(&[b, lk, e], -1.5, 1.5);
    let v = rng.var(&[b, lk, e], -1.0, 1.0);
    for kind in KINDS {
        let mask = make_mask(kind, b, heads, lq, lk, &mut rng);
        check_grads(
            &format!("fused sdpa, mask {kind:?}"),
            &[("q", &q), ("k", &k), ("v", &v)],
            || scaled_dot_product_attention(&q, &k, &v, heads, mask.as_ref()),
            40,
            1e-6,
            1e-6,
        );
    }
}

/// Forward output and the gradients of `Σ out ⊙ R` w.r.t. q, k, v.
fn run(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    q: &Var,
    k: &Var,
    v: &Var,
    proj: &Tensor,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor());
    let g = out
        .mul(proj)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let get = |x: &Var| g.get(x.as_tensor()).expect("gradient").clone();
    (out, get(q), get(k), get(v))
}

#[allow(clippy::too_many_arguments)]
fn compare(
    dtype: DType,
    b: usize,
    heads: usize,
    dh: usize,
    lq: usize,
    lk: usize,
    kind: MaskKind,
    tol: f64,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let e = heads * dh;
    let var = |rng: &mut Rng, l: usize| {
        Var::from_tensor(&rng.tensor(&[b, l, e], -2.0, 2.0, dtype)).unwrap()
    };
    let (q, k, v) = (var(&mut rng, lq), var(&mut rng, lk), var(&mut rng, lk));
    let proj = rng.tensor(&[b, lq, e], -1.0, 1.0, dtype);
    let mask = make_mask(kind, b, heads, lq, lk, &mut rng);
    let fused = run(
        |q, k, v| scaled_dot_product_attention(q, k, v, heads, mask.as_ref()).unwrap(),
        &q,
        &k,
        &v,
        &proj,
    );
    let composed = run(
        |q, k, v| scaled_dot_product_attention_composed(q, k, v, heads, mask.as_ref()).unwrap(),
        &q,
        &k,
        &v,
        &proj,
    );
    let what = format!("{dtype:?} b{b} h{heads} dh{dh} lq{lq} lk{lk} {kind:?}");
    assert_close(&fused.0, &composed.0, tol, &format!("{what}: output"));
    assert_close(&fused.1, &composed.1, tol, &format!("{what}: dq"));
    assert_close(&fused.2, &composed.2, tol, &format!("{what}: dk"));
    assert_close(&fused.3, &composed.3, tol, &format!("{what}: dv"));
}

#[test]
fn fused_matches_composed_f64() {
    let sizes = [
        (1usize, 1usize, 1usize, 1usize, 1usize),
        (2, 2, 3, 5, 7),
        (3, 4, 5, 33, 17),
        (1, 4, 8, 300, 225), // several row blocks and backward chunks at B = 1
        (4, 2, 16, 129, 9),
        (2, 3, 7, 1, 40),
    ];
    for (i, &(b, h, dh, lq, lk)) in sizes.iter().enumerate() {
        for kind in KINDS {
            compare(DType::F64, b, h, dh, lq, lk, kind, 1e-11, 400 + i as u64);
        }
    }
}

#[test]
fn fused_matches_composed_f32() {
    let sizes = [
        (2usize, 2usize, 3usize, 5usize, 7usize),
        (4, 4, 32, 256, 225),
        (1, 4, 64, 225, 225),
        (2, 3, 5, 77, 31),
        (1, 8, 32, 100, 512), // the POS decoder's shape: keys a multiple of 16, read unpacked
    ];
    for (i, &(b, h, dh, lq, lk)) in sizes.iter().enumerate() {
        for kind in KINDS {
            compare(DType::F32, b, h, dh, lq, lk, kind, 2e-5, 500 + i as u64);
        }
    }
}

/// A NaN in a key poisons every query row that attends to it, in the fused kernel as in the
/// composed path (and in torch): no silent probability 0.
#[test]
fn a_nan_key_propagates_like_the_composed_path() {
    let mut rng = Rng::new(601);
    let (b, heads, lq, lk, e) = (1usize, 2usize, 3usize, 4usize, 4usize);
    let q = rng.tensor(&[b, lq, e], -1.0, 1.0, DType::F32);
    let mut kv = to_vec(&rng.tensor(&[b, lk, e], -1.0, 1.0, DType::F32));
    kv[2 * e] = f64::NAN; // key 2, first channel (the first head's)
    let kv = Tensor::from_vec(kv, (b, lk, e), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    // Query row 0 does not attend to key 2; the others do.
    let m: Vec<u8> = (0..lq * lk).map(|i| (i / lk == 0 && i % lk == 2) as u8).collect();
    let mask = Tensor::from_vec(m, (b, lq, lk), &Device::Cpu).unwrap();
    let fused = to_vec(&scaled_dot_product_attention(&q, &kv, &kv, heads, Some(&mask)).unwrap());
    let composed = to_vec(&ops::attention::scaled_dot_product_attention_composed(&q, &kv, &kv, heads, Some(&mask)).unwrap());
    for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
        assert_eq!(f.is_nan(), c.is_nan(), "element {i}: fused {f}, composed {c}");
        if !f.is_nan() {
            assert!((f - c).abs() < 1e-5, "element {i}: fused {f}, composed {c}");
        }
    }
    assert!(fused[e..].iter().any(|x| x.is_nan()), "rows attending to the NaN key are NaN: {fused:?}");
}

#[test]
fn fully_masked_rows_are_nan_like_torch() {
    let mut rng = Rng::new(600);
    let (b, heads, lq, lk, e) = (1usize, 2usize, 3usize, 4usize, 4usize);
    let q = rng.tensor(&[b, lq, e], -1.0, 1.0, DType::F32);
    let kv = rng.tensor(&[b, lk, e], -1.0, 1.0, DType::F32);
    // Row 1 masks every key.
    let m: Vec<u8> = (0..lq * lk)
        .map(|i| (i / lk == 1 || i % lk == 3) as u8)
        .collect();
    let mask = Tensor::from_vec(m, (b, lq, lk), &Device::Cpu).unwrap();
    let out = to_vec(&scaled_dot_product_attention(&q, &kv, &kv, heads, Some(&mask)).unwrap());
    for (i, x) in out.iter().enumerate() {
        assert_eq!(x.is_nan(), i / e == 1, "element {i}: {x}");
    }
    // Masked keys get exactly zero weight: editing key 3 changes nothing.
    let mut kv2 = to_vec(&kv);
    for x in &mut kv2[3 * e..4 * e] {
        *x += 7.0;
    }
    let kv2 = Tensor::from_vec(kv2, (b, lk, e), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let out2 = to_vec(&scaled_dot_product_attention(&q, &kv2, &kv2, heads, Some(&mask)).unwrap());
    for (i, (x, y)) in out.iter().zip(&out2).enumerate() {
        assert!(
            x == y || (x.is_nan() && y.is_nan()),
            "element {i}: {x} vs {y}"
        );
    }
}

#[test]
fn rejects_bad_inputs() {
    let mut rng = Rng::new(601);
    let q = rng.tensor(&[2, 3, 8], -1.0, 1.0, DType::F32);
    let k = rng.tensor(&[2, 5, 8], -1.0, 1.0, DType::F32);
    assert!(
        scaled_dot_product_attention(&q, &k, &k, 3, None).is_err(),
        "8 not divisible by 3"
    );
    assert!(scaled_dot_product_attention(&q, &k, &k.narrow(1, 0, 4).unwrap(), 2, None).is_err());
    assert!(scaled_dot_product_attention(
        &q,
        &k.narrow(0, 0, 1).unwrap(),
        &k.narrow(0, 0, 1).unwrap(),
        2,
        None
    )
    .is_err());
    let bad = Tensor::zeros((2, 3, 4), DType::U8, &Device::Cpu).unwrap();
    assert!(scaled_dot_product_attention(&q, &k, &k, 2, Some(&bad)).is_err());
    let int = Tensor::zeros((2, 3, 8), DType::U8, &Device::Cpu).unwrap();
    assert!(scaled_dot_product_attention(&int, &k, &k, 2, None).is_err());
}

/// MultiheadAttention::forward (fused) against forward_composed: output and the gradients of
/// every parameter and input, f64, with and without masks.
#[test]
fn mha_forward_matches_composed_with_gradients() {
    let mut rng = Rng::new(602);
    let (e, heads, b, lq, lk) = (12usize, 3usize, 2usize, 19usize, 11usize);
    let vm = VarMap::new();
    let mha = MultiheadAttention::new(
        e,
        heads,
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu).pp("mha"),
    )
    .unwrap();
    let params: Vec<(String, Var)> = {
        let data = vm.data().lock().unwrap();
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    for (_, p) in &params {
        p.set(&rng.tensor(p.dims(), -0.5, 0.5, DType::F64)).unwrap();
    }
    let q = rng.var(&[b, lq, e], -1.0, 1.0);
    let k = rng.var(&[b, lk, e], -1.0, 1.0);
    let v = rng.var(&[b, lk, e], -1.0, 1.0);
    let proj = rng.tensor(&[b, lq, e], -1.0, 1.0, DType::F64);
    for kind in KINDS {
        let mask = make_mask(kind, b, heads, lq, lk, &mut rng);
        let grads = |fused: bool| {
            let out = if fused {
                mha.forward(&q, &k, &v, mask.as_ref()).unwrap()
            } else {
                mha.forward_composed(&q, &k, &v, mask.as_ref()).unwrap()
            };
            let g = out
                .mul(&proj)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut all = vec![out];
            for x in params.iter().map(|p| &p.1).chain([&q, &k, &v]) {
                all.push(g.get(x.as_tensor()).expect("gradient").clone());
            }
            all
        };
        let (a, c) = (grads(true), grads(false));
        for (i, (x, y)) in a.iter().zip(&c).enumerate() {
            assert_close(x, y, 1e-11, &format!("MHA {kind:?}: tensor {i}"));
        }
    }
}
