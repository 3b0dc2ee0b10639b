//! `sinew bench` end to end: ranks as separate processes meeting by rendezvous on loopback.

use std::time::{Duration, Instant};

use serde_json::Value;
use sinew_tests::{Node, Stream, free_port, key_file, run_with_timeout, sinew};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn every_operation_runs_on_three_local_ranks_with_checked_results() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 8);
    for op in [
        "all-reduce",
        "all-gather",
        "reduce-scatter",
        "broadcast",
        "all-to-all",
        "sendrecv",
    ] {
        let mut cmd = sinew();
        cmd.args([
            "bench",
            op,
            "--ranks",
            "3",
            "--sizes",
            "8,100,64K,1M",
            "--iters",
            "3",
            "--warmup",
            "1",
        ])
        .args(["--json", "--cluster-key-file"])
        .arg(&key);
        let out = run_with_timeout(cmd, LIMIT).expect("bench hung");
        assert!(
            out.status.success(),
            "{op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a JSON array");
        assert_eq!(rows.len(), 4, "{op}");
        for r in &rows {
            assert_eq!(r["op"], op);
            assert_eq!(r["ok"], true, "{op}: {r}");
            let (p50, p99) = (r["p50_us"].as_f64().unwrap(), r["p99_us"].as_f64().unwrap());
            assert!(p50 > 0.0 && p50 <= p99, "{r}");
            let (alg, bus) = (
                r["algbw_gbytes_per_s"].as_f64().unwrap(),
                r["busbw_gbytes_per_s"].as_f64().unwrap(),
            );
            let factor = match op {
                "all-reduce" => 4.0 / 3.0,
                "broadcast" | "sendrecv" => 1.0,
                _ => 2.0 / 3.0,
            };
            assert!(
                (bus - alg * factor).abs() <= 1e-9 * alg.max(1.0),
                "{op}: busbw {bus} vs algbw {alg}"
            );
        }
    }
}

#[test]
fn a_reduction_over_raw_bytes_is_refused_clearly() {
    let mut cmd = sinew();
    cmd.env("SINEW_CLUSTER_KEY", "11".repeat(32));
    cmd.args([
        "bench",
        "all-reduce",
        "--ranks",
        "1",
        "--dtype",
        "bytes",
        "--sizes",
        "8",
    ]);
    let out = run_with_timeout(cmd, LIMIT).expect("bench hung");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("numeric --dtype"));
}

#[test]
fn a_rank_killed_mid_all_reduce_fails_every_survivor_within_five_seconds() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 9);
    for trial in 0..3 {
        let root = format!("127.0.0.1:{}", free_port());
        let ranks: Vec<Node> = (0..3)
            .map(|rank| {
                let mut cmd = sinew();
                cmd.args([
                    "bench",
                    "all-reduce",
                    "--rendezvous",
                    &root,
                    "--rank",
                    &rank.to_string(),
                    "--world",
                    "3",
                ])
                .args([
                    "--sizes",
                    "4M",
                    "--iters",
                    "100000",
                    "--warmup",
                    "0",
                    "--timeout",
                    "5",
                    "--cluster-key-file",
                ])
                .arg(&key);
                Node::spawn(cmd)
            })
            .collect();
        // Let them meet and run a while, then kill one.
        std::thread::sleep(Duration::from_millis(1500 + 200 * trial));
        let mut ranks = ranks.into_iter();
        let mut survivors: Vec<Node> = vec![ranks.next().unwrap(), ranks.next().unwrap()];
        let victim = ranks.next().unwrap();
        for s in &mut survivors {
            assert!(
                s.wait_exit(Duration::ZERO).is_none(),
                "trial {trial}: a rank ended before the kill"
            );
        }
        victim.kill();
        let killed = Instant::now();
        for (i, s) in survivors.iter_mut().enumerate() {
            let status = s
                .wait_exit(Duration::from_secs(30))
                .expect("a survivor hung");
            assert!(
                !status.success(),
                "trial {trial}: rank {i} claims success without rank 2"
            );
            let line = s.wait_for(Stream::Stderr, "error", Duration::from_secs(1));
            assert!(line.contains("rank"), "{line}");
        }
        let after = killed.elapsed();
        assert!(
            after < Duration::from_secs(5),
            "trial {trial}: survivors failed {after:?} after the kill"
        );
    }
}

#[test]
fn plot_draws_busbw_against_size_as_svg() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 10);
    let plot = tmp.path().join("busbw.svg");
    let mut cmd = sinew();
    cmd.args([
        "bench",
        "all-gather",
        "--ranks",
        "2",
        "--sizes",
        "1K,64K,1M",
        "--iters",
        "2",
        "--warmup",
        "1",
    ])
    .arg("--plot")
    .arg(&plot)
    .arg("--cluster-key-file")
    .arg(&key);
    let out = run_with_timeout(cmd, LIMIT).expect("bench hung");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    assert!(
        svg.contains("<svg") && svg.contains("busbw"),
        "not the expected SVG"
    );
    assert!(svg.matches("<circle").count() >= 3, "one point per size");
}

#[test]
fn collectives_run_over_rdma_between_processes_on_the_software_device() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 10);
    for op in ["all-reduce", "all-to-all"] {
        let mut cmd = sinew();
        cmd.args(["bench", op, "--ranks", "3", "--sizes", "8,100K,2M"])
            .args(["--iters", "3", "--warmup", "1", "--transport", "rdma"])
            .args(["--rdma-device", "softrdma0", "--json", "--cluster-key-file"])
            .arg(&key);
        let out = run_with_timeout(cmd, LIMIT).expect("bench hung");
        assert!(
            out.status.success(),
            "{op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a JSON array");
        assert_eq!(rows.len(), 3, "{op}");
        assert!(rows.iter().all(|r| r["ok"] == true), "{op}: {rows:?}");
    }
}
