//! `sinew link`: iperf-style verification of a link between two nodes.
//!
//! The server echoes ping messages and counts streamed bytes; the client measures ping-pong
//! latency per size (one-way = RTT/2) and streaming bandwidth over one and several links, and
//! compares the best bandwidth with the nominal rate of the link class the user expects.

mod client;
mod protocol;
mod server;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use transport::shm::SingleCopy;
use transport::{LinkConfig, TransportChoice, WaitStrategy};

use crate::keys::KeyArgs;
use crate::units::{parse_size, parse_size_list};

/// Default port of `sinew link server`.
pub const DEFAULT_PORT: u16 = 7470;

/// `sinew link` subcommands.
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Answer link tests from clients until killed.
    Server(ServerArgs),
    /// Measure the link to a `sinew link server`.
    Client(ClientArgs),
}

impl LinkCommand {
    /// Whether this runs the long-lived server (which logs more by default).
    pub fn is_server(&self) -> bool {
        matches!(self, LinkCommand::Server(_))
    }
}

/// Options of `sinew link server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on. Links are authenticated with the cluster key.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    pub bind: SocketAddr,
    /// How the server waits for messages: spin, block or adaptive.
    #[arg(long, default_value = "adaptive")]
    pub wait: WaitStrategy,
    /// Backends to offer clients: auto (every one this machine runs), or only one of tcp, uring,
    /// shm, rdma.
    #[arg(long, default_value = "auto")]
    pub transport: TransportChoice,
    /// Bytes of each direction's shared-memory ring (the accepting side creates both rings).
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub shm_ring: usize,
    #[command(flatten)]
    pub tuning: LinkTuning,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// Per-backend tuning of links, shared by every command that makes them (`sinew link server`,
/// `sinew link client`, `sinew bench`).
#[derive(Debug, Clone, Args)]
pub struct LinkTuning {
    /// When shared-memory messages go by single copy (the receiver reads them straight from
    /// the sender with process_vm_readv) instead of through the ring: `auto` (payloads over
    /// 256 KiB go whichever way measures faster), `off`, or a SIZE from which they always do.
    #[arg(long, value_parser = parse_single_copy, default_value = "auto")]
    pub shm_single_copy: SingleCopy,
    /// RDMA device for links (e.g. rdma_en2, mlx5_0, rxe0; softrdma0 is the built-in software
    /// device); default: $SINEW_RDMA_DEVICE, else the first device.
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// Socket send and receive buffer size of TCP-based links (like iperf3 -w); default: kernel
    /// autotuning.
    #[arg(long, value_parser = parse_size)]
    pub socket_buffer: Option<usize>,
    /// TCP congestion control of the links (Linux); `system` keeps the system's.
    #[arg(long, default_value = "cubic")]
    pub congestion: String,
}

impl LinkTuning {
    /// Sets these options on `cfg`; an RDMA device left unnamed keeps `cfg`'s (from
    /// `SINEW_RDMA_DEVICE`).
    pub fn apply(&self, cfg: &mut LinkConfig) {
        cfg.socket_buffer = self.socket_buffer;
        cfg.congestion = (self.congestion != "system").then(|| self.congestion.clone());
        cfg.shm_single_copy = self.shm_single_copy;
        if let Some(dev) = &self.rdma_device {
            cfg.rdma_device = Some(dev.clone());
        }
    }
}

/// Link classes a verdict can be given against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LinkClass {
    /// Thunderbolt 5: 80 Gb/s.
    Tb5,
    /// 10 Gigabit Ethernet.
    #[value(name = "10gbe")]
    TenGbE,
    /// Gigabit Ethernet.
    #[value(name = "1gbe")]
    OneGbE,
    /// Wi-Fi 6 (1.2 Gb/s nominal).
    Wifi,
}

impl LinkClass {
    /// Nominal bandwidth in GB/s (10⁹ B/s).
    pub fn nominal_gbytes_per_s(self) -> f64 {
        match self {
            LinkClass::Tb5 => 10.0,
            LinkClass::TenGbE => 1.25,
            LinkClass::OneGbE => 0.125,
            LinkClass::Wifi => 0.15,
        }
    }

    /// Fraction of nominal a healthy link of this class reaches; below it the verdict fails.
    /// Ethernet reaches ~94% after protocol overheads; TB5's TCP/IP path reaches about half of
    /// its signalling rate; Wi-Fi is half duplex and shared.
    pub fn required_fraction(self) -> f64 {
        match self {
            LinkClass::Tb5 => 0.5,
            LinkClass::TenGbE | LinkClass::OneGbE => 0.8,
            LinkClass::Wifi => 0.3,
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LinkClass::Tb5 => "tb5",
            LinkClass::TenGbE => "10gbe",
            LinkClass::OneGbE => "1gbe",
            LinkClass::Wifi => "wifi",
        }
    }
}

/// A comma-separated list of message sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeList(pub Vec<usize>);

fn parse_sizes(s: &str) -> Result<SizeList, String> {
    parse_size_list(s).map(SizeList)
}

/// Parses `--shm-single-copy`: `auto`, `off`, or a size.
pub fn parse_single_copy(s: &str) -> Result<SingleCopy, String> {
    match s.trim() {
        "auto" => Ok(SingleCopy::Auto),
        "off" => Ok(SingleCopy::Off),
        size => parse_size(size)
            .map(SingleCopy::From)
            .map_err(|e| format!("{e} (or auto, off)")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected seconds, e.g. 2 or 0.5"))?;
    if !(secs.is_finite() && secs > 0.0 && secs <= 3600.0) {
        return Err(format!("duration {s} must be between 0 and 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Options of `sinew link client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server, HOST:PORT (port defaults to 7470).
    pub addr: String,
    /// Backend to test: tcp, uring, shm (same host), rdma, or auto (the best both sides run).
    /// A forced backend that either side cannot run is an error, not a silent fallback.
    #[arg(long, default_value = "auto", conflicts_with = "all")]
    pub transport: TransportChoice,
    /// Measure every backend this side can run, one after the other, side by side.
    #[arg(long)]
    pub all: bool,
    /// Message sizes, comma-separated, with K/M/G suffixes (powers of two). Used for both the
    /// latency and the bandwidth tests. Default: latency 8,64,512,4K,64K,1M; bandwidth 64K,1M,16M.
    #[arg(long, value_parser = parse_sizes)]
    pub sizes: Option<SizeList>,
    /// Seconds each measurement runs (each size, each stream count).
    #[arg(long, default_value = "1", value_parser = parse_duration)]
    pub duration: Duration,
    /// Parallel streams for the multi-stream bandwidth test (each its own authenticated link);
    /// 1 skips it.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: u16,
    /// How the client waits for messages: spin, block or adaptive.
    #[arg(long, default_value = "adaptive")]
    pub wait: WaitStrategy,
    /// Link class to judge the bandwidth against; the exit status is 3 when it falls short.
    #[arg(long, value_enum)]
    pub expect: Option<LinkClass>,
    /// Print one JSON object on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Skip the latency test.
    #[arg(long)]
    pub no_latency: bool,
    /// Skip the bandwidth tests.
    #[arg(long)]
    pub no_bandwidth: bool,
    /// Also measure both directions at once over one link, like iperf3 --bidir: each end
    /// streams to the other; GB/s per direction, each counted by its receiver.
    #[arg(long)]
    pub bidir: bool,
    #[command(flatten)]
    pub tuning: LinkTuning,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// Runs a `sinew link` subcommand.
pub fn run(cmd: LinkCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LinkCommand::Server(args) => server::run(args).map(|()| ExitCode::SUCCESS),
        LinkCommand::Client(args) => client::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_copy_takes_auto_off_or_a_size() {
        assert_eq!(parse_single_copy("auto"), Ok(SingleCopy::Auto));
        assert_eq!(parse_single_copy("off"), Ok(SingleCopy::Off));
        assert_eq!(parse_single_copy("256K"), Ok(SingleCopy::From(256 << 10)));
        let err = parse_single_copy("sometimes").unwrap_err();
        assert!(err.contains("auto, off"), "{err}");
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        tuning: LinkTuning,
    }

    fn tuned(args: &[&str]) -> LinkConfig {
        use clap::Parser;
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .expect("valid flags");
        let mut cfg =
            LinkConfig::new(transport::ClusterKey::from_bytes(&[7; 32]).expect("a 32-byte key"));
        cfg.rdma_device = Some("from-env".into());
        cli.tuning.apply(&mut cfg);
        cfg
    }

    #[test]
    fn link_tuning_flags_reach_the_link_config() {
        let cfg = tuned(&[
            "--socket-buffer",
            "2M",
            "--congestion",
            "reno",
            "--shm-single-copy",
            "off",
            "--rdma-device",
            "rxe0",
        ]);
        assert_eq!(cfg.socket_buffer, Some(2 << 20));
        assert_eq!(cfg.congestion.as_deref(), Some("reno"));
        assert_eq!(cfg.shm_single_copy, SingleCopy::Off);
        assert_eq!(cfg.rdma_device.as_deref(), Some("rxe0"));
    }

    #[test]
    fn link_tuning_defaults_keep_autotuning_cubic_and_the_environments_device() {
        let cfg = tuned(&[]);
        assert_eq!(cfg.socket_buffer, None);
        assert_eq!(cfg.congestion.as_deref(), Some("cubic"));
        assert_eq!(cfg.shm_single_copy, SingleCopy::Auto);
        assert_eq!(cfg.rdma_device.as_deref(), Some("from-env"));
        assert_eq!(tuned(&["--congestion", "system"]).congestion, None);
    }
}
