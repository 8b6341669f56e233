//! The bounds of every size and number a training run or a sweep accepts, each with its
//! reason, checked before anything is loaded, allocated or written.
//!
//! A value out of range is an [`OutOfRange`]: the field, the value and what is allowed.
//! `rankstab train` renders it with the flag (`--batch 4294967297: at most 65536 ...`), a
//! sweep with its file and the field path (`s.toml: models[1].ranks = [4, 4]: ...`).
use crate::TrainError;
use std::fmt::Display;

/// Adapter ranks: 1..=65536. A rank-r adapter of a d-wide module holds r (d_in + d_out)
/// floats; no module of a supported model is wider than 65536, and a rank above its width
/// is refused when the model is known.
pub const MAX_RANK: usize = 65_536;
/// Sequences per optimisation step (and per micro-batch): the paper uses 32.
pub const MAX_BATCH: usize = 65_536;
/// Tokens per sequence: no model this tool loads has more positions, and attention's
/// memory grows with the square of the context.
pub const MAX_CONTEXT: usize = 131_072;
/// Tokens of one forward/backward pass (micro-batch x context): the logits alone hold
/// that many rows of the vocabulary (2^20 tokens x 32,000 floats = 125 GiB).
pub const MAX_TOKENS_PER_PASS: usize = 1 << 20;
/// Optimisation steps (and every "every k steps" interval): rows record steps as 32-bit
/// numbers, and a million steps is far beyond any run of this tool.
pub const MAX_STEPS: usize = 1_000_000;
/// Seeds: recorded in JSON and CSV, whose readers in Python and JavaScript hold numbers
/// as doubles; above 2^53 - 1 a seed would not survive them exactly.
pub const MAX_SEED: u64 = (1 << 53) - 1;
/// The scaling numerator alpha: (0, 1e6] (the paper uses 16).
pub const MAX_ALPHA: f64 = 1e6;
/// The scaling exponent beta: |beta| <= 4, so that alpha r^-beta stays inside f32 for
/// every allowed alpha and rank (65536^4 = 2^64).
pub const MAX_ABS_BETA: f64 = 4.0;
/// Learning rates and the clipping norm: [1e-20, 1e30]. Outside, the f32 update of the
/// adapters is zero or overflows at once (1e30 is still allowed, to force a divergence).
pub const MIN_LR: f64 = 1e-20;
/// See [`MIN_LR`].
pub const MAX_LR: f64 = 1e30;
/// AdamW's weight decay: [0, 1] (a decay of lr x wd > 1 per step flips the weights' sign).
pub const MAX_WEIGHT_DECAY: f64 = 1.0;
/// Moment orders: 1..=8 (the probes' sums of x^k overflow f64 sooner beyond).
pub const MAX_MOMENT: u32 = 8;
/// Held-out sequences evaluated (`heldout_max`; 0: all).
pub const MAX_HELDOUT: usize = 1 << 24;
/// Rows or windows used (`max_examples`): at least 2 (one to train on, one held out).
pub const MAX_EXAMPLES: usize = 1 << 32;
/// Cells of one sweep: sweep.json lists every cell, and a sweep larger than this is a
/// typo in a list (split a real one into several sweeps).
pub const MAX_CELLS: usize = 100_000;
/// Target modules named per model.
pub const MAX_TARGET_MODULES: usize = 64;
/// Size of a sweep configuration file (TOML): a real one is a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A value that is not allowed: the field (a [`crate::trainer::TrainConfig`] or sweep
/// field name, or a path such as `models[1].ranks`), the value as written, what is allowed
/// and why.
#[derive(Debug, Clone, PartialEq)]
pub struct OutOfRange {
    /// Field name or path (`batch`, `models[1].ranks`, `lr.sgd`).
    pub field: String,
    /// The value, as the user would write it.
    pub value: String,
    /// What is allowed, and why.
    pub allowed: String,
}

impl OutOfRange {
    /// A new value error.
    pub fn new(field: impl Into<String>, value: impl Display, allowed: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }

    /// This error under `prefix` (`models[1]`): the field becomes `models[1].field`.
    pub fn under(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }

    /// The error as a command-line flag: `--micro-batch 5: ...`.
    pub fn as_flag(&self) -> TrainError {
        TrainError::Invalid(format!(
            "--{} {}: {}",
            self.field.replace('_', "-"),
            self.value,
            self.allowed
        ))
    }

    /// The error in a configuration file: `origin: field = value: ...`.
    pub fn in_file(&self, origin: &str) -> TrainError {
        TrainError::Invalid(format!(
            "{origin}: {} = {}: {}",
            self.field, self.value, self.allowed
        ))
    }
}

impl Display for OutOfRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.field, self.value, self.allowed)
    }
}

impl From<OutOfRange> for TrainError {
    fn from(e: OutOfRange) -> Self {
        TrainError::Invalid(e.to_string())
    }
}

/// Checks `min <= value <= max`; `what` says what the number counts and why it is bounded.
///
/// # Errors
/// The value out of range, with the range and `what`.
pub fn int(
    field: &str,
    value: usize,
    min: usize,
    max: usize,
    what: &str,
) -> Result<(), OutOfRange> {
    if value < min || value > max {
        let range = if min == 0 {
            format!("at most {max}")
        } else {
            format!("use {min}..={max}")
        };
        return Err(OutOfRange::new(field, value, format!("{range} {what}")));
    }
    Ok(())
}

/// Checks that `value` is finite and in `[lo, hi]` (or `(lo, hi]` / `[lo, hi)` / `(lo, hi)`
/// as `open_lo` / `open_hi` say); `what` says why.
///
/// # Errors
/// A non-finite value or one out of range.
pub fn float(
    field: &str,
    value: f64,
    (lo, open_lo): (f64, bool),
    (hi, open_hi): (f64, bool),
    what: &str,
) -> Result<(), OutOfRange> {
    let above = if open_lo { value > lo } else { value >= lo };
    let below = if open_hi { value < hi } else { value <= hi };
    if !value.is_finite() || !above || !below {
        let range = format!(
            "use a finite number in {}{}, {}{}",
            if open_lo { "(" } else { "[" },
            num(lo),
            num(hi),
            if open_hi { ")" } else { "]" }
        );
        return Err(OutOfRange::new(
            field,
            num(value),
            format!("{range} {what}"),
        ));
    }
    Ok(())
}

/// A number as a user would write it: `1e30`, `1e-20`, `0.5`, `16`.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a.is_finite() && a != 0.0 && !(1e-4..1e6).contains(&a) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Checks that a list is not empty and holds no value twice; `why` says what a duplicate
/// would do.
///
/// # Errors
/// An empty list, or the first duplicate.
pub fn distinct<T: PartialEq + Display>(
    field: &str,
    values: &[T],
    why: &str,
) -> Result<(), OutOfRange> {
    let shown = || {
        format!(
            "[{}]",
            values
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if values.is_empty() {
        return Err(OutOfRange::new(
            field,
            "[]",
            "must not be empty: give at least one value",
        ));
    }
    for (i, v) in values.iter().enumerate() {
        if values[..i].contains(v) {
            return Err(OutOfRange::new(
                field,
                shown(),
                format!("{v} appears twice ({why})"),
            ));
        }
    }
    Ok(())
}

/// Checks a seed ([`MAX_SEED`]).
///
/// # Errors
/// A seed above 2^53 - 1.
pub fn seed(field: &str, value: u64) -> Result<(), OutOfRange> {
    if value > MAX_SEED {
        return Err(OutOfRange::new(
            field,
            value,
            format!("at most {MAX_SEED} (2^53 - 1: seeds are recorded in JSON and CSV, whose readers hold numbers as doubles)"),
        ));
    }
    Ok(())
}

/// Checks an adapter rank ([`MAX_RANK`]).
///
/// # Errors
/// 0 or above 65536.
pub fn rank(field: &str, value: usize) -> Result<(), OutOfRange> {
    int(
        field,
        value,
        1,
        MAX_RANK,
        "(ranks are integers >= 1; larger adapters than 65536 are refused before memory is allocated)",
    )
}

/// Checks a step count ([`MAX_STEPS`]).
///
/// # Errors
/// 0 or above a million.
pub fn steps(field: &str, value: usize) -> Result<(), OutOfRange> {
    int(
        field,
        value,
        1,
        MAX_STEPS,
        "optimisation steps (rows record steps as 32-bit numbers; larger is a typo)",
    )
}

/// Checks an "every k steps" interval (0: never, or the default).
///
/// # Errors
/// Above [`MAX_STEPS`].
pub fn every(field: &str, value: usize) -> Result<(), OutOfRange> {
    int(
        field,
        value,
        0,
        MAX_STEPS,
        "steps (the most steps a run may have; 0 turns it off)",
    )
}

/// Checks `max_examples` ([`MAX_EXAMPLES`]).
///
/// # Errors
/// 0, 1 or above 2^32.
pub fn max_examples(field: &str, value: Option<usize>) -> Result<(), OutOfRange> {
    match value {
        Some(n) => int(
            field,
            n,
            2,
            MAX_EXAMPLES,
            "rows (one or more to train on and one held out; leave it out for all)",
        ),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_field_the_value_and_the_limit() {
        let e = rank("rank", 0).expect_err("0");
        assert_eq!(e.as_flag().to_string().split(':').next(), Some("--rank 0"));
        assert!(rank("rank", 1).is_ok() && rank("rank", MAX_RANK).is_ok());
        let e = rank("ranks", MAX_RANK + 1)
            .expect_err("too large")
            .in_file("s.toml");
        assert!(
            e.to_string()
                .starts_with("s.toml: ranks = 65537: use 1..=65536"),
            "{e}"
        );
        let e = int("batch", 4_294_967_297, 1, MAX_BATCH, "sequences").expect_err("huge");
        assert_eq!(
            e.as_flag().to_string(),
            "--batch 4294967297: use 1..=65536 sequences"
        );
        for v in [f64::NAN, f64::INFINITY, -1.0, 0.0, 2e30] {
            let e = float("lr", v, (0.0, true), (MAX_LR, false), "").expect_err("refused");
            assert!(e.to_string().contains("(0, 1e30]"), "{e}");
        }
        assert!(float("lr", 1e30, (0.0, true), (MAX_LR, false), "").is_ok());
        assert!(float("f", 0.0, (0.0, true), (1.0, true), "").is_err());
        assert!(float("f", 1.0, (0.0, true), (1.0, true), "").is_err());
        assert!(float("f", 0.5, (0.0, true), (1.0, true), "").is_ok());
        assert!(seed("seed", MAX_SEED).is_ok() && seed("seed", MAX_SEED + 1).is_err());
        assert!(steps("steps", 0).is_err() && steps("steps", MAX_STEPS + 1).is_err());
        assert!(every("eval_every", 0).is_ok() && every("eval_every", MAX_STEPS + 1).is_err());
        assert!(max_examples("m", Some(1)).is_err() && max_examples("m", None).is_ok());
        assert_eq!(
            OutOfRange::new("ranks", 3, "x").under("models[1]").field,
            "models[1].ranks"
        );
    }

    #[test]
    fn duplicates_and_empty_lists_are_named() {
        let e = distinct(
            "seeds",
            &[0u64, 1, 0],
            "duplicate seeds make duplicate cells",
        )
        .expect_err("duplicate");
        assert_eq!(
            e.in_file("s.toml").to_string(),
            "s.toml: seeds = [0, 1, 0]: 0 appears twice (duplicate seeds make duplicate cells)"
        );
        assert!(distinct::<u64>("seeds", &[], "").is_err());
        assert!(distinct("ranks", &[4usize, 8], "").is_ok());
    }
}
