//! The CPU op behind [`super::pointwise_conv_tokens`]: a bias-free 1×1 convolution that reads a
//! channel-major map and writes tokens, so the transformer after it gets its (B, H·W, C) rows
//! without a transposition of the map (nor of its gradient in the backward).

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fastmath::{gemm, guard_slice, storage_slice, unwritten, written, Real};
use crate::util::SyncPtr;

use super::fused::transposed;
use super::matmul::output_blocks;

/// `y[b] = x[b]ᵀ · Wᵀ`: `x` (B, C_in, L) channel-major, `W` (C_out, C_in) -> `y` (B, L, C_out).
#[derive(Debug, Clone, Copy)]
pub(super) struct PointwiseTokens {
    pub b: usize,
    pub c_in: usize,
    pub l: usize,
    pub c_out: usize,
}

impl PointwiseTokens {
    fn forward<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let (b, cin, l, cout) = (self.b, self.c_in, self.l, self.c_out);
        let mut y = unwritten::<T>(b * l * cout);
        if y.is_empty() {
            return Vec::new();
        }
        // Wᵀ row-major (C_in, C_out): the layout gemm packs fastest; x[b]ᵀ is read in place
        // (column-major, each position's channels a stride L apart).
        let wt = transposed(w, cout, cin);
        // Split the longer output side; the other each task covers whole.
        let split_rows = l >= cout;
        let (block, blocks) = output_blocks(b, if split_rows { l } else { cout });
        let dst = SyncPtr(y.as_mut_ptr().cast::<T>());
        (0..b * blocks).into_par_iter().for_each(|t| {
            let (bi, j) = (t / blocks, t % blocks);
            let xb = &x[bi * cin * l..][..cin * l];
            // SAFETY: the task writes rows (positions) lo..hi or columns lo..hi of item bi's
            // L×C_out output and nothing else; x[b] (C_in×L) and Wᵀ (C_in×C_out) are in bounds;
            // no accumulate, so nothing is read from the output.
            unsafe {
                let o = dst.get().add(bi * l * cout);
                if split_rows {
                    let (lo, hi) = (j * block, ((j + 1) * block).min(l));
                    gemm(hi - lo, cout, cin, o.add(lo * cout), cout, false, xb.as_ptr().add(lo), 1, l, wt.as_ptr(), cout, 1, T::of(1.0));
                } else {
                    let (lo, hi) = (j * block, ((j + 1) * block).min(cout));
                    gemm(l, hi - lo, cin, o.add(lo), cout, false, xb.as_ptr(), 1, l, wt.as_ptr().add(lo), cout, 1, T::of(1.0));
                }
            }
        });
        // SAFETY: the blocks tile every item's output.
        unsafe { written(y) }
    }

    /// `dW = Σ_b (x[b] · dy[b])ᵀ`, (C_out, C_in): tasks over blocks of the longer side of the
    /// (C_in, C_out) product, each summing over the batch in its gemm's accumulator order.
    fn weight_grad<T: Real>(&self, x: &[T], dy: &[T]) -> Vec<T> {
        let (b, cin, l, cout) = (self.b, self.c_in, self.l, self.c_out);
        if cin * cout == 0 {
            return Vec::new();
        }
        if b * l == 0 {
            return vec![T::of(0.0); cout * cin];
        }
        let mut dwt = unwritten::<T>(cin * cout);
        let split_rows = cin >= cout;
        let (block, blocks) = output_blocks(1, if split_rows { cin } else { cout });
        let dst = SyncPtr(dwt.as_mut_ptr().cast::<T>());
        (0..blocks).into_par_iter().for_each(|j| {
            // SAFETY: the task writes rows (input channels) lo..hi or columns lo..hi of the
            // C_in×C_out product, its first batch item without reading them; x[b] (C_in×L) and
            // dy[b] (L×C_out) are in bounds.
            unsafe {
                let o = dst.get();
                for bi in 0..b {
                    let (xb, gb) = (x.as_ptr().add(bi * cin * l), dy.as_ptr().add(bi * l * cout));
                    if split_rows {
                        let (lo, hi) = (j * block, ((j + 1) * block).min(cin));
                        gemm(hi - lo, cout, l, o.add(lo * cout), cout, bi > 0, xb.add(lo * l), l, 1, gb, cout, 1, T::of(1.0));
                    } else {
                        let (lo, hi) = (j * block, ((j + 1) * block).min(cout));
                        gemm(cin, hi - lo, l, o.add(lo), cout, bi > 0, xb, l, 1, gb.add(lo), cout, 1, T::of(1.0));
                    }
                }
            }
        });
        // SAFETY: the blocks tile the product, each written by its first batch item.
        let dwt = unsafe { written(dwt) };
        transposed(&dwt, cin, cout)
    }
}

impl CustomOp2 for PointwiseTokens {
    fn name(&self) -> &'static str {
        "pointwise-conv-tokens"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(op: &PointwiseTokens, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<CpuStorage> {
            let (x, w) = (storage_slice::<T>(s1, l1, "pointwise conv x")?, storage_slice::<T>(s2, l2, "pointwise conv weight")?);
            if x.len() != op.b * op.c_in * op.l || w.len() != op.c_out * op.c_in {
                bail!("pointwise conv: {} input and {} weight values for {op:?}", x.len(), w.len());
            }
            Ok(T::into_storage(op.forward(x, w)))
        }
        let out = match s1 {
            CpuStorage::F32(_) => run::<f32>(self, s1, l1, s2, l2)?,
            CpuStorage::F64(_) => run::<f64>(self, s1, l1, s2, l2)?,
            _ => bail!("pointwise conv: only f32 and f64 are supported"),
        };
        Ok((out, Shape::from((self.b, self.l, self.c_out))))
    }

    /// Only the tracked operands' gradients: the weight's from the gemm above; the input's (the
    /// frozen features never need it) as `dy · W` brought back to the map layout.
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = match x.track_op() {
            true => {
                let (b, cin, l, cout) = (self.b, self.c_in, self.l, self.c_out);
                // All B·L token rows against the one weight: no per-item copy of it.
                let dt = super::matmul(&grad.reshape((b * l, cout))?, &w.detach())?.reshape((b, l, cin))?;
                Some(super::tokens_to_map(&dt, (1, l))?.reshape(x.shape())?)
            }
            false => None,
        };
        let dw = match w.track_op() {
            true => {
                fn run<T: Real>(op: &PointwiseTokens, x: &Tensor, g: &Tensor) -> Result<Vec<T>> {
                    let x = x.contiguous()?;
                    let (gx, gg) = (x.storage_and_layout(), g.storage_and_layout());
                    let r = op.weight_grad(guard_slice::<T>(&gx, "pointwise conv x")?, guard_slice::<T>(&gg, "pointwise conv grad")?);
                    drop((gx, gg));
                    Ok(r)
                }
                let v = match x.dtype() {
                    DType::F32 => Tensor::from_vec(run::<f32>(self, x, &grad)?, w.shape(), w.device())?,
                    DType::F64 => Tensor::from_vec(run::<f64>(self, x, &grad)?, w.shape(), w.device())?,
                    dt => bail!("pointwise conv: unsupported dtype {dt:?}"),
                };
                Some(v)
            }
            false => None,
        };
        Ok((dx, dw))
    }
}
