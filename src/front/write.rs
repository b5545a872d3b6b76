//! The front's byte writer: an answer from an entry written as bytes past pingora's session,
//! the stored head's bytes (built once per entry) followed by this answer's headers, written
//! by the same code as the session's ([`entry_headers`]), and the body. pingora's session
//! would rebuild and serialize the whole head for every hit.

use std::io::{self, IoSlice};

use bytes::{BufMut, Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::date::get_cached_date;
use pingora::protocols::Stream;
use pingora::ErrorType;
use tokio::io::AsyncWriteExt;

use super::upstream_head::Plain;
use crate::exchange::Exchange;
use crate::proxy::answer::{entry_headers, AnswerHeaders, Decorations};
use crate::proxy::Hit;
use crate::upstream::headers::{self, put_line};

/// An answer as the bytes to send: the head (status line and headers) and the body, with
/// what the access log and the metrics record of it.
pub struct Wire {
    pub head: Vec<u8>,
    pub body: Option<Bytes>,
    pub status: u16,
    pub body_bytes: u64,
}

/// Headers of a stored head that every answer from it sets anew (see [`entry`]).
const SET_PER_ANSWER: [http::HeaderName; 5] = [
    http::header::DATE,
    http::header::CONNECTION,
    http::header::AGE,
    http::HeaderName::from_static("x-request-id"),
    http::HeaderName::from_static("x-cache"),
];

/// The answer `hit` as bytes: the stored head's bytes (see `Entry::pick_with_wire`), `Date`
/// and `Connection` as pingora's session sets them, then [`entry_headers`].
///
/// `None` when the session must write it: not an HTTP/1.1 keep-alive session, an answer
/// that closes the connection, or a stored head that has a header the rate limiter sets
/// (the session's answer would replace it).
pub fn entry(session: &impl Exchange, hit: &Hit, deco: &Decorations<'_>) -> Option<Wire> {
    if session.is_http2() {
        return None;
    }
    let req = session.req_header();
    if deco.close || req.version != http::Version::HTTP_11 || !session.will_keepalive() {
        return None;
    }
    let (stored, body, wire) = hit
        .entry
        .pick_with_wire(req.headers.get(http::header::ACCEPT_ENCODING));
    let wire = wire.get_or_init(|| head_bytes(stored));
    let mut head = Lines {
        bytes: Vec::with_capacity(wire.len() + 160 + deco.request_id.len()),
        stored,
    };
    head.bytes.extend_from_slice(wire);
    put_session_lines(&mut head.bytes);
    entry_headers(&mut head, hit, deco).ok()?;
    head.bytes.extend_from_slice(b"\r\n");
    let head_only = req.method == http::Method::HEAD;
    Some(Wire {
        head: head.bytes,
        body: (!head_only).then(|| body.clone()),
        status: stored.status.as_u16(),
        body_bytes: if head_only { 0 } else { body.len() as u64 },
    })
}

/// The head of a pass-through answer sent past the session (see `forward::Relay`): the
/// upstream's status line and header lines as [`headers::strip_response`] leaves them,
/// `Date` and `Connection` as pingora's session sets them, then [`Decorations::write`]'s
/// headers. The same lines as the session would write (in their order but for those
/// replaced, which come last), from the bytes the forwarder read (`upstream_head`), with
/// no `ResponseHeader` built, edited and serialized.
///
/// `None` when the session must write it: more headers set than `Added` keeps track of.
pub fn passed_head(
    resp: &Plain,
    targeted: &http::HeaderName,
    deco: &Decorations<'_>,
) -> Option<Vec<u8>> {
    let mut added = Added::default();
    deco.write(&mut added).ok()?;
    let mut head = Vec::with_capacity(96 + resp.len + added.bytes.len());
    head.extend_from_slice(b"HTTP/1.1 ");
    // A parsed status is three digits.
    let status = resp.status;
    head.extend_from_slice(&[status / 100, status / 10 % 10, status % 10].map(|d| b'0' + d as u8));
    head.push(b' ');
    head.extend_from_slice(resp.reason());
    head.extend_from_slice(b"\r\n");
    let drops = headers::ResponseDrops::new(resp.status, resp.values("connection"), targeted);
    for (name, value) in resp.lines() {
        if drops.drops(name)
            || name.eq_ignore_ascii_case(b"date")
            || name.eq_ignore_ascii_case(b"connection")
            || added.replaces(name)
        {
            continue;
        }
        put_line(&mut head, name, value);
    }
    put_session_lines(&mut head);
    head.extend_from_slice(&added.bytes);
    head.extend_from_slice(b"\r\n");
    Some(head)
}

/// Header lines written for an answer whose head is written after them: the names `set`
/// (which replace the head's) and the lines.
#[derive(Default)]
struct Added {
    bytes: Vec<u8>,
    set: [Option<http::HeaderName>; 8],
}

impl Added {
    /// Whether `name` (in any case) is one of those set.
    fn replaces(&self, name: &[u8]) -> bool {
        self.set
            .iter()
            .flatten()
            .any(|set| set.as_str().as_bytes().eq_ignore_ascii_case(name))
    }
}

impl AnswerHeaders for Added {
    fn set(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        if self.replaces(name.as_str().as_bytes()) {
            return Error::e_explain(ErrorType::InternalError, "a header set twice");
        }
        let Some(slot) = self.set.iter_mut().find(|slot| slot.is_none()) else {
            return Error::e_explain(ErrorType::InternalError, "more headers set than kept");
        };
        *slot = Some(name.clone());
        put_line(&mut self.bytes, name.as_str().as_bytes(), value.as_bytes());
        Ok(())
    }

    fn add(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        put_line(&mut self.bytes, name.as_str().as_bytes(), value.as_bytes());
        Ok(())
    }
}

/// Header lines after a stored head's bytes.
struct Lines<'a> {
    bytes: Vec<u8>,
    stored: &'a ResponseHeader,
}

impl AnswerHeaders for Lines<'_> {
    fn set(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        if !SET_PER_ANSWER.contains(name) && self.stored.headers.contains_key(name) {
            // The stored head's bytes have it: a second line would not replace it.
            return Error::e_explain(ErrorType::InternalError, "a header the stored head has");
        }
        put_line(&mut self.bytes, name.as_str().as_bytes(), value.as_bytes());
        Ok(())
    }

    fn add(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        put_line(&mut self.bytes, name.as_str().as_bytes(), value.as_bytes());
        Ok(())
    }
}

/// `Date` and `Connection` as pingora's session sets them on a keep-alive answer.
fn put_session_lines(buf: &mut impl BufMut) {
    put_line(buf, b"Date", get_cached_date().as_bytes());
    put_line(buf, b"Connection", b"keep-alive");
}

/// The status line of `head` as pingora's session writes it (always HTTP/1.1 here).
fn put_status_line(buf: &mut impl BufMut, head: &ResponseHeader) {
    buf.put_slice(b"HTTP/1.1 ");
    buf.put_slice(head.status.as_str().as_bytes());
    buf.put_u8(b' ');
    if let Some(reason) = head.get_reason_phrase() {
        buf.put_slice(reason.as_bytes());
    }
    buf.put_slice(b"\r\n");
}

/// A stored head as HTTP/1.1 bytes, as pingora's session writes it, without the headers
/// each answer sets (see [`SET_PER_ANSWER`]) and without the blank line that ends it.
fn head_bytes(stored: &ResponseHeader) -> Bytes {
    let mut head = stored.clone();
    for name in &SET_PER_ANSWER {
        head.remove_header(name);
    }
    let mut buf = BytesMut::with_capacity(256);
    put_status_line(&mut buf, &head);
    head.header_to_h1_wire(&mut buf);
    buf.freeze()
}

/// Writes `answer` on the stream, head and body in one write when the socket takes them.
pub async fn send(stream: &mut Stream, answer: &Wire) -> io::Result<()> {
    send_parts(
        stream,
        &answer.head,
        answer.body.as_deref().unwrap_or_default(),
    )
    .await
}

/// Writes `head` then `body` on the stream, in one write when the socket takes them, and
/// flushes it.
pub async fn send_parts(stream: &mut Stream, head: &[u8], body: &[u8]) -> io::Result<()> {
    let total = head.len() + body.len();
    let mut sent = 0;
    while sent < total {
        let n = if sent < head.len() {
            let parts = [IoSlice::new(&head[sent..]), IoSlice::new(body)];
            stream.write_vectored(&parts).await?
        } else {
            stream.write(&body[sent - head.len()..]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimitHeaders;
    use crate::front::upstream_head;
    use crate::upstream::headers::tests::{random_name, split};

    /// A head's status line, and its header lines sorted, with `Date`'s value left out.
    fn lines(wire: &[u8]) -> (String, Vec<String>) {
        let (first, rest) = split(wire);
        let mut rest: Vec<String> = rest
            .into_iter()
            .map(|l| match l.split_once(": ") {
                Some((name, _)) if name.eq_ignore_ascii_case("date") => format!("{name}: -"),
                _ => l,
            })
            .collect();
        rest.sort();
        (first, rest)
    }

    /// What pingora's session writes of `resp` after the forwarder's `response_filter`.
    fn through_the_session(
        resp: &ResponseHeader,
        targeted: &http::HeaderName,
        deco: &Decorations<'_>,
    ) -> Vec<u8> {
        let mut resp = resp.clone();
        headers::strip_response(&mut resp, targeted);
        deco.apply(&mut resp).unwrap();
        resp.insert_header(http::header::DATE, get_cached_date())
            .unwrap();
        resp.insert_header(http::header::CONNECTION, "keep-alive")
            .unwrap();
        let mut wire = BytesMut::new();
        wire.put_slice(b"HTTP/1.1 ");
        wire.put_slice(resp.status.as_str().as_bytes());
        wire.put_u8(b' ');
        wire.put_slice(resp.get_reason_phrase().unwrap_or_default().as_bytes());
        wire.put_slice(b"\r\n");
        resp.header_to_h1_wire(&mut wire);
        wire.put_slice(b"\r\n");
        wire.to_vec()
    }

    /// `resp` as an upstream sends it.
    fn as_sent(resp: &ResponseHeader) -> Vec<u8> {
        let mut wire = BytesMut::new();
        put_status_line(&mut wire, resp);
        resp.header_to_h1_wire(&mut wire);
        wire.put_slice(b"\r\n");
        wire.to_vec()
    }

    /// Reads answers' heads with pingora's client session, all on one connection.
    struct Pingora {
        far: tokio::net::TcpStream,
        near: Option<Stream>,
    }

    impl Pingora {
        async fn new() -> Self {
            let (far, near) = crate::front::stream_pair().await;
            Pingora {
                far,
                near: Some(near),
            }
        }

        /// The head pingora's client session reads of `sent` (an answer without a body).
        async fn read(&mut self, sent: &[u8]) -> ResponseHeader {
            self.far.write_all(sent).await.unwrap();
            let stream = self.near.take().unwrap();
            let mut up = pingora::protocols::http::v1::client::HttpSession::new(stream);
            up.read_response().await.unwrap();
            let resp = up.resp_header().unwrap().clone();
            self.near = Some(up.into_inner());
            resp
        }
    }

    /// What the forwarder relays of `sent`, read as it reads it.
    fn relayed(sent: &[u8], targeted: &http::HeaderName, deco: &Decorations<'_>) -> Vec<u8> {
        let plain = upstream_head::plain(sent).expect("a plain answer");
        passed_head(&plain, targeted, deco).unwrap()
    }

    /// Seeded random answers: names from a pool that mixes stoa's own, hop-by-hop ones,
    /// those `Connection` may name and the targeted field, in random case, repeated, with a
    /// `Connection` header naming some of them. Each is sent as bytes; the head the
    /// forwarder relays of what it reads is compared with what pingora's session would
    /// write of what pingora's client session reads. One in four is made not plain (framed
    /// otherwise, or with a status without a body): the forwarder must leave it to the
    /// session.
    #[tokio::test]
    async fn random_relayed_heads_have_the_lines_the_session_would_write() {
        const NAMES: [&str; 14] = [
            "content-type",
            "x-request-id",
            "keep-alive",
            "proxy-authenticate",
            "te",
            "upgrade",
            "x-drop",
            "x-keep",
            "vary",
            "surrogate-key",
            "cache-tag",
            "stoa-cache-control",
            "date",
            "cache-status",
        ];
        let mut rng = fastrand::Rng::with_seed(24);
        let targeted = http::HeaderName::from_static("stoa-cache-control");
        let member = http::HeaderValue::from_static("stoa; fwd=uri-miss");
        let mut pingora = Pingora::new().await;
        let mut plain = 0;
        for round in 0..2000 {
            let status = [200, 201, 404, 418, 500, 503][rng.usize(..6)];
            let mut resp = ResponseHeader::build(status, None).unwrap();
            if rng.u8(..8) == 0 {
                resp.set_reason_phrase(Some("Fine Thanks")).unwrap();
            }
            for _ in 0..rng.usize(0..10) {
                let name = random_name(&mut rng, &NAMES);
                resp.append_header(name, format!("v{}", rng.u8(..)))
                    .unwrap();
            }
            if rng.bool() {
                let close = rng.bool().then_some("close");
                let named: Vec<&str> = (0..rng.usize(0..7))
                    .map(|_| NAMES[rng.usize(..NAMES.len())])
                    .chain(close)
                    .collect();
                resp.append_header("Connection".to_string(), named.join(", "))
                    .unwrap();
            }
            let length = random_name(&mut rng, &["content-length"]);
            resp.append_header(length, "0").unwrap();
            if rng.u8(..4) == 0 {
                let (name, value) = match rng.u8(..4) {
                    0 => ("Transfer-Encoding", "chunked"),
                    1 => ("Content-Length", "0"),
                    2 => {
                        resp.remove_header("Content-Length");
                        ("Content-Length", "+0")
                    }
                    _ => {
                        resp.set_status([204, 304][rng.usize(..2)]).unwrap();
                        ("X-Keep", "1")
                    }
                };
                resp.append_header(name.to_string(), value).unwrap();
                let sent = as_sent(&resp);
                assert!(
                    upstream_head::plain(&sent).is_none(),
                    "round {round}: not plain, yet relayed: {}",
                    String::from_utf8_lossy(&sent)
                );
                continue;
            }
            plain += 1;
            let request_id = http::HeaderValue::from(rng.u32(..));
            let deco = Decorations {
                request_id: &request_id,
                rate: None,
                rate_style: RateLimitHeaders::Both,
                close: false,
                cache: None,
                cache_member: rng.bool().then_some(&member),
            };
            let sent = as_sent(&resp);
            let read = pingora.read(&sent).await;
            let relayed = relayed(&sent, &targeted, &deco);
            assert_eq!(
                lines(&relayed),
                lines(&through_the_session(&read, &targeted, &deco)),
                "round {round}: {}",
                String::from_utf8_lossy(&relayed)
            );
        }
        assert!(plain > 1400, "{plain} plain answers of 2000");
    }

    #[tokio::test]
    async fn a_relayed_head_has_the_lines_the_session_would_write() {
        let targeted = http::HeaderName::from_static("stoa-cache-control");
        let mut upstream = ResponseHeader::build(200, None).unwrap();
        for (name, value) in [
            ("Content-Type", "application/json"),
            ("Connection", "X-Drop, keep-alive"),
            ("X-Drop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Date", "Mon, 07 Dec 2026 10:00:00 GMT"),
            ("Server", "origin"),
            ("Surrogate-Key", "a b"),
            ("Stoa-Cache-Control", "max-age=60"),
            ("X-Request-Id", "the-upstream's"),
            ("Vary", "Accept"),
            ("vary", "Accept-Encoding"),
            ("Content-Length", "2"),
        ] {
            upstream.append_header(name.to_string(), value).unwrap();
        }
        let mut bare = ResponseHeader::build(418, None).unwrap();
        bare.append_header("Content-Length".to_string(), "0")
            .unwrap();
        // More names in `Connection` than `response_drops` keeps at hand.
        let mut many = ResponseHeader::build(200, None).unwrap();
        for (name, value) in [
            ("Connection", "a, b, c, d, X-Drop"),
            ("X-Drop", "1"),
            ("B", "2"),
            ("Content-Length", "0"),
        ] {
            many.append_header(name.to_string(), value).unwrap();
        }
        let id = http::HeaderValue::from_static("abc");
        let none = http::HeaderValue::from_static("");
        let member = http::HeaderValue::from_static("stoa; fwd=uri-miss");
        let mut pingora = Pingora::new().await;
        for resp in [&upstream, &bare, &many] {
            let sent = as_sent(resp);
            let read = pingora.read(&sent).await;
            for request_id in [&id, &none] {
                for cache_member in [None, Some(&member)] {
                    let deco = Decorations {
                        request_id,
                        rate: None,
                        rate_style: RateLimitHeaders::Both,
                        close: false,
                        cache: None,
                        cache_member,
                    };
                    let relayed = relayed(&sent, &targeted, &deco);
                    assert_eq!(
                        lines(&relayed),
                        lines(&through_the_session(&read, &targeted, &deco)),
                        "{}",
                        String::from_utf8_lossy(&relayed)
                    );
                }
            }
        }
    }
}
