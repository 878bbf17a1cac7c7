//! CPU kernel of the bilinear resize and of its adjoint (which is also the resize's backward),
//! as a candle `CustomOp1`. Each output reads two taps per axis, so a resize costs a few
//! multiply-adds per output; the dense-matrix formulation (`resize_bilinear_matmul`) multiplies
//! by every zero of the interpolation matrices, e.g. 60× the work for 120 → 60 rows.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use crate::fastmath::{init_copy, init_fill, storage_slice, unwritten, written, Real};
use crate::util::SyncPtr;

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

/// [`Bilinear`] on tokens: every channel of a contiguous (B, h·w, C) tensor, row-major over
/// positions, resized (or, `adjoint`, transposed) with the same taps and the same order of
/// operations per element as the plane kernel, so both give the same bits. Tasks are (batch
/// item, block of channels); each walks the positions with its block's channels as the
/// contiguous inner loop.
#[derive(Debug, Clone)]
pub(super) struct BilinearTokens {
    plane: Bilinear,
    channels: usize,
}

/// Channels per task at least (one cache line of f32 per position).
const TOKEN_CHANNEL_BLOCK: usize = 16;

impl BilinearTokens {
    pub(super) fn new(plane: Bilinear, channels: usize) -> Self {
        Self { plane, channels }
    }

    /// Item `x` (h·w, C) -> `y` (oh·ow, C), channels c0..c0+n only; `tmp` holds h·ow·n.
    ///
    /// # Safety
    /// `y` must address (oh·ow − 1)·C + c0 + n writable elements that no other thread touches in
    /// columns c0..c0+n.
    unsafe fn resize_item<T: Real>(&self, x: &[T], y: *mut T, c0: usize, n: usize, tmp: &mut Vec<T>) {
        let ((h, w), (oh, ow)) = (self.plane.in_hw, self.plane.out_hw);
        let c = self.channels;
        // Columns first, then rows, as in `Bilinear::resize_plane`.
        let (cols, cols_stride, cols_off): (&[T], usize, usize) = match &self.plane.cols {
            None => (x, c, c0),
            Some(taps) => {
                tmp.clear();
                for iy in 0..h {
                    let row = &x[iy * w * c..(iy + 1) * w * c];
                    for &(i0, w0, i1, w1) in taps {
                        let (a, b) = (&row[i0 * c + c0..][..n], &row[i1 * c + c0..][..n]);
                        let (w0, w1) = (T::of(w0), T::of(w1));
                        tmp.extend(a.iter().zip(b).map(|(&a, &b)| w0 * a + w1 * b));
                    }
                }
                (&tmp[..], n, 0)
            }
        };
        let at = |p: usize| &cols[p * cols_stride + cols_off..][..n];
        for oy in 0..oh {
            for ox in 0..ow {
                let out = std::slice::from_raw_parts_mut(y.add((oy * ow + ox) * c + c0), n);
                match &self.plane.rows {
                    None => out.copy_from_slice(at(oy * ow + ox)),
                    Some(taps) => {
                        let (i0, w0, i1, w1) = taps[oy];
                        let (w0, w1) = (T::of(w0), T::of(w1));
                        for ((o, &a), &b) in out.iter_mut().zip(at(i0 * ow + ox)).zip(at(i1 * ow + ox)) {
                            *o = w0 * a + w1 * b;
                        }
                    }
                }
            }
        }
    }

    /// Item `g` (oh·ow, C) -> `x` (h·w, C), channels c0..c0+n only: the transpose of
    /// [`Self::resize_item`], in `Bilinear::adjoint_plane`'s order; `tmp` holds h·ow·n.
    ///
    /// # Safety
    /// As [`Self::resize_item`], for `x` of h·w positions.
    unsafe fn adjoint_item<T: Real>(&self, g: &[T], x: *mut T, c0: usize, n: usize, tmp: &mut Vec<T>) {
        let ((h, w), ow) = (self.plane.in_hw, self.plane.out_hw.1);
        let c = self.channels;
        let zero = T::of(0.0);
        let (rows, rows_stride, rows_off): (&[T], usize, usize) = match &self.plane.rows {
            None => (g, c, c0),
            Some(taps) => {
                tmp.clear();
                tmp.resize(h * ow * n, zero);
                for (oy, &(i0, w0, i1, w1)) in taps.iter().enumerate() {
                    let (w0, w1) = (T::of(w0), T::of(w1));
                    for ox in 0..ow {
                        let gv = &g[(oy * ow + ox) * c + c0..][..n];
                        for (t, &v) in tmp[(i0 * ow + ox) * n..][..n].iter_mut().zip(gv) {
                            *t += w0 * v;
                        }
                        for (t, &v) in tmp[(i1 * ow + ox) * n..][..n].iter_mut().zip(gv) {
                            *t += w1 * v;
                        }
                    }
                }
                (&tmp[..], n, 0)
            }
        };
        let at = |p: usize| &rows[p * rows_stride + rows_off..][..n];
        let px = |p: usize| std::slice::from_raw_parts_mut(x.add(p * c + c0), n);
        match &self.plane.cols {
            None => {
                for p in 0..h * w {
                    px(p).copy_from_slice(at(p));
                }
            }
            Some(taps) => {
                for p in 0..h * w {
                    px(p).fill(zero);
                }
                for iy in 0..h {
                    for (ox, &(i0, w0, i1, w1)) in taps.iter().enumerate() {
                        let (w0, w1) = (T::of(w0), T::of(w1));
                        let v = at(iy * ow + ox);
                        for (o, &v) in px(iy * w + i0).iter_mut().zip(v) {
                            *o += w0 * v;
                        }
                        for (o, &v) in px(iy * w + i1).iter_mut().zip(v) {
                            *o += w1 * v;
                        }
                    }
                }
            }
        }
    }

    fn run<T: Real>(&self, src: &[T]) -> Vec<T> {
        let ((sh, sw), (dh, dw)) = self.plane.planes();
        let c = self.channels;
        let (sl, dl) = (sh * sw * c, dh * dw * c);
        let items = if sl == 0 { 0 } else { src.len() / sl };
        let mut dst = unwritten::<T>(items * dl);
        if dst.is_empty() {
            return Vec::new();
        }
        // About two tasks per thread over (item, channel block).
        let threads = rayon::current_num_threads().max(1);
        let per_item = (2 * threads).div_ceil(items).max(1);
        let block = c.div_ceil(per_item).next_multiple_of(TOKEN_CHANNEL_BLOCK).min(c);
        let blocks = c.div_ceil(block);
        let out = SyncPtr(dst.as_mut_ptr().cast::<T>());
        (0..items * blocks).into_par_iter().for_each(|t| {
            let (bi, j) = (t / blocks, t % blocks);
            let (c0, n) = (j * block, block.min(c - j * block));
            let mut tmp = Vec::new();
            // SAFETY: the task writes channels c0..c0+n of item bi's positions only.
            unsafe {
                let d = out.get().add(bi * dl);
                if self.plane.adjoint {
                    self.adjoint_item(&src[bi * sl..][..sl], d, c0, n, &mut tmp);
                } else {
                    self.resize_item(&src[bi * sl..][..sl], d, c0, n, &mut tmp);
                }
            }
        });
        // SAFETY: the channel blocks tile every position of every item.
        unsafe { written(dst) }
    }
}

impl CustomOp1 for BilinearTokens {
    fn name(&self) -> &'static str {
        if self.plane.adjoint {
            "resize-bilinear-tokens-adjoint"
        } else {
            "resize-bilinear-tokens"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((sh, sw), (dh, dw)) = self.plane.planes();
        let dims = layout.shape().dims();
        let b = match *dims {
            [b, l, c] if l == sh * sw && c == self.channels => b,
            _ => bail!("resize_bilinear_tokens kernel: expected (B, {}, {}), got {dims:?}", sh * sw, self.channels),
        };
        let out = match storage {
            CpuStorage::F32(_) => f32::into_storage(self.run(storage_slice::<f32>(storage, layout, "resize_bilinear_tokens")?)),
            CpuStorage::F64(_) => f64::into_storage(self.run(storage_slice::<f64>(storage, layout, "resize_bilinear_tokens")?)),
            _ => bail!("resize_bilinear_tokens kernel: only f32 and f64 are supported"),
        };
        Ok((out, Shape::from((b, dh * dw, self.channels))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Self { plane: self.plane.transposed(), channels: self.channels };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}
