"""Starts a head and two workers, renders the head's status page in headless Chromium, and checks
what it shows: the model, "serving", three nodes up with their layer ranges covering the model,
three links with their backend, and no refusal; the screenshot is a real picture (not blank)."""
import os, re, secrets, signal, subprocess, sys, tempfile, time, zlib, struct, html

SINEW = os.environ["SINEW"]
OUT = os.environ.get("OUT", ".")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "engine", "fixtures", "qwen3_moe_gqa")


def wait_line(proc, prefix, timeout):
    end = time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            time.sleep(0.05)
            continue
        if prefix in line:
            return line.strip()
    raise SystemExit(f"no line {prefix!r} within {timeout} s")


def png_colors(path):
    """Distinct byte values of the decompressed image data (a blank page has very few)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    return len(set(zlib.decompress(idat)))


def main():
    tmp = tempfile.mkdtemp(prefix="sinew-status-")
    model = os.path.join(tmp, "model.gguf")
    subprocess.run([SINEW, "gguf", "convert", FIXTURE, "--quant", "f32", "--out", model],
                   check=True, capture_output=True)
    key = os.path.join(tmp, "cluster.key")
    with open(key, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(key, 0o600)
    procs = []
    try:
        addrs = []
        for i in range(2):
            p = subprocess.Popen([SINEW, "worker", "--threads", "1", "--listen", "127.0.0.1:0",
                                  "--no-announce", "--cluster-key-file", key,
                                  "--cache-dir", os.path.join(tmp, f"w{i}")],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(p)
            addrs.append(wait_line(p, "worker listening on ", 60).split()[-1])
        head = subprocess.Popen([SINEW, "serve", "--threads", "1", "--http", "127.0.0.1:0",
                                 "--model", model, "--workers", ",".join(addrs), "--ctx", "256",
                                 "--max-seqs", "2", "--cluster-key-file", key,
                                 "--cache-dir", os.path.join(tmp, "head")],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(head)
        url = wait_line(head, "sinew serving ", 120).split(" at ")[1].strip()
        page = url.rsplit("/v1", 1)[0] + "/"
        chrome = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-dev-shm-usage", "--window-size=1280,900",
                  "--virtual-time-budget=5000", f"--user-data-dir={tmp}/chrome"]
        dom = subprocess.run(chrome + ["--dump-dom", page], capture_output=True, text=True,
                             timeout=120).stdout
        shot = os.path.join(OUT, "status-page.png")
        subprocess.run(chrome + [f"--screenshot={shot}", page], capture_output=True, timeout=120)
        text = html.unescape(re.sub(r"<[^>]+>", "|", dom))
        failures = []

        def expect(cond, what):
            if not cond:
                failures.append(what)

        expect("model.gguf" in text, "the model's name")
        expect(re.search(r"\|serving\|", text), "the cluster serving")
        nodes = re.search(r'<table id="nodes">.*?<tbody>(.*?)</tbody>', dom, re.S)
        rows = re.findall(r"<tr>(.*?)</tr>", nodes.group(1), re.S) if nodes else []
        expect(len(rows) == 3, f"3 node rows, not {len(rows)}")
        for a in addrs:
            expect(a in text, f"worker {a}")
        expect(text.count("|up|") == 3, "3 nodes up")
        ranges = sorted(tuple(map(int, m)) for m in re.findall(r"\|(\d+)\.\.(\d+)\|", text))
        expect(len(ranges) == 3 and ranges[0][0] == 0 and all(
            ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1)),
            f"3 layer ranges covering the model, not {ranges}")
        links = re.search(r'<table id="links">.*?<tbody>(.*?)</tbody>', dom, re.S)
        lrows = re.findall(r"<tr>(.*?)</tr>", links.group(1), re.S) if links else []
        expect(len(lrows) == 3, f"3 link rows, not {len(lrows)}")
        expect(re.search(r"MB/s", text), "link bandwidths")
        refused = re.search(r'<table id="refused">.*?<tbody>(.*?)</tbody>', dom, re.S)
        expect(refused and "<tr>" not in refused.group(1), "no refusal")
        expect(os.path.exists(shot) and os.path.getsize(shot) > 10_000, "a screenshot")
        if os.path.exists(shot):
            expect(png_colors(shot) > 32, "a screenshot that is not blank")
        if failures:
            print("the status page does not show:", *failures, sep="\n  ", file=sys.stderr)
            print(text[:3000], file=sys.stderr)
            raise SystemExit(1)
        print(f"status page: 3 nodes, 3 links, layers {ranges}; screenshot {shot}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


main()
