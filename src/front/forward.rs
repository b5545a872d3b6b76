//! Pass-through requests the front forwards itself, without pingora's `ProxyHttp`
//! machinery (per-phase boxed futures, the duplex task loop and its channels, the proxy's
//! session wrapper state, pingora's upstream connector and pool). pingora's proxy also hands
//! it the HTTP/2 pass-through streams without a body, from `request_filter`
//! ([`PassThrough`]): their answers go through the HTTP/2 session.
//!
//! The front forwards only requests whose framing leaves nothing to interpret (see
//! [`super::lane::choose`]): HTTP/1.1, origin-form, one `Host`, a body framed by one plain
//! `Content-Length` and read with the head, no `Transfer-Encoding`, no upgrade, no `Expect`, a
//! `Connection` header that says no more than `keep-alive` or `close`. Every other request
//! goes to pingora's proxy. The steps are stoa's own phases, as pingora's proxy runs them:
//! `request_filter` (route, limits, upstream slot), `request_body_filter`,
//! `upstream_request_filter` (URI, `Host`, `X-Forwarded-*`, request id), `response_filter`
//! (invalidation, hop-by-hop headers, stoa's headers), `fail_to_proxy` and `logging`; the
//! upstream connections are the worker's own ([`IdlePool`]), opened for the route's peer with
//! its timeouts.
//!
//! Most requests skip pingora's client session and the server session's answer objects:
//! the head sent upstream is written as bytes ([`pass::upstream_wire`], the lines
//! `upstream_request_filter` would make); for a keep-alive HTTP/1.1 GET, the answer's head
//! is read and parsed once by the forwarder (`upstream_head`), and a plain answer is relayed
//! past the server session ([`Relay`], the lines `response_filter` and the session would
//! write). A head the client session must write (a sampled request, a HEAD), the answer to
//! any other request, or an answer the sessions must frame (chunked, ended by a close, 1xx,
//! 204, 304...) takes the sessions, the client session reading again the bytes the
//! forwarder read, if it read any (`rewound`).

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{header, Version};
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::ErrorType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pool::IdlePool;
use super::upstream_head::{self, Plain};
use super::{rewound, write};
use crate::proxy::{pass, PassThrough, RequestCtx, StoaProxy};
use crate::upstream::headers;
use crate::upstream::link::Link;

/// The room taken to read a relayed body's pieces past the first.
const BODY_BUF: usize = 16 * 1024;

/// The front's forwarder: one pool of idle upstream connections per proxy service, as
/// pingora's proxy has.
pub struct Forwarder {
    /// Opens new upstream connections (TCP, and TLS to an https upstream).
    connector: TransportConnector,
    idle: IdlePool,
}

impl Forwarder {
    pub fn new(server_conf: &ServerConf) -> Self {
        Forwarder {
            connector: TransportConnector::new(Some(ConnectorOptions::from_server_conf(
                server_conf,
            ))),
            idle: IdlePool::default(),
        }
    }

    /// Sends the request `session` has read (its route prepared by `request_filter`) to the
    /// route's upstream and its answer to the client, through the session or, when the
    /// answer is plain, as a [`Relay`] for the caller to send past it. `Err` as pingora's
    /// proxy has it: the side that failed is the error's source, for `fail_to_proxy` and
    /// the log.
    ///
    /// `may_relay`: whether the caller can send a [`Relay`] past the session (the front can;
    /// pingora's proxy, forwarding an HTTP/2 stream, cannot).
    pub async fn forward(
        &self,
        stoa: &StoaProxy,
        session: &mut Session,
        ctx: &mut RequestCtx,
        may_relay: bool,
    ) -> Result<Forwarded> {
        let link = pass::start_call(ctx)?;
        let body = read_body(stoa, session, ctx).await?;
        let out = match pass::upstream_wire(session, ctx, body.as_deref()) {
            Some(wire) => Outgoing::Wire(wire),
            None => Outgoing::Head(upstream_head(stoa, session, ctx).await?),
        };
        // Whether a plain answer could go past the session: if not, the session reads it.
        let relay = may_relay && relayable(session, stoa.draining());
        let mut up = match self
            .exchange(stoa, session, ctx, &link, out, body.as_ref(), relay)
            .await?
        {
            Answer::Session(up) => *up,
            Answer::Plain(stream, plain) => {
                let targeted = &ctx.gateway.config.cache.targeted_field;
                // Draining may have begun while the upstream answered: the session then
                // writes the answer, and closes the connection after it.
                let head = (!stoa.draining())
                    .then(|| write::passed_head(&plain, targeted, &ctx.decorations(false)))
                    .flatten();
                if let Some(head) = head {
                    // A GET: nothing to invalidate after it.
                    pass::answered(ctx);
                    return Ok(Forwarded::Relay(Relay {
                        head,
                        status: plain.status,
                        body_bytes: plain.body_len,
                        stream,
                        answer: plain,
                        pool_key: link.pool_key,
                        read_timeout: link.peer.options.read_timeout,
                    }));
                }
                // The session writes it: it reads the answer again from the bytes read.
                read_by_session(rewound::rewind(stream, plain.buf), &link.peer).await?
            }
        };
        // Informational answers (`103 Early Hints`...) pass on as they came, as pingora's
        // proxy passes them (HTTP/2's session drops them), until the final one; a 101 is
        // refused: no upgrade was asked for.
        let resp = loop {
            let Some(resp) = up.resp_header() else {
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "no response head")
                    .map_err(Error::into_up);
            };
            if resp.status.as_u16() == 101 {
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "101 without an upgrade")
                    .map_err(Error::into_up);
            }
            if !resp.status.is_informational() {
                break resp;
            }
            session
                .downstream_session
                .write_response_header(Box::new(resp.clone()))
                .await
                .map_err(Error::into_down)?;
            up.read_response().await.map_err(Error::into_up)?;
        };
        let mut resp = Box::new(resp.clone());
        let ends = up.is_body_done();
        chunk_unframed(&mut resp, session.req_header(), ends)?;
        stoa.response_filter(session, &mut resp, ctx).await?;
        let down = &mut session.downstream_session;
        down.write_response_header(resp)
            .await
            .map_err(Error::into_down)?;
        while let Some(piece) = up.read_body_ref().await.map_err(Error::into_up)? {
            if !write_piece(down, piece).await.map_err(Error::into_down)? {
                break;
            }
        }
        // Whoever runs the session finishes the answer (the front's `finish`, pingora's
        // proxy) once the request is logged.
        up.respect_keepalive();
        if let Some(stream) = up.reuse().await.and_then(rewound::unwrap) {
            self.idle.put(link.pool_key, stream);
        }
        Ok(Forwarded::Through)
    }

    /// Sends a relayed answer on the client's connection `down`: its head and its body as
    /// the upstream sends it (its length is the upstream's), then keeps the upstream
    /// connection. The body bytes sent, and `Err` when the answer was cut short (the
    /// client's connection must close).
    pub async fn relay(&self, relay: Relay, down: &mut Stream) -> (u64, Result<()>) {
        let Relay {
            head,
            mut stream,
            mut answer,
            pool_key,
            read_timeout,
            ..
        } = relay;
        let cut = |e: std::io::Error| {
            Error::because(ErrorType::WriteError, "relaying an answer", e).into_down()
        };
        // The head and what came of the body with it (usually all of it) in one write.
        let (first, mut past) = answer.body_read();
        let first_len = first.len() as u64;
        if let Err(e) = write::send_parts(down, &head, first).await {
            return (0, Err(cut(e)));
        }
        let mut sent = first_len;
        let buf = &mut answer.buf;
        while sent < answer.body_len {
            buf.clear();
            if buf.capacity() < BODY_BUF {
                buf.reserve(BODY_BUF);
            }
            let n = match read_piece(&mut stream, buf, read_timeout).await {
                Ok(n) => n,
                Err(e) => return (sent, Err(e)),
            };
            let left = answer.body_len - sent;
            let piece = &buf[..n.min(usize::try_from(left).unwrap_or(usize::MAX))];
            past |= piece.len() < n;
            if let Err(e) = down.write_all(piece).await {
                return (sent, Err(cut(e)));
            }
            sent += piece.len() as u64;
        }
        if let Err(e) = down.flush().await {
            return (sent, Err(cut(e)));
        }
        // An answer that asked to close, or sent more than its length, ends its connection.
        if !answer.close && !past {
            self.idle.put(pool_key, stream);
        }
        (sent, Ok(()))
    }

    /// A new connection to `peer`. Boxed: connecting (TLS included) is a future of several
    /// KiB, and a request's whole future is allocated and moved per request (see
    /// `Front::process_new`), while most requests take an idle connection.
    async fn connect(&self, peer: &HttpPeer) -> Result<Stream> {
        Box::pin(self.connector.new_stream(peer))
            .await
            .map_err(Error::into_up)
    }

    /// Writes the request upstream and reads the first answer's head (itself, when `relay`
    /// says a plain answer may be relayed; else with pingora's session). As pingora's proxy
    /// does, an idempotent request whose kept-alive connection the upstream closed meanwhile
    /// (closed or reset before a byte of the answer) is sent once more on a new connection,
    /// with its head built again from the client's.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        stoa: &StoaProxy,
        session: &mut Session,
        ctx: &mut RequestCtx,
        link: &Link,
        out: Outgoing,
        body: Option<&Bytes>,
        relay: bool,
    ) -> Result<Answer> {
        let peer = &link.peer;
        let (stream, reused) = match self.idle.take(link.pool_key) {
            Some(stream) => (stream, true),
            None => (self.connect(peer).await?, false),
        };
        let may_retry = reused && session.req_header().method.is_idempotent();
        let again = match &out {
            Outgoing::Wire(wire) => Some(wire.clone()),
            Outgoing::Head(_) => None,
        };
        let mut e = match attempt(stream, peer, out, body, relay).await {
            Ok(up) => return Ok(up),
            Err(e) => e,
        };
        if !may_retry {
            return Err(e);
        }
        e.retry.decide_reuse(true);
        if !e.retry() {
            return Err(e);
        }
        tracing::debug!("a kept-alive upstream connection failed, once more: {e}");
        let out = match again {
            Some(wire) => Outgoing::Wire(wire),
            None => Outgoing::Head(upstream_head(stoa, session, ctx).await?),
        };
        let stream = self.connect(peer).await?;
        attempt(stream, peer, out, body, relay).await
    }
}

/// pingora's proxy hands the forwarder the HTTP/2 streams it may take (see
/// [`PassThrough`]): their answers go through the session, never past it.
#[async_trait]
impl PassThrough for Forwarder {
    async fn forward(
        &self,
        stoa: &StoaProxy,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        match Forwarder::forward(self, stoa, session, ctx, false).await? {
            Forwarded::Through => Ok(()),
            Forwarded::Relay(_) => {
                Error::e_explain(ErrorType::InternalError, "a relay the session cannot send")
            }
        }
    }
}

/// How [`Forwarder::forward`] answered. Not boxed: it is returned once per request and
/// taken apart at once, where a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Forwarded {
    /// Through the session.
    Through,
    /// Not yet: the answer is to be sent past the session ([`Forwarder::relay`]).
    Relay(Relay),
}

/// A pass-through answer sent past pingora's session, as an answer from an entry is: its
/// head as bytes ([`write::passed_head`]), and the upstream connection its body comes from.
/// The caller records the request and takes the client's connection from the session
/// (the session writes nothing more), then sends it with [`Forwarder::relay`].
pub struct Relay {
    head: Vec<u8>,
    stream: Stream,
    answer: Plain,
    pool_key: u64,
    read_timeout: Option<Duration>,
    /// The answer's status and body length, for the log and the metrics.
    pub status: u16,
    pub body_bytes: u64,
}

/// Whether a plain answer may be relayed past the session (see [`Relay`]): a keep-alive
/// HTTP/1.1 GET (nothing to invalidate after it), the process not draining. Every other
/// answer goes through the session.
fn relayable(session: &Session, draining: bool) -> bool {
    let ServerSession::H1(down) = &*session.downstream_session else {
        return false;
    };
    let req = down.req_header();
    !draining
        && down.will_keepalive()
        && req.method == http::Method::GET
        && req.version == Version::HTTP_11
}

/// An answer's head, as [`Forwarder::exchange`] read it.
enum Answer {
    /// Read by pingora's session, which frames the answer.
    Session(Box<UpstreamSession>),
    /// Read by the forwarder: a plain answer, on its connection.
    Plain(Stream, Plain),
}

/// What goes upstream: a head for pingora's session to write, or the head and the body as
/// bytes ([`pass::upstream_wire`]).
enum Outgoing {
    Head(Box<RequestHeader>),
    Wire(Bytes),
}

/// Sends `out` (and `body`, with a head) on `stream`, then reads the first answer's head:
/// pingora's session reads it, unless the request went as bytes, may be relayed (`relay`)
/// and the answer is plain.
async fn attempt(
    mut stream: Stream,
    peer: &HttpPeer,
    out: Outgoing,
    body: Option<&Bytes>,
    relay: bool,
) -> Result<Answer> {
    match out {
        Outgoing::Head(req) => {
            let mut up = session_on(stream, peer);
            send(&mut up, req, body).await?;
            Ok(Answer::Session(Box::new(up)))
        }
        Outgoing::Wire(wire) => {
            write_wire(&mut stream, &wire, peer.options.write_timeout).await?;
            if !relay {
                return Ok(Answer::Session(Box::new(
                    read_by_session(stream, peer).await?,
                )));
            }
            let read = upstream_head::read(&mut stream, peer.options.read_timeout)
                .await
                .map_err(Error::into_up)?;
            match read {
                upstream_head::Read::Plain(plain) => Ok(Answer::Plain(stream, plain)),
                upstream_head::Read::Other(bytes) => {
                    let up = read_by_session(rewound::rewind(stream, bytes), peer).await?;
                    Ok(Answer::Session(Box::new(up)))
                }
            }
        }
    }
}

/// Reads a piece of a relayed body into `buf` within `timeout`: how many bytes came. The
/// upstream closing before the body's end is an error, as in pingora's session.
async fn read_piece(
    stream: &mut Stream,
    buf: &mut BytesMut,
    timeout: Option<Duration>,
) -> Result<usize> {
    let read = match timeout {
        Some(t) => pingora::time::timeout(t, stream.read_buf(buf))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
        None => stream.read_buf(buf).await,
    };
    match read {
        Ok(0) => Error::e_explain(ErrorType::ConnectionClosed, "while reading a relayed body"),
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            Error::e_because(ErrorType::ReadTimedout, "while reading a relayed body", e)
        }
        Err(e) => Error::e_because(ErrorType::ReadError, "while reading a relayed body", e),
    }
    .map_err(Error::into_up)
}

/// Writes a request's bytes as pingora's session writes a head: whole, within the peer's
/// write timeout, flushed; its errors are the session's.
async fn write_wire(
    stream: &mut Stream,
    wire: &[u8],
    timeout: Option<std::time::Duration>,
) -> Result<()> {
    let write = async {
        stream.write_all(wire).await?;
        stream.flush().await
    };
    let written = match timeout {
        Some(t) => pingora::time::timeout(t, write)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
        None => write.await,
    };
    written.map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::TimedOut {
            ErrorType::WriteTimedout
        } else {
            ErrorType::WriteError
        };
        Error::because(kind, "while writing the request", e).into_up()
    })
}
/// The head sent upstream: the client's, HTTP/1.1, without its hop-by-hop headers (the
/// upstream connection keeps alive on its own terms), with stoa's URI and headers
/// (`upstream_request_filter`).
async fn upstream_head(
    stoa: &StoaProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<Box<RequestHeader>> {
    let mut req = Box::new(session.req_header().clone());
    if req.version != Version::HTTP_11 {
        req.set_version(Version::HTTP_11);
    }
    headers::strip_request(&mut req);
    stoa.upstream_request_filter(session, &mut req, ctx).await?;
    Ok(req)
}

/// An answer with a body but no framing (it ends when the upstream closes) goes on chunked,
/// so that the client's connection need not close, as pingora's proxy does it.
fn chunk_unframed(resp: &mut ResponseHeader, req: &RequestHeader, ends: bool) -> Result<()> {
    let no_body = req.method == http::Method::HEAD || matches!(resp.status.as_u16(), 204 | 304);
    if no_body
        || ends
        || resp.headers.contains_key(header::TRANSFER_ENCODING)
        || resp.headers.contains_key(header::CONTENT_LENGTH)
    {
        return Ok(());
    }
    resp.set_version(Version::HTTP_11);
    resp.insert_header(header::TRANSFER_ENCODING, "chunked")
}

/// Writes a piece of an answer's body to the client; `false` when an HTTP/1 answer's
/// framing is complete (nothing more may follow).
async fn write_piece(down: &mut ServerSession, piece: &[u8]) -> Result<bool> {
    match down {
        ServerSession::H1(down) => Ok(down.write_body(piece).await?.is_some()),
        down => {
            let piece = Bytes::copy_from_slice(piece);
            down.write_response_body(piece, false).await?;
            Ok(true)
        }
    }
}

/// The answer's head on `stream`, read by an HTTP/1 client session ([`session_on`]).
async fn read_by_session(stream: Stream, peer: &HttpPeer) -> Result<UpstreamSession> {
    let mut up = session_on(stream, peer);
    up.read_response().await.map_err(Error::into_up)?;
    Ok(up)
}

/// An HTTP/1 client session on `stream` with the peer's timeouts.
fn session_on(stream: Stream, peer: &HttpPeer) -> UpstreamSession {
    let mut up = UpstreamSession::new_with_options(stream, peer);
    up.read_timeout = peer.options.read_timeout;
    up.write_timeout = peer.options.write_timeout;
    up
}

/// Writes the head and the body, then reads the first answer's head.
async fn send(
    up: &mut UpstreamSession,
    req: Box<RequestHeader>,
    body: Option<&Bytes>,
) -> Result<()> {
    up.write_request_header(req).await.map_err(Error::into_up)?;
    if let Some(body) = body {
        up.write_body(body).await.map_err(Error::into_up)?;
        up.finish_body().await.map_err(Error::into_up)?;
    }
    up.read_response().await.map_err(Error::into_up)?;
    Ok(())
}

/// The request body, whole (the front forwards only bodies that came with the head),
/// counted against `max_body_bytes` by `request_body_filter` as pingora's proxy does.
async fn read_body(
    stoa: &StoaProxy,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<Option<Bytes>> {
    let mut whole: Option<Bytes> = None;
    loop {
        let mut piece = session
            .downstream_session
            .read_request_body()
            .await
            .map_err(Error::into_down)?;
        let done = piece.is_none() || session.downstream_session.is_body_done();
        stoa.request_body_filter(session, &mut piece, done, ctx)
            .await?;
        if let Some(piece) = piece.filter(|p| !p.is_empty()) {
            whole = Some(match whole {
                None => piece,
                Some(before) => {
                    let mut joined = BytesMut::with_capacity(before.len() + piece.len());
                    joined.extend_from_slice(&before);
                    joined.extend_from_slice(&piece);
                    joined.freeze()
                }
            });
        }
        if done {
            return Ok(whole);
        }
    }
}
