//! One entry point from a path to a model and its tokenizer: a Hugging Face model directory
//! (config.json, safetensors, tokenizer.json, optional tokenizer_config.json and
//! generation_config.json) or a llama-architecture GGUF file (weights, tokenizer and chat
//! template all from the file). Pickle checkpoints are refused, never opened.
use crate::gguf::{self, GgufFile, Value};
use crate::random::Shape;
use crate::text::TextTokenizer;
use crate::weights::{
    pickle_advice, ConfigJson, MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES, MAX_WEIGHT_FILE_BYTES,
};
use crate::{CausalLm, TrainError};
use rankstab_records::guard;
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// A model with its tokenizer and what generation needs.
pub struct Loaded {
    /// The model.
    pub model: CausalLm,
    /// Its tokenizer (checked to fit the embedding).
    pub tokenizer: TextTokenizer,
    /// Jinja chat template, when the checkpoint has one (instruct models).
    pub chat_template: Option<String>,
    /// Beginning-of-sequence token string, if known.
    pub bos_token: Option<String>,
    /// End-of-sequence token string, if known.
    pub eos_token: Option<String>,
    /// Ids that end a generation.
    pub eos_ids: Vec<i64>,
    /// Where it was loaded from.
    pub source: PathBuf,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("source", &self.source)
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

/// What a path holds, judged without loading it.
enum Format {
    Dir,
    Gguf,
}

/// A model directory, or a regular file starting with GGUF's magic; pickle checkpoints
/// and anything else are refused (devices and FIFOs without being opened).
fn format_of(path: &Path) -> Result<Format, TrainError> {
    if path.is_dir() {
        return Ok(Format::Dir);
    }
    if !path.exists() {
        return Err(TrainError::Invalid(format!(
            "{}: not a model directory or GGUF file (no such path)",
            path.display()
        )));
    }
    let (f, _) = guard::open_regular(path, MAX_WEIGHT_FILE_BYTES)?;
    let mut magic = [0u8; 4];
    let n = f
        .take(4)
        .read(&mut magic)
        .map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if n == 4 && &magic == b"GGUF" {
        return Ok(Format::Gguf);
    }
    // torch.save writes a zip (PK..) since 1.6 and a raw pickle (0x80 protocol) before.
    let name = path.file_name().and_then(|s| s.to_str()).unwrap_or("");
    if name.ends_with(".bin")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
        || magic.starts_with(b"PK")
        || magic[0] == 0x80
    {
        return Err(pickle_advice(path));
    }
    Err(TrainError::Invalid(format!(
        "{}: neither a model directory (config.json + safetensors) nor a GGUF file",
        path.display()
    )))
}

/// The shape of the model at `path` from its configuration only: a Hugging Face
/// directory's `config.json` (checked as loading checks it) or a GGUF file's header and
/// tensor directory. No weights are read, so this is cheap for any model size (memory
/// estimates, rank checks before a sweep).
///
/// # Errors
/// As [`load`] for everything but the weights and the tokenizer.
pub fn inspect(path: &Path) -> Result<Shape, TrainError> {
    match format_of(path)? {
        Format::Dir => {
            let cfg = ConfigJson::read(&path.join("config.json"))?;
            match cfg.str("model_type")? {
                Some("llama") => Ok(Shape::Llama(crate::llama::config_from_json(&cfg)?)),
                Some("gptj") => Ok(Shape::Gptj(crate::gptj::config_from_json(&cfg)?)),
                Some(other) => {
                    Err(cfg.bad("model_type", format!("{other:?}"), "supported: llama, gptj"))
                }
                None => Err(TrainError::Config {
                    path: cfg.path.clone(),
                    message: "no \"model_type\" (supported: llama, gptj)".into(),
                }),
            }
        }
        Format::Gguf => Ok(Shape::Llama(GgufFile::open(path)?.llama_config()?)),
    }
}

/// The shape of a model spec: [`inspect`] of its path, or its preset's shape.
///
/// # Errors
/// See [`inspect`]; an unknown preset; a spec with neither.
pub fn inspect_spec(spec: &crate::run::ModelSpec) -> Result<Shape, TrainError> {
    match (&spec.path, &spec.preset) {
        (Some(p), _) => inspect(p),
        (None, Some(name)) => crate::random::preset_shape(name),
        (None, None) => Err(TrainError::Invalid(format!(
            "model {:?} has neither a path nor a preset",
            spec.name
        ))),
    }
}

/// Loads a model directory or a GGUF file, with its tokenizer.
///
/// # Errors
/// Every loading error of the model (see [`CausalLm::from_dir`], [`gguf::load_llama`]),
/// a missing or malformed tokenizer, a tokenizer vocabulary larger than the embedding, a
/// pickle checkpoint, a file that is neither a directory nor GGUF.
pub fn load(path: &Path, kind: Kind, device: Device) -> Result<Loaded, TrainError> {
    match format_of(path)? {
        Format::Dir => load_dir(path, kind, device),
        Format::Gguf => load_gguf(path, kind, device),
    }
}

/// An optional JSON file of the model directory (absent: None), bounded.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TrainError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = guard::read_regular_text(path, MAX_CONFIG_BYTES)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TrainError::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })
}

/// A token given in tokenizer_config.json as a string or as `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    let v = v?;
    v.as_str().map(str::to_string).or_else(|| {
        v.get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string)
    })
}

fn ids_of(v: Option<&serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => {
            a.iter().filter_map(serde_json::Value::as_i64).collect()
        }
        _ => Vec::new(),
    }
}

fn load_dir(dir: &Path, kind: Kind, device: Device) -> Result<Loaded, TrainError> {
    let model = CausalLm::from_dir(dir, kind, device)?;
    let tok_path = dir.join("tokenizer.json");
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let tokenizer = if tok_path.exists() {
        TextTokenizer::from_file(&tok_path)?
    } else if vocab.exists() && merges.exists() {
        tokenizer_from_vocab_merges(&vocab, &merges)?
    } else {
        return Err(TrainError::Invalid(format!(
            "{}: no tokenizer.json (nor GPT-2-style vocab.json + merges.txt) in the model directory",
            dir.display()
        )));
    };
    tokenizer.check_fits(&tok_path, model.vocab_size())?;
    let tcfg = read_json(&dir.join("tokenizer_config.json"))?;
    let gcfg = read_json(&dir.join("generation_config.json"))?;
    let cfg = read_json(&dir.join("config.json"))?;
    let chat_template = tcfg
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(|t| t.as_str())
        .map(str::to_string);
    let bos_token = token_string(tcfg.as_ref().and_then(|c| c.get("bos_token")));
    let eos_token = token_string(tcfg.as_ref().and_then(|c| c.get("eos_token")));
    let mut eos_ids = ids_of(gcfg.as_ref().and_then(|c| c.get("eos_token_id")));
    if eos_ids.is_empty() {
        eos_ids = ids_of(cfg.as_ref().and_then(|c| c.get("eos_token_id")));
    }
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_id(t)) {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    Ok(Loaded {
        model,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        eos_ids,
        source: dir.to_path_buf(),
    })
}

fn load_gguf(path: &Path, kind: Kind, device: Device) -> Result<Loaded, TrainError> {
    let file = GgufFile::open(path)?;
    let config = file.llama_config()?;
    let json = gguf::tokenizer_json(&file)?;
    let tokenizer = TextTokenizer::from_json(&json.to_string(), path)?;
    // Checked before the (slow) dequantization: the tokenizer must fit the embedding.
    tokenizer.check_fits(path, config.vocab_size)?;
    let tensors = file.hf_tensors(&config)?;
    let mut w = crate::weights::Weights::from_tensors(path.to_path_buf(), tensors, kind, device);
    let model = CausalLm::Llama(crate::llama::Llama::load(config, &mut w)?);
    let meta_id = |k: &str| file.get(k).and_then(Value::as_u64).map(|v| v as i64);
    let token_of = |id: Option<i64>| id.and_then(|i| tokenizer.decode(&[i], true).ok());
    let eos_id = meta_id("tokenizer.ggml.eos_token_id");
    let mut eos_ids: Vec<i64> = eos_id.into_iter().collect();
    if let Some(e) = meta_id("tokenizer.ggml.eot_token_id") {
        if !eos_ids.contains(&e) {
            eos_ids.push(e);
        }
    }
    Ok(Loaded {
        chat_template: file
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
        bos_token: token_of(meta_id("tokenizer.ggml.bos_token_id")),
        eos_token: token_of(eos_id),
        eos_ids,
        model,
        tokenizer,
        source: path.to_path_buf(),
    })
}

/// A byte-level BPE tokenizer from GPT-2-style `vocab.json` + `merges.txt` (e.g. GPT-J
/// checkpoints without a tokenizer.json); `<|endoftext|>` and GPT-J's
/// `<|extratoken_N|>` entries become special added tokens.
///
/// # Errors
/// Unreadable or malformed files (named).
pub fn tokenizer_from_vocab_merges(
    vocab_path: &Path,
    merges_path: &Path,
) -> Result<TextTokenizer, TrainError> {
    let vocab = match read_tokenizer_json(vocab_path)? {
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => {
            return Err(TrainError::Config {
                path: vocab_path.to_path_buf(),
                message: "not a JSON object of token -> id".into(),
            })
        }
        None => {
            return Err(TrainError::Invalid(format!(
                "{}: no such file",
                vocab_path.display()
            )))
        }
    };
    let text = guard::read_regular_text(merges_path, MAX_TOKENIZER_BYTES)?;
    let merges: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(serde_json::Value::from)
        .collect();
    let mut added = Vec::new();
    for (tok, id) in &vocab {
        let special =
            tok == "<|endoftext|>" || (tok.starts_with("<|extratoken_") && tok.ends_with("|>"));
        if let (true, Some(id)) = (special, id.as_u64()) {
            added.push(gguf::added_token_json(id as usize, tok, true));
        }
    }
    let json = gguf::byte_level_bpe_json(vocab, merges, added, false);
    TextTokenizer::from_json(&json.to_string(), vocab_path)
}

/// A tokenizer-sized JSON file (vocab.json), bounded by [`MAX_TOKENIZER_BYTES`].
fn read_tokenizer_json(path: &Path) -> Result<Option<serde_json::Value>, TrainError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = guard::read_regular_text(path, MAX_TOKENIZER_BYTES)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TrainError::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })
}
