//! Internal helpers shared by the sampling operations and the kernels.

use candle_core::{bail, DType, Result, Tensor, WithDType};

/// A raw output pointer shared by tasks that write disjoint regions of one buffer (joined before
/// it is read).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T = f32>(pub *mut T);
// SAFETY: every user hands each task a disjoint region of the buffer behind the pointer.
unsafe impl<T: Send> Send for SyncPtr<T> {}
unsafe impl<T: Send> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    /// A method (not field access) so closures capture the whole Send wrapper.
    #[inline]
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// Fails with a clear message unless `t` is a floating-point tensor the ops support.
pub(crate) fn ensure_float(t: &Tensor, what: &str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        dt => bail!("{what}: expected an f32 or f64 tensor, got {dt:?}"),
    }
}

/// A tensor's elements on the host, in row-major order.
pub(crate) fn host_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// 1.0 where `0 <= c <= n - 1`, else 0.0, in `dtype`.
fn inside(c: &Tensor, n: usize, dtype: DType) -> Result<Tensor> {
    c.ge(0.0)?.mul(&c.le((n - 1) as f64)?)?.to_dtype(dtype)
}

/// Four-corner bilinear taps of an `h`×`w` grid at pixel coordinates `x`, `y` (pixel centres at
/// integers, any shape), with zero padding outside the grid.
///
/// Returns `(rows, weights)`, both shaped `(..x.shape, 4)` in corner order (y0,x0), (y0,x1),
/// (y1,x0), (y1,x1). `rows` (u32) is `base + y_c * w + x_c`, `base` being a float tensor that
/// broadcasts against `x` (the first row of the image in a flattened table). Corners outside the
/// grid get a clamped (valid) row and weight 0. The integer part is detached, so gradients reach
/// `x` and `y` through the fractional weights only, exactly like torch's bilinear backward.
pub(crate) fn bilinear_taps(
    x: &Tensor,
    y: &Tensor,
    base: &Tensor,
    h: usize,
    w: usize,
) -> Result<(Tensor, Tensor)> {
    let dtype = x.dtype();
    let x0 = x.floor()?.detach();
    let y0 = y.floor()?.detach();
    let fx = (x - &x0)?;
    let fy = (y - &y0)?;
    let gx = fx.affine(-1.0, 1.0)?;
    let gy = fy.affine(-1.0, 1.0)?;
    let x1 = (&x0 + 1.0)?;
    let y1 = (&y0 + 1.0)?;
    let corners = [
        (&y0, &x0, &gy, &gx),
        (&y0, &x1, &gy, &fx),
        (&y1, &x0, &fy, &gx),
        (&y1, &x1, &fy, &fx),
    ];
    let mut rows = Vec::with_capacity(4);
    let mut weights = Vec::with_capacity(4);
    for (cy, cx, wy, wx) in corners {
        let valid = inside(cx, w, dtype)?.mul(&inside(cy, h, dtype)?)?;
        weights.push(wy.mul(wx)?.mul(&valid)?);
        // f64 keeps the row arithmetic exact well past 2^24 rows.
        let cxc = cx.clamp(0.0, (w - 1) as f64)?.to_dtype(DType::F64)?;
        let cyc = cy.clamp(0.0, (h - 1) as f64)?.to_dtype(DType::F64)?;
        let row = cyc.affine(w as f64, 0.0)?.add(&cxc)?.broadcast_add(base)?;
        rows.push(row.to_dtype(DType::U32)?);
    }
    let last = x.rank();
    Ok((Tensor::stack(&rows, last)?, Tensor::stack(&weights, last)?))
}
