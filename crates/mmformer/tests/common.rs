//! Shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The fetched EfficientNet-Lite0 weights (`cargo xtask fetch-assets`; CI fetches them). A test
/// that needs them fails without them, unless `MMFORMER_SKIP_ASSET_TESTS=1` says to skip: then
/// it returns None and says so.
pub fn lite0_or_skip(test: &str) -> Option<PathBuf> {
    let p = mmformer::backbone::assets::efficientnet_lite0_path();
    if p.exists() {
        return Some(p);
    }
    if std::env::var("MMFORMER_SKIP_ASSET_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: {} not found and MMFORMER_SKIP_ASSET_TESTS=1", p.display());
        return None;
    }
    panic!("{test}: {} not found: run `cargo xtask fetch-assets` (or set MMFORMER_SKIP_ASSET_TESTS=1 to skip)", p.display());
}

/// A fresh, empty scratch folder removed at drop.
pub struct Scratch(pub tempfile::TempDir);

impl Scratch {
    pub fn new() -> Self {
        Self(tempfile::tempdir().expect("temp dir"))
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.path().join(f)
    }
}

/// A photo-like test image.
pub fn photo(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 7 + y * 13 + seed * 31) % 256;
        image::Rgb([v as u8, (255 - v) as u8, ((x * y + seed) % 256) as u8])
    })
}

/// A 0/1 mask with a rectangle of object in the middle.
pub fn rect_mask(w: u32, h: u32) -> mmformer::data::Label {
    let data = (0..h).flat_map(|y| (0..w).map(move |x| u8::from(x >= w / 4 && x < 3 * w / 4 && y >= h / 4 && y < 3 * h / 4))).collect();
    mmformer::data::Label::new(w, h, data)
}
