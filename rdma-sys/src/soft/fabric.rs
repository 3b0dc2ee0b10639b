//! The software device's fabric. Each open context is a node listening on an abstract unix socket
//! named after its GID; a queue pair's sends travel over a stream connection to the destination
//! node, whose reader thread hands each message to the device's delivery rule. Threads of one
//! process and separate processes use the same path.
//!
//! Like a UC wire, the fabric promises nothing: a message to a node that is gone, unreachable or
//! too slow to drain its connection within [`WRITE_TIMEOUT`] is dropped without a word.

use std::io::{self, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{MAX_MESSAGE, QpKey};

/// How long a send may wait for the destination to drain its connection before it is dropped.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

const MAGIC: [u8; 4] = *b"SRDM";
/// magic, source GID, source QPN, destination QPN, length.
const HEADER: usize = 4 + 16 + 4 + 4 + 4;

/// Delivers one message `from` a queue pair `to` a local one; the device's matching rule.
pub(super) type Deliver = fn(from: QpKey, to: QpKey, payload: &[u8]);

fn address(gid: &[u8; 16]) -> io::Result<SocketAddr> {
    let hex: String = gid.iter().map(|b| format!("{b:02x}")).collect();
    SocketAddr::from_abstract_name(format!("sinew-softrdma/{hex}"))
}

/// A node of the fabric: the listening socket and its thread.
pub(super) struct Node {
    gid: [u8; 16],
    closed: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Node {
    /// Binds a node at a free IPv4-mapped link-local GID (`::ffff:169.254.a.b`), drawn at random
    /// so that nodes of different processes do not collide (a taken address is redrawn).
    pub(super) fn bind(deliver: Deliver) -> io::Result<Node> {
        let mut last = io::Error::from(io::ErrorKind::AddrInUse);
        for _ in 0..256 {
            let mut r = [0u8; 2];
            getrandom::fill(&mut r).map_err(|e| io::Error::other(e.to_string()))?;
            if r == [0, 0] || r == [255, 255] {
                continue;
            }
            let mut gid = [0u8; 16];
            gid[10] = 0xff;
            gid[11] = 0xff;
            gid[12..16].copy_from_slice(&[169, 254, r[0], r[1]]);
            match UnixListener::bind_addr(&address(&gid)?) {
                Ok(listener) => return Ok(Node::serve(gid, listener, deliver)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn serve(gid: [u8; 16], listener: UnixListener, deliver: Deliver) -> Node {
        let closed = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (c, a) = (closed.clone(), accepted.clone());
        let thread = std::thread::Builder::new()
            .name("softrdma-accept".into())
            .spawn(move || accept_loop(gid, listener, c, a, deliver))
            .ok();
        Node {
            gid,
            closed,
            accepted,
            thread,
        }
    }

    /// The node's IPv4-mapped GID.
    pub(super) fn gid(&self) -> [u8; 16] {
        self.gid
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wake the accept call with a connection of our own; it sees `closed` and returns.
        if let Ok(addr) = address(&self.gid) {
            let _ = UnixStream::connect_addr(&addr);
        }
        for s in self
            .accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    gid: [u8; 16],
    listener: UnixListener,
    closed: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<UnixStream>>>,
    deliver: Deliver,
) {
    loop {
        let stream = listener.accept();
        if closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, _)) = stream else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if let Ok(clone) = stream.try_clone() {
            let mut list = accepted.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|s| s.peer_addr().is_ok());
            list.push(clone);
        }
        let closed = closed.clone();
        let _ = std::thread::Builder::new()
            .name("softrdma-rx".into())
            .spawn(move || read_loop(gid, stream, closed, deliver));
    }
}

/// Reads messages off one connection until it closes or carries garbage.
fn read_loop(gid: [u8; 16], mut stream: UnixStream, closed: Arc<AtomicBool>, deliver: Deliver) {
    let mut header = [0u8; HEADER];
    let mut payload = Vec::new();
    loop {
        if stream.read_exact(&mut header).is_err() || header[..4] != MAGIC {
            return;
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let mut src = [0u8; 16];
        src.copy_from_slice(&header[4..20]);
        let (src_qpn, dst_qpn, len) = (word(20), word(24), word(28) as usize);
        if len > MAX_MESSAGE {
            return;
        }
        payload.resize(len, 0);
        if stream.read_exact(&mut payload).is_err() || closed.load(Ordering::SeqCst) {
            return;
        }
        deliver((src, src_qpn), (gid, dst_qpn), &payload);
    }
}

/// A queue pair's outgoing connection, made on first use and remade after a failure.
#[derive(Default)]
pub(super) struct Wire {
    conn: Option<([u8; 16], UnixStream)>,
}

impl Wire {
    /// Sends `payload` from `from` to `to`, or drops it silently when the destination cannot be
    /// reached or does not drain in time.
    pub(super) fn transmit(&mut self, from: QpKey, to: QpKey, payload: &[u8]) {
        if self.conn.as_ref().is_none_or(|(gid, _)| *gid != to.0) {
            self.conn = address(&to.0)
                .and_then(|a| UnixStream::connect_addr(&a))
                .and_then(|s| s.set_write_timeout(Some(WRITE_TIMEOUT)).map(|()| s))
                .ok()
                .map(|s| (to.0, s));
        }
        let Some((_, stream)) = self.conn.as_mut() else {
            return;
        };
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&MAGIC);
        header[4..20].copy_from_slice(&from.0);
        header[20..24].copy_from_slice(&from.1.to_le_bytes());
        header[24..28].copy_from_slice(&to.1.to_le_bytes());
        header[28..32].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        if stream
            .write_all(&header)
            .and_then(|()| stream.write_all(payload))
            .is_err()
        {
            // A partial message leaves the stream unusable: the reader drops it at the close.
            self.conn = None;
        }
    }
}
