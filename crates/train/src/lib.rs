//! The training machinery shared by both stages (written once): the training loop ([`train()`]:
//! resume, step, log, evaluate, checkpoint; a stage supplies its loss and its evaluation through
//! [`Stage`]), AdamW with parameter groups, the poly learning-rate schedule, global
//! gradient-norm clipping, atomic checkpoints with exact resume, seeded initialisation, a
//! JSON-lines log and progress reporting ([`Progress`]) that a command line turns into bars.

mod checkpoint;
mod init;
mod log;
mod optim;
mod progress;
mod run;
mod vars;

pub use checkpoint::{sha256_file, Checkpoint, CheckpointStore, TrainState};
pub use init::{seeded_randn, seeded_var_builder};
pub use log::{peak_rss_mb, JsonlLog};
pub use optim::{clip_coefficient, clip_grad_norm, default_no_decay, grad_norm, AdamW, AdamWConfig, NamedVar, PolyLr};
pub use progress::{NotesToStderr, Progress, Silent};
pub use run::{apply_step, checkpoint_store, resume_or_start, save_checkpoints, train, Evaluation, LoopConfig, RunSpec, Stage, Step, StepLoss};
pub use vars::{load_into, named_vars, varmap_tensors};

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
