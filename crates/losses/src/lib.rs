//! Training losses: Hungarian matching with point sampling, mask BCE/dice, weighted dice and the L_co term.
//!
//! Stage 1 (spec §2.3) is the Mask2Former set criterion without a class term plus MM-Former's
//! oracle few-shot loss:
//! - [`targets`]: class-agnostic GT masks from a semantic label (novel classes removed).
//! - [`points`]: the uniform point draws (seeded RNG or given coordinates, for parity) and the
//!   uncertainty-based importance sampling.
//! - [`mask`]: point-level mask BCE / dice losses and the matcher's pairwise cost versions.
//! - [`matcher`]: [`matcher::HungarianMatcher`] and the assignment solver.
//! - [`stage1`]: [`stage1::Stage1Criterion`], the whole stage-1 loss with deep supervision.
//! - [`fewshot`]: the weighted dice loss and soft IoU (used here for the oracle term) and L_co.

pub mod fewshot;
pub mod mask;
pub mod matcher;
pub mod points;
pub mod stage1;
pub mod targets;

pub use matcher::{linear_sum_assignment, HungarianMatcher, ImageMatch};
pub use points::{FixedPoints, PointDraw, PointSource, RngPoints};
pub use stage1::{LossTerm, OracleLoss, PredictionLosses, Stage1Config, Stage1Criterion, Stage1Losses};
pub use targets::{mask_novel_classes, stage1_target_classes, stage1_targets};
