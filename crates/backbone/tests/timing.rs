//! Forward time at 1×3×480×480 (the test size of the paper). Ignored by default; run with
//! `RAYON_NUM_THREADS=2 cargo test --release -p backbone --test timing -- --ignored --nocapture`.

use std::time::Instant;

use backbone::{load_backbone, BackboneKind};
use candle_core::{DType, Device, Tensor};

fn time_ms(kind: BackboneKind, runs: usize) -> f64 {
    // Timing does not depend on the values, so synthetic weights stand in for missing files.
    let model = load_backbone(kind, None, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1f32, (1, 3, 480, 480), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    model.forward(&x).unwrap();
    let mut ms: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let f = model.forward(&x).unwrap();
            std::hint::black_box(f);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!("{kind:?}: 1x3x480x480 forward median {:.1} ms (min {:.1}, max {:.1}, {runs} runs, {} rayon threads)", ms[runs / 2], ms[0], ms[runs - 1], rayon_threads());
    ms[runs / 2]
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        format!(
            "{} (default)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        )
    })
}

#[test]
#[ignore]
fn forward_time_480() {
    time_ms(BackboneKind::ResNet50, 7);
    time_ms(BackboneKind::EfficientNetLite0, 7);
}
