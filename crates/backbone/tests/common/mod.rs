//! Shared by the integration tests: the weight fixtures, the fetched-asset check, and writers
//! for torch files byte by byte (pickles, the legacy format, the zip format).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A file of the torch-saved weight fixtures (`shared/fixtures/weights`).
pub fn fixture(name: &str) -> PathBuf {
    parity::weights_fixture_dir().join(name)
}

/// The fetched asset `p` (`cargo xtask fetch-assets`; CI fetches them). A test that needs it
/// fails without it, unless `MMFORMER_SKIP_ASSET_TESTS=1` says to skip: then it returns None
/// and prints `SKIPPED <test>`.
pub fn asset_or_skip(test: &str, p: PathBuf) -> Option<PathBuf> {
    if p.exists() {
        return Some(p);
    }
    if std::env::var("MMFORMER_SKIP_ASSET_TESTS").as_deref() == Ok("1") {
        eprintln!(
            "SKIPPED {test}: {} not found and MMFORMER_SKIP_ASSET_TESTS=1",
            p.display()
        );
        return None;
    }
    panic!(
        "{test}: {} not found: run `cargo xtask fetch-assets` or set MMFORMER_ASSETS (or set MMFORMER_SKIP_ASSET_TESTS=1 to skip)",
        p.display()
    );
}

/// The real EfficientNet-Lite0 weights (a legacy torch file), or None when skipping.
pub fn lite0_or_skip(test: &str) -> Option<PathBuf> {
    asset_or_skip(test, backbone::assets::efficientnet_lite0_path())
}

// --- Pickles (protocol 2) written by hand, byte for byte.

pub struct Pickle(pub Vec<u8>);

impl Pickle {
    pub fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    pub fn op(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.op(s.as_bytes())
    }
    pub fn int(&mut self, v: u32) -> &mut Self {
        self.0.push(b'J');
        self.op(&v.to_le_bytes())
    }
    /// Any integer, as LONG1 (8 bytes, two's complement).
    pub fn long(&mut self, v: i64) -> &mut Self {
        self.op(&[0x8a, 8]).op(&v.to_le_bytes())
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.op(format!("{module}\n{name}\n").as_bytes())
    }
    pub fn ints(&mut self, v: &[usize]) -> &mut Self {
        self.op(b"(");
        for &x in v {
            self.int(x as u32);
        }
        self.op(b"t")
    }
    pub fn longs(&mut self, v: &[i64]) -> &mut Self {
        self.op(b"(");
        for &x in v {
            self.long(x);
        }
        self.op(b"t")
    }
    /// `_rebuild_tensor_v2(('storage', torch.<class>, key, 'cpu', numel, None), offset, size,
    /// stride, False, OrderedDict())` (the legacy persistent id, with view metadata)
    pub fn tensor(
        &mut self,
        class: &str,
        key: &str,
        numel: usize,
        offset: usize,
        size: &[usize],
        stride: &[usize],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", class)
            .str(key)
            .str("cpu");
        self.int(numel as u32)
            .op(b"NtQ")
            .int(offset as u32)
            .ints(size)
            .ints(stride);
        self.op(b"\x89")
            .global("collections", "OrderedDict")
            .op(b")Rt")
            .op(b"R")
    }
    /// The same in the zip format: `('storage', torch.<class>, key, 'cpu', numel)`, any
    /// integers (as LONG1).
    pub fn zip_tensor(
        &mut self,
        class: &str,
        key: &str,
        numel: i64,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", class)
            .str(key)
            .str("cpu");
        self.long(numel)
            .op(b"tQ")
            .long(offset)
            .longs(size)
            .longs(stride);
        self.op(b"\x89")
            .global("collections", "OrderedDict")
            .op(b")Rt")
            .op(b"R")
    }
    pub fn stop(&mut self) -> Vec<u8> {
        self.0.push(b'.');
        std::mem::take(&mut self.0)
    }
}

pub const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The three pickles that open a legacy file: magic number, protocol version, sys info.
pub fn legacy_header() -> Vec<u8> {
    let mut file = Pickle::new().op(&[0x8a, 10]).op(&LEGACY_MAGIC).stop();
    file.extend(Pickle::new().op(b"M").op(&1001u16.to_le_bytes()).stop());
    let mut sys = Pickle::new();
    sys.op(b"}(")
        .str("protocol_version")
        .op(b"M")
        .op(&1001u16.to_le_bytes())
        .str("little_endian")
        .op(b"\x88");
    sys.str("type_sizes")
        .op(b"}(")
        .str("short")
        .op(b"K\x02")
        .str("int")
        .op(b"K\x04")
        .str("long")
        .op(b"K\x04")
        .op(b"uu");
    file.extend(sys.stop());
    file
}

/// A legacy file: header, the saved object's pickle, the storage key list, then each storage
/// as (element count, raw bytes).
pub fn legacy_file(object: Vec<u8>, storages: &[(&str, i64, Vec<u8>)]) -> Vec<u8> {
    let mut file = legacy_header();
    file.extend(object);
    let mut keys = Pickle::new();
    keys.op(b"](");
    for (k, _, _) in storages {
        keys.str(k);
    }
    keys.op(b"e");
    file.extend(keys.stop());
    for (_, numel, data) in storages {
        file.extend_from_slice(&numel.to_le_bytes());
        file.extend_from_slice(data);
    }
    file
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The bytes of `legacy.pth` (see [`write_legacy_fixture`]).
pub fn legacy_fixture_bytes() -> Vec<u8> {
    let mut sd = Pickle::new();
    sd.global("collections", "OrderedDict").op(b")R(");
    sd.str("a")
        .tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]);
    sd.str("a_t")
        .tensor("FloatStorage", "0", 6, 0, &[3, 2], &[1, 3]);
    sd.str("tail").tensor("FloatStorage", "1", 5, 2, &[3], &[1]);
    sd.str("count").tensor("LongStorage", "2", 1, 0, &[], &[]);
    sd.str("d").tensor("DoubleStorage", "3", 2, 0, &[2], &[1]);
    // `_metadata` as torch's OrderedDict state, merged by BUILD; not a tensor.
    sd.op(b"u}").str("_metadata").op(b"}").op(b"sb");
    legacy_file(
        sd.stop(),
        &[
            ("0", 6, f32_bytes(&[1., 2., 3., 4., 5., 6.])),
            ("1", 5, f32_bytes(&[10., 11., 12., 13., 14.])),
            ("2", 1, 1234i64.to_le_bytes().to_vec()),
            (
                "3",
                2,
                [0.25f64, -1e300]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ],
    )
}

/// Writes `legacy.pth`, a legacy (non-zip) torch file written by hand, byte for byte, in the
/// format `torch.save(..., _use_new_zipfile_serialization=False)` produces, with: `a` a (2, 3)
/// f32 tensor; `a_t` its transpose, a strided view of the same storage; `tail` a view at offset
/// 2 of another storage; `count` an int64 scalar; `d` an f64 vector. Storages are written in
/// key order "0" < "1" < "2" < "3".
pub fn write_legacy_fixture(dir: &Path) -> PathBuf {
    let path = dir.join("legacy.pth");
    std::fs::write(&path, legacy_fixture_bytes()).unwrap();
    path
}

// --- Zip files as torch writes them (stored members, CRC-32 in the central directory).

/// One member of a zip file to write: name, data, and how to store it.
pub struct Member {
    pub name: String,
    pub data: Vec<u8>,
    /// Deflate it (torch never does; other zip tools may).
    pub deflate: bool,
    /// Override of the declared (uncompressed) size.
    pub declared: Option<u32>,
}

impl Member {
    pub fn stored(name: impl Into<String>, data: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            data,
            deflate: false,
            declared: None,
        }
    }
}

pub fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// A zip file of `members`.
pub fn zip_file(members: &[Member]) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::new();
    let mut central = Vec::new();
    for m in members {
        let (method, body) = if m.deflate {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(&m.data).unwrap();
            (8u16, e.finish().unwrap())
        } else {
            (0u16, m.data.clone())
        };
        let crc = crc32(&m.data);
        let size = m.declared.unwrap_or(m.data.len() as u32);
        let offset = out.len() as u32;
        let header = |sig: u32, central: bool| {
            let mut h = Vec::new();
            h.extend_from_slice(&sig.to_le_bytes());
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&20u16.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // flags
            h.extend_from_slice(&method.to_le_bytes());
            h.extend_from_slice(&[0; 4]); // time, date
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(body.len() as u32).to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
            h.extend_from_slice(&(m.name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // extra
            if central {
                h.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
                h.extend_from_slice(&[0; 4]); // external attributes
                h.extend_from_slice(&offset.to_le_bytes());
            }
            h.extend_from_slice(m.name.as_bytes());
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend_from_slice(&body);
        central.extend(header(0x0201_4b50, true));
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// A torch zip file: `archive/data.pkl`, `archive/byteorder`, `archive/data/<key>` for each
/// storage, `archive/version`.
pub fn torch_zip(pkl: Vec<u8>, storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut members = vec![
        Member::stored("archive/data.pkl", pkl),
        Member::stored("archive/byteorder", b"little".to_vec()),
    ];
    for (k, d) in storages {
        members.push(Member::stored(format!("archive/data/{k}"), d.clone()));
    }
    members.push(Member::stored("archive/version", b"3\n".to_vec()));
    zip_file(&members)
}

/// The members of a well-formed zip file (as the fixtures are), by reading its central
/// directory the simple way (no zip64, stored members).
pub fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
    let eocd = (0..bytes.len() - 21)
        .rev()
        .find(|&i| bytes[i..i + 4] == [0x50, 0x4b, 5, 6])
        .unwrap();
    let (count, mut at) = (u16_at(eocd + 10), u32_at(eocd + 16));
    let mut out = Vec::new();
    for _ in 0..count {
        let (size, n, e, c, local) = (
            u32_at(at + 20),
            u16_at(at + 28),
            u16_at(at + 30),
            u16_at(at + 32),
            u32_at(at + 42),
        );
        let name = String::from_utf8(bytes[at + 46..at + 46 + n].to_vec()).unwrap();
        let start = local + 30 + u16_at(local + 26) + u16_at(local + 28);
        out.push((name, bytes[start..start + size].to_vec()));
        at += 46 + n + e + c;
    }
    out
}
