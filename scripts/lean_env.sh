#!/usr/bin/env bash
# A clean virtual environment holding only what a user installs for one framework:
#   scripts/lean_env.sh langchain      -> .venv-lean/langchain   (pip install ".[langchain]")
#   scripts/lean_env.sh llama-index    -> .venv-lean/llama-index (pip install ".[llama-index]")
# No torch, no dev tools: the tests run the remote examples in it, so a dependency
# the remote path needs but the extra lacks fails the suite. The project itself is
# reinstalled from this checkout on every run (a few seconds); its dependencies only
# when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:?usage: scripts/lean_env.sh langchain|llama-index}
PYTHON=${PYTHON:-python3}
VENV=.venv-lean/$extra
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp="$VENV/.specfuse-setup"
want=$(cat pyproject.toml scripts/lean_env.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q ".[$extra]"
    echo "$want" > "$stamp"
fi
# pip builds in the tree: a stale build/ would still hold modules deleted since, and
# install them, so the lean environment would not be what a clean checkout gives.
rm -rf build
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall .
