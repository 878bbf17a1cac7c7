//! Cross-alignment (`CrossAT`, spec §3.4): query and support features attend to each other,
//! with the same layer weights in both directions.

use candle_core::{bail, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use ops::attention::MultiheadAttention;
use ops::nn::{tokens_to_map, LayerNorm};

use crate::config::MmConfig;

/// LayerNorm epsilon of Mask2Former's attention and FFN layers (torch default).
const LN_EPS: f64 = 1e-5;

/// Mask2Former's `CrossAttentionLayer` (post-norm, dropout 0):
/// `x ← LN(x + MHA(q = x + pos_x, k = mem + pos_mem, v = mem))`.
#[derive(Debug, Clone)]
pub struct CrossAttentionLayer {
    multihead_attn: MultiheadAttention,
    norm: LayerNorm,
}

impl CrossAttentionLayer {
    pub fn new(d_model: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        let multihead_attn = MultiheadAttention::new(d_model, num_heads, vb.pp("multihead_attn"))?;
        let norm = LayerNorm::new(d_model, LN_EPS, vb.pp("norm"))?;
        Ok(Self { multihead_attn, norm })
    }

    /// `x`, `pos_x`: (B, Lq, E); `mem`, `mem_with_pos` (`mem + pos_mem`, the keys): (B, Lk, E)
    /// -> (B, Lq, E).
    pub fn forward(&self, x: &Tensor, mem: &Tensor, pos_x: &Tensor, mem_with_pos: &Tensor) -> Result<Tensor> {
        let attended = self.multihead_attn.forward(&(x + pos_x)?, mem_with_pos, mem, None)?;
        self.norm.forward_residual(x, &attended)
    }
}

/// Mask2Former's `FFNLayer` (post-norm, dropout 0): `x ← LN(x + linear2(ReLU(linear1(x))))`.
#[derive(Debug, Clone)]
pub struct FfnLayer {
    linear1: Linear,
    linear2: Linear,
    norm: LayerNorm,
}

/// A `torch.nn.Linear` whose missing weights are initialised as Mask2Former does for its FFNs:
/// xavier-uniform weight, torch's default U(±1/√fan_in) bias.
fn xavier_linear(fan_in: usize, fan_out: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    let w = vb.get_with_hints((fan_out, fan_in), "weight", Init::Uniform { lo: -bound, up: bound })?;
    let bb = 1.0 / (fan_in as f64).sqrt();
    let b = vb.get_with_hints(fan_out, "bias", Init::Uniform { lo: -bb, up: bb })?;
    Ok(Linear::new(w, Some(b)))
}

impl FfnLayer {
    pub fn new(d_model: usize, dim_feedforward: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear1: xavier_linear(d_model, dim_feedforward, vb.pp("linear1"))?,
            linear2: xavier_linear(dim_feedforward, d_model, vb.pp("linear2"))?,
            norm: LayerNorm::new(d_model, LN_EPS, vb.pp("norm"))?,
        })
    }

    /// `x`: (B, L, E) -> (B, L, E).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Fused linear(+ReLU) kernels: one backward pass for dx, dW and db each.
        let h = ops::nn::linear_relu(x, self.linear1.weight(), self.linear1.bias())?;
        let y = ops::nn::linear(&h, self.linear2.weight(), self.linear2.bias())?;
        self.norm.forward_residual(x, &y)
    }
}

/// The key/value size of an (h, w) map: short side `min_size`, long side scaled with python
/// `int()` truncation, as `CrossAT.forward` computes it (in f64, left to right).
pub fn kv_size(h: usize, w: usize, min_size: usize) -> (usize, usize) {
    if h > w {
        ((h as f64 * min_size as f64 / w as f64) as usize, min_size)
    } else {
        (min_size, (w as f64 * min_size as f64 / h as f64) as usize)
    }
}

/// (B, C, H, W) -> (B, H·W, C) tokens, row-major over positions.
fn tokens(x: &Tensor) -> Result<Tensor> {
    ops::nn::map_to_tokens(x)
}

/// Tokens of an `hw` map resized (bilinear, align_corners=False) to `to`, still tokens.
fn kv_tokens(t: &Tensor, hw: (usize, usize), to: (usize, usize)) -> Result<Tensor> {
    ops::resize::resize_bilinear_tokens(t, hw, to, false)
}

/// The positional encodings must have the shapes of the features they go with.
fn check_positions(query: &Tensor, support: &Tensor, pos_query: &Tensor, pos_support: &Tensor) -> Result<()> {
    if pos_query.dims() != query.dims() || pos_support.dims() != support.dims() {
        bail!(
            "CrossAT: positional encodings {:?}/{:?} must match the features {:?}/{:?}",
            pos_query.shape(),
            pos_support.shape(),
            query.shape(),
            support.shape()
        );
    }
    Ok(())
}

/// One level's `CrossAT` block (`crossat_{i}`): `num_cross_layers` pairs of
/// `transformer_cross_attention_layers.{l}` and `transformer_ffn_layers.{l}`.
#[derive(Debug, Clone)]
pub struct CrossAt {
    transformer_cross_attention_layers: Vec<CrossAttentionLayer>,
    transformer_ffn_layers: Vec<FfnLayer>,
    kv_min_size: usize,
}

impl CrossAt {
    pub fn new(cfg: &MmConfig, vb: VarBuilder) -> Result<Self> {
        let (vbc, vbf) = (vb.pp("transformer_cross_attention_layers"), vb.pp("transformer_ffn_layers"));
        let mut attn = Vec::with_capacity(cfg.num_cross_layers);
        let mut ffn = Vec::with_capacity(cfg.num_cross_layers);
        for l in 0..cfg.num_cross_layers {
            attn.push(CrossAttentionLayer::new(cfg.hidden_dim, cfg.num_heads, vbc.pp(l))?);
            ffn.push(FfnLayer::new(cfg.hidden_dim, cfg.dim_feedforward, vbf.pp(l))?);
        }
        Ok(Self { transformer_cross_attention_layers: attn, transformer_ffn_layers: ffn, kv_min_size: cfg.kv_min_size })
    }

    /// Runs the layers on `x` with `(mem, pos_mem)` as keys/values.
    fn attend(&self, x: &Tensor, pos_x: &Tensor, mem: &Tensor, pos_mem: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        // The keys are the same in every layer.
        let keys = (mem + pos_mem)?;
        for (attn, ffn) in self.transformer_cross_attention_layers.iter().zip(&self.transformer_ffn_layers) {
            x = ffn.forward(&attn.forward(&x, mem, pos_x, &keys)?)?;
        }
        Ok(x)
    }

    /// Cross-aligns one level.
    ///
    /// `query`, `pos_query`: (B, C, h, w); `support`, `pos_support`: (B, C, sh, sw), the support
    /// already masked. Keys/values are both maps resized (bilinear, align_corners=False) to
    /// [`kv_size`] of their own shape, unless a side of the *query* equals the minimum size, in
    /// which case neither is resized. The query attends to the support; the support then
    /// attends to the original (pre-update) query.
    ///
    /// Returns the aligned `(query (B, C, h, w), support (B, C, sh, sw))`.
    pub fn forward(
        &self,
        query: &Tensor,
        support: &Tensor,
        pos_query: &Tensor,
        pos_support: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let ((b, c, h, w), (sb, sc, sh, sw)) = (query.dims4()?, support.dims4()?);
        if (sb, sc) != (b, c) {
            bail!("CrossAT: support {:?} does not match query {:?} in batch/channels", support.shape(), query.shape());
        }
        check_positions(query, support, pos_query, pos_support)?;
        let (q, s) = self.forward_tokens(
            &tokens(query)?,
            (h, w),
            &tokens(support)?,
            (sh, sw),
            &tokens(pos_query)?,
            &tokens(pos_support)?,
            None,
        )?;
        Ok((tokens_to_map(&q, (h, w))?, tokens_to_map(&s, (sh, sw))?))
    }

    /// [`Self::forward`] on tokens, the layout the mask matching keeps its features in:
    /// `query`, `pos_query` (B, h·w, C) of an `hw` map, `support`, `pos_support` (B, sh·sw, C)
    /// of an `shw` map, each row-major over positions; returns the aligned `(query (B, h·w, C),
    /// support (B, sh·sw, C))`, what the prototype pooling reads directly. The keys/values are
    /// resized as tokens (the same values as resizing the maps).
    ///
    /// With `support_rows` (flat indices into the B·sh·sw support tokens, B·L_sel of them, each
    /// element's L_sel rows together), the support is aligned at those rows only and returned as
    /// (B, L_sel, C): every row of that direction is computed on its own (see
    /// [`crate::prototype::SupportMask`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_tokens(
        &self,
        query: &Tensor,
        (h, w): (usize, usize),
        support: &Tensor,
        (sh, sw): (usize, usize),
        pos_query: &Tensor,
        pos_support: &Tensor,
        support_rows: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, l, c) = query.dims3()?;
        let (sb, sl, sc) = support.dims3()?;
        if (sb, sc) != (b, c) {
            bail!("CrossAT: support {:?} does not match query {:?} in batch/channels", support.shape(), query.shape());
        }
        if l != h * w || sl != sh * sw {
            bail!("CrossAT: {l} query tokens for {h}x{w} and {sl} support tokens for {sh}x{sw}");
        }
        check_positions(query, support, pos_query, pos_support)?;
        let m = self.kv_min_size;
        let (q_kv, pq_kv, s_kv, ps_kv) = if h == m || w == m {
            (query.clone(), pos_query.clone(), support.clone(), pos_support.clone())
        } else {
            let (qs, ss) = (kv_size(h, w, m), kv_size(sh, sw, m));
            let (qhw, shw) = ((h, w), (sh, sw));
            (kv_tokens(query, qhw, qs)?, kv_tokens(pos_query, qhw, qs)?, kv_tokens(support, shw, ss)?, kv_tokens(pos_support, shw, ss)?)
        };
        let (q, pq) = (query, pos_query);
        let (s, ps) = match support_rows {
            None => (support.clone(), pos_support.clone()),
            Some(rows) => {
                let n = rows.dims1()?;
                if n % b != 0 {
                    bail!("CrossAT: {n} selected support rows for a batch of {b}");
                }
                let pick = |t: &Tensor| t.reshape((b * sh * sw, c))?.index_select(rows, 0)?.reshape((b, n / b, c));
                (pick(support)?, pick(pos_support)?)
            }
        };
        let q_out = self.attend(q, pq, &s_kv, &ps_kv)?;
        let s_out = self.attend(&s, &ps, &q_kv, &pq_kv)?;
        Ok((q_out, s_out))
    }
}
