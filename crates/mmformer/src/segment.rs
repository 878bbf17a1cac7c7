//! Segmenting your own images: support images with masks in, a mask at the query's original
//! size out.
//!
//! Inputs follow the official test protocol (spec §1.1): every image is resized bilinearly to
//! size×size (aspect ratio not kept), support masks with torch-nearest. The supports are encoded
//! once ([`SupportSet`]); each query gets one backbone + POS pass whatever the number of shots.
//! The model's `out` is resized bilinearly (align_corners=True, as the official evaluator does)
//! to the query's original size; foreground ⇔ out > 0.5 (the argmax of `[1 − out, out]`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use data::label::{read_mask_png, MaskColor};
use data::{Label, NormalizedImage, IGNORE};
use image::RgbImage;
use mm::LevelFeatures;

use crate::error::{bail, Context, Result};
use crate::MmFormer;

/// One support: an image and its binary mask (0 = background, 1 = the object) of the same size.
#[derive(Clone, Debug)]
pub struct SupportImage {
    pub image: RgbImage,
    pub mask: Label,
    /// Where it came from, for error messages.
    pub name: String,
}

impl SupportImage {
    /// Checks that the mask has the image's size and some object pixel.
    pub fn new(image: RgbImage, mask: Label) -> Result<Self> {
        Self::named(image, mask, "support")
    }

    /// [`SupportImage::new`] with a name for errors (e.g. the mask's file).
    pub fn named(image: RgbImage, mask: Label, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if (mask.width(), mask.height()) != image.dimensions() {
            bail!(
                "{name}: mask is {}x{} but its image is {}x{}; a mask must have its image's size",
                mask.width(),
                mask.height(),
                image.width(),
                image.height()
            );
        }
        if mask.data().iter().any(|&v| v > 1) {
            bail!("{name}: a support mask holds 0 (background) and 1 (object) only; read masks with `read_support_mask`");
        }
        if !mask.data().contains(&1) {
            bail!("{name}: empty mask: no object pixel");
        }
        Ok(Self { image, mask, name })
    }

    /// Reads an image and its mask file (see [`read_support_mask`] for the mask formats).
    pub fn from_files(image: &Path, mask: &Path, class_value: Option<u8>) -> Result<Self> {
        let img = read_image(image)?;
        let m = read_support_mask(mask, class_value)?;
        if (m.width(), m.height()) != img.dimensions() {
            bail!(
                "{}: mask is {}x{} but its image {} is {}x{}; a mask must have its image's size",
                mask.display(),
                m.width(),
                m.height(),
                image.display(),
                img.width(),
                img.height()
            );
        }
        Self::named(img, m, mask.display().to_string())
    }
}

/// What one query gave.
#[derive(Clone, Debug)]
pub struct Segmentation {
    /// 0/1 at the query's original size.
    pub mask: Label,
    /// The model's foreground map `out` at the query's original size, row-major
    /// (foreground ⇔ > 0.5; not clipped to [0, 1]: it is `Σ c·M`).
    pub foreground: Vec<f32>,
    /// The matching coefficient of each proposal (the MLP's output, or one-hot for the
    /// heuristic matching).
    pub proposal_scores: Vec<f32>,
    /// Cosine similarity of each proposal's prototype with the support prototype.
    pub cosine: Vec<f32>,
}

impl Segmentation {
    /// Share of foreground pixels, in [0, 1].
    pub fn foreground_fraction(&self) -> f64 {
        let n = self.mask.data().len().max(1);
        self.mask.data().iter().filter(|&&v| v == 1).count() as f64 / n as f64
    }

    /// Writes the mask as an 8-bit grayscale PNG, 0 / 255.
    pub fn save_mask(&self, path: &Path) -> Result<()> {
        let m: Vec<u8> = self.mask.data().iter().map(|&v| v * 255).collect();
        data::label::write_gray_png(path, self.mask.width(), self.mask.height(), &m).with_context(|| format!("{}: cannot write", path.display()))
    }

    /// The query with the prediction tinted red and its boundary drawn in solid red.
    pub fn overlay(&self, query: &RgbImage) -> RgbImage {
        let mask01 = self.mask.data();
        let mut out = eval::tint(query, mask01, [255, 40, 40]);
        let (w, h) = (query.width() as usize, query.height() as usize);
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
}

/// Supports encoded once, ready for any number of queries.
pub struct SupportSet<'m> {
    model: &'m MmFormer,
    size: u32,
    /// Per shot: `[res5, res4, res3]` (1, C, h, w) and the (1, S, S) 0/1 label.
    features: Vec<LevelFeatures>,
    labels: Vec<Tensor>,
}

impl<'m> SupportSet<'m> {
    /// Encodes `supports` at `size`² (default: the model's preset, 480 paper / 256 cpu; a
    /// multiple of 32).
    pub fn new(model: &'m MmFormer, supports: &[SupportImage], size: Option<u32>) -> Result<Self> {
        let size = size.unwrap_or_else(|| model.input_size());
        check_size(size)?;
        if supports.is_empty() {
            bail!("at least one support image with its mask is needed");
        }
        let device = model.device();
        let s = size as usize;
        let mut features = Vec::with_capacity(supports.len());
        let mut labels = Vec::with_capacity(supports.len());
        for sup in supports {
            let (img, lab) = data::test_view(&sup.image, &sup.mask, size);
            if !lab.data().contains(&1) {
                bail!(
                    "{}: the object vanishes when the mask is resized to {size}x{size} (too small); use a larger size or a mask with a larger object",
                    sup.name
                );
            }
            let x = eval::images_to_tensor(&[&NormalizedImage::from_rgb(&img)], device)?;
            features.push(model.support(&x).with_context(|| format!("{}: backbone", sup.name))?);
            let l: Vec<f32> = lab.data().iter().map(|&v| f32::from(v == 1)).collect();
            labels.push(Tensor::from_vec(l, (1, s, s), device)?);
        }
        Ok(Self { model, size, features, labels })
    }

    /// The input side the supports were encoded at.
    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn shots(&self) -> usize {
        self.features.len()
    }

    /// Segments one query.
    pub fn segment(&self, query: &RgbImage) -> Result<Segmentation> {
        Ok(self.segment_batch(std::slice::from_ref(query))?.remove(0))
    }

    /// Segments several queries in one batched pass (backbone, POS and matching), the supports
    /// shared by all.
    pub fn segment_batch(&self, queries: &[RgbImage]) -> Result<Vec<Segmentation>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(q) = queries.iter().find(|q| q.width() == 0 || q.height() == 0) {
            bail!("a query image of {}x{} pixels has nothing to segment", q.width(), q.height());
        }
        let device = self.model.device();
        let s = self.size as usize;
        let views: Vec<NormalizedImage> =
            queries.iter().map(|q| NormalizedImage::from_rgb(&data::augment::resize_bilinear(q, self.size, self.size))).collect();
        let x = eval::images_to_tensor(&views.iter().collect::<Vec<_>>(), device)?;
        let pass = self.model.query(&x).context("backbone + POS")?;
        let b = queries.len();
        // The supports' tensors repeated along the batch, one copy per query.
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            dims[0] = b;
            Ok(t.broadcast_as(dims)?.contiguous()?)
        };
        let features = self
            .features
            .iter()
            .map(|f| Ok([repeat(&f[0])?, repeat(&f[1])?, repeat(&f[2])?]))
            .collect::<Result<Vec<LevelFeatures>>>()?;
        let labels = self.labels.iter().map(repeat).collect::<Result<Vec<_>>>()?;
        let o = self.model.matching(&pass, &features, &labels, (s, s)).context("mask matching")?;
        let cosine = o.cosine.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let coefficients = o.coefficients.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut results = Vec::with_capacity(b);
        for (i, q) in queries.iter().enumerate() {
            let (w, h) = q.dimensions();
            let up = ops::resize::resize_bilinear(&o.out.narrow(0, i, 1)?, (h as usize, w as usize), true)?;
            let foreground = up.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let mask = Label::new(w, h, foreground.iter().map(|&v| u8::from(v > 0.5)).collect());
            results.push(Segmentation { mask, foreground, proposal_scores: coefficients[i].clone(), cosine: cosine[i].clone() });
        }
        Ok(results)
    }
}

impl MmFormer {
    /// Segments the supports' class in `query` (at the model's preset size). For many queries
    /// with the same supports, build a [`SupportSet`] once instead.
    pub fn segment(&self, query: &RgbImage, supports: &[SupportImage]) -> Result<Segmentation> {
        SupportSet::new(self, supports, None)?.segment(query)
    }
}

/// An input side the backbones accept: a multiple of 32 between 32 and 4096.
pub fn check_size(size: u32) -> Result<()> {
    if size < 32 || size % 32 != 0 || size > 4096 {
        bail!("input size {size}: the input side must be a multiple of 32 (the backbone's stride) between 32 and 4096");
    }
    Ok(())
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
    let (label, color) = match read_mask_png(path) {
        Ok(x) => x,
        Err(png_err) => {
            // Not a PNG: accept any other image format the image crate reads (JPEG masks).
            let is_png = std::fs::read(path).map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n")).unwrap_or(false);
            if is_png {
                return Err(png_err).with_context(|| format!("{}: unreadable mask PNG", path.display()));
            }
            let img = data::dataset::decode_image(path)
                .map_err(|e| crate::Error::Invalid(format!("{}: not an image (a mask must be a PNG, or at least a JPEG): {e}", path.display())))?;
            if class_value.is_some() {
                bail!("{}: --class-value needs a PNG mask (palette or grayscale); this file is not a PNG", path.display());
            }
            let (w, h) = img.dimensions();
            let data = img.pixels().map(|p| u8::from(p.0[0].max(p.0[1]).max(p.0[2]) >= 128)).collect();
            return non_empty(path, Label::new(w, h, data), None);
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
    if label.data().contains(&1) {
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

/// The query images of a path: the file itself, or every .jpg/.jpeg/.png in the folder, sorted
/// by name, skipping `*_mask.*` files (and `*_overlay.*`, `predict`'s own outputs). Two queries
/// with one stem would overwrite each other's outputs and are refused.
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
    let mut seen: std::collections::HashMap<String, &PathBuf> = std::collections::HashMap::new();
    for f in &files {
        let stem = file_stem(f)?;
        if let Some(prev) = seen.insert(stem.clone(), f) {
            bail!("{} and {} share the name `{stem}`: their outputs would overwrite each other; rename one", prev.display(), f.display());
        }
    }
    Ok(files)
}

/// A file's stem as UTF-8, naming the file when it is not.
pub fn file_stem(p: &Path) -> Result<String> {
    p.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .with_context(|| format!("{}: file name is not valid UTF-8", p.display()))
}
