//! `ops::conv::max_pool2d` against a direct loop with PyTorch's rule (padding never wins).

use candle_core::{DType, Device, Tensor};
use ops::conv::max_pool2d;

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn naive(x: &Tensor, k: usize, s: usize, p: usize) -> (Vec<usize>, Vec<f32>) {
    let (n, c, h, w) = x.dims4().unwrap();
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ho = (h + 2 * p - k) / s + 1;
    let wo = (w + 2 * p - k) / s + 1;
    let mut out = Vec::new();
    for plane in 0..n * c {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut m = f32::NEG_INFINITY;
                for ky in 0..k {
                    for kx in 0..k {
                        let (iy, ix) = (
                            (oy * s + ky) as isize - p as isize,
                            (ox * s + kx) as isize - p as isize,
                        );
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            m = m.max(v[plane * h * w + iy as usize * w + ix as usize]);
                        }
                    }
                }
                out.push(m);
            }
        }
    }
    (vec![n, c, ho, wo], out)
}

#[test]
fn max_pool_matches_direct_loop_with_negative_inputs() {
    // All-negative data: zero padding would win the max, -inf padding must not.
    for (shape, k, s, p, seed) in [
        ([1, 3, 17, 16], 3, 2, 1, 1u64),
        ([2, 4, 12, 13], 3, 2, 1, 2),
        ([1, 2, 9, 9], 2, 2, 0, 3),
        ([1, 1, 10, 7], 3, 1, 1, 4),
        ([1, 2, 11, 11], 5, 3, 2, 5),
    ] {
        let x = (seeded(&shape, seed) - 1.5).unwrap();
        let (dims, want) = naive(&x, k, s, p);
        let got = max_pool2d(&x, k, s, p).unwrap();
        assert_eq!(got.dims(), &dims[..], "shape for {shape:?} k{k} s{s} p{p}");
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want,
            "{shape:?} k{k} s{s} p{p}"
        );
        // The candle fallback (f64) agrees.
        let got64 = max_pool2d(&x.to_dtype(DType::F64).unwrap(), k, s, p).unwrap();
        assert_eq!(
            got64
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            want
        );
    }
}

#[test]
fn max_pool_resnet_stem_shape_and_values() {
    let x = Tensor::arange(0f32, 36., &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 6, 6))
        .unwrap();
    let y = max_pool2d(&x, 3, 2, 1).unwrap();
    assert_eq!(y.dims(), &[1, 1, 3, 3]);
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![7., 9., 11., 19., 21., 23., 31., 33., 35.]
    );
    let x = x.transpose(2, 3).unwrap();
    let y = max_pool2d(&x, 3, 2, 1).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![7., 19., 31., 9., 21., 33., 11., 23., 35.]
    );
}

#[test]
fn max_pool_errors() {
    let x = seeded(&[1, 2, 5, 5], 9);
    let e = max_pool2d(&seeded(&[2, 5, 5], 1), 3, 2, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("input must be (N, C, H, W)"), "{e}");
    let e = max_pool2d(&x, 0, 2, 0).unwrap_err().to_string();
    assert!(e.contains("must be >= 1"), "{e}");
    let e = max_pool2d(&x, 3, 2, 2).unwrap_err().to_string();
    assert!(e.contains("at most half the kernel"), "{e}");
    let e = max_pool2d(&x, 7, 1, 0).unwrap_err().to_string();
    assert!(e.contains("smaller than the kernel"), "{e}");
}
