//! Weight files and the tensor source the models are built from.
//!
//! [`StateDict::read`] opens every format users have, told apart by their first bytes:
//! PyTorch zip (`torch.save` since 1.6, [`zip`]), the legacy PyTorch pickle ([`legacy`]) and
//! safetensors. Both `.pth` formats go through our own pickle reader ([`pickle`]), which runs
//! nothing: only a whitelist of globals is understood (see [`pickle::classify`]), anything else is
//! refused naming the key that holds it, and every tensor is checked against the bytes its
//! storage really has before anything is allocated ([`torch`]). [`Weights`] is what a model's
//! `new(cfg, vb)` takes: a prefix-scoped view of a [`StateDict`], of any candle `VarBuilder`,
//! or of deterministic synthetic values (for timing without a file).

mod legacy;
mod pickle;
mod torch;
mod zip;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{BackboneError, Result};

/// How the names of a [`StateDict`] relate to the names in its file, so that an error about a
/// key can spell it as the file does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileNaming {
    /// Same names as in the file.
    Same,
    /// The file's names carry this prefix (e.g. `backbone.` in an MM-Former checkpoint).
    Prefixed(String),
    /// The file uses torchvision ResNet names (see [`crate::names`]).
    Torchvision,
}

/// Writes `named` as a safetensors file, errors naming `path`.
pub(crate) fn write_safetensors(named: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(named, path).map_err(|e| match e {
        candle_core::Error::Io(source) => BackboneError::Io { file: path.to_path_buf(), source },
        e => BackboneError::Corrupt { file: path.to_path_buf(), detail: format!("cannot write: {e}") },
    })
}

/// The tensors of one weight file by name, with the file they came from.
#[derive(Clone, Debug)]
pub struct StateDict {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    naming: FileNaming,
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

impl StateDict {
    /// Every tensor of a weight file (zip or legacy `.pth`, or safetensors), under the names the
    /// file uses. For a checkpoint dict like detectron2's `{"model": ..., "optimizer": ...}` the
    /// tensors of `model` are returned (see [`StateDict::read_with_key`]).
    /// The tensors are placed on `device`.
    pub fn read(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::read_with_key(path, None, device)
    }

    /// As [`StateDict::read`], taking the tensors of the entry `dict_key` of the saved dict.
    pub fn read_with_key(path: impl AsRef<Path>, dict_key: Option<&str>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| BackboneError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(path, &bytes, dict_key, device)
    }

    /// As [`StateDict::read_with_key`], from the bytes of a file already in memory; `path`
    /// names it in errors. Whatever the bytes, nothing in them is executed, nothing panics, and
    /// what is allocated is bounded by the file: the tensors by twice the bytes of the storages
    /// they view (plus 64 KiB), the decoded pickle's objects by 64 MiB plus 16 bytes per byte of
    /// pickle (256 MiB at most), and a deflated zip member (torch never writes one) by its
    /// declared size, itself bounded by deflate's 1032:1 ratio.
    pub fn from_bytes(
        path: impl AsRef<Path>,
        bytes: &[u8],
        dict_key: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tensors = if bytes.starts_with(ZIP_MAGIC) {
            read_zip(path, bytes, dict_key, device)?
        } else if legacy::is_legacy(bytes) {
            let t = legacy::read_legacy(path, bytes, dict_key, device)?;
            if t.is_empty() && dict_key.is_none() {
                return Err(BackboneError::NotAWeightFile {
                    file: path.to_path_buf(),
                    found: "a legacy torch file holding no tensors".into(),
                });
            }
            t
        } else if looks_like_safetensors(bytes) {
            read_safetensors(path, bytes, device)?
        } else {
            return Err(BackboneError::NotAWeightFile {
                file: path.to_path_buf(),
                found: describe_start(bytes),
            });
        };
        Ok(Self {
            path: path.to_path_buf(),
            tensors: tensors.into_iter().collect(),
            naming: FileNaming::Same,
        })
    }

    /// Wraps tensors that did not come from a file; `label` stands in for the path in errors.
    pub fn from_tensors(label: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            path: label.into(),
            tensors,
            naming: FileNaming::Same,
        }
    }

    /// The same tensors renamed, remembering how our names map back to the file's names.
    pub(crate) fn renamed(
        path: PathBuf,
        tensors: HashMap<String, Tensor>,
        naming: FileNaming,
    ) -> Self {
        Self {
            path,
            tensors,
            naming,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn naming(&self) -> &FileNaming {
        &self.naming
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Names in sorted order.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors
    }

    /// How the file spells one of our names (for error messages).
    pub fn file_key(&self, name: &str) -> String {
        match &self.naming {
            FileNaming::Same => name.to_string(),
            FileNaming::Prefixed(p) => format!("{p}{name}"),
            FileNaming::Torchvision => {
                crate::names::official_to_torchvision(name).unwrap_or_else(|| name.to_string())
            }
        }
    }

    /// Writes the tensors as safetensors, each name prefixed with `prefix` (e.g. `"backbone."`
    /// gives the names of an MM-Former state dict).
    pub fn save_safetensors(&self, path: impl AsRef<Path>, prefix: &str) -> Result<()> {
        let path = path.as_ref();
        let named: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
            .collect();
        write_safetensors(&named, path)
    }

    /// One tensor, checked against the shape the model expects, as f32.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| BackboneError::MissingKey {
                file: self.path.clone(),
                key: self.file_key(name),
                expected: expected.to_vec(),
            })?;
        if t.dims() != expected {
            return Err(BackboneError::ShapeMismatch {
                file: self.path.clone(),
                key: self.file_key(name),
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        if !t.dtype().is_float() {
            return Err(BackboneError::BadTensor {
                file: self.path.clone(),
                key: self.file_key(name),
                detail: format!("expected a floating-point tensor, found {:?}", t.dtype()),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// The one-line error of a [`torch::Problem`] in `path`. Text taken from the file (keys,
/// global names, strings quoted in details) has its control characters escaped, so that the
/// message stays on one line whatever the file holds.
pub(crate) fn problem_error(path: &Path, p: torch::Problem) -> BackboneError {
    let file = path.to_path_buf();
    match p {
        torch::Problem::Forbidden { key, global } => BackboneError::ForbiddenGlobal {
            file,
            key: one_line(key),
            global: one_line(global),
        },
        torch::Problem::Corrupt(detail) => BackboneError::Corrupt {
            file,
            detail: one_line(detail),
        },
        torch::Problem::Tensor { key, detail } => BackboneError::BadTensor {
            file,
            key: one_line(key),
            detail: one_line(detail),
        },
    }
}

/// `s` with its control characters (newlines included) escaped as Rust does (`\n`, `\u{1b}`).
fn one_line(s: String) -> String {
    if !s.chars().any(char::is_control) {
        return s;
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A pickle that could not be decoded: refused for its first non-whitelisted global when it
/// named one before failing, else corrupt. `start` is where the pickle starts in its member.
pub(crate) fn pickle_problem(e: pickle::PickleError, what: &str, start: usize) -> torch::Problem {
    match e.forbidden {
        Some((global, at)) => torch::Problem::Forbidden {
            key: format!("{what} (byte {})", start + at),
            global,
        },
        None => torch::Problem::Corrupt(format!(
            "cannot decode {what} at byte {}: {}",
            start + e.at,
            e.reason
        )),
    }
}

fn read_zip(path: &Path, bytes: &[u8], dict_key: Option<&str>, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let tensors = zip_tensors(bytes, dict_key, device).map_err(|p| problem_error(path, p))?;
    if tensors.is_empty() && dict_key.is_none() {
        return Err(BackboneError::NotAWeightFile {
            file: path.to_path_buf(),
            found: "a torch zip file holding no tensors".into(),
        });
    }
    Ok(tensors)
}

/// `<name>/data.pkl` (the saved object), `<name>/data/<key>` (one member per storage),
/// `<name>/byteorder`, `<name>/version`, ...
fn zip_tensors(bytes: &[u8], dict_key: Option<&str>, device: &Device) -> std::result::Result<Vec<(String, Tensor)>, torch::Problem> {
    use torch::Problem;
    let archive = zip::Archive::parse(bytes).map_err(Problem::Corrupt)?;
    let pkls: Vec<&String> = archive
        .names
        .iter()
        .filter(|n| {
            n.strip_suffix("data.pkl")
                .is_some_and(|pre| pre.is_empty() || (pre.ends_with('/') && pre.matches('/').count() == 1))
        })
        .collect();
    let pkl_name = match pkls.as_slice() {
        [one] => one.as_str(),
        [] => return Err(Problem::Corrupt("a zip file without a torch `data.pkl`".into())),
        more => {
            return Err(Problem::Corrupt(format!(
                "a zip file with {} `data.pkl` members",
                more.len()
            )))
        }
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    if archive.entry(&format!("{prefix}byteorder")).is_some() {
        let order = archive.read(&format!("{prefix}byteorder")).map_err(Problem::Corrupt)?;
        if order.trim_ascii() != b"little" {
            return Err(Problem::Corrupt(format!(
                "byte order `{}` is not supported (only little-endian)",
                String::from_utf8_lossy(&order[..order.len().min(16)])
            )));
        }
    }
    let data = archive.read(pkl_name).map_err(Problem::Corrupt)?;
    let p = pickle::read(&data).map_err(|e| pickle_problem(e, pkl_name, 0))?;
    torch::check(&p)?;
    let entries = torch::select(&p, dict_key)?;
    let mut source = ZipStorages {
        archive: &archive,
        prefix,
        cache: HashMap::new(),
    };
    torch::tensors(&p, entries, &mut source, device)
}

/// Storages as zip members `<prefix>data/<key>`.
struct ZipStorages<'z, 'a> {
    archive: &'z zip::Archive<'a>,
    prefix: &'z str,
    /// Members already read (a storage shared by several tensors is inflated once).
    cache: HashMap<std::rc::Rc<str>, std::borrow::Cow<'a, [u8]>>,
}

impl ZipStorages<'_, '_> {
    fn member(&self, s: &torch::StorageRef) -> String {
        format!("{}data/{}", self.prefix, s.key)
    }
}

impl torch::StorageSource for ZipStorages<'_, '_> {
    fn check(&self, s: &torch::StorageRef) -> std::result::Result<(), torch::Problem> {
        let name = self.member(s);
        let entry = self.archive.entry(&name).ok_or_else(|| {
            torch::Problem::Corrupt(format!("its storage member `{name}` is missing"))
        })?;
        let claimed = (s.numel as u64).checked_mul(s.stype.elem as u64);
        if claimed != Some(entry.size) {
            return Err(torch::Problem::Corrupt(format!(
                "its storage member `{name}` has {} bytes, but the pickle claims {} elements of torch.{} ({} bytes)",
                entry.size,
                s.numel,
                s.stype.name,
                claimed.map_or("too many".to_string(), |c| c.to_string())
            )));
        }
        Ok(())
    }

    fn bytes(&mut self, s: &torch::StorageRef) -> std::result::Result<std::borrow::Cow<'_, [u8]>, torch::Problem> {
        use std::collections::hash_map::Entry;
        self.check(s)?;
        let name = self.member(s);
        let data = match self.cache.entry(s.key.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(self.archive.read(&name).map_err(torch::Problem::Corrupt)?),
        };
        Ok(std::borrow::Cow::Borrowed(&data[..]))
    }
}

/// An 8-byte little-endian header length followed by a JSON object.
fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() > 8 && bytes[8] == b'{'
}

fn read_safetensors(path: &Path, bytes: &[u8], device: &Device) -> Result<Vec<(String, Tensor)>> {
    let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| {
        BackboneError::Corrupt {
            file: path.to_path_buf(),
            detail: one_line(e.to_string()),
        }
    })?;
    Ok(tensors.into_iter().collect())
}

/// What a file that is no weight file starts with, for the error message.
fn describe_start(bytes: &[u8]) -> String {
    let kind = if bytes.starts_with(b"\x89PNG") {
        " (a PNG image)"
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        " (a JPEG image)"
    } else if bytes.is_empty() {
        " (empty file)"
    } else if bytes.first() == Some(&0x80) {
        " (a pickle without the torch magic number)"
    } else {
        ""
    };
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "found {} bytes starting with [{}]{kind}",
        bytes.len(),
        head.join(" ")
    )
}

/// Where a model's tensors come from, scoped to a name prefix: the `vb` of `new(cfg, vb)`.
#[derive(Clone)]
pub struct Weights<'a> {
    store: Store<'a>,
    prefix: String,
}

#[derive(Clone)]
enum Store<'a> {
    File(Arc<StateDict>),
    Var(VarBuilder<'a>),
    Synthetic(u64, Device, Option<SyntheticRecord>),
}

/// The synthetic tensors a model drew, by full name (so a synthetic model can be saved).
#[derive(Clone, Default)]
pub struct SyntheticRecord(Arc<std::sync::Mutex<HashMap<String, Tensor>>>);

impl SyntheticRecord {
    /// Every tensor drawn so far, by full name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.0.lock().expect("record lock").clone()
    }
}

impl<'a> Weights<'a> {
    pub fn from_state_dict(sd: StateDict) -> Self {
        Self {
            store: Store::File(Arc::new(sd)),
            prefix: String::new(),
        }
    }

    /// Any candle `VarBuilder` (its own prefix applies first).
    pub fn from_var_builder(vb: VarBuilder<'a>) -> Self {
        Self {
            store: Store::Var(vb),
            prefix: String::new(),
        }
    }

    /// Deterministic synthetic weights for timing and smoke tests: He-uniform conv / linear
    /// weights from a hash of (`seed`, name), identity batch norms, zero biases, on `device`.
    pub fn synthetic(seed: u64, device: &Device) -> Self {
        Self {
            store: Store::Synthetic(seed, device.clone(), None),
            prefix: String::new(),
        }
    }

    /// [`Weights::synthetic`], also recording every tensor handed out.
    pub fn synthetic_recorded(seed: u64, device: &Device) -> (Self, SyntheticRecord) {
        let record = SyntheticRecord::default();
        let w = Self {
            store: Store::Synthetic(seed, device.clone(), Some(record.clone())),
            prefix: String::new(),
        };
        (w, record)
    }

    /// The view one module deeper (`vb.pp("res2")`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            store: self.store.clone(),
            prefix,
        }
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The f32 tensor `name` (relative to this view), which must have `shape`.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = self.full_name(name);
        match &self.store {
            Store::File(sd) => sd.tensor(&full, shape),
            Store::Var(vb) => {
                let t = vb
                    .get(shape, &full)
                    .map_err(|e| BackboneError::VarBuilder {
                        key: format!(
                            "{}{}{full}",
                            vb.prefix(),
                            if vb.prefix().is_empty() { "" } else { "." }
                        ),
                        expected: shape.to_vec(),
                        detail: e.to_string(),
                    })?;
                Ok(t.to_dtype(DType::F32)?)
            }
            Store::Synthetic(seed, device, record) => {
                let t = synthetic_tensor(*seed, &full, shape, device)?;
                if let Some(r) = record {
                    r.0.lock().expect("record lock").insert(full, t.clone());
                }
                Ok(t)
            }
        }
    }
}

fn synthetic_tensor(seed: u64, name: &str, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let fill = |v: f32| Tensor::full(v, shape, device);
    if name.ends_with("running_var") || (shape.len() == 1 && name.ends_with("weight")) {
        return fill(1f32);
    }
    if shape.len() == 1 {
        return fill(0f32);
    }
    let fan_in = (n / shape[0]).max(1);
    let bound = (6.0 / fan_in as f64).sqrt();
    // FNV-1a of the name, mixed with the seed; SplitMix64 per element.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }) ^ seed;
    let values: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut z = h.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, device)
}
