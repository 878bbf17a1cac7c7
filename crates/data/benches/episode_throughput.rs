//! Episode throughput: decode + augment of training episodes and test views on VOC-sized JPEGs
//! (500x375), on however many cores rayon finds. `cargo bench -p data`.

use std::time::Instant;

use data::{write_label_png, AugmentConfig, FewShotDataset, Label, TestEpisodes, TrainEpisodeSampler, VocOptions};
use image::{Rgb, RgbImage};

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    for sub in ["JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
    }
    let (w, h) = (500u32, 375u32);
    let mut ids = Vec::new();
    for i in 0..40u32 {
        let id = format!("b{i:03}");
        let (a, b) = ((i % 20 + 1) as u8, ((i + 7) % 20 + 1) as u8);
        let mut lab = vec![0u8; (w * h) as usize];
        for y in 0..h {
            for x in 0..w {
                let v = if (x as i32 - 150).pow(2) + (y as i32 - 180).pow(2) < 110 * 110 {
                    a
                } else if x > 300 && y > 60 && y < 330 {
                    b
                } else {
                    0
                };
                lab[(y * w + x) as usize] = v;
            }
        }
        // Textured image so JPEG decoding costs what a photo costs.
        let img = RgbImage::from_fn(w, h, |x, y| {
            let v = lab[(y * w + x) as usize] as u32;
            Rgb([((x * 7 + y * 3 + v * 40) % 256) as u8, ((x * y + v * 13) % 256) as u8, ((x ^ y) % 256) as u8])
        });
        img.save(root.join(format!("JPEGImages/{id}.jpg"))).expect("jpg");
        write_label_png(&root.join(format!("SegmentationClassAug/{id}.png")), &Label::new(w, h, lab)).expect("png");
        ids.push(id);
    }
    std::fs::write(root.join("ImageSets/Segmentation/train.txt"), ids.join("\n")).expect("list");
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), ids.join("\n")).expect("list");
    let ds = FewShotDataset::open_voc(root, &VocOptions::default()).expect("open");
    println!("threads: {}", rayon::current_num_threads());

    for crop in [480u32, 320, 256] {
        let mut s = TrainEpisodeSampler::new(&ds, 0, 1, 1, AugmentConfig::with_crop_size(crop)).expect("sampler");
        let _ = s.next_batch(8).expect("warm-up");
        let t = Instant::now();
        let mut views = 0;
        for _ in 0..8 {
            views += s.next_batch(8).expect("batch").iter().map(|e| 1 + e.supports.len()).sum::<usize>();
        }
        let secs = t.elapsed().as_secs_f64();
        println!("train crop {crop}: {:.1} episodes/s, {:.1} views/s (1-shot, batch 8)", 64.0 / secs, views as f64 / secs);
    }
    let eps = TestEpisodes::generate(&ds, 0, 1, 64, 4604572).expect("episodes");
    let t = Instant::now();
    let loaded = eps.load_range(&ds, 0..64, 480).expect("load");
    let secs = t.elapsed().as_secs_f64();
    println!("test views 480: {:.1} episodes/s, {:.1} views/s", loaded.len() as f64 / secs, 2.0 * loaded.len() as f64 / secs);
}
