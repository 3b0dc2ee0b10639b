#!/usr/bin/env bash
# `sinew plan`'s predicted single-stream decode against a real run, on 1, 2 and 3 stages, for the
# Qwen3-30B-A3B-shaped MoE synthetic of bench/engine.sh (Q4_K, LAYERS layers) and the dense
# Llama-shaped ~1B synthetic (Q4_K). Workers hold the model file and run on loopback; every process
# computes with one thread, the head pinned to core 0 and the workers to core 1 (one stage computes
# at a time in a single stream, so the workers may share a core). For each model and stage count:
# the median of three `sinew plan --workers … --json --position P` (the prediction, from the nodes'
# measured kernel rates, the model's products and attention timed on the planning node, and the
# measured links, at P = the measured run's mean context position), then ROUNDS runs of
# `sinew generate --workers … --json --warmup` (the measurement, after one unmeasured run: experts
# are packed when first routed to, and a decode step that packs them is not the steady state the
# prediction describes).
# Results: bench/out/plan.jsonl and a table (prediction, measured median [min–max], error).
# Knobs: LAYERS TOKENS ROUNDS, MODELS (names as bench/models.sh; default "moe-q4_k dense-q4_k").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/bench/out"
mkdir -p "$OUT"
LAYERS=${LAYERS:-8}
TOKENS=${TOKENS:-64}
ROUNDS=${ROUNDS:-3}
(cd "$ROOT" && cargo build --release -q -p sinew)
SINEW="$ROOT/target/release/sinew"
. "$ROOT/bench/models.sh"
MODEL_FILES=()
for m in ${MODELS:-moe-q4_k dense-q4_k}; do MODEL_FILES+=("$(model_file "$m")"); done
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
KEY="$WORK/cluster.key"
python3 -c "import secrets; print(secrets.token_hex(32))" > "$KEY"
chmod 600 "$KEY"
RESULTS="$OUT/plan.jsonl"
: > "$RESULTS"
PROMPT_IDS=$(seq -s, 10 25)

for MODEL in "${MODEL_FILES[@]}"; do
  NAME=$(basename "$MODEL" .gguf)
  ADDRS=()
  for i in 1 2; do
    PORT=$((20000 + RANDOM % 20000))
    taskset -c 1 "$SINEW" worker --listen "127.0.0.1:$PORT" --model "$MODEL" --threads 1 --no-announce \
      --cluster-key-file "$KEY" --cache-dir "$WORK/w$i" >"$WORK/w$i.out" 2>"$WORK/w$i.err" &
    # one at a time: a worker measures its kernel rates at start, and two measuring at once on
    # one machine would share its memory bandwidth
    for _ in $(seq 300); do grep -q "kernel rates measured" "$WORK/w$i.err" 2>/dev/null && break; sleep 0.1; done
    ADDRS+=("127.0.0.1:$PORT")
  done
  for STAGES in 1 2 3; do
    case $STAGES in
      1) W=() ;;
      2) W=(--workers "${ADDRS[0]}") ;;
      3) W=(--workers "${ADDRS[0]},${ADDRS[1]}") ;;
    esac
    # at the measured run's mean position (the prompt's 16, then half the tokens decoded); the
    # prediction is itself a measurement (of the kernels, the model's products and the links):
    # the median of three
    PREDS=()
    for _ in 1 2 3; do
      PREDS+=("$(taskset -c 0 "$SINEW" plan --model "$MODEL" --threads 1 --ctx 512 --max-seqs 4 \
        --position $((16 + TOKENS / 2)) --cluster-key-file "$KEY" --json "${W[@]}" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["prediction"]["single_tokens_per_s"])')")
    done
    PRED=$(printf '%s\n' "${PREDS[@]}" | sort -g | sed -n 2p)
    for r in $(seq "$ROUNDS"); do
      EXTRA=()
      [ "$STAGES" -gt 1 ] && EXTRA=("${W[@]}" --cache-dir "$WORK/head" --cluster-key-file "$KEY")
      TPS=$(taskset -c 0 "$SINEW" generate --model "$MODEL" --prompt-ids "$PROMPT_IDS" --ctx 512 \
        --max-tokens "$TOKENS" --ignore-eos --json --threads 1 --warmup "${EXTRA[@]}" 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tokens_per_s"])')
      echo "{\"model\":\"$NAME\",\"stages\":$STAGES,\"round\":$r,\"predicted\":$PRED,\"measured\":$TPS}" >> "$RESULTS"
    done
  done
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r["model"], r["stages"]) for r in rows})
print(f"{'model':<32} {'stages':>6} {'predicted':>10} {'measured (median [min-max])':>30} {'error':>8}")
for m, s in keys:
    rs = [r for r in rows if r["model"] == m and r["stages"] == s]
    meas = [r["measured"] for r in rs]
    med = statistics.median(meas)
    p = rs[0]["predicted"]
    print(f"{m:<32} {s:>6} {p:>10.1f} {med:>12.1f} [{min(meas):.1f}-{max(meas):.1f}] {100*(p/med-1):>+7.1f}%")
PY
