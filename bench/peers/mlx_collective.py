"""Times MLX's distributed all_sum / all_gather over its ring backend (the one EXO uses over TCP),
as sinew bench does: a small all_sum to line the ranks up, then the timed op, per iteration.

Usage (one process per rank):
    MLX_HOSTFILE=hosts.json MLX_RANK=R python3 mlx_collective.py OP SIZES ITERS
OP: all-reduce | all-gather; SIZES: bytes, comma-separated. Rank 0 prints one JSON object per size.
"""
import json
import statistics
import sys
import time

import mlx.core as mx

op, sizes, iters = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
group = mx.distributed.init(backend="ring", strict=True)
n, rank = group.size(), group.rank()
sync = mx.ones(1)
for size in sizes:
    count = max(size // 4 // n * n, n)
    x = mx.ones(count // n if op == "all-gather" else count, dtype=mx.float32)
    times = []
    for i in range(iters + 5):
        mx.eval(mx.distributed.all_sum(sync))
        t = time.perf_counter()
        if op == "all-reduce":
            y = mx.distributed.all_sum(x)
        else:
            y = mx.distributed.all_gather(x)
        mx.eval(y)
        if i >= 5:
            times.append(time.perf_counter() - t)
    p50 = statistics.median(times)
    factor = 2 * (n - 1) / n if op == "all-reduce" else (n - 1) / n
    if rank == 0:
        print(json.dumps({"op": op, "size_bytes": count * 4, "p50_us": p50 * 1e6,
                          "busbw_gbytes_per_s": count * 4 / p50 / 1e9 * factor}), flush=True)
