//! Central finite-difference checks (f64) of every differentiable op in the crate: each input
//! and parameter must receive a gradient from `backward`, and it must match the numeric one.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{check_grads, Rng};
use ops::attention::MultiheadAttention;
use ops::deform::{ms_deform_attn_core, ms_deform_attn_core_composed, MSDeformAttn};
use ops::nn::{softmax, GroupNorm, LayerNorm, Mlp};
use ops::resize::resize_bilinear;
use ops::sample::{grid_sample_bilinear, grid_sample_bilinear_composed, point_sample};

const EPS: f64 = 1e-6;
const TOL: f64 = 1e-6;

/// Every var of `vm`, randomised in [lo, hi), sorted by name.
fn randomized_vars(vm: &VarMap, rng: &mut Rng, lo: f64, hi: f64) -> Vec<(String, Var)> {
    let data = vm.data().lock().unwrap();
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in &vars {
        v.set(&rng.tensor(v.dims(), lo, hi, DType::F64)).unwrap();
    }
    vars
}

fn f64_vb(vm: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu)
}

#[test]
fn softmax_gradient() {
    let mut rng = Rng::new(100);
    let x = rng.var(&[3, 4, 5], -3.0, 3.0);
    for dim in 0..3 {
        check_grads(
            &format!("softmax dim {dim}"),
            &[("x", &x)],
            || softmax(&x, dim),
            60,
            EPS,
            TOL,
        );
    }
}

#[test]
fn layer_norm_gradient() {
    let mut rng = Rng::new(101);
    let vm = VarMap::new();
    let ln = LayerNorm::new(6, 1e-5, f64_vb(&vm).pp("norm")).unwrap();
    let vars = randomized_vars(&vm, &mut rng, 0.5, 1.5);
    let x = rng.var(&[2, 3, 6], -2.0, 2.0);
    let mut all: Vec<(&str, &Var)> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    assert_eq!(all.len(), 2, "LayerNorm has weight and bias");
    all.push(("x", &x));
    check_grads("LayerNorm", &all, || ln.forward(&x), 60, EPS, TOL);
}

#[test]
fn group_norm_gradient() {
    let mut rng = Rng::new(102);
    let vm = VarMap::new();
    let gn = GroupNorm::new(2, 4, 1e-5, f64_vb(&vm).pp("gn")).unwrap();
    let vars = randomized_vars(&vm, &mut rng, 0.5, 1.5);
    let x = rng.var(&[2, 4, 3, 2], -2.0, 2.0);
    let mut all: Vec<(&str, &Var)> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    assert_eq!(all.len(), 2);
    all.push(("x", &x));
    check_grads("GroupNorm", &all, || gn.forward(&x), 60, EPS, TOL);
}

#[test]
fn mlp_gradient() {
    let mut rng = Rng::new(103);
    let vm = VarMap::new();
    let mlp = Mlp::new(4, 5, 3, 3, f64_vb(&vm).pp("mlp")).unwrap();
    let vars = randomized_vars(&vm, &mut rng, -0.8, 0.8);
    let x = rng.var(&[2, 3, 4], -2.0, 2.0);
    let mut all: Vec<(&str, &Var)> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    assert_eq!(all.len(), 6);
    all.push(("x", &x));
    check_grads("Mlp", &all, || mlp.forward(&x), 30, EPS, TOL);
}

#[test]
fn matmul_gradient_both_orientations() {
    let mut rng = Rng::new(107);
    // lhs with fewer rows than columns (the transposed gradient gemm) and with more, batched
    // and 2-D.
    for (lhs, rhs) in [(vec![2, 3, 5], vec![2, 5, 4]), (vec![2, 6, 3], vec![2, 3, 4]), (vec![4, 2], vec![2, 7])] {
        let a = rng.var(&lhs, -1.0, 1.0);
        let b = rng.var(&rhs, -1.0, 1.0);
        check_grads(&format!("matmul {lhs:?}·{rhs:?}"), &[("lhs", &a), ("rhs", &b)], || ops::nn::matmul(&a, &b), 40, EPS, TOL);
    }
}

#[test]
fn resize_bilinear_gradient_both_modes() {
    let mut rng = Rng::new(104);
    let x = rng.var(&[2, 2, 4, 5], -1.0, 1.0);
    for ac in [false, true] {
        for out in [(7, 3), (3, 8), (4, 9)] {
            check_grads(
                &format!("resize_bilinear {out:?} ac={ac}"),
                &[("x", &x)],
                || resize_bilinear(&x, out, ac),
                40,
                EPS,
                TOL,
            );
        }
    }
}

#[test]
fn grid_sample_gradient_input_and_grid() {
    let mut rng = Rng::new(105);
    let input = rng.var(&[2, 3, 4, 5], -1.0, 1.0);
    // Some points fall partly or fully outside, exercising the zero padding in both gradients.
    let grid = rng.var(&[2, 3, 4, 2], -1.15, 1.15);
    check_grads(
        "grid_sample",
        &[("input", &input), ("grid", &grid)],
        || grid_sample_bilinear(&input, &grid),
        80,
        EPS,
        TOL,
    );
    check_grads(
        "grid_sample_composed",
        &[("input", &input), ("grid", &grid)],
        || grid_sample_bilinear_composed(&input, &grid),
        80,
        EPS,
        TOL,
    );
    let coords = rng.var(&[2, 7, 2], 0.0, 1.0);
    check_grads(
        "point_sample",
        &[("input", &input), ("coords", &coords)],
        || point_sample(&input, &coords),
        40,
        EPS,
        TOL,
    );
}

#[test]
fn ms_deform_attn_core_gradient() {
    let mut rng = Rng::new(106);
    let shapes = [(3usize, 4usize), (2, 3)];
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let (b, m, d, lq, p) = (2, 2, 3, 4, 2);
    let value = rng.var(&[b, s, m, d], -1.0, 1.0);
    let loc = rng.var(&[b, lq, m, 2, p, 2], -0.1, 1.1);
    let attn = rng.var(&[b, lq, m, 2, p], 0.0, 1.0);
    let vars = [
        ("value", &value),
        ("sampling_locations", &loc),
        ("attention_weights", &attn),
    ];
    check_grads(
        "ms_deform_attn_core (CPU kernel)",
        &vars,
        || ms_deform_attn_core(&value, &shapes, &loc, &attn),
        60,
        EPS,
        TOL,
    );
    check_grads(
        "ms_deform_attn_core_composed",
        &vars,
        || ms_deform_attn_core_composed(&value, &shapes, &loc, &attn),
        60,
        EPS,
        TOL,
    );
}

#[test]
fn ms_deform_attn_module_gradient() {
    let mut rng = Rng::new(107);
    let (c, levels, heads, points) = (8usize, 2usize, 2usize, 2usize);
    let shapes = [(3usize, 3usize), (2, 4)];
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let vm = VarMap::new();
    let da = MSDeformAttn::new(c, levels, heads, points, f64_vb(&vm).pp("attn")).unwrap();
    let vars = randomized_vars(&vm, &mut rng, -0.5, 0.5);
    assert_eq!(vars.len(), 8, "four Linear layers");
    let query = rng.var(&[1, 5, c], -1.0, 1.0);
    let refp = rng.var(&[1, 5, levels, 2], 0.1, 0.9);
    let input = rng.var(&[1, s, c], -1.0, 1.0);
    let mut all: Vec<(&str, &Var)> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    all.extend([
        ("query", &query),
        ("reference_points", &refp),
        ("input_flatten", &input),
    ]);
    check_grads(
        "MSDeformAttn",
        &all,
        || da.forward(&query, &refp, &input, &shapes),
        25,
        EPS,
        TOL,
    );
}

#[test]
fn multihead_attention_gradient() {
    let mut rng = Rng::new(108);
    let (e, heads, b, lq, lk) = (6usize, 2usize, 2usize, 3usize, 4usize);
    let vm = VarMap::new();
    let mha = MultiheadAttention::new(e, heads, f64_vb(&vm).pp("mha")).unwrap();
    let vars = randomized_vars(&vm, &mut rng, -0.6, 0.6);
    assert_eq!(
        vars.len(),
        4,
        "in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias"
    );
    let q = rng.var(&[b, lq, e], -1.0, 1.0);
    let k = rng.var(&[b, lk, e], -1.0, 1.0);
    let v = rng.var(&[b, lk, e], -1.0, 1.0);
    let mask: Vec<u8> = (0..b * lq * lk).map(|n| (n % 5 == 2) as u8).collect();
    let mask = Tensor::from_vec(mask, (b, lq, lk), &Device::Cpu).unwrap();
    let mut all: Vec<(&str, &Var)> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    all.extend([("q", &q), ("k", &k), ("v", &v)]);
    check_grads(
        "MHA unmasked",
        &all,
        || mha.forward(&q, &k, &v, None),
        30,
        EPS,
        TOL,
    );
    check_grads(
        "MHA masked",
        &all,
        || mha.forward(&q, &k, &v, Some(&mask)),
        30,
        EPS,
        TOL,
    );
}

/// The checker itself must be able to fail: `x * detach(x)` reports half the true derivative.
#[test]
#[should_panic(expected = "analytic")]
fn checker_detects_a_wrong_gradient() {
    let mut rng = Rng::new(109);
    let x = rng.var(&[4], 0.5, 1.5);
    check_grads(
        "wrong",
        &[("x", &x)],
        || x.as_tensor().mul(&x.as_tensor().detach()),
        4,
        EPS,
        TOL,
    );
}

/// ... and must refuse an input that no gradient reaches.
#[test]
#[should_panic(expected = "no gradient reached")]
fn checker_detects_a_missing_gradient() {
    let mut rng = Rng::new(110);
    let x = rng.var(&[2, 3], -1.0, 1.0);
    let x32 = x.as_tensor().clone();
    check_grads(
        "stock softmax",
        &[("x", &x)],
        || candle_nn::ops::softmax_last_dim(&x32),
        4,
        EPS,
        TOL,
    );
}
