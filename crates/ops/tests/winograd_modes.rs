//! The Winograd switch (`ops::conv::set_winograd_variant`), in a process of its own because it
//! is process-wide: a convolution built under one variant and run under another re-transforms
//! its weights, and all variants agree with the direct sums within their rounding.

use candle_core::{Device, Tensor};
use ops::conv::{set_winograd_variant, winograd, Activation, ConvSpec, FrozenConv2d, Winograd};

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

#[test]
fn every_variant_matches_the_direct_sum_whichever_it_was_built_under() {
    assert_eq!(winograd(), Winograd::F4, "F(4×4) is the default");
    let dev = Device::Cpu;
    // 64 → 64 channels at 40×36: eligible (≥ 64 channels, ≥ 200 F(2×2) tiles), with partial tiles.
    let w = Tensor::rand(-0.05f32, 0.05, (64, 64, 3, 3), &dev).unwrap();
    let b = Tensor::rand(-0.1f32, 0.1, 64, &dev).unwrap();
    let x = Tensor::rand(-1f32, 1., (1, 64, 40, 36), &dev).unwrap();
    let spec = ConvSpec::same_as_torch(1, 1);
    let built_f4 = FrozenConv2d::new(w.clone(), Some(b.clone()), spec).unwrap();
    set_winograd_variant(Winograd::Off);
    let direct = built_f4.forward(&x, Activation::Relu, None).unwrap();
    let built_off = FrozenConv2d::new(w.clone(), Some(b.clone()), spec).unwrap();
    for mode in [Winograd::F2, Winograd::F4] {
        set_winograd_variant(mode);
        let tol = if mode == Winograd::F2 { 1e-5 } else { 1e-4 };
        for (what, conv) in [("built under F4", &built_f4), ("built with Winograd off", &built_off)] {
            let got = conv.forward(&x, Activation::Relu, None).unwrap();
            let e = max_rel(&got, &direct);
            assert!(e <= tol, "{mode:?}, {what}: max error {e} of the output scale");
        }
    }
    set_winograd_variant(Winograd::F2);
    let f2 = built_f4.forward(&x, Activation::Relu, None).unwrap();
    set_winograd_variant(Winograd::F4);
    let f4 = built_f4.forward(&x, Activation::Relu, None).unwrap();
    assert!(max_rel(&f2, &f4) > 0.0, "the two variants round differently, so both ran");
}
