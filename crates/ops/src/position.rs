//! Sine positional encoding of DETR / Mask2Former (`PositionEmbeddingSine`).

use candle_core::{bail, Device, Result, Tensor};

/// `PositionEmbeddingSine(num_pos_feats, temperature=10000, normalize=True, scale=2π)` of an
/// unpadded (B, ?, h, w) map -> (B, 2·num_pos_feats, h, w), f32.
///
/// Channels are `[y-part, x-part]`; within each part channel `2k` is `sin(e / T^(2k/F))` and
/// `2k + 1` is `cos(e / T^(2k/F))`, with `e = i / (n + 1e-6) · 2π` for the 1-based row (column)
/// index `i` of `n` rows (columns). Arithmetic is in f32 like the reference.
pub fn sine_position_encoding(
    batch: usize,
    h: usize,
    w: usize,
    num_pos_feats: usize,
    device: &Device,
) -> Result<Tensor> {
    let (f, ty, tx) = axis_tables(h, w, num_pos_feats)?;
    let mut out = Vec::with_capacity(2 * f * h * w);
    for k in 0..f {
        for y in 0..h {
            out.extend(std::iter::repeat_n(ty[k * h + y], w));
        }
    }
    for k in 0..f {
        for _ in 0..h {
            out.extend_from_slice(&tx[k * w..(k + 1) * w]);
        }
    }
    Tensor::from_vec(out, (1, 2 * f, h, w), device)?.repeat((batch, 1, 1, 1))
}

/// [`sine_position_encoding`] as tokens: (B, h·w, 2·num_pos_feats), row-major over positions,
/// the same values as `map_to_tokens` of the map, built in this layout.
pub fn sine_position_tokens(batch: usize, h: usize, w: usize, num_pos_feats: usize, device: &Device) -> Result<Tensor> {
    let (f, ty, tx) = axis_tables(h, w, num_pos_feats)?;
    let mut out = Vec::with_capacity(2 * f * h * w);
    for y in 0..h {
        for x in 0..w {
            out.extend((0..f).map(|k| ty[k * h + y]));
            out.extend((0..f).map(|k| tx[k * w + x]));
        }
    }
    Tensor::from_vec(out, (1, h * w, 2 * f), device)?.repeat((batch, 1, 1))
}

/// The per-axis (F, n) tables, channel k at position i: rows (F, h) and columns (F, w).
fn axis_tables(h: usize, w: usize, num_pos_feats: usize) -> Result<(usize, Vec<f32>, Vec<f32>)> {
    if num_pos_feats == 0 || num_pos_feats % 2 != 0 {
        bail!(
            "sine_position_encoding: num_pos_feats must be even and positive, got {num_pos_feats}"
        );
    }
    const TEMPERATURE: f32 = 10000.0;
    const EPS: f32 = 1e-6;
    let scale = 2.0 * std::f32::consts::PI;
    let f = num_pos_feats;
    let dim_t: Vec<f32> = (0..f)
        .map(|k| TEMPERATURE.powf((2 * (k / 2)) as f32 / f as f32))
        .collect();
    let axis = |n: usize| -> Vec<f32> {
        let mut t = vec![0f32; f * n];
        for i in 0..n {
            let e = (i + 1) as f32 / (n as f32 + EPS) * scale;
            for k in 0..f {
                let v = e / dim_t[k];
                t[k * n + i] = if k % 2 == 0 { v.sin() } else { v.cos() };
            }
        }
        t
    };
    Ok((f, axis(h), axis(w)))
}
