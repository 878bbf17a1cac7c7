//! A shard folder's `index.bin` is trusted with offsets and counts into the shard files, so
//! a corrupted, stale or hand-made one must be refused on open with an error naming the file
//! (and the record), never a panic or a read out of bounds.

use std::path::{Path, PathBuf};

use data::shard::*;

struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spec() -> ShardSpec {
    ShardSpec {
        model_fingerprint: "model-a".into(),
        preprocess_fingerprint: "pre".into(),
        backbone: "resnet50".into(),
        feature_names: vec!["res5".into()],
        feature_dtype: StoredDType::F16,
        mask_dtype: StoredDType::U8Prob,
        num_queries: 2,
    }
}

fn record(i: usize) -> ProposalRecord {
    ProposalRecord {
        image_id: format!("img{i}"),
        view: ShardView::Augmented(i as u32),
        input_hw: (4, 4),
        features: vec![(vec![3, 1, 1], vec![0.5, -1.0, i as f32])],
        proposals: (vec![2, 1, 1], vec![0.0, 1.0]),
        label: (0..16).map(|j| [0u8, 2, 5][(i + j) % 3]).collect(),
    }
}

/// Two shards of two records each, merged.
fn folder(tag: &str) -> (Folder, ShardIndex) {
    let dir = std::env::temp_dir().join(format!("mmformer-hostile-index-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for k in 0..2u32 {
        let mut w = ShardWriter::new(&dir, k, spec()).unwrap();
        for i in (2 * k as usize)..(2 * k as usize + 2) {
            w.push(&record(i)).unwrap();
        }
        w.finish().unwrap();
    }
    let index = ShardIndex::merge(&dir).unwrap();
    ShardReader::open(&dir, &ShardExpectation::default()).expect("the untouched folder opens");
    (Folder(dir), index)
}

fn open_err(dir: &Path) -> String {
    match ShardReader::open(dir, &ShardExpectation::default()) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_one_line_naming(e: &str, file: &str, words: &[&str]) {
    assert!(!e.contains('\n'), "one line: {e}");
    assert!(e.contains(file), "names {file}: {e}");
    for w in words {
        assert!(e.contains(w), "says {w:?}: {e}");
    }
}

/// The container layout, spelled out independently of the crate: magic, version, payload
/// length, CRC32 of the payload, payload.
fn container(payload: &[u8], version: u32) -> Vec<u8> {
    let mut out = b"MMFINDEX".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn payload_of(index: &ShardIndex) -> Vec<u8> {
    bincode::serde::encode_to_vec(index, bincode::config::standard()).unwrap()
}

#[test]
fn the_index_is_checksummed_in_a_versioned_container() {
    let (dir, index) = folder("container");
    let bytes = std::fs::read(dir.0.join("index.bin")).unwrap();
    assert_eq!(SHARD_FORMAT_VERSION, 3);
    assert_eq!(bytes, container(&payload_of(&index), SHARD_FORMAT_VERSION), "layout as documented");
}

#[test]
fn a_flipped_byte_anywhere_in_the_index_is_refused_naming_it() {
    let (dir, _) = folder("flip");
    let path = dir.0.join("index.bin");
    let good = std::fs::read(&path).unwrap();
    for at in 0..good.len() {
        let mut bytes = good.clone();
        bytes[at] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let e = open_err(&dir.0);
        assert_one_line_naming(&e, "index.bin", &[]);
        if at >= 24 {
            assert!(e.contains("fails its checksum"), "byte {at}: {e}");
        }
    }
    // A flip in the payload, specifically:
    let mut bytes = good.clone();
    bytes[good.len() - 5] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["fails its checksum", "cache-proposals"]);
}

#[test]
fn a_truncated_index_is_refused_at_every_length() {
    let (dir, _) = folder("cut");
    let path = dir.0.join("index.bin");
    let good = std::fs::read(&path).unwrap();
    for cut in 0..good.len() {
        std::fs::write(&path, &good[..cut]).unwrap();
        assert_one_line_naming(&open_err(&dir.0), "index.bin", &[]);
    }
    for cut in [0, 5, 20, good.len() - 3] {
        std::fs::write(&path, &good[..cut]).unwrap();
        assert_one_line_naming(&open_err(&dir.0), "index.bin", &["truncated"]);
    }
}

#[test]
fn trailing_bytes_after_the_index_are_refused() {
    let (dir, index) = folder("trailing");
    let path = dir.0.join("index.bin");
    // Appended after the container.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"junk");
    std::fs::write(&path, &bytes).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["4 trailing bytes"]);
    // Inside a well-formed container whose checksum covers them: the decoder must notice that
    // the encoded index ends early.
    let mut payload = payload_of(&index);
    payload.extend_from_slice(&[0, 0, 0]);
    std::fs::write(&path, container(&payload, SHARD_FORMAT_VERSION)).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["3 trailing bytes after the encoded"]);
}

#[test]
fn a_record_pointing_past_its_shard_is_refused_naming_the_record() {
    let (dir, mut index) = folder("past");
    let shard1_len = index.shards[1].1;
    index.records[3].offset = shard1_len - 10;
    index.write(&dir.0).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["record 3", "img3", "past the end of shard-00001.mms"]);

    // An offset that overflows when the length is added.
    index.records[3].offset = u64::MAX - 1;
    index.write(&dir.0).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["record 3", "past the end"]);

    // A tensor past the end of its record.
    let (dir, mut index) = folder("tensor");
    index.records[1].tensors[1].offset = index.records[1].len;
    index.write(&dir.0).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["record 1", "img1", "`proposals`", "past the record"]);

    // A tensor whose byte count does not match its shape.
    let (dir, mut index) = folder("nbytes");
    index.records[0].tensors[0].shape = vec![1 << 40, 1 << 40, 1 << 40];
    index.write(&dir.0).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["record 0", "`res5`", "cannot take"]);

    // A payload over the shard header.
    let (dir, mut index) = folder("header");
    index.records[0].offset = 0;
    index.write(&dir.0).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["record 0", "overlaps the header"]);
}

#[test]
fn a_record_naming_a_missing_shard_is_refused() {
    let (dir, mut index) = folder("missing");
    index.records[2].shard = 7;
    index.write(&dir.0).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["record 2", "img2", "names shard 7", "does not list"]);

    // A shard the index lists but whose file is gone.
    let (dir, _) = folder("gone");
    std::fs::remove_file(dir.0.join("shard-00001.mms")).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "shard-00001.mms", &[]);
}

#[test]
fn an_index_of_the_previous_format_asks_for_a_rebuild() {
    let (dir, mut index) = folder("v2");
    // Version 2 wrote the bare bincode of the index, format_version first.
    index.format_version = 2;
    std::fs::write(dir.0.join("index.bin"), payload_of(&index)).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["index format version 2", "cargo xtask cache-proposals"]);
    // Short garbage that is not even a prefix of the magic.
    std::fs::write(dir.0.join("index.bin"), b"abc").unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["not a shard folder index"]);
    // A container of another version.
    index.format_version = 4;
    std::fs::write(dir.0.join("index.bin"), container(&payload_of(&index), 4)).unwrap();
    assert_one_line_naming(&open_err(&dir.0), "index.bin", &["format version 4", "this build reads 3", "cargo xtask cache-proposals"]);
}

#[test]
fn a_corrupted_shard_index_is_redone_and_named_when_merged() {
    let (dir, _) = folder("idx");
    let idx = dir.0.join("shard-00001.idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xFF;
    std::fs::write(&idx, &bytes).unwrap();
    assert!(shard_is_complete(&dir.0, 0, &spec()));
    assert!(!shard_is_complete(&dir.0, 1, &spec()), "a corrupted .idx means the shard is redone");
    let e = ShardIndex::merge(&dir.0).err().unwrap().to_string();
    assert_one_line_naming(&e, "shard-00001.idx", &["fails its checksum"]);
}

#[test]
fn a_shard_of_the_previous_format_is_not_complete() {
    let (dir, _) = folder("oldshard");
    let path = dir.0.join("shard-00000.mms");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(!shard_is_complete(&dir.0, 0, &spec()), "cache-proposals must redo it");
    assert_one_line_naming(&open_err(&dir.0), "shard-00000.mms", &["shard format version 2", "cache-proposals"]);
}

#[test]
fn records_still_round_trip() {
    let (dir, _) = folder("roundtrip");
    let r = ShardReader::open(&dir.0, &ShardExpectation::default()).unwrap();
    for i in 0..4 {
        let got = r.get_at(i).unwrap();
        let want = record(i);
        assert_eq!((got.image_id.as_str(), got.label.as_slice()), (want.image_id.as_str(), want.label.as_slice()));
        assert_eq!(got.features[0].1, want.features[0].1);
        assert_eq!(got.proposals, want.proposals);
    }
}
