//! The stage boundary (`cargo xtask cache-proposals`). Runs the frozen backbone and the trained
//! POS once per image view and writes what stage 2 reads (features, proposals, labels) to
//! versioned shards (`data::shard`).
//!
//! Layout of `--out`:
//! - `train/`: K seeded augmented views of every image of the fold's train list;
//! - `val/`: the test view of every image of the fold's val list (test episodes);
//! - `manifest.json`: what made the shards (dataset, fold, preset, backbone file, stage-1
//!   checkpoint and their hashes), so `train-mm` can write a full checkpoint without being told
//!   again and can refuse shards that do not belong to the model.
//!
//! Work is split into shards of `--records-per-shard` views; `--shard i/n` takes every n-th
//! shard, complete shards are skipped (a killed run resumes), and the index is merged once every
//! shard of a split exists, whichever process wrote it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use backbone::Backbone;
use candle_core::{Device, Tensor};
use data::cached::{cached_test_view, cached_train_view};
use data::shard::{self, ProposalRecord, ShardIndex, ShardSpec, ShardView, ShardWriter, StoredDType};
use data::{AugmentConfig, Label, NormalizedImage, Split};
use eval::images_to_tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use train::{CheckpointStore, JsonlLog, Progress};

use crate::datasets::open_dataset;
use crate::error::{bail, Context, Result};
use crate::model::{backbone_file, load_backbone, mm_features, pos_features};
use crate::stage1::{load_pos, KIND as POS_KIND};
use crate::Preset;

pub const MANIFEST: &str = "manifest.json";

/// `--shard i/n`. Written as `"i/n"` in `config.json` (so the file feeds `--config` back);
/// the `{"index", "count"}` object earlier versions wrote is read too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerSlice {
    pub index: u32,
    pub count: u32,
}

impl std::fmt::Display for WorkerSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Serialize for WorkerSlice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WorkerSlice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Object { index: u32, count: u32 },
        }
        match Raw::deserialize(d)? {
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
            Raw::Object { index, count } => format!("{index}/{count}").parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for WorkerSlice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or_else(|| format!("`{s}`: expected i/n, e.g. 0/4"))?;
        let index: u32 = i.trim().parse().map_err(|_| format!("`{s}`: bad worker index"))?;
        let count: u32 = n.trim().parse().map_err(|_| format!("`{s}`: bad worker count"))?;
        if count == 0 || index >= count {
            return Err(format!("`{s}`: need 0 <= i < n"));
        }
        Ok(Self { index, count })
    }
}

/// Which splits to cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Splits {
    Train,
    Val,
    Both,
}

impl std::str::FromStr for Splits {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Splits::Train),
            "val" => Ok(Splits::Val),
            "both" => Ok(Splits::Both),
            _ => Err(format!("unknown split `{s}` (train, val or both)")),
        }
    }
}

impl std::fmt::Display for Splits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Splits::Train => "train",
            Splits::Val => "val",
            Splits::Both => "both",
        })
    }
}

/// Everything that defines a cache run; the field names are the options of `cargo xtask
/// cache-proposals` and the keys of its `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheOptions {
    /// Dataset root in the VOC layout (PASCAL VOC2012, or the synthetic dataset).
    pub data: PathBuf,
    pub fold: usize,
    pub preset: Preset,
    /// Backbone weight file (ResNet-50 required for the paper preset; default: the Lite0 asset).
    pub backbone_weights: Option<PathBuf>,
    /// Stage-1 checkpoint folder (e.g. runs/pos/checkpoints/best).
    pub pos_checkpoint: PathBuf,
    pub out: PathBuf,
    pub split: Splits,
    /// Augmented views cached per training image (stage 2 draws among them).
    pub views: u32,
    /// Seed of the cached augmentations.
    pub seed: u64,
    /// Feature precision: f32, f16 or bf16.
    pub feature_dtype: String,
    /// Proposal-mask precision: u8 (probability × 255) or f16.
    pub mask_dtype: String,
    pub records_per_shard: usize,
    /// This process's part of the work: `i/n` takes shards k ≡ i (mod n).
    pub shard: Option<WorkerSlice>,
    /// Images per forward pass.
    pub batch: usize,
    /// Print the disk estimate and stop.
    pub dry_run: bool,
}

impl CacheOptions {
    /// One view per image of both splits, f16 features, u8 masks, 64 records per shard, batch 8,
    /// seed 0, fold 0: what the demo, the GPU check and the stage-2 bench start from (each
    /// overriding what it needs).
    pub fn one_view(data: PathBuf, preset: Preset, backbone_weights: Option<PathBuf>, pos_checkpoint: PathBuf, out: PathBuf) -> Self {
        Self {
            data,
            fold: 0,
            preset,
            backbone_weights,
            pos_checkpoint,
            out,
            split: Splits::Both,
            views: 1,
            seed: 0,
            feature_dtype: "f16".into(),
            mask_dtype: "u8".into(),
            records_per_shard: 64,
            shard: None,
            batch: 8,
            dry_run: false,
        }
    }
}

/// What made a shard folder (written as `manifest.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheManifest {
    pub dataset: PathBuf,
    pub fold: usize,
    pub preset: Preset,
    pub backbone_file: PathBuf,
    pub backbone_sha256: String,
    pub pos_checkpoint: PathBuf,
    pub pos_model_sha256: String,
    pub model_fingerprint: String,
    pub views: u32,
    pub seed: u64,
}

impl CacheManifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: no shard manifest (run cache-proposals first)", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: malformed manifest", p.display()))
    }

    /// The backbone and POS tensors the shards were made with (official names), checked against
    /// the shards' model fingerprint, on `device`.
    pub fn frozen_tensors(&self, device: &Device) -> Result<std::collections::HashMap<String, Tensor>> {
        let ck = CheckpointStore::open(&self.pos_checkpoint, POS_KIND)
            .with_context(|| format!("{}: the stage-1 checkpoint the shards were made with is gone", self.pos_checkpoint.display()))?;
        let bsha = train::sha256_file(&self.backbone_file)?;
        if model_fingerprint(&bsha, &ck.state.model_sha256) != self.model_fingerprint {
            bail!(
                "{} / {}: these weights changed since the shards were cached; re-run cache-proposals",
                self.backbone_file.display(),
                self.pos_checkpoint.display()
            );
        }
        crate::model::assemble(self.preset, &self.backbone_file, &ck.model(device)?, &std::collections::HashMap::new(), device)
    }
}

/// One view to cache.
#[derive(Clone, Copy, Debug)]
struct Item {
    /// Index into the split's samples.
    sample: usize,
    view: ShardView,
}

/// The fingerprint shards carry for (backbone file, POS weights).
pub fn model_fingerprint(backbone_sha: &str, pos_sha: &str) -> String {
    shard::fingerprint([backbone_sha.as_bytes(), pos_sha.as_bytes()])
}

fn dtype(s: &str, what: &str, masks: bool) -> Result<StoredDType> {
    let d = StoredDType::parse(s).with_context(|| format!("--{what} `{s}`: expected f32, f16, bf16 or u8"))?;
    if !masks && d == StoredDType::U8Prob {
        bail!("--{what} u8 is for masks only; features take f32, f16 or bf16");
    }
    Ok(d)
}

/// What a cache run did, per split.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CacheSummary {
    /// Views to cache in all, bytes per view, bytes in all, free bytes at `out` when it started.
    pub views: usize,
    pub bytes_per_view: u64,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub splits: Vec<SplitSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SplitSummary {
    pub name: String,
    pub num_shards: u32,
    pub complete_shards: u32,
    /// Records and bytes of the merged index (None until every shard exists).
    pub merged: Option<(usize, u64)>,
}

/// Runs the frozen backbone and the trained POS once per view on `device` and writes the shards
/// under `args.out` (with `args.dry_run`, only the estimate). Notes (the estimate, skipped and
/// merged shards) go to `progress`.
pub fn cache_proposals(args: &CacheOptions, device: &Device, progress: &dyn Progress) -> Result<CacheSummary> {
    if args.batch == 0 || args.records_per_shard == 0 {
        bail!("batch and records_per_shard must be >= 1 (got {} and {})", args.batch, args.records_per_shard);
    }
    let ds = open_dataset(&args.data)?;
    let size = args.preset.input_size();
    let bfile = backbone_file(args.preset, args.backbone_weights.as_deref())?;
    let ck = CheckpointStore::open(&args.pos_checkpoint, POS_KIND)
        .with_context(|| format!("{}: not a stage-1 checkpoint (run train-pos first)", args.pos_checkpoint.display()))?;
    let backbone_sha = train::sha256_file(&bfile)?;
    let manifest = CacheManifest {
        dataset: args.data.clone(),
        fold: args.fold,
        preset: args.preset,
        backbone_file: bfile.clone(),
        backbone_sha256: backbone_sha.clone(),
        pos_checkpoint: args.pos_checkpoint.clone(),
        pos_model_sha256: ck.state.model_sha256.clone(),
        model_fingerprint: model_fingerprint(&backbone_sha, &ck.state.model_sha256),
        views: args.views,
        seed: args.seed,
    };
    if let Ok(old) = CacheManifest::read(&args.out) {
        if old != manifest {
            bail!(
                "{}: these shards were made by another model or recipe ({} views, seed {}, POS {}); use a new --out",
                args.out.join(MANIFEST).display(),
                old.views,
                old.seed,
                old.pos_checkpoint.display()
            );
        }
    }
    let feature_dtype = dtype(&args.feature_dtype, "feature-dtype", false)?;
    let mask_dtype = dtype(&args.mask_dtype, "mask-dtype", true)?;
    let backbone = load_backbone(args.preset, Some(&bfile), device)?;
    let pos = load_pos(args.preset, &ck, device)?;

    let aug = AugmentConfig::with_crop_size(size);
    let mut plans = Vec::new();
    if matches!(args.split, Splits::Train | Splits::Both) {
        let list = ds.fold_list(Split::Train, args.fold)?;
        let items: Vec<Item> = list
            .images
            .iter()
            .flat_map(|&sample| (0..args.views).map(move |k| Item { sample, view: ShardView::Augmented(k) }))
            .collect();
        if items.is_empty() {
            bail!("--views 0 with the train split: nothing to cache");
        }
        plans.push(("train", Split::Train, items));
    }
    if matches!(args.split, Splits::Val | Splits::Both) {
        let list = ds.fold_list(Split::Val, args.fold)?;
        plans.push(("val", Split::Val, list.images.iter().map(|&sample| Item { sample, view: ShardView::Test }).collect()));
    }

    let c = backbone.channels();
    let n = args.preset.pos_config().num_queries;
    let s = size as usize;
    let feature_shapes = vec![vec![c[3], s / 32, s / 32], vec![c[2], s / 16, s / 16], vec![c[1], s / 8, s / 8]];
    let spec_for = |split: &str| ShardSpec {
        model_fingerprint: manifest.model_fingerprint.clone(),
        preprocess_fingerprint: shard::fingerprint([
            split.as_bytes(),
            size.to_string().as_bytes(),
            format!("{aug:?}").as_bytes(),
            args.seed.to_string().as_bytes(),
            ds.name().as_bytes(),
        ]),
        backbone: args.preset.backbone_name().into(),
        feature_names: vec!["res5".into(), "res4".into(), "res3".into()],
        feature_dtype,
        mask_dtype,
        num_queries: n,
    };
    let per_record = shard::record_bytes(&spec_for("train"), &feature_shapes, &[n, s / 4, s / 4], (s, s));
    let total: u64 = plans.iter().map(|p| p.2.len() as u64 * per_record).sum();
    let worker = args.shard.unwrap_or(WorkerSlice { index: 0, count: 1 });
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let free = fs4::available_space(&args.out).with_context(|| format!("cannot query free space of {}", args.out.display()))?;
    let mine = total / worker.count as u64;
    let views = plans.iter().map(|p| p.2.len()).sum::<usize>();
    let mut summary = CacheSummary { views, bytes_per_view: per_record, total_bytes: total, free_bytes: free, splits: Vec::new() };
    progress.note(&format!(
        "cache-proposals: {} views ({}), {:.1} KB each, {:.2} GB in all{}; {:.2} GB free at {}",
        plans.iter().map(|p| p.2.len()).sum::<usize>(),
        plans.iter().map(|p| format!("{} {}", p.2.len(), p.0)).collect::<Vec<_>>().join(", "),
        per_record as f64 / 1e3,
        total as f64 / 1e9,
        if worker.count > 1 { format!(" ({:.2} GB for worker {}/{})", mine as f64 / 1e9, worker.index, worker.count) } else { String::new() },
        free as f64 / 1e9,
        args.out.display()
    ));
    if args.dry_run {
        return Ok(summary);
    }
    check_disk(&args.out, mine, free)?;
    std::fs::write(args.out.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?)?;
    crate::write_config(&args.out, args)?;
    let mut log = JsonlLog::append(&args.out.join("log.jsonl"))?;

    for (name, split, items) in &plans {
        let dir = args.out.join(name);
        let spec = spec_for(name);
        let rps = args.records_per_shard;
        let num_shards = items.len().div_ceil(rps) as u32;
        let mine = shard::shards_for_worker(num_shards, worker.index, worker.count);
        let todo: Vec<u32> = mine.iter().copied().filter(|&k| !shard::shard_is_complete(&dir, k, &spec)).collect();
        let todo_records: usize = todo.iter().map(|&k| (items.len() - k as usize * rps).min(rps)).sum();
        if todo.len() < mine.len() {
            progress.note(&format!("{name}: {} of {} shards already complete, skipped", mine.len() - todo.len(), mine.len()));
        }
        progress.start(&format!("cache {name}"), todo_records as u64, 0);
        let mut done = 0u64;
        let samples = ds.samples(*split);
        let t0 = Instant::now();
        for k in todo {
            let chunk = &items[k as usize * rps..((k as usize + 1) * rps).min(items.len())];
            let mut w = ShardWriter::new(&dir, k, spec.clone())?;
            for batch in chunk.chunks(args.batch) {
                let views = batch
                    .par_iter()
                    .map(|it| {
                        let rec = &samples[it.sample];
                        match it.view {
                            ShardView::Test => cached_test_view(rec, size),
                            ShardView::Augmented(v) => cached_train_view(rec, it.sample, v, &aug, args.seed),
                        }
                    })
                    .collect::<data::Result<Vec<(NormalizedImage, Label)>>>()?;
                for r in forward_records(backbone.as_ref(), &pos, batch, &views, samples, device)? {
                    w.push(&r)?;
                }
                done += batch.len() as u64;
                progress.advance(done, name);
            }
            let count = w.finish()?;
            log.write(&serde_json::json!({"event": "shard", "split": name, "shard": k, "records": count, "elapsed_s": t0.elapsed().as_secs_f64()}))?;
        }
        progress.finish();
        let complete = (0..num_shards).filter(|&k| shard::shard_is_complete(&dir, k, &spec)).count() as u32;
        let mut split = SplitSummary { name: name.to_string(), num_shards, complete_shards: complete, merged: None };
        if complete == num_shards {
            let index = ShardIndex::merge(&dir)?;
            let bytes: u64 = index.shards.iter().map(|s| s.1).sum();
            progress.note(&format!("{name}: {} records in {} shards, {:.2} GB → {}", index.records.len(), num_shards, bytes as f64 / 1e9, dir.display()));
            log.write(&serde_json::json!({"event": "merged", "split": name, "records": index.records.len(), "bytes": bytes}))?;
            split.merged = Some((index.records.len(), bytes));
        } else {
            progress.note(&format!(
                "{name}: {complete} of {num_shards} shards complete; the index is merged by whichever worker finishes last (or rerun any worker)"
            ));
        }
        summary.splits.push(split);
    }
    Ok(summary)
}

/// Refuses to start when the shards would not fit on the disk.
pub fn check_disk(dir: &Path, needed: u64, free: u64) -> Result<()> {
    if needed > free {
        bail!(
            "{}: needs {:.2} GB but only {:.2} GB are free; free space, use --feature-dtype f16/bf16, fewer --views, or split the work with --shard i/n across disks",
            dir.display(),
            needed as f64 / 1e9,
            free as f64 / 1e9
        );
    }
    Ok(())
}

/// Backbone + POS on a batch of views → shard records.
fn forward_records(
    backbone: &dyn Backbone,
    pos: &pos::Pos,
    items: &[Item],
    views: &[(NormalizedImage, Label)],
    samples: &[data::SampleRecord],
    device: &Device,
) -> Result<Vec<ProposalRecord>> {
    let x = images_to_tensor(&views.iter().map(|v| &v.0).collect::<Vec<_>>(), device)?;
    let f = backbone.forward(&x)?;
    let probs = candle_nn::ops::sigmoid(&pos.forward_proposals(&pos_features(&f))?)?;
    let feats = mm_features(&f);
    let flat = |t: &Tensor, b: usize| -> Result<(Vec<usize>, Vec<f32>)> {
        let t = t.get(b)?;
        Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
    };
    items
        .iter()
        .zip(views)
        .enumerate()
        .map(|(b, (it, (img, lab)))| {
            Ok(ProposalRecord {
                image_id: samples[it.sample].id.clone(),
                view: it.view,
                input_hw: (img.height, img.width),
                features: feats.iter().map(|t| flat(t, b)).collect::<Result<Vec<_>>>()?,
                proposals: flat(&probs, b)?,
                label: lab.data().to_vec(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_slices_parse_and_bad_ones_are_refused() {
        assert_eq!("1/4".parse::<WorkerSlice>().unwrap(), WorkerSlice { index: 1, count: 4 });
        // config.json: written as text, the earlier object form still read, bad ones refused.
        let w = WorkerSlice { index: 1, count: 4 };
        assert_eq!(serde_json::to_value(w).unwrap(), serde_json::json!("1/4"));
        assert_eq!(serde_json::from_value::<WorkerSlice>(serde_json::json!("1/4")).unwrap(), w);
        assert_eq!(serde_json::from_value::<WorkerSlice>(serde_json::json!({"index": 1, "count": 4})).unwrap(), w);
        assert!(serde_json::from_value::<WorkerSlice>(serde_json::json!({"index": 4, "count": 4})).is_err());
        for bad in ["4/4", "1", "a/2", "0/0"] {
            assert!(bad.parse::<WorkerSlice>().is_err(), "{bad}");
        }
    }

    #[test]
    fn too_little_disk_is_refused_naming_the_folder_and_sizes() {
        check_disk(Path::new("runs/x"), 10, 10).unwrap();
        let err = check_disk(Path::new("runs/x"), 145_000_000_000, 2_000_000_000).unwrap_err().to_string();
        assert!(err.contains("runs/x") && err.contains("145.00 GB") && err.contains("2.00 GB"), "{err}");
    }

    #[test]
    fn the_paper_preset_estimate_matches_the_readme() {
        // res5/res4/res3 of ResNet-50 at 480² in f16, 100 proposals at 120² in u8, the label.
        let spec = ShardSpec {
            model_fingerprint: String::new(),
            preprocess_fingerprint: String::new(),
            backbone: "resnet50".into(),
            feature_names: vec!["res5".into(), "res4".into(), "res3".into()],
            feature_dtype: StoredDType::F16,
            mask_dtype: StoredDType::U8Prob,
            num_queries: 100,
        };
        let shapes = vec![vec![2048, 15, 15], vec![1024, 30, 30], vec![512, 60, 60]];
        let bytes = shard::record_bytes(&spec, &shapes, &[100, 120, 120], (480, 480));
        assert!((8.0e6..8.2e6).contains(&(bytes as f64)), "{bytes}");
    }
}
