//! The front's byte writer: an answer from an entry written as bytes past pingora's session,
//! the stored head's bytes (built once per entry) followed by this answer's headers, written
//! by the same code as the session's ([`entry_headers`]), and the body. pingora's session
//! would rebuild and serialize the whole head for every hit.

use std::io::{self, IoSlice};

use bytes::{BufMut, Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::date::get_cached_date;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use pingora::ErrorType;
use tokio::io::AsyncWriteExt;

use crate::proxy::answer::{entry_headers, AnswerHeaders, Decorations};
use crate::proxy::Hit;

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
pub fn entry(session: &Session, hit: &Hit, deco: &Decorations<'_>) -> Option<Wire> {
    let ServerSession::H1(v1) = &*session.downstream_session else {
        return None;
    };
    let req = v1.req_header();
    if deco.close || req.version != http::Version::HTTP_11 || !v1.will_keepalive() {
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
    push_line(&mut head.bytes, b"Date", get_cached_date().as_bytes());
    push_line(&mut head.bytes, b"Connection", b"keep-alive");
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
        push_line(&mut self.bytes, name.as_str().as_bytes(), value.as_bytes());
        Ok(())
    }

    fn add(&mut self, name: &http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        push_line(&mut self.bytes, name.as_str().as_bytes(), value.as_bytes());
        Ok(())
    }
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

/// Writes `answer` on the stream, head and body in one write when the socket takes them.
pub async fn send(stream: &mut Stream, answer: &Wire) -> io::Result<()> {
    let head = &answer.head[..];
    let body = answer.body.as_deref().unwrap_or_default();
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
