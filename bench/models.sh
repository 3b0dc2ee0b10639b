# The synthetic models the cluster, serving and batching benchmarks share: sourced, not run.
# Expects SINEW, OUT and LAYERS. `model_file NAME` prints the path of `dense-Q` (a Llama shape of
# about 1B parameters: hidden 2048, 16 layers), `wide-Q` (a Llama-7B-wide shape, hidden 4096, 6
# layers, a 32000-token head: about 1.2B parameters) or `moe-Q` (the Qwen3-30B-A3B shape of
# bench/engine.sh, LAYERS layers), Q a quantization (q4_k, q8_0, …), writing it the first time.
MOE=(--arch qwen3_moe --hidden 2048 --experts 128 --top-k 8 --moe-intermediate 768
     --heads 32 --kv-heads 4 --head-dim 128 --intermediate 6144 --vocab 384 --seed 1 --layers "$LAYERS")
DENSE=(--arch llama --hidden 2048 --intermediate 8192 --layers 16 --heads 32 --kv-heads 8
       --head-dim 64 --vocab 384 --seed 1)
WIDE=(--arch llama --hidden 4096 --intermediate 11008 --layers 6 --heads 32 --kv-heads 32
      --head-dim 128 --vocab 32000 --seed 1)
model_file() { # NAME -> path, made once
  local kind=${1%%-*} q=${1#*-} f
  if [ "$kind" = dense ]; then
    f="$OUT/llama-1b-shape-$q.gguf"
    [ -f "$f" ] || "$SINEW" gguf synth "${DENSE[@]}" --quant "$q" --out "$f" >&2
  elif [ "$kind" = wide ]; then
    f="$OUT/llama-7b-wide-6l-$q.gguf"
    [ -f "$f" ] || "$SINEW" gguf synth "${WIDE[@]}" --quant "$q" --out "$f" >&2
  else
    f="$OUT/qwen3-30b-a3b-shape-${LAYERS}l-$q.gguf"
    [ -f "$f" ] || "$SINEW" gguf synth "${MOE[@]}" --quant "$q" --out "$f" >&2
  fi
  echo "$f"
}
