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

/// A PNG file built chunk by chunk: any declared `width` x `height` (the header is all a
/// decoder needs to size its frame), colour type and bit depth, and `raw` as the uncompressed
/// image data (filter bytes included) in one IDAT. Used to make hostile files that no encoder
/// would write.
pub fn png_bytes(width: u32, height: u32, color_type: u8, bit_depth: u8, raw: &[u8]) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], body: &[u8]) {
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &zlib_stored(raw));
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A zlib stream of stored (uncompressed) deflate blocks.
pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() { vec![&[]] } else { data.chunks(65535).collect() };
    for (i, b) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let n = b.len() as u16;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// A baseline JPEG of `w` x `h` with some detail (so the scan data is not trivially short).
pub fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x * y) % 253) as u8]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
    out
}

/// `jpeg` with the size in its SOF0 segment replaced: what a hostile file declares.
pub fn jpeg_declaring(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let at = jpeg.windows(2).position(|m| m == [0xFF, 0xC0]).expect("baseline SOF0");
    let mut out = jpeg.to_vec();
    // FFC0, length (2), precision (1), height (2), width (2).
    out[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
    out[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
    out
}
