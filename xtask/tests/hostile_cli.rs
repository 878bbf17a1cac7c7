//! The command line against the catalogue of bad files of issue 13, end to end: each is handed to
//! `xtask predict` (or a training command) in its own process, which must exit non-zero with one
//! `error:` line naming the file, never panic or abort, and stay under 1 GB of resident memory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use mmformer::{Device, MmFormer, Preset};

const PEAK_LIMIT_KB: i64 = 1 << 20; // 1 GiB

/// The largest resident set of any child process waited for so far (KiB).
fn children_peak_kb() -> i64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    usage.ru_maxrss
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(kind);
    out.extend(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend(crc.sum().to_be_bytes());
}

/// A PNG whose header declares `w`×`h` (8-bit, `color` type) followed by a little real data.
fn png_declaring(w: u32, h: u32, color: u8) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, color, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&vec![0u8; 1 << 20]).unwrap();
    png_chunk(&mut out, b"IDAT", &z.finish().unwrap());
    png_chunk(&mut out, b"IEND", &[]);
    out
}

fn save_png(path: &Path, img: image::DynamicImage) {
    img.save_with_format(path, image::ImageFormat::Png).unwrap();
}

/// A pickle (protocol 2) calling `posix.system(cmd)` when loaded by an unpickler that executes.
fn pickle_calling_system(cmd: &str) -> Vec<u8> {
    let mut p = b"\x80\x02cposix\nsystem\nX".to_vec();
    p.extend((cmd.len() as u32).to_le_bytes());
    p.extend(cmd.as_bytes());
    p.extend(b"\x85R.");
    p
}

/// A pickle whose memo references nest: 40 levels of (x, x), 2^40 leaves if copied.
fn pickle_memo_bomb() -> Vec<u8> {
    let mut p = b"\x80\x02]q\x00".to_vec();
    for _ in 0..40 {
        p.extend(b"h\x00h\x00\x86q\x00");
    }
    p.push(b'.');
    p
}

struct Setup {
    dir: tempfile::TempDir,
    checkpoint: PathBuf,
    image: PathBuf,
    mask: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("model.safetensors");
        MmFormer::synthetic(Preset::Cpu, 0, &Device::Cpu).unwrap().save(&checkpoint).unwrap();
        let image = dir.path().join("photo.png");
        save_png(&image, image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]))));
        let mask = dir.path().join("photo_mask.png");
        save_png(&mask, image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(64, 48, |x, y| image::Luma([u8::from((16..48).contains(&x) && (12..36).contains(&y))]))));
        Self { dir, checkpoint, image, mask }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// `predict` with the valid inputs except the ones replaced.
    fn predict(&self, checkpoint: Option<&Path>, query: Option<&Path>, support: Option<&Path>, mask: Option<&Path>) -> Vec<String> {
        let out = self.dir.path().join("out");
        [
            "predict".into(),
            "--checkpoint".into(),
            checkpoint.unwrap_or(&self.checkpoint).display().to_string(),
            "--query".into(),
            query.unwrap_or(&self.image).display().to_string(),
            "--support".into(),
            support.unwrap_or(&self.image).display().to_string(),
            "--support-mask".into(),
            mask.unwrap_or(&self.mask).display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ]
        .to_vec()
    }
}

/// Runs the CLI; checks exit code, the one error line (naming `names`), no panic, the peak.
fn expect_refused(what: &str, args: &[String], names: &[&str], usage: bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).env("RUST_BACKTRACE", "0").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(code.is_some(), "{what}: killed by a signal ({:?}); stderr:\n{stderr}", out.status);
    assert_eq!(code, Some(if usage { 2 } else { 1 }), "{what}: exit code; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{what}: panicked:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{what}: expected one error line, got:\n{stderr}");
    for n in names {
        assert!(errors[0].contains(n), "{what}: the error does not name `{n}`: {}", errors[0]);
    }
    let peak = children_peak_kb();
    assert!(peak < PEAK_LIMIT_KB, "{what} (or a case before it): a process reached {} MiB resident", peak / 1024);
    eprintln!("{what}: {}", errors[0]);
}

#[test]
fn every_bad_file_gets_one_clear_error_and_little_memory() {
    let s = Setup::new();
    let jpeg = {
        let mut b = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 7])))
            .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Jpeg)
            .unwrap();
        b
    };
    let text = s.file("notes.jpg", b"this is a text file, not a JPEG\n");
    let truncated = s.file("cut.jpg", &jpeg[..jpeg.len() / 2]);
    let empty = s.file("empty.png", b"");
    let huge_image = s.file("huge.png", &png_declaring(100_000, 100_000, 2));
    let mask_bomb = s.file("bomb_mask.png", &png_declaring(60_000, 60_000, 0));
    let tall_mask = s.file("tall_mask.png", &png_declaring(1, (1 << 31) - 1, 0));
    let small_mask = s.file("small_mask.png", &{
        let mut b = Vec::new();
        image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(32, 24, image::Luma([1])))
            .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
            .unwrap();
        b
    });
    let marker = s.dir.path().join("pwned");
    let evil = s.file(
        "evil.pth",
        &mmformer::fuzz::pack_zip(&[("archive/data.pkl".into(), pickle_calling_system(&format!("touch {}", marker.display())))]),
    );
    let bomb_pth = s.file("memo_bomb.pth", &mmformer::fuzz::pack_zip(&[("archive/data.pkl".into(), pickle_memo_bomb())]));
    let ckpt = std::fs::read(&s.checkpoint).unwrap();
    let half = s.file("half.safetensors", &ckpt[..ckpt.len() / 2]);
    let random = s.file("random.safetensors", &(0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<_>>());

    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        ("text file named .jpg (query)", s.predict(None, Some(&text), None, None), vec!["notes.jpg"]),
        ("truncated JPEG (query)", s.predict(None, Some(&truncated), None, None), vec!["cut.jpg"]),
        ("truncated JPEG (support)", s.predict(None, None, Some(&truncated), None), vec!["cut.jpg"]),
        ("empty file (query)", s.predict(None, Some(&empty), None, None), vec!["empty.png"]),
        ("PNG declaring 100000x100000 (query)", s.predict(None, Some(&huge_image), None, None), vec!["huge.png"]),
        ("mask PNG declaring 60000x60000", s.predict(None, None, None, Some(&mask_bomb)), vec!["bomb_mask.png"]),
        ("mask PNG declaring height 2^31-1", s.predict(None, None, None, Some(&tall_mask)), vec!["tall_mask.png"]),
        ("mask of the wrong size", s.predict(None, None, None, Some(&small_mask)), vec!["small_mask.png"]),
        ("empty mask file", s.predict(None, None, None, Some(&empty)), vec!["empty.png"]),
        ("pickle calling os.system", s.predict(Some(&evil), None, None, None), vec!["evil.pth", "posix"]),
        ("pickle memo bomb", s.predict(Some(&bomb_pth), None, None, None), vec!["memo_bomb.pth"]),
        ("half a checkpoint", s.predict(Some(&half), None, None, None), vec!["half.safetensors"]),
        ("random bytes as a checkpoint", s.predict(Some(&random), None, None, None), vec!["random.safetensors"]),
    ];
    for (what, args, names) in &cases {
        expect_refused(what, args, names, false);
    }
    assert!(!marker.exists(), "the pickle's os.system ran");
    // Counts and intervals of zero are usage errors (clap), before any work.
    for flag in ["--batch", "--iters", "--eval-every", "--log-every"] {
        let args: Vec<String> = ["train-pos", flag, "0", "--out"].iter().map(|a| a.to_string()).chain([s.dir.path().join("run").display().to_string()]).collect();
        expect_refused(&format!("train-pos {flag} 0"), &args, &[flag], true);
    }
    let args: Vec<String> = ["bench", "pos", "--reps", "0"].iter().map(|a| a.to_string()).collect();
    expect_refused("bench --reps 0", &args, &["--reps"], true);
}
