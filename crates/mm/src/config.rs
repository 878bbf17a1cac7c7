//! Configuration of the mask-matching module.

use candle_core::{bail, Result};

/// Hyper-parameters and ablation switches of the mask-matching module (spec §3).
///
/// Levels are ordered low to high resolution: l0 = stride 32, l1 = stride 16, l2 = stride 8
/// (`res5, res4, res3` for ResNet-50), the order the official `conv_{i}` / `crossat_{i}` use.
#[derive(Debug, Clone, PartialEq)]
pub struct MmConfig {
    /// Backbone channels of levels l0, l1, l2 (2048/1024/512 for ResNet-50).
    pub in_channels: [usize; 3],
    /// Width after the 1×1 channel reduction, of the cross-alignment and of each level's
    /// prototype (official 256; the prototypes are `3 · hidden_dim` long).
    pub hidden_dim: usize,
    /// Attention heads of the cross-alignment layers (official 4).
    pub num_heads: usize,
    /// Hidden width of the cross-alignment FFNs (official 512).
    pub dim_feedforward: usize,
    /// Cross-alignment layers per level (official 2).
    pub num_cross_layers: usize,
    /// Short side of the cross-alignment keys/values (official 15); also the query size at
    /// which a level is not resized.
    pub kv_min_size: usize,
    /// Proposal count; must equal the POS query count because the matching MLP is
    /// `num_queries → 5·num_queries → num_queries` (official 100).
    pub num_queries: usize,
    /// Ablation: skip the parameter-free self-alignment (§3.2).
    pub self_alignment: bool,
    /// Ablation: skip cross-alignment (§3.4); the `crossat_{i}` weights are then not created.
    pub cross_alignment: bool,
    /// Ablation: `false` replaces the learnable matching MLP by the heuristic baseline that
    /// keeps the single proposal with the highest cosine (`fc1`/`fc2` are then not created).
    pub learnable_matching: bool,
    /// Training ablation: whether the stage-2 loss includes L_co. The module itself does not
    /// read it; the trainer does.
    pub co_loss: bool,
}

impl MmConfig {
    /// The paper's configuration on ResNet-50 features (`res5, res4, res3`).
    pub fn resnet50() -> Self {
        Self::with_in_channels([2048, 1024, 512])
    }

    /// The CPU preset on EfficientNet-Lite0's stride-32/16/8 taps (320/112/40 channels).
    pub fn efficientnet_lite0() -> Self {
        Self::with_in_channels([320, 112, 40])
    }

    /// Official hyper-parameters on arbitrary backbone channels.
    pub fn with_in_channels(in_channels: [usize; 3]) -> Self {
        Self {
            in_channels,
            hidden_dim: 256,
            num_heads: 4,
            dim_feedforward: 512,
            num_cross_layers: 2,
            kv_min_size: 15,
            num_queries: 100,
            self_alignment: true,
            cross_alignment: true,
            learnable_matching: true,
            co_loss: true,
        }
    }

    /// Hidden width of the matching MLP (`fc1` out, `fc2` in): five times the query count,
    /// as the official `nn.Linear(num_queries, num_queries * 5)`.
    pub fn mlp_hidden(&self) -> usize {
        5 * self.num_queries
    }

    /// Length of one prototype: the three levels concatenated.
    pub fn prototype_dim(&self) -> usize {
        3 * self.hidden_dim
    }

    /// Checks the constraints the layers rely on, with a message naming the bad field.
    // `usize::is_multiple_of` needs Rust 1.87; the workspace MSRV is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn validate(&self) -> Result<()> {
        if let Some(i) = self.in_channels.iter().position(|&c| c == 0) {
            bail!("MmConfig: in_channels[{i}] must be positive");
        }
        // The sine encoding gives hidden_dim / 2 features per axis, in sin/cos pairs.
        if self.hidden_dim == 0 || self.hidden_dim % 4 != 0 {
            bail!("MmConfig: hidden_dim must be a positive multiple of 4, got {}", self.hidden_dim);
        }
        if self.num_heads == 0 || self.hidden_dim % self.num_heads != 0 {
            bail!(
                "MmConfig: hidden_dim {} is not divisible by num_heads {}",
                self.hidden_dim,
                self.num_heads
            );
        }
        if self.dim_feedforward == 0 {
            bail!("MmConfig: dim_feedforward must be positive");
        }
        if self.kv_min_size == 0 {
            bail!("MmConfig: kv_min_size must be positive");
        }
        if self.num_queries == 0 {
            bail!("MmConfig: num_queries must be positive");
        }
        Ok(())
    }
}

impl Default for MmConfig {
    fn default() -> Self {
        Self::resnet50()
    }
}
