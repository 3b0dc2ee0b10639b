"""Start orders, timed: a head (`sinew serve`) and two workers on loopback, the workers holding the
model file. Each trial measures the seconds from the last process starting until the head serves
with all three stages (GET /v1/cluster: ready, three nodes holding layers):
  head-first      the head, then (1 s later) both workers;
  workers-first   both workers, then (1 s later) the head;
  head-restarted  a serving cluster's head stopped (SIGINT) and started again, workers left running.
Usage: python3 bench/startorder.py SINEW MODEL [TRIALS]. Prints one JSON line per trial and a
summary (count within 10 s, median, max). DISCOVER=1: the workers announce themselves (to a port
of the trial's own) and the head finds them with --discover instead of --workers. LOGS=DIR keeps
each process's log there."""
import json, os, secrets, signal, statistics, subprocess, sys, tempfile, time, urllib.request

SINEW, MODEL = sys.argv[1], sys.argv[2]
TRIALS = int(sys.argv[3]) if len(sys.argv) > 3 else 10
DISCOVER = os.environ.get("DISCOVER") == "1"
LOGS = os.environ.get("LOGS")  # a directory: each process's stderr kept there


def log(name):
    if not LOGS:
        return subprocess.DEVNULL
    os.makedirs(LOGS, exist_ok=True)
    return open(os.path.join(LOGS, f"{name}-{time.time():.3f}.log"), "w")
tmp = tempfile.mkdtemp(prefix="sinew-startorder-")
key = os.path.join(tmp, "cluster.key")
open(key, "w").write(secrets.token_hex(32))
os.chmod(key, 0o600)


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def worker(port, i, announce):
    # discovered workers listen as by default, on every address
    found = ["--discovery-port", str(announce)] if DISCOVER else ["--no-announce"]
    listen = f"[::]:{port}" if DISCOVER else f"127.0.0.1:{port}"
    return subprocess.Popen([SINEW, "worker", "--threads", "1", "--listen", listen,
                             "--model", MODEL, "--cluster-key-file", key,
                             "--cache-dir", os.path.join(tmp, f"w{i}")] + found,
                            stdout=subprocess.DEVNULL, stderr=log(f"w{i}"))


def head(http, ports, announce):
    if DISCOVER:
        found = ["--discover", "--discovery-port", str(announce)]
    else:
        found = ["--workers", ",".join(f"127.0.0.1:{p}" for p in ports)]
    return subprocess.Popen([SINEW, "serve", "--threads", "1", "--http", f"127.0.0.1:{http}",
                             "--model", MODEL, "--ctx", "256", "--max-seqs", "2",
                             "--cluster-key-file", key, "--cache-dir", os.path.join(tmp, "head")]
                            + found, stdout=subprocess.DEVNULL, stderr=log("head"))


def full(http, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/cluster", timeout=1) as r:
                s = json.load(r)
            if s["ready"] and sum(1 for n in s["nodes"] if n["layers"]) == 3:
                return True
        except Exception:
            pass
        time.sleep(0.02)
    return False


def stop(p):
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()


results = []
for order in ["head-first", "workers-first", "head-restarted"]:
    for t in range(TRIALS):
        ports, http, announce = [free_port(), free_port()], free_port(), free_port()
        procs = []
        try:
            if order == "head-first":
                procs.append(head(http, ports, announce))
                time.sleep(1)
                procs += [worker(ports[0], 0, announce), worker(ports[1], 1, announce)]
            else:
                procs += [worker(ports[0], 0, announce), worker(ports[1], 1, announce)]
                time.sleep(1)
                procs.append(head(http, ports, announce))
                if order == "head-restarted":
                    assert full(http), "the first head never served"
                    stop(procs.pop())
                    procs.append(head(http, ports, announce))
            t0 = time.time()
            ok = full(http)
            secs = time.time() - t0 if ok else None
        finally:
            for p in procs:
                stop(p)
        r = {"order": order, "trial": t, "ready_s": secs, "discover": DISCOVER}
        print(json.dumps(r), flush=True)
        results.append(r)
for order in ["head-first", "workers-first", "head-restarted"]:
    xs = [r["ready_s"] for r in results if r["order"] == order]
    ok = [x for x in xs if x is not None and x <= 10]
    done = [x for x in xs if x is not None]
    print(f"{order:<15} {len(ok)}/{len(xs)} within 10 s; median {statistics.median(done):.2f} s, "
          f"max {max(done):.2f} s" if done else f"{order}: never ready")
