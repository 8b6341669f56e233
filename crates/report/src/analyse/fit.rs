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

/// Cuts the sorted distinct `steps` into windows: step 0 alone when present, then at most
/// `n` chunks of (nearly) equal numbers of recorded steps.
///
/// ```
/// use rankstab_report::analyse::step_windows;
/// let w = step_windows(&[0, 10, 20, 30, 40, 50, 60], 3);
/// let labels: Vec<String> = w.iter().map(|w| w.to_string()).collect();
/// assert_eq!(labels, ["step 0", "steps 10-20", "steps 30-40", "steps 50-60"]);
/// ```
pub fn step_windows(steps: &[u32], n: usize) -> Vec<Window> {
    let set: BTreeSet<u32> = steps.iter().copied().collect();
    let mut out = Vec::new();
    if set.contains(&0) {
        out.push(Window::step(0));
    }
    let rest: Vec<u32> = set.into_iter().filter(|&s| s > 0).collect();
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

/// Fits log E[value] against log rank: seeds common to every rank are paired (jackknife over
/// them); without a common seed each rank's mean over its seeds is one point. Returns the
/// ranks, the seeds per point and the fit; `None` with fewer than two ranks or a mean that is
/// not positive.
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
/// assert_eq!((ranks, seeds), (vec![4, 16, 64], 2));
/// assert!((fit.slope + 1.0).abs() < 1e-12);
/// ```
pub fn fit_by_rank(by_rank: &ByRank) -> Option<(Vec<u32>, u32, SlopeFit)> {
    let by_rank: BTreeMap<u32, &BTreeMap<u64, f64>> = by_rank
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(r, v)| (*r, v))
        .collect();
    if by_rank.len() < 2 {
        return None;
    }
    let ranks: Vec<u32> = by_rank.keys().copied().collect();
    let rs: Vec<usize> = ranks.iter().map(|&r| r as usize).collect();
    let first = by_rank.values().next()?;
    let common: Vec<u64> = first
        .keys()
        .copied()
        .filter(|s| by_rank.values().all(|v| v.contains_key(s)))
        .collect();
    let (values, seeds): (Vec<Vec<f64>>, u32) = if common.is_empty() {
        let v = by_rank
            .values()
            .map(|v| vec![v.values().sum::<f64>() / v.len() as f64])
            .collect();
        (v, 1)
    } else {
        let v = by_rank
            .values()
            .map(|v| common.iter().map(|s| v[s]).collect())
            .collect();
        (v, common.len() as u32)
    };
    let fit = fit_slope(&rs, &values)?;
    Some((ranks, seeds, fit))
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
