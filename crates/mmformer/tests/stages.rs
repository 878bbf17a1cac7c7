//! The two training stages and the boundary between them, on a tiny synthetic dataset: exact
//! resume, shards that two workers write identically, a full model that loads and runs, and
//! fingerprints that old runs still match.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{lite0_or_skip, Scratch};
use mmformer::cache::{cache_proposals, CacheManifest, CacheOptions, Splits, WorkerSlice, MANIFEST};
use mmformer::data::shard::{ShardExpectation, ShardReader};
use mmformer::stage1::{train_pos, Stage1Options};
use mmformer::stage2::{train_mm, Stage2Options, StageTwoData, MODEL_FILE};
use mmformer::train::{AdamW, AdamWConfig, CheckpointStore, TrainState};
use mmformer::{MmFormer, Preset, Silent};

fn synthetic_data(dir: &std::path::Path, num_train: usize, num_val: usize) {
    let cfg = mmformer::data::synthetic::SyntheticConfig { num_train, num_val, ..Default::default() };
    mmformer::data::synthetic::generate(&cfg, dir, None).unwrap();
}

/// A run killed after a checkpoint and resumed ends bit for bit where an uninterrupted run
/// ends; a resume with other options is refused; the resolved configuration is written.
#[test]
fn train_pos_resumes_bit_for_bit_and_refuses_other_options() {
    let Some(lite0) = lite0_or_skip("train_pos_resumes_bit_for_bit_and_refuses_other_options") else { return };
    let dir = Scratch::new();
    synthetic_data(&dir.path("data"), 40, 24);
    let opts = Stage1Options {
        data: dir.path("data"),
        fold: 0,
        preset: Preset::Cpu,
        backbone_weights: Some(lite0),
        batch: 2,
        iters: 4,
        lr: 4e-4,
        weight_decay: 0.05,
        clip: 0.01,
        seed: 3,
        out: dir.path("pos"),
        eval_every: 2,
        eval_episodes: 4,
        log_every: 1,
    };
    let device = Device::Cpu;
    train_pos(&opts, &device, &Silent).unwrap();
    let last = dir.path("pos/checkpoints/iter_00000004");
    let straight = std::fs::read(last.join("model.safetensors")).unwrap();
    let straight_opt = std::fs::read(last.join("optimizer.safetensors")).unwrap();
    std::fs::remove_dir_all(&last).unwrap();
    train_pos(&opts, &device, &Silent).unwrap();
    assert!(std::fs::read(last.join("model.safetensors")).unwrap() == straight, "resumed weights differ");
    assert!(std::fs::read(last.join("optimizer.safetensors")).unwrap() == straight_opt, "resumed optimizer differs");
    let resolved: Stage1Options = serde_json::from_slice(&std::fs::read(dir.path("pos/config.json")).unwrap()).unwrap();
    assert_eq!(resolved, opts);
    let log = std::fs::read_to_string(dir.path("pos/log.jsonl")).unwrap();
    assert!(log.contains("\"event\":\"train\"") && log.contains("\"oracle_miou\"") && log.contains("\"loss_dice\""), "{log}");
    let other = Stage1Options { lr: 1e-4, ..opts.clone() };
    let err = train_pos(&other, &device, &Silent).unwrap_err().to_string();
    assert!(err.contains("another configuration"), "{err}");
}

/// The resume fingerprint of a stage-1 run is the JSON the earlier code stored: runs started
/// before the library refactor still resume.
#[test]
fn run_fingerprints_keep_the_format_older_runs_stored() {
    let opts = Stage1Options {
        data: "data/synthetic".into(),
        fold: 1,
        preset: Preset::Paper,
        backbone_weights: Some("r50.pth".into()),
        batch: 8,
        iters: 20000,
        lr: 1e-4,
        weight_decay: 0.05,
        clip: 0.01,
        seed: 0,
        out: "runs/x".into(),
        eval_every: 500,
        eval_episodes: 1000,
        log_every: 10,
    };
    let stored = serde_json::json!({"data": "data/synthetic", "fold": 1, "preset": "paper", "backbone_weights": "r50.pth",
        "batch": 8, "iters": 20000, "lr": 1e-4, "weight_decay": 0.05, "clip": 0.01, "seed": 0, "eval_every": 500, "eval_episodes": 1000});
    assert_eq!(mmformer::run_config(&opts), stored);
    // And a config.json of the earlier code reads back as these options.
    let mut file = stored.clone();
    file["out"] = serde_json::json!("runs/x");
    file["log_every"] = serde_json::json!(10);
    assert_eq!(serde_json::from_value::<Stage1Options>(file).unwrap(), opts);
}

/// The whole stage boundary: shards from a (fresh) stage-1 checkpoint, a resumed stage-2 run
/// equal bit for bit to an uninterrupted one, a full checkpoint that loads and runs, and
/// refusal of shards whose model does not match.
#[test]
fn shards_feed_stage_two_which_resumes_exactly_and_writes_a_full_model() {
    let Some(lite0) = lite0_or_skip("shards_feed_stage_two_which_resumes_exactly_and_writes_a_full_model") else { return };
    let dir = Scratch::new();
    let device = Device::Cpu;
    synthetic_data(&dir.path("data"), 48, 24);

    let (vm, _) = mmformer::stage1::new_pos_seeded(Preset::Cpu, 0, &device).unwrap();
    let opt = AdamW::new(mmformer::train::named_vars(&vm), AdamWConfig::default(), mmformer::train::default_no_decay).unwrap();
    let state = TrainState {
        format_version: 0,
        kind: "pos".into(),
        iter: 0,
        optimizer_step: 0,
        best_metric: None,
        best_iter: None,
        config: serde_json::json!({}),
        model_sha256: String::new(),
        optimizer_sha256: String::new(),
    };
    let pos_best = CheckpointStore::new(dir.path("pos"), 1).save_best(&mmformer::train::varmap_tensors(&vm), &opt, state).unwrap();

    let cache = CacheOptions {
        data: dir.path("data"),
        fold: 0,
        preset: Preset::Cpu,
        backbone_weights: Some(lite0.clone()),
        pos_checkpoint: pos_best,
        out: dir.path("shards"),
        split: Splits::Both,
        views: 1,
        seed: 0,
        feature_dtype: "f16".into(),
        mask_dtype: "u8".into(),
        records_per_shard: 16,
        shard: None,
        batch: 8,
        dry_run: false,
    };
    let summary = cache_proposals(&cache, &device, &Silent).unwrap();
    assert!(summary.splits.iter().all(|s| s.merged.is_some()), "{summary:?}");
    let index = std::fs::read(dir.path("shards/train/index.bin")).unwrap();
    cache_proposals(&cache, &device, &Silent).unwrap(); // complete shards are skipped, the index is unchanged
    assert_eq!(std::fs::read(dir.path("shards/train/index.bin")).unwrap(), index);
    // Two workers (`--shard 0/2`, `--shard 1/2`) into another folder: the last one merges, and
    // the records are byte-identical to the single run's.
    for w in 0..2 {
        let part = CacheOptions { out: dir.path("shards2"), shard: Some(WorkerSlice { index: w, count: 2 }), ..cache.clone() };
        cache_proposals(&part, &device, &Silent).unwrap();
    }
    let one = ShardReader::open(&dir.path("shards/train"), &ShardExpectation::default()).unwrap();
    let two = ShardReader::open(&dir.path("shards2/train"), &ShardExpectation::default()).unwrap();
    assert_eq!(one.len(), two.len());
    for i in 0..one.len() {
        assert_eq!(one.get_at(i).unwrap(), two.get_at(i).unwrap(), "record {i}");
    }

    // A run killed in the middle: shard 1 renamed into place but its index not yet (killed
    // between the two renames), shard 2 only a temporary file, the folder index not merged.
    // The rerun redoes exactly what is missing and ends with the same bytes.
    let killed = CacheOptions { out: dir.path("shards3"), ..cache.clone() };
    cache_proposals(&killed, &device, &Silent).unwrap();
    let train3 = dir.path("shards3/train");
    std::fs::remove_file(train3.join("shard-00001.idx")).unwrap();
    let shard2 = std::fs::read(train3.join("shard-00002.mms")).unwrap();
    std::fs::remove_file(train3.join("shard-00002.mms")).unwrap();
    std::fs::remove_file(train3.join("shard-00002.idx")).unwrap();
    std::fs::write(train3.join("shard-00002.mms.tmp-424242"), &shard2[..shard2.len() / 2]).unwrap();
    std::fs::remove_file(train3.join("index.bin")).unwrap();
    assert!(ShardReader::open(&train3, &ShardExpectation::default()).is_err(), "a half-written folder must not read as valid");
    cache_proposals(&killed, &device, &Silent).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path("shards/train")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert!(names.iter().any(|n| n == "shard-00002.mms") && names.iter().any(|n| n == "index.bin"), "{names:?}");
    for n in names.iter().filter(|n| !n.contains(".tmp-") && *n != "log.jsonl") {
        assert!(std::fs::read(dir.path("shards/train").join(n)).unwrap() == std::fs::read(train3.join(n)).unwrap(), "{n} differs after the resumed run");
    }

    let opts = Stage2Options {
        shards: dir.path("shards"),
        batch: 2,
        iters: 4,
        lr: 1e-3,
        weight_decay: 0.05,
        clip: 0.01,
        shot: 1,
        seed: 0,
        out: dir.path("mm"),
        eval_every: 2,
        eval_episodes: 6,
        log_every: 1,
        no_self_alignment: false,
        no_cross_alignment: false,
        no_learnable_matching: false,
        no_co_loss: false,
    };
    let full = train_mm(&opts, &device, &Silent).unwrap();
    assert_eq!(full, dir.path("mm").join(MODEL_FILE));
    let last = dir.path("mm/checkpoints/iter_00000004/model.safetensors");
    let straight = std::fs::read(&last).unwrap();
    // A kill after iteration 2: the later checkpoint never made it to disk.
    std::fs::remove_dir_all(dir.path("mm/checkpoints/iter_00000004")).unwrap();
    train_mm(&opts, &device, &Silent).unwrap();
    assert!(std::fs::read(&last).unwrap() == straight, "resumed run differs from the uninterrupted one");

    let model = MmFormer::load(&full, &device).unwrap();
    assert_eq!(model.meta.preset, Preset::Cpu);
    let x = Tensor::zeros((1, 3, 256, 256), DType::F32, &device).unwrap();
    let label = Tensor::ones((1, 256, 256), DType::F32, &device).unwrap();
    let out = model.episode(&x, &[x.clone()], &[label]).unwrap();
    assert_eq!(out.out.dims(), &[1, 1, 256, 256]);

    // The trained MM on the cached test views.
    let (e, _) = mmformer::stage2::eval_shards(&dir.path("shards"), &dir.path("mm/checkpoints/best"), 6, 1, &device).unwrap();
    assert_eq!(e.episodes, 6);
    assert!((0.0..=100.0).contains(&e.ours.miou));

    // Shards whose manifest names another model are refused, naming the index.
    let mpath = dir.path("shards").join(MANIFEST);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["model_fingerprint"] = serde_json::json!("0000000000000000");
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    let err = StageTwoData::open(&dir.path("shards")).err().unwrap().to_string();
    assert!(err.contains("index.bin") && err.contains("model weights"), "{err}");
    assert!(CacheManifest::read(&dir.path("shards")).is_ok());
}

/// The optimizer's no-decay set over the whole POS and mask matching is the official grouping:
/// the norm layers and the decoder's three embedding tables, nothing else (the pixel decoder's
/// `level_embed`, an `nn.Parameter`, decays).
#[test]
fn the_no_decay_set_is_the_official_grouping() {
    let device = Device::Cpu;
    let (vm, _) = mmformer::stage1::new_pos_seeded(Preset::Paper, 0, &device).unwrap();
    let mut names: Vec<String> = mmformer::train::named_vars(&vm).into_iter().map(|v| v.name).collect();
    names.extend(mmformer::model::fresh_mm_tensors(&mmformer::mm::MmConfig::resnet50(), 0, &device).unwrap().into_keys());
    let no_decay: Vec<&String> = names.iter().filter(|n| mmformer::train::default_no_decay(n)).collect();
    let embeddings = ["sem_seg_head.predictor.query_feat.weight", "sem_seg_head.predictor.query_embed.weight", "sem_seg_head.predictor.level_embed.weight"];
    for e in embeddings {
        assert!(no_decay.iter().any(|n| *n == e), "{e} must not decay");
    }
    assert!(names.iter().any(|n| n == "sem_seg_head.pixel_decoder.transformer.level_embed"));
    assert!(!mmformer::train::default_no_decay("sem_seg_head.pixel_decoder.transformer.level_embed"));
    for n in &no_decay {
        let last_two: Vec<&str> = n.rsplitn(3, '.').collect();
        let norm = n.split('.').any(|c| c.starts_with("norm") || c.ends_with("_norm")) || (n.contains("input_proj.") && last_two[1] == "1");
        assert!(norm || embeddings.contains(&n.as_str()), "{n} is neither a norm nor an embedding table");
        assert!(n.ends_with(".weight") || n.ends_with(".bias"), "{n}");
    }
    // Every linear / conv weight decays.
    for n in names.iter().filter(|n| n.contains("linear") || n.contains("in_proj") || n.starts_with("fc") || n.starts_with("conv_")) {
        assert!(!mmformer::train::default_no_decay(n), "{n} must decay");
    }
}

/// `bench stage2 --preset` makes its shards once: stage-2 data of that preset with one view per
/// usable training image (some of the 24 hold only held-out classes), then the same folder, untouched, on the next call; a folder left without its
/// manifest (a killed first call) is made again.
#[test]
fn bench_shards_are_made_once_and_reused() {
    if lite0_or_skip("bench_shards_are_made_once_and_reused").is_none() {
        return;
    }
    let s = Scratch::new();
    let dir = s.path("bench");
    let shards = mmformer::bench::bench_shards(Preset::Cpu, &dir, &Device::Cpu).unwrap();
    let d = StageTwoData::open(&shards).unwrap();
    assert_eq!(d.manifest.preset, Preset::Cpu);
    let n = d.train.as_ref().expect("train shards").len();
    assert!((12..=24).contains(&n), "{n} training views of 24 images");
    assert!(d.val.is_none(), "only the training split is cached");
    let manifest = shards.join(MANIFEST);
    let stamp = std::fs::metadata(&manifest).unwrap().modified().unwrap();
    assert_eq!(mmformer::bench::bench_shards(Preset::Cpu, &dir, &Device::Cpu).unwrap(), shards);
    assert_eq!(std::fs::metadata(&manifest).unwrap().modified().unwrap(), stamp, "the shards were made again");
    std::fs::remove_file(&manifest).unwrap();
    mmformer::bench::bench_shards(Preset::Cpu, &dir, &Device::Cpu).unwrap();
    assert_eq!(StageTwoData::open(&shards).unwrap().train.unwrap().len(), n);

    // The bench itself on them: its rows, the step's products counted, the live side slower.
    let mut text = Vec::new();
    let rows = mmformer::bench::bench_stage2(&mut text, &shards, 2, 2, &Device::Cpu).unwrap();
    let text = String::from_utf8(text).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["stage2_step_from_shards", "stage2_step_batch_wait", "stage2_step_shard_read", "stage2_step_mm", "stage2_step_live", "stage2_step_live_decode"]
    );
    let ms = |i: usize| rows[i].ours_ms;
    // The step = the wait for its batch + the MM step; the read-ahead ran and was timed.
    assert!(ms(1) >= 0.0 && ms(2) > 0.0 && ms(3) > 0.0 && (ms(0) - ms(1) - ms(3)).abs() < 1e-6, "{text}");
    assert!(ms(4) > ms(3) && ms(5) > 0.0, "the live step includes the MM step: {text}");
    assert!(rows.iter().enumerate().all(|(i, r)| i == 3 || r.gemm_gflop.is_none()));
    assert!(text.contains("ahead of its step on a background thread"), "{text}");
    if mmformer::ops::fused_kernels_enabled() {
        let gflop = rows[3].gemm_gflop.expect("the MM step's products are counted");
        // A batch-4 step of the demo's shards runs 14.9 GFLOP, these batches of 2 about 6.7.
        // The counter is process-wide and other tests of this binary may run products
        // meanwhile, so only the lower bound holds for sure.
        assert!(gflop > 3.0, "{gflop} GFLOP");
        assert!(text.contains("MM step products:"), "{text}");
    }
}
