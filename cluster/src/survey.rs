//! Surveying workers without taking them over (what `sinew plan` does before a weight is
//! loaded): a survey link asks a worker for its advert (memory, cores, kernel rates) and measures
//! the link to it; the worker can then measure its own link to another worker. A worker serving
//! a head keeps serving it. Both sides live here: [`Survey`] (the observer) and the worker's
//! `serve`, which a worker runs on a link that opens with [`Msg::Survey`].

use std::time::Duration;

use transport::{Deadline, LinkConfig, LinkSender, tcp};

use crate::error::{Error, Result};
use crate::io::{PROBE_BYTES, Rx, measure, send};
use crate::wire::{Advert, LinkReport, Msg};

/// A worker as surveyed.
#[derive(Clone, Debug)]
pub struct Surveyed {
    /// Its address.
    pub addr: String,
    /// What it advertised.
    pub advert: Advert,
    /// The link from here to it.
    pub link: LinkReport,
}

/// An open survey link.
pub struct Survey {
    tx: LinkSender,
    rx: Rx,
    addr: String,
    /// This end's address on the link (what a worker dials for a node beside the observer).
    local: Option<std::net::SocketAddr>,
}

impl Survey {
    /// Connects to the worker at `addr`, reads its advert and measures the link.
    ///
    /// # Errors
    /// Connecting, a wrong key, another protocol version, no answer within 60 s (a worker that
    /// just started measures its kernels first).
    pub fn open(addr: &str, cfg: &LinkConfig) -> Result<(Survey, Surveyed)> {
        let mut cfg = cfg.clone();
        cfg.connect_timeout = Duration::from_secs(5);
        let link = tcp::connect(addr, &cfg)?;
        let local = link.info().local_addr;
        let (mut tx, rx) = link.split();
        let mut rx = Rx::new(rx);
        let version = crate::node::protocol_version();
        send(&mut tx, &Msg::Survey { version })?;
        let advert = match rx.recv(Deadline::after(Duration::from_secs(60)))? {
            Msg::Advert(a) => a,
            Msg::Refuse(why) => return Err(Error::Refused(format!("worker {addr}: {why}"))),
            other => return Err(Error::Protocol(format!("worker {addr} answered {other:?}"))),
        };
        let link = measure(&mut tx, &mut rx, PROBE_BYTES)?;
        Ok((
            Survey {
                tx,
                rx,
                addr: addr.to_string(),
                local,
            },
            Surveyed {
                addr: addr.to_string(),
                advert,
                link,
            },
        ))
    }

    /// Has this worker measure its link to the worker at `to`.
    ///
    /// # Errors
    /// The link failed, or the worker could not reach `to`.
    pub fn peer_link(&mut self, to: &str) -> Result<LinkReport> {
        // as the pipeline gives it: reachable from that worker
        let dial = crate::addr::next_for(to, &self.addr, self.local);
        send(&mut self.tx, &Msg::ProbePeer(dial))?;
        match self.rx.recv(Deadline::after(Duration::from_secs(60)))? {
            Msg::LinkSample(Ok(r)) => Ok(r),
            Msg::LinkSample(Err(e)) => Err(Error::Degraded(format!(
                "{} could not measure its link to {to}: {e}",
                self.addr
            ))),
            other => Err(Error::Protocol(format!("{} answered {other:?}", self.addr))),
        }
    }
}

// The worker's side.

/// How long an observer's link may stay silent.
pub(crate) const SURVEY_IDLE: Duration = Duration::from_secs(30);

/// Serves an observer (`sinew plan`): answers probes, and measures links to other workers when
/// asked, until it hangs up or is silent for [`SURVEY_IDLE`]. The worker's head and stage are
/// not touched.
///
/// `local` is this end's address on the observer's link: the scope of a link-local address it
/// asks for ([`crate::addr::with_scope`]).
pub(crate) fn serve(
    mut rx: Rx,
    mut tx: LinkSender,
    version: u16,
    cfg: &LinkConfig,
    local: Option<std::net::SocketAddr>,
) {
    loop {
        match rx.recv(Deadline::after(SURVEY_IDLE)) {
            Ok(Msg::Probe { id, pad }) => {
                let ack = crate::io::probe_ack(id, &pad);
                if send(&mut tx, &ack).is_err() {
                    return;
                }
            }
            Ok(Msg::ProbePeer(addr)) => {
                let addr = crate::addr::with_scope(&addr, local);
                let r = probe_peer(&addr, version, cfg).map_err(|e| e.to_string());
                if send(&mut tx, &Msg::LinkSample(r)).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// Measures the link from this worker to the worker at `addr`, as an observer of it.
fn probe_peer(addr: &str, version: u16, cfg: &LinkConfig) -> Result<LinkReport> {
    let mut cfg = cfg.clone();
    cfg.connect_timeout = Duration::from_secs(5);
    let link = tcp::connect(addr, &cfg)?;
    let (mut tx, rx) = link.split();
    let mut rx = Rx::new(rx);
    send(&mut tx, &Msg::Survey { version })?;
    match rx.recv(Deadline::after(SURVEY_IDLE))? {
        Msg::Advert(_) => {}
        Msg::Refuse(why) => return Err(Error::Refused(why)),
        other => return Err(Error::Protocol(format!("{addr} answered {other:?}"))),
    }
    measure(&mut tx, &mut rx, PROBE_BYTES)
}
