# rankstab: two commands take a fresh machine to results.
#   make audit   set-up, then the main job on its embedded default (see README)
#   make test    set-up (with the notebooks' Python and Chromium), then every test
SHELL := /bin/bash
CARGO ?= cargo
STAMP := $(shell date -u +%Y%m%d-%H%M%S)

.PHONY: setup audit test bench gpu-check clean-runs

setup:
	@bash scripts/setup.sh --python

# RUN names the run: `make audit RUN=audit-20261129-120000` continues a killed audit
# (finished work is skipped, an interrupted sweep cell resumes from its checkpoint).
RUN ?= audit-$(STAMP)

audit: setup
	$(CARGO) build --release -p rankstab-cli
	./target/release/rankstab theory --out runs/$(RUN)/theory
	./target/release/rankstab sweep --out runs/$(RUN)/sweep
	./target/release/rankstab transfer --out runs/$(RUN)/transfer
	./target/release/rankstab report runs/$(RUN) --out reports/$(RUN)
	@echo "audit: runs in runs/$(RUN) (theory/, sweep/cells/*, transfer/); report: reports/$(RUN)/index.html"

# The Python packages (tables, notebooks), Chromium (the report's rendering test) and Slurm
# (tests/slurm.rs, a real one-node cluster; needs root) are required here, so that those
# tests cannot skip silently in CI.
test:
	@bash scripts/setup.sh --python --browser --slurm
	RANKSTAB_REQUIRE_PYTHON=1 RANKSTAB_REQUIRE_CHROMIUM=1 RANKSTAB_REQUIRE_SLURM=1 $(CARGO) test --workspace --all-targets
	RANKSTAB_REQUIRE_PYTHON=1 RANKSTAB_REQUIRE_CHROMIUM=1 $(CARGO) test --workspace --doc

# The training-step benchmark's reference side (torch, transformers, peft, gguf) comes from
# .deps/bench (setup.sh --bench) unless RANKSTAB_PYTHONPATH names another place. Ends with
# one table of every figure against its target (scripts/bench_summary.py).
bench:
	@bash scripts/setup.sh --python --bench
	$(CARGO) bench -p rankstab-theory --bench theory_speed
	RANKSTAB_PYTHONPATH="$${RANKSTAB_PYTHONPATH:-$(CURDIR)/.deps/bench}" $(CARGO) bench -p rankstab-train --bench train_step
	@python3 scripts/bench_summary.py

# On a CUDA machine (LIBTORCH or LD_LIBRARY_PATH naming a CUDA libtorch): CPU vs CUDA
# parity of logits and probe rows, and a timed Llama-2-7B-shape step (see
# crates/train/examples/gpu_check.rs). Exits 1 on a parity failure, 2 without a GPU.
gpu-check: setup
	$(CARGO) run --release -p rankstab-train --example gpu_check

clean-runs:
	rm -rf runs
