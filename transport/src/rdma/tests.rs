//! The RDMA backend's own failure modes, on the software device (the generic link suite runs
//! the rest: see `suite.rs`).

use std::net::{TcpListener, TcpStream};
use std::thread;

use super::*;
use crate::handshake::TransportKind;
use crate::key::ClusterKey;
use crate::link::LinkConfig;
use crate::select::TransportChoice;
use crate::suite::serial;
use crate::tcp::{Conn, Listener, connect};

type Halves = (RdmaSender, RdmaReceiver);

/// Two ends set up as `tcp::establish` would, without the handshake, so that tests reach the
/// engine. `mangle` may alter the blob each side receives.
fn direct_pair(
    mangle: fn(Vec<u8>) -> Vec<u8>,
) -> (
    std::result::Result<Halves, String>,
    std::result::Result<Halves, String>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let a = Pending::new(Some(SOFTWARE_DEVICE)).unwrap();
    let b = Pending::new(Some(SOFTWARE_DEVICE)).unwrap();
    let (blob_a, blob_b) = (mangle(a.blob()), mangle(b.blob()));
    let run = move |pending: Pending, stream: TcpStream, peer_blob: Vec<u8>| {
        let stream = Arc::new(stream);
        let mut conn = Conn::new(stream.clone(), "peer".into(), WaitStrategy::Block);
        establish(
            pending,
            &peer_blob,
            &mut conn,
            stream,
            64 << 20,
            WaitStrategy::default(),
            Deadline::after(Duration::from_secs(10)),
        )
        .unwrap()
    };
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        run(b, s, blob_a)
    });
    let client = run(a, TcpStream::connect(addr).unwrap(), blob_b);
    (client, server.join().unwrap())
}

fn pair() -> (Halves, Halves) {
    let (a, b) = direct_pair(|b| b);
    (a.unwrap(), b.unwrap())
}

#[test]
fn a_send_dropped_for_a_frame_mismatch_is_detected_as_lost() {
    let _serial = serial(TransportKind::RDMA);
    let ((mut tx, _rx_a), (_tx_b, mut rx)) = pair();
    // The next chunk goes out one frame longer than the receive the peer posted for it: the
    // device drops it silently, as Apple's does.
    tx.shared.lock().skew_next_chunk = true;
    tx.send(
        1,
        &vec![7u8; 100_000],
        Deadline::after(Duration::from_secs(5)),
    )
    .unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 100_000];
    let err = rx
        .recv(&mut buf, Deadline::after(Duration::from_secs(20)))
        .unwrap_err();
    assert!(
        matches!(&err, Error::ProtocolViolation { detail, .. } if detail.contains("lost")),
        "{err}"
    );
    assert!(
        t.elapsed() < LOSS_GRACE + Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert!(matches!(
        rx.recv(&mut buf, Deadline::after(Duration::from_secs(1))),
        Err(Error::Broken { .. })
    ));
}

#[test]
fn a_silent_peer_is_declared_gone() {
    let _serial = serial(TransportKind::RDMA);
    let ((_tx_a, mut rx_a), (tx_b, rx_b)) = pair();
    // The peer hangs: its process and TCP connection live on, nothing of it runs.
    tx_b.shared.silent.store(true, Ordering::Relaxed);
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let err = rx_a
        .recv(&mut buf, Deadline::after(Duration::from_secs(30)))
        .unwrap_err();
    assert!(
        matches!(&err, Error::PeerGone { detail, .. } if detail.contains("silent")),
        "{err}"
    );
    assert!(
        t.elapsed() >= SILENCE - Duration::from_millis(500)
            && t.elapsed() < SILENCE + Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    drop((tx_b, rx_b));
}

#[test]
fn queue_pairs_not_on_one_fabric_fall_back_on_both_sides() {
    let _serial = serial(TransportKind::RDMA);
    // Each side is told a queue-pair number nobody has: the probe packet goes nowhere.
    let (a, b) = direct_pair(|mut blob| {
        blob[17..21].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
        blob
    });
    for side in [a, b] {
        let reason = side.err().expect("the probe cannot succeed");
        assert!(reason.contains("not on one RDMA fabric"), "{reason}");
    }
}

#[test]
fn a_malformed_blob_is_refused() {
    assert!(parse_blob(&[]).is_err());
    assert!(parse_blob(&[9; 41]).unwrap_err().contains("version"));
    let mut ok = Pending::new(Some(SOFTWARE_DEVICE)).unwrap().blob();
    assert!(parse_blob(&ok).is_ok());
    // A chunk that is not whole frames.
    ok[33..37].copy_from_slice(&1000u32.to_le_bytes());
    assert!(parse_blob(&ok).unwrap_err().contains("out of range"));
}

#[test]
fn messages_above_the_device_maximum_are_chunked() {
    let _serial = serial(TransportKind::RDMA);
    let ((mut tx, _rx_a), (_tx_b, mut rx)) = pair();
    let n = rdma_sys::soft::MAX_MESSAGE + 12_345;
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
    let expect = data.clone();
    let sender = thread::spawn(move || {
        tx.send(9, &data, Deadline::after(Duration::from_secs(30)))
            .unwrap();
        tx
    });
    let mut buf = vec![0u8; n];
    let m = rx
        .recv(&mut buf, Deadline::after(Duration::from_secs(30)))
        .unwrap();
    assert_eq!((m.tag, m.len), (9, n));
    assert!(buf == expect);
    drop(sender.join().unwrap());
}

#[test]
fn credit_holds_a_sender_back_until_the_receiver_reads_and_nothing_is_lost() {
    let _serial = serial(TransportKind::RDMA);
    let ((mut tx, _rx_a), (_tx_b, mut rx)) = pair();
    const N: u32 = 2000;
    let sender = thread::spawn(move || {
        for i in 0..N {
            let len = (i as usize * 37) % 9000;
            tx.send(
                i,
                &vec![i as u8; len],
                Deadline::after(Duration::from_secs(30)),
            )
            .unwrap();
        }
        tx
    });
    // More messages than the control window are queued before anyone reads.
    thread::sleep(Duration::from_millis(300));
    let mut buf = vec![0u8; 9000];
    for i in 0..N {
        let m = rx
            .recv(&mut buf, Deadline::after(Duration::from_secs(30)))
            .unwrap();
        let len = (i as usize * 37) % 9000;
        assert_eq!((m.tag, m.len), (i, len));
        assert!(buf[..len].iter().all(|&b| b == i as u8), "message {i}");
    }
    drop(sender.join().unwrap());
}

#[test]
fn the_device_budget_spent_is_an_error_forced_and_a_fallback_otherwise() {
    let _serial = serial(TransportKind::RDMA);
    // Take queue pairs until the device refuses: the refusal names what ran out.
    let mut held = Vec::new();
    let reason = loop {
        match Pending::new(Some(SOFTWARE_DEVICE)) {
            Ok(p) => held.push(p),
            Err(reason) => break reason,
        }
        assert!(
            held.len() <= rdma_sys::soft::MAX_QP,
            "the budget was never enforced"
        );
    };
    assert!(reason.contains("queue pair"), "{reason}");

    let mut cfg = LinkConfig::new(ClusterKey::from_bytes(&[3u8; 32]).unwrap());
    cfg.rdma_device = Some(SOFTWARE_DEVICE.into());
    cfg.connect_timeout = Duration::from_secs(5);
    for (choice, forced) in [
        (TransportChoice::Only(TransportKind::RDMA), true),
        (TransportChoice::Auto, false),
    ] {
        cfg.transport = choice;
        let listener = Listener::bind("127.0.0.1:0", &cfg).unwrap();
        let addr = listener.local_addr().unwrap();
        let server =
            thread::spawn(move || listener.accept_until(Deadline::after(Duration::from_secs(5))));
        let client = connect(addr, &cfg);
        let server = server.join().unwrap();
        if forced {
            let err = client.unwrap_err();
            assert!(
                matches!(&err, Error::Unavailable { reason, .. } if reason.contains("queue pair")),
                "{err}"
            );
            assert!(server.is_err());
        } else {
            let (client, server) = (client.unwrap(), server.unwrap());
            assert_ne!(client.info().transport, TransportKind::RDMA);
            assert_eq!(client.info().transport, server.info().transport);
        }
    }
    drop(held);
}

#[test]
fn a_sender_that_closes_mid_message_is_an_error_not_a_wait() {
    let _serial = serial(TransportKind::RDMA);
    let ((mut tx, _rx_a), (_tx_b, mut rx)) = pair();
    let big = vec![1u8; 3 << 20];
    // The first attempt announces the message; no chunk can go before the peer posts for it.
    assert!(!tx.try_send(1, &big).unwrap());
    drop(tx);
    let t = Instant::now();
    let mut buf = vec![0u8; 3 << 20];
    let err = rx
        .recv(&mut buf, Deadline::after(Duration::from_secs(20)))
        .unwrap_err();
    assert!(
        matches!(&err, Error::PeerGone { detail, .. } if detail.contains("after 0 of")),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn a_send_that_times_out_mid_message_breaks_the_link() {
    let _serial = serial(TransportKind::RDMA);
    let ((mut tx, _rx_a), (_tx_b, _rx_b)) = pair();
    // Nobody receives: the 20 MiB message outgrows the peer's bulk ring and stalls.
    let err = tx
        .send(
            1,
            &vec![0u8; 20 << 20],
            Deadline::after(Duration::from_millis(300)),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let err = tx
        .send(2, b"x", Deadline::after(Duration::from_secs(1)))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Broken { cause, .. } if cause.contains("mid-message")),
        "{err}"
    );
}
