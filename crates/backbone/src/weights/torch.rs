//! What the zip and legacy `.pth` readers share: the checks on a decoded pickle (no refused
//! global anywhere, well-formed storage references), the choice of the state dict inside a
//! checkpoint, and the tensors, each checked against the bytes its storage really has before
//! anything is allocated.
//!
//! Allocation rule: the tensors returned never add up to more than twice the bytes of the
//! storages they use (plus 64 KiB): views may share a storage (a weight and its transpose, tied
//! weights), but a file cannot turn a small storage into a large allocation by viewing it many
//! times or with zero strides.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use super::pickle::{describe, short, Kind, Node, NodeId, Pickle, StorageType, Value};

/// Deepest nesting of containers accepted (a state dict needs fewer than 10 levels).
pub(crate) const MAX_DEPTH: usize = 100;
/// Largest tensor rank accepted.
const MAX_RANK: usize = 64;
/// Slack of the allocation budget, for scalars sharing tiny storages.
const BUDGET_SLACK: usize = 64 << 10;

/// What is wrong, before the caller adds the file name.
#[derive(Debug)]
pub(crate) enum Problem {
    /// A global outside the whitelist, held at `key`.
    Forbidden { key: String, global: String },
    /// The file is malformed.
    Corrupt(String),
    /// The tensor `key` cannot be read.
    Tensor { key: String, detail: String },
}

/// A reference to a storage, as a persistent id describes it.
#[derive(Clone, Debug)]
pub(crate) struct StorageRef {
    pub key: Rc<str>,
    pub stype: StorageType,
    /// Elements of the whole (root) storage, as the pickle claims.
    pub numel: usize,
    /// Legacy storage views: (offset, elements) within the root storage.
    pub view: Option<(usize, usize)>,
}

/// One tensor as the pickle describes it.
#[derive(Clone, Debug)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

/// A path of dict keys and list indices, for naming where something is.
#[derive(Default)]
struct KeyPath(Vec<String>);

impl KeyPath {
    fn render(&self) -> String {
        if self.0.is_empty() {
            return "the saved object".into();
        }
        let mut s = String::new();
        for seg in &self.0 {
            if !s.is_empty() && !seg.starts_with('[') {
                s.push('.');
            }
            s.push_str(seg);
        }
        s
    }
}

fn key_segment(k: &Value) -> String {
    match k {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => format!("[{i}]"),
        _ => "[?]".into(),
    }
}

/// Walks everything reachable from the root once (shared nodes are visited once, depth is
/// bounded): refuses the first non-whitelisted global, naming the key that holds it, and returns
/// every storage referenced, by key.
pub(crate) fn check(p: &Pickle) -> Result<HashMap<Rc<str>, StorageRef>, Problem> {
    let mut w = Walk {
        p,
        seen: vec![false; p.nodes.len()],
        path: KeyPath::default(),
        storages: HashMap::new(),
    };
    w.value(&p.root, 0)?;
    if let Some((global, at)) = &p.first_forbidden {
        // Named, then dropped by the pickle (e.g. POP): still refused.
        return Err(Problem::Forbidden {
            key: format!("an object the pickle dropped (byte {at})"),
            global: global.clone(),
        });
    }
    Ok(w.storages)
}

struct Walk<'p> {
    p: &'p Pickle,
    seen: Vec<bool>,
    path: KeyPath,
    storages: HashMap<Rc<str>, StorageRef>,
}

impl Walk<'_> {
    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Problem> {
        let Value::Node(id) = v else { return Ok(()) };
        self.node(*id, depth)
    }

    fn node(&mut self, id: NodeId, depth: usize) -> Result<(), Problem> {
        if depth > MAX_DEPTH {
            return Err(Problem::Corrupt(format!(
                "`{}`: objects nested more than {MAX_DEPTH} levels deep",
                self.path.render()
            )));
        }
        let Some(seen) = self.seen.get_mut(id) else {
            return Err(Problem::Corrupt("a dangling reference".into()));
        };
        if std::mem::replace(seen, true) {
            return Ok(());
        }
        let p = self.p;
        match &p.nodes[id] {
            Node::Tuple(items) => {
                for it in items {
                    self.value(it, depth + 1)?;
                }
            }
            Node::List(items) => {
                for (i, it) in items.iter().enumerate() {
                    self.path.0.push(format!("[{i}]"));
                    self.value(it, depth + 1)?;
                    self.path.0.pop();
                }
            }
            Node::Dict(entries) => {
                for (k, v) in entries {
                    self.value(k, depth + 1)?;
                    self.path.0.push(key_segment(k));
                    self.value(v, depth + 1)?;
                    self.path.0.pop();
                }
            }
            Node::Call { args, .. } => self.value(args, depth + 1)?,
            Node::PersId(pid) => {
                self.value(pid, depth + 1)?;
                let s = storage_ref(p, pid).map_err(|detail| Problem::Tensor {
                    key: self.path.render(),
                    detail,
                })?;
                match self.storages.get(&s.key) {
                    Some(prev) if prev.stype != s.stype || prev.numel != s.numel => {
                        return Err(Problem::Corrupt(format!(
                            "`{}`: storage `{}` is described twice, as {} x {} and as {} x {}",
                            self.path.render(),
                            short(&s.key),
                            prev.numel,
                            prev.stype.name,
                            s.numel,
                            s.stype.name
                        )))
                    }
                    Some(_) => {}
                    None => {
                        self.storages.insert(s.key.clone(), s);
                    }
                }
            }
            Node::Forbidden { global, .. } => {
                return Err(Problem::Forbidden {
                    key: self.path.render(),
                    global: global.clone(),
                })
            }
            Node::Global(_) | Node::Opaque(_) => {}
        }
        Ok(())
    }
}

fn node<'p>(p: &'p Pickle, v: &Value) -> Option<&'p Node> {
    match v {
        Value::Node(i) => p.nodes.get(*i),
        _ => None,
    }
}

fn non_negative(v: &Value, what: &str, p: &Pickle) -> Result<usize, String> {
    match v {
        Value::Int(i) if *i >= 0 => {
            usize::try_from(*i).map_err(|_| format!("{what} {i} is too large"))
        }
        other => Err(format!(
            "{what} is {}, not a non-negative integer",
            describe(other, &p.nodes)
        )),
    }
}

/// `('storage', torch.<Type>Storage, key, location, numel[, view_metadata])`.
fn storage_ref(p: &Pickle, pid: &Value) -> Result<StorageRef, String> {
    let Some(Node::Tuple(parts)) = node(p, pid) else {
        return Err(format!(
            "a persistent id is {}, not a storage tuple",
            describe(pid, &p.nodes)
        ));
    };
    if !(5..=6).contains(&parts.len()) {
        return Err(format!(
            "a storage id has {} fields, expected 5 or 6",
            parts.len()
        ));
    }
    match &parts[0] {
        Value::Str(s) if &**s == "storage" => {}
        other => {
            return Err(format!(
                "a persistent id of kind {}, expected `storage`",
                describe(other, &p.nodes)
            ))
        }
    }
    let stype = match node(p, &parts[1]) {
        Some(Node::Global(g)) => match g.kind {
            Kind::Storage(t) => t,
            _ => {
                return Err(format!(
                    "storage type {} is not a storage class",
                    g.dotted()
                ))
            }
        },
        _ => {
            return Err(format!(
                "storage type is {}, not a storage class",
                describe(&parts[1], &p.nodes)
            ))
        }
    };
    let Value::Str(key) = &parts[2] else {
        return Err(format!(
            "storage key is {}, not a string",
            describe(&parts[2], &p.nodes)
        ));
    };
    let numel = non_negative(&parts[4], "storage size", p)?;
    let view = match parts.get(5) {
        None | Some(Value::None) => None,
        Some(v) => match node(p, v) {
            Some(Node::Tuple(vm)) if vm.len() == 3 => {
                let off = non_negative(&vm[1], "storage view offset", p)?;
                let len = non_negative(&vm[2], "storage view size", p)?;
                if off.checked_add(len).is_none_or(|end| end > numel) {
                    return Err(format!(
                        "storage view of {len} elements at {off} exceeds its storage of {numel}"
                    ));
                }
                Some((off, len))
            }
            _ => {
                return Err(format!(
                    "storage view metadata is {}",
                    describe(v, &p.nodes)
                ))
            }
        },
    };
    Ok(StorageRef {
        key: key.clone(),
        stype,
        numel,
        view,
    })
}

/// String-keyed entries of a dict node, the last of a repeated key winning (as in Python).
fn dict_entries(p: &Pickle, v: &Value) -> Option<Vec<(Rc<str>, Value)>> {
    let Some(Node::Dict(entries)) = node(p, v) else {
        return None;
    };
    let mut index: HashMap<Rc<str>, usize> = HashMap::new();
    let mut out: Vec<(Rc<str>, Value)> = Vec::new();
    for (k, v) in entries {
        if let Value::Str(k) = k {
            match index.get(k) {
                Some(&i) => out[i].1 = v.clone(),
                None => {
                    index.insert(k.clone(), out.len());
                    out.push((k.clone(), v.clone()));
                }
            }
        }
    }
    Some(out)
}

/// The state dict of the saved object: `dict_key`'s entry when given; else the top level when
/// it holds tensors, else its `model` or `state_dict` entry (checkpoints of detectron2 and
/// others), else the (tensor-less) top level.
pub(crate) fn select(p: &Pickle, dict_key: Option<&str>) -> Result<Vec<(Rc<str>, Value)>, Problem> {
    let Some(top) = dict_entries(p, &p.root) else {
        return Err(Problem::Corrupt(format!(
            "the saved object is {}, not a dict of tensors",
            describe(&p.root, &p.nodes)
        )));
    };
    let entry = |key: &str| top.iter().find(|(k, _)| &**k == key).map(|(_, v)| v);
    match dict_key {
        Some(key) => {
            let v = entry(key).ok_or_else(|| {
                Problem::Corrupt(format!("no entry `{}` in the saved dict", short(key)))
            })?;
            dict_entries(p, v).ok_or_else(|| {
                Problem::Corrupt(format!(
                    "entry `{}` is {}, not a dict",
                    short(key),
                    describe(v, &p.nodes)
                ))
            })
        }
        None => {
            if top.iter().any(|(_, v)| is_tensor(p, v)) {
                return Ok(top);
            }
            for key in ["model", "state_dict"] {
                if let Some(d) = entry(key).and_then(|v| dict_entries(p, v)) {
                    return Ok(d);
                }
            }
            Ok(top)
        }
    }
}

fn is_tensor(p: &Pickle, v: &Value) -> bool {
    matches!(node(p, v), Some(Node::Call { .. }))
}

/// The tensor a value describes: None when it is no tensor constructor call.
pub(crate) fn tensor_ref(p: &Pickle, v: &Value) -> Option<Result<TensorRef, String>> {
    tensor_ref_at(p, v, 0)
}

fn tensor_ref_at(p: &Pickle, v: &Value, depth: usize) -> Option<Result<TensorRef, String>> {
    let Some(Node::Call { func, args }) = node(p, v) else {
        return None;
    };
    let Some(Node::Tuple(a)) = node(p, args) else {
        return Some(Err(format!("{} without an argument tuple", func.dotted())));
    };
    Some(match func.kind {
        Kind::RebuildParameter => {
            // `_rebuild_parameter(data, requires_grad, backward_hooks[, state])`
            if depth > 4 || a.is_empty() {
                return Some(Err(format!("malformed {} arguments", func.dotted())));
            }
            match tensor_ref_at(p, &a[0], depth + 1) {
                Some(r) => r,
                None => Err(format!(
                    "{} wraps {}, not a tensor",
                    func.dotted(),
                    describe(&a[0], &p.nodes)
                )),
            }
        }
        _ => rebuild_tensor(p, &func.dotted(), a),
    })
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[,
/// metadata])` (and v1, the first four).
fn rebuild_tensor(p: &Pickle, func: &str, a: &[Value]) -> Result<TensorRef, String> {
    if !(4..=7).contains(&a.len()) {
        return Err(format!("{func} has {} arguments, expected 4 to 7", a.len()));
    }
    let storage = match node(p, &a[0]) {
        Some(Node::PersId(pid)) => storage_ref(p, pid)?,
        _ => {
            return Err(format!(
                "{func}: the storage is {}, not a storage reference",
                describe(&a[0], &p.nodes)
            ))
        }
    };
    let offset = non_negative(&a[1], "storage offset", p)?;
    let ints = |v: &Value, what: &str| -> Result<Vec<usize>, String> {
        let Some(Node::Tuple(items)) = node(p, v) else {
            return Err(format!("{what} is {}, not a tuple", describe(v, &p.nodes)));
        };
        if items.len() > MAX_RANK {
            return Err(format!(
                "{what} has {} dimensions (at most {MAX_RANK})",
                items.len()
            ));
        }
        items.iter().map(|x| non_negative(x, what, p)).collect()
    };
    let size = ints(&a[2], "size")?;
    let stride = ints(&a[3], "stride")?;
    if size.len() != stride.len() {
        return Err(format!(
            "size {size:?} and stride {stride:?} differ in rank"
        ));
    }
    Ok(TensorRef {
        storage,
        offset,
        size,
        stride,
    })
}

/// The candle dtype of a storage type (None when candle has none).
pub(crate) fn dtype_of(t: StorageType) -> Option<DType> {
    Some(match t.name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "ByteStorage" | "BoolStorage" => DType::U8,
        _ => return None,
    })
}

/// What reading one view will take, checked against its storage: the number of elements, the
/// bytes, and whether it is one contiguous run. Nothing is allocated.
struct Plan {
    bytes: usize,
    contiguous: bool,
    /// Element offset of the view's storage within the root storage.
    base: usize,
}

fn plan(t: &TensorRef) -> Result<Plan, String> {
    let elem = t.storage.stype.elem;
    let (base, numel) = t.storage.view.unwrap_or((0, t.storage.numel));
    let n = t
        .size
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .ok_or_else(|| format!("size {:?} has more elements than fit in 64 bits", t.size))?;
    let bytes = n.checked_mul(elem).ok_or_else(|| {
        format!(
            "size {:?} of {elem}-byte elements is more bytes than fit in 64 bits",
            t.size
        )
    })?;
    if n == 0 {
        if t.offset > numel {
            return Err(format!(
                "empty view at offset {} is past its storage of {numel} elements",
                t.offset
            ));
        }
        return Ok(Plan {
            bytes: 0,
            contiguous: true,
            base,
        });
    }
    // The last element the view touches (strides are non-negative, so it is the furthest).
    let last = t
        .size
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&s, &st)| {
            acc.checked_add((s - 1).checked_mul(st)?)
        });
    match last {
        Some(last) if last < numel => {}
        _ => {
            return Err(format!(
                "view of size {:?} with strides {:?} at offset {} reaches past its storage of {numel} elements",
                t.size, t.stride, t.offset
            ))
        }
    }
    // Row-major contiguity (dimensions of size 1 have any stride).
    let mut expect = 1usize;
    let mut contiguous = true;
    for (&s, &st) in t.size.iter().zip(&t.stride).rev() {
        if s != 1 && st != expect {
            contiguous = false;
        }
        expect = expect.saturating_mul(s);
    }
    Ok(Plan {
        bytes,
        contiguous,
        base,
    })
}

/// Where the bytes of root storages come from: the zip member or the legacy file's data. Each
/// call returns the storage's `numel * elem` bytes exactly.
pub(crate) trait StorageSource {
    /// Whether the storage is there with the size its persistent id claims (nothing read).
    fn check(&self, s: &StorageRef) -> Result<(), Problem>;
    fn bytes(&mut self, s: &StorageRef) -> Result<Cow<'_, [u8]>, Problem>;
}

/// Every tensor of the selected dict: described, checked against its storage and the
/// allocation budget, and only then read.
pub(crate) fn tensors(
    p: &Pickle,
    entries: Vec<(Rc<str>, Value)>,
    source: &mut dyn StorageSource,
    device: &Device,
) -> Result<Vec<(String, Tensor)>, Problem> {
    let bad = |key: &str, detail: String| Problem::Tensor {
        key: key.to_string(),
        detail,
    };
    // 1. Describe and check every view (no data touched).
    let mut refs = Vec::new();
    let mut out_bytes = 0usize;
    let mut storage_bytes = 0usize;
    let mut used: HashSet<Rc<str>> = HashSet::new();
    for (key, v) in entries {
        let Some(t) = tensor_ref(p, &v) else { continue };
        let t = t.map_err(|d| bad(&key, d))?;
        let dtype = dtype_of(t.storage.stype).ok_or_else(|| {
            bad(
                &key,
                format!(
                    "storage type torch.{} has no candle dtype",
                    t.storage.stype.name
                ),
            )
        })?;
        let plan = plan(&t).map_err(|d| bad(&key, d))?;
        if used.insert(t.storage.key.clone()) {
            source.check(&t.storage).map_err(|p| match p {
                Problem::Corrupt(d) => bad(&key, d),
                other => other,
            })?;
            let b = t
                .storage
                .numel
                .checked_mul(t.storage.stype.elem)
                .ok_or_else(|| {
                    bad(
                        &key,
                        format!("storage of {} elements overflows", t.storage.numel),
                    )
                })?;
            storage_bytes = storage_bytes.saturating_add(b);
        }
        out_bytes = out_bytes.saturating_add(plan.bytes);
        let budget = storage_bytes.saturating_mul(2).saturating_add(BUDGET_SLACK);
        if out_bytes > budget {
            return Err(bad(
                &key,
                format!(
                    "view of size {:?} with strides {:?} brings the tensors to {out_bytes} bytes, more than twice their storages' {storage_bytes} bytes (+64 KiB): views that repeat their storage are refused",
                    t.size, t.stride
                ),
            ));
        }
        refs.push((key, t, plan, dtype));
    }
    // 2. Read them, storage by storage.
    let mut out = Vec::with_capacity(refs.len());
    for (key, t, plan, dtype) in refs {
        let data = source.bytes(&t.storage)?;
        let elem = t.storage.stype.elem;
        let raw: Cow<[u8]> = if plan.contiguous {
            let start = plan
                .base
                .checked_add(t.offset)
                .and_then(|o| o.checked_mul(elem));
            let slice = start
                .and_then(|s| data.get(s..s.checked_add(plan.bytes)?))
                .ok_or_else(|| bad(&key, "view outside its storage".into()))?;
            Cow::Borrowed(slice)
        } else {
            Cow::Owned(
                gather(&data, elem, plan.base, &t, plan.bytes)
                    .ok_or_else(|| bad(&key, "view outside its storage".into()))?,
            )
        };
        let tensor = Tensor::from_raw_buffer(&raw, dtype, &t.size, device)
            .map_err(|e| bad(&key, e.to_string()))?;
        out.push((key.to_string(), tensor));
    }
    Ok(out)
}

/// Copies a strided view (already checked to lie inside `data`) into row-major bytes. None
/// when an index falls outside after all (never expected).
fn gather(data: &[u8], elem: usize, base: usize, t: &TensorRef, bytes: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes);
    let rank = t.size.len();
    // Innermost dimension copied as one run when its stride is 1.
    let (run, outer) = match (t.size.last(), t.stride.last()) {
        (Some(&s), Some(&1)) => (s, rank - 1),
        _ => (1, rank),
    };
    let run_bytes = run.checked_mul(elem)?;
    let mut idx = vec![0usize; outer];
    loop {
        let mut at = base.checked_add(t.offset)?;
        for d in 0..outer {
            at = at.checked_add(idx[d].checked_mul(t.stride[d])?)?;
        }
        let start = at.checked_mul(elem)?;
        out.extend_from_slice(data.get(start..start.checked_add(run_bytes)?)?);
        // Next index of the outer dimensions, last fastest.
        let mut d = outer;
        loop {
            if d == 0 {
                return (out.len() == bytes).then_some(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}
