//! Writing stoa's own answers (errors, cached entries, streams) and the headers every
//! answer gets; the limits of a request head.

use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::date::get_cached_date;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use pingora::ErrorType;

use crate::cache::origin::{has_no_body, Streaming};
use crate::cache::store::Entry;
use crate::cache::CacheStatus;
use crate::config::RateLimitHeaders;
use crate::error::StoaError;
use crate::ratelimit::Decision;
use crate::upstream::headers;

use super::cache_status;
use super::range::Ranged;

/// Headers added to every answer of a request: its id and its rate-limit state.
pub struct Decorations<'a> {
    pub request_id: &'a http::HeaderValue,
    pub rate: Option<&'a Decision>,
    /// Which rate-limit headers to write (`server.rate_limit_headers`).
    pub rate_style: RateLimitHeaders,
    /// Close the connection after this answer (the process is draining).
    pub close: bool,
    /// The `X-Cache` value of stoa's own errors on a cached route (answers from an entry
    /// carry theirs already).
    pub cache: Option<&'static str>,
    /// The `Cache-Status` member of an answer from the cache engine (appended after any
    /// the upstream gave).
    pub cache_member: Option<&'a http::HeaderValue>,
}

impl Decorations<'_> {
    pub fn apply(&self, header: &mut ResponseHeader) -> Result<()> {
        if !self.request_id.is_empty() {
            header.insert_header("x-request-id", self.request_id.clone())?;
        }
        if let Some(rate) = self.rate {
            for (name, value) in rate.headers(self.rate_style) {
                header.insert_header(name, value)?;
            }
        }
        if let Some(member) = self.cache_member {
            header.append_header(cache_status::CACHE_STATUS, member.clone())?;
        }
        Ok(())
    }
}

/// Writes one of stoa's own JSON errors. The connection is only kept if the request body
/// was fully read, so an unread body can never be mistaken for the next request.
pub async fn error(session: &mut Session, err: &StoaError, deco: &Decorations<'_>) -> Result<()> {
    let req = session.req_header();
    crate::status::errors::record(
        req.method.as_str(),
        req.uri.path(),
        err,
        deco.request_id.as_bytes(),
    );
    let body = err.body();
    let mut header = ResponseHeader::build(err.status(), Some(6))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("cache-control", "no-store")?;
    if let Some((name, value)) = err.extra_header() {
        header.insert_header(name, value)?;
    }
    if let Some(cache) = deco.cache {
        header.insert_header("x-cache", cache)?;
        if deco.cache_member.is_none() {
            // Refused before the cache was asked: nothing went upstream.
            let member = format!("stoa; detail={}", err.kind());
            header.insert_header(cache_status::CACHE_STATUS, member)?;
        }
    }
    deco.apply(&mut header)?;
    if !session.is_body_done() || deco.close {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// Writes a cached (or fetched) answer from memory, with `X-Cache` and `Age`.
pub async fn entry(
    session: &mut Session,
    entry: &Entry,
    status: CacheStatus,
    deco: &Decorations<'_>,
    now: Instant,
) -> Result<()> {
    let req = session.req_header();
    let head_only = req.method == http::Method::HEAD;
    // The identity answer or a compressed variant, by the client's `Accept-Encoding`.
    let (stored, body) = entry.pick(req.headers.get(http::header::ACCEPT_ENCODING));
    // The stored head already says `X-Cache: HIT`.
    let mut header = stored.clone();
    if let (false, Some(value)) = (status == CacheStatus::Hit, status.header_value()) {
        header.insert_header("x-cache", value)?;
    }
    header.insert_header("age", entry.age_secs(now))?;
    deco.apply(&mut header)?;
    if deco.close {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(body.clone()), true)
            .await?;
    }
    Ok(())
}

/// Writes the answer to a GET for a byte range of an entry (see [`super::range`]), of the
/// representation the client's `Accept-Encoding` picks: a `206` with the stored head,
/// `Content-Range`, the part's length and the part; or, for a range past the end, a
/// `416` with `Content-Range: bytes */len` and no body. Both carry `X-Cache`, `Age` and
/// the headers of every answer.
pub async fn part(
    session: &mut Session,
    entry: &Entry,
    status: CacheStatus,
    ranged: Ranged,
    deco: &Decorations<'_>,
    now: Instant,
) -> Result<()> {
    use http::header;
    let req = session.req_header();
    let (stored, body) = entry.pick(req.headers.get(header::ACCEPT_ENCODING));
    let (mut head, part) = match ranged {
        Ranged::Part { first, last, len } => {
            let mut head = stored.clone();
            head.set_status(http::StatusCode::PARTIAL_CONTENT)?;
            head.set_reason_phrase(None)?;
            let range = format!("bytes {first}-{last}/{len}");
            head.insert_header(header::CONTENT_RANGE, range)?;
            head.insert_header(header::CONTENT_LENGTH, last - first + 1)?;
            // Within the body: `last < len`, its length.
            let part = body.slice(first as usize..=last as usize);
            (head, Some(part))
        }
        Ranged::Unsatisfiable { len } => {
            let mut head = ResponseHeader::build(http::StatusCode::RANGE_NOT_SATISFIABLE, Some(8))?;
            head.insert_header(header::CONTENT_RANGE, format!("bytes */{len}"))?;
            head.insert_header(header::CONTENT_LENGTH, 0)?;
            // What the representation depends on, and how to ask for it again.
            for name in [header::VARY, header::ETAG, header::LAST_MODIFIED] {
                for value in stored.headers.get_all(&name) {
                    head.append_header(name.clone(), value.clone())?;
                }
            }
            (head, None)
        }
        Ranged::Whole => return self::entry(session, entry, status, deco, now).await,
    };
    // The stored head already says `X-Cache: HIT`.
    if let (false, Some(value)) = (
        status == CacheStatus::Hit && part.is_some(),
        status.header_value(),
    ) {
        head.insert_header("x-cache", value)?;
    }
    head.insert_header(header::AGE, entry.age_secs(now))?;
    deco.apply(&mut head)?;
    if deco.close {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(head), part.is_none())
        .await?;
    if let Some(part) = part {
        session.write_response_body(Some(part), true).await?;
    }
    Ok(())
}

/// An answer from an entry as the bytes to send: the head (status line and headers) and
/// the body, with what the access log and the metrics record of it.
pub struct RawAnswer {
    pub head: Vec<u8>,
    pub body: Option<Bytes>,
    pub status: u16,
    pub body_bytes: u64,
}

/// Headers of a stored head that every answer from it sets anew (see [`raw_entry`]).
const SET_PER_ANSWER: [http::HeaderName; 5] = [
    http::header::DATE,
    http::header::CONNECTION,
    http::header::AGE,
    http::HeaderName::from_static("x-request-id"),
    http::HeaderName::from_static("x-cache"),
];

/// The answer [`entry`] would write, as bytes, for the front to write past pingora's
/// session: the stored head's bytes (built once per entry, see [`Entry::pick_with_wire`])
/// followed by the headers of this answer (`Date` and `Connection`, as pingora's session
/// sets them, `Age`, `X-Cache`, the request id, the `Cache-Status` member).
///
/// `now`: when the entry was looked at, for its `Age`.
///
/// `None` when the session must write it: not an HTTP/1.1 keep-alive session, an answer
/// that closes the connection, or a stored head that has a header the rate limiter sets
/// (the session's answer would replace it).
pub fn raw_entry(
    session: &Session,
    entry: &Entry,
    status: CacheStatus,
    deco: &Decorations<'_>,
    now: Instant,
) -> Option<RawAnswer> {
    let ServerSession::H1(v1) = &*session.downstream_session else {
        return None;
    };
    let req = v1.req_header();
    if deco.close || req.version != http::Version::HTTP_11 || !v1.will_keepalive() {
        return None;
    }
    let x_cache = status.header_value()?;
    let (stored, body, wire) = entry.pick_with_wire(req.headers.get(http::header::ACCEPT_ENCODING));
    let wire = wire.get_or_init(|| head_bytes(stored));
    let member = deco.cache_member.map_or(&[][..], |m| m.as_bytes());
    let id = deco.request_id.as_bytes();
    let mut head = Vec::with_capacity(wire.len() + 128 + id.len() + member.len());
    head.extend_from_slice(wire);
    push_line(&mut head, b"Date", get_cached_date().as_bytes());
    push_line(&mut head, b"Connection", b"keep-alive");
    let age = entry.age_secs(now);
    push_line(
        &mut head,
        b"Age",
        itoa::Buffer::new().format(age).as_bytes(),
    );
    push_line(&mut head, b"x-cache", x_cache.as_bytes());
    if !id.is_empty() {
        push_line(&mut head, b"x-request-id", id);
    }
    if let Some(rate) = deco.rate {
        for (name, value) in rate.headers(deco.rate_style) {
            if stored.headers.contains_key(&name) {
                return None;
            }
            // As pingora's session writes names it has no case for.
            push_line(&mut head, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if !member.is_empty() {
        push_line(&mut head, b"cache-status", member);
    }
    head.extend_from_slice(b"\r\n");
    let head_only = req.method == http::Method::HEAD;
    Some(RawAnswer {
        head,
        body: (!head_only).then(|| body.clone()),
        status: stored.status.as_u16(),
        body_bytes: if head_only { 0 } else { body.len() as u64 },
    })
}

/// One header line, `name: value` and its line end.
fn push_line(head: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    head.extend_from_slice(name);
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// A stored head as HTTP/1.1 bytes, as pingora's session writes it, without the headers
/// each answer sets (see [`SET_PER_ANSWER`]) and without the blank line that ends it.
fn head_bytes(stored: &ResponseHeader) -> Bytes {
    let mut head = stored.clone();
    for name in &SET_PER_ANSWER {
        head.remove_header(name);
    }
    let mut buf = BytesMut::with_capacity(256);
    buf.put_slice(b"HTTP/1.1 ");
    buf.put_slice(head.status.as_str().as_bytes());
    buf.put_u8(b' ');
    if let Some(reason) = head.get_reason_phrase() {
        buf.put_slice(reason.as_bytes());
    }
    buf.put_slice(b"\r\n");
    head.header_to_h1_wire(&mut buf);
    buf.freeze()
}

/// Writes an answer too large to store as it arrives from the upstream, with `X-Cache`;
/// memory stays at a chunk or so however large it is. An upstream failing midway cuts
/// the connection (the head is out): the error returned is the upstream's.
pub async fn stream(
    session: &mut Session,
    mut streaming: Box<Streaming>,
    status: CacheStatus,
    deco: &Decorations<'_>,
) -> Result<()> {
    let head_only = session.req_header().method == http::Method::HEAD;
    let mut header =
        ResponseHeader::build_no_case(streaming.status, Some(streaming.headers.len() + 4))?;
    let no_body = has_no_body(streaming.status);
    for (name, value) in headers::end_to_end_response(&streaming.headers) {
        if !(no_body && name == http::header::CONTENT_LENGTH) {
            header.append_header(name.clone(), value.clone())?;
        }
    }
    if let Some(value) = status.header_value() {
        header.insert_header("x-cache", value)?;
    }
    deco.apply(&mut header)?;
    if deco.close {
        session.set_keepalive(None);
    }
    if !no_body && !streaming.headers.contains_key(http::header::CONTENT_LENGTH) {
        if session.req_header().version == http::Version::HTTP_11 {
            header.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        } else {
            // Only the end of the connection can tell where the body ends.
            session.set_keepalive(None);
        }
    }
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if head_only {
        return Ok(());
    }
    loop {
        match streaming.next_chunk().await {
            Ok(Some(chunk)) => {
                // A client that goes away midway is the client's business, not an error.
                if let Err(mut e) = session.write_response_body(Some(chunk), false).await {
                    e.as_down();
                    return Err(e);
                }
            }
            Ok(None) => break,
            Err(e) => {
                let etype = match e {
                    StoaError::UpstreamTimeout { .. } => ErrorType::ReadTimedout,
                    _ => ErrorType::ReadError,
                };
                let mut err = Error::explain(etype, e.to_string());
                err.as_up();
                return Err(err);
            }
        }
    }
    session.write_response_body(None, true).await
}

/// Longest request target (path and query) stoa serves; longer ones get 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Largest request header section (names, values and line ends) stoa serves; larger ones
/// get 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The 414 or 431 a request head over stoa's limits gets. (Heads pingora itself cannot
/// parse never get this far: see the README.)
pub fn oversized_head(req: &RequestHeader) -> Option<StoaError> {
    if req.raw_path().len() > MAX_URI_BYTES {
        return Some(StoaError::UriTooLong {
            limit: MAX_URI_BYTES,
        });
    }
    let mut bytes = 0;
    for (name, value) in req.headers.iter() {
        bytes += name.as_str().len() + value.len() + 4;
        if bytes > MAX_HEADER_BYTES {
            return Some(StoaError::HeadersTooLarge {
                limit: MAX_HEADER_BYTES,
            });
        }
    }
    None
}
