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
            let text = std::fs::read_to_string(&index).map_err(|source| TrainError::Io {
                path: index.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| TrainError::Config {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| TrainError::Config {
                    path: index.clone(),
                    message: "no \"weight_map\" object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|f| dir.join(f)).collect()
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
            let list = Tensor::read_safetensors(f).map_err(|source| TrainError::Torch {
                context: format!("reading {} (truncated or not safetensors?)", f.display()),
                source,
            })?;
            tensors.extend(list);
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
        Ok(t.to_kind(self.kind).to_device(self.device).detach())
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

/// The refusal of a pickle checkpoint (`pytorch_model.bin`, `.pt`, ...) at `path`, with
/// the one-line conversion to safetensors.
pub(crate) fn pickle_advice(path: &Path) -> TrainError {
    TrainError::Invalid(format!(
        "{}: a pickle checkpoint (pytorch_model.bin), which rankstab refuses to load (unpickling can run code). \
         Convert it once with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)",
        path.display()
    ))
}

/// Reads and parses a model directory's `config.json` into `T`; returns it with its path
/// (for the errors of the config's own checks).
///
/// # Errors
/// Unreadable or malformed file (named).
pub fn read_hf_config<T: serde::de::DeserializeOwned>(
    dir: &Path,
) -> Result<(T, PathBuf), TrainError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io {
        path: path.clone(),
        source,
    })?;
    let cfg = serde_json::from_str(&text).map_err(|e| TrainError::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok((cfg, path))
}

/// Loads an architecture from a Hugging Face model directory: its `config.json` read as
/// `H`, checked into the runtime configuration by `into_config`, and the model built by
/// `load` from the directory's safetensors.
///
/// # Errors
/// See [`read_hf_config`], [`Weights::from_dir`], and those of `into_config` and `load`.
pub fn load_dir<H, C, M>(
    dir: &Path,
    kind: Kind,
    device: Device,
    into_config: impl FnOnce(H, &Path) -> Result<C, TrainError>,
    load: impl FnOnce(C, &mut Weights) -> Result<M, TrainError>,
) -> Result<M, TrainError>
where
    H: serde::de::DeserializeOwned,
{
    let (hf, cfg_path): (H, _) = read_hf_config(dir)?;
    let config = into_config(hf, &cfg_path)?;
    let mut w = Weights::from_dir(dir, kind, device)?;
    load(config, &mut w)
}
