# Shared helpers of the bench scripts: sourced, not run.
# Expects ROOT; sets SINEW, OUT and KEYFILE; cleans up servers and the key on exit.

SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT=${PORT:-17470}
OUT="$ROOT/bench/out"
mkdir -p "$OUT"

# need_packages CMD:PACKAGE...: installs the Debian packages of the missing commands.
need_packages() {
  local missing=()
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

build_sinew() {
  (cd "$ROOT" && cargo build --release -q -p sinew)
  SINEW="$ROOT/target/release/sinew"
  KEYFILE=$(mktemp)
  chmod 600 "$KEYFILE"
  od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$KEYFILE"
}

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${KEYFILE:-}" ] && rm -f "$KEYFILE"
}
trap cleanup EXIT

# start_server CMD...: starts a server pinned to SERVER_CPU and waits until PORT accepts.
start_server() {
  taskset -c "$SERVER_CPU" "$@" >/dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server $* did not start" >&2
  exit 1
}

stop_server() {
  kill "${PIDS[-1]}" 2>/dev/null || true
  wait "${PIDS[-1]}" 2>/dev/null || true
  unset 'PIDS[-1]'
  sleep 0.2
}

client() { taskset -c "$CLIENT_CPU" "$@"; }

# sinew_link WAIT TRANSPORT CLIENT-ARGS...: one sinew link measurement against a fresh server;
# prints the client's JSON. Both ends take LINK_CONGESTION when it is set.
sinew_link() {
  local wait=$1 transport=$2
  shift 2
  local cc=()
  [ -n "${LINK_CONGESTION:-}" ] && cc=(--congestion "$LINK_CONGESTION")
  start_server "$SINEW" link server --bind "127.0.0.1:$PORT" --wait "$wait" --cluster-key-file "$KEYFILE" "${cc[@]}"
  client "$SINEW" link client "127.0.0.1:$PORT" --wait "$wait" --transport "$transport" --streams 1 --json \
    --cluster-key-file "$KEYFILE" "${cc[@]}" "$@"
  stop_server
}
