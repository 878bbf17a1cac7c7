//! `cargo xtask train-pos`: stage 1, the Potential Objects Segmenter on base classes (spec §2.3,
//! §4), with the official optimizer, schedule and clipping, checkpoints that resume exactly, the
//! oracle mIoU on validation episodes of the held-out classes, and a JSON-lines log.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use data::{AugmentConfig, FewShotDataset, TestEpisodes, TrainEpisodeSampler, VocOptions};
use losses::{Stage1Config, Stage1Criterion};
use rand_chacha::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};
use train::{AdamW, AdamWConfig, CheckpointStore, JsonlLog, NamedVar, PolyLr};

use super::{images_to_tensor, labels_to_tensor, load_backbone, oracle_mask, pos_features, upsampled_proposals, Preset};

pub const KIND: &str = "pos";

/// Everything that defines a stage-1 run (saved in every checkpoint; a resume must match it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, clap::Args)]
pub struct Stage1Args {
    /// Dataset root in the VOC layout (PASCAL VOC2012, or the synthetic dataset).
    #[arg(long, default_value = "data/synthetic")]
    pub data: PathBuf,
    /// Fold whose classes are held out (0..3).
    #[arg(long, default_value_t = 0)]
    pub fold: usize,
    #[arg(long, value_enum, default_value_t = Preset::Cpu)]
    pub preset: Preset,
    /// Backbone weight file (ResNet-50: torchvision .pth, official checkpoint or safetensors; default EfficientNet-Lite0 asset).
    #[arg(long)]
    pub backbone_weights: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 600)]
    pub iters: u64,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (official 0.01).
    #[arg(long, default_value_t = 0.01)]
    pub clip: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run folder: checkpoints, log.jsonl, metrics.
    #[arg(long, default_value = "runs/pos")]
    pub out: PathBuf,
    /// Iterations between checkpoints + oracle evaluations.
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Validation episodes per evaluation.
    #[arg(long, default_value_t = 200)]
    pub eval_episodes: usize,
    /// Log every N iterations.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
}

/// The dataset at `root`: COCO-20i when `root/annotations/instances_train{2014,2017}.json`
/// exists (standard COCO layout, interleaved folds), else the VOC layout (PASCAL-5i, the
/// synthetic dataset, users' data written like them).
pub fn open_dataset(root: &Path) -> Result<FewShotDataset> {
    for year in [2014, 2017] {
        if root.join("annotations").join(format!("instances_train{year}.json")).is_file() {
            let opts = data::CocoOptions::standard(root, year);
            return FewShotDataset::open_coco(&opts).with_context(|| format!("opening COCO {year} at {}", root.display()));
        }
    }
    open_voc_dataset(root)
}

/// A dataset in the VOC layout at `root` (PASCAL-5i, the synthetic dataset, users' data).
pub fn open_voc_dataset(root: &Path) -> Result<FewShotDataset> {
    if !root.is_dir() {
        bail!("dataset folder {} not found (make it with `cargo xtask make-synthetic`, or pass --data)", root.display());
    }
    FewShotDataset::open_voc(root, &VocOptions::default()).with_context(|| format!("opening dataset {}", root.display()))
}

/// Named trainable variables of a VarMap, sorted by name (a stable order for the optimizer).
pub fn named_vars(vm: &VarMap) -> Vec<NamedVar> {
    let data = vm.data().lock().expect("varmap lock");
    let mut v: Vec<NamedVar> = data.iter().map(|(n, v)| NamedVar { name: n.clone(), var: v.clone() }).collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

pub fn varmap_tensors(vm: &VarMap) -> std::collections::HashMap<String, Tensor> {
    vm.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
}

/// Loads tensors into an existing VarMap, requiring every variable to be present.
pub fn load_into(vm: &VarMap, tensors: &std::collections::HashMap<String, Tensor>, what: &Path) -> Result<()> {
    let data = vm.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let t = tensors.get(name).with_context(|| format!("{}: no tensor `{name}`", what.display()))?;
        if t.dims() != var.dims() {
            bail!("{}: `{name}` has shape {:?}, the model needs {:?}", what.display(), t.dims(), var.dims());
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(())
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

/// Oracle mIoU (%) of the proposals on `episodes` test episodes of the fold's held-out classes.
pub fn oracle_miou(
    ds: &FewShotDataset,
    fold: usize,
    episodes: &TestEpisodes,
    size: u32,
    backbone: &dyn backbone::Backbone,
    model: &pos::Pos,
) -> Result<f64> {
    let device = Device::Cpu;
    let classes: Vec<u32> = ds.novel_classes(fold)?.iter().map(|&c| c as u32).collect();
    let mut metrics = eval::FewShotMetrics::new(&classes);
    let chunk = 8;
    for start in (0..episodes.len()).step_by(chunk) {
        let eps = episodes.load_range(ds, start..(start + chunk).min(episodes.len()), size)?;
        // Test views share one size: one batched forward per chunk.
        let x = images_to_tensor(&eps.iter().map(|e| &e.query.image).collect::<Vec<_>>(), &device)?;
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

pub fn train_pos(args: &Stage1Args) -> Result<()> {
    let device = Device::Cpu;
    let ds = open_dataset(&args.data)?;
    let size = args.preset.input_size();
    let sampler = TrainEpisodeSampler::new(&ds, args.fold, 1, args.seed, AugmentConfig::with_crop_size(size))?;
    let backbone = load_backbone(args.preset, args.backbone_weights.as_deref())?;
    let (vm, model) = new_pos_seeded(args.preset, args.seed, &device)?;
    let vars = named_vars(&vm);
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig { lr: args.lr, weight_decay: args.weight_decay, ..Default::default() },
        train::default_no_decay,
    )?;
    let sched = PolyLr::new(args.lr, args.iters);
    let criterion = Stage1Criterion::new(Stage1Config { num_points: args.preset.num_points(), ..Default::default() });
    let test_seed = ds.default_test_seed(args.fold)?;
    let val = TestEpisodes::generate(&ds, args.fold, 1, args.eval_episodes, test_seed)?;

    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    crate::config_file::write_resolved(&args.out, args)?;
    let store = CheckpointStore::new(args.out.join("checkpoints"), 2);
    let config = super::run_config(args);
    let mut state = super::resume_or_start(&store, KIND, &config, &vm, &mut opt)?;
    let mut log = JsonlLog::append(&args.out.join("log.jsonl"))?;
    if state.iter == 0 {
        let miou = oracle_miou(&ds, args.fold, &val, size, backbone.as_ref(), &model)?;
        log.write(&serde_json::json!({"event": "eval", "iter": 0, "oracle_miou": miou, "episodes": val.len()}))?;
        eprintln!("untrained oracle mIoU on {} held-out episodes: {miou:.2}", val.len());
    }

    let pb = train::progress_bar(args.iters, state.iter, "train-pos");
    let mut window = Instant::now();
    for it in state.iter..args.iters {
        // Episode indices and loss points derive from (seed, iteration) alone, so a resumed run
        // sees exactly what the uninterrupted one would.
        let eps = (0..args.batch as u64)
            .map(|j| sampler.episode(it * args.batch as u64 + j))
            .collect::<data::Result<Vec<_>>>()?;
        let x = images_to_tensor(&eps.iter().map(|e| &e.query.image).collect::<Vec<_>>(), &device)?;
        let sem = labels_to_tensor(&eps.iter().map(|e| &e.query_semantic).collect::<Vec<_>>(), &device)?;
        let qlabel = labels_to_tensor(&eps.iter().map(|e| &e.query.label).collect::<Vec<_>>(), &device)?;
        let targets = (0..eps.len()).map(|b| losses::stage1_targets(&sem.get(b)?, &[])).collect::<candle_core::Result<Vec<_>>>()?;
        let feats = backbone.forward(&x)?;
        let out = model.forward(&pos_features(&feats))?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed ^ (it.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let losses = criterion.forward_with_rng(&out.all_predictions(), &targets, &qlabel, &mut rng)?;
        let lr = sched.lr(it);
        let (loss, gnorm) = super::optimizer_step(&losses.total, &vars, &mut opt, args.clip, lr, it, &store)?;
        state.iter = it + 1;
        pb.set_position(state.iter);
        pb.set_message(format!("loss {loss:.3} lr {lr:.2e}"));
        if state.iter % args.log_every == 0 || state.iter == args.iters {
            let secs = window.elapsed().as_secs_f64() / args.log_every as f64;
            window = Instant::now();
            let mut rec = serde_json::json!({"event": "train", "iter": state.iter, "loss": loss, "lr": lr, "grad_norm": gnorm, "sec_per_iter": secs});
            for (name, _raw, weighted) in losses.scalars()? {
                rec[name] = serde_json::json!(weighted);
            }
            log.write(&rec)?;
        }
        if state.iter % args.eval_every == 0 || state.iter == args.iters {
            let miou = oracle_miou(&ds, args.fold, &val, size, backbone.as_ref(), &model)?;
            log.write(&serde_json::json!({"event": "eval", "iter": state.iter, "oracle_miou": miou, "episodes": val.len()}))?;
            pb.println(format!("iter {}: oracle mIoU {miou:.2} on {} held-out episodes", state.iter, val.len()));
            super::save_checkpoints(&store, &vm, &opt, &mut state, miou)?;
        }
    }
    pb.finish();
    eprintln!(
        "best oracle mIoU {:.2} at iteration {} → {}",
        state.best_metric.unwrap_or(f64::NAN),
        state.best_iter.unwrap_or(0),
        store.dir().join("best").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run killed after a checkpoint and resumed ends bit for bit where an uninterrupted run
    /// ends; a resume with other flags is refused; the resolved configuration is written.
    #[test]
    fn train_pos_resumes_bit_for_bit_and_refuses_other_flags() {
        let lite0 = backbone::assets::efficientnet_lite0_path();
        if !lite0.exists() {
            eprintln!("note: skipping, {} not found (run `cargo xtask fetch-assets`)", lite0.display());
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-stage1-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = data::synthetic::SyntheticConfig { num_train: 40, num_val: 24, ..Default::default() };
        data::synthetic::generate(&cfg, &dir.join("data"), None).unwrap();
        let args = Stage1Args {
            data: dir.join("data"),
            fold: 0,
            preset: Preset::Cpu,
            backbone_weights: Some(lite0),
            batch: 2,
            iters: 4,
            lr: 4e-4,
            weight_decay: 0.05,
            clip: 0.01,
            seed: 3,
            out: dir.join("pos"),
            eval_every: 2,
            eval_episodes: 4,
            log_every: 1,
        };
        train_pos(&args).unwrap();
        let last = dir.join("pos/checkpoints/iter_00000004");
        let straight = std::fs::read(last.join("model.safetensors")).unwrap();
        let straight_opt = std::fs::read(last.join("optimizer.safetensors")).unwrap();
        std::fs::remove_dir_all(&last).unwrap();
        train_pos(&args).unwrap();
        assert!(std::fs::read(last.join("model.safetensors")).unwrap() == straight, "resumed weights differ");
        assert!(std::fs::read(last.join("optimizer.safetensors")).unwrap() == straight_opt, "resumed optimizer differs");
        let resolved: Stage1Args = serde_json::from_slice(&std::fs::read(dir.join("pos/config.json")).unwrap()).unwrap();
        assert_eq!(resolved, args);
        let other = Stage1Args { lr: 1e-4, ..args.clone() };
        let err = train_pos(&other).unwrap_err().to_string();
        assert!(err.contains("another configuration"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
