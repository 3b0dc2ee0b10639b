//! What `sinew link` client and server say to each other, carried in link message tags.

/// A ping: the server sends the same payload back with the same tag.
pub const TAG_PING: u32 = 1;
/// Streamed data: the server counts it.
pub const TAG_STREAM: u32 = 2;
/// A report request; the server answers with a [`StreamReport`] and resets its counters.
pub const TAG_REPORT: u32 = 3;

/// A bidirectional stream request ([`BidirRequest`]): the server streams messages back for the
/// given time while it counts the client's, then ends its stream with [`TAG_BACK_END`].
pub const TAG_BIDIR: u32 = 4;
/// The end of the server's stream back: a [`StreamReport`] of what it sent.
pub const TAG_BACK_END: u32 = 5;

/// The longest stream back a client may ask for.
pub const MAX_BIDIR: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a client asks of a bidirectional test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BidirRequest {
    /// Bytes per message the server sends back.
    pub size: u64,
    /// How long the server streams back.
    pub duration: std::time::Duration,
}

impl BidirRequest {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Encodes the request.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.size.to_le_bytes());
        let nanos = u64::try_from(self.duration.as_nanos()).unwrap_or(u64::MAX);
        b[8..].copy_from_slice(&nanos.to_le_bytes());
        b
    }

    /// Decodes a request; `None` unless exactly [`BidirRequest::LEN`] bytes, a size no larger
    /// than `max_size` and a duration of at most [`MAX_BIDIR`].
    pub fn decode(b: &[u8], max_size: usize) -> Option<Self> {
        let b: &[u8; Self::LEN] = b.try_into().ok()?;
        let size = u64::from_le_bytes(b[..8].try_into().ok()?);
        let duration = std::time::Duration::from_nanos(u64::from_le_bytes(b[8..].try_into().ok()?));
        (usize::try_from(size).is_ok_and(|s| s <= max_size) && duration <= MAX_BIDIR)
            .then_some(BidirRequest { size, duration })
    }
}

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

    #[test]
    fn a_bidir_request_round_trips_and_out_of_range_ones_are_refused() {
        let r = BidirRequest {
            size: 1 << 20,
            duration: std::time::Duration::from_millis(1500),
        };
        assert_eq!(BidirRequest::decode(&r.encode(), 1 << 20), Some(r));
        assert_eq!(BidirRequest::decode(&r.encode(), (1 << 20) - 1), None);
        let long = BidirRequest {
            duration: MAX_BIDIR + std::time::Duration::from_nanos(1),
            ..r
        };
        assert_eq!(BidirRequest::decode(&long.encode(), 1 << 20), None);
        assert_eq!(BidirRequest::decode(&[0u8; 15], 1 << 20), None);
    }
}
