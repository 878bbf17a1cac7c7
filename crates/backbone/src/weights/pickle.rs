//! A pickle reader that runs nothing: our own, for the pickles inside `.pth` files.
//!
//! Python's unpickler imports every `GLOBAL` it meets and calls whatever `REDUCE`, `NEWOBJ`,
//! `OBJ`, `INST` and `BUILD` ask for, so a weight file can run any code. This one only *reads*:
//!
//! - A global is looked up in a fixed whitelist ([`Kind`]): the few callables a state dict needs
//!   (`collections.OrderedDict`, the `torch._utils._rebuild_*` tensor constructors, the storage
//!   types, `torch.Size`) and a few plain data types a checkpoint's other entries may hold, which
//!   are kept as opaque values. Any other global becomes a [`Node::Forbidden`] placeholder: it is
//!   never imported or called, and the caller refuses the file, naming the key that holds it.
//! - A call of a whitelisted constructor is recorded, not run ([`Node::Call`]); the tensor it
//!   describes is checked and read later, by [`super::torch`].
//! - Every length field is checked against the bytes left before anything is allocated, so the
//!   memory used is bounded by a constant times the pickle's size.
//! - Containers live in an arena and values refer to them by index, so a memo reference (`GET`)
//!   shares the object like Python does, instead of copying it: a nest of `GET`s costs one value,
//!   not an exponential tree. Nothing here recurses, so no nesting can overflow the stack; the
//!   walks over the result ([`super::torch`]) bound their depth and visit each node once.

use std::collections::HashMap;
use std::rc::Rc;

/// Index of a [`Node`] in [`Pickle::nodes`].
pub(crate) type NodeId = usize;

/// One value on the pickle stack. Containers and objects are [`Value::Node`]s in the arena.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside i64 (its bytes are not kept).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Node(NodeId),
}

/// A storage type of torch: its element size in bytes and the name of its dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StorageType {
    pub name: &'static str,
    pub elem: usize,
}

/// What a whitelisted global is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `collections.OrderedDict`: calling it makes a dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2` (or the older `_rebuild_tensor`).
    RebuildTensor,
    /// `torch._utils._rebuild_parameter` / `_rebuild_parameter_with_state`: wraps a tensor.
    RebuildParameter,
    /// `torch.FloatStorage` and the other typed storages: only ever named in persistent ids.
    Storage(StorageType),
    /// `torch.Size`: calling it with a tuple gives that tuple.
    Size,
    /// Plain data a checkpoint's other entries may hold (`collections.Counter`, `builtins.set`,
    /// `_codecs.encode`, numpy scalars, torch dtypes, ...): calling it gives an opaque value
    /// that is never used; no code runs.
    Data,
}

/// A global as the pickle names it, with what the whitelist says it is.
#[derive(Clone, Debug)]
pub(crate) struct Global {
    pub module: Rc<str>,
    pub name: Rc<str>,
    pub kind: Kind,
}

impl Global {
    pub fn dotted(&self) -> String {
        format!("{}.{}", self.module, self.name)
    }
}

/// The storage types torch pickles, by class name, with their element sizes. Only those with a
/// candle dtype can become tensors; the others are whitelisted so that a checkpoint holding them
/// elsewhere (e.g. in an optimizer) can still be stepped over.
const STORAGE_TYPES: &[StorageType] = &[
    StorageType {
        name: "FloatStorage",
        elem: 4,
    },
    StorageType {
        name: "DoubleStorage",
        elem: 8,
    },
    StorageType {
        name: "HalfStorage",
        elem: 2,
    },
    StorageType {
        name: "BFloat16Storage",
        elem: 2,
    },
    StorageType {
        name: "LongStorage",
        elem: 8,
    },
    StorageType {
        name: "IntStorage",
        elem: 4,
    },
    StorageType {
        name: "ShortStorage",
        elem: 2,
    },
    StorageType {
        name: "CharStorage",
        elem: 1,
    },
    StorageType {
        name: "ByteStorage",
        elem: 1,
    },
    StorageType {
        name: "BoolStorage",
        elem: 1,
    },
    StorageType {
        name: "ComplexFloatStorage",
        elem: 8,
    },
    StorageType {
        name: "ComplexDoubleStorage",
        elem: 16,
    },
    StorageType {
        name: "UntypedStorage",
        elem: 1,
    },
];

/// The whitelist: what each allowed `module.name` is. Everything else is refused.
pub(crate) fn classify(module: &str, name: &str) -> Option<Kind> {
    let module = match module {
        // Python 2 spellings of the same modules.
        "__builtin__" => "builtins",
        "copy_reg" => "copyreg",
        m => m,
    };
    Some(match (module, name) {
        ("collections", "OrderedDict") => Kind::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Kind::RebuildTensor,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Kind::RebuildParameter
        }
        ("torch", "Size") => Kind::Size,
        ("torch", n) => {
            if let Some(t) = STORAGE_TYPES.iter().find(|t| t.name == n) {
                Kind::Storage(*t)
            } else if is_torch_dtype(n) || n == "device" {
                Kind::Data
            } else {
                return None;
            }
        }
        ("collections", "Counter")
        | ("builtins", "set" | "frozenset" | "bytearray" | "complex" | "slice")
        | ("_codecs", "encode")
        | ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar" | "_reconstruct")
        | ("numpy", "dtype" | "ndarray") => Kind::Data,
        _ => return None,
    })
}

fn is_torch_dtype(n: &str) -> bool {
    matches!(
        n,
        "float32"
            | "float"
            | "float64"
            | "double"
            | "float16"
            | "half"
            | "bfloat16"
            | "int64"
            | "long"
            | "int32"
            | "int"
            | "int16"
            | "short"
            | "int8"
            | "uint8"
            | "bool"
            | "complex64"
            | "complex128"
    )
}

/// An object of the arena.
#[derive(Debug)]
pub(crate) enum Node {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Entries in file order; a repeated key is resolved by the reader (the last one wins, as in
    /// Python). `collections.OrderedDict` gives one too.
    Dict(Vec<(Value, Value)>),
    /// A whitelisted global as a value (e.g. the storage type in a persistent id).
    Global(Rc<Global>),
    /// A call of a whitelisted tensor constructor, kept unevaluated with its arguments.
    Call {
        func: Rc<Global>,
        args: Value,
    },
    /// A persistent id (`BINPERSID`): how torch refers to a storage.
    PersId(Value),
    /// The result of calling a [`Kind::Data`] global: kept, never used.
    Opaque(Rc<Global>),
    /// A global outside the whitelist, or anything made by calling one. Never imported, never
    /// called.
    Forbidden {
        global: String,
    },
}

/// A decoded pickle: the value `STOP` returned and the arena it refers to.
pub(crate) struct Pickle {
    pub root: Value,
    pub nodes: Vec<Node>,
    /// The first non-whitelisted global named anywhere (even if the result dropped it), and the
    /// byte where it was named.
    pub first_forbidden: Option<(String, usize)>,
    /// Bytes consumed, `STOP` included.
    pub len: usize,
}

/// Why a pickle could not be read, with the byte (relative to the pickle's start) where.
#[derive(Debug)]
pub(crate) struct PickleError {
    pub at: usize,
    pub reason: String,
    /// A non-whitelisted global seen before the error, which the caller reports first.
    pub forbidden: Option<(String, usize)>,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "byte {}: {}", self.at, self.reason)
    }
}

/// Longest text line (protocol 0 opcodes, GLOBAL names) accepted.
const MAX_LINE: usize = 4096;
/// The objects a pickle may build: 64 MiB plus 16 bytes per byte of pickle, and never more than
/// 256 MiB. Real state dicts build about 10 bytes per byte (a ResNet-50 state dict's 30 KB
/// pickle, about 300 KB); a pickle of one-byte opcodes that each make an object would build
/// about 70.
const COST_SLACK: usize = 64 << 20;
const COST_PER_BYTE: usize = 16;
const MAX_COST: usize = 256 << 20;

/// Reads one pickle from the start of `data` (which may go on after its `STOP`).
pub(crate) fn read(data: &[u8]) -> Result<Pickle, PickleError> {
    let mut u = Unpickler {
        data,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        nodes: Vec::new(),
        first_forbidden: None,
        cost: 0,
        limit: MAX_COST.min(COST_SLACK.saturating_add(COST_PER_BYTE.saturating_mul(data.len()))),
    };
    match u.run() {
        Ok(root) => Ok(Pickle {
            root,
            nodes: u.nodes,
            first_forbidden: u.first_forbidden,
            len: u.pos,
        }),
        Err(reason) => Err(PickleError {
            at: u.op_at,
            reason,
            forbidden: u.first_forbidden,
        }),
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Byte of the opcode being run (for errors).
    op_at: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    nodes: Vec<Node>,
    first_forbidden: Option<(String, usize)>,
    /// Bytes of objects built so far (nodes, stack slots, strings, memo entries), and the most
    /// allowed.
    cost: usize,
    limit: usize,
}

type R<T> = Result<T, String>;

impl<'a> Unpickler<'a> {
    fn left(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The next `n` bytes; an error (nothing allocated) when fewer are left.
    fn take(&mut self, n: u64, what: &str) -> R<&'a [u8]> {
        if n > self.left() as u64 {
            return Err(format!(
                "{what} of {n} bytes, but only {} bytes are left",
                self.left()
            ));
        }
        let n = n as usize;
        // What is read may be kept (strings, bytes): counted.
        self.charge(n)?;
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1, "an argument")?[0])
    }

    fn array<const N: usize>(&mut self) -> R<[u8; N]> {
        let s = self.take(N as u64, "an argument")?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i32(&mut self) -> R<i32> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A `\n`-terminated line (without the `\n`), at most [`MAX_LINE`] bytes.
    fn line(&mut self) -> R<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let limit = rest.len().min(MAX_LINE + 1);
        let Some(n) = rest[..limit].iter().position(|&b| b == b'\n') else {
            return Err(if rest.len() <= MAX_LINE {
                "a text argument runs past the end of the data".into()
            } else {
                format!("a text argument is longer than {MAX_LINE} bytes")
            });
        };
        self.pos += n + 1;
        self.charge(n)?;
        Ok(&rest[..n])
    }

    fn line_str(&mut self) -> R<&'a str> {
        let l = self.line()?;
        std::str::from_utf8(l).map_err(|_| "a text argument is not UTF-8".to_string())
    }

    /// Counts `n` bytes of objects built, refusing a pickle that builds more than its limit.
    fn charge(&mut self, n: usize) -> R<()> {
        self.cost = self.cost.saturating_add(n);
        if self.cost > self.limit {
            return Err(format!(
                "builds more than {} MiB of objects from {} bytes of pickle (a state dict builds about 10 bytes per byte)",
                self.limit >> 20,
                self.data.len()
            ));
        }
        Ok(())
    }

    fn push_node(&mut self, node: Node) -> R<Value> {
        self.charge(std::mem::size_of::<Node>())?;
        self.nodes.push(node);
        Ok(Value::Node(self.nodes.len() - 1))
    }

    fn push(&mut self, v: Value) -> R<()> {
        self.charge(std::mem::size_of::<Value>())?;
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> R<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("pops from an empty stack".into());
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }

    fn top(&self) -> R<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("reads an empty stack".into());
        }
        Ok(self.stack.last().expect("checked non-empty"))
    }

    /// The items above the last MARK, which is removed.
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| "needs a MARK, and there is none".to_string())?;
        // Pops never go below the last mark, so the stack still reaches it.
        if m > self.stack.len() {
            return Err("the stack is shorter than its last MARK".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn string(&self, bytes: &[u8]) -> R<Value> {
        let s =
            std::str::from_utf8(bytes).map_err(|_| "a string is not valid UTF-8".to_string())?;
        Ok(Value::Str(Rc::from(s)))
    }

    /// A Python 2 `str`: text when it is UTF-8 (torch loads with `encoding='utf-8'`), else bytes.
    fn py2_string(bytes: &[u8]) -> Value {
        match std::str::from_utf8(bytes) {
            Ok(s) => Value::Str(Rc::from(s)),
            Err(_) => Value::Bytes(Rc::from(bytes)),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> R<Value> {
        match classify(module, name) {
            Some(kind) => {
                self.charge(module.len() + name.len() + 96)?;
                self.push_node(Node::Global(Rc::new(Global {
                    module: Rc::from(module),
                    name: Rc::from(name),
                    kind,
                })))
            }
            None => self.forbidden(format!("{module}.{name}")),
        }
    }

    fn forbidden(&mut self, global: String) -> R<Value> {
        if self.first_forbidden.is_none() {
            self.first_forbidden = Some((global.clone(), self.op_at));
        }
        self.charge(global.len())?;
        self.push_node(Node::Forbidden { global })
    }

    fn node(&self, v: &Value) -> Option<&Node> {
        match v {
            Value::Node(i) => self.nodes.get(*i),
            _ => None,
        }
    }

    /// `callable(*args)` for REDUCE, NEWOBJ, OBJ and INST: never run; whitelisted constructors
    /// are recorded, data types give an opaque value, anything else stays forbidden.
    fn call(&mut self, callable: Value, args: Value) -> R<Value> {
        let g = match self.node(&callable) {
            Some(Node::Global(g)) => g.clone(),
            Some(Node::Forbidden { .. }) => return Ok(callable),
            _ => {
                return Err(format!(
                    "calls {}, which is not a class or function",
                    describe(&callable, &self.nodes)
                ))
            }
        };
        // Only the shape of the arguments is looked at here: nothing is copied, so a memo
        // reference to a big tuple costs nothing however often it is passed.
        let args_len = match self.node(&args) {
            Some(Node::Tuple(a)) => Some(a.len()),
            _ => None,
        };
        match g.kind {
            Kind::OrderedDict => match args_len {
                // torch (like Python's pickle) fills an OrderedDict with SETITEMS afterwards.
                Some(0) => Ok(self.push_node(Node::Dict(Vec::new()))?),
                _ => Err("calls collections.OrderedDict with arguments (torch never does)".into()),
            },
            Kind::Size => {
                let dims = match (args_len, self.node(&args)) {
                    (Some(1), Some(Node::Tuple(a))) => a[0].clone(),
                    _ => return Err("calls torch.Size without a single tuple argument".into()),
                };
                match self.node(&dims) {
                    // The tuple itself, shared.
                    Some(Node::Tuple(_)) => Ok(dims),
                    _ => Err("calls torch.Size with something other than a tuple".into()),
                }
            }
            Kind::RebuildTensor | Kind::RebuildParameter => {
                if args_len.is_none() {
                    return Err(format!("calls {} without an argument tuple", g.dotted()));
                }
                Ok(self.push_node(Node::Call { func: g, args })?)
            }
            Kind::Storage(_) => Err(format!(
                "calls the storage type {} (torch never does)",
                g.dotted()
            )),
            Kind::Data => Ok(self.push_node(Node::Opaque(g))?),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> R<()> {
        let target = self.top()?.clone();
        match &target {
            Value::Node(i) => match &mut self.nodes[*i] {
                Node::List(v) => {
                    v.extend(items);
                    Ok(())
                }
                // Adding to a forbidden object is as harmless as the object itself.
                Node::Forbidden { .. } => Ok(()),
                _ => Err(format!(
                    "appends to {}, which is not a list",
                    describe(&target, &self.nodes)
                )),
            },
            _ => Err(format!(
                "appends to {}, which is not a list",
                describe(&target, &self.nodes)
            )),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> R<()> {
        if items.len() % 2 != 0 {
            return Err("sets dict items from an odd number of values".into());
        }
        let target = self.top()?.clone();
        let Value::Node(i) = target else {
            return Err(format!(
                "sets items of {}, which is not a dict",
                describe(&target, &self.nodes)
            ));
        };
        match &mut self.nodes[i] {
            Node::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            Node::Opaque(_) | Node::Forbidden { .. } => Ok(()),
            _ => Err(format!(
                "sets items of {}, which is not a dict",
                describe(&target, &self.nodes)
            )),
        }
    }

    fn add_items(&mut self, _items: Vec<Value>) -> R<()> {
        let target = self.top()?.clone();
        match self.node(&target) {
            Some(Node::Opaque(_) | Node::Forbidden { .. }) => Ok(()),
            _ => Err(format!(
                "adds set items to {}, which is not a set",
                describe(&target, &self.nodes)
            )),
        }
    }

    fn set_item_pair(&mut self) -> R<()> {
        let v = self.pop()?;
        let k = self.pop()?;
        self.set_items(vec![k, v])
    }

    fn memo_get(&self, i: u32) -> R<Value> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("refers to memo entry {i}, which was never stored"))
    }

    fn memo_put(&mut self, i: u32) -> R<()> {
        self.charge(48)?;
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn run(&mut self) -> R<Value> {
        loop {
            self.op_at = self.pos;
            let op = self
                .take(1, "an opcode")
                .map_err(|_| "the data ends before the pickle's STOP".to_string())?[0];
            match op {
                // --- protocol and framing
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.u64()?;
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                // --- stack manipulation
                b'(' => {
                    self.charge(8)?;
                    self.marks.push(self.stack.len())
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                // --- constants and numbers
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.i32()?;
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
                }
                0x8a => {
                    let n = self.u8()?;
                    let b = self.take(n as u64, "a LONG1 integer")?;
                    self.push(long_le(b))?;
                }
                0x8b => {
                    let n = self.i32()?;
                    if n < 0 {
                        return Err(format!("LONG4 with a negative length {n}"));
                    }
                    let b = self.take(n as u64, "a LONG4 integer")?;
                    self.push(long_le(b))?;
                }
                b'I' => {
                    let l = self.line_str()?;
                    let v = match l {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => decimal(l)?,
                    };
                    self.push(v)?;
                }
                b'L' => {
                    let l = self.line_str()?;
                    let v = decimal(l.strip_suffix('L').unwrap_or(l))?;
                    self.push(v)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v))?;
                }
                b'F' => {
                    let l = self.line_str()?;
                    let v = l
                        .trim()
                        .parse::<f64>()
                        .map_err(|_| format!("FLOAT `{}` is not a number", short(l)))?;
                    self.push(Value::Float(v))?;
                }
                // --- strings and bytes
                b'X' => {
                    let n = self.u32()?;
                    let b = self.take(n as u64, "a BINUNICODE string")?;
                    let v = self.string(b)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = self.u8()?;
                    let b = self.take(n as u64, "a SHORT_BINUNICODE string")?;
                    let v = self.string(b)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = self.u64()?;
                    let b = self.take(n, "a BINUNICODE8 string")?;
                    let v = self.string(b)?;
                    self.push(v)?;
                }
                b'V' => {
                    let l = self.line()?;
                    let s = raw_unicode_escape(l)?;
                    self.push(Value::Str(Rc::from(s.as_str())))?;
                }
                b'T' => {
                    let n = self.i32()?;
                    if n < 0 {
                        return Err(format!("BINSTRING with a negative length {n}"));
                    }
                    let b = self.take(n as u64, "a BINSTRING string")?;
                    self.push(Self::py2_string(b))?;
                }
                b'U' => {
                    let n = self.u8()?;
                    let b = self.take(n as u64, "a SHORT_BINSTRING string")?;
                    self.push(Self::py2_string(b))?;
                }
                b'S' => {
                    let l = self.line()?;
                    let b = quoted_string(l)?;
                    self.push(Self::py2_string(&b))?;
                }
                b'B' => {
                    let n = self.u32()?;
                    let b = self.take(n as u64, "a BINBYTES value")?;
                    self.push(Value::Bytes(Rc::from(b)))?;
                }
                b'C' => {
                    let n = self.u8()?;
                    let b = self.take(n as u64, "a SHORT_BINBYTES value")?;
                    self.push(Value::Bytes(Rc::from(b)))?;
                }
                0x8e | 0x96 => {
                    let n = self.u64()?;
                    let b = self.take(n, "a BINBYTES8 / BYTEARRAY8 value")?;
                    self.push(Value::Bytes(Rc::from(b)))?;
                }
                0x97 | 0x98 => {
                    return Err("uses out-of-band buffers (NEXT_BUFFER / READONLY_BUFFER)".into())
                }
                // --- tuples, lists, dicts, sets
                b')' => {
                    let v = self.push_node(Node::Tuple(Vec::new()))?;
                    self.push(v)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.push_node(Node::Tuple(items))?;
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err(format!("TUPLE{n} with fewer than {n} values on the stack"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let v = self.push_node(Node::Tuple(items))?;
                    self.push(v)?;
                }
                b']' => {
                    let v = self.push_node(Node::List(Vec::new()))?;
                    self.push(v)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.push_node(Node::List(items))?;
                    self.push(v)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => {
                    let v = self.push_node(Node::Dict(Vec::new()))?;
                    self.push(v)?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("DICT from an odd number of values".into());
                    }
                    let mut it = items.into_iter();
                    let mut d = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                    let v = self.push_node(Node::Dict(d))?;
                    self.push(v)?;
                }
                b's' => self.set_item_pair()?,
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                0x8f => {
                    // EMPTY_SET: kept as an opaque value.
                    let g = set_global();
                    let v = self.push_node(Node::Opaque(g))?;
                    self.push(v)?;
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    self.add_items(items)?;
                }
                0x91 => {
                    self.pop_mark()?;
                    let v = self.push_node(Node::Opaque(set_global()))?;
                    self.push(v)?;
                }
                // --- memo
                b'p' => {
                    let l = self.line_str()?;
                    let i = l
                        .parse::<u32>()
                        .map_err(|_| format!("PUT `{}` is not a memo index", short(l)))?;
                    self.memo_put(i)?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| "too many memo entries".to_string())?;
                    self.memo_put(i)?;
                }
                b'g' => {
                    let l = self.line_str()?;
                    let i = l
                        .parse::<u32>()
                        .map_err(|_| format!("GET `{}` is not a memo index", short(l)))?;
                    let v = self.memo_get(i)?;
                    self.push(v)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.push(v)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.push(v)?;
                }
                // --- globals and calls: looked up in the whitelist, never run
                b'c' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let v = self.global(module, name)?;
                    self.push(v)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(
                            "STACK_GLOBAL with a module or name that is not a string".into()
                        );
                    };
                    let v = self.global(module, name)?;
                    self.push(v)?;
                }
                b'i' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let callable = self.global(module, name)?;
                    let items = self.pop_mark()?;
                    let args = self.push_node(Node::Tuple(items))?;
                    let v = self.call(callable, args)?;
                    self.push(v)?;
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err("OBJ without a class".into());
                    }
                    let callable = items.remove(0);
                    let args = self.push_node(Node::Tuple(items))?;
                    let v = self.call(callable, args)?;
                    self.push(v)?;
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.push(v)?;
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.push(v)?;
                }
                b'b' => {
                    let _state = self.pop()?;
                    let target = self.top()?.clone();
                    match self.node(&target) {
                        // OrderedDict's attributes (`_metadata`), opaque data, forbidden
                        // objects: the state is dropped, nothing runs.
                        Some(Node::Dict(_) | Node::Opaque(_) | Node::Forbidden { .. }) => {}
                        _ => {
                            return Err(format!(
                                "BUILD on {}, which takes no state",
                                describe(&target, &self.nodes)
                            ))
                        }
                    }
                }
                b'P' => {
                    let l = self.line()?;
                    let pid = Self::py2_string(l);
                    let v = self.push_node(Node::PersId(pid))?;
                    self.push(v)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.push_node(Node::PersId(pid))?;
                    self.push(v)?;
                }
                0x82..=0x84 => return Err("uses the extension registry (EXT1/2/4)".into()),
                other => return Err(format!("unknown opcode 0x{other:02x}")),
            }
        }
    }
}

fn set_global() -> Rc<Global> {
    Rc::new(Global {
        module: Rc::from("builtins"),
        name: Rc::from("set"),
        kind: Kind::Data,
    })
}

/// A little-endian two's-complement integer of any length.
fn long_le(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() > 8 {
        // Fits anyway when the extra bytes only repeat the sign.
        let sign = if b[7] & 0x80 != 0 { 0xff } else { 0 };
        if b[8..].iter().any(|&x| x != sign) {
            return Value::BigInt;
        }
        return long_le(&b[..8]);
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    let mut a = [fill; 8];
    a[..b.len()].copy_from_slice(b);
    Value::Int(i64::from_le_bytes(a))
}

fn decimal(s: &str) -> R<Value> {
    let t = s.trim();
    if t.is_empty()
        || !t
            .trim_start_matches(['-', '+'])
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        return Err(format!("`{}` is not an integer", short(s)));
    }
    Ok(t.parse::<i64>().map(Value::Int).unwrap_or(Value::BigInt))
}

/// A protocol-0 `STRING` argument: a Python `repr` of a str in single or double quotes.
fn quoted_string(l: &[u8]) -> R<Vec<u8>> {
    let inner = match l {
        [q, inner @ .., q2] if (*q == b'\'' || *q == b'"') && q == q2 => inner,
        _ => return Err("STRING argument is not quoted".into()),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let Some(&e) = inner.get(i) else {
            return Err("STRING argument ends in a backslash".into());
        };
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'x' => {
                let h = inner
                    .get(i..i + 2)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "STRING argument has a bad \\x escape".to_string())?;
                out.push(h);
                i += 2;
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// A protocol-0 `UNICODE` argument: Latin-1 text with `\uXXXX` / `\UXXXXXXXX` escapes.
fn raw_unicode_escape(l: &[u8]) -> R<String> {
    let mut out = String::with_capacity(l.len());
    let mut i = 0;
    while i < l.len() {
        if l[i] == b'\\' && matches!(l.get(i + 1), Some(b'u' | b'U')) {
            let n = if l[i + 1] == b'u' { 4 } else { 8 };
            let c = l
                .get(i + 2..i + 2 + n)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32)
                .ok_or_else(|| "UNICODE argument has a bad escape".to_string())?;
            out.push(c);
            i += 2 + n;
        } else {
            out.push(l[i] as char);
            i += 1;
        }
    }
    Ok(out)
}

/// At most 40 characters of `s`, for messages.
pub(crate) fn short(s: &str) -> String {
    if s.chars().count() <= 40 {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(40).collect::<String>())
    }
}

/// A short description of a value, for messages (never its whole content).
pub(crate) fn describe(v: &Value, nodes: &[Node]) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Int(i) => format!("the integer {i}"),
        Value::BigInt => "an integer beyond 64 bits".into(),
        Value::Float(f) => format!("the float {f}"),
        Value::Str(s) => format!("the string `{}`", short(s)),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        Value::Node(i) => match nodes.get(*i) {
            Some(Node::Tuple(t)) => format!("a tuple of {} items", t.len()),
            Some(Node::List(l)) => format!("a list of {} items", l.len()),
            Some(Node::Dict(d)) => format!("a dict of {} entries", d.len()),
            Some(Node::Global(g)) => format!("the global {}", g.dotted()),
            Some(Node::Call { func, .. }) => format!("a call of {}", func.dotted()),
            Some(Node::PersId(_)) => "a persistent id".into(),
            Some(Node::Opaque(g)) => format!("an opaque {} value", g.dotted()),
            Some(Node::Forbidden { global, .. }) => format!("the refused global {global}"),
            None => "a dangling reference".into(),
        },
    }
}
