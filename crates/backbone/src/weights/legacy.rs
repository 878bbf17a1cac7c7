//! Reader for the legacy `torch.save` format (PyTorch < 1.6, `_use_new_zipfile_serialization=False`),
//! which `candle_core::pickle` does not open (it expects the zip format).
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
//! Pickles 2 to 5 are decoded with candle's `pickle::Stack`; the magic number is matched as raw
//! bytes because candle's LONG1 decoder only handles up to 8 bytes.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

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

/// One tensor as the pickle describes it, before its storage is read.
struct TensorRef {
    storage_key: String,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// Storage element type: the candle dtype (None when candle has no such dtype) and byte size.
fn storage_type(class_name: &str) -> Option<(Option<DType>, usize)> {
    Some(match class_name {
        "FloatStorage" => (Some(DType::F32), 4),
        "DoubleStorage" => (Some(DType::F64), 8),
        "HalfStorage" => (Some(DType::F16), 2),
        "BFloat16Storage" => (Some(DType::BF16), 2),
        "LongStorage" => (Some(DType::I64), 8),
        "IntStorage" => (Some(DType::I32), 4),
        "ShortStorage" => (Some(DType::I16), 2),
        "ByteStorage" | "BoolStorage" => (Some(DType::U8), 1),
        "CharStorage" => (None, 1),
        _ => return None,
    })
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
    let corrupt = |detail: String| BackboneError::Corrupt {
        file: path.to_path_buf(),
        detail,
    };
    if !is_legacy(bytes) {
        return Err(BackboneError::NotAWeightFile {
            file: path.to_path_buf(),
            found: "no legacy torch magic number".into(),
        });
    }
    let mut cur = Cursor::new(bytes);
    cur.set_position(15);

    let version = unpickle(&mut cur, "protocol version").map_err(&corrupt)?;
    match version.int_or_long() {
        Ok(PROTOCOL_VERSION) => {}
        Ok(v) => {
            return Err(corrupt(format!(
                "unsupported legacy protocol version {v} (expected {PROTOCOL_VERSION})"
            )))
        }
        Err(o) => {
            return Err(corrupt(format!(
                "protocol version is not an integer: {o:?}"
            )))
        }
    }
    let sys_info = unpickle(&mut cur, "sys info").map_err(&corrupt)?;
    if let Object::Dict(entries) = &sys_info {
        let big_endian = entries.iter().any(|(k, v)| {
            *k == Object::Unicode("little_endian".into()) && *v == Object::Bool(false)
        });
        if big_endian {
            return Err(corrupt("big-endian legacy files are not supported".into()));
        }
    }
    let root = unpickle(&mut cur, "saved object").map_err(&corrupt)?;
    let keys = unpickle(&mut cur, "storage key list").map_err(&corrupt)?;
    let Object::List(keys) = keys else {
        return Err(corrupt(format!("storage key list is not a list: {keys:?}")));
    };

    // Every storage referenced anywhere (optimizer state included) fixes the element size needed
    // to step over its data, even when no tensor of the selected dict uses it.
    let mut storage_types = HashMap::new();
    collect_storages(&root, &mut storage_types);

    let mut storages: HashMap<String, (String, &[u8], usize)> = HashMap::new();
    let mut pos = cur.position() as usize;
    for key in keys {
        let Object::Unicode(key) = key else {
            return Err(corrupt(format!("storage key is not a string: {key:?}")));
        };
        let class = storage_types.get(&key).ok_or_else(|| {
            corrupt(format!(
                "storage `{key}` is listed but no tensor refers to it"
            ))
        })?;
        let (_, elem) = storage_type(class)
            .ok_or_else(|| corrupt(format!("unknown storage type `{class}`")))?;
        let count_bytes = bytes.get(pos..pos + 8).ok_or_else(|| {
            corrupt(format!(
                "file ends in the header of storage `{key}` (byte {pos})"
            ))
        })?;
        let numel = i64::from_le_bytes(count_bytes.try_into().expect("8-byte slice"));
        let numel = usize::try_from(numel)
            .map_err(|_| corrupt(format!("storage `{key}` has a negative size {numel}")))?;
        let nbytes = numel
            .checked_mul(elem)
            .ok_or_else(|| corrupt(format!("storage `{key}` size {numel} overflows")))?;
        let start = pos + 8;
        let data = bytes.get(start..start.saturating_add(nbytes)).ok_or_else(|| {
            corrupt(format!(
                "file ends inside storage `{key}`: needs {nbytes} bytes from byte {start}, file has {}",
                bytes.len()
            ))
        })?;
        storages.insert(key, (class.clone(), data, numel));
        pos = start + nbytes;
    }

    let dict = select_dict(root, dict_key).map_err(&corrupt)?;
    let mut out = Vec::new();
    for (name, value) in dict {
        let Object::Unicode(name) = name else {
            continue;
        };
        let Some(tref) = tensor_ref(value) else {
            continue;
        };
        let tref = tref.map_err(|d| corrupt(format!("tensor `{name}`: {d}")))?;
        let (class, data, numel) = storages.get(&tref.storage_key).ok_or_else(|| {
            corrupt(format!(
                "tensor `{name}`: storage `{}` has no data",
                tref.storage_key
            ))
        })?;
        let bad = |detail: String| BackboneError::BadTensor {
            file: path.to_path_buf(),
            key: name.clone(),
            detail,
        };
        let (dtype, elem) =
            storage_type(class).ok_or_else(|| bad(format!("unknown storage type `{class}`")))?;
        let dtype =
            dtype.ok_or_else(|| bad(format!("storage type `{class}` has no candle dtype")))?;
        let raw = gather(data, *numel, elem, &tref).ok_or_else(|| {
            bad(format!(
                "view {:?}/{:?} at offset {} exceeds its storage of {numel} elements",
                tref.size, tref.stride, tref.offset
            ))
        })?;
        let t = Tensor::from_raw_buffer(&raw, dtype, &tref.size, device)?;
        out.push((name, t));
    }
    Ok(out)
}

fn unpickle(cur: &mut Cursor<&[u8]>, what: &str) -> std::result::Result<Object, String> {
    let start = cur.position();
    let mut stack = Stack::empty();
    stack
        .read_loop(cur)
        .and_then(|_| stack.finalize())
        .map_err(|e| format!("cannot decode the {what} pickle at byte {start}: {e}"))
}

fn collect_storages(obj: &Object, out: &mut HashMap<String, String>) {
    match obj {
        Object::PersistentLoad(id) => {
            if let Object::Tuple(parts) = id.as_ref() {
                if let (
                    Some(Object::Unicode(tag)),
                    Some(Object::Class { class_name, .. }),
                    Some(Object::Unicode(key)),
                ) = (parts.first(), parts.get(1), parts.get(2))
                {
                    if tag == "storage" {
                        out.insert(key.clone(), class_name.clone());
                    }
                }
            }
        }
        Object::Tuple(v) | Object::List(v) => v.iter().for_each(|o| collect_storages(o, out)),
        Object::Dict(kv) => kv.iter().for_each(|(k, v)| {
            collect_storages(k, out);
            collect_storages(v, out)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            collect_storages(callable, out);
            collect_storages(args, out)
        }
        _ => {}
    }
}

fn has_tensor(entries: &[(Object, Object)]) -> bool {
    entries.iter().any(|(_, v)| is_rebuild_call(v))
}

fn is_rebuild_call(o: &Object) -> bool {
    matches!(o, Object::Reduce { callable, .. }
        if matches!(callable.as_ref(), Object::Class { module_name, class_name }
            if module_name == "torch._utils" && class_name.starts_with("_rebuild_")))
}

fn select_dict(
    root: Object,
    dict_key: Option<&str>,
) -> std::result::Result<Vec<(Object, Object)>, String> {
    let Object::Dict(entries) = root else {
        return Err("the saved object is not a dict".into());
    };
    let pick = |entries: Vec<(Object, Object)>, key: &str| {
        entries
            .into_iter()
            .find(|(k, _)| *k == Object::Unicode(key.into()))
            .map(|(_, v)| v)
    };
    match dict_key {
        Some(key) => match pick(entries, key) {
            Some(Object::Dict(d)) => Ok(d),
            Some(_) => Err(format!("entry `{key}` is not a dict")),
            None => Err(format!("no entry `{key}` in the saved dict")),
        },
        None if has_tensor(&entries) => Ok(entries),
        None => {
            for key in ["model", "state_dict"] {
                if let Some(Object::Dict(d)) = pick(entries.clone(), key) {
                    return Ok(d);
                }
            }
            Ok(entries)
        }
    }
}

/// Parses `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, also wrapped in
/// `_rebuild_parameter(tensor, requires_grad, hooks)`. None when `o` is not a tensor.
fn tensor_ref(o: Object) -> Option<std::result::Result<TensorRef, String>> {
    let Object::Reduce { callable, args } = o else {
        return None;
    };
    let Object::Class {
        module_name,
        class_name,
    } = *callable
    else {
        return None;
    };
    if module_name != "torch._utils" {
        return None;
    }
    match class_name.as_str() {
        "_rebuild_parameter" => match *args {
            Object::Tuple(mut a) if !a.is_empty() => tensor_ref(a.swap_remove(0)),
            other => Some(Err(format!("bad _rebuild_parameter arguments {other:?}"))),
        },
        "_rebuild_tensor_v2" => Some(rebuild_tensor_v2(*args)),
        other => Some(Err(format!(
            "unsupported tensor constructor torch._utils.{other}"
        ))),
    }
}

fn rebuild_tensor_v2(args: Object) -> std::result::Result<TensorRef, String> {
    let Object::Tuple(a) = args else {
        return Err(format!("bad _rebuild_tensor_v2 arguments {args:?}"));
    };
    if a.len() < 4 {
        return Err(format!(
            "_rebuild_tensor_v2 has {} arguments, expected at least 4",
            a.len()
        ));
    }
    let storage_key = match &a[0] {
        Object::PersistentLoad(id) => match id.as_ref() {
            Object::Tuple(p) if p.len() >= 3 => match &p[2] {
                Object::Unicode(k) => k.clone(),
                o => return Err(format!("storage key is not a string: {o:?}")),
            },
            o => return Err(format!("bad storage id {o:?}")),
        },
        o => return Err(format!("tensor storage is not a persistent id: {o:?}")),
    };
    let int = |o: &Object| match o {
        Object::Int(i) if *i >= 0 => Ok(*i as usize),
        Object::Long(i) if *i >= 0 => Ok(*i as usize),
        o => Err(format!("expected a non-negative integer, got {o:?}")),
    };
    let ints = |o: &Object| match o {
        Object::Tuple(v) => v
            .iter()
            .map(int)
            .collect::<std::result::Result<Vec<_>, _>>(),
        o => Err(format!("expected a tuple of integers, got {o:?}")),
    };
    let offset = int(&a[1])?;
    let size = ints(&a[2])?;
    let stride = ints(&a[3])?;
    if size.len() != stride.len() {
        return Err(format!(
            "size {size:?} and stride {stride:?} differ in rank"
        ));
    }
    Ok(TensorRef {
        storage_key,
        offset,
        size,
        stride,
    })
}

/// Copies the elements of a strided view out of its storage into row-major bytes. None when the
/// view reaches outside the storage.
fn gather(data: &[u8], numel: usize, elem: usize, t: &TensorRef) -> Option<Vec<u8>> {
    let n: usize = t.size.iter().product();
    if n == 0 {
        return Some(Vec::new());
    }
    let last = t
        .size
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&s, &st)| {
            acc.checked_add((s - 1).checked_mul(st)?)
        })?;
    if last >= numel {
        return None;
    }
    let mut contiguous = true;
    let mut expect = 1;
    for (&s, &st) in t.size.iter().zip(&t.stride).rev() {
        if s != 1 && st != expect {
            contiguous = false;
        }
        expect *= s;
    }
    if contiguous {
        return Some(data[t.offset * elem..(t.offset + n) * elem].to_vec());
    }
    let mut out = Vec::with_capacity(n * elem);
    let mut idx = vec![0usize; t.size.len()];
    for _ in 0..n {
        let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&data[at * elem..(at + 1) * elem]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Some(out)
}
