//! The report's one error type. Every variant names the file or figure it concerns.
use std::path::PathBuf;

/// Errors of loading run directories and writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A record file could not be parsed (the message names the file and, for tables, the line).
    #[error(transparent)]
    Records(#[from] rankstab_records::RecordsError),
    /// A run directory lacks a file the report needs.
    #[error("{dir}: no {file} (not a finished rankstab run directory?)")]
    Missing {
        /// Run directory.
        dir: PathBuf,
        /// File name that is missing.
        file: &'static str,
    },
    /// A file was written by a schema version this build does not read.
    #[error("{path}: schema version {found}, this rankstab reads version {expected}")]
    Schema {
        /// File concerned.
        path: PathBuf,
        /// Version in the file.
        found: u64,
        /// Version this build reads.
        expected: u32,
    },
    /// A file parses but its content cannot be used.
    #[error("{path}: {what}")]
    Invalid {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A run directory's tables are damaged (cut, appended to or rewritten after
    /// completion, or holding duplicate rows): the report refuses it rather than use wrong
    /// numbers.
    #[error("run {dir} is damaged: {source}")]
    Damaged {
        /// Run directory.
        dir: PathBuf,
        /// What is damaged (names the file).
        source: rankstab_records::RecordsError,
    },
    /// Two training runs measure the same cell (model, optimizer, scaling, learning rate,
    /// data, rank and seed) under different configurations: merging them would average two
    /// different experiments as if they were one seed.
    #[error(
        "runs {first} and {second} share {cell} but differ in {fields}: the report would average two different \
         experiments as one seed; report them separately (or rerun one with another seed)"
    )]
    SharedSeed {
        /// One run directory.
        first: PathBuf,
        /// The other.
        second: PathBuf,
        /// The cell they share ("gpt-j-mini adamw lora r=4 seed 0").
        cell: String,
        /// The configuration fields that differ, with both values.
        fields: String,
    },
    /// None of the given directories could be used.
    #[error("no usable run directory among the {given} given: {reasons}")]
    NoUsableRuns {
        /// Number of directories given.
        given: usize,
        /// One reason per directory, joined with "; ".
        reasons: String,
    },
    /// A figure could not be drawn.
    #[error("figure {name}: {what}")]
    Plot {
        /// Figure file stem.
        name: String,
        /// What went wrong.
        what: String,
    },
    /// A template could not be rendered.
    #[error("template {name}: {source}")]
    Template {
        /// Template name.
        name: &'static str,
        /// Underlying error.
        source: minijinja::Error,
    },
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}
