//! `cargo xtask gpu-check`: everything a GPU build must show, in one run on one GPU.
//!
//! 1. ops: every custom op on the device against the CPU kernels, forward and gradients;
//! 2. parity: the official fixtures (backbone, POS, mask matching) computed on the device;
//! 3. train: `train-pos`, `cache-proposals` and `train-mm` on synthetic data at the paper preset
//!    (batch 8 / 4 at 480², ResNet-50 with synthetic weights), the loss falling;
//! 4. bench: the same computations in PyTorch on the same GPU (tools/bench_torch.py), one
//!    request at a time in turn with ours, and the deformable-attention kernel against the
//!    composed path.
//!
//! Each section runs even when an earlier one failed; the summary (last lines printed, and
//! `summary.json` in `--out`) says what passed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use mmformer::bench::{median, TorchServer};
use mmformer::stage1::Stage1Options;
use mmformer::stage2::Stage2Options;
use mmformer::{ops, Preset};
use serde_json::json;

#[derive(Clone, Debug, clap::Args)]
pub struct GpuCheckArgs {
    #[command(flatten)]
    pub device: crate::args::DeviceArg,
    /// Parity fixture folder (default: $MMFORMER_PARITY_DIR, else ../shared/fixtures/parity).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Work folder (synthetic data, runs, shards, summary.json).
    #[arg(long, default_value = "runs/gpu-check")]
    pub out: PathBuf,
    /// Training iterations of each stage.
    #[arg(long, default_value_t = 20)]
    pub iters: u64,
    /// Timed repetitions of each benchmark.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Sections to run (ops, parity, train, bench).
    #[arg(long, value_delimiter = ',', default_value = "ops,parity,train,bench")]
    pub sections: Vec<String>,
    /// Input side of the benchmarks (the paper: 480).
    #[arg(long, default_value_t = 480)]
    pub size: usize,
    /// Preset of the training runs: paper (ResNet-50 with synthetic weights, batch 8 / 4) or
    /// cpu (EfficientNet-Lite0 asset; for a dry run of this command on a CPU).
    #[arg(long, default_value_t = Preset::Paper)]
    pub preset: Preset,
}

/// One line of the summary.
struct Line {
    section: &'static str,
    name: String,
    ok: bool,
    detail: String,
}

#[derive(Default)]
struct Summary {
    lines: Vec<Line>,
    figures: serde_json::Map<String, serde_json::Value>,
}

impl Summary {
    fn add(&mut self, section: &'static str, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        let line = Line { section, name: name.into(), ok, detail: detail.into() };
        println!("[{}] {} {}: {}", line.section, if line.ok { "ok  " } else { "FAIL" }, line.name, line.detail);
        self.lines.push(line);
    }

    fn figure(&mut self, key: &str, value: serde_json::Value) {
        self.figures.insert(key.to_string(), value);
    }
}

pub fn gpu_check(args: &GpuCheckArgs) -> Result<()> {
    let dev = args.device.open()?;
    if !dev.is_cuda() {
        // Allowed as a dry run of the command itself: the comparisons are then CPU against CPU.
        eprintln!("gpu-check: device {} is not a GPU; this is only a dry run (build with --features cuda)", args.device.device);
    }
    if let Some(f) = &args.fixtures {
        std::env::set_var("MMFORMER_PARITY_DIR", f);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut s = Summary::default();
    let t0 = Instant::now();
    let want = |name: &str| args.sections.iter().any(|x| x == name);
    type Section = fn(&GpuCheckArgs, &Device, &mut Summary) -> Result<()>;
    let sections: [(&str, Section); 4] = [("ops", ops_section), ("parity", parity_section), ("train", train_section), ("bench", bench_section)];
    for (name, run) in sections {
        if !want(name) {
            continue;
        }
        let ts = Instant::now();
        // The comparisons' tolerances are float32's: TF32 (--tf32) only where speed is measured.
        let tf32 = ops::tf32();
        if matches!(name, "ops" | "parity") {
            ops::set_tf32(false);
        }
        if let Err(e) = run(args, &dev, &mut s) {
            s.add("error", name, false, format!("{e:#}"));
        }
        ops::set_tf32(tf32);
        println!("-- section {name}: {:.1} s", ts.elapsed().as_secs_f64());
    }
    let failed = s.lines.iter().filter(|l| !l.ok).count();
    let report = json!({
        "format": "mmformer-gpu-check/1",
        "device": mmformer::device_name(&dev),
        "seconds": t0.elapsed().as_secs_f64(),
        "checks": s.lines.iter().map(|l| json!({"section": l.section, "name": l.name, "ok": l.ok, "detail": l.detail})).collect::<Vec<_>>(),
        "figures": s.figures,
    });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    println!("\n==== gpu-check summary ({:.0} s, {}) ====", t0.elapsed().as_secs_f64(), mmformer::device_name(&dev));
    for l in &s.lines {
        println!("{} {:<7} {:<34} {}", if l.ok { "ok  " } else { "FAIL" }, l.section, l.name, l.detail);
    }
    println!("{} checks, {} failed; {}", s.lines.len(), failed, path.display());
    if failed > 0 {
        bail!("{failed} GPU checks failed");
    }
    Ok(())
}

// ---- 1. ops -----------------------------------------------------------------------------------

/// ‖a − b‖ / ‖b‖ in f64 (infinite when a has a non-finite value or the shapes differ).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Ok(f64::INFINITY);
    }
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if a.iter().any(|x| !x.is_finite()) {
        return Ok(f64::INFINITY);
    }
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        d += (x - y) * (x - y);
        n += y * y;
    }
    Ok(d.sqrt() / n.sqrt().max(1e-30))
}

/// Deterministic values in [lo, hi) of `shape` (f32, CPU), a different stream per seed (the
/// parity formula's hash): fresh inputs for every case.
fn uniform(seed: u64, shape: &[usize], lo: f32, hi: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = parity::unit(&format!("gpu-check.{seed}"), n)
        .into_iter()
        .map(|r| lo + (hi - lo) * (0.5 * (r as f32 + 1.0)))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// Runs `on_dev` on the device and `on_cpu` on the CPU over the same inputs; returns the output's
/// relative error and the largest one among the gradients of the inputs flagged in `grads`
/// (the loss is a fixed random weighting of the output).
fn compare(inputs: &[Tensor], grads: &[bool], on_dev: OpFn, on_cpu: OpFn, dev: &Device, seed: u64) -> Result<(f64, f64)> {
    let run = |f: OpFn, d: &Device| -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let vars = inputs.iter().map(|t| Var::from_tensor(&t.to_device(d)?)).collect::<candle_core::Result<Vec<_>>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts)?;
        let w = uniform(seed ^ 0xABCD, out.dims(), -1.0, 1.0)?.to_device(d)?.to_dtype(out.dtype())?;
        let loss = (&out * &w)?.sum_all()?;
        let g = if grads.iter().any(|&x| x) { Some(loss.backward()?) } else { None };
        let gs = vars
            .iter()
            .zip(grads)
            .map(|(v, &want)| if want { g.as_ref().and_then(|g| g.get(v)).map(|t| t.to_device(&Device::Cpu)).transpose() } else { Ok(None) })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((out.to_device(&Device::Cpu)?, gs))
    };
    let (out_d, g_d) = run(on_dev, dev)?;
    let (out_c, g_c) = run(on_cpu, &Device::Cpu)?;
    let fwd = rel_err(&out_d, &out_c)?;
    let mut worst = 0f64;
    for (i, (a, b)) in g_d.iter().zip(&g_c).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => worst = worst.max(rel_err(a, b)?),
            (None, None) => {}
            _ => bail!("input {i}: a gradient on one device only"),
        }
    }
    Ok((fwd, worst))
}

fn ops_section(_args: &GpuCheckArgs, dev: &Device, s: &mut Summary) -> Result<()> {
    use ops::conv::{self, Activation, ConvSpec};
    use ops::deform::{ms_deform_attn_core, ms_deform_attn_core_composed};
    // f32 on both sides; the CPU runs the fast kernels (or, where none exists, the same composed
    // code). Tolerance: float32 rounding of different summation orders.
    const TOL: f64 = 2e-5;
    let shapes = [(16usize, 16usize), (8, 8), (4, 4)];
    let s_rows: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let deform_inputs = |seed| -> Result<Vec<Tensor>> {
        Ok(vec![
            uniform(seed, &[2, s_rows, 8, 32], -1.0, 1.0)?,
            // Some locations fall outside [0, 1]: their taps read zeros.
            uniform(seed + 1, &[2, 50, 8, 3, 4, 2], -0.1, 1.1)?,
            uniform(seed + 2, &[2, 50, 8, 3, 4], 0.0, 0.2)?,
        ])
    };
    let deform = |t: &[Tensor]| ms_deform_attn_core(&t[0], &shapes, &t[1], &t[2]);
    let composed = |t: &[Tensor]| ms_deform_attn_core_composed(&t[0], &shapes, &t[1], &t[2]);
    let mut cases: Vec<(&str, Vec<Tensor>, Vec<bool>, OpFn, OpFn)> = Vec::new();
    cases.push(("ms_deform_attn (kernel, warp bwd)", deform_inputs(1)?, vec![true; 3], &deform, &deform));
    cases.push(("ms_deform_attn (kernel, thread bwd)", deform_inputs(31)?, vec![true; 3], &deform, &deform));
    cases.push(("ms_deform_attn (composed)", deform_inputs(11)?, vec![true; 3], &composed, &deform));
    let grid = |t: &[Tensor]| ops::sample::grid_sample_bilinear(&t[0], &t[1]);
    cases.push(("grid_sample", vec![uniform(2, &[2, 3, 20, 24], -1.0, 1.0)?, uniform(3, &[2, 10, 12, 2], -1.1, 1.1)?], vec![true, true], &grid, &grid));
    let point = |t: &[Tensor]| ops::sample::point_sample(&t[0], &t[1]);
    cases.push(("point_sample", vec![uniform(4, &[2, 5, 16, 16], -1.0, 1.0)?, uniform(5, &[2, 40, 2], 0.0, 1.0)?], vec![true, true], &point, &point));
    let sdpa = |t: &[Tensor]| {
        let mask = t[3].ge(0.8)?; // ~10% of the keys masked
        ops::attention::scaled_dot_product_attention(&t[0], &t[1], &t[2], 4, Some(&mask))
    };
    cases.push((
        "attention (masked)",
        vec![uniform(6, &[2, 30, 64], -1.0, 1.0)?, uniform(7, &[2, 40, 64], -1.0, 1.0)?, uniform(8, &[2, 40, 64], -1.0, 1.0)?, uniform(9, &[8, 30, 40], -1.0, 1.0)?],
        vec![true, true, true, false],
        &sdpa,
        &sdpa,
    ));
    let softmax = |t: &[Tensor]| ops::nn::softmax(&t[0], 2);
    cases.push(("softmax", vec![uniform(10, &[4, 30, 100], -5.0, 5.0)?], vec![true], &softmax, &softmax));
    let layer_norm = |t: &[Tensor]| {
        let (w, b) = (&t[1], &t[2]);
        let mut map = std::collections::HashMap::new();
        map.insert("weight".to_string(), w.clone());
        map.insert("bias".to_string(), b.clone());
        // Through the module (fused kernel on CPU); its own parameters are taken as given.
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, t[0].device());
        ops::nn::LayerNorm::new(64, 1e-5, vb)?.forward(&t[0])
    };
    cases.push(("layer_norm", vec![uniform(12, &[2, 30, 64], -2.0, 2.0)?, uniform(13, &[64], 0.5, 1.5)?, uniform(14, &[64], -0.5, 0.5)?], vec![true, false, false], &layer_norm, &layer_norm));
    let group_norm = |t: &[Tensor]| conv::group_norm(&t[0], &t[1], &t[2], 8, 1e-5);
    cases.push(("group_norm", vec![uniform(15, &[2, 32, 12, 10], -2.0, 2.0)?, uniform(16, &[32], 0.5, 1.5)?, uniform(17, &[32], -0.5, 0.5)?], vec![true; 3], &group_norm, &group_norm));
    let conv_t = |t: &[Tensor]| conv::conv2d_trainable(&t[0], &t[1], Some(&t[2]), [1, 1, 1, 1]);
    cases.push(("conv2d_trainable 3x3", vec![uniform(18, &[2, 16, 14, 12], -1.0, 1.0)?, uniform(19, &[24, 16, 3, 3], -0.2, 0.2)?, uniform(20, &[24], -0.1, 0.1)?], vec![true; 3], &conv_t, &conv_t));
    let conv_1 = |t: &[Tensor]| conv::conv2d_trainable(&t[0], &t[1], Some(&t[2]), [0; 4]);
    cases.push(("conv2d_trainable 1x1", vec![uniform(32, &[2, 16, 14, 12], -1.0, 1.0)?, uniform(33, &[24, 16, 1, 1], -0.2, 0.2)?, uniform(34, &[24], -0.1, 0.1)?], vec![true; 3], &conv_1, &conv_1));
    let conv_a = |t: &[Tensor]| conv::conv2d_trainable(&t[0], &t[1], None, [0, 1, 1, 0]);
    cases.push(("conv2d_trainable 2x2 asym pad", vec![uniform(35, &[2, 8, 9, 11], -1.0, 1.0)?, uniform(36, &[12, 8, 2, 2], -0.2, 0.2)?], vec![true; 2], &conv_a, &conv_a));
    let conv_f = |t: &[Tensor]| conv::conv2d(&t[0], &t[1], Some(&t[2]), ConvSpec::same_as_torch(2, 1), Activation::Relu, None);
    cases.push(("conv2d frozen s2+relu", vec![uniform(21, &[2, 16, 15, 13], -1.0, 1.0)?, uniform(22, &[24, 16, 3, 3], -0.2, 0.2)?, uniform(23, &[24], -0.1, 0.1)?], vec![false; 3], &conv_f, &conv_f));
    let pool = |t: &[Tensor]| conv::max_pool2d(&t[0], 3, 2, 1);
    cases.push(("max_pool2d 3/2/1", vec![uniform(24, &[2, 8, 17, 16], -1.0, 1.0)?], vec![false], &pool, &pool));
    let bilinear = |t: &[Tensor]| ops::resize::resize_bilinear(&t[0], (37, 29), false);
    cases.push(("resize bilinear", vec![uniform(25, &[2, 6, 15, 12], -1.0, 1.0)?], vec![true], &bilinear, &bilinear));
    let nearest = |t: &[Tensor]| ops::resize::resize_nearest(&t[0], (31, 23));
    cases.push(("resize nearest", vec![uniform(26, &[2, 3, 15, 12], 0.0, 5.0)?], vec![false], &nearest, &nearest));
    let linear = |t: &[Tensor]| ops::nn::linear(&t[0], &t[1], Some(&t[2]));
    cases.push(("linear", vec![uniform(27, &[2, 30, 64], -1.0, 1.0)?, uniform(28, &[48, 64], -0.2, 0.2)?, uniform(29, &[48], -0.1, 0.1)?], vec![true; 3], &linear, &linear));

    for (i, (name, inputs, grads, on_dev, on_cpu)) in cases.into_iter().enumerate() {
        let was = ops::deform::cuda_backward();
        if name.contains("warp bwd") {
            ops::deform::set_cuda_backward(ops::deform::CudaBackward::Warp);
        } else if name.contains("thread bwd") {
            ops::deform::set_cuda_backward(ops::deform::CudaBackward::Thread);
        }
        let result = compare(&inputs, &grads, on_dev, on_cpu, dev, 100 + i as u64);
        ops::deform::set_cuda_backward(was);
        match result {
            Ok((fwd, grad)) => {
                let ok = fwd <= TOL && grad <= TOL;
                let g = if grads.iter().any(|&x| x) { format!(", grads {grad:.1e}") } else { String::new() };
                s.add("ops", name, ok, format!("rel err fwd {fwd:.1e}{g} (tol {TOL:.0e})"));
            }
            Err(e) => s.add("ops", name, false, format!("{e:#}")),
        }
    }
    Ok(())
}

// ---- 2. parity --------------------------------------------------------------------------------

fn parity_section(_args: &GpuCheckArgs, dev: &Device, s: &mut Summary) -> Result<()> {
    use mmformer::backbone::{Backbone, ResNet50, ResNetConfig, Weights};
    use parity::{load_fixture, max_abs_diff, FormulaWeights, ABS_TOL, REL_TOL};
    let fwd = load_fixture("forward.safetensors")?;
    let inputs = load_fixture("inputs.safetensors")?;
    let vb = || -> Result<_> { Ok(FormulaWeights::with_calibration()?.var_builder_on(dev)) };
    let mut check = |name: &str, ours: &Tensor| -> Result<()> {
        let reference = fwd.get(name)?;
        let (d, m) = max_abs_diff(&ours.to_device(&Device::Cpu)?, &reference)?;
        s.add("parity", name, d <= REL_TOL * m + ABS_TOL, format!("max|diff|/max|ref| {:.1e} (tol {REL_TOL:.0e})", d / m.max(1e-30)));
        Ok(())
    };
    let on = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(dev)?) };

    // Backbone on the normalised, padded query.
    let resnet = ResNet50::new(&ResNetConfig::r50(), Weights::from_var_builder(vb()?).pp("backbone"))?;
    let f = resnet.forward(&on(fwd.get("query.image_normalized_padded")?)?)?;
    for (name, t) in ["res2", "res3", "res4", "res5"].iter().zip(f.as_array()) {
        check(&format!("backbone.query.{name}"), t)?;
    }
    drop(resnet);

    // POS on the stored backbone features: pixel decoder and the first prediction (later ones
    // depend on thresholded masks, compared by the CPU tests with injection).
    let pos = mmformer::pos::Pos::new(&mmformer::pos::PosConfig::paper(), vb()?)?;
    let feats = ["res2", "res3", "res4", "res5"].iter().map(|r| on(fwd.get(&format!("backbone.query.{r}"))?)).collect::<Result<Vec<_>>>()?;
    let out = pos.forward(&feats)?;
    check("pixel_decoder.mask_features", &out.mask_features)?;
    for l in 0..3 {
        check(&format!("pixel_decoder.multi_scale.{l}"), &out.multi_scale[l])?;
    }
    check("decoder.pred_masks.0", &out.aux[0])?;
    drop(pos);

    // Mask matching, 1-shot, on the stored features and proposals.
    let mm = mmformer::mm::MaskMatching::new(&mmformer::mm::MmConfig::resnet50(), vb()?)?;
    let levels = |prefix: &str| -> Result<[Tensor; 3]> {
        let v = ["res5", "res4", "res3"].iter().map(|r| on(fwd.get(&format!("{prefix}.{r}"))?)).collect::<Result<Vec<_>>>()?;
        Ok([v[0].clone(), v[1].clone(), v[2].clone()])
    };
    let label = on(inputs.get("support.labels")?.narrow(0, 0, 1)?)?;
    let img = inputs.get("query.image")?;
    let hw = (img.dim(1)?, img.dim(2)?);
    let logits = on(fwd.get("decoder.pred_masks.9")?)?;
    let out = mm.forward(&levels("backbone.query")?, &[levels("backbone.support0")?], &[label], &logits, hw)?;
    check("mm.1shot.coefficients", &out.coefficients)?;
    check("mm.1shot.out", &out.out)?;
    Ok(())
}

// ---- 3. train ---------------------------------------------------------------------------------

/// Mean of the first and of the last quarter (at least 3) of the logged losses.
fn loss_trend(log: &Path) -> Result<(f64, f64, usize)> {
    let text = std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let losses: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "step" || v.get("loss").is_some())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    if losses.len() < 6 {
        bail!("{}: {} logged losses, need at least 6", log.display(), losses.len());
    }
    let k = (losses.len() / 4).max(3);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok((mean(&losses[..k]), mean(&losses[losses.len() - k..]), losses.len()))
}

/// Seconds per iteration from the log's step records (median of the per-record rates, the first
/// record, which holds start-up and compilation, left out).
fn step_seconds(log: &Path) -> Result<Option<f64>> {
    let text = std::fs::read_to_string(log)?;
    let v: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["sec_per_iter"].as_f64())
        .collect();
    Ok((v.len() > 1).then(|| median(v[1..].to_vec())))
}

fn max_logged(log: &Path, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v[key].as_f64())
        .reduce(f64::max)
}

fn train_section(args: &GpuCheckArgs, dev: &Device, s: &mut Summary) -> Result<()> {
    let out = &args.out;
    let data = out.join("synthetic");
    let cfg = mmformer::data::synthetic::SyntheticConfig { num_train: 240, num_val: 80, ..Default::default() };
    mmformer::data::synthetic::generate(&cfg, &data, None)?;
    // A ResNet-50 weight file in the safetensors format, synthetic weights (no real ones here).
    let preset = args.preset;
    let weights = match preset {
        Preset::Paper => {
            let path = out.join("resnet50-synthetic.safetensors");
            if !path.exists() {
                mmformer::backbone::ResNet50::save_synthetic(0, &path)?;
            }
            Some(path)
        }
        Preset::Cpu => None,
    };
    let (b1, b2) = match preset {
        Preset::Paper => (8, 4),
        Preset::Cpu => (4, 4),
    };
    let progress = mmformer::NotesToStderr;
    let iters = args.iters;

    let pos_out = out.join("pos");
    let _ = std::fs::remove_dir_all(&pos_out);
    let opts = Stage1Options {
        data: data.clone(),
        fold: 0,
        preset,
        backbone_weights: weights.clone(),
        batch: b1,
        iters,
        lr: 1e-4,
        weight_decay: 0.05,
        clip: 0.01,
        seed: 0,
        out: pos_out.clone(),
        eval_every: iters,
        eval_episodes: 16,
        log_every: 1,
    };
    let t = Instant::now();
    mmformer::stage1::train_pos(&opts, dev, &progress)?;
    let wall = t.elapsed().as_secs_f64();
    let log = pos_out.join("log.jsonl");
    let (first, last, n) = loss_trend(&log)?;
    let sec = step_seconds(&log)?;
    s.add("train", format!("train-pos {preset} b{b1} (loss falls)"), last < first, format!("loss {first:.3} -> {last:.3} over {n} logged steps"));
    let mem = max_logged(&log, "gpu_mem_mb");
    if let Some(sec) = sec {
        s.figure("stage1_iter_s", json!(sec));
        s.add("train", format!("stage-1 iteration ({preset}, b{b1})"), true, format!(
            "{:.0} ms/iter; COCO 60k its -> {:.2} h, PASCAL 20k -> {:.2} h; device memory {}; {wall:.0} s in all",
            sec * 1e3, sec * 60_000.0 / 3600.0, sec * 20_000.0 / 3600.0,
            mem.map_or("n/a".into(), |m| format!("{:.1} GiB", m / 1024.0))
        ));
        if let Some(m) = mem {
            s.figure("stage1_gpu_mem_mb", json!(m));
        }
    }

    let shards = out.join("shards");
    let _ = std::fs::remove_dir_all(&shards);
    let t = Instant::now();
    let cache = mmformer::cache::CacheOptions::one_view(data.clone(), preset, weights.clone(), pos_out.join("checkpoints/best"), shards.clone());
    mmformer::cache::cache_proposals(&cache, dev, &progress)?;
    let images = cfg.num_train + cfg.num_val;
    let cache_s = t.elapsed().as_secs_f64();
    s.add("train", format!("cache-proposals {preset}"), true, format!("{images} images in {cache_s:.1} s ({:.1} ms/image)", cache_s * 1e3 / images as f64));

    let mm_out = out.join("mm");
    let _ = std::fs::remove_dir_all(&mm_out);
    let opts = Stage2Options {
        shards: shards.clone(),
        batch: b2,
        iters,
        lr: 1e-4,
        weight_decay: 0.05,
        clip: 0.01,
        shot: 1,
        seed: 0,
        out: mm_out.clone(),
        eval_every: iters,
        eval_episodes: 16,
        log_every: 1,
        no_self_alignment: false,
        no_cross_alignment: false,
        no_learnable_matching: false,
        no_co_loss: false,
    };
    let t = Instant::now();
    mmformer::stage2::train_mm(&opts, dev, &progress)?;
    let wall = t.elapsed().as_secs_f64();
    let log = mm_out.join("log.jsonl");
    let (first, last, n) = loss_trend(&log)?;
    s.add("train", format!("train-mm {preset} b{b2} (loss falls)"), last < first, format!("loss {first:.3} -> {last:.3} over {n} logged steps"));
    if let Some(sec) = step_seconds(&log)? {
        let mem = max_logged(&log, "gpu_mem_mb");
        s.figure("stage2_iter_s", json!(sec));
        s.add("train", format!("stage-2 iteration ({preset}, b{b2})"), true, format!(
            "{:.0} ms/iter; COCO 20k its -> {:.2} h; device memory {}; {wall:.0} s in all",
            sec * 1e3, sec * 20_000.0 / 3600.0,
            mem.map_or("n/a".into(), |m| format!("{:.1} GiB", m / 1024.0))
        ));
    }
    Ok(())
}

// ---- 4. bench ---------------------------------------------------------------------------------

/// Median wall ms of `reps` runs of `f` after one warm-up, synchronising the device each time.
fn time_ms(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

fn torch_ms(torch: &mut Option<TorchServer>, request: &str) -> Option<f64> {
    let t = torch.as_mut()?;
    match t.time(request) {
        Ok(v) if !v.is_empty() => Some(median(v)),
        Ok(_) => None,
        Err(e) => {
            eprintln!("torch {request}: {e:#}");
            None
        }
    }
}

fn ratio_line(ours: f64, torch: Option<f64>) -> String {
    match torch {
        Some(t) => format!("ours {ours:.1} ms, PyTorch {t:.1} ms, ratio {:.2}", ours / t),
        None => format!("ours {ours:.1} ms (no PyTorch)"),
    }
}

fn bench_section(args: &GpuCheckArgs, dev: &Device, s: &mut Summary) -> Result<()> {
    use mmformer::backbone::Backbone;
    let reps = args.reps.max(3);
    let size = args.size;
    let mut sink = std::io::stdout();
    // BN folded on both sides, as our backbone does at load.
    let mut torch = TorchServer::start(4, &["--device", &args.device.device, "--fuse-bn"], &mut sink)?;
    sink.flush()?;

    // Deformable attention at the pixel decoder's size (batch 8, 480²): kernel vs composed.
    {
        let shapes = [(size / 8, size / 8), (size / 16, size / 16), (size / 32, size / 32)];
        let rows: usize = shapes.iter().map(|(h, w)| h * w).sum();
        let v = Var::from_tensor(&uniform(1, &[8, rows, 8, 32], -1.0, 1.0)?.to_device(dev)?)?;
        let l = Var::from_tensor(&uniform(2, &[8, rows, 8, 3, 4, 2], 0.0, 1.0)?.to_device(dev)?)?;
        let a = Var::from_tensor(&uniform(3, &[8, rows, 8, 3, 4], 0.0, 0.1)?.to_device(dev)?)?;
        let run = |composed: bool| -> Result<f64> {
            // The composed path takes seconds per call on a GPU: two timed runs are plenty.
            time_ms(dev, if composed { 2 } else { reps }, || {
                let f = if composed { ops::deform::ms_deform_attn_core_composed } else { ops::deform::ms_deform_attn_core };
                let out = f(v.as_tensor(), &shapes, l.as_tensor(), a.as_tensor())?;
                out.sum_all()?.backward()?;
                Ok(())
            })
        };
        let was = ops::deform::cuda_backward();
        ops::deform::set_cuda_backward(ops::deform::CudaBackward::Warp);
        let warp = run(false)?;
        ops::deform::set_cuda_backward(ops::deform::CudaBackward::Thread);
        let thread = run(false)?;
        ops::deform::set_cuda_backward(was);
        let composed = run(true)?;
        s.figure("deform_fwd_bwd_ms", json!({"warp": warp, "thread": thread, "composed": composed}));
        s.add("bench", "ms_deform_attn fwd+bwd b8", true, format!(
            "kernel {thread:.2} ms (thread bwd), {warp:.2} ms (warp bwd); composed {composed:.1} ms ({:.0}x)", composed / thread
        ));
    }

    // The pixel decoder's largest trainable convolution (3x3, 256 -> 256 at 1/4 of 480², batch
    // 8), forward + backward: the tap-wise matrix products against candle's convolution.
    {
        let side = size / 4;
        let x = Var::from_tensor(&uniform(4, &[8, 256, side, side], -1.0, 1.0)?.to_device(dev)?)?;
        let w = Var::from_tensor(&uniform(5, &[256, 256, 3, 3], -0.05, 0.05)?.to_device(dev)?)?;
        let was = ops::conv::conv_by_matmul();
        let run = |matmul: bool| -> Result<f64> {
            ops::conv::set_conv_by_matmul(matmul);
            let r = time_ms(dev, reps, || {
                ops::conv::conv2d_trainable(x.as_tensor(), w.as_tensor(), None, [1; 4])?.sum_all()?.backward()?;
                Ok(())
            });
            ops::conv::set_conv_by_matmul(was);
            r
        };
        let matmul = run(true)?;
        let candle = if dev.is_cuda() { run(false)? } else { f64::NAN };
        s.figure("conv3x3_fwd_bwd_ms", json!({"matmul": matmul, "candle": candle}));
        s.add("bench", format!("conv 3x3 256ch {side}² b8 fwd+bwd"), true, format!("tap matmuls {matmul:.1} ms, candle conv2d {candle:.1} ms"));
    }

    // ResNet-50 forward, batch 1 and 8.
    let (resnet, _) = mmformer::backbone::ResNet50::synthetic_with_weights(0, dev)?;
    for batch in [1usize, 8] {
        let x = mmformer::train::seeded_randn((batch, 3, size, size), 0, "gpu_check.image", dev)?;
        let ours = time_ms(dev, reps, || {
            resnet.forward(&x)?;
            Ok(())
        })?;
        let t = torch_ms(&mut torch, &format!("resnet50 {size} {reps} {batch}"));
        s.figure(&format!("resnet50_b{batch}_ms"), json!({"ours": ours, "torch": t}));
        s.add("bench", format!("resnet50 fwd {size}² b{batch}"), true, ratio_line(ours, t));
    }
    drop(resnet);

    // POS forward (inference), batch 1.
    let model = mmformer::MmFormer::synthetic(Preset::Paper, 0, dev)?;
    let feats = mmformer::bench::pos_bench_features(Preset::Paper, size, 1, dev)?;
    let ours = time_ms(dev, reps, || {
        model.pos.forward(&feats)?;
        Ok(())
    })?;
    let t = torch_ms(&mut torch, &format!("pos_forward_paper {size} {reps} 1"));
    s.add("bench", format!("POS fwd paper {size}² b1"), true, ratio_line(ours, t));

    // A whole 1-shot episode (backbone on query and support, POS, matching), batch 1.
    let x = mmformer::train::seeded_randn((1, 3, size, size), 0, "gpu_check.query", dev)?;
    let sx = mmformer::train::seeded_randn((1, 3, size, size), 0, "gpu_check.support", dev)?;
    let label: Vec<f32> = (0..size * size)
        .map(|i| {
            let (y, x) = (i / size, i % size);
            f32::from((size / 4..3 * size / 4).contains(&y) && (size / 4..3 * size / 4).contains(&x))
        })
        .collect();
    let label = Tensor::from_vec(label, (1, size, size), dev)?;
    let ours = time_ms(dev, reps, || {
        model.episode(&x, std::slice::from_ref(&sx), std::slice::from_ref(&label))?;
        Ok(())
    })?;
    s.figure("episode_1shot_ms", json!(ours));
    s.add("bench", format!("1-shot episode {size}² (target <= 20 ms)"), ours <= 20.0, format!("ours {ours:.1} ms"));
    drop(model);

    // Stage-1 training iteration on fixed features (POS forward + criterion + backward + step),
    // batch 8, in float32 and with TF32 matrix products.
    let t = torch_ms(&mut torch, &format!("pos_train_paper {size} {reps} 8"));
    let was = ops::tf32();
    for tf32 in [false, true] {
        if tf32 && !dev.is_cuda() {
            continue;
        }
        ops::set_tf32(tf32);
        let mut bench = mmformer::bench::PosTrainBench::new(Preset::Paper, size, 8, dev)?;
        let ours = time_ms(dev, reps, || {
            bench.step()?;
            Ok(())
        })?;
        let mem = ops::device_memory_mb(dev);
        // Where the time goes: phases with the device waited for at each boundary.
        bench.sync_phases = true;
        let mut phases: Vec<Vec<f64>> = vec![Vec::new(); 4];
        for _ in 0..3 {
            let (p, _) = bench.step()?;
            for (v, x) in phases.iter_mut().zip(p) {
                v.push(x);
            }
        }
        let phases: Vec<String> = mmformer::bench::TRAIN_PHASES
            .iter()
            .zip(phases)
            .map(|(n, v)| format!("{n} {:.0}", median(v)))
            .collect();
        drop(bench);
        let tag = if tf32 { " tf32" } else { "" };
        s.add("bench", format!("POS train phases (ms){tag}"), true, phases.join(", "));
        s.figure(&format!("pos_train_b8{}_ms", tag.trim()), json!({"ours": ours, "torch": t, "gpu_mem_mb": mem}));
        s.add("bench", format!("POS train iter paper {size}² b8{tag}"), true, format!(
            "{}; device memory {}", ratio_line(ours, t), mem.map_or("n/a".into(), |m| format!("{:.1} GiB", m / 1024.0))
        ));
    }
    ops::set_tf32(was);

    // Stage 2 on the shards of the train section (when it ran): from shards vs live.
    let shards = args.out.join("shards");
    if shards.join("manifest.json").exists() {
        let rows = mmformer::bench::bench_stage2(&mut sink, &shards, 4, reps, dev)?;
        let line: Vec<String> = rows.iter().map(|r| format!("{} {:.1} ms", r.name, r.ours_ms)).collect();
        s.add("bench", "stage 2 b4: shards vs live", true, line.join("; "));
    }
    Ok(())
}
