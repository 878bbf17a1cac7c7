//! The crate's error and a `context` helper, so failures name the file, sample or step.

use std::path::PathBuf;

/// Any error a model or a reader returned, kept as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("episode {episode}: prediction has {pred} pixels but the label has {label}")]
    SizeMismatch { episode: usize, pred: usize, label: usize },
    #[error("episode {episode}: class {class} is not one of this fold's classes {classes:?}")]
    UnknownClass { episode: usize, class: u32, classes: Vec<u32> },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// A request that cannot be carried out (bad option, empty split, ...).
    #[error("{0}")]
    Invalid(String),
    /// `context` says what was being done; the cause follows it in the message.
    #[error("{context}: {source}")]
    Context { context: String, source: BoxError },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Train(#[from] train::TrainError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, EvalError>;

/// `.context(..)` / `.with_context(|| ..)` on results and options, as `anyhow` has them.
pub trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<BoxError>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| EvalError::Context { context: context.into(), source: e.into() })
    }
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| EvalError::Context { context: f().into(), source: e.into() })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| EvalError::Invalid(context.into()))
    }
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| EvalError::Invalid(f().into()))
    }
}

/// Returns an [`EvalError::Invalid`] with a formatted message.
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::EvalError::Invalid(format!($($arg)*))) };
}
pub(crate) use bail;
