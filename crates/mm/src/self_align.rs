//! Self-alignment (`MySelfAlignLayer.spatial_pool`, spec §3.2): a parameter-free channel gate.

use candle_core::{Result, Tensor};

/// `F' = F ⊙ σ(F · softmax_N(mean_C F))` per sample.
///
/// The channel mean at each position becomes a spatial attention `a` (softmax over the H·W
/// positions), `z = F·a` pools every channel with it, and `σ(z)` rescales each channel
/// ([`ops::nn::spatial_pool_gate`]: one fused pass on CPU for frozen features).
///
/// `x`: (B, C, H, W) -> (B, C, H, W).
pub fn self_align(x: &Tensor) -> Result<Tensor> {
    ops::nn::spatial_pool_gate(x)
}
