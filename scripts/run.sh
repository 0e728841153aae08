#!/usr/bin/env bash
# Set up (idempotent), then fuse the embedded local ensemble on a prompt:
#   scripts/run.sh "Your prompt"  [more specfuse generate options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/specfuse generate "${@:-Give me three tips for staying focused while studying.}"
