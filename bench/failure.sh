#!/usr/bin/env bash
# Worker killed mid-stream, TRIALS times: a head (`sinew serve`) with one worker serves a long
# streamed request; the worker gets SIGKILL after the first tokens; the trial passes when the stream
# ends with an error event within 2 s of the kill and the head then answers a new request (over
# itself, re-planned). A new worker is started for the next trial on the same address.
# Results: one line per trial and a summary. Knobs: TRIALS MODEL.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TRIALS=${TRIALS:-20}
(cd "$ROOT" && cargo build --release -q -p sinew)
SINEW="$ROOT/target/release/sinew"
WORK=$(mktemp -d)
W=""
trap 'kill $(jobs -p) $W 2>/dev/null || true; rm -rf "$WORK"' EXIT
MODEL=${MODEL:-"$WORK/m.gguf"}
[ -f "$MODEL" ] || "$SINEW" gguf synth --layers 8 --hidden 512 --experts 16 --top-k 4 --quant q4_k --out "$MODEL" >/dev/null
python3 -c "import secrets; print(secrets.token_hex(32))" > "$WORK/key"; chmod 600 "$WORK/key"
WPORT=$((20000 + RANDOM % 20000)); HPORT=$((WPORT + 1))
start_worker() {
  "$SINEW" worker --listen "127.0.0.1:$WPORT" --threads 1 --cluster-key-file "$WORK/key" \
    --cache-dir "$WORK/w" >"$WORK/w.out" 2>/dev/null &
  echo $!
}
W=$(start_worker)
sleep 1
"$SINEW" serve --model "$MODEL" --model-id m --http "127.0.0.1:$HPORT" --threads 1 \
  --workers "127.0.0.1:$WPORT" --cluster-key-file "$WORK/key" --cache-dir "$WORK/h" >/dev/null 2>&1 &
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$HPORT/health" >/dev/null && break; sleep 0.1; done
pass=0
for t in $(seq "$TRIALS"); do
  # wait for the full plan (the worker joined)
  for _ in $(seq 300); do
    n=$(curl -sf "http://127.0.0.1:$HPORT/v1/cluster" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(1 for n in d["nodes"] if n["layers"]) if d["ready"] else 0)' || echo 0)
    [ "$n" = 2 ] && break; sleep 0.1
  done
  res=$(python3 - "$HPORT" "$W" <<'PY'
import http.client, json, os, signal, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
c.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": [{"role": "user", "content": "go"}],
          "max_tokens": 4000, "stream": True, "ignore_eos": True}), {"Content-Type": "application/json"})
r = c.getresponse()
seen, killed, err = 0, None, None
for raw in r:
    line = raw.decode().strip()
    if not line.startswith("data: "):
        continue
    if '"error"' in line:
        err = time.perf_counter()
        break
    seen += 1
    if seen == 5:
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
took = (err - killed) if (err and killed) else None
# the head serves the next request
ok = False
for _ in range(100):
    c2 = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c2.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
               {"Content-Type": "application/json"})
    if c2.getresponse().status == 200:
        ok = True
        break
    time.sleep(0.1)
print(json.dumps({"error_after_s": took, "next_request_ok": ok}))
PY
)
  echo "trial $t: $res"
  python3 -c "import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d['error_after_s'] is not None and d['error_after_s'] < 2 and d['next_request_ok'] else 1)" "$res" && pass=$((pass + 1))
  wait "$W" 2>/dev/null || true
  W=$(start_worker)
done
kill "$W" 2>/dev/null || true
echo "worker killed mid-stream: $pass of $TRIALS trials erred within 2 s and the head served the next request"
