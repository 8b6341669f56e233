//! The transfer study: its estimator against planted truths, its verdicts' power (a wrong
//! prediction is judged `disagrees`), determinism across thread counts, resume, and how
//! diverged runs and grid edges are reported.
use rankstab_records::{Optimizer, Outcome, Scaling};
use rankstab_theory::transfer::analyse::{analyse, analyse_with, judge_exponents, Laws, NO_LAW};
use rankstab_theory::transfer::law::DataTerms;
use rankstab_theory::transfer::{run, study, RunRow, Study, TransferConfig};
use rankstab_theory::{AdapterInit, NoProgress, RunOptions};

/// A small SGD + LoRA study: 4 seeds, ranks 2..32 at width 64, 100 steps (about a second
/// in an optimised build).
fn small() -> TransferConfig {
    TransferConfig {
        optimizers: vec![Optimizer::Sgd],
        scalings: vec![Scaling::LORA],
        ranks: vec![2, 4, 8, 16, 32],
        width: 64,
        widths: vec![],
        seeds: 4,
        steps: 100,
        bootstrap: 300,
        lrs_sgd: "1e-3:1e1:17".parse().expect("grid"),
        ..TransferConfig::default()
    }
}

/// The measured exponent of SGD + LoRA is near the long-horizon law's 1; the same data
/// judged against a planted wrong prediction (c = 0, "the lr transfers", and c = 2, the
/// one-step law's small-rank limit) says `disagrees`. A check that could not fail would
/// pass both.
#[test]
fn a_planted_wrong_prediction_is_judged_disagrees() {
    let s = study(&small()).expect("study runs");
    let e = s
        .exponents
        .iter()
        .find(|e| e.axis == Study::Rank)
        .expect("a rank exponent");
    let c = e.slope.expect("lr* located at every rank");
    assert!((c - 1.0).abs() < 0.3, "c = {c}");
    assert_ne!(e.outcome, Outcome::Disagrees, "{e:?}");
    assert_eq!(e.flat, Outcome::Disagrees, "c = 0 must be rejected: {e:?}");
    for planted in [0.0, 2.0] {
        let mut wrong = s.exponents.clone();
        for w in &mut wrong {
            w.predicted = planted;
        }
        judge_exponents(&mut wrong);
        assert_eq!(
            wrong[0].outcome,
            Outcome::Disagrees,
            "planted c = {planted} against measured {c}: {:?}",
            wrong[0]
        );
    }
}

/// The estimator alone, on rows whose lr* is planted: loss = exp((ln lr - ln lr*)^2) with
/// lr*(r) = 0.1 r^0.7 times a per-seed factor. The point estimate recovers 0.7 and its
/// interval covers it; the loss at lr* is the planted minimum.
#[test]
fn the_estimator_recovers_a_planted_exponent() {
    let cfg = TransferConfig {
        optimizers: vec![Optimizer::Sgd],
        scalings: vec![Scaling::LORA],
        ranks: vec![2, 4, 8, 16, 32, 64],
        widths: vec![],
        seeds: 6,
        bootstrap: 400,
        lrs_sgd: "1e-3:1e2:21".parse().expect("grid"),
        ..TransferConfig::default()
    };
    let seed_factor = [1.0, 1.1, 0.92, 1.05, 0.97, 1.02];
    let mut rows = Vec::new();
    for (k, f) in seed_factor.iter().enumerate() {
        for &r in &cfg.ranks {
            let star = 0.1 * (r as f64).powf(0.7) * f;
            for lr in cfg.lrs_sgd.values() {
                let z = (lr / star).ln();
                rows.push(RunRow {
                    trial: k as u32,
                    study: Study::Rank,
                    width: cfg.width as u32,
                    optimizer: Optimizer::Sgd,
                    beta: 1.0,
                    init: AdapterInit::A,
                    lr_ratio: 1.0,
                    rank: r as u32,
                    lr,
                    final_loss: 2.0 * (0.5 * z * z).exp(),
                    ..RunRow::default()
                });
            }
        }
    }
    let terms = vec![(
        cfg.width,
        0,
        DataTerms {
            lambda_max: 10.0,
            w_top: 2.8,
            ..DataTerms::default()
        },
    )];
    let s = analyse(&cfg, &rows, &[], &terms);
    let e = &s.exponents[0];
    let (c, lo, hi) = (
        e.slope.expect("c located"),
        e.ci_low.expect("interval"),
        e.ci_high.expect("interval"),
    );
    assert!((c - 0.7).abs() < 0.03, "c = {c}");
    assert!(lo < 0.7 && 0.7 < hi, "[{lo}, {hi}]");
    for cell in &s.cells {
        let l = cell.loss_at_opt.expect("loss at lr*");
        assert!((l - 2.0).abs() < 0.1, "rank {}: loss* {l}", cell.rank);
    }

    // The same rows as a trained model's (no law): the same c and interval, no prediction
    // (inconclusive, with the reason), and c = 0 still rejected; transfer.json writes the
    // missing prediction as null and reads it back.
    let n = analyse_with(&cfg, &rows, &[], Laws::None);
    let m = &n.exponents[0];
    assert_eq!(
        (m.slope, m.ci_low, m.ci_high),
        (e.slope, e.ci_low, e.ci_high)
    );
    assert!(m.predicted.is_nan() && m.first_step.is_nan());
    assert_eq!(m.outcome, Outcome::Inconclusive);
    assert_eq!(m.first_step_outcome, Outcome::Inconclusive);
    assert_eq!(m.reason, NO_LAW);
    assert_eq!(m.flat, Outcome::Disagrees, "c = 0.7 is not c = 0");
    assert!(n.cells.iter().all(|c| c.predicted_lr.is_none()));
    let json = serde_json::to_string(&n).expect("serialises");
    assert!(json.contains("\"predicted\":null"), "{json}");
    let back: rankstab_theory::transfer::analyse::TransferSummary =
        serde_json::from_str(&json).expect("reads back");
    assert!(back.exponents[0].predicted.is_nan());
    assert_eq!(back.exponents[0].slope, m.slope);
}

/// Runs that diverge are marked and count as infinite; a grid that stops below the optimum
/// reports the edge, never the edge as lr*, and leaves the exponent inconclusive.
#[test]
fn divergence_and_grid_edges_are_reported() {
    let mut cfg = small();
    cfg.ranks = vec![2, 8, 32];
    cfg.seeds = 2;
    cfg.steps = 40;
    cfg.lrs_sgd = "1e-1:1e3:9".parse().unwrap();
    let s = study(&cfg).expect("study runs");
    assert!(
        s.cells.iter().all(|c| c.diverged_runs > 0),
        "the top of this grid diverges"
    );
    // Every diverged point of a curve has no loss.
    for c in &s.cells {
        for p in &c.curve {
            assert_eq!(p.loss.is_none(), p.diverged > 0);
        }
    }
    cfg.lrs_sgd = "1e-6:1e-4:5".parse().unwrap();
    let s = study(&cfg).expect("study runs");
    for c in &s.cells {
        assert_eq!(c.edge.as_deref(), Some("above the grid"), "rank {}", c.rank);
        assert!(c.lr_opt.is_none());
    }
    let e = &s.exponents[0];
    assert_eq!(e.outcome, Outcome::Inconclusive);
    assert!(e.reason.contains("above the grid"), "{}", e.reason);
}

/// The same seed and config give the same tables at any thread count, and a study killed
/// after its first seed resumes to the same tables.
#[test]
fn results_do_not_depend_on_threads_or_interruption() {
    let mut cfg = small();
    cfg.ranks = vec![2, 8, 32];
    cfg.seeds = 2;
    cfg.steps = 30;
    let dir = tempfile::tempdir().unwrap();
    let read = |p: &std::path::Path| {
        (
            std::fs::read(p.join("transfer_runs.csv")).unwrap(),
            std::fs::read(p.join("transfer_steps.csv")).unwrap(),
            std::fs::read(p.join("transfer.json")).unwrap(),
        )
    };
    let mut outs = Vec::new();
    for threads in [1, 2] {
        let out = dir.path().join(format!("t{threads}"));
        let opts = RunOptions {
            threads: Some(threads),
            ..RunOptions::default()
        };
        run(&cfg, &out, &opts, &NoProgress).unwrap();
        outs.push(read(&out));
    }
    assert!(outs[0] == outs[1], "1 and 2 threads differ");
    let out = dir.path().join("resumed");
    let first = RunOptions {
        max_trials_this_run: Some(1),
        ..RunOptions::default()
    };
    let o = run(&cfg, &out, &first, &NoProgress).unwrap();
    assert!(!o.complete && !out.join("transfer.json").exists());
    let o = run(&cfg, &out, &RunOptions::default(), &NoProgress).unwrap();
    assert!(o.complete && o.seeds_run == 1);
    assert!(
        read(&out) == outs[0],
        "a resumed study differs from one run at once"
    );
    // The same directory with another configuration is refused.
    cfg.steps = 31;
    let err = run(&cfg, &out, &RunOptions::default(), &NoProgress).unwrap_err();
    assert!(err.to_string().contains("different configuration"), "{err}");
}
