//! Is an image file complete? The JPEG decoder behind `image` (zune-jpeg) decodes a file cut
//! short in its scan data without complaint, filling the missing part in, and the PNG decoder
//! does not need the end chunk once the pixels are read; a truncated download or a half-copied
//! dataset would then be trained on as if it were whole. These walks read the file's structure
//! (markers or chunks, not pixels) to its end marker and report where it stops short.

use std::io::{self, BufRead, Read, Seek, SeekFrom};

/// Why a file is not complete, for the caller's error naming the file.
pub(crate) type Incomplete = String;

fn eof_as_truncated(what: &str) -> impl Fn(io::Error) -> Incomplete + '_ {
    move |e| match e.kind() {
        io::ErrorKind::UnexpectedEof => format!("truncated: the file ends before its {what}"),
        _ => e.to_string(),
    }
}

/// Checks that a JPEG stream runs from its start-of-image marker through every segment and scan
/// to its end-of-image marker (FFD9). Bytes after that marker (e.g. appended MPF pictures) are not
/// read; a thumbnail inside an APP segment is skipped with its segment, so its own end marker
/// does not count.
pub(crate) fn jpeg_complete<R: BufRead>(mut r: R) -> Result<(), Incomplete> {
    const WHAT: &str = "JPEG end-of-image marker (FFD9)";
    let truncated = eof_as_truncated(WHAT);
    let mut soi = [0u8; 2];
    r.read_exact(&mut soi).map_err(&truncated)?;
    if soi != [0xFF, 0xD8] {
        return Err("not a JPEG stream (no start-of-image marker)".into());
    }
    loop {
        let Some(marker) = next_marker(&mut r).map_err(&truncated)? else {
            return Err(format!("truncated: the file ends before its {WHAT}"));
        };
        match marker {
            0xD9 => return Ok(()),
            // Restart markers inside a scan and TEM stand alone: no length follows.
            0xD0..=0xD7 | 0x01 => {}
            // Every other marker (SOS included: its header, then the entropy-coded data that
            // `next_marker` steps through) starts a segment with a 2-byte length.
            _ => {
                let mut len = [0u8; 2];
                r.read_exact(&mut len).map_err(&truncated)?;
                let len = u16::from_be_bytes(len);
                if len < 2 {
                    return Err(format!("corrupt: segment FF{marker:02X} declares length {len}"));
                }
                let skip = u64::from(len) - 2;
                let skipped = io::copy(&mut r.by_ref().take(skip), &mut io::sink()).map_err(|e| e.to_string())?;
                if skipped < skip {
                    return Err(format!("truncated: the file ends inside segment FF{marker:02X}, before its {WHAT}"));
                }
            }
        }
    }
}

/// The next marker code: the byte after an 0xFF that is neither a fill byte (FF) nor a stuffed
/// zero (00, an FF data byte in entropy-coded data). `None` at the end of the input.
fn next_marker<R: BufRead>(r: &mut R) -> io::Result<Option<u8>> {
    let mut after_ff = false;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        let mut found = None;
        for (i, &b) in buf.iter().enumerate() {
            if after_ff {
                match b {
                    0xFF => {}
                    0x00 => after_ff = false,
                    m => {
                        found = Some((i + 1, m));
                        break;
                    }
                }
            } else if b == 0xFF {
                after_ff = true;
            }
        }
        match found {
            Some((used, m)) => {
                r.consume(used);
                return Ok(Some(m));
            }
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    }
}

/// Checks that a PNG file runs chunk by chunk to its IEND chunk, CRC included. Chunk bodies are
/// skipped by seeking, not read.
pub(crate) fn png_complete<R: Read + Seek>(mut r: R) -> Result<(), Incomplete> {
    let truncated = eof_as_truncated("PNG end chunk (IEND)");
    let mut sig = [0u8; 8];
    r.read_exact(&mut sig).map_err(&truncated)?;
    if sig != *b"\x89PNG\r\n\x1a\n" {
        return Err("not a PNG file (bad signature)".into());
    }
    let end = r.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let mut pos = r.seek(SeekFrom::Start(8)).map_err(|e| e.to_string())?;
    loop {
        let mut head = [0u8; 8];
        r.read_exact(&mut head).map_err(&truncated)?;
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
        if len > i32::MAX as u32 {
            return Err(format!("corrupt: chunk {:?} declares length {len}", String::from_utf8_lossy(&head[4..])));
        }
        // Chunk = length, type, body, CRC.
        pos += 12 + u64::from(len);
        if pos > end {
            return Err(format!(
                "truncated: chunk {:?} runs past the end of the file, before its PNG end chunk (IEND)",
                String::from_utf8_lossy(&head[4..])
            ));
        }
        if &head[4..] == b"IEND" {
            return Ok(());
        }
        r.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn jpeg() -> Vec<u8> {
        let img = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 10) as u8, ((x ^ y) * 7) as u8]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
        out
    }

    fn png() -> Vec<u8> {
        let img = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 10) as u8, 3]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn whole_files_pass_and_every_cut_is_caught() {
        let j = jpeg();
        jpeg_complete(Cursor::new(&j)).unwrap();
        for cut in 0..j.len() {
            let e = jpeg_complete(Cursor::new(&j[..cut])).unwrap_err();
            assert!(e.contains("truncated") || e.contains("not a JPEG"), "cut at {cut}: {e}");
        }
        let p = png();
        png_complete(Cursor::new(&p)).unwrap();
        for cut in 0..p.len() {
            let e = png_complete(Cursor::new(&p[..cut])).unwrap_err();
            assert!(e.contains("truncated") || e.contains("not a PNG"), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn bytes_after_the_end_marker_are_allowed() {
        let mut j = jpeg();
        j.extend_from_slice(b"appended data \xFF\xD8 another picture");
        jpeg_complete(Cursor::new(&j)).unwrap();
        let mut p = png();
        p.extend_from_slice(b"trailing");
        png_complete(Cursor::new(&p)).unwrap();
    }
}
