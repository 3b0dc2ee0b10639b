//! Framed link halves over any byte stream: a TCP socket, an io_uring-driven socket, or a
//! shared-memory ring. The backend supplies a [`ByteSink`] and a [`ByteSource`]; this module
//! adds frames, sequence numbers, the orderly close, and the rule that an error leaving the
//! stream mid-frame breaks the link for good.
//!
//! Receives read into a buffer the backend may register, validate the header, copy what of the
//! payload came with it and read the rest straight into the caller's buffer. How much one read
//! may take depends on the payload before (see [`ReadPolicy`]): a small message costs one read;
//! while messages of [`BULK`] up to [`READ_BUFFER`] bytes stream, one read takes everything
//! queued, serving several of them; after a larger payload a header is read with at most
//! [`AFTER_LARGE`] bytes after it, so that a stream of large messages goes straight to the
//! caller's buffers with no hidden copy.

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::frame::{FrameFlags, FrameHeader, FrameKind, HEADER_LEN};
use crate::link::{Message, RecvHalf, SendHalf, check_len};

/// An operation that failed after `moved` bytes had been transferred.
pub(crate) struct Partial {
    pub(crate) moved: usize,
    pub(crate) error: Error,
}

/// The writing end of a byte stream.
pub(crate) trait ByteSink: Send {
    /// The peer, for error messages.
    fn peer(&self) -> &str;

    /// Writes a prefix of the concatenation of `parts` (at least one byte), waiting by the link's
    /// strategy until the deadline.
    fn write_some(&mut self, parts: &[&[u8]], deadline: Deadline) -> Result<usize>;

    /// Writes what fits right now, without waiting: a prefix of the concatenation of `parts`,
    /// possibly empty (`Ok(0)`).
    fn try_write_some(&mut self, parts: &[&[u8]]) -> Result<usize>;

    /// Best effort and without waiting: sends `farewell` (a close frame) if it fits right now,
    /// then shuts the direction down.
    fn close(&mut self, farewell: &[u8]);
}

/// The reading end of a byte stream.
pub(crate) trait ByteSource: Send {
    /// The peer, for error messages.
    fn peer(&self) -> &str;

    /// Reads at least one byte into `buf`, waiting until the deadline. The end of the stream is
    /// [`Error::PeerGone`]; `mid_frame` says whether a frame was cut short, for the message.
    fn read_some(&mut self, buf: &mut [u8], deadline: Deadline, mid_frame: bool) -> Result<usize>;

    /// Reads what is available right now, without waiting: `Ok(None)` when nothing is. The end
    /// of the stream is [`Error::PeerGone`].
    fn try_read_some(&mut self, buf: &mut [u8], mid_frame: bool) -> Result<Option<usize>>;

    /// As [`ByteSource::read_some`], for bytes the peer owes: every byte of `buf` belongs to a
    /// message whose length was announced (a frame's payload, a handshake message), so a backend
    /// may sleep until many of them have arrived instead of waking for every segment.
    fn read_owed(&mut self, buf: &mut [u8], deadline: Deadline, mid_frame: bool) -> Result<usize> {
        self.read_some(buf, deadline, mid_frame)
    }

    /// Called once with the receiver's read-ahead buffer, which stays at the same address for the
    /// source's whole life: a backend may register it (io_uring fixed buffers).
    fn register_read_ahead(&mut self, _buf: &mut [u8]) -> Result<()> {
        Ok(())
    }
}

/// Writes all of `parts`, in order.
pub(crate) fn write_all<S: ByteSink + ?Sized>(
    sink: &mut S,
    parts: &[&[u8]],
    deadline: Deadline,
) -> std::result::Result<(), Partial> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut written = 0usize;
    while written < total {
        // The parts not yet written, the first one trimmed.
        let mut skip = written;
        let mut rest: [&[u8]; 2] = [&[], &[]];
        let mut n = 0;
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            if n == rest.len() {
                break;
            }
            rest[n] = &p[skip..];
            skip = 0;
            n += 1;
        }
        match sink.write_some(&rest[..n], deadline) {
            Ok(0) => {
                let error = Error::PeerGone {
                    peer: sink.peer().to_string(),
                    detail: "the stream accepts no more data".into(),
                };
                return Err(Partial {
                    moved: written,
                    error,
                });
            }
            Ok(k) => written += k,
            Err(error) => {
                return Err(Partial {
                    moved: written,
                    error,
                });
            }
        }
    }
    Ok(())
}

/// Fills `buf` completely with bytes the peer owes (see [`ByteSource::read_owed`]).
pub(crate) fn read_full<S: ByteSource + ?Sized>(
    source: &mut S,
    buf: &mut [u8],
    deadline: Deadline,
) -> std::result::Result<(), Partial> {
    let mut filled = 0usize;
    while filled < buf.len() {
        match source.read_owed(&mut buf[filled..], deadline, filled > 0) {
            Ok(k) => filled += k,
            Err(error) => {
                return Err(Partial {
                    moved: filled,
                    error,
                });
            }
        }
    }
    Ok(())
}

/// Marks a half broken when an error left the stream mid-frame, and returns the error.
fn record(broken: &mut Option<String>, error: Error, mid_frame: bool) -> Error {
    if mid_frame {
        *broken = Some(error.to_string());
    }
    error
}

fn broken_error(broken: &Option<String>, peer: &str) -> Result<()> {
    match broken {
        Some(cause) => Err(Error::Broken {
            peer: peer.to_string(),
            cause: cause.clone(),
        }),
        None => Ok(()),
    }
}

/// The sending half of a framed link.
pub(crate) struct FramedSender<S: ByteSink> {
    sink: S,
    seq: u64,
    max_payload: u32,
    /// Whether data payloads carry a checksum (for media that do not guarantee integrity).
    checksum: bool,
    broken: Option<String>,
    /// A message `try_send` has started: its header and the bytes written so far.
    outgoing: Option<([u8; HEADER_LEN], usize)>,
}

impl<S: ByteSink> FramedSender<S> {
    pub(crate) fn new(sink: S, max_payload: u32, checksum: bool) -> Self {
        FramedSender {
            sink,
            seq: 0,
            max_payload,
            checksum,
            broken: None,
            outgoing: None,
        }
    }
}

impl<S: ByteSink> FramedSender<S> {
    fn header(&self, tag: u32, payload: &[u8]) -> Result<[u8; HEADER_LEN]> {
        check_len(payload.len(), self.max_payload)?;
        Ok(
            FrameHeader::try_for_payload(FrameKind::DATA, tag, self.seq, payload, self.checksum)
                .map_err(|error| Error::Frame {
                    peer: self.sink.peer().to_string(),
                    error,
                })?
                .encode(),
        )
    }
}

fn in_progress(peer: &str, what: &str) -> Error {
    Error::ProtocolViolation {
        peer: peer.to_string(),
        detail: format!("a non-blocking {what} is in progress on this half: finish it first"),
    }
}

impl<S: ByteSink> SendHalf for FramedSender<S> {
    fn try_send(&mut self, tag: u32, payload: &[u8]) -> Result<bool> {
        broken_error(&self.broken, self.sink.peer())?;
        let (header, done) = match self.outgoing {
            Some(o) => o,
            None => (self.header(tag, payload)?, 0),
        };
        let total = HEADER_LEN + payload.len();
        let parts: [&[u8]; 2] = if done < HEADER_LEN {
            [&header[done..], payload]
        } else {
            [&payload[done - HEADER_LEN..], &[]]
        };
        let done = match self.sink.try_write_some(&parts) {
            Ok(n) => done + n,
            Err(e) => {
                self.outgoing = None;
                return Err(record(&mut self.broken, e, done > 0));
            }
        };
        if done == total {
            self.outgoing = None;
            self.seq += 1;
            Ok(true)
        } else {
            self.outgoing = Some((header, done));
            Ok(false)
        }
    }

    fn send(&mut self, tag: u32, payload: &[u8], deadline: Deadline) -> Result<()> {
        broken_error(&self.broken, self.sink.peer())?;
        if self.outgoing.is_some() {
            return Err(in_progress(self.sink.peer(), "send"));
        }
        check_len(payload.len(), self.max_payload)?;
        let header =
            FrameHeader::try_for_payload(FrameKind::DATA, tag, self.seq, payload, self.checksum)
                .map_err(|error| Error::Frame {
                    peer: self.sink.peer().to_string(),
                    error,
                })?
                .encode();
        match write_all(&mut self.sink, &[&header, payload], deadline) {
            Ok(()) => {
                self.seq += 1;
                Ok(())
            }
            Err(p) => Err(record(&mut self.broken, p.error, p.moved > 0)),
        }
    }

    #[cfg(test)]
    fn inject_raw(&mut self, bytes: &[u8], deadline: Deadline) -> Result<()> {
        write_all(&mut self.sink, &[bytes], deadline).map_err(|p| p.error)
    }

    #[cfg(test)]
    fn abandon(&mut self) {
        self.broken = Some("abandoned".into());
    }
}

impl<S: ByteSink> Drop for FramedSender<S> {
    fn drop(&mut self) {
        // A message cut short cannot be followed by a close frame: the peer sees the stream end.
        if self.broken.is_some() || self.outgoing.is_some() {
            return;
        }
        let farewell = FrameHeader {
            kind: FrameKind::CLOSE,
            flags: FrameFlags::NONE,
            tag: 0,
            seq: self.seq,
            len: 0,
            payload_crc: 0,
        }
        .encode();
        self.sink.close(&farewell);
    }
}

/// The receive buffer of the socket backends (TCP, io_uring): the most one read takes.
pub(crate) const READ_BUFFER: usize = 1 << 20;

/// The smallest payload after which reads take everything queued (up to the whole buffer).
pub(crate) const BULK: usize = 64 << 10;

/// After a payload larger than the window (below [`BULK`]) or than the whole buffer, the most
/// bytes read after the next header.
pub(crate) const AFTER_LARGE: usize = 4096;

/// How much one read into the receive buffer may take, by the size of the payload before it.
///
/// - Up to `window` bytes (the backend's small read-ahead) while payloads fit it: one read per
///   message.
/// - At most [`AFTER_LARGE`] bytes after the header while payloads are larger than the window but
///   below [`BULK`], or larger than the whole buffer: the rest of such a payload goes straight to
///   the caller's buffer.
/// - The whole buffer while payloads are from [`BULK`] to its size: one read takes every queued
///   message that fits, and each is copied out.
///
/// Why not always the whole buffer: on loopback, a read that empties the socket's queue makes
/// the kernel acknowledge at once, so a receiver that empties it for every small message turns a
/// stream of coalesced segments into one segment and one ACK per message (4 KiB messages: 249
/// segments and 248 ACKs per MiB against 70 and 35, 1.5–1.7× slower). From 64 KiB the
/// segments are full either way, and one read for several messages saves operations: against
/// the fixed window before, in pooled alternating rounds, TCP 1.02–1.20× at 256 KiB and
/// 1.03–1.12× at 1 MiB, io_uring 1.01–1.07× at 64 KiB (bench/TRANSPORTS.md, "Reads sized by the
/// payload before them").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadPolicy {
    /// The backend's small read-ahead.
    pub(crate) window: usize,
    /// The whole buffer.
    pub(crate) buffer: usize,
}

impl ReadPolicy {
    /// The most bytes the next read may leave buffered, after a payload of `last` bytes, when at
    /// least `need` must be (`need` ≤ `buffer`).
    pub(crate) fn cap(&self, last: usize, need: usize) -> usize {
        let cap = if last > self.buffer {
            AFTER_LARGE
        } else if last >= BULK {
            self.buffer
        } else if last > self.window {
            AFTER_LARGE
        } else {
            self.window
        };
        cap.max(need).min(self.buffer)
    }
}

/// The receiving half of a framed link.
pub(crate) struct FramedReceiver<S: ByteSource> {
    // Declared first so that it is dropped first: a backend that registered the read-ahead
    // buffer releases it before the buffer is freed.
    source: S,
    seq: u64,
    max_payload: u32,
    /// A header already read whose payload did not fit the caller's buffer.
    pending: Option<FrameHeader>,
    broken: Option<String>,
    ahead: Box<[u8]>,
    /// Unconsumed read-ahead bytes are `ahead[start..end]`.
    start: usize,
    end: usize,
    /// A message `try_recv` has started: its header and the payload bytes received so far.
    incoming: Option<(FrameHeader, usize)>,
    /// How much one read may take.
    policy: ReadPolicy,
    /// The size of the last payload received, which sets how much the next read may take.
    last: usize,
}

impl<S: ByteSource> FramedReceiver<S> {
    /// A receiver reading from `source` into a buffer of `buffer` bytes, `window` of them at a time
    /// while messages are small (see [`ReadPolicy`]).
    pub(crate) fn new(
        mut source: S,
        max_payload: u32,
        window: usize,
        buffer: usize,
    ) -> Result<Self> {
        let buffer = buffer.max(HEADER_LEN);
        let policy = ReadPolicy {
            window: window.clamp(HEADER_LEN, buffer),
            buffer,
        };
        let mut ahead = vec![0u8; buffer].into_boxed_slice();
        source.register_read_ahead(&mut ahead)?;
        Ok(FramedReceiver {
            source,
            seq: 0,
            max_payload,
            pending: None,
            broken: None,
            ahead,
            start: 0,
            end: 0,
            incoming: None,
            policy,
            last: 0,
        })
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Moves the buffered bytes to the front, so that the next read has the whole buffer. Called
    /// only while less than a header is buffered: it copies fewer than [`HEADER_LEN`] bytes.
    fn compact(&mut self) {
        if self.start > 0 {
            self.ahead.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Reads until at least `need` (≤ [`HEADER_LEN`]) bytes are buffered.
    fn fill(&mut self, need: usize, deadline: Deadline) -> Result<()> {
        if self.buffered() >= need {
            return Ok(());
        }
        self.compact();
        let cap = self.policy.cap(self.last, need);
        while self.buffered() < need {
            let mid_frame = self.buffered() > 0;
            let k = self
                .source
                .read_some(&mut self.ahead[self.end..cap], deadline, mid_frame)?;
            self.end += k;
        }
        Ok(())
    }

    fn next_header(&mut self, deadline: Deadline) -> Result<FrameHeader> {
        if let Some(h) = self.pending.take() {
            return Ok(h);
        }
        if let Err(e) = self.fill(HEADER_LEN, deadline) {
            let mid_frame = self.buffered() > 0;
            return Err(record(&mut self.broken, e, mid_frame));
        }
        self.parse_header()
    }

    /// Decodes the header at the front of the read-ahead (at least [`HEADER_LEN`] bytes).
    fn parse_header(&mut self) -> Result<FrameHeader> {
        let decoded = FrameHeader::decode(&self.ahead[self.start..self.end], self.max_payload);
        self.start += HEADER_LEN;
        let header = match decoded {
            Ok(h) => h,
            Err(error) => {
                let e = Error::Frame {
                    peer: self.source.peer().to_string(),
                    error,
                };
                return Err(record(&mut self.broken, e, true));
            }
        };
        if header.seq != self.seq {
            let e = Error::ProtocolViolation {
                peer: self.source.peer().to_string(),
                detail: format!(
                    "frame {} out of sequence, expected {}",
                    header.seq, self.seq
                ),
            };
            return Err(record(&mut self.broken, e, true));
        }
        self.seq += 1;
        Ok(header)
    }

    /// The next header if one is complete without waiting.
    fn try_header(&mut self) -> Result<Option<FrameHeader>> {
        if let Some(h) = self.pending.take() {
            return Ok(Some(h));
        }
        while self.buffered() < HEADER_LEN {
            self.compact();
            let cap = self.policy.cap(self.last, HEADER_LEN);
            let mid_frame = self.buffered() > 0;
            match self
                .source
                .try_read_some(&mut self.ahead[self.end..cap], mid_frame)
            {
                Ok(Some(k)) => self.end += k,
                Ok(None) => return Ok(None),
                Err(e) => return Err(record(&mut self.broken, e, mid_frame)),
            }
        }
        self.parse_header().map(Some)
    }

    /// What a data-plane header means for the caller: `Ok(true)` to deliver it, `Ok(false)` to
    /// skip it (a heartbeat), or the error it stands for.
    fn classify(&mut self, header: &FrameHeader, capacity: usize) -> Result<bool> {
        let len = header.payload_len();
        match header.kind {
            FrameKind::DATA => {}
            FrameKind::CLOSE => {
                let e = Error::Closed {
                    peer: self.source.peer().to_string(),
                };
                return Err(record(&mut self.broken, e, true));
            }
            FrameKind::HEARTBEAT if len == 0 => return Ok(false),
            other => {
                let e = Error::ProtocolViolation {
                    peer: self.source.peer().to_string(),
                    detail: format!(
                        "frame kind {} with {len} bytes on an established link",
                        other.0
                    ),
                };
                return Err(record(&mut self.broken, e, true));
            }
        }
        if len > capacity {
            self.pending = Some(*header);
            return Err(Error::BufferTooSmall {
                needed: len,
                capacity,
            });
        }
        Ok(true)
    }

    fn verified(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<Message> {
        if let Err(error) = header.verify_payload(payload) {
            let e = Error::Frame {
                peer: self.source.peer().to_string(),
                error,
            };
            return Err(record(&mut self.broken, e, true));
        }
        Ok(Message {
            tag: header.tag,
            len: header.payload_len(),
        })
    }

    /// Copies what was read ahead into `payload`; returns how much.
    fn take_ahead(&mut self, payload: &mut [u8]) -> usize {
        let from_ahead = payload.len().min(self.buffered());
        payload[..from_ahead].copy_from_slice(&self.ahead[self.start..self.start + from_ahead]);
        self.start += from_ahead;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        from_ahead
    }

    /// Moves a payload into `payload`: first what was read ahead, then straight from the source.
    fn read_payload(&mut self, payload: &mut [u8], deadline: Deadline) -> Result<()> {
        self.last = payload.len();
        let from_ahead = self.take_ahead(payload);
        if from_ahead < payload.len() {
            read_full(&mut self.source, &mut payload[from_ahead..], deadline)
                .map_err(|p| p.error)?;
        }
        Ok(())
    }
}

impl<S: ByteSource> RecvHalf for FramedReceiver<S> {
    fn recv(&mut self, buf: &mut [u8], deadline: Deadline) -> Result<Message> {
        broken_error(&self.broken, self.source.peer())?;
        if self.incoming.is_some() {
            return Err(in_progress(self.source.peer(), "receive"));
        }
        loop {
            let header = self.next_header(deadline)?;
            if !self.classify(&header, buf.len())? {
                continue;
            }
            let payload = &mut buf[..header.payload_len()];
            if let Err(e) = self.read_payload(payload, deadline) {
                return Err(record(&mut self.broken, e, true));
            }
            return self.verified(&header, payload);
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Message>> {
        broken_error(&self.broken, self.source.peer())?;
        loop {
            let (header, mut done) = match self.incoming.take() {
                Some(state) => state,
                None => {
                    let Some(header) = self.try_header()? else {
                        return Ok(None);
                    };
                    if !self.classify(&header, buf.len())? {
                        continue;
                    }
                    (header, 0)
                }
            };
            let len = header.payload_len();
            if len > buf.len() {
                self.incoming = Some((header, done));
                return Err(Error::BufferTooSmall {
                    needed: len,
                    capacity: buf.len(),
                });
            }
            if done == 0 {
                done = self.take_ahead(&mut buf[..len]);
                self.last = len;
            }
            while done < len {
                match self.source.try_read_some(&mut buf[done..len], true) {
                    Ok(Some(k)) => done += k,
                    Ok(None) => {
                        self.incoming = Some((header, done));
                        return Ok(None);
                    }
                    Err(e) => return Err(record(&mut self.broken, e, true)),
                }
            }
            return self.verified(&header, &buf[..len]).map(Some);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A sink that keeps every byte written.
    struct Bytes(Vec<u8>);

    impl ByteSink for Bytes {
        fn peer(&self) -> &str {
            "test"
        }

        fn write_some(&mut self, parts: &[&[u8]], _deadline: Deadline) -> Result<usize> {
            self.try_write_some(parts)
        }

        fn try_write_some(&mut self, parts: &[&[u8]]) -> Result<usize> {
            parts.iter().for_each(|p| self.0.extend_from_slice(p));
            Ok(parts.iter().map(|p| p.len()).sum())
        }

        fn close(&mut self, _farewell: &[u8]) {}
    }

    /// A source that hands out as much as each read asks for of its first `avail` bytes, noting
    /// how much each read asked for.
    struct Recorded {
        data: Vec<u8>,
        at: usize,
        avail: usize,
        asked: Vec<usize>,
    }

    impl Recorded {
        fn new(data: Vec<u8>) -> Recorded {
            Recorded {
                avail: data.len(),
                data,
                at: 0,
                asked: Vec::new(),
            }
        }
    }

    impl ByteSource for Recorded {
        fn peer(&self) -> &str {
            "test"
        }

        fn read_some(&mut self, buf: &mut [u8], _deadline: Deadline, _mid: bool) -> Result<usize> {
            self.asked.push(buf.len());
            let n = buf.len().min(self.avail - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }

        fn try_read_some(&mut self, buf: &mut [u8], mid: bool) -> Result<Option<usize>> {
            self.read_some(buf, Deadline::after(Duration::ZERO), mid)
                .map(Some)
        }
    }

    #[test]
    fn after_a_large_payload_a_header_is_read_with_a_small_read_ahead() {
        let (payloads, data) = framed(&[100, 200 << 10, 100, 100, 50 << 10]);
        let source = Recorded::new(data);
        let mut rx = FramedReceiver::new(source, 1 << 20, 16 << 10, 16 << 10).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for (i, p) in payloads.iter().enumerate() {
            receive(&mut rx, &mut buf, i, p);
        }
        // The whole read-ahead first (two small messages and the start of the large one), the
        // rest of the large payload straight into the caller's buffer, then after it a small
        // read-ahead (the two small messages and the start of the next), then the rest of that.
        let asked = &rx.source.asked;
        assert_eq!(asked[0], 16 << 10, "{asked:?}");
        assert_eq!(asked[2], AFTER_LARGE, "{asked:?}");
        assert_eq!(asked.len(), 4, "{asked:?}");
    }

    /// Receives message `i` into `buf` and checks it is `payload`, whole.
    fn receive(rx: &mut FramedReceiver<Recorded>, buf: &mut [u8], i: usize, payload: &[u8]) {
        let m = rx
            .recv(buf, Deadline::after(Duration::from_secs(5)))
            .unwrap();
        assert_eq!((m.tag, m.len), (i as u32, payload.len()));
        assert!(buf[..m.len] == payload[..], "message {i} arrived damaged");
    }

    /// Payloads of `sizes` (each byte depending on its message and position) and the frames
    /// carrying them.
    fn framed(sizes: &[usize]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j * 7) as u8).collect())
            .collect();
        let mut tx = FramedSender::new(Bytes(Vec::new()), 1 << 20, false);
        let deadline = Deadline::after(Duration::from_secs(5));
        for (i, p) in payloads.iter().enumerate() {
            tx.send(i as u32, p, deadline).unwrap();
        }
        (payloads, std::mem::take(&mut tx.sink.0))
    }

    #[test]
    fn the_read_policy_caps_each_read_by_the_payload_before_it() {
        let p = ReadPolicy {
            window: 4096,
            buffer: 1 << 20,
        };
        // small messages: one window per read
        assert_eq!(p.cap(0, HEADER_LEN), 4096);
        assert_eq!(p.cap(4096, HEADER_LEN), 4096);
        // larger than the window, below bulk: the header and a little
        assert_eq!(p.cap(4097, HEADER_LEN), AFTER_LARGE);
        assert_eq!(p.cap(BULK - 1, HEADER_LEN), AFTER_LARGE);
        // bulk: everything queued, up to the whole buffer
        assert_eq!(p.cap(BULK, HEADER_LEN), 1 << 20);
        assert_eq!(p.cap(1 << 20, HEADER_LEN), 1 << 20);
        // larger than the buffer: the header and a little again
        assert_eq!(p.cap((1 << 20) + 1, HEADER_LEN), AFTER_LARGE);
        // never less than what must be read, never more than the buffer
        let tiny = ReadPolicy {
            window: HEADER_LEN,
            buffer: HEADER_LEN + 8,
        };
        assert_eq!(tiny.cap(0, HEADER_LEN), HEADER_LEN);
        assert_eq!(tiny.cap(BULK, HEADER_LEN), HEADER_LEN + 8);
        assert_eq!(tiny.cap(1 << 30, HEADER_LEN), HEADER_LEN + 8);
    }

    #[test]
    fn while_bulk_messages_stream_one_read_serves_several() {
        let (payloads, data) = framed(&[100 << 10; 8]);
        let source = Recorded::new(data);
        let mut rx = FramedReceiver::new(source, 1 << 20, 4096, 1 << 20).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for (i, p) in payloads.iter().enumerate() {
            receive(&mut rx, &mut buf, i, p);
        }
        // The first header with a window after it, the rest of the first payload straight into
        // the caller's buffer; then one read of the whole buffer holds the seven others.
        let asked = &rx.source.asked;
        assert_eq!(
            asked[..],
            [4096, (100 << 10) + HEADER_LEN - 4096, 1 << 20],
            "{asked:?}"
        );
    }

    #[test]
    fn after_bulk_messages_small_ones_are_read_a_window_at_a_time_again() {
        let mut sizes = vec![100 << 10, 100];
        sizes.extend([100; 60]);
        let (payloads, data) = framed(&sizes);
        let first_two = 2 * HEADER_LEN + (100 << 10) + 100;
        let mut source = Recorded::new(data);
        source.avail = first_two;
        let mut rx = FramedReceiver::new(source, 1 << 20, 4096, 1 << 20).unwrap();
        let mut buf = vec![0u8; 100 << 10];
        for (i, p) in payloads.iter().enumerate() {
            if i == 2 {
                // The rest of the stream arrives only now.
                rx.source.avail = rx.source.data.len();
            }
            receive(&mut rx, &mut buf, i, p);
        }
        // A window, the rest of the bulk payload, the whole buffer offered after it (it holds the
        // small message that came with it), then windows again: 60 small messages take two, the
        // second a window less the 4 bytes of a header already buffered.
        let asked = &rx.source.asked;
        assert_eq!(
            asked[..],
            [4096, (100 << 10) + HEADER_LEN - 4096, 1 << 20, 4096, 4092],
            "{asked:?}"
        );
    }

    /// A source that hands out the stream in pieces of the given sizes (cycled, the first one
    /// not empty), each cut to what the read asks for; a zero-sized piece is a try-read that
    /// finds nothing (a waiting read goes on to the next piece).
    struct Pieces {
        data: Vec<u8>,
        at: usize,
        pieces: Vec<usize>,
        next: usize,
        largest_ask: usize,
    }

    impl Pieces {
        fn piece(&mut self, buf: &mut [u8]) -> usize {
            self.largest_ask = self.largest_ask.max(buf.len());
            let piece = self.pieces[self.next % self.pieces.len()];
            self.next += 1;
            let n = piece.min(buf.len()).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            n
        }
    }

    impl ByteSource for Pieces {
        fn peer(&self) -> &str {
            "test"
        }

        fn read_some(&mut self, buf: &mut [u8], _deadline: Deadline, mid: bool) -> Result<usize> {
            loop {
                if self.at == self.data.len() {
                    return Err(Error::stream_ended("test", mid));
                }
                match self.piece(buf) {
                    0 => continue,
                    n => return Ok(n),
                }
            }
        }

        fn try_read_some(&mut self, buf: &mut [u8], _mid: bool) -> Result<Option<usize>> {
            Ok(match self.piece(buf) {
                0 => None,
                n => Some(n),
            })
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever mix of message sizes arrives (small, between the window and bulk, bulk,
        /// larger than the buffer), in whatever pieces the stream hands out, through blocking
        /// and non-blocking receives alike: every message arrives whole and in order, and no
        /// read asks for more than the buffer or one payload.
        #[test]
        fn every_message_arrives_whole_whatever_the_pieces_and_sizes(
            sizes in proptest::collection::vec(
                proptest::prop_oneof![
                    0usize..600,
                    600usize..5000,
                    BULK..BULK + 5000,
                    150_000usize..170_000
                ],
                1..12,
            ),
            first in 1usize..70_000,
            more in proptest::collection::vec(0usize..70_000, 0..7),
            blocking in proptest::collection::vec(proptest::bool::ANY, 1..8),
        ) {
            let (payloads, data) = framed(&sizes);
            let pieces = [vec![first], more].concat();
            let source = Pieces { data, at: 0, pieces, next: 0, largest_ask: 0 };
            let buffer = 128 << 10;
            let mut rx = FramedReceiver::new(source, 1 << 20, 512, buffer).unwrap();
            let mut buf = vec![0u8; 200 << 10];
            let deadline = Deadline::after(Duration::from_secs(5));
            for (i, p) in payloads.iter().enumerate() {
                let m = if blocking[i % blocking.len()] {
                    rx.recv(&mut buf, deadline).unwrap()
                } else {
                    loop {
                        if let Some(m) = rx.try_recv(&mut buf).unwrap() {
                            break m;
                        }
                    }
                };
                proptest::prop_assert_eq!((m.tag, m.len), (i as u32, p.len()));
                proptest::prop_assert!(buf[..m.len] == p[..], "message {} arrived damaged", i);
            }
            // A read asks for at most the buffer, or the rest of one payload.
            let largest = sizes.iter().copied().max().unwrap_or(0).max(buffer);
            proptest::prop_assert!(rx.source.largest_ask <= largest);
        }
    }
}
