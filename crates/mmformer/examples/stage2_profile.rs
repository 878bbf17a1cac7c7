//! Runs stage-2 training steps from shards in a loop for a profiler (`perf record`), printing the
//! read times (episodes from the shards + batch tensors) and phase times of each: `cargo run --release -p mmformer --example stage2_profile -- SHARDS [reps] [batch]`.

use candle_core::DType;
use candle_nn::VarMap;
use mmformer::data::ShardDataset;
use mmformer::mm::MaskMatching;
use mmformer::bench::timed_stage2_step;
use mmformer::stage2::{EpisodeBatch, StageTwoData};
use mmformer::train::{self, AdamW, AdamWConfig};
use mmformer::{ops, Device};

fn main() -> mmformer::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shards = std::path::PathBuf::from(args.first().expect("usage: stage2_profile SHARDS [reps] [batch]"));
    let reps: u64 = args.get(1).map_or(10, |a| a.parse().expect("reps"));
    let batch: u64 = args.get(2).map_or(4, |a| a.parse().expect("batch"));
    ops::init_cpu_threads();
    ops::init_cpu_pool(None).expect("rayon pool");
    ops::keep_freed_memory();
    let dev = Device::Cpu;
    let d = StageTwoData::open(&shards)?;
    let m = &d.manifest;
    let ds = mmformer::datasets::open_dataset(&m.dataset)?;
    let novel = ds.novel_classes(m.fold)?.to_vec();
    let min_area = mmformer::data::AugmentConfig::with_crop_size(m.preset.input_size()).min_support_area;
    let train_set = ShardDataset::train(d.train.as_ref().expect("train shards"), &novel, 1, 0, min_area)?;
    let vm = VarMap::new();
    let mm = MaskMatching::new(&m.preset.mm_config(), train::seeded_var_builder(&vm, 0, DType::F32, &dev))?;
    let vars = train::named_vars(&vm);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default(), train::default_no_decay)?;
    for rep in 0..reps {
        let t0 = std::time::Instant::now();
        let eps = (0..batch).map(|j| train_set.episode(rep * batch + j)).collect::<mmformer::data::Result<Vec<_>>>()?;
        let t1 = std::time::Instant::now();
        let b = EpisodeBatch::new(&eps, &dev)?;
        let (episodes_ms, tensors_ms) = ((t1 - t0).as_secs_f64() * 1e3, t1.elapsed().as_secs_f64() * 1e3);
        let t = timed_stage2_step(&mm, &mut opt, &vars, &b)?;
        println!(
            "rep {rep}: read {episodes_ms:.1} + {tensors_ms:.1} forward {:.1} loss {:.1} backward {:.1} step {:.1} total {:.1} ms",
            t.forward_ms,
            t.loss_ms,
            t.backward_ms,
            t.step_ms,
            t.total_ms()
        );
    }
    Ok(())
}
