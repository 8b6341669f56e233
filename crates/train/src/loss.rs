//! The next-token loss of a batch: summed over its loss tokens (so that micro-batches add
//! up), with activation checkpointing when memory is short, and the mean held-out loss.
use crate::data::{collate, Dataset, Sequence};
use crate::{probe, CausalLm};
use tch::{Device, Kind, Tensor};

/// Sum of the next-token losses at the masked positions, from logits (B, T, V), targets
/// (B, T) and mask (B, T).
fn nll_sum(logits: &Tensor, tgt: &Tensor, mask: &Tensor) -> Tensor {
    let v = logits.size()[2];
    let nll = logits
        .to_kind(Kind::Float)
        .reshape([-1, v])
        .log_softmax(-1, Kind::Float)
        .gather(1, &tgt.reshape([-1, 1]), false)
        .neg()
        .reshape([-1]);
    (nll * mask.reshape([-1])).sum(Kind::Float)
}

/// Sum of the next-token losses at the masked positions of `ids` (B, T+1) (a sum, so that
/// micro-batches add up).
pub(crate) fn masked_loss_sum(
    model: &CausalLm,
    ids: &Tensor,
    mask: &Tensor,
    train: bool,
) -> Tensor {
    let t = ids.size()[1];
    let logits = model.forward(&ids.narrow(1, 0, t - 1), train);
    nll_sum(&logits, &ids.narrow(1, 1, t - 1), mask)
}

/// Forward and backward of `scale * masked_loss_sum` one decoder block at a time: each
/// block runs on a detached copy of its input (a leaf), and the backward pass goes
/// through the head, then block by block with the surrogate `sum(y * dL/dy)`, which
/// accumulates the same gradients into the adapters (and the probes) as one backward
/// through the whole graph. `after_block(model)` runs after each block's backward pass:
/// the probes read that block's gradients there, while the rest of the graph waits, so
/// only one block's probe gradients are alive at a time. Returns the loss (nothing is
/// back-propagated when it is not finite) and the seconds the forward pass took.
///
/// With `checkpoint_seed`, activation checkpointing: the forward pass keeps only each
/// block's input, and each block is recomputed just before its backward pass, its dropout
/// seeded per block so the recomputation draws the same masks.
pub(crate) fn blockwise_backward(
    model: &mut CausalLm,
    ids: &Tensor,
    mask: &Tensor,
    scale: f64,
    checkpoint_seed: Option<i64>,
    after_block: &mut dyn FnMut(&mut CausalLm),
) -> (f64, f64) {
    let start = std::time::Instant::now();
    let t = ids.size()[1];
    let n = model.num_layers();
    // hs[i]: the input of block i (hs[n]: the head's); outs[i]: block i's output with its
    // graph, from block i's leaf input (without checkpointing).
    let mut hs = Vec::with_capacity(n + 1);
    let mut outs: Vec<(Tensor, Tensor)> = Vec::with_capacity(n);
    hs.push(tch::no_grad(|| model.embed(&ids.narrow(1, 0, t - 1))));
    for i in 0..n {
        let y = match checkpoint_seed {
            Some(seed) => {
                tch::manual_seed(seed.wrapping_add(i as i64));
                tch::no_grad(|| model.block(i, &hs[i], true))
            }
            None => {
                let x = if i == 0 {
                    hs[0].shallow_clone()
                } else {
                    hs[i].detach().set_requires_grad(true)
                };
                let y = model.block(i, &x, true);
                outs.push((x, y.shallow_clone()));
                y.detach()
            }
        };
        hs.push(y);
    }
    let top = hs[n].detach().set_requires_grad(true);
    let loss = nll_sum(&model.head(&top, true), &ids.narrow(1, 1, t - 1), mask) * scale;
    let l = loss.double_value(&[]);
    let forward_s = start.elapsed().as_secs_f64();
    if !l.is_finite() {
        return (l, forward_s);
    }
    loss.backward();
    let mut g = top.grad();
    drop(loss);
    for i in (0..n).rev() {
        let (x, y) = match checkpoint_seed {
            Some(seed) => {
                let x = hs[i].detach().set_requires_grad(i > 0);
                tch::manual_seed(seed.wrapping_add(i as i64));
                let y = model.block(i, &x, true);
                (x, y)
            }
            None => outs.pop().expect("one output per block"),
        };
        (y * &g).sum(Kind::Float).backward();
        if i > 0 {
            g = x.grad();
        }
        drop(x);
        hs.truncate(i + 1);
        after_block(model);
    }
    (l, forward_s)
}

/// Tokens per held-out forward pass: evaluation keeps no activations for a backward
/// pass, so it runs wider passes than training's micro-batches (fewer, larger matrix
/// products; the gain over micro-batch passes is not yet measured); its memory is in
/// [`crate::memory::train_bytes`].
pub(crate) const EVAL_PASS_TOKENS: usize = 2048;

/// Sequences per held-out forward pass: at least the training micro-batch, else as many
/// windows of `context` tokens as fit in [`EVAL_PASS_TOKENS`].
pub(crate) fn eval_batch(micro: usize, context: usize) -> usize {
    micro.max(EVAL_PASS_TOKENS / context.max(1)).max(1)
}

/// Mean held-out loss per loss token, over the first `max` held-out sequences (0: all),
/// in passes of [`eval_batch`] sequences.
pub(crate) fn heldout_loss(
    model: &mut CausalLm,
    data: &Dataset,
    max: usize,
    micro: usize,
    device: Device,
) -> f64 {
    probe::capture(model, false);
    let (mut s, mut n) = (0.0, 0.0);
    let held = if max == 0 {
        &data.heldout[..]
    } else {
        &data.heldout[..max.min(data.heldout.len())]
    };
    tch::no_grad(|| {
        let context = held.first().map_or(1, |s| s.ids.len().saturating_sub(1));
        for chunk in held.chunks(eval_batch(micro, context)) {
            let refs: Vec<&Sequence> = chunk.iter().collect();
            let (ids, mask) = collate(&refs, data.pad_id, device);
            s += masked_loss_sum(model, &ids, &mask, false).double_value(&[]);
            n += mask.sum(Kind::Float).double_value(&[]);
        }
    });
    s / n.max(1.0)
}
