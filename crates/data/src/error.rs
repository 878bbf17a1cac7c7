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
    /// Refused from the header alone, before the frame is allocated (see [`crate::limits`]).
    #[error("{path}: {what} declares {width}x{height} pixels, {reason}")]
    TooLarge { path: PathBuf, what: String, width: u64, height: u64, reason: String },
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
    /// Proposal shards store labels as 8-bit class ids (255 = ignore); a wider id would be
    /// silently wrapped onto another class, so it is refused when the view is cached.
    #[error("{sample}: class id {class_id} does not fit the 8-bit class-id labels of proposal shards (ids 1..=254; 255 is ignore): cache a dataset of at most 254 classes (e.g. a subset of its class folders)")]
    ClassIdTooWide { sample: String, class_id: u16 },
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

/// A decoder's message as one line: some (the JPEG decoder's) end in a newline or span several,
/// and our errors are one line each.
pub(crate) fn one_line(message: impl std::fmt::Display) -> String {
    message.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}
