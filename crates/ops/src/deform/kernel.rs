//! CPU kernel (and, with the `cuda` feature, the CUDA launch) of the deformable-attention core as a candle `CustomOp3` with a hand-written
//! backward: the gather formulation materialises every tap (Lq·heads·L·P·4 rows of dh values,
//! ~230 MB per pixel-decoder layer at 480²) and is ~30× slower on CPU.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fastmath::{dot, layout_slice, Real};
use crate::util::host_vec;

/// Problem sizes; `levels[l] = (h, w, first value row)`.
#[derive(Debug, Clone)]
pub(super) struct MsDeformCore {
    pub b: usize,
    pub s: usize,
    pub heads: usize,
    pub dh: usize,
    pub lq: usize,
    pub points: usize,
    pub levels: Vec<(usize, usize, usize)>,
}

/// Row that marks a dropped (out-of-bounds) corner in [`Corners`].
pub(crate) const NO_CORNER: usize = usize::MAX;

/// The four grid_sample (align_corners=False, zero padding) corners of one location, pixel =
/// loc·size − 0.5: slot `2·cy + cx` is corner (y0 + cy, x0 + cx), its value row within the batch
/// item (or [`NO_CORNER`] when it lies outside, reading zeros), its bilinear weight and, when
/// asked for, the weight's derivatives w.r.t. the normalised location.
#[derive(Clone, Copy)]
pub(crate) struct Corners<T> {
    pub rows: [usize; 4],
    pub w: [T; 4],
    pub dx: [T; 4],
    pub dy: [T; 4],
}

impl<T: Real> Corners<T> {
    /// The in-bounds slots: (row, weight, dx, dy), in the order torch adds them.
    #[inline(always)]
    pub(crate) fn inside(&self) -> impl Iterator<Item = (usize, T, T, T)> + '_ {
        (0..4).filter(|&k| self.rows[k] != NO_CORNER).map(|k| (self.rows[k], self.w[k], self.dx[k], self.dy[k]))
    }
}

/// [`Corners`] of location (lx, ly) in [0, 1] on a level (h, w, first value row), without
/// data-dependent branches: per sample, bounds branches had cost more than the value reads (a
/// paper encoder layer's forward spent 4.7 of its 6.1 ms in them). A NaN location gives one
/// NaN-weighted corner, so it poisons the output instead of reading nothing; locations far
/// outside (or infinite) saturate and read nothing. `DERIVATIVES`: also the weights' derivatives
/// (the backward's first pass); without them `dx`, `dy` are zero.
#[inline(always)]
pub(crate) fn sample_corners<T: Real, const DERIVATIVES: bool>(lx: T, ly: T, level: (usize, usize, usize)) -> Corners<T> {
    let (h, wd, start) = level;
    let (zero, one, half) = (T::of(0.0), T::of(1.0), T::of(0.5));
    let mut c = Corners { rows: [NO_CORNER; 4], w: [zero; 4], dx: [zero; 4], dy: [zero; 4] };
    let x = lx * T::of(wd as f64) - half;
    let y = ly * T::of(h as f64) - half;
    #[allow(clippy::eq_op)] // x != x: NaN
    if x != x || y != y {
        let nan = T::NAN;
        (c.rows[0], c.w[0], c.dx[0], c.dy[0]) = (start, nan, nan, nan);
        return c;
    }
    let (x0, y0) = (x.floor_of(), y.floor_of());
    let (fx, fy) = (x - x0, y - y0);
    // Saturating casts: samples far outside stay outside.
    let (xi, yi) = (x0.as_f64() as isize, y0.as_f64() as isize);
    let (sw, sh) = (T::of(wd as f64), T::of(h as f64));
    // (weight, d weight / d pixel coordinate) along each axis.
    let xs = [(one - fx, T::of(-1.0)), (fx, one)];
    let ys = [(one - fy, T::of(-1.0)), (fy, one)];
    for (cy, &(wy, dwy)) in ys.iter().enumerate() {
        let yy = yi.saturating_add(cy as isize);
        let y_in = yy >= 0 && yy < h as isize;
        for (cx, &(wx, dwx)) in xs.iter().enumerate() {
            let xx = xi.saturating_add(cx as isize);
            let inside = y_in && xx >= 0 && xx < wd as isize;
            // Wraps only for corners outside, whose row is not used.
            let row = (start as isize).wrapping_add(yy.wrapping_mul(wd as isize)).wrapping_add(xx);
            let k = 2 * cy + cx;
            c.rows[k] = if inside { row as usize } else { NO_CORNER };
            c.w[k] = wy * wx;
            if DERIVATIVES {
                (c.dx[k], c.dy[k]) = (wy * dwx * sw, wx * dwy * sh);
            }
        }
    }
    c
}

/// Samples per corner table: a (query, head)'s level·point samples are taken in chunks of
/// this many (12 for the official 3 levels × 4 points).
const TABLE_SAMPLES: usize = 16;

/// Corner slots of one table: four per sample.
const SLOTS: usize = 4 * TABLE_SAMPLES;

/// The [`Corners`] of up to [`TABLE_SAMPLES`] samples (`levels.len()`) at `locs` ((x, y) pairs,
/// normalised) in one table: slot `4·sample + k` is the sample's corner k. The kernels fill such
/// a table in local arrays, then read the rows it names back to back. `w` gets the bilinear
/// weight, times `scale[sample]` when given; with `DERIVATIVES`, `dx`/`dy` (at least as long as
/// the slots used) get its derivatives.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fill_corners<T: Real, const DERIVATIVES: bool>(
    locs: &[T],
    levels: &[(usize, usize, usize)],
    scale: Option<&[T]>,
    rows: &mut [usize; SLOTS],
    w: &mut [T; SLOTS],
    dx: &mut [T],
    dy: &mut [T],
) {
    for (lp, &level) in levels.iter().enumerate() {
        let c = sample_corners::<T, DERIVATIVES>(locs[2 * lp], locs[2 * lp + 1], level);
        let slots = 4 * lp..4 * lp + 4;
        rows[slots.clone()].copy_from_slice(&c.rows);
        match scale {
            Some(a) => {
                for (o, &cw) in w[slots.clone()].iter_mut().zip(&c.w) {
                    *o = a[lp] * cw;
                }
            }
            None => w[slots.clone()].copy_from_slice(&c.w),
        }
        if DERIVATIVES {
            dx[slots.clone()].copy_from_slice(&c.dx);
            dy[slots].copy_from_slice(&c.dy);
        }
    }
}

/// One (query, head) of the forward: Σ over its samples and their corners of weight · value row.
/// With the head width `D` known at compile time the sum is kept in a local array the compiler
/// holds in registers and written to `out` once (the generic `axpy` into `out` loads and stores
/// the output row for every corner, 48 times per head); `D = 0`: the width is `out.len()`.
#[inline(always)]
fn sample_head<T: Real, const D: usize>(
    value: &[T],
    heads: usize,
    head: usize,
    locs: &[T],
    weights: &[T],
    levels: &[(usize, usize, usize)],
    out: &mut [T],
) {
    let zero = T::of(0.0);
    let d = out.len();
    let mut acc = [zero; D];
    let chunks = locs.chunks(2 * TABLE_SAMPLES).zip(weights.chunks(TABLE_SAMPLES)).zip(levels.chunks(TABLE_SAMPLES));
    for ((locs, weights), levels) in chunks {
        let (mut rows, mut w) = ([NO_CORNER; SLOTS], [zero; SLOTS]);
        fill_corners::<T, false>(locs, levels, Some(weights), &mut rows, &mut w, &mut [], &mut []);
        for (&row, &aw) in rows.iter().zip(&w).take(4 * levels.len()) {
            if row == NO_CORNER {
                continue;
            }
            let v = &value[(row * heads + head) * d..][..d];
            if D == 0 {
                axpy(aw, v, out);
            } else {
                for (s, &x) in acc.iter_mut().zip(v) {
                    *s += aw * x;
                }
            }
        }
    }
    if D != 0 {
        out.copy_from_slice(&acc);
    }
}

fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * *xi;
    }
}

impl MsDeformCore {
    fn n_lp(&self) -> usize {
        self.levels.len() * self.points
    }

    /// The level of each (level, point) index: a table, so the per-sample loops divide nothing.
    fn level_of_lp(&self) -> Vec<(usize, usize, usize)> {
        (0..self.n_lp()).map(|lp| self.levels[lp / self.points]).collect()
    }

    /// Queries per parallel task: enough taps (~16k multiply-adds) that rayon's per-task cost is
    /// negligible even with one channel, e.g. grid sampling of single-channel masks.
    fn block(&self) -> usize {
        let work = (self.heads * self.n_lp() * 4 * self.dh).max(1);
        (16384 / work).max(1)
    }

    /// out (B, Lq, heads, dh), parallel over (b, q).
    fn forward<T: Real>(&self, value: &[T], loc: &[T], attn: &[T]) -> Vec<T> {
        let (m, d, nlp) = (self.heads, self.dh, self.n_lp());
        let lvl = self.level_of_lp();
        let mut out = vec![T::of(0.0); self.b * self.lq * m * d];
        let block = self.block();
        out.par_chunks_mut(block * m * d)
            .enumerate()
            .for_each(|(blk, ob)| {
                for (k, o) in ob.chunks_mut(m * d).enumerate() {
                    let bq = blk * block + k;
                    let b = bq / self.lq;
                    let vb = &value[b * self.s * m * d..(b + 1) * self.s * m * d];
                    for head in 0..m {
                        let oh = &mut o[head * d..(head + 1) * d];
                        let i0 = (bq * m + head) * nlp;
                        let (locs, ws) = (&loc[2 * i0..2 * (i0 + nlp)], &attn[i0..i0 + nlp]);
                        match d {
                            16 => sample_head::<T, 16>(vb, m, head, locs, ws, &lvl, oh),
                            32 => sample_head::<T, 32>(vb, m, head, locs, ws, &lvl, oh),
                            64 => sample_head::<T, 64>(vb, m, head, locs, ws, &lvl, oh),
                            _ => sample_head::<T, 0>(vb, m, head, locs, ws, &lvl, oh),
                        }
                    }
                }
            });
        out
    }

    /// Gradients w.r.t. value (B, S, heads, dh), locations and attention weights.
    fn backward<T: Real>(
        &self,
        value: &[T],
        loc: &[T],
        attn: &[T],
        grad: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (m, d, nlp, s) = (self.heads, self.dh, self.n_lp(), self.s);
        let lvl = self.level_of_lp();
        let zero = T::of(0.0);
        // Locations and weights: each (b, q) owns its slices.
        let mut g_loc = vec![zero; loc.len()];
        let mut g_attn = vec![zero; attn.len()];
        let block = self.block();
        g_loc
            .par_chunks_mut(block * m * nlp * 2)
            .zip(g_attn.par_chunks_mut(block * m * nlp))
            .enumerate()
            .for_each(|(blk, (glb, gab))| {
                for (k, (gl, ga)) in glb
                    .chunks_mut(m * nlp * 2)
                    .zip(gab.chunks_mut(m * nlp))
                    .enumerate()
                {
                    let bq = blk * block + k;
                    let b = bq / self.lq;
                    let vb = &value[b * s * m * d..(b + 1) * s * m * d];
                    for head in 0..m {
                        let g = &grad[(bq * m + head) * d..][..d];
                        let i0 = (bq * m + head) * nlp;
                        for lp0 in (0..nlp).step_by(TABLE_SAMPLES) {
                            let lp1 = (lp0 + TABLE_SAMPLES).min(nlp);
                            let (mut rows, mut w) = ([NO_CORNER; SLOTS], [zero; SLOTS]);
                            let (mut dx, mut dy) = ([zero; SLOTS], [zero; SLOTS]);
                            let locs = &loc[2 * (i0 + lp0)..2 * (i0 + lp1)];
                            fill_corners::<T, true>(locs, &lvl[lp0..lp1], None, &mut rows, &mut w, &mut dx, &mut dy);
                            for lp in lp0..lp1 {
                                let (mut sa, mut sx, mut sy) = (zero, zero, zero);
                                for k in 4 * (lp - lp0)..4 * (lp - lp0 + 1) {
                                    if rows[k] == NO_CORNER {
                                        continue;
                                    }
                                    let vg = dot(&vb[(rows[k] * m + head) * d..][..d], g);
                                    sa += w[k] * vg;
                                    sx += dx[k] * vg;
                                    sy += dy[k] * vg;
                                }
                                let (j, a) = (head * nlp + lp, attn[i0 + lp]);
                                ga[j] = sa;
                                gl[2 * j] = a * sx;
                                gl[2 * j + 1] = a * sy;
                            }
                        }
                    }
                }
            });
        // Values: scattered per (b, head) into a (B, heads, S, dh) buffer so tasks never overlap.
        let mut g_val_bm = vec![zero; value.len()];
        g_val_bm
            .par_chunks_mut(s * d)
            .enumerate()
            .for_each(|(bm, gv)| {
                let (b, head) = (bm / m, bm % m);
                for q in 0..self.lq {
                    let bq = b * self.lq + q;
                    let g = &grad[(bq * m + head) * d..][..d];
                    let i0 = (bq * m + head) * nlp;
                    for lp0 in (0..nlp).step_by(TABLE_SAMPLES) {
                        let lp1 = (lp0 + TABLE_SAMPLES).min(nlp);
                        // Only rows and weights here: the derivatives were used above.
                        let (mut rows, mut w) = ([NO_CORNER; SLOTS], [zero; SLOTS]);
                        let (locs, ws) = (&loc[2 * (i0 + lp0)..2 * (i0 + lp1)], &attn[i0 + lp0..i0 + lp1]);
                        fill_corners::<T, false>(locs, &lvl[lp0..lp1], Some(ws), &mut rows, &mut w, &mut [], &mut []);
                        for (&row, &aw) in rows.iter().zip(&w).take(4 * (lp1 - lp0)) {
                            if row != NO_CORNER {
                                axpy(aw, g, &mut gv[row * d..(row + 1) * d]);
                            }
                        }
                    }
                }
            });
        // (B, heads, S, dh) -> (B, S, heads, dh).
        let mut g_val = vec![zero; value.len()];
        g_val
            .par_chunks_mut(s * m * d)
            .enumerate()
            .for_each(|(b, out)| {
                for row in 0..s {
                    for head in 0..m {
                        out[(row * m + head) * d..][..d]
                            .copy_from_slice(&g_val_bm[((b * m + head) * s + row) * d..][..d]);
                    }
                }
            });
        (g_val, g_loc, g_attn)
    }
}


impl CustomOp3 for MsDeformCore {
    fn name(&self) -> &'static str {
        "ms-deform-attn-core"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.b, self.lq, self.heads, self.dh));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(v), CpuStorage::F32(l), CpuStorage::F32(a)) => {
                CpuStorage::F32(self.forward(
                    layout_slice(v, l1, "ms_deform_attn_core kernel: value")?,
                    layout_slice(l, l2, "ms_deform_attn_core kernel: locations")?,
                    layout_slice(a, l3, "ms_deform_attn_core kernel: weights")?,
                ))
            }
            (CpuStorage::F64(v), CpuStorage::F64(l), CpuStorage::F64(a)) => {
                CpuStorage::F64(self.forward(
                    layout_slice(v, l1, "ms_deform_attn_core kernel: value")?,
                    layout_slice(l, l2, "ms_deform_attn_core kernel: locations")?,
                    layout_slice(a, l3, "ms_deform_attn_core kernel: weights")?,
                ))
            }
            _ => bail!("ms_deform_attn_core kernel: all inputs must be f32 or all f64"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_forward((s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        value: &Tensor,
        loc: &Tensor,
        attn: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if value.device().is_cuda() {
            let (gv, gl, ga) = self.cuda_backward(value, loc, attn, grad)?;
            return Ok((Some(gv), Some(gl), Some(ga)));
        }
        fn run<T: Real>(
            op: &MsDeformCore,
            value: &Tensor,
            loc: &Tensor,
            attn: &Tensor,
            grad: &Tensor,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let (gv, gl, ga) = op.backward(
                &host_vec::<T>(value)?,
                &host_vec::<T>(loc)?,
                &host_vec::<T>(attn)?,
                &host_vec::<T>(grad)?,
            );
            let dev = value.device();
            Ok((
                Tensor::from_vec(gv, value.shape(), dev)?,
                Tensor::from_vec(gl, loc.shape(), dev)?,
                Tensor::from_vec(ga, attn.shape(), dev)?,
            ))
        }
        let (gv, gl, ga) = match value.dtype() {
            candle_core::DType::F32 => run::<f32>(self, value, loc, attn, grad)?,
            candle_core::DType::F64 => run::<f64>(self, value, loc, attn, grad)?,
            dt => bail!("ms_deform_attn_core kernel: unsupported dtype {dt:?}"),
        };
        Ok((Some(gv), Some(gl), Some(ga)))
    }
}

/// `reference_points + offsets / (w_l, h_l)` with the reference point of each (query, level)
/// broadcast over heads and points: (B, Lq, L, 2), (B, Lq, M, L, P, 2) -> (B, Lq, M, L, P, 2).
/// candle's broadcast ops take their slow per-element indexing for these interleaved broadcast
/// axes (4 ms a layer at 480²); this is one pass.
#[derive(Debug, Clone)]
pub(super) struct SamplingLocations {
    pub heads: usize,
    pub points: usize,
    /// (w_l, h_l) per level.
    pub norms: Vec<(usize, usize)>,
}

impl SamplingLocations {
    /// Elements per query of the offsets, and of the reference points.
    fn per_query(&self) -> (usize, usize) {
        let l = self.norms.len();
        (self.heads * l * self.points * 2, l * 2)
    }

    /// (w_l, h_l) per level in `T`.
    fn norms<T: Real>(&self) -> Vec<[T; 2]> {
        self.norms.iter().map(|&(w, h)| [T::of(w as f64), T::of(h as f64)]).collect()
    }

    fn forward<T: Real>(&self, refs: &[T], off: &[T]) -> Vec<T> {
        let (po, pr) = self.per_query();
        let norm = self.norms::<T>();
        let mut out = vec![T::of(0.0); off.len()];
        out.par_chunks_mut(po)
            .zip(off.par_chunks(po))
            .zip(refs.par_chunks(pr))
            .for_each(|((o, d), r)| {
                let rows = o.chunks_exact_mut(2).zip(d.chunks_exact(2));
                for (i, (o, d)) in rows.enumerate() {
                    let l = (i / self.points) % norm.len();
                    o[0] = r[2 * l] + d[0] / norm[l][0];
                    o[1] = r[2 * l + 1] + d[1] / norm[l][1];
                }
            });
        out
    }

    /// (d reference points, d offsets) from the output gradient.
    fn backward<T: Real>(&self, grad: &[T]) -> (Vec<T>, Vec<T>) {
        let (po, pr) = self.per_query();
        let norm = self.norms::<T>();
        let zero = T::of(0.0);
        let mut d_off = vec![zero; grad.len()];
        let mut d_ref = vec![zero; grad.len() / po * pr];
        d_off
            .par_chunks_mut(po)
            .zip(d_ref.par_chunks_mut(pr))
            .zip(grad.par_chunks(po))
            .for_each(|((d, r), g)| {
                for (i, (d, g)) in d.chunks_exact_mut(2).zip(g.chunks_exact(2)).enumerate() {
                    let l = (i / self.points) % norm.len();
                    d[0] = g[0] / norm[l][0];
                    d[1] = g[1] / norm[l][1];
                    r[2 * l] += g[0];
                    r[2 * l + 1] += g[1];
                }
            });
        (d_ref, d_off)
    }
}

impl candle_core::CustomOp2 for SamplingLocations {
    fn name(&self) -> &'static str {
        "ms-deform-sampling-locations"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (po, pr) = self.per_query();
        let (refs, off) = (l1.shape().elem_count(), l2.shape().elem_count());
        if po == 0 || refs % pr != 0 || off % po != 0 || refs / pr != off / po {
            bail!("sampling locations kernel: {} reference values do not match {} offsets", refs, off);
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(r), CpuStorage::F32(o)) => {
                CpuStorage::F32(self.forward(layout_slice(r, l1, "ms_deform_attn_core kernel: reference points")?, layout_slice(o, l2, "ms_deform_attn_core kernel: offsets")?))
            }
            (CpuStorage::F64(r), CpuStorage::F64(o)) => {
                CpuStorage::F64(self.forward(layout_slice(r, l1, "ms_deform_attn_core kernel: reference points")?, layout_slice(o, l2, "ms_deform_attn_core kernel: offsets")?))
            }
            _ => bail!("sampling locations kernel: both inputs must be f32 or both f64"),
        };
        Ok((out, l2.shape().clone()))
    }

    fn bwd(&self, refs: &Tensor, off: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(op: &SamplingLocations, refs: &Tensor, off: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
            let (dr, doff) = op.backward(&host_vec::<T>(grad)?);
            let dev = grad.device();
            Ok((Tensor::from_vec(dr, refs.shape(), dev)?, Tensor::from_vec(doff, off.shape(), dev)?))
        }
        let (dr, doff) = match grad.dtype() {
            candle_core::DType::F32 => run::<f32>(self, refs, off, grad)?,
            candle_core::DType::F64 => run::<f64>(self, refs, off, grad)?,
            dt => bail!("sampling locations kernel: unsupported dtype {dt:?}"),
        };
        Ok((Some(dr), Some(doff)))
    }
}
