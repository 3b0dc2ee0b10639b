"""The real `openai` Python client against `sinew serve`: a single node on a committed fixture,
and a head with two workers. Run by .ci/run (tests/openai/run.sh) in a venv holding only `openai`
and `pytest`. SINEW is the binary to test."""
import json
import os
import socket
import subprocess
import tempfile
import time

import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINEW = os.environ.get("SINEW", os.path.join(ROOT, "target", "debug", "sinew"))
FIXTURE = os.path.join(ROOT, "engine", "fixtures", "qwen3_moe_gqa")


def start(args):
    p = subprocess.Popen(
        [SINEW, "serve", "--threads", "1", "--http", "127.0.0.1:0", "--model-id", "fx", "--ctx", "256"] + args,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if line.startswith("sinew serving "):
            return p, line.split(" at ")[1].strip()
    p.kill()
    raise RuntimeError("sinew serve did not start")


def worker(key, cache):
    p = subprocess.Popen(
        [SINEW, "worker", "--threads", "1", "--listen", "127.0.0.1:0", "--cluster-key-file", key, "--cache-dir", cache],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert line.startswith("worker listening on "), line
    return p, line.split("on ")[1].strip()


@pytest.fixture(scope="module", params=["single", "cluster"])
def client(request):
    procs = []
    tmp = tempfile.mkdtemp()
    try:
        if request.param == "single":
            p, url = start(["--model", FIXTURE])
            procs.append(p)
        else:
            key = os.path.join(tmp, "cluster.key")
            with open(key, "w") as f:
                f.write("ab" * 32 + "\n")
            os.chmod(key, 0o600)
            gguf = os.path.join(tmp, "m.gguf")
            subprocess.run([SINEW, "gguf", "convert", FIXTURE, "--quant", "f32", "--out", gguf],
                           check=True, capture_output=True)
            addrs = []
            for i in range(2):
                w, a = worker(key, os.path.join(tmp, f"w{i}"))
                procs.append(w)
                addrs.append(a)
            p, url = start(["--model", gguf, "--workers", ",".join(addrs), "--cluster-key-file", key,
                            "--cache-dir", os.path.join(tmp, "head")])
            procs.append(p)
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["fx"]
    assert client.models.retrieve("fx").id == "fx"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat(client):
    r = client.chat.completions.create(model="fx", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=6, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model="fx", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=6, temperature=0)
    assert again.choices[0].message.content == c.message.content


def test_chat_stream_matches_and_reports_usage(client):
    kw = dict(model="fx", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(reasons) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_chat_seed_n_logprobs(client):
    kw = dict(model="fx", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.9, seed=11)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    n = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in n.choices] == [0, 1]
    lp = client.chat.completions.create(model="fx", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_completions(client):
    r = client.completions.create(model="fx", prompt="hello there", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    s = list(client.completions.create(model="fx", prompt="hello there", max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text
    ll = client.completions.create(model="fx", prompt=[1, 2, 3, 4], max_tokens=0, echo=True, logprobs=1)
    lp = ll.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == 4
    multi = client.completions.create(model="fx", prompt=["a b", "c d"], max_tokens=2, n=2)
    assert len(multi.choices) == 4


def test_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fx", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fx", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fx", prompt=[5] * 300, max_tokens=1)
    assert "256" in e.value.message and "300" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_authentication():
    tmp = tempfile.mkdtemp()
    keyf = os.path.join(tmp, "api.key")
    with open(keyf, "w") as f:
        f.write("sk-right\n")
    p, url = start(["--model", FIXTURE, "--api-key-file", keyf])
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url, api_key="sk-right", max_retries=0)
        assert [m.id for m in ok.models.list()] == ["fx"]
    finally:
        p.kill()
        p.wait()
