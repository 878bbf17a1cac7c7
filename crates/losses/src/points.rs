//! Random point sets for the matcher and the mask losses, and Mask2Former's uncertainty-based
//! importance sampling (`get_uncertain_point_coords_with_randomness`).
//!
//! Points are (x, y) in [0, 1), the `point_sample` convention (align_corners=False). Every draw
//! goes through a [`PointSource`]: [`RngPoints`] for training (seeded, reproducible) or
//! [`FixedPoints`] to replay stored draws (the parity fixture replaced the three `torch.rand`
//! calls the same way).

use candle_core::{bail, DType, Device, Result, Tensor};
use rand_chacha::rand_core::RngCore;
use rayon::prelude::*;

/// Which `torch.rand` call of the official code a draw replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointDraw {
    /// `HungarianMatcher`: one set of `num_points` shared by all masks of an image.
    Match,
    /// Loss: `num_points * oversample_ratio` candidates per matched mask.
    Oversample,
    /// Loss: the `num_points - num_uncertain` uniform points added per matched mask.
    Random,
}

/// A provider of uniform point sets.
pub trait PointSource {
    /// `sets` sets of `n` points, as an f32 tensor (sets, n, 2) of (x, y) in [0, 1).
    fn draw(&mut self, kind: PointDraw, sets: usize, n: usize, device: &Device) -> Result<Tensor>;
}

/// Uniform points from a caller-owned RNG. Each coordinate is the top 24 bits of one `next_u32`
/// scaled by 2^-24, a mapping fixed here (not rand's `gen`) so a seed gives the same points on
/// every machine and rand release.
pub struct RngPoints<'a, R: RngCore + ?Sized> {
    rng: &'a mut R,
}

impl<'a, R: RngCore + ?Sized> RngPoints<'a, R> {
    pub fn new(rng: &'a mut R) -> Self {
        Self { rng }
    }
}

/// `sets` x `n` uniform (x, y) points in [0, 1) from `rng` (see [`RngPoints`]).
pub fn uniform_points<R: RngCore + ?Sized>(rng: &mut R, sets: usize, n: usize, device: &Device) -> Result<Tensor> {
    let scale = 1.0 / (1u32 << 24) as f32;
    let data: Vec<f32> = (0..sets * n * 2).map(|_| (rng.next_u32() >> 8) as f32 * scale).collect();
    Tensor::from_vec(data, (sets, n, 2), device)
}

impl<R: RngCore + ?Sized> PointSource for RngPoints<'_, R> {
    fn draw(&mut self, _kind: PointDraw, sets: usize, n: usize, device: &Device) -> Result<Tensor> {
        uniform_points(self.rng, sets, n, device)
    }
}

/// Replays stored point sets: every draw of a kind returns the same tensor, whose shape must be
/// exactly what the draw asks for (a mismatch is an error, not a silent reshape).
#[derive(Clone, Debug)]
pub struct FixedPoints {
    /// (1, num_points, 2), used for every image and prediction.
    pub match_points: Tensor,
    /// (n_matched, num_points * oversample_ratio, 2).
    pub oversample: Tensor,
    /// (n_matched, num_points - num_uncertain, 2).
    pub random: Tensor,
}

impl PointSource for FixedPoints {
    fn draw(&mut self, kind: PointDraw, sets: usize, n: usize, device: &Device) -> Result<Tensor> {
        let t = match kind {
            PointDraw::Match => &self.match_points,
            PointDraw::Oversample => &self.oversample,
            PointDraw::Random => &self.random,
        };
        if t.dims() != [sets, n, 2] {
            bail!("fixed {kind:?} points have shape {:?}, the draw needs ({sets}, {n}, 2)", t.shape());
        }
        t.to_device(device)?.to_dtype(DType::F32)
    }
}

/// Per row of `uncertainty` (n, P), the indices of the `k` largest values, largest first; ties
/// keep the lower index first. This is `torch.topk(..., sorted=True)` up to the order of exact
/// ties (which torch leaves unspecified).
pub fn top_k_indices(uncertainty: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
    let rows: Vec<Vec<f32>> = uncertainty.to_dtype(DType::F32)?.to_vec2()?;
    rows.into_par_iter().map(|row| top_k_row(row, k)).collect()
}

fn top_k_row(row: Vec<f32>, k: usize) -> Result<Vec<usize>> {
    if k > row.len() {
        bail!("top_k_indices: k = {k} exceeds the {} candidates", row.len());
    }
    if row.iter().any(|v| v.is_nan()) {
        bail!("top_k_indices: NaN uncertainty (non-finite mask logits)");
    }
    let mut idx: Vec<usize> = (0..row.len()).collect();
    // Descending value, then ascending index: a total order (NaN was excluded above), so
    // partitioning at k and sorting only the kept prefix equals a full sort's first k.
    let order = |a: &usize, b: &usize| row[*b].partial_cmp(&row[*a]).unwrap().then(a.cmp(b));
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
    }
    idx.truncate(k);
    idx.sort_unstable_by(order);
    Ok(idx)
}

/// Mask2Former's point uncertainty: −|logit| (the closer to the decision boundary, the higher).
pub fn logit_uncertainty(point_logits: &Tensor) -> Result<Tensor> {
    point_logits.abs()?.neg()
}

/// Importance sampling of loss points for `coarse_logits` (n, h, w): draw `num_points *
/// oversample_ratio` candidates per mask, keep the `importance_ratio * num_points` with the
/// highest [`logit_uncertainty`] (in descending order), then append fresh uniform points up to
/// `num_points`. Returns detached (n, num_points, 2) f32 coordinates.
pub fn uncertain_point_coords(
    coarse_logits: &Tensor,
    num_points: usize,
    oversample_ratio: f64,
    importance_ratio: f64,
    source: &mut dyn PointSource,
) -> Result<Tensor> {
    let (n, _, _) = match coarse_logits.dims() {
        &[n, h, w] => (n, h, w),
        _ => bail!("uncertain_point_coords: logits must be (n, h, w), got {:?}", coarse_logits.shape()),
    };
    if oversample_ratio.is_nan() || oversample_ratio < 1.0 {
        bail!("uncertain_point_coords: oversample_ratio must be >= 1, got {oversample_ratio}");
    }
    if !(0.0..=1.0).contains(&importance_ratio) {
        bail!("uncertain_point_coords: importance_ratio must be in [0, 1], got {importance_ratio}");
    }
    // int() truncation, as the official code computes both counts.
    let num_sampled = (num_points as f64 * oversample_ratio) as usize;
    let num_uncertain = (importance_ratio * num_points as f64) as usize;
    let num_random = num_points - num_uncertain;
    let device = coarse_logits.device();
    let candidates = source.draw(PointDraw::Oversample, n, num_sampled, device)?;
    let logits = coarse_logits.detach().to_dtype(DType::F32)?.unsqueeze(1)?;
    let point_logits = ops::sample::point_sample(&logits, &candidates)?.squeeze(1)?; // (n, S)
    let selected = select_points(&candidates, &logit_uncertainty(&point_logits)?, num_uncertain)?;
    if num_random == 0 {
        return Ok(selected);
    }
    let random = source.draw(PointDraw::Random, n, num_random, device)?;
    Tensor::cat(&[&selected, &random], 1)
}

/// Gathers, per row, the candidates (n, S, 2) at the `k` highest `uncertainty` (n, S) values.
pub fn select_points(candidates: &Tensor, uncertainty: &Tensor, k: usize) -> Result<Tensor> {
    let (n, s) = match candidates.dims() {
        &[n, s, 2] => (n, s),
        _ => bail!("select_points: candidates must be (n, S, 2), got {:?}", candidates.shape()),
    };
    if uncertainty.dims() != [n, s] {
        bail!("select_points: uncertainty {:?} does not match candidates {:?}", uncertainty.shape(), candidates.shape());
    }
    let top = top_k_indices(uncertainty, k)?;
    let flat: Vec<u32> = top
        .iter()
        .enumerate()
        .flat_map(|(r, idx)| idx.iter().map(move |&i| (r * s + i) as u32))
        .collect();
    let flat = Tensor::from_vec(flat, n * k, candidates.device())?;
    candidates.reshape((n * s, 2))?.index_select(&flat, 0)?.reshape((n, k, 2))
}

/// Samples (n, H, W) maps at per-map points (n, P, 2) -> (n, P), bilinear, zeros outside.
pub fn sample_maps(maps: &Tensor, coords: &Tensor) -> Result<Tensor> {
    ops::sample::point_sample(&maps.unsqueeze(1)?, coords)?.squeeze(1)
}

/// Samples (N, H, W) maps all at the same points (P, 2) or (1, P, 2) -> (N, P): the maps are
/// treated as channels of one image, which gives the same values as repeating the points per map
/// (the official matcher does that) with one set of bilinear taps.
pub fn sample_maps_shared(maps: &Tensor, coords: &Tensor) -> Result<Tensor> {
    let coords = match coords.dims() {
        [_, 2] => coords.unsqueeze(0)?,
        [1, _, 2] => coords.clone(),
        _ => bail!("sample_maps_shared: coords must be (P, 2) or (1, P, 2), got {:?}", coords.shape()),
    };
    ops::sample::point_sample(&maps.unsqueeze(0)?, &coords)?.squeeze(0)
}
