//! Trainable convolution and linear building blocks shared by the pixel decoder and the
//! transformer decoder, with the init hints of the official code for weights a `VarMap` creates.

use candle_core::{bail, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use ops::conv::{Activation, ConvSpec};

/// GroupNorm epsilon of torch's default.
pub(crate) const GN_EPS: f64 = 1e-5;
/// LayerNorm epsilon of torch's default.
pub(crate) const LN_EPS: f64 = 1e-5;

/// torch `xavier_uniform_` bound for a (fan_out, fan_in) weight.
pub(crate) fn xavier(fan_in: usize, fan_out: usize) -> Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// detectron2 `c2_xavier_fill` = `kaiming_uniform_(a=1)`: bound sqrt(3 / fan_in).
pub(crate) fn c2_xavier(fan_in: usize) -> Init {
    let bound = (3.0 / fan_in as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// `nn.Linear(n_in, n_out)` with a xavier-uniform weight (Mask2Former re-initialises every
/// matrix of its transformer layers that way) and torch's default bias init.
pub(crate) fn linear_xavier(n_in: usize, n_out: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((n_out, n_in), "weight", xavier(n_in, n_out))?;
    let bound = 1.0 / (n_in as f64).sqrt();
    let b = vb.get_with_hints(n_out, "bias", Init::Uniform { lo: -bound, up: bound })?;
    Ok(Linear::new(w, Some(b)))
}

fn dims4(x: &Tensor, what: &str) -> Result<(usize, usize, usize, usize)> {
    match x.dims() {
        &[b, c, h, w] => Ok((b, c, h, w)),
        _ => bail!("{what}: expected a (B, C, H, W) input, got {:?}", x.shape()),
    }
}

/// A bias-free 1×1 convolution `weight` [Cout, Cin, 1, 1] as `W · X` per image:
/// (B, Cin, H, W) -> (B, Cout, H, W).
fn channel_matmul(weight: &Tensor, x: &Tensor, what: &str) -> Result<Tensor> {
    let (cout, cin) = (weight.dim(0)?, weight.dim(1)?);
    let (b, c, h, w) = dims4(x, what)?;
    if c != cin {
        bail!("{what}: input has {c} channels, layer expects {cin}");
    }
    ops::nn::weight_matmul(&weight.reshape((cout, cin))?, &x.reshape((b, cin, h * w))?)?.reshape((b, cout, h, w))
}

/// `nn.Conv2d(cin, cout, 1)`. Parameters keep torch's names and shapes: `weight`
/// [Cout, Cin, 1, 1], optional `bias` [Cout].
///
/// When a gradient can be needed (a trainable weight or a tracked input) the convolution is
/// `ops::conv::conv2d_trainable`, whose forward and backward run the fast gemm kernels (candle's
/// matmul backward of a weight broadcast over the batch reduces through slow strided sums);
/// otherwise it is `ops::conv::conv2d` with the bias in its epilogue, or without a bias `W · X`
/// per image, a plain matmul.
#[derive(Debug, Clone)]
pub struct Conv1x1 {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Conv1x1 {
    pub fn new(cin: usize, cout: usize, bias: bool, init: Init, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((cout, cin, 1, 1), "weight", init)?;
        let bias = if bias { Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias })
    }

    /// (B, Cin, H, W) -> (B, Cout, H, W)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = dims4(x, "Conv1x1")?;
        let cin = self.weight.dim(1)?;
        if c != cin {
            bail!("Conv1x1: input has {c} channels, layer expects {cin}");
        }
        let trainable = self.weight.track_op() || x.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        if trainable {
            // The bias is added (and its gradient summed) inside the op.
            return ops::conv::conv2d_trainable(x, &self.weight, self.bias.as_ref(), [0; 4]);
        }
        match &self.bias {
            // The bias added in the convolution's parallel epilogue, not by a single-threaded
            // broadcast add over the output (256 × 120² at the paper size: 11.1 → 10.1 ms, the
            // same values).
            Some(bias) => ops::conv::conv2d(x, &self.weight, Some(bias), ConvSpec::same_as_torch(1, 0), Activation::None, None),
            None => conv(&self.weight, x, "Conv1x1"),
        }
    }
}

/// A bias-free 'same' convolution (odd k, padding k / 2) of `x` with `weight` [Cout, Cin, k, k]:
/// the differentiable fast op when a gradient can be needed, else the inference kernels
/// (a matmul for 1×1, `ops::conv::conv2d` otherwise).
fn conv(weight: &Tensor, x: &Tensor, what: &str) -> Result<Tensor> {
    let (_, cin, k, _) = weight.dims4()?;
    let (_, c, _, _) = dims4(x, what)?;
    if c != cin {
        bail!("{what}: input has {c} channels, layer expects {cin}");
    }
    let p = k / 2;
    if weight.track_op() || x.track_op() {
        ops::conv::conv2d_trainable(x, weight, None, [p; 4])
    } else if k == 1 {
        channel_matmul(weight, x, what)
    } else {
        ops::conv::conv2d(x, weight, None, ConvSpec::same_as_torch(1, p), Activation::None, None)
    }
}

/// detectron2 `Conv2d(cin, cout, k, padding=k/2, bias=False, norm=GroupNorm)`: `weight`
/// [Cout, Cin, k, k] and `norm.{weight,bias}`; forward is `norm(conv(x))` (the activation, where
/// there is one, is the caller's). The convolution is [`conv`]'s (fast forward and backward on
/// CPU), the norm `ops::conv::group_norm` (one fused op with an analytic backward).
#[derive(Debug, Clone)]
pub struct ConvGn {
    weight: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    groups: usize,
}

impl ConvGn {
    pub fn new(cin: usize, cout: usize, k: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        if k % 2 == 0 {
            bail!("ConvGn: kernel size must be odd for 'same' padding, got {k}");
        }
        if groups == 0 || !cout.is_multiple_of(groups) {
            bail!("ConvGn: {cout} channels cannot be split into {groups} groups");
        }
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", c2_xavier(cin * k * k))?;
        // The torch GroupNorm's affine parameters and their default init.
        let norm_weight = vb.pp("norm").get_with_hints(cout, "weight", Init::Const(1.0))?;
        let norm_bias = vb.pp("norm").get_with_hints(cout, "bias", Init::Const(0.0))?;
        Ok(Self { weight, norm_weight, norm_bias, groups })
    }

    /// (B, Cin, H, W) -> (B, Cout, H, W)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv(&self.weight, x, "ConvGn")?;
        ops::conv::group_norm(&y, &self.norm_weight, &self.norm_bias, self.groups, GN_EPS)
    }
}
