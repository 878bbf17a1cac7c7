//! The one error type of the crate. Every weight-file error names the file, and every tensor
//! error names the key (as spelled in the file) and the expected vs found shape.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{}: not a weight file (expected a PyTorch .pth in zip or legacy format, or safetensors); {found}",
        file.display()
    )]
    NotAWeightFile { file: PathBuf, found: String },

    #[error("{}: truncated or corrupt weight file: {detail}", file.display())]
    Corrupt { file: PathBuf, detail: String },

    #[error("{}: missing tensor `{key}` (expected shape {expected:?})", file.display())]
    MissingKey {
        file: PathBuf,
        key: String,
        expected: Vec<usize>,
    },

    #[error("{}: tensor `{key}` has shape {found:?}, expected {expected:?}", file.display())]
    ShapeMismatch {
        file: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A pickle naming a global (a function or class) outside the whitelist of a state dict:
    /// nothing of it was imported or run. `key` is where the file holds it.
    #[error(
        "{}: `{key}` refers to the global `{global}`, which a weight file has no use for: refused (not on the state-dict whitelist; nothing was executed)",
        file.display()
    )]
    ForbiddenGlobal {
        file: PathBuf,
        key: String,
        global: String,
    },

    /// A tensor that exists but cannot be used (e.g. an unsupported dtype).
    #[error("{}: tensor `{key}`: {detail}", file.display())]
    BadTensor {
        file: PathBuf,
        key: String,
        detail: String,
    },

    /// A tensor requested from a candle `VarBuilder` (no file behind it) that it could not give.
    #[error("weights `{key}` (expected shape {expected:?}): {detail}")]
    VarBuilder {
        key: String,
        expected: Vec<usize>,
        detail: String,
    },

    #[error("input: {0}")]
    Input(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, BackboneError>;
