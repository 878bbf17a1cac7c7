//! Direct depthwise convolution (`groups == Cin == Cout`), one task per (image, channel) plane.
//!
//! Each output row accumulates `w[ky][kx] * input row` over the taps, restricted to the columns
//! where the tap lands inside the image so the inner loop has no branches. For stride > 1 the
//! plane is first split into `stride` column phases (`phase[p][y][j] = x[y][j * stride + p]`),
//! which turns every strided tap into a contiguous, vectorisable axpy.

use std::cell::RefCell;

use rayon::prelude::*;

use super::gemm_path::valid_range;
use super::{epilogue, Activation, Geometry, SyncPtr};

thread_local! {
    static PHASES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[inline]
fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, x)| *a += w * x);
}

/// One channel plane: `x` (H, W) -> `out` (Ho, Wo), bias / residual / activation included.
fn plane(x: &[f32], taps: &[f32], bias: f32, residual: Option<&[f32]>, out: &mut [f32], geo: &Geometry, act: Activation) {
    let (h, w, ho, wo) = (geo.h, geo.w, geo.ho, geo.wo);
    let (sh, sw) = geo.spec.stride;
    let (dh, dw) = geo.spec.dilation;
    let [pt, _, pl, _] = geo.spec.padding;
    // Column phases: for sw == 1 the plane itself, otherwise deinterleaved into scratch.
    let pw = w.div_ceil(sw);
    PHASES.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let src: &[f32] = if sw == 1 {
            x
        } else {
            if scratch.len() < sw * h * pw {
                scratch.resize(sw * h * pw, 0.0);
            }
            for p in 0..sw {
                for y in 0..h {
                    let row = &x[y * w..(y + 1) * w];
                    let dst = &mut scratch[(p * h + y) * pw..(p * h + y + 1) * pw];
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = row.get(j * sw + p).copied().unwrap_or(0.0);
                    }
                }
            }
            &scratch[..sw * h * pw]
        };
        let row_len = if sw == 1 { w } else { pw };
        for oy in 0..ho {
            let acc = &mut out[oy * wo..(oy + 1) * wo];
            acc.fill(0.0);
            for ky in 0..geo.kh {
                let iy = (oy * sh + ky * dh) as isize - pt as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let iy = iy as usize;
                for kx in 0..geo.kw {
                    let off = (kx * dw) as isize - pl as isize;
                    let (lo, hi) = valid_range(off, sw, w, wo);
                    if lo >= hi {
                        continue;
                    }
                    let t = taps[ky * geo.kw + kx];
                    // Input column of output column o is o*sw + off = (o + q)*sw + phase.
                    let phase = off.rem_euclid(sw as isize) as usize;
                    let q = (off - phase as isize) / sw as isize;
                    let start = (lo as isize + q) as usize;
                    let base = if sw == 1 { iy * w } else { (phase * h + iy) * pw };
                    debug_assert!(start + (hi - lo) <= row_len);
                    axpy(&mut acc[lo..hi], t, &src[base + start..base + start + (hi - lo)]);
                }
            }
            let r = residual.map(|r| &r[oy * wo..(oy + 1) * wo]);
            epilogue(acc, bias, r, act);
        }
    });
}

pub(crate) fn depthwise(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    geo: &Geometry,
    act: Activation,
) -> Vec<f32> {
    let c = geo.cin;
    let hw_in = geo.h * geo.w;
    let hw = geo.ho * geo.wo;
    let k = geo.kh * geo.kw;
    // Uninitialised (zeroing would be an extra pass); each task zeroes its plane before
    // making a slice of it.
    let len = geo.n * c * hw;
    let mut out = Vec::<f32>::with_capacity(len);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    (0..geo.n * c).into_par_iter().for_each(|t| {
        let ch = t % c;
        // SAFETY: plane t of the output belongs to this task only, and is initialised before
        // the slice is made.
        let o = unsafe {
            let p = out_ptr.get().add(t * hw);
            std::ptr::write_bytes(p, 0, hw);
            std::slice::from_raw_parts_mut(p, hw)
        };
        plane(
            &x[t * hw_in..(t + 1) * hw_in],
            &w[ch * k..(ch + 1) * k],
            bias.map_or(0.0, |b| b[ch]),
            residual.map(|r| &r[t * hw..(t + 1) * hw]),
            o,
            geo,
            act,
        );
    });
    // SAFETY: every plane was written by its task.
    unsafe { out.set_len(len) };
    out
}
