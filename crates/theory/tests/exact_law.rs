//! The exact first-step law (proofs/exact-law.md) against the Monte Carlo, for every moment
//! order, optimizer, init, site and input regime of a pinned setting; and Adam's slide from
//! the sign-like to the eps-dominated regime, which the law follows.
use rankstab_records::{Optimizer, Scaling, Site, Stat};
use rankstab_theory::{trial_rows, Init, Reuse, TheoryConfig, TrialRows};
use std::collections::BTreeMap;

type Key = (Optimizer, Scaling, String, Site, u32, u32, u32);

/// Per (optimizer, scaling, inputs, site, m, step, rank): per trial (Monte Carlo, law).
fn paired(rows: &TrialRows) -> BTreeMap<Key, Vec<(f64, f64)>> {
    let mut by: BTreeMap<Key, BTreeMap<u64, (f64, f64)>> = BTreeMap::new();
    for r in &rows.moments {
        if r.layer != 0
            || !matches!(r.stat, Stat::Abs | Stat::Law)
            || !matches!(r.site, Site::Fwd | Site::FwdHeldout | Site::Bwd)
        {
            continue;
        }
        let k = (
            r.optimizer,
            r.scaling,
            r.inputs.clone(),
            r.site,
            r.m.unwrap_or(0),
            r.step,
            r.rank,
        );
        let e = by
            .entry(k)
            .or_default()
            .entry(r.seed)
            .or_insert((f64::NAN, f64::NAN));
        if r.stat == Stat::Abs {
            e.0 = r.value;
        } else {
            e.1 = r.value;
        }
    }
    by.into_iter()
        .map(|(k, v)| (k, v.into_values().collect()))
        .filter(|(_, v): &(Key, Vec<(f64, f64)>)| v.iter().all(|p| p.1.is_finite()))
        .collect()
}

/// z of the mean paired relative difference (Monte Carlo - law) / law.
fn z(pairs: &[(f64, f64)]) -> (f64, f64) {
    let law = pairs.iter().map(|p| p.1).sum::<f64>() / pairs.len() as f64;
    let d: Vec<f64> = pairs.iter().map(|(mc, l)| (mc - l) / law).collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    (mean, mean / (sd / n.sqrt()))
}

#[test]
fn monte_carlo_agrees_with_the_exact_first_step_law_for_every_order() {
    for init in [Init::KaimingUniform, Init::Gaussian] {
        let cfg = TheoryConfig {
            width: 96,
            ranks: vec![1, 4, 16, 64],
            optimizers: vec![Optimizer::Sgd, Optimizer::SgdMomentum, Optimizer::Adam],
            scalings: vec![Scaling::LORA, Scaling::RSLORA],
            inputs: vec![Reuse::Coherent, Reuse::Fresh],
            init,
            batch: 4,
            heldout: 8,
            steps: 1,
            trials: 60,
            seed: 5,
            ..Default::default()
        };
        let rows: TrialRows = (0..cfg.trials)
            .map(|t| trial_rows(&cfg, t).expect("valid"))
            .collect();
        let pairs = paired(&rows);
        let step1: Vec<_> = pairs.iter().filter(|(k, _)| k.5 == 1).collect();
        // SGD and momentum: 2 scalings x 2 regimes x 3 sites x 4 m x 4 ranks each; Adam the
        // two output sites.
        assert_eq!(
            step1.len(),
            2 * (2 * 2 * 3 * 4 * 4) + 2 * 2 * 2 * 4 * 4,
            "{init:?}"
        );
        let mut worst = (0.0f64, None);
        for (k, p) in &step1 {
            let (rel, zk) = z(p);
            if zk.abs() > worst.0 {
                worst = (zk.abs(), Some((k, rel)));
            }
        }
        // 224 comparisons: |z| beyond 4.5 would be a real difference, not chance.
        assert!(
            worst.0 < 4.5,
            "{init:?}: largest |z| {:.2} at {:?}",
            worst.0,
            worst.1
        );
    }
}

/// The two-term law of the old checker for the input gradient ignores the entries' kurtosis;
/// with PEFT's uniform init the fourth moment at rank 1 is 3 k4 / 9 = 0.6 of the Gaussian
/// one, and the Monte Carlo sees it: the law's rows carry it.
#[test]
fn the_input_gradient_law_knows_the_init_s_kurtosis() {
    let law_m4 = |init: Init| {
        let cfg = TheoryConfig {
            width: 64,
            ranks: vec![1],
            optimizers: vec![Optimizer::Sgd],
            scalings: vec![Scaling::LORA],
            inputs: vec![Reuse::Coherent],
            init,
            steps: 1,
            trials: 1,
            moments: vec![2, 4],
            ..Default::default()
        };
        let rows = trial_rows(&cfg, 0).expect("valid").moments;
        let get = |m| {
            rows.iter()
                .find(|r| {
                    r.stat == Stat::Law && r.site == Site::Bwd && r.m == Some(m) && r.step == 1
                })
                .map(|r| r.value)
                .expect("a law row")
        };
        get(4) / get(2).powi(2)
    };
    let ratio = law_m4(Init::KaimingUniform) / law_m4(Init::Gaussian);
    assert!((ratio - 0.6).abs() < 0.05, "{ratio}");
}

/// Adam's exponent under standard LoRA slides from the sign-like 0 towards SGD's
/// m (1 - 2 beta) = -m as eps grows past the gradients, and the exact law follows it.
#[test]
fn adam_lora_exponent_slides_to_the_sgd_law_as_eps_grows() {
    let mut slopes = Vec::new();
    let config = |opt: Optimizer, eps: f64| TheoryConfig {
        width: 128,
        ranks: vec![4, 16, 64],
        optimizers: vec![opt],
        scalings: vec![Scaling::LORA],
        inputs: vec![Reuse::Coherent],
        adam_eps: eps,
        lr_adam: 1e-4,
        // Adam with eps far above the gradients is SGD with learning rate lr / eps.
        lr_sgd: 1e-4 / eps,
        batch: 4,
        steps: 1,
        trials: 16,
        moments: vec![2],
        ..Default::default()
    };
    let fwd_slope = |cfg: &TheoryConfig, pick: fn(&(f64, f64)) -> f64| {
        let rows: TrialRows = (0..cfg.trials)
            .map(|t| trial_rows(cfg, t).expect("valid"))
            .collect();
        let pairs = paired(&rows);
        let pts: Vec<(f64, f64)> = pairs
            .iter()
            .filter(|(k, _)| k.3 == Site::Fwd && k.5 == 1)
            .map(|(k, p)| {
                let mean = p.iter().map(pick).sum::<f64>() / p.len() as f64;
                ((k.6 as f64).ln(), mean.ln())
            })
            .collect();
        let (x, y): (Vec<f64>, Vec<f64>) = pts.into_iter().unzip();
        rankstab_theory::stats::ols_slope(&x, &y)
    };
    let eps_values = [1e-8, 1e-4, 1e-2, 1e-1, 10.0];
    for eps in eps_values {
        let cfg = config(Optimizer::Adam, eps);
        let (mc, law) = (fwd_slope(&cfg, |p| p.0), fwd_slope(&cfg, |p| p.1));
        assert!(
            (mc - law).abs() < 0.05,
            "eps {eps}: Monte Carlo {mc:.3}, law {law:.3}"
        );
        slopes.push((eps, mc, law));
    }
    eprintln!("(eps, Monte Carlo, law): {slopes:?}");
    // Sign-like: near Adam's law m (1 - beta) = 0 (its finite-rank value here).
    let first = slopes[0].1;
    assert!(first.abs() < 0.4, "sign-like regime: {first}");
    // eps-dominated: SGD's exponent on the same data, near m (1 - 2 beta) = -2.
    let sgd = fwd_slope(
        &config(Optimizer::Sgd, eps_values[eps_values.len() - 1]),
        |p| p.0,
    );
    let last = slopes[slopes.len() - 1].1;
    assert!(
        (last - sgd).abs() < 0.05 && sgd < -1.8,
        "eps-dominated: Adam {last}, SGD {sgd}"
    );
    assert!(
        slopes.windows(2).all(|w| w[1].1 < w[0].1 + 0.05),
        "{slopes:?}"
    );
}
