//! Mask Matching module (stage 2): self- and cross-alignment, masked-GAP prototypes, the matching MLP and the final mask.
//!
//! Follows the official V1 `MMFormer` (spec §3): raw backbone features `[res5, res4, res3]`
//! → parameter-free self-alignment → 1×1 channel reduction (`conv_{i}`) → support masking
//! (`addmask`) → cross-alignment (`crossat_{i}`) → masked-GAP prototypes → cosine → matching MLP
//! (`fc1`, `fc2`) → `out = Σ c·M`. The POS that produces the proposals is frozen and lives
//! elsewhere; this crate consumes its logits.

pub mod config;
pub mod cross_align;
pub mod model;
pub mod prototype;
pub mod self_align;

pub use config::MmConfig;
pub use model::{LevelFeatures, MaskMatching, MatchOutput, MmOutput, QueryPass, Trace};
