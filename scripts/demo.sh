#!/usr/bin/env bash
# The main job: `sinew demo` — a local cluster of three processes (the head and two workers) on a
# built-in synthetic MoE model, one streamed chat request through the OpenAI-compatible API, then
# serving until Ctrl-C. Extra arguments go to `sinew demo` (e.g. --nodes 2, --http ADDR).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
cargo build --release -q -p sinew
exec target/release/sinew demo "$@"
