//! Mask losses on point-sampled logits (Mask2Former `sigmoid_ce_loss` / `dice_loss`) and their
//! all-pairs versions used as matching costs (`batch_sigmoid_ce_loss` / `batch_dice_loss`).
//!
//! Inputs are logits and {0, 1} (or bilinearly sampled, fractional) targets at the same points.
//! All functions are differentiable w.r.t. the logits.

use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

fn dims2(t: &Tensor, what: &str) -> Result<(usize, usize)> {
    match t.dims() {
        &[a, b] => Ok((a, b)),
        _ => bail!("{what}: expected a 2-D (masks, points) tensor, got {:?}", t.shape()),
    }
}

/// log(1 + exp(−|x|)), the shared tail of the stable BCE-with-logits forms.
fn log1p_exp_neg_abs(x: &Tensor) -> Result<Tensor> {
    (x.abs()?.neg()?.exp()? + 1.0)?.log()
}

/// Elementwise `binary_cross_entropy_with_logits(x, t)` = max(x, 0) − x·t + log(1 + e^−|x|), the
/// overflow-free form; its gradient is sigmoid(x) − t.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(logits.dtype())?;
    (logits.relu()? - logits.mul(&targets)?)? + log1p_exp_neg_abs(logits)?
}

/// `sigmoid_ce_loss`: BCE-with-logits averaged over points (dim 1), summed over masks, divided
/// by `num_masks`. `logits`, `targets`: (n, P). Returns a scalar.
pub fn sigmoid_bce_loss(logits: &Tensor, targets: &Tensor, num_masks: f64) -> Result<Tensor> {
    let (n, p) = dims2(logits, "sigmoid_bce_loss")?;
    if targets.dims() != [n, p] {
        bail!("sigmoid_bce_loss: targets {:?} do not match logits {:?}", targets.shape(), logits.shape());
    }
    check_num_masks(num_masks)?;
    if p == 0 {
        bail!("sigmoid_bce_loss: no points");
    }
    bce_with_logits(logits, targets)?.mean(1)?.sum_all()? / num_masks
}

/// `dice_loss`: with p = sigmoid(logits), 1 − (2Σpt + 1)/(Σp + Σt + 1) per mask (sums over
/// points), summed over masks, divided by `num_masks`. `logits`, `targets`: (n, P).
pub fn dice_loss(logits: &Tensor, targets: &Tensor, num_masks: f64) -> Result<Tensor> {
    let (n, p) = dims2(logits, "dice_loss")?;
    if targets.dims() != [n, p] {
        bail!("dice_loss: targets {:?} do not match logits {:?}", targets.shape(), logits.shape());
    }
    check_num_masks(num_masks)?;
    let probs = candle_nn::ops::sigmoid(logits)?;
    let targets = targets.to_dtype(logits.dtype())?;
    let numerator = (probs.mul(&targets)?.sum(1)? * 2.0)?;
    let denominator = (probs.sum(1)? + targets.sum(1)?)?;
    let ratio = ((numerator + 1.0)? / (denominator + 1.0)?)?;
    ratio.affine(-1.0, 1.0)?.sum_all()? / num_masks
}

/// (Q, P) of an all-pairs cost's (Q, P) predictions and (M, P) targets, P ≥ 1.
fn pairwise_dims(logits: &Tensor, targets: &Tensor, what: &str) -> Result<(usize, usize)> {
    let (q, p) = dims2(logits, what)?;
    let (_, pt) = dims2(targets, &format!("{what} targets"))?;
    if p != pt {
        bail!("{what}: {p} prediction points vs {pt} target points");
    }
    if p == 0 {
        bail!("{what}: no points");
    }
    Ok((q, p))
}

fn check_num_masks(num_masks: f64) -> Result<()> {
    if num_masks.is_finite() && num_masks > 0.0 {
        Ok(())
    } else {
        bail!("num_masks must be a positive number, got {num_masks}")
    }
}

/// `batch_sigmoid_ce_loss`: mean-over-points BCE of every prediction (Q, P) against every target
/// (M, P) -> (Q, M). The official form is (softplus(−x)·tᵀ + softplus(x)·(1−t)ᵀ) / P; since
/// softplus(−x) = softplus(x) − x this is (Σ_p softplus(x) − x·tᵀ) / P, which needs one
/// elementwise pass and one matmul instead of two of each.
pub fn pairwise_bce_cost(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (_, p) = pairwise_dims(logits, targets, "pairwise_bce_cost")?;
    let targets = targets.to_dtype(logits.dtype())?;
    // BCE against 0 at every point, summed over points: (Q, 1).
    let neg_sum = (logits.relu()? + log1p_exp_neg_abs(logits)?)?.sum_keepdim(1)?;
    let cost = neg_sum.broadcast_sub(&logits.matmul(&targets.t()?)?)?;
    cost / p as f64
}

/// `batch_dice_loss`: dice cost 1 − (2Σpt + 1)/(Σp + Σt + 1) of every prediction (Q, P) against
/// every target (M, P) -> (Q, M), p = sigmoid(logits).
pub fn pairwise_dice_cost(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (_, p) = dims2(logits, "pairwise_dice_cost")?;
    let (_, pt) = dims2(targets, "pairwise_dice_cost targets")?;
    if p != pt {
        bail!("pairwise_dice_cost: {p} prediction points vs {pt} target points");
    }
    let probs = candle_nn::ops::sigmoid(logits)?;
    let targets = targets.to_dtype(logits.dtype())?;
    let numerator = (probs.matmul(&targets.t()?)? * 2.0)?;
    let denominator = probs.sum_keepdim(1)?.broadcast_add(&targets.sum_keepdim(1)?.t()?)?;
    ((numerator + 1.0)? / (denominator + 1.0)?)?.affine(-1.0, 1.0)
}

/// [`pairwise_bce_cost`] and [`pairwise_dice_cost`] together, `(bce, dice)`, each (Q, M), for
/// the matcher, which needs no gradient. On CPU (f32) one parallel pass over the logits gives
/// every row's Σ softplus, its sigmoids and their sum, with the same per-element formulas, instead
/// of ten single-threaded element-wise passes over (Q, P); the two products with the targets
/// stay matrix products. Elsewhere it is the two functions.
pub fn pairwise_costs(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let (q, p) = pairwise_dims(logits, targets, "pairwise_costs")?;
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 {
        return Ok((pairwise_bce_cost(logits, targets)?, pairwise_dice_cost(logits, targets)?));
    }
    let x: Vec<f32> = logits.detach().flatten_all()?.to_vec1()?;
    let mut probs = vec![0f32; q * p];
    let mut softplus_sum = vec![0f32; q];
    let mut prob_sum = vec![0f32; q];
    probs
        .par_chunks_mut(p)
        .zip(x.par_chunks(p))
        .zip(softplus_sum.par_iter_mut().zip(prob_sum.par_iter_mut()))
        .for_each(|((pr, xr), (ss, ps))| {
            let (mut a, mut b) = (0f32, 0f32);
            for (o, &v) in pr.iter_mut().zip(xr) {
                // relu(x) + log(1 + e^−|x|) and sigmoid(x), as the composed ops compute them.
                a += v.max(0.0) + ((-v.abs()).exp() + 1.0).ln();
                let sg = ((-v).exp() + 1.0).recip();
                *o = sg;
                b += sg;
            }
            *ss = a;
            *ps = b;
        });
    let dev = logits.device();
    let targets = targets.to_dtype(DType::F32)?;
    let t_t = targets.t()?;
    let bce = (Tensor::from_vec(softplus_sum, (q, 1), dev)?.broadcast_sub(&logits.detach().matmul(&t_t)?)? / p as f64)?;
    let probs = Tensor::from_vec(probs, (q, p), dev)?;
    let numerator = (probs.matmul(&t_t)? * 2.0)?;
    let denominator = Tensor::from_vec(prob_sum, (q, 1), dev)?.broadcast_add(&targets.sum_keepdim(1)?.t()?)?;
    let dice = ((numerator + 1.0)? / (denominator + 1.0)?)?.affine(-1.0, 1.0)?;
    Ok((bce, dice))
}
