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
//! It also owns the one formula every tool shares, the adapter scaling
//! `gamma_r = alpha * r^-beta` ([`scaling_factor`]).

mod error;
mod table;
mod types;

pub use error::RecordsError;
pub use table::{read_json, read_table, write_json_atomic, TableWriter};
pub use types::*;

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
}

/// The adapter scaling factor `gamma_r = alpha * r^(-beta)`.
///
/// Standard LoRA is `beta = 1` (`alpha / r`), rsLoRA `beta = 1/2` (`alpha / sqrt(r)`),
/// a rank-independent scaling `beta = 0`. This is the only place the formula is written.
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

/// Named scaling presets and their `beta`.
///
/// ```
/// use rankstab_records::scaling_preset;
/// assert_eq!(scaling_preset("rslora"), Some(0.5));
/// assert_eq!(scaling_preset("nope"), None);
/// ```
pub fn scaling_preset(name: &str) -> Option<f64> {
    match name {
        "lora" => Some(1.0),
        "rslora" => Some(0.5),
        "constant" => Some(0.0),
        _ => None,
    }
}

/// The preset name of `beta` if it has one, else `beta=<value>`.
///
/// ```
/// use rankstab_records::scaling_name;
/// assert_eq!(scaling_name(0.5), "rslora");
/// assert_eq!(scaling_name(0.75), "beta=0.75");
/// ```
pub fn scaling_name(beta: f64) -> String {
    if beta == 1.0 {
        "lora".into()
    } else if beta == 0.5 {
        "rslora".into()
    } else if beta == 0.0 {
        "constant".into()
    } else {
        format!("beta={beta}")
    }
}
