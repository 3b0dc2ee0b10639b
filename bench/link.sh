#!/usr/bin/env bash
# sinew link against its peers on loopback, in one run, server pinned to one core and client to
# another (taskset):
#   latency   sinew (8 B, --wait spin)   vs  a raw busy-poll TCP ping-pong (bench/peers/tcp_pingpong.c)
#   bandwidth sinew (1 MiB, 1 stream)    vs  iperf3 -l 1M
# Rounds alternate between sinew and the peer; the table gives medians and ratios.
# Usage: bench/link.sh            (ROUNDS=5 DURATION=2 SERVER_CPU=0 CLIENT_CPU=1 by default)
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-2}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT=${PORT:-17470}

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/bench/out"
mkdir -p "$out"
cd "$root"

missing=()
for tool in iperf3:iperf3 gcc:gcc taskset:util-linux python3:python3; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo build --release -q -p sinew
sinew="$root/target/release/sinew"
gcc -O2 -Wall -o "$out/tcp_pingpong" bench/peers/tcp_pingpong.c

keyfile=$(mktemp)
chmod 600 "$keyfile"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$keyfile"
results="$out/link-results.jsonl"
: > "$results"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -f "$keyfile"
}
trap cleanup EXIT

# start_server CMD...: starts a pinned server and waits until its port accepts connections.
start_server() {
  taskset -c "$SERVER_CPU" "$@" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server $* did not start" >&2
  exit 1
}
stop_server() {
  kill "${pids[-1]}" 2>/dev/null || true
  wait "${pids[-1]}" 2>/dev/null || true
  unset 'pids[-1]'
  sleep 0.2
}
client() { taskset -c "$CLIENT_CPU" "$@"; }

for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2

  start_server "$out/tcp_pingpong" server "$PORT"
  r=$(client "$out/tcp_pingpong" client 127.0.0.1 "$PORT" 8 "$DURATION")
  echo "{\"what\": \"raw_latency\", \"p50_us\": $(echo "$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["p50_us"])')}" >> "$results"
  stop_server

  start_server "$sinew" link server --bind "127.0.0.1:$PORT" --wait spin --cluster-key-file "$keyfile"
  client "$sinew" link client "127.0.0.1:$PORT" --wait spin --sizes 8 --no-bandwidth --json \
    --duration "$DURATION" --cluster-key-file "$keyfile" |
    python3 -c 'import json,sys; print(json.dumps({"what": "sinew_latency", "p50_us": json.load(sys.stdin)["latency"][0]["p50_us"]}))' >> "$results"
  stop_server

  start_server iperf3 -s -p "$PORT"
  client iperf3 -c 127.0.0.1 -p "$PORT" -l 1M -t "$DURATION" -J |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"what": "iperf3_bw", "gbytes_per_s": d["end"]["sum_received"]["bits_per_second"]/8e9}))' >> "$results"
  stop_server

  for wait in block spin; do
    start_server "$sinew" link server --bind "127.0.0.1:$PORT" --wait "$wait" --cluster-key-file "$keyfile"
    client "$sinew" link client "127.0.0.1:$PORT" --wait "$wait" --sizes 1M --no-latency --streams 1 --json \
      --duration "$DURATION" --cluster-key-file "$keyfile" |
      python3 -c "import json,sys; print(json.dumps({'what': 'sinew_bw_$wait', 'gbytes_per_s': json.load(sys.stdin)['bandwidth'][0]['gbytes_per_s']}))" >> "$results"
    stop_server
  done
done

python3 - "$results" "$ROUNDS" "$DURATION" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(what, key):
    return statistics.median(r[key] for r in rows if r["what"] == what)
raw, lat = med("raw_latency", "p50_us"), med("sinew_latency", "p50_us")
ip, bb, bs = med("iperf3_bw", "gbytes_per_s"), med("sinew_bw_block", "gbytes_per_s"), med("sinew_bw_spin", "gbytes_per_s")
print(f"sinew link vs peers, loopback, pinned cores, {sys.argv[2]} rounds x {sys.argv[3]} s, medians")
print(f"{'measure':44} {'sinew':>10} {'peer':>10} {'ratio':>8}  bar")
print(f"{'8 B one-way p50 µs, spin (vs raw busy-poll)':44} {lat:>10.3f} {raw:>10.3f} {lat/raw:>8.3f}  <= 1.2")
print(f"{'1 MiB 1-stream GB/s, block (vs iperf3 -l 1M)':44} {bb:>10.3f} {ip:>10.3f} {bb/ip:>8.3f}  >= 1.0")
print(f"{'1 MiB 1-stream GB/s, spin (vs iperf3 -l 1M)':44} {bs:>10.3f} {ip:>10.3f} {bs/ip:>8.3f}  >= 1.0")
PY
