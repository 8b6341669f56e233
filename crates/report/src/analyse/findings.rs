//! The paper's findings next to ours: the average gradient norm of standard LoRA and of
//! rsLoRA against rank (from the training runs' metric or B-gradient norms, and from the
//! theory runs' Monte Carlo), and the best perplexity of each.
//!
//! Ours claims only what was measured: a gradient-norm factor is stated over the measured
//! ranks (never extrapolated to the paper's r = 2048), and the perplexity comparison is made
//! only when it can mean what the paper's does ([`MIN_PPL_SEEDS`] seeds, a pretrained model,
//! the learning rate chosen per rank and scaling); otherwise the row says "not tested here"
//! and why.
use super::fit::{fit_by_rank, put, step_windows, window_mean, ByStep, Means};
use super::row::fmt_ranks;
use super::runs::run_lr;
use super::{AnalysisOptions, TheorySection};
use crate::load::Run;
use rankstab_records::{Layer, Metric, Optimizer, Scaling, Site, Stat, Window};
use rankstab_theory::stats::SlopeFit;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// One of the paper's reported findings next to ours.
#[derive(Debug, Clone, Serialize)]
pub struct PaperRow {
    /// The finding.
    pub finding: String,
    /// What the paper reports.
    pub paper: String,
    /// What we measured.
    pub ours: String,
    /// Where ours comes from (run, setting).
    pub source: String,
    /// "same setup", "shape only (...)", or "not measured".
    pub comparable: String,
}

/// The paper's largest rank.
const PAPER_TOP_RANK: u32 = 2048;

/// Seeds per cell a perplexity comparison needs.
pub const MIN_PPL_SEEDS: usize = 3;

/// A fitted exponent over the measured ranks `ranks`, as the findings state it: the factor
/// from the smallest to the largest rank measured with its interval, and never beyond (e.g.
/// "exponent -0.50 [-0.52, -0.48] over r = 4..32: x0.354 [0.339, 0.369] from r=4 to 32
/// (-0.5 orders of magnitude); not measured at r = 2048").
fn describe_factor(slope: f64, ci_low: f64, ci_high: f64, ranks: &[u32]) -> String {
    let (Some(&lo), Some(&hi)) = (ranks.first(), ranks.last()) else {
        return format!("exponent {slope:+.2} [{ci_low:+.2}, {ci_high:+.2}]");
    };
    let span = f64::from(hi) / f64::from(lo);
    let f = |s: f64| span.powf(s);
    format!(
        "exponent {slope:+.2} [{ci_low:+.2}, {ci_high:+.2}] over r = {lo}..{hi}: x{} [{}, {}] from r={lo} to {hi} \
         ({:+.1} orders of magnitude){}",
        fmt_sig(f(slope)),
        fmt_sig(f(ci_low)),
        fmt_sig(f(ci_high)),
        f(slope).log10(),
        if ranks.contains(&PAPER_TOP_RANK) {
            String::new()
        } else {
            format!("; not measured at r = {PAPER_TOP_RANK}")
        }
    )
}

fn fmt_sig(x: f64) -> String {
    if !(0.01..100.0).contains(&x) {
        format!("{x:.2e}")
    } else {
        format!("{x:.3}")
    }
}

/// The findings' rows, in the paper's order.
pub(super) fn paper_rows(
    theory: &[TheorySection],
    train_runs: &[&Run],
    opts: &AnalysisOptions,
) -> Vec<PaperRow> {
    let mut out = Vec::new();
    let findings = [
        (Scaling::LORA, "Standard LoRA: the average parameter gradient norm falls with rank", "about two orders of magnitude lower at r=2048 than at r=4 (AdamW; Llama 2 7B, OpenOrca)"),
        (Scaling::RSLORA, "rsLoRA: the average parameter gradient norm stays rank-stable", "within one order of magnitude from r=4 to r=2048 (AdamW; Llama 2 7B, OpenOrca)"),
    ];
    for (scaling, finding, paper) in findings {
        let row = |ours: String, source: String, comparable: String| PaperRow {
            finding: finding.into(),
            paper: paper.into(),
            ours,
            source,
            comparable,
        };
        let before = out.len();
        // Training: the grad_norm_avg metric's exponent in the last window (or the B-gradient
        // norm pooled over modules and layers when the metric is absent).
        for e in train_grad_norm_exponents(train_runs, scaling, opts) {
            let ranks = fmt_ranks(&e.ranks);
            let same = e.model.to_lowercase().contains("llama-2-7b")
                && e.optimizer == Optimizer::Adamw
                && e.ranks.first() == Some(&4)
                && e.ranks.last() == Some(&PAPER_TOP_RANK);
            out.push(row(
                describe_factor(e.fit.slope, e.fit.ci_low, e.fit.ci_high, &e.ranks),
                format!(
                    "training: {}, {}, {}, ranks {ranks}",
                    e.model, e.optimizer, e.what
                ),
                if same {
                    "same setup".into()
                } else {
                    format!(
                        "shape only ({}, ranks {ranks}, not Llama 2 7B at r=4..2048)",
                        e.model
                    )
                },
            ));
        }
        // Theory: the Monte Carlo B-gradient norm under Adam(W) and SGD.
        for sec in theory {
            let last = sec.last_step().map(Window::step);
            for r in sec.rows.iter().filter(|r| {
                r.site == Site::Param
                    && r.stat == Stat::GradNormB
                    && r.scaling == scaling
                    && r.layer == Layer::Index(0)
                    && r.inputs == "coherent"
                    && Some(r.window) == last
            }) {
                let ranks: Vec<u32> = r.ranks.split(',').filter_map(|x| x.parse().ok()).collect();
                let span = match (ranks.first(), ranks.last()) {
                    (Some(&lo), Some(&hi)) => f64::from(hi) / f64::from(lo),
                    _ => f64::NAN,
                };
                let law = r.predicted.map_or("-".into(), |p| {
                    format!(
                        "{p:+.2}, x{} over the same ranks; outcome {}",
                        fmt_sig(span.powf(p)),
                        r.outcome
                    )
                });
                out.push(row(
                    describe_factor(r.slope, r.ci_low, r.ci_high, &ranks),
                    format!(
                        "theory run {}: {}, B-gradient norm, {}, ranks {}",
                        sec.run, r.optimizer, r.window, r.ranks
                    ),
                    format!("shape only (synthetic network; law predicts {law})"),
                ));
            }
        }
        if out.len() == before {
            out.push(row(
                "-".into(),
                "no gradient norms in the runs given".into(),
                "not measured".into(),
            ));
        }
    }
    out.push(perplexity_row(train_runs));
    out
}

/// A model trained with an optimizer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ModelOpt {
    model: String,
    optimizer: Optimizer,
}

/// The exponent of the average gradient norm against rank of one model and optimizer.
struct GradNormExponent {
    model: String,
    optimizer: Optimizer,
    fit: SlopeFit,
    /// What was fitted, over which window.
    what: String,
    ranks: Vec<u32>,
}

/// Whether `run` uses the most common learning rate among the runs of its optimizer (each
/// optimizer has its own): with several learning rates, like is compared with like.
fn at_common_lr(run: &Run, train_runs: &[&Run]) -> bool {
    let opt_of = |r: &Run| r.metrics.first().map(|m| m.optimizer);
    let lrs: Vec<String> = train_runs
        .iter()
        .filter(|r| opt_of(r) == opt_of(run))
        .filter_map(|r| run_lr(r))
        .collect();
    let own = run_lr(run);
    if own.is_none() || lrs.iter().collect::<BTreeSet<_>>().len() <= 1 {
        return true;
    }
    let mode = lrs
        .iter()
        .max_by_key(|l| lrs.iter().filter(|x| x == l).count())
        .cloned();
    own == mode
}

/// The average gradient norm's exponent per model and optimizer for `scaling`: the metric
/// `grad_norm_avg`, else the mean B-gradient norm over adapters.
fn train_grad_norm_exponents(
    train_runs: &[&Run],
    scaling: Scaling,
    opts: &AnalysisOptions,
) -> Vec<GradNormExponent> {
    // model, optimizer -> step -> rank -> seed -> value
    let mut g: BTreeMap<ModelOpt, ByStep> = BTreeMap::new();
    let mut what = "metric grad_norm_avg";
    for run in train_runs.iter().filter(|r| at_common_lr(r, train_runs)) {
        for r in run
            .metrics
            .iter()
            .filter(|r| r.metric == Metric::GradNormAvg && r.scaling == scaling)
        {
            let at = ModelOpt {
                model: r.model.clone(),
                optimizer: r.optimizer,
            };
            put(g.entry(at).or_default(), r.step, r.rank, r.seed, r.value);
        }
    }
    if g.is_empty() {
        what = "mean B-gradient norm over adapters";
        g = mean_b_grad_norms(train_runs, scaling);
    }
    let mut out = Vec::new();
    for (at, by_step) in g {
        let steps: Vec<u32> = by_step.keys().copied().collect();
        let Some(w) = step_windows(&steps, opts.windows).into_iter().last() else {
            continue;
        };
        if let Some((ranks, _, fit)) = fit_by_rank(&window_mean(&by_step, w)) {
            out.push(GradNormExponent {
                model: at.model,
                optimizer: at.optimizer,
                fit,
                what: format!("{what}, {w}"),
                ranks,
            });
        }
    }
    out
}

/// A value of one run's B-gradient norms before the mean over adapters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct AdapterMean {
    at: ModelOpt,
    step: u32,
    rank: u32,
    seed: u64,
}

/// Per model and optimizer, step, rank and seed: the mean B-gradient norm over adapters
/// (modules and layers) of each run.
fn mean_b_grad_norms(train_runs: &[&Run], scaling: Scaling) -> BTreeMap<ModelOpt, ByStep> {
    let mut g: BTreeMap<ModelOpt, ByStep> = BTreeMap::new();
    for run in train_runs {
        let mut means = Means::default();
        for r in run
            .moments
            .iter()
            .filter(|r| r.site == Site::Param && r.stat == Stat::GradNormB && r.scaling == scaling)
        {
            let at = ModelOpt {
                model: r.model.clone(),
                optimizer: r.optimizer,
            };
            let key = AdapterMean {
                at,
                step: r.step,
                rank: r.rank,
                seed: r.seed,
            };
            means.add(key, r.value);
        }
        for (k, mean) in means.means() {
            put(g.entry(k.at).or_default(), k.step, k.rank, k.seed, mean);
        }
    }
    g
}

/// A cell whose final held-out perplexity is compared.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FinalKey {
    at: ModelOpt,
    scaling: Scaling,
    rank: u32,
    lr: String,
}

/// The best final perplexity of `scaling` at `at`: (mean over seeds, rank, lr), among the
/// cells that `pick` keeps.
fn best(
    fin: &BTreeMap<FinalKey, BTreeMap<u64, (u32, f64)>>,
    at: &ModelOpt,
    scaling: Scaling,
    pick: impl Fn(&FinalKey) -> bool,
) -> Option<(f64, u32, String)> {
    let mean =
        |m: &BTreeMap<u64, (u32, f64)>| m.values().map(|v| v.1).sum::<f64>() / m.len() as f64;
    fin.iter()
        .filter(|(k, _)| &k.at == at && k.scaling == scaling && pick(k))
        .map(|(k, v)| (mean(v), k.rank, k.lr.clone()))
        .min_by(|a, b| a.0.total_cmp(&b.0))
}

/// Why the perplexity comparison of `at` would not mean what the paper's does (empty when
/// it can be made): too few seeds, no pretrained model, one learning rate per rank and
/// scaling.
fn untested(
    at: &ModelOpt,
    fin: &BTreeMap<FinalKey, BTreeMap<u64, (u32, f64)>>,
    train_runs: &[&Run],
) -> Vec<String> {
    let mut why = Vec::new();
    let cells: Vec<(&FinalKey, usize)> = fin
        .iter()
        .filter(|(k, _)| &k.at == at)
        .map(|(k, seeds)| (k, seeds.len()))
        .collect();
    let fewest = cells.iter().map(|c| c.1).min().unwrap_or(0);
    if fewest < MIN_PPL_SEEDS {
        why.push(format!(
            "{fewest} seed{} in a cell (>= {MIN_PPL_SEEDS} needed)",
            if fewest == 1 { "" } else { "s" }
        ));
    }
    let models: BTreeSet<Option<String>> = train_runs
        .iter()
        .filter(|r| {
            r.metrics
                .first()
                .is_some_and(|m| m.model == at.model && m.optimizer == at.optimizer)
        })
        .map(|r| run_model(r))
        .collect();
    if models.contains(&None) {
        why.push("the runs do not record their model (config.run.model), so it is not known to be pretrained".into());
    }
    let presets: Vec<&str> = models
        .iter()
        .flatten()
        .filter(|m| m.starts_with("preset:"))
        .map(String::as_str)
        .collect();
    if !presets.is_empty() {
        why.push(format!(
            "random weights ({}), not a pretrained model",
            presets.join(", ")
        ));
    }
    let mut lrs: BTreeMap<(Scaling, u32), BTreeSet<&str>> = BTreeMap::new();
    for (k, _) in &cells {
        lrs.entry((k.scaling, k.rank))
            .or_default()
            .insert(k.lr.as_str());
    }
    if lrs.values().any(|l| l.len() < 2) {
        why.push("one learning rate for some rank and scaling (the paper chooses it per rank and scaling)".into());
    }
    why
}

/// `config.run.model` of a run (`--model` of `rankstab train`: a path, or `preset:NAME` for
/// random weights).
fn run_model(run: &Run) -> Option<String> {
    run.manifest
        .config
        .get("run")
        .and_then(|r| r.get("model"))
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
}

fn perplexity_row(train_runs: &[&Run]) -> PaperRow {
    let finding = "Best perplexity: rsLoRA at high rank beats the best standard LoRA";
    let paper = "best LoRA (r=4, lr x10) 1.863 vs rsLoRA r=2048 1.836 (Llama 2 7B, OpenOrca)";
    // Final held-out perplexity per (model, optimizer, scaling, rank, lr), mean over seeds;
    // LoRA and rsLoRA are compared within one model and optimizer (the paper: AdamW).
    let mut fin: BTreeMap<FinalKey, BTreeMap<u64, (u32, f64)>> = BTreeMap::new();
    for run in train_runs {
        let lr = run_lr(run).unwrap_or_default();
        for r in run
            .metrics
            .iter()
            .filter(|r| r.metric == Metric::HeldoutPerplexity && r.value.is_finite())
        {
            let key = FinalKey {
                at: ModelOpt {
                    model: r.model.clone(),
                    optimizer: r.optimizer,
                },
                scaling: r.scaling,
                rank: r.rank,
                lr: lr.clone(),
            };
            let e = fin
                .entry(key)
                .or_default()
                .entry(r.seed)
                .or_insert((0, f64::NAN));
            if r.step >= e.0 {
                *e = (r.step, r.value);
            }
        }
    }
    let mut parts = Vec::new();
    let mut not_tested = Vec::new();
    let groups: BTreeSet<ModelOpt> = fin.keys().map(|k| k.at.clone()).collect();
    for at in &groups {
        let model = format!("{} ({})", at.model, at.optimizer);
        let why = untested(at, &fin, train_runs);
        if !why.is_empty() {
            not_tested.push(format!("{model}: {}", why.join("; ")));
            continue;
        }
        let best_lora = best(&fin, at, Scaling::LORA, |_| true);
        let top_rank = fin
            .keys()
            .filter(|k| &k.at == at && k.scaling == Scaling::RSLORA)
            .map(|k| k.rank)
            .max();
        let top_rs = best(&fin, at, Scaling::RSLORA, |k| Some(k.rank) == top_rank);
        let lr = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!(", lr {l}")
            }
        };
        match (best_lora, top_rs) {
            (Some(a), Some(b)) => parts.push(format!(
                "{model}: best LoRA (r={}{}) {:.4} vs rsLoRA r={}{} {:.4}",
                a.1,
                lr(&a.2),
                a.0,
                b.1,
                lr(&b.2),
                b.0
            )),
            (Some(a), None) => parts.push(format!(
                "{model}: best LoRA (r={}) {:.4}; no rsLoRA runs",
                a.1, a.0
            )),
            (None, Some(b)) => parts.push(format!(
                "{model}: rsLoRA r={} {:.4}; no LoRA runs",
                b.1, b.0
            )),
            (None, None) => {}
        }
    }
    if groups.is_empty() {
        return PaperRow {
            finding: finding.into(),
            paper: paper.into(),
            ours: "-".into(),
            source: "no held-out perplexity in the runs given".into(),
            comparable: "not measured".into(),
        };
    }
    let not_tested =
        (!not_tested.is_empty()).then(|| format!("not tested here: {}", not_tested.join("; ")));
    if parts.is_empty() {
        return PaperRow {
            finding: finding.into(),
            paper: paper.into(),
            ours: not_tested.unwrap_or_else(|| "-".into()),
            source: "training: final held-out perplexity".into(),
            comparable: "not tested".into(),
        };
    }
    let same = groups
        .iter()
        .any(|at| at.model.to_lowercase().contains("llama-2-7b"));
    PaperRow {
        finding: finding.into(),
        paper: paper.into(),
        ours: parts.into_iter().chain(not_tested).collect::<Vec<_>>().join("; "),
        source: format!(
            "training: final held-out perplexity, mean over seeds (>= {MIN_PPL_SEEDS}), pretrained model, best \
             learning rate per rank and scaling"
        ),
        comparable: if same {
            "same model (check data and steps)".into()
        } else {
            "shape only (other model, data and length)".into()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_are_stated_over_the_measured_ranks_only() {
        let s = describe_factor(-0.5, -0.52, -0.48, &[4, 8, 16, 32]);
        assert_eq!(
            s,
            "exponent -0.50 [-0.52, -0.48] over r = 4..32: x0.354 [0.339, 0.369] from r=4 to 32 \
             (-0.5 orders of magnitude); not measured at r = 2048"
        );
        let s = describe_factor(-0.5, -0.52, -0.48, &[4, 64, 2048]);
        assert!(
            s.contains("from r=4 to 2048") && !s.contains("not measured"),
            "{s}"
        );
    }
}
