//! Benchmarks (`cargo xtask bench`): our models against the same computation in PyTorch on the
//! same machine, with the same number of threads, interleaved run by run; medians and ratios.
//! Tables are written to `out` as they are measured.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use backbone::Backbone;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use data::ShardDataset;
use losses::fewshot::{stage2_loss, Stage2Weights};
use mm::{MaskMatching, QueryPass};
use serde::Serialize;
use train::{AdamW, AdamWConfig, CheckpointStore};

use crate::error::{bail, Context, Result};
use crate::model::{load_backbone, mm_features, pos_features};
use crate::stage1::{load_pos, KIND as POS_KIND};
use crate::prefetch::Prefetcher;
use crate::stage2::{EpisodeBatch, StageTwoData};
use crate::PREFETCH_DEPTH;
use crate::{MmFormer, Preset};

/// Where `tools/` lives (the workspace root).
/// The checkout whose `tools/` holds the PyTorch scripts: `$MMFORMER_ROOT` when set (a binary
/// run from another checkout or machine), else the one this binary was built from.
fn workspace_root() -> PathBuf {
    match std::env::var_os("MMFORMER_ROOT") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// One benchmark figure. `torch_ms` is always a measurement taken in the same run (never a
/// quoted figure), `None` when the PyTorch side was not run.
#[derive(Serialize, Clone, Debug)]
pub struct BenchRow {
    pub name: String,
    pub ours_ms: f64,
    pub torch_ms: Option<f64>,
    pub ratio: Option<f64>,
    /// CPU time, spread and standalone cross-check (`bench episode`), when measured.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub detail: Option<RowDetail>,
    /// Operations of the matrix products our CPU kernels ran in the measured work, in GFLOP
    /// (median over the repetitions; see `ops::gemm_flops`), when counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gemm_gflop: Option<f64>,
}

/// What `bench episode` records besides the wall-time medians: the CPU-time medians, the spread
/// (min and max over the repetitions) and, on the `total` rows, the medians of the standalone
/// cross-check (each side run alone, back to back).
#[derive(Serialize, Clone, Debug, Default)]
pub struct RowDetail {
    pub reps: usize,
    pub ours_cpu_ms: f64,
    pub ours_min_ms: f64,
    pub ours_max_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_cpu_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_min_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_max_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ours_alone_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_alone_ms: Option<f64>,
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
    pub fn start(threads: usize, extra: &[&str], out: &mut dyn Write) -> Result<Option<Self>> {
        let python = torch_venv().join("bin/python");
        if !python.exists() {
            writeln!(out, 
                "note: no PyTorch venv at {} — run `bash tools/setup_torch_venv.sh` for the comparison; reporting ours only",
                python.display()
            )?;
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
        writeln!(out, 
            "PyTorch {} with {} threads (OMP_WAIT_POLICY={})",
            ready["torch"],
            ready["threads"],
            std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into())
        )?;
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

pub fn write_json(rows: &[BenchRow], path: &Path) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(rows)?).with_context(|| format!("cannot write {}", path.display()))
}

/// ResNet-50 and EfficientNet-Lite0 forward passes at 1×3×size×size.
pub fn bench_backbone(out: &mut dyn Write, torch: &mut Option<TorchServer>, size: usize, reps: usize, device: &Device) -> Result<Vec<BenchRow>> {
    use backbone::BackboneKind;
    let x = train::seeded_randn((1, 3, size, size), 0, "bench.backbone.image", device)?;
    let mut rows = Vec::new();
    for (kind, torch_name, label) in [
        (BackboneKind::ResNet50, "resnet50", "resnet50"),
        (BackboneKind::EfficientNetLite0, "efficientnet_lite0", "efficientnet_lite0"),
    ] {
        let model = backbone::load_backbone(kind, None, device)?;
        let mut ours = || -> Result<()> {
            model.forward(&x)?;
            Ok(())
        };
        let req = format!("{torch_name} {size} 1");
        let t = torch.as_mut().map(|s| (s, req.as_str()));
        rows.push(interleave(out, &format!("backbone/{label} 1x3x{size}x{size}"), &mut ours, t, reps)?);
    }
    Ok(rows)
}

// ---- bench episode ------------------------------------------------------------------------

/// The stages of one episode, in order (also the keys of `tools/episode_torch.py`'s
/// `stages_ms`).
pub const EPISODE_STAGES: [&str; 5] = ["backbone (query)", "pos", "backbone (supports)", "mm", "total"];

/// A side differing from its own standalone runs by more than this fraction gets a WARNING.
pub const STANDALONE_TOLERANCE: f64 = 0.10;

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

/// One episode's four stages and the whole ([`EPISODE_STAGES`] order).
#[derive(Debug, Clone, Copy)]
pub struct EpisodeTimes {
    /// Wall time, ms.
    pub wall: [f64; 5],
    /// CPU time of all threads, ms.
    pub cpu: [f64; 5],
    /// GFLOP of the matrix products our CPU kernels ran (`ops::gemm_flops`; 0 on a GPU).
    pub gemm_gflop: [f64; 5],
}

/// Times the four stages of one episode and the whole; the query's backbone + POS run once
/// whatever the number of shots.
pub fn time_episode(model: &MmFormer, query: &Tensor, supports: &[Tensor], labels: &[Tensor]) -> Result<EpisodeTimes> {
    let (_, _, h, w) = query.dims4()?;
    let mut marks = Vec::with_capacity(5);
    let mut mark = || marks.push((Instant::now(), process_cpu_ms().unwrap_or(f64::NAN), ops::gemm_flops()));
    mark();
    let f = model.backbone.forward(query)?;
    mark();
    let proposal_logits = model.pos.forward_proposals(&pos_features(&f))?;
    let pass = QueryPass { features: mm_features(&f), proposal_logits };
    mark();
    let feats = supports.iter().map(|x| model.support(x)).collect::<Result<Vec<_>>>()?;
    mark();
    let out = model.matching(&pass, &feats, labels, (h, w))?;
    // Make sure the result is materialised (candle is eager on CPU, but be explicit).
    out.out.sum_all()?.to_scalar::<f32>()?;
    mark();
    let wall = |a: usize, b: usize| (marks[b].0 - marks[a].0).as_secs_f64() * 1e3;
    let cpu = |a: usize, b: usize| marks[b].1 - marks[a].1;
    let gflop = |a: usize, b: usize| (marks[b].2 - marks[a].2) as f64 / 1e9;
    let spans = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)];
    Ok(EpisodeTimes {
        wall: spans.map(|(a, b)| wall(a, b)),
        cpu: spans.map(|(a, b)| cpu(a, b)),
        gemm_gflop: spans.map(|(a, b)| gflop(a, b)),
    })
}

/// Per-stage samples of one side ([`EPISODE_STAGES`] order).
fn stage_samples() -> Vec<Samples> {
    (0..EPISODE_STAGES.len()).map(|_| Samples::default()).collect()
}

/// Adds one `episode_paper` answer of bench_torch.py (`stages_ms` / `stages_cpu_ms`).
fn push_torch_stages(stages: &mut [Samples], v: &serde_json::Value) -> Result<()> {
    for (stage, s) in EPISODE_STAGES.iter().zip(stages.iter_mut()) {
        let get = |k: &str| -> Vec<f64> { v[k][*stage].as_array().into_iter().flatten().filter_map(|x| x.as_f64()).collect() };
        let (w, c) = (get("stages_ms"), get("stages_cpu_ms"));
        if w.is_empty() {
            bail!("bench_torch.py answered without stage `{stage}`: {v}");
        }
        s.cpu.extend(if c.len() == w.len() { c } else { vec![0.0; w.len()] });
        s.wall.extend(w);
    }
    Ok(())
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)))
}

/// A temporary file removed at drop (the weights + inputs handed to the PyTorch side).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes the model's weights (official names) and the episode inputs for
/// `tools/episode_torch.py` (`input.query`, `input.support.{s}`, `input.support_label.{s}`), so
/// the PyTorch side runs the same weights on the same images.
fn write_torch_episode(model: &MmFormer, query: &Tensor, supports: &[Tensor], labels: &[Tensor]) -> Result<TempFile> {
    let path = std::env::temp_dir().join(format!("mmformer-bench-episode-{}.safetensors", std::process::id()));
    let file = TempFile(path.clone());
    let cpu = Device::Cpu;
    let mut t = std::collections::HashMap::new();
    for (k, v) in model.weights() {
        t.insert(k.clone(), v.to_dtype(DType::F32)?.to_device(&cpu)?);
    }
    t.insert("input.query".to_string(), query.to_device(&cpu)?);
    for (s, (x, l)) in supports.iter().zip(labels).enumerate() {
        t.insert(format!("input.support.{s}"), x.to_device(&cpu)?);
        t.insert(format!("input.support_label.{s}"), l.to_device(&cpu)?);
    }
    candle_core::safetensors::save(&t, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(file)
}

/// True when a side's interleaved median differs from its standalone median by more than
/// [`STANDALONE_TOLERANCE`] of the standalone one.
fn disagrees(interleaved: f64, alone: f64) -> bool {
    (interleaved - alone).abs() > STANDALONE_TOLERANCE * alone
}

/// 1-shot and 5-shot episodes, per stage: the paper preset (ResNet-50, full POS, MM) at
/// `paper_size`², against the PyTorch reference of the official V1 episode
/// (`tools/episode_torch.py`, the same function as ours: `tools/check_episode_torch.py`) on the
/// same weights and inputs, measured in this run; and the CPU preset (EfficientNet-Lite0, small
/// POS) at 256², ours only. Synthetic weights.
///
/// Protocol (paper preset, per shot count), after one warm-up of each side:
/// 1. `reps` rounds, each one episode of ours then one of PyTorch (a separate process, one
///    request at a time): while one side runs, the other's threads sleep (PyTorch with
///    `OMP_WAIT_POLICY=PASSIVE`, ours in rayon's idle pool between runs). Per stage and in
///    total: median wall ms, [min–max] over the rounds, median CPU ms (all threads of the
///    side's process), and the ratio ours/PyTorch of the wall medians.
/// 2. A standalone cross-check: a few episodes of ours back to back, then a few of PyTorch back
///    to back. Their medians are printed next to the interleaved ones, with a WARNING when
///    they differ by more than 10% for either side (then the interleaved figures were disturbed,
///    by each other or by other load, and should be retaken).
///
/// Without the PyTorch venv ours is reported alone, with a note. Rows carry measured values only.
pub fn bench_episode(out: &mut dyn Write, paper_size: usize, threads: usize, reps: usize, device: &Device) -> Result<Vec<BenchRow>> {
    let reps = reps.max(1);
    let alone = reps.clamp(1, 3);
    let mut torch = TorchServer::start(threads, &[], out)?;
    if torch.is_some() && !device.is_cpu() {
        writeln!(out, "note: ours runs on {device:?}, the PyTorch reference on the CPU")?;
    }
    let mut rows = Vec::new();
    let mut warnings = Vec::new();
    for (preset, size) in [(Preset::Paper, paper_size), (Preset::Cpu, Preset::Cpu.input_size() as usize)] {
        let t = Instant::now();
        let model = MmFormer::synthetic(preset, 0, device)?;
        writeln!(out, "built the synthetic {preset:?} model in {:.1} s", t.elapsed().as_secs_f64())?;
        let dev = device.clone();
        let query = train::seeded_randn((1, 3, size, size), 0, "bench.episode.query", &dev)?;
        let supports = (0..5)
            .map(|i| train::seeded_randn((1, 3, size, size), 0, &format!("bench.episode.support{i}"), &dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // A centred square covering a quarter of the image.
        let mut m = vec![0f32; size * size];
        for y in size / 4..3 * size / 4 {
            for x in size / 4..3 * size / 4 {
                m[y * size + x] = 1.0;
            }
        }
        let label = Tensor::from_vec(m, (1, size, size), &dev)?;
        let labels = vec![label; 5];
        let tag = preset.name();
        // The PyTorch reference exists for the paper preset only.
        let mut server = if preset == Preset::Paper { torch.as_mut() } else { None };
        let file = match server {
            Some(_) => Some(write_torch_episode(&model, &query, &supports, &labels)?),
            None => None,
        };
        for k in [1usize, 5] {
            let name = format!("episode/{tag}-{size}/{k}-shot");
            let req = |n: usize| format!("episode_paper {size} {n} {k} {}", file.as_ref().map(|f| f.0.display().to_string()).unwrap_or_default());
            // Warm-up: one episode each (the server also builds its model on first use).
            time_episode(&model, &query, &supports[..k], &labels[..k])?;
            if let Some(s) = server.as_deref_mut() {
                s.request(&req(1))?;
            }
            // 1. Interleaved, round by round.
            let (mut ours, mut theirs) = (stage_samples(), stage_samples());
            for _ in 0..reps {
                let t = time_episode(&model, &query, &supports[..k], &labels[..k])?;
                for (i, s) in ours.iter_mut().enumerate() {
                    s.push(t.wall[i], t.cpu[i]);
                    s.gflop.push(t.gemm_gflop[i]);
                }
                if let Some(s) = server.as_deref_mut() {
                    push_torch_stages(&mut theirs, &s.request(&req(1))?)?;
                }
            }
            // 2. Standalone: each side alone, back to back.
            let mut ours_alone = Vec::new();
            let mut torch_alone = None;
            if let Some(s) = server.as_deref_mut() {
                for _ in 0..alone {
                    ours_alone.push(time_episode(&model, &query, &supports[..k], &labels[..k])?.wall[4]);
                }
                let mut t = stage_samples();
                push_torch_stages(&mut t, &s.request(&req(alone))?)?;
                torch_alone = Some(median(t[4].wall.clone()));
            }
            let ours_alone = (!ours_alone.is_empty()).then(|| median(ours_alone));

            let have_torch = !theirs[4].wall.is_empty();
            writeln!(out, "{name}: medians of {reps} {}; [min–max]; cpu = CPU ms of all threads of the side's process",
                if have_torch { "interleaved round(s) (ours, then PyTorch)" } else { "episode(s)" })?;
            if have_torch {
                writeln!(out, "  {:<20} {:>9} {:>19} {:>9} | {:>9} {:>19} {:>9} | {:>10} {:>9}",
                    "stage", "ours ms", "[min–max]", "cpu ms", "torch ms", "[min–max]", "cpu ms", "ours/torch", "cpu ratio")?;
            } else {
                writeln!(out, "  {:<20} {:>9} {:>19} {:>9}", "stage", "ours ms", "[min–max]", "cpu ms")?;
            }
            for (i, stage) in EPISODE_STAGES.iter().enumerate() {
                let (o, t) = (&ours[i], &theirs[i]);
                let (ow, oc) = (median(o.wall.clone()), median(o.cpu.clone()));
                let (omin, omax) = min_max(&o.wall);
                let mut detail = RowDetail { reps, ours_cpu_ms: oc, ours_min_ms: omin, ours_max_ms: omax, ..Default::default() };
                let range = |a: f64, b: f64| format!("[{a:.1}–{b:.1}]");
                let torch_ms = if have_torch {
                    let (tw, tc) = (median(t.wall.clone()), median(t.cpu.clone()));
                    let (tmin, tmax) = min_max(&t.wall);
                    detail.torch_cpu_ms = Some(tc);
                    detail.torch_min_ms = Some(tmin);
                    detail.torch_max_ms = Some(tmax);
                    writeln!(out, "  {:<20} {:>9.1} {:>19} {:>9.1} | {:>9.1} {:>19} {:>9.1} | {:>10.2} {:>9.2}",
                        stage, ow, range(omin, omax), oc, tw, range(tmin, tmax), tc, ow / tw, oc / tc)?;
                    Some(tw)
                } else {
                    writeln!(out, "  {:<20} {:>9.1} {:>19} {:>9.1}", stage, ow, range(omin, omax), oc)?;
                    None
                };
                if *stage == "total" {
                    detail.ours_alone_ms = ours_alone;
                    detail.torch_alone_ms = torch_alone;
                }
                rows.push(BenchRow {
                    name: format!("{name}/{stage}"),
                    ours_ms: ow,
                    torch_ms,
                    ratio: torch_ms.map(|t| ow / t),
                    detail: Some(detail),
                    gemm_gflop: products(o),
                });
            }
            // How near the products' peak each stage runs (none counted where a GPU ran them).
            if products(&ours[4]).is_some() {
                let parts: Vec<String> = EPISODE_STAGES
                    .iter()
                    .zip(&ours)
                    .map(|(st, o)| {
                        let g = products(o).unwrap_or(0.0);
                        format!("{st} {g:.1} ({:.0} GFLOP/s)", g / (median(o.wall.clone()) / 1e3))
                    })
                    .collect();
                writeln!(out, "  ours' matrix products, GFLOP (rate over the stage's wall time): {}", parts.join(", "))?;
            }
            if let (Some(oa), Some(ta)) = (ours_alone, torch_alone) {
                let (oi, ti) = (median(ours[4].wall.clone()), median(theirs[4].wall.clone()));
                let pct = |i: f64, a: f64| 100.0 * (i - a) / a;
                writeln!(out,
                    "  standalone cross-check (total, {alone} run(s) of each side alone, back to back): ours {oa:.1} ms \
                     (interleaved {oi:.1}, {:+.1}%), torch {ta:.1} ms (interleaved {ti:.1}, {:+.1}%); ratio alone {:.2}",
                    pct(oi, oa), pct(ti, ta), oa / ta)?;
                for (side, i, a) in [("ours", oi, oa), ("torch", ti, ta)] {
                    if disagrees(i, a) {
                        let w = format!(
                            "WARNING: {name}: {side} interleaved {i:.1} ms vs alone {a:.1} ms ({:+.1}%, more than {:.0}%): \
                             the run was disturbed (by the other side or other load); retake it on a quiet machine",
                            pct(i, a), STANDALONE_TOLERANCE * 100.0);
                        writeln!(out, "  {w}")?;
                        warnings.push(w);
                    }
                }
            }
        }
        drop(file);
    }
    if torch.is_some() {
        writeln!(out,
            "torch = tools/episode_torch.py: the official V1 episode re-implemented op for op (detectron2 R-50 with FrozenBN \
             unfolded, the POS with pure-PyTorch deformable attention, the official mask matching), the same function as ours \
             (tools/check_episode_torch.py), on the same weights and inputs; both sides {threads} thread(s)")?;
    }
    writeln!(out, "cpu ms: CPU time of all threads of a side's process (ours includes rayon's spin-waits), which other load barely changes")?;
    if !warnings.is_empty() {
        writeln!(out, "{} WARNING(s) above: interleaved and standalone timings disagree by more than {:.0}%", warnings.len(), STANDALONE_TOLERANCE * 100.0)?;
    }
    Ok(rows)
}

// ---- bench pos ----------------------------------------------------------------------------

/// Seeded random post-ReLU backbone features [res2, res3, res4, res5] of a `batch`×3×`size`² input for
/// the preset's POS (strides 4, 8, 16, 32).
pub fn pos_bench_features(preset: Preset, size: usize, batch: usize, device: &Device) -> Result<Vec<Tensor>> {
    let cfg = preset.pos_config();
    cfg.in_channels
        .iter()
        .zip([4usize, 8, 16, 32])
        .map(|(&c, s)| Ok(train::seeded_randn((batch, c, size / s, size / s), 0, &format!("bench.pos.res{s}"), device)?.relu()?))
        .collect()
}

/// The benchmark's stage-1 targets, the same formula as `synthetic_targets` in tools/pos_torch.py:
/// per image b a semantic label with background 0 and two rectangles (classes 1 and 2), so three
/// GT masks (M_b, size, size), and the episode label (B, size, size) = class 1's rectangle.
pub fn pos_bench_targets(size: usize, batch: usize, device: &Device) -> Result<(Vec<Tensor>, Tensor)> {
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
        let t = Tensor::from_vec(sem.iter().map(|&v| v as f32).collect::<Vec<_>>(), (size, size), device)?;
        targets.push(losses::stage1_targets(&t, &[])?);
        labels.extend(sem.iter().map(|&v| f32::from(v == 1)));
    }
    Ok((targets, Tensor::from_vec(labels, (batch, size, size), device)?))
}

/// One stage-1 training iteration as `train-pos` runs it ([`crate::stage1`]), on
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
    /// Wait for the device at each phase boundary, so that the phase times are the device's
    /// (without it a GPU's phases are launch times and the last one holds the rest).
    pub sync_phases: bool,
}

/// Names of the phases [`PosTrainBench::step`] times.
pub const TRAIN_PHASES: [&str; 4] = ["forward", "criterion", "backward", "clip+step"];

impl PosTrainBench {
    pub fn new(preset: Preset, size: usize, batch: usize, device: &Device) -> Result<Self> {
        let (vm, model) = crate::stage1::new_pos_seeded(preset, 0, device)?;
        let vars = train::named_vars(&vm);
        let opt = train::AdamW::new(vars.clone(), train::AdamWConfig::default(), train::default_no_decay)?;
        let criterion = losses::Stage1Criterion::new(losses::Stage1Config {
            num_points: preset.num_points(),
            ..Default::default()
        });
        let features = pos_bench_features(preset, size, batch, device)?;
        let (targets, label) = pos_bench_targets(size, batch, device)?;
        Ok(Self { model, vars, opt, criterion, features, targets, label, iter: 0, sync_phases: false })
    }

    /// One iteration; returns the wall ms of each of [`TRAIN_PHASES`] and the loss.
    pub fn step(&mut self) -> Result<([f64; 4], f64)> {
        use rand_chacha::rand_core::SeedableRng;
        let dev = self.features[0].device().clone();
        let now = || -> Result<Instant> {
            if self.sync_phases {
                dev.synchronize()?;
            }
            Ok(Instant::now())
        };
        let t0 = now()?;
        let out = self.model.forward(&self.features)?;
        let t1 = now()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.iter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let l = self.criterion.forward_with_rng(&out.all_predictions(), &self.targets, &self.label, &mut rng)?;
        let t2 = now()?;
        let grads = l.total.backward()?;
        let t3 = now()?;
        let norm = train::grad_norm(&grads, &self.vars)?;
        self.opt.step_scaled(&grads, 1e-4, train::clip_coefficient(norm, 0.01))?;
        let t4 = now()?;
        self.iter += 1;
        let loss = l.total.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            bail!("POS training bench: loss is {loss}");
        }
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        Ok(([ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4)], loss))
    }
}

/// Wall and CPU milliseconds of repeated runs, and (ours only) the GFLOP of their matrix
/// products (`ops::gemm_flops`).
#[derive(Default)]
struct Samples {
    wall: Vec<f64>,
    cpu: Vec<f64>,
    gflop: Vec<f64>,
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

/// The median GFLOP of ours' products, when any were counted (none where a GPU ran them).
fn products(ours: &Samples) -> Option<f64> {
    (!ours.gflop.is_empty()).then(|| median(ours.gflop.clone())).filter(|&g| g > 0.0)
}

/// One benchmark line: the row (wall medians) plus the CPU-time medians of both sides, and ours'
/// product GFLOP with their rate when counted.
fn pos_row(out: &mut dyn Write, name: &str, ours: Samples, torch: Samples) -> Result<BenchRow> {
    let gflop = products(&ours);
    let (ow, oc) = (median(ours.wall), median(ours.cpu));
    let tw = (!torch.wall.is_empty()).then(|| median(torch.wall.clone()));
    let tc = (!torch.cpu.is_empty()).then(|| median(torch.cpu));
    let row = BenchRow { name: name.into(), ours_ms: ow, torch_ms: tw, ratio: tw.map(|t| ow / t), detail: None, gemm_gflop: gflop };
    match (tw, tc) {
        (Some(tw), Some(tc)) => writeln!(out, 
            "{:<36} ours {:>8.1} ms  torch {:>8.1} ms  ours/torch {:>5.2}  | cpu ms: ours {:>8.1}  torch {:>8.1}  ratio {:>5.2}",
            name,
            ow,
            tw,
            ow / tw,
            oc,
            tc,
            oc / tc
        )?,
        _ => writeln!(out, "{name:<36} ours {ow:>8.1} ms  | cpu ms: ours {oc:>8.1}")?,
    }
    if let Some(g) = gflop {
        writeln!(out, "  ours' matrix products: {g:.2} GFLOP, {:.0} GFLOP/s over the wall time", g / (ow / 1e3))?;
    }
    Ok(row)
}

/// Runs ours and one torch request alternately `reps` times (after one warm-up of ours; the
/// torch side warms itself up on first use), then a standalone cross-check: a few runs of each
/// side alone, back to back, whose medians are printed next to the interleaved ones with a
/// WARNING when they disagree by more than [`STANDALONE_TOLERANCE`].
fn interleave(
    out: &mut dyn Write,
    name: &str,
    ours: &mut dyn FnMut() -> Result<()>,
    mut torch: Option<(&mut TorchServer, &str)>,
    reps: usize,
) -> Result<BenchRow> {
    ours()?;
    let timed = |f: &mut dyn FnMut() -> Result<()>, into: &mut Samples| -> Result<()> {
        let (c0, g0, w0) = (process_cpu_ms().unwrap_or(f64::NAN), ops::gemm_flops(), Instant::now());
        f()?;
        into.push(w0.elapsed().as_secs_f64() * 1e3, process_cpu_ms().unwrap_or(f64::NAN) - c0);
        into.gflop.push((ops::gemm_flops() - g0) as f64 / 1e9);
        Ok(())
    };
    let (mut o, mut t) = (Samples::default(), Samples::default());
    for _ in 0..reps {
        timed(ours, &mut o)?;
        if let Some((server, req)) = torch.as_mut() {
            t.push_answer(&server.request(req)?)?;
        }
    }
    let alone = reps.min(3);
    let (mut oa, mut ta) = (Samples::default(), Samples::default());
    for _ in 0..alone {
        timed(ours, &mut oa)?;
    }
    if let Some((server, req)) = torch.as_mut() {
        for _ in 0..alone {
            ta.push_answer(&server.request(req)?)?;
        }
    }
    let (oi, ti) = (median(o.wall.clone()), (!t.wall.is_empty()).then(|| median(t.wall.clone())));
    let (os, omin_max) = (median(oa.wall), min_max(&o.wall));
    let row = pos_row(out, name, o, t)?;
    let mut line = format!("  [min–max ours {:.1}–{:.1}] alone ({alone} run(s) back to back): ours {os:.1} ms", omin_max.0, omin_max.1);
    let mut warn = disagrees(oi, os);
    if let Some(ti) = ti {
        let tmm = min_max(&ta.wall);
        let tsa = median(ta.wall);
        line += &format!(", torch {tsa:.1} ms [alone min–max {:.1}–{:.1}], ratio alone {:.2}", tmm.0, tmm.1, os / tsa);
        warn |= disagrees(ti, tsa);
    }
    writeln!(out, "{line}")?;
    if warn {
        writeln!(out, "  WARNING: {name}: interleaved and standalone medians disagree by more than {:.0}%: the run was disturbed; retake it on a quiet machine", STANDALONE_TOLERANCE * 100.0)?;
    }
    Ok(row)
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
pub fn bench_pos(out: &mut dyn Write, paper_size: usize, threads: usize, reps: usize, device: &Device) -> Result<Vec<BenchRow>> {
    let reps = reps.max(1);
    let mut torch = TorchServer::start(threads, &["--fuse-bn"], out)?;
    let mut rows = Vec::new();

    // 1. Paper-preset inference forward.
    let model = MmFormer::synthetic(Preset::Paper, 0, device)?;
    let feats = pos_bench_features(Preset::Paper, paper_size, 1, device)?;
    let mut ours = || -> Result<()> {
        model.pos.forward_proposals(&feats)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    };
    let req = format!("pos_forward_paper {paper_size} 1 1");
    let t = torch.as_mut().map(|s| (s, req.as_str()));
    rows.push(interleave(out, &format!("pos_forward_paper_{paper_size}"), &mut ours, t, reps)?);
    drop(model);

    // 2. CPU-preset training iteration, per phase.
    let (size, batch) = (Preset::Cpu.input_size() as usize, 4);
    let mut bench = PosTrainBench::new(Preset::Cpu, size, batch, device)?;
    bench.step()?; // warm-up
    let (mut o, mut t) = (Samples::default(), Samples::default());
    let mut ours_p: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut torch_p: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut solver = String::new();
    let req = format!("pos_train_cpu {size} 1 {batch}");
    for _ in 0..reps {
        let (c0, g0) = (process_cpu_ms().unwrap_or(f64::NAN), ops::gemm_flops());
        let (p, _) = bench.step()?;
        o.push(p.iter().sum::<f64>(), process_cpu_ms().unwrap_or(f64::NAN) - c0);
        o.gflop.push((ops::gemm_flops() - g0) as f64 / 1e9);
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
    rows.push(pos_row(out, &format!("pos_train_iter_cpu_{size}_b{batch}"), o, t)?);
    drop(bench);

    // 3. The frozen backbone a real iteration runs first.
    let bb = backbone::EfficientNetLite0::synthetic(0, device)?;
    let x = train::seeded_randn((batch, 3, size, size), 0, "bench.pos.image", device)?;
    let mut ours = || -> Result<()> {
        bb.forward(&x)?;
        Ok(())
    };
    let req = format!("efficientnet_lite0 {size} 1 {batch}");
    let t = torch.as_mut().map(|s| (s, req.as_str()));
    rows.push(interleave(out, &format!("backbone_efficientnet_lite0_{size}_b{batch}"), &mut ours, t, reps)?);

    writeln!(out, "training iteration by phase (median wall ms over {reps}):")?;
    for (i, name) in TRAIN_PHASES.iter().enumerate() {
        let o = median(ours_p[i].clone());
        if torch_p[i].is_empty() {
            writeln!(out, "  {name:<12} ours {o:>9.1}")?;
        } else {
            let t = median(torch_p[i].clone());
            writeln!(out, "  {name:<12} ours {o:>9.1}   torch {t:>9.1}   ours/torch {:>5.2}", o / t)?;
        }
    }
    if !solver.is_empty() {
        writeln!(out, "torch matcher solver: {solver}")?;
    }
    Ok(rows)
}

// ---- bench stage2 -------------------------------------------------------------------------

/// Synthetic images in the shard folder [`bench_shards`] makes: enough for distinct episodes over
/// a few timed steps, few enough to cache in about a minute at the paper preset on 2 cores.
const BENCH_SHARD_IMAGES: usize = 24;

/// A shard folder at `preset` for `bench stage2 --preset`, made under `dir` when absent (and
/// reused after): a small synthetic dataset, seeded stand-in backbone weights (ResNet-50 at the
/// paper preset: there are no real ones here), a POS after one training step, and
/// `cache-proposals` of the training split. The timing does not depend on the weights' values.
pub fn bench_shards(preset: Preset, dir: &Path, device: &Device) -> Result<PathBuf> {
    let shards = dir.join("shards");
    if StageTwoData::open(&shards).is_ok_and(|d| d.manifest.preset == preset && d.train.is_some()) {
        return Ok(shards);
    }
    let data = dir.join("synthetic");
    let cfg = data::synthetic::SyntheticConfig { num_train: BENCH_SHARD_IMAGES, num_val: 40, seed: 0, ..Default::default() };
    data::synthetic::generate(&cfg, &data, None).with_context(|| format!("{}: cannot write the synthetic dataset", data.display()))?;
    let weights = match preset {
        Preset::Paper => {
            let path = dir.join("resnet50-seeded.safetensors");
            if !path.exists() {
                backbone::ResNet50::save_synthetic(0, &path)?;
            }
            Some(path)
        }
        Preset::Cpu => None,
    };
    let pos_out = dir.join("pos");
    let _ = std::fs::remove_dir_all(&pos_out);
    let stage1 = crate::stage1::Stage1Options {
        data: data.clone(),
        fold: 0,
        preset,
        backbone_weights: weights.clone(),
        batch: 2,
        iters: 1,
        lr: 1e-4,
        weight_decay: 0.05,
        clip: 0.01,
        seed: 0,
        out: pos_out.clone(),
        eval_every: 1,
        eval_episodes: 2,
        log_every: 1,
    };
    crate::stage1::train_pos(&stage1, device, &train::Silent)?;
    let _ = std::fs::remove_dir_all(&shards);
    let cache = crate::cache::CacheOptions {
        split: crate::cache::Splits::Train,
        ..crate::cache::CacheOptions::one_view(data, preset, weights, pos_out.join("checkpoints/best"), shards.clone())
    };
    crate::cache::cache_proposals(&cache, device, &train::Silent)?;
    Ok(shards)
}

/// The phases of one stage-2 training step, in ms.
#[derive(Clone, Copy, Debug)]
pub struct Stage2StepTimes {
    pub forward_ms: f64,
    pub loss_ms: f64,
    pub backward_ms: f64,
    /// Gradient clipping and the AdamW step.
    pub step_ms: f64,
}

impl Stage2StepTimes {
    pub fn total_ms(&self) -> f64 {
        self.forward_ms + self.loss_ms + self.backward_ms + self.step_ms
    }
}

/// One stage-2 training step on a batch (forward, loss, backward, clip at the official 0.01,
/// AdamW), timed phase by phase.
pub fn timed_stage2_step(mm: &MaskMatching, opt: &mut AdamW, vars: &[train::NamedVar], b: &EpisodeBatch) -> Result<Stage2StepTimes> {
    let t = Instant::now();
    let out = b.forward(mm)?;
    let t_fwd = t.elapsed().as_secs_f64();
    let loss = stage2_loss(&out.two_channel()?, &b.query_label, &out.cosine, &out.proposal_probs, Stage2Weights::default())?;
    let _ = loss.total.to_scalar::<f32>()?;
    let t_loss = t.elapsed().as_secs_f64();
    let grads = loss.total.backward()?;
    let t_bwd = t.elapsed().as_secs_f64();
    let norm = train::grad_norm(&grads, vars)?;
    opt.step_scaled(&grads, 1e-4, train::clip_coefficient(norm, 0.01))?;
    let t_step = t.elapsed().as_secs_f64();
    Ok(Stage2StepTimes { forward_ms: t_fwd * 1e3, loss_ms: (t_loss - t_fwd) * 1e3, backward_ms: (t_bwd - t_loss) * 1e3, step_ms: (t_step - t_bwd) * 1e3 })
}

/// One stage-2 training step read from the shards, against the same step with the backbone and
/// POS run live on the same episodes (what stage 2 would cost without the stage boundary).
/// The steps run back to back first, as `train-mm` runs them (batches read ahead), then the
/// live front ends over the same episodes, each added to its episode's step time; medians over
/// the repetitions. Both sides leave out what training reads ahead of a step (the shards; the
/// images' decoding and augmentation), and report it. Writes the table and returns the rows
/// `stage2_step_{from_shards, batch_wait, shard_read, mm, live, live_decode}` (no PyTorch
/// column: both sides are ours).
pub fn bench_stage2(out: &mut dyn Write, shards: &Path, batch: usize, reps: usize, device: &Device) -> Result<Vec<BenchRow>> {
    let d = StageTwoData::open(shards)?;
    let m = &d.manifest;
    let reader = d.train.as_ref().context("no train shards")?;
    let ds = crate::datasets::open_dataset(&m.dataset)?;
    let novel = ds.novel_classes(m.fold)?.to_vec();
    let size = m.preset.input_size();
    let min_area = data::AugmentConfig::with_crop_size(size).min_support_area;
    let train = ShardDataset::train(reader, &novel, 1, 0, min_area)?;
    let mut cfg = m.preset.mm_config();
    let ablate = std::env::var("MMFORMER_BENCH_ABLATE").unwrap_or_default();
    cfg.cross_alignment &= !ablate.contains("cross");
    cfg.self_alignment &= !ablate.contains("self");
    let vm = VarMap::new();
    let mm = MaskMatching::new(&cfg, train::seeded_var_builder(&vm, 0, DType::F32, device))?;
    let vars = train::named_vars(&vm);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default(), train::default_no_decay)?;
    // The live side: the same frozen models the shards were made with.
    let backbone = load_backbone(m.preset, Some(&m.backbone_file), device)?;
    let ck = CheckpointStore::open(&m.pos_checkpoint, POS_KIND)?;
    let pos = load_pos(m.preset, &ck, device)?;
    let aug = data::AugmentConfig::with_crop_size(size);
    let train_samples = ds.samples(data::Split::Train);

    // The shard steps run as `train-mm` runs them: back to back, each batch read and made into
    // tensors ahead on a background thread (`Prefetcher`, the same `training_batch`). So the
    // step pays what training pays for the shards: any wait for its batch (a read-ahead that did
    // not keep up) and its move to the device; the read-ahead itself is timed on its thread.
    // The live front ends run afterwards over the same episodes: a backbone + POS pass between
    // the steps would evict the MM's weights, optimizer state and buffers from the caches,
    // which training from shards never does.
    let (mut t_wait, mut t_step, mut flops) = (Vec::new(), Vec::new(), Vec::new());
    let read_ms = std::sync::Mutex::new(Vec::new());
    let make = |it: u64| {
        let t = Instant::now();
        let b = crate::stage2::training_batch(&train, batch as u64, it);
        read_ms.lock().expect("read times").push((it, t.elapsed().as_secs_f64() * 1e3));
        b
    };
    std::thread::scope(|scope| -> Result<()> {
        let mut batches = Prefetcher::new(scope, &make, PREFETCH_DEPTH, reps as u64 + 1);
        for rep in 0..reps + 1 {
            let t = Instant::now();
            let b = batches.get(rep as u64)?.to_device(device)?;
            let wait = t.elapsed().as_secs_f64();
            let f0 = ops::gemm_flops();
            let phases = timed_stage2_step(&mm, &mut opt, &vars, &b)?;
            let step = phases.total_ms() / 1e3;
            let step_flops = (ops::gemm_flops() - f0) as f64;
            if std::env::var_os("MMFORMER_BENCH_VERBOSE").is_some() {
                writeln!(out, "batch {:.1} ms, forward {:.1} ms, loss {:.1} ms, backward {:.1} ms, clip+step {:.1} ms", wait * 1e3, phases.forward_ms, phases.loss_ms, phases.backward_ms, phases.step_ms)?;
            }
            if rep > 0 {
                t_wait.push(wait * 1e3);
                t_step.push(step * 1e3);
                flops.push(step_flops / 1e9);
            }
        }
        Ok(())
    })?;
    // Read-aheads of the timed steps' batches (not the first, which nothing ran ahead of).
    let t_read: Vec<f64> = read_ms.into_inner().expect("read times").into_iter().filter(|&(it, _)| it > 0).map(|(_, ms)| ms).collect();
    let sampler = train.sampler().context("training shard dataset without a sampler")?;
    let (mut t_live, mut t_views) = (Vec::new(), Vec::new());
    for rep in 0..reps + 1 {
        // Live: decode + augment the same views (timed apart: live training reads them ahead
        // as stage 1 does), backbone on query and support, POS on the query; then the same MM
        // step, timed above. The episodes' records come from the sampler and the index.
        let specs = (0..batch as u64).map(|j| sampler.episode(rep as u64 * batch as u64 + j)).collect::<data::Result<Vec<_>>>()?;
        let per = 1 + specs[0].supports.len();
        let t = Instant::now();
        let mut views = Vec::new();
        for i in specs.iter().flat_map(|e| std::iter::once(e.query).chain(e.supports.iter().copied())) {
            let (image_id, view) = (&reader.records()[i].image_id, reader.records()[i].view);
            let idx = ds.find(data::Split::Train, image_id).context("image of the shards not in the dataset")?;
            let k = match view {
                data::shard::ShardView::Augmented(k) => k,
                data::shard::ShardView::Test => 0,
            };
            views.push(data::cached::cached_train_view(&train_samples[idx], idx, k, &aug, m.seed)?.0);
        }
        let decoded = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let queries: Vec<_> = views.iter().step_by(per).collect();
        let supports: Vec<_> = views.iter().skip(1).step_by(per).collect();
        let fq = backbone.forward(&eval::images_to_tensor(&queries, device)?)?;
        let p = pos.forward_proposals(&pos_features(&fq))?;
        let fs = backbone.forward(&eval::images_to_tensor(&supports, device)?)?;
        let _keep: (Tensor, [Tensor; 3], [Tensor; 3]) = (p, mm_features(&fq), mm_features(&fs));
        if rep > 0 {
            t_live.push(t.elapsed().as_secs_f64() * 1e3 + t_step[rep - 1]);
            t_views.push(decoded);
        }
    }
    let (w, s, l, r, v) = (median(t_wait), median(t_step), median(t_live), median(t_read), median(t_views));
    // Zero where the products ran elsewhere (a GPU).
    let gflop = Some(median(flops)).filter(|&f| f > 0.0);
    writeln!(out, "stage-2 training step, {:?} preset, batch {batch}, 1-shot, median of {reps}:", m.preset)?;
    writeln!(out, "  from shards: {:8.1} ms  (waiting for the batch {w:.1} ms + MM forward/backward/step {s:.1} ms)", w + s)?;
    writeln!(out, "               reading a batch from the shards into tensors: {r:.1} ms, ahead of its step on a background thread, as train-mm does")?;
    writeln!(out, "  live:        {:8.1} ms  (backbone+POS {:.1} ms + the same MM step; decode+augment {v:.1} ms, read ahead as stage 1 does)", l, l - s)?;
    writeln!(out, "  ratio live / shards: {:.1}x", l / (w + s))?;
    if let Some(g) = gflop {
        writeln!(out, "  MM step products: {g:.2} GFLOP, {:.0} GFLOP/s over the whole step", g / (s / 1e3))?;
    }
    let row = |name: &str, ms: f64| BenchRow { name: name.into(), ours_ms: ms, torch_ms: None, ratio: None, detail: None, gemm_gflop: None };
    Ok(vec![
        row("stage2_step_from_shards", w + s),
        row("stage2_step_batch_wait", w),
        row("stage2_step_shard_read", r),
        BenchRow { gemm_gflop: gflop, ..row("stage2_step_mm", s) },
        row("stage2_step_live", l),
        row("stage2_step_live_decode", v),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(wall: &[f64], gflop: &[f64]) -> Samples {
        Samples { wall: wall.to_vec(), cpu: wall.to_vec(), gflop: gflop.to_vec() }
    }

    /// A line's row carries ours' median product count and the text its rate; nothing is
    /// claimed where none were counted (a GPU ran them, or a side without products).
    #[test]
    fn a_line_reports_ours_products_when_counted() {
        let mut out = Vec::new();
        let row = pos_row(&mut out, "x", samples(&[100.0, 200.0, 300.0], &[2.0, 2.0, 2.0]), samples(&[400.0], &[])).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(row.gemm_gflop, Some(2.0));
        assert_eq!((row.ours_ms, row.torch_ms, row.ratio), (200.0, Some(400.0), Some(0.5)));
        assert!(text.contains("ours' matrix products: 2.00 GFLOP, 10 GFLOP/s"), "{text}");

        let mut out = Vec::new();
        let row = pos_row(&mut out, "y", samples(&[50.0], &[0.0]), Samples::default()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(row.gemm_gflop, None);
        assert!(!text.contains("matrix products"), "{text}");
        assert_eq!(products(&Samples::default()), None);
    }
}
