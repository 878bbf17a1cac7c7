//! MM-Former in Rust: few-shot segmentation with the Mask Matching Transformer.
//!
//! Show it one or a few support images with a mask of a class it has never been trained on, and
//! it segments that class in query images. This crate is the library a program depends on:
//!
//! - [`MmFormer`]: the whole model (frozen backbone → potential objects segmenter → mask
//!   matching), loaded from our safetensors checkpoints or an official `.pth`
//!   ([`MmFormer::load`]), saved with [`MmFormer::save`], on any candle [`Device`].
//! - Inference ([`segment`]): [`MmFormer::segment`] for one query, [`SupportSet`] to encode the
//!   supports once and segment many queries ([`SupportSet::segment_batch`]), and the episode
//!   pieces ([`MmFormer::query`], [`MmFormer::support`], [`MmFormer::matching`]).
//! - The two training stages and the boundary between them: [`stage1::train_pos`],
//!   [`cache::cache_proposals`] (proposal shards on disk), [`stage2::train_mm`]; evaluation
//!   through [`eval::evaluate`] on an `MmFormer`.
//! - [`Preset`]s (the paper's ResNet-50 model at 480², a CPU-sized one at 256²) and
//!   [`parse_device`] (`cpu`, `cuda:N`).
//!
//! Long jobs report through [`Progress`] (a command line draws bars from it) and write JSON
//! lines next to their outputs.
//!
//! # Example
//!
//! ```
//! # fn main() -> mmformer::Result<()> {
//! use mmformer::{MmFormer, Preset, SupportImage};
//! let device = mmformer::parse_device("cpu")?;
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("model.safetensors");
//! # MmFormer::synthetic(Preset::Cpu, 0, &device)?.save(&path)?;
//! let model = MmFormer::load(&path, &device)?;
//! // A support image and its mask (1 = the object); real programs read them with
//! // `mmformer::read_image` and `mmformer::read_support_mask`.
//! let image = image::RgbImage::from_fn(120, 90, |x, y| image::Rgb([(x * 2) as u8, (y * 2) as u8, 90]));
//! let mask = data::Label::new(120, 90, (0..90 * 120).map(|i| u8::from(i % 120 > 40)).collect());
//! let support = SupportImage::new(image.clone(), mask)?;
//! let result = model.segment(&image, &[support])?;
//! assert_eq!((result.mask.width(), result.mask.height()), (120, 90));
//! assert_eq!(result.proposal_scores.len(), model.meta.preset.pos_config().num_queries);
//! # Ok(()) }
//! ```

pub mod bench;
pub mod cache;
pub mod datasets;
pub mod fuzz;
mod device;
mod error;
pub mod model;
pub mod prefetch;
mod preset;
pub mod segment;
pub mod stage1;
pub mod stage2;

pub use candle_core::Device;
pub use device::{device_name, parse_device, CUDA_BUILD};
pub use error::{BoxError, Context, Error, Result};
pub use model::{read_meta, save_model, MmFormer, ModelMeta, MODEL_FORMAT};
pub use preset::{Preset, Schedule};
pub use segment::{read_image, read_support_mask, Segmentation, SupportImage, SupportSet};
pub use train::{NotesToStderr, Progress, Silent};

pub use {backbone, data, eval, losses, mm, ops, pos, train};

/// Consecutive non-finite training steps tolerated before a run stops.
pub const MAX_SKIPPED_STEPS: u32 = 10;

/// Training batches prepared ahead of the device by the prefetch thread.
pub const PREFETCH_DEPTH: usize = 2;

/// The shared training loop's schedule (both stages).
fn loop_config(iters: u64, lr: f64, clip: f64, eval_every: u64, log_every: u64) -> train::LoopConfig {
    train::LoopConfig { iters, lr, clip, eval_every, log_every, max_skipped_steps: MAX_SKIPPED_STEPS }
}

/// A run's options as stored in its checkpoints (the resume fingerprint): everything but the
/// fields that may change across a resume (`out`, `log_every`, `device`).
pub fn run_config(options: &impl serde::Serialize) -> serde_json::Value {
    let mut v = serde_json::to_value(options).expect("options serialise");
    if let Some(o) = v.as_object_mut() {
        for k in ["out", "log_every", "device"] {
            o.remove(k);
        }
    }
    v
}

/// Writes `options` as `<dir>/config.json`, so a run can be repeated (`--config`).
pub fn write_config(dir: &std::path::Path, options: &impl serde::Serialize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_vec_pretty(options)?).with_context(|| format!("cannot write {}", p.display()))
}
