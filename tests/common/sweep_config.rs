//! The small sweep of the tiny Llama fixture that `tests/cli_sweep.rs` and `tests/slurm.rs`
//! run: ranks 2 and 8, LoRA and rsLoRA, AdamW (4 cells), on a short text; `extra` adds
//! top-level keys (steps, checkpoint_every, ...).
use std::path::{Path, PathBuf};

/// The tiny Llama fixture.
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/tests/fixtures/tiny-llama")
}

/// Writes `dir/t.txt` and `dir/sweep.toml`; returns the configuration's path.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let text = dir.join("t.txt");
    let s = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ";
    std::fs::write(&text, s.repeat(40)).expect("write");
    let cfg = dir.join("sweep.toml");
    std::fs::write(
        &cfg,
        format!(
            "data = {:?}\nranks = [2, 8]\nscalings = [\"lora\", \"rslora\"]\noptimizers = [\"adamw\"]\n\
             batch = 4\nmicro_batch = 2\ncontext = 16\nalpha = 8.0\neval_every = 5\nheldout_fraction = 0.2\n{extra}\n\
             [lr]\nadamw = 0.01\nsgd = 0.1\n[[models]]\nname = \"tiny\"\npath = {:?}\n",
            text.display().to_string(),
            fixture().display().to_string()
        ),
    )
    .expect("write");
    cfg
}
