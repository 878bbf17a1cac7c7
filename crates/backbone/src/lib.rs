//! Frozen image backbones (ResNet-50 as in the official V1 code, EfficientNet-Lite0) and the
//! readers for every weight format users have: torchvision/official `.pth` (zip and legacy pickle)
//! and our own safetensors.
//!
//! - [`Backbone`]: a normalised f32 (B, 3, H, W) batch in, [`Features`] at strides 4/8/16/32 out.
//! - [`ResNet50`], [`EfficientNetLite0`]: `new(cfg, vb)`, `from_file(path, &device)`,
//!   `synthetic(seed, &device)`.
//! - [`StateDict`] reads weight files; [`Weights`] is the `vb` the models are built from (a
//!   state dict, any candle `VarBuilder`, or synthetic values); [`names`] maps torchvision and
//!   official ResNet names.
//! - [`preprocess`]: uint8 RGB → normalised, padded model input.
//!
//! Everything is inference-only: batch norms are folded into the convs at load and the outputs
//! carry no autograd graph.

pub mod assets;
pub mod efficientnet;
mod error;
mod frozen;
pub mod names;
pub mod preprocess;
pub mod resnet;
pub mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use efficientnet::{EfficientNetConfig, EfficientNetLite0};
pub use error::{BackboneError, Result};
pub use preprocess::{preprocess, preprocess_hwc};
pub use resnet::{ResNet50, ResNetConfig};
pub use weights::{StateDict, SyntheticRecord, Weights};

/// Feature maps at strides 4, 8, 16 and 32 (named after the ResNet stages whatever the model).
#[derive(Clone, Debug)]
pub struct Features {
    /// (B, C2, H/4, W/4)
    pub res2: Tensor,
    /// (B, C3, H/8, W/8)
    pub res3: Tensor,
    /// (B, C4, H/16, W/16)
    pub res4: Tensor,
    /// (B, C5, H/32, W/32)
    pub res5: Tensor,
}

impl Features {
    /// res2..res5 in stride order.
    pub fn as_array(&self) -> [&Tensor; 4] {
        [&self.res2, &self.res3, &self.res4, &self.res5]
    }
}

/// A frozen image backbone.
pub trait Backbone: Send + Sync {
    /// Channels of res2..res5.
    fn channels(&self) -> [usize; 4];

    /// The model's own names for the four outputs (e.g. `res2` or `blocks.2`).
    fn feature_names(&self) -> [&'static str; 4];

    /// (B, 3, H, W) f32 input normalised as by [`preprocess()`] → features at strides 4/8/16/32.
    fn forward(&self, x: &Tensor) -> Result<Features>;
}

/// Which backbone to build (for command-line tools and benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackboneKind {
    ResNet50,
    EfficientNetLite0,
}

impl std::str::FromStr for BackboneKind {
    type Err = BackboneError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "resnet50" | "r50" => Ok(Self::ResNet50),
            "efficientnetlite0" | "effnetlite0" | "lite0" => Ok(Self::EfficientNetLite0),
            _ => Err(BackboneError::Input(format!(
                "unknown backbone `{s}` (resnet50 or efficientnet-lite0)"
            ))),
        }
    }
}

/// A backbone from a weight file, or with deterministic synthetic weights when `weights` is
/// None (for timing), on `device`.
pub fn load_backbone(kind: BackboneKind, weights: Option<&Path>, device: &Device) -> Result<Box<dyn Backbone>> {
    Ok(match (kind, weights) {
        (BackboneKind::ResNet50, Some(p)) => Box::new(ResNet50::from_file(p, device)?),
        (BackboneKind::ResNet50, None) => Box::new(ResNet50::synthetic(0, device)?),
        (BackboneKind::EfficientNetLite0, Some(p)) => Box::new(EfficientNetLite0::from_file(p, device)?),
        (BackboneKind::EfficientNetLite0, None) => Box::new(EfficientNetLite0::synthetic(0, device)?),
    })
}

/// Rejects what no backbone can take, before any kernel sees it.
pub(crate) fn check_input(x: &Tensor) -> Result<()> {
    match x.dims() {
        [b, 3, h, w] if *b > 0 && *h > 0 && *w > 0 => {}
        d => {
            return Err(BackboneError::Input(format!(
                "expected a (B, 3, H, W) image batch, got shape {d:?}"
            )))
        }
    }
    if x.dtype() != DType::F32 {
        return Err(BackboneError::Input(format!(
            "expected f32 input, got {:?}",
            x.dtype()
        )));
    }
    Ok(())
}
