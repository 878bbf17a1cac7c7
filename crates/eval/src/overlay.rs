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
/// resized to `panel` pixels high under a labelled header. Masks are row-major at their image's
/// size.
pub fn episode_overlay(
    supports: &[(RgbImage, Vec<u8>)],
    query: &RgbImage,
    prediction: &[u8],
    ground_truth: &[u8],
    panel: u32,
) -> RgbImage {
    episode_overlay_methods(supports, query, &[("prediction", prediction, PREDICTION_COLOR)], ground_truth, panel)
}

/// Tint of the support masks (blue).
pub const SUPPORT_COLOR: [u8; 3] = [0, 120, 255];
/// Tint of a prediction (red).
pub const PREDICTION_COLOR: [u8; 3] = [255, 40, 40];
/// Tint of the ground truth (green).
pub const GROUND_TRUTH_COLOR: [u8; 3] = [40, 220, 40];

/// One row: `[support₁ + mask (blue), …, query, query + each prediction in its colour, query +
/// ground truth (green)]`, every panel resized to `panel` pixels high on a dark background with
/// 4-pixel gaps, under a header that names each panel in its colour (`support 1`, `query`, the
/// predictions' names, `ground truth`). Masks are row-major at their image's size (0/1, 255
/// drawn white).
pub fn episode_overlay_methods(
    supports: &[(RgbImage, Vec<u8>)],
    query: &RgbImage,
    predictions: &[(&str, &[u8], [u8; 3])],
    ground_truth: &[u8],
    panel: u32,
) -> RgbImage {
    let scale = |im: &RgbImage| {
        let w = (im.width() as f64 * panel as f64 / im.height().max(1) as f64).round().max(1.0) as u32;
        imageops::resize(im, w, panel, imageops::FilterType::Triangle)
    };
    let mut panels: Vec<(RgbImage, String, [u8; 3])> = supports
        .iter()
        .enumerate()
        .map(|(k, (im, m))| (scale(&tint(im, m, SUPPORT_COLOR)), format!("support {}", k + 1), SUPPORT_COLOR))
        .collect();
    panels.push((scale(query), "query".into(), [235, 235, 235]));
    for (name, mask, color) in predictions {
        panels.push((scale(&tint(query, mask, *color)), name.to_string(), *color));
    }
    panels.push((scale(&tint(query, ground_truth, GROUND_TRUTH_COLOR)), "ground truth".into(), GROUND_TRUTH_COLOR));
    let gap = 4;
    let header = header_height(panel);
    let width = panels.iter().map(|p| p.0.width() + gap).sum::<u32>() - gap;
    let mut out = RgbImage::from_pixel(width, panel + header, Rgb([32, 32, 32]));
    let mut x = 0i64;
    for (p, label, color) in &panels {
        draw_label(&mut out, x as u32, 3, label, *color, label_scale(panel), p.width());
        imageops::replace(&mut out, p, x, header as i64);
        x += (p.width() + gap) as i64;
    }
    out
}

/// Glyph magnification of the header: 8-pixel glyphs for small panels, 16 from 128 px up.
fn label_scale(panel: u32) -> u32 {
    if panel >= 128 {
        2
    } else {
        1
    }
}

/// Height of the label strip above the panels.
pub fn header_height(panel: u32) -> u32 {
    8 * label_scale(panel) + 6
}

/// Writes `text` with the 8×8 bitmap font at (x0, y0), each glyph pixel a `scale`² block,
/// clipped to `max_width` pixels.
fn draw_label(img: &mut RgbImage, x0: u32, y0: u32, text: &str, color: [u8; 3], scale: u32, max_width: u32) {
    use font8x8::UnicodeFonts;
    for (i, ch) in text.chars().enumerate() {
        let Some(glyph) = font8x8::BASIC_FONTS.get(ch) else { continue };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let rel_x = (i as u32 * 8 + col) * scale + dx;
                        let (x, y) = (x0 + rel_x, y0 + row as u32 * scale + dy);
                        if rel_x < max_width && x < img.width() && y < img.height() {
                            img.put_pixel(x, y, Rgb(color));
                        }
                    }
                }
            }
        }
    }
}
