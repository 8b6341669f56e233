//! Statistics the training probes record for every adapter, computed on libtorch tensors:
//! the same quantities as the theory checker (`rankstab_theory::sim`), so that the two
//! kinds of rows compare directly.
use crate::data::Sequence;
use crate::linear::ProbeSlot;
use crate::CausalLm;
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

/// Absolute and raw moments of order 1..=max_m of all entries of `y`.
///
/// Computed by [`SiteSums::of`] (one fused pass in f64 on CPU; see there), divided by the
/// number of entries.
///
/// ```
/// use tch::Tensor;
/// let y = Tensor::from_slice(&[1.0f32, -2.0, 0.0, 3.0]);
/// let (abs, raw) = rankstab_train::probe::moments(&y, 3);
/// let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12 * y.abs().max(1.0));
/// assert!(close(&abs, &[1.5, 3.5, 9.0]));
/// assert!(close(&raw, &[0.5, 3.5, 5.0]));
/// ```
pub fn moments(y: &Tensor, max_m: u32) -> (Vec<f64>, Vec<f64>) {
    let s = SiteSums::of(y, max_m);
    let n = s.n.max(1.0);
    (
        s.abs.iter().map(|v| v / n).collect(),
        s.raw.iter().map(|v| v / n).collect(),
    )
}

/// Entries per partial sum of the fused moment pass: the partials are added in their
/// order, so the result does not depend on how many threads computed them.
const CHUNK: usize = 1 << 14;
/// Tensors up to this many entries are summed on the calling thread, larger ones on the
/// rayon pool. A pass comes right after libtorch's kernels, whose OpenMP threads then
/// spin-wait on the other cores for a while: a rayon worker sharing a core with one of
/// them took 3x as long over the probes of a SmolLM2-135M step (0.65 s against 0.20 s
/// for 7 steps' `grad_out` passes). 4 Mi entries take about 1.5 ms on one core, long
/// enough for a spin-wait to end. The chunks and the order in which their partial sums
/// are added are the same either way: the same bits.
const SERIAL_MAX: usize = 1 << 22;
/// Independent accumulators per sum in the fused pass (they let the compiler keep
/// several additions in flight and use vector registers; fixed, so the rounding is too).
const LANES: usize = 8;

/// Sums of `|x|^m` and `x^m`, m = 1..=M, over `x`, in f64 (each power by repeated
/// multiplication of the entry converted to f64, so no power of an f32 entry overflows
/// or underflows, and the subnormal f32 products that are slow on x86 never occur).
#[inline(always)]
fn chunk_sums<T: Copy + Into<f64>, const M: usize>(x: &[T]) -> ([f64; M], [f64; M]) {
    let mut abs = [[0.0f64; LANES]; M];
    let mut raw = [[0.0f64; LANES]; M];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            let v: f64 = c[l].into();
            let mut p = 1.0;
            for m in 0..M {
                p *= v;
                abs[m][l] += p.abs();
                raw[m][l] += p;
            }
        }
    }
    let (mut a, mut r) = ([0.0; M], [0.0; M]);
    for m in 0..M {
        for l in 0..LANES {
            a[m] += abs[m][l];
            r[m] += raw[m][l];
        }
    }
    for &v in it.remainder() {
        let v: f64 = v.into();
        let mut p = 1.0;
        for m in 0..M {
            p *= v;
            a[m] += p.abs();
            r[m] += p;
        }
    }
    (a, r)
}

/// The sums of orders 1..=4 over `x` in f64, with the fewest operations: `|x|`, `x`,
/// `x^2` (absolute and raw alike), `x^2 |x|`, `x^3`, `x^4`, in that order. Entry `i`
/// goes to lane `i % LANES`; the lanes are added as `(c0 + c1) + (c2 + c3)` with
/// `c_j = lane_j + lane_(j+4)`, then the entries past the last whole group of lanes: the
/// order [`chunk_sums4_avx2`] adds in, so both give the same bits.
fn chunk_sums4<T: Copy + Into<f64>>(x: &[T]) -> [f64; 6] {
    let mut acc = [[0.0f64; LANES]; 6];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            let v: f64 = c[l].into();
            let a = v.abs();
            let p2 = v * v;
            for (s, t) in acc.iter_mut().zip([a, v, p2, p2 * a, p2 * v, p2 * p2]) {
                s[l] += t;
            }
        }
    }
    let mut out = [0.0; 6];
    for (o, lanes) in out.iter_mut().zip(&acc) {
        let c: [f64; 4] = std::array::from_fn(|j| lanes[j] + lanes[j + 4]);
        *o = (c[0] + c[1]) + (c[2] + c[3]);
    }
    for &v in it.remainder() {
        add_entry(&mut out, v.into());
    }
    out
}

/// Adds one entry's six terms to `out` (the entries past the last group of lanes).
#[inline(always)]
fn add_entry(out: &mut [f64; 6], v: f64) {
    let (a, p2) = (v.abs(), v * v);
    for (o, t) in out.iter_mut().zip([a, v, p2, p2 * a, p2 * v, p2 * p2]) {
        *o += t;
    }
}

/// [`chunk_sums4`] of f32 entries with AVX2 intrinsics: eight entries per iteration, in
/// two groups of four f64 lanes (entry `i` in lane `i % 8`), the same operations and the
/// same final order as the portable version, so the same bits, about five times faster
/// (the compiler's vectorisation of the portable loop keeps its accumulators in memory).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
fn chunk_sums4_avx2(x: &[f32]) -> [f64; 6] {
    use std::arch::x86_64::*;
    const _: () = assert!(LANES == 8);
    let zero = _mm256_setzero_pd();
    let mut acc = [zero; 12];
    let sign = _mm256_set1_pd(-0.0);
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for h in 0..2 {
            // SAFETY: `c` has 8 entries, so entries 4h..4h+4 are in bounds (unaligned
            // load).
            let v = _mm256_cvtps_pd(unsafe { _mm_loadu_ps(c.as_ptr().add(4 * h)) });
            let a = _mm256_andnot_pd(sign, v);
            let p2 = _mm256_mul_pd(v, v);
            let o = 6 * h;
            acc[o] = _mm256_add_pd(acc[o], a);
            acc[o + 1] = _mm256_add_pd(acc[o + 1], v);
            acc[o + 2] = _mm256_add_pd(acc[o + 2], p2);
            acc[o + 3] = _mm256_add_pd(acc[o + 3], _mm256_mul_pd(p2, a));
            acc[o + 4] = _mm256_add_pd(acc[o + 4], _mm256_mul_pd(p2, v));
            acc[o + 5] = _mm256_add_pd(acc[o + 5], _mm256_mul_pd(p2, p2));
        }
    }
    let mut out = [0.0; 6];
    for (k, o) in out.iter_mut().enumerate() {
        let mut c = [0.0f64; 4];
        // SAFETY: `c` holds four f64 (unaligned store).
        unsafe { _mm256_storeu_pd(c.as_mut_ptr(), _mm256_add_pd(acc[k], acc[k + 6])) };
        *o = (c[0] + c[1]) + (c[2] + c[3]);
    }
    for &v in it.remainder() {
        add_entry(&mut out, v.into());
    }
    out
}

/// The entries' type, for the fast path: f32 entries on an AVX2 CPU go to
/// [`chunk_sums4_avx2`], everything else to [`chunk_sums4`] (same bits either way).
trait Entry: Copy + Into<f64> + Sync {
    fn sums4(x: &[Self]) -> [f64; 6] {
        chunk_sums4(x)
    }
}

impl Entry for f64 {}

impl Entry for f32 {
    fn sums4(x: &[f32]) -> [f64; 6] {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { chunk_sums4_avx2(x) };
        }
        chunk_sums4(x)
    }
}

/// The sums of orders 1..=4 (absolute, raw) over `x`: [`chunk_sums4`] on chunks of
/// [`CHUNK`] entries (on the rayon pool above [`SERIAL_MAX`] entries), the partials added
/// in chunk order (bit-identical at any thread count).
fn slice_sums4<T: Entry>(x: &[T]) -> ([f64; 4], [f64; 4]) {
    abs_raw4(slice_parts4(x))
}

/// [`slice_sums4`] in [`chunk_sums4`]'s layout.
fn slice_parts4<T: Entry>(x: &[T]) -> [f64; 6] {
    use rayon::prelude::*;
    let parts: Vec<[f64; 6]> = if x.len() <= SERIAL_MAX {
        x.chunks(CHUNK).map(T::sums4).collect()
    } else {
        x.par_chunks(CHUNK).map(T::sums4).collect()
    };
    add_in_order(parts)
}

/// The sums of orders 1..=4 of the rows of `g a` in [`chunk_sums4`]'s layout (`g`: n x r,
/// `a`: r x cols, row-major; `mask`: n x cols, and the kept entries' scale): blocks of
/// [`PRODUCT_ROWS`] rows, on the calling thread up to [`SERIAL_MAX`] entries and on the
/// rayon pool above, added in block order (the same bits either way).
fn product_parts4(
    g: &[f32],
    a: &[f32],
    r: usize,
    cols: usize,
    mask: Option<(&[bool], f32)>,
) -> [f64; 6] {
    use rayon::prelude::*;
    let n = g.len().checked_div(r).unwrap_or(0);
    let blocks: Vec<std::ops::Range<usize>> = (0..n)
        .step_by(PRODUCT_ROWS)
        .map(|i| i..(i + PRODUCT_ROWS).min(n))
        .collect();
    let block = |b: &std::ops::Range<usize>| product_block_sums(g, a, r, cols, b.clone(), mask);
    let parts: Vec<[f64; 6]> = if n * cols <= SERIAL_MAX {
        blocks.iter().map(block).collect()
    } else {
        blocks.par_iter().map(block).collect()
    };
    add_in_order(parts)
}

/// Partial sums in [`chunk_sums4`]'s layout added in their order (the order fixes the
/// rounding: callers keep it independent of the thread count).
fn add_in_order(parts: impl IntoIterator<Item = [f64; 6]>) -> [f64; 6] {
    let mut s = [0.0; 6];
    for p in parts {
        for (t, v) in s.iter_mut().zip(p) {
            *t += v;
        }
    }
    s
}

/// The (absolute, raw) sums of orders 1..=4 from [`chunk_sums4`]'s layout.
fn abs_raw4(s: [f64; 6]) -> ([f64; 4], [f64; 4]) {
    ([s[0], s[2], s[3], s[5]], [s[1], s[2], s[4], s[5]])
}

/// [`chunk_sums`] over `x` in chunks of [`CHUNK`] entries (on the rayon pool above
/// [`SERIAL_MAX`] entries), the partials added in chunk order (bit-identical at any
/// thread count).
fn slice_sums<T: Copy + Into<f64> + Sync, const M: usize>(x: &[T]) -> ([f64; M], [f64; M]) {
    use rayon::prelude::*;
    let parts: Vec<([f64; M], [f64; M])> = if x.len() <= SERIAL_MAX {
        x.chunks(CHUNK).map(chunk_sums::<T, M>).collect()
    } else {
        x.par_chunks(CHUNK).map(chunk_sums::<T, M>).collect()
    };
    let (mut a, mut r) = ([0.0; M], [0.0; M]);
    for (pa, pr) in parts {
        for m in 0..M {
            a[m] += pa[m];
            r[m] += pr[m];
        }
    }
    (a, r)
}

/// Rows of the product per partial sum in [`SiteSums::of_product`]: the partials are added
/// in their order whether one thread or the pool computed them.
const PRODUCT_ROWS: usize = 64;

/// Row `i` of `g a` (`g`: n x r, `a`: r x cols, row-major) into `row`, the products
/// over k added in ascending k (f32 multiply, then add: the same bits on every path),
/// then masked and scaled as dropout's backward pass does (`keep`: row `i` of the mask).
/// Columns go in groups of 32 (four vectors of independent sums, so that the additions
/// over k do not wait on each other), then 8, then one at a time.
#[inline(always)]
fn product_row(g: &[f32], a: &[f32], r: usize, row: &mut [f32], keep: Option<(&[bool], f32)>) {
    #[inline(always)]
    fn group<const W: usize>(g: &[f32], a: &[f32], r: usize, cols: usize, j: usize) -> [f32; W] {
        let mut acc = [0.0f32; W];
        for (k, &c) in g.iter().enumerate().take(r) {
            let ak: &[f32; W] = a[k * cols + j..k * cols + j + W]
                .try_into()
                .expect("W entries");
            for l in 0..W {
                acc[l] += c * ak[l];
            }
        }
        acc
    }
    let cols = row.len();
    let mut j = 0;
    while j + 32 <= cols {
        row[j..j + 32].copy_from_slice(&group::<32>(g, a, r, cols, j));
        j += 32;
    }
    while j + 8 <= cols {
        row[j..j + 8].copy_from_slice(&group::<8>(g, a, r, cols, j));
        j += 8;
    }
    while j < cols {
        row[j] = group::<1>(g, a, r, cols, j)[0];
        j += 1;
    }
    if let Some((mask, scale)) = keep {
        for (x, &m) in row.iter_mut().zip(mask) {
            *x = if m { *x * scale } else { 0.0 };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn product_row_avx2(g: &[f32], a: &[f32], r: usize, row: &mut [f32], keep: Option<(&[bool], f32)>) {
    product_row(g, a, r, row, keep)
}

/// The sums of orders 1..=4 of the rows `rows` of `g a` (see [`product_row`]), rows added
/// in order.
fn product_block_sums(
    g: &[f32],
    a: &[f32],
    r: usize,
    cols: usize,
    rows: std::ops::Range<usize>,
    mask: Option<(&[bool], f32)>,
) -> [f64; 6] {
    let mut row = vec![0.0f32; cols];
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::is_x86_feature_detected!("avx2");
    add_in_order(rows.map(|i| {
        let gi = &g[i * r..(i + 1) * r];
        let keep = mask.map(|(m, scale)| (&m[i * cols..(i + 1) * cols], scale));
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2, checked above.
            unsafe {
                product_row_avx2(gi, a, r, &mut row, keep)
            };
        } else {
            product_row(gi, a, r, &mut row, keep);
        }
        #[cfg(not(target_arch = "x86_64"))]
        product_row(gi, a, r, &mut row, keep);
        <f32 as Entry>::sums4(&row)
    }))
}

/// Frobenius norm (f64 tensors in f64, others by libtorch's f32 norm kernel: no f64
/// copy of large gradients).
pub fn fro(t: &Tensor) -> f64 {
    tch::no_grad(|| {
        if !t.defined() || t.numel() == 0 {
            return 0.0;
        }
        let t = t.detach();
        let t = if t.kind() == Kind::Double {
            t
        } else {
            t.to_kind(Kind::Float)
        };
        t.norm().double_value(&[])
    })
}

/// Frobenius norm and stable rank (||M||_F^2 / ||M||_2^2) of `gamma B A` without forming
/// it: with B = Q_B R_B and A^T = Q_A R_A, the singular values of B A are those of the
/// r x r matrix R_B R_A^T.
///
/// ```
/// use tch::{Kind, Tensor, Device};
/// let b = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 2.0, 0.0, 0.0]).view([3, 2]);
/// let a = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 0.0, 1.0, 0.0]).view([2, 3]);
/// let (fro, srank) = rankstab_train::probe::delta_norm_and_stable_rank(&b, &a, 0.5);
/// // B A = diag(3, 2, 0): scaled by 0.5, singular values 1.5 and 1.
/// assert!((fro - (1.5f64 * 1.5 + 1.0).sqrt()).abs() < 1e-6);
/// assert!((srank - 3.25 / 2.25).abs() < 1e-6);
/// ```
pub fn delta_norm_and_stable_rank(b: &Tensor, a: &Tensor, gamma: f64) -> (f64, f64) {
    tch::no_grad(|| {
        let b = b.detach().to_kind(Kind::Double);
        let a = a.detach().to_kind(Kind::Double);
        let (_, rb) = Tensor::linalg_qr(&b, "reduced");
        let (_, ra) = Tensor::linalg_qr(&a.tr(), "reduced");
        let core = rb.matmul(&ra.tr()) * gamma;
        let (_, s, _) = core.svd(true, false);
        let fro2 = s.square().sum(Kind::Double).double_value(&[]);
        let top = s.max().double_value(&[]);
        let srank = if top > 0.0 { fro2 / (top * top) } else { 0.0 };
        (fro2.sqrt(), srank)
    })
}

/// Turns the probes of every attached adapter on (the next forward passes that track
/// gradients record a [`crate::linear::Capture`]) or off.
pub(crate) fn capture(model: &mut CausalLm, on: bool) {
    for (_, lin) in model.linears_mut() {
        if lin.adapter.is_some() {
            lin.capture = on.then(|| RefCell::new(ProbeSlot::default()));
        }
    }
}

/// Sets the rows the probes measure in the next forward pass (`None`: all) and whether
/// the captures keep the adapters' inputs.
pub(crate) fn prepare(model: &mut CausalLm, rows: Option<&Tensor>, keep_input: bool) {
    for (_, lin) in model.linears_mut() {
        if let Some(slot) = &lin.capture {
            let mut slot = slot.borrow_mut();
            slot.rows = rows.map(Tensor::shallow_clone);
            slot.keep_input = keep_input;
        }
    }
}

/// Rows (b * T + t) of the flattened (B * T, features) activations of `seqs` that are
/// real tokens (not padding), and B * T (every row).
pub(crate) fn valid_rows(seqs: &[&Sequence]) -> (Vec<i64>, usize) {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1) - 1;
    let idx = seqs
        .iter()
        .enumerate()
        .flat_map(|(b, s)| (0..s.ids.len() - 1).map(move |i| (b * t + i) as i64))
        .collect();
    (idx, seqs.len() * t)
}

/// The seed of the token sample of micro-batch `micro` at step `step` of a run seeded
/// `seed`: its own stream, so that sampling draws nothing from the training's.
pub(crate) fn sample_seed(seed: u64, step: usize, micro: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((step as u64) << 24).wrapping_add(micro as u64)
}

/// The rows the probes read in one pass (`None`: every row): of the real tokens
/// `valid` (from [`valid_rows`]), all when `keep` is 0 or at least their number, else
/// `keep` of them drawn uniformly without replacement with `seed` (in ascending order).
/// A simple random sample: a moment over its entries is an unbiased estimate of the
/// moment over all the real tokens' entries.
pub(crate) fn probe_rows(
    valid: &(Vec<i64>, usize),
    keep: usize,
    seed: u64,
    device: Device,
) -> Option<Tensor> {
    use rand::SeedableRng;
    let (rows, total) = valid;
    if keep == 0 || keep >= rows.len() {
        return (rows.len() != *total).then(|| Tensor::from_slice(rows).to_device(device));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut pick: Vec<i64> = rand::seq::index::sample(&mut rng, rows.len(), keep)
        .into_iter()
        .map(|i| rows[i])
        .collect();
    pick.sort_unstable();
    Some(Tensor::from_slice(&pick).to_device(device))
}

/// The rows of `t` (flattened to (rows, features)) at `valid`, or all of them.
pub(crate) fn rows_of(t: &Tensor, valid: Option<&Tensor>) -> Tensor {
    let f = t.size().last().copied().unwrap_or(1);
    let flat = t.reshape([-1, f]);
    match valid {
        Some(idx) => flat.index_select(0, idx),
        None => flat,
    }
}

/// What [`SiteSums::of_many`] sums: the entries of a tensor, or those of the product `g a`
/// (`g`: rows x r, `a`: r x cols), optionally masked and scaled as dropout's backward
/// pass does (`mask`: the entries kept, rows x cols, and their scale `1 / (1 - p)`),
/// never stored where [`SiteSums::of_product`] applies.
pub enum SumJob {
    /// The entries of a tensor.
    Entries(Tensor),
    /// The entries of `g a`.
    Product {
        /// (rows, r).
        g: Tensor,
        /// (r, cols).
        a: Tensor,
        /// The entries kept (rows, cols) and their scale.
        mask: Option<(Tensor, f64)>,
    },
}

/// The operands of [`SiteSums::of_product`]'s fused pass, when it applies (CPU, f32 `g`
/// (n x r) and `a` (r x cols), a CPU bool mask of n x cols, orders 1..=4): contiguous,
/// the mask's scale in f32.
struct ProductOperands {
    g: Tensor,
    a: Tensor,
    mask: Option<(Tensor, f32)>,
    r: usize,
    cols: usize,
}

impl ProductOperands {
    fn of(g: &Tensor, a: &Tensor, mask: Option<(&Tensor, f64)>, max_m: u32) -> Option<Self> {
        let cpu_f32 =
            |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float && t.dim() == 2;
        if !(cpu_f32(g) && cpu_f32(a)) || max_m > 4 || max_m == 0 {
            return None;
        }
        let (n, r) = (g.size()[0], g.size()[1]);
        let cols = a.size()[1];
        if a.size()[0] != r {
            return None;
        }
        if let Some((m, _)) = mask {
            if m.device() != Device::Cpu || m.kind() != Kind::Bool || m.size() != [n, cols] {
                return None;
            }
        }
        tch::no_grad(|| {
            Some(Self {
                g: g.detach().contiguous(),
                a: a.detach().contiguous(),
                mask: mask.map(|(m, scale)| (m.contiguous(), scale as f32)),
                r: r as usize,
                cols: cols as usize,
            })
        })
    }

    /// The entries of `g a`.
    fn entries(&self) -> f64 {
        (self.g.size()[0] as usize * self.cols) as f64
    }

    /// The fused pass over the operands, in place.
    fn pass(&self) -> Pass<'_> {
        Pass::Product {
            g: slice_of(&self.g),
            a: slice_of(&self.a),
            r: self.r,
            cols: self.cols,
            mask: self.mask.as_ref().map(|(m, scale)| (slice_of(m), *scale)),
        }
    }
}

/// A fused moment pass (orders 1..=4) over data read in place: the entries of a slice, or
/// those of a product `g a` never stored (see [`product_parts4`]).
enum Pass<'a> {
    Entries(&'a [f32]),
    Product {
        g: &'a [f32],
        a: &'a [f32],
        r: usize,
        cols: usize,
        mask: Option<(&'a [bool], f32)>,
    },
}

impl Pass<'_> {
    /// The sums in [`chunk_sums4`]'s layout.
    fn sums(&self) -> [f64; 6] {
        match *self {
            Pass::Entries(x) => slice_parts4(x),
            Pass::Product {
                g,
                a,
                r,
                cols,
                mask,
            } => product_parts4(g, a, r, cols, mask),
        }
    }
}

/// Moment sums of one adapter at one site over the micro-batches of a step: element count
/// and the sums of `|x|^m` and `x^m` (the step's moment of order m is `abs[m - 1] / n`).
#[derive(Default, Debug, Clone, PartialEq)]
pub struct SiteSums {
    /// Number of entries summed.
    pub n: f64,
    /// Sums of |x|^m, m = 1..
    pub abs: Vec<f64>,
    /// Sums of x^m, m = 1..
    pub raw: Vec<f64>,
}

impl SiteSums {
    /// The sums of orders 1..=max_m over all entries of `t`.
    ///
    /// On CPU (f32 or f64 entries) one fused pass over the tensor's memory computes every
    /// power and both kinds of sum at once in f64 (chunks on the rayon pool, added in a
    /// fixed order: bit-identical at any thread count). Elsewhere (CUDA) one expression:
    /// the entries in f64 raised to the exponents 1..=max_m at once (one power kernel for
    /// the raw sums, one for the absolute ones, each followed by one reduction). A
    /// non-finite entry makes the sums non-finite.
    pub fn of(t: &Tensor, max_m: u32) -> Self {
        tch::no_grad(|| {
            let n = t.numel();
            let m = max_m as usize;
            if n == 0 || m == 0 {
                return Self {
                    n: n as f64,
                    abs: vec![0.0; m],
                    raw: vec![0.0; m],
                };
            }
            let (abs, raw) = if t.device() == Device::Cpu {
                let t = t.detach();
                let t = if t.kind() == Kind::Double {
                    t.contiguous()
                } else {
                    t.to_kind(Kind::Float).contiguous()
                };
                if t.kind() == Kind::Double {
                    cpu_sums::<f64>(&t, m)
                } else {
                    cpu_sums::<f32>(&t, m)
                }
            } else {
                tensor_sums(t, m)
            };
            Self {
                n: n as f64,
                abs,
                raw,
            }
        })
    }

    /// The sums of orders 1..=max_m over the entries of the product `g a`, optionally
    /// masked and scaled as dropout's backward pass does (`mask`: the entries kept, and
    /// their scale `1 / (1 - p)`), without the product ever being stored: each row is
    /// formed in a buffer of one row and summed there. `g`: (rows, r); `a`: (r, cols);
    /// `mask`: (rows, cols).
    ///
    /// For the probes' `bwd` site, `(gamma v B) A` per token: it replaces a matrix product
    /// that writes (tokens, in) entries and a moment pass that reads them back. CPU, f32
    /// `g` and `a` and `max_m <= 4` only (`None` otherwise: form the product and use
    /// [`SiteSums::of`]). The rows are summed in blocks of a fixed number of rows, added
    /// in block order, on the calling thread up to `SERIAL_MAX` entries and on the rayon
    /// pool above: the same bits at any thread count. The product's entries are rounded
    /// as f32 (ascending k, multiply then add), so they can differ from a BLAS product's
    /// in the last bit.
    pub fn of_product(
        g: &Tensor,
        a: &Tensor,
        mask: Option<(&Tensor, f64)>,
        max_m: u32,
    ) -> Option<Self> {
        let ops = ProductOperands::of(g, a, mask, max_m)?;
        Some(Self::of_parts4(ops.pass().sums(), ops.entries(), max_m))
    }

    /// The sums of orders 1..=max_m (at most 4) from [`chunk_sums4`]'s layout.
    fn of_parts4(s: [f64; 6], n: f64, max_m: u32) -> Self {
        let m = max_m as usize;
        let (abs, raw) = abs_raw4(s);
        Self {
            n,
            abs: abs[..m].to_vec(),
            raw: raw[..m].to_vec(),
        }
    }

    /// The sums of every job, in order: what [`SiteSums::of`] (for
    /// [`SumJob::Entries`]) and [`SiteSums::of_product`] (for [`SumJob::Product`]) give,
    /// the same bits. The passes over CPU f32 entries (orders up to 4) run together: on
    /// the rayon pool, one job to a task, when they hold more than [`SERIAL_MAX`]
    /// entries in all (a block's adapters are many passes each too small to share out),
    /// else on the calling thread; the other jobs one after another on the calling
    /// thread.
    pub fn of_many(jobs: &[SumJob], max_m: u32) -> Vec<Self> {
        use rayon::prelude::*;
        /// A job's contiguous CPU f32 data, kept alive while the pool reads it.
        enum Ready {
            Entries(Tensor),
            Product(ProductOperands),
        }
        let fast = (1..=4).contains(&max_m);
        let mut out: Vec<Option<Self>> = Vec::with_capacity(jobs.len());
        let mut ready: Vec<(usize, f64, Ready)> = Vec::new();
        tch::no_grad(|| {
            for (i, job) in jobs.iter().enumerate() {
                let prepared = match job {
                    SumJob::Entries(t)
                        if fast
                            && t.device() == Device::Cpu
                            && t.kind() == Kind::Float
                            && t.numel() > 0 =>
                    {
                        Some((t.numel() as f64, Ready::Entries(t.detach().contiguous())))
                    }
                    SumJob::Entries(_) => None,
                    SumJob::Product { g, a, mask } => {
                        let keep = mask.as_ref().map(|(m, scale)| (m, *scale));
                        ProductOperands::of(g, a, keep, max_m)
                            .map(|ops| (ops.entries(), Ready::Product(ops)))
                    }
                };
                match prepared {
                    Some((n, r)) => {
                        ready.push((i, n, r));
                        out.push(None);
                    }
                    None => out.push(Some(match job {
                        SumJob::Entries(t) => Self::of(t, max_m),
                        SumJob::Product { g, a, mask } => {
                            let p = g.matmul(a);
                            let p = match mask {
                                Some((m, scale)) => p * m * *scale,
                                None => p,
                            };
                            Self::of(&p, max_m)
                        }
                    })),
                }
            }
        });
        // What the pool reads: the prepared tensors, in place.
        let passes: Vec<Pass> = ready
            .iter()
            .map(|(_, _, r)| match r {
                Ready::Entries(t) => Pass::Entries(slice_of(t)),
                Ready::Product(o) => o.pass(),
            })
            .collect();
        // The same rule as one pass's: on the pool only above SERIAL_MAX entries in all.
        let entries: f64 = ready.iter().map(|(_, n, _)| n).sum();
        let parts: Vec<[f64; 6]> = if entries <= SERIAL_MAX as f64 {
            passes.iter().map(Pass::sums).collect()
        } else {
            passes.par_iter().map(Pass::sums).collect()
        };
        for ((i, n, _), p) in ready.iter().zip(parts) {
            out[*i] = Some(Self::of_parts4(p, *n, max_m));
        }
        out.into_iter()
            .map(|s| s.expect("every job summed"))
            .collect()
    }

    /// Adds the sums of `other` (another batch of the same site).
    pub fn merge(&mut self, other: &SiteSums) {
        if other.n == 0.0 {
            return;
        }
        if self.abs.is_empty() {
            self.abs = vec![0.0; other.abs.len()];
            self.raw = vec![0.0; other.raw.len()];
        }
        for (s, v) in self.abs.iter_mut().zip(&other.abs) {
            *s += v;
        }
        for (s, v) in self.raw.iter_mut().zip(&other.raw) {
            *s += v;
        }
        self.n += other.n;
    }

    /// Adds the sums of orders 1..=max_m of `t`'s entries.
    pub fn add(&mut self, t: &Tensor, max_m: u32) {
        self.merge(&Self::of(t, max_m));
    }
}

/// The fused CPU pass over `t`, a contiguous CPU tensor of `T` entries.
fn cpu_sums<T: tch::kind::Element + Entry>(t: &Tensor, m: usize) -> (Vec<f64>, Vec<f64>) {
    assert!(t.device() == Device::Cpu && t.is_contiguous() && t.kind() == T::KIND);
    let x = slice_of::<T>(t);
    let (a, r): (Vec<f64>, Vec<f64>) = if m <= 4 {
        let (a, r) = slice_sums4::<T>(x);
        (a.to_vec(), r.to_vec())
    } else {
        let (a, r) = slice_sums::<T, { crate::limits::MAX_MOMENT as usize }>(x);
        (a.to_vec(), r.to_vec())
    };
    (a[..m].to_vec(), r[..m].to_vec())
}

/// The entries of `t`, a contiguous CPU tensor, in place (no copy: a pass reads the
/// tensor's own memory once), for as long as `t` is borrowed.
/// Callers only read them between libtorch calls that could write to `t` (the passes
/// here run in `no_grad`, on tensors nothing else holds a mutable handle to).
#[allow(unsafe_code)]
fn slice_of<T: tch::kind::Element>(t: &Tensor) -> &[T] {
    assert!(t.device() == Device::Cpu && t.is_contiguous() && t.kind() == T::KIND);
    let n = t.numel();
    let ptr = t.data_ptr() as *const T;
    if n == 0 || ptr.is_null() {
        return &[];
    }
    // SAFETY: `t` is a contiguous CPU tensor of `n` entries of type `T` (asserted above),
    // so its data is `n` initialised, aligned `T`s from `data_ptr`; the slice borrows `t`,
    // which keeps its storage alive, and nothing writes to it meanwhile (see above).
    unsafe { std::slice::from_raw_parts(ptr, n) }
}

/// The expression of [`SiteSums::of`] for other devices.
fn tensor_sums(t: &Tensor, m: usize) -> (Vec<f64>, Vec<f64>) {
    let z = t.detach().reshape([-1, 1]).to_kind(Kind::Double);
    let e = Tensor::arange_start(1, m as i64 + 1, (Kind::Double, z.device()));
    let dims: &[i64] = &[0];
    let raw = z.pow(&e).sum_dim_intlist(dims, false, Kind::Double);
    let abs = z.abs().pow(&e).sum_dim_intlist(dims, false, Kind::Double);
    let both: Vec<f64> =
        Vec::try_from(Tensor::cat(&[abs, raw], 0).to_device(Device::Cpu)).expect("f64 sums");
    (both[..m].to_vec(), both[m..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moments of `v` in f64, computed directly.
    fn direct(v: &[f64], m: i32) -> (f64, f64) {
        let n = v.len() as f64;
        (
            v.iter().map(|x| x.abs().powi(m)).sum::<f64>() / n,
            v.iter().map(|x| x.powi(m)).sum::<f64>() / n,
        )
    }

    #[test]
    fn moments_match_a_direct_computation() {
        let y = Tensor::randn([7, 5], (Kind::Float, Device::Cpu));
        let v: Vec<f32> = Vec::<f32>::try_from(y.flatten(0, -1)).expect("f32");
        // Tiny values (gradients of a mean loss are often 1e-9 and below): their powers
        // underflow f32, not the f64 pass.
        for scale in [1.0f64, 1e-9, 1e-20, 1e12] {
            let ys = (&y * scale).to_kind(Kind::Float);
            let vs: Vec<f64> = Vec::<f32>::try_from(ys.flatten(0, -1))
                .expect("f32")
                .into_iter()
                .map(f64::from)
                .collect();
            let (abs, raw) = moments(&ys, 8);
            for m in 1..=8i32 {
                let (a, r) = direct(&vs, m);
                assert!(
                    (abs[m as usize - 1] / a - 1.0).abs() < 1e-12,
                    "m {m}, scale {scale}"
                );
                // Raw odd moments can be near zero by cancellation: compare to the abs scale.
                assert!(
                    (raw[m as usize - 1] - r).abs() < 1e-12 * a,
                    "m {m}, scale {scale}"
                );
            }
        }
        assert_eq!(v.len(), 35);
        assert_eq!(
            moments(&Tensor::zeros([3], (Kind::Float, Device::Cpu)), 2),
            (vec![0.0; 2], vec![0.0; 2])
        );
        let bad = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        assert!(moments(&bad, 2).0.iter().all(|v| !v.is_finite()));
    }

    /// `f(ts)` on rayon pools of 1, 2 and 5 threads: the same bits on each; returns the
    /// one-thread result.
    fn on_pools(ts: &[&Tensor], f: fn(&[Tensor]) -> SiteSums, what: &str) -> SiteSums {
        let run = |threads| {
            let owned: Vec<Tensor> = ts.iter().map(|t| t.shallow_clone()).collect();
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(move || f(&owned))
        };
        let one = run(1);
        for threads in [2, 5] {
            let s = run(threads);
            assert!(
                s.abs
                    .iter()
                    .zip(&one.abs)
                    .chain(s.raw.iter().zip(&one.raw))
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: {threads} threads"
            );
        }
        one
    }

    /// `of_product` against the product formed in f64 by libtorch and summed by `of`:
    /// without and with a dropout mask, widths that are and are not multiples of the
    /// kernel's 8 columns; the same bits at 1, 2 and 5 threads above `SERIAL_MAX`
    /// entries; `None` where it does not apply.
    #[test]
    fn product_sums_match_the_formed_product() {
        tch::manual_seed(3);
        let close = |a: &SiteSums, b: &SiteSums, what: &str| {
            assert_eq!(a.n, b.n, "{what}");
            for (x, y) in a.abs.iter().zip(&b.abs) {
                assert!((x / y - 1.0).abs() < 1e-5, "{what}: abs {x} vs {y}");
            }
            for (x, y, s) in a
                .raw
                .iter()
                .zip(&b.raw)
                .zip(&b.abs)
                .map(|((x, y), s)| (x, y, s))
            {
                assert!((x - y).abs() < 1e-5 * s, "{what}: raw {x} vs {y}");
            }
        };
        for (n, r, cols) in [(37, 16, 576), (64, 5, 13), (129, 8, 1)] {
            let g = Tensor::randn([n, r], (Kind::Float, Device::Cpu)) * 1e-3;
            let a = Tensor::randn([r, cols], (Kind::Float, Device::Cpu));
            let want = SiteSums::of(&g.to_kind(Kind::Double).matmul(&a.to_kind(Kind::Double)), 4);
            let got = SiteSums::of_product(&g, &a, None, 4).expect("applies");
            close(&got, &want, &format!("{n}x{r}x{cols}"));
            let mask = Tensor::rand([n, cols], (Kind::Float, Device::Cpu)).ge(0.3);
            let scale = 1.0 / 0.7;
            let masked = g.to_kind(Kind::Double).matmul(&a.to_kind(Kind::Double))
                * mask.to_kind(Kind::Double)
                * scale;
            let got = SiteSums::of_product(&g, &a, Some((&mask, scale)), 3).expect("applies");
            close(
                &got,
                &SiteSums::of(&masked, 3),
                &format!("{n}x{r}x{cols} masked"),
            );
            // The mask matters: without it the sums are another tensor's.
            let unmasked = SiteSums::of_product(&g, &a, None, 3).expect("applies");
            assert!((unmasked.abs[1] / got.abs[1] - 1.0).abs() > 0.05);
        }
        let (n, r, cols) = (SERIAL_MAX / 1000 + 70, 4, 1000);
        let g = Tensor::randn([n as i64, r], (Kind::Float, Device::Cpu));
        let a = Tensor::randn([r, cols], (Kind::Float, Device::Cpu));
        let one = on_pools(
            &[&g, &a],
            |t| SiteSums::of_product(&t[0], &t[1], None, 4).expect("applies"),
            "of_product",
        );
        close(
            &one,
            &SiteSums::of(&g.to_kind(Kind::Double).matmul(&a.to_kind(Kind::Double)), 4),
            "large",
        );
        // The AVX2 build of the row kernel and the portable one give the same bits.
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            let (r, cols) = (7, 77);
            let g: Vec<f32> = (0..r).map(|k| (k as f32 * 0.37).sin()).collect();
            let a: Vec<f32> = (0..r * cols).map(|i| (i as f32 * 0.11).cos()).collect();
            let (mut x, mut y) = (vec![0.0f32; cols], vec![0.0f32; cols]);
            product_row(&g, &a, r, &mut x, None);
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2, checked above.
            unsafe {
                product_row_avx2(&g, &a, r, &mut y, None)
            };
            assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
        // Where it does not apply: f64, orders above 4, mismatched shapes.
        let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        assert!(SiteSums::of_product(&g.to_kind(Kind::Double), &a, None, 4).is_none());
        assert!(SiteSums::of_product(&g, &a, None, 5).is_none());
        assert!(SiteSums::of_product(&g, &a.narrow(0, 0, 3), None, 4).is_none());
    }

    /// `of_many` gives, job by job and in order, the bits of `of` and `of_product` on the
    /// same job: f32 entries and products (with and without a mask) that run together,
    /// and the jobs that do not (f64 entries, an f64 product: its sums are those of the
    /// formed product); below and above `SERIAL_MAX` entries in all, on
    /// pools of 1, 2 and 5 threads; at orders 3 and 6 (above 4 nothing runs together).
    #[test]
    fn many_sums_are_each_jobs_own() {
        tch::manual_seed(5);
        let f = (Kind::Float, Device::Cpu);
        let bits = |a: &SiteSums, b: &SiteSums| {
            a.n == b.n
                && a.abs.len() == b.abs.len()
                && a.abs
                    .iter()
                    .chain(&a.raw)
                    .zip(b.abs.iter().chain(&b.raw))
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        };
        for big in [false, true] {
            let rows = if big {
                SERIAL_MAX as i64 / 3000 + 50
            } else {
                40
            };
            let (r, cols) = (16i64, 1000i64);
            let g = Tensor::randn([rows, r], f);
            let a = Tensor::randn([r, cols], f);
            let v = Tensor::randn([rows, cols], f);
            let mask = Tensor::rand([rows, cols], f).ge(0.3);
            let w = Tensor::randn([rows, cols], (Kind::Double, Device::Cpu));
            let jobs = || {
                vec![
                    SumJob::Product {
                        g: g.shallow_clone(),
                        a: a.shallow_clone(),
                        mask: None,
                    },
                    SumJob::Entries(v.shallow_clone()),
                    SumJob::Product {
                        g: g.shallow_clone(),
                        a: a.shallow_clone(),
                        mask: Some((mask.shallow_clone(), 1.0 / 0.7)),
                    },
                    SumJob::Entries(w.shallow_clone()),
                    SumJob::Product {
                        g: g.to_kind(Kind::Double),
                        a: a.to_kind(Kind::Double),
                        mask: Some((mask.shallow_clone(), 2.0)),
                    },
                ]
            };
            for max_m in [3u32, 6] {
                let one_job = |i: usize| -> SiteSums {
                    match i {
                        0 => SiteSums::of_product(&g, &a, None, max_m)
                            .unwrap_or_else(|| SiteSums::of(&g.matmul(&a), max_m)),
                        1 => SiteSums::of(&v, max_m),
                        2 => SiteSums::of_product(&g, &a, Some((&mask, 1.0 / 0.7)), max_m)
                            .unwrap_or_else(|| {
                                SiteSums::of(&(g.matmul(&a) * &mask * (1.0 / 0.7)), max_m)
                            }),
                        3 => SiteSums::of(&w, max_m),
                        _ => SiteSums::of(
                            &(g.to_kind(Kind::Double).matmul(&a.to_kind(Kind::Double))
                                * &mask
                                * 2.0),
                            max_m,
                        ),
                    }
                };
                let want: Vec<SiteSums> = (0..5).map(one_job).collect();
                // The jobs differ, so a mix-up of their order shows.
                assert!(!bits(&want[0], &want[2]) && !bits(&want[1], &want[3]));
                for threads in [1, 2, 5] {
                    let owned = jobs();
                    let got = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .expect("pool")
                        .install(move || SiteSums::of_many(&owned, max_m));
                    assert_eq!(got.len(), want.len());
                    for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            bits(x, y),
                            "job {i}, big {big}, order {max_m}, {threads} threads: {x:?} vs {y:?}"
                        );
                    }
                }
            }
        }
    }

    /// The fused CPU pass against the tensor expression (the CUDA path, here on CPU), on
    /// f32 and f64 tensors larger than a chunk, for orders up to 4 and up to 8; and the
    /// sums are bit-identical on pools of 1, 2 and 5 threads.
    #[test]
    fn the_fused_pass_matches_the_expression_and_ignores_the_thread_count() {
        let t = Tensor::randn([3 * CHUNK as i64 + 17], (Kind::Float, Device::Cpu)) * 1e-3;
        for kind in [Kind::Float, Kind::Double] {
            let t = t.to_kind(kind);
            for m in [3u32, 4, 7] {
                let fused = SiteSums::of(&t, m);
                let (abs, raw) = tensor_sums(&t, m as usize);
                assert_eq!(fused.n, t.numel() as f64);
                for k in 0..m as usize {
                    assert!(
                        (fused.abs[k] / abs[k] - 1.0).abs() < 1e-10,
                        "{kind:?} m {m} abs {k}"
                    );
                    assert!(
                        (fused.raw[k] - raw[k]).abs() < 1e-10 * abs[k],
                        "{kind:?} m {m} raw {k}"
                    );
                }
            }
        }
        // Above SERIAL_MAX entries the chunks are summed on the pool: the same bits at any
        // thread count, and the same as the chunks summed in order on one thread.
        let big = Tensor::randn(
            [SERIAL_MAX as i64 + 3 * CHUNK as i64 + 5],
            (Kind::Float, Device::Cpu),
        );
        for t in [&t, &big] {
            on_pools(
                &[t],
                |t| SiteSums::of(&t[0], 4),
                &format!("{} entries", t.numel()),
            );
        }
        let x: Vec<f32> = Vec::try_from(&big).expect("f32");
        let serial = add_in_order(x.chunks(CHUNK).map(<f32 as Entry>::sums4));
        let pooled = SiteSums::of(&big, 4);
        assert_eq!(pooled.abs[1].to_bits(), serial[2].to_bits());
        assert_eq!(pooled.raw[0].to_bits(), serial[1].to_bits());
        // The f32 fast path (AVX2 where the CPU has it) and the portable loop give the same
        // bits, with entries past the last group of eight.
        let v: Vec<f32> = Vec::try_from(t.narrow(0, 0, 1003)).expect("f32");
        let (fast, portable) = (<f32 as Entry>::sums4(&v), chunk_sums4(&v));
        assert!(
            fast.iter()
                .zip(&portable)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{fast:?} {portable:?}"
        );
        // A non-contiguous view is read as its entries.
        let m = Tensor::randn([40, 30], (Kind::Float, Device::Cpu));
        assert_eq!(
            SiteSums::of(&m.tr(), 4),
            SiteSums::of(&m.tr().contiguous(), 4)
        );
    }

    #[test]
    fn stable_rank_and_norm_match_the_full_matrix() {
        let b = Tensor::randn([20, 4], (Kind::Double, Device::Cpu));
        let a = Tensor::randn([4, 30], (Kind::Double, Device::Cpu));
        let (f, sr) = delta_norm_and_stable_rank(&b, &a, 0.3);
        let full = b.matmul(&a) * 0.3;
        let (_, s, _) = full.svd(true, false);
        let f2 = s.square().sum(Kind::Double).double_value(&[]);
        let top = s.max().double_value(&[]);
        assert!((f - f2.sqrt()).abs() < 1e-9 * f);
        assert!((sr - f2 / (top * top)).abs() < 1e-9 * sr);
        assert!((f - fro(&full)).abs() < 1e-9 * f);
    }

    /// The probes' token sample: `keep` distinct real-token rows in ascending order, the
    /// same for the same seed, every real token when `keep` is 0 or at least their
    /// number; and a simple random sample: over 4000 seeds each real token is drawn with
    /// probability keep / n (a binomial count within 5 standard deviations), padding never.
    #[test]
    fn probe_rows_are_a_simple_random_sample_of_the_real_tokens() {
        let seq = |len: usize| crate::data::Sequence {
            ids: vec![1; len],
            mask: vec![true; len - 1],
        };
        let (a, b, c) = (seq(9), seq(5), seq(9));
        let valid = valid_rows(&[&a, &b, &c]);
        // T = 8: rows 0..8, 8..12 (12..16 are padding), 16..24.
        assert_eq!(valid.1, 24);
        assert_eq!(valid.0.len(), 20);
        assert!(valid.0.iter().all(|&r| !(12..16).contains(&r)));
        let cpu = Device::Cpu;
        let list =
            |t: Option<Tensor>| -> Option<Vec<i64>> { t.map(|t| Vec::try_from(t).expect("i64")) };
        assert_eq!(list(probe_rows(&valid, 0, 1, cpu)), Some(valid.0.clone()));
        assert_eq!(list(probe_rows(&valid, 20, 1, cpu)), Some(valid.0.clone()));
        let full = valid_rows(&[&a, &c]);
        assert_eq!(list(probe_rows(&full, 0, 1, cpu)), None);
        assert_eq!(list(probe_rows(&full, 100, 1, cpu)), None);
        let (keep, seeds) = (6usize, 4000u64);
        let mut count = std::collections::BTreeMap::<i64, usize>::new();
        for seed in 0..seeds {
            let got = list(probe_rows(&valid, keep, seed, cpu)).expect("a sample");
            assert_eq!(got.len(), keep);
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "ascending, distinct: {got:?}"
            );
            assert!(got.iter().all(|r| valid.0.contains(r)), "{got:?}");
            for r in got {
                *count.entry(r).or_default() += 1;
            }
        }
        assert_eq!(
            list(probe_rows(&valid, keep, 7, cpu)),
            list(probe_rows(&valid, keep, 7, cpu))
        );
        assert_ne!(
            list(probe_rows(&valid, keep, 7, cpu)),
            list(probe_rows(&valid, keep, 8, cpu))
        );
        let p = keep as f64 / valid.0.len() as f64;
        let (mean, sd) = (seeds as f64 * p, (seeds as f64 * p * (1.0 - p)).sqrt());
        assert_eq!(count.len(), valid.0.len());
        for (r, n) in count {
            assert!(
                (n as f64 - mean).abs() < 5.0 * sd,
                "row {r} drawn {n} times, expected {mean:.0} +- {sd:.0}"
            );
        }
        // Different steps and micro-batches draw from different streams.
        let seeds = [
            sample_seed(0, 2, 0),
            sample_seed(0, 3, 0),
            sample_seed(0, 2, 1),
            sample_seed(1, 2, 0),
        ];
        for i in 0..seeds.len() {
            for j in 0..i {
                assert_ne!(seeds[i], seeds[j]);
            }
        }
    }
}
