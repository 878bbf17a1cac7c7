//! The 40 synthetic classes: shape family × texture × colour palette.
//!
//! Class `id` (1..=40) lives in fold `f = (id-1)/10` (the contiguous-block fold rule) and has shape
//! `s = (id-1) % 10`. Its texture is `(f - s) mod 4` and its palette `(s + 2·texture) mod 4`. This
//! Latin-square layout gives, for every fold, novel classes whose shape, texture and palette all
//! occur among that fold's base classes (only the combination is new), and makes every single
//! cue, and even every pair except (shape, texture), shared by several classes.

use serde::{Deserialize, Serialize};

pub const NUM_SHAPES: usize = 10;
pub const NUM_TEXTURES: usize = 4;
pub const NUM_PALETTES: usize = 4;
/// Total number of foreground classes (ids 1..=NUM_CLASSES).
pub const NUM_CLASSES: usize = NUM_SHAPES * NUM_TEXTURES;
pub const NUM_FOLDS: usize = 4;
pub const CLASSES_PER_FOLD: usize = NUM_CLASSES / NUM_FOLDS;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Shape {
    Star,
    Ring,
    Cross,
    Crescent,
    Heart,
    Arrow,
    Gear,
    Triangle,
    LShape,
    Teardrop,
}

pub const SHAPES: [Shape; NUM_SHAPES] = [
    Shape::Star,
    Shape::Ring,
    Shape::Cross,
    Shape::Crescent,
    Shape::Heart,
    Shape::Arrow,
    Shape::Gear,
    Shape::Triangle,
    Shape::LShape,
    Shape::Teardrop,
];

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Star => "star",
            Shape::Ring => "ring",
            Shape::Cross => "cross",
            Shape::Crescent => "crescent",
            Shape::Heart => "heart",
            Shape::Arrow => "arrow",
            Shape::Gear => "gear",
            Shape::Triangle => "triangle",
            Shape::LShape => "lshape",
            Shape::Teardrop => "teardrop",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Texture {
    /// One colour with smooth shading.
    Flat,
    /// Two-colour stripes along the object's own axis.
    Stripes,
    /// Two-colour checkerboard in object coordinates.
    Checker,
    /// Polka dots of the second colour on the first.
    Dots,
}

pub const TEXTURES: [Texture; NUM_TEXTURES] = [
    Texture::Flat,
    Texture::Stripes,
    Texture::Checker,
    Texture::Dots,
];

impl Texture {
    pub fn name(self) -> &'static str {
        match self {
            Texture::Flat => "flat",
            Texture::Stripes => "stripes",
            Texture::Checker => "checker",
            Texture::Dots => "dots",
        }
    }
}

/// A named set of sRGB colours; an instance paints with two distinct colours drawn from it.
pub struct Palette {
    pub name: &'static str,
    pub colours: [[u8; 3]; 4],
}

/// Hue families overlap at their edges (orange/yellow vs lime, cyan vs green, pink vs red) so a
/// jittered colour does not always reveal its palette either.
pub const PALETTES: [Palette; NUM_PALETTES] = [
    Palette {
        name: "ember",
        colours: [[205, 55, 40], [240, 140, 35], [235, 205, 70], [140, 35, 55]],
    },
    Palette {
        name: "ocean",
        colours: [
            [35, 85, 200],
            [55, 175, 215],
            [30, 45, 115],
            [125, 190, 235],
        ],
    },
    Palette {
        name: "moss",
        colours: [[50, 150, 60], [150, 190, 50], [30, 90, 45], [110, 130, 40]],
    },
    Palette {
        name: "dusk",
        colours: [
            [130, 60, 180],
            [210, 70, 160],
            [230, 150, 200],
            [75, 35, 110],
        ],
    },
];

/// What defines one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSpec {
    /// Class id as written in the label PNGs, 1..=NUM_CLASSES.
    pub id: u8,
    pub shape: Shape,
    pub texture: Texture,
    /// Index into [`PALETTES`].
    pub palette: usize,
}

impl ClassSpec {
    /// The fold in which this class is novel.
    pub fn fold(&self) -> usize {
        (self.id as usize - 1) / CLASSES_PER_FOLD
    }

    pub fn name(&self) -> String {
        format!(
            "{}-{}-{}",
            self.shape.name(),
            self.texture.name(),
            PALETTES[self.palette].name
        )
    }
}

/// The spec of class `id`, or `None` outside 1..=NUM_CLASSES.
pub fn class_spec(id: u8) -> Option<ClassSpec> {
    let k = id as usize;
    if k == 0 || k > NUM_CLASSES {
        return None;
    }
    let fold = (k - 1) / CLASSES_PER_FOLD;
    let s = (k - 1) % CLASSES_PER_FOLD;
    let t = (fold + NUM_TEXTURES - s % NUM_TEXTURES) % NUM_TEXTURES;
    let p = (s + 2 * t) % NUM_PALETTES;
    Some(ClassSpec {
        id,
        shape: SHAPES[s],
        texture: TEXTURES[t],
        palette: p,
    })
}

/// All class specs in id order.
pub fn class_specs() -> Vec<ClassSpec> {
    (1..=NUM_CLASSES as u8).filter_map(class_spec).collect()
}
