use std::path::PathBuf;

/// Errors of model building, loading and training. Each names the file, tensor or value.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read.
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
    /// Anything else that is not allowed, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// libtorch failed.
    #[error("{context}: {source}")]
    Torch {
        /// What was being done.
        context: String,
        /// libtorch's error.
        source: tch::TchError,
    },
}
