//! Stage 2 (`cargo xtask train-mm`): the mask-matching module on the proposal shards (spec §3,
//! §4). Backbone and POS stay frozen and are never run: every episode is read from the shards
//! that `cache-proposals` wrote. The same optimizer, schedule, clipping, checkpoints, resume,
//! progress bar and log as stage 1; the result is a full MM-Former checkpoint (backbone + POS +
//! MM) that `eval` and `predict` load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use data::shard::{ShardExpectation, ShardReader};
use data::{ShardDataset, ShardEpisode, TestEpisodes};
use eval::{binary, oracle_mask, FewShotMetrics, MetricsSummary};
use losses::fewshot::{stage2_loss, Stage2Weights};
use mm::{MaskMatching, MmConfig, MmOutput};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use train::{AdamW, AdamWConfig, CheckpointStore, Evaluation, LoopConfig, Progress, RunSpec, StepLoss, TrainState};

use crate::cache::CacheManifest;
use crate::datasets::open_dataset;
use crate::error::{bail, Context, Error, Result};
use crate::model::{merge_part, save_model, ModelMeta};
use crate::prefetch::Prefetcher;
use crate::{Preset, PREFETCH_DEPTH};

pub const KIND: &str = "mm";
/// The full checkpoint `train-mm` writes (best validation mIoU) inside `--out`.
pub const MODEL_FILE: &str = "mmformer.safetensors";

/// Everything that defines a stage-2 run (saved in every checkpoint, minus `out` and
/// `log_every`, with the shards' model fingerprint). The field names are the options of `cargo
/// xtask train-mm` and the keys of its `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Stage2Options {
    /// Shard folder written by cache-proposals (manifest.json, train/, val/).
    pub shards: PathBuf,
    pub batch: usize,
    pub iters: u64,
    pub lr: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (official 0.01).
    pub clip: f64,
    /// Supports per training episode (the paper trains 1-shot and tests K-shot with it).
    pub shot: usize,
    pub seed: u64,
    pub out: PathBuf,
    pub eval_every: u64,
    /// Validation episodes (1-shot, held-out classes, from the val shards) per evaluation.
    pub eval_episodes: usize,
    pub log_every: u64,
    /// Ablation: no self-alignment.
    pub no_self_alignment: bool,
    /// Ablation: no cross-alignment.
    pub no_cross_alignment: bool,
    /// Ablation: heuristic matching (highest cosine) instead of the learned MLP.
    pub no_learnable_matching: bool,
    /// Ablation: train without L_co.
    pub no_co_loss: bool,
}

impl Stage2Options {
    /// The shared loop's schedule for these options.
    pub fn loop_config(&self) -> LoopConfig {
        crate::loop_config(self.iters, self.lr, self.clip, self.eval_every, self.log_every)
    }

    pub fn mm_config(&self, preset: Preset) -> MmConfig {
        MmConfig {
            self_alignment: !self.no_self_alignment,
            cross_alignment: !self.no_cross_alignment,
            learnable_matching: !self.no_learnable_matching,
            co_loss: !self.no_co_loss,
            ..preset.mm_config()
        }
    }
}

/// The train and val shard readers of a shard folder, checked against its manifest.
pub struct StageTwoData {
    pub manifest: CacheManifest,
    pub train: Option<ShardReader>,
    pub val: Option<ShardReader>,
}

impl StageTwoData {
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = CacheManifest::read(dir)?;
        let expect = ShardExpectation { model_fingerprint: Some(manifest.model_fingerprint.clone()), preprocess_fingerprint: None };
        let open = |sub: &str| -> Result<Option<ShardReader>> {
            let d = dir.join(sub);
            if !d.join("index.bin").exists() {
                return Ok(None);
            }
            let r = ShardReader::open(&d, &expect)?;
            if r.spec().backbone != manifest.preset.backbone_name() || r.spec().num_queries != manifest.preset.pos_config().num_queries {
                bail!("{}: shards of {} with {} proposals do not fit the {:?} preset", d.display(), r.spec().backbone, r.spec().num_queries, manifest.preset);
            }
            Ok(Some(r))
        };
        Ok(Self { train: open("train")?, val: open("val")?, manifest })
    }
}

/// A batch of shard episodes as tensors.
pub struct EpisodeBatch {
    pub query_feats: [Tensor; 3],
    pub support_feats: Vec<[Tensor; 3]>,
    pub support_labels: Vec<Tensor>,
    /// (B, N, h, w) proposal probabilities.
    pub proposals: Tensor,
    /// (B, H, W) f32 0/1/255.
    pub query_label: Tensor,
    pub input_hw: (usize, usize),
}

impl EpisodeBatch {
    pub fn new(eps: &[ShardEpisode], device: &Device) -> Result<Self> {
        let shot = eps[0].supports.len();
        let input_hw = eps[0].query.input_hw;
        if eps.iter().any(|e| e.supports.len() != shot || e.query.input_hw != input_hw) {
            bail!("episodes of one batch must share shot count and input size");
        }
        let stack = |recs: &[&data::shard::ProposalRecord], level: usize| -> Result<Tensor> {
            let shape = &recs[0].features[level].0;
            let mut all = Vec::with_capacity(recs.len() * shape.iter().product::<usize>());
            for r in recs {
                all.extend_from_slice(&r.features[level].1);
            }
            let mut dims = vec![recs.len()];
            dims.extend_from_slice(shape);
            Ok(Tensor::from_vec(all, dims, device)?)
        };
        let levels = |recs: &[&data::shard::ProposalRecord]| -> Result<[Tensor; 3]> { Ok([stack(recs, 0)?, stack(recs, 1)?, stack(recs, 2)?]) };
        let labels = |ls: Vec<&Vec<u8>>| -> Result<Tensor> {
            let data: Vec<f32> = ls.iter().flat_map(|l| l.iter().map(|&v| v as f32)).collect();
            Ok(Tensor::from_vec(data, (ls.len(), input_hw.0, input_hw.1), device)?)
        };
        let queries: Vec<_> = eps.iter().map(|e| &e.query).collect();
        let p_shape = &eps[0].query.proposals.0;
        let proposals = Tensor::from_vec(
            eps.iter().flat_map(|e| e.query.proposals.1.iter().copied()).collect::<Vec<f32>>(),
            (eps.len(), p_shape[0], p_shape[1], p_shape[2]),
            device,
        )?;
        let mut support_feats = Vec::with_capacity(shot);
        let mut support_labels = Vec::with_capacity(shot);
        for s in 0..shot {
            support_feats.push(levels(&eps.iter().map(|e| &e.supports[s]).collect::<Vec<_>>())?);
            support_labels.push(labels(eps.iter().map(|e| &e.support_labels[s]).collect())?);
        }
        Ok(Self {
            query_feats: levels(&queries)?,
            support_feats,
            support_labels,
            proposals,
            query_label: labels(eps.iter().map(|e| &e.query_label).collect())?,
            input_hw,
        })
    }

    /// The batch on `device` (a clone on the device it is already on).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let levels = |l: &[Tensor; 3]| -> Result<[Tensor; 3]> { Ok([l[0].to_device(device)?, l[1].to_device(device)?, l[2].to_device(device)?]) };
        Ok(Self {
            query_feats: levels(&self.query_feats)?,
            support_feats: self.support_feats.iter().map(levels).collect::<Result<_>>()?,
            support_labels: self.support_labels.iter().map(|t| t.to_device(device)).collect::<candle_core::Result<_>>()?,
            proposals: self.proposals.to_device(device)?,
            query_label: self.query_label.to_device(device)?,
            input_hw: self.input_hw,
        })
    }

    pub fn forward(&self, mm: &MaskMatching) -> Result<MmOutput> {
        Ok(mm.forward_with_probabilities(&self.query_feats, &self.support_feats, &self.support_labels, &self.proposals, self.input_hw)?)
    }
}

/// Ours / heuristic baseline / oracle on shard test episodes (official protocol: labels at the
/// model input size).
#[derive(Clone, Debug, Serialize)]
pub struct ShardEvaluation {
    pub ours: MetricsSummary,
    pub baseline: MetricsSummary,
    pub oracle: MetricsSummary,
    pub episodes: usize,
    pub shot: usize,
}

pub fn evaluate_on_shards(mm: &MaskMatching, val: &ShardReader, episodes: &TestEpisodes, novel: &[u32], device: &Device) -> Result<ShardEvaluation> {
    let ds = ShardDataset::test(val);
    let (mut ours, mut base, mut oracle) = (FewShotMetrics::new(novel), FewShotMetrics::new(novel), FewShotMetrics::new(novel));
    let chunk = 8;
    for start in (0..episodes.len()).step_by(chunk) {
        let eps = (start..(start + chunk).min(episodes.len()))
            .into_par_iter()
            .map(|i| ds.test_episode(episodes, i))
            .collect::<data::Result<Vec<_>>>()?;
        let batch = EpisodeBatch::new(&eps, device)?;
        let out = batch.forward(mm)?;
        let fg = out.foreground()?.to_dtype(DType::U8)?;
        let best_cos = out.cosine.argmax(1)?.to_vec1::<u32>()?;
        let proposals = out.proposals()?;
        for (b, e) in eps.iter().enumerate() {
            let label = &e.query_label;
            ours.add(e.class_id as u32, &fg.get(b)?.flatten_all()?.to_vec1::<u8>()?, label)?;
            let probs = proposals.get(b)?;
            base.add(e.class_id as u32, &binary(&probs.get(best_cos[b] as usize)?)?, label)?;
            let (_, m) = oracle_mask(&probs, label)?;
            oracle.add(e.class_id as u32, &m, label)?;
        }
    }
    Ok(ShardEvaluation { ours: ours.summary(), baseline: base.summary(), oracle: oracle.summary(), episodes: episodes.len(), shot: episodes.shot })
}

/// What stage 2 adds to the shared training loop: a batch of shard episodes through the mask
/// matching and the stage-2 loss; ours / baseline / oracle on the validation shard episodes; the
/// full model written at every new best.
struct MmStage<'a, 'scope, 'env> {
    opts: &'a Stage2Options,
    device: &'a Device,
    manifest: &'a CacheManifest,
    /// Training batches read from the shards, made ahead on CPU threads.
    batches: Prefetcher<'scope, 'env, Result<EpisodeBatch>>,
    val_reader: &'a ShardReader,
    val: TestEpisodes,
    novel: Vec<u32>,
    mm: MaskMatching,
    vm: &'a VarMap,
    cfg: MmConfig,
    weights: Stage2Weights,
    frozen: HashMap<String, Tensor>,
    last: Option<ShardEvaluation>,
}

impl train::Stage for MmStage<'_, '_, '_> {
    type Error = Error;

    fn loss(&mut self, it: u64) -> Result<StepLoss> {
        let b = self.batches.get(it)?.to_device(self.device)?;
        let out = b.forward(&self.mm)?;
        let loss = stage2_loss(&out.two_channel()?, &b.query_label, &out.cosine, &out.proposal_probs, self.weights)?;
        let mut parts = vec![("dice".to_string(), loss.dice.clone())];
        if let Some(c) = &loss.co {
            parts.push(("co".to_string(), c.loss.clone()));
        }
        Ok(StepLoss { total: loss.total, parts })
    }

    fn evaluate(&mut self) -> Result<Evaluation> {
        let e = evaluate_on_shards(&self.mm, self.val_reader, &self.val, &self.novel, self.device)?;
        let out = Evaluation {
            metric: e.ours.miou,
            record: serde_json::json!({"miou": e.ours.miou, "fb_iou": e.ours.fb_iou, "baseline_miou": e.baseline.miou,
                "oracle_miou": e.oracle.miou, "episodes": e.episodes, "shot": e.shot, "seed": self.val.seed}),
            summary: format!("mIoU {:.2} (baseline {:.2}, oracle {:.2}) on {} validation episodes", e.ours.miou, e.baseline.miou, e.oracle.miou, e.episodes),
        };
        self.last = Some(e);
        Ok(out)
    }

    fn on_new_best(&mut self, state: &TrainState, _: &Evaluation) -> Result<()> {
        let e = self.last.as_ref().expect("evaluated before a new best");
        let provenance = serde_json::json!({
            "dataset": self.manifest.dataset, "fold": self.manifest.fold, "shards": self.opts.shards,
            "model_fingerprint": self.manifest.model_fingerprint, "iter": state.iter,
            "val_miou": e.ours.miou, "val_episodes": e.episodes, "val_seed": self.val.seed,
        });
        write_full_model(self.opts, self.manifest, &self.frozen, &self.cfg, &train::varmap_tensors(self.vm), provenance)?;
        Ok(())
    }
}

/// Writes `<out>/mmformer.safetensors`: the frozen backbone and POS with these MM weights.
fn write_full_model(
    opts: &Stage2Options,
    manifest: &CacheManifest,
    frozen: &HashMap<String, Tensor>,
    mm_cfg: &MmConfig,
    mm_tensors: &HashMap<String, Tensor>,
    provenance: serde_json::Value,
) -> Result<PathBuf> {
    let mut all = frozen.clone();
    merge_part(&mut all, mm_tensors)?;
    let mut meta = ModelMeta::new(manifest.preset, mm_cfg);
    meta.provenance = provenance;
    let path = opts.out.join(MODEL_FILE);
    save_model(&path, &meta, &all)?;
    Ok(path)
}

/// The batch of training iteration `it` (`batch` episodes, read in parallel) as CPU tensors: what
/// `train-mm` makes ahead of each step on its read-ahead thread, and what `bench stage2` times.
/// Assembling the tensors there too takes their copy off the step (about 100 MB, 18 ms, a batch
/// at the paper preset); the step moves them to its device. Episode n depends only on (seed, n),
/// so a resumed run sees what the uninterrupted one would.
pub fn training_batch(train: &ShardDataset, batch: u64, it: u64) -> Result<EpisodeBatch> {
    let eps = (0..batch).into_par_iter().map(|j| train.episode(it * batch + j)).collect::<data::Result<Vec<ShardEpisode>>>()?;
    EpisodeBatch::new(&eps, &Device::Cpu)
}

/// Trains the mask matching on the shards at `opts.shards`, on `device`, resuming from
/// `opts.out` when a run with the same options was interrupted there. Writes `config.json`,
/// `log.jsonl`, `checkpoints/{iter_*,best}` and the full model `mmformer.safetensors` (best
/// validation mIoU) under `opts.out`; returns the path of the full model.
pub fn train_mm(opts: &Stage2Options, device: &Device, progress: &dyn Progress) -> Result<PathBuf> {
    if opts.batch == 0 || opts.eval_episodes == 0 || opts.shot == 0 {
        bail!("batch, shot and eval_episodes must be >= 1 (got {}, {} and {})", opts.batch, opts.shot, opts.eval_episodes);
    }
    let data2 = StageTwoData::open(&opts.shards)?;
    let manifest = &data2.manifest;
    // Read and checked once, before training: a changed file is reported now, not at the
    // first checkpoint.
    let frozen = manifest.frozen_tensors(device)?;
    let train_reader = data2.train.as_ref().with_context(|| format!("{}: no train shards (cache-proposals --split train)", opts.shards.display()))?;
    let val_reader = data2.val.as_ref().with_context(|| format!("{}: no val shards (cache-proposals --split val)", opts.shards.display()))?;
    let ds = open_dataset(&manifest.dataset)?;
    let novel = ds.novel_classes(manifest.fold)?.to_vec();
    let size = manifest.preset.input_size();
    let min_area = data::AugmentConfig::with_crop_size(size).min_support_area;
    let train = ShardDataset::train(train_reader, &novel, opts.shot, opts.seed, min_area)?;
    // Checkpoints are selected on validation episodes, never on the test episodes.
    let val_seed = eval::validation_seed(ds.default_test_seed(manifest.fold)?);
    let val = TestEpisodes::generate(&ds, manifest.fold, 1, opts.eval_episodes, val_seed)?;

    let cfg = opts.mm_config(manifest.preset);
    let vm = VarMap::new();
    let mm = MaskMatching::new(&cfg, train::seeded_var_builder(&vm, opts.seed, DType::F32, device))?;
    let mut opt = AdamW::new(
        train::named_vars(&vm),
        AdamWConfig { lr: opts.lr, weight_decay: opts.weight_decay, ..Default::default() },
        train::default_no_decay,
    )?;
    let weights = Stage2Weights { dice: 10.0, co: cfg.co_loss.then_some(6.0) };
    crate::write_config(&opts.out, opts)?;
    let mut config = crate::run_config(opts);
    config["model_fingerprint"] = serde_json::json!(manifest.model_fingerprint);
    let novel = novel.iter().map(|&c| c as u32).collect();
    let spec = RunSpec { kind: KIND, config, out: &opts.out, device };
    let batch = opts.batch as u64;
    let make = |it: u64| training_batch(&train, batch, it);
    let (state, frozen) = std::thread::scope(|scope| -> Result<_> {
        let batches = Prefetcher::new(scope, &make, PREFETCH_DEPTH, opts.iters);
        let mut stage = MmStage { opts, device, manifest, batches, val_reader, val, novel, mm, vm: &vm, cfg: cfg.clone(), weights, frozen, last: None };
        let state = train::train(&mut stage, &spec, &vm, &mut opt, &opts.loop_config(), progress)?;
        Ok((state, stage.frozen))
    })?;
    let full = opts.out.join(MODEL_FILE);
    if !full.exists() {
        // A resumed run that was already finished: rebuild the full model from the best MM.
        let best = train::checkpoint_store(&opts.out).best(KIND)?.context("no best checkpoint")?;
        write_full_model(opts, manifest, &frozen, &cfg, &best.model(device)?, serde_json::json!({"iter": best.state.iter}))?;
    }
    progress.note(&format!(
        "best val mIoU {:.2} at iteration {}; full model → {}",
        state.best_metric.unwrap_or(f64::NAN),
        state.best_iter.unwrap_or(0),
        full.display()
    ));
    Ok(full)
}

/// A trained mask-matching module (a train-mm checkpoint folder) on `episodes` cached test
/// episodes of `shot` shots (fast: no backbone or POS; `cargo xtask eval-shards`).
pub fn eval_shards(shards: &Path, mm_checkpoint: &Path, episodes: usize, shot: usize, device: &Device) -> Result<(ShardEvaluation, data::shard::ShardSpec)> {
    let d = StageTwoData::open(shards)?;
    let val = d.val.as_ref().with_context(|| format!("{}: no val shards", shards.display()))?;
    let ck = CheckpointStore::open(mm_checkpoint, KIND)?;
    let run: Stage2Options = serde_json::from_value({
        let mut c = ck.state.config.clone();
        c["out"] = serde_json::json!("");
        c["log_every"] = serde_json::json!(1);
        c
    })
    .with_context(|| format!("{}: unreadable run configuration", mm_checkpoint.display()))?;
    let cfg = run.mm_config(d.manifest.preset);
    let vm = VarMap::new();
    let mm = MaskMatching::new(&cfg, train::seeded_var_builder(&vm, 0, DType::F32, device))?;
    train::load_into(&vm, &ck.model(device)?, &ck.model_path())?;
    let ds = open_dataset(&d.manifest.dataset)?;
    let fold = d.manifest.fold;
    let novel: Vec<u32> = ds.novel_classes(fold)?.iter().map(|&c| c as u32).collect();
    let eps = TestEpisodes::generate(&ds, fold, shot, episodes, ds.default_test_seed(fold)?)?;
    let e = evaluate_on_shards(&mm, val, &eps, &novel, device)?;
    Ok((e, val.spec().clone()))
}
