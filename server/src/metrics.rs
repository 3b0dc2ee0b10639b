//! `GET /metrics`: Prometheus text format. Counters and histograms are kept as requests run; the
//! cluster's gauges (queue, running sequences, KV use, nodes, links) are read at each scrape.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    status: u16,
}

/// Labels of a per-stage gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
}

/// Labels of a per-link gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    from: String,
    to: String,
    transport: String,
}

/// Labels of a per-node gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    ttft: Histogram,
    itl: Histogram,
    queued: Gauge,
    running: Gauge,
    kv_used: Gauge,
    kv_capacity: Gauge,
    tokens_per_s: FGauge,
    ready: Gauge,
    node_up: Family<NodeLabels, Gauge>,
    node_rtt: Family<NodeLabels, FGauge>,
    node_layers: Family<NodeLabels, Gauge>,
    stage_step: Family<StageLabels, FGauge>,
    stage_steps: Family<StageLabels, Gauge>,
    stage_sent: Family<StageLabels, Gauge>,
    link_rtt: Family<LinkLabels, FGauge>,
    link_bw: Family<LinkLabels, FGauge>,
    link_baseline: Family<LinkLabels, FGauge>,
    link_degraded: Family<LinkLabels, Gauge>,
    refused: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sinew");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens of finished requests",
            prompt_tokens.clone(),
        );
        let completion_tokens = Counter::default();
        registry.register(
            "completion_tokens",
            "Generated tokens of finished requests",
            completion_tokens.clone(),
        );
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "time_to_first_token_seconds",
            "From request to its first token",
            ttft.clone(),
        );
        let itl = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "inter_token_latency_seconds",
            "Between a request's tokens",
            itl.clone(),
        );
        let queued = Gauge::default();
        registry.register("queue_length", "Requests waiting", queued.clone());
        let running = Gauge::default();
        registry.register("running_sequences", "Sequences running", running.clone());
        let kv_used = Gauge::default();
        registry.register(
            "kv_cache_used_tokens",
            "KV positions reserved",
            kv_used.clone(),
        );
        let kv_capacity = Gauge::default();
        registry.register(
            "kv_cache_capacity_tokens",
            "KV positions of the smallest stage",
            kv_capacity.clone(),
        );
        let tokens_per_s = FGauge::default();
        registry.register(
            "generated_tokens_per_second",
            "Tokens generated per second, last 5 s",
            tokens_per_s.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when a plan serves, 0 when loading or degraded",
            ready.clone(),
        );
        let node_up = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "node_up",
            "1 when the node is connected and answering",
            node_up.clone(),
        );
        let node_rtt = Family::<NodeLabels, FGauge>::default();
        registry.register(
            "link_rtt_seconds",
            "Last ping round trip to the node",
            node_rtt.clone(),
        );
        let node_layers = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "node_layers",
            "Layers the node holds in the current plan",
            node_layers.clone(),
        );
        let stage_step = Family::<StageLabels, FGauge>::default();
        registry.register(
            "stage_step_seconds",
            "A stage's step time, moving average over recent micro-batches",
            stage_step.clone(),
        );
        let stage_steps = Family::<StageLabels, Gauge>::default();
        registry.register(
            "stage_steps",
            "Micro-batches a stage ran in the current plan",
            stage_steps.clone(),
        );
        let stage_sent = Family::<StageLabels, Gauge>::default();
        registry.register(
            "stage_sent_bytes",
            "Hidden-state bytes a stage sent on its link to the next stage, current plan",
            stage_sent.clone(),
        );
        let link_rtt = Family::<LinkLabels, FGauge>::default();
        registry.register(
            "pipeline_link_rtt_seconds",
            "Round trip of a pipeline link, last measured (when it opened, then by the health watch)",
            link_rtt.clone(),
        );
        let link_bw = Family::<LinkLabels, FGauge>::default();
        registry.register(
            "pipeline_link_bandwidth_bytes_per_second",
            "Bandwidth of a pipeline link (an 8 MiB probe), last measured",
            link_bw.clone(),
        );
        let link_baseline = Family::<LinkLabels, FGauge>::default();
        registry.register(
            "pipeline_link_baseline_bandwidth_bytes_per_second",
            "Bandwidth of a pipeline link measured when it joined the plan",
            link_baseline.clone(),
        );
        let link_degraded = Family::<LinkLabels, Gauge>::default();
        registry.register(
            "pipeline_link_degraded",
            "1 while a link measures below its baseline's bounds (the health watch), else 0",
            link_degraded.clone(),
        );
        let refused = Gauge::default();
        registry.register(
            "refused_sources",
            "Sources of refused nodes or announcements remembered (wrong key, other version, replay)",
            refused.clone(),
        );
        Metrics {
            registry,
            link_rtt,
            link_bw,
            link_baseline,
            link_degraded,
            refused,
            stage_step,
            stage_steps,
            stage_sent,
            requests,
            prompt_tokens,
            completion_tokens,
            ttft,
            itl,
            queued,
            running,
            kv_used,
            kv_capacity,
            tokens_per_s,
            ready,
            node_up,
            node_rtt,
            node_layers,
        }
    }

    /// Counts a response.
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RouteLabels {
                route: route.to_string(),
                status,
            })
            .inc();
    }

    /// Counts a finished request's tokens.
    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.completion_tokens.inc_by(completion as u64);
    }

    /// Records a time to first token.
    pub fn ttft(&self, d: Duration) {
        self.ttft.observe(d.as_secs_f64());
    }

    /// Records an inter-token latency.
    pub fn itl(&self, d: Duration) {
        self.itl.observe(d.as_secs_f64());
    }

    /// The exposition, with the cluster's gauges as of `state`.
    pub fn render(&self, state: &cluster::ClusterState) -> String {
        self.queued.set(state.queued as i64);
        self.running.set(state.running as i64);
        self.kv_used.set(state.kv_used_tokens as i64);
        self.kv_capacity.set(state.kv_capacity_tokens as i64);
        self.tokens_per_s.set(state.tokens_per_s);
        self.ready.set(i64::from(state.ready));
        for n in &state.nodes {
            let l = NodeLabels {
                node: n.addr.clone(),
            };
            self.node_up.get_or_create(&l).set(i64::from(n.up));
            if let Some(r) = n.rtt_us {
                self.node_rtt.get_or_create(&l).set(r / 1e6);
            }
            self.node_layers
                .get_or_create(&l)
                .set(n.layers.map_or(0, |(a, b)| (b - a) as i64));
        }
        for l in &state.links {
            let labels = LinkLabels {
                from: l.from.clone(),
                to: l.to.clone(),
                transport: l.transport.clone(),
            };
            self.link_rtt.get_or_create(&labels).set(l.rtt_us / 1e6);
            self.link_bw.get_or_create(&labels).set(l.bytes_per_s);
            self.link_baseline
                .get_or_create(&labels)
                .set(l.baseline_bytes_per_s);
            self.link_degraded
                .get_or_create(&labels)
                .set(i64::from(l.warning.is_some()));
        }
        self.refused.set(state.refused.len() as i64);
        for (k, st) in state.stages.iter().enumerate() {
            let l = StageLabels {
                stage: k.to_string(),
            };
            self.stage_step.get_or_create(&l).set(st.step_ms / 1000.0);
            self.stage_steps.get_or_create(&l).set(st.steps as i64);
            self.stage_sent.get_or_create(&l).set(st.sent_bytes as i64);
        }
        let mut s = String::new();
        // writing into a String cannot fail
        let _ = encode(&mut s, &self.registry);
        s
    }
}
