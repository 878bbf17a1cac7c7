//! Scene sampling and rasterisation of one synthetic image and its label.
//!
//! Transcendental functions go through `libm` (pure Rust, same bits everywhere) rather than the
//! platform's libm, so the dataset is byte-identical across machines.

use std::sync::OnceLock;

use super::classes::{class_spec, Shape, Texture, NUM_CLASSES, PALETTES, SHAPES, TEXTURES};
use super::rng::Rng;

const TAU: f64 = std::f64::consts::TAU;

/// Knobs that `SyntheticConfig` passes down (already validated).
pub(crate) struct SceneParams {
    pub width: u32,
    pub height: u32,
    pub objects: (u32, u32),
    pub distractors: (u32, u32),
    pub ignore_border: u32,
    pub min_primary_pixels: u32,
}

/// Fraction of the image area a primary object aims to cover (before occlusion).
const PRIMARY_AREA: (f64, f64) = (0.07, 0.22);
/// Same for the other objects.
const EXTRA_AREA: (f64, f64) = (0.012, 0.09);
const DISTRACTOR_AREA: (f64, f64) = (0.008, 0.06);
/// Layout resamples before giving up and using the guaranteed fallback layout.
const MAX_ATTEMPTS: usize = 12;

/// Headroom the primary object's nominal area keeps over `min_primary_pixels`, for the pixels
/// lost to the ignore border and to partial occlusion.
pub(crate) const PRIMARY_HEADROOM: f64 = 1.5;

pub(crate) fn primary_area_range(p: &SceneParams) -> (f64, f64) {
    let img = p.width as f64 * p.height as f64;
    let lo = (PRIMARY_AREA.0 * img).max(PRIMARY_HEADROOM * p.min_primary_pixels as f64);
    (lo, (PRIMARY_AREA.1 * img).max(lo))
}

/// The image is big enough that the largest primary object fits inside it with room to move.
pub(crate) fn primary_fits(p: &SceneParams) -> bool {
    let img = p.width as f64 * p.height as f64;
    PRIMARY_HEADROOM * p.min_primary_pixels as f64 <= PRIMARY_AREA.1 * img
}

// ---------------------------------------------------------------------------------------------
// Geometry

#[derive(Clone, Copy, Debug)]
enum Outline {
    Object(Shape),
    Ellipse,
    Rect,
    Bar,
    /// Radial Fourier blob: r(θ) = base + Σ a_k cos(kθ + φ_k), k = 2..4.
    Blob([f64; 3], [f64; 3]),
}

/// Even–odd point-in-polygon test.
fn in_polygon(poly: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

struct Polygons {
    star: Vec<(f64, f64)>,
    triangle: Vec<(f64, f64)>,
    cross: Vec<(f64, f64)>,
    arrow: Vec<(f64, f64)>,
    lshape: Vec<(f64, f64)>,
}

fn polygons() -> &'static Polygons {
    static P: OnceLock<Polygons> = OnceLock::new();
    P.get_or_init(|| {
        let star = (0..10)
            .map(|k| {
                let a = -TAU / 4.0 + k as f64 * TAU / 10.0;
                let r = if k % 2 == 0 { 1.0 } else { 0.42 };
                (r * libm::cos(a), r * libm::sin(a))
            })
            .collect();
        let triangle = (0..3)
            .map(|k| {
                let a = -TAU / 4.0 + k as f64 * TAU / 3.0;
                (libm::cos(a), libm::sin(a))
            })
            .collect();
        let w = 0.32;
        let cross = vec![
            (-w, -1.0),
            (w, -1.0),
            (w, -w),
            (1.0, -w),
            (1.0, w),
            (w, w),
            (w, 1.0),
            (-w, 1.0),
            (-w, w),
            (-1.0, w),
            (-1.0, -w),
            (-w, -w),
        ];
        let arrow = vec![
            (-1.0, -0.22),
            (0.1, -0.22),
            (0.1, -0.62),
            (1.0, 0.0),
            (0.1, 0.62),
            (0.1, 0.22),
            (-1.0, 0.22),
        ];
        let lshape = vec![
            (-0.75, -1.0),
            (-0.2, -1.0),
            (-0.2, 0.45),
            (0.75, 0.45),
            (0.75, 1.0),
            (-0.75, 1.0),
        ];
        Polygons {
            star,
            triangle,
            cross,
            arrow,
            lshape,
        }
    })
}

fn shape_contains(shape: Shape, u: f64, v: f64) -> bool {
    let r2 = u * u + v * v;
    match shape {
        Shape::Star => in_polygon(&polygons().star, u, v),
        Shape::Triangle => in_polygon(&polygons().triangle, u, v),
        Shape::Cross => in_polygon(&polygons().cross, u, v),
        Shape::Arrow => in_polygon(&polygons().arrow, u, v),
        Shape::LShape => in_polygon(&polygons().lshape, u, v),
        Shape::Ring => (0.3025..=1.0).contains(&r2), // inner radius 0.55
        Shape::Crescent => {
            let (dx, dy) = (u - 0.45, v + 0.05);
            r2 <= 1.0 && dx * dx + dy * dy >= 0.78 * 0.78
        }
        Shape::Heart => {
            // (x²+y²-1)³ - x²y³ <= 0 with y pointing up, shrunk to fit the unit disk.
            let x = u * 1.2;
            let y = -v * 1.2 + 0.15;
            let q = x * x + y * y - 1.0;
            q * q * q - x * x * y * y * y <= 0.0
        }
        Shape::Gear => {
            if !(0.0484..=1.0).contains(&r2) {
                return false; // hub hole of radius 0.22, nothing beyond the tooth tips
            }
            let theta = libm::atan2(v, u);
            let teeth = 8.0 * (theta / TAU + 0.5);
            let tooth = teeth - libm::floor(teeth) < 0.5;
            r2 <= if tooth { 1.0 } else { 0.76 * 0.76 }
        }
        Shape::Teardrop => {
            // A round body plus a cone to a point at the top.
            let (cy, rad) = (0.3, 0.66);
            let dy = v - cy;
            if u * u + dy * dy <= rad * rad {
                return true;
            }
            (-1.0..=cy).contains(&v) && u.abs() <= rad * (v + 1.0) / (1.0 + cy)
        }
    }
}

impl Outline {
    fn contains(&self, u: f64, v: f64) -> bool {
        match *self {
            Outline::Object(s) => shape_contains(s, u, v),
            Outline::Ellipse => u * u + v * v <= 1.0,
            Outline::Rect => u.abs() <= 0.8 && v.abs() <= 0.8,
            Outline::Bar => u.abs() <= 1.0 && v.abs() <= 0.14,
            Outline::Blob(amp, phase) => {
                let r = libm::sqrt(u * u + v * v);
                if r > 1.0 {
                    return false;
                }
                let t = libm::atan2(v, u);
                let mut edge = 0.72;
                for k in 0..3 {
                    edge += amp[k] * libm::cos((k as f64 + 2.0) * t + phase[k]);
                }
                r <= edge
            }
        }
    }
}

/// Area of each class shape inside the unit square [-1.5, 1.5]², measured once on a fine grid,
/// so objects are scaled by target area and a thin shape (arrow) is not systematically smaller
/// than a fat one (ring).
fn unit_area(shape: Shape) -> f64 {
    static AREAS: OnceLock<Vec<f64>> = OnceLock::new();
    let areas = AREAS.get_or_init(|| {
        const N: usize = 300;
        let step = 3.0 / N as f64;
        SHAPES
            .iter()
            .map(|&s| {
                let mut hits = 0usize;
                for i in 0..N {
                    for j in 0..N {
                        let u = -1.5 + (i as f64 + 0.5) * step;
                        let v = -1.5 + (j as f64 + 0.5) * step;
                        hits += shape_contains(s, u, v) as usize;
                    }
                }
                hits as f64 * step * step
            })
            .collect()
    });
    let idx = SHAPES.iter().position(|&s| s == shape).unwrap_or(0);
    areas[idx]
}

/// A similarity-plus-aspect transform from image pixels to the outline's unit frame.
#[derive(Clone, Copy, Debug)]
struct Placement {
    cx: f64,
    cy: f64,
    cos: f64,
    sin: f64,
    /// Pixel half-extents along the two local axes.
    ax: f64,
    ay: f64,
}

impl Placement {
    fn sample(rng: &mut Rng, cx: f64, cy: f64, radius: f64, max_aspect: f64) -> Self {
        let angle = rng.range(0.0, TAU);
        let aspect = libm::exp(rng.range(-libm::log(max_aspect), libm::log(max_aspect)));
        Placement {
            cx,
            cy,
            cos: libm::cos(angle),
            sin: libm::sin(angle),
            ax: radius * aspect,
            ay: radius / aspect,
        }
    }

    fn local(&self, px: f64, py: f64) -> (f64, f64) {
        let dx = px - self.cx;
        let dy = py - self.cy;
        (
            (dx * self.cos + dy * self.sin) / self.ax,
            (-dx * self.sin + dy * self.cos) / self.ay,
        )
    }

    /// Pixel bounding box (x0, y0, x1, y1), half-open, clipped to the image. Outlines lie within
    /// radius 1.3 of their unit frame (the L-shape corner is the farthest at ≈1.25).
    fn bbox(&self, w: u32, h: u32) -> (u32, u32, u32, u32) {
        let r = 1.3 * self.ax.max(self.ay);
        let clip = |v: f64, hi: u32| v.max(0.0).min(hi as f64) as u32;
        (
            clip(libm::floor(self.cx - r), w),
            clip(libm::floor(self.cy - r), h),
            clip(libm::ceil(self.cx + r) + 1.0, w),
            clip(libm::ceil(self.cy + r) + 1.0, h),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Appearance

#[derive(Clone, Copy, Debug)]
struct Paint {
    texture: Texture,
    c1: [f64; 3],
    c2: [f64; 3],
    /// Texture period in unit-frame units.
    period: f64,
    phase: (f64, f64),
    /// Linear shading across the object: direction and strength.
    shade: (f64, f64, f64),
}

fn jitter_colour(rng: &mut Rng, c: [u8; 3]) -> [f64; 3] {
    let bright = rng.range(-18.0, 18.0);
    let mut out = [0.0; 3];
    for k in 0..3 {
        out[k] = (c[k] as f64 * rng.range(0.88, 1.12) + bright).clamp(0.0, 255.0);
    }
    out
}

fn random_colour(rng: &mut Rng) -> [f64; 3] {
    [
        rng.range(25.0, 230.0),
        rng.range(25.0, 230.0),
        rng.range(25.0, 230.0),
    ]
}

impl Paint {
    /// Two distinct colours of `palette`, in random order, each jittered: swapping the order
    /// keeps the mean colour from encoding the texture (flat would otherwise always be colour 1).
    fn from_palette(rng: &mut Rng, texture: Texture, palette: usize) -> Self {
        let cols = &PALETTES[palette].colours;
        let i = rng.below(cols.len() as u64) as usize;
        let j = (i + 1 + rng.below(cols.len() as u64 - 1) as usize) % cols.len();
        let (c1, c2) = (jitter_colour(rng, cols[i]), jitter_colour(rng, cols[j]));
        Self::with_colours(rng, texture, c1, c2)
    }

    fn with_colours(rng: &mut Rng, texture: Texture, c1: [f64; 3], c2: [f64; 3]) -> Self {
        let a = rng.range(0.0, TAU);
        Paint {
            texture,
            c1,
            c2,
            period: rng.range(0.24, 0.36),
            phase: (rng.f64(), rng.f64()),
            shade: (libm::cos(a), libm::sin(a), rng.range(0.04, 0.16)),
        }
    }

    fn colour(&self, u: f64, v: f64) -> [f64; 3] {
        let second = match self.texture {
            Texture::Flat => false,
            Texture::Stripes => (libm::floor(u / self.period + self.phase.0) as i64) & 1 == 1,
            Texture::Checker => {
                let a = libm::floor(u / self.period + self.phase.0) as i64;
                let b = libm::floor(v / self.period + self.phase.1) as i64;
                (a + b) & 1 == 1
            }
            Texture::Dots => {
                let p = self.period * 1.15;
                let fu = u / p + self.phase.0;
                let fv = v / p + self.phase.1;
                let du = fu - libm::floor(fu) - 0.5;
                let dv = fv - libm::floor(fv) - 0.5;
                du * du + dv * dv <= 0.3 * 0.3
            }
        };
        let base = if second { self.c2 } else { self.c1 };
        let mut gain = 1.0 + self.shade.2 * (u * self.shade.0 + v * self.shade.1);
        if self.texture == Texture::Flat {
            // Flat objects get a soft highlight so they are not perfectly uniform blobs.
            gain += 0.1 * (1.0 - (u * u + v * v).min(1.0));
        }
        [base[0] * gain, base[1] * gain, base[2] * gain]
    }
}

#[derive(Clone, Debug)]
struct Background {
    a: [f64; 3],
    b: [f64; 3],
    dir: (f64, f64),
    stripes: Option<Stripes>,
    value_noise: Option<ValueNoise>,
    noise_sigma: f64,
}

#[derive(Clone, Debug)]
struct Stripes {
    dir: (f64, f64),
    period: f64,
    phase: f64,
    amp: f64,
    tint: [f64; 3],
}

/// Smooth random field: random values on a coarse grid, smoothstep-interpolated.
#[derive(Clone, Debug)]
struct ValueNoise {
    cell: f64,
    gw: usize,
    grid: Vec<f64>,
    amp: f64,
    tint: [f64; 3],
}

fn random_tint(rng: &mut Rng) -> [f64; 3] {
    // Mostly luminance, sometimes coloured.
    let base = rng.range(0.6, 1.0);
    [
        base + rng.range(-0.4, 0.4),
        base + rng.range(-0.4, 0.4),
        base + rng.range(-0.4, 0.4),
    ]
}

fn background_colour(rng: &mut Rng) -> [f64; 3] {
    // Palette colours also appear in the background, so "has a palette colour" is no
    // foreground cue.
    if rng.chance(0.35) {
        let p = &PALETTES[rng.below(PALETTES.len() as u64) as usize];
        let k = rng.below(4) as usize;
        jitter_colour(rng, p.colours[k])
    } else {
        random_colour(rng)
    }
}

impl Background {
    fn sample(rng: &mut Rng, w: u32, h: u32) -> Self {
        let a = background_colour(rng);
        let b = background_colour(rng);
        let ang = rng.range(0.0, TAU);
        let stripes = rng.chance(0.5).then(|| {
            let t = rng.range(0.0, TAU);
            Stripes {
                dir: (libm::cos(t), libm::sin(t)),
                period: rng.range(6.0, 40.0),
                phase: rng.range(0.0, TAU),
                amp: rng.range(8.0, 30.0),
                tint: random_tint(rng),
            }
        });
        let value_noise = rng.chance(0.7).then(|| {
            let cell = rng.range(8.0, 48.0);
            let gw = (w as f64 / cell) as usize + 2;
            let gh = (h as f64 / cell) as usize + 2;
            let grid = (0..gw * gh).map(|_| rng.range(-1.0, 1.0)).collect();
            ValueNoise {
                cell,
                gw,
                grid,
                amp: rng.range(12.0, 45.0),
                tint: random_tint(rng),
            }
        });
        Background {
            a,
            b,
            dir: (libm::cos(ang), libm::sin(ang)),
            stripes,
            value_noise,
            noise_sigma: rng.range(3.0, 10.0),
        }
    }

    fn colour(&self, x: f64, y: f64, w: f64, h: f64) -> [f64; 3] {
        // Gradient parameter in [0, 1] across the image along `dir`.
        let half = 0.5 * (w * self.dir.0.abs() + h * self.dir.1.abs());
        let t =
            (((x - 0.5 * w) * self.dir.0 + (y - 0.5 * h) * self.dir.1) / half.max(1.0) + 1.0) * 0.5;
        let mut c: [f64; 3] = std::array::from_fn(|k| self.a[k] + (self.b[k] - self.a[k]) * t);
        if let Some(s) = &self.stripes {
            let d = x * s.dir.0 + y * s.dir.1;
            let val = s.amp * libm::sin(TAU * d / s.period + s.phase);
            for (ck, tk) in c.iter_mut().zip(s.tint) {
                *ck += val * tk;
            }
        }
        if let Some(n) = &self.value_noise {
            let gx = x / n.cell;
            let gy = y / n.cell;
            let (ix, iy) = (gx as usize, gy as usize);
            let smooth = |f: f64| f * f * (3.0 - 2.0 * f);
            let (fx, fy) = (smooth(gx - ix as f64), smooth(gy - iy as f64));
            let g = |i: usize, j: usize| n.grid[j * n.gw + i];
            let top = g(ix, iy) + (g(ix + 1, iy) - g(ix, iy)) * fx;
            let bot = g(ix, iy + 1) + (g(ix + 1, iy + 1) - g(ix, iy + 1)) * fx;
            let val = n.amp * (top + (bot - top) * fy);
            for (ck, tk) in c.iter_mut().zip(n.tint) {
                *ck += val * tk;
            }
        }
        c
    }
}

// ---------------------------------------------------------------------------------------------
// Scene

#[derive(Clone, Copy, Debug)]
struct Layer {
    outline: Outline,
    place: Placement,
    paint: Paint,
    /// Class id for objects, 0 for background distractors (which relabel what they cover as 0).
    class: u8,
}

struct Layout {
    background: Background,
    /// Draw order: later layers cover earlier ones in the image and in the label.
    layers: Vec<Layer>,
}

fn sample_object(
    rng: &mut Rng,
    p: &SceneParams,
    class: u8,
    area: (f64, f64),
    margin: f64,
) -> Layer {
    let spec = class_spec(class).expect("class ids are generated in 1..=NUM_CLASSES");
    let (w, h) = (p.width as f64, p.height as f64);
    let target = rng.range(area.0, area.1);
    let radius = libm::sqrt(target / unit_area(spec.shape));
    let cx = rng.range(margin * w, (1.0 - margin) * w);
    let cy = rng.range(margin * h, (1.0 - margin) * h);
    let place = Placement::sample(rng, cx, cy, radius, 1.3);
    let paint = Paint::from_palette(rng, spec.texture, spec.palette);
    Layer {
        outline: Outline::Object(spec.shape),
        place,
        paint,
        class,
    }
}

fn sample_distractor(rng: &mut Rng, p: &SceneParams) -> Layer {
    let (w, h) = (p.width as f64, p.height as f64);
    let outline = match rng.below(4) {
        0 => Outline::Ellipse,
        1 => Outline::Rect,
        2 => Outline::Bar,
        _ => Outline::Blob(
            [
                rng.range(0.0, 0.12),
                rng.range(0.0, 0.1),
                rng.range(0.0, 0.07),
            ],
            [
                rng.range(0.0, TAU),
                rng.range(0.0, TAU),
                rng.range(0.0, TAU),
            ],
        ),
    };
    let area = rng.range(DISTRACTOR_AREA.0, DISTRACTOR_AREA.1) * w * h;
    // Unit areas of the outlines: ellipse π, rect 2.56, bar 0.56, blob ≈ π·0.72².
    let unit = match outline {
        Outline::Ellipse => std::f64::consts::PI,
        Outline::Rect => 2.56,
        Outline::Bar => 0.56,
        _ => 1.63,
    };
    let radius = libm::sqrt(area / unit);
    let (cx, cy) = (rng.range(0.0, w), rng.range(0.0, h));
    let place = Placement::sample(rng, cx, cy, radius, 1.6);
    // Same textures and palettes as the classes, so neither is a foreground cue on its own.
    let texture = TEXTURES[rng.below(TEXTURES.len() as u64) as usize];
    let paint = if rng.chance(0.7) {
        let palette = rng.below(PALETTES.len() as u64) as usize;
        Paint::from_palette(rng, texture, palette)
    } else {
        let (c1, c2) = (random_colour(rng), random_colour(rng));
        Paint::with_colours(rng, texture, c1, c2)
    };
    Layer {
        outline,
        place,
        paint,
        class: 0,
    }
}

fn sample_layout(rng: &mut Rng, p: &SceneParams, primary: u8, fallback: bool) -> Layout {
    let background = Background::sample(rng, p.width, p.height);
    let n_obj = rng.int_incl(p.objects.0, p.objects.1) as usize;
    let n_dis = rng.int_incl(p.distractors.0, p.distractors.1) as usize;
    let mut objects = Vec::with_capacity(n_obj);
    let (lo, hi) = primary_area_range(p);
    // The fallback uses the smallest primary near the centre, so it is never clipped by the frame.
    let primary_obj = if fallback {
        sample_object(rng, p, primary, (lo, lo), 0.4)
    } else {
        sample_object(rng, p, primary, (lo, hi), 0.18)
    };
    objects.push(primary_obj);
    let img = p.width as f64 * p.height as f64;
    for _ in 1..n_obj {
        let class = 1 + rng.below(NUM_CLASSES as u64) as u8;
        objects.push(sample_object(
            rng,
            p,
            class,
            (EXTRA_AREA.0 * img, EXTRA_AREA.1 * img),
            0.05,
        ));
    }
    if fallback {
        // Guaranteed layout: the primary is drawn last and nothing covers it.
        objects.rotate_left(1);
    } else {
        rng.shuffle(&mut objects);
    }
    let mut layers = Vec::with_capacity(n_obj + n_dis);
    let mut on_top = Vec::new();
    for _ in 0..n_dis {
        let d = sample_distractor(rng, p);
        // About a quarter of distractors occlude objects, as clutter in front of things does.
        if !fallback && rng.chance(0.25) {
            on_top.push(d);
        } else {
            layers.push(d);
        }
    }
    layers.extend(objects);
    layers.extend(on_top);
    Layout { background, layers }
}

/// Per-pixel index of the topmost object layer (1-based into `layers`), 0 where background or a
/// distractor is on top.
fn rasterise_instances(layout: &Layout, w: u32, h: u32) -> Vec<u8> {
    let mut inst = vec![0u8; (w * h) as usize];
    for (k, layer) in layout.layers.iter().enumerate() {
        let (x0, y0, x1, y1) = layer.place.bbox(w, h);
        let id = if layer.class == 0 { 0 } else { (k + 1) as u8 };
        for y in y0..y1 {
            for x in x0..x1 {
                let (u, v) = layer.place.local(x as f64 + 0.5, y as f64 + 0.5);
                if layer.outline.contains(u, v) {
                    inst[(y * w + x) as usize] = id;
                }
            }
        }
    }
    inst
}

/// Class labels with a VOC-style ignore band: every pixel within Chebyshev distance `border` of
/// a change of instance (object/background or object/object, same class included) becomes 255.
fn labels_with_ignore(layout: &Layout, inst: &[u8], w: u32, h: u32, border: u32) -> Vec<u8> {
    let (wu, hu) = (w as usize, h as usize);
    let mut label: Vec<u8> = inst
        .iter()
        .map(|&i| {
            if i == 0 {
                0
            } else {
                layout.layers[i as usize - 1].class
            }
        })
        .collect();
    if border == 0 {
        return label;
    }
    let r = border as usize;
    // Separable sliding max/min over a (2r+1)² window; a pixel is on a boundary iff they differ.
    let mut row_max = vec![0u8; wu * hu];
    let mut row_min = vec![0u8; wu * hu];
    for y in 0..hu {
        for x in 0..wu {
            let (a, b) = (x.saturating_sub(r), (x + r).min(wu - 1));
            let row = &inst[y * wu + a..=y * wu + b];
            row_max[y * wu + x] = *row.iter().max().unwrap_or(&0);
            row_min[y * wu + x] = *row.iter().min().unwrap_or(&0);
        }
    }
    for y in 0..hu {
        let (a, b) = (y.saturating_sub(r), (y + r).min(hu - 1));
        for x in 0..wu {
            let mut mx = 0u8;
            let mut mn = u8::MAX;
            for yy in a..=b {
                mx = mx.max(row_max[yy * wu + x]);
                mn = mn.min(row_min[yy * wu + x]);
            }
            if mx != mn {
                label[y * wu + x] = 255;
            }
        }
    }
    label
}

fn paint_image(layout: &Layout, rng: &mut Rng, w: u32, h: u32) -> Vec<u8> {
    let (wf, hf) = (w as f64, h as f64);
    let mut rgb = vec![0f64; (w * h * 3) as usize];
    for y in 0..h {
        for x in 0..w {
            let c = layout
                .background
                .colour(x as f64 + 0.5, y as f64 + 0.5, wf, hf);
            let i = ((y * w + x) * 3) as usize;
            rgb[i..i + 3].copy_from_slice(&c);
        }
    }
    for layer in &layout.layers {
        let (x0, y0, x1, y1) = layer.place.bbox(w, h);
        for y in y0..y1 {
            for x in x0..x1 {
                let (u, v) = layer.place.local(x as f64 + 0.5, y as f64 + 0.5);
                if layer.outline.contains(u, v) {
                    let i = ((y * w + x) * 3) as usize;
                    rgb[i..i + 3].copy_from_slice(&layer.paint.colour(u, v));
                }
            }
        }
    }
    let sigma = layout.background.noise_sigma;
    rgb.iter()
        .map(|&c| libm::round(c + sigma * rng.normalish()).clamp(0.0, 255.0) as u8)
        .collect()
}

/// One finished image: RGB bytes (row-major, 3 per pixel) and label bytes (class id, 0, 255).
pub(crate) struct Rendered {
    pub rgb: Vec<u8>,
    pub label: Vec<u8>,
}

/// Renders one image whose `primary` class covers at least `min_primary_pixels` labelled pixels
/// (the layout is resampled until it does, then a fallback layout with the primary on top).
pub(crate) fn render(rng: &mut Rng, p: &SceneParams, primary: u8) -> Rendered {
    let (w, h) = (p.width, p.height);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let fallback = attempt >= MAX_ATTEMPTS;
        let layout = sample_layout(rng, p, primary, fallback);
        let inst = rasterise_instances(&layout, w, h);
        let label = labels_with_ignore(&layout, &inst, w, h, p.ignore_border);
        let visible = label.iter().filter(|&&l| l == primary).count();
        if fallback || visible >= p.min_primary_pixels as usize {
            let rgb = paint_image(&layout, rng, w, h);
            return Rendered { rgb, label };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_shapes_fit_their_bbox_radius() {
        // Anything inside an outline must lie within radius 1.3, or `bbox` would clip it.
        for &s in SHAPES.iter() {
            for i in 0..200 {
                for j in 0..200 {
                    let u = -2.0 + i as f64 * 0.02;
                    let v = -2.0 + j as f64 * 0.02;
                    if shape_contains(s, u, v) {
                        assert!(u * u + v * v <= 1.3 * 1.3, "{s:?} at ({u}, {v})");
                    }
                }
            }
            let a = unit_area(s);
            assert!(a > 0.8 && a < 3.2, "{s:?} area {a}");
        }
    }
}
