//! The training machinery shared by both stages (written once): AdamW with parameter groups, the
//! poly learning-rate schedule, global gradient-norm clipping, atomic checkpoints with exact
//! resume, a JSON-lines log and the progress bar.

mod checkpoint;
mod init;
mod log;
mod optim;

pub use init::seeded_var_builder;
pub use checkpoint::{sha256_file, Checkpoint, CheckpointStore, TrainState};
pub use log::JsonlLog;
pub use optim::{clip_grad_norm, default_no_decay, AdamW, AdamWConfig, NamedVar, PolyLr};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {msg}")]
    File { path: std::path::PathBuf, msg: String },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: std::path::PathBuf, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// A progress bar for `total` iterations starting at `start`, showing loss, lr, it/s and ETA.
pub fn progress_bar(total: u64, start: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ({per_sec}, ETA {eta})",
        )
        .expect("static template"),
    );
    pb.set_prefix(what.to_string());
    pb.set_position(start);
    pb
}
