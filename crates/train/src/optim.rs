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
        self.step_scaled(grads, lr, None)
    }

    /// [`AdamW::step`] on the gradients multiplied by `grad_scale` (a clipping coefficient, see
    /// [`clip_coefficient`]), as if they had been rescaled first.
    ///
    /// On CPU each f32 parameter is updated in one parallel pass over its gradient, moments and
    /// values, with the same f32 operations in the same order as the candle ops (the same
    /// bits); elsewhere by those ops.
    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: Option<f64>) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.var.as_tensor()) else { continue };
            if let Some((m, v, p)) = fused_update(c, s, g, lr, bc1, bc2, grad_scale)? {
                let (shape, dev) = (s.m.shape().clone(), s.m.device().clone());
                s.m = Tensor::from_vec(m, &shape, &dev)?;
                s.v = Tensor::from_vec(v, &shape, &dev)?;
                s.var.var.set(&Tensor::from_vec(p, &shape, &dev)?)?;
                continue;
            }
            // A variable's gradient is not detached by candle's backward: it still references the
            // step's activations. A moment built from it would chain every step's graph (the
            // stage-1 run grew ~150 MB per iteration until killed), so it is detached first.
            let g = g.detach().to_dtype(DType::F32)?;
            let g = match grad_scale {
                Some(k) => (g * k)?,
                None => g,
            };
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

/// The contiguous f32 values of a CPU tensor (`None` for any other tensor), borrowed from its
/// storage guard.
fn cpu_f32<'a>(g: &'a (candle_core::StorageRef<'a>, &'a candle_core::Layout)) -> Option<&'a [f32]> {
    match (&*g.0, g.1.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => Some(&v[a..b]),
        _ => None,
    }
}

/// The new (m, v, parameter) of one slot in one pass, when its gradient, moments and parameter
/// are contiguous f32 CPU tensors of one size. Each value goes through the candle path's f32
/// operations in order: `Tensor * f64` and `Tensor / f64` are candle affines `x · k + 0` (with
/// `k = 1/d` for a division), `Tensor + f64` is `x · 1 + a`.
fn fused_update(
    c: &AdamWConfig,
    s: &Slot,
    g: &Tensor,
    lr: f64,
    bc1: f64,
    bc2: f64,
    grad_scale: Option<f64>,
) -> Result<Option<(Vec<f32>, Vec<f32>, Vec<f32>)>> {
    use rayon::prelude::*;
    let p = s.var.var.as_tensor();
    if g.dtype() != DType::F32 || !ops::fused_kernels_enabled() {
        return Ok(None);
    }
    let (gg, pg, mg, vg) = (g.storage_and_layout(), p.storage_and_layout(), s.m.storage_and_layout(), s.v.storage_and_layout());
    let (Some(gs), Some(ps), Some(ms), Some(vs)) = (cpu_f32(&gg), cpu_f32(&pg), cpu_f32(&mg), cpu_f32(&vg)) else {
        return Ok(None);
    };
    let n = ps.len();
    if gs.len() != n || ms.len() != n || vs.len() != n {
        return Ok(None);
    }
    let f = |x: f64| x as f32;
    let (k, b1, b1c, b2, b2c) = (grad_scale.map(f), f(c.beta1), f(1.0 - c.beta1), f(c.beta2), f(1.0 - c.beta2));
    let (inv_bc1, inv_bc2, eps, lr32) = (f(1.0 / bc1), f(1.0 / bc2), f(c.eps), f(lr));
    let decay = (s.weight_decay > 0.0).then(|| f(1.0 - lr * s.weight_decay));
    // Branch-free per element, so that it vectorises: no scale is a scale by 1 (`g · 1 + 0` is g
    // but for the sign of a zero, which the moments' affines drop anyway); the decay's branch is
    // the same for every element.
    let (k, has_decay, decay) = (k.unwrap_or(1.0), decay.is_some(), decay.unwrap_or(1.0));
    let (mut m2, mut v2, mut p2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    const CHUNK: usize = 1 << 14;
    m2.par_chunks_mut(CHUNK).zip(v2.par_chunks_mut(CHUNK)).zip(p2.par_chunks_mut(CHUNK)).enumerate().for_each(|(ci, ((mc, vc), pc))| {
        let r = ci * CHUNK..ci * CHUNK + mc.len();
        let (gc, mo, vo, po) = (&gs[r.clone()], &ms[r.clone()], &vs[r.clone()], &ps[r]);
        for (((((mn, vn), pn), &g), (&m, &v)), &p) in mc.iter_mut().zip(vc.iter_mut()).zip(pc.iter_mut()).zip(gc).zip(mo.iter().zip(vo)).zip(po) {
            let g = g * k + 0.0;
            let m = (m * b1 + 0.0) + (g * b1c + 0.0);
            let v = (v * b2 + 0.0) + ((g * g) * b2c + 0.0);
            let update = (m * inv_bc1 + 0.0) / ((v * inv_bc2 + 0.0).sqrt() * 1.0 + eps);
            let p = if has_decay { p * decay + 0.0 } else { p };
            (*mn, *vn, *pn) = (m, v, p - (update * lr32 + 0.0));
        }
    });
    Ok(Some((m2, v2, p2)))
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
    let norm = grad_norm(grads, vars)?;
    if let Some(coef) = clip_coefficient(norm, max_norm) {
        for v in vars {
            if let Some(g) = grads.remove(v.var.as_tensor()) {
                grads.insert(v.var.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}

/// The factor [`clip_grad_norm`] multiplies the gradients by for a global `norm`: `None` when
/// it leaves them as they are (norm within `max_norm`, or not finite: clipping by NaN would
/// write NaN into every gradient, and such a step is skipped by the caller).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (norm.is_finite() && coef < 1.0).then_some(coef)
}

/// The global L2 norm of the variables' gradients, summed in f64. Contiguous f32 CPU gradients
/// are read in place in parallel; the others go through one reduction on their device and one
/// read back, not one per parameter.
pub fn grad_norm(grads: &GradStore, vars: &[NamedVar]) -> Result<f64> {
    use rayon::prelude::*;
    let mut on_device = Vec::new();
    let mut guards = Vec::new();
    for g in vars.iter().filter_map(|v| grads.get(v.var.as_tensor())) {
        let guard = g.storage_and_layout();
        if cpu_f32(&guard).is_some() {
            guards.push(guard);
        } else {
            drop(guard);
            on_device.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
        }
    }
    // All CPU gradients' chunks in one parallel reduction (most parameters are small).
    let chunks: Vec<&[f32]> = guards.iter().filter_map(cpu_f32).flat_map(|x| x.chunks(1 << 14)).collect();
    let mut total = chunks.par_iter().map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>()).sum::<f64>();
    if !on_device.is_empty() {
        total += Tensor::stack(&on_device, 0)?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}
