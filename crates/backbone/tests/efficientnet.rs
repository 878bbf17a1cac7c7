//! EfficientNet-Lite0 with the real ImageNet weights: classifying photos end to end tests the
//! legacy reader, the BN folding, TF "SAME" padding and every block.

use std::path::PathBuf;

use backbone::preprocess::normalize;
use backbone::{Backbone, EfficientNetLite0};
use candle_core::{Device, Tensor, D};

mod common;

/// The weights and the photo folder; a test fails without them unless
/// `MMFORMER_SKIP_ASSET_TESTS=1` (then it prints `SKIPPED <test>` and passes).
fn assets(test: &str) -> Option<(PathBuf, PathBuf)> {
    let weights = common::lite0_or_skip(test)?;
    let photos = backbone::assets::assets_dir().join("skimage");
    for photo in ["chelsea.png", "coffee.png"] {
        common::asset_or_skip(test, photos.join(photo))?;
    }
    Some((weights, photos))
}

/// PIL's `Image.resize(..., BILINEAR)` along one axis of 8-bit data: a triangle filter widened
/// by the downscale factor (antialiasing), weights normalised per output pixel, result rounded
/// and clipped to 0..=255. `src` holds `n_in` samples `stride` apart, for `lines` lines.
fn pil_bilinear_1d(
    src: &[f32],
    n_in: usize,
    n_out: usize,
    stride: usize,
    line_step: usize,
    lines: usize,
) -> Vec<f32> {
    let scale = n_in as f64 / n_out as f64;
    let support = scale.max(1.0);
    let mut out = vec![0f32; n_out * lines];
    for o in 0..n_out {
        let center = (o as f64 + 0.5) * scale;
        let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
        let hi = ((center + support + 0.5).floor() as usize).min(n_in);
        let ws: Vec<f64> = (lo..hi)
            .map(|j| (1.0 - ((j as f64 - center + 0.5) / support).abs()).max(0.0))
            .collect();
        let total: f64 = ws.iter().sum();
        for l in 0..lines {
            let v: f64 = (lo..hi)
                .zip(&ws)
                .map(|(j, w)| w * src[l * line_step + j * stride] as f64)
                .sum::<f64>()
                / total;
            out[l * n_out + o] = v.round().clamp(0.0, 255.0) as f32;
        }
    }
    out
}

/// A photo as (1, 3, 224, 224): PIL-style bilinear resize of the uint8 image (horizontal pass,
/// then vertical, as PIL does), then ImageNet normalisation.
fn photo_224(path: &std::path::Path) -> Tensor {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let hwc: Vec<f32> = img.into_raw().into_iter().map(f32::from).collect();
    let mut chw = Vec::with_capacity(3 * 224 * 224);
    for c in 0..3 {
        // Rows of this channel: sample x of row y at (y * w + x) * 3 + c.
        let plane: Vec<f32> = (0..h * w).map(|i| hwc[i * 3 + c]).collect();
        let horiz = pil_bilinear_1d(&plane, w, 224, 1, w, h); // (h, 224)
        let vert = pil_bilinear_1d(&horiz, h, 224, 224, 1, 224); // (224 columns, 224 rows) transposed
        for y in 0..224 {
            for x in 0..224 {
                chw.push(vert[x * 224 + y]);
            }
        }
    }
    let x = Tensor::from_vec(chw, (1, 3, 224, 224), &Device::Cpu).unwrap();
    normalize(&x).unwrap()
}

fn class_name(i: usize) -> &'static str {
    match i {
        281 => "tabby cat",
        282 => "tiger cat",
        283 => "Persian cat",
        284 => "Siamese cat",
        285 => "Egyptian cat",
        967 => "espresso",
        968 => "cup",
        504 => "coffee mug",
        _ => "",
    }
}

/// Top-5 (class, probability), printed.
fn top5(model: &EfficientNetLite0, photo: &str, dir: &std::path::Path) -> Vec<(usize, f32)> {
    let logits = model.classify(&photo_224(&dir.join(photo))).unwrap();
    assert_eq!(logits.dims(), &[1, 1000]);
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let top: Vec<(usize, f32)> = idx[..5].iter().map(|&i| (i, probs[i])).collect();
    println!("{photo}:");
    for (i, p) in &top {
        println!("  {i:4} {p:.4} {}", class_name(*i));
    }
    top
}

#[test]
fn efficientnet_lite0_classifies_chelsea_as_a_cat_and_coffee_as_espresso() {
    let Some((weights, photos)) =
        assets("efficientnet_lite0_classifies_chelsea_as_a_cat_and_coffee_as_espresso")
    else {
        return;
    };
    let model = EfficientNetLite0::from_file(&weights, &Device::Cpu).unwrap();
    let cat = top5(&model, "chelsea.png", &photos);
    assert!(
        (281..=285).contains(&cat[0].0),
        "chelsea.png top-1 is class {} ({:.3})",
        cat[0].0,
        cat[0].1
    );
    let coffee = top5(&model, "coffee.png", &photos);
    assert_eq!(
        coffee[0].0, 967,
        "coffee.png top-1 is class {} ({:.3})",
        coffee[0].0, coffee[0].1
    );
    // The published check gives p ≈ 0.84 for espresso (we get 0.86 with this resize); a subtly
    // broken layer (e.g. padding on the wrong side) costs confidence first.
    assert!(coffee[0].1 > 0.7, "espresso only at p = {:.3}", coffee[0].1);
}

#[test]
fn efficientnet_lite0_feature_taps() {
    let Some((weights, photos)) = assets("efficientnet_lite0_feature_taps") else {
        return;
    };
    let model = EfficientNetLite0::from_file(&weights, &Device::Cpu).unwrap();
    assert_eq!(model.channels(), [24, 40, 112, 320]);
    let x = photo_224(&photos.join("coffee.png"));
    let f = model.forward(&x).unwrap();
    let dims: Vec<&[usize]> = f.as_array().iter().map(|t| t.dims()).collect();
    assert_eq!(
        dims,
        [
            &[1, 24, 56, 56][..],
            &[1, 40, 28, 28],
            &[1, 112, 14, 14],
            &[1, 320, 7, 7]
        ]
    );
    // Odd sizes use asymmetric TF padding: outputs are ceil(H / stride).
    let odd = x.narrow(2, 0, 201).unwrap().narrow(3, 0, 163).unwrap();
    let f = model.forward(&odd).unwrap();
    let dims: Vec<&[usize]> = f.as_array().iter().map(|t| t.dims()).collect();
    assert_eq!(
        dims,
        [
            &[1, 24, 51, 41][..],
            &[1, 40, 26, 21],
            &[1, 112, 13, 11],
            &[1, 320, 7, 6]
        ]
    );
}

/// Against an independent float64 pure-Python implementation (`tests/data/lite0_reference.py`:
/// own pickle reading, unfolded batch norm, direct convolutions) on a 64×96 input, where every
/// stride-2 conv sees an even size and so pads asymmetrically: the classification test alone
/// cannot tell which side gets the extra row.
#[test]
fn efficientnet_lite0_matches_the_python_reference_at_64x96() {
    let Some((weights, _)) = assets("efficientnet_lite0_matches_the_python_reference_at_64x96")
    else {
        return;
    };
    let model = EfficientNetLite0::from_file(&weights, &Device::Cpu).unwrap();
    let (h, w) = (64, 96);
    let x: Vec<f32> = (0..3 * h * w)
        .map(|i| {
            let (c, y, x) = (i / (h * w), (i / w) % h, i % w);
            ((c * 7 + y * 3 + x * 5) % 17) as f32 / 8.0 - 1.0
        })
        .collect();
    let x = Tensor::from_vec(x, (1, 3, h, w), &Device::Cpu).unwrap();

    let text = include_str!("data/lite0_reference_64x96.txt");
    let mut ref_logits = Vec::new();
    let mut ref_taps = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f[0] {
            "logit" => ref_logits.push(f[2].parse::<f64>().unwrap()),
            "tap" => ref_taps.push(
                f[1..]
                    .iter()
                    .map(|v| v.parse::<f64>().unwrap())
                    .collect::<Vec<_>>(),
            ),
            other => panic!("bad reference line {other}"),
        }
    }
    assert_eq!((ref_logits.len(), ref_taps.len()), (1000, 4));

    let logits = model
        .classify(&x)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let max_ref = ref_logits.iter().fold(0f64, |m, v| m.max(v.abs()));
    let max_diff = logits
        .iter()
        .zip(&ref_logits)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    println!("logits: max|diff| = {max_diff:.2e}, max|ref| = {max_ref:.2}");
    assert!(
        max_diff <= 1e-4 * max_ref,
        "logits differ by {max_diff:e} (max|ref| {max_ref})"
    );

    let f = model.forward(&x).unwrap();
    for (t, r) in f.as_array().iter().zip(&ref_taps) {
        let dims: Vec<f64> = t.dims()[1..].iter().map(|&d| d as f64).collect();
        assert_eq!(dims, r[1..4], "tap of block {}", r[0]);
        let v: Vec<f64> = t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let (sum, sumsq) = (v.iter().sum::<f64>(), v.iter().map(|x| x * x).sum::<f64>());
        // |sum| can cancel; bound its error by 1e-4 of sum|x| <= sqrt(n * sumsq).
        let sum_tol = 1e-4 * (v.len() as f64 * r[5]).sqrt();
        println!(
            "block {}: sum {sum:.4} vs {:.4}, sum of squares {sumsq:.2} vs {:.2}",
            r[0], r[4], r[5]
        );
        assert!(
            (sum - r[4]).abs() <= sum_tol,
            "block {} sum {sum} vs {}",
            r[0],
            r[4]
        );
        assert!(
            (sumsq - r[5]).abs() <= 1e-5 * r[5],
            "block {} sum of squares {sumsq} vs {}",
            r[0],
            r[5]
        );
    }
}
