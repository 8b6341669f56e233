//! The reliability suite: hostile and careless inputs to every subcommand, as table tests
//! (input, expected exit code, expected message fragment, nothing left behind), concurrent
//! runs on one directory, and bounded fuzzing of the parsers of untrusted files.
//!
//! - `runs.rs`: run directories (locks, damaged tables, resume), theory and report inputs.
//! - `models.rs`: model files (config.json, GGUF, safetensors, tokenizers) and `eval`.
//! - `training.rs`: `train` and `sweep` flags, configuration files and data files.
mod harness;
mod models;
mod runs;
mod training;
