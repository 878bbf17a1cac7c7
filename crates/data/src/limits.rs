//! How large an image or mask this crate agrees to decode.
//!
//! A PNG or JPEG header states the picture's size in a few bytes, and a decoder allocates the
//! frame from it: a few-MB all-zero PNG declaring 60000x60000 pixels would cost gigabytes, one
//! declaring a height of 2^31 aborts the process. Every decoder of this crate therefore reads the
//! header first and refuses, with [`DataError::TooLarge`] naming the file, any picture whose
//! declared width x height exceeds the limit, before anything of that size is allocated.
//!
//! The default, [`DEFAULT_MAX_PIXELS`] (8192 x 8192, 64 Mi pixels), is generous for real photos
//! (a 48-megapixel phone photo passes) and keeps the largest buffer a mask can need (16-bit RGBA,
//! 8 bytes a pixel) at 512 MiB. Raise or lower it with the environment variable
//! `MMFORMER_MAX_PIXELS` (a pixel count), or from code with [`set_max_pixels`], which takes
//! precedence over the variable.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{DataError, Result};

/// Default limit on width x height of any decoded image or mask: 8192², 64 Mi pixels.
pub const DEFAULT_MAX_PIXELS: u64 = 8192 * 8192;

/// Environment variable that overrides [`DEFAULT_MAX_PIXELS`].
pub const MAX_PIXELS_ENV: &str = "MMFORMER_MAX_PIXELS";

/// 0 = no override set from code.
static OVERRIDE: AtomicU64 = AtomicU64::new(0);

/// Sets the pixel limit for the whole process (`None`: back to `MMFORMER_MAX_PIXELS` or the
/// default). A limit of 0 is taken as 1: nothing can be decoded, but nothing is unbounded either.
pub fn set_max_pixels(limit: Option<u64>) {
    OVERRIDE.store(limit.map_or(0, |n| n.max(1)), Ordering::Relaxed);
}

/// The limit in force: [`set_max_pixels`], else `MMFORMER_MAX_PIXELS`, else the default. An
/// unparsable variable is an error (rather than silently the default), so a typo is noticed.
pub fn max_pixels() -> Result<u64> {
    match OVERRIDE.load(Ordering::Relaxed) {
        0 => parse_max_pixels(std::env::var(MAX_PIXELS_ENV).ok().as_deref()),
        n => Ok(n),
    }
}

/// Parses a value of `MMFORMER_MAX_PIXELS` (`None` or blank: the default). Underscores are
/// accepted as digit separators (`100_000_000`).
pub fn parse_max_pixels(value: Option<&str>) -> Result<u64> {
    let Some(text) = value.map(str::trim).filter(|t| !t.is_empty()) else { return Ok(DEFAULT_MAX_PIXELS) };
    match text.replace('_', "").parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(DataError::Config(format!("{MAX_PIXELS_ENV}={text:?} is not a positive pixel count (default {DEFAULT_MAX_PIXELS})"))),
    }
}

/// Refuses a picture whose declared size exceeds the limit in force; call it before allocating
/// the frame. `what` says what declared the size ("image", "mask PNG", an entry of a file).
pub(crate) fn check_pixels(path: &Path, what: impl Into<String>, width: u64, height: u64) -> Result<()> {
    check_pixels_within(path, what, width, height, max_pixels()?)
}

/// [`check_pixels`] against an explicit limit. An empty picture is refused too: nothing
/// downstream (resizing, cropping) has a meaning for it.
pub(crate) fn check_pixels_within(path: &Path, what: impl Into<String>, width: u64, height: u64, limit: u64) -> Result<()> {
    let refuse = |reason: String| Err(DataError::TooLarge { path: path.to_path_buf(), what: what.into(), width, height, reason });
    if width == 0 || height == 0 {
        return refuse("an empty picture".into());
    }
    // u32 x u32 cannot overflow u64, but a caller may pass wider header fields.
    match width.checked_mul(height) {
        Some(n) if n <= limit => Ok(()),
        _ => refuse(format!("more than the limit of {limit} pixels (set {MAX_PIXELS_ENV} to raise it)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_parse_or_are_refused_by_name() {
        assert_eq!(parse_max_pixels(None).unwrap(), DEFAULT_MAX_PIXELS);
        assert_eq!(parse_max_pixels(Some(" ")).unwrap(), DEFAULT_MAX_PIXELS);
        assert_eq!(parse_max_pixels(Some("100_000_000")).unwrap(), 100_000_000);
        for bad in ["0", "-5", "lots", "1e9"] {
            let e = parse_max_pixels(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(MAX_PIXELS_ENV) && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn sizes_at_the_limit_pass_and_above_it_are_refused() {
        let p = Path::new("x.png");
        check_pixels_within(p, "image", 8192, 8192, DEFAULT_MAX_PIXELS).unwrap();
        let e = check_pixels_within(p, "mask PNG", 8193, 8192, DEFAULT_MAX_PIXELS).unwrap_err().to_string();
        assert!(e.starts_with("x.png: mask PNG declares 8193x8192 pixels, more than the limit of 67108864") && e.contains(MAX_PIXELS_ENV), "{e}");
        assert!(check_pixels_within(p, "image", u64::MAX, 2, u64::MAX).is_err(), "overflow is refused, not wrapped");
        assert!(check_pixels_within(p, "image", 0, 5, 100).unwrap_err().to_string().contains("an empty picture"));
    }
}
