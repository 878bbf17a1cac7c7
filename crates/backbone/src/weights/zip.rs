//! The zip container of `torch.save` (since PyTorch 1.6), read from memory with every size and
//! offset checked against the file before use.
//!
//! Only the central directory is trusted for sizes (torch writes data descriptors, so its local
//! headers carry zeros); a member's data must lie inside the file, a stored member's compressed
//! and declared sizes must agree, a deflated member is inflated into at most its declared size
//! (and a declared size beyond deflate's maximum ratio is refused before inflating), and every
//! member read is checked against its CRC-32.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
/// Deflate cannot expand more than 1032:1.
const MAX_DEFLATE_RATIO: u64 = 1032;

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    method: u16,
    crc: u32,
    compressed: u64,
    /// The declared (uncompressed) size.
    pub size: u64,
    local_offset: u64,
}

pub(crate) struct Archive<'a> {
    bytes: &'a [u8],
    entries: HashMap<String, Entry>,
    /// Names in central-directory order.
    pub names: Vec<String>,
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn to_usize(v: u64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} does not fit in memory"))
}

impl<'a> Archive<'a> {
    /// Reads the central directory.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        let truncated = || {
            format!(
                "no zip end-of-central-directory record in the last bytes of the file (truncated? {} bytes)",
                bytes.len()
            )
        };
        // The end record: 22 bytes plus a comment of up to 65535, at the end of the file.
        let lowest = bytes.len().saturating_sub(22 + 65535);
        let eocd = (lowest..=bytes.len().saturating_sub(22))
            .rev()
            .find(|&i| {
                le32(bytes, i) == Some(EOCD_SIG)
                    && le16(bytes, i + 20).is_some_and(|c| i + 22 + c as usize <= bytes.len())
            })
            .ok_or_else(truncated)?;
        let field16 = |o| le16(bytes, eocd + o).ok_or_else(truncated);
        let field32 = |o| le32(bytes, eocd + o).ok_or_else(truncated);
        let (disk, cd_disk) = (field16(4)?, field16(6)?);
        let mut count = field16(10)? as u64;
        let mut cd_size = field32(12)? as u64;
        let mut cd_offset = field32(16)? as u64;
        // Zip64 (torch always writes one): its locator sits just before the end record.
        if eocd >= 20 && le32(bytes, eocd - 20) == Some(ZIP64_LOCATOR_SIG) {
            let at = le64(bytes, eocd - 12).ok_or_else(truncated)?;
            let at = to_usize(at, "zip64 record offset")?;
            if at.checked_add(56).is_none_or(|end| end > eocd - 20) {
                return Err(format!("zip64 end record offset {at} is outside the file"));
            }
            if le32(bytes, at) != Some(ZIP64_EOCD_SIG) {
                return Err(format!("no zip64 end record at byte {at}"));
            }
            count = le64(bytes, at + 32).ok_or_else(truncated)?;
            cd_size = le64(bytes, at + 40).ok_or_else(truncated)?;
            cd_offset = le64(bytes, at + 48).ok_or_else(truncated)?;
        } else if disk != 0 || cd_disk != 0 {
            return Err("multi-disk zip archives are not supported".into());
        }
        let cd_start = to_usize(cd_offset, "central directory offset")?;
        let cd_len = to_usize(cd_size, "central directory size")?;
        let cd_end = cd_start
            .checked_add(cd_len)
            .filter(|&e| e <= eocd)
            .ok_or_else(|| {
                format!(
                    "central directory ({cd_size} bytes at {cd_offset}) is not inside the file of {} bytes",
                    bytes.len()
                )
            })?;
        // Each entry takes at least 46 bytes: the count cannot exceed what the directory holds.
        if count > (cd_len / 46) as u64 {
            return Err(format!(
                "central directory claims {count} entries in {cd_len} bytes"
            ));
        }
        let cd = &bytes[cd_start..cd_end];
        let mut entries = HashMap::new();
        let mut names = Vec::new();
        let mut at = 0usize;
        for n in 0..count {
            let entry_at = cd_start + at;
            let bad = |what: &str| format!("central directory entry {n} (byte {entry_at}): {what}");
            if le32(cd, at) != Some(CENTRAL_SIG) {
                return Err(bad("bad signature"));
            }
            let flags = le16(cd, at + 8).ok_or_else(|| bad("truncated"))?;
            let method = le16(cd, at + 10).ok_or_else(|| bad("truncated"))?;
            let crc = le32(cd, at + 16).ok_or_else(|| bad("truncated"))?;
            let mut compressed = le32(cd, at + 20).ok_or_else(|| bad("truncated"))? as u64;
            let mut size = le32(cd, at + 24).ok_or_else(|| bad("truncated"))? as u64;
            let name_len = le16(cd, at + 28).ok_or_else(|| bad("truncated"))? as usize;
            let extra_len = le16(cd, at + 30).ok_or_else(|| bad("truncated"))? as usize;
            let comment_len = le16(cd, at + 32).ok_or_else(|| bad("truncated"))? as usize;
            let mut local_offset = le32(cd, at + 42).ok_or_else(|| bad("truncated"))? as u64;
            let name_at = at + 46;
            let name = cd
                .get(name_at..name_at + name_len)
                .ok_or_else(|| bad("name runs past the directory"))?;
            let name = std::str::from_utf8(name)
                .map_err(|_| bad("name is not UTF-8"))?
                .to_string();
            let extra = cd
                .get(name_at + name_len..name_at + name_len + extra_len)
                .ok_or_else(|| bad("extra field runs past the directory"))?;
            if flags & 1 != 0 {
                return Err(bad("encrypted members are not supported"));
            }
            // Zip64 extended information: the 64-bit values, in order, of the fields saturated.
            if compressed == 0xffff_ffff || size == 0xffff_ffff || local_offset == 0xffff_ffff {
                let mut e = 0usize;
                let mut found = false;
                while e + 4 <= extra.len() {
                    let id = le16(extra, e).unwrap_or(0);
                    let len = le16(extra, e + 2).unwrap_or(0) as usize;
                    let body = extra
                        .get(e + 4..e + 4 + len)
                        .ok_or_else(|| bad("zip64 extra field runs past its entry"))?;
                    if id == 1 {
                        found = true;
                        let mut k = 0usize;
                        let mut next = |v: &mut u64| -> Result<(), String> {
                            if *v == 0xffff_ffff {
                                *v = le64(body, k)
                                    .ok_or_else(|| bad("zip64 extra field too short"))?;
                                k += 8;
                            }
                            Ok(())
                        };
                        next(&mut size)?;
                        next(&mut compressed)?;
                        next(&mut local_offset)?;
                        break;
                    }
                    e += 4 + len;
                }
                if !found {
                    return Err(bad("sizes saturated without a zip64 extra field"));
                }
            }
            at = name_at + name_len + extra_len + comment_len;
            if at > cd.len() {
                return Err(bad("comment runs past the directory"));
            }
            let entry = Entry {
                method,
                crc,
                compressed,
                size,
                local_offset,
            };
            if entries.insert(name.clone(), entry).is_some() {
                return Err(format!("member `{name}` appears twice"));
            }
            names.push(name);
        }
        Ok(Self {
            bytes,
            entries,
            names,
        })
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// The member's bytes, exactly its declared size (borrowed when stored, inflated when
    /// deflated), checked against its CRC-32.
    pub fn read(&self, name: &str) -> Result<Cow<'a, [u8]>, String> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| format!("no member `{name}`"))?;
        let bad = |what: String| format!("member `{name}`: {what}");
        let local = to_usize(e.local_offset, "local header offset").map_err(&bad)?;
        if le32(self.bytes, local) != Some(LOCAL_SIG) {
            return Err(bad(format!("no local header at byte {local}")));
        }
        let name_len =
            le16(self.bytes, local + 26).ok_or_else(|| bad("truncated local header".into()))?;
        let extra_len =
            le16(self.bytes, local + 28).ok_or_else(|| bad("truncated local header".into()))?;
        let start = local + 30 + name_len as usize + extra_len as usize;
        let compressed = to_usize(e.compressed, "compressed size").map_err(&bad)?;
        let data = start
            .checked_add(compressed)
            .and_then(|end| self.bytes.get(start..end))
            .ok_or_else(|| {
                bad(format!(
                    "{compressed} bytes at byte {start} run past the end of the file ({} bytes): truncated",
                    self.bytes.len()
                ))
            })?;
        let out: Cow<'a, [u8]> = match e.method {
            0 => {
                if e.compressed != e.size {
                    return Err(bad(format!(
                        "stored member of {} bytes declares {} bytes",
                        e.compressed, e.size
                    )));
                }
                Cow::Borrowed(data)
            }
            8 => {
                if e.size
                    > e.compressed
                        .saturating_mul(MAX_DEFLATE_RATIO)
                        .saturating_add(1024)
                {
                    return Err(bad(format!(
                        "declares {} bytes from {} deflated bytes, beyond deflate's maximum ratio",
                        e.size, e.compressed
                    )));
                }
                let size = to_usize(e.size, "member size").map_err(&bad)?;
                // Grown as output really comes (not preallocated from the declared size).
                let mut out = Vec::with_capacity(size.min(compressed.saturating_mul(2) + 4096));
                // One byte more than declared is read to tell a member that inflates to more.
                flate2::read::DeflateDecoder::new(data)
                    .take(e.size + 1)
                    .read_to_end(&mut out)
                    .map_err(|err| bad(format!("cannot inflate: {err}")))?;
                if out.len() != size {
                    return Err(bad(format!(
                        "inflates to {}{} bytes, declares {size}",
                        out.len(),
                        if out.len() > size { " or more" } else { "" }
                    )));
                }
                Cow::Owned(out)
            }
            m => return Err(bad(format!("compression method {m} is not supported"))),
        };
        let mut crc = flate2::Crc::new();
        crc.update(&out);
        if crc.sum() != e.crc {
            return Err(bad(format!(
                "CRC-32 {:08x} does not match the directory's {:08x} (corrupt data)",
                crc.sum(),
                e.crc
            )));
        }
        Ok(out)
    }
}
