//! The whole MM-Former at inference (frozen backbone → POS → mask matching) and its checkpoint
//! file, as `eval`, `predict`, `demo` and `bench episode` use it.
//!
//! One checkpoint file holds the three parts under the official state-dict names (spec §6.2):
//! `backbone.*`, `sem_seg_head.*` and the mask-matching `conv_*`, `crossat_*`, `fc1`, `fc2` at the
//! top level. Ours is a safetensors file whose metadata key `mmformer` holds [`ModelMeta`]
//! (preset, ablation switches, provenance); an official detectron2 `.pth` (a dict with `model`)
//! has no metadata and is read as the paper preset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use backbone::{Backbone, EfficientNetConfig, EfficientNetLite0, ResNet50, StateDict, Weights};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mm::{MaskMatching, MmConfig, MmOutput};
use pos::Pos;
use serde::{Deserialize, Serialize};

use super::{mm_features, pos_features, Preset};

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

/// What one query image gives, whatever the number of shots: its backbone features for the
/// matching and its proposals.
#[derive(Clone, Debug)]
pub struct QueryPass {
    /// `[res5, res4, res3]`, each (B, C, h, w).
    pub features: [Tensor; 3],
    /// (B, N, H/4, W/4) POS mask logits.
    pub proposal_logits: Tensor,
}

/// Frozen backbone + POS + mask matching, ready for episodes.
pub struct MmFormer {
    pub meta: ModelMeta,
    pub backbone: Box<dyn Backbone>,
    pub pos: Pos,
    pub mm: MaskMatching,
    /// The file it was loaded from.
    pub path: PathBuf,
}

impl MmFormer {
    /// Loads our safetensors checkpoint or an official MM-Former `.pth` (paper preset).
    pub fn load(path: &Path) -> Result<Self> {
        let meta = read_meta(path)?;
        let sd = StateDict::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
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
        Self::from_tensors(meta, tensors, path)
    }

    /// Builds the model from one flat map of official names (`backbone.*`, `sem_seg_head.*`,
    /// mask-matching names at the top level). `origin` names the source in errors.
    pub fn from_tensors(meta: ModelMeta, tensors: HashMap<String, Tensor>, origin: &Path) -> Result<Self> {
        let device = Device::Cpu;
        let backbone_tensors: HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("backbone.").map(|n| (n.to_string(), v.clone())))
            .collect();
        if backbone_tensors.is_empty() {
            bail!("{}: no `backbone.*` tensors; a full MM-Former checkpoint holds backbone, POS and MM", origin.display());
        }
        let backbone = build_backbone(meta.preset, StateDict::from_tensors(origin, backbone_tensors))
            .with_context(|| format!("{}: backbone", origin.display()))?;
        let to_f32 = tensors
            .into_iter()
            .filter(|(k, _)| !k.starts_with("backbone."))
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(to_f32, DType::F32, &device);
        let pos = Pos::new(&meta.preset.pos_config(), vb.clone())
            .with_context(|| format!("{}: the POS (`sem_seg_head.*`) does not fit the {:?} preset", origin.display(), meta.preset))?;
        let mm = MaskMatching::new(&meta.mm_config(), vb).with_context(|| {
            format!("{}: the mask-matching weights do not fit the {:?} preset (a stage-1 checkpoint has none: train stage 2 first)", origin.display(), meta.preset)
        })?;
        Ok(Self { meta, backbone, pos, mm, path: origin.to_path_buf() })
    }

    /// Backbone + POS on a normalised (B, 3, H, W) query batch.
    pub fn query(&self, x: &Tensor) -> Result<QueryPass> {
        let f = self.backbone.forward(x)?;
        let out = self.pos.forward(&pos_features(&f))?;
        Ok(QueryPass { features: mm_features(&f), proposal_logits: out.pred_masks })
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
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn episode(&self, query: &Tensor, supports: &[Tensor], labels: &[Tensor]) -> Result<MmOutput> {
        let (_, _, h, w) = query.dims4()?;
        let q = self.query(query)?;
        let s = supports.iter().map(|x| self.support(x)).collect::<Result<Vec<_>>>()?;
        self.matching(&q, &s, labels, (h, w))
    }
}

/// Freshly initialised mask-matching tensors (official default inits) for `cfg`.
pub fn fresh_mm_tensors(cfg: &MmConfig) -> Result<HashMap<String, Tensor>> {
    let vm = candle_nn::VarMap::new();
    MaskMatching::new(cfg, train::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu))?;
    Ok(super::stage1::varmap_tensors(&vm))
}

/// A full checkpoint's tensors from its parts: the backbone weight file of the preset, POS
/// tensors (a stage-1 checkpoint's `model.safetensors`) and MM tensors.
pub fn assemble(
    preset: Preset,
    backbone_file: &Path,
    pos: &HashMap<String, Tensor>,
    mm: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut all = backbone_tensors(preset, backbone_file)?;
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
pub fn backbone_tensors(preset: Preset, file: &Path) -> Result<HashMap<String, Tensor>> {
    let sd = StateDict::read(file).with_context(|| format!("reading backbone weights {}", file.display()))?;
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
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| anyhow::anyhow!("{}: corrupt safetensors header: {e}", path.display()))?;
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
    let bytes = safetensors::serialize(sorted, Some(md)).map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    /// Every tensor of a paper-preset model under the official V1 names, with the legacy keys an
    /// official checkpoint also carries (spec §6.2).
    fn official_layout() -> HashMap<String, Tensor> {
        let device = Device::Cpu;
        let bvm = VarMap::new();
        let bvb = train::seeded_var_builder(&bvm, 1, DType::F32, &device);
        backbone::ResNet50::new(&backbone::ResNetConfig::r50(), backbone::Weights::from_var_builder(bvb)).unwrap();
        let mut all: HashMap<String, Tensor> = super::super::stage1::varmap_tensors(&bvm)
            .into_iter()
            .map(|(k, v)| (format!("backbone.{k}"), v))
            .collect();
        let (pvm, _) = super::super::stage1::new_pos(Preset::Paper, &device).unwrap();
        all.extend(super::super::stage1::varmap_tensors(&pvm));
        all.extend(fresh_mm_tensors(&MmConfig::resnet50()).unwrap());
        for (k, shape) in [
            ("criterion.empty_weight", vec![151]),
            ("sem_seg_head.pixel_decoder.crossat_0.transformer_ffn_layers.0.linear1.weight", vec![2048, 256]),
            ("crossat_3.transformer_ffn_layers.0.linear1.weight", vec![256, 256]),
            ("backbone.res2.0.conv1.norm.num_batches_tracked", vec![1]),
        ] {
            all.insert(k.to_string(), Tensor::zeros(shape, DType::F32, &device).unwrap());
        }
        all
    }

    #[test]
    fn an_official_layout_without_metadata_loads_as_the_paper_preset_and_runs() {
        let dir = std::env::temp_dir().join(format!("xtask-official-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tensors = official_layout();
        let file = dir.join("model_best.safetensors");
        candle_core::safetensors::save(&tensors, &file).unwrap();
        let model = MmFormer::load(&file).unwrap();
        assert_eq!(model.meta.preset, Preset::Paper);
        assert!(model.meta.learnable_matching && model.meta.cross_alignment);
        let x = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let label = Tensor::ones((1, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let out = model.episode(&x, &[x.clone()], &[label]).unwrap();
        assert_eq!(out.out.dims(), &[1, 1, 64, 64]);
        assert_eq!(out.cosine.dims(), &[1, 100]);

        // Ours round-trips with its metadata.
        let ours = dir.join("ours.safetensors");
        let meta = ModelMeta::new(Preset::Paper, &MmConfig { learnable_matching: false, ..MmConfig::resnet50() });
        save_model(&ours, &meta, &tensors).unwrap();
        assert_eq!(read_meta(&ours).unwrap(), Some(meta));

        // A stage-1 checkpoint (no MM) and a backbone-only file are refused with the reason.
        let no_mm: HashMap<String, Tensor> =
            tensors.iter().filter(|(k, _)| k.starts_with("backbone.") || k.starts_with("sem_seg_head.")).map(|(k, v)| (k.clone(), v.clone())).collect();
        let f = dir.join("step1.safetensors");
        candle_core::safetensors::save(&no_mm, &f).unwrap();
        let err = format!("{:#}", MmFormer::load(&f).err().unwrap());
        assert!(err.contains("step1.safetensors") && err.contains("mask-matching"), "{err}");
        let bb: HashMap<String, Tensor> = tensors.iter().filter(|(k, _)| k.starts_with("backbone.")).map(|(k, v)| (k.clone(), v.clone())).collect();
        let f = dir.join("resnet.safetensors");
        candle_core::safetensors::save(&bb, &f).unwrap();
        let err = format!("{:#}", MmFormer::load(&f).err().unwrap());
        assert!(err.contains("resnet.safetensors") && err.contains("not an MM-Former checkpoint"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
