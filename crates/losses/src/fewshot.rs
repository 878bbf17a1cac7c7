//! Few-shot losses shared by both stages: the weighted (V-Net) dice loss and L_co.
//!
//! Official semantics (spec §3.7, §2.3): ignore pixels (255) count as background, the dice loss
//! applies a sigmoid to its two prediction channels, the soft IoU uses the raw probabilities,
//! and L_co is a two-term BCE on min-max-normalised cosine similarities.

use candle_core::{bail, DType, Result, Tensor, D};

/// Floor of the dice denominator (`torch.clamp(Σp² + Σt², min=1e-8)`).
const DICE_EPS: f64 = 1e-8;
/// Added to the soft-IoU union.
const IOU_EPS: f64 = 1e-7;
/// Added to the cosine range in the min-max normalisation.
const MINMAX_EPS: f64 = 1e-8;
/// `nn.BCELoss` clamps each log at −100.
const BCE_LOG_FLOOR: f64 = -100.0;
/// `nn.BCELoss`'s backward divides by max((1 − x)·x, 1e-12).
const BCE_GRAD_EPS: f64 = 1e-12;

/// Loss weights of stage 2 (spec §3.7): λ1 = 10 on dice, λ2 = 10 · 0.6 = 6 on L_co.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage2Weights {
    pub dice: f64,
    /// `None` trains without L_co (ablation).
    pub co: Option<f64>,
}

impl Default for Stage2Weights {
    fn default() -> Self {
        Self { dice: 10.0, co: Some(6.0) }
    }
}

/// A (B, H, W) 0/1/255 label (any numeric dtype) as a `dtype` tensor with 255 → 0.
fn clean_label(label: &Tensor, dtype: DType, what: &str) -> Result<Tensor> {
    if label.rank() != 3 {
        bail!("{what}: label must be (B, H, W), got {:?}", label.shape());
    }
    let l = label.to_dtype(dtype)?;
    l.ne(255f64)?.where_cond(&l, &l.zeros_like()?)
}

/// The official `WeightedDiceLoss` on a two-channel prediction (unweighted: multiply by λ1).
///
/// `pred2`: (B, 2, H, W) `[background, foreground]` scores (e.g. `[1 − out, out]`);
/// `label`: (B, H, W) 0/1/255, 255 treated as background. A sigmoid is applied to both
/// channels; per (sample, channel) the loss is `1 − 2Σpt / max(Σp² + Σt², 1e-8)` against the
/// targets `(label == 0, label == 1)`; the 2B terms are summed and divided by B. Returns a scalar.
///
/// On CPU (f32, f64) the sums come from one fused op ([`ops::nn::sigmoid_dice_sums`]);
/// elsewhere, or with the fused kernels off, [`weighted_dice_loss_composed`].
pub fn weighted_dice_loss(pred2: &Tensor, label: &Tensor) -> Result<Tensor> {
    let (b, _, h, w) = dice_dims(pred2, label)?;
    if pred2.device().is_cpu() && matches!(pred2.dtype(), DType::F32 | DType::F64) && ops::fused_kernels_enabled() {
        return weighted_dice_from_sums(pred2, label, (b, h * w));
    }
    weighted_dice_loss_composed(pred2, label)
}

/// [`weighted_dice_loss`] from candle ops on the whole prediction, on any device: the path off
/// the CPU, and the CPU path's cross-check.
pub fn weighted_dice_loss_composed(pred2: &Tensor, label: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = dice_dims(pred2, label)?;
    let dt = pred2.dtype();
    let l = clean_label(label, dt, "weighted_dice_loss")?;
    let t = Tensor::stack(&[&l.eq(0f64)?, &l.eq(1f64)?], 1)?.to_dtype(dt)?.reshape((b, c, h * w))?;
    let p = candle_nn::ops::sigmoid(pred2)?.reshape((b, c, h * w))?;
    let inter = (&p * &t)?.sum(D::Minus1)?;
    let denom = (p.sqr()?.sum(D::Minus1)? + t.sum(D::Minus1)?)?.maximum(DICE_EPS)?; // t² = t
    let dice = (inter.affine(-2.0, 0.0)? / denom)?.affine(1.0, 1.0)?;
    dice.sum_all()? / b as f64
}

/// (B, 2, H, W) of a two-channel prediction whose label is (B, H, W).
fn dice_dims(pred2: &Tensor, label: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (b, c, h, w) = match pred2.dims() {
        &[b, 2, h, w] => (b, 2, h, w),
        _ => bail!("weighted_dice_loss: prediction must be (B, 2, H, W), got {:?}", pred2.shape()),
    };
    if label.dims() != [b, h, w] {
        bail!("weighted_dice_loss: label {:?} must be (B={b}, H={h}, W={w})", label.shape());
    }
    Ok((b, c, h, w))
}

/// [`weighted_dice_loss`] on CPU: the two targets built once from the label values (taken in
/// the prediction's dtype, as the composed path compares them), the sums by
/// [`ops::nn::sigmoid_dice_sums`] in one parallel pass each way, the rest on (B, 2) values.
fn weighted_dice_from_sums(pred2: &Tensor, label: &Tensor, (b, n): (usize, usize)) -> Result<Tensor> {
    use rayon::prelude::*;
    let values: Vec<f64> = match pred2.dtype() {
        DType::F32 => label.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect(),
        _ => label.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
    };
    // Per sample: [background target | foreground target]; 255 counts as background.
    let mut targets = vec![0u8; b * 2 * n];
    let counts: Vec<[f64; 2]> = targets
        .par_chunks_mut(2 * n)
        .zip(values.par_chunks(n))
        .map(|(t, l)| {
            let (bg, fg) = t.split_at_mut(n);
            let mut count = [0.0; 2];
            for ((tb, tf), &v) in bg.iter_mut().zip(fg.iter_mut()).zip(l) {
                let v = if v == 255.0 { 0.0 } else { v };
                *tb = u8::from(v == 0.0);
                *tf = u8::from(v == 1.0);
                count[0] += f64::from(*tb);
                count[1] += f64::from(*tf);
            }
            count
        })
        .collect();
    let dev = pred2.device();
    let t = Tensor::from_vec(targets, (b * 2, n), dev)?;
    let sums = ops::nn::sigmoid_dice_sums(&pred2.reshape((b * 2, n))?, &t)?; // (2B, 2)
    let t_sum = Tensor::from_vec(counts.concat(), b * 2, dev)?.to_dtype(pred2.dtype())?;
    let inter = sums.narrow(1, 0, 1)?.squeeze(1)?;
    let denom = (sums.narrow(1, 1, 1)?.squeeze(1)? + t_sum)?.maximum(DICE_EPS)?; // t² = t
    let dice = (inter.affine(-2.0, 0.0)? / denom)?.affine(1.0, 1.0)?;
    dice.sum_all()? / b as f64
}

/// Soft IoU of each probability map with the binary label: `Σpt / (Σt + Σp − Σpt + 1e-7)`,
/// 255 → 0 (the official `get_iou`).
///
/// `probs`: (B, N, H, W) in [0, 1]; `label`: (B, H, W) -> (B, N).
pub fn soft_iou(probs: &Tensor, label: &Tensor) -> Result<Tensor> {
    let (b, n, h, w) = match probs.dims() {
        &[b, n, h, w] => (b, n, h, w),
        _ => bail!("soft_iou: probabilities must be (B, N, H, W), got {:?}", probs.shape()),
    };
    if label.dims() != [b, h, w] {
        bail!("soft_iou: label {:?} must be (B={b}, H={h}, W={w}), the probabilities' size", label.shape());
    }
    let t = clean_label(label, probs.dtype(), "soft_iou")?.reshape((b, h * w, 1))?;
    let p = probs.reshape((b, n, h * w))?;
    let inter = p.matmul(&t)?.squeeze(2)?; // (B, N)
    let union = ((p.sum(D::Minus1)? + t.sum(1)?.broadcast_as((b, n))?)? - &inter)?;
    inter / (union + IOU_EPS)?
}

/// [`soft_iou`] of the probability maps bilinearly upsampled (align_corners=False) to the
/// label's size, as the official code upsamples its proposals before the IoU, computed without
/// the upsampled maps: every sum in the soft IoU is linear in them, so `Σ up(P)·t` is
/// `Σ P · upᵀ(t)` with the label brought down once ([`ops::resize::resize_bilinear_adjoint`]),
/// and `Σ up(P)` is `Σ P · upᵀ(1)`. Equal to the upsample-then-[`soft_iou`] path up to float
/// rounding; at the paper size it skips a (B, 100, 480, 480) tensor per step.
///
/// `probs`: (B, N, h, w) in [0, 1]; `label`: (B, H, W) -> (B, N).
pub fn soft_iou_upsampled(probs: &Tensor, label: &Tensor) -> Result<Tensor> {
    let (b, n, h, w) = match probs.dims() {
        &[b, n, h, w] => (b, n, h, w),
        _ => bail!("soft_iou_upsampled: probabilities must be (B, N, h, w), got {:?}", probs.shape()),
    };
    let (lb, lh, lw) = match label.dims() {
        &[lb, lh, lw] => (lb, lh, lw),
        _ => bail!("soft_iou_upsampled: label must be (B, H, W), got {:?}", label.shape()),
    };
    if lb != b {
        bail!("soft_iou_upsampled: label batch {lb} differs from the probabilities' {b}");
    }
    if (lh, lw) == (h, w) {
        return soft_iou(probs, label);
    }
    let t = clean_label(label, probs.dtype(), "soft_iou_upsampled")?.reshape((b, 1, lh, lw))?;
    let t_low = ops::resize::resize_bilinear_adjoint(&t, (h, w), false)?.reshape((b, h * w, 1))?;
    let ones = Tensor::ones((1, 1, lh, lw), probs.dtype(), probs.device())?;
    let ones_low = ops::resize::resize_bilinear_adjoint(&ones, (h, w), false)?.reshape((1, h * w, 1))?;
    let p = probs.reshape((b, n, h * w))?;
    let inter = p.matmul(&t_low)?.squeeze(2)?; // (B, N)
    let sum_p = p.broadcast_matmul(&ones_low)?.squeeze(2)?;
    let union = ((sum_p + t.flatten_from(1)?.sum(1)?.unsqueeze(1)?.broadcast_as((b, n))?)? - &inter)?;
    inter / (union + IOU_EPS)?
}

/// The L_co term and what it was built from.
#[derive(Debug, Clone)]
pub struct CoLoss {
    /// Scalar `BCELoss([ŝ(i⁻), ŝ(i⁺)], [0, 1])`, mean over the 2B terms (unweighted).
    pub loss: Tensor,
    /// (B,) u32 i⁺ = argmax IoU per sample.
    pub argmax: Tensor,
    /// (B,) u32 i⁻ = argmin IoU per sample.
    pub argmin: Tensor,
    /// (B, 2) `[ŝ(i⁻), ŝ(i⁺)]`, ŝ = (s − min) / (max − min + 1e-8) per sample.
    pub em: Tensor,
}

/// L_co (spec §3.7): pushes the normalised cosine of the best-IoU proposal to 1 and of the
/// worst-IoU proposal to 0.
///
/// `cosine`: (B, N) raw similarities (gradients flow into them); `ious`: (B, N), used only
/// through their argmax/argmin (the official code detaches them).
pub fn co_loss(cosine: &Tensor, ious: &Tensor) -> Result<CoLoss> {
    let (b, n) = match cosine.dims() {
        &[b, n] if n > 0 => (b, n),
        _ => bail!("co_loss: cosine must be a non-empty (B, N) tensor, got {:?}", cosine.shape()),
    };
    if ious.dims() != [b, n] {
        bail!("co_loss: ious {:?} must match the cosine shape (B={b}, N={n})", ious.shape());
    }
    let ious = ious.detach();
    let argmax = ious.argmax(1)?;
    let argmin = ious.argmin(1)?;
    let min = cosine.min_keepdim(1)?;
    let max = cosine.max_keepdim(1)?;
    let s_hat = cosine.broadcast_sub(&min)?.broadcast_div(&((max - &min)? + MINMAX_EPS)?)?;
    let idx = Tensor::stack(&[&argmin, &argmax], 1)?; // (B, 2)
    let em = s_hat.gather(&idx, 1)?;
    let target = Tensor::stack(&[Tensor::zeros(b, em.dtype(), em.device())?, Tensor::ones(b, em.dtype(), em.device())?], 1)?;
    let loss = bce_mean(&em, &target)?;
    Ok(CoLoss { loss, argmax, argmin, em })
}

/// `nn.BCELoss()` (mean) with torch's exact forward (logs clamped at −100) and backward
/// (`(x − y) / max((1 − x)·x, 1e-12)`), which stays finite at x ∈ {0, 1} where the plain
/// derivative of the clamped log would be NaN. The value is computed without gradient and the
/// torch gradient is attached through `g · (x − x̄)`, which is zero in value.
fn bce_mean(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let xd = x.detach();
    let y = y.detach();
    let log_x = xd.log()?.maximum(BCE_LOG_FLOOR)?;
    let log_1mx = xd.affine(-1.0, 1.0)?.log()?.maximum(BCE_LOG_FLOOR)?;
    let one_minus_y = y.affine(-1.0, 1.0)?;
    let value = ((&y * log_x)? + (&one_minus_y * log_1mx)?)?.neg()?;
    let slope = ((&xd - &y)? / (xd.affine(-1.0, 1.0)? * &xd)?.maximum(BCE_GRAD_EPS)?)?;
    let attach = (slope * (x - &xd)?)?;
    (value + attach)?.mean_all()
}

/// The stage-2 loss terms.
#[derive(Debug, Clone)]
pub struct Stage2Loss {
    /// Scalar `λ1 · dice + λ2 · L_co` (L_co omitted when disabled).
    pub total: Tensor,
    /// Scalar unweighted dice.
    pub dice: Tensor,
    /// L_co and its parts, when enabled.
    pub co: Option<CoLoss>,
    /// (B, N) detached soft IoUs of the proposals (computed only when L_co is enabled).
    pub ious: Option<Tensor>,
}

/// The stage-2 objective: `λ1 · WeightedDice([1 − out, out], label) + λ2 · L_co(cosine, IoU)`.
///
/// `pred2`: (B, 2, H, W) `[1 − out, out]`; `label`: (B, H, W) 0/1/255; `cosine`: (B, N);
/// `proposals`: (B, N, h, w) sigmoid proposals, at the label size or below (then upsampled
/// bilinearly for the IoU, as the official code does; see [`soft_iou_upsampled`]).
pub fn stage2_loss(
    pred2: &Tensor,
    label: &Tensor,
    cosine: &Tensor,
    proposals: &Tensor,
    weights: Stage2Weights,
) -> Result<Stage2Loss> {
    let dice = weighted_dice_loss(pred2, label)?;
    let mut total = dice.affine(weights.dice, 0.0)?;
    let (mut co, mut ious) = (None, None);
    if let Some(w) = weights.co {
        let iou = soft_iou_upsampled(&proposals.detach(), label)?;
        let c = co_loss(cosine, &iou)?;
        total = (total + c.loss.affine(w, 0.0)?)?;
        co = Some(c);
        ious = Some(iou);
    }
    Ok(Stage2Loss { total, dice, co, ious })
}
