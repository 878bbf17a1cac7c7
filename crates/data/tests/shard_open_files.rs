//! A shard folder may hold more shards than the process may keep files open (a COCO folder has
//! thousands): the reader opens a shard for each read, so it opens and reads a folder of more
//! shards than the open-file limit allows. In its own test binary, because it lowers the
//! process's limit.

#![cfg(unix)]

use std::path::PathBuf;

use data::shard::*;

fn record(i: usize) -> ProposalRecord {
    ProposalRecord {
        image_id: format!("img{i:03}"),
        view: ShardView::Test,
        input_hw: (4, 4),
        features: vec![(vec![2, 1, 1], vec![i as f32, 0.5])],
        proposals: (vec![1, 1, 1], vec![0.25]),
        label: vec![(i % 3) as u8; 16],
    }
}

#[test]
fn a_folder_of_more_shards_than_open_files_allowed_reads() {
    let dir: PathBuf = std::env::temp_dir().join(format!("mmformer-shard-fds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = ShardSpec {
        model_fingerprint: "m".into(),
        preprocess_fingerprint: "p".into(),
        backbone: "resnet50".into(),
        feature_names: vec!["res5".into()],
        feature_dtype: StoredDType::F32,
        mask_dtype: StoredDType::F32,
        num_queries: 1,
    };
    let shards = 64;
    for k in 0..shards {
        let mut w = ShardWriter::new(&dir, k as u32, spec.clone()).unwrap();
        w.push(&record(k)).unwrap();
        w.finish().unwrap();
    }
    ShardIndex::merge(&dir).unwrap();

    // Room for what the process has open now and a few more, fewer than the shards.
    let open_now = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(16);
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit calls on a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        let low = libc::rlimit { rlim_cur: (open_now + 16).min(old.rlim_cur), rlim_max: old.rlim_max };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
    }
    assert!(open_now + 16 < shards as u64, "the limit must be below the shard count for the test to mean anything");
    let got = (|| -> std::result::Result<Vec<ProposalRecord>, ShardError> {
        let r = ShardReader::open(&dir, &ShardExpectation::default())?;
        (0..r.len()).map(|i| r.get_at(i)).collect()
    })();
    // SAFETY: as above, restoring the limit read before.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
    let got = got.expect("a folder of more shards than open files allowed must read");
    let mut ids: Vec<String> = got.iter().map(|r| r.image_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, (0..shards).map(|i| format!("img{i:03}")).collect::<Vec<_>>());
    for r in &got {
        let i: usize = r.image_id[3..].parse().unwrap();
        assert_eq!(r, &record(i));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
