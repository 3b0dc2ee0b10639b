#!/usr/bin/env python3
"""Side-by-side `sinew link` bandwidth of several configurations, in many short alternating rounds.

On a VM whose two vCPUs move between cores that share a cache and cores that do not, one run's
bandwidth swings 2-3x within minutes, far more than the few percent two backends differ by. Each
round here runs every configuration once, a fresh server and client each, back to back (order
rotated between rounds), so the two sides of a ratio share the placement; the summary gives, per
configuration and size, the median of the per-round ratios to the first configuration, a 95%
bootstrap interval of that median, and how many rounds it won.

usage: bench/link_pairs.py [--rounds N] [--duration S] [--wait spin|block|adaptive]
                           [--sizes 64K,1M,16M] [--binary PATH] LABEL=TRANSPORT[:ARGS]...
e.g.   bench/link_pairs.py --rounds 20 --wait spin tcp=tcp uring=uring
       bench/link_pairs.py ring=shm:--shm-single-copy=off auto=shm
A configuration may name another binary: LABEL=PATH@TRANSPORT (an A/B of two builds).
Build first: cargo build --release -p sinew. Server on SERVER_CPU (0), client on CLIENT_CPU (1).
"""
import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_config(spec, default_binary):
    label, _, rest = spec.partition("=")
    if not label or not rest:
        sys.exit(f"bad configuration {spec!r}: expected LABEL=TRANSPORT[:ARGS]")
    binary = default_binary
    if "@" in rest:
        binary, rest = rest.split("@", 1)
    transport, _, args = rest.partition(":")
    return label, binary, transport, [a for a in args.split(",") if a]


def wait_for_port(port, deadline_s=10.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"the server did not listen on port {port} within {deadline_s} s")


def run_once(opts, key, config):
    _, binary, transport, extra = config
    server = subprocess.Popen(
        ["taskset", "-c", opts.server_cpu, binary, "link", "server",
         "--bind", f"127.0.0.1:{opts.port}", "--wait", opts.wait, "--cluster-key-file", key],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(opts.port)
        client = subprocess.run(
            ["taskset", "-c", opts.client_cpu, binary, "link", "client", f"127.0.0.1:{opts.port}",
             "--wait", opts.wait, "--transport", transport, "--streams", "1", "--json",
             "--cluster-key-file", key, "--sizes", opts.sizes, "--no-latency",
             "--duration", str(opts.duration), *extra],
            capture_output=True, text=True, timeout=120)
    finally:
        server.kill()
        server.wait()
    if client.returncode != 0:
        sys.exit(f"{config[0]}: sinew link client failed: {client.stderr.strip()}")
    time.sleep(0.1)
    return [row["gbytes_per_s"] for row in json.loads(client.stdout)["bandwidth"]]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--duration", type=float, default=0.5)
    p.add_argument("--wait", default="spin", choices=["spin", "block", "adaptive"])
    p.add_argument("--sizes", default="64K,1M,16M")
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "sinew"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "17471")))
    p.add_argument("configs", nargs="+", metavar="LABEL=TRANSPORT[:ARGS]")
    opts = p.parse_args()
    opts.server_cpu = os.environ.get("SERVER_CPU", "0")
    opts.client_cpu = os.environ.get("CLIENT_CPU", "1")
    configs = [parse_config(c, opts.binary) for c in opts.configs]
    if len(configs) < 2:
        sys.exit("give at least two configurations: the first is the reference")
    for _, binary, _, _ in configs:
        if not os.access(binary, os.X_OK):
            sys.exit(f"no binary at {binary}: cargo build --release -p sinew")

    fd, key = tempfile.mkstemp()
    try:
        os.write(fd, os.urandom(32).hex().encode())
        os.close(fd)
        os.chmod(key, 0o600)
        sizes = opts.sizes.split(",")
        ratios = {k: [] for k in range(1, len(configs))}
        for r in range(opts.rounds):
            order = list(range(len(configs)))
            order = order[r % len(order):] + order[:r % len(order)]
            got = {k: run_once(opts, key, configs[k]) for k in order}
            print(f"round {r + 1}: " + " | ".join(
                configs[k][0] + " " + " ".join(f"{v:.2f}" for v in got[k])
                for k in range(len(configs))), flush=True)
            for k in ratios:
                ratios[k].append([b / a for a, b in zip(got[0], got[k])])
    finally:
        os.unlink(key)

    print(f"\n{opts.rounds} rounds x {opts.duration} s, --wait {opts.wait}; "
          f"per-round GB/s ratio to {configs[0][0]}:")
    print(f"{'configuration':24} {'size':>6} {'median':>8}  {'95% interval':16} wins")
    rng = random.Random(1)
    for k in ratios:
        for j, size in enumerate(sizes):
            col = [row[j] for row in ratios[k]]
            boots = sorted(statistics.median(rng.choices(col, k=len(col))) for _ in range(2000))
            lo, hi = boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]
            wins = sum(x >= 1.0 for x in col)
            print(f"{configs[k][0] + ' / ' + configs[0][0]:24} {size:>6} "
                  f"{statistics.median(col):8.3f}  [{lo:.3f}, {hi:.3f}]   {wins}/{len(col)}")


if __name__ == "__main__":
    main()
