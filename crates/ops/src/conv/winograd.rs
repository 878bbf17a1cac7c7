//! Winograd F(4×4, 3×3) (default) and F(2×2, 3×3) for the ungrouped, stride-1, 'same' 3×3
//! convolutions on large maps (ResNet-50's layer1–layer3 3×3s, the POS's 3×3 FPN output conv at
//! 1/4 scale).
//!
//! Each R×R input patch `d` (R = M + 2, stride M) becomes `V = Bᵀ d B` and each kernel `g`
//! becomes `U = G g Gᵀ`; the R² elementwise products summed over input channels are R² gemms
//! `M_ξ = U_ξ (Cout × Cin) · V_ξ (Cin × tiles)`, and `Y = Aᵀ M A` gives the M×M outputs of each
//! patch. F(2×2): 16 multiply-adds per 4 outputs instead of 36 (2.25× fewer), rounding within a
//! few ulp of the direct sum (the transforms add and halve only). F(4×4): 36 per 16 instead of
//! 144 (4× fewer); its transforms scale by up to 8, so it rounds about ten times worse (1e-4 of
//! the output scale), still far inside the parity tolerance (ResNet-50 res5 against the
//! reference: 9.8e-5 of max|ref|, direct 6.3e-5, tolerance 3e-3).

use std::cell::RefCell;

use rayon::prelude::*;

use super::{Activation, Geometry, SyncPtr};
use crate::fastmath::gemm;

/// Tiles per task at most: enough columns that the gemms amortise their packing of the
/// transformed weights (every call packs its `U_ξ`). F(2×2), 256→256 at 120²: 57 ms at 256, 53
/// at 512 (direct: 88).
const TILES_PER_TASK: usize = 512;
/// Below this many F(2×2) tiles per image (maps under about 32×32) the direct path is faster:
/// each task's gemms are too narrow for what their weight packing costs.
const MIN_TILES: usize = 200;
/// Below this the transforms outweigh the saved multiply-adds. Measured on 2 threads, direct →
/// F(2×2): 64→64 at 120² 6.1 → 5.3 ms, at 64² 1.8 → 1.5 ms; 128→128 at 60² 6.0 → 4.0 ms;
/// 256→256 at 30² 6.0 → 3.1 ms (`CONV_BENCH_LAYERS=1 cargo bench -p ops --bench conv`); F(2×2) →
/// F(4×4) in one sitting: 64→64 at 120² 5.4 → 4.8, at 64² 1.5 → 1.2; 128→128 at 60² 4.0 → 3.0;
/// 256→256 at 30² 3.3 → 2.55, at 120² 52 → 41.
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

/// One Winograd variant F(M×M, 3×3): `R = M + 2` input tiles of `N = R²` points, read at
/// stride M. Its buffers are fixed-size arrays of exactly its sizes, so the transforms compile
/// to straight-line code.
pub(crate) trait Tile {
    /// Output tile side.
    const M: usize;
    /// Input tile side, `M + 2`.
    const R: usize = Self::M + 2;
    /// Points of a transformed tile, `R²`: the number of gemms.
    const N: usize = Self::R * Self::R;
    /// An R×R input patch.
    type Patch: Copy + AsMut<[Self::Row]> + AsRef<[Self::Row]>;
    /// One patch row, R values.
    type Row: Copy + AsMut<[f32]>;
    /// N transformed values (a tile's point of every matrix).
    type Points: Copy + AsMut<[f32]> + AsRef<[f32]>;
    /// The M×M outputs of a tile.
    type Outs: AsRef<[Self::OutRow]>;
    /// One output row, M values.
    type OutRow: AsRef<[f32]>;
    const ZERO_PATCH: Self::Patch;
    const ZERO_POINTS: Self::Points;
    /// `G g Gᵀ` of one 3×3 kernel `g` (row-major).
    fn kernel(g: &[f32]) -> Self::Points;
    /// `Bᵀ d B` of one patch.
    fn input(d: &Self::Patch) -> Self::Points;
    /// `Aᵀ m A` of the N products.
    fn output(m: &Self::Points) -> Self::Outs;
}

/// F(2×2, 3×3): G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]],
/// Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]], Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
/// 16 multiply-adds per 4 outputs (direct: 36).
pub(crate) struct F2;

/// F(4×4, 3×3) at the points 0, ±1, ±2 (Lavin & Gray): G = [[¼, 0, 0], [−⅙, −⅙, −⅙],
/// [−⅙, ⅙, −⅙], [1⁄24, 1⁄12, ⅙], [1⁄24, −1⁄12, ⅙], [0, 0, 1]],
/// Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0], [0, −2, −1, 2, 1, 0],
/// [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]],
/// Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0], [0, 1, −1, 8, −8, 1]].
/// 36 multiply-adds per 16 outputs (direct: 144); its transforms scale by up to 8, so its
/// rounding error is a few times F(2×2)'s.
pub(crate) struct F4;

impl Tile for F2 {
    const M: usize = 2;
    type Patch = [[f32; 4]; 4];
    type Row = [f32; 4];
    type Points = [f32; 16];
    type Outs = [[f32; 2]; 2];
    type OutRow = [f32; 2];
    const ZERO_PATCH: Self::Patch = [[0.0; 4]; 4];
    const ZERO_POINTS: Self::Points = [0.0; 16];
    fn kernel(g: &[f32]) -> [f32; 16] {
        // t = G g (4 × 3), then each row r of t gives U row r = G r.
        let col = |j: usize| {
            let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
            [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
        };
        let t = [col(0), col(1), col(2)]; // t[j][i] = (G g)[i][j]
        let mut u = [0f32; 16];
        for i in 0..4 {
            let (a, b, c) = (t[0][i], t[1][i], t[2][i]);
            u[i * 4..i * 4 + 4].copy_from_slice(&[a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]);
        }
        u
    }
    #[inline(always)]
    fn input(d: &[[f32; 4]; 4]) -> [f32; 16] {
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
    #[inline(always)]
    fn output(m: &[f32; 16]) -> [[f32; 2]; 2] {
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
}

impl Tile for F4 {
    const M: usize = 4;
    type Patch = [[f32; 6]; 6];
    type Row = [f32; 6];
    type Points = [f32; 36];
    type Outs = [[f32; 4]; 4];
    type OutRow = [f32; 4];
    const ZERO_PATCH: Self::Patch = [[0.0; 6]; 6];
    const ZERO_POINTS: Self::Points = [0.0; 36];
    fn kernel(g: &[f32]) -> [f32; 36] {
        let gcol = |a: f32, b: f32, c: f32| {
            [a / 4.0, -(a + b + c) / 6.0, -(a - b + c) / 6.0, a / 24.0 + b / 12.0 + c / 6.0, a / 24.0 - b / 12.0 + c / 6.0, c]
        };
        let t = [gcol(g[0], g[3], g[6]), gcol(g[1], g[4], g[7]), gcol(g[2], g[5], g[8])]; // t[j][i] = (G g)[i][j]
        let mut u = [0f32; 36];
        for i in 0..6 {
            u[i * 6..i * 6 + 6].copy_from_slice(&gcol(t[0][i], t[1][i], t[2][i]));
        }
        u
    }
    #[inline(always)]
    fn input(d: &[[f32; 6]; 6]) -> [f32; 36] {
        // s = Bᵀ d (rows combined), then v = s B (columns combined the same way).
        let mut s = [[0f32; 6]; 6];
        for j in 0..6 {
            let (d0, d1, d2, d3, d4, d5) = (d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]);
            s[0][j] = 4.0 * d0 - 5.0 * d2 + d4;
            s[1][j] = -4.0 * (d1 + d2) + d3 + d4;
            s[2][j] = 4.0 * (d1 - d2) - d3 + d4;
            s[3][j] = 2.0 * (d3 - d1) - d2 + d4;
            s[4][j] = 2.0 * (d1 - d3) - d2 + d4;
            s[5][j] = 4.0 * d1 - 5.0 * d3 + d5;
        }
        let mut v = [0f32; 36];
        for i in 0..6 {
            let [d0, d1, d2, d3, d4, d5] = s[i];
            v[i * 6] = 4.0 * d0 - 5.0 * d2 + d4;
            v[i * 6 + 1] = -4.0 * (d1 + d2) + d3 + d4;
            v[i * 6 + 2] = 4.0 * (d1 - d2) - d3 + d4;
            v[i * 6 + 3] = 2.0 * (d3 - d1) - d2 + d4;
            v[i * 6 + 4] = 2.0 * (d1 - d3) - d2 + d4;
            v[i * 6 + 5] = 4.0 * d1 - 5.0 * d3 + d5;
        }
        v
    }
    #[inline(always)]
    fn output(m: &[f32; 36]) -> [[f32; 4]; 4] {
        // r = Aᵀ m (4 × 6), then y = r A.
        let mut r = [[0f32; 6]; 4];
        for j in 0..6 {
            let (m0, m1, m2, m3, m4, m5) = (m[j], m[6 + j], m[12 + j], m[18 + j], m[24 + j], m[30 + j]);
            let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
            r[0][j] = m0 + s12 + s34;
            r[1][j] = d12 + 2.0 * d34;
            r[2][j] = s12 + 4.0 * s34;
            r[3][j] = d12 + 8.0 * d34 + m5;
        }
        let mut y = [[0f32; 4]; 4];
        for i in 0..4 {
            let [m0, m1, m2, m3, m4, m5] = r[i];
            let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
            y[i] = [m0 + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m5];
        }
        y
    }
}

/// `U` (N, Cout, Cin): the variant's kernel transform of each (Cout, Cin, 3, 3) kernel.
///
/// Parallel over blocks of kernels, each transformed into a small kernel-major table and then
/// written out as N contiguous runs: the functional convolutions (the POS's 3×3 convs at
/// inference) transform their weights on every call, and one kernel at a time into N matrices
/// (N scattered writes per kernel, single-threaded) took about 10 ms of a paper POS forward for
/// the 256→256 FPN conv under F(4×4).
pub(crate) fn transform_weights<W: Tile>(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    const BLOCK: usize = 256;
    let plane = cout * cin;
    // The writes below are unchecked: exactly one 3×3 kernel per (cout, cin) pair.
    assert_eq!(w.len(), 9 * plane, "Winograd weights: {} values for {cout}×{cin} 3×3 kernels", w.len());
    let mut u = vec![0f32; W::N * plane];
    let out = SyncPtr(u.as_mut_ptr());
    w.par_chunks(9 * BLOCK).enumerate().for_each(|(blk, ws)| {
        let k0 = blk * BLOCK;
        let table: Vec<W::Points> = ws.chunks_exact(9).map(W::kernel).collect();
        let o = out.get();
        for xi in 0..W::N {
            for (j, t) in table.iter().enumerate() {
                // SAFETY: blocks cover disjoint kernel ranges k0..k0 + len of every matrix xi,
                // and xi·plane + k < N·plane.
                unsafe { *o.add(xi * plane + k0 + j) = t.as_ref()[xi] };
            }
        }
    });
    u
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
pub(crate) fn conv_winograd<W: Tile>(
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    geo: &Geometry,
    act: Activation,
) -> Vec<f32> {
    let (n, cin, cout, h, w) = (geo.n, geo.cin, geo.cout, geo.h, geo.w);
    let (m_, r_, nx) = (W::M, W::R, W::N);
    let (th, tw) = (h.div_ceil(m_), w.div_ceil(m_));
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
        // The N matrices of V (and of M) lie a padded stride apart: at a power-of-two stride
        // the N accesses of one tile would all map to the same cache set.
        let (vs, ms) = (cin * nt + SKEW, cout * nt + SKEW);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let need = nx * (vs + ms);
            if s.len() < need {
                s.resize(need, 0.0);
            }
            let (v, m) = s[..need].split_at_mut(nx * vs);
            // Input transform: V[ξ][ci][k] for the block's tiles k.
            let xi = &x[img * cin * h * w..][..cin * h * w];
            for (ci, plane) in xi.chunks_exact(h * w).enumerate() {
                for (k, t) in (t0..t1).enumerate() {
                    let (y0, x0) = ((m_ * (t / tw)) as isize - 1, (m_ * (t % tw)) as isize - 1);
                    let mut d = W::ZERO_PATCH;
                    let inside = y0 >= 0 && x0 >= 0 && y0 + r_ as isize <= h as isize && x0 + r_ as isize <= w as isize;
                    if inside {
                        let base = y0 as usize * w + x0 as usize;
                        for (i, row) in d.as_mut().iter_mut().enumerate() {
                            row.as_mut().copy_from_slice(&plane[base + i * w..][..r_]);
                        }
                    } else {
                        for (i, row) in d.as_mut().iter_mut().enumerate() {
                            let yy = y0 + i as isize;
                            if yy < 0 || yy >= h as isize {
                                continue;
                            }
                            for (j, e) in row.as_mut().iter_mut().enumerate() {
                                let xx = x0 + j as isize;
                                if xx >= 0 && xx < w as isize {
                                    *e = plane[yy as usize * w + xx as usize];
                                }
                            }
                        }
                    }
                    let vt = W::input(&d);
                    for (xi_, &val) in vt.as_ref().iter().enumerate() {
                        v[xi_ * vs + ci * nt + k] = val;
                    }
                }
            }
            // The N products summed over input channels.
            for xi_ in 0..nx {
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
                    let mut mt = W::ZERO_POINTS;
                    for (xi_, e) in mt.as_mut().iter_mut().enumerate() {
                        *e = m[xi_ * ms + co * nt + k];
                    }
                    let y = W::output(&mt);
                    let (oy, ox) = (m_ * (t / tw), m_ * (t % tw));
                    for (i, row) in y.as_ref().iter().enumerate() {
                        if oy + i >= h {
                            break;
                        }
                        for (j, &val) in row.as_ref().iter().enumerate() {
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

    /// Both Winograd variants against the direct sum of the gemm path, on odd map sizes (partial tiles on the
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
            let (u2, u4) = (transform_weights::<F2>(&wt, cout, cin), transform_weights::<F4>(&wt, cout, cin));
            for act in [Activation::None, Activation::Relu, Activation::Relu6] {
                for residual in [None, Some(&res[..])] {
                    let want = gemm_path::conv_gemm(&x, &wt, None, Some(&bias), residual, &geo, act);
                    // F(2×2) measured within 8e-6 of the direct sum here, F(4×4) within 1e-4
                    // (outputs of rms 1 to 5): its transforms scale by up to 8.
                    let f2 = conv_winograd::<F2>(&x, &u2, Some(&bias), residual, &geo, act);
                    let f4 = conv_winograd::<F4>(&x, &u4, Some(&bias), residual, &geo, act);
                    for (variant, got, tol) in [("F2", f2, 1e-5), ("F4", f4, 2e-4)] {
                        assert_eq!(got.len(), want.len());
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{variant} {geo:?} {act:?} {i}: {a} vs {b}");
                        }
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
