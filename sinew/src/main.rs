//! `sinew`: the one command of the sinew stack.
//!
//! Subcommands: `link` (iperf-style verification of a link between two nodes) and `bench`
//! (nccl-tests-style collective micro-benchmarks).

mod bench;
mod cluster_cmd;
mod demo;
mod generate;
mod gguf;
mod keys;
mod link;
mod plan_cmd;
mod serve;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// sinew: many ordinary machines as one inference target for Mixture-of-Experts LLMs.
#[derive(Debug, Parser)]
#[command(name = "sinew", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify a link between two nodes, like iperf3: latency and bandwidth, with a verdict.
    #[command(subcommand)]
    Link(link::LinkCommand),
    /// Measure a collective over N ranks, like nccl-tests: latency, algbw, busbw, checked results.
    Bench(bench::BenchArgs),
    /// Run a model on one prompt: stream the text, report prefill and decode tok/s.
    Generate(generate::GenerateArgs),
    /// Serve a model with the OpenAI-compatible HTTP API, alone or as the head of workers.
    Serve(serve::ServeArgs),
    /// Start a local cluster (the head and workers) on a built-in model and chat with it.
    Demo(demo::DemoArgs),
    /// Show a serving cluster: nodes, layers, memory, links, requests, tok/s.
    Status(serve::StatusArgs),
    /// Before loading: does a model fit these nodes, how are its layers placed, how fast will
    /// it decode (from the nodes' measured kernel rates and links)?
    Plan(plan_cmd::PlanArgs),
    /// Serve as a pipeline stage: wait for a head, load the layers it assigns, run them.
    Worker(cluster_cmd::WorkerArgs),
    /// Write synthetic GGUF models, convert Hugging Face directories to GGUF.
    #[command(subcommand)]
    Gguf(gguf::GgufCommand),
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SINEW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Sets the compute thread count candle reads (its matmul and quantized kernels size their pools
/// from `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS` on first use).
fn set_threads(n: usize) {
    // SAFETY: called first thing in `main`, before any other thread exists, so nothing can be
    // reading the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Link(cmd) => {
            init_tracing(if cmd.is_server() { "info" } else { "warn" });
            link::run(cmd)
        }
        Command::Bench(args) => {
            init_tracing("warn");
            bench::run(args)
        }
        Command::Generate(args) => {
            if let Some(n) = args.threads {
                set_threads(n);
            }
            init_tracing("warn");
            generate::run(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            if let Some(n) = args.threads {
                set_threads(n);
            }
            init_tracing("info");
            serve::run(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            set_threads(1);
            init_tracing("warn");
            demo::run(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            init_tracing("warn");
            serve::status(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Plan(args) => {
            if let Some(n) = args.threads {
                set_threads(n);
            }
            init_tracing("warn");
            plan_cmd::run(args)
        }
        Command::Worker(args) => {
            if let Some(n) = args.threads {
                set_threads(n);
            }
            init_tracing("info");
            cluster_cmd::run_worker(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Gguf(cmd) => {
            init_tracing("warn");
            gguf::run(cmd).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sinew: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
