//! Per-pixel labels and their PNG encoding.
//!
//! Label PNGs are read with the `png` crate and no colour transformation, because the `image`
//! crate expands palette PNGs to RGB and the class ids (the palette indices) would be lost.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::sync::Arc;

use crate::error::{io_err, one_line, DataError, Result};

/// Label value of pixels that are not scored (VOC borders, padding, masked-out novel classes).
pub const IGNORE: u8 = 255;

/// A label map: one `u8` per pixel, row-major. 0 = background, 255 = ignore, other values are
/// class ids (or, for single-object masks, 1 = the object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl Label {
    /// Wraps row-major pixel data; `data.len()` must be `width * height`.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width as usize * height as usize, "label data does not match its size");
        Self { width, height, data }
    }

    pub fn filled(width: u32, height: u32, value: u8) -> Self {
        Self::new(width, height, vec![value; width as usize * height as usize])
    }

    pub fn width(&self) -> u32 {
        self.width
    }
    pub fn height(&self) -> u32 {
        self.height
    }
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    pub fn get(&self, x: u32, y: u32) -> u8 {
        self.data[y as usize * self.width as usize + x as usize]
    }

    /// Pixel count of every value 0..=255.
    pub fn histogram(&self) -> [u64; 256] {
        let mut h = [0u64; 256];
        for &v in &self.data {
            h[v as usize] += 1;
        }
        h
    }

    /// Number of pixels equal to `value`.
    pub fn count(&self, value: u8) -> u64 {
        self.data.iter().filter(|&&v| v == value).count() as u64
    }

    /// The episode label for one class: `value` -> 1, 255 -> 255, everything else -> 0.
    pub fn binary_for(&self, value: u8) -> Label {
        let data = self
            .data
            .iter()
            .map(|&v| if v == IGNORE { IGNORE } else { u8::from(v == value) })
            .collect();
        Label::new(self.width, self.height, data)
    }

    /// Sets every pixel whose value is in `values` (a 256-entry membership table) to 255.
    pub fn ignore_values(&mut self, values: &[bool; 256]) {
        for v in &mut self.data {
            if values[*v as usize] {
                *v = IGNORE;
            }
        }
    }

    /// Distinct values present, ascending.
    pub fn values_present(&self) -> Vec<u8> {
        let h = self.histogram();
        (0..=255u8).filter(|&v| h[v as usize] > 0).collect()
    }
}

/// How the pixel values of a mask PNG map to label values.
#[derive(Clone, Debug)]
pub enum MaskEncoding {
    /// Values are class ids (VOC, rendered COCO, synthetic): stored as they are.
    ClassIds,
    /// Values pass through a lookup table first (e.g. a labelme project's own class order mapped
    /// to VOC ids).
    Lookup(Arc<[u8; 256]>),
    /// A single-object mask. Palette PNGs: index 0 = background, 255 = ignore, other = object.
    /// Grayscale / RGB PNGs: (max channel) >= `threshold` = object, else background. Output uses
    /// 0 / 1 / 255.
    Binary { threshold: u8 },
}

/// Colour model of a decoded mask PNG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskColor {
    /// Palette indices, read raw.
    Indexed,
    /// Grayscale; sub-8-bit depths are scaled to 0..=255, 16-bit values saturate at 255.
    Gray,
    /// RGB(A); the value stored is the maximum channel (only meaningful for binary masks).
    Rgb,
}

/// Reads a mask PNG and returns its raw per-pixel values and colour model.
///
/// The size the header declares is checked against [`crate::limits`] before the frame is
/// allocated (the png crate's own memory limit covers metadata chunks and one row, not the frame
/// we allocate), and the file must run to its end chunk: a PNG cut short is an error, never a
/// mask with its last rows missing.
pub fn read_mask_png(path: &Path) -> Result<(Label, MaskColor)> {
    let file = File::open(path).map_err(io_err(path))?;
    let bad = |reason: String| DataError::MaskDecode { path: path.to_path_buf(), reason: one_line(reason) };
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let (width, height) = reader.info().size();
    crate::limits::check_pixels(path, "mask PNG", width as u64, height as u64)?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).map_err(|e| bad(e.to_string()))?;
    reader.finish().map_err(|e| bad(format!("{e} after the image data (truncated file?)")))?;
    let (w, h) = (frame.width, frame.height);
    let depth = frame.bit_depth as u8;
    let line = frame.line_size;
    let (color, channels) = match frame.color_type {
        png::ColorType::Indexed => (MaskColor::Indexed, 1),
        png::ColorType::Grayscale => (MaskColor::Gray, 1),
        png::ColorType::GrayscaleAlpha => (MaskColor::Gray, 2),
        png::ColorType::Rgb => (MaskColor::Rgb, 3),
        png::ColorType::Rgba => (MaskColor::Rgb, 4),
    };
    let mut out = Vec::with_capacity(w as usize * h as usize);
    for y in 0..h as usize {
        let row = &buf[y * line..(y + 1) * line];
        match depth {
            8 => {
                for x in 0..w as usize {
                    let px = &row[x * channels..(x + 1) * channels];
                    out.push(match color {
                        MaskColor::Rgb => px[0].max(px[1]).max(px[2]),
                        _ => px[0],
                    });
                }
            }
            16 => {
                for x in 0..w as usize {
                    let px = &row[x * channels * 2..(x + 1) * channels * 2];
                    out.push(match color {
                        MaskColor::Rgb => px[0].max(px[2]).max(px[4]),
                        // 16-bit id masks hold small values: keep them, saturating at 255
                        // (ignore) rather than taking the high byte (which would zero them).
                        _ => u16::from_be_bytes([px[0], px[1]]).min(255) as u8,
                    });
                }
            }
            1 | 2 | 4 => {
                // Sub-byte samples only exist for gray and palette (one channel).
                let per_byte = 8 / depth as usize;
                let maxv = (1u16 << depth) - 1;
                for x in 0..w as usize {
                    let byte = row[x / per_byte];
                    let shift = 8 - depth as usize * (x % per_byte + 1);
                    let v = (byte >> shift) as u16 & maxv;
                    out.push(match color {
                        // A 1-bit gray mask means black/white, not ids 0/1.
                        MaskColor::Gray => (v * 255 / maxv) as u8,
                        _ => v as u8,
                    });
                }
            }
            d => return Err(bad(format!("unsupported bit depth {d}"))),
        }
    }
    Ok((Label::new(w, h, out), color))
}

/// Reads a mask PNG and applies `encoding`, returning the label values.
pub fn read_label_png(path: &Path, encoding: &MaskEncoding) -> Result<Label> {
    let (mut label, color) = read_mask_png(path)?;
    match encoding {
        MaskEncoding::ClassIds => {
            if color == MaskColor::Rgb {
                return Err(DataError::MaskDecode {
                    path: path.to_path_buf(),
                    reason: "RGB mask cannot hold class ids: expected a palette (indexed) or 8-bit grayscale PNG".into(),
                });
            }
        }
        MaskEncoding::Lookup(table) => {
            for v in label.data_mut() {
                *v = table[*v as usize];
            }
        }
        MaskEncoding::Binary { threshold } => {
            for v in label.data_mut() {
                *v = match color {
                    MaskColor::Indexed => match *v {
                        0 => 0,
                        IGNORE => IGNORE,
                        _ => 1,
                    },
                    _ => u8::from(*v >= *threshold),
                };
            }
        }
    }
    Ok(label)
}

/// The PASCAL VOC colour map (bit-interleaved), used so written label PNGs look like VOC's.
pub fn voc_palette() -> [[u8; 3]; 256] {
    let mut pal = [[0u8; 3]; 256];
    for (i, entry) in pal.iter_mut().enumerate() {
        let mut c = i;
        let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
        for j in 0..8 {
            r |= ((c & 1) as u8) << (7 - j);
            g |= (((c >> 1) & 1) as u8) << (7 - j);
            b |= (((c >> 2) & 1) as u8) << (7 - j);
            c >>= 3;
        }
        *entry = [r, g, b];
    }
    pal
}

/// Writes a label as an 8-bit palette PNG with the VOC colour map (values stay raw indices).
pub fn write_label_png(path: &Path, label: &Label) -> Result<()> {
    let file = File::create(path).map_err(io_err(path))?;
    let bad = |e: png::EncodingError| DataError::PngWrite { path: path.to_path_buf(), reason: e.to_string() };
    let mut enc = png::Encoder::new(BufWriter::new(file), label.width(), label.height());
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(voc_palette().concat());
    let mut writer = enc.write_header().map_err(bad)?;
    writer.write_image_data(label.data()).map_err(bad)?;
    writer.finish().map_err(bad)?;
    Ok(())
}

/// Writes an 8-bit grayscale PNG (for tests and users' binary masks).
pub fn write_gray_png(path: &Path, width: u32, height: u32, data: &[u8]) -> Result<()> {
    let file = File::create(path).map_err(io_err(path))?;
    let bad = |e: png::EncodingError| DataError::PngWrite { path: path.to_path_buf(), reason: e.to_string() };
    let mut enc = png::Encoder::new(BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(bad)?;
    writer.write_image_data(data).map_err(bad)?;
    writer.finish().map_err(bad)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voc_palette_matches_known_entries() {
        let p = voc_palette();
        assert_eq!(p[0], [0, 0, 0]);
        assert_eq!(p[1], [128, 0, 0]);
        assert_eq!(p[15], [192, 128, 128]); // person
        assert_eq!(p[255], [224, 224, 192]); // VOC's ignore border colour
    }

    #[test]
    fn palette_png_round_trips_raw_indices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.png");
        let label = Label::new(3, 2, vec![0, 15, 255, 7, 7, 1]);
        write_label_png(&path, &label).unwrap();
        let back = read_label_png(&path, &MaskEncoding::ClassIds).unwrap();
        assert_eq!(back, label);
        // The image crate would give RGB colours here, not indices: check we do not.
        let (_, color) = read_mask_png(&path).unwrap();
        assert_eq!(color, MaskColor::Indexed);
    }

    #[test]
    fn binary_encoding_of_gray_and_palette() {
        let dir = tempfile::tempdir().unwrap();
        let gray = dir.path().join("g.png");
        write_gray_png(&gray, 4, 1, &[0, 100, 200, 255]).unwrap();
        let l = read_label_png(&gray, &MaskEncoding::Binary { threshold: 128 }).unwrap();
        assert_eq!(l.data(), &[0, 0, 1, 1]);
        let pal = dir.path().join("p.png");
        write_label_png(&pal, &Label::new(3, 1, vec![0, 9, 255])).unwrap();
        let l = read_label_png(&pal, &MaskEncoding::Binary { threshold: 128 }).unwrap();
        assert_eq!(l.data(), &[0, 1, 255]);
    }

    #[test]
    fn corrupt_png_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.png");
        std::fs::write(&path, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let err = read_label_png(&path, &MaskEncoding::ClassIds).unwrap_err().to_string();
        assert!(err.contains("broken.png"), "{err}");
        let missing = read_label_png(&dir.path().join("nope.png"), &MaskEncoding::ClassIds).unwrap_err().to_string();
        assert!(missing.contains("nope.png"), "{missing}");
    }

    #[test]
    fn sixteen_bit_gray_keeps_small_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g16.png");
        let mut enc = png::Encoder::new(std::fs::File::create(&path).unwrap(), 3, 1);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Sixteen);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0, 7, 0, 0, 255, 255]).unwrap();
        w.finish().unwrap();
        assert_eq!(read_label_png(&path, &MaskEncoding::ClassIds).unwrap().data(), &[7, 0, 255]);
    }

    #[test]
    fn binary_for_keeps_ignore() {
        let l = Label::new(4, 1, vec![0, 3, 255, 5]);
        assert_eq!(l.binary_for(3).data(), &[0, 1, 255, 0]);
    }
}
