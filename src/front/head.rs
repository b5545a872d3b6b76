//! Reading a request head, whole, and holding it to HTTP/1.1's rules before any lane sees it.
//!
//! The head is read into a buffer taken once its first bytes are there ([`first_bytes`]
//! holds none while it waits), until its blank line, up to [`MAX_HEAD`] bytes; the bytes read past it (a
//! body, pipelined requests) stay in the same buffer for whoever reads on. A head that breaks
//! the rules gets one of stoa's errors ([`Read::Refused`]) and the connection closes:
//! - a head that does not parse (400), more than [`MAX_HEADERS`] fields or more than
//!   [`MAX_HEAD`] bytes (431);
//! - a target longer than [`MAX_URI_BYTES`] (414), with bytes a URI cannot hold (non-ASCII,
//!   non-UTF-8: 400), in absolute form with userinfo or a host other than `Host`'s (400);
//! - an HTTP/1.1 request without `Host`, any request with two (400) (RFC 9112 §3.2);
//! - `Content-Length` values that differ or are not lengths (400; equal ones are folded into
//!   one before the request goes anywhere, RFC 9110 §8.6); `Transfer-Encoding` on HTTP/1.0,
//!   or whose last coding is not `chunked` (400, RFC 9112 §6.1).
//!
//! Header values are read without their leading and trailing white space (RFC 9110 §5.5),
//! as pingora's session reads them. A `close` in any `Connection` field closes the
//! connection after the request ([`Head::close`], RFC 9112 §9.6).

use std::future::poll_fn;
use std::mem::MaybeUninit;

use bytes::BytesMut;
use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

use crate::error::StoaError;
use crate::proxy::answer::MAX_URI_BYTES;

/// The first read of a request head (pingora reads the same amount).
const HEAD_READ: usize = 4096;

/// Most bytes read for a request head, with what came after it in the same reads: pingora's
/// own limit (1 MiB less a byte), which its session, parsing them again, holds to.
pub const MAX_HEAD: usize = (1 << 20) - 1;

/// Most header fields in a head (pingora's own limit).
pub const MAX_HEADERS: usize = 256;

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `Content-Length` bytes (0 without one).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// What the lanes need of a head that follows the rules.
#[derive(Debug)]
pub struct Head {
    /// Bytes of the head, its blank line included.
    pub len: usize,
    pub method: http::Method,
    /// HTTP/1.1 (else HTTP/1.0).
    pub http11: bool,
    /// Where the target is in the head's bytes.
    target: (usize, usize),
    /// The target is in origin form (`/path?query`, no fragment).
    pub origin_form: bool,
    pub body: Body,
    /// No header that pingora's proxy would have to interpret for the request to go
    /// upstream as it is: no `Upgrade`, `Expect` or `HTTP2-Settings`, and a `Connection`
    /// header, if any, that says only `keep-alive` or `close`.
    pub plain: bool,
    /// A `Connection` field says `close`: the connection closes after this request
    /// (RFC 9112 §9.6), whatever else that or another `Connection` field says (pingora's
    /// session reads only the first field, and `keep-alive` before `close`).
    pub close: bool,
}

impl Head {
    /// The request target (ASCII: [`Head::parse`] refuses any other).
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b str {
        std::str::from_utf8(&buf[self.target.0..self.target.1]).unwrap_or_default()
    }

    /// The bytes of the whole request, head and body, when its framing tells (not chunked).
    pub fn request_len(&self) -> Option<u64> {
        match self.body {
            Body::Length(n) => Some(self.len as u64 + n),
            Body::Chunked => None,
        }
    }

    /// The head at the start of `buf`: `Ok(None)` while it is not whole.
    pub fn parse(buf: &[u8]) -> Result<Option<Head>, StoaError> {
        // Left uninitialised: filling 256 empty fields cost more than parsing a short head.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(StoaError::BadRequest(format!(
                    "more than {MAX_HEADERS} header fields"
                )))
            }
            Err(e) => return Err(bad(format!("malformed request head: {e}"))),
        };
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
        else {
            return Err(bad("malformed request head".into()));
        };
        let method = http::Method::from_bytes(method.as_bytes())
            .map_err(|_| bad("malformed method".into()))?;
        let target_bytes = target.as_bytes();
        if target_bytes.len() > MAX_URI_BYTES {
            return Err(StoaError::UriTooLong {
                limit: MAX_URI_BYTES,
            });
        }
        if !target_bytes.is_ascii() {
            return Err(bad("the request target has bytes a URI cannot hold".into()));
        }
        let start = target_bytes.as_ptr() as usize - buf.as_ptr() as usize;
        let http11 = version == 1;

        let mut host: Option<&[u8]> = None;
        let mut length: Option<u64> = None;
        let mut chunked = None;
        let mut plain = true;
        let mut close = false;
        for field in req.headers.iter() {
            let name = field.name;
            let value = field.value;
            if name.eq_ignore_ascii_case("host") {
                if host.is_some() {
                    return Err(bad("more than one Host header".into()));
                }
                host = Some(value);
            } else if name.eq_ignore_ascii_case("content-length") {
                for part in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    let n = content_length(part)?;
                    if length.is_some_and(|before| before != n) {
                        return Err(bad("different Content-Length values".into()));
                    }
                    length = Some(n);
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // The last coding of the last field is what frames the body.
                let last = value
                    .rsplit(|b| *b == b',')
                    .map(<[u8]>::trim_ascii)
                    .find(|c| !c.is_empty());
                chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
            } else if name.eq_ignore_ascii_case("connection") {
                for t in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    let closes = t.eq_ignore_ascii_case(b"close");
                    close |= closes;
                    plain &= t.is_empty() || closes || t.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name.eq_ignore_ascii_case("upgrade")
                || name.eq_ignore_ascii_case("expect")
                || name.eq_ignore_ascii_case("http2-settings")
            {
                plain = false;
            }
        }
        if http11 && host.is_none() {
            return Err(bad("an HTTP/1.1 request needs a Host header".into()));
        }
        let body = match chunked {
            None => Body::Length(length.unwrap_or(0)),
            Some(_) if !http11 => {
                return Err(bad("Transfer-Encoding on an HTTP/1.0 request".into()));
            }
            Some(false) => return Err(bad("the last transfer coding is not chunked".into())),
            Some(true) => Body::Chunked,
        };
        let origin_form = target.starts_with('/') && !target.contains('#');
        if !origin_form {
            if let Some(authority) = absolute_authority(target) {
                if authority.contains('@') {
                    return Err(bad("userinfo in the request target".into()));
                }
                if host.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_bytes())) {
                    return Err(bad("the target's host is not the Host header's".into()));
                }
            }
        }
        Ok(Some(Head {
            len,
            method,
            http11,
            target: (start, start + target_bytes.len()),
            origin_form,
            body,
            plain,
            close,
        }))
    }
}

/// One `Content-Length` value: digits only.
fn content_length(value: &[u8]) -> Result<u64, StoaError> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(bad("a Content-Length that is not a length".into()));
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("a Content-Length that is not a length".into()))
}

/// The authority of an absolute-form `http` or `https` target.
fn absolute_authority(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn bad(why: String) -> StoaError {
    StoaError::BadRequest(why)
}

/// What reading a head gave.
pub enum Read {
    /// A head that follows the rules, at the start of the bytes read.
    Whole(BytesMut, Head),
    /// A head stoa refuses: its answer (the connection closes after it), and the request
    /// line's method and target as far as they were read, for the log.
    Refused(StoaError, BytesMut),
    /// The connection ended (or failed) first.
    Closed,
}

/// Bytes of a head read at once from an idle connection.
const FIRST_READ: usize = 4096;

thread_local! {
    /// A buffer for [`first_bytes`] that a poll found nothing to read into, for the next
    /// poll on this worker (a connection waits for its next request at least once per
    /// request: without it, that wait would take a buffer and give it back each time).
    static SPARE: std::cell::Cell<Option<BytesMut>> = const { std::cell::Cell::new(None) };
}

/// The first bytes of a connection's next request; `None` when it ended first. A buffer is
/// taken for each poll (the worker's spare, else a new one) and given back when the socket
/// has nothing (the runtime knows when it has: no system call then), so an idle connection
/// holds none; and a readable socket is read at once, not asked first whether it is
/// readable (a zero-length read, one system call more per request).
pub async fn first_bytes(stream: &mut Stream) -> std::io::Result<Option<BytesMut>> {
    poll_fn(|cx| {
        // Not zeroed: `read_buf` fills the spare capacity as it is.
        let mut buf = SPARE
            .take()
            .unwrap_or_else(|| BytesMut::with_capacity(FIRST_READ));
        let read = std::pin::pin!(stream.read_buf(&mut buf));
        match std::future::Future::poll(read, cx) {
            std::task::Poll::Ready(Ok(0)) => std::task::Poll::Ready(Ok(None)),
            std::task::Poll::Ready(Ok(_)) => std::task::Poll::Ready(Ok(Some(buf))),
            std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
            std::task::Poll::Pending => {
                SPARE.set(Some(buf));
                std::task::Poll::Pending
            }
        }
    })
    .await
}

/// Reads a head, starting from the bytes `carried` over from the connection's last request.
pub async fn read(stream: &mut Stream, carried: Option<BytesMut>) -> Read {
    let mut buf = carried.unwrap_or_else(|| BytesMut::with_capacity(HEAD_READ));
    // Where to look for the blank line that ends the head.
    let mut scanned = 0;
    loop {
        if ends_in(&buf, scanned) {
            match Head::parse(&buf) {
                Ok(Some(head)) => return Read::Whole(buf, head),
                Ok(None) => {}
                Err(e) => return Read::Refused(e, buf),
            }
        }
        let room = MAX_HEAD.saturating_sub(buf.len());
        if room == 0 {
            let e = StoaError::HeadersTooLarge {
                limit: MAX_HEAD + 1,
            };
            return Read::Refused(e, buf);
        }
        scanned = buf.len().saturating_sub(3);
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().max(HEAD_READ).min(room));
        }
        match (&mut *stream).take(room as u64).read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Read::Closed,
            Ok(_) => {}
        }
    }
}

/// Whether a blank line (`\n\r\n` or `\n\n`) may end a head in `buf` past `from`: the head
/// is parsed only then, not again for every piece of a head that trickles in.
fn ends_in(buf: &[u8], from: usize) -> bool {
    buf.get(from..)
        .is_some_and(|tail| tail.windows(2).any(|w| w == b"\n\n" || w == b"\n\r"))
}

/// The method and target of a refused head as far as they can be read, for the log.
pub fn request_line(buf: &[u8]) -> (String, String) {
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut words = line.split(|b| *b == b' ');
    let mut word = |limit: usize| {
        let w = words.next().unwrap_or_default();
        String::from_utf8_lossy(&w[..w.len().min(limit)]).into_owned()
    };
    let method = word(32);
    let target = word(1024);
    (method, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<Option<Head>, StoaError> {
        Head::parse(head.as_bytes())
    }

    fn refused(head: &str) -> u16 {
        match parse(head) {
            Err(e) => e.status().as_u16(),
            Ok(h) => panic!("{head:?} passed: {h:?}"),
        }
    }

    #[test]
    fn a_plain_head_is_read_with_its_framing() {
        let head = parse("GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(head.len, 32);
        assert_eq!(
            head.target(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\nrest"),
            "/a?b=1"
        );
        assert_eq!(head.body, Body::Length(0));
        assert!(head.origin_form && head.plain && head.http11);
        let post =
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\ncontent-length: 3, 3\r\n\r\n";
        assert_eq!(parse(post).unwrap().unwrap().body, Body::Length(3));
        let chunked = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(parse(chunked).unwrap().unwrap().body, Body::Chunked);
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(parse("GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
        let upgrade = "GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n";
        assert!(!parse(upgrade).unwrap().unwrap().plain);
        let closing =
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n";
        let closing = parse(closing).unwrap().unwrap();
        assert!(closing.close && closing.plain);
        let absolute = "GET http://X/a HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(!parse(absolute).unwrap().unwrap().origin_form);
    }

    #[test]
    fn heads_that_break_the_rules_are_refused() {
        assert_eq!(refused("GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(refused("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(refused("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(
            refused("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            400
        );
        assert_eq!(refused("GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(refused("GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(refused("GET /\u{e4} HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        let long = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "a".repeat(MAX_URI_BYTES)
        );
        assert_eq!(refused(&long), 414);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            refused(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
            400
        );
    }

    #[test]
    fn a_refused_heads_request_line_is_kept_for_the_log() {
        assert_eq!(
            request_line(b"GET /a\xff HTTP/1.1\r\n"),
            ("GET".to_string(), "/a\u{fffd}".to_string())
        );
    }
}
