//! The dataset scan cache is keyed by each file's length and modification time and its class
//! ids are checked against the dataset; cached (8-bit) labels refuse class ids they cannot hold.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{jpeg_bytes, scene, small_pascal};
use data::cached::{cached_test_view, class_id_label};
use data::{DataError, FewShotDataset, FolderOptions, Split, VocOptions};

fn open(root: &Path) -> FewShotDataset {
    FewShotDataset::open_voc(root, &VocOptions::default()).unwrap()
}

fn classes_of(ds: &FewShotDataset, id: &str) -> Vec<(u16, u64)> {
    let rec = &ds.samples(Split::Val)[ds.find(Split::Val, id).unwrap()];
    rec.classes.iter().map(|p| (p.class_id, p.pixels)).collect()
}

fn touch(path: &Path, when: SystemTime) {
    std::fs::File::options().write(true).open(path).unwrap().set_modified(when).unwrap();
}

#[test]
fn a_label_rewritten_to_the_same_length_is_rescanned() {
    let dir = tempfile::tempdir().unwrap();
    small_pascal(dir.path());
    let before = classes_of(&open(dir.path()), "img00");
    assert_eq!(before.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 8]);
    // img00 is class 1 on the left, class 8 on the right. Repaint the left half with another
    // class whose PNG happens to compress to the same length: a length-only key misses it.
    let label = dir.path().join("SegmentationClassAug/img00.png");
    let len = std::fs::metadata(&label).unwrap().len();
    let original = std::fs::read(&label).unwrap();
    let class = (2..=20u8)
        .filter(|&c| c != 8)
        .find(|&c| {
            let (_, lab) = scene(96, 64, &[(c, 0, 0, 48, 64), (8, 48, 0, 96, 64), (255, 0, 0, 96, 2)]);
            data::write_label_png(&label, &lab).unwrap();
            std::fs::metadata(&label).unwrap().len() == len
        })
        .expect("some class id compresses to the same length");
    assert_ne!(std::fs::read(&label).unwrap(), original);
    // Even a clock that did not move much: the time differs from the cached one.
    touch(&label, SystemTime::now() + Duration::from_secs(5));
    let after = classes_of(&open(dir.path()), "img00");
    let mut want = vec![(class as u16, before[0].1), (8, before[1].1)];
    want.sort();
    assert_eq!(after, want, "the cache must not answer for a changed file");
}

#[test]
fn a_replaced_image_is_rescanned_and_its_size_checked() {
    let dir = tempfile::tempdir().unwrap();
    small_pascal(dir.path());
    let _ = open(dir.path());
    // The image is replaced by one of another size: a rescan finds the mismatch at open time.
    let image = dir.path().join("JPEGImages/img03.png");
    image::RgbImage::new(50, 40).save(&image).unwrap();
    let e = FewShotDataset::open_voc(dir.path(), &VocOptions::default()).unwrap_err().to_string();
    assert!(e.contains("img03.png") && e.contains("50x40"), "{e}");
}

#[test]
fn cached_class_ids_outside_the_dataset_are_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    small_pascal(dir.path());
    let truth = classes_of(&open(dir.path()), "img00");
    let cache = dir.path().join(".fewshot_cache/scan-val.json");
    let text = std::fs::read_to_string(&cache).unwrap();
    // Each edit keeps the file stamps (the cache matches the files) but lists a class that no
    // scan of this 20-class dataset can produce.
    let edits = [
        r#""class_id":99,"value":99"#, // unknown class
        r#""class_id":0,"value":0"#,   // background as a class
        r#""class_id":3,"value":1"#,   // value that does not stand for the class
        r#""class_id":255,"value":255"#,
    ];
    for edit in edits {
        let tampered = text.replacen(r#""class_id":1,"value":1"#, edit, 1);
        assert_ne!(text, tampered);
        std::fs::write(&cache, &tampered).unwrap();
        let ds = open(dir.path());
        assert_eq!(classes_of(&ds, "img00"), truth, "{edit}");
        assert!(ds.samples(Split::Val).iter().all(|s| s.classes.iter().all(|p| (1..=20).contains(&p.class_id))), "{edit}");
    }
}

#[test]
fn class_ids_above_254_are_refused_when_cached_not_wrapped() {
    // 260 class folders of one tiny image each: class id = folder rank + 1.
    let dir = tempfile::tempdir().unwrap();
    let jpeg = jpeg_bytes(8, 8);
    for c in 0..260 {
        let folder = dir.path().join(format!("c{c:03}"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("1.jpg"), &jpeg).unwrap();
        data::label::write_gray_png(&folder.join("1.png"), 8, 8, &[255; 64]).unwrap();
    }
    let ds = FewShotDataset::open_folder(dir.path(), &FolderOptions { no_cache: true, ..Default::default() }).unwrap();
    assert_eq!(ds.num_classes(), 260);
    let sample = |class: u16| ds.samples(Split::Train).iter().find(|s| s.object_class == Some(class)).unwrap();
    // 254 fits: its cached label holds 254.
    let (_, label) = cached_test_view(sample(254), 16).unwrap();
    assert!(label.data().iter().all(|&v| v == 254));
    for class in [255u16, 256, 260] {
        let e = cached_test_view(sample(class), 16).unwrap_err();
        assert!(matches!(e, DataError::ClassIdTooWide { class_id, .. } if class_id == class), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("class id {class}")) && msg.contains(&format!("c{:03}", class - 1)) && msg.contains("254"), "{msg}");
        let (_, raw) = sample(class).load().unwrap();
        assert!(class_id_label(sample(class), &raw).is_err());
    }
}
