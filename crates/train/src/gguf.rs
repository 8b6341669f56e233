//! GGUF files (v2 and v3) of the llama architecture, read by hand: the format is small and
//! stable, and no maintained crate reads it without pulling in a whole tensor library.
//!
//! This module owns the file format: metadata, the tensor directory, dequantization to f32
//! (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K), llama.cpp's names mapped to
//! the Hugging Face ones, llama.cpp's q/k row permutation undone (so the weights equal
//! transformers' after its own GGUF loader), the runtime [`llama::Config`] from the
//! metadata and the tokenizer from the metadata ([`tokenizer_json`]).
//!
//! Reading is tensor by tensor through a seek, so peak memory is one raw tensor plus the
//! f32 model, and every length in the file is checked against the file size before
//! anything is allocated: a truncated or corrupt file is an error, never a panic or an
//! allocation of garbage size.
//!
//! Longer than 600 lines because the format's parts (header, metadata, tensor infos, the
//! quantised block layouts and their dequantisation, the llama name mapping) are read in one
//! pass with every length checked.
use crate::llama::{self, Llama};
use crate::weights::Weights;
use crate::TrainError;
use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// uint8.
    U8(u8),
    /// int8.
    I8(i8),
    /// uint16.
    U16(u16),
    /// int16.
    I16(i16),
    /// uint32.
    U32(u32),
    /// int32.
    I32(i32),
    /// float32.
    F32(f32),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values of one type.
    Array(Vec<Value>),
    /// uint64.
    U64(u64),
    /// int64.
    I64(i64),
    /// float64.
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader can dequantize, with their block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale, 32 x i8.
    Q8_0,
    /// Blocks of 32: f16 scale, 32 x 4 bits, offset -8.
    Q4_0,
    /// Blocks of 32: f16 scale and minimum, 32 x 4 bits.
    Q4_1,
    /// Blocks of 32: f16 scale, 32 x 5 bits, offset -16.
    Q5_0,
    /// Blocks of 32: f16 scale and minimum, 32 x 5 bits.
    Q5_1,
    /// Super-blocks of 256: 8 sub-blocks with 6-bit scales and minima, 4-bit values.
    Q4K,
    /// Super-blocks of 256: 16 sub-blocks with 8-bit scales, 6-bit values.
    Q6K,
}

impl GgmlType {
    /// The type of a ggml type id, or None when this reader cannot dequantize it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (u64, u64) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q4K => (256, 144),
            Self::Q6K => (256, 210),
        }
    }
}

/// ggml's name for a type id (for error messages about types this reader lacks).
pub fn ggml_type_name(id: u32) -> String {
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    names
        .get(id as usize)
        .map_or_else(|| format!("type {id}"), |n| (*n).to_string())
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// llama.cpp's name (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order (first is the fastest-varying, i.e. the reverse of torch's).
    pub dims: Vec<u64>,
    /// ggml type id.
    pub type_id: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Shape in torch order.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        // Saturating: a corrupt directory must give an error later, not an overflow here.
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }
}

/// A parsed GGUF file: metadata and tensor directory (the data is read on demand).
#[derive(Debug)]
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
    file_len: u64,
}

/// Reader that knows how many bytes the file has left, so no length read from the file can
/// make us allocate more than the file holds.
struct Cursor<R> {
    inner: R,
    pos: u64,
    len: u64,
    path: PathBuf,
}

impl<R: Read> Cursor<R> {
    fn truncated(&self, what: &str) -> TrainError {
        TrainError::Invalid(format!(
            "{}: truncated or corrupt GGUF file (reading {what} at byte {} of {})",
            self.path.display(),
            self.pos,
            self.len
        ))
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, TrainError> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(self.truncated(what));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| self.truncated(what))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], TrainError> {
        let mut buf = [0u8; N];
        if (N as u64) > self.len.saturating_sub(self.pos) {
            return Err(self.truncated(what));
        }
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| self.truncated(what))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, TrainError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, TrainError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, TrainError> {
        let n = self.u64(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| {
            TrainError::Invalid(format!(
                "{}: GGUF {what} is not UTF-8 (byte {})",
                self.path.display(),
                self.pos
            ))
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, TrainError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(TrainError::Invalid(format!(
                        "{}: GGUF key {key}: arrays nested too deep",
                        self.path.display()
                    )));
                }
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least its fixed size (a string its 8-byte length, an
                // array its type and count): a count beyond the bytes left is corrupt.
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => 1,
                };
                if n.checked_mul(min)
                    .is_none_or(|need| need > self.len.saturating_sub(self.pos))
                {
                    return Err(self.truncated(key));
                }
                // The capacity is capped: the count is only an upper bound until read.
                let mut out = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    out.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(TrainError::Invalid(format!(
                    "{}: GGUF key {key} has unknown value type {other} (corrupt file?)",
                    self.path.display()
                )))
            }
        })
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl GgufFile {
    /// Parses the header, metadata and tensor directory of `path`.
    ///
    /// # Errors
    /// Unreadable file, not GGUF, an unsupported version, truncated or corrupt content,
    /// tensor data that would lie beyond the end of the file.
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let (file, len) =
            rankstab_records::guard::open_regular(path, crate::weights::MAX_WEIGHT_FILE_BYTES)?;
        let mut c = Cursor {
            inner: BufReader::new(file),
            pos: 0,
            len,
            path: path.to_path_buf(),
        };
        let bad = |m: String| TrainError::Invalid(format!("{}: {m}", path.display()));
        let magic = c.array::<4>("the magic number")?;
        if &magic != MAGIC {
            return Err(bad(format!("not a GGUF file (magic {magic:?})")));
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version} is not supported (2 or 3)"
            )));
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        // A metadata entry takes at least 13 bytes (key length, a one-byte key, type, a
        // one-byte value), a tensor entry at least 29 (name length, a one-byte name, one
        // dimension, type, offset): counts the rest of the file cannot hold are corrupt.
        let left = len.saturating_sub(c.pos);
        if n_kv > left / 13 || n_tensors > left / 29 {
            return Err(bad(format!(
                "truncated or corrupt GGUF file: {n_kv} metadata entries and {n_tensors} tensors cannot fit in the {left} bytes left"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(bad(format!("GGUF metadata key {key} appears twice")));
            }
        }
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(bad(format!(
                    "tensor {name} has {n_dims} dimensions (1 to 4 allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = c.u64(&name)?;
                if d == 0 || d > i64::MAX as u64 {
                    return Err(bad(format!(
                        "tensor {name} has a dimension of {d} (1 to 2^63-1 allowed)"
                    )));
                }
                dims.push(d);
            }
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            if !names.insert(name.clone()) {
                return Err(bad(format!("GGUF tensor {name} appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(bad(format!(
                    "GGUF general.alignment = {v:?} is not allowed (a uint32 power of two)"
                )))
            }
        };
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let this = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            file_len: len,
        };
        let mut ranges = Vec::with_capacity(this.tensors.len());
        for t in &this.tensors {
            if t.dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .is_none()
            {
                return Err(bad(format!(
                    "tensor {} has dimensions {:?} whose product overflows",
                    t.name, t.dims
                )));
            }
            if t.offset % alignment != 0 {
                return Err(bad(format!(
                    "tensor {} starts at offset {}, not a multiple of the alignment {alignment}",
                    t.name, t.offset
                )));
            }
            // Checked here so that a truncated file fails at open, naming the tensor.
            let (start, n) = this.byte_range(t)?;
            if start.checked_add(n).is_none_or(|end| end > len) {
                return Err(bad(format!(
                    "truncated GGUF file: tensor {} needs bytes {start}..{} but the file has {len}",
                    t.name,
                    start.saturating_add(n)
                )));
            }
            ranges.push((start, start + n, &t.name));
        }
        ranges.sort();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(bad(format!(
                    "GGUF tensors {} and {} overlap (bytes {}..{} and {}..{}): a damaged file",
                    w[0].2, w[1].2, w[0].0, w[0].1, w[1].0, w[1].1
                )));
            }
        }
        Ok(this)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn unsupported(&self, t: &TensorInfo) -> TrainError {
        TrainError::Invalid(format!(
            "{}: tensor {} uses quantization {} which rankstab cannot dequantize (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K)",
            self.path.display(),
            t.name,
            ggml_type_name(t.type_id)
        ))
    }

    /// (absolute start, length in bytes) of a tensor's data.
    fn byte_range(&self, t: &TensorInfo) -> Result<(u64, u64), TrainError> {
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| self.unsupported(t))?;
        let (per_block, bytes) = ty.block();
        let n = t.numel();
        if t.dims.first().is_none_or(|d0| d0 % per_block != 0) {
            return Err(TrainError::Invalid(format!(
                "{}: tensor {} has rows of {:?} elements, not a multiple of the {} block of {per_block}",
                self.path.display(),
                t.name,
                t.dims.first(),
                ggml_type_name(t.type_id)
            )));
        }
        let len = (n / per_block).checked_mul(bytes).ok_or_else(|| {
            TrainError::Invalid(format!(
                "{}: tensor {} is too large",
                self.path.display(),
                t.name
            ))
        })?;
        let start = self.data_start.checked_add(t.offset).ok_or_else(|| {
            TrainError::Invalid(format!(
                "{}: tensor {} has a corrupt offset",
                self.path.display(),
                t.name
            ))
        })?;
        Ok((start, len))
    }

    /// The tensor directory entry named `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads and dequantizes one tensor to f32, in torch's shape.
    ///
    /// # Errors
    /// Unsupported quantization (named), unreadable data.
    pub fn read_f32(&self, t: &TensorInfo) -> Result<Tensor, TrainError> {
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| self.unsupported(t))?;
        let (start, len) = self.byte_range(t)?;
        if start.saturating_add(len) > self.file_len {
            return Err(TrainError::Invalid(format!(
                "{}: truncated GGUF file at tensor {}",
                self.path.display(),
                t.name
            )));
        }
        let (mut f, now) = rankstab_records::guard::open_regular(
            &self.path,
            crate::weights::MAX_WEIGHT_FILE_BYTES,
        )?;
        if now != self.file_len {
            return Err(TrainError::Invalid(format!(
                "{}: changed since it was opened ({} bytes, now {now}): not read",
                self.path.display(),
                self.file_len
            )));
        }
        f.seek(SeekFrom::Start(start)).map_err(io_err(&self.path))?;
        let mut raw = vec![0u8; len as usize];
        f.read_exact(&mut raw).map_err(io_err(&self.path))?;
        let values = dequantize(ty, &raw, t.numel() as usize);
        Tensor::from_slice(&values)
            .f_reshape(t.shape())
            .map_err(|source| TrainError::Torch {
                context: format!("reshaping tensor {}", t.name),
                source,
            })
    }
}

/// The little-endian IEEE half at byte `i` of `b`, as f32.
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` elements of type `ty` from `raw` (whose length matches, as checked by
/// the caller), following ggml's reference `dequantize_row_*`.
pub fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let (_, bytes) = ty.block();
    match ty {
        GgmlType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(raw.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::Bf16 => out.extend(
            raw.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for b in raw.chunks_exact(bytes as usize) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let off = if ty == GgmlType::Q4_0 { 2 } else { 4 };
            for b in raw.chunks_exact(bytes as usize) {
                let d = f16_at(b, 0);
                let (m, shift) = if ty == GgmlType::Q4_0 {
                    (0.0, 8.0)
                } else {
                    (f16_at(b, 2), 0.0)
                };
                let qs = &b[off..off + 16];
                out.extend(qs.iter().map(|&q| (f32::from(q & 0x0f) - shift) * d + m));
                out.extend(qs.iter().map(|&q| (f32::from(q >> 4) - shift) * d + m));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let q50 = ty == GgmlType::Q5_0;
            let off = if q50 { 2 } else { 4 };
            for b in raw.chunks_exact(bytes as usize) {
                let d = f16_at(b, 0);
                let (m, shift) = if q50 {
                    (0.0, 16.0)
                } else {
                    (f16_at(b, 2), 0.0)
                };
                let qh = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
                let qs = &b[off + 4..off + 20];
                for (j, &q) in qs.iter().enumerate() {
                    let h = (((qh >> j) << 4) & 0x10) as u8;
                    out.push((f32::from((q & 0x0f) | h) - shift) * d + m);
                }
                for (j, &q) in qs.iter().enumerate() {
                    let h = ((qh >> (j + 12)) & 0x10) as u8;
                    out.push((f32::from((q >> 4) | h) - shift) * d + m);
                }
            }
        }
        GgmlType::Q4K => {
            for b in raw.chunks_exact(bytes as usize) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                // 6-bit scale and minimum of sub-block j (ggml's get_scale_min_k4).
                let sm = |j: usize| -> (f32, f32) {
                    if j < 4 {
                        (f32::from(scales[j] & 63), f32::from(scales[j + 4] & 63))
                    } else {
                        (
                            f32::from((scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4)),
                            f32::from((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)),
                        )
                    }
                };
                for (k, q) in qs.chunks_exact(32).enumerate() {
                    let (s1, m1) = sm(2 * k);
                    let (s2, m2) = sm(2 * k + 1);
                    out.extend(q.iter().map(|&v| d * s1 * f32::from(v & 0x0f) - dmin * m1));
                    out.extend(q.iter().map(|&v| d * s2 * f32::from(v >> 4) - dmin * m2));
                }
            }
        }
        GgmlType::Q6K => {
            for b in raw.chunks_exact(bytes as usize) {
                let ql = &b[0..128];
                let qh = &b[128..192];
                let sc = &b[192..208];
                let d = f16_at(b, 208);
                let mut y = [0f32; 256];
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let base = 128 * half;
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                        y[base + l] = d * f32::from(sc[is] as i8) * f32::from(q1);
                        y[base + l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
                        y[base + l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
                        y[base + l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
                    }
                }
                out.extend_from_slice(&y);
            }
        }
    }
    out
}

/// Undoes llama.cpp's rope permutation of q/k rows: llama.cpp stores each head's rows as
/// (hd/2, 2) interleaved pairs, transformers as two halves (2, hd/2). Works on weights
/// (out, in) and biases (out).
///
/// # Errors
/// Rows that do not split into `heads` heads of an even size.
pub fn unpermute_rows(w: &Tensor, heads: i64) -> Result<Tensor, tch::TchError> {
    let s = w.size();
    let out = s.first().copied().unwrap_or(0);
    let rest: Vec<i64> = s.iter().skip(1).copied().collect();
    if heads <= 0 || out % (2 * heads) != 0 {
        return Err(tch::TchError::Shape(format!(
            "{out} rows do not split into {heads} heads of an even size"
        )));
    }
    let mut split = vec![heads, out / heads / 2, 2];
    split.extend(&rest);
    w.f_reshape(split.as_slice())?
        .f_transpose(1, 2)?
        .f_reshape(s.as_slice())
}

/// The Hugging Face name of a llama.cpp tensor name of the llama architecture.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = tail.rsplit_once('.')?;
    let m = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{m}.{param}"))
}

impl GgufFile {
    /// The one-line error about metadata `key` holding `v`.
    fn bad_meta(&self, key: &str, v: &Value, allowed: &str) -> TrainError {
        crate::weights::field_error(&self.path, &format!("GGUF {key}"), short(v), allowed)
    }

    /// An integer metadata value in `lo..=hi` (any integer type), None when absent.
    fn meta_uint(&self, key: &str, lo: u64, hi: u64) -> Result<Option<u64>, TrainError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(self.bad_meta(key, v, &format!("an integer from {lo} to {hi}"))),
        }
    }

    /// A required integer metadata value in `lo..=hi`.
    fn need_uint(&self, key: &str, lo: u64, hi: u64) -> Result<u64, TrainError> {
        self.meta_uint(key, lo, hi)?
            .ok_or_else(|| TrainError::Config {
                path: self.path.clone(),
                message: format!("GGUF metadata {key} is missing (an integer from {lo} to {hi})"),
            })
    }

    /// A float metadata value (f32 or f64) accepted by `ok`, None when absent.
    fn meta_float(
        &self,
        key: &str,
        ok: impl Fn(f64) -> bool,
        allowed: &str,
    ) -> Result<Option<f64>, TrainError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v {
            Value::F32(_) | Value::F64(_) => {}
            _ => return Err(self.bad_meta(key, v, allowed)),
        }
        match v.as_f64() {
            Some(x) if x.is_finite() && ok(x) => Ok(Some(x)),
            _ => Err(self.bad_meta(key, v, allowed)),
        }
    }

    /// A string metadata value, None when absent.
    fn meta_str(&self, key: &str) -> Result<Option<&str>, TrainError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad_meta(key, v, "a string")),
        }
    }

    /// The runtime Llama configuration from the `llama.*` metadata, every value checked for
    /// its type and range, and the block count checked against the tensors present.
    ///
    /// # Errors
    /// Another architecture, missing keys, values of the wrong type or out of range, sizes
    /// that do not fit together, settings rankstab does not implement (RoPE scaling,
    /// partial rotary, mixtures of experts).
    pub fn llama_config(&self) -> Result<llama::Config, TrainError> {
        use crate::weights::bounds::*;
        let bad = |message: String| TrainError::Config {
            path: self.path.clone(),
            message,
        };
        let arch = self.meta_str("general.architecture")?.unwrap_or("");
        if arch != "llama" {
            return Err(bad(format!(
                "GGUF general.architecture is {arch:?}; only \"llama\" is supported"
            )));
        }
        let hidden = self.need_uint("llama.embedding_length", 1, WIDTH)?;
        let heads = self.need_uint("llama.attention.head_count", 1, HEADS)?;
        let kv = self
            .meta_uint("llama.attention.head_count_kv", 1, HEADS)?
            .unwrap_or(heads);
        let layers = self.need_uint("llama.block_count", 1, LAYERS)?;
        let ffn = self.need_uint("llama.feed_forward_length", 1, WIDTH)?;
        if !heads.is_multiple_of(kv) {
            return Err(bad(format!(
                "GGUF llama.attention.head_count_kv = {kv} is not allowed (a divisor of llama.attention.head_count {heads})"
            )));
        }
        let head_dim = match self.meta_uint("llama.attention.key_length", 2, HEAD_DIM)? {
            Some(h) => h,
            None if hidden.is_multiple_of(heads) => hidden / heads,
            None => {
                return Err(bad(format!(
                    "GGUF llama.embedding_length = {hidden} is not allowed (a multiple of llama.attention.head_count {heads})"
                )))
            }
        };
        if !head_dim.is_multiple_of(2) || heads * head_dim > WIDTH {
            return Err(bad(format!(
                "GGUF head size {head_dim} is not allowed (even, and heads x head size at most {WIDTH})"
            )));
        }
        for (key, what) in [
            ("llama.attention.value_length", "the key length"),
            (
                "llama.rope.dimension_count",
                "the head size: rankstab rotates whole heads",
            ),
        ] {
            if let Some(v) = self.meta_uint(key, 1, HEAD_DIM)? {
                if v != head_dim {
                    return Err(bad(format!(
                        "GGUF {key} = {v} is not allowed (equal to {what}, {head_dim})"
                    )));
                }
            }
        }
        if let Some(n) = self.meta_uint("llama.expert_count", 0, u64::MAX)? {
            if n > 0 {
                return Err(bad(format!(
                    "GGUF llama.expert_count = {n} is not allowed (mixtures of experts are not supported: 0 or absent)"
                )));
            }
        }
        if let Some(s) = self.meta_str("llama.rope.scaling.type")? {
            if s != "none" {
                return Err(bad(format!(
                    "GGUF llama.rope.scaling.type = {s:?} is not allowed (only \"none\": plain RoPE)"
                )));
            }
        }
        self.meta_float(
            "llama.rope.scaling.factor",
            |x| x == 1.0 || x == 0.0,
            "0 or 1: rankstab implements plain RoPE, no scaling",
        )?;
        // Every block's tensors, and no block beyond the count.
        let mut seen = vec![false; layers as usize];
        for t in &self.tensors {
            if let Some(rest) = t.name.strip_prefix("blk.") {
                let i = rest.split('.').next().and_then(|i| i.parse::<u64>().ok());
                match i {
                    Some(i) if i < layers => seen[i as usize] = true,
                    _ => {
                        return Err(bad(format!(
                            "GGUF tensor {} does not belong to one of the llama.block_count = {layers} blocks",
                            t.name
                        )))
                    }
                }
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(bad(format!(
                "GGUF llama.block_count = {layers} but block {i} has no tensors (blk.{i}.*)"
            )));
        }
        let embed = self
            .info("token_embd.weight")
            .ok_or_else(|| TrainError::MissingTensor {
                path: self.path.clone(),
                name: "token_embd.weight".into(),
            })?;
        let embed_rows = embed.dims.get(1).copied().unwrap_or(0);
        let vocab = self
            .meta_uint("llama.vocab_size", 1, VOCAB)?
            .unwrap_or(embed_rows);
        if !(1..=VOCAB).contains(&vocab) {
            return Err(bad(format!(
                "GGUF token_embd.weight has {vocab} rows (1 to {VOCAB} allowed)"
            )));
        }
        let eps = self
            .meta_float(
                "llama.attention.layer_norm_rms_epsilon",
                |x| x > 0.0 && x < 1.0,
                "a float in (0, 1)",
            )?
            .unwrap_or(1e-5);
        let theta = self
            .meta_float("llama.rope.freq_base", |x| x > 0.0, "a finite float > 0")?
            .unwrap_or(10_000.0);
        let ctx = self
            .meta_uint("llama.context_length", 1, POSITIONS)?
            .unwrap_or(4096);
        Ok(llama::Config {
            vocab_size: vocab as i64,
            hidden_size: hidden as i64,
            intermediate_size: ffn as i64,
            num_layers: layers as usize,
            num_heads: heads as i64,
            num_kv_heads: kv as i64,
            head_dim: head_dim as i64,
            rms_norm_eps: eps,
            rope_theta: theta,
            tie_word_embeddings: self.info("output.weight").is_none(),
            attention_bias: self.info("blk.0.attn_q.bias").is_some(),
            mlp_bias: self.info("blk.0.ffn_up.bias").is_some(),
            max_position_embeddings: ctx as usize,
        })
    }

    /// Every tensor dequantized to f32 under its Hugging Face name, with q/k rows put back
    /// in transformers' order.
    ///
    /// # Errors
    /// A tensor name this reader does not know, unsupported quantization, unreadable data.
    pub fn hf_tensors(
        &self,
        config: &llama::Config,
    ) -> Result<BTreeMap<String, Tensor>, TrainError> {
        let mut out = BTreeMap::new();
        for t in &self.tensors {
            let name = hf_name(&t.name).ok_or_else(|| {
                TrainError::Invalid(format!(
                    "{}: GGUF tensor {} has no Hugging Face llama counterpart",
                    self.path.display(),
                    t.name
                ))
            })?;
            let mut w = self.read_f32(t)?;
            // q rows are permuted per query head, k rows per key/value head (llama.cpp's
            // convert_hf_to_gguf.py `permute`), biases as the weights' rows.
            let heads = if t.name.contains("attn_q.") {
                Some(config.num_heads)
            } else if t.name.contains("attn_k.") {
                Some(config.num_kv_heads)
            } else {
                None
            };
            if let Some(h) = heads {
                w = unpermute_rows(&w, h).map_err(|_| TrainError::Shape {
                    path: self.path.clone(),
                    name: t.name.clone(),
                    expected: vec![h * config.head_dim, config.hidden_size],
                    found: w.size(),
                })?;
            }
            out.insert(name, w);
        }
        Ok(out)
    }
}

/// A metadata value for a message: scalars as they are, strings and arrays shortened.
fn short(v: &Value) -> String {
    match v {
        Value::String(s) => {
            let cut: String = s.chars().take(40).collect();
            format!("{cut:?}")
        }
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
    }
}

/// Loads a llama-architecture GGUF file as a [`Llama`] in `kind` on `device`.
///
/// # Errors
/// See [`GgufFile::open`], [`GgufFile::llama_config`], [`GgufFile::hf_tensors`],
/// [`Llama::load`].
pub fn load_llama(path: &Path, kind: Kind, device: Device) -> Result<Llama, TrainError> {
    let file = GgufFile::open(path)?;
    let config = file.llama_config()?;
    let tensors = file.hf_tensors(&config)?;
    let mut w = Weights::from_tensors(path.to_path_buf(), tensors, kind, device);
    Llama::load(config, &mut w)
}

/// The token strings of the GGUF vocabulary.
fn tokens(file: &GgufFile) -> Result<Vec<&str>, TrainError> {
    let bad = |m: &str| TrainError::Config {
        path: file.path.clone(),
        message: m.to_string(),
    };
    file.get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("GGUF has no tokenizer.ggml.tokens"))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| bad("GGUF tokenizer.ggml.tokens holds a non-string"))
        })
        .collect()
}

/// llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
/// (absent: all normal).
fn token_types(file: &GgufFile, n: usize) -> Result<Vec<i64>, TrainError> {
    let key = "tokenizer.ggml.token_type";
    let Some(v) = file.get(key) else {
        return Ok(vec![1; n]);
    };
    let allowed = format!("an array of {n} integer token types, one per token");
    match v.as_array() {
        Some(a) if a.len() == n => a
            .iter()
            .map(|t| {
                t.as_u64()
                    .map(|t| t as i64)
                    .ok_or_else(|| file.bad_meta(key, v, &allowed))
            })
            .collect(),
        _ => Err(file.bad_meta(key, v, &allowed)),
    }
}

fn added_token(id: usize, content: &str, special: bool) -> serde_json::Value {
    serde_json::json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special
    })
}

/// A Hugging Face `tokenizer.json` (as a JSON value) equivalent to the tokenizer that
/// llama.cpp builds from the GGUF metadata:
/// - `gpt2` models: byte-level BPE with the file's merges; the pre-tokenizer follows
///   `tokenizer.ggml.pre` (`gpt-2`/`default`: GPT-2's regex; `smollm` and the other
///   StarCoder-style ones: digits split one by one, then GPT-2's regex).
/// - `llama` models (SentencePiece): BPE whose merges are derived from the vocabulary and
///   its scores (a merge's rank is the score of the merged piece, as SentencePiece's BPE
///   ranks them), byte fallback to `<0xXX>`, a leading `▁` when `add_space_prefix`.
///
/// Control and user-defined tokens are added tokens, so `<|im_start|>` in a chat template
/// is one token.
///
/// # Errors
/// Missing tokenizer metadata, an unsupported tokenizer model or pre-tokenizer.
pub fn tokenizer_json(file: &GgufFile) -> Result<serde_json::Value, TrainError> {
    let bad = |m: String| TrainError::Config {
        path: file.path.clone(),
        message: m,
    };
    let model = file
        .meta_str("tokenizer.ggml.model")?
        .ok_or_else(|| bad("GGUF has no tokenizer.ggml.model".into()))?;
    let toks = tokens(file)?;
    let types = token_types(file, toks.len())?;
    let mut vocab = serde_json::Map::new();
    for (i, t) in toks.iter().enumerate() {
        // Duplicate strings (rare, unused slots) keep their first id, as llama.cpp's map does.
        vocab
            .entry(t.to_string())
            .or_insert(serde_json::Value::from(i));
    }
    let added: Vec<serde_json::Value> = toks
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
        .map(|(i, (t, &ty))| added_token(i, t, ty == 3))
        .collect();
    match model {
        "gpt2" => {
            let merges: Vec<serde_json::Value> = file
                .get("tokenizer.ggml.merges")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("GGUF gpt2 tokenizer has no tokenizer.ggml.merges".into()))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(serde_json::Value::from)
                        .ok_or_else(|| bad("GGUF merges hold a non-string".into()))
                })
                .collect::<Result<_, _>>()?;
            let pre = file.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");
            let digits = match pre {
                "default" | "gpt-2" | "gpt2" => false,
                "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => true,
                other => {
                    return Err(bad(format!(
                        "GGUF tokenizer.ggml.pre {other:?} is not supported (supported: default, gpt-2, smollm, starcoder)"
                    )))
                }
            };
            Ok(byte_level_bpe_json(vocab, merges, added, digits))
        }
        "llama" => {
            let scores: Vec<f64> = match file.get("tokenizer.ggml.scores").and_then(Value::as_array)
            {
                Some(a) if a.len() == toks.len() => a
                    .iter()
                    .map(|v| {
                        v.as_f64().filter(|x| !x.is_nan()).ok_or_else(|| {
                            bad(
                                "GGUF tokenizer.ggml.scores holds a value that is not a number"
                                    .into(),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(bad(
                    "GGUF llama tokenizer has no tokenizer.ggml.scores of the vocabulary's length"
                        .into(),
                )),
            };
            let merges = spm_merges(&toks, &types, &scores);
            let unk = file
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(Value::as_u64)
                .and_then(|i| toks.get(i as usize).copied())
                .unwrap_or("<unk>");
            let add_space = file
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let mut norms = Vec::new();
            if add_space {
                norms.push(serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            norms.push(serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
            let mut decoders = vec![
                serde_json::json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                serde_json::json!({"type": "ByteFallback"}),
                serde_json::json!({"type": "Fuse"}),
            ];
            if add_space {
                decoders.push(
                    serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}),
                );
            }
            Ok(serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": norms}, "pre_tokenizer": null, "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab, "merges": merges
                }
            }))
        }
        other => Err(bad(format!(
            "GGUF tokenizer.ggml.model {other:?} is not supported (supported: gpt2, llama)"
        ))),
    }
}

/// A byte-level BPE `tokenizer.json` (GPT-2's scheme): GPT-2's pre-tokenization regex,
/// preceded by splitting digits one by one when `split_digits` (StarCoder/SmolLM style).
/// `merges` are "a b" strings or [a, b] pairs; `added` are added-token objects.
pub fn byte_level_bpe_json(
    vocab: serde_json::Map<String, serde_json::Value>,
    merges: Vec<serde_json::Value>,
    added: Vec<serde_json::Value>,
    split_digits: bool,
) -> serde_json::Value {
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = if split_digits {
        serde_json::json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
    } else {
        byte_level
    };
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

/// An added-token object of `tokenizer.json`.
pub fn added_token_json(id: usize, content: &str, special: bool) -> serde_json::Value {
    added_token(id, content, special)
}

/// Merges of a SentencePiece BPE vocabulary: every split of a normal piece into two normal
/// pieces, ranked by the merged piece's score (highest first), ties by the pieces' ids.
fn spm_merges(toks: &[&str], types: &[i64], scores: &[f64]) -> Vec<serde_json::Value> {
    let normal = |i: usize| types.get(i).is_none_or(|&t| t == 1);
    let mut id: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, t) in toks.iter().enumerate() {
        if normal(i) {
            id.entry(t).or_insert(i);
        }
    }
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        if !normal(i) || t.chars().count() < 2 {
            continue;
        }
        for (cut, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(cut);
            if let (Some(&li), Some(&ri)) = (id.get(l), id.get(r)) {
                merges.push((scores[i], i, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges
        .into_iter()
        .map(|(_, _, l, r)| serde_json::Value::from(vec![toks[l], toks[r]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_matches_libtorch_on_every_finite_value() {
        let bits: Vec<u16> = (0..=u16::MAX)
            .filter(|b| (b >> 10) & 0x1f != 0x1f)
            .collect();
        let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let ours = dequantize(GgmlType::F16, &raw, bits.len());
        let t = Tensor::from_data_size(&raw, &[bits.len() as i64], Kind::Half).to_kind(Kind::Float);
        let theirs: Vec<f32> = Vec::try_from(t).expect("f32");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn bf16_matches_libtorch_on_every_finite_value() {
        let bits: Vec<u16> = (0..=u16::MAX).filter(|b| (b >> 7) & 0xff != 0xff).collect();
        let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let ours = dequantize(GgmlType::Bf16, &raw, bits.len());
        let t =
            Tensor::from_data_size(&raw, &[bits.len() as i64], Kind::BFloat16).to_kind(Kind::Float);
        let theirs: Vec<f32> = Vec::try_from(t).expect("f32");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn q4_0_and_q8_0_blocks_follow_ggml() {
        // d = 0.5 (f16 0x3800); nibbles 0..15 in the low halves, 15..0 in the high halves.
        let mut b = vec![0x00, 0x38];
        b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_0, &b, 32);
        assert_eq!(v[0], -4.0);
        assert_eq!(v[15], 3.5);
        assert_eq!(v[16], 3.5);
        assert_eq!(v[31], -4.0);
        let mut b = vec![0x00, 0x3c]; // d = 1
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let v = dequantize(GgmlType::Q8_0, &b, 32);
        assert_eq!(v, (0..32).map(|j| (j - 16) as f32).collect::<Vec<_>>());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, hd, inp) = (3i64, 8i64, 5i64);
        let w =
            Tensor::arange(heads * hd * inp, (Kind::Float, Device::Cpu)).reshape([heads * hd, inp]);
        // llama.cpp: reshape(h, 2, hd/2, in).swapaxes(1, 2).
        let permuted = w
            .reshape([heads, 2, hd / 2, inp])
            .transpose(1, 2)
            .reshape([heads * hd, inp]);
        assert!(unpermute_rows(&permuted, heads).expect("splits").equal(&w));
        let b = Tensor::arange(heads * hd, (Kind::Float, Device::Cpu));
        let pb = b
            .reshape([heads, 2, hd / 2])
            .transpose(1, 2)
            .reshape([heads * hd]);
        assert!(unpermute_rows(&pb, heads).expect("splits").equal(&b));
        assert!(unpermute_rows(&w.narrow(0, 0, 5), heads).is_err());
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }
}
