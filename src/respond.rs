//! Writing stoa's own answers (errors, cached entries) and the headers every answer gets.

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::ErrorType;

use crate::cache::store::Entry;
use crate::cache::CacheStatus;
use crate::config::CacheSettings;
use crate::error::StoaError;
use crate::fetch::Streaming;
use crate::ratelimit::Decision;

/// Headers added to every answer of a request: its id and its rate-limit state.
pub struct Decorations<'a> {
    pub request_id: &'a http::HeaderValue,
    pub rate: Option<&'a Decision>,
    /// Close the connection after this answer (the process is draining).
    pub close: bool,
    /// The `X-Cache` value of stoa's own errors on a cached route (answers from an entry
    /// carry theirs already).
    pub cache: Option<&'static str>,
}

impl Decorations<'_> {
    pub fn apply(&self, header: &mut ResponseHeader) -> Result<()> {
        if !self.request_id.is_empty() {
            header.insert_header("x-request-id", self.request_id.clone())?;
        }
        if let Some(rate) = self.rate {
            for (name, value) in rate.headers() {
                header.insert_header(name, value)?;
            }
        }
        Ok(())
    }
}

/// Writes one of stoa's own JSON errors. The connection is only kept if the request body
/// was fully read, so an unread body can never be mistaken for the next request.
pub async fn error(session: &mut Session, err: &StoaError, deco: &Decorations<'_>) -> Result<()> {
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
) -> Result<()> {
    let head_only = session.req_header().method == http::Method::HEAD;
    // The stored head already says `X-Cache: HIT`.
    let mut header = entry.header.clone();
    if let (false, Some(value)) = (status == CacheStatus::Hit, status.header_value()) {
        header.insert_header("x-cache", value)?;
    }
    header.insert_header("age", entry.age_secs(std::time::Instant::now()))?;
    deco.apply(&mut header)?;
    if deco.close {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(entry.body.clone()), true)
            .await?;
    }
    Ok(())
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
    for (name, value) in &streaming.headers {
        if !is_hop_by_hop_response(name) {
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
    if !streaming.headers.contains_key(http::header::CONTENT_LENGTH) {
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

/// Response headers not passed on from the upstream: hop-by-hop ones (the length is kept).
fn is_hop_by_hop_response(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
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

/// The answer to a request body whose framing is broken (a bad chunk size, a missing
/// chunk end): the client's mistake, told without internal detail.
pub fn malformed_body() -> StoaError {
    StoaError::BadRequest("the request body's framing is malformed".into())
}

/// Whether a pingora error while reading from the client means the client went away or
/// stalled (nobody to answer) rather than sent something malformed.
pub fn client_gone(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::ConnectionClosed
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
    )
}

/// Reads the whole request body, or says it is over `limit` or malformed.
pub async fn read_body(
    session: &mut Session,
    limit: u64,
) -> Result<std::result::Result<Bytes, StoaError>> {
    if session.is_body_empty() {
        return Ok(Ok(Bytes::new()));
    }
    let mut body = bytes::BytesMut::new();
    loop {
        let chunk = match session.read_request_body().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(mut e) if client_gone(&e) => {
                e.as_down();
                return Err(e);
            }
            Err(e) => {
                tracing::debug!("malformed request body: {e}");
                // Where the next request would start is unknown: close after the answer.
                session.set_keepalive(None);
                return Ok(Err(malformed_body()));
            }
        };
        if (body.len() + chunk.len()) as u64 > limit {
            return Ok(Err(StoaError::BodyTooLarge { limit }));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body.freeze()))
}

/// Request headers that must not be forwarded as they are.
fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Headers for a fetch made for one client only: everything end-to-end, plus forwarding.
pub fn private_fetch_headers(
    req: &RequestHeader,
    client: Option<std::net::IpAddr>,
    request_id: &http::HeaderValue,
) -> http::HeaderMap {
    let mut headers = http::HeaderMap::with_capacity(req.headers.len() + 3);
    for (name, value) in req.headers.iter() {
        if !is_hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(ip) = client {
        let forwarded = forwarded_for(headers.get("x-forwarded-for"), ip);
        if let Ok(v) = http::HeaderValue::from_str(&forwarded) {
            headers.insert("x-forwarded-for", v);
        }
    }
    headers.insert("x-forwarded-proto", http::HeaderValue::from_static("http"));
    headers.insert("x-request-id", request_id.clone());
    headers
}

/// The `X-Forwarded-For` value with `ip` appended to what a client sent.
pub fn forwarded_for(prior: Option<&http::HeaderValue>, ip: std::net::IpAddr) -> String {
    match prior.and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip.to_string(),
    }
}

/// A request carrying credentials the key does not cover must not share answers.
pub fn is_private_request(req: &RequestHeader, settings: &CacheSettings) -> bool {
    [http::header::AUTHORIZATION, http::header::COOKIE]
        .iter()
        .any(|h| req.headers.contains_key(h) && !settings.keys_on_header(h))
}

/// The client's request id if it sent a sane one, else a new one.
pub fn request_id(req: &RequestHeader) -> http::HeaderValue {
    match req.headers.get("x-request-id") {
        Some(id)
            if !id.is_empty()
                && id.len() <= 128
                && id.as_bytes().iter().all(u8::is_ascii_graphic) =>
        {
            id.clone()
        }
        _ => {
            let id = Bytes::from(crate::telemetry::new_request_id());
            // Hex digits are always a valid header value.
            http::HeaderValue::from_maybe_shared(id)
                .unwrap_or_else(|_| http::HeaderValue::from_static("-"))
        }
    }
}
