//! Checkpoint tensors by Hugging Face name: `model.safetensors` or sharded files listed in
//! `model.safetensors.index.json`, in f32, f16 or bf16 (converted to the model's dtype).
//! Pickle checkpoints (`pytorch_model.bin`) are refused: nothing in them is executed.
use crate::linear::Linear;
use crate::TrainError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Tensors of a checkpoint, taken out one by one with shape checks.
pub struct Weights {
    source: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    kind: Kind,
    device: Device,
}

impl Weights {
    /// Reads every safetensors file of the model directory `dir`.
    ///
    /// # Errors
    /// No safetensors file (with advice for pickle checkpoints), unreadable or truncated
    /// files, a malformed index.
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self, TrainError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_files(dir, &index)?
        } else if dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists()
        {
            return Err(pickle_advice(dir));
        } else {
            return Err(TrainError::Invalid(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        };
        let mut tensors = BTreeMap::new();
        for f in &files {
            for (name, t) in read_safetensors(f, MAX_WEIGHT_FILE_BYTES)? {
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(TrainError::Invalid(format!(
                        "{}: tensor {name} is also in another shard (a damaged index or checkpoint)",
                        f.display()
                    )));
                }
            }
        }
        Ok(Self {
            source: dir.to_path_buf(),
            tensors,
            kind,
            device,
        })
    }

    /// Weights from named tensors already in memory (GGUF loading, tests).
    pub fn from_tensors(
        source: PathBuf,
        tensors: BTreeMap<String, Tensor>,
        kind: Kind,
        device: Device,
    ) -> Self {
        Self {
            source,
            tensors,
            kind,
            device,
        }
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes tensor `name`, checking its shape, converted to the model's dtype and device.
    ///
    /// # Errors
    /// Missing tensor or wrong shape (both named).
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor, TrainError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| TrainError::MissingTensor {
                path: self.source.clone(),
                name: name.to_string(),
            })?;
        if t.size() != shape {
            return Err(TrainError::Shape {
                path: self.source.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.size(),
            });
        }
        let t = t.to_kind(self.kind);
        check_finite(&t).map_err(|bad| {
            TrainError::Invalid(format!(
                "{}: tensor {name} holds {bad} NaN or infinite value(s) of {}: a damaged checkpoint (only finite weights are loaded)",
                self.source.display(),
                t.numel()
            ))
        })?;
        Ok(t.to_device(self.device).detach())
    }

    /// Takes the linear layer `name`: `name.weight` (out x in) and, with `bias`,
    /// `name.bias` (out).
    ///
    /// # Errors
    /// A missing tensor or a wrong shape (both named).
    pub fn linear(
        &mut self,
        name: &str,
        out: i64,
        inp: i64,
        bias: bool,
    ) -> Result<Linear, TrainError> {
        let weight = self.take(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(self.take(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }
}

/// Ok when every value of `t` is finite, else the number that are not.
pub(crate) fn check_finite(t: &Tensor) -> Result<(), i64> {
    if !t.is_floating_point() {
        return Ok(());
    }
    let bad = t.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
    if bad == 0 {
        Ok(())
    } else {
        Err(bad)
    }
}

/// The shard files of `model.safetensors.index.json`: every value of its `weight_map`, a
/// file name inside the model directory (names leading outside it are refused).
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let cfg = ConfigJson::read(index)?;
    let map = match cfg.get("weight_map") {
        Some(serde_json::Value::Object(m)) => m,
        Some(v) => {
            return Err(cfg.bad(
                "weight_map",
                kind_of(v),
                "an object of tensor name -> shard file",
            ))
        }
        None => {
            return Err(TrainError::Config {
                path: index.to_path_buf(),
                message: "no \"weight_map\" object".into(),
            })
        }
    };
    let mut names = Vec::new();
    for (tensor, f) in map {
        let f = f
            .as_str()
            .ok_or_else(|| cfg.bad(&format!("weight_map[{tensor:?}]"), f, "a shard file name"))?;
        names.push(f.to_string());
    }
    names.sort();
    names.dedup();
    names
        .iter()
        .map(|f| Ok(rankstab_records::guard::confined(dir, f)?))
        .collect()
}

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct SafeEntry {
    /// Tensor name.
    pub name: String,
    /// Its dtype.
    pub kind: Kind,
    /// Its shape.
    pub shape: Vec<i64>,
    /// First byte of its data (from the start of the data section).
    pub begin: u64,
    /// One past its last byte.
    pub end: u64,
}

/// The tch kind and element size of a safetensors dtype.
fn safetensors_kind(dtype: &str) -> Option<(Kind, u64)> {
    Some(match dtype {
        "F64" => (Kind::Double, 8),
        "F32" => (Kind::Float, 4),
        "F16" => (Kind::Half, 2),
        "BF16" => (Kind::BFloat16, 2),
        "I64" => (Kind::Int64, 8),
        "I32" => (Kind::Int, 4),
        "I16" => (Kind::Int16, 2),
        "I8" => (Kind::Int8, 1),
        "U8" => (Kind::Uint8, 1),
        "BOOL" => (Kind::Bool, 1),
        _ => return None,
    })
}

/// Parses a safetensors header (the JSON after the 8-byte length) of a file whose data
/// section has `data_len` bytes: every tensor's dtype and shape, and its data range inside
/// the data section, of exactly the shape's size, not overlapping another's. Entries come
/// back in data order.
///
/// # Errors
/// Malformed JSON, an unknown dtype, a range outside the data or of the wrong size,
/// overlapping tensors (each named with the file and the tensor).
pub fn parse_safetensors_header(
    path: &Path,
    header: &[u8],
    data_len: u64,
) -> Result<Vec<SafeEntry>, TrainError> {
    let bad = |message: String| TrainError::Config {
        path: path.to_path_buf(),
        message,
    };
    let v: serde_json::Value = serde_json::from_slice(header).map_err(|e| {
        bad(format!(
            "not a safetensors file: its header is not JSON ({e})"
        ))
    })?;
    let serde_json::Value::Object(map) = v else {
        return Err(bad(
            "not a safetensors file: its header is not a JSON object".into(),
        ));
    };
    let mut out = Vec::with_capacity(map.len());
    for (name, info) in &map {
        if name == "__metadata__" {
            continue;
        }
        let t = |m: &str| bad(format!("safetensors tensor {name}: {m}"));
        let serde_json::Value::Object(o) = info else {
            return Err(t("not an object of dtype, shape, data_offsets"));
        };
        if let Some(k) = o
            .keys()
            .find(|k| !["dtype", "shape", "data_offsets"].contains(&k.as_str()))
        {
            return Err(t(&format!("unknown field {k:?}")));
        }
        let dtype = o.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let (kind, size) = safetensors_kind(dtype).ok_or_else(|| {
            t(&format!(
                "dtype {dtype:?} is not supported (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)"
            ))
        })?;
        let shape: Vec<u64> = o
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| {
                a.iter()
                    .map(serde_json::Value::as_u64)
                    .collect::<Option<Vec<_>>>()
            })
            .filter(|s| s.len() <= 8)
            .ok_or_else(|| t("shape is not a list of at most 8 sizes"))?;
        let offsets: Vec<u64> = o
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| {
                a.iter()
                    .map(serde_json::Value::as_u64)
                    .collect::<Option<Vec<_>>>()
            })
            .filter(|s| s.len() == 2)
            .ok_or_else(|| t("data_offsets is not a pair of byte offsets"))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end || end > data_len {
            return Err(t(&format!(
                "data_offsets [{begin}, {end}] lie outside the file's {data_len} data bytes (truncated or damaged)"
            )));
        }
        let bytes = shape
            .iter()
            .try_fold(size, |a, &d| a.checked_mul(d))
            .filter(|&b| b == end - begin)
            .ok_or_else(|| {
                t(&format!(
                    "shape {shape:?} of {dtype} does not take the {} bytes of data_offsets [{begin}, {end}]",
                    end - begin
                ))
            })?;
        debug_assert_eq!(bytes, end - begin);
        out.push(SafeEntry {
            name: name.clone(),
            kind,
            shape: shape.iter().map(|&d| d as i64).collect(),
            begin,
            end,
        });
    }
    out.sort_by_key(|e| (e.begin, e.end));
    for w in out.windows(2) {
        if w[1].begin < w[0].end {
            return Err(bad(format!(
                "safetensors tensors {} and {} overlap (bytes {}..{} and {}..{}): a damaged file",
                w[0].name, w[1].name, w[0].begin, w[0].end, w[1].begin, w[1].end
            )));
        }
    }
    Ok(out)
}

/// Reads every tensor of a safetensors file: a regular file of at most `max_bytes`, whose
/// header length and every tensor's data range are checked against the file size before
/// anything is allocated ([`parse_safetensors_header`]); tensors are read one by one.
///
/// # Errors
/// Not a regular file, too large, truncated, a malformed header (named).
pub fn read_safetensors(path: &Path, max_bytes: u64) -> Result<Vec<(String, Tensor)>, TrainError> {
    use std::io::{Read, Seek, SeekFrom};
    let (mut f, len) = rankstab_records::guard::open_regular(path, max_bytes)?;
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |message: String| TrainError::Config {
        path: path.to_path_buf(),
        message,
    };
    if len < 8 {
        return Err(bad(format!(
            "not a safetensors file: {len} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_SAFETENSORS_HEADER || n > len - 8 {
        return Err(bad(format!(
            "not a safetensors file (or truncated): a header of {n} bytes in a file of {len} (at most {MAX_SAFETENSORS_HEADER} and the file's size)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let entries = parse_safetensors_header(path, &header, len - 8 - n)?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        f.seek(SeekFrom::Start(8 + n + e.begin)).map_err(io)?;
        let mut raw = vec![0u8; (e.end - e.begin) as usize];
        f.read_exact(&mut raw).map_err(io)?;
        let t = Tensor::f_from_data_size(&raw, &e.shape, e.kind).map_err(|source| {
            TrainError::Torch {
                context: format!("{}: tensor {}", path.display(), e.name),
                source,
            }
        })?;
        out.push((e.name, t));
    }
    Ok(out)
}

/// The refusal of a pickle checkpoint (`pytorch_model.bin`, `.pt`, ...) at `path`, with
/// the one-line conversion to safetensors.
pub(crate) fn pickle_advice(path: &Path) -> TrainError {
    TrainError::Invalid(format!(
        "{}: a pickle checkpoint (pytorch_model.bin), which rankstab refuses to load (unpickling can run code). \
         Convert it once with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)",
        path.display()
    ))
}

/// Largest JSON configuration file read (config.json, generation_config.json,
/// tokenizer_config.json, adapter_config.json, model.safetensors.index.json): real ones are
/// a few KiB (an index of a 70B model is ~100 KiB; a tokenizer_config.json with a long chat
/// template ~200 KiB). 16 MiB leaves room for any of them and keeps a hostile one from
/// filling memory.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Largest tokenizer file read (tokenizer.json, vocab.json, merges.txt): real ones reach
/// ~20 MiB (Gemma's 256k-token tokenizer.json is 17 MiB). 256 MiB is far beyond them.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// Largest safetensors header (safetensors' own limit: 100 MB).
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Largest weight file read (one safetensors shard, a GGUF file, an adapter file): 1 TiB,
/// larger than any single file of a released model; the memory estimate refuses models
/// that do not fit long before this.
pub const MAX_WEIGHT_FILE_BYTES: u64 = 1 << 40;

/// Largest sizes accepted in a model configuration: far beyond any released model (the
/// largest have ~130 layers, width 25k, MLP 100k, vocabularies of 256k, contexts of 10M),
/// small enough that no product of them overflows or allocates absurdly before the
/// memory estimate is checked.
pub mod bounds {
    /// Layers.
    pub const LAYERS: u64 = 4096;
    /// Width, MLP width, heads x head size.
    pub const WIDTH: u64 = 1 << 20;
    /// Heads (query or key/value).
    pub const HEADS: u64 = 4096;
    /// Head size.
    pub const HEAD_DIM: u64 = 4096;
    /// Vocabulary.
    pub const VOCAB: u64 = 1 << 24;
    /// Context length.
    pub const POSITIONS: u64 = 1 << 30;
}

/// A JSON configuration file (config.json, a GGUF's metadata mapped to fields) whose
/// fields are read one by one with their type and range checked: a value of the wrong type
/// or out of range is an error naming the file, the field, the value and what is allowed;
/// an absent (or null) field takes the default the caller gives (transformers' own).
#[derive(Debug, Clone)]
pub struct ConfigJson {
    /// The file.
    pub path: PathBuf,
    /// Its top-level object.
    pub map: serde_json::Map<String, serde_json::Value>,
}

impl ConfigJson {
    /// Reads `path` (a regular file of at most [`MAX_CONFIG_BYTES`]) as a JSON object.
    ///
    /// # Errors
    /// Not a regular file, too large, not JSON, not an object (named).
    pub fn read(path: &Path) -> Result<Self, TrainError> {
        let text = rankstab_records::guard::read_regular_text(path, MAX_CONFIG_BYTES)?;
        Self::parse(path, &text)
    }

    /// Parses the text of a JSON configuration file named `path`.
    ///
    /// # Errors
    /// Not JSON, not an object.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TrainError> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| TrainError::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        match v {
            serde_json::Value::Object(map) => Ok(Self {
                path: path.to_path_buf(),
                map,
            }),
            other => Err(TrainError::Config {
                path: path.to_path_buf(),
                message: format!("not a JSON object (found {})", kind_of(&other)),
            }),
        }
    }

    /// An error about `field` holding `value`.
    pub fn bad(&self, field: &str, value: impl std::fmt::Display, allowed: &str) -> TrainError {
        field_error(&self.path, field, value, allowed)
    }

    /// The value of `field`, None when absent or null.
    pub fn get(&self, field: &str) -> Option<&serde_json::Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// An integer field in `lo..=hi`; None when absent or null.
    ///
    /// # Errors
    /// Another type, a fraction, a value out of range.
    pub fn uint(&self, field: &str, lo: u64, hi: u64) -> Result<Option<u64>, TrainError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        let allowed = format!("an integer from {lo} to {hi}");
        match v.as_u64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(self.bad(field, v, &allowed)),
        }
    }

    /// A finite number field accepted by `ok` (described by `allowed`); None when absent.
    ///
    /// # Errors
    /// Another type, a value `ok` refuses.
    pub fn float(
        &self,
        field: &str,
        ok: impl Fn(f64) -> bool,
        allowed: &str,
    ) -> Result<Option<f64>, TrainError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && ok(x) => Ok(Some(x)),
            _ => Err(self.bad(field, v, allowed)),
        }
    }

    /// A boolean field; None when absent or null.
    ///
    /// # Errors
    /// Another type.
    pub fn bool(&self, field: &str) -> Result<Option<bool>, TrainError> {
        match self.get(field) {
            None => Ok(None),
            Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(field, v, "true or false")),
        }
    }

    /// A string field; None when absent or null.
    ///
    /// # Errors
    /// Another type.
    pub fn str(&self, field: &str) -> Result<Option<&str>, TrainError> {
        match self.get(field) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(field, v, "a string")),
        }
    }

    /// A string field that must be one of `allowed` when present.
    ///
    /// # Errors
    /// Another type or another string.
    pub fn one_of(&self, field: &str, allowed: &[&str]) -> Result<Option<&str>, TrainError> {
        let s = self.str(field)?;
        if let Some(s) = s {
            if !allowed.contains(&s) {
                return Err(self.bad(
                    field,
                    format!("{s:?}"),
                    &format!("supported: {}", allowed.join(", ")),
                ));
            }
        }
        Ok(s)
    }
}

/// "a string", "an array", ... (for messages about a value of the wrong type).
pub(crate) fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// "PATH: FIELD = VALUE is not allowed (ALLOWED)": the one-line error about a field.
pub fn field_error(
    path: &Path,
    field: &str,
    value: impl std::fmt::Display,
    allowed: &str,
) -> TrainError {
    let mut v = value.to_string();
    if v.len() > 80 {
        let cut = (0..=80).rev().find(|&i| v.is_char_boundary(i)).unwrap_or(0);
        v.truncate(cut);
        v.push_str("...");
    }
    TrainError::Config {
        path: path.to_path_buf(),
        message: format!("{field} = {v} is not allowed ({allowed})"),
    }
}

/// Loads an architecture from a Hugging Face model directory: its `config.json` checked
/// into the runtime configuration by `into_config`, and the model built by `load` from
/// the directory's safetensors.
///
/// # Errors
/// See [`ConfigJson::read`], [`Weights::from_dir`], and those of `into_config` and `load`.
pub fn load_dir<C, M>(
    dir: &Path,
    kind: Kind,
    device: Device,
    into_config: impl FnOnce(&ConfigJson) -> Result<C, TrainError>,
    load: impl FnOnce(C, &mut Weights) -> Result<M, TrainError>,
) -> Result<M, TrainError> {
    let cfg = ConfigJson::read(&dir.join("config.json"))?;
    let config = into_config(&cfg)?;
    let mut w = Weights::from_dir(dir, kind, device)?;
    load(config, &mut w)
}
