#!/usr/bin/env bash
# sendrecv on a link whose two directions are independent, as on a real NIC: two network
# namespaces joined by a veth pair, each end's egress shaped by tc htb to RATE, one rank per
# namespace pinned to its own core, TCP, busy-polling. In one run, per round:
#   - the one-way bandwidth `sinew link` measures over the shaped link (16 MiB messages);
#   - `sinew bench sendrecv` at 16 MiB between the two namespaces (each rank sends 16 MiB while
#     receiving 16 MiB: algbw = busbw = size / time);
# and prints sendrecv ÷ link. On loopback the same exchange is bound by the two cores copying
# both directions' bytes (bench/collectives.sh measures that); here the link is the bottleneck,
# which is what the bar "sendrecv ≥ 0.9× link bandwidth" is about.
# Needs root (ip netns, tc). Usage: bench/duplex.sh   (RATE=2gbit ROUNDS=3 ITERS=10 DURATION=3)
set -euo pipefail
RATE=${RATE:-2gbit}
ROUNDS=${ROUNDS:-3}
ITERS=${ITERS:-10}
DURATION=${DURATION:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/bench/lib.sh"

need_packages ip:iproute2 tc:iproute2 taskset:util-linux python3:python3
build_sinew
NS_A=sinew-duplex-a
NS_B=sinew-duplex-b
ADDR_A=10.247.0.1
ADDR_B=10.247.0.2
results="$OUT/duplex-results.jsonl"
: > "$results"

teardown() {
  ip netns del "$NS_A" 2>/dev/null || true
  ip netns del "$NS_B" 2>/dev/null || true
}
trap 'cleanup; teardown' EXIT
teardown
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add sdx-a netns "$NS_A" type veth peer name sdx-b netns "$NS_B"
for ns in "$NS_A:sdx-a:$ADDR_A" "$NS_B:sdx-b:$ADDR_B"; do
  IFS=: read -r n dev addr <<< "$ns"
  ip -n "$n" link set lo up
  ip -n "$n" addr add "$addr/24" dev "$dev"
  ip -n "$n" link set "$dev" up
  # shape this end's egress: one htb class at RATE carries everything
  tc -n "$n" qdisc add dev "$dev" root handle 1: htb default 10
  tc -n "$n" class add dev "$dev" parent 1: classid 1:10 htb rate "$RATE" ceil "$RATE" quantum 65536
done
in_a() { ip netns exec "$NS_A" taskset -c "$SERVER_CPU" "$@"; }
in_b() { ip netns exec "$NS_B" taskset -c "$CLIENT_CPU" "$@"; }

for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  in_a "$SINEW" link server --bind "$ADDR_A:$PORT" --wait spin --transport tcp \
    --cluster-key-file "$KEYFILE" >/dev/null 2>&1 &
  PIDS+=($!)
  sleep 0.5
  # parsed once it has finished: a parser started beside it would take a pinned core
  out=$(in_b "$SINEW" link client "$ADDR_A:$PORT" --wait spin --transport tcp --streams 1 --sizes 16M \
    --no-latency --duration "$DURATION" --json --cluster-key-file "$KEYFILE")
  python3 -c 'import json,sys; print(json.dumps({"what": "link_bw", "value": json.load(sys.stdin)["bandwidth"][0]["gbytes_per_s"]}))' <<< "$out" >> "$results"
  stop_server
  in_a "$SINEW" bench sendrecv --rendezvous "$ADDR_A:$((PORT + 1))" --rank 0 --world 2 --transport tcp \
    --wait spin --sizes 16M --iters "$ITERS" --warmup 3 --json --cluster-key-file "$KEYFILE" \
    > "$OUT/duplex-rank0.json" &
  r0=$!
  in_b "$SINEW" bench sendrecv --rendezvous "$ADDR_A:$((PORT + 1))" --rank 1 --world 2 --transport tcp \
    --wait spin --sizes 16M --iters "$ITERS" --warmup 3 --json --cluster-key-file "$KEYFILE" >/dev/null
  wait "$r0"
  python3 -c '
import json, sys
rows = json.load(open(sys.argv[1]))
assert all(r["ok"] for r in rows), "sendrecv result check failed"
print(json.dumps({"what": "sendrecv_bw", "value": rows[0]["busbw_gbytes_per_s"]}))' "$OUT/duplex-rank0.json" >> "$results"
done
python3 "$ROOT/bench/ratios.py" "$results" \
  "sendrecv over a shaped full-duplex link (veth between namespaces, htb $RATE each way), 2 ranks, pinned, TCP, $ROUNDS rounds, medians (GB/s)" \
  "sendrecv 16 MiB vs sinew link TCP 16 MiB|sendrecv_bw|link_bw|>= 0.9|higher"
