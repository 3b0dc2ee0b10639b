//! Fuzzes the frame decoder: any bytes, any negotiated maximum, never a panic; whatever decodes
//! re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::frame::{FrameHeader, HEADER_LEN, decode_frame, encode_frame};

fuzz_target!(|input: &[u8]| {
    let (max, bytes) = match input.split_first_chunk::<4>() {
        Some((m, rest)) => (u32::from_le_bytes(*m), rest),
        None => (u32::MAX, input),
    };
    let _ = FrameHeader::decode(bytes, max);
    if let Ok((header, payload, used)) = decode_frame(bytes, max) {
        assert_eq!(used, HEADER_LEN + payload.len());
        assert_eq!(encode_frame(&header, payload), bytes[..used]);
    }
});
