//! Exact values of bilinear and nearest resizing against torch `F.interpolate` semantics.

mod common;

use candle_core::{DType, Device, Tensor};
use common::assert_values;
use ops::resize::{resize_bilinear, resize_nearest};

fn t4(v: &[f32], h: usize, w: usize) -> Tensor {
    Tensor::from_slice(v, (1, 1, h, w), &Device::Cpu).unwrap()
}

#[test]
fn bilinear_1d_known_values() {
    // torch: F.interpolate([0, 1] -> 4, align_corners=False) = [0, .25, .75, 1]
    let x = t4(&[0.0, 1.0], 1, 2);
    assert_values(
        &resize_bilinear(&x, (1, 4), false).unwrap(),
        &[0.0, 0.25, 0.75, 1.0],
        1e-7,
        "2->4 ac=F",
    );
    // align_corners=True: endpoints fixed, evenly spaced.
    assert_values(
        &resize_bilinear(&x, (1, 4), true).unwrap(),
        &[0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0],
        1e-7,
        "2->4 ac=T",
    );
    // 3 -> 5, align_corners=False: src = (d + .5) * .6 - .5 clamped at 0 and at the last pixel.
    let x = t4(&[0.0, 1.0, 2.0], 3, 1);
    assert_values(
        &resize_bilinear(&x, (5, 1), false).unwrap(),
        &[0.0, 0.4, 1.0, 1.6, 2.0],
        1e-6,
        "3->5",
    );
    // Downsampling 4 -> 2 averages pairs (no antialias); align_corners=True picks the ends.
    let x = t4(&[0.0, 1.0, 2.0, 3.0], 1, 4);
    assert_values(
        &resize_bilinear(&x, (1, 2), false).unwrap(),
        &[0.5, 2.5],
        1e-7,
        "4->2 ac=F",
    );
    assert_values(
        &resize_bilinear(&x, (1, 2), true).unwrap(),
        &[0.0, 3.0],
        1e-7,
        "4->2 ac=T",
    );
    // A single output pixel: ac=True takes pixel 0, ac=False the centre sample.
    assert_values(
        &resize_bilinear(&x, (1, 1), true).unwrap(),
        &[0.0],
        1e-7,
        "4->1 ac=T",
    );
    assert_values(
        &resize_bilinear(&x, (1, 1), false).unwrap(),
        &[1.5],
        1e-7,
        "4->1 ac=F",
    );
}

/// On f(y, x) = 10y + x, bilinear interpolation reproduces f at the (clamped) source
/// coordinates, so every output value is known in closed form for both modes.
#[test]
fn bilinear_2d_on_a_linear_ramp() {
    let (h, w) = (3usize, 4usize);
    let v: Vec<f32> = (0..h * w).map(|i| (10 * (i / w) + i % w) as f32).collect();
    let x = Tensor::from_vec(v, (1, 1, h, w), &Device::Cpu)
        .unwrap()
        .repeat((2, 3, 1, 1))
        .unwrap();
    for &(oh, ow) in &[(7usize, 5usize), (2, 9), (5, 2), (3, 6)] {
        for ac in [false, true] {
            let src = |d: usize, n_in: usize, n_out: usize| -> f64 {
                if n_in == n_out {
                    return d as f64;
                }
                if ac {
                    d as f64 * (n_in - 1) as f64 / (n_out - 1) as f64
                } else {
                    ((d as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5)
                        .clamp(0.0, (n_in - 1) as f64)
                }
            };
            let mut want = Vec::new();
            for _ in 0..6 {
                for i in 0..oh {
                    for j in 0..ow {
                        want.push(10.0 * src(i, h, oh) + src(j, w, ow));
                    }
                }
            }
            let y = resize_bilinear(&x, (oh, ow), ac).unwrap();
            assert_eq!(y.dims(), &[2, 3, oh, ow]);
            assert_values(&y, &want, 1e-5, &format!("ramp {h}x{w}->{oh}x{ow} ac={ac}"));
        }
    }
}

#[test]
fn bilinear_identity_f64_and_errors() {
    let x = t4(&[1.0, 2.0, 3.0, 4.0], 2, 2)
        .to_dtype(DType::F64)
        .unwrap();
    let y = resize_bilinear(&x, (2, 2), false).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    assert_values(&y, &[1.0, 2.0, 3.0, 4.0], 0.0, "identity");
    assert!(resize_bilinear(&x, (0, 2), false).is_err());
    assert!(resize_bilinear(&x.flatten_all().unwrap(), (2, 2), false).is_err());
    assert!(resize_bilinear(&x.to_dtype(DType::U8).unwrap(), (3, 3), false).is_err());
}

#[test]
fn nearest_uses_torch_floor_mapping() {
    // 3 -> 5: floor(d * 0.6) = [0, 0, 1, 1, 2] (PIL's centre rule would give [0, 1, 1, 2, 2]).
    let x = t4(&[0.0, 1.0, 2.0], 1, 3);
    assert_values(
        &resize_nearest(&x, (1, 5)).unwrap(),
        &[0.0, 0.0, 1.0, 1.0, 2.0],
        0.0,
        "3->5",
    );
    // 5 -> 3: floor(d * 5/3) = [0, 1, 3].
    let x = t4(&[0.0, 1.0, 2.0, 3.0, 4.0], 5, 1);
    assert_values(
        &resize_nearest(&x, (3, 1)).unwrap(),
        &[0.0, 1.0, 3.0],
        0.0,
        "5->3",
    );
    // Integer labels keep their dtype; both axes at once.
    let lab = Tensor::new(&[[[[1u8, 2], [3, 255]]]], &Device::Cpu).unwrap();
    let y = resize_nearest(&lab, (3, 4)).unwrap();
    assert_eq!(y.dtype(), DType::U8);
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
        vec![1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 255, 255]
    );
    assert!(resize_nearest(&lab, (0, 4)).is_err());
}

/// `<resize(x), y> = <x, adjoint(y)>` for up- and downsampling, both corner modes, an axis left
/// unchanged, and f64 to leave rounding out of it.
#[test]
fn the_adjoint_satisfies_the_dot_product_identity() {
    let dev = Device::Cpu;
    let wave = |n: usize, f: f64, shape: (usize, usize, usize, usize)| -> Tensor {
        (Tensor::arange(0u32, n as u32, &dev).unwrap().to_dtype(DType::F64).unwrap() * f).unwrap().sin().unwrap().reshape(shape).unwrap()
    };
    for (hw, out, ac) in [((7, 9), (30, 41), false), ((7, 9), (30, 41), true), ((32, 20), (9, 13), false), ((5, 6), (5, 17), false), ((16, 16), (64, 64), false)] {
        let x = wave(2 * 3 * hw.0 * hw.1, 0.71, (2, 3, hw.0, hw.1));
        let y = wave(2 * 3 * out.0 * out.1, 1.37, (2, 3, out.0, out.1));
        let lhs = (ops::resize::resize_bilinear(&x, out, ac).unwrap() * &y).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let adj = ops::resize::resize_bilinear_adjoint(&y, hw, ac).unwrap();
        assert_eq!(adj.dims(), &[2, 3, hw.0, hw.1]);
        let rhs = (&x * adj).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!((lhs - rhs).abs() <= 1e-9 * lhs.abs().max(1.0), "{hw:?} -> {out:?} ac={ac}: {lhs} vs {rhs}");
    }
}

/// The CPU kernel (two taps per axis) against the dense-matrix path it replaced: values, the
/// adjoint and the gradients, f32 and f64, up/down/one axis unchanged/size 1, both corner modes.
#[test]
fn the_kernel_matches_the_matrix_products() {
    use candle_core::Var;
    use ops::resize::{resize_bilinear_adjoint, resize_bilinear_adjoint_matmul, resize_bilinear_matmul};
    let dev = Device::Cpu;
    let cases = [((7, 9), (30, 41)), ((32, 20), (9, 13)), ((5, 6), (5, 17)), ((12, 4), (3, 4)), ((1, 1), (4, 3)), ((6, 5), (1, 1)), ((120, 120), (15, 15))];
    for dt in [DType::F64, DType::F32] {
        let tol = if dt == DType::F64 { 1e-12 } else { 2e-6 };
        for (i, &(hw, out)) in cases.iter().enumerate() {
            for ac in [false, true] {
                let what = format!("{dt:?} {hw:?} -> {out:?} ac={ac}");
                let n = 2 * 3 * hw.0 * hw.1;
                let x = (Tensor::arange(0u32, n as u32, &dev).unwrap().to_dtype(dt).unwrap() * (0.37 + i as f64)).unwrap().sin().unwrap();
                let x = Var::from_tensor(&x.reshape((2, 3, hw.0, hw.1)).unwrap()).unwrap();
                let m = 2 * 3 * out.0 * out.1;
                let proj = (Tensor::arange(0u32, m as u32, &dev).unwrap().to_dtype(dt).unwrap() * 1.3).unwrap().cos().unwrap().reshape((2, 3, out.0, out.1)).unwrap();
                let kernel = resize_bilinear(x.as_tensor(), out, ac).unwrap();
                let dense = resize_bilinear_matmul(x.as_tensor(), out, ac).unwrap();
                assert_eq!(kernel.dims(), dense.dims(), "{what}");
                assert_values(&kernel, &common::to_vec(&dense), tol, &format!("{what}: values"));
                let grad = |y: &Tensor| (y * &proj).unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().clone();
                let (gk, gd) = (grad(&kernel), grad(&dense));
                assert_values(&gk, &common::to_vec(&gd), tol, &format!("{what}: gradient"));
                let adj = resize_bilinear_adjoint(&proj, hw, ac).unwrap();
                let adj_dense = resize_bilinear_adjoint_matmul(&proj, hw, ac).unwrap();
                assert_eq!(adj.dims(), &[2, 3, hw.0, hw.1], "{what}");
                assert_values(&adj, &common::to_vec(&adj_dense), tol, &format!("{what}: adjoint"));
                // The adjoint's own gradient is the resize.
                let p = Var::from_tensor(&proj).unwrap();
                let xt = x.as_tensor().detach();
                let g = (resize_bilinear_adjoint(p.as_tensor(), hw, ac).unwrap() * &xt).unwrap().sum_all().unwrap().backward().unwrap();
                let want = resize_bilinear_matmul(&xt, out, ac).unwrap();
                assert_values(g.get(&p).unwrap(), &common::to_vec(&want), tol, &format!("{what}: adjoint gradient"));
            }
        }
    }
}

/// The token-layout resize equals the plane kernel on the same map to the bit, forward and
/// gradient, over up/down/one axis unchanged/size 1, both corner modes, channel counts that
/// split into one or several blocks; and names a misfit.
#[test]
fn the_token_kernel_equals_the_plane_kernel() {
    use candle_core::Var;
    use ops::nn::{map_to_tokens, tokens_to_map};
    use ops::resize::resize_bilinear_tokens;
    let dev = Device::Cpu;
    let cases = [((7, 9), (30, 41), 3), ((32, 32), (15, 15), 128), ((8, 8), (15, 15), 40), ((5, 6), (5, 17), 17), ((12, 4), (3, 4), 2), ((1, 1), (4, 3), 1), ((6, 5), (1, 1), 33)];
    for dt in [DType::F64, DType::F32] {
        for (i, &(hw, out, c)) in cases.iter().enumerate() {
            for ac in [false, true] {
                let what = format!("{dt:?} {hw:?} -> {out:?} C={c} ac={ac}");
                let n = 3 * c * hw.0 * hw.1;
                let x = (Tensor::arange(0u32, n as u32, &dev).unwrap().to_dtype(dt).unwrap() * (0.37 + i as f64)).unwrap().sin().unwrap();
                let x = Var::from_tensor(&x.reshape((3, c, hw.0, hw.1)).unwrap()).unwrap();
                let tokens = Var::from_tensor(&map_to_tokens(x.as_tensor()).unwrap()).unwrap();
                let m = 3 * c * out.0 * out.1;
                let proj = (Tensor::arange(0u32, m as u32, &dev).unwrap().to_dtype(dt).unwrap() * 1.3).unwrap().cos().unwrap().reshape((3, c, out.0, out.1)).unwrap();
                let plane = resize_bilinear(x.as_tensor(), out, ac).unwrap();
                let tok = resize_bilinear_tokens(tokens.as_tensor(), hw, out, ac).unwrap();
                assert_eq!(tok.dims(), &[3, out.0 * out.1, c], "{what}");
                assert_values(&tokens_to_map(&tok, out).unwrap(), &common::to_vec(&plane), 0.0, &format!("{what}: values"));
                let gp = (&plane * &proj).unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().clone();
                let proj_t = map_to_tokens(&proj).unwrap();
                let gt = (&tok * &proj_t).unwrap().sum_all().unwrap().backward().unwrap().get(&tokens).unwrap().clone();
                assert_values(&tokens_to_map(&gt, hw).unwrap(), &common::to_vec(&gp), 0.0, &format!("{what}: gradient"));
            }
        }
    }
    let t = Tensor::zeros((2, 12, 4), DType::F32, &dev).unwrap();
    let err = resize_bilinear_tokens(&t, (3, 5), (6, 6), false).unwrap_err().to_string();
    assert!(err.contains("12 tokens") && err.contains("3x5"), "{err}");
    assert!(resize_bilinear_tokens(&t.flatten_all().unwrap(), (3, 4), (6, 6), false).unwrap_err().to_string().contains("(B, h·w, C)"));
}
