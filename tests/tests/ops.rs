//! Cluster operations end to end: an in-process head (`cluster::Cluster`) and `sinew worker`
//! processes. Discovery adds an announced worker and refuses other keys and replays; nodes that
//! share an id are told apart; departed workers leave the state; a worker in another network
//! namespace is discovered; a throttled veth link gets a warning naming both nodes.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::discovery::{Announcement, now_ms};
use cluster::{BatchOptions, Cluster, ClusterOptions, ClusterState, Operations};
use engine::gguf::{ExpertLayout, Quant, WriteOptions};
use sinew_tests::{Netns, Node, Stream, can_make_namespaces, key_file};
use transport::{ClusterKey, LinkConfig, TransportChoice};

fn model(dir: &Path) -> PathBuf {
    let out = dir.join("model.gguf");
    engine::gguf::convert_hf(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/fixtures/qwen3_moe_gqa"),
        &out,
        WriteOptions {
            quant: Quant::F32,
            experts: ExpertLayout::Stacked,
        },
    )
    .expect("converting the fixture");
    out
}

fn key(dir: &Path, byte: u8) -> (PathBuf, ClusterKey) {
    let path = key_file(dir, &format!("cluster-{byte}.key"), byte);
    let k = ClusterKey::load_file(&path).expect("key");
    (path, k)
}

fn opts(
    model: &Path,
    workers: Vec<String>,
    key: ClusterKey,
    dir: &Path,
    ops: Operations,
) -> ClusterOptions {
    let mut link = LinkConfig::new(key);
    link.connect_timeout = Duration::from_secs(5);
    ClusterOptions {
        model: model.to_path_buf(),
        workers,
        link,
        ctx: Some(256),
        batch: BatchOptions {
            max_seqs: 2,
            prefill_chunk: 16,
            max_step_tokens: 32,
            max_queue: 16,
            queue_timeout: Duration::from_secs(60),
        },
        split: None,
        bf16: false,
        keep_warm: cluster::warm::DEFAULT_KEEP_WARM,
        cache_dir: dir.join("head"),
        memory_limit: None,
        kv_memory: None,
        ops,
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port()
}

/// Operations that discover workers announcing to `port`.
fn discovering(port: u16) -> Operations {
    Operations {
        discover: Some(port),
        ..Operations::default()
    }
}

/// A worker on loopback announcing to `port`, caching in `dir/name`: the node and its address.
fn announcing_worker(key: &Path, dir: &Path, name: &str, port: u16) -> (Node, String) {
    Node::worker(
        key,
        "127.0.0.1:0",
        &[
            "--cache-dir",
            &dir.join(name).to_string_lossy(),
            "--discovery-port",
            &port.to_string(),
        ],
    )
}

fn stages(st: &ClusterState) -> usize {
    st.nodes.iter().filter(|n| n.layers.is_some()).count()
}

/// Waits up to `timeout` for `ok` on the head's state; panics naming `what` with the state.
fn wait_for(
    c: &Cluster,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&ClusterState) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let st = c.state();
        if ok(&st) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}: {st:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(o: ClusterOptions) -> Cluster {
    let c = Cluster::start(o).expect("starting the head");
    assert!(
        c.wait_ready(Duration::from_secs(60)),
        "not ready: {:?}",
        c.state()
    );
    c
}

#[test]
fn discovery_adds_announced_workers_refuses_strangers_and_replays_and_forgets_the_departed() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path(), 0x5a);
    let (other_path, other) = key(dir.path(), 0x33);
    let m = model(dir.path());
    let port = free_udp_port();
    let ops = Operations {
        forget_after: Duration::from_secs(3),
        ..discovering(port)
    };
    let c = start(opts(&m, Vec::new(), k.clone(), dir.path(), ops));
    // a worker of another cluster announces too: never added
    let (_stranger, _) = announcing_worker(&other_path, dir.path(), "s", port);
    let (w, addr) = announcing_worker(&kpath, dir.path(), "w", port);
    let took = wait_for(
        &c,
        Duration::from_secs(20),
        "the announced worker serving",
        |st| {
            stages(st) == 2
                && st
                    .nodes
                    .iter()
                    .any(|n| n.addr == addr && n.up && n.discovered)
        },
    );
    eprintln!("discovered and serving {took:?} after the worker listened");
    // 50 announcements under another key: refused, none added
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for seq in 0..50 {
        let a = Announcement {
            node_id: format!("{seq:016x}"),
            port: 9,
            version: cluster::wire::PROTOCOL_VERSION,
            hostname: "stranger".into(),
            time_ms: now_ms(),
            seq,
            instance: 1,
        };
        sock.send_to(&a.seal(&other), ("127.0.0.1", port)).unwrap();
    }
    wait_for(
        &c,
        Duration::from_secs(10),
        "50 forged announcements refused",
        |st| {
            st.refused
                .iter()
                .any(|r| r.reason.contains("signature") && r.count >= 50)
        },
    );
    // a replay of a valid announcement
    let ghost = Announcement {
        node_id: "feedfacefeedface".into(),
        port: free_udp_port(),
        version: cluster::wire::PROTOCOL_VERSION,
        hostname: "ghost".into(),
        time_ms: now_ms(),
        seq: 1,
        instance: 7,
    }
    .seal(&k);
    sock.send_to(&ghost, ("127.0.0.1", port)).unwrap();
    sock.send_to(&ghost, ("127.0.0.1", port)).unwrap();
    wait_for(&c, Duration::from_secs(10), "the replay refused", |st| {
        st.refused.iter().any(|r| r.reason.contains("replayed"))
    });
    let st = c.state();
    assert!(
        st.nodes.iter().all(|n| n.hostname != "stranger"),
        "a stranger was added: {st:#?}"
    );
    assert_eq!(st.nodes.iter().filter(|n| n.up).count(), 2, "{st:#?}");
    // the worker leaves for good: it and the ghost (never up) leave the state
    drop(w);
    wait_for(
        &c,
        Duration::from_secs(20),
        "the departed nodes gone",
        |st| st.nodes.len() == 1 && stages(st) == 1 && st.ready,
    );
}

#[test]
fn nodes_that_share_an_id_are_told_apart_and_warned() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path(), 0x5a);
    let m = model(dir.path());
    let (d1, d2) = (dir.path().join("w1"), dir.path().join("w2"));
    let (_w1, a1) = Node::worker(
        &kpath,
        "127.0.0.1:0",
        &["--no-announce", "--cache-dir", &d1.to_string_lossy()],
    );
    // a copied cache directory: the same id
    std::fs::create_dir_all(&d2).unwrap();
    std::fs::copy(d1.join("node-id"), d2.join("node-id")).unwrap();
    let (_w2, a2) = Node::worker(
        &kpath,
        "127.0.0.1:0",
        &["--no-announce", "--cache-dir", &d2.to_string_lossy()],
    );
    let c = start(opts(
        &m,
        vec![a1.clone(), a2.clone()],
        k,
        dir.path(),
        Operations::default(),
    ));
    wait_for(
        &c,
        Duration::from_secs(30),
        "both serving, each warned of the other",
        |st| {
            let n1 = st.nodes.iter().find(|n| n.addr == a1);
            let n2 = st.nodes.iter().find(|n| n.addr == a2);
            match (n1, n2) {
                (Some(n1), Some(n2)) => {
                    stages(st) == 3
                        && n1.id == n2.id
                        && n1.warning.as_deref().is_some_and(|w| w.contains(&a2))
                        && n2.warning.as_deref().is_some_and(|w| w.contains(&a1))
                }
                _ => false,
            }
        },
    );
}

/// A head discovers a worker started in a new network namespace (`tag`), IPv4 and IPv6 on its
/// link or IPv6 link-local only; returns how long after the worker listened it served, and the
/// head's state then.
fn discovered_in_a_namespace(tag: &str, ipv6_only: bool) -> (Duration, ClusterState) {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path(), 0x5a);
    let m = model(dir.path());
    let port = free_udp_port();
    let ns = Netns::new(tag, "10gbit");
    if ipv6_only {
        // no broadcast reaches the head then, only the IPv6 group does
        ns.ipv6_only();
    }
    let mut o = opts(&m, Vec::new(), k, dir.path(), discovering(port));
    o.link.transport = TransportChoice::Only(transport::TransportKind::TCP);
    let c = start(o);
    let listen = if ipv6_only {
        "[::]:0".to_string()
    } else {
        format!("{}:0", ns.host)
    };
    let (_w, addr) = ns.worker_at(
        &listen,
        &kpath,
        &[
            "--discovery-port",
            &port.to_string(),
            "--cache-dir",
            &dir.path().join("w").to_string_lossy(),
        ],
    );
    let took = wait_for(
        &c,
        Duration::from_secs(20),
        "the namespaced worker serving",
        |st| {
            st.ready
                && stages(st) == 2
                && st.nodes.iter().any(|n| {
                    n.up && n.layers.is_some()
                        && if ipv6_only {
                            n.addr.starts_with("[fe80::")
                        } else {
                            n.addr == addr
                        }
                })
        },
    );
    (took, c.state())
}

#[test]
fn a_worker_in_another_network_namespace_is_discovered() {
    if !can_make_namespaces() {
        eprintln!("skipped: needs root and iproute2 (ip netns, tc)");
        return;
    }
    let (took, _) = discovered_in_a_namespace("c", false);
    eprintln!("discovered across namespaces and serving in {took:?}");
}

#[test]
fn a_worker_on_an_ipv6_link_local_only_link_is_discovered_and_serves() {
    if !can_make_namespaces() || !Path::new("/proc/sys/net/ipv6").exists() {
        eprintln!("skipped: needs root, iproute2 (ip netns, tc) and IPv6");
        return;
    }
    // link-local addresses pass duplicate detection (about a second) before they announce
    let (took, st) = discovered_in_a_namespace("e", true);
    eprintln!("discovered over IPv6 link-local and serving in {took:?}");
    assert_eq!(st.nodes.len(), 2, "one member per worker process: {st:#?}");
}

#[test]
fn a_throttled_link_gets_a_warning_naming_both_nodes() {
    if !can_make_namespaces() {
        eprintln!("skipped: needs root and iproute2 (ip netns, tc)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path(), 0x5a);
    let m = model(dir.path());
    let ns = Netns::new("d", "1gbit");
    let (_w, addr) = ns.worker(
        &kpath,
        &[
            "--no-announce",
            "--cache-dir",
            &dir.path().join("w").to_string_lossy(),
        ],
    );
    let mut o = opts(
        &m,
        vec![addr.clone()],
        k,
        dir.path(),
        Operations {
            watch_every: Duration::from_secs(1),
            ..Operations::default()
        },
    );
    o.link.transport = TransportChoice::Only(transport::TransportKind::TCP);
    let c = start(o);
    // healthy first: samples taken, no warning
    wait_for(&c, Duration::from_secs(30), "healthy samples", |st| {
        st.links.len() == 2
            && st
                .links
                .iter()
                .all(|l| l.samples >= 2 && l.warning.is_none())
    });
    // 30% of the rate, both ways
    ns.shape("change", "300mbit");
    let took = wait_for(
        &c,
        Duration::from_secs(30),
        "a warning naming both nodes",
        |st| {
            st.links.iter().any(|l| {
                l.warning.as_deref().is_some_and(|w| {
                    w.contains("head") && w.contains(&addr) && w.contains("baseline")
                })
            })
        },
    );
    eprintln!("warned {took:?} after the throttle");
    assert!(c.state().ready);
    // 2% of the rate: no longer usable, and the head alone holds the model: it re-plans without
    // the worker (slow probes are not taken for a dead worker)
    ns.shape("change", "20mbit");
    let took = wait_for(
        &c,
        Duration::from_secs(90),
        "a re-plan around the unusable link",
        |st| {
            st.ready
                && stages(st) == 1
                && st.nodes.iter().any(|n| {
                    n.addr == addr
                        && n.error
                            .as_deref()
                            .is_some_and(|e| e.contains("no longer usable"))
                })
        },
    );
    eprintln!(
        "re-planned {took:?} after the link became unusable: {:?}",
        c.state()
            .nodes
            .iter()
            .map(|n| n.error.clone())
            .collect::<Vec<_>>()
    );
}

/// Runs `sinew plan --json` on `model` with the key in `key` and `extra` arguments: whether it
/// succeeded, and its JSON.
fn sinew_plan(model: &Path, key: &Path, extra: &[&str]) -> (bool, serde_json::Value) {
    let out = sinew_tests::sinew()
        .args(["plan", "--model"])
        .arg(model)
        .args([
            "--ctx",
            "256",
            "--max-seqs",
            "2",
            "--prefill-chunk",
            "16",
            "--json",
            "--cluster-key-file",
        ])
        .arg(key)
        .args(extra)
        .output()
        .expect("running sinew plan");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), v)
}

#[test]
fn sinew_plan_discovers_each_worker_once_and_surveys_it_where_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, _) = key(dir.path(), 0x5a);
    let m = model(dir.path());
    let port = free_udp_port();
    // listening on the loopback only, announcing from every interface: the first addresses
    // heard do not answer
    let _workers: Vec<_> = (0..2)
        .map(|i| announcing_worker(&kpath, dir.path(), &format!("w{i}"), port))
        .collect();
    let (ok, v) = sinew_plan(
        &m,
        &kpath,
        &[
            "--discover",
            "--discovery-port",
            &port.to_string(),
            "--discover-for",
            "2.5",
        ],
    );
    assert!(ok, "{v:#}");
    assert_eq!(v["stages"].as_array().unwrap().len(), 3, "{v:#}");
    assert_eq!(v["links"].as_array().unwrap().len(), 3, "{v:#}");
}

#[test]
fn sinew_plan_places_like_the_head_and_surveys_without_disturbing_it() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path(), 0x5a);
    let m = model(dir.path());
    let mut addrs = Vec::new();
    let mut workers = Vec::new();
    for i in 0..2 {
        let (w, a) = Node::worker(
            &kpath,
            "127.0.0.1:0",
            &[
                "--no-announce",
                "--cache-dir",
                &dir.path().join(format!("w{i}")).to_string_lossy(),
            ],
        );
        workers.push(w);
        addrs.push(a);
    }
    let c = start(opts(
        &m,
        addrs.clone(),
        k,
        dir.path(),
        Operations::default(),
    ));
    wait_for(&c, Duration::from_secs(30), "three stages", |st| {
        stages(st) == 3
    });
    let plan = |extra: &[&str]| sinew_plan(&m, &kpath, extra);
    let (ok, v) = plan(&["--workers", &addrs.join(",")]);
    assert!(ok, "{v:#}");
    assert_eq!(v["fits"], true);
    // the same placement as the serving head, stage by stage
    let st = c.state();
    let planned: Vec<(u64, u64)> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["layers"][0].as_u64().unwrap(),
                s["layers"][1].as_u64().unwrap(),
            )
        })
        .collect();
    let serving: Vec<(u64, u64)> = st
        .nodes
        .iter()
        .map(|n| {
            n.layers
                .map(|(a, b)| (a as u64, b as u64))
                .expect("every node serves")
        })
        .collect();
    assert_eq!(planned, serving, "{v:#}");
    assert_eq!(v["links"].as_array().unwrap().len(), 3, "{v:#}");
    assert_eq!(v["kv_capacity_tokens"], 512);
    let p = &v["prediction"];
    assert_eq!(p["position"], 256, "{v:#}");
    assert!(p["single_tokens_per_s"].as_f64().unwrap() > 0.0, "{v:#}");
    assert!(
        p["aggregate_tokens_per_s"].as_f64().unwrap() >= p["single_tokens_per_s"].as_f64().unwrap(),
        "{v:#}"
    );
    // the survey took nothing from the head: still three stages, and a request runs
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stages(&c.state()), 3);
    let s = c
        .submit(engine::Request {
            prompt: vec![1, 2, 3],
            params: engine::DecodeParams {
                max_tokens: 32,
                ignore_eos: true,
                ..Default::default()
            },
            prompt_logprobs: None,
        })
        .expect("submitting");
    let end = Instant::now() + Duration::from_secs(60);
    let mut times = Vec::new();
    while let Some(ev) = s.recv_timeout(end.saturating_duration_since(Instant::now())) {
        match ev {
            engine::Event::Token(_) => times.push(Instant::now()),
            engine::Event::Finished { .. } => break,
            engine::Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    assert_eq!(times.len(), 32);
    // the prediction against this run (a statement, not a bar: a debug build on a shared machine)
    let measured = 31.0 / times[31].duration_since(times[0]).as_secs_f64();
    let predicted = p["single_tokens_per_s"].as_f64().unwrap();
    eprintln!(
        "sinew plan predicted {predicted:.1} tok/s, the run decoded {measured:.1}: error {:+.0}%",
        100.0 * (predicted / measured - 1.0)
    );
    // a model that cannot fit: exit 1, and why
    let (ok, v) = plan(&["--nodes", "1K,1K"]);
    assert!(!ok);
    assert_eq!(v["fits"], false);
    assert!(
        v["error"].as_str().unwrap().contains("does not fit"),
        "{v:#}"
    );
}

#[test]
fn a_worker_joins_before_its_rates_are_measured_and_sends_them_later() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path(), 0x5b);
    let m = model(dir.path());
    // the worker measures its kernel rates 10 s after it starts
    let mut cmd = sinew_tests::sinew();
    cmd.env("SINEW_TEST_SPEED_DELAY_MS", "10000")
        .args([
            "worker",
            "--threads",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--no-announce",
            "--cache-dir",
        ])
        .arg(dir.path().join("w"))
        .arg("--cluster-key-file")
        .arg(&kpath);
    let started = Instant::now();
    let mut w = Node::spawn(cmd);
    let addr = w.wait_for_line("worker listening on ", Duration::from_secs(60));
    let c = start(opts(&m, vec![addr], k, dir.path(), Operations::default()));
    wait_for(&c, Duration::from_secs(30), "two stages", |st| {
        stages(st) == 2
    });
    // serving without waiting for them: no rates for the worker, so no prediction yet
    let st = c.state();
    if started.elapsed() < Duration::from_secs(9) {
        assert!(st.nodes[1].speed.is_empty(), "{st:#?}");
        assert!(st.prediction.is_none(), "{st:#?}");
    } else {
        eprintln!("joined too late to see the worker without rates; checking only what follows");
    }
    // then they arrive, and the plan is predicted with them
    wait_for(
        &c,
        Duration::from_secs(60),
        "the worker's rates and a prediction",
        |st| !st.nodes[1].speed.is_empty() && st.prediction.is_some(),
    );
    drop(w);
}

#[test]
fn a_worker_listed_and_discovered_under_two_addresses_joins_once() {
    let dir = tempfile::tempdir().unwrap();
    let (kpath, k) = key(dir.path(), 0x5a);
    let m = model(dir.path());
    let port = free_udp_port();
    let (mut w, addr) = announcing_worker(&kpath, dir.path(), "w", port);
    // listed as localhost:PORT, announced from 127.0.0.1:PORT
    let listed = addr.replace("127.0.0.1", "localhost");
    let ops = discovering(port);
    let c = start(opts(&m, vec![listed.clone()], k, dir.path(), ops));
    // the head tried the announced address and the worker told it it serves it already
    w.wait_for(
        Stream::Stderr,
        "refused a second link from the head it serves",
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_secs(2));
    let st = c.state();
    assert_eq!(stages(&st), 2, "{st:#?}");
    assert!(st.ready);
    // one row for the worker, the listed one, and no refusal: the other address is not a node
    assert_eq!(st.nodes.len(), 2, "{st:#?}");
    assert!(
        st.nodes
            .iter()
            .any(|n| n.addr == listed && n.up && n.layers.is_some()),
        "{st:#?}"
    );
    assert!(
        st.refused
            .iter()
            .all(|r| !r.reason.contains("already serves")),
        "{st:#?}"
    );
}

#[test]
fn discovery_on_a_port_held_by_another_program_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, k) = key(dir.path(), 0x5a);
    let m = model(dir.path());
    // held without SO_REUSEADDR: no one may share it
    let holder = UdpSocket::bind("0.0.0.0:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let ops = discovering(port);
    let e = match Cluster::start(opts(&m, Vec::new(), k, dir.path(), ops)) {
        Ok(_) => panic!("a head started without its discovery port"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&format!("discovery on UDP port {port}")), "{e}");
}
