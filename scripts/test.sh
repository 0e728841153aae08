#!/usr/bin/env bash
# Set up (idempotent), then run lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The real-vLLM tier (tests/test_real_vllm.py) needs vLLM in its own environment;
# SPECFUSE_REAL_VLLM=0 leaves it out (those tests then report themselves skipped).
if [ "${SPECFUSE_REAL_VLLM:-1}" != "0" ]; then
    scripts/setup_vllm.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
