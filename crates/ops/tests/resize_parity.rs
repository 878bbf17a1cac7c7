//! resize_bilinear against tensors captured from the official code: the decoder's attention
//! masks (logits downsampled to each level) and the masked support features (support label
//! downsampled to each level).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, IndexOp, Tensor};
use common::{assert_close, to_vec};
use ops::position::sine_position_encoding;
use ops::resize::resize_bilinear;

fn parity_dir() -> PathBuf {
    match std::env::var_os("MMFORMER_PARITY_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/parity"),
    }
}

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = parity_dir().join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// `attn_mask.0` = sigmoid(bilinear(pred_masks.0 -> level 0 size, align_corners=False)) < 0.5,
/// flattened. Logits within 1e-5 of 0 may flip either way and are skipped; fully masked rows
/// are cleared by the decoder before capture, so they are skipped too.
#[test]
fn bilinear_downsample_parity_with_decoder_attention_mask() {
    let fwd = load("forward.safetensors");
    let pred = &fwd["decoder.pred_masks.0"]; // (1, Q, H/4, W/4)
    let mask = &fwd["decoder.attn_mask.0"]; // (1, Q, h·w), 1 = not attended
    let (_, nq, len) = mask.dims3().unwrap();
    let want = to_vec(mask);
    let ms = &fwd["pixel_decoder.multi_scale.0"];
    let (_, _, h, w) = ms.dims4().unwrap();
    assert_eq!(h * w, len, "the attention mask covers the first multi-scale level");
    assert_eq!(pred.dim(1).unwrap(), nq);
    let logits = to_vec(&resize_bilinear(pred, (h, w), false).unwrap());
    let (mut compared, mut nonuniform_rows) = (0, 0);
    for q in 0..nq {
        let row = &want[q * len..(q + 1) * len];
        if row.iter().all(|&m| m == 0.0) {
            continue; // possibly a cleared, fully masked row
        }
        nonuniform_rows += 1;
        for j in 0..len {
            let z = logits[q * len + j];
            if z.abs() < 1e-5 {
                continue;
            }
            assert_eq!(
                (z < 0.0) as u8 as f64,
                row[j],
                "query {q} key {j}: logit {z}"
            );
            compared += 1;
        }
    }
    // At least a tenth of the rows and of the entries must be informative.
    assert!(
        nonuniform_rows * 10 > nq && compared * 10 > nq * len,
        "too few informative entries ({compared} of {}, {nonuniform_rows} rows of {nq})",
        nq * len
    );
}

/// `support.masked.l{i}` = `support.conv.l{i}` · bilinear(support label with 255→0,
/// align_corners=False), and `support.pos_masked.l0` = sine encoding · the same mask.
#[test]
fn bilinear_downsample_parity_with_masked_support() {
    let fwd = load("forward.safetensors");
    let inputs = load("inputs.safetensors");
    let label = inputs["support.labels"].i(0).unwrap(); // (160, 128), values {0, 1, 255}
    let label = label
        .ne(255f32)
        .unwrap()
        .to_dtype(label.dtype())
        .unwrap()
        .mul(&label)
        .unwrap();
    let label = label.unsqueeze(0).unwrap().unsqueeze(0).unwrap();
    for l in 0..3 {
        let conv = &fwd[&format!("mm.1shot.shot0.support.conv.l{l}")];
        let want = &fwd[&format!("mm.1shot.shot0.support.masked.l{l}")];
        let (_, _, h, w) = conv.dims4().unwrap();
        let mask = resize_bilinear(&label, (h, w), false).unwrap();
        let got = conv.broadcast_mul(&mask).unwrap();
        let scale = to_vec(want).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert_close(
            &got,
            want,
            1e-6 * scale.max(1.0),
            &format!("masked support l{l}"),
        );
        if l == 0 {
            let pos = sine_position_encoding(1, h, w, 128, &Device::Cpu).unwrap();
            let got = pos.broadcast_mul(&mask).unwrap();
            assert_close(
                &got,
                &fwd["mm.1shot.shot0.support.pos_masked.l0"],
                2e-6,
                "masked support pos",
            );
        }
    }
}
