//! `torch.nn.MultiheadAttention` with batch-first tensors.

use candle_core::{bail, DType, Result, Tensor};
use candle_nn::{Init, Linear, Module, VarBuilder};

use crate::nn::softmax;
use crate::util::ensure_float;

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

    /// `q`: (B, Lq, E), `k` and `v`: (B, Lk, E); `attn_mask` as in [`Self::forward`]
    /// -> (B, Lq, E).
    pub fn forward(
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
    pub fn forward_with_weights(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        attn_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        ensure_float(q, "MultiheadAttention q")?;
        let e = self.embed_dim;
        let nh = self.num_heads;
        let dh = e / nh;
        let (b, lq) = match q.dims() {
            &[b, lq, qe] if qe == e => (b, lq),
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
        let project = |x: &Tensor, i: usize| -> Result<Tensor> {
            let w = self.in_proj_weight.narrow(0, i * e, e)?;
            let bias = self.in_proj_bias.narrow(0, i * e, e)?;
            Linear::new(w, Some(bias)).forward(x)
        };
        // (B, L, E) -> (B, heads, L, dh)
        let split = |x: Tensor, l: usize| -> Result<Tensor> {
            x.reshape((b, l, nh, dh))?.transpose(1, 2)?.contiguous()
        };
        let qh = split((project(q, 0)? * (1.0 / (dh as f64).sqrt()))?, lq)?;
        let kh = split(project(k, 1)?, lk)?;
        let vh = split(project(v, 2)?, lk)?;
        let mut logits = qh.matmul(&kh.t()?)?; // (B, heads, Lq, Lk)
        if let Some(mask) = attn_mask {
            let mask = match *mask.dims() {
                [mb, mq, mk] if mb == b && mq == lq && mk == lk => {
                    mask.unsqueeze(1)?.broadcast_as((b, nh, lq, lk))?
                }
                [mb, mq, mk] if mb == b * nh && mq == lq && mk == lk => {
                    mask.reshape((b, nh, lq, lk))?
                }
                _ => bail!(
                    "MultiheadAttention: attn_mask must be (B={b}, Lq={lq}, Lk={lk}) or (B*heads={}, Lq, Lk), got {:?}",
                    b * nh,
                    mask.shape()
                ),
            };
            logits = match mask.dtype() {
                DType::F32 | DType::F64 | DType::F16 | DType::BF16 => {
                    logits.add(&mask.to_dtype(logits.dtype())?)?
                }
                _ => {
                    let neg_inf = Tensor::new(f32::NEG_INFINITY, q.device())?
                        .to_dtype(logits.dtype())?
                        .broadcast_as(logits.shape())?;
                    mask.ne(0u32)?.where_cond(&neg_inf, &logits)?
                }
            };
        }
        let weights = softmax(&logits, 3)?;
        let out = weights.matmul(&vh)?.transpose(1, 2)?.reshape((b, lq, e))?;
        Ok((self.out_proj.forward(&out)?, weights))
    }
}
