//! Values by rank and seed, and the fits and means taken over them: the slope of log mean
//! against log rank ([`fit_by_rank`]), step windows ([`step_windows`]), the mean over a
//! window's steps and over layers.
use rankstab_records::Window;
use rankstab_theory::stats::{fit_slope, SlopeFit};
use std::collections::{BTreeMap, BTreeSet};

/// Values per rank per seed, as the fits take them.
pub type ByRank = BTreeMap<u32, BTreeMap<u64, f64>>;

/// Values per step, then per rank and seed.
pub(super) type ByStep = BTreeMap<u32, ByRank>;

/// Records `value` at `step`, `rank` and `seed` (replacing an earlier value there).
pub(super) fn put(by_step: &mut ByStep, step: u32, rank: u32, seed: u64, value: f64) {
    by_step
        .entry(step)
        .or_default()
        .entry(rank)
        .or_default()
        .insert(seed, value);
}

/// Cuts the sorted distinct `steps` into windows: step 0 alone and step 1 alone (the exact
/// first-step law's step) when present, then at most `n` chunks of (nearly) equal numbers of
/// the later recorded steps.
///
/// ```
/// use rankstab_report::analyse::step_windows;
/// let w = step_windows(&[0, 10, 20, 30, 40, 50, 60], 3);
/// let labels: Vec<String> = w.iter().map(|w| w.to_string()).collect();
/// assert_eq!(labels, ["step 0", "steps 10-20", "steps 30-40", "steps 50-60"]);
/// let w = step_windows(&[0, 1, 2, 3, 4, 5], 2);
/// let labels: Vec<String> = w.iter().map(|w| w.to_string()).collect();
/// assert_eq!(labels, ["step 0", "step 1", "steps 2-3", "steps 4-5"]);
/// ```
pub fn step_windows(steps: &[u32], n: usize) -> Vec<Window> {
    let set: BTreeSet<u32> = steps.iter().copied().collect();
    let mut out = Vec::new();
    for alone in [0, 1] {
        if set.contains(&alone) {
            out.push(Window::step(alone));
        }
    }
    let rest: Vec<u32> = set.into_iter().filter(|&s| s > 1).collect();
    let n = n.max(1).min(rest.len());
    for k in 0..n {
        let a = k * rest.len() / n;
        let b = (k + 1) * rest.len() / n;
        out.push(Window {
            lo: rest[a],
            hi: rest[b - 1],
        });
    }
    out
}

/// The ranks with values and the seeds present at every one of them.
fn ranks_and_common_seeds(by_rank: &ByRank) -> (Vec<u32>, Vec<u64>) {
    let with: BTreeMap<u32, &BTreeMap<u64, f64>> = by_rank
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(r, v)| (*r, v))
        .collect();
    let common = with
        .values()
        .next()
        .map(|first| {
            first
                .keys()
                .copied()
                .filter(|s| with.values().all(|v| v.contains_key(s)))
                .collect()
        })
        .unwrap_or_default();
    (with.into_keys().collect(), common)
}

/// Fits log E(value) against log rank: seeds common to every rank are paired (jackknife over
/// them, `df` = seeds - 1); without a common seed each rank's mean over its seeds is one
/// point (OLS residuals). Returns the ranks, the seeds per point and the fit; `None` with
/// fewer than two ranks or a mean that is not positive.
///
/// ```
/// use rankstab_report::analyse::fit_by_rank;
/// use std::collections::BTreeMap;
/// let mut by = BTreeMap::new();
/// for r in [4u32, 16, 64] {
///     let v: BTreeMap<u64, f64> = [(0, 1.0), (1, 1.2)].into_iter().map(|(s, c)| (s, c * (r as f64).powf(-1.0))).collect();
///     by.insert(r, v);
/// }
/// let (ranks, seeds, fit) = fit_by_rank(&by).unwrap();
/// assert_eq!((ranks, seeds, fit.df), (vec![4, 16, 64], 2, 1.0));
/// assert!((fit.slope + 1.0).abs() < 1e-12);
/// ```
pub fn fit_by_rank(by_rank: &ByRank) -> Option<(Vec<u32>, u32, SlopeFit)> {
    let (ranks, common) = ranks_and_common_seeds(by_rank);
    if ranks.len() < 2 {
        return None;
    }
    let rs: Vec<usize> = ranks.iter().map(|&r| r as usize).collect();
    let (values, seeds): (Vec<Vec<f64>>, u32) = if common.is_empty() {
        let v = ranks
            .iter()
            .map(|r| {
                let v = &by_rank[r];
                vec![v.values().sum::<f64>() / v.len() as f64]
            })
            .collect();
        (v, 1)
    } else {
        (values_at(by_rank, &ranks, &common)?, common.len() as u32)
    };
    let fit = fit_slope(&rs, &values)?;
    Some((ranks, seeds, fit))
}

/// `values[i][k]`: the value at `ranks[i]` and `seeds[k]` (`None` when one is missing).
fn values_at(by_rank: &ByRank, ranks: &[u32], seeds: &[u64]) -> Option<Vec<Vec<f64>>> {
    ranks
        .iter()
        .map(|r| {
            let v = by_rank.get(r)?;
            seeds.iter().map(|s| v.get(s).copied()).collect()
        })
        .collect()
}

/// A measurement and a law paired seed by seed at the same ranks.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Paired {
    /// The ranks (those of the measurement's fit).
    pub ranks: Vec<u32>,
    /// The measured values, `[rank][seed]`.
    pub measured: Vec<Vec<f64>>,
    /// The law's values at the same ranks and seeds.
    pub law: Vec<Vec<f64>>,
}

/// The measurement `by_rank` paired with the law `law` at the ranks and seeds that
/// [`fit_by_rank`] fits (those common to every rank); `None` when the law lacks a value
/// there or no seed is common to every rank.
pub(super) fn paired(by_rank: &ByRank, law: &ByRank) -> Option<Paired> {
    let (ranks, seeds) = ranks_and_common_seeds(by_rank);
    if ranks.len() < 2 || seeds.is_empty() {
        return None;
    }
    Some(Paired {
        measured: values_at(by_rank, &ranks, &seeds)?,
        law: values_at(law, &ranks, &seeds)?,
        ranks,
    })
}

/// Means of values gathered under keys, summed in the order they are added.
#[derive(Debug)]
pub(super) struct Means<K>(BTreeMap<K, (f64, usize)>);

impl<K: Ord> Default for Means<K> {
    fn default() -> Self {
        Means(BTreeMap::new())
    }
}

impl<K: Ord> Means<K> {
    /// Adds `v` under `key`.
    pub(super) fn add(&mut self, key: K, v: f64) {
        let e = self.0.entry(key).or_insert((0.0, 0));
        e.0 += v;
        e.1 += 1;
    }

    /// The mean under each key, in key order.
    pub(super) fn means(self) -> impl Iterator<Item = (K, f64)> {
        self.0.into_iter().map(|(k, (sum, n))| (k, sum / n as f64))
    }
}

/// A rank and a seed: one point of a fit before the mean over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RankSeed {
    rank: u32,
    seed: u64,
}

/// Per (rank, seed), the mean of its values over `parts`.
fn mean_by_rank<'a>(parts: impl Iterator<Item = &'a ByRank>) -> ByRank {
    let mut acc = Means::default();
    for by_rank in parts {
        for (&rank, seeds) in by_rank {
            for (&seed, &v) in seeds {
                acc.add(RankSeed { rank, seed }, v);
            }
        }
    }
    let mut out = ByRank::new();
    for (at, mean) in acc.means() {
        out.entry(at.rank).or_default().insert(at.seed, mean);
    }
    out
}

/// Mean over the steps of `w` per (rank, seed).
pub(super) fn window_mean(by_step: &ByStep, w: Window) -> ByRank {
    mean_by_rank(by_step.range(w.lo..=w.hi).map(|(_, by_rank)| by_rank))
}

/// Mean over layers per (step, rank, seed).
pub(super) fn pool_layers(by_layer: &BTreeMap<u32, ByStep>) -> ByStep {
    let steps: BTreeSet<u32> = by_layer.values().flat_map(|s| s.keys().copied()).collect();
    steps
        .into_iter()
        .map(|step| {
            let at_step = by_layer.values().filter_map(|by_step| by_step.get(&step));
            (step, mean_by_rank(at_step))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_handle_few_steps_and_no_step_zero() {
        assert_eq!(step_windows(&[], 3), vec![]);
        let w = step_windows(&[5, 5, 7], 3);
        assert_eq!(w, [Window::step(5), Window::step(7)]);
        assert_eq!(
            w.iter().map(Window::to_string).collect::<Vec<_>>(),
            ["step 5", "step 7"]
        );
        let w = step_windows(&[0], 3);
        assert_eq!(w.len(), 1);
        // Step 1 stands alone (the exact law's step), with or without step 0.
        assert_eq!(step_windows(&[1, 3], 3), [Window::step(1), Window::step(3)]);
        assert_eq!(step_windows(&[0, 1], 3), [Window::step(0), Window::step(1)]);
    }

    #[test]
    fn a_law_pairs_only_at_the_fitted_ranks_and_seeds() {
        let by = |seeds: &[u64], scale: f64| -> ByRank {
            [4u32, 8, 16]
                .into_iter()
                .map(|r| {
                    let v = seeds
                        .iter()
                        .map(|&s| (s, scale * f64::from(r) + s as f64))
                        .collect();
                    (r, v)
                })
                .collect()
        };
        // Seed 2 is not at every rank of the measurement: it is left out on both sides.
        let mut measured = by(&[0, 1, 2], 1.0);
        measured.get_mut(&8).expect("rank 8").remove(&2);
        let p = paired(&measured, &by(&[0, 1, 2], 2.0)).expect("pairs");
        assert_eq!(p.ranks, [4, 8, 16]);
        assert_eq!(p.measured, [[4.0, 5.0], [8.0, 9.0], [16.0, 17.0]]);
        assert_eq!(p.law, [[8.0, 9.0], [16.0, 17.0], [32.0, 33.0]]);
        // A law without seed 1: no pairing.
        assert_eq!(paired(&measured, &by(&[0], 2.0)), None);
    }

    #[test]
    fn unpaired_seeds_fall_back_to_rank_means() {
        let mut by: ByRank = BTreeMap::new();
        for (i, r) in [4u32, 8, 16, 32].into_iter().enumerate() {
            // Each rank has its own seed; values r^0.5 with a small wobble.
            let v = (f64::from(r)).powf(0.5) * (1.0 + 0.01 * (i as f64 - 1.5));
            by.insert(r, [(i as u64, v)].into_iter().collect());
        }
        let (ranks, seeds, fit) = fit_by_rank(&by).expect("fits");
        assert_eq!(ranks.len(), 4);
        assert_eq!(seeds, 1);
        assert!((fit.slope - 0.5).abs() < 0.02, "{fit:?}");
        assert!(fit.ci_low < fit.slope && fit.slope < fit.ci_high);
    }

    #[test]
    fn one_rank_or_zero_values_give_no_fit() {
        let mut by: ByRank = BTreeMap::new();
        by.insert(4, [(0, 1.0)].into_iter().collect());
        assert!(fit_by_rank(&by).is_none());
        by.insert(8, [(0, 0.0)].into_iter().collect());
        by.insert(4, [(0, 0.0)].into_iter().collect());
        assert!(fit_by_rank(&by).is_none());
    }

    #[test]
    fn windows_and_layers_average_per_rank_and_seed() {
        let br = |v: f64| -> ByRank { [(4, [(0, v)].into_iter().collect())].into_iter().collect() };
        let by_step: ByStep = [(1, br(1.0)), (2, br(3.0)), (3, br(8.0))]
            .into_iter()
            .collect();
        assert_eq!(window_mean(&by_step, Window { lo: 1, hi: 2 }), br(2.0));
        // Layer 1 lacks step 3: the mean there is layer 0's alone.
        let layer1: ByStep = [(1, br(3.0)), (2, br(5.0))].into_iter().collect();
        let pooled = pool_layers(&[(0, by_step), (1, layer1)].into_iter().collect());
        let want: ByStep = [(1, br(2.0)), (2, br(4.0)), (3, br(8.0))]
            .into_iter()
            .collect();
        assert_eq!(pooled, want);
    }
}
