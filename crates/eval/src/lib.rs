//! Evaluation of few-shot segmentation: the benchmark metrics with the official accumulation
//! (per-class mIoU, FB-IoU; spec §5.4), the side-by-side report of heuristic baseline / ours /
//! oracle, PNG overlays so a person can see what happened, and the evaluation engine
//! ([`evaluate`]) that runs any [`FewShotModel`] over fixed test episodes under both label
//! protocols and writes `report.json`, `report.md`, `episodes.jsonl` and the overlays.
//!
//! The metrics work on binary masks (`u8`, 1 = foreground) and labels (0/1, 255 = ignore); the
//! engine gets them from the model through [`FewShotModel`], on the model's device.

pub mod engine;
mod error;
mod metrics;
mod model;
mod overlay;
mod report;
mod seeds;
pub mod tensors;

pub use metrics::{EpisodeIou, FewShotMetrics, MetricsSummary};
pub use overlay::{episode_overlay, episode_overlay_methods, header_height as overlay_header_height, tint, GROUND_TRUTH_COLOR, PREDICTION_COLOR, SUPPORT_COLOR};
pub use report::{markdown_table, BenchmarkReport, MethodScores};
pub use seeds::{markdown_summary, ClassOverSeeds, MethodOverSeeds, SeedStats, SummaryRow};
pub use engine::{evaluate, evaluate_with, seed_sequence, validation_seed, EvalOptions, EvalReport, EvalTuning, FoldSel, ShotResult, MIOU_RULE};
pub use error::{BoxError, Context, EvalError, Result};
pub use model::FewShotModel;
pub use tensors::{binary, images_to_tensor, labels_to_tensor, oracle_mask, upsampled_proposals};

