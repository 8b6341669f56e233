//! Calibration of the three-outcome verdicts (predict/verdict.rs) on synthetic fits: values whose
//! true rank exponent is known, with trial-to-trial noise shared across ranks (as the
//! checker's common random numbers give) and independent noise per rank and trial, fitted
//! with the same jackknife over trials as every fit of the tool.
//!
//! * truth at the edge of the prediction's band (the hardest case for a false
//!   "disagrees"): "disagrees" at most at the nominal rate;
//! * truth at the centre: "disagrees" essentially never, "agrees" most of the time;
//! * truth a rival law outside the band: "agrees" at most at the nominal rate;
//! * a whole family judged with Benjamini-Hochberg: no "disagrees" when every prediction
//!   is right.
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rankstab_records::Outcome;
use rankstab_theory::predict::verdict::{judge_family, resolution, ALPHA};
use rankstab_theory::stats::{fit_slope, Band, Estimate};

const RANKS: [u32; 6] = [4, 8, 16, 32, 64, 128];
const TRIALS: usize = 12;

/// One synthetic fit with true slope `slope`.
fn fit(rng: &mut impl Rng, slope: f64) -> Estimate {
    let ranks: Vec<usize> = RANKS.iter().map(|&r| r as usize).collect();
    let shared: Vec<f64> = (0..TRIALS)
        .map(|_| 0.3 * rng.sample::<f64, _>(StandardNormal))
        .collect();
    let values: Vec<Vec<f64>> = ranks
        .iter()
        .map(|&r| {
            shared
                .iter()
                .map(|c| {
                    let e: f64 = rng.sample(StandardNormal);
                    (c + 0.05 * e).exp() * (r as f64).powf(slope)
                })
                .collect()
        })
        .collect();
    let f = fit_slope(&ranks, &values).expect("positive values");
    Estimate {
        slope: f.slope,
        se: f.se,
        df: (TRIALS - 1) as f64,
    }
}

fn rates(outcomes: &[Outcome]) -> (f64, f64) {
    let n = outcomes.len() as f64;
    let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count() as f64 / n;
    (count(Outcome::Agrees), count(Outcome::Disagrees))
}

#[test]
fn false_disagree_and_false_agree_rates_are_at_most_nominal() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2312);
    let reps = 600;
    let m = 2.0;
    let half = resolution(m, &RANKS);
    let band = Band {
        center: -1.0,
        half_width: half,
    };
    // Each fit judged alone (a family of one): the per-fit rates.
    let alone = |truth: f64, rng: &mut rand_chacha::ChaCha8Rng| -> Vec<Outcome> {
        (0..reps)
            .map(|_| judge_family(&[(fit(rng, truth), band)])[0])
            .collect()
    };
    // Three standard errors of a binomial proportion at the nominal level.
    let slack = 3.0 * (ALPHA * (1.0 - ALPHA) / reps as f64).sqrt();
    let (_, dis_edge) = rates(&alone(band.center + half, &mut rng));
    assert!(
        dis_edge <= ALPHA + slack,
        "false disagrees at the band's edge: {dis_edge}"
    );
    let (agree_centre, dis_centre) = rates(&alone(band.center, &mut rng));
    assert!(
        dis_centre < 0.01,
        "false disagrees at the centre: {dis_centre}"
    );
    assert!(agree_centre > 0.8, "agrees at the centre: {agree_centre}");
    let (agree_out, _) = rates(&alone(band.center + half * 1.02, &mut rng));
    assert!(
        agree_out <= ALPHA + slack,
        "agrees with the truth just outside: {agree_out}"
    );
    // A rival twice the band away is refuted almost always, never confirmed.
    let (agree_rival, dis_rival) = rates(&alone(band.center + 2.5 * half, &mut rng));
    assert!(
        agree_rival == 0.0 && dis_rival > 0.9,
        "{agree_rival} {dis_rival}"
    );
    eprintln!(
        "half-width {half:.4}; false disagrees at the edge {dis_edge:.3}, at the centre \
         {dis_centre:.3}; agrees at the centre {agree_centre:.3}, just outside {agree_out:.3}; \
         rival at 2.5 half-widths refuted {dis_rival:.3}"
    );
}

#[test]
fn a_family_of_right_predictions_has_no_false_disagrees() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let items: Vec<(Estimate, Band)> = (0..400)
        .map(|k| {
            let truth = -2.0 + 0.01 * k as f64;
            let band = Band {
                center: truth,
                half_width: resolution(2.0, &RANKS),
            };
            (fit(&mut rng, truth), band)
        })
        .collect();
    let out = judge_family(&items);
    let (agree, dis) = rates(&out);
    assert_eq!(dis, 0.0, "false disagrees in a family of right predictions");
    assert!(agree > 0.8, "{agree}");
}
