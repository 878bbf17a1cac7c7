//! Runs episodes in a loop for a profiler (`perf record`), printing the stage times of each:
//! `cargo run --release -p mmformer --example episode_profile -- [shots] [reps] [size] [paper|cpu]`.

use candle_core::{Device, Tensor};
use mmformer::{bench::time_episode, ops, MmFormer, Preset};

fn main() -> mmformer::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let preset = match args.get(3).map(String::as_str) {
        None | Some("paper") => Preset::Paper,
        Some("cpu") => Preset::Cpu,
        Some(p) => panic!("preset {p}: paper or cpu"),
    };
    args.truncate(3);
    let args: Vec<usize> = args.iter().map(|a| a.parse().expect("numbers: shots reps size")).collect();
    let (k, reps, size) = (args.first().copied().unwrap_or(1), args.get(1).copied().unwrap_or(5), args.get(2).copied().unwrap_or(480));
    ops::init_cpu_threads();
    ops::init_cpu_pool(None).expect("rayon pool");
    ops::keep_freed_memory();
    let dev = Device::Cpu;
    let model = MmFormer::synthetic(preset, 0, &dev)?;
    let query = Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev)?;
    let supports = (0..k).map(|_| Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev)).collect::<candle_core::Result<Vec<_>>>()?;
    let mut m = vec![0f32; size * size];
    for y in size / 4..3 * size / 4 {
        m[y * size + size / 4..y * size + 3 * size / 4].fill(1.0);
    }
    let labels = vec![Tensor::from_vec(m, (1, size, size), &dev)?; k];
    for r in 0..reps {
        let t = time_episode(&model, &query, &supports, &labels)?;
        let (w, g) = (t.wall, t.gemm_gflop);
        println!(
            "rep {r}: backbone {:.1} pos {:.1} supports {:.1} mm {:.1} total {:.1} ms; products {:.1} / {:.1} / {:.1} / {:.1} GFLOP",
            w[0], w[1], w[2], w[3], w[4], g[0], g[1], g[2], g[3]
        );
    }
    Ok(())
}
