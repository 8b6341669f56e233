//! The finite-rank law (proofs/finite-rank.md) against the Monte Carlo on a smaller copy
//! of the default grid: every site, statistic, optimizer, scaling, input regime and step.
use rankstab_theory::{fit_rows, trial_rows, TheoryConfig, TrialRows};

#[test]
fn default_like_grid_agrees_with_the_finite_rank_law() {
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
    let bad: Vec<_> = fits.iter().filter(|f| !f.agrees).collect();
    assert!(
        bad.is_empty(),
        "{} fits disagree, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    // The finite-rank correction is not cosmetic: the large-rank limit alone would be
    // refuted by many of the same fits (incoherent sites, the input gradient).
    let tol = cfg.tolerance;
    let refuted = fits
        .iter()
        .filter(|f| f.asymptotic < f.ci_low - tol || f.asymptotic > f.ci_high + tol)
        .count();
    assert!(
        refuted > fits.len() / 3,
        "only {refuted} of {} fits refute the asymptotic law",
        fits.len()
    );
}
