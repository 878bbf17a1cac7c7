mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{rand_tensor, rect_masks, rng, scalar, to_vec_f64};
use losses::mask::{bce_with_logits, dice_loss, sigmoid_bce_loss};
use losses::stage1::point_mask_losses;

/// Analytic gradient of the point BCE: d/dx_{k,p} = (sigmoid(x) − t) / (P · num_masks).
#[test]
fn bce_gradient_is_sigmoid_minus_target() {
    let mut g = rng(2);
    let (n, p, num_masks) = (3usize, 7usize, 2.0);
    let x = Var::from_tensor(&rand_tensor(&mut g, &[n, p], -30.0, 30.0, DType::F64)).unwrap();
    let t = rand_tensor(&mut g, &[n, p], 0.0, 1.0, DType::F64);
    let loss = sigmoid_bce_loss(x.as_tensor(), &t, num_masks).unwrap();
    let grad = loss.backward().unwrap();
    let gx = to_vec_f64(grad.get(x.as_tensor()).unwrap());
    let (xv, tv) = (to_vec_f64(x.as_tensor()), to_vec_f64(&t));
    for i in 0..n * p {
        let want = (1.0 / (1.0 + (-xv[i]).exp()) - tv[i]) / (p as f64 * num_masks);
        assert!((gx[i] - want).abs() < 1e-12, "grad[{i}] {} vs {want}", gx[i]);
    }
    // Large logits stay finite (no exp overflow).
    let big = Tensor::new(&[[1000f64, -1000.0]], &Device::Cpu).unwrap();
    let tgt = Tensor::new(&[[0f64, 1.0]], &Device::Cpu).unwrap();
    let v = to_vec_f64(&bce_with_logits(&big, &tgt).unwrap());
    assert_eq!(v, vec![1000.0, 1000.0]);
}

/// Central differences of 5·BCE + 5·dice through the point sampling, w.r.t. the low-resolution
/// logits of the matched masks (f64, where differences are accurate).
#[test]
fn mask_loss_gradient_matches_finite_differences() {
    let mut g = rng(13);
    let (n, h, w, p) = (2usize, 4usize, 5usize, 60usize);
    let x0 = rand_tensor(&mut g, &[n, h, w], -3.0, 3.0, DType::F64);
    let masks = rect_masks(&mut g, n, 4 * h, 4 * w).to_dtype(DType::F64).unwrap();
    let coords = rand_tensor(&mut g, &[n, p, 2], 0.02, 0.98, DType::F32);
    let num_masks = 3.0;
    let f = |x: &Tensor| -> Tensor {
        let (m, d) = point_mask_losses(x, &masks, &coords, num_masks).unwrap();
        ((m * 5.0).unwrap() + (d * 5.0).unwrap()).unwrap()
    };
    let var = Var::from_tensor(&x0).unwrap();
    let grads = f(var.as_tensor()).backward().unwrap();
    let analytic = to_vec_f64(grads.get(var.as_tensor()).unwrap());
    let base = to_vec_f64(&x0);
    let eps = 1e-6;
    let mut nonzero = 0;
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let fp = scalar(&f(&Tensor::from_vec(plus, (n, h, w), &Device::Cpu).unwrap()));
        let fm = scalar(&f(&Tensor::from_vec(minus, (n, h, w), &Device::Cpu).unwrap()));
        let numeric = (fp - fm) / (2.0 * eps);
        assert!(
            (analytic[i] - numeric).abs() <= 1e-6 * numeric.abs() + 1e-8,
            "d/dx[{i}]: analytic {} vs numeric {numeric}",
            analytic[i]
        );
        if numeric.abs() > 1e-6 {
            nonzero += 1;
        }
    }
    assert!(nonzero > base.len() / 2, "the check must exercise real gradients ({nonzero} non-zero)");
}

/// The dice term on its own against its closed form: with s = σ(x), A = 2Σst + 1, B = Σs + Σt + 1,
/// dL/dx = −σ'(x)·(2t·B − A)/B² / num_masks.
#[test]
fn dice_gradient_matches_closed_form() {
    let mut g = rng(17);
    let (n, p) = (2usize, 9usize);
    let x = Var::from_tensor(&rand_tensor(&mut g, &[n, p], -4.0, 4.0, DType::F64)).unwrap();
    let t = rand_tensor(&mut g, &[n, p], 0.0, 1.0, DType::F64);
    let gx = to_vec_f64(dice_loss(x.as_tensor(), &t, 1.0).unwrap().backward().unwrap().get(x.as_tensor()).unwrap());
    let (xv, tv) = (to_vec_f64(x.as_tensor()), to_vec_f64(&t));
    for k in 0..n {
        let s: Vec<f64> = (0..p).map(|i| 1.0 / (1.0 + (-xv[k * p + i]).exp())).collect();
        let a = 2.0 * (0..p).map(|i| s[i] * tv[k * p + i]).sum::<f64>() + 1.0;
        let b = s.iter().sum::<f64>() + (0..p).map(|i| tv[k * p + i]).sum::<f64>() + 1.0;
        for i in 0..p {
            let want = -s[i] * (1.0 - s[i]) * (2.0 * tv[k * p + i] * b - a) / (b * b);
            assert!((gx[k * p + i] - want).abs() < 1e-12, "dice grad [{k},{i}]");
        }
    }
}
