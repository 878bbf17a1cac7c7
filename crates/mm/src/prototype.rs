//! Masked global average pooling (spec §3.5) and the cosine matching score (§3.6).

use candle_core::{bail, Result, Tensor, D};

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
    let (b, l, _) = tokens.dims3()?;
    if l != h * w {
        bail!("support_prototype: {l} tokens for a {h}x{w} map");
    }
    if mask.dims().len() != 4 || mask.dim(0)? != b || mask.dim(1)? != 1 {
        bail!("support_prototype: mask must be (B={b}, 1, H, W), got {:?}", mask.shape());
    }
    let m = ops::resize::resize_bilinear(mask, (h, w), true)?.reshape((b, 1, h * w))?;
    let area = m.sum(2)?; // (B, 1)
    let pooled = m.matmul(tokens)?.squeeze(1)?; // (B, C)
    pooled.broadcast_div(&(area + SUPPORT_AREA_EPS)?)
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
        self.masks.matmul(tokens)?.broadcast_div(&self.area)
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
