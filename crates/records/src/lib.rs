//! Shared, versioned record types and their file I/O.
//!
//! Every rankstab command writes a *run directory*; every reader (the report, notebooks,
//! pandas, polars) reads only files. This crate owns the on-disk format:
//!
//! | file            | type                 | format                                   |
//! |-----------------|----------------------|------------------------------------------|
//! | `manifest.json` | [`Manifest`]         | JSON, replaced atomically                |
//! | `moments.csv`   | [`MomentRow`]        | long-format CSV, appended crash-safely   |
//! | `metrics.csv`   | [`MetricRow`]        | long-format CSV, appended crash-safely   |
//! | `fits.json`     | `Vec<`[`Fit`]`>`     | JSON array, replaced atomically          |
//!
//! | `coefficients.csv` | [`CoefRow`]      | long-format CSV (theory runs)            |
//! | `NAME.parquet`  | a copy of `NAME.csv` | Parquet, for tables of 4 MiB or more, written when the run finishes ([`parquet_copy`]) |
//!
//! It also owns the project's vocabulary ([`vocab`]: sites, statistics, metrics,
//! optimizers, scalings, step windows, layers), one type per axis with one spelling, and
//! the one formula every tool shares, the adapter scaling `gamma_r = alpha * r^-beta`
//! ([`scaling_factor`]).

mod error;
pub mod guard;
pub mod parquet_copy;
mod table;
mod types;
pub mod vocab;

pub use error::RecordsError;
pub use guard::RunLock;
#[doc(hidden)]
pub use serde as __serde;
pub use table::{
    read_json, read_moments, read_table, table_sizes, verify_tables, write_json_atomic, TableWriter,
};
pub use types::*;
pub use vocab::{
    Layer, Metric, Optimizer, Outcome, ParseError, Rival, Scaling, Site, Stat, Verdict, Window,
};

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, RecordsError>;

/// Version of every record type in this crate. Bump on any incompatible change; readers
/// refuse other versions with [`RecordsError::Schema`].
pub const SCHEMA_VERSION: u32 = 1;

/// File names inside a run directory (one place, used by writers and readers alike).
pub mod files {
    /// Run manifest.
    pub const MANIFEST: &str = "manifest.json";
    /// Long-format moment rows.
    pub const MOMENTS: &str = "moments.csv";
    /// Long-format metric rows.
    pub const METRICS: &str = "metrics.csv";
    /// Fitted rank exponents.
    pub const FITS: &str = "fits.json";
    /// Data coefficients of the exact first-step law (theory runs).
    pub const COEFFICIENTS: &str = "coefficients.csv";
}

/// The adapter scaling factor `gamma_r = alpha * r^(-beta)`.
///
/// Standard LoRA is `beta = 1` (`alpha / r`), rsLoRA `beta = 1/2` (`alpha / sqrt(r)`),
/// a rank-independent scaling `beta = 0`. This is the only place the formula is written
/// ([`Scaling::factor`] calls it).
///
/// ```
/// use rankstab_records::scaling_factor;
/// assert_eq!(scaling_factor(16.0, 1.0, 8), 2.0);          // LoRA: alpha / r
/// assert_eq!(scaling_factor(16.0, 0.5, 64), 2.0);         // rsLoRA: alpha / sqrt(r)
/// assert_eq!(scaling_factor(3.0, 0.0, 1024), 3.0);        // constant
/// ```
pub fn scaling_factor(alpha: f64, beta: f64, rank: usize) -> f64 {
    alpha * (rank as f64).powf(-beta)
}
