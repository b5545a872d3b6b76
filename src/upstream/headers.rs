//! The header policy of every request stoa sends upstream and of every upstream answer it
//! passes on: hop-by-hop headers, `Host`, `X-Forwarded-For`/`-Proto` and `X-Request-Id`.
//!
//! A shared fetch (one whose answer other clients receive) carries only what its cache key
//! covers: see `CachedRoute::shared_fetch`.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

/// The hop-by-hop headers (RFC 9110 §7.6.1, and those older HTTP and proxies used so), of
/// requests and answers alike: the one list stoa keeps. Never sent upstream, stored or
/// passed on as they came; `Transfer-Encoding` frames a message, so whoever writes one
/// sets its own (see [`strip_response`]).
pub const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Whether `name` is hop by hop ([`HOP_BY_HOP`]).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Writes one header line, `name: value` and its line end, as HTTP/1.1 sends it.
pub fn put_line(buf: &mut impl bytes::BufMut, name: &[u8], value: &[u8]) {
    buf.put_slice(name);
    buf.put_slice(b": ");
    buf.put_slice(value);
    buf.put_slice(b"\r\n");
}

/// Request headers that must not be forwarded as they are on a fetch: the hop-by-hop ones,
/// and the host and length the fetch sets itself.
fn is_per_fetch(name: &HeaderName) -> bool {
    is_hop_by_hop(name) || name == "host" || name == "content-length"
}

/// Drops the hop-by-hop headers from a request stoa forwards itself (the front's forwarder;
/// it takes no request whose `Connection` header names any other header).
pub fn strip_request(req: &mut RequestHeader) {
    for name in present(&req.headers, is_hop_by_hop) {
        req.remove_header(&name);
    }
}

/// The names in `headers` that `drop` picks, found in one pass over the names a message
/// has (a handful; most messages have none to drop, and then nothing is allocated), rather
/// than a lookup of every name that could be there.
fn present(headers: &HeaderMap, drop: impl Fn(&HeaderName) -> bool) -> Vec<HeaderName> {
    headers.keys().filter(|name| drop(name)).cloned().collect()
}

/// Folds a request's repeated `Content-Length` lines that say the same length into one
/// line (RFC 9110 §8.6), so that one goes upstream; different lengths are refused (pingora
/// refuses them as it reads the head, the front before).
pub fn fold_content_length(req: &mut RequestHeader) -> pingora::Result<()> {
    let mut lengths = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let (Some(first), Some(_)) = (lengths.next(), lengths.next()) else {
        return Ok(());
    };
    let first = first.clone();
    if req
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .any(|v| v != first)
    {
        return pingora::Error::e_explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "different Content-Length values",
        );
    }
    req.insert_header(http::header::CONTENT_LENGTH, first)
}

/// Joins the `Cookie` fields of an HTTP/2 request into one, `; `-separated, as RFC 9113
/// §8.2.3 requires before it goes on over HTTP/1.1 (HTTP/2 clients send each cookie in a
/// field of its own; an HTTP/1.1 upstream reads one line). Nothing is allocated unless
/// there are two or more.
pub fn join_cookies(req: &mut RequestHeader) -> pingora::Result<()> {
    let mut fields = req.headers.get_all(http::header::COOKIE).iter();
    let (Some(_), Some(_)) = (fields.next(), fields.next()) else {
        return Ok(());
    };
    let joined = req
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    let value = HeaderValue::from_bytes(&joined).map_err(|_| {
        pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "a cookie field")
    })?;
    req.insert_header(http::header::COOKIE, value)
}

/// Whether a header is part of a message's framing: never dropped for being named in
/// `Connection` (the length or chunking of the body must stay known).
fn is_framing(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

/// The header names an answer's `Connection` header nominates as hop-by-hop (RFC 9110
/// §7.6.1), framing headers excepted.
fn connection_nominated(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    nominated(
        headers
            .get_all(http::header::CONNECTION)
            .iter()
            .map(HeaderValue::as_bytes),
    )
}

/// The names `Connection` values nominate ([`connection_nominated`]); a value that is not
/// visible ASCII (as `HeaderValue::to_str` has it) nominates none.
fn nominated<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a str> {
    values
        .filter(|v| v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)))
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !is_framing(t))
}

/// The end-to-end headers of an upstream answer, the ones stored and passed on: neither
/// hop-by-hop nor named in the answer's `Connection` header. (The length is kept.)
pub fn end_to_end_response(
    headers: &HeaderMap,
) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let nominated: Vec<&str> = connection_nominated(headers).collect();
    headers.iter().filter(move |(name, _)| {
        !is_hop_by_hop(name)
            && !nominated
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_str()))
    })
}

/// Drops from a pass-through answer the headers its `Connection` header names, the
/// hop-by-hop ones but `Connection` and `Transfer-Encoding` (the session that writes the
/// answer sets both for its own connection and framing), and the field
/// aimed at stoa alone, `targeted` (RFC 9213: stoa's cache reads it, nothing passes it on;
/// `CDN-Cache-Control` goes on), and the CDN tag fields `Surrogate-Key` and `Cache-Tag`,
/// which are for caches, as CDNs drop them (`Cache-Groups` goes on, RFC 9875).
pub fn strip_response(resp: &mut ResponseHeader, targeted: &HeaderName) {
    let dropped = present(&resp.headers, response_drops(resp, targeted));
    for name in &dropped {
        resp.remove_header(name);
    }
}

/// Whether a pass-through answer `resp` loses the header `name` (see [`strip_response`]).
pub fn response_drops<'a>(
    resp: &'a ResponseHeader,
    targeted: &'a HeaderName,
) -> impl Fn(&HeaderName) -> bool + 'a {
    let connection = resp.headers.get_all(http::header::CONNECTION);
    let drops = ResponseDrops::new(
        resp.status.as_u16(),
        connection.iter().map(HeaderValue::as_bytes),
        targeted,
    );
    move |name| drops.drops(name.as_str().as_bytes())
}

/// Which headers of a pass-through answer [`strip_response`] drops, decided once per
/// answer from its status and its `Connection` values, for names in any case: the one
/// decision for an answer as pingora's session reads it and for one the front's forwarder
/// reads as bytes.
pub struct ResponseDrops<'a> {
    /// A successful upgrade (101) needs its `Upgrade` header.
    upgrade: bool,
    /// The names `Connection` nominates: the first few at hand, the rest (rare) kept apart.
    first: [&'a str; 4],
    more: Vec<&'a str>,
    targeted: &'a HeaderName,
}

impl<'a> ResponseDrops<'a> {
    /// For an answer with `status` and the `Connection` values `connection`.
    pub fn new(
        status: u16,
        connection: impl Iterator<Item = &'a [u8]>,
        targeted: &'a HeaderName,
    ) -> Self {
        let mut drops = ResponseDrops {
            upgrade: status == 101,
            first: [""; 4],
            more: Vec::new(),
            targeted,
        };
        for (i, token) in nominated(connection).enumerate() {
            match drops.first.get_mut(i) {
                Some(slot) => *slot = token,
                None => drops.more.push(token),
            }
        }
        drops
    }

    /// Whether the header `name` (in any case) is dropped.
    pub fn drops(&self, name: &[u8]) -> bool {
        let is = |other: &str| other.as_bytes().eq_ignore_ascii_case(name);
        let nominated = self
            .first
            .iter()
            .chain(&self.more)
            .any(|t| !t.is_empty() && is(t));
        if HOP_BY_HOP.iter().any(|h| is(h)) {
            // The writer sets its own `Connection` and framing; an upgrade keeps `Upgrade`.
            let kept =
                is("connection") || is("transfer-encoding") || (self.upgrade && is("upgrade"));
            !kept || nominated
        } else {
            is(self.targeted.as_str()) || is("surrogate-key") || is("cache-tag") || nominated
        }
    }
}

/// Rewrites the head of a pass-through request for its upstream: `host` (the upstream's
/// `Host`, prepared when the route was built), the `peer` appended to `X-Forwarded-For`,
/// `X-Forwarded-Proto` (`https` when the request came over TLS) and the request id (none
/// sent when it is empty: `server.request_id` is `off`, or `pass` without a valid one).
/// (The hop-by-hop headers are gone by then: pingora's proxy drops them, the front's
/// forwarder calls [`strip_request`].)
pub fn forward(
    req: &mut RequestHeader,
    host: &HeaderValue,
    peer: Option<IpAddr>,
    https: bool,
    request_id: &HeaderValue,
) -> pingora::Result<()> {
    req.insert_header(http::header::HOST, host.clone())?;
    if let Some(ip) = peer {
        let forwarded = forwarded_for(req.headers.get(X_FORWARDED_FOR), ip);
        req.insert_header(X_FORWARDED_FOR, forwarded)?;
    }
    req.insert_header(X_FORWARDED_PROTO, forwarded_proto(https))?;
    if request_id.is_empty() {
        req.remove_header(X_REQUEST_ID);
    } else {
        req.insert_header(X_REQUEST_ID, request_id.clone())?;
    }
    Ok(())
}

/// The head [`strip_request`] and [`forward`] make of `req`, with `target` as its request
/// target, written as HTTP/1.1 bytes as pingora's client session writes a head (the
/// client's names in their case, a replaced header in its place, the added ones last), and
/// `body` after it: one buffer and one write, where building, cloning and dropping a
/// `RequestHeader` would cost more than the rest of the request. `None` when the target has
/// a byte no request line may carry (pingora's session refuses it).
pub fn forward_wire(
    req: &RequestHeader,
    target: &[u8],
    host: &HeaderValue,
    peer: Option<IpAddr>,
    https: bool,
    request_id: &HeaderValue,
    body: Option<&[u8]>,
) -> Option<bytes::Bytes> {
    use bytes::BufMut;
    if target
        .iter()
        .any(|&b| matches!(b, 0x00 | b'\n' | b'\r' | b' '))
    {
        return None;
    }
    let forwarded = peer.map(|ip| forwarded_for(req.headers.get(X_FORWARDED_FOR), ip));
    let proto = forwarded_proto(https);
    let id = (!request_id.is_empty()).then_some(request_id);
    // What `forward` sets (its name, as written, and its value; `None`: the client's lines
    // are dropped), written where the client had it, or after the client's headers. Without
    // a peer, the client's `X-Forwarded-For` goes as it came.
    type Set<'a> = (&'a str, &'a [u8], Option<&'a HeaderValue>);
    let set: [Option<Set>; 4] = [
        Some(("host", b"Host", Some(host))),
        forwarded
            .as_ref()
            .map(|v| (X_FORWARDED_FOR, X_FORWARDED_FOR.as_bytes(), Some(v))),
        Some((
            X_FORWARDED_PROTO,
            X_FORWARDED_PROTO.as_bytes(),
            Some(&proto),
        )),
        Some((X_REQUEST_ID, X_REQUEST_ID.as_bytes(), id)),
    ];
    let mut written = [false; 4];
    let mut out = bytes::BytesMut::with_capacity(
        256 + target.len() + req.headers.len() * 32 + body.map_or(0, <[u8]>::len),
    );
    out.put_slice(req.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target);
    out.put_slice(b" HTTP/1.1\r\n");
    let mut cased = req.case_header_iter();
    for (name, value) in req.headers.iter() {
        let case = cased.next().map(|(case, _)| case.as_slice());
        if is_hop_by_hop(name) {
            continue;
        }
        let replaced = set
            .iter()
            .position(|row| matches!(row, Some((n, ..)) if name == *n));
        match replaced {
            Some(i) => {
                if let (false, Some((_, wire_name, Some(value)))) = (written[i], set[i]) {
                    put_line(&mut out, wire_name, value.as_bytes());
                }
                written[i] = true;
            }
            None => put_line(
                &mut out,
                case.unwrap_or(name.as_str().as_bytes()),
                value.as_bytes(),
            ),
        }
    }
    for (row, written) in set.iter().zip(written) {
        if let (false, Some((_, wire_name, Some(value)))) = (written, row) {
            put_line(&mut out, wire_name, value.as_bytes());
        }
    }
    out.put_slice(b"\r\n");
    if let Some(body) = body {
        out.put_slice(body);
    }
    Some(out.freeze())
}

/// Headers for a fetch made for one client only: everything end-to-end, plus forwarding
/// as in [`forward`].
pub fn private_fetch_headers(
    req: &RequestHeader,
    peer: Option<IpAddr>,
    https: bool,
    request_id: &HeaderValue,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 3);
    for (name, value) in req.headers.iter() {
        if !is_per_fetch(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(ip) = peer {
        let forwarded = forwarded_for(headers.get(X_FORWARDED_FOR), ip);
        headers.insert(X_FORWARDED_FOR, forwarded);
    }
    headers.insert(X_FORWARDED_PROTO, forwarded_proto(https));
    if request_id.is_empty() {
        headers.remove(X_REQUEST_ID);
    } else {
        headers.insert(X_REQUEST_ID, request_id.clone());
    }
    headers
}

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_REQUEST_ID: &str = "x-request-id";

/// The scheme a client reached stoa with, as told in `X-Forwarded-Proto`.
fn forwarded_proto(https: bool) -> HeaderValue {
    HeaderValue::from_static(if https { "https" } else { "http" })
}

thread_local! {
    /// The last peer address this thread formatted, and its text: a keep-alive connection's
    /// requests (and a busy client's connections) reuse it.
    static LAST_PEER: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `ip` as a header value, formatted once for a run of requests from the same peer.
fn peer_value(ip: IpAddr) -> HeaderValue {
    LAST_PEER.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, value)) = last.as_ref() {
            if *seen == ip {
                return value.clone();
            }
        }
        let value = HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_string()))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        *last = Some((ip, value.clone()));
        value
    })
}

/// The `X-Forwarded-For` value with `ip` appended to what a client sent.
fn forwarded_for(prior: Option<&HeaderValue>, ip: IpAddr) -> HeaderValue {
    match prior.and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => {
            HeaderValue::from_maybe_shared(bytes::Bytes::from(format!("{prior}, {ip}")))
                .unwrap_or_else(|_| peer_value(ip))
        }
        _ => peer_value(ip),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One of `names`, each letter upper or lower case at random.
    pub(crate) fn random_name(rng: &mut fastrand::Rng, names: &[&str]) -> String {
        let name = names[rng.usize(..names.len())];
        name.chars()
            .map(|c| {
                if rng.bool() {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    #[test]
    fn an_http2_requests_cookie_fields_go_on_as_one() {
        let mut req = RequestHeader::build("GET", b"/menu", None).unwrap();
        req.append_header("cookie", "a=1").unwrap();
        req.append_header("x-other", "x").unwrap();
        req.append_header("cookie", "b=2").unwrap();
        req.append_header("cookie", "c=3").unwrap();
        join_cookies(&mut req).unwrap();
        let cookies: Vec<&[u8]> = req
            .headers
            .get_all("cookie")
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(cookies, [&b"a=1; b=2; c=3"[..]]);
        let mut one = RequestHeader::build("GET", b"/menu", None).unwrap();
        one.append_header("cookie", "a=1; b=2").unwrap();
        join_cookies(&mut one).unwrap();
        assert_eq!(one.headers.get("cookie").unwrap(), "a=1; b=2");
    }

    #[test]
    fn a_private_fetch_carries_end_to_end_headers_and_forwarding() {
        let mut req = RequestHeader::build("GET", b"/menu", None).unwrap();
        req.insert_header("authorization", "Bearer t").unwrap();
        req.insert_header("connection", "keep-alive").unwrap();
        req.insert_header("host", "stoa.example").unwrap();
        req.insert_header("x-forwarded-for", "198.51.100.7")
            .unwrap();
        let id = HeaderValue::from_static("abc");
        let peer = "10.0.0.1".parse().ok();
        let headers = private_fetch_headers(&req, peer, false, &id);
        assert_eq!(headers["authorization"], "Bearer t");
        assert!(!headers.contains_key("connection"));
        assert!(!headers.contains_key("host"));
        assert_eq!(headers["x-forwarded-for"], "198.51.100.7, 10.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-request-id"], "abc");
        let over_tls = private_fetch_headers(&req, peer, true, &id);
        assert_eq!(over_tls["x-forwarded-proto"], "https");
        req.insert_header("x-request-id", "client's").unwrap();
        let none = private_fetch_headers(&req, peer, false, &HeaderValue::from_static(""));
        assert!(!none.contains_key("x-request-id"));
    }

    #[test]
    fn headers_named_in_connection_are_not_end_to_end() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("X-Secret, close, content-length"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("content-length", HeaderValue::from_static("2"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let names: Vec<&str> = end_to_end_response(&headers)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["content-length", "x-kept"]);
    }

    #[test]
    fn a_pass_through_answer_loses_every_header_its_connection_names() {
        for connection in ["X-Secret, close", "a, b, c, d, x-secret, e, close"] {
            let mut resp = ResponseHeader::build(200, None).unwrap();
            resp.append_header("Connection", connection).unwrap();
            resp.append_header("X-Secret", "1").unwrap();
            resp.append_header("Keep-Alive", "timeout=5").unwrap();
            resp.append_header("E", "1").unwrap();
            resp.append_header("X-Kept", "1").unwrap();
            strip_response(&mut resp, &HeaderName::from_static("stoa-cache-control"));
            let mut names: Vec<&str> = resp.headers.keys().map(|n| n.as_str()).collect();
            names.sort();
            let expected: &[&str] = if connection.contains(" e,") {
                &["connection", "x-kept"]
            } else {
                &["connection", "e", "x-kept"]
            };
            assert_eq!(names, expected, "{connection}");
        }
    }

    #[test]
    fn a_pass_through_answer_loses_the_field_aimed_at_stoa_only() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Stoa-Cache-Control", "max-age=60")
            .unwrap();
        resp.append_header("stoa-cache-control", "public").unwrap();
        resp.append_header("CDN-Cache-Control", "max-age=30")
            .unwrap();
        resp.append_header("Cache-Control", "no-store").unwrap();
        strip_response(&mut resp, &HeaderName::from_static("stoa-cache-control"));
        assert!(!resp.headers.contains_key("stoa-cache-control"));
        assert_eq!(resp.headers["cdn-cache-control"], "max-age=30");
        assert_eq!(resp.headers["cache-control"], "no-store");
        let mut wire = Vec::new();
        resp.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).unwrap();
        assert!(
            !wire.to_ascii_lowercase().contains("stoa-cache-control"),
            "{wire}"
        );
    }

    /// The head `strip_request` and `forward` make, as pingora's client session writes it:
    /// its request line, and its header lines sorted (the order of `HeaderMap`'s removals
    /// is its own).
    fn written_by_pingora(
        req: &RequestHeader,
        peer: Option<IpAddr>,
        id: &HeaderValue,
    ) -> (String, Vec<String>) {
        let mut req = req.clone();
        strip_request(&mut req);
        forward(
            &mut req,
            &HeaderValue::from_static("up.example:8080"),
            peer,
            true,
            id,
        )
        .unwrap();
        let wire = pingora::protocols::http::v1::client::http_req_header_to_wire(&req).unwrap();
        split(&wire)
    }

    /// A head's request or status line, and its header lines sorted.
    pub(crate) fn split(wire: &[u8]) -> (String, Vec<String>) {
        let text = String::from_utf8(wire.to_vec()).unwrap();
        let head = text.strip_suffix("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let first = lines.next().unwrap().to_string();
        let mut rest: Vec<String> = lines.map(str::to_string).collect();
        rest.sort();
        (first, rest)
    }

    /// Seeded random requests (names in random case, repeated, hop-by-hop, those stoa
    /// sets; with and without a peer and a request id): the bytes are the head pingora's
    /// session would write.
    #[test]
    fn random_forwarded_heads_as_bytes_are_the_heads_pingora_would_write() {
        const NAMES: [&str; 12] = [
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-request-id",
            "connection",
            "keep-alive",
            "te",
            "accept",
            "x-custom",
            "content-length",
            "cookie",
            "upgrade",
        ];
        let mut rng = fastrand::Rng::with_seed(24);
        for round in 0..2000 {
            let method = ["GET", "POST", "DELETE", "PUT"][rng.usize(..4)];
            let mut req = RequestHeader::build(method, b"/a/b?c=1", None).unwrap();
            for _ in 0..rng.usize(0..10) {
                let name = random_name(&mut rng, &NAMES);
                req.append_header(name, format!("v{}", rng.u8(..))).unwrap();
            }
            let peer = rng.bool().then(|| IpAddr::from([10, 0, 0, rng.u8(..)]));
            let id = if rng.bool() {
                HeaderValue::from(rng.u32(..))
            } else {
                HeaderValue::from_static("")
            };
            let wire = forward_wire(
                &req,
                req.raw_path(),
                &HeaderValue::from_static("up.example:8080"),
                peer,
                true,
                &id,
                None,
            )
            .unwrap();
            assert_eq!(
                split(&wire),
                written_by_pingora(&req, peer, &id),
                "round {round}"
            );
        }
    }

    #[test]
    fn the_forwarded_head_as_bytes_is_the_head_pingora_would_write() {
        let mut client = RequestHeader::build("POST", b"/api/x?y=1", None).unwrap();
        for (name, value) in [
            ("Host", "stoa.example"),
            ("Connection", "keep-alive"),
            ("X-Forwarded-For", "198.51.100.7"),
            ("Accept", "application/json"),
            ("X-Request-Id", "client-id"),
            ("accept", "text/plain"),
            ("Keep-Alive", "timeout=5"),
            ("X-Custom-Case", "v"),
            ("Content-Length", "2"),
        ] {
            client.append_header(name.to_string(), value).unwrap();
        }
        let bare = RequestHeader::build("GET", b"/menu", None).unwrap();
        let id = HeaderValue::from_static("abc");
        let none = HeaderValue::from_static("");
        for req in [&client, &bare] {
            for peer in ["10.0.0.1".parse().ok(), None] {
                for id in [&id, &none] {
                    let wire = forward_wire(
                        req,
                        req.raw_path(),
                        &HeaderValue::from_static("up.example:8080"),
                        peer,
                        true,
                        id,
                        Some(b"{}"),
                    )
                    .unwrap();
                    let (head, body) = wire.split_at(wire.len() - 2);
                    assert_eq!(body, b"{}");
                    assert_eq!(
                        split(head),
                        written_by_pingora(req, peer, id),
                        "{peer:?} {id:?}"
                    );
                }
            }
        }
        let bad = forward_wire(&bare, b"/a b", &id, None, false, &id, None);
        assert!(bad.is_none(), "a space in the target");
    }

    #[test]
    fn forwarded_for_starts_a_list_when_none_was_sent() {
        let ip = "10.0.0.1".parse().unwrap();
        assert_eq!(forwarded_for(None, ip), "10.0.0.1");
        let blank = HeaderValue::from_static(" ");
        assert_eq!(forwarded_for(Some(&blank), ip), "10.0.0.1");
        let other = "10.0.0.2".parse().unwrap();
        assert_eq!(forwarded_for(None, other), "10.0.0.2");
        let prior = HeaderValue::from_static("198.51.100.7");
        assert_eq!(forwarded_for(Some(&prior), ip), "198.51.100.7, 10.0.0.1");
    }
}
