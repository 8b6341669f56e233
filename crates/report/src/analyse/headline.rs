//! The verdict in a few plain sentences, one per source and setting, answering "is this
//! scaling rank-stable?" from the fits the report has already judged. Nothing is decided
//! here: the outcome (agrees / disagrees / inconclusive) and the stability verdict of each
//! fit are the rule's (`rankstab_theory::predict::verdict::judge_all`), and this module only
//! puts them into words, with the ranks, seeds, the measured exponent and its 90% interval
//! and the predicted band. It also gives the data of the headline figure ([`HeadlinePoint`]).
//!
//! Which fits speak for a setting (the primary fits):
//! * theory runs: the adapter output's moment of the figures' order (`fwd`, `abs`), layer 0,
//!   at the last step, per optimizer, input regime and scaling;
//! * training and audit runs (rows whose `source` is `train` or `audit`): the module fits
//!   pooled over layers with a prediction (the exact first-step law, step 1), or, when none
//!   has one, the pooled `fwd` fits of the first window after step 0;
//! * learning-rate transfer studies: each exponent of lr* across ranks, as the study judged
//!   it against its long-horizon law and against c = 0 ([`transfer_sentences`]).
use super::row::ExponentRow;
use rankstab_records::{Optimizer, Outcome, Scaling, Site, Stat, Verdict, Window};
use rankstab_theory::transfer::analyse::{Exponent, TransferSummary};
use rankstab_theory::transfer::Study;
use serde::Serialize;
use statrs::distribution::{ContinuousCDF, Normal, StudentsT};
use std::collections::BTreeMap;

/// Fewest seeds and ranks the rule needs to judge a training fit (`proofs/verdicts.md`).
const MIN_SEEDS: u32 = 3;
const MIN_RANKS: usize = 5;

/// The verdict in sentences, and the points of the headline figure.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Headline {
    /// One sentence per source and setting, in display order.
    pub sentences: Vec<Sentence>,
    /// One point per primary fit, in the sentences' order.
    pub points: Vec<HeadlinePoint>,
}

/// One sentence of the verdict.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sentence {
    /// theory, train or audit.
    pub source: String,
    /// The sentence's outcome: disagrees when a fit disagrees, else inconclusive when one is,
    /// else agrees (the card's colour).
    pub outcome: Outcome,
    /// The sentence.
    pub text: String,
}

/// One primary fit as the headline figure draws it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HeadlinePoint {
    /// "theory | adam coherent | rslora", "train | gpt-j-mini adamw | lora q_proj".
    pub label: String,
    /// theory, train or audit.
    pub source: String,
    /// Fitted exponent.
    pub slope: f64,
    /// Its 90% interval.
    pub lo90: f64,
    /// Upper end of the 90% interval.
    pub hi90: f64,
    /// Predicted exponent, when the fit has a law.
    pub predicted: Option<f64>,
    /// Half-width of the predicted band.
    pub band: Option<f64>,
    /// The rule's outcome.
    pub outcome: Outcome,
}

impl Headline {
    /// Whether any sentence says the prediction does not hold.
    pub fn any_disagrees(&self) -> bool {
        self.sentences
            .iter()
            .any(|s| s.outcome == Outcome::Disagrees)
    }
}

/// Two-sided quantile of Student's t at `level` (the normal's when `df` is not a finite
/// positive number or above 10^4, where the two agree to 1e-4: statrs's t quantile at a
/// huge `df` does not return).
fn t_at(level: f64, df: f64) -> f64 {
    let p = 0.5 + level / 2.0;
    if !df.is_finite() || df <= 0.0 || df > 1e4 {
        return Normal::new(0.0, 1.0).map_or(f64::NAN, |n| n.inverse_cdf(p));
    }
    StudentsT::new(0.0, 1.0, df).map_or(f64::INFINITY, |t| t.inverse_cdf(p))
}

/// The degrees of freedom behind a row's 95% interval: the `df` whose 97.5% t quantile is
/// the interval's half-width over the standard error (the rows keep the interval, not `df`).
fn df_of(r: &ExponentRow) -> f64 {
    let ratio = (r.ci_high - r.slope) / r.se;
    if !ratio.is_finite() || ratio <= 0.0 {
        return f64::INFINITY;
    }
    (1..=1000)
        .map(|df| (df, t_at(0.95, df as f64)))
        .min_by(|a, b| (a.1 - ratio).abs().total_cmp(&(b.1 - ratio).abs()))
        .filter(|(_, t)| (t - ratio).abs() < 1e-3 * ratio)
        .map_or(f64::INFINITY, |(df, _)| df as f64)
}

/// A 95% interval `lo..hi` around `centre` narrowed to 90% on `df` degrees of freedom (an
/// unbounded interval stays unbounded).
fn to_90(centre: f64, lo: f64, hi: f64, df: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite() && centre.is_finite()) {
        return (lo, hi);
    }
    let shrink = t_at(0.90, df) / t_at(0.95, df);
    (
        centre - (centre - lo) * shrink,
        centre + (hi - centre) * shrink,
    )
}

/// The 90% interval of a row's slope.
pub fn slope_90(r: &ExponentRow) -> (f64, f64) {
    to_90(r.slope, r.ci_low, r.ci_high, df_of(r))
}

/// The 90% interval of the estimate the outcome was decided on: measured minus law when the
/// law gives values per seed, else the slope.
fn tested_90(r: &ExponentRow) -> (f64, f64) {
    match (r.diff, r.diff_ci_low, r.diff_ci_high) {
        (Some(d), Some(lo), Some(hi)) => to_90(d, lo, hi, df_of(r)),
        _ => slope_90(r),
    }
}

/// The scaling in words: "standard LoRA", "rsLoRA", "a constant scaling", "beta = 0.75".
fn scaling_words(s: Scaling) -> String {
    if s == Scaling::LORA {
        "standard LoRA".into()
    } else if s == Scaling::RSLORA {
        "rsLoRA".into()
    } else if s == Scaling::CONSTANT {
        "a constant scaling".into()
    } else {
        format!("gamma = alpha r^-{}", s.beta())
    }
}

fn optimizer_words(o: Optimizer) -> String {
    match o {
        Optimizer::Sgd => "SGD".into(),
        Optimizer::SgdMomentum => "SGD with momentum".into(),
        Optimizer::Adam => "Adam".into(),
        Optimizer::Adamw => "AdamW".into(),
    }
}

/// "r^-0.49 [-0.53, -0.45]".
fn exponent(slope: f64, (lo, hi): (f64, f64)) -> String {
    format!("r^{slope:+.2} [{lo:+.2}, {hi:+.2}]")
}

/// What the stability verdict says the moments do: "are rank-flat", "shrink", "grow".
fn stability_words(v: Verdict) -> &'static str {
    match v {
        Verdict::Stable => "are rank-flat",
        Verdict::Collapsing => "shrink",
        Verdict::Exploding => "grow",
        Verdict::Diverged => "diverged",
        Verdict::Undetermined => "change by an amount the data do not resolve",
    }
}

/// Why an inconclusive fit is inconclusive, in a few words.
fn why_inconclusive(r: &ExponentRow) -> String {
    let Some(p) = r.predicted else {
        let why = r.law.strip_prefix("none:").map_or(r.law.trim(), str::trim);
        // Keep the reason, not its references.
        let why = why.split(" (").next().unwrap_or(why).trim();
        return if why.is_empty() {
            "no law predicts it".into()
        } else {
            format!("no law predicts it ({why})")
        };
    };
    let band = r.band.unwrap_or(f64::NAN);
    let ranks = r.ranks.split(',').filter(|s| !s.is_empty()).count();
    let (lo, hi) = tested_90(r);
    let centre = if r.diff.is_some() { 0.0 } else { p };
    if r.source != "theory" && r.seeds < MIN_SEEDS {
        format!("too few seeds ({} of the {MIN_SEEDS} needed)", r.seeds)
    } else if r.source != "theory" && ranks < MIN_RANKS {
        format!("too few ranks ({ranks} of the {MIN_RANKS} needed)")
    } else if hi - lo > 2.0 * band {
        format!(
            "its 90% interval ({:.2} wide) is wider than the band ({:.2})",
            hi - lo,
            2.0 * band
        )
    } else if lo < centre - band || hi > centre + band {
        "its 90% interval straddles the band's edge".into()
    } else {
        "not decided after the Benjamini-Hochberg correction, or its ranks do not reach d/8".into()
    }
}

/// The rule's outcome of one fit in plain words: "predicted -0.50 ± 0.05" when it agrees
/// (the sentence then says the prediction holds), with "does NOT hold" when it disagrees,
/// and why when it is inconclusive.
pub fn outcome_words(r: &ExponentRow) -> String {
    let band = r.band.unwrap_or(f64::NAN);
    match (r.outcome, r.predicted) {
        (Outcome::Agrees, Some(p)) => format!("predicted {p:+.2} \u{b1} {band:.2}"),
        (Outcome::Disagrees, Some(p)) => {
            format!("predicted {p:+.2} \u{b1} {band:.2}: does NOT hold")
        }
        (_, None) => format!("inconclusive: {}", why_inconclusive(r)),
        (_, Some(p)) => format!(
            "predicted {p:+.2} \u{b1} {band:.2}: inconclusive, {}",
            why_inconclusive(r)
        ),
    }
}

/// Who a sentence speaks for: a source and a setting (theory: optimizer and input regime;
/// training: model, optimizer and learning rate).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SettingKey {
    source_order: u8,
    source: String,
    model: String,
    optimizer: Optimizer,
    setting: String,
}

fn source_order(source: &str) -> u8 {
    match source {
        "theory" => 0,
        "train" => 1,
        "audit" => 2,
        _ => 3,
    }
}

/// The primary fits among a theory run's shown rows (layer 0, last step).
pub(super) fn theory_primary(shown: &[ExponentRow]) -> Vec<&ExponentRow> {
    shown
        .iter()
        .filter(|r| r.site == Site::Fwd && r.stat == Stat::Abs)
        .collect()
}

/// The primary fits among training (or audit) rows shown (each module pooled over its
/// layers, or its one layer).
pub(super) fn train_primary<'a>(rows: &'a [ExponentRow]) -> Vec<&'a ExponentRow> {
    let pooled = |_: &&ExponentRow| true;
    // One moment per module keeps a sentence short: the second (the output's scale,
    // E|y|^2) when it was recorded; every fit stays in the tables below the card.
    let second = |v: Vec<&'a ExponentRow>| -> Vec<&'a ExponentRow> {
        if v.iter().any(|r| r.m == 2) {
            v.into_iter().filter(|r| r.m == 2).collect()
        } else {
            v
        }
    };
    let with_law: Vec<&ExponentRow> = rows
        .iter()
        .filter(pooled)
        .filter(|r| r.predicted.is_some())
        .collect();
    if !with_law.is_empty() {
        return second(with_law);
    }
    let first = rows
        .iter()
        .filter(|r| r.source == "audit" || r.window != Window::step(0))
        .map(|r| r.window)
        .min();
    second(
        rows.iter()
            .filter(pooled)
            .filter(|r| r.site == Site::Fwd && r.stat == Stat::Abs && Some(r.window) == first)
            .collect(),
    )
}

/// "4-64".
fn rank_span(ranks: &str) -> String {
    let v: Vec<&str> = ranks.split(',').filter(|s| !s.is_empty()).collect();
    match (v.first(), v.last()) {
        (Some(a), Some(b)) if v.len() > 1 => format!("{} ranks {a}-{b}", v.len()),
        (Some(a), _) => format!("1 rank ({a})"),
        _ => "no ranks".into(),
    }
}

/// The sentences and figure points of the primary fits `rows` (theory, training and audit
/// rows alike; the order is theory, train, audit, then optimizer and setting).
pub fn sentences(rows: &[&ExponentRow]) -> Headline {
    let mut groups: BTreeMap<SettingKey, Vec<&ExponentRow>> = BTreeMap::new();
    for r in rows {
        let theory = r.source == "theory";
        let key = SettingKey {
            source_order: source_order(&r.source),
            source: r.source.clone(),
            model: if theory {
                String::new()
            } else {
                r.model.clone()
            },
            optimizer: r.optimizer,
            setting: if theory {
                format!("{} inputs", r.inputs)
            } else if r.lr.is_empty() {
                String::new()
            } else {
                format!("lr {}", r.lr)
            },
        };
        groups.entry(key).or_default().push(r);
    }
    let mut out = Headline::default();
    for (key, mut rows) in groups {
        rows.sort_by(|a, b| (a.scaling, &a.module).cmp(&(b.scaling, &b.module)));
        let theory = key.source == "theory";
        let lr = if key.setting.is_empty() {
            String::new()
        } else {
            format!(", {}", key.setting)
        };
        let where_ = match key.source.as_str() {
            "theory" => format!("theory checker, {}", key.setting),
            "audit" => format!("audit of {}{lr}", key.model),
            _ => format!("training {}{lr}", key.model),
        };
        let max_seeds = rows.iter().map(|r| r.seeds).max().unwrap_or(0);
        let min_seeds = rows.iter().map(|r| r.seeds).min().unwrap_or(0);
        let seeds = if min_seeds == max_seeds {
            format!("{max_seeds}")
        } else {
            format!("{min_seeds}-{max_seeds}")
        };
        let unit = match (theory, max_seeds) {
            (true, 1) => "trial",
            (true, _) => "trials",
            (false, 1) => "seed",
            (false, _) => "seeds",
        };
        let span = rows.first().map_or(String::new(), |r| rank_span(&r.ranks));
        let mut by_scaling: BTreeMap<Scaling, Vec<&ExponentRow>> = BTreeMap::new();
        for r in &rows {
            by_scaling.entry(r.scaling).or_default().push(r);
        }
        let mut clauses = Vec::new();
        let mut flat = Vec::new();
        let mut unresolved = false;
        for (scaling, fits) in &by_scaling {
            let who = scaling_words(*scaling);
            let one = fits.len() == 1;
            // One shared outcome is said once, after the list, not after every module.
            let words: Vec<String> = fits.iter().map(|r| outcome_words(r)).collect();
            let shared = !one && words.iter().all(|w| *w == words[0]);
            let mut parts: Vec<String> = fits
                .iter()
                .zip(&words)
                .map(|(r, w)| {
                    let module = if theory || one || r.module.is_empty() {
                        String::new()
                    } else {
                        format!("{} ", r.module)
                    };
                    let e = exponent(r.slope, slope_90(r));
                    if shared {
                        format!("{module}{e}")
                    } else {
                        format!("{module}{e} ({w})")
                    }
                })
                .collect();
            if shared {
                if let Some(last) = parts.last_mut() {
                    last.push_str(&format!(" (each {})", words[0]));
                }
            }
            let verdicts: Vec<Verdict> = fits.iter().map(|r| r.verdict).collect();
            let same = verdicts.iter().all(|v| *v == verdicts[0]);
            let verb = if same {
                stability_words(verdicts[0])
            } else {
                "differ between modules"
            };
            if verdicts.iter().all(|v| *v == Verdict::Stable) {
                flat.push(who.clone());
            } else if !verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Collapsing | Verdict::Exploding))
            {
                unresolved = true;
            }
            let joiner = if one && same && verdicts[0] != Verdict::Undetermined {
                if verdicts[0] == Verdict::Stable {
                    ", "
                } else {
                    " as "
                }
            } else {
                ": "
            };
            clauses.push(format!(
                "{who}'s moments {verb}{joiner}{}",
                parts.join(", ")
            ));
        }
        let n = rows.len();
        let count = |o: Outcome| rows.iter().filter(|r| r.outcome == o).count();
        let (disagree, inconclusive) = (count(Outcome::Disagrees), count(Outcome::Inconclusive));
        let outcome = if disagree > 0 {
            Outcome::Disagrees
        } else if inconclusive > 0 {
            Outcome::Inconclusive
        } else {
            Outcome::Agrees
        };
        let answer = match (flat.as_slice(), unresolved) {
            ([], false) => "None of these scalings is rank-stable here".to_string(),
            ([], true) => "Rank-stability is not resolved here for any scaling".to_string(),
            (f, _) => format!("Rank-stable here: {}", f.join(" and ")),
        };
        let of = |k: usize| {
            if k == n {
                if n == 1 {
                    "the fit".to_string()
                } else {
                    format!("all {n} fits")
                }
            } else {
                format!("{k} of {n} fits")
            }
        };
        let law = if disagree > 0 {
            format!("the prediction does NOT hold for {}", of(disagree))
        } else if inconclusive > 0 {
            format!(
                "inconclusive for {}: the data neither confirm nor refute the prediction there",
                of(inconclusive)
            )
        } else {
            "the theorem's prediction holds for every fit".to_string()
        };
        let text = format!(
            "Under {} ({where_}; {span}, {seeds} {unit}): {}. {answer}; {law}.",
            optimizer_words(key.optimizer),
            clauses.join("; "),
        );
        for r in &rows {
            let (lo90, hi90) = slope_90(r);
            let what = if theory {
                key.setting.clone()
            } else {
                format!("{} {}", key.model, r.module)
            };
            out.points.push(HeadlinePoint {
                label: format!("{} | {} {what} | {}", key.source, key.optimizer, r.scaling),
                source: key.source.clone(),
                slope: r.slope,
                lo90,
                hi90,
                predicted: r.predicted,
                band: r.band,
                outcome: r.outcome,
            });
        }
        out.sentences.push(Sentence {
            source: key.source,
            outcome,
            text,
        });
    }
    out
}

/// One sentence per rank exponent of lr* of a transfer study: "Under SGD, rsLoRA (init a;
/// ranks 2..64, 6 seeds): lr* ~ r^+0.52 [+0.44, +0.61]; the long-horizon law says +0.50
/// (agrees); c = 0 is rejected: the learning rate must be retuned when the rank changes."
/// The sentence's outcome is the exponent's against the law.
pub fn transfer_sentences(t: &TransferSummary) -> Vec<Sentence> {
    t.exponents
        .iter()
        .filter(|e| e.axis == Study::Rank)
        .map(|e| Sentence {
            source: "transfer".into(),
            outcome: e.outcome,
            text: transfer_sentence(e, t.seeds),
        })
        .collect()
}

fn transfer_sentence(e: &Exponent, seeds: usize) -> String {
    let scaling =
        Scaling::from_beta(e.beta).map_or_else(|_| format!("beta = {}", e.beta), scaling_words);
    let ratio = if e.lr_ratio == 1.0 {
        String::new()
    } else {
        format!(", lr_B/lr_A = {}", e.lr_ratio)
    };
    let span = match (e.values.first(), e.values.last()) {
        (Some(a), Some(b)) => format!("ranks {a}..{b}"),
        _ => "no ranks".into(),
    };
    let head = format!(
        "Under {}, {scaling} (init {}{ratio}; {span}, {seeds} seeds)",
        optimizer_words(e.optimizer),
        e.init
    );
    let Some(c) = e.slope else {
        return format!("{head}: lr* is not located at every rank ({}).", e.reason);
    };
    let measured = match (e.ci_low, e.ci_high) {
        (Some(lo), Some(hi)) => format!("lr* ~ r^{c:+.2} [{lo:+.2}, {hi:+.2}]"),
        _ => format!("lr* ~ r^{c:+.2} (no interval: {})", e.reason),
    };
    let law = match e.outcome {
        Outcome::Agrees => "agrees",
        Outcome::Disagrees => "does NOT hold",
        Outcome::Inconclusive => "inconclusive",
    };
    let flat = match e.flat {
        Outcome::Agrees => "c = 0 holds: one learning rate serves every rank",
        Outcome::Disagrees => {
            "c = 0 is rejected: the learning rate must be retuned when the rank changes"
        }
        Outcome::Inconclusive => "c = 0 is neither confirmed nor rejected",
    };
    let helps = match (e.loss_slope_ci_low, e.loss_slope_ci_high) {
        (_, Some(h)) if h < 0.0 => "; at lr* more rank ends lower",
        (Some(l), _) if l > 0.0 => "; at lr* more rank ends higher",
        (Some(_), Some(_)) => "; at lr* the loss does not measurably change with rank",
        _ => "",
    };
    let law = if e.predicted.is_finite() {
        format!("the long-horizon law says {:+.2} ({law})", e.predicted)
    } else {
        "no law predicts it for a trained model".into()
    };
    format!("{head}: {measured}; {law}; {flat}{helps}.")
}

#[cfg(test)]
mod tests {

    /// A fit without an interval (one seed: unbounded) keeps it, and large or infinite
    /// degrees of freedom give the normal's quantiles, at once.
    #[test]
    fn unbounded_intervals_and_infinite_df_are_quick() {
        let t0 = std::time::Instant::now();
        assert_eq!(
            to_90(-0.47, f64::NEG_INFINITY, f64::INFINITY, 0.0),
            (f64::NEG_INFINITY, f64::INFINITY)
        );
        for df in [f64::INFINITY, 0.0, 1e9, 2e4] {
            assert!((t_at(0.95, df) - 1.959_964).abs() < 1e-4, "{df}");
            assert!((t_at(0.90, df) - 1.644_854).abs() < 1e-4, "{df}");
        }
        assert!((t_at(0.95, 4.0) - 2.776_445).abs() < 1e-5);
        let (lo, hi) = to_90(0.0, -2.776_445, 2.776_445, 4.0);
        assert!(
            (hi - 2.131_847).abs() < 1e-5 && (lo + hi).abs() < 1e-12,
            "{lo} {hi}"
        );
        assert!(t0.elapsed().as_secs_f64() < 5.0);
    }

    use super::*;

    /// A judged fit: slope with a 95% interval from se on 5 df, its law and outcome.
    fn fit(
        source: &str,
        scaling: Scaling,
        slope: f64,
        predicted: Option<f64>,
        outcome: Outcome,
        verdict: Verdict,
    ) -> ExponentRow {
        let se = 0.02;
        let t = t_at(0.95, 5.0);
        ExponentRow {
            source: source.into(),
            model: "gpt-j-mini".into(),
            module: "q_proj".into(),
            layer: if source == "theory" {
                rankstab_records::Layer::Index(0)
            } else {
                rankstab_records::Layer::All
            },
            window: Window::step(1),
            optimizer: Optimizer::Adamw,
            scaling,
            lr: "5e-05".into(),
            inputs: "coherent".into(),
            site: Site::Fwd,
            stat: Stat::Abs,
            m: 2,
            ranks: "4,8,16,32,64".into(),
            seeds: 6,
            slope,
            se,
            ci_low: slope - t * se,
            ci_high: slope + t * se,
            law: if predicted.is_some() {
                "exact first step".into()
            } else {
                "none: no law for Adam after step 1".into()
            },
            predicted,
            band: predicted.map(|_| 0.05),
            outcome,
            verdict,
            ..ExponentRow::default()
        }
    }

    #[test]
    fn ninety_percent_interval_is_narrower_than_the_95_percent_one() {
        let r = fit(
            "train",
            Scaling::LORA,
            -0.5,
            Some(-0.5),
            Outcome::Agrees,
            Verdict::Collapsing,
        );
        assert!((df_of(&r) - 5.0).abs() < 1e-9, "df {}", df_of(&r));
        let (lo, hi) = slope_90(&r);
        // t(0.95, 5) = 2.015: the 90% half-width is 2.015 * se.
        assert!((hi - lo - 2.0 * 2.015 * 0.02).abs() < 1e-3, "{lo} {hi}");
    }

    #[test]
    fn agreeing_fits_say_the_prediction_holds_and_which_scaling_is_flat() {
        let lora = fit(
            "train",
            Scaling::LORA,
            -0.49,
            Some(-0.5),
            Outcome::Agrees,
            Verdict::Collapsing,
        );
        let rs = fit(
            "train",
            Scaling::RSLORA,
            0.01,
            Some(0.0),
            Outcome::Agrees,
            Verdict::Stable,
        );
        let h = sentences(&[&rs, &lora]);
        assert_eq!(h.sentences.len(), 1);
        let s = &h.sentences[0];
        assert_eq!(s.outcome, Outcome::Agrees);
        assert_eq!(
            s.text,
            "Under AdamW (training gpt-j-mini, lr 5e-05; 5 ranks 4-64, 6 seeds): standard LoRA's moments \
             shrink as r^-0.49 [-0.53, -0.45] (predicted -0.50 \u{b1} 0.05); rsLoRA's moments are rank-flat, \
             r^+0.01 [-0.03, +0.05] (predicted +0.00 \u{b1} 0.05). Rank-stable here: rsLoRA; the theorem's \
             prediction holds for every fit."
        );
        assert_eq!(h.points.len(), 2);
        assert_eq!(h.points[0].label, "train | adamw gpt-j-mini q_proj | lora");
        assert!((h.points[0].hi90 - h.points[0].lo90 - 2.0 * 2.015 * 0.02).abs() < 1e-3);
    }

    #[test]
    fn a_disagreeing_fit_says_the_prediction_does_not_hold() {
        let rs = fit(
            "theory",
            Scaling::RSLORA,
            0.72,
            Some(0.0),
            Outcome::Disagrees,
            Verdict::Exploding,
        );
        let h = sentences(&[&rs]);
        let s = &h.sentences[0];
        assert_eq!(s.outcome, Outcome::Disagrees);
        assert!(h.any_disagrees());
        assert_eq!(
            s.text,
            "Under AdamW (theory checker, coherent inputs; 5 ranks 4-64, 6 trials): rsLoRA's moments grow \
             as r^+0.72 [+0.68, +0.76] (predicted +0.00 \u{b1} 0.05: does NOT hold). None of these scalings is \
             rank-stable here; the prediction does NOT hold for the fit."
        );
        assert!(!s.text.contains("prediction holds"), "{}", s.text);
    }

    #[test]
    fn inconclusive_fits_say_why() {
        let mut few = fit(
            "audit",
            Scaling::RSLORA,
            0.1,
            Some(0.0),
            Outcome::Inconclusive,
            Verdict::Undetermined,
        );
        few.seeds = 2;
        let h = sentences(&[&few]);
        let s = &h.sentences[0];
        assert_eq!(
            (s.source.as_str(), s.outcome),
            ("audit", Outcome::Inconclusive)
        );
        assert!(
            s.text
                .contains("(audit of gpt-j-mini, lr 5e-05; 5 ranks 4-64, 2 seeds)"),
            "{}",
            s.text
        );
        assert!(
            s.text
                .contains("inconclusive, too few seeds (2 of the 3 needed)"),
            "{}",
            s.text
        );
        assert!(
            s.text.contains("Rank-stability is not resolved here"),
            "{}",
            s.text
        );
        assert!(
            s.text
                .contains("inconclusive for the fit: the data neither confirm nor refute"),
            "{}",
            s.text
        );

        let mut wide = fit(
            "train",
            Scaling::LORA,
            -0.3,
            Some(-0.5),
            Outcome::Inconclusive,
            Verdict::Undetermined,
        );
        wide.se = 0.3;
        wide.ci_low = -0.3 - t_at(0.95, 5.0) * 0.3;
        wide.ci_high = -0.3 + t_at(0.95, 5.0) * 0.3;
        let s = outcome_words(&wide);
        assert!(s.contains("is wider than the band"), "{s}");

        let none = fit(
            "train",
            Scaling::LORA,
            -0.3,
            None,
            Outcome::Inconclusive,
            Verdict::Collapsing,
        );
        assert_eq!(
            outcome_words(&none),
            "inconclusive: no law predicts it (no law for Adam after step 1)"
        );
    }

    #[test]
    fn a_rank_exponent_of_lr_opt_is_one_short_sentence() {
        let mut e = Exponent {
            axis: Study::Rank,
            optimizer: Optimizer::Sgd,
            beta: 0.5,
            init: rankstab_theory::AdapterInit::A,
            lr_ratio: 1.0,
            width: Some(128),
            rank: None,
            values: vec![2, 4, 8, 16, 32, 64],
            slope: Some(0.52),
            ci_low: Some(0.44),
            ci_high: Some(0.61),
            se: Some(0.04),
            df: 5.0,
            predicted: 0.5,
            first_step: 0.0,
            first_step_outcome: Outcome::Disagrees,
            limits: None,
            band: 0.1,
            outcome: Outcome::Agrees,
            flat: Outcome::Disagrees,
            reason: String::new(),
            loss_slope: None,
            loss_slope_ci_low: None,
            loss_slope_ci_high: None,
        };
        assert_eq!(
            transfer_sentence(&e, 6),
            "Under SGD, rsLoRA (init a; ranks 2..64, 6 seeds): lr* ~ r^+0.52 [+0.44, +0.61]; the \
             long-horizon law says +0.50 (agrees); c = 0 is rejected: the learning rate must be \
             retuned when the rank changes."
        );
        e.slope = None;
        e.reason = "lr* at rank 2 below the grid: lower --lrs".into();
        assert_eq!(
            transfer_sentence(&e, 6),
            "Under SGD, rsLoRA (init a; ranks 2..64, 6 seeds): lr* is not located at every rank \
             (lr* at rank 2 below the grid: lower --lrs)."
        );
    }

    #[test]
    fn sources_come_in_order_theory_train_audit() {
        let a = fit(
            "audit",
            Scaling::LORA,
            -0.5,
            Some(-0.5),
            Outcome::Agrees,
            Verdict::Collapsing,
        );
        let t = fit(
            "train",
            Scaling::LORA,
            -0.5,
            Some(-0.5),
            Outcome::Agrees,
            Verdict::Collapsing,
        );
        let th = fit(
            "theory",
            Scaling::LORA,
            -0.5,
            Some(-0.5),
            Outcome::Agrees,
            Verdict::Collapsing,
        );
        let h = sentences(&[&a, &t, &th]);
        let order: Vec<&str> = h.sentences.iter().map(|s| s.source.as_str()).collect();
        assert_eq!(order, ["theory", "train", "audit"]);
    }
}
