//! `cargo xtask eval`: few-shot evaluation of a full checkpoint (ours or an official
//! `model_best.pth`) on PASCAL-5i / the synthetic dataset (VOC layout), the real VOC photos of
//! the fetched assets, or COCO-20i. Prints the Markdown table and, last, the path of
//! `report.json`. What is measured and written: `pipeline::evaluate`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use data::{CocoOptions, FewShotDataset};

use crate::pipeline::evaluate::{evaluate_with, EvalOptions, EvalTuning, FoldSel};
use crate::pipeline::model::MmFormer;

/// Datasets known by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NamedDataset {
    /// `data/synthetic` (written by `cargo xtask make-synthetic`).
    Synthetic,
    /// The 9 real VOC photos of the fetched assets (`cargo xtask fetch-assets`); every PASCAL
    /// class is novel to a model trained on the synthetic data, so use `--fold all`.
    VocPhotos,
}

#[derive(Clone, Debug, clap::Args)]
pub struct EvalArgs {
    /// Full MM-Former checkpoint: ours (`model.safetensors` from train-mm) or an official
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
    #[arg(long = "shots", visible_alias = "shot", value_delimiter = ',')]
    pub shots: Vec<usize>,
    /// Test episodes per fold and seed.
    #[arg(long, default_value_t = data::DEFAULT_TEST_EPISODES)]
    pub episodes: usize,
    /// Episode sets: the official seed, then seeds derived from it; n > 1 reports mean ± std.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
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
    #[arg(long, default_value_t = EvalTuning::default().episode_batch)]
    pub episode_batch: usize,
    /// Images per backbone + POS call.
    #[arg(long, default_value_t = EvalTuning::default().image_batch)]
    pub image_batch: usize,
}

/// Opens the dataset the arguments name.
pub fn open_dataset(args: &EvalArgs) -> Result<FewShotDataset> {
    if let Some(root) = &args.coco {
        let mut opts = CocoOptions::standard(root, args.coco_year);
        opts.train = None;
        if !opts.val.annotations.is_file() {
            bail!("{}: COCO annotations not found (expected the standard layout under {})", opts.val.annotations.display(), root.display());
        }
        return FewShotDataset::open_coco(&opts).with_context(|| format!("opening COCO at {}", root.display()));
    }
    let voc = crate::pipeline::stage1::open_voc_dataset;
    match (&args.data, args.dataset) {
        (Some(root), _) => voc(root),
        (None, Some(NamedDataset::VocPhotos)) => {
            let dir = data::photos::default_assets_dir();
            FewShotDataset::voc_photos(&dir)
                .with_context(|| format!("opening the VOC photos under {} (run `cargo xtask fetch-assets`)", dir.display()))
        }
        (None, Some(NamedDataset::Synthetic) | None) => voc(Path::new("data/synthetic"))
            .context("the default dataset is data/synthetic (run `cargo xtask make-synthetic`), or pass --data / --dataset / --coco"),
    }
}

/// Runs the evaluation; returns the path of `report.json`.
pub fn run(args: &EvalArgs) -> Result<PathBuf> {
    if !args.checkpoint.is_file() {
        bail!("checkpoint {} not found", args.checkpoint.display());
    }
    let model = MmFormer::load(&args.checkpoint)?;
    let ds = open_dataset(args)?;
    let opts = EvalOptions {
        fold: args.fold,
        shots: if args.shots.is_empty() { vec![1, 5] } else { args.shots.clone() },
        episodes: args.episodes,
        seeds: args.seeds,
        size: args.size.unwrap_or_else(|| model.meta.preset.input_size()),
        overlays: args.overlays,
        out: args.out.clone(),
    };
    let tuning = EvalTuning {
        cache_bytes: args.cache_mb << 20,
        episode_batch: args.episode_batch,
        image_batch: args.image_batch,
        ..EvalTuning::default()
    };
    let benchmark = args.benchmark.clone().unwrap_or_else(|| ds.name().to_string());
    let report = evaluate_with(&model, &ds, &benchmark, &opts, &tuning)?;
    println!("{}", eval::markdown_summary(&report.summary_rows()));
    let st = &report.stats;
    eprintln!(
        "{:.1} s: {} images encoded ({:.1} s decoding, {:.1} s backbone + POS), {} episodes matched ({:.1} s), {} memoised, scoring {:.1} s",
        report.seconds, st.images_encoded, st.decode_seconds, st.encode_seconds, st.episodes_matched, st.match_seconds, st.episodes_memoised, st.score_seconds
    );
    let path = args.out.join("report.json");
    println!("{}", path.display());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EvalArgs,
    }

    fn parse(extra: &[&str]) -> EvalArgs {
        let mut argv = vec!["eval", "--checkpoint", "ck.safetensors"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn shots_folds_and_datasets_parse() {
        assert_eq!(parse(&["--shots", "1,5"]).shots, vec![1, 5]);
        assert_eq!(parse(&["--shot", "1", "--shot", "5"]).shots, vec![1, 5]);
        assert!(parse(&[]).shots.is_empty(), "empty means both");
        assert_eq!(parse(&["--fold", "all"]).fold, FoldSel::All);
        assert_eq!(parse(&["--fold", "2"]).fold, FoldSel::One(2));
        assert_eq!(parse(&["--dataset", "voc-photos"]).dataset, Some(NamedDataset::VocPhotos));
        let e = Cli::try_parse_from(["eval", "--checkpoint", "c", "--fold", "seven"]).err().unwrap().to_string();
        assert!(e.contains("fold must be a number"), "{e}");
        assert!(Cli::try_parse_from(["eval", "--checkpoint", "c", "--data", "d", "--dataset", "voc-photos"]).is_err());
    }

    #[test]
    fn missing_or_bad_checkpoint_and_missing_dataset_are_named() {
        let dir = std::env::temp_dir().join(format!("mmformer-eval-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("no-such-model.safetensors");
        let mut a = parse(&[]);
        a.checkpoint = missing.clone();
        let e = format!("{:#}", run(&a).unwrap_err());
        assert!(e.contains("not found") && e.contains("no-such-model.safetensors"), "{e}");

        let bad = dir.join("garbage.pth");
        std::fs::write(&bad, b"this is not a checkpoint at all").unwrap();
        a.checkpoint = bad;
        let e = format!("{:#}", run(&a).unwrap_err());
        assert!(e.contains("garbage.pth"), "{e}");

        a.data = Some(dir.join("no-such-dataset"));
        let e = format!("{:#}", open_dataset(&a).unwrap_err());
        assert!(e.contains("no-such-dataset") && e.contains("not found"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
