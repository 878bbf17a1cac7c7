//! `torch.nn.MultiheadAttention` with batch-first tensors, and the fused scaled-dot-product
//! attention it runs on CPU.
//!
//! [`MultiheadAttention::forward`] projects q/k/v with three 2D matmuls and hands the
//! head-interleaved (B, L, E) projections to [`scaled_dot_product_attention`], a fused CPU kernel
//! (logits, mask, softmax and the value product per block of query rows, with an analytic
//! backward) that never materialises the (B, heads, Lq, Lk) weights nor any per-head copy.
//! [`MultiheadAttention::forward_with_weights`] keeps the composed candle-primitive path, which
//! also returns the weights; [`MultiheadAttention::forward_composed`] is that path without them
//! (the reference the fused one is tested and benchmarked against).

use std::sync::Arc;

use candle_core::{bail, CpuStorage, DType, Result, Tensor};
use candle_nn::{Init, Linear, Module, VarBuilder};

use crate::fastmath::fusable;
use crate::nn::{linear, softmax_composed};
use crate::util::ensure_float;

mod kernel;

/// Checks a mask against (B, heads, Lq, Lk); returns whether it is per head (B·heads, Lq, Lk).
fn check_mask(mask: &Tensor, b: usize, nh: usize, lq: usize, lk: usize) -> Result<bool> {
    match *mask.dims() {
        [mb, mq, mk] if mb == b && mq == lq && mk == lk => Ok(false),
        [mb, mq, mk] if mb == b * nh && mq == lq && mk == lk => Ok(true),
        _ => bail!(
            "attention: attn_mask must be (B={b}, Lq={lq}, Lk={lk}) or (B*heads={}, Lq, Lk), got {:?}",
            b * nh,
            mask.shape()
        ),
    }
}

fn is_float(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}

/// Scaled dot-product attention on head-interleaved tensors, fused on CPU.
///
/// `q`: (B, Lq, E), `k`, `v`: (B, Lk, E) with E = `num_heads`·dh, head h in columns
/// `h·dh..(h+1)·dh` (what a `(B, L, E)` projection gives); returns (B, Lq, E) in the same layout:
/// per head `softmax(q kᵀ / √dh + mask) v`. `attn_mask` follows
/// [`MultiheadAttention::forward_with_weights`] (bool-like: nonzero = not attended; float:
/// added to the logits), and receives no gradient. Rows whose keys are all masked give NaN.
///
/// On CPU (f32/f64) this is one custom op with a hand-written backward, parallel over
/// (batch, query-row blocks); elsewhere it falls back to
/// [`scaled_dot_product_attention_composed`].
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    num_heads: usize,
    attn_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, lq, lk, e) = check_sdpa(q, k, v, num_heads)?;
    let dt = q.dtype();
    if !fusable(q) {
        return scaled_dot_product_attention_composed(q, k, v, num_heads, attn_mask);
    }
    let dh = e / num_heads;
    let mask = match attn_mask {
        None => None,
        Some(m) => {
            let per_head = check_mask(m, b, num_heads, lq, lk)?;
            let flat = m.detach().flatten_all()?;
            let storage = if is_float(m.dtype()) {
                match dt {
                    DType::F32 => CpuStorage::F32(flat.to_dtype(dt)?.to_vec1()?),
                    _ => CpuStorage::F64(flat.to_dtype(dt)?.to_vec1()?),
                }
            } else if m.dtype() == DType::U8 {
                CpuStorage::U8(flat.to_vec1()?)
            } else {
                CpuStorage::U8(flat.ne(0u32)?.to_vec1()?)
            };
            Some((Arc::new(storage), per_head))
        }
    };
    // Keep the probabilities for the backward only where there will be one.
    let graded = q.track_op() || k.track_op() || v.track_op();
    let keep = graded && kernel::Sdpa::wants_saved_probs(b, lq, lk, num_heads, dt.size_in_bytes());
    let op = kernel::Sdpa {
        b,
        lq,
        lk,
        heads: num_heads,
        dh,
        scale: 1.0 / (dh as f64).sqrt(),
        mask,
        saved_probs: keep.then(Default::default),
    };
    q.contiguous()?.apply_op3(
        &k.to_dtype(dt)?.contiguous()?,
        &v.to_dtype(dt)?.contiguous()?,
        op,
    )
}

/// [`scaled_dot_product_attention`] from candle primitives (head split, batched matmuls,
/// [`crate::nn::softmax_composed`], head merge) on any device; the fused kernel's reference.
pub fn scaled_dot_product_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    num_heads: usize,
    attn_mask: Option<&Tensor>,
) -> Result<Tensor> {
    check_sdpa(q, k, v, num_heads)?;
    Ok(sdpa_composed(q, k, v, num_heads, attn_mask)?.0)
}

/// Shapes of an attention call: (B, Lq, Lk, E).
fn check_sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    nh: usize,
) -> Result<(usize, usize, usize, usize)> {
    ensure_float(q, "attention q")?;
    ensure_float(k, "attention k")?;
    ensure_float(v, "attention v")?;
    let (b, lq, e) = match *q.dims() {
        [b, lq, e] => (b, lq, e),
        _ => bail!("attention: q must be (B, Lq, E), got {:?}", q.shape()),
    };
    if nh == 0 || e % nh != 0 {
        bail!("attention: E = {e} not divisible by {nh} heads");
    }
    let lk = match *k.dims() {
        [kb, lk, ke] if kb == b && ke == e => lk,
        _ => bail!("attention: k must be (B={b}, Lk, {e}), got {:?}", k.shape()),
    };
    if v.dims() != [b, lk, e] {
        bail!(
            "attention: v must be (B={b}, Lk={lk}, {e}), got {:?}",
            v.shape()
        );
    }
    Ok((b, lq, lk, e))
}

/// The composed attention: (output (B, Lq, E), weights (B, heads, Lq, Lk)). `q` unscaled.
fn sdpa_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    nh: usize,
    attn_mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, lq, e) = q.dims3()?;
    let lk = k.dim(1)?;
    let dh = e / nh;
    // (B, L, E) -> (B, heads, L, dh)
    let split = |x: &Tensor, l: usize| -> Result<Tensor> {
        x.reshape((b, l, nh, dh))?.transpose(1, 2)?.contiguous()
    };
    let qh = split(&(q * (1.0 / (dh as f64).sqrt()))?, lq)?;
    let kh = split(k, lk)?;
    let vh = split(v, lk)?;
    let mut logits = qh.matmul(&kh.t()?)?; // (B, heads, Lq, Lk)
    if let Some(mask) = attn_mask {
        let mask = if check_mask(mask, b, nh, lq, lk)? {
            mask.reshape((b, nh, lq, lk))?
        } else {
            mask.unsqueeze(1)?.broadcast_as((b, nh, lq, lk))?
        };
        logits = if is_float(mask.dtype()) {
            logits.add(&mask.to_dtype(logits.dtype())?)?
        } else {
            let neg_inf = Tensor::new(f32::NEG_INFINITY, q.device())?
                .to_dtype(logits.dtype())?
                .broadcast_as(logits.shape())?;
            mask.ne(0u32)?.where_cond(&neg_inf, &logits)?
        };
    }
    let weights = softmax_composed(&logits, 3)?;
    let out = weights.matmul(&vh)?.transpose(1, 2)?.reshape((b, lq, e))?;
    Ok((out, weights))
}

/// `nn.MultiheadAttention(embed_dim, num_heads)` (dropout 0, biases on, kdim = vdim = embed_dim)
/// on batch-first (B, L, E) tensors. Parameters: packed `in_proj_weight` [3E, E] with rows
/// `[W_q; W_k; W_v]`, `in_proj_bias` (3E), `out_proj.weight`, `out_proj.bias`.
#[derive(Debug, Clone)]
pub struct MultiheadAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    embed_dim: usize,
    num_heads: usize,
}

impl MultiheadAttention {
    /// Init hints for missing weights: xavier-uniform weights and zero biases, which is what
    /// Mask2Former's attention layers apply after construction.
    pub fn new(embed_dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        if num_heads == 0 || embed_dim % num_heads != 0 {
            bail!(
                "MultiheadAttention: embed_dim {embed_dim} not divisible by num_heads {num_heads}"
            );
        }
        let e = embed_dim;
        let xavier = |fan_in: usize, fan_out: usize| {
            let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
            Init::Uniform {
                lo: -bound,
                up: bound,
            }
        };
        let in_proj_weight = vb.get_with_hints((3 * e, e), "in_proj_weight", xavier(e, 3 * e))?;
        let in_proj_bias = vb.get_with_hints(3 * e, "in_proj_bias", Init::Const(0.0))?;
        let vbo = vb.pp("out_proj");
        let w = vbo.get_with_hints((e, e), "weight", xavier(e, e))?;
        let b = vbo.get_with_hints(e, "bias", Init::Const(0.0))?;
        Ok(Self {
            in_proj_weight,
            in_proj_bias,
            out_proj: Linear::new(w, Some(b)),
            embed_dim,
            num_heads,
        })
    }

    /// `q`: (B, Lq, E), `k` and `v`: (B, Lk, E); `attn_mask` as in
    /// [`Self::forward_with_weights`] -> (B, Lq, E).
    ///
    /// On CPU runs the fused kernels: [`linear`] for the projections and
    /// [`scaled_dot_product_attention`], which never materialises the weights. A float mask
    /// receives no gradient here.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        attn_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.check_inputs(q, k, v)?;
        let out = scaled_dot_product_attention(
            &self.project(q, 0, true)?,
            &self.project(k, 1, true)?,
            &self.project(v, 2, true)?,
            self.num_heads,
            attn_mask,
        )?;
        linear(&out, self.out_proj.weight(), self.out_proj.bias())
    }

    /// [`Self::forward`] through the composed candle-primitive path of
    /// [`Self::forward_with_weights`] (the fused kernel's reference; slower).
    pub fn forward_composed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        attn_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self.forward_with_weights(q, k, v, attn_mask)?.0)
    }

    /// Like [`Self::forward`], also returning the per-head attention weights (B, heads, Lq, Lk).
    ///
    /// `attn_mask` is (B, Lq, Lk), broadcast over heads, or (B·heads, Lq, Lk) with torch's
    /// batch-major head order. An integer (bool-like) mask marks NOT-attended pairs with nonzero;
    /// a float mask is added to the logits (torch's float-mask semantics). Rows that mask every
    /// key produce NaN, as in torch; avoiding them is the caller's job.
    ///
    /// Composed from candle primitives (any device, gradients everywhere including a float
    /// mask), so slower than [`Self::forward`].
    pub fn forward_with_weights(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        attn_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        self.check_inputs(q, k, v)?;
        let (out, weights) = sdpa_composed(
            &self.project(q, 0, false)?,
            &self.project(k, 1, false)?,
            &self.project(v, 2, false)?,
            self.num_heads,
            attn_mask,
        )?;
        Ok((self.out_proj.forward(&out)?, weights))
    }

    /// `x` (B, L, E) times rows `i·E..(i+1)·E` of the packed in-projection, plus bias.
    /// `fused`: through [`linear`] (fused on CPU), else `candle_nn::Linear`.
    fn project(&self, x: &Tensor, i: usize, fused: bool) -> Result<Tensor> {
        let e = self.embed_dim;
        let w = self.in_proj_weight.narrow(0, i * e, e)?;
        let bias = self.in_proj_bias.narrow(0, i * e, e)?;
        if fused {
            linear(x, &w, Some(&bias))
        } else {
            Linear::new(w, Some(bias)).forward(x)
        }
    }

    fn check_inputs(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        ensure_float(q, "MultiheadAttention q")?;
        let e = self.embed_dim;
        let b = match q.dims() {
            &[b, _, qe] if qe == e => b,
            _ => bail!(
                "MultiheadAttention: q must be (B, Lq, {e}), got {:?}",
                q.shape()
            ),
        };
        let lk = match k.dims() {
            &[kb, lk, ke] if kb == b && ke == e => lk,
            _ => bail!(
                "MultiheadAttention: k must be (B={b}, Lk, {e}), got {:?}",
                k.shape()
            ),
        };
        if v.dims() != [b, lk, e] {
            bail!(
                "MultiheadAttention: v must be (B={b}, Lk={lk}, {e}), got {:?}",
                v.shape()
            );
        }
        Ok(())
    }
}
