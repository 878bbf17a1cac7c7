//! Dataset readers on small files written here in the real formats.

mod common;

use std::path::Path;

use common::{scene, small_pascal, write_voc, VocImage};
use data::{
    write_label_png, ClassId, CocoOptions, CocoSplitFiles, DataError, DatasetKind, DatasetSource, FewShotDataset, FoldScheme, Label,
    Split, VocOptions,
};

fn open(root: &Path) -> FewShotDataset {
    FewShotDataset::open_voc(root, &VocOptions::default()).unwrap()
}

#[test]
fn voc_reads_palette_ids_and_builds_pfenet_lists() {
    let dir = tempfile::tempdir().unwrap();
    let ids = small_pascal(dir.path());
    let ds = open(dir.path());
    assert_eq!(ds.kind(), DatasetKind::Pascal);
    assert_eq!(ds.num_classes(), 20);
    assert_eq!(ds.class_name(15).unwrap(), "person");
    assert_eq!(ds.samples(Split::Train).len(), 20);
    // img00: class 1 left (48x62 after the ignore rows), class 8 right.
    let rec = &ds.samples(Split::Train)[ds.find(Split::Train, &ids[0]).unwrap()];
    let classes: Vec<(ClassId, u64)> = rec.classes.iter().map(|p| (p.class_id, p.pixels)).collect();
    assert_eq!(classes, vec![(1, 48 * 62), (8, 48 * 62)]);

    // Fold 0: novel 1..=5.
    assert_eq!(ds.novel_classes(0).unwrap(), &[1, 2, 3, 4, 5]);
    let val = ds.fold_list(Split::Val, 0).unwrap();
    for &i in &val.images {
        let rec = &ds.samples(Split::Val)[i];
        assert!(rec.classes.iter().any(|p| p.class_id <= 5), "{} has no novel class", rec.id);
    }
    // Every class is in exactly two images.
    assert!(val.class_images.values().all(|v| v.len() == 2));
    let train = ds.fold_list(Split::Train, 0).unwrap();
    assert_eq!(train.images.len(), 20, "every image has a base class");
    assert!(train.class_images.keys().all(|&c| c > 5));

    // Export by ids: 4 folds x 2 splits, same content as the in-memory lists.
    let out = dir.path().join("lists");
    assert_eq!(ds.write_fold_lists(&out).unwrap().len(), 8);
    let file: data::FoldListFile = serde_json::from_str(&std::fs::read_to_string(out.join("val_fold0.json")).unwrap()).unwrap();
    assert_eq!(file.images.len(), val.images.len());
    assert_eq!(file.class_images[&1], vec!["img00".to_string(), "img10".to_string()]);
}

#[test]
fn pfenet_threshold_is_2048_pixels_at_original_resolution() {
    let dir = tempfile::tempdir().unwrap();
    // 2048 px of class 1 in "big", 2047 in "small" (64x32 minus one pixel set to background).
    let mut rects_small = vec![(1u8, 0, 0, 64, 32)];
    rects_small.push((0, 0, 0, 1, 1));
    let images = vec![
        VocImage { id: "big", w: 100, h: 50, rects: vec![(1, 0, 0, 64, 32), (7, 64, 0, 100, 50)] },
        VocImage { id: "small", w: 100, h: 50, rects: rects_small },
        VocImage { id: "other", w: 100, h: 50, rects: vec![(6, 0, 0, 100, 50)] },
    ];
    write_voc(dir.path(), &images, &["big", "small", "other"], &["big", "small", "other"]);
    let ds = open(dir.path());
    let val = ds.fold_list(Split::Val, 0).unwrap();
    let names: Vec<&str> = val.images.iter().map(|&i| ds.samples(Split::Val)[i].id.as_str()).collect();
    assert_eq!(names, vec!["big"]);
    // "small" still records its class 1 pixels (test episodes choose among any-area classes).
    let small = &ds.samples(Split::Val)[ds.find(Split::Val, "small").unwrap()];
    assert_eq!(small.pixels_of(1), 2047);
}

#[test]
fn gray_labels_pfenet_txt_lists_and_label_fallback_dir() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("JPEGImages")).unwrap();
    std::fs::create_dir_all(root.join("SegmentationClass")).unwrap();
    for (id, class) in [("a", 3u8), ("b", 12)] {
        let (img, lab) = scene(80, 60, &[(class, 0, 0, 60, 60)]);
        image::DynamicImage::ImageRgb8(img).save(root.join(format!("JPEGImages/{id}.jpg"))).unwrap();
        data::label::write_gray_png(&root.join(format!("SegmentationClass/{id}.png")), 80, 60, lab.data()).unwrap();
    }
    let list = root.join("list.txt");
    std::fs::write(&list, "JPEGImages/a.jpg SegmentationClass/a.png\n\nJPEGImages/b.jpg SegmentationClass/b.png\n").unwrap();
    let opts = VocOptions { train_list: Some(list.clone()), val_list: Some(list), ..Default::default() };
    let ds = FewShotDataset::open_voc(root, &opts).unwrap();
    let ids: Vec<&str> = ds.samples(Split::Val).iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b"]);
    assert_eq!(ds.samples(Split::Val)[1].classes[0].class_id, 12);
    let (img, lab) = ds.samples(Split::Val)[0].load().unwrap();
    assert_eq!((img.width(), img.height()), (80, 60));
    assert_eq!(lab.get(10, 10), 3);
}

#[test]
fn classes_txt_sets_the_class_count_and_folds() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<VocImage> = (0..4).map(|i| VocImage { id: ["a", "b", "c", "d"][i], w: 64, h: 64, rects: vec![(33 + i as u8, 0, 0, 64, 64)] }).collect();
    write_voc(dir.path(), &images, &["a", "b"], &["c", "d"]);
    let names: Vec<String> = (1..=40).map(|i| format!("shape{i}")).collect();
    std::fs::write(dir.path().join("classes.txt"), names.join("\n") + "\n").unwrap();
    let ds = open(dir.path());
    assert_eq!(ds.num_classes(), 40);
    assert_eq!(ds.kind(), DatasetKind::Other);
    assert_eq!(ds.novel_classes(3).unwrap(), &(31..=40).collect::<Vec<ClassId>>()[..]);
    assert_eq!(ds.class_id("shape36"), Some(36));
}

#[test]
fn scan_cache_is_used_and_invalidated_by_changed_labels() {
    let dir = tempfile::tempdir().unwrap();
    small_pascal(dir.path());
    let _ = open(dir.path());
    let cache = dir.path().join(".fewshot_cache/scan-val.json");
    assert!(cache.exists());
    // Tamper with a cached count: a matching cache must be trusted (no rescan) ...
    let text = std::fs::read_to_string(&cache).unwrap();
    let tampered = text.replacen("\"pixels\":2976", "\"pixels\":2977", 1);
    assert_ne!(text, tampered);
    std::fs::write(&cache, &tampered).unwrap();
    let ds = open(dir.path());
    assert!(ds.samples(Split::Val).iter().any(|s| s.classes.iter().any(|p| p.pixels == 2977)));
    // ... and a changed label file (different size) must trigger a rescan.
    let (_, lab) = scene(96, 64, &[(1, 0, 0, 96, 64)]);
    write_label_png(&dir.path().join("SegmentationClassAug/img00.png"), &lab).unwrap();
    let ds = open(dir.path());
    let rec = &ds.samples(Split::Val)[ds.find(Split::Val, "img00").unwrap()];
    assert_eq!(rec.pixels_of(1), 96 * 64);
    assert!(ds.samples(Split::Val).iter().all(|s| s.classes.iter().all(|p| p.pixels != 2977)));
}

fn err_of(r: data::Result<FewShotDataset>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bad_inputs_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    small_pascal(root);
    let no_cache = VocOptions { no_cache: true, ..Default::default() };

    // Missing image.
    std::fs::rename(root.join("JPEGImages/img03.png"), root.join("img03.bak")).unwrap();
    let e = err_of(FewShotDataset::open_voc(root, &no_cache));
    assert!(e.contains("img03.jpg"), "{e}");
    std::fs::rename(root.join("img03.bak"), root.join("JPEGImages/img03.png")).unwrap();

    // Corrupt mask.
    let mask = root.join("SegmentationClassAug/img04.png");
    let good = std::fs::read(&mask).unwrap();
    std::fs::write(&mask, &good[..good.len() / 2]).unwrap();
    let e = err_of(FewShotDataset::open_voc(root, &no_cache));
    assert!(e.contains("img04.png"), "{e}");

    // Mask size differs from the image size.
    write_label_png(&mask, &Label::filled(50, 50, 1)).unwrap();
    let e = err_of(FewShotDataset::open_voc(root, &no_cache));
    assert!(e.contains("img04.png") && e.contains("50x50") && e.contains("96x64"), "{e}");

    // Unknown class id (30 in a 20-class dataset).
    write_label_png(&mask, &Label::filled(96, 64, 30)).unwrap();
    let e = err_of(FewShotDataset::open_voc(root, &no_cache));
    assert!(e.contains("img04.png") && e.contains("30"), "{e}");
    std::fs::write(&mask, &good).unwrap();

    // Malformed list line.
    let list = root.join("bad_list.txt");
    std::fs::write(&list, "img00\nJPEGImages/a.jpg b.png extra\n").unwrap();
    let e = err_of(FewShotDataset::open_voc(root, &VocOptions { train_list: Some(list.clone()), ..no_cache.clone() }));
    assert!(e.contains("bad_list.txt") && e.contains("line 2"), "{e}");

    // Empty split.
    std::fs::write(&list, "\n").unwrap();
    let e = err_of(FewShotDataset::open_voc(root, &VocOptions { val_list: Some(list), ..no_cache.clone() }));
    assert!(e.contains("bad_list.txt") && e.contains("empty"), "{e}");

    // Malformed classes.txt.
    std::fs::write(root.join("classes.txt"), "a\n\nb\n").unwrap();
    let e = err_of(FewShotDataset::open_voc(root, &no_cache));
    assert!(e.contains("classes.txt") && e.contains("line 2"), "{e}");
    std::fs::remove_file(root.join("classes.txt")).unwrap();

    // Fold and class out of range.
    let ds = FewShotDataset::open_voc(root, &no_cache).unwrap();
    assert!(matches!(ds.novel_classes(4), Err(DataError::FoldOutOfRange { .. })));
    assert!(matches!(ds.class_name(21), Err(DataError::UnknownClass { class_id: 21, .. })));
    assert!(matches!(ds.class_name(0), Err(DataError::UnknownClass { .. })));
}

#[test]
fn coco_to_pascal_folds() {
    let dir = tempfile::tempdir().unwrap();
    small_pascal(dir.path());
    let ds = FewShotDataset::open(&DatasetSource::CocoToPascal { root: dir.path().to_path_buf(), options: VocOptions::default() }).unwrap();
    assert_eq!(ds.kind(), DatasetKind::CocoToPascal);
    let names: Vec<&str> = ds.novel_classes(1).unwrap().iter().map(|&c| ds.class_name(c).unwrap()).collect();
    assert_eq!(names, vec!["bicycle", "bus", "horse", "sofa"]);
    assert_eq!(ds.default_test_seed(2).unwrap(), 321);
}

/// A COCO file with a polygon, a compressed RLE, an uncompressed RLE and a crowd annotation.
fn write_coco(root: &Path) -> CocoOptions {
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for name in ["x.jpg", "y.jpg"] {
        image::DynamicImage::ImageRgb8(image::RgbImage::new(64, 48)).save(images.join(name)).unwrap();
    }
    // Compressed RLE of a column-major mask covering columns 10..20 fully.
    let mut col_major = vec![0u8; 64 * 48];
    for x in 10..20 {
        for y in 0..48 {
            col_major[x * 48 + y] = 1;
        }
    }
    let rle = hotcoco::mask::encode(&col_major, 48, 64).unwrap();
    let compressed = hotcoco::mask::rle_to_string(&rle);
    let json = format!(
        r#"{{
      "images": [{{"id": 5, "file_name": "x.jpg", "height": 48, "width": 64}},
                 {{"id": 9, "file_name": "y.jpg", "height": 48, "width": 64}}],
      "categories": [{{"id": 90, "name": "zebra"}}, {{"id": 1, "name": "person"}}, {{"id": 44, "name": "bottle"}}, {{"id": 3, "name": "car"}}],
      "annotations": [
        {{"id": 1, "image_id": 5, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 40, 0, 40, 48, 0, 48]]}},
        {{"id": 2, "image_id": 5, "category_id": 90, "iscrowd": 0, "segmentation": {{"counts": "{compressed}", "size": [48, 64]}}}},
        {{"id": 3, "image_id": 5, "category_id": 44, "iscrowd": 1, "segmentation": {{"counts": [0, 3072], "size": [48, 64]}}}},
        {{"id": 4, "image_id": 9, "category_id": 3, "iscrowd": 0, "segmentation": {{"counts": [480, 2592], "size": [48, 64]}}}}
      ]}}"#
    );
    let ann = root.join("instances_val.json");
    std::fs::write(&ann, json).unwrap();
    CocoOptions {
        train: Some(CocoSplitFiles { annotations: ann.clone(), images_dir: images.clone(), masks_dir: root.join("masks_train") }),
        val: CocoSplitFiles { annotations: ann, images_dir: images, masks_dir: root.join("masks_val") },
        folds: FoldScheme::Interleaved,
        cache_dir: None,
        no_cache: false,
    }
}

#[test]
fn coco_renders_masks_the_official_way_and_caches_them() {
    let dir = tempfile::tempdir().unwrap();
    let opts = write_coco(dir.path());
    let ds = FewShotDataset::open_coco(&opts).unwrap();
    assert_eq!(ds.kind(), DatasetKind::Coco);
    // Ascending category id: person(1)=1, car(3)=2, bottle(44)=3, zebra(90)=4.
    assert_eq!(ds.class_names(), &["person", "car", "bottle", "zebra"]);
    assert_eq!(ds.novel_classes(1).unwrap(), &[2]);
    let x = &ds.samples(Split::Val)[ds.find(Split::Val, "x").unwrap()];
    let (_, lab) = x.load().unwrap();
    // Polygon person over x in [0, 40), then zebra RLE over columns 10..20 overwrites; the crowd bottle covering everything is skipped.
    assert_eq!(lab.get(5, 20), 1);
    assert_eq!(lab.get(15, 20), 4);
    assert_eq!(lab.get(30, 20), 1);
    assert_eq!(lab.get(50, 20), 0);
    assert_eq!(x.pixels_of(3), 0, "crowd annotation must be skipped");
    // Uncompressed RLE: first 480 column-major pixels off = columns 0..10, the rest on.
    let (_, ylab) = ds.samples(Split::Val)[ds.find(Split::Val, "y").unwrap()].load().unwrap();
    assert_eq!((ylab.get(9, 0), ylab.get(10, 0), ylab.get(63, 47)), (0, 2, 2));
    // Masks are cached as PNG; a second open reuses them instead of re-rendering.
    let mask = opts.val.masks_dir.join("x.png");
    assert!(mask.exists());
    write_label_png(&mask, &Label::filled(64, 48, 3)).unwrap();
    let ds2 = FewShotDataset::open_coco(&opts).unwrap();
    let x2 = &ds2.samples(Split::Val)[ds2.find(Split::Val, "x").unwrap()];
    assert_eq!(x2.pixels_of(3), 64 * 48);
}

#[test]
fn coco_bad_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = write_coco(dir.path());
    let bad = dir.path().join("broken.json");
    std::fs::write(&bad, "{\"images\": [").unwrap();
    opts.val.annotations = bad;
    let e = FewShotDataset::open_coco(&opts).unwrap_err().to_string();
    assert!(e.contains("broken.json"), "{e}");
    // RLE whose counts do not cover the image.
    let opts = write_coco(dir.path());
    let text = std::fs::read_to_string(&opts.val.annotations).unwrap().replace("[480, 2592]", "[480, 100]");
    std::fs::write(&opts.val.annotations, text).unwrap();
    let _ = std::fs::remove_dir_all(&opts.val.masks_dir);
    let e = FewShotDataset::open_coco(&opts).unwrap_err().to_string();
    assert!(e.contains("instances_val.json") && e.contains("y.jpg"), "{e}");
}

#[test]
fn fss_and_user_folders() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fss");
    for (ci, class) in ["ant", "bee", "cat", "dog", "eel"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for n in 1..=3 {
            let (img, _) = scene(64, 64, &[]);
            image::DynamicImage::ImageRgb8(img).save(root.join(format!("{class}/{n}.jpg"))).unwrap();
            // 0/255 mask with a few anti-aliased mid values.
            let mut m = vec![0u8; 64 * 64];
            for (i, v) in m.iter_mut().enumerate() {
                let (x, y) = (i % 64, i / 64);
                *v = if x < 50 && y < 50 { 255 } else if x == 50 { 100 } else { 0 };
            }
            data::label::write_gray_png(&root.join(format!("{class}/{n}.png")), 64, 64, &m).unwrap();
        }
        let _ = ci;
    }
    let ds = FewShotDataset::open_fss(&root, &Default::default()).unwrap();
    assert_eq!(ds.num_classes(), 5);
    assert_eq!(ds.samples(Split::Train).len(), 15);
    let rec = &ds.samples(Split::Val)[ds.find(Split::Val, "cat/2").unwrap()];
    assert_eq!(rec.object_class, Some(3));
    assert_eq!(rec.pixels_of(3), 2500, "threshold 128: the 100-valued column is background");
    assert_eq!(ds.novel_classes(0).unwrap(), &[1]);

    // User folder: palette masks with an ignore region, and PNG images with _mask files.
    let user = dir.path().join("mine");
    for class in ["cups", "keys", "mugs", "pens"] {
        std::fs::create_dir_all(user.join(class)).unwrap();
        for n in ["a", "b"] {
            let (img, lab) = scene(64, 64, &[(1, 0, 0, 60, 60), (255, 60, 0, 64, 64)]);
            img.save(user.join(format!("{class}/{n}.png"))).unwrap();
            write_label_png(&user.join(format!("{class}/{n}_mask.png")), &lab).unwrap();
        }
    }
    let ds = FewShotDataset::open_folder(&user, &Default::default()).unwrap();
    assert_eq!(ds.class_names(), &["cups", "keys", "mugs", "pens"]);
    let rec = &ds.samples(Split::Train)[ds.find(Split::Train, "mugs/b").unwrap()];
    let (_, lab) = rec.load().unwrap();
    assert_eq!((lab.get(0, 0), lab.get(62, 5)), (1, 255));
    assert_eq!(rec.pixels_of(3), 3600);

    // A PNG image without a mask is an error naming it.
    let (img, _) = scene(8, 8, &[]);
    img.save(user.join("pens/lonely.png")).unwrap();
    let e = FewShotDataset::open_folder(&user, &data::folders::FolderOptions { no_cache: true, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("lonely.png"), "{e}");
}

/// Inserts an EXIF APP1 segment with the given orientation right after a JPEG's SOI marker.
fn with_exif_orientation(jpeg: &[u8], orientation: u8) -> Vec<u8> {
    let tiff: Vec<u8> = [
        &b"II\x2a\x00\x08\x00\x00\x00"[..],
        &[1, 0],                                    // one IFD entry
        &[0x12, 0x01, 3, 0, 1, 0, 0, 0, orientation, 0, 0, 0], // 0x0112 Orientation, SHORT, 1
        &[0, 0, 0, 0],                              // no next IFD
    ]
    .concat();
    let len = (2 + 6 + tiff.len()) as u16;
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b"Exif\0\0");
    out.extend_from_slice(&tiff);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_rotated_jpegs_are_turned_upright_like_detectron2() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("JPEGImages")).unwrap();
    std::fs::create_dir_all(root.join("SegmentationClass")).unwrap();
    std::fs::create_dir_all(root.join("ImageSets/Segmentation")).unwrap();
    // Stored 80 wide x 40 high, EXIF says "rotate 90 degrees clockwise" -> upright 40 x 80.
    let (img, _) = scene(80, 40, &[]);
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    std::fs::write(root.join("JPEGImages/r.jpg"), with_exif_orientation(&jpeg, 6)).unwrap();
    let decoded = data::dataset::decode_image(&root.join("JPEGImages/r.jpg")).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (40, 80));
    // An upright mask fits; one in the stored orientation is a size mismatch.
    std::fs::write(root.join("ImageSets/Segmentation/train.txt"), "r\n").unwrap();
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), "r\n").unwrap();
    let opts = VocOptions { no_cache: true, ..Default::default() };
    write_label_png(&root.join("SegmentationClass/r.png"), &Label::filled(40, 80, 3)).unwrap();
    let ds = FewShotDataset::open_voc(root, &opts).unwrap();
    let (img, lab) = ds.samples(Split::Val)[0].load().unwrap();
    assert_eq!((img.width(), img.height(), lab.width()), (40, 80, 40));
    write_label_png(&root.join("SegmentationClass/r.png"), &Label::filled(80, 40, 3)).unwrap();
    let e = FewShotDataset::open_voc(root, &opts).unwrap_err().to_string();
    assert!(e.contains("r.png") && e.contains("80x40"), "{e}");
}
