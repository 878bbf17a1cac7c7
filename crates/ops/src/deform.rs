//! Multi-scale deformable attention (Deformable-DETR), as used by Mask2Former's pixel decoder.

use candle_core::{bail, DType, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::nn::softmax;
use crate::util::{bilinear_taps, ensure_float};

pub(crate) mod kernel;
#[cfg(feature = "cuda")]
mod cuda;

/// How the CUDA backward of the deformable-attention core is parallelised (both compute the same
/// gradients; the GPU check compares each with the CPU kernel and times both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaBackward {
    /// One warp per sampling point, lanes over channels: coalesced reads and atomics.
    Warp,
    /// One thread per sampling point, channels in a loop (default: the one checked on an H200).
    Thread,
}

static CUDA_BACKWARD: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// The CUDA backward in use: [`set_cuda_backward`]'s choice, else `MMFORMER_DEFORM_BWD`
/// (`warp` or `thread`), else [`CudaBackward::Thread`].
pub fn cuda_backward() -> CudaBackward {
    use std::sync::atomic::Ordering;
    match CUDA_BACKWARD.load(Ordering::Relaxed) {
        0 => CudaBackward::Warp,
        1 => CudaBackward::Thread,
        _ => match std::env::var("MMFORMER_DEFORM_BWD").as_deref() {
            Ok("warp") => CudaBackward::Warp,
            _ => CudaBackward::Thread,
        },
    }
}

/// Chooses the CUDA backward for the whole process.
pub fn set_cuda_backward(v: CudaBackward) {
    let code = match v {
        CudaBackward::Warp => 0,
        CudaBackward::Thread => 1,
    };
    CUDA_BACKWARD.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the dedicated deformable-attention kernel runs on `device` (CPU always; CUDA when
/// built with the `cuda` feature); elsewhere the composed path is used.
pub fn has_kernel(device: &candle_core::Device) -> bool {
    device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda())
}

/// Sizes of one core call, after validation.
struct CoreDims {
    b: usize,
    s: usize,
    heads: usize,
    dh: usize,
    lq: usize,
    points: usize,
}

fn check_core_inputs(
    value: &Tensor,
    spatial_shapes: &[(usize, usize)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Result<CoreDims> {
    ensure_float(value, "ms_deform_attn_core value")?;
    ensure_float(sampling_locations, "ms_deform_attn_core sampling_locations")?;
    ensure_float(attention_weights, "ms_deform_attn_core attention_weights")?;
    let (b, s, heads, dh) = match value.dims() {
        &[b, s, m, d] => (b, s, m, d),
        _ => bail!(
            "ms_deform_attn_core: value must be (B, S, heads, dh), got {:?}",
            value.shape()
        ),
    };
    let n_levels = spatial_shapes.len();
    let total: usize = spatial_shapes.iter().map(|&(h, w)| h * w).sum();
    if n_levels == 0 || total != s || spatial_shapes.iter().any(|&(h, w)| h == 0 || w == 0) {
        bail!(
            "ms_deform_attn_core: spatial shapes {spatial_shapes:?} do not tile the {s} value rows"
        );
    }
    let (lq, points) = match sampling_locations.dims() {
        &[lb, lq, lm, ll, p, 2] if lb == b && lm == heads && ll == n_levels => (lq, p),
        _ => bail!(
            "ms_deform_attn_core: sampling_locations must be (B={b}, Lq, heads={heads}, L={n_levels}, P, 2), got {:?}",
            sampling_locations.shape()
        ),
    };
    if attention_weights.dims() != [b, lq, heads, n_levels, points] {
        bail!(
            "ms_deform_attn_core: attention_weights must be (B={b}, Lq={lq}, heads={heads}, L={n_levels}, P={points}), got {:?}",
            attention_weights.shape()
        );
    }
    // Empty heads/channels/points would make the kernel's per-query chunks zero-sized.
    if heads == 0 || dh == 0 || points == 0 {
        bail!("ms_deform_attn_core: heads ({heads}), head dim ({dh}) and points ({points}) must be positive");
    }
    Ok(CoreDims {
        b,
        s,
        heads,
        dh,
        lq,
        points,
    })
}

/// The pure-PyTorch `ms_deform_attn_core_pytorch`: per level, bilinear `grid_sample`
/// (zero padding, align_corners=False, i.e. pixel = loc * size - 0.5) of every head's values,
/// weighted by the attention weights and summed over levels and points.
///
/// - `value`: (B, S, heads, dh) with S = Σ h_l·w_l, levels concatenated in `spatial_shapes` order
///   (each flattened row-major, y then x);
/// - `sampling_locations`: (B, Lq, heads, L, P, 2), normalised (x, y) in [0, 1];
/// - `attention_weights`: (B, Lq, heads, L, P);
///
/// returns (B, Lq, heads·dh) with the head index major. Differentiable w.r.t. all three tensors.
/// On CPU (and on CUDA with the `cuda` feature) this runs a dedicated kernel with an analytic
/// backward; on other devices it falls back to [`ms_deform_attn_core_composed`].
pub fn ms_deform_attn_core(
    value: &Tensor,
    spatial_shapes: &[(usize, usize)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Result<Tensor> {
    let dims = check_core_inputs(value, spatial_shapes, sampling_locations, attention_weights)?;
    if dims.b * dims.lq == 0 {
        // Nothing to sample (e.g. zero points): no kernel launch, which CUDA would refuse.
        return Tensor::zeros((dims.b, dims.lq, dims.heads * dims.dh), value.dtype(), value.device());
    }
    if !has_kernel(value.device()) {
        return ms_deform_attn_core_composed(
            value,
            spatial_shapes,
            sampling_locations,
            attention_weights,
        );
    }
    let dt = value.dtype();
    let mut levels = Vec::with_capacity(spatial_shapes.len());
    let mut start = 0;
    for &(h, w) in spatial_shapes {
        levels.push((h, w, start));
        start += h * w;
    }
    let op = kernel::MsDeformCore {
        b: dims.b,
        s: dims.s,
        heads: dims.heads,
        dh: dims.dh,
        lq: dims.lq,
        points: dims.points,
        levels,
    };
    value
        .contiguous()?
        .apply_op3(
            &sampling_locations.to_dtype(dt)?.contiguous()?,
            &attention_weights.to_dtype(dt)?.contiguous()?,
            op,
        )?
        .reshape((dims.b, dims.lq, dims.heads * dims.dh))
}

/// [`ms_deform_attn_core`] composed from candle primitives (an `index_select` of every bilinear
/// tap, weighted and summed), so it runs and differentiates on any device. On CPU it is much
/// slower and more memory-hungry than the kernel; it also serves as the kernel's cross-check.
pub fn ms_deform_attn_core_composed(
    value: &Tensor,
    spatial_shapes: &[(usize, usize)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Result<Tensor> {
    let CoreDims {
        b,
        s,
        heads,
        dh,
        lq,
        points: n_points,
    } = check_core_inputs(value, spatial_shapes, sampling_locations, attention_weights)?;
    let n_levels = spatial_shapes.len();
    if b * heads * s > u32::MAX as usize {
        bail!("ms_deform_attn_core: too many value rows for u32 indices");
    }
    let dt = value.dtype();
    let dev = value.device();
    let loc = sampling_locations.to_dtype(dt)?;
    let attn = attention_weights.to_dtype(dt)?;
    // Value rows grouped per (batch, head): row = (b*heads + m)*S + level_start + y*w + x.
    let table = value.permute((0, 2, 1, 3))?.reshape((b * heads * s, dh))?;
    let head_base = Tensor::arange(0u32, (b * heads) as u32, dev)?
        .to_dtype(DType::F64)?
        .affine(s as f64, 0.0)?
        .reshape((b, heads, 1, 1))?;

    let mut all_rows = Vec::with_capacity(n_levels);
    let mut all_weights = Vec::with_capacity(n_levels);
    let mut start = 0usize;
    for (l, &(h, w)) in spatial_shapes.iter().enumerate() {
        // (B, Lq, heads, P, 2) -> x, y as (B, heads, Lq, P).
        let loc_l = loc.narrow(3, l, 1)?.squeeze(3)?.permute((0, 2, 1, 3, 4))?;
        let x = loc_l.narrow(4, 0, 1)?.squeeze(4)?.affine(w as f64, -0.5)?;
        let y = loc_l.narrow(4, 1, 1)?.squeeze(4)?.affine(h as f64, -0.5)?;
        let base = (&head_base + start as f64)?;
        let (rows, weights) = bilinear_taps(&x, &y, &base, h, w)?; // (B, heads, Lq, P, 4)
        let a = attn.narrow(3, l, 1)?.squeeze(3)?.permute((0, 2, 1, 3))?; // (B, heads, Lq, P)
        all_weights.push(weights.broadcast_mul(&a.unsqueeze(4)?)?);
        all_rows.push(rows);
        start += h * w;
    }
    let taps_per_query = n_levels * n_points * 4;
    let rows = Tensor::cat(&all_rows, 3)?.flatten_all()?;
    let weights = Tensor::cat(&all_weights, 3)?.reshape((b * heads * lq, taps_per_query, 1))?;
    let out = table
        .index_select(&rows, 0)?
        .reshape((b * heads * lq, taps_per_query, dh))?
        .broadcast_mul(&weights)?
        .sum(1)?; // (B*heads*Lq, dh)
    out.reshape((b, heads, lq, dh))?
        .permute((0, 2, 1, 3))?
        .reshape((b, lq, heads * dh))
}

/// `reference_points + offsets / offset_normalizer`, the normaliser being (w_l, h_l) per level:
/// `reference_points` (B, Lq, L, 2), `offsets` (B, Lq, heads, L, P, 2) in pixels of each level
/// -> normalised sampling locations (B, Lq, heads, L, P, 2). One pass on CPU.
pub fn sampling_locations(reference_points: &Tensor, offsets: &Tensor, spatial_shapes: &[(usize, usize)]) -> Result<Tensor> {
    let (b, lq, heads, l, points) = match *offsets.dims() {
        [b, lq, m, l, p, 2] if l == spatial_shapes.len() => (b, lq, m, l, p),
        _ => bail!(
            "sampling_locations: offsets must be (B, Lq, heads, L={}, P, 2), got {:?}",
            spatial_shapes.len(),
            offsets.shape()
        ),
    };
    if reference_points.dims() != [b, lq, l, 2] {
        bail!("sampling_locations: reference points must be (B={b}, Lq={lq}, L={l}, 2), got {:?}", reference_points.shape());
    }
    let dt = offsets.dtype();
    if crate::fastmath::fusable(offsets) {
        let op = kernel::SamplingLocations { heads, points, norms: spatial_shapes.iter().map(|&(h, w)| (w, h)).collect() };
        return reference_points.to_dtype(dt)?.contiguous()?.apply_op2(&offsets.contiguous()?, op);
    }
    let norm: Vec<f32> = spatial_shapes.iter().flat_map(|&(h, w)| [w as f32, h as f32]).collect();
    let norm = Tensor::from_vec(norm, (1, 1, 1, l, 1, 2), offsets.device())?.to_dtype(dt)?;
    reference_points.to_dtype(dt)?.reshape((b, lq, 1, l, 1, 2))?.broadcast_add(&offsets.broadcast_div(&norm)?)
}

/// Deformable-DETR's initial `sampling_offsets.bias`: head m's offsets point along the angle
/// 2πm/heads (scaled so the larger coordinate is 1), the i-th point `i + 1` times as far,
/// identical for every level. Shape (heads·levels·points·2,), f32.
///
/// `VarBuilder` init hints cannot express this, so training from scratch sets it explicitly
/// (e.g. `VarMap::set_one`); loaded checkpoints already contain it.
pub fn sampling_offsets_bias_init(
    n_heads: usize,
    n_levels: usize,
    n_points: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut v = Vec::with_capacity(n_heads * n_levels * n_points * 2);
    for m in 0..n_heads {
        // torch computes the angle and its cos/sin in f32.
        let theta = m as f32 * (2.0 * std::f32::consts::PI / n_heads as f32);
        let (cx, cy) = (theta.cos(), theta.sin());
        let norm = cx.abs().max(cy.abs());
        for _ in 0..n_levels {
            for p in 0..n_points {
                let k = (p + 1) as f32;
                v.push(cx / norm * k);
                v.push(cy / norm * k);
            }
        }
    }
    Tensor::from_vec(v, n_heads * n_levels * n_points * 2, device)
}

/// `layer` through the fused linear kernel ([`crate::nn::linear`]).
fn linear(x: &Tensor, layer: &Linear) -> Result<Tensor> {
    crate::nn::linear(x, layer.weight(), layer.bias())
}

/// Xavier-uniform init hint for a (fan_out, fan_in) weight.
fn xavier(fan_in: usize, fan_out: usize) -> Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Deformable-DETR `MSDeformAttn` (no padding mask).
#[derive(Debug, Clone)]
pub struct MSDeformAttn {
    sampling_offsets: Linear,
    attention_weights: Linear,
    value_proj: Linear,
    output_proj: Linear,
    d_model: usize,
    n_levels: usize,
    n_heads: usize,
    n_points: usize,
}

impl MSDeformAttn {
    /// Parameters `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`
    /// (each `weight`, `bias`). Missing-weight init hints follow Deformable-DETR except for the
    /// `sampling_offsets.bias` grid (see [`sampling_offsets_bias_init`]).
    pub fn new(
        d_model: usize,
        n_levels: usize,
        n_heads: usize,
        n_points: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if n_heads == 0 || d_model % n_heads != 0 || n_levels == 0 || n_points == 0 {
            bail!(
                "MSDeformAttn: d_model {d_model} must be divisible by n_heads {n_heads}, and levels/points must be positive"
            );
        }
        let zeros = Init::Const(0.0);
        let lin = |name: &str, n_in: usize, n_out: usize, w_init: Init| -> Result<Linear> {
            let vb = vb.pp(name);
            let w = vb.get_with_hints((n_out, n_in), "weight", w_init)?;
            let b = vb.get_with_hints(n_out, "bias", zeros)?;
            Ok(Linear::new(w, Some(b)))
        };
        let n_off = n_heads * n_levels * n_points;
        Ok(Self {
            sampling_offsets: lin("sampling_offsets", d_model, n_off * 2, zeros)?,
            attention_weights: lin("attention_weights", d_model, n_off, zeros)?,
            value_proj: lin("value_proj", d_model, d_model, xavier(d_model, d_model))?,
            output_proj: lin("output_proj", d_model, d_model, xavier(d_model, d_model))?,
            d_model,
            n_levels,
            n_heads,
            n_points,
        })
    }

    /// - `query`: (B, Lq, C), `reference_points`: (B, Lq, L, 2) normalised (x, y) in [0, 1];
    /// - `input_flatten`: (B, S, C), the levels of `spatial_shapes` flattened and concatenated;
    ///
    /// returns (B, Lq, C). Sampling offsets are in pixels of each level (divided by (w_l, h_l)),
    /// attention weights are softmaxed over levels × points.
    pub fn forward(
        &self,
        query: &Tensor,
        reference_points: &Tensor,
        input_flatten: &Tensor,
        spatial_shapes: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (b, lq, c) = match query.dims() {
            &[b, lq, c] if c == self.d_model => (b, lq, c),
            _ => bail!(
                "MSDeformAttn: query must be (B, Lq, {}), got {:?}",
                self.d_model,
                query.shape()
            ),
        };
        let s = match input_flatten.dims() {
            &[ib, s, ic] if ib == b && ic == c => s,
            _ => bail!(
                "MSDeformAttn: input_flatten must be (B={b}, S, {c}), got {:?}",
                input_flatten.shape()
            ),
        };
        if spatial_shapes.len() != self.n_levels {
            bail!(
                "MSDeformAttn: {} spatial shapes given, module has {} levels",
                spatial_shapes.len(),
                self.n_levels
            );
        }
        if reference_points.dims() != [b, lq, self.n_levels, 2] {
            bail!(
                "MSDeformAttn: reference_points must be (B={b}, Lq={lq}, L={}, 2), got {:?}",
                self.n_levels,
                reference_points.shape()
            );
        }
        let (m, l, p) = (self.n_heads, self.n_levels, self.n_points);
        let value = linear(input_flatten, &self.value_proj)?.reshape((b, s, m, c / m))?;
        let offsets = linear(query, &self.sampling_offsets)?.reshape((b, lq, m, l, p, 2))?;
        let attn = softmax(&linear(query, &self.attention_weights)?.reshape((b, lq, m, l * p))?, 3)?
            .reshape((b, lq, m, l, p))?;
        let locations = sampling_locations(reference_points, &offsets, spatial_shapes)?;
        let out = ms_deform_attn_core(&value, spatial_shapes, &locations, &attn)?;
        linear(&out, &self.output_proj)
    }
}
