"""Reference numbers for `rankstab eval --stride` (crates/train/tests/fixtures/stride).

Run by hand (not by CI), with the environment of scripts/make_fixtures.py:
    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/fxenv python3 scripts/make_stride_fixtures.py

For the tiny random models of make_fixtures.py (tiny-llama, tiny-gptj) and 60 seeded token
ids, it runs the sliding-window loop of the transformers documentation ("Perplexity of
fixed-length models", docs/source/en/perplexity.md) for several (context, stride) pairs and
records, per pair:
    doc_nll    the documentation's loop as written: each window's mean loss (labels before
               the window's new part set to -100) weighted by its valid labels minus one;
    exact_nll  the same windows with every scored token weighted once (the sum of the
               per-token losses over their number), which rankstab computes;
    tokens     the number of scored tokens.
crates/train/tests/parity.rs (eval_stride_matches_the_transformers_recipe) checks both.
"""
import json
import os

import torch
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "crates", "train", "tests", "fixtures")
PAIRS = [(16, 16), (16, 8), (16, 5), (32, 8), (32, 1), (64, 16)]


def recipe(model, ids, max_length, stride):
    seq_len = ids.size(1)
    nll_sum, n_tokens, exact_sum, exact_n = 0.0, 0, 0.0, 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            out = model(input_ids, labels=target_ids)
            logits = out.logits.double()
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += out.loss.double().item() * num_loss_tokens
        n_tokens += num_loss_tokens
        # Exact: the per-token losses of the shifted labels the model scored.
        shift = target_ids[:, 1:]
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        valid = shift != -100
        tok = -lp.gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        exact_sum += tok[valid].sum().item()
        exact_n += int(valid.sum().item())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, exact_sum / exact_n, exact_n


def main():
    out = {}
    for name in ["tiny-llama", "tiny-gptj"]:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, name)).eval()
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, vocab, (1, 60), generator=g)
        rows = []
        for context, stride in PAIRS:
            doc, exact, n = recipe(model, ids, context, stride)
            rows.append({"context": context, "stride": stride, "doc_nll": doc,
                         "exact_nll": exact, "tokens": n})
        out[name] = {"ids": ids[0].tolist(), "windows": rows}
    d = os.path.join(FIX, "stride")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps(out, indent=1)[:2000])


if __name__ == "__main__":
    main()
