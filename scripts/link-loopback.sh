#!/usr/bin/env bash
# The main job as it stands: a sinew link server and client on this machine, authenticated with a
# fresh cluster key, measuring latency and bandwidth of the TCP backend over loopback.
# Extra arguments go to the client, e.g. --json, --wait spin, --sizes 8,1M, --expect 10gbe.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
cargo build --release -q -p sinew
sinew=target/release/sinew
keyfile=$(mktemp)
chmod 600 "$keyfile"
od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$keyfile"
server_out=$(mktemp)
"$sinew" link server --bind 127.0.0.1:0 --cluster-key-file "$keyfile" >"$server_out" 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$keyfile" "$server_out"' EXIT
addr=""
for _ in $(seq 100); do
  addr=$(sed -n 's/^listening on //p' "$server_out")
  [ -n "$addr" ] && break
  sleep 0.05
done
[ -n "$addr" ] || { echo "the link server did not start" >&2; exit 1; }
"$sinew" link client "$addr" --cluster-key-file "$keyfile" "$@"
