//! Direct depthwise convolution (`groups == Cin == Cout`), one task per (image, channel) plane.
//!
//! Each plane is first copied into a zero-bordered scratch split into `stride` column phases
//! (`P[p][r][j] = padded[r][j * stride + p]`), wide enough that every tap of every output
//! column is an in-bounds contiguous read. The kernel then computes an output row in blocks of
//! `L` columns held in registers across all kh*kw taps (one store per block instead of one
//! load-add-store per tap), and the epilogue adds bias / residual and applies the activation.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{epilogue, Activation, Geometry, SyncPtr};

thread_local! {
    /// (phase planes, one padded output row)
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Per-plane layout of the padded, phase-split scratch.
struct Padded {
    /// rows of the padded input that the output needs
    rows: usize,
    /// floats per phase row
    pw: usize,
    /// output row width rounded up to the block width
    wo_pad: usize,
}

impl Padded {
    fn new(geo: &Geometry, block: usize) -> Self {
        let (sh, sw) = geo.spec.stride;
        let (dh, dw) = geo.spec.dilation;
        let wo_pad = geo.wo.div_ceil(block) * block;
        let rows = (geo.ho - 1) * sh + (geo.kh - 1) * dh + 1;
        // Largest phase column read: (wo_pad - 1) + ((kw - 1) * dw) / sw.
        let pw = wo_pad + ((geo.kw - 1) * dw) / sw;
        Self { rows, pw, wo_pad }
    }
}

/// Copies plane `x` (H, W) into the phase layout with zero borders.
fn fill_padded(x: &[f32], geo: &Geometry, pd: &Padded, dst: &mut [f32]) {
    let (h, w) = (geo.h, geo.w);
    let s = geo.spec.stride.1;
    let [pt, _, pl, _] = geo.spec.padding;
    for p in 0..s {
        for r in 0..pd.rows {
            let out = &mut dst[(p * pd.rows + r) * pd.pw..(p * pd.rows + r + 1) * pd.pw];
            let iy = r as isize - pt as isize;
            if iy < 0 || iy >= h as isize {
                out.fill(0.0);
                continue;
            }
            let row = &x[iy as usize * w..(iy as usize + 1) * w];
            // Phase column j holds padded column j*s + p, i.e. input column j*s + p - pl.
            let (lo, hi) = super::gemm_path::valid_range(p as isize - pl as isize, s, w, pd.pw);
            out[..lo].fill(0.0);
            out[hi..].fill(0.0);
            if hi > lo {
                let first = lo * s + p - pl;
                out[lo..hi]
                    .iter_mut()
                    .zip(row[first..].iter().step_by(s))
                    .for_each(|(d, v)| *d = *v);
            }
        }
    }
}

/// One output row: `orow[ox] = sum over taps of w * P[phase][oy*sh + ky*dh][ox + shift]`,
/// computed `L` columns at a time with the accumulators in registers.
#[inline(always)]
fn row_blocks<const L: usize>(
    src: &[f32],
    taps: &[f32],
    tap_at: &[(usize, usize)],
    oy: usize,
    geo: &Geometry,
    pd: &Padded,
    orow: &mut [f32],
) {
    let (sh, _) = geo.spec.stride;
    let dh = geo.spec.dilation.0;
    for (cx, out) in orow.chunks_exact_mut(L).enumerate() {
        let mut acc = [0f32; L];
        for ky in 0..geo.kh {
            let r = oy * sh + ky * dh;
            for kx in 0..geo.kw {
                let (phase, shift) = tap_at[kx];
                let t = taps[ky * geo.kw + kx];
                let base = (phase * pd.rows + r) * pd.pw + cx * L + shift;
                let s: &[f32; L] = src[base..base + L].try_into().expect("block of L floats");
                for i in 0..L {
                    acc[i] += t * s[i];
                }
            }
        }
        out.copy_from_slice(&acc);
    }
}

/// One channel plane: `x` (H, W) -> `out` (Ho, Wo), bias / residual / activation included.
#[allow(clippy::too_many_arguments)]
fn plane(
    x: &[f32],
    taps: &[f32],
    bias: f32,
    residual: Option<&[f32]>,
    out: &mut [f32],
    geo: &Geometry,
    act: Activation,
    block: usize,
) {
    let pd = Padded::new(geo, block);
    let sw = geo.spec.stride.1;
    let dw = geo.spec.dilation.1;
    // Tap kx reads padded column ox*sw + kx*dw = (ox + shift)*sw + phase.
    let tap_at: Vec<(usize, usize)> = (0..geo.kw)
        .map(|kx| ((kx * dw) % sw, (kx * dw) / sw))
        .collect();
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (padded, orow) = &mut *guard;
        let need = sw * pd.rows * pd.pw;
        if padded.len() < need {
            padded.resize(need, 0.0);
        }
        if orow.len() < pd.wo_pad {
            orow.resize(pd.wo_pad, 0.0);
        }
        fill_padded(x, geo, &pd, &mut padded[..need]);
        let src = &padded[..need];
        let orow = &mut orow[..pd.wo_pad];
        for oy in 0..geo.ho {
            match block {
                64 => row_blocks::<64>(src, taps, &tap_at, oy, geo, &pd, orow),
                32 => row_blocks::<32>(src, taps, &tap_at, oy, geo, &pd, orow),
                _ => row_blocks::<16>(src, taps, &tap_at, oy, geo, &pd, orow),
            }
            let o = &mut out[oy * geo.wo..(oy + 1) * geo.wo];
            o.copy_from_slice(&orow[..geo.wo]);
            epilogue(
                o,
                bias,
                residual.map(|r| &r[oy * geo.wo..(oy + 1) * geo.wo]),
                act,
            );
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
    // Wide blocks give independent accumulator chains (FMA latency); narrow rows would waste
    // most of a wide block on padding.
    let block = match geo.wo {
        64.. => 64,
        24.. => 32,
        _ => 16,
    };
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
            block,
        );
    });
    // SAFETY: every plane was written by its task.
    unsafe { out.set_len(len) };
    out
}
