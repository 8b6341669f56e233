"""transformers' side of benches/forward.rs: SmolLM2-135M from the same GGUF file, f32 on
CPU, the same batch, context, thread count and repetitions. Prints one JSON object.

Usage: python3 forward_transformers.py GGUF BATCH CONTEXT REPS THREADS
Needs torch, transformers and gguf (see scripts/make_fixtures.py for an install line).
"""
import json
import os
import statistics
import sys
import time

from bench_memory import reset_peak, rss_mb


def main():
    path, batch, context, reps, threads = sys.argv[1], *map(int, sys.argv[2:6])
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g)
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        rss_loaded = rss_mb("VmRSS")
        reset_peak()  # the peak measures the forward passes from here on
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({
        "impl": "transformers", "batch": batch, "context": context, "threads": threads,
        "load_s": load_s, "median_s": med, "tokens_per_s": batch * context / med,
        "rss_loaded_mb": rss_loaded, "peak_rss_forward_mb": rss_mb("VmHWM"),
    }))


if __name__ == "__main__":
    main()
