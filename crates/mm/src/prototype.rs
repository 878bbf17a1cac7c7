//! Masked global average pooling (spec §3.5) and the cosine matching score (§3.6).

use candle_core::{bail, DType, Result, Tensor, D};

/// Epsilon added to the support mask area (official `get_sup_propotype`).
const SUPPORT_AREA_EPS: f64 = 1e-7;
/// Floor of a proposal's area in [`query_prototypes`] (far below any area a sigmoid mask has).
pub const MIN_PROPOSAL_AREA: f64 = 1e-12;
/// `F.cosine_similarity`'s default norm floor.
const COSINE_EPS: f64 = 1e-8;

/// Support prototype `Σ(S·m) / (Σm + 1e-7)` with `m` the support mask resized bilinearly
/// (align_corners=True) to the feature size.
///
/// `features`: (B, C, h, w); `mask`: (B, 1, H, W) float 0/1 -> (B, C).
pub fn support_prototype(features: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = features.dims4()?;
    if mask.dims().len() != 4 || mask.dim(0)? != b || mask.dim(1)? != 1 {
        bail!("support_prototype: mask must be (B={b}, 1, H, W), got {:?}", mask.shape());
    }
    let m = ops::resize::resize_bilinear(mask, (h, w), true)?.reshape((b, h * w, 1))?;
    let area = m.sum(1)?; // (B, 1)
    let pooled = features.reshape((b, c, h * w))?.matmul(&m)?.squeeze(2)?; // (B, C)
    pooled.broadcast_div(&(area + SUPPORT_AREA_EPS)?)
}

/// [`support_prototype`] on tokens: `tokens` (B, h·w, C) of an (h, w) map, `mask` (B, 1, H, W)
/// float 0/1 -> (B, C). The same sums as on the map, without transposing it.
pub fn support_prototype_tokens(tokens: &Tensor, (h, w): (usize, usize), mask: &Tensor) -> Result<Tensor> {
    let (_, l, _) = tokens.dims3()?;
    if l != h * w {
        bail!("support_prototype: {l} tokens for a {h}x{w} map");
    }
    SupportMask::new(mask, (h, w), false)?.pool(tokens)
}

/// Below this share of a map's tokens, [`SupportMask`] selects the rows its prototype reads.
/// Above it the gather and its backward cost more than the rows they skip.
const SELECT_MAX_SHARE: f64 = 0.85;

/// The support label resized (bilinear, align_corners=True) to one feature size: the weights of
/// the support prototype, and the token rows with a non-zero weight.
///
/// The prototype reads the cross-aligned support only where the weight is non-zero, and the
/// support's cross-alignment works token by token (its attention queries, LayerNorms and FFNs
/// are per row; its keys are the query's). So only those rows need aligning: an exact saving
/// (a zero-weight row adds exactly zero to the sum), about three quarters of the support
/// direction for an object covering a quarter of the image.
#[derive(Debug, Clone)]
pub struct SupportMask {
    /// (B, 1, h·w)
    weights: Tensor,
    /// (B, 1): Σ weights + 1e-7, over all positions.
    area: Tensor,
    hw: (usize, usize),
    /// The selected rows: flat indices into (B·h·w) tokens, (B·L_sel) u32, each batch element
    /// padded to the longest with zero-weight rows of its own; and their weights (B, 1, L_sel).
    selected: Option<(Tensor, Tensor)>,
}

impl SupportMask {
    /// `mask`: (B, 1, H, W) float 0/1; `hw`: the feature size. With `select`, the rows with a
    /// non-zero weight are picked out when they are fewer than [`SELECT_MAX_SHARE`] of all
    /// (this reads the weights back to the host).
    pub fn new(mask: &Tensor, hw: (usize, usize), select: bool) -> Result<Self> {
        let b = match mask.dims() {
            &[b, 1, _, _] => b,
            _ => bail!("support_prototype: mask must be (B, 1, H, W), got {:?}", mask.shape()),
        };
        let l = hw.0 * hw.1;
        let weights = ops::resize::resize_bilinear(mask, hw, true)?.reshape((b, 1, l))?;
        let area = (weights.sum(2)? + SUPPORT_AREA_EPS)?;
        let selected = if select { Self::select(&weights, b, l)? } else { None };
        Ok(Self { weights, area, hw, selected })
    }

    fn select(weights: &Tensor, b: usize, l: usize) -> Result<Option<(Tensor, Tensor)>> {
        let w = weights.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let rows: Vec<Vec<u32>> =
            w.chunks(l).map(|wb| (0..l as u32).filter(|&j| wb[j as usize] != 0.0).collect()).collect();
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        if longest as f64 > SELECT_MAX_SHARE * l as f64 {
            return Ok(None);
        }
        let mut flat = Vec::with_capacity(b * longest);
        for (bi, (r, wb)) in rows.iter().zip(w.chunks(l)).enumerate() {
            let base = (bi * l) as u32;
            // Every element has a zero-weight row (its rows are fewer than `l`): the padding
            // repeats it, so the padding adds exactly zero to the prototype.
            let zero = (0..l).find(|&j| wb[j] == 0.0).expect("fewer selected rows than positions") as u32;
            flat.extend(r.iter().map(|&j| base + j));
            flat.extend(std::iter::repeat_n(base + zero, longest - r.len()));
        }
        let index = Tensor::from_vec(flat, b * longest, weights.device())?;
        let sel_w = weights.flatten_all()?.index_select(&index, 0)?.reshape((b, 1, longest))?;
        Ok(Some((index, sel_w)))
    }

    /// The rows the prototype reads, as flat indices into (B·h·w) tokens; `None` for all rows.
    pub fn rows(&self) -> Option<&Tensor> {
        self.selected.as_ref().map(|(i, _)| i)
    }

    /// The support prototype (B, C) from `tokens`: (B, L_sel, C) aligned at [`Self::rows`], or
    /// (B, h·w, C) when no rows were selected.
    pub fn pool(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, l, _) = tokens.dims3()?;
        let weights = match &self.selected {
            Some((_, w)) => w,
            None => &self.weights,
        };
        let (wb, _, wl) = weights.dims3()?;
        if (b, l) != (wb, wl) {
            bail!("support_prototype: {b}x{l} tokens for a mask of {wb}x{wl} rows at {}x{}", self.hw.0, self.hw.1);
        }
        let pooled = weights.matmul(tokens)?.squeeze(1)?; // (B, C)
        pooled.broadcast_div(&self.area)
    }
}

/// Query prototypes, one per proposal: `Σ(Q·m_q) / Σm_q` with the soft proposals resized
/// bilinearly (align_corners=True) to the feature size. No epsilon, as in the official code,
/// except that an area below [`MIN_PROPOSAL_AREA`] is raised to it: float sigmoid masks are never
/// exactly zero everywhere, but proposals read back from u8 shards can be, and 0/0 would turn the
/// whole episode (and training) into NaN. Such a proposal gets a zero prototype instead.
///
/// `features`: (B, C, h, w); `proposals`: (B, N, H', W') probabilities -> (B, N, C).
pub fn query_prototypes(features: &Tensor, proposals: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = features.dims4()?;
    ProposalMasks::new(proposals, (h, w))?.pool(features)
}

/// Soft proposals resized (bilinear, align_corners=True) to one feature size, with their areas:
/// the part of [`query_prototypes`] that depends only on the proposals, so an episode resizes
/// them once per level whatever its shot count.
#[derive(Debug, Clone)]
pub struct ProposalMasks {
    /// (B, N, h·w)
    masks: Tensor,
    /// (B, N, 1), floored at [`MIN_PROPOSAL_AREA`]
    area: Tensor,
    hw: (usize, usize),
}

impl ProposalMasks {
    /// `proposals`: (B, N, H', W') probabilities; `hw`: the feature size they are pooled at.
    pub fn new(proposals: &Tensor, hw: (usize, usize)) -> Result<Self> {
        let (b, n, _, _) = proposals.dims4()?;
        let masks = ops::resize::resize_bilinear(proposals, hw, true)?.reshape((b, n, hw.0 * hw.1))?;
        let area = masks.sum_keepdim(2)?.maximum(MIN_PROPOSAL_AREA)?;
        Ok(Self { masks, area, hw })
    }

    /// The masks repeated `k` times along the batch (batch element `s·B + b` is element `b`).
    pub fn repeat(&self, k: usize) -> Result<Self> {
        Ok(Self { masks: self.masks.repeat((k, 1, 1))?, area: self.area.repeat((k, 1, 1))?, hw: self.hw })
    }

    /// `features`: (B, C, h, w) at this size -> (B, N, C) query prototypes.
    pub fn pool(&self, features: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = features.dims4()?;
        let mb = self.masks.dim(0)?;
        if mb != b {
            bail!("query_prototypes: {mb} proposal sets for a batch of {b}");
        }
        if (h, w) != self.hw {
            bail!("query_prototypes: features of {h}x{w}, proposals resized to {}x{}", self.hw.0, self.hw.1);
        }
        let pooled = self.masks.matmul(&features.reshape((b, c, h * w))?.transpose(1, 2)?)?; // (B, N, C)
        pooled.broadcast_div(&self.area)
    }

    /// [`Self::pool`] on tokens (B, h·w, C) of the map at this size -> (B, N, C).
    pub fn pool_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, l, _) = tokens.dims3()?;
        let mb = self.masks.dim(0)?;
        if mb != b {
            bail!("query_prototypes: {mb} proposal sets for a batch of {b}");
        }
        if l != self.hw.0 * self.hw.1 {
            bail!("query_prototypes: {l} tokens, proposals resized to {}x{}", self.hw.0, self.hw.1);
        }
        ops::nn::matmul(&self.masks, tokens)?.broadcast_div(&self.area)
    }
}

/// `F.cosine_similarity(a, b, dim=-1, eps=1e-8)`: each side divided by max(‖·‖, eps).
///
/// `a`: (B, N, D), `b`: (B, 1, D) (broadcast over N) -> (B, N).
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let unit = |x: &Tensor| -> Result<Tensor> {
        // max(√s, eps) taken as √max(s, eps²): same value, and a zero vector (empty support
        // mask) gets a zero gradient instead of the NaN of √ at 0.
        let norm = x.sqr()?.sum_keepdim(D::Minus1)?.maximum(COSINE_EPS * COSINE_EPS)?.sqrt()?;
        x.broadcast_div(&norm)
    };
    unit(a)?.broadcast_mul(&unit(b)?)?.sum(D::Minus1)
}
