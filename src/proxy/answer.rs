//! Writing stoa's own answers (errors, cached entries, streams) and the headers every
//! answer gets; the limits of a request head.

use std::sync::Arc;
use std::time::Instant;

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
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
use crate::exchange::Exchange;

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
        self.write(header)
    }

    /// Writes the headers of every answer: the request id, the rate-limit headers, the
    /// `Cache-Status` member (appended after any the upstream gave).
    pub fn write(&self, out: &mut impl AnswerHeaders) -> Result<()> {
        if !self.request_id.is_empty() {
            out.set(&X_REQUEST_ID, self.request_id)?;
        }
        if let Some(rate) = self.rate {
            for (name, value) in rate.headers(self.rate_style) {
                out.set(&name, &value)?;
            }
        }
        if let Some(member) = self.cache_member {
            out.add(&cache_status::CACHE_STATUS, member)?;
        }
        Ok(())
    }
}

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
const X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// Where an answer's headers are written: a head pingora's session sends, or the bytes of
/// a head the front sends itself. The headers stoa adds to an answer are written by one
/// code ([`Decorations::write`], [`entry_headers`]) for both.
pub trait AnswerHeaders {
    /// Sets `name`, replacing what the head had of it.
    fn set(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()>;
    /// Adds a `name` line after those the head has.
    fn add(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()>;
}

impl AnswerHeaders for ResponseHeader {
    fn set(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        self.insert_header(name.clone(), value.clone())
    }

    fn add(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        self.append_header(name.clone(), value.clone()).map(|_| ())
    }
}

/// An answer from a stored entry, whole, decided but not yet written (see
/// [`entry_headers`]).
pub struct Hit {
    pub entry: Arc<Entry>,
    /// How the cache served it (`X-Cache`).
    pub status: CacheStatus,
    /// When the entry was looked at, for its `Age`.
    pub now: Instant,
}

/// The headers an answer from an entry gets on top of its stored head: `X-Cache`, `Age`,
/// then those of every answer ([`Decorations::write`]).
pub fn entry_headers(
    out: &mut impl AnswerHeaders,
    hit: &Hit,
    deco: &Decorations<'_>,
) -> Result<()> {
    if let Some(x_cache) = hit.status.header_value() {
        out.set(&X_CACHE, &http::HeaderValue::from_static(x_cache))?;
    }
    let age = age_value(hit.entry.age_secs(hit.now))?;
    out.set(&http::header::AGE, &age)?;
    deco.write(out)
}

thread_local! {
    /// The `Age` value this thread made last: answers within the same second share it.
    static LAST_AGE: std::cell::RefCell<Option<(u64, http::HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `Age: secs`, made once per value and thread in a row rather than once per answer.
fn age_value(secs: u64) -> Result<http::HeaderValue> {
    LAST_AGE.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((made_for, value)) = &*last {
            if *made_for == secs {
                return Ok(value.clone());
            }
        }
        let value = itoa::Buffer::new()
            .format(secs)
            .parse::<http::HeaderValue>()
            .map_err(|e| Error::because(ErrorType::InternalError, "age", e))?;
        *last = Some((secs, value.clone()));
        Ok(value)
    })
}

/// Writes one of stoa's own JSON errors. The connection is only kept if the request body
/// was fully read, so an unread body can never be mistaken for the next request.
pub async fn error(
    session: &mut impl Exchange,
    err: &StoaError,
    deco: &Decorations<'_>,
) -> Result<()> {
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
pub async fn entry(session: &mut impl Exchange, hit: &Hit, deco: &Decorations<'_>) -> Result<()> {
    let req = session.req_header();
    let head_only = req.method == http::Method::HEAD;
    let accept = req.headers.get(http::header::ACCEPT_ENCODING);
    // The identity answer or a compressed variant, by the client's `Accept-Encoding`.
    let (header, body) = if session.is_http2() {
        let (stored, body, prepared) = hit.entry.pick_with_h2_head(accept);
        let prepared = prepared.get_or_init(|| h2_head(stored));
        (h2_answer_head(stored, prepared, hit, deco)?, body)
    } else {
        let (stored, body) = hit.entry.pick(accept);
        let mut header = Box::new(stored.clone());
        entry_headers(&mut *header, hit, deco)?;
        (header, body)
    };
    if deco.close {
        session.set_keepalive(None);
    }
    session.write_response_header(header, head_only).await?;
    if !head_only {
        session
            .write_response_body(Some(body.clone()), true)
            .await?;
    }
    Ok(())
}

/// Headers an HTTP/2 answer from an entry sets anew, beside those its stored head has:
/// the prepared head ([`h2_head`]) holds a placeholder for each, so that an answer replaces
/// values in place and never grows the map it clones.
const H2_PLACEHOLDERS: [http::HeaderName; 4] = [
    http::header::DATE,
    http::header::AGE,
    X_REQUEST_ID,
    cache_status::CACHE_STATUS,
];

/// A stored head as HTTP/2 answers start from it, built once per entry: no header case
/// (HTTP/2 has none), no `Age` or id of an earlier answer, and a placeholder for each
/// header every answer sets ([`H2_PLACEHOLDERS`]; `Date` is pingora's session's). A stored
/// `Cache-Status` stays: the member of an answer is added after it.
fn h2_head(stored: &ResponseHeader) -> Box<ResponseHeader> {
    let mut parts = stored.as_owned_parts();
    let headers = &mut parts.headers;
    headers.remove(http::header::AGE);
    headers.remove(&X_REQUEST_ID);
    let placeholder = http::HeaderValue::from_static("-");
    for name in &H2_PLACEHOLDERS {
        if !headers.contains_key(name) {
            headers.insert(name.clone(), placeholder.clone());
        }
    }
    Box::new(ResponseHeader::from(parts))
}

/// The head of one HTTP/2 answer from an entry: its prepared head ([`h2_head`]) cloned,
/// then [`entry_headers`] in place; placeholders no header took are removed.
fn h2_answer_head(
    stored: &ResponseHeader,
    prepared: &ResponseHeader,
    hit: &Hit,
    deco: &Decorations<'_>,
) -> Result<Box<ResponseHeader>> {
    let mut parts = prepared.as_owned_parts();
    let mut out = Placeheld {
        headers: &mut parts.headers,
        // Whether the placeholder of `Cache-Status` is there, and not yet replaced.
        member_pending: !stored.headers.contains_key(cache_status::CACHE_STATUS),
        id_set: false,
    };
    entry_headers(&mut out, hit, deco)?;
    let (member_pending, id_set) = (out.member_pending, out.id_set);
    if !id_set {
        parts.headers.remove(&X_REQUEST_ID);
    }
    if member_pending {
        parts.headers.remove(cache_status::CACHE_STATUS);
    }
    // No header case, as the prepared head.
    Ok(Box::new(ResponseHeader::from(parts)))
}

/// A prepared HTTP/2 head being filled in: `set` replaces, `add` takes the place of the
/// `Cache-Status` placeholder first (see [`h2_head`]).
struct Placeheld<'a> {
    headers: &'a mut http::HeaderMap,
    member_pending: bool,
    id_set: bool,
}

/// On the map itself: a head without header case has no second map to keep in step, and
/// a name given as `HeaderName` needs no parsing again.
impl AnswerHeaders for Placeheld<'_> {
    fn set(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        if name == X_REQUEST_ID {
            self.id_set = true;
        }
        self.headers.insert(name.clone(), value.clone());
        Ok(())
    }

    fn add(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        if self.member_pending && name == cache_status::CACHE_STATUS {
            self.member_pending = false;
            self.headers.insert(name.clone(), value.clone());
        } else {
            self.headers.append(name.clone(), value.clone());
        }
        Ok(())
    }
}

/// Writes the answer to a GET for a byte range of an entry (see [`super::range`]), of the
/// representation the client's `Accept-Encoding` picks: a `206` with the stored head,
/// `Content-Range`, the part's length and the part; or, for a range past the end, a
/// `416` with `Content-Range: bytes */len` and no body. Both carry `X-Cache`, `Age` and
/// the headers of every answer.
pub async fn part(
    session: &mut impl Exchange,
    entry: &Arc<Entry>,
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
        Ranged::Whole => {
            let hit = Hit {
                entry: entry.clone(),
                status,
                now,
            };
            return self::entry(session, &hit, deco).await;
        }
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

/// Writes an answer too large to store as it arrives from the upstream, with `X-Cache`;
/// memory stays at a chunk or so however large it is. An upstream failing midway cuts
/// the connection (the head is out): the error returned is the upstream's.
pub async fn stream(
    session: &mut impl Exchange,
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
