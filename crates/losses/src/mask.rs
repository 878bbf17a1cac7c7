//! Mask losses on point-sampled logits (Mask2Former `sigmoid_ce_loss` / `dice_loss`) and their
//! all-pairs versions used as matching costs (`batch_sigmoid_ce_loss` / `batch_dice_loss`).
//!
//! Inputs are logits and {0, 1} (or bilinearly sampled, fractional) targets at the same points.
//! All functions are differentiable w.r.t. the logits.

use candle_core::{bail, Result, Tensor};

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
    let (_, p) = dims2(logits, "pairwise_bce_cost")?;
    let (_, pt) = dims2(targets, "pairwise_bce_cost targets")?;
    if p != pt {
        bail!("pairwise_bce_cost: {p} prediction points vs {pt} target points");
    }
    if p == 0 {
        bail!("pairwise_bce_cost: no points");
    }
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
