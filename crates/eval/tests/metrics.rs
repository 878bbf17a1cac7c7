use eval::*;

#[test]
fn episode_counts_exclude_ignore_pixels() {
    let pred = [1, 1, 0, 0, 1, 0];
    let label = [1, 0, 0, 255, 255, 1];
    let e = EpisodeIou::compute(&pred, &label);
    // valid pixels: (1,1) (1,0) (0,0) (0,1)
    assert_eq!(e.inter, [1, 1]);
    assert_eq!(e.union, [3, 3]);
    assert_eq!(e.valid, 4);
    assert!((e.fg_iou() - 1.0 / 3.0).abs() < 1e-9);
}

/// mIoU accumulates I and U per class over episodes (not a mean of episode IoUs), averages over
/// all fold classes; FB-IoU accumulates over all episodes.
#[test]
fn miou_and_fb_iou_follow_the_official_accumulation() {
    let mut m = FewShotMetrics::new(&[1, 2]);
    // class 1: episode A fg I=1 U=2, episode B fg I=3 U=3 → 4/5 = 80 %, mean of episodes would be 75 %.
    m.add(1, &[1, 1, 0, 0], &[1, 0, 0, 0]).unwrap();
    m.add(1, &[1, 1, 1, 0], &[1, 1, 1, 0]).unwrap();
    // class 2: I=0 U=1
    m.add(2, &[0, 0], &[1, 0]).unwrap();
    let s = m.summary();
    assert_eq!(s.episodes, 3);
    assert!((s.per_class[0].1 - 80.0).abs() < 1e-6, "{:?}", s.per_class);
    assert!((s.per_class[1].1 - 0.0).abs() < 1e-6);
    assert!((s.miou - 40.0).abs() < 1e-6);
    // bg: I = 2 + 1 + 1 = 4, U = 3 + 1 + 2 = 6; fg: I = 4, U = 6 → FB = (4/6 + 4/6)/2
    assert!((s.fb_iou - 100.0 * 4.0 / 6.0).abs() < 1e-6, "{}", s.fb_iou);
}

#[test]
fn a_class_without_episodes_counts_as_zero_and_bad_input_is_refused() {
    let mut m = FewShotMetrics::new(&[1, 2]);
    m.add(1, &[1], &[1]).unwrap();
    assert!((m.summary().miou - 50.0).abs() < 1e-6);
    let e = m.add(3, &[1], &[1]).unwrap_err().to_string();
    assert!(e.contains("class 3 is not one of this fold's classes [1, 2]"), "{e}");
    let e = m.add(1, &[1, 0], &[1]).unwrap_err().to_string();
    assert!(e.contains("prediction has 2 pixels but the label has 1"), "{e}");
}

#[test]
fn overlay_has_one_panel_per_image_and_tints_masks() {
    let im = image::RgbImage::from_pixel(4, 2, image::Rgb([100, 100, 100]));
    let mask = vec![1, 0, 0, 0, 0, 0, 0, 255];
    let t = tint(&im, &mask, [200, 0, 0]);
    assert_eq!(t.get_pixel(0, 0).0, [150, 50, 50]);
    assert_eq!(t.get_pixel(1, 0).0, [100, 100, 100]);
    assert_eq!(t.get_pixel(3, 1).0, [255, 255, 255]);
    let o = episode_overlay(&[(im.clone(), mask.clone())], &im, &mask, &mask, 8);
    assert_eq!(o.height(), 8 + eval::overlay_header_height(8));
    assert_eq!(o.width(), 4 * 16 + 3 * 4);
    // The header names the panels: the support's label is drawn in the support colour.
    let big = episode_overlay(&[(im.clone(), mask.clone())], &im, &mask, &mask, 160);
    let header = eval::overlay_header_height(160);
    let in_header = |c: [u8; 3]| (0..big.width()).any(|x| (0..header).any(|y| big.get_pixel(x, y).0 == c));
    assert!(in_header(eval::SUPPORT_COLOR) && in_header(eval::PREDICTION_COLOR) && in_header(eval::GROUND_TRUTH_COLOR));
    assert!((0..big.width()).all(|x| big.get_pixel(x, header - 1).0 == [32, 32, 32]), "labels stay above the panels");
}

#[test]
fn markdown_table_shows_baseline_ours_oracle() {
    let mut m = FewShotMetrics::new(&[1]);
    m.add(1, &[1, 0], &[1, 0]).unwrap();
    let s = m.summary();
    let r = BenchmarkReport {
        benchmark: "synthetic".into(),
        fold: 0,
        shot: 1,
        seeds: vec![1],
        episodes: 1,
        protocol: "official".into(),
        scores: MethodScores { ours: s.clone(), baseline: s.clone(), oracle: s },
    };
    let t = markdown_table(&[r.clone()]);
    assert!(t.contains("| synthetic | 0 | 1 | official | 1 | 100.0 | **100.0** | 100.0 | 100.0 |"), "{t}");
    assert!((r.headline()["miou"].as_f64().unwrap() - 100.0).abs() < 1e-6);
}
