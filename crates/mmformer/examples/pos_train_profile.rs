//! Runs cpu-preset POS training iterations (batch 4 at 256², fixed features) in a loop for a
//! profiler, printing the phase times: `cargo run --release -p mmformer --example
//! pos_train_profile -- [reps]`.

use mmformer::bench::{PosTrainBench, TRAIN_PHASES};
use mmformer::{ops, Device, Preset};

fn main() -> mmformer::Result<()> {
    let reps: usize = std::env::args().nth(1).map_or(10, |a| a.parse().expect("reps"));
    ops::init_cpu_threads();
    ops::init_cpu_pool(None).expect("rayon pool");
    ops::keep_freed_memory();
    let mut b = PosTrainBench::new(Preset::Cpu, 256, 4, &Device::Cpu)?;
    for rep in 0..reps {
        let (ms, loss) = b.step()?;
        let phases: Vec<String> = TRAIN_PHASES.iter().zip(ms).map(|(n, t)| format!("{n} {t:.1}")).collect();
        println!("rep {rep}: {} ms, loss {loss:.3}", phases.join(", "));
    }
    Ok(())
}
