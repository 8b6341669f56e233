//! One training run's lifecycle, the same for `rankstab train` and every cell of a sweep:
//! the model to load ([`ModelSpec`] -> [`LoadedModel`]), where the run directory stands
//! ([`RunState`], from its manifest; [`prepare_out`] for a directory named by the user),
//! and the run itself with its manifest ([`run_dir`]: `running`, then `complete` or
//! `diverged`).
use crate::load::{load, tokenizer_from_vocab_merges};
use crate::text::TextTokenizer;
use crate::trainer::{train, TrainConfig, TrainOutcome};
use crate::{CausalLm, TrainError};
use rankstab_records::{
    read_json, write_json_atomic, Manifest, RunLock, RunStatus, SCHEMA_VERSION,
};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind};

/// A model to train: a checkpoint, or a random-initialised preset with a tokenizer (one
/// `[[models]]` entry of a sweep; `rankstab train --model`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Name in rows and cell names.
    pub name: String,
    /// A GGUF file or a Hugging Face model directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Or a random-initialised shape (`crate::random::PRESETS`).
    #[serde(default)]
    pub preset: Option<String>,
    /// Tokenizer of a preset: a tokenizer.json file, or a directory with tokenizer.json or
    /// vocab.json + merges.txt.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Seed of a preset's random weights.
    #[serde(default)]
    pub init_seed: i64,
    /// Ranks for this model (default: the sweep's).
    #[serde(default)]
    pub ranks: Option<Vec<usize>>,
    /// Steps for this model (default: the sweep's).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Seeds for this model (default: the sweep's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<Vec<u64>>,
    /// Optimizers for this model (default: the sweep's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizers: Option<Vec<rankstab_records::Optimizer>>,
    /// Adapted modules (default: every attention and MLP linear).
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// Learning-rate grids for this model (default: the sweep's `lrs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lrs: Option<crate::sweep::LrGrids>,
}

/// A model with its tokenizer and EOS string.
pub struct LoadedModel {
    /// The model.
    pub model: CausalLm,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// EOS token string, when known.
    pub eos_token: Option<String>,
}

/// Loads a model spec's model and tokenizer.
///
/// # Errors
/// Every loading error of the model or tokenizer.
pub fn load_model(spec: &ModelSpec, kind: Kind, device: Device) -> Result<LoadedModel, TrainError> {
    if let Some(path) = &spec.path {
        let l = load(path, kind, device)?;
        return Ok(LoadedModel {
            model: l.model,
            tokenizer: l.tokenizer,
            eos_token: l.eos_token,
        });
    }
    let preset = spec.preset.as_deref().unwrap_or_default();
    let model = crate::random::preset(preset, kind, device, spec.init_seed)?;
    let tp = spec.tokenizer.clone().unwrap_or_default();
    let tokenizer = if tp.is_dir() && tp.join("tokenizer.json").exists() {
        TextTokenizer::from_file(&tp.join("tokenizer.json"))?
    } else if tp.is_dir() {
        tokenizer_from_vocab_merges(&tp.join("vocab.json"), &tp.join("merges.txt"))?
    } else {
        TextTokenizer::from_file(&tp)?
    };
    tokenizer.check_fits(&tp, model.vocab_size())?;
    let eos_token = ["<|endoftext|>", "</s>"]
        .into_iter()
        .find(|t| tokenizer.token_id(t).is_some())
        .map(str::to_string);
    Ok(LoadedModel {
        model,
        tokenizer,
        eos_token,
    })
}

rankstab_records::named_enum! {
    /// Where a run directory stands (a sweep's `--list` prints it).
    RunState, "run state" {
        /// Not started.
        #[default]
        New => "new",
        /// Started and not finished (resumes from its checkpoint, if any).
        Partial => "partial",
        /// Finished.
        Complete => "complete",
        /// Ended by a non-finite loss.
        Diverged => "diverged",
    }
}

impl RunState {
    /// Where the run directory `dir` stands, from its manifest.
    pub fn of(dir: &Path) -> Self {
        match read_json::<Manifest>(&dir.join("manifest.json")) {
            Ok(m) => match m.status {
                RunStatus::Complete => RunState::Complete,
                RunStatus::Diverged => RunState::Diverged,
                RunStatus::Running => RunState::Partial,
            },
            Err(_) if dir.exists() => RunState::Partial,
            Err(_) => RunState::New,
        }
    }

    /// Whether the run has ended (complete or diverged): nothing is left to run.
    pub fn is_finished(self) -> bool {
        matches!(self, RunState::Complete | RunState::Diverged)
    }
}

/// How a run directory named by the user starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run (the directory is absent or empty).
    New,
    /// A run started before and not finished: it resumes (from its checkpoint, if any).
    Resume,
}

/// Checks that `out` can take a run: absent or empty (a new run), or holding an
/// unfinished run with its manifest (resumed).
///
/// # Errors
/// `out` holds a finished run, or is not empty and holds no run; `out` cannot be read.
pub fn prepare_out(out: &Path) -> Result<Start, TrainError> {
    if out.exists() && !out.is_dir() {
        return Err(TrainError::Invalid(format!(
            "{} is not a directory: --out takes a run directory (absent, empty, or an unfinished run)",
            out.display()
        )));
    }
    let existed = !rankstab_records::guard::is_empty_dir(out)?;
    if !existed {
        return Ok(Start::New);
    }
    match RunState::of(out) {
        state if state.is_finished() => Err(TrainError::Invalid(format!(
            "{} holds a finished run: choose another --out",
            out.display()
        ))),
        RunState::Partial if out.join("manifest.json").exists() => Ok(Start::Resume),
        _ => Err(TrainError::Invalid(format!(
            "{} exists and is not empty: choose another --out",
            out.display()
        ))),
    }
}

/// Checks that `out` can take a run ([`prepare_out`]) and takes its exclusive lock, held
/// for the run's life (pass it to [`run_dir`]); the OS releases it when the process ends.
/// A directory that holds something else is refused before the lock file is written into
/// it.
///
/// # Errors
/// As [`prepare_out`]; another process holds the lock (naming its pid and host).
pub fn claim_out(out: &Path) -> Result<(Start, RunLock), TrainError> {
    // A run that holds the lock is in use, whatever it has written so far (checked before
    // what the directory holds: a run starting has not written its manifest yet).
    rankstab_records::guard::refuse_if_held(out)?;
    prepare_out(out)?;
    let lock = RunLock::exclusive(out)?;
    // Checked again under the lock: another process may have finished the run meanwhile.
    let start = prepare_out(out)?;
    Ok((start, lock))
}

/// Removes the directory of a new run that failed (it holds nothing usable), unless it
/// holds a checkpoint to resume from.
pub fn discard_failed(out: &Path) {
    if !crate::checkpoint::dir(out).exists() {
        let _ = std::fs::remove_dir_all(out);
    }
}

/// What the manifest of a training run records besides the configuration.
#[derive(Debug, Clone)]
pub struct RunMeta {
    /// Tool version.
    pub tool_version: String,
    /// Git revision.
    pub git_revision: Option<String>,
    /// Device description.
    pub device: String,
    /// Extra configuration (model path, data path, ...).
    pub extra: serde_json::Value,
}

/// Runs one training configuration in `out`, with its manifest: `running` while it
/// trains, then `complete` or `diverged` (with the step in `note`). A directory holding a
/// checkpoint of the same configuration resumes from it. `lock` is the directory's lock
/// ([`claim_out`], or `RunLock::exclusive` for a sweep cell): no run is written without it.
/// At the end the manifest records every table's rows and bytes.
///
/// # Errors
/// Training errors; I/O; a lock of another directory.
pub fn run_dir(
    model: &mut CausalLm,
    data: &crate::data::Dataset,
    cfg: &TrainConfig,
    out: &Path,
    meta: &RunMeta,
    lock: &RunLock,
    progress: impl FnMut(&crate::trainer::StepProgress<'_>),
) -> Result<TrainOutcome, TrainError> {
    if lock.dir() != out {
        return Err(TrainError::Invalid(format!(
            "{}: the run directory is not the one locked ({})",
            out.display(),
            lock.dir().display()
        )));
    }
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    let mut run = meta.extra.clone();
    if let Some(obj) = run.as_object_mut() {
        obj.insert("modules".into(), module_widths(model, cfg));
    }
    let mut manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        tool: "rankstab".into(),
        tool_version: meta.tool_version.clone(),
        git_revision: meta.git_revision.clone(),
        command: "train".into(),
        config: serde_json::json!({ "train": cfg, "scaling": cfg.scaling()?, "run": run }),
        seeds: vec![cfg.seed],
        device: meta.device.clone(),
        created: now(),
        finished: None,
        status: RunStatus::Running,
        note: None,
        tables: Default::default(),
    };
    if let Ok(old) = read_json::<Manifest>(&out.join("manifest.json")) {
        manifest.created = old.created;
    }
    write_json_atomic(&out.join("manifest.json"), &manifest)?;
    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(model.device());
    let outcome = train(model, &vs, data, cfg, out, progress)?;
    manifest.status = if outcome.diverged.is_some() {
        RunStatus::Diverged
    } else {
        RunStatus::Complete
    };
    manifest.note.clone_from(&outcome.diverged);
    manifest.finished = Some(now());
    rankstab_records::parquet_copy::write_parquet_copies(
        out,
        rankstab_records::parquet_copy::PARQUET_MIN_BYTES,
    )?;
    manifest.tables = rankstab_records::table_sizes(out)?;
    write_json_atomic(&out.join("manifest.json"), &manifest)?;
    Ok(outcome)
}

/// The adapted modules' widths, `{module: [in_features, out_features]}` (every layer of a
/// model has the same): what the report needs to know how far a run's ranks reach.
fn module_widths(model: &mut CausalLm, cfg: &TrainConfig) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (path, lin) in model.linears_mut() {
        let (module, _) = crate::inject::module_and_layer(&path);
        if !cfg.target_modules.is_empty() && !cfg.target_modules.contains(&module) {
            continue;
        }
        let (out, inp) = lin.dims();
        map.entry(module)
            .or_insert_with(|| serde_json::json!([inp, out]));
    }
    serde_json::Value::Object(map)
}

/// Current UTC time, RFC 3339, seconds.
fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        let t = now();
        assert_eq!(t.len(), 20);
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }

    #[test]
    fn run_states_and_starts_of_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("run");
        assert_eq!(RunState::of(&out), RunState::New);
        assert_eq!(prepare_out(&out).expect("absent"), Start::New);
        std::fs::create_dir(&out).expect("mkdir");
        assert_eq!(prepare_out(&out).expect("empty"), Start::New);
        std::fs::write(out.join("notes.txt"), "mine").expect("write");
        assert_eq!(RunState::of(&out), RunState::Partial);
        let e = prepare_out(&out).expect_err("not a run").to_string();
        assert!(e.contains("exists and is not empty"), "{e}");
        assert_eq!(RunState::Partial.to_string(), "partial");
        assert!(RunState::Diverged.is_finished() && !RunState::New.is_finished());
    }
}
