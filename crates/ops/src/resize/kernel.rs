//! CPU kernel of the bilinear resize and of its adjoint (which is also the resize's backward),
//! as a candle `CustomOp1`. Each output reads two taps per axis, so a resize costs a few
//! multiply-adds per output; the dense-matrix formulation (`resize_bilinear_matmul`) multiplies
//! by every zero of the interpolation matrices, e.g. 60× the work for 120 → 60 rows.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use crate::fastmath::{init_copy, init_fill, storage_slice, unwritten, written, Real};

/// `(i0, w0, i1, w1)` per output index along one axis (see `interp_taps`).
type Taps = Vec<(usize, f64, usize, f64)>;

/// The resize from `in_hw` to `out_hw` (`adjoint`: its transpose, from `out_hw` back to `in_hw`)
/// of every (h, w) plane of a contiguous (B, C, h, w) tensor.
#[derive(Debug, Clone)]
pub(super) struct Bilinear {
    in_hw: (usize, usize),
    out_hw: (usize, usize),
    adjoint: bool,
    /// Taps over the output rows (`None`: same height, rows are copied exactly, as torch does).
    rows: Option<Taps>,
    /// Taps over the output columns (`None`: same width).
    cols: Option<Taps>,
}

impl Bilinear {
    pub(super) fn new(in_hw: (usize, usize), out_hw: (usize, usize), align_corners: bool, single: bool, adjoint: bool) -> Self {
        let taps = |n_in: usize, n_out: usize| (n_in != n_out).then(|| super::interp_taps(n_in, n_out, align_corners, single));
        Self {
            in_hw,
            out_hw,
            adjoint,
            rows: taps(in_hw.0, out_hw.0),
            cols: taps(in_hw.1, out_hw.1),
        }
    }

    /// (source, destination) plane sizes.
    fn planes(&self) -> ((usize, usize), (usize, usize)) {
        if self.adjoint {
            (self.out_hw, self.in_hw)
        } else {
            (self.in_hw, self.out_hw)
        }
    }

    /// One plane `x` (h, w) -> `y` (oh, ow), every element written; `tmp` holds h × ow.
    fn resize_plane<T: Real>(&self, x: &[T], y: &mut [MaybeUninit<T>], tmp: &mut Vec<T>) {
        let ((h, w), (oh, ow)) = (self.in_hw, self.out_hw);
        // Columns first, then rows: torch's order of the two interpolations.
        let cols: &[T] = match &self.cols {
            None => x,
            Some(taps) => {
                tmp.clear();
                for row in x.chunks_exact(w) {
                    tmp.extend(taps.iter().map(|&(i0, w0, i1, w1)| T::of(w0) * row[i0] + T::of(w1) * row[i1]));
                }
                tmp
            }
        };
        match &self.rows {
            None => {
                init_copy(y, &cols[..h * ow]);
            }
            Some(taps) => {
                for (out, &(i0, w0, i1, w1)) in y.chunks_exact_mut(ow).zip(taps) {
                    let (r0, r1) = (&cols[i0 * ow..(i0 + 1) * ow], &cols[i1 * ow..(i1 + 1) * ow]);
                    let (w0, w1) = (T::of(w0), T::of(w1));
                    for ((o, &a), &b) in out.iter_mut().zip(r0).zip(r1) {
                        o.write(w0 * a + w1 * b);
                    }
                }
            }
        }
        debug_assert_eq!(y.len(), oh * ow);
    }

    /// One plane `g` (oh, ow) -> `x` (h, w), the transpose of [`Self::resize_plane`]; `tmp`
    /// holds h × ow.
    fn adjoint_plane<T: Real>(&self, g: &[T], x: &mut [MaybeUninit<T>], tmp: &mut Vec<T>) {
        let ((h, w), ow) = (self.in_hw, self.out_hw.1);
        let zero = T::of(0.0);
        let rows: &[T] = match &self.rows {
            None => g,
            Some(taps) => {
                tmp.clear();
                tmp.resize(h * ow, zero);
                for (grow, &(i0, w0, i1, w1)) in g.chunks_exact(ow).zip(taps) {
                    let (w0, w1) = (T::of(w0), T::of(w1));
                    for (t, &v) in tmp[i0 * ow..(i0 + 1) * ow].iter_mut().zip(grow) {
                        *t += w0 * v;
                    }
                    for (t, &v) in tmp[i1 * ow..(i1 + 1) * ow].iter_mut().zip(grow) {
                        *t += w1 * v;
                    }
                }
                tmp
            }
        };
        match &self.cols {
            None => {
                init_copy(x, &rows[..h * w]);
            }
            Some(taps) => {
                let x = init_fill(x, zero);
                for (xrow, trow) in x.chunks_exact_mut(w).zip(rows.chunks_exact(ow)) {
                    for (&v, &(i0, w0, i1, w1)) in trow.iter().zip(taps) {
                        xrow[i0] += T::of(w0) * v;
                        xrow[i1] += T::of(w1) * v;
                    }
                }
            }
        }
    }

    fn run<T: Real>(&self, src: &[T]) -> Vec<T> {
        let ((sh, sw), (dh, dw)) = self.planes();
        let planes = src.len() / (sh * sw);
        // Every plane is written whole by `resize_plane` / `adjoint_plane`.
        let mut dst = unwritten::<T>(planes * dh * dw);
        // Several small planes per task: rayon's per-task cost is about a microsecond.
        let per_task = (16384 / (dh * dw + sh * sw).max(1)).max(1);
        dst.par_chunks_mut(per_task * dh * dw)
            .zip(src.par_chunks(per_task * sh * sw))
            .for_each(|(d, s)| {
                let mut tmp = Vec::with_capacity(self.in_hw.0 * self.out_hw.1);
                for (dp, sp) in d.chunks_exact_mut(dh * dw).zip(s.chunks_exact(sh * sw)) {
                    if self.adjoint {
                        self.adjoint_plane(sp, dp, &mut tmp);
                    } else {
                        self.resize_plane(sp, dp, &mut tmp);
                    }
                }
            });
        // SAFETY: see above; `chunks_exact` covers every plane, `src` holding whole planes.
        unsafe { written(dst) }
    }

    /// The transposed operation: the backward of this one.
    fn transposed(&self) -> Self {
        Self { adjoint: !self.adjoint, ..self.clone() }
    }
}

impl CustomOp1 for Bilinear {
    fn name(&self) -> &'static str {
        if self.adjoint {
            "resize-bilinear-adjoint"
        } else {
            "resize-bilinear"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((sh, sw), (dh, dw)) = self.planes();
        let dims = layout.shape().dims();
        let (b, c) = match *dims {
            [b, c, h, w] if (h, w) == (sh, sw) => (b, c),
            _ => bail!("resize_bilinear kernel: expected (B, C, {sh}, {sw}), got {dims:?}"),
        };
        let out = match storage {
            CpuStorage::F32(_) => f32::into_storage(self.run(storage_slice::<f32>(storage, layout, "resize_bilinear")?)),
            CpuStorage::F64(_) => f64::into_storage(self.run(storage_slice::<f64>(storage, layout, "resize_bilinear")?)),
            _ => bail!("resize_bilinear kernel: only f32 and f64 are supported"),
        };
        Ok((out, Shape::from((b, c, dh, dw))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The taps were rounded for the forward's dtype, which the gradient shares.
        Ok(Some(grad.contiguous()?.apply_op1(self.transposed())?))
    }
}
