//! `--path lean`: HTTP/1.1 forwarding on pingora-core's HTTP/1 sessions, without the
//! `ProxyHttp` machinery (no per-phase boxed futures, no downstream modules, no duplex select
//! loop, no `Session` enum, one boxed future per connection instead of per request).
//!
//! For each request on a downstream connection: read the head with the HTTP/1 server session,
//! take a kept-alive upstream connection (a small pool of this app's own, or pingora's
//! `TransportConnector` pool with `--pool pingora`), write the head, stream the request body,
//! read the response head, write it downstream, stream the response body, give the upstream
//! connection back when it can be reused, and go on with the next request on the same
//! downstream connection. Bodies of any size, with `Content-Length` or chunked, are copied
//! piece by piece; neither side is buffered whole.
//!
//! Errors are JSON: the upstream unreachable (refused, reset before answering) is 502
//! `upstream_unreachable` or `upstream_failed`, the upstream not answering within `--timeout`
//! (connect, a read or a write) is 504 `upstream_timeout`, an unreadable request head is 400.
//!
//! Limits of this prototype: the request body is sent whole before the response head is read
//! (an early answer of the upstream is still delivered when its write fails, but not
//! interleaved); no upgrades (101 is answered 502); no HTTP/2.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use http::{header, Version};
use pingora::apps::ServerApp;
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::protocols::http::v1::server::HttpSession as Downstream;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{BError, ErrorType};
use tokio::io::{AsyncRead, ReadBuf};

/// Idle upstream connections kept per app (per worker with `--model split`).
const POOL_SIZE: usize = 128;
/// How long a downstream connection may sit idle between requests (pingora's default).
const DOWNSTREAM_KEEPALIVE_SECS: u64 = 60;

/// Where idle upstream connections wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// A LIFO stack behind a mutex, one per app: no task per idle connection; a dead one is
    /// found (and dropped) when it is taken.
    Own,
    /// pingora's `TransportConnector` pool: an idle-watch task per released connection.
    Pingora,
}

pub struct Lean {
    peer: HttpPeer,
    reuse_hash: u64,
    connector: TransportConnector,
    idle: Option<Mutex<Vec<Stream>>>,
    timeout: Duration,
}

impl Lean {
    pub fn new(peer: SocketAddr, timeout: Duration, pool: PoolKind) -> Self {
        let mut peer = HttpPeer::new(peer, false, String::new());
        peer.options.total_connection_timeout = Some(timeout);
        let reuse_hash = peer.reuse_hash();
        Lean {
            peer,
            reuse_hash,
            connector: TransportConnector::new(None),
            idle: (pool == PoolKind::Own).then(|| Mutex::new(Vec::with_capacity(POOL_SIZE))),
            timeout,
        }
    }

    /// A connection to the upstream and whether it was reused; a new one when `fresh`.
    async fn connection(&self, fresh: bool) -> Result<(Stream, bool), BError> {
        if fresh {
            return Ok((self.connector.new_stream(&self.peer).await?, false));
        }
        match &self.idle {
            Some(idle) => {
                loop {
                    let taken = idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
                    match taken {
                        Some(mut stream) => {
                            if still_idle(&mut stream) {
                                return Ok((stream, true));
                            } // closed or sent something while idle: drop it
                        }
                        None => break,
                    }
                }
                Ok((self.connector.new_stream(&self.peer).await?, false))
            }
            None => self.connector.get_stream(&self.peer).await,
        }
    }

    fn release(&self, stream: Stream) {
        match &self.idle {
            Some(idle) => {
                let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
                if idle.len() < POOL_SIZE {
                    idle.push(stream);
                }
            }
            None => self.connector.release_stream(stream, self.reuse_hash, None),
        }
    }

    /// Forwards the request `down` has read; `Ok` when the answer went out whole.
    async fn forward(&self, down: &mut Downstream) -> Result<(), Failure> {
        let no_body = down.is_body_empty();
        let mut retried = false;
        let mut up = loop {
            let (stream, reused) = self
                .connection(retried)
                .await
                .map_err(|e| Failure::connect(&e))?;
            let mut up = Upstream::new(stream);
            up.read_timeout = Some(self.timeout);
            up.write_timeout = Some(self.timeout);
            match self.exchange_head(down, &mut up).await {
                Ok(()) => break up,
                // A kept-alive connection the upstream closed meanwhile: once more on a new
                // connection, when nothing of the request body was consumed.
                Err(e) if reused && no_body && !retried && !is_timeout(&e) => retried = true,
                Err(e) => return Err(Failure::exchange(&e)),
            }
        };
        let status = up.resp_header().map(|h| h.status.as_u16());
        if status == Some(101) {
            return Err(Failure::upstream_failed("upgrades are not supported"));
        }
        let mut resp = match up.resp_header() {
            Some(h) => Box::new(h.clone()),
            None => return Err(Failure::upstream_failed("no response head")),
        };
        // Hop by hop: the downstream session writes its own Connection header.
        if resp.headers.contains_key(header::CONNECTION) {
            resp.remove_header(&header::CONNECTION);
        }
        if resp.headers.contains_key("keep-alive") {
            resp.remove_header("keep-alive");
        }
        down.write_response_header(resp)
            .await
            .map_err(|_| Failure::Downstream)?;
        loop {
            let piece = match up.read_body_ref().await {
                Ok(Some(piece)) => piece,
                Ok(None) => break,
                Err(_) => return Err(Failure::Downstream), // the head is out: close
            };
            match down.write_body(piece).await {
                Ok(Some(_)) => {}
                Ok(None) => break, // the framing is complete
                Err(_) => return Err(Failure::Downstream),
            }
        }
        down.finish_body().await.map_err(|_| Failure::Downstream)?;
        up.respect_keepalive();
        if let Some(stream) = up.reuse().await {
            self.release(stream);
        }
        Ok(())
    }

    /// Writes the request head and body upstream and reads the final response head.
    async fn exchange_head(&self, down: &mut Downstream, up: &mut Upstream) -> Result<(), BError> {
        up.write_request_header(upstream_request(down.req_header()))
            .await?;
        let mut sent = Ok(());
        if !down.is_body_empty() {
            sent = self.send_body(down, up).await;
        }
        // Even when sending the body failed, the upstream may have answered (a 413, say).
        loop {
            match up.read_response().await {
                Ok(_) => {}
                Err(e) => return Err(sent.err().unwrap_or(e)),
            }
            match up.resp_header().map(|h| h.status) {
                Some(s) if s.is_informational() && s.as_u16() != 101 => continue,
                _ => return Ok(()),
            }
        }
    }

    async fn send_body(&self, down: &mut Downstream, up: &mut Upstream) -> Result<(), BError> {
        // The downstream read timeout is pingora's (60 s between reads).
        while let Some(piece) = down.read_body_bytes().await? {
            up.write_body(&piece).await?;
        }
        up.finish_body().await?;
        Ok(())
    }
}

/// The downstream request as it goes upstream: HTTP/1.1, without the downstream's own
/// Connection header (the upstream connection is kept alive on its own terms).
fn upstream_request(req: &RequestHeader) -> Box<RequestHeader> {
    let mut req = Box::new(req.clone());
    if req.headers.contains_key(header::CONNECTION) {
        req.remove_header(&header::CONNECTION);
    }
    if req.version != Version::HTTP_11 {
        req.set_version(Version::HTTP_11);
    }
    req
}

/// An idle connection is still usable when reading it would wait: no EOF, no error, no
/// unexpected bytes. One non-blocking poll, no syscall when nothing happened on the socket.
fn still_idle(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    let read = tokio::task::unconstrained(std::future::poll_fn(|cx| {
        Pin::new(&mut *stream).poll_read(cx, &mut buf)
    }));
    let mut read = std::pin::pin!(read);
    matches!(read.as_mut().poll(&mut cx), Poll::Pending)
}

fn is_timeout(e: &BError) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    )
}

/// Why a request was not answered by the upstream.
enum Failure {
    /// Answered with a JSON error: status, kind, message.
    Answer(u16, &'static str, String),
    /// The downstream failed, or the answer was already under way: close the connection.
    Downstream,
}

impl Failure {
    fn connect(e: &BError) -> Self {
        if is_timeout(e) {
            Failure::Answer(
                504,
                "upstream_timeout",
                format!("connecting: {}", e.etype().as_str()),
            )
        } else {
            Failure::Answer(
                502,
                "upstream_unreachable",
                format!("connecting: {}", e.etype().as_str()),
            )
        }
    }

    fn exchange(e: &BError) -> Self {
        if is_timeout(e) {
            Failure::Answer(504, "upstream_timeout", e.etype().as_str().to_string())
        } else {
            Failure::upstream_failed(e.etype().as_str())
        }
    }

    fn upstream_failed(detail: &str) -> Self {
        Failure::Answer(502, "upstream_failed", detail.to_string())
    }
}

/// Writes a JSON error; `false` when the downstream connection cannot go on.
async fn answer_error(down: &mut Downstream, status: u16, kind: &str, message: &str) -> bool {
    // `kind` is one of the fixed names above and `message` an error type's name or a fixed
    // text: neither holds a quote or a backslash.
    let body = format!(r#"{{"error":"{kind}","message":"{message}"}}"#);
    let Ok(mut resp) = ResponseHeader::build(status, Some(2)) else {
        return false;
    };
    if resp
        .insert_header(header::CONTENT_TYPE, "application/json")
        .is_err()
        || resp
            .insert_header(header::CONTENT_LENGTH, body.len())
            .is_err()
    {
        return false;
    }
    down.write_response_header(Box::new(resp)).await.is_ok()
        && down.write_body(body.as_bytes()).await.is_ok()
        && down.finish_body().await.is_ok()
}

#[async_trait]
impl ServerApp for Lean {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream = stream;
        loop {
            let mut down = Downstream::new(stream);
            // Between requests: an idle timeout; while shutting down, this request is the last.
            down.set_server_keepalive(if *shutdown.borrow() {
                None
            } else {
                Some(DOWNSTREAM_KEEPALIVE_SECS)
            });
            match down.read_request().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(e) => {
                    down.set_server_keepalive(None);
                    answer_error(&mut down, 400, "bad_request", e.etype().as_str()).await;
                    return None;
                }
            }
            if *shutdown.borrow() {
                down.set_server_keepalive(None);
            }
            match self.forward(&mut down).await {
                Ok(()) => {}
                Err(Failure::Answer(status, kind, message)) => {
                    if !answer_error(&mut down, status, kind, &message).await {
                        return None;
                    }
                }
                Err(Failure::Downstream) => return None,
            }
            match down.reuse().await {
                Ok(Some(reusable)) => stream = reusable.into_parts().0,
                _ => return None,
            }
        }
    }
}
