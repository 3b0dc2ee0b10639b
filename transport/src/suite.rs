//! The generic link test suite: every behaviour a `Link` promises, run against every backend.
//! A new backend gets the whole suite by adding one `link_suite!` line at the bottom.

use std::thread;
use std::time::{Duration, Instant};

use crate::deadline::Deadline;
use crate::error::Error;
use crate::handshake::TransportKind;
use crate::key::ClusterKey;
use crate::link::{Link, LinkConfig, Message};
use crate::rdma::SOFTWARE_DEVICE;
use crate::select::{TransportChoice, availability_on};
use crate::tcp::{Listener, connect};
use crate::wait::WaitStrategy;

thread_local! {
    /// The RDMA device this test thread's links use: the software device, unless a hardware
    /// test names a real one.
    static RDMA_DEVICE: std::cell::RefCell<String> = std::cell::RefCell::new(SOFTWARE_DEVICE.into());
}

/// A pair of links forced onto `kind`, or `None` (with the reason printed) when this machine
/// cannot run it — then the link would fall back, which the selection tests cover.
fn pair(kind: TransportKind, wait: WaitStrategy) -> Option<(Link, Link)> {
    // RDMA runs on the software device, which any machine has (or on the device a hardware
    // test names).
    let device = RDMA_DEVICE.with(|d| d.borrow().clone());
    if let Err(reason) = availability_on(kind, Some(&device)) {
        eprintln!("skipping: {kind} is unavailable here: {reason}");
        return None;
    }
    let mut cfg = LinkConfig::new(ClusterKey::from_bytes(&[9u8; 32]).unwrap());
    cfg.transport = TransportChoice::Only(kind);
    cfg.wait = wait;
    cfg.timeout = Duration::from_secs(20);
    // Small rings, so large messages must stream through them.
    cfg.shm_ring_bytes = 64 << 10;
    cfg.rdma_device = Some(device);
    let listener = Listener::bind("127.0.0.1:0", &cfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let server =
        thread::spawn(move || listener.accept_until(Deadline::after(Duration::from_secs(10))));
    let client = connect(addr, &cfg).unwrap();
    let server = server.join().unwrap().unwrap();
    assert_eq!(client.info().transport, kind);
    assert_eq!(server.info().transport, kind);
    Some((client, server))
}

pub(crate) fn round_trip(kind: TransportKind) {
    for wait in [
        WaitStrategy::Spin,
        WaitStrategy::Block,
        WaitStrategy::default(),
    ] {
        let Some((mut a, mut b)) = pair(kind, wait) else {
            return;
        };
        let sizes = [
            0usize,
            1,
            7,
            32,
            4095,
            4096,
            16_385,
            65_537,
            1 << 20,
            (8 << 20) + 3,
        ];
        let echo = thread::spawn(move || {
            let mut buf = vec![0u8; 9 << 20];
            for _ in 0..sizes.len() {
                let m = b.recv(&mut buf).unwrap();
                b.send(m.tag ^ 0xffff, &buf[..m.len]).unwrap();
            }
        });
        let mut buf = vec![0u8; 9 << 20];
        for (i, &n) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..n).map(|j| (j * 131 + i * 7) as u8).collect();
            a.send(i as u32, &data).unwrap();
            let m = a.recv(&mut buf).unwrap();
            assert_eq!(
                m,
                Message {
                    tag: i as u32 ^ 0xffff,
                    len: n
                },
                "{kind}/{wait}"
            );
            assert!(
                buf[..n] == data[..],
                "{kind}/{wait}: a {n}-byte payload differs"
            );
        }
        echo.join().unwrap();
    }
}

pub(crate) fn concurrent_halves(kind: TransportKind) {
    // Both sides send 16 MiB while receiving 16 MiB, from two threads each: without independent
    // halves the buffers fill and both sides stall until the deadline fails the test.
    let Some((a, b)) = pair(kind, WaitStrategy::default()) else {
        return;
    };
    let run = |link: Link, seed: u8| {
        thread::spawn(move || {
            let (mut tx, mut rx) = link.split();
            let sender = thread::spawn(move || {
                for i in 0..64u32 {
                    tx.send(i, &vec![seed.wrapping_add(i as u8); 256 << 10])
                        .unwrap();
                }
                tx
            });
            let mut buf = vec![0u8; 256 << 10];
            for i in 0..64u32 {
                let m = rx.recv(&mut buf).unwrap();
                assert_eq!((m.tag, m.len), (i, 256 << 10));
                let expect = (seed ^ 1).wrapping_add(i as u8);
                assert!(buf.iter().all(|&x| x == expect), "message {i} corrupted");
            }
            let tx = sender.join().unwrap();
            assert!(Link::unsplit(tx, rx).is_ok());
        })
    };
    let (ta, tb) = (run(a, 0), run(b, 1));
    ta.join().unwrap();
    tb.join().unwrap();
}

pub(crate) fn deadline_expiry(kind: TransportKind) {
    for wait in [WaitStrategy::Spin, WaitStrategy::Block] {
        let Some((mut a, mut b)) = pair(kind, wait) else {
            return;
        };
        let mut buf = [0u8; 16];
        let t = Instant::now();
        let err = a
            .recv_until(&mut buf, Deadline::after(Duration::from_millis(100)))
            .unwrap_err();
        assert!(
            matches!(err, Error::Timeout { .. }),
            "{kind}/{wait}: {err:?}"
        );
        assert!(t.elapsed() >= Duration::from_millis(100) && t.elapsed() < Duration::from_secs(3));
        b.send(5, b"late").unwrap();
        assert_eq!(
            a.recv(&mut buf).unwrap(),
            Message { tag: 5, len: 4 },
            "the link survives a timeout"
        );
    }
}

pub(crate) fn small_buffer_and_large_message(kind: TransportKind) {
    let Some((mut a, mut b)) = pair(kind, WaitStrategy::default()) else {
        return;
    };
    b.send(1, &[7u8; 100]).unwrap();
    let mut small = [0u8; 10];
    let err = a.recv(&mut small).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BufferTooSmall {
                needed: 100,
                capacity: 10
            }
        ),
        "{err:?}"
    );
    let mut big = [0u8; 100];
    assert_eq!(a.recv(&mut big).unwrap(), Message { tag: 1, len: 100 });
    let max = a.info().max_payload as usize;
    let err = a.send(0, &vec![0u8; max + 1]).unwrap_err();
    assert!(matches!(err, Error::MessageTooLarge { .. }), "{err:?}");
    a.send(2, b"still fine").unwrap();
    assert_eq!(b.recv(&mut big).unwrap().len, 10);
}

pub(crate) fn orderly_close(kind: TransportKind) {
    let Some((mut a, b)) = pair(kind, WaitStrategy::default()) else {
        return;
    };
    drop(b);
    let mut buf = [0u8; 8];
    let err = a.recv(&mut buf).unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{kind}: {err:?}");
    assert!(
        matches!(a.recv(&mut buf), Err(Error::Broken { .. })),
        "later calls fail fast"
    );
}

pub(crate) fn peer_death(kind: TransportKind) {
    for wait in [WaitStrategy::Spin, WaitStrategy::Block] {
        // A receiver waiting on a peer that dies.
        let Some((mut a, b)) = pair(kind, wait) else {
            return;
        };
        let killer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            b.abandon();
        });
        let t = Instant::now();
        let mut buf = [0u8; 64];
        let err = a
            .recv_until(&mut buf, Deadline::after(Duration::from_secs(30)))
            .unwrap_err();
        killer.join().unwrap();
        assert_peer_failure_within_two_seconds(&err, t, 200, &format!("{kind}/{wait}"));

        // A sender streaming into a peer that dies mid-transfer.
        let Some((mut a, mut b)) = pair(kind, wait) else {
            return;
        };
        let killer = thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let _ = b.recv(&mut buf);
            b.abandon();
        });
        let t = Instant::now();
        let msg = vec![3u8; 1 << 20];
        let err = loop {
            if let Err(e) = a.send_until(0, &msg, Deadline::after(Duration::from_secs(30))) {
                break e;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{kind}/{wait}: sends into a dead peer keep succeeding"
            );
        };
        killer.join().unwrap();
        assert!(err.is_peer_failure(), "{kind}/{wait}: {err:?}");
    }
}

/// Asserts that `err`, from a call started at `started` on a peer killed `killed_after_ms`
/// later, reports the peer's failure within 2 s of its death.
pub(crate) fn assert_peer_failure_within_two_seconds(
    err: &Error,
    started: Instant,
    killed_after_ms: u64,
    what: &str,
) {
    assert!(err.is_peer_failure(), "{what}: {err:?}");
    let bound = Duration::from_secs(2) + Duration::from_millis(killed_after_ms);
    assert!(started.elapsed() < bound, "{what}: {:?}", started.elapsed());
}

pub(crate) fn garbage_from_the_peer(kind: TransportKind) {
    let Some((mut a, mut b)) = pair(kind, WaitStrategy::default()) else {
        return;
    };
    let garbage: Vec<u8> = (0..200u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    b.inject_raw(&garbage).unwrap();
    let mut buf = vec![0u8; 1024];
    let err = a.recv(&mut buf).unwrap_err();
    assert!(
        matches!(err, Error::Frame { .. } | Error::ProtocolViolation { .. }),
        "{kind}: {err:?}"
    );
    assert!(matches!(a.recv(&mut buf), Err(Error::Broken { .. })));
}

pub(crate) fn nonblocking_full_duplex(kind: TransportKind) {
    // Each side, in one thread, streams messages out while taking messages in, never blocking:
    // both directions at once, of sizes from empty to larger than every buffer.
    let Some((a, b)) = pair(kind, WaitStrategy::Spin) else {
        return;
    };
    let sizes = [0usize, 5, 40, 41, 4096, 100_000, 300_000, 3 << 20];
    let run = |mut link: Link, seed: u8| {
        thread::spawn(move || {
            let outgoing: Vec<Vec<u8>> = sizes
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
                        .collect()
                })
                .collect();
            let mut buf = vec![0u8; 4 << 20];
            let (mut sent, mut got) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(20);
            while sent < sizes.len() || got < sizes.len() {
                assert!(
                    Instant::now() < deadline,
                    "{kind}: stuck at sent {sent}, received {got}"
                );
                if sent < sizes.len() && link.tx_try_send(sent as u32, &outgoing[sent]).unwrap() {
                    sent += 1;
                }
                if got < sizes.len()
                    && let Some(m) = link.rx_try_recv(&mut buf).unwrap()
                {
                    let other = if seed == 3 { 5u8 } else { 3u8 };
                    assert_eq!((m.tag, m.len), (got as u32, sizes[got]), "{kind}");
                    assert!(
                        buf[..m.len]
                            .iter()
                            .enumerate()
                            .all(|(i, &x)| x == (i as u8).wrapping_mul(other).wrapping_add(other)),
                        "{kind}: message {got} corrupted"
                    );
                    got += 1;
                }
            }
            // Blocking calls work as before once nothing is in flight.
            link.send(99, b"after").unwrap();
            let m = link.recv(&mut buf).unwrap();
            assert_eq!((m.tag, &buf[..m.len]), (99, &b"after"[..]));
        })
    };
    let (ta, tb) = (run(a, 3), run(b, 5));
    ta.join().unwrap();
    tb.join().unwrap();
}

pub(crate) fn halves_move_between_threads(kind: TransportKind) {
    // A link used on one thread, then on others, then back: whatever a backend ties to the thread
    // that used it first (io_uring's single-issuer rings and per-thread ring tables) must follow
    // the link, small messages and large ones, and dropping it on yet another thread is clean.
    for wait in [WaitStrategy::Spin, WaitStrategy::Block] {
        let Some((a, mut b)) = pair(kind, wait) else {
            return;
        };
        const ROUNDS: usize = 4;
        const SIZES: [usize; 3] = [8, 20_000, 3 << 20];
        let echo = thread::spawn(move || {
            let mut buf = vec![0u8; 4 << 20];
            for _ in 0..ROUNDS * SIZES.len() {
                let m = b.recv(&mut buf).unwrap();
                b.send(m.tag + 1, &buf[..m.len]).unwrap();
            }
            b
        });
        let exchange = move |mut link: Link, round: usize| {
            let mut buf = vec![0u8; 4 << 20];
            for (i, &n) in SIZES.iter().enumerate() {
                let data: Vec<u8> = (0..n).map(|j| (j * 31 + round * 7 + i) as u8).collect();
                let tag = (round * 10 + i) as u32;
                link.send(tag, &data).unwrap();
                let m = link.recv(&mut buf).unwrap();
                assert_eq!((m.tag, m.len), (tag + 1, n), "{kind}/{wait} round {round}");
                assert!(
                    buf[..n] == data[..],
                    "{kind}/{wait} round {round}: payload differs"
                );
            }
            link
        };
        // This thread, another, this one again, a third.
        let a = exchange(a, 0);
        let a = thread::spawn(move || exchange(a, 1)).join().unwrap();
        let a = exchange(a, 2);
        let a = thread::spawn(move || exchange(a, 3)).join().unwrap();
        thread::spawn(move || drop(a)).join().unwrap();
        drop(echo.join().unwrap());
    }
}

/// Serialises the tests of backends whose resources are per device (RDMA: a device has room for
/// ~10 queue pairs, and all of this process's links share the software device).
pub(crate) fn serial(kind: TransportKind) -> Option<std::sync::MutexGuard<'static, ()>> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    (kind == TransportKind::RDMA).then(|| LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

macro_rules! link_suite {
    ($($name:ident => $kind:expr),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[test]
            fn messages_from_empty_to_larger_than_any_buffer_round_trip() {
                let _serial = serial($kind);
                round_trip($kind)
            }
            #[test]
            fn halves_work_concurrently_from_two_threads() {
                let _serial = serial($kind);
                concurrent_halves($kind)
            }
            #[test]
            fn a_deadline_expires_and_the_link_stays_usable() {
                let _serial = serial($kind);
                deadline_expiry($kind)
            }
            #[test]
            fn a_small_buffer_consumes_nothing_and_oversized_sends_are_refused() {
                let _serial = serial($kind);
                small_buffer_and_large_message($kind)
            }
            #[test]
            fn an_orderly_close_is_told_apart() {
                let _serial = serial($kind);
                orderly_close($kind)
            }
            #[test]
            fn a_dead_peer_is_an_error_within_two_seconds() {
                let _serial = serial($kind);
                peer_death($kind)
            }
            #[test]
            fn garbage_from_the_peer_is_an_error() {
                let _serial = serial($kind);
                garbage_from_the_peer($kind)
            }
            #[test]
            fn a_link_moves_between_threads() {
                let _serial = serial($kind);
                halves_move_between_threads($kind)
            }
            #[test]
            fn non_blocking_sends_and_receives_move_both_directions_at_once() {
                let _serial = serial($kind);
                nonblocking_full_duplex($kind)
            }
        }
    )*};
}

/// The suite on a real RDMA device, opt-in: `SINEW_RDMA_DEVICE=mlx5_0` (or `rxe0` for soft-RoCE,
/// `rdma_en2` on a Mac) runs it there; without the variable there is nothing to test against.
#[test]
fn the_suite_on_the_rdma_device_named_by_sinew_rdma_device() {
    let Some(device) = std::env::var(crate::rdma::DEVICE_ENV)
        .ok()
        .filter(|d| !d.is_empty())
    else {
        eprintln!("skipped: set SINEW_RDMA_DEVICE to run the link suite on RDMA hardware");
        return;
    };
    let _serial = serial(TransportKind::RDMA);
    if let Err(reason) = availability_on(TransportKind::RDMA, Some(&device)) {
        panic!("SINEW_RDMA_DEVICE={device} cannot be used: {reason}");
    }
    RDMA_DEVICE.with(|d| *d.borrow_mut() = device);
    round_trip(TransportKind::RDMA);
    concurrent_halves(TransportKind::RDMA);
    deadline_expiry(TransportKind::RDMA);
    small_buffer_and_large_message(TransportKind::RDMA);
    orderly_close(TransportKind::RDMA);
    peer_death(TransportKind::RDMA);
    garbage_from_the_peer(TransportKind::RDMA);
    nonblocking_full_duplex(TransportKind::RDMA);
    halves_move_between_threads(TransportKind::RDMA);
}

link_suite! {
    tcp => TransportKind::TCP,
    uring => TransportKind::URING,
    shm => TransportKind::SHM,
    rdma => TransportKind::RDMA,
}
