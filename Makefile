# rankstab: two commands take a fresh machine to results.
#   make audit   set-up, then the main job on its embedded default (see README)
#   make test    set-up, then every test
SHELL := /bin/bash
CARGO ?= cargo
STAMP := $(shell date -u +%Y%m%d-%H%M%S)

.PHONY: setup audit test bench clean-runs

setup:
	@bash scripts/setup.sh --python

audit: setup
	$(CARGO) build --release -p rankstab-cli
	./target/release/rankstab theory --out runs/audit-$(STAMP)/theory
	./target/release/rankstab report runs/audit-$(STAMP) --out reports/audit-$(STAMP)
	@echo "audit: theory run in runs/audit-$(STAMP)/theory, report in reports/audit-$(STAMP)/index.html"

test: setup
	RANKSTAB_REQUIRE_PYTHON=1 $(CARGO) test --workspace --all-targets
	RANKSTAB_REQUIRE_PYTHON=1 $(CARGO) test --workspace --doc

bench: setup
	$(CARGO) bench -p rankstab-theory --bench theory_speed

clean-runs:
	rm -rf runs
