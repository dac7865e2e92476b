//! A pickle reader for PyTorch `.ckpt` files that builds tensors and plain containers only.
//!
//! A `torch.save` file is a zip with `<dir>/data.pkl` (a pickle) and one raw little-endian
//! file per storage (`<dir>/data/<key>`). Python's unpickler runs whatever the pickle names
//! (`GLOBAL` + `REDUCE` is a function call: `os.system` included), so this reader interprets
//! the opcodes itself and knows a closed list of names:
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` / `_rebuild_parameter` (tensors built
//! from a storage, an offset, a size and a stride), `torch.*Storage` (a storage's dtype),
//! `collections.OrderedDict` (a dict), and PyTorch Lightning's `ModelCheckpoint` callback, kept
//! as an inert record (as A1111's safe unpickler allows it; nothing of it is built or called).
//! Any other `GLOBAL` / `STACK_GLOBAL` name is refused with an error naming it, before anything
//! else happens, and no opcode ever runs code. Sizes read from the file (storages, tensors,
//! the pickle itself) are checked against the file's length before anything is allocated.
//! The legacy (pre-1.6, non-zip) format is refused with a hint to convert.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// The tensors of a checkpoint's state dict by name, and its `global_step` if any.
pub struct Checkpoint {
    pub tensors: HashMap<String, Tensor>,
    pub global_step: Option<i64>,
    /// Tensors stored next to the `state_dict` at the top of the pickle (e.g. the `embed` of a
    /// DisenDiff / Custom Diffusion `delta.ckpt`); empty when the top is the state dict.
    pub top_level: HashMap<String, Tensor>,
}

/// A name a `GLOBAL` may refer to.
#[derive(Clone, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor { v2: bool },
    RebuildParameter,
    Storage(DType),
    /// A class kept as an inert record, never instantiated.
    Inert(String),
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    let storage = |d| Ok(Global::Storage(d));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensor { v2: true }),
        ("torch._utils", "_rebuild_tensor") => Ok(Global::RebuildTensor { v2: false }),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch", "FloatStorage") => storage(DType::F32),
        ("torch", "HalfStorage") => storage(DType::F16),
        ("torch", "BFloat16Storage") => storage(DType::BF16),
        ("torch", "DoubleStorage") => storage(DType::F64),
        ("torch", "LongStorage") => storage(DType::I64),
        ("torch", "IntStorage") => storage(DType::I32),
        ("torch", "ShortStorage") => storage(DType::I16),
        ("torch", "ByteStorage") | ("torch", "BoolStorage") => storage(DType::U8),
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") => Ok(Global::Inert(format!("{module}.{name}"))),
        _ => bail!(
            "the pickle asks for {module}.{name}, which is not a tensor, storage or container: refused \
             (only torch tensors, storages, OrderedDict and plain values are read; nothing in the file is run)"
        ),
    }
}

#[derive(Clone, Debug)]
enum Value {
    Mark,
    None,
    Int(i64),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    /// A persistent id resolved to a storage: (dtype, key).
    Storage(DType, String),
    Tensor(Tensor),
    /// A value this reader does not keep: a bool, a float, bytes, an object of an inert class.
    Other,
}

/// Reads a `.ckpt` (a `torch.save` zip) into its state dict's tensors.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let file_len = file.metadata()?.len();
    let mut zip = match zip::ZipArchive::new(file) {
        Ok(z) => z,
        Err(e) => {
            let mut head = [0u8; 2];
            let legacy = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head[0] == 0x80;
            if legacy {
                bail!("{}: a legacy (PyTorch < 1.6) pickle checkpoint, which is not read; convert it to safetensors", path.display());
            }
            bail!("{} is not a readable PyTorch checkpoint (a zip archive is expected; truncated or corrupt?): {e}", path.display());
        }
    };
    let names: Vec<String> = (0..zip.len())
        .map(|i| zip.by_index(i).map_err(anyhow::Error::from).and_then(|f| Ok(f.name()?.to_string())))
        .collect::<Result<_>>()
        .with_context(|| format!("reading the zip directory of {}", path.display()))?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .with_context(|| format!("{}: no <dir>/data.pkl in the archive: not a torch.save checkpoint", path.display()))?
        .clone();
    let dir = pkl.trim_end_matches("data.pkl").to_string();
    if let Ok(mut f) = zip.by_name(&format!("{dir}byteorder")) {
        let mut s = String::new();
        (&mut f).take(16).read_to_string(&mut s)?;
        if s.trim() != "little" {
            bail!("{}: byte order {:?} is not supported (little-endian only)", path.display(), s.trim());
        }
    }
    let mut read_entry = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip.by_name(name).with_context(|| format!("{}: archive entry {name} is missing", path.display()))?;
        if f.compression() != zip::CompressionMethod::Stored {
            bail!("{}: archive entry {name} is compressed ({:?}); torch.save stores entries uncompressed", path.display(), f.compression());
        }
        let size = f.size();
        if size > file_len {
            bail!("{}: archive entry {name} claims {size} bytes, more than the file's {file_len}", path.display());
        }
        let mut buf = Vec::with_capacity(size as usize);
        f.read_to_end(&mut buf).with_context(|| format!("{}: reading archive entry {name} (truncated?)", path.display()))?;
        if buf.len() as u64 != size {
            bail!("{}: archive entry {name} holds {} bytes, its header says {size}", path.display(), buf.len());
        }
        Ok(buf)
    };
    let pickle = read_entry(&pkl)?;
    let mut read_storage = |key: &str| read_entry(&format!("{dir}data/{key}"));
    let mut u = Unpickler { stack: Vec::new(), memo: HashMap::new(), storages: HashMap::new(), read_storage: &mut read_storage, file_len };
    let top = u.run(&pickle).with_context(|| format!("reading the pickle of {}", path.display()))?;
    let Value::Dict(top) = top else {
        bail!("{}: the pickle holds no dict (a state dict or a dict with a state_dict is expected)", path.display());
    };
    let get = |d: &[(Value, Value)], k: &str| d.iter().find(|(n, _)| matches!(n, Value::Str(s) if s == k)).map(|(_, v)| v.clone());
    let global_step = match get(&top, "global_step") {
        Some(Value::Int(n)) => Some(n),
        _ => None,
    };
    let mut top_level = HashMap::new();
    let state = match get(&top, "state_dict") {
        Some(Value::Dict(d)) => {
            for (k, v) in top {
                if let (Value::Str(k), Value::Tensor(t)) = (k, v) {
                    top_level.insert(k, t);
                }
            }
            d
        }
        _ => top,
    };
    let mut tensors = HashMap::new();
    for (k, v) in state {
        if let (Value::Str(k), Value::Tensor(t)) = (k, v) {
            tensors.insert(k, t);
        }
    }
    if tensors.is_empty() {
        bail!("{}: no tensors in the checkpoint's state dict", path.display());
    }
    Ok(Checkpoint { tensors, global_step, top_level })
}

/// The pickle machine: a stack, a memo and the storages read so far.
struct Unpickler<'a> {
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    storages: HashMap<String, (DType, Vec<u8>)>,
    read_storage: &'a mut dyn FnMut(&str) -> Result<Vec<u8>>,
    file_len: u64,
}

/// A cursor over the pickle's bytes; reading past the end is an error.
struct Cursor<'b> {
    data: &'b [u8],
    pos: usize,
}

impl<'b> Cursor<'b> {
    fn take(&mut self, n: usize) -> Result<&'b [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            bail!("truncated pickle: {n} bytes needed at byte {} of {}", self.pos, self.data.len());
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn line(&mut self) -> Result<&'b str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').context("truncated pickle: a line has no end")?;
        let s = std::str::from_utf8(&rest[..n]).context("a pickle text line is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<String> {
        Ok(std::str::from_utf8(self.take(n)?).context("a pickle string is not UTF-8")?.to_string())
    }
}

impl Unpickler<'_> {
    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("pickle stack underflow")
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().context("pickle stack underflow")
    }

    /// Pops everything down to the last mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).context("pickle: no mark on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn run(&mut self, data: &[u8]) -> Result<Value> {
        let mut c = Cursor { data, pos: 0 };
        loop {
            let at = c.pos;
            let op = c.u8()?;
            match op {
                0x80 => {
                    c.u8()?;
                }
                0x95 => {
                    c.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                0x8f => self.stack.push(Value::List(Vec::new())),
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Other),
                b'J' => {
                    let v = c.u32()? as i32;
                    self.stack.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = c.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = c.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = c.u8()? as usize;
                    let b = c.take(n)?;
                    if n > 8 {
                        bail!("pickle integer of {n} bytes at byte {at} is too large");
                    }
                    let mut buf = [if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 }; 8];
                    buf[..n].copy_from_slice(b);
                    let v = i64::from_le_bytes(buf);
                    self.stack.push(Value::Int(v))
                }
                b'I' => {
                    let l = c.line()?;
                    let v = match l {
                        "00" | "01" => Value::Other,
                        _ => Value::Int(l.parse().with_context(|| format!("pickle INT {l:?} at byte {at}"))?),
                    };
                    self.stack.push(v)
                }
                b'G' => {
                    let v = f64::from_be_bytes(c.take(8)?.try_into()?);
                    let _ = v;
                    self.stack.push(Value::Other)
                }
                b'X' => {
                    let n = c.u32()? as usize;
                    let s = c.string(n)?;
                    self.stack.push(Value::Str(s))
                }
                0x8c => {
                    let n = c.u8()? as usize;
                    let s = c.string(n)?;
                    self.stack.push(Value::Str(s))
                }
                0x8d => {
                    let n = usize::try_from(c.u64()?)?;
                    let s = c.string(n)?;
                    self.stack.push(Value::Str(s))
                }
                b'U' | b'C' => {
                    let n = c.u8()? as usize;
                    let b = c.take(n)?;
                    self.stack.push(if op == b'U' { Value::Str(String::from_utf8_lossy(b).into()) } else { Value::Other })
                }
                b'T' | b'B' => {
                    let n = c.u32()? as usize;
                    let b = c.take(n)?;
                    self.stack.push(if op == b'T' { Value::Str(String::from_utf8_lossy(b).into()) } else { Value::Other })
                }
                b't' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        bail!("pickle stack underflow at byte {at}");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => bail!("pickle APPEND to a non-list at byte {at}"),
                    }
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => bail!("pickle APPENDS to a non-list at byte {at}"),
                    }
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = pairs(items).with_context(|| format!("pickle DICT at byte {at}"))?;
                    self.stack.push(Value::Dict(d))
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => bail!("pickle SETITEM on a non-dict at byte {at}"),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let new = pairs(items).with_context(|| format!("pickle SETITEMS at byte {at}"))?;
                    match self.top()? {
                        Value::Dict(d) => d.extend(new),
                        _ => bail!("pickle SETITEMS on a non-dict at byte {at}"),
                    }
                }
                b'q' | b'r' | 0x94 | b'p' => {
                    let id = match op {
                        b'q' => c.u8()? as u32,
                        b'r' => c.u32()?,
                        b'p' => c.line()?.parse().with_context(|| format!("pickle PUT at byte {at}"))?,
                        _ => self.memo.len() as u32,
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(id, v);
                }
                b'h' | b'j' | b'g' => {
                    let id = match op {
                        b'h' => c.u8()? as u32,
                        b'j' => c.u32()?,
                        _ => c.line()?.parse().with_context(|| format!("pickle GET at byte {at}"))?,
                    };
                    let v = self.memo.get(&id).with_context(|| format!("pickle GET of unknown memo entry {id} at byte {at}"))?.clone();
                    self.stack.push(v)
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                b'c' => {
                    let module = c.line()?.to_string();
                    let name = c.line()?.to_string();
                    self.stack.push(Value::Global(resolve_global(&module, &name)?))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        bail!("pickle STACK_GLOBAL at byte {at} without two strings");
                    };
                    self.stack.push(Value::Global(resolve_global(&module, &name)?))
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid).with_context(|| format!("pickle persistent id at byte {at}"))?;
                    self.stack.push(v)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args).with_context(|| format!("pickle REDUCE at byte {at}"))?;
                    self.stack.push(v)
                }
                0x81 => {
                    let _args = self.pop()?;
                    match self.pop()? {
                        Value::Global(Global::Inert(_)) => self.stack.push(Value::Other),
                        other => bail!("pickle NEWOBJ at byte {at} of {}: refused", describe(&other)),
                    }
                }
                b'b' => {
                    // The state of an object: dropped (no __setstate__ is ever run).
                    self.pop()?;
                    self.top()?;
                }
                _ => bail!("unsupported pickle opcode 0x{op:02x} at byte {at} (only the opcodes torch.save writes are read)"),
            }
        }
    }

    /// Resolves `('storage', <dtype>, key, location, numel)` to a storage, reading its bytes.
    fn persistent(&mut self, pid: Value) -> Result<Value> {
        let Value::Tuple(t) = pid else { bail!("a persistent id that is not a tuple") };
        let [Value::Str(kind), Value::Global(Global::Storage(dtype)), Value::Str(key), _, Value::Int(numel)] = t.as_slice() else {
            bail!("a persistent id that is not ('storage', torch.*Storage, key, location, numel)");
        };
        if kind != "storage" {
            bail!("persistent id of kind {kind:?} (only 'storage' is read)");
        }
        let numel = usize::try_from(*numel).context("a negative storage size")?;
        if !self.storages.contains_key(key) {
            let want = numel.checked_mul(dtype.size_in_bytes()).context("storage size overflows")?;
            if want as u64 > self.file_len {
                bail!("storage {key} claims {numel} elements ({want} bytes), more than the file's {} bytes", self.file_len);
            }
            let bytes = (self.read_storage)(key)?;
            if bytes.len() != want {
                bail!("storage {key} holds {} bytes, but {numel} {dtype:?} elements need {want}", bytes.len());
            }
            self.storages.insert(key.clone(), (*dtype, bytes));
        }
        Ok(Value::Storage(*dtype, key.clone()))
    }

    /// REDUCE: the only callables are the allowed globals, and none of them runs code.
    fn call(&mut self, f: Value, args: Value) -> Result<Value> {
        let Value::Tuple(args) = args else { bail!("arguments that are not a tuple") };
        let Value::Global(g) = f else { bail!("a call of {}: refused", describe(&f)) };
        match g {
            Global::OrderedDict => match args.as_slice() {
                [] => Ok(Value::Dict(Vec::new())),
                [Value::List(items)] => {
                    let mut d = Vec::new();
                    for it in items {
                        match it {
                            Value::Tuple(kv) if kv.len() == 2 => d.push((kv[0].clone(), kv[1].clone())),
                            _ => bail!("OrderedDict of something other than (key, value) pairs"),
                        }
                    }
                    Ok(Value::Dict(d))
                }
                _ => bail!("OrderedDict with unexpected arguments"),
            },
            Global::RebuildTensor { .. } => {
                let (Some(Value::Storage(dtype, key)), Some(Value::Int(offset)), Some(Value::Tuple(size)), Some(Value::Tuple(stride))) =
                    (args.first(), args.get(1), args.get(2), args.get(3))
                else {
                    bail!("_rebuild_tensor arguments are not (storage, offset, size, stride, ...)");
                };
                let ints = |v: &[Value]| -> Result<Vec<usize>> {
                    v.iter()
                        .map(|x| match x {
                            Value::Int(n) => usize::try_from(*n).context("a negative tensor size or stride"),
                            _ => bail!("a tensor size or stride that is not an integer"),
                        })
                        .collect()
                };
                let (size, stride) = (ints(size)?, ints(stride)?);
                let offset = usize::try_from(*offset).context("a negative storage offset")?;
                let (_, bytes) = self.storages.get(key).context("a tensor of an unread storage")?;
                Ok(Value::Tensor(build_tensor(bytes, *dtype, offset, &size, &stride)?))
            }
            Global::RebuildParameter => match args.into_iter().next() {
                Some(Value::Tensor(t)) => Ok(Value::Tensor(t)),
                _ => bail!("_rebuild_parameter of something other than a tensor"),
            },
            Global::Inert(_) => Ok(Value::Other),
            Global::Storage(d) => bail!("a call of a {d:?} storage class: refused"),
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        bail!("an odd number of dict items");
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn describe(v: &Value) -> String {
    match v {
        Value::Global(g) => format!("{g:?}"),
        Value::Str(_) => "a string".into(),
        _ => "a value that is not a class or function".into(),
    }
}

/// Builds a tensor of `size` / `stride` from a storage's bytes starting at element `offset`,
/// checking it stays inside the storage.
fn build_tensor(bytes: &[u8], dtype: DType, offset: usize, size: &[usize], stride: &[usize]) -> Result<Tensor> {
    if size.len() != stride.len() {
        bail!("tensor size {size:?} and stride {stride:?} differ in rank");
    }
    let es = dtype.size_in_bytes();
    let numel_storage = bytes.len() / es;
    let numel = size.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).context("tensor size overflows")?;
    if numel > 0 {
        let last = size
            .iter()
            .zip(stride)
            .try_fold(offset, |a, (&s, &st)| (s - 1).checked_mul(st).and_then(|x| a.checked_add(x)))
            .context("tensor extent overflows")?;
        if last >= numel_storage {
            bail!("tensor of size {size:?}, stride {stride:?}, offset {offset} reaches element {last} of a storage of {numel_storage}");
        }
    }
    // Overlapping strides (0 = broadcast) can make a view far larger than its storage; it is
    // copied out, so a header could ask for any allocation: state dicts hold no such views.
    if numel > numel_storage {
        bail!("tensor of size {size:?}, stride {stride:?} has {numel} elements, more than its storage's {numel_storage} (an expanded view is not read)");
    }
    let mut contiguous = vec![1usize; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        contiguous[i] = contiguous[i + 1] * size[i + 1];
    }
    let is_contiguous = size.iter().zip(stride).zip(&contiguous).all(|((&s, &st), &c)| s <= 1 || st == c);
    let data: Vec<u8> = if is_contiguous {
        bytes[offset * es..(offset + numel) * es].to_vec()
    } else {
        let mut out = Vec::with_capacity(numel * es);
        let mut idx = vec![0usize; size.len()];
        for _ in 0..numel {
            let e = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&bytes[e * es..(e + 1) * es]);
            for d in (0..size.len()).rev() {
                idx[d] += 1;
                if idx[d] < size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    };
    Ok(Tensor::from_raw_buffer(&data, dtype, size, &Device::Cpu)?)
}
