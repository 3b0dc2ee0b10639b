//! `sinew link server`: accepts links, authenticates them, and serves each on its own thread.

use std::time::Duration;

use anyhow::Context;
use transport::tcp::{Incoming, Listener};
use transport::{Deadline, Error, Link, LinkConfig};

use super::ServerArgs;
use super::protocol::{StreamReport, TAG_PING, TAG_REPORT, TAG_STREAM};

/// A client that sends nothing for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const INITIAL_BUFFER: usize = 64 << 10;

/// Runs the server until the process is killed.
pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    let key = args.key.resolve()?;
    let mut cfg = LinkConfig::new(key);
    cfg.wait = args.wait;
    cfg.socket_buffer = args.socket_buffer;
    cfg.congestion = super::congestion(&args.congestion);
    cfg.shm_single_copy_min = args.shm_single_copy;
    cfg.transport = args.transport;
    cfg.shm_ring_bytes = args.shm_ring;
    if let Some(dev) = &args.rdma_device {
        cfg.rdma_device = Some(dev.clone());
    }
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

fn serve_link(mut link: Link) -> Result<(), Error> {
    let max = link.info().max_payload as usize;
    let mut buf = vec![0u8; INITIAL_BUFFER.min(max)];
    let mut report = StreamReport::default();
    loop {
        let msg = match link.recv(&mut buf) {
            Ok(m) => m,
            Err(Error::BufferTooSmall { needed, .. }) => {
                // `needed` is within the negotiated maximum: the transport checked it.
                buf.resize(needed, 0);
                continue;
            }
            Err(e) => return Err(e),
        };
        match msg.tag {
            TAG_PING => link.send(TAG_PING, &buf[..msg.len])?,
            TAG_STREAM => {
                report.bytes += msg.len as u64;
                report.messages += 1;
            }
            TAG_REPORT => {
                link.send(TAG_REPORT, &report.encode())?;
                report = StreamReport::default();
            }
            other => tracing::warn!(tag = other, "ignoring a message with an unknown tag"),
        }
    }
}
