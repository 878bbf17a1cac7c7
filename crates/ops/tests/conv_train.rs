//! The trainable convolution and GroupNorm ops (`ops::conv::{conv2d_trainable, group_norm}`):
//! f64 central-difference gradients, and f32 forward/backward equal to candle's conv2d and to
//! the composed GroupNorm on the shapes that take each fast path.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{check_grads, to_vec, Rng};
use ops::conv::{conv2d_trainable, group_norm};

const EPS: f64 = 1e-6;
const TOL: f64 = 1e-6;

/// max |a - b| / max(1, max |b|).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (va, vb) = (to_vec(a), to_vec(b));
    let scale = vb.iter().fold(1f64, |m, v| m.max(v.abs()));
    va.iter().zip(&vb).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max) / scale
}

/// candle's conv2d with explicit (possibly asymmetric) zero padding: the reference.
fn candle_conv(x: &Tensor, w: &Tensor, [pt, pb, pl, pr]: [usize; 4]) -> Tensor {
    x.pad_with_zeros(2, pt, pb).unwrap().pad_with_zeros(3, pl, pr).unwrap().conv2d(w, 0, 1, 1, 1).unwrap()
}

#[test]
fn conv_gradients_f64() {
    let mut rng = Rng::new(7);
    // (x shape, w shape, padding)
    let cases: [(&[usize], &[usize], [usize; 4]); 5] = [
        (&[2, 3, 5, 6], &[4, 3, 3, 3], [1, 1, 1, 1]),
        (&[1, 2, 6, 5], &[3, 2, 3, 3], [0, 2, 1, 0]),
        (&[2, 4, 4, 3], &[5, 4, 1, 1], [0, 0, 0, 0]),
        (&[1, 3, 5, 5], &[2, 3, 3, 2], [1, 1, 0, 1]),
        (&[2, 2, 5, 7], &[3, 2, 5, 5], [2, 2, 2, 2]),
    ];
    for (xs, ws, pad) in cases {
        let x = rng.var(xs, -1.0, 1.0);
        let w = rng.var(ws, -1.0, 1.0);
        let what = format!("conv2d_trainable x {xs:?} w {ws:?} pad {pad:?}");
        // The op's value first: the reference loops against candle's conv2d in f64.
        let y = conv2d_trainable(x.as_tensor(), w.as_tensor(), None, pad).unwrap();
        let r = candle_conv(x.as_tensor(), w.as_tensor(), pad);
        assert!(rel_err(&y, &r) < 1e-12, "{what}: forward differs from candle");
        check_grads(
            &what,
            &[("x", &x), ("w", &w)],
            || conv2d_trainable(x.as_tensor(), w.as_tensor(), None, pad),
            200,
            EPS,
            TOL,
        );
    }
}

#[test]
fn conv_matches_candle_f32_forward_and_backward() {
    let mut rng = Rng::new(11);
    // Shifted-gemm path (Cin >= 16, wide rows), im2col path (few channels), 1x1 direct path,
    // asymmetric padding, and a non-square kernel.
    let cases: [(&[usize], &[usize], [usize; 4]); 6] = [
        (&[2, 32, 13, 24], &[24, 32, 3, 3], [1, 1, 1, 1]),
        (&[3, 5, 9, 11], &[7, 5, 3, 3], [1, 1, 1, 1]),
        (&[2, 24, 16, 16], &[64, 24, 1, 1], [0, 0, 0, 0]),
        (&[1, 16, 10, 30], &[20, 16, 3, 3], [0, 2, 2, 0]),
        (&[2, 18, 12, 26], &[17, 18, 3, 1], [1, 1, 0, 0]),
        (&[4, 64, 32, 32], &[64, 64, 3, 3], [1, 1, 1, 1]),
    ];
    for (xs, ws, pad) in cases {
        let what = format!("x {xs:?} w {ws:?} pad {pad:?}");
        let x = Var::from_tensor(&rng.tensor(xs, -1.0, 1.0, DType::F32)).unwrap();
        let w = Var::from_tensor(&rng.tensor(ws, -0.3, 0.3, DType::F32)).unwrap();
        let y = conv2d_trainable(x.as_tensor(), w.as_tensor(), None, pad).unwrap();
        let yr = candle_conv(x.as_tensor(), w.as_tensor(), pad);
        assert!(rel_err(&y, &yr) < 1e-5, "{what}: forward rel err {}", rel_err(&y, &yr));
        let proj = rng.tensor(y.dims(), -1.0, 1.0, DType::F32);
        let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&yr * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("dx", &x), ("dw", &w)] {
            let (a, b) = (g.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
            let e = rel_err(a, b);
            assert!(e < 1e-5, "{what}: {name} rel err {e}");
        }
    }
}

#[test]
fn conv_with_bias_gradients_f64_and_f32() {
    let mut rng = Rng::new(13);
    for (xs, ws, pad) in [([2usize, 3, 5, 6], [4usize, 3, 3, 3], [1usize; 4]), ([2, 4, 4, 3], [5, 4, 1, 1], [0; 4])] {
        let x = rng.var(&xs, -1.0, 1.0);
        let w = rng.var(&ws, -1.0, 1.0);
        let b = rng.var(&[ws[0]], -1.0, 1.0);
        check_grads(
            &format!("conv2d_trainable with bias x {xs:?} w {ws:?}"),
            &[("x", &x), ("w", &w), ("b", &b)],
            || conv2d_trainable(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), pad),
            200,
            EPS,
            TOL,
        );
    }
    // f32 fast path against candle conv2d + broadcast bias.
    let x = Var::from_tensor(&rng.tensor(&[3, 64, 16, 16], -1.0, 1.0, DType::F32)).unwrap();
    let w = Var::from_tensor(&rng.tensor(&[48, 64, 1, 1], -0.3, 0.3, DType::F32)).unwrap();
    let b = Var::from_tensor(&rng.tensor(&[48], -1.0, 1.0, DType::F32)).unwrap();
    let y = conv2d_trainable(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), [0; 4]).unwrap();
    let yr = candle_conv(x.as_tensor(), w.as_tensor(), [0; 4])
        .broadcast_add(&b.as_tensor().reshape((1, 48, 1, 1)).unwrap())
        .unwrap();
    assert!(rel_err(&y, &yr) < 1e-5);
    let proj = rng.tensor(y.dims(), -1.0, 1.0, DType::F32);
    let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (&yr * &proj).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("dx", &x), ("dw", &w), ("db", &b)] {
        let e = rel_err(g.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
        assert!(e < 1e-5, "{name} rel err {e}");
    }
}

#[test]
fn conv_constant_input_gets_no_gradient_but_weight_does() {
    let mut rng = Rng::new(12);
    let x = rng.tensor(&[2, 24, 8, 8], -1.0, 1.0, DType::F32);
    let w = Var::from_tensor(&rng.tensor(&[16, 24, 1, 1], -1.0, 1.0, DType::F32)).unwrap();
    let y = conv2d_trainable(&x, w.as_tensor(), None, [0; 4]).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none());
    let dw = g.get(w.as_tensor()).unwrap();
    // d(sum y)/dw[co, ci] = Σ_{n, p} x[n, ci, p], the same for every co.
    let expect = x.sum((0, 2, 3)).unwrap().reshape((1, 24, 1, 1)).unwrap().broadcast_as((16, 24, 1, 1)).unwrap();
    assert!(rel_err(dw, &expect) < 1e-5);
}

#[test]
fn conv_bad_inputs_are_errors() {
    let x = Tensor::zeros((1, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d_trainable(&x, &w, None, [1; 4]).is_err(), "channel mismatch");
    let w = Tensor::zeros((4, 3, 3, 3), DType::F64, &Device::Cpu).unwrap();
    assert!(conv2d_trainable(&x, &w, None, [1; 4]).is_err(), "dtype mismatch");
    let w = Tensor::zeros((4, 3, 7, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d_trainable(&x, &w, None, [0; 4]).is_err(), "kernel larger than the input");
    let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d_trainable(&x, &w, Some(&b), [1; 4]).is_err(), "bias length");
}

#[test]
fn group_norm_gradients_f64() {
    let mut rng = Rng::new(21);
    for (shape, groups) in [([2usize, 6, 3, 4], 3usize), ([1, 4, 5, 2], 4), ([3, 8, 2, 2], 2)] {
        let x = rng.var(&shape, -2.0, 2.0);
        let w = rng.var(&[shape[1]], 0.5, 1.5);
        let b = rng.var(&[shape[1]], -0.5, 0.5);
        check_grads(
            &format!("group_norm {shape:?} groups {groups}"),
            &[("x", &x), ("weight", &w), ("bias", &b)],
            || group_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), groups, 1e-5),
            200,
            EPS,
            TOL,
        );
    }
}

#[test]
fn group_norm_matches_composed_f32() {
    let mut rng = Rng::new(22);
    let dev = Device::Cpu;
    for (shape, groups) in [([4usize, 64, 32, 32], 32usize), ([2, 256, 8, 8], 32), ([3, 12, 5, 7], 4)] {
        let c = shape[1];
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let gn = ops::nn::GroupNorm::new(groups, c, 1e-5, vb).unwrap();
        let (w, b) = {
            let data = vm.data().lock().unwrap();
            (data["weight"].clone(), data["bias"].clone())
        };
        w.set(&rng.tensor(&[c], 0.5, 1.5, DType::F32)).unwrap();
        b.set(&rng.tensor(&[c], -0.5, 0.5, DType::F32)).unwrap();
        // An offset input, as conv outputs are, to exercise the two-pass variance.
        let x = Var::from_tensor(&(rng.tensor(&shape, -1.0, 1.0, DType::F32) + 3.0).unwrap()).unwrap();
        let y = group_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), groups, 1e-5).unwrap();
        let yr = gn.forward(x.as_tensor()).unwrap();
        let what = format!("group_norm {shape:?} groups {groups}");
        assert!(rel_err(&y, &yr) < 1e-5, "{what}: forward rel err {}", rel_err(&y, &yr));
        let proj = rng.tensor(&shape, -1.0, 1.0, DType::F32);
        let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&yr * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("dx", &x), ("dweight", &w), ("dbias", &b)] {
            let e = rel_err(g.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
            assert!(e < 1e-4, "{what}: {name} rel err {e}");
        }
    }
}

#[test]
fn group_norm_bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 6, 2, 2), DType::F32, &dev).unwrap();
    let w = Tensor::ones(6, DType::F32, &dev).unwrap();
    assert!(group_norm(&x, &w, &w, 4, 1e-5).is_err(), "6 channels in 4 groups");
    assert!(group_norm(&x.flatten_all().unwrap(), &w, &w, 3, 1e-5).is_err(), "not 4-D");
    let w5 = Tensor::ones(5, DType::F32, &dev).unwrap();
    assert!(group_norm(&x, &w5, &w, 3, 1e-5).is_err(), "weight length");
}

/// The tap-wise matrix-product convolution (the path off the CPU) against the CPU kernels, value
/// and gradients of input, weight and bias, in f64, on odd shapes, asymmetric padding and 1×1.
#[test]
fn conv_by_matmul_matches_the_cpu_kernels_f64() {
    let mut rng = Rng::new(23);
    let cases: [(&[usize], &[usize], [usize; 4]); 4] = [
        (&[2, 3, 5, 6], &[4, 3, 3, 3], [1, 1, 1, 1]),
        (&[1, 2, 6, 5], &[3, 2, 3, 3], [0, 2, 1, 0]),
        (&[2, 4, 4, 3], &[5, 4, 1, 1], [0, 0, 0, 0]),
        (&[1, 3, 5, 5], &[2, 3, 3, 2], [1, 1, 0, 1]),
    ];
    for (xs, ws, pad) in cases {
        let x = rng.var(xs, -1.0, 1.0);
        let w = rng.var(ws, -1.0, 1.0);
        let b = rng.var(&ws[..1], -1.0, 1.0);
        let what = format!("conv2d_by_matmul x {xs:?} w {ws:?} pad {pad:?}");
        let run = |matmul: bool| {
            let f = if matmul { ops::conv::conv2d_by_matmul } else { conv2d_trainable };
            let y = f(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), pad).unwrap();
            let weights = Tensor::arange(0f64, y.elem_count() as f64, y.device()).unwrap().reshape(y.dims()).unwrap().cos().unwrap();
            let g = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let grads = [&x, &w, &b].map(|v| g.get(v).expect("gradient").clone());
            (y, grads)
        };
        let (y, g) = run(true);
        let (y_ref, g_ref) = run(false);
        assert!(rel_err(&y, &y_ref) < 1e-12, "{what}: forward");
        for (name, (a, r)) in ["x", "w", "bias"].iter().zip(g.iter().zip(&g_ref)) {
            assert!(rel_err(a, r) < 1e-12, "{what}: gradient of {name}");
        }
    }
}

#[test]
fn conv_by_matmul_rejects_a_weight_that_does_not_fit() {
    let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let e = ops::conv::conv2d_by_matmul(&x, &w, None, [1; 4]).unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
}
