#!/usr/bin/env bash
# Pipeline-parallel serving, side by side in one run, on the Qwen3-30B-A3B-shaped Q4_K synthetic of
# bench/engine.sh (LAYERS layers), each process pinned to its own core, one thread per process:
#  - sinew, 1 node, 1 thread and 2 threads (both cores);
#  - sinew, 2 stages: head on core 0, `sinew worker` on core 1 (loopback links);
#  - llama.cpp RPC: llama-bench / llama-batched-bench on core 0 with `--rpc` to a ggml-rpc-server
#    on core 1, layers split (-ngl LAYERS/2) and all on the server (-ngl 99), and llama-bench
#    alone on core 0.
# Single-stream decode and aggregate decode at 1, 2, 4, 8 concurrent requests (`sinew generate
# --parallel N`: N sequences at once; llama-batched-bench -npl N), interleaved rounds; then the
# idle CPU of the head and the worker over 10 s without requests. sinew runs each request once
# unmeasured first (`--warmup`, as llama-bench warms up): experts are packed when first routed to.
# Results: bench/out/pipeline.jsonl (one line per measurement) and a table on stdout.
# Knobs: LAYERS TOKENS PROMPT ROUNDS NPL SKIP_LLAMA IDLE_S.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/bench/out"
mkdir -p "$OUT"
LAYERS=${LAYERS:-8}
TOKENS=${TOKENS:-64}
PROMPT=${PROMPT:-16}
ROUNDS=${ROUNDS:-3}
NPL=${NPL:-"1 2 4 8"}
IDLE_S=${IDLE_S:-10}
SKIP_LLAMA=${SKIP_LLAMA:-0}

(cd "$ROOT" && cargo build --release -q -p sinew)
SINEW="$ROOT/target/release/sinew"
. "$ROOT/bench/models.sh"
MODEL=$(model_file moe-q4_k)
if [ "$SKIP_LLAMA" != 1 ]; then LLAMA=$("$ROOT/bench/peers/llama-cpp.sh"); fi
PROMPT_IDS=$(seq -s, 10 $((9 + PROMPT)))
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
KEY="$WORK/cluster.key"
python3 -c "import secrets; print(secrets.token_hex(32))" > "$KEY"
chmod 600 "$KEY"
RESULTS="$OUT/pipeline.jsonl"
: > "$RESULTS"
record() { echo "$1" >> "$RESULTS"; }

# the worker stays up across rounds (as in a cluster); it holds the model file
PORT=$((20000 + RANDOM % 20000))
taskset -c 1 "$SINEW" worker --listen "127.0.0.1:$PORT" --model "$MODEL" --threads 1 \
  --cluster-key-file "$KEY" --cache-dir "$WORK/wcache" >"$WORK/worker.out" 2>"$WORK/worker.err" &
WORKER_PID=$!
for _ in $(seq 100); do grep -q "listening" "$WORK/worker.out" 2>/dev/null && break; sleep 0.1; done

sinew_run() { # name cores threads npl extra...
  local name=$1 cores=$2 threads=$3 n=$4; shift 4
  local j
  j=$(taskset -c "$cores" "$SINEW" generate --model "$MODEL" --prompt-ids "$PROMPT_IDS" \
      --max-tokens "$TOKENS" --ignore-eos --json --threads "$threads" --parallel "$n" --warmup "$@" 2>/dev/null) || {
    record "{\"system\":\"$name\",\"npl\":$n,\"round\":$r,\"tps\":null}"; return; }
  local tps
  tps=$(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("aggregate_decode_tokens_per_s", d["decode_tokens_per_s"]))')
  record "{\"system\":\"$name\",\"npl\":$n,\"round\":$r,\"tps\":$tps}"
}

llama_run() { # name npl extra...
  local name=$1 n=$2; shift 2
  local tps
  if [ "$n" = 1 ]; then
    tps=$(taskset -c 0 "$LLAMA/llama-bench" -m "$MODEL" -t 1 -p 0 -n "$TOKENS" -o json "$@" 2>/dev/null \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])') || tps=null
  else
    tps=$(taskset -c 0 "$LLAMA/llama-batched-bench" -m "$MODEL" -t 1 -c $((n * (PROMPT + TOKENS) + 64)) \
      -npp "$PROMPT" -ntg "$TOKENS" -npl "$n" -b 2048 -ub 512 --output-format jsonl "$@" 2>/dev/null \
      | python3 -c 'import json,sys; print([json.loads(l) for l in sys.stdin if l.startswith("{")][-1]["speed_tg"])') || tps=null
  fi
  record "{\"system\":\"$name\",\"npl\":$n,\"round\":$r,\"tps\":$tps}"
}

for r in $(seq "$ROUNDS"); do
  for n in $NPL; do
    sinew_run "sinew 1 node, 1 thread" 0 1 "$n"
    sinew_run "sinew 1 node, 2 threads" 0,1 2 "$n"
    sinew_run "sinew 2 stages" 0 1 "$n" --workers "127.0.0.1:$PORT" --cluster-key-file "$KEY" --cache-dir "$WORK/hcache"
    if [ "$SKIP_LLAMA" != 1 ]; then
      llama_run "llama.cpp 1 process" "$n"
      RPC_PORT=$((PORT + 1))
      taskset -c 1 "$LLAMA/ggml-rpc-server" -p "$RPC_PORT" -t 1 >"$WORK/rpc.log" 2>&1 &
      RPC_PID=$!
      sleep 1
      llama_run "llama.cpp RPC, layers split" "$n" --rpc "127.0.0.1:$RPC_PORT" -ngl $((LAYERS / 2))
      llama_run "llama.cpp RPC, all on server" "$n" --rpc "127.0.0.1:$RPC_PORT" -ngl 99
      kill "$RPC_PID" 2>/dev/null || true
      wait "$RPC_PID" 2>/dev/null || true
    fi
  done
done

# idle CPU: a head holding its stage (a long request finished), the worker, IDLE_S s without requests
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
taskset -c 0 "$SINEW" generate --model "$MODEL" --prompt-ids "$PROMPT_IDS" --max-tokens 1 --json \
  --threads 1 --workers "127.0.0.1:$PORT" --cluster-key-file "$KEY" --cache-dir "$WORK/hcache" \
  --hold-s $((IDLE_S + 3)) >/dev/null 2>"$WORK/idle-head.err" &
HEAD_PID=$!
# idle from when the request is done (loading and measuring the kernels come before)
for _ in $(seq 600); do grep -q "holding the head" "$WORK/idle-head.err" 2>/dev/null && break; sleep 0.1; done
sleep 1
h0=$(cpu_ticks "$HEAD_PID"); w0=$(cpu_ticks "$WORKER_PID")
sleep "$IDLE_S"
h1=$(cpu_ticks "$HEAD_PID"); w1=$(cpu_ticks "$WORKER_PID")
hz=$(getconf CLK_TCK)
record "{\"system\":\"idle head\",\"cpu_percent\":$(python3 -c "print(100*($h1-$h0)/$hz/$IDLE_S)")}"
record "{\"system\":\"idle worker\",\"cpu_percent\":$(python3 -c "print(100*($w1-$w0)/$hz/$IDLE_S)")}"
wait "$HEAD_PID" || true

python3 "$ROOT/bench/pipeline_table.py" "$RESULTS"
