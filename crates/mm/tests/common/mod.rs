//! Small deterministic episodes for behaviour and gradient tests.

#![allow(dead_code)]

use candle_core::{Device, Tensor};
use mm::{LevelFeatures, MmConfig};

/// A small configuration: 3 levels of 24/16/8 channels, width 16, 4 heads, 6 proposals, and a
/// key/value size of 4 so that level l1 (4×6) takes the "no resize" path and the others resize.
pub fn small_config() -> MmConfig {
    MmConfig {
        in_channels: [24, 16, 8],
        hidden_dim: 16,
        num_heads: 4,
        dim_feedforward: 32,
        num_cross_layers: 2,
        kv_min_size: 4,
        num_queries: 6,
        ..MmConfig::resnet50()
    }
}

/// Deterministic values in (-1, 1) named by `seed` (the parity formula's hash stream).
pub fn pseudo(seed: &str, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = parity::unit(seed, n).into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Non-negative backbone-like features at strides 32/16/8 of an `h`×`w` image.
pub fn features(seed: &str, cfg: &MmConfig, batch: usize, h: usize, w: usize) -> LevelFeatures {
    let strides = [32, 16, 8];
    std::array::from_fn(|i| {
        let shape = [batch, cfg.in_channels[i], h / strides[i], w / strides[i]];
        pseudo(&format!("{seed}.l{i}"), &shape).relu().unwrap().affine(3.0, 0.0).unwrap()
    })
}

/// A (B, h, w) 0/1 label: a centred rectangle of foreground, with a 255 border row.
pub fn label(batch: usize, h: usize, w: usize) -> Tensor {
    let mut v = vec![0f32; batch * h * w];
    for b in 0..batch {
        for y in 0..h {
            for x in 0..w {
                let i = (b * h + y) * w + x;
                if y == 0 {
                    v[i] = 255.0;
                } else if y >= h / 4 + b && y < 3 * h / 4 && x >= w / 4 && x < 3 * w / 4 + b {
                    v[i] = 1.0;
                }
            }
        }
    }
    Tensor::from_vec(v, (batch, h, w), &Device::Cpu).unwrap()
}

/// (B, N, h/4, w/4) proposal logits.
pub fn proposal_logits(seed: &str, cfg: &MmConfig, batch: usize, h: usize, w: usize) -> Tensor {
    pseudo(seed, &[batch, cfg.num_queries, h / 4, w / 4]).affine(6.0, 0.0).unwrap()
}
