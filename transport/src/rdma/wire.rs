//! The RDMA backend's wire pieces, sans-IO: the control packet header and the frame ring that
//! lays out variable-sized chunks in a registered buffer.

use crate::codec::{DecodeError, Reader, Writer};

/// A receive and its matching send span the same number of these (Apple's rule).
pub const FRAME: usize = 4096;
/// Bytes of a control packet's header.
pub const HEADER: usize = 72;
/// Payload bytes a control packet carries inline: a message this small travels in one packet.
pub const INLINE_MAX: usize = FRAME - HEADER;

const MAGIC: [u8; 4] = *b"SRDP";

/// How many 4 KiB frames `len` bytes span (an empty message spans one).
pub fn frames(len: usize) -> usize {
    len.div_ceil(FRAME).max(1)
}

/// What a control packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A message: its payload inline, or announced here and carried by bulk chunks.
    Data,
    /// Only the counters (new receives posted).
    Credit,
    /// Only a sign of life.
    Heartbeat,
    /// The sender will send no more messages.
    Close,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Data => 1,
            Kind::Credit => 2,
            Kind::Heartbeat => 3,
            Kind::Close => 4,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            1 => Kind::Data,
            2 => Kind::Credit,
            3 => Kind::Heartbeat,
            4 => Kind::Close,
            _ => return None,
        })
    }
}

/// A control packet's header. The counters are cumulative since the link began, so a packet
/// that repeats or reorders them cannot double-count credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// What the packet is.
    pub kind: Kind,
    /// Control packets sent before this one, in this direction.
    pub seq: u64,
    /// Control receives the sender of this packet has posted, in all.
    pub ctrl_posted: u64,
    /// Bulk receives the sender of this packet has posted, in all.
    pub bulk_posted: u64,
    /// Bulk chunks the sender of this packet has sent, in all.
    pub bulk_sent: u64,
    /// The message's tag (data packets).
    pub tag: u32,
    /// The whole message's length (data packets).
    pub msg_len: u32,
    /// Payload bytes following the header in this packet.
    pub inline_len: u32,
    /// CRC-32C of the whole message payload (data packets).
    pub payload_crc: u32,
}

/// Why a control packet was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer bytes than a header.
    #[error("a control packet of {0} bytes is shorter than its {HEADER}-byte header")]
    Short(usize),
    /// Not a sinew RDMA packet.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The header's checksum does not match.
    #[error("header checksum mismatch: the packet is corrupted")]
    BadChecksum,
    /// An unknown packet kind.
    #[error("unknown packet kind {0}")]
    BadKind(u8),
    /// The inline length disagrees with the packet.
    #[error("inline length {inline} does not fit a packet of {len} bytes")]
    BadLength {
        /// Claimed inline bytes.
        inline: u32,
        /// Bytes received.
        len: usize,
    },
    /// A field could not be read.
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

impl Packet {
    /// A packet of `kind` with every field zero; the sender fills in the counters.
    pub fn new(kind: Kind) -> Packet {
        Packet {
            kind,
            seq: 0,
            ctrl_posted: 0,
            bulk_posted: 0,
            bulk_sent: 0,
            tag: 0,
            msg_len: 0,
            inline_len: 0,
            payload_crc: 0,
        }
    }

    /// Writes the header into the first [`HEADER`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        let mut v = Vec::with_capacity(HEADER);
        v.extend_from_slice(&MAGIC);
        v.put_u8(self.kind.code());
        v.put_u8(0);
        v.put_u16(0);
        v.put_u64(self.seq);
        v.put_u64(self.ctrl_posted);
        v.put_u64(self.bulk_posted);
        v.put_u64(self.bulk_sent);
        v.put_u32(self.tag);
        v.put_u32(self.msg_len);
        v.put_u32(self.inline_len);
        v.put_u32(self.payload_crc);
        v.resize(HEADER - 4, 0);
        let crc = crc32c::crc32c(&v);
        v.put_u32(crc);
        out[..HEADER].copy_from_slice(&v);
    }

    /// Reads and checks the header of a packet of `bytes` (as received: header, then inline
    /// payload).
    ///
    /// # Errors
    /// [`PacketError`] for anything but a well-formed header whose inline length matches.
    pub fn decode(bytes: &[u8]) -> Result<Packet, PacketError> {
        if bytes.len() < HEADER {
            return Err(PacketError::Short(bytes.len()));
        }
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(PacketError::BadMagic(magic));
        }
        let stored = u32::from_le_bytes(bytes[HEADER - 4..HEADER].try_into().expect("4 bytes"));
        if crc32c::crc32c(&bytes[..HEADER - 4]) != stored {
            return Err(PacketError::BadChecksum);
        }
        let mut r = Reader::new(&bytes[4..HEADER - 4]);
        let code = r.u8("kind")?;
        let kind = Kind::from_code(code).ok_or(PacketError::BadKind(code))?;
        r.u8("flags")?;
        r.u16("reserved")?;
        let p = Packet {
            kind,
            seq: r.u64("seq")?,
            ctrl_posted: r.u64("ctrl_posted")?,
            bulk_posted: r.u64("bulk_posted")?,
            bulk_sent: r.u64("bulk_sent")?,
            tag: r.u32("tag")?,
            msg_len: r.u32("msg_len")?,
            inline_len: r.u32("inline_len")?,
            payload_crc: r.u32("payload_crc")?,
        };
        if HEADER + p.inline_len as usize != bytes.len() || p.inline_len > p.msg_len {
            return Err(PacketError::BadLength {
                inline: p.inline_len,
                len: bytes.len(),
            });
        }
        Ok(p)
    }
}

/// Allocations of whole frames from a ring, freed in the order made: chunks are sent, and
/// received, in order. An allocation that would straddle the end starts at the beginning
/// instead, and the skipped tail counts as used until it is freed.
#[derive(Debug)]
pub struct FrameRing {
    capacity: usize,
    head: usize,
    tail: usize,
    spans: std::collections::VecDeque<usize>,
}

impl FrameRing {
    /// A ring of `capacity` bytes (a multiple of [`FRAME`]).
    pub fn new(capacity: usize) -> FrameRing {
        debug_assert!(capacity.is_multiple_of(FRAME) && capacity > 0);
        FrameRing {
            capacity,
            head: 0,
            tail: 0,
            spans: std::collections::VecDeque::new(),
        }
    }

    /// The offset of `len` bytes (rounded up to frames), or `None` while the ring is too full.
    pub fn alloc(&mut self, len: usize) -> Option<usize> {
        let need = frames(len) * FRAME;
        if self.spans.is_empty() {
            // Empty: start over at the beginning, so that anything up to the capacity fits.
            self.head = 0;
            self.tail = 0;
        }
        let pos = self.tail % self.capacity;
        let pad = if pos + need > self.capacity {
            self.capacity - pos
        } else {
            0
        };
        if self.tail - self.head + pad + need > self.capacity {
            return None;
        }
        self.tail += pad + need;
        self.spans.push_back(pad + need);
        Some(if pad > 0 { 0 } else { pos })
    }

    /// Frees the oldest allocation.
    pub fn free_front(&mut self) {
        if let Some(span) = self.spans.pop_front() {
            self.head += span;
        }
    }

    /// Allocations not yet freed.
    pub fn live(&self) -> usize {
        self.spans.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_packet() -> impl Strategy<Value = Packet> {
        (
            0u8..4,
            any::<[u64; 4]>(),
            any::<u32>(),
            any::<u32>(),
            0u32..=INLINE_MAX as u32,
            any::<u32>(),
        )
            .prop_map(|(k, c, tag, extra, inline_len, crc)| Packet {
                kind: [Kind::Data, Kind::Credit, Kind::Heartbeat, Kind::Close][k as usize],
                seq: c[0],
                ctrl_posted: c[1],
                bulk_posted: c[2],
                bulk_sent: c[3],
                tag,
                msg_len: inline_len.saturating_add(extra),
                inline_len,
                payload_crc: crc,
            })
    }

    proptest! {
        #[test]
        fn packets_round_trip(p in arb_packet()) {
            let mut bytes = vec![0u8; HEADER + p.inline_len as usize];
            p.encode(&mut bytes);
            prop_assert_eq!(Packet::decode(&bytes).unwrap(), p);
        }

        #[test]
        fn any_flipped_header_bit_is_caught(p in arb_packet(), bit in 0usize..HEADER * 8) {
            let mut bytes = vec![0u8; HEADER + p.inline_len as usize];
            p.encode(&mut bytes);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Packet::decode(&bytes).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Packet::decode(&bytes);
        }

        #[test]
        fn ring_allocations_stay_inside_and_never_overlap(
            cap_frames in 1usize..64,
            ops in proptest::collection::vec((any::<bool>(), 1usize..80_000), 1..200),
        ) {
            let cap = cap_frames * FRAME;
            let mut ring = FrameRing::new(cap);
            let mut live: std::collections::VecDeque<(usize, usize)> = Default::default();
            for (alloc, len) in ops {
                if alloc {
                    if let Some(off) = ring.alloc(len) {
                        let end = off + frames(len) * FRAME;
                        prop_assert!(end <= cap, "{off}+{len} outside {cap}");
                        for &(o, e) in &live {
                            prop_assert!(end <= o || off >= e, "[{off},{end}) overlaps [{o},{e})");
                        }
                        live.push_back((off, end));
                    } else {
                        // Refused only when it could not fit beside what is live: an empty
                        // ring takes anything up to its capacity.
                        prop_assert!(frames(len) * FRAME > cap || !live.is_empty());
                    }
                } else if live.pop_front().is_some() {
                    ring.free_front();
                }
                prop_assert_eq!(ring.live(), live.len());
            }
        }
    }

    #[test]
    fn a_short_or_mislabelled_packet_is_refused() {
        assert_eq!(Packet::decode(&[0; 10]), Err(PacketError::Short(10)));
        let mut bytes = vec![0u8; HEADER + 3];
        let mut p = Packet::new(Kind::Data);
        p.inline_len = 2;
        p.msg_len = 2;
        p.encode(&mut bytes);
        assert!(matches!(
            Packet::decode(&bytes),
            Err(PacketError::BadLength { .. })
        ));
    }
}
