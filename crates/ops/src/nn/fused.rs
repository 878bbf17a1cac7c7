//! Fused CPU softmax (last dimension), layer norm and linear layer as candle custom ops with
//! analytic backwards: one pass instead of 2-6 candle ops (each allocating a tensor and, in the
//! backward, several more).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fastmath::{dot, gemm, guard_slice, init_copy, init_fill, softmax_row, softmax_short_rows, storage_slice, sum, sum_partials, unwritten, written, Real, LANES};
use crate::util::SyncPtr;

/// Elements per parallel task: below this a row loop runs inline (rayon would cost more).
const TASK_ELEMS: usize = 16 * 1024;

fn rows_per_task(d: usize) -> usize {
    (TASK_ELEMS / d.max(1)).max(1)
}

/// Softmax over the last dimension (size `d`) of a contiguous tensor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftmaxLast {
    pub d: usize,
}

impl SoftmaxLast {
    fn forward<T: Real>(&self, x: &[T]) -> Vec<T> {
        let mut y = x.to_vec();
        if self.d == 0 {
            return y;
        }
        let d = self.d;
        y.par_chunks_mut(rows_per_task(d) * d).for_each(|c| {
            if d < LANES {
                softmax_short_rows(c, d);
            } else {
                c.chunks_exact_mut(d).for_each(softmax_row);
            }
        });
        y
    }

    /// dx = y ⊙ (dy − rowsum(dy ⊙ y)).
    fn backward<T: Real>(&self, y: &[T], dy: &[T]) -> Vec<T> {
        let d = self.d;
        let mut dx = vec![T::of(0.0); y.len()];
        if d == 0 {
            return dx;
        }
        let rt = rows_per_task(d) * d;
        dx.par_chunks_mut(rt)
            .zip(y.par_chunks(rt).zip(dy.par_chunks(rt)))
            .for_each(|(dxc, (yc, gc))| {
                for ((dxr, yr), gr) in dxc
                    .chunks_exact_mut(d)
                    .zip(yc.chunks_exact(d))
                    .zip(gc.chunks_exact(d))
                {
                    let s = dot(yr, gr);
                    for ((o, &yv), &g) in dxr.iter_mut().zip(yr).zip(gr) {
                        *o = yv * (g - s);
                    }
                }
            });
        dx
    }
}

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => {
                f32::into_storage(self.forward(storage_slice::<f32>(s, l, "softmax")?))
            }
            CpuStorage::F64(_) => {
                f64::into_storage(self.forward(storage_slice::<f64>(s, l, "softmax")?))
            }
            _ => bail!("fused softmax: only f32 and f64 are supported"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Real>(op: &SoftmaxLast, res: &Tensor, grad: &Tensor) -> Result<Tensor> {
            let res = res.contiguous()?;
            let grad = grad.contiguous()?;
            let (gy, gg) = (res.storage_and_layout(), grad.storage_and_layout());
            let dx = op.backward(
                guard_slice::<T>(&gy, "softmax output")?,
                guard_slice::<T>(&gg, "softmax grad")?,
            );
            drop((gy, gg));
            Tensor::from_vec(dx, res.shape(), res.device())
        }
        Ok(Some(match res.dtype() {
            DType::F32 => run::<f32>(self, res, grad)?,
            DType::F64 => run::<f64>(self, res, grad)?,
            dt => bail!("fused softmax: unsupported dtype {dt:?}"),
        }))
    }
}

/// Layer norm over the last dimension (size `d`) with affine weight and bias, population
/// variance (like torch): `y = (x − mean) / sqrt(var + eps) · w + b`.
///
/// With `residual`, it is `LN(x + r)`, the sum and norm of a post-norm transformer block in one
/// op: inputs `(x, r, [weight | bias])` instead of `(x, weight, bias)`. The sum is never stored
/// (the backward adds the rows again), so the graph has one node where it had an add and a
/// norm, and neither the sum nor its gradient is materialised.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerNormLast {
    pub d: usize,
    pub eps: f64,
    pub residual: bool,
}

impl LayerNormLast {
    /// (mean, 1/sqrt(var + eps)) of one row, two-pass like the composed version.
    #[inline]
    fn stats<T: Real>(&self, row: &[T]) -> (T, T) {
        let n = T::of(self.d as f64);
        let mean = sum(row) / n;
        let zero = T::of(0.0);
        let mut acc = [zero; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for l in 0..16 {
                let t = c[l] - mean;
                acc[l] += t * t;
            }
        }
        let mut ss = zero;
        for &x in chunks.remainder() {
            ss += (x - mean) * (x - mean);
        }
        let ss = acc.iter().fold(ss, |s, &x| s + x);
        let var = ss / n;
        (
            mean,
            T::of(1.0) / (var + T::of(self.eps)).sqrt_of(),
        )
    }

    /// `r`: the residual of `LN(x + r)`, if any.
    fn forward<T: Real>(&self, x: &[T], r: Option<&[T]>, w: &[T], b: &[T]) -> Vec<T> {
        let d = self.d;
        if d == 0 {
            return vec![T::of(0.0); x.len()];
        }
        // Every row is written below (x.len() is a multiple of d), so no zero fill first.
        let mut y = unwritten::<T>(x.len());
        let rt = rows_per_task(d) * d;
        y.par_chunks_mut(rt).zip(x.par_chunks(rt)).enumerate().for_each(|(t, (yc, xc))| {
            for (i, (yr, xr)) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)).enumerate() {
                match r {
                    Some(r) => {
                        // The row to normalise, x + r, built in the output row.
                        let rr = &r[t * rt + i * d..][..d];
                        for ((o, &a), &c) in yr.iter_mut().zip(xr).zip(rr) {
                            o.write(a + c);
                        }
                        // SAFETY: every element of the row was written just above.
                        let yr = unsafe { &mut *(yr as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
                        let (mean, rstd) = self.stats(yr);
                        for ((o, &wv), &bv) in yr.iter_mut().zip(w).zip(b) {
                            *o = (*o - mean) * rstd * wv + bv;
                        }
                    }
                    None => {
                        let (mean, rstd) = self.stats(xr);
                        for (((o, &xv), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                            o.write((xv - mean) * rstd * wv + bv);
                        }
                    }
                }
            }
        });
        // SAFETY: every row was written.
        unsafe { written(y) }
    }

    /// (d input, dw, db), the input being x or x + r.
    fn backward<T: Real>(&self, x: &[T], r: Option<&[T]>, w: &[T], dy: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let d = self.d;
        let zero = T::of(0.0);
        if d == 0 || x.is_empty() {
            return (vec![zero; x.len()], vec![zero; d], vec![zero; d]);
        }
        let rt = rows_per_task(d) * d;
        let n_tasks = x.len().div_ceil(rt);
        // Every row of dx is written below, and each task zeroes its own partial sums.
        let mut dx = unwritten::<T>(x.len());
        // Per task: [dw partial | db partial].
        let mut parts = unwritten::<T>(n_tasks * 2 * d);
        let inv_d = T::of(1.0 / d as f64);
        dx.par_chunks_mut(rt)
            .zip(x.par_chunks(rt).zip(dy.par_chunks(rt)))
            .zip(parts.par_chunks_mut(2 * d))
            .enumerate()
            .for_each(|(t, ((dxc, (xc, gc)), part))| {
                let (pw, pb) = init_fill(part, zero).split_at_mut(d);
                let mut xhat = vec![zero; d];
                let mut g = vec![zero; d];
                for (j, ((dxr, xr), gr)) in dxc
                    .chunks_exact_mut(d)
                    .zip(xc.chunks_exact(d))
                    .zip(gc.chunks_exact(d))
                    .enumerate()
                {
                    match r {
                        Some(r) => {
                            for ((s, &a), &c) in xhat.iter_mut().zip(xr).zip(&r[t * rt + j * d..][..d]) {
                                *s = a + c;
                            }
                        }
                        None => xhat.copy_from_slice(xr),
                    }
                    let (mean, rstd) = self.stats(&xhat);
                    for i in 0..d {
                        xhat[i] = (xhat[i] - mean) * rstd;
                        g[i] = gr[i] * w[i];
                        pw[i] += gr[i] * xhat[i];
                        pb[i] += gr[i];
                    }
                    let mg = sum(&g) * inv_d;
                    let mgx = dot(&g, &xhat) * inv_d;
                    for i in 0..d {
                        dxr[i].write(rstd * (g[i] - mg - xhat[i] * mgx));
                    }
                }
            });
        // SAFETY: every row of dx and every task's partials were written above.
        let (dx, parts) = unsafe { (written(dx), written(parts)) };
        let mut dw = vec![zero; d];
        let mut db = vec![zero; d];
        for part in parts.chunks_exact(2 * d) {
            for i in 0..d {
                dw[i] += part[i];
                db[i] += part[d + i];
            }
        }
        (dx, dw, db)
    }
}

impl CustomOp3 for LayerNormLast {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        fn run<T: Real>(
            op: &LayerNormLast,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<CpuStorage> {
            let d = op.d;
            let x = storage_slice::<T>(s1, l1, "layer norm x")?;
            let (r, w, b) = if op.residual {
                let r = storage_slice::<T>(s2, l2, "layer norm residual")?;
                let wb = storage_slice::<T>(s3, l3, "layer norm weight and bias")?;
                if r.len() != x.len() || wb.len() != 2 * d {
                    bail!("fused layer norm: the residual must match x, weight and bias have {d} elements each");
                }
                (Some(r), &wb[..d], &wb[d..])
            } else {
                (None, storage_slice::<T>(s2, l2, "layer norm weight")?, storage_slice::<T>(s3, l3, "layer norm bias")?)
            };
            if w.len() != d || b.len() != d {
                bail!("fused layer norm: weight/bias must have {d} elements");
            }
            if d > 0 && x.len() % d != 0 {
                bail!("fused layer norm: {} input elements are not rows of {d}", x.len());
            }
            Ok(T::into_storage(op.forward(x, r, w, b)))
        }
        let out = match s1 {
            CpuStorage::F32(_) => run::<f32>(self, s1, l1, s2, l2, s3, l3)?,
            CpuStorage::F64(_) => run::<f64>(self, s1, l1, s2, l2, s3, l3)?,
            _ => bail!("fused layer norm: only f32 and f64 are supported"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        /// (d input, dw, db) from x, the residual (if any), the weight and the output gradient.
        fn run<T: Real>(
            op: &LayerNormLast,
            x: &Tensor,
            r: Option<&Tensor>,
            w: &Tensor,
            grad: &Tensor,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let grad = grad.contiguous()?;
            let (gx, gw, gg) = (x.storage_and_layout(), w.storage_and_layout(), grad.storage_and_layout());
            let gr = r.map(|r| r.storage_and_layout());
            let rs = match &gr {
                Some(g) => Some(guard_slice::<T>(g, "layer norm residual")?),
                None => None,
            };
            let (dx, dw, db) = op.backward(
                guard_slice::<T>(&gx, "layer norm x")?,
                rs,
                &guard_slice::<T>(&gw, "layer norm weight")?[..op.d],
                guard_slice::<T>(&gg, "layer norm grad")?,
            );
            drop((gx, gw, gg, gr));
            let dev = x.device();
            Ok((Tensor::from_vec(dx, x.shape(), dev)?, Tensor::from_vec(dw, op.d, dev)?, Tensor::from_vec(db, op.d, dev)?))
        }
        // Residual: (x, r, [w | b]), otherwise (x, w, b).
        let (r, w) = if self.residual { (Some(a2), a3) } else { (None, a2) };
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => run::<f32>(self, x, r, w, grad)?,
            DType::F64 => run::<f64>(self, x, r, w, grad)?,
            dt => bail!("fused layer norm: unsupported dtype {dt:?}"),
        };
        if self.residual {
            // x and r enter as a sum: the same gradient reaches both.
            Ok((Some(dx.clone()), Some(dx), Some(Tensor::cat(&[&dw, &db], 0)?)))
        } else {
            Ok((Some(dx), Some(dw), Some(db)))
        }
    }
}

/// Below this many rows a large weight (at least [`LARGE_WEIGHT`] elements) is transposed and
/// the forward split over output columns ([`LinearOp::forward_few_rows`]); from it on, the row
/// chunks amortise packing W as it is (4096×128→256 runs at about 205 GFLOP/s on 2 threads, the
/// gemm's peak). Small weights gain nothing from the transposition (100×256→256: 0.13 ms both
/// ways; 225×256→256: 0.20 → 0.22 ms).
const FEW_ROWS: usize = 1024;
const LARGE_WEIGHT: usize = 1 << 19;

/// `v = relu(v + b)` elementwise (NaN becomes 0).
fn bias_relu_in_place<T: Real>(v: &mut [T], b: &[T]) {
    let zero = T::of(0.0);
    for (x, &b) in v.iter_mut().zip(b) {
        let s = *x + b;
        *x = if s > zero { s } else { zero };
    }
}

/// (rows, cols) row-major -> (cols, rows) row-major, over rayon. Each task writes 32 output
/// rows, reading 8 input rows at a time: few enough lines that power-of-two strides (a 2048-wide
/// weight is 8 KiB a row) do not evict one another from L1 (measured on 2048×256 and 256×2048:
/// 0.3 ms single-threaded either way, against 0.7–1.2 ms for square 16/32 tiles).
pub(super) fn transposed<T: Real>(a: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = unwritten::<T>(rows * cols);
    transpose_into(a, rows, cols, &mut t);
    // SAFETY: `transpose_into` writes every element.
    unsafe { written(t) }
}

/// [`transposed`] into `t` (rows·cols elements, every one written; none read, so `t` need not
/// be initialised).
fn transpose_into<T: Real>(a: &[T], rows: usize, cols: usize, t: &mut [std::mem::MaybeUninit<T>]) {
    const COLS: usize = 32;
    const ROWS: usize = 8;
    if t.is_empty() {
        return;
    }
    t.par_chunks_mut(COLS * rows).enumerate().for_each(|(tc, out)| {
        let c0 = tc * COLS;
        let nc = out.len() / rows;
        for r0 in (0..rows).step_by(ROWS) {
            let r1 = (r0 + ROWS).min(rows);
            for (j, orow) in out.chunks_exact_mut(rows).enumerate().take(nc) {
                for r in r0..r1 {
                    orow[r].write(a[r * cols + c0 + j]);
                }
            }
        }
    });
}

/// `y = x Wᵀ + b` for a 2D `x` (N, in), `W` (out, in), `b` (out): rayon over row chunks, each
/// running a single-threaded gemm. The backward does dx, dW and db in one pass over the rows
/// (per-chunk dW/db partial sums) instead of candle's two matmuls on transposed operands plus a
/// broadcast-sum for the bias.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinearOp {
    pub n: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// Apply ReLU to the output (its backward masks the incoming gradient by `y > 0`).
    pub relu: bool,
}

impl LinearOp {
    /// Rows per chunk: a few chunks per thread, at least 32 rows.
    fn chunk_rows(&self, per_thread: usize) -> usize {
        let threads = rayon::current_num_threads().max(1);
        self.n.div_ceil(per_thread * threads).max(32)
    }

    fn forward<T: Real>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let (din, dout) = (self.d_in, self.d_out);
        if self.n * dout == 0 {
            return Vec::new();
        }
        // Every element is written before it is read (the bias, or with a ReLU the products), so no
        // zero fill.
        let mut y = unwritten::<T>(self.n * dout);
        if self.n < FEW_ROWS && din * dout >= LARGE_WEIGHT {
            self.forward_few_rows(x, w, b, y.as_mut_ptr().cast::<T>());
            // SAFETY: forward_few_rows writes every element (its column blocks tile the rows).
            return unsafe { written(y) };
        }
        // One chunk per thread: each chunk's gemm packs W again, which costs more than the
        // balance of smaller chunks buys (e.g. 225×256→256: 0.51 → 0.30 ms on 2 threads).
        let rows = self.chunk_rows(1);
        y.par_chunks_mut(rows * dout)
            .enumerate()
            .for_each(|(c, yc)| {
                let n = yc.len() / dout;
                // With a ReLU the gemm writes the products and one pass then adds the bias and
                // rectifies; without, the rows start as the bias and the gemm adds into them.
                // Either way the output is crossed once besides the gemm (4725×256→1024 + ReLU:
                // one pass fewer than bias, gemm, ReLU).
                if !self.relu {
                    for r in yc.chunks_exact_mut(dout) {
                        init_copy(r, b);
                    }
                }
                // SAFETY: yc is n×dout, the x rows n×din, W dout×din; all in bounds. The gemm
                // reads yc only where its rows were written above (accumulate = !relu).
                unsafe {
                    gemm(
                        n,
                        dout,
                        din,
                        yc.as_mut_ptr().cast::<T>(),
                        dout,
                        !self.relu,
                        x.as_ptr().add(c * rows * din),
                        din,
                        1,
                        w.as_ptr(),
                        1,
                        din,
                        T::of(1.0),
                    );
                }
                // SAFETY: the gemm wrote every element of yc.
                let yc = unsafe { &mut *(yc as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
                if self.relu {
                    for r in yc.chunks_exact_mut(dout) {
                        bias_relu_in_place(r, b);
                    }
                }
            });
        // SAFETY: every chunk wrote all its rows.
        unsafe { written(y) }
    }

    /// The forward for few rows and a large weight, where packing W dominates: `gemm` packs a
    /// row-major (out, in) weight by gathering across its rows, slowly when `in` is long, and the
    /// row-chunked path does so once per chunk. Here W is transposed once, in parallel, to
    /// (in, out) and each task takes a block of output columns for all rows, so every weight is
    /// packed once and from the layout `gemm` reads fastest (measured on 2 threads: 100×2048→256
    /// 1.98 → 0.78 ms, 100×256→2048 0.98 → 0.78 ms; `cargo bench -p ops --bench kernels`).
    /// `y` addresses n×dout elements, which need not be initialised.
    fn forward_few_rows<T: Real>(&self, x: &[T], w: &[T], b: &[T], y: *mut T) {
        let (n, din, dout) = (self.n, self.d_in, self.d_out);
        let wt = transposed(w, dout, din);
        let threads = rayon::current_num_threads().max(1);
        // Column blocks in whole SIMD panels (16 f32 lanes), about two per thread.
        let cols = dout.div_ceil(2 * threads).next_multiple_of(16).min(dout);
        let blocks = dout.div_ceil(cols);
        let out = SyncPtr(y);
        (0..blocks).into_par_iter().for_each(|blk| {
            let (c0, c1) = (blk * cols, ((blk + 1) * cols).min(dout));
            let yp = out.get();
            // SAFETY: tasks write disjoint column ranges c0..c1 of the n×dout output; x is n×din,
            // wt din×dout; all in bounds.
            // The bias as in the row-chunked forward: added while rectifying with a ReLU, else
            // the rows start as it.
            unsafe {
                if !self.relu {
                    for r in 0..n {
                        std::ptr::copy_nonoverlapping(b[c0..c1].as_ptr(), yp.add(r * dout + c0), c1 - c0);
                    }
                }
                gemm(
                    n,
                    c1 - c0,
                    din,
                    yp.add(c0),
                    dout,
                    !self.relu,
                    x.as_ptr(),
                    din,
                    1,
                    wt.as_ptr().add(c0),
                    dout,
                    1,
                    T::of(1.0),
                );
                if self.relu {
                    for r in 0..n {
                        bias_relu_in_place(std::slice::from_raw_parts_mut(yp.add(r * dout + c0), c1 - c0), &b[c0..c1]);
                    }
                }
            }
        });
    }

    /// (dx, dW, db); `y` is the output (used for the ReLU mask).
    fn backward<T: Real>(&self, x: &[T], w: &[T], y: &[T], dy: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (din, dout) = (self.d_in, self.d_out);
        let zero = T::of(0.0);
        if self.n == 0 || din == 0 || dout == 0 {
            return (vec![zero; self.n * din], vec![zero; dout * din], vec![zero; dout]);
        }
        let rows = self.chunk_rows(1);
        let n_chunks = self.n.div_ceil(rows);
        let part = dout * din + dout;
        // dx and each chunk's dW are written by gemms that do not read them (k > 0 here), so
        // neither is zero-filled first; the bias sums are.
        let mut dx = unwritten::<T>(self.n * din);
        let mut parts = unwritten::<T>(n_chunks * part);
        dx.par_chunks_mut(rows * din)
            .zip(parts.par_chunks_mut(part))
            .enumerate()
            .for_each(|(c, (dxc, p))| {
                let n = dxc.len() / din;
                let (pw, pb) = p.split_at_mut(dout * din);
                let pb = init_fill(pb, zero);
                let gy = &dy[c * rows * dout..][..n * dout];
                let masked: Vec<T>;
                let gy = if self.relu {
                    let yc = &y[c * rows * dout..][..n * dout];
                    masked = gy
                        .iter()
                        .zip(yc)
                        .map(|(&g, &v)| if v > zero { g } else { zero })
                        .collect();
                    &masked[..]
                } else {
                    gy
                };
                // SAFETY: every matrix is in bounds of its slice; outputs are task-local.
                unsafe {
                    let one = T::of(1.0);
                    gemm(
                        n,
                        din,
                        dout,
                        dxc.as_mut_ptr().cast::<T>(),
                        din,
                        false,
                        gy.as_ptr(),
                        dout,
                        1,
                        w.as_ptr(),
                        din,
                        1,
                        one,
                    );
                    gemm(
                        dout,
                        din,
                        n,
                        pw.as_mut_ptr().cast::<T>(),
                        din,
                        false,
                        gy.as_ptr(),
                        1,
                        dout,
                        x.as_ptr().add(c * rows * din),
                        din,
                        1,
                        one,
                    );
                }
                for r in gy.chunks_exact(dout) {
                    for (s, &g) in pb.iter_mut().zip(r) {
                        *s += g;
                    }
                }
            });
        // SAFETY: each chunk's gemms wrote its dx rows and dW, and its bias sums were zeroed.
        let (dx, parts) = unsafe { (written(dx), written(parts)) };
        // The chunks' dW summed in chunk order, in parallel over blocks of the weight (a
        // 256 × 1024 dW from 4 chunks is a million additions).
        const BLOCK: usize = 1 << 14;
        let mut dw = unwritten::<T>(dout * din);
        dw.par_chunks_mut(BLOCK).enumerate().for_each(|(k, out)| {
            sum_partials(out, &parts, k * BLOCK, part, n_chunks);
        });
        let mut db = unwritten::<T>(dout);
        sum_partials(&mut db, &parts, dout * din, part, n_chunks);
        // SAFETY: the blocks cover dW; db was written whole.
        (dx, unsafe { written(dw) }, unsafe { written(db) })
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        fn run<T: Real>(
            op: &LinearOp,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<CpuStorage> {
            let x = storage_slice::<T>(s1, l1, "linear x")?;
            let w = storage_slice::<T>(s2, l2, "linear weight")?;
            let b = storage_slice::<T>(s3, l3, "linear bias")?;
            if x.len() != op.n * op.d_in || w.len() != op.d_out * op.d_in || b.len() != op.d_out {
                bail!("fused linear: inconsistent sizes");
            }
            Ok(T::into_storage(op.forward(x, w, b)))
        }
        let out = match s1 {
            CpuStorage::F32(_) => run::<f32>(self, s1, l1, s2, l2, s3, l3)?,
            CpuStorage::F64(_) => run::<f64>(self, s1, l1, s2, l2, s3, l3)?,
            _ => bail!("fused linear: only f32 and f64 are supported"),
        };
        Ok((out, Shape::from((self.n, self.d_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(
            op: &LinearOp,
            x: &Tensor,
            w: &Tensor,
            res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
            let grad = grad.contiguous()?;
            let res = res.contiguous()?;
            let (gx, gw) = (x.storage_and_layout(), w.storage_and_layout());
            let (gy, gg) = (res.storage_and_layout(), grad.storage_and_layout());
            let r = op.backward(
                guard_slice::<T>(&gx, "linear x")?,
                guard_slice::<T>(&gw, "linear weight")?,
                guard_slice::<T>(&gy, "linear output")?,
                guard_slice::<T>(&gg, "linear grad")?,
            );
            drop((gx, gw, gy, gg));
            Ok(r)
        }
        let dev = x.device();
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => {
                let (a, c, d) = run::<f32>(self, x, w, res, grad)?;
                (
                    Tensor::from_vec(a, x.shape(), dev)?,
                    Tensor::from_vec(c, w.shape(), dev)?,
                    Tensor::from_vec(d, b.shape(), dev)?,
                )
            }
            DType::F64 => {
                let (a, c, d) = run::<f64>(self, x, w, res, grad)?;
                (
                    Tensor::from_vec(a, x.shape(), dev)?,
                    Tensor::from_vec(c, w.shape(), dev)?,
                    Tensor::from_vec(d, b.shape(), dev)?,
                )
            }
            dt => bail!("fused linear: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// MM-Former's self-alignment gate `x ⊙ σ(x · softmax_N(mean_C x))` for each of `b` samples of
/// `(C, N)` values, forward only: three passes over `x` (channel mean, the pooling dot products,
/// the scaling), each parallel, instead of candle's strided channel mean, a matrix–vector
/// product and a single-threaded broadcast multiply.
pub(crate) fn spatial_pool_gate<T: Real>(x: &[T], c: usize, n: usize) -> Vec<T> {
    let mut out = vec![T::of(0.0); x.len()];
    if c == 0 || n == 0 {
        return out;
    }
    let inv_c = T::of(1.0 / c as f64);
    for (xs, os) in x.chunks_exact(c * n).zip(out.chunks_exact_mut(c * n)) {
        // Channel mean at each position, summed over channels in order (as candle's mean).
        let mut a = vec![T::of(0.0); n];
        let chunk = n.div_ceil(2 * rayon::current_num_threads().max(1)).max(64);
        a.par_chunks_mut(chunk).enumerate().for_each(|(t, ac)| {
            let p0 = t * chunk;
            for row in xs.chunks_exact(n) {
                for (s, &v) in ac.iter_mut().zip(&row[p0..]) {
                    *s += v;
                }
            }
            for s in ac.iter_mut() {
                *s = *s * inv_c;
            }
        });
        softmax_row(&mut a);
        // Per channel: pool with the attention, gate, scale.
        os.par_chunks_mut(n).zip(xs.par_chunks(n)).for_each(|(orow, row)| {
            let z = dot(row, &a).as_f64();
            let gate = T::of(1.0 / (1.0 + (-z).exp()));
            for (o, &v) in orow.iter_mut().zip(row) {
                *o = v * gate;
            }
        });
    }
    out
}

/// (B, R, C) -> (B, C, R) contiguous, each matrix by [`transposed`] (tiled, in parallel) instead
/// of candle's single-threaded strided copy; the backward is the same transposition of the
/// gradient.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transpose12 {
    pub b: usize,
    pub r: usize,
    pub c: usize,
}

impl Transpose12 {
    fn run<T: Real>(&self, x: &[T]) -> Vec<T> {
        let n = self.r * self.c;
        if n == 0 {
            return Vec::new();
        }
        let mut out = unwritten::<T>(self.b * n);
        for (m, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            transpose_into(m, self.r, self.c, o);
        }
        // SAFETY: each of the b matrices was written whole.
        unsafe { written(out) }
    }
}

impl CustomOp1 for Transpose12 {
    fn name(&self) -> &'static str {
        "transpose-last-two"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if l.shape().elem_count() != self.b * self.r * self.c {
            bail!("fused transpose: input {:?} is not {}×{}×{}", l.shape(), self.b, self.r, self.c);
        }
        let out = match s {
            CpuStorage::F32(_) => f32::into_storage(self.run(storage_slice::<f32>(s, l, "transpose")?)),
            CpuStorage::F64(_) => f64::into_storage(self.run(storage_slice::<f64>(s, l, "transpose")?)),
            _ => bail!("fused transpose: only f32 and f64 are supported"),
        };
        Ok((out, Shape::from((self.b, self.c, self.r))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Transpose12 { b: self.b, r: self.c, c: self.r };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

/// `[1 − x, x]` of `b` samples of `n` values each, (B, 2, n) out; its backward maps the
/// (B, 2, n) gradient g back to `g₁ − g₀`, one pass each way (see `nn::complement_pair`).
#[derive(Debug, Clone)]
pub(crate) struct ComplementPair {
    pub b: usize,
    pub n: usize,
}

impl ComplementPair {
    fn forward<T: Real>(&self, x: &[T]) -> Vec<T> {
        let one = T::of(1.0);
        let mut y = unwritten::<T>(self.b * 2 * self.n);
        y.par_chunks_mut(2 * self.n).zip(x.par_chunks(self.n)).for_each(|(ys, xs)| {
            let (bg, fg) = ys.split_at_mut(self.n);
            // 1 − x as candle's affine computes it: x · (−1) + 1, the same value.
            for ((b, f), &v) in bg.iter_mut().zip(fg.iter_mut()).zip(xs) {
                b.write(v * T::of(-1.0) + one);
                f.write(v);
            }
        });
        // SAFETY: both halves of every sample were written.
        unsafe { written(y) }
    }

    fn backward<T: Real>(&self, g: &[T]) -> Vec<T> {
        let mut dx = unwritten::<T>(self.b * self.n);
        dx.par_chunks_mut(self.n).zip(g.par_chunks(2 * self.n)).for_each(|(d, gs)| {
            let (g0, g1) = gs.split_at(self.n);
            // g₁ + (−g₀), as candle's backward adds the two paths' gradients.
            for ((o, &a), &b) in d.iter_mut().zip(g0).zip(g1) {
                o.write(b + a * T::of(-1.0));
            }
        });
        // SAFETY: every sample's n values were written.
        unsafe { written(dx) }
    }
}

impl CustomOp1 for ComplementPair {
    fn name(&self) -> &'static str {
        "complement-pair"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if l.shape().elem_count() != self.b * self.n {
            bail!("complement pair: input {:?} is not {} × {}", l.shape(), self.b, self.n);
        }
        let out = match s {
            CpuStorage::F32(_) => f32::into_storage(self.forward(storage_slice::<f32>(s, l, "complement pair")?)),
            CpuStorage::F64(_) => f64::into_storage(self.forward(storage_slice::<f64>(s, l, "complement pair")?)),
            _ => bail!("complement pair: only f32 and f64 are supported"),
        };
        Ok((out, Shape::from((self.b, 2, self.n))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        fn run<T: Real>(op: &ComplementPair, grad: &Tensor) -> Result<Vec<T>> {
            let grad = grad.contiguous()?;
            let g = grad.storage_and_layout();
            Ok(op.backward(guard_slice::<T>(&g, "complement pair grad")?))
        }
        let dx = match grad.dtype() {
            DType::F32 => Tensor::from_vec(run::<f32>(self, grad)?, arg.shape(), arg.device())?,
            DType::F64 => Tensor::from_vec(run::<f64>(self, grad)?, arg.shape(), arg.device())?,
            dt => bail!("complement pair: unsupported dtype {dt:?}"),
        };
        Ok(Some(dx))
    }
}
