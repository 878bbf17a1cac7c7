//! Winograd F(2×2, 3×3) for the ungrouped, stride-1, 'same' 3×3 convolutions on large maps
//! (ResNet-50's layer1–layer3 3×3s, the POS's 3×3 FPN output conv at 1/4 scale).
//!
//! Each 4×4 input patch `d` (stride 2) becomes `V = Bᵀ d B` and each kernel `g` becomes
//! `U = G g Gᵀ`; the 16 elementwise products summed over input channels are 16 gemms
//! `M_ξ = U_ξ (Cout × Cin) · V_ξ (Cin × tiles)`, and `Y = Aᵀ M A` gives the 2×2 outputs of each
//! patch: 16 · Cin · Cout multiply-adds per 4 outputs instead of 36, 2.25× fewer. The rounding
//! differs from the direct sum by a few ulp of the result (the transforms add and halve only).

use std::cell::RefCell;

use rayon::prelude::*;

use super::{Activation, Geometry, SyncPtr};
use crate::fastmath::gemm;

/// Tiles (4 outputs each) per task at most: enough columns that the 16 gemms amortise their
/// packing of the transformed weights (every call packs its `U_ξ`). 256→256 at 120²: 57 ms at
/// 256, 53 at 512 (direct: 88).
const TILES_PER_TASK: usize = 512;
/// Below this many tiles per image (maps under about 32×32) the direct path is faster: each
/// task's gemms are too narrow for what their weight packing costs.
const MIN_TILES: usize = 200;
/// Below this the transforms outweigh the saved multiply-adds. Measured on 2 threads, direct →
/// Winograd: 64→64 at 120² 6.1 → 5.3 ms, at 64² 1.8 → 1.5 ms; 128→128 at 60² 6.0 → 4.0 ms;
/// 256→256 at 30² 6.0 → 3.1 ms (`CONV_BENCH_LAYERS=1 cargo bench -p ops --bench conv`).
pub(crate) const MIN_CHANNELS: usize = 64;

/// Floats between consecutive matrices of the scratch (one cache line).
const SKEW: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`conv_winograd`] computes this convolution.
pub(crate) fn eligible(geo: &Geometry) -> bool {
    let spec = &geo.spec;
    geo.kh == 3
        && geo.kw == 3
        && spec.stride == (1, 1)
        && spec.dilation == (1, 1)
        && spec.groups == 1
        && spec.padding == [1; 4]
        && geo.cin >= MIN_CHANNELS
        && geo.cout >= MIN_CHANNELS
        && geo.h.div_ceil(2) * geo.w.div_ceil(2) >= MIN_TILES
}

/// `U` (16, Cout, Cin): `G g Gᵀ` of each (Cout, Cin, 3, 3) kernel, G = [[1, 0, 0], [½, ½, ½],
/// [½, −½, ½], [0, 0, 1]].
pub(crate) fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let plane = cout * cin;
    let mut u = vec![0f32; 16 * plane];
    for (k, g) in w.chunks_exact(9).enumerate() {
        // t = G g (4 × 3), then each row r of t gives U row r = G r.
        let col = |j: usize| {
            let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
            [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
        };
        let t = [col(0), col(1), col(2)]; // t[j][i] = (G g)[i][j]
        for i in 0..4 {
            let (a, b, c) = (t[0][i], t[1][i], t[2][i]);
            let row = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
            for (j, v) in row.into_iter().enumerate() {
                u[(i * 4 + j) * plane + k] = v;
            }
        }
    }
    u
}

/// `Bᵀ d B` of a 4×4 patch, Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
#[inline(always)]
fn transform_input(d: &[[f32; 4]; 4]) -> [f32; 16] {
    let mut s = [[0f32; 4]; 4];
    for j in 0..4 {
        s[0][j] = d[0][j] - d[2][j];
        s[1][j] = d[1][j] + d[2][j];
        s[2][j] = d[2][j] - d[1][j];
        s[3][j] = d[1][j] - d[3][j];
    }
    let mut v = [0f32; 16];
    for i in 0..4 {
        v[i * 4] = s[i][0] - s[i][2];
        v[i * 4 + 1] = s[i][1] + s[i][2];
        v[i * 4 + 2] = s[i][2] - s[i][1];
        v[i * 4 + 3] = s[i][1] - s[i][3];
    }
    v
}

/// `Aᵀ m A` of the 16 products, Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]: the 2×2 outputs.
#[inline(always)]
fn transform_output(m: &[f32; 16]) -> [[f32; 2]; 2] {
    let mut r = [[0f32; 4]; 2];
    for j in 0..4 {
        r[0][j] = m[j] + m[4 + j] + m[8 + j];
        r[1][j] = m[4 + j] - m[8 + j] - m[12 + j];
    }
    let mut y = [[0f32; 2]; 2];
    for i in 0..2 {
        y[i][0] = r[i][0] + r[i][1] + r[i][2];
        y[i][1] = r[i][1] - r[i][2] - r[i][3];
    }
    y
}

#[inline(always)]
fn activate(v: f32, act: Activation) -> f32 {
    match act {
        Activation::None => v,
        Activation::Relu => v.max(0.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
    }
}

/// out = act(conv(x) + bias + residual) for an [`eligible`] geometry, `u` from
/// [`transform_weights`]. Parallel over (image, block of tiles).
pub(crate) fn conv_winograd(
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    geo: &Geometry,
    act: Activation,
) -> Vec<f32> {
    let (n, cin, cout, h, w) = (geo.n, geo.cin, geo.cout, geo.h, geo.w);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tiles = th * tw;
    let threads = rayon::current_num_threads().max(1);
    // Equal blocks, at least two tasks a thread where the map allows.
    let blocks = tiles.div_ceil(TILES_PER_TASK).max((2 * threads).div_ceil(n)).min(tiles);
    let blk = tiles.div_ceil(blocks);
    let blocks = tiles.div_ceil(blk);
    let len = n * cout * h * w;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let outp = SyncPtr(out.as_mut_ptr());
    (0..n * blocks).into_par_iter().for_each(|task| {
        let (img, b) = (task / blocks, task % blocks);
        let (t0, t1) = (b * blk, ((b + 1) * blk).min(tiles));
        let nt = t1 - t0;
        // The 16 matrices of V (and of M) lie a padded stride apart: at a power-of-two stride
        // the 16 accesses of one tile would all map to the same cache set.
        let (vs, ms) = (cin * nt + SKEW, cout * nt + SKEW);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let need = 16 * (vs + ms);
            if s.len() < need {
                s.resize(need, 0.0);
            }
            let (v, m) = s[..need].split_at_mut(16 * vs);
            // Input transform: V[ξ][ci][k] for the block's tiles k.
            let xi = &x[img * cin * h * w..][..cin * h * w];
            for (ci, plane) in xi.chunks_exact(h * w).enumerate() {
                for (k, t) in (t0..t1).enumerate() {
                    let (y0, x0) = (2 * (t / tw) as isize - 1, 2 * (t % tw) as isize - 1);
                    let mut d = [[0f32; 4]; 4];
                    let inside = y0 >= 0 && x0 >= 0 && y0 + 4 <= h as isize && x0 + 4 <= w as isize;
                    if inside {
                        let base = y0 as usize * w + x0 as usize;
                        for (i, row) in d.iter_mut().enumerate() {
                            row.copy_from_slice(&plane[base + i * w..][..4]);
                        }
                    } else {
                        for (i, row) in d.iter_mut().enumerate() {
                            let yy = y0 + i as isize;
                            if yy < 0 || yy >= h as isize {
                                continue;
                            }
                            for (j, e) in row.iter_mut().enumerate() {
                                let xx = x0 + j as isize;
                                if xx >= 0 && xx < w as isize {
                                    *e = plane[yy as usize * w + xx as usize];
                                }
                            }
                        }
                    }
                    let vt = transform_input(&d);
                    for (xi_, &val) in vt.iter().enumerate() {
                        v[xi_ * vs + ci * nt + k] = val;
                    }
                }
            }
            // The 16 products summed over input channels.
            for xi_ in 0..16 {
                // SAFETY: U_ξ is Cout×Cin, V_ξ Cin×nt, M_ξ Cout×nt, all row-major in bounds;
                // m is this thread's scratch.
                unsafe {
                    gemm(
                        cout,
                        nt,
                        cin,
                        m[xi_ * ms..].as_mut_ptr(),
                        nt,
                        false,
                        u[xi_ * cout * cin..].as_ptr(),
                        cin,
                        1,
                        v[xi_ * vs..].as_ptr(),
                        nt,
                        1,
                        1.0f32,
                    );
                }
            }
            // Output transform and epilogue, straight into the output planes.
            let o = outp.get();
            for co in 0..cout {
                let bi = bias.map_or(0.0, |b| b[co]);
                let plane = (img * cout + co) * h * w;
                for (k, t) in (t0..t1).enumerate() {
                    let mut mt = [0f32; 16];
                    for (xi_, e) in mt.iter_mut().enumerate() {
                        *e = m[xi_ * ms + co * nt + k];
                    }
                    let y = transform_output(&mt);
                    let (oy, ox) = (2 * (t / tw), 2 * (t % tw));
                    for (i, row) in y.iter().enumerate() {
                        if oy + i >= h {
                            break;
                        }
                        for (j, &val) in row.iter().enumerate() {
                            if ox + j >= w {
                                break;
                            }
                            let at = plane + (oy + i) * w + ox + j;
                            let r = residual.map_or(0.0, |r| r[at]);
                            // SAFETY: each output pixel belongs to exactly one tile, and each
                            // tile to one task.
                            unsafe { *o.add(at) = activate(val + bi + r, act) };
                        }
                    }
                }
            }
        });
    });
    // SAFETY: the tiles cover every output pixel of every image and channel.
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::{gemm_path, ConvSpec};

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) as f32 / u32::MAX as f32) * 2.0 - 1.0).collect()
    }

    /// Winograd against the direct sum of the gemm path, on odd map sizes (partial tiles on the
    /// bottom and right), several blocks of tiles, batch 2, bias, residual and each activation.
    #[test]
    fn winograd_equals_the_direct_convolution() {
        for &(n, cin, cout, h, w) in &[(2usize, 128usize, 144usize, 29usize, 31usize), (1, 160, 128, 40, 37), (1, 64, 64, 33, 34)] {
            let spec = ConvSpec::same_as_torch(1, 1);
            let geo = Geometry { n, cin, h, w, cout, kh: 3, kw: 3, ho: h, wo: w, spec };
            assert!(eligible(&geo), "{geo:?}");
            let x = pseudo(n * cin * h * w, 1);
            let wt: Vec<f32> = pseudo(cout * cin * 9, 2).iter().map(|v| v * 0.2).collect();
            let bias = pseudo(cout, 3);
            let res = pseudo(n * cout * h * w, 4);
            let u = transform_weights(&wt, cout, cin);
            for act in [Activation::None, Activation::Relu, Activation::Relu6] {
                for residual in [None, Some(&res[..])] {
                    let got = conv_winograd(&x, &u, Some(&bias), residual, &geo, act);
                    let want = gemm_path::conv_gemm(&x, &wt, None, Some(&bias), residual, &geo, act);
                    assert_eq!(got.len(), want.len());
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{geo:?} {act:?} {i}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn small_maps_and_other_shapes_are_not_eligible() {
        let spec = ConvSpec::same_as_torch(1, 1);
        let geo = Geometry { n: 1, cin: 128, h: 15, w: 15, cout: 128, kh: 3, kw: 3, ho: 15, wo: 15, spec };
        assert!(!eligible(&geo), "a 15×15 map is left to the direct path");
        let big = Geometry { h: 60, w: 60, ho: 60, wo: 60, ..geo };
        assert!(eligible(&big));
        assert!(!eligible(&Geometry { spec: ConvSpec::same_as_torch(2, 1), ho: 30, wo: 30, ..big }));
        assert!(!eligible(&Geometry { spec: spec.with_groups(2), ..big }));
        assert!(!eligible(&Geometry { cin: 32, ..big }), "32 channels stay direct");
    }
}
