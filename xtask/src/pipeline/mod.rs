//! Wiring shared by the pipeline commands: presets, model construction, episode → tensor
//! conversion and the proposal-selection rules used by every report (oracle, baseline).

pub mod bench_stage2;
pub mod cache;
pub mod evaluate;
pub mod model;
pub mod stage1;
pub mod stage2;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use backbone::{Backbone, EfficientNetLite0, ResNet50};
use candle_core::{DType, Device, Tensor};
use data::{Label, NormalizedImage};
use pos::PosConfig;
use serde::{Deserialize, Serialize};

/// Model size and input recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
}

/// The backbone weight file of a preset: `weights` when given (ResNet-50: torchvision / official /
/// safetensors, required), else the fetched EfficientNet-Lite0 asset. It must exist.
pub fn backbone_file(preset: Preset, weights: Option<&Path>) -> Result<PathBuf> {
    let path = match (preset, weights) {
        (_, Some(p)) => p.to_path_buf(),
        (Preset::Cpu, None) => backbone::assets::efficientnet_lite0_path(),
        (Preset::Paper, None) => bail!(
            "the paper preset needs ResNet-50 weights: --backbone-weights resnet50-19c8e357.pth (torchvision) or an official MM-Former checkpoint"
        ),
    };
    if !path.exists() {
        match preset {
            Preset::Cpu => bail!("{}: EfficientNet-Lite0 weights not found; run `cargo xtask fetch-assets`", path.display()),
            Preset::Paper => bail!("{}: ResNet-50 weights not found", path.display()),
        }
    }
    Ok(path)
}

/// The frozen backbone of a preset, from [`backbone_file`].
pub fn load_backbone(preset: Preset, weights: Option<&Path>) -> Result<Box<dyn Backbone>> {
    let path = backbone_file(preset, weights)?;
    Ok(match preset {
        Preset::Cpu => Box::new(EfficientNetLite0::from_file(&path).with_context(|| format!("loading {}", path.display()))?),
        Preset::Paper => Box::new(ResNet50::from_file(&path).with_context(|| format!("loading {}", path.display()))?),
    })
}

/// (B, 3, H, W) f32 from normalised images of one size.
pub fn images_to_tensor(images: &[&NormalizedImage], device: &Device) -> Result<Tensor> {
    let (h, w) = (images[0].height, images[0].width);
    let mut data = Vec::with_capacity(images.len() * 3 * h * w);
    for im in images {
        if (im.height, im.width) != (h, w) {
            bail!("images of one batch must share a size: {}x{} vs {h}x{w}", im.height, im.width);
        }
        data.extend_from_slice(&im.data);
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, h, w), device)?)
}

/// (B, H, W) f32 label values (0/1/255 or class ids).
pub fn labels_to_tensor(labels: &[&Label], device: &Device) -> Result<Tensor> {
    let (h, w) = (labels[0].height() as usize, labels[0].width() as usize);
    let mut data = Vec::with_capacity(labels.len() * h * w);
    for l in labels {
        if (l.height() as usize, l.width() as usize) != (h, w) {
            bail!("labels of one batch must share a size");
        }
        data.extend(l.data().iter().map(|&v| v as f32));
    }
    Ok(Tensor::from_vec(data, (labels.len(), h, w), device)?)
}

/// Backbone features as the mask-matching module wants them: [res5, res4, res3].
pub fn mm_features(f: &backbone::Features) -> [Tensor; 3] {
    [f.res5.clone(), f.res4.clone(), f.res3.clone()]
}

/// Backbone features as the POS wants them: [res2, res3, res4, res5].
pub fn pos_features(f: &backbone::Features) -> Vec<Tensor> {
    vec![f.res2.clone(), f.res3.clone(), f.res4.clone(), f.res5.clone()]
}

/// (N, H, W) proposal probabilities at the label size: sigmoid, then bilinear
/// (align_corners=False), as the official few-shot head upsamples them.
pub fn upsampled_proposals(pred_masks: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(pred_masks)?;
    Ok(ops::resize::resize_bilinear(&p, hw, false)?)
}

/// The oracle proposal (best soft IoU with the label, 255 → 0) and its binary mask.
pub fn oracle_mask(probs: &Tensor, label: &[u8]) -> Result<(usize, Vec<u8>)> {
    let (_, h, w) = probs.dims3()?;
    if label.len() != h * w {
        bail!("label has {} pixels, proposals are {h}x{w}", label.len());
    }
    let t = Tensor::from_vec(label.iter().map(|&v| f32::from(v == 1)).collect::<Vec<_>>(), (1, h, w), probs.device())?;
    let iou = losses::fewshot::soft_iou(&probs.unsqueeze(0)?, &t)?.squeeze(0)?;
    let best = iou.argmax(0)?.to_scalar::<u32>()? as usize;
    Ok((best, binary(&probs.get(best)?)?))
}

/// Threshold probabilities at 0.5 into a row-major 0/1 mask.
pub fn binary(probs: &Tensor) -> Result<Vec<u8>> {
    Ok(probs.ge(0.5)?.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?)
}

/// A run's configuration as it is stored in its checkpoints, without the fields that may change
/// across a resume (`out`, `log_every`).
pub fn run_config(args: &impl Serialize) -> serde_json::Value {
    let mut v = serde_json::to_value(args).expect("args serialise");
    if let Some(o) = v.as_object_mut() {
        for k in ["out", "log_every"] {
            o.remove(k);
        }
    }
    v
}

/// The state of a training run in `store`: resumed from its latest checkpoint (weights into `vm`,
/// optimizer moments into `opt`) when there is one made with the same `config`, else fresh.
/// A checkpoint of another configuration is refused rather than silently mixed.
pub fn resume_or_start(
    store: &train::CheckpointStore,
    kind: &str,
    config: &serde_json::Value,
    vm: &candle_nn::VarMap,
    opt: &mut train::AdamW,
) -> Result<train::TrainState> {
    let Some(ck) = store.latest(kind)? else {
        return Ok(train::TrainState {
            format_version: 0,
            kind: kind.into(),
            iter: 0,
            optimizer_step: 0,
            best_metric: None,
            best_iter: None,
            config: config.clone(),
            model_sha256: String::new(),
            optimizer_sha256: String::new(),
        });
    };
    if ck.state.config != *config {
        bail!(
            "{}: the run in this folder used another configuration ({}); use a new --out or the same flags",
            ck.dir.display(),
            ck.state.config
        );
    }
    let device = Device::Cpu;
    stage1::load_into(vm, &ck.model(&device)?, &ck.model_path())?;
    ck.restore_optimizer(opt, &device)?;
    eprintln!("resuming from {} (iteration {})", ck.dir.display(), ck.state.iter);
    Ok(ck.state)
}

/// Saves the periodic checkpoint and, when `metric` beats the best so far, the `best` one.
/// Returns whether it was a new best.
pub fn save_checkpoints(
    store: &train::CheckpointStore,
    vm: &candle_nn::VarMap,
    opt: &train::AdamW,
    state: &mut train::TrainState,
    metric: f64,
) -> Result<bool> {
    let tensors = stage1::varmap_tensors(vm);
    let best = state.best_metric.is_none_or(|b| metric > b);
    if best {
        state.best_metric = Some(metric);
        state.best_iter = Some(state.iter);
        store.save_best(&tensors, opt, state.clone())?;
    }
    store.save(&tensors, opt, state.clone())?;
    Ok(best)
}

/// The update shared by both stages: backward, global gradient-norm clip, AdamW step. A
/// non-finite loss stops the run before it touches the weights (the last checkpoint stays good).
/// Returns (loss, gradient norm before clipping).
pub fn optimizer_step(
    loss: &Tensor,
    vars: &[train::NamedVar],
    opt: &mut train::AdamW,
    clip: f64,
    lr: f64,
    iter: u64,
    store: &train::CheckpointStore,
) -> Result<(f64, f64)> {
    let value = loss.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        bail!("iteration {iter}: loss is {value}; stopping (last good checkpoint kept in {})", store.dir().display());
    }
    let mut grads = loss.backward()?;
    let gnorm = train::clip_grad_norm(&mut grads, vars, clip)?;
    opt.step(&grads, lr)?;
    Ok((value, gnorm))
}
