//! Messages over links: encode and send with a deadline; receive into a buffer that grows to the
//! message (the link says how long a message is before consuming it) and decode.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use transport::{Deadline, LinkReceiver, LinkSender};

use crate::error::{Error, Result};
use crate::wire::Msg;

/// How long a send may wait for the peer to take a message.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A link's sending half that several threads share (pings beside batches).
pub type SharedSender = Arc<Mutex<LinkSender>>;

/// Sends `m` on `tx` within [`SEND_TIMEOUT`].
///
/// # Errors
/// Transport errors.
pub fn send(tx: &mut LinkSender, m: &Msg) -> Result<()> {
    let (tag, payload) = m.encode();
    tx.send_until(tag, &payload, Deadline::after(SEND_TIMEOUT))?;
    Ok(())
}

/// Sends `m` on a shared sender.
///
/// # Errors
/// Transport errors.
pub fn send_shared(tx: &SharedSender, m: &Msg) -> Result<()> {
    let (tag, payload) = m.encode();
    let mut tx = tx.lock().unwrap_or_else(|e| e.into_inner());
    tx.send_until(tag, &payload, Deadline::after(SEND_TIMEOUT))?;
    Ok(())
}

/// A receiving half with its buffer.
pub struct Rx {
    rx: LinkReceiver,
    buf: Vec<u8>,
    peer: String,
}

impl Rx {
    /// Wraps a receiving half.
    pub fn new(rx: LinkReceiver) -> Self {
        let peer = rx.info().peer_addr.clone();
        Rx {
            rx,
            buf: vec![0u8; 64 << 10],
            peer,
        }
    }

    /// The receiving half back.
    pub fn into_inner(self) -> LinkReceiver {
        self.rx
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The next message, before `deadline`.
    ///
    /// # Errors
    /// Transport errors (a timeout among them), an undecodable message.
    pub fn recv(&mut self, deadline: Deadline) -> Result<Msg> {
        loop {
            match self.rx.recv_until(&mut self.buf, deadline) {
                Ok(m) => {
                    return Msg::decode(m.tag, &self.buf[..m.len]).map_err(|error| Error::Decode {
                        peer: self.peer.clone(),
                        error,
                    });
                }
                Err(transport::Error::BufferTooSmall { needed, .. }) => {
                    self.buf.resize(needed, 0);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Whether an error is a receive timeout with the link still usable.
pub fn is_timeout(e: &Error) -> bool {
    matches!(e, Error::Transport(transport::Error::Timeout { .. }))
}

/// The answer to a probe of `pad` numbered `id` (what [`measure`] waits for).
pub fn probe_ack(id: u64, pad: &[u8]) -> Msg {
    Msg::ProbeAck {
        id,
        bytes: pad.len() as u64,
    }
}

/// Bytes of the bandwidth probe sent when a link opens.
pub const PROBE_BYTES: usize = 8 << 20;

/// Measures a link whose peer answers probes: the smallest round trip of 3 empty probes, then the
/// faster of two probes of `big` bytes, the bandwidth its bytes over its time less a round trip
/// (a sample of bounded cost: it counts the copies of encoding and decoding too).
///
/// # Errors
/// Transport errors, a wrong answer, or no answer within 10 s.
pub fn measure(tx: &mut LinkSender, rx: &mut Rx, big: usize) -> Result<crate::wire::LinkReport> {
    let transport = tx.info().transport.to_string();
    measure_with(
        transport,
        probe_sender(tx),
        |deadline| rx.recv(deadline),
        big,
    )
}

/// Sends probes on `tx` with the deadline given.
fn probe_sender(tx: &mut LinkSender) -> impl FnMut(&Msg, Deadline) -> Result<()> + '_ {
    |m, deadline| {
        let (tag, payload) = m.encode();
        tx.send_until(tag, &payload, deadline)?;
        Ok(())
    }
}

/// [`measure`] on a worker's control link as it joins: the worker sends its kernel rates
/// ([`Msg::Rates`]) as soon as they are measured, which may fall between the probes' answers;
/// they are kept and returned, not taken for a wrong answer.
///
/// # Errors
/// As [`measure`].
pub fn measure_join(
    tx: &mut LinkSender,
    rx: &mut Rx,
    big: usize,
) -> Result<(crate::wire::LinkReport, Option<Vec<crate::wire::Rate>>)> {
    let transport = tx.info().transport.to_string();
    measure_keeping_rates(
        transport,
        probe_sender(tx),
        |deadline| rx.recv(deadline),
        big,
    )
}

/// [`measure_with`], keeping the last [`Msg::Rates`] that arrives among the answers.
fn measure_keeping_rates(
    transport: String,
    send: impl FnMut(&Msg, Deadline) -> Result<()>,
    mut recv: impl FnMut(Deadline) -> Result<Msg>,
    big: usize,
) -> Result<(crate::wire::LinkReport, Option<Vec<crate::wire::Rate>>)> {
    let mut kept = None;
    let report = measure_with(
        transport,
        send,
        |deadline| loop {
            match recv(deadline)? {
                Msg::Rates(rates) => kept = Some(rates),
                other => return Ok(other),
            }
        },
        big,
    )?;
    Ok((report, kept))
}

/// [`measure`] over any way of sending a probe and reading its answer (a shared sender and
/// answers forwarded by a reader thread).
///
/// # Errors
/// Sending or receiving failed, a wrong answer, or no answer within 10 s.
pub fn measure_with(
    transport: String,
    mut send: impl FnMut(&Msg, Deadline) -> Result<()>,
    mut recv: impl FnMut(Deadline) -> Result<Msg>,
    big: usize,
) -> Result<crate::wire::LinkReport> {
    let mut probe = |id: u64, pad: Vec<u8>| -> Result<std::time::Duration> {
        let n = pad.len() as u64;
        let started = std::time::Instant::now();
        send(
            &Msg::Probe { id, pad },
            Deadline::after(Duration::from_secs(10)),
        )?;
        match recv(Deadline::after(Duration::from_secs(10)))? {
            Msg::ProbeAck { id: got, bytes } if got == id && bytes == n => Ok(started.elapsed()),
            Msg::Refuse(why) => Err(Error::Refused(why)),
            other => Err(Error::Protocol(format!("a probe answered with {other:?}"))),
        }
    };
    let mut rtt = Duration::MAX;
    for id in 0..3 {
        rtt = rtt.min(probe(id, Vec::new())?);
    }
    // twice: the first pays for growing the receiver's buffer
    let t = probe(3, vec![0u8; big])?.min(probe(4, vec![0u8; big])?);
    let secs = t.saturating_sub(rtt).as_secs_f64().max(1e-6);
    Ok(crate::wire::LinkReport {
        transport,
        rtt_us: rtt.as_micros().min(u128::from(u32::MAX)) as u32,
        bytes_per_s: (big as f64 / secs) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Rate;
    use std::collections::VecDeque;

    /// A peer that answers every probe, and sends its rates after the `after`-th answer.
    fn scripted(after: usize) -> Result<(crate::wire::LinkReport, Option<Vec<Rate>>)> {
        let rates = vec![Rate {
            format: "q4_k".into(),
            bytes_per_s: 1 << 30,
            call_ns: 500,
        }];
        let inbox = std::cell::RefCell::new(VecDeque::new());
        let mut answered = 0;
        measure_keeping_rates(
            "tcp".into(),
            |m, _| {
                let Msg::Probe { id, pad } = m else {
                    panic!("sent {m:?}, not a probe");
                };
                inbox.borrow_mut().push_back(probe_ack(*id, pad));
                answered += 1;
                if answered == after {
                    inbox.borrow_mut().push_back(Msg::Rates(rates.clone()));
                }
                Ok(())
            },
            |_| {
                inbox
                    .borrow_mut()
                    .pop_front()
                    .ok_or_else(|| Error::Protocol("no answer".into()))
            },
            64,
        )
    }

    #[test]
    fn rates_among_the_probe_answers_are_kept_wherever_they_fall() {
        // five probes: rates sent after the last answer are the reader's, not the join's
        for after in 1..5 {
            let (report, kept) = scripted(after).unwrap();
            assert_eq!(report.transport, "tcp");
            assert!(report.bytes_per_s > 0);
            assert_eq!(
                kept.map(|r| r[0].call_ns),
                Some(500),
                "after answer {after}"
            );
        }
        for after in [0, 5] {
            let (_, kept) = scripted(after).unwrap();
            assert!(kept.is_none());
        }
    }

    #[test]
    fn any_other_message_among_the_answers_is_a_protocol_error() {
        let mut first = true;
        let r = measure_keeping_rates(
            "tcp".into(),
            |_, _| Ok(()),
            |_| {
                let m = Msg::Ping(if first { 1 } else { 2 });
                first = false;
                Ok(m)
            },
            64,
        );
        assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
    }
}
