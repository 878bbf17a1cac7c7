//! Self-alignment (`MySelfAlignLayer.spatial_pool`, spec §3.2): a parameter-free channel gate.

use candle_core::{bail, Result, Tensor};

/// `F' = F ⊙ σ(F · softmax_N(mean_C F))` per sample.
///
/// The channel mean at each position becomes a spatial attention `a` (softmax over the H·W
/// positions), `z = F·a` pools every channel with it, and `σ(z)` rescales each channel.
///
/// `x`: (B, C, H, W) -> (B, C, H, W).
pub fn self_align(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = match x.dims() {
        &[b, c, h, w] => (b, c, h, w),
        _ => bail!("self_align: expected a (B, C, H, W) feature map, got {:?}", x.shape()),
    };
    let f = x.reshape((b, c, h * w))?;
    let a = ops::nn::softmax(&f.mean_keepdim(1)?, 2)?; // (B, 1, N)
    let z = f.matmul(&a.transpose(1, 2)?)?; // (B, C, 1)
    let gate = candle_nn::ops::sigmoid(&z)?.reshape((b, c, 1, 1))?;
    x.broadcast_mul(&gate)
}
