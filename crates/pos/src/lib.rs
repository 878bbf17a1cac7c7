//! Potential Objects Segmenter (stage 1): pixel decoder and masked-attention transformer decoder
//! that propose N class-agnostic masks per image (Mask2Former without the classifier,
//! spec §2.1–§2.2).
//!
//! ```text
//! [res2, res3, res4, res5] ──► MSDeformAttnPixelDecoder ──► mask_features (B, d, H/4, W/4)
//!                                        │                         │
//!                                        └─► [1/32, 1/16, 1/8] ──► MultiScaleMaskedTransformerDecoder
//!                                                                  └─► pred_masks (B, N, H/4, W/4)
//! ```
//!
//! Parameter names follow the official state dict (`sem_seg_head.pixel_decoder.*`,
//! `sem_seg_head.predictor.*`, spec §6.2), so a `VarBuilder` over a converted checkpoint loads
//! directly; legacy unused keys (`pixel_decoder.crossat_*`) are simply never requested.

mod config;
mod layers;
mod pixel_decoder;
mod transformer_decoder;

use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;

pub use config::{PosConfig, NUM_LEVELS};
pub use layers::{Conv1x1, ConvGn};
pub use pixel_decoder::{MSDeformAttnPixelDecoder, PixelDecoderOutput};
pub use transformer_decoder::{DecoderOutput, MultiScaleMaskedTransformerDecoder};

/// Everything one POS forward produces.
#[derive(Debug, Clone)]
pub struct PosOutput {
    /// (B, N, H/4, W/4) mask logits of the last decoder layer: the proposals.
    pub pred_masks: Tensor,
    /// The `dec_layers` earlier predictions (Mask2Former's `aux_outputs`), each
    /// (B, N, H/4, W/4), in order: index 0 from the learnable queries, index k after layer k - 1.
    /// Deep supervision applies the mask losses to these and to `pred_masks`.
    pub aux: Vec<Tensor>,
    /// (B, d, H/4, W/4) per-pixel embeddings of the pixel decoder.
    pub mask_features: Tensor,
    /// Deformable-encoder outputs [1/32, 1/16, 1/8], each (B, d, h_l, w_l).
    pub multi_scale: Vec<Tensor>,
    /// `mask_embed` output of every prediction (aux then final), each (B, N, d).
    pub mask_embeds: Vec<Tensor>,
    /// `decoder_norm(output)` after the last layer, (B, N, d).
    pub decoder_output_final: Tensor,
    /// The attention mask derived for each decoder layer, (B, N, h_l·w_l) u8, 1 = not attended,
    /// before the fully-masked-row fix (see [`DecoderOutput::attn_masks`]).
    pub attn_masks: Vec<Tensor>,
}

impl PosOutput {
    /// All `dec_layers + 1` predictions in order (aux, then `pred_masks`).
    pub fn all_predictions(&self) -> Vec<Tensor> {
        let mut all = self.aux.clone();
        all.push(self.pred_masks.clone());
        all
    }
}

/// The POS: `sem_seg_head.pixel_decoder` + `sem_seg_head.predictor`.
#[derive(Debug, Clone)]
pub struct Pos {
    pixel_decoder: MSDeformAttnPixelDecoder,
    predictor: MultiScaleMaskedTransformerDecoder,
    cfg: PosConfig,
}

impl Pos {
    /// `vb` at the model root: parameters are read under `sem_seg_head.*`.
    pub fn new(cfg: &PosConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let vb = vb.pp("sem_seg_head");
        Ok(Self {
            pixel_decoder: MSDeformAttnPixelDecoder::new(cfg, vb.pp("pixel_decoder"))?,
            predictor: MultiScaleMaskedTransformerDecoder::new(cfg, vb.pp("predictor"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &PosConfig {
        &self.cfg
    }

    /// `features` = [res2, res3, res4, res5] backbone maps, (B, C_i, H/2^(i+2), W/2^(i+2)).
    pub fn forward(&self, features: &[Tensor]) -> Result<PosOutput> {
        self.run(features, None)
    }

    /// Inference: the proposals only, (B, N, H/4, W/4) mask logits equal to
    /// [`Self::forward`]'s `pred_masks` (to float rounding in the intermediate attention masks;
    /// see [`MultiScaleMaskedTransformerDecoder::forward_final`]), without the deep-supervision
    /// predictions at full size.
    pub fn forward_proposals(&self, features: &[Tensor]) -> Result<Tensor> {
        let pd = self.pixel_decoder.forward(features)?;
        self.predictor.forward_final(&pd.multi_scale, &pd.mask_features)
    }

    /// Test hook for parity with a stored reference run: like [`Self::forward`], but decoder
    /// layer i uses `attn_masks[i]` ((B, N, h·w) integer, 1 = not attended, before the
    /// fully-masked-row fix, e.g. the fixture's `decoder.attn_mask.i`) instead of the mask
    /// derived from prediction i. Not meant for training or inference.
    pub fn forward_with_attn_masks(&self, features: &[Tensor], attn_masks: &[Tensor]) -> Result<PosOutput> {
        self.run(features, Some(attn_masks))
    }

    fn run(&self, features: &[Tensor], inject: Option<&[Tensor]>) -> Result<PosOutput> {
        let pd = self.pixel_decoder.forward(features)?;
        let dec = self.predictor.forward(&pd.multi_scale, &pd.mask_features, inject)?;
        let mut aux = dec.predictions;
        let pred_masks = aux
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("POS: the decoder returned no prediction".into()))?;
        Ok(PosOutput {
            pred_masks,
            aux,
            mask_features: pd.mask_features,
            multi_scale: pd.multi_scale,
            mask_embeds: dec.mask_embeds,
            decoder_output_final: dec.decoder_output_final,
            attn_masks: dec.attn_masks,
        })
    }
}

/// Values a from-scratch POS needs that `VarBuilder` init hints cannot express: the
/// Deformable-DETR `sampling_offsets.bias` grid of every encoder layer. Returns
/// (full parameter name, value) pairs to store, e.g. with `VarMap::set_one`, after `Pos::new`
/// created the variables; checkpoints already contain these.
pub fn scratch_init_overrides(cfg: &PosConfig, device: &Device) -> Result<Vec<(String, Tensor)>> {
    cfg.validate()?;
    let bias = ops::deform::sampling_offsets_bias_init(cfg.enc_heads, NUM_LEVELS, cfg.enc_points, device)?;
    Ok((0..cfg.enc_layers)
        .map(|i| {
            let name = format!(
                "sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}.self_attn.sampling_offsets.bias"
            );
            (name, bias.clone())
        })
        .collect())
}
