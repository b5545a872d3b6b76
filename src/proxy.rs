//! The pingora `ProxyHttp` implementation: each phase is a short delegation to the
//! routing, cache, rate-limit, metrics and response modules.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};

use crate::cache::{key, CacheStatus, CachedRoute, Served};
use crate::config::{AppliesTo, Mode};
use crate::connections;
use crate::error::StoaError;
use crate::fetch::FetchRequest;
use crate::gateway::{Gateway, Route, UNMATCHED_ROUTE};
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::FetchOutcome;
use crate::ratelimit::{client_key, ClientKey, Decision, RateLimiter, UpstreamPermit};
use crate::respond::{self, Decorations};
use crate::routes::{normalize_path, upstream_uri, Lookup, PathMode};
use crate::telemetry::{access_log, AccessRecord};

/// The proxy service: routes each request and answers it from the cache or the upstream.
pub struct StoaProxy {
    gateway: Arc<ArcSwap<Gateway>>,
    lifecycle: Arc<Lifecycle>,
}

/// Per-request state.
pub struct RequestCtx {
    _in_flight: InFlight,
    started: Instant,
    /// The configuration this request is served with, from start to end.
    gateway: Arc<Gateway>,
    route: Option<usize>,
    upstream_uri: Option<http::Uri>,
    /// The upstream path of a pass-through request, for invalidation after writes.
    upstream_path: String,
    body_bytes: u64,
    request_id: http::HeaderValue,
    cache: CacheStatus,
    rate: Option<Decision>,
    /// Held while a pass-through request uses one of the upstream's slots.
    permit: Option<UpstreamPermit>,
    upstream_started: Option<Instant>,
    upstream_elapsed: Option<Duration>,
}

impl RequestCtx {
    fn route(&self) -> Option<&Route> {
        self.route.and_then(|i| self.gateway.routes.routes().get(i))
    }

    fn decorations(&self, draining: bool) -> Decorations<'_> {
        Decorations {
            request_id: &self.request_id,
            rate: self.rate.as_ref(),
            close: draining,
            cache: self.x_cache(),
        }
    }

    /// How this request used the cache: the `X-Cache` a client sees and the `cache` label of
    /// the request metrics, one value for both. An answer a cached route gives before the
    /// cache is reached (400, 413, 429) bypassed it; other routes have none.
    fn cache_status(&self) -> CacheStatus {
        match self.cache {
            CacheStatus::None if self.route().is_some_and(|r| r.cache.is_some()) => {
                CacheStatus::Bypass
            }
            status => status,
        }
    }

    fn x_cache(&self) -> Option<&'static str> {
        self.cache_status().header_value()
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The content length a request announces, if any.
fn content_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Maps a pingora error to the error stoa answers (the one table lives in [`StoaError`]).
fn classify(e: &pingora::Error, route: Option<&Route>, max_body_bytes: u64) -> Option<StoaError> {
    let upstream_of = |r: &Route| r.upstream().map(|u| u.name.clone());
    let upstream = || route.and_then(upstream_of).unwrap_or_default();
    if let Some(timeout) = connections::body_timed_out(e) {
        return Some(StoaError::RequestTimeout {
            what: "request body",
            timeout_ms: timeout.as_millis(),
        });
    }
    let err = match e.etype() {
        ErrorType::HTTPStatus(413) => StoaError::BodyTooLarge {
            limit: max_body_bytes,
        },
        ErrorType::HTTPStatus(code) if (400..500).contains(code) => {
            StoaError::BadRequest("the request is malformed".into())
        }
        ErrorType::ConnectTimedout => StoaError::UpstreamTimeout {
            upstream: upstream(),
            timeout_ms: route
                .and_then(|r| r.upstream())
                .map_or(0, |u| u.connect_timeout.as_millis()),
        },
        ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            StoaError::UpstreamTimeout {
                upstream: upstream(),
                timeout_ms: route
                    .and_then(|r| r.upstream())
                    .map_or(0, |u| u.timeout.as_millis()),
            }
        }
        ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::BindError
        | ErrorType::SocketError => StoaError::UpstreamUnreachable {
            upstream: upstream(),
            detail: e.etype().as_str().to_string(),
        },
        _ => match e.esource() {
            ErrorSource::Upstream => StoaError::UpstreamFailed {
                upstream: upstream(),
                detail: e.etype().as_str().to_string(),
            },
            // The client is gone: nobody to answer.
            ErrorSource::Downstream if respond::client_gone(e) => return None,
            // What pingora finds wrong while reading a request body is its framing.
            ErrorSource::Downstream => respond::malformed_body(),
            ErrorSource::Internal | ErrorSource::Unset => StoaError::Internal(e.to_string()),
        },
    };
    Some(err)
}

/// Counts one request of `client` against the route's policy, keeping the decision (its
/// headers go on the answer). `Err` carries the 429 to answer.
fn check_limit(
    rate: &mut Option<Decision>,
    route: &Route,
    limiter: &RateLimiter,
    client: &ClientKey,
) -> std::result::Result<(), StoaError> {
    let policy = limiter.settings();
    let decision = limiter.check(client);
    if decision.over_limit {
        if let Some(counter) = &route.rate_limited {
            counter.inc();
        }
        if policy.mode == Mode::DryRun {
            tracing::info!(route = %route.spec.name, policy = %policy.name, client = ?client, "rate limit exceeded (dry run)");
        }
    }
    let refused = !decision.allowed;
    let retry_after_secs = decision.retry_after_secs.unwrap_or(1);
    *rate = Some(decision);
    if refused {
        return Err(StoaError::RateLimited {
            policy: policy.name.clone(),
            retry_after_secs,
        });
    }
    Ok(())
}

impl StoaProxy {
    pub fn new(gateway: Arc<ArcSwap<Gateway>>, lifecycle: Arc<Lifecycle>) -> Self {
        StoaProxy { gateway, lifecycle }
    }

    /// Applies the route's rate-limit policy to every request (a "misses" policy on a
    /// cached route is applied in `serve_cached` instead). `Err` carries the 429 to answer.
    fn rate_limit(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        route: &Route,
    ) -> std::result::Result<(), StoaError> {
        let Some(limiter) = &route.limiter else {
            return Ok(());
        };
        let policy = limiter.settings();
        let key = client_key(
            client_ip(session),
            &session.req_header().headers,
            &policy.client,
            &ctx.gateway.trusted_proxies,
        );
        check_limit(&mut ctx.rate, route, limiter, &key)
    }

    /// Answers a request on a cached route entirely from `request_filter`: from memory,
    /// from the single flight, or (private requests) from a direct fetch.
    async fn serve_cached(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &Route,
        cached: &Arc<CachedRoute>,
        upstream_path: String,
        limit_misses: bool,
    ) -> Result<()> {
        let gateway = ctx.gateway.clone();
        let draining = self.lifecycle.is_draining();
        // Answers stoa gives before reaching the cache (400, 413, 429) did not use it.
        ctx.cache = CacheStatus::None;
        let body = match respond::read_body(session, gateway.max_body_bytes).await? {
            Ok(body) => body,
            Err(e) => return respond::error(session, &e, &ctx.decorations(draining)).await,
        };
        connections::body_received(session);
        ctx.body_bytes = body.len() as u64;
        let req = session.req_header();
        let settings = &cached.settings;
        let key = match cached.key_for(&req.method, &upstream_path, &body, &req.headers) {
            Ok(key) => key,
            Err(e) => return respond::error(session, &e, &ctx.decorations(draining)).await,
        };
        // Credentials the key does not cover, or (if the route says so) a body it ignores,
        // keep this request's answer to itself.
        let private = respond::is_private_request(req, settings) || cached.bypasses_for(&body);
        // A "misses" policy counts only requests that would start an upstream fetch: a
        // private one here (it always goes upstream), a shared one when it would lead a
        // flight (`serve_miss` asks). Hits, stale answers and the waiters of a flight in
        // progress are never counted; the client is identified only when asked, so hits
        // cost nothing here.
        let peer = client_ip(session);
        let miss_limit = route.limiter.as_deref().filter(|_| limit_misses);
        let admit = |rate: &mut Option<Decision>, headers: &http::HeaderMap| match miss_limit {
            Some(limiter) => {
                let policy = limiter.settings();
                let client = client_key(peer, headers, &policy.client, &gateway.trusted_proxies);
                check_limit(rate, route, limiter, &client)
            }
            None => Ok(()),
        };
        if private {
            if let Err(e) = admit(&mut ctx.rate, &req.headers) {
                return respond::error(session, &e, &ctx.decorations(draining)).await;
            }
        }
        let req = session.req_header();
        let method = if req.method == http::Method::HEAD {
            http::Method::GET
        } else {
            req.method.clone()
        };
        let asked = Instant::now();
        let served = if private {
            let fetch = FetchRequest {
                method,
                headers: respond::private_fetch_headers(req, client_ip(session), &ctx.request_id),
                path_and_query: upstream_path,
                body,
            };
            // Boxed: the slow paths' futures are large and must not bloat every request's.
            Box::pin(gateway.cache.bypass(cached, fetch)).await
        } else {
            let request_id = &ctx.request_id;
            let rate = &mut ctx.rate;
            let make_fetch = || {
                cached.shared_fetch(method, &upstream_path, &key, &req.headers, Some(request_id))
            };
            match gateway.cache.serve_from_memory(cached, &key, make_fetch) {
                Ok(served) => served,
                Err((make_fetch, stale)) => {
                    let admit = || admit(rate, &req.headers);
                    Box::pin(
                        gateway
                            .cache
                            .serve_miss(cached, &key, stale, make_fetch, admit),
                    )
                    .await
                }
            }
        };
        // Read again: the process may have begun draining while this request waited.
        let draining = self.lifecycle.is_draining();
        match served {
            Served::Entry(entry, status) => {
                ctx.cache = status;
                if matches!(
                    status,
                    CacheStatus::Miss | CacheStatus::Bypass | CacheStatus::Coalesced
                ) {
                    ctx.upstream_elapsed = Some(asked.elapsed());
                }
                respond::entry(session, &entry, status, &ctx.decorations(draining)).await
            }
            Served::Stream(streaming, status) => {
                ctx.cache = status;
                ctx.upstream_elapsed = Some(asked.elapsed());
                respond::stream(session, streaming, status, &ctx.decorations(draining)).await
            }
            Served::Error(e, status) => {
                ctx.cache = status;
                if status != CacheStatus::None {
                    ctx.upstream_elapsed = Some(asked.elapsed());
                }
                respond::error(session, &e, &ctx.decorations(draining)).await
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for StoaProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_flight: self.lifecycle.track(),
            started: Instant::now(),
            gateway: self.gateway.load_full(),
            route: None,
            upstream_uri: None,
            upstream_path: String::new(),
            body_bytes: 0,
            request_id: http::HeaderValue::from_static(""),
            cache: CacheStatus::None,
            rate: None,
            permit: None,
            upstream_started: None,
            upstream_elapsed: None,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        connections::head_received(session);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let gateway = ctx.gateway.clone();
        let draining = self.lifecycle.is_draining();
        ctx.request_id = respond::request_id(session.req_header());
        if let Some(err) = respond::oversized_head(session.req_header()) {
            respond::error(session, &err, &ctx.decorations(draining)).await?;
            return Ok(true);
        }
        let req = session.req_header();
        // Routing, the cache key and the upstream path all start from the normal form.
        let path = match normalize_path(req.uri.path(), PathMode::Resolve) {
            Ok(path) => path,
            Err(e) => {
                respond::error(session, &StoaError::from(e), &ctx.decorations(draining)).await?;
                return Ok(true);
            }
        };
        let (index, route, captures) = match gateway.routes.lookup(&req.method, &path) {
            Lookup::Found(index, route, captures) => (index, route, captures),
            Lookup::MethodNotAllowed(allow) => {
                let err = StoaError::MethodNotAllowed {
                    method: req.method.to_string(),
                    allow,
                };
                respond::error(session, &err, &ctx.decorations(draining)).await?;
                return Ok(true);
            }
            Lookup::NotFound => {
                let err = StoaError::NoRoute {
                    path: path.to_string(),
                };
                respond::error(session, &err, &ctx.decorations(draining)).await?;
                return Ok(true);
            }
        };
        ctx.route = Some(index);
        let announced = content_length(req);
        let uri = upstream_uri(
            route.upstream().map_or("", |u| u.base_path.as_str()),
            route.spec.rewrite.as_ref(),
            &captures,
            &path,
            req.uri.query(),
        );
        let uri = match uri {
            Ok(uri) => uri,
            Err(e) => {
                respond::error(session, &StoaError::from(e), &ctx.decorations(draining)).await?;
                return Ok(true);
            }
        };
        // The same route, borrowed from the configuration rather than the request.
        let Some(route) = gateway.routes.routes().get(index) else {
            return Error::e_explain(ErrorType::InternalError, "route vanished");
        };
        // The rate limit comes first, so that every answer of a limited route (413 too)
        // carries its state; only a "misses" policy on a cached route must wait for the key.
        let limited_later = route.cache.is_some()
            && route
                .limiter
                .as_ref()
                .is_some_and(|l| l.settings().applies_to == AppliesTo::Misses);
        if !limited_later {
            if let Err(e) = self.rate_limit(session, ctx, route) {
                respond::error(session, &e, &ctx.decorations(draining)).await?;
                return Ok(true);
            }
        }
        if announced.is_some_and(|n| n > gateway.max_body_bytes) {
            let err = StoaError::BodyTooLarge {
                limit: gateway.max_body_bytes,
            };
            respond::error(session, &err, &ctx.decorations(draining)).await?;
            return Ok(true);
        }
        if let Some(cached) = route.cache.clone() {
            self.serve_cached(session, ctx, route, &cached, uri, limited_later)
                .await?;
            return Ok(true);
        }

        // Pass-through: a slot of the upstream, then pingora proxies.
        let (Some(guard), Some(upstream)) = (&route.guard, route.upstream()) else {
            return Error::e_explain(
                ErrorType::InternalError,
                "a pass-through route has no upstream",
            );
        };
        match guard.acquire().await {
            Ok(permit) => ctx.permit = Some(permit),
            Err(o) => {
                let err = StoaError::Overloaded {
                    upstream: upstream.name.clone(),
                    retry_after_secs: o.retry_after_secs,
                };
                respond::error(session, &err, &ctx.decorations(draining)).await?;
                return Ok(true);
            }
        }
        let parsed = match uri.parse::<http::Uri>() {
            Ok(parsed) => parsed,
            Err(e) => {
                let err = StoaError::BadRequest(format!("cannot build the upstream URI: {e}"));
                respond::error(session, &err, &ctx.decorations(draining)).await?;
                return Ok(true);
            }
        };
        if !route.spec.invalidates.is_empty() {
            ctx.upstream_path = parsed.path().to_string();
        }
        ctx.upstream_uri = Some(parsed);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.upstream_started = Some(Instant::now());
        match ctx.route().and_then(|r| r.peer.as_ref()) {
            Some(peer) => Ok(Box::new(peer.clone())),
            None => Error::e_explain(ErrorType::InternalError, "no upstream for this route"),
        }
    }

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

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(uri) = ctx.upstream_uri.take() {
            upstream_request.set_uri(uri);
        }
        let Some(upstream) = ctx.route().and_then(|r| r.upstream()) else {
            return Error::e_explain(ErrorType::InternalError, "no upstream for this route");
        };
        upstream_request.insert_header(http::header::HOST, upstream.host_header.as_str())?;
        if let Some(ip) = client_ip(session) {
            let forwarded =
                respond::forwarded_for(upstream_request.headers.get("x-forwarded-for"), ip);
            upstream_request.insert_header("x-forwarded-for", forwarded)?;
        }
        upstream_request.insert_header("x-forwarded-proto", "http")?;
        upstream_request.insert_header("x-request-id", ctx.request_id.clone())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(started) = ctx.upstream_started {
            ctx.upstream_elapsed = Some(started.elapsed());
        }
        if let Some(route) = ctx.route() {
            let method = &session.req_header().method;
            let write = method != http::Method::GET && method != http::Method::HEAD;
            if write && upstream_response.status.is_success() {
                for target in &route.spec.invalidates {
                    let purged = ctx.gateway.cache.purge(|k| {
                        key::route_of(k) == target && key::path_of(k) == ctx.upstream_path
                    });
                    tracing::debug!(route = %target, path = %ctx.upstream_path, purged, "invalidated after a write");
                }
            }
        }
        let draining = self.lifecycle.is_draining();
        ctx.decorations(draining).apply(upstream_response)?;
        if draining {
            // Shutting down: finish this request, then close the connection.
            session.set_keepalive(None);
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let Some(err) = classify(e, ctx.route(), ctx.gateway.max_body_bytes) else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let code = err.status().as_u16();
        if session.response_written().is_none() {
            let deco = ctx.decorations(true);
            if let Err(write_err) = respond::error(session, &err, &deco).await {
                tracing::debug!("could not send the error response: {write_err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A client's mistake or departure is not an error of stoa's: logged at debug (the
    /// access log has the answer), not at ERROR.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        let client = *e.esource() == ErrorSource::Downstream
            || matches!(e.etype(), ErrorType::HTTPStatus(code) if (400..500).contains(code));
        if client {
            tracing::debug!("request failed on the client's side: {e}");
        }
        client
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        connections::request_done(session);
        ctx.permit = None;
        let gateway = &ctx.gateway;
        let status = session.response_written().map_or(0, |h| h.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let route = ctx.route();
        if gateway.record_metrics {
            match route {
                Some(route) => {
                    route.metrics.observe(status, ctx.cache_status(), elapsed);
                    if ctx.cache == CacheStatus::Coalesced {
                        route.metrics.coalesced_waiter();
                    }
                    if let Some(started) = ctx.upstream_started {
                        let outcome = match e.map(|e| e.etype()) {
                            // The upstream's own 5xx is an error, as on cached routes.
                            None if status >= 500 => FetchOutcome::Error,
                            None => FetchOutcome::Ok,
                            Some(ErrorType::ConnectTimedout)
                            | Some(ErrorType::ReadTimedout)
                            | Some(ErrorType::WriteTimedout) => FetchOutcome::Timeout,
                            Some(_) => FetchOutcome::Error,
                        };
                        let took = ctx.upstream_elapsed.unwrap_or_else(|| started.elapsed());
                        if let Some(m) = &route.upstream_metrics {
                            m.fetch(outcome, took);
                        }
                    }
                }
                None => gateway
                    .unmatched
                    .observe(status, CacheStatus::None, elapsed),
            }
        }
        if gateway.access_log {
            let req = session.req_header();
            access_log(&AccessRecord {
                client: client_ip(session),
                method: req.method.as_str(),
                path: req.uri.path(),
                route: route.map_or(UNMATCHED_ROUTE, |r| r.spec.name.as_str()),
                status,
                cache: ctx.cache_status(),
                bytes: session.body_bytes_sent() as u64,
                duration: elapsed,
                upstream_duration: ctx.upstream_elapsed,
                request_id: ctx.request_id.to_str().unwrap_or_default(),
            });
        }
    }
}
