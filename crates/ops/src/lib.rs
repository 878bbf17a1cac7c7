//! Shared tensor primitives for MM-Former: the fast CPU convolution and the differentiable
//! operations that candle lacks or gets wrong (gradient-carrying softmax and LayerNorm, bilinear
//! resize and grid sampling with backward, deformable attention, multi-head attention, GroupNorm,
//! sine positional encoding).

pub mod conv;
