//! GPT-J as transformers' `GPTJForCausalLM`: one LayerNorm feeding attention and MLP in
//! parallel, rotary embeddings on the first `rotary_dim` features of each head in the
//! interleaved (rotate-every-two) layout, gelu_new MLP, no bias on q/k/v/out, biases on
//! fc_in, fc_out and lm_head. Weight names are exactly the Hugging Face ones.
use crate::linear::Linear;
use crate::llama::{causal_attention, embedding};
use crate::weights::Weights;
use crate::TrainError;
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The adaptable linear modules of every block, in [`Gptj::linears_mut`]'s order (PEFT's
/// `target_modules` for every attention and MLP linear).
pub const MODULES: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"];

/// `config.json` of a GPT-J checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct GptjHfConfig {
    /// "gptj".
    pub model_type: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// Rotary features per head (None: the whole head).
    pub rotary_dim: Option<usize>,
    /// MLP width (None: 4 n_embd).
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: Option<f64>,
    /// Activation (only gelu_new).
    pub activation_function: Option<String>,
    /// Longest context.
    pub n_positions: Option<usize>,
}

/// Runtime configuration of GPT-J.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width.
    pub n_embd: i64,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: i64,
    /// Head size.
    pub head_dim: i64,
    /// Rotary features per head.
    pub rotary_dim: i64,
    /// MLP width.
    pub n_inner: i64,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Longest context.
    pub n_positions: usize,
}

impl GptjHfConfig {
    /// Checks the values and fills defaults.
    ///
    /// # Errors
    /// Unsupported activation, heads that do not divide the width, odd rotary_dim.
    pub fn into_config(self, path: &Path) -> Result<Config, TrainError> {
        let bad = |message: String| TrainError::Config {
            path: path.to_path_buf(),
            message,
        };
        if let Some(t) = &self.model_type {
            if t != "gptj" {
                return Err(bad(format!("model_type {t:?} is not a GPT-J model")));
            }
        }
        if let Some(a) = &self.activation_function {
            if a != "gelu_new" {
                return Err(bad(format!(
                    "activation_function {a:?} is not supported (only gelu_new)"
                )));
            }
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(bad(format!(
                "n_embd {} is not divisible by n_head {}",
                self.n_embd, self.n_head
            )));
        }
        let head_dim = self.n_embd / self.n_head;
        let rotary_dim = self.rotary_dim.unwrap_or(head_dim);
        if !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(bad(format!(
                "rotary_dim {rotary_dim} must be even and at most the head size {head_dim}"
            )));
        }
        Ok(Config {
            vocab_size: self.vocab_size as i64,
            n_embd: self.n_embd as i64,
            n_layer: self.n_layer,
            n_head: self.n_head as i64,
            head_dim: head_dim as i64,
            rotary_dim: rotary_dim as i64,
            n_inner: self.n_inner.unwrap_or(4 * self.n_embd) as i64,
            eps: self.layer_norm_epsilon.unwrap_or(1e-5),
            n_positions: self.n_positions.unwrap_or(2048),
        })
    }
}

impl Config {
    /// GPT-J-6B's shape (random initialisation, for accelerator runs).
    pub fn gptj_6b() -> Self {
        Self {
            vocab_size: 50400,
            n_embd: 4096,
            n_layer: 28,
            n_head: 16,
            head_dim: 256,
            rotary_dim: 64,
            n_inner: 16384,
            eps: 1e-5,
            n_positions: 2048,
        }
    }
}

/// LayerNorm with gain and bias.
#[derive(Debug)]
pub struct LayerNorm {
    /// Gain.
    pub weight: Tensor,
    /// Bias.
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let n = *x.size().last().expect("non-scalar");
        x.layer_norm([n], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// Attention projections.
#[derive(Debug)]
pub struct Attention {
    /// Query.
    pub q_proj: Linear,
    /// Key.
    pub k_proj: Linear,
    /// Value.
    pub v_proj: Linear,
    /// Output.
    pub out_proj: Linear,
}

/// MLP.
#[derive(Debug)]
pub struct Mlp {
    /// In.
    pub fc_in: Linear,
    /// Out.
    pub fc_out: Linear,
}

/// One block: attention and MLP in parallel on one LayerNorm.
#[derive(Debug)]
pub struct Block {
    /// The shared LayerNorm.
    pub ln_1: LayerNorm,
    /// Attention.
    pub attn: Attention,
    /// MLP.
    pub mlp: Mlp,
}

/// `GPTJForCausalLM`.
#[derive(Debug)]
pub struct Gptj {
    /// Runtime configuration.
    pub config: Config,
    /// Token embeddings.
    pub wte: Tensor,
    /// Blocks.
    pub h: Vec<Block>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm,
    /// Output projection with bias.
    pub lm_head: Linear,
}

/// sin and cos (T x rotary_dim) with each frequency repeated twice (interleaved layout).
fn rope_interleaved(rotary_dim: i64, t: i64, device: Device) -> (Tensor, Tensor) {
    let inv =
        Tensor::arange_start_step(0, rotary_dim, 2, (Kind::Float, device)) / rotary_dim as f64;
    let inv_freq = (inv * -(10_000f64.ln())).exp();
    let pos = Tensor::arange(t, (Kind::Float, device));
    let freqs = pos.outer(&inv_freq); // T x rot/2
    let dup = |z: Tensor| {
        z.unsqueeze(-1)
            .expand([t, rotary_dim / 2, 2], false)
            .reshape([t, rotary_dim])
    };
    (dup(freqs.sin()), dup(freqs.cos()))
}

/// (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...).
fn rotate_every_two(x: &Tensor) -> Tensor {
    let mut shape = x.size();
    let last = *shape.last().expect("non-scalar");
    let pairs = x.reshape([-1, last / 2, 2]);
    let x1 = pairs.select(-1, 0);
    let x2 = pairs.select(-1, 1);
    let out = Tensor::stack(&[&x2.neg(), &x1], -1);
    *shape.last_mut().expect("non-scalar") = last;
    out.reshape(shape.as_slice())
}

fn apply_rotary(x: &Tensor, rot: i64, sin: &Tensor, cos: &Tensor) -> Tensor {
    // x: (B, H, T, hd); rotate the first `rot` features.
    let hd = *x.size().last().expect("non-scalar");
    let xr = x.narrow(-1, 0, rot);
    let rotated = &xr * cos + rotate_every_two(&xr) * sin;
    if rot == hd {
        rotated
    } else {
        Tensor::cat(&[&rotated, &x.narrow(-1, rot, hd - rot)], -1)
    }
}

fn layer_norm(w: &mut Weights, name: &str, d: i64, eps: f64) -> Result<LayerNorm, TrainError> {
    Ok(LayerNorm {
        weight: w.take(&format!("{name}.weight"), &[d])?,
        bias: w.take(&format!("{name}.bias"), &[d])?,
        eps,
    })
}

impl Gptj {
    /// Builds the model from checkpoint tensors.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (named, with both shapes).
    pub fn load(config: Config, w: &mut Weights) -> Result<Self, TrainError> {
        let (d, f) = (config.n_embd, config.n_inner);
        let wte = w.take("transformer.wte.weight", &[config.vocab_size, d])?;
        let mut h = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("transformer.h.{i}");
            h.push(Block {
                ln_1: layer_norm(w, &format!("{p}.ln_1"), d, config.eps)?,
                attn: Attention {
                    q_proj: w.linear(&format!("{p}.attn.q_proj"), d, d, false)?,
                    k_proj: w.linear(&format!("{p}.attn.k_proj"), d, d, false)?,
                    v_proj: w.linear(&format!("{p}.attn.v_proj"), d, d, false)?,
                    out_proj: w.linear(&format!("{p}.attn.out_proj"), d, d, false)?,
                },
                mlp: Mlp {
                    fc_in: w.linear(&format!("{p}.mlp.fc_in"), f, d, true)?,
                    fc_out: w.linear(&format!("{p}.mlp.fc_out"), d, f, true)?,
                },
            });
        }
        let ln_f = layer_norm(w, "transformer.ln_f", d, config.eps)?;
        let lm_head = w.linear("lm_head", config.vocab_size, d, true)?;
        Ok(Self {
            config,
            wte,
            h,
            ln_f,
            lm_head,
        })
    }

    /// Loads a Hugging Face model directory (config.json + safetensors).
    ///
    /// # Errors
    /// See [`Weights::from_dir`], [`GptjHfConfig::into_config`], [`Gptj::load`].
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self, TrainError> {
        crate::weights::load_dir(dir, kind, device, GptjHfConfig::into_config, Self::load)
    }

    /// Every adaptable linear layer with its Hugging Face module path.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.h.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            out.push((format!("{p}.attn.q_proj"), &mut b.attn.q_proj));
            out.push((format!("{p}.attn.k_proj"), &mut b.attn.k_proj));
            out.push((format!("{p}.attn.v_proj"), &mut b.attn.v_proj));
            out.push((format!("{p}.attn.out_proj"), &mut b.attn.out_proj));
            out.push((format!("{p}.mlp.fc_in"), &mut b.mlp.fc_in));
            out.push((format!("{p}.mlp.fc_out"), &mut b.mlp.fc_out));
        }
        out
    }

    /// Logits (B, T, vocab) for token ids (B, T).
    pub fn forward(&self, ids: &Tensor, train: bool) -> Tensor {
        let mut x = self.embed(ids);
        for i in 0..self.h.len() {
            x = self.block(i, &x, train);
        }
        self.head(&x, train)
    }

    /// Token embeddings (B, T, d) of ids (B, T).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        embedding(&self.wte, ids)
    }

    /// Block `i` (attention and MLP in parallel on one LayerNorm) on hidden states (B, T, d).
    pub fn block(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        let blk = &self.h[i];
        let (b, t) = (x.size()[0], x.size()[1]);
        let c = &self.config;
        let (h, hd) = (c.n_head, c.head_dim);
        let (sin, cos) = rope_interleaved(c.rotary_dim, t, x.device());
        let (sin, cos) = (sin.to_kind(x.kind()), cos.to_kind(x.kind()));
        let y = blk.ln_1.forward(x);
        let split = |z: Tensor| z.view([b, t, h, hd]).transpose(1, 2);
        let q = apply_rotary(
            &split(blk.attn.q_proj.forward(&y, train)),
            c.rotary_dim,
            &sin,
            &cos,
        );
        let k = apply_rotary(
            &split(blk.attn.k_proj.forward(&y, train)),
            c.rotary_dim,
            &sin,
            &cos,
        );
        let v = split(blk.attn.v_proj.forward(&y, train));
        let a = causal_attention(&q, &k, &v)
            .transpose(1, 2)
            .reshape([b, t, h * hd]);
        let a = blk.attn.out_proj.forward(&a, train);
        let m = blk
            .mlp
            .fc_out
            .forward(&blk.mlp.fc_in.forward(&y, train).gelu("tanh"), train);
        x + a + m
    }

    /// Final LayerNorm and language-model head: logits (B, T, vocab).
    pub fn head(&self, x: &Tensor, train: bool) -> Tensor {
        self.lm_head.forward(&self.ln_f.forward(x), train)
    }
}
