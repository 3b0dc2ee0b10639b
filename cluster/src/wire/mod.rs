//! The cluster protocol: the messages a head and its workers exchange over authenticated links,
//! sans-IO. Each message is one link message; its tag says which kind it is and its payload is
//! little-endian fields read with a bounds-checked cursor, so a short, long or hostile message is
//! a [`DecodeError`], never a panic. Lengths are checked against what remains before anything is
//! allocated.

use engine::{SamplingParams, TokenLogprob};
use transport::codec::{DecodeError, Reader, Writer};

/// The cluster protocol's version. A head and a worker of different versions refuse each other.
pub const PROTOCOL_VERSION: u16 = 3;

/// A content hash (SHA-256) of a model file.
pub type Hash = [u8; 32];

/// A model file a node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFile {
    /// The file's name (no directory).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256.
    pub hash: Hash,
}

/// What a worker says about itself when a head connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    /// The worker's protocol version.
    pub version: u16,
    /// Host name.
    pub hostname: String,
    /// Physical memory, bytes.
    pub mem_total: u64,
    /// Memory available now, bytes.
    pub mem_available: u64,
    /// Cores this worker computes with.
    pub cores: u32,
    /// CPU features that matter to the kernels (e.g. "avx512f avx2 fma").
    pub cpu_features: String,
    /// Model files it holds.
    pub files: Vec<ModelFile>,
    /// The node's stable id (kept in its cache directory; see [`crate::node::node_id`]).
    pub node_id: String,
    /// How fast its kernels stream each weight format, measured at start.
    pub speed: Vec<Rate>,
}

/// How fast a node's matrix-vector kernel reads weights of one format, with the node's threads: a
/// product of one activation row with a matrix of `b` bytes (from memory, not the caches) takes
/// `call_ns + b / bytes_per_s` seconds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    /// The format's name (`q4_k`, `q6_k`, `q8_0`, `bf16`, `f16`, `f32`).
    pub format: String,
    /// Weight bytes per second.
    pub bytes_per_s: u64,
    /// Nanoseconds each product costs whatever its size (quantizing the activation row, starting
    /// the threads and the memory streams); 0 in a version-2 advert, which did not carry it.
    pub call_ns: u64,
}

/// The head's assignment of a stage to a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assign {
    /// The stage's index (the head is 0).
    pub stage: u32,
    /// Stages in the pipeline.
    pub stages: u32,
    /// First layer.
    pub layer_start: u32,
    /// One past the last layer.
    pub layer_end: u32,
    /// The model file's name.
    pub model_name: String,
    /// Its hash.
    pub model_hash: Hash,
    /// The longest sequence.
    pub ctx: u32,
    /// The stage's KV budget, bytes.
    pub kv_bytes: u64,
    /// Where the next stage listens (`None` for the last stage, which answers the head).
    pub next: Option<String>,
    /// A number the head draws per plan; peer links and batches of another plan are refused.
    pub epoch: u64,
}

/// A sequence's first appearance in a micro-batch: what every stage reserves and what the last
/// stage samples with.
#[derive(Clone, Debug, PartialEq)]
pub struct Open {
    /// KV positions to reserve.
    pub reserve: u32,
    /// Sampling parameters and seed.
    pub sampling: SamplingParams,
    /// Logprobs of each sampled token, with this many alternatives.
    pub logprobs: Option<u8>,
    /// Logprobs of the prompt's tokens, with this many alternatives.
    pub prompt_logprobs: Option<u8>,
    /// The prompt (penalties and prompt logprobs need it).
    pub prompt: Vec<u32>,
}

/// Which rows of a chunk get logits at the last stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// None.
    Skip,
    /// The last.
    Last,
    /// All (prompt logprobs).
    All,
}

/// One sequence's share of a micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkDesc {
    /// The sequence's id (the head's).
    pub seq: u64,
    /// Its cache length before this chunk (a check that every stage agrees).
    pub pos: u32,
    /// New positions.
    pub rows: u32,
    /// Which rows get logits.
    pub logits: Rows,
    /// Sample the next token from the last row.
    pub sample: bool,
    /// Set on the sequence's first chunk.
    pub open: Option<Open>,
}

/// A micro-batch: what each stage runs and hands to the next.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The head's number for it.
    pub id: u64,
    /// The plan it belongs to.
    pub epoch: u64,
    /// Sequences to drop (finished or cancelled) before running.
    pub releases: Vec<u64>,
    /// The sequences, in row order.
    pub chunks: Vec<ChunkDesc>,
    /// What each stage before this one took, in stage order.
    pub timings: Vec<StageTiming>,
    /// Hidden states, `rows × width`, row-major.
    pub hidden: Hidden,
}

/// One stage's share of a micro-batch: how long its step took and how many activation bytes it
/// sent on (what `/metrics` reports per stage and per link).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageTiming {
    /// The step, microseconds.
    pub step_us: u32,
    /// Bytes of hidden states sent to the next stage (0 at the last).
    pub sent_bytes: u32,
}

/// Hidden states on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct Hidden {
    /// Width of a row.
    pub width: u32,
    /// The values: f32 or bf16.
    pub data: HiddenData,
}

/// The values of [`Hidden`].
#[derive(Clone, Debug, PartialEq)]
pub enum HiddenData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// bfloat16 (half the bytes; rounding changes the results slightly).
    Bf16(Vec<half::bf16>),
}

impl HiddenData {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            HiddenData::F32(v) => v.len(),
            HiddenData::Bf16(v) => v.len(),
        }
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (f32 values are moved, not copied).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            HiddenData::F32(v) => v,
            HiddenData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// What the last stage sends back for one sequence of a micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqResult {
    /// The sequence.
    pub seq: u64,
    /// The sampled token, when the chunk asked for one.
    pub token: Option<u32>,
    /// Its logprob, when the sequence asked.
    pub logprob: Option<TokenLogprob>,
    /// The logprobs of the prompt tokens this chunk's rows predict.
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// Why the sequence failed at some stage.
    pub error: Option<String>,
}

/// The last stage's answer to a micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The micro-batch's id.
    pub id: u64,
    /// One result per chunk, in chunk order.
    pub results: Vec<SeqResult>,
    /// Every stage's timing, in stage order (the last stage's included).
    pub timings: Vec<StageTiming>,
}

/// A worker's report that its stage is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// KV positions its budget holds.
    pub kv_capacity_tokens: u64,
    /// Milliseconds loading took (receiving weights included).
    pub load_ms: u64,
    /// Weight bytes received from the head (0 when it read a file of its own).
    pub received_bytes: u64,
    /// The link to the next stage as measured when it was opened (`None` at the last stage).
    pub next_link: Option<LinkReport>,
}

/// A link as measured when it was opened: backend, round trip, bandwidth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkReport {
    /// The backend's name.
    pub transport: String,
    /// Smallest round trip of a few empty probes, microseconds.
    pub rtt_us: u32,
    /// One large probe's bytes over its time less a round trip, bytes per second.
    pub bytes_per_s: u64,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    /// Head → worker, first: the head's protocol version and its id.
    HeadHello {
        /// Protocol version.
        version: u16,
        /// The head's id (a worker serves one head at a time).
        head_id: u64,
    },
    /// Worker → head: who it is.
    Advert(Advert),
    /// Either way: the sender will not go on, and why.
    Refuse(String),
    /// Head → worker: load this stage.
    Assign(Assign),
    /// Worker → head: it lacks the model; send the stage's tensors.
    NeedWeights,
    /// Head → worker: a stage file follows.
    WeightsBegin {
        /// Its size.
        size: u64,
        /// Its SHA-256.
        hash: Hash,
    },
    /// Head → worker: a piece of the stage file.
    WeightsChunk {
        /// Where it goes.
        offset: u64,
        /// CRC-32C of the bytes.
        crc: u32,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Worker → head: the stage is loaded.
    Ready(Ready),
    /// Head → worker: are you there?
    Ping(u64),
    /// Worker → head: here.
    Pong(u64),
    /// Stage k → stage k+1: a micro-batch.
    Batch(Batch),
    /// Last stage → head: the tokens of a micro-batch.
    Sampled(Sampled),
    /// Worker → head: its stage failed.
    StageError(String),
    /// Either way: a link probe; the receiver answers [`Msg::ProbeAck`] at once.
    Probe {
        /// Its number.
        id: u64,
        /// Filler: the bytes whose transfer time gives the bandwidth.
        pad: Vec<u8>,
    },
    /// The answer to a probe.
    ProbeAck {
        /// The probe's number.
        id: u64,
        /// Bytes of its filler.
        bytes: u64,
    },
    /// An observer (`sinew plan`) → worker, first: advertise and answer probes, without
    /// taking the worker from the head it serves.
    Survey {
        /// Protocol version.
        version: u16,
    },
    /// Observer → worker: measure your link to the worker at this address.
    ProbePeer(String),
    /// Head → worker: measure your link to the next stage now, with probes of this many bytes
    /// (the link health watch).
    SampleNext {
        /// Bytes of each bandwidth probe (at most [`crate::io::PROBE_BYTES`] are sent).
        bytes: u64,
    },
    /// Worker → head or observer: a link measurement, or why it failed.
    LinkSample(Result<LinkReport, String>),
    /// Worker → head: its kernel rates, measured after its advert went without them.
    Rates(Vec<Rate>),
    /// Worker → worker, first on a peer link: which plan and stage the sender serves.
    PeerHello {
        /// Protocol version.
        version: u16,
        /// The plan.
        epoch: u64,
        /// The sender's stage.
        stage: u32,
    },
}

const T_HEAD_HELLO: u32 = 0x5100;
const T_ADVERT: u32 = 0x5101;
const T_REFUSE: u32 = 0x5102;
const T_ASSIGN: u32 = 0x5103;
const T_NEED_WEIGHTS: u32 = 0x5104;
const T_WEIGHTS_BEGIN: u32 = 0x5105;
const T_WEIGHTS_CHUNK: u32 = 0x5106;
const T_READY: u32 = 0x5107;
const T_PING: u32 = 0x5108;
const T_PONG: u32 = 0x5109;
const T_BATCH: u32 = 0x510a;
const T_SAMPLED: u32 = 0x510b;
const T_STAGE_ERROR: u32 = 0x510c;
const T_PEER_HELLO: u32 = 0x510d;
const T_PROBE: u32 = 0x510e;
const T_PROBE_ACK: u32 = 0x510f;
const T_SURVEY: u32 = 0x5110;
const T_PROBE_PEER: u32 = 0x5111;
const T_SAMPLE_NEXT: u32 = 0x5112;
const T_LINK_SAMPLE: u32 = 0x5113;
const T_RATES: u32 = 0x5114;

/// Longest string field, bytes.
const MAX_STR: usize = 1 << 20;

fn put_link(b: &mut Vec<u8>, l: &LinkReport) {
    put_str(b, &l.transport);
    b.put_u32(l.rtt_us);
    b.put_u64(l.bytes_per_s);
}

fn link(r: &mut Reader<'_>) -> Result<LinkReport, DecodeError> {
    Ok(LinkReport {
        transport: str(r, "link transport")?,
        rtt_us: r.u32("link rtt")?,
        bytes_per_s: r.u64("link bandwidth")?,
    })
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.put_u32(s.len() as u32);
    b.extend_from_slice(s.as_bytes());
}

fn put_f32(b: &mut Vec<u8>, v: f32) {
    b.put_u32(v.to_bits());
}

fn put_opt_u32(b: &mut Vec<u8>, v: Option<u32>) {
    match v {
        Some(v) => {
            b.put_u8(1);
            b.put_u32(v);
        }
        None => b.put_u8(0),
    }
}

fn put_opt_f32(b: &mut Vec<u8>, v: Option<f32>) {
    put_opt_u32(b, v.map(f32::to_bits));
}

fn put_opt_u8(b: &mut Vec<u8>, v: Option<u8>) {
    match v {
        Some(v) => {
            b.put_u8(1);
            b.put_u8(v);
        }
        None => b.put_u8(0),
    }
}

fn put_logprob(b: &mut Vec<u8>, lp: &TokenLogprob) {
    b.put_u32(lp.token);
    put_f32(b, lp.logprob);
    b.put_u32(lp.top.len() as u32);
    for &(t, v) in &lp.top {
        b.put_u32(t);
        put_f32(b, v);
    }
}

/// A count of items of at least `min_bytes` each, checked against what remains.
fn put_rates(b: &mut Vec<u8>, rates: &[Rate], call_ns: bool) {
    b.put_u32(rates.len() as u32);
    for r in rates {
        put_str(b, &r.format);
        b.put_u64(r.bytes_per_s);
        if call_ns {
            b.put_u64(r.call_ns);
        }
    }
}

/// Kernel rates: a count, then each format, rate and (`call_ns`: from version 3) cost per
/// product.
fn rates(r: &mut Reader<'_>, call_ns: bool) -> Result<Vec<Rate>, DecodeError> {
    let n = r.u32("rate count")?;
    let n = count(r, n, if call_ns { 20 } else { 12 }, "rate count")?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Rate {
            format: str(r, "rate format")?,
            bytes_per_s: r.u64("rate")?,
            call_ns: if call_ns { r.u64("call cost")? } else { 0 },
        });
    }
    Ok(out)
}

fn count(
    r: &Reader<'_>,
    n: u32,
    min_bytes: usize,
    field: &'static str,
) -> Result<usize, DecodeError> {
    let n = n as usize;
    if n.saturating_mul(min_bytes) > r.remaining() {
        return Err(DecodeError::InvalidValue {
            field,
            value: format!("{n} items in {} bytes", r.remaining()),
        });
    }
    Ok(n)
}

fn str(r: &mut Reader<'_>, field: &'static str) -> Result<String, DecodeError> {
    let n = r.u32(field)? as usize;
    if n > MAX_STR {
        return Err(DecodeError::InvalidValue {
            field,
            value: format!("{n} bytes long"),
        });
    }
    let b = r.bytes(n, field)?;
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::InvalidValue {
        field,
        value: "not UTF-8".into(),
    })
}

fn f32(r: &mut Reader<'_>, field: &'static str) -> Result<f32, DecodeError> {
    Ok(f32::from_bits(r.u32(field)?))
}

fn flag(r: &mut Reader<'_>, field: &'static str) -> Result<bool, DecodeError> {
    match r.u8(field)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(DecodeError::InvalidValue {
            field,
            value: v.to_string(),
        }),
    }
}

fn opt_u32(r: &mut Reader<'_>, field: &'static str) -> Result<Option<u32>, DecodeError> {
    Ok(if flag(r, field)? {
        Some(r.u32(field)?)
    } else {
        None
    })
}

fn opt_f32(r: &mut Reader<'_>, field: &'static str) -> Result<Option<f32>, DecodeError> {
    Ok(opt_u32(r, field)?.map(f32::from_bits))
}

fn opt_u8(r: &mut Reader<'_>, field: &'static str) -> Result<Option<u8>, DecodeError> {
    Ok(if flag(r, field)? {
        Some(r.u8(field)?)
    } else {
        None
    })
}

fn hash(r: &mut Reader<'_>, field: &'static str) -> Result<Hash, DecodeError> {
    r.array::<32>(field)
}

fn logprob(r: &mut Reader<'_>) -> Result<TokenLogprob, DecodeError> {
    let token = r.u32("logprob token")?;
    let logprob = f32(r, "logprob")?;
    let n = r.u32("top count")?;
    let n = count(r, n, 8, "top count")?;
    let mut top = Vec::with_capacity(n);
    for _ in 0..n {
        top.push((r.u32("top token")?, f32(r, "top logprob")?));
    }
    Ok(TokenLogprob {
        token,
        logprob,
        top,
    })
}

fn u32s(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<u32>, DecodeError> {
    let n = r.u32(field)?;
    let n = count(r, n, 4, field)?;
    (0..n).map(|_| r.u32(field)).collect()
}

impl Msg {
    /// The message's tag and payload.
    pub fn encode(&self) -> (u32, Vec<u8>) {
        let mut b = Vec::new();
        let tag = match self {
            Msg::HeadHello { version, head_id } => {
                b.put_u16(*version);
                b.put_u64(*head_id);
                T_HEAD_HELLO
            }
            Msg::Advert(a) => {
                b.put_u16(a.version);
                put_str(&mut b, &a.hostname);
                b.put_u64(a.mem_total);
                b.put_u64(a.mem_available);
                b.put_u32(a.cores);
                put_str(&mut b, &a.cpu_features);
                b.put_u32(a.files.len() as u32);
                for f in &a.files {
                    put_str(&mut b, &f.name);
                    b.put_u64(f.size);
                    b.extend_from_slice(&f.hash);
                }
                if a.version >= 2 {
                    put_str(&mut b, &a.node_id);
                    put_rates(&mut b, &a.speed, a.version >= 3);
                }
                T_ADVERT
            }
            Msg::Refuse(why) => {
                put_str(&mut b, why);
                T_REFUSE
            }
            Msg::Assign(a) => {
                b.put_u32(a.stage);
                b.put_u32(a.stages);
                b.put_u32(a.layer_start);
                b.put_u32(a.layer_end);
                put_str(&mut b, &a.model_name);
                b.extend_from_slice(&a.model_hash);
                b.put_u32(a.ctx);
                b.put_u64(a.kv_bytes);
                match &a.next {
                    Some(n) => {
                        b.put_u8(1);
                        put_str(&mut b, n);
                    }
                    None => b.put_u8(0),
                }
                b.put_u64(a.epoch);
                T_ASSIGN
            }
            Msg::NeedWeights => T_NEED_WEIGHTS,
            Msg::WeightsBegin { size, hash } => {
                b.put_u64(*size);
                b.extend_from_slice(hash);
                T_WEIGHTS_BEGIN
            }
            Msg::WeightsChunk { offset, crc, bytes } => {
                b = chunk_payload(*offset, *crc, bytes);
                T_WEIGHTS_CHUNK
            }
            Msg::Ready(r) => {
                b.put_u64(r.kv_capacity_tokens);
                b.put_u64(r.load_ms);
                b.put_u64(r.received_bytes);
                match &r.next_link {
                    Some(l) => {
                        b.put_u8(1);
                        put_link(&mut b, l);
                    }
                    None => b.put_u8(0),
                }
                T_READY
            }
            Msg::Probe { id, pad } => {
                b.put_u64(*id);
                b.extend_from_slice(pad);
                T_PROBE
            }
            Msg::ProbeAck { id, bytes } => {
                b.put_u64(*id);
                b.put_u64(*bytes);
                T_PROBE_ACK
            }
            Msg::Ping(t) => {
                b.put_u64(*t);
                T_PING
            }
            Msg::Pong(t) => {
                b.put_u64(*t);
                T_PONG
            }
            Msg::Batch(batch) => {
                encode_batch(&mut b, batch);
                T_BATCH
            }
            Msg::Sampled(s) => {
                b.put_u64(s.id);
                put_timings(&mut b, &s.timings);
                b.put_u32(s.results.len() as u32);
                for r in &s.results {
                    b.put_u64(r.seq);
                    put_opt_u32(&mut b, r.token);
                    match &r.logprob {
                        Some(lp) => {
                            b.put_u8(1);
                            put_logprob(&mut b, lp);
                        }
                        None => b.put_u8(0),
                    }
                    b.put_u32(r.prompt_logprobs.len() as u32);
                    for lp in &r.prompt_logprobs {
                        put_logprob(&mut b, lp);
                    }
                    match &r.error {
                        Some(e) => {
                            b.put_u8(1);
                            put_str(&mut b, e);
                        }
                        None => b.put_u8(0),
                    }
                }
                T_SAMPLED
            }
            Msg::StageError(e) => {
                put_str(&mut b, e);
                T_STAGE_ERROR
            }
            Msg::PeerHello {
                version,
                epoch,
                stage,
            } => {
                b.put_u16(*version);
                b.put_u64(*epoch);
                b.put_u32(*stage);
                T_PEER_HELLO
            }
            Msg::Survey { version } => {
                b.put_u16(*version);
                T_SURVEY
            }
            Msg::ProbePeer(addr) => {
                put_str(&mut b, addr);
                T_PROBE_PEER
            }
            Msg::SampleNext { bytes } => {
                b.put_u64(*bytes);
                T_SAMPLE_NEXT
            }
            Msg::Rates(rates) => {
                put_rates(&mut b, rates, true);
                T_RATES
            }
            Msg::LinkSample(r) => {
                match r {
                    Ok(l) => {
                        b.put_u8(1);
                        put_link(&mut b, l);
                    }
                    Err(e) => {
                        b.put_u8(0);
                        put_str(&mut b, e);
                    }
                }
                T_LINK_SAMPLE
            }
        };
        (tag, b)
    }

    /// Decodes a message from its tag and payload.
    ///
    /// # Errors
    /// [`DecodeError`] for an unknown tag, a short or long payload, or a value out of range.
    pub fn decode(tag: u32, payload: &[u8]) -> Result<Msg, DecodeError> {
        let mut r = Reader::new(payload);
        let m = match tag {
            T_HEAD_HELLO => Msg::HeadHello {
                version: r.u16("version")?,
                head_id: r.u64("head id")?,
            },
            T_ADVERT => {
                let version = r.u16("version")?;
                let hostname = str(&mut r, "hostname")?;
                let mem_total = r.u64("memory total")?;
                let mem_available = r.u64("memory available")?;
                let cores = r.u32("cores")?;
                let cpu_features = str(&mut r, "cpu features")?;
                let n = r.u32("file count")?;
                let n = count(&r, n, 44, "file count")?;
                let mut files = Vec::with_capacity(n);
                for _ in 0..n {
                    files.push(ModelFile {
                        name: str(&mut r, "file name")?,
                        size: r.u64("file size")?,
                        hash: hash(&mut r, "file hash")?,
                    });
                }
                // appended in version 2: a version-1 advert ends here and still decodes, so
                // that the version check can name both versions
                let (node_id, speed) = if version >= 2 {
                    let id = str(&mut r, "node id")?;
                    // version 3 appended each rate's cost per product
                    (id, rates(&mut r, version >= 3)?)
                } else {
                    (String::new(), Vec::new())
                };
                Msg::Advert(Advert {
                    version,
                    hostname,
                    mem_total,
                    mem_available,
                    cores,
                    cpu_features,
                    files,
                    node_id,
                    speed,
                })
            }
            T_REFUSE => Msg::Refuse(str(&mut r, "reason")?),
            T_ASSIGN => Msg::Assign(Assign {
                stage: r.u32("stage")?,
                stages: r.u32("stages")?,
                layer_start: r.u32("layer start")?,
                layer_end: r.u32("layer end")?,
                model_name: str(&mut r, "model name")?,
                model_hash: hash(&mut r, "model hash")?,
                ctx: r.u32("ctx")?,
                kv_bytes: r.u64("kv bytes")?,
                next: if flag(&mut r, "next")? {
                    Some(str(&mut r, "next")?)
                } else {
                    None
                },
                epoch: r.u64("epoch")?,
            }),
            T_NEED_WEIGHTS => Msg::NeedWeights,
            T_WEIGHTS_BEGIN => Msg::WeightsBegin {
                size: r.u64("size")?,
                hash: hash(&mut r, "hash")?,
            },
            T_WEIGHTS_CHUNK => {
                let offset = r.u64("offset")?;
                let crc = r.u32("crc")?;
                let n = r.remaining();
                let bytes = r.bytes(n, "bytes")?.to_vec();
                Msg::WeightsChunk { offset, crc, bytes }
            }
            T_READY => Msg::Ready(Ready {
                kv_capacity_tokens: r.u64("kv capacity")?,
                load_ms: r.u64("load ms")?,
                received_bytes: r.u64("received bytes")?,
                next_link: if flag(&mut r, "next link")? {
                    Some(link(&mut r)?)
                } else {
                    None
                },
            }),
            T_PROBE => {
                let id = r.u64("probe id")?;
                let n = r.remaining();
                Msg::Probe {
                    id,
                    pad: r.bytes(n, "probe")?.to_vec(),
                }
            }
            T_PROBE_ACK => Msg::ProbeAck {
                id: r.u64("probe id")?,
                bytes: r.u64("probe bytes")?,
            },
            T_SURVEY => Msg::Survey {
                version: r.u16("version")?,
            },
            T_PROBE_PEER => Msg::ProbePeer(str(&mut r, "peer address")?),
            T_SAMPLE_NEXT => Msg::SampleNext {
                bytes: r.u64("probe bytes")?,
            },
            T_RATES => Msg::Rates(rates(&mut r, true)?),
            T_LINK_SAMPLE => Msg::LinkSample(if flag(&mut r, "sample")? {
                Ok(link(&mut r)?)
            } else {
                Err(str(&mut r, "sample error")?)
            }),
            T_PING => Msg::Ping(r.u64("ping")?),
            T_PONG => Msg::Pong(r.u64("pong")?),
            T_BATCH => Msg::Batch(decode_batch(&mut r)?),
            T_SAMPLED => {
                let id = r.u64("batch id")?;
                let timings = timings(&mut r)?;
                let n = r.u32("result count")?;
                let n = count(&r, n, 14, "result count")?;
                let mut results = Vec::with_capacity(n);
                for _ in 0..n {
                    let seq = r.u64("seq")?;
                    let token = opt_u32(&mut r, "token")?;
                    let lp = if flag(&mut r, "logprob")? {
                        Some(logprob(&mut r)?)
                    } else {
                        None
                    };
                    let k = r.u32("prompt logprob count")?;
                    let k = count(&r, k, 12, "prompt logprob count")?;
                    let prompt_logprobs =
                        (0..k).map(|_| logprob(&mut r)).collect::<Result<_, _>>()?;
                    let error = if flag(&mut r, "error")? {
                        Some(str(&mut r, "error")?)
                    } else {
                        None
                    };
                    results.push(SeqResult {
                        seq,
                        token,
                        logprob: lp,
                        prompt_logprobs,
                        error,
                    });
                }
                Msg::Sampled(Sampled {
                    id,
                    results,
                    timings,
                })
            }
            T_STAGE_ERROR => Msg::StageError(str(&mut r, "error")?),
            T_PEER_HELLO => Msg::PeerHello {
                version: r.u16("version")?,
                epoch: r.u64("epoch")?,
                stage: r.u32("stage")?,
            },
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "message tag",
                    value: format!("{other:#x}"),
                });
            }
        };
        r.finish()?;
        Ok(m)
    }
}

fn chunk_payload(offset: u64, crc: u32, bytes: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + bytes.len());
    b.put_u64(offset);
    b.put_u32(crc);
    b.extend_from_slice(bytes);
    b
}

/// The tag and payload of [`Msg::WeightsChunk`] for `bytes` at `offset`, with its CRC-32C,
/// encoded straight from the caller's buffer (no intermediate message is built).
pub fn weights_chunk(offset: u64, bytes: &[u8]) -> (u32, Vec<u8>) {
    (
        T_WEIGHTS_CHUNK,
        chunk_payload(offset, crc32c::crc32c(bytes), bytes),
    )
}

fn put_timings(b: &mut Vec<u8>, t: &[StageTiming]) {
    b.put_u32(t.len() as u32);
    for x in t {
        b.put_u32(x.step_us);
        b.put_u32(x.sent_bytes);
    }
}

fn timings(r: &mut Reader<'_>) -> Result<Vec<StageTiming>, DecodeError> {
    let n = r.u32("timing count")?;
    let n = count(r, n, 8, "timing count")?;
    (0..n)
        .map(|_| {
            Ok(StageTiming {
                step_us: r.u32("step us")?,
                sent_bytes: r.u32("sent bytes")?,
            })
        })
        .collect()
}

fn encode_batch(b: &mut Vec<u8>, batch: &Batch) {
    b.put_u64(batch.id);
    b.put_u64(batch.epoch);
    b.put_u32(batch.releases.len() as u32);
    for &s in &batch.releases {
        b.put_u64(s);
    }
    b.put_u32(batch.chunks.len() as u32);
    for c in &batch.chunks {
        b.put_u64(c.seq);
        b.put_u32(c.pos);
        b.put_u32(c.rows);
        b.put_u8(match c.logits {
            Rows::Skip => 0,
            Rows::Last => 1,
            Rows::All => 2,
        });
        b.put_u8(u8::from(c.sample));
        match &c.open {
            Some(o) => {
                b.put_u8(1);
                b.put_u32(o.reserve);
                let s = &o.sampling;
                put_f32(b, s.temperature);
                put_opt_u32(b, s.top_k.map(|k| k.min(u32::MAX as usize) as u32));
                put_opt_f32(b, s.top_p);
                put_opt_f32(b, s.min_p);
                put_f32(b, s.presence_penalty);
                put_f32(b, s.frequency_penalty);
                put_f32(b, s.repetition_penalty);
                b.put_u64(s.seed);
                put_opt_u8(b, o.logprobs);
                put_opt_u8(b, o.prompt_logprobs);
                b.put_u32(o.prompt.len() as u32);
                for &t in &o.prompt {
                    b.put_u32(t);
                }
            }
            None => b.put_u8(0),
        }
    }
    put_timings(b, &batch.timings);
    b.put_u32(batch.hidden.width);
    // the values' bytes as they are in memory: the wire is little-endian, as every host of the
    // cluster is
    match &batch.hidden.data {
        HiddenData::F32(v) => {
            b.put_u8(0);
            b.put_u32(v.len() as u32);
            b.extend_from_slice(bytemuck::cast_slice(v));
        }
        HiddenData::Bf16(v) => {
            b.put_u8(1);
            b.put_u32(v.len() as u32);
            b.extend_from_slice(bytemuck::cast_slice(v));
        }
    }
}

fn decode_batch(r: &mut Reader<'_>) -> Result<Batch, DecodeError> {
    let id = r.u64("batch id")?;
    let epoch = r.u64("epoch")?;
    let n = r.u32("release count")?;
    let n = count(r, n, 8, "release count")?;
    let releases = (0..n).map(|_| r.u64("release")).collect::<Result<_, _>>()?;
    let n = r.u32("chunk count")?;
    let n = count(r, n, 19, "chunk count")?;
    let mut chunks = Vec::with_capacity(n);
    for _ in 0..n {
        let seq = r.u64("seq")?;
        let pos = r.u32("pos")?;
        let rows = r.u32("rows")?;
        let logits = match r.u8("logits")? {
            0 => Rows::Skip,
            1 => Rows::Last,
            2 => Rows::All,
            v => {
                return Err(DecodeError::InvalidValue {
                    field: "logits",
                    value: v.to_string(),
                });
            }
        };
        let sample = flag(r, "sample")?;
        let open = if flag(r, "open")? {
            let reserve = r.u32("reserve")?;
            let sampling = SamplingParams {
                temperature: f32(r, "temperature")?,
                top_k: opt_u32(r, "top_k")?.map(|k| k as usize),
                top_p: opt_f32(r, "top_p")?,
                min_p: opt_f32(r, "min_p")?,
                presence_penalty: f32(r, "presence penalty")?,
                frequency_penalty: f32(r, "frequency penalty")?,
                repetition_penalty: f32(r, "repetition penalty")?,
                seed: r.u64("seed")?,
            };
            Some(Open {
                reserve,
                sampling,
                logprobs: opt_u8(r, "logprobs")?,
                prompt_logprobs: opt_u8(r, "prompt logprobs")?,
                prompt: u32s(r, "prompt")?,
            })
        } else {
            None
        };
        chunks.push(ChunkDesc {
            seq,
            pos,
            rows,
            logits,
            sample,
            open,
        });
    }
    let timings = timings(r)?;
    let width = r.u32("width")?;
    let data = match r.u8("hidden dtype")? {
        0 => {
            let n = r.u32("hidden len")?;
            let n = count(r, n, 4, "hidden len")?;
            let bytes = r.bytes(n * 4, "hidden")?;
            HiddenData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
        1 => {
            let n = r.u32("hidden len")?;
            let n = count(r, n, 2, "hidden len")?;
            let bytes = r.bytes(n * 2, "hidden")?;
            HiddenData::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            )
        }
        v => {
            return Err(DecodeError::InvalidValue {
                field: "hidden dtype",
                value: v.to_string(),
            });
        }
    };
    let rows: u64 = chunks.iter().map(|c| u64::from(c.rows)).sum();
    if rows * u64::from(width) != data.len() as u64 {
        return Err(DecodeError::InvalidValue {
            field: "hidden",
            value: format!("{} values for {rows} rows of {width}", data.len()),
        });
    }
    Ok(Batch {
        id,
        epoch,
        releases,
        chunks,
        timings,
        hidden: Hidden { width, data },
    })
}

#[cfg(test)]
mod tests;
