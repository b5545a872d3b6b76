//! `--path raw`: HTTP/1.1 forwarding without pingora's HTTP sessions: pingora's listener
//! and downstream `Stream`, then `httparse` on both sides and the bytes copied as they are.
//! It is what a proxy on tokio costs when it parses each head once and builds no header
//! maps: the floor under the floor, for the pass-through row.
//!
//! Per request: read the head (up to 64 KiB), take an idle upstream connection (a LIFO
//! stack per app) or connect, write the head and the `Content-Length` body upstream as they
//! came, read the answer's head, write it and the body downstream as they came, and give
//! the upstream connection back. Only `Content-Length` framing both ways: a chunked request
//! or answer, or a head too large, is answered 502/400 and the connection closes. Every read
//! and write of the upstream has `--timeout`; a downstream waits at most 60 s for its next
//! request.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Idle upstream connections kept per app.
const POOL_SIZE: usize = 128;
/// The largest head read, either side.
const MAX_HEAD: usize = 64 * 1024;
/// How long a downstream connection may sit idle between requests.
const DOWNSTREAM_IDLE: Duration = Duration::from_secs(60);

pub struct Raw {
    peer: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
    timeout: Duration,
}

/// A head found in a buffer: its length and its body's.
struct Framed {
    head: usize,
    body: usize,
    close: bool,
}

impl Raw {
    pub fn new(peer: SocketAddr, timeout: Duration) -> Self {
        Raw {
            peer,
            idle: Mutex::new(Vec::with_capacity(POOL_SIZE)),
            timeout,
        }
    }

    fn take(&self) -> Option<TcpStream> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn release(&self, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < POOL_SIZE {
            idle.push(stream);
        }
    }

    /// Sends `request` upstream and relays the answer to `down`; `Err` with the answer to
    /// give when nothing was written downstream yet, `Ok(false)` when the downstream broke.
    async fn forward(
        &self,
        request: &[u8],
        down: &mut Stream,
        buf: &mut Vec<u8>,
    ) -> Result<bool, &'static str> {
        let mut up = loop {
            let (mut up, was_idle) = match self.take() {
                Some(up) => (up, true),
                None => {
                    let up = timeout(self.timeout, TcpStream::connect(self.peer))
                        .await
                        .map_err(|_| "upstream_timeout")?
                        .map_err(|_| "upstream_unreachable")?;
                    let _ = up.set_nodelay(true);
                    (up, false)
                }
            };
            buf.clear();
            match self.exchange(&mut up, request, buf).await {
                Ok(()) => break up,
                // A kept-alive connection the upstream closed meanwhile: try the next one.
                Err(_) if was_idle => continue,
                Err(e) => return Err(e),
            }
        };
        let Some(framed) = parse_response(buf)? else {
            return Err("upstream_failed");
        };
        let total = framed.head + framed.body;
        let have = buf.len().min(total);
        if down.write_all(&buf[..have]).await.is_err() {
            return Ok(false);
        }
        let mut left = total - have;
        while left > 0 {
            buf.clear();
            let n = match timeout(self.timeout, up.read_buf(buf)).await {
                Ok(Ok(n)) if n > 0 => n.min(left),
                _ => return Ok(false),
            };
            if down.write_all(&buf[..n]).await.is_err() {
                return Ok(false);
            }
            left -= n;
        }
        if down.flush().await.is_err() {
            return Ok(false);
        }
        if !framed.close && buf.len() <= total {
            self.release(up);
        }
        Ok(true)
    }

    /// Writes the request and reads until the answer's head is whole.
    async fn exchange(
        &self,
        up: &mut TcpStream,
        request: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), &'static str> {
        timeout(self.timeout, up.write_all(request))
            .await
            .map_err(|_| "upstream_timeout")?
            .map_err(|_| "upstream_failed")?;
        loop {
            let n = timeout(self.timeout, up.read_buf(buf))
                .await
                .map_err(|_| "upstream_timeout")?
                .map_err(|_| "upstream_failed")?;
            if n == 0 {
                return Err("upstream_failed");
            }
            if parse_response(buf)?.is_some() {
                return Ok(());
            }
            if buf.len() > MAX_HEAD {
                return Err("upstream_failed");
            }
        }
    }
}

/// The body length a head's headers give: `None` when it is chunked or has two lengths.
fn body_length(headers: &[httparse::Header]) -> Option<(usize, bool)> {
    let mut length = 0;
    let mut close = false;
    let mut seen = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            if seen {
                return None;
            }
            seen = true;
            length = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= h.value.eq_ignore_ascii_case(b"close");
        }
    }
    Some((length, close))
}

fn parse_request(buf: &[u8]) -> Result<Option<Framed>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(head)) => {
            let (body, close) = body_length(req.headers).ok_or("bad_request")?;
            Ok(Some(Framed { head, body, close }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err("bad_request"),
    }
}

fn parse_response(buf: &[u8]) -> Result<Option<Framed>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(head)) => {
            let (body, close) = body_length(resp.headers).ok_or("upstream_failed")?;
            Ok(Some(Framed { head, body, close }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err("upstream_failed"),
    }
}

/// Writes a JSON error that closes the connection.
async fn answer_error(down: &mut Stream, kind: &str) {
    let status = if kind == "bad_request" {
        "400 Bad Request"
    } else {
        "502 Bad Gateway"
    };
    let body = format!(r#"{{"error":"{kind}"}}"#);
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = down.write_all(answer.as_bytes()).await;
    let _ = down.flush().await;
}

#[async_trait]
impl ServerApp for Raw {
    async fn process_new(
        self: &Arc<Self>,
        mut down: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut request: Vec<u8> = Vec::new();
        let mut answer: Vec<u8> = Vec::new();
        loop {
            // The head (and what came with it), read whole.
            let framed = loop {
                match parse_request(&request) {
                    Ok(Some(framed)) => break framed,
                    Ok(None) if request.len() <= MAX_HEAD => {}
                    _ => {
                        answer_error(&mut down, "bad_request").await;
                        return None;
                    }
                }
                if request.capacity() == request.len() {
                    request.reserve(4096);
                }
                match timeout(DOWNSTREAM_IDLE, down.read_buf(&mut request)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            };
            let total = framed.head + framed.body;
            while request.len() < total {
                match timeout(self.timeout, down.read_buf(&mut request)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            }
            match self
                .forward(&request[..total], &mut down, &mut answer)
                .await
            {
                Ok(true) => {}
                Ok(false) => return None,
                Err(kind) => {
                    answer_error(&mut down, kind).await;
                    return None;
                }
            }
            if framed.close || *shutdown.borrow() {
                return None;
            }
            request.drain(..total);
        }
    }
}
