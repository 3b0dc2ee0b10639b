"""Prints a table of medians and ratios from a bench script's JSON lines.

usage: ratios.py RESULTS TITLE "LABEL|SINEW-KEY|PEER-KEY|BAR|lower-or-higher"...
Each line of RESULTS is {"what": KEY, "value": NUMBER}.
"""
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(sys.argv[2])
print(f"{'measure':52} {'sinew':>10} {'peer':>10} {'ratio':>8}  bar")
for spec in sys.argv[3:]:
    label, ours, peer, bar, _better = spec.split("|")
    a = [r["value"] for r in rows if r["what"] == ours]
    b = [r["value"] for r in rows if r["what"] == peer]
    if not a or not b:
        print(f"{label:52} {'-':>10} {'-':>10} {'-':>8}  {bar} (not measured)")
        continue
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{label:52} {ma:>10.3f} {mb:>10.3f} {ma / mb:>8.3f}  {bar}")
