//! The training loop both stages share: resume from the newest checkpoint, then per iteration
//! the stage's loss, backward, one global gradient-norm clip, an AdamW step under the poly
//! schedule; a JSON line every `log_every` iterations; an evaluation, a checkpoint and (on a new
//! best) the `best` checkpoint every `eval_every`. A stage only says how to compute its loss and
//! how to evaluate ([`Stage`]).
//!
//! A step whose loss or gradient norm is not finite is skipped (the weights and optimizer are
//! left as they were) and logged with the first offending parameter; after
//! [`LoopConfig::max_skipped_steps`] consecutive skips the run stops with an error, keeping the
//! last good checkpoint.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::{
    named_vars, varmap_tensors, AdamW, CheckpointStore, JsonlLog, NamedVar, PolyLr, Progress, Result, TrainError, TrainState,
};

/// Periodic checkpoints kept besides `best`.
const KEEP_CHECKPOINTS: usize = 2;

/// The schedule of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopConfig {
    pub iters: u64,
    /// Base learning rate of the poly schedule.
    pub lr: f64,
    /// Global gradient-norm clip (official 0.01).
    pub clip: f64,
    /// Iterations between evaluations + checkpoints.
    pub eval_every: u64,
    /// Iterations between `train` log lines.
    pub log_every: u64,
    /// Consecutive non-finite steps tolerated before the run stops.
    pub max_skipped_steps: u32,
}

/// What one iteration of a stage computes.
pub struct StepLoss {
    /// The scalar that is minimised.
    pub total: Tensor,
    /// Named scalar parts for the log (read from the device only on log iterations).
    pub parts: Vec<(String, Tensor)>,
}

/// One validation of a stage.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Higher is better; selects the `best` checkpoint.
    pub metric: f64,
    /// Fields of the `eval` log line (a JSON object; `event` and `iter` are added).
    pub record: serde_json::Value,
    /// One line for a person, e.g. `oracle mIoU 54.80 on 100 validation episodes`.
    pub summary: String,
}

/// A training stage as the loop sees it.
pub trait Stage {
    type Error: From<TrainError> + From<candle_core::Error>;

    /// The loss of iteration `iter`. It must depend only on the run's seed and `iter`, so that a
    /// resumed run sees what the uninterrupted one would.
    fn loss(&mut self, iter: u64) -> std::result::Result<StepLoss, Self::Error>;

    /// Validation of the current weights.
    fn evaluate(&mut self) -> std::result::Result<Evaluation, Self::Error>;

    /// Called after a new `best` checkpoint was written (e.g. to export the model).
    fn on_new_best(&mut self, _state: &TrainState, _eval: &Evaluation) -> std::result::Result<(), Self::Error> {
        Ok(())
    }
}

/// Where a run lives and what identifies it.
pub struct RunSpec<'a> {
    /// `pos`, `mm`: a checkpoint of another kind is refused.
    pub kind: &'a str,
    /// The run's configuration as stored in its checkpoints; a resume must match it.
    pub config: serde_json::Value,
    /// Run folder: `checkpoints/`, `log.jsonl`.
    pub out: &'a Path,
    pub device: &'a Device,
}

/// The checkpoints of a run folder.
pub fn checkpoint_store(out: &Path) -> CheckpointStore {
    CheckpointStore::new(out.join("checkpoints"), KEEP_CHECKPOINTS)
}

/// Trains the variables of `vm` with `opt` until `cfg.iters`, resuming from the run folder's
/// newest checkpoint when it was made with the same configuration. Returns the final state
/// (best metric and iteration included).
pub fn train<S: Stage>(
    stage: &mut S,
    spec: &RunSpec,
    vm: &VarMap,
    opt: &mut AdamW,
    cfg: &LoopConfig,
    progress: &dyn Progress,
) -> std::result::Result<TrainState, S::Error> {
    if cfg.iters == 0 || cfg.eval_every == 0 || cfg.log_every == 0 {
        return Err(TrainError::File {
            path: spec.out.to_path_buf(),
            msg: format!("iters, eval_every and log_every must be >= 1 (got {}, {}, {})", cfg.iters, cfg.eval_every, cfg.log_every),
        }
        .into());
    }
    std::fs::create_dir_all(spec.out).map_err(|e| TrainError::File { path: spec.out.to_path_buf(), msg: format!("cannot create: {e}") })?;
    let store = checkpoint_store(spec.out);
    let vars = named_vars(vm);
    let mut state = resume_or_start(&store, spec.kind, &spec.config, vm, opt, spec.device, progress)?;
    let mut log = JsonlLog::append(&spec.out.join("log.jsonl"))?;
    let sched = PolyLr::new(cfg.lr, cfg.iters);
    if state.iter == 0 {
        let e = stage.evaluate()?;
        log.write(&eval_line(0, &e))?;
        progress.note(&format!("untrained: {}", e.summary));
    }

    progress.start(spec.kind, cfg.iters, state.iter);
    let mut window = Instant::now();
    let mut skipped_in_a_row = 0u32;
    // The driver's view of device memory after each step (None on CPU); the log keeps the peak.
    let mut gpu_mem_peak: Option<f64> = None;
    for it in state.iter..cfg.iters {
        let loss = stage.loss(it)?;
        let lr = sched.lr(it);
        let step = apply_step(&loss.total, &vars, opt, cfg.clip, lr)?;
        // The loss tensors hold the whole forward graph: keep only the logged numbers, so the
        // activations are freed before the log and the evaluation below (at the paper preset
        // the stage-1 run's peak came from evaluating with the last step's graph still alive).
        let logged = (it + 1) % cfg.log_every == 0 || it + 1 == cfg.iters;
        let parts = if logged {
            loss.parts.iter().map(|(name, t)| Ok((name.clone(), t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?))).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        drop(loss);
        if let Some(m) = ops::device_memory_mb(spec.device) {
            gpu_mem_peak = Some(gpu_mem_peak.map_or(m, |p| p.max(m)));
        }
        state.iter = it + 1;
        let (value, gnorm) = match step {
            Step::Applied { loss, grad_norm } => {
                skipped_in_a_row = 0;
                (loss, grad_norm)
            }
            Step::Skipped { loss, grad_norm, parameter } => {
                skipped_in_a_row += 1;
                log.write(&serde_json::json!({"event": "skipped_step", "iter": state.iter, "loss": json_f64(loss),
                    "grad_norm": json_f64(grad_norm), "parameter": parameter, "in_a_row": skipped_in_a_row}))?;
                progress.note(&format!(
                    "iteration {}: non-finite step (loss {loss}, gradient norm {grad_norm}, first at `{}`), skipped",
                    state.iter,
                    parameter.as_deref().unwrap_or("the loss")
                ));
                if skipped_in_a_row >= cfg.max_skipped_steps {
                    return Err(TrainError::File {
                        path: store.dir().to_path_buf(),
                        msg: format!(
                            "{skipped_in_a_row} non-finite steps in a row (last at iteration {}); stopping. The last good checkpoint is kept here; lower the learning rate or check the data",
                            state.iter
                        ),
                    }
                    .into());
                }
                (loss, grad_norm)
            }
        };
        progress.advance(state.iter, &format!("loss {value:.3} lr {lr:.2e}"));
        if logged {
            let secs = window.elapsed().as_secs_f64() / cfg.log_every as f64;
            window = Instant::now();
            let mut rec = serde_json::json!({"event": "train", "iter": state.iter, "loss": json_f64(value), "lr": lr,
                "grad_norm": json_f64(gnorm), "sec_per_iter": secs});
            for (name, v) in &parts {
                rec[name] = json_f64(*v);
            }
            if let Some(m) = gpu_mem_peak {
                rec["gpu_mem_mb"] = serde_json::json!(m.round());
            }
            log.write(&rec)?;
        }
        if state.iter % cfg.eval_every == 0 || state.iter == cfg.iters {
            let e = stage.evaluate()?;
            log.write(&eval_line(state.iter, &e))?;
            progress.note(&format!("iter {}: {}", state.iter, e.summary));
            if save_checkpoints(&store, vm, opt, &mut state, e.metric)? {
                stage.on_new_best(&state, &e)?;
            }
        }
    }
    progress.finish();
    Ok(state)
}

/// NaN and infinities are not JSON numbers: they are written as strings.
fn json_f64(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::json!(v.to_string())
    }
}

fn eval_line(iter: u64, e: &Evaluation) -> serde_json::Value {
    let mut rec = serde_json::json!({"event": "eval", "iter": iter});
    if let Some(fields) = e.record.as_object() {
        for (k, v) in fields {
            rec[k] = v.clone();
        }
    }
    rec
}

/// The state of a training run in `store`: resumed from its latest checkpoint (weights into `vm`,
/// optimizer moments into `opt`) when there is one made with the same `config`, else fresh. A
/// checkpoint of another configuration is refused rather than silently mixed.
pub fn resume_or_start(
    store: &CheckpointStore,
    kind: &str,
    config: &serde_json::Value,
    vm: &VarMap,
    opt: &mut AdamW,
    device: &Device,
    progress: &dyn Progress,
) -> Result<TrainState> {
    let Some(ck) = store.latest(kind)? else {
        return Ok(TrainState {
            format_version: 0,
            kind: kind.into(),
            iter: 0,
            optimizer_step: 0,
            best_metric: None,
            best_iter: None,
            config: config.clone(),
            model_sha256: String::new(),
            optimizer_sha256: String::new(),
        });
    };
    if ck.state.config != *config {
        return Err(TrainError::Checkpoint {
            path: ck.dir.clone(),
            msg: format!(
                "the run in this folder used another configuration ({}); use a new --out or the same flags",
                ck.state.config
            ),
        });
    }
    crate::load_into(vm, &ck.model(device)?, &ck.model_path())?;
    ck.restore_optimizer(opt, device)?;
    progress.note(&format!("resuming from {} (iteration {})", ck.dir.display(), ck.state.iter));
    Ok(ck.state)
}

/// Saves the periodic checkpoint and, when `metric` beats the best so far, the `best` one.
/// Returns whether it was a new best.
pub fn save_checkpoints(store: &CheckpointStore, vm: &VarMap, opt: &AdamW, state: &mut TrainState, metric: f64) -> Result<bool> {
    let tensors = varmap_tensors(vm);
    let best = state.best_metric.is_none_or(|b| metric > b);
    if best {
        state.best_metric = Some(metric);
        state.best_iter = Some(state.iter);
        store.save_best(&tensors, opt, state.clone())?;
    }
    store.save(&tensors, opt, state.clone())?;
    Ok(best)
}

/// What [`apply_step`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Applied { loss: f64, grad_norm: f64 },
    /// Not applied: the loss or the gradient norm was not finite. `parameter`: the first
    /// variable (by name) whose gradient is not finite, if any.
    Skipped { loss: f64, grad_norm: f64, parameter: Option<String> },
}

/// The update shared by both stages: backward, global gradient-norm clip, AdamW step, unless
/// the loss or the gradient norm is not finite (then nothing changes).
pub fn apply_step(loss: &Tensor, vars: &[NamedVar], opt: &mut AdamW, clip: f64, lr: f64) -> Result<Step> {
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !value.is_finite() {
        return Ok(Step::Skipped { loss: value, grad_norm: f64::NAN, parameter: None });
    }
    let grads = loss.backward()?;
    let gnorm = crate::grad_norm(&grads, vars)?;
    if !gnorm.is_finite() {
        let mut parameter = None;
        for v in vars {
            if let Some(g) = grads.get(v.var.as_tensor()) {
                let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
                if !s.is_finite() {
                    parameter = Some(v.name.clone());
                    break;
                }
            }
        }
        return Ok(Step::Skipped { loss: value, grad_norm: gnorm, parameter });
    }
    // Clipping folded into the update: the same values as rescaling the gradients first.
    opt.step_scaled(&grads, lr, crate::clip_coefficient(gnorm, clip))?;
    Ok(Step::Applied { loss: value, grad_norm: gnorm })
}
