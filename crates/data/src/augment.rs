//! Training augmentation (spec §4.3) and the fixed-size test view (spec §1.1).
//!
//! Resampling follows the reference pipeline: images use Pillow's bilinear resampling (a
//! triangle filter widened when downscaling, fixed-point 8-bit arithmetic, horizontal pass then
//! vertical pass), labels use torch `nearest` (source index = floor(dst * in / out)). The colour
//! jitter reproduces the SSD transform, including OpenCV's 8-bit HSV conversion.

use image::RgbImage;

use crate::label::{Label, IGNORE};
use crate::rng::SeededRng;

/// ImageNet mean on the 0–255 scale (RGB).
pub const IMAGENET_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// ImageNet std on the 0–255 scale (RGB).
pub const IMAGENET_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// The paper's ResizeShortestEdge choices.
pub const PAPER_SHORT_EDGES: [u32; 11] = [320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960];
/// The paper's training crop / test size.
pub const PAPER_CROP_SIZE: u32 = 480;
/// Minimum support class area after augmentation at crop 480: 1.8 * 32 * 32.
pub const PAPER_MIN_SUPPORT_AREA: f64 = 1843.2;

/// Settings of the training augmentation.
#[derive(Clone, Debug, PartialEq)]
pub struct AugmentConfig {
    /// Square crop and pad size (480 in the paper).
    pub crop_size: u32,
    /// Short-edge lengths to choose from, uniformly.
    pub short_edges: Vec<u32>,
    /// Longest side cap after resizing.
    pub max_size: u32,
    /// SSD colour jitter on/off (off is useful for alignment checks).
    pub color_jitter: bool,
    /// Horizontal flip probability.
    pub flip_prob: f64,
    /// Raw value of padded image pixels (label padding is always 255).
    pub pad_value: u8,
    /// A support view is re-augmented until its class covers at least this many pixels.
    pub min_support_area: f64,
    /// Re-augmentations of one support image before another image of the class is tried.
    pub max_support_tries: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self::paper()
    }
}

impl AugmentConfig {
    /// Spec §4.3 / §4.4 values.
    pub fn paper() -> Self {
        Self {
            crop_size: PAPER_CROP_SIZE,
            short_edges: PAPER_SHORT_EDGES.to_vec(),
            max_size: 2048,
            color_jitter: true,
            flip_prob: 0.5,
            pad_value: 128,
            min_support_area: PAPER_MIN_SUPPORT_AREA,
            max_support_tries: 50,
        }
    }

    /// The paper's recipe scaled to another crop size (the CPU preset trains at 320 or 256):
    /// short edges and max size scale linearly, the minimum support area quadratically, so the
    /// same fraction of the crop is asked for.
    pub fn with_crop_size(crop_size: u32) -> Self {
        let f = crop_size as f64 / PAPER_CROP_SIZE as f64;
        let mut cfg = Self::paper();
        cfg.crop_size = crop_size;
        cfg.short_edges = PAPER_SHORT_EDGES.iter().map(|&s| ((s as f64 * f).round() as u32).max(1)).collect();
        cfg.max_size = ((2048.0 * f).round() as u32).max(1);
        cfg.min_support_area = PAPER_MIN_SUPPORT_AREA * f * f;
        cfg
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |m: &str| Err(crate::DataError::Config(m.to_string()));
        if self.crop_size == 0 {
            return bad("crop_size must be > 0");
        }
        if self.short_edges.is_empty() || self.short_edges.contains(&0) {
            return bad("short_edges must be non-empty and positive");
        }
        if self.max_size == 0 {
            return bad("max_size must be > 0");
        }
        if !(0.0..=1.0).contains(&self.flip_prob) {
            return bad("flip_prob must be in [0, 1]");
        }
        if self.max_support_tries == 0 {
            return bad("max_support_tries must be >= 1");
        }
        Ok(())
    }
}

/// detectron2 `ResizeShortestEdge.get_output_shape`: returns (new_h, new_w).
pub fn shortest_edge_size(h: u32, w: u32, short_edge: u32, max_size: u32) -> (u32, u32) {
    let (h, w) = (h as f64, w as f64);
    let size = short_edge as f64;
    let scale = size / h.min(w);
    let (mut nh, mut nw) = if h < w { (size, scale * w) } else { (scale * h, size) };
    if nh.max(nw) > max_size as f64 {
        let s = max_size as f64 / nh.max(nw);
        nh *= s;
        nw *= s;
    }
    ((nh + 0.5) as u32, (nw + 0.5) as u32)
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's per-output-pixel filter taps for one axis, in fixed point.
struct Taps {
    /// (first input index, number of taps) per output index.
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn bilinear_taps(in_size: usize, out_size: usize, out_start: usize, out_len: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support is 1
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_len);
    let mut weights = vec![0i32; out_len * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in (out_start..out_start + out_len).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; the clamp makes that equal to Pillow's behaviour.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let t = t.abs();
            let w = if t < 1.0 { 1.0 - t } else { 0.0 };
            *kx = w;
            ww += w;
        }
        for x in 0..xmax {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            weights[i * ksize + x] = if w < 0.0 {
                (-0.5 + w * (1i64 << PRECISION_BITS) as f64) as i32
            } else {
                (0.5 + w * (1i64 << PRECISION_BITS) as f64) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Taps { bounds, ksize, weights }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow-compatible bilinear resize of an RGB image to `out_w` x `out_h`, computing only the
/// window `[x0, x0+cw) x [y0, y0+ch)` of the output. Each output pixel depends only on its own
/// coordinate, so the window equals the same region of a full resize (cropping after resizing
/// without paying for the pixels the crop throws away).
pub fn resize_bilinear_window(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    x0: u32,
    y0: u32,
    cw: u32,
    ch: u32,
) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let (cw_, ch_) = (cw as usize, ch as usize);
    let need_h = in_w != out_w as usize;
    let need_v = in_h != out_h as usize;

    // Rows of the input the vertical pass will read.
    let vtaps = need_v.then(|| bilinear_taps(in_h, out_h as usize, y0 as usize, ch_));
    let (row_first, row_last) = match &vtaps {
        Some(t) => (
            t.bounds.iter().map(|b| b.0).min().unwrap_or(0),
            t.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0),
        ),
        None => (y0 as usize, y0 as usize + ch_),
    };
    let rows = row_last - row_first;

    // Horizontal pass into an intermediate rows x cw image (uint8, as Pillow stores it).
    let mut mid = vec![0u8; rows * cw_ * 3];
    if need_h {
        let t = bilinear_taps(in_w, out_w as usize, x0 as usize, cw_);
        for r in 0..rows {
            let srow = &src[(row_first + r) * in_w * 3..(row_first + r + 1) * in_w * 3];
            let drow = &mut mid[r * cw_ * 3..(r + 1) * cw_ * 3];
            for (x, &(xmin, xn)) in t.bounds.iter().enumerate() {
                let k = &t.weights[x * t.ksize..x * t.ksize + xn];
                let half = 1i32 << (PRECISION_BITS - 1);
                let (mut s0, mut s1, mut s2) = (half, half, half);
                for (j, &w) in k.iter().enumerate() {
                    let p = &srow[(xmin + j) * 3..(xmin + j) * 3 + 3];
                    s0 += p[0] as i32 * w;
                    s1 += p[1] as i32 * w;
                    s2 += p[2] as i32 * w;
                }
                drow[x * 3] = clip8(s0);
                drow[x * 3 + 1] = clip8(s1);
                drow[x * 3 + 2] = clip8(s2);
            }
        }
    } else {
        for r in 0..rows {
            let s = (row_first + r) * in_w * 3 + x0 as usize * 3;
            mid[r * cw_ * 3..(r + 1) * cw_ * 3].copy_from_slice(&src[s..s + cw_ * 3]);
        }
    }

    let Some(t) = vtaps else {
        return RgbImage::from_raw(cw, ch, mid).expect("window size");
    };
    let mut out = vec![0u8; ch_ * cw_ * 3];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; cw_ * 3];
    for (y, &(ymin, yn)) in t.bounds.iter().enumerate() {
        acc.fill(half);
        for j in 0..yn {
            let w = t.weights[y * t.ksize + j];
            let mrow = &mid[(ymin + j - row_first) * cw_ * 3..(ymin + j - row_first + 1) * cw_ * 3];
            for (a, &p) in acc.iter_mut().zip(mrow) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in out[y * cw_ * 3..(y + 1) * cw_ * 3].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage::from_raw(cw, ch, out).expect("window size")
}

/// Pillow-compatible bilinear resize of a whole image.
pub fn resize_bilinear(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    resize_bilinear_window(img, out_w, out_h, 0, 0, out_w, out_h)
}

/// torch `nearest` source index: floor(dst * (in / out)) with the scale in f32, clamped.
#[inline]
fn torch_nearest_index(dst: usize, in_size: usize, out_size: usize) -> usize {
    let scale = in_size as f32 / out_size as f32;
    (((dst as f32) * scale).floor() as usize).min(in_size - 1)
}

/// torch-nearest resize of a label to `out_w` x `out_h`, computing only the given window.
pub fn resize_label_window(label: &Label, out_w: u32, out_h: u32, x0: u32, y0: u32, cw: u32, ch: u32) -> Label {
    let (in_w, in_h) = (label.width() as usize, label.height() as usize);
    let xs: Vec<usize> =
        (x0 as usize..(x0 + cw) as usize).map(|x| torch_nearest_index(x, in_w, out_w as usize)).collect();
    let mut data = Vec::with_capacity(cw as usize * ch as usize);
    let src = label.data();
    for y in y0 as usize..(y0 + ch) as usize {
        let sy = torch_nearest_index(y, in_h, out_h as usize);
        let row = &src[sy * in_w..(sy + 1) * in_w];
        data.extend(xs.iter().map(|&sx| row[sx]));
    }
    Label::new(cw, ch, data)
}

/// torch-nearest resize of a whole label.
pub fn resize_label_nearest(label: &Label, out_w: u32, out_h: u32) -> Label {
    resize_label_window(label, out_w, out_h, 0, 0, out_w, out_h)
}

// ---- SSD colour jitter -------------------------------------------------------------------

const HSV_SHIFT: i32 = 12;

struct HsvTables {
    sdiv: [i32; 256],
    hdiv: [i32; 256],
}

fn hsv_tables() -> &'static HsvTables {
    static TABLES: std::sync::OnceLock<HsvTables> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let mut sdiv = [0i32; 256];
        let mut hdiv = [0i32; 256];
        for i in 1..256 {
            sdiv[i] = ((255 << HSV_SHIFT) as f64 / i as f64).round_ties_even() as i32;
            hdiv[i] = ((180 << HSV_SHIFT) as f64 / (6.0 * i as f64)).round_ties_even() as i32;
        }
        HsvTables { sdiv, hdiv }
    })
}

/// OpenCV 8-bit RGB -> HSV (H in 0..180).
fn rgb_to_hsv_u8(r: u8, g: u8, b: u8) -> [u8; 3] {
    let t = hsv_tables();
    let (r, g, b) = (r as i32, g as i32, b as i32);
    let v = r.max(g).max(b);
    let vmin = r.min(g).min(b);
    let diff = v - vmin;
    let vr = if v == r { -1 } else { 0 };
    let vg = if v == g { -1 } else { 0 };
    let s = (diff * t.sdiv[v as usize] + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT;
    let mut h = (vr & (g - b)) + (!vr & ((vg & (b - r + 2 * diff)) + (!vg & (r - g + 4 * diff))));
    h = (h * t.hdiv[diff as usize] + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT;
    if h < 0 {
        h += 180;
    }
    [h.clamp(0, 255) as u8, s as u8, v as u8]
}

/// OpenCV 8-bit HSV -> RGB (float path, rounded half-to-even like `saturate_cast`).
fn hsv_to_rgb_u8(h: u8, s: u8, v: u8) -> [u8; 3] {
    let mut h = h as f32;
    let s = s as f32 * (1.0 / 255.0);
    let v = v as f32 * (1.0 / 255.0);
    let (r, g, b);
    if s == 0.0 {
        r = v;
        g = v;
        b = v;
    } else {
        const SECTOR: [[usize; 3]; 6] = [[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]];
        h *= 6.0 / 180.0;
        while h < 0.0 {
            h += 6.0;
        }
        while h >= 6.0 {
            h -= 6.0;
        }
        let mut sector = h.floor() as i32;
        h -= sector as f32;
        if !(0..6).contains(&sector) {
            sector = 0;
            h = 0.0;
        }
        let tab = [v, v * (1.0 - s), v * (1.0 - s * h), v * (1.0 - s * (1.0 - h))];
        let idx = SECTOR[sector as usize];
        b = tab[idx[0]];
        g = tab[idx[1]];
        r = tab[idx[2]];
    }
    let q = |x: f32| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8;
    [q(r), q(g), q(b)]
}

/// numpy `(x.astype(float32) * alpha + beta).clip(0, 255).astype(uint8)`.
#[inline]
fn convert(x: u8, alpha: f32, beta: f32) -> u8 {
    (x as f32 * alpha + beta).clamp(0.0, 255.0) as u8
}

/// The SSD photometric distortion: brightness, then contrast before or after saturation + hue.
pub fn ssd_color_jitter(img: &mut RgbImage, rng: &mut SeededRng) {
    if rng.chance(0.5) {
        let beta = rng.uniform(-32.0, 32.0) as f32;
        for p in img.iter_mut() {
            *p = convert(*p, 1.0, beta);
        }
    }
    let contrast_first = rng.chance(0.5);
    let contrast = |img: &mut RgbImage, rng: &mut SeededRng| {
        if rng.chance(0.5) {
            let alpha = rng.uniform(0.5, 1.5) as f32;
            for p in img.iter_mut() {
                *p = convert(*p, alpha, 0.0);
            }
        }
    };
    if contrast_first {
        contrast(img, rng);
    }
    if rng.chance(0.5) {
        let alpha = rng.uniform(0.5, 1.5) as f32;
        map_hsv(img, |hsv| hsv[1] = convert(hsv[1], alpha, 0.0));
    }
    if rng.chance(0.5) {
        let delta = rng.int_inclusive(-18, 18) as i32;
        map_hsv(img, |hsv| hsv[0] = (hsv[0] as i32 + delta).rem_euclid(180) as u8);
    }
    if !contrast_first {
        contrast(img, rng);
    }
}

fn map_hsv(img: &mut RgbImage, f: impl Fn(&mut [u8; 3])) {
    for p in img.pixels_mut() {
        let mut hsv = rgb_to_hsv_u8(p[0], p[1], p[2]);
        f(&mut hsv);
        p.0 = hsv_to_rgb_u8(hsv[0], hsv[1], hsv[2]);
    }
}

// ---- the pipelines ----------------------------------------------------------------------

/// One training view: ResizeShortestEdge, random crop, colour jitter, flip, pad (spec §4.3).
/// Output is `crop_size` x `crop_size`; padding is `pad_value` in the image and 255 in the label.
pub fn augment_train(image: &RgbImage, label: &Label, cfg: &AugmentConfig, rng: &mut SeededRng) -> (RgbImage, Label) {
    debug_assert_eq!((image.width(), image.height()), (label.width(), label.height()));
    let short = cfg.short_edges[rng.index(cfg.short_edges.len())];
    let (nh, nw) = shortest_edge_size(image.height(), image.width(), short, cfg.max_size);
    let (nh, nw) = (nh.max(1), nw.max(1));
    let (ch, cw) = (nh.min(cfg.crop_size), nw.min(cfg.crop_size));
    let y0 = rng.index((nh - ch + 1) as usize) as u32;
    let x0 = rng.index((nw - cw + 1) as usize) as u32;
    let mut img = resize_bilinear_window(image, nw, nh, x0, y0, cw, ch);
    let mut lab = resize_label_window(label, nw, nh, x0, y0, cw, ch);
    if cfg.color_jitter {
        ssd_color_jitter(&mut img, rng);
    }
    if rng.chance(cfg.flip_prob) {
        image::imageops::flip_horizontal_in_place(&mut img);
        for row in lab.data_mut().chunks_mut(cw as usize) {
            row.reverse();
        }
    }
    pad_bottom_right(&img, &lab, cfg.crop_size, cfg.pad_value)
}

/// Pads at the bottom and right (as detectron2 does) to `size` x `size`.
pub fn pad_bottom_right(img: &RgbImage, label: &Label, size: u32, pad_value: u8) -> (RgbImage, Label) {
    let (w, h) = (img.width(), img.height());
    if w == size && h == size {
        return (img.clone(), label.clone());
    }
    let mut out = RgbImage::from_pixel(size, size, image::Rgb([pad_value; 3]));
    image::imageops::replace(&mut out, img, 0, 0);
    let mut lab = vec![IGNORE; (size * size) as usize];
    for y in 0..h as usize {
        lab[y * size as usize..y * size as usize + w as usize]
            .copy_from_slice(&label.data()[y * w as usize..(y + 1) * w as usize]);
    }
    (out, Label::new(size, size, lab))
}

/// The test view: image and label resized to exactly `size` x `size` (aspect ratio not kept),
/// bilinear image, torch-nearest label, no padding (spec §1.1).
pub fn test_view(image: &RgbImage, label: &Label, size: u32) -> (RgbImage, Label) {
    (resize_bilinear(image, size, size), resize_label_nearest(label, size, size))
}

/// A CHW float image normalised with the ImageNet mean/std, ready to become a (3, H, W) tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct NormalizedImage {
    /// (3, height, width), row-major per channel.
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

impl NormalizedImage {
    pub fn from_rgb(img: &RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = vec![0f32; 3 * w * h];
        let (r, rest) = data.split_at_mut(w * h);
        let (g, b) = rest.split_at_mut(w * h);
        for (i, p) in img.pixels().enumerate() {
            r[i] = (p[0] as f32 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
            g[i] = (p[1] as f32 - IMAGENET_MEAN[1]) / IMAGENET_STD[1];
            b[i] = (p[2] as f32 - IMAGENET_MEAN[2]) / IMAGENET_STD[2];
        }
        Self { data, height: h, width: w }
    }

    /// Back to 8-bit RGB (for overlays and debugging).
    pub fn to_rgb(&self) -> RgbImage {
        let n = self.width * self.height;
        let mut img = RgbImage::new(self.width as u32, self.height as u32);
        for (i, p) in img.pixels_mut().enumerate() {
            for c in 0..3 {
                p[c] = (self.data[c * n + i] * IMAGENET_STD[c] + IMAGENET_MEAN[c]).round().clamp(0.0, 255.0) as u8;
            }
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_matches_detectron2() {
        // 500x375 (w x h) to short edge 320: h is short; w = 320/375*500 = 426.67 -> 427.
        assert_eq!(shortest_edge_size(375, 500, 320, 2048), (320, 427));
        // Max-size cap: 100x1000 -> short 960 gives 9600 long side, capped to 2048.
        assert_eq!(shortest_edge_size(100, 1000, 960, 2048), (205, 2048));
    }

    #[test]
    fn pillow_bilinear_known_values() {
        // 1-D checks worked by hand with Pillow's algorithm.
        // Upscale [0, 100] x2: centres 0.25, 0.75 -> weights from the triangle filter.
        let img = RgbImage::from_raw(2, 1, vec![0, 0, 0, 100, 100, 100]).unwrap();
        let out = resize_bilinear(&img, 4, 1);
        let v: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        // Out 0: center 0.25 -> one tap (x=0). Out 1: center 0.75 -> x=0 w .75, x=1 w .25 -> 25.
        // Out 2: mirror -> 75. Out 3: one tap (x=1) -> 100.
        assert_eq!(v, vec![0, 25, 75, 100]);
    }

    /// Weighted checksum used by the reference values below: sum((i + 1) * v) mod 2^32.
    fn checksum(values: impl Iterator<Item = u8>) -> u64 {
        values.enumerate().fold(0u64, |acc, (i, v)| (acc + (i as u64 + 1) * v as u64) % (1 << 32))
    }

    fn reference_image() -> RgbImage {
        RgbImage::from_fn(53, 41, |x, y| {
            image::Rgb([((x * 37 + y * 11) % 256) as u8, ((x * x + 3 * y) % 256) as u8, ((x * y) % 256) as u8])
        })
    }

    /// Reference values computed with Pillow 13.0 `Image.resize(..., BILINEAR)`, OpenCV 5.0
    /// `cvtColor` and torch `F.interpolate(mode="nearest")` on the same inputs.
    #[test]
    fn matches_pillow_opencv_and_torch_reference_outputs() {
        let img = reference_image();
        let sizes = [(120u32, 97u32), (31, 17), (480, 480), (53, 90), (20, 41)];
        let pillow = [3271112544u64, 156793994, 3594556780, 4226067418, 378978695];
        for (&(w, h), &want) in sizes.iter().zip(&pillow) {
            let out = resize_bilinear(&img, w, h);
            assert_eq!(checksum(out.as_raw().iter().copied()), want, "Pillow bilinear {w}x{h}");
        }
        let label = Label::new(53, 41, (0..53 * 41).map(|i| (i % 251) as u8).collect());
        let torch = [4001423976u64, 14605054, 382299255, 1378800264, 41549753];
        for (&(w, h), &want) in sizes.iter().zip(&torch) {
            let out = resize_label_nearest(&label, w, h);
            assert_eq!(checksum(out.data().iter().copied()), want, "torch nearest {w}x{h}");
        }
        let steps: Vec<u8> = (0..=255).step_by(5).collect();
        let mut hsv = Vec::new();
        for &r in &steps {
            for &g in &steps {
                for &b in &steps {
                    hsv.extend(rgb_to_hsv_u8(r, g, b));
                }
            }
        }
        assert_eq!(checksum(hsv.into_iter()), 482429585, "OpenCV RGB2HSV");
        // HSV -> RGB: OpenCV's vectorised float path rounds a few exact .5 cases the other way
        // (2 of 5,780 grid points differ by 1), so samples are compared within 1.
        let samples = [
            ((0, 255, 255), [255, 0, 0]),
            ((30, 200, 100), [100, 100, 22]),
            ((60, 128, 200), [100, 200, 100]),
            ((90, 255, 50), [0, 50, 50]),
            ((105, 51, 255), [204, 229, 255]),
            ((120, 10, 240), [231, 231, 240]),
            ((150, 77, 180), [180, 126, 180]),
            ((175, 51, 153), [153, 122, 128]),
            ((179, 255, 255), [255, 0, 8]),
            ((45, 0, 99), [99, 99, 99]),
        ];
        for ((h, s, v), want) in samples {
            let got = hsv_to_rgb_u8(h, s, v);
            for c in 0..3 {
                assert!((got[c] as i32 - want[c]).abs() <= 1, "HSV ({h},{s},{v}): {got:?} vs OpenCV {want:?}");
            }
        }
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let mut rng = SeededRng::from_seed(3);
        let img = RgbImage::from_fn(37, 23, |_, _| image::Rgb([rng.index(256) as u8, rng.index(256) as u8, rng.index(256) as u8]));
        for &(ow, oh) in &[(80u32, 50u32), (20, 11), (37, 40), (60, 23)] {
            let full = resize_bilinear(&img, ow, oh);
            let win = resize_bilinear_window(&img, ow, oh, 5, 3, ow - 9, oh - 5);
            let crop = image::imageops::crop_imm(&full, 5, 3, ow - 9, oh - 5).to_image();
            assert_eq!(win, crop, "{ow}x{oh}");
        }
    }

    #[test]
    fn torch_nearest_is_floor_mapping() {
        let l = Label::new(4, 1, vec![1, 2, 3, 4]);
        // Downscale 4 -> 3: scale 4/3: src = floor(0), floor(1.33)=1, floor(2.67)=2.
        assert_eq!(resize_label_nearest(&l, 3, 1).data(), &[1, 2, 3]);
        // Upscale 4 -> 8: each source repeated twice.
        assert_eq!(resize_label_nearest(&l, 8, 1).data(), &[1, 1, 2, 2, 3, 3, 4, 4]);
    }

    #[test]
    fn hsv_round_trip_is_close_and_matches_opencv_samples() {
        // Values from cv2.cvtColor on single pixels (RGB order here).
        assert_eq!(rgb_to_hsv_u8(255, 0, 0), [0, 255, 255]);
        assert_eq!(rgb_to_hsv_u8(0, 255, 0), [60, 255, 255]);
        assert_eq!(rgb_to_hsv_u8(0, 0, 255), [120, 255, 255]);
        assert_eq!(rgb_to_hsv_u8(128, 128, 128), [0, 0, 128]);
        let mut rng = SeededRng::from_seed(9);
        for _ in 0..2000 {
            let (r, g, b) = (rng.index(256) as u8, rng.index(256) as u8, rng.index(256) as u8);
            let [h, s, v] = rgb_to_hsv_u8(r, g, b);
            let back = hsv_to_rgb_u8(h, s, v);
            for (a, c) in [r, g, b].iter().zip(back) {
                assert!((*a as i32 - c as i32).abs() <= 8, "{r},{g},{b} -> {back:?}");
            }
        }
    }

    #[test]
    fn normalization_round_trips() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([(x * 40) as u8, (y * 60) as u8, 7]));
        let n = NormalizedImage::from_rgb(&img);
        assert_eq!(n.data.len(), 3 * 5 * 4);
        assert!((n.data[0] - (0.0 - 123.675) / 58.395).abs() < 1e-6);
        assert_eq!(n.to_rgb(), img);
    }

    #[test]
    fn scaled_config() {
        let c = AugmentConfig::with_crop_size(240);
        assert_eq!(c.short_edges[0], 160);
        assert_eq!(*c.short_edges.last().unwrap(), 480);
        assert!((c.min_support_area - 460.8).abs() < 1e-9);
    }
}
