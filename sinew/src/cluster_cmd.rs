//! `sinew worker` (a pipeline stage waiting for a head) and the head side of `sinew generate
//! --workers` (a prompt run through a cluster).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use cluster::{BatchOptions, Cluster, ClusterOptions, WorkerOptions};
use transport::{LinkConfig, TransportChoice, WaitStrategy};

use crate::keys::KeyArgs;

/// Arguments of `sinew worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Address to listen on for a head and for the previous stage (the default takes IPv4 and
    /// IPv6 both; IPv4 alone on a host without IPv6).
    #[arg(long, default_value = "[::]:7471")]
    listen: String,
    /// A model file this worker holds (repeatable); a head serving the same file (same hash) has
    /// the worker load its layers from it, otherwise it sends them.
    #[arg(long)]
    model: Vec<PathBuf>,
    /// Where received stages and file hashes are kept (default: ~/.cache/sinew).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Compute threads (default: all cores). Applied by `main` before any thread starts.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Do not announce this worker on the LAN (a head then needs its address in `--workers`).
    #[arg(long)]
    no_announce: bool,
    /// UDP port announcements go to (the head's `--discovery-port`).
    #[arg(long, default_value_t = cluster::discovery::DEFAULT_PORT)]
    discovery_port: u16,
    #[command(flatten)]
    link: LinkArgs,
}

/// How the head finds workers and watches its links.
#[derive(Args, Debug, Clone)]
pub struct OpsArgs {
    /// Add the workers that announce themselves on the LAN (UDP broadcast, signed with the
    /// cluster key); `--workers` still works beside it.
    #[arg(long)]
    pub discover: bool,
    /// UDP port discovery listens on.
    #[arg(long, default_value_t = cluster::discovery::DEFAULT_PORT)]
    pub discovery_port: u16,
    /// Seconds a discovered worker may be down and silent before it leaves the cluster.
    #[arg(long, default_value_t = OpsArgs::default().forget_after)]
    pub forget_after: f64,
    /// Seconds between link health probes while idle (0: no watch).
    #[arg(long, default_value_t = OpsArgs::default().link_watch)]
    pub link_watch: f64,
    /// A link below this fraction of its baseline bandwidth gets a warning.
    #[arg(long, default_value_t = OpsArgs::default().link_min_fraction)]
    pub link_min_fraction: f64,
    /// A link whose round trip rose this many microseconds over its baseline gets a warning.
    #[arg(long, default_value_t = OpsArgs::default().link_max_rtt_rise_us)]
    pub link_max_rtt_rise_us: f64,
}

/// The flags' defaults are `cluster::Operations`' (discovery off).
impl Default for OpsArgs {
    fn default() -> Self {
        let o = cluster::Operations::default();
        OpsArgs {
            discover: false,
            discovery_port: cluster::discovery::DEFAULT_PORT,
            forget_after: o.forget_after.as_secs_f64(),
            link_watch: o.watch_every.as_secs_f64(),
            link_min_fraction: o.min_fraction,
            link_max_rtt_rise_us: o.max_rtt_rise_us,
        }
    }
}

impl OpsArgs {
    /// The head's operations settings.
    pub fn operations(&self) -> anyhow::Result<cluster::Operations> {
        let secs = |v: f64, name: &str| {
            if (0.0..1e9).contains(&v) {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(anyhow::anyhow!("--{name} takes seconds ≥ 0, not {v}"))
            }
        };
        if !(self.link_min_fraction > 0.0 && self.link_min_fraction <= 1.0) {
            anyhow::bail!(
                "--link-min-fraction takes a fraction in (0, 1], not {}",
                self.link_min_fraction
            );
        }
        if !(self.link_max_rtt_rise_us.is_finite() && self.link_max_rtt_rise_us >= 0.0) {
            anyhow::bail!("--link-max-rtt-rise-us takes microseconds ≥ 0");
        }
        Ok(cluster::Operations {
            discover: self.discover.then_some(self.discovery_port),
            forget_after: secs(self.forget_after, "forget-after")?,
            watch_every: secs(self.link_watch, "link-watch")?,
            min_fraction: self.link_min_fraction,
            max_rtt_rise_us: self.link_max_rtt_rise_us,
            predict: true,
        })
    }
}

/// Link settings shared by the head and the workers.
#[derive(Args, Debug, Clone)]
pub struct LinkArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// Backend of the cluster's links: auto, tcp, uring, shm or rdma.
    #[arg(long, default_value = "auto")]
    transport: TransportChoice,
    /// How a link waits for its peer: block (no CPU while waiting: the default, since a spinning
    /// reader takes the core from the stage's compute), adaptive or spin.
    #[arg(long, default_value = "block")]
    wait: WaitStrategy,
    /// Hidden states on the wire in bf16 (half the bytes, slightly different results).
    #[arg(long)]
    pub bf16: bool,
    /// Milliseconds a pipeline stage keeps its cores awake after each micro-batch, with
    /// idle-priority spinners that give way to the compute at once (a core that sleeps between
    /// a stage's bursts is slow to wake); 0 turns it off. Linux only.
    #[arg(long, default_value_t = cluster::warm::DEFAULT_KEEP_WARM.as_millis() as u64)]
    pub keep_warm_ms: u64,
}

impl LinkArgs {
    /// Defaults with the key in `file`.
    pub fn with_key_file(file: &std::path::Path) -> Self {
        LinkArgs {
            key: KeyArgs {
                cluster_key_file: Some(file.to_path_buf()),
            },
            transport: TransportChoice::Auto,
            wait: WaitStrategy::Block,
            bf16: false,
            keep_warm_ms: cluster::warm::DEFAULT_KEEP_WARM.as_millis() as u64,
        }
    }

    /// The link settings these flags give.
    pub fn config(&self) -> anyhow::Result<LinkConfig> {
        let mut cfg = LinkConfig::new(self.key.resolve()?);
        cfg.transport = self.transport;
        cfg.wait = self.wait;
        Ok(cfg)
    }
}

/// Runs `sinew worker` until the process is stopped.
pub fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let opts = WorkerOptions {
        listen: args.listen.clone(),
        models: args.model.clone(),
        cache_dir: args
            .cache_dir
            .clone()
            .unwrap_or_else(cluster::node::default_cache_dir),
        threads,
        link: args.link.config()?,
        bf16: args.link.bf16,
        keep_warm: Duration::from_millis(args.link.keep_warm_ms),
        announce: (!args.no_announce).then_some(args.discovery_port),
    };
    cluster::worker::run(opts, |addr| {
        println!("worker listening on {addr}");
    })
    .context("the worker stopped")?;
    Ok(())
}

/// The cluster flags of `sinew generate`.
#[derive(Args, Debug, Clone)]
pub struct HeadArgs {
    /// Workers (host:port, comma-separated, in pipeline order): run through a cluster with this
    /// process as the head (stage 0).
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Run through the cluster path even without workers (a single-node cluster).
    #[arg(long)]
    pub cluster: bool,
    /// Layers per stage, in stage order (overrides placement), e.g. 3,3,2.
    #[arg(long, value_delimiter = ',')]
    pub split: Option<Vec<usize>>,
    /// Memory each node may use, bytes (K/M/G); default: 90% of what it has available.
    #[arg(long, value_parser = crate::units::parse_size)]
    pub node_memory: Option<usize>,
    /// Where stage files sent to workers are kept (default: ~/.cache/sinew).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// How long to wait for the cluster to serve.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout_s: u64,
    /// Keep the head (and its stage) up this many seconds after the run, idle (for idle-CPU
    /// measurements).
    #[arg(long, default_value_t = 0)]
    pub hold_s: u64,
    #[command(flatten)]
    pub link: LinkArgs,
}

impl HeadArgs {
    /// Whether the run goes through a cluster.
    pub fn enabled(&self) -> bool {
        self.cluster || !self.workers.is_empty()
    }

    /// Starts the head and waits until it serves.
    pub fn start(
        &self,
        model: &std::path::Path,
        ctx: Option<usize>,
        max_seqs: usize,
        prefill_chunk: usize,
        max_step_tokens: usize,
    ) -> anyhow::Result<Cluster> {
        let opts = ClusterOptions {
            model: model.to_path_buf(),
            workers: self.workers.clone(),
            link: self.link.config()?,
            ctx,
            batch: BatchOptions {
                max_seqs,
                prefill_chunk,
                max_step_tokens,
                max_queue: 256,
                queue_timeout: Duration::from_secs(120),
            },
            split: self.split.clone(),
            bf16: self.link.bf16,
            keep_warm: Duration::from_millis(self.link.keep_warm_ms),
            cache_dir: self
                .cache_dir
                .clone()
                .unwrap_or_else(cluster::node::default_cache_dir),
            memory_limit: self.node_memory.map(|m| m as u64),
            kv_memory: None,
            // a one-off run: no prediction, whose timing would share the cores with it
            ops: cluster::Operations {
                predict: false,
                ..Default::default()
            },
        };
        let c = Cluster::start(opts)?;
        if !c.wait_ready(Duration::from_secs(self.ready_timeout_s)) {
            let s = c.state();
            anyhow::bail!(
                "the cluster did not become ready within {} s: {}",
                self.ready_timeout_s,
                s.degraded.unwrap_or_default()
            );
        }
        Ok(c)
    }
}
