//! MultiheadAttention against a direct loop implementation, and boolean-mask behaviour.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, to_vec, Rng};
use ops::attention::MultiheadAttention;

struct Setup {
    mha: MultiheadAttention,
    w_in: Vec<f64>,
    b_in: Vec<f64>,
    w_out: Vec<f64>,
    b_out: Vec<f64>,
}

fn setup(e: usize, heads: usize, rng: &mut Rng) -> Setup {
    let mut vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let mha = MultiheadAttention::new(e, heads, vb.pp("attn")).unwrap();
    let w_in = rng.vec(3 * e * e, -0.5, 0.5);
    let b_in = rng.vec(3 * e, -0.2, 0.2);
    let w_out = rng.vec(e * e, -0.5, 0.5);
    let b_out = rng.vec(e, -0.2, 0.2);
    let t = |v: &Vec<f64>, s: &[usize]| {
        Tensor::from_vec(v.clone(), s, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    vm.set_one("attn.in_proj_weight", t(&w_in, &[3 * e, e]))
        .unwrap();
    vm.set_one("attn.in_proj_bias", t(&b_in, &[3 * e])).unwrap();
    vm.set_one("attn.out_proj.weight", t(&w_out, &[e, e]))
        .unwrap();
    vm.set_one("attn.out_proj.bias", t(&b_out, &[e])).unwrap();
    Setup {
        mha,
        w_in,
        b_in,
        w_out,
        b_out,
    }
}

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
/// torch's MultiheadAttention math written out with loops (f64), `masked[b][i][j]` = not attended.
fn reference(
    s: &Setup,
    e: usize,
    heads: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    b: usize,
    lq: usize,
    lk: usize,
    masked: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> Vec<f64> {
    let dh = e / heads;
    let lin = |x: &[f64], w: &[f64], bias: &[f64], row0: usize| -> Vec<f64> {
        (0..e)
            .map(|o| bias[row0 + o] + (0..e).map(|i| w[(row0 + o) * e + i] * x[i]).sum::<f64>())
            .collect()
    };
    let mut out = Vec::new();
    for bb in 0..b {
        let qp: Vec<Vec<f64>> = (0..lq)
            .map(|i| lin(&q[(bb * lq + i) * e..][..e], &s.w_in, &s.b_in, 0))
            .collect();
        let kp: Vec<Vec<f64>> = (0..lk)
            .map(|j| lin(&k[(bb * lk + j) * e..][..e], &s.w_in, &s.b_in, e))
            .collect();
        let vp: Vec<Vec<f64>> = (0..lk)
            .map(|j| lin(&v[(bb * lk + j) * e..][..e], &s.w_in, &s.b_in, 2 * e))
            .collect();
        for i in 0..lq {
            let mut concat = vec![0f64; e];
            for h in 0..heads {
                let r = h * dh..(h + 1) * dh;
                let logits: Vec<f64> = (0..lk)
                    .map(|j| {
                        if masked(bb, h, i, j) {
                            f64::NEG_INFINITY
                        } else {
                            r.clone().map(|c| qp[i][c] * kp[j][c]).sum::<f64>() / (dh as f64).sqrt()
                        }
                    })
                    .collect();
                let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
                let z: f64 = ex.iter().sum();
                for c in r.clone() {
                    concat[c] = (0..lk).map(|j| ex[j] / z * vp[j][c]).sum();
                }
            }
            out.extend(
                (0..e).map(|o| {
                    s.b_out[o] + (0..e).map(|c| s.w_out[o * e + c] * concat[c]).sum::<f64>()
                }),
            );
        }
    }
    out
}

#[test]
fn matches_loop_reference_with_and_without_mask() {
    let (e, heads, b, lq, lk) = (8usize, 2usize, 2usize, 3usize, 5usize);
    let mut rng = Rng::new(21);
    let s = setup(e, heads, &mut rng);
    let (q, k, v) = (
        rng.vec(b * lq * e, -1.0, 1.0),
        rng.vec(b * lk * e, -1.0, 1.0),
        rng.vec(b * lk * e, -1.0, 1.0),
    );
    let t = |x: &Vec<f64>, l: usize| {
        Tensor::from_vec(x.clone(), (b, l, e), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (tq, tk, tv) = (t(&q, lq), t(&k, lk), t(&v, lk));

    let want = reference(&s, e, heads, &q, &k, &v, b, lq, lk, &|_, _, _, _| false);
    let got = s.mha.forward(&tq, &tk, &tv, None).unwrap();
    assert_close(
        &got,
        &Tensor::from_vec(want, (b, lq, e), &Device::Cpu).unwrap(),
        1e-5,
        "unmasked",
    );

    // (B, Lq, Lk) boolean mask shared by the heads.
    let m3 = |bb: usize, i: usize, j: usize| (bb + 2 * i + j) % 3 == 0;
    let mask: Vec<u8> = (0..b * lq * lk)
        .map(|n| m3(n / (lq * lk), n / lk % lq, n % lk) as u8)
        .collect();
    let mask = Tensor::from_vec(mask, (b, lq, lk), &Device::Cpu).unwrap();
    let want = reference(&s, e, heads, &q, &k, &v, b, lq, lk, &|bb, _, i, j| {
        m3(bb, i, j)
    });
    let got = s.mha.forward(&tq, &tk, &tv, Some(&mask)).unwrap();
    assert_close(
        &got,
        &Tensor::from_vec(want, (b, lq, e), &Device::Cpu).unwrap(),
        1e-5,
        "masked (B,Lq,Lk)",
    );

    // Per-head (B*heads, Lq, Lk) mask, batch-major head order as torch.
    let m4 = |bb: usize, h: usize, i: usize, j: usize| (bb + h + i + 3 * j) % 4 == 1;
    let mask: Vec<u8> = (0..b * heads * lq * lk)
        .map(|n| {
            m4(
                n / (heads * lq * lk),
                n / (lq * lk) % heads,
                n / lk % lq,
                n % lk,
            ) as u8
        })
        .collect();
    let mask = Tensor::from_vec(mask, (b * heads, lq, lk), &Device::Cpu).unwrap();
    let want = reference(&s, e, heads, &q, &k, &v, b, lq, lk, &m4);
    let got = s.mha.forward(&tq, &tk, &tv, Some(&mask)).unwrap();
    assert_close(
        &got,
        &Tensor::from_vec(want, (b, lq, e), &Device::Cpu).unwrap(),
        1e-5,
        "masked (B*H,Lq,Lk)",
    );
}

#[test]
fn masked_keys_get_exactly_zero_weight() {
    let (e, heads, b, lq, lk) = (8usize, 4usize, 2usize, 3usize, 6usize);
    let mut rng = Rng::new(22);
    let s = setup(e, heads, &mut rng);
    let q = rng.tensor(&[b, lq, e], -1.0, 1.0, DType::F32);
    let kv = rng.tensor(&[b, lk, e], -1.0, 1.0, DType::F32);
    let mask: Vec<u8> = (0..b * lq * lk)
        .map(|n| (n % 4 == 0 || n % 7 == 3) as u8)
        .collect();
    let mask_t = Tensor::from_vec(mask.clone(), (b, lq, lk), &Device::Cpu).unwrap();
    let (_, w) = s
        .mha
        .forward_with_weights(&q, &kv, &kv, Some(&mask_t))
        .unwrap();
    assert_eq!(w.dims(), &[b, heads, lq, lk]);
    let wv = to_vec(&w);
    for bb in 0..b {
        for h in 0..heads {
            for i in 0..lq {
                let row = &wv[((bb * heads + h) * lq + i) * lk..][..lk];
                for j in 0..lk {
                    if mask[(bb * lq + i) * lk + j] != 0 {
                        assert_eq!(row[j], 0.0, "masked key {j} has weight {}", row[j]);
                    } else {
                        assert!(row[j] > 0.0);
                    }
                }
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-6);
            }
        }
    }
    // Changing a masked key's value cannot change the output.
    let mut kv2 = to_vec(&kv);
    let j = (0..lk).find(|&j| (0..lq).all(|i| mask[i * lk + j] != 0));
    if let Some(j) = j {
        for c in 0..e {
            kv2[j * e + c] += 5.0;
        }
        let kv2 = Tensor::from_vec(kv2, (b, lk, e), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let a = s
            .mha
            .forward(&q, &kv, &kv, Some(&mask_t))
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap();
        let bo = s
            .mha
            .forward(&q, &kv2, &kv2, Some(&mask_t))
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap();
        assert_close(&a, &bo, 0.0, "masked key edit");
    } else {
        panic!("test mask should fully mask some key for batch 0");
    }
}

#[test]
fn rejects_bad_shapes() {
    let mut rng = Rng::new(23);
    let s = setup(8, 2, &mut rng);
    let q = rng.tensor(&[1, 3, 8], -1.0, 1.0, DType::F32);
    let k = rng.tensor(&[1, 4, 8], -1.0, 1.0, DType::F32);
    assert!(s
        .mha
        .forward(&q, &k, &k.narrow(1, 0, 3).unwrap(), None)
        .is_err());
    assert!(s
        .mha
        .forward(&q, &rng.tensor(&[1, 4, 6], -1.0, 1.0, DType::F32), &k, None)
        .is_err());
    let bad_mask = Tensor::zeros((1, 3, 5), DType::U8, &Device::Cpu).unwrap();
    assert!(s.mha.forward(&q, &k, &k, Some(&bad_mask)).is_err());
    let vm = VarMap::new();
    assert!(MultiheadAttention::new(
        10,
        3,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)
    )
    .is_err());
}
