#!/usr/bin/env bash
# The status page (`GET /` on the head) in a real headless browser: a 3-node cluster on loopback
# (`sinew serve` and two `sinew worker`s), Chromium from Debian renders the page after its script
# has polled /v1/cluster, and check.py asserts what the rendered DOM and the screenshot show.
# SINEW: the binary (default target/debug/sinew). The screenshot is left in target/status-page.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
cargo build -q -p sinew
SINEW=${SINEW:-$PWD/target/debug/sinew} OUT=${OUT:-$PWD/target} python3 tests/status-page/check.py
