//! Small numeric kernels shared by the fused CPU ops (attention, softmax, layer norm): row
//! reductions written with independent lanes so they vectorise, a vectorisable `exp` for f32,
//! the `gemm` crate call, and access to a tensor's CPU buffer without copying it.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{bail, CpuStorage, Layout, Result, Storage, WithDType};

static FUSED: AtomicU8 = AtomicU8::new(0);

/// Whether the fused CPU kernels (attention, softmax, layer norm) are used. On by default;
/// `OPS_COMPOSED=1` in the environment (read once) or [`set_fused_kernels`] switch every op back
/// to its composed candle-primitive path, e.g. to compare against it.
pub fn fused_kernels_enabled() -> bool {
    match FUSED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("OPS_COMPOSED").is_ok_and(|v| !v.is_empty() && v != "0");
            FUSED.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            !off
        }
    }
}

/// Whether `x` can take a fused CPU kernel: an f32 / f64 CPU tensor, with the kernels enabled.
pub(crate) fn fusable(x: &candle_core::Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64) && fused_kernels_enabled()
}

/// Turns the fused CPU kernels on or off for the whole process (see [`fused_kernels_enabled`]).
pub fn set_fused_kernels(on: bool) {
    FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Lanes of the manual reductions: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;

/// f32 / f64 with what the fused kernels need beyond [`WithDType`].
pub(crate) trait Real: WithDType + Copy + Send + Sync + 'static {
    const NEG_INF: Self;
    const NAN: Self;
    fn sqrt_of(self) -> Self;
    /// `floor`, in this type (one rounding instruction; no trip through f64).
    fn floor_of(self) -> Self;
    /// `exp(self)`, as [`Real::exp_shift_sum`] computes each element.
    fn exp_of(self) -> Self;
    /// `xs[i] = exp(xs[i] - shift)` in place; returns the sum of the new values.
    fn exp_shift_sum(xs: &mut [Self], shift: Self) -> Self;
    /// The buffer of a CPU storage of this dtype.
    fn cpu_slice(s: &CpuStorage) -> Option<&[Self]>;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    /// `v` in this type. `WithDType::from_f64` is not inlined across crates, and these
    /// conversions sit in per-sample loops (the bilinear corners: 4% of the deformable core).
    fn of(v: f64) -> Self;
    /// This value as f64 (see [`Real::of`]).
    fn as_f64(self) -> f64;
}

/// `exp(x)` for `x <= 0` (larger arguments up to ~88 also work), Cephes' `expf` polynomial
/// (about 1 ulp), written branch-free so loops over it vectorise. Arguments below -87 give
/// exactly 0 (`exp(-inf) = 0` for masked logits; the true value there is below 2^-125).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = if x > -87.0 { x } else { -87.0 };
    let xc = if xc < 88.0 { xc } else { 88.0 };
    let fx = (xc * LOG2E + 0.5).floor();
    let r = xc - fx * C1 - fx * C2;
    let z = r * r;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    let y = y * z + r + 1.0;
    // SAFETY: fx is an integer in [-126, 127] after the clamps, so the conversion is exact (and,
    // unlike a saturating `as`, vectorises).
    let pow2 = f32::from_bits(((unsafe { fx.to_int_unchecked::<i32>() } + 127) << 23) as u32);
    if x > -87.0 {
        y * pow2
    } else {
        0.0
    }
}

impl Real for f32 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self as f64
    }
    const NEG_INF: Self = f32::NEG_INFINITY;
    const NAN: Self = f32::NAN;
    #[inline(always)]
    fn floor_of(self) -> Self {
        self.floor()
    }
    fn sqrt_of(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn exp_of(self) -> Self {
        exp_f32(self)
    }
    fn exp_shift_sum(xs: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let e = exp_f32(c[l] - shift);
                c[l] = e;
                acc[l] += e;
            }
        }
        let mut s = 0f32;
        for x in chunks.into_remainder() {
            *x = exp_f32(*x - shift);
            s += *x;
        }
        s + acc.iter().sum::<f32>()
    }
    fn cpu_slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self
    }
    const NEG_INF: Self = f64::NEG_INFINITY;
    const NAN: Self = f64::NAN;
    #[inline(always)]
    fn floor_of(self) -> Self {
        self.floor()
    }
    fn sqrt_of(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn exp_of(self) -> Self {
        self.exp()
    }
    fn exp_shift_sum(xs: &mut [f64], shift: f64) -> f64 {
        let mut s = 0f64;
        for x in xs.iter_mut() {
            *x = (*x - shift).exp();
            s += *x;
        }
        s
    }
    fn cpu_slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// `max(m, x)`, NaN once either is NaN: a NaN stays, since neither `x > NaN` nor `x != x`
/// holds for a later non-NaN `x`.
#[allow(clippy::eq_op)]
#[inline(always)]
fn max_step<T: Real>(m: T, x: T) -> T {
    if x > m || x != x {
        x
    } else {
        m
    }
}

/// Maximum of a slice, or NaN if any element is NaN (`-inf` when empty or all `-inf`). One
/// vectorised pass: a separate scan for NaN (`iter().any(..)`) cannot vectorise because it exits
/// early, and it cost more than the max and the exponentials of the attention's softmax together.
#[inline]
pub(crate) fn max_or_nan<T: Real>(xs: &[T]) -> T {
    let mut acc = [T::NEG_INF; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = max_step(acc[l], c[l]);
        }
    }
    let mut m = T::NEG_INF;
    for &x in chunks.remainder() {
        m = max_step(m, x);
    }
    acc.iter().fold(m, |m, &x| max_step(m, x))
}

/// Sum of a slice.
#[inline]
pub(crate) fn sum<T: Real>(xs: &[T]) -> T {
    let zero = T::of(0.0);
    let mut acc = [zero; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let mut s = zero;
    for &x in chunks.remainder() {
        s += x;
    }
    acc.iter().fold(s, |s, &x| s + x)
}

/// Dot product of two equally long slices.
#[inline]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let zero = T::of(0.0);
    let mut acc = [zero; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = zero;
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    acc.iter().fold(s, |s, &x| s + x)
}

/// In-place numerically stable softmax of one row. A row whose entries are all `-inf` (every
/// key masked) becomes NaN, as in torch.
#[inline]
pub(crate) fn softmax_row<T: Real>(row: &mut [T]) {
    let m = max_or_nan(row);
    // A NaN logit makes the whole row NaN, as the composed softmax does (the clamped `exp` would
    // otherwise turn it into a silent probability of 0); so does an all -inf row.
    #[allow(clippy::eq_op)]
    if m == T::NEG_INF || m != m {
        row.fill(T::NAN);
        return;
    }
    let s = T::exp_shift_sum(row, m);
    let inv = T::of(1.0) / s;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// [`softmax_row`] on every row of `rows` (rows of `d` < [`LANES`] values, e.g. the deformable
/// attention's 12 weights per head), [`LANES`] rows at a time with one row per lane: a short
/// row leaves most of a vector idle and is dominated by the horizontal max and sum, while across
/// rows every step is a vertical vector operation. Each row's max, exponentials and left-to-right
/// sum are those [`softmax_row`] computes, so the values are the same to the bit
/// (measured: 37,800 rows of 12, 1.69 → 0.34 ms on 2 threads).
pub(crate) fn softmax_short_rows<T: Real>(rows: &mut [T], d: usize) {
    debug_assert!(d > 0 && d < LANES && rows.len() % d == 0);
    let mut groups = rows.chunks_exact_mut(LANES * d);
    for g in &mut groups {
        // cols[j][r]: element j of row r of the group.
        let mut cols = [[T::NEG_INF; LANES]; LANES];
        for (r, row) in g.chunks_exact(d).enumerate() {
            for (j, &x) in row.iter().enumerate() {
                cols[j][r] = x;
            }
        }
        let mut m = [T::NEG_INF; LANES];
        for col in &cols[..d] {
            for r in 0..LANES {
                m[r] = max_step(m[r], col[r]);
            }
        }
        let mut s = [T::of(0.0); LANES];
        for col in &mut cols[..d] {
            for r in 0..LANES {
                let e = (col[r] - m[r]).exp_of();
                col[r] = e;
                s[r] += e;
            }
        }
        for (r, row) in g.chunks_exact_mut(d).enumerate() {
            #[allow(clippy::eq_op)]
            if m[r] == T::NEG_INF || m[r] != m[r] {
                row.fill(T::NAN);
                continue;
            }
            let inv = T::of(1.0) / s[r];
            for (j, x) in row.iter_mut().enumerate() {
                *x = cols[j][r] * inv;
            }
        }
    }
    for row in groups.into_remainder().chunks_exact_mut(d) {
        softmax_row(row);
    }
}

/// Floating-point operations of the matrix products run so far (see [`gemm_flops`]).
static GEMM_FLOPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts one m×n×k product (2·m·n·k operations) in [`gemm_flops`].
#[inline]
pub(crate) fn count_gemm(m: usize, n: usize, k: usize) {
    GEMM_FLOPS.fetch_add(2 * (m as u64) * (n as u64) * (k as u64), std::sync::atomic::Ordering::Relaxed);
}

/// Floating-point operations (2·m·n·k a product) of every matrix product this crate's CPU
/// kernels have run in this process, on all threads: the linears, attention, 1×1 and gemm-path
/// convolutions, Winograd tiles and `nn::matmul`'s forward. A benchmark divides the change over
/// a phase by its time to see how near the gemm's peak the phase runs. Products candle computes
/// itself (its `matmul`: `nn::matmul`'s backward, a few small ones in the models and losses)
/// and the element-wise work are not counted, so a phase's count is a lower bound.
pub fn gemm_flops() -> u64 {
    GEMM_FLOPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Single-threaded `dst = beta·lhs·rhs` (`accumulate`: `dst += beta·lhs·rhs`) with the `gemm`
/// crate; `(rs, cs)` are the row and column strides of each m×k / k×n / m×n matrix.
///
/// # Safety
/// The pointers must address matrices of the given sizes and strides; `dst` must not alias the
/// inputs and no other thread may write it.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn gemm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const T,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const T,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    count_gemm(m, n, k);
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j) = T::of(0.0);
                }
            }
        }
        return;
    }
    gemm19::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::of(1.0),
        beta,
        false,
        false,
        false,
        gemm19::Parallelism::None,
    )
}

/// `n` elements left unwritten, for a kernel that writes every one of them before anything reads
/// them: the zero fill of a large output (a linear layer's 4096 × 2048 input gradient) costs a
/// pass over memory of its own. See [`written`].
pub(crate) fn unwritten<T>(n: usize) -> Vec<std::mem::MaybeUninit<T>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation, and the capacity is `n`.
    unsafe { v.set_len(n) };
    v
}

/// `dst` written with a copy of `src` (same length), then seen as initialised.
pub(crate) fn init_copy<'a, T: Copy>(dst: &'a mut [std::mem::MaybeUninit<T>], src: &[T]) -> &'a mut [T] {
    assert_eq!(dst.len(), src.len(), "init_copy: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
    // SAFETY: every element was written just above; `MaybeUninit<T>` has `T`'s layout.
    unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// `dst` filled with `v`, then seen as initialised.
pub(crate) fn init_fill<T: Copy>(dst: &mut [std::mem::MaybeUninit<T>], v: T) -> &mut [T] {
    for d in dst.iter_mut() {
        d.write(v);
    }
    // SAFETY: as in `init_copy`.
    unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// `out` written with the sum, in order, of `count ≥ 1` partials `parts[first + c·stride..]`
/// (each `out.len()` long), then seen as initialised: the first partial copied, the others added.
pub(crate) fn sum_partials<'a, T: Real>(out: &'a mut [std::mem::MaybeUninit<T>], parts: &[T], first: usize, stride: usize, count: usize) -> &'a mut [T] {
    let len = out.len();
    let out = init_copy(out, &parts[first..first + len]);
    for c in 1..count {
        for (s, &g) in out.iter_mut().zip(&parts[first + c * stride..][..len]) {
            *s += g;
        }
    }
    out
}

/// The elements of an [`unwritten`] vector once all of them have been written.
///
/// # Safety
/// Every element must have been initialised.
pub(crate) unsafe fn written<T>(v: Vec<std::mem::MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<T>` has `T`'s layout; the caller guarantees every element is
    // initialised; the allocation is handed over whole.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
}

/// The buffer of a contiguous CPU tensor, borrowed from its storage guard
/// (`let g = t.storage_and_layout();`).
pub(crate) fn guard_slice<'a, T: Real>(
    g: &'a (candle_core::StorageRef<'a>, &'a Layout),
    what: &str,
) -> Result<&'a [T]> {
    let s = match &*g.0 {
        Storage::Cpu(cs) => match T::cpu_slice(cs) {
            Some(s) => s,
            None => bail!("{what}: expected a {:?} tensor", T::DTYPE),
        },
        _ => bail!("{what}: expected a CPU tensor"),
    };
    layout_slice(s, g.1, what)
}

/// The elements of a contiguous layout.
pub(crate) fn layout_slice<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: tensor must be contiguous"),
    }
}

/// The buffer of a CPU storage of dtype `T` in a contiguous layout.
pub(crate) fn storage_slice<'a, T: Real>(
    s: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    match T::cpu_slice(s) {
        Some(v) => layout_slice(v, layout, what),
        None => bail!(
            "{what}: all inputs must have the same dtype ({:?})",
            T::DTYPE
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `accumulate`, `gemm` writes its output without reading it, so the output may start
    /// unwritten: NaN there must not leak into the product (0 · NaN would).
    #[test]
    fn gemm_overwrites_without_reading_its_output() {
        let (m, n, k) = (37, 70, 19);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut dst = vec![f32::NAN; m * n];
        // SAFETY: row-major m×k, k×n and m×n buffers of those sizes.
        unsafe { gemm(m, n, k, dst.as_mut_ptr(), n, false, lhs.as_ptr(), k, 1, rhs.as_ptr(), n, 1, 1.0) };
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| lhs[i * k + t] * rhs[t * n + j]).sum();
                assert!((dst[i * n + j] - want).abs() < 1e-4, "({i}, {j}): {} vs {want}", dst[i * n + j]);
            }
        }
    }

    /// Rows across lanes give exactly the per-row softmax, NaN and all -inf rows included, for
    /// every short width and a partial last group.
    #[test]
    fn short_rows_equal_row_by_row_to_the_bit() {
        for d in 1..LANES {
            let n = 2 * LANES + 5;
            let mut rows: Vec<f32> = (0..n * d).map(|i| ((i as f32) * 0.731).sin() * 9.0).collect();
            rows[3 * d] = f32::NAN; // row 3
            rows[5 * d..6 * d].fill(f32::NEG_INFINITY); // row 5: every key masked
            rows[7 * d] = f32::NEG_INFINITY; // row 7: one masked
            let mut want = rows.clone();
            want.chunks_exact_mut(d).for_each(softmax_row);
            softmax_short_rows(&mut rows, d);
            for (i, (a, b)) in rows.iter().zip(&want).enumerate() {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "d {d} element {i}: {a} vs {b}");
            }
            assert!(rows[5 * d..6 * d].iter().all(|x| x.is_nan()) && rows[3 * d].is_nan());
            let mut r64: Vec<f64> = (0..n * d).map(|i| ((i as f64) * 0.37).cos() * 5.0).collect();
            let mut w64 = r64.clone();
            w64.chunks_exact_mut(d).for_each(softmax_row);
            softmax_short_rows(&mut r64, d);
            assert!(r64.iter().zip(&w64).all(|(a, b)| a.to_bits() == b.to_bits()), "f64, d {d}");
        }
    }

    #[test]
    fn max_or_nan_finds_a_nan_in_any_lane() {
        // 37 elements: two full chunks of LANES plus a remainder of 5.
        let base: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let want = base.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max_or_nan(&base), want);
        for at in [0, 7, 15, 16, 31, 32, 36] {
            let mut xs = base.clone();
            xs[at] = f32::NAN;
            assert!(max_or_nan(&xs).is_nan(), "NaN at {at} missed");
            let mut row = xs.clone();
            softmax_row(&mut row);
            assert!(row.iter().all(|x| x.is_nan()), "softmax with a NaN at {at}: {row:?}");
        }
        assert_eq!(max_or_nan::<f64>(&[]), f64::NEG_INFINITY);
        let mut masked = vec![f64::NEG_INFINITY; 20];
        assert_eq!(max_or_nan(&masked), f64::NEG_INFINITY);
        softmax_row(&mut masked);
        assert!(masked.iter().all(|x| x.is_nan()), "an all -inf row becomes NaN");
        let mut row = base.clone();
        row[3] = f32::NEG_INFINITY;
        softmax_row(&mut row);
        assert_eq!(row[3], 0.0);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
