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
