//! Sizes of the Potential Objects Segmenter.

use candle_core::{bail, Result};

/// Sizes of the POS (pixel decoder + masked-attention transformer decoder).
///
/// The pixel decoder's conv dim, the mask dim and the decoder's hidden dim are one value
/// (`hidden_dim`), as in every official config (256 each), which is what lets the official
/// decoder use an identity `input_proj`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PosConfig {
    /// Backbone channels of res2, res3, res4, res5 (strides 4, 8, 16, 32).
    pub in_channels: [usize; 4],
    /// Conv dim of the pixel decoder = mask dim = decoder hidden dim.
    pub hidden_dim: usize,
    /// GroupNorm groups of the pixel decoder convs (32 officially).
    pub gn_groups: usize,
    /// Heads of the deformable encoder attention.
    pub enc_heads: usize,
    /// Sampling points per head and level of the deformable attention.
    pub enc_points: usize,
    /// Hidden width of the encoder FFN (1024, hard-coded officially).
    pub enc_ffn_dim: usize,
    /// Number of deformable encoder layers.
    pub enc_layers: usize,
    /// Heads of the decoder's cross- and self-attention.
    pub dec_heads: usize,
    /// Hidden width of the decoder FFN.
    pub dec_ffn_dim: usize,
    /// Number of decoder layers (9 officially; `DEC_LAYERS 10` counts the initial prediction).
    pub dec_layers: usize,
    /// Number of queries = proposals per image.
    pub num_queries: usize,
}

/// Feature levels read by the deformable encoder and the decoder (res5, res4, res3).
pub const NUM_LEVELS: usize = 3;

impl PosConfig {
    /// The paper's configuration on the ResNet-50 backbone (spec §2.1, §2.2).
    pub fn paper() -> Self {
        Self {
            in_channels: [256, 512, 1024, 2048],
            hidden_dim: 256,
            gn_groups: 32,
            enc_heads: 8,
            enc_points: 4,
            enc_ffn_dim: 1024,
            enc_layers: 6,
            dec_heads: 8,
            dec_ffn_dim: 2048,
            dec_layers: 9,
            num_queries: 100,
        }
    }

    /// A small configuration on EfficientNet-Lite0 taps (24/40/112/320 channels) that a 2-core
    /// CPU trains in minutes. 64 channels keep GroupNorm(32) valid (2 channels per group);
    /// 6 decoder layers still visit each of the 3 levels twice; 20 queries are plenty for the
    /// handful of objects per few-shot training image.
    pub fn cpu() -> Self {
        Self {
            in_channels: [24, 40, 112, 320],
            hidden_dim: 64,
            gn_groups: 32,
            enc_heads: 4,
            enc_points: 4,
            enc_ffn_dim: 256,
            enc_layers: 2,
            dec_heads: 4,
            dec_ffn_dim: 256,
            dec_layers: 6,
            num_queries: 20,
        }
    }

    /// Checks every size constraint, so `Pos::new` fails with a message instead of deep inside
    /// a layer.
    pub fn validate(&self) -> Result<()> {
        let d = self.hidden_dim;
        if self.in_channels.contains(&0) {
            bail!("PosConfig: in_channels must be positive, got {:?}", self.in_channels);
        }
        if d == 0 || d % 4 != 0 {
            // The sine encoding uses d/2 features per axis, which must be even (sin/cos pairs).
            bail!("PosConfig: hidden_dim must be a positive multiple of 4, got {d}");
        }
        if self.gn_groups == 0 || d % self.gn_groups != 0 {
            bail!("PosConfig: hidden_dim {d} is not divisible by gn_groups {}", self.gn_groups);
        }
        for (what, heads) in [("enc_heads", self.enc_heads), ("dec_heads", self.dec_heads)] {
            if heads == 0 || d % heads != 0 {
                bail!("PosConfig: hidden_dim {d} is not divisible by {what} {heads}");
            }
        }
        for (what, v) in [
            ("enc_points", self.enc_points),
            ("enc_ffn_dim", self.enc_ffn_dim),
            ("dec_ffn_dim", self.dec_ffn_dim),
            ("num_queries", self.num_queries),
        ] {
            if v == 0 {
                bail!("PosConfig: {what} must be positive");
            }
        }
        Ok(())
    }

    /// Number of mask predictions per forward: one from the initial queries plus one per layer.
    pub fn num_predictions(&self) -> usize {
        self.dec_layers + 1
    }
}
