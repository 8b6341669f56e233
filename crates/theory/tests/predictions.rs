//! The verdicts of a smaller copy of the default grid (every site, statistic, optimizer,
//! scaling, input regime and step): the exact law is never refuted, most fits that can
//! tell it from a rival agree with it, and the rivals that differ from it are rejected.
use rankstab_records::{Outcome, Rival};
use rankstab_theory::{fit_rows, trial_rows, TheoryConfig, TrialRows};

#[test]
fn default_like_grid_has_verdicts_with_power() {
    let cfg = TheoryConfig {
        width: 512,
        ranks: vec![4, 8, 16, 32, 64, 128, 256],
        trials: 8,
        ..Default::default()
    };
    let rows: TrialRows = (0..cfg.trials)
        .map(|t| trial_rows(&cfg, t).expect("valid"))
        .collect();
    let fits = fit_rows(&cfg, &rows.moments, &rows.coefficients);
    // 2 optimizers x 3 scalings x 2 regimes x (3 sites x 4 m + 2 norms) x 3 steps + the
    // step-0 gradient norm of B: nothing silently dropped.
    assert_eq!(fits.len(), 2 * 3 * 2 * (14 * 3 + 1));
    let with_law: Vec<_> = fits.iter().filter(|f| f.predicted.is_finite()).collect();
    let count = |o: Outcome| with_law.iter().filter(|f| f.outcome == o).count();
    let (agree, disagree) = (count(Outcome::Agrees), count(Outcome::Disagrees));
    let bad: Vec<_> = with_law
        .iter()
        .filter(|f| f.outcome == Outcome::Disagrees)
        .map(|f| {
            format!(
                "{} {} {} {}/{} m{} step {}: diff {:+.3} [{:+.3}, {:+.3}] band {:.3} ({})",
                f.optimizer,
                f.scaling,
                f.inputs,
                f.site,
                f.stat,
                f.m,
                f.step,
                f.diff,
                f.diff_ci_low,
                f.diff_ci_high,
                f.band,
                f.law
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{} fits disagree with the law:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(
        agree * 2 > with_law.len(),
        "only {agree} of {} agree",
        with_law.len()
    );
    // Rivals that differ from the law by more than twice its band are rejected.
    let distinct: Vec<_> = fits
        .iter()
        .flat_map(|f| &f.rivals)
        .filter(|r| r.distinct)
        .collect();
    let rejected = distinct.iter().filter(|r| r.rejected).count();
    assert!(
        rejected * 10 >= distinct.len() * 9,
        "{rejected} of {} distinct rivals rejected",
        distinct.len()
    );
    // The paper's coherent limit alone is not the law at these ranks: where it differs
    // from the exact law it is rejected by many fits.
    let coherent_rejected = fits
        .iter()
        .flat_map(|f| &f.rivals)
        .filter(|r| r.rival == Rival::CoherentLimit && r.distinct && r.rejected)
        .count();
    assert!(coherent_rejected > fits.len() / 10, "{coherent_rejected}");
    eprintln!(
        "{} fits, {} with a law: {agree} agree, {disagree} disagree; {rejected} of {} distinct rivals rejected",
        fits.len(),
        with_law.len(),
        distinct.len()
    );
}

/// A wrong law is caught: the same grid with the law's rows tilted by r^0.3 (a law off by
/// 0.3 in exponent) makes most fits that can tell disagree, and none agree.
#[test]
fn a_law_off_by_a_small_exponent_is_refuted() {
    let cfg = TheoryConfig {
        width: 256,
        ranks: vec![4, 16, 64, 256],
        trials: 8,
        steps: 1,
        ..Default::default()
    };
    let mut rows: TrialRows = (0..cfg.trials)
        .map(|t| trial_rows(&cfg, t).expect("valid"))
        .collect();
    for r in rows
        .moments
        .iter_mut()
        .filter(|r| r.stat == rankstab_records::Stat::Law)
    {
        r.value *= f64::from(r.rank).powf(0.3);
    }
    let fits = fit_rows(&cfg, &rows.moments, &rows.coefficients);
    let judged: Vec<_> = fits
        .iter()
        .filter(|f| f.law == "exact first step")
        .collect();
    let disagree = judged
        .iter()
        .filter(|f| f.outcome == Outcome::Disagrees)
        .count();
    let agree = judged
        .iter()
        .filter(|f| f.outcome == Outcome::Agrees)
        .count();
    assert_eq!(agree, 0, "a wrong law agreed with {agree} fits");
    assert!(
        disagree * 10 >= judged.len() * 9,
        "{disagree} of {} disagree",
        judged.len()
    );
}
