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
fn a_plot_name_that_is_not_svg_is_refused_before_measuring() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 10);
    let plot = tmp.path().join("busbw.png");
    let mut cmd = sinew();
    cmd.args(["bench", "all-reduce", "--ranks", "2", "--sizes", "8"])
        .arg("--plot")
        .arg(&plot)
        .arg("--cluster-key-file")
        .arg(&key);
    let out = run_with_timeout(cmd, LIMIT).expect("bench hung");
    assert!(!out.status.success(), "a .png name must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only SVG"), "{stderr}");
    assert!(!plot.exists(), "nothing written under the wrong name");
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

/// The processes whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the comm may hold spaces, so split after its ')'
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_wedged_rank_is_killed_after_another_failed_and_the_run_fails() {
    // One of 3 local ranks is stopped (alive, never answering): the others fail at their 1 s
    // message deadline, and `--ranks` must then kill the stopped one rather than wait forever.
    let tmp = tempfile::tempdir().expect("temp dir");
    let key = key_file(tmp.path(), "key", 10);
    let mut cmd = sinew();
    cmd.args(["bench", "all-reduce", "--ranks", "3", "--sizes", "4M"])
        .args(["--iters", "1000000", "--warmup", "0", "--timeout", "1"])
        .arg("--cluster-key-file")
        .arg(&key);
    let mut parent = Node::spawn(cmd);
    std::thread::sleep(Duration::from_millis(1500));
    let ranks = children_of(parent.id());
    assert_eq!(ranks.len(), 3, "expected 3 rank processes, found {ranks:?}");
    let wedged = nix::unistd::Pid::from_raw(ranks[2]);
    nix::sys::signal::kill(wedged, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let stopped = Instant::now();
    // 1 s deadline + grace (2 × 1 s + 5 s) + slack
    let status = parent
        .wait_exit(Duration::from_secs(30))
        .expect("sinew bench --ranks waited on a stopped rank forever");
    assert!(!status.success(), "a run with a wedged rank claims success");
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "took {:?}",
        stopped.elapsed()
    );
    let line = parent.wait_for(Stream::Stderr, "killed", Duration::from_secs(1));
    assert!(line.contains("still running"), "{line}");
    // killed and reaped by `sinew bench`, not left stopped (or reparented) behind it
    assert!(
        !std::path::Path::new(&format!("/proc/{}", ranks[2])).exists(),
        "the stopped rank is still there"
    );
}

#[test]
fn a_timeout_that_is_not_a_positive_representable_duration_is_refused_clearly() {
    for bad in ["0", "-1", "1e30", "NaN", "inf"] {
        let mut cmd = sinew();
        cmd.env("SINEW_CLUSTER_KEY", "11".repeat(32));
        cmd.args(["bench", "all-reduce", "--ranks", "1", "--sizes", "8"])
            .arg(format!("--timeout={bad}"));
        let out = run_with_timeout(cmd, LIMIT).expect("bench hung");
        assert!(!out.status.success(), "--timeout {bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--timeout must be"), "--timeout {bad}: {err}");
        assert!(!err.contains("panicked"), "--timeout {bad}: {err}");
    }
}

#[test]
fn a_very_long_timeout_is_taken_without_overflowing() {
    // 1e18 s is representable; the deadlines and the parent's grace built from it saturate
    let mut cmd = sinew();
    cmd.env("SINEW_CLUSTER_KEY", "11".repeat(32));
    cmd.args(["bench", "all-reduce", "--ranks", "2", "--sizes", "8,4K"])
        .args(["--iters", "3", "--timeout", "1e18", "--json"]);
    let out = run_with_timeout(cmd, LIMIT).expect("bench hung");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
