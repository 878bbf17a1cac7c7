//! Reader for the legacy `torch.save` format (PyTorch < 1.6, `_use_new_zipfile_serialization=False`).
//!
//! Layout, in file order:
//! 1. pickle: the magic number 0x1950a86a20f9469cfc6c (a 10-byte LONG1),
//! 2. pickle: the protocol version (1001),
//! 3. pickle: sys info (`little_endian`, type sizes),
//! 4. pickle: the saved object; each tensor is `torch._utils._rebuild_tensor_v2(storage, offset,
//!    size, stride, ...)` whose storage is a persistent id
//!    `('storage', torch.FloatStorage, key, location, numel, view_metadata)`,
//! 5. pickle: the list of storage keys,
//! 6. for each key in that list's order: an i64 little-endian element count, then the raw
//!    little-endian elements.
//!
//! Pickles 2 to 5 are decoded by our own [`super::pickle`] reader (nothing is executed); the
//! magic number is matched as raw bytes. Each storage's element count must agree with its
//! persistent id and its bytes must be in the file before any tensor is read.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use candle_core::{Device, Tensor};

use super::pickle::{self, describe, short, Node, Value};
use super::torch::{self, Problem, StorageRef, StorageSource};
use crate::error::{BackboneError, Result};

/// The magic number as the bytes of its LONG1 encoding (little-endian, 10 bytes).
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const PROTOCOL_VERSION: i64 = 1001;

/// True when `bytes` starts with the legacy magic-number pickle (any pickle protocol >= 2).
pub(crate) fn is_legacy(bytes: &[u8]) -> bool {
    bytes.len() >= 15
        && bytes[0] == 0x80
        && bytes[2] == 0x8a
        && bytes[3] == 10
        && bytes[4..14] == MAGIC
        && bytes[14] == b'.'
}

/// Reads every tensor of a legacy file. `dict_key` selects a sub-dictionary (e.g. `"model"` of a
/// detectron2 checkpoint); without it the top-level dict is used, or its `model` / `state_dict`
/// entry when the top level holds no tensors.
pub(crate) fn read_legacy(
    path: &Path,
    bytes: &[u8],
    dict_key: Option<&str>,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    if !is_legacy(bytes) {
        return Err(BackboneError::NotAWeightFile {
            file: path.to_path_buf(),
            found: "no legacy torch magic number".into(),
        });
    }
    read(bytes, dict_key, device).map_err(|p| super::problem_error(path, p))
}

fn read(
    bytes: &[u8],
    dict_key: Option<&str>,
    device: &Device,
) -> std::result::Result<Vec<(String, Tensor)>, Problem> {
    let corrupt = |d: String| Problem::Corrupt(d);
    let mut pos = 15usize;

    let version = unpickle(bytes, &mut pos, "protocol version")?;
    match version.root {
        Value::Int(PROTOCOL_VERSION) => {}
        ref v => {
            return Err(corrupt(format!(
                "unsupported legacy protocol version {} (expected {PROTOCOL_VERSION})",
                describe(v, &version.nodes)
            )))
        }
    }
    let sys_info = unpickle(bytes, &mut pos, "sys info")?;
    if let Value::Node(i) = sys_info.root {
        if let Some(Node::Dict(entries)) = sys_info.nodes.get(i) {
            let big_endian = entries.iter().any(|(k, v)| {
                matches!(k, Value::Str(k) if &**k == "little_endian")
                    && matches!(v, Value::Bool(false))
            });
            if big_endian {
                return Err(corrupt("big-endian legacy files are not supported".into()));
            }
        }
    }
    let root = unpickle(bytes, &mut pos, "saved object")?;
    // Every storage referenced anywhere (optimizer state included) fixes the element size
    // needed to step over its data, even when no tensor of the selected dict uses it.
    let storage_refs = torch::check(&root)?;
    let keys = unpickle(bytes, &mut pos, "storage key list")?;
    let key_list = match keys.root {
        Value::Node(i) => match keys.nodes.get(i) {
            Some(Node::List(items)) => Some(items),
            _ => None,
        },
        _ => None,
    }
    .ok_or_else(|| {
        corrupt(format!(
            "the storage key list is {}, not a list",
            describe(&keys.root, &keys.nodes)
        ))
    })?;

    // Where each storage's data is, checked against the file before anything is read.
    let mut storages: HashMap<Rc<str>, &[u8]> = HashMap::new();
    for key in key_list {
        let Value::Str(key) = key else {
            return Err(corrupt(format!(
                "a storage key is {}, not a string",
                describe(key, &keys.nodes)
            )));
        };
        let s = storage_refs.get(key).ok_or_else(|| {
            corrupt(format!(
                "storage `{}` is listed but nothing refers to it",
                short(key)
            ))
        })?;
        let count = bytes.get(pos..pos + 8).ok_or_else(|| {
            corrupt(format!(
                "file ends in the header of storage `{}` (byte {pos})",
                short(key)
            ))
        })?;
        let numel = i64::from_le_bytes(count.try_into().expect("8-byte slice"));
        if usize::try_from(numel).ok() != Some(s.numel) {
            return Err(corrupt(format!(
                "storage `{}` holds {numel} elements, but its tensors say {}",
                short(key),
                s.numel
            )));
        }
        let nbytes = s.numel.checked_mul(s.stype.elem).ok_or_else(|| {
            corrupt(format!(
                "storage `{}` of {} elements overflows",
                short(key),
                s.numel
            ))
        })?;
        let start = pos + 8;
        let data = start
            .checked_add(nbytes)
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| {
                corrupt(format!(
                    "file ends inside storage `{}`: needs {nbytes} bytes from byte {start}, file has {}",
                    short(key),
                    bytes.len()
                ))
            })?;
        if storages.insert(key.clone(), data).is_some() {
            return Err(corrupt(format!("storage `{}` is listed twice", short(key))));
        }
        pos = start + nbytes;
    }

    let entries = torch::select(&root, dict_key)?;
    let mut source = Storages(storages);
    torch::tensors(&root, entries, &mut source, device)
}

struct Storages<'a>(HashMap<Rc<str>, &'a [u8]>);

impl StorageSource for Storages<'_> {
    fn check(&self, s: &StorageRef) -> std::result::Result<(), Problem> {
        if self.0.contains_key(&s.key) {
            Ok(())
        } else {
            Err(Problem::Corrupt(format!(
                "storage `{}` is used but not in the file's storage list",
                short(&s.key)
            )))
        }
    }

    fn bytes(&mut self, s: &StorageRef) -> std::result::Result<Cow<'_, [u8]>, Problem> {
        self.0
            .get(&s.key)
            .map(|d| Cow::Borrowed(*d))
            .ok_or_else(|| {
                Problem::Corrupt(format!(
                    "storage `{}` is used but not in the file's storage list",
                    short(&s.key)
                ))
            })
    }
}

/// The next pickle of the file, from `pos`, which moves past it.
fn unpickle(
    bytes: &[u8],
    pos: &mut usize,
    what: &str,
) -> std::result::Result<pickle::Pickle, Problem> {
    let start = *pos;
    let p = pickle::read(&bytes[start..])
        .map_err(|e| super::pickle_problem(e, &format!("the {what} pickle"), start))?;
    *pos = start + p.len;
    Ok(p)
}
