//! The stage-1/stage-2 boundary: round trips, corruption, resume, sharding across workers, and
//! refusal of shards made by another model.

use std::path::{Path, PathBuf};

use data::shard::*;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mmformer-shard-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn spec(feature_dtype: StoredDType, mask_dtype: StoredDType) -> ShardSpec {
    ShardSpec {
        model_fingerprint: "model-a".into(),
        preprocess_fingerprint: "test480".into(),
        backbone: "resnet50".into(),
        feature_names: vec!["res5".into(), "res4".into()],
        feature_dtype,
        mask_dtype,
        num_queries: 3,
    }
}

/// A deterministic record with values that are not exactly representable in f16.
fn record(i: usize) -> ProposalRecord {
    let v = |n: usize, s: f32| (0..n).map(|j| ((j * 7 + i * 13) % 101) as f32 * s - 1.234567).collect::<Vec<f32>>();
    ProposalRecord {
        image_id: format!("img{i:03}"),
        view: if i % 2 == 0 { ShardView::Test } else { ShardView::Augmented(i as u32) },
        input_hw: (8, 12),
        features: vec![(vec![4, 1, 2], v(8, 0.37)), (vec![2, 2, 3], v(12, 0.011))],
        proposals: (vec![3, 2, 3], (0..18).map(|j| ((j + i) % 19) as f32 / 18.0).collect()),
        label: (0..96).map(|j| [0u8, 3, 7, 255][(j + i) % 4]).collect(),
    }
}

fn write_all(dir: &Path, spec: &ShardSpec, n_records: usize, per_shard: usize, shards: &[u32]) {
    for &k in shards {
        let mut w = ShardWriter::new(dir, k, spec.clone()).unwrap();
        for i in (k as usize * per_shard)..((k as usize + 1) * per_shard).min(n_records) {
            w.push(&record(i)).unwrap();
        }
        w.finish().unwrap();
    }
}

#[test]
fn f32_round_trip_is_exact_and_random_access_works() {
    let dir = tmpdir("f32");
    let s = spec(StoredDType::F32, StoredDType::F32);
    write_all(&dir, &s, 10, 4, &[0, 1, 2]);
    let idx = ShardIndex::merge(&dir).unwrap();
    assert_eq!(idx.records.len(), 10);
    let r = ShardReader::open(&dir, &ShardExpectation::default()).unwrap();
    for i in [7, 0, 9, 4] {
        let want = record(i);
        let got = r.get(&want.image_id, want.view).unwrap();
        assert_eq!(got, want);
    }
    assert_eq!(r.records()[3].classes, vec![(0, 24), (3, 24), (7, 24)]);
    let e = r.get("img003", ShardView::Test).unwrap_err().to_string();
    assert!(e.contains("no record for image `img003` view test"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn half_precision_and_u8_masks_round_within_rounding() {
    for (fd, md, ftol) in [
        (StoredDType::F16, StoredDType::U8Prob, 1e-3f32),
        (StoredDType::BF16, StoredDType::F16, 8e-3f32),
    ] {
        let dir = tmpdir(&format!("{fd:?}"));
        let s = spec(fd, md);
        write_all(&dir, &s, 3, 3, &[0]);
        ShardIndex::merge(&dir).unwrap();
        let r = ShardReader::open(&dir, &ShardExpectation::default()).unwrap();
        let want = record(1);
        let got = r.get(&want.image_id, want.view).unwrap();
        for ((_, a), (_, b)) in got.features.iter().zip(&want.features) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= ftol * y.abs().max(1.0), "{fd:?}: {x} vs {y}");
            }
            assert_ne!(a, b, "{fd:?} must actually round");
        }
        let mtol = if md == StoredDType::U8Prob { 0.5 / 255.0 + 1e-6 } else { 1e-3 };
        for (x, y) in got.proposals.1.iter().zip(&want.proposals.1) {
            assert!((x - y).abs() <= mtol, "{md:?}: {x} vs {y}");
        }
        assert_eq!(got.label, want.label);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn truncated_and_corrupted_shards_are_named() {
    let dir = tmpdir("corrupt");
    let s = spec(StoredDType::F32, StoredDType::F32);
    write_all(&dir, &s, 6, 3, &[0, 1]);
    ShardIndex::merge(&dir).unwrap();
    // Flip one byte inside a record of shard 1.
    let p1 = dir.join("shard-00001.mms");
    let mut bytes = std::fs::read(&p1).unwrap();
    let n = bytes.len();
    bytes[n - 200] ^= 0x55;
    std::fs::write(&p1, &bytes).unwrap();
    let r = ShardReader::open(&dir, &ShardExpectation::default()).unwrap();
    let bad = (3..6).map(|i| r.get_at(i)).find(|x| x.is_err()).expect("one record must fail").unwrap_err().to_string();
    assert!(bad.contains("shard-00001.mms") && bad.contains("checksum"), "{bad}");
    assert!(r.get_at(0).is_ok(), "other shards stay readable");
    drop(r);
    // Truncate shard 0.
    let p0 = dir.join("shard-00000.mms");
    let bytes = std::fs::read(&p0).unwrap();
    std::fs::write(&p0, &bytes[..bytes.len() / 2]).unwrap();
    let e = ShardReader::open(&dir, &ShardExpectation::default()).err().unwrap().to_string();
    assert!(e.contains("shard-00000.mms") && e.contains("truncated"), "{e}");
    assert!(!shard_is_complete(&dir, 0, &s));
    // A file that is not a shard at all.
    std::fs::write(&p0, b"hello").unwrap();
    let e = ShardReader::open(&dir, &ShardExpectation::default()).err().unwrap().to_string();
    assert!(e.contains("shard-00000.mms"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A shard cut short or removed while a reader has the folder open (another process rewriting
/// it) is an error naming the shard and the record, for every record past the cut; the records
/// before it still read. (Through a memory map a cut was a SIGBUS that killed the process.)
#[test]
fn a_shard_shortened_after_opening_is_an_error_not_a_crash() {
    let dir = tmpdir("shortened");
    let s = spec(StoredDType::F32, StoredDType::F32);
    write_all(&dir, &s, 6, 6, &[0]);
    ShardIndex::merge(&dir).unwrap();
    let r = ShardReader::open(&dir, &ShardExpectation::default()).unwrap();
    let cut = r.records()[3].offset + 1;
    std::fs::OpenOptions::new().write(true).open(dir.join("shard-00000.mms")).unwrap().set_len(cut).unwrap();
    for i in 0..3 {
        assert_eq!(r.get_at(i).unwrap(), record(i), "record {i} lies before the cut");
    }
    for i in 3..6 {
        let e = r.get_at(i).unwrap_err().to_string();
        assert!(e.contains("shard-00000.mms") && e.contains(&format!("img{i:03}")) && e.contains("changed after it was opened"), "{e}");
    }
    // Removed altogether: named too.
    std::fs::remove_file(dir.join("shard-00000.mms")).unwrap();
    let e = r.get_at(0).unwrap_err().to_string();
    assert!(e.contains("shard-00000.mms") && e.contains("img000") && e.contains("changed after it was opened"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_after_kill_gives_the_same_index_as_one_run() {
    let s = spec(StoredDType::F16, StoredDType::U8Prob);
    let whole = tmpdir("whole");
    write_all(&whole, &s, 11, 3, &[0, 1, 2, 3]);
    let want = ShardIndex::merge(&whole).unwrap();

    let resumed = tmpdir("resumed");
    write_all(&resumed, &s, 11, 3, &[0, 1]);
    // The kill: shard 2 was written but its .idx was not, plus a stray temporary file.
    write_all(&resumed, &s, 11, 3, &[2]);
    std::fs::remove_file(resumed.join("shard-00002.idx")).unwrap();
    std::fs::write(resumed.join("shard-00003.mms.tmp-1234"), b"partial").unwrap();
    let todo: Vec<u32> = (0..4).filter(|&k| !shard_is_complete(&resumed, k, &s)).collect();
    assert_eq!(todo, vec![2, 3]);
    write_all(&resumed, &s, 11, 3, &todo);
    let got = ShardIndex::merge(&resumed).unwrap();
    assert_eq!(got, want);
    assert_eq!(std::fs::read(resumed.join("shard-00002.mms")).unwrap(), std::fs::read(whole.join("shard-00002.mms")).unwrap());
    std::fs::remove_dir_all(&whole).unwrap();
    std::fs::remove_dir_all(&resumed).unwrap();
}

#[test]
fn workers_split_the_shards_and_the_index_merges_them() {
    let s = spec(StoredDType::F32, StoredDType::U8Prob);
    let dir = tmpdir("workers");
    let w0 = shards_for_worker(5, 0, 2);
    let w1 = shards_for_worker(5, 1, 2);
    assert_eq!((w0.clone(), w1.clone()), (vec![0, 2, 4], vec![1, 3]));
    write_all(&dir, &s, 14, 3, &w1);
    write_all(&dir, &s, 14, 3, &w0);
    let idx = ShardIndex::merge(&dir).unwrap();
    let ids: Vec<_> = idx.records.iter().map(|r| r.image_id.clone()).collect();
    assert_eq!(ids, (0..14).map(|i| format!("img{i:03}")).collect::<Vec<_>>());
}

#[test]
fn shards_of_another_model_are_refused() {
    let dir = tmpdir("mismatch");
    let s = spec(StoredDType::F32, StoredDType::F32);
    write_all(&dir, &s, 2, 2, &[0]);
    // A second worker ran with other weights.
    let mut other = s.clone();
    other.model_fingerprint = "model-b".into();
    write_all(&dir, &other, 4, 2, &[1]);
    let e = ShardIndex::merge(&dir).err().unwrap().to_string();
    assert!(e.contains("shard-00001.idx"), "{e}");
    std::fs::remove_file(dir.join("shard-00001.idx")).unwrap();
    ShardIndex::merge(&dir).unwrap();
    let expect = ShardExpectation { model_fingerprint: Some("model-c".into()), preprocess_fingerprint: None };
    let e = ShardReader::open(&dir, &expect).err().unwrap().to_string();
    assert!(e.contains("model weights") && e.contains("model-a") && e.contains("model-c"), "{e}");
    let ok = ShardExpectation { model_fingerprint: Some("model-a".into()), preprocess_fingerprint: Some("test480".into()) };
    assert!(ShardReader::open(&dir, &ok).is_ok());
}

#[test]
fn bad_records_are_refused_before_writing() {
    let dir = tmpdir("badrec");
    let mut w = ShardWriter::new(&dir, 0, spec(StoredDType::F32, StoredDType::F32)).unwrap();
    let mut r = record(0);
    r.label.pop();
    assert!(w.push(&r).unwrap_err().to_string().contains("label has 95 pixels"));
    let mut r = record(0);
    r.proposals.0 = vec![4, 2, 3];
    assert!(w.push(&r).unwrap_err().to_string().contains("expected 3 queries"));
    let mut r = record(0);
    r.features[1].1.pop();
    assert!(w.push(&r).unwrap_err().to_string().contains("`res4` has 11 values"));
}
