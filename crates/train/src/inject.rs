//! Which modules of a model get adapters, and putting them there: the one place that walks
//! a model's linears to name them (`module_and_layer`), check target module names and
//! ranks against them, and attach adapters, fresh for training ([`attach`]) or read from
//! a PEFT directory ([`attach_peft`]). `lora` owns one adapter and its file format; the
//! trainer owns the loop.
use crate::lora::{check_rank, load_peft, LoraAdapter, LoraConfig, PeftAdapterConfig};
use crate::peft::ModuleMatcher;
use crate::{CausalLm, TrainError};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tch::{nn, Tensor};

/// Module name (last path part) and layer index of a Hugging Face module path.
///
/// ```
/// use rankstab_train::inject::module_and_layer;
/// assert_eq!(module_and_layer("model.layers.3.self_attn.q_proj"), ("q_proj".to_string(), 3));
/// assert_eq!(module_and_layer("transformer.h.11.mlp.fc_in"), ("fc_in".to_string(), 11));
/// ```
pub fn module_and_layer(path: &str) -> (String, u32) {
    let parts: Vec<&str> = path.split('.').collect();
    let layer = parts
        .iter()
        .find_map(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    (parts.last().copied().unwrap_or_default().to_string(), layer)
}

/// The seed of one adapter's A: FNV-1a of the module path, mixed with the run's seed.
fn adapter_seed(seed: u64, path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in path.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The distinct module names of the model's adaptable linears, sorted (q_proj, ...).
fn module_names(model: &mut CausalLm) -> Vec<String> {
    let mut names: Vec<String> = model
        .linears_mut()
        .into_iter()
        .map(|(p, _)| module_and_layer(&p).0)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Checks that every name of `modules` is a module of the model.
fn check_modules(model: &mut CausalLm, modules: &[String]) -> Result<(), TrainError> {
    let available = module_names(model);
    match modules.iter().find(|t| !available.contains(t)) {
        Some(t) => Err(TrainError::Invalid(format!(
            "target module {t:?} does not exist in this model (available: {})",
            available.join(", ")
        ))),
        None => Ok(()),
    }
}

/// The module paths that adapters of rank `rank` on `modules` (empty: every attention
/// and MLP linear) go to, checked without creating any adapter: every named module
/// exists, and the rank fits every targeted layer.
///
/// # Errors
/// Unknown target module names (the available ones listed), a rank that does not fit
/// (the layer named).
pub fn targets(
    model: &mut CausalLm,
    modules: &[String],
    rank: usize,
) -> Result<Vec<String>, TrainError> {
    check_modules(model, modules)?;
    let mut paths = Vec::new();
    for (path, lin) in model.linears_mut() {
        let (module, _) = module_and_layer(&path);
        if !modules.is_empty() && !modules.contains(&module) {
            continue;
        }
        let (out, inp) = lin.dims();
        check_rank(rank, inp, out).map_err(|e| e.within(&path))?;
        paths.push(path);
    }
    Ok(paths)
}

/// Attaches fresh adapters (variables of `vs`, under the module paths) to the linears of
/// `modules` (empty: all), replacing any there; returns the adapted module paths. Each
/// A is drawn from its own stream, seeded by `seed` and the module's path only, so that
/// it does not depend on which other modules are adapted.
///
/// # Errors
/// Unknown target module names (the available ones listed), a rank that does not fit.
pub fn attach(
    model: &mut CausalLm,
    vs: &nn::VarStore,
    lora: &LoraConfig,
    modules: &[String],
    seed: u64,
) -> Result<Vec<String>, TrainError> {
    let paths = targets(model, modules, lora.rank)?;
    for (_, lin) in model.linears_mut() {
        lin.adapter = None;
        lin.capture = None;
    }
    for (path, lin) in model.linears_mut() {
        if !paths.contains(&path) {
            continue;
        }
        let vpath = path.split('.').fold(vs.root(), |p, part| p / part);
        let (out, inp) = lin.dims();
        let lora = LoraConfig {
            seed: Some(adapter_seed(seed, &path)),
            ..lora.clone()
        };
        let ad = LoraAdapter::new(&vpath, inp, out, &lora).map_err(|e| e.within(&path))?;
        lin.adapter = Some(ad);
        lin.capture = Some(RefCell::new(Default::default()));
    }
    Ok(paths)
}

/// The attached adapters with their module paths, in the model's order.
pub fn adapters(model: &mut CausalLm) -> Vec<(String, &LoraAdapter)> {
    model
        .linears_mut()
        .into_iter()
        .filter_map(|(path, lin)| lin.adapter.as_ref().map(|ad| (path, ad)))
        .collect()
}

/// Removes every adapter (and probe) from the model.
pub fn detach_all(model: &mut CausalLm) {
    for (_, lin) in model.linears_mut() {
        lin.adapter = None;
        lin.capture = None;
    }
}

/// One module an adapter directory adapts, with its own rank, alpha and scaling (PEFT's
/// `rank_pattern` and `alpha_pattern` give each module its own).
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedModule {
    /// Module path (model.layers.0.self_attn.q_proj, ...).
    pub path: String,
    /// Its rank.
    pub r: usize,
    /// Its PEFT alpha (`lora_alpha` or its `alpha_pattern` entry).
    pub alpha: f64,
    /// Its gamma ([`PeftAdapterConfig::scaling_at`]).
    pub scaling: f64,
}

/// What [`attach_peft`] attached.
#[derive(Debug, Clone)]
pub struct AttachedPeft {
    /// The adapter's `adapter_config.json`.
    pub config: PeftAdapterConfig,
    /// The adapted module paths, in the model's order.
    pub paths: Vec<String>,
    /// gamma_r of the config's own r and alpha ([`PeftAdapterConfig::scaling`]); modules
    /// of a `rank_pattern` or `alpha_pattern` have their own (`modules`).
    pub scaling: f64,
    /// Every adapted module with its rank, alpha and scaling, in the model's order.
    pub modules: Vec<AttachedModule>,
}

/// Checks that `dir` holds the two files of a PEFT adapter.
fn check_peft_dir(dir: &Path) -> Result<(), TrainError> {
    if !dir.is_dir() {
        return Err(TrainError::Invalid(format!(
            "{}: not a PEFT adapter directory (no such directory)",
            dir.display()
        )));
    }
    // exists(), not is_file(): a device or FIFO in its place is refused by the bounded
    // read, with that reason.
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        if !dir.join(f).exists() {
            return Err(TrainError::Invalid(format!(
                "{}: not a PEFT adapter directory (no {f})",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Checks a PEFT adapter directory without a model: both files are there and
/// `adapter_config.json` passes [`crate::peft::validate_config_file`]. What `eval`, `audit`,
/// `generate` and `train --init-adapter` run before loading the model.
///
/// # Errors
/// A missing file; every error of [`crate::peft::validate_config_file`].
pub fn check_peft(dir: &Path) -> Result<PeftAdapterConfig, TrainError> {
    check_peft_dir(dir)?;
    crate::peft::validate_config_file(&dir.join("adapter_config.json"))
}

/// The modules of the model that `config` targets (PEFT's rules, [`crate::peft`]), each
/// with its rank, alpha and scaling, in the model's order.
///
/// # Errors
/// A target module name that matches no linear layer of the model, or a config that
/// targets none (the available names listed).
pub fn peft_targets(
    model: &mut CausalLm,
    config: &PeftAdapterConfig,
    cfg_path: &Path,
) -> Result<Vec<AttachedModule>, TrainError> {
    let matcher = ModuleMatcher::new(cfg_path, config)?;
    let paths: Vec<String> = model.linears_mut().into_iter().map(|(p, _)| p).collect();
    if let Some(names) = matcher.names() {
        if let Some(t) = names.iter().find(|t| {
            !paths
                .iter()
                .any(|p| p == *t || p.ends_with(&format!(".{t}")))
        }) {
            let t = t.clone();
            return Err(TrainError::Invalid(format!(
                "{}: target module {t:?} does not exist in this model (available: {})",
                cfg_path.display(),
                module_names(model).join(", ")
            )));
        }
    }
    let out: Vec<AttachedModule> = paths
        .iter()
        .filter(|p| matcher.targets(p))
        .map(|p| {
            let (r, alpha) = matcher.rank_alpha(p);
            AttachedModule {
                path: p.clone(),
                r,
                alpha,
                scaling: config.scaling_at(r, alpha),
            }
        })
        .collect();
    if out.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: target_modules (with layers_to_transform) matches no linear layer of this model (available: {})",
            cfg_path.display(),
            module_names(model).join(", ")
        )));
    }
    Ok(out)
}

/// Attaches the adapters of a PEFT adapter directory (as `rankstab train` writes into
/// `RUN/adapters`, or peft's `save_pretrained`) to the model's linear layers, unmerged,
/// with PEFT's scaling per module ([`PeftAdapterConfig::scaling_at`] of its rank and alpha,
/// `rank_pattern` and `alpha_pattern` included); `A` and `B` take the kind and device of
/// each layer's weight. Nothing is attached unless everything fits.
///
/// # Errors
/// A missing `adapter_config.json` or `adapter_model.safetensors`, a malformed config or
/// PEFT options rankstab does not implement (DoRA, biases, ...), a target module or module
/// path the model lacks, a module the config targets without tensors or tensors of a module
/// it does not target, a tensor whose shape does not fit its layer (named, with the
/// expected and found shapes), a layer that already has an adapter.
pub fn attach_peft(model: &mut CausalLm, dir: &Path) -> Result<AttachedPeft, TrainError> {
    check_peft(dir)?;
    let cfg_path = dir.join("adapter_config.json");
    let file = dir.join("adapter_model.safetensors");
    let (config, tensors) = load_peft(dir)?;
    if tensors.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: holds no lora_A / lora_B tensors",
            file.display()
        )));
    }
    let modules = peft_targets(model, &config, &cfg_path)?;
    let layer_paths: BTreeSet<String> = model.linears_mut().into_iter().map(|(p, _)| p).collect();
    let mut by_path: BTreeMap<String, (Tensor, Tensor)> =
        tensors.into_iter().map(|(p, a, b)| (p, (a, b))).collect();
    if let Some(p) = by_path.keys().find(|p| !layer_paths.contains(*p)) {
        let example = layer_paths.iter().next().cloned().unwrap_or_default();
        return Err(TrainError::Invalid(format!(
            "{}: module {p} (tensor base_model.model.{p}.lora_A.weight) does not exist in this model (its layers are named like {example})",
            file.display()
        )));
    }
    let targeted: BTreeMap<&str, &AttachedModule> =
        modules.iter().map(|m| (m.path.as_str(), m)).collect();
    if let Some(p) = by_path.keys().find(|p| !targeted.contains_key(p.as_str())) {
        return Err(TrainError::Invalid(format!(
            "{}: holds tensors for {p}, which {} does not target (target_modules, layers_to_transform)",
            file.display(),
            cfg_path.display()
        )));
    }
    if let Some(m) = modules.iter().find(|m| !by_path.contains_key(&m.path)) {
        return Err(TrainError::Invalid(format!(
            "{}: {} targets {} but the file has no base_model.model.{}.lora_A.weight",
            file.display(),
            cfg_path.display(),
            m.path,
            m.path
        )));
    }
    for (path, lin) in model.linears_mut() {
        let Some((a, b)) = by_path.get(&path) else {
            continue;
        };
        let r = targeted[path.as_str()].r as i64;
        let (out, inp) = lin.dims();
        for (t, name, want) in [(a, "lora_A", vec![r, inp]), (b, "lora_B", vec![out, r])] {
            if t.size() != want {
                return Err(TrainError::Invalid(format!(
                    "{}: tensor base_model.model.{path}.{name}.weight has shape {:?}, expected {want:?} (the layer is {out} x {inp}, r = {r})",
                    file.display(),
                    t.size()
                )));
            }
        }
        if lin.adapter.is_some() {
            return Err(TrainError::Invalid(format!(
                "{path} already has an adapter"
            )));
        }
    }
    let mut paths = Vec::new();
    for (path, lin) in model.linears_mut() {
        let Some((a, b)) = by_path.remove(&path) else {
            continue;
        };
        let (kind, device) = (lin.weight.kind(), lin.weight.device());
        let ad = LoraAdapter::from_tensors(
            a.to_kind(kind).to_device(device),
            b.to_kind(kind).to_device(device),
            targeted[path.as_str()].scaling,
            config.lora_dropout,
        )
        .map_err(|e| e.within(&path))?;
        lin.adapter = Some(ad);
        paths.push(path);
    }
    Ok(AttachedPeft {
        scaling: config.scaling(),
        config,
        paths,
        modules,
    })
}
