//! Shared tensor primitives for MM-Former.
//!
//! candle 0.11.1 lacks some operations the model needs, and several of its fused kernels
//! (`candle_nn::ops::softmax_last_dim`, `candle_nn::ops::layer_norm`, `candle_nn::LayerNorm`)
//! silently return no gradient. Everything here is composed from candle primitives that do carry
//! gradients (matmul, broadcast arithmetic, reductions, `index_select`, `where_cond`), so
//! `Tensor::backward` works through all of it.
//!
//! - [`conv`]: fast CPU convolution (NCHW, f32).
//! - [`nn`]: gradient-carrying [`nn::softmax`], [`nn::LayerNorm`], [`nn::GroupNorm`] and the
//!   Mask2Former [`nn::Mlp`].
//! - [`resize`]: bilinear resize with torch `F.interpolate` semantics (differentiable) and torch
//!   `nearest` resize for labels.
//! - [`sample`]: torch `F.grid_sample` (bilinear, zero padding, `align_corners=False`) with
//!   gradients for input and grid, and Mask2Former's `point_sample`.
//! - [`deform`]: multi-scale deformable attention (Deformable-DETR `MSDeformAttn`).
//! - [`position`]: DETR/Mask2Former sine positional encoding.
//! - [`attention`]: `nn.MultiheadAttention` (batch-first) with boolean masks.
//!
//! All float operations accept f32 (the model's dtype) and f64 (used by the gradient checks).

pub mod attention;
pub mod conv;
pub mod deform;
pub mod nn;
pub mod position;
pub mod resize;
pub mod sample;

pub(crate) mod util;
