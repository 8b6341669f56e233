//! The linear layer every model uses for its attention and MLP projections: a frozen
//! weight (and bias), plus an optional LoRA adapter. Models call [`Linear::forward`] and
//! never look at the adapter, so adapters (and the probes around them) are attached
//! without touching model code — the `with_tracing` pattern of candle.
use crate::lora::LoraAdapter;
use std::cell::RefCell;
use tch::Tensor;

/// What a probe keeps from the last forward pass of an adapter: its output (detached) and
/// two zero leaves (tch has no hooks and no `retain_grad`): one added to the adapter's
/// output, whose gradient after `backward` is the loss gradient `v` there, and one added
/// to the adapter's input (only the adapter sees it), whose gradient is the gradient into
/// the input through the adapter, `(gamma B A)^T v` — computed by the backward pass that
/// runs anyway, at the cost of one addition.
#[derive(Debug)]
pub struct Capture {
    /// The adapter's input x (detached, in the adapter's dtype).
    pub input: Tensor,
    /// The adapter's output gamma B A x (detached).
    pub output: Tensor,
    /// Zero leaf added to the output; its `.grad()` is dL/d(output) after backward.
    pub probe: Tensor,
    /// Zero leaf added to the adapter's input; its `.grad()` is (gamma B A)^T dL/d(output).
    pub probe_in: Tensor,
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
    /// When set, forward passes record a [`Capture`] here.
    pub capture: Option<RefCell<Option<Capture>>>,
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
            Some(cell) => {
                let probe_in =
                    Tensor::zeros(x.size(), (ad.a.kind(), x.device())).set_requires_grad(true);
                let xin = x.to_kind(ad.a.kind()) + &probe_in;
                if let Some(d) = ad.delta(&xin, train) {
                    let probe = d.zeros_like().set_requires_grad(true);
                    let kind = y.kind();
                    y += (&d + &probe).to_kind(kind);
                    *cell.borrow_mut() = Some(Capture {
                        input: xin.detach(),
                        output: d.detach(),
                        probe,
                        probe_in,
                    });
                }
            }
            None => {
                if let Some(d) = ad.delta(x, train) {
                    y += d.to_kind(y.kind());
                }
            }
        }
        y
    }
}
