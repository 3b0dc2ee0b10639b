#!/usr/bin/env bash
# sinew link's TCP backend against its peers on loopback, in one run, server pinned to one core and
# client to another (taskset):
#   latency   sinew (8 B, --wait spin)   vs  a raw busy-poll TCP ping-pong (bench/peers/tcp_pingpong.c)
#   bandwidth sinew (1 MiB, 1 stream)    vs  iperf3 -l 1M
# Rounds alternate between sinew and the peer; the table gives medians and ratios. Both senders
# run the same TCP congestion control, CONGESTION (default cubic, what sinew's links pick;
# iperf3 gets it with -C).
# Usage: bench/link.sh            (ROUNDS=5 DURATION=2 CONGESTION=cubic SERVER_CPU=0 CLIENT_CPU=1)
set -euo pipefail
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-2}
CONGESTION=${CONGESTION:-cubic}
LINK_CONGESTION=$CONGESTION
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/bench/lib.sh"

need_packages iperf3:iperf3 gcc:gcc taskset:util-linux python3:python3
build_sinew
gcc -O2 -Wall -o "$OUT/tcp_pingpong" "$ROOT/bench/peers/tcp_pingpong.c"
results="$OUT/link-results.jsonl"
: > "$results"

for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  start_server "$OUT/tcp_pingpong" server "$PORT"
  # each run finishes before its output is parsed: a parser started beside it (a pipe) would
  # take the pinned cores while it starts up
  out=$(client "$OUT/tcp_pingpong" client 127.0.0.1 "$PORT" 8 "$DURATION")
  python3 -c 'import json,sys; print(json.dumps({"what": "raw_latency", "value": json.load(sys.stdin)["p50_us"]}))' <<< "$out" >> "$results"
  stop_server

  out=$(sinew_link spin tcp --sizes 8 --no-bandwidth --duration "$DURATION")
  python3 -c 'import json,sys; print(json.dumps({"what": "sinew_latency", "value": json.load(sys.stdin)["latency"][0]["p50_us"]}))' <<< "$out" >> "$results"

  start_server iperf3 -s -p "$PORT"
  out=$(client iperf3 -c 127.0.0.1 -p "$PORT" -l 1M -t "$DURATION" -C "$CONGESTION" -J)
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"what": "iperf3_bw", "value": d["end"]["sum_received"]["bits_per_second"]/8e9}))' <<< "$out" >> "$results"
  stop_server

  for wait in block spin; do
    out=$(sinew_link "$wait" tcp --sizes 1M --no-latency --duration "$DURATION")
    python3 -c "import json,sys; print(json.dumps({'what': 'sinew_bw_$wait', 'value': json.load(sys.stdin)['bandwidth'][0]['gbytes_per_s']}))" <<< "$out" >> "$results"
  done
done

python3 "$ROOT/bench/ratios.py" "$results" "sinew link (TCP) vs peers, loopback, pinned cores, congestion $CONGESTION, $ROUNDS rounds x $DURATION s, medians" \
  "8 B one-way p50 µs, spin (vs raw busy-poll)|sinew_latency|raw_latency|<= 1.2|lower" \
  "1 MiB 1-stream GB/s, block (vs iperf3 -l 1M)|sinew_bw_block|iperf3_bw|>= 1.0|higher" \
  "1 MiB 1-stream GB/s, spin (vs iperf3 -l 1M)|sinew_bw_spin|iperf3_bw|>= 1.0|higher"
