//! Mask2Former's `MSDeformAttnPixelDecoder` (spec §2.1): a deformable-attention encoder over
//! res5/res4/res3 plus one FPN level from res2 that yields the per-pixel mask features.

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use ops::deform::MSDeformAttn;
use ops::nn::{GroupNorm, LayerNorm};
use ops::position::sine_position_encoding;
use ops::resize::resize_bilinear;

use crate::config::{PosConfig, NUM_LEVELS};
use crate::layers::{c2_xavier, linear_xavier, xavier, Conv1x1, ConvGn, GN_EPS, LN_EPS};

/// `input_proj.{i}` = `nn.Sequential(Conv2d(Cin, d, 1), GroupNorm(groups, d))`.
#[derive(Debug, Clone)]
struct InputProj {
    conv: Conv1x1,
    norm: GroupNorm,
}

impl InputProj {
    fn new(cin: usize, d: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        // Official init: xavier_uniform_(weight, gain=1), bias 0.
        let conv = Conv1x1::new(cin, d, true, xavier(cin, d), vb.pp("0"))?;
        let norm = GroupNorm::new(groups, d, GN_EPS, vb.pp("1"))?;
        Ok(Self { conv, norm })
    }

    /// (B, Cin, h, w) -> (B, d, h, w)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.conv.forward(x)?)
    }
}

/// `MSDeformAttnTransformerEncoderLayer`, post-norm, dropout 0.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: MSDeformAttn,
    norm1: LayerNorm,
    linear1: Linear,
    linear2: Linear,
    norm2: LayerNorm,
}

impl EncoderLayer {
    fn new(cfg: &PosConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_dim;
        Ok(Self {
            self_attn: MSDeformAttn::new(d, NUM_LEVELS, cfg.enc_heads, cfg.enc_points, vb.pp("self_attn"))?,
            norm1: LayerNorm::new(d, LN_EPS, vb.pp("norm1"))?,
            linear1: linear_xavier(d, cfg.enc_ffn_dim, vb.pp("linear1"))?,
            linear2: linear_xavier(cfg.enc_ffn_dim, d, vb.pp("linear2"))?,
            norm2: LayerNorm::new(d, LN_EPS, vb.pp("norm2"))?,
        })
    }

    /// `src`, `pos`: (B, S, d); `reference_points`: (B, S, L, 2) -> (B, S, d)
    fn forward(
        &self,
        src: &Tensor,
        pos: &Tensor,
        reference_points: &Tensor,
        spatial_shapes: &[(usize, usize)],
    ) -> Result<Tensor> {
        // Deformable self-attention: the query carries the position, the sampled values do not.
        let attn = self.self_attn.forward(&(src + pos)?, reference_points, src, spatial_shapes)?;
        let src = self.norm1.forward_residual(src, &attn)?;
        // Fused linear(+ReLU) kernels (one backward pass each for dx, dW, db).
        let hidden = ops::nn::linear_relu(&src, self.linear1.weight(), self.linear1.bias())?;
        let ffn = ops::nn::linear(&hidden, self.linear2.weight(), self.linear2.bias())?;
        self.norm2.forward_residual(&src, &ffn)
    }
}

/// Per-level normalised pixel centres ((j + 0.5) / w, (i + 0.5) / h) of every flattened token,
/// repeated for each level since all valid ratios are 1 (no padding):
/// (B, S, L, 2) in (x, y) order.
fn reference_points(spatial_shapes: &[(usize, usize)], batch: usize, dev: &Device) -> Result<Tensor> {
    let s: usize = spatial_shapes.iter().map(|&(h, w)| h * w).sum();
    let l = spatial_shapes.len();
    let mut v = Vec::with_capacity(s * l * 2);
    for &(h, w) in spatial_shapes {
        for i in 0..h {
            for j in 0..w {
                // f32 like torch's linspace(0.5, H - 0.5, H) / H.
                let (x, y) = ((j as f32 + 0.5) / w as f32, (i as f32 + 0.5) / h as f32);
                for _ in 0..l {
                    v.extend([x, y]);
                }
            }
        }
    }
    Tensor::from_vec(v, (1, s, l, 2), dev)?.repeat((batch, 1, 1, 1))
}

/// (B, C, h, w) -> (B, h·w, C)
fn flatten_tokens(x: &Tensor) -> Result<Tensor> {
    ops::nn::map_to_tokens(x)
}

/// The pixel decoder's outputs.
#[derive(Debug, Clone)]
pub struct PixelDecoderOutput {
    /// (B, d, H/4, W/4) per-pixel embeddings the mask logits are read from.
    pub mask_features: Tensor,
    /// The encoder outputs [1/32, 1/16, 1/8], each (B, d, h_l, w_l).
    pub multi_scale: Vec<Tensor>,
}

/// `MSDeformAttnPixelDecoder` (`..._ori` in MM-Former V1), parameters under
/// `sem_seg_head.pixel_decoder`.
#[derive(Debug, Clone)]
pub struct MSDeformAttnPixelDecoder {
    input_proj: Vec<InputProj>,
    level_embed: Tensor,
    layers: Vec<EncoderLayer>,
    adapter_1: ConvGn,
    layer_1: ConvGn,
    mask_features: Conv1x1,
    in_channels: [usize; 4],
    hidden_dim: usize,
}

impl MSDeformAttnPixelDecoder {
    pub fn new(cfg: &PosConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_dim;
        // input_proj.0/1/2 read res5, res4, res3 (low to high resolution).
        let input_proj = (0..NUM_LEVELS)
            .map(|i| InputProj::new(cfg.in_channels[3 - i], d, cfg.gn_groups, vb.pp("input_proj").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let tvb = vb.pp("transformer");
        let level_embed =
            tvb.get_with_hints((NUM_LEVELS, d), "level_embed", Init::Randn { mean: 0.0, stdev: 1.0 })?;
        let layers = (0..cfg.enc_layers)
            .map(|i| EncoderLayer::new(cfg, tvb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            input_proj,
            level_embed,
            layers,
            adapter_1: ConvGn::new(cfg.in_channels[0], d, 1, cfg.gn_groups, vb.pp("adapter_1"))?,
            layer_1: ConvGn::new(d, d, 3, cfg.gn_groups, vb.pp("layer_1"))?,
            mask_features: Conv1x1::new(d, d, true, c2_xavier(d), vb.pp("mask_features"))?,
            in_channels: cfg.in_channels,
            hidden_dim: d,
        })
    }

    /// `features` = [res2, res3, res4, res5], each (B, C_i, H_i, W_i) with the configured
    /// channels -> mask features (B, d, H_2, W_2) and encoder outputs [res5, res4, res3 levels].
    pub fn forward(&self, features: &[Tensor]) -> Result<PixelDecoderOutput> {
        check_features(features, &self.in_channels)?;
        let b = features[0].dim(0)?;
        let dt = features[0].dtype();
        let dev = features[0].device();
        let d = self.hidden_dim;

        // Flatten res5, res4, res3 into one token sequence; pos = sine + level embedding.
        let mut srcs = Vec::with_capacity(NUM_LEVELS);
        let mut poss = Vec::with_capacity(NUM_LEVELS);
        let mut shapes = Vec::with_capacity(NUM_LEVELS);
        for (lvl, proj) in self.input_proj.iter().enumerate() {
            let x = &features[3 - lvl];
            let (_, _, h, w) = x.dims4()?;
            srcs.push(flatten_tokens(&proj.forward(x)?)?);
            let pos = sine_position_encoding(b, h, w, d / 2, dev)?.to_dtype(dt)?;
            let lvl_embed = self.level_embed.get(lvl)?.reshape((1, 1, d))?;
            poss.push(flatten_tokens(&pos)?.broadcast_add(&lvl_embed)?);
            shapes.push((h, w));
        }
        let mut memory = Tensor::cat(&srcs, 1)?;
        let pos = Tensor::cat(&poss, 1)?;
        let refs = reference_points(&shapes, b, dev)?.to_dtype(dt)?;
        for layer in &self.layers {
            memory = layer.forward(&memory, &pos, &refs, &shapes)?;
        }

        // Back to maps, one per level.
        let mut multi_scale = Vec::with_capacity(NUM_LEVELS);
        let mut start = 0;
        for &(h, w) in &shapes {
            let level = ops::nn::tokens_to_map(&memory.narrow(1, start, h * w)?, (h, w))?;
            multi_scale.push(level);
            start += h * w;
        }

        // FPN level from res2: lateral conv + upsampled finest encoder level, then a 3×3 conv.
        let res2 = &features[0];
        let (_, _, h2, w2) = res2.dims4()?;
        let lateral = self.adapter_1.forward(res2)?;
        let top_down = resize_bilinear(&multi_scale[NUM_LEVELS - 1], (h2, w2), false)?;
        let fpn = self.layer_1.forward(&(lateral + top_down)?)?.relu()?;
        let mask_features = self.mask_features.forward(&fpn)?;
        Ok(PixelDecoderOutput { mask_features, multi_scale })
    }
}

/// Fails clearly unless `features` are four float (B, C_i, H_i, W_i) maps with the configured
/// channels, one batch size and non-empty sizes.
pub(crate) fn check_features(features: &[Tensor], in_channels: &[usize; 4]) -> Result<()> {
    if features.len() != 4 {
        bail!("POS: expected 4 feature maps [res2, res3, res4, res5], got {}", features.len());
    }
    let b = match features[0].dims() {
        &[b, ..] => b,
        _ => bail!("POS: res2 must be (B, C, H, W), got {:?}", features[0].shape()),
    };
    for (i, (f, &c)) in features.iter().zip(in_channels).enumerate() {
        match f.dims() {
            &[fb, fc, h, w] if fb == b && fc == c && h > 0 && w > 0 && b > 0 => {}
            _ => bail!(
                "POS: res{} must be (B={b}, {c}, H, W) with H, W > 0, got {:?}",
                i + 2,
                f.shape()
            ),
        }
        if !matches!(f.dtype(), DType::F32 | DType::F64) {
            bail!("POS: res{} must be f32 or f64, got {:?}", i + 2, f.dtype());
        }
        if f.dtype() != features[0].dtype() {
            bail!("POS: all feature maps must share one dtype");
        }
    }
    Ok(())
}
