//! Helpers shared by the losses integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform in [lo, hi), f64.
pub fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
}

pub fn rand_tensor(rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| uniform(rng, lo, hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// A random binary (M, H, W) f32 mask stack made of axis-aligned rectangles, so masks are
/// spatially coherent like real objects.
pub fn rect_masks(rng: &mut ChaCha8Rng, m: usize, h: usize, w: usize) -> Tensor {
    let mut data = vec![0f32; m * h * w];
    for k in 0..m {
        let y0 = (uniform(rng, 0.0, 0.6) * h as f64) as usize;
        let x0 = (uniform(rng, 0.0, 0.6) * w as f64) as usize;
        let y1 = (y0 + 2 + (uniform(rng, 0.2, 0.4) * h as f64) as usize).min(h);
        let x1 = (x0 + 2 + (uniform(rng, 0.2, 0.4) * w as f64) as usize).min(w);
        for y in y0..y1 {
            for x in x0..x1 {
                data[k * h * w + y * w + x] = 1.0;
            }
        }
    }
    Tensor::from_vec(data, (m, h, w), &Device::Cpu).unwrap()
}

pub fn to_vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

pub fn scalar(t: &Tensor) -> f64 {
    to_vec_f64(t).iter().sum()
}
