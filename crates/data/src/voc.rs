//! The VOC layout (PASCAL-5i, the synthetic dataset, anything written like them):
//!
//! ```text
//! <root>/JPEGImages/<id>.jpg                    (".png" accepted when no ".jpg" exists)
//! <root>/SegmentationClassAug/<id>.png          (else SegmentationClass/): palette or 8-bit gray,
//!                                               pixel = class id, 0 background, 255 ignore
//! <root>/ImageSets/Segmentation/{train,val}.txt one id per line (or PFENet lines, see below)
//! <root>/classes.txt                            optional: one class name per line, id = line + 1;
//!                                               without it the 20 VOC classes are used
//! ```
//!
//! List files may hold image ids (`2007_000032`) or PFENet lines
//! (`JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png`, paths relative to root).

use std::path::{Path, PathBuf};

use crate::dataset::{scan_samples, DatasetKind, FewShotDataset, FoldScheme, PendingSample, SampleSource, Split, VOC_CLASSES};
use crate::error::{io_err, DataError, Result};
use crate::label::MaskEncoding;

/// Options for [`FewShotDataset::open_voc`].
#[derive(Clone, Debug, Default)]
pub struct VocOptions {
    /// Train list instead of `ImageSets/Segmentation/train.txt`.
    pub train_list: Option<PathBuf>,
    /// Val list instead of `ImageSets/Segmentation/val.txt`.
    pub val_list: Option<PathBuf>,
    /// Where the class-area scan is cached; default `<root>/.fewshot_cache`.
    pub cache_dir: Option<PathBuf>,
    /// Skip reading and writing the cache.
    pub no_cache: bool,
    /// Fold scheme; default contiguous.
    pub folds: Option<FoldScheme>,
    /// Dataset kind; default `Pascal` without `classes.txt`, `Other` with it.
    pub kind: Option<DatasetKind>,
    /// Label values are mapped through this table first (e.g. a labelme project's class order).
    pub label_lookup: Option<std::sync::Arc<[u8; 256]>>,
    /// Class names instead of `classes.txt` / VOC's.
    pub class_names: Option<Vec<String>>,
}

/// One entry of a list file: (id, image path, label path).
pub type ListEntry = (String, PathBuf, PathBuf);

/// Reads a list file of image ids or PFENet `image label` lines. Ids resolve to
/// `<root>/JPEGImages/<id>.jpg` and `<label_dir>/<id>.png`.
pub fn read_image_list(path: &Path, root: &Path, label_dir: &Path) -> Result<Vec<ListEntry>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        match tokens.as_slice() {
            [] => continue,
            [id] => {
                let mut image = root.join("JPEGImages").join(format!("{id}.jpg"));
                if !image.exists() {
                    let png = root.join("JPEGImages").join(format!("{id}.png"));
                    if png.exists() {
                        image = png;
                    }
                }
                out.push((id.to_string(), image, label_dir.join(format!("{id}.png"))));
            }
            [img, lab] => {
                let id = Path::new(img)
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .ok_or_else(|| DataError::BadList { path: path.to_path_buf(), reason: format!("line {}: no file name in {img:?}", n + 1) })?;
                out.push((id.to_string(), root.join(img), root.join(lab)));
            }
            _ => {
                return Err(DataError::BadList {
                    path: path.to_path_buf(),
                    reason: format!("line {}: expected `id` or `image_path label_path`, found {} fields", n + 1, tokens.len()),
                })
            }
        }
    }
    Ok(out)
}

/// Reads `classes.txt`: one name per line, id = line index + 1; blank lines only at the end.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let lines: Vec<&str> = text.trim_end().lines().map(str::trim).collect();
    if let Some(n) = lines.iter().position(|l| l.is_empty()) {
        return Err(DataError::BadList { path: path.to_path_buf(), reason: format!("line {}: empty class name", n + 1) });
    }
    if lines.is_empty() {
        return Err(DataError::BadList { path: path.to_path_buf(), reason: "no class names".into() });
    }
    if lines.len() > 254 {
        return Err(DataError::BadList {
            path: path.to_path_buf(),
            reason: format!("{} classes; label PNGs hold at most 254 (255 is ignore)", lines.len()),
        });
    }
    Ok(lines.into_iter().map(String::from).collect())
}

impl FewShotDataset {
    /// Opens a dataset in the VOC layout (see the module docs of `voc`).
    pub fn open_voc(root: &Path, opts: &VocOptions) -> Result<Self> {
        if !root.is_dir() {
            return Err(DataError::BadLayout { path: root.to_path_buf(), reason: "dataset root is not a directory".into() });
        }
        let label_dir = voc_label_dir(root);
        let classes_txt = root.join("classes.txt");
        let (class_names, default_kind) = match (&opts.class_names, classes_txt.exists()) {
            (Some(names), _) => (names.clone(), DatasetKind::Other),
            (None, true) => (read_class_names(&classes_txt)?, DatasetKind::Other),
            (None, false) => (VOC_CLASSES.iter().map(|s| s.to_string()).collect(), DatasetKind::Pascal),
        };
        let kind = opts.kind.unwrap_or(default_kind);
        let encoding = match &opts.label_lookup {
            Some(t) => MaskEncoding::Lookup(t.clone()),
            None => MaskEncoding::ClassIds,
        };
        let name = root.file_name().and_then(|s| s.to_str()).unwrap_or("voc").to_string();
        let cache_dir = opts.cache_dir.clone().unwrap_or_else(|| root.join(".fewshot_cache"));
        let mut splits = Vec::new();
        for split in [Split::Train, Split::Val] {
            let list = match split {
                Split::Train => opts.train_list.clone(),
                Split::Val => opts.val_list.clone(),
            }
            .unwrap_or_else(|| root.join("ImageSets").join("Segmentation").join(format!("{split}.txt")));
            let entries = read_image_list(&list, root, &label_dir)?;
            if entries.is_empty() {
                return Err(DataError::Empty { dataset: name, what: format!("{split} list {}", list.display()), reason: "no images listed".into() });
            }
            let pending = entries
                .into_iter()
                .map(|(id, image, label)| PendingSample {
                    id,
                    source: SampleSource::Files { image, label, encoding: encoding.clone() },
                    object_class: None,
                })
                .collect();
            let cache = (!opts.no_cache).then(|| cache_dir.join(format!("scan-{split}.json")));
            splits.push(scan_samples(pending, class_names.len(), cache.as_deref())?);
        }
        let val = splits.pop().expect("val");
        let train = splits.pop().expect("train");
        FewShotDataset::from_parts(name, kind, class_names, opts.folds.clone().unwrap_or(FoldScheme::Contiguous), train, val)
    }
}

/// The label folder of a VOC root: `SegmentationClassAug` if present, else `SegmentationClass`.
pub fn voc_label_dir(root: &Path) -> PathBuf {
    if root.join("SegmentationClassAug").is_dir() {
        root.join("SegmentationClassAug")
    } else {
        root.join("SegmentationClass")
    }
}
