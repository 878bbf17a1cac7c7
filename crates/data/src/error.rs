//! The one error type of this crate. Every variant that concerns a file names it, so a user with a
//! broken dataset learns which file to fix.

use std::path::PathBuf;

/// Errors from reading datasets, building lists and sampling episodes.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot decode image: {reason}")]
    ImageDecode { path: PathBuf, reason: String },
    #[error("{path}: cannot decode mask PNG: {reason}")]
    MaskDecode { path: PathBuf, reason: String },
    #[error("{path}: cannot write PNG: {reason}")]
    PngWrite { path: PathBuf, reason: String },
    #[error("{path}: mask is {mask_w}x{mask_h} but its image {image} is {image_w}x{image_h}")]
    SizeMismatch {
        path: PathBuf,
        image: PathBuf,
        mask_w: u32,
        mask_h: u32,
        image_w: u32,
        image_h: u32,
    },
    #[error("{path}: pixel value {value} is not a class id of this dataset (classes are 1..={num_classes}, 0 = background, 255 = ignore)")]
    UnknownClassId { path: PathBuf, value: u8, num_classes: usize },
    #[error("unknown class id {class_id}: this dataset has classes 1..={num_classes}")]
    UnknownClass { class_id: u16, num_classes: usize },
    #[error("{path}: {reason}")]
    BadList { path: PathBuf, reason: String },
    #[error("{path}: invalid JSON: {reason}")]
    BadJson { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadLayout { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadArray { path: PathBuf, reason: String },
    #[error("dataset {dataset}: fold {fold} is out of range (folds 0..{num_folds})")]
    FoldOutOfRange { dataset: String, fold: usize, num_folds: usize },
    #[error("dataset {dataset}: {what} is empty: {reason}")]
    Empty { dataset: String, what: String, reason: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("class {class_id} ({class_name}): no support image reached {min_area} class pixels after augmentation ({tries} augmentations of {images} images tried)")]
    SupportAreaUnsatisfiable {
        class_id: u16,
        class_name: String,
        min_area: f64,
        tries: usize,
        images: usize,
    },
    #[error("class {class_id} ({class_name}) has no support image other than the query {query}")]
    NoSupportCandidate { class_id: u16, class_name: String, query: String },
    #[error("no query image with a usable base class found after {tries} tries (fold {fold})")]
    NoUsableQuery { fold: usize, tries: usize },
    #[error("{source_name}: invalid episode list: {reason}")]
    BadEpisodes { source_name: String, reason: String },
    #[error(transparent)]
    Shard(#[from] crate::shard::ShardError),
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, DataError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.into();
    move |source| DataError::Io { path, source }
}
