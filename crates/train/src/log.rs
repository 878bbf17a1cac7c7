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

    /// Writes one record. An object record also gets `peak_rss_mb`, the process's peak resident
    /// memory so far, so every command's log says what it needed.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        let mut record = record.clone();
        if let (Some(obj), Some(mb)) = (record.as_object_mut(), peak_rss_mb()) {
            obj.entry("peak_rss_mb").or_insert(serde_json::json!(mb));
        }
        let line = serde_json::to_string(&record).expect("JSON values serialise");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::File { path: self.path.clone(), msg: format!("cannot write log: {e}") })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The process's peak resident set size in MiB (`getrusage`), or `None` where the platform does
/// not report it.
pub fn peak_rss_mb() -> Option<u64> {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let max = usage.ru_maxrss.max(0) as u64;
    // Linux reports KiB, macOS bytes.
    Some(if cfg!(target_os = "macos") { max >> 20 } else { max >> 10 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_object_record_carries_the_peak_memory() {
        let dir = std::env::temp_dir().join(format!("jsonl-peak-{}", std::process::id()));
        let path = dir.join("log.jsonl");
        // Touch 64 MiB so the peak is at least that.
        let big = vec![1u8; 64 << 20];
        assert_eq!(big.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
        let mut log = JsonlLog::append(&path).unwrap();
        log.write(&serde_json::json!({"event": "train", "iter": 1})).unwrap();
        log.write(&serde_json::json!({"event": "done", "peak_rss_mb": 7})).unwrap();
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let first = lines[0]["peak_rss_mb"].as_u64().expect("peak_rss_mb added");
        assert!(first >= 64, "peak {first} MiB after touching 64 MiB");
        assert_eq!(lines[0]["iter"], 1);
        // A value the caller set is kept.
        assert_eq!(lines[1]["peak_rss_mb"], 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
