//! Fuzzes both sides of the handshake with arbitrary frames: never a panic, never established.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::ClusterKey;
use transport::frame::decode_frame;
use transport::handshake::{HANDSHAKE_MAX_PAYLOAD, Handshake, HandshakeConfig};

fuzz_target!(|input: &[u8]| {
    let Ok(key) = ClusterKey::from_bytes(&[7u8; 32]) else { return };
    let config = HandshakeConfig::new(key, 1, 1 << 20);
    for mut hs in [Handshake::client(config.clone()), Handshake::server(config)].into_iter().flatten() {
        let mut rest = input;
        while hs.wants_input() {
            match decode_frame(rest, HANDSHAKE_MAX_PAYLOAD) {
                Ok((header, payload, used)) => {
                    rest = &rest[used..];
                    if hs.handle_frame(&header, payload).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = hs.frame_error(e);
                    break;
                }
            }
        }
        while hs.poll_transmit().is_some() {}
        // Without the key, no input can complete the mutual authentication.
        assert!(hs.established().is_none());
    }
});
