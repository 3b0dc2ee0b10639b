#!/usr/bin/env bash
# Batched decode: aggregate decode tok/s of N sequences at once (sinew generate --parallel N)
# against llama.cpp on the same GGUF files and threads, in one run, interleaved per round:
#   - llama-batched-bench (aggregate tok/s of N parallel sequences, its S_TG),
#   - llama-bench (single stream: pp and tg; sinew runs the request once unmeasured first, as
#     llama-bench warms up: experts are packed when first routed to),
#   - load to first token: sinew generate --max-tokens 1 (wall clock) against llama-completion -n 1
#     (wall clock), with a warm page cache and, where this user may drop the page cache (root), a
#     cold one.
# Models: the Qwen3-30B-A3B-shaped synthetic of bench/engine.sh (LAYERS layers; Q4_K, Q8_0) and
# a dense Llama-shaped synthetic of about 1B parameters (hidden 2048, 16 layers, Q4_K).
# Results: bench/out/batch.jsonl (one object per measurement) and a table on stdout.
# Knobs: LAYERS SEQS THREADS ROUNDS TOKENS PROMPT MODELS SKIP_LLAMA.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/bench/out"
mkdir -p "$OUT"
LAYERS=${LAYERS:-8}
SEQS=${SEQS:-"1 2 4 8 16"}
THREADS=${THREADS:-"1 2"}
ROUNDS=${ROUNDS:-3}
TOKENS=${TOKENS:-32}
PROMPT=${PROMPT:-16}
MODELS=${MODELS:-"dense-q4_k moe-q4_k moe-q8_0"}
SKIP_LLAMA=${SKIP_LLAMA:-0}

(cd "$ROOT" && cargo build --release -q -p sinew)
SINEW="$ROOT/target/release/sinew"
LLAMA=""
if [ "$SKIP_LLAMA" != 1 ]; then
  LLAMA=$(bash "$ROOT/bench/peers/llama-cpp.sh" | tail -n 1)
fi
. "$ROOT/bench/models.sh"
PROMPT_IDS=$(seq -s, 10 $((9 + PROMPT)))
RESULTS="$OUT/batch.jsonl"
: > "$RESULTS"
emit() { echo "$1" >> "$RESULTS"; }

sinew_run() { # FILE THREADS N -> json
  RAYON_NUM_THREADS=$2 "$SINEW" generate --model "$1" --prompt-ids "$PROMPT_IDS" --max-tokens "$TOKENS" \
    --ignore-eos --threads "$2" --parallel "$3" --json --warmup
}
llama_batched() { # FILE THREADS N -> aggregate decode tok/s (S_TG)
  "$LLAMA/llama-batched-bench" -m "$1" -t "$2" -c $(( (PROMPT + TOKENS) * $3 + 64 )) -b 2048 -ub 512 \
    -npp "$PROMPT" -ntg "$TOKENS" -npl "$3" --output-format jsonl 2>/dev/null |
    python3 -c 'import sys,json
d = None
for l in sys.stdin:
    l=l.strip()
    if l.startswith("{"): d=json.loads(l)
print(d["speed_tg"] if d else "null")  # null: it failed, recorded as such'
}
llama_bench() { # FILE THREADS -> "pp tg"
  "$LLAMA/llama-bench" -m "$1" -t "$2" -p "$PROMPT" -n "$TOKENS" -r 1 -o json 2>/dev/null |
    python3 -c 'import sys,json
r=json.load(sys.stdin)
pp=[x["avg_ts"] for x in r if x["n_prompt"]>0][0]; tg=[x["avg_ts"] for x in r if x["n_gen"]>0][0]
print(pp, tg)'
}
wall() { # COMMAND... -> seconds it ran
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null 2>&1 </dev/null
  t1=$(date +%s.%N)
  python3 -c "print($t1 - $t0)"
}
llama_load() { # FILE THREADS -> seconds to the first token
  wall "$LLAMA/llama-completion" -m "$1" -t "$2" -n 1 -p "hello" -no-cnv --no-warmup
}
sinew_load() { # FILE THREADS -> seconds to the first token
  wall env RAYON_NUM_THREADS="$2" "$SINEW" generate --model "$1" --prompt-ids "$PROMPT_IDS" --max-tokens 1 --threads "$2" --json
}
cold() { # drops the page cache (all of it); fails where this user may not
  sync && echo 1 > /proc/sys/vm/drop_caches 2>/dev/null
}
field() { python3 -c 'import sys,json; d=json.loads(sys.stdin.read()); print(d.get(sys.argv[1], d.get(sys.argv[2] if len(sys.argv)>2 else sys.argv[1])))' "$@"; }

for name in $MODELS; do
  f=$(model_file "$name")
  cat "$f" > /dev/null # warm page cache
  for t in $THREADS; do
    for r in $(seq "$ROUNDS"); do
      for n in $SEQS; do
        j=$(sinew_run "$f" "$t" "$n")
        s=$(echo "$j" | field aggregate_decode_tokens_per_s decode_tokens_per_s)
        p=$(echo "$j" | field prefill_tokens_per_s)
        l="null"
        [ -n "$LLAMA" ] && l=$(llama_batched "$f" "$t" "$n")
        emit "{\"model\":\"$name\",\"threads\":$t,\"round\":$r,\"seqs\":$n,\"sinew_aggregate\":$s,\"sinew_prefill\":$p,\"llama_batched_aggregate\":$l}"
      done
      if [ -n "$LLAMA" ]; then
        read -r pp tg < <(llama_bench "$f" "$t")
        s1=$(sinew_run "$f" "$t" 1)
        sload=$(sinew_load "$f" "$t")
        lload=$(llama_load "$f" "$t")
        scold=null; lcold=null
        if cold "$f"; then
          scold=$(sinew_load "$f" "$t")
          cold "$f" && lcold=$(llama_load "$f" "$t")
          cat "$f" > /dev/null
        fi
        emit "{\"model\":\"$name\",\"threads\":$t,\"round\":$r,\"single\":true,\"sinew_tg\":$(echo "$s1" | field decode_tokens_per_s),\"sinew_pp\":$(echo "$s1" | field prefill_tokens_per_s),\"llama_tg\":$tg,\"llama_pp\":$pp,\"sinew_load_s\":$sload,\"llama_load_s\":$lload,\"sinew_cold_load_s\":$scold,\"llama_cold_load_s\":$lcold}"
      fi
    done
  done
done
python3 "$ROOT/bench/batch_table.py" "$RESULTS"
