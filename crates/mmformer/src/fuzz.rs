//! Fuzzing the file readers on stable Rust (`cargo xtask fuzz`), without cargo-fuzz or a nightly
//! toolchain.
//!
//! Each [`Target`] is one kind of file a user can hand us, read by the project's real reader:
//!
//! | target | reader(s) |
//! |---|---|
//! | `pth` | [`backbone::StateDict::read`], then [`crate::MmFormer::load`] (zip and legacy `.pth`) |
//! | `safetensors` | the same two, on safetensors files (with and without our model metadata) |
//! | `png-mask` | [`crate::read_support_mask`] (PNG and JPEG masks), with and without a class value, then [`data::label::read_label_png`] |
//! | `image` | [`crate::read_image`] (JPEG, PNG) |
//! | `episodes-json` | [`data::TestEpisodes::read_json`] against a small in-memory dataset, then `load` |
//! | `shard` | [`data::shard::ShardReader::open`] and every record, then [`data::shard::ShardIndex::merge`] and again |
//! | `config` | the options and metadata JSON files, each by its own reader: `Stage1Options`, `Stage2Options`, `CacheOptions` (`--config` / `config.json`), `CacheManifest::read`, `CheckpointStore::open` (`state.json`), `ModelMeta`; every parser also runs on every file |
//!
//! Seed files are made in code from valid inputs ([`seeds`]): no fixture on disk, so a case is
//! the same bytes on every machine. Case `i` of a run with seed `s` is one seed file mutated by a
//! ChaCha stream keyed by (target, `s`, `i`) ([`Corpus::case`]): bit flips, bytes set to
//! 0x00/0xFF/0x7F/0x80, truncation, integers overwritten with huge values (length and count
//! fields: 0xFFFFFFFF, 2^40, 2^62, ...), digit runs replaced by huge numbers (shapes in JSON
//! headers), chunks spliced from the same or another seed, duplicated or deleted. Where a format
//! carries a checksum that would stop every mutation at the door, most cases repair it after
//! mutating (PNG chunk CRCs, zip member CRCs, the shard index container), and zip members are
//! often mutated before they are packed, so the pickle reader behind the zip sees them.
//!
//! A reader must return `Ok` or a clean error. A panic is a failure, and so is an abort: the
//! cases run in a worker process ([`worker_main`]) under `setrlimit(RLIMIT_AS)` (2 GiB by
//! default), so a reader that asks for terabytes kills the worker, not the machine. The worker
//! writes the index of the case it is about to run to a progress file; when it dies (signal,
//! non-zero exit) or stops answering, the parent ([`run`]) records that case as a failure,
//! writes its input under `<out>/crashes/`, starts a new worker after it and goes on until the
//! time or case budget is spent.
//!
//! Outcome counts: a case is `ok` when the target's first reader accepts the file and `err` when
//! it refuses it cleanly; the later readers of a target run for their panics and aborts only.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{bail, Context};
use crate::Result;

/// The environment variable that makes a process a fuzz worker (its value: the worker's job, as
/// JSON). The parent sets it; see [`worker_main`].
pub const WORKER_ENV: &str = "MMFORMER_FUZZ_WORKER";

/// Default address-space limit of a worker, MiB.
pub const DEFAULT_MEMORY_MB: u64 = 2048;

/// Largest mutated file a case produces.
const MAX_CASE_BYTES: usize = 4 << 20;

/// Prefix of the worker's protocol lines on stdout (anything else there is ignored).
const LINE_PREFIX: &str = "@fuzz ";

/// Progress-file value while the worker is starting (before its first case).
const STARTING: u64 = u64::MAX;

// ------------------------------------------------------------------------------------------
// Targets

/// One kind of input file and the readers that take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Pth,
    Safetensors,
    PngMask,
    Image,
    EpisodesJson,
    Shard,
    Config,
    /// Not a reader: a target whose cases abort, allocate 3 GiB, panic or hang on purpose
    /// (case 3, 5, 7, 9; every other case is `ok`), to test the worker protocol.
    /// Hidden from `all`.
    SelftestAbort,
}

impl Target {
    /// The real targets (what `all` means).
    pub const ALL: [Target; 7] =
        [Target::Pth, Target::Safetensors, Target::PngMask, Target::Image, Target::EpisodesJson, Target::Shard, Target::Config];

    pub fn name(self) -> &'static str {
        match self {
            Target::Pth => "pth",
            Target::Safetensors => "safetensors",
            Target::PngMask => "png-mask",
            Target::Image => "image",
            Target::EpisodesJson => "episodes-json",
            Target::Shard => "shard",
            Target::Config => "config",
            Target::SelftestAbort => "selftest-abort",
        }
    }

    /// Targets named in `list` (comma-separated names, or `all`).
    pub fn parse_list(list: &str) -> Result<Vec<Target>> {
        let mut out = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if name == "all" {
                out.extend(Target::ALL);
            } else {
                out.push(name.parse()?);
            }
        }
        out.dedup();
        if out.is_empty() {
            bail!("no fuzz target named (known: {}, all)", Self::ALL.map(Target::name).join(", "));
        }
        Ok(out)
    }

    /// A target whose input is a folder of several files (`shard`).
    pub fn is_folder(self) -> bool {
        self == Target::Shard
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Target {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        Target::ALL
            .into_iter()
            .chain([Target::SelftestAbort])
            .find(|t| t.name() == s)
            .with_context(|| format!("unknown fuzz target `{s}` (known: {}, all)", Target::ALL.map(Target::name).join(", ")))
    }
}

// ------------------------------------------------------------------------------------------
// Seed files

/// The content of a seed file: bytes, or a zip's members (packed after they are mutated, so
/// that the member CRCs match).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Raw(Vec<u8>),
    /// Stored members as torch writes them (each member's data 64-byte aligned).
    Zip(Vec<(String, Vec<u8>)>),
}

impl Content {
    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Content::Raw(b) => b.clone(),
            Content::Zip(m) => pack_zip(m),
        }
    }
}

/// One file of a seed input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedFile {
    /// File name in the case folder (its extension matters to some readers).
    pub name: String,
    pub content: Content,
}

/// A valid input of a target: one file, or the files of a folder (`shard`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    pub label: String,
    pub files: Vec<SeedFile>,
}

fn seed1(label: &str, name: &str, content: Content) -> Seed {
    Seed { label: label.into(), files: vec![SeedFile { name: name.into(), content }] }
}

/// The valid seed inputs of `target`, made in code (deterministic bytes).
pub fn seeds(target: Target) -> Result<Vec<Seed>> {
    match target {
        Target::Pth => Ok(pth_seeds()),
        Target::Safetensors => safetensors_seeds(),
        Target::PngMask => png_mask_seeds(),
        Target::Image => image_seeds(),
        Target::EpisodesJson => episodes_seeds(),
        Target::Shard => shard_seeds(),
        Target::Config => config_seeds(),
        Target::SelftestAbort => Ok(vec![seed1("selftest", "case.bin", Content::Raw(b"selftest".to_vec()))]),
    }
}

/// A folder removed on drop (under the system temp dir unless given).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("mmformer-fuzz-{tag}-{}-{nanos}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
}

// --- .pth: pickles written as torch writes them (protocol 2, memoised), zip and legacy files.

/// A pickle writer that memoises like CPython's pickler: every string, global and tuple gets a
/// BINPUT, and a repeated global or string is a BINGET.
struct Pickle {
    b: Vec<u8>,
    memo: HashMap<String, u32>,
    next: u32,
}

impl Pickle {
    fn new() -> Self {
        Self { b: vec![0x80, 2], memo: HashMap::new(), next: 0 }
    }
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.b.extend_from_slice(bytes);
        self
    }
    fn put(&mut self) -> u32 {
        let n = self.next;
        self.next += 1;
        if n < 256 {
            self.b.extend_from_slice(&[b'q', n as u8]);
        } else {
            self.b.push(b'r');
            self.b.extend_from_slice(&n.to_le_bytes());
        }
        n
    }
    fn get(&mut self, n: u32) -> &mut Self {
        if n < 256 {
            self.op(&[b'h', n as u8])
        } else {
            self.b.push(b'j');
            self.op(&n.to_le_bytes())
        }
    }
    /// A memoised object: emitted once, fetched from the memo afterwards.
    fn memoised(&mut self, key: String, emit: impl FnOnce(&mut Self)) -> &mut Self {
        if let Some(&n) = self.memo.get(&key) {
            return self.get(n);
        }
        emit(self);
        let n = self.put();
        self.memo.insert(key, n);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.b.push(b'X');
        self.b.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.b.extend_from_slice(s.as_bytes());
        self.put();
        self
    }
    /// A string fetched from the memo when it was written before (as pickle does for interned
    /// strings like 'storage' and 'cpu').
    fn str_memo(&mut self, s: &str) -> &mut Self {
        self.memoised(format!("str:{s}"), |p| {
            p.b.push(b'X');
            p.b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            p.b.extend_from_slice(s.as_bytes());
        })
    }
    fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.op(&[b'K', v as u8])
        } else if (0..65536).contains(&v) {
            self.b.push(b'M');
            self.op(&(v as u16).to_le_bytes())
        } else if i32::try_from(v).is_ok() {
            self.b.push(b'J');
            self.op(&(v as i32).to_le_bytes())
        } else {
            self.op(&[0x8a, 8]).op(&v.to_le_bytes())
        }
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.memoised(format!("global:{module}.{name}"), |p| {
            p.b.push(b'c');
            p.b.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        })
    }
    /// A tuple of small integers (a size or a stride), with the short tuple opcodes.
    fn ints(&mut self, v: &[usize]) -> &mut Self {
        match v.len() {
            0 => {
                self.op(b")");
                return self;
            }
            1..=3 => {
                for &x in v {
                    self.int(x as i64);
                }
                self.op(&[[0x85, 0x86, 0x87][v.len() - 1]]);
            }
            _ => {
                self.op(b"(");
                for &x in v {
                    self.int(x as i64);
                }
                self.op(b"t");
            }
        }
        self.put();
        self
    }
    /// `_rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict())`; the
    /// persistent id has the legacy format's sixth element (view metadata: None) when `legacy`.
    fn tensor(&mut self, t: &PthTensor, legacy: bool) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(").op(b"(");
        self.str_memo("storage").global("torch", t.class).str(t.key).str_memo("cpu").int(t.numel as i64);
        if legacy {
            self.op(b"N");
        }
        self.op(b"t");
        self.put();
        self.op(b"Q").int(t.offset as i64).ints(t.size).ints(t.stride).op(&[0x89]);
        self.global("collections", "OrderedDict").op(b")R");
        self.put();
        self.op(b"t");
        self.put();
        self.op(b"R");
        self.put();
        self
    }
    fn stop(&mut self) -> Vec<u8> {
        self.b.push(b'.');
        std::mem::take(&mut self.b)
    }
}

/// A tensor entry of a hand-written `.pth`: a view of storage `key`.
struct PthTensor {
    name: &'static str,
    class: &'static str,
    key: &'static str,
    numel: usize,
    offset: usize,
    size: &'static [usize],
    stride: &'static [usize],
    /// Wrapped in `_rebuild_parameter(tensor, True, OrderedDict())`.
    parameter: bool,
}

const fn pt(name: &'static str, class: &'static str, key: &'static str, numel: usize, offset: usize, size: &'static [usize], stride: &'static [usize]) -> PthTensor {
    PthTensor { name, class, key, numel, offset, size, stride, parameter: false }
}

/// The storages of the seed `.pth` files: key, element count, bytes.
fn pth_storages() -> Vec<(&'static str, usize, Vec<u8>)> {
    let f32s = |n: usize, k: f32| (0..n).flat_map(|i| (i as f32 * k - 1.0).to_le_bytes()).collect::<Vec<u8>>();
    vec![
        ("0", 108, f32s(108, 0.01)),
        ("1", 4, f32s(4, 0.5)),
        ("2", 1, 1234i64.to_le_bytes().to_vec()),
        ("3", 6, (0..6u16).flat_map(|i| (0x3c00u16 + i).to_le_bytes()).collect()),
        ("4", 5, f32s(5, 2.0)),
        ("5", 3, vec![0, 1, 1]),
        ("6", 4, (0..4u16).flat_map(|i| (0x3f80u16 + i).to_le_bytes()).collect()),
        ("7", 2, [0.25f64, -1e300].iter().flat_map(|v| v.to_le_bytes()).collect()),
    ]
}

fn pth_state_tensors(prefix_model: bool) -> Vec<PthTensor> {
    let mut v = if prefix_model {
        vec![
            pt("backbone.stem.conv1.weight", "FloatStorage", "0", 108, 0, &[4, 3, 3, 3], &[27, 9, 3, 1]),
            pt("backbone.stem.conv1.norm.weight", "FloatStorage", "1", 4, 0, &[4], &[1]),
            pt("sem_seg_head.predictor.query_embed.weight", "HalfStorage", "3", 6, 0, &[2, 3], &[3, 1]),
            pt("sem_seg_head.predictor.query_feat.weight", "HalfStorage", "3", 6, 0, &[3, 2], &[1, 3]),
            pt("sem_seg_head.pixel_decoder.tail", "FloatStorage", "4", 5, 2, &[3], &[1]),
            pt("sem_seg_head.flags", "ByteStorage", "5", 3, 0, &[3], &[1]),
            pt("sem_seg_head.bf", "BFloat16Storage", "6", 4, 0, &[2, 2], &[2, 1]),
        ]
    } else {
        vec![
            pt("conv1.weight", "FloatStorage", "0", 108, 0, &[4, 3, 3, 3], &[27, 9, 3, 1]),
            pt("bn1.weight", "FloatStorage", "1", 4, 0, &[4], &[1]),
            pt("bn1.num_batches_tracked", "LongStorage", "2", 1, 0, &[], &[]),
            pt("fc.weight", "HalfStorage", "3", 6, 0, &[2, 3], &[3, 1]),
            pt("fc.weight_t", "HalfStorage", "3", 6, 0, &[3, 2], &[1, 3]),
            pt("layer1.tail", "FloatStorage", "4", 5, 2, &[3], &[1]),
            pt("d", "DoubleStorage", "7", 2, 0, &[2], &[1]),
        ]
    };
    v[1].parameter = prefix_model;
    v
}

/// An `OrderedDict` state dict, `_metadata` set by BUILD as torch does.
fn pickle_state_dict(p: &mut Pickle, tensors: &[PthTensor], legacy: bool) {
    p.global("collections", "OrderedDict").op(b")R");
    p.put();
    p.op(b"(");
    for t in tensors {
        p.str(t.name);
        if t.parameter {
            p.global("torch._utils", "_rebuild_parameter");
            p.op(b"(");
            p.tensor(t, legacy);
            p.op(&[0x88]).global("collections", "OrderedDict").op(b")R");
            p.put();
            p.op(b"t");
            p.put();
            p.op(b"R");
            p.put();
        } else {
            p.tensor(t, legacy);
        }
    }
    p.op(b"u}");
    p.put();
    p.str("_metadata").op(b"}");
    p.put();
    p.op(b"(").str("").op(b"}");
    p.put();
    p.str("version").int(1).op(b"su");
    p.op(b"sb");
}

/// `{"model": state dict, "iteration": 5, "__author__": "fuzz"}` (a detectron2 checkpoint).
fn pickle_checkpoint(p: &mut Pickle, tensors: &[PthTensor], legacy: bool) {
    p.op(b"}");
    p.put();
    p.op(b"(").str("model");
    pickle_state_dict(p, tensors, legacy);
    p.str("iteration").int(5).str("__author__").str("fuzz").op(b"u");
}

fn torch_zip(archive: &str, pkl: Vec<u8>) -> Content {
    let mut members = vec![
        (format!("{archive}/data.pkl"), pkl),
        (format!("{archive}/.format_version"), b"1".to_vec()),
        (format!("{archive}/byteorder"), b"little".to_vec()),
    ];
    for (k, _, data) in pth_storages() {
        members.push((format!("{archive}/data/{k}"), data));
    }
    members.push((format!("{archive}/version"), b"3\n".to_vec()));
    Content::Zip(members)
}

const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// A legacy (non-zip) torch file: magic, protocol, sys info, the object, its storage keys, then
/// each storage as (element count, raw bytes).
fn legacy_pth(object: Vec<u8>, keys: &[&str]) -> Vec<u8> {
    let mut file = Pickle::new().op(&[0x8a, 10]).op(&LEGACY_MAGIC).stop();
    file.extend(Pickle::new().op(b"M").op(&1001u16.to_le_bytes()).stop());
    let mut sys = Pickle::new();
    sys.op(b"}(").str("protocol_version").op(b"M").op(&1001u16.to_le_bytes()).str("little_endian").op(&[0x88]);
    sys.str("type_sizes").op(b"}(").str("short").int(2).str("int").int(4).str("long").int(4).op(b"uu");
    file.extend(sys.stop());
    file.extend(object);
    let mut k = Pickle::new();
    k.op(b"](");
    for key in keys {
        k.str(key);
    }
    k.op(b"e");
    file.extend(k.stop());
    let storages = pth_storages();
    for key in keys {
        let (_, numel, data) = storages.iter().find(|s| s.0 == *key).expect("storage");
        file.extend_from_slice(&(*numel as u64).to_le_bytes());
        file.extend_from_slice(data);
    }
    file
}

fn pth_seeds() -> Vec<Seed> {
    let state = pth_state_tensors(false);
    let model = pth_state_tensors(true);
    let keys = |ts: &[PthTensor]| {
        let mut k: Vec<&str> = ts.iter().map(|t| t.key).collect();
        k.sort_unstable();
        k.dedup();
        k
    };
    let mut p = Pickle::new();
    pickle_state_dict(&mut p, &state, false);
    let zip_state = torch_zip("archive", p.stop());
    let mut p = Pickle::new();
    pickle_checkpoint(&mut p, &model, false);
    let zip_ckpt = torch_zip("model_final", p.stop());
    let mut p = Pickle::new();
    pickle_state_dict(&mut p, &state, true);
    let legacy_state = legacy_pth(p.stop(), &keys(&state));
    let mut p = Pickle::new();
    pickle_checkpoint(&mut p, &model, true);
    let legacy_ckpt = legacy_pth(p.stop(), &keys(&model));
    vec![
        seed1("zip state dict", "weights.pth", zip_state),
        seed1("zip detectron2 checkpoint", "model_final.pth", zip_ckpt),
        seed1("legacy state dict", "legacy.pth", Content::Raw(legacy_state)),
        seed1("legacy detectron2 checkpoint", "legacy_model.pth", Content::Raw(legacy_ckpt)),
    ]
}

/// A zip of stored members, each member's data 64-byte aligned by an extra field (as
/// `torch.save` writes them), CRC-32 in the local headers and the central directory.
pub fn pack_zip(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in members {
        let crc = crc32fast::hash(data);
        let offset = out.len() as u32;
        let fixed = |h: &mut Vec<u8>, sig: u32, is_central: bool, extra: u16| {
            h.extend_from_slice(&sig.to_le_bytes());
            if is_central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&20u16.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // flags
            h.extend_from_slice(&0u16.to_le_bytes()); // stored
            h.extend_from_slice(&[0; 4]); // time, date
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&extra.to_le_bytes());
            if is_central {
                h.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
                h.extend_from_slice(&[0; 4]); // external attributes
                h.extend_from_slice(&offset.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
        };
        let unpadded = out.len() + 30 + name.len() + 4;
        let pad = (64 - unpadded % 64) % 64;
        fixed(&mut out, 0x0403_4b50, false, (4 + pad) as u16);
        out.extend_from_slice(b"FB");
        out.extend_from_slice(&(pad as u16).to_le_bytes());
        out.extend(std::iter::repeat_n(b'Z', pad));
        out.extend_from_slice(data);
        fixed(&mut central, 0x0201_4b50, true, 0);
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

// --- safetensors

fn safetensors_seeds() -> Result<Vec<Seed>> {
    let cpu = Device::Cpu;
    let ramp = |n: usize, shape: &[usize], dtype: DType| -> Result<Tensor> {
        Ok(Tensor::from_vec((0..n).map(|i| i as f32 * 0.125 - 1.0).collect::<Vec<f32>>(), shape, &cpu)?.to_dtype(dtype)?)
    };
    let model: HashMap<String, Tensor> = [
        ("backbone.stem.conv.weight", ramp(108, &[4, 3, 3, 3], DType::F32)?),
        ("backbone.stem.bn.running_var", ramp(4, &[4], DType::F32)?),
        ("sem_seg_head.predictor.query_embed.weight", ramp(24, &[3, 8], DType::F32)?),
        ("sem_seg_head.predictor.level_embed.weight", ramp(6, &[2, 3], DType::F16)?),
        ("self_alignment.norm.weight", ramp(8, &[8], DType::BF16)?),
        ("iteration", Tensor::from_vec(vec![5i64], &[1], &cpu)?),
        ("flags", Tensor::from_vec(vec![0u8, 1, 1], &[3], &cpu)?),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dir = TempDir::new("seeds")?;
    let with_meta = dir.0.join("model.safetensors");
    let preset = crate::Preset::Cpu;
    crate::save_model(&with_meta, &crate::ModelMeta::new(preset, &preset.mm_config()), &model)?;
    let plain = |names: &[&str]| -> Result<Vec<u8>> {
        let mut sorted: Vec<(String, Tensor)> = model.iter().filter(|(k, _)| names.iter().any(|n| k.starts_with(n))).map(|(k, v)| (k.clone(), v.clone())).collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let refs: Vec<(&String, &Tensor)> = sorted.iter().map(|(k, v)| (k, v)).collect();
        safetensors::serialize(refs, None).context("serialising a seed safetensors file")
    };
    Ok(vec![
        seed1("mmformer checkpoint (metadata)", "model.safetensors", Content::Raw(read(&with_meta)?)),
        seed1("plain, sem_seg_head", "official.safetensors", Content::Raw(plain(&["backbone.", "sem_seg_head."])?)),
        seed1("backbone only", "backbone.safetensors", Content::Raw(plain(&["backbone."])?)),
    ])
}

// --- masks and images

fn png_bytes(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth, palette: Option<Vec<u8>>, data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        if let Some(p) = palette {
            enc.set_palette(p);
        }
        let mut wr = enc.write_header().map_err(|e| crate::Error::Invalid(format!("seed PNG: {e}")))?;
        wr.write_image_data(data).map_err(|e| crate::Error::Invalid(format!("seed PNG: {e}")))?;
        wr.finish().map_err(|e| crate::Error::Invalid(format!("seed PNG: {e}")))?;
    }
    Ok(out)
}

/// An Adam7-interlaced 8-bit PNG written by hand (the png crate writes no interlaced files):
/// `channels` samples a pixel, colour type `color_type`, the zlib stream in stored blocks.
fn interlaced_png(w: u32, h: u32, color_type: u8, channels: usize, pixels: &[u8]) -> Vec<u8> {
    const PASSES: [(u32, u32, u32, u32); 7] = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)];
    let mut raw = Vec::new();
    for (x0, y0, dx, dy) in PASSES {
        if x0 >= w || y0 >= h {
            continue;
        }
        for y in (y0..h).step_by(dy as usize) {
            raw.push(0); // filter: none
            for x in (x0..w).step_by(dx as usize) {
                let i = (y * w + x) as usize * channels;
                raw.extend_from_slice(&pixels[i..i + channels]);
            }
        }
    }
    let mut z = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        z.push(u8::from(i + 1 == chunks.len()));
        z.extend_from_slice(&(c.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(c.len() as u16)).to_le_bytes());
        z.extend_from_slice(c);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], body: &[u8]| {
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, color_type, 0, 0, 1]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    out
}

fn encode_image(img: &image::DynamicImage, format: image::ImageFormat) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    match format {
        image::ImageFormat::Jpeg => {
            img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)).context("seed JPEG")?;
        }
        _ => img.write_to(&mut out, format).context("seed image")?,
    }
    Ok(out.into_inner())
}

/// A test picture: gradients with a block in the middle.
fn picture(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let inside = x > w / 4 && x < 3 * w / 4 && y > h / 4 && y < 3 * h / 4;
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, if inside { 230 } else { 20 }])
    })
}

/// `jpeg` with an APP1 Exif segment (orientation `o`) right after SOI.
fn with_exif_orientation(jpeg: &[u8], o: u16) -> Vec<u8> {
    let mut tiff = b"II*\0".to_vec();
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&o.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut seg = b"Exif\0\0".to_vec();
    seg.extend(tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&((seg.len() + 2) as u16).to_be_bytes());
    out.extend(seg);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn png_mask_seeds() -> Result<Vec<Seed>> {
    use png::{BitDepth, ColorType};
    let (w, h) = (16u32, 12u32);
    let obj = |x: u32, y: u32| x > 4 && x < 12 && y > 3 && y < 9;
    let gray: Vec<u8> = (0..h).flat_map(|y| (0..w).map(move |x| if obj(x, y) { 255 } else { 0 })).collect();
    let ids: Vec<u8> = (0..h).flat_map(|y| (0..w).map(move |x| if obj(x, y) { 3 } else if x == 0 { 255 } else { 0 })).collect();
    let dir = TempDir::new("seeds")?;
    let (gp, lp) = (dir.0.join("gray.png"), dir.0.join("label.png"));
    data::label::write_gray_png(&gp, w, h, &gray)?;
    data::label::write_label_png(&lp, &data::Label::new(w, h, ids.clone()))?;
    // 1-bit gray: 2 bytes a row.
    let bits: Vec<u8> = (0..h).flat_map(|y| (0..2).map(move |b| (0..8).fold(0u8, |acc, i| acc << 1 | u8::from(obj(b * 8 + i, y))))).collect();
    let gray16: Vec<u8> = gray.iter().flat_map(|&v| [v, 7]).collect();
    let rgb: Vec<u8> = gray.iter().flat_map(|&v| [v, v / 2, 0]).collect();
    let rgba: Vec<u8> = gray.iter().flat_map(|&v| [0, v, 0, 255]).collect();
    let pal4: Vec<u8> = (0..h).flat_map(|y| (0..w / 2).map(move |x| if obj(2 * x, y) { 0x22 } else { 0x01 })).collect();
    let palette = data::label::voc_palette()[..16].concat();
    let jpeg = encode_image(&image::DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, gray.clone()).expect("size")), image::ImageFormat::Jpeg)?;
    let raw = |label: &str, name: &str, bytes: Vec<u8>| seed1(label, name, Content::Raw(bytes));
    Ok(vec![
        raw("gray 8-bit", "mask.png", read(&gp)?),
        raw("VOC palette", "label.png", read(&lp)?),
        raw("gray 1-bit", "bits.png", png_bytes(w, h, ColorType::Grayscale, BitDepth::One, None, &bits)?),
        raw("gray 16-bit", "gray16.png", png_bytes(w, h, ColorType::Grayscale, BitDepth::Sixteen, None, &gray16)?),
        raw("RGB", "rgb.png", png_bytes(w, h, ColorType::Rgb, BitDepth::Eight, None, &rgb)?),
        raw("RGBA interlaced", "rgba.png", interlaced_png(w, h, 6, 4, &rgba)),
        raw("palette 4-bit", "pal4.png", png_bytes(w, h, ColorType::Indexed, BitDepth::Four, Some(palette), &pal4)?),
        raw("JPEG mask", "mask.jpg", jpeg),
    ])
}

fn image_seeds() -> Result<Vec<Seed>> {
    use image::{DynamicImage, ImageFormat};
    let rgb = picture(24, 16);
    let jpeg = encode_image(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Jpeg)?;
    let gray = DynamicImage::ImageRgb8(rgb.clone()).to_luma8();
    let rgba16 = DynamicImage::ImageRgb8(rgb.clone()).to_rgba16();
    let pal: Vec<u8> = (0..16u32).flat_map(|y| (0..24u32).map(move |x| ((x / 6 + y / 4) % 8) as u8)).collect();
    let gray_interlaced = interlaced_png(24, 16, 0, 1, gray.as_raw());
    let raw = |label: &str, name: &str, bytes: Vec<u8>| seed1(label, name, Content::Raw(bytes));
    Ok(vec![
        raw("JPEG RGB", "photo.jpg", jpeg.clone()),
        raw("JPEG with EXIF orientation 6", "rotated.jpg", with_exif_orientation(&jpeg, 6)),
        raw("JPEG gray", "gray.jpg", encode_image(&DynamicImage::ImageLuma8(gray), ImageFormat::Jpeg)?),
        raw("PNG RGB", "photo.png", encode_image(&DynamicImage::ImageRgb8(rgb), ImageFormat::Png)?),
        raw("PNG RGBA 16-bit", "rgba16.png", encode_image(&DynamicImage::ImageRgba16(rgba16), ImageFormat::Png)?),
        raw("PNG palette", "palette.png", png_bytes(24, 16, png::ColorType::Indexed, png::BitDepth::Eight, Some(data::label::voc_palette()[..8].concat()), &pal)?),
        raw("PNG gray interlaced", "gray.png", gray_interlaced),
    ])
}

// --- test episodes

/// A small dataset held in memory (8 classes, 4 folds of 2 novel classes, 16 val images) that
/// episode files are validated against.
pub fn episodes_dataset() -> &'static data::FewShotDataset {
    static DS: std::sync::OnceLock<data::FewShotDataset> = std::sync::OnceLock::new();
    DS.get_or_init(|| {
        use data::dataset::{ClassPresence, SampleRecord, SampleSource};
        use std::sync::Arc;
        let val = (0..16u32)
            .map(|i| {
                let c = (i % 8 + 1) as u8;
                let img = Arc::new(picture(16, 16));
                let label = Arc::new(data::Label::new(16, 16, (0..256u32).map(|p| if p % 16 > 7 { c } else { 0 }).collect()));
                SampleRecord {
                    id: format!("img{i:02}"),
                    source: SampleSource::Memory { image: img, label },
                    object_class: None,
                    classes: vec![
                        ClassPresence { class_id: 0, value: 0, pixels: 5000 },
                        ClassPresence { class_id: c as data::ClassId, value: c, pixels: 5000 },
                    ],
                }
            })
            .collect();
        let names = (1..=8).map(|c| format!("class{c}")).collect();
        data::FewShotDataset::from_parts("fuzz", data::dataset::DatasetKind::Other, names, data::dataset::FoldScheme::Contiguous, Vec::new(), val)
            .expect("the fuzz episode dataset is well formed")
    })
}

fn episodes_seeds() -> Result<Vec<Seed>> {
    let ds = episodes_dataset();
    let one = data::TestEpisodes::generate(ds, 0, 1, 6, 1)?;
    let five = data::TestEpisodes::generate(ds, 2, 5, 3, 2)?;
    Ok(vec![
        seed1("1-shot, fold 0", "episodes.json", Content::Raw(one.to_json().into_bytes())),
        seed1("5-shot, fold 2", "episodes5.json", Content::Raw(five.to_json().into_bytes())),
    ])
}

// --- shards

fn shard_seeds() -> Result<Vec<Seed>> {
    use data::shard::{ProposalRecord, ShardIndex, ShardSpec, ShardView, ShardWriter, StoredDType};
    let make = |feature_dtype: StoredDType, mask_dtype: StoredDType, shards: u32| -> Result<Vec<SeedFile>> {
        let dir = TempDir::new("seeds")?;
        let spec = ShardSpec {
            model_fingerprint: "00112233aabbccdd".into(),
            preprocess_fingerprint: "ffeeddcc44332211".into(),
            backbone: "fuzz".into(),
            feature_names: vec!["res5".into(), "res4".into()],
            feature_dtype,
            mask_dtype,
            num_queries: 3,
        };
        for k in 0..shards {
            let mut w = ShardWriter::new(&dir.0, k, spec.clone())?;
            for r in 0..2u32 {
                let vals = |n: usize| (0..n).map(|i| ((i as u32 * 7 + r + k) % 11) as f32 / 10.0).collect::<Vec<f32>>();
                w.push(&ProposalRecord {
                    image_id: format!("img{k}{r}"),
                    view: if r == 0 { ShardView::Test } else { ShardView::Augmented(r) },
                    input_hw: (8, 8),
                    features: vec![(vec![4, 1, 1], vals(4)), (vec![2, 2, 2], vals(8))],
                    proposals: (vec![3, 2, 2], vals(12)),
                    label: (0..64u32).map(|i| [0u8, 1, 255, 4][(i % 4) as usize]).collect(),
                })?;
            }
            w.finish()?;
        }
        ShardIndex::merge(&dir.0)?;
        let mut names: Vec<String> = std::fs::read_dir(&dir.0)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names.into_iter().map(|n| Ok(SeedFile { content: Content::Raw(read(&dir.0.join(&n))?), name: n })).collect()
    };
    Ok(vec![
        Seed { label: "2 shards, f16 features, u8 masks".into(), files: make(StoredDType::F16, StoredDType::U8Prob, 2)? },
        Seed { label: "1 shard, f32 features, f16 masks".into(), files: make(StoredDType::F32, StoredDType::F16, 1)? },
    ])
}

// --- configuration files

fn config_seeds() -> Result<Vec<Seed>> {
    use crate::cache::{CacheManifest, CacheOptions, Splits};
    let preset = crate::Preset::Cpu;
    let s1 = crate::stage1::Stage1Options {
        data: "data/synthetic".into(),
        fold: 1,
        preset,
        backbone_weights: Some("weights/r50.pth".into()),
        batch: 4,
        iters: 600,
        lr: 4e-4,
        weight_decay: 0.05,
        clip: 0.01,
        seed: 7,
        out: "runs/pos".into(),
        eval_every: 100,
        eval_episodes: 200,
        log_every: 10,
    };
    let s2 = crate::stage2::Stage2Options {
        shards: "runs/shards".into(),
        batch: 4,
        iters: 500,
        lr: 1e-3,
        weight_decay: 0.05,
        clip: 0.01,
        shot: 1,
        seed: 0,
        out: "runs/mm".into(),
        eval_every: 100,
        eval_episodes: 100,
        log_every: 10,
        no_self_alignment: false,
        no_cross_alignment: true,
        no_learnable_matching: false,
        no_co_loss: false,
    };
    let cache = CacheOptions {
        data: "data/synthetic".into(),
        fold: 0,
        preset,
        backbone_weights: None,
        pos_checkpoint: "runs/pos/checkpoints/best".into(),
        out: "runs/shards".into(),
        split: Splits::Both,
        views: 2,
        seed: 0,
        feature_dtype: "f16".into(),
        mask_dtype: "u8".into(),
        records_per_shard: 64,
        shard: Some("1/4".parse().map_err(crate::Error::Invalid)?),
        batch: 8,
        dry_run: false,
    };
    let manifest = CacheManifest {
        dataset: "data/synthetic".into(),
        fold: 0,
        preset,
        backbone_file: "target/assets/lite0.pth".into(),
        backbone_sha256: "ab".repeat(32),
        pos_checkpoint: "runs/pos/checkpoints/best".into(),
        pos_model_sha256: "cd".repeat(32),
        model_fingerprint: "0011223344556677".into(),
        views: 2,
        seed: 0,
    };
    let state = train::TrainState {
        format_version: 1,
        kind: "mm".into(),
        iter: 200,
        optimizer_step: 200,
        best_metric: Some(45.5),
        best_iter: Some(200),
        config: crate::run_config(&s2),
        model_sha256: "ef".repeat(32),
        optimizer_sha256: "01".repeat(32),
    };
    let meta = crate::ModelMeta::new(preset, &preset.mm_config());
    let json = |v: serde_json::Result<Vec<u8>>| -> Result<Content> { Ok(Content::Raw(v?)) };
    Ok(vec![
        seed1("Stage1Options", "stage1.json", json(serde_json::to_vec_pretty(&s1))?),
        seed1("Stage2Options", "stage2.json", json(serde_json::to_vec_pretty(&s2))?),
        seed1("CacheOptions", "cache.json", json(serde_json::to_vec(&cache))?),
        seed1("CacheManifest", "manifest.json", json(serde_json::to_vec_pretty(&manifest))?),
        seed1("checkpoint state", "state.json", json(serde_json::to_vec_pretty(&state))?),
        seed1("ModelMeta", "meta.json", json(serde_json::to_vec(&meta))?),
    ])
}

// ------------------------------------------------------------------------------------------
// Mutation

/// A case's random stream. In text mode (JSON files) random bytes are printable ASCII and bit
/// flips keep bytes below 0x80, so that mutations reach past the UTF-8 check.
struct Rng(ChaCha8Rng, bool);

/// What random bytes of a text file are drawn from.
const TEXT_BYTES: &[u8] = b"0123456789{}[]\":,.-+eE \n\\/abcdefnrstuxyz_";

impl Rng {
    /// The stream of case `index` of a run of `target` with `seed`.
    fn for_case(target: Target, seed: u64, index: u64) -> Self {
        let name = target.name().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        let mut r = ChaCha8Rng::seed_from_u64(name ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.set_stream(index);
        Self(r, false)
    }
    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    fn byte(&mut self) -> u8 {
        let b = self.0.next_u32();
        if self.1 {
            TEXT_BYTES[b as usize % TEXT_BYTES.len()]
        } else {
            b as u8
        }
    }
    /// A position in `0..len`, biased toward the first 64 bytes (where headers are).
    fn position(&mut self, len: usize) -> usize {
        if self.chance(1, 4) {
            self.below(len.min(64))
        } else {
            self.below(len)
        }
    }
}

/// Mutates `data` in place with 1 to 16 operations; returns what was done. `donors` are other
/// files to splice from.
fn mutate_bytes(data: &mut Vec<u8>, rng: &mut Rng, donors: &[&[u8]]) -> Vec<String> {
    let n = if rng.chance(1, 8) { 1 + rng.below(16) } else { 1 + rng.below(4) };
    (0..n).map(|_| mutate_once(data, rng, donors)).collect()
}

const HUGE_NUMBERS: [&str; 14] = [
    "0",
    "-1",
    "65536",
    "2147483648",
    "4294967295",
    "4294967296",
    "1099511627776",
    "4611686018427387904",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999",
    "1e308",
    "-9223372036854775808",
];

fn mutate_once(data: &mut Vec<u8>, rng: &mut Rng, donors: &[&[u8]]) -> String {
    let len = data.len();
    if len == 0 {
        let k = 1 + rng.below(16);
        data.extend((0..k).map(|_| rng.byte()));
        return format!("insert {k} random bytes into the empty file");
    }
    match rng.below(10) {
        0 => {
            let k = 1 + rng.below(8);
            let at: Vec<usize> = (0..k).map(|_| rng.position(len)).collect();
            let bits = if rng.1 { 7 } else { 8 };
            for &p in &at {
                data[p] ^= 1 << rng.below(bits);
            }
            format!("flip bits at {at:?}")
        }
        1 => {
            let p = rng.position(len);
            let v = if rng.1 { *rng.pick(b"0\"{}[]-,:9 ") } else { *rng.pick(&[0x00u8, 0xff, 0x7f, 0x80, 0x01, 0xfe]) };
            let k = (1 + rng.below(4)).min(len - p);
            data[p..p + k].fill(v);
            format!("set {k} byte(s) at {p} to {v:#04x}")
        }
        2 => {
            let to = if rng.chance(1, 2) { rng.below(len) } else { len.saturating_sub(1 + rng.below(16)) };
            data.truncate(to);
            format!("truncate to {to} bytes")
        }
        3 | 4 if !rng.1 => {
            // An integer field overwritten with a huge (or tiny) value.
            let width = *rng.pick(&[2usize, 4, 4, 8, 8]);
            if len < width {
                return mutate_once(data, rng, donors);
            }
            let mut p = rng.position(len - width + 1);
            if rng.chance(1, 2) {
                p -= p % width;
            }
            let v: u64 = match width {
                2 => *rng.pick(&[0xffff, 0x8000, 0x7fff, 0]),
                4 => *rng.pick(&[0xffff_ffff, 0x7fff_ffff, 0x8000_0000, 0x0100_0000, len as u64 + 1, 0]),
                _ => *rng.pick(&[1 << 32, 1 << 40, 1 << 62, u64::MAX, i64::MAX as u64, 1 << 63, len as u64 + 1]),
            };
            let be = rng.chance(1, 4);
            let bytes = v.to_le_bytes();
            let mut field = bytes[..width].to_vec();
            if be {
                field.reverse();
            }
            data[p..p + width].copy_from_slice(&field);
            format!("u{} {} = {v:#x} at {p}", width * 8, if be { "BE" } else { "LE" })
        }
        3..=5 => {
            // A run of ASCII digits (a shape, offset or count in a text header) made huge.
            let runs: Vec<(usize, usize)> = digit_runs(data);
            if runs.is_empty() {
                return mutate_once(data, rng, donors);
            }
            let (s, e) = *rng.pick(&runs);
            let v = *rng.pick(&HUGE_NUMBERS);
            data.splice(s..e, v.bytes());
            format!("digits at {s}..{e} -> {v}")
        }
        6 | 7 => {
            // Splice a chunk of this file or another seed over or into this one.
            let from_self = donors.is_empty() || rng.chance(1, 2);
            let donor: Vec<u8> = if from_self { data.clone() } else { rng.pick(donors).to_vec() };
            if donor.is_empty() {
                return mutate_once(data, rng, donors);
            }
            let k = 1 + if rng.chance(1, 8) { rng.below(donor.len()) } else { rng.below(donor.len().min(256)) };
            let src = rng.below(donor.len() - k + 1);
            let chunk = &donor[src..src + k];
            let p = rng.position(len);
            let what = if from_self { "itself" } else { "another seed" };
            if rng.chance(1, 2) {
                let end = (p + k).min(len);
                data[p..end].copy_from_slice(&chunk[..end - p]);
                format!("overwrite {} bytes at {p} with {what}[{src}..]", end - p)
            } else if data.len() + k <= MAX_CASE_BYTES {
                data.splice(p..p, chunk.iter().copied());
                format!("insert {k} bytes of {what}[{src}..] at {p}")
            } else {
                "(splice skipped: size cap)".into()
            }
        }
        8 => {
            // Duplicate a chunk (repeated structures: extra entries, nested pickles).
            let k = 1 + rng.below(len.min(1024));
            let s = rng.below(len - k + 1);
            let times = 1 + rng.below(4);
            if data.len() + k * times > MAX_CASE_BYTES {
                return "(duplicate skipped: size cap)".into();
            }
            let chunk = data[s..s + k].to_vec();
            let at = if rng.chance(1, 2) { s + k } else { rng.below(len + 1) };
            data.splice(at..at, chunk.iter().copied().cycle().take(k * times));
            format!("duplicate {k} bytes at {s} {times}x at {at}")
        }
        _ => {
            if rng.chance(1, 2) {
                let k = 1 + rng.below(len.min(64));
                let s = rng.below(len - k + 1);
                data.drain(s..s + k);
                format!("delete {k} bytes at {s}")
            } else {
                let k = 1 + rng.below(32);
                let p = rng.position(len + 1);
                let bytes: Vec<u8> = (0..k).map(|_| rng.byte()).collect();
                data.splice(p..p, bytes);
                format!("insert {k} random bytes at {p}")
            }
        }
    }
}

/// Odd values a JSON field may be given.
fn odd_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(16) {
        0 => json!(null),
        1 => json!(true),
        2 => json!(u64::MAX),
        3 => json!(1u64 << 40),
        4 => json!(1u64 << 62),
        5 => json!(-1),
        6 => json!(i64::MIN),
        7 => json!(0),
        8 => json!(1e308),
        9 => json!(-0.5),
        10 => json!(""),
        11 => json!("x".repeat(1 + rng.below(100_000))),
        12 => json!(*rng.pick(&["1/0", "0/0", "4294967295/4294967296", "cuda:99", "../../x", "\u{0}", "NaN", "f64", "U8", "both"])),
        13 => json!([]),
        14 => json!({}),
        _ => {
            // Deep nesting.
            let depth = 1 + rng.below(300);
            let mut v = json!(1);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }
    }
}

/// Every node of a JSON value, as paths of object keys / array indices.
fn json_paths(v: &serde_json::Value, path: &mut Vec<serde_json::Value>, out: &mut Vec<Vec<serde_json::Value>>) {
    out.push(path.clone());
    match v {
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate().take(64) {
                path.push(i.into());
                json_paths(x, path, out);
                path.pop();
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o.iter().take(64) {
                path.push(k.clone().into());
                json_paths(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'a>(v: &'a mut serde_json::Value, path: &[serde_json::Value]) -> Option<&'a mut serde_json::Value> {
    path.iter().try_fold(v, |v, k| match (v, k) {
        (serde_json::Value::Array(a), serde_json::Value::Number(i)) => a.get_mut(i.as_u64()? as usize),
        (serde_json::Value::Object(o), serde_json::Value::String(key)) => o.get_mut(key),
        _ => None,
    })
}

/// Mutates one node of a JSON document (a value made huge, negative, of another type, deep, a
/// key removed or added, an array element repeated or dropped); None when `bytes` is not JSON.
fn mutate_json(bytes: &[u8], rng: &mut Rng) -> Option<(Vec<u8>, String)> {
    let mut doc: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let mut paths = Vec::new();
    json_paths(&doc, &mut Vec::new(), &mut paths);
    let path = rng.pick(&paths).clone();
    let at = format!("{}", serde_json::Value::Array(path.clone()));
    let node = json_at(&mut doc, &path)?;
    let what = match (rng.below(4), &mut *node) {
        (0, serde_json::Value::Number(n)) => {
            let v = n.as_i64().unwrap_or(0);
            *node = serde_json::json!(if rng.chance(1, 2) { v.saturating_add(1) } else { v.saturating_sub(1) });
            format!("{at} off by one")
        }
        (0, serde_json::Value::Array(a)) if !a.is_empty() => {
            let i = rng.below(a.len());
            let times = *rng.pick(&[1usize, 2, 1000]);
            let x = a[i].clone();
            for _ in 0..times {
                a.insert(i, x.clone());
            }
            format!("{at}[{i}] repeated {times}x")
        }
        (1, serde_json::Value::Array(a)) if !a.is_empty() => {
            let i = rng.below(a.len());
            a.remove(i);
            format!("{at}[{i}] removed")
        }
        (0 | 1, serde_json::Value::Object(o)) if !o.is_empty() => {
            let k = o.keys().nth(rng.below(o.len())).cloned().unwrap_or_default();
            o.remove(&k);
            format!("{at}.{k} removed")
        }
        (1, serde_json::Value::Object(o)) => {
            o.insert("unknown_key".into(), odd_json(rng));
            format!("{at}: unknown key added")
        }
        (0 | 1, serde_json::Value::String(st)) if rng.chance(1, 2) => {
            // A string that holds JSON (safetensors metadata): mutate inside it.
            if let Some((inner, w)) = mutate_json(st.as_bytes(), rng) {
                *st = String::from_utf8_lossy(&inner).into_owned();
                format!("{at} (inner JSON): {w}")
            } else {
                st.push_str(&st.clone());
                format!("{at} doubled")
            }
        }
        _ => {
            let v = odd_json(rng);
            let shown = one_line(&v.to_string(), 40);
            *node = v;
            format!("{at} = {shown}")
        }
    };
    let out = if rng.chance(1, 2) { serde_json::to_vec(&doc) } else { serde_json::to_vec_pretty(&doc) };
    Some((out.ok()?, format!("json {what}")))
}

/// A safetensors file's header mutated as JSON (shapes, offsets, dtypes), its length field
/// rewritten and the data kept.
fn mutate_safetensors_header(bytes: &[u8], rng: &mut Rng) -> Option<(Vec<u8>, String)> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let (mut h, what) = mutate_json(header, rng)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(&bytes[8 + n..]);
    Some((out, format!("header {what}")))
}

fn digit_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if data[i].is_ascii_digit() {
            let s = i;
            while i < data.len() && data[i].is_ascii_digit() {
                i += 1;
            }
            runs.push((s, i));
        } else {
            i += 1;
        }
    }
    runs
}

/// Recomputes every PNG chunk CRC that lies inside the file.
fn fix_png_crcs(data: &mut [u8]) {
    let mut p = 8;
    while p + 12 <= data.len() {
        let n = u32::from_be_bytes([data[p], data[p + 1], data[p + 2], data[p + 3]]) as usize;
        let Some(end) = (p + 8).checked_add(n).filter(|&e| e + 4 <= data.len()) else { break };
        let crc = crc32fast::hash(&data[p + 4..end]);
        data[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        p = end + 4;
    }
}

/// Recomputes the CRC-32 of every stored zip member the central directory leads to.
fn fix_zip_crcs(data: &mut [u8]) {
    let u16_at = |d: &[u8], i: usize| d.get(i..i + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |d: &[u8], i: usize| d.get(i..i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let Some(eocd) = (0..data.len().saturating_sub(21)).rev().find(|&i| data[i..i + 4] == [0x50, 0x4b, 5, 6]) else { return };
    let (Some(count), Some(mut at)) = (u16_at(data, eocd + 10), u32_at(data, eocd + 16)) else { return };
    for _ in 0..count {
        if data.get(at..at + 4) != Some(&[0x50, 0x4b, 1, 2][..]) {
            return;
        }
        let fields = (u16_at(data, at + 10), u32_at(data, at + 20), u16_at(data, at + 28), u16_at(data, at + 30), u16_at(data, at + 32), u32_at(data, at + 42));
        let (Some(method), Some(size), Some(n), Some(e), Some(c), Some(local)) = fields else { return };
        if method == 0 && data.get(local..local + 4) == Some(&[0x50, 0x4b, 3, 4][..]) {
            if let (Some(ln), Some(le)) = (u16_at(data, local + 26), u16_at(data, local + 28)) {
                let start = local + 30 + ln + le;
                if let Some(body) = start.checked_add(size).and_then(|end| data.get(start..end)) {
                    let crc = crc32fast::hash(body).to_le_bytes();
                    data[at + 16..at + 20].copy_from_slice(&crc);
                    data[local + 14..local + 18].copy_from_slice(&crc);
                }
            }
        }
        at += 46 + n + e + c;
    }
}

/// Rewrites the length and CRC of a shard index container (`index.bin`, `.idx`) to fit its
/// payload.
fn fix_index_container(data: &mut [u8]) {
    if data.len() >= 24 && (data.starts_with(b"MMFINDEX") || data.starts_with(b"MMFSHIDX")) {
        let n = (data.len() - 24) as u64;
        data[12..20].copy_from_slice(&n.to_le_bytes());
        let crc = crc32fast::hash(&data[24..]);
        data[20..24].copy_from_slice(&crc.to_le_bytes());
    }
}

/// One fuzz case: the files to read, and how they were made.
#[derive(Clone, Debug)]
pub struct Case {
    pub target: Target,
    pub seed: u64,
    pub index: u64,
    /// The seed input it was made from.
    pub base: String,
    /// The file that was mutated.
    pub mutated: String,
    /// The mutations, in order.
    pub ops: Vec<String>,
    /// Every file of the case folder (name, bytes); one unless the target reads a folder.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Case {
    /// The mutated file's bytes.
    pub fn mutated_bytes(&self) -> &[u8] {
        self.files.iter().find(|(n, _)| *n == self.mutated).map_or(&[][..], |(_, b)| b)
    }
}

/// A target's seed inputs, from which cases are made.
pub struct Corpus {
    pub target: Target,
    pub seeds: Vec<Seed>,
}

impl Corpus {
    pub fn new(target: Target) -> Result<Self> {
        Ok(Self { target, seeds: seeds(target)? })
    }

    /// Case `index` of a run with `seed`: the same bytes for the same (target, seed, index).
    pub fn case(&self, seed: u64, index: u64) -> Case {
        let mut rng = Rng::for_case(self.target, seed, index);
        let base = rng.pick(&self.seeds);
        let mut files: Vec<(String, Vec<u8>)> = base.files.iter().map(|f| (f.name.clone(), f.content.bytes())).collect();
        // Folder targets: index files more often (they say where everything else is).
        let which = if base.files.len() > 1 && rng.chance(1, 2) {
            base.files.iter().position(|f| f.name == "index.bin").unwrap_or(0)
        } else {
            rng.below(base.files.len())
        };
        let donors_owned: Vec<Vec<u8>> = self.seeds.iter().flat_map(|s| s.files.iter().map(|f| f.content.bytes())).collect();
        let donors: Vec<&[u8]> = donors_owned.iter().map(Vec::as_slice).collect();
        let mut ops = Vec::new();
        let mut mutate_file = |i: usize, rng: &mut Rng, ops: &mut Vec<String>| {
            let f = &base.files[i];
            let bytes = match &f.content {
                Content::Zip(members) if rng.chance(1, 2) => {
                    // Mutate one member, then pack: the CRCs fit and the reader behind the zip
                    // (the pickle, the storages) sees the mutation.
                    let mut members = members.clone();
                    let m = if rng.chance(2, 3) { members.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap_or(0) } else { rng.below(members.len()) };
                    let member_ops = mutate_bytes(&mut members[m].1, rng, &donors);
                    ops.extend(member_ops.into_iter().map(|o| format!("{}: {o}", members[m].0)));
                    pack_zip(&members)
                }
                c => {
                    let mut b = c.bytes();
                    let json = f.name.ends_with(".json");
                    let structured = if !rng.chance(1, 2) {
                        None
                    } else if json {
                        mutate_json(&b, rng)
                    } else if f.name.ends_with(".safetensors") {
                        mutate_safetensors_header(&b, rng)
                    } else {
                        None
                    };
                    if let Some((m, what)) = structured {
                        b = m;
                        ops.push(format!("{}: {what}", f.name));
                        // Sometimes a byte-level mutation on top.
                        if rng.chance(1, 4) {
                            rng.1 = json;
                            let more = mutate_bytes(&mut b, rng, &donors);
                            rng.1 = false;
                            ops.extend(more.into_iter().map(|o| format!("{}: {o}", f.name)));
                        }
                    } else {
                        rng.1 = json;
                        let file_ops = mutate_bytes(&mut b, rng, &donors);
                        rng.1 = false;
                        ops.extend(file_ops.into_iter().map(|o| format!("{}: {o}", f.name)));
                    }
                    if rng.chance(3, 4) {
                        if matches!(c, Content::Zip(_)) {
                            fix_zip_crcs(&mut b);
                            ops.push("zip CRCs recomputed".into());
                        } else if b.starts_with(b"\x89PNG\r\n\x1a\n") {
                            fix_png_crcs(&mut b);
                            ops.push("PNG chunk CRCs recomputed".into());
                        } else if b.starts_with(b"MMFINDEX") || b.starts_with(b"MMFSHIDX") {
                            fix_index_container(&mut b);
                            ops.push("index length and CRC recomputed".into());
                        }
                    }
                    b
                }
            };
            files[i].1 = bytes;
        };
        mutate_file(which, &mut rng, &mut ops);
        if base.files.len() > 1 && rng.chance(1, 8) {
            let other = rng.below(base.files.len());
            if other != which {
                mutate_file(other, &mut rng, &mut ops);
            }
        }
        Case { target: self.target, seed, index, base: base.label.clone(), mutated: base.files[which].name.clone(), ops, files }
    }
}

// ------------------------------------------------------------------------------------------
// Running a case

/// What a target's first reader said: accepted, or refused with this message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Err(String),
}

/// What running a case in this process gave (a panic caught; an abort cannot be).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaseResult {
    Ok,
    Err(String),
    /// The panic message (with its location) and a backtrace.
    Panic { message: String, backtrace: String },
}

/// Writes `files` into `dir` (emptied first) and runs `target`'s readers on them. Panics and
/// aborts of a reader are not caught here (see [`run_case_caught`]).
pub fn run_files(target: Target, files: &[(String, Vec<u8>)], dir: &Path) -> Result<Outcome> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot empty {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, bytes) in files {
        let p = dir.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let first = files.first().map(|(n, _)| dir.join(n)).unwrap_or_else(|| dir.join("empty"));
    Ok(match check(target, dir, &first) {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Err(e),
    })
}

/// The target's readers on `file` (or the folder `dir`); `Err` is the first reader's clean error.
fn check(target: Target, dir: &Path, file: &Path) -> std::result::Result<(), String> {
    let s = |e: &dyn std::fmt::Display| e.to_string();
    match target {
        Target::Pth | Target::Safetensors => {
            let first = backbone::StateDict::read(file, &Device::Cpu).map(|sd| sd.len()).map_err(|e| s(&e));
            let _ = crate::MmFormer::load(file, &Device::Cpu);
            first.map(|_| ())
        }
        Target::PngMask => {
            let first = crate::read_support_mask(file, None).map(|_| ()).map_err(|e| s(&e));
            let _ = crate::read_support_mask(file, Some(3));
            let _ = data::label::read_label_png(file, &data::MaskEncoding::ClassIds);
            first
        }
        Target::Image => crate::read_image(file).map(|_| ()).map_err(|e| s(&e)),
        Target::EpisodesJson => {
            let ds = episodes_dataset();
            let eps = data::TestEpisodes::read_json(file, ds).map_err(|e| s(&e))?;
            for i in 0..eps.len().min(2) {
                let _ = eps.load(ds, i, 32);
            }
            Ok(())
        }
        Target::Shard => {
            let first = read_shards(dir);
            // cache-proposals' merge of the per-shard indexes (it rewrites index.bin), then the
            // reader again on what it wrote.
            if data::shard::ShardIndex::merge(dir).is_ok() {
                let _ = read_shards(dir);
            }
            first
        }
        Target::Config => check_config(dir, file),
        Target::SelftestAbort => unreachable!("the selftest target runs in run_case_caught"),
    }
}

fn read_shards(dir: &Path) -> std::result::Result<(), String> {
    use data::shard::{ShardExpectation, ShardReader};
    let r = ShardReader::open(dir, &ShardExpectation::default()).map_err(|e| e.to_string())?;
    for i in 0..r.len() {
        r.get_at(i).map_err(|e| e.to_string())?;
    }
    if let Some(m) = r.records().first() {
        r.get(&m.image_id, m.view).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Parses `T`, and checks that what was accepted survives a round trip (a value that changes
/// when written back would be a silently changed run configuration).
fn parse_json<T: Serialize + serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> std::result::Result<T, String> {
    let v: T = serde_json::from_slice(bytes).map_err(|e| format!("{what}: {e}"))?;
    let once = serde_json::to_value(&v).map_err(|e| format!("{what}: cannot write back: {e}"))?;
    let again: T = serde_json::from_value(once.clone()).map_err(|e| format!("{what}: written back, not read again: {e}"))?;
    let twice = serde_json::to_value(&again).map_err(|e| format!("{what}: {e}"))?;
    assert_eq!(once, twice, "{what}: an accepted value changes on a round trip");
    Ok(v)
}

/// The file's own reader decides the outcome (by file name: `stage1.json`, `stage2.json`,
/// `cache.json`, `manifest.json`, `state.json`, `meta.json`); every other parser runs on it too.
fn check_config(dir: &Path, file: &Path) -> std::result::Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let results = [
        ("stage1.json", parse_json::<crate::stage1::Stage1Options>(&bytes, "Stage1Options").map(|o| drop(crate::run_config(&o)))),
        ("stage2.json", parse_json::<crate::stage2::Stage2Options>(&bytes, "Stage2Options").map(|o| drop(crate::run_config(&o)))),
        ("cache.json", parse_json::<crate::cache::CacheOptions>(&bytes, "CacheOptions").map(drop)),
        ("meta.json", parse_json::<crate::ModelMeta>(&bytes, "ModelMeta").map(drop)),
        ("", parse_json::<crate::cache::CacheManifest>(&bytes, "CacheManifest").map(drop)),
        ("", parse_json::<train::TrainState>(&bytes, "TrainState").map(drop)),
        ("manifest.json", crate::cache::CacheManifest::read(dir).map(drop).map_err(|e| e.to_string())),
        ("state.json", train::CheckpointStore::open(dir, "mm").map(drop).map_err(|e| e.to_string())),
    ];
    results.into_iter().find(|(n, _)| *n == name).map_or(Ok(()), |(_, r)| r)
}

static PANIC: Mutex<Option<(String, String)>> = Mutex::new(None);

/// Installs a panic hook that keeps the message and a backtrace for [`run_case_caught`] instead
/// of printing them. Call once, in a process that runs cases.
pub fn capture_panics() {
    std::panic::set_hook(Box::new(|info| {
        let bt = std::backtrace::Backtrace::force_capture().to_string();
        if let Ok(mut p) = PANIC.lock() {
            p.get_or_insert((info.to_string().replace('\n', " "), bt));
        }
    }));
}

/// Runs a case in this process, catching a panic (see [`capture_panics`] for its message).
/// An abort or an allocation failure ends the process: that is what a worker is for.
pub fn run_case_caught(case: &Case, dir: &Path) -> Result<CaseResult> {
    if let Ok(mut p) = PANIC.lock() {
        *p = None;
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if case.target == Target::SelftestAbort {
            return Ok(selftest(case.index));
        }
        run_files(case.target, &case.files, dir)
    }));
    Ok(match r {
        Ok(Ok(Outcome::Ok)) => CaseResult::Ok,
        Ok(Ok(Outcome::Err(e))) => CaseResult::Err(e),
        Ok(Err(harness)) => return Err(harness),
        Err(payload) => {
            let (message, backtrace) = PANIC.lock().ok().and_then(|mut p| p.take()).unwrap_or_else(|| {
                let m = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned());
                (m.unwrap_or_else(|| "panic with a non-string payload".into()), String::new())
            });
            CaseResult::Panic { message, backtrace }
        }
    })
}

/// The selftest target: case 3 aborts, 5 allocates 3 GiB, 7 panics, 9 hangs; the rest are ok.
fn selftest(index: u64) -> Outcome {
    match index {
        3 => std::process::abort(),
        5 => {
            // 3 GiB, untouched: fails only under the address-space limit (2 GiB by default).
            let v: Vec<u8> = vec![0u8; std::hint::black_box(3 << 30)];
            Outcome::Err(format!("allocated {} bytes", std::hint::black_box(v).len()))
        }
        7 => panic!("selftest panic at case 7"),
        9 => {
            std::thread::sleep(Duration::from_secs(3600));
            Outcome::Ok
        }
        _ => Outcome::Ok,
    }
}

// ------------------------------------------------------------------------------------------
// The worker process

/// A worker's job, passed in [`WORKER_ENV`] as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WorkerJob {
    target: Target,
    seed: u64,
    /// First case to run.
    start: u64,
    /// One past the last case (None: until the time is up).
    end: Option<u64>,
    /// Milliseconds the worker may start new cases for.
    millis: Option<u64>,
    /// Where the index of the case about to run is written (8 bytes, little-endian).
    progress: PathBuf,
    /// Scratch folder for case files.
    scratch: PathBuf,
    /// Address-space limit, MiB (0: none).
    memory_mb: u64,
}

/// True in a process started as a fuzz worker ([`WORKER_ENV`] set).
pub fn is_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

/// The body of a worker process: reads its job from [`WORKER_ENV`], limits its address space,
/// runs the cases and exits. Prints one protocol line per case on stdout.
pub fn worker_main() -> ! {
    let code = match worker() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fuzz worker: {e}");
            2
        }
    };
    std::process::exit(code)
}

fn worker() -> Result<()> {
    let job: WorkerJob = serde_json::from_str(&std::env::var(WORKER_ENV).context("fuzz worker: no job in the environment")?)?;
    let mut progress = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&job.progress)
        .with_context(|| format!("cannot open {}", job.progress.display()))?;
    let mark = |f: &mut std::fs::File, v: u64| -> Result<()> {
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0))?;
        f.write_all(&v.to_le_bytes())?;
        Ok(())
    };
    mark(&mut progress, STARTING)?;
    if job.memory_mb > 0 {
        limit_address_space(job.memory_mb << 20)?;
    }
    capture_panics();
    let corpus = Corpus::new(job.target)?;
    let scratch = job.scratch.join(format!("{}-{}", job.target, std::process::id()));
    let scratch_name = scratch.display().to_string();
    let t0 = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| {
        if writeln!(out, "{LINE_PREFIX}{line}").and_then(|_| out.flush()).is_err() {
            // The parent is gone.
            std::process::exit(3);
        }
    };
    let mut i = job.start;
    while job.end.is_none_or(|e| i < e) && job.millis.is_none_or(|ms| t0.elapsed().as_millis() < ms as u128) {
        mark(&mut progress, i)?;
        // A fault of the fuzzer itself (making the case, writing its files) is not the reader's:
        // it is said apart, and the parent stops.
        let made = std::panic::catch_unwind(|| corpus.case(job.seed, i));
        let result = match made {
            Ok(case) => run_case_caught(&case, &scratch),
            Err(_) => Err(crate::Error::Invalid(PANIC.lock().ok().and_then(|mut p| p.take()).map_or_else(|| "panic".into(), |p| p.0))),
        };
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                say(format!("harness {i} {}", one_line(&e.to_string(), 2000)));
                std::process::exit(2);
            }
        };
        match result {
            CaseResult::Ok => say(format!("ok {i}")),
            CaseResult::Err(e) => say(format!("err {i} {}", one_line(&e.replace(&scratch_name, "…"), 300))),
            CaseResult::Panic { message, backtrace } => {
                say(format!("panic {i} {}", one_line(&message, 2000)));
                say(format!("backtrace {i} {}", backtrace.replace('\n', "\u{1f}")));
            }
        }
        i += 1;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    say(format!("done {i}"));
    Ok(())
}

fn one_line(s: &str, max: usize) -> String {
    let s = s.replace(['\n', '\r'], " | ");
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(unix)]
fn limit_address_space(bytes: u64) -> Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write/read the struct passed; nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_AS)");
    }
    let want = bytes as libc::rlim_t;
    lim.rlim_cur = if lim.rlim_max == libc::RLIM_INFINITY { want } else { want.min(lim.rlim_max) };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_AS)");
    }
    Ok(())
}

#[cfg(not(unix))]
fn limit_address_space(_bytes: u64) -> Result<()> {
    bail!("the fuzz worker's memory limit needs setrlimit (Unix); pass --memory-mb 0 to run without it")
}

// ------------------------------------------------------------------------------------------
// The parent

/// How to start a worker: this program with these arguments (the job goes in [`WORKER_ENV`]).
/// `cargo xtask fuzz` starts itself with a hidden `--worker` flag; a test binary can start
/// itself with the name of a test that calls [`worker_main`] when [`is_worker`].
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// A fuzzing run.
#[derive(Clone, Debug)]
pub struct FuzzOptions {
    pub targets: Vec<Target>,
    /// Seed of the mutation streams.
    pub seed: u64,
    /// Time per target (None: only `cases` limits).
    pub seconds: Option<f64>,
    /// Cases per target (None: only `seconds` limits).
    pub cases: Option<u64>,
    /// First case index.
    pub start_case: u64,
    /// Crashes go to `<out>/crashes`, the summary to `<out>/summary.json`.
    pub out: PathBuf,
    /// Address-space limit of a worker, MiB (0: none).
    pub memory_mb: u64,
    /// A case running longer than this is a hang: the worker is killed and the case recorded.
    pub case_timeout: Duration,
}

impl FuzzOptions {
    pub fn new(targets: Vec<Target>, out: impl Into<PathBuf>) -> Self {
        Self { targets, seed: 0, seconds: None, cases: None, start_case: 0, out: out.into(), memory_mb: DEFAULT_MEMORY_MB, case_timeout: Duration::from_secs(10) }
    }
}

/// Why a case failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A panic (caught in the worker).
    Panic,
    /// The worker aborted (SIGABRT) on an allocation failure: a reader asked for more memory
    /// than the address-space limit.
    OutOfMemory,
    /// The worker overflowed its stack.
    StackOverflow,
    /// Another abort (SIGABRT).
    Abort,
    /// Killed by another signal.
    Signal(i32),
    /// Exited with a non-zero status.
    Exit(i32),
    /// Ran longer than the case timeout.
    Timeout,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureKind::Panic => write!(f, "panic"),
            FailureKind::OutOfMemory => write!(f, "allocation failure (abort)"),
            FailureKind::StackOverflow => write!(f, "stack overflow"),
            FailureKind::Abort => write!(f, "abort"),
            FailureKind::Signal(s) => write!(f, "signal {s}"),
            FailureKind::Exit(c) => write!(f, "exit status {c}"),
            FailureKind::Timeout => write!(f, "timeout"),
        }
    }
}

/// A failing case, written under `<out>/crashes`.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub target: Target,
    pub case: u64,
    pub kind: FailureKind,
    pub message: String,
    /// The mutated file (`<out>/crashes/<target>-<case>.bin`).
    pub input: PathBuf,
}

/// The counts of one target.
#[derive(Clone, Debug, Serialize)]
pub struct TargetSummary {
    pub target: Target,
    pub seed: u64,
    pub first_case: u64,
    /// Cases run (ok + err + failures).
    pub cases: u64,
    pub ok: u64,
    pub err: u64,
    pub panics: u64,
    /// Aborts, allocation failures, stack overflows and deaths by signal or exit status.
    pub aborts: u64,
    pub timeouts: u64,
    pub seconds: f64,
    /// Workers started (1 + one per crash or hang).
    pub workers: u64,
    /// The commonest clean errors (digits and quoted text blanked), with their counts.
    pub top_errors: Vec<(String, u64)>,
    pub failures: Vec<Failure>,
}

/// What a run found.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub targets: Vec<TargetSummary>,
}

impl Summary {
    pub fn failures(&self) -> usize {
        self.targets.iter().map(|t| t.failures.len()).sum()
    }

    /// A table of the counts, the commonest errors and every failure.
    pub fn report(&self) -> String {
        let mut s = format!(
            "{:<14} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8}\n",
            "target", "cases", "ok", "err", "panics", "aborts", "hangs", "seconds", "cases/s"
        );
        for t in &self.targets {
            s += &format!(
                "{:<14} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8.1} {:>8.0}\n",
                t.target.name(),
                t.cases,
                t.ok,
                t.err,
                t.panics,
                t.aborts,
                t.timeouts,
                t.seconds,
                t.cases as f64 / t.seconds.max(1e-9)
            );
        }
        for t in &self.targets {
            if !t.top_errors.is_empty() {
                s += &format!("{}: commonest errors:\n", t.target);
                for (e, n) in t.top_errors.iter().take(5) {
                    s += &format!("  {n:>8}  {e}\n");
                }
            }
        }
        let n = self.failures();
        if n == 0 {
            s += "no failures\n";
        } else {
            s += &format!("{n} failure(s):\n");
            for t in &self.targets {
                for f in &t.failures {
                    s += &format!("  {} case {} ({}): {}\n    input: {}\n", f.target, f.case, f.kind, one_line(&f.message, 400), f.input.display());
                }
            }
        }
        s
    }
}

/// An error message with its specifics blanked, so that errors of one kind count together.
fn error_kind(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(120));
    let mut in_quote: Option<char> = None;
    let mut last_digit = false;
    for c in msg.chars() {
        if let Some(q) = in_quote {
            if c == q {
                in_quote = None;
                out.push(c);
            }
            continue;
        }
        if c == '`' || c == '"' {
            in_quote = Some(c);
            out.push(c);
            out.push('…');
            continue;
        }
        if c.is_ascii_digit() {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
            continue;
        }
        last_digit = false;
        out.push(c);
        if out.len() > 110 {
            out.push('…');
            break;
        }
    }
    out
}

enum Line {
    Ok(u64),
    Err(u64, String),
    Panic(u64, String),
    Backtrace(u64, String),
    Done(u64),
    /// The fuzzer itself failed (not the reader).
    Harness(u64, String),
}

fn parse_line(l: &str) -> Option<Line> {
    // Anywhere in the line: a test harness may have printed something without a newline first.
    let rest = &l[l.find(LINE_PREFIX)? + LINE_PREFIX.len()..];
    let mut it = rest.splitn(3, ' ');
    let (kind, n) = (it.next()?, it.next()?.trim().parse().ok()?);
    let text = it.next().unwrap_or("").to_string();
    Some(match kind {
        "ok" => Line::Ok(n),
        "err" => Line::Err(n, text),
        "panic" => Line::Panic(n, text),
        "backtrace" => Line::Backtrace(n, text.replace('\u{1f}', "\n")),
        "done" => Line::Done(n),
        "harness" => Line::Harness(n, text),
        _ => return None,
    })
}

/// Runs every target of `opts` in worker processes started by `worker`; `log` receives a line
/// per failure as it is found and one per finished target. The summary is also written to
/// `<out>/summary.json`.
pub fn run(opts: &FuzzOptions, worker: &WorkerCommand, log: &mut dyn FnMut(&str)) -> Result<Summary> {
    if opts.seconds.is_none() && opts.cases.is_none() {
        bail!("a fuzz run needs a time (seconds) or a case budget");
    }
    std::fs::create_dir_all(opts.out.join("crashes")).with_context(|| format!("cannot create {}", opts.out.join("crashes").display()))?;
    let mut targets = Vec::new();
    for &t in &opts.targets {
        let s = run_target(opts, t, worker, log)?;
        log(&format!("{}: {} cases, {} ok, {} err, {} failure(s) in {:.1} s", t, s.cases, s.ok, s.err, s.failures.len(), s.seconds));
        targets.push(s);
    }
    let summary = Summary { targets };
    let p = opts.out.join("summary.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&summary)?).with_context(|| format!("cannot write {}", p.display()))?;
    Ok(summary)
}

fn run_target(opts: &FuzzOptions, target: Target, worker: &WorkerCommand, log: &mut dyn FnMut(&str)) -> Result<TargetSummary> {
    let corpus = Corpus::new(target)?;
    let t0 = Instant::now();
    let deadline = opts.seconds.map(|s| t0 + Duration::from_secs_f64(s));
    let end = opts.cases.map(|c| opts.start_case + c);
    let mut s = TargetSummary {
        target,
        seed: opts.seed,
        first_case: opts.start_case,
        cases: 0,
        ok: 0,
        err: 0,
        panics: 0,
        aborts: 0,
        timeouts: 0,
        seconds: 0.0,
        workers: 0,
        top_errors: Vec::new(),
        failures: Vec::new(),
    };
    let mut errors: HashMap<String, u64> = HashMap::new();
    let progress = opts.out.join(format!("progress-{target}-{}", std::process::id()));
    let scratch = opts.out.join("scratch");
    let mut next = opts.start_case;
    loop {
        if end.is_some_and(|e| next >= e) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let _ = std::fs::remove_file(&progress);
        let job = WorkerJob {
            target,
            seed: opts.seed,
            start: next,
            end,
            millis: deadline.map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
            progress: progress.clone(),
            scratch: scratch.clone(),
            memory_mb: opts.memory_mb,
        };
        let mut child = std::process::Command::new(&worker.program)
            .args(&worker.args)
            .env(WORKER_ENV, serde_json::to_string(&job)?)
            // Fewer threads and malloc arenas: less address space taken before any case runs.
            .env("RAYON_NUM_THREADS", "1")
            .env("MALLOC_ARENA_MAX", "2")
            // Where an allocation failed or a stack overflowed, in the crash report.
            .env("RUST_BACKTRACE", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the fuzz worker {}", worker.program.display()))?;
        s.workers += 1;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("piped");
        let tail = std::thread::spawn(move || {
            let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tail.len() == 100 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            tail.into_iter().collect::<Vec<_>>().join("\n")
        });
        let mut last = Instant::now();
        let mut done = false;
        let mut hung = false;
        let mut pending_panic: Option<(u64, String)> = None;
        let mut harness: Option<String> = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    last = Instant::now();
                    match parse_line(&line) {
                        Some(Line::Ok(n)) => {
                            s.ok += 1;
                            s.cases += 1;
                            next = n + 1;
                        }
                        Some(Line::Err(n, e)) => {
                            s.err += 1;
                            s.cases += 1;
                            *errors.entry(error_kind(&e)).or_default() += 1;
                            next = n + 1;
                        }
                        Some(Line::Panic(n, msg)) => {
                            s.panics += 1;
                            s.cases += 1;
                            next = n + 1;
                            pending_panic = Some((n, msg));
                        }
                        Some(Line::Backtrace(n, bt)) => {
                            if let Some((pn, msg)) = pending_panic.take().filter(|(pn, _)| *pn == n) {
                                let f = record_failure(opts, &corpus, pn, FailureKind::Panic, msg, &bt)?;
                                log(&format!("FAILURE {} case {} ({}): {}", f.target, f.case, f.kind, one_line(&f.message, 300)));
                                s.failures.push(f);
                            }
                        }
                        Some(Line::Done(n)) => {
                            next = n;
                            done = true;
                        }
                        Some(Line::Harness(n, e)) => harness = Some(format!("case {n}: {e}")),
                        None => {}
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if last.elapsed() > opts.case_timeout {
                        hung = true;
                        let _ = child.kill();
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = child.wait().context("waiting for the fuzz worker")?;
        let _ = reader.join();
        let stderr_tail = tail.join().unwrap_or_default();
        let _ = std::fs::remove_dir_all(scratch.join(format!("{target}-{}", child.id())));
        if let Some(e) = harness {
            bail!("the fuzzer failed (not the reader) on {target} {e}");
        }
        if let Some((n, msg)) = pending_panic.take() {
            let f = record_failure(opts, &corpus, n, FailureKind::Panic, msg, "")?;
            s.failures.push(f);
        }
        if done {
            // A worker stops only when the case budget or the time is spent.
            if !status.success() {
                log(&format!("note: the {target} worker ended with {status} after its last case"));
            }
            break;
        }
        // The worker died or hung: the case it was running is the one in the progress file.
        let at = std::fs::read(&progress).ok().and_then(|b| b.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))));
        let case = match at {
            Some(c) if c != STARTING && c >= next => c,
            _ => bail!(
                "the fuzz worker for {target} {} before its first case (memory limit too low for the program itself?): {}",
                if hung { "hung" } else { "died" },
                stderr_tail
            ),
        };
        let kind = if hung { FailureKind::Timeout } else { classify_exit(&status, &stderr_tail) };
        let message = if hung {
            format!("no answer for {:.0} s", opts.case_timeout.as_secs_f64())
        } else {
            // The line that says what happened (the backtrace after it goes to the .txt file).
            let key = ["memory allocation of", "overflowed its stack", "panicked", "fatal", "error"];
            let tail: Vec<&str> = stderr_tail.lines().filter(|l| !l.trim().is_empty()).collect();
            let said = key
                .iter()
                .find_map(|k| tail.iter().find(|l| l.contains(k)))
                .map_or_else(|| tail[tail.len().saturating_sub(3)..].join(" | "), |l| l.to_string());
            format!("{status}; stderr: {said}")
        };
        match kind {
            FailureKind::Timeout => s.timeouts += 1,
            _ => s.aborts += 1,
        }
        s.cases += 1;
        let f = record_failure(opts, &corpus, case, kind, message, &stderr_tail)?;
        log(&format!("FAILURE {} case {} ({}): {}", f.target, f.case, f.kind, one_line(&f.message, 300)));
        s.failures.push(f);
        next = case + 1;
    }
    let _ = std::fs::remove_file(&progress);
    let _ = std::fs::remove_dir(&scratch);
    s.seconds = t0.elapsed().as_secs_f64();
    let mut top: Vec<(String, u64)> = errors.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(30);
    s.top_errors = top;
    Ok(s)
}

#[cfg(unix)]
fn classify_exit(status: &std::process::ExitStatus, stderr: &str) -> FailureKind {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(libc::SIGABRT) if stderr.contains("memory allocation of") => FailureKind::OutOfMemory,
        Some(libc::SIGABRT) => FailureKind::Abort,
        Some(libc::SIGSEGV | libc::SIGBUS) if stderr.contains("overflowed its stack") => FailureKind::StackOverflow,
        Some(s) => FailureKind::Signal(s),
        None => FailureKind::Exit(status.code().unwrap_or(-1)),
    }
}

#[cfg(not(unix))]
fn classify_exit(status: &std::process::ExitStatus, _stderr: &str) -> FailureKind {
    FailureKind::Exit(status.code().unwrap_or(-1))
}

/// Writes a failing case under `<out>/crashes`: `<target>-<case>.bin` (the mutated file),
/// `<target>-<case>.txt` (what happened, how it was made, how to replay it) and, for a folder
/// target, the whole folder as `<target>-<case>/`.
fn record_failure(opts: &FuzzOptions, corpus: &Corpus, case: u64, kind: FailureKind, message: String, detail: &str) -> Result<Failure> {
    let c = corpus.case(opts.seed, case);
    let dir = opts.out.join("crashes");
    let stem = format!("{}-{case}", corpus.target);
    let input = dir.join(format!("{stem}.bin"));
    std::fs::write(&input, c.mutated_bytes()).with_context(|| format!("cannot write {}", input.display()))?;
    if corpus.target.is_folder() {
        let folder = dir.join(&stem);
        let _ = std::fs::remove_dir_all(&folder);
        std::fs::create_dir_all(&folder)?;
        for (n, b) in &c.files {
            std::fs::write(folder.join(n), b)?;
        }
    }
    let txt = format!(
        "target: {}\nseed: {}\ncase: {case}\nfailure: {kind}\nmessage: {message}\nseed input: {}\nmutated file: {}{}\nmutations:\n{}\nreplay: cargo xtask fuzz --target {} --seed {} --case {case}\n       (or --input {})\n\n{detail}\n",
        corpus.target,
        opts.seed,
        c.base,
        c.mutated,
        if corpus.target.is_folder() { format!(" (the whole folder: {stem}/)") } else { String::new() },
        c.ops.iter().map(|o| format!("  {o}")).collect::<Vec<_>>().join("\n"),
        corpus.target,
        opts.seed,
        if corpus.target.is_folder() { dir.join(&stem) } else { input.clone() }.display(),
    );
    std::fs::write(dir.join(format!("{stem}.txt")), txt)?;
    Ok(Failure { target: corpus.target, case, kind, message, input })
}

/// Runs case `index` of `target` in this process (no worker, no memory limit, panics not
/// caught), to see a failure happen: the case, and what its first reader said.
pub fn replay_case(target: Target, seed: u64, index: u64, scratch: &Path) -> Result<(Case, Outcome)> {
    let case = Corpus::new(target)?.case(seed, index);
    let outcome = if target == Target::SelftestAbort { selftest(index) } else { run_files(target, &case.files, scratch)? };
    Ok((case, outcome))
}

/// Runs `target` on a file of the user's (for `shard`, a folder) in this process.
pub fn run_input(target: Target, input: &Path, scratch: &Path) -> Result<Outcome> {
    let files: Vec<(String, Vec<u8>)> = if input.is_dir() {
        let mut v = Vec::new();
        for e in std::fs::read_dir(input).with_context(|| format!("cannot list {}", input.display()))? {
            let e = e?;
            if e.file_type()?.is_file() {
                v.push((e.file_name().to_string_lossy().into_owned(), read(&e.path())?));
            }
        }
        v.sort();
        v
    } else {
        // The file keeps its extension (some readers look at it); a crash file `.bin` is named
        // as its target's first seed file.
        let name = match input.extension().and_then(|e| e.to_str()) {
            Some("bin") | None => seeds(target)?.first().and_then(|s| s.files.first()).map(|f| f.name.clone()).unwrap_or_else(|| "input".into()),
            _ => input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "input".into()),
        };
        vec![(name, read(input)?)]
    };
    run_files(target, &files, scratch)
}
