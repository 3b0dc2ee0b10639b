#!/usr/bin/env bash
# The real `openai` Python client against `sinew serve` (tests/openai/test_openai.py), in a venv
# that holds only `openai` and `pytest` from PyPI. SINEW: the binary (default target/debug/sinew).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-target/openai-venv}
if [ ! -x "$VENV/bin/pytest" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q openai pytest
fi
cargo build -q -p sinew
SINEW=${SINEW:-$PWD/target/debug/sinew} "$VENV/bin/pytest" -q tests/openai/test_openai.py "$@"
