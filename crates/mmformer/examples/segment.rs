//! Segment a query image with one support image and its mask:
//!
//! ```text
//! cargo run --release -p mmformer --example segment -- MODEL SUPPORT.jpg SUPPORT_MASK.png QUERY.jpg OUT_MASK.png [cpu|cuda:0]
//! ```
use std::path::Path;

fn main() -> mmformer::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 5 {
        eprintln!("usage: segment MODEL SUPPORT MASK QUERY OUT [DEVICE]");
        std::process::exit(2);
    }
    let device = mmformer::parse_device(a.get(5).map_or("cpu", String::as_str))?;
    let model = mmformer::MmFormer::load(&a[0], &device)?;
    let support = mmformer::SupportImage::from_files(Path::new(&a[1]), Path::new(&a[2]), None)?;
    let query = mmformer::read_image(Path::new(&a[3]))?;
    let result = model.segment(&query, &[support])?;
    result.save_mask(Path::new(&a[4]))?;
    println!("{}: {:.1}% foreground", a[4], 100.0 * result.foreground_fraction());
    Ok(())
}
