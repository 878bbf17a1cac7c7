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
        let mut child = Command::new(&python)
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
        eprintln!("PyTorch {} with {} threads", ready["torch"], ready["threads"]);
        Ok(Some(Self { child, stdin, stdout }))
    }

    /// Runs one request (`<model> <size> <reps>` or a model-specific line) and returns the times.
    pub fn time(&mut self, request: &str) -> Result<Vec<f64>> {
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let v: serde_json::Value =
            serde_json::from_str(line.trim()).with_context(|| format!("bench_torch.py answered {line:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("bench_torch.py: {e} (request `{request}`)");
        }
        let times = v["times_ms"].as_array().context("no times_ms")?;
        Ok(times.iter().filter_map(|t| t.as_f64()).collect())
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
