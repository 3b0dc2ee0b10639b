//! What `sinew link` client and server say to each other, carried in link message tags.

/// A ping: the server sends the same payload back with the same tag.
pub const TAG_PING: u32 = 1;
/// Streamed data: the server counts it.
pub const TAG_STREAM: u32 = 2;
/// A report request; the server answers with a [`StreamReport`] and resets its counters.
pub const TAG_REPORT: u32 = 3;

/// What the server received since the last report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamReport {
    /// Payload bytes received.
    pub bytes: u64,
    /// Messages received.
    pub messages: u64,
}

impl StreamReport {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Encodes the report.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.bytes.to_le_bytes());
        b[8..].copy_from_slice(&self.messages.to_le_bytes());
        b
    }

    /// Decodes a report; `None` unless exactly [`StreamReport::LEN`] bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; Self::LEN] = b.try_into().ok()?;
        Some(StreamReport {
            bytes: u64::from_le_bytes(b[..8].try_into().ok()?),
            messages: u64::from_le_bytes(b[8..].try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_and_rejects_wrong_lengths() {
        let r = StreamReport {
            bytes: 1 << 40,
            messages: 7,
        };
        assert_eq!(StreamReport::decode(&r.encode()), Some(r));
        assert_eq!(StreamReport::decode(&[0u8; 15]), None);
    }
}
