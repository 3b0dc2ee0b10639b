//! Addresses as another node sees them.
//!
//! The head knows each worker by the address it reaches it at, and tells every stage where the
//! next one listens. An address that works from the head does not always work from a worker:
//! a worker on the head's own host may be known by a loopback address (`127.0.0.1:7471`, listed
//! so or heard so), and an IPv6 link-local address (`fe80::…%3`) carries a scope — the index of
//! the head's interface — that means nothing on another host. [`next_for`] turns the head's
//! address of the next stage into one the dialing worker can use; [`with_scope`], on the worker,
//! gives a link-local address the scope of its own interface towards the head.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};

/// Whether `ip` is an IPv6 link-local address (`fe80::/10`), which needs a scope to be dialed.
pub fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// `a` without its scope when it is link-local (a scope is an index of the host that wrote it).
fn unscoped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) if is_link_local(&a.ip()) => {
            SocketAddr::V6(SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0))
        }
        other => other,
    }
}

/// The address the worker the head reaches at `from` should dial for the next stage, which the
/// head reaches at `next`; `via` is the head's own address on its link to `from`.
///
/// - `from` on the head's host (a loopback address): `next` as the head knows it.
/// - `next` on the head's host (a loopback address): the head's address on its link to `from`,
///   with the next stage's port (the worker listens on every interface, as by default).
/// - `next` link-local: without the head's scope ([`with_scope`] on the worker adds its own).
///
/// Names that are not socket addresses (host names) are left as they are.
pub fn next_for(next: &str, from: &str, via: Option<SocketAddr>) -> String {
    let Ok(n) = next.parse::<SocketAddr>() else {
        return next.to_string();
    };
    if from
        .parse::<SocketAddr>()
        .is_ok_and(|f| f.ip().is_loopback())
    {
        return next.to_string();
    }
    let n = match via {
        Some(v) if n.ip().is_loopback() && !v.ip().is_loopback() => {
            SocketAddr::new(v.ip(), n.port())
        }
        _ => n,
    };
    unscoped(n).to_string()
}

/// `next` with the scope of this worker's link to the head when it is a link-local address
/// without one (the head's address for this worker was then link-local too: the same segment).
pub fn with_scope(next: &str, head_link: Option<SocketAddr>) -> String {
    match (next.parse::<SocketAddr>(), head_link) {
        (Ok(SocketAddr::V6(n)), Some(SocketAddr::V6(h)))
            if is_link_local(&IpAddr::V6(*n.ip())) && n.scope_id() == 0 && h.scope_id() != 0 =>
        {
            SocketAddrV6::new(*n.ip(), n.port(), 0, h.scope_id()).to_string()
        }
        _ => next.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_stage_is_given_as_the_dialing_worker_can_reach_it() {
        // (next as the head knows it, the dialing worker as the head knows it, the head's
        // address on its link to that worker, what the worker is told)
        let cases = [
            // the next stage runs beside the head: the head's address on the link
            (
                "127.0.0.1:7471",
                "10.0.0.7:7471",
                Some("10.0.0.2:50000"),
                "10.0.0.2:7471",
            ),
            (
                "[::1]:7471",
                "[fd00::7]:7471",
                Some("[fd00::2]:50000"),
                "[fd00::2]:7471",
            ),
            // over a link-local link, without the head's scope
            (
                "127.0.0.1:7471",
                "[fe80::7%2]:7471",
                Some("[fe80::2%2]:1"),
                "[fe80::2]:7471",
            ),
            // the dialing worker runs beside the head: the head's own spelling
            (
                "127.0.0.1:7471",
                "127.0.0.1:7000",
                Some("127.0.0.1:1"),
                "127.0.0.1:7471",
            ),
            (
                "[fe80::9%3]:7471",
                "127.0.0.1:7000",
                Some("127.0.0.1:1"),
                "[fe80::9%3]:7471",
            ),
            // elsewhere: as known, link-local ones without the head's scope
            (
                "10.0.0.9:7471",
                "10.0.0.7:7471",
                Some("10.0.0.2:1"),
                "10.0.0.9:7471",
            ),
            (
                "[fe80::9%3]:7471",
                "[fe80::7%3]:7471",
                Some("[fe80::2%3]:1"),
                "[fe80::9]:7471",
            ),
            ("[fd00::9]:7471", "[fd00::7]:7471", None, "[fd00::9]:7471"),
            // a host name, or no address of the head's link: as given
            (
                "mini-2.local:7471",
                "10.0.0.7:7471",
                None,
                "mini-2.local:7471",
            ),
            ("127.0.0.1:7471", "10.0.0.7:7471", None, "127.0.0.1:7471"),
        ];
        for (next, from, via, want) in cases {
            let via = via.map(|v| v.parse().unwrap());
            assert_eq!(next_for(next, from, via), want, "{next} from {from}");
        }
    }

    #[test]
    fn the_worker_scopes_a_link_local_address_by_its_link_to_the_head() {
        let cases = [
            (
                "[fe80::9]:7471",
                Some("[fe80::7%5]:7471"),
                "[fe80::9%5]:7471",
            ),
            // scoped already, not link-local, or a head link without a scope: as given
            (
                "[fe80::9%2]:7471",
                Some("[fe80::7%5]:7471"),
                "[fe80::9%2]:7471",
            ),
            ("[fd00::9]:7471", Some("[fe80::7%5]:7471"), "[fd00::9]:7471"),
            ("[fe80::9]:7471", Some("10.0.0.7:7471"), "[fe80::9]:7471"),
            ("[fe80::9]:7471", None, "[fe80::9]:7471"),
        ];
        for (next, head, want) in cases {
            let head = head.map(|h| h.parse().unwrap());
            assert_eq!(with_scope(next, head), want, "{next} by {head:?}");
        }
    }

    fn any_addr() -> impl proptest::strategy::Strategy<Value = SocketAddr> {
        use proptest::prelude::*;
        let v4 = (any::<[u8; 4]>(), 1u16..).prop_map(|(o, p)| SocketAddr::from((o, p)));
        let v4_loop = (any::<[u8; 3]>(), 1u16..)
            .prop_map(|(o, p)| SocketAddr::from(([127, o[0], o[1], o[2]], p)));
        let v6 = (any::<[u16; 8]>(), 1u16.., 0u32..8).prop_map(|(s, p, scope)| {
            let ip = std::net::Ipv6Addr::from(s);
            SocketAddr::V6(SocketAddrV6::new(ip, p, 0, scope))
        });
        let v6_ll = (any::<[u16; 4]>(), 1u16.., 0u32..8).prop_map(|(s, p, scope)| {
            let ip = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, s[0], s[1], s[2], s[3]);
            SocketAddr::V6(SocketAddrV6::new(ip, p, 0, scope))
        });
        let v6_loop = (1u16..).prop_map(|p| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p)));
        prop_oneof![v4, v4_loop, v6, v6_ll, v6_loop]
    }

    proptest::proptest! {
        #[test]
        fn a_remote_worker_is_never_told_a_loopback_or_a_foreign_scope(
            next in any_addr(), from in any_addr(), via in any_addr()
        ) {
            let got: SocketAddr = next_for(&next.to_string(), &from.to_string(), Some(via))
                .parse()
                .expect("a socket address in, a socket address out");
            // the port is always the next stage's
            proptest::prop_assert_eq!(got.port(), next.port());
            if from.ip().is_loopback() {
                proptest::prop_assert_eq!(got, next);
            } else {
                if !via.ip().is_loopback() {
                    proptest::prop_assert!(!got.ip().is_loopback(), "{} for {}", got, from);
                }
                if let SocketAddr::V6(v6) = got
                    && is_link_local(&got.ip())
                {
                    proptest::prop_assert_eq!(v6.scope_id(), 0);
                }
                // the worker's own scope makes it dialable again, and nothing else changes
                let scoped = with_scope(&got.to_string(), Some(from)).parse::<SocketAddr>().unwrap();
                proptest::prop_assert_eq!(scoped.ip(), got.ip());
            }
        }
    }

    #[test]
    fn link_local_is_fe80_slash_10() {
        assert!(is_link_local(&"fe80::1".parse().unwrap()));
        assert!(is_link_local(&"febf::1".parse().unwrap()));
        assert!(!is_link_local(&"fec0::1".parse().unwrap()));
        assert!(!is_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_link_local(&"10.0.0.1".parse().unwrap()));
    }
}
