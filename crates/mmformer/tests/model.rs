//! The full checkpoint: ours and official layouts load, round trips are exact, wrong files are
//! refused with the reason; the inference API on a saved model.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{photo, rect_mask, Scratch};
use mmformer::mm::MmConfig;
use mmformer::{read_meta, save_model, MmFormer, ModelMeta, Preset, SupportImage, SupportSet};

/// Every tensor of a paper-preset model under the official V1 names, with the legacy keys an
/// official checkpoint also carries (spec §6.2).
fn official_layout() -> HashMap<String, Tensor> {
    let device = Device::Cpu;
    let bvm = VarMap::new();
    let bvb = mmformer::train::seeded_var_builder(&bvm, 1, DType::F32, &device);
    mmformer::backbone::ResNet50::new(&mmformer::backbone::ResNetConfig::r50(), mmformer::backbone::Weights::from_var_builder(bvb)).unwrap();
    let mut all: HashMap<String, Tensor> =
        mmformer::train::varmap_tensors(&bvm).into_iter().map(|(k, v)| (format!("backbone.{k}"), v)).collect();
    all.extend(mmformer::stage1::fresh_pos_tensors(Preset::Paper, 0, &device).unwrap());
    all.extend(mmformer::model::fresh_mm_tensors(&MmConfig::resnet50(), 0, &device).unwrap());
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
    let dir = Scratch::new();
    let device = Device::Cpu;
    let tensors = official_layout();
    let file = dir.path("model_best.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let model = MmFormer::load(&file, &device).unwrap();
    assert_eq!(model.meta.preset, Preset::Paper);
    assert!(model.meta.learnable_matching && model.meta.cross_alignment);
    let x = Tensor::zeros((1, 3, 64, 64), DType::F32, &device).unwrap();
    let label = Tensor::ones((1, 64, 64), DType::F32, &device).unwrap();
    let out = model.episode(&x, &[x.clone()], &[label.clone()]).unwrap();
    assert_eq!(out.out.dims(), &[1, 1, 64, 64]);
    assert_eq!(out.cosine.dims(), &[1, 100]);

    // Saved as ours and loaded again: the same metadata and the same output.
    let ours = dir.path("ours.safetensors");
    model.save(&ours).unwrap();
    let back = MmFormer::load(&ours, &device).unwrap();
    assert_eq!(back.meta, model.meta);
    let again = back.episode(&x, &[x.clone()], &[label]).unwrap();
    let d = (out.out - again.out).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d, 0.0);

    // Metadata written by save_model round-trips.
    let meta = ModelMeta::new(Preset::Paper, &MmConfig { learnable_matching: false, ..MmConfig::resnet50() });
    save_model(&ours, &meta, &tensors).unwrap();
    assert_eq!(read_meta(&ours).unwrap(), Some(meta));

    // A stage-1 checkpoint (no MM) and a backbone-only file are refused with the reason.
    let no_mm: HashMap<String, Tensor> =
        tensors.iter().filter(|(k, _)| k.starts_with("backbone.") || k.starts_with("sem_seg_head.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let f = dir.path("step1.safetensors");
    candle_core::safetensors::save(&no_mm, &f).unwrap();
    let err = MmFormer::load(&f, &device).err().unwrap().to_string();
    assert!(err.contains("step1.safetensors") && err.contains("mask-matching"), "{err}");
    let bb: HashMap<String, Tensor> = tensors.iter().filter(|(k, _)| k.starts_with("backbone.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let f = dir.path("resnet.safetensors");
    candle_core::safetensors::save(&bb, &f).unwrap();
    let err = MmFormer::load(&f, &device).err().unwrap().to_string();
    assert!(err.contains("resnet.safetensors") && err.contains("not an MM-Former checkpoint"), "{err}");
}

/// load → segment → save → load → segment gives the same mask, for both presets.
#[test]
fn both_presets_round_trip_through_a_file_and_segment_the_same() {
    let dir = Scratch::new();
    let device = Device::Cpu;
    for preset in [Preset::Cpu, Preset::Paper] {
        let model = MmFormer::synthetic(preset, 3, &device).unwrap();
        let path = dir.path(&format!("{preset}.safetensors"));
        model.save(&path).unwrap();
        let loaded = MmFormer::load(&path, &device).unwrap();
        assert_eq!(loaded.meta, model.meta);
        let support = SupportImage::new(photo(70, 50, 1), rect_mask(70, 50)).unwrap();
        let query = photo(45, 33, 2);
        let a = SupportSet::new(&model, std::slice::from_ref(&support), Some(64)).unwrap().segment(&query).unwrap();
        let b = SupportSet::new(&loaded, std::slice::from_ref(&support), Some(64)).unwrap().segment(&query).unwrap();
        assert_eq!((a.mask.width(), a.mask.height()), (45, 33));
        assert_eq!(a.mask, b.mask, "{preset}");
        assert_eq!(a.foreground, b.foreground, "{preset}");
        assert_eq!(a.proposal_scores.len(), preset.pos_config().num_queries);
        let path2 = dir.path(&format!("{preset}-again.safetensors"));
        loaded.save(&path2).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&path2).unwrap(), "{preset}: a saved model saves to the same bytes");
    }
}

/// Batched queries give what one query at a time gives; K shots work; bad supports are named.
#[test]
fn segment_batch_equals_one_by_one_and_bad_supports_are_refused() {
    let device = Device::Cpu;
    let model = MmFormer::synthetic(Preset::Cpu, 1, &device).unwrap();
    let supports =
        vec![SupportImage::new(photo(70, 50, 1), rect_mask(70, 50)).unwrap(), SupportImage::new(photo(40, 60, 2), rect_mask(40, 60)).unwrap()];
    let set = SupportSet::new(&model, &supports, Some(64)).unwrap();
    assert_eq!(set.shots(), 2);
    let queries = vec![photo(45, 33, 3), photo(80, 64, 4)];
    let batch = set.segment_batch(&queries).unwrap();
    for (q, b) in queries.iter().zip(&batch) {
        let one = set.segment(q).unwrap();
        assert_eq!((one.mask.width(), one.mask.height()), q.dimensions());
        assert_eq!(one.mask, b.mask);
        for (x, y) in one.foreground.iter().zip(&b.foreground) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
    // The convenience call is the one-query path.
    let direct = model.segment(&queries[0], &supports).unwrap();
    assert_eq!(direct.mask.width(), 45);

    let e = SupportImage::new(photo(10, 8, 0), rect_mask(9, 8)).unwrap_err().to_string();
    assert!(e.contains("9x8") && e.contains("10x8"), "{e}");
    let e = SupportImage::new(photo(8, 8, 0), mmformer::data::Label::filled(8, 8, 0)).unwrap_err().to_string();
    assert!(e.contains("empty mask"), "{e}");
    let e = SupportSet::new(&model, &supports, Some(50)).err().unwrap().to_string();
    assert!(e.contains("multiple of 32"), "{e}");
    let e = SupportSet::new(&model, &[], None).err().unwrap().to_string();
    assert!(e.contains("at least one support"), "{e}");
}

#[test]
fn missing_and_foreign_checkpoints_are_named() {
    let dir = Scratch::new();
    let device = Device::Cpu;
    let e = MmFormer::load(dir.path("absent.safetensors"), &device).err().unwrap().to_string();
    assert!(e.contains("absent.safetensors") && e.contains("not found"), "{e}");
    std::fs::write(dir.path("junk.pth"), "junk").unwrap();
    let e = MmFormer::load(dir.path("junk.pth"), &device).err().unwrap().to_string();
    assert!(e.contains("junk.pth"), "{e}");
    let t = Tensor::zeros((2, 2), DType::F32, &device).unwrap();
    std::fs::write(dir.path("other.safetensors"), safetensors::serialize(vec![("foo.weight", &t)], None).unwrap()).unwrap();
    let e = MmFormer::load(dir.path("other.safetensors"), &device).err().unwrap().to_string();
    assert!(e.contains("other.safetensors") && e.contains("not an MM-Former checkpoint"), "{e}");
}
