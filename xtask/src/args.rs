//! The command-line options of every command, each flag defined once, and how they resolve to
//! the library's options (a preset's schedule fills what the command line leaves out).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mmformer::cache::{CacheOptions, Splits, WorkerSlice};
use mmformer::eval::{EvalTuning, FoldSel};
use mmformer::stage1::Stage1Options;
use mmformer::stage2::Stage2Options;
use mmformer::{Preset, Schedule};

/// `--device`: where every tensor lives.
#[derive(Args, Clone, Debug)]
pub struct DeviceArg {
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// On CUDA, f32 matrix products and convolutions in TF32 (tensor cores; PyTorch's default
    /// for cuDNN convolutions). Off: float32 throughout, as on the CPU.
    #[arg(long)]
    pub tf32: bool,
}

impl DeviceArg {
    pub fn open(&self) -> Result<mmformer::Device> {
        let dev = mmformer::parse_device(&self.device)?;
        if self.tf32 {
            if !dev.is_cuda() {
                anyhow::bail!("--tf32 needs a CUDA device (got {})", self.device);
            }
            mmformer::ops::set_tf32(true);
        }
        Ok(dev)
    }
}

/// What a stage-1 run and the cache are made from.
#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// Dataset root: the VOC layout (PASCAL VOC2012, the synthetic dataset) or a COCO root.
    #[arg(long, default_value = "data/synthetic")]
    pub data: PathBuf,
    /// Fold whose classes are held out (0..3).
    #[arg(long, default_value_t = 0)]
    pub fold: usize,
    #[arg(long, default_value_t = Preset::Cpu)]
    pub preset: Preset,
    /// Backbone weight file (ResNet-50: torchvision .pth, official checkpoint or safetensors;
    /// default: the EfficientNet-Lite0 asset).
    #[arg(long)]
    pub backbone_weights: Option<PathBuf>,
}

/// The optimisation schedule; unset values come from the preset's schedule for the stage and
/// dataset (the paper preset: the official one, spec §4.2).
#[derive(Args, Clone, Debug, Default)]
pub struct ScheduleArgs {
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: Option<u64>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub iters: Option<u64>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip (official 0.01).
    #[arg(long)]
    pub clip: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Iterations between checkpoints + validations.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub eval_every: Option<u64>,
    /// Validation episodes per evaluation.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub eval_episodes: Option<u64>,
    /// Log every N iterations.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub log_every: u64,
}

impl ScheduleArgs {
    /// The schedule: the command line over `defaults`.
    pub fn resolve(&self, defaults: Schedule) -> Schedule {
        Schedule {
            batch: self.batch.map_or(defaults.batch, |b| b as usize),
            iters: self.iters.unwrap_or(defaults.iters),
            lr: self.lr.unwrap_or(defaults.lr),
            weight_decay: self.weight_decay.unwrap_or(defaults.weight_decay),
            clip: self.clip.unwrap_or(defaults.clip),
            eval_every: self.eval_every.unwrap_or(defaults.eval_every),
            eval_episodes: self.eval_episodes.map_or(defaults.eval_episodes, |n| n as usize),
        }
    }
}

/// `cargo xtask train-pos`.
#[derive(Args, Clone, Debug)]
pub struct TrainPosArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Run folder: checkpoints, log.jsonl, config.json.
    #[arg(long, default_value = "runs/pos")]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArg,
}

impl TrainPosArgs {
    pub fn options(&self) -> Stage1Options {
        let d = &self.data;
        let s = self.schedule.resolve(d.preset.stage1_schedule(mmformer::datasets::is_coco_root(&d.data)));
        Stage1Options {
            data: d.data.clone(),
            fold: d.fold,
            preset: d.preset,
            backbone_weights: d.backbone_weights.clone(),
            batch: s.batch,
            iters: s.iters,
            lr: s.lr,
            weight_decay: s.weight_decay,
            clip: s.clip,
            seed: self.schedule.seed,
            out: self.out.clone(),
            eval_every: s.eval_every,
            eval_episodes: s.eval_episodes,
            log_every: self.schedule.log_every,
        }
    }
}

/// `cargo xtask cache-proposals`.
#[derive(Args, Clone, Debug)]
pub struct CacheArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Stage-1 checkpoint folder (e.g. runs/pos/checkpoints/best).
    #[arg(long, default_value = "runs/pos/checkpoints/best")]
    pub pos_checkpoint: PathBuf,
    #[arg(long, default_value = "runs/shards")]
    pub out: PathBuf,
    /// train, val or both.
    #[arg(long, default_value_t = Splits::Both)]
    pub split: Splits,
    /// Augmented views cached per training image (stage 2 draws among them).
    #[arg(long, default_value_t = 2)]
    pub views: u32,
    /// Seed of the cached augmentations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Feature precision: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub feature_dtype: String,
    /// Proposal-mask precision: u8 (probability × 255) or f16.
    #[arg(long, default_value = "u8")]
    pub mask_dtype: String,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub records_per_shard: u64,
    /// This process's part of the work: `i/n` takes shards k ≡ i (mod n).
    #[arg(long)]
    pub shard: Option<WorkerSlice>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    /// Print the disk estimate and stop.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

impl CacheArgs {
    pub fn options(&self) -> CacheOptions {
        CacheOptions {
            data: self.data.data.clone(),
            fold: self.data.fold,
            preset: self.data.preset,
            backbone_weights: self.data.backbone_weights.clone(),
            pos_checkpoint: self.pos_checkpoint.clone(),
            out: self.out.clone(),
            split: self.split,
            views: self.views,
            seed: self.seed,
            feature_dtype: self.feature_dtype.clone(),
            mask_dtype: self.mask_dtype.clone(),
            records_per_shard: self.records_per_shard as usize,
            shard: self.shard,
            batch: self.batch as usize,
            dry_run: self.dry_run,
        }
    }
}

/// `cargo xtask train-mm`.
#[derive(Args, Clone, Debug)]
pub struct TrainMmArgs {
    /// Shard folder written by cache-proposals (manifest.json, train/, val/).
    #[arg(long, default_value = "runs/shards")]
    pub shards: PathBuf,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Supports per training episode (the paper trains 1-shot and tests K-shot with it).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub shot: u64,
    #[arg(long, default_value = "runs/mm")]
    pub out: PathBuf,
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
    #[command(flatten)]
    pub device: DeviceArg,
}

impl TrainMmArgs {
    /// The options, the preset and dataset (for the default schedule) read from the shards'
    /// manifest.
    pub fn options(&self) -> Result<Stage2Options> {
        let m = mmformer::cache::CacheManifest::read(&self.shards)?;
        let s = self.schedule.resolve(m.preset.stage2_schedule(mmformer::datasets::is_coco_root(&m.dataset)));
        Ok(Stage2Options {
            shards: self.shards.clone(),
            batch: s.batch,
            iters: s.iters,
            lr: s.lr,
            weight_decay: s.weight_decay,
            clip: s.clip,
            shot: self.shot as usize,
            seed: self.schedule.seed,
            out: self.out.clone(),
            eval_every: s.eval_every,
            eval_episodes: s.eval_episodes,
            log_every: self.schedule.log_every,
            no_self_alignment: self.no_self_alignment,
            no_cross_alignment: self.no_cross_alignment,
            no_learnable_matching: self.no_learnable_matching,
            no_co_loss: self.no_co_loss,
        })
    }
}

/// `cargo xtask eval-shards`.
#[derive(Args, Clone, Debug)]
pub struct EvalShardsArgs {
    /// Shard folder with `val/` (cache-proposals --split val).
    #[arg(long, default_value = "runs/shards")]
    pub shards: PathBuf,
    /// A train-mm checkpoint folder (e.g. runs/mm/checkpoints/best).
    #[arg(long, default_value = "runs/mm/checkpoints/best")]
    pub mm_checkpoint: PathBuf,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub episodes: u64,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub shot: u64,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// Datasets known by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NamedDataset {
    /// `data/synthetic` (written by `cargo xtask make-synthetic`).
    Synthetic,
    /// The 9 real VOC photos of the fetched assets (`cargo xtask fetch-assets`); every PASCAL
    /// class is novel to a model trained on the synthetic data, so use `--fold all`.
    VocPhotos,
}

/// `cargo xtask eval`.
#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    /// Full MM-Former checkpoint: ours (`mmformer.safetensors` from train-mm) or an official
    /// detectron2 `model_best.pth` (paper preset).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Dataset root in the VOC layout (PASCAL VOC2012 with SegmentationClassAug, or the synthetic dataset).
    #[arg(long, conflicts_with_all = ["dataset", "coco"])]
    pub data: Option<PathBuf>,
    /// A dataset by name (default: synthetic, i.e. data/synthetic).
    #[arg(long, value_enum, conflicts_with = "coco")]
    pub dataset: Option<NamedDataset>,
    /// COCO root (`annotations/instances_val<year>.json`, `val<year>/`; masks are rendered under
    /// `annotations/coco_masks/`): COCO-20i, interleaved folds, val split only.
    #[arg(long)]
    pub coco: Option<PathBuf>,
    #[arg(long, default_value_t = 2017)]
    pub coco_year: u32,
    /// Name of the benchmark in the report (default: the dataset's name).
    #[arg(long)]
    pub benchmark: Option<String>,
    /// A fold (0..3) or `all` (the union of every fold's episodes).
    #[arg(long, default_value = "0")]
    pub fold: FoldSel,
    /// Shot counts: `--shots 1,5` or `--shot 1 --shot 5` (default 1 and 5).
    #[arg(long = "shots", visible_alias = "shot", value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..))]
    pub shots: Vec<u64>,
    /// Test episodes per fold and seed.
    #[arg(long, default_value_t = mmformer::data::DEFAULT_TEST_EPISODES as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub episodes: u64,
    /// Episode sets: the official seed, then seeds derived from it; n > 1 reports mean ± std.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub seeds: u64,
    /// Model input side (default: the checkpoint preset's, 256 cpu / 480 paper).
    #[arg(long)]
    pub size: Option<u32>,
    /// Report folder (report.json, report.md, episodes.jsonl, log.jsonl, overlays/).
    #[arg(long, default_value = "runs/eval")]
    pub out: PathBuf,
    /// Overlay PNGs per shot.
    #[arg(long, default_value_t = 8)]
    pub overlays: usize,
    /// Memory budget (MiB) of the per-image feature memo.
    #[arg(long, default_value_t = 2048)]
    pub cache_mb: u64,
    /// Episodes per matching call.
    #[arg(long, default_value_t = EvalTuning::default().episode_batch as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub episode_batch: u64,
    /// Images per backbone + POS call.
    #[arg(long, default_value_t = EvalTuning::default().image_batch as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub image_batch: u64,
    #[command(flatten)]
    pub device: DeviceArg,
}

impl EvalArgs {
    /// Opens the dataset the arguments name.
    pub fn open_dataset(&self) -> Result<mmformer::data::FewShotDataset> {
        if let Some(root) = &self.coco {
            return Ok(mmformer::datasets::open_coco_val(root, self.coco_year)?);
        }
        let voc = mmformer::datasets::open_voc_dataset;
        match (&self.data, self.dataset) {
            (Some(root), _) => Ok(voc(root)?),
            (None, Some(NamedDataset::VocPhotos)) => {
                let dir = mmformer::data::photos::default_assets_dir();
                mmformer::data::FewShotDataset::voc_photos(&dir)
                    .with_context(|| format!("opening the VOC photos under {} (run `cargo xtask fetch-assets`)", dir.display()))
            }
            (None, Some(NamedDataset::Synthetic) | None) => voc(std::path::Path::new("data/synthetic"))
                .context("the default dataset is data/synthetic (run `cargo xtask make-synthetic`), or pass --data / --dataset / --coco"),
        }
    }
}

/// `cargo xtask predict`.
#[derive(Args, Clone, Debug)]
pub struct PredictArgs {
    /// A full MM-Former checkpoint: ours (`mmformer.safetensors`) or an official `model_best.pth`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Support image (repeat for K shots; the i-th `--support-mask` belongs to the i-th `--support`).
    #[arg(long = "support", required = true)]
    pub supports: Vec<PathBuf>,
    /// Support mask PNG, same size as its image: grayscale (0 = background, other = object),
    /// palette (index 0 = background, 255 = ignore, other = object) or RGB (non-black = object).
    #[arg(long = "support-mask", required = true)]
    pub support_masks: Vec<PathBuf>,
    /// A query image, or a folder: every .jpg/.jpeg/.png in it (sorted; `*_mask.*` and
    /// `*_overlay.*` skipped).
    #[arg(long)]
    pub query: PathBuf,
    /// Output folder for `<stem>_mask.png` and `<stem>_overlay.png`.
    #[arg(long)]
    pub out: PathBuf,
    /// Input side (square, a multiple of 32); default: the checkpoint preset's (256 cpu, 480 paper).
    #[arg(long)]
    pub size: Option<u32>,
    /// For multi-class masks (e.g. VOC palette labels): the pixel value of the class to segment;
    /// every other value (255 = ignore included) is background. Default: any non-zero value
    /// except a palette 255 is the object.
    #[arg(long)]
    pub class_value: Option<u8>,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// `cargo xtask bench`.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// What to time: backbone; pos (forward at --size, paper preset, and one cpu-preset training
    /// iteration, vs PyTorch); episode (1/5-shot per stage, paper preset at --size and cpu at
    /// 256); stage2 (one stage-2 step from --shards vs backbone + POS live).
    #[arg(default_values_t = vec!["backbone".to_string()])]
    pub what: Vec<String>,
    /// Input side (square).
    #[arg(long, default_value_t = 480)]
    pub size: usize,
    /// Timed runs per model and side.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..))]
    pub reps: u64,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub threads: u64,
    /// Write `[{"name", "ours_ms", "torch_ms", "ratio", "detail"}]` here (`detail`: CPU times, spread,
    /// standalone medians where measured).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Shard folder for `stage2` (one training step from shards vs live backbone + POS).
    #[arg(long, default_value = "runs/shards", conflicts_with = "preset")]
    pub shards: PathBuf,
    /// For `stage2`: time at this preset on shards made for the purpose (a small synthetic
    /// dataset, seeded weights; made once under target/bench-shards-<preset>) instead of --shards.
    #[arg(long)]
    pub preset: Option<Preset>,
    /// Episodes per step for `stage2`.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Eval {
        #[command(flatten)]
        args: EvalArgs,
    }

    #[derive(Parser)]
    struct Pos {
        #[command(flatten)]
        args: TrainPosArgs,
    }

    fn eval(extra: &[&str]) -> std::result::Result<EvalArgs, clap::Error> {
        let mut argv = vec!["eval", "--checkpoint", "ck.safetensors"];
        argv.extend_from_slice(extra);
        Eval::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn shots_folds_and_datasets_parse() {
        assert_eq!(eval(&["--shots", "1,5"]).unwrap().shots, vec![1, 5]);
        assert_eq!(eval(&["--shot", "1", "--shot", "5"]).unwrap().shots, vec![1, 5]);
        assert!(eval(&[]).unwrap().shots.is_empty(), "empty means both");
        assert_eq!(eval(&["--fold", "all"]).unwrap().fold, FoldSel::All);
        assert_eq!(eval(&["--fold", "2"]).unwrap().fold, FoldSel::One(2));
        assert_eq!(eval(&["--dataset", "voc-photos"]).unwrap().dataset, Some(NamedDataset::VocPhotos));
        let e = eval(&["--fold", "seven"]).err().unwrap().to_string();
        assert!(e.contains("fold must be a number"), "{e}");
        assert!(eval(&["--data", "d", "--dataset", "voc-photos"]).is_err());
    }

    /// A zero count or interval is a usage error, not a panic or a divide by zero later.
    #[test]
    fn zero_counts_are_usage_errors() {
        for bad in [["--episodes", "0"], ["--seeds", "0"], ["--shots", "0"], ["--episode-batch", "0"], ["--image-batch", "0"]] {
            let e = eval(&bad).err().unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}: {e}");
        }
        for bad in [["--batch", "0"], ["--iters", "0"], ["--eval-every", "0"], ["--log-every", "0"], ["--eval-episodes", "0"]] {
            assert!(Pos::try_parse_from(["train-pos", bad[0], bad[1]]).is_err(), "{bad:?} accepted");
        }
    }

    /// Unset schedule values come from the preset: the paper preset means the official schedule.
    #[test]
    fn the_paper_preset_means_the_official_schedule() {
        let p = Pos::try_parse_from(["train-pos", "--preset", "paper", "--backbone-weights", "r50.pth"]).unwrap().args.options();
        assert_eq!((p.batch, p.iters, p.lr, p.eval_every, p.eval_episodes), (8, 20_000, 1e-4, 500, 1000));
        let c = Pos::try_parse_from(["train-pos"]).unwrap().args.options();
        assert_eq!((c.preset, c.batch, c.iters, c.eval_every), (Preset::Cpu, 4, 600, 100));
        let o = Pos::try_parse_from(["train-pos", "--preset", "paper", "--iters", "50", "--batch", "2"]).unwrap().args.options();
        assert_eq!((o.batch, o.iters, o.eval_every), (2, 50, 500));
    }

    #[test]
    fn a_cuda_device_in_a_cpu_build_is_refused_at_once() {
        let a = eval(&["--device", "cuda:0"]).unwrap();
        if mmformer::CUDA_BUILD {
            return;
        }
        let e = a.device.open().err().unwrap().to_string();
        assert!(e.contains("cuda:0") && e.contains("no CUDA support") && e.contains("--features cuda"), "{e}");
    }
}

/// `cargo xtask fuzz`: the file readers against mutated seed files, in worker processes under
/// an address-space limit (see `mmformer::fuzz`).
#[derive(Args, Clone, Debug)]
pub struct FuzzArgs {
    /// pth, safetensors, png-mask, image, episodes-json, shard, config, or all (comma-separated
    /// or repeated).
    #[arg(long = "target", value_delimiter = ',', required_unless_present = "worker")]
    pub targets: Vec<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// Stop a target after this many cases (even before --seconds).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub cases: Option<u64>,
    /// Seed of the mutations: case i of a seed is the same bytes on every run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Index of the first case.
    #[arg(long, default_value_t = 0)]
    pub start_case: u64,
    /// Crashes (`crashes/<target>-<case>.{bin,txt}`) and `summary.json` go here.
    #[arg(long, default_value = "target/fuzz")]
    pub out: PathBuf,
    /// Address-space limit of a worker (setrlimit RLIMIT_AS), MiB; 0 = none.
    #[arg(long, default_value_t = mmformer::fuzz::DEFAULT_MEMORY_MB)]
    pub memory_mb: u64,
    /// Seconds a case may run before it counts as a hang.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub case_timeout: u64,
    /// Replay one case in this process (no worker, no memory limit, panics not caught) and
    /// print how it was made and what the reader said.
    #[arg(long, conflicts_with = "input")]
    pub case: Option<u64>,
    /// Run the target's readers on this file (a folder for `shard`) in this process.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Internal: run as a worker (the job is in the environment).
    #[arg(long, hide = true)]
    pub worker: bool,
}

impl FuzzArgs {
    pub fn run(&self) -> Result<()> {
        use mmformer::fuzz::{self, Outcome, Target};
        if self.worker {
            fuzz::worker_main();
        }
        let targets = Target::parse_list(&self.targets.join(","))?;
        let scratch = self.out.join("scratch").join(format!("replay-{}", std::process::id()));
        if self.case.is_some() || self.input.is_some() {
            for &t in &targets {
                let outcome = match (self.case, &self.input) {
                    (Some(i), _) => {
                        let (case, outcome) = fuzz::replay_case(t, self.seed, i, &scratch)?;
                        println!("{t} case {i} (seed {}): from `{}`, mutated {}:", self.seed, case.base, case.mutated);
                        case.ops.iter().for_each(|o| println!("  {o}"));
                        outcome
                    }
                    (None, Some(input)) => fuzz::run_input(t, input, &scratch)?,
                    (None, None) => unreachable!(),
                };
                match outcome {
                    Outcome::Ok => println!("{t}: accepted"),
                    Outcome::Err(e) => println!("{t}: refused: {e}"),
                }
            }
            let _ = std::fs::remove_dir_all(&scratch);
            return Ok(());
        }
        let mut opts = fuzz::FuzzOptions::new(targets, &self.out);
        opts.seed = self.seed;
        opts.seconds = Some(self.seconds as f64);
        opts.cases = self.cases;
        opts.start_case = self.start_case;
        opts.memory_mb = self.memory_mb;
        opts.case_timeout = std::time::Duration::from_secs(self.case_timeout);
        let worker = fuzz::WorkerCommand {
            program: std::env::current_exe().context("cannot find this program to start fuzz workers")?,
            args: vec!["fuzz".into(), "--worker".into()],
        };
        eprintln!(
            "fuzz: {} for {} s each, seed {}, workers limited to {} MiB of address space; crashes to {}",
            opts.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
            self.seconds,
            self.seed,
            self.memory_mb,
            self.out.join("crashes").display()
        );
        let summary = fuzz::run(&opts, &worker, &mut |line| eprintln!("{line}"))?;
        print!("{}", summary.report());
        println!("{}", self.out.join("summary.json").display());
        match summary.failures() {
            0 => Ok(()),
            n => anyhow::bail!("{n} failing case(s); inputs and reasons under {}", self.out.join("crashes").display()),
        }
    }
}
