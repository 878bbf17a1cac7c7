//! Mask2Former's `MultiScaleMaskedTransformerDecoder` without the classifier (spec §2.2):
//! learnable queries refined by masked cross-attention, self-attention and an FFN per layer,
//! each layer's mask prediction restricting the next layer's cross-attention.

use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};
use ops::attention::MultiheadAttention;
use ops::nn::{LayerNorm, Mlp};
use ops::position::sine_position_encoding;
use ops::resize::resize_bilinear;

use crate::config::{PosConfig, NUM_LEVELS};
use crate::layers::{linear_xavier, LN_EPS};

/// `CrossAttentionLayer`, post-norm: tgt = LN(tgt + MHA(tgt + query_pos, memory + pos, memory)).
#[derive(Debug, Clone)]
struct CrossAttentionLayer {
    multihead_attn: MultiheadAttention,
    norm: LayerNorm,
}

impl CrossAttentionLayer {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            multihead_attn: MultiheadAttention::new(d, heads, vb.pp("multihead_attn"))?,
            norm: LayerNorm::new(d, LN_EPS, vb.pp("norm"))?,
        })
    }

    /// `tgt`, `query_pos`: (B, N, d); `memory`, `memory_with_pos` (`memory + pos`, the keys,
    /// shared by every layer on the level): (B, S, d); `memory_mask`: (B, N, S) u8,
    /// 1 = not attended -> (B, N, d)
    fn forward(
        &self,
        tgt: &Tensor,
        memory: &Tensor,
        memory_mask: Option<&Tensor>,
        memory_with_pos: &Tensor,
        query_pos: &Tensor,
    ) -> Result<Tensor> {
        let q = (tgt + query_pos)?;
        let attn = self.multihead_attn.forward(&q, memory_with_pos, memory, memory_mask)?;
        self.norm.forward_residual(tgt, &attn)
    }
}

/// `SelfAttentionLayer`, post-norm: tgt = LN(tgt + MHA(tgt + query_pos, tgt + query_pos, tgt)).
#[derive(Debug, Clone)]
struct SelfAttentionLayer {
    self_attn: MultiheadAttention,
    norm: LayerNorm,
}

impl SelfAttentionLayer {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: MultiheadAttention::new(d, heads, vb.pp("self_attn"))?,
            norm: LayerNorm::new(d, LN_EPS, vb.pp("norm"))?,
        })
    }

    /// `tgt`, `query_pos`: (B, N, d) -> (B, N, d)
    fn forward(&self, tgt: &Tensor, query_pos: &Tensor) -> Result<Tensor> {
        let qk = (tgt + query_pos)?;
        let attn = self.self_attn.forward(&qk, &qk, tgt, None)?;
        self.norm.forward_residual(tgt, &attn)
    }
}

/// `FFNLayer`, post-norm: tgt = LN(tgt + linear2(relu(linear1(tgt)))).
#[derive(Debug, Clone)]
struct FfnLayer {
    linear1: Linear,
    linear2: Linear,
    norm: LayerNorm,
}

impl FfnLayer {
    fn new(d: usize, ffn: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear1: linear_xavier(d, ffn, vb.pp("linear1"))?,
            linear2: linear_xavier(ffn, d, vb.pp("linear2"))?,
            norm: LayerNorm::new(d, LN_EPS, vb.pp("norm"))?,
        })
    }

    /// (B, N, d) -> (B, N, d)
    fn forward(&self, tgt: &Tensor) -> Result<Tensor> {
        // Fused linear(+ReLU) kernels (one backward pass each for dx, dW, db).
        let hidden = ops::nn::linear_relu(tgt, self.linear1.weight(), self.linear1.bias())?;
        let y = ops::nn::linear(&hidden, self.linear2.weight(), self.linear2.bias())?;
        self.norm.forward_residual(tgt, &y)
    }
}

/// Everything the decoder computes in one forward.
#[derive(Debug, Clone)]
pub struct DecoderOutput {
    /// Mask logits of the `dec_layers + 1` predictions, each (B, N, H/4, W/4): index 0 from the
    /// learnable queries, index k after decoder layer k - 1; the last one is `pred_masks`.
    pub predictions: Vec<Tensor>,
    /// `mask_embed` MLP output of each prediction, (B, N, d).
    pub mask_embeds: Vec<Tensor>,
    /// The masks this decoder derived for layers 0..dec_layers from predictions 0..dec_layers-1:
    /// (B, N, h_l·w_l) u8, 1 = not attended, BEFORE the fully-masked-row fix (the fixture's
    /// `decoder.attn_mask.i` layout). With injection these are still our own masks, computed
    /// from the predictions that the injected masks led to.
    pub attn_masks: Vec<Tensor>,
    /// `decoder_norm(output)` after the last layer, (B, N, d).
    pub decoder_output_final: Tensor,
}

/// `MultiScaleMaskedTransformerDecoder`, parameters under `sem_seg_head.predictor`.
#[derive(Debug, Clone)]
pub struct MultiScaleMaskedTransformerDecoder {
    query_feat: Tensor,
    query_embed: Tensor,
    level_embed: Tensor,
    cross_attention_layers: Vec<CrossAttentionLayer>,
    self_attention_layers: Vec<SelfAttentionLayer>,
    ffn_layers: Vec<FfnLayer>,
    decoder_norm: LayerNorm,
    mask_embed: Mlp,
    hidden_dim: usize,
    num_queries: usize,
}

impl MultiScaleMaskedTransformerDecoder {
    pub fn new(cfg: &PosConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_dim;
        // nn.Embedding initialises N(0, 1).
        let embedding = |n: usize, name: &str| {
            vb.pp(name).get_with_hints((n, d), "weight", Init::Randn { mean: 0.0, stdev: 1.0 })
        };
        let layers = |name: &str| {
            let vb = vb.pp(name);
            (0..cfg.dec_layers).map(move |i| vb.pp(i))
        };
        Ok(Self {
            query_feat: embedding(cfg.num_queries, "query_feat")?,
            query_embed: embedding(cfg.num_queries, "query_embed")?,
            level_embed: embedding(NUM_LEVELS, "level_embed")?,
            cross_attention_layers: layers("transformer_cross_attention_layers")
                .map(|vb| CrossAttentionLayer::new(d, cfg.dec_heads, vb))
                .collect::<Result<_>>()?,
            self_attention_layers: layers("transformer_self_attention_layers")
                .map(|vb| SelfAttentionLayer::new(d, cfg.dec_heads, vb))
                .collect::<Result<_>>()?,
            ffn_layers: layers("transformer_ffn_layers")
                .map(|vb| FfnLayer::new(d, cfg.dec_ffn_dim, vb))
                .collect::<Result<_>>()?,
            decoder_norm: LayerNorm::new(d, LN_EPS, vb.pp("decoder_norm"))?,
            mask_embed: Mlp::new(d, d, d, 3, vb.pp("mask_embed"))?,
            hidden_dim: d,
            num_queries: cfg.num_queries,
        })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.ffn_layers.len()
    }

    /// `multi_scale`: the 3 encoder levels [1/32, 1/16, 1/8], each (B, d, h_l, w_l);
    /// `mask_features`: (B, d, H, W).
    ///
    /// `inject_attn_masks` (test hook for parity with a stored run): one mask per layer,
    /// (B, N, h·w) of any integer dtype, 1 = not attended, used INSTEAD of the layer's own mask
    /// (the fully-masked-row fix is still applied). Masks are thresholded at logit 0, so logits
    /// within float noise of 0 flip between implementations; injecting the reference's masks
    /// keeps the comparison from diverging through the 9 layers.
    pub fn forward(
        &self,
        multi_scale: &[Tensor],
        mask_features: &Tensor,
        inject_attn_masks: Option<&[Tensor]>,
    ) -> Result<DecoderOutput> {
        self.run(multi_scale, mask_features, inject_attn_masks, true)
    }

    /// Inference: only the final prediction, (B, N, H, W) mask logits. The earlier predictions
    /// serve only the attention masks, so they are computed at each layer's level size:
    /// `embed · resize(mask_features)` equals the official `resize(embed · mask_features)`
    /// (bilinear resizing is linear) to float rounding, without the full-size products.
    pub fn forward_final(&self, multi_scale: &[Tensor], mask_features: &Tensor) -> Result<Tensor> {
        let mut out = self.run(multi_scale, mask_features, None, false)?;
        out.predictions.pop().ok_or_else(|| candle_core::Error::Msg("decoder: no prediction".into()))
    }

    fn run(
        &self,
        multi_scale: &[Tensor],
        mask_features: &Tensor,
        inject_attn_masks: Option<&[Tensor]>,
        all_predictions: bool,
    ) -> Result<DecoderOutput> {
        let d = self.hidden_dim;
        let n = self.num_queries;
        if multi_scale.len() != NUM_LEVELS {
            bail!("decoder: expected {NUM_LEVELS} feature levels, got {}", multi_scale.len());
        }
        let (b, mc, mh, mw) = mask_features.dims4()?;
        if mc != d {
            bail!("decoder: mask_features must have {d} channels, got {:?}", mask_features.shape());
        }
        let dt = mask_features.dtype();
        let dev = mask_features.device();

        // Values per level: src = feature + level_embed; keys: src + pos (sine encoding), added
        // once per level rather than in each of its layers.
        let mut srcs = Vec::with_capacity(NUM_LEVELS);
        let mut keys = Vec::with_capacity(NUM_LEVELS);
        let mut sizes = Vec::with_capacity(NUM_LEVELS);
        for (i, x) in multi_scale.iter().enumerate() {
            let (h, w) = match x.dims() {
                &[xb, xc, h, w] if xb == b && xc == d => (h, w),
                _ => bail!("decoder: level {i} must be (B={b}, {d}, h, w), got {:?}", x.shape()),
            };
            let pos = sine_position_encoding(b, h, w, d / 2, dev)?.to_dtype(dt)?;
            let pos = ops::nn::map_to_tokens(&pos)?;
            let src = ops::nn::map_to_tokens(x)?;
            let src = src.broadcast_add(&self.level_embed.get(i)?.reshape((1, 1, d))?)?;
            keys.push((&src + pos)?);
            srcs.push(src);
            sizes.push((h, w));
        }
        if let Some(masks) = inject_attn_masks {
            check_injected(masks, self.num_layers(), b, n, &sizes)?;
        }

        let query_embed = self.query_embed.unsqueeze(0)?.repeat((b, 1, 1))?;
        let mut output = self.query_feat.unsqueeze(0)?.repeat((b, 1, 1))?;
        let mf = mask_features.reshape((b, d, mh * mw))?;

        let mut predictions = Vec::with_capacity(self.num_layers() + 1);
        let mut mask_embeds = Vec::with_capacity(self.num_layers() + 1);
        let mut attn_masks = Vec::with_capacity(self.num_layers());
        // Inference: the mask features resized to each level once, for the attention masks.
        let level_mf = if all_predictions {
            Vec::new()
        } else {
            sizes
                .iter()
                .map(|&(h, w)| resize_bilinear(mask_features, (h, w), false)?.reshape((b, d, h * w)))
                .collect::<Result<Vec<_>>>()?
        };
        let head = |output: &Tensor, layer: usize| -> Result<(Tensor, Tensor, Tensor)> {
            if all_predictions || layer == self.num_layers() {
                self.prediction_head(output, &mf, (mh, mw))
            } else {
                let (h, w) = sizes[layer % NUM_LEVELS];
                self.prediction_head(output, &level_mf[layer % NUM_LEVELS], (h, w))
            }
        };
        let (mut normed, mut embed, mut logits) = head(&output, 0)?;
        for i in 0..self.num_layers() {
            let level = i % NUM_LEVELS;
            // Inference logits are already at the level size, where the resize is a no-op.
            let own = attention_mask(&logits, sizes[level])?;
            if all_predictions {
                predictions.push(logits);
                mask_embeds.push(embed);
            }
            let mask = match inject_attn_masks {
                Some(masks) => masks[i].to_dtype(DType::U8)?,
                None => own.clone(),
            };
            attn_masks.push(own);
            let mask = unmask_full_rows(&mask)?;
            output = self.cross_attention_layers[i].forward(
                &output,
                &srcs[level],
                Some(&mask),
                &keys[level],
                &query_embed,
            )?;
            output = self.self_attention_layers[i].forward(&output, &query_embed)?;
            output = self.ffn_layers[i].forward(&output)?;
            (normed, embed, logits) = head(&output, i + 1)?;
        }
        predictions.push(logits);
        mask_embeds.push(embed);
        Ok(DecoderOutput { predictions, mask_embeds, attn_masks, decoder_output_final: normed })
    }

    /// `forward_prediction_heads` without the classifier: `output` (B, N, d) and the flattened
    /// mask features (B, d, H·W) -> (decoder_norm(output), mask_embed (B, N, d),
    /// logits (B, N, H, W) = einsum("bqc,bchw->bqhw")).
    fn prediction_head(&self, output: &Tensor, mf: &Tensor, (h, w): (usize, usize)) -> Result<(Tensor, Tensor, Tensor)> {
        let normed = self.decoder_norm.forward(output)?;
        let embed = self.mask_embed.forward(&normed)?;
        let (b, n, _) = embed.dims3()?;
        let logits = ops::nn::matmul(&embed, mf)?.reshape((b, n, h, w))?;
        Ok((normed, embed, logits))
    }
}

/// The next layer's attention mask from the current logits (B, N, H, W): bilinear resize
/// (align_corners=False) to the level size, 1 where sigmoid < 0.5 (logit < 0), detached:
/// (B, N, h·w) u8.
fn attention_mask(logits: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, n, _, _) = logits.dims4()?;
    resize_bilinear(&logits.detach(), (h, w), false)?
        .lt(0.0)?
        .reshape((b, n, h * w))
}

/// Clears rows that would block every key (softmax over nothing would be NaN): Mask2Former's
/// `attn_mask[attn_mask.sum(-1) == L] = False`. (B, N, S) u8 -> (B, N, S) u8.
fn unmask_full_rows(mask: &Tensor) -> Result<Tensor> {
    let s = mask.dim(D::Minus1)?;
    // Count in u32: a u8 sum wraps for rows longer than 255.
    let blocked = mask.to_dtype(DType::U32)?.sum_keepdim(D::Minus1)?;
    let keep = blocked.ne(s as u32)?; // u8, 1 = row has an attended key
    mask.broadcast_mul(&keep)
}

fn check_injected(masks: &[Tensor], layers: usize, b: usize, n: usize, sizes: &[(usize, usize)]) -> Result<()> {
    if masks.len() != layers {
        bail!("decoder: {} injected attention masks given, the decoder has {layers} layers", masks.len());
    }
    for (i, m) in masks.iter().enumerate() {
        let (h, w) = sizes[i % NUM_LEVELS];
        if m.dims() != [b, n, h * w] {
            bail!(
                "decoder: injected attention mask {i} must be (B={b}, N={n}, {}) for level {}, got {:?}",
                h * w,
                i % NUM_LEVELS,
                m.shape()
            );
        }
        if !matches!(m.dtype(), DType::U8 | DType::U32 | DType::I64) {
            bail!("decoder: injected attention mask {i} must be an integer tensor, got {:?}", m.dtype());
        }
    }
    Ok(())
}
