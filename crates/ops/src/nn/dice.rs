//! The sums of a sigmoid dice loss as one CPU op: per row of logits `x` against 0/1 targets
//! `t`, `[Σ σ(x)·t, Σ σ(x)²]`, with its backward. The dice losses built from them ran a dozen
//! single-threaded candle ops each way over the (B, 2, H, W) prediction at the label size.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fastmath::{exp_f32, guard_slice, layout_slice, storage_slice, Real};

/// Elements per task: a row is split so that a few rows still keep both threads busy.
const CHUNK: usize = 8192;

/// `rows` × `n` logits against `rows` × `n` u8 targets (nonzero = 1).
#[derive(Debug, Clone)]
pub(super) struct SigmoidDiceSums {
    pub rows: usize,
    pub n: usize,
}

/// σ(x) for the fused kernels: from `exp(−|x|)` (never overflows), branch-free so that loops over
/// it vectorise; within a few ulp of `1 / (1 + exp(−x))`.
trait Sigmoid: Real {
    fn sigmoid(self) -> Self;
}

impl Sigmoid for f32 {
    #[inline(always)]
    fn sigmoid(self) -> f32 {
        let e = exp_f32(-self.abs());
        let r = 1.0 / (1.0 + e);
        if self >= 0.0 {
            r
        } else {
            e * r
        }
    }
}

impl Sigmoid for f64 {
    #[inline(always)]
    fn sigmoid(self) -> f64 {
        let e = (-self.abs()).exp();
        let r = 1.0 / (1.0 + e);
        if self >= 0.0 {
            r
        } else {
            e * r
        }
    }
}

impl SigmoidDiceSums {
    /// (Σpt, Σp²) of one chunk, summed in its type in 16 lanes, returned in f64.
    fn chunk_sums<T: Sigmoid>(x: &[T], t: &[u8]) -> (f64, f64) {
        const L: usize = 16;
        let zero = T::of(0.0);
        let (mut a, mut b) = ([zero; L], [zero; L]);
        let mut xs = x.chunks_exact(L);
        let mut ts = t.chunks_exact(L);
        for (xc, tc) in (&mut xs).zip(&mut ts) {
            for l in 0..L {
                let p = xc[l].sigmoid();
                let tv = if tc[l] != 0 { p } else { zero };
                a[l] = a[l] + tv;
                b[l] = b[l] + p * p;
            }
        }
        let (mut pt, mut pp) = (0.0, 0.0);
        for (&v, &tv) in xs.remainder().iter().zip(ts.remainder()) {
            let p = v.sigmoid().as_f64();
            pt += if tv != 0 { p } else { 0.0 };
            pp += p * p;
        }
        (pt + a.iter().map(|v| v.as_f64()).sum::<f64>(), pp + b.iter().map(|v| v.as_f64()).sum::<f64>())
    }

    /// (rows, 2) sums.
    fn forward<T: Sigmoid>(&self, x: &[T], t: &[u8]) -> Vec<T> {
        let per_row = self.n.div_ceil(CHUNK).max(1);
        let parts: Vec<(f64, f64)> = (0..self.rows * per_row)
            .into_par_iter()
            .map(|k| {
                let (r, c) = (k / per_row, k % per_row);
                let lo = (r * self.n + c * CHUNK).min((r + 1) * self.n);
                let hi = (lo + CHUNK).min((r + 1) * self.n);
                Self::chunk_sums(&x[lo..hi], &t[lo..hi])
            })
            .collect();
        parts
            .chunks(per_row)
            .flat_map(|row| {
                let (pt, pp) = row.iter().fold((0.0, 0.0), |s, &(a, b)| (s.0 + a, s.1 + b));
                [T::of(pt), T::of(pp)]
            })
            .collect()
    }

    /// dx = (g₀ t + 2 g₁ p) · p (1 − p) per element, g = the gradient of the row's two sums.
    fn backward<T: Sigmoid>(&self, x: &[T], t: &[u8], g: &[T]) -> Vec<T> {
        let one = T::of(1.0);
        let two = T::of(2.0);
        let mut dx = vec![T::of(0.0); x.len()];
        dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(t.par_chunks(CHUNK))).enumerate().for_each(|(k, (d, (xc, tc)))| {
            // A chunk may straddle rows when n is not a multiple of CHUNK: one segment per row.
            let mut off = 0;
            while off < xc.len() {
                let at = k * CHUNK + off;
                let r = at / self.n;
                let len = ((r + 1) * self.n - at).min(xc.len() - off);
                let (g0, g1) = (g[2 * r], two * g[2 * r + 1]);
                for ((o, &v), &tv) in d[off..off + len].iter_mut().zip(&xc[off..off + len]).zip(&tc[off..off + len]) {
                    let p = v.sigmoid();
                    let tp = if tv != 0 { g0 } else { T::of(0.0) };
                    *o = (tp + g1 * p) * (p * (one - p));
                }
                off += len;
            }
        });
        dx
    }
}

impl CustomOp2 for SigmoidDiceSums {
    fn name(&self) -> &'static str {
        "sigmoid-dice-sums"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = match s2 {
            CpuStorage::U8(v) => layout_slice(v, l2, "sigmoid_dice_sums targets")?,
            _ => bail!("sigmoid_dice_sums: targets must be u8"),
        };
        let n = self.rows * self.n;
        if t.len() != n || l1.shape().elem_count() != n {
            bail!("sigmoid_dice_sums: {} logits and {} targets for {} rows of {}", l1.shape().elem_count(), t.len(), self.rows, self.n);
        }
        let out = match s1 {
            CpuStorage::F32(_) => f32::into_storage(self.forward(storage_slice::<f32>(s1, l1, "sigmoid_dice_sums logits")?, t)),
            CpuStorage::F64(_) => f64::into_storage(self.forward(storage_slice::<f64>(s1, l1, "sigmoid_dice_sums logits")?, t)),
            _ => bail!("sigmoid_dice_sums: only f32 and f64 logits are supported"),
        };
        Ok((out, Shape::from((self.rows, 2))))
    }

    fn bwd(&self, x: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Sigmoid>(op: &SigmoidDiceSums, x: &Tensor, t: &Tensor, grad: &Tensor) -> Result<Vec<T>> {
            let grad = grad.contiguous()?;
            let (gx, gt, gg) = (x.storage_and_layout(), t.storage_and_layout(), grad.storage_and_layout());
            let ts = match &*gt.0 {
                candle_core::Storage::Cpu(CpuStorage::U8(v)) => layout_slice(v, gt.1, "sigmoid_dice_sums targets")?,
                _ => bail!("sigmoid_dice_sums: targets must be a u8 CPU tensor"),
            };
            Ok(op.backward(guard_slice::<T>(&gx, "sigmoid_dice_sums logits")?, ts, guard_slice::<T>(&gg, "sigmoid_dice_sums grad")?))
        }
        let dx = match x.dtype() {
            candle_core::DType::F32 => Tensor::from_vec(run::<f32>(self, x, t, grad)?, x.shape(), x.device())?,
            candle_core::DType::F64 => Tensor::from_vec(run::<f64>(self, x, t, grad)?, x.shape(), x.device())?,
            dt => bail!("sigmoid_dice_sums: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), None))
    }
}
