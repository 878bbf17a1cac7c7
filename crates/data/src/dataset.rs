//! The dataset model shared by all readers: samples with their class areas, folds, and the
//! PFENet fold lists.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{io_err, one_line, DataError, Result};
use crate::label::{read_label_png, Label, MaskEncoding, IGNORE};

/// Class ids are 1-based; 0 is background. `u16` because FSS-1000 has 1000 classes (their labels
/// are single-object masks, so pixel values stay `u8`).
pub type ClassId = u16;

/// PFENet list rule: a class counts in an image only if it covers at least 2*32*32 pixels at
/// original resolution.
pub const PFENET_MIN_CLASS_PIXELS: u64 = 2 * 32 * 32;

/// The 20 PASCAL VOC classes in id order (id = index + 1).
pub const VOC_CLASSES: [&str; 20] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
];

/// Official per-fold test seeds (spec §4.5).
pub const PASCAL_TEST_SEEDS: [u64; 4] = [4604572, 7743485, 5448843, 2534673];
pub const COCO_TEST_SEEDS: [u64; 4] = [8420323, 27163933, 8162312, 3391510];
pub const COCO_TO_PASCAL_TEST_SEED: u64 = 321;

/// Which split of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
        })
    }
}

/// What kind of benchmark a dataset is; picks the default test seeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DatasetKind {
    Pascal,
    Coco,
    CocoToPascal,
    Fss,
    Folder,
    /// Anything else in the VOC layout (e.g. the synthetic dataset).
    Other,
}

/// How classes are split into 4 folds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FoldScheme {
    /// Fold i novel = contiguous block i of K/4 classes (PASCAL-5i when K = 20). For K not a
    /// multiple of 4, block i is `[i*K/4, (i+1)*K/4)` with integer division.
    Contiguous,
    /// Fold i novel = {c : (c - 1) % 4 == i} (COCO-20i, the PFENet/CyCTR "use_split_coco").
    Interleaved,
    /// Explicit novel sets per fold (e.g. COCO->PASCAL).
    Explicit(Vec<Vec<ClassId>>),
}

impl FoldScheme {
    /// Novel classes per fold for `num_classes` classes.
    pub fn novel_sets(&self, num_classes: usize) -> Vec<Vec<ClassId>> {
        let k = num_classes;
        match self {
            FoldScheme::Contiguous => (0..4)
                .map(|i| ((i * k / 4 + 1)..=((i + 1) * k / 4)).map(|c| c as ClassId).collect())
                .collect(),
            FoldScheme::Interleaved => {
                (0..4).map(|i| (1..=k).filter(|c| (c - 1) % 4 == i).map(|c| c as ClassId).collect()).collect()
            }
            FoldScheme::Explicit(sets) => sets.clone(),
        }
    }

    /// COCO->PASCAL (spec §5.5): PASCAL classes inside COCO-20i fold i's novel set.
    pub fn coco_to_pascal() -> Self {
        let names: [&[&str]; 4] = [
            &["aeroplane", "boat", "chair", "diningtable", "dog", "person"],
            &["bicycle", "bus", "horse", "sofa"],
            &["bird", "car", "pottedplant", "sheep", "train", "tvmonitor"],
            &["bottle", "cat", "cow", "motorbike"],
        ];
        FoldScheme::Explicit(
            names
                .iter()
                .map(|fold| {
                    fold.iter()
                        .map(|n| VOC_CLASSES.iter().position(|v| v == n).expect("VOC name") as ClassId + 1)
                        .collect()
                })
                .collect(),
        )
    }
}

/// Where a sample's pixels come from.
#[derive(Clone, Debug)]
pub enum SampleSource {
    /// An image file and a mask PNG.
    Files { image: PathBuf, label: PathBuf, encoding: MaskEncoding },
    /// Already decoded (e.g. arrays from an .npz file).
    Memory { image: Arc<RgbImage>, label: Arc<Label> },
}

/// One class present in a sample, with the label value that marks it and its pixel count at
/// original resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassPresence {
    pub class_id: ClassId,
    pub value: u8,
    pub pixels: u64,
}

/// One image of a split, with the classes found in its label.
#[derive(Clone, Debug)]
pub struct SampleRecord {
    /// Unique within the split (VOC: the image id; FSS: `class/n`).
    pub id: String,
    pub source: SampleSource,
    /// `Some(c)`: a single-object mask whose value 1 is class `c`. `None`: values are class ids.
    pub object_class: Option<ClassId>,
    /// Classes present (any pixel), ascending class id.
    pub classes: Vec<ClassPresence>,
}

impl SampleRecord {
    /// The label value that marks `class` in this sample's label.
    pub fn value_of(&self, class: ClassId) -> Option<u8> {
        match self.object_class {
            Some(c) => (c == class).then_some(1),
            None => (1..=254).contains(&class).then_some(class as u8),
        }
    }

    /// The class a label value stands for (0 and 255 stand for none).
    pub fn class_of(&self, value: u8) -> Option<ClassId> {
        match (value, self.object_class) {
            (0 | IGNORE, _) => None,
            (1, Some(c)) => Some(c),
            (_, Some(_)) => None,
            (v, None) => Some(v as ClassId),
        }
    }

    /// Pixel count of `class` at original resolution (0 if absent).
    pub fn pixels_of(&self, class: ClassId) -> u64 {
        self.classes.iter().find(|p| p.class_id == class).map_or(0, |p| p.pixels)
    }

    /// A short description of where the sample lives, for error messages.
    pub fn describe(&self) -> String {
        match &self.source {
            SampleSource::Files { image, .. } => image.display().to_string(),
            SampleSource::Memory { .. } => format!("{} (in memory)", self.id),
        }
    }

    /// Decodes the image and label; checks that their sizes agree.
    pub fn load(&self) -> Result<(RgbImage, Label)> {
        match &self.source {
            SampleSource::Memory { image, label } => Ok(((**image).clone(), (**label).clone())),
            SampleSource::Files { image, label, encoding } => {
                let img = decode_image(image)?;
                let lab = read_label_png(label, encoding)?;
                if (lab.width(), lab.height()) != (img.width(), img.height()) {
                    return Err(DataError::SizeMismatch {
                        path: label.clone(),
                        image: image.clone(),
                        mask_w: lab.width(),
                        mask_h: lab.height(),
                        image_w: img.width(),
                        image_h: img.height(),
                    });
                }
                Ok((img, lab))
            }
        }
    }
}

/// Decodes any JPEG/PNG image to 8-bit RGB, applying its EXIF orientation as detectron2's
/// `read_image` does (phone photos are often stored rotated; their masks are drawn upright).
///
/// Hostile or broken files are refused with an error naming the file: a declared size over the
/// pixel limit ([`crate::limits`]) before the frame is allocated, and a JPEG or PNG that stops
/// short of its end marker (the JPEG decoder would otherwise fill the missing part in).
pub fn decode_image(path: &Path) -> Result<RgbImage> {
    use image::ImageDecoder;
    let bad = |e: image::ImageError| DataError::ImageDecode { path: path.to_path_buf(), reason: one_line(e) };
    let limit = crate::limits::max_pixels()?;
    let (mut decoder, format) = open_image_decoder(path, limit)?;
    let (w, h) = decoder.dimensions();
    crate::limits::check_pixels_within(path, "image", w as u64, h as u64, limit)?;
    check_image_complete(path, format)?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(bad)?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// A decoder for `path` (format from the content, else the extension) with `image`'s own
/// allocation limit set to what `max_pixels` pixels of the widest colour type (16-bit RGBA) need,
/// so the decoder's internal buffers are bounded too.
fn open_image_decoder(path: &Path, max_pixels: u64) -> Result<(impl image::ImageDecoder, Option<image::ImageFormat>)> {
    let bad = |e: image::ImageError| DataError::ImageDecode { path: path.to_path_buf(), reason: one_line(e) };
    let mut reader = image::ImageReader::open(path).map_err(io_err(path))?;
    reader = reader.with_guessed_format().map_err(io_err(path))?;
    let format = reader.format();
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    Ok((reader.into_decoder().map_err(bad)?, format))
}

/// Refuses a JPEG or PNG that stops short of its end marker (see `complete`).
fn check_image_complete(path: &Path, format: Option<image::ImageFormat>) -> Result<()> {
    let open = || std::fs::File::open(path).map_err(io_err(path));
    let verdict = match format {
        Some(image::ImageFormat::Jpeg) => crate::complete::jpeg_complete(std::io::BufReader::new(open()?)),
        Some(image::ImageFormat::Png) => crate::complete::png_complete(std::io::BufReader::new(open()?)),
        _ => Ok(()),
    };
    verdict.map_err(|reason| DataError::ImageDecode { path: path.to_path_buf(), reason })
}

/// Width and height after EXIF orientation, read without decoding the pixels (and refused, like
/// [`decode_image`] would, when over the pixel limit).
fn image_dimensions(path: &Path) -> Result<(u32, u32)> {
    use image::metadata::Orientation;
    use image::ImageDecoder;
    let limit = crate::limits::max_pixels()?;
    let (mut decoder, _) = open_image_decoder(path, limit)?;
    let (w, h) = decoder.dimensions();
    crate::limits::check_pixels_within(path, "image", w as u64, h as u64, limit)?;
    let turned = matches!(
        decoder.orientation().unwrap_or(Orientation::NoTransforms),
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    );
    Ok(if turned { (h, w) } else { (w, h) })
}

/// A sample before its label has been scanned.
#[derive(Clone, Debug)]
pub struct PendingSample {
    pub id: String,
    pub source: SampleSource,
    pub object_class: Option<ClassId>,
}

/// Scans labels (in parallel) for the classes present and their areas. The result can be cached
/// as JSON: on real VOC this reads 10k PNGs.
pub(crate) fn scan_samples(
    pending: Vec<PendingSample>,
    num_classes: usize,
    cache: Option<&Path>,
) -> Result<Vec<SampleRecord>> {
    if let Some(path) = cache {
        match ScanCache::load_matching(path, &pending, num_classes) {
            Ok(records) => return Ok(records),
            Err(CacheMiss::Invalid(reason)) => eprintln!("note: ignoring list cache {}: {reason}; rescanning", path.display()),
            Err(CacheMiss::Stale) => {}
        }
    }
    let records: Vec<SampleRecord> = pending
        .into_par_iter()
        .map(|p| scan_one(p, num_classes))
        .collect::<Result<Vec<_>>>()?;
    if let Some(path) = cache {
        // A cache that cannot be written only costs time on the next open.
        if let Err(e) = ScanCache::store(path, &records) {
            eprintln!("note: could not write list cache {}: {e}", path.display());
        }
    }
    Ok(records)
}

fn scan_one(p: PendingSample, num_classes: usize) -> Result<SampleRecord> {
    let (label, label_path) = match &p.source {
        SampleSource::Memory { label, .. } => ((**label).clone(), None),
        SampleSource::Files { image, label, encoding } => {
            let lab = read_label_png(label, encoding)?;
            let (w, h) = image_dimensions(image)?;
            if (lab.width(), lab.height()) != (w, h) {
                return Err(DataError::SizeMismatch {
                    path: label.clone(),
                    image: image.clone(),
                    mask_w: lab.width(),
                    mask_h: lab.height(),
                    image_w: w,
                    image_h: h,
                });
            }
            (lab, Some(label.clone()))
        }
    };
    let hist = label.histogram();
    let mut classes = Vec::new();
    for v in 1..=254u8 {
        if hist[v as usize] == 0 {
            continue;
        }
        let class_id = match p.object_class {
            Some(c) if v == 1 => c,
            Some(_) => {
                return Err(DataError::BadLayout {
                    path: label_path.unwrap_or_else(|| PathBuf::from(&p.id)),
                    reason: format!("single-object mask holds value {v}; expected 0, 1 or 255"),
                })
            }
            None => {
                if v as usize > num_classes {
                    return Err(DataError::UnknownClassId {
                        path: label_path.unwrap_or_else(|| PathBuf::from(&p.id)),
                        value: v,
                        num_classes,
                    });
                }
                v as ClassId
            }
        };
        classes.push(ClassPresence { class_id, value: v, pixels: hist[v as usize] });
    }
    classes.sort_by_key(|c| c.class_id);
    Ok(SampleRecord { id: p.id, source: p.source, object_class: p.object_class, classes })
}

/// On-disk form of a scan.
#[derive(Serialize, Deserialize)]
struct ScanCache {
    format: String,
    entries: Vec<ScanCacheEntry>,
}

#[derive(Serialize, Deserialize)]
struct ScanCacheEntry {
    id: String,
    image: PathBuf,
    label: PathBuf,
    image_stamp: FileStamp,
    label_stamp: FileStamp,
    classes: Vec<ClassPresence>,
}

/// What identifies a file's version without reading it: its length and modification time. A
/// length alone misses an edit that keeps the size (a mask repainted with another class id
/// compresses to the same number of bytes more often than one would think).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    bytes: u64,
    modified_ns: u64,
}

impl FileStamp {
    /// `None` when the file or its modification time cannot be read: such a file is never
    /// trusted from the cache.
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        let modified = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(Self { bytes: meta.len(), modified_ns: u64::try_from(modified.as_nanos()).ok()? })
    }
}

/// v2: entries keyed by (length, modification time) of the image and the label; v1 keyed by
/// the label's length only and is rescanned.
const SCAN_CACHE_FORMAT: &str = "mmformer-class-scan-v2";

/// Why a scan cache was not used.
enum CacheMiss {
    /// Absent, another format, or describing other files or other versions of them: rescan
    /// quietly.
    Stale,
    /// Describing these very files but holding what no scan can produce (hand-edited or
    /// corrupted): rescan, and say so.
    Invalid(String),
}

impl ScanCache {
    /// Returns the cached records if the cache describes exactly these files (same ids, paths,
    /// lengths and modification times) and every class it lists is valid for a dataset of
    /// `num_classes` classes; anything else means rescan.
    fn load_matching(path: &Path, pending: &[PendingSample], num_classes: usize) -> std::result::Result<Vec<SampleRecord>, CacheMiss> {
        let text = std::fs::read_to_string(path).map_err(|_| CacheMiss::Stale)?;
        let cache: ScanCache = serde_json::from_str(&text).map_err(|_| CacheMiss::Stale)?;
        if cache.format != SCAN_CACHE_FORMAT || cache.entries.len() != pending.len() {
            return Err(CacheMiss::Stale);
        }
        let mut out = Vec::with_capacity(pending.len());
        for (e, p) in cache.entries.into_iter().zip(pending) {
            let SampleSource::Files { image, label, .. } = &p.source else { return Err(CacheMiss::Stale) };
            let current = (FileStamp::of(image), FileStamp::of(label));
            if e.id != p.id || &e.image != image || &e.label != label || current != (Some(e.image_stamp), Some(e.label_stamp)) {
                return Err(CacheMiss::Stale);
            }
            validate_cached_classes(&e.classes, p.object_class, num_classes)
                .map_err(|reason| CacheMiss::Invalid(format!("entry `{}`: {reason}", e.id)))?;
            out.push(SampleRecord {
                id: p.id.clone(),
                source: p.source.clone(),
                object_class: p.object_class,
                classes: e.classes,
            });
        }
        Ok(out)
    }

    fn store(path: &Path, records: &[SampleRecord]) -> Result<()> {
        let mut entries = Vec::with_capacity(records.len());
        for r in records {
            let SampleSource::Files { image, label, .. } = &r.source else { return Ok(()) };
            // A file whose stamp cannot be read would never match: no use caching the scan.
            let (Some(image_stamp), Some(label_stamp)) = (FileStamp::of(image), FileStamp::of(label)) else { return Ok(()) };
            entries.push(ScanCacheEntry {
                id: r.id.clone(),
                image: image.clone(),
                label: label.clone(),
                image_stamp,
                label_stamp,
                classes: r.classes.clone(),
            });
        }
        let cache = ScanCache { format: SCAN_CACHE_FORMAT.into(), entries };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let text = serde_json::to_string(&cache).expect("scan cache serialises");
        // Write then rename so a concurrent reader never sees half a file.
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        Ok(())
    }
}

/// The class list of a cached entry must be one `scan_one` could have produced: ids within the
/// dataset's classes, label values 1..=254 that stand for them, ascending, no empty class. Class
/// ids read back from the cache reach fold lists and episode sampling, where an unknown id would
/// index past the class names.
fn validate_cached_classes(classes: &[ClassPresence], object_class: Option<ClassId>, num_classes: usize) -> std::result::Result<(), String> {
    for (i, p) in classes.iter().enumerate() {
        if p.class_id == 0 || p.class_id as usize > num_classes {
            return Err(format!("class id {} is not a class of this dataset (1..={num_classes})", p.class_id));
        }
        let value_ok = match object_class {
            Some(c) => p.class_id == c && p.value == 1,
            None => p.value as ClassId == p.class_id && p.value != IGNORE,
        };
        if !value_ok {
            return Err(format!("label value {} cannot stand for class {}", p.value, p.class_id));
        }
        if p.pixels == 0 {
            return Err(format!("class {} is listed with 0 pixels", p.class_id));
        }
        if i > 0 && classes[i - 1].class_id >= p.class_id {
            return Err(format!("class {} listed out of order or twice", p.class_id));
        }
    }
    Ok(())
}

/// A per-fold image list built with the PFENet rule: images with at least one class of interest
/// covering >= 2048 px, and per-class image lists. Indices point into the split's samples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldList {
    pub split: Split,
    pub fold: usize,
    /// Classes of interest: the fold's base classes for train, novel classes for val.
    pub classes: Vec<ClassId>,
    pub images: Vec<usize>,
    pub class_images: BTreeMap<ClassId, Vec<usize>>,
}

/// Builds the PFENet list of `samples` for the classes in `classes`; a class counts in an image
/// when it covers at least `min_pixels` (PFENet: [`PFENET_MIN_CLASS_PIXELS`]).
pub fn build_fold_list(samples: &[SampleRecord], split: Split, fold: usize, classes: &[ClassId], min_pixels: u64) -> FoldList {
    let mut images = Vec::new();
    let mut class_images: BTreeMap<ClassId, Vec<usize>> = classes.iter().map(|&c| (c, Vec::new())).collect();
    for (i, s) in samples.iter().enumerate() {
        let mut kept = false;
        for p in &s.classes {
            if p.pixels >= min_pixels {
                if let Some(list) = class_images.get_mut(&p.class_id) {
                    list.push(i);
                    kept = true;
                }
            }
        }
        if kept {
            images.push(i);
        }
    }
    FoldList { split, fold, classes: classes.to_vec(), images, class_images }
}

pub(crate) struct DatasetInner {
    pub name: String,
    pub kind: DatasetKind,
    pub class_names: Vec<String>,
    pub novel: Vec<Vec<ClassId>>,
    pub train: Vec<SampleRecord>,
    pub val: Vec<SampleRecord>,
    pub train_index: HashMap<String, usize>,
    pub val_index: HashMap<String, usize>,
    pub min_class_pixels: u64,
}

/// A few-shot segmentation dataset: classes, 4 folds, train and val samples with their class
/// areas. Cheap to clone (shared).
#[derive(Clone)]
pub struct FewShotDataset {
    pub(crate) inner: Arc<DatasetInner>,
}

impl std::fmt::Debug for FewShotDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FewShotDataset")
            .field("name", &self.inner.name)
            .field("kind", &self.inner.kind)
            .field("classes", &self.inner.class_names.len())
            .field("train", &self.inner.train.len())
            .field("val", &self.inner.val.len())
            .finish()
    }
}

impl FewShotDataset {
    /// Assembles a dataset from scanned samples (readers call this; also usable for custom data).
    pub fn from_parts(
        name: impl Into<String>,
        kind: DatasetKind,
        class_names: Vec<String>,
        folds: FoldScheme,
        train: Vec<SampleRecord>,
        val: Vec<SampleRecord>,
    ) -> Result<Self> {
        let name = name.into();
        let k = class_names.len();
        if k < 4 {
            return Err(DataError::Empty {
                dataset: name,
                what: "class list".into(),
                reason: format!("{k} classes cannot make 4 non-empty folds"),
            });
        }
        let novel = folds.novel_sets(k);
        for (i, set) in novel.iter().enumerate() {
            if set.is_empty() {
                return Err(DataError::Empty { dataset: name, what: format!("fold {i}"), reason: "no novel classes".into() });
            }
            if let Some(&c) = set.iter().find(|&&c| c == 0 || c as usize > k) {
                return Err(DataError::UnknownClass { class_id: c, num_classes: k });
            }
        }
        let index = |v: &[SampleRecord], split: Split| -> Result<HashMap<String, usize>> {
            let mut m = HashMap::with_capacity(v.len());
            for (i, s) in v.iter().enumerate() {
                if m.insert(s.id.clone(), i).is_some() {
                    return Err(DataError::BadLayout {
                        path: PathBuf::from(s.describe()),
                        reason: format!("sample id {} appears twice in the {split} split", s.id),
                    });
                }
            }
            Ok(m)
        };
        let train_index = index(&train, Split::Train)?;
        let val_index = index(&val, Split::Val)?;
        Ok(Self {
            inner: Arc::new(DatasetInner {
                name,
                kind,
                class_names,
                novel,
                train,
                val,
                train_index,
                val_index,
                min_class_pixels: PFENET_MIN_CLASS_PIXELS,
            }),
        })
    }

    /// The same samples with another fold scheme (e.g. [`FoldScheme::coco_to_pascal`]) and kind.
    pub fn with_folds(&self, folds: FoldScheme, kind: DatasetKind) -> Result<Self> {
        let mut ds = Self::from_parts(
            self.inner.name.clone(),
            kind,
            self.inner.class_names.clone(),
            folds,
            self.inner.train.clone(),
            self.inner.val.clone(),
        )?;
        Arc::get_mut(&mut ds.inner).expect("fresh dataset").min_class_pixels = self.inner.min_class_pixels;
        Ok(ds)
    }

    /// The same dataset with another list threshold (default [`PFENET_MIN_CLASS_PIXELS`]); for
    /// small smoke-test photo sets whose objects are smaller than the benchmark rule asks.
    pub fn with_min_class_pixels(&self, min_pixels: u64) -> Self {
        let mut ds = self.with_folds(FoldScheme::Explicit(self.inner.novel.clone()), self.inner.kind).expect("folds already valid");
        Arc::get_mut(&mut ds.inner).expect("fresh dataset").min_class_pixels = min_pixels;
        ds
    }

    /// Pixels a class needs in an image to enter the fold lists.
    pub fn min_class_pixels(&self) -> u64 {
        self.inner.min_class_pixels
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }
    pub fn kind(&self) -> DatasetKind {
        self.inner.kind
    }
    pub fn num_classes(&self) -> usize {
        self.inner.class_names.len()
    }
    /// Class names; index = class id - 1.
    pub fn class_names(&self) -> &[String] {
        &self.inner.class_names
    }
    pub fn class_name(&self, class_id: ClassId) -> Result<&str> {
        self.check_class(class_id)?;
        Ok(&self.inner.class_names[class_id as usize - 1])
    }
    /// Class id of a name.
    pub fn class_id(&self, name: &str) -> Option<ClassId> {
        self.inner.class_names.iter().position(|n| n == name).map(|i| i as ClassId + 1)
    }
    pub(crate) fn check_class(&self, class_id: ClassId) -> Result<()> {
        if class_id == 0 || class_id as usize > self.num_classes() {
            return Err(DataError::UnknownClass { class_id, num_classes: self.num_classes() });
        }
        Ok(())
    }
    pub fn num_folds(&self) -> usize {
        self.inner.novel.len()
    }
    fn check_fold(&self, fold: usize) -> Result<()> {
        if fold >= self.num_folds() {
            return Err(DataError::FoldOutOfRange { dataset: self.inner.name.clone(), fold, num_folds: self.num_folds() });
        }
        Ok(())
    }
    pub fn novel_classes(&self, fold: usize) -> Result<&[ClassId]> {
        self.check_fold(fold)?;
        Ok(&self.inner.novel[fold])
    }
    /// All classes not novel in `fold`.
    pub fn base_classes(&self, fold: usize) -> Result<Vec<ClassId>> {
        let novel = self.novel_classes(fold)?;
        Ok((1..=self.num_classes() as ClassId).filter(|c| !novel.contains(c)).collect())
    }
    pub fn samples(&self, split: Split) -> &[SampleRecord] {
        match split {
            Split::Train => &self.inner.train,
            Split::Val => &self.inner.val,
        }
    }
    /// Index of a sample id in a split.
    pub fn find(&self, split: Split, id: &str) -> Option<usize> {
        match split {
            Split::Train => self.inner.train_index.get(id).copied(),
            Split::Val => self.inner.val_index.get(id).copied(),
        }
    }
    /// The PFENet list of a fold: train -> base classes, val -> novel classes.
    pub fn fold_list(&self, split: Split, fold: usize) -> Result<FoldList> {
        let classes = match split {
            Split::Train => self.base_classes(fold)?,
            Split::Val => self.novel_classes(fold)?.to_vec(),
        };
        Ok(build_fold_list(self.samples(split), split, fold, &classes, self.inner.min_class_pixels))
    }
    /// The official test seed of a fold for this kind of dataset (spec §4.5); other datasets use
    /// the PASCAL seeds.
    pub fn default_test_seed(&self, fold: usize) -> Result<u64> {
        self.check_fold(fold)?;
        Ok(match self.inner.kind {
            DatasetKind::Coco => COCO_TEST_SEEDS[fold % 4],
            DatasetKind::CocoToPascal => COCO_TO_PASCAL_TEST_SEED,
            _ => PASCAL_TEST_SEEDS[fold % 4],
        })
    }
}

/// A fold list by sample ids (the content of PFENet/CyCTR's cached lists), for inspection and
/// for other tools; written by [`FewShotDataset::write_fold_lists`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldListFile {
    pub dataset: String,
    pub split: Split,
    pub fold: usize,
    pub min_class_pixels: u64,
    pub classes: Vec<ClassId>,
    pub images: Vec<String>,
    pub class_images: BTreeMap<ClassId, Vec<String>>,
}

impl FewShotDataset {
    /// The fold list of `split`/`fold` by sample ids.
    pub fn fold_list_file(&self, split: Split, fold: usize) -> Result<FoldListFile> {
        let list = self.fold_list(split, fold)?;
        let samples = self.samples(split);
        let ids = |v: &[usize]| v.iter().map(|&i| samples[i].id.clone()).collect::<Vec<_>>();
        Ok(FoldListFile {
            dataset: self.inner.name.clone(),
            split,
            fold,
            min_class_pixels: self.inner.min_class_pixels,
            classes: list.classes.clone(),
            images: ids(&list.images),
            class_images: list.class_images.iter().map(|(&c, v)| (c, ids(v))).collect(),
        })
    }

    /// Writes every fold's train and val list as `<dir>/{train,val}_fold<i>.json`; returns the
    /// paths written.
    pub fn write_fold_lists(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut written = Vec::new();
        for fold in 0..self.num_folds() {
            for split in [Split::Train, Split::Val] {
                let path = dir.join(format!("{split}_fold{fold}.json"));
                let text = serde_json::to_string_pretty(&self.fold_list_file(split, fold)?).expect("list serialises");
                std::fs::write(&path, text).map_err(io_err(&path))?;
                written.push(path);
            }
        }
        Ok(written)
    }
}

/// Any supported dataset, for callers that pick the kind from a config or a command line.
#[derive(Clone, Debug)]
pub enum DatasetSource {
    /// PASCAL-5i or anything in the VOC layout.
    Voc { root: PathBuf, options: crate::voc::VocOptions },
    /// COCO-20i.
    Coco(crate::coco::CocoOptions),
    /// PASCAL (VOC layout) evaluated with the COCO->PASCAL folds (spec §5.5).
    CocoToPascal { root: PathBuf, options: crate::voc::VocOptions },
    Fss { root: PathBuf, options: crate::folders::FolderOptions },
    Folder { root: PathBuf, options: crate::folders::FolderOptions },
    /// The real smoke-test photos under an assets folder.
    VocPhotos { assets: PathBuf },
}

impl FewShotDataset {
    /// Opens any [`DatasetSource`].
    pub fn open(source: &DatasetSource) -> Result<Self> {
        match source {
            DatasetSource::Voc { root, options } => Self::open_voc(root, options),
            DatasetSource::Coco(options) => Self::open_coco(options),
            DatasetSource::CocoToPascal { root, options } => {
                Self::open_voc(root, options)?.with_folds(FoldScheme::coco_to_pascal(), DatasetKind::CocoToPascal)
            }
            DatasetSource::Fss { root, options } => Self::open_fss(root, options),
            DatasetSource::Folder { root, options } => Self::open_folder(root, options),
            DatasetSource::VocPhotos { assets } => Self::voc_photos(assets),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_schemes() {
        let c = FoldScheme::Contiguous.novel_sets(20);
        assert_eq!(c[0], vec![1, 2, 3, 4, 5]);
        assert_eq!(c[3], vec![16, 17, 18, 19, 20]);
        let i = FoldScheme::Interleaved.novel_sets(80);
        assert_eq!(&i[0][..3], &[1, 5, 9]);
        assert_eq!(*i[3].last().unwrap(), 80);
        assert!(i.iter().all(|s| s.len() == 20));
        let g = FoldScheme::Contiguous.novel_sets(42);
        assert_eq!(g.iter().map(Vec::len).sum::<usize>(), 42);
        let c2p = FoldScheme::coco_to_pascal().novel_sets(20);
        assert_eq!(c2p.iter().map(Vec::len).collect::<Vec<_>>(), vec![6, 4, 6, 4]);
        assert_eq!(c2p[0], vec![1, 4, 9, 11, 12, 15]);
    }

    fn rec(id: &str, classes: &[(ClassId, u64)]) -> SampleRecord {
        SampleRecord {
            id: id.into(),
            source: SampleSource::Memory { image: Arc::new(RgbImage::new(1, 1)), label: Arc::new(Label::filled(1, 1, 0)) },
            object_class: None,
            classes: classes.iter().map(|&(c, p)| ClassPresence { class_id: c, value: c as u8, pixels: p }).collect(),
        }
    }

    #[test]
    fn pfenet_rule_threshold_and_membership() {
        let samples = vec![
            rec("a", &[(1, 2048), (6, 5000)]),
            rec("b", &[(1, 2047)]),
            rec("c", &[(6, 100), (7, 3000)]),
        ];
        let base: Vec<ClassId> = (6..=20).collect();
        let train = build_fold_list(&samples, Split::Train, 0, &base, PFENET_MIN_CLASS_PIXELS);
        assert_eq!(train.images, vec![0, 2]);
        assert_eq!(train.class_images[&6], vec![0]); // c has only 100 px of class 6
        assert_eq!(train.class_images[&7], vec![2]);
        let val = build_fold_list(&samples, Split::Val, 0, &[1, 2, 3, 4, 5], PFENET_MIN_CLASS_PIXELS);
        assert_eq!(val.images, vec![0]); // b's class 1 is one pixel short
        assert_eq!(val.class_images[&1], vec![0]);
    }
}
