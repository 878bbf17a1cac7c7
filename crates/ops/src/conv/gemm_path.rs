//! Dense and grouped convolution as tiled gemm: for every (image, group, pixel tile) task,
//! `out[Cout_g x tile] = W_g[Cout_g x K] * B[K x tile]` with `K = Cin_g * kh * kw`, where `B` is
//! the input itself for 1x1 stride-1 unpadded convs and an im2col tile otherwise.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{epilogue, Activation, Geometry, SyncPtr};

/// Floats of im2col scratch per task: 512 KiB keeps the tile and the packed gemm panels inside
/// this machine's 2 MiB L2, so the tile is written and read back from cache.
const TILE_BUDGET_FLOATS: usize = 128 * 1024;
/// Fewer pixels per gemm than this wastes the gemm's weight packing (every call repacks the
/// weights): 256 beat 64 by ~5% on ResNet-50 at 480 (layers 3-4, K up to 4608); 512 was no
/// better.
const MIN_TILE: usize = 256;
/// Upper bound so the output tile (Cout_g x tile) is still cache-resident for the epilogue.
const MAX_TILE: usize = 4096;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Pixels per task: bounded by the cache budget, and small enough that every thread gets work.
fn tile_size(geo: &Geometry, hw: usize, k: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // Measured on the ResNet-50 shapes: 64K..512K floats all land within noise of each other.
    let by_cache = (TILE_BUDGET_FLOATS / k).clamp(MIN_TILE, MAX_TILE);
    let mut tiles = hw.div_ceil(by_cache);
    let outer = geo.n * geo.spec.groups;
    // Few tasks in all: round the count up so the threads get equal shares.
    if outer * tiles < 8 * threads {
        let total = (outer * tiles).div_ceil(threads) * threads;
        tiles = total.div_ceil(outer).max(1);
    }
    hw.div_ceil(tiles).max(1)
}

/// For tap offset `off = k * dilation - pad`: the output columns whose input column
/// `o * stride + off` lies inside `[0, len)`, as a half-open range clamped to `[0, out)`.
#[inline]
pub(crate) fn valid_range(off: isize, stride: usize, len: usize, out: usize) -> (usize, usize) {
    let s = stride as isize;
    // smallest o with o*s + off >= 0
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    // largest o with o*s + off <= len - 1, plus one
    let last = len as isize - 1 - off;
    let hi = if last < 0 { 0 } else { last / s + 1 };
    let hi = (hi as usize).min(out);
    let lo = (lo as usize).min(hi);
    (lo, hi)
}

/// Splits each (H, W) plane into `s` column phases, `out[c][p][y][j] = x[c][y][j * s + p]`
/// (zero past the edge), so that strided taps read contiguous runs. Parallel over planes.
fn split_phases(x: &[f32], planes: usize, h: usize, w: usize, s: usize) -> Vec<f32> {
    let pw = w.div_ceil(s);
    let mut out = vec![0f32; planes * s * h * pw];
    out.par_chunks_mut(s * h * pw)
        .zip(x.par_chunks(h * w))
        .for_each(|(o, x)| {
            for (y, row) in x.chunks_exact(w).enumerate() {
                for p in 0..s {
                    let dst = &mut o[(p * h + y) * pw..(p * h + y + 1) * pw];
                    for (d, v) in dst.iter_mut().zip(row.iter().skip(p).step_by(s)) {
                        *d = *v;
                    }
                }
            }
        });
    out
}

/// Fills `buf` (K rows of `p1 - p0` floats) with the im2col rows of output pixels `[p0, p1)`.
/// `x` is one image's channels of one group: (Cin_g, H, W), or with `phased` the
/// [`split_phases`] layout (Cin_g, stride_w, H, ceil(W / stride_w)).
fn im2col_tile(x: &[f32], geo: &Geometry, phased: bool, p0: usize, p1: usize, buf: &mut [f32]) {
    let (h, w, wo) = (geo.h, geo.w, geo.wo);
    let (sh, sw) = geo.spec.stride;
    let (dh, dw) = geo.spec.dilation;
    let [pt, _, pl, _] = geo.spec.padding;
    let pw = w.div_ceil(sw);
    let plane_len = if phased { sw * h * pw } else { h * w };
    let tn = p1 - p0;
    let mut rows = buf.chunks_exact_mut(tn);
    for plane in x.chunks_exact(plane_len).take(geo.cin_g()) {
        for ky in 0..geo.kh {
            let y_off = (ky * dh) as isize - pt as isize;
            for kx in 0..geo.kw {
                let x_off = (kx * dw) as isize - pl as isize;
                let (lo, hi) = valid_range(x_off, sw, w, wo);
                // Output column o reads input column o*sw + x_off = (o + q)*sw + phase.
                let phase = x_off.rem_euclid(sw as isize) as usize;
                let q = (x_off - phase as isize) / sw as isize;
                let row = rows.next().expect("im2col: buffer holds K rows");
                let mut p = p0;
                let mut seg_start = 0;
                while p < p1 {
                    let oy = p / wo;
                    let ox0 = p % wo;
                    let ox1 = wo.min(ox0 + (p1 - p));
                    let seg = &mut row[seg_start..seg_start + (ox1 - ox0)];
                    let iy = (oy * sh) as isize + y_off;
                    if iy < 0 || iy >= h as isize {
                        seg.fill(0.0);
                    } else {
                        let iy = iy as usize;
                        let a = lo.clamp(ox0, ox1);
                        let b = hi.clamp(a, ox1);
                        seg[..a - ox0].fill(0.0);
                        seg[b - ox0..].fill(0.0);
                        if b > a {
                            let dst = &mut seg[a - ox0..b - ox0];
                            if phased {
                                let start = (phase * h + iy) * pw + (a as isize + q) as usize;
                                dst.copy_from_slice(&plane[start..start + (b - a)]);
                            } else {
                                let start = iy * w + ((a * sw) as isize + x_off) as usize;
                                if sw == 1 {
                                    dst.copy_from_slice(&plane[start..start + (b - a)]);
                                } else {
                                    dst.iter_mut()
                                        .zip(plane[start..].iter().step_by(sw))
                                        .for_each(|(d, v)| *d = *v);
                                }
                            }
                        }
                    }
                    seg_start += ox1 - ox0;
                    p += ox1 - ox0;
                }
            }
        }
    }
}

/// `dst[m x n] (row stride dst_rs) = lhs[m x k] (row-major) * rhs[k x n] (row stride rhs_rs)`.
///
/// # Safety
/// The pointers must cover the described matrices and `dst` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    rhs: *const f32,
    rhs_rs: usize,
) {
    crate::fastmath::count_gemm(m, n, k);
    gemm19::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        1,
        k as isize,
        rhs,
        1,
        rhs_rs as isize,
        0.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm19::Parallelism::None,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_gemm(
    x: &[f32],
    w: &[f32],
    taps: Option<&[f32]>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    geo: &Geometry,
    act: Activation,
) -> Vec<f32> {
    let groups = geo.spec.groups;
    let (cin_g, cout_g) = (geo.cin_g(), geo.cout_g());
    let k = cin_g * geo.kh * geo.kw;
    let hw_in = geo.h * geo.w;
    let hw = geo.ho * geo.wo;
    let pointwise = geo.kh == 1 && geo.kw == 1 && geo.spec.padding == [0; 4];
    if pointwise && geo.spec.stride != (1, 1) {
        // Strided 1x1 (ResNet downsample): subsample the input once, then it is a stride-1 1x1
        // conv on the smaller map (one cheap gather instead of a phase split plus im2col).
        let (sh, sw) = geo.spec.stride;
        let mut sub = vec![0f32; geo.n * geo.cin * hw];
        sub.par_chunks_mut(hw)
            .zip(x.par_chunks(hw_in))
            .for_each(|(dst, plane)| {
                for (oy, drow) in dst.chunks_exact_mut(geo.wo).enumerate() {
                    let row = &plane[oy * sh * geo.w..][..geo.w];
                    drow.iter_mut()
                        .zip(row.iter().step_by(sw))
                        .for_each(|(d, v)| *d = *v);
                }
            });
        let mut spec = geo.spec;
        spec.stride = (1, 1);
        let sub_geo = Geometry {
            h: geo.ho,
            w: geo.wo,
            spec,
            ..*geo
        };
        return conv_gemm(&sub, w, taps, bias, residual, &sub_geo, act);
    }
    let direct = pointwise && geo.spec.stride == (1, 1);
    let wq = (geo.w + geo.spec.padding[2] + geo.spec.padding[3]).div_ceil(geo.spec.stride.1);
    // Shifted gemms when each tap's gemm has a useful depth (Cin_g >= 16: not the RGB stem) and
    // the rows are wide enough that the (Wq - Wo) junk columns cost little.
    if !pointwise && geo.cin_g() >= 16 && (wq - geo.wo) * 10 <= geo.wo {
        let owned;
        let taps = match taps {
            Some(t) => t,
            None => {
                owned = tap_major(
                    w,
                    geo.spec.groups,
                    geo.cout_g(),
                    geo.cin_g(),
                    geo.kh * geo.kw,
                );
                &owned
            }
        };
        return conv_shifted(x, taps, bias, residual, geo, act);
    }
    // Strided kxk / 1x1: one pass splitting column phases beats strided gathers in every tile.
    let phases = (!direct && geo.spec.stride.1 > 1)
        .then(|| split_phases(x, geo.n * geo.cin, geo.h, geo.w, geo.spec.stride.1));
    let x_plane = match phases {
        Some(_) => geo.spec.stride.1 * geo.h * geo.w.div_ceil(geo.spec.stride.1),
        None => hw_in,
    };
    let x_src: &[f32] = phases.as_deref().unwrap_or(x);
    let tn = tile_size(geo, hw, k);
    let tiles = hw.div_ceil(tn);
    let tasks = geo.n * groups * tiles;

    // Left uninitialised: zeroing costs a full extra pass over every output (~180 MB per
    // ResNet-50 forward). The gemm never reads dst (read_dst = false) and slices are only made
    // of rows it has written.
    let len = geo.n * geo.cout * hw;
    let mut out = Vec::<f32>::with_capacity(len);
    let out_ptr = SyncPtr(out.as_mut_ptr());

    (0..tasks).into_par_iter().for_each(|t| {
        let img = t / (groups * tiles);
        let g = (t / tiles) % groups;
        let p0 = (t % tiles) * tn;
        let p1 = (p0 + tn).min(hw);
        let n = p1 - p0;
        let x_g = &x_src[img * geo.cin * x_plane + g * cin_g * x_plane..][..cin_g * x_plane];
        let w_g = &w[g * cout_g * k..][..cout_g * k];
        let out_off = img * geo.cout * hw + g * cout_g * hw + p0;
        // SAFETY: task t alone writes rows [g*cout_g, (g+1)*cout_g) x columns [p0, p1) of image
        // img; the gemm reads x / w slices that outlive this call.
        let dst = unsafe { out_ptr.get().add(out_off) };
        if direct {
            unsafe {
                sgemm(
                    cout_g,
                    n,
                    k,
                    dst,
                    hw,
                    w_g.as_ptr(),
                    x_g.as_ptr().add(p0),
                    hw_in,
                )
            };
        } else {
            SCRATCH.with(|s| {
                let mut buf = s.borrow_mut();
                if buf.len() < k * n {
                    buf.resize(k * n, 0.0);
                }
                im2col_tile(x_g, geo, phases.is_some(), p0, p1, &mut buf[..k * n]);
                unsafe { sgemm(cout_g, n, k, dst, hw, w_g.as_ptr(), buf.as_ptr(), n) };
            });
        }
        for co in 0..cout_g {
            let c = g * cout_g + co;
            // SAFETY: this row segment belongs to this task and was fully written by the gemm.
            let row =
                unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(out_off + co * hw), n) };
            let b = bias.map_or(0.0, |b| b[c]);
            let r = residual.map(|r| &r[img * geo.cout * hw + c * hw + p0..][..n]);
            epilogue(row, b, r, act);
        }
    });
    // SAFETY: the tasks covered every (image, channel, pixel) of the output exactly once.
    unsafe { out.set_len(len) };
    out
}

/// kxk convolution without im2col. The input is zero-padded to (Hp, Wp) and split into
/// sh*sw phase images `P[py][px][r][c] = padded[r*sh + py][c*sw + px]` of (Hq, Wq) (for stride 1
/// just the padded plane), and the output is computed with the same row pitch Wq ("wide"
/// pixels, the last Wq - Wo of each row junk). Then tap (ky, kx), with d = ky*dh and e = kx*dw,
/// is a plain shift of one flattened phase image: `out_wide[:, p] += W[:, :, ky, kx] *
/// P[d % sh][e % sw][:, p + (d / sh)*Wq + e / sw]`. So each pixel tile is kh*kw accumulating
/// gemms reading the phase images in place (weights in [`tap_major`] order), and the epilogue
/// drops the junk columns while applying bias / residual / activation.
fn conv_shifted(
    x: &[f32],
    taps: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    geo: &Geometry,
    act: Activation,
) -> Vec<f32> {
    let groups = geo.spec.groups;
    let (cin_g, cout_g) = (geo.cin_g(), geo.cout_g());
    let (kh, kw) = (geo.kh, geo.kw);
    let (dh, dw) = geo.spec.dilation;
    let (sh, sw) = geo.spec.stride;
    let [pt, pb, pl, pr] = geo.spec.padding;
    let (hq, wq) = (
        (geo.h + pt + pb).div_ceil(sh),
        (geo.w + pl + pr).div_ceil(sw),
    );
    let phase_len = hq * wq;
    // The last wide pixel's last tap reads up to (kw - 1) * dw / sw floats past its phase image
    // (into the next one, or this slack after the last).
    let plane = sh * sw * phase_len + ((kw - 1) * dw) / sw + 1;
    let mut padded = vec![0f32; geo.n * geo.cin * plane];
    padded
        .par_chunks_mut(plane)
        .zip(x.par_chunks(geo.h * geo.w))
        .for_each(|(dst, src)| {
            for (y, row) in src.chunks_exact(geo.w).enumerate() {
                let r = y + pt;
                let (py, q) = (r % sh, r / sh);
                for px in 0..sw {
                    // Phase column c holds input column c*sw + px - pl.
                    let (lo, hi) = valid_range(px as isize - pl as isize, sw, geo.w, wq);
                    if hi > lo {
                        let d = &mut dst[(py * sw + px) * phase_len + q * wq..][lo..hi];
                        let first = lo * sw + px - pl;
                        d.iter_mut()
                            .zip(row[first..].iter().step_by(sw))
                            .for_each(|(d, v)| *d = *v);
                    }
                }
            }
        });
    let wp = wq;

    let hw = geo.ho * geo.wo;
    let wide = geo.ho * wp;
    // No im2col tile here: the cache budget bounds the output tile instead.
    let tn = tile_size(geo, wide, cout_g);
    let tiles = wide.div_ceil(tn);
    let tasks = geo.n * groups * tiles;
    let len = geo.n * geo.cout * hw;
    let mut out = Vec::<f32>::with_capacity(len);
    let out_ptr = SyncPtr(out.as_mut_ptr());

    (0..tasks).into_par_iter().for_each(|t| {
        let img = t / (groups * tiles);
        let g = (t / tiles) % groups;
        let p0 = (t % tiles) * tn;
        let p1 = (p0 + tn).min(wide);
        let n = p1 - p0;
        let x_g = &padded[(img * geo.cin + g * cin_g) * plane..][..cin_g * plane];
        SCRATCH.with(|cell| {
            let mut acc = cell.borrow_mut();
            if acc.len() < cout_g * n {
                acc.resize(cout_g * n, 0.0);
            }
            for ky in 0..kh {
                for kx in 0..kw {
                    let tap = ky * kw + kx;
                    let (d, e) = (ky * dh, kx * dw);
                    let shift = ((d % sh) * sw + e % sw) * phase_len + (d / sh) * wq + e / sw;
                    debug_assert!(p1 - 1 + shift < plane);
                    let w_tap = &taps[(g * kh * kw + tap) * cout_g * cin_g..][..cout_g * cin_g];
                    // SAFETY: lhs is tap (ky, kx)'s (cout_g x cin_g) row-major matrix; rhs
                    // columns p0 + shift .. p1 + shift of each padded plane lie inside it
                    // (checked above); acc holds cout_g x n.
                    crate::fastmath::count_gemm(cout_g, n, cin_g);
                    unsafe {
                        gemm19::gemm(
                            cout_g,
                            n,
                            cin_g,
                            acc.as_mut_ptr(),
                            1,
                            n as isize,
                            tap > 0,
                            w_tap.as_ptr(),
                            1,
                            cin_g as isize,
                            x_g.as_ptr().add(p0 + shift),
                            1,
                            plane as isize,
                            1.0f32,
                            1.0f32,
                            false,
                            false,
                            false,
                            gemm19::Parallelism::None,
                        )
                    };
                }
            }
            // Compact the valid columns of each wide row segment into the output.
            for co in 0..cout_g {
                let c = g * cout_g + co;
                let b = bias.map_or(0.0, |b| b[c]);
                let acc_row = &acc[co * n..(co + 1) * n];
                let mut p = p0;
                while p < p1 {
                    let (oy, ox0) = (p / wp, p % wp);
                    let ox1 = wp.min(ox0 + (p1 - p));
                    let valid = ox1.min(geo.wo);
                    if ox0 < valid {
                        let off = (img * geo.cout + c) * hw + oy * geo.wo + ox0;
                        // SAFETY: output pixels (oy, ox0..valid) of channel c belong to this task
                        // (its wide pixel range), and are initialised by this copy.
                        let dst = unsafe {
                            let ptr = out_ptr.get().add(off);
                            std::ptr::copy_nonoverlapping(
                                acc_row.as_ptr().add(p - p0),
                                ptr,
                                valid - ox0,
                            );
                            std::slice::from_raw_parts_mut(ptr, valid - ox0)
                        };
                        epilogue(dst, b, residual.map(|r| &r[off..off + valid - ox0]), act);
                    }
                    p += ox1 - ox0;
                }
            }
        });
    });
    // SAFETY: every valid output pixel lies in exactly one task's wide pixel range.
    unsafe { out.set_len(len) };
    out
}

/// Weights (groups * Cout_g, Cin_g, taps) reordered to (groups, taps, Cout_g, Cin_g), so each
/// tap's matrix is contiguous for the shifted-gemm path (a strided weight view made every gemm
/// call gather its weights).
pub(crate) fn tap_major(
    w: &[f32],
    groups: usize,
    cout_g: usize,
    cin_g: usize,
    taps: usize,
) -> Vec<f32> {
    assert_eq!(w.len(), groups * cout_g * cin_g * taps, "tap_major: weight size");
    let mut out = vec![0f32; w.len()];
    if cin_g == 0 {
        return out;
    }
    // Output rows (g, t, co) written contiguously, in parallel: the functional 3×3 convs (the
    // POS's, whose weights are not pre-packed) reorder their weights on every call, and the
    // scattered single-threaded writes took a few ms for a 256 → 256 kernel.
    out.par_chunks_mut(cin_g).enumerate().with_min_len(64).for_each(|(r, row)| {
        let (g, t, co) = (r / (taps * cout_g), (r / cout_g) % taps, r % cout_g);
        let src = &w[(g * cout_g + co) * cin_g * taps + t..];
        for (ci, o) in row.iter_mut().enumerate() {
            *o = src[ci * taps];
        }
    });
    out
}

#[cfg(test)]
mod tests {
    /// Every weight lands at (group, tap, out channel, in channel), groups and all.
    #[test]
    fn tap_major_reorders_every_weight() {
        let (groups, cout_g, cin_g, taps) = (3, 5, 70, 9);
        let w: Vec<f32> = (0..groups * cout_g * cin_g * taps).map(|i| i as f32).collect();
        let out = super::tap_major(&w, groups, cout_g, cin_g, taps);
        for g in 0..groups {
            for co in 0..cout_g {
                for ci in 0..cin_g {
                    for t in 0..taps {
                        let want = w[((g * cout_g + co) * cin_g + ci) * taps + t];
                        assert_eq!(out[((g * taps + t) * cout_g + co) * cin_g + ci], want, "g {g} co {co} ci {ci} t {t}");
                    }
                }
            }
        }
    }
}
