#!/usr/bin/env bash
# The HTTP endpoint against llama-server, same GGUF, threads and machine, in one run: time to
# first token, aggregate output tok/s and p50/p99 inter-token latency at CLIENTS concurrent
# streaming clients (bench/loadgen.py, stdlib Python), interleaved rounds; then sinew's RSS after
# 200 and after 2000 short requests.
# Results: bench/out/serve.jsonl and a table on stdout.
# Knobs: MODEL (default: the 30B-A3B-shaped Q4_K of bench/engine.sh) THREADS CLIENTS ROUNDS TOKENS
#        SKIP_LLAMA RSS_REQUESTS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/bench/out"
mkdir -p "$OUT"
THREADS=${THREADS:-2}
CLIENTS=${CLIENTS:-"1 4 16"}
ROUNDS=${ROUNDS:-2}
TOKENS=${TOKENS:-64}
SKIP_LLAMA=${SKIP_LLAMA:-0}
RSS_REQUESTS=${RSS_REQUESTS:-2000}
(cd "$ROOT" && cargo build --release -q -p sinew)
SINEW="$ROOT/target/release/sinew"
LAYERS=${LAYERS:-8}
. "$ROOT/bench/models.sh"
MODEL=${MODEL:-$(model_file moe-q4_k)}
if [ "$SKIP_LLAMA" != 1 ]; then LLAMA=$("$ROOT/bench/peers/llama-cpp.sh"); fi
PROMPT_IDS=$(seq -s, 10 25)
RESULTS="$OUT/serve.jsonl"
: > "$RESULTS"
PORT=$((30000 + RANDOM % 20000))
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
wait_http() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.2; done; return 1; }
maxc=$(echo $CLIENTS | tr ' ' '\n' | sort -n | tail -1)
load_all() { # SYSTEM ROUND: every CLIENTS count against the server on PORT, one line each
  for c in $CLIENTS; do
    j=$(python3 "$ROOT/bench/loadgen.py" "http://127.0.0.1:$PORT/v1" m --clients "$c" \
        --requests $((c * 2)) --max-tokens "$TOKENS" --prompt-ids "$PROMPT_IDS")
    echo "{\"system\":\"$1\",\"round\":$2,\"result\":$j}" >> "$RESULTS"
  done
}

for r in $(seq "$ROUNDS"); do
  "$SINEW" serve --model "$MODEL" --model-id m --http "127.0.0.1:$PORT" --threads "$THREADS" \
    --max-seqs "$maxc" --ctx 512 >/dev/null 2>&1 &
  pid=$!
  wait_http "$PORT"
  load_all "sinew serve" "$r"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if [ "$SKIP_LLAMA" != 1 ]; then
    "$LLAMA/llama-server" -m "$MODEL" --alias m --host 127.0.0.1 --port "$PORT" -t "$THREADS" \
      -np "$maxc" -c $((maxc * 512)) >/dev/null 2>&1 &
    pid=$!
    wait_http "$PORT"
    load_all llama-server "$r"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  fi
done

# memory: RSS after 200 and after RSS_REQUESTS short requests
"$SINEW" serve --model "$MODEL" --model-id m --http "127.0.0.1:$PORT" --threads "$THREADS" \
  --max-seqs 16 --ctx 512 >/dev/null 2>&1 &
pid=$!
wait_http "$PORT"
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
python3 "$ROOT/bench/loadgen.py" "http://127.0.0.1:$PORT/v1" m --clients 8 --requests 200 --max-tokens 4 --prompt-ids "$PROMPT_IDS" >/dev/null
r200=$(rss)
python3 "$ROOT/bench/loadgen.py" "http://127.0.0.1:$PORT/v1" m --clients 8 --requests $((RSS_REQUESTS - 200)) --max-tokens 4 --prompt-ids "$PROMPT_IDS" >/dev/null
rN=$(rss)
echo "{\"system\":\"sinew rss\",\"rss_kb_200\":$r200,\"rss_kb_$RSS_REQUESTS\":$rN}" >> "$RESULTS"
kill "$pid"; wait "$pid" 2>/dev/null || true

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1])]
cell = defaultdict(list)
for r in rows:
    if "result" in r:
        cell[(r["system"], r["result"]["clients"])].append(r["result"])
clients = sorted({c for _, c in cell})
med = lambda xs: statistics.median(xs) if xs else float("nan")
print("| system | clients | output tok/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms | errors |")
print("|---|--:|--:|--:|--:|--:|--:|")
for (s, c), rs in sorted(cell.items()):
    f = lambda k, m=1: med([x[k] * m for x in rs if x[k] is not None])
    print(f"| {s} | {c} | {f('output_tokens_per_s'):.1f} | {f('ttft_p50_s', 1000):.1f} | {f('itl_p50_s', 1000):.1f} | {f('itl_p99_s', 1000):.1f} | {sum(x['errors'] for x in rs)} |")
for c in clients:
    a, b = cell.get(("sinew serve", c)), cell.get(("llama-server", c))
    if a and b:
        print(f"clients {c}: tok/s ratio {med([x['output_tokens_per_s'] for x in a]) / med([x['output_tokens_per_s'] for x in b]):.2f}, "
              f"ITL p99 ratio {med([x['itl_p99_s'] for x in a]) / med([x['itl_p99_s'] for x in b]):.2f}")
for r in rows:
    if r["system"] == "sinew rss":
        vals = [v for k, v in r.items() if k.startswith("rss_kb")]
        print(f"RSS: {vals[0]} kB after 200 requests, {vals[1]} kB after the rest ({vals[1] / vals[0]:.3f}×)")
PY
