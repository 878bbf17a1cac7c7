//! Machine-readable training logs: one JSON object per line, flushed as written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Result, TrainError};

pub struct JsonlLog {
    path: PathBuf,
    file: File,
}

impl JsonlLog {
    /// Opens `path` for appending (a resumed run continues the same log).
    pub fn append(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::File { path: path.to_path_buf(), msg: format!("cannot open log: {e}") })?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        let line = serde_json::to_string(record).expect("JSON values serialise");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::File { path: self.path.clone(), msg: format!("cannot write log: {e}") })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
