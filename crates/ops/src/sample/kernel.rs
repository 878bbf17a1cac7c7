//! CPU kernel of bilinear point sampling (align_corners=False, zero padding) as a candle
//! `CustomOp2`. It reads the maps in their own (B, C, H, W) layout and computes each point's
//! taps once for all channels. Its backward skips the coordinates' gradient when they are not
//! tracked, as in the point losses, whose points are detached: there the deformable-attention
//! core it replaces spent half its backward on that unused gradient.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::deform::kernel::{sample_corners, NO_CORNER};
use crate::fastmath::{layout_slice, Real};
use crate::util::host_vec;

/// Points per parallel task.
const BLOCK: usize = 2048;

/// Row of an unused tap (its corner lies outside the map).
const NONE: u32 = u32::MAX;

/// The bilinear taps of one point: offsets into its (H, W) map, in the order torch adds them,
/// and their weights.
#[derive(Clone, Copy)]
struct Taps<T> {
    rows: [u32; 4],
    w: [T; 4],
}

impl<T: Real> Taps<T> {
    /// Σ w·map[row] over the used taps.
    #[inline]
    fn gather(&self, map: &[T]) -> T {
        let mut s = T::zero();
        for (&r, &w) in self.rows.iter().zip(&self.w) {
            if r != NONE {
                s += w * map[r as usize];
            }
        }
        s
    }

    /// map[row] += w·g over the used taps.
    #[inline]
    fn scatter(&self, g: T, map: &mut [T]) {
        for (&r, &w) in self.rows.iter().zip(&self.w) {
            if r != NONE {
                map[r as usize] += w * g;
            }
        }
    }
}

/// Sampling of `input` (B, C, H, W) at `coords` (B, P, 2), (x, y) in [0, 1] with
/// pixel = coord·size − 0.5 -> (B, C, P).
#[derive(Debug, Clone)]
pub(super) struct PointSample {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub p: usize,
}

impl PointSample {
    /// The taps of the point at `l` = (x, y).
    #[inline]
    fn tap<T: Real>(&self, l: &[T]) -> Taps<T> {
        let c = sample_corners::<T, false>(l[0], l[1], (self.h, self.w, 0));
        Taps { rows: c.rows.map(|r| if r == NO_CORNER { NONE } else { r as u32 }), w: c.w }
    }

    /// The taps of every point, (B·P), for several channels to share.
    fn taps<T: Real>(&self, loc: &[T]) -> Vec<Taps<T>> {
        let mut taps = vec![Taps { rows: [NONE; 4], w: [T::zero(); 4] }; self.b * self.p];
        taps.par_chunks_mut(BLOCK).zip(loc.par_chunks(2 * BLOCK)).for_each(|(taps, loc)| {
            for (t, l) in taps.iter_mut().zip(loc.chunks_exact(2)) {
                *t = self.tap(l);
            }
        });
        taps
    }

    /// out (B, C, P), parallel over (map, block of points). One channel (the point losses'
    /// masks) samples straight from the coordinates; more share a table of taps.
    fn forward<T: Real>(&self, input: &[T], loc: &[T]) -> Vec<T> {
        let (c, hw, p) = (self.c, self.h * self.w, self.p);
        let taps = if c > 1 { self.taps(loc) } else { Vec::new() };
        let mut out = vec![T::zero(); self.b * c * p];
        out.par_chunks_mut(p).enumerate().for_each(|(bc, out)| {
            let (b, map) = (bc / c, &input[bc * hw..(bc + 1) * hw]);
            if c == 1 {
                let loc = &loc[2 * b * p..2 * (b + 1) * p];
                out.par_chunks_mut(BLOCK).zip(loc.par_chunks(2 * BLOCK)).for_each(|(out, loc)| {
                    for (o, l) in out.iter_mut().zip(loc.chunks_exact(2)) {
                        *o = self.tap(l).gather(map);
                    }
                });
            } else {
                let taps = &taps[b * p..(b + 1) * p];
                out.par_chunks_mut(BLOCK).zip(taps.par_chunks(BLOCK)).for_each(|(out, taps)| {
                    for (o, t) in out.iter_mut().zip(taps) {
                        *o = t.gather(map);
                    }
                });
            }
        });
        out
    }

    /// d input (B, C, H, W), scattered per map so tasks never overlap.
    fn grad_input<T: Real>(&self, loc: &[T], grad: &[T]) -> Vec<T> {
        let (c, hw, p) = (self.c, self.h * self.w, self.p);
        let taps = if c > 1 { self.taps(loc) } else { Vec::new() };
        let mut g_in = vec![T::zero(); self.b * c * hw];
        g_in.par_chunks_mut(hw).enumerate().for_each(|(bc, map)| {
            let (b, grad) = (bc / c, &grad[bc * p..(bc + 1) * p]);
            if c == 1 {
                let loc = &loc[2 * b * p..2 * (b + 1) * p];
                for (l, &g) in loc.chunks_exact(2).zip(grad) {
                    self.tap(l).scatter(g, map);
                }
            } else {
                for (t, &g) in taps[b * p..(b + 1) * p].iter().zip(grad) {
                    t.scatter(g, map);
                }
            }
        });
        g_in
    }

    /// d coords (B, P, 2): Σ over channels and taps of grad · input · d weight / d coord.
    fn grad_coords<T: Real>(&self, input: &[T], loc: &[T], grad: &[T]) -> Vec<T> {
        let (c, hw, p) = (self.c, self.h * self.w, self.p);
        let level = (self.h, self.w, 0);
        let mut g_loc = vec![T::zero(); loc.len()];
        g_loc.par_chunks_mut(2 * BLOCK).enumerate().for_each(|(blk, gl)| {
            for (k, gl) in gl.chunks_exact_mut(2).enumerate() {
                let i = blk * BLOCK + k;
                let (b, q) = (i / p, i % p);
                let cs = sample_corners::<T, true>(loc[2 * i], loc[2 * i + 1], level);
                let (mut sx, mut sy) = (T::zero(), T::zero());
                for (row, _, dx, dy) in cs.inside() {
                    let mut vg = T::zero();
                    for ch in b * c..(b + 1) * c {
                        vg += input[ch * hw + row] * grad[ch * p + q];
                    }
                    sx += dx * vg;
                    sy += dy * vg;
                }
                gl[0] = sx;
                gl[1] = sy;
            }
        });
        g_loc
    }
}


impl CustomOp2 for PointSample {
    fn name(&self) -> &'static str {
        "point-sample"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape().dims() != [self.b, self.c, self.h, self.w] || l2.shape().dims() != [self.b, self.p, 2] {
            bail!("point sampling kernel: got input {:?} and coords {:?} for {self:?}", l1.shape(), l2.shape());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(l)) => {
                CpuStorage::F32(self.forward(layout_slice(x, l1, "point sampling kernel: input")?, layout_slice(l, l2, "point sampling kernel: coords")?))
            }
            (CpuStorage::F64(x), CpuStorage::F64(l)) => {
                CpuStorage::F64(self.forward(layout_slice(x, l1, "point sampling kernel: input")?, layout_slice(l, l2, "point sampling kernel: coords")?))
            }
            _ => bail!("point sampling kernel: input and coords must both be f32 or both f64"),
        };
        Ok((out, Shape::from((self.b, self.c, self.p))))
    }

    fn bwd(&self, input: &Tensor, coords: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(op: &PointSample, input: &Tensor, coords: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let dev = input.device();
            let loc = host_vec::<T>(coords)?;
            let grad = host_vec::<T>(grad)?;
            let g_in = match input.track_op() {
                true => Some(Tensor::from_vec(op.grad_input(&loc, &grad), input.shape(), dev)?),
                false => None,
            };
            let g_loc = match coords.track_op() {
                true => {
                    let g = op.grad_coords(&host_vec::<T>(input)?, &loc, &grad);
                    Some(Tensor::from_vec(g, coords.shape(), dev)?)
                }
                false => None,
            };
            Ok((g_in, g_loc))
        }
        match input.dtype() {
            DType::F32 => run::<f32>(self, input, coords, grad),
            DType::F64 => run::<f64>(self, input, coords, grad),
            dt => bail!("point sampling kernel: unsupported dtype {dt:?}"),
        }
    }
}
