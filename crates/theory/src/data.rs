//! Seeded random draws for one trial: frozen weights, teacher, adapter init, inputs.
//!
//! Every matrix is drawn row by row from its own ChaCha stream keyed by (seed, trial,
//! purpose, row), so draws are identical whatever the thread count and whatever else the
//! configuration asks for (changing `steps` does not change W).
use crate::config::{Init, InputDist, Loss, TheoryConfig};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal, StudentT};
use rayon::prelude::*;

/// What a random stream is for; part of its key.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub(crate) enum Stream {
    Weight = 1,
    Teacher = 2,
    Readout = 3,
    Adapter = 4,
    Batch = 5,
    Heldout = 6,
    Basis = 7,
}

/// SplitMix64 finaliser: turns structured keys into well-spread seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of trial `trial` of a run with base seed `seed` (recorded in every row).
/// Kept below 2^63 so that tables load as signed 64-bit integers (polars, pandas).
///
/// ```
/// let s = rankstab_theory::trial_seed(0, 3);
/// assert!(s < 1 << 63);
/// assert_ne!(s, rankstab_theory::trial_seed(0, 4));
/// ```
pub fn trial_seed(seed: u64, trial: usize) -> u64 {
    mix(seed ^ mix(trial as u64 + 1)) >> 1
}

fn rng_for(trial_seed: u64, stream: Stream, index: u64, row: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(
        trial_seed ^ mix((stream as u64) << 56 ^ index << 32 ^ row)
    ))
}

/// A rows x cols matrix whose row i is filled by `fill(rng_i, row_i)`, in parallel.
fn by_rows(
    rows: usize,
    cols: usize,
    trial_seed: u64,
    stream: Stream,
    index: u64,
    fill: impl Fn(&mut ChaCha8Rng, &mut [f32]) + Sync,
) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((rows, cols));
    let flat = out.as_slice_mut().expect("a new array is contiguous");
    flat.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            let mut rng = rng_for(trial_seed, stream, index, i as u64);
            fill(&mut rng, row);
        });
    out
}

/// iid N(0, std^2) matrix.
pub(crate) fn gaussian(
    rows: usize,
    cols: usize,
    std: f64,
    ts: u64,
    stream: Stream,
    index: u64,
) -> Array2<f32> {
    by_rows(rows, cols, ts, stream, index, |rng, row| {
        for v in row.iter_mut() {
            let z: f64 = StandardNormal.sample(rng);
            *v = (z * std) as f32;
        }
    })
}

/// The adapter's A (rank x width) at the largest rank; smaller ranks use its first rows,
/// scaled where the init variance depends on rank (common random numbers across ranks).
pub(crate) fn adapter_init(
    init: Init,
    rank: usize,
    width: usize,
    ts: u64,
    layer: u64,
) -> Array2<f32> {
    match init {
        Init::KaimingUniform => {
            let bound = 1.0 / (width as f64).sqrt();
            by_rows(rank, width, ts, Stream::Adapter, layer, |rng, row| {
                for v in row.iter_mut() {
                    *v = rng.random_range(-bound..bound) as f32;
                }
            })
        }
        // Unit variance here; `Init::variance` scales it per rank in the cell.
        Init::Gaussian | Init::PeftGaussian => {
            gaussian(rank, width, 1.0, ts, Stream::Adapter, layer)
        }
    }
}

/// Input batches drawn from `dist`.
pub(crate) struct InputSampler {
    dist: InputDist,
    basis: Option<Array2<f32>>,
    width: usize,
    ts: u64,
}

impl InputSampler {
    pub(crate) fn new(dist: InputDist, width: usize, ts: u64) -> Self {
        let basis = match dist {
            InputDist::LowRank { k } => Some(gaussian(
                width,
                k,
                1.0 / (k as f64).sqrt(),
                ts,
                Stream::Basis,
                0,
            )),
            _ => None,
        };
        Self {
            dist,
            basis,
            width,
            ts,
        }
    }

    /// Batch `index` of `stream` (n x width).
    pub(crate) fn batch(&self, n: usize, stream: Stream, index: u64) -> Array2<f32> {
        let d = self.width;
        match self.dist {
            InputDist::Gaussian => gaussian(n, d, 1.0, self.ts, stream, index),
            InputDist::Rademacher => by_rows(n, d, self.ts, stream, index, |rng, row| {
                for v in row.iter_mut() {
                    *v = if rng.random::<bool>() { 1.0 } else { -1.0 };
                }
            }),
            InputDist::StudentT { nu } => {
                let t = StudentT::new(nu).expect("nu validated > 0");
                by_rows(n, d, self.ts, stream, index, |rng, row| {
                    for v in row.iter_mut() {
                        *v = t.sample(rng) as f32;
                    }
                })
            }
            InputDist::MeanShift { shift } => by_rows(n, d, self.ts, stream, index, |rng, row| {
                for v in row.iter_mut() {
                    let z: f64 = StandardNormal.sample(rng);
                    *v = (shift + z) as f32;
                }
            }),
            InputDist::LowRank { k } => {
                let u = self
                    .basis
                    .as_ref()
                    .expect("basis drawn for low-rank inputs");
                let z = gaussian(n, k, 1.0, self.ts, stream, index);
                let e = gaussian(n, d, 1.0, self.ts, stream, index + (1 << 20));
                let mut x = z.dot(&u.t());
                x.zip_mut_with(&e, |a, &b| *a = (0.9f32).sqrt() * *a + (0.1f32).sqrt() * b);
                x
            }
        }
    }
}

/// Everything of a trial that does not depend on the cell (optimizer, scaling, rank).
pub(crate) struct TrialData {
    pub seed: u64,
    /// Frozen weights W_l (d_out x d_in), entries N(0, 1/d).
    pub weights: Vec<Array2<f32>>,
    /// A at the largest rank for each layer.
    pub adapters: Vec<Array2<f32>>,
    /// MSE: teacher T (d x d). CE: label teacher (classes x d).
    pub teacher: Array2<f32>,
    /// CE readout R (classes x d).
    pub readout: Option<Array2<f32>>,
    /// Training batches 0..=steps (coherent runs use batch 0 only).
    pub batches: Vec<Array2<f32>>,
    /// Held-out batch.
    pub heldout: Array2<f32>,
}

impl TrialData {
    pub(crate) fn draw(
        cfg: &TheoryConfig,
        dist: InputDist,
        trial: usize,
        need_fresh: bool,
    ) -> Self {
        let seed = trial_seed(cfg.seed, trial);
        let d = cfg.width;
        let std_w = 1.0 / (d as f64).sqrt();
        let weights = (0..cfg.layers)
            .map(|l| gaussian(d, d, std_w, seed, Stream::Weight, l as u64))
            .collect();
        let r_max = *cfg.ranks.iter().max().expect("ranks validated non-empty");
        let adapters = (0..cfg.layers)
            .map(|l| adapter_init(cfg.init, r_max, d, seed, l as u64))
            .collect();
        let (teacher, readout) = match cfg.loss {
            Loss::Mse => (gaussian(d, d, std_w, seed, Stream::Teacher, 0), None),
            Loss::Ce => (
                gaussian(cfg.classes, d, std_w, seed, Stream::Teacher, 0),
                Some(gaussian(cfg.classes, d, std_w, seed, Stream::Readout, 0)),
            ),
        };
        let sampler = InputSampler::new(dist, d, seed);
        let n_batches = if need_fresh { cfg.steps + 1 } else { 1 };
        let batches = (0..n_batches)
            .map(|i| sampler.batch(cfg.batch, Stream::Batch, i as u64))
            .collect();
        let heldout = sampler.batch(cfg.heldout, Stream::Heldout, 0);
        Self {
            seed,
            weights,
            adapters,
            teacher,
            readout,
            batches,
            heldout,
        }
    }
}
