//! `sinew plan`: before a weight is loaded, whether a model fits a set of nodes, the layer
//! ranges, the KV capacity and the predicted decode speed — from the nodes' measured kernel
//! rates and the measured links, with the placement and prediction the head uses.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use cluster::discovery::{self, Heard};
use cluster::plan::{NodeBudget, Serving, StagePlan};
use cluster::predict::{LinkSpeed, Prediction, predict};
use cluster::survey::Survey;
use cluster::wire::Rate;

use crate::cluster_cmd::LinkArgs;
use crate::units::parse_size;

/// Arguments of `sinew plan`.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The model (a GGUF file): only its header is read.
    #[arg(long)]
    model: PathBuf,
    /// Hypothetical nodes, head first: usable memory and, after `@`, the weight rate in bytes
    /// per second (default: this machine's measured rates), e.g. `64G@100G,32G@60G,32G`.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["workers", "discover"])]
    nodes: Vec<String>,
    /// Running workers to survey (host:port, in pipeline order); this machine is the head.
    #[arg(long, value_delimiter = ',')]
    workers: Vec<String>,
    /// Survey the workers that announce themselves on the LAN too.
    #[arg(long)]
    discover: bool,
    /// UDP port discovery listens on.
    #[arg(long, default_value_t = discovery::DEFAULT_PORT)]
    discovery_port: u16,
    /// Seconds to listen for announcements.
    #[arg(long, default_value_t = 3.0)]
    discover_for: f64,
    /// Longest sequence (default: the model's, at most 8192).
    #[arg(long)]
    ctx: Option<usize>,
    /// Sequences running at once.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Context position the decode speed is predicted at (tokens already in the sequence;
    /// default 256, at most the context).
    #[arg(long)]
    position: Option<usize>,
    /// Prompt positions of one sequence per micro-batch (as `sinew serve`).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Layers per stage, in stage order (overrides placement).
    #[arg(long, value_delimiter = ',')]
    split: Option<Vec<usize>>,
    /// Memory each surveyed node may use, bytes (K/M/G); default: 90% of what it has available.
    #[arg(long, value_parser = parse_size)]
    node_memory: Option<usize>,
    /// Round trip of the links between `--nodes`, microseconds.
    #[arg(long, default_value_t = 100.0)]
    link_rtt_us: f64,
    /// Bandwidth of the links between `--nodes`, bytes per second (K/M/G).
    #[arg(long, value_parser = parse_size, default_value = "1250M")]
    link_rate: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Compute threads of this node's kernels (as `sinew serve --threads`; default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    link: LinkArgs,
}

/// A link as planned: measured, or given for hypothetical nodes.
struct PlannedLink {
    from: String,
    to: String,
    speed: LinkSpeed,
    transport: String,
}

impl PlannedLink {
    fn measured(from: &str, to: &str, r: &cluster::wire::LinkReport) -> Self {
        PlannedLink {
            from: from.to_string(),
            to: to.to_string(),
            speed: LinkSpeed {
                rtt_us: f64::from(r.rtt_us),
                bytes_per_s: r.bytes_per_s as f64,
            },
            transport: r.transport.clone(),
        }
    }
}

/// What `sinew plan` answers.
struct Report<'a> {
    args: &'a PlanArgs,
    layout: &'a engine::stage_file::Layout,
    nodes: &'a [Planned],
    links: &'a [PlannedLink],
    placed: &'a Result<StagePlan, cluster::PlanError>,
    prediction: Option<&'a Prediction>,
}

/// A node as planned.
struct Planned {
    name: String,
    usable: u64,
    rates: Vec<Rate>,
}

fn parse_node(spec: &str, here: &[Rate]) -> anyhow::Result<(u64, Vec<Rate>)> {
    let (mem, rate) = match spec.split_once('@') {
        Some((m, r)) => (m, Some(r)),
        None => (spec, None),
    };
    let mem = parse_size(mem.trim()).map_err(|e| anyhow::anyhow!("--nodes {spec}: {e}"))?;
    let rates = match rate {
        Some(r) => {
            let r = parse_size(r.trim()).map_err(|e| anyhow::anyhow!("--nodes {spec}: {e}"))?;
            if r == 0 {
                bail!("--nodes {spec}: a rate of 0");
            }
            // the rate given; the fixed cost per product this node's
            let call_ns = here.iter().map(|r| r.call_ns).max().unwrap_or(0);
            vec![Rate {
                format: "any".into(),
                bytes_per_s: r as u64,
                call_ns,
            }]
        }
        None => here.to_vec(),
    };
    Ok((mem as u64, rates))
}

/// The workers heard within `--discover-for`: one entry per worker process (node id and
/// instance), with the addresses it announced from in the order heard (IPv4 first), sorted by
/// node id.
fn discovered(args: &PlanArgs, key: &transport::ClusterKey) -> anyhow::Result<Vec<Vec<String>>> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let t = discovery::listen(key.clone(), args.discovery_port, stop.clone(), move |h| {
        let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(h);
    })
    .with_context(|| format!("listening for announcements on UDP {}", args.discovery_port))?;
    let end = Instant::now() + Duration::from_secs_f64(args.discover_for.clamp(0.1, 600.0));
    let mut found: Vec<((String, u64), Vec<String>)> = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(Heard::Node { addr, announcement }) => {
                let a = addr.to_string();
                let sender = (announcement.node_id, announcement.instance);
                match found.iter_mut().find(|(s, _)| *s == sender) {
                    Some((_, addrs)) if !addrs.contains(&a) => addrs.push(a),
                    Some(_) => {}
                    None => found.push((sender, vec![a])),
                }
            }
            Ok(Heard::Refused { from, why }) => eprintln!("refused {from}: {why}"),
            Err(_) => break,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let _ = t.join();
    // a stable order: by node id
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found.into_iter().map(|(_, a)| a).collect())
}

/// Opens a survey of a worker at the first of `addrs` that answers.
fn survey_any(
    addrs: &[String],
    cfg: &transport::LinkConfig,
) -> anyhow::Result<(String, Survey, cluster::survey::Surveyed)> {
    let mut first = None;
    for a in addrs {
        match Survey::open(a, cfg) {
            Ok((s, info)) => return Ok((a.clone(), s, info)),
            Err(e) => {
                first.get_or_insert(anyhow::Error::new(e).context(format!("surveying {a}")));
            }
        }
    }
    Err(first.unwrap_or_else(|| anyhow::anyhow!("a worker without an address")))
}

/// Runs `sinew plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.max_seqs == 0 || args.prefill_chunk == 0 {
        bail!("--max-seqs and --prefill-chunk must be at least 1");
    }
    let layout = engine::stage_file::layout(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    let ctx = args
        .ctx
        .unwrap_or(cluster::head::DEFAULT_CTX)
        .min(layout.config.max_position_embeddings)
        .max(1);
    let serving = Serving::new(ctx, args.max_seqs, args.max_seqs + args.prefill_chunk);
    let here = cluster::speed::speed_wait(Duration::from_secs(120));
    let usable = |available: u64| {
        args.node_memory
            .map_or_else(|| cluster::plan::usable(available), |m| m as u64)
    };
    let mut nodes: Vec<Planned> = Vec::new();
    let mut links: Vec<PlannedLink> = Vec::new();
    if !args.nodes.is_empty() {
        for (i, spec) in args.nodes.iter().enumerate() {
            let (mem, rates) = parse_node(spec, &here)?;
            nodes.push(Planned {
                name: format!("node{i}"),
                usable: mem,
                rates,
            });
        }
        let n = nodes.len();
        if n > 1 {
            for k in 0..n {
                let to = if k + 1 < n {
                    nodes[k + 1].name.clone()
                } else {
                    nodes[0].name.clone()
                };
                links.push(PlannedLink {
                    from: nodes[k].name.clone(),
                    to,
                    speed: LinkSpeed {
                        rtt_us: args.link_rtt_us,
                        bytes_per_s: args.link_rate as f64,
                    },
                    transport: "given".into(),
                });
            }
        }
    } else {
        let cfg = args.link.config()?;
        // each worker's addresses: one listed, or those it announced from
        let mut candidates: Vec<Vec<String>> =
            args.workers.iter().map(|a| vec![a.clone()]).collect();
        if args.discover {
            for found in discovered(&args, &cfg.key)? {
                if !found.iter().any(|a| args.workers.contains(a)) {
                    candidates.push(found);
                }
            }
        }
        let mut addrs = Vec::new();
        let (_, avail) = cluster::node::memory();
        nodes.push(Planned {
            name: format!("head ({})", cluster::node::hostname()),
            usable: usable(avail),
            rates: here.clone(),
        });
        let mut surveys = Vec::new();
        for c in &candidates {
            let (a, s, info) = survey_any(c, &cfg)?;
            nodes.push(Planned {
                name: a.clone(),
                usable: usable(info.advert.mem_available),
                rates: info.advert.speed.clone(),
            });
            surveys.push((s, info));
            addrs.push(a);
        }
        // head → first → … → last → head
        for k in 0..surveys.len() {
            if k == 0 {
                links.push(PlannedLink::measured("head", &addrs[0], &surveys[0].1.link));
            }
            if k + 1 < surveys.len() {
                let r = surveys[k].0.peer_link(&addrs[k + 1])?;
                links.push(PlannedLink::measured(&addrs[k], &addrs[k + 1], &r));
            } else {
                links.push(PlannedLink::measured(&addrs[k], "head", &surveys[k].1.link));
            }
        }
    }
    let budgets: Vec<NodeBudget> = nodes
        .iter()
        .map(|n| NodeBudget {
            name: n.name.clone(),
            usable: n.usable,
        })
        .collect();
    let placed = match &args.split {
        Some(s) => StagePlan::split(&layout, &budgets, serving, s),
        None => StagePlan::place(&layout, &budgets, serving),
    };
    let position = args
        .position
        .unwrap_or(cluster::predict::DEFAULT_POSITION)
        .min(ctx);
    let work = cluster::predict::Workload {
        hidden_bytes: layout.config.hidden_size as u64 * if args.link.bf16 { 2 } else { 4 },
        seqs: args.max_seqs,
        position,
        attention_s: cluster::speed::measure_attention(&layout.config, position)
            .context("the model has no attention heads")?,
        // a model whose products cannot be timed here (too large for the memory available) is
        // predicted from the rates alone
        timed: cluster::speed::measure_model(&args.model, &|| false)
            .inspect_err(|e| eprintln!("the model's products not timed: {e}"))
            .ok()
            .map(|times| cluster::predict::Timed::new(times, &here)),
    };
    // this node: the rates measured with the products
    if let (true, Some(t)) = (args.nodes.is_empty(), &work.timed) {
        nodes[0].rates = t.rates.clone();
    }
    let prediction = placed.as_ref().ok().and_then(|p| {
        let rates: Vec<Vec<Rate>> = p
            .stages
            .iter()
            .map(|s| nodes[s.node].rates.clone())
            .collect();
        let speeds: Vec<LinkSpeed> = links.iter().map(|l| l.speed).collect();
        predict(&layout, p, &rates, &speeds, &work)
    });
    let report = Report {
        args: &args,
        layout: &layout,
        nodes: &nodes,
        links: &links,
        placed: &placed,
        prediction: prediction.as_ref(),
    };
    if args.json {
        println!("{}", report.json()?);
    } else {
        report.print();
    }
    // a plan that does not fit is an answer, and a failure for scripts
    Ok(if placed.is_ok() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

impl Report<'_> {
    fn json(&self) -> anyhow::Result<String> {
        let Report {
            args,
            layout,
            nodes,
            links,
            placed,
            prediction,
        } = *self;
        let stages: Vec<serde_json::Value> = match placed {
            Ok(p) => p
                .stages
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    serde_json::json!({
                        "node": p.names[s.node],
                        "layers": [s.layers.start, s.layers.end],
                        "weight_bytes": s.weight_bytes,
                        "kv_bytes": s.kv_bytes,
                        "act_bytes": s.act_bytes,
                        "usable_bytes": s.usable,
                        "predicted_ms_per_token": prediction.and_then(|x| x.stage_ms.get(k)),
                    })
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let v = serde_json::json!({
            "model": args.model.file_name().map(|n| n.to_string_lossy().into_owned()),
            "layers": layout.layer_bytes.len(),
            "weight_bytes": layout.total_bytes(),
            "fits": placed.is_ok(),
            "error": placed.as_ref().err().map(|e| e.to_string()),
            "nodes": nodes.iter().map(|n| serde_json::json!({
                "name": n.name, "usable_bytes": n.usable, "rates": n.rates,
            })).collect::<Vec<_>>(),
            "stages": stages,
            "links": links.iter().enumerate().map(|(k, l)| serde_json::json!({
                "from": l.from, "to": l.to, "transport": l.transport, "rtt_us": l.speed.rtt_us,
                "bytes_per_s": l.speed.bytes_per_s,
                "predicted_ms_per_token": prediction.and_then(|x| x.link_ms.get(k)),
            })).collect::<Vec<_>>(),
            "ctx": placed.as_ref().map_or(0, |p| p.serving.ctx),
            "max_seqs": args.max_seqs,
            "kv_capacity_tokens": placed.as_ref().map_or(0, |p| p.serving.kv_tokens),
            "prediction": prediction,
        });
        Ok(serde_json::to_string_pretty(&v)?)
    }

    fn print(&self) {
        let Report {
            args,
            layout,
            nodes,
            links,
            placed,
            prediction,
        } = *self;
        println!(
            "model {} — {} layers, {:.2} GiB of weights",
            args.model.display(),
            layout.layer_bytes.len(),
            layout.total_bytes() as f64 / (1u64 << 30) as f64
        );
        for n in nodes {
            let best = n.rates.iter().map(|r| r.bytes_per_s).max().unwrap_or(0);
            println!(
                "  node {:<24} usable {:>8.2} GiB, kernels up to {:>6.1} GB/s",
                n.name,
                n.usable as f64 / (1u64 << 30) as f64,
                best as f64 / 1e9
            );
        }
        for l in links {
            println!(
                "  link {} → {}: {}, round trip {:.0} µs, {:.0} MB/s",
                l.from,
                l.to,
                l.transport,
                l.speed.rtt_us,
                l.speed.bytes_per_s / 1e6
            );
        }
        match placed {
            Ok(p) => {
                println!("\nfits:\n{p}");
                if let Some(x) = prediction {
                    let stages: Vec<String> =
                        x.stage_ms.iter().map(|m| format!("{m:.2}")).collect();
                    let hops: Vec<String> = x.link_ms.iter().map(|m| format!("{m:.3}")).collect();
                    println!(
                        "predicted ms per token: stages [{}], links [{}]",
                        stages.join(", "),
                        hops.join(", ")
                    );
                    println!(
                        "predicted decode at position {}: {:.1} tok/s single stream, {:.1} tok/s \
                         over {} sequences",
                        x.position, x.single_tokens_per_s, x.aggregate_tokens_per_s, x.seqs
                    );
                } else {
                    println!("no prediction: a node has no measured kernel rates");
                }
            }
            Err(e) => println!("\ndoes not fit: {e}"),
        }
    }
}
