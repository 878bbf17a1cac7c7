//! Sine positional encoding against tensors captured from the official MM-Former code.

mod common;

use std::path::PathBuf;

use candle_core::{Device, IndexOp};
use common::assert_close;
use ops::position::sine_position_encoding;

fn parity_dir() -> PathBuf {
    match std::env::var_os("MMFORMER_PARITY_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/parity"),
    }
}

#[test]
fn sine_position_encoding_parity_with_fixture() {
    let path = parity_dir().join("forward.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
    let mut checked = 0;
    for key in [
        "mm.1shot.shot0.query.pos.l0",
        "mm.1shot.shot0.query.pos.l1",
        "mm.1shot.shot0.query.pos.l2",
    ] {
        let Some(want) = tensors.get(key) else {
            assert_ne!(key, "mm.1shot.shot0.query.pos.l0", "fixture lacks {key}");
            continue;
        };
        let (b, c, h, w) = want.dims4().unwrap();
        let got = sine_position_encoding(b, h, w, c / 2, &Device::Cpu).unwrap();
        assert_close(&got, want, 2e-6, key);
        // The token layout holds the same values.
        let tokens = ops::position::sine_position_tokens(b, h, w, c / 2, &Device::Cpu).unwrap();
        assert_close(&tokens, &ops::nn::map_to_tokens(&got).unwrap(), 0.0, &format!("{key} as tokens"));
        checked += 1;
    }
    assert!(checked >= 2, "expected the l0 and l1 fixtures");
}

#[test]
fn sine_position_encoding_layout() {
    let pos = sine_position_encoding(2, 3, 4, 8, &Device::Cpu).unwrap();
    assert_eq!(pos.dims(), &[2, 16, 3, 4]);
    let scale = 2.0 * std::f64::consts::PI;
    // Channel 0: sin of the normalised row index; it varies along y only.
    let y_embed = |i: usize| (i + 1) as f64 / (3.0 + 1e-6) * scale;
    let x_embed = |j: usize| (j + 1) as f64 / (4.0 + 1e-6) * scale;
    let v = |c: usize, i: usize, j: usize| {
        pos.i((1, c, i, j)).unwrap().to_scalar::<f32>().unwrap() as f64
    };
    for i in 0..3 {
        for j in 0..4 {
            assert!((v(0, i, j) - y_embed(i).sin()).abs() < 1e-5);
            assert!((v(1, i, j) - y_embed(i).cos()).abs() < 1e-5);
            // Channels 2,3 use dim_t = 10000^(2/8).
            assert!((v(3, i, j) - (y_embed(i) / 10f64).cos()).abs() < 1e-5);
            assert!((v(8, i, j) - x_embed(j).sin()).abs() < 1e-5);
            assert!((v(9, i, j) - x_embed(j).cos()).abs() < 1e-5);
        }
    }
    assert!(sine_position_encoding(1, 3, 4, 7, &Device::Cpu).is_err());
}
