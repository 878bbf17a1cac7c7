//! The CPU op behind [`super::matmul`]: candle's own matmul forward, and a backward that skips
//! untracked operands and keeps the large operand of each gradient gemm in its stored layout.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `(batch, m, n, k)` of `(.., m, k) · (.., k, n)`.
#[derive(Debug, Clone)]
pub(super) struct MatmulOp {
    pub bmnk: (usize, usize, usize, usize),
}

impl CustomOp2 for MatmulOp {
    fn name(&self) -> &'static str {
        "matmul-lean-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("matmul operands have rank >= 2") = self.bmnk.2;
        Ok((s1.matmul(s2, self.bmnk, l1, l2)?, Shape::from(dims)))
    }

    /// candle's matmul backward computes both gradients, and its `grad · rhsᵀ` makes gemm
    /// pack a column-major `rhsᵀ`: with a wide rhs (the mask features of the mask logits,
    /// 256 × 64² per image) that packing costs ten times the multiply. Here
    /// `d lhs = (rhs · gradᵀ)ᵀ` when lhs has fewer rows than columns, so only the small
    /// `gradᵀ` is packed column-major.
    fn bwd(&self, lhs: &Tensor, rhs: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, m, _, k) = self.bmnk;
        let d_lhs = match lhs.track_op() {
            true if m < k => Some(rhs.detach().matmul(&grad.t()?)?.t()?.contiguous()?),
            true => Some(grad.matmul(&rhs.detach().t()?)?),
            false => None,
        };
        let d_rhs = match rhs.track_op() {
            true => Some(lhs.detach().t()?.matmul(&grad)?),
            false => None,
        };
        Ok((d_lhs, d_rhs))
    }
}
