//! Synthetic few-shot dataset generator (VOC layout).
//!
//! The default demo/CI dataset: 40 classes built as 10 shape families × 4 textures × 4 shared
//! colour palettes (see [`classes`] for the layout that keeps every single cue ambiguous), placed
//! 1–4 per image with occlusion on cluttered backgrounds whose distractors use the same textures
//! and palettes. Labels carry a VOC-style 255 band around every object boundary.
//!
//! Output layout (what the PASCAL reader expects):
//! ```text
//! <out>/JPEGImages/<id>.jpg                 RGB JPEG
//! <out>/SegmentationClassAug/<id>.png       8-bit palette PNG (VOC colour map), value = class id,
//!                                           0 = background, 255 = ignore
//! <out>/ImageSets/Segmentation/train.txt    one id per line (also val.txt)
//! <out>/classes.txt                         class names, id = line index + 1
//! <out>/synthetic.json                      generator tag, format version, config, summary
//! ```
//! Classes split into 4 folds of contiguous ids: fold i novel = 10i+1..=10i+10.
//!
//! Every image's randomness comes from its own ChaCha stream keyed by (seed, split, index), so the
//! bytes written do not depend on thread count, scheduling or machine.

pub mod classes;
mod render;
mod rng;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

pub use crate::dataset::Split;
use serde::{Deserialize, Serialize};

pub use classes::{
    class_spec, class_specs, ClassSpec, Shape, Texture, CLASSES_PER_FOLD, NUM_CLASSES, NUM_FOLDS,
    PALETTES,
};
use render::SceneParams;
use rng::{Rng, STREAM_CLASS_ORDER, STREAM_TRAIN, STREAM_VAL};

/// Bumped whenever the generator's output for a given config changes, so stale folders are
/// regenerated instead of reused.
pub const FORMAT_VERSION: u32 = 1;
/// Identifies folders this module wrote; only those are ever replaced.
pub const GENERATOR_TAG: &str = "mmformer-rs synthetic";
/// The PFENet list rule: an (image, class) pair counts when the class covers at least 2·32·32 px.
pub const LIST_MIN_PIXELS: u64 = 2 * 32 * 32;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SyntheticConfig {
    pub seed: u64,
    pub num_train: usize,
    pub num_val: usize,
    /// (width, height) in pixels.
    pub image_size: (u32, u32),
    /// Inclusive range of labelled objects per image.
    pub objects_per_image: (u32, u32),
    /// Inclusive range of background distractor shapes per image.
    pub distractors_per_image: (u32, u32),
    /// Half-width in pixels of the 255 band around object boundaries (VOC's band is ~5 px wide).
    pub ignore_border: u32,
    /// Every image's assigned class keeps at least this many labelled pixels (it must exceed
    /// [`LIST_MIN_PIXELS`] for the reader's lists to include it).
    pub min_primary_pixels: u32,
    pub jpeg_quality: u8,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            seed: 20_240_521,
            num_train: 1600,
            num_val: 400,
            image_size: (256, 256),
            objects_per_image: (1, 4),
            distractors_per_image: (2, 6),
            ignore_border: 2,
            min_primary_pixels: 2800,
            jpeg_quality: 90,
        }
    }
}

impl SyntheticConfig {
    pub fn validate(&self) -> Result<(), SyntheticError> {
        let bad = |msg: String| Err(SyntheticError::InvalidConfig(msg));
        let (w, h) = self.image_size;
        if w < 32 || h < 32 || w > 4096 || h > 4096 {
            return bad(format!(
                "image_size {w}x{h} must be within 32..=4096 on both sides"
            ));
        }
        if self.num_train == 0 || self.num_val == 0 {
            return bad("num_train and num_val must both be at least 1".into());
        }
        if self.num_train > 10_000_000 || self.num_val > 10_000_000 {
            return bad("at most 10,000,000 images per split".into());
        }
        let (lo, hi) = self.objects_per_image;
        // Instance ids are stored in a u8 next to distractors; 16 keeps scenes readable anyway.
        if lo == 0 || lo > hi || hi > 16 {
            return bad(format!(
                "objects_per_image ({lo}, {hi}) must satisfy 1 <= min <= max <= 16"
            ));
        }
        let (dlo, dhi) = self.distractors_per_image;
        if dlo > dhi || dhi > 64 {
            return bad(format!(
                "distractors_per_image ({dlo}, {dhi}) must satisfy min <= max <= 64"
            ));
        }
        if self.ignore_border > 16 {
            return bad(format!("ignore_border {} is above 16", self.ignore_border));
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return bad(format!(
                "jpeg_quality {} is outside 1..=100",
                self.jpeg_quality
            ));
        }
        if !render::primary_fits(&self.scene()) {
            return bad(format!(
                "min_primary_pixels {} is too large for {w}x{h} images (needs {:.0}% of the image)",
                self.min_primary_pixels,
                100.0 * render::PRIMARY_HEADROOM * self.min_primary_pixels as f64
                    / (w as f64 * h as f64)
            ));
        }
        Ok(())
    }

    fn scene(&self) -> SceneParams {
        SceneParams {
            width: self.image_size.0,
            height: self.image_size.1,
            objects: self.objects_per_image,
            distractors: self.distractors_per_image,
            ignore_border: self.ignore_border,
            min_primary_pixels: self.min_primary_pixels,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SyntheticSummary {
    pub num_classes: usize,
    pub num_train: usize,
    pub num_val: usize,
    /// Total size of the files written, synthetic.json excluded.
    pub bytes_on_disk: u64,
    /// Index c = class id c+1: train images in which the class covers >= LIST_MIN_PIXELS px.
    pub train_images_per_class: Vec<usize>,
    /// Same for val.
    pub val_images_per_class: Vec<usize>,
    /// Fraction of all label pixels that are 255 (the ignore band), to 6 decimals.
    pub ignore_fraction: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error("invalid synthetic config: {0}")]
    InvalidConfig(String),
    #[error("I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("PNG encoding failed for {path}: {source}")]
    Png {
        path: PathBuf,
        source: png::EncodingError,
    },
    #[error("PNG decoding failed for {path}: {source}")]
    PngDecode {
        path: PathBuf,
        source: png::DecodingError,
    },
    #[error("image coding failed for {path}: {source}")]
    Image {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("JSON error in {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0} exists, is not empty and was not written by the synthetic generator; refusing to replace it")]
    NotSynthetic(PathBuf),
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SyntheticError + '_ {
    move |source| SyntheticError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Class names in id order (id = index + 1), e.g. `"star-stripes-ocean"`.
pub fn class_names() -> Vec<String> {
    class_specs().iter().map(ClassSpec::name).collect()
}

/// The novel classes of `fold` (contiguous ids); `None` for fold >= NUM_FOLDS.
pub fn fold_classes(fold: usize) -> Option<Vec<u8>> {
    (fold < NUM_FOLDS).then(|| {
        let first = fold * CLASSES_PER_FOLD + 1;
        (first..first + CLASSES_PER_FOLD).map(|c| c as u8).collect()
    })
}

/// The split's own ChaCha stream tag, so train and val images never share randomness.
fn split_stream(split: Split) -> u64 {
    match split {
        Split::Train => STREAM_TRAIN,
        Split::Val => STREAM_VAL,
    }
}

/// File stem of image `index` of `split`, e.g. `train_000042`.
pub fn image_id(split: Split, index: usize) -> String {
    format!("{split}_{index:06}")
}

/// The VOC colour map (the bit-interleaving scheme of the VOC devkit): 256 RGB triples.
pub fn voc_palette() -> Vec<u8> {
    let mut pal = Vec::with_capacity(768);
    for i in 0..256u32 {
        let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
        let mut c = i;
        for j in 0..8 {
            r |= ((c & 1) as u8) << (7 - j);
            g |= (((c >> 1) & 1) as u8) << (7 - j);
            b |= (((c >> 2) & 1) as u8) << (7 - j);
            c >>= 3;
        }
        pal.extend_from_slice(&[r, g, b]);
    }
    pal
}

/// Class assigned to image `index` of `split`: classes are dealt in shuffled blocks of
/// NUM_CLASSES, so every class is the guaranteed-visible class of equally many images.
fn primary_class(seed: u64, split: Split, index: usize) -> u8 {
    let block = (index / NUM_CLASSES) as u64;
    let mut rng = Rng::for_stream(
        seed,
        STREAM_CLASS_ORDER,
        (split_stream(split) << 40) | block,
    );
    let mut order: Vec<u8> = (1..=NUM_CLASSES as u8).collect();
    rng.shuffle(&mut order);
    order[index % NUM_CLASSES]
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    generator: String,
    format_version: u32,
    config: SyntheticConfig,
    classes: Vec<String>,
    summary: SyntheticSummary,
}

const MANIFEST: &str = "synthetic.json";

/// Per-image result: pixel counts per label value.
struct ImageStats {
    class_pixels: [u64; NUM_CLASSES + 1],
    ignore_pixels: u64,
}

fn encode_label_png(label: &[u8], w: u32, h: u32, path: &Path) -> Result<Vec<u8>, SyntheticError> {
    let map = |source| SyntheticError::Png {
        path: path.to_path_buf(),
        source,
    };
    let mut buf = Vec::new();
    let mut enc = png::Encoder::new(&mut buf, w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(voc_palette());
    enc.set_compression(png::Compression::Best);
    let mut writer = enc.write_header().map_err(map)?;
    writer.write_image_data(label).map_err(map)?;
    writer.finish().map_err(map)?;
    Ok(buf)
}

fn encode_jpeg(
    rgb: &[u8],
    w: u32,
    h: u32,
    quality: u8,
    path: &Path,
) -> Result<Vec<u8>, SyntheticError> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode(rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|source| SyntheticError::Image {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(buf)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SyntheticError> {
    fs::write(path, bytes).map_err(io_err(path))
}

fn make_image(
    cfg: &SyntheticConfig,
    root: &Path,
    split: Split,
    index: usize,
) -> Result<ImageStats, SyntheticError> {
    let (w, h) = cfg.image_size;
    let primary = primary_class(cfg.seed, split, index);
    let mut rng = Rng::for_stream(cfg.seed, split_stream(split), index as u64);
    let out = render::render(&mut rng, &cfg.scene(), primary);

    let id = image_id(split, index);
    let jpg = root.join("JPEGImages").join(format!("{id}.jpg"));
    let png_path = root.join("SegmentationClassAug").join(format!("{id}.png"));
    write_file(&jpg, &encode_jpeg(&out.rgb, w, h, cfg.jpeg_quality, &jpg)?)?;
    write_file(&png_path, &encode_label_png(&out.label, w, h, &png_path)?)?;

    let mut stats = ImageStats {
        class_pixels: [0; NUM_CLASSES + 1],
        ignore_pixels: 0,
    };
    for &l in &out.label {
        match l {
            255 => stats.ignore_pixels += 1,
            c => stats.class_pixels[c as usize] += 1,
        }
    }
    Ok(stats)
}

fn dir_size(dir: &Path) -> Result<u64, SyntheticError> {
    let mut total = 0;
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let meta = entry.metadata().map_err(io_err(&path))?;
        total += if meta.is_dir() {
            dir_size(&path)?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Reads `<out>/synthetic.json` if it is there: `Ok(None)` when absent, the raw JSON otherwise.
fn read_manifest_value(out: &Path) -> Result<Option<serde_json::Value>, SyntheticError> {
    let path = out.join(MANIFEST);
    match fs::read(&path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SyntheticError::Io { path, source: e }),
    }
}

/// The stored summary if `out` holds a complete dataset generated from exactly `cfg` (what
/// [`generate`] would reuse), else `None`. Reads only the manifest and the list files.
pub fn existing_summary(
    cfg: &SyntheticConfig,
    out: &Path,
) -> Result<Option<SyntheticSummary>, SyntheticError> {
    if !out.is_dir() {
        return Ok(None);
    }
    let Some(value) = read_manifest_value(out)? else {
        return Ok(None);
    };
    let Ok(m) = serde_json::from_value::<Manifest>(value) else {
        return Ok(None);
    };
    if m.generator != GENERATOR_TAG || m.format_version != FORMAT_VERSION || &m.config != cfg {
        return Ok(None);
    }
    // Cheap completeness check: list lengths and the last file of each split.
    for (split, n) in [(Split::Train, cfg.num_train), (Split::Val, cfg.num_val)] {
        let list = out
            .join("ImageSets/Segmentation")
            .join(format!("{split}.txt"));
        let Ok(text) = fs::read_to_string(&list) else {
            return Ok(None);
        };
        let last = image_id(split, n - 1);
        if text.lines().count() != n
            || !out.join("JPEGImages").join(format!("{last}.jpg")).is_file()
            || !out
                .join("SegmentationClassAug")
                .join(format!("{last}.png"))
                .is_file()
        {
            return Ok(None);
        }
    }
    Ok(Some(m.summary))
}

/// Whether `out` may be replaced: absent, empty, or carrying our generator tag.
fn replaceable(out: &Path) -> Result<bool, SyntheticError> {
    if !out.exists() {
        return Ok(true);
    }
    if let Some(v) = read_manifest_value(out)? {
        if v.get("generator").and_then(|g| g.as_str()) == Some(GENERATOR_TAG) {
            return Ok(true);
        }
    }
    if out.is_dir() {
        return Ok(fs::read_dir(out).map_err(io_err(out))?.next().is_none());
    }
    Ok(false)
}

/// Sibling path `<parent>/.<name>.<tag>-<pid>-<nanos>` for temporary and retired folders.
fn sibling(out: &Path, tag: &str) -> PathBuf {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "synthetic".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    parent.join(format!(".{name}.{tag}-{}-{nanos}", std::process::id()))
}

/// Writes the dataset atomically (into a temporary sibling folder, then renamed to `out`), or
/// returns the stored summary unchanged if `<out>/synthetic.json` matches `cfg` (reuse).
///
/// `progress(done, total)` is called from worker threads as images complete.
/// An existing `out` is replaced only if it was written by this generator or is empty.
pub fn generate(
    cfg: &SyntheticConfig,
    out: &Path,
    progress: Option<&(dyn Fn(usize, usize) + Sync)>,
) -> Result<SyntheticSummary, SyntheticError> {
    cfg.validate()?;
    if out.exists() && !out.is_dir() {
        return Err(SyntheticError::NotSynthetic(out.to_path_buf()));
    }
    if let Some(summary) = existing_summary(cfg, out)? {
        return Ok(summary);
    }
    if !replaceable(out)? {
        return Err(SyntheticError::NotSynthetic(out.to_path_buf()));
    }
    let tmp = sibling(out, "tmp");
    let result = write_dataset(cfg, &tmp, progress).and_then(|summary| {
        swap_into_place(&tmp, out)?;
        Ok(summary)
    });
    if result.is_err() {
        // Best effort: a leftover hidden temp folder is harmless, the error is what matters.
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn swap_into_place(tmp: &Path, out: &Path) -> Result<(), SyntheticError> {
    if !out.exists() {
        return fs::rename(tmp, out).map_err(io_err(out));
    }
    // rename(2) cannot replace a non-empty directory: retire the old one first, and put it back
    // if the new one cannot take its place.
    let old = sibling(out, "old");
    fs::rename(out, &old).map_err(io_err(out))?;
    if let Err(e) = fs::rename(tmp, out) {
        let _ = fs::rename(&old, out);
        return Err(SyntheticError::Io {
            path: out.to_path_buf(),
            source: e,
        });
    }
    fs::remove_dir_all(&old).map_err(io_err(&old))
}

fn write_dataset(
    cfg: &SyntheticConfig,
    root: &Path,
    progress: Option<&(dyn Fn(usize, usize) + Sync)>,
) -> Result<SyntheticSummary, SyntheticError> {
    for sub in [
        "JPEGImages",
        "SegmentationClassAug",
        "ImageSets/Segmentation",
    ] {
        let d = root.join(sub);
        fs::create_dir_all(&d).map_err(io_err(&d))?;
    }
    let jobs: Vec<(Split, usize)> = (0..cfg.num_train)
        .map(|i| (Split::Train, i))
        .chain((0..cfg.num_val).map(|i| (Split::Val, i)))
        .collect();
    let total = jobs.len();
    let done = AtomicUsize::new(0);
    let stats: Vec<ImageStats> = jobs
        .par_iter()
        .map(|&(split, i)| {
            let s = make_image(cfg, root, split, i)?;
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(p) = progress {
                p(n, total);
            }
            Ok(s)
        })
        .collect::<Result<_, SyntheticError>>()?;

    let mut train_counts = vec![0usize; NUM_CLASSES];
    let mut val_counts = vec![0usize; NUM_CLASSES];
    let mut ignore = 0u64;
    for (&(split, _), s) in jobs.iter().zip(&stats) {
        ignore += s.ignore_pixels;
        let counts = if split == Split::Train {
            &mut train_counts
        } else {
            &mut val_counts
        };
        for c in 1..=NUM_CLASSES {
            if s.class_pixels[c] >= LIST_MIN_PIXELS {
                counts[c - 1] += 1;
            }
        }
    }

    for (split, n) in [(Split::Train, cfg.num_train), (Split::Val, cfg.num_val)] {
        let path = root
            .join("ImageSets/Segmentation")
            .join(format!("{split}.txt"));
        let mut text = String::with_capacity(n * 14);
        for i in 0..n {
            text.push_str(&image_id(split, i));
            text.push('\n');
        }
        write_file(&path, text.as_bytes())?;
    }
    let names = class_names();
    let classes_path = root.join("classes.txt");
    write_file(&classes_path, (names.join("\n") + "\n").as_bytes())?;

    let (w, h) = cfg.image_size;
    let summary = SyntheticSummary {
        num_classes: NUM_CLASSES,
        num_train: cfg.num_train,
        num_val: cfg.num_val,
        bytes_on_disk: dir_size(root)?,
        train_images_per_class: train_counts,
        val_images_per_class: val_counts,
        // Rounded to 6 decimals: short decimals survive the JSON round trip bit-exactly, so a
        // reused summary compares equal to the one first returned.
        ignore_fraction: libm::round(1e6 * ignore as f64 / (total as f64 * w as f64 * h as f64))
            / 1e6,
    };
    let manifest = Manifest {
        generator: GENERATOR_TAG.into(),
        format_version: FORMAT_VERSION,
        config: cfg.clone(),
        classes: names,
        summary: summary.clone(),
    };
    let mpath = root.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| SyntheticError::Json {
        path: mpath.clone(),
        source,
    })?;
    // Written last: its presence marks a finished dataset.
    let mut f = fs::File::create(&mpath).map_err(io_err(&mpath))?;
    f.write_all(&json).map_err(io_err(&mpath))?;
    f.sync_all().map_err(io_err(&mpath))?;
    Ok(summary)
}

/// Reads a label PNG's raw palette indices (no palette expansion): (width, height, indices).
pub fn read_label_png(path: &Path) -> Result<(u32, u32, Vec<u8>), SyntheticError> {
    let dec_err = |source| SyntheticError::PngDecode {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(io_err(path))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(dec_err)?;
    let info = reader.info();
    if info.color_type != png::ColorType::Indexed || info.bit_depth != png::BitDepth::Eight {
        return Err(SyntheticError::Format {
            path: path.to_path_buf(),
            msg: format!(
                "expected an 8-bit palette PNG, found {:?} {:?}",
                info.color_type, info.bit_depth
            ),
        });
    }
    let (w, h) = (info.width, info.height);
    // The frame is allocated from the header: check its size first (see `crate::limits`).
    crate::limits::check_pixels(path, "label PNG", w as u64, h as u64)
        .map_err(|e| SyntheticError::Format { path: path.to_path_buf(), msg: e.to_string() })?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).map_err(dec_err)?;
    // A label cut short after its image data is still a truncated file.
    reader.finish().map_err(dec_err)?;
    buf.truncate(frame.buffer_size());
    Ok((w, h, buf))
}

/// Tiles the first `count` images of `split` from a generated dataset as rows of
/// (image | label in VOC colours | label blended over the image) into an RGB PNG at `dest`, for
/// eyeballing what the generator produces.
pub fn write_contact_sheet(
    dataset: &Path,
    split: Split,
    count: usize,
    dest: &Path,
) -> Result<(), SyntheticError> {
    let list = dataset
        .join("ImageSets/Segmentation")
        .join(format!("{split}.txt"));
    let text = fs::read_to_string(&list).map_err(io_err(&list))?;
    let ids: Vec<&str> = text.lines().filter(|l| !l.is_empty()).take(count).collect();
    if ids.is_empty() {
        return Err(SyntheticError::Format {
            path: list,
            msg: "no image ids".into(),
        });
    }
    let pal = voc_palette();
    let mut rows = Vec::new();
    for id in &ids {
        let jpg = dataset.join("JPEGImages").join(format!("{id}.jpg"));
        let img = image::open(&jpg)
            .map_err(|source| SyntheticError::Image {
                path: jpg.clone(),
                source,
            })?
            .to_rgb8();
        let (w, h, label) = read_label_png(
            &dataset
                .join("SegmentationClassAug")
                .join(format!("{id}.png")),
        )?;
        if (w, h) != img.dimensions() {
            return Err(SyntheticError::Format {
                path: jpg,
                msg: "image and label sizes differ".into(),
            });
        }
        rows.push((img, label, w, h));
    }
    let (cw, ch) = (
        rows.iter().map(|r| r.2).max().unwrap_or(1),
        rows.iter().map(|r| r.3).max().unwrap_or(1),
    );
    let gap = 4;
    let mut sheet = image::RgbImage::from_pixel(
        3 * cw + 2 * gap,
        rows.len() as u32 * (ch + gap),
        image::Rgb([255, 255, 255]),
    );
    for (r, (img, label, w, h)) in rows.iter().enumerate() {
        let oy = r as u32 * (ch + gap);
        for y in 0..*h {
            for x in 0..*w {
                let p = img.get_pixel(x, y).0;
                let l = label[(y * w + x) as usize] as usize;
                let c = [pal[3 * l], pal[3 * l + 1], pal[3 * l + 2]];
                let blend = if l == 0 {
                    p
                } else {
                    [
                        ((p[0] as u16 + c[0] as u16) / 2) as u8,
                        ((p[1] as u16 + c[1] as u16) / 2) as u8,
                        ((p[2] as u16 + c[2] as u16) / 2) as u8,
                    ]
                };
                sheet.put_pixel(x, oy + y, image::Rgb(p));
                sheet.put_pixel(cw + gap + x, oy + y, image::Rgb(c));
                sheet.put_pixel(2 * (cw + gap) + x, oy + y, image::Rgb(blend));
            }
        }
    }
    sheet.save(dest).map_err(|source| SyntheticError::Image {
        path: dest.to_path_buf(),
        source,
    })
}
