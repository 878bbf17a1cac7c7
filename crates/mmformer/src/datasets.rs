//! Opening a dataset from a folder: COCO-20i when it has COCO annotation files, else the VOC
//! layout (PASCAL-5i, the synthetic dataset, users' data written like them).

use std::path::Path;

use data::{FewShotDataset, VocOptions};

use crate::error::{bail, Context, Result};

/// The dataset at `root`: COCO-20i when `root/annotations/instances_train{2014,2017}.json`
/// exists (standard COCO layout, interleaved folds), else the VOC layout.
pub fn open_dataset(root: &Path) -> Result<FewShotDataset> {
    for year in [2014, 2017] {
        if root.join("annotations").join(format!("instances_train{year}.json")).is_file() {
            let opts = data::CocoOptions::standard(root, year);
            return FewShotDataset::open_coco(&opts).with_context(|| format!("opening COCO {year} at {}", root.display()));
        }
    }
    open_voc_dataset(root)
}

/// Whether `root` holds COCO (its annotation files), which sets the paper preset's schedule.
pub fn is_coco_root(root: &Path) -> bool {
    [2014, 2017].iter().any(|y| root.join("annotations").join(format!("instances_train{y}.json")).is_file())
}

/// A dataset in the VOC layout at `root` (PASCAL-5i, the synthetic dataset, users' data).
pub fn open_voc_dataset(root: &Path) -> Result<FewShotDataset> {
    if !root.is_dir() {
        bail!("dataset folder {} not found (make it with `cargo xtask make-synthetic`, or pass --data)", root.display());
    }
    FewShotDataset::open_voc(root, &VocOptions::default()).with_context(|| format!("opening dataset {}", root.display()))
}

/// The val split of COCO-20i at `root` (`annotations/instances_val<year>.json`, `val<year>/`).
pub fn open_coco_val(root: &Path, year: u32) -> Result<FewShotDataset> {
    let mut opts = data::CocoOptions::standard(root, year);
    opts.train = None;
    if !opts.val.annotations.is_file() {
        bail!("{}: COCO annotations not found (expected the standard layout under {})", opts.val.annotations.display(), root.display());
    }
    FewShotDataset::open_coco(&opts).with_context(|| format!("opening COCO at {}", root.display()))
}
