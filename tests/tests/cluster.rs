//! The cluster end to end: an in-process head (`cluster::Cluster`) and `sinew worker` processes on
//! loopback. Pipelines of 1, 2 and 3 stages reproduce the single-node engine; workers without the
//! model receive their stage; killed, stopped and cut-off workers fail the requests in flight
//! within 2 s while the head keeps serving and takes the worker back when it returns.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cluster::{BatchOptions, Cluster, ClusterOptions};
use engine::gguf::{ExpertLayout, Quant, WriteOptions};
use engine::{DecodeParams, Event, LoadOptions, Loaded, Request, SamplingParams, Scheduler};
use sinew_tests::{Netns, Node, Proxy, Stream, can_make_namespaces, key_file};
use transport::{ClusterKey, LinkConfig, TransportChoice};

const FIXTURES: [&str; 5] = [
    "qwen3_moe_gqa",
    "qwen3_moe_sparse_step",
    "mixtral",
    "qwen3_dense",
    "llama_dense",
];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/fixtures")
        .join(name)
}

/// The fixture as an f32 GGUF file (the cluster serves GGUF), written once per test process.
fn fixture_gguf(name: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    let out = dir.path().join(format!("{name}.gguf"));
    if !out.exists() {
        let part = dir
            .path()
            .join(format!("{name}.{:?}.part", std::thread::current().id()));
        engine::gguf::convert_hf(
            &fixture_dir(name),
            &part,
            WriteOptions {
                quant: Quant::F32,
                experts: ExpertLayout::Stacked,
            },
        )
        .expect("converting the fixture");
        std::fs::rename(&part, &out).expect("renaming the converted fixture");
    }
    out
}

fn prompt_of(name: &str) -> Vec<u32> {
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir(name).join("reference.json")).expect("reference"),
    )
    .expect("reference json");
    r["prompt_ids"]
        .as_array()
        .expect("prompt ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn key(dir: &Path) -> (PathBuf, ClusterKey) {
    let path = key_file(dir, "cluster.key", 0x5a);
    let k = ClusterKey::load_file(&path).expect("key");
    (path, k)
}

fn head_opts(model: &Path, workers: Vec<String>, key: ClusterKey, cache: &Path) -> ClusterOptions {
    let mut link = LinkConfig::new(key);
    link.connect_timeout = Duration::from_secs(5);
    ClusterOptions {
        model: model.to_path_buf(),
        workers,
        link,
        ctx: Some(512),
        batch: BatchOptions {
            max_seqs: 8,
            prefill_chunk: 16,
            max_step_tokens: 64,
            max_queue: 64,
            queue_timeout: Duration::from_secs(60),
        },
        split: None,
        bf16: false,
        keep_warm: cluster::warm::DEFAULT_KEEP_WARM,
        cache_dir: cache.to_path_buf(),
        memory_limit: None,
        kv_memory: None,
        ops: cluster::Operations::default(),
    }
}

fn start(opts: ClusterOptions) -> Cluster {
    let c = Cluster::start(opts).expect("starting the head");
    assert!(
        c.wait_ready(Duration::from_secs(60)),
        "the cluster did not become ready: {:?}",
        c.state()
    );
    c
}

/// Stages of the plan that serves now.
fn stages(c: &Cluster) -> usize {
    c.state()
        .nodes
        .iter()
        .filter(|n| n.layers.is_some())
        .count()
}

/// Waits (up to 30 s) until a plan of `n` stages serves; `what` names what the test waits for.
fn wait_for_stages(c: &Cluster, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while stages(c) < n || !c.state().ready {
        assert!(Instant::now() < deadline, "{what}: {:?}", c.state());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn greedy(max_tokens: usize) -> DecodeParams {
    DecodeParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn sampled(max_tokens: usize, seed: u64) -> DecodeParams {
    DecodeParams {
        max_tokens,
        ignore_eos: true,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: Some(40),
            seed,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// What a request produced: its tokens and prompt logprobs, or the error and when it came.
#[derive(Debug)]
struct Outcome {
    tokens: Vec<u32>,
    prompt_lp: Option<Vec<Option<engine::TokenLogprob>>>,
    error: Option<(String, Instant)>,
}

fn drain(stream: &engine::Stream, deadline: Duration) -> Outcome {
    let end = Instant::now() + deadline;
    let mut o = Outcome {
        tokens: Vec::new(),
        prompt_lp: None,
        error: None,
    };
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match stream.recv_timeout(left) {
            Some(Event::Token(t)) => o.tokens.push(t.token),
            Some(Event::PromptLogprobs(lp)) => o.prompt_lp = Some(lp),
            Some(Event::Finished { .. }) => return o,
            Some(Event::Error(e)) => {
                o.error = Some((e.to_string(), Instant::now()));
                return o;
            }
            None => panic!("the request did not end within {deadline:?}"),
        }
    }
}

/// The single-node engine's answer: the whole model in this process, through its scheduler.
fn reference(model: &Path, prompt: &[u32], params: DecodeParams, lp: Option<usize>) -> Outcome {
    let m = Loaded::open(
        model,
        &LoadOptions {
            kv_memory: Some(64 << 20),
            ctx: Some(512),
            ..Default::default()
        },
    )
    .expect("loading the reference");
    let s = Scheduler::new(
        std::sync::Arc::new(m.model),
        std::sync::Arc::new(m.text),
        m.kv,
        Default::default(),
    )
    .expect("scheduler");
    let stream = s
        .submit(Request {
            prompt: prompt.to_vec(),
            params,
            prompt_logprobs: lp,
        })
        .expect("submit");
    drain(&stream, Duration::from_secs(120))
}

fn assert_same_logprobs(a: &[Option<engine::TokenLogprob>], b: &[Option<engine::TokenLogprob>]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        match (x, y) {
            (None, None) => {}
            (Some(x), Some(y)) => {
                assert_eq!(x.token, y.token);
                assert!(
                    (x.logprob - y.logprob).abs() <= 1e-5,
                    "prompt position {i}: {} vs {}",
                    x.logprob,
                    y.logprob
                );
                for (p, q) in x.top.iter().zip(&y.top) {
                    assert_eq!(p.0, q.0, "position {i}: top tokens differ");
                    assert!((p.1 - q.1).abs() <= 1e-5);
                }
            }
            _ => panic!("prompt position {i}: one side has no logprob"),
        }
    }
}

#[test]
fn one_two_and_three_stages_match_the_single_node_engine_on_every_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path());
    let (_w1, a1) = Node::worker(
        &kpath,
        "127.0.0.1:0",
        &["--cache-dir", &dir.path().join("w1").to_string_lossy()],
    );
    let (_w2, a2) = Node::worker(
        &kpath,
        "127.0.0.1:0",
        &["--cache-dir", &dir.path().join("w2").to_string_lossy()],
    );
    for name in FIXTURES {
        let model = fixture_gguf(name);
        let prompt = prompt_of(name);
        let want = reference(&model, &prompt, greedy(12), Some(3));
        for workers in [vec![], vec![a1.clone()], vec![a1.clone(), a2.clone()]] {
            let stages = workers.len() + 1;
            let c = start(head_opts(
                &model,
                workers,
                k.clone(),
                &dir.path().join("head"),
            ));
            let st = c.state();
            assert_eq!(
                st.nodes.iter().filter(|n| n.layers.is_some()).count(),
                stages,
                "{name}: {st:?}"
            );
            let stream = c
                .submit(Request {
                    prompt: prompt.clone(),
                    params: greedy(12),
                    prompt_logprobs: Some(3),
                })
                .unwrap();
            let got = drain(&stream, Duration::from_secs(60));
            assert!(
                got.error.is_none(),
                "{name}, {stages} stages: {:?}",
                got.error
            );
            assert_eq!(got.tokens, want.tokens, "{name}, {stages} stages");
            assert_same_logprobs(
                got.prompt_lp.as_deref().expect("prompt logprobs"),
                want.prompt_lp
                    .as_deref()
                    .expect("reference prompt logprobs"),
            );
        }
    }
}

#[test]
fn eight_concurrent_requests_through_three_stages_equal_their_single_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path());
    let (_w1, a1) = Node::worker(
        &kpath,
        "127.0.0.1:0",
        &["--cache-dir", &dir.path().join("w1").to_string_lossy()],
    );
    let (_w2, a2) = Node::worker(
        &kpath,
        "127.0.0.1:0",
        &["--cache-dir", &dir.path().join("w2").to_string_lossy()],
    );
    let name = "qwen3_moe_gqa";
    let model = fixture_gguf(name);
    let base = prompt_of(name);
    let c = start(head_opts(&model, vec![a1, a2], k, &dir.path().join("head")));
    // different prompt lengths, greedy and seeded
    let reqs: Vec<(Vec<u32>, DecodeParams)> = (0..8)
        .map(|i| {
            let prompt = base[..base.len() - i].to_vec();
            let params = if i % 2 == 0 {
                greedy(10)
            } else {
                sampled(10, 100 + i as u64)
            };
            (prompt, params)
        })
        .collect();
    let streams: Vec<_> = reqs
        .iter()
        .map(|(p, d)| {
            c.submit(Request {
                prompt: p.clone(),
                params: d.clone(),
                prompt_logprobs: None,
            })
            .unwrap()
        })
        .collect();
    let together: Vec<Outcome> = streams
        .iter()
        .map(|s| drain(s, Duration::from_secs(120)))
        .collect();
    for (i, ((p, d), got)) in reqs.iter().zip(&together).enumerate() {
        assert!(got.error.is_none(), "request {i}: {:?}", got.error);
        let alone = c
            .submit(Request {
                prompt: p.clone(),
                params: d.clone(),
                prompt_logprobs: None,
            })
            .unwrap();
        let alone = drain(&alone, Duration::from_secs(60));
        assert_eq!(
            got.tokens, alone.tokens,
            "request {i} differs from its single run"
        );
        let want = reference(&model, p, d.clone(), None);
        assert_eq!(
            got.tokens, want.tokens,
            "request {i} differs from the single-node engine"
        );
    }
}

#[test]
fn a_worker_without_the_model_receives_its_stage_once() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path());
    let cache = dir.path().join("w1");
    let model = fixture_gguf("llama_dense");
    let (mut w1, a1) = Node::worker(
        &kpath,
        "127.0.0.1:0",
        &["--cache-dir", &cache.to_string_lossy()],
    );
    {
        let c = start(head_opts(
            &model,
            vec![a1.clone()],
            k.clone(),
            &dir.path().join("head"),
        ));
        w1.wait_for(
            Stream::Stderr,
            "stage file received and checked",
            Duration::from_secs(10),
        );
        let s = c
            .submit(Request {
                prompt: prompt_of("llama_dense"),
                params: greedy(4),
                prompt_logprobs: None,
            })
            .unwrap();
        assert!(drain(&s, Duration::from_secs(60)).error.is_none());
    }
    let stages: Vec<_> = std::fs::read_dir(cache.join("stages")).unwrap().collect();
    assert_eq!(stages.len(), 1, "one stage file in the cache");
    drop(w1);
    // the same worker restarted: it loads from its cache, nothing is sent
    let (w1, _) = Node::worker(&kpath, &a1, &["--cache-dir", &cache.to_string_lossy()]);
    let c = start(head_opts(&model, vec![a1], k, &dir.path().join("head")));
    let s = c
        .submit(Request {
            prompt: prompt_of("llama_dense"),
            params: greedy(4),
            prompt_logprobs: None,
        })
        .unwrap();
    assert!(drain(&s, Duration::from_secs(60)).error.is_none());
    assert!(w1.printed(Stream::Stderr, "loading the stage from the cache"));
    assert!(!w1.printed(Stream::Stderr, "receiving the stage's tensors"));
}

/// How a worker is made to fail mid-generation.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Stop,
    Cut,
}

fn failure(fault: Fault) {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path());
    let name = "qwen3_moe_gqa";
    let model = fixture_gguf(name);
    let cut = matches!(fault, Fault::Cut);
    let transport: &[&str] = if cut { &["--transport", "tcp"] } else { &[] };
    let c1 = dir.path().join("w1");
    let mut args1 = vec!["--cache-dir", c1.to_str().unwrap()];
    args1.extend_from_slice(transport);
    let (w1, a1) = Node::worker(&kpath, "127.0.0.1:0", &args1);
    let proxy = Proxy::start(&a1);
    let first = if cut {
        proxy.addr().to_string()
    } else {
        a1.clone()
    };
    let mut opts = head_opts(&model, vec![first], k, &dir.path().join("head"));
    if cut {
        opts.link.transport = TransportChoice::Only(transport::TransportKind::TCP);
    }
    let c = start(opts);
    let prompt = prompt_of(name);
    // long requests, in flight when the worker fails
    let streams: Vec<_> = (0..3)
        .map(|_| {
            c.submit(Request {
                prompt: prompt.clone(),
                params: greedy(400),
                prompt_logprobs: None,
            })
            .unwrap()
        })
        .collect();
    for s in &streams {
        match s.recv_timeout(Duration::from_secs(30)) {
            Some(Event::Token(_)) => {}
            other => panic!("no first token: {other:?}"),
        }
    }
    let failed_at = Instant::now();
    let w1 = match fault {
        Fault::Kill => {
            w1.kill();
            None
        }
        Fault::Stop => {
            w1.signal("STOP");
            Some(w1)
        }
        Fault::Cut => {
            proxy.cut();
            Some(w1)
        }
    };
    for (i, s) in streams.iter().enumerate() {
        let o = drain(s, Duration::from_secs(10));
        let (msg, at) = o
            .error
            .unwrap_or_else(|| panic!("{fault:?}: request {i} did not fail"));
        let took = at.duration_since(failed_at);
        assert!(
            took < Duration::from_secs(2),
            "{fault:?}: request {i} failed after {took:?}: {msg}"
        );
        assert!(msg.contains("stage failed"), "{msg}");
    }
    // the head serves on alone: it re-plans over itself
    let deadline = Instant::now() + Duration::from_secs(30);
    let ok = loop {
        if let Ok(s) = c.submit(Request {
            prompt: prompt.clone(),
            params: greedy(4),
            prompt_logprobs: None,
        }) {
            let o = drain(&s, Duration::from_secs(30));
            if o.error.is_none() {
                break o;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the head did not serve again: {:?}",
            c.state()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ok.tokens.len(), 4);
    assert_eq!(stages(&c), 1);
    if cut {
        return;
    }
    // the worker comes back (a new process on the same address): the full plan returns
    drop(w1);
    let (_w1, _) = Node::worker(&kpath, &a1, &args1);
    wait_for_stages(&c, 2, "the worker did not rejoin");
    let s = c
        .submit(Request {
            prompt,
            params: greedy(4),
            prompt_logprobs: None,
        })
        .unwrap();
    assert!(drain(&s, Duration::from_secs(30)).error.is_none());
}

#[test]
fn a_killed_worker_fails_its_requests_within_two_seconds_and_rejoins() {
    failure(Fault::Kill);
}

#[test]
fn a_stopped_worker_fails_its_requests_within_two_seconds_and_rejoins() {
    failure(Fault::Stop);
}

#[test]
fn a_cut_off_worker_fails_its_requests_within_two_seconds() {
    failure(Fault::Cut);
}

#[test]
fn workers_may_start_before_or_after_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path());
    let model = fixture_gguf("qwen3_dense");
    let (_w1, a1) = Node::worker(
        &kpath,
        "127.0.0.1:0",
        &["--cache-dir", &dir.path().join("w1").to_string_lossy()],
    );
    let late = format!("127.0.0.1:{}", sinew_tests::free_port());
    let c = Cluster::start(head_opts(
        &model,
        vec![a1, late.clone()],
        k,
        &dir.path().join("head"),
    ))
    .unwrap();
    // the head serves with what it has, and takes the late worker in when it comes
    assert!(c.wait_ready(Duration::from_secs(60)), "{:?}", c.state());
    let (_w2, _) = Node::worker(
        &kpath,
        &late,
        &["--cache-dir", &dir.path().join("w2").to_string_lossy()],
    );
    wait_for_stages(&c, 3, "the late worker did not join");
    let s = c
        .submit(Request {
            prompt: prompt_of("qwen3_dense"),
            params: greedy(4),
            prompt_logprobs: None,
        })
        .unwrap();
    assert!(drain(&s, Duration::from_secs(30)).error.is_none());
}

#[test]
fn a_wrong_key_or_another_protocol_version_is_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path());
    let other = key_file(dir.path(), "other.key", 0x77);
    let model = fixture_gguf("qwen3_dense");
    let (_bad_key, a1) = Node::worker(
        &other,
        "127.0.0.1:0",
        &["--cache-dir", &dir.path().join("w1").to_string_lossy()],
    );
    let mut cmd = sinew_tests::sinew();
    cmd.env("SINEW_TEST_PROTOCOL_VERSION", "999")
        .args([
            "worker",
            "--threads",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--cluster-key-file",
        ])
        .arg(&kpath)
        .args(["--cache-dir", &dir.path().join("w2").to_string_lossy()]);
    let mut old = Node::spawn(cmd);
    let a2 = old.wait_for_line("worker listening on ", Duration::from_secs(60));
    let c = start(head_opts(
        &model,
        vec![a1.clone(), a2.clone()],
        k,
        &dir.path().join("head"),
    ));
    // neither joins; the head serves alone and says why
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = c.state();
        let e1 = st.nodes[1].error.clone().unwrap_or_default();
        let e2 = st.nodes[2].error.clone().unwrap_or_default();
        let ours = format!("v{}", cluster::wire::PROTOCOL_VERSION);
        let listed = |addr: &str, what: &str| {
            st.refused
                .iter()
                .any(|r| r.from == addr && r.reason.contains(what))
        };
        if e1.contains("wrong cluster key")
            && e2.contains("v999")
            && e2.contains(&ours)
            && listed(&a1, "wrong cluster key")
            && listed(&a2, "v999")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no clear refusal: {e1:?} / {e2:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    old.wait_for(Stream::Stderr, "protocol mismatch", Duration::from_secs(5));
    assert_eq!(stages(&c), 1);
}

#[test]
fn a_worker_in_another_network_namespace_over_shaped_veth_links() {
    if !can_make_namespaces() {
        eprintln!("skipped: needs root and iproute2 (ip netns, tc)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path());
    let name = "mixtral";
    let model = fixture_gguf(name);
    let prompt = prompt_of(name);
    let want = reference(&model, &prompt, greedy(12), Some(2));
    for (tag, rate) in [("a", "10gbit"), ("b", "1gbit")] {
        let ns = Netns::new(tag, rate);
        let (w, addr) = ns.worker(
            &kpath,
            &["--cache-dir", &dir.path().join(tag).to_string_lossy()],
        );
        let mut opts = head_opts(&model, vec![addr], k.clone(), &dir.path().join("head"));
        opts.link.transport = TransportChoice::Only(transport::TransportKind::TCP);
        let c = start(opts);
        let st = c.state();
        assert_eq!(st.nodes[1].link.as_deref(), Some("tcp"), "{st:?}");
        assert!(st.nodes[1].rtt_us.is_none_or(|r| r > 0.0));
        // the probe at join sees the shaping: 1 Gbit/s is 125 MB/s
        let bw = st.nodes[1].bytes_per_s.expect("measured at join");
        if rate == "1gbit" {
            assert!(bw < 200e6, "{rate}: measured {bw} B/s");
        }
        assert_eq!(st.links.len(), 2, "{st:?}");
        let s = c
            .submit(Request {
                prompt: prompt.clone(),
                params: greedy(12),
                prompt_logprobs: Some(2),
            })
            .unwrap();
        let got = drain(&s, Duration::from_secs(60));
        assert!(got.error.is_none(), "{rate}: {:?}", got.error);
        assert_eq!(got.tokens, want.tokens, "{rate}");
        assert_same_logprobs(
            got.prompt_lp.as_deref().unwrap(),
            want.prompt_lp.as_deref().unwrap(),
        );
        drop(c);
        drop(w);
    }
}

#[test]
fn a_stage_beside_the_head_is_reached_from_another_namespace() {
    if !can_make_namespaces() {
        eprintln!("skipped: needs root and iproute2 (ip netns, tc)");
        return;
    }
    // the head knows its neighbour worker as 127.0.0.1; the stage before it, in another network
    // namespace, must dial it at the head's address on its link instead
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path());
    let name = "qwen3_moe_sparse_step";
    let model = fixture_gguf(name);
    let prompt = prompt_of(name);
    let want = reference(&model, &prompt, greedy(8), None);
    let ns = Netns::new("c", "10gbit");
    let (_far, far) = ns.worker(
        &kpath,
        &["--cache-dir", &dir.path().join("far").to_string_lossy()],
    );
    let (_near, near) = Node::worker(
        &kpath,
        "0.0.0.0:0",
        &["--cache-dir", &dir.path().join("near").to_string_lossy()],
    );
    let port = near.rsplit(':').next().unwrap();
    let near = format!("127.0.0.1:{port}");
    let mut opts = head_opts(&model, vec![far, near], k, &dir.path().join("head"));
    opts.link.transport = TransportChoice::Only(transport::TransportKind::TCP);
    let c = start(opts);
    assert_eq!(stages(&c), 3, "{:?}", c.state());
    let s = c
        .submit(Request {
            prompt,
            params: greedy(8),
            prompt_logprobs: None,
        })
        .unwrap();
    let got = drain(&s, Duration::from_secs(60));
    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(got.tokens, want.tokens);
}

#[test]
fn a_restarted_head_finds_its_workers_still_running() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path());
    let name = "qwen3_moe_sparse_step";
    let model = fixture_gguf(name);
    let (w1, a1) = Node::worker(
        &kpath,
        "127.0.0.1:0",
        &["--cache-dir", &dir.path().join("w1").to_string_lossy()],
    );
    let req = || Request {
        prompt: prompt_of(name),
        params: greedy(6),
        prompt_logprobs: None,
    };
    let first = {
        let c = start(head_opts(
            &model,
            vec![a1.clone()],
            k.clone(),
            &dir.path().join("head"),
        ));
        let s = c.submit(req()).unwrap();
        drain(&s, Duration::from_secs(60))
    };
    // the first head is gone (dropped); a new one, same worker, no restart of it
    let started = Instant::now();
    let c = start(head_opts(&model, vec![a1], k, &dir.path().join("head")));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ready after {:?}",
        started.elapsed()
    );
    assert_eq!(stages(&c), 2);
    let s = c.submit(req()).unwrap();
    let again = drain(&s, Duration::from_secs(60));
    assert!(first.error.is_none() && again.error.is_none());
    assert_eq!(first.tokens, again.tokens);
    // the worker kept its stage: it did not load it again
    assert!(w1.printed(Stream::Stderr, "stage ready (weights kept)"));
}

#[test]
fn a_kv_cache_too_big_for_the_nodes_shrinks_to_what_fits() {
    let dir = tempfile::tempdir().unwrap();
    let (_, k) = key(dir.path());
    let model = fixture_gguf("qwen3_dense");
    let l = engine::stage_file::layout(&model).unwrap();
    let sv = cluster::Serving::new(512, 8, 64);
    let fixed = l.total_bytes() + cluster::plan::act_bytes(&l, &sv, true);
    let per_token = cluster::plan::kv_bytes_per_layer_token(&l) * l.layer_bytes.len() as u64;
    let mut opts = head_opts(&model, vec![], k, &dir.path().join("head"));
    // room for the weights and 1500 positions, not for 8 × 512
    opts.memory_limit = Some(fixed + per_token * 1500);
    let c = start(opts);
    let cap = c.state().kv_capacity_tokens;
    assert!((512..=1500).contains(&cap), "capacity {cap}");
    let s = c
        .submit(Request {
            prompt: prompt_of("qwen3_dense"),
            params: greedy(4),
            prompt_logprobs: None,
        })
        .unwrap();
    assert!(drain(&s, Duration::from_secs(30)).error.is_none());
}
