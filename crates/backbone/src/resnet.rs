//! ResNet-50 as the official MM-Former V1 code builds it: detectron2 `build_resnet_backbone` with
//! a basic stem, torchvision-style bottlenecks (`STRIDE_IN_1X1 False`: the stride sits on the 3×3
//! conv), FrozenBN (eps 1e-5) folded into the convs, no dilation, blocks [3, 4, 6, 3].

use std::path::Path;

use candle_core::{Device, Tensor};
use ops::conv::{Activation, ConvSpec, FrozenConv2d};

use crate::error::{BackboneError, Result};
use crate::frozen::conv_norm;
use crate::names::{resnet50_state_dict, RESNET50_BLOCKS};
use crate::weights::{StateDict, Weights};
use crate::{check_input, Backbone, Features};

#[derive(Clone, Debug, PartialEq)]
pub struct ResNetConfig {
    /// Bottleneck blocks per stage res2..res5.
    pub blocks: [usize; 4],
    /// Stem output channels (`STEM_OUT_CHANNELS`).
    pub stem_out: usize,
    /// Bottleneck width of res2 (`WIDTH_PER_GROUP`); doubles per stage.
    pub width: usize,
    /// res2 output channels (`RES2_OUT_CHANNELS`); doubles per stage.
    pub res2_out: usize,
    /// FrozenBN epsilon.
    pub bn_eps: f64,
}

impl ResNetConfig {
    /// detectron2 R-50 (`RESNETS.DEPTH 50`) as in the V1 configs.
    pub fn r50() -> Self {
        Self {
            blocks: RESNET50_BLOCKS,
            stem_out: 64,
            width: 64,
            res2_out: 256,
            bn_eps: 1e-5,
        }
    }

    /// Output channels of res2..res5.
    pub fn channels(&self) -> [usize; 4] {
        [0, 1, 2, 3].map(|s| self.res2_out << s)
    }
}

/// 7×7/2 conv (pad 3) + FrozenBN + ReLU, then 3×3/2 max pool (pad 1).
#[derive(Debug)]
pub struct BasicStem {
    conv1: FrozenConv2d,
}

impl BasicStem {
    pub fn new(cfg: &ResNetConfig, vb: Weights) -> Result<Self> {
        let conv = vb.pp("conv1");
        let conv1 = conv_norm(
            &conv,
            &conv.pp("norm"),
            [cfg.stem_out, 3, 7, 7],
            ConvSpec::same_as_torch(2, 3),
            cfg.bn_eps,
        )?;
        Ok(Self { conv1 })
    }

    /// (B, 3, H, W) → (B, 64, ⌈H/4⌉, ⌈W/4⌉)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward(x, Activation::Relu, None)?;
        Ok(ops::conv::max_pool2d(&x, 3, 2, 1)?)
    }
}

/// torchvision bottleneck: 1×1 → 3×3 (stride) → 1×1, each conv with FrozenBN, ReLU after the
/// residual sum; a 1×1 projection shortcut (with the stride) when the shape changes.
#[derive(Debug)]
pub struct BottleneckBlock {
    conv1: FrozenConv2d,
    conv2: FrozenConv2d,
    conv3: FrozenConv2d,
    shortcut: Option<FrozenConv2d>,
}

impl BottleneckBlock {
    pub fn new(
        cin: usize,
        width: usize,
        cout: usize,
        stride: usize,
        eps: f64,
        vb: Weights,
    ) -> Result<Self> {
        let cn = |name: &str, shape: [usize; 4], spec: ConvSpec| {
            let conv = vb.pp(name);
            conv_norm(&conv, &conv.pp("norm"), shape, spec, eps)
        };
        let conv1 = cn("conv1", [width, cin, 1, 1], ConvSpec::same_as_torch(1, 0))?;
        let conv2 = cn(
            "conv2",
            [width, width, 3, 3],
            ConvSpec::same_as_torch(stride, 1),
        )?;
        let conv3 = cn("conv3", [cout, width, 1, 1], ConvSpec::same_as_torch(1, 0))?;
        let shortcut = if cin != cout || stride != 1 {
            Some(cn(
                "shortcut",
                [cout, cin, 1, 1],
                ConvSpec::same_as_torch(stride, 0),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            conv2,
            conv3,
            shortcut,
        })
    }

    /// (B, Cin, H, W) → (B, Cout, H/stride, W/stride)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(x, Activation::Relu, None)?;
        let y = self.conv2.forward(&y, Activation::Relu, None)?;
        let shortcut = match &self.shortcut {
            Some(s) => s.forward(x, Activation::None, None)?,
            None => x.clone(),
        };
        Ok(self.conv3.forward(&y, Activation::Relu, Some(&shortcut))?)
    }
}

/// The frozen R-50 backbone: res2..res5 at strides 4/8/16/32.
#[derive(Debug)]
pub struct ResNet50 {
    cfg: ResNetConfig,
    stem: BasicStem,
    /// res2..res5
    stages: Vec<Vec<BottleneckBlock>>,
}

impl ResNet50 {
    /// Builds the model from weights under official names relative to the backbone
    /// (`stem.conv1.weight`, `res2.0.conv1.norm.running_mean`, …); pass `vb.pp("backbone")` for
    /// a full MM-Former state dict.
    pub fn new(cfg: &ResNetConfig, vb: Weights) -> Result<Self> {
        let stem = BasicStem::new(cfg, vb.pp("stem"))?;
        let mut stages = Vec::with_capacity(4);
        let mut cin = cfg.stem_out;
        for (s, &n) in cfg.blocks.iter().enumerate() {
            let (width, cout) = (cfg.width << s, cfg.res2_out << s);
            let first_stride = if s == 0 { 1 } else { 2 };
            let stage_vb = vb.pp(format!("res{}", s + 2));
            let mut blocks = Vec::with_capacity(n);
            for b in 0..n {
                let stride = if b == 0 { first_stride } else { 1 };
                blocks.push(BottleneckBlock::new(
                    cin,
                    width,
                    cout,
                    stride,
                    cfg.bn_eps,
                    stage_vb.pp(b),
                )?);
                cin = cout;
            }
            stages.push(blocks);
        }
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            stages,
        })
    }

    /// From a weight file in any layout (torchvision `.pth`, MM-Former checkpoint, or our
    /// safetensors; see [`crate::names`]).
    /// Weights go to `device`.
    pub fn from_file(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_state_dict(StateDict::read(path, device)?)
    }

    /// From tensors already read (any of the three layouts).
    pub fn from_state_dict(sd: StateDict) -> Result<Self> {
        Self::new(
            &ResNetConfig::r50(),
            Weights::from_state_dict(resnet50_state_dict(sd)?),
        )
    }

    /// Deterministic synthetic weights (for timing without a weight file).
    pub fn synthetic(seed: u64, device: &Device) -> Result<Self> {
        Self::new(&ResNetConfig::r50(), Weights::synthetic(seed, device))
    }

    /// [`Self::synthetic`] and the weights it drew, under the names a weight file of this
    /// model uses (so that a synthetic model can be written out and read back).
    pub fn synthetic_with_weights(seed: u64, device: &Device) -> Result<(Self, std::collections::HashMap<String, Tensor>)> {
        let (w, record) = Weights::synthetic_recorded(seed, device);
        let model = Self::new(&ResNetConfig::r50(), w)?;
        Ok((model, record.tensors()))
    }

    /// Writes [`Self::synthetic`]'s weights to `path` under this model's weight-file names
    /// (safetensors, through a temporary file and a rename): a stand-in ResNet-50 file for the
    /// checks and benches, where real weights cannot be had.
    pub fn save_synthetic(seed: u64, path: &Path) -> Result<()> {
        // Drawn on the host: the values only go to a file, and the same seed gives the same
        // file whatever device will load it.
        let (_, tensors) = Self::synthetic_with_weights(seed, &Device::Cpu)?;
        let tmp = path.with_extension("safetensors.tmp");
        crate::weights::write_safetensors(&tensors, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|source| BackboneError::Io { file: path.to_path_buf(), source })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }
}

impl Backbone for ResNet50 {
    fn channels(&self) -> [usize; 4] {
        self.cfg.channels()
    }

    fn feature_names(&self) -> [&'static str; 4] {
        ["res2", "res3", "res4", "res5"]
    }

    /// (B, 3, H, W) normalised → res2..res5: (B, 256, H/4, W/4), (B, 512, H/8, W/8),
    /// (B, 1024, H/16, W/16), (B, 2048, H/32, W/32) (sizes rounded up).
    fn forward(&self, x: &Tensor) -> Result<Features> {
        check_input(x)?;
        let mut x = self.stem.forward(x)?;
        let mut outs = Vec::with_capacity(4);
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x)?;
            }
            outs.push(x.clone());
        }
        let [res2, res3, res4, res5]: [Tensor; 4] = outs
            .try_into()
            .map_err(|_| BackboneError::Input("the model has no four stages".into()))?;
        Ok(Features {
            res2,
            res3,
            res4,
            res5,
        })
    }
}
