//! `cargo xtask train-mm`: stage 2, the mask-matching module on the proposal shards (spec §3,
//! §4). Backbone and POS stay frozen and are never run: every episode is read from the shards
//! that `cache-proposals` wrote. The same optimizer, schedule, clipping, checkpoints, resume,
//! progress bar and log as stage 1; the result is a full MM-Former checkpoint (backbone + POS +
//! MM) that `eval` and `predict` load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use data::shard::{ShardExpectation, ShardReader};
use data::{ShardDataset, ShardEpisode, TestEpisodes};
use eval::{FewShotMetrics, MetricsSummary};
use losses::fewshot::{stage2_loss, Stage2Weights};
use mm::{MaskMatching, MmConfig, MmOutput};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use train::{AdamW, AdamWConfig, CheckpointStore, JsonlLog, PolyLr, TrainState};

use super::cache::{model_fingerprint, CacheManifest};
use super::model::{assemble, merge_part, save_model, ModelMeta};
use super::stage1::{named_vars, open_dataset, varmap_tensors, KIND as POS_KIND};
use super::{binary, Preset};

pub const KIND: &str = "mm";
/// The full checkpoint `train-mm` writes (best validation mIoU) inside `--out`.
pub const MODEL_FILE: &str = "mmformer.safetensors";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, clap::Args)]
pub struct Stage2Args {
    /// Shard folder written by cache-proposals (manifest.json, train/, val/).
    #[arg(long, default_value = "runs/shards")]
    pub shards: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 1000)]
    pub iters: u64,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (official 0.01).
    #[arg(long, default_value_t = 0.01)]
    pub clip: f64,
    /// Supports per training episode (the paper trains 1-shot and tests K-shot with it).
    #[arg(long, default_value_t = 1)]
    pub shot: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "runs/mm")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 200)]
    pub eval_every: u64,
    /// Validation episodes (1-shot, held-out classes, from the val shards) per evaluation.
    #[arg(long, default_value_t = 300)]
    pub eval_episodes: usize,
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Ablation: no self-alignment.
    #[arg(long)]
    pub no_self_alignment: bool,
    /// Ablation: no cross-alignment.
    #[arg(long)]
    pub no_cross_alignment: bool,
    /// Ablation: heuristic matching (highest cosine) instead of the learned MLP.
    #[arg(long)]
    pub no_learnable_matching: bool,
    /// Ablation: train without L_co.
    #[arg(long)]
    pub no_co_loss: bool,
}

impl Stage2Args {
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

pub fn evaluate_on_shards(mm: &MaskMatching, val: &ShardReader, episodes: &TestEpisodes, novel: &[u32]) -> Result<ShardEvaluation> {
    let device = Device::Cpu;
    let ds = ShardDataset::test(val);
    let (mut ours, mut base, mut oracle) = (FewShotMetrics::new(novel), FewShotMetrics::new(novel), FewShotMetrics::new(novel));
    let chunk = 8;
    for start in (0..episodes.len()).step_by(chunk) {
        let eps = (start..(start + chunk).min(episodes.len()))
            .into_par_iter()
            .map(|i| ds.test_episode(episodes, i))
            .collect::<data::Result<Vec<_>>>()?;
        let batch = EpisodeBatch::new(&eps, &device)?;
        let out = batch.forward(mm)?;
        let fg = out.foreground()?.to_dtype(DType::U8)?;
        let best_cos = out.cosine.argmax(1)?.to_vec1::<u32>()?;
        for (b, e) in eps.iter().enumerate() {
            let label = &e.query_label;
            ours.add(e.class_id as u32, &fg.get(b)?.flatten_all()?.to_vec1::<u8>()?, label)?;
            let probs = out.proposals.get(b)?;
            base.add(e.class_id as u32, &binary(&probs.get(best_cos[b] as usize)?)?, label)?;
            let (_, m) = super::oracle_mask(&probs, label)?;
            oracle.add(e.class_id as u32, &m, label)?;
        }
    }
    Ok(ShardEvaluation { ours: ours.summary(), baseline: base.summary(), oracle: oracle.summary(), episodes: episodes.len(), shot: episodes.shot })
}

/// The frozen part of the full checkpoint: the backbone and POS tensors the shards were made
/// with (official names), checked against the shards' model fingerprint. Read once per run, so
/// a changed file is reported before training rather than at the first checkpoint.
fn frozen_tensors(manifest: &CacheManifest) -> Result<HashMap<String, Tensor>> {
    let device = Device::Cpu;
    let ck = CheckpointStore::open(&manifest.pos_checkpoint, POS_KIND)
        .with_context(|| format!("{}: the stage-1 checkpoint the shards were made with is gone", manifest.pos_checkpoint.display()))?;
    let bsha = train::sha256_file(&manifest.backbone_file)?;
    if model_fingerprint(&bsha, &ck.state.model_sha256) != manifest.model_fingerprint {
        bail!(
            "{} / {}: these weights changed since the shards were cached; re-run cache-proposals",
            manifest.backbone_file.display(),
            manifest.pos_checkpoint.display()
        );
    }
    assemble(manifest.preset, &manifest.backbone_file, &ck.model(&device)?, &HashMap::new())
}

/// Writes `<out>/mmformer.safetensors`: the frozen backbone and POS with these MM weights.
fn write_full_model(
    args: &Stage2Args,
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
    let path = args.out.join(MODEL_FILE);
    save_model(&path, &meta, &all)?;
    Ok(path)
}

pub fn train_mm(args: &Stage2Args) -> Result<()> {
    let device = Device::Cpu;
    let data2 = StageTwoData::open(&args.shards)?;
    let manifest = &data2.manifest;
    let frozen = frozen_tensors(manifest)?;
    let train_reader = data2.train.as_ref().with_context(|| format!("{}: no train shards (cache-proposals --split train)", args.shards.display()))?;
    let val_reader = data2.val.as_ref().with_context(|| format!("{}: no val shards (cache-proposals --split val)", args.shards.display()))?;
    let ds = open_dataset(&manifest.dataset)?;
    let novel = ds.novel_classes(manifest.fold)?.to_vec();
    let novel_u32: Vec<u32> = novel.iter().map(|&c| c as u32).collect();
    let size = manifest.preset.input_size();
    let min_area = data::AugmentConfig::with_crop_size(size).min_support_area;
    let train = ShardDataset::train(train_reader, &novel, args.shot, args.seed, min_area)?;
    let val = TestEpisodes::generate(&ds, manifest.fold, 1, args.eval_episodes, ds.default_test_seed(manifest.fold)?)?;

    let cfg = args.mm_config(manifest.preset);
    let vm = VarMap::new();
    let mm = MaskMatching::new(&cfg, train::seeded_var_builder(&vm, args.seed, DType::F32, &device))?;
    let vars = named_vars(&vm);
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig { lr: args.lr, weight_decay: args.weight_decay, ..Default::default() },
        train::default_no_decay,
    )?;
    let sched = PolyLr::new(args.lr, args.iters);
    let weights = Stage2Weights { dice: 10.0, co: cfg.co_loss.then_some(6.0) };

    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    crate::config_file::write_resolved(&args.out, args)?;
    let store = CheckpointStore::new(args.out.join("checkpoints"), 2);
    let mut config = super::run_config(args);
    config["model_fingerprint"] = serde_json::json!(manifest.model_fingerprint);
    let mut state = super::resume_or_start(&store, KIND, &config, &vm, &mut opt)?;
    let mut log = JsonlLog::append(&args.out.join("log.jsonl"))?;
    let provenance = |state: &TrainState, e: &ShardEvaluation| {
        serde_json::json!({
            "dataset": manifest.dataset, "fold": manifest.fold, "shards": args.shards,
            "model_fingerprint": manifest.model_fingerprint, "iter": state.iter,
            "val_miou": e.ours.miou, "val_episodes": e.episodes,
        })
    };
    let eval_record = |iter: u64, e: &ShardEvaluation| {
        serde_json::json!({"event": "eval", "iter": iter, "miou": e.ours.miou, "fb_iou": e.ours.fb_iou,
            "baseline_miou": e.baseline.miou, "oracle_miou": e.oracle.miou, "episodes": e.episodes, "shot": e.shot})
    };
    if state.iter == 0 {
        let e = evaluate_on_shards(&mm, val_reader, &val, &novel_u32)?;
        log.write(&eval_record(0, &e))?;
        eprintln!(
            "untrained: mIoU {:.2} (baseline {:.2}, oracle {:.2}) on {} held-out 1-shot episodes",
            e.ours.miou, e.baseline.miou, e.oracle.miou, e.episodes
        );
    }

    let pb = train::progress_bar(args.iters, state.iter, "train-mm");
    let mut window = Instant::now();
    for it in state.iter..args.iters {
        // Episode n depends only on (seed, n): a resumed run sees what the uninterrupted one would.
        let eps = (0..args.batch as u64)
            .into_par_iter()
            .map(|j| train.episode(it * args.batch as u64 + j))
            .collect::<data::Result<Vec<_>>>()?;
        let batch = EpisodeBatch::new(&eps, &device)?;
        let out = batch.forward(&mm)?;
        let loss = stage2_loss(&out.two_channel()?, &batch.query_label, &out.cosine, &out.proposals, weights)?;
        let lr = sched.lr(it);
        let (total, gnorm) = super::optimizer_step(&loss.total, &vars, &mut opt, args.clip, lr, it, &store)?;
        state.iter = it + 1;
        pb.set_position(state.iter);
        pb.set_message(format!("loss {total:.3} lr {lr:.2e}"));
        if state.iter % args.log_every == 0 || state.iter == args.iters {
            let secs = window.elapsed().as_secs_f64() / args.log_every as f64;
            window = Instant::now();
            let mut rec = serde_json::json!({"event": "train", "iter": state.iter, "loss": total, "dice": loss.dice.to_scalar::<f32>()?,
                "lr": lr, "grad_norm": gnorm, "sec_per_iter": secs});
            if let Some(c) = &loss.co {
                rec["co"] = serde_json::json!(c.loss.to_scalar::<f32>()?);
            }
            log.write(&rec)?;
        }
        if state.iter % args.eval_every == 0 || state.iter == args.iters {
            let e = evaluate_on_shards(&mm, val_reader, &val, &novel_u32)?;
            log.write(&eval_record(state.iter, &e))?;
            pb.println(format!(
                "iter {}: mIoU {:.2} (baseline {:.2}, oracle {:.2}) on {} held-out episodes",
                state.iter, e.ours.miou, e.baseline.miou, e.oracle.miou, e.episodes
            ));
            if super::save_checkpoints(&store, &vm, &opt, &mut state, e.ours.miou)? {
                write_full_model(args, manifest, &frozen, &cfg, &varmap_tensors(&vm), provenance(&state, &e))?;
            }
        }
    }
    pb.finish();
    let full = args.out.join(MODEL_FILE);
    if !full.exists() {
        // A resumed run that was already finished: rebuild the full model from the best MM.
        let best = store.best(KIND)?.context("no best checkpoint")?;
        write_full_model(args, manifest, &frozen, &cfg, &best.model(&device)?, serde_json::json!({"iter": best.state.iter}))?;
    }
    eprintln!(
        "best val mIoU {:.2} at iteration {}; full model → {}",
        state.best_metric.unwrap_or(f64::NAN),
        state.best_iter.unwrap_or(0),
        full.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::cache::{cache_proposals, CacheArgs, Splits};
    use crate::pipeline::model::MmFormer;
    use crate::pipeline::stage1::{named_vars, new_pos_seeded};

    /// The whole stage boundary on a tiny synthetic dataset: shards from a (fresh) stage-1
    /// checkpoint, a resumed stage-2 run equal bit for bit to an uninterrupted one, a full
    /// checkpoint that loads and runs, and refusal of shards whose model does not match.
    #[test]
    fn shards_feed_stage_two_which_resumes_exactly_and_writes_a_full_model() {
        let lite0 = backbone::assets::efficientnet_lite0_path();
        if !lite0.exists() {
            eprintln!("note: skipping, {} not found (run `cargo xtask fetch-assets`)", lite0.display());
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-stage2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let device = Device::Cpu;
        let cfg = data::synthetic::SyntheticConfig { num_train: 48, num_val: 24, ..Default::default() };
        data::synthetic::generate(&cfg, &dir.join("data"), None).unwrap();

        let (vm, _) = new_pos_seeded(Preset::Cpu, 0, &device).unwrap();
        let opt = AdamW::new(named_vars(&vm), AdamWConfig::default(), train::default_no_decay).unwrap();
        let state = TrainState {
            format_version: 0,
            kind: "pos".into(),
            iter: 0,
            optimizer_step: 0,
            best_metric: None,
            best_iter: None,
            config: serde_json::json!({}),
            model_sha256: String::new(),
            optimizer_sha256: String::new(),
        };
        let pos_best = CheckpointStore::new(dir.join("pos"), 1).save_best(&varmap_tensors(&vm), &opt, state).unwrap();

        let cache = CacheArgs {
            data: dir.join("data"),
            fold: 0,
            preset: Preset::Cpu,
            backbone_weights: Some(lite0.clone()),
            pos_checkpoint: pos_best,
            out: dir.join("shards"),
            split: Splits::Both,
            views: 1,
            seed: 0,
            feature_dtype: "f16".into(),
            mask_dtype: "u8".into(),
            records_per_shard: 16,
            shard: None,
            batch: 8,
            dry_run: false,
        };
        cache_proposals(&cache).unwrap();
        let index = std::fs::read(dir.join("shards/train/index.bin")).unwrap();
        cache_proposals(&cache).unwrap(); // complete shards are skipped, the index is unchanged
        assert_eq!(std::fs::read(dir.join("shards/train/index.bin")).unwrap(), index);
        // Two workers (`--shard 0/2`, `--shard 1/2`) into another folder: the last one merges,
        // and the records are byte-identical to the single run's.
        for w in 0..2 {
            let part = CacheArgs {
                out: dir.join("shards2"),
                shard: Some(crate::pipeline::cache::WorkerSlice { index: w, count: 2 }),
                ..cache.clone()
            };
            cache_proposals(&part).unwrap();
        }
        let one = ShardReader::open(&dir.join("shards/train"), &ShardExpectation::default()).unwrap();
        let two = ShardReader::open(&dir.join("shards2/train"), &ShardExpectation::default()).unwrap();
        assert_eq!(one.len(), two.len());
        for i in 0..one.len() {
            assert_eq!(one.get_at(i).unwrap(), two.get_at(i).unwrap(), "record {i}");
        }

        let args = Stage2Args {
            shards: dir.join("shards"),
            batch: 2,
            iters: 4,
            lr: 1e-3,
            weight_decay: 0.05,
            clip: 0.01,
            shot: 1,
            seed: 0,
            out: dir.join("mm"),
            eval_every: 2,
            eval_episodes: 6,
            log_every: 1,
            no_self_alignment: false,
            no_cross_alignment: false,
            no_learnable_matching: false,
            no_co_loss: false,
        };
        train_mm(&args).unwrap();
        let last = dir.join("mm/checkpoints/iter_00000004/model.safetensors");
        let straight = std::fs::read(&last).unwrap();
        // A kill after iteration 2: the later checkpoint never made it to disk.
        std::fs::remove_dir_all(dir.join("mm/checkpoints/iter_00000004")).unwrap();
        train_mm(&args).unwrap();
        assert!(std::fs::read(&last).unwrap() == straight, "resumed run differs from the uninterrupted one");

        let model = MmFormer::load(&dir.join("mm").join(MODEL_FILE)).unwrap();
        assert_eq!(model.meta.preset, Preset::Cpu);
        let x = Tensor::zeros((1, 3, 256, 256), DType::F32, &device).unwrap();
        let label = Tensor::ones((1, 256, 256), DType::F32, &device).unwrap();
        let out = model.episode(&x, &[x.clone()], &[label]).unwrap();
        assert_eq!(out.out.dims(), &[1, 1, 256, 256]);

        // Shards whose manifest names another model are refused, naming the index.
        let mpath = dir.join("shards").join(crate::pipeline::cache::MANIFEST);
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        m["model_fingerprint"] = serde_json::json!("0000000000000000");
        std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
        let err = StageTwoData::open(&dir.join("shards")).err().unwrap().to_string();
        assert!(err.contains("index.bin") && err.contains("model weights"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `cargo xtask eval-shards`: a trained mask-matching module on cached test views (fast: no
/// backbone or POS). Used to measure what the shard precision does to the mIoU.
#[derive(Clone, Debug, clap::Args)]
pub struct EvalShardsArgs {
    /// Shard folder with `val/` (cache-proposals --split val).
    #[arg(long, default_value = "runs/shards")]
    pub shards: PathBuf,
    /// A train-mm checkpoint folder (e.g. runs/mm/checkpoints/best).
    #[arg(long, default_value = "runs/mm/checkpoints/best")]
    pub mm_checkpoint: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub episodes: usize,
    #[arg(long, default_value_t = 1)]
    pub shot: usize,
}

pub fn eval_shards(args: &EvalShardsArgs) -> Result<()> {
    let device = Device::Cpu;
    let d = StageTwoData::open(&args.shards)?;
    let val = d.val.as_ref().with_context(|| format!("{}: no val shards", args.shards.display()))?;
    let ck = CheckpointStore::open(&args.mm_checkpoint, KIND)?;
    let run: Stage2Args = serde_json::from_value({
        let mut c = ck.state.config.clone();
        c["out"] = serde_json::json!("");
        c["log_every"] = serde_json::json!(1);
        c
    })
    .with_context(|| format!("{}: unreadable run configuration", args.mm_checkpoint.display()))?;
    let cfg = run.mm_config(d.manifest.preset);
    let vm = VarMap::new();
    let mm = MaskMatching::new(&cfg, train::seeded_var_builder(&vm, 0, DType::F32, &device))?;
    super::stage1::load_into(&vm, &ck.model(&device)?, &ck.model_path())?;
    let ds = open_dataset(&d.manifest.dataset)?;
    let fold = d.manifest.fold;
    let novel: Vec<u32> = ds.novel_classes(fold)?.iter().map(|&c| c as u32).collect();
    let eps = TestEpisodes::generate(&ds, fold, args.shot, args.episodes, ds.default_test_seed(fold)?)?;
    let e = evaluate_on_shards(&mm, val, &eps, &novel)?;
    let spec = val.spec();
    println!(
        "{} ({:?} features, {:?} masks), {}-shot, {} episodes: mIoU {:.2}, FB-IoU {:.2}, baseline {:.2}, oracle {:.2}",
        args.shards.display(),
        spec.feature_dtype,
        spec.mask_dtype,
        args.shot,
        e.episodes,
        e.ours.miou,
        e.ours.fb_iou,
        e.baseline.miou,
        e.oracle.miou
    );
    Ok(())
}
