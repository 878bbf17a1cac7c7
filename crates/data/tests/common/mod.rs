//! Writers for small datasets in the real on-disk formats (palette PNG labels via the png crate,
//! JPEG/PNG images, list files), shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use data::{write_label_png, Label};
use image::{Rgb, RgbImage};

/// Colour that encodes a label value, so image/label alignment can be checked after
/// geometric augmentation.
pub fn colour_of(value: u8) -> [u8; 3] {
    match value {
        0 => [20, 20, 20],
        255 => [128, 128, 128],
        v => [(v as u32 * 47 % 200 + 40) as u8, (v as u32 * 91 % 200 + 40) as u8, (v as u32 * 13 % 200 + 40) as u8],
    }
}

/// A rectangle of one class: (class, x0, y0, x1, y1), half-open.
pub type Rect = (u8, u32, u32, u32, u32);

/// Label with rectangles painted in order, and the matching colour-coded image.
pub fn scene(w: u32, h: u32, rects: &[Rect]) -> (RgbImage, Label) {
    let mut lab = vec![0u8; (w * h) as usize];
    for &(c, x0, y0, x1, y1) in rects {
        for y in y0..y1.min(h) {
            for x in x0..x1.min(w) {
                lab[(y * w + x) as usize] = c;
            }
        }
    }
    let img = RgbImage::from_fn(w, h, |x, y| Rgb(colour_of(lab[(y * w + x) as usize])));
    (img, Label::new(w, h, lab))
}

pub struct VocImage<'a> {
    pub id: &'a str,
    pub w: u32,
    pub h: u32,
    pub rects: Vec<Rect>,
}

/// Writes a VOC-layout dataset: PNG images (lossless, so colours stay exact) in JPEGImages,
/// palette labels in SegmentationClassAug, ImageSets lists.
pub fn write_voc(root: &Path, images: &[VocImage], train: &[&str], val: &[&str]) {
    std::fs::create_dir_all(root.join("JPEGImages")).unwrap();
    std::fs::create_dir_all(root.join("SegmentationClassAug")).unwrap();
    std::fs::create_dir_all(root.join("ImageSets/Segmentation")).unwrap();
    for im in images {
        let (img, lab) = scene(im.w, im.h, &im.rects);
        img.save(root.join("JPEGImages").join(format!("{}.png", im.id))).unwrap();
        write_label_png(&root.join("SegmentationClassAug").join(format!("{}.png", im.id)), &lab).unwrap();
    }
    std::fs::write(root.join("ImageSets/Segmentation/train.txt"), train.join("\n") + "\n").unwrap();
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), val.join("\n") + "\n").unwrap();
}

/// A 20-class PASCAL-like dataset of 20 images, 96x64. Each image holds an odd class (left
/// half) and an even class (right half), 2976 px each (>= 2048); every class is in exactly two
/// images, so every class has a support image other than the query.
pub fn small_pascal(root: &Path) -> Vec<String> {
    let mut images = Vec::new();
    let ids: Vec<String> = (0..20).map(|i| format!("img{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        // Left half class a, right half class b: 48x64 = 3072 px each, plus an ignore border.
        let a = (i % 10) as u8 * 2 + 1; // 1, 3, ..., 19
        let b = ((i + 3) % 10) as u8 * 2 + 2; // even classes
        images.push(VocImage { id, w: 96, h: 64, rects: vec![(a, 0, 0, 48, 64), (b, 48, 0, 96, 64), (255, 0, 0, 96, 2)] });
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    write_voc(root, &images, &refs, &refs);
    ids
}
