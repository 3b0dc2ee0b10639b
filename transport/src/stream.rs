//! Framed link halves over any byte stream: a TCP socket, an io_uring-driven socket, or a
//! shared-memory ring. The backend supplies a [`ByteSink`] and a [`ByteSource`]; this module
//! adds frames, sequence numbers, the orderly close, and the rule that an error leaving the
//! stream mid-frame breaks the link for good.
//!
//! Receives read ahead a few KiB into a buffer the backend may register, validate the header,
//! copy what of the payload came with it and read the rest straight into the caller's buffer:
//! a small message costs one read, a large one no hidden copy.

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

/// Bytes read ahead of the frame being decoded.
pub(crate) const READ_AHEAD: usize = 4096;

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
    /// Whether the last payload `recv` took was larger than the read-ahead buffer: while large
    /// messages stream, a header is read with at most [`READ_AHEAD`] bytes after it, the rest of
    /// the payload going straight to the caller's buffer rather than through this one.
    large: bool,
}

impl<S: ByteSource> FramedReceiver<S> {
    pub(crate) fn new(mut source: S, max_payload: u32, read_ahead: usize) -> Result<Self> {
        let mut ahead = vec![0u8; read_ahead.max(HEADER_LEN)].into_boxed_slice();
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
            large: false,
        })
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Reads until at least `need` (≤ the read-ahead size) bytes are buffered.
    fn fill(&mut self, need: usize, deadline: Deadline) -> Result<()> {
        if self.buffered() >= need {
            return Ok(());
        }
        if self.ahead.len() - self.start < need {
            self.ahead.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let cap = if self.large {
            (self.start + need.max(READ_AHEAD)).min(self.ahead.len())
        } else {
            self.ahead.len()
        };
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
            if self.ahead.len() - self.start < HEADER_LEN {
                self.ahead.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let mid_frame = self.buffered() > 0;
            match self
                .source
                .try_read_some(&mut self.ahead[self.end..], mid_frame)
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
        self.large = payload.len() > self.ahead.len();
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

    /// A source that hands out as much as each read asks for, noting how much that was.
    struct Recorded {
        data: Vec<u8>,
        at: usize,
        asked: Vec<usize>,
    }

    impl ByteSource for Recorded {
        fn peer(&self) -> &str {
            "test"
        }

        fn read_some(&mut self, buf: &mut [u8], _deadline: Deadline, _mid: bool) -> Result<usize> {
            self.asked.push(buf.len());
            let n = buf.len().min(self.data.len() - self.at);
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
        let sizes = [100, 200 << 10, 100, 100, 50 << 10];
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 13 + j) as u8).collect())
            .collect();
        let mut tx = FramedSender::new(Bytes(Vec::new()), 1 << 20, false);
        let deadline = Deadline::after(Duration::from_secs(5));
        for (i, p) in payloads.iter().enumerate() {
            tx.send(i as u32, p, deadline).unwrap();
        }
        let source = Recorded {
            data: std::mem::take(&mut tx.sink.0),
            at: 0,
            asked: Vec::new(),
        };
        let mut rx = FramedReceiver::new(source, 1 << 20, 16 << 10).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for (i, p) in payloads.iter().enumerate() {
            let m = rx.recv(&mut buf, deadline).unwrap();
            assert_eq!((m.tag, m.len), (i as u32, p.len()));
            assert!(buf[..m.len] == p[..], "message {i} arrived damaged");
        }
        // The whole read-ahead first (two small messages and the start of the large one), the
        // rest of the large payload straight into the caller's buffer, then after it a small
        // read-ahead (the two small messages and the start of the next), then the rest of that.
        let asked = &rx.source.asked;
        assert_eq!(asked[0], 16 << 10, "{asked:?}");
        assert_eq!(asked[2], READ_AHEAD, "{asked:?}");
        assert_eq!(asked.len(), 4, "{asked:?}");
    }
}
