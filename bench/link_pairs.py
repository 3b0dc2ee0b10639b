#!/usr/bin/env python3
"""Side-by-side `sinew link` bandwidth of several configurations, in many short alternating rounds.

On a VM whose two vCPUs move between cores that share a cache and cores that do not, one run's
bandwidth swings 2-3x within minutes, far more than the few percent two backends differ by. Each
round here runs every configuration once, a fresh server and client each, back to back (order
rotated between rounds), so the two sides of a ratio share the placement; the summary gives, per
configuration and size, the median of the per-round ratios to the first configuration, a 95%
bootstrap interval of that median, and how many rounds it won.

Rounds of one run share more than the placement: the host's state drifts over minutes, so one
run's interval can exclude 1 on one side and the next run's on the other. `--record FILE`
appends every round to FILE (JSON lines), and `--pool FILE...` summarizes every recorded round of
the same configurations and wait mode together, each run's own median beside the pooled one.
`--placement` measures the cores' cache-line round trip before and after each round
(bench/peers/cacheline_pingpong.c, built on first use) and adds a summary of the rounds whose
cores shared a cache both times.

usage: bench/link_pairs.py [--rounds N] [--duration S] [--wait spin|block|adaptive]
                           [--sizes 64K,1M,16M] [--binary PATH] [--placement] [--record FILE]
                           LABEL=TRANSPORT[:ARGS]...
       bench/link_pairs.py --pool FILE...
e.g.   bench/link_pairs.py --rounds 20 --wait spin tcp=tcp uring=uring
       bench/link_pairs.py ring=shm:--shm-single-copy=off auto=shm
       bench/link_pairs.py --placement --record bench/out/pairs.jsonl tcp=tcp uring=uring
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
# A cache-line round trip below this (ns) means the two cores share a cache (about 50-70 ns
# here, against 120-340 ns when they do not).
SHARED_NS = 90.0
# What every recorded round holds.
FIELDS = ("run", "wait", "labels", "sizes", "gbps")


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


def placement_probe(opts):
    """A function measuring the cores' cache-line round trip in ns (building the probe once)."""
    source = os.path.join(ROOT, "bench", "peers", "cacheline_pingpong.c")
    probe = os.path.join(ROOT, "bench", "out", "cacheline_pingpong")
    if not os.access(probe, os.X_OK) or os.path.getmtime(probe) < os.path.getmtime(source):
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", probe, source], check=True)

    def measure():
        out = subprocess.run([probe, opts.server_cpu, opts.client_cpu], capture_output=True,
                             text=True, check=True, timeout=60)
        return json.loads(out.stdout)["value"]
    return measure


def bootstrap(col, rng):
    boots = sorted(statistics.median(rng.choices(col, k=len(col))) for _ in range(2000))
    return boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]


def summarize(rounds, title):
    """Prints, per configuration and size, the median ratio to the first configuration over
    `rounds`, its 95% bootstrap interval, the rounds won and (when they came from several runs)
    each run's own median."""
    if not rounds:
        print(f"\n{title}: no rounds")
        return
    labels, sizes = rounds[0]["labels"], rounds[0]["sizes"]
    runs = sorted({r["run"] for r in rounds})
    print(f"\n{title}: {len(rounds)} rounds" + (f" from {len(runs)} runs" if len(runs) > 1 else "")
          + f", --wait {rounds[0]['wait']}; per-round GB/s ratio to {labels[0]}:")
    print(f"{'configuration':24} {'size':>6} {'median':>8}  {'95% interval':16} {'wins':>7}"
          + ("   run medians" if len(runs) > 1 else ""))
    rng = random.Random(1)
    for label in labels[1:]:
        for j, size in enumerate(sizes):
            ratio = lambda r: r["gbps"][label][j] / r["gbps"][labels[0]][j]  # noqa: E731
            col = [ratio(r) for r in rounds]
            lo, hi = bootstrap(col, rng)
            wins = sum(x >= 1.0 for x in col)
            per_run = ""
            if len(runs) > 1:
                per_run = "   " + " ".join(
                    f"{statistics.median(ratio(r) for r in rounds if r['run'] == run):.2f}"
                    for run in runs)
            print(f"{label + ' / ' + labels[0]:24} {size:>6} {statistics.median(col):8.3f}  "
                  f"[{lo:.3f}, {hi:.3f}] {wins:>3}/{len(col):<3}{per_run}")


def report(rounds, title):
    summarize(rounds, title)
    tagged = [r for r in rounds if "placement_ns" in r]
    if tagged:
        shared = [r for r in tagged if max(r["placement_ns"]) < SHARED_NS]
        summarize(shared, f"cores sharing a cache before and after (round trip < {SHARED_NS:.0f} ns)")


def is_round(row):
    """Whether `row` has what `summarize` reads: the fields, and a positive GB/s figure for every
    label and size."""
    if not isinstance(row, dict) or any(k not in row for k in FIELDS):
        return False
    labels, sizes, gbps = row["labels"], row["sizes"], row["gbps"]
    if not (isinstance(labels, list) and isinstance(sizes, list) and isinstance(gbps, dict)
            and isinstance(row["wait"], str) and isinstance(row["run"], str)
            and all(isinstance(x, str) for x in labels + sizes)):
        return False
    return all(
        isinstance(gbps.get(label), list) and len(gbps[label]) == len(sizes)
        and all(isinstance(v, (int, float)) and v > 0 for v in gbps[label])
        for label in labels)


def pool(files):
    rounds = []
    for name in files:
        try:
            with open(name) as f:
                lines = f.readlines()
        except OSError as e:
            sys.exit(f"--pool {name}: {e.strerror}")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{name}:{n}: not JSON: {e}")
            if not is_round(row):
                sys.exit(f"{name}:{n}: not a round recorded by --record (fields {', '.join(FIELDS)},"
                         " a positive GB/s per label and size)")
            rounds.append(row)
    groups = {}
    for r in rounds:
        groups.setdefault((tuple(r["labels"]), tuple(r["sizes"]), r["wait"]), []).append(r)
    for (labels, _, wait), group in groups.items():
        report(group, f"pooled {' vs '.join(labels)}, {wait}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--duration", type=float, default=0.5)
    p.add_argument("--wait", default="spin", choices=["spin", "block", "adaptive"])
    p.add_argument("--sizes", default="64K,1M,16M")
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "sinew"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "17471")))
    p.add_argument("--placement", action="store_true",
                   help="measure the cores' cache-line round trip before and after each round")
    p.add_argument("--record", metavar="FILE", help="append every round to FILE (JSON lines)")
    p.add_argument("--pool", nargs="+", metavar="FILE",
                   help="summarize the rounds recorded in FILEs instead of running")
    p.add_argument("configs", nargs="*", metavar="LABEL=TRANSPORT[:ARGS]")
    opts = p.parse_args()
    if opts.pool:
        if opts.configs:
            sys.exit("--pool summarizes recorded rounds: give no configurations with it")
        pool(opts.pool)
        return
    opts.server_cpu = os.environ.get("SERVER_CPU", "0")
    opts.client_cpu = os.environ.get("CLIENT_CPU", "1")
    configs = [parse_config(c, opts.binary) for c in opts.configs]
    if len(configs) < 2:
        sys.exit("give at least two configurations: the first is the reference")
    labels = [c[0] for c in configs]
    if len(set(labels)) != len(labels):
        sys.exit("configuration labels must differ")
    for _, binary, _, _ in configs:
        if not os.access(binary, os.X_OK):
            sys.exit(f"no binary at {binary}: cargo build --release -p sinew")
    measure = placement_probe(opts) if opts.placement else None
    record = open(opts.record, "a") if opts.record else None

    run_id = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{os.getpid()}"
    sizes = opts.sizes.split(",")
    fd, key = tempfile.mkstemp()
    rounds = []
    try:
        os.write(fd, os.urandom(32).hex().encode())
        os.close(fd)
        os.chmod(key, 0o600)
        for r in range(opts.rounds):
            order = list(range(len(configs)))
            order = order[r % len(order):] + order[:r % len(order)]
            before = measure() if measure else None
            got = {k: run_once(opts, key, configs[k]) for k in order}
            row = {"run": run_id, "wait": opts.wait, "duration": opts.duration,
                   "labels": labels, "sizes": sizes,
                   "gbps": {configs[k][0]: got[k] for k in range(len(configs))}}
            where = ""
            if measure:
                row["placement_ns"] = [before, measure()]
                where = " [{:.0f}/{:.0f} ns]".format(*row["placement_ns"])
            rounds.append(row)
            if record:
                record.write(json.dumps(row) + "\n")
                record.flush()
            print(f"round {r + 1}{where}: " + " | ".join(
                configs[k][0] + " " + " ".join(f"{v:.2f}" for v in got[k])
                for k in range(len(configs))), flush=True)
    finally:
        os.unlink(key)
        if record:
            record.close()
    report(rounds, f"{opts.duration} s per configuration")


if __name__ == "__main__":
    main()
