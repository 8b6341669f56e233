//! The crate's one error type. Variants keep the error they wrap as their `source` and
//! name what it concerns (file, tensor, module path, configuration), so that a caller can
//! print the whole chain on one line.
use rankstab_records::{ParseError, RecordsError};
use std::path::PathBuf;

/// Errors of model building, loading, adapters and training. Each names the file, tensor
/// or value.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A configuration file is malformed or has values we cannot use.
    #[error("{path}: {message}")]
    Config {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A JSON file could not be parsed or a value could not be written as JSON.
    #[error("{path}: {source}")]
    Json {
        /// File concerned.
        path: PathBuf,
        /// serde_json's error (with line and column).
        source: serde_json::Error,
    },
    /// A TOML configuration could not be parsed (syntax, unknown keys, bad values).
    // toml's message spans several lines and ends with a newline: it is shown trimmed,
    // and kept out of `source()` so that a printer of the chain does not repeat it
    // untrimmed (the message already quotes it).
    #[error("{origin}: {}", .error.to_string().trim())]
    Toml {
        /// What was parsed (a file name, or "embedded audit sweep").
        origin: String,
        /// toml's error (with line, column and the offending text).
        error: toml::de::Error,
    },
    /// A tensor is missing from the checkpoint.
    #[error("{path}: tensor {name} is missing")]
    MissingTensor {
        /// Checkpoint file or directory.
        path: PathBuf,
        /// Tensor name.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Checkpoint file or directory.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<i64>,
        /// Found shape.
        found: Vec<i64>,
    },
    /// A record file (table, manifest, JSON) could not be read or written.
    #[error(transparent)]
    Records(#[from] RecordsError),
    /// A value that is not one of its axis' spellings (scaling, dtype, device, ...).
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// Another error, in the place it concerns (a module path, a configuration file, a
    /// data row): "context: error".
    #[error("{context}: {source}")]
    In {
        /// What the error concerns.
        context: String,
        /// The error there.
        source: Box<TrainError>,
    },
    /// Anything else that is not allowed, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// Training stopped on request ([`crate::stop::request`]: a signal) after step `step`,
    /// with a checkpoint in `dir` to resume from.
    #[error("stopped on request after step {step} with a checkpoint in {}: run the same command again to resume", .dir.display())]
    Stopped {
        /// The last step completed (0-based).
        step: usize,
        /// The run directory that holds the checkpoint.
        dir: PathBuf,
    },
    /// libtorch failed.
    #[error("{context}: {source}")]
    Torch {
        /// What was being done.
        context: String,
        /// libtorch's error.
        source: tch::TchError,
    },
}

impl TrainError {
    /// This error, placed in `context` (a module path, a file, a row): "context: error".
    pub(crate) fn within(self, context: impl Into<String>) -> Self {
        TrainError::In {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// A closure for `map_err` that wraps libtorch's error with what was being done.
    pub(crate) fn torch(context: impl Into<String>) -> impl FnOnce(tch::TchError) -> Self {
        let context = context.into();
        move |source| TrainError::Torch { context, source }
    }

    /// A closure for `map_err` that wraps an I/O error with the file concerned.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| TrainError::Io { path, source }
    }
}
