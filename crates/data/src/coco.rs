//! COCO-20i: COCO instance annotations rendered to semantic masks the way the reference
//! `prepare_coco_data.py` does — per image, annotations in file order, crowd annotations skipped
//! (left 0), each mask written over the earlier ones with its class id. Class ids 1..K follow the
//! ascending COCO category ids. Polygon and RLE decoding use `hotcoco` (pycocotools-exact).
//! Rendered masks are cached as palette PNGs and reused on the next open.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Deserialize;

use crate::dataset::{scan_samples, DatasetKind, FewShotDataset, FoldScheme, PendingSample, SampleRecord, SampleSource};
use crate::error::{io_err, DataError, Result};
use crate::label::{write_label_png, Label, MaskEncoding};

/// One COCO split: its annotation JSON, image folder and rendered-mask folder.
#[derive(Clone, Debug)]
pub struct CocoSplitFiles {
    pub annotations: PathBuf,
    pub images_dir: PathBuf,
    /// Where rendered semantic masks go (`<image stem>.png`).
    pub masks_dir: PathBuf,
}

/// Options for [`FewShotDataset::open_coco`].
#[derive(Clone, Debug)]
pub struct CocoOptions {
    /// `None` gives an evaluation-only dataset with an empty train split.
    pub train: Option<CocoSplitFiles>,
    pub val: CocoSplitFiles,
    /// Interleaved by default (COCO-20i); `Contiguous` is the other common choice.
    pub folds: FoldScheme,
    /// Where the class-area scan is cached; default: next to the masks.
    pub cache_dir: Option<PathBuf>,
    pub no_cache: bool,
}

impl CocoOptions {
    /// The standard layout: `<root>/annotations/instances_{train,val}<year>.json`, images in
    /// `<root>/{train,val}<year>/`, masks in `<root>/annotations/coco_masks/instance_{train,val}<year>/`
    /// (the reference's paths).
    pub fn standard(root: &Path, year: u32) -> Self {
        let split = |s: &str| CocoSplitFiles {
            annotations: root.join("annotations").join(format!("instances_{s}{year}.json")),
            images_dir: root.join(format!("{s}{year}")),
            masks_dir: root.join("annotations").join("coco_masks").join(format!("instance_{s}{year}")),
        };
        Self { train: Some(split("train")), val: split("val"), folds: FoldScheme::Interleaved, cache_dir: None, no_cache: false }
    }
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    height: u32,
    width: u32,
}

#[derive(Deserialize)]
struct CocoCategory {
    id: u64,
    name: String,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: u64,
    category_id: u64,
    #[serde(default)]
    iscrowd: u8,
    segmentation: Segmentation,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Segmentation {
    Polygons(Vec<Vec<f64>>),
    Rle(RleJson),
}

#[derive(Deserialize)]
struct RleJson {
    counts: RleCounts,
    /// [height, width]
    size: [u32; 2],
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RleCounts {
    Compressed(String),
    Uncompressed(Vec<u32>),
}

/// Parsed COCO annotations, ready to render.
pub struct CocoAnnotations {
    path: PathBuf,
    /// Category names in class-id order (id = index + 1).
    pub class_names: Vec<String>,
    category_to_class: HashMap<u64, u8>,
    images: Vec<CocoImage>,
    /// Per image (same order as `images`): its annotations in file order.
    per_image: Vec<Vec<CocoAnnotation>>,
}

impl CocoAnnotations {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(io_err(path))?;
        let file: CocoFile =
            serde_json::from_slice(&text).map_err(|e| DataError::BadJson { path: path.to_path_buf(), reason: e.to_string() })?;
        Self::from_file(path, file)
    }

    fn from_file(path: &Path, file: CocoFile) -> Result<Self> {
        let mut cats: Vec<&CocoCategory> = file.categories.iter().collect();
        cats.sort_by_key(|c| c.id);
        if cats.is_empty() || cats.len() > 254 {
            return Err(DataError::BadJson {
                path: path.to_path_buf(),
                reason: format!("{} categories; need 1..=254 to fit label PNGs", cats.len()),
            });
        }
        let category_to_class: HashMap<u64, u8> = cats.iter().enumerate().map(|(i, c)| (c.id, i as u8 + 1)).collect();
        let class_names = cats.iter().map(|c| c.name.clone()).collect();
        let image_pos: HashMap<u64, usize> = file.images.iter().enumerate().map(|(i, im)| (im.id, i)).collect();
        let mut per_image: Vec<Vec<CocoAnnotation>> = (0..file.images.len()).map(|_| Vec::new()).collect();
        for (n, ann) in file.annotations.into_iter().enumerate() {
            let Some(&i) = image_pos.get(&ann.image_id) else {
                return Err(DataError::BadJson {
                    path: path.to_path_buf(),
                    reason: format!("annotation #{n} refers to unknown image id {}", ann.image_id),
                });
            };
            if !category_to_class.contains_key(&ann.category_id) {
                return Err(DataError::BadJson {
                    path: path.to_path_buf(),
                    reason: format!("annotation #{n} has unknown category id {}", ann.category_id),
                });
            }
            per_image[i].push(ann);
        }
        Ok(Self { path: path.to_path_buf(), class_names, category_to_class, images: file.images, per_image })
    }

    /// Number of images listed.
    pub fn num_images(&self) -> usize {
        self.images.len()
    }

    /// The semantic mask of image `index` (pycocotools `annToMask` per annotation).
    pub fn render(&self, index: usize) -> Result<Label> {
        let im = &self.images[index];
        let (h, w) = (im.height, im.width);
        let bad = |reason: String| DataError::BadJson { path: self.path.clone(), reason: format!("image {} ({}): {reason}", im.id, im.file_name) };
        // The mask is allocated from the size the JSON states: check it first.
        crate::limits::check_pixels(&self.path, format!("image {} ({})", im.id, im.file_name), w as u64, h as u64)?;
        let total = h as usize * w as usize;
        let mut data = vec![0u8; total];
        for ann in &self.per_image[index] {
            if ann.iscrowd != 0 {
                continue;
            }
            let rle = match &ann.segmentation {
                Segmentation::Polygons(polys) => {
                    if let Some(p) = polys.iter().find(|p| p.len() % 2 != 0) {
                        return Err(bad(format!("polygon with an odd number of coordinates ({})", p.len())));
                    }
                    hotcoco::mask::fr_polys(polys, h, w).map_err(|e| bad(e.to_string()))?
                }
                Segmentation::Rle(r) => {
                    if r.size != [h, w] {
                        return Err(bad(format!("RLE size {:?} differs from the image size [{h}, {w}]", r.size)));
                    }
                    match &r.counts {
                        RleCounts::Compressed(s) => hotcoco::mask::rle_from_string(s, h, w).map_err(|e| bad(e.to_string()))?,
                        RleCounts::Uncompressed(c) => hotcoco::types::Rle::new(h, w, c.clone()).map_err(|e| bad(e.to_string()))?,
                    }
                }
            };
            let class = self.category_to_class[&ann.category_id];
            // RLE masks are column-major (Fortran order), as in pycocotools.
            let mut idx = 0usize;
            let mut on = false;
            for &run in &rle.counts {
                let run = run as usize;
                // Runs past the last pixel would write outside the mask (or onto wrong pixels).
                if idx + run > total {
                    return Err(bad(format!("mask runs cover more than the image's {total} pixels")));
                }
                if on {
                    for k in idx..idx + run {
                        let (x, y) = (k / h as usize, k % h as usize);
                        data[y * w as usize + x] = class;
                    }
                }
                idx += run;
                on = !on;
            }
        }
        Ok(Label::new(w, h, data))
    }
}

/// Renders (or reuses) the masks of one split and returns its pending samples.
fn prepare_split(files: &CocoSplitFiles, ann: &CocoAnnotations) -> Result<Vec<PendingSample>> {
    std::fs::create_dir_all(&files.masks_dir).map_err(io_err(&files.masks_dir))?;
    (0..ann.num_images())
        .into_par_iter()
        .filter(|&i| ann.per_image[i].iter().any(|a| a.iscrowd == 0))
        .map(|i| {
            let im = &ann.images[i];
            let image = files.images_dir.join(&im.file_name);
            let stem = Path::new(&im.file_name).file_stem().and_then(|s| s.to_str()).unwrap_or(&im.file_name).to_string();
            let label = files.masks_dir.join(format!("{stem}.png"));
            if !label.exists() {
                let mask = ann.render(i)?;
                // Write-then-rename: an interrupted run never leaves a truncated mask behind.
                let tmp = files.masks_dir.join(format!("{stem}.png.tmp"));
                write_label_png(&tmp, &mask)?;
                std::fs::rename(&tmp, &label).map_err(io_err(&label))?;
            }
            Ok(PendingSample { id: stem, source: SampleSource::Files { image, label, encoding: MaskEncoding::ClassIds }, object_class: None })
        })
        .collect()
}

impl FewShotDataset {
    /// Opens COCO (2014 or 2017 annotation files) as a few-shot dataset; see [`CocoOptions`].
    pub fn open_coco(opts: &CocoOptions) -> Result<Self> {
        let val_ann = CocoAnnotations::read(&opts.val.annotations)?;
        let class_names = val_ann.class_names.clone();
        let scan = |files: &CocoSplitFiles, ann: &CocoAnnotations, split: &str| -> Result<Vec<SampleRecord>> {
            let pending = prepare_split(files, ann)?;
            let cache_dir = opts.cache_dir.clone().unwrap_or_else(|| files.masks_dir.clone());
            let cache = (!opts.no_cache).then(|| cache_dir.join(format!("scan-{split}.json")));
            scan_samples(pending, class_names.len(), cache.as_deref())
        };
        let val = scan(&opts.val, &val_ann, "val")?;
        drop(val_ann);
        let train = match &opts.train {
            Some(files) => {
                let ann = CocoAnnotations::read(&files.annotations)?;
                if ann.class_names != class_names {
                    return Err(DataError::BadJson {
                        path: files.annotations.clone(),
                        reason: format!("categories differ from those of {}", opts.val.annotations.display()),
                    });
                }
                scan(files, &ann, "train")?
            }
            None => Vec::new(),
        };
        let name = opts.val.annotations.file_stem().and_then(|s| s.to_str()).unwrap_or("coco").to_string();
        FewShotDataset::from_parts(name, DatasetKind::Coco, class_names, opts.folds.clone(), train, val)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> CocoAnnotations {
        CocoAnnotations::from_file(Path::new("t.json"), serde_json::from_str(json).unwrap()).unwrap()
    }

    #[test]
    fn crowd_skipped_later_overwrites_and_rle_column_major() {
        // 4x3 image (w=4, h=3). Category ids 7 and 3 -> classes 2 and 1 (ascending id order).
        // ann 1: uncompressed RLE, column-major counts: 3 zeros (col 0), 6 ones (cols 1-2), 3 zeros.
        // ann 2: polygon square covering x in [2,4), y in [0,3) -> overwrites col 2.
        // ann 3: crowd RLE covering everything -> skipped.
        let json = r#"{"images":[{"id":1,"file_name":"a.jpg","height":3,"width":4}],
          "categories":[{"id":7,"name":"seven"},{"id":3,"name":"three"}],
          "annotations":[
            {"image_id":1,"category_id":7,"iscrowd":0,"segmentation":{"counts":[3,6,3],"size":[3,4]}},
            {"image_id":1,"category_id":3,"iscrowd":0,"segmentation":[[2,0, 4,0, 4,3, 2,3]]},
            {"image_id":1,"category_id":7,"iscrowd":1,"segmentation":{"counts":[0,12],"size":[3,4]}}
          ]}"#;
        let ann = parse(json);
        assert_eq!(ann.class_names, vec!["three", "seven"]);
        let m = ann.render(0).unwrap();
        for y in 0..3 {
            let row: Vec<u8> = (0..4).map(|x| m.get(x, y)).collect();
            assert_eq!(row, vec![0, 2, 1, 1], "row {y}");
        }
    }

    #[test]
    fn compressed_rle_string_decodes() {
        // pycocotools encodes counts [3,6,3] as "32;3" ... use hotcoco's encoder to make it.
        let mask: Vec<u8> = vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0];
        let rle = hotcoco::mask::encode(&mask, 3, 4).unwrap();
        let s = hotcoco::mask::rle_to_string(&rle);
        let json = format!(
            r#"{{"images":[{{"id":1,"file_name":"a.jpg","height":3,"width":4}}],"categories":[{{"id":1,"name":"x"}}],
            "annotations":[{{"image_id":1,"category_id":1,"iscrowd":0,"segmentation":{{"counts":"{s}","size":[3,4]}}}}]}}"#
        );
        let m = parse(&json).render(0).unwrap();
        assert_eq!(m.data(), &[0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0]);
    }

    #[test]
    fn hostile_sizes_and_runs_are_errors_not_allocations_or_panics() {
        // The mask is allocated from the JSON's size: 100000x100000 is refused before that.
        let json = r#"{"images":[{"id":5,"file_name":"huge.jpg","height":100000,"width":100000}],"categories":[{"id":1,"name":"x"}],
          "annotations":[{"image_id":5,"category_id":1,"iscrowd":0,"segmentation":{"counts":[0,1],"size":[100000,100000]}}]}"#;
        let e = parse(json).render(0).unwrap_err().to_string();
        assert!(e.starts_with("t.json: image 5 (huge.jpg) declares 100000x100000 pixels, more than the limit"), "{e}");
        // Runs covering more than the image (12 pixels) used to index past the mask.
        let json = r#"{"images":[{"id":1,"file_name":"a.jpg","height":3,"width":4}],"categories":[{"id":1,"name":"x"}],
          "annotations":[{"image_id":1,"category_id":1,"iscrowd":0,"segmentation":{"counts":[10,40],"size":[3,4]}}]}"#;
        if let Err(e) = parse(json).render(0) {
            let e = e.to_string();
            assert!(e.contains("t.json") && e.contains("a.jpg"), "{e}");
        } else {
            panic!("runs past the image were accepted");
        }
    }

    #[test]
    fn bad_references_are_errors() {
        let json = r#"{"images":[{"id":1,"file_name":"a.jpg","height":3,"width":4}],"categories":[{"id":1,"name":"x"}],
          "annotations":[{"image_id":9,"category_id":1,"segmentation":[[0,0,1,0,1,1]]}]}"#;
        let err = CocoAnnotations::from_file(Path::new("bad.json"), serde_json::from_str(json).unwrap()).err().unwrap();
        assert!(err.to_string().contains("bad.json") && err.to_string().contains("unknown image id 9"), "{err}");
    }
}
