//! `sinew serve` over HTTP: a single node on a committed fixture and a head with two workers, driven
//! as a client would — every route, streamed and not, usage, stop strings, seeds, logprobs, `n`,
//! `echo`, each error with its status and envelope, the API key, a client that goes away
//! mid-stream, 16 concurrent streams, and a worker killed mid-stream.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sinew_tests::{Node, key_file};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/fixtures")
        .join(name)
}

fn prompt_ids(name: &str) -> Vec<u32> {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("reference.json")).unwrap(),
    )
    .unwrap();
    r["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .build()
        .new_agent()
}

/// A request's status, headers of interest and JSON body.
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

fn call(method: &str, url: &str, body: Option<Value>, key: Option<&str>) -> Reply {
    let a = agent();
    let auth = key.map(|k| format!("Bearer {k}"));
    let resp = match (method, body) {
        ("GET", _) => {
            let mut r = a.get(url);
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.call()
        }
        (_, b) => {
            let mut r = a.post(url).header("Content-Type", "application/json");
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.send(b.map_or_else(String::new, |b| b.to_string()))
        }
    };
    let mut resp = resp.expect("the server answers");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.body_mut().read_to_string().unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        retry_after,
        body,
    }
}

fn post(url: &str, body: Value) -> Reply {
    call("POST", url, Some(body), None)
}

fn post_raw(url: &str, body: &str) -> Reply {
    let mut resp = agent()
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    Reply {
        status,
        retry_after: None,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// The data lines of a streamed response, up to `[DONE]` (included).
fn stream(url: &str, body: Value) -> Vec<String> {
    let mut resp = agent()
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let reader = BufReader::new(resp.body_mut().as_reader());
    let mut out = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            out.push(d.to_string());
            if d == "[DONE]" {
                break;
            }
        }
    }
    out
}

fn assert_error(r: &Reply, status: u16, param: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.body);
    let e = &r.body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.body
    );
    assert!(e["type"].as_str().is_some(), "{}", r.body);
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{}",
        r.body
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{}", r.body);
    }
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": "fx", "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn completion_text(lines: &[String]) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut reasons = Vec::new();
    for l in lines {
        if l == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(l).unwrap();
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["text"].as_str() {
                text.push_str(t);
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(r) = c["finish_reason"].as_str() {
                reasons.push(r.to_string());
            }
        }
    }
    (text, reasons)
}

#[test]
fn a_single_node_serves_every_route() {
    let name = "qwen3_moe_gqa";
    let (_node, url) = Node::serve(&[
        "--model",
        fixture(name).to_str().unwrap(),
        "--model-id",
        "fx",
        "--ctx",
        "256",
        "--max-seqs",
        "16",
    ]);
    let base = url.trim_end_matches("/v1");
    // health, models
    let h = call("GET", &format!("{base}/health"), None, None);
    assert_eq!((h.status, h.body["status"].as_str()), (200, Some("ready")));
    let m = call("GET", &format!("{url}/models"), None, None);
    assert_eq!(m.body["data"][0]["id"], "fx");
    assert_eq!(
        call("GET", &format!("{url}/models/fx"), None, None).body["id"],
        "fx"
    );
    assert_error(
        &call("GET", &format!("{url}/models/other"), None, None),
        404,
        None,
    );
    assert_error(
        &call("GET", &format!("{base}/nowhere"), None, None),
        404,
        None,
    );
    assert_eq!(
        call("GET", &format!("{url}/chat/completions"), None, None).status,
        405
    );

    // completions: greedy continuation of the fixture's prompt, streamed and not, agree
    let ids = prompt_ids(name);
    let body = json!({"model": "fx", "prompt": ids, "max_tokens": 12, "temperature": 0});
    let r = post(&format!("{url}/completions"), body.clone());
    assert_eq!(r.status, 200, "{}", r.body);
    let text = r.body["choices"][0]["text"].as_str().unwrap().to_string();
    let usage = &r.body["usage"];
    assert_eq!(usage["prompt_tokens"], ids.len());
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion_tokens));
    assert_eq!(usage["total_tokens"], ids.len() as u64 + completion_tokens);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let lines = stream(&format!("{url}/completions"), sb);
    assert_eq!(lines.last().unwrap(), "[DONE]");
    let (streamed, reasons) = completion_text(&lines);
    assert_eq!(streamed, text);
    assert_eq!(reasons.len(), 1, "one finish_reason");
    let last: Value = serde_json::from_str(&lines[lines.len() - 2]).unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], completion_tokens);

    // the same continuation against the single-node engine (sinew generate)
    let out = sinew_tests::sinew()
        .args([
            "generate",
            "--model",
            fixture(name).to_str().unwrap(),
            "--json",
            "--max-tokens",
            "12",
            "--prompt-ids",
        ])
        .arg(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
        .output()
        .unwrap();
    let g: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(g["text"].as_str().unwrap(), text);

    // echo with logprobs and no new token: the prompt's log-likelihood
    let r = post(
        &format!("{url}/completions"),
        json!({"model": "fx", "prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let lp = &r.body["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), ids.len());
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].as_f64().unwrap() <= 0.0);
    assert_eq!(lp["top_logprobs"][1].as_object().unwrap().len(), 2);
    assert_eq!(r.body["usage"]["completion_tokens"], 0);

    // a stop string cuts the text before it
    if text.chars().count() > 4 {
        let cut: String = text.chars().skip(2).take(2).collect();
        let r = post(
            &format!("{url}/completions"),
            json!({"model": "fx", "prompt": ids, "max_tokens": 12, "temperature": 0, "stop": [cut.clone()]}),
        );
        let t = r.body["choices"][0]["text"].as_str().unwrap();
        assert!(!t.contains(&cut), "{t:?} still holds {cut:?}");
        assert_eq!(r.body["choices"][0]["finish_reason"], "stop");
    }

    // chat: seeds repeat, n gives n choices, logprobs per token
    let c = |extra: Value| {
        post(
            &format!("{url}/chat/completions"),
            chat_body("hello there", extra),
        )
    };
    let a = c(json!({"max_tokens": 8, "temperature": 0.9, "seed": 5}));
    let b = c(json!({"max_tokens": 8, "temperature": 0.9, "seed": 5}));
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body["choices"][0]["message"],
        b.body["choices"][0]["message"]
    );
    assert_eq!(a.body["choices"][0]["message"]["role"], "assistant");
    let n = c(json!({"max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 1}));
    assert_eq!(n.body["choices"].as_array().unwrap().len(), 3);
    let l = c(json!({"max_tokens": 4, "logprobs": true, "top_logprobs": 3}));
    let content = l.body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        content.len() as u64,
        l.body["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
    // chat streaming: the role first, one finish_reason, [DONE]
    let lines = stream(
        &format!("{url}/chat/completions"),
        chat_body("hi", json!({"max_tokens": 5, "stream": true})),
    );
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(completion_text(&lines).1.len(), 1);

    // errors: each with its status, envelope and field
    let chat_url = format!("{url}/chat/completions");
    assert_error(&post_raw(&chat_url, "{not json"), 400, None);
    assert_error(
        &post(&chat_url, json!({"messages": []})),
        400,
        Some("model"),
    );
    assert_error(
        &post(&chat_url, chat_body("x", json!({"temperature": 3}))),
        400,
        Some("temperature"),
    );
    assert_error(
        &post(&chat_url, chat_body("x", json!({"max_tokens": -1}))),
        400,
        Some("max_tokens"),
    );
    assert_error(
        &post(
            &chat_url,
            chat_body("x", json!({"tools": [{"type": "function"}]})),
        ),
        400,
        Some("tools"),
    );
    assert_error(
        &post(
            &chat_url,
            chat_body("x", json!({"response_format": {"type": "json_object"}})),
        ),
        400,
        Some("response_format"),
    );
    assert_error(
        &post(&chat_url, chat_body("x", json!({"n": "two"}))),
        400,
        Some("n"),
    );
    let mut wrong = chat_body("x", json!({}));
    wrong["model"] = json!("nope");
    assert_error(&post(&chat_url, wrong), 404, Some("model"));
    let long: Vec<u32> = ids.iter().cycle().take(300).copied().collect();
    let r = post(
        &format!("{url}/completions"),
        json!({"model": "fx", "prompt": long, "max_tokens": 1}),
    );
    assert_error(&r, 400, Some("prompt"));
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("256") && msg.contains("300"), "{msg}");
}

#[test]
fn concurrent_streams_disconnects_and_the_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let keyf = dir.path().join("api.key");
    std::fs::write(&keyf, "sk-test-123\n").unwrap();
    let (_node, url) = Node::serve(&[
        "--model",
        fixture("qwen3_dense").to_str().unwrap(),
        "--model-id",
        "fx",
        "--ctx",
        "512",
        "--max-seqs",
        "16",
        "--api-key-file",
        keyf.to_str().unwrap(),
    ]);
    let base = url.trim_end_matches("/v1");
    let key = Some("sk-test-123");
    // the key: absent or wrong is 401, /health needs none
    assert_eq!(
        call("GET", &format!("{base}/health"), None, None).status,
        200
    );
    assert_error(
        &call("GET", &format!("{url}/models"), None, None),
        401,
        None,
    );
    assert_error(
        &call("GET", &format!("{url}/models"), None, Some("sk-wrong")),
        401,
        None,
    );
    assert_eq!(call("GET", &format!("{url}/models"), None, key).status, 200);
    let metrics = call("GET", &format!("{base}/metrics"), None, key);
    assert!(
        metrics
            .body
            .as_str()
            .unwrap()
            .contains("sinew_http_requests_total")
    );
    // 16 concurrent streams, each to its end
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut resp = agent()
                    .post(format!("{url}/chat/completions"))
                    .header("Authorization", "Bearer sk-test-123")
                    .send(
                        chat_body(
                            &format!("request {i}"),
                            json!({"max_tokens": 16, "stream": true}),
                        )
                        .to_string(),
                    )
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 200);
                let lines: Vec<String> = BufReader::new(resp.body_mut().as_reader())
                    .lines()
                    .map(Result::unwrap)
                    .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
                    .collect();
                assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // a client that goes away mid-stream frees its sequence at once
    {
        let mut resp = agent()
            .post(format!("{url}/chat/completions"))
            .header("Authorization", "Bearer sk-test-123")
            .send(
                chat_body(
                    "go on",
                    json!({"max_tokens": 400, "stream": true, "ignore_eos": true}),
                )
                .to_string(),
            )
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let mut lines = BufReader::new(resp.body_mut().as_reader()).lines();
        for _ in 0..6 {
            lines.next();
        }
        let st = call("GET", &format!("{url}/cluster"), None, key);
        assert_eq!(st.body["running"], 1, "{}", st.body);
    }
    let gone = Instant::now();
    loop {
        let st = call("GET", &format!("{url}/cluster"), None, key);
        if st.body["running"] == 0 {
            break;
        }
        assert!(
            gone.elapsed() < Duration::from_secs(2),
            "the sequence still runs: {}",
            st.body
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_head_with_two_workers_serves_and_fails_cleanly_when_one_dies() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "cluster.key", 0x33);
    let name = "mixtral";
    let gguf = dir.path().join("m.gguf");
    let out = sinew_tests::sinew()
        .args([
            "gguf",
            "convert",
            fixture(name).to_str().unwrap(),
            "--quant",
            "f32",
            "--out",
        ])
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (w1, a1) = Node::worker(
        &k,
        "127.0.0.1:0",
        &["--cache-dir", &dir.path().join("w1").to_string_lossy()],
    );
    let (_w2, a2) = Node::worker(
        &k,
        "127.0.0.1:0",
        &["--cache-dir", &dir.path().join("w2").to_string_lossy()],
    );
    let (_single, single_url) = Node::serve(&[
        "--model",
        gguf.to_str().unwrap(),
        "--model-id",
        "fx",
        "--ctx",
        "512",
    ]);
    let (_head, url) = Node::serve(&[
        "--model",
        gguf.to_str().unwrap(),
        "--model-id",
        "fx",
        "--ctx",
        "512",
        "--workers",
        &format!("{a1},{a2}"),
        "--cluster-key-file",
        k.to_str().unwrap(),
        "--cache-dir",
        &dir.path().join("head").to_string_lossy(),
    ]);
    let st = call("GET", &format!("{url}/cluster"), None, None);
    let stages = st.body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["layers"].is_null())
        .count();
    assert_eq!(stages, 3, "{}", st.body);
    let ids = prompt_ids(name);
    let body = json!({"model": "fx", "prompt": ids, "max_tokens": 12, "temperature": 0, "logprobs": 1, "echo": true});
    let a = post(&format!("{single_url}/completions"), body.clone());
    let b = post(&format!("{url}/completions"), body);
    assert_eq!(a.body["choices"][0]["text"], b.body["choices"][0]["text"]);
    assert_eq!(
        a.body["choices"][0]["logprobs"]["tokens"],
        b.body["choices"][0]["logprobs"]["tokens"]
    );
    assert_eq!(a.body["usage"], b.body["usage"]);
    // every stage reports its step time and what it sent on
    let m = call(
        "GET",
        &format!("{}/metrics", url.trim_end_matches("/v1")),
        None,
        None,
    );
    let text = m.body.as_str().unwrap().to_string();
    for k in 0..3 {
        assert!(
            text.contains(&format!("sinew_stage_step_seconds{{stage=\"{k}\"}}")),
            "{text}"
        );
    }
    assert!(text.contains("sinew_node_up{node=\"head\"} 1"), "{text}");
    assert_eq!(st.body["links"].as_array().unwrap().len(), 3, "{}", st.body);
    // sinew status prints it as a table
    let out = sinew_tests::sinew()
        .args(["status", "--url", url.trim_end_matches("/v1")])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("ready") && table.contains(&a1) && table.contains("stage 2:"),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.starts_with("link ")).count(),
        3,
        "{table}"
    );
    assert!(
        text.contains("sinew_pipeline_link_bandwidth_bytes_per_second"),
        "{text}"
    );
    // a worker killed mid-stream: the stream ends with an error event within 2 s
    let mut resp = agent()
        .post(format!("{url}/chat/completions"))
        .send(
            chat_body(
                "go on",
                json!({"max_tokens": 400, "stream": true, "ignore_eos": true}),
            )
            .to_string(),
        )
        .unwrap();
    let mut lines = BufReader::new(resp.body_mut().as_reader()).lines();
    for _ in 0..4 {
        lines.next();
    }
    let killed = Instant::now();
    drop(w1.kill());
    let mut error = None;
    for l in lines {
        let l = l.unwrap();
        if let Some(d) = l.strip_prefix("data: ")
            && d.contains("\"error\"")
        {
            error = Some(d.to_string());
            break;
        }
    }
    let took = killed.elapsed();
    let e = error.expect("an error event");
    assert!(
        took < Duration::from_secs(2),
        "the error came after {took:?}"
    );
    assert!(e.contains("stage failed") || e.contains("worker"), "{e}");
    // the head keeps serving (over what is left)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = post(
            &format!("{url}/chat/completions"),
            chat_body("again", json!({"max_tokens": 3})),
        );
        if r.status == 200 {
            break;
        }
        assert!(
            r.status == 503 && r.retry_after.is_some(),
            "{} {}",
            r.status,
            r.body
        );
        assert!(Instant::now() < deadline, "the head did not serve again");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A small deterministic generator for the fuzzed bodies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 2 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => json!(self.below(2) == 0),
            2 => json!(self.below(600) as i64 - 300),
            3 => json!((self.below(1000) as f64 - 500.0) / 37.0),
            4 => json!(["x", "stop", "", "\u{1f600}", "{", "user"][self.below(6) as usize]),
            5 => json!("a".repeat(self.below(40) as usize)),
            6 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            _ => {
                let keys = [
                    "role",
                    "content",
                    "type",
                    "text",
                    "include_usage",
                    "name",
                    "model",
                ];
                Value::Object(
                    (0..self.below(4))
                        .map(|_| {
                            (
                                keys[self.below(keys.len() as u64) as usize].to_string(),
                                self.value(depth + 1),
                            )
                        })
                        .collect(),
                )
            }
        }
    }
}

#[test]
fn arbitrary_bodies_never_get_a_5xx() {
    let (_node, url) = Node::serve(&[
        "--model",
        fixture("llama_dense").to_str().unwrap(),
        "--model-id",
        "fx",
        "--ctx",
        "128",
    ]);
    let fields = [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "echo",
        "presence_penalty",
        "frequency_penalty",
        "best_of",
        "suffix",
        "tools",
        "user",
        "ignore_eos",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..300 {
        let route = if i % 2 == 0 {
            "chat/completions"
        } else {
            "completions"
        };
        let mut body = json!({
            "model": "fx",
            "messages": [{"role": "user", "content": "hi"}],
            "prompt": "hi",
            "max_tokens": 3,
        });
        for _ in 0..rng.below(4) + 1 {
            let f = fields[rng.below(fields.len() as u64) as usize];
            if rng.below(4) == 0 {
                body.as_object_mut().unwrap().remove(f);
            } else {
                body[f] = rng.value(0);
            }
        }
        // keep generation short: the point is the parser and the error paths
        if body["max_tokens"].as_i64().is_some_and(|m| m > 8) || body["max_tokens"].is_null() {
            body["max_tokens"] = json!(3);
        }
        body.as_object_mut()
            .unwrap()
            .remove("max_completion_tokens");
        if body["stream"] == json!(true) {
            body["stream"] = json!(false);
        }
        let r = post(&format!("{url}/{route}"), body.clone());
        assert!(r.status < 500, "{route} {body}: {} {}", r.status, r.body);
        if r.status != 200 {
            assert_error(&r, r.status, None);
        }
    }
    for raw in [
        "",
        "null",
        "[]",
        "\"x\"",
        "{\"model\":",
        "{}",
        "\u{0}",
        "{\"model\": \"fx\", \"prompt\": [[[]]]}",
    ] {
        for route in ["chat/completions", "completions"] {
            let r = post_raw(&format!("{url}/{route}"), raw);
            assert!(
                r.status < 500 && r.status >= 400,
                "{route} {raw:?}: {} {}",
                r.status,
                r.body
            );
        }
    }
    // a body over the limit: 413 in the envelope
    let huge = format!(
        "{{\"model\": \"fx\", \"prompt\": \"{}\"}}",
        "a".repeat(33 << 20)
    );
    let r = post_raw(&format!("{url}/completions"), &huge);
    assert_error(&r, 413, None);
    let h = call(
        "GET",
        &format!("{}/health", url.trim_end_matches("/v1")),
        None,
        None,
    );
    assert_eq!(h.status, 200);
}

#[test]
fn the_demo_answers_and_stops_every_process_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = sinew_tests::sinew();
    cmd.env("XDG_CACHE_HOME", dir.path()).args([
        "demo",
        "--http",
        "127.0.0.1:0",
        "--max-tokens",
        "8",
    ]);
    let mut demo = Node::spawn(cmd);
    demo.wait_for(
        sinew_tests::Stream::Stdout,
        "try it",
        Duration::from_secs(300),
    );
    assert!(demo.printed(sinew_tests::Stream::Stdout, "tokens"));
    assert!(demo.printed(sinew_tests::Stream::Stdout, "127.0.0.1"));
    let workers: Vec<String> = (1..=2)
        .map(|i| {
            let line = demo.wait_for(
                sinew_tests::Stream::Stdout,
                &format!("worker {i} at "),
                Duration::from_secs(1),
            );
            line.split(" at ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    demo.signal("INT");
    let status = demo
        .wait_exit(Duration::from_secs(20))
        .expect("the demo stops on SIGINT");
    assert!(status.success(), "{status}");
    for w in workers {
        let gone = Instant::now();
        while std::net::TcpStream::connect(&w).is_ok() {
            assert!(
                gone.elapsed() < Duration::from_secs(5),
                "worker {w} still listens"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_full_queue_is_a_429_with_retry_after() {
    let (_node, url) = Node::serve(&[
        "--model",
        fixture("llama_dense").to_str().unwrap(),
        "--model-id",
        "fx",
        "--ctx",
        "512",
        "--max-seqs",
        "1",
        "--max-queue",
        "1",
    ]);
    let long = || {
        let url = url.clone();
        std::thread::spawn(move || {
            post(
                &format!("{url}/chat/completions"),
                chat_body("busy", json!({"max_tokens": 400, "ignore_eos": true})),
            )
            .status
        })
    };
    // one runs, one waits: the queue is full (the second is sent once the first runs: sent
    // together, the second could find the first still queued and be the one refused)
    let deadline = Instant::now() + Duration::from_secs(30);
    let wait_for = |running: u64, queued: u64| loop {
        let st = call("GET", &format!("{url}/cluster"), None, None);
        if st.body["running"] == running && st.body["queued"] == queued {
            break;
        }
        assert!(Instant::now() < deadline, "{}", st.body);
        std::thread::sleep(Duration::from_millis(10));
    };
    let running = long();
    wait_for(1, 0);
    let waiting = long();
    wait_for(1, 1);
    let r = post(
        &format!("{url}/chat/completions"),
        chat_body("one more", json!({"max_tokens": 2})),
    );
    assert_error(&r, 429, None);
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    assert_eq!(running.join().unwrap(), 200);
    assert_eq!(waiting.join().unwrap(), 200);
}
