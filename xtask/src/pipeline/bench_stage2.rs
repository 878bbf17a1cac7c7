//! `cargo xtask bench stage2`: one stage-2 training step read from the shards, against the same
//! step with the backbone and POS run live on the same episodes (what stage 2 would cost without
//! the stage boundary). Medians over interleaved repetitions.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use data::ShardDataset;
use losses::fewshot::{stage2_loss, Stage2Weights};
use mm::MaskMatching;
use train::{AdamW, AdamWConfig, CheckpointStore};

use crate::bench::{median, BenchRow};

use super::stage1::{load_into, named_vars, new_pos, open_dataset, KIND as POS_KIND};
use super::stage2::{EpisodeBatch, StageTwoData};
use super::{images_to_tensor, load_backbone, mm_features, pos_features};

/// Prints the table and returns the rows (no PyTorch column: both sides are ours).
pub fn bench_stage2(shards: &std::path::Path, batch: usize, reps: usize) -> Result<Vec<BenchRow>> {
    let device = Device::Cpu;
    let d = StageTwoData::open(shards)?;
    let m = &d.manifest;
    let reader = d.train.as_ref().context("no train shards")?;
    let ds = open_dataset(&m.dataset)?;
    let novel = ds.novel_classes(m.fold)?.to_vec();
    let size = m.preset.input_size();
    let min_area = data::AugmentConfig::with_crop_size(size).min_support_area;
    let train = ShardDataset::train(reader, &novel, 1, 0, min_area)?;
    let mut cfg = m.preset.mm_config();
    let ablate = std::env::var("MMFORMER_BENCH_ABLATE").unwrap_or_default();
    cfg.cross_alignment &= !ablate.contains("cross");
    cfg.self_alignment &= !ablate.contains("self");
    let vm = VarMap::new();
    let mm = MaskMatching::new(&cfg, train::seeded_var_builder(&vm, 0, DType::F32, &device))?;
    let vars = named_vars(&vm);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default(), train::default_no_decay)?;
    // The live side: the same frozen models the shards were made with.
    let backbone = load_backbone(m.preset, Some(&m.backbone_file))?;
    let (pvm, pos) = new_pos(m.preset, &device)?;
    let ck = CheckpointStore::open(&m.pos_checkpoint, POS_KIND)?;
    load_into(&pvm, &ck.model(&device)?, &ck.model_path())?;
    let aug = data::AugmentConfig::with_crop_size(size);
    let train_samples = ds.samples(data::Split::Train);

    let (mut t_read, mut t_step, mut t_live) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps + 1 {
        let n0 = rep as u64 * batch as u64;
        // Stage 2 from shards: read + tensors, then forward/loss/backward/step.
        let t = Instant::now();
        let eps = (0..batch as u64).map(|j| train.episode(n0 + j)).collect::<data::Result<Vec<_>>>()?;
        let b = EpisodeBatch::new(&eps, &device)?;
        let read = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let out = b.forward(&mm)?;
        let t_fwd = t.elapsed().as_secs_f64();
        let loss = stage2_loss(&out.two_channel()?, &b.query_label, &out.cosine, &out.proposals, Stage2Weights::default())?;
        let _ = loss.total.to_scalar::<f32>()?;
        let t_loss = t.elapsed().as_secs_f64();
        let mut grads = loss.total.backward()?;
        let t_bwd = t.elapsed().as_secs_f64();
        train::clip_grad_norm(&mut grads, &vars, 0.01)?;
        opt.step(&grads, 1e-4)?;
        let step = t.elapsed().as_secs_f64();
        if std::env::var_os("MMFORMER_BENCH_VERBOSE").is_some() {
            eprintln!("forward {:.1} ms, loss {:.1} ms, backward {:.1} ms, clip+step {:.1} ms", t_fwd * 1e3, (t_loss - t_fwd) * 1e3, (t_bwd - t_loss) * 1e3, (step - t_bwd) * 1e3);
        }
        // Live: decode + augment the same views, backbone on query and support, POS on the query.
        let t = Instant::now();
        let mut views = Vec::new();
        for e in &eps {
            for r in std::iter::once(&e.query).chain(&e.supports) {
                let idx = ds.find(data::Split::Train, &r.image_id).context("image of the shards not in the dataset")?;
                let k = match r.view {
                    data::shard::ShardView::Augmented(k) => k,
                    data::shard::ShardView::Test => 0,
                };
                views.push(data::cached::cached_train_view(&train_samples[idx], idx, k, &aug, m.seed)?.0);
            }
        }
        let per = 1 + eps[0].supports.len();
        let queries: Vec<_> = views.iter().step_by(per).collect();
        let supports: Vec<_> = views.iter().skip(1).step_by(per).collect();
        let fq = backbone.forward(&images_to_tensor(&queries, &device)?)?;
        let p = pos.forward(&pos_features(&fq))?;
        let fs = backbone.forward(&images_to_tensor(&supports, &device)?)?;
        let _keep: (Tensor, [Tensor; 3], [Tensor; 3]) = (p.pred_masks, mm_features(&fq), mm_features(&fs));
        let live = t.elapsed().as_secs_f64() + step;
        if rep > 0 {
            t_read.push(read * 1e3);
            t_step.push(step * 1e3);
            t_live.push(live * 1e3);
        }
    }
    let (r, s, l) = (median(t_read), median(t_step), median(t_live));
    println!("stage-2 training step, {:?} preset, batch {batch}, 1-shot, median of {reps}:", m.preset);
    println!("  from shards: {:8.1} ms  (read {r:.1} ms + MM forward/backward/step {s:.1} ms)", r + s);
    println!("  live:        {:8.1} ms  (decode+augment+backbone+POS {:.1} ms + the same MM step)", l, l - s);
    println!("  ratio live / shards: {:.1}x", l / (r + s));
    let row = |name: &str, ms: f64| BenchRow { name: name.into(), ours_ms: ms, torch_ms: None, ratio: None };
    Ok(vec![
        row("stage2_step_from_shards", r + s),
        row("stage2_step_shard_read", r),
        row("stage2_step_mm", s),
        row("stage2_step_live", l),
    ])
}
