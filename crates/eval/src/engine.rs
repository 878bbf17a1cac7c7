//! Few-shot evaluation of a whole model ([`FewShotModel`]: backbone + POS + mask matching, e.g.
//! `mmformer::MmFormer`) on fixed test episodes per fold and seed, 1- and 5-shot, the heuristic baseline / ours / the oracle
//! side by side under two label protocols, a JSON report, a Markdown table and PNG overlays.
//!
//! # Episodes and seeds
//! Per fold, [`TestEpisodes::generate`] draws `episodes` episodes with the fold's official seed
//! (`ds.default_test_seed(fold)`, spec §4.5). With `seeds = n > 1` the figures are the mean ±
//! sample standard deviation over `n` episode sets: the official seed, then the n − 1 seeds of
//! [`seed_sequence`] derived from it. 1-shot and 5-shot episodes of one seed share queries and
//! first supports (5 supports are always drawn, spec §5.3).
//!
//! `--fold all` ([`FoldSel::All`]) evaluates the union of every fold's episodes (each fold with
//! its own seed; `episodes` per fold) as one benchmark. Folds whose val list has no usable
//! episode (e.g. the 9 real VOC photos have no class of PASCAL fold 3) are skipped and listed
//! in `skipped_folds`; no usable fold at all is an error. This is the sensible choice for a
//! model trained on other classes (the VOC photos against a synthetic-data model: every class
//! is novel to it).
//!
//! # Methods (spec §5.4, Table 3 of the paper)
//! - **ours**: the matching's `out`, foreground ⇔ `out > 0.5` (argmax of `[1 − out, out]`);
//! - **baseline**: the single proposal whose prototype has the highest cosine similarity with
//!   the support prototype (argmax of [`mm::MmOutput::cosine`]), thresholded `≥ 0.5`;
//! - **oracle**: the proposal with the best soft IoU against the protocol's ground truth (255 →
//!   0, the official `get_iou`), thresholded `≥ 0.5` (as [`crate::oracle_mask`]). An upper bound
//!   of every single-proposal choice *in soft IoU*, per episode; the thresholded mIoU of the
//!   oracle is usually, but not provably, above the baseline's.
//!
//! # Protocols
//! - `official`: labels resized to the model input (`size` × `size`, torch-nearest, exactly
//!   what [`TestEpisodes::load`] gives); predictions bilinearly resized (align_corners=True) to
//!   the label size, a no-op here, then thresholded.
//! - `original`: labels at original resolution ([`data::SampleRecord::load`]); `out` and the
//!   proposal probabilities (already at the input size) are bilinearly resized
//!   (align_corners=True) to the original size, then thresholded; the oracle is chosen at that
//!   size too.
//!
//! Pixels labelled 255 are excluded from the counts. mIoU accumulates intersections and unions
//! per class over episodes, then averages over every novel class of the evaluated folds, a class
//! without episodes counting 0: the official rule ([`MIOU_RULE`]), the one checkpoint selection
//! uses too. Classes without episodes are listed in `classes_without_episodes`, and the mean over
//! the classes that have episodes is reported apart, labelled (`miou_present_classes`); the two
//! agree whenever every novel class is drawn, as always with 1000 PASCAL/COCO episodes. FB-IoU
//! accumulates over all episodes.
//!
//! # Output files (under `opts.out`)
//! - `report.json`: [`EvalReport`]; all figures are percentages.
//! - `report.md`: the summary table (baseline / ours / oracle per shot and protocol), per-class
//!   IoU tables and the overlay list.
//! - `overlays/<K>shot_<j>_<class>_<query>.png`: sampled episodes of the first seed at original
//!   resolution: supports with their masks (blue), query, baseline (yellow), ours (red), oracle
//!   (cyan), ground truth (green); 255 pixels in white.
//! - `episodes.jsonl`: one line per evaluated episode (ids, chosen proposals, soft IoUs and
//!   the foreground IoU of each method under each protocol).
//! - `log.jsonl`: progress lines (`{"event": "progress", ...}`) and a final `{"event": "done"}`.
//!
//! # Speed
//! Backbone + POS run once per image (query or support alike: at one input size the features
//! are the same), in small batches, and are memoised per image id in an LRU bounded in bytes
//! ([`EvalTuning::cache_bytes`], default 2 GiB); the oracle's soft IoUs are memoised per
//! (query, class); an episode identical to an earlier one (same query, class and supports) is
//! not matched twice; the matching runs on batches of episodes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use data::{ClassId, FewShotDataset, Label, NormalizedImage, SampleRecord, SeededRng, Split, TestEpisodes, IGNORE};
use mm::QueryPass;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use train::Progress;

use crate::tensors::{images_to_tensor, labels_to_tensor};
use crate::error::{bail, Context};
use crate::{EpisodeIou, FewShotMetrics, FewShotModel, MethodOverSeeds, MethodScores, Result, SeedStats, SummaryRow};

/// Tag of [`EvalReport`]'s format (`report.json`'s `format`). 2: the official mIoU rule.
pub const REPORT_FORMAT: &str = "mmformer-eval-report/2";

/// How every mIoU of a report (and of checkpoint selection) is averaged.
pub const MIOU_RULE: &str =
    "official: mean over every novel class of the evaluated folds, a class without episodes counting 0 (FewShotSemSegEvaluator)";

/// Which folds to evaluate: one, or the union of all (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldSel {
    One(usize),
    All,
}

impl FoldSel {
    /// The fold numbers this selection means for `ds`; an out-of-range fold is an error.
    pub fn folds(&self, ds: &FewShotDataset) -> Result<Vec<usize>> {
        match *self {
            FoldSel::All => Ok((0..ds.num_folds()).collect()),
            FoldSel::One(f) if f < ds.num_folds() => Ok(vec![f]),
            FoldSel::One(f) => bail!(
                "unknown fold {f}: dataset `{}` has folds 0..{} (or use `all`)",
                ds.name(),
                ds.num_folds().saturating_sub(1)
            ),
        }
    }
}

impl fmt::Display for FoldSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FoldSel::One(n) => write!(f, "{n}"),
            FoldSel::All => f.write_str("all"),
        }
    }
}

impl FromStr for FoldSel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.eq_ignore_ascii_case("all") {
            return Ok(FoldSel::All);
        }
        s.parse::<usize>().map(FoldSel::One).map_err(|_| format!("fold must be a number (0, 1, 2, 3) or `all`, got {s:?}"))
    }
}

/// Serialised as the fold number, or the string `"all"`.
impl Serialize for FoldSel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            FoldSel::One(n) => s.serialize_u64(*n as u64),
            FoldSel::All => s.serialize_str("all"),
        }
    }
}

impl<'de> Deserialize<'de> for FoldSel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(FoldSel::One(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub fold: FoldSel,
    /// Shot counts, e.g. `[1, 5]`.
    pub shots: Vec<usize>,
    /// Episodes per fold and seed (the paper: 1000).
    pub episodes: usize,
    /// Number of episode sets: the official seed, then derived ones ([`seed_sequence`]).
    pub seeds: usize,
    /// Model input side (the model's preset: 480 paper, 256 cpu).
    pub size: u32,
    /// Overlay PNGs per shot (sampled evenly over the first seed's episodes).
    pub overlays: usize,
    /// Report folder.
    pub out: PathBuf,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            fold: FoldSel::One(0),
            shots: vec![1, 5],
            episodes: data::DEFAULT_TEST_EPISODES,
            seeds: 1,
            size: 256,
            overlays: 8,
            out: PathBuf::from("runs/eval"),
        }
    }
}

/// How to run it (results do not depend on these).
#[derive(Clone, Debug)]
pub struct EvalTuning {
    /// Byte budget of the per-image memo of backbone features and proposals.
    pub cache_bytes: u64,
    /// Images per backbone + POS call.
    pub image_batch: usize,
    /// Episodes per matching call.
    pub episode_batch: usize,
}

impl Default for EvalTuning {
    fn default() -> Self {
        Self { cache_bytes: 2 << 30, image_batch: 4, episode_batch: 4 }
    }
}

/// Seeds of `n` episode sets: `official` first, then draws of `SeededRng::from_seed(official)`
/// reduced modulo 10⁸ (8-digit numbers like the official ones), skipping repeats.
pub fn seed_sequence(official: u64, n: usize) -> Vec<u64> {
    let mut rng = SeededRng::from_seed(official);
    let mut seeds = vec![official];
    while seeds.len() < n {
        let s = rng.next_u64() % 100_000_000;
        if !seeds.contains(&s) {
            seeds.push(s);
        }
    }
    seeds.truncate(n.max(1));
    seeds
}

/// Test episode sets this many derived seeds deep are kept apart from validation.
const TEST_SEEDS_RESERVED: usize = 64;

/// The seed of the validation episodes that select checkpoints during training: drawn from a
/// stream of its own and never one of the first [`TEST_SEEDS_RESERVED`] seeds of
/// [`seed_sequence`]`(test_seed, ..)`, so the episodes a model was selected on are not the test
/// episodes it is reported on (`--seeds` up to that many).
pub fn validation_seed(test_seed: u64) -> u64 {
    let test = seed_sequence(test_seed, TEST_SEEDS_RESERVED);
    let mut rng = SeededRng::from_seed(test_seed ^ 0x5E1E_C7_0A_5EED);
    loop {
        let s = rng.next_u64() % 100_000_000;
        if !test.contains(&s) {
            return s;
        }
    }
}

/// The seeds one fold used.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FoldSeeds {
    pub fold: usize,
    /// Seed `k` generated episode set `k`.
    pub seeds: Vec<u64>,
}

/// A fold left out of `--fold all`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SkippedFold {
    pub fold: usize,
    pub reason: String,
}

/// One class's row (IoU %, mean over seeds).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassRow {
    pub class_id: u32,
    pub name: String,
    /// Episodes of the class, summed over seeds.
    pub episodes: usize,
    pub baseline: f64,
    pub ours: f64,
    pub ours_std: Option<f64>,
    pub oracle: f64,
}

/// One seed's full summaries.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SeedResult {
    /// Index into each fold's `seeds`.
    pub seed_index: usize,
    /// The seed of each evaluated fold, in `EvalReport::folds` order.
    pub seeds: Vec<u64>,
    pub scores: MethodScores,
}

/// One protocol's figures (percentages; mean over seeds, `_std` = sample std, `None` for one
/// seed).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProtocolResult {
    /// `official` or `original`.
    pub protocol: String,
    pub miou: f64,
    pub miou_std: Option<f64>,
    pub fb_iou: f64,
    pub fb_iou_std: Option<f64>,
    pub baseline_miou: f64,
    pub baseline_miou_std: Option<f64>,
    pub baseline_fb_iou: f64,
    pub oracle_miou: f64,
    pub oracle_miou_std: Option<f64>,
    pub oracle_fb_iou: f64,
    /// Ours, averaged over the classes that have episodes only (not the official rule; equal to
    /// `miou` when every novel class was drawn). Mean over seeds.
    pub miou_present_classes: f64,
    /// Per-class IoU of the three methods, ascending class id.
    pub per_class: Vec<ClassRow>,
    /// The full aggregation of each method over seeds.
    pub ours: MethodOverSeeds,
    pub baseline: MethodOverSeeds,
    pub oracle: MethodOverSeeds,
    /// Each seed's own summaries.
    pub per_seed: Vec<SeedResult>,
}

/// One shot count. The top-level `miou`, `fb_iou`, `baseline_miou`, `oracle_miou` (and their
/// `_std`) repeat the `official` protocol's.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShotResult {
    pub shot: usize,
    /// Episodes per seed (summed over the evaluated folds).
    pub episodes: usize,
    /// Number of seeds.
    pub seeds: usize,
    pub miou: f64,
    pub miou_std: Option<f64>,
    pub fb_iou: f64,
    pub fb_iou_std: Option<f64>,
    pub baseline_miou: f64,
    pub baseline_miou_std: Option<f64>,
    pub oracle_miou: f64,
    pub oracle_miou_std: Option<f64>,
    /// Novel classes of the evaluated folds that no episode of some seed drew (they count 0 in
    /// that seed's mIoU; `miou_present_classes` leaves them out).
    pub classes_without_episodes: Vec<u32>,
    pub official: ProtocolResult,
    pub original: ProtocolResult,
}

/// One overlay PNG.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OverlayRecord {
    /// Relative to the report folder.
    pub file: String,
    pub shot: usize,
    pub fold: usize,
    pub episode: usize,
    pub class_id: u32,
    pub class: String,
    pub query: String,
    pub supports: Vec<String>,
    /// Foreground IoU (%) of this episode, original protocol.
    pub baseline_iou: f64,
    pub ours_iou: f64,
    pub oracle_iou: f64,
}

/// Work counters (how much the memoisation saved).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalStats {
    /// Backbone + POS passes (one per image unless evicted).
    pub images_encoded: usize,
    pub image_cache_hits: usize,
    pub image_cache_evictions: usize,
    /// Episodes matched (the overlays' episodes are matched once more to draw them).
    pub episodes_matched: usize,
    /// Episodes answered by an identical earlier one.
    pub episodes_memoised: usize,
    /// Seconds spent decoding images, in backbone + POS, in the matching, and scoring.
    pub decode_seconds: f64,
    pub encode_seconds: f64,
    pub match_seconds: f64,
    pub score_seconds: f64,
}

/// `report.json`. Figures are percentages. Read the headline numbers with
/// [`EvalReport::shot`]: `report.shot(1)?.miou` (official protocol), or in JSON
/// `shots["1shot"].miou` / `shots["1shot"].original.miou`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    /// [`REPORT_FORMAT`].
    pub format: String,
    /// The caller's name for it (e.g. `synthetic`, `voc-photos`, `pascal-5i`).
    pub benchmark: String,
    /// The dataset's own name.
    pub dataset: String,
    /// How the mIoU figures average over classes ([`MIOU_RULE`]).
    pub miou_rule: String,
    pub checkpoint: String,
    /// The model's preset (`cpu`, `paper`).
    pub preset: String,
    pub fold: FoldSel,
    /// Folds evaluated.
    pub folds: Vec<usize>,
    pub skipped_folds: Vec<SkippedFold>,
    /// Model input side.
    pub input_size: u32,
    /// Requested episodes per fold and seed.
    pub episodes_per_fold: usize,
    /// Seeds per evaluated fold.
    pub seeds: Vec<FoldSeeds>,
    /// Keyed `"1shot"`, `"5shot"`, ….
    pub shots: BTreeMap<String, ShotResult>,
    pub overlays: Vec<OverlayRecord>,
    pub stats: EvalStats,
    /// Wall-clock seconds of the whole evaluation.
    pub seconds: f64,
}

impl EvalReport {
    /// The result for `shot` supports.
    pub fn shot(&self, shot: usize) -> Option<&ShotResult> {
        self.shots.get(&shot_key(shot))
    }

    /// The summary table (one row per shot and protocol).
    pub fn summary_rows(&self) -> Vec<SummaryRow> {
        let mut rows = Vec::new();
        for r in self.shots.values() {
            for p in [&r.official, &r.original] {
                rows.push(SummaryRow {
                    benchmark: self.benchmark.clone(),
                    fold: self.fold.to_string(),
                    shot: r.shot,
                    protocol: p.protocol.clone(),
                    episodes: r.episodes,
                    seeds: r.seeds,
                    baseline: p.baseline.miou.clone(),
                    ours: p.ours.miou.clone(),
                    oracle: p.oracle.miou.clone(),
                    ours_fb_iou: p.ours.fb_iou.clone(),
                });
            }
        }
        rows
    }

    /// `report.md`: the summary table, per-class tables and the overlay list.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# Few-shot evaluation: {} (fold {}, {}² inputs)\n\nCheckpoint `{}` ({} preset), dataset `{}`, {} episodes per fold and seed, {} s.\n\n",
            self.benchmark,
            self.fold,
            self.input_size,
            self.checkpoint,
            self.preset,
            self.dataset,
            self.episodes_per_fold,
            fmt_secs(self.seconds)
        );
        s.push_str(&crate::markdown_summary(&self.summary_rows()));
        s.push_str(
            "\nbaseline: the proposal with the highest cosine similarity to the support prototype; oracle: the proposal with the best IoU against the ground truth (an upper bound). `official`: labels resized to the input size; `original`: original-resolution labels.\n",
        );
        s.push_str(&format!("\nmIoU rule: {}.\n", self.miou_rule));
        for r in self.shots.values().filter(|r| !r.classes_without_episodes.is_empty()) {
            s.push_str(&format!(
                "\n{}-shot: {} novel class(es) without episodes ({:?}) count 0; over the classes with episodes only (not the official rule) ours is {:.1}.\n",
                r.shot,
                r.classes_without_episodes.len(),
                r.classes_without_episodes,
                r.official.miou_present_classes
            ));
        }
        if !self.skipped_folds.is_empty() {
            s.push_str("\nSkipped folds: ");
            s.push_str(&self.skipped_folds.iter().map(|f| format!("{} ({})", f.fold, f.reason)).collect::<Vec<_>>().join("; "));
            s.push('\n');
        }
        for r in self.shots.values() {
            s.push_str(&format!("\n## {}-shot, per class (official protocol, IoU %)\n\n| class | episodes | baseline | **ours** | oracle |\n|---|---|---|---|---|\n", r.shot));
            for c in &r.official.per_class {
                let ours = SeedStats { mean: c.ours, std: c.ours_std, values: Vec::new() };
                s.push_str(&format!(
                    "| {} ({}) | {} | {:.1} | **{}** | {:.1} |\n",
                    c.name,
                    c.class_id,
                    c.episodes,
                    c.baseline,
                    ours.display(1),
                    c.oracle
                ));
            }
        }
        if !self.overlays.is_empty() {
            s.push_str("\n## Overlays\n\nPanels: supports with their masks (blue), query, baseline (yellow), ours (red), oracle (cyan), ground truth (green); IoU % at original resolution.\n\n| file | class | query | baseline | ours | oracle |\n|---|---|---|---|---|---|\n");
            for o in &self.overlays {
                s.push_str(&format!(
                    "| [{}]({}) | {} | {} | {:.1} | {:.1} | {:.1} |\n",
                    o.file, o.file, o.class, o.query, o.baseline_iou, o.ours_iou, o.oracle_iou
                ));
            }
        }
        s
    }
}

fn fmt_secs(s: f64) -> String {
    format!("{s:.1}")
}

/// `"1shot"`, `"5shot"`.
pub fn shot_key(shot: usize) -> String {
    format!("{shot}shot")
}

/// Evaluates `model` on `ds` with the default [`EvalTuning`]; writes `report.json`,
/// `report.md`, `episodes.jsonl`, `log.jsonl` and the overlays under `opts.out`.
pub fn evaluate(model: &dyn FewShotModel, ds: &FewShotDataset, benchmark_name: &str, opts: &EvalOptions, progress: &dyn Progress) -> Result<EvalReport> {
    evaluate_with(model, ds, benchmark_name, opts, &EvalTuning::default(), progress)
}

/// [`evaluate`] with explicit tuning.
pub fn evaluate_with(
    model: &dyn FewShotModel,
    ds: &FewShotDataset,
    benchmark_name: &str,
    opts: &EvalOptions,
    tuning: &EvalTuning,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    let started = Instant::now();
    if opts.shots.is_empty() || opts.shots.contains(&0) {
        bail!("shots must be a non-empty list of positive numbers, got {:?}", opts.shots);
    }
    if opts.episodes == 0 || opts.seeds == 0 {
        bail!("episodes and seeds must be >= 1 (got {} and {})", opts.episodes, opts.seeds);
    }
    if opts.size < 32 {
        bail!("input size {} is below 32", opts.size);
    }
    let mut shots = opts.shots.clone();
    shots.sort_unstable();
    shots.dedup();
    let folds = opts.fold.folds(ds)?;

    // The folds that have usable episodes, and their seeds.
    let mut seeds: Vec<FoldSeeds> = Vec::new();
    let mut skipped = Vec::new();
    let mut used_folds = Vec::new();
    for &fold in &folds {
        let base = ds.default_test_seed(fold)?;
        let fs = seed_sequence(base, opts.seeds);
        match TestEpisodes::generate(ds, fold, shots[0], opts.episodes, fs[0]) {
            Ok(_) => {
                used_folds.push(fold);
                seeds.push(FoldSeeds { fold, seeds: fs });
            }
            Err(e @ data::DataError::Empty { .. }) if opts.fold == FoldSel::All => {
                skipped.push(SkippedFold { fold, reason: e.to_string() })
            }
            Err(e) => return Err(e).context(format!("cannot draw test episodes for fold {fold} of dataset `{}`", ds.name())),
        }
    }
    if used_folds.is_empty() {
        bail!(
            "dataset `{}`: no fold has a usable test episode ({})",
            ds.name(),
            skipped.iter().map(|s| format!("fold {}: {}", s.fold, s.reason)).collect::<Vec<_>>().join("; ")
        );
    }

    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create report folder {}", opts.out.display()))?;
    let overlay_dir = opts.out.join("overlays");
    if opts.overlays > 0 {
        std::fs::create_dir_all(&overlay_dir).with_context(|| format!("cannot create {}", overlay_dir.display()))?;
    }
    // Overlays of an earlier run in this folder would be mistaken for this one's.
    if let Ok(dir) = std::fs::read_dir(&overlay_dir) {
        for f in dir.flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if name.ends_with(".png") && name.contains("shot_") {
                std::fs::remove_file(f.path()).with_context(|| format!("cannot remove the old overlay {}", f.path().display()))?;
            }
        }
    }
    let mut log = train::JsonlLog::append(&opts.out.join("log.jsonl"))?;
    let episodes_path = opts.out.join("episodes.jsonl");
    let mut episodes_file = std::io::BufWriter::new(
        std::fs::File::create(&episodes_path).with_context(|| format!("cannot write {}", episodes_path.display()))?,
    );

    // Every (shot, seed) episode list up front: the memo plans its evictions from them.
    let mut tasks: Vec<Task> = Vec::new();
    for &shot in &shots {
        for k in 0..opts.seeds {
            // The union of the folds' episodes under seed k.
            let mut items: Vec<EpisodeItem> = Vec::new();
            let mut seed_k = Vec::new();
            for fs in &seeds {
                let eps = TestEpisodes::generate(ds, fs.fold, shot, opts.episodes, fs.seeds[k])
                    .with_context(|| format!("drawing episodes of fold {} (seed {})", fs.fold, fs.seeds[k]))?;
                seed_k.push(fs.seeds[k]);
                for (i, e) in eps.episodes.iter().enumerate() {
                    items.push(EpisodeItem {
                        fold: fs.fold,
                        seed: fs.seeds[k],
                        index: i,
                        query: e.query.clone(),
                        class_id: e.class_id,
                        supports: e.supports[..shot].to_vec(),
                    });
                }
            }
            let order = image_local_order(ds, &items);
            tasks.push(Task { shot, k, items, seeds: seed_k, order });
        }
    }
    let mut engine = Engine::new(model, ds, opts.size, tuning);
    engine.plan = UsePlan::new(tasks.iter().flat_map(|t| t.order.iter().map(move |&i| &t.items[i])));
    let total: u64 = tasks.iter().map(|t| t.items.len() as u64).sum();
    progress.start("eval", total, 0);
    let mut done = 0u64;
    let mut per_shot: BTreeMap<usize, ShotAcc> = BTreeMap::new();
    let mut overlays = Vec::new();

    for task in &tasks {
        let (shot, k, items) = (task.shot, task.k, &task.items);
        let acc = per_shot.entry(shot).or_default();
        acc.episodes = items.len();
        acc.seed_lists.push(task.seeds.clone());
        let present: BTreeSet<u32> = items.iter().map(|e| e.class_id as u32).collect();
        for &f in &used_folds {
            for &c in ds.novel_classes(f)? {
                if !present.contains(&(c as u32)) {
                    acc.missing.insert(c as u32);
                }
            }
        }
        // The official rule: every novel class of the evaluated folds, drawn or not.
        let classes: Vec<u32> =
            used_folds.iter().map(|&f| ds.novel_classes(f)).collect::<data::Result<Vec<_>>>()?.concat().iter().map(|&c| c as u32).collect();
        let mut metrics: [[FewShotMetrics; 3]; 2] = std::array::from_fn(|_| std::array::from_fn(|_| FewShotMetrics::new(&classes)));
        let stage = format!("{shot}-shot, seed {}/{}", k + 1, opts.seeds);

        // Episodes run in the image-local order (the sums do not depend on it) ...
        let mut outcomes: Vec<Option<Outcome>> = (0..items.len()).map(|_| None).collect();
        for chunk in task.order.chunks(tuning.episode_batch.max(1) * 4) {
            let batch: Vec<&EpisodeItem> = chunk.iter().map(|&i| &items[i]).collect();
            let ts: Vec<u64> = (0..chunk.len() as u64).map(|j| done + 1 + j).collect();
            let outs = engine.run(&batch, Some(&ts), false)?;
            for (&i, (o, _)) in chunk.iter().zip(outs) {
                for p in 0..2 {
                    for m in 0..3 {
                        metrics[p][m].add_counts(items[i].class_id as u32, &o.counts[p][m])?;
                    }
                }
                outcomes[i] = Some(o);
            }
            let before = done;
            done += chunk.len() as u64;
            progress.advance(done, &stage);
            if done / 100 != before / 100 || done == total {
                log.write(&serde_json::json!({
                    "event": "progress", "shot": shot, "seed_index": k, "done": done, "total": total,
                    "elapsed_s": started.elapsed().as_secs_f64(), "stats": engine.stats,
                }))?;
            }
        }
        // ... and are written in their own order.
        for (item, o) in items.iter().zip(&outcomes) {
            serde_json::to_writer(&mut episodes_file, &episode_record(ds, shot, k, item, o.as_ref().expect("every episode ran")))?;
            episodes_file.write_all(b"\n")?;
        }
        acc.per_seed.push(std::array::from_fn(|p| std::array::from_fn(|m| MetricsSummaryOf(metrics[p][m].summary()))));

        if k == 0 && opts.overlays > 0 {
            let n = opts.overlays.min(items.len());
            for j in 0..n {
                overlays.push(engine.overlay(shot, j, &items[j * items.len() / n], &overlay_dir)?);
            }
        }
    }
    progress.finish();
    episodes_file.flush().with_context(|| format!("cannot write {}", episodes_path.display()))?;

    let mut results = BTreeMap::new();
    for (shot, acc) in per_shot {
        let official = protocol_result(ds, "official", &acc.per_seed, &acc.seed_lists, 0);
        let original = protocol_result(ds, "original", &acc.per_seed, &acc.seed_lists, 1);
        results.insert(
            shot_key(shot),
            ShotResult {
                shot,
                episodes: acc.episodes,
                seeds: opts.seeds,
                miou: official.miou,
                miou_std: official.miou_std,
                fb_iou: official.fb_iou,
                fb_iou_std: official.fb_iou_std,
                baseline_miou: official.baseline_miou,
                baseline_miou_std: official.baseline_miou_std,
                oracle_miou: official.oracle_miou,
                oracle_miou_std: official.oracle_miou_std,
                classes_without_episodes: acc.missing.into_iter().collect(),
                official,
                original,
            },
        );
    }

    let report = EvalReport {
        format: REPORT_FORMAT.into(),
        benchmark: benchmark_name.into(),
        dataset: ds.name().into(),
        miou_rule: MIOU_RULE.into(),
        checkpoint: model.checkpoint(),
        preset: model.preset(),
        fold: opts.fold,
        folds: used_folds,
        skipped_folds: skipped,
        input_size: opts.size,
        episodes_per_fold: opts.episodes,
        seeds,
        shots: results,
        overlays,
        stats: engine.stats.clone(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let json_path = opts.out.join("report.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", json_path.display()))?;
    let md_path = opts.out.join("report.md");
    std::fs::write(&md_path, report.markdown()).with_context(|| format!("cannot write {}", md_path.display()))?;
    log.write(&serde_json::json!({"event": "done", "seconds": report.seconds, "stats": report.stats, "report": json_path}))?;
    Ok(report)
}

/// A wrapper so arrays of summaries can be built with `from_fn`.
struct MetricsSummaryOf(crate::MetricsSummary);

/// One (shot, seed) episode list and the order it runs in.
struct Task {
    shot: usize,
    /// Seed index.
    k: usize,
    items: Vec<EpisodeItem>,
    /// The seed of each evaluated fold.
    seeds: Vec<u64>,
    /// Indices into `items`, image-local (see [`image_local_order`]).
    order: Vec<usize>,
}

/// What one shot count gathers over its seeds.
#[derive(Default)]
struct ShotAcc {
    /// `[protocol][method]` summaries per seed.
    per_seed: Vec<[[MetricsSummaryOf; 3]; 2]>,
    seed_lists: Vec<Vec<u64>>,
    missing: BTreeSet<u32>,
    episodes: usize,
}

/// Episodes sorted by the sorted val indices of their images: episodes sharing images run
/// close together, so that a small memo serves them (with the farthest-next-use eviction this
/// cuts the backbone passes of 1000 random 5-shot PASCAL episodes under a 1/3-of-the-images
/// memo about 2.5× compared with LRU in the original order).
fn image_local_order(ds: &FewShotDataset, items: &[EpisodeItem]) -> Vec<usize> {
    let keys: Vec<Vec<usize>> = items
        .iter()
        .map(|e| {
            let mut v: Vec<usize> = e.images().map(|id| ds.find(Split::Val, id).unwrap_or(usize::MAX)).collect();
            v.sort_unstable();
            v
        })
        .collect();
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| keys[a].cmp(&keys[b]).then(a.cmp(&b)));
    order
}

/// Methods in `Outcome::counts` order.
const METHODS: [&str; 3] = ["baseline", "ours", "oracle"];
const PROTOCOL_NAMES: [&str; 2] = ["official", "original"];

fn protocol_result(
    ds: &FewShotDataset,
    protocol: &str,
    per_seed: &[[[MetricsSummaryOf; 3]; 2]],
    seed_lists: &[Vec<u64>],
    p: usize,
) -> ProtocolResult {
    let agg = |m: usize| MethodOverSeeds::from_seeds(&per_seed.iter().map(|s| s[p][m].0.clone()).collect::<Vec<_>>());
    let (baseline, ours, oracle) = (agg(0), agg(1), agg(2));
    let find = |m: &MethodOverSeeds, c: u32| m.per_class.iter().find(|r| r.class_id == c).map_or(f64::NAN, |r| r.iou.mean);
    let per_class = ours
        .per_class
        .iter()
        .map(|r| ClassRow {
            class_id: r.class_id,
            name: ds.class_name(r.class_id as ClassId).map(str::to_string).unwrap_or_default(),
            episodes: r.episodes,
            baseline: find(&baseline, r.class_id),
            ours: r.iou.mean,
            ours_std: r.iou.std,
            oracle: find(&oracle, r.class_id),
        })
        .collect();
    ProtocolResult {
        protocol: protocol.into(),
        miou: ours.miou.mean,
        miou_std: ours.miou.std,
        fb_iou: ours.fb_iou.mean,
        fb_iou_std: ours.fb_iou.std,
        baseline_miou: baseline.miou.mean,
        baseline_miou_std: baseline.miou.std,
        baseline_fb_iou: baseline.fb_iou.mean,
        oracle_miou: oracle.miou.mean,
        oracle_miou_std: oracle.miou.std,
        oracle_fb_iou: oracle.fb_iou.mean,
        miou_present_classes: {
            let present = |s: &crate::MetricsSummary| {
                let v: Vec<f64> = s.per_class.iter().filter(|c| c.2 > 0).map(|c| c.1).collect();
                v.iter().sum::<f64>() / v.len().max(1) as f64
            };
            per_seed.iter().map(|s| present(&s[p][1].0)).sum::<f64>() / per_seed.len().max(1) as f64
        },
        per_class,
        per_seed: per_seed
            .iter()
            .enumerate()
            .map(|(k, s)| SeedResult {
                seed_index: k,
                seeds: seed_lists[k].clone(),
                scores: MethodScores { baseline: s[p][0].0.clone(), ours: s[p][1].0.clone(), oracle: s[p][2].0.clone() },
            })
            .collect(),
        baseline,
        ours,
        oracle,
    }
}

fn episode_record(ds: &FewShotDataset, shot: usize, seed_index: usize, e: &EpisodeItem, o: &Outcome) -> serde_json::Value {
    let iou = |p: usize| -> serde_json::Value {
        METHODS.iter().enumerate().map(|(m, name)| (name.to_string(), serde_json::json!(100.0 * o.counts[p][m].fg_iou()))).collect::<serde_json::Map<_, _>>().into()
    };
    serde_json::json!({
        "shot": shot, "seed_index": seed_index, "seed": e.seed, "fold": e.fold, "episode": e.index,
        "query": e.query, "class_id": e.class_id, "class": ds.class_name(e.class_id).unwrap_or(""),
        "supports": e.supports,
        "baseline_proposal": o.baseline_proposal,
        "oracle_proposal": {"official": o.oracle_proposal[0], "original": o.oracle_proposal[1]},
        "soft_iou": {
            "baseline": {"official": o.baseline_soft_iou[0], "original": o.baseline_soft_iou[1]},
            "oracle": {"official": o.oracle_soft_iou[0], "original": o.oracle_soft_iou[1]},
        },
        "iou": {PROTOCOL_NAMES[0]: iou(0), PROTOCOL_NAMES[1]: iou(1)},
    })
}

/// One episode to evaluate (val-split ids; `supports` already cut to the shot).
#[derive(Clone, Debug)]
struct EpisodeItem {
    fold: usize,
    seed: u64,
    index: usize,
    query: String,
    class_id: ClassId,
    supports: Vec<String>,
}

impl EpisodeItem {
    fn key(&self) -> (String, ClassId, Vec<String>) {
        (self.query.clone(), self.class_id, self.supports.clone())
    }

    /// The query, then the supports.
    fn images(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.query.as_str()).chain(self.supports.iter().map(String::as_str))
    }
}

/// What one episode gives.
#[derive(Clone, Debug)]
struct Outcome {
    /// `[protocol: official, original][method: baseline, ours, oracle]`.
    counts: [[EpisodeIou; 3]; 2],
    baseline_proposal: usize,
    /// Per protocol.
    oracle_proposal: [usize; 2],
    baseline_soft_iou: [f32; 2],
    oracle_soft_iou: [f32; 2],
}

/// The original-protocol masks of one episode, for an overlay.
struct Masks {
    /// [baseline, ours, oracle], at the original size.
    methods: [Vec<u8>; 3],
}

/// One image's memoised model pass.
struct ImageEntry {
    /// Backbone features `[res5, res4, res3]` (1, C, h, w) and POS logits (1, N, S/4, S/4).
    pass: QueryPass,
    /// Label values at the input size (torch-nearest), and at original resolution.
    view_label: Label,
    orig_label: Label,
    bytes: u64,
}

/// When each image will be needed again: the sequence numbers (1, 2, … in run order over all
/// (shot, seed) lists) of the episodes that use it. An episode identical to an earlier one is
/// answered from the episode memo, so it is left out.
#[derive(Default)]
struct UsePlan {
    uses: HashMap<String, Vec<u64>>,
    cursor: HashMap<String, usize>,
}

impl UsePlan {
    fn new<'e>(run_order: impl Iterator<Item = &'e EpisodeItem>) -> Self {
        let mut plan = Self::default();
        let mut seen = std::collections::HashSet::new();
        for (t, e) in run_order.enumerate() {
            if seen.insert(e.key()) {
                for id in e.images() {
                    plan.uses.entry(id.to_string()).or_default().push(t as u64 + 1);
                }
            }
        }
        plan
    }

    /// The first planned use of `id` after episode `t` (`u64::MAX`: never).
    fn next_after(&mut self, id: &str, t: u64) -> u64 {
        let Some(v) = self.uses.get(id) else { return u64::MAX };
        let c = self.cursor.entry(id.to_string()).or_insert(0);
        while *c < v.len() && v[*c] <= t {
            *c += 1;
        }
        v.get(*c).copied().unwrap_or(u64::MAX)
    }
}

/// Image entries bounded in bytes. Over budget, the entry needed farthest in the future goes
/// first (Belady's optimal policy: every episode list is known in advance), the least recently
/// used first among equals (e.g. entries never needed again, or unplanned runs).
struct ImageCache {
    map: HashMap<String, CacheSlot>,
    tick: u64,
    bytes: u64,
    budget: u64,
}

struct CacheSlot {
    entry: Arc<ImageEntry>,
    next_use: u64,
    last_use: u64,
}

impl ImageCache {
    fn new(budget: u64) -> Self {
        Self { map: HashMap::new(), tick: 0, bytes: 0, budget }
    }

    /// The entry of `id`; `next_use` (if planned) becomes its eviction priority.
    fn get(&mut self, id: &str, next_use: Option<u64>) -> Option<Arc<ImageEntry>> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(id).map(|slot| {
            slot.last_use = t;
            if let Some(n) = next_use {
                slot.next_use = n;
            }
            slot.entry.clone()
        })
    }

    /// Inserts, then evicts while over budget (possibly the new entry itself, when it is
    /// needed last); returns how many were evicted. The caller's `Arc`s keep evicted entries
    /// alive for the episodes at hand.
    fn insert(&mut self, id: String, entry: Arc<ImageEntry>, next_use: Option<u64>) -> usize {
        self.tick += 1;
        self.bytes += entry.bytes;
        let slot = CacheSlot { entry, next_use: next_use.unwrap_or(u64::MAX), last_use: self.tick };
        if let Some(old) = self.map.insert(id, slot) {
            self.bytes -= old.entry.bytes;
        }
        let mut evicted = 0;
        while self.bytes > self.budget && !self.map.is_empty() {
            let victim = self
                .map
                .iter()
                .max_by_key(|(_, s)| (s.next_use, std::cmp::Reverse(s.last_use)))
                .map(|(k, _)| k.clone())
                .expect("non-empty");
            let old = self.map.remove(&victim).expect("present");
            self.bytes -= old.entry.bytes;
            evicted += 1;
        }
        evicted
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

struct Engine<'a> {
    model: &'a dyn FewShotModel,
    ds: &'a FewShotDataset,
    size: u32,
    tuning: EvalTuning,
    cache: ImageCache,
    plan: UsePlan,
    /// Soft IoU of every proposal per (query, class), per protocol.
    oracle_memo: HashMap<(String, ClassId, usize), Arc<Vec<f32>>>,
    episode_memo: HashMap<(String, ClassId, Vec<String>), Outcome>,
    stats: EvalStats,
}

impl<'a> Engine<'a> {
    fn new(model: &'a dyn FewShotModel, ds: &'a FewShotDataset, size: u32, tuning: &EvalTuning) -> Self {
        Self {
            model,
            ds,
            size,
            tuning: tuning.clone(),
            cache: ImageCache::new(tuning.cache_bytes),
            plan: UsePlan::default(),
            oracle_memo: HashMap::new(),
            episode_memo: HashMap::new(),
            stats: EvalStats::default(),
        }
    }

    fn record(&self, id: &str) -> Result<&'a SampleRecord> {
        let ds: &'a FewShotDataset = self.ds;
        let i = ds.find(Split::Val, id).with_context(|| format!("sample {id:?} is not in the val split of `{}`", ds.name()))?;
        Ok(&ds.samples(Split::Val)[i])
    }

    /// The entries of `ids`, running backbone + POS (batched) on the ones not memoised. `t`:
    /// the sequence number of the last episode at hand (None: an unplanned run).
    fn images(&mut self, ids: &[&str], t: Option<u64>) -> Result<HashMap<String, Arc<ImageEntry>>> {
        let mut out = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        for &id in ids {
            if out.contains_key(id) || missing.contains(&id) {
                continue;
            }
            let next = t.map(|t| self.plan.next_after(id, t));
            match self.cache.get(id, next) {
                Some(e) => {
                    self.stats.image_cache_hits += 1;
                    out.insert(id.to_string(), e);
                }
                None => missing.push(id),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let size = self.size;
        let t0 = Instant::now();
        let recs = missing.iter().map(|id| self.record(id)).collect::<Result<Vec<_>>>()?;
        // Decoding and resizing in parallel (no tensor kernels involved).
        let loaded: Vec<(NormalizedImage, Label, Label)> = recs
            .par_iter()
            .map(|rec| -> Result<_> {
                let (img, lab) = rec.load().with_context(|| format!("loading {}", rec.describe()))?;
                let (vimg, vlab) = data::test_view(&img, &lab, size);
                Ok((NormalizedImage::from_rgb(&vimg), vlab, lab))
            })
            .collect::<Result<_>>()?;
        self.stats.decode_seconds += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let device = self.model.device().clone();
        let mut loaded = loaded.into_iter();
        for group in missing.chunks(self.tuning.image_batch.max(1)) {
            let items: Vec<(NormalizedImage, Label, Label)> = loaded.by_ref().take(group.len()).collect();
            let x = images_to_tensor(&items.iter().map(|i| &i.0).collect::<Vec<_>>(), &device)?;
            let pass = self.model.encode(&x).context("backbone + POS")?;
            self.stats.images_encoded += group.len();
            for (b, (id, (_, view_label, orig_label))) in group.iter().zip(items).enumerate() {
                // Own copies, so that evicting one image frees its memory.
                let one = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, b, 1)?.copy()?) };
                let features = [one(&pass.features[0])?, one(&pass.features[1])?, one(&pass.features[2])?];
                let proposal_logits = one(&pass.proposal_logits)?;
                let bytes = features.iter().map(tensor_bytes).sum::<u64>()
                    + tensor_bytes(&proposal_logits)
                    + view_label.data().len() as u64
                    + orig_label.data().len() as u64;
                let e = Arc::new(ImageEntry { pass: QueryPass { features, proposal_logits }, view_label, orig_label, bytes });
                let next = t.map(|t| self.plan.next_after(id, t));
                self.stats.image_cache_evictions += self.cache.insert(id.to_string(), e.clone(), next);
                out.insert(id.to_string(), e);
            }
        }
        self.stats.encode_seconds += t0.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Outcomes of `items` (all of one shot), with the masks when `keep_masks` (then nothing
    /// is taken from the episode memo). `ts`: the items' sequence numbers in the plan (None:
    /// unplanned, e.g. the overlays).
    fn run(&mut self, items: &[&EpisodeItem], ts: Option<&[u64]>, keep_masks: bool) -> Result<Vec<(Outcome, Option<Masks>)>> {
        let mut results: Vec<Option<(Outcome, Option<Masks>)>> = (0..items.len()).map(|_| None).collect();
        let mut todo = Vec::new();
        let mut repeats = Vec::new();
        let mut first: HashMap<(String, ClassId, Vec<String>), usize> = HashMap::new();
        for (i, it) in items.iter().enumerate() {
            let key = it.key();
            if !keep_masks {
                if let Some(o) = self.episode_memo.get(&key) {
                    self.stats.episodes_memoised += 1;
                    results[i] = Some((o.clone(), None));
                    continue;
                }
                if let Some(&j) = first.get(&key) {
                    self.stats.episodes_memoised += 1;
                    repeats.push((i, j));
                    continue;
                }
                first.insert(key, i);
            }
            todo.push(i);
        }
        for group in todo.chunks(self.tuning.episode_batch.max(1)) {
            let batch: Vec<&EpisodeItem> = group.iter().map(|&i| items[i]).collect();
            let t = ts.map(|ts| group.iter().map(|&i| ts[i]).max().expect("non-empty group"));
            let outs = self.match_batch(&batch, t, keep_masks)?;
            for (&i, o) in group.iter().zip(outs) {
                self.episode_memo.entry(items[i].key()).or_insert_with(|| o.0.clone());
                results[i] = Some(o);
            }
        }
        for (i, j) in repeats {
            let o = results[j].as_ref().expect("first occurrence computed").0.clone();
            results[i] = Some((o, None));
        }
        Ok(results.into_iter().map(|r| r.expect("every episode computed")).collect())
    }

    fn match_batch(&mut self, batch: &[&EpisodeItem], t: Option<u64>, keep_masks: bool) -> Result<Vec<(Outcome, Option<Masks>)>> {
        let shot = batch[0].supports.len();
        let ids: Vec<&str> = batch.iter().flat_map(|e| e.images()).collect();
        let entries = self.images(&ids, t)?;
        let s = self.size as usize;
        let t0 = Instant::now();
        // Stacks one tensor of each of `ids` (one image per episode) along the batch.
        let stack = |ids: &[&str], level: Option<usize>| -> Result<Tensor> {
            let ts: Vec<&Tensor> = ids
                .iter()
                .map(|id| {
                    let x = &entries[*id].pass;
                    match level {
                        Some(l) => &x.features[l],
                        None => &x.proposal_logits,
                    }
                })
                .collect();
            Ok(Tensor::cat(&ts, 0)?)
        };
        let q: Vec<&str> = batch.iter().map(|e| e.query.as_str()).collect();
        let query = QueryPass {
            features: [stack(&q, Some(0))?, stack(&q, Some(1))?, stack(&q, Some(2))?],
            proposal_logits: stack(&q, None)?,
        };
        let mut support_feats = Vec::with_capacity(shot);
        let mut support_labels = Vec::with_capacity(shot);
        for k in 0..shot {
            let sk: Vec<&str> = batch.iter().map(|e| e.supports[k].as_str()).collect();
            support_feats.push([stack(&sk, Some(0))?, stack(&sk, Some(1))?, stack(&sk, Some(2))?]);
            let labels = batch
                .iter()
                .map(|e| {
                    let rec = self.record(&e.supports[k])?;
                    Ok(entries[&e.supports[k]].view_label.binary_for(rec.value_of(e.class_id).unwrap_or(IGNORE)))
                })
                .collect::<Result<Vec<Label>>>()?;
            support_labels.push(labels_to_tensor(&labels.iter().collect::<Vec<_>>(), self.model.device())?);
        }
        let out = self.model.matching(&query, &support_feats, &support_labels, (s, s)).context("mask matching")?;
        self.stats.episodes_matched += batch.len();
        self.stats.match_seconds += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let proposals = out.proposals()?;
        let mut results = Vec::with_capacity(batch.len());
        for (b, e) in batch.iter().enumerate() {
            let entry = entries[&e.query].clone();
            let value = self.record(&e.query)?.value_of(e.class_id).unwrap_or(IGNORE);
            let r = self.score(
                e,
                &entry,
                value,
                &out.out.narrow(0, b, 1)?,
                &out.cosine.get(b)?,
                &proposals.get(b)?,
                keep_masks,
            )?;
            results.push(r);
        }
        self.stats.score_seconds += t0.elapsed().as_secs_f64();
        Ok(results)
    }

    /// Scores one episode under both protocols. `out`: (1, 1, S, S); `cosine`: (N,);
    /// `probs`: (N, S, S) proposal probabilities at the input size.
    #[allow(clippy::too_many_arguments)]
    fn score(
        &mut self,
        e: &EpisodeItem,
        entry: &ImageEntry,
        value: u8,
        out: &Tensor,
        cosine: &Tensor,
        probs: &Tensor,
        keep_masks: bool,
    ) -> Result<(Outcome, Option<Masks>)> {
        let cos = cosine.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let baseline = argmax(&cos);
        let labels = [entry.view_label.binary_for(value), entry.orig_label.binary_for(value)];
        let mut counts = [[EpisodeIou::default(); 3]; 2];
        let mut oracle_proposal = [0; 2];
        let mut baseline_soft = [0f32; 2];
        let mut oracle_soft = [0f32; 2];
        let mut masks = None;
        for (p, label) in labels.iter().enumerate() {
            let hw = (label.height() as usize, label.width() as usize);
            let key = (e.query.clone(), e.class_id, p);
            let soft = match self.oracle_memo.get(&key) {
                Some(v) => v.clone(),
                None => {
                    let v = Arc::new(soft_iou_resized(probs, label, hw)?);
                    self.oracle_memo.insert(key, v.clone());
                    v
                }
            };
            let oracle = argmax(&soft);
            oracle_proposal[p] = oracle;
            baseline_soft[p] = soft[baseline];
            oracle_soft[p] = soft[oracle];
            let ours_mask = threshold(&resize_ac(out, hw)?, 0.5, false)?;
            let base_mask = threshold(&resize_ac(&probs.get(baseline)?.unsqueeze(0)?.unsqueeze(0)?, hw)?, 0.5, true)?;
            let oracle_mask = threshold(&resize_ac(&probs.get(oracle)?.unsqueeze(0)?.unsqueeze(0)?, hw)?, 0.5, true)?;
            for (m, mask) in [&base_mask, &ours_mask, &oracle_mask].into_iter().enumerate() {
                counts[p][m] = EpisodeIou::compute(mask, label.data());
            }
            if keep_masks && p == 1 {
                masks = Some(Masks { methods: [base_mask, ours_mask, oracle_mask] });
            }
        }
        Ok((Outcome { counts, baseline_proposal: baseline, oracle_proposal, baseline_soft_iou: baseline_soft, oracle_soft_iou: oracle_soft }, masks))
    }

    /// Draws one episode (original protocol) to `dir`.
    fn overlay(&mut self, shot: usize, j: usize, item: &EpisodeItem, dir: &Path) -> Result<OverlayRecord> {
        let (o, masks) = self.run(&[item], None, true)?.pop().expect("one episode");
        let masks = masks.expect("masks requested");
        let load = |id: &str| -> Result<(image::RgbImage, Vec<u8>)> {
            let rec = self.record(id)?;
            let (img, lab) = rec.load().with_context(|| format!("loading {}", rec.describe()))?;
            Ok((img, lab.binary_for(rec.value_of(item.class_id).unwrap_or(IGNORE)).into_data()))
        };
        let (qimg, gt) = load(&item.query)?;
        let supports = item.supports.iter().map(|s| load(s)).collect::<Result<Vec<_>>>()?;
        let preds: Vec<(&str, &[u8], [u8; 3])> = vec![
            ("baseline", &masks.methods[0], BASELINE_COLOR),
            ("ours", &masks.methods[1], crate::PREDICTION_COLOR),
            ("oracle", &masks.methods[2], ORACLE_COLOR),
        ];
        let img = crate::episode_overlay_methods(&supports, &qimg, &preds, &gt, 192);
        let class = self.ds.class_name(item.class_id).unwrap_or("class").to_string();
        let file = format!("overlays/{shot}shot_{j:02}_{}_{}.png", sanitize(&class), sanitize(&item.query));
        let path = dir.parent().unwrap_or(dir).join(&file);
        img.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(OverlayRecord {
            file,
            shot,
            fold: item.fold,
            episode: item.index,
            class_id: item.class_id as u32,
            class,
            query: item.query.clone(),
            supports: item.supports.clone(),
            baseline_iou: 100.0 * o.counts[1][0].fg_iou(),
            ours_iou: 100.0 * o.counts[1][1].fg_iou(),
            oracle_iou: 100.0 * o.counts[1][2].fg_iou(),
        })
    }
}

/// Overlay tint of the baseline (yellow) and of the oracle (cyan); ours is red, the ground
/// truth green, the supports' masks blue.
const BASELINE_COLOR: [u8; 3] = [255, 220, 0];
const ORACLE_COLOR: [u8; 3] = [0, 230, 230];

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect()
}

/// Index of the largest value (the first on ties; NaN never wins).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Bilinear resize with align_corners=True of a (B, C, h, w) map to `hw` (no-op when equal).
pub fn resize_ac(x: &Tensor, hw: (usize, usize)) -> candle_core::Result<Tensor> {
    Ok(ops::resize::resize_bilinear(x, hw, true)?)
}

/// Row-major 0/1 mask of a (…, H, W) map: `> t` (ours: argmax of `[1 − out, out]`) or `≥ t`
/// (single proposals, as `super::binary`).
pub fn threshold(x: &Tensor, t: f64, inclusive: bool) -> Result<Vec<u8>> {
    let m = if inclusive { x.ge(t)? } else { x.gt(t)? };
    Ok(m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?)
}

/// Soft IoU (`Σpt / (Σt + Σp − Σpt + 1e-7)`, label 255 → 0) of each of the (N, S, S)
/// proposals after a bilinear align_corners=True resize to the label's `hw`, without
/// materialising the N resized maps: with the resize `P ↦ Wh·P·Wwᵀ`,
/// `Σ (Wh P Wwᵀ) ⊙ T = Σ P ⊙ (Whᵀ T Ww)` and `Σ Wh P Wwᵀ = Σ P ⊙ (Whᵀ1)(Wwᵀ1)ᵀ`.
/// The interpolation matrices are read off `resize_bilinear` applied to the identity, so they
/// are exactly the ones the per-map resize uses.
pub fn soft_iou_resized(probs: &Tensor, label: &Label, hw: (usize, usize)) -> Result<Vec<f32>> {
    let (n, s_h, s_w) = probs.dims3()?;
    let (h, w) = hw;
    if label.data().len() != h * w {
        bail!("soft_iou_resized: label {}x{} does not match {h}x{w}", label.width(), label.height());
    }
    let dev = probs.device();
    let probs = probs.to_dtype(DType::F32)?;
    let t: Vec<f32> = label.data().iter().map(|&v| f32::from(v == 1)).collect();
    let sum_t: f64 = t.iter().map(|&v| v as f64).sum();
    let t = Tensor::from_vec(t, (h, w), dev)?;
    // Wh: (h, S_h), rows of the identity resized; Wwᵀ: (S_w, w).
    let wh = resize_ac(&Tensor::eye(s_h, DType::F32, dev)?.reshape((1, 1, s_h, s_h))?, (h, s_h))?.reshape((h, s_h))?;
    let wwt = resize_ac(&Tensor::eye(s_w, DType::F32, dev)?.reshape((1, 1, s_w, s_w))?, (s_w, w))?.reshape((s_w, w))?;
    let t_back = wh.t()?.matmul(&t)?.matmul(&wwt.t()?)?; // (S_h, S_w)
    let ones = wh.sum_keepdim(0)?.t()?.matmul(&wwt.sum_keepdim(1)?.t()?)?; // (S_h, S_w)
    let rhs = Tensor::stack(&[t_back.flatten_all()?, ones.flatten_all()?], 1)?; // (S², 2)
    let sums = probs.reshape((n, s_h * s_w))?.matmul(&rhs)?.to_vec2::<f32>()?;
    Ok(sums
        .into_iter()
        .map(|r| {
            let (inter, sum_p) = (r[0] as f64, r[1] as f64);
            (inter / (sum_t + sum_p - inter + 1e-7)) as f32
        })
        .collect())
}


#[cfg(test)]
mod tests {
    use backbone::Backbone;
    use candle_core::Device;
    use candle_nn::{VarBuilder, VarMap};
    use data::{ClassPresence, DatasetKind, FoldScheme, SampleSource};
    use image::{Rgb, RgbImage};

    use super::*;
    use crate::{oracle_mask, upsampled_proposals, BoxError};

    /// A random-weight model of the cpu preset's shape (synthetic EfficientNet weights, fresh
    /// POS and MM): no fetched assets needed.
    struct TinyModel {
        device: Device,
        backbone: backbone::EfficientNetLite0,
        pos: pos::Pos,
        mm: mm::MaskMatching,
    }

    impl TinyModel {
        /// A whole episode on normalised tensors.
        fn episode(&self, query: &Tensor, supports: &[Tensor], labels: &[Tensor]) -> mm::MmOutput {
            let (_, _, h, w) = query.dims4().unwrap();
            let q = self.encode(query).unwrap();
            let s: Vec<_> = supports.iter().map(|x| self.encode(x).unwrap().features).collect();
            self.matching(&q, &s, labels, (h, w)).unwrap()
        }
    }

    impl FewShotModel for TinyModel {
        fn device(&self) -> &Device {
            &self.device
        }
        fn encode(&self, x: &Tensor) -> std::result::Result<QueryPass, BoxError> {
            let f = self.backbone.forward(x)?;
            let out = self.pos.forward(&[f.res2.clone(), f.res3.clone(), f.res4.clone(), f.res5.clone()])?;
            Ok(QueryPass { features: [f.res5, f.res4, f.res3], proposal_logits: out.pred_masks })
        }
        fn matching(&self, q: &QueryPass, s: &[mm::LevelFeatures], l: &[Tensor], hw: (usize, usize)) -> std::result::Result<mm::MmOutput, BoxError> {
            Ok(self.mm.forward(&q.features, s, l, &q.proposal_logits, hw)?)
        }
        fn checkpoint(&self) -> String {
            "tiny-model".into()
        }
        fn preset(&self) -> String {
            "cpu".into()
        }
    }

    fn tiny_model() -> TinyModel {
        let device = Device::Cpu;
        let backbone = backbone::EfficientNetLite0::synthetic(0, &device).unwrap();
        let pos_cfg = pos::PosConfig::cpu();
        let vm = VarMap::new();
        let pos = pos::Pos::new(&pos_cfg, VarBuilder::from_varmap(&vm, DType::F32, &device)).unwrap();
        let cfg = mm::MmConfig { hidden_dim: 128, dim_feedforward: 256, num_queries: pos_cfg.num_queries, ..mm::MmConfig::efficientnet_lite0() };
        let vm = VarMap::new();
        let mm = mm::MaskMatching::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &device)).unwrap();
        TinyModel { device, backbone, pos, mm }
    }

    /// 4 classes (fold i holds class i + 1 out), 9 in-memory 96x88 images with vertical stripes
    /// of classes (≥ 2048 px each, 1-px 255 borders). Class 4 is in a single image, so fold 3
    /// has no usable episode.
    fn tiny_dataset() -> FewShotDataset {
        let layouts: [&[u16]; 9] = [&[1], &[1, 2], &[2], &[2, 3], &[3], &[3, 1], &[4, 1], &[1, 2, 3], &[2, 3]];
        let (w, h) = (96u32, 88u32);
        let recs: Vec<SampleRecord> = layouts
            .iter()
            .enumerate()
            .map(|(k, classes)| {
                let stripe = w / 3;
                let mut img = RgbImage::new(w, h);
                let mut lab = vec![0u8; (w * h) as usize];
                for y in 0..h {
                    for x in 0..w {
                        let s = (x / stripe) as usize;
                        let class = classes.get(s).copied().unwrap_or(0);
                        let v = if x % stripe == 0 && x > 0 { IGNORE } else { class as u8 };
                        lab[(y * w + x) as usize] = v;
                        let c = class as u32 * 60;
                        img.put_pixel(x, y, Rgb([(c + x * 2 + k as u32 * 7) as u8, (c * 3 + y) as u8, (255 - c + (x ^ y)) as u8]));
                    }
                }
                let classes = classes
                    .iter()
                    .map(|&c| ClassPresence { class_id: c, value: c as u8, pixels: lab.iter().filter(|&&v| v == c as u8).count() as u64 })
                    .collect();
                SampleRecord {
                    id: format!("img/{k}"),
                    source: SampleSource::Memory { image: Arc::new(img), label: Arc::new(Label::new(w, h, lab)) },
                    object_class: None,
                    classes,
                }
            })
            .collect();
        let names = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        FewShotDataset::from_parts("tiny", DatasetKind::Other, names, FoldScheme::Contiguous, recs.clone(), recs).unwrap()
    }

    fn temp_dir(what: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mmformer-evaluate-{what}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        d
    }

    #[test]
    fn seed_sequence_starts_with_the_official_seed_and_is_deterministic() {
        let s = seed_sequence(4604572, 5);
        assert_eq!(s.len(), 5);
        assert_eq!(s[0], 4604572);
        assert_eq!(s, seed_sequence(4604572, 5));
        assert_eq!(&s[..3], &seed_sequence(4604572, 3)[..]);
        assert!(s.iter().all(|&x| x < 100_000_000));
        let distinct: BTreeSet<u64> = s.iter().copied().collect();
        assert_eq!(distinct.len(), 5);
        assert_eq!(seed_sequence(7, 1), vec![7]);
        // Validation is apart from every test seed a report can use, and deterministic.
        let v = validation_seed(4604572);
        assert_eq!(v, validation_seed(4604572));
        assert!(!seed_sequence(4604572, TEST_SEEDS_RESERVED).contains(&v));
        assert_ne!(validation_seed(4604572), validation_seed(7743485));
    }

    #[test]
    fn fold_selection_parses_serialises_and_checks_range() {
        assert_eq!("all".parse::<FoldSel>(), Ok(FoldSel::All));
        assert_eq!("3".parse::<FoldSel>(), Ok(FoldSel::One(3)));
        assert!("x".parse::<FoldSel>().unwrap_err().contains("`all`"));
        assert_eq!(serde_json::to_string(&FoldSel::All).unwrap(), "\"all\"");
        assert_eq!(serde_json::to_string(&FoldSel::One(2)).unwrap(), "2");
        assert_eq!(serde_json::from_str::<FoldSel>("2").unwrap(), FoldSel::One(2));
        assert_eq!(serde_json::from_str::<FoldSel>("\"all\"").unwrap(), FoldSel::All);
        let ds = tiny_dataset();
        assert_eq!(FoldSel::All.folds(&ds).unwrap(), vec![0, 1, 2, 3]);
        let e = FoldSel::One(4).folds(&ds).unwrap_err().to_string();
        assert!(e.contains("unknown fold 4") && e.contains("0..3"), "{e}");
    }

    #[test]
    fn memo_evicts_the_entry_needed_farthest_ahead_then_least_recently_used() {
        let entry = |bytes| {
            let z = || Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
            Arc::new(ImageEntry {
                pass: QueryPass { features: [z(), z(), z()], proposal_logits: z() },
                view_label: Label::filled(1, 1, 0),
                orig_label: Label::filled(1, 1, 0),
                bytes,
            })
        };
        // Unplanned: least recently used goes first.
        let mut c = ImageCache::new(25);
        assert_eq!(c.insert("a".into(), entry(10), None), 0);
        assert_eq!(c.insert("b".into(), entry(10), None), 0);
        assert!(c.get("a", None).is_some()); // a is now more recent than b
        assert_eq!(c.insert("c".into(), entry(10), None), 1);
        assert!(c.get("b", None).is_none(), "b was the least recently used");
        assert!(c.get("a", None).is_some() && c.get("c", None).is_some());
        assert_eq!(c.bytes, 20);
        // Planned: the farthest next use goes, even if recently used; never-again goes first.
        let mut c = ImageCache::new(25);
        c.insert("soon".into(), entry(10), Some(5));
        c.insert("late".into(), entry(10), Some(50));
        assert!(c.get("late", Some(50)).is_some());
        assert_eq!(c.insert("mid".into(), entry(10), Some(20)), 1);
        assert!(c.get("late", None).is_none() && c.get("soon", None).is_some() && c.get("mid", None).is_some());
        assert_eq!(c.insert("never".into(), entry(10), Some(u64::MAX)), 1);
        assert!(c.get("never", None).is_none(), "an entry needed last is not kept");
        // An entry larger than the whole budget is not kept either.
        c.insert("big".into(), entry(100), Some(1));
        assert!(c.get("big", None).is_none());
        assert!(c.bytes <= 25);
    }

    #[test]
    fn use_plan_gives_the_next_use_after_an_episode() {
        let item = |q: &str, s: &str| EpisodeItem { fold: 0, seed: 0, index: 0, query: q.into(), class_id: 1, supports: vec![s.into()] };
        let items = [item("a", "b"), item("c", "a"), item("a", "b"), item("b", "c")];
        let mut plan = UsePlan::new(items.iter());
        // Episode 3 repeats episode 1: it is answered from the memo, so it is no use of a or b.
        assert_eq!(plan.next_after("a", 1), 2);
        assert_eq!(plan.next_after("a", 2), u64::MAX);
        assert_eq!(plan.next_after("b", 1), 4);
        assert_eq!(plan.next_after("c", 0), 2);
        assert_eq!(plan.next_after("c", 2), 4);
        assert_eq!(plan.next_after("zzz", 0), u64::MAX);
    }

    #[test]
    fn image_local_order_groups_episodes_by_their_images() {
        let ds = tiny_dataset();
        let item = |q: usize, s: usize| EpisodeItem { fold: 0, seed: 0, index: 0, query: format!("img/{q}"), class_id: 1, supports: vec![format!("img/{s}")] };
        let items = [item(5, 0), item(1, 7), item(0, 1), item(7, 1)];
        // image sets: {0,5} {1,7} {0,1} {1,7}
        assert_eq!(image_local_order(&ds, &items), vec![2, 0, 1, 3]);
    }

    /// The original-resolution protocol: align_corners=True upsampling, `> 0.5` for ours and
    /// `≥ 0.5` for single proposals.
    #[test]
    fn original_protocol_resize_is_align_corners_bilinear() {
        let out = Tensor::new(&[[0f32, 1.0], [0.0, 1.0]], &Device::Cpu).unwrap().reshape((1, 1, 2, 2)).unwrap();
        let up = resize_ac(&out, (3, 3)).unwrap();
        let v = up.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0, 0.5, 1.0]);
        assert_eq!(threshold(&up, 0.5, false).unwrap(), vec![0, 0, 1, 0, 0, 1, 0, 0, 1]);
        assert_eq!(threshold(&up, 0.5, true).unwrap(), vec![0, 1, 1, 0, 1, 1, 0, 1, 1]);
        // Down: corners kept exactly (align_corners=True), 5 -> 3 samples 0, 2, 4.
        let row = Tensor::new(&[0f32, 0.25, 0.5, 0.75, 1.0], &Device::Cpu).unwrap().reshape((1, 1, 1, 5)).unwrap();
        let down = resize_ac(&row, (1, 3)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(down, vec![0.0, 0.5, 1.0]);
    }

    /// The oracle's soft IoU at original resolution (computed through the adjoint of the resize)
    /// equals the soft IoU of the materialised resized proposals.
    #[test]
    fn soft_iou_at_original_size_matches_materialised_resize() {
        let dev = Device::Cpu;
        let probs = Tensor::rand(0f32, 1f32, (5, 8, 8), &dev).unwrap();
        let (h, w) = (11, 13);
        let data: Vec<u8> = (0..h * w).map(|i| [0u8, 1, 1, 255][(i * 7 + i / 5) % 4]).collect();
        let label = Label::new(w as u32, h as u32, data.clone());
        let fast = soft_iou_resized(&probs, &label, (h, w)).unwrap();
        let big = resize_ac(&probs.unsqueeze(0).unwrap(), (h, w)).unwrap();
        let lt = Tensor::from_vec(data.iter().map(|&v| v as f32).collect::<Vec<_>>(), (1, h, w), &dev).unwrap();
        let slow = losses::fewshot::soft_iou(&big, &lt).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() < 1e-5, "{fast:?} vs {slow:?}");
        }
        // Same size: the plain soft IoU.
        let same = soft_iou_resized(&probs, &Label::new(8, 8, data[..64].to_vec()), (8, 8)).unwrap();
        let lt8 = Tensor::from_vec(data[..64].iter().map(|&v| v as f32).collect::<Vec<_>>(), (1, 8, 8), &dev).unwrap();
        let plain = losses::fewshot::soft_iou(&probs.unsqueeze(0).unwrap(), &lt8).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in same.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    /// The memoised, batched engine gives what one `MmFormer::episode` call on
    /// `TestEpisodes::load` gives (official protocol); the original protocol counts the
    /// original-resolution label's pixels; the oracle beats the baseline in soft IoU.
    #[test]
    fn engine_matches_the_plain_episode_path() {
        let ds = tiny_dataset();
        let model = tiny_model();
        let size = 64;
        let eps = TestEpisodes::generate(&ds, 0, 2, 5, 11).unwrap();
        let items: Vec<EpisodeItem> = eps
            .episodes
            .iter()
            .enumerate()
            .map(|(i, e)| EpisodeItem { fold: 0, seed: 11, index: i, query: e.query.clone(), class_id: e.class_id, supports: e.supports[..2].to_vec() })
            .collect();
        let tuning = EvalTuning { episode_batch: 3, image_batch: 2, ..Default::default() };
        let mut engine = Engine::new(&model, &ds, size, &tuning);
        let refs: Vec<&EpisodeItem> = items.iter().collect();
        let outs = engine.run(&refs, None, false).unwrap();
        let dev = Device::Cpu;
        for (i, (o, _)) in outs.iter().enumerate() {
            let e = eps.load(&ds, i, size).unwrap();
            let q = images_to_tensor(&[&e.query.image], &dev).unwrap();
            let sx: Vec<Tensor> = e.supports.iter().map(|s| images_to_tensor(&[&s.image], &dev).unwrap()).collect();
            let sl: Vec<Tensor> = e.supports.iter().map(|s| labels_to_tensor(&[&s.label], &dev).unwrap()).collect();
            let out = model.episode(&q, &sx, &sl);
            let mask = out.foreground().unwrap().to_dtype(DType::U8).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let r = EpisodeIou::compute(&mask, e.query.label.data());
            let ours = o.counts[0][1];
            assert_eq!(ours.valid, r.valid, "episode {i}: same valid pixels");
            let tol = (r.valid / 200).max(2);
            for k in 0..2 {
                assert!(ours.inter[k].abs_diff(r.inter[k]) <= tol && ours.union[k].abs_diff(r.union[k]) <= tol, "episode {i}: {ours:?} vs {r:?}");
            }
            // The official oracle is the pipeline's oracle_mask on the same proposals.
            let probs = upsampled_proposals(&model.encode(&q).unwrap().proposal_logits, (size as usize, size as usize)).unwrap().squeeze(0).unwrap();
            let (idx, _) = oracle_mask(&probs, e.query.label.data()).unwrap();
            let soft = soft_iou_resized(&probs, &e.query.label, (size as usize, size as usize)).unwrap();
            assert!((soft[idx] - o.oracle_soft_iou[0]).abs() < 1e-4, "episode {i}: oracle soft IoU {} vs {}", soft[idx], o.oracle_soft_iou[0]);
            // Original protocol: the original-resolution label (96x88) is what is counted.
            let rec = &ds.samples(Split::Val)[ds.find(Split::Val, &e.query_id).unwrap()];
            let (_, lab) = rec.load().unwrap();
            let bin = lab.binary_for(rec.value_of(e.class_id).unwrap());
            assert_eq!(o.counts[1][1].valid, bin.data().iter().filter(|&&v| v != IGNORE).count() as u64);
            assert_eq!(o.counts[1][0].valid, o.counts[1][1].valid);
            for p in 0..2 {
                assert!(o.oracle_soft_iou[p] >= o.baseline_soft_iou[p], "episode {i} protocol {p}: {o:?}");
            }
        }
        assert_eq!(engine.stats.episodes_matched + engine.stats.episodes_memoised, items.len());
        assert!(engine.stats.images_encoded <= ds.samples(Split::Val).len(), "each image encoded at most once: {:?}", engine.stats);
    }

    #[test]
    fn evaluate_writes_a_complete_report_over_all_usable_folds() {
        let ds = tiny_dataset();
        let model = tiny_model();
        let out = temp_dir("e2e");
        let opts = EvalOptions { fold: FoldSel::All, shots: vec![2, 1], episodes: 6, seeds: 2, size: 64, overlays: 2, out: out.clone() };
        let tuning = EvalTuning { episode_batch: 2, image_batch: 3, ..Default::default() };
        let report = evaluate_with(&model, &ds, "tiny-bench", &opts, &tuning, &train::Silent).unwrap();

        assert_eq!(report.folds, vec![0, 1, 2]);
        assert_eq!(report.miou_rule, MIOU_RULE);
        assert_eq!(report.format, REPORT_FORMAT);
        assert_eq!(report.skipped_folds.len(), 1);
        assert_eq!(report.skipped_folds[0].fold, 3);
        assert_eq!(report.seeds.len(), 3);
        assert!(report.seeds.iter().all(|s| s.seeds.len() == 2 && s.seeds[0] == ds.default_test_seed(s.fold).unwrap()));
        let one = report.shot(1).expect("1-shot result");
        assert!(report.shot(2).is_some() && report.shot(5).is_none());
        assert_eq!(one.episodes, 18);
        assert_eq!(one.seeds, 2);
        for v in [one.miou, one.fb_iou, one.baseline_miou, one.oracle_miou, one.original.miou, one.original.oracle_miou] {
            assert!((0.0..=100.0).contains(&v), "{v}");
        }
        assert!(one.miou_std.is_some() && one.oracle_miou_std.is_some());
        assert_eq!(one.miou, one.official.miou);
        assert_eq!(one.official.per_seed.len(), 2);
        assert_eq!(one.official.per_class.iter().map(|c| c.class_id).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(one.official.per_class[0].name, "a");
        assert_eq!(one.classes_without_episodes, Vec::<u32>::new());
        // mean over seeds of the per-seed mIoU
        let per_seed: Vec<f64> = one.official.per_seed.iter().map(|s| s.scores.ours.miou).collect();
        assert!((one.miou - (per_seed[0] + per_seed[1]) / 2.0).abs() < 1e-9);
        // Every episode once, plus the overlays' re-runs.
        assert_eq!(report.stats.episodes_matched + report.stats.episodes_memoised, 2 * 2 * 18 + 4);

        // Files: JSON (same content), Markdown, overlays, per-episode lines.
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        assert_eq!(json["format"], REPORT_FORMAT);
        assert_eq!(json["fold"], "all");
        for key in ["miou", "fb_iou", "baseline_miou", "oracle_miou"] {
            assert!(json["shots"]["1shot"][key].is_number(), "{key}");
            assert!(json["shots"]["2shot"]["original"][key].is_number(), "{key}");
        }
        let back: EvalReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(md.contains("| tiny-bench | all | 1 | official | 18 × 2 |"), "{md}");
        assert!(md.contains("| tiny-bench | all | 2 | original |"), "{md}");
        assert_eq!(report.overlays.len(), 4);
        for o in &report.overlays {
            let img = image::open(out.join(&o.file)).unwrap();
            assert_eq!(img.height(), 192 + crate::overlay::header_height(192));
            assert!(md.contains(&o.file));
        }
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("episodes.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2 * 2 * 18);
        for l in &lines {
            for p in ["official", "original"] {
                let (b, o) = (l["soft_iou"]["baseline"][p].as_f64().unwrap(), l["soft_iou"]["oracle"][p].as_f64().unwrap());
                assert!(o >= b, "oracle soft IoU {o} < baseline {b}: {l}");
            }
        }
        assert!(std::fs::read_to_string(out.join("log.jsonl")).unwrap().contains("\"event\":\"done\""));

        // A tiny memo budget re-encodes images but changes nothing else.
        let out2 = temp_dir("e2e-small-cache");
        let opts2 = EvalOptions { out: out2.clone(), overlays: 0, ..opts.clone() };
        let small = EvalTuning { cache_bytes: 1, ..tuning };
        let r2 = evaluate_with(&model, &ds, "tiny-bench", &opts2, &small, &train::Silent).unwrap();
        assert!(r2.stats.image_cache_evictions > 0 && r2.stats.images_encoded > report.stats.images_encoded, "{:?}", r2.stats);
        for shot in [1, 2] {
            let (a, b) = (report.shot(shot).unwrap(), r2.shot(shot).unwrap());
            assert!((a.miou - b.miou).abs() < 1.0 && (a.original.oracle_miou - b.original.oracle_miou).abs() < 1.0);
        }
        std::fs::remove_dir_all(&out).ok();
        std::fs::remove_dir_all(&out2).ok();
    }

    #[test]
    fn bad_inputs_are_refused_with_the_reason() {
        let ds = tiny_dataset();
        let model = tiny_model();
        let out = temp_dir("bad");
        let base = EvalOptions { fold: FoldSel::One(3), shots: vec![1], episodes: 2, seeds: 1, size: 64, overlays: 0, out: out.clone() };
        let e = format!("{:#}", evaluate(&model, &ds, "t", &base, &train::Silent).unwrap_err());
        assert!(e.contains("fold 3") && e.contains("tiny"), "{e}");
        let e = format!("{:#}", evaluate(&model, &ds, "t", &EvalOptions { fold: FoldSel::One(9), ..base.clone() }, &train::Silent).unwrap_err());
        assert!(e.contains("unknown fold 9"), "{e}");
        let e = format!("{:#}", evaluate(&model, &ds, "t", &EvalOptions { fold: FoldSel::One(0), shots: vec![0], ..base.clone() }, &train::Silent).unwrap_err());
        assert!(e.contains("shots"), "{e}");
        let e = format!("{:#}", evaluate(&model, &ds, "t", &EvalOptions { fold: FoldSel::One(0), episodes: 0, ..base.clone() }, &train::Silent).unwrap_err());
        assert!(e.contains("episodes"), "{e}");
        std::fs::remove_dir_all(&out).ok();
    }
}
