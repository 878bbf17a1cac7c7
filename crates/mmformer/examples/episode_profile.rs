//! Runs paper-preset episodes in a loop for a profiler (`perf record`), printing the stage times
//! of each: `cargo run --release -p mmformer --example episode_profile -- [shots] [reps] [size]`.

use candle_core::{Device, Tensor};
use mmformer::{bench::time_episode, ops, MmFormer, Preset};

fn main() -> mmformer::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers: shots reps size")).collect();
    let (k, reps, size) = (args.first().copied().unwrap_or(1), args.get(1).copied().unwrap_or(5), args.get(2).copied().unwrap_or(480));
    ops::init_cpu_threads();
    ops::keep_freed_memory();
    let dev = Device::Cpu;
    let model = MmFormer::synthetic(Preset::Paper, 0, &dev)?;
    let query = Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev)?;
    let supports = (0..k).map(|_| Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev)).collect::<candle_core::Result<Vec<_>>>()?;
    let mut m = vec![0f32; size * size];
    for y in size / 4..3 * size / 4 {
        m[y * size + size / 4..y * size + 3 * size / 4].fill(1.0);
    }
    let labels = vec![Tensor::from_vec(m, (1, size, size), &dev)?; k];
    for r in 0..reps {
        let (w, _) = time_episode(&model, &query, &supports, &labels)?;
        println!("rep {r}: backbone {:.1} pos {:.1} supports {:.1} mm {:.1} total {:.1} ms", w[0], w[1], w[2], w[3], w[4]);
    }
    Ok(())
}
