//! The linear layer every model uses for its attention and MLP projections: a frozen
//! weight (and bias), plus an optional LoRA adapter. Models call [`Linear::forward`] and
//! never look at the adapter, so adapters (and the probes around them) are attached
//! without touching model code — the `with_tracing` pattern of candle.
use crate::lora::LoraAdapter;
use crate::probe::{rows_of, SiteSums, SumJob};
use std::cell::RefCell;
use tch::Tensor;

/// What a probe keeps from the last forward pass of an adapter (tch has no hooks and no
/// `retain_grad`, so the loss gradient is read from a leaf), at the slot's rows (every
/// real token, or the sample the trainer drew):
/// - the rank-r middle `dropout(x) A^T` (r entries a token), from which the
///   adapter's output `gamma dropout(x) A^T B^T` and its moments are formed after the
///   backward pass ([`Capture::jobs`], where the moment passes of all the adapters
///   of a block run together): the output itself goes into the base's output by one GEMM
///   and is not kept;
/// - a zero leaf added to the output at those rows, expanded from a single entry (no
///   memory of its own), whose gradient after `backward` is the loss gradient `v` there;
/// - the dropout mask: with it and `v`, the gradient into the input through the adapter,
///   `(gamma B A)^T v`, is recomputed after the backward pass ([`Capture::g_u`], then
///   [`Capture::through_adapter`]: two products of rank r), instead of a leaf and a
///   gradient buffer of the input's size;
/// - the adapter's input, when asked for (the law's first two steps).
///
/// The adapter's factors are read after the backward pass: they must not have changed
/// since the forward pass (the trainer reads the probes before the optimizer's step).
#[derive(Debug)]
pub struct Capture {
    /// The adapter's input x (detached, in the adapter's dtype, before dropout), when the
    /// slot asked for it (the law's first two steps): kept, it would hold every layer's
    /// input until the end of the backward pass.
    pub input: Option<Tensor>,
    /// `dropout(x) A^T` at every row (tokens, r), detached (the pass's own tensor, not a
    /// copy).
    pub middle: Tensor,
    /// Zero leaf added to the output at the probed rows (all rows when `rows` is
    /// `None`); its `.grad()` is dL/d(output) there after backward, (rows, out).
    pub probe: Tensor,
    /// The dropout mask (true: kept) when dropout was on in this pass.
    pub mask: Option<Tensor>,
    /// The probed rows of the flattened (tokens, features) activations (the slot's rows
    /// during the pass); `None`: all.
    pub rows: Option<Tensor>,
}

impl Capture {
    /// The loss gradient at the adapter's output, at the probed rows: (rows, out).
    pub fn v(&self) -> Tensor {
        let g = self.probe.grad();
        let out = g.size()[g.dim() - 1];
        g.reshape([-1, out])
    }

    /// `gamma v B` at the probed rows (rows, r): the loss gradient at the rank-r middle
    /// `u = dropout(x) A^T` (what the backward pass computes for A's gradient), from the
    /// output's leaf.
    pub fn g_u(&self, ad: &LoraAdapter) -> Tensor {
        tch::no_grad(|| self.v().to_kind(ad.b.kind()).matmul(&ad.b) * ad.scaling)
    }

    /// The moment sums of the adapter's output `gamma dropout(x) A^T B^T` at the probed
    /// rows, from the kept middle ([`Capture::fwd_job`]).
    pub fn fwd_sums(&self, ad: &LoraAdapter, max_m: u32) -> SiteSums {
        one_sum(self.fwd_job(ad), max_m)
    }

    /// The adapter's output at the probed rows as a product never stored:
    /// `gamma dropout(x) A^T` there (rows, r) times `B^T` (r, out).
    pub fn fwd_job(&self, ad: &LoraAdapter) -> SumJob {
        tch::no_grad(|| SumJob::Product {
            g: rows_of(&self.middle, self.rows.as_ref()) * ad.scaling,
            a: ad.b.tr(),
            mask: None,
        })
    }

    /// The moment-sum jobs of the three sites at the probed rows, in their order: `fwd`
    /// (the adapter's output), `grad_out` (`v`, given: [`Capture::v`]) and `bwd`
    /// (`(gamma B A)^T v` with the pass's dropout).
    pub fn jobs(&self, ad: &LoraAdapter, v: &Tensor) -> [SumJob; 3] {
        let mask = self.mask.as_ref().map(|m| rows_of(m, self.rows.as_ref()));
        [
            self.fwd_job(ad),
            SumJob::Entries(v.shallow_clone()),
            Self::bwd_job(ad, &self.g_u(ad), mask.as_ref()),
        ]
    }

    /// `(gamma B A)^T v` per token, with the dropout of the pass, from `g_u = gamma v B`
    /// (rows, r: [`Capture::g_u`]) and `mask`, the same rows of the dropout mask: `g_u A`
    /// (2 r in flops per token), masked and scaled as dropout's backward pass does.
    pub fn through_adapter(ad: &LoraAdapter, g_u: &Tensor, mask: Option<&Tensor>) -> Tensor {
        tch::no_grad(|| {
            let g = g_u.to_kind(ad.a.kind()).matmul(&ad.a);
            match mask {
                Some(m) => g * m * (1.0 / (1.0 - ad.dropout)),
                None => g,
            }
        })
    }

    /// The moment sums of [`Capture::through_adapter`]'s result ([`Capture::bwd_job`]).
    pub fn through_adapter_sums(
        ad: &LoraAdapter,
        g_u: &Tensor,
        mask: Option<&Tensor>,
        max_m: u32,
    ) -> SiteSums {
        one_sum(Self::bwd_job(ad, g_u, mask), max_m)
    }

    /// [`Capture::through_adapter`]'s result as a product never stored where
    /// [`SiteSums::of_product`] applies (CPU, f32 adapter, orders up to 4): `g_u A`, masked
    /// and scaled as dropout's backward pass does.
    pub fn bwd_job(ad: &LoraAdapter, g_u: &Tensor, mask: Option<&Tensor>) -> SumJob {
        SumJob::Product {
            g: g_u.to_kind(ad.a.kind()),
            a: ad.a.shallow_clone(),
            mask: mask.map(|m| (m.shallow_clone(), 1.0 / (1.0 - ad.dropout))),
        }
    }
}

/// The sums of one job.
fn one_sum(job: SumJob, max_m: u32) -> SiteSums {
    SiteSums::of_many(&[job], max_m)
        .pop()
        .expect("one job, one sum")
}

/// A layer's probe while probing: what the trainer sets before a forward pass (the rows
/// to measure, whether to keep the input) and the capture the pass leaves.
#[derive(Debug)]
pub struct ProbeSlot {
    /// Rows of the flattened (tokens, features) activations that are real tokens (not
    /// padding); `None`: all.
    pub rows: Option<Tensor>,
    /// Whether the capture keeps the adapter's input.
    pub keep_input: bool,
    /// The capture of the last forward pass that tracked gradients.
    pub cap: Option<Capture>,
}

impl Default for ProbeSlot {
    fn default() -> Self {
        Self {
            rows: None,
            keep_input: true,
            cap: None,
        }
    }
}

/// `y = x W^T + b [+ gamma B A x]`.
#[derive(Debug)]
pub struct Linear {
    /// Frozen weight (out x in).
    pub weight: Tensor,
    /// Frozen bias (out), if any.
    pub bias: Option<Tensor>,
    /// The adapter, once attached.
    pub adapter: Option<LoraAdapter>,
    /// When set, forward passes that track gradients record a [`Capture`] here.
    pub capture: Option<RefCell<ProbeSlot>>,
}

impl Linear {
    /// A frozen linear map.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
            capture: None,
        }
    }

    /// (out, in).
    pub fn dims(&self) -> (i64, i64) {
        let s = self.weight.size();
        (s[0], s[1])
    }

    /// Applies the layer to `x` (..., in).
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.matmul(&self.weight.tr());
        if let Some(b) = &self.bias {
            y += b;
        }
        let Some(ad) = &self.adapter else { return y };
        match &self.capture {
            Some(slot) => {
                let xin = x.to_kind(ad.a.kind());
                let Some((u, mask)) = ad.down(&xin, train) else {
                    return y;
                };
                // Only passes that build a graph are measured: activation checkpointing's
                // first pass runs without one, and its recomputation is the one measured.
                if !u.requires_grad() {
                    return ad.add_up(&y, &u);
                }
                // A zero of the given shape that is a leaf without memory of its own: one
                // entry, expanded. Its gradient after `backward` is the loss gradient there.
                let zero_leaf = |size: &[i64], like: &Tensor| {
                    Tensor::zeros([1], (like.kind(), like.device()))
                        .expand(size, false)
                        .set_requires_grad(true)
                };
                let u = u.reshape([-1, ad.b.size()[1]]);
                let mut slot = slot.borrow_mut();
                let rows = slot.rows.as_ref().map(Tensor::shallow_clone);
                // The output's moments are taken after the backward pass from the rank-r
                // middle (kept as it is: r entries a token): the output itself goes
                // straight into the base's (one GEMM, as unprobed).
                let middle = u.detach();
                let shape = y.size();
                let out = shape[shape.len() - 1];
                let mut z = ad.add_up_rows(&y.reshape([-1, out]), &u);
                // The output's leaf: at the probed rows only (added in place: its
                // gradient is those rows of the loss gradient), or everywhere.
                let probe = match &rows {
                    Some(idx) => {
                        let p = zero_leaf(&[idx.size()[0], out], &z);
                        let _ = z.index_add_(0, idx, &p);
                        p
                    }
                    None => {
                        let p = zero_leaf(&z.size(), &z);
                        z += &p;
                        p
                    }
                };
                slot.cap = Some(Capture {
                    input: slot.keep_input.then(|| xin.detach()),
                    middle,
                    probe,
                    mask,
                    rows,
                });
                return z.reshape(shape);
            }
            None => {
                if let Some((u, _)) = ad.down(x, train) {
                    y = ad.add_up(&y, &u);
                }
            }
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The probe's three sites against autograd on the whole layer: `fwd` is the adapter's
    /// output, `v` the gradient at the layer's output, and `(gamma B A)^T v` (dropout
    /// included) is the input's gradient minus the frozen weight's part `v W`; at every
    /// row, and at a sample of rows (what the probes read from step 2 on). The layer's
    /// output is the unprobed layer's, bit for bit.
    #[test]
    fn the_probe_sites_match_autograd_with_dropout() {
        tch::manual_seed(3);
        let (inp, out, r) = (6i64, 5i64, 3i64);
        let opts = (Kind::Double, Device::Cpu);
        let w = Tensor::randn([out, inp], opts);
        let a = Tensor::randn([r, inp], opts).set_requires_grad(true);
        let b = Tensor::randn([out, r], opts).set_requires_grad(true);
        for (dropout, rows) in [
            (0.0, None),
            (0.5, None),
            (0.0, Some([1i64, 4, 6])),
            (0.5, Some([0, 5, 7])),
        ] {
            let rows = rows.map(|r| Tensor::from_slice(&r));
            let ad = LoraAdapter::from_tensors(a.shallow_clone(), b.shallow_clone(), 0.7, dropout)
                .expect("adapter");
            let mut lin = Linear::new(w.shallow_clone(), None);
            lin.adapter = Some(ad);
            lin.capture = Some(RefCell::new(ProbeSlot {
                rows: rows.as_ref().map(Tensor::shallow_clone),
                ..ProbeSlot::default()
            }));
            let x = Tensor::randn([2, 4, inp], opts).set_requires_grad(true);
            tch::manual_seed(11);
            let y = lin.forward(&x, true);
            let capture = lin.capture.take();
            tch::manual_seed(11);
            let unprobed = lin.forward(&x, true);
            lin.capture = capture;
            assert!(y.equal(&unprobed), "probing changed the layer's output");
            let target = Tensor::randn([2, 4, out], opts);
            (&y * &target).sum(Kind::Double).backward();
            let cap = lin
                .capture
                .as_ref()
                .expect("slot")
                .borrow_mut()
                .cap
                .take()
                .expect("captured");
            let at = |t: &Tensor| rows_of(t, rows.as_ref());
            let v = cap.probe.grad().reshape([-1, out]);
            let want_v = at(&target);
            assert_eq!(v.size(), want_v.size());
            assert!((&v - &want_v).abs().max().double_value(&[]) < 1e-12);
            let ad = lin.adapter.as_ref().expect("adapter");
            assert_eq!(cap.mask.is_some(), dropout > 0.0);
            let mask = cap.mask.as_ref().map(at);
            let g_u = cap.g_u(ad);
            let bwd = Capture::through_adapter(ad, &g_u, mask.as_ref());
            let want = at(&(x.grad() - target.matmul(&w)));
            let err = (&bwd - &want).abs().max().double_value(&[]);
            assert!(err < 1e-10, "dropout {dropout}: bwd vs autograd: {err}");
            // Its moment sums without the product stored (the f32 path of the probes),
            // against autograd's: the same mask and scale.
            let ad32 = LoraAdapter::from_tensors(
                a.detach().to_kind(Kind::Float),
                b.detach().to_kind(Kind::Float),
                0.7,
                dropout,
            )
            .expect("adapter");
            let got =
                Capture::through_adapter_sums(&ad32, &g_u.to_kind(Kind::Float), mask.as_ref(), 4);
            let want_sums = SiteSums::of(&want, 4);
            for (x, y) in got.abs.iter().zip(&want_sums.abs) {
                assert!(
                    (x / y - 1.0).abs() < 1e-5,
                    "dropout {dropout}: bwd sums {x} vs {y}"
                );
            }
            // fwd: the adapter's own output, the frozen part subtracted.
            let d = at(&(y.detach() - x.detach().matmul(&w.tr()))).reshape([-1]);
            let d: Vec<f64> = Vec::try_from(d).expect("f64");
            let fwd = cap.fwd_sums(ad, 4);
            assert_eq!(fwd.n, d.len() as f64);
            for m in 1..=4i32 {
                let s: f64 = d.iter().map(|v| v.abs().powi(m)).sum();
                assert!((fwd.abs[m as usize - 1] / s - 1.0).abs() < 1e-10, "m {m}");
            }
            if dropout > 0.0 {
                // Some entries were dropped, so the check above is not the no-dropout case.
                let kept = cap
                    .mask
                    .as_ref()
                    .expect("mask")
                    .to_kind(Kind::Double)
                    .mean(Kind::Double);
                assert!(kept.double_value(&[]) < 1.0);
            }
        }
        // No pass without a graph is measured (activation checkpointing's first pass).
        let mut lin = Linear::new(w.shallow_clone(), None);
        lin.adapter = Some(LoraAdapter::from_tensors(a, b, 0.7, 0.0).expect("adapter"));
        lin.capture = Some(RefCell::new(ProbeSlot::default()));
        let _ = tch::no_grad(|| lin.forward(&Tensor::randn([1, 2, inp], opts), true));
        assert!(lin.capture.as_ref().expect("slot").borrow().cap.is_none());
    }
}
