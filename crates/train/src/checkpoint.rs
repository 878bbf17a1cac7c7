//! Checkpoints: `<dir>/iter_<N>/{model,optimizer}.safetensors + state.json`, each written into a
//! temporary folder that is renamed into place only once complete, with sha256 sums in
//! `state.json`, so a killed run never leaves a checkpoint that reads as valid.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::{AdamW, Result, TrainError};

pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// What was trained (e.g. `pos`, `mm`), so a checkpoint of the wrong stage is refused.
    pub kind: String,
    /// Iterations completed.
    pub iter: u64,
    pub optimizer_step: u64,
    pub best_metric: Option<f64>,
    pub best_iter: Option<u64>,
    /// The run's configuration, to refuse resuming with a different one.
    pub config: serde_json::Value,
    #[serde(default)]
    pub model_sha256: String,
    #[serde(default)]
    pub optimizer_sha256: String,
}

/// One complete checkpoint on disk.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
}

impl Checkpoint {
    pub fn model_path(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }

    /// Model tensors, after checking the file against the recorded sha256.
    pub fn model(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        load_checked(&self.model_path(), &self.state.model_sha256, device)
    }

    pub fn optimizer(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        load_checked(&self.dir.join("optimizer.safetensors"), &self.state.optimizer_sha256, device)
    }

    /// Restores `opt` from this checkpoint.
    pub fn restore_optimizer(&self, opt: &mut AdamW, device: &Device) -> Result<()> {
        let t = self.optimizer(device)?;
        opt.load_state(&t, self.state.optimizer_step)
            .map_err(|msg| TrainError::Checkpoint { path: self.dir.join("optimizer.safetensors"), msg })
    }
}

/// Hex sha256 of a file (checkpoints record it; other tools reuse it).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).map_err(|e| TrainError::Checkpoint { path: path.into(), msg: e.to_string() })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn load_checked(path: &Path, sha: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
    let got = sha256_file(path)?;
    if got != sha {
        return Err(TrainError::Checkpoint {
            path: path.into(),
            msg: format!("checksum mismatch (file is corrupt or was modified): sha256 {got}, recorded {sha}"),
        });
    }
    candle_core::safetensors::load(path, device)
        .map_err(|e| TrainError::Checkpoint { path: path.into(), msg: format!("unreadable safetensors: {e}") })
}

/// The checkpoints of one run.
pub struct CheckpointStore {
    dir: PathBuf,
    /// How many periodic checkpoints to keep (the best one is kept separately).
    keep: usize,
}

impl CheckpointStore {
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Self {
        Self { dir: dir.into(), keep: keep.max(1) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a checkpoint for `state.iter` atomically and prunes old ones.
    pub fn save(&self, model: &HashMap<String, Tensor>, opt: &AdamW, state: TrainState) -> Result<PathBuf> {
        let name = format!("iter_{:08}", state.iter);
        let path = self.write_dir(&name, model, opt, state)?;
        self.prune()?;
        Ok(path)
    }

    /// Writes (replaces) the `best` checkpoint.
    pub fn save_best(&self, model: &HashMap<String, Tensor>, opt: &AdamW, state: TrainState) -> Result<PathBuf> {
        self.write_dir("best", model, opt, state)
    }

    fn write_dir(&self, name: &str, model: &HashMap<String, Tensor>, opt: &AdamW, mut state: TrainState) -> Result<PathBuf> {
        fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!("{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        let model_path = tmp.join("model.safetensors");
        candle_core::safetensors::save(model, &model_path)?;
        let (opt_tensors, step) = opt.state();
        let opt_path = tmp.join("optimizer.safetensors");
        candle_core::safetensors::save(&opt_tensors, &opt_path)?;
        state.format_version = CHECKPOINT_FORMAT_VERSION;
        state.optimizer_step = step;
        state.model_sha256 = sha256_file(&model_path)?;
        state.optimizer_sha256 = sha256_file(&opt_path)?;
        fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&state).expect("state serialises"))?;
        for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            fs::File::open(tmp.join(f))?.sync_all()?;
        }
        let dest = self.dir.join(name);
        // Rename the old one aside first: a directory cannot be renamed over a non-empty one.
        let old = self.dir.join(format!("{name}.old-{}", std::process::id()));
        if dest.exists() {
            fs::rename(&dest, &old)?;
        }
        fs::rename(&tmp, &dest)?;
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        Ok(dest)
    }

    fn periodic(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(&self.dir) else { return Ok(out) };
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            // Temporary folders of a killed run have a suffix and are never considered.
            if let Some(n) = name.strip_prefix("iter_").and_then(|n| n.parse::<u64>().ok()) {
                out.push((n, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn prune(&self) -> Result<()> {
        let all = self.periodic()?;
        if all.len() > self.keep {
            for (_, p) in &all[..all.len() - self.keep] {
                fs::remove_dir_all(p)?;
            }
        }
        Ok(())
    }

    /// Opens a checkpoint folder and checks its state against `kind`.
    pub fn open(dir: &Path, kind: &str) -> Result<Checkpoint> {
        let sp = dir.join("state.json");
        let text = fs::read_to_string(&sp).map_err(|e| TrainError::Checkpoint { path: sp.clone(), msg: e.to_string() })?;
        let state: TrainState = serde_json::from_str(&text)
            .map_err(|e| TrainError::Checkpoint { path: sp.clone(), msg: format!("malformed state: {e}") })?;
        if state.format_version != CHECKPOINT_FORMAT_VERSION {
            return Err(TrainError::Checkpoint {
                path: sp,
                msg: format!("format version {} (this build reads {CHECKPOINT_FORMAT_VERSION})", state.format_version),
            });
        }
        if state.kind != kind {
            return Err(TrainError::Checkpoint { path: sp, msg: format!("is a `{}` checkpoint, expected `{kind}`", state.kind) });
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), state })
    }

    /// The newest complete periodic checkpoint, if any.
    pub fn latest(&self, kind: &str) -> Result<Option<Checkpoint>> {
        match self.periodic()?.pop() {
            Some((_, p)) => Self::open(&p, kind).map(Some),
            None => Ok(None),
        }
    }

    pub fn best(&self, kind: &str) -> Result<Option<Checkpoint>> {
        let p = self.dir.join("best");
        if p.exists() {
            Self::open(&p, kind).map(Some)
        } else {
            Ok(None)
        }
    }
}
