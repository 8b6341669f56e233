#!/usr/bin/env bash
# The paper's shape on one accelerator: Llama-2-7B (random initialisation: no weights ship
# in the package registries) with rank-2048 rsLoRA adapters on every linear attention and
# MLP module, bf16 base weights, f32 adapters, AdamW, batch 32 (micro-batches of 4),
# context 512, activation checkpointing; a few steps, probes on every adapter.
# Prints tokens/s (from metrics.csv) and the GPU's peak memory (nvidia-smi, sampled).
# Status: prepared, not yet run: no accelerator was lent to the session that wrote it.
# Rank-2048 adapters on all 224 modules are 5.1 B f32 parameters (20 GB, 80 GB with
# gradients and AdamW moments) next to 13.5 GB of bf16 base weights: within an H200.
#
#   bash scripts/accelerator-7b.sh [STEPS]      # on a CUDA machine, after scripts/setup.sh
#
# Needs: a release build (cargo build --release -p rankstab-cli), assets/ (setup), and
# libtorch with CUDA (setup installs the CUDA-enabled torch wheel's libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-4}
out=${OUT:-runs/accelerator-7b}
rm -rf "$out"
bin=./target/release/rankstab
[[ -x $bin ]] || cargo build --release -p rankstab-cli
mem_log=$(mktemp)
( while sleep 1; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done ) >"$mem_log" 2>/dev/null &
sampler=$!
trap 'kill $sampler 2>/dev/null || true' EXIT
start=$(date +%s)
"$bin" train --model preset:llama-2-7b --tokenizer assets/llama2-tokenizer \
  --data assets/texts/moby-dick.txt --rank 2048 --scaling rslora --optimizer adamw \
  --steps "$steps" --batch 32 --micro-batch 4 --context 512 --eval-every 0 --heldout-max 8 \
  --activation-checkpointing --device cuda --dtype bf16 --out "$out"
end=$(date +%s)
kill $sampler 2>/dev/null || true
python3 - "$out/metrics.csv" "$mem_log" "$steps" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["metric"] == "seconds"]
secs = [float(r["value"]) for r in rows]
steps = int(sys.argv[3])
tokens_per_step = 32 * 512
per_step = [b - a for a, b in zip([0.0] + secs[:-1], secs)]
steady = per_step[1:] or per_step
mem = [int(x) for x in open(sys.argv[2]).read().split() if x.strip().isdigit()]
print(f"steps {len(secs)}; step times (s): {', '.join(f'{t:.2f}' for t in per_step)}")
print(f"tokens/s after the first step: {tokens_per_step * len(steady) / sum(steady):.0f}")
print(f"peak GPU memory (nvidia-smi, 1 s samples): {max(mem) / 1024:.1f} GiB" if mem else "no nvidia-smi samples")
PY
echo "wall: $((end - start)) s (model build included); run directory: $out"
