//! The paper's findings next to ours: the average gradient norm of standard LoRA and of
//! rsLoRA against rank (from the training runs' metric or B-gradient norms, and from the
//! theory runs' Monte Carlo), and the best perplexity of each.
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

/// Factor by which a power law with exponent `slope` changes from r=4 to r=2048.
fn factor_4_to_2048(slope: f64) -> f64 {
    512f64.powf(slope)
}

fn describe_factor(fit: &SlopeFit) -> String {
    let f = factor_4_to_2048(fit.slope);
    format!(
        "exponent {:+.2} [{:+.2}, {:+.2}]: x{} from r=4 to 2048 ({:+.1} orders of magnitude)",
        fit.slope,
        fit.ci_low,
        fit.ci_high,
        fmt_sig(f),
        f.log10()
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
                && e.ranks.last() == Some(&2048);
            out.push(row(
                describe_factor(&e.fit),
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
                let law = r.predicted.map_or("-".into(), |p| {
                    format!("{p:+.2}, x{}", fmt_sig(factor_4_to_2048(p)))
                });
                out.push(row(
                    describe_factor(&r.fit()),
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
    let groups: BTreeSet<ModelOpt> = fin.keys().map(|k| k.at.clone()).collect();
    for at in &groups {
        let best_lora = best(&fin, at, Scaling::LORA, |_| true);
        let top_rank = fin
            .keys()
            .filter(|k| &k.at == at && k.scaling == Scaling::RSLORA)
            .map(|k| k.rank)
            .max();
        let top_rs = best(&fin, at, Scaling::RSLORA, |k| Some(k.rank) == top_rank);
        let model = format!("{} ({})", at.model, at.optimizer);
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
    if parts.is_empty() {
        return PaperRow {
            finding: finding.into(),
            paper: paper.into(),
            ours: "-".into(),
            source: "no held-out perplexity in the runs given".into(),
            comparable: "not measured".into(),
        };
    }
    let same = groups
        .iter()
        .any(|at| at.model.to_lowercase().contains("llama-2-7b"));
    PaperRow {
        finding: finding.into(),
        paper: paper.into(),
        ours: parts.join("; "),
        source: "training: final held-out perplexity, mean over seeds".into(),
        comparable: if same {
            "same model (check data and steps)".into()
        } else {
            "shape only (other model, data and length)".into()
        },
    }
}
