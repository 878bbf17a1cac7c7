//! Spatial resizing with torch `F.interpolate` semantics.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::fastmath::fusable;
use crate::util::ensure_float;

mod kernel;

fn dims4(x: &Tensor, what: &str) -> Result<(usize, usize, usize, usize)> {
    match x.dims() {
        &[b, c, h, w] => Ok((b, c, h, w)),
        _ => bail!("{what}: expected a (B, C, H, W) input, got {:?}", x.shape()),
    }
}

/// The two taps of each output of torch's 1-D linear interpolation (`upsample_bilinear2d`
/// along one axis, no antialiasing, no explicit scale factor): `(i0, w0, i1, w1)` per output,
/// `i1 = i0` with `w1 = 0` where both fall on the last input. `single` computes the source
/// positions in f32 as torch does for f32 tensors (its "opmath" type), so the weights round
/// the same way.
fn interp_taps(n_in: usize, n_out: usize, align_corners: bool, single: bool) -> Vec<(usize, f64, usize, f64)> {
    let round = |v: f64| if single { v as f32 as f64 } else { v };
    let scale = round(if align_corners {
        if n_out > 1 {
            (n_in - 1) as f64 / (n_out - 1) as f64
        } else {
            0.0
        }
    } else {
        n_in as f64 / n_out as f64
    });
    (0..n_out)
        .map(|o| {
            let src = if align_corners {
                round(scale * o as f64)
            } else {
                // Each f32 operation of `scale * (o + 0.5) - 0.5` rounded like torch's.
                round(round(scale * (o as f64 + 0.5)) - 0.5).max(0.0)
            };
            let i0 = (src.floor() as usize).min(n_in - 1);
            let lambda = round(src - i0 as f64).clamp(0.0, 1.0);
            if i0 < n_in - 1 {
                (i0, round(1.0 - lambda), i0 + 1, lambda)
            } else {
                (i0, round(1.0 - lambda) + lambda, i0, 0.0)
            }
        })
        .collect()
}

/// The (out, in) matrix of [`interp_taps`], in row-major order.
fn interp_matrix(n_in: usize, n_out: usize, align_corners: bool, single: bool) -> Vec<f64> {
    let mut m = vec![0f64; n_out * n_in];
    for (o, (i0, w0, i1, w1)) in interp_taps(n_in, n_out, align_corners, single).into_iter().enumerate() {
        m[o * n_in + i0] += w0;
        m[o * n_in + i1] += w1;
    }
    m
}

/// The (out, in) interpolation matrix as a tensor on `dev` in `dt`, built and uploaded once per
/// (sizes, mode, dtype, device) and then reused: resizes run every iteration and every episode
/// at a handful of sizes, and a rebuilt matrix is a host loop plus a host-to-device copy.
fn interp_tensor(n_in: usize, n_out: usize, align_corners: bool, dt: DType, dev: &Device) -> Result<Tensor> {
    type Key = (usize, usize, bool, DType, String);
    static CACHE: OnceLock<Mutex<HashMap<Key, Tensor>>> = OnceLock::new();
    // Bounded: a caller resizing to ever new sizes must not grow it without end.
    const MAX_ENTRIES: usize = 256;
    let key = (n_in, n_out, align_corners, dt, format!("{:?}", dev.location()));
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(t) = cache.lock().expect("resize cache lock").get(&key) {
        return Ok(t.clone());
    }
    let t = Tensor::from_vec(interp_matrix(n_in, n_out, align_corners, dt == DType::F32), (n_out, n_in), dev)?.to_dtype(dt)?;
    let mut map = cache.lock().expect("resize cache lock");
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    map.insert(key, t.clone());
    Ok(t)
}

/// (B, C, H, W) of a float map to be resized between its size and `other_hw`, both non-empty.
fn bilinear_dims(x: &Tensor, other_hw: (usize, usize), what: &str) -> Result<(usize, usize, usize, usize)> {
    ensure_float(x, what)?;
    let (b, c, h, w) = dims4(x, what)?;
    let (oh, ow) = other_hw;
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        bail!("{what}: cannot resize between {h}x{w} and {oh}x{ow} (zero-sized)");
    }
    Ok((b, c, h, w))
}

/// Bilinear resize, torch `F.interpolate(x, size=out_hw, mode="bilinear",
/// align_corners=align_corners)` (antialias off).
///
/// `x`: (B, C, H, W) -> (B, C, oh, ow), i.e. `Wh · X · Wwᵀ` with the two 1-D interpolation
/// matrices. On CPU (f32 / f64) a kernel reads each output's two taps per axis, its backward
/// being [`resize_bilinear_adjoint`]; elsewhere [`resize_bilinear_matmul`].
pub fn resize_bilinear(x: &Tensor, out_hw: (usize, usize), align_corners: bool) -> Result<Tensor> {
    let (_, _, h, w) = bilinear_dims(x, out_hw, "resize_bilinear")?;
    if out_hw == (h, w) {
        return Ok(x.clone());
    }
    if fusable(x) {
        let op = kernel::Bilinear::new((h, w), out_hw, align_corners, x.dtype() == DType::F32, false);
        return x.contiguous()?.apply_op1(op);
    }
    resize_bilinear_matmul(x, out_hw, align_corners)
}

/// [`resize_bilinear`] of tokens: `t` (B, h·w, C), row-major over the positions of an (h, w)
/// map, -> (B, oh·ow, C), the same values as resizing the map, without transposing to it and
/// back. On CPU (f32 / f64) a kernel with the plane kernel's arithmetic (the same bits), its
/// backward the adjoint; elsewhere through the map.
pub fn resize_bilinear_tokens(t: &Tensor, in_hw: (usize, usize), out_hw: (usize, usize), align_corners: bool) -> Result<Tensor> {
    ensure_float(t, "resize_bilinear_tokens")?;
    let (l, c) = match *t.dims() {
        [_, l, c] => (l, c),
        _ => bail!("resize_bilinear_tokens: expected (B, h·w, C) tokens, got {:?}", t.shape()),
    };
    let ((h, w), (oh, ow)) = (in_hw, out_hw);
    if l != h * w {
        bail!("resize_bilinear_tokens: {l} tokens for a {h}x{w} map");
    }
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        bail!("resize_bilinear_tokens: cannot resize between {h}x{w} and {oh}x{ow} (zero-sized)");
    }
    if out_hw == in_hw {
        return Ok(t.clone());
    }
    if fusable(t) {
        let plane = kernel::Bilinear::new(in_hw, out_hw, align_corners, t.dtype() == DType::F32, false);
        return t.contiguous()?.apply_op1(kernel::BilinearTokens::new(plane, c));
    }
    crate::nn::map_to_tokens(&resize_bilinear(&crate::nn::tokens_to_map(t, in_hw)?, out_hw, align_corners)?)
}

/// [`resize_bilinear`] as two gemms with the dense interpolation matrices, on any device: the
/// path off the CPU, and the CPU kernel's cross-check.
pub fn resize_bilinear_matmul(x: &Tensor, out_hw: (usize, usize), align_corners: bool) -> Result<Tensor> {
    let (b, c, h, w) = bilinear_dims(x, out_hw, "resize_bilinear")?;
    let (oh, ow) = out_hw;
    if (oh, ow) == (h, w) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let dt = x.dtype();
    // Each axis whose size is unchanged is skipped: torch copies it exactly. Rows first, as a
    // batched Wh · X_bc; then columns as one big (B·C·oh, W) · Wwᵀ gemm. This order needs no
    // transposed copies of the (large) output.
    let mut y = x.reshape((b * c, h, w))?;
    if oh != h {
        let wh = interp_tensor(h, oh, align_corners, dt, dev)?;
        y = wh.broadcast_left(b * c)?.matmul(&y)?;
    }
    if ow != w {
        let ww = interp_tensor(w, ow, align_corners, dt, dev)?;
        y = y.reshape((b * c * oh, w))?.matmul(&ww.t()?)?;
    }
    y.reshape((b, c, oh, ow))
}

/// The adjoint (transpose) of [`resize_bilinear`] from `in_hw` to `y`'s size: `Whᵀ · Y · Ww`,
/// so that `Σ resize_bilinear(x) ⊙ y = Σ x ⊙ resize_bilinear_adjoint(y)` for every `x`.
///
/// What a sum over upsampled maps needs (e.g. the overlap of upsampled soft masks with a
/// full-size label) without materialising the upsampled maps: the label is brought down once.
///
/// `y`: (B, C, oh, ow) -> (B, C, h, w) with `(h, w) = in_hw`.
pub fn resize_bilinear_adjoint(y: &Tensor, in_hw: (usize, usize), align_corners: bool) -> Result<Tensor> {
    let (_, _, oh, ow) = bilinear_dims(y, in_hw, "resize_bilinear_adjoint")?;
    if (oh, ow) == in_hw {
        return Ok(y.clone());
    }
    if fusable(y) {
        let op = kernel::Bilinear::new(in_hw, (oh, ow), align_corners, y.dtype() == DType::F32, true);
        return y.contiguous()?.apply_op1(op);
    }
    resize_bilinear_adjoint_matmul(y, in_hw, align_corners)
}

/// [`resize_bilinear_adjoint`] as two gemms, on any device (see [`resize_bilinear_matmul`]).
pub fn resize_bilinear_adjoint_matmul(y: &Tensor, in_hw: (usize, usize), align_corners: bool) -> Result<Tensor> {
    let (b, c, oh, ow) = bilinear_dims(y, in_hw, "resize_bilinear_adjoint")?;
    let (h, w) = in_hw;
    let (dev, dt) = (y.device(), y.dtype());
    // Columns first (Y · Ww on the large side), then rows (Whᵀ · ·).
    let mut x = y.reshape((b * c * oh, ow))?;
    if ow != w {
        x = x.matmul(&interp_tensor(w, ow, align_corners, dt, dev)?)?;
    }
    let mut x = x.reshape((b * c, oh, w))?;
    if oh != h {
        let wh_t = interp_tensor(h, oh, align_corners, dt, dev)?.t()?.contiguous()?;
        x = wh_t.broadcast_left(b * c)?.matmul(&x)?;
    }
    x.reshape((b, c, h, w))
}

/// torch `floor(dst * scale)` source indices for `F.interpolate(mode="nearest")`, with the
/// scale and product in f32 as torch computes them.
fn nearest_indices(n_in: usize, n_out: usize) -> Vec<u32> {
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|o| ((o as f32 * scale).floor() as usize).min(n_in - 1) as u32)
        .collect()
}

/// Nearest resize, torch `F.interpolate(x, size=out_hw, mode="nearest")`: source index
/// `floor(dst * in / out)` (not PIL's centre-aligned nearest). Any dtype; meant for label maps,
/// so no gradient is needed (though `index_select` would provide one).
///
/// `x`: (B, C, H, W) -> (B, C, oh, ow).
pub fn resize_nearest(x: &Tensor, out_hw: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = dims4(x, "resize_nearest")?;
    let (oh, ow) = out_hw;
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        bail!("resize_nearest: cannot resize {h}x{w} to {oh}x{ow} (zero-sized)");
    }
    let dev = x.device();
    let mut y = x.clone();
    if oh != h {
        let ih = Tensor::new(nearest_indices(h, oh), dev)?;
        y = y.index_select(&ih, 2)?;
    }
    if ow != w {
        let iw = Tensor::new(nearest_indices(w, ow), dev)?;
        y = y.index_select(&iw, 3)?;
    }
    Ok(y)
}
