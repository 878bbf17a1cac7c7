//! Dumps a paper-preset model, a fixed episode and our outputs for `tools/check_episode_torch.py`,
//! which loads the same weights into the PyTorch reference of `cargo xtask bench episode`
//! (`tools/episode_torch.py`) and compares (the two sides compute the same function).
//!
//! ```text
//! cargo test --release -p mmformer --test dump_for_torch -- --ignored --nocapture
//! $HOME/.cache/mmformer/torch-venv/bin/python tools/check_episode_torch.py /tmp/episode_dump.safetensors
//! ```
//!
//! `EPISODE_DUMP` sets the file (default /tmp/episode_dump.safetensors); `EPISODE_DUMP_SIZE=N`
//! makes the query and the supports N×N (e.g. 480, the paper's size); by default the query is
//! 128×160 and the supports 160×128 (different shapes exercise the cross-alignment's key/value
//! resize on both sides; the 4×5 / 5×4 stride-32 maps are upsampled to 15×18 / 18×15).
//!
//! File layout: every model tensor under its official name (`backbone.*`, `sem_seg_head.*`,
//! `conv_*`, `crossat_*`, `fc1.*`, `fc2.*`); `input.query` (1, 3, H, W) and `input.support.{s}`
//! (1, 3, Hs, Ws) normalised images, `input.support_label.{s}` (1, Hs, Ws) with 1 = object,
//! 0 = background, 255 = ignore (s = 0..4); `output.query.res{2..5}`,
//! `output.support{s}.res{3,4,5}`, `output.mask_features`, `output.multi_scale.{0,1,2}`,
//! `output.pred_masks`, `output.attn_mask.{i}` (u8 (1, N, h·w), 1 = not attended, before the
//! fully-masked-row fix, layer i = 0..8), and for K = 1 and 5 shots (supports 0..K-1)
//! `output.{K}shot.{out,cosine,coefficients,query_prototypes,support_prototype}`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use mmformer::model::{mm_features, pos_features};
use mmformer::mm::QueryPass;
use mmformer::{MmFormer, Preset};

/// Deterministic pseudo-random values in [-1, 1) (SplitMix64 of (seed, index)).
fn unit(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_add(1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
}

/// A normalised (1, 3, h, w) image with some structure (per-channel smooth waves) plus noise,
/// roughly zero-mean and unit-variance like a normalised photo.
fn image(h: usize, w: usize, seed: u64) -> Tensor {
    let mut v = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        let (fy, fx, ph) = (0.07 + 0.03 * c as f32 + 0.01 * seed as f32, 0.05 + 0.02 * c as f32, seed as f32 + c as f32);
        for y in 0..h {
            for x in 0..w {
                let wave = (fy * y as f32 + ph).sin() + (fx * x as f32 - 0.5 * ph).cos();
                let i = ((c * h + y) * w + x) as u64;
                v.push(0.6 * wave + 0.8 * unit(seed, i));
            }
        }
    }
    Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
}

/// A (1, h, w) support label: a different ellipse per shot, object 1, background 0; shot 0 has a
/// 255 ring around its ellipse and shot 4 a 255 border (ignore pixels count as background).
fn label(h: usize, w: usize, shot: usize) -> Tensor {
    let (cy, cx, ry, rx) = [(0.55, 0.5, 0.3, 0.36), (0.4, 0.45, 0.25, 0.3), (0.5, 0.6, 0.35, 0.2), (0.6, 0.4, 0.2, 0.25), (0.45, 0.5, 0.3, 0.3)][shot % 5];
    let mut v = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let (fy, fx) = ((y as f64 + 0.5) / h as f64, (x as f64 + 0.5) / w as f64);
            let r = ((fy - cy) / ry).powi(2) + ((fx - cx) / rx).powi(2);
            let border = y < 3 || x < 3 || y + 3 >= h || x + 3 >= w;
            v.push(if shot == 4 && border {
                255f32
            } else if r <= 1.0 {
                1.0
            } else if shot == 0 && r <= 1.25 {
                255.0
            } else {
                0.0
            });
        }
    }
    Tensor::from_vec(v, (1, h, w), &Device::Cpu).unwrap()
}

#[test]
#[ignore]
fn dump_episode_for_torch() {
    let path = std::env::var("EPISODE_DUMP").unwrap_or_else(|_| "/tmp/episode_dump.safetensors".into());
    let ((qh, qw), (sh, sw)) = match std::env::var("EPISODE_DUMP_SIZE").ok().and_then(|s| s.parse::<usize>().ok()) {
        Some(n) => ((n, n), (n, n)),
        None => ((128, 160), (160, 128)),
    };
    let dev = Device::Cpu;
    let model = MmFormer::synthetic(Preset::Paper, 7, &dev).unwrap();

    let query = image(qh, qw, 1);
    let supports: Vec<Tensor> = (0..5).map(|s| image(sh, sw, 10 + s as u64)).collect();
    let labels: Vec<Tensor> = (0..5).map(|s| label(sh, sw, s)).collect();

    let mut t: HashMap<String, Tensor> = model.weights().iter().map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).unwrap())).collect();
    let n_weights = t.len();
    t.insert("input.query".into(), query.clone());
    for (s, (x, l)) in supports.iter().zip(&labels).enumerate() {
        t.insert(format!("input.support.{s}"), x.clone());
        t.insert(format!("input.support_label.{s}"), l.clone());
    }

    // The query pass, piece by piece, as `MmFormer::query` computes it.
    let f = model.backbone.forward(&query).unwrap();
    for (name, x) in ["res2", "res3", "res4", "res5"].iter().zip([&f.res2, &f.res3, &f.res4, &f.res5]) {
        t.insert(format!("output.query.{name}"), x.clone());
    }
    let pos = model.pos.forward(&pos_features(&f)).unwrap();
    t.insert("output.pred_masks".into(), pos.pred_masks.clone());
    t.insert("output.mask_features".into(), pos.mask_features.clone());
    for (i, m) in pos.multi_scale.iter().enumerate() {
        t.insert(format!("output.multi_scale.{i}"), m.contiguous().unwrap());
    }
    for (i, m) in pos.attn_masks.iter().enumerate() {
        t.insert(format!("output.attn_mask.{i}"), m.to_dtype(DType::U8).unwrap());
    }
    let pass = QueryPass { features: mm_features(&f), proposal_logits: pos.pred_masks.clone() };
    // The same pass through the public entry point gives the same proposals.
    let again = model.query(&query).unwrap();
    let d = (again.proposal_logits - &pass.proposal_logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d == 0.0, "MmFormer::query differs from backbone + POS by {d}");

    let feats: Vec<[Tensor; 3]> = supports.iter().map(|x| model.support(x).unwrap()).collect();
    for (s, [r5, r4, r3]) in feats.iter().enumerate() {
        t.insert(format!("output.support{s}.res5"), r5.clone());
        t.insert(format!("output.support{s}.res4"), r4.clone());
        t.insert(format!("output.support{s}.res3"), r3.clone());
    }
    for k in [1usize, 5] {
        let out = model.matching(&pass, &feats[..k], &labels[..k], (qh, qw)).unwrap();
        for (name, x) in [
            ("out", &out.out),
            ("cosine", &out.cosine),
            ("coefficients", &out.coefficients),
            ("query_prototypes", &out.query_prototypes),
            ("support_prototype", &out.support_prototype),
        ] {
            t.insert(format!("output.{k}shot.{name}"), x.contiguous().unwrap());
        }
        // `MmFormer::episode` (the whole thing from images) agrees with the pieces.
        let whole = model.episode(&query, &supports[..k], &labels[..k]).unwrap();
        let d = (whole.out - &out.out).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d == 0.0, "MmFormer::episode differs from its pieces by {d} ({k}-shot)");
        let c: Vec<f32> = out.cosine.flatten_all().unwrap().to_vec1().unwrap();
        let (lo, hi) = c.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        println!("{k}-shot: cosine in [{lo:.4}, {hi:.4}]");
    }
    let t: HashMap<String, Tensor> = t.into_iter().map(|(k, v)| (k, v.contiguous().unwrap())).collect();
    candle_core::safetensors::save(&t, &path).unwrap();
    println!("wrote {path}: {n_weights} weights, query {qh}x{qw}, supports {sh}x{sw}");
}
