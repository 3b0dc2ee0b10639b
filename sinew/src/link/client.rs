//! `sinew link client`: measures latency and bandwidth against a `sinew link server`.

use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use serde::Serialize;
use transport::select::PREFERENCE;
use transport::{Link, LinkConfig, TransportChoice, tcp};

use super::protocol::{
    BidirRequest, StreamReport, TAG_BACK_END, TAG_BIDIR, TAG_PING, TAG_REPORT, TAG_STREAM,
};
use super::{ClientArgs, DEFAULT_PORT, LinkClass};
use crate::units::format_size;

const DEFAULT_LATENCY_SIZES: [usize; 6] = [8, 64, 512, 4 << 10, 64 << 10, 1 << 20];
const DEFAULT_BANDWIDTH_SIZES: [usize; 3] = [64 << 10, 1 << 20, 16 << 20];
/// Exit status when the verdict fails (errors exit with 1).
const VERDICT_FAILED: u8 = 3;

/// One latency measurement.
#[derive(Debug, Serialize)]
struct LatencyRow {
    size_bytes: usize,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    samples: u64,
}

/// One bandwidth measurement.
#[derive(Debug, Serialize)]
struct BandwidthRow {
    size_bytes: usize,
    streams: usize,
    gbytes_per_s: f64,
    bytes: u64,
    seconds: f64,
}

/// One bidirectional measurement: both ends streaming to each other over one link at once.
#[derive(Debug, Serialize)]
struct BidirRow {
    size_bytes: usize,
    /// Client → server, counted by the server.
    forward_gbytes_per_s: f64,
    /// Server → client, counted by the client.
    reverse_gbytes_per_s: f64,
    forward_bytes: u64,
    reverse_bytes: u64,
    seconds: f64,
}

/// The verdict against a link class.
#[derive(Debug, Serialize)]
struct Verdict {
    expect: &'static str,
    nominal_gbytes_per_s: f64,
    measured_gbytes_per_s: f64,
    fraction: f64,
    required_fraction: f64,
    pass: bool,
}

/// The whole report; also the `--json` output.
#[derive(Debug, Serialize)]
struct Report {
    transport: String,
    wait: String,
    server: String,
    peer_node_id: String,
    max_message_bytes: u32,
    duration_s: f64,
    latency: Vec<LatencyRow>,
    bandwidth: Vec<BandwidthRow>,
    /// With `--bidir`: both directions at once, per message size.
    bidirectional: Vec<BidirRow>,
    verdict: Option<Verdict>,
}

fn with_default_port(addr: &str) -> String {
    let has_port = addr.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':')
    });
    if has_port && !(addr.starts_with('[') && addr.ends_with(']')) {
        addr.to_string()
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    }
}

/// Runs the client and prints the report (one per backend with `--all`).
pub fn run(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let key = args.key.resolve()?;
    let mut cfg = LinkConfig::new(key);
    cfg.wait = args.wait;
    args.tuning.apply(&mut cfg);
    cfg.connect_timeout = Duration::from_secs(10);
    // A single call may legitimately take a while on a slow link (a 16 MiB message over Wi-Fi).
    cfg.timeout = Duration::from_secs(30).max(args.duration * 4);
    let addr = with_default_port(&args.addr);
    let choices: Vec<TransportChoice> = if args.all {
        PREFERENCE
            .iter()
            .rev()
            .map(|k| TransportChoice::Only(*k))
            .collect()
    } else {
        vec![args.transport]
    };
    let mut failed = false;
    let mut measured = 0;
    for choice in choices {
        cfg.transport = choice;
        let report = match measure(&args, &cfg, &addr) {
            Ok(r) => r,
            Err(e) if args.all => {
                if args.json {
                    let skipped = serde_json::json!({"transport": choice.to_string(), "error": format!("{e:#}")});
                    println!("{skipped}");
                } else {
                    println!("\n{choice}: skipped: {e:#}");
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        measured += 1;
        failed |= report.verdict.as_ref().is_some_and(|v| !v.pass);
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else if let Some(v) = &report.verdict {
            println!(
                "\nverdict: {} — best {:.3} GB/s is {:.0}% of {}'s nominal {:.3} GB/s (needs {:.0}%)",
                if v.pass { "PASS" } else { "FAIL" },
                v.measured_gbytes_per_s,
                v.fraction * 100.0,
                v.expect,
                v.nominal_gbytes_per_s,
                v.required_fraction * 100.0
            );
        }
    }
    ensure!(measured > 0, "no backend could be measured against {addr}");
    Ok(if failed {
        ExitCode::from(VERDICT_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Measures one backend: latency, then bandwidth over one and several links.
fn measure(args: &ClientArgs, cfg: &LinkConfig, addr: &str) -> anyhow::Result<Report> {
    let (latency_sizes, bandwidth_sizes) = match &args.sizes {
        Some(s) => (s.0.clone(), s.0.clone()),
        None => (
            DEFAULT_LATENCY_SIZES.to_vec(),
            DEFAULT_BANDWIDTH_SIZES.to_vec(),
        ),
    };
    let connect =
        || tcp::connect(addr, cfg).with_context(|| format!("cannot open a link to {addr}"));
    let mut link = connect()?;
    let info = link.info().clone();
    let largest = latency_sizes
        .iter()
        .chain(&bandwidth_sizes)
        .copied()
        .max()
        .unwrap_or(0);
    ensure!(
        largest <= info.max_payload as usize,
        "message size {} exceeds the link's maximum of {} bytes",
        largest,
        info.max_payload
    );
    if !args.json {
        println!("\nsinew link: {info}");
    }

    let mut latency = Vec::new();
    if !args.no_latency {
        if !args.json {
            println!(
                "latency, ping-pong (one-way = RTT/2), {:.1} s per size",
                args.duration.as_secs_f64()
            );
            println!(
                "{:>10} {:>10} {:>10} {:>10} {:>10}",
                "size", "p50 µs", "p99 µs", "p999 µs", "samples"
            );
        }
        for &size in &latency_sizes {
            let row = measure_latency(&mut link, size, args.duration)?;
            if !args.json {
                println!(
                    "{:>10} {:>10.2} {:>10.2} {:>10.2} {:>10}",
                    format_size(size),
                    row.p50_us,
                    row.p99_us,
                    row.p999_us,
                    row.samples
                );
            }
            latency.push(row);
        }
    }

    let mut bandwidth = Vec::new();
    if !args.no_bandwidth {
        let mut extra = Vec::new();
        let streams = usize::from(args.streams);
        for _ in 1..streams {
            extra.push(connect()?);
        }
        if !args.json {
            println!(
                "bandwidth, streaming (GB/s = 10⁹ B/s, counted by the receiver), {:.1} s each",
                args.duration.as_secs_f64()
            );
            println!("{:>10} {:>8} {:>10}", "size", "streams", "GB/s");
        }
        for &size in &bandwidth_sizes {
            let mut counts = [1usize, streams].to_vec();
            counts.dedup();
            for n in counts {
                let mut links: Vec<&mut Link> = std::iter::once(&mut link)
                    .chain(extra.iter_mut())
                    .take(n)
                    .collect();
                let row = measure_bandwidth(&mut links, size, args.duration)?;
                if !args.json {
                    println!(
                        "{:>10} {:>8} {:>10.3}",
                        format_size(size),
                        row.streams,
                        row.gbytes_per_s
                    );
                }
                bandwidth.push(row);
            }
        }
    }

    let mut bidirectional = Vec::new();
    if args.bidir && !args.no_bandwidth {
        if !args.json {
            println!(
                "bidirectional, both ends streaming over one link at once, {:.1} s each",
                args.duration.as_secs_f64()
            );
            println!("{:>10} {:>14} {:>14}", "size", "→ GB/s", "← GB/s");
        }
        for &size in &bandwidth_sizes {
            let (back, row) = measure_bidir(link, size, args.duration)?;
            link = back;
            if !args.json {
                println!(
                    "{:>10} {:>14.3} {:>14.3}",
                    format_size(size),
                    row.forward_gbytes_per_s,
                    row.reverse_gbytes_per_s
                );
            }
            bidirectional.push(row);
        }
    }

    let verdict = args.expect.map(|class| judge(class, &bandwidth));
    Ok(Report {
        transport: info.transport.to_string(),
        wait: info.wait.to_string(),
        server: info.peer_addr.clone(),
        peer_node_id: format!("{:#x}", info.peer_node_id),
        max_message_bytes: info.max_payload,
        duration_s: args.duration.as_secs_f64(),
        latency,
        bandwidth,
        bidirectional,
        verdict,
    })
}

fn judge(class: LinkClass, bandwidth: &[BandwidthRow]) -> Verdict {
    let measured = bandwidth.iter().map(|r| r.gbytes_per_s).fold(0.0, f64::max);
    let nominal = class.nominal_gbytes_per_s();
    let fraction = measured / nominal;
    Verdict {
        expect: class.name(),
        nominal_gbytes_per_s: nominal,
        measured_gbytes_per_s: measured,
        fraction,
        required_fraction: class.required_fraction(),
        pass: fraction >= class.required_fraction(),
    }
}

fn pattern(size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(151).wrapping_add(7))
        .collect()
}

fn ping(link: &mut Link, payload: &[u8], buf: &mut [u8]) -> anyhow::Result<()> {
    link.send(TAG_PING, payload)?;
    let m = link.recv(buf)?;
    ensure!(
        m.tag == TAG_PING && m.len == payload.len(),
        "server answered a {}-byte ping with tag {} and {} bytes",
        payload.len(),
        m.tag,
        m.len
    );
    Ok(())
}

fn measure_latency(link: &mut Link, size: usize, duration: Duration) -> anyhow::Result<LatencyRow> {
    let payload = pattern(size);
    let mut buf = vec![0u8; size];
    // Warm up (caches, TCP windows, CPU frequency) and check the echo byte for byte.
    let warm = Instant::now();
    let mut n = 0;
    while n < 10 || (warm.elapsed() < duration / 10 && n < 10_000) {
        ping(link, &payload, &mut buf)?;
        if buf != payload {
            bail!("the server's echo of a {size}-byte ping differs from what was sent");
        }
        n += 1;
    }
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).context("histogram bounds")?;
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        ping(link, &payload, &mut buf)?;
        let rtt = t.elapsed().as_nanos().clamp(1, 60_000_000_000) as u64;
        hist.record(rtt).context("recording a round trip")?;
    }
    let one_way_us = |q: f64| hist.value_at_quantile(q) as f64 / 2.0 / 1000.0;
    Ok(LatencyRow {
        size_bytes: size,
        p50_us: one_way_us(0.5),
        p99_us: one_way_us(0.99),
        p999_us: one_way_us(0.999),
        samples: hist.len(),
    })
}

/// Streams `size`-byte messages over every link at once for `duration`, then asks each receiver
/// what it got. Bandwidth is what the server counted divided by the slowest stream's time.
fn measure_bandwidth(
    links: &mut [&mut Link],
    size: usize,
    duration: Duration,
) -> anyhow::Result<BandwidthRow> {
    let start = Barrier::new(links.len());
    let payload = pattern(size);
    let results: Vec<anyhow::Result<(u64, Duration)>> = std::thread::scope(|s| {
        let handles: Vec<_> = links
            .iter_mut()
            .map(|link| {
                let (start, payload) = (&start, &payload);
                s.spawn(move || stream_one(link, payload, duration, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a stream thread panicked")))
            })
            .collect()
    });
    let mut bytes = 0u64;
    let mut slowest = Duration::ZERO;
    for r in results {
        let (b, t) = r?;
        bytes += b;
        slowest = slowest.max(t);
    }
    Ok(BandwidthRow {
        size_bytes: size,
        streams: links.len(),
        gbytes_per_s: bytes as f64 / slowest.as_secs_f64() / 1e9,
        bytes,
        seconds: slowest.as_secs_f64(),
    })
}

/// Both ends stream `size`-byte messages to each other over `link` for `duration`: the client
/// from a second thread, the server on request ([`TAG_BIDIR`]); each direction's bytes are
/// counted by its receiver and checked against what its sender says it sent.
fn measure_bidir(link: Link, size: usize, duration: Duration) -> anyhow::Result<(Link, BidirRow)> {
    let payload = pattern(size);
    let (mut tx, mut rx) = link.split();
    let request = BidirRequest {
        size: size as u64,
        duration,
    };
    tx.send(TAG_BIDIR, &request.encode())?;
    let t0 = Instant::now();
    let (sent, received) = std::thread::scope(|s| {
        let sender = s.spawn(|| -> anyhow::Result<StreamReport> {
            let mut sent = StreamReport::default();
            while t0.elapsed() < duration {
                tx.send(TAG_STREAM, &payload)?;
                sent.bytes += payload.len() as u64;
                sent.messages += 1;
            }
            tx.send(TAG_REPORT, &[])?;
            Ok(sent)
        });
        let received = receive_bidir(&mut rx, size, t0);
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the stream thread panicked")));
        (sent, received)
    });
    let sent = sent?;
    let (report, forward_time, got, reverse_time) = received?;
    ensure!(
        report == sent,
        "the server counted {} bytes in {} messages, we sent {} in {}: data was lost",
        report.bytes,
        report.messages,
        sent.bytes,
        sent.messages
    );
    let link = Link::unsplit(tx, rx).map_err(|_| anyhow::anyhow!("link halves mismatched"))?;
    let row = BidirRow {
        size_bytes: size,
        forward_gbytes_per_s: report.bytes as f64 / forward_time.as_secs_f64() / 1e9,
        reverse_gbytes_per_s: got.bytes as f64 / reverse_time.as_secs_f64() / 1e9,
        forward_bytes: report.bytes,
        reverse_bytes: got.bytes,
        seconds: forward_time.as_secs_f64().max(reverse_time.as_secs_f64()),
    };
    Ok((link, row))
}

/// The client's receiving side of a bidirectional test: the server's stream up to its end
/// marker, then the server's report of ours. Returns (server's report, when it came, what we
/// received, when the stream back ended), times since `t0`.
fn receive_bidir(
    rx: &mut transport::LinkReceiver,
    size: usize,
    t0: Instant,
) -> anyhow::Result<(StreamReport, Duration, StreamReport, Duration)> {
    let mut buf = vec![0u8; size.max(StreamReport::LEN)];
    let mut got = StreamReport::default();
    let back_end = loop {
        let m = rx.recv(&mut buf)?;
        match m.tag {
            TAG_STREAM => {
                ensure!(
                    m.len == size,
                    "the server streamed {} bytes, {size} asked",
                    m.len
                );
                got.bytes += m.len as u64;
                got.messages += 1;
            }
            TAG_BACK_END => {
                break StreamReport::decode(&buf[..m.len])
                    .context("the server's end-of-stream report is malformed")?;
            }
            other => bail!("unexpected tag {other} in the server's stream"),
        }
    };
    let reverse_time = t0.elapsed();
    ensure!(
        back_end == got,
        "the server sent {} bytes in {} messages, we received {} in {}: data was lost",
        back_end.bytes,
        back_end.messages,
        got.bytes,
        got.messages
    );
    let m = rx.recv(&mut buf)?;
    let report = match (m.tag, StreamReport::decode(&buf[..m.len])) {
        (TAG_REPORT, Some(r)) => r,
        _ => bail!(
            "the server sent no valid report (tag {}, {} bytes)",
            m.tag,
            m.len
        ),
    };
    Ok((report, t0.elapsed(), got, reverse_time))
}

fn stream_one(
    link: &mut Link,
    payload: &[u8],
    duration: Duration,
    start: &Barrier,
) -> anyhow::Result<(u64, Duration)> {
    let mut buf = [0u8; StreamReport::LEN];
    start.wait();
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut messages = 0u64;
    while t0.elapsed() < duration {
        link.send(TAG_STREAM, payload)?;
        sent += payload.len() as u64;
        messages += 1;
    }
    link.send(TAG_REPORT, &[])?;
    let m = link.recv(&mut buf)?;
    let elapsed = t0.elapsed();
    let report = match (m.tag, StreamReport::decode(&buf[..m.len])) {
        (TAG_REPORT, Some(r)) => r,
        _ => bail!(
            "the server sent no valid report (tag {}, {} bytes)",
            m.tag,
            m.len
        ),
    };
    ensure!(
        report
            == StreamReport {
                bytes: sent,
                messages
            },
        "the server counted {} bytes in {} messages, we sent {} in {}: data was lost",
        report.bytes,
        report.messages,
        sent,
        messages
    );
    Ok((report.bytes, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_port_is_added_only_when_missing() {
        assert_eq!(with_default_port("10.0.0.2"), "10.0.0.2:7470");
        assert_eq!(with_default_port("10.0.0.2:9000"), "10.0.0.2:9000");
        assert_eq!(with_default_port("node-a"), "node-a:7470");
        assert_eq!(with_default_port("[::1]:9000"), "[::1]:9000");
        assert_eq!(with_default_port("[::1]"), "[::1]:7470");
    }

    #[test]
    fn the_verdict_compares_the_best_bandwidth_with_the_class() {
        let row = |g| BandwidthRow {
            size_bytes: 1,
            streams: 1,
            gbytes_per_s: g,
            bytes: 0,
            seconds: 1.0,
        };
        let v = judge(LinkClass::TenGbE, &[row(0.5), row(1.1)]);
        assert!(v.pass && (v.fraction - 0.88).abs() < 1e-9);
        assert!(!judge(LinkClass::TenGbE, &[row(0.9)]).pass);
        assert!(!judge(LinkClass::Tb5, &[]).pass);
    }
}
