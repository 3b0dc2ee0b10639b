//! Building a full mesh from one well-known address: rank 0 listens there; every other rank
//! listens on a port of its own, tells rank 0 which, and learns everyone's address from rank 0;
//! then each rank connects to every lower rank. Ranks may start in any order (connections retry
//! until the deadline), every link is authenticated with the cluster key, and a rank that claims
//! a rank already taken or another world size is refused.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use transport::tcp::{Listener, connect};
use transport::{Deadline, Link, LinkConfig};

use crate::communicator::{CommConfig, Communicator, Topology};
use crate::error::{CollectiveError, Result};

const TAG_HELLO: u32 = 100;
const TAG_TABLE: u32 = 101;
const MAX_CONTROL: usize = 64 << 10;

fn fail(rank: usize, detail: impl Into<String>) -> CollectiveError {
    CollectiveError::Rendezvous {
        rank,
        detail: detail.into(),
    }
}

fn hello(rank: usize, world: usize, port: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(10);
    b.extend_from_slice(&(rank as u32).to_le_bytes());
    b.extend_from_slice(&(world as u32).to_le_bytes());
    b.extend_from_slice(&port.to_le_bytes());
    b
}

fn parse_hello(b: &[u8]) -> Option<(usize, usize, u16)> {
    if b.len() != 10 {
        return None;
    }
    let rank = u32::from_le_bytes(b[0..4].try_into().ok()?) as usize;
    let world = u32::from_le_bytes(b[4..8].try_into().ok()?) as usize;
    let port = u16::from_le_bytes(b[8..10].try_into().ok()?);
    Some((rank, world, port))
}

fn recv_control(link: &mut Link, tag: u32, deadline: Deadline, rank: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_CONTROL];
    let m = link
        .recv_until(&mut buf, deadline)
        .map_err(|e| fail(rank, format!("from {}: {e}", link.info().peer_addr)))?;
    if m.tag != tag {
        return Err(fail(
            rank,
            format!(
                "{} sent tag {} during the rendezvous",
                link.info().peer_addr,
                m.tag
            ),
        ));
    }
    buf.truncate(m.len);
    Ok(buf)
}

/// Joins the world of `world` ranks as `rank` over a full mesh, meeting at `root` (rank 0
/// listens there). Waits at most `timeout` for every rank to show up.
///
/// # Errors
/// [`CollectiveError::Rendezvous`] when a rank does not show up in time, a peer has another
/// cluster key or world size, or two processes claim one rank.
pub fn rendezvous(
    root: &str,
    rank: usize,
    world: usize,
    link_config: &LinkConfig,
    config: CommConfig,
    timeout: Duration,
) -> Result<Communicator> {
    rendezvous_with(
        root,
        rank,
        world,
        link_config,
        config,
        timeout,
        Topology::FullMesh,
    )
}

/// [`rendezvous`] into the given topology: a full mesh, or a ring (each rank linked to its two
/// neighbours only: fewer links, for worlds where all-to-all is not needed).
///
/// # Errors
/// As [`rendezvous`].
pub fn rendezvous_with(
    root: &str,
    rank: usize,
    world: usize,
    link_config: &LinkConfig,
    config: CommConfig,
    timeout: Duration,
    topology: Topology,
) -> Result<Communicator> {
    let wanted = |a: usize, b: usize| match topology {
        Topology::FullMesh => a != b,
        Topology::Ring => a != b && ((a + 1) % world == b || (b + 1) % world == a),
    };
    if world == 0 || rank >= world {
        return Err(fail(rank, format!("rank {rank} in a world of {world}")));
    }
    let deadline = Deadline::after(timeout);
    let mut cfg = link_config.clone();
    cfg.connect_timeout = timeout;
    let root_addr: SocketAddr = root
        .to_socket_addrs()
        .map_err(|e| fail(rank, format!("cannot resolve {root}: {e}")))?
        .next()
        .ok_or_else(|| fail(rank, format!("{root} resolves to nothing")))?;
    let mut links: Vec<Option<Link>> = (0..world).map(|_| None).collect();
    if world == 1 {
        return Communicator::from_links(rank, links, config);
    }
    if rank == 0 {
        let listener = Listener::bind(root_addr, &cfg)
            .map_err(|e| fail(0, format!("cannot listen on {root}: {e}")))?;
        let mut table: Vec<String> = vec![String::new(); world];
        table[0] = root_addr.to_string();
        while links.iter().skip(1).any(Option::is_none) {
            let mut link = listener
                .accept_until(deadline)
                .map_err(|e| fail(0, format!("waiting for ranks {:?}: {e}", missing(&links))))?;
            let payload = recv_control(&mut link, TAG_HELLO, deadline, 0)?;
            let (r, w, port) = parse_hello(&payload).ok_or_else(|| fail(0, "malformed hello"))?;
            if w != world {
                return Err(fail(
                    0,
                    format!(
                        "rank {r} at {} thinks the world has {w} ranks, not {world}",
                        link.info().peer_addr
                    ),
                ));
            }
            if r == 0 || r >= world || links[r].is_some() {
                return Err(fail(
                    0,
                    format!(
                        "{} claims rank {r}, which is taken or out of range",
                        link.info().peer_addr
                    ),
                ));
            }
            let ip = link
                .info()
                .peer_addr
                .parse::<SocketAddr>()
                .map_err(|e| fail(0, format!("peer address: {e}")))?
                .ip();
            table[r] = SocketAddr::new(ip, port).to_string();
            links[r] = Some(link);
        }
        let encoded = table.join("\n");
        for link in links.iter_mut().flatten() {
            link.send_until(TAG_TABLE, encoded.as_bytes(), deadline)
                .map_err(|e| fail(0, format!("sending the address table: {e}")))?;
        }
        for (p, l) in links.iter_mut().enumerate() {
            if !wanted(0, p) {
                *l = None;
            }
        }
    } else {
        let local_ip = if root_addr.ip().is_loopback() {
            root_addr.ip()
        } else {
            "0.0.0.0".parse().expect("valid address")
        };
        let listener = Listener::bind(SocketAddr::new(local_ip, 0), &cfg)
            .map_err(|e| fail(rank, format!("cannot listen: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| fail(rank, e.to_string()))?
            .port();
        let mut to_root = connect(root_addr, &cfg)
            .map_err(|e| fail(rank, format!("cannot reach rank 0 at {root}: {e}")))?;
        to_root
            .send_until(TAG_HELLO, &hello(rank, world, port), deadline)
            .map_err(|e| fail(rank, format!("hello to rank 0: {e}")))?;
        let table = recv_control(&mut to_root, TAG_TABLE, deadline, rank)?;
        let table =
            String::from_utf8(table).map_err(|_| fail(rank, "the address table is not text"))?;
        let table: Vec<&str> = table.lines().collect();
        if table.len() != world {
            return Err(fail(
                rank,
                format!(
                    "the address table has {} entries for {world} ranks",
                    table.len()
                ),
            ));
        }
        if wanted(rank, 0) {
            links[0] = Some(to_root);
        }
        // Connect to every wanted lower rank but 0, then accept every wanted higher one.
        for (lower, addr) in table.iter().enumerate().take(rank).skip(1) {
            if !wanted(rank, lower) {
                continue;
            }
            let mut link = connect(*addr, &cfg)
                .map_err(|e| fail(rank, format!("cannot reach rank {lower} at {addr}: {e}")))?;
            link.send_until(TAG_HELLO, &hello(rank, world, port), deadline)
                .map_err(|e| fail(rank, format!("hello to rank {lower}: {e}")))?;
            links[lower] = Some(link);
        }
        while (rank + 1..world).any(|p| wanted(rank, p) && links[p].is_none()) {
            let mut link = listener.accept_until(deadline).map_err(|e| {
                fail(
                    rank,
                    format!("waiting for ranks {:?}: {e}", missing(&links)),
                )
            })?;
            let payload = recv_control(&mut link, TAG_HELLO, deadline, rank)?;
            let (r, w, _) = parse_hello(&payload).ok_or_else(|| fail(rank, "malformed hello"))?;
            if w != world || r <= rank || r >= world || links[r].is_some() || !wanted(rank, r) {
                return Err(fail(
                    rank,
                    format!("unexpected hello from rank {r} of a world of {w}"),
                ));
            }
            links[r] = Some(link);
        }
    }
    tracing::debug!(rank, world, "communicator connected");
    Communicator::from_links(rank, links, config)
}

/// The ranks (but 0) a rank has no link to yet, for error messages.
fn missing(links: &[Option<Link>]) -> Vec<usize> {
    links
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, l)| l.is_none())
        .map(|(i, _)| i)
        .collect()
}
