#!/usr/bin/env bash
# Engine decode speed, side by side with its references, in one run:
#  1. a synthetic Qwen3-30B-A3B-shaped model (hidden 2048, 128 experts, top-8, moe_intermediate 768,
#     32 query / 4 kv heads, head_dim 128; LAYERS layers) in Q4_K, Q8_0 and Q4_K_M (llama.cpp's mix,
#     Q6_K for the more-bits layers' attn_v / ffn_down: what users download), with 1 and 2 threads,
#     against the memory-bandwidth roofline: active weight bytes per token ÷ the read bandwidth this
#     script measures on this machine with the same thread count (median of one measurement per
#     round, taken between the decodes: this VM's bandwidth moves from run to run, and a single
#     best-of-5 once read 54 GB/s where the rounds around it read 33–35); beside it the same binary with
#     SINEW_KERNELS=candle (candle's quantized matmul instead of sinew's packed kernels);
#  2. sinew in f32 against candle-transformers' qwen3_moe in f32 on the same model directory
#     (F32_LAYERS layers: the 8-layer f32 model is 19 GiB), same threads, interleaved rounds;
#     beside it sinew with SINEW_KERNELS=candle (candle's f32 matmul instead of the packed one);
#  3. (PARTS=bf16) the same 2-layer model as a bf16 checkpoint: sinew (bf16 kept) against
#     candle-transformers' qwen3_moe, which loads it as f32.
# Results: bench/out/engine.json and a table on stdout.
# Knobs: LAYERS F32_LAYERS TOKENS PROMPT ROUNDS THREADS PARTS QUANTS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/bench/out"
mkdir -p "$OUT"
LAYERS=${LAYERS:-8}
F32_LAYERS=${F32_LAYERS:-2}
TOKENS=${TOKENS:-32}
PROMPT=${PROMPT:-16}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-"1 2"}
PARTS=${PARTS:-"quant f32 bf16"}   # which comparisons to run
QUANTS=${QUANTS:-"q4_k q8_0 q4_k_m"}

(cd "$ROOT" && cargo build --release -q -p sinew)
(cd "$ROOT/bench/engine-peer" && cargo build --release -q)
SINEW="$ROOT/target/release/sinew"
PEER="$ROOT/bench/engine-peer/target/release/engine-peer"
SHAPE=(--arch qwen3_moe --hidden 2048 --experts 128 --top-k 8 --moe-intermediate 768
       --heads 32 --kv-heads 4 --head-dim 128 --intermediate 6144 --vocab 384 --seed 1)
PROMPT_IDS=$(seq -s, 10 $((9 + PROMPT)))

for q in $QUANTS; do
  f="$OUT/qwen3-30b-a3b-shape-${LAYERS}l-$q.gguf"
  [ -f "$f" ] || "$SINEW" gguf synth "${SHAPE[@]}" --layers "$LAYERS" --quant "$q" --out "$f"
done
HF="$OUT/qwen3-30b-a3b-shape-${F32_LAYERS}l-f32"
[ -f "$HF/model.safetensors" ] || "$SINEW" gguf synth "${SHAPE[@]}" --layers "$F32_LAYERS" --hf --out "$HF"
BF="$OUT/qwen3-30b-a3b-shape-${F32_LAYERS}l-bf16"
if [[ " $PARTS " == *" bf16 "* ]] && [ ! -f "$BF/model.safetensors" ]; then
  "$SINEW" gguf synth "${SHAPE[@]}" --layers "$F32_LAYERS" --hf --hf-dtype bf16 --out "$BF"
fi

median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
field() { python3 -c 'import sys,json; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"; }
sinew_decode() { # MODEL THREADS [KERNELS]
  SINEW_KERNELS=${3:-sinew} RAYON_NUM_THREADS=$2 "$SINEW" generate --model "$1" --prompt-ids "$PROMPT_IDS" --max-tokens "$TOKENS" \
    --ignore-eos --threads "$2" --json | field decode_tokens_per_s
}
peer_decode() { # DIR THREADS
  RAYON_NUM_THREADS=$2 CANDLE_NUM_THREADS=$2 "$PEER" candle-qwen3-moe "$1" "$2" "$PROMPT" "$TOKENS" | field decode_tokens_per_s
}

results="[]"
add() { results=$(python3 -c 'import sys,json; r=json.loads(sys.argv[1]); r.append(json.loads(sys.argv[2])); print(json.dumps(r))' "$results" "$1"); }
for t in $THREADS; do
  bws=()
  for q in $QUANTS; do
    [[ " $PARTS " == *" quant "* ]] || continue
    f="$OUT/qwen3-30b-a3b-shape-${LAYERS}l-$q.gguf"
    active=$("$SINEW" gguf info "$f" | field active_weight_bytes_per_token)
    runs=(); cruns=()
    for _ in $(seq "$ROUNDS"); do
      # the bandwidth is measured between the decodes, every round: the median is the roofline
      bws+=("$("$PEER" membw "$t" | field gb_per_s)")
      runs+=("$(sinew_decode "$f" "$t")"); cruns+=("$(sinew_decode "$f" "$t" candle)")
    done
    bw=$(median "${bws[@]}")
    tps=$(median "${runs[@]}"); ctps=$(median "${cruns[@]}")
    roof=$(python3 -c "print($bw * 1e9 / $active)")
    add "{\"model\": \"$q\", \"threads\": $t, \"decode_tokens_per_s\": $tps, \"candle_matmul_decode_tokens_per_s\": $ctps, \"membw_gb_per_s\": $bw, \"active_bytes\": $active, \"roofline_tokens_per_s\": $roof, \"of_roofline\": $(python3 -c "print($tps / $roof)")}"
    printf '%-6s threads %s  decode %7.2f tok/s  roofline %7.2f tok/s (%.2f GB/s ÷ %.1f MB/token)  %.0f%% of roofline; candle matmul %7.2f tok/s (%.0f%%)\n' \
      "$q" "$t" "$tps" "$roof" "$bw" "$(python3 -c "print($active / 1e6)")" "$(python3 -c "print(100 * $tps / $roof)")" \
      "$ctps" "$(python3 -c "print(100 * $ctps / $roof)")"
  done
  [[ " $PARTS " == *" f32 "* ]] || continue
  s=(); k=(); c=()
  for _ in $(seq "$ROUNDS"); do
    s+=("$(sinew_decode "$HF" "$t")"); k+=("$(sinew_decode "$HF" "$t" candle)"); c+=("$(peer_decode "$HF" "$t")")
  done
  st=$(median "${s[@]}"); kt=$(median "${k[@]}"); ct=$(median "${c[@]}")
  add "{\"model\": \"f32-${F32_LAYERS}l\", \"threads\": $t, \"sinew_decode_tokens_per_s\": $st, \"candle_matmul_decode_tokens_per_s\": $kt, \"candle_transformers_decode_tokens_per_s\": $ct, \"ratio\": $(python3 -c "print($st / $ct)")}"
  printf 'f32   threads %s  sinew %7.2f tok/s (candle matmul %7.2f)  candle-transformers qwen3_moe %7.2f tok/s  ratio %.2fx\n' "$t" "$st" "$kt" "$ct" "$(python3 -c "print($st / $ct)")"
done
for t in $THREADS; do
  [[ " $PARTS " == *" bf16 "* ]] || continue
  s=(); c=()
  for _ in $(seq "$ROUNDS"); do
    s+=("$(sinew_decode "$BF" "$t")"); c+=("$(peer_decode "$BF" "$t")")
  done
  st=$(median "${s[@]}"); ct=$(median "${c[@]}")
  add "{\"model\": \"bf16-${F32_LAYERS}l\", \"threads\": $t, \"sinew_decode_tokens_per_s\": $st, \"candle_transformers_decode_tokens_per_s\": $ct, \"ratio\": $(python3 -c "print($st / $ct)")}"
  printf 'bf16  threads %s  sinew %7.2f tok/s  candle-transformers qwen3_moe (loads it as f32) %7.2f tok/s  ratio %.2fx\n' "$t" "$st" "$ct" "$(python3 -c "print($st / $ct)")"
done
echo "$results" > "$OUT/engine.json"
echo "wrote $OUT/engine.json"
