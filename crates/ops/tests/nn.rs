//! Forward values of softmax, LayerNorm, GroupNorm and Mlp against candle's own (forward-correct)
//! kernels and hand computations.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, assert_values, Rng};
use ops::nn::{softmax, GroupNorm, LayerNorm, Mlp};

#[test]
fn softmax_matches_candle_on_every_dim() {
    let mut rng = Rng::new(1);
    let x = rng.tensor(&[3, 4, 7], -5.0, 5.0, DType::F32);
    for dim in 0..3 {
        let want = candle_nn::ops::softmax(&x, dim).unwrap();
        assert_close(
            &softmax(&x, dim).unwrap(),
            &want,
            1e-6,
            &format!("softmax dim {dim}"),
        );
    }
    let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
    assert_close(
        &softmax(&x, 2).unwrap(),
        &want,
        1e-6,
        "softmax vs softmax_last_dim",
    );
}

#[test]
fn softmax_is_stable_for_large_logits() {
    let x = Tensor::new(
        &[
            [1000f32, 1001.0, 1002.0],
            [-1000.0, -1000.0, f32::NEG_INFINITY],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let e = [1.0f64, std::f64::consts::E, std::f64::consts::E.powi(2)];
    let s: f64 = e.iter().sum();
    assert_values(
        &softmax(&x, 1).unwrap(),
        &[e[0] / s, e[1] / s, e[2] / s, 0.5, 0.5, 0.0],
        1e-6,
        "stable softmax",
    );
}

#[test]
fn softmax_rejects_bad_input() {
    let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(softmax(&x, 2).is_err());
    let xi = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
    assert!(softmax(&xi, 1).is_err());
}

/// candle's fused softmax gives the right forward but silently no gradient: the reason this
/// crate has its own.
#[test]
fn stock_softmax_last_dim_has_no_gradient() {
    let mut rng = Rng::new(2);
    let x = rng.var(&[2, 5], -1.0, 1.0);
    let x32 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
    let w = rng.tensor(&[2, 5], -1.0, 1.0, DType::F32);
    let loss = candle_nn::ops::softmax_last_dim(&x32)
        .unwrap()
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert!(
        grads.get(x32.as_tensor()).is_none(),
        "candle's softmax_last_dim now has a backward"
    );
    let loss = softmax(&x32, 1)
        .unwrap()
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(x32.as_tensor()).is_some());
}

/// Same for candle's fused layer norm (input, weight and bias): the reason for [`LayerNorm`].
#[test]
fn stock_layer_norm_has_no_gradient() {
    let mut rng = Rng::new(5);
    let t = |r: &mut Rng, s: &[usize]| Var::from_tensor(&r.tensor(s, -1.0, 1.0, DType::F32)).unwrap();
    let (x, w, b) = (t(&mut rng, &[3, 8]), t(&mut rng, &[8]), t(&mut rng, &[8]));
    let proj = rng.tensor(&[3, 8], -1.0, 1.0, DType::F32);
    let loss = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5)
        .unwrap()
        .mul(&proj)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for v in [&x, &w, &b] {
        assert!(grads.get(v.as_tensor()).is_none(), "candle's layer_norm now has a backward");
    }
}

fn varmap_with(entries: &[(&str, Tensor)]) -> VarMap {
    let mut vm = VarMap::new();
    for (name, t) in entries {
        // Create the var with the right shape, then overwrite its value.
        let vb = VarBuilder::from_varmap(&vm, t.dtype(), &Device::Cpu);
        vb.get(t.dims(), name).unwrap();
        vm.set_one(name, t).unwrap();
    }
    vm
}

#[test]
fn layer_norm_matches_candle() {
    let mut rng = Rng::new(3);
    let x = rng.tensor(&[2, 3, 16], -3.0, 5.0, DType::F32);
    let w = rng.tensor(&[16], 0.5, 1.5, DType::F32);
    let b = rng.tensor(&[16], -0.5, 0.5, DType::F32);
    let vm = varmap_with(&[("ln.weight", w.clone()), ("ln.bias", b.clone())]);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let ln = LayerNorm::new(16, 1e-5, vb.pp("ln")).unwrap();
    let want = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
    assert_close(&ln.forward(&x).unwrap(), &want, 2e-6, "LayerNorm");
    // Non-contiguous input takes the same path.
    let xt = x.transpose(0, 1).unwrap();
    let want = candle_nn::ops::layer_norm(&xt.contiguous().unwrap(), &w, &b, 1e-5).unwrap();
    assert_close(&ln.forward(&xt).unwrap(), &want, 2e-6, "LayerNorm strided");
    assert!(ln
        .forward(&rng.tensor(&[2, 15], 0.0, 1.0, DType::F32))
        .is_err());
}

#[test]
fn layer_norm_defaults_are_identity_affine() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let ln = LayerNorm::new(4, 0.0, vb).unwrap();
    let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
    // mean 2.5, population variance 1.25.
    let s = 1.25f64.sqrt();
    assert_values(
        &ln.forward(&x).unwrap(),
        &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s],
        1e-6,
        "LN",
    );
}

#[test]
fn group_norm_matches_candle() {
    let mut rng = Rng::new(4);
    let x = rng.tensor(&[2, 8, 5, 3], -2.0, 4.0, DType::F32);
    let w = rng.tensor(&[8], 0.5, 1.5, DType::F32);
    let b = rng.tensor(&[8], -0.5, 0.5, DType::F32);
    let vm = varmap_with(&[("gn.weight", w.clone()), ("gn.bias", b.clone())]);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let gn = GroupNorm::new(4, 8, 1e-5, vb.pp("gn")).unwrap();
    let reference = candle_nn::GroupNorm::new(w, b, 8, 4, 1e-5).unwrap();
    let want = candle_nn::Module::forward(&reference, &x).unwrap();
    assert_close(&gn.forward(&x).unwrap(), &want, 2e-6, "GroupNorm");
    assert!(gn
        .forward(&rng.tensor(&[2, 6, 5, 3], 0.0, 1.0, DType::F32))
        .is_err());
    assert!(gn
        .forward(&rng.tensor(&[2, 8, 5], 0.0, 1.0, DType::F32))
        .is_err());
    let vm = VarMap::new();
    assert!(GroupNorm::new(
        3,
        8,
        1e-5,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)
    )
    .is_err());
}

#[test]
fn mlp_names_and_relu_placement() {
    // layers.0: 2->2 identity with bias (0, -5); layers.1: 2->1 sum, bias 1.
    let vm = varmap_with(&[
        (
            "m.layers.0.weight",
            Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap(),
        ),
        (
            "m.layers.0.bias",
            Tensor::new(&[0f32, -5.0], &Device::Cpu).unwrap(),
        ),
        (
            "m.layers.1.weight",
            Tensor::new(&[[1f32, 1.0]], &Device::Cpu).unwrap(),
        ),
        (
            "m.layers.1.bias",
            Tensor::new(&[-10f32], &Device::Cpu).unwrap(),
        ),
    ]);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let mlp = Mlp::new(2, 2, 1, 2, vb.pp("m")).unwrap();
    let x = Tensor::new(&[[[3f32, 4.0]], [[-3.0, 7.0]]], &Device::Cpu).unwrap();
    // relu after the first layer only: [3, 0] -> -7 ; [0, 2] -> -8 (last layer not rectified).
    assert_values(&mlp.forward(&x).unwrap(), &[-7.0, -8.0], 1e-6, "Mlp");
    assert!(mlp
        .forward(&Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap())
        .is_err());
}

/// `ops::nn::matmul` gives candle's forward bit for bit and its gradients, but no gradient for
/// an untracked operand; mismatched shapes get candle's error.
#[test]
fn matmul_matches_candle_and_skips_untracked_operands() {
    let mut rng = Rng::new(40);
    let a = Var::from_tensor(&rng.tensor(&[3, 20, 64], -1.0, 1.0, DType::F32)).unwrap();
    let b = Var::from_tensor(&rng.tensor(&[3, 64, 300], -1.0, 1.0, DType::F32)).unwrap();
    let w = rng.tensor(&[3, 20, 300], -1.0, 1.0, DType::F32);
    let ours = ops::nn::matmul(&a, &b).unwrap();
    let theirs = a.matmul(&b).unwrap();
    assert_close(&ours, &theirs, 0.0, "forward");
    let g_ours = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g_theirs = (&theirs * &w).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(g_ours.get(&a).unwrap(), g_theirs.get(&a).unwrap(), 1e-4, "d lhs");
    assert_close(g_ours.get(&b).unwrap(), g_theirs.get(&b).unwrap(), 1e-4, "d rhs");

    let fixed = b.as_detached_tensor();
    let g = (ops::nn::matmul(&a, &fixed).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&fixed).is_none(), "an untracked rhs got a gradient");
    assert_close(g.get(&a).unwrap(), g_theirs.get(&a).unwrap(), 1e-4, "d lhs with a fixed rhs");
    let fixed = a.as_detached_tensor();
    let g = (ops::nn::matmul(&fixed, &b).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&fixed).is_none(), "an untracked lhs got a gradient");
    assert_close(g.get(&b).unwrap(), g_theirs.get(&b).unwrap(), 1e-4, "d rhs with a fixed lhs");

    let err = ops::nn::matmul(&a, &a).unwrap_err().to_string();
    assert!(err.contains("matmul"), "{err}");
}

/// The blocked forward (column blocks when the output is wide, row blocks when it is tall, one
/// or several batch items, uneven last blocks), tracked or not, equals candle's matmul to the
/// bit in f32 and f64; `weight_matmul` equals a broadcast matmul and names a misfit.
#[test]
fn blocked_matmul_forward_equals_candle() {
    let mut rng = Rng::new(41);
    for dtype in [DType::F32, DType::F64] {
        for (bt, m, k, n) in [(1usize, 100usize, 256usize, 1000usize), (2, 700, 33, 5), (1, 1, 1, 1), (4, 17, 3, 130), (3, 64, 70, 64), (1, 5, 0, 7)] {
            let a = rng.tensor(&[bt, m, k], -1.0, 1.0, dtype);
            let b = rng.tensor(&[bt, k, n], -1.0, 1.0, dtype);
            let want = a.matmul(&b).unwrap();
            assert_close(&ops::nn::matmul(&a, &b).unwrap(), &want, 0.0, &format!("{dtype:?} ({bt}, {m}, {k}) x ({k}, {n})"));
            let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            assert_close(&ops::nn::matmul(&va, &vb).unwrap(), &want, 0.0, &format!("{dtype:?} tracked ({bt}, {m}, {k}) x ({k}, {n})"));
        }
        let w = rng.tensor(&[48, 40], -1.0, 1.0, dtype);
        let x = rng.tensor(&[3, 40, 90], -1.0, 1.0, dtype);
        assert_close(&ops::nn::weight_matmul(&w, &x).unwrap(), &w.broadcast_matmul(&x).unwrap(), 0.0, "weight_matmul");
        let err = ops::nn::weight_matmul(&w, &rng.tensor(&[3, 41, 90], -1.0, 1.0, dtype)).unwrap_err().to_string();
        assert!(err.contains("weight_matmul") && err.contains("[3, 41, 90]"), "{err}");
    }
}
