//! `cargo xtask bench`: our models against the same computation in PyTorch on the same machine,
//! with the same number of threads, interleaved run by run; medians and ratios.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::assets::workspace_root;

#[derive(Serialize, Clone, Debug)]
pub struct BenchRow {
    pub name: String,
    pub ours_ms: f64,
    pub torch_ms: Option<f64>,
    pub ratio: Option<f64>,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite timings"));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The PyTorch side: `tools/bench_torch.py` running as a server in the benchmark venv.
pub struct TorchServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

pub fn torch_venv() -> PathBuf {
    match std::env::var_os("MMFORMER_TORCH_VENV") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/mmformer/torch-venv"),
    }
}

impl TorchServer {
    /// None (with a note) when the venv has not been made: our timings are still reported.
    pub fn start(threads: usize, extra: &[&str]) -> Result<Option<Self>> {
        let python = torch_venv().join("bin/python");
        if !python.exists() {
            eprintln!(
                "note: no PyTorch venv at {} — run `bash tools/setup_torch_venv.sh` for the comparison; reporting ours only",
                python.display()
            );
            return Ok(None);
        }
        let script = workspace_root().join("tools/bench_torch.py");
        let mut cmd = Command::new(&python);
        // GNU OpenMP's default spin-waiting makes every parallel region wait for a worker that
        // another process has pushed off its core: on a shared 2-core machine a 31 ms
        // EfficientNet-Lite0 forward took 1.9 s with 2 threads (and its spinning slows our side
        // between requests). Passive waiting is torch's better setting there; an explicit
        // OMP_WAIT_POLICY in the environment wins.
        if std::env::var_os("OMP_WAIT_POLICY").is_none() {
            cmd.env("OMP_WAIT_POLICY", "PASSIVE");
        }
        let mut child = cmd
            .arg(&script)
            .args(["--threads", &threads.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let ready: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("bench_torch.py did not start properly: {line:?}"))?;
        if ready["ready"] != serde_json::Value::Bool(true) {
            bail!("bench_torch.py: unexpected first line {line:?}");
        }
        eprintln!(
            "PyTorch {} with {} threads (OMP_WAIT_POLICY={})",
            ready["torch"],
            ready["threads"],
            std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into())
        );
        Ok(Some(Self { child, stdin, stdout }))
    }

    /// Runs one request (`<model> <size> <reps>` or a model-specific line) and returns the times.
    pub fn time(&mut self, request: &str) -> Result<Vec<f64>> {
        let v = self.request(request)?;
        let times = v["times_ms"].as_array().context("no times_ms")?;
        Ok(times.iter().filter_map(|t| t.as_f64()).collect())
    }

    /// Runs one request and returns the whole JSON answer (an `error` answer is an error).
    pub fn request(&mut self, request: &str) -> Result<serde_json::Value> {
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let v: serde_json::Value =
            serde_json::from_str(line.trim()).with_context(|| format!("bench_torch.py answered {line:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("bench_torch.py: {e} (request `{request}`)");
        }
        Ok(v)
    }
}

impl Drop for TorchServer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn time_ms(f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Interleaves `reps` single runs of ours and of PyTorch (after one warm-up each) and reports medians.
pub fn compare(
    name: &str,
    ours: &mut dyn FnMut() -> Result<()>,
    torch: Option<(&mut TorchServer, &str)>,
    reps: usize,
) -> Result<BenchRow> {
    ours()?;
    let mut o = Vec::new();
    let mut t = Vec::new();
    match torch {
        Some((server, req)) => {
            for _ in 0..reps {
                o.push(time_ms(ours)?);
                t.extend(server.time(req)?);
            }
        }
        None => {
            for _ in 0..reps {
                o.push(time_ms(ours)?);
            }
        }
    }
    let ours_ms = median(o);
    let torch_ms = if t.is_empty() { None } else { Some(median(t)) };
    let row = BenchRow { name: name.into(), ours_ms, torch_ms, ratio: torch_ms.map(|t| ours_ms / t) };
    print_row(&row);
    Ok(row)
}

pub fn print_row(r: &BenchRow) {
    match (r.torch_ms, r.ratio) {
        (Some(t), Some(x)) => println!("{:<40} ours {:>9.1} ms   torch {:>9.1} ms   ours/torch {:>5.2}", r.name, r.ours_ms, t, x),
        _ => println!("{:<40} ours {:>9.1} ms", r.name, r.ours_ms),
    }
}

pub fn write_json(rows: &[BenchRow], path: &Path) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(rows)?).with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// ResNet-50 and EfficientNet-Lite0 forward passes at 1×3×size×size.
pub fn bench_backbone(torch: &mut Option<TorchServer>, size: usize, reps: usize) -> Result<Vec<BenchRow>> {
    use backbone::{load_backbone, BackboneKind};
    let x = Tensor::randn(0f32, 1f32, (1, 3, size, size), &Device::Cpu)?;
    let mut rows = Vec::new();
    for (kind, torch_name, label) in [
        (BackboneKind::ResNet50, "resnet50", "resnet50"),
        (BackboneKind::EfficientNetLite0, "efficientnet_lite0", "efficientnet_lite0"),
    ] {
        let model = load_backbone(kind, None)?;
        let mut ours = || -> Result<()> {
            model.forward(&x)?;
            Ok(())
        };
        let req = format!("{torch_name} {size} 1");
        let t = torch.as_mut().map(|s| (s, req.as_str()));
        rows.push(compare(&format!("backbone/{label} 1x3x{size}x{size}"), &mut ours, t, reps)?);
    }
    Ok(rows)
}

// ---- bench episode ------------------------------------------------------------------------

/// Figures from the issue for the official PyTorch code on this kind of machine (2 threads, its
/// pure-PyTorch deformable attention), paper preset at 480²: (shots, stage, ms). Quoted, not
/// measured here: there is no PyTorch MM-Former in this repository to run.
pub const EPISODE_REFERENCE_MS: &[(usize, &str, f64)] = &[
    (1, "backbone (query)", 130.0),
    (1, "pos", 920.0),
    (1, "total", 1840.0),
    (5, "total", 5300.0),
];

/// The stages of one episode, in order.
const EPISODE_STAGES: [&str; 5] = ["backbone (query)", "pos", "backbone (supports)", "mm", "total"];

/// A whole MM-Former for timing and tests: synthetic backbone weights (deterministic, He-uniform,
/// identity BN), a freshly initialised POS (scratch init) and mask-matching module.
///
/// The POS and MM weights are plain (detached) tensors, as in a model loaded from a checkpoint:
/// layers built on trainable `Var`s take paths that record a backward graph (e.g. `ConvGn` and
/// `Conv1x1` run `ops::conv::conv2d_trainable`, a custom op, instead of the plain inference
/// kernels), which is not what inference runs.
pub fn synthetic_model(preset: crate::pipeline::Preset, seed: u64) -> Result<crate::pipeline::model::MmFormer> {
    use crate::pipeline::{model, stage1, Preset};
    use candle_core::DType;
    use candle_nn::VarBuilder;
    let dev = Device::Cpu;
    let backbone: Box<dyn backbone::Backbone> = match preset {
        Preset::Paper => Box::new(backbone::ResNet50::synthetic(seed)?),
        Preset::Cpu => Box::new(backbone::EfficientNetLite0::synthetic(seed)?),
    };
    let (pos_vm, _) = stage1::new_pos(preset, &dev)?;
    let mm_cfg = preset.mm_config();
    let mut tensors = stage1::varmap_tensors(&pos_vm);
    tensors.extend(model::fresh_mm_tensors(&mm_cfg)?);
    let tensors = tensors.into_iter().map(|(k, v)| (k, v.detach())).collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let pos = pos::Pos::new(&preset.pos_config(), vb.clone())?;
    let mm = mm::MaskMatching::new(&mm_cfg, vb)?;
    Ok(model::MmFormer {
        meta: model::ModelMeta::new(preset, &mm_cfg),
        backbone,
        pos,
        mm,
        path: PathBuf::from(format!("<synthetic {preset:?} model>")),
    })
}

/// CPU time (ms) used so far by all threads of this process (Linux `schedstat`, ns precision),
/// or None where it cannot be read. Unlike wall time it barely moves when other processes
/// share the cores; spin-waiting threads do count.
pub fn process_cpu_ms() -> Option<f64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let p = entry.ok()?.path().join("schedstat");
        // A thread may exit between listing and reading: skip it.
        if let Ok(text) = std::fs::read_to_string(p) {
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total as f64 / 1e6)
}

/// Wall and CPU time (ms) of the four stages of one episode and of the whole; the query's
/// backbone + POS run once whatever the number of shots.
fn time_episode(
    model: &crate::pipeline::model::MmFormer,
    query: &Tensor,
    supports: &[Tensor],
    labels: &[Tensor],
) -> Result<([f64; 5], [f64; 5])> {
    use crate::pipeline::{mm_features, pos_features};
    let (_, _, h, w) = query.dims4()?;
    let mut marks = Vec::with_capacity(5);
    let mut mark = || marks.push((Instant::now(), process_cpu_ms().unwrap_or(f64::NAN)));
    mark();
    let f = model.backbone.forward(query)?;
    mark();
    let pos = model.pos.forward(&pos_features(&f))?;
    let pass = crate::pipeline::model::QueryPass { features: mm_features(&f), proposal_logits: pos.pred_masks };
    mark();
    let feats = supports.iter().map(|x| model.support(x)).collect::<Result<Vec<_>>>()?;
    mark();
    let out = model.matching(&pass, &feats, labels, (h, w))?;
    // Make sure the result is materialised (candle is eager on CPU, but be explicit).
    out.out.sum_all()?.to_scalar::<f32>()?;
    mark();
    let wall = |a: usize, b: usize| (marks[b].0 - marks[a].0).as_secs_f64() * 1e3;
    let cpu = |a: usize, b: usize| marks[b].1 - marks[a].1;
    Ok((
        [wall(0, 1), wall(1, 2), wall(2, 3), wall(3, 4), wall(0, 4)],
        [cpu(0, 1), cpu(1, 2), cpu(2, 3), cpu(3, 4), cpu(0, 4)],
    ))
}

/// 1-shot and 5-shot episodes, per stage: the paper preset (ResNet-50, full POS, MM) at
/// `paper_size`² and the CPU preset (EfficientNet-Lite0, small POS) at 256², synthetic weights.
/// The "torch" column holds the reference figures for the official code
/// ([`EPISODE_REFERENCE_MS`]), not a measurement.
pub fn bench_episode(paper_size: usize, reps: usize) -> Result<Vec<BenchRow>> {
    use crate::pipeline::Preset;
    let reps = reps.max(1);
    let mut rows = Vec::new();
    println!(
        "{:<46} {:>10} {:>12} {:>8} {:>12}",
        "episode stage (median ms)", "ours", "ref (torch)", "ours/ref", "ours cpu ms"
    );
    for (preset, size) in [(Preset::Paper, paper_size), (Preset::Cpu, Preset::Cpu.input_size() as usize)] {
        let t = Instant::now();
        let model = synthetic_model(preset, 0)?;
        eprintln!("built the synthetic {preset:?} model in {:.1} s", t.elapsed().as_secs_f64());
        let dev = Device::Cpu;
        let query = Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev)?;
        let supports = (0..5).map(|_| Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev)).collect::<candle_core::Result<Vec<_>>>()?;
        // A centred square covering a quarter of the image.
        let mut m = vec![0f32; size * size];
        for y in size / 4..3 * size / 4 {
            for x in size / 4..3 * size / 4 {
                m[y * size + x] = 1.0;
            }
        }
        let label = Tensor::from_vec(m, (1, size, size), &dev)?;
        let labels = vec![label; 5];
        let tag = match preset {
            Preset::Paper => "paper",
            Preset::Cpu => "cpu",
        };
        for k in [1usize, 5] {
            time_episode(&model, &query, &supports[..k], &labels[..k])?; // warm-up
            let mut wall: Vec<Vec<f64>> = vec![Vec::new(); EPISODE_STAGES.len()];
            let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); EPISODE_STAGES.len()];
            for _ in 0..reps {
                let (w, c) = time_episode(&model, &query, &supports[..k], &labels[..k])?;
                for i in 0..EPISODE_STAGES.len() {
                    wall[i].push(w[i]);
                    cpu[i].push(c[i]);
                }
            }
            for ((stage, times), cpu_times) in EPISODE_STAGES.iter().zip(wall).zip(cpu) {
                let ours_ms = median(times);
                let cpu_ms = median(cpu_times.into_iter().map(|c| if c.is_finite() { c } else { 0.0 }).collect());
                let reference = if preset == Preset::Paper && size == 480 {
                    EPISODE_REFERENCE_MS.iter().find(|(s, n, _)| *s == k && n == stage).map(|r| r.2)
                } else {
                    None
                };
                let row = BenchRow {
                    name: format!("episode/{tag}-{size}/{k}-shot/{stage}"),
                    ours_ms,
                    torch_ms: reference,
                    ratio: reference.map(|r| ours_ms / r),
                };
                match (row.torch_ms, row.ratio) {
                    (Some(r), Some(x)) => println!("{:<46} {:>10.1} {:>12.1} {:>8.2} {:>12.1}", row.name, row.ours_ms, r, x, cpu_ms),
                    _ => println!("{:<46} {:>10.1} {:>12} {:>8} {:>12.1}", row.name, row.ours_ms, "-", "-", cpu_ms),
                }
                rows.push(row);
            }
        }
    }
    println!(
        "ref: the issue's figures for the official PyTorch code on this kind of machine (2 threads, pure-PyTorch \
         deformable attention), quoted, not measured here; medians over {reps} episodes; cpu ms = CPU time of all \
         our threads (spin-waits included), which other load on the machine barely changes"
    );
    Ok(rows)
}

// ---- bench pos ----------------------------------------------------------------------------

/// Random post-ReLU backbone features [res2, res3, res4, res5] of a `batch`×3×`size`² input for
/// the preset's POS (strides 4, 8, 16, 32).
pub fn pos_bench_features(preset: crate::pipeline::Preset, size: usize, batch: usize) -> Result<Vec<Tensor>> {
    let cfg = preset.pos_config();
    cfg.in_channels
        .iter()
        .zip([4usize, 8, 16, 32])
        .map(|(&c, s)| Ok(Tensor::randn(0f32, 1f32, (batch, c, size / s, size / s), &Device::Cpu)?.relu()?))
        .collect()
}

/// The benchmark's stage-1 targets, the same formula as `synthetic_targets` in tools/pos_torch.py:
/// per image b a semantic label with background 0 and two rectangles (classes 1 and 2), so three
/// GT masks (M_b, size, size), and the episode label (B, size, size) = class 1's rectangle.
pub fn pos_bench_targets(size: usize, batch: usize) -> Result<(Vec<Tensor>, Tensor)> {
    let mut targets = Vec::with_capacity(batch);
    let mut labels = Vec::with_capacity(batch * size * size);
    for b in 0..batch {
        let mut sem = vec![0u8; size * size];
        let mut fill = |y0: usize, x0: usize, h: usize, w: usize, v: u8| {
            for y in y0..(y0 + h).min(size) {
                for x in x0..(x0 + w).min(size) {
                    sem[y * size + x] = v;
                }
            }
        };
        fill(size / 8 + 4 * b, size / 8 + 6 * b, size / 3, size / 3, 1);
        fill(size / 2 + 2 * b, size / 2 - 3 * b, size / 4, size / 3, 2);
        let t = Tensor::from_vec(sem.iter().map(|&v| v as f32).collect::<Vec<_>>(), (size, size), &Device::Cpu)?;
        targets.push(losses::stage1_targets(&t, &[])?);
        labels.extend(sem.iter().map(|&v| f32::from(v == 1)));
    }
    Ok((targets, Tensor::from_vec(labels, (batch, size, size), &Device::Cpu)?))
}

/// One stage-1 training iteration as `train-pos` runs it (xtask/src/pipeline/stage1.rs), on
/// fixed backbone features: POS on trainable `Var`s, forward + criterion + backward + clip +
/// AdamW step.
pub struct PosTrainBench {
    pub model: pos::Pos,
    pub vars: Vec<train::NamedVar>,
    pub opt: train::AdamW,
    pub criterion: losses::Stage1Criterion,
    pub features: Vec<Tensor>,
    pub targets: Vec<Tensor>,
    pub label: Tensor,
    pub iter: u64,
}

/// Names of the phases [`PosTrainBench::step`] times.
pub const TRAIN_PHASES: [&str; 4] = ["forward", "criterion", "backward", "clip+step"];

impl PosTrainBench {
    pub fn new(preset: crate::pipeline::Preset, size: usize, batch: usize) -> Result<Self> {
        use crate::pipeline::stage1;
        let (vm, model) = stage1::new_pos_seeded(preset, 0, &Device::Cpu)?;
        let vars = stage1::named_vars(&vm);
        let opt = train::AdamW::new(vars.clone(), train::AdamWConfig::default(), train::default_no_decay)?;
        let criterion = losses::Stage1Criterion::new(losses::Stage1Config {
            num_points: preset.num_points(),
            ..Default::default()
        });
        let features = pos_bench_features(preset, size, batch)?;
        let (targets, label) = pos_bench_targets(size, batch)?;
        Ok(Self { model, vars, opt, criterion, features, targets, label, iter: 0 })
    }

    /// One iteration; returns the wall ms of each of [`TRAIN_PHASES`] and the loss.
    pub fn step(&mut self) -> Result<([f64; 4], f64)> {
        use rand_chacha::rand_core::SeedableRng;
        let t0 = Instant::now();
        let out = self.model.forward(&self.features)?;
        let t1 = Instant::now();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.iter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let l = self.criterion.forward_with_rng(&out.all_predictions(), &self.targets, &self.label, &mut rng)?;
        let t2 = Instant::now();
        let mut grads = l.total.backward()?;
        let t3 = Instant::now();
        train::clip_grad_norm(&mut grads, &self.vars, 0.01)?;
        self.opt.step(&grads, 1e-4)?;
        let t4 = Instant::now();
        self.iter += 1;
        let loss = l.total.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            bail!("POS training bench: loss is {loss}");
        }
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        Ok(([ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4)], loss))
    }
}

/// Wall and CPU milliseconds of repeated runs.
#[derive(Default)]
struct Samples {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Samples {
    fn push(&mut self, wall: f64, cpu: f64) {
        self.wall.push(wall);
        self.cpu.push(if cpu.is_finite() { cpu } else { 0.0 });
    }

    /// Takes `times_ms` / `cpu_ms` of a bench_torch.py answer.
    fn push_answer(&mut self, v: &serde_json::Value) -> Result<()> {
        let get = |k: &str| -> Vec<f64> { v[k].as_array().into_iter().flatten().filter_map(|x| x.as_f64()).collect() };
        let (w, c) = (get("times_ms"), get("cpu_ms"));
        if w.is_empty() {
            bail!("bench_torch.py answered without times: {v}");
        }
        self.wall.extend(&w);
        self.cpu.extend(if c.len() == w.len() { c } else { vec![0.0; w.len()] });
        Ok(())
    }
}

/// One benchmark line: the row (wall medians) plus the CPU-time medians of both sides.
fn pos_row(name: &str, ours: Samples, torch: Samples) -> BenchRow {
    let (ow, oc) = (median(ours.wall), median(ours.cpu));
    let tw = (!torch.wall.is_empty()).then(|| median(torch.wall.clone()));
    let tc = (!torch.cpu.is_empty()).then(|| median(torch.cpu));
    let row = BenchRow { name: name.into(), ours_ms: ow, torch_ms: tw, ratio: tw.map(|t| ow / t) };
    match (tw, tc) {
        (Some(tw), Some(tc)) => println!(
            "{:<36} ours {:>8.1} ms  torch {:>8.1} ms  ours/torch {:>5.2}  | cpu ms: ours {:>8.1}  torch {:>8.1}  ratio {:>5.2}",
            name,
            ow,
            tw,
            ow / tw,
            oc,
            tc,
            oc / tc
        ),
        _ => println!("{name:<36} ours {ow:>8.1} ms  | cpu ms: ours {oc:>8.1}"),
    }
    row
}

/// Runs ours and one torch request alternately `reps` times (after one warm-up of ours; the
/// torch side warms itself up on first use).
fn interleave(
    name: &str,
    ours: &mut dyn FnMut() -> Result<()>,
    mut torch: Option<(&mut TorchServer, &str)>,
    reps: usize,
) -> Result<BenchRow> {
    ours()?;
    let (mut o, mut t) = (Samples::default(), Samples::default());
    for _ in 0..reps {
        let (c0, w0) = (process_cpu_ms().unwrap_or(f64::NAN), Instant::now());
        ours()?;
        o.push(w0.elapsed().as_secs_f64() * 1e3, process_cpu_ms().unwrap_or(f64::NAN) - c0);
        if let Some((server, req)) = torch.as_mut() {
            t.push_answer(&server.request(req)?)?;
        }
    }
    Ok(pos_row(name, o, t))
}

/// `cargo xtask bench pos`: the POS against tools/pos_torch.py (the official Mask2Former /
/// MM-Former code re-implemented with our configurations), interleaved run by run, medians, the
/// same number of threads:
///
/// - `pos_forward_paper_<size>`: inference forward, paper config, 1 image (weights as plain
///   tensors, as loaded from a checkpoint; torch in eval + inference_mode);
/// - `pos_train_iter_cpu_256_b4`: one stage-1 training iteration of the cpu config on fixed
///   backbone features of a 4×3×256² batch (forward + criterion + backward + clip + AdamW), with
///   the per-phase medians of both sides printed below the table;
/// - `backbone_efficientnet_lite0_256_b4`: the frozen backbone forward that a real training
///   iteration adds (BN folded on both sides), for scale.
///
/// Besides wall time each line shows the process CPU time of both sides (ours includes rayon's
/// spin-waits), which other load on a shared machine changes much less.
pub fn bench_pos(paper_size: usize, threads: usize, reps: usize) -> Result<Vec<BenchRow>> {
    use crate::pipeline::Preset;
    let reps = reps.max(1);
    let mut torch = TorchServer::start(threads, &["--fuse-bn"])?;
    let mut rows = Vec::new();

    // 1. Paper-preset inference forward.
    let model = synthetic_model(Preset::Paper, 0)?;
    let feats = pos_bench_features(Preset::Paper, paper_size, 1)?;
    let mut ours = || -> Result<()> {
        let out = model.pos.forward(&feats)?;
        out.pred_masks.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    };
    let req = format!("pos_forward_paper {paper_size} 1 1");
    let t = torch.as_mut().map(|s| (s, req.as_str()));
    rows.push(interleave(&format!("pos_forward_paper_{paper_size}"), &mut ours, t, reps)?);
    drop(model);

    // 2. CPU-preset training iteration, per phase.
    let (size, batch) = (Preset::Cpu.input_size() as usize, 4);
    let mut bench = PosTrainBench::new(Preset::Cpu, size, batch)?;
    bench.step()?; // warm-up
    let (mut o, mut t) = (Samples::default(), Samples::default());
    let mut ours_p: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut torch_p: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut solver = String::new();
    let req = format!("pos_train_cpu {size} 1 {batch}");
    for _ in 0..reps {
        let c0 = process_cpu_ms().unwrap_or(f64::NAN);
        let (p, _) = bench.step()?;
        o.push(p.iter().sum::<f64>(), process_cpu_ms().unwrap_or(f64::NAN) - c0);
        for (v, x) in ours_p.iter_mut().zip(p) {
            v.push(x);
        }
        if let Some(s) = torch.as_mut() {
            let v = s.request(&req)?;
            t.push_answer(&v)?;
            for (name, dst) in TRAIN_PHASES.iter().zip(torch_p.iter_mut()) {
                dst.extend(v["phases_ms"][*name].as_array().into_iter().flatten().filter_map(|x| x.as_f64()));
            }
            solver = v["solver"].as_str().unwrap_or("").to_string();
        }
    }
    rows.push(pos_row(&format!("pos_train_iter_cpu_{size}_b{batch}"), o, t));
    drop(bench);

    // 3. The frozen backbone a real iteration runs first.
    let bb = backbone::EfficientNetLite0::synthetic(0)?;
    let x = Tensor::randn(0f32, 1f32, (batch, 3, size, size), &Device::Cpu)?;
    let mut ours = || -> Result<()> {
        use backbone::Backbone;
        bb.forward(&x)?;
        Ok(())
    };
    let req = format!("efficientnet_lite0 {size} 1 {batch}");
    let t = torch.as_mut().map(|s| (s, req.as_str()));
    rows.push(interleave(&format!("backbone_efficientnet_lite0_{size}_b{batch}"), &mut ours, t, reps)?);

    println!("training iteration by phase (median wall ms over {reps}):");
    for (i, name) in TRAIN_PHASES.iter().enumerate() {
        let o = median(ours_p[i].clone());
        if torch_p[i].is_empty() {
            println!("  {name:<12} ours {o:>9.1}");
        } else {
            let t = median(torch_p[i].clone());
            println!("  {name:<12} ours {o:>9.1}   torch {t:>9.1}   ours/torch {:>5.2}", o / t);
        }
    }
    if !solver.is_empty() {
        println!("torch matcher solver: {solver}");
    }
    Ok(rows)
}

#[cfg(test)]
mod profile {
    //! `cargo test --release -p xtask profile_mm -- --ignored --nocapture`: where the
    //! mask-matching and POS time goes, piece by piece, on both presets (timing only, no
    //! assertions; `PROFILE_THREADS` sets the rayon pool, default 2).
    use super::*;
    use crate::pipeline::Preset;
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};

    fn t(name: &str, reps: usize, f: &mut dyn FnMut() -> candle_core::Result<()>) {
        f().unwrap();
        let mut v = Vec::new();
        for _ in 0..reps {
            let s = Instant::now();
            f().unwrap();
            v.push(s.elapsed().as_secs_f64() * 1e3);
        }
        println!("  {name:<52} {:>9.2} ms", median(v));
    }

    #[test]
    #[ignore]
    fn profile_mm() {
        let n = std::env::var("PROFILE_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        let dev = Device::Cpu;
        for (preset, size) in [(Preset::Cpu, 256usize), (Preset::Paper, 480)] {
            let cfg = preset.mm_config();
            println!("{preset:?} {size}: hidden {} ffn {}", cfg.hidden_dim, cfg.dim_feedforward);
            let model = synthetic_model(preset, 0).unwrap();
            let x = Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev).unwrap();
            let f = model.backbone.forward(&x).unwrap();
            let feats = crate::pipeline::mm_features(&f);
            let n = cfg.num_queries;
            let props = Tensor::rand(0f32, 1f32, (1, n, size / 4, size / 4), &dev).unwrap();
            let mask = Tensor::ones((1, 1, size, size), DType::F32, &dev).unwrap();
            // Layers on trainable Vars take their backward-carrying paths: build them on a
            // VarMap, then rebuild them on detached copies of the same tensors.
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let plain = |vm: &VarMap| {
                let t = crate::pipeline::stage1::varmap_tensors(vm).into_iter().map(|(k, v)| (k, v.detach())).collect();
                VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)
            };
            let d = cfg.hidden_dim;
            for (i, fe) in feats.iter().enumerate() {
                let (_, c, h, w) = fe.dims4().unwrap();
                println!(" level {i}: {c} ch {h}x{w}");
                t("self_align", 5, &mut || mm::self_align::self_align(fe).map(|_| ()));
                let wgt = Tensor::randn(0f32, 0.02, (d, c), &dev).unwrap();
                t("conv 1x1 (broadcast_matmul)", 5, &mut || wgt.broadcast_matmul(&fe.reshape((1, c, h * w))?).map(|_| ()));
                t("sine position encoding", 5, &mut || ops::position::sine_position_encoding(1, h, w, d / 2, &dev).map(|_| ()));
                let q = Tensor::randn(0f32, 1f32, (1, d, h, w), &dev).unwrap();
                let p = ops::position::sine_position_encoding(1, h, w, d / 2, &dev).unwrap();
                t("resize mask to level (addmask)", 5, &mut || ops::resize::resize_bilinear(&mask, (h, w), false).map(|_| ()));
                let _ = mm::cross_align::CrossAt::new(&cfg, vb.pp(format!("crossat_{i}"))).unwrap();
                let cat = mm::cross_align::CrossAt::new(&cfg, plain(&vm).pp(format!("crossat_{i}"))).unwrap();
                t("CrossAt forward (both directions)", 3, &mut || cat.forward(&q, &q, &p, &p).map(|_| ()));
                let tok = q.flatten_from(2).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                let kv = Tensor::randn(0f32, 1f32, (1, 225, d), &dev).unwrap();
                let _ = ops::attention::MultiheadAttention::new(d, cfg.num_heads, vb.pp(format!("mha{i}"))).unwrap();
                let mha = ops::attention::MultiheadAttention::new(d, cfg.num_heads, plain(&vm).pp(format!("mha{i}"))).unwrap();
                t("  MHA (Lq tokens -> 225 keys)", 3, &mut || mha.forward(&tok, &kv, &kv, None).map(|_| ()));
                let _ = ops::nn::LayerNorm::new(d, 1e-5, vb.pp(format!("ln{i}"))).unwrap();
                let ln = ops::nn::LayerNorm::new(d, 1e-5, plain(&vm).pp(format!("ln{i}"))).unwrap();
                t("  LayerNorm (ops::nn)", 5, &mut || ln.forward(&tok).map(|_| ()));
                let _ = candle_nn::linear(d, cfg.dim_feedforward, vb.pp(format!("lin{i}"))).unwrap();
                let lin = candle_nn::linear(d, cfg.dim_feedforward, plain(&vm).pp(format!("lin{i}"))).unwrap();
                t("  Linear d->ffn (candle_nn)", 5, &mut || candle_nn::Module::forward(&lin, &tok).map(|_| ()));
                t("  add (x + pos)", 5, &mut || (&tok + &tok).map(|_| ()));
                let logits = Tensor::randn(0f32, 1f32, (1, cfg.num_heads, h * w, 225), &dev).unwrap();
                t("  softmax (ops::nn) over 225 keys", 5, &mut || ops::nn::softmax(&logits, 3).map(|_| ()));
                t("  resize kv to short side 15", 5, &mut || ops::resize::resize_bilinear(&q, (15, 15), false).map(|_| ()));
                t("query prototypes (resize proposals + pool)", 5, &mut || mm::prototype::query_prototypes(&q, &props).map(|_| ()));
                t("support prototype", 5, &mut || mm::prototype::support_prototype(&q, &mask).map(|_| ()));
            }
            t("final: resize proposals to input (align_corners=False)", 3, &mut || {
                ops::resize::resize_bilinear(&props, (size, size), false).map(|_| ())
            });
            let up = ops::resize::resize_bilinear(&props, (size, size), false).unwrap();
            let c = Tensor::randn(0f32, 1f32, (1, 1, n), &dev).unwrap();
            t("final: coefficients x proposals matmul", 3, &mut || c.matmul(&up.reshape((1, n, size * size))?).map(|_| ()));
            // The POS halves.
            let pcfg = preset.pos_config();
            pos::MSDeformAttnPixelDecoder::new(&pcfg, vb.pp("pd")).unwrap();
            pos::MultiScaleMaskedTransformerDecoder::new(&pcfg, vb.pp("dec")).unwrap();
            let pvb = plain(&vm);
            let pd = pos::MSDeformAttnPixelDecoder::new(&pcfg, pvb.pp("pd")).unwrap();
            let dec = pos::MultiScaleMaskedTransformerDecoder::new(&pcfg, pvb.pp("dec")).unwrap();
            let pf = crate::pipeline::pos_features(&f);
            t("POS pixel decoder (6 MSDeformAttn layers + FPN)", 3, &mut || pd.forward(&pf).map(|_| ()));
            let pdo = pd.forward(&pf).unwrap();
            t("POS masked-attention decoder (9 layers + heads)", 3, &mut || dec.forward(&pdo.multi_scale, &pdo.mask_features, None).map(|_| ()));
            // One encoder layer's pieces at this size.
            let shapes: Vec<(usize, usize)> = [32usize, 16, 8].iter().map(|&st| (size / st, size / st)).collect();
            let tokens: usize = shapes.iter().map(|(h, w)| h * w).sum();
            let (dm, heads, pts) = (pcfg.hidden_dim, pcfg.enc_heads, pcfg.enc_points);
            let src = Tensor::randn(0f32, 1f32, (1, tokens, dm), &dev).unwrap();
            let value = Tensor::randn(0f32, 1f32, (1, tokens, heads, dm / heads), &dev).unwrap();
            let locs = Tensor::rand(0f32, 1f32, (1, tokens, heads, 3, pts, 2), &dev).unwrap();
            let aw = Tensor::rand(0f32, 1f32, (1, tokens, heads, 3, pts), &dev).unwrap();
            println!(" encoder layer pieces on {tokens} tokens:");
            t("  ms_deform_attn_core kernel", 3, &mut || ops::deform::ms_deform_attn_core(&value, &shapes, &locs, &aw).map(|_| ()));
            let _ = ops::deform::MSDeformAttn::new(dm, 3, heads, pts, vb.pp("msda")).unwrap();
            let msda = ops::deform::MSDeformAttn::new(dm, 3, heads, pts, plain(&vm).pp("msda")).unwrap();
            let refs = Tensor::rand(0f32, 1f32, (1, tokens, 3, 2), &dev).unwrap();
            t("  MSDeformAttn forward (projections + kernel)", 3, &mut || msda.forward(&src, &refs, &src, &shapes).map(|_| ()));
            let _ = candle_nn::linear(dm, pcfg.enc_ffn_dim, vb.pp("el1")).unwrap();
            let l1 = candle_nn::linear(dm, pcfg.enc_ffn_dim, plain(&vm).pp("el1")).unwrap();
            let _ = candle_nn::linear(pcfg.enc_ffn_dim, dm, vb.pp("el2")).unwrap();
            let l2 = candle_nn::linear(pcfg.enc_ffn_dim, dm, plain(&vm).pp("el2")).unwrap();
            t("  FFN linear1 + relu + linear2", 3, &mut || {
                use candle_nn::Module;
                l2.forward(&l1.forward(&src)?.relu()?).map(|_| ())
            });
            let _ = ops::nn::LayerNorm::new(dm, 1e-5, vb.pp("eln")).unwrap();
            let eln = ops::nn::LayerNorm::new(dm, 1e-5, plain(&vm).pp("eln")).unwrap();
            t("  LayerNorm", 3, &mut || eln.forward(&src).map(|_| ()));
            println!(" pixel-decoder convs:");
            for (name, tap) in [("res5", &f.res5), ("res4", &f.res4), ("res3", &f.res3), ("res2", &f.res2)] {
                let (_, c, h, w) = tap.dims4().unwrap();
                let _ = pos::ConvGn::new(c, dm, 1, pcfg.gn_groups, vb.pp(format!("ip{name}"))).unwrap();
                let cg = pos::ConvGn::new(c, dm, 1, pcfg.gn_groups, plain(&vm).pp(format!("ip{name}"))).unwrap();
                t(&format!("  1x1 conv + GN {name} {c}->{dm} at {h}x{w}"), 3, &mut || cg.forward(tap).map(|_| ()));
            }
            let (_, _, h2, w2) = f.res2.dims4().unwrap();
            let x2 = Tensor::randn(0f32, 1f32, (1, dm, h2, w2), &dev).unwrap();
            let c3 = pos::ConvGn::new(dm, dm, 3, pcfg.gn_groups, vb.pp("l1")).unwrap();
            t(&format!("  3x3 conv + GN {dm}->{dm} at {h2}x{w2}, trainable Var weight"), 3, &mut || c3.forward(&x2).map(|_| ()));
            let c3 = pos::ConvGn::new(dm, dm, 3, pcfg.gn_groups, plain(&vm).pp("l1")).unwrap();
            t(&format!("  3x3 conv + GN {dm}->{dm} at {h2}x{w2}, plain weight (inference)"), 3, &mut || c3.forward(&x2).map(|_| ()));
            let _ = ops::nn::GroupNorm::new(pcfg.gn_groups, dm, 1e-5, vb.pp("gn")).unwrap();
            let gn = ops::nn::GroupNorm::new(pcfg.gn_groups, dm, 1e-5, plain(&vm).pp("gn")).unwrap();
            t(&format!("  GroupNorm alone at {h2}x{w2}"), 3, &mut || gn.forward(&x2).map(|_| ()));
        }
    }
}

#[cfg(test)]
mod profile_episode {
    use super::*;
    use crate::pipeline::Preset;

    /// `PROFILE_PRESET=cpu|paper PROFILE_SHOTS=k PROFILE_THREADS=n`: per-stage medians of a few
    /// episodes, to compare thread/allocator settings from the environment.
    #[test]
    #[ignore]
    fn profile_episode() {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let n: usize = env("PROFILE_THREADS", "2").parse().unwrap();
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        let preset = if env("PROFILE_PRESET", "cpu") == "paper" { Preset::Paper } else { Preset::Cpu };
        let k: usize = env("PROFILE_SHOTS", "1").parse().unwrap();
        let reps: usize = env("PROFILE_REPS", "5").parse().unwrap();
        let size = preset.input_size() as usize;
        let model = synthetic_model(preset, 0).unwrap();
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev).unwrap();
        let s: Vec<Tensor> = (0..k).map(|_| Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev).unwrap()).collect();
        let l: Vec<Tensor> = (0..k).map(|_| Tensor::ones((1, size, size), candle_core::DType::F32, &dev).unwrap()).collect();
        time_episode(&model, &q, &s, &l).unwrap();
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); 10];
        for _ in 0..reps {
            let (w, c) = time_episode(&model, &q, &s, &l).unwrap();
            for (v, x) in per.iter_mut().zip(w.into_iter().chain(c)) {
                v.push(x);
            }
        }
        let med: Vec<f64> = per.into_iter().map(median).collect();
        let m: Vec<String> =
            EPISODE_STAGES.iter().enumerate().map(|(i, n)| format!("{n} {:.0} (cpu {:.0})", med[i], med[i + 5])).collect();
        println!("RESULT {}", m.join(" | "));
    }
}

#[cfg(test)]
mod profile_pos_train {
    use super::*;


    fn fb(name: &str, reps: usize, f: &mut dyn FnMut() -> candle_core::Result<Tensor>) {
        // forward, then backward of sum(y * r) for a fixed random r
        let y = f().unwrap();
        let r = Tensor::randn(0f32, 1f32, y.dims(), &Device::Cpu).unwrap();
        let mut fw = Vec::new();
        let mut bw = Vec::new();
        for _ in 0..reps + 1 {
            let t = Instant::now();
            let y = f().unwrap();
            let t1 = Instant::now();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            drop(g);
            let t2 = Instant::now();
            fw.push((t1 - t).as_secs_f64() * 1e3);
            bw.push((t2 - t1).as_secs_f64() * 1e3);
        }
        fw.remove(0);
        bw.remove(0);
        println!("  {name:<56} fwd {:>8.2} ms  bwd {:>8.2} ms", median(fw), median(bw));
    }

    /// Forward and backward of the POS pieces on the cpu preset's training shapes (batch 4, 256²).
    #[test]
    #[ignore]
    fn profile_pos_parts() {
        use candle_core::DType;
        use candle_nn::{VarBuilder, VarMap};
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let n: usize = env("PROFILE_THREADS", "2").parse().unwrap();
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        let reps: usize = env("PROFILE_REPS", "5").parse().unwrap();
        let dev = Device::Cpu;
        let cfg = crate::pipeline::Preset::Cpu.pos_config();
        let d = cfg.hidden_dim;
        let feats = pos_bench_features(crate::pipeline::Preset::Cpu, 256, 4).unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let x64 = candle_core::Var::randn(0f32, 1f32, (4, d, 64, 64), &dev).unwrap();
        let c3 = pos::ConvGn::new(d, d, 3, cfg.gn_groups, vb.pp("l1")).unwrap();
        fb("ConvGn 3x3 64->64 at 4x64x64 (Var weight, Var input)", reps, &mut || c3.forward(x64.as_tensor()));
        let w3 = vm.data().lock().unwrap()["l1.weight"].clone();
        fb("  candle conv2d alone", reps, &mut || x64.as_tensor().conv2d(w3.as_tensor(), 1, 1, 1, 1));
        fb("  ops::conv::conv2d_trainable alone", reps, &mut || {
            ops::conv::conv2d_trainable(x64.as_tensor(), w3.as_tensor(), None, [1; 4])
        });
        fb("    harness overhead (y = x + 0)", reps, &mut || x64.as_tensor().affine(1.0, 0.0));
        let xc = x64.as_tensor().detach();
        fb("    dW only (constant input)", reps, &mut || ops::conv::conv2d_trainable(&xc, w3.as_tensor(), None, [1; 4]));
        let wc = w3.as_tensor().detach();
        fb("    dX only (constant weight)", reps, &mut || ops::conv::conv2d_trainable(x64.as_tensor(), &wc, None, [1; 4]));
        let gn = ops::nn::GroupNorm::new(cfg.gn_groups, d, 1e-5, vb.pp("gn")).unwrap();
        fb("  ops::nn::GroupNorm(32, 64) (composed) alone at 4x64x64", reps, &mut || gn.forward(x64.as_tensor()));
        let (gw, gb) = {
            let data = vm.data().lock().unwrap();
            (data["gn.weight"].clone(), data["gn.bias"].clone())
        };
        fb("  ops::conv::group_norm (fused) alone at 4x64x64", reps, &mut || {
            ops::conv::group_norm(x64.as_tensor(), gw.as_tensor(), gb.as_tensor(), cfg.gn_groups, 1e-5)
        });
        let a1 = pos::ConvGn::new(24, d, 1, cfg.gn_groups, vb.pp("a1")).unwrap();
        fb("ConvGn 1x1 24->64 at 4x64x64 (constant input)", reps, &mut || a1.forward(&feats[0]));
        let mf = pos::Conv1x1::new(d, d, true, candle_nn::Init::Const(0.01), vb.pp("mf")).unwrap();
        fb("Conv1x1 64->64 + bias at 4x64x64 (Var input)", reps, &mut || mf.forward(x64.as_tensor()));
        let bias = candle_core::Var::randn(0f32, 1f32, d, &dev).unwrap();
        fb("  bias broadcast_add alone at 4x64x64", reps, &mut || {
            x64.as_tensor().broadcast_add(&bias.as_tensor().reshape((1, d, 1, 1))?)
        });
        let x32 = candle_core::Var::randn(0f32, 1f32, (4, d, 32, 32), &dev).unwrap();
        fb("  resize_bilinear 32->64", reps, &mut || ops::resize::resize_bilinear(x32.as_tensor(), (64, 64), false));
        let gn32 = ops::nn::GroupNorm::new(cfg.gn_groups, d, 1e-5, vb.pp("gn32")).unwrap();
        fb("  input_proj.2 (Conv1x1 40->64 + nn::GroupNorm) at 4x32x32", reps, &mut || {
            let ip = pos::Conv1x1::new(40, d, true, candle_nn::Init::Const(0.01), vb.pp("ip2"))?;
            gn32.forward(&ip.forward(&feats[1])?)
        });
        let tokens: usize = 64 + 256 + 1024;
        let src = candle_core::Var::randn(0f32, 1f32, (4, tokens, d), &dev).unwrap();
        let refs = Tensor::rand(0f32, 1f32, (4, tokens, 3, 2), &dev).unwrap();
        let msda = ops::deform::MSDeformAttn::new(d, 3, cfg.enc_heads, cfg.enc_points, vb.pp("msda")).unwrap();
        let shapes = [(8usize, 8usize), (16, 16), (32, 32)];
        fb("  MSDeformAttn (4 x 1344 tokens)", reps, &mut || msda.forward(src.as_tensor(), &refs, src.as_tensor(), &shapes));
        let pd = pos::MSDeformAttnPixelDecoder::new(&cfg, vb.pp("pd")).unwrap();
        fb("pixel decoder (mask_features)", reps, &mut || Ok(pd.forward(&feats)?.mask_features));
        let pdo = pd.forward(&feats).unwrap();
        let ms: Vec<Tensor> = pdo.multi_scale.iter().map(|t| t.detach()).collect();
        let mfeat = candle_core::Var::from_tensor(&pdo.mask_features.detach()).unwrap();
        let dec = pos::MultiScaleMaskedTransformerDecoder::new(&cfg, vb.pp("dec")).unwrap();
        fb("decoder (all predictions stacked)", reps, &mut || {
            let o = dec.forward(&ms, mfeat.as_tensor(), None)?;
            Tensor::stack(&o.predictions, 0)
        });
        let emb = candle_core::Var::randn(0f32, 1f32, (4, cfg.num_queries, d), &dev).unwrap();
        fb("  one mask head einsum (4x20x64 . 4x64x4096)", reps, &mut || {
            emb.as_tensor().matmul(&mfeat.as_tensor().reshape((4, d, 4096))?)
        });
    }

    /// Writes a cpu-preset POS (seeded init), random features of a 2×3×128² input and our
    /// forward outputs to `$POS_DUMP` (default /tmp/pos_dump.safetensors), for
    /// `tools/check_pos_torch.py`, which loads the same weights into the PyTorch side of
    /// `bench pos` and compares its outputs (the two sides compute the same function).
    #[test]
    #[ignore]
    fn dump_pos_for_torch() {
        use crate::pipeline::{stage1, Preset};
        let path = std::env::var("POS_DUMP").unwrap_or_else(|_| "/tmp/pos_dump.safetensors".into());
        let (vm, model) = stage1::new_pos_seeded(Preset::Cpu, 3, &Device::Cpu).unwrap();
        let feats = pos_bench_features(Preset::Cpu, 128, 2).unwrap();
        let out = model.forward(&feats).unwrap();
        let mut t = stage1::varmap_tensors(&vm);
        for (name, f) in ["res2", "res3", "res4", "res5"].iter().zip(&feats) {
            t.insert(format!("input.{name}"), f.clone());
        }
        for (i, p) in out.all_predictions().iter().enumerate() {
            t.insert(format!("output.pred_masks.{i}"), p.clone());
        }
        t.insert("output.mask_features".into(), out.mask_features.clone());
        for (i, m) in out.multi_scale.iter().enumerate() {
            t.insert(format!("output.multi_scale.{i}"), m.contiguous().unwrap());
        }
        candle_core::safetensors::save(&t, &path).unwrap();
        println!("wrote {path}");
    }

    /// `cargo test --release -p xtask profile_pos_train -- --ignored --nocapture`
    /// (`PROFILE_REPS`, `PROFILE_THREADS`): per-phase medians of the stage-1 training iteration
    /// of `bench pos`, ours only; a target for `perf record`.
    #[test]
    #[ignore]
    fn profile_pos_train() {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let n: usize = env("PROFILE_THREADS", "2").parse().unwrap();
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        let reps: usize = env("PROFILE_REPS", "5").parse().unwrap();
        let mut bench = PosTrainBench::new(crate::pipeline::Preset::Cpu, 256, 4).unwrap();
        bench.step().unwrap();
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); 5];
        for _ in 0..reps {
            let (p, _) = bench.step().unwrap();
            for (v, x) in per.iter_mut().zip(p.iter().copied().chain([p.iter().sum::<f64>()])) {
                v.push(x);
            }
        }
        let names = TRAIN_PHASES.iter().copied().chain(["total"]);
        let m: Vec<String> = names.zip(per).map(|(n, v)| format!("{n} {:.1}", median(v))).collect();
        println!("RESULT {}", m.join(" | "));
    }
}
