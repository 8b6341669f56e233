//! The linear layer every model uses for its attention and MLP projections: a frozen
//! weight (and bias), plus an optional LoRA adapter. Models call [`Linear::forward`] and
//! never look at the adapter, so adapters (and the probes around them) are attached
//! without touching model code — the `with_tracing` pattern of candle.
use crate::lora::LoraAdapter;
use tch::Tensor;

/// `y = x W^T + b [+ gamma B A x]`.
#[derive(Debug)]
pub struct Linear {
    /// Frozen weight (out x in).
    pub weight: Tensor,
    /// Frozen bias (out), if any.
    pub bias: Option<Tensor>,
    /// The adapter, once attached.
    pub adapter: Option<LoraAdapter>,
}

impl Linear {
    /// A frozen linear map.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, adapter: None }
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
        if let Some(d) = self.adapter.as_ref().and_then(|a| a.delta(x, train)) {
            y += d;
        }
        y
    }
}
