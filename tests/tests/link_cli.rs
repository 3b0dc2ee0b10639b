//! `sinew link` end to end: a server and clients as separate processes on loopback.

use std::time::{Duration, Instant};

use serde_json::Value;
use sinew_tests::{Node, free_port, key_file, run_with_timeout, sinew};

const LIMIT: Duration = Duration::from_secs(60);

fn client_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client --json prints one JSON object")
}

#[test]
fn client_measures_latency_and_bandwidth_and_prints_json() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let key = key_file(dir, "key", 1);
    let (_server, addr) = Node::link_server(&key);
    let mut cmd = sinew();
    cmd.args([
        "link",
        "client",
        &addr,
        "--sizes",
        "8,64K",
        "--duration",
        "0.2",
        "--streams",
        "2",
    ])
    .args(["--expect", "1gbe", "--json", "--cluster-key-file"])
    .arg(&key);
    let out = run_with_timeout(cmd, LIMIT).expect("client hung");
    let v = client_json(&out);
    // Auto selection on one host: the best backend this machine runs (no RDMA device named).
    let best_here = backends().into_iter().rfind(|b| *b != "rdma");
    assert_eq!(v["transport"], best_here.unwrap_or("tcp"));
    let latency = v["latency"].as_array().unwrap();
    assert_eq!(latency.len(), 2);
    for (row, size) in latency.iter().zip([8, 65536]) {
        assert_eq!(row["size_bytes"], size);
        let (p50, p99, p999) = (
            row["p50_us"].as_f64().unwrap(),
            row["p99_us"].as_f64().unwrap(),
            row["p999_us"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{row}");
        assert!(row["samples"].as_u64().unwrap() > 0);
    }
    let bandwidth = v["bandwidth"].as_array().unwrap();
    let shape: Vec<(u64, u64)> = bandwidth
        .iter()
        .map(|r| {
            (
                r["size_bytes"].as_u64().unwrap(),
                r["streams"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shape, vec![(8, 1), (8, 2), (65536, 1), (65536, 2)]);
    assert!(
        bandwidth
            .iter()
            .all(|r| r["gbytes_per_s"].as_f64().unwrap() > 0.0)
    );
    let verdict = &v["verdict"];
    assert_eq!(verdict["expect"], "1gbe");
    assert_eq!(verdict["nominal_gbytes_per_s"], 0.125);
    let best = bandwidth
        .iter()
        .map(|r| r["gbytes_per_s"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(verdict["measured_gbytes_per_s"].as_f64().unwrap(), best);
}

#[test]
fn client_with_the_wrong_key_is_refused_clearly_and_both_sides_log_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let (server, addr) = Node::link_server(&key_file(dir, "right", 1));
    let mut cmd = sinew();
    cmd.args([
        "link",
        "client",
        &addr,
        "--duration",
        "0.1",
        "--cluster-key-file",
    ])
    .arg(key_file(dir, "wrong", 2));
    let out = run_with_timeout(cmd, LIMIT).expect("client hung");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("wrong cluster key"),
        "client said: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing is measured without authentication"
    );
    std::thread::sleep(Duration::from_millis(200));
    let server_log = server.kill();
    assert!(
        server_log.contains("wrong cluster key"),
        "server logged: {server_log}"
    );
}

#[test]
fn a_client_started_before_its_server_connects_once_it_is_up() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let key = key_file(dir, "key", 3);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = sinew();
    cmd.args([
        "link",
        "client",
        &addr,
        "--sizes",
        "8",
        "--duration",
        "0.1",
        "--streams",
        "1",
        "--json",
    ])
    .arg("--cluster-key-file")
    .arg(&key);
    let client = std::thread::spawn(move || run_with_timeout(cmd, LIMIT));
    std::thread::sleep(Duration::from_millis(700));
    let mut server = sinew();
    server
        .args(["link", "server", "--bind", &addr, "--cluster-key-file"])
        .arg(&key);
    let _server = Node::spawn(server);
    let out = client.join().unwrap().expect("client hung");
    assert_eq!(client_json(&out)["latency"][0]["size_bytes"], 8);
}

/// Backends this machine can run (every link starts over TCP, so TCP always is).
#[test]
fn bidir_streams_both_ways_at_once_on_every_backend_and_checks_the_counts() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 11);
    for backend in backends() {
        let (_server, addr) = Node::link_server_with(&key, device_args(backend));
        let mut cmd = sinew();
        cmd.args(["link", "client", &addr, "--transport", backend])
            .args(["--sizes", "0,64K", "--duration", "0.3", "--streams", "1"])
            .args(["--no-latency", "--bidir", "--json", "--cluster-key-file"])
            .arg(&key)
            .args(device_args(backend));
        let out = run_with_timeout(cmd, LIMIT).expect("client hung");
        let v = client_json(&out);
        assert_eq!(v["transport"], backend);
        let rows = v["bidirectional"].as_array().expect("bidirectional rows");
        let sizes: Vec<u64> = rows
            .iter()
            .map(|r| r["size_bytes"].as_u64().unwrap())
            .collect();
        assert_eq!(sizes, vec![0, 65536], "{backend}");
        let row = &rows[1];
        for dir in ["forward", "reverse"] {
            let bytes = row[format!("{dir}_bytes")].as_u64().unwrap();
            let rate = row[format!("{dir}_gbytes_per_s")].as_f64().unwrap();
            assert!(
                bytes > 0 && bytes.is_multiple_of(65536),
                "{backend} {dir}: {row}"
            );
            assert!(rate > 0.0, "{backend} {dir}: {row}");
        }
        // the one-way rows are still there, unchanged
        assert_eq!(v["bandwidth"].as_array().unwrap().len(), 2, "{backend}");
    }
}

#[test]
fn a_bidir_request_out_of_range_is_refused_by_the_server_not_obeyed() {
    // A raw client asks for a stream back of more than the negotiated maximum: the server drops
    // the link with a protocol error instead of allocating or streaming it.
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 12);
    let (mut server, addr) = Node::link_server(&key);
    let mut cfg =
        transport::LinkConfig::new(transport::ClusterKey::from_bytes(&[12u8; 32]).unwrap());
    cfg.transport = transport::TransportChoice::Only(transport::TransportKind::TCP);
    let mut link = transport::tcp::connect(&addr, &cfg).expect("link");
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    req[8..].copy_from_slice(&1_000_000_000u64.to_le_bytes());
    link.send(4, &req).expect("send the request");
    let mut buf = [0u8; 64];
    let started = Instant::now();
    let err = link.recv(&mut buf).expect_err("the server must not answer");
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    let line = server.wait_for(sinew_tests::Stream::Stderr, "out of range", LIMIT);
    assert!(line.contains("bidirectional"), "{line}");
}

/// The locked-memory limit the io_uring backend's receive buffer must get past to be registered,
/// and no `CAP_IPC_LOCK` (which lifts it), for a command's process.
fn low_memlock(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    const CAP_IPC_LOCK: libc::c_ulong = 14;
    // SAFETY: the closure runs in the child between fork and exec, and makes only
    // async-signal-safe system calls on values it owns.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256 << 10,
                rlim_max: 256 << 10,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) != 0
                || libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn a_uring_link_under_a_low_locked_memory_limit_leaves_its_receive_buffer_unregistered() {
    if !backends().contains(&"uring") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        // Unprivileged, the limit is charged per user: other tests' links would share it.
        eprintln!("not root: the locked-memory limit is not tested");
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 13);
    let mut server = sinew();
    server
        .args([
            "link",
            "server",
            "--bind",
            "127.0.0.1:0",
            "--cluster-key-file",
        ])
        .arg(&key);
    low_memlock(&mut server);
    let mut server = Node::spawn(server);
    let addr = server.wait_for_line("listening on ", LIMIT);
    let mut cmd = sinew();
    cmd.args(["link", "client", &addr, "--transport", "uring"])
        .args([
            "--sizes",
            "100,64K,1M",
            "--duration",
            "0.2",
            "--streams",
            "1",
        ])
        .args(["--no-latency", "--json", "--cluster-key-file"])
        .arg(&key)
        .env("SINEW_LOG", "info");
    low_memlock(&mut cmd);
    let out = run_with_timeout(cmd, LIMIT).expect("client hung");
    let v = client_json(&out);
    assert_eq!(v["transport"], "uring", "{v}");
    let rows = v["bandwidth"].as_array().expect("bandwidth rows");
    assert_eq!(rows.len(), 3, "{v}");
    for row in rows {
        assert!(row["bytes"].as_u64().unwrap() > 0, "{row}");
    }
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("receive buffer left unregistered") && log.contains("ENOMEM"),
        "{log}"
    );
    let line = server.wait_for(sinew_tests::Stream::Stderr, "left unregistered", LIMIT);
    assert!(line.contains("ulimit -l"), "{line}");
}

fn backends() -> Vec<&'static str> {
    use transport::TransportKind;
    let mut out = vec!["tcp"];
    for (name, kind) in [("uring", TransportKind::URING), ("shm", TransportKind::SHM)] {
        match transport::select::availability(kind) {
            Ok(_) => out.push(name),
            Err(reason) => eprintln!("{name} is not available here, not tested: {reason}"),
        }
    }
    // RDMA runs on the built-in software device, between the two processes.
    out.push("rdma");
    out
}

/// Extra arguments both ends need for `backend`.
fn device_args(backend: &str) -> &'static [&'static str] {
    if backend == "rdma" {
        &["--rdma-device", "softrdma0"]
    } else {
        &[]
    }
}

/// A server, and a client that has been streaming 1 MiB messages to it over `backend` for a
/// second.
fn streaming_pair(backend: &str, key: &std::path::Path) -> (Node, Node) {
    let (server, addr) = Node::link_server_with(key, device_args(backend));
    let mut cmd = sinew();
    cmd.args([
        "link",
        "client",
        &addr,
        "--transport",
        backend,
        "--sizes",
        "1M",
        "--no-latency",
    ])
    .args(["--duration", "20", "--streams", "1", "--cluster-key-file"])
    .arg(key)
    .args(device_args(backend));
    let mut client = Node::spawn(cmd);
    client.wait_for(sinew_tests::Stream::Stdout, "sinew link:", LIMIT);
    std::thread::sleep(Duration::from_millis(1000));
    (server, client)
}

#[test]
fn a_server_killed_mid_transfer_gives_the_client_an_error_within_two_seconds_on_every_backend() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 4);
    for backend in backends() {
        let (server, mut client) = streaming_pair(backend, &key);
        server.kill();
        let killed = Instant::now();
        let status = client
            .wait_exit(LIMIT)
            .expect("client hung after its server died");
        let after = killed.elapsed();
        assert!(
            !status.success(),
            "{backend}: a dead server cannot give a result"
        );
        assert!(
            after < Duration::from_secs(2),
            "{backend}: the error came {after:?} after the kill"
        );
        let stderr = client.kill();
        assert!(
            stderr.contains("127.0.0.1"),
            "{backend}: the error names the peer: {stderr}"
        );
    }
}

#[test]
fn a_client_killed_mid_transfer_is_dropped_by_the_server_within_two_seconds_on_every_backend() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 5);
    for backend in backends() {
        let (mut server, client) = streaming_pair(backend, &key);
        client.kill();
        let killed = Instant::now();
        let line = server.wait_for(
            sinew_tests::Stream::Stderr,
            "client dropped",
            Duration::from_secs(10),
        );
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "{backend}: noticed after {:?}",
            killed.elapsed()
        );
        assert!(line.contains("127.0.0.1"), "{backend}: {line}");
    }
}

#[test]
fn all_backends_are_measured_side_by_side_and_rdma_is_explained() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 6);
    let (_server, addr) = Node::link_server(&key);
    let mut cmd = sinew();
    cmd.args([
        "link",
        "client",
        &addr,
        "--all",
        "--sizes",
        "8,64K",
        "--duration",
        "0.1",
        "--streams",
        "1",
    ])
    .args(["--json", "--cluster-key-file"])
    .arg(&key);
    let out = run_with_timeout(cmd, LIMIT).expect("client hung");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let names: Vec<&str> = objects
        .iter()
        .map(|o| o["transport"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tcp", "uring", "shm", "rdma"]);
    for o in &objects {
        let measured = o.get("latency").is_some();
        // No RDMA device is named here, and this machine has none.
        let name = o["transport"].as_str().unwrap();
        let available = name != "rdma" && backends().contains(&name);
        assert_eq!(measured, available, "{o}");
        if measured {
            assert_eq!(o["latency"].as_array().unwrap().len(), 2);
            assert_eq!(o["bandwidth"].as_array().unwrap().len(), 2);
        } else {
            assert!(o["error"].as_str().unwrap().contains("unavailable"), "{o}");
        }
    }
}

#[test]
fn forcing_rdma_here_fails_with_a_one_line_reason_and_auto_picks_another_backend() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 7);
    let (_server, addr) = Node::link_server(&key);
    let mut cmd = sinew();
    cmd.args([
        "link",
        "client",
        &addr,
        "--transport",
        "rdma",
        "--cluster-key-file",
    ])
    .arg(&key);
    let out = run_with_timeout(cmd, LIMIT).expect("client hung");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("rdma"), "{stderr}");

    let mut cmd = sinew();
    cmd.args([
        "link",
        "client",
        &addr,
        "--sizes",
        "8",
        "--no-bandwidth",
        "--duration",
        "0.1",
        "--json",
    ])
    .arg("--cluster-key-file")
    .arg(&key);
    let out = run_with_timeout(cmd, LIMIT).expect("client hung");
    let v = client_json(&out);
    assert_ne!(v["transport"], "rdma");
    let best_here = backends().into_iter().rfind(|b| *b != "rdma");
    assert_eq!(v["transport"], best_here.unwrap_or("tcp"));
}

#[test]
fn rdma_links_two_processes_over_the_software_device() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 8);
    let (_server, addr) = Node::link_server_with(&key, device_args("rdma"));
    for transport in ["rdma", "auto"] {
        let mut cmd = sinew();
        cmd.args(["link", "client", &addr, "--transport", transport])
            .args([
                "--sizes",
                "8,64K,20M",
                "--duration",
                "0.2",
                "--streams",
                "2",
            ])
            .args(["--json", "--cluster-key-file"])
            .arg(&key)
            .args(device_args("rdma"));
        let out = run_with_timeout(cmd, LIMIT).expect("client hung");
        let v = client_json(&out);
        assert_eq!(
            v["transport"], "rdma",
            "{transport}: RDMA is the best backend"
        );
        assert_eq!(v["latency"].as_array().unwrap().len(), 3, "{v}");
        for b in v["bandwidth"].as_array().unwrap() {
            assert!(b["gbytes_per_s"].as_f64().unwrap() > 0.0, "{b}");
        }
    }
}

#[test]
fn a_key_generated_on_first_use_is_private_and_its_sharing_is_explained() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let config = dir.join("config");
    let mut cmd = sinew();
    cmd.env("XDG_CONFIG_HOME", &config).env("HOME", dir);
    cmd.args(["link", "server", "--bind", "127.0.0.1:0"]);
    let mut server = Node::spawn(cmd);
    let addr = server.wait_for_line("listening on ", Duration::from_secs(30));
    let key_path = config.join("sinew").join("cluster.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A second process on the same machine finds the same key and connects.
    let mut client = sinew();
    client.env("XDG_CONFIG_HOME", &config).env("HOME", dir);
    client.args([
        "link",
        "client",
        &addr,
        "--sizes",
        "8",
        "--no-bandwidth",
        "--duration",
        "0.1",
        "--json",
    ]);
    let out = run_with_timeout(client, LIMIT).expect("client hung");
    client_json(&out);
    let stderr = server.kill();
    assert!(stderr.contains("generated a new cluster key"), "{stderr}");
    assert!(stderr.contains("SINEW_CLUSTER_KEY"), "{stderr}");
    // The log went to a pipe: plain text, no terminal colour codes.
    assert!(stderr.contains("client connected"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a piped log: {stderr:?}"
    );
}

#[test]
fn sinew_link_over_the_rdma_device_named_by_sinew_rdma_device() {
    // Opt-in real hardware: SINEW_RDMA_DEVICE=mlx5_0 (rxe0 for soft-RoCE, rdma_en2 on a Mac).
    let Some(device) = std::env::var("SINEW_RDMA_DEVICE")
        .ok()
        .filter(|d| !d.is_empty())
    else {
        eprintln!("skipped: set SINEW_RDMA_DEVICE to run sinew link over RDMA hardware");
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 9);
    let args = ["--rdma-device", device.as_str()];
    let (_server, addr) = Node::link_server_with(&key, &args);
    let mut cmd = sinew();
    cmd.args(["link", "client", &addr, "--transport", "rdma"])
        .args(["--sizes", "8,1M", "--duration", "0.5", "--json"])
        .arg("--cluster-key-file")
        .arg(&key)
        .args(args);
    let out = run_with_timeout(cmd, LIMIT).expect("client hung");
    let v = client_json(&out);
    assert_eq!(v["transport"], "rdma", "{v}");
}
