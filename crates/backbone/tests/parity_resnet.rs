//! ResNet-50 and the input pipeline against the official V1 code (parity fixtures, README §3),
//! on the formula weights with the calibrated FrozenBN statistics.

use backbone::{preprocess, Backbone, ResNet50, ResNetConfig, Weights};
use candle_core::{Device, Tensor};
use parity::{assert_close, load_fixture, FormulaWeights, ABS_TOL, REL_TOL};

fn formula_resnet() -> ResNet50 {
    let vb = FormulaWeights::with_calibration().unwrap().var_builder();
    ResNet50::new(
        &ResNetConfig::r50(),
        Weights::from_var_builder(vb).pp("backbone"),
    )
    .unwrap()
}

#[test]
fn parity_preprocess_matches_official_normalisation() {
    let inputs = load_fixture("inputs.safetensors").unwrap();
    let fwd = load_fixture("forward.safetensors").unwrap();
    let ours = preprocess(&inputs.get("query.image").unwrap()).unwrap();
    let reference = fwd.get("query.image_normalized_padded").unwrap();
    // Same f32 operations in the same order: equal to the bit.
    assert_eq!(ours.dims(), reference.dims());
    let (d, _) = parity::max_abs_diff(&ours, &reference).unwrap();
    assert_eq!(
        d, 0.0,
        "preprocess differs from query.image_normalized_padded by {d:e}"
    );
}

#[test]
fn preprocess_pads_bottom_right_with_zero_after_normalising() {
    let inputs = load_fixture("inputs.safetensors").unwrap();
    // The image cut by a few rows and columns must come back padded to the next multiples of 32
    // with zeros in the new rows / columns.
    let full_image = inputs.get("query.image").unwrap();
    let (_, fh, fw) = full_image.dims3().unwrap();
    // Not a multiple of 32, so that padding adds at least one row / column.
    let cut = |n: usize, by: usize| {
        let c = n.saturating_sub(by).max(1);
        if c % 32 == 0 && c > 1 { c - 1 } else { c }
    };
    let (ch, cw) = (cut(fh, 28), cut(fw, 10));
    let (ph, pw) = (ch.div_ceil(32) * 32, cw.div_ceil(32) * 32);
    let image = full_image.narrow(1, 0, ch).unwrap().narrow(2, 0, cw).unwrap();
    let x = preprocess(&image).unwrap();
    assert_eq!(x.dims(), &[1, 3, ph, pw]);
    let full = preprocess(&full_image).unwrap();
    let inner = x.narrow(2, 0, ch).unwrap().narrow(3, 0, cw).unwrap();
    let (d, _) = parity::max_abs_diff(
        &inner,
        &full.narrow(2, 0, ch).unwrap().narrow(3, 0, cw).unwrap(),
    )
    .unwrap();
    assert_eq!(d, 0.0);
    let bottom = x
        .narrow(2, ch, ph - ch)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let right = x
        .narrow(3, cw, pw - cw)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!((bottom, right), (0.0, 0.0));
    // The same image as interleaved bytes.
    let hwc = image
        .permute((1, 2, 0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let y = backbone::preprocess_hwc(&hwc, ch, cw, &Device::Cpu).unwrap();
    assert_eq!(parity::max_abs_diff(&x, &y).unwrap().0, 0.0);
}

#[test]
fn parity_resnet50_query_res2_to_res5() {
    let fwd = load_fixture("forward.safetensors").unwrap();
    let model = formula_resnet();
    let x = fwd.get("query.image_normalized_padded").unwrap();
    let f = model.forward(&x).unwrap();
    for (name, ours) in ["res2", "res3", "res4", "res5"].iter().zip(f.as_array()) {
        let what = format!("backbone.query.{name}");
        let rel = assert_close(&what, ours, &fwd.get(&what).unwrap(), REL_TOL, ABS_TOL);
        println!("{what}: max|diff| / max|ref| = {rel:.2e}");
    }
}

#[test]
fn parity_resnet50_support0_res3_to_res5() {
    let inputs = load_fixture("inputs.safetensors").unwrap();
    let fwd = load_fixture("forward.safetensors").unwrap();
    let model = formula_resnet();
    let support: Tensor = inputs.get("support.images").unwrap().get(0).unwrap();
    let f = model.forward(&preprocess(&support).unwrap()).unwrap();
    for (name, ours) in [("res3", &f.res3), ("res4", &f.res4), ("res5", &f.res5)] {
        let what = format!("backbone.support0.{name}");
        let rel = assert_close(&what, ours, &fwd.get(&what).unwrap(), REL_TOL, ABS_TOL);
        println!("{what}: max|diff| / max|ref| = {rel:.2e}");
    }
}

#[test]
fn resnet50_shapes_and_channels_at_odd_sizes() {
    // Any size works; outputs are ceil(H / stride) as with torch's conv arithmetic.
    let model = ResNet50::synthetic(1, &Device::Cpu).unwrap();
    assert_eq!(model.channels(), [256, 512, 1024, 2048]);
    let x = Tensor::randn(0f32, 1f32, (2, 3, 70, 45), &candle_core::Device::Cpu).unwrap();
    let f = model.forward(&x).unwrap();
    let dims: Vec<&[usize]> = f.as_array().iter().map(|t| t.dims()).collect();
    assert_eq!(
        dims,
        [
            &[2, 256, 18, 12][..],
            &[2, 512, 9, 6],
            &[2, 1024, 5, 3],
            &[2, 2048, 3, 2]
        ]
    );
    // Images of a batch do not mix: image 1 alone gives the same features (up to summation
    // order, should the conv tile across images).
    let single = model.forward(&x.narrow(0, 1, 1).unwrap()).unwrap();
    for (b, s) in f.as_array().iter().zip(single.as_array()) {
        assert_close("batch vs single", &b.narrow(0, 1, 1).unwrap(), s, 1e-5, 0.0);
    }
    assert!(model.forward(&x.narrow(1, 0, 1).unwrap()).is_err());
}
