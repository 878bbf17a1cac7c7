//! Fast CPU convolution (NCHW, f32), plus the max-pool the ResNet stem needs.
//!
//! candle's stock CPU conv2d is several times slower than PyTorch on the backbone shapes, so
//! inference-only convolutions (the frozen backbone, BN already folded into weight + bias) go
//! through this module instead. All paths split the work into (image, group, pixel tile) or
//! (image, channel) tasks over rayon's pool, each gemm running single-threaded (this scales
//! better on 2 cores than the gemm's own splitting):
//!
//! - 1x1 stride 1, unpadded: gemm straight on the NCHW input (`W[Cout x Cin] * X[Cin x HW]`);
//! - 1x1 strided, unpadded: one subsampling gather, then the same;
//! - kxk with Cin/groups >= 16 on rows wide compared with the padding: kh*kw accumulating gemms
//!   over shifted views of a zero-padded (for strides, phase-split) copy of the input, no im2col;
//! - everything else dense or grouped: im2col of one pixel tile into a per-thread scratch that
//!   stays in L2 (column-phase split first when strided, so copies are contiguous), then gemm;
//! - depthwise (`groups == Cin == Cout`): a direct register-blocked kernel per plane;
//! - ungrouped stride-1 'same' 3×3 of 64 channels or more on maps of 32×32 and more: Winograd
//!   F(4×4, 3×3), 36 gemms on transformed tiles with 4× fewer multiply-adds, or F(2×2, 3×3)
//!   (`winograd.rs`; [`set_winograd_variant`] picks, [`set_winograd`] turns it off for the
//!   direct sums).
//!
//! Bias, residual add and activation are applied to each output tile right after the gemm wrote
//! it, while it is still in cache; outputs are never zero-filled first. The gemm is the `gemm`
//! crate 0.19 (the one candle links) with its AVX-512 kernels compiled in.
//!
//! Any other device or dtype falls back to candle's conv2d so CUDA builds keep working.
//!
//! Training: [`conv2d_trainable`] (stride 1, one group) and [`group_norm`] are candle custom ops
//! with analytic backwards built on the same kernels (see `train.rs`): dX is the forward kernel
//! on the flipped, transposed weights, dW one shifted gemm per tap and image.

mod depthwise;
mod gemm_path;
mod train;
mod winograd;

use candle_core::{DType, Device, Tensor};

/// Stride, explicit zero padding (top, bottom, left, right: asymmetric allowed for TF "SAME"),
/// dilation, groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvSpec {
    /// (vertical, horizontal)
    pub stride: (usize, usize),
    /// [top, bottom, left, right]
    pub padding: [usize; 4],
    /// (vertical, horizontal)
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl ConvSpec {
    /// PyTorch-style symmetric padding, no dilation, one group.
    pub fn same_as_torch(stride: usize, pad: usize) -> Self {
        Self {
            stride: (stride, stride),
            padding: [pad; 4],
            dilation: (1, 1),
            groups: 1,
        }
    }

    /// TensorFlow "SAME" padding for an input of `in_hw`: the output is `ceil(in / stride)` and
    /// an odd total padding puts the extra pixel at the bottom / right, as TF does.
    pub fn tf_same(
        in_hw: (usize, usize),
        k: (usize, usize),
        stride: usize,
        dilation: usize,
    ) -> Self {
        let total = |i: usize, k: usize| {
            let s = stride.max(1);
            let out = i.div_ceil(s);
            let needed = (out.saturating_sub(1)) * s + (k.saturating_sub(1)) * dilation + 1;
            needed.saturating_sub(i)
        };
        let ph = total(in_hw.0, k.0);
        let pw = total(in_hw.1, k.1);
        Self {
            stride: (stride, stride),
            padding: [ph / 2, ph - ph / 2, pw / 2, pw - pw / 2],
            dilation: (dilation, dilation),
            groups: 1,
        }
    }

    /// The same spec with `groups` groups (e.g. `groups = C` for a depthwise conv).
    pub fn with_groups(self, groups: usize) -> Self {
        Self { groups, ..self }
    }

    /// The same spec with dilation `d` on both axes.
    pub fn with_dilation(self, d: usize) -> Self {
        Self {
            dilation: (d, d),
            ..self
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    None,
    Relu,
    Relu6,
}

/// Every size a convolution needs, checked once against the tensors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub ho: usize,
    pub wo: usize,
    pub spec: ConvSpec,
}

impl Geometry {
    pub fn cin_g(&self) -> usize {
        self.cin / self.spec.groups
    }
    pub fn cout_g(&self) -> usize {
        self.cout / self.spec.groups
    }
    pub fn is_depthwise(&self) -> bool {
        self.spec.groups == self.cin && self.cout == self.cin
    }
}

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// Checks the spec and the weight shape; returns (cout, cin/groups, kh, kw).
fn check_weight(
    weight_dims: &[usize],
    spec: &ConvSpec,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let &[cout, cin_g, kh, kw] = weight_dims else {
        return Err(err(format!(
            "conv2d: weight must be (Cout, Cin/groups, kh, kw), got shape {weight_dims:?}"
        )));
    };
    if spec.stride.0 == 0 || spec.stride.1 == 0 {
        return Err(err(format!(
            "conv2d: stride must be >= 1, got {:?}",
            spec.stride
        )));
    }
    if spec.dilation.0 == 0 || spec.dilation.1 == 0 {
        return Err(err(format!(
            "conv2d: dilation must be >= 1, got {:?}",
            spec.dilation
        )));
    }
    if spec.groups == 0 {
        return Err(err("conv2d: groups must be >= 1".to_string()));
    }
    if cout == 0 || cin_g == 0 || kh == 0 || kw == 0 {
        return Err(err(format!(
            "conv2d: weight has an empty dimension: {weight_dims:?}"
        )));
    }
    if cout % spec.groups != 0 {
        return Err(err(format!(
            "conv2d: Cout = {cout} is not divisible by groups = {}",
            spec.groups
        )));
    }
    Ok((cout, cin_g, kh, kw))
}

fn geometry(
    x_dims: &[usize],
    weight_dims: &[usize],
    bias_dims: Option<&[usize]>,
    residual_dims: Option<&[usize]>,
    spec: ConvSpec,
) -> candle_core::Result<Geometry> {
    let (cout, cin_g, kh, kw) = check_weight(weight_dims, &spec)?;
    let &[n, cin, h, w] = x_dims else {
        return Err(err(format!(
            "conv2d: input must be (N, Cin, H, W), got shape {x_dims:?}"
        )));
    };
    if cin != cin_g * spec.groups {
        return Err(err(format!(
            "conv2d: input has {cin} channels but weight {weight_dims:?} with groups = {} expects {}",
            spec.groups,
            cin_g * spec.groups
        )));
    }
    if let Some(b) = bias_dims {
        if b != [cout] {
            return Err(err(format!(
                "conv2d: bias must have shape [{cout}], got {b:?}"
            )));
        }
    }
    let [pt, pb, pl, pr] = spec.padding;
    let ekh = (kh - 1) * spec.dilation.0 + 1;
    let ekw = (kw - 1) * spec.dilation.1 + 1;
    if h + pt + pb < ekh || w + pl + pr < ekw {
        return Err(err(format!(
            "conv2d: padded input {}x{} is smaller than the dilated kernel {ekh}x{ekw}",
            h + pt + pb,
            w + pl + pr
        )));
    }
    let ho = (h + pt + pb - ekh) / spec.stride.0 + 1;
    let wo = (w + pl + pr - ekw) / spec.stride.1 + 1;
    if let Some(r) = residual_dims {
        if r != [n, cout, ho, wo] {
            return Err(err(format!(
                "conv2d: residual must have the output shape {:?}, got {r:?}",
                [n, cout, ho, wo]
            )));
        }
    }
    Ok(Geometry {
        n,
        cin,
        h,
        w,
        cout,
        kh,
        kw,
        ho,
        wo,
        spec,
    })
}

/// Borrows the f32 data of a contiguous CPU tensor (None when it is not f32 on CPU).
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<Option<R>> {
    if !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32 {
        return Ok(None);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| err("conv2d: internal error, tensor not contiguous".to_string()))?;
    Ok(Some(f(&data[start..end])))
}

fn is_cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

fn check_same_kind(
    x: &Tensor,
    weight: &Tensor,
    residual: Option<&Tensor>,
) -> candle_core::Result<()> {
    if !x.device().same_device(weight.device()) {
        return Err(err(
            "conv2d: input and weight are on different devices".to_string()
        ));
    }
    if x.dtype() != weight.dtype() {
        return Err(err(format!(
            "conv2d: input dtype {:?} differs from weight dtype {:?}",
            x.dtype(),
            weight.dtype()
        )));
    }
    if let Some(r) = residual {
        if r.dtype() != x.dtype() || !r.device().same_device(x.device()) {
            return Err(err(
                "conv2d: residual must have the input's dtype and device".to_string(),
            ));
        }
    }
    Ok(())
}

/// The process-wide [`Winograd`] mode (0: not read from the environment yet).
static WINOGRAD: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// How eligible 3×3 convolutions run (see [`winograd`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winograd {
    /// Direct sums.
    Off,
    /// F(2×2, 3×3): 2.25× fewer multiply-adds, rounding within a few ulp of the direct sum.
    F2,
    /// F(4×4, 3×3): 4× fewer multiply-adds; its transforms scale by up to 8, so its rounding
    /// error is about ten times F(2×2)'s (1e-4 of the output scale against 8e-6).
    F4,
}

impl Winograd {
    fn code(self) -> u8 {
        match self {
            Winograd::Off => 1,
            Winograd::F2 => 2,
            Winograd::F4 => 3,
        }
    }
}

/// The Winograd variant eligible 3×3 convolutions use: [`Winograd::F4`] by default,
/// `MMFORMER_WINOGRAD=2` for F(2×2), `MMFORMER_WINOGRAD=0` (or [`set_winograd`]) for the direct
/// sums.
pub fn winograd() -> Winograd {
    use std::sync::atomic::Ordering;
    match WINOGRAD.load(Ordering::Relaxed) {
        1 => Winograd::Off,
        2 => Winograd::F2,
        3 => Winograd::F4,
        _ => {
            let mode = match std::env::var("MMFORMER_WINOGRAD").as_deref() {
                Ok("0") => Winograd::Off,
                Ok("2") => Winograd::F2,
                _ => Winograd::F4,
            };
            WINOGRAD.store(mode.code(), Ordering::Relaxed);
            mode
        }
    }
}

/// Whether eligible 3×3 convolutions run as Winograd at all (see [`winograd`]).
pub fn winograd_enabled() -> bool {
    winograd() != Winograd::Off
}

/// Sets the Winograd variant for the whole process (see [`winograd`]).
pub fn set_winograd_variant(mode: Winograd) {
    WINOGRAD.store(mode.code(), std::sync::atomic::Ordering::Relaxed);
}

/// Turns the Winograd path on (the default variant, [`Winograd::F4`]) or off for the whole
/// process.
pub fn set_winograd(on: bool) {
    set_winograd_variant(if on { Winograd::F4 } else { Winograd::Off });
}

/// Weights transformed for one Winograd variant.
struct WinogradWeights {
    variant: Winograd,
    u: Vec<f32>,
}

impl WinogradWeights {
    fn new(variant: Winograd, w: &[f32], cout: usize, cin: usize) -> Self {
        let u = match variant {
            Winograd::F4 => winograd::transform_weights::<winograd::F4>(w, cout, cin),
            _ => winograd::transform_weights::<winograd::F2>(w, cout, cin),
        };
        Self { variant, u }
    }
}

/// The fast path on raw slices. `w` is (Cout, Cin/groups * kh * kw) row-major; `taps`, if
/// given, the same weights tap-major (see [`gemm_path::tap_major`]); `wino`, if given, the
/// weights already transformed for a Winograd variant.
#[allow(clippy::too_many_arguments)]
fn run_cpu(
    x: &[f32],
    w: &[f32],
    taps: Option<&[f32]>,
    wino: Option<&WinogradWeights>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    geo: &Geometry,
    act: Activation,
) -> Vec<f32> {
    let mode = winograd();
    if mode != Winograd::Off && winograd::eligible(geo) {
        let owned;
        // The weights transformed at construction, unless the variant changed since.
        let u = match wino {
            Some(ww) if ww.variant == mode => &ww.u,
            _ => {
                owned = WinogradWeights::new(mode, w, geo.cout, geo.cin);
                &owned.u
            }
        };
        return match mode {
            Winograd::F4 => winograd::conv_winograd::<winograd::F4>(x, u, bias, residual, geo, act),
            _ => winograd::conv_winograd::<winograd::F2>(x, u, bias, residual, geo, act),
        };
    }
    if geo.is_depthwise() {
        depthwise::depthwise(x, w, bias, residual, geo, act)
    } else {
        gemm_path::conv_gemm(x, w, taps, bias, residual, geo, act)
    }
}

fn output_tensor(data: Vec<f32>, geo: &Geometry) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, (geo.n, geo.cout, geo.ho, geo.wo), &Device::Cpu)
}

/// Borrows x (and the residual) as f32 slices and runs the fast path.
#[allow(clippy::too_many_arguments)]
fn forward_cpu(
    x: &Tensor,
    w: &[f32],
    taps: Option<&[f32]>,
    wino: Option<&WinogradWeights>,
    bias: Option<&[f32]>,
    residual: Option<&Tensor>,
    geo: &Geometry,
    act: Activation,
) -> candle_core::Result<Tensor> {
    let out = with_cpu_f32(x, |xs| match residual {
        None => Ok(run_cpu(xs, w, taps, wino, bias, None, geo, act)),
        Some(r) => with_cpu_f32(r, |rs| run_cpu(xs, w, taps, wino, bias, Some(rs), geo, act))?
            .ok_or_else(|| err("conv2d: residual must be an f32 CPU tensor".to_string())),
    })?
    .ok_or_else(|| err("conv2d: input must be an f32 CPU tensor".to_string()))??;
    output_tensor(out, geo)
}

/// Candle's own conv2d plus bias / residual / activation, for non-CPU devices and non-f32 dtypes.
fn fallback(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: ConvSpec,
    act: Activation,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if spec.stride.0 != spec.stride.1 || spec.dilation.0 != spec.dilation.1 {
        return Err(err(format!(
            "conv2d: unequal strides {:?} / dilations {:?} are only supported for f32 on CPU",
            spec.stride, spec.dilation
        )));
    }
    let [pt, pb, pl, pr] = spec.padding;
    let (x, pad) = if pt == pb && pt == pl && pt == pr {
        (x.clone(), pt)
    } else {
        (x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?, 0)
    };
    let mut y = x.conv2d(weight, pad, spec.stride.0, spec.dilation.0, spec.groups)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
    }
    if let Some(r) = residual {
        y = (y + r)?;
    }
    let y = match act {
        Activation::None => y,
        Activation::Relu => y.relu()?,
        Activation::Relu6 => y.clamp(0f32, 6f32)?,
    };
    Ok(y.detach())
}

/// A convolution with frozen (pre-packed) weights, for inference-only modules like the backbone.
pub struct FrozenConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    spec: ConvSpec,
    /// Copied out once when f32 on CPU.
    packed: Option<Packed>,
}

/// What the CPU path needs besides the weight tensor itself (read in place, it is contiguous).
struct Packed {
    /// tap-major copy for the stride-1 shifted-gemm path (kxk, not depthwise)
    taps: Option<Vec<f32>>,
    /// Winograd-transformed weights (in the variant in effect at construction), for 3×3
    /// convolutions the Winograd path may take
    wino: Option<WinogradWeights>,
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for FrozenConv2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenConv2d")
            .field("weight", &self.weight.dims())
            .field("bias", &self.bias.is_some())
            .field("spec", &self.spec)
            .field("packed", &self.packed.is_some())
            .finish()
    }
}

impl FrozenConv2d {
    /// weight (Cout, Cin/groups, kh, kw), bias (Cout)
    pub fn new(weight: Tensor, bias: Option<Tensor>, spec: ConvSpec) -> candle_core::Result<Self> {
        let (cout, ..) = check_weight(weight.dims(), &spec)?;
        if let Some(b) = &bias {
            if b.dims() != [cout] {
                return Err(err(format!(
                    "conv2d: bias must have shape [{cout}], got {:?}",
                    b.dims()
                )));
            }
            if b.dtype() != weight.dtype() || !b.device().same_device(weight.device()) {
                return Err(err(
                    "conv2d: bias must have the weight's dtype and device".to_string()
                ));
            }
        }
        let weight = weight.detach().contiguous()?;
        let bias = bias.map(|b| b.detach());
        let packed = if is_cpu_f32(&weight) {
            let (_, cin_g, kh, kw) = weight.dims4()?;
            let depthwise = cin_g == 1 && cout == spec.groups;
            let taps = if kh * kw > 1 && !depthwise {
                let w = weight.flatten_all()?.to_vec1::<f32>()?;
                Some(gemm_path::tap_major(
                    &w,
                    spec.groups,
                    cout / spec.groups,
                    cin_g,
                    kh * kw,
                ))
            } else {
                None
            };
            let winograd_shape = kh == 3
                && kw == 3
                && spec.groups == 1
                && spec.stride == (1, 1)
                && spec.dilation == (1, 1)
                && spec.padding == [1; 4]
                && cin_g >= winograd::MIN_CHANNELS
                && cout >= winograd::MIN_CHANNELS;
            let mode = winograd();
            let wino = if winograd_shape && mode != Winograd::Off {
                Some(WinogradWeights::new(mode, &weight.flatten_all()?.to_vec1::<f32>()?, cout, cin_g))
            } else {
                None
            };
            let b = bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
            Some(Packed { taps, wino, bias: b })
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            spec,
            packed,
        })
    }

    pub fn spec(&self) -> ConvSpec {
        self.spec
    }

    /// (Cout, Cin/groups, kh, kw)
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// x (N, Cin, H, W) -> (N, Cout, Ho, Wo); act applied after bias and after adding `residual`
    /// (N, Cout, Ho, Wo) if given: out = act(conv(x) + bias + residual)
    pub fn forward(
        &self,
        x: &Tensor,
        act: Activation,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        check_same_kind(x, &self.weight, residual)?;
        let geo = geometry(
            x.dims(),
            self.weight.dims(),
            None,
            residual.map(|r| r.dims()),
            self.spec,
        )?;
        match &self.packed {
            Some(p) => with_cpu_f32(&self.weight, |ws| {
                forward_cpu(
                    x,
                    ws,
                    p.taps.as_deref(),
                    p.wino.as_ref(),
                    p.bias.as_deref(),
                    residual,
                    &geo,
                    act,
                )
            })?
            .ok_or_else(|| err("conv2d: internal error, weight left the CPU".to_string()))?,
            None => fallback(
                x,
                &self.weight,
                self.bias.as_ref(),
                self.spec,
                act,
                residual,
            ),
        }
    }
}

/// One-shot functional form (no pre-packing).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: ConvSpec,
    act: Activation,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    check_same_kind(x, weight, residual)?;
    if let Some(b) = bias {
        if b.dtype() != weight.dtype() || !b.device().same_device(weight.device()) {
            return Err(err(
                "conv2d: bias must have the weight's dtype and device".to_string()
            ));
        }
    }
    let geo = geometry(
        x.dims(),
        weight.dims(),
        bias.map(|b| b.dims()),
        residual.map(|r| r.dims()),
        spec,
    )?;
    if !is_cpu_f32(x) {
        return fallback(x, weight, bias, spec, act, residual);
    }
    with_cpu_f32(weight, |ws| match bias {
        None => forward_cpu(x, ws, None, None, None, residual, &geo, act),
        Some(b) => with_cpu_f32(b, |bs| {
            forward_cpu(x, ws, None, None, Some(bs), residual, &geo, act)
        })?
        .ok_or_else(|| err("conv2d: bias must be an f32 CPU tensor".to_string()))?,
    })?
    .ok_or_else(|| err("conv2d: weight must be an f32 CPU tensor".to_string()))?
}

/// A differentiable convolution, stride 1, no dilation, one group, zero padding
/// `[top, bottom, left, right]` (each smaller than the kernel side), optional bias:
/// x (N, Cin, H, W), weight (Cout, Cin, kh, kw), bias (Cout) ->
/// (N, Cout, H + top + bottom - kh + 1, W + left + right - kw + 1).
///
/// f32 on CPU runs the fast kernels forward and backward (f64 runs reference loops, for gradient
/// checks); gradients reach `x`, `weight` and `bias` when they track. Elsewhere, candle's conv2d.
pub fn conv2d_trainable(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: [usize; 4],
) -> candle_core::Result<Tensor> {
    check_same_kind(x, weight, None)?;
    if let Some(b) = bias {
        if b.dtype() != weight.dtype() || !b.device().same_device(weight.device()) {
            return Err(err("conv2d: bias must have the weight's dtype and device".to_string()));
        }
    }
    let spec = ConvSpec { stride: (1, 1), padding, dilation: (1, 1), groups: 1 };
    geometry(x.dims(), weight.dims(), bias.map(|b| b.dims()), None, spec)?;
    if train::supported(x, weight, padding) {
        let (x, w) = (x.contiguous()?, weight.contiguous()?);
        return match bias {
            None => x.apply_op2(&w, train::ConvOp { padding }),
            Some(b) => x.apply_op3(&w, &b.contiguous()?, train::ConvBiasOp { padding }),
        };
    }
    if !x.device().is_cpu() && conv_by_matmul() {
        return conv2d_by_matmul(x, weight, bias, padding);
    }
    let [pt, pb, pl, pr] = padding;
    let (x, pad) = if pt == pb && pt == pl && pt == pr {
        (x.clone(), pt)
    } else {
        (x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?, 0)
    };
    let y = x.conv2d(weight, pad, 1, 1, 1)?;
    match bias {
        None => Ok(y),
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
    }
}

static CONV_BY_MATMUL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Whether [`conv2d_trainable`] runs as [`conv2d_by_matmul`] off the CPU (default; `false` uses
/// candle's conv2d): [`set_conv_by_matmul`]'s choice, else `MMFORMER_CONV_MATMUL=0` turns it off.
pub fn conv_by_matmul() -> bool {
    match CONV_BY_MATMUL.load(std::sync::atomic::Ordering::Relaxed) {
        0 => false,
        1 => true,
        _ => std::env::var("MMFORMER_CONV_MATMUL").as_deref() != Ok("0"),
    }
}

/// Chooses how trainable convolutions run off the CPU, for the whole process.
pub fn set_conv_by_matmul(on: bool) {
    CONV_BY_MATMUL.store(u8::from(on), std::sync::atomic::Ordering::Relaxed);
}

/// [`conv2d_trainable`] as kh·kw matrix products, one per kernel tap, over shifted views of the
/// padded input: `y = Σ_taps W[:, :, dy, dx] · x_pad[:, :, dy.., dx..]`. Forward and backward are
/// then cuBLAS products (candle's CUDA convolution backward runs a direct transposed-convolution
/// kernel, far slower on the pixel decoder's 256-channel maps). Used off the CPU.
pub fn conv2d_by_matmul(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: [usize; 4],
) -> candle_core::Result<Tensor> {
    let (n, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    let [pt, pb, pl, pr] = padding;
    if wcin != cin || h + pt + pb < kh || w + pl + pr < kw {
        return Err(err(format!("conv2d: input {:?} does not fit weight {:?} with padding {padding:?}", x.dims(), weight.dims())));
    }
    let (ho, wo) = (h + pt + pb - kh + 1, w + pl + pr - kw + 1);
    let xp = if padding == [0; 4] { x.clone() } else { x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)? };
    let mut acc: Option<Tensor> = None;
    for dy in 0..kh {
        for dx in 0..kw {
            let tap = if kh == 1 && kw == 1 { xp.clone() } else { xp.narrow(2, dy, ho)?.narrow(3, dx, wo)? };
            let tap = tap.contiguous()?.reshape((n, cin, ho * wo))?;
            let wt = weight.narrow(2, dy, 1)?.narrow(3, dx, 1)?.reshape((1, cout, cin))?;
            let y = wt.broadcast_as((n, cout, cin))?.contiguous()?.matmul(&tap)?; // (N, Cout, Ho·Wo)
            acc = Some(match acc {
                None => y,
                Some(a) => (a + y)?,
            });
        }
    }
    let y = acc.expect("a kernel has at least one tap").reshape((n, cout, ho, wo))?;
    match bias {
        None => Ok(y),
        Some(b) => y.broadcast_add(&b.reshape((1, cout, 1, 1))?),
    }
}

/// `torch.nn.GroupNorm(groups, C, eps)` with affine `weight` and `bias` (C) on x (B, C, H, W),
/// differentiable in all three. f32/f64 on CPU: one fused op (f64-accumulated statistics,
/// analytic backward); elsewhere composed from candle ops.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let &[b, c, h, w] = x.dims() else {
        return Err(err(format!("group_norm: expected a (B, C, H, W) input, got {:?}", x.dims())));
    };
    if groups == 0 || c % groups != 0 || weight.dims() != [c] || bias.dims() != [c] {
        return Err(err(format!(
            "group_norm: {c} channels in {groups} groups with weight {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        )));
    }
    let same = x.dtype() == weight.dtype() && x.dtype() == bias.dtype();
    if x.device().is_cpu() && same && matches!(x.dtype(), DType::F32 | DType::F64) {
        let op = train::GroupNormOp { groups, eps };
        return x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op);
    }
    let xg = x.reshape((b, groups, (c / groups) * h * w))?;
    let mean = xg.mean_keepdim(2)?;
    let centered = xg.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((b, c, h, w))?
        .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)
}

/// Applies `act(v + bias + residual)` to one output row segment: the fused epilogue shared by
/// the gemm and depthwise paths.
#[inline]
pub(crate) fn epilogue(out: &mut [f32], bias: f32, residual: Option<&[f32]>, act: Activation) {
    // Each arm is a separate branch-free loop so the compiler vectorises it.
    match (residual, act) {
        (None, Activation::None) => out.iter_mut().for_each(|v| *v += bias),
        (None, Activation::Relu) => out.iter_mut().for_each(|v| *v = (*v + bias).max(0.0)),
        (None, Activation::Relu6) => out
            .iter_mut()
            .for_each(|v| *v = (*v + bias).clamp(0.0, 6.0)),
        (Some(r), Activation::None) => out.iter_mut().zip(r).for_each(|(v, r)| *v += bias + r),
        (Some(r), Activation::Relu) => out
            .iter_mut()
            .zip(r)
            .for_each(|(v, r)| *v = (*v + bias + r).max(0.0)),
        (Some(r), Activation::Relu6) => out
            .iter_mut()
            .zip(r)
            .for_each(|(v, r)| *v = (*v + bias + r).clamp(0.0, 6.0)),
    }
}

// The conv kernels hand each task a disjoint region of the output buffer.
pub(crate) use crate::util::SyncPtr;

/// Max pooling with PyTorch semantics (`nn.MaxPool2d(kernel, stride, padding)`, padding never
/// wins the max, floor output size): x (N, C, H, W) -> (N, C, Ho, Wo). The ResNet stem pool is
/// `max_pool2d(x, 3, 2, 1)`. f32 on CPU runs a direct kernel parallel over planes (candle's own
/// pool has no padding and is several times slower); anything else falls back to candle ops.
/// Unlike torch, NaN inputs are not propagated on the fast path (f32::max skips them).
pub fn max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let &[n, c, h, w] = x.dims() else {
        return Err(err(format!(
            "max_pool2d: input must be (N, C, H, W), got shape {:?}",
            x.dims()
        )));
    };
    if kernel == 0 || stride == 0 {
        return Err(err(format!(
            "max_pool2d: kernel ({kernel}) and stride ({stride}) must be >= 1"
        )));
    }
    if 2 * padding > kernel {
        return Err(err(format!(
            "max_pool2d: padding {padding} must be at most half the kernel {kernel}"
        )));
    }
    if h + 2 * padding < kernel || w + 2 * padding < kernel {
        return Err(err(format!(
            "max_pool2d: padded input {}x{} is smaller than the kernel {kernel}",
            h + 2 * padding,
            w + 2 * padding
        )));
    }
    let ho = (h + 2 * padding - kernel) / stride + 1;
    let wo = (w + 2 * padding - kernel) / stride + 1;
    if !is_cpu_f32(x) {
        // -inf borders keep padding out of the max, then candle's unpadded pool.
        let x = if padding > 0 {
            let pad_h = Tensor::full(f32::NEG_INFINITY, (n, c, padding, w), x.device())?
                .to_dtype(x.dtype())?;
            let x = Tensor::cat(&[&pad_h, x, &pad_h], 2)?;
            let pad_w = Tensor::full(
                f32::NEG_INFINITY,
                (n, c, h + 2 * padding, padding),
                x.device(),
            )?
            .to_dtype(x.dtype())?;
            Tensor::cat(&[&pad_w, &x, &pad_w], 3)?
        } else {
            x.clone()
        };
        let y = x.max_pool2d_with_stride(kernel, stride)?;
        // candle may produce a different size when (H + 2p - k) is not a multiple of the stride.
        return Ok(y.narrow(2, 0, ho)?.narrow(3, 0, wo)?.detach());
    }
    let out = with_cpu_f32(x, |xs| {
        use rayon::prelude::*;
        let mut out = vec![0f32; n * c * ho * wo];
        let pw = w.div_ceil(stride);
        out.par_chunks_mut(ho * wo)
            .zip(xs.par_chunks(h * w))
            .for_each_init(
                || (vec![0f32; stride * pw], vec![0f32; h * wo]),
                |(phases, hmax), (o, plane)| {
                    // Horizontal max of every input row, over the column phases so each tap is a
                    // contiguous, vectorisable max; then the vertical max over rows.
                    for (row, hm) in plane.chunks_exact(w).zip(hmax.chunks_exact_mut(wo)) {
                        let src_row: &[f32] = if stride == 1 {
                            row
                        } else {
                            for p in 0..stride {
                                let dst = &mut phases[p * pw..(p + 1) * pw];
                                dst.iter_mut()
                                    .zip(row.iter().skip(p).step_by(stride))
                                    .for_each(|(d, v)| *d = *v);
                            }
                            phases
                        };
                        hm.fill(f32::NEG_INFINITY);
                        for kx in 0..kernel {
                            let off = kx as isize - padding as isize;
                            let (lo, hi) = gemm_path::valid_range(off, stride, w, wo);
                            let phase = off.rem_euclid(stride as isize) as usize;
                            let start =
                                (lo as isize + (off - phase as isize) / stride as isize) as usize;
                            let src = &src_row[phase * pw + start..][..hi - lo];
                            hm[lo..hi]
                                .iter_mut()
                                .zip(src)
                                .for_each(|(m, v)| *m = m.max(*v));
                        }
                    }
                    for (oy, orow) in o.chunks_exact_mut(wo).enumerate() {
                        orow.fill(f32::NEG_INFINITY);
                        let y0 = (oy * stride).saturating_sub(padding);
                        let y1 = (oy * stride + kernel - padding).min(h);
                        for hm in hmax.chunks_exact(wo).take(y1).skip(y0) {
                            orow.iter_mut().zip(hm).for_each(|(m, v)| *m = m.max(*v));
                        }
                    }
                },
            );
        out
    })?
    .ok_or_else(|| err("max_pool2d: input must be an f32 CPU tensor".to_string()))?;
    Tensor::from_vec(out, (n, c, ho, wo), &Device::Cpu)
}
