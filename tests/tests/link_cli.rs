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
    assert_eq!(v["transport"], "tcp");
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

#[test]
fn a_server_killed_mid_test_gives_the_client_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let key = key_file(dir, "key", 4);
    let (server, addr) = Node::link_server(&key);
    let mut cmd = sinew();
    cmd.args([
        "link",
        "client",
        &addr,
        "--sizes",
        "1M",
        "--no-latency",
        "--duration",
        "20",
        "--streams",
        "1",
    ])
    .arg("--cluster-key-file")
    .arg(&key);
    let t = Instant::now();
    let client = std::thread::spawn(move || run_with_timeout(cmd, LIMIT));
    std::thread::sleep(Duration::from_millis(1500));
    server.kill();
    let out = client
        .join()
        .unwrap()
        .expect("client hung after its server died");
    assert!(!out.status.success(), "a dead server cannot give a result");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the error came only after {:?}",
        t.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("127.0.0.1"),
        "the error names the peer: {stderr}"
    );
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
}
