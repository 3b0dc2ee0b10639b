//! `sinew generate` and `sinew gguf` as processes: the committed fixtures' greedy continuations
//! and logits reproduced through the CLI, sampling determinism, GGUF models, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sinew_tests::{run_with_timeout, sinew};

/// The longest a `sinew` run may take before the test fails (a hang is a failure, not a stuck
/// CI job).
const LIMIT: Duration = Duration::from_secs(300);

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/fixtures")
}

fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures_root())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.json").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 5);
    v
}

fn reference(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn csv(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn run(args: &[&str]) -> Output {
    let mut cmd = sinew();
    cmd.args(args);
    run_cmd(cmd)
}

/// Runs `cmd` to completion within [`LIMIT`].
fn run_cmd(cmd: Command) -> Output {
    run_with_timeout(cmd, LIMIT).expect("sinew did not finish in time")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "sinew failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn greedy_json_reproduces_every_fixture_and_logits_out_matches() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in fixtures() {
        let r = reference(&dir);
        let prompt = csv(&ids(&r["prompt_ids"]));
        let greedy = ids(&r["greedy_ids"]);
        let logits = tmp.path().join("logits.safetensors");
        let out = run(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &prompt,
            "--max-tokens",
            &greedy.len().to_string(),
            "--temperature",
            "0",
            "--json",
            "--logits-out",
            logits.to_str().unwrap(),
        ]);
        let v = json(&out);
        assert_eq!(ids(&v["tokens"]), greedy, "{}", dir.display());
        assert!(v["text"].is_string());
        assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        let got = candle_core::safetensors::load(&logits, &candle_core::Device::Cpu).unwrap();
        let want = candle_core::safetensors::load(
            dir.join("logits.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (g, w) = (&got["logits"], &want["logits"]);
        assert_eq!(g.dims(), w.dims());
        let d = (g - w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-4, "{}: max |Δlogit| {d}", dir.display());
    }
}

#[test]
fn parallel_eight_reproduces_every_fixture_in_each_sequence() {
    for dir in fixtures() {
        let r = reference(&dir);
        let greedy = ids(&r["greedy_ids"]);
        let out = run(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &csv(&ids(&r["prompt_ids"])),
            "--max-tokens",
            &greedy.len().to_string(),
            "--parallel",
            "8",
            "--prefill-chunk",
            "5",
            "--json",
        ]);
        let v = json(&out);
        let seqs = v["sequences"].as_array().unwrap();
        assert_eq!(seqs.len(), 8);
        for s in seqs {
            assert_eq!(ids(&s["tokens"]), greedy, "{}", dir.display());
            assert!(s["text"].is_string());
        }
        assert!(v["aggregate_decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(ids(&v["tokens"]), greedy);
    }
    // sampling: sequence i uses seed + i, so sequence 0 is the single run with that seed
    let dir = fixtures_root().join("qwen3_moe_gqa");
    let d = dir.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        d,
        "--prompt-ids",
        "5,6,7",
        "--max-tokens",
        "16",
        "--temperature",
        "1.0",
        "--seed",
        "9",
        "--ignore-eos",
        "--json",
    ];
    let single = json(&run(&args));
    let mut par = args.to_vec();
    par.extend(["--parallel", "4"]);
    let par = json(&run(&par));
    let seqs = par["sequences"].as_array().unwrap();
    assert_eq!(ids(&seqs[0]["tokens"]), ids(&single["tokens"]));
    assert!(
        seqs.iter().any(|s| s["tokens"] != seqs[0]["tokens"]),
        "seeds differ"
    );
}

#[test]
fn every_kernel_choice_reproduces_every_fixture() {
    // SINEW_KERNELS=candle keeps every matrix on candle's matmul, `avx2` takes the AVX2 kernels
    // where the CPU has them: either way the same greedy continuation
    for kernels in ["candle", "avx2"] {
        for dir in fixtures() {
            let r = reference(&dir);
            let greedy = ids(&r["greedy_ids"]);
            let mut cmd = sinew();
            cmd.env("SINEW_KERNELS", kernels).args([
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt-ids",
                &csv(&ids(&r["prompt_ids"])),
                "--max-tokens",
                &greedy.len().to_string(),
                "--temperature",
                "0",
                "--json",
            ]);
            let out = run_cmd(cmd);
            let v = json(&out);
            assert_eq!(ids(&v["tokens"]), greedy, "{kernels}: {}", dir.display());
            let formats: Vec<&str> = v["weights"]
                .as_array()
                .expect("weights")
                .iter()
                .map(|w| w["format"].as_str().expect("format"))
                .collect();
            if kernels == "candle" {
                assert!(formats.iter().all(|f| *f == "candle"), "{formats:?}");
            }
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    let dir = fixtures_root().join("qwen3_moe_gqa");
    let sample = |seed: &str| {
        let out = run(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Tell me about links.",
            "--max-tokens",
            "24",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ]);
        ids(&json(&out)["tokens"])
    };
    let a = sample("7");
    assert_eq!(a, sample("7"));
    assert!(!a.is_empty());
    // 24 tokens from different seeds coinciding would be a sampler that ignores its seed
    assert_ne!(a, sample("8"));
}

#[test]
fn streaming_prints_text_then_speeds() {
    let dir = fixtures_root().join("llama_dense");
    let out = run(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "8",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prefill:") && err.contains("decode:") && err.contains("tok/s"),
        "{err}"
    );
}

#[test]
fn a_synthetic_gguf_runs_in_q4_k_and_q8_0() {
    let tmp = tempfile::tempdir().unwrap();
    for quant in ["q4_k", "q8_0"] {
        let path = tmp.path().join(format!("m-{quant}.gguf"));
        let out = run(&[
            "gguf",
            "synth",
            "--out",
            path.to_str().unwrap(),
            "--quant",
            quant,
            "--layers",
            "2",
            "--experts",
            "4",
            "--top-k",
            "2",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = json(&run(&[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "hello",
            "--max-tokens",
            "6",
            "--json",
            "--threads",
            "1",
        ]));
        assert!(!ids(&v["tokens"]).is_empty());
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = fixtures_root().join("qwen3_dense");
    let d = dir.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["generate", "--model", "/nonexistent/model", "--prompt", "x"],
            "/nonexistent/model",
        ),
        (
            &["generate", "--model", d, "--prompt-ids", "1,2,99999"],
            "99999",
        ),
        (
            &["generate", "--model", d, "--prompt", "x", "--top-p", "2"],
            "top-p",
        ),
        (
            &[
                "generate",
                "--model",
                d,
                "--prompt",
                "x",
                "--temperature=-1",
            ],
            "temperature",
        ),
        (
            &["generate", "--model", d, "--prompt", "x", "--threads", "0"],
            "threads",
        ),
        (
            &["generate", "--model", d, "--prompt", "x", "--parallel", "0"],
            "parallel",
        ),
        (
            &[
                "generate",
                "--model",
                d,
                "--prompt-ids",
                "1,2,3",
                "--ctx",
                "2",
            ],
            "context holds 2",
        ),
        (
            &[
                "generate",
                "--model",
                d,
                "--prompt",
                "x",
                "--kv-memory",
                "12",
            ],
            "KV budget",
        ),
        (
            &[
                "generate",
                "--model",
                d,
                "--prompt",
                "x",
                "--presence-penalty",
                "5",
            ],
            "presence penalty",
        ),
        (
            &[
                "gguf",
                "synth",
                "--out",
                "/nonexistent/dir/x.gguf",
                "--quant",
                "q9",
            ],
            "q9",
        ),
    ];
    for (args, needle) in cases {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
