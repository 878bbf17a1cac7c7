//! Normalisation layers, softmax, the linear layer, map ↔ token transpositions, the 1×1
//! convolution from a map to tokens, MM-Former's self-alignment gate and the Mask2Former MLP,
//! built from gradient-carrying candle primitives (candle's fused softmax / layer-norm kernels
//! have no backward), with fused CPU kernels where they pay.

use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::{Init, Linear, Module, VarBuilder};

use crate::fastmath::{fusable, guard_slice};
use crate::util::ensure_float;

mod dice;
mod fused;
mod matmul;
mod pointwise;

/// Numerically stable softmax over `dim`; gradients flow to `x`.
///
/// Over the last dimension on CPU this is one fused op with an analytic backward; otherwise
/// [`softmax_composed`].
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    ensure_float(x, "softmax")?;
    if dim + 1 == x.rank() && fusable(x) {
        let d = x.dim(dim)?;
        return x.contiguous()?.apply_op1(fused::SoftmaxLast { d });
    }
    softmax_composed(x, dim)
}

/// Per row of logits `x` (R, N) against 0/1 targets `t` (R, N) (u8, nonzero = 1): the (R, 2)
/// sums `[Σ σ(x)·t, Σ σ(x)²]` of a sigmoid dice loss; gradients flow to `x`.
///
/// On CPU one parallel pass each way (σ from `exp(−|x|)`, sums in 16 lanes per chunk of 8192,
/// then in f64); otherwise [`sigmoid_dice_sums_composed`].
pub fn sigmoid_dice_sums(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let (rows, n) = dice_dims(x, t)?;
    if fusable(x) && t.device().is_cpu() {
        return x.contiguous()?.apply_op2(&t.contiguous()?, dice::SigmoidDiceSums { rows, n });
    }
    sigmoid_dice_sums_composed(x, t)
}

/// [`sigmoid_dice_sums`] from candle ops, on any device: the path off the CPU, and the fused
/// kernel's cross-check.
pub fn sigmoid_dice_sums_composed(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    dice_dims(x, t)?;
    let p = candle_nn::ops::sigmoid(x)?;
    let tf = t.ne(0u8)?.to_dtype(x.dtype())?;
    Tensor::stack(&[(&p * &tf)?.sum(1)?, p.sqr()?.sum(1)?], 1)
}

/// (R, N) of float logits and u8 targets of the same shape.
fn dice_dims(x: &Tensor, t: &Tensor) -> Result<(usize, usize)> {
    ensure_float(x, "sigmoid_dice_sums")?;
    let (rows, n) = x.dims2()?;
    if t.dims() != [rows, n] || t.dtype() != DType::U8 {
        bail!("sigmoid_dice_sums: targets must be u8 ({rows}, {n}), got {:?} {:?}", t.dtype(), t.shape());
    }
    Ok((rows, n))
}

/// `[1 − x, x]` along dimension 1 of a (B, 1, …) tensor: (B, 2, …), MM-Former's two-channel
/// `few_shot_result`; gradients flow to `x`. On CPU one pass each way (the composed form's
/// backward copies each strided half of the gradient and adds them); the same values as
/// [`complement_pair_composed`].
pub fn complement_pair(x: &Tensor) -> Result<Tensor> {
    let (b, n) = complement_dims(x)?;
    if !fusable(x) || x.elem_count() == 0 {
        return complement_pair_composed(x);
    }
    let mut dims = x.dims().to_vec();
    dims[1] = 2;
    x.contiguous()?.apply_op1(fused::ComplementPair { b, n })?.reshape(dims)
}

/// [`complement_pair`] from candle ops, on any device.
pub fn complement_pair_composed(x: &Tensor) -> Result<Tensor> {
    complement_dims(x)?;
    Tensor::cat(&[&x.affine(-1.0, 1.0)?, x], 1)
}

/// (B, values per sample) of a (B, 1, …) float tensor.
fn complement_dims(x: &Tensor) -> Result<(usize, usize)> {
    ensure_float(x, "complement_pair")?;
    match x.dims() {
        [b, 1, ..] => Ok((*b, x.elem_count() / (*b).max(1))),
        d => bail!("complement_pair: expected (B, 1, ...), got {d:?}"),
    }
}

/// (B, C, H, W) feature map -> (B, H·W, C) tokens, row-major over positions (contiguous). On
/// CPU a tiled parallel transposition (forward and backward) instead of candle's single-threaded
/// strided copy (256 × 60² in f32 on 2 threads: 1.2–2.6 → 0.6 ms).
pub fn map_to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let flat = x.reshape((b, c, h * w))?;
    if !fusable(x) {
        return flat.transpose(1, 2)?.contiguous();
    }
    flat.contiguous()?.apply_op1(fused::Transpose12 { b, r: c, c: h * w })
}

/// (B, H·W, C) tokens -> (B, C, H, W) map (contiguous), the inverse of [`map_to_tokens`].
pub fn tokens_to_map(t: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, l, c) = t.dims3()?;
    if l != h * w {
        bail!("tokens_to_map: {l} tokens for a {h}x{w} map");
    }
    if !fusable(t) {
        return t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w));
    }
    t.contiguous()?.apply_op1(fused::Transpose12 { b, r: l, c })?.reshape((b, c, h, w))
}

/// A bias-free 1×1 convolution from a channel-major map to tokens: `x` (B, C_in, H, W),
/// `weight` (C_out, C_in) -> (B, H·W, C_out), i.e. `map_to_tokens(conv1x1(x))` without the
/// transposition of the map (or of its gradient). Gradients reach `weight` and `x` where they
/// track. On CPU single-threaded gemms over blocks of the output read the map in place;
/// elsewhere [`weight_matmul`] and [`map_to_tokens`].
pub fn pointwise_conv_tokens(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (c_out, c_in) = weight.dims2()?;
    let (b, c, h, w) = match *x.dims() {
        [b, c, h, w] => (b, c, h, w),
        _ => bail!("pointwise_conv_tokens: expected a (B, C, H, W) map, got {:?}", x.shape()),
    };
    if c != c_in {
        bail!("pointwise_conv_tokens: input has {c} channels, the weight ({c_out}, {c_in}) expects {c_in}");
    }
    if fusable(x) && weight.dtype() == x.dtype() && weight.device().is_cpu() {
        let op = pointwise::PointwiseTokens { b, c_in, l: h * w, c_out };
        return x.contiguous()?.apply_op2(&weight.contiguous()?, op);
    }
    let y = weight_matmul(weight, &x.reshape((b, c, h * w))?)?.reshape((b, c_out, h, w))?;
    map_to_tokens(&y)
}

/// MM-Former's self-alignment gate (`MySelfAlignLayer.spatial_pool`):
/// `x ⊙ σ(x · softmax_N(mean_C x))` per sample, for `x` (B, C, H, W).
///
/// The channel mean at each position becomes a spatial attention `a` (softmax over the H·W
/// positions), `z = x·a` pools every channel with it, and `σ(z)` rescales each channel. On CPU,
/// when no gradient can flow through `x` (frozen backbone features, as in both stages), one fused
/// forward pass; otherwise [`spatial_pool_gate_composed`].
pub fn spatial_pool_gate(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = gate_dims(x)?;
    if !fusable(x) || x.track_op() {
        return spatial_pool_gate_composed(x);
    }
    let x = x.contiguous()?;
    let g = x.storage_and_layout();
    let (shape, dev) = ((b, c, h, w), x.device());
    match x.dtype() {
        DType::F32 => Tensor::from_vec(fused::spatial_pool_gate(guard_slice::<f32>(&g, "spatial_pool_gate")?, c, h * w), shape, dev),
        _ => Tensor::from_vec(fused::spatial_pool_gate(guard_slice::<f64>(&g, "spatial_pool_gate")?, c, h * w), shape, dev),
    }
}

/// (B, C, H, W) of a self-alignment input.
fn gate_dims(x: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match *x.dims() {
        [b, c, h, w] => Ok((b, c, h, w)),
        _ => bail!("spatial_pool_gate: expected a (B, C, H, W) feature map, got {:?}", x.shape()),
    }
}

/// [`spatial_pool_gate`] from candle primitives, with gradients.
pub fn spatial_pool_gate_composed(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = gate_dims(x)?;
    let f = x.reshape((b, c, h * w))?;
    let a = softmax(&f.mean_keepdim(1)?, 2)?; // (B, 1, N)
    let z = f.matmul(&a.transpose(1, 2)?)?; // (B, C, 1)
    let gate = candle_nn::ops::sigmoid(&z)?.reshape((b, c, 1, 1))?;
    x.broadcast_mul(&gate)
}

/// [`softmax`] from candle primitives (max, exp, sum, div).
///
/// The row maximum is subtracted first and detached: the shift does not change the result, so
/// its gradient is exactly zero and tracking it would only cost time.
pub fn softmax_composed(x: &Tensor, dim: usize) -> Result<Tensor> {
    ensure_float(x, "softmax")?;
    if dim >= x.rank() {
        bail!(
            "softmax: dim {dim} out of range for a tensor of shape {:?}",
            x.shape()
        );
    }
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(dim)?;
    e.broadcast_div(&s)
}

/// `lhs.matmul(rhs)`, (.., M, K) · (.., K, N) -> (.., M, N) with the same batch dimensions.
/// On CPU the forward runs single-threaded gemms over blocks of the output in parallel (on 2
/// threads 8% faster than candle's matmul for the POS's mask logits, twice as fast for the
/// small level-size ones), and the backward computes only the gradients of
/// tracked operands (candle's computes both, and a zero-filled gradient buffer for each) and
/// orients each gradient gemm so that gemm never packs a large operand column-major. Elsewhere
/// candle's matmul.
pub fn matmul(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let (ld, rd) = (lhs.dims(), rhs.dims());
    let r = ld.len();
    let fits = r >= 2 && rd.len() == r && ld[..r - 2] == rd[..r - 2] && ld[r - 1] == rd[r - 2];
    if !fits || !fusable(lhs) || lhs.dtype() != rhs.dtype() {
        // candle's matmul, with its error for mismatched shapes.
        return lhs.matmul(rhs);
    }
    let bmnk = (ld[..r - 2].iter().product(), ld[r - 2], rd[r - 1], ld[r - 1]);
    lhs.contiguous()?.apply_op2(&rhs.contiguous()?, matmul::MatmulOp { bmnk })
}

/// `weight · x[i]` for every batch item: (M, K) · (B, K, N) -> (B, M, N), as the 1×1
/// convolutions over channel-major maps compute it. [`matmul`] with the weight repeated over the
/// batch (a view for one item), so it gets the blocked forward on CPU.
pub fn weight_matmul(weight: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (m, k) = weight.dims2()?;
    let b = match x.dims() {
        &[b, xk, _] if xk == k => b,
        _ => bail!("weight_matmul: weight ({m}, {k}) cannot multiply x of shape {:?}", x.shape()),
    };
    matmul(&weight.unsqueeze(0)?.broadcast_as((b, m, k))?.contiguous()?, x)
}

/// `torch.nn.functional.linear`: `x` (..., in) · `weight` (out, in)ᵀ + `bias` (out) ->
/// (..., out), gradients to all three. On CPU one fused op (row-parallel gemms, dx/dW/db in one
/// backward pass); elsewhere candle's matmul + broadcast add, as `candle_nn::Linear` does.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, weight, bias, false)
}

/// `relu(linear(x, weight, bias))`, the ReLU fused into the same op on CPU.
pub fn linear_relu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, weight, bias, true)
}

fn linear_impl(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let (d_out, d_in) = weight.dims2()?;
    if x.rank() == 0 || x.dim(D::Minus1)? != d_in {
        bail!("linear: input shape {:?} must end in {d_in}", x.shape());
    }
    if let Some(b) = bias {
        if b.dims() != [d_out] {
            bail!("linear: bias shape {:?} must be ({d_out})", b.shape());
        }
    }
    let same = |t: &Tensor| t.dtype() == x.dtype();
    if fusable(x) && same(weight) && bias.is_none_or(same) {
        let mut out_shape = x.dims().to_vec();
        *out_shape.last_mut().unwrap() = d_out;
        let n = x.elem_count() / d_in.max(1);
        let b = match bias {
            Some(b) => b.contiguous()?,
            None => Tensor::zeros(d_out, x.dtype(), x.device())?,
        };
        let op = fused::LinearOp {
            n,
            d_in,
            d_out,
            relu,
        };
        return x
            .contiguous()?
            .reshape((n, d_in))?
            .apply_op3(&weight.contiguous()?, &b, op)?
            .reshape(out_shape);
    }
    let y = candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(x)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// Normalises `x` over the dimensions in `dims` (population variance, like torch).
fn normalize(x: &Tensor, dims: &[usize], eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(dims)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(dims)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `torch.nn.LayerNorm(dim, eps)` over the last dimension, with affine `weight` and `bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// The normalised width, after checking that `x` is a float tensor ending in it.
    fn check_input(&self, x: &Tensor) -> Result<usize> {
        ensure_float(x, "LayerNorm")?;
        let dim = self.weight.dim(0)?;
        if x.rank() == 0 || x.dim(D::Minus1)? != dim {
            bail!("LayerNorm({dim}): input shape {:?} must end in {dim}", x.shape());
        }
        Ok(dim)
    }

    /// Whether `x` takes the fused kernel: a fusable tensor of the parameters' dtype.
    fn fuses(&self, x: &Tensor) -> bool {
        fusable(x) && self.weight.dtype() == x.dtype() && self.bias.dtype() == x.dtype()
    }

    /// `x`: (..., dim) -> (..., dim). Fused (one pass per row, analytic backward) on CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dim = self.check_input(x)?;
        if self.fuses(x) {
            let op = fused::LayerNormLast {
                d: dim,
                eps: self.eps,
                residual: false,
            };
            return x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                op,
            );
        }
        self.forward_composed(x)
    }

    /// `LN(x + residual)`, the post-norm residual block's sum and norm: on CPU one fused op
    /// (the sum is never stored, and gets no gradient node of its own), elsewhere
    /// `forward(x + residual)`. `x` and `residual` must have the same shape.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if x.dims() != residual.dims() {
            bail!("LayerNorm: residual {:?} does not match the input {:?}", residual.shape(), x.shape());
        }
        let dim = self.check_input(x)?;
        if self.fuses(x) && residual.dtype() == x.dtype() {
            let op = fused::LayerNormLast { d: dim, eps: self.eps, residual: true };
            let wb = Tensor::cat(&[&self.weight, &self.bias], 0)?;
            return x.contiguous()?.apply_op3(&residual.contiguous()?, &wb, op);
        }
        self.forward(&(x + residual)?)
    }

    /// [`Self::forward`] from candle primitives (mean, centring, variance, division, affine).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        normalize(x, &[x.rank() - 1], self.eps)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// `torch.nn.GroupNorm(num_groups, num_channels, eps)` with affine `weight` and `bias`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(num_groups: usize, num_channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if num_groups == 0 || num_channels % num_groups != 0 {
            bail!("GroupNorm: {num_channels} channels cannot be split into {num_groups} groups");
        }
        let weight = vb.get_with_hints(num_channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(num_channels, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    /// `x`: (B, C, H, W) -> (B, C, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ensure_float(x, "GroupNorm")?;
        let c = self.weight.dim(0)?;
        let (b, xc, h, w) = match x.dims() {
            &[b, xc, h, w] => (b, xc, h, w),
            _ => bail!(
                "GroupNorm: expected a (B, C, H, W) input, got {:?}",
                x.shape()
            ),
        };
        if xc != c {
            bail!("GroupNorm: input has {xc} channels, layer has {c}");
        }
        let g = self.num_groups;
        let xg = x.reshape((b, g, (c / g) * h * w))?;
        normalize(&xg, &[2], self.eps)?
            .reshape((b, c, h, w))?
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }
}

/// Mask2Former's `MLP`: `num_layers` linear layers `layers.{i}` with ReLU between them
/// (not after the last one).
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(
        in_dim: usize,
        hidden_dim: usize,
        out_dim: usize,
        num_layers: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if num_layers == 0 {
            bail!("Mlp: num_layers must be at least 1");
        }
        let vb = vb.pp("layers");
        let layers = (0..num_layers)
            .map(|i| {
                let n_in = if i == 0 { in_dim } else { hidden_dim };
                let n_out = if i + 1 == num_layers {
                    out_dim
                } else {
                    hidden_dim
                };
                candle_nn::linear(n_in, n_out, vb.pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// `x`: (..., in_dim) -> (..., out_dim).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = self.layers[0].weight().dim(1)?;
        if x.rank() == 0 || x.dim(D::Minus1)? != in_dim {
            bail!("Mlp: input shape {:?} must end in {in_dim}", x.shape());
        }
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if i + 1 < self.layers.len() {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}
