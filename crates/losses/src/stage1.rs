//! The stage-1 (POS) training loss, spec §2.3: Hungarian matching and point-sampled mask BCE /
//! dice for every decoder prediction (deep supervision), plus MM-Former's oracle few-shot loss.

use candle_core::{bail, DType, Result, Tensor};
use rand_chacha::rand_core::RngCore;

use crate::fewshot::{soft_iou_upsampled, weighted_dice_loss};
use crate::mask::{dice_loss, sigmoid_bce_loss};
use crate::matcher::{HungarianMatcher, ImageMatch};
use crate::points::{sample_maps, uncertain_point_coords, PointSource, RngPoints};
use crate::targets::binary_label_ignore_as_background;

/// Stage-1 loss settings; [`Default`] is the official PASCAL/COCO step-1 configuration.
#[derive(Clone, Debug)]
pub struct Stage1Config {
    /// Points per mask for matching and for the losses (`TRAIN_NUM_POINTS`).
    pub num_points: usize,
    /// Candidates drawn per loss point before importance selection (`OVERSAMPLE_RATIO`).
    pub oversample_ratio: f64,
    /// Fraction of the loss points taken from the most uncertain candidates.
    pub importance_sample_ratio: f64,
    /// Matching cost weights.
    pub cost_mask: f64,
    pub cost_dice: f64,
    /// Loss weights of `loss_mask*` / `loss_dice*`.
    pub mask_weight: f64,
    pub dice_weight: f64,
    /// Weight of the oracle few-shot dice loss (`FEWSHOT_WEIGHT`).
    pub fewshot_weight: f64,
}

impl Default for Stage1Config {
    fn default() -> Self {
        Self {
            num_points: 12544,
            oversample_ratio: 3.0,
            importance_sample_ratio: 0.75,
            cost_mask: 5.0,
            cost_dice: 5.0,
            mask_weight: 5.0,
            dice_weight: 5.0,
            fewshot_weight: 10.0,
        }
    }
}

/// Matching and losses of one decoder prediction.
#[derive(Clone, Debug)]
pub struct PredictionLosses {
    /// Decoder prediction index (0 = before the first decoder layer, last = final).
    pub index: usize,
    /// Whether this is the final prediction (its terms have no numeric suffix).
    pub is_final: bool,
    /// Unweighted point BCE (sum over matched pairs / num_masks).
    pub loss_mask: Tensor,
    /// Unweighted point dice (sum over matched pairs / num_masks).
    pub loss_dice: Tensor,
    /// Per-image matching (query and GT indices, cost matrix).
    pub matches: Vec<ImageMatch>,
    /// The loss points of each matched pair, (n_matched, num_points, 2), batch-major in match order.
    pub point_coords: Tensor,
}

/// The oracle few-shot term: the proposal closest to the episode label, trained with the
/// weighted dice loss.
#[derive(Clone, Debug)]
pub struct OracleLoss {
    /// Soft IoU of every upsampled sigmoid proposal with the binary label, (B, Q), detached.
    pub ious: Tensor,
    /// Argmax of `ious` per image (V1 oracle).
    pub index: Vec<usize>,
    /// The chosen upsampled sigmoid proposal p, (B, 1, H, W) (the POS output is [1 − p, p]).
    pub out: Tensor,
    /// Unweighted `WeightedDiceLoss([1 − p, p], label)`.
    pub dice: Tensor,
}

/// One named loss term, raw and weighted.
#[derive(Clone, Debug)]
pub struct LossTerm {
    /// The official dict key: `loss_mask`, `loss_dice`, `loss_mask_{k}`, `loss_dice_{k}`, `fewshot_loss`.
    pub name: String,
    pub raw: Tensor,
    pub weight: f64,
    pub weighted: Tensor,
}

/// Everything the stage-1 loss computed.
#[derive(Clone, Debug)]
pub struct Stage1Losses {
    /// Per decoder prediction, in decoder order (the final prediction last).
    pub predictions: Vec<PredictionLosses>,
    pub oracle: OracleLoss,
    /// Every term in the official dict order: final, aux 0.., then `fewshot_loss`.
    pub terms: Vec<LossTerm>,
    /// Σ weighted terms (the scalar to back-propagate).
    pub total: Tensor,
    /// Total GT masks in the batch, clamped to ≥ 1 (the loss normaliser).
    pub num_masks: f64,
}

impl Stage1Losses {
    /// The term with the official dict key `name`.
    pub fn term(&self, name: &str) -> Option<&LossTerm> {
        self.terms.iter().find(|t| t.name == name)
    }

    /// (name, raw, weighted) of every term as numbers, for logging.
    pub fn scalars(&self) -> Result<Vec<(String, f64, f64)>> {
        self.terms
            .iter()
            .map(|t| Ok((t.name.clone(), scalar(&t.raw)?, scalar(&t.weighted)?)))
            .collect()
    }

    /// (name, weighted term) of every term, still on the device (a log reads them when it
    /// writes, not every iteration).
    pub fn weighted_parts(&self) -> Vec<(String, Tensor)> {
        self.terms.iter().map(|t| (t.name.clone(), t.weighted.clone())).collect()
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.flatten_all()?.sum_all()?.to_scalar::<f64>()
}

/// The stage-1 criterion.
#[derive(Clone, Debug, Default)]
pub struct Stage1Criterion {
    pub config: Stage1Config,
}

impl Stage1Criterion {
    pub fn new(config: Stage1Config) -> Self {
        Self { config }
    }

    pub fn matcher(&self) -> HungarianMatcher {
        HungarianMatcher { cost_mask: self.config.cost_mask, cost_dice: self.config.cost_dice, num_points: self.config.num_points }
    }

    /// The full stage-1 loss with points from a seeded RNG (training).
    pub fn forward_with_rng<R: RngCore + ?Sized>(
        &self,
        predictions: &[Tensor],
        targets: &[Tensor],
        query_label: &Tensor,
        rng: &mut R,
    ) -> Result<Stage1Losses> {
        self.forward(predictions, targets, query_label, &mut RngPoints::new(rng))
    }

    /// The full stage-1 loss.
    ///
    /// - `predictions`: the decoder's mask logits in decoder order, each (B, Q, h, w); the last
    ///   one is the final prediction, index k < last gives the `_k` terms.
    /// - `targets[b]`: (M_b, H, W) binary GT masks of image b (see [`crate::stage1_targets`]) at
    ///   the padded image size.
    /// - `query_label`: (B, H, W) binary episode label with 255 = ignore.
    /// - `points`: the uniform draws, made in the official order (match final, loss final, match
    ///   aux 0, loss aux 0, ...).
    pub fn forward(
        &self,
        predictions: &[Tensor],
        targets: &[Tensor],
        query_label: &Tensor,
        points: &mut dyn PointSource,
    ) -> Result<Stage1Losses> {
        let hw = self.check_inputs(predictions, targets, query_label)?;
        let total_masks: usize = targets.iter().map(|t| t.dim(0)).sum::<Result<usize>>()?;
        let num_masks = (total_masks as f64).max(1.0);
        let last = predictions.len() - 1;
        let order = std::iter::once(last).chain(0..last);
        let mut per_pred: Vec<Option<PredictionLosses>> = vec![None; predictions.len()];
        for i in order {
            let mut pl = self.prediction_losses(&predictions[i], targets, num_masks, points)?;
            pl.index = i;
            pl.is_final = i == last;
            per_pred[i] = Some(pl);
        }
        let per_pred: Vec<PredictionLosses> = per_pred.into_iter().map(|p| p.expect("every index visited")).collect();
        let oracle = self.oracle_loss(&predictions[last], query_label, hw)?;

        let c = &self.config;
        let mut terms = Vec::with_capacity(2 * per_pred.len() + 1);
        let mut push = |name: String, raw: &Tensor, weight: f64| -> Result<()> {
            terms.push(LossTerm { name, raw: raw.clone(), weight, weighted: (raw * weight)? });
            Ok(())
        };
        let fin = &per_pred[last];
        push("loss_mask".into(), &fin.loss_mask, c.mask_weight)?;
        push("loss_dice".into(), &fin.loss_dice, c.dice_weight)?;
        for p in &per_pred[..last] {
            push(format!("loss_mask_{}", p.index), &p.loss_mask, c.mask_weight)?;
            push(format!("loss_dice_{}", p.index), &p.loss_dice, c.dice_weight)?;
        }
        push("fewshot_loss".into(), &oracle.dice, c.fewshot_weight)?;
        let dtype = predictions[last].dtype();
        let weighted: Vec<Tensor> = terms.iter().map(|t| t.weighted.to_dtype(dtype)).collect::<Result<_>>()?;
        let total = Tensor::stack(&weighted, 0)?.sum_all()?;
        Ok(Stage1Losses { predictions: per_pred, oracle, terms, total, num_masks })
    }

    fn check_inputs(&self, predictions: &[Tensor], targets: &[Tensor], query_label: &Tensor) -> Result<(usize, usize)> {
        let first = match predictions.first() {
            Some(p) => p,
            None => bail!("stage-1 loss: no predictions given"),
        };
        let (b, q) = match first.dims() {
            &[b, q, _, _] => (b, q),
            _ => bail!("stage-1 loss: predictions must be (B, Q, h, w), got {:?}", first.shape()),
        };
        if b == 0 || q == 0 {
            bail!("stage-1 loss: empty prediction batch {:?}", first.shape());
        }
        for (i, p) in predictions.iter().enumerate() {
            if p.rank() != 4 || p.dim(0)? != b || p.dim(1)? != q {
                bail!("stage-1 loss: prediction {i} has shape {:?}, expected (B={b}, Q={q}, h, w)", p.shape());
            }
            if !matches!(p.dtype(), DType::F32 | DType::F64) {
                bail!("stage-1 loss: prediction {i} must be f32 or f64, got {:?}", p.dtype());
            }
        }
        let hw = match query_label.dims() {
            &[lb, h, w] if lb == b => (h, w),
            _ => bail!("stage-1 loss: query_label must be (B={b}, H, W), got {:?}", query_label.shape()),
        };
        if targets.len() != b {
            bail!("stage-1 loss: {} target sets for a batch of {b} images", targets.len());
        }
        for (i, t) in targets.iter().enumerate() {
            match t.dims() {
                &[_, h, w] if (h, w) == hw => {}
                _ => bail!("stage-1 loss: targets[{i}] must be (M, {}, {}) (the label size), got {:?}", hw.0, hw.1, t.shape()),
            }
        }
        Ok(hw)
    }

    /// Matching and mask losses of one prediction `pred` (B, Q, h, w).
    pub fn prediction_losses(
        &self,
        pred: &Tensor,
        targets: &[Tensor],
        num_masks: f64,
        points: &mut dyn PointSource,
    ) -> Result<PredictionLosses> {
        let matches = self.matcher().forward(pred, targets, points)?;
        let (loss_mask, loss_dice, point_coords) = self.matched_mask_losses(pred, targets, &matches, num_masks, points)?;
        Ok(PredictionLosses { index: 0, is_final: false, loss_mask, loss_dice, matches, point_coords })
    }

    /// The matched masks of a batch: logits (n, h, w) (with gradient) and GT masks (n, H, W),
    /// batch-major in match order (the official `_get_src_permutation_idx` order).
    pub fn gather_matched(pred: &Tensor, targets: &[Tensor], matches: &[ImageMatch]) -> Result<Option<(Tensor, Tensor)>> {
        let (b, q, h, w) = pred.dims4()?;
        if matches.len() != b || targets.len() != b {
            bail!("gather_matched: {} matches and {} targets for a batch of {b}", matches.len(), targets.len());
        }
        let mut src = Vec::new();
        let mut tgts = Vec::new();
        for (i, (m, t)) in matches.iter().zip(targets).enumerate() {
            if m.src.len() != m.tgt.len() {
                bail!("gather_matched: image {i} has {} queries for {} targets", m.src.len(), m.tgt.len());
            }
            if m.src.is_empty() {
                continue;
            }
            let nt = t.dim(0)?;
            if let Some(&s) = m.src.iter().find(|&&s| s >= q) {
                bail!("gather_matched: image {i} matches query {s} of {q}");
            }
            if let Some(&j) = m.tgt.iter().find(|&&j| j >= nt) {
                bail!("gather_matched: image {i} matches GT mask {j} of {nt}");
            }
            src.extend(m.src.iter().map(|&s| (i * q + s) as u32));
            let idx: Vec<u32> = m.tgt.iter().map(|&j| j as u32).collect();
            let idx = Tensor::from_vec(idx, m.tgt.len(), t.device())?;
            tgts.push(t.index_select(&idx, 0)?);
        }
        if src.is_empty() {
            return Ok(None);
        }
        let n = src.len();
        let src = Tensor::from_vec(src, n, pred.device())?;
        let logits = pred.reshape((b * q, h, w))?.index_select(&src, 0)?;
        let masks = Tensor::cat(&tgts, 0)?.to_dtype(pred.dtype())?;
        Ok(Some((logits, masks)))
    }

    /// Point-sampled mask BCE and dice of the matched pairs, with importance-sampled points.
    /// Returns (loss_mask, loss_dice, point_coords). No matched pair gives zero losses.
    pub fn matched_mask_losses(
        &self,
        pred: &Tensor,
        targets: &[Tensor],
        matches: &[ImageMatch],
        num_masks: f64,
        points: &mut dyn PointSource,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let Some((logits, masks)) = Self::gather_matched(pred, targets, matches)? else {
            let zero = Tensor::zeros((), pred.dtype(), pred.device())?;
            let coords = Tensor::zeros((0, c.num_points, 2), DType::F32, pred.device())?;
            return Ok((zero.clone(), zero, coords));
        };
        let coords =
            uncertain_point_coords(&logits, c.num_points, c.oversample_ratio, c.importance_sample_ratio, points)?;
        let (loss_mask, loss_dice) = point_mask_losses(&logits, &masks, &coords, num_masks)?;
        Ok((loss_mask, loss_dice, coords))
    }

    /// The oracle few-shot loss on the final prediction `pred` (B, Q, h, w) against the binary
    /// label (B, H, W) (255 counts as background), at the label size `hw`.
    pub fn oracle_loss(&self, pred: &Tensor, query_label: &Tensor, hw: (usize, usize)) -> Result<OracleLoss> {
        let (b, q, h, w) = pred.dims4()?;
        let label = binary_label_ignore_as_background(query_label, pred.dtype(), pred.device())?;
        // The IoUs only pick an index (no gradient): detached probabilities, and no upsampled
        // (B, Q, H, W) masks in memory (`soft_iou_upsampled`).
        let probs = candle_nn::ops::sigmoid(&pred.detach())?;
        let ious = soft_iou_upsampled(&probs, &label.reshape((b, hw.0, hw.1))?)?;
        if ious.dims() != [b, q] {
            bail!("oracle loss: soft IoU gave shape {:?}, expected ({b}, {q})", ious.shape());
        }
        let rows: Vec<Vec<f64>> = ious.to_dtype(DType::F64)?.to_vec2()?;
        let mut index = Vec::with_capacity(b);
        for (i, row) in rows.iter().enumerate() {
            index.push(argmax_first(row).ok_or_else(|| {
                candle_core::Error::Msg(format!("oracle loss: image {i} has a NaN proposal IoU"))
            })?);
        }
        // Upsampling is per channel, so upsampling only the chosen logits' sigmoid equals
        // selecting from all upsampled masks, and the gradient reaches only the chosen mask.
        let sel: Vec<u32> = index.iter().enumerate().map(|(i, &k)| (i * q + k) as u32).collect();
        let sel = Tensor::from_vec(sel, b, pred.device())?;
        let chosen = pred.reshape((b * q, h, w))?.index_select(&sel, 0)?.unsqueeze(1)?;
        let out = ops::resize::resize_bilinear(&candle_nn::ops::sigmoid(&chosen)?, hw, false)?;
        let pred2 = Tensor::cat(&[&out.affine(-1.0, 1.0)?, &out], 1)?;
        let dice = weighted_dice_loss(&pred2, &label)?;
        Ok(OracleLoss { ious, index, out, dice })
    }
}

/// Index of the first maximum (torch `argmax` tie rule); `None` if a value is NaN or the row is empty.
fn argmax_first(row: &[f64]) -> Option<usize> {
    if row.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut best: Option<usize> = None;
    for (i, &v) in row.iter().enumerate() {
        if best.is_none_or(|b| v > row[b]) {
            best = Some(i);
        }
    }
    best
}

/// Mask BCE and dice of matched logits (n, h, w) against GT masks (n, H, W) at given points
/// (n, P, 2): logits are sampled at their own resolution, masks at theirs, with the same
/// normalised coordinates. Returns (loss_mask, loss_dice), each summed over masks / `num_masks`.
pub fn point_mask_losses(logits: &Tensor, masks: &Tensor, coords: &Tensor, num_masks: f64) -> Result<(Tensor, Tensor)> {
    let n = logits.dim(0)?;
    if masks.rank() != 3 || masks.dim(0)? != n || coords.rank() != 3 || coords.dim(0)? != n {
        bail!(
            "point_mask_losses: logits {:?}, masks {:?} and coords {:?} must have the same number of masks",
            logits.shape(),
            masks.shape(),
            coords.shape()
        );
    }
    let labels = sample_maps(&masks.detach().to_dtype(logits.dtype())?, coords)?;
    let point_logits = sample_maps(logits, coords)?;
    Ok((sigmoid_bce_loss(&point_logits, &labels, num_masks)?, dice_loss(&point_logits, &labels, num_masks)?))
}
