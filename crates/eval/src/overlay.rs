//! Pictures of episodes: support with its mask, query, prediction and ground truth side by side.

use image::{imageops, Rgb, RgbImage};

/// Blends `color` over the pixels where `mask` is 1 (255 = ignore is drawn in white).
pub fn tint(image: &RgbImage, mask: &[u8], color: [u8; 3]) -> RgbImage {
    let mut out = image.clone();
    for (i, p) in out.pixels_mut().enumerate() {
        match mask.get(i).copied().unwrap_or(0) {
            0 => {}
            255 => *p = Rgb([255, 255, 255]),
            _ => {
                for c in 0..3 {
                    p.0[c] = ((p.0[c] as u16 + color[c] as u16) / 2) as u8;
                }
            }
        }
    }
    out
}

/// One row: `[support₁ + mask, …, query, query + prediction, query + ground truth]`, every panel
/// resized to `panel` pixels high. Masks are row-major at their image's size.
pub fn episode_overlay(
    supports: &[(RgbImage, Vec<u8>)],
    query: &RgbImage,
    prediction: &[u8],
    ground_truth: &[u8],
    panel: u32,
) -> RgbImage {
    episode_overlay_methods(supports, query, &[(prediction, PREDICTION_COLOR)], ground_truth, panel)
}

/// Tint of the support masks (blue).
pub const SUPPORT_COLOR: [u8; 3] = [0, 120, 255];
/// Tint of a prediction (red).
pub const PREDICTION_COLOR: [u8; 3] = [255, 40, 40];
/// Tint of the ground truth (green).
pub const GROUND_TRUTH_COLOR: [u8; 3] = [40, 220, 40];

/// One row: `[support₁ + mask (blue), …, query, query + each prediction in its colour, query +
/// ground truth (green)]`, every panel resized to `panel` pixels high on a dark background with
/// 4-pixel gaps. Masks are row-major at their image's size (0/1, 255 drawn white).
pub fn episode_overlay_methods(
    supports: &[(RgbImage, Vec<u8>)],
    query: &RgbImage,
    predictions: &[(&[u8], [u8; 3])],
    ground_truth: &[u8],
    panel: u32,
) -> RgbImage {
    let scale = |im: &RgbImage| {
        let w = (im.width() as f64 * panel as f64 / im.height().max(1) as f64).round().max(1.0) as u32;
        imageops::resize(im, w, panel, imageops::FilterType::Triangle)
    };
    let mut panels: Vec<RgbImage> = supports.iter().map(|(im, m)| scale(&tint(im, m, SUPPORT_COLOR))).collect();
    panels.push(scale(query));
    for (mask, color) in predictions {
        panels.push(scale(&tint(query, mask, *color)));
    }
    panels.push(scale(&tint(query, ground_truth, GROUND_TRUTH_COLOR)));
    let gap = 4;
    let width = panels.iter().map(|p| p.width() + gap).sum::<u32>() - gap;
    let mut out = RgbImage::from_pixel(width, panel, Rgb([32, 32, 32]));
    let mut x = 0i64;
    for p in &panels {
        imageops::replace(&mut out, p, x, 0);
        x += (p.width() + gap) as i64;
    }
    out
}
