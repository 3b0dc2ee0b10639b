//! Wire framing, sans-IO: a fixed 32-byte header and a bounded payload.
//!
//! Every message on every backend travels as one frame. Decoding checks the header (length, magic,
//! version, header checksum, kind, flags, payload bound) before anyone allocates or reads the
//! payload, so a hostile or corrupted length can never make a receiver allocate.
//!
//! Layout, little-endian:
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! | 0      | 4    | magic `b"SNW\x01"`                                  |
//! | 4      | 1    | wire version                                       |
//! | 5      | 1    | kind ([`FrameKind`])                               |
//! | 6      | 2    | flags ([`FrameFlags`])                             |
//! | 8      | 4    | tag (chosen by the caller, e.g. a collective's op) |
//! | 12     | 4    | payload length in bytes                            |
//! | 16     | 8    | sequence number (per direction, from 0)            |
//! | 24     | 4    | CRC-32C of the payload, if flagged, else 0         |
//! | 28     | 4    | CRC-32C of bytes 0..28                             |

use thiserror::Error;

/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 32;
/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"SNW\x01";
/// The wire format version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// The largest payload any link will ever negotiate (1 GiB).
pub const ABSOLUTE_MAX_PAYLOAD: u32 = 1 << 30;

/// What a frame carries. An integer newtype, not a Rust enum, so that unknown values decode into a
/// typed error instead of undefined behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameKind(pub u8);

impl FrameKind {
    /// Application data: a message handed to `Link::send`.
    pub const DATA: FrameKind = FrameKind(0);
    /// A handshake message (see [`crate::handshake`]).
    pub const HANDSHAKE: FrameKind = FrameKind(1);
    /// The sender closes the link in an orderly way; nothing follows.
    pub const CLOSE: FrameKind = FrameKind(2);
    /// A liveness beat; carries no application data and is consumed by the backend.
    pub const HEARTBEAT: FrameKind = FrameKind(3);

    /// Whether this build knows the kind.
    pub fn is_known(self) -> bool {
        self.0 <= Self::HEARTBEAT.0
    }
}

/// Frame flags, a bit set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrameFlags(pub u16);

impl FrameFlags {
    /// No flags.
    pub const NONE: FrameFlags = FrameFlags(0);
    /// The header's payload checksum field holds the CRC-32C of the payload and must be verified.
    /// Set by backends whose medium does not guarantee integrity (RDMA UC), and on control frames.
    pub const PAYLOAD_CHECKSUM: FrameFlags = FrameFlags(1);
    const KNOWN: u16 = Self::PAYLOAD_CHECKSUM.0;

    /// Whether every bit of `other` is set in `self`.
    pub fn contains(self, other: FrameFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Why a frame could not be decoded. Each is detected before the payload is allocated or read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the header (or header plus payload) needs.
    #[error("truncated frame: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes needed to make progress.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The first four bytes are not sinew's magic: the peer does not speak this protocol.
    #[error("bad magic {found:02x?}: not a sinew frame")]
    BadMagic {
        /// The bytes found instead.
        found: [u8; 4],
    },
    /// The frame was written by an incompatible wire version.
    #[error("unsupported wire version {found} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The header checksum does not match: the header was corrupted.
    #[error("corrupted frame header: checksum {found:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// Checksum carried by the frame.
        found: u32,
        /// Checksum computed over the received header.
        computed: u32,
    },
    /// The payload checksum does not match: the payload was corrupted.
    #[error("corrupted frame payload: checksum {found:#010x}, computed {computed:#010x}")]
    PayloadChecksum {
        /// Checksum carried by the frame.
        found: u32,
        /// Checksum computed over the received payload.
        computed: u32,
    },
    /// The announced payload is longer than the negotiated maximum.
    #[error("oversized frame: {len} bytes announced, maximum is {max}")]
    Oversized {
        /// Announced payload length.
        len: u32,
        /// Negotiated maximum.
        max: u32,
    },
    /// A frame kind this build does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Flag bits this build does not know.
    #[error("unknown frame flags {0:#06x}")]
    UnknownFlags(u16),
}

/// A decoded (or to-be-encoded) frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Flag bits.
    pub flags: FrameFlags,
    /// Caller-chosen tag, delivered with the message.
    pub tag: u32,
    /// Per-direction sequence number.
    pub seq: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// CRC-32C of the payload when [`FrameFlags::PAYLOAD_CHECKSUM`] is set, else 0.
    pub payload_crc: u32,
}

impl FrameHeader {
    /// A header for `payload`, computing the payload checksum when `checksum` is true.
    ///
    /// # Errors
    /// [`FrameError::Oversized`] when the payload does not fit the 32-bit length field.
    pub fn try_for_payload(
        kind: FrameKind,
        tag: u32,
        seq: u64,
        payload: &[u8],
        checksum: bool,
    ) -> Result<Self, FrameError> {
        let len = u32::try_from(payload.len()).map_err(|_| FrameError::Oversized {
            len: u32::MAX,
            max: ABSOLUTE_MAX_PAYLOAD,
        })?;
        let (flags, payload_crc) = if checksum {
            (FrameFlags::PAYLOAD_CHECKSUM, crc32c::crc32c(payload))
        } else {
            (FrameFlags::NONE, 0)
        };
        Ok(FrameHeader {
            kind,
            flags,
            tag,
            seq,
            len,
            payload_crc,
        })
    }

    /// Encodes the header, computing its checksum. Encoding cannot fail.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = WIRE_VERSION;
        b[5] = self.kind.0;
        b[6..8].copy_from_slice(&self.flags.0.to_le_bytes());
        b[8..12].copy_from_slice(&self.tag.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header from the start of `bytes`; `max_payload` is the negotiated
    /// bound on the payload length.
    ///
    /// # Errors
    /// [`FrameError::Truncated`] when fewer than [`HEADER_LEN`] bytes are given; then, in order,
    /// `BadMagic`, `UnsupportedVersion`, `HeaderChecksum`, `UnknownKind`, `UnknownFlags`,
    /// `Oversized`.
    pub fn decode(bytes: &[u8], max_payload: u32) -> Result<Self, FrameError> {
        let Some(b) = bytes.get(..HEADER_LEN) else {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        };
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        if b[4] != WIRE_VERSION {
            return Err(FrameError::UnsupportedVersion { found: b[4] });
        }
        let found = u32::from_le_bytes([b[28], b[29], b[30], b[31]]);
        let computed = crc32c::crc32c(&b[0..28]);
        if found != computed {
            return Err(FrameError::HeaderChecksum { found, computed });
        }
        let kind = FrameKind(b[5]);
        if !kind.is_known() {
            return Err(FrameError::UnknownKind(kind.0));
        }
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags & !FrameFlags::KNOWN != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        let len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let max = max_payload.min(ABSOLUTE_MAX_PAYLOAD);
        if len > max {
            return Err(FrameError::Oversized { len, max });
        }
        Ok(FrameHeader {
            kind,
            flags: FrameFlags(flags),
            tag: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            len,
            seq: u64::from_le_bytes(b[16..24].try_into().expect("8-byte slice")),
            payload_crc: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Payload length as `usize`.
    pub fn payload_len(&self) -> usize {
        self.len as usize
    }

    /// Checks `payload` against the header: its length, and its checksum when flagged.
    ///
    /// # Errors
    /// `Truncated` when the payload is shorter than announced, `PayloadChecksum` on a mismatch.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), FrameError> {
        if payload.len() != self.payload_len() {
            return Err(FrameError::Truncated {
                needed: self.payload_len(),
                available: payload.len(),
            });
        }
        if self.flags.contains(FrameFlags::PAYLOAD_CHECKSUM) {
            let computed = crc32c::crc32c(payload);
            if computed != self.payload_crc {
                return Err(FrameError::PayloadChecksum {
                    found: self.payload_crc,
                    computed,
                });
            }
        }
        Ok(())
    }
}

/// Encodes a whole frame (header and payload) into a new buffer. Used for control frames and
/// tests; the data path writes the header and the caller's payload with one vectored write.
pub fn encode_frame(header: &FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
}

/// Decodes one whole frame from the start of `bytes`, returning the header, the payload (borrowed,
/// never copied) and the number of bytes consumed.
///
/// # Errors
/// Any [`FrameError`]; `Truncated` says how many bytes are needed in all.
pub fn decode_frame(
    bytes: &[u8],
    max_payload: u32,
) -> Result<(FrameHeader, &[u8], usize), FrameError> {
    let header = FrameHeader::decode(bytes, max_payload)?;
    let total = HEADER_LEN + header.payload_len();
    let Some(payload) = bytes.get(HEADER_LEN..total) else {
        return Err(FrameError::Truncated {
            needed: total,
            available: bytes.len(),
        });
    };
    header.verify_payload(payload)?;
    Ok((header, payload, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: u8, tag: u32, seq: u64, payload: &[u8], checksum: bool) -> FrameHeader {
        FrameHeader::try_for_payload(FrameKind(kind), tag, seq, payload, checksum).unwrap()
    }

    #[test]
    fn round_trips_a_data_frame() {
        let h = header(0, 7, 42, b"hello", true);
        let bytes = encode_frame(&h, b"hello");
        let (d, p, used) = decode_frame(&bytes, 1024).unwrap();
        assert_eq!((d, p, used), (h, &b"hello"[..], HEADER_LEN + 5));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let h = header(0, 0, 0, &[0u8; 100], false);
        // Only the header is present: the payload was never read, let alone allocated.
        let err = FrameHeader::decode(&h.encode(), 99).unwrap_err();
        assert_eq!(err, FrameError::Oversized { len: 100, max: 99 });
    }

    #[test]
    fn truncated_header_and_payload_are_reported_with_the_needed_length() {
        let h = header(0, 0, 0, b"abcdef", false);
        let bytes = encode_frame(&h, b"abcdef");
        assert_eq!(
            decode_frame(&bytes[..10], 64).unwrap_err(),
            FrameError::Truncated {
                needed: HEADER_LEN,
                available: 10
            }
        );
        assert_eq!(
            decode_frame(&bytes[..HEADER_LEN + 2], 64).unwrap_err(),
            FrameError::Truncated {
                needed: HEADER_LEN + 6,
                available: HEADER_LEN + 2
            }
        );
    }

    #[test]
    fn corrupted_header_is_detected() {
        let h = header(0, 1, 2, b"x", false);
        let mut bytes = h.encode();
        bytes[13] ^= 0x40; // the length field
        assert!(matches!(
            FrameHeader::decode(&bytes, 1 << 20),
            Err(FrameError::HeaderChecksum { .. })
        ));
    }

    #[test]
    fn corrupted_checksummed_payload_is_detected() {
        let h = header(0, 1, 2, b"payload", true);
        let mut bytes = encode_frame(&h, b"payload");
        bytes[HEADER_LEN + 3] ^= 1;
        assert!(matches!(
            decode_frame(&bytes, 64),
            Err(FrameError::PayloadChecksum { .. })
        ));
    }

    #[test]
    fn foreign_bytes_are_bad_magic() {
        let mut http = *b"GET / HTTP/1.1\r\nHost: x\r\n\r\n12345";
        http[31] = b'6';
        assert!(matches!(
            FrameHeader::decode(&http, 64),
            Err(FrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn other_wire_version_is_unsupported() {
        let mut bytes = header(0, 0, 0, b"", false).encode();
        bytes[4] = 9;
        assert_eq!(
            FrameHeader::decode(&bytes, 64).unwrap_err(),
            FrameError::UnsupportedVersion { found: 9 }
        );
    }

    proptest! {
        #[test]
        fn any_frame_round_trips(
            kind in 0u8..=3,
            tag: u32,
            seq: u64,
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
            checksum: bool,
        ) {
            let h = header(kind, tag, seq, &payload, checksum);
            let bytes = encode_frame(&h, &payload);
            let (d, p, used) = decode_frame(&bytes, 4096).unwrap();
            prop_assert_eq!(d, h);
            prop_assert_eq!(p, &payload[..]);
            prop_assert_eq!(used, bytes.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), max: u32) {
            let _ = decode_frame(&bytes, max);
            let _ = FrameHeader::decode(&bytes, max);
        }

        #[test]
        fn any_single_bit_flip_in_a_header_is_an_error(
            tag: u32, seq: u64, len in 0u32..4096, bit in 0usize..(HEADER_LEN * 8),
        ) {
            let h = FrameHeader { kind: FrameKind::DATA, flags: FrameFlags::NONE, tag, seq, len, payload_crc: 0 };
            let mut bytes = h.encode();
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(FrameHeader::decode(&bytes, 4096).is_err());
        }
    }
}
