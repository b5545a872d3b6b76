//! The pingora `ProxyHttp` implementation: the phases of a request, whichever code runs them
//! (pingora's proxy, or the front, `crate::front`). Each phase names what happens and hands
//! it to the file that does it: [`ctx`] (per-request state), [`limit`] (admission),
//! [`cached`] (cached and aggregate routes), [`pass`] (pass-through routes), [`fail`]
//! (failures), [`answer`] and [`body`] (stoa's own answers, request bodies).
//!
//! [`StoaProxy::serve`] is `request_filter` without the writing of an answer from an entry:
//! it says what the answer is ([`Reply`]), so that whoever serves the connection writes it
//! its own way (pingora's session here; the front may write it as bytes).

pub mod answer;
pub mod body;
pub mod cache_status;
pub mod cached;
pub mod ctx;
pub mod fail;
pub mod limit;
pub mod pass;
pub mod range;
pub mod request_id;

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::ErrorType;

use crate::cache::CacheStatus;
use crate::connections;
use crate::error::StoaError;
use crate::exchange::Exchange;
use crate::gateway::{Gateway, Route, UNMATCHED_ROUTE};
use crate::lane::{Lane, Why};
use crate::lifecycle::Lifecycle;
use crate::ratelimit::client_addr;
use crate::routes::{normalize_path, upstream_uri, Lookup, PathMode};
use crate::telemetry::{access_log, AccessRecord};

pub use answer::Hit;
pub use ctx::{RequestCtx, Routed};

/// The proxy service: routes each request and answers it from the cache or the upstream.
pub struct StoaProxy {
    gateway: Arc<ArcSwap<Gateway>>,
    lifecycle: Arc<Lifecycle>,
    /// Forwards the pass-through HTTP/2 streams it may take (see [`PassThrough`]).
    pass_through: Option<Arc<dyn PassThrough>>,
}

/// Forwards a pass-through request on its session, answer included, as pingora's proxy
/// would (the front's forwarder, `crate::front::forward`). pingora's proxy hands it the
/// HTTP/2 streams without a body (`request_filter`); the front forwards HTTP/1 itself.
#[async_trait]
pub trait PassThrough: Send + Sync {
    async fn forward(
        &self,
        stoa: &StoaProxy,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()>;
}

impl StoaProxy {
    pub fn new(gateway: Arc<ArcSwap<Gateway>>, lifecycle: Arc<Lifecycle>) -> Self {
        StoaProxy {
            gateway,
            lifecycle,
            pass_through: None,
        }
    }

    /// The same, handing `pass_through` the HTTP/2 pass-through streams it may take.
    pub fn with_pass_through(mut self, pass_through: Option<Arc<dyn PassThrough>>) -> Self {
        self.pass_through = pass_through;
        self
    }

    /// Writes one of stoa's own errors as the answer.
    async fn answer_error(
        &self,
        session: &mut impl Exchange,
        ctx: &RequestCtx,
        err: &StoaError,
    ) -> Result<()> {
        let deco = ctx.decorations(self.lifecycle.is_draining());
        answer::error(session, err, &deco).await
    }
}

/// A request's route by its method and target path and query: normal form of the path,
/// lookup, the path and query sent upstream. `Err` is stoa's answer (400, 404, 405). Made
/// once per request: by the front as it chooses the lane, else by `request_filter`.
pub fn route(
    gateway: &Gateway,
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> std::result::Result<Routed, StoaError> {
    // Routing, the cache key and the upstream path all start from the normal form.
    let path = normalize_path(path, PathMode::Resolve)?;
    let (index, route, captures) = match gateway.routes.lookup(method, &path) {
        Lookup::Found(index, route, captures) => (index, route, captures),
        Lookup::MethodNotAllowed(allow) => {
            return Err(StoaError::MethodNotAllowed {
                method: method.to_string(),
                allow,
            })
        }
        Lookup::NotFound => {
            return Err(StoaError::NoRoute {
                path: path.to_string(),
            })
        }
    };
    let uri = upstream_uri(
        route.upstream().map_or("", |u| u.base_path.as_str()),
        route.spec.rewrite.as_ref(),
        &captures,
        &path,
        query,
    )?;
    Ok(Routed { index, uri })
}

/// The steps every request takes before its route's way of answering: stoa's limits on a
/// head, then its route ([`route`], unless the front looked it up already) and the URI it
/// sends upstream (then [`admit_request`]: admission by an every-request rate limit, the
/// announced body size). `Ok` is the route (borrowed from `gateway`) and the upstream path
/// and query; `Err` the answer.
fn route_request<'g>(
    session: &impl Exchange,
    ctx: &mut RequestCtx,
    gateway: &'g Gateway,
) -> std::result::Result<(&'g Route, String), StoaError> {
    let req = session.req_header();
    if let Some(err) = answer::oversized_head(req) {
        return Err(err);
    }
    let routed = match ctx.routing.take() {
        Some(routed) => routed,
        None => route(gateway, &req.method, req.uri.path(), req.uri.query()),
    }?;
    ctx.route = Some(routed.index);
    let route = gateway
        .routes
        .routes()
        .get(routed.index)
        .ok_or_else(|| StoaError::Internal("route vanished".into()))?;
    Ok((route, routed.uri))
}

/// Admission by the route's every-request rate limit (awaited: a cluster-scope policy asks
/// Redis), then the announced body size.
async fn admit_request(
    req: &RequestHeader,
    peer: Option<IpAddr>,
    ctx: &mut RequestCtx,
    gateway: &Gateway,
    route: &Route,
) -> std::result::Result<(), StoaError> {
    if let Some(limiter) = limit::on_every_request(route) {
        limit::admit_async(&mut ctx.limit, route, limiter, gateway, peer, &req.headers).await?;
    }
    body::announced_within(req, gateway.max_body_bytes)
}

/// What a request's phases decided ([`StoaProxy::serve`]).
pub enum Reply {
    /// The answer is written (stoa's error, a stream, a 304, a range, an aggregate's...).
    Written,
    /// An answer from an entry, whole, for the caller to write.
    Entry(Hit),
    /// A pass-through request, prepared: it goes upstream.
    Upstream,
}

impl StoaProxy {
    /// `request_filter`, but an answer from an entry is left to the caller to write
    /// ([`StoaProxy::write_entry`] writes it through the session).
    pub async fn serve(&self, session: &mut impl Exchange, ctx: &mut RequestCtx) -> Result<Reply> {
        ctx.request_id =
            request_id::for_request(session.req_header(), ctx.gateway.config.server.request_id);
        let req = session.req_header();
        ctx.trace = crate::otel::RequestTrace::start(&req.method, &req.uri, &req.headers);
        let gateway = ctx.gateway.clone();
        let (route, uri) = match route_request(session, ctx, &gateway) {
            Ok(routed) => routed,
            Err(e) => {
                self.answer_error(session, ctx, &e).await?;
                return Ok(Reply::Written);
            }
        };
        let peer = session.peer_ip();
        if let Err(e) = admit_request(session.req_header(), peer, ctx, &gateway, route).await {
            self.answer_error(session, ctx, &e).await?;
            return Ok(Reply::Written);
        }
        if let Some(cached) = &route.cache {
            let hit = cached::serve(session, ctx, &self.lifecycle, route, cached, uri).await?;
            return Ok(hit.map_or(Reply::Written, Reply::Entry));
        }
        if let Err(e) = pass::prepare(ctx, route, &uri).await {
            self.answer_error(session, ctx, &e).await?;
            return Ok(Reply::Written);
        }
        Ok(Reply::Upstream)
    }

    /// Once the request head is read, before any module (pingora's
    /// `early_request_filter`): its connection's head deadline is met; an HTTP/2 request's
    /// cookie fields become one; repeated identical `Content-Length` lines, one.
    pub fn head_read(&self, session: &mut impl Exchange, ctx: &mut RequestCtx) -> Result<()> {
        connections::head_received(session);
        if session.is_http2() {
            ctx.lane = Lane::Proxy(Why::H2);
            // Before anything reads the head: every lane and every fetch sees one field.
            crate::upstream::headers::join_cookies(session.req_header_mut())?;
        }
        crate::upstream::headers::fold_content_length(session.req_header_mut())
    }

    /// Answers a failed request with stoa's error for `e`, if the client is still there and
    /// nothing was written yet (pingora's `fail_to_proxy`); the status, 0 when none.
    pub async fn answer_failure(
        &self,
        session: &mut impl Exchange,
        e: &Error,
        ctx: &RequestCtx,
    ) -> u16 {
        let Some(err) = fail::classify(e, ctx.route(), ctx.gateway.max_body_bytes) else {
            return 0;
        };
        if session.response_written().is_none() {
            let deco = ctx.decorations(true);
            if let Err(write_err) = answer::error(session, &err, &deco).await {
                tracing::debug!("could not send the error response: {write_err}");
            }
        }
        err.status().as_u16()
    }

    /// Writes an answer from an entry through the session.
    pub async fn write_entry(
        &self,
        session: &mut impl Exchange,
        ctx: &RequestCtx,
        hit: &Hit,
    ) -> Result<()> {
        // Read again: the process may have begun draining while this request waited.
        let deco = ctx.decorations(self.lifecycle.is_draining());
        answer::entry(session, hit, &deco).await
    }

    /// What happens when a pass-through answer's head arrives, before it goes on: the
    /// upstream's time is taken, and a write invalidates what it changed
    /// ([`pass::invalidate_after_write`]).
    pub async fn answer_arrived(
        &self,
        session: &Session,
        upstream_response: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) {
        pass::answered(ctx);
        pass::invalidate_after_write(session, upstream_response, ctx).await;
    }

    /// Whether the process is draining (every answer closes its connection).
    pub fn draining(&self) -> bool {
        self.lifecycle.is_draining()
    }

    /// The end of every request, however it ended (pingora's `logging`): the connection
    /// turns idle, the upstream slot is freed, the request is recorded ([`record`]).
    /// `sent`: the status and body bytes of an answer written past the session, if it was.
    pub fn finish_request(
        &self,
        session: &impl Exchange,
        e: Option<&Error>,
        ctx: &mut RequestCtx,
        sent: Option<(u16, u64)>,
    ) {
        connections::request_done(session);
        let (status, body_bytes) = sent.unwrap_or_else(|| {
            (
                session.response_written().map_or(0, |h| h.status.as_u16()),
                session.body_bytes_sent() as u64,
            )
        });
        let req = session.req_header();
        let seen = Seen {
            client: client_of(session, ctx),
            method: req.method.as_str(),
            path: req.uri.path(),
            status,
            body_bytes,
        };
        conclude(ctx, e, &seen);
    }

    /// What a request's record needs of its session, taken before the session gives its
    /// connection up for an answer relayed past it, which is recorded once sent
    /// ([`StoaProxy::record_taken`]); the connection turns idle.
    pub fn take_record(&self, session: &impl Exchange, ctx: &RequestCtx) -> Taken {
        connections::request_done(session);
        let req = session.req_header();
        Taken {
            client: client_of(session, ctx),
            method: req.method.clone(),
            uri: req.uri.clone(),
        }
    }

    /// Records a request whose answer went out with `status` and `body_bytes` of its body
    /// (`e`: why it ended early).
    pub fn record_taken(
        &self,
        taken: &Taken,
        ctx: &mut RequestCtx,
        e: Option<&Error>,
        status: u16,
        body_bytes: u64,
    ) {
        let seen = Seen {
            client: taken.client,
            method: taken.method.as_str(),
            path: taken.uri.path(),
            status,
            body_bytes,
        };
        conclude(ctx, e, &seen);
    }
}

/// Whether a failure is a client's mistake or departure, not an error of stoa's: logged at
/// debug here (the access log has the answer), and not at ERROR by whoever reports it.
pub fn quiet_failure(e: &Error) -> bool {
    let clients = fail::is_clients(e);
    if clients {
        tracing::debug!("request failed on the client's side: {e}");
    }
    clients
}

/// The client the rate limiter sees, behind trusted proxies too.
fn client_of(session: &impl Exchange, ctx: &RequestCtx) -> Option<IpAddr> {
    let headers = &session.req_header().headers;
    session
        .peer_ip()
        .map(|peer| client_addr(peer, headers, &ctx.gateway.trusted_proxies))
}

/// The end of a request's record: its upstream slot freed, its trace finished, and
/// [`record`].
fn conclude(ctx: &mut RequestCtx, e: Option<&Error>, seen: &Seen<'_>) {
    ctx.upstream.permit = None;
    if let Some(trace) = ctx.trace.take() {
        let route = ctx.route().map(|r| r.spec.name.as_str());
        let cache = ctx.cache_status().header_value();
        trace.finish(route, ctx.lane.label(), cache, seen.status);
    }
    record(ctx, e, seen);
}

/// What a request's record needs of its session ([`StoaProxy::take_record`]).
pub struct Taken {
    client: Option<IpAddr>,
    method: http::Method,
    uri: http::Uri,
}

/// What the record of a request says of it besides its context.
pub struct Seen<'a> {
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub body_bytes: u64,
}

/// Records a request: the request and upstream metrics and the access log line.
pub fn record(ctx: &RequestCtx, e: Option<&Error>, seen: &Seen<'_>) {
    let elapsed = ctx.timing.started.elapsed();
    let gateway = &ctx.gateway;
    let status = seen.status;
    if gateway.record_metrics {
        match ctx.route() {
            Some(route) => {
                route
                    .metrics
                    .observe(status, ctx.cache_status(), ctx.lane, elapsed);
                if ctx.cache == CacheStatus::Coalesced {
                    route.metrics.coalesced_waiter();
                }
                pass::count_call(ctx, e, status);
            }
            None => gateway
                .unmatched
                .observe(status, CacheStatus::None, ctx.lane, elapsed),
        }
    }
    if gateway.access_log {
        access_log(&AccessRecord {
            client: seen.client,
            method: seen.method,
            path: seen.path,
            route: ctx
                .route()
                .map_or(UNMATCHED_ROUTE, |r| r.spec.name.as_str()),
            status,
            cache: ctx.cache_status(),
            lane: ctx.lane.label(),
            bytes: seen.body_bytes,
            duration: elapsed,
            upstream_duration: ctx.timing.upstream_elapsed,
            request_id: ctx.request_id.to_str().unwrap_or_default(),
        });
    }
}

#[async_trait]
impl ProxyHttp for StoaProxy {
    type CTX = RequestCtx;

    /// A fresh context per request, holding the configuration it is served with.
    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.lifecycle.track(), self.gateway.load_full())
    }

    /// Runs once the request head is read, before any module: its connection's head
    /// deadline is met; an HTTP/2 request's cookie fields become one.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.head_read(session, ctx)
    }

    /// The front hands pingora's proxy a request with the context it made for it (its
    /// configuration, lane and route; see `crate::front`), as the connection's context.
    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
        prev_ctx: Box<dyn std::any::Any + Send + Sync>,
    ) {
        if let Ok(made) = prev_ctx.downcast::<RequestCtx>() {
            *ctx = *made;
        }
    }

    /// Runs once per request, first of the proxy's phases ([`StoaProxy::serve`], then an
    /// answer from an entry written through the session). Returning `true` means the request
    /// is answered (stoa's own error, or a cached route's answer); `false` sends it upstream
    /// by pingora (pass-through routes).
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match self.serve(session, ctx).await? {
            Reply::Written => Ok(true),
            Reply::Entry(hit) => {
                self.write_entry(session, ctx, &hit).await?;
                Ok(true)
            }
            Reply::Upstream => match &self.pass_through {
                // An HTTP/2 stream without a body: the forwarder takes it, and answers it
                // through the session; pingora's proxy only finishes it.
                Some(pass_through)
                    if session.is_http2() && session.downstream_session.is_body_empty() =>
                {
                    ctx.lane = Lane::Forward;
                    pass_through.forward(self, session, ctx).await?;
                    Ok(true)
                }
                _ => Ok(false),
            },
        }
    }

    /// Runs before connecting upstream (pass-through only): the route's peer.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        pass::peer(ctx)
    }

    /// Runs for each piece of a pass-through request body: counts it against
    /// `max_body_bytes` (over: 413) and tells the connection when the body is in.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > ctx.gateway.max_body_bytes {
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
        }
        if end_of_stream {
            connections::body_received(session);
        }
        Ok(())
    }

    /// Runs before the head goes upstream: the rewritten URI and the forwarding headers.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        pass::upstream_head(session, upstream_request, ctx)
    }

    /// Runs when the upstream's answer head arrives: invalidation after a write, stoa's
    /// headers, and `Connection: close` while draining.
    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.answer_arrived(session, upstream_response, ctx).await;
        let targeted = &ctx.gateway.config.cache.targeted_field;
        crate::upstream::headers::strip_response(upstream_response, targeted);
        let draining = self.lifecycle.is_draining();
        ctx.decorations(draining).apply(upstream_response)?;
        if draining {
            // Shutting down: finish this request, then close the connection.
            session.set_keepalive(None);
        }
        Ok(())
    }

    /// Runs when proxying failed: answers stoa's error for it, if the client is still
    /// there and nothing was written yet. The connection is never reused.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        FailToProxy {
            error_code: self.answer_failure(session, e, ctx).await,
            can_reuse_downstream: false,
        }
    }

    /// A client's mistake or departure is not an error of stoa's: logged at debug (the
    /// access log has the answer), not at ERROR. Returning `true` keeps pingora quiet.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        quiet_failure(e)
    }

    /// Runs last, for every request however it ended: the connection turns idle, the
    /// upstream slot is freed, the request and upstream metrics and the access log line.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        self.finish_request(session, e, ctx, None);
    }
}
