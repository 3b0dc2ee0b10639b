//! `sinew link server`: accepts links, authenticates them, and serves each on its own thread.

use std::time::Duration;

use anyhow::Context;
use transport::tcp::{Incoming, Listener};
use transport::{Deadline, Error, Link, LinkConfig};

use super::ServerArgs;
use std::time::Instant;

use transport::{LinkReceiver, LinkSender, Message};

use super::protocol::{
    BidirRequest, StreamReport, TAG_BACK_END, TAG_BIDIR, TAG_PING, TAG_REPORT, TAG_STREAM,
};

/// A client that sends nothing for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const INITIAL_BUFFER: usize = 64 << 10;

/// Runs the server until the process is killed.
pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    let key = args.key.resolve()?;
    let mut cfg = LinkConfig::new(key);
    cfg.wait = args.wait;
    args.tuning.apply(&mut cfg);
    cfg.transport = args.transport;
    cfg.shm_ring_bytes = args.shm_ring;
    cfg.timeout = IDLE_TIMEOUT;
    let listener = Listener::bind(args.bind, &cfg)
        .with_context(|| format!("cannot listen on {}", args.bind))?;
    let local = listener.local_addr()?;
    tracing::info!(%local, wait = %args.wait, transport = %args.transport, "sinew link server listening");
    // Scripts wait for this line before starting a client.
    println!("listening on {local}");
    loop {
        match listener.incoming_until(Deadline::after(Duration::from_secs(3600))) {
            Ok(incoming) => {
                std::thread::spawn(move || serve(incoming));
            }
            Err(Error::Timeout { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve(incoming: Incoming) {
    let peer = incoming.peer_addr();
    let link = match incoming.establish() {
        Ok(link) => link,
        // The transport has logged the reason; the socket is closed.
        Err(_) => return,
    };
    tracing::info!(
        %peer,
        node = format_args!("{:#x}", link.info().peer_node_id),
        transport = %link.info().transport,
        "client connected"
    );
    match serve_link(link) {
        Err(Error::Closed { .. }) => tracing::info!(%peer, "client done"),
        Err(e) => tracing::warn!(%peer, error = %e, "client dropped"),
        Ok(()) => {}
    }
}

fn serve_link(link: Link) -> Result<(), Error> {
    let max = link.info().max_payload as usize;
    let peer = link.info().peer_addr.clone();
    let (mut tx, mut rx) = link.split();
    let mut buf = vec![0u8; INITIAL_BUFFER.min(max)];
    let mut report = StreamReport::default();
    loop {
        let msg = recv_growing(&mut rx, &mut buf)?;
        match msg.tag {
            TAG_PING => tx.send(TAG_PING, &buf[..msg.len])?,
            TAG_STREAM => {
                report.bytes += msg.len as u64;
                report.messages += 1;
            }
            TAG_REPORT => {
                tx.send(TAG_REPORT, &report.encode())?;
                report = StreamReport::default();
            }
            TAG_BIDIR => {
                let Some(req) = BidirRequest::decode(&buf[..msg.len], max) else {
                    return Err(Error::ProtocolViolation {
                        peer,
                        detail: format!(
                            "a bidirectional request of {} bytes out of range",
                            msg.len
                        ),
                    });
                };
                // stream back on a second thread while this one counts the client's stream,
                // which ends with its report request
                let (back, counted) = std::thread::scope(|s| {
                    let back = s.spawn(|| stream_back(&mut tx, req));
                    let counted = count_until_report(&mut rx, &mut buf, &mut report);
                    (back.join(), counted)
                });
                let sent = match back {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(Error::Broken {
                            peer,
                            cause: "the stream-back thread panicked".into(),
                        });
                    }
                };
                counted?;
                tx.send(TAG_BACK_END, &sent?.encode())?;
                tx.send(TAG_REPORT, &report.encode())?;
                report = StreamReport::default();
            }
            other => tracing::warn!(tag = other, "ignoring a message with an unknown tag"),
        }
    }
}

/// Receives into `buf`, growing it to the announced size (within the negotiated maximum, which
/// the transport checked) when a message does not fit.
fn recv_growing(rx: &mut LinkReceiver, buf: &mut Vec<u8>) -> Result<Message, Error> {
    loop {
        match rx.recv(buf) {
            Err(Error::BufferTooSmall { needed, .. }) => buf.resize(needed, 0),
            other => return other,
        }
    }
}

/// Sends `req.size`-byte messages for `req.duration`; what was sent.
fn stream_back(tx: &mut LinkSender, req: BidirRequest) -> Result<StreamReport, Error> {
    let payload = vec![0x5a; req.size as usize];
    let mut sent = StreamReport::default();
    let start = Instant::now();
    while start.elapsed() < req.duration {
        tx.send(TAG_STREAM, &payload)?;
        sent.bytes += payload.len() as u64;
        sent.messages += 1;
    }
    Ok(sent)
}

/// Counts streamed messages into `report` until the client asks for the report.
fn count_until_report(
    rx: &mut LinkReceiver,
    buf: &mut Vec<u8>,
    report: &mut StreamReport,
) -> Result<(), Error> {
    loop {
        let msg = recv_growing(rx, buf)?;
        match msg.tag {
            TAG_STREAM => {
                report.bytes += msg.len as u64;
                report.messages += 1;
            }
            TAG_REPORT => return Ok(()),
            other => tracing::warn!(tag = other, "ignoring a message with an unknown tag"),
        }
    }
}
