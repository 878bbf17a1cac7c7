//! The stage boundary: proposal shards.
//!
//! Stage 1 (`cache-proposals`) runs the frozen backbone and the Potential Objects Segmenter once
//! per image view and writes what stage 2 reads: the backbone features the mask-matching module
//! consumes, the N proposal masks (sigmoid, stride 4) and the label. Stage 2 never loads backbone
//! or POS weights; it reads these files.
//!
//! On disk, a shard folder holds:
//! - `shard-<k>.mms`: a header (magic, format version, JSON [`ShardSpec`]) followed by record
//!   payloads, each 64-byte aligned;
//! - `shard-<k>.idx`: the records of that shard, written after the shard itself, so a shard
//!   without its `.idx` is unfinished and is redone;
//! - `index.bin`: all records of all shards, merged from the `.idx` files.
//!
//! Both index files are a 24-byte header (magic, format version, payload length, CRC32 of the
//! payload) followed by the bincode payload, which must fill the rest of the file exactly.
//!
//! Every file is written to a temporary name and renamed into place. The index's checksum is
//! verified on open, and every shard number, offset, length and tensor layout it states is
//! checked against the spec and the real shard files before anything is sliced, so a corrupted
//! or hand-made index is an error naming the file and the record, never a panic or a read out of
//! bounds. Every record carries a CRC32 checked on read, and the shard size is checked on open,
//! so a truncated or corrupted shard is named in an error instead of being read as data. The
//! spec's fingerprints (model weights and preprocessing) must match what the reader expects, so
//! shards made by another model or another resize are refused, never silently mixed.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Bumped on any change of the byte layout. 3: `.idx` and `index.bin` in a checksummed
/// container (version 2 had bare bincode; its folders are rebuilt by `cache-proposals`).
pub const SHARD_FORMAT_VERSION: u32 = 3;
const MAGIC: &[u8; 8] = b"MMFSHARD";
const INDEX_MAGIC: &[u8; 8] = b"MMFINDEX";
const IDX_MAGIC: &[u8; 8] = b"MMFSHIDX";
/// Magic, version (u32), payload length (u64), CRC32 of the payload (u32).
const CONTAINER_HEADER: usize = 24;
const ALIGN: u64 = 64;
/// What to do about a shard folder this build cannot read.
const REBUILD: &str = "re-run `cargo xtask cache-proposals` with the same arguments to rebuild this folder";
/// Most bytes bincode may claim while decoding an index: a length field of a string or list is
/// checked against it before anything is allocated (a CRC only proves the bytes are the ones
/// written, not that whoever wrote them was friendly). Real indexes are a few MB.
const INDEX_DECODE_LIMIT: usize = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}: shard was made with {what} `{found}`, but this run expects `{expected}`; re-run cache-proposals into a fresh folder")]
    Mismatch { path: PathBuf, what: &'static str, found: String, expected: String },
    #[error("shard folder {dir}: no record for image `{image_id}` view {view}")]
    NoRecord { dir: PathBuf, image_id: String, view: ShardView },
    #[error("record `{image_id}`: {msg}")]
    Record { image_id: String, msg: String },
    /// A record of an index that does not fit the shards or the spec.
    #[error("{path}: record {record} ({image_id:?}, view {view}): {msg}")]
    BadRecord { path: PathBuf, record: usize, image_id: String, view: ShardView, msg: String },
}

pub type Result<T> = std::result::Result<T, ShardError>;

fn io_err(path: &Path, e: impl std::fmt::Display) -> ShardError {
    ShardError::File { path: path.to_path_buf(), msg: e.to_string() }
}

/// Storage precision of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StoredDType {
    F32,
    F16,
    BF16,
    /// Probabilities in [0, 1] quantised to 0..=255 (masks only).
    U8Prob,
    /// Raw bytes (labels).
    U8,
}

impl StoredDType {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::U8Prob | Self::U8 => 1,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "bf16" => Some(Self::BF16),
            "u8" => Some(Self::U8Prob),
            _ => None,
        }
    }
}

/// Which view of an image a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ShardView {
    /// The deterministic test view (resize to the model's square size).
    Test,
    /// The k-th seeded training augmentation of the image.
    Augmented(u32),
}

impl std::fmt::Display for ShardView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Test => write!(f, "test"),
            Self::Augmented(k) => write!(f, "aug{k}"),
        }
    }
}

/// What made a shard folder; a reader states what it expects and anything else is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardSpec {
    /// Hash of the backbone + POS weights that produced the proposals.
    pub model_fingerprint: String,
    /// Hash of the preprocessing (input size, normalisation, augmentation config and seed).
    pub preprocess_fingerprint: String,
    /// Backbone name and the feature levels stored, in order (e.g. res5, res4, res3).
    pub backbone: String,
    pub feature_names: Vec<String>,
    pub feature_dtype: StoredDType,
    pub mask_dtype: StoredDType,
    pub num_queries: usize,
}

/// A tensor as stored: name, shape, precision and its byte range inside the shard file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredTensorMeta {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StoredDType,
    /// Offset of the tensor from the start of the record payload.
    pub offset: u64,
    pub nbytes: u64,
}

/// Index entry of one record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordMeta {
    pub image_id: String,
    pub view: ShardView,
    /// Model input size (H, W) of this view.
    pub input_hw: (usize, usize),
    /// (class id, pixel count) of every class in the label, ascending by id, background (0)
    /// included, ignore (255) not: episodes are built from the index without reading payloads.
    pub classes: Vec<(u8, u32)>,
    pub shard: u32,
    /// Payload start in the shard file and its length.
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
    pub tensors: Vec<StoredTensorMeta>,
}

/// A record as produced by stage 1 / consumed by stage 2, in f32 (labels in u8).
#[derive(Clone, Debug, PartialEq)]
pub struct ProposalRecord {
    pub image_id: String,
    pub view: ShardView,
    pub input_hw: (usize, usize),
    /// Backbone features in `ShardSpec::feature_names` order: (shape (C, h, w), values).
    pub features: Vec<(Vec<usize>, Vec<f32>)>,
    /// Proposal probabilities (N, H/4, W/4).
    pub proposals: (Vec<usize>, Vec<f32>),
    /// Semantic label at the input size (H, W), 255 = ignore.
    pub label: Vec<u8>,
}

fn encode(values: &[f32], dtype: StoredDType, out: &mut Vec<u8>) {
    match dtype {
        StoredDType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        StoredDType::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        StoredDType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        StoredDType::U8Prob => values.iter().for_each(|v| out.push((v.clamp(0.0, 1.0) * 255.0).round() as u8)),
        StoredDType::U8 => values.iter().for_each(|v| out.push(*v as u8)),
    }
}

/// Decodes exactly `count` values from `bytes`: a byte count that is not `count` values of
/// `dtype` (short, or with bytes left over) is an error, not a silently shorter tensor.
fn decode(bytes: &[u8], dtype: StoredDType, count: usize) -> std::result::Result<Vec<f32>, String> {
    let want = count.checked_mul(dtype.size()).ok_or_else(|| format!("{count} values overflow"))?;
    if bytes.len() != want {
        return Err(format!("{} bytes hold {count} values of {dtype:?} only if they are {want}", bytes.len()));
    }
    if let Some(v) = decode_in_place(bytes, dtype, count) {
        return Ok(v);
    }
    Ok(decode_by_element(bytes, dtype))
}

/// [`decode`] of an aligned float record on a little-endian host: the stored values read in
/// place, then one copy (f32) or one vectorised conversion (f16 with F16C where the CPU has it,
/// bf16), instead of assembling each value from its bytes; `None` where that does not apply.
fn decode_in_place(bytes: &[u8], dtype: StoredDType, count: usize) -> Option<Vec<f32>> {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    if cfg!(target_endian = "big") {
        return None;
    }
    match dtype {
        StoredDType::F32 => bytemuck::try_cast_slice::<u8, f32>(bytes).ok().map(<[f32]>::to_vec),
        StoredDType::F16 | StoredDType::BF16 => {
            let bits = bytemuck::try_cast_slice::<u8, u16>(bytes).ok()?;
            let mut out = vec![0f32; count];
            if dtype == StoredDType::F16 {
                bits.reinterpret_cast::<f16>().convert_to_f32_slice(&mut out);
            } else {
                bits.reinterpret_cast::<bf16>().convert_to_f32_slice(&mut out);
            }
            Some(out)
        }
        StoredDType::U8Prob | StoredDType::U8 => None,
    }
}

/// [`decode`] value by value from the little-endian bytes, on any host and alignment.
fn decode_by_element(bytes: &[u8], dtype: StoredDType) -> Vec<f32> {
    match dtype {
        StoredDType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        StoredDType::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        StoredDType::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        StoredDType::U8Prob => bytes.iter().map(|&b| b as f32 / 255.0).collect(),
        StoredDType::U8 => bytes.iter().map(|&b| b as f32).collect(),
    }
}

/// Bytes one record takes on disk for the given shapes (for the disk-space check).
pub fn record_bytes(spec: &ShardSpec, feature_shapes: &[Vec<usize>], proposal_shape: &[usize], input_hw: (usize, usize)) -> u64 {
    let pad = |n: u64| n.div_ceil(ALIGN) * ALIGN;
    let feats: u64 = feature_shapes.iter().map(|s| pad((s.iter().product::<usize>() * spec.feature_dtype.size()) as u64)).sum();
    let masks = pad((proposal_shape.iter().product::<usize>() * spec.mask_dtype.size()) as u64);
    let label = pad((input_hw.0 * input_hw.1) as u64);
    feats + masks + label + 256 // index entry
}

fn shard_name(k: u32) -> String {
    format!("shard-{k:05}.mms")
}

fn idx_name(k: u32) -> String {
    format!("shard-{k:05}.idx")
}

fn bincode_cfg() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Wraps an encoded index in the checksummed container (see the module docs).
fn seal(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONTAINER_HEADER + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&SHARD_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the container of an index file and decodes its payload, which must be consumed
/// exactly. `what` names the kind of file in errors.
fn unseal<T: serde::de::DeserializeOwned>(path: &Path, magic: &[u8; 8], bytes: &[u8], what: &str) -> Result<T> {
    let bad = |msg: String| io_err(path, msg);
    if bytes.len() < CONTAINER_HEADER && magic.starts_with(&bytes[..bytes.len().min(8)]) {
        return Err(bad(format!("truncated {what}: {} bytes, its header alone is {CONTAINER_HEADER}; {REBUILD}", bytes.len())));
    }
    if bytes.get(..8) != Some(&magic[..]) {
        // Version 1 and 2 files were bare bincode; `index.bin` started with its format version
        // (a one-byte varint), `.idx` with the spec.
        let older = match (magic == INDEX_MAGIC, bytes.first()) {
            (true, Some(&v @ 1..=2)) => format!("index format version {v}"),
            _ => "an older format or another kind of file".into(),
        };
        return Err(bad(format!("not a {what} of this build ({older}, no checksum); {REBUILD}")));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != SHARD_FORMAT_VERSION {
        return Err(bad(format!("{what} format version {version}, this build reads {SHARD_FORMAT_VERSION}; {REBUILD}")));
    }
    let declared = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let payload = &bytes[CONTAINER_HEADER..];
    if payload.len() as u64 != declared {
        return Err(bad(if (payload.len() as u64) < declared {
            format!("truncated {what}: {} payload bytes, its header says {declared}", payload.len())
        } else {
            format!("{} trailing bytes after the {what}'s {declared} payload bytes", payload.len() as u64 - declared)
        }));
    }
    if crc32fast::hash(payload) != crc {
        return Err(bad(format!("{what} fails its checksum: the file is corrupted; {REBUILD}")));
    }
    let cfg = bincode_cfg().with_limit::<INDEX_DECODE_LIMIT>();
    let (value, used) =
        bincode::serde::decode_from_slice::<T, _>(payload, cfg).map_err(|e| bad(format!("malformed {what}: {e}")))?;
    if used != payload.len() {
        return Err(bad(format!("{} trailing bytes after the encoded {what}", payload.len() - used)));
    }
    Ok(value)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn header_bytes(spec: &ShardSpec) -> Vec<u8> {
    let json = serde_json::to_vec(spec).expect("spec serialises");
    let mut h = Vec::with_capacity(16 + json.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&SHARD_FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&(json.len() as u32).to_le_bytes());
    h.extend_from_slice(&json);
    h
}

fn read_header(path: &Path, bytes: &[u8]) -> Result<(ShardSpec, usize)> {
    let bad = |msg: &str| io_err(path, msg);
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(bad("not a proposal shard (bad magic)"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != SHARD_FORMAT_VERSION {
        return Err(bad(&format!("shard format version {version}, this build reads {SHARD_FORMAT_VERSION}; {REBUILD}")));
    }
    let n = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let json = bytes.get(16..16 + n).ok_or_else(|| bad("truncated header"))?;
    let spec = serde_json::from_slice(json).map_err(|e| bad(&format!("malformed header: {e}")))?;
    Ok((spec, 16 + n))
}

/// The header of a shard file, read without reading the payloads.
fn read_header_of(path: &Path) -> Result<ShardSpec> {
    let f = fs::File::open(path).map_err(|e| io_err(path, e))?;
    Ok(read_header_from(path, &f)?.0)
}

/// The header of an open shard file, and the header's length in bytes.
fn read_header_from(path: &Path, mut f: &fs::File) -> Result<(ShardSpec, usize)> {
    use std::io::Read;
    let mut head = [0u8; 16];
    f.read_exact(&mut head).map_err(|e| io_err(path, format!("{e} (reading the shard header)")))?;
    let n = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as u64;
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    // The JSON length comes from the file: bound it by the file before allocating for it.
    if 16 + n > len {
        return Err(io_err(path, "truncated header"));
    }
    let mut bytes = head.to_vec();
    f.take(n).read_to_end(&mut bytes).map_err(|e| io_err(path, e))?;
    read_header(path, &bytes)
}

/// Writes one shard: records are buffered and the file appears complete or not at all.
pub struct ShardWriter {
    dir: PathBuf,
    index: u32,
    spec: ShardSpec,
    bytes: Vec<u8>,
    records: Vec<RecordMeta>,
}

impl ShardWriter {
    pub fn new(dir: &Path, index: u32, spec: ShardSpec) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut bytes = header_bytes(&spec);
        bytes.resize(bytes.len().div_ceil(ALIGN as usize) * ALIGN as usize, 0);
        Ok(Self { dir: dir.to_path_buf(), index, spec, bytes, records: Vec::new() })
    }

    pub fn push(&mut self, r: &ProposalRecord) -> Result<()> {
        let rec_err = |msg: String| ShardError::Record { image_id: r.image_id.clone(), msg };
        if r.features.len() != self.spec.feature_names.len() {
            return Err(rec_err(format!("{} feature maps, the spec names {}", r.features.len(), self.spec.feature_names.len())));
        }
        if r.proposals.0.first() != Some(&self.spec.num_queries) {
            return Err(rec_err(format!("proposals of shape {:?}, expected {} queries", r.proposals.0, self.spec.num_queries)));
        }
        if r.label.len() != r.input_hw.0 * r.input_hw.1 {
            return Err(rec_err(format!("label has {} pixels, input is {:?}", r.label.len(), r.input_hw)));
        }
        let start = self.bytes.len() as u64;
        let mut tensors = Vec::new();
        let mut add = |name: &str, shape: &[usize], values: &[f32], dtype: StoredDType, bytes: &mut Vec<u8>| -> Result<()> {
            if shape.iter().product::<usize>() != values.len() {
                return Err(rec_err(format!("`{name}` has {} values for shape {shape:?}", values.len())));
            }
            let offset = bytes.len() as u64 - start;
            encode(values, dtype, bytes);
            let nbytes = bytes.len() as u64 - start - offset;
            bytes.resize(bytes.len().div_ceil(ALIGN as usize) * ALIGN as usize, 0);
            tensors.push(StoredTensorMeta { name: name.to_string(), shape: shape.to_vec(), dtype, offset, nbytes });
            Ok(())
        };
        for (name, (shape, values)) in self.spec.feature_names.iter().zip(&r.features) {
            add(name, shape, values, self.spec.feature_dtype, &mut self.bytes)?;
        }
        add("proposals", &r.proposals.0, &r.proposals.1, self.spec.mask_dtype, &mut self.bytes)?;
        let label: Vec<f32> = r.label.iter().map(|&b| b as f32).collect();
        add("label", &[r.input_hw.0, r.input_hw.1], &label, StoredDType::U8, &mut self.bytes)?;
        let len = self.bytes.len() as u64 - start;
        let crc32 = crc32fast::hash(&self.bytes[start as usize..]);
        let mut counts = [0u32; 256];
        r.label.iter().for_each(|&c| counts[c as usize] += 1);
        let classes: Vec<(u8, u32)> =
            (0..255u8).filter(|&c| counts[c as usize] > 0).map(|c| (c, counts[c as usize])).collect();
        self.records.push(RecordMeta {
            image_id: r.image_id.clone(),
            view: r.view,
            input_hw: r.input_hw,
            classes,
            shard: self.index,
            offset: start,
            len,
            crc32,
            tensors,
        });
        Ok(())
    }

    /// Writes `shard-<k>.mms`, then its `.idx`; returns the number of records.
    pub fn finish(self) -> Result<usize> {
        let shard = self.dir.join(shard_name(self.index));
        write_atomic(&shard, &self.bytes)?;
        let idx = ShardIdx { spec: self.spec, shard_len: self.bytes.len() as u64, records: self.records };
        let enc = bincode::serde::encode_to_vec(&idx, bincode_cfg()).expect("index serialises");
        write_atomic(&self.dir.join(idx_name(self.index)), &seal(IDX_MAGIC, &enc))?;
        Ok(idx.records.len())
    }
}

#[derive(Serialize, Deserialize)]
struct ShardIdx {
    spec: ShardSpec,
    shard_len: u64,
    records: Vec<RecordMeta>,
}

/// Is shard `k` complete in `dir` (both files present and of this format version, size as
/// recorded, same spec)? `cache-proposals` skips complete shards when it resumes, and redoes the
/// others, which is how a folder of an older format is rebuilt.
pub fn shard_is_complete(dir: &Path, k: u32, spec: &ShardSpec) -> bool {
    let Ok(idx) = read_idx(&dir.join(idx_name(k))) else { return false };
    let shard = dir.join(shard_name(k));
    let len = fs::metadata(&shard).map(|m| m.len()).ok();
    idx.spec == *spec && len == Some(idx.shard_len) && read_header_of(&shard).is_ok_and(|s| s == *spec)
}

fn read_idx(path: &Path) -> Result<ShardIdx> {
    let bytes = fs::read(path).map_err(|e| io_err(path, e))?;
    unseal(path, IDX_MAGIC, &bytes, "shard index")
}

/// The merged index of a shard folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format_version: u32,
    pub spec: ShardSpec,
    /// (shard number, byte length) of every shard.
    pub shards: Vec<(u32, u64)>,
    pub records: Vec<RecordMeta>,
}

impl ShardIndex {
    /// Merges every `shard-*.idx` in `dir` (whichever process or machine wrote them) into
    /// `index.bin`. All shards must share one spec.
    pub fn merge(dir: &Path) -> Result<ShardIndex> {
        let mut ks: Vec<u32> = fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("shard-")?.strip_suffix(".idx")?.parse().ok()
            })
            .collect();
        ks.sort_unstable();
        if ks.is_empty() {
            return Err(io_err(dir, "no finished shards (shard-*.idx) in this folder"));
        }
        let mut spec: Option<ShardSpec> = None;
        let mut shards = Vec::new();
        let mut records = Vec::new();
        for k in ks {
            let path = dir.join(idx_name(k));
            let idx = read_idx(&path)?;
            if let Some((i, r)) = idx.records.iter().enumerate().find(|(_, r)| r.shard != k) {
                return Err(ShardError::BadRecord {
                    path,
                    record: i,
                    image_id: r.image_id.clone(),
                    view: r.view,
                    msg: format!("names shard {}, but this is the index of shard {k}", r.shard),
                });
            }
            match &spec {
                None => spec = Some(idx.spec.clone()),
                Some(s) if *s != idx.spec => {
                    return Err(ShardError::Mismatch {
                        path,
                        what: "spec",
                        found: format!("{:?}", idx.spec),
                        expected: format!("{s:?}"),
                    })
                }
                _ => {}
            }
            shards.push((k, idx.shard_len));
            records.extend(idx.records);
        }
        let index = ShardIndex { format_version: SHARD_FORMAT_VERSION, spec: spec.expect("non-empty"), shards, records };
        // A bad `.idx` is reported here, naming the folder's index, rather than at every open.
        index.validate(&dir.join("index.bin"))?;
        index.write(dir)?;
        Ok(index)
    }

    /// Writes this index as `dir/index.bin` (checksummed container, atomic rename). It is not
    /// validated here: [`ShardIndex::load`] validates whatever it reads.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let enc = bincode::serde::encode_to_vec(self, bincode_cfg()).expect("index serialises");
        write_atomic(&dir.join("index.bin"), &seal(INDEX_MAGIC, &enc))
    }

    /// Reads `index.bin`: container and checksum first, then every record checked against the
    /// spec and the shard sizes the index lists ([`ShardReader::open`] then checks those sizes
    /// against the real files).
    pub fn load(dir: &Path) -> Result<ShardIndex> {
        let path = dir.join("index.bin");
        let bytes = fs::read(&path).map_err(|e| io_err(&path, format!("{e} (run cache-proposals, which writes it)")))?;
        let idx: ShardIndex = unseal(&path, INDEX_MAGIC, &bytes, "shard folder index")?;
        if idx.format_version != SHARD_FORMAT_VERSION {
            return Err(io_err(&path, format!("index format version {}, this build reads {SHARD_FORMAT_VERSION}; {REBUILD}", idx.format_version)));
        }
        idx.validate(&path)?;
        Ok(idx)
    }

    /// Checks every shard number, byte range and tensor layout of the index against the spec and
    /// the shard lengths it lists, so that reading a record can only slice inside its shard.
    /// `path` names the index in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let mut lens: HashMap<u32, u64> = HashMap::with_capacity(self.shards.len());
        for &(k, len) in &self.shards {
            if lens.insert(k, len).is_some() {
                return Err(io_err(path, format!("shard {k} is listed twice")));
            }
        }
        let n = self.spec.feature_names.len();
        for (i, r) in self.records.iter().enumerate() {
            let bad = |msg: String| ShardError::BadRecord { path: path.to_path_buf(), record: i, image_id: r.image_id.clone(), view: r.view, msg };
            let shard_len = *lens.get(&r.shard).ok_or_else(|| bad(format!("names shard {}, which the index does not list", r.shard)))?;
            if r.offset.checked_add(r.len).is_none_or(|end| end > shard_len) {
                return Err(bad(format!("payload at bytes {}+{} lies past the end of {} ({shard_len} bytes)", r.offset, r.len, shard_name(r.shard))));
            }
            if r.tensors.len() != n + 2 {
                return Err(bad(format!("{} tensors, the spec needs {} features + proposals + label", r.tensors.len(), n)));
            }
            let expected = self.spec.feature_names.iter().map(|f| (f.as_str(), self.spec.feature_dtype)).chain([
                ("proposals", self.spec.mask_dtype),
                ("label", StoredDType::U8),
            ]);
            for (t, (name, dtype)) in r.tensors.iter().zip(expected) {
                if t.name != name || t.dtype != dtype {
                    return Err(bad(format!("tensor `{}` ({:?}) where the spec has `{name}` ({dtype:?})", t.name, t.dtype)));
                }
                let count = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                let nbytes = count.and_then(|c| c.checked_mul(dtype.size())).map(|b| b as u64);
                if nbytes != Some(t.nbytes) {
                    return Err(bad(format!("tensor `{name}` of shape {:?} cannot take {} bytes", t.shape, t.nbytes)));
                }
                if t.offset.checked_add(t.nbytes).is_none_or(|e| e > r.len) {
                    return Err(bad(format!("tensor `{name}` at bytes {}+{} lies past the record's {} bytes", t.offset, t.nbytes, r.len)));
                }
            }
            let (proposals, label) = (&r.tensors[n], &r.tensors[n + 1]);
            if proposals.shape.first() != Some(&self.spec.num_queries) {
                return Err(bad(format!("proposals of shape {:?}, the spec has {} queries", proposals.shape, self.spec.num_queries)));
            }
            if label.shape != [r.input_hw.0, r.input_hw.1] {
                return Err(bad(format!("label of shape {:?} for an input of {:?}", label.shape, r.input_hw)));
            }
            if let Some(w) = r.classes.windows(2).find(|w| w[0].0 >= w[1].0) {
                return Err(bad(format!("class list out of order at class {}", w[1].0)));
            }
            if r.classes.iter().any(|&(c, _)| c == u8::MAX) {
                return Err(bad("class list holds the ignore value 255".into()));
            }
        }
        Ok(())
    }
}

/// What a stage-2 reader requires of the shards it reads.
#[derive(Clone, Debug, Default)]
pub struct ShardExpectation {
    pub model_fingerprint: Option<String>,
    pub preprocess_fingerprint: Option<String>,
}

/// Random-access reader of a shard folder.
///
/// Each record is read with one positional read into its own buffer, not through a memory map:
/// on a cold page cache a mapped record faults in a few pages at a time (measured: a stage-2
/// training batch's 8 records of 328 KB from freshly dropped caches, median 12.7–15.3 ms mapped
/// against 4.5–5.0 read), and a shard shortened after opening is then an I/O error naming it
/// instead of a SIGBUS. The shard is opened for each read rather than kept open: a COCO folder
/// has thousands of shards, more than a process's usual limit of open files, and an open costs
/// little beside a 328 KB read.
pub struct ShardReader {
    dir: PathBuf,
    pub index: ShardIndex,
    by_key: HashMap<(String, ShardView), usize>,
}

impl ShardReader {
    pub fn open(dir: &Path, expect: &ShardExpectation) -> Result<Self> {
        let index = ShardIndex::load(dir)?;
        let index_path = dir.join("index.bin");
        for (what, want, found) in [
            ("model weights", &expect.model_fingerprint, &index.spec.model_fingerprint),
            ("preprocessing", &expect.preprocess_fingerprint, &index.spec.preprocess_fingerprint),
        ] {
            if let Some(want) = want {
                if want != found {
                    return Err(ShardError::Mismatch { path: index_path.clone(), what, found: found.clone(), expected: want.clone() });
                }
            }
        }
        let mut payload_start = HashMap::new();
        for &(k, len) in &index.shards {
            let path = dir.join(shard_name(k));
            let f = fs::File::open(&path).map_err(|e| io_err(&path, e))?;
            let size = f.metadata().map_err(|e| io_err(&path, e))?.len();
            if size != len {
                return Err(io_err(&path, format!("shard is {size} bytes, its index says {len}: truncated or replaced")));
            }
            let (spec, header_len) = read_header_from(&path, &f)?;
            if spec != index.spec {
                return Err(ShardError::Mismatch { path, what: "spec", found: format!("{spec:?}"), expected: format!("{:?}", index.spec) });
            }
            payload_start.insert(k, header_len as u64);
        }
        // `load` checked every record against the listed lengths, now equal to the real ones;
        // a payload must also start after its shard's header (so every record names a shard
        // checked here).
        for (i, r) in index.records.iter().enumerate() {
            if payload_start.get(&r.shard).is_none_or(|&start| r.offset < start) {
                return Err(ShardError::BadRecord {
                    path: index_path.clone(),
                    record: i,
                    image_id: r.image_id.clone(),
                    view: r.view,
                    msg: format!("payload at byte {} overlaps the header of {}", r.offset, shard_name(r.shard)),
                });
            }
        }
        let by_key = index.records.iter().enumerate().map(|(i, r)| ((r.image_id.clone(), r.view), i)).collect();
        Ok(Self { dir: dir.to_path_buf(), index, by_key })
    }

    pub fn spec(&self) -> &ShardSpec {
        &self.index.spec
    }

    pub fn len(&self) -> usize {
        self.index.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.records.is_empty()
    }

    pub fn records(&self) -> &[RecordMeta] {
        &self.index.records
    }

    /// The record of `image_id` in `view`, checksum-verified.
    pub fn get(&self, image_id: &str, view: ShardView) -> Result<ProposalRecord> {
        let i = *self.by_key.get(&(image_id.to_string(), view)).ok_or_else(|| ShardError::NoRecord {
            dir: self.dir.clone(),
            image_id: image_id.to_string(),
            view,
        })?;
        self.get_at(i)
    }

    /// The `i`-th record of the index, checksum-verified.
    ///
    /// `open` validated the index against the files, so the slicing below cannot fail; it still
    /// goes through `get`, so that a bug there is an error naming the record, not a panic. The
    /// read itself fails, naming the shard and the record, if the shard was removed or shortened
    /// since; a shard rewritten since fails the record's checksum.
    pub fn get_at(&self, i: usize) -> Result<ProposalRecord> {
        let meta = self.index.records.get(i).ok_or_else(|| io_err(&self.dir, format!("record {i} out of range")))?;
        let path = self.dir.join(shard_name(meta.shard));
        let bad = |msg: String| ShardError::BadRecord { path: path.clone(), record: i, image_id: meta.image_id.clone(), view: meta.view, msg };
        let range = |offset: u64, len: u64| -> Option<std::ops::Range<usize>> {
            let start = usize::try_from(offset).ok()?;
            Some(start..start.checked_add(usize::try_from(len).ok()?)?)
        };
        let changed = |e: std::io::Error| io_err(&path, format!("record `{}` ({}): {e} (the shard changed after it was opened?)", meta.image_id, meta.view));
        let file = fs::File::open(&path).map_err(changed)?;
        // `open` checked every record against the file's length, so the length is bounded by it.
        let len = usize::try_from(meta.len).map_err(|_| bad("payload length overflows".into()))?;
        // Words, so that the payload's 64-byte-aligned tensors can be read in place as f32/f16.
        let mut words = vec![0u32; len.div_ceil(4)];
        let payload = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..len];
        read_exact_at(&file, payload, meta.offset).map_err(changed)?;
        let payload = &*payload;
        let crc = crc32fast::hash(payload);
        if crc != meta.crc32 {
            return Err(io_err(&path, format!("record `{}` ({}) fails its checksum: the shard is corrupted, or was rewritten after it was opened", meta.image_id, meta.view)));
        }
        let bytes = |t: &StoredTensorMeta| -> Result<&[u8]> {
            range(t.offset, t.nbytes).and_then(|r| payload.get(r)).ok_or_else(|| bad(format!("tensor `{}` lies outside the record", t.name)))
        };
        let tensor = |t: &StoredTensorMeta| -> Result<(Vec<usize>, Vec<f32>)> {
            let count = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("tensor `{}`: shape overflows", t.name)))?;
            let values = decode(bytes(t)?, t.dtype, count).map_err(|e| bad(format!("tensor `{}`: {e}", t.name)))?;
            Ok((t.shape.clone(), values))
        };
        let n = self.index.spec.feature_names.len();
        let [features @ .., p, l] = meta.tensors.as_slice() else {
            return Err(bad(format!("{} tensors, the spec needs {}", meta.tensors.len(), n + 2)));
        };
        let features = features.iter().map(tensor).collect::<Result<Vec<_>>>()?;
        Ok(ProposalRecord {
            image_id: meta.image_id.clone(),
            view: meta.view,
            input_hw: meta.input_hw,
            features,
            proposals: tensor(p)?,
            label: bytes(l)?.to_vec(),
        })
    }
}

/// Fills `buf` from `file` at `offset`. Each read names its own offset, so reads of one file from
/// several threads do not interfere (on Windows `seek_read` also moves the file's cursor, which
/// nothing here uses).
#[cfg(unix)]
fn read_exact_at(file: &fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &fs::File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Stable 64-bit FNV-1a fingerprint of byte chunks, printed as hex (model weights, configs).
pub fn fingerprint<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for c in chunks {
        for &b in c {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        // Separate chunks so ("ab","c") and ("a","bc") differ.
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Which work items (shard numbers) process `i` of `n` handles: `k ≡ i (mod n)`.
pub fn shards_for_worker(num_shards: u32, worker: u32, workers: u32) -> Vec<u32> {
    (0..num_shards).filter(|k| k % workers.max(1) == worker).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }

    /// Reading in place gives the element-wise values (every f16 and bf16 bit pattern: NaNs,
    /// infinities, subnormals), and a misaligned record falls back to the element-wise path.
    #[test]
    fn in_place_decoding_equals_element_wise() {
        let halves: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let floats: Vec<u8> = [0.0f32, -0.0, 1.5, -3.25e-40, f32::MAX, f32::MIN_POSITIVE, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        for (dtype, bytes) in [(StoredDType::F16, &halves), (StoredDType::BF16, &halves), (StoredDType::F32, &floats)] {
            let count = bytes.len() / dtype.size();
            let want = decode_by_element(bytes, dtype);
            // A u32-aligned copy, then the same bytes one byte further on.
            let mut buf = vec![0u32; bytes.len() / 4 + 1];
            let aligned = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut buf)[..bytes.len() + 1];
            aligned[..bytes.len()].copy_from_slice(bytes);
            let fast = decode_in_place(&aligned[..bytes.len()], dtype, count);
            if cfg!(target_endian = "little") {
                assert!(same(fast.as_ref().expect("aligned record read in place"), &want), "{dtype:?} in place");
            }
            assert!(same(&decode(&aligned[..bytes.len()], dtype, count).unwrap(), &want), "{dtype:?}");
            aligned.copy_within(0..bytes.len(), 1);
            let shifted = &aligned[1..];
            assert!(decode_in_place(shifted, dtype, count).is_none(), "{dtype:?}: misaligned is not read in place");
            assert!(same(&decode(shifted, dtype, count).unwrap(), &want), "{dtype:?} misaligned");
        }
    }
}
