"""transformers + peft side of benches/train_step.rs: one LoRA training step of SmolLM2-135M
from the same GGUF file, f32 on CPU, with the same batch, context, rank, targets, learning
rate, thread count and number of timed steps (after one warm-up step). Prints one JSON
object.

Usage: python3 train_step_transformers.py GGUF TEXT BATCH CONTEXT RANK STEPS THREADS
Needs torch, transformers, peft and gguf.

The token windows come from the same text, tokenized with the model's tokenizer (the
shapes match the Rust side; the exact tokens need not). The loss is the mean next-token
cross-entropy over the batch, as rankstab's (a sum over tokens divided by their count).
"""
import json
import os
import statistics
import sys
import time

from bench_memory import reset_peak, rss_mb

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    path, text_path = sys.argv[1], sys.argv[2]
    batch, context, rank, steps, threads = map(int, sys.argv[3:8])
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    d, f = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
    )
    model.train()
    load_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # Windows of context + 1 tokens from the start of the text: (steps + 1) batches.
    need = (steps + 1) * batch * (context + 1)
    with open(text_path, encoding="utf-8") as fh:
        text = fh.read(max(200_000, need * 8))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        sys.exit(f"{text_path}: {len(ids)} tokens, need {need}")
    windows = torch.tensor(ids[:need], dtype=torch.long).view(steps + 1, batch, context + 1)

    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
    )

    def step(w):
        inp, tgt = w[:, :-1], w[:, 1:]
        logits = model(input_ids=inp).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    step(windows[0])  # warm-up
    rss_loaded = rss_mb("VmRSS")
    reset_peak()  # the peak measures the training steps from here on
    times, losses = [], []
    for s in range(1, steps + 1):
        t = time.perf_counter()
        losses.append(step(windows[s]))
        times.append(time.perf_counter() - t)
    peak = rss_mb("VmHWM")
    med = statistics.median(times)
    print(json.dumps({
        "impl": "transformers+peft", "batch": batch, "context": context, "rank": rank,
        "threads": threads, "steps": steps, "load_s": load_s, "median_s": med, "min_s": min(times),
        "step_times_s": times, "tokens_per_s": batch * context / med,
        "rss_loaded_mb": rss_loaded, "peak_rss_train_mb": peak,
        "trainable_params": trainable, "last_loss": losses[-1],
    }))


if __name__ == "__main__":
    main()
