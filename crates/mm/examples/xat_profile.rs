//! Cross-alignment timings: `MultiheadAttention` and a whole `CrossAt` block, forward and
//! backward, with the fused CPU kernels (attention, softmax, LayerNorm) against the composed
//! candle-primitive paths (`ops::set_fused_kernels(false)`, what the code did before), plus a
//! per-op breakdown of one attention call.
//!
//! `cargo run --release -p mm --example xat_profile [-- --reps N] [-- profile|mha|crossat]`;
//! compare with `CANDLE_NUM_THREADS=1` in front. Every number is the minimum over `reps` runs
//! after a warm-up, in ms: wall time, and in parentheses the process CPU time (all threads; not
//! inflated by other load, but it counts spin-waiting as work). With
//! `RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1` the CPU time is the single-thread work.
//!
//! Shapes: "cpu" = hidden 128, 4 heads, B 4, query maps 32²/16²/8² (Lq 1024/256/64);
//! "paper" = hidden 256, 4 heads, B 1, 60²/30²/15² (Lq 3600/900/225); keys 15² = 225.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{Linear, Module, VarBuilder, VarMap};

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of the whole process (all threads) in ms: unlike wall time it is not inflated by
/// other load, but it counts spinning (rayon, candle's barrier pool) as work.
fn cpu_ms() -> f64 {
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: plain libc call writing into `ts`.
    unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.sec as f64 * 1e3 + ts.nsec as f64 * 1e-6
}

/// A (wall, cpu) stopwatch.
struct Watch(Instant, f64);

impl Watch {
    fn start() -> Self {
        Watch(Instant::now(), cpu_ms())
    }
    fn stop(&self) -> (f64, f64) {
        (self.0.elapsed().as_secs_f64() * 1e3, cpu_ms() - self.1)
    }
}

/// (min wall, min cpu) over `reps` timings of `f` in ms, after one warm-up call.
fn timed(reps: usize, mut f: impl FnMut() -> Result<(f64, f64)>) -> Result<(f64, f64)> {
    f()?;
    let v = (0..reps).map(|_| f()).collect::<Result<Vec<_>>>()?;
    let min = |g: fn(&(f64, f64)) -> f64| v.iter().map(g).fold(f64::INFINITY, f64::min);
    Ok((min(|x| x.0), min(|x| x.1)))
}

/// Forward and backward timings of `f` on fresh vars made from `inputs`; the loss is
/// `Σ out ⊙ R` (R fixed random) so the incoming gradient is dense, as inside a network.
fn fwd_bwd(
    reps: usize,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<[(f64, f64); 2]> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let r = randn(f(&ts)?.dims())?;
    let fwd = timed(reps, || {
        let t = Watch::start();
        let _y = f(&ts)?;
        Ok(t.stop())
    })?;
    let bwd = timed(reps, || {
        let loss = f(&ts)?.mul(&r)?.sum_all()?;
        let t = Watch::start();
        let _g = loss.backward()?;
        Ok(t.stop())
    })?;
    Ok([fwd, bwd])
}

fn row(name: &str, r: [(f64, f64); 2]) {
    println!(
        "  {name:<44} fwd {:>8.2} (cpu {:>8.2})   bwd {:>8.2} (cpu {:>8.2})",
        r[0].0, r[0].1, r[1].0, r[1].1
    );
}

fn randn(shape: &[usize]) -> Result<Tensor> {
    Tensor::randn(0f32, 1., shape, &Device::Cpu)
}

/// Per-op breakdown of one composed MultiheadAttention call, then the fused pieces.
fn profile(reps: usize, e: usize, b: usize, lq: usize, lk: usize) -> Result<()> {
    let nh = 4;
    let dh = e / nh;
    println!("per-op, hidden {e}, B {b}, Lq {lq}, Lk {lk}");
    let lin = |x: &Tensor, w: &Tensor, bias: &Tensor| {
        Linear::new(w.clone(), Some(bias.clone())).forward(x)
    };
    let w = (randn(&[e, e])? * (1.0 / (e as f64).sqrt()))?;
    let bias = randn(&[e])?;
    let (xq, xk) = (randn(&[b, lq, e])?, randn(&[b, lk, e])?);
    let split = |x: &Tensor, l: usize| x.reshape((b, l, nh, dh))?.transpose(1, 2)?.contiguous();
    let (qp, kp) = (randn(&[b, lq, e])?, randn(&[b, lk, e])?);
    let (qh, kh) = (randn(&[b, nh, lq, dh])?, randn(&[b, nh, lk, dh])?);
    let logits = randn(&[b, nh, lq, lk])?;
    let probs = ops::nn::softmax(&logits, 3)?;
    let oh = randn(&[b, nh, lq, dh])?;
    row(
        "loss-gradient overhead (x·1, out (B,Lq,E))",
        fwd_bwd(reps, &[qp.clone()], &|t| t[0].affine(1.0, 0.0))?,
    );
    row(
        "in_proj q: Linear (B·Lq, E)x(E, E) + bias",
        fwd_bwd(reps, &[xq.clone(), w.clone(), bias.clone()], &|t| {
            lin(&t[0], &t[1], &t[2])
        })?,
    );
    row(
        "  matmul only: x (B·Lq,E) · wᵀ",
        fwd_bwd(reps, &[xq.clone(), w.clone()], &|t| {
            t[0].reshape((b * lq, e))?.matmul(&t[1].t()?)
        })?,
    );
    row(
        "  bias only: broadcast_add (B,Lq,E)+(E)",
        fwd_bwd(reps, &[qp.clone(), bias.clone()], &|t| {
            t[0].broadcast_add(&t[1])
        })?,
    );
    row(
        "in_proj k: Linear (B·Lk, E)x(E, E) + bias",
        fwd_bwd(reps, &[xk.clone(), w.clone(), bias.clone()], &|t| {
            lin(&t[0], &t[1], &t[2])
        })?,
    );
    row(
        "q · scale",
        fwd_bwd(reps, &[qp.clone()], &|t| &t[0] * 0.17)?,
    );
    row(
        "split heads q (reshape/transpose/copy)",
        fwd_bwd(reps, &[qp.clone()], &|t| split(&t[0], lq))?,
    );
    row(
        "split heads k",
        fwd_bwd(reps, &[kp.clone()], &|t| split(&t[0], lk))?,
    );
    row(
        "Q Kᵀ batched matmul",
        fwd_bwd(reps, &[qh, kh.clone()], &|t| t[0].matmul(&t[1].t()?))?,
    );
    row(
        "softmax composed (max/sub/exp/sum/div)",
        fwd_bwd(reps, &[logits.clone()], &|t| {
            ops::nn::softmax_composed(&t[0], 3)
        })?,
    );
    row(
        "softmax fused",
        fwd_bwd(reps, &[logits], &|t| ops::nn::softmax(&t[0], 3))?,
    );
    row(
        "P V batched matmul",
        fwd_bwd(reps, &[probs, kh], &|t| t[0].matmul(&t[1]))?,
    );
    row(
        "merge heads (transpose/reshape copy)",
        fwd_bwd(reps, &[oh], &|t| t[0].transpose(1, 2)?.reshape((b, lq, e)))?,
    );
    row(
        "out_proj: Linear (B·Lq, E)x(E, E) + bias",
        fwd_bwd(reps, &[qp.clone(), w.clone(), bias.clone()], &|t| {
            lin(&t[0], &t[1], &t[2])
        })?,
    );
    row(
        "fused linear (replaces in_proj q / out_proj)",
        fwd_bwd(reps, &[xq.clone(), w.clone(), bias.clone()], &|t| {
            ops::nn::linear(&t[0], &t[1], Some(&t[2]))
        })?,
    );
    row(
        "fused sdpa (replaces scale..merge)",
        fwd_bwd(reps, &[qp.clone(), kp.clone(), kp.clone()], &|t| {
            ops::attention::scaled_dot_product_attention(&t[0], &t[1], &t[2], nh, None)
        })?,
    );
    let ffn = 2 * e;
    let (w1, w2) = ((randn(&[ffn, e])? * 0.05)?, (randn(&[e, ffn])? * 0.05)?);
    let (b1, b2) = (randn(&[ffn])?, randn(&[e])?);
    row(
        &format!("FFN {e}->{ffn}->{e}, candle_nn::Linear"),
        fwd_bwd(
            reps,
            &[xq.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone()],
            &|t| lin(&lin(&t[0], &t[1], &t[2])?.relu()?, &t[3], &t[4]),
        )?,
    );
    row(
        &format!("FFN {e}->{ffn}->{e}, ops::nn::linear"),
        fwd_bwd(
            reps,
            &[xq.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone()],
            &|t| {
                ops::nn::linear(
                    &ops::nn::linear(&t[0], &t[1], Some(&t[2]))?.relu()?,
                    &t[3],
                    Some(&t[4]),
                )
            },
        )?,
    );
    row(
        &format!("FFN {e}->{ffn}->{e}, ops::nn::linear_relu + linear"),
        fwd_bwd(reps, &[xq.clone(), w1, b1, w2, b2], &|t| {
            ops::nn::linear(
                &ops::nn::linear_relu(&t[0], &t[1], Some(&t[2]))?,
                &t[3],
                Some(&t[4]),
            )
        })?,
    );
    let side = (lq as f64).sqrt() as usize;
    row(
        &format!("resize_bilinear ({b},{e},{side},{side})->15x15"),
        fwd_bwd(reps, &[randn(&[b, e, side, side])?], &|t| {
            ops::resize::resize_bilinear(&t[0], (15, 15), false)
        })?,
    );
    row(
        "composed sdpa (scale..merge)",
        fwd_bwd(reps, &[qp, kp.clone(), kp], &|t| {
            ops::attention::scaled_dot_product_attention_composed(&t[0], &t[1], &t[2], nh, None)
        })?,
    );
    Ok(())
}

fn mha(reps: usize, e: usize, b: usize, lq: usize, lk: usize) -> Result<()> {
    let vm = VarMap::new();
    let m = ops::attention::MultiheadAttention::new(
        e,
        4,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    let (x, kv) = (randn(&[b, lq, e])?, randn(&[b, lk, e])?);
    let inputs = [x, kv];
    let composed = fwd_bwd(reps, &inputs, &|t| {
        m.forward_composed(&t[0], &t[1], &t[1], None)
    })?;
    let fused = fwd_bwd(reps, &inputs, &|t| m.forward(&t[0], &t[1], &t[1], None))?;
    row(&format!("MHA E{e} B{b} Lq{lq} Lk{lk} composed"), composed);
    row(&format!("MHA E{e} B{b} Lq{lq} Lk{lk} fused"), fused);
    Ok(())
}

fn crossat(reps: usize, e: usize, ffn: usize, b: usize, h: usize) -> Result<()> {
    let dev = Device::Cpu;
    let cfg = mm::MmConfig {
        hidden_dim: e,
        dim_feedforward: ffn,
        num_queries: 20,
        ..mm::MmConfig::efficientnet_lite0()
    };
    let vm = VarMap::new();
    let xat = mm::cross_align::CrossAt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let inputs = [
        randn(&[b, e, h, h])?,
        randn(&[b, e, h, h])?,
        randn(&[b, e, h, h])?,
    ];
    for fused in [false, true] {
        ops::set_fused_kernels(fused);
        let r = fwd_bwd(reps, &inputs, &|t| {
            let (a, c) = xat.forward(&t[0], &t[1], &t[2], &t[2])?;
            Tensor::cat(&[a, c], 1)
        })?;
        row(
            &format!(
                "CrossAt E{e} B{b} {h}x{h} {}",
                if fused { "fused" } else { "composed" }
            ),
            r,
        );
    }
    ops::set_fused_kernels(true);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut reps = 5;
    let mut what = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--reps" {
            reps = it.next().and_then(|s| s.parse().ok()).expect("--reps N");
        } else {
            what.push(a.as_str());
        }
    }
    let all = what.is_empty();
    let want = |s: &str| all || what.contains(&s);
    println!(
        "threads: rayon {}, CANDLE_NUM_THREADS={}; ms, min of {reps}: wall (cpu)",
        rayon_threads(),
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    if want("profile") {
        profile(reps, 128, 4, 1024, 225)?;
        profile(reps, 256, 1, 3600, 225)?;
    }
    if want("mha") {
        println!("MultiheadAttention (cpu shapes, then paper shapes)");
        for lq in [1024, 256, 64] {
            mha(reps, 128, 4, lq, 225)?;
        }
        for lq in [3600, 900, 225] {
            mha(reps, 256, 1, lq, 225)?;
        }
    }
    if want("crossat") {
        println!("CrossAt block: 2 layers x 2 directions + FFN + LayerNorm (cpu shapes, then paper shapes)");
        for h in [32, 16, 8] {
            crossat(reps, 128, 256, 4, h)?;
        }
        for h in [60, 30, 15] {
            crossat(reps, 256, 512, 1, h)?;
        }
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}
