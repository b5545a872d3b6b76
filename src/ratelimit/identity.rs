//! Who a request comes from.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

use crate::config::ClientSource;

/// Header values up to this many bytes are kept as they are; longer ones are shortened to a
/// prefix plus a hash of the whole value, so that each tracked client costs little memory.
const MAX_HEADER_KEY_BYTES: usize = 128;
/// Length of the kept prefix of a long header value.
const LONG_HEADER_PREFIX_BYTES: usize = 64;
/// `X-Forwarded-For` entries examined at most, right to left.
const MAX_FORWARDED_HOPS: usize = 32;

/// The identity a rate-limit bucket belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A client address. IPv6 addresses are reduced to their /64 network, the block one
    /// host or subscriber usually gets, so a client cannot escape its bucket by changing
    /// the interface identifier.
    Ip(IpAddr),
    /// The value of the policy's header.
    Header(Box<str>),
}

/// The client of a request.
///
/// - [`ClientSource::Ip`]: the peer address; but when the peer is inside `trusted`, the
///   right-most `X-Forwarded-For` address that is not itself trusted (all entries trusted:
///   the left-most one; an unreadable entry stops the walk at the last good address). A
///   header from an untrusted peer changes nothing. No peer at all (e.g. a Unix socket) is
///   `0.0.0.0`.
/// - [`ClientSource::Header`]: that header's value; a request without it (or with it empty)
///   is identified by its address as above.
pub fn client_key(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    source: &ClientSource,
    trusted: &[IpNet],
) -> ClientKey {
    if let ClientSource::Header(name) = source {
        if let Some(value) = headers.get(name) {
            let bytes = value.as_bytes().trim_ascii();
            if !bytes.is_empty() {
                return ClientKey::Header(header_key(bytes));
            }
        }
    }
    let client = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |peer| {
        client_addr(peer, headers, trusted)
    });
    ClientKey::Ip(bucket_addr(client))
}

/// The client of a request from `peer` (the address it came from): `peer` itself, or,
/// when `peer` is a trusted proxy, the address `X-Forwarded-For` names (see
/// [`client_key`]). The rate limiter and the access log both know a request by it.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut current = peer;
    let entries = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|v| v.as_bytes().rsplit(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
        .take(MAX_FORWARDED_HOPS);
    for entry in entries {
        let Some(ip) = parse_forwarded_ip(entry) else {
            break;
        };
        current = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    current
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `2001:db8::1`, `1.2.3.4:5678`, `[2001:db8::1]:80`
/// or `[2001:db8::1]`.
fn parse_forwarded_ip(entry: &[u8]) -> Option<IpAddr> {
    let e = std::str::from_utf8(entry).ok()?;
    let ip = e
        .parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            e.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

/// The address a bucket is kept for: IPv4 as is, IPv6 as its /64 network.
fn bucket_addr(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(
            v6.to_bits() & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
        )),
    }
}

/// A header value as a key: as it is when short, else a prefix and a hash of all of it.
fn header_key(bytes: &[u8]) -> Box<str> {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= MAX_HEADER_KEY_BYTES {
        return text.into();
    }
    let mut cut = LONG_HEADER_PREFIX_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    // SipHash with fixed keys: stable for the life of the process, which is all a bucket
    // key needs.
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{}#{:016x}", &text[..cut], h.finish()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(s: &str) -> ClientKey {
        ClientKey::Ip(ip(s))
    }

    #[test]
    fn spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 10.0.0.7")]);
        let k = client_key(Some(ip("203.0.113.9")), &h, &ClientSource::Ip, &trusted);
        assert_eq!(k, key("203.0.113.9"));
        // No trusted proxies at all: the header is never read.
        let k = client_key(Some(ip("10.0.0.2")), &h, &ClientSource::Ip, &[]);
        assert_eq!(k, key("10.0.0.2"));
    }

    #[test]
    fn trusted_peer_gives_the_rightmost_untrusted_forwarded_address() {
        let trusted = nets(&["10.0.0.0/8", "192.168.1.1/32"]);
        // The client forged "6.6.6.6"; the proxies appended the real client and themselves.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.4, 10.1.1.1")]);
        let k = client_key(Some(ip("10.0.0.1")), &h, &ClientSource::Ip, &trusted);
        assert_eq!(k, key("198.51.100.4"));
        // Several header lines count as one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.5:4711"),
            ("x-forwarded-for", "192.168.1.1"),
        ]);
        let k = client_key(Some(ip("10.0.0.1")), &h, &ClientSource::Ip, &trusted);
        assert_eq!(k, key("198.51.100.5"));
        // Every entry trusted: the left-most one.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.1.1.1")]);
        let k = client_key(Some(ip("10.0.0.1")), &h, &ClientSource::Ip, &trusted);
        assert_eq!(k, key("10.9.9.9"));
        // Garbage stops the walk at the last good address.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, unknown, 10.1.1.1")]);
        let k = client_key(Some(ip("10.0.0.1")), &h, &ClientSource::Ip, &trusted);
        assert_eq!(k, key("10.1.1.1"));
        // No header: the peer itself.
        let k = client_key(
            Some(ip("10.0.0.1")),
            &HeaderMap::new(),
            &ClientSource::Ip,
            &trusted,
        );
        assert_eq!(k, key("10.0.0.1"));
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let trusted = nets(&["127.0.0.1/32"]);
        let h = headers(&[("x-forwarded-for", "[2001:db8:1:2:aaaa::1]:443")]);
        // An IPv4-mapped peer is matched against IPv4 networks.
        let k = client_key(
            Some(ip("::ffff:127.0.0.1")),
            &h,
            &ClientSource::Ip,
            &trusted,
        );
        assert_eq!(k, key("2001:db8:1:2::"));
        let k = client_key(
            Some(ip("2001:db8:1:2:ffff::9")),
            &h,
            &ClientSource::Ip,
            &trusted,
        );
        assert_eq!(k, key("2001:db8:1:2::"));
        let k = client_key(None, &h, &ClientSource::Ip, &trusted);
        assert_eq!(k, key("0.0.0.0"));
    }

    #[test]
    fn header_source_with_and_without_the_header() {
        let src = ClientSource::Header(HeaderName::from_static("x-api-key"));
        let h = headers(&[("X-API-Key", "abc123")]);
        let k = client_key(Some(ip("203.0.113.9")), &h, &src, &[]);
        assert_eq!(k, ClientKey::Header("abc123".into()));
        // Missing or empty: the address, still following trusted proxies.
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "198.51.100.4")]);
        let k = client_key(Some(ip("10.0.0.1")), &h, &src, &trusted);
        assert_eq!(k, key("198.51.100.4"));
        let h = headers(&[("x-api-key", "  ")]);
        let k = client_key(Some(ip("203.0.113.9")), &h, &src, &[]);
        assert_eq!(k, key("203.0.113.9"));
    }

    #[test]
    fn long_and_binary_header_values_stay_small_and_distinct() {
        let src = ClientSource::Header(HeaderName::from_static("authorization"));
        let a = "Bearer ".to_string() + &"a".repeat(2000);
        let b = "Bearer ".to_string() + &"a".repeat(1999) + "b";
        let ka = client_key(None, &headers(&[("authorization", &a)]), &src, &[]);
        let kb = client_key(None, &headers(&[("authorization", &b)]), &src, &[]);
        let (ClientKey::Header(sa), ClientKey::Header(sb)) = (&ka, &kb) else {
            panic!("header keys expected");
        };
        assert!(sa.len() <= MAX_HEADER_KEY_BYTES && sb.len() <= MAX_HEADER_KEY_BYTES);
        assert_ne!(ka, kb);
        assert_eq!(
            ka,
            client_key(None, &headers(&[("authorization", &a)]), &src, &[])
        );
        // Bytes that are not UTF-8 do not panic; long ones are cut on a char boundary.
        let mut h = HeaderMap::new();
        let mut raw = vec![0xffu8; 300];
        raw.extend_from_slice("é".repeat(100).as_bytes());
        h.insert("authorization", HeaderValue::from_bytes(&raw).unwrap());
        assert!(matches!(
            client_key(None, &h, &src, &[]),
            ClientKey::Header(_)
        ));
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff\xfe, 1.2.3.4").unwrap(),
        );
        let k = client_key(
            Some(ip("10.0.0.1")),
            &h,
            &ClientSource::Ip,
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(k, key("1.2.3.4"));
    }
}
