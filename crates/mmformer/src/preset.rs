//! Model size and input recipe: the paper's ResNet-50 model at 480², or a small model that trains
//! on a laptop CPU in minutes.

use pos::PosConfig;
use serde::{Deserialize, Serialize};

/// Model size and input recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// EfficientNet-Lite0 (real ImageNet weights) + a small POS, 256² inputs: trains on a 2-core CPU in minutes.
    Cpu,
    /// The paper: ResNet-50 + the full POS, 480² inputs.
    Paper,
}

impl Preset {
    pub fn pos_config(self) -> PosConfig {
        match self {
            Preset::Cpu => PosConfig::cpu(),
            Preset::Paper => PosConfig::paper(),
        }
    }

    /// Training crop and test resize side (the paper's 480).
    pub fn input_size(self) -> u32 {
        match self {
            Preset::Cpu => 256,
            Preset::Paper => 480,
        }
    }

    /// The mask-matching module on this preset's backbone taps (res5/res4/res3 equivalents).
    /// The CPU preset halves the official widths (hidden 128, FFN 256) to match its small POS.
    pub fn mm_config(self) -> mm::MmConfig {
        match self {
            Preset::Cpu => mm::MmConfig {
                hidden_dim: 128,
                dim_feedforward: 256,
                num_queries: PosConfig::cpu().num_queries,
                ..mm::MmConfig::efficientnet_lite0()
            },
            Preset::Paper => mm::MmConfig::resnet50(),
        }
    }

    /// Name of the preset's backbone (shard specs, checkpoint metadata).
    pub fn backbone_name(self) -> &'static str {
        match self {
            Preset::Cpu => "efficientnet-lite0",
            Preset::Paper => "resnet50",
        }
    }

    /// Matching points per mask (12544 = 1/18 of a 480² image; scaled with the area).
    pub fn num_points(self) -> usize {
        match self {
            Preset::Cpu => 3584,
            Preset::Paper => 12544,
        }
    }

    /// `cpu` or `paper`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Cpu => "cpu",
            Preset::Paper => "paper",
        }
    }
}

/// The default schedule of one training stage (spec §4.2 for the paper preset; the cpu preset's
/// own, sized to train in minutes). Every value can be overridden.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub batch: usize,
    pub iters: u64,
    pub lr: f64,
    pub weight_decay: f64,
    pub clip: f64,
    /// Iterations between validations + checkpoints.
    pub eval_every: u64,
    /// Validation episodes per evaluation.
    pub eval_episodes: usize,
}

impl Preset {
    /// Stage 1 (the POS): the official batch 8, 20,000 iterations on PASCAL and 60,000 on COCO
    /// (validation every 500 / 1,000) for the paper preset.
    pub fn stage1_schedule(self, coco: bool) -> Schedule {
        match self {
            Preset::Cpu => Schedule { batch: 4, iters: 600, lr: 1e-4, weight_decay: 0.05, clip: 0.01, eval_every: 100, eval_episodes: 200 },
            Preset::Paper => Schedule {
                batch: 8,
                iters: if coco { 60_000 } else { 20_000 },
                lr: 1e-4,
                weight_decay: 0.05,
                clip: 0.01,
                eval_every: if coco { 1000 } else { 500 },
                eval_episodes: 1000,
            },
        }
    }

    /// Stage 2 (the mask matching): the official batch 4, 10,000 iterations on PASCAL and 20,000
    /// on COCO (validation every 200) for the paper preset.
    pub fn stage2_schedule(self, coco: bool) -> Schedule {
        match self {
            Preset::Cpu => Schedule { batch: 4, iters: 1000, lr: 1e-4, weight_decay: 0.05, clip: 0.01, eval_every: 200, eval_episodes: 300 },
            Preset::Paper => Schedule {
                batch: 4,
                iters: if coco { 20_000 } else { 10_000 },
                lr: 1e-4,
                weight_decay: 0.05,
                clip: 0.01,
                eval_every: 200,
                eval_episodes: 1000,
            },
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Preset::Cpu),
            "paper" => Ok(Preset::Paper),
            _ => Err(format!("unknown preset `{s}` (cpu or paper)")),
        }
    }
}
