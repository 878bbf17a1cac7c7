//! Trainable convolution and GroupNorm: candle custom ops whose forward runs the fast kernels of
//! this module and whose backward is analytic (candle's conv2d is slow in both directions on CPU,
//! and its backward goes through `conv_transpose2d`, a direct loop; composed GroupNorm spends its
//! backward in strided broadcast reductions).
//!
//! Convolution (stride 1, no dilation, one group; any kernel size and zero padding up to
//! `k - 1` per side), x (N, Cin, H, W), w (Cout, Cin, kh, kw):
//! - forward: [`super::run_cpu`] (Winograd for the 3x3s it takes, shifted gemms for other kxk,
//!   one gemm per tile for 1x1);
//! - dX: the "full" correlation of dY with the flipped, transposed weights
//!   `w'[ci, co, ky, kx] = w[co, ci, kh-1-ky, kw-1-kx]` and padding `k - 1 - p` per side, i.e. the
//!   same forward kernel again;
//! - dW: per tap (ky, kx) and image, one gemm `dW_tap[co, ci] += dY_wide[co, :] · Xp[ci, :+shift]`
//!   over the zero-padded input read in place at the tap's shift, with dY laid out on the padded
//!   row pitch (junk columns zero), the same "wide pixel" trick as the shifted forward; partial
//!   sums per (tap, image) run in parallel and are added up at the end.
//!
//! GroupNorm (x (B, C, H, W), affine weight and bias (C)): one pass for the statistics per
//! (image, group), one for the output; the backward recomputes the statistics and gives
//! dx = rstd · (dy·γ − mean(dy·γ) − x̂ · mean(dy·γ·x̂)) per group, dγ = Σ dy·x̂, dβ = Σ dy.
//! Sums run in 16 f32 lanes per block of 1024 values, blocks added in f64 (f64 inputs: f64
//! throughout); the variance is two-pass, like torch's.
//!
//! f32 runs the fast kernels; f64 (for gradient checks) runs direct reference loops.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{geometry, run_cpu, Activation, ConvSpec, Geometry};

/// The contiguous data of one custom-op operand.
fn operand<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: operand must be contiguous"),
    }
}

/// The float types the ops run on (f32: fast kernels, f64: reference loops for gradient checks).
trait Elem: Copy + Send + Sync + 'static {
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Elem for f32 {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Elem for f64 {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

fn spec_of(padding: [usize; 4]) -> ConvSpec {
    ConvSpec {
        stride: (1, 1),
        padding,
        dilation: (1, 1),
        groups: 1,
    }
}

// ---- convolution -------------------------------------------------------------------------------

/// `y = conv2d(x, w)`, stride 1, one group, zero padding [top, bottom, left, right].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvOp {
    pub padding: [usize; 4],
}

/// `dW = ∂(Σ y·dY)/∂w` of a [`ConvOp`] as a function of (x, dY); no backward of its own.
#[derive(Debug, Clone, Copy)]
struct ConvWeightGrad {
    padding: [usize; 4],
    kh: usize,
    kw: usize,
}

/// Direct reference convolution (f64 gradient checks, tiny sizes).
fn conv_reference<T: Elem>(x: &[T], w: &[T], geo: &Geometry) -> Vec<T> {
    let [pt, _, pl, _] = geo.spec.padding;
    let mut out = vec![T::from_f64(0.0); geo.n * geo.cout * geo.ho * geo.wo];
    for n in 0..geo.n {
        for co in 0..geo.cout {
            for oy in 0..geo.ho {
                for ox in 0..geo.wo {
                    let mut acc = 0f64;
                    for ci in 0..geo.cin {
                        for ky in 0..geo.kh {
                            let iy = (oy + ky) as isize - pt as isize;
                            if iy < 0 || iy >= geo.h as isize {
                                continue;
                            }
                            for kx in 0..geo.kw {
                                let ix = (ox + kx) as isize - pl as isize;
                                if ix < 0 || ix >= geo.w as isize {
                                    continue;
                                }
                                let xv = x[((n * geo.cin + ci) * geo.h + iy as usize) * geo.w + ix as usize];
                                let wv = w[((co * geo.cin + ci) * geo.kh + ky) * geo.kw + kx];
                                acc += xv.to_f64() * wv.to_f64();
                            }
                        }
                    }
                    out[((n * geo.cout + co) * geo.ho + oy) * geo.wo + ox] = T::from_f64(acc);
                }
            }
        }
    }
    out
}

/// Direct reference weight gradient (f64 gradient checks, tiny sizes).
fn weight_grad_reference<T: Elem>(x: &[T], g: &[T], geo: &Geometry) -> Vec<T> {
    let [pt, _, pl, _] = geo.spec.padding;
    let mut dw = vec![T::from_f64(0.0); geo.cout * geo.cin * geo.kh * geo.kw];
    for co in 0..geo.cout {
        for ci in 0..geo.cin {
            for ky in 0..geo.kh {
                for kx in 0..geo.kw {
                    let mut acc = 0f64;
                    for n in 0..geo.n {
                        for oy in 0..geo.ho {
                            let iy = (oy + ky) as isize - pt as isize;
                            if iy < 0 || iy >= geo.h as isize {
                                continue;
                            }
                            for ox in 0..geo.wo {
                                let ix = (ox + kx) as isize - pl as isize;
                                if ix < 0 || ix >= geo.w as isize {
                                    continue;
                                }
                                let xv = x[((n * geo.cin + ci) * geo.h + iy as usize) * geo.w + ix as usize];
                                let gv = g[((n * geo.cout + co) * geo.ho + oy) * geo.wo + ox];
                                acc += xv.to_f64() * gv.to_f64();
                            }
                        }
                    }
                    dw[((co * geo.cin + ci) * geo.kh + ky) * geo.kw + kx] = T::from_f64(acc);
                }
            }
        }
    }
    dw
}

/// The fast f32 weight gradient (see the module docs). `x` (N, Cin, H, W), `g` (N, Cout, Ho, Wo)
/// -> (Cout, Cin, kh, kw).
fn weight_grad_f32(x: &[f32], g: &[f32], geo: &Geometry) -> Vec<f32> {
    let (n, cin, cout) = (geo.n, geo.cin, geo.cout);
    let (h, w, ho, wo) = (geo.h, geo.w, geo.ho, geo.wo);
    let (kh, kw) = (geo.kh, geo.kw);
    let [pt, pb, pl, pr] = geo.spec.padding;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    let taps = kh * kw;
    // Zero-padded input planes, with kw - 1 floats of slack so the last tap's shifted read of the
    // last (junk) wide pixel stays inside the plane. A 1x1 unpadded conv reads x in place.
    let unpadded = pt + pb + pl + pr == 0;
    let (plane, padded): (usize, Option<Vec<f32>>) = if unpadded && kw == 1 {
        (h * w, None)
    } else {
        let plane = hp * wp + kw - 1;
        let mut p = vec![0f32; n * cin * plane];
        p.par_chunks_mut(plane)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for (y, row) in src.chunks_exact(w).enumerate() {
                    dst[(y + pt) * wp + pl..][..w].copy_from_slice(row);
                }
            });
        (plane, Some(p))
    };
    let xp: &[f32] = padded.as_deref().unwrap_or(x);
    // dY on the padded row pitch: columns wo..wp of every row are zero (they would pair with
    // input pixels of the next row).
    let lw = ho * wp;
    let wide: Option<Vec<f32>> = (wp != wo).then(|| {
        let mut gw = vec![0f32; n * cout * lw];
        gw.par_chunks_mut(lw)
            .zip(g.par_chunks(ho * wo))
            .for_each(|(dst, src)| {
                for (drow, srow) in dst.chunks_exact_mut(wp).zip(src.chunks_exact(wo)) {
                    drow[..wo].copy_from_slice(srow);
                }
            });
        gw
    });
    let gw: &[f32] = wide.as_deref().unwrap_or(g);

    // One (Cout x Cin) partial per (tap, image); every partial is fully written by its gemm.
    let block = cout * cin;
    let mut partial = vec![0f32; taps * n * block];
    partial
        .par_chunks_mut(block)
        .enumerate()
        .for_each(|(t, dst)| {
            let (tap, img) = (t / n, t % n);
            let shift = (tap / kw) * wp + tap % kw;
            let lhs = &gw[img * cout * lw..][..cout * lw];
            let rhs = &xp[img * cin * plane..][..cin * plane];
            debug_assert!(shift + lw - 1 + (cin - 1) * plane < rhs.len());
            // SAFETY: dst is (cout x cin) row-major; lhs is (cout x lw) row-major; rhs element
            // (p, ci) is rhs[shift + p + ci * plane], inside the image's planes (asserted above:
            // the shift plus the wide length ends within the slack of the last plane).
            crate::fastmath::count_gemm(cout, cin, lw);
            unsafe {
                gemm19::gemm(
                    cout,
                    cin,
                    lw,
                    dst.as_mut_ptr(),
                    1,
                    cin as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    lw as isize,
                    rhs.as_ptr().add(shift),
                    plane as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm19::Parallelism::None,
                )
            };
        });
    // dW[co, ci, tap] = Σ_img partial[tap, img, co, ci]
    let mut dw = vec![0f32; block * taps];
    dw.par_chunks_mut(cin * taps).enumerate().for_each(|(co, row)| {
        for tap in 0..taps {
            for img in 0..n {
                let src = &partial[(tap * n + img) * block + co * cin..][..cin];
                for (ci, v) in src.iter().enumerate() {
                    row[ci * taps + tap] += *v;
                }
            }
        }
    });
    dw
}

fn conv_geometry(x: &[usize], w: &[usize], padding: [usize; 4]) -> Result<Geometry> {
    geometry(x, w, None, None, spec_of(padding))
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "ops-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let geo = conv_geometry(l1.dims(), l2.dims(), self.padding)?;
        let shape = Shape::from((geo.n, geo.cout, geo.ho, geo.wo));
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (x, w) = (operand(x, l1, "conv2d x")?, operand(w, l2, "conv2d w")?);
                CpuStorage::F32(run_cpu(x, w, None, None, None, None, &geo, Activation::None))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                let (x, w) = (operand(x, l1, "conv2d x")?, operand(w, l2, "conv2d w")?);
                CpuStorage::F64(conv_reference(x, w, &geo))
            }
            _ => bail!("trainable conv2d: x and w must both be f32 or both f64"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        conv_backward(self.padding, x, w, &grad.contiguous()?)
    }
}

/// (dX, dW) of a stride-1 convolution for the incoming gradient `grad` (contiguous), each only
/// when its operand tracks.
fn conv_backward(padding: [usize; 4], x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (_, _, kh, kw) = w.dims4()?;
    let dx = if x.track_op() {
        let [pt, pb, pl, pr] = padding;
        let flipped = flip_transpose(w)?;
        let op = ConvOp {
            padding: [kh - 1 - pt, kh - 1 - pb, kw - 1 - pl, kw - 1 - pr],
        };
        Some(grad.apply_op2_no_bwd(&flipped, &op)?)
    } else {
        None
    };
    let dw = if w.track_op() {
        let op = ConvWeightGrad { padding, kh, kw };
        Some(x.contiguous()?.apply_op2_no_bwd(grad, &op)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// `y = conv2d(x, w) + b`, the [`ConvOp`] with a per-channel bias added in the kernels' epilogue
/// (and its gradient summed from contiguous rows: candle's backward of a broadcast bias add
/// reduces over the batch and pixel axes with slow strided sums).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvBiasOp {
    pub padding: [usize; 4],
}

impl CustomOp3 for ConvBiasOp {
    fn name(&self) -> &'static str {
        "ops-conv2d-bias"
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
        let geo = conv_geometry(l1.dims(), l2.dims(), self.padding)?;
        if l3.dims() != [geo.cout] {
            bail!("conv2d: bias must have shape [{}], got {:?}", geo.cout, l3.dims());
        }
        let shape = Shape::from((geo.n, geo.cout, geo.ho, geo.wo));
        let hw = geo.ho * geo.wo;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let (x, w) = (operand(x, l1, "conv2d x")?, operand(w, l2, "conv2d w")?);
                let b = operand(b, l3, "conv2d bias")?;
                CpuStorage::F32(run_cpu(x, w, None, None, Some(b), None, &geo, Activation::None))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let (x, w) = (operand(x, l1, "conv2d x")?, operand(w, l2, "conv2d w")?);
                let b = operand(b, l3, "conv2d bias")?;
                let mut y = conv_reference(x, w, &geo);
                for (i, plane) in y.chunks_exact_mut(hw).enumerate() {
                    plane.iter_mut().for_each(|v| *v += b[i % geo.cout]);
                }
                CpuStorage::F64(y)
            }
            _ => bail!("trainable conv2d: x, w and bias must all be f32 or all f64"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw) = conv_backward(self.padding, x, w, &grad)?;
        let db = if b.track_op() {
            let (n, c, h, w) = grad.dims4()?;
            // Σ over pixels (contiguous rows), then over the (small) batch.
            Some(grad.reshape((n, c, h * w))?.sum(2)?.sum(0)?.detach())
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "ops-conv2d-weight-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (&[n, cin, _, _], &[gn, cout, _, _]) = (l1.dims(), l2.dims()) else {
            bail!("conv2d weight grad: x and dY must be 4-D, got {:?} and {:?}", l1.dims(), l2.dims());
        };
        let geo = conv_geometry(l1.dims(), &[cout, cin, self.kh, self.kw], self.padding)?;
        if gn != n || l2.dims() != [n, cout, geo.ho, geo.wo] {
            bail!("conv2d weight grad: dY {:?} does not match the output {:?}", l2.dims(), [n, cout, geo.ho, geo.wo]);
        }
        let shape = Shape::from((cout, cin, self.kh, self.kw));
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                let (x, g) = (operand(x, l1, "conv2d x")?, operand(g, l2, "conv2d dY")?);
                CpuStorage::F32(weight_grad_f32(x, g, &geo))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                let (x, g) = (operand(x, l1, "conv2d x")?, operand(g, l2, "conv2d dY")?);
                CpuStorage::F64(weight_grad_reference(x, g, &geo))
            }
            _ => bail!("conv2d weight grad: x and dY must both be f32 or both f64"),
        };
        Ok((out, shape))
    }
}

/// (Cout, Cin, kh, kw) -> (Cin, Cout, kh, kw) with both spatial axes reversed.
fn flip_transpose(w: &Tensor) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let rev = |k: usize| Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, w.device());
    let mut t = w.detach().transpose(0, 1)?.contiguous()?;
    if kh > 1 {
        t = t.index_select(&rev(kh)?, 2)?;
    }
    if kw > 1 {
        t = t.index_select(&rev(kw)?, 3)?;
    }
    t.contiguous()
}

/// Whether [`conv2d_trainable`] runs the custom op for these operands (else candle's conv2d).
pub(crate) fn supported(x: &Tensor, w: &Tensor, padding: [usize; 4]) -> bool {
    let cpu = x.device().is_cpu() && w.device().is_cpu();
    let dt = x.dtype() == w.dtype() && matches!(x.dtype(), DType::F32 | DType::F64);
    let fits = match w.dims() {
        &[_, _, kh, kw] => {
            let [pt, pb, pl, pr] = padding;
            pt < kh && pb < kh && pl < kw && pr < kw
        }
        _ => false,
    };
    cpu && dt && fits
}

// ---- GroupNorm ----------------------------------------------------------------------------------

/// `GroupNorm(groups, C, eps)` with affine weight and bias on a contiguous (B, C, H, W) input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
}

impl GroupNormOp {
    /// (b, c, hw) of `dims`, checked against the affine parameters' length.
    fn sizes(&self, dims: &[usize], c_param: usize) -> Result<(usize, usize, usize)> {
        let &[b, c, h, w] = dims else {
            bail!("group_norm: expected a (B, C, H, W) input, got {dims:?}");
        };
        if c != c_param || self.groups == 0 || c % self.groups != 0 {
            bail!("group_norm: {c} channels, {c_param} affine parameters, {} groups", self.groups);
        }
        Ok((b, c, h * w))
    }

    /// (mean, 1/sqrt(var + eps)) of one group's values, two passes in f64 (like torch's
    /// population variance).
    fn stats<T: Elem>(&self, xs: &[T]) -> (f64, f64) {
        let n = xs.len().max(1) as f64;
        let (mean, var) = match as_f32(xs) {
            Some(x) => {
                let mean = lanes_sum(x) / n;
                (mean, lanes_sq_dev(x, mean as f32) / n)
            }
            None => {
                let mean = xs.iter().map(|v| v.to_f64()).sum::<f64>() / n;
                let var = xs
                    .iter()
                    .map(|v| {
                        let d = v.to_f64() - mean;
                        d * d
                    })
                    .sum::<f64>()
                    / n;
                (mean, var)
            }
        };
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    fn forward<T: Elem>(&self, x: &[T], gamma: &[T], beta: &[T], c: usize, hw: usize) -> Vec<T> {
        let cg = c / self.groups;
        let glen = cg * hw;
        let mut y = vec![T::from_f64(0.0); x.len()];
        y.par_chunks_mut(glen)
            .zip(x.par_chunks(glen))
            .enumerate()
            .for_each(|(bg, (yg, xg))| {
                let (mean, rstd) = self.stats(xg);
                let c0 = (bg % self.groups) * cg;
                for (j, (yc, xc)) in yg.chunks_exact_mut(hw).zip(xg.chunks_exact(hw)).enumerate() {
                    let scale = rstd * gamma[c0 + j].to_f64();
                    let shift = beta[c0 + j].to_f64() - mean * scale;
                    let (scale, shift) = (T::from_f64(scale), T::from_f64(shift));
                    fma_row(yc, xc, scale, shift);
                }
            });
        y
    }

    /// (dx, dγ, dβ).
    fn backward<T: Elem>(
        &self,
        x: &[T],
        gamma: &[T],
        dy: &[T],
        c: usize,
        hw: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let cg = c / self.groups;
        let glen = cg * hw;
        let b = x.len() / (c * hw).max(1);
        let mut dx = vec![T::from_f64(0.0); x.len()];
        // Per (image, channel): (Σ dy·x̂, Σ dy), summed over images afterwards.
        let mut per_channel = vec![(0f64, 0f64); b * c];
        dx.par_chunks_mut(glen)
            .zip(per_channel.par_chunks_mut(cg))
            .zip(x.par_chunks(glen).zip(dy.par_chunks(glen)))
            .enumerate()
            .for_each(|(bg, ((dxg, pc), (xg, gg)))| {
                let (mean, rstd) = self.stats(xg);
                let c0 = (bg % self.groups) * cg;
                // Σ dy·γ and Σ dy·γ·x̂ over the group, and the per-channel sums.
                let (mut s1, mut s2) = (0f64, 0f64);
                for (j, (xc, gc)) in xg.chunks_exact(hw).zip(gg.chunks_exact(hw)).enumerate() {
                    // (Σ dy, Σ dy·(x − mean)); Σ dy·x̂ = rstd · Σ dy·(x − mean)
                    let (sdy, sdyx) = match (as_f32(gc), as_f32(xc)) {
                        (Some(g), Some(x)) => lanes_dot_dev(g, x, mean as f32),
                        _ => xc.iter().zip(gc).fold((0f64, 0f64), |(a, b), (xv, gv)| {
                            let g = gv.to_f64();
                            (a + g, b + g * (xv.to_f64() - mean))
                        }),
                    };
                    let sdyxhat = rstd * sdyx;
                    pc[j] = (sdyxhat, sdy);
                    let gm = gamma[c0 + j].to_f64();
                    s1 += gm * sdy;
                    s2 += gm * sdyxhat;
                }
                let n = glen.max(1) as f64;
                let (m1, m2) = (s1 / n, s2 / n);
                // dx = rstd·(dy·γ − m1 − x̂·m2) = a·dy + k·x + c0' per channel
                for (j, ((dxc, xc), gc)) in dxg
                    .chunks_exact_mut(hw)
                    .zip(xg.chunks_exact(hw))
                    .zip(gg.chunks_exact(hw))
                    .enumerate()
                {
                    let a = rstd * gamma[c0 + j].to_f64();
                    let k = -rstd * rstd * m2;
                    let off = -rstd * m1 + rstd * rstd * m2 * mean;
                    let (a, k, off) = (T::from_f64(a), T::from_f64(k), T::from_f64(off));
                    fma2_row(dxc, gc, xc, a, k, off);
                }
            });
        let mut dgamma = vec![T::from_f64(0.0); c];
        let mut dbeta = vec![T::from_f64(0.0); c];
        for ch in 0..c {
            let (mut sg, mut sb) = (0f64, 0f64);
            for img in 0..b {
                let (g, bb) = per_channel[img * c + ch];
                sg += g;
                sb += bb;
            }
            dgamma[ch] = T::from_f64(sg);
            dbeta[ch] = T::from_f64(sb);
        }
        (dx, dgamma, dbeta)
    }
}

/// f32 reductions for the GroupNorm passes: 16 independent f32 lanes (vectorised, unlike one
/// serial f64 sum) over blocks of 1024 values, the block sums added in f64, so no lane ever sums
/// more than 64 values.
const LANES: usize = 16;
const BLOCK: usize = 1024;

fn lanes_sum(x: &[f32]) -> f64 {
    x.chunks(BLOCK)
        .map(|b| {
            let mut acc = [0f32; LANES];
            let mut it = b.chunks_exact(LANES);
            for c in &mut it {
                for (a, v) in acc.iter_mut().zip(c) {
                    *a += v;
                }
            }
            acc.iter().map(|&a| a as f64).sum::<f64>() + it.remainder().iter().map(|&v| v as f64).sum::<f64>()
        })
        .sum()
}

/// Σ (x − m)².
fn lanes_sq_dev(x: &[f32], m: f32) -> f64 {
    x.chunks(BLOCK)
        .map(|b| {
            let mut acc = [0f32; LANES];
            let mut it = b.chunks_exact(LANES);
            for c in &mut it {
                for (a, v) in acc.iter_mut().zip(c) {
                    let d = v - m;
                    *a += d * d;
                }
            }
            let tail: f64 = it.remainder().iter().map(|&v| ((v - m) as f64).powi(2)).sum();
            acc.iter().map(|&a| a as f64).sum::<f64>() + tail
        })
        .sum()
}

/// (Σ g, Σ g·(x − m)).
fn lanes_dot_dev(g: &[f32], x: &[f32], m: f32) -> (f64, f64) {
    g.chunks(BLOCK)
        .zip(x.chunks(BLOCK))
        .map(|(gb, xb)| {
            let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
            let (mut gi, mut xi) = (gb.chunks_exact(LANES), xb.chunks_exact(LANES));
            for (gc, xc) in (&mut gi).zip(&mut xi) {
                for i in 0..LANES {
                    s1[i] += gc[i];
                    s2[i] += gc[i] * (xc[i] - m);
                }
            }
            let (mut t1, mut t2) = (0f64, 0f64);
            for (&gv, &xv) in gi.remainder().iter().zip(xi.remainder()) {
                t1 += gv as f64;
                t2 += gv as f64 * (xv - m) as f64;
            }
            (
                s1.iter().map(|&a| a as f64).sum::<f64>() + t1,
                s2.iter().map(|&a| a as f64).sum::<f64>() + t2,
            )
        })
        .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d))
}

/// y = x·scale + shift, elementwise (vectorised for f32 by the compiler).
#[inline]
fn fma_row<T: Elem>(y: &mut [T], x: &[T], scale: T, shift: T) {
    if let (Some(y), Some(x), Some(s), Some(t)) = (as_f32_mut(y), as_f32(x), as_f32v(scale), as_f32v(shift)) {
        y.iter_mut().zip(x).for_each(|(o, &v)| *o = v * s + t);
        return;
    }
    for (o, v) in y.iter_mut().zip(x) {
        *o = T::from_f64(v.to_f64() * scale.to_f64() + shift.to_f64());
    }
}

/// dx = a·g + k·x + off, elementwise.
#[inline]
fn fma2_row<T: Elem>(dx: &mut [T], g: &[T], x: &[T], a: T, k: T, off: T) {
    if let (Some(dx), Some(g), Some(x), Some(a), Some(k), Some(off)) =
        (as_f32_mut(dx), as_f32(g), as_f32(x), as_f32v(a), as_f32v(k), as_f32v(off))
    {
        dx.iter_mut().zip(g.iter().zip(x)).for_each(|(o, (&gv, &xv))| *o = a * gv + k * xv + off);
        return;
    }
    for (o, (gv, xv)) in dx.iter_mut().zip(g.iter().zip(x)) {
        *o = T::from_f64(a.to_f64() * gv.to_f64() + k.to_f64() * xv.to_f64() + off.to_f64());
    }
}

fn as_f32<T: Elem>(s: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (checked just above), so the slice reinterprets to itself.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) })
}

fn as_f32_mut<T: Elem>(s: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (checked just above).
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut f32, s.len()) })
}

fn as_f32v<T: Elem>(v: T) -> Option<f32> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| v.to_f64() as f32)
}

fn typed<'a, T: Elem>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match T::slice(s) {
        Some(v) => operand(v, l, what),
        None => bail!("group_norm: {what} has the wrong dtype"),
    }
}

impl GroupNormOp {
    fn fwd_typed<T: Elem>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = self.sizes(l1.dims(), l2.dims().iter().product())?;
        if l3.dims().iter().product::<usize>() != c {
            bail!("group_norm: bias has {:?} values for {c} channels", l3.dims());
        }
        let x = typed::<T>(s1, l1, "x")?;
        let y = self.forward(x, typed::<T>(s2, l2, "weight")?, typed::<T>(s3, l3, "bias")?, c, hw);
        Ok((T::wrap(y), l1.shape().clone()))
    }
}

/// The contiguous data behind a CPU tensor's storage guard.
fn cpu_slice<'a, T: Elem>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match s {
        candle_core::Storage::Cpu(cpu) => typed::<T>(cpu, l, what),
        _ => bail!("group_norm: {what} must be a CPU tensor"),
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ops-group-norm"
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
        match s1 {
            CpuStorage::F32(_) => self.fwd_typed::<f32>(s1, l1, s2, l2, s3, l3),
            CpuStorage::F64(_) => self.fwd_typed::<f64>(s1, l1, s2, l2, s3, l3),
            _ => bail!("group_norm: f32 or f64 only"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: Elem>(op: &GroupNormOp, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
            let (_, c, hw) = op.sizes(x.dims(), w.elem_count())?;
            let (x, w, g) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
            let ((sx, lx), (sw, lw), (sg, lg)) = (x.storage_and_layout(), w.storage_and_layout(), g.storage_and_layout());
            let xs = cpu_slice::<T>(&sx, lx, "x")?;
            let ws = cpu_slice::<T>(&sw, lw, "weight")?;
            let gs = cpu_slice::<T>(&sg, lg, "grad")?;
            Ok(op.backward(xs, ws, gs, c, hw))
        }
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => {
                let (a, b, c) = run::<f32>(self, x, w, grad)?;
                (Tensor::new(a, x.device())?, Tensor::new(b, x.device())?, Tensor::new(c, x.device())?)
            }
            DType::F64 => {
                let (a, b, c) = run::<f64>(self, x, w, grad)?;
                (Tensor::new(a, x.device())?, Tensor::new(b, x.device())?, Tensor::new(c, x.device())?)
            }
            dt => bail!("group_norm: unsupported dtype {dt:?}"),
        };
        Ok((
            x.track_op().then(|| dx.reshape(x.shape())).transpose()?,
            w.track_op().then(|| dw.reshape(w.shape())).transpose()?,
            b.track_op().then(|| db.reshape(b.shape())).transpose()?,
        ))
    }
}
