//! LAN discovery: workers announce themselves, a head started with `--discover` adds them.
//!
//! **UDP broadcast on IPv4 and multicast on IPv6**, not mDNS. A broadcast reaches every host of
//! the subnet with no group to join, so it works on the networks where multicast does not: Wi-Fi
//! access points and switches with IGMP snooping that drop or delay mDNS (EXO's discovery fails
//! or takes 30–60 s there). IPv6 has no broadcast: there a worker sends to the link-local group
//! [`GROUP_V6`] on each interface, which a head joins (MLD snooping treats a group joined this
//! way like any other), so an IPv6-only segment — a Thunderbolt bridge with link-local
//! addresses only — is covered too. A worker sends an announcement every [`ANNOUNCE_EVERY`] to
//! the broadcast address of each IPv4 interface, to the group on each IPv6 interface, and to the
//! loopback (a cluster on one host), so a head that starts later hears it within a second. A
//! head that hears one worker process at several addresses keeps one member, at the address
//! heard first (IPv4 first, the loopback last). Networks that block both keep `--workers`,
//! which needs no discovery at all.
//!
//! **Authenticated.** An announcement carries the node's id, the port it listens on, its protocol
//! version, host name, the time it was sent, a sequence number and a random per-process instance
//! number, sealed with an HMAC-SHA256 under a key derived from the cluster key. A head ignores
//! announcements that do not verify (another cluster's nodes, strangers, damaged packets),
//! refuses those older than [`MAX_SKEW`] or with a sequence number it took before from that
//! node's process (a replay, from whatever address: [`Guard`]), and lists every refusal with its
//! reason. Discovery only says where to connect: the link that follows is authenticated with the
//! cluster key like every other, so a forged announcement cannot make a stranger a member.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use transport::ClusterKey;
use transport::codec::{Reader, Writer};

/// The UDP port announcements go to by default.
pub const DEFAULT_PORT: u16 = 7472;
/// How often a worker announces itself.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// How far an announcement's time may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
/// The largest announcement read.
pub const MAX_PACKET: usize = 512;

const MAGIC: &[u8; 4] = b"SNWD";
const FORMAT: u8 = 1;
const TAG: usize = 32;

/// A worker's announcement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The node's stable id.
    pub node_id: String,
    /// The port its `sinew worker` listens on (the address is the packet's source).
    pub port: u16,
    /// Its cluster protocol version.
    pub version: u16,
    /// Its host name.
    pub hostname: String,
    /// When it was sent, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Increases with every packet the node sends.
    pub seq: u64,
    /// Random per process: two processes with one id (a copied cache directory) are two
    /// senders, each with its own sequence.
    pub instance: u64,
}

/// Why an announcement was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not an announcement: wrong magic, short, long, or malformed.
    #[error("not a sinew announcement ({0})")]
    Malformed(String),
    /// The HMAC does not verify: another cluster's key, or a damaged packet.
    #[error(
        "its signature does not verify with this cluster's key (another cluster, or a wrong key)"
    )]
    BadSignature,
    /// Sent too long ago or in the future.
    #[error("its time is {0} s away from this node's clock (at most 30 s is accepted)")]
    Stale(i64),
    /// Taken before from the same node's process, or older than its last [`REPLAY_WINDOW`].
    #[error("replayed: an announcement of node {0} taken before, or too old")]
    Replay(String),
    /// Another protocol version.
    #[error("it speaks cluster protocol v{theirs}, this head v{ours}")]
    Version {
        /// The announcement's.
        theirs: u16,
        /// This node's.
        ours: u16,
    },
}

fn mac(key: &ClusterKey) -> Hmac<Sha256> {
    // a key of its own for discovery, so a packet can never pass for a link's handshake
    let mut k = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose()).expect("any key length");
    k.update(b"sinew discovery v1");
    let sub = k.finalize().into_bytes();
    <Hmac<Sha256> as KeyInit>::new_from_slice(&sub).expect("any key length")
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(255)];
    b.put_u8(s.len() as u8);
    b.extend_from_slice(s);
}

fn get_str(r: &mut Reader<'_>, what: &'static str) -> Result<String, Refusal> {
    let n = r.u8(what).map_err(|e| Refusal::Malformed(e.to_string()))? as usize;
    let b = r
        .bytes(n, what)
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    String::from_utf8(b.to_vec()).map_err(|_| Refusal::Malformed(format!("{what} is not UTF-8")))
}

impl Announcement {
    /// The packet: magic, format, fields, then the HMAC over all of them.
    pub fn seal(&self, key: &ClusterKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(96);
        b.extend_from_slice(MAGIC);
        b.put_u8(FORMAT);
        b.put_u16(self.version);
        b.put_u16(self.port);
        b.put_u64(self.time_ms);
        b.put_u64(self.seq);
        b.put_u64(self.instance);
        put_str(&mut b, &self.node_id);
        put_str(&mut b, &self.hostname);
        let mut m = mac(key);
        m.update(&b);
        b.extend_from_slice(&m.finalize().into_bytes());
        b
    }

    /// Reads and verifies a packet (the signature only: [`Guard`] checks time and replay).
    ///
    /// # Errors
    /// [`Refusal::Malformed`], [`Refusal::BadSignature`].
    pub fn open(packet: &[u8], key: &ClusterKey) -> Result<Announcement, Refusal> {
        if packet.len() > MAX_PACKET {
            return Err(Refusal::Malformed(format!("{} bytes", packet.len())));
        }
        if packet.len() < MAGIC.len() + 1 + TAG || &packet[..4] != MAGIC {
            return Err(Refusal::Malformed("no magic".into()));
        }
        if packet[4] != FORMAT {
            return Err(Refusal::Malformed(format!(
                "announcement format {}",
                packet[4]
            )));
        }
        let (body, tag) = packet.split_at(packet.len() - TAG);
        let mut m = mac(key);
        m.update(body);
        m.verify_slice(tag).map_err(|_| Refusal::BadSignature)?;
        let mut r = Reader::new(&body[5..]);
        let bad = |e: transport::codec::DecodeError| Refusal::Malformed(e.to_string());
        let version = r.u16("version").map_err(bad)?;
        let port = r.u16("port").map_err(bad)?;
        let time_ms = r.u64("time").map_err(bad)?;
        let seq = r.u64("seq").map_err(bad)?;
        let instance = r.u64("instance").map_err(bad)?;
        let node_id = get_str(&mut r, "node id")?;
        let hostname = get_str(&mut r, "hostname")?;
        if r.remaining() != 0 {
            return Err(Refusal::Malformed(format!(
                "{} bytes after the fields",
                r.remaining()
            )));
        }
        Ok(Announcement {
            node_id,
            port,
            version,
            hostname,
            time_ms,
            seq,
            instance,
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sequence numbers a [`Guard`] remembers below a sender's highest: announcements of one burst
/// (one per destination) may arrive out of order, over IPv4 and IPv6 or several interfaces.
pub const REPLAY_WINDOW: u64 = 64;

/// The receiver's checks after the signature: the version, the time, and replay (per sender —
/// node id and process instance — each sequence number is taken once, from whatever address it
/// comes, and only within [`REPLAY_WINDOW`] of the highest taken, as IPsec's anti-replay window).
#[derive(Debug, Default)]
pub struct Guard {
    last: HashMap<(String, u64), Window>,
}

/// One sender's highest sequence number taken, which of the [`REPLAY_WINDOW`] below it were
/// taken (bit `d` for `top - d`), and the time of the highest.
#[derive(Clone, Copy, Debug)]
struct Window {
    top: u64,
    seen: u64,
    time_ms: u64,
}

impl Window {
    /// Takes `seq` unless taken before or too far below the highest.
    fn take(&mut self, seq: u64, time_ms: u64) -> bool {
        if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            } | 1;
            self.top = seq;
            self.time_ms = time_ms;
            return true;
        }
        let d = self.top - seq;
        if d >= REPLAY_WINDOW || self.seen & (1 << d) != 0 {
            return false;
        }
        self.seen |= 1 << d;
        true
    }
}

impl Guard {
    /// Checks `a` received at `now_ms`; on success remembers it.
    ///
    /// # Errors
    /// [`Refusal::Version`], [`Refusal::Stale`], [`Refusal::Replay`].
    pub fn check(&mut self, a: &Announcement, now_ms: u64, ours: u16) -> Result<(), Refusal> {
        let skew = a.time_ms as i64 - now_ms as i64;
        if skew.unsigned_abs() > MAX_SKEW.as_millis() as u64 {
            return Err(Refusal::Stale(skew / 1000));
        }
        // a bounded memory: entries older than the skew window cannot be replayed anyway
        if self.last.len() > 4096 {
            let horizon = now_ms.saturating_sub(MAX_SKEW.as_millis() as u64);
            self.last.retain(|_, w| w.time_ms >= horizon);
        }
        let sender = (a.node_id.clone(), a.instance);
        let taken = match self.last.get_mut(&sender) {
            Some(w) => w.take(a.seq, a.time_ms),
            None => {
                self.last.insert(
                    sender,
                    Window {
                        top: a.seq,
                        seen: 1,
                        time_ms: a.time_ms,
                    },
                );
                true
            }
        };
        if !taken {
            return Err(Refusal::Replay(a.node_id.clone()));
        }
        if a.version != ours {
            return Err(Refusal::Version {
                theirs: a.version,
                ours,
            });
        }
        Ok(())
    }
}

/// What the listener reports.
#[derive(Clone, Debug)]
pub enum Heard {
    /// A node of this cluster at `addr`.
    Node {
        /// Where its worker listens.
        addr: SocketAddr,
        /// What it said.
        announcement: Announcement,
    },
    /// A packet refused, from `from`.
    Refused {
        /// The sender.
        from: SocketAddr,
        /// Why.
        why: Refusal,
    },
}

/// The IPv6 group announcements go to, at link-local scope: `ff02::114`, IANA's group for
/// private experiments (no well-known service listens there, so no other host is woken).
pub const GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x114);

/// How often a listener looks for interfaces that came up, to join the IPv6 group on them.
const REJOIN_EVERY: Duration = Duration::from_secs(5);

/// The host's interface addresses (none where they cannot be read).
fn interfaces() -> Vec<nix::ifaddrs::InterfaceAddress> {
    nix::ifaddrs::getifaddrs()
        .map(Iterator::collect)
        .unwrap_or_default()
}

/// The indices of the interfaces in `ifs` that are up, can multicast, are not the loopback, and
/// have an IPv6 address (each once).
fn multicast_v6_interfaces(ifs: &[nix::ifaddrs::InterfaceAddress]) -> Vec<u32> {
    use nix::net::if_::InterfaceFlags as F;
    let mut out = Vec::new();
    for i in ifs {
        let has_v6 = i
            .address
            .as_ref()
            .is_some_and(|a| a.as_sockaddr_in6().is_some());
        if !has_v6
            || !i.flags.contains(F::IFF_UP)
            || !i.flags.contains(F::IFF_MULTICAST)
            || i.flags.contains(F::IFF_LOOPBACK)
        {
            continue;
        }
        if let Ok(index) = nix::net::if_::if_nametoindex(i.interface_name.as_str())
            && !out.contains(&index)
        {
            out.push(index);
        }
    }
    out
}

/// The destinations of an announcement, in the order sent: each IPv4 interface's broadcast
/// address, [`GROUP_V6`] on each IPv6 interface (scoped by its index), then the loopback (a
/// cluster on a host with no network). A head hears a worker first at an address other hosts can
/// reach too.
pub fn destinations(port: u16) -> Vec<SocketAddr> {
    // one walk of the interfaces for both families
    let ifs = interfaces();
    let mut out = Vec::new();
    for i in &ifs {
        if !i
            .flags
            .contains(nix::net::if_::InterfaceFlags::IFF_BROADCAST)
            || !i.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
        {
            continue;
        }
        let v4 = |a: Option<&nix::sys::socket::SockaddrStorage>| {
            a.and_then(|a| a.as_sockaddr_in()).map(|a| a.ip())
        };
        // the interface's broadcast address, or one computed from its address and mask
        // (an address added without one)
        let b = v4(i.broadcast.as_ref())
            .filter(|b| !b.is_unspecified())
            .or_else(|| {
                let (a, m) = (v4(i.address.as_ref())?, v4(i.netmask.as_ref())?);
                Some(Ipv4Addr::from(u32::from(a) | !u32::from(m)))
            });
        if let Some(b) = b {
            let a = SocketAddr::new(IpAddr::V4(b), port);
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    for index in multicast_v6_interfaces(&ifs) {
        out.push(SocketAddr::V6(SocketAddrV6::new(GROUP_V6, port, 0, index)));
    }
    out.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    out
}

/// Announces a worker every [`ANNOUNCE_EVERY`] until `stop` is set (on its own thread), on IPv4
/// and, where the host has it, IPv6.
///
/// # Errors
/// The IPv4 socket cannot be made.
pub fn announce(
    key: ClusterKey,
    node_id: String,
    port: u16,
    discovery_port: u16,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    v4.set_broadcast(true)?;
    // a host without IPv6 announces on IPv4 alone
    let v6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
        .inspect_err(|e| tracing::debug!(error = %e, "no IPv6 announcements"))
        .ok();
    let hostname = crate::node::hostname();
    let version = crate::node::protocol_version();
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let instance = u64::from_le_bytes(nonce);
    std::thread::Builder::new()
        .name("sinew-announce".into())
        .spawn(move || {
            let mut seq = 0u64;
            let mut warned = false;
            while !stop.load(Ordering::Acquire) {
                for to in destinations(discovery_port) {
                    let sock = match (to, &v6) {
                        (SocketAddr::V4(_), _) => &v4,
                        (SocketAddr::V6(_), Some(v6)) => v6,
                        (SocketAddr::V6(_), None) => continue,
                    };
                    seq += 1;
                    let a = Announcement {
                        node_id: node_id.clone(),
                        port,
                        version,
                        hostname: hostname.clone(),
                        time_ms: now_ms(),
                        seq,
                        instance,
                    };
                    match sock.send_to(&a.seal(&key), to) {
                        Ok(_) => {}
                        // an IPv6 address still in duplicate detection, an interface gone
                        Err(e) if to.is_ipv6() => {
                            tracing::debug!(%to, error = %e, "announcing failed")
                        }
                        Err(e) if !warned && !to.ip().is_loopback() => {
                            warned = true;
                            tracing::warn!(%to, error = %e, "announcing failed");
                        }
                        Err(_) => {}
                    }
                }
                std::thread::sleep(ANNOUNCE_EVERY);
            }
        })
}

/// A UDP socket on `port` of every address of one family that shares the port with other
/// listeners on the host.
fn listener(port: u16, v6: bool) -> std::io::Result<UdpSocket> {
    let (domain, any) = if v6 {
        (socket2::Domain::IPV6, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    } else {
        (socket2::Domain::IPV4, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    s.set_reuse_address(true)?;
    // BSD sockets share a port with SO_REUSEPORT (each gets every broadcast and multicast); on
    // Linux SO_REUSEADDR does, and SO_REUSEPORT would split the loopback's unicasts between them
    #[cfg(target_os = "macos")]
    s.set_reuse_port(true)?;
    if v6 {
        s.set_only_v6(true)?;
    } else {
        s.set_broadcast(true)?;
    }
    s.bind(&SocketAddr::new(any, port).into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Joins [`GROUP_V6`] on the IPv6 interfaces not joined yet.
fn join_new(sock: &UdpSocket, joined: &mut Vec<u32>) {
    for index in multicast_v6_interfaces(&interfaces()) {
        if joined.contains(&index) {
            continue;
        }
        match sock.join_multicast_v6(&GROUP_V6, index) {
            Ok(()) => joined.push(index),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => joined.push(index),
            Err(e) => tracing::debug!(index, error = %e, "joining the IPv6 discovery group failed"),
        }
    }
}

/// The address a worker listens at, from the source of its announcement (an IPv6 link-local
/// source keeps its scope: the interface it arrived on).
fn worker_addr(from: SocketAddr, port: u16) -> SocketAddr {
    let mut a = from;
    a.set_port(port);
    a
}

/// Listens for announcements on `port` (IPv4 broadcasts and, where the host has IPv6, the
/// [`GROUP_V6`] multicasts) until `stop` is set, reporting each accepted or refused one to
/// `heard` (on its own thread; the sockets share the port with other listeners on the host).
///
/// # Errors
/// The IPv4 port cannot be bound.
pub fn listen(
    key: ClusterKey,
    port: u16,
    stop: Arc<AtomicBool>,
    heard: impl Fn(Heard) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let v4 = listener(port, false)?;
    let v6 = listener(port, true)
        .inspect_err(|e| tracing::debug!(port, error = %e, "no IPv6 discovery"))
        .ok();
    let ours = crate::node::protocol_version();
    std::thread::Builder::new()
        .name("sinew-discover".into())
        .spawn(move || {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            use std::os::fd::AsFd;
            let mut guard = Guard::default();
            let mut buf = [0u8; MAX_PACKET + 1];
            let mut joined = Vec::new();
            let mut rejoin = std::time::Instant::now();
            let socks: Vec<&UdpSocket> = std::iter::once(&v4).chain(v6.as_ref()).collect();
            while !stop.load(Ordering::Acquire) {
                if let Some(v6) = &v6
                    && std::time::Instant::now() >= rejoin
                {
                    join_new(v6, &mut joined);
                    rejoin = std::time::Instant::now() + REJOIN_EVERY;
                }
                let mut fds: Vec<PollFd<'_>> = socks
                    .iter()
                    .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                    .collect();
                match poll(&mut fds, PollTimeout::from(250u16)) {
                    Ok(0) => continue,
                    Ok(_) => {}
                    // anything else may repeat at once: not a busy loop
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
                let mut read = false;
                for sock in &socks {
                    // every packet waiting on each socket (nonblocking: until it would block)
                    while let Ok((n, from)) = sock.recv_from(&mut buf) {
                        read = true;
                        let r = Announcement::open(&buf[..n], &key)
                            .and_then(|a| guard.check(&a, now_ms(), ours).map(|()| a));
                        heard(match r {
                            Ok(a) => Heard::Node {
                                addr: worker_addr(from, a.port),
                                announcement: a,
                            },
                            Err(why) => Heard::Refused { from, why },
                        });
                    }
                }
                if !read {
                    // ready with nothing to read (a socket error): not a busy loop
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes(&[b; 32]).unwrap()
    }

    fn ann() -> impl Strategy<Value = Announcement> {
        (
            "[0-9a-f]{0,16}",
            any::<u16>(),
            any::<u16>(),
            "[a-z0-9.-]{0,40}",
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(node_id, port, version, hostname, time_ms, seq, instance)| Announcement {
                    node_id,
                    port,
                    version,
                    hostname,
                    time_ms,
                    seq,
                    instance,
                },
            )
    }

    proptest! {
        #[test]
        fn sealed_announcements_open_with_the_key_only(a in ann(), flip in any::<proptest::sample::Index>(), bit in 0u8..8) {
            let p = a.seal(&key(1));
            prop_assert_eq!(Announcement::open(&p, &key(1)).unwrap(), a);
            prop_assert_eq!(Announcement::open(&p, &key(2)), Err(Refusal::BadSignature));
            let mut bad = p.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(Announcement::open(&bad, &key(1)).is_err());
        }

        #[test]
        fn truncated_extended_or_garbage_packets_are_refused(a in ann(), cut in any::<proptest::sample::Index>(), junk in proptest::collection::vec(any::<u8>(), 0..600)) {
            let p = a.seal(&key(1));
            let at = cut.index(p.len());
            prop_assert!(Announcement::open(&p[..at], &key(1)).is_err());
            let mut long = p.clone();
            long.push(0);
            prop_assert!(Announcement::open(&long, &key(1)).is_err());
            prop_assert!(Announcement::open(&junk, &key(1)).is_err());
        }

        #[test]
        fn the_guard_takes_each_sequence_number_once_within_the_window(seqs in proptest::collection::vec(0u64..200, 1..80)) {
            let mut g = Guard::default();
            let base = 1_000_000_000u64;
            let mut taken = std::collections::HashSet::new();
            let mut top = None::<u64>;
            for s in seqs {
                let a = Announcement { node_id: "n".into(), port: 1, version: 2, hostname: String::new(), time_ms: base, seq: s, instance: 9 };
                let r = g.check(&a, base, 2);
                let fresh = !taken.contains(&s) && top.is_none_or(|t| s + REPLAY_WINDOW > t);
                if fresh {
                    prop_assert!(r.is_ok(), "seq {} refused", s);
                    taken.insert(s);
                    top = Some(top.map_or(s, |t| t.max(s)));
                } else {
                    prop_assert_eq!(r, Err(Refusal::Replay("n".into())));
                }
            }
        }
    }

    #[test]
    fn stale_and_other_versions_are_refused() {
        let mut g = Guard::default();
        let now = 1_000_000_000u64;
        let mut a = Announcement {
            node_id: "a".into(),
            port: 7471,
            version: 2,
            hostname: "h".into(),
            time_ms: now - 31_000,
            seq: 1,
            instance: 1,
        };
        assert_eq!(g.check(&a, now, 2), Err(Refusal::Stale(-31)));
        a.time_ms = now + 60_000;
        assert_eq!(g.check(&a, now, 2), Err(Refusal::Stale(60)));
        a.time_ms = now;
        assert_eq!(
            g.check(&a, now, 3),
            Err(Refusal::Version { theirs: 2, ours: 3 })
        );
        a.seq = 2;
        assert!(g.check(&a, now, 2).is_ok());
        // a second process with the same id (a copied cache directory) is its own sender
        a.instance = 2;
        a.seq = 1;
        assert!(g.check(&a, now, 2).is_ok());
        assert_eq!(g.check(&a, now, 2), Err(Refusal::Replay("a".into())));
    }

    #[test]
    fn an_announcement_crosses_the_loopback() {
        let stop = Arc::new(AtomicBool::new(false));
        let port = {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let l = listen(key(7), port, stop.clone(), move |h| {
            let _ = tx.lock().unwrap().send(h);
        })
        .unwrap();
        let a = announce(key(7), "0123456789abcdef".into(), 7471, port, stop.clone()).unwrap();
        let heard = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        match heard {
            Heard::Node { addr, announcement } => {
                assert_eq!(addr.port(), 7471);
                assert_eq!(announcement.node_id, "0123456789abcdef");
            }
            other => panic!("{other:?}"),
        }
        stop.store(true, Ordering::Release);
        l.join().unwrap();
        a.join().unwrap();
    }
}
