//! Stage 1: the Potential Objects Segmenter on the base classes of a fold (spec §2.3, §4), with
//! the official optimizer, schedule and clipping, checkpoints that resume exactly, the oracle
//! mIoU on validation episodes of the held-out classes, and a JSON-lines log
//! (`cargo xtask train-pos`).

use std::collections::HashMap;
use std::path::PathBuf;

use backbone::Backbone;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use data::{AugmentConfig, FewShotDataset, TestEpisodes, TrainEpisodeSampler};
use eval::{images_to_tensor, labels_to_tensor, oracle_mask, upsampled_proposals};
use losses::{Stage1Config, Stage1Criterion};
use rand_chacha::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};
use train::{AdamW, AdamWConfig, Evaluation, LoopConfig, Progress, RunSpec, StepLoss, TrainState};

use crate::datasets::open_dataset;
use crate::error::{bail, Error, Result};
use crate::model::pos_features;
use crate::prefetch::Prefetcher;
use crate::{Preset, PREFETCH_DEPTH};
use rayon::prelude::*;

pub const KIND: &str = "pos";

/// Everything that defines a stage-1 run (saved in every checkpoint, minus `out` and
/// `log_every`; a resume must match it). The field names are the command-line options of
/// `cargo xtask train-pos` and the keys of its `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Stage1Options {
    /// Dataset root in the VOC layout (PASCAL VOC2012, or the synthetic dataset).
    pub data: PathBuf,
    /// Fold whose classes are held out (0..3).
    pub fold: usize,
    pub preset: Preset,
    /// Backbone weight file (ResNet-50: torchvision .pth, official checkpoint or safetensors; default EfficientNet-Lite0 asset).
    pub backbone_weights: Option<PathBuf>,
    pub batch: usize,
    pub iters: u64,
    pub lr: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (official 0.01).
    pub clip: f64,
    pub seed: u64,
    /// Run folder: checkpoints, log.jsonl, metrics.
    pub out: PathBuf,
    /// Iterations between checkpoints + oracle evaluations.
    pub eval_every: u64,
    /// Validation episodes per evaluation.
    pub eval_episodes: usize,
    /// Log every N iterations.
    pub log_every: u64,
}

/// A fresh POS in a VarMap, initialised from `seed`, with the scratch init values VarBuilder
/// hints cannot express.
pub fn new_pos_seeded(preset: Preset, seed: u64, device: &Device) -> Result<(VarMap, pos::Pos)> {
    let mut vm = VarMap::new();
    let vb = train::seeded_var_builder(&vm, seed, DType::F32, device);
    let cfg = preset.pos_config();
    let model = pos::Pos::new(&cfg, vb)?;
    for (name, t) in pos::scratch_init_overrides(&cfg, device)? {
        vm.set_one(&name, &t)?;
    }
    Ok((vm, model))
}

/// [`new_pos_seeded`] with seed 0 (for models whose weights are loaded right after).
pub fn new_pos(preset: Preset, device: &Device) -> Result<(VarMap, pos::Pos)> {
    new_pos_seeded(preset, 0, device)
}

/// The tensors of a freshly initialised POS (scratch init, drawn from `seed`).
pub fn fresh_pos_tensors(preset: Preset, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(train::varmap_tensors(&new_pos_seeded(preset, seed, device)?.0))
}

/// A stage-1 checkpoint's POS on `device`, ready for inference.
pub fn load_pos(preset: Preset, checkpoint: &train::Checkpoint, device: &Device) -> Result<pos::Pos> {
    let (vm, pos) = new_pos(preset, device)?;
    train::load_into(&vm, &checkpoint.model(device)?, &checkpoint.model_path())?;
    Ok(pos)
}

/// Oracle mIoU (%) of the proposals on `episodes` test episodes of the fold's held-out classes.
pub fn oracle_miou(
    ds: &FewShotDataset,
    fold: usize,
    episodes: &TestEpisodes,
    size: u32,
    backbone: &dyn Backbone,
    model: &pos::Pos,
    device: &Device,
) -> Result<f64> {
    let classes: Vec<u32> = ds.novel_classes(fold)?.iter().map(|&c| c as u32).collect();
    let mut metrics = eval::FewShotMetrics::new(&classes);
    let chunk = 8;
    for start in (0..episodes.len()).step_by(chunk) {
        let eps = episodes.load_range(ds, start..(start + chunk).min(episodes.len()), size)?;
        // Test views share one size: one batched forward per chunk.
        let x = images_to_tensor(&eps.iter().map(|e| &e.query.image).collect::<Vec<_>>(), device)?;
        let out = model.forward(&pos_features(&backbone.forward(&x)?))?;
        let (h, w) = (eps[0].query.image.height, eps[0].query.image.width);
        let probs = upsampled_proposals(&out.pred_masks, (h, w))?;
        for (b, e) in eps.iter().enumerate() {
            let label = e.query.label.data();
            let (_, mask) = oracle_mask(&probs.get(b)?, label)?;
            metrics.add(e.class_id as u32, &mask, label)?;
        }
    }
    Ok(metrics.summary().miou)
}

/// What stage 1 adds to the shared training loop: one batch of episodes through the frozen
/// backbone, the POS and the stage-1 criterion; the oracle mIoU on validation episodes.
struct PosStage<'a, 'scope, 'env> {
    opts: &'a Stage1Options,
    device: &'a Device,
    ds: &'a FewShotDataset,
    /// Decoded, augmented episode batches, made ahead on CPU threads.
    batches: Prefetcher<'scope, 'env, data::Result<Vec<data::Episode>>>,
    backbone: Box<dyn Backbone>,
    model: pos::Pos,
    criterion: Stage1Criterion,
    val: TestEpisodes,
}

impl train::Stage for PosStage<'_, '_, '_> {
    type Error = Error;

    fn loss(&mut self, it: u64) -> Result<StepLoss> {
        let (opts, device) = (self.opts, self.device);
        // Episode indices and loss points derive from (seed, iteration) alone, so a resumed run
        // sees exactly what the uninterrupted one would.
        let eps = self.batches.get(it)?;
        let x = images_to_tensor(&eps.iter().map(|e| &e.query.image).collect::<Vec<_>>(), device)?;
        // The GT masks are made on the host, where the labels are, then sent: no read-back.
        let sem = labels_to_tensor(&eps.iter().map(|e| &e.query_semantic).collect::<Vec<_>>(), &Device::Cpu)?;
        let qlabel = labels_to_tensor(&eps.iter().map(|e| &e.query.label).collect::<Vec<_>>(), device)?;
        let targets = (0..eps.len())
            .map(|b| losses::stage1_targets(&sem.get(b)?, &[])?.to_device(device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let feats = self.backbone.forward(&x)?;
        let out = self.model.forward(&pos_features(&feats))?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed ^ (it.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let losses = self.criterion.forward_with_rng(&out.all_predictions(), &targets, &qlabel, &mut rng)?;
        let parts = losses.weighted_parts();
        Ok(StepLoss { total: losses.total, parts })
    }

    fn evaluate(&mut self) -> Result<Evaluation> {
        let size = self.opts.preset.input_size();
        let miou = oracle_miou(self.ds, self.opts.fold, &self.val, size, self.backbone.as_ref(), &self.model, self.device)?;
        Ok(Evaluation {
            metric: miou,
            record: serde_json::json!({"oracle_miou": miou, "episodes": self.val.len(), "seed": self.val.seed}),
            summary: format!("oracle mIoU {miou:.2} on {} validation episodes", self.val.len()),
        })
    }
}

/// Trains the POS as `opts` says, on `device`, resuming from `opts.out` when a run with the same
/// options was interrupted there. Writes `config.json`, `log.jsonl` and
/// `checkpoints/{iter_*,best}` under `opts.out`; returns the final training state.
pub fn train_pos(opts: &Stage1Options, device: &Device, progress: &dyn Progress) -> Result<TrainState> {
    if opts.batch == 0 || opts.eval_episodes == 0 {
        bail!("batch and eval_episodes must be >= 1 (got {} and {})", opts.batch, opts.eval_episodes);
    }
    let ds = open_dataset(&opts.data)?;
    let size = opts.preset.input_size();
    let sampler = TrainEpisodeSampler::new(&ds, opts.fold, 1, opts.seed, AugmentConfig::with_crop_size(size))?;
    let backbone = crate::model::load_backbone(opts.preset, opts.backbone_weights.as_deref(), device)?;
    let (vm, model) = new_pos_seeded(opts.preset, opts.seed, device)?;
    let mut opt = AdamW::new(
        train::named_vars(&vm),
        AdamWConfig { lr: opts.lr, weight_decay: opts.weight_decay, ..Default::default() },
        train::default_no_decay,
    )?;
    let criterion = Stage1Criterion::new(Stage1Config { num_points: opts.preset.num_points(), ..Default::default() });
    // Checkpoints are selected on validation episodes, never on the test episodes.
    let val_seed = eval::validation_seed(ds.default_test_seed(opts.fold)?);
    let val = TestEpisodes::generate(&ds, opts.fold, 1, opts.eval_episodes, val_seed)?;
    crate::write_config(&opts.out, opts)?;
    let spec = RunSpec { kind: KIND, config: crate::run_config(opts), out: &opts.out, device };
    let batch = opts.batch as u64;
    let make = |it: u64| (0..batch).into_par_iter().map(|j| sampler.episode(it * batch + j)).collect::<data::Result<Vec<_>>>();
    let state = std::thread::scope(|scope| {
        let batches = Prefetcher::new(scope, &make, PREFETCH_DEPTH, opts.iters);
        let mut stage = PosStage { opts, device, ds: &ds, batches, backbone, model, criterion, val };
        train::train(&mut stage, &spec, &vm, &mut opt, &opts.loop_config(), progress)
    })?;
    progress.note(&format!(
        "best oracle mIoU {:.2} at iteration {} → {}",
        state.best_metric.unwrap_or(f64::NAN),
        state.best_iter.unwrap_or(0),
        opts.out.join("checkpoints/best").display()
    ));
    Ok(state)
}

impl Stage1Options {
    /// The shared loop's schedule for these options.
    pub fn loop_config(&self) -> LoopConfig {
        crate::loop_config(self.iters, self.lr, self.clip, self.eval_every, self.log_every)
    }
}
