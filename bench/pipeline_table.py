"""Table of bench/pipeline.sh results: median decode tok/s [min-max] per system and concurrency,
the ratios the cluster issue's bars name (per round, then median [min-max]), and idle CPU."""
import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tps = defaultdict(dict)  # (system, npl) -> {round: tps}
idle = {}
for r in rows:
    if "cpu_percent" in r:
        idle[r["system"]] = r["cpu_percent"]
    elif r.get("tps") is not None:
        tps[(r["system"], r["npl"])][r["round"]] = r["tps"]

def fmt(xs, d=1):
    if not xs:
        return "—"
    return f"{statistics.median(xs):.{d}f} [{min(xs):.{d}f}–{max(xs):.{d}f}]"

systems = sorted({s for s, _ in tps}, key=lambda s: (not s.startswith("sinew"), s))
npls = sorted({n for _, n in tps})
print("| system | " + " | ".join(f"{n} req" for n in npls) + " |")
print("|---|" + "---|" * len(npls))
for s in systems:
    print(f"| {s} | " + " | ".join(fmt(list(tps[(s, n)].values())) for n in npls) + " |")

def ratio(a, na, b, nb):
    ra, rb = tps.get((a, na), {}), tps.get((b, nb), {})
    xs = [ra[k] / rb[k] for k in ra if k in rb and rb[k]]
    return fmt(xs, 2).replace(" [", "× [") if xs else "—"

two = "sinew 2 stages"
print()
print("| bar | ratio, median [min–max] of rounds |")
print("|---|---|")
print(f"| 2 stages ÷ 1 node, single stream (≥ 0.9) | {ratio(two, 1, 'sinew 1 node, 1 thread', 1)} |")
print(f"| 2 stages, 4 req ÷ its single stream (≥ 1.9) | {ratio(two, 4, two, 1)} |")
for n in (4, 8):
    print(f"| 2 stages ÷ 1 node 2 threads, {n} req (≥ 0.9) | {ratio(two, n, 'sinew 1 node, 2 threads', n)} |")
for peer in ("llama.cpp RPC, layers split", "llama.cpp RPC, all on server"):
    print(f"| 2 stages ÷ {peer}, single stream (≥ 1.0) | {ratio(two, 1, peer, 1)} |")
    print(f"| 2 stages ÷ {peer}, 4 req (≥ 1.5) | {ratio(two, 4, peer, 4)} |")
for k, v in idle.items():
    print(f"| {k} CPU, % of a core (< 2) | {v:.2f} |")
