//! EfficientNet-Lite0 in the `efficientnet_pytorch` layout (`_conv_stem`, `_bn0`,
//! `_blocks.N._expand_conv / _depthwise_conv / _project_conv / _bn{0,1,2}`, `_conv_head`, `_bn1`,
//! `_fc`), with the Lite changes: ReLU6, no squeeze-excitation, stem and head not scaled.
//! Convs use TensorFlow "SAME" padding (asymmetric at stride 2, so it depends on the input
//! size); batch norms (eps 1e-3) are folded into the convs at load.

use std::path::Path;

use candle_core::{Device, Tensor, D};
use ops::conv::{Activation, ConvSpec};

use crate::error::{BackboneError, Result};
use crate::frozen::fold_conv_norm;
use crate::weights::{StateDict, Weights};
use crate::{check_input, Backbone, Features};

/// One stage of MBConv blocks: (expand ratio, kernel, stride of its first block, output
/// channels, repeats).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageArgs {
    pub expand: usize,
    pub kernel: usize,
    pub stride: usize,
    pub out: usize,
    pub repeats: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EfficientNetConfig {
    pub stem_out: usize,
    pub stages: Vec<StageArgs>,
    pub head_out: usize,
    pub num_classes: usize,
    pub bn_eps: f64,
    /// Blocks whose outputs are the stride-4/8/16/32 features.
    pub taps: [usize; 4],
}

impl EfficientNetConfig {
    pub fn lite0() -> Self {
        let s = |expand, kernel, stride, out, repeats| StageArgs {
            expand,
            kernel,
            stride,
            out,
            repeats,
        };
        Self {
            stem_out: 32,
            stages: vec![
                s(1, 3, 1, 16, 1),
                s(6, 3, 2, 24, 2),
                s(6, 5, 2, 40, 2),
                s(6, 3, 2, 80, 3),
                s(6, 5, 1, 112, 3),
                s(6, 5, 2, 192, 4),
                s(6, 3, 1, 320, 1),
            ],
            head_out: 1280,
            num_classes: 1000,
            bn_eps: 1e-3,
            taps: [2, 4, 10, 15],
        }
    }

    /// (cin, expand, kernel, stride, cout) of every block, in order.
    fn blocks(&self) -> Vec<(usize, usize, usize, usize, usize)> {
        let mut v = Vec::new();
        let mut cin = self.stem_out;
        for st in &self.stages {
            for r in 0..st.repeats {
                v.push((
                    cin,
                    st.expand,
                    st.kernel,
                    if r == 0 { st.stride } else { 1 },
                    st.out,
                ));
                cin = st.out;
            }
        }
        v
    }
}

/// A conv with its batch norm folded in, padded TF-"SAME" for whatever input it gets.
#[derive(Debug)]
struct SameConv {
    /// (Cout, Cin/groups, k, k)
    weight: Tensor,
    /// (Cout)
    bias: Tensor,
    kernel: usize,
    stride: usize,
    groups: usize,
}

impl SameConv {
    fn new(
        conv: &Weights,
        norm: &Weights,
        shape: [usize; 4],
        stride: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let (weight, bias) = fold_conv_norm(conv, norm, shape, eps)?;
        Ok(Self {
            weight,
            bias,
            kernel: shape[2],
            stride,
            groups,
        })
    }

    /// (B, Cin, H, W) → (B, Cout, ⌈H/stride⌉, ⌈W/stride⌉)
    fn forward(&self, x: &Tensor, act: Activation, residual: Option<&Tensor>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        // The padding depends on the input size (odd total goes bottom / right), so the spec is
        // made per call; the weights are borrowed, not repacked.
        let spec = ConvSpec::tf_same((h, w), (self.kernel, self.kernel), self.stride, 1)
            .with_groups(self.groups);
        Ok(ops::conv::conv2d(
            x,
            &self.weight,
            Some(&self.bias),
            spec,
            act,
            residual,
        )?)
    }
}

/// Inverted residual: [1×1 expand + BN + ReLU6] → k×k depthwise + BN + ReLU6 → 1×1 project +
/// BN, plus the input when the stride is 1 and the channels match.
#[derive(Debug)]
pub struct MbConvBlock {
    expand: Option<SameConv>,
    depthwise: SameConv,
    project: SameConv,
    residual: bool,
}

impl MbConvBlock {
    pub fn new(
        cin: usize,
        expand: usize,
        kernel: usize,
        stride: usize,
        cout: usize,
        eps: f64,
        vb: Weights,
    ) -> Result<Self> {
        let mid = cin * expand;
        // Without expansion efficientnet_pytorch has no `_bn0` in the block; the names stay.
        let expand_conv = if expand != 1 {
            Some(SameConv::new(
                &vb.pp("_expand_conv"),
                &vb.pp("_bn0"),
                [mid, cin, 1, 1],
                1,
                1,
                eps,
            )?)
        } else {
            None
        };
        let depthwise = SameConv::new(
            &vb.pp("_depthwise_conv"),
            &vb.pp("_bn1"),
            [mid, 1, kernel, kernel],
            stride,
            mid,
            eps,
        )?;
        let project = SameConv::new(
            &vb.pp("_project_conv"),
            &vb.pp("_bn2"),
            [cout, mid, 1, 1],
            1,
            1,
            eps,
        )?;
        Ok(Self {
            expand: expand_conv,
            depthwise,
            project,
            residual: stride == 1 && cin == cout,
        })
    }

    /// (B, Cin, H, W) → (B, Cout, ⌈H/stride⌉, ⌈W/stride⌉)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.expand {
            Some(e) => e.forward(x, Activation::Relu6, None)?,
            None => x.clone(),
        };
        let y = self.depthwise.forward(&y, Activation::Relu6, None)?;
        self.project
            .forward(&y, Activation::None, self.residual.then_some(x))
    }
}

/// EfficientNet-Lite0 with its ImageNet classifier; as a [`Backbone`] it gives the outputs of
/// blocks 2/4/10/15 (24/40/112/320 channels at strides 4/8/16/32).
#[derive(Debug)]
pub struct EfficientNetLite0 {
    cfg: EfficientNetConfig,
    stem: SameConv,
    blocks: Vec<MbConvBlock>,
    head: SameConv,
    /// (num_classes, head_out)
    fc_weight: Tensor,
    /// (num_classes)
    fc_bias: Tensor,
}

impl EfficientNetLite0 {
    pub fn new(cfg: &EfficientNetConfig, vb: Weights) -> Result<Self> {
        let eps = cfg.bn_eps;
        let stem = SameConv::new(
            &vb.pp("_conv_stem"),
            &vb.pp("_bn0"),
            [cfg.stem_out, 3, 3, 3],
            2,
            1,
            eps,
        )?;
        let specs = cfg.blocks();
        let blocks_vb = vb.pp("_blocks");
        let blocks = specs
            .iter()
            .enumerate()
            .map(|(i, &(cin, e, k, s, cout))| {
                MbConvBlock::new(cin, e, k, s, cout, eps, blocks_vb.pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let last = specs.last().map_or(cfg.stem_out, |b| b.4);
        let head = SameConv::new(
            &vb.pp("_conv_head"),
            &vb.pp("_bn1"),
            [cfg.head_out, last, 1, 1],
            1,
            1,
            eps,
        )?;
        let fc_weight = vb
            .pp("_fc")
            .get(&[cfg.num_classes, cfg.head_out], "weight")?
            .detach();
        let fc_bias = vb.pp("_fc").get(&[cfg.num_classes], "bias")?.detach();
        if cfg.taps.iter().any(|&t| t >= blocks.len()) {
            return Err(BackboneError::Input(format!(
                "feature taps {:?} beyond {} blocks",
                cfg.taps,
                blocks.len()
            )));
        }
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            blocks,
            head,
            fc_weight,
            fc_bias,
        })
    }

    /// From a weight file in the `efficientnet_pytorch` layout (e.g. the legacy
    /// `efficientnet-lite0-57934424.pth`), or our safetensors with the same names; weights go to
    /// `device`.
    pub fn from_file(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::new(
            &EfficientNetConfig::lite0(),
            Weights::from_state_dict(StateDict::read(path, device)?),
        )
    }

    /// Deterministic synthetic weights (for timing without a weight file).
    pub fn synthetic(seed: u64, device: &Device) -> Result<Self> {
        Self::new(&EfficientNetConfig::lite0(), Weights::synthetic(seed, device))
    }

    /// [`Self::synthetic`] and the weights it drew, under the names a weight file of this
    /// model uses (so that a synthetic model can be written out and read back).
    pub fn synthetic_with_weights(seed: u64, device: &Device) -> Result<(Self, std::collections::HashMap<String, Tensor>)> {
        let (w, record) = Weights::synthetic_recorded(seed, device);
        let model = Self::new(&EfficientNetConfig::lite0(), w)?;
        Ok((model, record.tensors()))
    }

    pub fn config(&self) -> &EfficientNetConfig {
        &self.cfg
    }

    /// (B, 3, H, W) normalised → (B, num_classes) ImageNet logits: head conv + BN + ReLU6,
    /// global average pool, `_fc` (dropout is inactive at inference).
    pub fn classify(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x)?;
        let mut x = self.stem.forward(x, Activation::Relu6, None)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let x = self.head.forward(&x, Activation::Relu6, None)?;
        let pooled = x.flatten_from(2)?.mean(D::Minus1)?;
        Ok(pooled
            .matmul(&self.fc_weight.t()?)?
            .broadcast_add(&self.fc_bias)?)
    }
}

impl Backbone for EfficientNetLite0 {
    fn channels(&self) -> [usize; 4] {
        let blocks = self.cfg.blocks();
        self.cfg.taps.map(|t| blocks[t].4)
    }

    fn feature_names(&self) -> [&'static str; 4] {
        ["blocks.2", "blocks.4", "blocks.10", "blocks.15"]
    }

    /// (B, 3, H, W) normalised → the outputs of blocks 2/4/10/15:
    /// (B, 24, H/4, W/4), (B, 40, H/8, W/8), (B, 112, H/16, W/16), (B, 320, H/32, W/32)
    /// (sizes rounded up).
    fn forward(&self, x: &Tensor) -> Result<Features> {
        check_input(x)?;
        let mut taps: [Option<Tensor>; 4] = Default::default();
        let last_tap = self.cfg.taps[3];
        let mut x = self.stem.forward(x, Activation::Relu6, None)?;
        // Blocks after the last tap only feed the classifier.
        for (i, block) in self.blocks.iter().enumerate().take(last_tap + 1) {
            x = block.forward(&x)?;
            if let Some(j) = self.cfg.taps.iter().position(|&t| t == i) {
                taps[j] = Some(x.clone());
            }
        }
        let [Some(res2), Some(res3), Some(res4), Some(res5)] = taps else {
            return Err(BackboneError::Input(format!(
                "feature taps {:?} not increasing",
                self.cfg.taps
            )));
        };
        Ok(Features {
            res2,
            res3,
            res4,
            res5,
        })
    }
}
