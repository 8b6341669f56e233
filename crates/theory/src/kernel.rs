//! The checker's matrix products, without packing the large operand.
//!
//! Every product the checker computes has one small dimension: the rows of a batch (16 to
//! a few hundred) against a width or a rank (up to 65,536). A general GEMM (matrixmultiply)
//! copies both operands into panels before its kernel runs; with a small dimension of N,
//! every entry of the large operand is copied to be used only N times, and on the
//! checker's default cells that copy took as long as half the arithmetic (perf: 26% of a
//! trial's samples in `pack_avx512` against 38% in the kernel at batch 64).
//!
//! Here the large operand is read where it lies. A register tile of up to 6 rows by 4
//! vectors of 16 columns accumulates `C[i, j] += A[i, k] B[k, j]`: B's row `k` is loaded
//! as vectors (B needs unit column stride), A's entries are broadcast from anywhere (any
//! strides). A product whose large operand is the transposed one (`X P^T`, P row-major) is
//! computed as its transpose `P X^T`, with only the small `X^T` and `C^T` copied.
//!
//! Every entry of the result is the sequential fused multiply-add chain over `k`, from
//! zero (or from C's value when accumulating): `c = fma(a[0], b[0], c)`, then `a[1]`, ...
//! whatever the tile it falls in, the shape, or the thread it runs on. [`reference`] is
//! that chain in scalar code, and the tests hold the kernel to it bit for bit; a column
//! of a wider product is bit-identical to the same column computed alone (the checker's
//! shared products rely on this).
//!
//! The tiles exist for AVX-512F (6 rows by 4 vectors of 16) and for AVX2 with FMA (6 rows
//! by 2 vectors of 8), chosen at run time ([`kernel`]). Both compute the same chain, so an
//! x86-64 machine with either gives the same bits (the tests run both where the CPU has
//! both). Elsewhere, or for strides the tiles do not take, the product goes to ndarray's
//! `general_mat_mul` (matrixmultiply), deterministic too but not the same bits.
//!
//! Measured here (one core of the 2-core benchmark machine, best of 5 in GFLOP/s, from a
//! scratch timing that is not committed): `x A^T` with x of 16 to 96 rows by 4096 and A
//! 2048 x 4096, 84-101 against matrixmultiply's 21-66; `coef p` accumulated (16 to 96
//! rows by 2048, by 2048 x 4096), 42-89 against 38-76; `x A^T` at rank 64 with 48 rows,
//! 76 against 28, and at rank 16 with 96 rows, 35 against 16. A default trial of the
//! checker went from 3.5-3.8 s to 2.5-3.0 s, and from 7.0-7.4 s to 5.3-6.4 s at batch 64
//! (the spread is the shared host's). With AVX2 forced on the same machine: 3.5-3.6 s and
//! 7.7-8.4 s (in a slow spell of the host): as matrixmultiply at the default batch, a
//! tenth slower at batch 64.
//!
//! [`wide`] runs element-wise work (the checker's Adam update) compiled with AVX-512F or
//! AVX2 where the machine has them: the crate is built for baseline x86-64, where that
//! update ran two lanes at a time; the bits do not change with the width.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

/// `c = a b`, or `c += a b` when `accumulate`. Shapes must agree (checked).
pub fn matmul_into(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    accumulate: bool,
    mut c: ArrayViewMut2<f32>,
) {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert_eq!(k, k2, "inner dimensions differ: {k} and {k2}");
    assert_eq!(c.dim(), (m, n), "output shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let done = match kernel() {
            Kernel::Avx512 => x86::matmul::<x86::Avx512>(a, b, accumulate, c.view_mut()),
            Kernel::Avx2 => x86::matmul::<x86::Avx2>(a, b, accumulate, c.view_mut()),
            Kernel::General => false,
        };
        if done {
            return;
        }
    }
    general_mat_mul(1.0, &a, &b, if accumulate { 1.0 } else { 0.0 }, &mut c);
}

/// `a b` as a new array (see [`matmul_into`]).
pub fn matmul(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
    let mut c = Array2::<f32>::zeros((a.nrows(), b.ncols()));
    matmul_into(a, b, false, c.view_mut());
    c
}

/// Which code computes [`matmul_into`]'s products on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The register tiles with AVX-512F (16 lanes).
    Avx512,
    /// The register tiles with AVX2 and FMA (8 lanes): the same bits as AVX-512.
    Avx2,
    /// ndarray's `general_mat_mul` (no x86-64 FMA): other bits.
    General,
}

/// The kernel this machine runs (detected once).
pub fn kernel() -> Kernel {
    static FOUND: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::avx512() {
                return Kernel::Avx512;
            }
            if x86::avx2() {
                return Kernel::Avx2;
            }
        }
        Kernel::General
    })
}

/// Element-wise work to be compiled for this machine's widest vectors (see [`wide`]).
/// Implementations mark `run` `#[inline(always)]`, so that its loops are compiled into
/// [`wide`]'s instruction-set-specific copies.
pub trait Wide {
    /// What the work returns.
    type Out;
    /// Does the work.
    fn run(self) -> Self::Out;
}

/// Runs `work` compiled with AVX-512F or AVX2 enabled where [`kernel`] found them, so
/// that the compiler vectorises its loops at that width (the crate is built for baseline
/// x86-64, whose SSE2 vectors hold 4 floats). Only the width changes, not the bits: Rust
/// never contracts a multiply and an add into a fused multiply-add, and the element-wise
/// operations (add, multiply, divide, square root, compare) are correctly rounded at any
/// width. Elsewhere `work` runs as compiled.
pub fn wide<W: Wide>(work: W) -> W::Out {
    #[cfg(target_arch = "x86_64")]
    {
        match kernel() {
            Kernel::Avx512 => return x86::wide_avx512(work),
            Kernel::Avx2 => return x86::wide_avx2(work),
            Kernel::General => {}
        }
    }
    work.run()
}

/// Whether [`matmul_into`] runs a register-tile kernel here (the bit-exact contract with
/// [`reference`] holds only then).
pub fn kernel_available() -> bool {
    kernel() != Kernel::General
}

/// The kernel's arithmetic in scalar code: each entry the fused multiply-add chain over
/// `k` in order, from zero or from `c`.
pub fn reference(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    accumulate: bool,
    mut c: ArrayViewMut2<f32>,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    for i in 0..m {
        for j in 0..n {
            let mut acc = if accumulate { c[[i, j]] } else { 0.0 };
            for p in 0..k {
                acc = a[[i, p]].mul_add(b[[p, j]], acc);
            }
            c[[i, j]] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use ndarray::{Array2, ArrayView2, ArrayViewMut2};
    use std::arch::x86_64::*;

    /// An instruction set: its register tile and its operations on vectors of f32 lanes
    /// (masked loads and stores touch only the mask's lanes).
    ///
    /// # Safety
    /// Every method needs the instruction set; loads and stores need the mask's lanes
    /// inside their array.
    pub(super) trait Isa {
        /// Lanes of a vector.
        const LANES: usize;
        /// Most vectors of a tile's row.
        const NV: usize;
        type V: Copy;
        type M: Copy;
        /// Runs the tile of `mr` rows (1..=6) and `nv` vectors (1..=NV): [`tile`] inlined
        /// into a function that enables the instruction set.
        ///
        /// # Safety
        /// `t` addresses mr rows and `t.cols` columns inside C, and A and B accordingly.
        unsafe fn tile(t: &Tile, mr: usize, nv: usize);
        /// The first `n` lanes (all of them when `n >= LANES`).
        unsafe fn mask(n: usize) -> Self::M;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32, m: Self::M) -> Self::V;
        unsafe fn store(p: *mut f32, m: Self::M, x: Self::V);
        unsafe fn splat(x: f32) -> Self::V;
        /// `a b + c`, rounded once.
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    }

    /// AVX-512F: 6 rows by 4 vectors of 16 (24 of the 32 registers accumulate).
    pub(super) struct Avx512;
    /// AVX2 with FMA: 6 rows by 2 vectors of 8 (12 of the 16 registers accumulate).
    pub(super) struct Avx2;

    pub(super) fn avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    pub(super) fn avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    /// `work` compiled with AVX-512F. Only called where `kernel()` found it.
    pub(super) fn wide_avx512<W: super::Wide>(work: W) -> W::Out {
        #[target_feature(enable = "avx512f")]
        unsafe fn go<W: super::Wide>(work: W) -> W::Out {
            work.run()
        }
        debug_assert!(avx512());
        // SAFETY: the CPU has AVX-512F (the caller checked, by `kernel()`).
        unsafe { go(work) }
    }

    /// `work` compiled with AVX2 (not FMA: nothing to contract). Only called where
    /// `kernel()` found it.
    pub(super) fn wide_avx2<W: super::Wide>(work: W) -> W::Out {
        #[target_feature(enable = "avx2")]
        unsafe fn go<W: super::Wide>(work: W) -> W::Out {
            work.run()
        }
        debug_assert!(avx2());
        // SAFETY: the CPU has AVX2 (the caller checked, by `kernel()`).
        unsafe { go(work) }
    }

    /// Rows of the register tile.
    const MR: usize = 6;
    /// Depth of one pass over the inner dimension when B is the large operand: a (KC x
    /// 64) panel of B is 64 KiB, reused by every row tile; the tile's accumulators go back
    /// to C between passes (the same bits: the chain resumes where it stopped).
    const KC: usize = 256;

    /// Computes the product if the operands' strides suit the kernel; false otherwise
    /// (nothing written). The caller checked that the CPU has `I`.
    pub(super) fn matmul<I: Isa>(
        a: ArrayView2<f32>,
        b: ArrayView2<f32>,
        accumulate: bool,
        mut c: ArrayViewMut2<f32>,
    ) -> bool {
        let (m, n) = c.dim();
        if b.strides()[1] == 1 || n == 1 {
            // C = A B, B's rows loaded as vectors, in panels of KC rows.
            if c.strides()[1] == 1 || n == 1 {
                let ldc = c.strides()[0];
                // SAFETY: the views address their own shapes; the kernel reads A and B and
                // writes C only inside them (vector lanes past column n are masked off).
                unsafe { run::<I>(a, b, accumulate, c.as_mut_ptr(), ldc, KC) };
            } else {
                let mut tmp = start(c.view(), accumulate);
                // SAFETY: as above; `tmp` is a standard-layout m x n array.
                unsafe { run::<I>(a, b, accumulate, tmp.as_mut_ptr(), n as isize, KC) };
                c.assign(&tmp);
            }
            return true;
        }
        if b.strides()[0] == 1 {
            // C = X P^T with P row-major: C^T = P X^T, with X^T and C^T copied (small) so
            // that their rows load and store as vectors. X^T is the small operand here and
            // stays in cache: no panels of it (one pass over the whole inner dimension).
            let p = b.t();
            let xt = transposed(a);
            let mut ct = start(c.t(), accumulate);
            // SAFETY: as above; `ct` is a standard-layout n x m array.
            unsafe {
                run::<I>(
                    p,
                    xt.view(),
                    accumulate,
                    ct.as_mut_ptr(),
                    m as isize,
                    usize::MAX,
                )
            };
            c.assign(&ct.t());
            return true;
        }
        false
    }

    /// A standard-layout copy of `c` to run the tiles on: its values when accumulating,
    /// zeros otherwise.
    fn start(c: ArrayView2<f32>, accumulate: bool) -> Array2<f32> {
        if accumulate {
            c.as_standard_layout().into_owned()
        } else {
            Array2::zeros(c.dim())
        }
    }

    /// `x^T` in standard layout. A row-major `x` is read a row at a time and written in
    /// blocks of 64 of its columns (the written rows stay in cache); ndarray's copy of a
    /// transposed view goes entry by entry and cost more than the product at small ranks.
    fn transposed(x: ArrayView2<f32>) -> Array2<f32> {
        let (m, k) = x.dim();
        let Some(src) = x.as_slice() else {
            return x.t().as_standard_layout().into_owned();
        };
        let mut out = vec![0f32; m * k];
        for p0 in (0..k).step_by(64) {
            let p1 = (p0 + 64).min(k);
            for (i, row) in src.chunks_exact(k).enumerate() {
                for (p, &v) in (p0..p1).zip(&row[p0..p1]) {
                    out[p * m + i] = v;
                }
            }
        }
        Array2::from_shape_vec((k, m), out).expect("k x m entries")
    }

    /// `C (m x n) (+)= A (m x k) B (k x n)`, B with unit column stride, C row-major with
    /// row stride `ldc`; the inner dimension in passes of `kc`.
    ///
    /// # Safety
    /// The CPU has `I`; `c` addresses an m x n array with row stride `ldc` and unit column
    /// stride.
    unsafe fn run<I: Isa>(
        a: ArrayView2<f32>,
        b: ArrayView2<f32>,
        accumulate: bool,
        c: *mut f32,
        ldc: isize,
        kc: usize,
    ) {
        let (m, k) = a.dim();
        let n = b.ncols();
        let (ars, acs) = (a.strides()[0], a.strides()[1]);
        let brs = b.strides()[0];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let width = I::NV * I::LANES;
        let mut k0 = 0;
        while k0 < k {
            let depth = kc.min(k - k0);
            for j0 in (0..n).step_by(width) {
                let nv = (n - j0).div_ceil(I::LANES).min(I::NV);
                for i0 in (0..m).step_by(MR) {
                    let mr = (m - i0).min(MR);
                    // SAFETY: every offset is inside its view (i0 < m, j0 < n, k0 < k).
                    let t = unsafe {
                        Tile {
                            a: ap.offset(i0 as isize * ars + k0 as isize * acs),
                            ars,
                            acs,
                            b: bp.offset(k0 as isize * brs + j0 as isize),
                            brs,
                            k: depth,
                            cols: (n - j0).min(width),
                            c: c.offset(i0 as isize * ldc + j0 as isize),
                            ldc,
                            accumulate: accumulate || k0 > 0,
                        }
                    };
                    // SAFETY: the tile addresses mr rows and `cols` columns inside C.
                    unsafe { I::tile(&t, mr, nv) };
                }
            }
            k0 += depth;
        }
    }

    /// One register tile's operands.
    pub(super) struct Tile {
        a: *const f32,
        ars: isize,
        acs: isize,
        b: *const f32,
        brs: isize,
        k: usize,
        /// Columns of the tile that exist (the last vector is masked past them).
        cols: usize,
        c: *mut f32,
        ldc: isize,
        accumulate: bool,
    }

    /// The tile for each (rows, vectors) of an instruction set.
    macro_rules! dispatch {
        ($isa:ty, $t:expr, $mr:expr, $nv:expr, [$($v:literal)*]) => {
            // SAFETY: the caller's contract, for the tile's shape.
            match ($mr, $nv) {
                $( (1, $v) => unsafe { tile::<$isa, 1, $v>($t) },
                   (2, $v) => unsafe { tile::<$isa, 2, $v>($t) },
                   (3, $v) => unsafe { tile::<$isa, 3, $v>($t) },
                   (4, $v) => unsafe { tile::<$isa, 4, $v>($t) },
                   (5, $v) => unsafe { tile::<$isa, 5, $v>($t) },
                   (6, $v) => unsafe { tile::<$isa, 6, $v>($t) }, )*
                (mr, nv) => unreachable!("tile {mr} x {nv}"),
            }
        };
    }

    impl Isa for Avx512 {
        const LANES: usize = 16;
        const NV: usize = 4;
        type V = __m512;
        type M = u16;
        unsafe fn tile(t: &Tile, mr: usize, nv: usize) {
            #[target_feature(enable = "avx512f")]
            unsafe fn go(t: &Tile, mr: usize, nv: usize) {
                dispatch!(Avx512, t, mr, nv, [1 2 3 4])
            }
            // SAFETY: the caller's contract.
            unsafe { go(t, mr, nv) }
        }
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn mask(n: usize) -> u16 {
            if n >= 16 {
                0xffff
            } else {
                (1u16 << n) - 1
            }
        }
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn load(p: *const f32, m: u16) -> __m512 {
            // SAFETY: the trait's contract.
            unsafe { _mm512_maskz_loadu_ps(m, p) }
        }
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn store(p: *mut f32, m: u16, x: __m512) {
            // SAFETY: the trait's contract.
            unsafe { _mm512_mask_storeu_ps(p, m, x) }
        }
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
    }

    impl Isa for Avx2 {
        const LANES: usize = 8;
        const NV: usize = 2;
        type V = __m256;
        /// Lane l is loaded and stored when its sign bit is set.
        type M = __m256i;
        unsafe fn tile(t: &Tile, mr: usize, nv: usize) {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn go(t: &Tile, mr: usize, nv: usize) {
                dispatch!(Avx2, t, mr, nv, [1 2])
            }
            // SAFETY: the caller's contract.
            unsafe { go(t, mr, nv) }
        }
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn mask(n: usize) -> __m256i {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), lanes)
        }
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn load(p: *const f32, m: __m256i) -> __m256 {
            // SAFETY: the trait's contract.
            unsafe { _mm256_maskload_ps(p, m) }
        }
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn store(p: *mut f32, m: __m256i, x: __m256) {
            // SAFETY: the trait's contract.
            unsafe { _mm256_maskstore_ps(p, m, x) }
        }
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
    }

    /// The register tile: R rows by V vectors. Every index into the accumulators is a
    /// constant after unrolling, so that they live in registers. Inlined into each
    /// instruction set's `go` (which enables it), where its operations inline in turn.
    ///
    /// # Safety
    /// The CPU has `L`; the tile's contract (see [`Isa::tile`]).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<L: Isa, const R: usize, const V: usize>(t: &Tile) {
        let w = L::LANES;
        // SAFETY (every block below): the caller's contract; the offsets stay inside the
        // tile's rows, columns and inner dimension.
        unsafe {
            let mut mask = [L::mask(w); V];
            mask[V - 1] = L::mask(t.cols - (V - 1) * w);
            let at = |i: usize, v: usize| t.c.offset(i as isize * t.ldc + (v * w) as isize);
            let mut acc = [[L::zero(); V]; R];
            if t.accumulate {
                for i in 0..R {
                    for v in 0..V {
                        acc[i][v] = L::load(at(i, v), mask[v]);
                    }
                }
            }
            for p in 0..t.k {
                let brow = t.b.offset(p as isize * t.brs);
                let mut bv = [L::zero(); V];
                for v in 0..V {
                    bv[v] = L::load(brow.add(v * w), mask[v]);
                }
                let acol = t.a.offset(p as isize * t.acs);
                for i in 0..R {
                    let av = L::splat(*acol.offset(i as isize * t.ars));
                    for v in 0..V {
                        acc[i][v] = L::fma(av, bv[v], acc[i][v]);
                    }
                }
            }
            for i in 0..R {
                for v in 0..V {
                    L::store(at(i, v), mask[v], acc[i][v]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, ShapeBuilder};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn draw(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
    }

    /// Every layout the checker uses (B row-major, B a transposed row-major matrix, A
    /// transposed, C accumulated, C a transposed view), on shapes with every remainder of
    /// the tile and inner dimensions across the panel depth, against the scalar chain:
    /// bit for bit where the kernel runs, and within rounding of an f64 product everywhere.
    #[test]
    fn products_are_the_reference_chain() {
        for (name, product, exact_chain) in products() {
            check_against_the_chain(name, product, exact_chain);
        }
    }

    type Product = fn(ArrayView2<f32>, ArrayView2<f32>, bool, ArrayViewMut2<f32>);

    /// The public product (bit-exact where a tile kernel runs), and each instruction set's
    /// tiles this CPU has, forced (AVX2 runs here too when the machine has AVX-512).
    fn products() -> Vec<(&'static str, Product, bool)> {
        let mut out: Vec<(&'static str, Product, bool)> =
            vec![("matmul_into", matmul_into, kernel_available())];
        #[cfg(target_arch = "x86_64")]
        {
            fn forced<I: x86::Isa>(
                a: ArrayView2<f32>,
                b: ArrayView2<f32>,
                acc: bool,
                c: ArrayViewMut2<f32>,
            ) {
                assert!(x86::matmul::<I>(a, b, acc, c), "layout the kernel takes");
            }
            if x86::avx512() {
                out.push(("avx512", forced::<x86::Avx512>, true));
            }
            if x86::avx2() {
                out.push(("avx2", forced::<x86::Avx2>, true));
            }
        }
        out
    }

    fn check_against_the_chain(name: &str, product: Product, exact_chain: bool) {
        let shapes = [
            (1, 1, 1),
            (5, 3, 17),
            (7, 300, 33),
            (16, 32, 64),
            (48, 257, 100),
            (13, 513, 130),
            (96, 64, 7),
        ];
        for &(m, k, n) in &shapes {
            let a = draw(m, k, 1);
            let at = draw(k, m, 2);
            let b = draw(k, n, 3);
            let bt = draw(n, k, 4);
            let c0 = draw(m, n, 5);
            for (label, av, bv) in [
                ("a b", a.view(), b.view()),
                ("a b^T", a.view(), bt.t()),
                ("a^T b", at.t(), b.view()),
                ("a^T b^T", at.t(), bt.t()),
            ] {
                for accumulate in [false, true] {
                    for c_transposed in [false, true] {
                        let mut want = c0.clone();
                        reference(av, bv, accumulate, want.view_mut());
                        let mut got = if c_transposed {
                            let data = c0.t().iter().copied().collect();
                            Array2::from_shape_vec((m, n).f(), data).expect("shape")
                        } else {
                            c0.clone()
                        };
                        assert_eq!(got, c0);
                        product(av, bv, accumulate, got.view_mut());
                        let mut exact = av.mapv(f64::from).dot(&bv.mapv(f64::from));
                        if accumulate {
                            exact += &c0.mapv(f64::from);
                        }
                        for ((&g, &w), &e) in got.iter().zip(want.iter()).zip(exact.iter()) {
                            let tol = 1e-5 * (k as f64).sqrt() * (1.0 + e.abs());
                            assert!(
                                (g as f64 - e).abs() <= tol,
                                "{name}: {label} {m}x{k}x{n}: {g} vs {e}"
                            );
                            if exact_chain {
                                assert_eq!(
                                    g.to_bits(),
                                    w.to_bits(),
                                    "{name}: {label} {m}x{k}x{n} accumulate {accumulate}: {g} vs chain {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// A column of a product is the same bits whether it is computed with the others or
    /// alone, and a row likewise: no entry depends on where its tile falls.
    #[test]
    fn entries_do_not_depend_on_the_tile() {
        let x = draw(37, 300, 6);
        let p = draw(90, 300, 7);
        let whole = matmul(x.view(), p.t());
        for j in [0, 15, 16, 41, 89] {
            let alone = matmul(x.view(), p.slice(s![j..j + 1, ..]).t());
            for i in 0..37 {
                assert_eq!(whole[[i, j]].to_bits(), alone[[i, 0]].to_bits());
            }
        }
        for i in [0, 5, 6, 36] {
            let alone = matmul(x.slice(s![i..i + 1, ..]), p.t());
            assert_eq!(whole.row(i), alone.row(0));
        }
        // The contract can fail: the same sums in the reverse order differ in some bits.
        let mut rev = Array2::<f32>::zeros((37, 90));
        reference(
            x.slice(s![.., ..;-1]),
            p.t().slice(s![..;-1, ..]),
            false,
            rev.view_mut(),
        );
        assert!(rev
            .iter()
            .zip(whole.iter())
            .any(|(a, b)| a.to_bits() != b.to_bits()));
    }
}
