//! The project's vocabulary as types: every axis value that is spelled in a table header,
//! a config file or a command-line flag has one type here with one `FromStr`/`Display`
//! pair, and serde reads and writes the same spelling. Code matches on these types, so a
//! new variant makes the compiler list every place that must learn it.
//!
//! | type          | spellings                                                       |
//! |---------------|-----------------------------------------------------------------|
//! | [`Site`]      | `fwd`, `fwd_heldout`, `bwd`, `grad_out`, `param`                |
//! | [`Stat`]      | `abs`, `raw`, `grad_norm_a`, `grad_norm_b`, `delta_norm`, ...   |
//! | [`Metric`]    | `loss`, `heldout_loss`, `perplexity`, `grad_norm_avg`, ...      |
//! | [`Optimizer`] | `sgd`, `sgd-momentum`, `adam`, `adamw`                          |
//! | [`Scaling`]   | `lora`, `rslora`, `constant`, `beta=0.75` (also `0.75`)         |
//! | [`Window`]    | `step 3`, `steps 10-50`                                         |
//! | [`Layer`]     | `0`, `1`, ..., `all`                                            |
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A value that is not one of an axis' spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {axis} '{value}' (allowed: {allowed})")]
pub struct ParseError {
    /// The axis ("site", "scaling", ...).
    pub axis: &'static str,
    /// What was given.
    pub value: String,
    /// What is allowed.
    pub allowed: String,
}

/// Serde through `Display`/`FromStr`, so files use exactly the spellings of the type.
#[doc(hidden)]
#[macro_export]
macro_rules! serde_via_str {
    ($t:ty) => {
        impl $crate::__serde::Serialize for $t {
            fn serialize<S: $crate::__serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> $crate::__serde::Deserialize<'de> for $t {
            fn deserialize<D: $crate::__serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s =
                    <std::borrow::Cow<'de, str> as $crate::__serde::Deserialize>::deserialize(d)?;
                s.parse().map_err($crate::__serde::de::Error::custom)
            }
        }
    };
}

/// An enum of named values with one spelling each (and optional extra spellings that parse
/// to the same variant): `ALL`, `as_str`, `Display`, `FromStr` (errors name the axis and
/// list the spellings) and serde in one place. Every enum of the vocabulary is written with
/// it, and so are the other crates' named options (input regimes, inits, activations).
///
/// ```
/// rankstab_records::named_enum! {
///     /// Colours.
///     Colour, "colour" {
///         /// Red.
///         #[default]
///         Red => "red" | "r",
///         /// Blue.
///         Blue => "blue",
///     }
/// }
/// assert_eq!("r".parse::<Colour>(), Ok(Colour::Red));
/// assert_eq!(Colour::Blue.to_string(), "blue");
/// assert_eq!("green".parse::<Colour>().unwrap_err().to_string(), "unknown colour 'green' (allowed: red, blue)");
/// ```
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $axis:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal $(| $alias:literal)* ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling in files and on the command line.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // `pad`, so that width and alignment ("{:<12}") apply.
                f.pad(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::vocab::ParseError;
            fn from_str(s: &str) -> Result<Self, $crate::vocab::ParseError> {
                match s {
                    $($text $(| $alias)* => Ok($name::$variant),)+
                    _ => Err($crate::vocab::ParseError {
                        axis: $axis,
                        value: s.to_string(),
                        allowed: [$($text),+].join(", "),
                    }),
                }
            }
        }

        $crate::serde_via_str!($name);
    };
}

crate::named_enum! {
    /// Where a statistic is measured.
    Site, "site" {
        /// The adapter's output `gamma B A x` on the training batch.
        #[default]
        Fwd => "fwd",
        /// The adapter's output on held-out inputs.
        FwdHeldout => "fwd_heldout",
        /// The gradient into the adapter's input through the adapter, `(gamma B A)^T v`.
        Bwd => "bwd",
        /// The loss gradient `v` at the adapter's output.
        GradOut => "grad_out",
        /// The adapter's parameters (norms).
        Param => "param",
    }
}

impl Site {
    /// Whether the site is an adapter output (`fwd`, `fwd_heldout`).
    pub fn is_forward(self) -> bool {
        matches!(self, Site::Fwd | Site::FwdHeldout)
    }
}

crate::named_enum! {
    /// What is measured at a site.
    Stat, "stat" {
        /// Mean of |x|^m over entries (`m` set).
        #[default]
        Abs => "abs",
        /// Mean of x^m over entries (`m` set).
        Raw => "raw",
        /// Frobenius norm of the gradient of A.
        GradNormA => "grad_norm_a",
        /// Frobenius norm of the gradient of B.
        GradNormB => "grad_norm_b",
        /// Frobenius norm of `gamma B A`.
        DeltaNorm => "delta_norm",
        /// Stable rank `||M||_F^2 / ||M||_2^2` of `gamma B A`.
        StableRank => "stable_rank",
        /// Adam's regime: the share of A's coordinates whose `sqrt(v_hat)` is below
        /// `10 eps` after the step's update (eps dominates their step size).
        EpsShareA => "eps_share_a",
        /// The same for B.
        EpsShareB => "eps_share_b",
        /// The exact first-step SGD second moment of the adapter output (theory runs).
        ClosedForm => "closed_form",
        /// The law's expectation over A of the statistic, given the trial's data (theory
        /// runs: `E_A[mean |y|^m]` from the exact first-step law, `m` set).
        Law => "law",
    }
}

impl Stat {
    /// Whether the statistic is a moment of order `m` (`abs`, `raw`).
    pub fn is_moment(self) -> bool {
        matches!(self, Stat::Abs | Stat::Raw)
    }
}

crate::named_enum! {
    /// A per-step scalar of `metrics.csv`.
    Metric, "metric" {
        /// Training loss of the step's batch.
        #[default]
        Loss => "loss",
        /// Loss on held-out data.
        HeldoutLoss => "heldout_loss",
        /// exp(training loss).
        Perplexity => "perplexity",
        /// exp(held-out loss).
        HeldoutPerplexity => "heldout_perplexity",
        /// The paper's average parameter gradient norm (mean over adapters and factors).
        GradNormAvg => "grad_norm_avg",
        /// Global gradient norm of all adapters (before clipping).
        GradNorm => "grad_norm",
        /// Learning rate of the step.
        Lr => "lr",
        /// Wall-clock seconds of the step.
        Seconds => "seconds",
        /// 1 at the step whose loss became non-finite (the run ended there).
        Diverged => "diverged",
    }
}

crate::named_enum! {
    /// Optimizers; every tool uses a rank-independent learning rate.
    Optimizer, "optimizer" {
        /// Plain SGD.
        #[default]
        Sgd => "sgd",
        /// SGD with (PyTorch-style, undampened) momentum.
        SgdMomentum => "sgd-momentum" | "momentum",
        /// Adam (weight decay as L2 added to the gradient).
        Adam => "adam",
        /// AdamW (decoupled weight decay).
        Adamw => "adamw",
    }
}

impl Optimizer {
    /// Whether updates are normalised per coordinate (the Adam family: sign-like first
    /// steps whose size does not carry the gradient's scale).
    pub fn is_adaptive(self) -> bool {
        matches!(self, Optimizer::Adam | Optimizer::Adamw)
    }
}

crate::named_enum! {
    /// How a fitted exponent stands against a claim (proofs/verdicts.md).
    Outcome, "outcome" {
        /// The fit's interval lies inside the claim's band.
        Agrees => "agrees",
        /// The fit's interval lies outside the claim's band.
        Disagrees => "disagrees",
        /// Neither, or nothing to judge (no law, too few seeds or ranks).
        #[default]
        Inconclusive => "inconclusive",
    }
}

crate::named_enum! {
    /// What a rank exponent says about its statistic as the rank grows, from its interval.
    Verdict, "verdict" {
        /// The interval lies within the resolution band around 0: rank-stable.
        Stable => "stable",
        /// The interval lies below the band: the statistic vanishes with rank.
        Collapsing => "collapsing",
        /// The interval lies above the band: it blows up with rank.
        Exploding => "exploding",
        /// The interval meets the band's edge: not determined by these data.
        #[default]
        Undetermined => "undetermined",
        /// The slope is not finite (the statistic overflowed or the run diverged).
        Diverged => "diverged",
    }
}

crate::named_enum! {
    /// A rival law a fit is set against (proofs/verdicts.md).
    Rival, "rival law" {
        /// The paper's coherent limit, `p (1 - a beta)`.
        #[default]
        CoherentLimit => "coherent_limit",
        /// The incoherent limit, `p (1/2 - a beta)`: the negation of the paper's mechanism.
        IncoherentLimit => "incoherent_limit",
        /// The other optimizer family's law (SGD's for Adam, Adam's for SGD).
        OtherOptimizer => "other_optimizer",
        /// A rank-flat statistic, slope 0.
        Flat => "flat",
    }
}

/// A scaling rule `gamma_r = alpha * r^-beta`, named by its exponent: `lora` (beta = 1,
/// `alpha / r`), `rslora` (beta = 1/2, `alpha / sqrt(r)`), `constant` (beta = 0), any other
/// beta as `beta=<b>`. Parsing also takes a bare number. Ordered by decreasing beta, so
/// tables list lora, rslora, constant.
///
/// ```
/// use rankstab_records::Scaling;
/// let s: Scaling = "rslora".parse().unwrap();
/// assert_eq!((s.beta(), s.to_string()), (0.5, "rslora".to_string()));
/// for text in ["beta=0.75", "0.75"] {
///     assert_eq!(text.parse::<Scaling>().unwrap().to_string(), "beta=0.75");
/// }
/// // What Display prints, FromStr reads back.
/// let b = Scaling::from_beta(0.3).unwrap();
/// assert_eq!(b.to_string().parse::<Scaling>().unwrap(), b);
/// assert!(Scaling::LORA < Scaling::RSLORA && Scaling::RSLORA < Scaling::CONSTANT);
/// assert!("beta=nan".parse::<Scaling>().is_err());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Scaling {
    beta: f64,
}

impl Scaling {
    /// Standard LoRA, `alpha / r`.
    pub const LORA: Scaling = Scaling { beta: 1.0 };
    /// rsLoRA, `alpha / sqrt(r)`.
    pub const RSLORA: Scaling = Scaling { beta: 0.5 };
    /// A rank-independent scaling, `alpha`.
    pub const CONSTANT: Scaling = Scaling { beta: 0.0 };
    const PRESETS: [(&'static str, Scaling); 3] = [
        ("lora", Scaling::LORA),
        ("rslora", Scaling::RSLORA),
        ("constant", Scaling::CONSTANT),
    ];

    /// The scaling with exponent `beta`.
    ///
    /// # Errors
    /// A non-finite beta.
    pub fn from_beta(beta: f64) -> Result<Self, ParseError> {
        if beta.is_finite() {
            // -0.0 and 0.0 are one scaling.
            Ok(Scaling { beta: beta + 0.0 })
        } else {
            Err(Self::error(&beta.to_string()))
        }
    }

    /// The exponent beta.
    pub fn beta(self) -> f64 {
        self.beta
    }

    /// `gamma_r = alpha * r^-beta` (the one formula, [`crate::scaling_factor`]).
    pub fn factor(self, alpha: f64, rank: usize) -> f64 {
        crate::scaling_factor(alpha, self.beta, rank)
    }

    fn error(value: &str) -> ParseError {
        ParseError {
            axis: "scaling",
            value: value.to_string(),
            allowed: "lora, rslora, constant, or beta=<number> (a bare number is beta too)".into(),
        }
    }
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling::LORA
    }
}

impl PartialEq for Scaling {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scaling {}
impl PartialOrd for Scaling {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scaling {
    fn cmp(&self, other: &Self) -> Ordering {
        other.beta.total_cmp(&self.beta)
    }
}
impl std::hash::Hash for Scaling {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.beta.to_bits().hash(h);
    }
}

impl fmt::Display for Scaling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Self::PRESETS.iter().find(|(_, s)| s == self) {
            Some((name, _)) => f.pad(name),
            None => f.pad(&format!("beta={}", self.beta)),
        }
    }
}

impl FromStr for Scaling {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if let Some((_, sc)) = Self::PRESETS.iter().find(|(name, _)| *name == s) {
            return Ok(*sc);
        }
        let number = s.strip_prefix("beta=").unwrap_or(s);
        number
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|b| Self::from_beta(b).ok())
            .ok_or_else(|| Self::error(s))
    }
}

impl Serialize for Scaling {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scaling {
    /// A spelling, or a number (beta) as TOML and JSON allow.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either<'a> {
            Num(f64),
            #[serde(borrow)]
            Text(std::borrow::Cow<'a, str>),
        }
        match Either::deserialize(d)? {
            Either::Num(b) => Scaling::from_beta(b),
            Either::Text(t) => t.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// A window of optimisation steps, `lo..=hi`: "step 3" or "steps 10-50". Ordered by its
/// first, then its last step.
///
/// ```
/// use rankstab_records::Window;
/// let w: Window = "steps 10-50".parse().unwrap();
/// assert_eq!((w.lo, w.hi), (10, 50));
/// assert_eq!(Window::step(3).to_string(), "step 3");
/// assert!(Window::step(0) < w && w.contains(20) && !w.contains(51));
/// assert!("steps 5-2".parse::<Window>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Window {
    /// First step.
    pub lo: u32,
    /// Last step.
    pub hi: u32,
}

impl Window {
    /// The window of one step.
    pub fn step(step: u32) -> Self {
        Window { lo: step, hi: step }
    }

    /// Whether `step` lies in the window.
    pub fn contains(self, step: u32) -> bool {
        (self.lo..=self.hi).contains(&step)
    }

    /// The single step of a one-step window.
    pub fn single(self) -> Option<u32> {
        (self.lo == self.hi).then_some(self.lo)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            f.pad(&format!("step {}", self.lo))
        } else {
            f.pad(&format!("steps {}-{}", self.lo, self.hi))
        }
    }
}

impl FromStr for Window {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError {
            axis: "step window",
            value: s.to_string(),
            allowed: "'step N' or 'steps LO-HI' with LO <= HI".into(),
        };
        let num = |t: &str| t.trim().parse::<u32>().map_err(|_| err());
        if let Some(n) = s.strip_prefix("step ") {
            return Ok(Window::step(num(n)?));
        }
        let (lo, hi) = s
            .strip_prefix("steps ")
            .and_then(|r| r.split_once('-'))
            .ok_or_else(err)?;
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo > hi {
            return Err(err());
        }
        Ok(Window { lo, hi })
    }
}

crate::serde_via_str!(Window);

/// A layer index, or `all` for a statistic pooled (averaged) over layers. Indices order
/// before `all`.
///
/// ```
/// use rankstab_records::Layer;
/// assert_eq!("all".parse::<Layer>().unwrap(), Layer::All);
/// assert_eq!("3".parse::<Layer>().unwrap(), Layer::Index(3));
/// assert_eq!(Layer::Index(12).to_string(), "12");
/// assert!(Layer::Index(40) < Layer::All);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layer {
    /// One layer, 0-based.
    Index(u32),
    /// Pooled over every layer.
    All,
}

impl Default for Layer {
    fn default() -> Self {
        Layer::Index(0)
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::Index(i) => f.pad(&i.to_string()),
            Layer::All => f.pad("all"),
        }
    }
}

impl FromStr for Layer {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s == "all" {
            return Ok(Layer::All);
        }
        s.parse().map(Layer::Index).map_err(|_| ParseError {
            axis: "layer",
            value: s.to_string(),
            allowed: "a layer index 0, 1, ... or all".into(),
        })
    }
}

crate::serde_via_str!(Layer);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_value_round_trips_through_text_and_serde() {
        fn check<T>(all: &[T])
        where
            T: Copy + fmt::Display + FromStr + PartialEq + fmt::Debug + Serialize,
            for<'de> T: Deserialize<'de>,
        {
            for v in all {
                assert_eq!(v.to_string().parse::<T>().ok(), Some(*v));
                let json = serde_json::to_string(v).expect("serialise");
                assert_eq!(json, format!("\"{v}\""));
                assert_eq!(serde_json::from_str::<T>(&json).expect("read back"), *v);
            }
        }
        check(Site::ALL);
        check(Stat::ALL);
        check(Metric::ALL);
        check(Optimizer::ALL);
        check(Outcome::ALL);
        check(Verdict::ALL);
        check(Rival::ALL);
        check(&[Scaling::LORA, Scaling::RSLORA, Scaling::CONSTANT]);
        check(&[
            Scaling::from_beta(0.75).expect("finite"),
            Scaling::from_beta(-0.25).expect("finite"),
        ]);
        check(&[Window::step(0), Window { lo: 3, hi: 9 }]);
        check(&[Layer::Index(0), Layer::Index(31), Layer::All]);
    }

    #[test]
    fn today_spellings_are_kept() {
        assert_eq!(Site::FwdHeldout.to_string(), "fwd_heldout");
        assert_eq!(Stat::GradNormB.to_string(), "grad_norm_b");
        assert_eq!(Optimizer::SgdMomentum.to_string(), "sgd-momentum");
        assert_eq!("momentum".parse::<Optimizer>(), Ok(Optimizer::SgdMomentum));
        assert_eq!(
            Scaling::from_beta(0.75).expect("finite").to_string(),
            "beta=0.75"
        );
        assert_eq!("beta=1".parse::<Scaling>(), Ok(Scaling::LORA));
        assert_eq!(
            Scaling::from_beta(-0.0).expect("finite").to_string(),
            "constant"
        );
        // Widths apply, as in the CLI's tables.
        assert_eq!(format!("[{:<6}]", Site::Bwd), "[bwd   ]");
        assert_eq!(format!("[{:>8}]", Scaling::RSLORA), "[  rslora]");
        assert_eq!(format!("[{:<4}]", Layer::All), "[all ]");
    }

    #[test]
    fn unknown_values_name_the_axis_and_what_is_allowed() {
        let e = "fwdd".parse::<Site>().expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "unknown site 'fwdd' (allowed: fwd, fwd_heldout, bwd, grad_out, param)"
        );
        assert!("lorax"
            .parse::<Scaling>()
            .expect_err("unknown")
            .to_string()
            .contains("scaling"));
        assert!("beta=inf".parse::<Scaling>().is_err());
        assert!("step x".parse::<Window>().is_err());
        assert!("-1".parse::<Layer>().is_err());
    }

    #[test]
    fn scalings_deserialise_from_numbers_too() {
        let v: Vec<Scaling> =
            serde_json::from_str("[\"lora\", 0.75, \"beta=0.25\", \"0.5\"]").expect("parse");
        let b: Vec<f64> = v.iter().map(|s| s.beta()).collect();
        assert_eq!(b, [1.0, 0.75, 0.25, 0.5]);
    }
}
