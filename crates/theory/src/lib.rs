//! Monte Carlo checker of Theorem 3.2 of rsLoRA (Kalajdzievski 2023) on synthetic networks.
//!
//! A cell is (optimizer, scaling, input regime, rank); a trial draws frozen weights, a
//! teacher, inputs and the adapter init from one seed and runs every cell on them (common
//! random numbers across cells, so slopes across ranks are sharp). Every step, every
//! adapter's forward and backward moments and gradient norms are recorded; slopes of
//! log(moment) against log(rank) are fitted with jackknife intervals over trials and set
//! against the predictions of [`predict`] (derived in `proofs/`).
//!
//! ```no_run
//! use rankstab_theory::{run, NoProgress, RunOptions, TheoryConfig};
//! let cfg = TheoryConfig { width: 256, ranks: vec![4, 16, 64], ..Default::default() };
//! let out = run(&cfg, std::path::Path::new("runs/small"), &RunOptions::default(), &NoProgress).unwrap();
//! for fit in &out.fits { println!("{} {} slope {:.2} (predicted {:.2})", fit.site, fit.m, fit.slope, fit.predicted); }
//! ```

pub mod closed_form;
pub mod config;
mod data;
pub mod exact;
mod fits;
pub mod kernel;
pub mod predict;
mod run;
pub mod sim;
pub mod spectrum;
pub mod stats;
pub mod transfer;

pub use config::{Activation, AdapterInit, Init, InputDist, Loss, Reuse, TheoryConfig};
pub use data::trial_seed;
pub use fits::fit_rows;
pub use run::{
    cells, closed_form_checks, distinct_checks, memory_estimate, run, summarize, trial_bytes,
    trial_flops, trial_rows, ClosedFormCheck, NoProgress, Progress, RunOptions, RunOutcome,
    TrialRows, TrialSeconds, CHECKS, SUMMARY,
};

use std::path::PathBuf;

/// Errors of the checker. Messages name the value and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum TheoryError {
    /// A configuration value is not allowed.
    #[error("{0}")]
    Invalid(String),
    /// The configuration file could not be parsed.
    #[error("{0}")]
    Config(String),
    /// The output directory holds something else.
    #[error("{0}")]
    Exists(String),
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Record I/O.
    #[error(transparent)]
    Records(#[from] rankstab_records::RecordsError),
}
