"""Prints a table of medians and ratios from a bench script's JSON lines.

usage: ratios.py RESULTS TITLE "LABEL|SINEW-KEY|PEER-KEY|BAR|lower-or-higher"...
Each line of RESULTS is {"what": KEY, "value": NUMBER}. The ratio is the medians' ratio; where
both keys have as many values, recorded in step (once a round, or once per back-to-back pair),
the "paired" column adds the median of the per-round (per-pair) ratios and their range: on a VM
whose speed shifts between runs, a round's two measurements share its conditions, the two
medians may not.
"""
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(sys.argv[2])
print(f"{'measure':52} {'sinew':>10} {'peer':>10} {'ratio':>8}  {'paired [min, max]':20} bar")
for spec in sys.argv[3:]:
    label, ours, peer, bar, _better = spec.split("|")
    a = [r["value"] for r in rows if r["what"] == ours]
    b = [r["value"] for r in rows if r["what"] == peer]
    if not a or not b:
        print(f"{label:52} {'-':>10} {'-':>10} {'-':>8}  {'-':20} {bar} (not measured)")
        continue
    ma, mb = statistics.median(a), statistics.median(b)
    paired = "-"
    if len(a) == len(b) and len(a) > 1:
        per_round = [x / y for x, y in zip(a, b)]
        paired = (
            f"{statistics.median(per_round):.3f} "
            f"[{min(per_round):.2f}, {max(per_round):.2f}]"
        )
    print(f"{label:52} {ma:>10.3f} {mb:>10.3f} {ma / mb:>8.3f}  {paired:20} {bar}")
