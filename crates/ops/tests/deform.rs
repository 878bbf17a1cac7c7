//! Multi-scale deformable attention: the core against a per-level grid_sample composition (the
//! official pure-PyTorch structure) and hand-checkable module outputs.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, assert_values, Rng};
use ops::deform::{
    ms_deform_attn_core, ms_deform_attn_core_composed, sampling_offsets_bias_init, MSDeformAttn,
};
use ops::sample::grid_sample_bilinear;

/// `ms_deform_attn_core_pytorch` written level by level with grid_sample, as the official code.
fn reference_core(
    value: &Tensor,
    shapes: &[(usize, usize)],
    loc: &Tensor,
    attn: &Tensor,
) -> Tensor {
    let (b, _s, m, d) = value.dims4().unwrap();
    let (lq, p) = (loc.dim(1).unwrap(), loc.dim(4).unwrap());
    let mut start = 0;
    let mut per_level = Vec::new();
    for (l, &(h, w)) in shapes.iter().enumerate() {
        let v = value
            .narrow(1, start, h * w)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((b * m, d, h, w))
            .unwrap();
        let grid = loc
            .narrow(3, l, 1)
            .unwrap()
            .squeeze(3)
            .unwrap()
            .affine(2.0, -1.0)
            .unwrap()
            .permute((0, 2, 1, 3, 4))
            .unwrap()
            .reshape((b * m, lq, p, 2))
            .unwrap();
        per_level.push(grid_sample_bilinear(&v, &grid).unwrap()); // (B*M, D, Lq, P)
        start += h * w;
    }
    let sampled = Tensor::cat(&per_level, 3).unwrap(); // (B*M, D, Lq, L*P)
    let l = shapes.len();
    let a = attn
        .permute((0, 2, 1, 3, 4))
        .unwrap()
        .reshape((b * m, 1, lq, l * p))
        .unwrap();
    sampled
        .broadcast_mul(&a)
        .unwrap()
        .sum(3)
        .unwrap()
        .reshape((b, m * d, lq))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
}

#[test]
fn core_matches_per_level_grid_sample() {
    let mut rng = Rng::new(11);
    let shapes = [(3usize, 4usize), (2, 2), (5, 3)];
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let (b, m, d, lq, p) = (2, 3, 4, 6, 2);
    let value = rng.tensor(&[b, s, m, d], -1.0, 1.0, DType::F32);
    // Include locations outside [0, 1] to exercise the zero padding.
    let loc = rng.tensor(&[b, lq, m, 3, p, 2], -0.2, 1.2, DType::F32);
    let attn = rng.tensor(&[b, lq, m, 3, p], 0.0, 1.0, DType::F32);
    let want = reference_core(&value, &shapes, &loc, &attn);
    let got = ms_deform_attn_core(&value, &shapes, &loc, &attn).unwrap();
    assert_eq!(got.dims(), &[b, lq, m * d]);
    assert_close(&got, &want, 1e-5, "CPU kernel");
    let got = ms_deform_attn_core_composed(&value, &shapes, &loc, &attn).unwrap();
    assert_close(&got, &want, 1e-5, "composed");
    // Strided inputs and f64 take the same paths.
    let value64 = value.to_dtype(DType::F64).unwrap();
    let got = ms_deform_attn_core(&value64, &shapes, &loc, &attn).unwrap();
    assert_eq!(got.dtype(), DType::F64);
    assert_close(&got, &want, 1e-5, "CPU kernel f64");
    let loc_t = loc
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    assert!(!loc_t.is_contiguous());
    assert_close(
        &ms_deform_attn_core(&value, &shapes, &loc_t, &attn).unwrap(),
        &want,
        1e-5,
        "strided",
    );
}

/// The kernel has register-blocked paths for head widths 16, 32 and 64 (the cpu and paper
/// presets) next to the generic one; all must match the grid_sample composition, including
/// samples on and beyond the borders, far outside (saturating index casts) and at ±∞.
#[test]
fn core_matches_grid_sample_for_every_head_width_path() {
    let shapes = [(3usize, 5usize), (2, 2), (4, 3)];
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    for (seed, d) in [(1u64, 16usize), (2, 32), (3, 64), (4, 8)] {
        let mut rng = Rng::new(seed);
        let (b, m, lq, p) = (2, 2, 5, 3);
        let value = rng.tensor(&[b, s, m, d], -1.0, 1.0, DType::F32);
        let mut loc: Vec<f32> = common::to_vec(&rng.tensor(&[b, lq, m, 3, p, 2], -0.3, 1.3, DType::F32))
            .iter()
            .map(|&v| v as f32)
            .collect();
        for (i, v) in [0.0, 1.0, -1e30, 1e30, f32::INFINITY, f32::NEG_INFINITY, 0.5, 1e-7].into_iter().enumerate() {
            loc[7 * i + 1] = v;
        }
        let loc = Tensor::from_vec(loc, (b, lq, m, 3, p, 2), &Device::Cpu).unwrap();
        let attn = rng.tensor(&[b, lq, m, 3, p], 0.0, 1.0, DType::F32);
        let want = reference_core(&value, &shapes, &loc, &attn);
        let got = ms_deform_attn_core(&value, &shapes, &loc, &attn).unwrap();
        assert!(common::to_vec(&got).iter().all(|x| x.is_finite()), "d={d}: finite");
        assert_close(&got, &want, 1e-5, &format!("CPU kernel, head width {d}"));
        let got64 = ms_deform_attn_core(&value.to_dtype(DType::F64).unwrap(), &shapes, &loc, &attn).unwrap();
        assert_close(&got64, &want, 1e-5, &format!("CPU kernel f64, head width {d}"));
    }
}

#[test]
fn core_rejects_inconsistent_shapes() {
    let value = Tensor::zeros((1, 10, 2, 3), DType::F32, &Device::Cpu).unwrap();
    let loc = Tensor::zeros((1, 4, 2, 2, 1, 2), DType::F32, &Device::Cpu).unwrap();
    let attn = Tensor::zeros((1, 4, 2, 2, 1), DType::F32, &Device::Cpu).unwrap();
    assert!(ms_deform_attn_core(&value, &[(2, 3), (2, 2)], &loc, &attn).is_ok());
    assert!(ms_deform_attn_core(&value, &[(3, 3), (1, 1)], &loc, &attn).is_ok());
    assert!(ms_deform_attn_core(&value, &[(2, 3), (2, 1)], &loc, &attn).is_err());
    assert!(ms_deform_attn_core(&value, &[(2, 3), (2, 2), (0, 5)], &loc, &attn).is_err());
    let attn_bad = Tensor::zeros((1, 4, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(ms_deform_attn_core(&value, &[(2, 3), (2, 2)], &loc, &attn_bad).is_err());
    assert!(ms_deform_attn_core_composed(&value, &[(2, 3), (2, 1)], &loc, &attn).is_err());
    let value_empty = Tensor::zeros((1, 10, 2, 0), DType::F32, &Device::Cpu).unwrap();
    assert!(ms_deform_attn_core(&value_empty, &[(2, 3), (2, 2)], &loc, &attn).is_err());
    let loc0 = Tensor::zeros((1, 4, 2, 2, 0, 2), DType::F32, &Device::Cpu).unwrap();
    let attn0 = Tensor::zeros((1, 4, 2, 2, 0), DType::F32, &Device::Cpu).unwrap();
    assert!(ms_deform_attn_core(&value, &[(2, 3), (2, 2)], &loc0, &attn0).is_err());
    let value_int = Tensor::zeros((1, 10, 2, 3), DType::U32, &Device::Cpu).unwrap();
    assert!(ms_deform_attn_core(&value_int, &[(2, 3), (2, 2)], &loc, &attn).is_err());
}

fn eye(n: usize) -> Tensor {
    Tensor::eye(n, DType::F32, &Device::Cpu).unwrap()
}

/// With zero offset/attention weights, identity value/output projections and a chosen offset
/// bias, the module averages (uniform softmax) the values found `bias` pixels from the reference
/// point on each level.
#[test]
fn module_samples_at_reference_plus_pixel_offsets() {
    let (c, heads, levels, points) = (4usize, 2usize, 2usize, 1usize);
    let shapes = [(2usize, 3usize), (3, 2)];
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let attn_mod = MSDeformAttn::new(c, levels, heads, points, vb.pp("da")).unwrap();
    let mut vm = vm;
    vm.set_one("da.value_proj.weight", eye(c)).unwrap();
    vm.set_one("da.output_proj.weight", eye(c)).unwrap();
    // Per (head, level, point): (dx, dy) in pixels of that level. Head 0 moves +1 in x on
    // level 0, head 1 moves +1 in y on level 1; the others stay at the reference point.
    let bias = Tensor::new(&[1f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], &Device::Cpu).unwrap();
    vm.set_one("da.sampling_offsets.bias", bias).unwrap();
    // Input: level 0 (2x3) then level 1 (3x2); channel k of pixel n = 100k + n.
    let s = 12;
    let v: Vec<f32> = (0..s)
        .flat_map(|n| (0..c).map(move |k| (100 * k + n) as f32))
        .collect();
    let input = Tensor::from_vec(v, (1, s, c), &Device::Cpu).unwrap();
    // Reference: level 0 pixel (y=0, x=1), level 1 pixel (y=1, x=0) (normalised centres).
    let r = Tensor::new(
        &[[[[1.5f32 / 3.0, 0.5 / 2.0], [0.5 / 2.0, 1.5 / 3.0]]]],
        &Device::Cpu,
    )
    .unwrap();
    let query = Tensor::zeros((1, 1, c), DType::F32, &Device::Cpu).unwrap();
    let out = attn_mod.forward(&query, &r, &input, &shapes).unwrap();
    assert_eq!(out.dims(), &[1, 1, c]);
    // Head 0 (channels 0,1): level 0 at (0, 2) = pixel 2, level 1 at (1, 0) = pixel 6 + 2.
    // Head 1 (channels 2,3): level 0 at (0, 1) = pixel 1, level 1 at (2, 0) = pixel 6 + 4.
    let h0 = (2.0 + 8.0) / 2.0;
    let h1 = (1.0 + 10.0) / 2.0;
    assert_values(
        &out,
        &[h0, 100.0 + h0, 200.0 + h1, 300.0 + h1],
        1e-4,
        "MSDeformAttn",
    );
    // Wrong level count / shapes are errors, not panics.
    assert!(attn_mod.forward(&query, &r, &input, &shapes[..1]).is_err());
    assert!(attn_mod
        .forward(&query, &r, &input.narrow(1, 0, 11).unwrap(), &shapes)
        .is_err());
}

#[test]
fn sampling_offsets_bias_follows_deformable_detr() {
    let b = sampling_offsets_bias_init(8, 3, 4, &Device::Cpu).unwrap();
    assert_eq!(b.dims(), &[8 * 3 * 4 * 2]);
    let v: Vec<f32> = b.to_vec1().unwrap();
    let at = |m: usize, l: usize, p: usize, k: usize| v[((m * 3 + l) * 4 + p) * 2 + k];
    // Head 0 points along +x, head 2 along +y, head 1 diagonally (normalised to max |.| = 1).
    assert_eq!((at(0, 0, 0, 0), at(0, 0, 0, 1)), (1.0, 0.0));
    assert!((at(2, 1, 0, 0)).abs() < 1e-6 && (at(2, 1, 0, 1) - 1.0).abs() < 1e-6);
    assert!((at(1, 2, 0, 0) - 1.0).abs() < 1e-6 && (at(1, 2, 0, 1) - 1.0).abs() < 1e-6);
    // Point p is p + 1 times as far.
    assert!((at(1, 0, 3, 1) - 4.0).abs() < 1e-5);
}

/// The one-pass sampling locations against the broadcast composition they replaced, values and
/// both gradients, f32 and f64.
#[test]
fn sampling_locations_match_the_broadcast_composition() {
    use candle_core::Var;
    let mut rng = Rng::new(23);
    let shapes = [(3usize, 4usize), (2, 2), (5, 3)];
    let (b, lq, m, l, p) = (2, 7, 3, 3, 2);
    for dt in [DType::F32, DType::F64] {
        let refs = Var::from_tensor(&rng.tensor(&[b, lq, l, 2], 0.0, 1.0, dt)).unwrap();
        let off = Var::from_tensor(&rng.tensor(&[b, lq, m, l, p, 2], -3.0, 3.0, dt)).unwrap();
        let proj = rng.tensor(&[b, lq, m, l, p, 2], -1.0, 1.0, dt);
        let norm: Vec<f32> = shapes.iter().flat_map(|&(h, w)| [w as f32, h as f32]).collect();
        let norm = Tensor::from_vec(norm, (1, 1, 1, l, 1, 2), &Device::Cpu).unwrap().to_dtype(dt).unwrap();
        let want = refs
            .as_tensor()
            .reshape((b, lq, 1, l, 1, 2))
            .unwrap()
            .broadcast_add(&off.as_tensor().broadcast_div(&norm).unwrap())
            .unwrap();
        let got = ops::deform::sampling_locations(refs.as_tensor(), off.as_tensor(), &shapes).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert_close(&got, &want, 1e-12, &format!("{dt:?} values"));
        let grads = |y: &Tensor| (y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let (gg, gw) = (grads(&got), grads(&want));
        assert_close(gg.get(&refs).unwrap(), gw.get(&refs).unwrap(), 1e-5, &format!("{dt:?} d reference points"));
        assert_close(gg.get(&off).unwrap(), gw.get(&off).unwrap(), 1e-6, &format!("{dt:?} d offsets"));
    }
    let bad = Tensor::zeros((b, lq, m, 2, p, 2), DType::F32, &Device::Cpu).unwrap();
    let refs = Tensor::zeros((b, lq, l, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(ops::deform::sampling_locations(&refs, &bad, &shapes).is_err());
}

/// A NaN sampling location makes that query's output NaN in the kernel, as in the composed
/// path: never a silent zero.
#[test]
fn a_nan_location_poisons_its_query() {
    let mut rng = Rng::new(5);
    let shapes = [(3usize, 4usize), (2, 2)];
    for d in [4, 32] {
    let (b, m, lq, p) = (1, 2, 3, 2);
    let value = rng.tensor(&[b, 16, m, d], -1.0, 1.0, DType::F32);
    let mut loc: Vec<f32> = common::to_vec(&rng.tensor(&[b, lq, m, 2, p, 2], 0.0, 1.0, DType::F32)).iter().map(|&v| v as f32).collect();
    loc[0] = f32::NAN; // query 0, head 0, level 0, point 0, x
    let loc = Tensor::from_vec(loc, (b, lq, m, 2, p, 2), &Device::Cpu).unwrap();
    let attn = rng.tensor(&[b, lq, m, 2, p], 0.1, 1.0, DType::F32);
    for (what, out) in [
        ("kernel", ms_deform_attn_core(&value, &shapes, &loc, &attn).unwrap()),
        ("composed", ms_deform_attn_core_composed(&value, &shapes, &loc, &attn).unwrap()),
    ] {
        let v = common::to_vec(&out);
        assert!(v[..d].iter().all(|x| x.is_nan()), "{what}: head 0 of query 0 must be NaN, got {:?}", &v[..d]);
        assert!(v[m * d..].iter().all(|x| x.is_finite()), "{what}: other queries stay finite");
    }
    }
}
