//! Resumable checkpoints of a run directory: `checkpoint/` holds `state.json` (whatever
//! state the trainer needs besides tensors) and `tensors.safetensors`, replaced
//! atomically so that a run killed at any instant finds a whole checkpoint (the new one or
//! the previous one).
use crate::TrainError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

const CHECKPOINT: &str = "checkpoint";
const TMP: &str = "checkpoint.tmp";
const OLD: &str = "checkpoint.old";

/// The checkpoint directory of run directory `out`.
pub fn dir(out: &Path) -> PathBuf {
    out.join(CHECKPOINT)
}

/// Writes the checkpoint atomically: into `checkpoint.tmp/`, then renamed over the old one
/// (kept as `checkpoint.old/` for the instant between the two renames).
///
/// # Errors
/// I/O and libtorch errors (the file named).
pub fn save<S: Serialize>(
    out: &Path,
    state: &S,
    tensors: &[(String, Tensor)],
) -> Result<(), TrainError> {
    let dir = dir(out);
    let tmp = out.join(TMP);
    let old = out.join(OLD);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    Tensor::write_safetensors(tensors, tmp.join("tensors.safetensors"))
        .map_err(TrainError::torch(format!("writing {}", tmp.display())))?;
    rankstab_records::write_json_atomic(&tmp.join("state.json"), state)?;
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(TrainError::io(&old))?;
        }
        std::fs::rename(&dir, &old).map_err(TrainError::io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(TrainError::io(&tmp))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(TrainError::io(&old))?;
    }
    Ok(())
}

/// A loaded checkpoint: its state and its tensors by name.
pub type Loaded<S> = (S, HashMap<String, Tensor>);

/// The checkpoint of run directory `out`, if it has one.
///
/// # Errors
/// An unreadable state (named "checkpoint: ...") or tensor file.
pub fn load<S: DeserializeOwned>(out: &Path) -> Result<Option<Loaded<S>>, TrainError> {
    let mut dir = dir(out);
    if !dir.join("state.json").exists() {
        // Killed between the two renames of `save`.
        dir = out.join(OLD);
        if !dir.join("state.json").exists() {
            return Ok(None);
        }
    }
    let state: S = rankstab_records::read_json(&dir.join("state.json"))
        .map_err(|e| TrainError::from(e).within("checkpoint"))?;
    let path = dir.join("tensors.safetensors");
    let tensors = Tensor::read_safetensors(&path)
        .map_err(TrainError::torch(format!("reading {}", path.display())))?
        .into_iter()
        .collect();
    Ok(Some((state, tensors)))
}

/// Removes every checkpoint directory of `out` (when the run has ended).
pub fn remove(out: &Path) {
    for d in [CHECKPOINT, TMP, OLD] {
        let _ = std::fs::remove_dir_all(out.join(d));
    }
}

/// Copies the checkpoint tensor `name` into `dst`, checking that it is there and has
/// `dst`'s shape; `what` says what it is in errors ("adapter tensor", "optimizer state").
///
/// # Errors
/// A missing tensor or another shape ("checkpoint: adapter tensor p.3 is missing").
pub fn restore(
    tensors: &HashMap<String, Tensor>,
    what: &str,
    name: &str,
    dst: &mut Tensor,
) -> Result<(), TrainError> {
    let src = tensors
        .get(name)
        .ok_or_else(|| TrainError::Invalid(format!("checkpoint: {what} {name} is missing")))?;
    if src.size() != dst.size() {
        return Err(TrainError::Invalid(format!(
            "checkpoint: {what} {name} has shape {:?}, expected {:?}",
            src.size(),
            dst.size()
        )));
    }
    tch::no_grad(|| dst.copy_(src));
    Ok(())
}
