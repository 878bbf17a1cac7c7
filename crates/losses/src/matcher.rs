//! Mask2Former's `HungarianMatcher` without the class cost (MM-Former POS, spec §2.3).

use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

use crate::mask::pairwise_costs;
use crate::points::{sample_maps_shared, PointDraw, PointSource};

/// Optimal assignment of a (rows, cols) cost matrix (scipy `linear_sum_assignment`, minimise):
/// returns (row indices ascending, their columns); min(rows, cols) pairs. The matrix is solved in
/// f64, as scipy converts a float32 cost. Non-finite costs are an error.
pub fn linear_sum_assignment(cost: &Tensor) -> Result<(Vec<usize>, Vec<usize>)> {
    let (r, c) = match cost.dims() {
        &[r, c] => (r, c),
        _ => bail!("linear_sum_assignment: cost must be 2-D, got {:?}", cost.shape()),
    };
    let flat: Vec<f64> = cost.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    solve_host(r, c, &flat)
}

/// [`linear_sum_assignment`] of a row-major (r, c) matrix already on the host (`lsap` takes a `Vec`).
fn solve_host(r: usize, c: usize, flat: &Vec<f64>) -> Result<(Vec<usize>, Vec<usize>)> {
    if let Some(v) = flat.iter().find(|v| !v.is_finite()) {
        bail!("linear_sum_assignment: the {r}x{c} cost matrix holds a non-finite entry ({v})");
    }
    let (rows, cols) = lsap::solve(r, c, flat, false)
        .map_err(|e| candle_core::Error::Msg(format!("linear_sum_assignment on a {r}x{c} matrix failed: {e}")))?;
    // scipy's contract: rows ascending. lsap already returns them so; enforce it for safety.
    let mut pairs: Vec<(usize, usize)> = rows.into_iter().zip(cols).collect();
    pairs.sort_unstable();
    Ok(pairs.into_iter().unzip())
}

/// The matching of one image's predictions to its GT masks.
#[derive(Clone, Debug)]
pub struct ImageMatch {
    /// Matched query indices, ascending.
    pub src: Vec<usize>,
    /// The GT mask matched to each `src` entry.
    pub tgt: Vec<usize>,
    /// The (Q, M) cost matrix that was solved (f32, detached).
    pub cost: Tensor,
}

/// Hungarian matcher on point-sampled masks: cost = `cost_mask`·BCE + `cost_dice`·dice, both
/// averaged/summed over `num_points` uniform points shared by all masks of an image.
#[derive(Clone, Debug)]
pub struct HungarianMatcher {
    pub cost_mask: f64,
    pub cost_dice: f64,
    pub num_points: usize,
}

impl Default for HungarianMatcher {
    /// The POS settings: weights 5 / 5, 12544 points.
    fn default() -> Self {
        Self { cost_mask: 5.0, cost_dice: 5.0, num_points: 12544 }
    }
}

impl HungarianMatcher {
    /// The (Q, M) cost of predictions `pred` (Q, h, w) (logits, any resolution) against GT masks
    /// `tgt` (M, H, W) at `points` (1, P, 2) or (P, 2), (x, y) in [0, 1]. Detached, f32.
    pub fn cost_matrix(&self, pred: &Tensor, tgt: &Tensor, points: &Tensor) -> Result<Tensor> {
        if pred.rank() != 3 || tgt.rank() != 3 {
            bail!(
                "HungarianMatcher: predictions must be (Q, h, w) and targets (M, H, W), got {:?} and {:?}",
                pred.shape(),
                tgt.shape()
            );
        }
        let pred = pred.detach().to_dtype(DType::F32)?;
        let tgt = tgt.detach().to_dtype(DType::F32)?;
        let out = sample_maps_shared(&pred, points)?; // (Q, P)
        let tgt = sample_maps_shared(&tgt, points)?; // (M, P)
        let (bce, dice) = pairwise_costs(&out, &tgt)?;
        (bce * self.cost_mask)? + (dice * self.cost_dice)?
    }

    /// Matches one image at the given points.
    pub fn match_image(&self, pred: &Tensor, tgt: &Tensor, points: &Tensor) -> Result<ImageMatch> {
        if let (&[q, _, _], &[0, _, _]) = (pred.dims(), tgt.dims()) {
            // Nothing to match; an empty tensor never reaches the sampler or the solver.
            let cost = Tensor::zeros((q, 0), DType::F32, pred.device())?;
            return Ok(ImageMatch { src: vec![], tgt: vec![], cost });
        }
        let cost = self.cost_matrix(pred, tgt, points)?;
        let (src, tgt_idx) = linear_sum_assignment(&cost)?;
        Ok(ImageMatch { src, tgt: tgt_idx, cost })
    }

    /// Matches every image of a batch: `pred_masks` (B, Q, h, w) logits, `targets[b]` (M_b, H, W).
    /// Draws one point set per image from `points`, in image order. An image without GT masks
    /// gets an empty match (and still consumes its draw, like the official loop).
    pub fn forward(&self, pred_masks: &Tensor, targets: &[Tensor], points: &mut dyn PointSource) -> Result<Vec<ImageMatch>> {
        let b = match pred_masks.dims() {
            &[b, _, _, _] => b,
            _ => bail!("HungarianMatcher: pred_masks must be (B, Q, h, w), got {:?}", pred_masks.shape()),
        };
        if targets.len() != b {
            bail!("HungarianMatcher: {} target sets for a batch of {b}", targets.len());
        }
        if self.num_points == 0 {
            bail!("HungarianMatcher: num_points must be positive");
        }
        // Every image's cost is queued first and read back after: on a GPU the device then
        // waits once per batch, not once per image. The solves run in parallel.
        let mut costs = Vec::with_capacity(b);
        for (i, tgt) in targets.iter().enumerate() {
            let pts = points.draw(PointDraw::Match, 1, self.num_points, pred_masks.device())?;
            let pred = pred_masks.get(i)?;
            costs.push(match (pred.dims(), tgt.dims()) {
                (&[q, _, _], &[0, _, _]) => Err(Tensor::zeros((q, 0), DType::F32, pred.device())?),
                _ => Ok(self.cost_matrix(&pred, tgt, &pts)?),
            });
        }
        let host: Vec<Option<(usize, usize, Vec<f64>)>> = costs
            .iter()
            .map(|c| match c {
                Ok(cost) => Ok(Some((cost.dim(0)?, cost.dim(1)?, cost.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?))),
                Err(_) => Ok(None),
            })
            .collect::<Result<_>>()?;
        let solved: Vec<Option<(Vec<usize>, Vec<usize>)>> = host
            .par_iter()
            .map(|h| h.as_ref().map(|(r, c, flat)| solve_host(*r, *c, flat)).transpose())
            .collect::<Result<_>>()?;
        Ok(costs
            .into_iter()
            .zip(solved)
            .map(|(cost, s)| match (cost, s) {
                (Ok(cost), Some((src, tgt))) => ImageMatch { src, tgt, cost },
                (Ok(cost), None) | (Err(cost), _) => ImageMatch { src: vec![], tgt: vec![], cost },
            })
            .collect())
    }
}
