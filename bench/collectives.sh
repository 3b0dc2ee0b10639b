#!/usr/bin/env bash
# sinew's collectives against OpenMPI over TCP and MLX's ring backend (what EXO uses over TCP),
# 2 ranks on loopback pinned to separate cores, TCP, busy-polling like OpenMPI, in one run:
#   - all-reduce busbw and 8 B latency, per size, with ratios (sinew/OpenMPI, sinew/MLX);
#   - sendrecv at 16 MiB against the TCP bandwidth `sinew link` measures in the same run (one way,
#     and both ways at once with --bidir: the same traffic as sendrecv), and
#     against OpenMPI's MPI_Sendrecv (the same exchange; on loopback both directions' copies
#     share the two cores — bench/duplex.sh measures sendrecv where the link is the limit);
#   - TRIALS kill trials: 3 ranks, rank 2 killed mid all-reduce; how many trials see every
#     survivor exit with an error within 5 s.
# Installs OpenMPI (Debian) and MLX (PyPI, `mlx[cpu]`) when missing.
#   Like with like: every side runs the same TCP congestion control, CONGESTION (default cubic,
#   what sinew's links pick; `system` keeps the system's for all): the peers, which take the
#   system's, get it by the system default being set for the run (root) and restored after.
# Usage: bench/collectives.sh      (ROUNDS=3 ITERS=10 TRIALS=20 SETTLE=5 CONGESTION=cubic SIZES=...)
set -euo pipefail
ROUNDS=${ROUNDS:-3}
ITERS=${ITERS:-10}
TRIALS=${TRIALS:-20}
SIZES=${SIZES:-8,65536,262144,1048576,4194304,16777216,67108864,268435456}
DURATION=${DURATION:-2}
SETTLE=${SETTLE:-5}
CONGESTION=${CONGESTION:-cubic}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/bench/lib.sh"

system_cc=$(sysctl -n net.ipv4.tcp_congestion_control)
peer_cc=$system_cc
if [ "$CONGESTION" = system ]; then
  sinew_cc=$system_cc
else
  sinew_cc=$CONGESTION
  if [ "$system_cc" != "$CONGESTION" ] && sysctl -qw "net.ipv4.tcp_congestion_control=$CONGESTION" 2>/dev/null; then
    peer_cc=$CONGESTION
    trap 'sysctl -qw "net.ipv4.tcp_congestion_control=$system_cc"; cleanup' EXIT
  fi
fi
LINK_CONGESTION=$CONGESTION
[ "$peer_cc" = "$sinew_cc" ] || echo "warning: peers run $peer_cc, sinew $sinew_cc (not root?)" >&2

need_packages mpicc:libopenmpi-dev mpirun:openmpi-bin taskset:util-linux python3:python3
python3 -c 'import mlx.core' 2>/dev/null || python3 -m pip install -q "mlx[cpu]"
build_sinew
mpicc -O2 -Wall -o "$OUT/mpi_collective" "$ROOT/bench/peers/mpi_collective.c"
results="$OUT/collectives-results.jsonl"
: > "$results"
mpi_flags=(--bind-to none --mca btl tcp,self)
[ "$(id -u)" -eq 0 ] && mpi_flags+=(--allow-run-as-root)
sizes_human=$(echo "$SIZES" | tr ',' '\n' | awk '{print $1 "B"}' | paste -sd, -)

tag() { # tag NAME: JSON lines with size_bytes and busbw/p50 → results under NAME
  python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    rows = json.loads(line)
    for r in rows if isinstance(rows, list) else [rows]:
        print(json.dumps({"what": sys.argv[1] + "_bw_" + str(r["size_bytes"]), "value": r["busbw_gbytes_per_s"]}))
        print(json.dumps({"what": sys.argv[1] + "_p50_" + str(r["size_bytes"]), "value": r["p50_us"]}))
' "$1" >> "$results"
}

for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  # Every measurement runs to completion before its output is parsed ($(...), then `tag`): a
  # parser started beside it (a pipe) would take the pinned ranks' cores while it starts up.
  out=$("$SINEW" bench all-reduce --ranks 2 --transport tcp --wait spin --congestion "$CONGESTION" \
    --sizes "$sizes_human" --iters "$ITERS" --warmup 3 --json --cluster-key-file "$KEYFILE")
  tag sinew <<< "$out"
  out=$(mpirun "${mpi_flags[@]}" -np 1 taskset -c "$SERVER_CPU" "$OUT/mpi_collective" all-reduce "$SIZES" "$ITERS" : \
         -np 1 taskset -c "$CLIENT_CPU" "$OUT/mpi_collective" all-reduce "$SIZES" "$ITERS" 2>/dev/null)
  tag mpi <<< "$out"
  hosts=$(mktemp)
  echo "[[\"127.0.0.1:$((PORT + 1))\"],[\"127.0.0.1:$((PORT + 2))\"]]" > "$hosts"
  MLX_HOSTFILE=$hosts MLX_RANK=1 taskset -c "$CLIENT_CPU" python3 "$ROOT/bench/peers/mlx_collective.py" all-reduce "$SIZES" "$ITERS" >/dev/null 2>&1 &
  out=$(MLX_HOSTFILE=$hosts MLX_RANK=0 taskset -c "$SERVER_CPU" python3 "$ROOT/bench/peers/mlx_collective.py" all-reduce "$SIZES" "$ITERS" 2>/dev/null)
  wait
  tag mlx <<< "$out"
  rm -f "$hosts"
  out=$("$SINEW" bench sendrecv --ranks 2 --transport tcp --wait spin --congestion "$CONGESTION" --sizes 16M \
    --iters "$ITERS" --warmup 3 --json --cluster-key-file "$KEYFILE")
  tag sendrecv <<< "$out"
  out=$(mpirun "${mpi_flags[@]}" -np 1 taskset -c "$SERVER_CPU" "$OUT/mpi_collective" sendrecv 16777216 "$ITERS" : \
         -np 1 taskset -c "$CLIENT_CPU" "$OUT/mpi_collective" sendrecv 16777216 "$ITERS" 2>/dev/null)
  tag mpi_sendrecv <<< "$out"
  out=$(sinew_link spin tcp --sizes 16M --no-latency --duration "$DURATION")
  python3 -c 'import json,sys; print(json.dumps({"what": "link_bw_16777216", "value": json.load(sys.stdin)["bandwidth"][0]["gbytes_per_s"]}))' <<< "$out" >> "$results"
  # both directions at once over one link (sendrecv's traffic), blocking: the client and the
  # server each run a sending and a receiving thread on their one core, and spinning threads
  # would take turns with the scheduler's time slices
  out=$(sinew_link block tcp --sizes 16M --no-latency --duration "$DURATION" --bidir)
  python3 -c 'import json,sys; r=json.load(sys.stdin)["bidirectional"][0]; print(json.dumps({"what": "link_bidir_bw_16777216", "value": (r["forward_gbytes_per_s"] + r["reverse_gbytes_per_s"]) / 2}))' <<< "$out" >> "$results"
  # A 16 MiB stream leaves this VM's loopback 2-4x slower for a few seconds: let it
  # settle, so the next round's first measurement starts from the same quiet machine as the rest.
  sleep "$SETTLE"
done

# Kill trials: rank 2 of 3 is killed mid all-reduce; every survivor must exit non-zero in 5 s.
passed=0
for trial in $(seq "$TRIALS"); do
  root="127.0.0.1:$((PORT + 10))"
  pids=()
  for rank in 0 1 2; do
    "$SINEW" bench all-reduce --rendezvous "$root" --rank "$rank" --world 3 --sizes 4M --iters 1000000 \
      --warmup 0 --timeout 5 --transport tcp --congestion "$CONGESTION" --cluster-key-file "$KEYFILE" >/dev/null 2>&1 &
    pids+=($!)
  done
  sleep 1.5
  kill -9 "${pids[2]}"
  killed=$(date +%s.%N)
  ok=1
  for i in 0 1; do
    if wait "${pids[$i]}"; then ok=0; fi
  done
  took=$(python3 -c "import time; print(time.time() - $killed)")
  wait "${pids[2]}" 2>/dev/null || true
  if [ "$ok" = 1 ] && python3 -c "import sys; sys.exit(0 if $took < 5 else 1)"; then passed=$((passed + 1)); fi
  echo "kill trial $trial: survivors failed=$ok after ${took}s" >&2
done
echo "{\"what\": \"kill_trials_passed\", \"value\": $passed}" >> "$results"

specs=()
IFS=, read -ra sz <<< "$SIZES"
for s in "${sz[@]}"; do
  specs+=("all-reduce $s B busbw vs OpenMPI TCP|sinew_bw_$s|mpi_bw_$s|>= 1.0 (64 KiB+)|higher")
done
for s in "${sz[@]}"; do
  specs+=("all-reduce $s B busbw vs MLX ring|sinew_bw_$s|mlx_bw_$s|>= 2.0 (1 MiB+)|higher")
done
specs+=("all-reduce 8 B p50 µs vs OpenMPI TCP|sinew_p50_8|mpi_p50_8|<= 1.2|lower")
# On loopback the two cores are the link: an exchange copies both directions' bytes on them, so
# about half the one-way rate is all anyone gets (MPI_Sendrecv too); the ≥ 0.9 bar is
# measured where a link is the limit, by bench/duplex.sh.
specs+=("sendrecv 16 MiB vs sinew link TCP GB/s|sendrecv_bw_16777216|link_bw_16777216|(about 0.5 on loopback; bar: duplex.sh)|higher")
specs+=("sendrecv 16 MiB vs sinew link TCP --bidir GB/s, per direction|sendrecv_bw_16777216|link_bidir_bw_16777216|(same traffic)|higher")
specs+=("sendrecv 16 MiB vs OpenMPI MPI_Sendrecv GB/s|sendrecv_bw_16777216|mpi_sendrecv_bw_16777216|(context)|higher")
python3 "$ROOT/bench/ratios.py" "$results" "sinew collectives vs OpenMPI (TCP) and MLX ring, 2 ranks, loopback, pinned, congestion sinew $sinew_cc / peers $peer_cc, $ROUNDS rounds, medians" "${specs[@]}"
echo "kill trials: $passed of $TRIALS saw every survivor fail within 5 s"
