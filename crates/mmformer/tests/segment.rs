//! Reading users' images and masks: every format `predict` accepts, and a clear error naming the
//! file for everything else.

mod common;

use common::{photo, Scratch};
use mmformer::data::label::write_gray_png;
use mmformer::data::Label;
use mmformer::segment::collect_queries;
use mmformer::{read_support_mask, SupportImage};

/// A gray 0/255 mask file with a rectangle of object in the middle.
fn write_rect_mask(path: &std::path::Path, w: u32, h: u32) {
    let data: Vec<u8> =
        (0..h).flat_map(|y| (0..w).map(move |x| if x >= w / 4 && x < 3 * w / 4 && y >= h / 4 && y < 3 * h / 4 { 255 } else { 0 })).collect();
    write_gray_png(path, w, h, &data).unwrap();
}

#[test]
fn missing_and_broken_images_are_named() {
    let d = Scratch::new();
    write_rect_mask(&d.path("a.png"), 8, 8);
    let e = SupportImage::from_files(&d.path("nope.jpg"), &d.path("a.png"), None).unwrap_err().to_string();
    assert!(e.contains("nope.jpg") && e.contains("no such image"), "{e}");
    std::fs::write(d.path("text.jpg"), "not a jpeg").unwrap();
    let e = SupportImage::from_files(&d.path("text.jpg"), &d.path("a.png"), None).unwrap_err().to_string();
    assert!(e.contains("text.jpg") && e.contains("cannot read image"), "{e}");
}

#[test]
fn wrong_size_mask_names_the_mask() {
    let d = Scratch::new();
    photo(10, 8, 0).save(d.path("s.jpg")).unwrap();
    write_rect_mask(&d.path("s_mask.png"), 9, 8);
    let e = SupportImage::from_files(&d.path("s.jpg"), &d.path("s_mask.png"), None).unwrap_err().to_string();
    assert!(e.contains("s_mask.png") && e.contains("mask is 9x8") && e.contains("is 10x8"), "{e}");
}

#[test]
fn mask_pngs_gray_palette_rgb_and_jpeg() {
    let d = Scratch::new();
    // Grayscale: any non-zero value is the object (0/1 and 0/255 masks alike).
    write_gray_png(&d.path("g.png"), 4, 1, &[0, 1, 255, 0]).unwrap();
    assert_eq!(read_support_mask(&d.path("g.png"), None).unwrap().data(), &[0, 1, 1, 0]);
    assert_eq!(read_support_mask(&d.path("g.png"), Some(1)).unwrap().data(), &[0, 1, 0, 0]);
    // Palette: 0 = background, 255 = ignore (→ background), others = object; or one class.
    mmformer::data::write_label_png(&d.path("p.png"), &Label::new(5, 1, vec![0, 7, 255, 3, 7])).unwrap();
    assert_eq!(read_support_mask(&d.path("p.png"), None).unwrap().data(), &[0, 1, 0, 1, 1]);
    assert_eq!(read_support_mask(&d.path("p.png"), Some(7)).unwrap().data(), &[0, 1, 0, 0, 1]);
    assert_eq!(read_support_mask(&d.path("p.png"), Some(3)).unwrap().data(), &[0, 0, 0, 1, 0]);
    let e = read_support_mask(&d.path("p.png"), Some(9)).unwrap_err().to_string();
    assert!(e.contains("p.png") && e.contains("value 9") && e.contains("0, 3, 7, 255"), "{e}");
    // RGB: non-black is the object; no class ids.
    let rgb = image::RgbImage::from_raw(3, 1, vec![0, 0, 0, 200, 0, 0, 0, 0, 1]).unwrap();
    rgb.save(d.path("c.png")).unwrap();
    assert_eq!(read_support_mask(&d.path("c.png"), None).unwrap().data(), &[0, 1, 1]);
    let e = read_support_mask(&d.path("c.png"), Some(1)).unwrap_err().to_string();
    assert!(e.contains("c.png") && e.contains("RGB"), "{e}");
    // A JPEG mask: thresholded at 128 against compression noise.
    let jpg = image::RgbImage::from_fn(16, 16, |x, _| if x < 8 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) });
    jpg.save(d.path("j.jpg")).unwrap();
    let m = read_support_mask(&d.path("j.jpg"), None).unwrap();
    assert_eq!(m.data().iter().filter(|&&v| v == 1).count(), 128);
}

#[test]
fn bad_masks_are_named() {
    let d = Scratch::new();
    write_gray_png(&d.path("empty.png"), 3, 2, &[0; 6]).unwrap();
    let e = read_support_mask(&d.path("empty.png"), None).unwrap_err().to_string();
    assert!(e.contains("empty.png") && e.contains("empty mask"), "{e}");
    // Only ignore pixels in a palette mask is empty too.
    mmformer::data::write_label_png(&d.path("ign.png"), &Label::new(2, 1, vec![0, 255])).unwrap();
    let e = read_support_mask(&d.path("ign.png"), None).unwrap_err().to_string();
    assert!(e.contains("ign.png") && e.contains("empty mask"), "{e}");
    std::fs::write(d.path("notes.png"), "hello").unwrap();
    let e = read_support_mask(&d.path("notes.png"), None).unwrap_err().to_string();
    assert!(e.contains("notes.png") && e.contains("not an image"), "{e}");
    let e = read_support_mask(&d.path("absent.png"), None).unwrap_err().to_string();
    assert!(e.contains("absent.png") && e.contains("no such mask"), "{e}");
    // A truncated PNG is a broken PNG, not "some other format".
    let mut bytes = std::fs::read(d.path("empty.png")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(d.path("cut.png"), bytes).unwrap();
    let e = read_support_mask(&d.path("cut.png"), None).unwrap_err().to_string();
    assert!(e.contains("cut.png") && e.contains("unreadable mask PNG"), "{e}");
}

#[test]
fn query_folders() {
    let d = Scratch::new();
    std::fs::create_dir_all(d.path("q")).unwrap();
    for f in ["b.png", "a.JPG", "a_mask.png", "c.jpeg", "c_overlay.png"] {
        let fmt = if f.ends_with("png") { image::ImageFormat::Png } else { image::ImageFormat::Jpeg };
        photo(4, 4, 0).save_with_format(d.path("q").join(f), fmt).unwrap();
    }
    std::fs::write(d.path("q/readme.txt"), "x").unwrap();
    let got: Vec<String> = collect_queries(&d.path("q")).unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(got, ["a.JPG", "b.png", "c.jpeg"]);
    std::fs::create_dir_all(d.path("empty")).unwrap();
    std::fs::write(d.path("empty/x_mask.png"), "x").unwrap();
    let e = collect_queries(&d.path("empty")).unwrap_err().to_string();
    assert!(e.contains("empty") && e.contains("no query image"), "{e}");
    photo(4, 4, 0).save(d.path("q/b.jpg")).unwrap();
    let e = collect_queries(&d.path("q")).unwrap_err().to_string();
    assert!(e.contains("b.jpg") && e.contains("b.png") && e.contains("overwrite"), "{e}");
    let e = collect_queries(&d.path("nothing")).unwrap_err().to_string();
    assert!(e.contains("nothing") && e.contains("no such query"), "{e}");
}

/// The mask and overlay files `predict` writes: original size, binary.
#[test]
fn segmentation_outputs_are_written_at_the_query_size() {
    let d = Scratch::new();
    let device = mmformer::Device::Cpu;
    let model = mmformer::MmFormer::synthetic(mmformer::Preset::Cpu, 1, &device).unwrap();
    let support = SupportImage::new(photo(70, 50, 1), common::rect_mask(70, 50)).unwrap();
    let q = photo(45, 33, 3);
    let seg = mmformer::SupportSet::new(&model, &[support], Some(64)).unwrap().segment(&q).unwrap();
    seg.save_mask(&d.path("q_mask.png")).unwrap();
    let (m, color) = mmformer::data::label::read_mask_png(&d.path("q_mask.png")).unwrap();
    assert_eq!(color, mmformer::data::label::MaskColor::Gray);
    assert_eq!((m.width(), m.height()), (45, 33));
    assert!(m.data().iter().all(|&v| v == 0 || v == 255));
    let fg = m.data().iter().filter(|&&v| v == 255).count() as f64 / (45.0 * 33.0);
    assert!((fg - seg.foreground_fraction()).abs() < 1e-12);
    let o = seg.overlay(&q);
    assert_eq!(o.dimensions(), (45, 33));
}
