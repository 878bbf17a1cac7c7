//! Class-per-folder datasets: FSS-1000 and users' own data (layout in the crate docs).

use std::path::{Path, PathBuf};

use crate::dataset::{scan_samples, ClassId, DatasetKind, FewShotDataset, FoldScheme, PendingSample, SampleSource};
use crate::error::{io_err, DataError, Result};
use crate::label::MaskEncoding;

/// Options for [`FewShotDataset::open_folder`] and [`FewShotDataset::open_fss`].
#[derive(Clone, Debug, Default)]
pub struct FolderOptions {
    /// Where the class-area scan is cached; default `<root>/.fewshot_cache`.
    pub cache_dir: Option<PathBuf>,
    pub no_cache: bool,
}

fn is_image_ext(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(), Some("jpg" | "jpeg" | "png"))
}

/// Pairs the images of one class folder with their masks: `<stem>_mask.png`, or `<stem>.png` next
/// to a `<stem>.jpg`/`.jpeg`.
fn pair_class_folder(dir: &Path) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()).map_err(io_err(dir)))
        .collect::<Result<Vec<_>>>()?;
    files.retain(|p| p.is_file() && is_image_ext(p));
    files.sort();
    let stem = |p: &Path| p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    let mut out = Vec::new();
    for f in &files {
        let s = stem(f);
        if s.ends_with("_mask") {
            continue;
        }
        let ext = f.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
        let explicit = dir.join(format!("{s}_mask.png"));
        let mask = if explicit.exists() {
            explicit
        } else if ext != "png" {
            let sibling = dir.join(format!("{s}.png"));
            if !sibling.exists() {
                return Err(DataError::BadLayout { path: f.clone(), reason: format!("no mask: expected {s}.png or {s}_mask.png next to it") });
            }
            sibling
        } else {
            // A .png with a .jpg/.jpeg of the same stem is that image's mask, not an image.
            if files.iter().any(|o| o != f && stem(o) == s) {
                continue;
            }
            return Err(DataError::BadLayout { path: f.clone(), reason: format!("no mask: a PNG image needs {s}_mask.png") });
        };
        out.push((s, f.clone(), mask));
    }
    Ok(out)
}

fn open_class_folders(root: &Path, opts: &FolderOptions, kind: DatasetKind, threshold: u8) -> Result<FewShotDataset> {
    if !root.is_dir() {
        return Err(DataError::BadLayout { path: root.to_path_buf(), reason: "dataset root is not a directory".into() });
    }
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .map_err(io_err(root))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| !n.starts_with('.'))
        .collect();
    classes.sort();
    if classes.len() > ClassId::MAX as usize {
        return Err(DataError::BadLayout { path: root.to_path_buf(), reason: format!("{} class folders is too many", classes.len()) });
    }
    let mut pending = Vec::new();
    for (i, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        let pairs = pair_class_folder(&dir)?;
        if pairs.is_empty() {
            return Err(DataError::Empty { dataset: root.display().to_string(), what: format!("class folder {}", dir.display()), reason: "no image with a mask".into() });
        }
        for (stem, image, label) in pairs {
            pending.push(PendingSample {
                id: format!("{class}/{stem}"),
                source: SampleSource::Files { image, label, encoding: MaskEncoding::Binary { threshold } },
                object_class: Some(i as ClassId + 1),
            });
        }
    }
    let cache_dir = opts.cache_dir.clone().unwrap_or_else(|| root.join(".fewshot_cache"));
    let cache = (!opts.no_cache).then(|| cache_dir.join("scan-all.json"));
    let records = scan_samples(pending, classes.len(), cache.as_deref())?;
    let name = root.file_name().and_then(|s| s.to_str()).unwrap_or("folder").to_string();
    FewShotDataset::from_parts(name, kind, classes, FoldScheme::Contiguous, records.clone(), records)
}

impl FewShotDataset {
    /// A folder per class with images and masks (layout in the crate docs). Masks: nonzero =
    /// object (palette: 255 = ignore).
    pub fn open_folder(root: &Path, opts: &FolderOptions) -> Result<Self> {
        open_class_folders(root, opts, DatasetKind::Folder, 1)
    }

    /// FSS-1000: `<root>/<class>/<n>.jpg` with `<n>.png` masks (0/255, thresholded at 128).
    pub fn open_fss(root: &Path, opts: &FolderOptions) -> Result<Self> {
        open_class_folders(root, opts, DatasetKind::Fss, 128)
    }
}
