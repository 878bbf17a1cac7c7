//! The synthetic dataset loads unchanged through the VOC reader, with the contiguous folds and
//! PFENet lists the demo relies on.

use data::synthetic::{self, SyntheticConfig, NUM_CLASSES};
use data::{FewShotDataset, Split, VocOptions};

#[test]
fn synthetic_dataset_opens_with_the_voc_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("synthetic");
    // Default image size; two guaranteed images per class in train, one in val.
    let cfg = SyntheticConfig {
        seed: 17,
        num_train: 2 * NUM_CLASSES,
        num_val: NUM_CLASSES,
        ..SyntheticConfig::default()
    };
    let summary = synthetic::generate(&cfg, &root, None).unwrap();

    let opts = VocOptions {
        no_cache: true,
        ..VocOptions::default()
    };
    let ds = FewShotDataset::open_voc(&root, &opts).unwrap();
    assert_eq!(ds.num_classes(), NUM_CLASSES);
    assert_eq!(ds.class_names(), synthetic::class_names().as_slice());
    assert_eq!(ds.samples(Split::Train).len(), cfg.num_train);
    assert_eq!(ds.samples(Split::Val).len(), cfg.num_val);
    assert_eq!(ds.num_folds(), synthetic::NUM_FOLDS);

    for fold in 0..synthetic::NUM_FOLDS {
        let novel: Vec<u32> = ds
            .novel_classes(fold)
            .unwrap()
            .iter()
            .map(|&c| c as u32)
            .collect();
        let ours: Vec<u32> = synthetic::fold_classes(fold)
            .unwrap()
            .iter()
            .map(|&c| c as u32)
            .collect();
        assert_eq!(novel, ours, "fold {fold}");
        // Every novel class has val support images and every base class train images.
        let val = ds.fold_list(Split::Val, fold).unwrap();
        for (c, imgs) in &val.class_images {
            assert!(
                !imgs.is_empty(),
                "fold {fold}: novel class {c} has no val images"
            );
        }
        let train = ds.fold_list(Split::Train, fold).unwrap();
        assert_eq!(
            train.class_images.len(),
            NUM_CLASSES - synthetic::CLASSES_PER_FOLD
        );
        for (c, imgs) in &train.class_images {
            assert!(
                imgs.len() >= 2,
                "fold {fold}: base class {c} has {} train images",
                imgs.len()
            );
        }
    }
    // The reader's per-class counts agree with the generator's summary.
    let train = ds.fold_list(Split::Train, 0).unwrap();
    for (c, imgs) in &train.class_images {
        assert_eq!(
            imgs.len(),
            summary.train_images_per_class[*c as usize - 1],
            "class {c}"
        );
    }
}
