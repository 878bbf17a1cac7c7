//! Augmentation alignment, the training sampler and test episodes.

mod common;

use common::{colour_of, scene, small_pascal, write_voc, VocImage};
use data::{
    augment::ssd_color_jitter, augment_train, AugmentConfig, ClassId, DataError, Episode, FewShotDataset, SeededRng,
    Split, TestEpisodes, TrainEpisodeSampler, VocOptions, IGNORE,
};

fn small_ds() -> (tempfile::TempDir, FewShotDataset) {
    let dir = tempfile::tempdir().unwrap();
    small_pascal(dir.path());
    let ds = FewShotDataset::open_voc(dir.path(), &VocOptions::default()).unwrap();
    (dir, ds)
}

#[test]
fn augmentation_keeps_image_and_label_aligned() {
    // Asymmetric scene; every class has its own colour, so any misalignment (flip applied to
    // one but not the other, crop offsets differing, resize mismatch) shows up as a wrong colour.
    let (img, lab) = scene(300, 200, &[(3, 10, 10, 120, 90), (7, 150, 40, 290, 190), (12, 20, 120, 100, 195)]);
    let cfg = AugmentConfig { color_jitter: false, ..AugmentConfig::paper() };
    let mut flips_seen = [false; 2];
    for seed in 0..12 {
        let mut rng = SeededRng::from_seed(seed);
        let (aimg, alab) = augment_train(&img, &lab, &cfg, &mut rng);
        assert_eq!((aimg.width(), aimg.height(), alab.width(), alab.height()), (480, 480, 480, 480));
        let (w, h) = (480i32, 480i32);
        let mut checked = 0;
        for y in 0..h {
            for x in 0..w {
                let v = alab.get(x as u32, y as u32);
                let p = aimg.get_pixel(x as u32, y as u32).0;
                if v == IGNORE {
                    // Padding: image raw value 128.
                    assert_eq!(p, [128, 128, 128], "seed {seed} pad at {x},{y}");
                    continue;
                }
                // Interior pixels only: the bilinear image and nearest label may differ by up to
                // one source pixel at edges (as in the reference pipeline).
                let r = 6;
                let uniform = (-r..=r).all(|dy| {
                    (-r..=r).all(|dx| {
                        let (xx, yy) = (x + dx, y + dy);
                        xx < 0 || yy < 0 || xx >= w || yy >= h || alab.get(xx as u32, yy as u32) == v
                    })
                });
                if uniform {
                    let want = colour_of(v);
                    for c in 0..3 {
                        assert!((p[c] as i32 - want[c] as i32).abs() <= 1, "seed {seed} at {x},{y}: {p:?} vs {want:?} (label {v})");
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 10_000, "seed {seed}: only {checked} interior pixels");
        // Class 3 is top-left in the source: after a flip it is right of class 7's left edge.
        let (mut x3, mut n3, mut x7, mut n7) = (0u64, 0u64, 0u64, 0u64);
        for y in 0..480 {
            for x in 0..480 {
                match alab.get(x, y) {
                    3 => (x3, n3) = (x3 + x as u64, n3 + 1),
                    7 => (x7, n7) = (x7 + x as u64, n7 + 1),
                    _ => {}
                }
            }
        }
        if n3 > 0 && n7 > 0 {
            flips_seen[usize::from(x3 / n3 > x7 / n7)] = true;
        }
    }
    assert_eq!(flips_seen, [true, true], "both flipped and unflipped views should occur over 12 seeds");
}

#[test]
fn colour_jitter_changes_colours_but_keeps_grays_gray() {
    let base = image::RgbImage::from_fn(32, 8, |x, y| {
        if y < 4 {
            image::Rgb([(x * 8) as u8; 3])
        } else {
            image::Rgb([200, (x * 7) as u8, 30])
        }
    });
    let mut changed = 0;
    for seed in 0..20 {
        let mut img = base.clone();
        ssd_color_jitter(&mut img, &mut SeededRng::from_seed(seed));
        if img != base {
            changed += 1;
        }
        for y in 0..4 {
            for x in 0..32 {
                let p = img.get_pixel(x, y).0;
                assert!(p[0] == p[1] && p[1] == p[2], "gray pixel became {p:?}");
            }
        }
    }
    assert!(changed >= 15, "jitter changed only {changed}/20 images");
}

fn assert_same(a: &[Episode], b: &[Episode]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.class_id, &x.query_id, &x.support_ids), (y.class_id, &y.query_id, &y.support_ids));
        assert_eq!(x.query.image, y.query.image);
        assert_eq!(x.query.label, y.query.label);
        assert_eq!(x.supports[0].image, y.supports[0].image);
    }
}

#[test]
fn train_sampler_is_deterministic_and_batch_split_invariant() {
    let (_dir, ds) = small_ds();
    let cfg = AugmentConfig::with_crop_size(128);
    let mut a = TrainEpisodeSampler::new(&ds, 1, 1, 77, cfg.clone()).unwrap();
    let mut b = TrainEpisodeSampler::new(&ds, 1, 1, 77, cfg.clone()).unwrap();
    let whole = a.next_batch(6).unwrap();
    let mut parts = b.next_batch(2).unwrap();
    parts.extend(b.next_batch(4).unwrap());
    assert_same(&whole, &parts);
    assert_same(&whole[3..4], &[b.episode(3).unwrap()]);
    let mut c = TrainEpisodeSampler::new(&ds, 1, 1, 78, cfg).unwrap();
    let other = c.next_batch(6).unwrap();
    assert!(whole.iter().zip(&other).any(|(x, y)| x.query.image != y.query.image));
}

#[test]
fn train_episodes_use_base_classes_and_ignore_novel_pixels() {
    let (_dir, ds) = small_ds();
    let cfg = AugmentConfig::with_crop_size(128);
    let min_area = cfg.min_support_area;
    for fold in 0..4 {
        let novel = ds.novel_classes(fold).unwrap().to_vec();
        let mut s = TrainEpisodeSampler::new(&ds, fold, 1, fold as u64, cfg.clone()).unwrap();
        for ep in s.next_batch(8).unwrap() {
            assert!(!novel.contains(&ep.class_id), "fold {fold}: novel class {} sampled", ep.class_id);
            assert_eq!(ep.query.image.data.len(), 3 * 128 * 128);
            assert_eq!((ep.query.image.height, ep.query.image.width), (128, 128));
            let qh = ep.query.label.histogram();
            assert_eq!(qh.iter().enumerate().filter(|(v, n)| **n > 0 && ![0, 1, 255].contains(v)).count(), 0);
            assert!(qh[1] > 0, "query has no pixel of its class");
            // Stage-1 semantic label: no novel values, the episode class present.
            for v in ep.query_semantic.values_present() {
                assert!(!novel.contains(&(v as ClassId)), "novel value {v} left in query");
            }
            assert_eq!(ep.query_semantic.binary_for(ep.class_id as u8), ep.query.label);
            assert_eq!(ep.supports.len(), 1);
            assert!(!ep.support_ids.contains(&ep.query_id));
            let sup = &ep.supports[0];
            assert!(sup.label.count(1) as f64 >= min_area, "support area {} < {min_area}", sup.label.count(1));
            // The support really shows the class: check against the dataset's record.
            let rec = &ds.samples(Split::Train)[ds.find(Split::Train, &ep.support_ids[0]).unwrap()];
            assert!(rec.pixels_of(ep.class_id) >= 2048);
        }
    }
}

#[test]
fn novel_pixels_become_ignore_in_the_query() {
    let dir = tempfile::tempdir().unwrap();
    // Every image: base class 10 on the left, novel class 2 (fold 0) on the right.
    let ids: Vec<String> = (0..4).map(|i| format!("n{i}")).collect();
    let images: Vec<VocImage> = ids.iter().map(|id| VocImage { id, w: 120, h: 80, rects: vec![(10, 0, 0, 60, 80), (2, 60, 0, 120, 80)] }).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    write_voc(dir.path(), &images, &refs, &refs);
    let ds = FewShotDataset::open_voc(dir.path(), &VocOptions::default()).unwrap();
    let cfg = AugmentConfig { color_jitter: false, flip_prob: 0.0, ..AugmentConfig::with_crop_size(128) };
    let mut s = TrainEpisodeSampler::new(&ds, 0, 3, 5, cfg).unwrap();
    for ep in s.next_batch(4).unwrap() {
        assert_eq!(ep.class_id, 10);
        let h = ep.query_semantic.histogram();
        assert_eq!(h[2], 0);
        // No flip: the left part is class 10, the right part (novel) ignored where visible.
        let w = ep.query_semantic.width();
        assert_eq!(ep.query_semantic.get(0, 0), 10);
        let right = ep.query_semantic.get(w - 1, 0);
        assert_eq!(right, IGNORE);
        // 3 supports from the 3 other images: distinct and not the query.
        let mut sup = ep.support_ids.clone();
        sup.sort();
        sup.dedup();
        assert_eq!(sup.len(), 3);
        assert!(!sup.contains(&ep.query_id));
    }
}

#[test]
fn unsatisfiable_support_area_and_empty_fold_are_clear_errors() {
    let (_dir, ds) = small_ds();
    let cfg = AugmentConfig { min_support_area: 1e9, max_support_tries: 3, ..AugmentConfig::with_crop_size(64) };
    let mut s = TrainEpisodeSampler::new(&ds, 0, 1, 1, cfg).unwrap();
    match s.next_batch(1) {
        Err(DataError::SupportAreaUnsatisfiable { class_id, class_name, .. }) => {
            assert_eq!(ds.class_name(class_id).unwrap(), class_name);
        }
        other => panic!("expected SupportAreaUnsatisfiable, got {other:?}"),
    }
    // A dataset whose images hold only fold-0 novel classes has an empty fold-0 train list.
    let dir = tempfile::tempdir().unwrap();
    let images = vec![
        VocImage { id: "p", w: 64, h: 64, rects: vec![(1, 0, 0, 64, 64)] },
        VocImage { id: "q", w: 64, h: 64, rects: vec![(2, 0, 0, 64, 64)] },
    ];
    write_voc(dir.path(), &images, &["p", "q"], &["p", "q"]);
    let ds = FewShotDataset::open_voc(dir.path(), &VocOptions::default()).unwrap();
    let e = TrainEpisodeSampler::new(&ds, 0, 1, 1, AugmentConfig::paper()).err().unwrap();
    assert!(matches!(e, DataError::Empty { .. }), "{e}");
    assert!(TrainEpisodeSampler::new(&ds, 0, 0, 1, AugmentConfig::paper()).is_err());
}

#[test]
fn test_episodes_follow_the_protocol() {
    let (_dir, ds) = small_ds();
    let eps = TestEpisodes::generate(&ds, 2, 1, 50, 5448843).unwrap();
    assert_eq!(eps.len(), 50);
    let novel = ds.novel_classes(2).unwrap();
    for e in &eps.episodes {
        assert!(novel.contains(&e.class_id));
        assert_eq!(e.supports.len(), 5, "5 supports are drawn even for 1-shot");
        assert!(!e.supports.contains(&e.query));
        let q = &ds.samples(Split::Val)[ds.find(Split::Val, &e.query).unwrap()];
        assert!(q.pixels_of(e.class_id) > 0);
    }
    // Every usable val image is a query about equally often (repeat-then-shuffle).
    let list = ds.fold_list(Split::Val, 2).unwrap();
    assert_eq!(list.images.len(), 10);
    let mut counts = std::collections::HashMap::new();
    for e in &eps.episodes {
        *counts.entry(e.query.clone()).or_insert(0) += 1;
    }
    assert!(counts.values().all(|&c| c == 5), "{counts:?}");
    // Same seed -> same episodes; 5-shot shares queries and supports; other seed differs.
    assert_eq!(eps, TestEpisodes::generate(&ds, 2, 1, 50, 5448843).unwrap());
    let five = TestEpisodes::generate(&ds, 2, 5, 50, 5448843).unwrap();
    assert_eq!(five.episodes, eps.episodes);
    assert_ne!(TestEpisodes::generate(&ds, 2, 1, 50, 1).unwrap().episodes, eps.episodes);
    // The official defaults.
    let d = TestEpisodes::generate_default(&ds, 1, 1).unwrap();
    assert_eq!((d.len(), d.seed), (1000, 7743485));
}

#[test]
fn test_episodes_round_trip_json_and_validate_on_import() {
    let (_dir, ds) = small_ds();
    let eps = TestEpisodes::generate(&ds, 0, 1, 20, 4604572).unwrap();
    let json = eps.to_json();
    assert_eq!(TestEpisodes::from_json(&json, &ds, "eps.json").unwrap(), eps);

    let reject = |mutate: &dyn Fn(&mut TestEpisodes), what: &str| {
        let mut bad = eps.clone();
        mutate(&mut bad);
        let e = TestEpisodes::from_json(&bad.to_json(), &ds, "eps.json").unwrap_err().to_string();
        assert!(e.contains("eps.json"), "{what}: {e}");
        e
    };
    let e = reject(&|t| t.episodes[3].class_id = 12, "base class");
    assert!(e.contains("not novel"), "{e}");
    let e = reject(&|t| t.episodes[0].query = "nope".into(), "unknown id");
    assert!(e.contains("nope"), "{e}");
    reject(&|t| t.shot = 6, "too few supports");
    reject(&|t| t.fold = 9, "fold");
    reject(&|t| t.format = "other".into(), "format");
    // A support that does not contain the class.
    let e = reject(
        &|t| {
            let c = t.episodes[0].class_id;
            let wrong = ds.samples(Split::Val).iter().find(|s| s.pixels_of(c) == 0).unwrap().id.clone();
            t.episodes[0].supports[0] = wrong;
        },
        "support without class",
    );
    assert!(e.contains("does not contain"), "{e}");
    let e = TestEpisodes::from_json("{\"format\": 3", &ds, "cut.json").unwrap_err().to_string();
    assert!(e.contains("cut.json"), "{e}");

    // File round trip.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fold0.json");
    eps.write_json(&path).unwrap();
    assert_eq!(TestEpisodes::read_json(&path, &ds).unwrap(), eps);
}

#[test]
fn test_views_are_resized_and_binary() {
    let (_dir, ds) = small_ds();
    let eps = TestEpisodes::generate(&ds, 3, 1, 6, 2534673).unwrap();
    let loaded = eps.load_range(&ds, 0..6, 80).unwrap();
    for (spec, ep) in eps.episodes.iter().zip(&loaded) {
        assert_eq!(ep.class_id, spec.class_id);
        assert_eq!(ep.support_ids, spec.supports[..1].to_vec());
        assert_eq!(ep.query.image.data.len(), 3 * 80 * 80);
        assert_eq!((ep.query.label.width(), ep.query.label.height()), (80, 80));
        let h = ep.query.label.histogram();
        assert!(h[1] > 0 && h[0] > 0);
        assert_eq!(h[1] + h[0] + h[255], 80 * 80);
        assert!(ep.supports[0].label.count(1) > 0);
        // Source 96x64 -> 80x80, torch-nearest: row y reads floor(y * 0.8); the ignore rows 0..2
        // of the source become rows 0..=2, row 3 reads source row 2.
        assert_eq!(ep.query.label.get(40, 2), IGNORE);
        assert_ne!(ep.query.label.get(40, 3), IGNORE);
    }
    assert!(eps.load(&ds, 99, 80).is_err());
}
