//! Trainable convolution and linear building blocks shared by the pixel decoder and the
//! transformer decoder, with the init hints of the official code for weights a `VarMap` creates.

use candle_core::{bail, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use ops::conv::{Activation, ConvSpec};
use ops::nn::GroupNorm;

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
    weight
        .reshape((cout, cin))?
        .broadcast_matmul(&x.reshape((b, cin, h * w))?)?
        .reshape((b, cout, h, w))
}

/// `nn.Conv2d(cin, cout, 1)` computed as a matmul over channels: a 1×1 convolution is exactly
/// `W · X` per image, which is faster than candle's conv2d and carries gradients for free.
/// Parameters keep torch's names and shapes: `weight` [Cout, Cin, 1, 1], optional `bias` [Cout].
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
        let y = channel_matmul(&self.weight, x, "Conv1x1")?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// detectron2 `Conv2d(cin, cout, k, padding=k/2, bias=False, norm=GroupNorm)`: `weight`
/// [Cout, Cin, k, k] and `norm.{weight,bias}`; forward is `norm(conv(x))` (the activation, where
/// there is one, is the caller's). k = 1 runs as a matmul; other sizes run through candle's
/// conv2d, which has a backward, or `ops::conv` when no gradient can be needed.
#[derive(Debug, Clone)]
pub struct ConvGn {
    weight: Tensor,
    norm: GroupNorm,
}

impl ConvGn {
    pub fn new(cin: usize, cout: usize, k: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        if k % 2 == 0 {
            bail!("ConvGn: kernel size must be odd for 'same' padding, got {k}");
        }
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", c2_xavier(cin * k * k))?;
        let norm = GroupNorm::new(groups, cout, GN_EPS, vb.pp("norm"))?;
        Ok(Self { weight, norm })
    }

    /// (B, Cin, H, W) -> (B, Cout, H, W)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, cin, k, _) = self.weight.dims4()?;
        let y = if k == 1 {
            channel_matmul(&self.weight, x, "ConvGn")?
        } else {
            let (_, c, _, _) = dims4(x, "ConvGn")?;
            if c != cin {
                bail!("ConvGn: input has {c} channels, layer expects {cin}");
            }
            if self.weight.track_op() || x.track_op() {
                // Training: candle's conv2d carries the backward.
                x.conv2d(&self.weight, k / 2, 1, 1, 1)?
            } else {
                // Nothing needs a gradient (loaded weights, frozen inputs): the much faster
                // inference-only convolution of `ops` gives the same result.
                let spec = ConvSpec::same_as_torch(1, k / 2);
                ops::conv::conv2d(x, &self.weight, None, spec, Activation::None, None)?
            }
        };
        self.norm.forward(&y)
    }
}
