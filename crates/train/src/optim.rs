//! AdamW with per-parameter weight decay (PyTorch semantics), the poly schedule and clipping.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use crate::Result;

/// A trainable variable with its state-dict name (names decide the weight-decay group and key
/// the optimizer state in checkpoints).
#[derive(Clone)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
}

/// Official rule: no weight decay on normalisation layers (BN/GN/LN weights and biases) and on
/// `nn.Embedding` tables (the transformer decoder's `query_feat`, `query_embed`, `level_embed`:
/// their parameters end in `.weight`); everything else, biases included, decays. The pixel
/// decoder's `level_embed` is a bare `nn.Parameter`, not an embedding, so it decays (0.05).
pub fn default_no_decay(name: &str) -> bool {
    let is_norm = name.split('.').any(|c| c.starts_with("norm") || c.ends_with("_norm"))
        // GroupNorm in `input_proj.{i}.1.*` (an nn.Sequential index, no "norm" in its name)
        || name.contains("input_proj.") && name.split('.').rev().nth(1) == Some("1");
    let is_embedding = ["query_feat.weight", "query_embed.weight", "level_embed.weight"].iter().any(|s| name.ends_with(s));
    is_norm || is_embedding
}

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The official step-1/step-2 settings: lr 1e-4, betas (0.9, 0.999), eps 1e-8, wd 0.05.
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 }
    }
}

struct Slot {
    var: NamedVar,
    weight_decay: f64,
    m: Tensor,
    v: Tensor,
}

/// AdamW (decoupled weight decay, bias-corrected moments) with one group per parameter.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// `no_decay(name)` selects the parameters trained without weight decay.
    pub fn new(vars: Vec<NamedVar>, cfg: AdamWConfig, no_decay: impl Fn(&str) -> bool) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|var| {
                let m = var.var.zeros_like()?;
                let v = var.var.zeros_like()?;
                let weight_decay = if no_decay(&var.name) { 0.0 } else { cfg.weight_decay };
                Ok(Slot { var, weight_decay, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, slots, step: 0 })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names and weight decay of every parameter group (for logging and tests).
    pub fn groups(&self) -> Vec<(String, f64)> {
        self.slots.iter().map(|s| (s.var.name.clone(), s.weight_decay)).collect()
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left untouched (as
    /// PyTorch does for `grad is None`).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.var.as_tensor()) else { continue };
            // A variable's gradient is not detached by candle's backward: it still references the
            // step's activations. A moment built from it would chain every step's graph (the
            // stage-1 run grew ~150 MB per iteration until killed), so it is detached first.
            let g = g.detach().to_dtype(DType::F32)?;
            s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?.detach();
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
            let update = ((&s.m / bc1)? / ((&s.v / bc2)?.sqrt()? + c.eps)?)?;
            let p = s.var.var.as_tensor();
            let decayed = if s.weight_decay > 0.0 { (p * (1.0 - lr * s.weight_decay))? } else { p.clone() };
            s.var.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Optimizer state as named tensors (`m.<name>`, `v.<name>`) plus the step count.
    pub fn state(&self) -> (HashMap<String, Tensor>, u64) {
        let mut t = HashMap::new();
        for s in &self.slots {
            t.insert(format!("m.{}", s.var.name), s.m.clone());
            t.insert(format!("v.{}", s.var.name), s.v.clone());
        }
        (t, self.step)
    }

    /// Restores a state written by [`AdamW::state`]; every parameter must be present with its shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> std::result::Result<(), String> {
        for s in &mut self.slots {
            for (key, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let name = format!("{key}.{}", s.var.name);
                let t = tensors.get(&name).ok_or_else(|| format!("optimizer state has no `{name}`"))?;
                if t.dims() != slot.dims() {
                    return Err(format!("`{name}` has shape {:?}, the model needs {:?}", t.dims(), slot.dims()));
                }
                *slot = t.to_device(slot.device()).map_err(|e| e.to_string())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// detectron2's `WarmupPolyLR` without warmup: `base_lr · (1 − it/max_it)^power`.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct PolyLr {
    pub base_lr: f64,
    pub max_iter: u64,
    pub power: f64,
}

impl PolyLr {
    pub fn new(base_lr: f64, max_iter: u64) -> Self {
        Self { base_lr, max_iter, power: 0.9 }
    }

    pub fn lr(&self, iter: u64) -> f64 {
        let frac = 1.0 - (iter.min(self.max_iter) as f64) / (self.max_iter.max(1) as f64);
        self.base_lr * frac.powf(self.power)
    }
}

/// Global L2-norm clipping over all gradients (`clip_grad_norm_`, the official "full_model"
/// clipping at 0.01). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[NamedVar], max_norm: f64) -> Result<f64> {
    // One reduction on the device and one read back, not one per parameter.
    let sums = vars
        .iter()
        .filter_map(|v| grads.get(v.var.as_tensor()))
        .map(|g| g.to_dtype(DType::F64)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let norm = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let coef = max_norm / (norm + 1e-6);
    // A non-finite norm is left to the caller (the step is skipped): clipping by NaN would
    // write NaN into every gradient.
    if norm.is_finite() && coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.remove(v.var.as_tensor()) {
                grads.insert(v.var.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}
