//! One entry point for every supported architecture: reads `config.json`'s `model_type` and
//! builds the matching model.
use crate::gptj::Gptj;
use crate::linear::Linear;
pub use crate::llama::LayerCache;
use crate::llama::Llama;
use crate::TrainError;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A causal language model of a supported architecture.
#[derive(Debug)]
pub enum CausalLm {
    /// Llama 2 family.
    Llama(Llama),
    /// GPT-J.
    Gptj(Gptj),
}

impl CausalLm {
    /// Loads a Hugging Face model directory, choosing the architecture by `model_type`.
    ///
    /// # Errors
    /// Missing or malformed config.json, an unknown model_type, and every loading error of
    /// the architecture (named tensors and shapes, truncated files, pickle checkpoints).
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self, TrainError> {
        if !dir.is_dir() {
            return Err(TrainError::Invalid(format!(
                "{}: not a model directory",
                dir.display()
            )));
        }
        let cfg = crate::weights::ConfigJson::read(&dir.join("config.json"))?;
        match cfg.str("model_type")? {
            Some("llama") => Ok(Self::Llama(Llama::from_dir(dir, kind, device)?)),
            Some("gptj") => Ok(Self::Gptj(Gptj::from_dir(dir, kind, device)?)),
            Some(other) => {
                Err(cfg.bad("model_type", format!("{other:?}"), "supported: llama, gptj"))
            }
            None => Err(TrainError::Config {
                path: cfg.path.clone(),
                message: "no \"model_type\" (supported: llama, gptj)".into(),
            }),
        }
    }

    /// Logits (B, T, vocab) for token ids (B, T).
    pub fn forward(&self, ids: &Tensor, train: bool) -> Tensor {
        match self {
            Self::Llama(m) => m.forward(ids, train),
            Self::Gptj(m) => m.forward(ids, train),
        }
    }

    /// Logits (B, T, vocab) of the T new token ids (B, T) that follow the positions in
    /// `cache` (one [`LayerCache`] per block; empty at the start), which then holds their
    /// keys and values too: generation without recomputing the prefix. Inference only.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut [LayerCache]) -> Tensor {
        assert_eq!(cache.len(), self.num_layers(), "one cache per block");
        let mut x = self.embed(ids);
        for (i, c) in cache.iter_mut().enumerate() {
            x = match self {
                Self::Llama(m) => m.block_cached(i, &x, false, Some(c)),
                Self::Gptj(m) => m.block_cached(i, &x, false, Some(c)),
            };
        }
        self.head(&x, false)
    }

    /// An empty cache for [`Self::forward_cached`].
    pub fn new_cache(&self) -> Vec<LayerCache> {
        (0..self.num_layers())
            .map(|_| LayerCache::default())
            .collect()
    }

    /// Number of decoder blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Llama(m) => m.layers.len(),
            Self::Gptj(m) => m.h.len(),
        }
    }

    /// Token embeddings (B, T, d).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        match self {
            Self::Llama(m) => m.embed(ids),
            Self::Gptj(m) => m.embed(ids),
        }
    }

    /// Decoder block `i` on hidden states (B, T, d).
    pub fn block(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        match self {
            Self::Llama(m) => m.block(i, x, train),
            Self::Gptj(m) => m.block(i, x, train),
        }
    }

    /// Final norm and head: logits (B, T, vocab).
    pub fn head(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Self::Llama(m) => m.head(x),
            Self::Gptj(m) => m.head(x, train),
        }
    }

    /// Width of the residual stream: Llama's `hidden_size`, GPT-J's `n_embd`. (The width
    /// of each adapted linear is its weight's shape, [`Linear::dims`].)
    pub fn hidden_size(&self) -> i64 {
        match self {
            Self::Llama(m) => m.config.hidden_size,
            Self::Gptj(m) => m.config.n_embd,
        }
    }

    /// The device the weights are on.
    pub fn device(&self) -> Device {
        match self {
            Self::Llama(m) => m.embed_tokens.device(),
            Self::Gptj(m) => m.wte.device(),
        }
    }

    /// Vocabulary size of the embedding.
    pub fn vocab_size(&self) -> i64 {
        match self {
            Self::Llama(m) => m.config.vocab_size,
            Self::Gptj(m) => m.config.vocab_size,
        }
    }

    /// Every adaptable linear layer with its Hugging Face module path.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        match self {
            Self::Llama(m) => m.linears_mut(),
            Self::Gptj(m) => m.linears_mut(),
        }
    }

    /// Mean negative log-likelihood of next-token prediction over `ids` (B, T), in nats,
    /// and the number of predicted tokens.
    pub fn nll(&self, ids: &Tensor) -> (f64, i64) {
        let t = ids.size()[1];
        let logits = self
            .forward(ids, false)
            .narrow(1, 0, t - 1)
            .to_kind(Kind::Float);
        let targets = ids.narrow(1, 1, t - 1);
        let v = logits.size()[2];
        let loss = logits
            .reshape([-1, v])
            .cross_entropy_for_logits(&targets.reshape([-1]));
        (loss.double_value(&[]), targets.numel() as i64)
    }
}
