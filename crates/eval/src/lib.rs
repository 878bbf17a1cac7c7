//! Evaluation of few-shot segmentation: the benchmark metrics with the official accumulation
//! (per-class mIoU, FB-IoU; spec §5.4), the side-by-side report of heuristic baseline / ours /
//! oracle, and PNG overlays so a person can see what happened.
//!
//! Everything here works on binary masks (`u8`, 1 = foreground) and labels (0/1, 255 = ignore):
//! the model crates produce the masks, this crate only scores and draws them.

mod metrics;
mod overlay;
mod report;
mod seeds;

pub use metrics::{EpisodeIou, FewShotMetrics, MetricsSummary};
pub use overlay::{episode_overlay, episode_overlay_methods, tint, GROUND_TRUTH_COLOR, PREDICTION_COLOR, SUPPORT_COLOR};
pub use report::{markdown_table, BenchmarkReport, MethodScores};
pub use seeds::{markdown_summary, ClassOverSeeds, MethodOverSeeds, SeedStats, SummaryRow};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("episode {episode}: prediction has {pred} pixels but the label has {label}")]
    SizeMismatch { episode: usize, pred: usize, label: usize },
    #[error("episode {episode}: class {class} is not one of this fold's classes {classes:?}")]
    UnknownClass { episode: usize, class: u32, classes: Vec<u32> },
    #[error("{path}: {msg}")]
    File { path: std::path::PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, EvalError>;
