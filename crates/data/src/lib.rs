//! Few-shot segmentation data for MM-Former: dataset readers (PASCAL-5i and anything in the VOC
//! layout, COCO-20i, COCO->PASCAL, FSS-1000, users' own folders, a few real VOC photos for smoke
//! tests), the synthetic dataset, PFENet fold lists, training episode sampling with the paper's
//! augmentation, and fixed, exportable test episodes.
//!
//! The crate stays free of any tensor library: images come out as [`NormalizedImage`] (CHW
//! `f32`, ImageNet mean/std on the 0–255 scale) and labels as [`Label`] (`u8` per pixel, 255 =
//! ignore); callers turn them into tensors.
//!
//! ```no_run
//! # fn main() -> data::Result<()> {
//! use data::{AugmentConfig, FewShotDataset, TestEpisodes, TrainEpisodeSampler, VocOptions};
//! let ds = FewShotDataset::open_voc("VOC2012".as_ref(), &VocOptions::default())?;
//! // or FewShotDataset::open(&DatasetSource::...) for COCO, FSS-1000, folders, ...
//! let mut sampler = TrainEpisodeSampler::new(&ds, 0, 1, 123, AugmentConfig::paper())?;
//! let batch = sampler.next_batch(8)?; // query/support images + binary labels, class ids
//! let test = TestEpisodes::generate_default(&ds, 0, 1)?; // 1000 episodes, official seed
//! let first = test.load(&ds, 0, 480)?;
//! # let _ = (batch, first); Ok(()) }
//! ```
//!
//! # Your own data: the folder layout
//!
//! ```text
//! <root>/<class name>/<name>.jpg    an image (.jpg, .jpeg or .png)
//! <root>/<class name>/<name>.png    its mask, same size, next to it
//! ```
//!
//! One folder per class; class ids follow the sorted folder names (1..K); at least 4 classes (4
//! folds, contiguous blocks). A mask is a single-channel PNG: 8-bit grayscale (0 = background,
//! any other value = the object, so 0/1 and 0/255 masks both work) or a palette PNG (index 0 =
//! background, 255 = ignore, any other index = the object); an RGB mask counts a non-black pixel
//! as the object. An image whose stem ends in `_mask` is never taken as an image. Every image is
//! in both the train and the val split; folds separate the classes. Open it with
//! [`FewShotDataset::open_folder`]. FSS-1000 uses the same layout with numbered files and is
//! opened with [`FewShotDataset::open_fss`].
//!
//! # Broken and hostile files
//!
//! Every reader refuses what it cannot read faithfully with a one-line [`DataError`] naming the
//! file: an image or mask whose header declares more pixels than the limit (checked before the
//! frame is allocated; default 8192² = 64 Mi pixels, `MMFORMER_MAX_PIXELS` or
//! [`set_max_pixels`] to change it, see [`limits`]), a JPEG or PNG cut short (never decoded with
//! its missing part filled in), a shard index that fails its checksum or points outside its
//! shards ([`shard`]). Proposal shards store 8-bit class ids, so caching a class id above 254 is
//! refused ([`DataError::ClassIdTooWide`]).

pub mod augment;
pub mod cached;
pub mod coco;
mod complete;
pub mod dataset;
pub mod episodes;
pub mod error;
pub mod folders;
pub mod label;
pub mod limits;
pub mod photos;
pub mod rng;
pub mod shard;
pub mod synthetic;
pub mod voc;

pub use augment::{
    augment_train, test_view, AugmentConfig, NormalizedImage, IMAGENET_MEAN, IMAGENET_STD, PAPER_CROP_SIZE,
};
pub use cached::{ShardDataset, ShardEpisode, ShardEpisodeSampler, ShardEpisodeSpec};
pub use coco::{CocoOptions, CocoSplitFiles};
pub use dataset::{
    build_fold_list, ClassId, ClassPresence, DatasetKind, DatasetSource, FewShotDataset, FoldList, FoldListFile, FoldScheme, SampleRecord,
    SampleSource, Split, COCO_TEST_SEEDS, COCO_TO_PASCAL_TEST_SEED, PASCAL_TEST_SEEDS, PFENET_MIN_CLASS_PIXELS,
    VOC_CLASSES,
};
pub use episodes::{Episode, EpisodeSpec, PreparedView, TestEpisodes, TrainEpisodeSampler, DEFAULT_TEST_EPISODES};
pub use error::{DataError, Result};
pub use label::{read_label_png, write_label_png, Label, MaskEncoding, IGNORE};
pub use limits::{max_pixels, set_max_pixels, DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV};
pub use rng::SeededRng;
pub use folders::FolderOptions;
pub use voc::VocOptions;
