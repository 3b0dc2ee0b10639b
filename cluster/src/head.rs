//! The head: stage 0 of the pipeline and the cluster's supervisor (`supervisor`). [`Cluster::start`] connects to
//! the workers, places the layers ([`StagePlan`](crate::plan::StagePlan)), has each worker load its range (sending the
//! tensors to one that lacks the model), loads its own range and serves requests through the
//! pipeline thread. It pings every worker; one that dies, hangs or is cut off is noticed within
//! [`HEARTBEAT_TIMEOUT`], the requests in flight end with an error, and the head plans again over
//! the nodes left (when they can hold the model) and again when the node comes back.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::{Decoder, Request, Stream, Text};
use transport::LinkConfig;

use crate::error::{Error, Result};
use crate::node;
use crate::pipeline::{BatchOptions, Cmd, Core, Pending, PipelineStats};

/// A worker that answers no ping for this long counts as failed.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often the head pings each worker.
pub const PING_EVERY: Duration = Duration::from_millis(250);

/// How the head runs.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The model: a GGUF file (or, on a single node, a Hugging Face directory).
    pub model: PathBuf,
    /// Workers' addresses, in pipeline order.
    pub workers: Vec<String>,
    /// Link settings.
    pub link: LinkConfig,
    /// Longest sequence; `None`: the model's, at most [`DEFAULT_CTX`].
    pub ctx: Option<usize>,
    /// Batching.
    pub batch: BatchOptions,
    /// Layers per stage, overriding placement.
    pub split: Option<Vec<usize>>,
    /// Hidden states in bf16 on the wire.
    pub bf16: bool,
    /// How long the head's stage keeps its cores awake after a micro-batch
    /// ([`crate::warm`]; zero: not at all).
    pub keep_warm: Duration,
    /// Where stage files for workers are kept.
    pub cache_dir: PathBuf,
    /// Memory each node may use, instead of 90% of what it reports available.
    pub memory_limit: Option<u64>,
    /// KV cache bytes of the whole model (spread over the stages by their layers); `None`:
    /// room for `ctx × max_seqs` positions.
    pub kv_memory: Option<u64>,
    /// Discovery and the link health watch.
    pub ops: Operations,
}

/// How the head finds workers and watches its links.
#[derive(Clone, Debug)]
pub struct Operations {
    /// Add the workers that announce themselves on this UDP port ([`crate::discovery`]).
    pub discover: Option<u16>,
    /// A discovered worker down and silent this long leaves the cluster's state.
    pub forget_after: Duration,
    /// Probe each link of the plan this often while no request runs; zero: never.
    pub watch_every: Duration,
    /// A link measured below this fraction of its baseline is degraded.
    pub min_fraction: f64,
    /// A link whose round trip exceeds this many microseconds more than its baseline is degraded.
    pub max_rtt_rise_us: f64,
    /// Predict each plan's decode speed ([`crate::predict`]): the first prediction times the
    /// model's products on this node, while no request runs.
    pub predict: bool,
}

impl Default for Operations {
    fn default() -> Self {
        Operations {
            discover: None,
            forget_after: Duration::from_secs(30),
            watch_every: Duration::from_secs(10),
            min_fraction: 0.7,
            max_rtt_rise_us: 2000.0,
            predict: true,
        }
    }
}

/// The context used when none is given and the model allows more.
pub const DEFAULT_CTX: usize = 8192;

/// A node as the cluster's state shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NodeState {
    /// Its address (the head: "head").
    pub addr: String,
    /// Its stable id (empty until it joins).
    pub id: String,
    /// Found by discovery (not given with `--workers`).
    pub discovered: bool,
    /// Something to fix that does not stop it serving (a duplicated id).
    pub warning: Option<String>,
    /// Its kernels' measured weight rates, bytes per second by format.
    pub speed: Vec<crate::wire::Rate>,
    /// Host name.
    pub hostname: String,
    /// Connected and answering.
    pub up: bool,
    /// Layers it holds in the current plan.
    pub layers: Option<(usize, usize)>,
    /// Physical memory, bytes.
    pub mem_total: u64,
    /// Memory available when it joined, bytes.
    pub mem_available: u64,
    /// Compute cores.
    pub cores: u32,
    /// CPU features.
    pub cpu_features: String,
    /// The link's backend.
    pub link: Option<String>,
    /// Last ping round trip, microseconds.
    pub rtt_us: Option<f64>,
    /// Bandwidth from the head measured at join (an 8 MiB probe), bytes per second.
    pub bytes_per_s: Option<f64>,
    /// Why it is down or refused, if it is.
    pub error: Option<String>,
}

impl NodeState {
    /// A worker not joined yet.
    pub(crate) fn waiting(addr: String, discovered: bool) -> Self {
        NodeState {
            addr,
            id: String::new(),
            discovered,
            warning: None,
            speed: Vec::new(),
            hostname: String::new(),
            up: false,
            layers: None,
            mem_total: 0,
            mem_available: 0,
            cores: 0,
            cpu_features: String::new(),
            link: None,
            rtt_us: None,
            bytes_per_s: None,
            error: Some("not connected yet".into()),
        }
    }
}

/// A link of the pipeline, as measured when it opened.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LinkState {
    /// The sending node.
    pub from: String,
    /// The receiving node.
    pub to: String,
    /// The backend.
    pub transport: String,
    /// Round trip, microseconds.
    pub rtt_us: f64,
    /// Bandwidth of an 8 MiB probe, bytes per second.
    pub bytes_per_s: f64,
    /// The round trip measured when the link joined the plan.
    pub baseline_rtt_us: f64,
    /// The bandwidth measured when the link joined the plan.
    pub baseline_bytes_per_s: f64,
    /// Health samples taken since.
    pub samples: u64,
    /// Set while the link measures below its baseline's bounds: what and by how much.
    pub warning: Option<String>,
}

/// A node or announcement the head refused.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Refused {
    /// Where it came from.
    pub from: String,
    /// Why.
    pub reason: String,
    /// How many times.
    pub count: u64,
    /// The last time, milliseconds since the Unix epoch.
    pub last_ms: u64,
}

/// The cluster's state.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ClusterState {
    /// The model's file name.
    pub model: String,
    /// Serving now.
    pub ready: bool,
    /// Why not, when not.
    pub degraded: Option<String>,
    /// The plan's number.
    pub epoch: u64,
    /// The plan as a table.
    pub plan: Option<String>,
    /// Head first, then the workers in order.
    pub nodes: Vec<NodeState>,
    /// The plan's links, in pipeline order (the last back to the head carries only tokens).
    pub links: Vec<LinkState>,
    /// Requests running.
    pub running: usize,
    /// Requests waiting.
    pub queued: usize,
    /// KV positions reserved.
    pub kv_used_tokens: usize,
    /// KV positions of the smallest stage.
    pub kv_capacity_tokens: usize,
    /// Tokens generated since start.
    pub generated_tokens: u64,
    /// Tokens generated per second over the last few seconds.
    pub tokens_per_s: f64,
    /// Micro-batches run since start.
    pub batches: u64,
    /// Per stage of the current plan: step time and bytes sent on.
    pub stages: Vec<crate::pipeline::StageStats>,
    /// Nodes and announcements refused, with the reason (the last 32 sources).
    pub refused: Vec<Refused>,
    /// The plan's predicted decode speed ([`crate::predict`]).
    pub prediction: Option<crate::predict::Prediction>,
    /// The UDP port discovery listens on, if it does.
    pub discovery: Option<u16>,
}

/// A running cluster head.
pub struct Cluster {
    cmd: Sender<Cmd>,
    stats: Arc<Mutex<PipelineStats>>,
    shared: Arc<Mutex<Shared>>,
    text: Arc<Text>,
    ctx: usize,
    vocab: usize,
    max_queue: usize,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    discovery: Option<u16>,
}

/// What the supervisor shares with [`Cluster::state`].
pub(crate) struct Shared {
    /// The head, then one per supervisor member (forgotten ones hidden from the state).
    pub(crate) nodes: Vec<NodeState>,
    pub(crate) forgotten: std::collections::HashSet<usize>,
    pub(crate) refused: Vec<Refused>,
    pub(crate) prediction: Option<crate::predict::Prediction>,
    pub(crate) epoch: u64,
    pub(crate) plan: Option<String>,
    pub(crate) model: String,
    pub(crate) links: Vec<LinkState>,
}

impl Cluster {
    /// Starts the head: reads the model's header, then plans and loads in the background.
    /// [`Cluster::wait_ready`] waits for the first plan to serve.
    ///
    /// # Errors
    /// A model that cannot be read; a Hugging Face directory with workers (multi-node serving
    /// reads GGUF).
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        let meta = std::fs::metadata(&opts.model).map_err(|e| Error::io(&opts.model, e))?;
        let (text, config) = if meta.is_dir() {
            if !opts.workers.is_empty() {
                return Err(Error::Refused(format!(
                    "{}: serving over several nodes needs a GGUF file; convert the directory with `sinew gguf convert`",
                    opts.model.display()
                )));
            }
            let config = engine::ModelConfig::from_hf_file(&opts.model.join("config.json"))?;
            (
                Text::from_hf_dir(&opts.model, &config.eos_token_ids)?,
                config,
            )
        } else {
            let mut f = std::fs::File::open(&opts.model).map_err(|e| Error::io(&opts.model, e))?;
            let content =
                candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| {
                    Error::Engine(engine::Error::WeightFile {
                        path: opts.model.clone(),
                        message: format!("reading the GGUF header: {e}"),
                    })
                })?;
            let config = engine::ModelConfig::from_gguf(&content, &opts.model)?;
            (Text::from_gguf(&content, &opts.model)?, config)
        };
        let ctx = opts
            .ctx
            .unwrap_or(DEFAULT_CTX)
            .min(config.max_position_embeddings)
            .max(1);
        let text = Arc::new(text);
        let stats = Arc::new(Mutex::new(PipelineStats {
            degraded: Some("loading".into()),
            ..Default::default()
        }));
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let core = Core::new(text.clone(), opts.batch.clone(), stats.clone());
        let mut threads = Vec::new();
        threads.push(
            std::thread::Builder::new()
                .name("sinew-pipeline".into())
                .spawn(move || core.run(cmd_rx))
                .map_err(|e| Error::io("thread", e))?,
        );
        let (mem_total, mem_available) = node::memory();
        let head = NodeState {
            addr: "head".into(),
            id: node::node_id(&opts.cache_dir).unwrap_or_default(),
            discovered: false,
            warning: None,
            speed: Vec::new(),
            hostname: node::hostname(),
            up: true,
            layers: None,
            mem_total,
            mem_available,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()) as u32,
            cpu_features: node::cpu_features(),
            link: None,
            rtt_us: None,
            bytes_per_s: None,
            error: None,
        };
        let mut nodes = vec![head];
        for w in &opts.workers {
            nodes.push(NodeState::waiting(w.clone(), false));
        }
        let shared = Arc::new(Mutex::new(Shared {
            nodes,
            forgotten: Default::default(),
            refused: Vec::new(),
            prediction: None,
            epoch: 0,
            plan: None,
            links: Vec::new(),
            model: opts
                .model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let sup = crate::supervisor::Supervisor::new(
            opts.clone(),
            ctx,
            cmd_tx.clone(),
            shared.clone(),
            stop.clone(),
            stats.clone(),
        )?;
        threads.push(
            std::thread::Builder::new()
                .name("sinew-supervisor".into())
                .spawn(move || sup.run())
                .map_err(|e| Error::io("thread", e))?,
        );
        Ok(Cluster {
            cmd: cmd_tx,
            stats,
            shared,
            text,
            ctx,
            vocab: config.vocab_size,
            max_queue: opts.batch.max_queue,
            stop,
            threads,
            discovery: opts.ops.discover,
        })
    }

    /// The model's tokenizer and chat template.
    pub fn text(&self) -> &Arc<Text> {
        &self.text
    }

    /// The longest sequence.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Waits until the cluster serves; `false` after `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.stats.lock().unwrap_or_else(|e| e.into_inner()).serving {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Queues a request; its events arrive on the stream (dropping it cancels the request).
    ///
    /// # Errors
    /// [`Error::Engine`] for a request that can never run (bad parameters, an empty prompt, a
    /// token outside the vocabulary, longer than the context); [`Error::Degraded`] while no plan
    /// serves; [`Error::QueueFull`].
    pub fn submit(&self, req: Request) -> Result<Stream> {
        if let Some(n) = req.prompt_logprobs
            && n > engine::decode::MAX_TOP_LOGPROBS
        {
            return Err(engine::Error::Request(format!(
                "at most {} top prompt logprobs, not {n}",
                engine::decode::MAX_TOP_LOGPROBS
            ))
            .into());
        }
        if let Some(bad) = req.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(engine::Error::Request(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab
            ))
            .into());
        }
        let decoder = Decoder::new(&self.text, &req.prompt, req.params.clone(), self.ctx)?;
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !stats.serving {
            return Err(Error::Degraded(
                stats.degraded.unwrap_or_else(|| "no plan serves".into()),
            ));
        }
        if stats.queued >= self.max_queue {
            return Err(Error::QueueFull);
        }
        let (sink, stream) = engine::channel();
        self.cmd
            .send(Cmd::Submit(Box::new(Pending::new(req, decoder, sink))))
            .map_err(|_| Error::Degraded("the cluster stopped".into()))?;
        Ok(stream)
    }

    /// The cluster's state now.
    pub fn state(&self) -> ClusterState {
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        ClusterState {
            model: sh.model.clone(),
            ready: s.serving,
            degraded: if s.serving { None } else { s.degraded.clone() },
            epoch: sh.epoch,
            plan: sh.plan.clone(),
            nodes: sh
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| *i == 0 || !sh.forgotten.contains(&(i - 1)))
                .map(|(_, n)| n.clone())
                .collect(),
            links: sh.links.clone(),
            refused: sh.refused.clone(),
            prediction: sh.prediction.clone(),
            discovery: self.discovery,
            running: s.running,
            queued: s.queued,
            kv_used_tokens: s.kv_used_tokens,
            kv_capacity_tokens: s.kv_capacity_tokens,
            generated_tokens: s.generated_tokens,
            tokens_per_s: s.tokens_per_s,
            batches: s.batches,
            stages: s.stages.clone(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.cmd.send(Cmd::Shutdown);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
