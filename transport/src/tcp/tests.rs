//! TCP backend tests over loopback: each failure a user or peer can cause ends in a clear error.

use super::*;
use crate::frame::FrameKind;
use crate::handshake::Side;
use crate::key::ClusterKey;
use std::io::{Read, Write};
use std::thread;

/// The offer of a client that speaks TCP only, so an auto server picks TCP.
fn tcp_only() -> Offer {
    select::local_offer(select::TransportChoice::Only(TransportKind::TCP)).unwrap()
}

fn key(b: u8) -> ClusterKey {
    ClusterKey::from_bytes(&[b; 32]).unwrap()
}

fn cfg(k: u8) -> LinkConfig {
    let mut c = LinkConfig::new(key(k));
    c.handshake_timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_secs(2);
    c.timeout = Duration::from_secs(10);
    c
}

fn listener(c: &LinkConfig) -> (Listener, SocketAddr) {
    let l = Listener::bind("127.0.0.1:0", c).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Accepts one link on a thread and hands back its result.
fn accept_one(l: Listener) -> thread::JoinHandle<Result<Link>> {
    thread::spawn(move || l.accept_until(Deadline::after(Duration::from_secs(5))))
}

fn pair(c: &LinkConfig) -> (Link, Link) {
    let (l, a) = listener(c);
    let srv = accept_one(l);
    let client = connect(a, c).unwrap();
    (client, srv.join().unwrap().unwrap())
}

/// A client that completes a genuine handshake and then gives the test the raw socket.
fn raw_authenticated(a: SocketAddr, c: &LinkConfig) -> TcpStream {
    let (stream, _) = connect_stream(&a, c).unwrap();
    let mut conn = Conn::new(Arc::new(stream), a.to_string(), WaitStrategy::Block);
    drive_handshake(
        &mut conn,
        Handshake::client(handshake_config(c, &tcp_only())).unwrap(),
        c.handshake_timeout,
    )
    .unwrap();
    let stream = Arc::try_unwrap(conn.stream).unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

fn handshake_error(r: Result<Link>) -> HandshakeError {
    match r {
        Err(Error::Handshake { error: source, .. }) => source,
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

#[test]
fn halves_of_different_links_do_not_unsplit() {
    let (a, b) = pair(&cfg(1));
    let (ta, _ra) = a.split();
    let (_tb, rb) = b.split();
    assert!(Link::unsplit(ta, rb).is_err());
}

#[test]
fn a_message_over_the_negotiated_maximum_is_refused_before_sending() {
    let mut small = cfg(1);
    small.max_payload = 1000;
    let (l, addr) = listener(&cfg(1));
    let srv = accept_one(l);
    let mut a = connect(addr, &small).unwrap();
    let mut b = srv.join().unwrap().unwrap();
    assert_eq!(b.info().max_payload, 1000, "the smaller side's limit wins");
    let err = b.send(0, &[0u8; 1001]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MessageTooLarge {
                len: 1001,
                max: 1000
            }
        ),
        "{err:?}"
    );
    b.send(0, &[1u8; 1000]).unwrap();
    let mut buf = vec![0u8; 1000];
    assert_eq!(a.recv(&mut buf).unwrap().len, 1000);
}

#[test]
fn orderly_close_and_vanished_peer_are_told_apart() {
    let (mut a, b) = pair(&cfg(1));
    drop(b);
    let mut buf = [0u8; 8];
    assert!(matches!(a.recv(&mut buf), Err(Error::Closed { .. })));
    assert!(
        matches!(a.recv(&mut buf), Err(Error::Broken { .. })),
        "later calls fail fast"
    );

    let c = cfg(1);
    let (l, addr) = listener(&c);
    let srv = accept_one(l);
    let raw = raw_authenticated(addr, &c);
    let mut server = srv.join().unwrap().unwrap();
    drop(raw); // no close frame: the socket just goes away, as when a process is killed
    let err = server.recv(&mut buf).unwrap_err();
    assert!(matches!(err, Error::PeerGone { .. }), "{err:?}");
    assert!(err.is_peer_failure());
}

#[test]
fn wrong_key_is_refused_with_a_clear_error_on_both_sides() {
    let (l, addr) = listener(&cfg(1));
    let srv = accept_one(l);
    let client = handshake_error(connect(addr, &cfg(2)));
    let server = handshake_error(srv.join().unwrap());
    assert!(
        matches!(
            client,
            HandshakeError::WrongKey {
                detected_by: Side::Local
            }
        ),
        "{client:?}"
    );
    assert!(
        matches!(
            server,
            HandshakeError::WrongKey {
                detected_by: Side::Peer
            }
        ),
        "{server:?}"
    );
    assert!(client.to_string().contains("wrong cluster key"));
}

#[test]
fn incompatible_version_is_refused_on_both_sides() {
    let c = cfg(1);
    let (l, addr) = listener(&c);
    let srv = accept_one(l);
    let (stream, _) = connect_stream(&addr, &c).unwrap();
    let mut conn = Conn::new(Arc::new(stream), addr.to_string(), WaitStrategy::Block);
    let mut future = handshake_config(&c, &tcp_only());
    future.versions = (7, 9);
    let client = drive_handshake(
        &mut conn,
        Handshake::client(future).unwrap(),
        c.handshake_timeout,
    )
    .unwrap_err();
    assert!(
        matches!(
            client,
            HandshakeError::IncompatibleVersion { theirs: (1, 1), .. }
        ),
        "{client:?}"
    );
    let server = handshake_error(srv.join().unwrap());
    assert!(
        matches!(
            server,
            HandshakeError::IncompatibleVersion { theirs: (7, 9), .. }
        ),
        "{server:?}"
    );
}

#[test]
fn a_stalled_peer_is_dropped_at_the_handshake_deadline() {
    let mut c = cfg(1);
    c.handshake_timeout = Duration::from_millis(300);
    // A client that connects and says nothing.
    let (l, addr) = listener(&c);
    let srv = accept_one(l);
    let _silent = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    let e = handshake_error(srv.join().unwrap());
    assert!(matches!(e, HandshakeError::Timeout { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(3));

    // A server that accepts and says nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let t = Instant::now();
    let e = handshake_error(connect(addr, &c));
    assert!(matches!(e, HandshakeError::Timeout { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_truncated_handshake_is_reported_as_such() {
    let c = cfg(1);
    let (l, addr) = listener(&c);
    let srv = accept_one(l);
    let mut hs = Handshake::client(handshake_config(&c, &tcp_only())).unwrap();
    let hello = hs.poll_transmit().unwrap();
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.write_all(&hello[..hello.len() / 2]).unwrap();
    drop(raw);
    let e = handshake_error(srv.join().unwrap());
    assert!(matches!(e, HandshakeError::Truncated { .. }), "{e:?}");
}

#[test]
fn random_bytes_are_refused_as_garbage() {
    let c = cfg(1);
    let (l, addr) = listener(&c);
    let srv = accept_one(l);
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: sinew\r\n\r\n")
        .unwrap();
    let e = handshake_error(srv.join().unwrap());
    assert!(matches!(e, HandshakeError::Garbage(_)), "{e:?}");
    // The server hangs up: the connection reaches EOF rather than staying open.
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
}

#[test]
fn an_oversized_frame_on_an_established_link_is_an_error() {
    let c = cfg(1);
    let (l, addr) = listener(&c);
    let srv = accept_one(l);
    let mut raw = raw_authenticated(addr, &c);
    let mut server = srv.join().unwrap().unwrap();
    let forged = FrameHeader {
        kind: FrameKind::DATA,
        flags: crate::frame::FrameFlags::NONE,
        tag: 0,
        seq: 0,
        len: u32::MAX,
        payload_crc: 0,
    };
    raw.write_all(&forged.encode()).unwrap();
    let mut buf = vec![0u8; 64];
    let err = server.recv(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Frame {
                error: FrameError::Oversized { len: u32::MAX, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(server.recv(&mut buf), Err(Error::Broken { .. })));
}

#[test]
fn a_corrupted_header_on_an_established_link_is_an_error() {
    let c = cfg(1);
    let (l, addr) = listener(&c);
    let srv = accept_one(l);
    let mut raw = raw_authenticated(addr, &c);
    let mut server = srv.join().unwrap().unwrap();
    let mut bytes = FrameHeader::try_for_payload(FrameKind::DATA, 3, 0, b"abcd", false)
        .unwrap()
        .encode();
    bytes[9] ^= 0x10; // the tag
    raw.write_all(&bytes).unwrap();
    raw.write_all(b"abcd").unwrap();
    let mut buf = vec![0u8; 64];
    let err = server.recv(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Frame {
                error: FrameError::HeaderChecksum { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_replayed_or_skipped_sequence_number_is_an_error() {
    let c = cfg(1);
    let (l, addr) = listener(&c);
    let srv = accept_one(l);
    let mut raw = raw_authenticated(addr, &c);
    let mut server = srv.join().unwrap().unwrap();
    let bytes = FrameHeader::try_for_payload(FrameKind::DATA, 3, 5, b"", false)
        .unwrap()
        .encode();
    raw.write_all(&bytes).unwrap();
    let mut buf = vec![0u8; 64];
    assert!(matches!(
        server.recv(&mut buf),
        Err(Error::ProtocolViolation { .. })
    ));
}

#[test]
fn a_connector_started_before_its_listener_gets_through() {
    let c = cfg(1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cc = c.clone();
    let client = thread::spawn(move || connect(addr, &cc));
    thread::sleep(Duration::from_millis(300));
    let l = Listener::bind(addr, &c).unwrap();
    let server = l
        .accept_until(Deadline::after(Duration::from_secs(5)))
        .unwrap();
    let client = client.join().unwrap().unwrap();
    assert_eq!(client.info().peer_node_id, c.node_id);
    // Auto selection on one host: the best backend this machine can run, on both sides.
    let best = select::PREFERENCE
        .into_iter()
        .find(|k| select::availability(*k).is_ok())
        .unwrap();
    assert_eq!(server.info().transport, best);
    assert_eq!(client.info().transport, best);
}

#[test]
fn a_forced_backend_the_peer_lacks_fails_clearly_on_both_sides() {
    let mut tcp = cfg(1);
    tcp.transport = select::TransportChoice::Only(TransportKind::TCP);
    let mut shm = cfg(1);
    shm.transport = select::TransportChoice::Only(TransportKind::SHM);
    let (l, addr) = listener(&tcp);
    let srv = accept_one(l);
    let client = connect(addr, &shm).unwrap_err();
    let server = srv.join().unwrap().unwrap_err();
    for e in [client, server] {
        assert!(
            matches!(&e, Error::Unavailable { reason, .. } if reason.contains("no transport in common")),
            "{e}"
        );
    }
}

#[test]
fn forcing_a_backend_this_machine_lacks_fails_before_connecting() {
    let mut c = cfg(1);
    c.transport = select::TransportChoice::Only(TransportKind::RDMA);
    let err = connect("127.0.0.1:1", &c).unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable { transport, .. } if transport == "rdma"),
        "{err}"
    );
    assert!(Listener::bind("127.0.0.1:0", &c).is_err());
}

#[test]
fn a_connector_gives_up_at_its_deadline() {
    let mut c = cfg(1);
    c.connect_timeout = Duration::from_millis(300);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Instant::now();
    let err = connect(format!("127.0.0.1:{port}"), &c).unwrap_err();
    assert!(
        matches!(err, Error::Connect { attempts, .. } if attempts > 1),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn accept_gives_up_at_its_deadline() {
    let (l, _) = listener(&cfg(1));
    let err = l
        .accept_until(Deadline::after(Duration::from_millis(50)))
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { op: "accept", .. }),
        "{err:?}"
    );
}

/// The congestion control a socket runs.
#[cfg(target_os = "linux")]
fn cc(s: &TcpStream) -> String {
    let name = SockRef::from(s).tcp_congestion().unwrap();
    String::from_utf8_lossy(&name)
        .trim_end_matches('\0')
        .to_string()
}

#[cfg(target_os = "linux")]
#[test]
fn the_configured_congestion_control_is_set_and_a_refused_one_keeps_the_systems() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let system = cc(&s);
    let mut c = cfg(1);
    // reno is built into every kernel and always allowed
    c.congestion = Some("reno".into());
    configure(&s, &c).unwrap();
    assert_eq!(cc(&s), "reno");
    c.congestion = Some("no-such-algorithm".into());
    configure(&s, &c).unwrap();
    assert_eq!(cc(&s), "reno", "a refused name changes nothing");
    c.congestion = None;
    let fresh = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    configure(&fresh, &c).unwrap();
    assert_eq!(cc(&fresh), system);
}

#[cfg(target_os = "linux")]
#[test]
fn both_ends_run_the_configured_congestion_control_from_the_first_packet() {
    let mut c = cfg(1);
    c.congestion = Some("reno".into());
    let l = Listener::bind("127.0.0.1:0", &c).unwrap();
    let addr = l.local_addr().unwrap();
    // set before the connection exists, not switched afterwards (configure is not called here)
    let client = connect_once(addr, Deadline::after(Duration::from_secs(5)), &c).unwrap();
    assert_eq!(cc(&client), "reno");
    let deadline = Deadline::after(Duration::from_secs(5));
    let server = loop {
        match l.inner.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !deadline.expired() => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    assert_eq!(cc(&server), "reno", "inherited from the listener");
}

/// Links of `kind` waiting by `wait`, or `None` when this machine cannot run `kind`.
fn kind_pair(kind: TransportKind, wait: WaitStrategy) -> Option<(Link, Link)> {
    if let Err(reason) = select::availability_on(kind, None) {
        eprintln!("skipping {kind}: {reason}");
        return None;
    }
    let mut c = cfg(1);
    c.transport = TransportChoice::Only(kind);
    c.wait = wait;
    Some(pair(&c))
}

const SOCKET_KINDS: [TransportKind; 2] = [TransportKind::TCP, TransportKind::URING];
/// The strategies that sleep in the kernel.
fn sleeping() -> [WaitStrategy; 2] {
    [WaitStrategy::Block, WaitStrategy::default()]
}

#[test]
fn low_water_marks_are_raised_only_for_large_owed_reads_and_capped() {
    assert_eq!(LowWater::plan(false, 16 << 20), (16 << 20, 1));
    assert_eq!(LowWater::plan(true, LOWAT_MIN - 1), (LOWAT_MIN - 1, 1));
    assert_eq!(
        LowWater::plan(true, LOWAT_MIN),
        (LOWAT_MIN / 2, LOWAT_MIN / 2)
    );
    assert_eq!(
        LowWater::plan(true, 16 << 20),
        ((16 << 20) - LOWAT_MAX, LOWAT_MAX)
    );
}

proptest::proptest! {
    /// A planned read never takes more than asked, and always leaves at least its mark owed
    /// after it, so a sleeper is woken by bytes that are certain to come.
    #[test]
    fn a_planned_read_leaves_its_mark_still_owed(len in 0usize..64 << 20, owed: bool) {
        let (limit, mark) = LowWater::plan(owed, len);
        proptest::prop_assert!(mark >= 1 && limit <= len);
        if mark > 1 {
            proptest::prop_assert!(owed && limit >= 1 && len - limit >= mark && mark <= LOWAT_MAX);
        } else {
            proptest::prop_assert_eq!(limit, len);
        }
    }
}

/// After a large payload received with a raised low-water mark, a short message that arrives
/// while the receiver sleeps wakes it: the mark is back to 1 before the header is waited for.
#[test]
fn a_short_message_after_a_large_one_wakes_a_sleeping_receiver() {
    for kind in SOCKET_KINDS {
        for wait in sleeping() {
            let Some((mut a, mut b)) = kind_pair(kind, wait) else {
                continue;
            };
            let large: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
            let (go, went) = std::sync::mpsc::channel();
            let sender = {
                let large = large.clone();
                thread::spawn(move || {
                    b.send(1, &large).unwrap();
                    went.recv().unwrap();
                    thread::sleep(Duration::from_millis(100));
                    b.send(2, b"short").unwrap();
                    b
                })
            };
            let mut buf = vec![0u8; 4 << 20];
            let m = a.recv(&mut buf).unwrap();
            assert_eq!((m.tag, &buf[..m.len]), (1, &large[..]), "{kind}/{wait}");
            go.send(()).unwrap();
            let t = Instant::now();
            let m = a
                .recv_until(&mut buf, Deadline::after(Duration::from_secs(5)))
                .unwrap_or_else(|e| panic!("{kind}/{wait}: {e}"));
            assert_eq!((m.tag, &buf[..m.len]), (2, &b"short"[..]), "{kind}/{wait}");
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{kind}/{wait}: {:?}",
                t.elapsed()
            );
            drop(sender.join().unwrap());
        }
    }
}

/// A peer that dies partway through a large payload, while the receiver sleeps with a raised
/// low-water mark that the bytes still owed would never reach: an error within 2 s.
#[test]
fn a_peer_dying_mid_payload_wakes_a_receiver_with_a_raised_mark() {
    for kind in SOCKET_KINDS {
        for wait in sleeping() {
            let Some((mut a, mut b)) = kind_pair(kind, wait) else {
                continue;
            };
            let header = FrameHeader {
                kind: FrameKind::DATA,
                flags: crate::frame::FrameFlags::NONE,
                tag: 0,
                seq: 0,
                len: 4 << 20,
                payload_crc: 0,
            };
            let killer = thread::spawn(move || {
                let mut bytes = header.encode().to_vec();
                bytes.extend(std::iter::repeat_n(7u8, 300 << 10));
                b.inject_raw(&bytes).unwrap();
                thread::sleep(Duration::from_millis(200));
                b.abandon();
            });
            let t = Instant::now();
            let mut buf = vec![0u8; 4 << 20];
            let err = a
                .recv_until(&mut buf, Deadline::after(Duration::from_secs(30)))
                .unwrap_err();
            killer.join().unwrap();
            crate::suite::assert_peer_failure_within_two_seconds(
                &err,
                t,
                200,
                &format!("{kind}/{wait}"),
            );
        }
    }
}

fn rcvlowat(fd: RawFd) -> libc::c_int {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live and sized for the option, which the kernel writes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    v
}

#[test]
fn the_low_water_mark_reaches_the_socket_and_a_refused_one_is_an_error_only_if_not_undone() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let mut w = LowWater::new();
    w.set(s.as_raw_fd(), 300 << 10).unwrap();
    assert_eq!(rcvlowat(s.as_raw_fd()), 300 << 10);
    w.set(s.as_raw_fd(), 1).unwrap();
    assert_eq!(rcvlowat(s.as_raw_fd()), 1);
    // Not a socket: neither the raised mark nor the reset can be set.
    let (r, _w) = nix::unistd::pipe().unwrap();
    let mut w = LowWater::new();
    w.current = 5;
    assert!(w.set(r.as_raw_fd(), 300 << 10).is_err());
}
