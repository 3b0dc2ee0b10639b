//! Choosing a link's backend. Each side offers, in its handshake, the backends it can run (with a
//! per-backend blob); both then pick the best backend they share — RDMA > shm > io_uring > TCP —
//! by the same pure rule over both lists, so they agree without another round trip. Every better
//! backend that was passed over is reported with the reason.

use std::fmt;
use std::str::FromStr;

use crate::handshake::{Capability, TransportKind};

/// Backends from best to worst.
pub const PREFERENCE: [TransportKind; 4] = [
    TransportKind::RDMA,
    TransportKind::SHM,
    TransportKind::URING,
    TransportKind::TCP,
];

/// Which backends a node may use for its links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportChoice {
    /// The best both sides can run.
    #[default]
    Auto,
    /// Exactly this one; a link fails with a clear error when either side cannot run it.
    Only(TransportKind),
}

impl fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportChoice::Auto => f.write_str("auto"),
            TransportChoice::Only(k) => write!(f, "{k}"),
        }
    }
}

impl FromStr for TransportChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TransportChoice::Auto),
            "tcp" => Ok(TransportChoice::Only(TransportKind::TCP)),
            "uring" => Ok(TransportChoice::Only(TransportKind::URING)),
            "shm" => Ok(TransportChoice::Only(TransportKind::SHM)),
            "rdma" => Ok(TransportChoice::Only(TransportKind::RDMA)),
            other => Err(format!(
                "unknown transport {other:?}: expected tcp, uring, shm, rdma or auto"
            )),
        }
    }
}

/// Whether this process can run `kind`, with the blob to offer for it, or why not. RDMA is
/// probed on the device `SINEW_RDMA_DEVICE` names (or the first); its blob, the queue-pair
/// addresses, is made per link.
pub fn availability(kind: TransportKind) -> Result<Vec<u8>, String> {
    availability_on(kind, None)
}

/// [`availability`], probing RDMA on `rdma_device` (`None`: `SINEW_RDMA_DEVICE`, else the first).
pub fn availability_on(kind: TransportKind, rdma_device: Option<&str>) -> Result<Vec<u8>, String> {
    match kind {
        TransportKind::TCP => Ok(Vec::new()),
        TransportKind::URING => crate::uring::probe().map(|()| Vec::new()),
        TransportKind::SHM => crate::shm::host_identity(),
        TransportKind::RDMA => crate::rdma::probe(rdma_device).map(|()| Vec::new()),
        other => Err(format!("unknown backend {other}")),
    }
}

/// What a node offers in its handshake, and why it leaves the rest out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// Backends offered, best first.
    pub capabilities: Vec<Capability>,
    /// Backends not offered, with the reason.
    pub withheld: Vec<(TransportKind, String)>,
}

/// The offer for `choice`, probing each backend.
///
/// # Errors
/// When `choice` forces a backend this process cannot run: the reason why.
pub fn local_offer(choice: TransportChoice) -> Result<Offer, (TransportKind, String)> {
    local_offer_on(choice, None)
}

/// [`local_offer`], probing RDMA on `rdma_device`.
///
/// # Errors
/// As [`local_offer`].
pub fn local_offer_on(
    choice: TransportChoice,
    rdma_device: Option<&str>,
) -> Result<Offer, (TransportKind, String)> {
    let mut offer = Offer::default();
    for kind in PREFERENCE {
        let wanted = match choice {
            TransportChoice::Auto => true,
            TransportChoice::Only(k) => k == kind,
        };
        if !wanted {
            offer
                .withheld
                .push((kind, format!("not requested (--transport {choice})")));
            continue;
        }
        match availability_on(kind, rdma_device) {
            Ok(blob) => offer.capabilities.push(Capability {
                transport: kind,
                blob,
            }),
            Err(reason) => {
                if choice == TransportChoice::Only(kind) {
                    return Err((kind, reason));
                }
                offer.withheld.push((kind, reason));
            }
        }
    }
    Ok(offer)
}

/// The outcome of selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The backend both sides use.
    pub chosen: TransportKind,
    /// Better backends passed over, with the reason.
    pub skipped: Vec<(TransportKind, String)>,
}

/// Picks the best backend in both offers. The rule depends only on the two capability lists and
/// is symmetric, so both sides reach the same choice.
///
/// # Errors
/// When nothing is shared: a message listing both offers.
pub fn choose(local: &Offer, peer: &[Capability]) -> Result<Selection, String> {
    let mut skipped = Vec::new();
    for kind in PREFERENCE {
        let ours = local.capabilities.iter().find(|c| c.transport == kind);
        let theirs = peer.iter().find(|c| c.transport == kind);
        match (ours, theirs) {
            (None, _) => {
                let reason = local
                    .withheld
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_else(|| "not offered by this side".into());
                skipped.push((kind, reason));
            }
            (Some(_), None) => skipped.push((kind, "the peer does not offer it".into())),
            (Some(a), Some(b)) if kind == TransportKind::SHM && a.blob != b.blob => {
                skipped.push((kind, "the peer is on another host, user or /dev/shm".into()));
            }
            (Some(_), Some(_)) => {
                return Ok(Selection {
                    chosen: kind,
                    skipped,
                });
            }
        }
    }
    let names = |caps: &[Capability]| {
        caps.iter()
            .map(|c| c.transport.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(format!(
        "no transport in common: this side offers [{}], the peer offers [{}]",
        names(&local.capabilities),
        names(peer)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cap(kind: TransportKind, blob: &[u8]) -> Capability {
        Capability {
            transport: kind,
            blob: blob.to_vec(),
        }
    }

    fn offer(caps: Vec<Capability>) -> Offer {
        Offer {
            capabilities: caps,
            withheld: Vec::new(),
        }
    }

    #[test]
    fn the_best_shared_backend_wins_and_better_ones_are_explained() {
        let a = offer(vec![
            cap(TransportKind::SHM, b"host-a"),
            cap(TransportKind::URING, b""),
            cap(TransportKind::TCP, b""),
        ]);
        let b = vec![
            cap(TransportKind::SHM, b"host-b"),
            cap(TransportKind::TCP, b""),
        ];
        let s = choose(&a, &b).unwrap();
        assert_eq!(s.chosen, TransportKind::TCP);
        let reasons: Vec<_> = s.skipped.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            reasons,
            vec![
                TransportKind::RDMA,
                TransportKind::SHM,
                TransportKind::URING
            ]
        );
        assert!(s.skipped[1].1.contains("another host"));
        assert!(s.skipped[2].1.contains("peer does not offer"));
    }

    #[test]
    fn same_host_picks_shm() {
        let a = offer(vec![
            cap(TransportKind::SHM, b"h"),
            cap(TransportKind::TCP, b""),
        ]);
        let s = choose(&a, &a.capabilities).unwrap();
        assert_eq!(s.chosen, TransportKind::SHM);
    }

    #[test]
    fn nothing_shared_is_an_error_naming_both_offers() {
        let a = offer(vec![cap(TransportKind::URING, b"")]);
        let err = choose(&a, &[cap(TransportKind::TCP, b"")]).unwrap_err();
        assert!(err.contains("[uring]") && err.contains("[tcp]"), "{err}");
    }

    #[test]
    fn forcing_an_unavailable_backend_fails_with_the_reason() {
        let (kind, reason) = local_offer_on(
            TransportChoice::Only(TransportKind::RDMA),
            Some("sinew-no-such-device"),
        )
        .unwrap_err();
        assert_eq!(kind, TransportKind::RDMA);
        assert!(reason.contains("RDMA"), "{reason}");
        let only_tcp = local_offer(TransportChoice::Only(TransportKind::TCP)).unwrap();
        assert_eq!(only_tcp.capabilities, vec![cap(TransportKind::TCP, b"")]);
    }

    #[test]
    fn choice_parses_every_backend_name() {
        for name in ["auto", "tcp", "uring", "shm", "rdma"] {
            assert_eq!(name.parse::<TransportChoice>().unwrap().to_string(), name);
        }
        assert!("udp".parse::<TransportChoice>().is_err());
    }

    fn arb_caps() -> impl Strategy<Value = Vec<Capability>> {
        proptest::sample::subsequence(PREFERENCE.to_vec(), 0..=4).prop_flat_map(|kinds| {
            proptest::collection::vec(0u8..2, kinds.len()).prop_map(move |blobs| {
                kinds
                    .iter()
                    .zip(blobs)
                    .map(|(k, b)| cap(*k, &[b]))
                    .collect()
            })
        })
    }

    proptest! {
        #[test]
        fn both_sides_always_agree(a in arb_caps(), b in arb_caps()) {
            let ab = choose(&offer(a.clone()), &b).map(|s| s.chosen);
            let ba = choose(&offer(b.clone()), &a).map(|s| s.chosen);
            prop_assert_eq!(ab.is_ok(), ba.is_ok());
            if let (Ok(x), Ok(y)) = (&ab, &ba) {
                prop_assert_eq!(x, y);
                prop_assert!(a.iter().any(|c| c.transport == *x) && b.iter().any(|c| c.transport == *x));
            }
        }
    }
}
