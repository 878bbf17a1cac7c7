//! grid_sample / point_sample at points whose values are known by hand.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, assert_values, Rng};
use ops::resize::resize_bilinear;
use ops::sample::{grid_sample_bilinear, grid_sample_bilinear_composed, point_sample};

/// 2×3 image [[1, 2, 3], [4, 5, 6]], channel 2 = 10× channel 1.
fn image() -> Tensor {
    let c0 = [1f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let v: Vec<f32> = c0
        .iter()
        .copied()
        .chain(c0.iter().map(|x| 10.0 * x))
        .collect();
    Tensor::from_vec(v, (1, 2, 2, 3), &Device::Cpu).unwrap()
}

#[test]
fn grid_sample_known_points() {
    // Normalised coords (align_corners=False): pixel j's centre is x = (2j + 1) / W - 1.
    let (w, h) = (3.0f32, 2.0f32);
    let cx = |j: f32| (2.0 * j + 1.0) / w - 1.0;
    let cy = |i: f32| (2.0 * i + 1.0) / h - 1.0;
    let pts = [
        (cx(0.0), cy(0.0)),   // pixel (0,0) -> 1
        (cx(2.0), cy(1.0)),   // pixel (1,2) -> 6
        (cx(0.5), cy(0.0)),   // between 1 and 2 -> 1.5
        (0.0, 0.0),           // image centre: pixel (0.5, 1) -> (2 + 5) / 2
        (-1.0, cy(0.0)),      // left border: half of pixel (0,0), half zero padding -> 0.5
        (-1.0, -1.0),         // corner: a quarter of pixel (0,0) -> 0.25
        (1.0, 1.0),           // opposite corner -> 6 / 4
        (5.0, 0.0),           // far outside -> 0
        (0.0, -3.0),          // far outside -> 0
        (cx(1.25), cy(0.75)), // (y, x) = (0.75, 1.25): bilinear of 2, 3, 5, 6
    ];
    let g: Vec<f32> = pts.iter().flat_map(|&(x, y)| [x, y]).collect();
    let grid = Tensor::from_vec(g, (1, 2, 5, 2), &Device::Cpu).unwrap();
    let out = grid_sample_bilinear(&image(), &grid).unwrap();
    assert_eq!(out.dims(), &[1, 2, 2, 5]);
    let composed = grid_sample_bilinear_composed(&image(), &grid).unwrap();
    assert_close(&composed, &out, 1e-6, "composed vs CPU kernel");
    let last = 0.25 * 0.75 * 2.0 + 0.25 * 0.25 * 3.0 + 0.75 * 0.75 * 5.0 + 0.75 * 0.25 * 6.0;
    let c0 = [1.0, 6.0, 1.5, 3.5, 0.5, 0.25, 1.5, 0.0, 0.0, last];
    let want: Vec<f64> = c0
        .iter()
        .copied()
        .chain(c0.iter().map(|x| 10.0 * x))
        .collect();
    assert_values(&out, &want, 1e-5, "grid_sample");
}

/// Sampling at every output pixel centre of an align_corners=False resize reproduces
/// `resize_bilinear` away from the borders (where resize clamps and grid_sample pads zeros).
#[test]
fn grid_sample_agrees_with_bilinear_resize_inside() {
    let mut rng = Rng::new(7);
    let x = rng.tensor(&[2, 3, 5, 6], -1.0, 1.0, DType::F32);
    let (oh, ow) = (8usize, 9usize);
    let mut g = Vec::new();
    for i in 0..oh {
        for j in 0..ow {
            g.push((2.0 * j as f32 + 1.0) / ow as f32 - 1.0);
            g.push((2.0 * i as f32 + 1.0) / oh as f32 - 1.0);
        }
    }
    let grid = Tensor::from_vec(g, (1, oh, ow, 2), &Device::Cpu)
        .unwrap()
        .repeat((2, 1, 1, 1))
        .unwrap();
    let gs = grid_sample_bilinear(&x, &grid).unwrap();
    assert_close(
        &grid_sample_bilinear_composed(&x, &grid).unwrap(),
        &gs,
        1e-6,
        "composed",
    );
    let rs = resize_bilinear(&x, (oh, ow), false).unwrap();
    // Rows/cols 1..n-1 sample strictly inside the source.
    let inner = |t: &Tensor| {
        t.narrow(2, 1, oh - 2)
            .unwrap()
            .narrow(3, 1, ow - 2)
            .unwrap()
    };
    assert_close(&inner(&gs), &inner(&rs), 1e-5, "grid_sample vs resize");
}

#[test]
fn point_sample_is_grid_sample_of_unit_coords() {
    let coords = Tensor::new(
        &[[[0.5f32 / 3.0, 0.25], [0.5, 0.5], [0.0, 0.0], [1.2, 0.5]]],
        &Device::Cpu,
    )
    .unwrap();
    let out = point_sample(&image(), &coords).unwrap();
    assert_eq!(out.dims(), &[1, 2, 4]);
    assert_values(
        &out,
        &[1.0, 3.5, 0.25, 0.0, 10.0, 35.0, 2.5, 0.0],
        1e-5,
        "point_sample",
    );
}

#[test]
fn sampling_rejects_bad_shapes() {
    let img = image();
    let bad_grid = Tensor::zeros((1, 2, 5, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(grid_sample_bilinear(&img, &bad_grid).is_err());
    let wrong_batch = Tensor::zeros((2, 2, 5, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(grid_sample_bilinear(&img, &wrong_batch).is_err());
    assert!(grid_sample_bilinear_composed(&img, &wrong_batch).is_err());
    // No channels, or no sample points.
    let no_channels = Tensor::zeros((1, 0, 2, 3), DType::F32, &Device::Cpu).unwrap();
    let grid = Tensor::zeros((1, 2, 5, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(grid_sample_bilinear(&no_channels, &grid).is_err());
    let no_points = Tensor::zeros((1, 0, 5, 2), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        grid_sample_bilinear(&img, &no_points).unwrap().dims(),
        &[1, 2, 0, 5]
    );
    let coords = Tensor::zeros((1, 4, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(point_sample(&img.i(0).unwrap(), &coords).is_err());
    assert!(point_sample(&img.to_dtype(DType::U8).unwrap(), &coords).is_err());
    assert!(point_sample(
        &img,
        &Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap()
    )
    .is_err());
}

/// The CPU point-sampling kernel against the deformable-attention core (the route CUDA takes)
/// and the composed path, on several maps with one channel (the kernel's direct path) and with
/// many (its shared taps), points inside, on the border and outside: the same values, and the
/// same input gradient.
#[test]
fn point_sample_kernel_matches_the_deformable_core_and_the_composed_path() {
    for c in [1, 5] {
        kernel_matches_core_and_composed(c);
    }
}

fn kernel_matches_core_and_composed(c: usize) {
    use candle_core::Var;
    let mut rng = Rng::new(11 + c as u64);
    let (b, h, w, p) = (3, 7, 9, 3001);
    let input = Var::from_tensor(&rng.tensor(&[b, c, h, w], -1.0, 1.0, DType::F32)).unwrap();
    let coords = rng.tensor(&[b, p, 2], -0.1, 1.1, DType::F32);
    let ours = point_sample(&input, &coords).unwrap();
    assert_eq!(ours.dims(), &[b, c, p]);
    let value = input.permute((0, 2, 3, 1)).unwrap().reshape((b, h * w, 1, c)).unwrap();
    let loc = coords.reshape((b, p, 1, 1, 1, 2)).unwrap();
    let ones = Tensor::ones((b, p, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let core = ops::deform::ms_deform_attn_core(&value, &[(h, w)], &loc, &ones)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert_close(&ours, &core, 1e-6, "kernel vs deformable core");
    let grid = coords.affine(2.0, -1.0).unwrap().reshape((b, 1, p, 2)).unwrap();
    let composed = grid_sample_bilinear_composed(&input, &grid).unwrap().squeeze(2).unwrap();
    assert_close(&ours, &composed, 1e-5, "kernel vs composed");

    let weights = rng.tensor(&[b, c, p], -1.0, 1.0, DType::F32);
    let grad_of = |out: &Tensor| {
        let g = (out * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        g.get(&input).unwrap().clone()
    };
    assert_close(&grad_of(&ours), &grad_of(&core), 1e-5, "input gradient vs deformable core");
    assert_close(&grad_of(&ours), &grad_of(&composed), 1e-5, "input gradient vs composed");
}

/// Detached points (the point losses') receive no gradient and leave the input's unchanged;
/// tracked points receive one.
#[test]
fn point_sample_skips_the_gradient_of_detached_points() {
    use candle_core::Var;
    let mut rng = Rng::new(12);
    let input = Var::from_tensor(&rng.tensor(&[4, 1, 6, 6], -1.0, 1.0, DType::F32)).unwrap();
    let points = rng.tensor(&[4, 50, 2], 0.0, 1.0, DType::F32);
    let tracked = Var::from_tensor(&points).unwrap();
    let detached = tracked.as_detached_tensor();
    let g_detached = point_sample(&input, &detached).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g_tracked = point_sample(&input, &tracked).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g_detached.get(&detached).is_none(), "detached points got a gradient");
    let g_points = g_tracked.get(&tracked).expect("tracked points get a gradient");
    assert!(to_vec_f32(g_points).iter().any(|&x| x != 0.0));
    assert_close(g_detached.get(&input).unwrap(), g_tracked.get(&input).unwrap(), 0.0, "input gradient");
}

/// A NaN point reads NaN in every channel, as torch's grid_sample does; the other points of
/// the same map are untouched.
#[test]
fn a_nan_point_reads_nan() {
    let mut c = vec![0.5f32; 8];
    c[2] = f32::NAN; // point 1, x
    let coords = Tensor::from_vec(c, (1, 4, 2), &Device::Cpu).unwrap();
    let out = point_sample(&image(), &coords).unwrap(); // (1, 2, 4)
    let v = to_vec_f32(&out);
    for (i, x) in v.iter().enumerate() {
        assert_eq!(x.is_nan(), i % 4 == 1, "element {i}: {x}");
    }
}

fn to_vec_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
