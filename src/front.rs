//! The HTTP/1 front of the proxy: answers the requests stoa answers itself (cached and
//! aggregate routes, stoa's own errors) and forwards the plain pass-through requests without
//! pingora's proxy machinery, and hands every other request (pass-through requests whose
//! framing or headers need interpreting, heads that do not arrive whole in one read, HTTP/2)
//! to pingora's `HttpProxy`, which serves them exactly as before.
//!
//! Why: on a cache hit, pingora's `HttpProxy` costs more than the hit itself (a session
//! wrapper with a cache state and module contexts, per-phase boxed futures, the proxy's
//! bookkeeping). The front reads the head's bytes itself, looks at the request line, and
//! - for a route stoa answers, or a pass-through request it may forward ([`forwardable`]),
//!   parses the head with pingora's HTTP/1 session (from the bytes already read, no second
//!   read) and runs the same [`StoaProxy`] phases `HttpProxy` would run for it
//!   (`early_request_filter`, `request_filter`, then for a pass-through request the
//!   [`Forwarder`], and `logging`);
//! - for anything else, gives pingora a session that starts from those bytes, so it parses
//!   the head as if it had read it itself.
//!
//! Both lanes answer a request the same way: the phases, the error table, the access log,
//! the metrics and the connection's deadlines (the [`crate::connections::Guarded`] stream)
//! are the same code.
//!
//! An answer from the cache to an HTTP/1.1 keep-alive request that came alone (its head
//! and body in one read, no bytes of a next request) is written as bytes past the session: the stored head's bytes,
//! built once per entry, then this answer's headers and the body ([`Raw`],
//! [`answer::raw_entry`]); pingora's session would rebuild and serialize the whole head
//! for every hit. Any other answer goes through the session.
//!
//! [`answer::raw_entry`]: crate::proxy::answer::raw_entry

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::v1::server::HttpSession as SessionV1;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::{HttpProxy, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::config::ServerSettings;
use crate::forward::Forwarder;
use crate::gateway::Gateway;
use crate::lifecycle::Lifecycle;
use crate::proxy::answer::RawAnswer;
use crate::proxy::{Raw, RequestCtx, StoaProxy};
use crate::routes::{normalize_path, Lookup, PathMode};

/// The first read of a request head (pingora reads the same amount).
const HEAD_READ: usize = 4096;

/// How long an HTTP/1 connection may wait for its next request, as pingora sets it (stoa's
/// own `server.keepalive_timeout` is enforced by the connection's stream).
const KEEPALIVE_SECS: u64 = 60;

/// Headers the front's look at a head allows; a head with more goes to pingora.
const MAX_HEADERS: usize = 64;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which code answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// The front: a route stoa answers itself, or one of its own errors. `alone`: the
    /// bytes read are exactly one HTTP/1.1 request, head and `Content-Length` body, so
    /// that an answer from the cache may be written as bytes past pingora's session once
    /// the body is read (see [`Raw`]).
    Front { alone: bool },
    /// pingora's `HttpProxy`.
    Proxy,
}

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
    /// Forwards the pass-through requests the front takes (`server.front_forward`).
    forwarder: Option<Forwarder>,
    /// Set once the service stops: connections waiting for their next request close.
    closing: watch::Sender<bool>,
}

impl Front {
    pub fn new(
        proxy: HttpProxy<StoaProxy>,
        gateway: Arc<ArcSwap<Gateway>>,
        lifecycle: Arc<Lifecycle>,
        server: &ServerSettings,
        server_conf: &ServerConf,
    ) -> Self {
        Front {
            proxy: Arc::new(proxy),
            stoa: StoaProxy::new(gateway.clone(), lifecycle.clone()),
            gateway,
            lifecycle,
            h2c: server.h2c,
            enabled: server.front,
            forwarder: server.front_forward.then(|| Forwarder::new(server_conf)),
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

    /// Serves one request the front answers, whose head's bytes are `head`; the stream,
    /// if the connection may carry another request.
    async fn answer(
        &self,
        stream: Stream,
        head: BytesMut,
        alone: bool,
        gateway: Arc<Gateway>,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut session = Session::new_h1(stream);
        if let ServerSession::H1(v1) = &mut *session.downstream_session {
            v1.set_pipelined_prefix(head);
        }
        session.set_keepalive(keepalive(shutdown));
        match session.downstream_session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                // The head is whole but pingora cannot parse it: its 400, as `HttpProxy` does.
                tracing::debug!("bad request head: {e}");
                let _ = session.downstream_session.respond_error(400).await;
                session.downstream_session.shutdown().await;
                return None;
            }
        }
        if *shutdown.borrow() {
            // Draining: this answer closes the connection.
            session.set_keepalive(None);
        }
        let mut ctx = RequestCtx::new(self.lifecycle.track(), gateway);
        if alone {
            ctx.raw = Raw::Allowed;
        }
        let filtered = match self.stoa.early_request_filter(&mut session, &mut ctx).await {
            Ok(()) => self.stoa.request_filter(&mut session, &mut ctx).await,
            Err(e) => Err(e),
        };
        match filtered {
            Ok(true) => {}
            Ok(false) => {
                // A pass-through route: the front takes only those it forwards (the same
                // configuration decided both); answer rather than hang if not.
                let forwarded = match &self.forwarder {
                    Some(forwarder) => forwarder.forward(&self.stoa, &mut session, &mut ctx).await,
                    None => Error::e_explain(
                        ErrorType::InternalError,
                        "a pass-through request reached the front",
                    ),
                };
                if let Err(e) = forwarded {
                    return self.failed(&mut session, &mut ctx, &e).await;
                }
            }
            Err(e) => return self.failed(&mut session, &mut ctx, &e).await,
        }
        if let Raw::Ready(raw) = std::mem::take(&mut ctx.raw) {
            // Logged first: the session is gone once its stream is taken to write.
            ctx.raw = Raw::Sent {
                status: raw.status,
                body_bytes: raw.body_bytes,
            };
            self.stoa.logging(&mut session, None, &mut ctx).await;
            // The session's box, not the session: a move of the session copies it whole.
            return write_raw(session.downstream_session, raw).await;
        }
        self.stoa.logging(&mut session, None, &mut ctx).await;
        let reusable = session.downstream_session.finish().await.ok().flatten()?;
        Some(reusable.into_parts().0)
    }
}

impl Front {
    /// As `HttpProxy` does with a failed phase or proxying: stoa's error answer (unless an
    /// answer was under way), the log, and the connection closes.
    async fn failed(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        e: &Error,
    ) -> Option<Stream> {
        self.stoa.fail_to_proxy(session, e, ctx).await;
        if !self.stoa.suppress_error_log(session, ctx, e) {
            tracing::error!("request failed: {e}");
        }
        self.stoa.logging(session, Some(e), ctx).await;
        None
    }
}

/// Writes an answer the cache gave as bytes on the session's stream (the request was read
/// whole, so nothing of the next one is buffered in the session); the stream, to read the
/// next request from.
async fn write_raw(session: Box<ServerSession>, raw: RawAnswer) -> Option<Stream> {
    let ServerSession::H1(v1) = *session else {
        return None;
    };
    let mut stream = v1.into_inner();
    stream.write_all(&raw.head).await.ok()?;
    if let Some(body) = raw.body.filter(|b| !b.is_empty()) {
        stream.write_all(&body).await.ok()?;
    }
    stream.flush().await.ok()?;
    Some(stream)
}

/// The keep-alive of a connection's next session: none once the service is stopping.
fn keepalive(shutdown: &ShutdownWatch) -> Option<u64> {
    (!*shutdown.borrow()).then_some(KEEPALIVE_SECS)
}

/// Which lane takes the request whose head starts `head`: the front for a whole head on a
/// route stoa answers itself (or none: stoa's 404/405/400) and, when it `forwards`, for a
/// pass-through request it may forward (see [`forwardable`]); the proxy for anything else.
fn lane(head: &[u8], gateway: &Gateway, forwards: bool) -> Lane {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(parsed)) = req.parse(head) else {
        return Lane::Proxy;
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Lane::Proxy;
    };
    // Origin-form targets only; anything else is pingora's to parse.
    if !target.starts_with('/') || target.contains('#') {
        return Lane::Proxy;
    }
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return Lane::Proxy;
    };
    let alone = req.version == Some(1)
        && body_length(req.headers).is_some_and(|body| parsed + body == head.len());
    if method == http::Method::CONNECT {
        return Lane::Proxy;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let Ok(path) = normalize_path(path, PathMode::Resolve) else {
        // stoa's 400 for the path.
        return Lane::Front { alone };
    };
    match gateway.routes.lookup(&method, &path) {
        Lookup::Found(_, route, _) if route.cache.is_none() => {
            if forwards && alone && forwardable(req.headers) {
                Lane::Front { alone }
            } else {
                Lane::Proxy
            }
        }
        _ => Lane::Front { alone },
    }
}

/// Whether the front may forward a pass-through request whose body it has read with the
/// head ([`crate::forward`]): one `Host`; no upgrade, `Expect` or `HTTP2-Settings`; a
/// `Connection` header, if any, that says only `keep-alive` or `close`, so that the request's
/// headers but the hop-by-hop ones go upstream as they are. Anything else is left to
/// pingora's proxy, whose upstream request policy interprets it.
fn forwardable(headers: &[httparse::Header]) -> bool {
    let mut hosts = 0;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            let plain = h
                .value
                .split(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
                .all(|t| {
                    t.is_empty()
                        || t.eq_ignore_ascii_case(b"keep-alive")
                        || t.eq_ignore_ascii_case(b"close")
                });
            if !plain {
                return false;
            }
        } else if name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("http2-settings")
        {
            return false;
        }
    }
    hosts == 1
}

/// The length of a request's body by its head: 0 without `Content-Length`, its value with
/// exactly one; `None` for a chunked body or any other framing (left to the session).
fn body_length(headers: &[httparse::Header]) -> Option<usize> {
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            if length.is_some() || h.value.is_empty() || !h.value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            length = Some(std::str::from_utf8(h.value).ok()?.parse().ok()?);
        }
    }
    Some(length.unwrap_or(0))
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
        loop {
            let mut head = BytesMut::with_capacity(HEAD_READ);
            tokio::select! {
                biased;
                read = stream.read_buf(&mut head) => match read {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
                _ = closing.wait_for(|closed| *closed) => return None,
            }
            let gateway = self.gateway.load_full();
            stream = match lane(&head, &gateway, self.forwarder.is_some()) {
                Lane::Front { alone } => {
                    self.answer(stream, head, alone, gateway, shutdown).await?
                }
                Lane::Proxy => {
                    let mut v1 = SessionV1::new(stream);
                    v1.set_pipelined_prefix(head);
                    let mut session = ServerSession::H1(v1);
                    session.set_keepalive(keepalive(shutdown));
                    let reused = self.proxy.process_new_http(session, shutdown).await;
                    reused?.consume().0
                }
            };
        }
    }

    /// The listening socket is closed and the drain is over: connections waiting for their
    /// next request close, in both lanes.
    async fn cleanup(&self) {
        self.closing.send_replace(true);
        ServerApp::cleanup(&*self.proxy).await;
    }
}

#[cfg(test)]
mod tests {
    use super::body_length;

    fn length(head: &str) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(head.as_bytes()).unwrap();
        body_length(req.headers)
    }

    #[test]
    fn only_a_single_plain_content_length_frames_a_body_the_front_takes_whole() {
        assert_eq!(length("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Some(0));
        assert_eq!(
            length("GET / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"),
            Some(12)
        );
        assert_eq!(
            length("GET / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"),
            Some(0)
        );
        for framing in [
            "Transfer-Encoding: chunked\r\n",
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: 3\r\nContent-Length: 3\r\n",
            "Content-Length: +3\r\n",
            "Content-Length: 3, 3\r\n",
            "Content-Length: 99999999999999999999999\r\n",
        ] {
            let head = format!("GET / HTTP/1.1\r\n{framing}\r\n");
            assert_eq!(length(&head), None, "{framing:?}");
        }
    }
}
