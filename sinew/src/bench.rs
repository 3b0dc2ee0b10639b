//! `sinew bench`: an nccl-tests-style micro-benchmark of the collectives.
//!
//! `--ranks N` spawns N local processes of this binary, pinned round-robin to cores, that meet
//! by rendezvous on a loopback port; `--rendezvous ADDR --rank R --world N` runs one rank (one
//! process per machine). Rank 0 prints the table (or JSON); every result is checked.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, ValueEnum};
use collectives::{CommConfig, Communicator, Element, Reduce, ReduceOp};
use half::{bf16, f16};
use hdrhistogram::Histogram;
use serde::Serialize;
use transport::{LinkConfig, TransportChoice, WaitStrategy};

use crate::keys::KeyArgs;
use crate::units::{format_size, parse_size_list};

/// The operations `sinew bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchOp {
    /// All-reduce (sum), out of place (input → output).
    AllReduce,
    /// All-gather.
    AllGather,
    /// Reduce-scatter (sum).
    ReduceScatter,
    /// Broadcast from rank 0.
    Broadcast,
    /// All-to-all, equal blocks.
    AllToAll,
    /// Ring shift: every rank sends to the next and receives from the previous.
    Sendrecv,
}

impl BenchOp {
    fn name(self) -> &'static str {
        match self {
            BenchOp::AllReduce => "all-reduce",
            BenchOp::AllGather => "all-gather",
            BenchOp::ReduceScatter => "reduce-scatter",
            BenchOp::Broadcast => "broadcast",
            BenchOp::AllToAll => "all-to-all",
            BenchOp::Sendrecv => "sendrecv",
        }
    }

    /// nccl-tests' bus bandwidth factor.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            BenchOp::AllReduce => 2.0 * (n - 1.0) / n,
            BenchOp::AllGather | BenchOp::ReduceScatter | BenchOp::AllToAll => (n - 1.0) / n,
            BenchOp::Broadcast | BenchOp::Sendrecv => 1.0,
        }
    }
}

/// Element types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// Raw bytes (not for reductions).
    Bytes,
}

/// A comma-separated list of sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizes(pub Vec<usize>);

fn parse_sizes(s: &str) -> Result<Sizes, String> {
    parse_size_list(s).map(Sizes)
}

/// Options of `sinew bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The operation.
    #[arg(value_enum)]
    pub op: BenchOp,
    /// Spawn this many local ranks (processes pinned round-robin to cores).
    #[arg(long, conflicts_with_all = ["rendezvous", "rank", "world"])]
    pub ranks: Option<usize>,
    /// Rank 0's address, to run one rank of a multi-machine world.
    #[arg(long, requires_all = ["rank", "world"])]
    pub rendezvous: Option<String>,
    /// This process's rank (with --rendezvous).
    #[arg(long)]
    pub rank: Option<usize>,
    /// The number of ranks (with --rendezvous).
    #[arg(long)]
    pub world: Option<usize>,
    /// Sizes in bytes (K/M/G suffixes); default 8 B to 256 MiB by powers of two.
    #[arg(long, value_parser = parse_sizes)]
    pub sizes: Option<Sizes>,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed iterations per size first.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Element type.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Backend of the links: auto, tcp, uring, shm, rdma.
    #[arg(long, default_value = "auto")]
    pub transport: TransportChoice,
    /// How ranks wait: spin, block or adaptive.
    #[arg(long, default_value = "adaptive")]
    pub wait: WaitStrategy,
    /// Pipelining granularity: messages are cut into pieces of this fixed size. Default: half
    /// the message, at least 256 KiB (shorter messages go whole) and at most 1 MiB.
    #[arg(long, value_parser = crate::units::parse_size)]
    pub piece: Option<usize>,
    /// All-reduce payloads up to this size use the direct (one-round) algorithm; larger ones the
    /// ring. Default: 64 KiB.
    #[arg(long, value_parser = crate::units::parse_size)]
    pub direct_max: Option<usize>,
    #[command(flatten)]
    pub tuning: crate::link::LinkTuning,
    /// Seconds a message may take before the operation fails.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// Print a JSON array instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Draw busbw against size into this SVG file (the name must end in `.svg`).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Pin this process to a core (used by --ranks for its children).
    #[arg(long, hide = true)]
    pub cpu: Option<usize>,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// One row of results.
#[derive(Debug, Serialize)]
struct Row {
    op: &'static str,
    size_bytes: usize,
    count: usize,
    dtype: &'static str,
    p50_us: f64,
    p99_us: f64,
    algbw_gbytes_per_s: f64,
    busbw_gbytes_per_s: f64,
    ok: bool,
}

fn default_sizes() -> Vec<usize> {
    (3..=28).map(|p| 1usize << p).collect()
}

/// Runs `sinew bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let reduces = matches!(args.op, BenchOp::AllReduce | BenchOp::ReduceScatter);
    ensure!(
        !(reduces && args.dtype == Dtype::Bytes),
        "{} needs a numeric --dtype",
        args.op.name()
    );
    // before any measuring: a bad name found at the end would throw the run away
    if let Some(path) = &args.plot {
        check_plot_path(path)?;
    }
    match (args.ranks, &args.rendezvous) {
        (Some(n), _) => spawn_local(n, message_timeout(&args)?),
        (None, Some(root)) => {
            let (rank, world) = (args.rank.unwrap_or(0), args.world.unwrap_or(1));
            run_rank(&args, root, rank, world)
        }
        (None, None) => bail!("give --ranks N, or --rendezvous ADDR --rank R --world N"),
    }
}

/// `--timeout` as a duration: positive, finite, representable.
fn message_timeout(args: &BenchArgs) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .with_context(|| {
            format!(
                "--timeout must be a positive number of seconds, got {}",
                args.timeout
            )
        })
}

/// How long the other ranks get to exit once one has failed: their own operations fail within
/// `timeout` of the failure (a message's deadline), the rest is room for reporting.
fn exit_grace(timeout: Duration) -> Duration {
    timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(5))
}

/// A free port for rank 0, below the kernel's ephemeral range (32768 and up by default): a port
/// probed free inside that range can be taken as some connection's source port before rank 0
/// binds it (a CI run failed so: "Address already in use").
fn rendezvous_port() -> anyhow::Result<u16> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..256 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let port = 20_000 + (x >> 16) as u16 % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Spawns `n` ranks of this binary on loopback and relays rank 0's output. Once a rank has
/// failed, the others get [`exit_grace`] to exit before they are killed, so a rank stopped or
/// wedged (rather than dead) cannot hold the run forever.
fn spawn_local(n: usize, timeout: Duration) -> anyhow::Result<ExitCode> {
    ensure!(n >= 1, "--ranks must be at least 1");
    let port = rendezvous_port()?;
    let root = format!("127.0.0.1:{port}");
    let exe = std::env::current_exe().context("locating the sinew binary")?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut forwarded: Vec<String> = std::env::args().skip(1).collect();
    // Drop `--ranks N` / `--ranks=N`; the children get --rendezvous instead.
    if let Some(i) = forwarded.iter().position(|a| a == "--ranks") {
        forwarded.drain(i..(i + 2).min(forwarded.len()));
    }
    forwarded.retain(|a| !a.starts_with("--ranks="));
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&forwarded)
            .args([
                "--rendezvous",
                &root,
                "--rank",
                &rank.to_string(),
                "--world",
                &n.to_string(),
            ])
            .args(["--cpu", &(rank % cpus).to_string()])
            .stdin(Stdio::null());
        if rank != 0 {
            cmd.stdout(Stdio::null());
        }
        children.push(cmd.spawn().context("spawning a rank")?);
    }
    let failed = supervise(&mut children, exit_grace(timeout))?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Waits for every child; after the first failure, kills those still running `grace` later.
/// Whether any rank failed.
fn supervise(children: &mut [Child], grace: Duration) -> anyhow::Result<bool> {
    let mut done = vec![false; children.len()];
    let mut first_failure: Option<(usize, Instant)> = None;
    loop {
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            if let Some(status) = child.try_wait().context("waiting for a rank")? {
                done[rank] = true;
                if !status.success() {
                    eprintln!("sinew bench: rank {rank} exited with {status}");
                    first_failure.get_or_insert((rank, Instant::now()));
                }
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(first_failure.is_some());
        }
        if let Some((failed, at)) = first_failure
            && at.elapsed() > grace
        {
            for (rank, child) in children.iter_mut().enumerate() {
                if !done[rank] {
                    eprintln!(
                        "sinew bench: rank {rank} still running {:.1} s after rank {failed} failed: killed",
                        grace.as_secs_f64()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_rank(args: &BenchArgs, root: &str, rank: usize, world: usize) -> anyhow::Result<ExitCode> {
    if let Some(cpu) = args.cpu {
        let mut set = nix::sched::CpuSet::new();
        if set.set(cpu).is_ok() {
            // Pinning is a performance hint: a failure is reported, not fatal.
            if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
                tracing::warn!(cpu, error = %e, "cannot pin to the core");
            }
        }
    }
    let timeout = message_timeout(args)?;
    let key = args.key.resolve()?;
    let mut link = LinkConfig::new(key);
    link.wait = args.wait;
    link.transport = args.transport;
    args.tuning.apply(&mut link);
    let defaults = CommConfig::default();
    let config = CommConfig {
        timeout,
        piece_bytes: args.piece.unwrap_or(defaults.piece_bytes).max(1),
        min_piece_bytes: args.piece.unwrap_or(defaults.min_piece_bytes).max(1),
        small_bytes: args.direct_max.unwrap_or(defaults.small_bytes),
    };
    let mut comm = collectives::rendezvous::rendezvous(
        root,
        rank,
        world,
        &link,
        config,
        Duration::from_secs(60),
    )
    .with_context(|| format!("rank {rank} could not join the world"))?;
    let sizes = args
        .sizes
        .clone()
        .map(|s| s.0)
        .unwrap_or_else(default_sizes);
    let reduces = matches!(args.op, BenchOp::AllReduce | BenchOp::ReduceScatter);
    let rows = match (args.dtype, reduces) {
        (Dtype::F32, true) => measure_reductions::<f32>(args, &mut comm, &sizes)?,
        (Dtype::F16, true) => measure_reductions::<f16>(args, &mut comm, &sizes)?,
        (Dtype::Bf16, true) => measure_reductions::<bf16>(args, &mut comm, &sizes)?,
        (Dtype::Bytes, true) => bail!("{} needs a numeric --dtype", args.op.name()),
        (Dtype::F32, false) => measure_moves::<f32>(args, &mut comm, &sizes)?,
        (Dtype::F16, false) => measure_moves::<f16>(args, &mut comm, &sizes)?,
        (Dtype::Bf16, false) => measure_moves::<bf16>(args, &mut comm, &sizes)?,
        (Dtype::Bytes, false) => measure_moves::<u8>(args, &mut comm, &sizes)?,
    };
    if rank != 0 {
        return Ok(ExitCode::SUCCESS);
    }
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        println!(
            "sinew bench {} — {world} ranks, {} over {}",
            args.op.name(),
            args.dtype.name(),
            args.transport
        );
        println!(
            "{:>10} {:>12} {:>6} {:>10} {:>10} {:>10} {:>10} {:>6}",
            "size", "count", "type", "p50 µs", "p99 µs", "algbw GB/s", "busbw GB/s", "check"
        );
        for r in &rows {
            println!(
                "{:>10} {:>12} {:>6} {:>10.2} {:>10.2} {:>10.3} {:>10.3} {:>6}",
                format_size(r.size_bytes),
                r.count,
                r.dtype,
                r.p50_us,
                r.p99_us,
                r.algbw_gbytes_per_s,
                r.busbw_gbytes_per_s,
                if r.ok { "ok" } else { "WRONG" }
            );
        }
    }
    if let Some(path) = &args.plot {
        plot(path, args.op, world, &rows)?;
    }
    Ok(if rows.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

impl Dtype {
    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Bytes => "bytes",
        }
    }
}

/// A value every element type represents exactly, whose sums over ranks stay exact.
trait Exact: Element + Copy {
    fn exact(v: u32) -> Self;
}
impl Exact for f32 {
    fn exact(v: u32) -> Self {
        v as f32
    }
}
impl Exact for f16 {
    fn exact(v: u32) -> Self {
        f16::from_f32(v as f32)
    }
}
impl Exact for bf16 {
    fn exact(v: u32) -> Self {
        bf16::from_f32(v as f32)
    }
}
impl Exact for u8 {
    fn exact(v: u32) -> Self {
        v as u8
    }
}

/// Small integers: rank + 1 plus a position pattern, so sums over ≤ 8 ranks stay exact even in
/// bf16 (8 significant bits).
fn value(rank: usize, i: usize) -> u32 {
    (rank as u32 + 1) + (i % 5) as u32
}

fn expected_sum(world: usize, i: usize) -> u32 {
    (0..world).map(|r| value(r, i)).sum()
}

fn time_it(
    comm: &mut Communicator,
    warmup: usize,
    iters: usize,
    mut op: impl FnMut(&mut Communicator) -> collectives::Result<()>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)?;
    for i in 0..warmup + iters {
        comm.barrier()?;
        let t = Instant::now();
        op(comm)?;
        if i >= warmup {
            hist.record(t.elapsed().as_nanos().clamp(1, 3_600_000_000_000) as u64)?;
        }
    }
    Ok(hist)
}

fn row(
    args: &BenchArgs,
    world: usize,
    size: usize,
    count: usize,
    dtype: &'static str,
    hist: &Histogram<u64>,
    ok: bool,
) -> Row {
    let p50 = hist.value_at_quantile(0.5) as f64;
    let algbw = size as f64 / p50;
    Row {
        op: args.op.name(),
        size_bytes: size,
        count,
        dtype,
        p50_us: p50 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
        algbw_gbytes_per_s: algbw,
        busbw_gbytes_per_s: algbw * args.op.bus_factor(world),
        ok,
    }
}

/// Whether every rank's check passed (an all-reduce of failure counts).
fn agree(comm: &mut Communicator, ok: bool) -> anyhow::Result<bool> {
    let mut bad = [if ok { 0.0f32 } else { 1.0 }];
    comm.all_reduce(&mut bad, ReduceOp::Max)?;
    Ok(bad[0] == 0.0)
}

/// Elements per rank's buffer for a `size`-byte measurement: a multiple of `world`, at least one
/// per rank; returns (elements, elements per rank, bytes).
fn shape(size: usize, elem: usize, world: usize) -> (usize, usize, usize) {
    let count = (size / elem / world * world).max(world);
    (count, count / world, count * elem)
}

/// All-reduce and reduce-scatter, summing.
fn measure_reductions<T: Exact + Reduce>(
    args: &BenchArgs,
    comm: &mut Communicator,
    sizes: &[usize],
) -> anyhow::Result<Vec<Row>> {
    let (rank, world) = (comm.rank(), comm.world());
    let mut rows = Vec::new();
    for &size in sizes {
        let (count, per, bytes) = shape(size, std::mem::size_of::<T>(), world);
        let mine: Vec<T> = (0..count).map(|i| T::exact(value(rank, i))).collect();
        let (hist, ok) = match args.op {
            BenchOp::AllReduce => {
                // out of place, as nccl-tests and MPI_Allreduce(send, recv) measure it
                let mut buf = mine.clone();
                let h = time_it(comm, args.warmup, args.iters, |c| {
                    c.all_reduce_into(&mine, &mut buf, ReduceOp::Sum)
                })?;
                let ok = buf
                    .iter()
                    .enumerate()
                    .all(|(i, v)| *v == T::exact(expected_sum(world, i)));
                (h, ok)
            }
            BenchOp::ReduceScatter => {
                let mut out = vec![T::exact(0); per];
                let h = time_it(comm, args.warmup, args.iters, |c| {
                    c.reduce_scatter(&mine, &mut out, ReduceOp::Sum)
                })?;
                let ok = out
                    .iter()
                    .enumerate()
                    .all(|(i, v)| *v == T::exact(expected_sum(world, rank * per + i)));
                (h, ok)
            }
            other => bail!("{} is not a reduction", other.name()),
        };
        let ok = agree(comm, ok)?;
        rows.push(row(args, world, bytes, count, T::NAME, &hist, ok));
    }
    Ok(rows)
}

/// The operations that move data without reducing it.
fn measure_moves<T: Exact>(
    args: &BenchArgs,
    comm: &mut Communicator,
    sizes: &[usize],
) -> anyhow::Result<Vec<Row>> {
    let (rank, world) = (comm.rank(), comm.world());
    let make = T::exact;
    let mut rows = Vec::new();
    for &size in sizes {
        let (count, per, bytes) = shape(size, std::mem::size_of::<T>(), world);
        let (hist, ok) = match args.op {
            BenchOp::AllGather => {
                let input: Vec<T> = (0..per).map(|i| make(value(rank, i))).collect();
                let mut out = vec![make(0); count];
                let h = time_it(comm, args.warmup, args.iters, |c| {
                    c.all_gather(&input, &mut out)
                })?;
                let ok = (0..count).all(|i| out[i] == make(value(i / per, i % per)));
                (h, ok)
            }
            BenchOp::Broadcast => {
                let source: Vec<T> = (0..count).map(|i| make(value(0, i))).collect();
                let mut buf = if rank == 0 {
                    source.clone()
                } else {
                    vec![make(0); count]
                };
                let h = time_it(comm, args.warmup, args.iters, |c| c.broadcast(0, &mut buf))?;
                (h, buf == source)
            }
            BenchOp::AllToAll => {
                let send: Vec<T> = (0..count)
                    .map(|i| make(value(rank, i / per) + (i % per) as u32))
                    .collect();
                let counts = vec![per; world];
                let mut recv = vec![make(0); count];
                let h = time_it(comm, args.warmup, args.iters, |c| {
                    c.all_to_all(&send, &counts, &mut recv, &counts)
                })?;
                let ok =
                    (0..count).all(|i| recv[i] == make(value(i / per, rank) + (i % per) as u32));
                (h, ok)
            }
            BenchOp::Sendrecv => {
                let send: Vec<T> = (0..count).map(|i| make(value(rank, i))).collect();
                let mut recv = vec![make(0); count];
                let (to, from) = ((rank + 1) % world, (rank + world - 1) % world);
                let h = time_it(comm, args.warmup, args.iters, |c| {
                    if world == 1 {
                        recv.copy_from_slice(&send);
                        Ok(())
                    } else {
                        c.sendrecv(to, &send, from, &mut recv)
                    }
                })?;
                let ok = (0..count).all(|i| recv[i] == make(value(from, i)));
                (h, ok)
            }
            BenchOp::AllReduce | BenchOp::ReduceScatter => {
                bail!("{} needs a numeric --dtype", args.op.name())
            }
        };
        let ok = agree(comm, ok)?;
        rows.push(row(args, world, bytes, count, T::NAME, &hist, ok));
    }
    Ok(rows)
}

/// Only SVG is drawn: a name with another extension (`.png`, say) would get SVG bytes under a
/// name that promises something else.
fn check_plot_path(path: &std::path::Path) -> anyhow::Result<()> {
    let svg = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    ensure!(
        svg,
        "--plot {}: only SVG is supported; give a file name ending in .svg",
        path.display()
    );
    Ok(())
}

fn plot(path: &std::path::Path, op: BenchOp, world: usize, rows: &[Row]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let points: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| ((r.size_bytes as f64).log2(), r.busbw_gbytes_per_s))
        .collect();
    ensure!(!points.is_empty(), "nothing to plot");
    let (x0, x1) = (
        points[0].0,
        points[points.len() - 1].0.max(points[0].0 + 1.0),
    );
    let ymax = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("sinew {} — {world} ranks: bus bandwidth", op.name()),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..ymax)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("message size")
        .y_desc("busbw GB/s")
        .x_label_formatter(&|x| format_size(2f64.powf(*x).round() as usize))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(points.clone(), &BLUE))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(points.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
