#!/usr/bin/env python3
"""The floor under io_uring's bandwidth against plain socket calls, with nothing of sinew in between.

Runs bench/uring-floor (built on first use) in many short rounds: each round streams frames of a
32-byte header and a payload over loopback TCP once per mode and size, order rotated between
rounds, so the modes of a round share the VM's placement. A frame is one synchronous call, as a
framed link's `send` is: `sendmsg(2)` of header and payload (sinew's `tcp` backend), io_uring
`SENDMSG` of the two (sinew's `uring` backend), io_uring `SEND` with `IORING_SEND_VECTORIZED`,
and, for one contiguous buffer, `send(2)` against io_uring `SEND`.

`--receivers` instead compares the receiving side: the same `sendmsg(2)` sender, the stream taken
by `recv(2)` or by io_uring `RECV`s, each either in 1 MiB receives or frame by frame as sinew's
framed receiver takes a large message (the header with at most 4 KiB after it, io_uring with
`READ_FIXED` into a registered buffer, then the rest of the payload).

`--zerocopy` puts io_uring's zero-copy send (`SEND_ZC`, each frame waited for until the kernel
lets go of its pages, as a synchronous send must) against `send(2)` and io_uring `SEND` of the
same contiguous buffer. On one host the kernel copies zero-copy pages when it delivers them to
the local receiver; `zc_copied` in each record counts the frames it copied.

For each pair and size it prints the median of the per-round bandwidth ratios, a 95% bootstrap
interval of that median, the rounds won, and the median extra time per frame in nanoseconds
(positive: the io_uring call is dearer). A per-frame cost that stays put while the payload grows
is a per-operation cost, and its share of a frame's time is the most a backend issuing that
operation once per frame can lose or gain against the socket call.

usage: bench/uring_floor.py [--rounds N] [--duration S] [--sizes 4K,64K,1M]
                            [--receivers | --zerocopy] [--cpus SENDER,RECEIVER] [--record FILE]
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from link_pairs import bootstrap  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATE = os.path.join(ROOT, "bench", "uring-floor")
BINARY = os.path.join(CRATE, "target", "release", "uring-floor")
# A configuration is (sending mode, receiver); a pair is (label, numerator, denominator), the
# bandwidth ratio numerator / denominator.
SENDERS = {
    "configs": [("sendmsg", "recv"), ("uring-sendmsg", "recv"), ("uring-sendv", "recv"),
                ("send", "recv"), ("uring-send", "recv")],
    "pairs": [
        ("io_uring SENDMSG / sendmsg(2)  (uring vs tcp backend)", ("uring-sendmsg", "recv"), ("sendmsg", "recv")),
        ("io_uring SEND vectorized / sendmsg(2)", ("uring-sendv", "recv"), ("sendmsg", "recv")),
        ("io_uring SEND / send(2)  (contiguous)", ("uring-send", "recv"), ("send", "recv")),
        ("send(2) contiguous / sendmsg(2)", ("send", "recv"), ("sendmsg", "recv")),
    ],
}
RECEIVERS = {
    "configs": [("sendmsg", "recv-framed"), ("sendmsg", "uring-framed"), ("sendmsg", "recv"),
                ("sendmsg", "uring-recv"), ("uring-sendmsg", "uring-framed")],
    "pairs": [
        ("io_uring framed receive / recv(2) framed", ("sendmsg", "uring-framed"), ("sendmsg", "recv-framed")),
        ("io_uring RECV 1 MiB / recv(2) 1 MiB", ("sendmsg", "uring-recv"), ("sendmsg", "recv")),
        ("io_uring both ends / socket calls, framed", ("uring-sendmsg", "uring-framed"), ("sendmsg", "recv-framed")),
    ],
}
ZEROCOPY = {
    "configs": [("send", "recv"), ("uring-send", "recv"), ("uring-send-zc", "recv")],
    "pairs": [
        ("io_uring SEND_ZC / send(2)  (contiguous)", ("uring-send-zc", "recv"), ("send", "recv")),
        ("io_uring SEND_ZC / io_uring SEND", ("uring-send-zc", "recv"), ("uring-send", "recv")),
        ("io_uring SEND / send(2)  (contiguous)", ("uring-send", "recv"), ("send", "recv")),
    ],
}


def build():
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--manifest-path", os.path.join(CRATE, "Cargo.toml")],
        check=True,
    )


def run_once(config, size, opts):
    mode, receiver = config
    args = [BINARY, mode, size, str(opts.duration), *opts.cpus.split(","), receiver]
    p = subprocess.run(args, capture_output=True, text=True, timeout=opts.duration + 60)
    if p.returncode != 0:
        sys.exit(f"uring_floor: {' '.join(args)} failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--duration", type=float, default=0.5, help="seconds per mode and size")
    ap.add_argument("--sizes", default="4K,64K,1M")
    ap.add_argument("--cpus", default="1,0", help="SENDER,RECEIVER")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--receivers", action="store_true", help="compare receiving sides instead of senders")
    which.add_argument("--zerocopy", action="store_true", help="compare io_uring's zero-copy send with copying sends")
    ap.add_argument("--record", help="append every run to this file (JSON lines)")
    opts = ap.parse_args()
    if opts.rounds < 1 or opts.duration <= 0:
        sys.exit("uring_floor: --rounds must be >= 1 and --duration > 0")
    if len(opts.cpus.split(",")) != 2:
        sys.exit("uring_floor: --cpus takes SENDER,RECEIVER")
    plan = RECEIVERS if opts.receivers else ZEROCOPY if opts.zerocopy else SENDERS
    configs = plan["configs"]
    sizes = opts.sizes.split(",")
    build()
    rng = random.Random(1)
    rounds = []
    for r in range(opts.rounds):
        k = r % len(configs)
        order = configs[k:] + configs[:k]
        row = {}
        for size in sizes:
            for mode in order:
                result = run_once(mode, size, opts)
                row[(mode, size)] = result
                if opts.record:
                    with open(opts.record, "a") as f:
                        f.write(json.dumps({"round": r, **result}) + "\n")
        rounds.append(row)
        line = "  ".join(
            f"{size} " + " ".join(f"{m[0]}/{m[1]} {row[(m, size)]['gbytes_per_s']:.2f}" for m in configs)
            for size in sizes
        )
        print(f"round {r + 1}/{opts.rounds} GB/s: {line}", flush=True)

    side = "receiving" if opts.receivers else "zero-copy sending" if opts.zerocopy else "sending"
    print(f"\nio_uring vs socket calls, {side} side; one synchronous send per frame (32 B header + "
          f"payload), {opts.rounds} rounds x {opts.duration} s, cpus {opts.cpus}")
    print(f"{'pair':55} {'size':>5} {'ratio':>7} {'95% interval':>16} {'won':>7} {'extra ns/frame':>15}")
    for label, num, den in plan["pairs"]:
        for size in sizes:
            ratios = [row[(num, size)]["gbytes_per_s"] / row[(den, size)]["gbytes_per_s"] for row in rounds]
            extra = [row[(num, size)]["ns_per_frame"] - row[(den, size)]["ns_per_frame"] for row in rounds]
            lo, hi = bootstrap(ratios, rng)
            won = sum(1 for x in ratios if x > 1)
            print(f"{label:55} {size:>5} {statistics.median(ratios):7.3f} [{lo:.3f}, {hi:.3f}] "
                  f"{won:>3}/{len(ratios):<3} {statistics.median(extra):15.0f}")


if __name__ == "__main__":
    main()
