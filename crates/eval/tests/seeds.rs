use eval::*;

#[test]
fn seed_stats_are_mean_and_sample_std() {
    let s = SeedStats::new(&[60.0, 62.0, 64.0]);
    assert!((s.mean - 62.0).abs() < 1e-12);
    // sample std: sqrt((4 + 0 + 4) / 2) = 2
    assert!((s.std.unwrap() - 2.0).abs() < 1e-12, "{s:?}");
    assert_eq!(s.display(1), "62.0 ± 2.0");
    let one = SeedStats::new(&[55.55]);
    assert_eq!(one.std, None);
    assert_eq!(one.display(1), "55.5");
}

/// Per seed, mIoU accumulates I/U per class over that seed's episodes; over seeds the figures
/// (and each class's IoU) are averaged, a class missing under one seed over the seeds having it.
#[test]
fn aggregation_over_seeds_averages_per_seed_accumulations() {
    let mut a = FewShotMetrics::new(&[1, 2]);
    a.add(1, &[1, 1, 0, 0], &[1, 0, 0, 0]).unwrap(); // class 1: I=1 U=2
    a.add(1, &[1, 1, 1, 0], &[1, 1, 1, 0]).unwrap(); // class 1: I=3 U=3 → 4/5 = 80 %
    a.add(2, &[1, 0], &[1, 0]).unwrap(); // class 2: 100 %
    let mut b = FewShotMetrics::new(&[1]);
    b.add(1, &[1, 0], &[1, 1]).unwrap(); // class 1: 50 %
    let (sa, sb) = (a.summary(), b.summary());
    assert!((sa.miou - 90.0).abs() < 1e-6);
    assert!((sb.miou - 50.0).abs() < 1e-6);
    let m = MethodOverSeeds::from_seeds(&[sa.clone(), sb.clone()]);
    assert!((m.miou.mean - 70.0).abs() < 1e-6);
    assert!((m.miou.std.unwrap() - (800.0f64).sqrt()).abs() < 1e-6);
    assert_eq!(m.miou.values.len(), 2);
    assert_eq!(m.per_class.len(), 2);
    assert_eq!(m.per_class[0].class_id, 1);
    assert!((m.per_class[0].iou.mean - 65.0).abs() < 1e-6, "{:?}", m.per_class);
    assert_eq!(m.per_class[0].episodes, 3);
    assert_eq!(m.per_class[1].iou.values, vec![sa.per_class[1].1]);
    assert_eq!(m.per_class[1].iou.std, None);
    assert!((m.fb_iou.mean - (sa.fb_iou + sb.fb_iou) / 2.0).abs() < 1e-9);
}

#[test]
fn add_counts_equals_add() {
    let pred = [1, 0, 1, 1, 0, 0];
    let label = [1, 1, 0, 255, 0, 1];
    let mut a = FewShotMetrics::new(&[3]);
    let e = a.add(3, &pred, &label).unwrap();
    let mut b = FewShotMetrics::new(&[3]);
    b.add_counts(3, &e).unwrap();
    assert_eq!(a.summary(), b.summary());
    assert_eq!(b.classes(), &[3]);
    assert!(b.add_counts(4, &e).is_err());
}

#[test]
fn summary_table_shows_std_only_for_several_seeds() {
    let row = |seeds: &[f64]| SummaryRow {
        benchmark: "synthetic".into(),
        fold: "all".into(),
        shot: 5,
        protocol: "original".into(),
        episodes: 1000,
        seeds: seeds.len(),
        baseline: SeedStats::new(&seeds.iter().map(|v| v - 10.0).collect::<Vec<_>>()),
        ours: SeedStats::new(seeds),
        oracle: SeedStats::new(&seeds.iter().map(|v| v + 10.0).collect::<Vec<_>>()),
        ours_fb_iou: SeedStats::new(seeds),
    };
    let t = markdown_summary(&[row(&[50.0]), row(&[50.0, 52.0])]);
    assert!(t.contains("| synthetic | all | 5 | original | 1000 × 1 | 40.0 | **50.0** | 60.0 | 50.0 |"), "{t}");
    assert!(t.contains("| 1000 × 2 | 41.0 ± 1.4 | **51.0 ± 1.4** | 61.0 ± 1.4 |"), "{t}");
}

#[test]
fn method_overlay_has_one_panel_per_prediction() {
    let im = image::RgbImage::from_pixel(4, 2, image::Rgb([100, 100, 100]));
    let mask = vec![1u8, 0, 0, 0, 0, 0, 0, 0];
    let o = episode_overlay_methods(
        &[(im.clone(), mask.clone()), (im.clone(), mask.clone())],
        &im,
        &[("a", &mask, [255, 0, 0]), ("b", &mask, [0, 0, 255]), ("c", &mask, [0, 255, 0])],
        &mask,
        8,
    );
    // 2 supports + query + 3 predictions + ground truth = 7 panels of 16 px, 6 gaps
    assert_eq!((o.width(), o.height()), (7 * 16 + 6 * 4, 8 + eval::overlay_header_height(8)));
}
