use std::path::PathBuf;

/// Errors of record I/O. Every variant names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A CSV row could not be written or parsed.
    #[error("{path}: {source}")]
    Csv {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        source: csv::Error,
    },
    /// A JSON document could not be written or parsed.
    #[error("{path}: {source}")]
    Json {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        source: serde_json::Error,
    },
    /// The file was written by an incompatible schema version.
    #[error("{path}: schema version {found}, this rankstab reads version {expected}")]
    Schema {
        /// File concerned.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Version this build understands.
        expected: u32,
    },
    /// A table's header does not match the record type.
    #[error("{path}: header {found:?} does not match the expected columns {expected:?}")]
    Header {
        /// File concerned.
        path: PathBuf,
        /// Header found.
        found: Vec<String>,
        /// Header expected.
        expected: Vec<String>,
    },
    /// A file or value that is refused (not a regular file, too large, outside its
    /// directory, damaged, ...): the message says what is allowed.
    #[error("{path}: {msg}")]
    Invalid {
        /// File concerned.
        path: PathBuf,
        /// What is wrong and what is allowed.
        msg: String,
    },
    /// Another process holds the run directory's lock.
    #[error("{path} is in use by {holder}: wait for it to finish, or choose another --out")]
    Locked {
        /// The locked directory.
        path: PathBuf,
        /// "pid N on HOST".
        holder: String,
    },
}
