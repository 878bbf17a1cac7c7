//! The one ResNet-50 name table: every conv and norm module under its official name (detectron2 /
//! MM-Former, as `tools/convert-torchvision-to-d2.py` renames them) and its torchvision name.
//! All three weight layouts go through it:
//! - torchvision `resnet50-*.pth`: `conv1`, `bn1`, `layerN.B.convK` / `bnK`, `layerN.0.downsample.0/1`;
//! - an MM-Former checkpoint: `backbone.stem.conv1[.norm]`, `backbone.resN.B.convK[.norm]`,
//!   `backbone.resN.0.shortcut[.norm]`;
//! - our safetensors: the official names, with or without `backbone.`.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::error::Result;
use crate::weights::{FileNaming, StateDict};

/// Blocks per stage of R-50 (res2..res5).
pub const RESNET50_BLOCKS: [usize; 4] = [3, 4, 6, 3];

/// Parameters of a conv module (detectron2 convs under a norm have no bias).
const CONV_PARAMS: [&str; 1] = ["weight"];
/// Parameters of a FrozenBN / BatchNorm2d module (`num_batches_tracked` is not used).
const NORM_PARAMS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

/// (official module, torchvision module, is_norm), in forward order.
fn module_table() -> Vec<(String, String, bool)> {
    let mut t = vec![
        ("stem.conv1".to_string(), "conv1".to_string(), false),
        ("stem.conv1.norm".to_string(), "bn1".to_string(), true),
    ];
    for (s, &n) in RESNET50_BLOCKS.iter().enumerate() {
        let (res, layer) = (format!("res{}", s + 2), format!("layer{}", s + 1));
        for b in 0..n {
            for k in 1..=3 {
                t.push((
                    format!("{res}.{b}.conv{k}"),
                    format!("{layer}.{b}.conv{k}"),
                    false,
                ));
                t.push((
                    format!("{res}.{b}.conv{k}.norm"),
                    format!("{layer}.{b}.bn{k}"),
                    true,
                ));
            }
            if b == 0 {
                t.push((
                    format!("{res}.0.shortcut"),
                    format!("{layer}.0.downsample.0"),
                    false,
                ));
                t.push((
                    format!("{res}.0.shortcut.norm"),
                    format!("{layer}.0.downsample.1"),
                    true,
                ));
            }
        }
    }
    t
}

struct Table {
    /// Every parameter name of the backbone, official names, forward order.
    official: Vec<String>,
    to_official: HashMap<String, String>,
    to_torchvision: HashMap<String, String>,
}

fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| {
        let mut official = Vec::new();
        let mut to_official = HashMap::new();
        let mut to_torchvision = HashMap::new();
        for (ours, tv, is_norm) in module_table() {
            let params: &[&str] = if is_norm { &NORM_PARAMS } else { &CONV_PARAMS };
            for p in params {
                let (o, t) = (format!("{ours}.{p}"), format!("{tv}.{p}"));
                official.push(o.clone());
                to_official.insert(t.clone(), o.clone());
                to_torchvision.insert(o, t);
            }
        }
        Table {
            official,
            to_official,
            to_torchvision,
        }
    })
}

/// Every tensor name of the R-50 backbone in official names (`stem.conv1.weight`, …), forward
/// order: 53 convs and 53 norms, 265 tensors.
pub fn resnet50_official_names() -> &'static [String] {
    &table().official
}

/// `layer1.0.bn1.running_mean` → `res2.0.conv1.norm.running_mean`; None for names outside the
/// backbone (`fc.*`, `*.num_batches_tracked`).
pub fn torchvision_to_official(name: &str) -> Option<String> {
    table().to_official.get(name).cloned()
}

/// The inverse of [`torchvision_to_official`].
pub fn official_to_torchvision(name: &str) -> Option<String> {
    table().to_torchvision.get(name).cloned()
}

/// The R-50 backbone tensors of a weight file in any of the three layouts, under official names
/// without prefix. Tensors outside the backbone (`fc.*`, the MM-Former heads, optimizer state)
/// and `num_batches_tracked` are dropped. Completeness is checked when a model is built from it,
/// so a partial file gives an error naming the first missing key as the file would spell it.
pub fn resnet50_state_dict(raw: StateDict) -> Result<StateDict> {
    const PREFIX: &str = "backbone.";
    let path = raw.path().to_path_buf();
    let tensors = raw.into_tensors();
    let (naming, renamed): (FileNaming, HashMap<String, _>) =
        if tensors.keys().any(|k| k.starts_with(PREFIX)) {
            let renamed = tensors
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(PREFIX).map(|s| (s.to_string(), v)))
                .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
                .collect();
            (FileNaming::Prefixed(PREFIX.to_string()), renamed)
        } else if tensors.keys().any(|k| torchvision_to_official(k).is_some()) {
            let renamed = tensors
                .into_iter()
                .filter_map(|(k, v)| torchvision_to_official(&k).map(|o| (o, v)))
                .collect();
            (FileNaming::Torchvision, renamed)
        } else {
            let renamed = tensors
                .into_iter()
                .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
                .collect();
            (FileNaming::Same, renamed)
        };
    Ok(StateDict::renamed(path, renamed, naming))
}
