//! The fused softmax and LayerNorm kernels against their composed versions: forward and every
//! gradient, f32 and f64, sizes spanning one to many parallel tasks, odd widths, masked rows;
//! the fused linear against `candle_nn::Linear` (both forward paths: row chunks, and the
//! transposed weight split by columns for few rows) and by finite differences. (Softmax and
//! LayerNorm finite-difference checks are in gradcheck.rs, which goes through the fused paths.)

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Module;
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, check_grads, Rng};
use ops::nn::{complement_pair, complement_pair_composed, linear, linear_relu, sigmoid_dice_sums, sigmoid_dice_sums_composed, softmax, softmax_composed, LayerNorm};

fn grads_of(out: &Tensor, proj: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
    let g = out
        .mul(proj)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    vars.iter()
        .map(|v| g.get(v.as_tensor()).expect("gradient").clone())
        .collect()
}

#[test]
fn fused_softmax_matches_composed() {
    let mut rng = Rng::new(700);
    for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-6)] {
        for shape in [
            vec![1usize],
            vec![3, 5],
            vec![2, 3, 17],
            vec![4, 300, 225],
            vec![7, 1],
        ] {
            let x = Var::from_tensor(&rng.tensor(&shape, -4.0, 4.0, dtype)).unwrap();
            let proj = rng.tensor(&shape, -1.0, 1.0, dtype);
            let last = shape.len() - 1;
            let a = softmax(&x, last).unwrap();
            let b = softmax_composed(&x, last).unwrap();
            let what = format!("softmax {dtype:?} {shape:?}");
            assert_close(&a, &b, tol, &what);
            let (ga, gb) = (grads_of(&a, &proj, &[&x]), grads_of(&b, &proj, &[&x]));
            assert_close(&ga[0], &gb[0], tol, &format!("{what} grad"));
        }
    }
    // -inf entries get weight 0; an all -inf row is NaN in both.
    let x = Tensor::new(
        &[[0f32, f32::NEG_INFINITY, 1.0], [f32::NEG_INFINITY; 3]],
        &Device::Cpu,
    )
    .unwrap();
    let a = common::to_vec(&softmax(&x, 1).unwrap());
    let b = common::to_vec(&softmax_composed(&x, 1).unwrap());
    assert_eq!(a[1], 0.0);
    assert!((a[0] - b[0]).abs() < 1e-7 && (a[2] - b[2]).abs() < 1e-7);
    assert!(a[3..].iter().all(|v| v.is_nan()) && b[3..].iter().all(|v| v.is_nan()));
    // A NaN logit poisons its row in both, and only its row.
    for dtype in [DType::F32, DType::F64] {
        let x = Tensor::new(&[[0f32, f32::NAN, 1.0], [0.5, 1.0, 2.0]], &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let a = common::to_vec(&softmax(&x, 1).unwrap());
        let b = common::to_vec(&softmax_composed(&x, 1).unwrap());
        assert!(a[..3].iter().all(|v| v.is_nan()) && b[..3].iter().all(|v| v.is_nan()), "{dtype:?}: {a:?} vs {b:?}");
        assert!(a[3..].iter().zip(&b[3..]).all(|(p, q)| (p - q).abs() < 1e-6), "{dtype:?}: {a:?} vs {b:?}");
    }
}

#[test]
fn fused_layer_norm_matches_composed() {
    let mut rng = Rng::new(701);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for shape in [
            vec![5usize],
            vec![3, 7],
            vec![2, 3, 17],
            vec![4, 1024, 128],
            vec![1, 3600, 256],
        ] {
            let d = *shape.last().unwrap();
            let vm = VarMap::new();
            let ln =
                LayerNorm::new(d, 1e-5, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
            let vars: Vec<Var> = {
                let data = vm.data().lock().unwrap();
                let mut v: Vec<(String, Var)> =
                    data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v.into_iter().map(|(_, v)| v).collect()
            };
            for v in &vars {
                v.set(&rng.tensor(v.dims(), 0.5, 1.5, dtype)).unwrap();
            }
            let x = Var::from_tensor(&rng.tensor(&shape, -3.0, 3.0, dtype)).unwrap();
            let proj = rng.tensor(&shape, -1.0, 1.0, dtype);
            let a = ln.forward(&x).unwrap();
            let b = ln.forward_composed(&x).unwrap();
            let what = format!("LayerNorm {dtype:?} {shape:?}");
            assert_close(&a, &b, tol, &what);
            let all: Vec<&Var> = vars.iter().chain([&x]).collect();
            let (ga, gb) = (grads_of(&a, &proj, &all), grads_of(&b, &proj, &all));
            for (i, (p, q)) in ga.iter().zip(&gb).enumerate() {
                // Parameter gradients sum over many rows: scale the tolerance with them.
                let scale = common::to_vec(q).iter().fold(1f64, |m, v| m.max(v.abs()));
                assert_close(p, q, tol * scale, &format!("{what} grad {i}"));
            }
        }
    }
}

/// `LN(x + r)` fused against the composed norm of the sum: values and the gradients of x, r,
/// weight and bias; a shape mismatch is refused.
#[test]
fn fused_residual_layer_norm_matches_composed() {
    let mut rng = Rng::new(705);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for shape in [vec![5usize], vec![3, 7], vec![2, 3, 17], vec![4, 1024, 128], vec![1, 3600, 256]] {
            let d = *shape.last().unwrap();
            let vm = VarMap::new();
            let ln = LayerNorm::new(d, 1e-5, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
            let mut vars: Vec<(String, Var)> = vm.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            let vars: Vec<Var> = vars.into_iter().map(|(_, v)| v).collect();
            for v in &vars {
                v.set(&rng.tensor(v.dims(), 0.5, 1.5, dtype)).unwrap();
            }
            let x = Var::from_tensor(&rng.tensor(&shape, -3.0, 3.0, dtype)).unwrap();
            let r = Var::from_tensor(&rng.tensor(&shape, -2.0, 2.0, dtype)).unwrap();
            let proj = rng.tensor(&shape, -1.0, 1.0, dtype);
            let a = ln.forward_residual(&x, &r).unwrap();
            let b = ln.forward_composed(&(x.as_tensor() + r.as_tensor()).unwrap()).unwrap();
            let what = format!("residual LayerNorm {dtype:?} {shape:?}");
            assert_close(&a, &b, tol, &what);
            let all: Vec<&Var> = vars.iter().chain([&x, &r]).collect();
            let (ga, gb) = (grads_of(&a, &proj, &all), grads_of(&b, &proj, &all));
            for (i, (p, q)) in ga.iter().zip(&gb).enumerate() {
                let scale = common::to_vec(q).iter().fold(1f64, |m, v| m.max(v.abs()));
                assert_close(p, q, tol * scale, &format!("{what} grad {i}"));
            }
        }
    }
    let vm = VarMap::new();
    let ln = LayerNorm::new(4, 1e-5, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let x = rng.tensor(&[3, 4], -1.0, 1.0, DType::F32);
    let err = ln.forward_residual(&x, &rng.tensor(&[2, 4], -1.0, 1.0, DType::F32)).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

/// The fused self-alignment gate against the composed one, f32 and f64, sizes spanning one to
/// several tasks; a tracked input takes the composed path and gets its gradient.
#[test]
fn spatial_pool_gate_matches_composed() {
    use ops::nn::{spatial_pool_gate, spatial_pool_gate_composed};
    let mut rng = Rng::new(707);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for shape in [[1usize, 1, 1, 1], [2, 3, 2, 3], [1, 512, 60, 60], [2, 40, 7, 33]] {
            let x = rng.tensor(&shape, -2.0, 2.0, dtype);
            let what = format!("spatial_pool_gate {dtype:?} {shape:?}");
            assert_close(&spatial_pool_gate(&x).unwrap(), &spatial_pool_gate_composed(&x).unwrap(), tol, &what);
        }
    }
    let x = Var::from_tensor(&rng.tensor(&[2, 4, 3, 5], -1.0, 1.0, DType::F64)).unwrap();
    let y = spatial_pool_gate(&x).unwrap();
    assert_close(&y, &spatial_pool_gate_composed(&x).unwrap(), 0.0, "tracked input");
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(x.as_tensor()).is_some(), "a tracked input gets a gradient");
    assert!(spatial_pool_gate(&rng.tensor(&[2, 3, 4], -1.0, 1.0, DType::F32)).is_err());
}

/// Map <-> tokens: the same values as candle's transposition, inverse of each other, with the
/// gradient carried back through both; non-contiguous inputs and a token count that does not
/// fit the map.
#[test]
fn map_tokens_round_trip_with_gradients() {
    use ops::nn::{map_to_tokens, tokens_to_map};
    let mut rng = Rng::new(708);
    for dtype in [DType::F32, DType::F64] {
        for (b, c, h, w) in [(1usize, 1usize, 1usize, 1usize), (2, 3, 5, 7), (1, 256, 60, 60), (3, 40, 33, 17)] {
            let x = Var::from_tensor(&rng.tensor(&[b, c, h, w], -1.0, 1.0, dtype)).unwrap();
            let t = map_to_tokens(&x).unwrap();
            let want = x.flatten_from(2).unwrap().transpose(1, 2).unwrap();
            assert_close(&t, &want, 0.0, "map_to_tokens");
            let back = tokens_to_map(&t, (h, w)).unwrap();
            assert_close(&back, &x, 0.0, "tokens_to_map");
            let proj = rng.tensor(&[b, c, h, w], -1.0, 1.0, dtype);
            let g = grads_of(&back, &proj, &[&x]);
            assert_close(&g[0], &proj, 0.0, "gradient through both");
        }
    }
    let x = rng.tensor(&[2, 4, 3, 6], -1.0, 1.0, DType::F32);
    let strided = x.transpose(2, 3).unwrap();
    assert_close(&map_to_tokens(&strided).unwrap(), &strided.flatten_from(2).unwrap().transpose(1, 2).unwrap(), 0.0, "strided map");
    assert!(tokens_to_map(&map_to_tokens(&x).unwrap(), (3, 5)).unwrap_err().to_string().contains("3x5"));
}

/// The 1×1 convolution to tokens equals `map_to_tokens(weight · x)` (the composed path with
/// candle's matmul) forward and in both gradients, over shapes that split positions or output
/// channels, one or several batch items, an empty channel axis; and names a misfit.
#[test]
fn pointwise_conv_tokens_matches_composed() {
    use ops::nn::{map_to_tokens, pointwise_conv_tokens};
    let mut rng = Rng::new(709);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for (b, cin, cout, h, w) in [(4usize, 40usize, 128usize, 32usize, 32usize), (4, 320, 128, 8, 8), (1, 2048, 256, 15, 15), (3, 7, 5, 1, 3), (2, 0, 6, 2, 2)] {
            let what = format!("pointwise {dtype:?} ({b}, {cin}, {h}, {w}) -> {cout}");
            let x = Var::from_tensor(&rng.tensor(&[b, cin, h, w], -1.0, 1.0, dtype)).unwrap();
            let wt = Var::from_tensor(&rng.tensor(&[cout, cin], -0.5, 0.5, dtype)).unwrap();
            let got = pointwise_conv_tokens(&x, &wt).unwrap();
            let want = map_to_tokens(&wt.broadcast_matmul(&x.reshape((b, cin, h * w)).unwrap()).unwrap().reshape((b, cout, h, w)).unwrap()).unwrap();
            assert_close(&got, &want, tol, &what);
            // Untracked operands: the same values.
            assert_close(&pointwise_conv_tokens(x.as_tensor(), wt.as_tensor()).unwrap(), &want, tol, &format!("{what} untracked"));
            let proj = rng.tensor(&[b, h * w, cout], -1.0, 1.0, dtype);
            let (ga, gb) = (grads_of(&got, &proj, &[&x, &wt]), grads_of(&want, &proj, &[&x, &wt]));
            assert_close(&ga[0], &gb[0], tol, &format!("{what} dx"));
            assert_close(&ga[1], &gb[1], tol * 4.0, &format!("{what} dW"));
        }
    }
    let x = rng.tensor(&[2, 5, 3, 3], -1.0, 1.0, DType::F32);
    let err = pointwise_conv_tokens(&x, &rng.tensor(&[4, 6], -1.0, 1.0, DType::F32)).unwrap_err().to_string();
    assert!(err.contains("5 channels") && err.contains("(4, 6)"), "{err}");
    let err = pointwise_conv_tokens(&x.flatten_from(2).unwrap(), &rng.tensor(&[4, 5], -1.0, 1.0, DType::F32)).unwrap_err().to_string();
    assert!(err.contains("(B, C, H, W)"), "{err}");
}

#[test]
fn layer_norm_non_contiguous_input() {
    let mut rng = Rng::new(702);
    let vm = VarMap::new();
    let ln = LayerNorm::new(
        6,
        1e-5,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = rng.tensor(&[6, 4], -1.0, 1.0, DType::F32).t().unwrap();
    assert_close(
        &ln.forward(&x).unwrap(),
        &ln.forward_composed(&x).unwrap(),
        1e-6,
        "transposed input",
    );
}

#[test]
fn fused_linear_gradient_fd() {
    let mut rng = Rng::new(703);
    let x = rng.var(&[2, 3, 5], -1.0, 1.0);
    let w = rng.var(&[4, 5], -1.0, 1.0);
    let b = rng.var(&[4], -1.0, 1.0);
    check_grads(
        "linear",
        &[("x", &x), ("w", &w), ("b", &b)],
        || linear(&x, &w, Some(&b)),
        60,
        1e-6,
        1e-6,
    );
    check_grads(
        "linear, no bias",
        &[("x", &x), ("w", &w)],
        || linear(&x, &w, None),
        60,
        1e-6,
        1e-6,
    );
    check_grads(
        "linear_relu",
        &[("x", &x), ("w", &w), ("b", &b)],
        || linear_relu(&x, &w, Some(&b)),
        60,
        1e-6,
        1e-6,
    );
}

#[test]
fn fused_linear_matches_candle() {
    let mut rng = Rng::new(704);
    for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 1e-4)] {
        for (shape, d_out) in [
            (vec![1usize, 1usize], 1usize),
            (vec![7, 5], 3),
            (vec![4, 1024, 128], 128),
            (vec![1, 3600, 256], 256),
            (vec![2, 3, 33, 17], 9),
            // Few rows, large weights: the transposed, column-split forward (the POS decoder's
            // FFN on 100 queries, and uneven column blocks).
            (vec![2, 50, 256], 2048),
            (vec![100, 2048], 256),
            (vec![37, 1024], 520),
        ] {
            let d_in = *shape.last().unwrap();
            let x = Var::from_tensor(&rng.tensor(&shape, -1.0, 1.0, dtype)).unwrap();
            let w = Var::from_tensor(&rng.tensor(&[d_out, d_in], -0.3, 0.3, dtype)).unwrap();
            let b = Var::from_tensor(&rng.tensor(&[d_out], -1.0, 1.0, dtype)).unwrap();
            let mut out_shape = shape.clone();
            *out_shape.last_mut().unwrap() = d_out;
            let proj = rng.tensor(&out_shape, -1.0, 1.0, dtype);
            for (with_bias, relu) in [(true, false), (false, false), (true, true), (false, true)] {
                let bias = with_bias.then(|| b.as_tensor());
                let (a, c) = if relu {
                    let c = candle_nn::Linear::new(w.as_tensor().clone(), bias.cloned())
                        .forward(&x)
                        .unwrap();
                    (linear_relu(&x, &w, bias).unwrap(), c.relu().unwrap())
                } else {
                    let c = candle_nn::Linear::new(w.as_tensor().clone(), bias.cloned())
                        .forward(&x)
                        .unwrap();
                    (linear(&x, &w, bias).unwrap(), c)
                };
                let what =
                    format!("linear {dtype:?} {shape:?}->{d_out} bias {with_bias} relu {relu}");
                assert_close(&a, &c, tol, &what);
                let vars: Vec<&Var> = if with_bias {
                    vec![&x, &w, &b]
                } else {
                    vec![&x, &w]
                };
                let (ga, gc) = (grads_of(&a, &proj, &vars), grads_of(&c, &proj, &vars));
                for (i, (p, q)) in ga.iter().zip(&gc).enumerate() {
                    let scale = common::to_vec(q).iter().fold(1f64, |m, v| m.max(v.abs()));
                    assert_close(p, q, tol * scale, &format!("{what} grad {i}"));
                }
            }
        }
    }
    // Non-contiguous input and weight.
    let x = rng.tensor(&[6, 4], -1.0, 1.0, DType::F32).t().unwrap();
    let w = rng.tensor(&[6, 3], -1.0, 1.0, DType::F32).t().unwrap();
    let c = candle_nn::Linear::new(w.clone(), None).forward(&x).unwrap();
    assert_close(
        &linear(&x, &w, None).unwrap(),
        &c,
        1e-6,
        "transposed operands",
    );
    assert!(linear(&x, &w.t().unwrap(), None).is_err());
}

/// The fused dice sums against the composed ones, value and gradient: rows of one chunk, of
/// several, and rows that straddle chunks; logits at 0, ±0, ±100 and ±1e30 (σ saturates without
/// overflow); targets 0, 1 and other nonzero values (which count as 1).
#[test]
fn sigmoid_dice_sums_match_composed() {
    let mut rng = Rng::new(710);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for (rows, n) in [(1usize, 1usize), (3, 5), (8, 65_536), (3, 2 * 8192 + 37)] {
            let mut xv = rng.vec(rows * n, -6.0, 6.0);
            for (i, v) in [0.0, -0.0, 100.0, -100.0, 1e30, -1e30].into_iter().enumerate() {
                let len = xv.len();
                if i < len {
                    xv[(i * 7919) % len] = v;
                }
            }
            let x = Var::from_tensor(&Tensor::from_vec(xv, (rows, n), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let tv: Vec<u8> = (0..rows * n).map(|i| [0u8, 1, 0, 7, 1][(rng.next_u64() as usize + i) % 5]).collect();
            let t = Tensor::from_vec(tv, (rows, n), &Device::Cpu).unwrap();
            let proj = rng.tensor(&[rows, 2], -1.0, 1.0, dtype);
            let a = sigmoid_dice_sums(&x, &t).unwrap();
            let b = sigmoid_dice_sums_composed(&x, &t).unwrap();
            let what = format!("dice sums {dtype:?} {rows}x{n}");
            // Relative to the sums' size (up to n).
            assert_close(&a, &b, tol * n as f64, &what);
            let (ga, gb) = (grads_of(&a, &proj, &[&x]), grads_of(&b, &proj, &[&x]));
            assert_close(&ga[0], &gb[0], tol, &format!("{what} grad"));
        }
    }
    let bad = sigmoid_dice_sums(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(), &Tensor::zeros((2, 4), DType::U8, &Device::Cpu).unwrap());
    assert!(bad.unwrap_err().to_string().contains("targets must be u8 (2, 3)"));
}

/// `[1 − x, x]` and its gradient equal the composed cat to the bit, f32 and f64, one and many
/// tasks; a two-channel input is refused.
#[test]
fn complement_pair_matches_composed_to_the_bit() {
    let mut rng = Rng::new(720);
    for dtype in [DType::F64, DType::F32] {
        for shape in [vec![3usize, 1, 5, 7], vec![2, 1, 256, 256], vec![4, 1, 9]] {
            let x = Var::from_tensor(&rng.tensor(&shape, -3.0, 3.0, dtype)).unwrap();
            let mut out_shape = shape.clone();
            out_shape[1] = 2;
            let proj = rng.tensor(&out_shape, -1.0, 1.0, dtype);
            let a = complement_pair(&x).unwrap();
            let b = complement_pair_composed(&x).unwrap();
            let what = format!("complement pair {dtype:?} {shape:?}");
            assert_eq!(a.dims(), &out_shape[..], "{what}");
            assert_close(&a, &b, 0.0, &what);
            let (ga, gb) = (grads_of(&a, &proj, &[&x]), grads_of(&b, &proj, &[&x]));
            assert_close(&ga[0], &gb[0], 0.0, &format!("{what} grad"));
        }
    }
    let e = complement_pair(&Tensor::zeros((2, 2, 3), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("expected (B, 1, ...)"), "{e}");
}
