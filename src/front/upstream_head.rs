//! The head of an upstream's answer as the forwarder reads it itself, without pingora's
//! client session, when the answer could be relayed past the server session (a keep-alive
//! HTTP/1.1 GET): read once, parsed once by `httparse` with the session's parser settings,
//! and kept as ranges of the bytes read. Only a plain answer is kept this way (see
//! [`Plain`]); any other goes to pingora's session with the bytes read ([`super::rewound`]),
//! which frames it.

use std::ops::Range;
use std::time::Duration;

use bytes::BytesMut;
use pingora::prelude::*;
use pingora::protocols::Stream;
use pingora::{ErrorType, RetryType};
use tokio::io::AsyncReadExt;

/// The first read's room, as pingora's session takes it.
const INIT_BUF: usize = 4096;
/// A head not whole past this many bytes goes to pingora's session, which reads up to its
/// own limit (1 MiB).
const MOST: usize = 64 * 1024;
/// The header lines a plain answer may have (more go to the session).
const MAX_LINES: usize = 64;

/// An answer that leaves nothing to interpret: HTTP/1.1, a final status with a body
/// (neither 1xx, nor 204, nor 304), framed by one `Content-Length` of digits and no
/// `Transfer-Encoding`, and header lines without folds.
pub struct Plain {
    /// The bytes read: the head, then whatever came of the body (and, from an upstream
    /// that misbehaves, past it).
    pub buf: BytesMut,
    /// The head's length in `buf`.
    pub len: usize,
    pub status: u16,
    reason: Range<usize>,
    lines: Vec<(Range<usize>, Range<usize>)>,
    /// The body's length.
    pub body_len: u64,
    /// The answer's `Connection` says `close`: its connection is not kept.
    pub close: bool,
}

/// What [`read`] found.
pub enum Read {
    Plain(Plain),
    /// Any other answer (or a head it does not take): the bytes read, for pingora's session.
    Other(BytesMut),
}

impl Plain {
    /// The status line's reason phrase, as it came.
    pub fn reason(&self) -> &[u8] {
        &self.buf[self.reason.clone()]
    }

    /// The header lines, names in their case, in their order.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.lines
            .iter()
            .map(|(name, value)| (&self.buf[name.clone()], &self.buf[value.clone()]))
    }

    /// The values of a header `name` (in any case).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.lines()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The body bytes read with the head (at most the body's length), and whether more
    /// than the body came.
    pub fn body_read(&self) -> (&[u8], bool) {
        let rest = &self.buf[self.len..];
        let body = usize::try_from(self.body_len).unwrap_or(usize::MAX);
        (&rest[..rest.len().min(body)], rest.len() > body)
    }
}

/// Reads an answer's head from `stream`, each read within `timeout`. The errors are those
/// pingora's session gives (a kept-alive connection closed or reset before the head is
/// whole may be retried on a new one).
pub async fn read(stream: &mut Stream, timeout: Option<Duration>) -> Result<Read> {
    let mut buf = BytesMut::with_capacity(INIT_BUF);
    loop {
        let already = buf.len();
        if buf.capacity() - buf.len() < INIT_BUF {
            buf.reserve(INIT_BUF);
        }
        let read = match timeout {
            Some(t) => pingora::time::timeout(t, stream.read_buf(&mut buf))
                .await
                .map_err(|_| {
                    Error::explain(ErrorType::ReadTimedout, "while reading response headers")
                })?,
            None => stream.read_buf(&mut buf).await,
        };
        match read {
            Ok(0) => {
                let mut e = Error::explain(
                    ErrorType::ConnectionClosed,
                    format!("while reading response headers, bytes already read: {already}"),
                );
                e.retry = RetryType::ReusedOnly;
                return Err(e);
            }
            Ok(_) => {}
            Err(io) => {
                let os = io.raw_os_error().is_some();
                let mut e = Error::because(
                    ErrorType::ReadError,
                    format!("while reading response headers, bytes already read: {already}"),
                    io,
                );
                if os {
                    e.retry = RetryType::ReusedOnly;
                }
                return Err(e);
            }
        }
        match parse(&buf) {
            Parsed::Partial if buf.len() <= MOST => {}
            Parsed::Partial | Parsed::Other => return Ok(Read::Other(buf)),
            Parsed::Plain(head) => return Ok(Read::Plain(head.into_plain(buf))),
        }
    }
}

/// `bytes` read as [`read`] reads them: the answer, if it is whole and plain.
#[cfg(test)]
pub fn plain(bytes: &[u8]) -> Option<Plain> {
    match parse(bytes) {
        Parsed::Plain(head) => Some(head.into_plain(BytesMut::from(bytes))),
        Parsed::Partial | Parsed::Other => None,
    }
}

/// A plain head's parts, as ranges of the bytes parsed.
struct Head {
    len: usize,
    status: u16,
    reason: Range<usize>,
    lines: Vec<(Range<usize>, Range<usize>)>,
    body_len: u64,
    close: bool,
}

impl Head {
    fn into_plain(self, buf: BytesMut) -> Plain {
        Plain {
            buf,
            len: self.len,
            status: self.status,
            reason: self.reason,
            lines: self.lines,
            body_len: self.body_len,
            close: self.close,
        }
    }
}

enum Parsed {
    Partial,
    Plain(Head),
    Other,
}

/// Parses `buf` as pingora's client session does (`httparse`, spaces after names and
/// folded lines allowed in answers), and keeps a plain answer's head.
fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_LINES];
    let mut resp = httparse::Response::new(&mut headers);
    let mut parser = httparse::ParserConfig::default();
    parser.allow_spaces_after_header_name_in_responses(true);
    parser.allow_obsolete_multiline_headers_in_responses(true);
    let len = match parser.parse_response(&mut resp, buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Too many lines, or not HTTP: the session says which.
        Err(_) => return Parsed::Other,
    };
    let (Some(1), Some(status), Some(reason)) = (resp.version, resp.code, resp.reason) else {
        return Parsed::Other;
    };
    if status < 200 || status == 204 || status == 304 {
        return Parsed::Other;
    }
    let base = buf.as_ptr() as usize;
    // An empty part need not point into `buf`.
    let range = |part: &[u8]| {
        if part.is_empty() {
            return 0..0;
        }
        let start = part.as_ptr() as usize - base;
        start..start + part.len()
    };
    let mut lines = Vec::with_capacity(resp.headers.len());
    let mut body_len = None;
    let mut close = false;
    for h in resp.headers.iter() {
        if h.value.iter().any(|&b| b == b'\r' || b == b'\n') {
            return Parsed::Other;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            if body_len.is_some() {
                return Parsed::Other;
            }
            match digits(h.value) {
                Some(n) => body_len = Some(n),
                None => return Parsed::Other,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Other;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        lines.push((range(h.name.as_bytes()), range(h.value)));
    }
    let Some(body_len) = body_len else {
        return Parsed::Other;
    };
    Parsed::Plain(Head {
        len,
        status,
        reason: range(reason.as_bytes()),
        lines,
        body_len,
        close,
    })
}

/// A length of digits only (the session takes more forms; those go to it).
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::stream_pair;
    use tokio::io::AsyncWriteExt;

    /// What [`read`] makes of `answer` written in pieces of random sizes, a pause between
    /// them: `Some((status, body length, header lines, body read))` for a plain answer,
    /// `None` (with every byte written handed on) for any other.
    async fn read_in_pieces(
        answer: &[u8],
        rng: &mut fastrand::Rng,
    ) -> Option<(u16, u64, Vec<(String, Vec<u8>)>, Vec<u8>)> {
        let (mut far, mut near) = stream_pair().await;
        let mut cuts: Vec<usize> = (0..rng.usize(0..6))
            .map(|_| rng.usize(..answer.len()))
            .collect();
        cuts.push(answer.len());
        cuts.sort_unstable();
        let pieces: Vec<Vec<u8>> = cuts
            .iter()
            .scan(0, |from, &to| {
                let piece = answer[*from..to].to_vec();
                *from = to;
                Some(piece)
            })
            .collect();
        let writer = tokio::spawn(async move {
            for piece in pieces {
                far.write_all(&piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            far
        });
        let read = read(&mut near, Some(std::time::Duration::from_secs(5)))
            .await
            .unwrap();
        let _far = writer.await.unwrap();
        match read {
            Read::Plain(plain) => {
                let lines = plain
                    .lines()
                    .map(|(n, v)| (String::from_utf8(n.to_vec()).unwrap(), v.to_vec()))
                    .collect();
                let (body, _) = plain.body_read();
                Some((plain.status, plain.body_len, lines, body.to_vec()))
            }
            Read::Other(bytes) => {
                assert!(answer.starts_with(&bytes), "the bytes read are handed on");
                None
            }
        }
    }

    /// Answers split at random places read as they read whole: plain ones kept with their
    /// lines and the body that came, any other handed on untouched, heads of any length.
    #[tokio::test]
    async fn answers_arriving_in_pieces_read_as_whole_ones() {
        let long = "x".repeat(10_000);
        let too_long = "y".repeat(200_000);
        let plain = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Long: {long}\r\n\
             content-length: 7\r\nConnection: keep-alive\r\n\r\n{{\"a\":1}}"
        );
        let mut rng = fastrand::Rng::with_seed(24);
        for _ in 0..20 {
            let (status, body_len, lines, body) =
                read_in_pieces(plain.as_bytes(), &mut rng).await.unwrap();
            assert_eq!((status, body_len), (200, 7));
            assert_eq!(body, b"{\"a\":1}");
            let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                ["Content-Type", "X-Long", "content-length", "Connection"]
            );
            assert_eq!(lines[1].1, long.as_bytes());
        }
        for other in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_string(),
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n".to_string(),
            "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n".to_string(),
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx".to_string(),
            "HTTP/1.1 200 OK\r\nX-Fold: a\r\n b\r\nContent-Length: 0\r\n\r\n".to_string(),
            format!("HTTP/1.1 200 OK\r\nX-Long: {too_long}\r\nContent-Length: 0\r\n\r\n"),
            "HTTP/1.1 200 OK\r\n\r\n".to_string(),
        ] {
            assert!(
                read_in_pieces(other.as_bytes(), &mut rng).await.is_none(),
                "{}",
                &other[..other.len().min(60)]
            );
        }
    }

    /// The upstream closing before the head is whole is an error a kept-alive connection
    /// may be retried for, as pingora's session has it.
    #[tokio::test]
    async fn a_head_cut_short_is_a_retryable_close() {
        let (mut far, mut near) = stream_pair().await;
        far.write_all(b"HTTP/1.1 200 OK\r\nContent-").await.unwrap();
        drop(far);
        let Err(e) = read(&mut near, None).await else {
            panic!("a head cut short was read");
        };
        assert_eq!(e.etype(), &ErrorType::ConnectionClosed);
        assert!(matches!(e.retry, RetryType::ReusedOnly));
    }
}
