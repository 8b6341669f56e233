# rankstab: two commands take a fresh machine to results.
#   make audit   set-up, then the main job on its embedded default (see README)
#   make test    set-up (with the notebooks' Python and Chromium), then every test
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

# The Python packages (tables, notebooks) and Chromium (the report's rendering test) are
# required here, so that those tests cannot skip silently in CI.
test:
	@bash scripts/setup.sh --python --browser
	RANKSTAB_REQUIRE_PYTHON=1 RANKSTAB_REQUIRE_CHROMIUM=1 $(CARGO) test --workspace --all-targets
	RANKSTAB_REQUIRE_PYTHON=1 RANKSTAB_REQUIRE_CHROMIUM=1 $(CARGO) test --workspace --doc

bench: setup
	$(CARGO) bench -p rankstab-theory --bench theory_speed

clean-runs:
	rm -rf runs
