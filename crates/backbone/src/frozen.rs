//! Batch norm folded into the convolution before it, once at load time.

use candle_core::{DType, Tensor};
use ops::conv::{ConvSpec, FrozenConv2d};

use crate::error::Result;
use crate::weights::Weights;

/// A bias-free conv `weight` of `shape` (Cout, Cin/groups, kh, kw) under `conv`, and the frozen
/// batch norm under `norm`, as one conv weight and bias:
/// w' = w·γ/√(var+eps), b' = β − mean·γ/√(var+eps). Computed in f64, stored as f32.
pub(crate) fn fold_conv_norm(
    conv: &Weights,
    norm: &Weights,
    shape: [usize; 4],
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let cout = shape[0];
    let w = conv.get(&shape, "weight")?.to_dtype(DType::F64)?;
    let get = |name: &str| -> Result<Tensor> { Ok(norm.get(&[cout], name)?.to_dtype(DType::F64)?) };
    let (gamma, beta, mean, var) = (
        get("weight")?,
        get("bias")?,
        get("running_mean")?,
        get("running_var")?,
    );
    let scale = (gamma / (var + eps)?.sqrt()?)?;
    let bias = (beta - (mean * &scale)?)?;
    let w = w.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
    // Detached: a VarBuilder over trainable variables must not drag a graph into the frozen model.
    Ok((
        w.to_dtype(DType::F32)?.detach(),
        bias.to_dtype(DType::F32)?.detach(),
    ))
}

/// [`fold_conv_norm`] with a fixed conv geometry (the ResNet convs).
pub(crate) fn conv_norm(
    conv: &Weights,
    norm: &Weights,
    shape: [usize; 4],
    spec: ConvSpec,
    eps: f64,
) -> Result<FrozenConv2d> {
    let (w, b) = fold_conv_norm(conv, norm, shape, eps)?;
    Ok(FrozenConv2d::new(w, Some(b), spec)?)
}
