//! `ops::gemm_flops` counts exactly the products the kernels run. A test binary of its own: the
//! counter is process-wide, so no other test may run products beside this one.

use candle_core::{Device, Tensor, Var};

fn values(shape: &[usize], seed: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32 + 0.5) * 0.618 + seed).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The operations of one call: the counter's change over it.
fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ops::gemm_flops();
    let r = f();
    (r, ops::gemm_flops() - before)
}

#[test]
fn the_counter_adds_two_m_n_k_per_product() {
    // The counts are the fused kernels' (`OPS_COMPOSED=1` would route these ops through candle).
    ops::set_fused_kernels(true);
    // A linear: forward x Wᵀ; backward dx = dy W and dW = dyᵀ x, each the forward's size, however
    // the rows are split over threads.
    let (n, d_in, d_out) = (37usize, 24usize, 16usize);
    let x = Var::from_tensor(&values(&[n, d_in], 0.1)).unwrap();
    let w = Var::from_tensor(&values(&[d_out, d_in], 0.2)).unwrap();
    let b = Var::from_tensor(&values(&[d_out], 0.3)).unwrap();
    let (y, fwd) = counted(|| ops::nn::linear(&x, &w, Some(&b)).unwrap());
    let one = 2 * (n * d_in * d_out) as u64;
    assert_eq!(fwd, one);
    let (grads, bwd) = counted(|| y.sum_all().unwrap().backward().unwrap());
    assert_eq!(bwd, 2 * one);
    assert!(grads.get(&w).is_some() && grads.get(&x).is_some());

    // Attention: Q Kᵀ and P V per head forward; dP, dQ, dK and dV backward (the probabilities
    // are kept at this size, so none are recomputed).
    let (bsz, lq, lk, heads, dh) = (2usize, 19usize, 11usize, 3usize, 4usize);
    let q = Var::from_tensor(&values(&[bsz, lq, heads * dh], 0.4)).unwrap();
    let k = Var::from_tensor(&values(&[bsz, lk, heads * dh], 0.5)).unwrap();
    let v = Var::from_tensor(&values(&[bsz, lk, heads * dh], 0.6)).unwrap();
    let (o, fwd) = counted(|| ops::attention::scaled_dot_product_attention(&q, &k, &v, heads, None).unwrap());
    let per_product = 2 * (bsz * heads * lq * lk * dh) as u64;
    assert_eq!(fwd, 2 * per_product);
    let (_, bwd) = counted(|| o.sum_all().unwrap().backward().unwrap());
    assert_eq!(bwd, 4 * per_product);

    // Element-wise work adds nothing.
    let (_, none) = counted(|| (x.as_tensor() * 2.0).unwrap().exp().unwrap());
    assert_eq!(none, 0);
}
