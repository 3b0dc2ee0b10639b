//! The local scheduler: continuous batching on a thread of its own.
//!
//! Requests wait in a queue until the KV pool can reserve their positions (prompt plus new tokens,
//! within the context), then join the running batch at the next step. Each step runs every running
//! sequence's next decode token and as many prompt chunks as the step's row budget allows (long
//! prompts go in chunks, so decodes are never stalled behind a whole prompt). Each request's events
//! stream through its own channel; dropping the [`Stream`] cancels the request, which leaves the
//! batch — and gives its positions back — at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::decode::{DecodeParams, Decoded, Decoder, Finish, TokenLogprob, token_logprob};
use crate::error::{Error, Result};
use crate::kv::{KvCache, KvPool};
use crate::model::{Chunk, Input, Logits, Model, Output};
use crate::text::Text;

/// How the scheduler batches.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// Sequences in the running batch at most.
    pub max_seqs: usize,
    /// Prompt positions one sequence brings to a step at most.
    pub prefill_chunk: usize,
    /// Rows (positions of all sequences) in one step at most; decode tokens come first.
    pub max_step_tokens: usize,
    /// Requests waiting for room at most; past it [`Scheduler::submit`] refuses.
    pub max_queue: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_seqs: 16,
            prefill_chunk: 256,
            max_step_tokens: 512,
            max_queue: 256,
        }
    }
}

/// One request: a prompt and how to decode it.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Decoding parameters.
    pub params: DecodeParams,
    /// Send the prompt's logprobs with this many alternatives (0..=20); `None`: don't.
    pub prompt_logprobs: Option<usize>,
}

/// What a request's stream carries, in order: the prompt logprobs (if asked), one [`Event::Token`]
/// per generated token, then exactly one of [`Event::Finished`] or [`Event::Error`].
#[derive(Debug)]
pub enum Event {
    /// Each prompt token's logprob given its prefix (the first has none).
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// A generated token and the text that became final with it.
    Token(Decoded),
    /// The request is done.
    Finished {
        /// Why.
        finish: Finish,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The request failed; nothing follows.
    Error(Error),
}

/// A request's events. Dropping it cancels the request.
pub struct Stream {
    rx: Receiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl Stream {
    /// The next event, waiting at most `timeout`; `None` on timeout or when the scheduler is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event without waiting, if one is there.
    pub fn try_recv(&self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Cancels the request (as dropping the stream does).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The sending end of a request's [`Stream`], for schedulers outside this crate (a pipeline's
/// head): what it sends, the stream receives; once the stream is dropped or cancelled,
/// [`Sink::cancelled`] says so.
pub struct Sink {
    tx: Sender<Event>,
    cancel: Arc<AtomicBool>,
}

impl Sink {
    /// Sends an event; `false` (and the request counts as cancelled) when the stream is gone.
    pub fn send(&self, event: Event) -> bool {
        if self.tx.send(event).is_err() {
            self.cancel.store(true, Ordering::Release);
            return false;
        }
        true
    }

    /// Whether the request was cancelled (its stream dropped or [`Stream::cancel`] called).
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
}

/// A connected [`Sink`] and [`Stream`].
pub fn channel() -> (Sink, Stream) {
    let (tx, rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    (
        Sink {
            tx,
            cancel: cancel.clone(),
        },
        Stream { rx, cancel },
    )
}

/// The scheduler's counters, as of its last step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Sequences in the running batch.
    pub running: usize,
    /// Requests waiting for room.
    pub queued: usize,
    /// KV positions reserved.
    pub kv_used_tokens: usize,
    /// KV positions in the budget.
    pub kv_capacity_tokens: usize,
    /// Steps run.
    pub steps: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
}

enum Msg {
    Submit(Box<Waiting>),
    Shutdown,
}

struct Waiting {
    prompt: Vec<u32>,
    decoder: Decoder,
    prompt_logprobs: Option<usize>,
    tx: Sender<Event>,
    cancel: Arc<AtomicBool>,
}

struct Running {
    w: Waiting,
    cache: KvCache,
    /// Prompt positions fed so far.
    fed: usize,
    /// The token to feed next, once the prompt is in.
    next: Option<u32>,
    prompt_lp: Vec<Option<TokenLogprob>>,
}

impl Running {
    fn prefilling(&self) -> bool {
        self.fed < self.w.prompt.len()
    }
}

/// Continuous batching over one model (or the whole model of a single node) on its own thread.
pub struct Scheduler {
    tx: SyncSender<Msg>,
    stats: Arc<Mutex<SchedulerStats>>,
    text: Arc<Text>,
    kv: KvPool,
    vocab: usize,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the scheduler's thread over `model` (a whole model: it embeds tokens and ends in the
    /// output head), with sequences drawn from `kv`.
    ///
    /// # Errors
    /// [`Error::Request`] for options of 0, a pool of another model, or a model that is one
    /// pipeline stage.
    pub fn new(
        model: Arc<Model>,
        text: Arc<Text>,
        kv: KvPool,
        options: SchedulerOptions,
    ) -> Result<Self> {
        if options.max_seqs == 0 || options.prefill_chunk == 0 || options.max_step_tokens == 0 {
            return Err(Error::Request(
                "max_seqs, prefill_chunk and max_step_tokens must be at least 1".into(),
            ));
        }
        if *kv.shape() != model.kv_shape() {
            return Err(Error::Request(
                "the KV pool belongs to another model".into(),
            ));
        }
        let n = model.config().num_layers;
        if model.layers() != (0..n) {
            return Err(Error::Request(format!(
                "the local scheduler runs a whole model, not layers {:?}",
                model.layers()
            )));
        }
        let vocab = model.config().vocab_size;
        let (tx, rx) = mpsc::sync_channel(options.max_queue.max(1));
        let stats = Arc::new(Mutex::new(SchedulerStats {
            kv_capacity_tokens: kv.capacity_tokens(),
            ..Default::default()
        }));
        let mut core = Core {
            model,
            text: text.clone(),
            kv: kv.clone(),
            options,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: stats.clone(),
            steps: 0,
            generated: 0,
        };
        let thread = std::thread::Builder::new()
            .name("sinew-scheduler".into())
            .spawn(move || core.run(rx))
            .map_err(|e| Error::Request(format!("starting the scheduler thread: {e}")))?;
        Ok(Scheduler {
            tx,
            stats,
            text,
            kv,
            vocab,
            thread: Some(thread),
        })
    }

    /// Queues a request. Its parameters, prompt and length are checked here, so a request that
    /// can never run is refused at once.
    ///
    /// # Errors
    /// [`Error::Request`] for bad parameters, an empty prompt or a token id outside the
    /// vocabulary; [`Error::ContextLength`] for a
    /// request longer than the context or the whole KV budget; [`Error::QueueFull`] when
    /// [`SchedulerOptions::max_queue`] requests already wait.
    pub fn submit(&self, request: Request) -> Result<Stream> {
        let Request {
            prompt,
            params,
            prompt_logprobs,
        } = request;
        if let Some(n) = prompt_logprobs
            && n > crate::decode::MAX_TOP_LOGPROBS
        {
            return Err(Error::Request(format!(
                "at most {} top prompt logprobs, not {n}",
                crate::decode::MAX_TOP_LOGPROBS
            )));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(Error::Request(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        let decoder = Decoder::new(&self.text, &prompt, params, self.kv.ctx())?;
        self.kv.check_fits(decoder.positions_needed())?;
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let w = Waiting {
            prompt,
            decoder,
            prompt_logprobs,
            tx,
            cancel: cancel.clone(),
        };
        match self.tx.try_send(Msg::Submit(Box::new(w))) {
            Ok(()) => Ok(Stream { rx, cancel }),
            Err(TrySendError::Full(_)) => Err(Error::QueueFull),
            Err(TrySendError::Disconnected(_)) => {
                Err(Error::Request("the scheduler has stopped".into()))
            }
        }
    }

    /// The counters as of the last step.
    pub fn stats(&self) -> SchedulerStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The KV pool the scheduler draws from.
    pub fn kv(&self) -> &KvPool {
        &self.kv
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // a full queue still takes the message once the thread drains it
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The scheduler thread's state.
struct Core {
    model: Arc<Model>,
    text: Arc<Text>,
    kv: KvPool,
    options: SchedulerOptions,
    waiting: VecDeque<Box<Waiting>>,
    running: Vec<Running>,
    stats: Arc<Mutex<SchedulerStats>>,
    steps: u64,
    generated: u64,
}

/// How long an idle scheduler sleeps between looks at its queue (it wakes at once on a request).
const IDLE_WAIT: Duration = Duration::from_secs(1);

impl Core {
    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            // idle: block (with a deadline) until a request comes; busy: take what is there
            let first = if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv_timeout(IDLE_WAIT) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                None
            };
            let mut shutdown = false;
            for m in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                match m {
                    Msg::Submit(w) => self.waiting.push_back(w),
                    Msg::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                for w in self.waiting.drain(..) {
                    let _ =
                        w.tx.send(Event::Error(Error::Request("the scheduler stopped".into())));
                }
                for r in self.running.drain(..) {
                    let _ =
                        r.w.tx
                            .send(Event::Error(Error::Request("the scheduler stopped".into())));
                }
                self.publish();
                return;
            }
            self.drop_cancelled();
            self.admit();
            self.publish();
            if !self.running.is_empty() {
                self.step();
                self.publish();
            } else if !self.waiting.is_empty() {
                // nothing runs and the head of the queue does not fit: only a cancellation can
                // change that; look again shortly
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn publish(&self) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        *s = SchedulerStats {
            running: self.running.len(),
            queued: self.waiting.len(),
            kv_used_tokens: self.kv.used_tokens(),
            kv_capacity_tokens: self.kv.capacity_tokens(),
            steps: self.steps,
            generated_tokens: self.generated,
        };
    }

    fn drop_cancelled(&mut self) {
        self.waiting.retain(|w| !w.cancel.load(Ordering::Acquire));
        self.running.retain(|r| !r.w.cancel.load(Ordering::Acquire));
    }

    /// Moves requests from the queue into the batch, first come first served, while the pool has
    /// room for their whole reservation.
    fn admit(&mut self) {
        while self.running.len() < self.options.max_seqs {
            let Some(w) = self.waiting.front() else { break };
            match self.kv.sequence(w.decoder.positions_needed()) {
                Ok(cache) => {
                    let w = *self.waiting.pop_front().expect("looked at");
                    let lp = if w.prompt_logprobs.is_some() {
                        vec![None]
                    } else {
                        Vec::new()
                    };
                    self.running.push(Running {
                        w,
                        cache,
                        fed: 0,
                        next: None,
                        prompt_lp: lp,
                    });
                }
                Err(Error::NoRoom { .. }) => break,
                Err(e) => {
                    let w = self.waiting.pop_front().expect("looked at");
                    let _ = w.tx.send(Event::Error(e));
                }
            }
        }
    }

    /// One batched step over the running sequences.
    fn step(&mut self) {
        // rows: decode tokens first, then prompt chunks while the step has room
        let mut budget = self.options.max_step_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (running index, rows)
        let mut ids: Vec<u32> = Vec::new();
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].prefilling());
        for i in order {
            if budget == 0 {
                break;
            }
            let r = &self.running[i];
            if r.prefilling() {
                let n = (r.w.prompt.len() - r.fed)
                    .min(self.options.prefill_chunk)
                    .min(budget);
                ids.extend(&r.w.prompt[r.fed..r.fed + n]);
                plan.push((i, n));
                budget -= n;
            } else if let Some(t) = r.next {
                ids.push(t);
                plan.push((i, 1));
                budget -= 1;
            }
        }
        if plan.is_empty() {
            return;
        }
        // which rows need logits
        let wants: Vec<Logits> = plan
            .iter()
            .map(|&(i, n)| {
                let r = &self.running[i];
                let ends_prompt = !r.prefilling() || r.fed + n == r.w.prompt.len();
                if r.w.prompt_logprobs.is_some() && r.prefilling() {
                    Logits::All
                } else if ends_prompt && r.w.decoder.finish().is_none() {
                    Logits::Last
                } else {
                    Logits::Skip
                }
            })
            .collect();
        let result = {
            let mut refs: Vec<Option<&mut Running>> = self.running.iter_mut().map(Some).collect();
            let mut chunks: Vec<Chunk<'_>> = plan
                .iter()
                .zip(&wants)
                .map(|(&(i, n), &logits)| Chunk {
                    cache: refs[i]
                        .take()
                        .map(|r| &mut r.cache)
                        .expect("each sequence once"),
                    rows: n,
                    logits,
                })
                .collect();
            self.model.step(&mut chunks, Input::Tokens(&ids))
        };
        self.steps += 1;
        let logits = match result.and_then(|o| match o {
            Output::Logits(l) => Ok(l.to_vec2::<f32>()?),
            Output::Hidden(_) => Err(Error::Request("the model has no output head".into())),
        }) {
            Ok(l) => l,
            Err(e) => {
                // a failed step fails every sequence in it
                let msg = e.to_string();
                let failed: Vec<usize> = plan.iter().map(|p| p.0).collect();
                for &i in failed.iter().rev() {
                    let r = self.running.remove(i);
                    let _ =
                        r.w.tx
                            .send(Event::Error(Error::Request(format!("step failed: {msg}"))));
                }
                return;
            }
        };
        let mut rows = logits.iter();
        let mut done: Vec<(usize, Option<Finish>)> = Vec::new();
        for (&(i, n), &want) in plan.iter().zip(&wants) {
            let r = &mut self.running[i];
            let mine: Vec<&Vec<f32>> = match want {
                Logits::Skip => Vec::new(),
                Logits::Last => rows.by_ref().take(1).collect(),
                Logits::All => rows.by_ref().take(n).collect(),
            };
            match Self::advance(&self.text, r, n, &mine) {
                Ok((generated, finish)) => {
                    self.generated += generated as u64;
                    if finish.is_some() {
                        done.push((i, finish));
                    }
                }
                Err(e) => {
                    let _ = r.w.tx.send(Event::Error(e));
                    done.push((i, None));
                }
            }
        }
        // finished sequences leave now and give their positions back before the client hears
        // that they finished; cancelled ones (a failed send: the receiver is gone) too
        done.sort_unstable_by_key(|d| d.0);
        for &(i, finish) in done.iter().rev() {
            let Running { w, cache, .. } = self.running.remove(i);
            drop(cache);
            if let Some(f) = finish {
                finished(&w, f);
            }
        }
        self.drop_cancelled();
    }

    /// Applies a step's `rows` logits to a sequence that fed `n` positions: prompt logprobs,
    /// then the next token. Returns the tokens generated (0 or 1) and, when the request is done,
    /// why.
    fn advance(
        text: &Text,
        r: &mut Running,
        n: usize,
        rows: &[&Vec<f32>],
    ) -> Result<(usize, Option<Finish>)> {
        let was_prefilling = r.prefilling();
        if was_prefilling {
            let from = r.fed;
            r.fed += n;
            if let Some(top) = r.w.prompt_logprobs {
                // row j (position from + j) predicts prompt token from + j + 1
                for (j, row) in rows.iter().enumerate() {
                    if let Some(&t) = r.w.prompt.get(from + j + 1) {
                        r.prompt_lp.push(Some(token_logprob(row, t, top)?));
                    }
                }
                if !r.prefilling() {
                    let lp = std::mem::take(&mut r.prompt_lp);
                    send(&r.w, Event::PromptLogprobs(lp));
                }
            }
            if r.prefilling() {
                return Ok((0, None));
            }
            if let Some(f) = r.w.decoder.finish() {
                // max_tokens 0: the prompt was all there was to do
                return Ok((0, Some(f)));
            }
        }
        let Some(row) = rows.last() else {
            return Ok((0, None));
        };
        let out = r.w.decoder.step(text, row)?;
        r.next = Some(out.token);
        let finish = out.finish;
        send(&r.w, Event::Token(out));
        Ok((1, finish))
    }
}

fn send(w: &Waiting, e: Event) {
    if w.tx.send(e).is_err() {
        w.cancel.store(true, Ordering::Release);
    }
}

fn finished(w: &Waiting, finish: Finish) {
    send(
        w,
        Event::Finished {
            finish,
            prompt_tokens: w.prompt.len(),
            completion_tokens: w.decoder.tokens().len(),
        },
    );
}

/// Collects a stream's events until it finishes, waiting at most `deadline` in all.
///
/// # Errors
/// The request's error; [`Error::Request`] when the deadline passes first.
pub fn collect(stream: &Stream, deadline: Duration) -> Result<(Vec<Event>, Finish)> {
    let end = Instant::now() + deadline;
    let mut events = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match stream.recv_timeout(left) {
            Some(Event::Error(e)) => return Err(e),
            Some(Event::Finished {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                events.push(Event::Finished {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                });
                return Ok((events, finish));
            }
            Some(e) => events.push(e),
            None => {
                return Err(Error::Request(format!(
                    "no end of the request within {deadline:?}"
                )));
            }
        }
    }
}
