//! The CPU op behind [`super::matmul`]: a forward of single-threaded gemms over blocks of the
//! output, and a backward that skips untracked operands and keeps the large operand of each
//! gradient gemm in its stored layout.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fastmath::{gemm, storage_slice, unwritten, written, Real};
use crate::util::SyncPtr;

/// Output columns (or rows) per task at least: each task's gemm packs its share of the other
/// operand again.
const MIN_BLOCK: usize = 64;

/// Blocks of an output side of `long` (> 0) per batch item (> 0): equal shares, `batch · blocks`
/// a multiple of the threads, with the fewest blocks (more blocks per thread were slower: each
/// packs its share of the other operand again), each at least [`MIN_BLOCK`] and in whole
/// 16-lane panels. Returns (block length, blocks).
pub(super) fn output_blocks(batch: usize, long: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let per_item = threads / gcd(batch, threads);
    let block = long.div_ceil(per_item).max(MIN_BLOCK).next_multiple_of(16).min(long);
    (block, long.div_ceil(block))
}

/// `(.., m, k) · (.., k, n)` of contiguous row-major operands: tasks over (batch item, block of
/// the longer output side), the same number for every thread, each one single-threaded gemm. candle's
/// matmul lets the gemm split the work itself: on 2 threads the POS's mask logits (100 × 256 ·
/// 256 × 120²) took 4.73 ms that way against 4.36 here, and 0.15 against 0.07 ms at 15².
pub(crate) fn blocked_matmul<T: Real>(a: &[T], b: &[T], (batch, m, n, k): (usize, usize, usize, usize)) -> Vec<T> {
    let mut out = unwritten::<T>(batch * m * n);
    if out.is_empty() {
        return Vec::new();
    }
    // Split the longer side; the shorter one each task covers whole.
    let (split_cols, long) = if n >= m { (true, n) } else { (false, m) };
    let (block, blocks) = output_blocks(batch, long);
    let dst = SyncPtr(out.as_mut_ptr().cast::<T>());
    (0..batch * blocks).into_par_iter().for_each(|t| {
        let (bi, j) = (t / blocks, t % blocks);
        let (lo, hi) = (j * block, ((j + 1) * block).min(long));
        let (a, b) = (&a[bi * m * k..][..m * k], &b[bi * k * n..][..k * n]);
        // SAFETY: the task writes rows lo..hi (or columns lo..hi) of batch item bi's m×n output
        // and nothing else; a (m×k) and b (k×n) are in bounds; no accumulate, so nothing is read
        // from the output.
        unsafe {
            let o = dst.get().add(bi * m * n);
            if split_cols {
                gemm(m, hi - lo, k, o.add(lo), n, false, a.as_ptr(), k, 1, b.as_ptr().add(lo), n, 1, T::of(1.0));
            } else {
                gemm(hi - lo, n, k, o.add(lo * n), n, false, a.as_ptr().add(lo * k), k, 1, b.as_ptr(), n, 1, T::of(1.0));
            }
        }
    });
    // SAFETY: the blocks tile every batch item's output.
    unsafe { written(out) }
}

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
        fn run<T: Real>(op: &MatmulOp, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<CpuStorage> {
            let (a, b) = (storage_slice::<T>(s1, l1, "matmul lhs")?, storage_slice::<T>(s2, l2, "matmul rhs")?);
            let (batch, m, n, k) = op.bmnk;
            if a.len() != batch * m * k || b.len() != batch * k * n {
                bail!("fused matmul: operands of {} and {} values for {:?}", a.len(), b.len(), op.bmnk);
            }
            Ok(T::into_storage(blocked_matmul(a, b, op.bmnk)))
        }
        let out = match s1 {
            CpuStorage::F32(_) => run::<f32>(self, s1, l1, s2, l2)?,
            CpuStorage::F64(_) => run::<f64>(self, s1, l1, s2, l2)?,
            _ => bail!("fused matmul: only f32 and f64 are supported"),
        };
        Ok((out, Shape::from(dims)))
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
