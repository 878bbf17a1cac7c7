//! Stage-2 episodes drawn from shards: spec §4.4 semantics over cached views, determinism, label
//! rules, and test episodes by image id.

use std::path::PathBuf;

use data::cached::binary_label;
use data::shard::*;
use data::{ShardDataset, ShardEpisodeSampler, TestEpisodes};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mmformer-shard-ep-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn spec() -> ShardSpec {
    ShardSpec {
        model_fingerprint: "m".into(),
        preprocess_fingerprint: "p".into(),
        backbone: "efficientnet-lite0".into(),
        feature_names: vec!["res5".into()],
        feature_dtype: StoredDType::F32,
        mask_dtype: StoredDType::U8Prob,
        num_queries: 2,
    }
}

const H: usize = 16;
const W: usize = 16;

/// Image `i`, view `k`: class `1 + i % 4` fills the left `cols` columns, class 5 (novel in the
/// tests) the right 4 columns, a 255 row at the bottom. View 1 of odd images has only 2 columns
/// of its class (below the support minimum used in the tests).
fn record(i: usize, k: u32) -> ProposalRecord {
    let class = 1 + (i % 4) as u8;
    let cols = if k == 1 && i % 2 == 1 { 2 } else { 8 };
    let mut label = vec![0u8; H * W];
    for y in 0..H {
        for x in 0..W {
            label[y * W + x] = if y == H - 1 {
                255
            } else if x < cols {
                class
            } else if x >= W - 4 {
                5
            } else {
                0
            };
        }
    }
    ProposalRecord {
        image_id: format!("img{i:02}"),
        view: ShardView::Augmented(k),
        input_hw: (H, W),
        features: vec![(vec![1, 1, 1], vec![i as f32 + k as f32 / 10.0])],
        proposals: (vec![2, 4, 4], vec![0.5; 32]),
        label,
    }
}

fn write(dir: &std::path::Path, images: usize, views: u32) {
    let mut w = ShardWriter::new(dir, 0, spec()).unwrap();
    for i in 0..images {
        for k in 0..views {
            w.push(&record(i, k)).unwrap();
        }
    }
    w.finish().unwrap();
    ShardIndex::merge(dir).unwrap();
}

#[test]
fn index_records_class_pixel_counts() {
    let dir = tmpdir("counts");
    write(&dir, 2, 2);
    let r = ShardReader::open(&dir, &ShardExpectation::default()).unwrap();
    let m = r.records().iter().find(|m| m.image_id == "img01" && m.view == ShardView::Augmented(1)).unwrap();
    // 15 labelled rows: class 2 in 2 columns, class 5 in 4, background in the other 10.
    assert_eq!(m.classes, vec![(0, 15 * 10), (2, 15 * 2), (5, 15 * 4)]);
}

#[test]
fn episodes_follow_the_training_rules_and_are_deterministic() {
    let dir = tmpdir("rules");
    write(&dir, 12, 2);
    let reader = ShardReader::open(&dir, &ShardExpectation::default()).unwrap();
    let min_area = 15.0 * 8.0; // only 8-column views qualify as supports
    let novel = [5u16];
    let sampler = ShardEpisodeSampler::new(reader.records(), &novel, 2, 7, min_area).unwrap();
    assert_eq!(sampler.num_images(), 12);
    assert_eq!(sampler.classes(), vec![1, 2, 3, 4]);
    let records = reader.records();
    for n in 0..200 {
        let e = sampler.episode(n).unwrap();
        assert_eq!(e, sampler.episode(n).unwrap(), "episode {n} must be reproducible");
        let q = &records[e.query];
        assert!(q.classes.iter().any(|&(c, _)| c as u16 == e.class_id), "query view holds the class");
        assert_ne!(e.class_id, 5, "novel classes never form training episodes");
        assert_eq!(e.supports.len(), 2);
        let mut imgs = Vec::new();
        for &s in &e.supports {
            let m = &records[s];
            assert_ne!(m.image_id, q.image_id, "support from another image");
            let px = m.classes.iter().find(|&&(c, _)| c as u16 == e.class_id).map_or(0, |&(_, p)| p);
            assert!(px as f64 >= min_area, "episode {n}: support {} has {px} px", m.image_id);
            imgs.push(m.image_id.clone());
        }
        assert_ne!(imgs[0], imgs[1], "distinct support images when there are enough");
    }
    let other_seed = ShardEpisodeSampler::new(reader.records(), &novel, 2, 8, min_area).unwrap();
    assert!((0..20).any(|n| other_seed.episode(n).unwrap() != sampler.episode(n).unwrap()));
}

#[test]
fn loaded_episodes_ignore_novel_pixels_in_the_query_only() {
    let dir = tmpdir("labels");
    write(&dir, 8, 1);
    let reader = ShardReader::open(&dir, &ShardExpectation::default()).unwrap();
    let ds = ShardDataset::train(&reader, &[5], 1, 3, 1.0).unwrap();
    let e = ds.episode(4).unwrap();
    let class = e.class_id as u8;
    let ql = &e.query_label;
    assert_eq!(ql.len(), H * W);
    for (i, &v) in e.query.label.iter().enumerate() {
        let want = if v == class { 1 } else if v == 255 || v == 5 { 255 } else { 0 };
        assert_eq!(ql[i], want, "query pixel {i} (class id {v})");
    }
    for (i, &v) in e.supports[0].label.iter().enumerate() {
        let want = if v == class { 1 } else if v == 255 { 255 } else { 0 };
        assert_eq!(e.support_labels[0][i], want, "support pixel {i} (class id {v})");
    }
}

#[test]
fn binary_label_maps_class_ignore_and_extra_ignored() {
    assert_eq!(binary_label(&[0, 3, 7, 255, 3], 3, &[7]), vec![0, 1, 255, 255, 1]);
    assert_eq!(binary_label(&[0, 3, 7, 255], 7, &[]), vec![0, 0, 1, 255]);
}

#[test]
fn a_folder_without_usable_training_views_is_refused_with_a_reason() {
    let dir = tmpdir("empty");
    write(&dir, 3, 1);
    let reader = ShardReader::open(&dir, &ShardExpectation::default()).unwrap();
    let err = ShardEpisodeSampler::new(reader.records(), &[], 1, 0, 1e9).err().unwrap().to_string();
    assert!(err.contains("augmented training views"), "{err}");
}

#[test]
fn test_episodes_missing_from_the_shards_name_the_image() {
    let dir = tmpdir("test");
    write(&dir, 2, 1);
    let reader = ShardReader::open(&dir, &ShardExpectation::default()).unwrap();
    let ds = ShardDataset::test(&reader);
    let eps: TestEpisodes = serde_json::from_str(
        r#"{"format":"mmformer-test-episodes/1","dataset":"x","fold":0,"shot":1,"seed":1,
            "episodes":[{"query":"nope","class_id":1,"supports":["img00"]}]}"#,
    )
    .unwrap();
    let err = ds.test_episode(&eps, 0).unwrap_err().to_string();
    assert!(err.contains("`nope`") && err.contains("no cached test view"), "{err}");
}
