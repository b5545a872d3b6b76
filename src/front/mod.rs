//! stoa's HTTP/1 connection layer: the front. It serves each HTTP/1 connection from its
//! accept (the [`crate::connections::Guarded`] stream, with its deadlines) to its close, and
//! hands HTTP/2 connections to pingora's `HttpProxy` (whose pass-through streams without a
//! body come back to the front's forwarder, `crate::proxy::PassThrough`).
//!
//! A connection's life, and where each part is:
//! - **idle** (`Front`'s `process_new`): a connection waiting for its next request holds its
//!   socket and a small state, no buffer: a buffer for the head is taken each time the
//!   socket is polled and given back when it has nothing to read ([`head::first_bytes`]);
//! - **head** ([`head`]): the head is read whole (up to 1 MiB) and held to HTTP/1.1's rules;
//!   one that breaks them gets stoa's JSON error (400, 414, 431) and the connection closes;
//! - **lane** ([`lane::choose`]): the one place a request's lane is chosen, with its route
//!   looked up once and carried in its context ([`crate::proxy::RequestCtx`]): `answer`
//!   (stoa answers: cached and aggregate routes, stoa's own errors), `forward` (a plain
//!   pass-through request, [`forward`]) or `proxy:<why>` (pingora's `HttpProxy`). The lane
//!   is in the access log and the request metrics ([`crate::lane`]);
//! - **answer**: the front runs the phases pingora's proxy would ([`StoaProxy`]:
//!   [`StoaProxy::head_read`], [`StoaProxy::serve`], the log) on its own exchange
//!   ([`exchange`]), with the head it read, never read twice; an answer from an entry goes
//!   out as bytes ([`write`]). pingora's HTTP/1 session is made only when something must go
//!   through it (a body to read, any other answer);
//! - **forward**: a pingora HTTP/1 session parses the head from the bytes read, the same
//!   phases run, and the forwarder sends it upstream, reads the upstream's answer head
//!   itself (`upstream_head`) and relays a plain answer past the session, its upstream
//!   connections the worker's own ([`pool`]);
//! - **proxy**: pingora's proxy gets the request's bytes and the context the front made for
//!   it (as the connection's context, `ProxyHttp::on_connection_reuse`); reads are fenced at
//!   the request's end ([`crate::connections::fence`], or for a chunked body
//!   [`crate::connections::fence_chunked`]), so pingora never reads the next one;
//! - **next**: bytes read past a request (pipelined requests, RFC 9112 §9.3) are kept for
//!   the next one, so requests written together are all answered, in order, whatever lane
//!   each takes. A chunked body handed to the proxy is fenced at its end as its bytes go by
//!   ([`crate::chunked`]).
//!
//! Every lane answers a request the same way: the phases, the error table, the access log,
//! the metrics and the connection's deadlines are the same code.

pub mod exchange;
pub mod forward;
#[cfg(test)]
mod fuzz;
pub mod head;
pub mod lane;
pub mod pool;
mod rewound;
mod upstream_head;
pub mod write;

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::v1::server::HttpSession as SessionV1;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::{HttpProxy, Session};
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorType};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::chunked::{Chunked, Fed};
use crate::config::ServerSettings;
use crate::connections;
use crate::error::StoaError;
use crate::exchange::Exchange;
use crate::gateway::Gateway;
use crate::lifecycle::Lifecycle;
use crate::proxy::{self, Reply, RequestCtx, Seen, StoaProxy};
use exchange::{After, FrontExchange};
use forward::{Forwarded, Forwarder};
use head::{Body, Head, Read};
use lane::Lane;

/// How long an HTTP/1 connection may wait for its next request, as pingora sets it (stoa's
/// own `server.keepalive_timeout` is enforced by the connection's stream).
const KEEPALIVE_SECS: u64 = 60;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection after a request: its stream, and the bytes of the next request read with
/// this one.
type Next = (Stream, Option<BytesMut>);

/// A request running on its lane ([`Front::start`]).
type Running<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Next>> + Send + 'a>>;

/// The proxy's app: the front, with pingora's proxy behind it.
pub struct Front {
    proxy: Arc<HttpProxy<StoaProxy>>,
    stoa: StoaProxy,
    gateway: Arc<ArcSwap<Gateway>>,
    lifecycle: Arc<Lifecycle>,
    /// Cleartext connections may open with HTTP/2's preface (`server.h2c`).
    h2c: bool,
    /// `server.front`; when off, every connection goes to the proxy.
    enabled: bool,
    /// Forwards the pass-through requests the front takes (`server.front_forward`); the
    /// same forwarder takes pingora's proxy's HTTP/2 streams (see `proxy::PassThrough`).
    forwarder: Option<Arc<Forwarder>>,
    /// Set once the service stops: connections waiting for their next request close.
    closing: watch::Sender<bool>,
}

impl Front {
    pub fn new(
        proxy: HttpProxy<StoaProxy>,
        gateway: Arc<ArcSwap<Gateway>>,
        lifecycle: Arc<Lifecycle>,
        server: &ServerSettings,
        forwarder: Option<Arc<Forwarder>>,
    ) -> Self {
        Front {
            proxy: Arc::new(proxy),
            stoa: StoaProxy::new(gateway.clone(), lifecycle.clone()),
            gateway,
            lifecycle,
            h2c: server.h2c,
            enabled: server.front,
            forwarder,
            closing: watch::Sender::new(false),
        }
    }

    /// Whether the connection speaks HTTP/2: ALPN chose it, or (h2c) it opens with the
    /// preface. `None`: the connection ended or timed out before it said.
    async fn speaks_h2(&self, stream: &mut Stream) -> Option<bool> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return Some(true);
        }
        if !self.h2c || stream.get_ssl_digest().is_some() {
            return Some(false);
        }
        let mut opening = [0u8; H2_PREFACE.len()];
        match stream.try_peek(&mut opening).await {
            Ok(peeked) => Some(peeked && &opening == H2_PREFACE),
            Err(e) => {
                tracing::debug!("connection closed before its first request: {e}");
                None
            }
        }
    }

    /// Chooses the lane of the request whose head (`head`) starts `buf`, and starts it
    /// there. Its state is allocated now, sized to its lane (the states of the others are not
    /// in it), moved once into that allocation, and given back when it is answered; the
    /// connection, if it may carry another.
    fn start<'a>(
        &'a self,
        stream: Stream,
        buf: BytesMut,
        head: Head,
        gateway: Arc<Gateway>,
        shutdown: &'a ShutdownWatch,
    ) -> Running<'a> {
        let (lane, routing) = lane::choose(&head, &buf, &gateway, self.forwarder.is_some());
        let mut ctx = RequestCtx::new(self.lifecycle.track(), gateway);
        ctx.lane = lane;
        ctx.routing = routing;
        match lane {
            Lane::Answer => match FrontExchange::new(stream, buf, &head) {
                Ok(exchange) => Box::pin(self.answer(exchange, ctx)),
                Err((stream, buf)) => Box::pin(self.run(stream, buf, head.close, ctx, shutdown)),
            },
            Lane::Forward => Box::pin(self.run(stream, buf, head.close, ctx, shutdown)),
            Lane::Proxy(_) => Box::pin(self.proxied(stream, buf, head, ctx, shutdown)),
        }
    }

    /// Runs a request on pingora's proxy ([`Front::hand_to_proxy`]).
    async fn proxied(
        &self,
        stream: Stream,
        buf: BytesMut,
        head: Head,
        ctx: RequestCtx,
        shutdown: &ShutdownWatch,
    ) -> Option<Next> {
        let next = self.hand_to_proxy(stream, buf, &head, ctx, shutdown).await;
        // pingora's proxy keeps alive a connection whose `close` is not in the first
        // `Connection` field; it closes here, its answer sent.
        match next {
            Some((mut stream, _)) if head.close => {
                let _ = stream.shutdown().await;
                None
            }
            next => next,
        }
    }

    /// Answers a request on the `answer` lane with the head the front read: the phases run
    /// on the front's exchange, an answer from an entry goes out as bytes, and pingora's
    /// session is made only if something must go through it ([`FrontExchange`]).
    async fn answer(&self, mut exchange: FrontExchange, mut ctx: RequestCtx) -> Option<Next> {
        let reply = match self.stoa.head_read(&mut exchange, &mut ctx) {
            Ok(()) => self.stoa.serve(&mut exchange, &mut ctx).await,
            Err(e) => Err(e),
        };
        let done = match reply {
            Ok(Reply::Written) => Ok(()),
            Ok(Reply::Entry(hit)) => {
                let deco = ctx.decorations(self.stoa.draining());
                if let Some(wire) = write::entry(&exchange, &hit, &deco) {
                    let sent = Some((wire.status, wire.body_bytes));
                    self.stoa.finish_request(&exchange, None, &mut ctx, sent);
                    let (mut stream, next) = after(exchange.into_next()).await?;
                    write::send(&mut stream, &wire).await.ok()?;
                    return Some((stream, next));
                }
                Box::pin(self.stoa.write_entry(&mut exchange, &ctx, &hit)).await
            }
            // The lane said stoa answers it (the same configuration decided both).
            Ok(Reply::Upstream) => Error::e_explain(
                ErrorType::InternalError,
                "a pass-through request on the answer lane",
            ),
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            return Box::pin(self.failed(&mut exchange, &mut ctx, &e)).await;
        }
        self.stoa.finish_request(&exchange, None, &mut ctx, None);
        after(exchange.into_next()).await
    }

    /// Runs a request on the front with pingora's HTTP/1 session, which parses its head from
    /// the bytes read (the `forward` lane, and heads the front's exchange does not take);
    /// the front runs the phases. `close`: the head asked for the connection to close
    /// after it.
    async fn run(
        &self,
        stream: Stream,
        buf: BytesMut,
        close: bool,
        mut ctx: RequestCtx,
        shutdown: &ShutdownWatch,
    ) -> Option<Next> {
        let mut session = Session::new_h1(stream);
        if let ServerSession::H1(v1) = &mut *session.downstream_session {
            // Bytes read past this request are kept for the next one (`finish`).
            v1.set_pipelining_enabled(true);
            v1.set_pipelined_prefix(buf);
        }
        session.set_keepalive(keepalive(shutdown));
        match session.downstream_session.read_request().await {
            Ok(true) if close => session.set_keepalive(None),
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                // The head passed the front's rules, yet pingora cannot take it.
                tracing::debug!("bad request head: {e}");
                let err = StoaError::BadRequest("malformed request head".into());
                let ServerSession::H1(v1) = *session.downstream_session else {
                    return None;
                };
                return self.refuse(v1.into_inner(), &err, &[], ctx.gateway).await;
            }
        }
        let reply = match self.stoa.head_read(&mut session, &mut ctx) {
            Ok(()) => self.stoa.serve(&mut session, &mut ctx).await,
            Err(e) => Err(e),
        };
        let done = match reply {
            Ok(Reply::Written) => Ok(()),
            Ok(Reply::Entry(hit)) => {
                let deco = ctx.decorations(self.stoa.draining());
                if let Some(wire) = write::entry(&session, &hit, &deco) {
                    let sent = (wire.status, wire.body_bytes);
                    let down = self.past_session(session, &mut ctx, sent);
                    let (mut stream, next) = finish(down).await?;
                    write::send(&mut stream, &wire).await.ok()?;
                    return Some((stream, next));
                }
                self.stoa.write_entry(&mut session, &ctx, &hit).await
            }
            Ok(Reply::Upstream) => match &self.forwarder {
                Some(forwarder) => {
                    match forwarder
                        .forward(&self.stoa, &mut session, &mut ctx, true)
                        .await
                    {
                        Ok(Forwarded::Through) => Ok(()),
                        Ok(Forwarded::Relay(relay)) => {
                            // Boxed: its future is larger than the rest of a request's,
                            // hits included.
                            let relayed = self.relay(forwarder, relay, session, &mut ctx);
                            return Box::pin(relayed).await;
                        }
                        Err(e) => Err(e),
                    }
                }
                // The lane said the front forwards it (the same configuration decided
                // both); answer rather than hang if not.
                None => Error::e_explain(
                    ErrorType::InternalError,
                    "a pass-through request reached the front",
                ),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            return self.failed(&mut session, &mut ctx, &e).await;
        }
        self.stoa.finish_request(&session, None, &mut ctx, None);
        finish(session.downstream_session).await
    }

    /// Records a request whose answer (`sent`: its status and body bytes) the front writes
    /// past the session, and gives the session's connection to [`finish`]. Recorded first:
    /// the session is gone once its stream is taken to write.
    fn past_session(
        &self,
        session: Session,
        ctx: &mut RequestCtx,
        sent: (u16, u64),
    ) -> Box<ServerSession> {
        self.stoa.finish_request(&session, None, ctx, Some(sent));
        session.downstream_session
    }

    /// Sends a pass-through answer the forwarder relays past the session, then records the
    /// request with what was sent (all of the body, or, when the upstream or the client
    /// broke off, what went out and why).
    async fn relay(
        &self,
        forwarder: &Forwarder,
        relay: forward::Relay,
        session: Session,
        ctx: &mut RequestCtx,
    ) -> Option<Next> {
        let status = relay.status;
        let taken = self.stoa.take_record(&session, ctx);
        let Some((mut stream, next)) = finish(session.downstream_session).await else {
            let e =
                Error::explain(ErrorType::WriteError, "the client's connection broke").into_down();
            self.stoa.record_taken(&taken, ctx, Some(&*e), status, 0);
            return None;
        };
        let (sent, relayed) = forwarder.relay(relay, &mut stream).await;
        self.stoa.record_taken(
            &taken,
            ctx,
            relayed.as_ref().err().map(|e| &**e),
            status,
            sent,
        );
        if let Err(e) = relayed {
            // A client gone is its own business; an upstream that breaks off its answer
            // is the operator's.
            if e.esource() == &pingora::ErrorSource::Upstream {
                tracing::warn!("a pass-through answer was cut short: {e}");
            } else {
                tracing::debug!("a pass-through answer was cut short: {e}");
            }
            return None;
        }
        Some((stream, next))
    }

    /// Hands a request to pingora's proxy with the context made for it. The request's own
    /// bytes go with it, and its stream's reads are fenced at its end; what follows stays
    /// here for the next request.
    async fn hand_to_proxy(
        &self,
        stream: Stream,
        mut buf: BytesMut,
        head: &Head,
        ctx: RequestCtx,
        shutdown: &ShutdownWatch,
    ) -> Option<Next> {
        let (fence, next) = fence_for_proxy(&mut buf, head);
        match fence {
            ProxyFence::Bytes(n) => connections::fence(&stream, Some(n)),
            ProxyFence::Chunked(body) => connections::fence_chunked(&stream, body),
            ProxyFence::Open => {}
        }
        let mut v1 = SessionV1::new(stream);
        v1.set_pipelined_prefix(buf);
        let mut session = ServerSession::H1(v1);
        session.set_keepalive(keepalive(shutdown));
        session.set_connection_user_context(Some(Box::new(ctx)));
        // pingora's proxy's future is about 10 KiB: it is in this lane's state alone
        // (`Front::start`).
        let (stream, _) = self
            .proxy
            .process_new_http(session, shutdown)
            .await?
            .consume();
        connections::fence(&stream, None);
        Some((stream, next))
    }

    /// As `HttpProxy` does with a failed phase or proxying: stoa's error answer (unless an
    /// answer was under way), the log, and the connection closes.
    async fn failed(
        &self,
        session: &mut impl Exchange,
        ctx: &mut RequestCtx,
        e: &Error,
    ) -> Option<Next> {
        self.stoa.answer_failure(session, e, ctx).await;
        if !proxy::quiet_failure(e) {
            tracing::error!("request failed: {e}");
        }
        self.stoa.finish_request(session, Some(e), ctx, None);
        None
    }

    /// Answers a head stoa refuses with its error, records it, and closes the connection.
    async fn refuse(
        &self,
        mut stream: Stream,
        err: &StoaError,
        buf: &[u8],
        gateway: Arc<Gateway>,
    ) -> Option<Next> {
        let answer = err.closing_answer();
        if stream.write_all(&answer).await.is_ok() {
            let _ = stream.flush().await;
        }
        let mut ctx = RequestCtx::new(self.lifecycle.track(), gateway);
        ctx.lane = Lane::Answer;
        let (method, target) = head::request_line(buf);
        let path = target.split('?').next().unwrap_or_default();
        let seen = Seen {
            client: crate::exchange::peer_of(&stream),
            method: &method,
            path,
            status: err.status().as_u16(),
            body_bytes: err.body().len() as u64,
        };
        proxy::record(&ctx, None, &seen);
        None
    }
}

/// Ends an answer on the front's HTTP/1 session as `ServerSession::finish` does (its body
/// flushed, then the connection, if it may carry another request), with a future a third
/// of that one's size: the future of every request is allocated and moved whole.
async fn finish(session: Box<ServerSession>) -> Option<Next> {
    let ServerSession::H1(mut v1) = *session else {
        return None;
    };
    v1.finish_body().await.ok()?;
    Some(v1.reuse().await.ok()??.into_parts())
}

/// The connection after an answer on the `answer` lane (see [`exchange::After`]).
async fn after(after: After) -> Option<Next> {
    match after {
        After::Done(next) => next,
        // Boxed: answers from entries, the front's hits, never take this path.
        After::Session(session) => Box::pin(finish(session)).await,
    }
}

/// The keep-alive of a connection's next session: none once the service is stopping.
fn keepalive(shutdown: &ShutdownWatch) -> Option<u64> {
    (!*shutdown.borrow()).then_some(KEEPALIVE_SECS)
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !self.enabled || self.speaks_h2(&mut stream).await? {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let mut closing = self.closing.subscribe();
        let mut carried: Option<BytesMut> = None;
        loop {
            if carried.is_some() {
                // Bytes of a next request came with the last one.
                connections::head_begun(&stream);
            } else {
                // Idle: the socket and this loop's state, no buffer.
                tokio::select! {
                    biased;
                    first = head::first_bytes(&mut stream) => carried = Some(first.ok()??),
                    _ = closing.wait_for(|closed| *closed) => return None,
                }
            }
            let gateway = self.gateway.load_full();
            let (buf, head) = match head::read(&mut stream, carried.take()).await {
                Read::Whole(buf, head) => (buf, head),
                Read::Refused(err, buf) => {
                    Box::pin(self.refuse(stream, &err, &buf, gateway)).await;
                    return None;
                }
                Read::Closed => return None,
            };
            (stream, carried) = self.start(stream, buf, head, gateway, shutdown).await?;
        }
    }

    /// The listening socket is closed and the drain is over: connections waiting for their
    /// next request close, in both lanes.
    async fn cleanup(&self) {
        self.closing.send_replace(true);
        ServerApp::cleanup(&*self.proxy).await;
    }
}

/// How the reads of a stream handed to pingora's proxy are fenced.
pub(crate) enum ProxyFence {
    /// At most this many more bytes: the rest of the request's body.
    Bytes(u64),
    /// At the end of a chunked body still arriving, found as its bytes go by.
    Chunked(Chunked),
    /// Not at all: a chunked body already broken (pingora's body reader refuses it too, and
    /// the connection closes), or a length beyond what this machine can count.
    Open,
}

/// For a request handed to pingora's proxy with `buf` (its head, and whatever was read
/// with it): how its stream's reads are fenced, and the bytes read past its end (requests
/// pipelined after it), split off `buf` for the next request.
pub(crate) fn fence_for_proxy(buf: &mut BytesMut, head: &Head) -> (ProxyFence, Option<BytesMut>) {
    let mut next = None;
    let fence = match head.body {
        Body::Length(_) => match head.request_len().and_then(|l| usize::try_from(l).ok()) {
            Some(len) => {
                if buf.len() > len {
                    next = Some(buf.split_off(len));
                }
                ProxyFence::Bytes(len.saturating_sub(buf.len()) as u64)
            }
            None => ProxyFence::Open,
        },
        Body::Chunked => {
            let mut body = Chunked::default();
            match body.feed(&buf[head.len..]) {
                Fed::End(len) => {
                    let end = head.len + len;
                    if buf.len() > end {
                        next = Some(buf.split_off(end));
                    }
                    ProxyFence::Bytes(0)
                }
                Fed::More => ProxyFence::Chunked(body),
                Fed::Invalid => ProxyFence::Open,
            }
        }
    };
    (fence, next)
}

/// A connected pair on loopback: the far end, and the near one as a pingora stream.
#[cfg(test)]
pub(crate) async fn stream_pair() -> (tokio::net::TcpStream, Stream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (far, _) = listener.accept().await.unwrap();
    far.set_nodelay(true).unwrap();
    let near: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(near));
    (far, near)
}
