//! `cargo xtask predict`: segment the supports' class in query images with a full MM-Former
//! checkpoint (ours or an official `.pth`).
//!
//! Inputs follow the test protocol (spec §1.1): every image is resized bilinearly to size×size
//! (aspect ratio not kept), support masks with torch-nearest. The support features are computed
//! once per run; each query gets one backbone + POS pass whatever the number of shots. The
//! model's `out` (1, 1, size, size) is resized bilinearly (align_corners=True, as the official
//! evaluator does) to the query's original size and thresholded: foreground ⇔ out > 0.5 (the
//! argmax of `[1 − out, out]`).
//!
//! Outputs per query `<stem>`: `<stem>_mask.png` (8-bit grayscale 0/255, original size) and
//! `<stem>_overlay.png` (the query with the predicted mask tinted).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use data::label::{read_mask_png, MaskColor};
use data::{Label, NormalizedImage, IGNORE};
use image::RgbImage;

use crate::pipeline::images_to_tensor;
use crate::pipeline::model::MmFormer;

/// Arguments of `cargo xtask predict`.
#[derive(Clone, Debug, clap::Args)]
pub struct PredictArgs {
    /// A full MM-Former checkpoint: ours (`model.safetensors`) or an official `model_best.pth`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Support image (repeat for K shots; the i-th `--support-mask` belongs to the i-th `--support`).
    #[arg(long = "support", required = true)]
    pub supports: Vec<PathBuf>,
    /// Support mask PNG, same size as its image: grayscale (0 = background, other = object),
    /// palette (index 0 = background, 255 = ignore, other = object) or RGB (non-black = object).
    #[arg(long = "support-mask", required = true)]
    pub support_masks: Vec<PathBuf>,
    /// A query image, or a folder: every .jpg/.jpeg/.png in it (sorted; `*_mask.*` and
    /// `*_overlay.*` skipped).
    #[arg(long)]
    pub query: PathBuf,
    /// Output folder for `<stem>_mask.png` and `<stem>_overlay.png`.
    #[arg(long)]
    pub out: PathBuf,
    /// Input side (square, a multiple of 32); default: the checkpoint preset's (256 cpu, 480 paper).
    #[arg(long)]
    pub size: Option<u32>,
    /// For multi-class masks (e.g. VOC palette labels): the pixel value of the class to segment;
    /// every other value (255 = ignore included) is background. Default: any non-zero value
    /// except a palette 255 is the object.
    #[arg(long)]
    pub class_value: Option<u8>,
}

/// What one query gave.
#[derive(Clone, Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct QueryResult {
    pub query: PathBuf,
    pub mask_png: PathBuf,
    pub overlay_png: PathBuf,
    /// Foreground share of the query's pixels, in percent.
    pub foreground_pct: f64,
    /// (width, height) of the query (and of the mask written).
    pub size: (u32, u32),
    pub seconds: f64,
}

/// `cargo xtask predict`.
pub fn predict(args: &PredictArgs) -> Result<()> {
    // Cheap checks on the user's files first, so a typo does not wait for the model to load.
    check_pairs(args)?;
    if let Some(size) = args.size {
        check_size(size)?;
    }
    let queries = collect_queries(&args.query)?;
    let supports = read_supports(&args.supports, &args.support_masks, args.class_value)?;
    let t = Instant::now();
    let model = MmFormer::load(&args.checkpoint)
        .with_context(|| format!("{}: cannot load as an MM-Former checkpoint", args.checkpoint.display()))?;
    eprintln!(
        "{}: {:?} preset, loaded in {:.1} s",
        args.checkpoint.display(),
        model.meta.preset,
        t.elapsed().as_secs_f64()
    );
    let results = run(&model, &supports, &queries, &args.out, args.size)?;
    println!(
        "wrote {} mask(s) (`<name>_mask.png`, 0/255 at the query's size) and overlay(s) (`<name>_overlay.png`) to {}",
        results.len(),
        args.out.display()
    );
    Ok(())
}

fn check_pairs(args: &PredictArgs) -> Result<()> {
    if args.supports.len() != args.support_masks.len() {
        bail!(
            "{} --support image(s) but {} --support-mask file(s): give one mask per support image, in the same order",
            args.supports.len(),
            args.support_masks.len()
        );
    }
    if args.supports.is_empty() {
        bail!("at least one --support image with its --support-mask is needed");
    }
    Ok(())
}

/// A support image at its original size and its binary mask (0 / 1, ignore already → 0).
#[derive(Clone, Debug)]
pub struct Support {
    pub image_path: PathBuf,
    pub mask_path: PathBuf,
    pub image: RgbImage,
    pub mask: Label,
}

/// Reads every support pair, checking sizes and that each mask has foreground.
pub fn read_supports(images: &[PathBuf], masks: &[PathBuf], class_value: Option<u8>) -> Result<Vec<Support>> {
    if images.len() != masks.len() {
        bail!("{} support image(s) but {} support mask(s)", images.len(), masks.len());
    }
    images
        .iter()
        .zip(masks)
        .map(|(ip, mp)| {
            let image = read_image(ip)?;
            let mask = read_support_mask(mp, class_value)?;
            if (mask.width(), mask.height()) != image.dimensions() {
                bail!(
                    "{}: mask is {}x{} but its image {} is {}x{}; a mask must have its image's size",
                    mp.display(),
                    mask.width(),
                    mask.height(),
                    ip.display(),
                    image.width(),
                    image.height()
                );
            }
            Ok(Support { image_path: ip.clone(), mask_path: mp.clone(), image, mask })
        })
        .collect()
}

/// Decodes a JPEG/PNG to RGB (EXIF orientation applied), naming the file on failure.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    if !path.exists() {
        bail!("{}: no such image file", path.display());
    }
    if path.is_dir() {
        bail!("{}: is a folder, not an image", path.display());
    }
    data::dataset::decode_image(path).with_context(|| format!("{}: cannot read image", path.display()))
}

/// Reads a support mask as 0 = background, 1 = object (ignore pixels become background, as the
/// official code does with support labels).
///
/// - PNG, no `class_value`: palette index 0 = background, 255 = ignore, other = object;
///   grayscale non-zero = object; RGB(A) non-black = object (alpha is not looked at).
/// - PNG with `class_value` V: value V = object, 255 = ignore, other = background (RGB masks hold
///   no class ids and are refused).
/// - A non-PNG image (a JPEG mask): max channel ≥ 128 = object (compression noise ignored).
///
/// Fails, naming the file, when it is not an image or has no object pixel.
pub fn read_support_mask(path: &Path, class_value: Option<u8>) -> Result<Label> {
    if !path.exists() {
        bail!("{}: no such mask file", path.display());
    }
    let raw = read_mask_png(path);
    let (label, color) = match raw {
        Ok(x) => x,
        Err(png_err) => {
            // Not a PNG: accept any other image format the image crate reads (JPEG masks).
            let is_png = std::fs::read(path)
                .map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
                .unwrap_or(false);
            if is_png {
                return Err(anyhow::Error::new(png_err).context(format!("{}: unreadable mask PNG", path.display())));
            }
            let img = data::dataset::decode_image(path).map_err(|e| {
                anyhow::anyhow!("{}: not an image (a mask must be a PNG, or at least a JPEG): {e}", path.display())
            })?;
            if class_value.is_some() {
                bail!("{}: --class-value needs a PNG mask (palette or grayscale); this file is not a PNG", path.display());
            }
            let (w, h) = img.dimensions();
            let data = img.pixels().map(|p| u8::from(p.0[0].max(p.0[1]).max(p.0[2]) >= 128)).collect();
            let label = Label::new(w, h, data);
            return non_empty(path, label, None);
        }
    };
    let data: Vec<u8> = match (class_value, color) {
        (Some(_), MaskColor::Rgb) => bail!(
            "{}: an RGB mask holds no class ids, so --class-value cannot pick one: use a palette or grayscale PNG, or drop --class-value (non-black = object)",
            path.display()
        ),
        (Some(v), _) => label.data().iter().map(|&x| u8::from(x == v)).collect(),
        (None, MaskColor::Indexed) => label.data().iter().map(|&x| u8::from(x != 0 && x != IGNORE)).collect(),
        (None, _) => label.data().iter().map(|&x| u8::from(x != 0)).collect(),
    };
    let raw_values = label.values_present();
    non_empty(path, Label::new(label.width(), label.height(), data), Some((class_value, raw_values)))
}

fn non_empty(path: &Path, label: Label, info: Option<(Option<u8>, Vec<u8>)>) -> Result<Label> {
    if label.data().iter().any(|&v| v == 1) {
        return Ok(label);
    }
    let values = |vals: &[u8]| vals.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ");
    match info {
        Some((Some(v), vals)) => bail!(
            "{}: empty mask: no pixel has the value {v} given by --class-value (values present: {})",
            path.display(),
            values(&vals)
        ),
        Some((None, vals)) => bail!(
            "{}: empty mask: no object pixel (values present: {}; 0 = background, 255 in a palette PNG = ignore)",
            path.display(),
            values(&vals)
        ),
        None => bail!("{}: empty mask: no object pixel (no pixel reaches 128)", path.display()),
    }
}

fn check_size(size: u32) -> Result<()> {
    if size < 32 || size % 32 != 0 || size > 4096 {
        bail!("--size {size}: the input side must be a multiple of 32 (the backbone's stride) between 32 and 4096");
    }
    Ok(())
}

/// The query images: `query` itself, or every .jpg/.jpeg/.png in the folder, sorted by name,
/// skipping `*_mask.*` files (and `*_overlay.*`, our own outputs). Two queries with one stem would overwrite each other's outputs
/// and are refused.
pub fn collect_queries(query: &Path) -> Result<Vec<PathBuf>> {
    if !query.exists() {
        bail!("{}: no such query image or folder", query.display());
    }
    let files = if query.is_dir() {
        let mut v = Vec::new();
        for entry in std::fs::read_dir(query).with_context(|| format!("{}: cannot list folder", query.display()))? {
            let p = entry.with_context(|| format!("{}: cannot list folder", query.display()))?.path();
            let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            let is_image = matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png"));
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if p.is_file() && is_image && !stem.ends_with("_mask") && !stem.ends_with("_overlay") {
                v.push(p);
            }
        }
        v.sort();
        if v.is_empty() {
            bail!("{}: no query image in this folder (looked for .jpg, .jpeg, .png whose names do not end in `_mask` or `_overlay`)", query.display());
        }
        v
    } else {
        vec![query.to_path_buf()]
    };
    let mut seen: HashMap<String, &PathBuf> = HashMap::new();
    for f in &files {
        let stem = stem_of(f)?;
        if let Some(prev) = seen.insert(stem.clone(), f) {
            bail!(
                "{} and {} share the name `{stem}`: their outputs would overwrite each other; rename one",
                prev.display(),
                f.display()
            );
        }
    }
    Ok(files)
}

fn stem_of(p: &Path) -> Result<String> {
    p.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .with_context(|| format!("{}: file name is not valid UTF-8", p.display()))
}

/// (1, 3, size, size) normalised tensor of an image resized bilinearly (Pillow-compatible).
fn image_tensor(img: &RgbImage, size: u32, device: &Device) -> Result<Tensor> {
    let resized = data::augment::resize_bilinear(img, size, size);
    images_to_tensor(&[&NormalizedImage::from_rgb(&resized)], device)
}

/// Runs the model on every query with the given supports and writes the PNGs into `out`.
pub fn run(model: &MmFormer, supports: &[Support], queries: &[PathBuf], out: &Path, size: Option<u32>) -> Result<Vec<QueryResult>> {
    let size = size.unwrap_or_else(|| model.meta.preset.input_size());
    check_size(size)?;
    if supports.is_empty() {
        bail!("at least one support is needed");
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create output folder", out.display()))?;
    let device = Device::Cpu;
    let s = size as usize;

    // Supports: once per run.
    let t = Instant::now();
    let mut support_feats = Vec::with_capacity(supports.len());
    let mut support_labels = Vec::with_capacity(supports.len());
    for sup in supports {
        let (img, lab) = data::test_view(&sup.image, &sup.mask, size);
        if !lab.data().contains(&1) {
            bail!(
                "{}: the object vanishes when the mask is resized to {size}x{size} (too small); use a larger --size or a mask with a larger object",
                sup.mask_path.display()
            );
        }
        let x = images_to_tensor(&[&NormalizedImage::from_rgb(&img)], &device)?;
        support_feats.push(model.support(&x).with_context(|| format!("{}: backbone", sup.image_path.display()))?);
        let l: Vec<f32> = lab.data().iter().map(|&v| f32::from(v == 1)).collect();
        support_labels.push(Tensor::from_vec(l, (1, s, s), &device)?);
    }
    eprintln!("{} support(s) encoded at {size}x{size} in {:.2} s", supports.len(), t.elapsed().as_secs_f64());

    let mut results = Vec::with_capacity(queries.len());
    for q in queries {
        let t = Instant::now();
        let img = read_image(q)?;
        let (w, h) = img.dimensions();
        let x = image_tensor(&img, size, &device)?;
        let pass = model.query(&x).with_context(|| format!("{}: backbone + POS", q.display()))?;
        let o = model
            .matching(&pass, &support_feats, &support_labels, (s, s))
            .with_context(|| format!("{}: mask matching", q.display()))?;
        let up = ops::resize::resize_bilinear(&o.out, (h as usize, w as usize), true)?;
        let mask01: Vec<u8> = up.gt(0.5)?.flatten_all()?.to_vec1::<u8>()?;
        let fg = mask01.iter().filter(|&&v| v == 1).count();
        let stem = stem_of(q)?;
        let mask_png = out.join(format!("{stem}_mask.png"));
        let overlay_png = out.join(format!("{stem}_overlay.png"));
        let mask255: Vec<u8> = mask01.iter().map(|&v| v * 255).collect();
        data::label::write_gray_png(&mask_png, w, h, &mask255)
            .with_context(|| format!("{}: cannot write", mask_png.display()))?;
        overlay(&img, &mask01)
            .save_with_format(&overlay_png, image::ImageFormat::Png)
            .with_context(|| format!("{}: cannot write", overlay_png.display()))?;
        let r = QueryResult {
            query: q.clone(),
            mask_png,
            overlay_png,
            foreground_pct: 100.0 * fg as f64 / (w as f64 * h as f64),
            size: (w, h),
            seconds: t.elapsed().as_secs_f64(),
        };
        println!("{}  {}x{}  foreground {:5.1}%  {:.2} s", q.display(), w, h, r.foreground_pct, r.seconds);
        results.push(r);
    }
    Ok(results)
}

/// The query with the prediction tinted red and its boundary drawn in solid red.
pub fn overlay(img: &RgbImage, mask01: &[u8]) -> RgbImage {
    let mut out = eval::tint(img, mask01, [255, 40, 40]);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let at = |x: usize, y: usize| mask01[y * w + x] == 1;
    for y in 0..h {
        for x in 0..w {
            if !at(x, y) {
                continue;
            }
            let edge = x == 0 || y == 0 || x + 1 == w || y + 1 == h || !at(x - 1, y) || !at(x + 1, y) || !at(x, y - 1) || !at(x, y + 1);
            if edge {
                out.put_pixel(x as u32, y as u32, image::Rgb([255, 0, 0]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::synthetic_model;
    use crate::pipeline::Preset;
    use data::label::write_gray_png;

    /// A fresh, empty scratch folder per test (removed again by [`Scratch`]'s drop).
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("xtask-predict-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn path(&self, f: &str) -> PathBuf {
            self.0.join(f)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn photo(w: u32, h: u32, seed: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 7 + y * 13 + seed * 31) % 256;
            image::Rgb([v as u8, (255 - v) as u8, ((x * y + seed) % 256) as u8])
        })
    }

    /// A gray 0/255 mask with a rectangle of object in the middle.
    fn write_rect_mask(path: &Path, w: u32, h: u32) {
        let data: Vec<u8> = (0..h)
            .flat_map(|y| (0..w).map(move |x| if x >= w / 4 && x < 3 * w / 4 && y >= h / 4 && y < 3 * h / 4 { 255 } else { 0 }))
            .collect();
        write_gray_png(path, w, h, &data).unwrap();
    }

    fn err_text(e: anyhow::Error) -> String {
        format!("{e:#}")
    }

    fn args(supports: &[PathBuf], masks: &[PathBuf], query: &Path, out: &Path, ckpt: &Path) -> PredictArgs {
        PredictArgs {
            checkpoint: ckpt.to_path_buf(),
            supports: supports.to_vec(),
            support_masks: masks.to_vec(),
            query: query.to_path_buf(),
            out: out.to_path_buf(),
            size: Some(64),
            class_value: None,
        }
    }

    #[test]
    fn count_mismatch_is_reported() {
        let d = Scratch::new("count");
        let a = args(&[d.path("a.jpg"), d.path("b.jpg")], &[d.path("a.png")], &d.path("q.jpg"), &d.path("out"), &d.path("m.safetensors"));
        let e = err_text(predict(&a).unwrap_err());
        assert!(e.contains("2 --support image(s) but 1 --support-mask"), "{e}");
        let e = err_text(read_supports(&[d.path("a.jpg")], &[], None).unwrap_err());
        assert!(e.contains("1 support image(s) but 0 support mask(s)"), "{e}");
    }

    #[test]
    fn missing_and_broken_images_are_named() {
        let d = Scratch::new("missing");
        write_rect_mask(&d.path("a.png"), 8, 8);
        let e = err_text(read_supports(&[d.path("nope.jpg")], &[d.path("a.png")], None).unwrap_err());
        assert!(e.contains("nope.jpg") && e.contains("no such image"), "{e}");
        std::fs::write(d.path("text.jpg"), "not a jpeg").unwrap();
        let e = err_text(read_supports(&[d.path("text.jpg")], &[d.path("a.png")], None).unwrap_err());
        assert!(e.contains("text.jpg") && e.contains("cannot read image"), "{e}");
        // A missing query is named before any model is loaded.
        photo(8, 8, 0).save(d.path("s.png")).unwrap();
        let a = args(&[d.path("s.png")], &[d.path("a.png")], &d.path("gone.jpg"), &d.path("out"), &d.path("m.safetensors"));
        let e = err_text(predict(&a).unwrap_err());
        assert!(e.contains("gone.jpg"), "{e}");
    }

    #[test]
    fn wrong_size_mask_names_the_mask() {
        let d = Scratch::new("size");
        photo(10, 8, 0).save(d.path("s.jpg")).unwrap();
        write_rect_mask(&d.path("s_mask.png"), 9, 8);
        let e = err_text(read_supports(&[d.path("s.jpg")], &[d.path("s_mask.png")], None).unwrap_err());
        assert!(e.contains("s_mask.png") && e.contains("mask is 9x8") && e.contains("is 10x8"), "{e}");
    }

    #[test]
    fn mask_pngs_gray_palette_rgb() {
        let d = Scratch::new("masks");
        // Grayscale: any non-zero value is the object (0/1 and 0/255 masks alike).
        write_gray_png(&d.path("g.png"), 4, 1, &[0, 1, 255, 0]).unwrap();
        assert_eq!(read_support_mask(&d.path("g.png"), None).unwrap().data(), &[0, 1, 1, 0]);
        assert_eq!(read_support_mask(&d.path("g.png"), Some(1)).unwrap().data(), &[0, 1, 0, 0]);
        // Palette: 0 = background, 255 = ignore (→ background), others = object; or one class.
        data::write_label_png(&d.path("p.png"), &Label::new(5, 1, vec![0, 7, 255, 3, 7])).unwrap();
        assert_eq!(read_support_mask(&d.path("p.png"), None).unwrap().data(), &[0, 1, 0, 1, 1]);
        assert_eq!(read_support_mask(&d.path("p.png"), Some(7)).unwrap().data(), &[0, 1, 0, 0, 1]);
        assert_eq!(read_support_mask(&d.path("p.png"), Some(3)).unwrap().data(), &[0, 0, 0, 1, 0]);
        let e = err_text(read_support_mask(&d.path("p.png"), Some(9)).unwrap_err());
        assert!(e.contains("p.png") && e.contains("value 9") && e.contains("0, 3, 7, 255"), "{e}");
        // RGB: non-black is the object; no class ids.
        let rgb = RgbImage::from_raw(3, 1, vec![0, 0, 0, 200, 0, 0, 0, 0, 1]).unwrap();
        rgb.save(d.path("c.png")).unwrap();
        assert_eq!(read_support_mask(&d.path("c.png"), None).unwrap().data(), &[0, 1, 1]);
        let e = err_text(read_support_mask(&d.path("c.png"), Some(1)).unwrap_err());
        assert!(e.contains("c.png") && e.contains("RGB"), "{e}");
        // A JPEG mask: thresholded at 128 against compression noise.
        let jpg = RgbImage::from_fn(16, 16, |x, _| if x < 8 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) });
        jpg.save(d.path("j.jpg")).unwrap();
        let m = read_support_mask(&d.path("j.jpg"), None).unwrap();
        assert_eq!(m.data().iter().filter(|&&v| v == 1).count(), 128);
    }

    #[test]
    fn bad_masks_are_named() {
        let d = Scratch::new("badmask");
        write_gray_png(&d.path("empty.png"), 3, 2, &[0; 6]).unwrap();
        let e = err_text(read_support_mask(&d.path("empty.png"), None).unwrap_err());
        assert!(e.contains("empty.png") && e.contains("empty mask"), "{e}");
        // Only ignore pixels in a palette mask is empty too.
        data::write_label_png(&d.path("ign.png"), &Label::new(2, 1, vec![0, 255])).unwrap();
        let e = err_text(read_support_mask(&d.path("ign.png"), None).unwrap_err());
        assert!(e.contains("ign.png") && e.contains("empty mask"), "{e}");
        std::fs::write(d.path("notes.png"), "hello").unwrap();
        let e = err_text(read_support_mask(&d.path("notes.png"), None).unwrap_err());
        assert!(e.contains("notes.png") && e.contains("not an image"), "{e}");
        let e = err_text(read_support_mask(&d.path("absent.png"), None).unwrap_err());
        assert!(e.contains("absent.png") && e.contains("no such mask"), "{e}");
        // A truncated PNG is a broken PNG, not "some other format".
        let mut bytes = std::fs::read(d.path("empty.png")).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(d.path("cut.png"), bytes).unwrap();
        let e = err_text(read_support_mask(&d.path("cut.png"), None).unwrap_err());
        assert!(e.contains("cut.png") && e.contains("unreadable mask PNG"), "{e}");
    }

    #[test]
    fn query_folders() {
        let d = Scratch::new("queries");
        std::fs::create_dir_all(d.path("q")).unwrap();
        for f in ["b.png", "a.JPG", "a_mask.png", "c.jpeg", "c_overlay.png"] {
            photo(4, 4, 0).save_with_format(d.path("q").join(f), if f.ends_with("png") { image::ImageFormat::Png } else { image::ImageFormat::Jpeg }).unwrap();
        }
        std::fs::write(d.path("q/readme.txt"), "x").unwrap();
        let got: Vec<String> = collect_queries(&d.path("q")).unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(got, ["a.JPG", "b.png", "c.jpeg"]);
        std::fs::create_dir_all(d.path("empty")).unwrap();
        std::fs::write(d.path("empty/x_mask.png"), "x").unwrap();
        let e = err_text(collect_queries(&d.path("empty")).unwrap_err());
        assert!(e.contains("empty") && e.contains("no query image"), "{e}");
        photo(4, 4, 0).save(d.path("q/b.jpg")).unwrap();
        let e = err_text(collect_queries(&d.path("q")).unwrap_err());
        assert!(e.contains("b.jpg") && e.contains("b.png") && e.contains("overwrite"), "{e}");
        let e = err_text(collect_queries(&d.path("nothing")).unwrap_err());
        assert!(e.contains("nothing") && e.contains("no such query"), "{e}");
    }

    /// Checks one output pair: original size, binary mask.
    fn check_outputs(r: &QueryResult, w: u32, h: u32) {
        assert_eq!(r.size, (w, h));
        let (m, color) = read_mask_png(&r.mask_png).unwrap();
        assert_eq!(color, MaskColor::Gray);
        assert_eq!((m.width(), m.height()), (w, h));
        assert!(m.data().iter().all(|&v| v == 0 || v == 255));
        let fg = m.data().iter().filter(|&&v| v == 255).count() as f64;
        assert!((100.0 * fg / (w * h) as f64 - r.foreground_pct).abs() < 1e-9);
        let o = image::open(&r.overlay_png).unwrap();
        assert_eq!((o.width(), o.height()), (w, h));
    }

    #[test]
    fn end_to_end_on_a_synthetic_model() {
        let d = Scratch::new("e2e");
        let model = synthetic_model(Preset::Cpu, 1).unwrap();
        photo(70, 50, 1).save(d.path("s1.jpg")).unwrap();
        write_rect_mask(&d.path("s1.png"), 70, 50);
        photo(40, 60, 2).save(d.path("s2.png")).unwrap();
        write_rect_mask(&d.path("s2_mask.png"), 40, 60);
        std::fs::create_dir_all(d.path("q")).unwrap();
        photo(45, 33, 3).save(d.path("q/one.jpg")).unwrap();
        photo(80, 64, 4).save(d.path("q/two.png")).unwrap();
        let supports = read_supports(&[d.path("s1.jpg"), d.path("s2.png")], &[d.path("s1.png"), d.path("s2_mask.png")], None).unwrap();
        let queries = collect_queries(&d.path("q")).unwrap();
        let out = d.path("out");
        let results = run(&model, &supports, &queries, &out, Some(64)).unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results.iter().map(|r| r.query.clone()).collect::<Vec<_>>(), queries);
        check_outputs(&results[0], 45, 33);
        check_outputs(&results[1], 80, 64);
        assert_eq!(results[0].mask_png, out.join("one_mask.png"));
        assert_eq!(results[1].overlay_png, out.join("two_overlay.png"));
        // 1-shot on the same query is a different episode but the same sizes.
        let r1 = run(&model, &supports[..1], &queries[..1], &out, Some(64)).unwrap();
        check_outputs(&r1[0], 45, 33);
        let e = err_text(run(&model, &supports, &queries, &out, Some(50)).unwrap_err());
        assert!(e.contains("multiple of 32"), "{e}");
    }

    #[test]
    fn checkpoint_errors_and_round_trip() {
        use crate::pipeline::model::{assemble, fresh_mm_tensors, save_model, ModelMeta};
        let d = Scratch::new("ckpt");
        photo(48, 40, 1).save(d.path("s.jpg")).unwrap();
        write_rect_mask(&d.path("s.png"), 48, 40);
        photo(30, 20, 2).save(d.path("q.jpg")).unwrap();
        let a = |ck: &Path| args(&[d.path("s.jpg")], &[d.path("s.png")], &d.path("q.jpg"), &d.path("out"), ck);
        // A safetensors file that holds something else.
        let t = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let bytes = safetensors::serialize(vec![("foo.weight", &t)], None).unwrap();
        std::fs::write(d.path("other.safetensors"), bytes).unwrap();
        let e = err_text(predict(&a(&d.path("other.safetensors"))).unwrap_err());
        assert!(e.contains("other.safetensors") && e.contains("not an MM-Former checkpoint"), "{e}");
        std::fs::write(d.path("junk.pth"), "junk").unwrap();
        let e = err_text(predict(&a(&d.path("junk.pth"))).unwrap_err());
        assert!(e.contains("junk.pth"), "{e}");
        let e = err_text(predict(&a(&d.path("absent.safetensors"))).unwrap_err());
        assert!(e.contains("absent.safetensors"), "{e}");

        let lite0 = backbone::assets::efficientnet_lite0_path();
        if !lite0.exists() {
            eprintln!("note: {} missing (cargo xtask fetch-assets): checkpoint round trip skipped", lite0.display());
            return;
        }
        let (vm, _) = crate::pipeline::stage1::new_pos(Preset::Cpu, &Device::Cpu).unwrap();
        let pos = crate::pipeline::stage1::varmap_tensors(&vm);
        let mm_cfg = Preset::Cpu.mm_config();
        let tensors = assemble(Preset::Cpu, &lite0, &pos, &fresh_mm_tensors(&mm_cfg).unwrap()).unwrap();
        let ck = d.path("model.safetensors");
        save_model(&ck, &ModelMeta::new(Preset::Cpu, &mm_cfg), &tensors).unwrap();
        predict(&a(&ck)).unwrap();
        let (m, _) = read_mask_png(&d.path("out/q_mask.png")).unwrap();
        assert_eq!((m.width(), m.height()), (30, 20));
        assert!(d.path("out/q_overlay.png").exists());
        // A stage-1 checkpoint alone (POS only) is refused with a reason.
        let st = safetensors::serialize(pos.iter().map(|(k, v)| (k.as_str(), v)).collect::<Vec<_>>(), None).unwrap();
        std::fs::write(d.path("pos_only.safetensors"), st).unwrap();
        let e = err_text(predict(&a(&d.path("pos_only.safetensors"))).unwrap_err());
        assert!(e.contains("pos_only.safetensors") && e.contains("backbone"), "{e}");
    }
}
