//! Behaviour of the synthetic few-shot dataset generator (`data::synthetic`).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;

use data::synthetic::{
    class_names, class_specs, fold_classes, generate, read_label_png, write_contact_sheet, Split,
    SyntheticConfig, SyntheticError, CLASSES_PER_FOLD, LIST_MIN_PIXELS, NUM_CLASSES, PALETTES,
};

fn small_cfg(seed: u64) -> SyntheticConfig {
    SyntheticConfig {
        seed,
        num_train: 12,
        num_val: 6,
        image_size: (160, 128),
        min_primary_pixels: 2100,
        ..SyntheticConfig::default()
    }
}

/// Default image size and generation knobs, with just enough images that every class is the
/// guaranteed class of two train images and one val image.
fn coverage_cfg() -> SyntheticConfig {
    SyntheticConfig {
        seed: 99,
        num_train: 2 * NUM_CLASSES,
        num_val: NUM_CLASSES,
        ..SyntheticConfig::default()
    }
}

fn ids(root: &Path, split: &str) -> Vec<String> {
    fs::read_to_string(root.join(format!("ImageSets/Segmentation/{split}.txt")))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn label(root: &Path, id: &str) -> (u32, u32, Vec<u8>) {
    read_label_png(&root.join(format!("SegmentationClassAug/{id}.png"))).unwrap()
}

/// All files under `root`, relative path -> bytes.
fn tree(root: &Path) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn synthetic_same_seed_is_byte_identical_across_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let cfg = small_cfg(7);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let three = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    one.install(|| generate(&cfg, &a, None)).unwrap();
    three.install(|| generate(&cfg, &b, None)).unwrap();
    let (ta, tb) = (tree(&a), tree(&b));
    // 18 jpg + 18 png + 2 lists + classes.txt + synthetic.json
    assert_eq!(ta.len(), 40);
    assert!(
        ta == tb,
        "same seed must give identical files regardless of thread count"
    );

    generate(&small_cfg(8), &c, None).unwrap();
    let tc = tree(&c);
    for id in [
        "JPEGImages/train_000000.jpg",
        "SegmentationClassAug/val_000005.png",
    ] {
        assert_ne!(ta[id], tc[id], "{id} should depend on the seed");
    }
    let differing_labels = ta
        .keys()
        .filter(|k| k.ends_with(".png"))
        .filter(|k| ta[*k] != tc[*k])
        .count();
    assert_eq!(differing_labels, 18);
}

#[test]
fn synthetic_labels_are_palette_pngs_with_valid_indices() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = small_cfg(3);
    generate(&cfg, &root, None).unwrap();
    let (w, h) = cfg.image_size;
    for split in ["train", "val"] {
        for id in ids(&root, split) {
            // Raw PNG header: indexed 8-bit with a full VOC colour map.
            let file = fs::File::open(root.join(format!("SegmentationClassAug/{id}.png"))).unwrap();
            let reader = png::Decoder::new(std::io::BufReader::new(file))
                .read_info()
                .unwrap();
            let info = reader.info();
            assert_eq!(info.color_type, png::ColorType::Indexed);
            assert_eq!(info.bit_depth, png::BitDepth::Eight);
            let pal = info.palette.as_ref().expect("PLTE chunk").to_vec();
            assert_eq!(pal.len(), 768);
            assert_eq!(&pal[0..3], &[0, 0, 0]);
            assert_eq!(&pal[3..6], &[128, 0, 0]); // VOC class 1
            assert_eq!(&pal[15 * 3..16 * 3], &[192, 128, 128]); // VOC class 15
            assert_eq!(&pal[255 * 3..], &[224, 224, 192]); // VOC ignore colour

            let (lw, lh, idx) = label(&root, &id);
            assert_eq!((lw, lh), (w, h));
            assert_eq!(idx.len(), (w * h) as usize);
            assert!(
                idx.iter().all(|&v| v == 255 || (v as usize) <= NUM_CLASSES),
                "{id}"
            );
            assert!(
                idx.iter().any(|&v| v != 0 && v != 255),
                "{id} has no object"
            );

            let img = image::open(root.join(format!("JPEGImages/{id}.jpg"))).unwrap();
            assert_eq!((img.width(), img.height()), (w, h));
            assert_eq!(img.color(), image::ColorType::Rgb8);
        }
    }
}

#[test]
fn synthetic_every_class_is_listed_in_both_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = coverage_cfg();
    let summary = generate(&cfg, &root, None).unwrap();
    assert_eq!(summary.num_classes, NUM_CLASSES);
    for (split, stored) in [
        ("train", &summary.train_images_per_class),
        ("val", &summary.val_images_per_class),
    ] {
        // Recount from the written PNGs rather than trusting the summary.
        let mut counts = vec![0usize; NUM_CLASSES];
        for id in ids(&root, split) {
            let (_, _, idx) = label(&root, &id);
            let mut px = [0u64; 256];
            for &v in &idx {
                px[v as usize] += 1;
            }
            for c in 1..=NUM_CLASSES {
                counts[c - 1] += (px[c] >= LIST_MIN_PIXELS) as usize;
            }
        }
        assert_eq!(&counts, stored, "{split} summary disagrees with the PNGs");
        let want = if split == "train" { 2 } else { 1 };
        for (c, &n) in counts.iter().enumerate() {
            assert!(
                n >= want,
                "class {} has {n} {split} images with >= {LIST_MIN_PIXELS} px",
                c + 1
            );
        }
    }
    // Ignore band: present, but a small part of the image.
    assert!(
        summary.ignore_fraction > 0.01 && summary.ignore_fraction < 0.15,
        "{}",
        summary.ignore_fraction
    );
    assert!(summary.bytes_on_disk > 0);

    let sheet = tmp.path().join("contact.png");
    write_contact_sheet(&root, Split::Train, 3, &sheet).unwrap();
    let sheet = image::open(&sheet).unwrap();
    // Three panels (image, label, overlay) per row, one row per image, 4 px gaps.
    assert_eq!(
        (sheet.width(), sheet.height()),
        (3 * 256 + 8, 3 * (256 + 4))
    );
}

#[test]
fn synthetic_classes_file_and_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = small_cfg(11);
    let summary = generate(&cfg, &root, None).unwrap();
    let names: Vec<String> = fs::read_to_string(root.join("classes.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 40);
    assert_eq!(names, class_names());
    assert_eq!(
        names.iter().collect::<HashSet<_>>().len(),
        names.len(),
        "class names must be unique"
    );

    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join("synthetic.json")).unwrap()).unwrap();
    let stored: SyntheticConfig = serde_json::from_value(m["config"].clone()).unwrap();
    assert_eq!(stored, cfg);
    assert_eq!(m["summary"]["num_train"], 12);
    assert_eq!(m["summary"]["bytes_on_disk"], summary.bytes_on_disk);
    assert_eq!(ids(&root, "train").len(), 12);
    assert_eq!(ids(&root, "val").len(), 6);
    assert_eq!(ids(&root, "val")[0], "val_000000");
}

#[test]
fn synthetic_reuse_does_not_rewrite_and_changed_config_does() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = small_cfg(5);
    let first = generate(&cfg, &root, None).unwrap();
    // A sentinel survives only if the folder is left alone.
    fs::write(root.join("sentinel"), b"x").unwrap();
    let jpg = root.join("JPEGImages/train_000000.jpg");
    let mtime = fs::metadata(&jpg).unwrap().modified().unwrap();

    let calls = std::sync::atomic::AtomicUsize::new(0);
    let progress = |_: usize, _: usize| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let again = generate(&cfg, &root, Some(&progress)).unwrap();
    assert_eq!(again, first);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "reuse must not render"
    );
    assert!(root.join("sentinel").exists());
    assert_eq!(fs::metadata(&jpg).unwrap().modified().unwrap(), mtime);

    // A different config replaces the folder atomically (no sentinel, new manifest, progress).
    let cfg2 = SyntheticConfig {
        seed: 6,
        ..cfg.clone()
    };
    generate(&cfg2, &root, Some(&progress)).unwrap();
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 18);
    assert!(!root.join("sentinel").exists());
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join("synthetic.json")).unwrap()).unwrap();
    assert_eq!(m["config"]["seed"], 6);
    // No temporary or retired folders are left next to it.
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // A truncated dataset (list shortened) is not reused.
    fs::write(root.join("ImageSets/Segmentation/val.txt"), "val_000000\n").unwrap();
    generate(&cfg2, &root, None).unwrap();
    assert_eq!(ids(&root, "val").len(), 6);
}

#[test]
fn synthetic_refuses_to_replace_foreign_folders_and_bad_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("precious");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("thesis.tex"), b"keep me").unwrap();
    let err = generate(&small_cfg(1), &root, None).unwrap_err();
    assert!(matches!(err, SyntheticError::NotSynthetic(_)), "{err}");
    assert_eq!(fs::read(root.join("thesis.tex")).unwrap(), b"keep me");

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    generate(&small_cfg(1), &empty, None).unwrap();
    assert!(empty.join("synthetic.json").is_file());

    let bad = [
        SyntheticConfig {
            image_size: (0, 128),
            ..small_cfg(1)
        },
        SyntheticConfig {
            num_val: 0,
            ..small_cfg(1)
        },
        SyntheticConfig {
            objects_per_image: (3, 2),
            ..small_cfg(1)
        },
        SyntheticConfig {
            jpeg_quality: 0,
            ..small_cfg(1)
        },
        // 2800 px cannot be guaranteed in a 64x64 image.
        SyntheticConfig {
            image_size: (64, 64),
            min_primary_pixels: 2800,
            ..small_cfg(1)
        },
    ];
    for cfg in bad {
        let out = tmp.path().join("bad");
        let err = generate(&cfg, &out, None).unwrap_err();
        assert!(
            matches!(err, SyntheticError::InvalidConfig(_)),
            "{cfg:?}: {err}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn synthetic_objects_are_surrounded_by_ignore_borders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = small_cfg(21);
    generate(&cfg, &root, None).unwrap();
    let (w, h) = (cfg.image_size.0 as usize, cfg.image_size.1 as usize);
    for id in ids(&root, "train").iter().chain(&ids(&root, "val")) {
        let (_, _, idx) = label(&root, id);
        assert!(idx.contains(&255), "{id} has no ignore band");
        // Two different non-ignore labels never touch (4- or 8-neighbourhood): a 255 band sits
        // between every object and the background and between objects.
        for y in 0..h {
            for x in 0..w {
                let a = idx[y * w + x];
                if a == 255 {
                    continue;
                }
                for (dx, dy) in [(1i64, 0i64), (0, 1), (1, 1), (1, -1)] {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let b = idx[ny as usize * w + nx as usize];
                    assert!(
                        b == 255 || b == a,
                        "{id}: labels {a} and {b} touch at ({x}, {y})"
                    );
                }
                // ...and the band is `ignore_border` wide: within distance 2 of a different
                // label there is no valid pixel (checked along rows).
                if x + 2 < w {
                    let c = idx[y * w + x + 2];
                    assert!(
                        c == 255 || c == a,
                        "{id}: band narrower than 2 px at ({x}, {y})"
                    );
                }
            }
        }
    }
}

#[test]
fn synthetic_no_single_cue_identifies_a_class() {
    let specs = class_specs();
    assert_eq!(specs.len(), NUM_CLASSES);
    let count = |f: &dyn Fn(&data::synthetic::ClassSpec) -> String| {
        let mut m: HashMap<String, usize> = HashMap::new();
        for s in &specs {
            *m.entry(f(s)).or_default() += 1;
        }
        m
    };
    // Every palette, texture and shape is shared by several classes, and so is every
    // (texture, palette) and (shape, palette) pair; only (shape, texture) is unique.
    assert!(count(&|s| s.palette.to_string()).values().all(|&n| n >= 8));
    assert_eq!(count(&|s| s.palette.to_string()).len(), PALETTES.len());
    assert!(count(&|s| format!("{:?}", s.texture))
        .values()
        .all(|&n| n >= 8));
    assert!(count(&|s| format!("{:?}", s.shape))
        .values()
        .all(|&n| n >= 4));
    assert!(count(&|s| format!("{:?}{}", s.texture, s.palette))
        .values()
        .all(|&n| n >= 2));
    assert!(count(&|s| format!("{:?}{}", s.shape, s.palette))
        .values()
        .all(|&n| n >= 2));
    assert!(count(&|s| format!("{:?}{:?}", s.shape, s.texture))
        .values()
        .all(|&n| n == 1));

    // Few-shot property: every novel class's shape, texture and palette occur among its fold's
    // base classes, so a base-trained model has seen every ingredient but not the combination.
    for fold in 0..4 {
        let novel = fold_classes(fold).unwrap();
        assert_eq!(novel.len(), CLASSES_PER_FOLD);
        assert_eq!(novel[0] as usize, fold * CLASSES_PER_FOLD + 1);
        let base: Vec<_> = specs.iter().filter(|s| !novel.contains(&s.id)).collect();
        for &c in &novel {
            let s = specs[c as usize - 1];
            assert_eq!(s.fold(), fold);
            assert!(base.iter().any(|b| b.shape == s.shape));
            assert!(base.iter().any(|b| b.texture == s.texture));
            assert!(base.iter().filter(|b| b.palette == s.palette).count() >= 5);
        }
    }
    assert!(fold_classes(4).is_none());
}

/// Empirical check on rendered pixels: predicting the class from an object's mean colour
/// (leave-one-out nearest neighbour over all (image, class) samples) must be far from reliable.
/// If palettes were class-specific this would score near 100%.
#[test]
fn synthetic_mean_colour_does_not_identify_the_class() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = SyntheticConfig {
        seed: 4,
        num_train: 160,
        num_val: 1,
        image_size: (128, 128),
        min_primary_pixels: 1200,
        ..SyntheticConfig::default()
    };
    generate(&cfg, &root, None).unwrap();
    let mut samples: Vec<([f64; 3], u8)> = Vec::new();
    for id in ids(&root, "train") {
        let img = image::open(root.join(format!("JPEGImages/{id}.jpg")))
            .unwrap()
            .to_rgb8();
        let (_, _, idx) = label(&root, &id);
        let mut sum: HashMap<u8, ([f64; 3], usize)> = HashMap::new();
        for (i, &l) in idx.iter().enumerate() {
            if l == 0 || l == 255 {
                continue;
            }
            let p = img.as_raw();
            let e = sum.entry(l).or_default();
            for k in 0..3 {
                e.0[k] += p[3 * i + k] as f64;
            }
            e.1 += 1;
        }
        for (c, (s, n)) in sum {
            if n >= 200 {
                samples.push(([s[0] / n as f64, s[1] / n as f64, s[2] / n as f64], c));
            }
        }
    }
    assert!(samples.len() >= 200, "{} samples", samples.len());
    let mut correct = 0;
    for (i, (a, ca)) in samples.iter().enumerate() {
        let nearest = samples
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .min_by(|(_, (x, _)), (_, (y, _))| {
                let d = |v: &[f64; 3]| (0..3).map(|k| (v[k] - a[k]).powi(2)).sum::<f64>();
                d(x).total_cmp(&d(y))
            })
            .unwrap();
        correct += (nearest.1 .1 == *ca) as usize;
    }
    let acc = correct as f64 / samples.len() as f64;
    eprintln!(
        "mean-colour 1-NN class accuracy: {acc:.3} over {} samples",
        samples.len()
    );
    assert!(
        acc < 0.25,
        "mean colour identifies the class too well: {acc}"
    );
}

/// Full default-size generation with timing; run with `--ignored --nocapture`.
#[test]
#[ignore]
fn synthetic_default_generation_report() {
    let out = std::env::var("SYNTHETIC_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("synthetic_default"));
    let cfg = SyntheticConfig::default();
    let t = std::time::Instant::now();
    let s = generate(&cfg, &out, None).unwrap();
    eprintln!("generated in {:.1}s: {:?}", t.elapsed().as_secs_f64(), s);
    eprintln!(
        "min train/val images per class: {} / {}",
        s.train_images_per_class.iter().min().unwrap(),
        s.val_images_per_class.iter().min().unwrap()
    );
    write_contact_sheet(
        &out,
        Split::Train,
        8,
        &std::env::temp_dir().join("synthetic_contact.png"),
    )
    .unwrap();
}

#[test]
fn synthetic_existing_summary_reports_reusable_folders_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = small_cfg(12);
    assert_eq!(
        data::synthetic::existing_summary(&cfg, &root).unwrap(),
        None
    );
    let s = generate(&cfg, &root, None).unwrap();
    assert_eq!(
        data::synthetic::existing_summary(&cfg, &root).unwrap(),
        Some(s)
    );
    let other = SyntheticConfig {
        num_val: 7,
        ..cfg.clone()
    };
    assert_eq!(
        data::synthetic::existing_summary(&other, &root).unwrap(),
        None
    );
    // A plain file where the folder should be is refused, not overwritten.
    let file = tmp.path().join("file");
    fs::write(&file, b"data").unwrap();
    assert!(matches!(
        generate(&cfg, &file, None),
        Err(SyntheticError::NotSynthetic(_))
    ));
    assert_eq!(fs::read(&file).unwrap(), b"data");
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Pins the generator's output across machines and releases: the decoded label indices of a
/// fixed config must hash to the recorded value (lossless, so independent of the PNG compressor).
/// If a deliberate generator change moves this, bump `FORMAT_VERSION` and record the new hash.
#[test]
fn synthetic_labels_match_the_recorded_golden_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ds");
    let cfg = small_cfg(2024);
    generate(&cfg, &root, None).unwrap();
    let mut all = Vec::new();
    for split in ["train", "val"] {
        for id in ids(&root, split) {
            all.extend(label(&root, &id).2);
        }
    }
    assert_eq!(data::synthetic::FORMAT_VERSION, 1);
    assert_eq!(
        fnv1a(&all),
        12_126_038_487_912_333_785,
        "label hash changed"
    );
}
