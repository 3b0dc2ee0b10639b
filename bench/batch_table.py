#!/usr/bin/env python3
"""Table of bench/batch.sh results: medians over rounds, with the min-max spread of each ratio."""
import json
import statistics
import sys
from collections import defaultdict


def spread(xs):
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
batch = defaultdict(list)
single = defaultdict(list)
for r in rows:
    key = (r["model"], r["threads"])
    if r.get("single"):
        single[key].append(r)
    else:
        batch[key + (r["seqs"],)].append(r)

print("model        thr seqs  sinew agg tok/s  llama-batched  ratio [spread]   ×sinew@1")
base = {}
for key in sorted(batch):
    rs = batch[key]
    s = [r["sinew_aggregate"] for r in rs]
    if key[2] == 1:
        base[key[:2]] = statistics.median(s)
    l = [r["llama_batched_aggregate"] for r in rs if r["llama_batched_aggregate"] is not None]
    ratio = spread([a / b for a, b in zip(s, l)]) if l else "-"
    lmed = f"{statistics.median(l):13.1f}" if l else "            -"
    scale = statistics.median(s) / base.get(key[:2], float("nan"))
    print(f"{key[0]:12} {key[1]:3} {key[2]:4} {statistics.median(s):16.1f} {lmed}  {ratio:16} {scale:6.2f}")

if single:
    print()
    print("model        thr  tg ratio (sinew/llama-bench)  pp ratio          load ratio warm   cold (sinew/llama)")
    for key in sorted(single):
        rs = single[key]
        tg = spread([r["sinew_tg"] / r["llama_tg"] for r in rs])
        pp = spread([r["sinew_pp"] / r["llama_pp"] for r in rs])
        ld = spread([r["sinew_load_s"] / r["llama_load_s"] for r in rs])
        colds = [r["sinew_cold_load_s"] / r["llama_cold_load_s"] for r in rs
                 if r.get("sinew_cold_load_s") and r.get("llama_cold_load_s")]
        cold = spread(colds) if colds else "-"
        print(f"{key[0]:12} {key[1]:3}  {tg:30} {pp:17} {ld:17} {cold}")
