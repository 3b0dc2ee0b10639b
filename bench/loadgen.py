"""A small load generator for OpenAI-compatible servers (stdlib only): C concurrent clients, each
sending streamed chat or completion requests back to back until R requests are done. Reports
time to first token, inter-token latency (p50/p99) and aggregate output tok/s, as one JSON line.

usage: loadgen.py URL MODEL --clients C --requests R --max-tokens N [--prompt-ids 1,2,3]
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def one(url, body):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", u.path + "/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    times = []
    tokens = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        v = json.loads(data)
        if "error" in v:
            raise RuntimeError(str(v["error"]))
        if v.get("choices") and v["choices"][0].get("text"):
            times.append(time.perf_counter())
        if v.get("usage"):
            tokens = v["usage"]["completion_tokens"]
    conn.close()
    # a server that sends no usage chunk: one streamed piece per token
    return t0, times, max(tokens, len(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-ids", default="")
    ap.add_argument("--prompt", default="Hello, tell me a story")
    a = ap.parse_args()
    prompt = [int(x) for x in a.prompt_ids.split(",")] if a.prompt_ids else a.prompt
    body = {"model": a.model, "prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    lock = threading.Lock()
    left = [a.requests]
    ttft, itl, tokens, errors = [], [], [0], []

    def client():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
                k = left[0]
            # each request's prompt differs in its first token, so no server answers from a cached
            # prefix (llama-server caches prompts per slot)
            b = dict(body)
            if isinstance(prompt, list):
                b["prompt"] = [10 + k % 300] + prompt[1:]
            else:
                b["prompt"] = f"{k} {prompt}"
            try:
                t0, times, n = one(a.url, b)
            except Exception as e:  # recorded, not fatal: the report says how many failed
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                if times:
                    ttft.append(times[0] - t0)
                    itl.extend(b - x for x, b in zip(times, times[1:]))
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) >= 2 else (xs[0] if xs else None)
    print(json.dumps({
        "clients": a.clients, "requests": a.requests, "errors": len(errors),
        "output_tokens_per_s": tokens[0] / wall,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "itl_p50_s": q(itl, 50), "itl_p99_s": q(itl, 99),
        "first_error": errors[0] if errors else None,
    }))


if __name__ == "__main__":
    main()
