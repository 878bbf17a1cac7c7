//! Images and masks a user can hand us that are broken or hostile: each is refused with a
//! one-line error naming the file and the problem, quickly, and nothing is filled in.
//! (That no big allocation happens is checked in `decode_memory.rs`, under a counting allocator.)

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{jpeg_bytes, jpeg_declaring, png_bytes};
use data::dataset::decode_image;
use data::label::read_mask_png;
use data::{read_label_png, DataError, FewShotDataset, FolderOptions, MaskEncoding};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The error of `r`, checked to be one line naming `path` and saying each of `words`.
fn refused<T>(r: data::Result<T>, path: &Path, words: &[&str]) -> DataError {
    let Err(e) = r else { panic!("{} was accepted", path.display()) };
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(msg.contains(&path.display().to_string()), "names the file: {msg}");
    for w in words {
        assert!(msg.contains(w), "says {w:?}: {msg}");
    }
    e
}

fn quickly<T>(f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    // Generous for a loaded CI machine; allocating and zeroing the declared frame takes far longer.
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    out
}

#[test]
fn png_headers_declaring_huge_sizes_are_refused_from_the_header() {
    let dir = tempfile::tempdir().unwrap();
    // A few rows of real data: the rest of the declared frame does not exist.
    let raw = vec![0u8; 4 * 1001];
    for (w, h, name) in [(100_000, 100_000, "wide.png"), (1, (1u32 << 31) - 1, "tall.png"), (60_000, 60_000, "bomb.png")] {
        let path = write(dir.path(), name, &png_bytes(w, h, 0, 8, &raw));
        let e = quickly(|| refused(read_mask_png(&path), &path, &[&format!("mask PNG declares {w}x{h} pixels"), "MMFORMER_MAX_PIXELS"]));
        assert!(matches!(e, DataError::TooLarge { .. }), "{e:?}");
        quickly(|| refused(read_label_png(&path, &MaskEncoding::ClassIds), &path, &["declares"]));
        // The same file as an image (through `image`).
        let e = quickly(|| refused(decode_image(&path), &path, &[&format!("image declares {w}x{h} pixels")]));
        assert!(matches!(e, DataError::TooLarge { .. }), "{e:?}");
    }
    // Height 2^31 is not a valid PNG at all: an error naming the file, not an abort.
    let path = write(dir.path(), "invalid.png", &png_bytes(1, 1 << 31, 0, 8, &raw));
    quickly(|| refused(read_mask_png(&path), &path, &[]));
    quickly(|| refused(decode_image(&path), &path, &[]));
}

#[test]
fn a_jpeg_declaring_a_huge_size_is_refused_from_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "huge.jpg", &jpeg_declaring(&jpeg_bytes(32, 16), 60_000, 60_000));
    let e = quickly(|| refused(decode_image(&path), &path, &["image declares 60000x60000 pixels"]));
    assert!(matches!(e, DataError::TooLarge { .. }), "{e:?}");
}

#[test]
fn a_truncated_jpeg_is_refused_not_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let whole = jpeg_bytes(256, 192);
    assert_eq!(decode_image(&write(dir.path(), "whole.jpg", &whole)).unwrap().dimensions(), (256, 192));
    // Cut inside the scan data (what the decoder used to fill in), and just before the end marker.
    for cut in [whole.len() * 6 / 10, whole.len() * 9 / 10, whole.len() - 2, whole.len() - 1] {
        let path = write(dir.path(), &format!("cut{cut}.jpg"), &whole[..cut]);
        let e = refused(decode_image(&path), &path, &["truncated"]);
        assert!(matches!(e, DataError::ImageDecode { .. }), "{e:?}");
    }
}

#[test]
fn progressive_jpegs_with_restart_markers_decode_whole_and_are_refused_cut() {
    // Made with `jpegtran -progressive -restart 1` from a 48x32 baseline JPEG of this crate's
    // encoder: several scans, DHT between them, RST markers inside them.
    let fixture = include_bytes!("data/progressive_restart.jpg");
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(decode_image(&write(dir.path(), "p.jpg", fixture)).unwrap().dimensions(), (48, 32));
    for cut in 0..fixture.len() {
        let path = write(dir.path(), "p_cut.jpg", &fixture[..cut]);
        refused(decode_image(&path), &path, &[]);
    }
}

#[test]
fn a_truncated_png_is_refused_as_image_and_as_mask() {
    let dir = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 10) as u8, 3]));
    let img_path = dir.path().join("img.png");
    img.save(&img_path).unwrap();
    let mask_path = dir.path().join("mask.png");
    data::write_label_png(&mask_path, &data::Label::new(40, 24, (0..960).map(|i| (i % 7) as u8).collect())).unwrap();
    for (whole, is_mask) in [(std::fs::read(&img_path).unwrap(), false), (std::fs::read(&mask_path).unwrap(), true)] {
        for cut in 0..whole.len() {
            let path = write(dir.path(), "cut.png", &whole[..cut]);
            let r = if is_mask { read_mask_png(&path).map(|_| ()) } else { decode_image(&path).map(|_| ()) };
            refused(r, &path, &[]);
        }
        // Only the end chunk's CRC missing: used to pass.
        let path = write(dir.path(), "no_iend_crc.png", &whole[..whole.len() - 4]);
        let r = if is_mask { read_mask_png(&path).map(|_| ()) } else { decode_image(&path).map(|_| ()) };
        refused(r, &path, &["truncated"]);
    }
}

#[test]
fn text_empty_and_random_files_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let text = write(dir.path(), "notes.jpg", b"this is a text file, not a photo\n");
    refused(decode_image(&text), &text, &["cannot decode image"]);
    let empty = write(dir.path(), "empty.jpg", b"");
    refused(decode_image(&empty), &empty, &[]);
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let random = write(dir.path(), "noise.png", &noise);
    refused(decode_image(&random), &random, &[]);
    refused(read_mask_png(&random), &random, &["cannot decode mask PNG"]);
    let text_mask = write(dir.path(), "mask.png", b"P1 not a png");
    refused(read_label_png(&text_mask, &MaskEncoding::Binary { threshold: 1 }), &text_mask, &[]);
    let missing = dir.path().join("missing.jpg");
    refused(decode_image(&missing), &missing, &[]);
}

#[test]
fn a_mask_bomb_in_a_dataset_is_named_when_the_dataset_opens() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for c in ["a", "b", "c", "d"] {
        std::fs::create_dir_all(root.join(c)).unwrap();
        std::fs::write(root.join(c).join("1.jpg"), jpeg_bytes(8, 8)).unwrap();
        data::label::write_gray_png(&root.join(c).join("1.png"), 8, 8, &[255; 64]).unwrap();
    }
    let bomb = root.join("c/1.png");
    std::fs::write(&bomb, png_bytes(100_000, 100_000, 0, 8, &[0; 1001])).unwrap();
    let opts = FolderOptions { no_cache: true, ..Default::default() };
    quickly(|| refused(FewShotDataset::open_folder(root, &opts), &bomb, &["declares 100000x100000"]));
}
