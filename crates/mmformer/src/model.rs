//! The whole MM-Former at inference (frozen backbone → POS → mask matching) and its checkpoint
//! file.
//!
//! One checkpoint file holds the three parts under the official state-dict names (spec §6.2):
//! `backbone.*`, `sem_seg_head.*` and the mask-matching `conv_*`, `crossat_*`, `fc1`, `fc2` at the
//! top level. Ours is a safetensors file whose metadata key `mmformer` holds [`ModelMeta`]
//! (preset, ablation switches, provenance); an official detectron2 `.pth` (a dict with `model`)
//! has no metadata and is read as the paper preset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use backbone::{Backbone, EfficientNetConfig, EfficientNetLite0, ResNet50, StateDict, Weights};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mm::{LevelFeatures, MaskMatching, MmConfig, MmOutput, QueryPass};
use pos::Pos;
use serde::{Deserialize, Serialize};

use crate::error::{bail, Context, Result};
use crate::Preset;

/// Tag of our checkpoint format (the metadata's `format`).
pub const MODEL_FORMAT: &str = "mmformer-rust-model/1";
/// Safetensors metadata key holding [`ModelMeta`] as JSON.
const META_KEY: &str = "mmformer";

/// What a full checkpoint is: enough to rebuild the model and to say where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format: String,
    pub preset: Preset,
    pub self_alignment: bool,
    pub cross_alignment: bool,
    pub learnable_matching: bool,
    /// Training provenance (dataset, fold, shards fingerprint...), free-form.
    #[serde(default)]
    pub provenance: serde_json::Value,
}

impl ModelMeta {
    pub fn new(preset: Preset, mm: &MmConfig) -> Self {
        Self {
            format: MODEL_FORMAT.into(),
            preset,
            self_alignment: mm.self_alignment,
            cross_alignment: mm.cross_alignment,
            learnable_matching: mm.learnable_matching,
            provenance: serde_json::Value::Null,
        }
    }

    /// The mask-matching configuration this checkpoint was trained with.
    pub fn mm_config(&self) -> MmConfig {
        MmConfig {
            self_alignment: self.self_alignment,
            cross_alignment: self.cross_alignment,
            learnable_matching: self.learnable_matching,
            ..self.preset.mm_config()
        }
    }
}

/// Backbone features as the mask-matching module wants them: `[res5, res4, res3]`.
pub fn mm_features(f: &backbone::Features) -> LevelFeatures {
    [f.res5.clone(), f.res4.clone(), f.res3.clone()]
}

/// Backbone features as the POS wants them: `[res2, res3, res4, res5]`.
pub fn pos_features(f: &backbone::Features) -> Vec<Tensor> {
    vec![f.res2.clone(), f.res3.clone(), f.res4.clone(), f.res5.clone()]
}

/// Frozen backbone + POS + mask matching, ready for episodes, on one device.
pub struct MmFormer {
    pub meta: ModelMeta,
    pub backbone: Box<dyn Backbone>,
    pub pos: Pos,
    pub mm: MaskMatching,
    /// The file it was loaded from (or a description of where it came from).
    pub path: PathBuf,
    device: Device,
    /// Every tensor under the official names, as read (what [`MmFormer::save`] writes). The
    /// POS and MM share these tensors; the backbone runs on batch norms folded from them.
    weights: HashMap<String, Tensor>,
}

impl MmFormer {
    /// Loads our safetensors checkpoint or an official MM-Former `.pth` (paper preset) onto
    /// `device`.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            bail!("checkpoint {} not found", path.display());
        }
        let meta = read_meta(path)?;
        let sd = StateDict::read(path, device).with_context(|| format!("reading checkpoint {}", path.display()))?;
        let tensors = sd.into_tensors();
        let meta = match meta {
            Some(m) => m,
            None => {
                if !tensors.keys().any(|k| k.starts_with("sem_seg_head.")) {
                    bail!(
                        "{}: not an MM-Former checkpoint (no `sem_seg_head.*` tensors and no `{META_KEY}` metadata); \
                         a backbone-only file goes to --backbone-weights of train-pos",
                        path.display()
                    );
                }
                ModelMeta::new(Preset::Paper, &MmConfig::resnet50())
            }
        };
        Self::from_tensors(meta, tensors, path, device)
    }

    /// Builds the model from one flat map of official names (`backbone.*`, `sem_seg_head.*`,
    /// mask-matching names at the top level) on `device`. `origin` names the source in errors.
    pub fn from_tensors(meta: ModelMeta, tensors: HashMap<String, Tensor>, origin: &Path, device: &Device) -> Result<Self> {
        let backbone_tensors: HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("backbone.").map(|n| (n.to_string(), v.clone())))
            .collect();
        if backbone_tensors.is_empty() {
            bail!("{}: no `backbone.*` tensors; a full MM-Former checkpoint holds backbone, POS and MM", origin.display());
        }
        let backbone_tensors = backbone_tensors.into_iter().map(|(k, v)| Ok((k, v.to_device(device)?))).collect::<candle_core::Result<_>>()?;
        let backbone = build_backbone(meta.preset, StateDict::from_tensors(origin, backbone_tensors))
            .with_context(|| format!("{}: backbone", origin.display()))?;
        // Kept as read (official checkpoints' training-only and legacy entries included, all
        // small), so that `save` writes back what was loaded; the POS and MM share these tensors.
        let weights: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| {
                let v = if k.starts_with("backbone.") { v } else { v.to_dtype(DType::F32)? };
                Ok((k, v.to_device(device)?))
            })
            .collect::<candle_core::Result<_>>()?;
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
        let pos = Pos::new(&meta.preset.pos_config(), vb.clone())
            .with_context(|| format!("{}: the POS (`sem_seg_head.*`) does not fit the {:?} preset", origin.display(), meta.preset))?;
        let mm = MaskMatching::new(&meta.mm_config(), vb).with_context(|| {
            format!("{}: the mask-matching weights do not fit the {:?} preset (a stage-1 checkpoint has none: train stage 2 first)", origin.display(), meta.preset)
        })?;
        Ok(Self { meta, backbone, pos, mm, path: origin.to_path_buf(), device: device.clone(), weights })
    }

    /// A whole model with deterministic weights and no file (timing, tests, examples): synthetic
    /// backbone weights (He-uniform, identity BN) and freshly initialised POS (scratch init) and
    /// mask matching drawn from `seed`.
    ///
    /// The POS and MM weights are plain (detached) tensors, as in a model loaded from a
    /// checkpoint: layers built on trainable `Var`s take paths that record a backward graph.
    pub fn synthetic(preset: Preset, seed: u64, device: &Device) -> Result<Self> {
        let (backbone, backbone_weights): (Box<dyn Backbone>, _) = match preset {
            Preset::Paper => {
                let (m, w) = ResNet50::synthetic_with_weights(seed, device)?;
                (Box::new(m), w)
            }
            Preset::Cpu => {
                let (m, w) = EfficientNetLite0::synthetic_with_weights(seed, device)?;
                (Box::new(m), w)
            }
        };
        let mm_cfg = preset.mm_config();
        let mut weights = crate::stage1::fresh_pos_tensors(preset, seed, device)?;
        merge_part(&mut weights, &fresh_mm_tensors(&mm_cfg, seed, device)?)?;
        let mut weights: HashMap<String, Tensor> = weights.into_iter().map(|(k, v)| (k, v.detach())).collect();
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
        let pos = Pos::new(&preset.pos_config(), vb.clone())?;
        let mm = MaskMatching::new(&mm_cfg, vb)?;
        weights.extend(backbone_weights.into_iter().map(|(k, v)| (format!("backbone.{k}"), v)));
        Ok(Self {
            meta: ModelMeta::new(preset, &mm_cfg),
            backbone,
            pos,
            mm,
            path: PathBuf::from(format!("<synthetic {preset} model, seed {seed}>")),
            device: device.clone(),
            weights,
        })
    }

    /// Writes the model as our checkpoint (safetensors, official names, [`ModelMeta`] in the
    /// metadata), atomically. [`MmFormer::load`] reads it back.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_model(path.as_ref(), &self.meta, &self.weights)
    }

    /// Where the model's tensors live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The preset's input side (480 paper, 256 cpu).
    pub fn input_size(&self) -> u32 {
        self.meta.preset.input_size()
    }

    /// Every tensor under the official names (`backbone.*`, `sem_seg_head.*`, mask matching at
    /// the top level), as [`MmFormer::save`] writes them.
    pub fn weights(&self) -> &HashMap<String, Tensor> {
        &self.weights
    }

    /// Backbone + POS on a normalised (B, 3, H, W) query batch.
    pub fn query(&self, x: &Tensor) -> Result<QueryPass> {
        let f = self.backbone.forward(x)?;
        let proposal_logits = self.pos.forward_proposals(&pos_features(&f))?;
        Ok(QueryPass { features: mm_features(&f), proposal_logits })
    }

    /// Backbone features `[res5, res4, res3]` of a normalised support batch (no POS).
    pub fn support(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        Ok(mm_features(&self.backbone.forward(x)?))
    }

    /// The matching on a query pass and K supports (features + (B, H, W) binary labels).
    pub fn matching(&self, query: &QueryPass, supports: &[[Tensor; 3]], labels: &[Tensor], input_hw: (usize, usize)) -> Result<MmOutput> {
        Ok(self.mm.forward(&query.features, supports, labels, &query.proposal_logits, input_hw)?)
    }

    /// One whole episode: query image, K support images and their labels, all normalised.
    pub fn episode(&self, query: &Tensor, supports: &[Tensor], labels: &[Tensor]) -> Result<MmOutput> {
        let (_, _, h, w) = query.dims4()?;
        let q = self.query(query)?;
        let s = supports.iter().map(|x| self.support(x)).collect::<Result<Vec<_>>>()?;
        self.matching(&q, &s, labels, (h, w))
    }
}

/// The backbone weight file of a preset: `weights` when given (ResNet-50: torchvision / official /
/// safetensors, required), else the fetched EfficientNet-Lite0 asset. It must exist.
pub fn backbone_file(preset: Preset, weights: Option<&Path>) -> Result<PathBuf> {
    let path = match (preset, weights) {
        (_, Some(p)) => p.to_path_buf(),
        (Preset::Cpu, None) => backbone::assets::efficientnet_lite0_path(),
        (Preset::Paper, None) => bail!(
            "the paper preset needs ResNet-50 weights: --backbone-weights resnet50-19c8e357.pth (torchvision) or an official MM-Former checkpoint"
        ),
    };
    if !path.exists() {
        match preset {
            Preset::Cpu => bail!("{}: EfficientNet-Lite0 weights not found; run `cargo xtask fetch-assets`", path.display()),
            Preset::Paper => bail!("{}: ResNet-50 weights not found", path.display()),
        }
    }
    Ok(path)
}

/// The frozen backbone of a preset on `device`, from [`backbone_file`].
pub fn load_backbone(preset: Preset, weights: Option<&Path>, device: &Device) -> Result<Box<dyn Backbone>> {
    let path = backbone_file(preset, weights)?;
    Ok(match preset {
        Preset::Cpu => Box::new(EfficientNetLite0::from_file(&path, device).with_context(|| format!("loading {}", path.display()))?),
        Preset::Paper => Box::new(ResNet50::from_file(&path, device).with_context(|| format!("loading {}", path.display()))?),
    })
}

/// Freshly initialised mask-matching tensors (official default inits, drawn from `seed`).
pub fn fresh_mm_tensors(cfg: &MmConfig, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let vm = candle_nn::VarMap::new();
    MaskMatching::new(cfg, train::seeded_var_builder(&vm, seed, DType::F32, device))?;
    Ok(train::varmap_tensors(&vm))
}

/// A full checkpoint's tensors from its parts: the backbone weight file of the preset, POS
/// tensors (a stage-1 checkpoint's `model.safetensors`) and MM tensors.
pub fn assemble(
    preset: Preset,
    backbone_file: &Path,
    pos: &HashMap<String, Tensor>,
    mm: &HashMap<String, Tensor>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut all = backbone_tensors(preset, backbone_file, device)?;
    merge_part(&mut all, pos)?;
    merge_part(&mut all, mm)?;
    Ok(all)
}

/// Adds one part's tensors to a checkpoint's; a name in both is an error.
pub fn merge_part(all: &mut HashMap<String, Tensor>, part: &HashMap<String, Tensor>) -> Result<()> {
    for (k, v) in part {
        if all.insert(k.clone(), v.clone()).is_some() {
            bail!("tensor `{k}` appears in two parts of the checkpoint");
        }
    }
    Ok(())
}

/// The backbone of a preset from tensors under its own names (the `backbone.` prefix removed).
pub fn build_backbone(preset: Preset, sd: StateDict) -> Result<Box<dyn Backbone>> {
    Ok(match preset {
        Preset::Cpu => Box::new(EfficientNetLite0::new(&EfficientNetConfig::lite0(), Weights::from_state_dict(sd))?),
        Preset::Paper => Box::new(ResNet50::from_state_dict(sd)?),
    })
}

/// The backbone tensors of a preset's weight file, renamed to what `backbone.*` holds in a full
/// checkpoint (official names for ResNet-50, the file's own for EfficientNet-Lite0).
pub fn backbone_tensors(preset: Preset, file: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let sd = StateDict::read(file, device).with_context(|| format!("reading backbone weights {}", file.display()))?;
    let sd = match preset {
        Preset::Paper => backbone::names::resnet50_state_dict(sd)?,
        Preset::Cpu => sd,
    };
    Ok(sd.into_tensors().into_iter().map(|(k, v)| (format!("backbone.{k}"), v)).collect())
}

/// Our checkpoint's metadata, or None for a file without it (an official `.pth`). Reads only the
/// safetensors header (8-byte length + JSON), not the tensors, which `StateDict::read` reads next.
pub fn read_meta(path: &Path) -> Result<Option<ModelMeta>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open checkpoint {}", path.display()))?;
    let mut len = [0u8; 8];
    if f.read_exact(&mut len).is_err() {
        return Ok(None);
    }
    let n = u64::from_le_bytes(len);
    let file_len = f.metadata()?.len();
    // Not a safetensors header (a zip or pickle `.pth` starts otherwise).
    if n < 2 || n > file_len.saturating_sub(8) {
        return Ok(None);
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).with_context(|| format!("cannot read {}", path.display()))?;
    if header[0] != b'{' {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| crate::Error::Invalid(format!("{}: corrupt safetensors header: {e}", path.display())))?;
    let Some(json) = v.get("__metadata__").and_then(|m| m.get(META_KEY)).and_then(|j| j.as_str()) else { return Ok(None) };
    let meta: ModelMeta =
        serde_json::from_str(json).with_context(|| format!("{}: unreadable `{META_KEY}` metadata", path.display()))?;
    if meta.format != MODEL_FORMAT {
        bail!("{}: checkpoint format `{}`, this build reads `{MODEL_FORMAT}`", path.display(), meta.format);
    }
    Ok(Some(meta))
}

/// Writes a full checkpoint atomically (temp file, fsync, rename).
pub fn save_model(path: &Path, meta: &ModelMeta, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut md = HashMap::new();
    md.insert(META_KEY.to_string(), serde_json::to_string(meta)?);
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(sorted, Some(md)).with_context(|| format!("serialising {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}


impl eval::FewShotModel for MmFormer {
    fn device(&self) -> &Device {
        &self.device
    }

    fn encode(&self, x: &Tensor) -> std::result::Result<QueryPass, eval::BoxError> {
        Ok(self.query(x)?)
    }

    fn matching(
        &self,
        query: &QueryPass,
        supports: &[LevelFeatures],
        labels: &[Tensor],
        input_hw: (usize, usize),
    ) -> std::result::Result<MmOutput, eval::BoxError> {
        Ok(MmFormer::matching(self, query, supports, labels, input_hw)?)
    }

    fn checkpoint(&self) -> String {
        self.path.display().to_string()
    }

    fn preset(&self) -> String {
        self.meta.preset.name().to_string()
    }
}
