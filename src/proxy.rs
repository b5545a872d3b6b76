//! The pingora `ProxyHttp` implementation: each phase is a short delegation to the
//! routing, gateway and error modules.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};

use crate::cache::settings::CacheSettings;
use crate::cache::store::Entry;
use crate::cache::{key, CacheStatus, CachedRoute, Served};
use crate::error::StoaError;
use crate::fetch::FetchRequest;
use crate::gateway::{Gateway, Route};
use crate::lifecycle::{InFlight, Lifecycle};
use crate::routes::{upstream_uri, Lookup};

/// The proxy service: routes each request and forwards it to its upstream.
pub struct StoaProxy {
    gateway: Arc<ArcSwap<Gateway>>,
    lifecycle: Arc<Lifecycle>,
}

impl StoaProxy {
    pub fn new(gateway: Arc<ArcSwap<Gateway>>, lifecycle: Arc<Lifecycle>) -> Self {
        StoaProxy { gateway, lifecycle }
    }

    /// Answers a request on a cached route entirely from `request_filter`: from memory,
    /// from the single flight, or (private requests) from a direct fetch.
    async fn serve_cached(
        &self,
        session: &mut Session,
        gateway: &Gateway,
        cached: &Arc<CachedRoute>,
        upstream_path: String,
    ) -> Result<()> {
        let body = match read_body(session, gateway.max_body_bytes).await? {
            Ok(body) => body,
            Err(e) => return respond_error(session, &e).await,
        };
        let req = session.req_header();
        let settings = &cached.settings;
        let (path, query) = match upstream_path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (upstream_path.as_str(), None),
        };
        let key = key::derive(
            &key::KeyParts {
                route: &cached.name,
                method: &req.method,
                path,
                query,
                body: &body,
                headers: &req.headers,
            },
            &settings.key_query,
            &settings.key_body,
            &settings.key_headers,
        );
        let key = match key {
            Ok(key) => key,
            Err(e) => return respond_error(session, &e).await,
        };
        let method = if req.method == http::Method::HEAD {
            http::Method::GET
        } else {
            req.method.clone()
        };
        let served = if is_private_request(req, settings) {
            let client = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            let fetch = FetchRequest {
                method,
                headers: private_fetch_headers(req, client),
                path_and_query: upstream_path,
                body,
            };
            gateway.cache.bypass(cached, fetch).await
        } else {
            let make_fetch = || FetchRequest {
                method,
                headers: shared_fetch_headers(req, settings),
                path_and_query: upstream_path.clone(),
                body,
            };
            gateway.cache.serve(cached, &key, make_fetch).await
        };
        match served {
            Served::Entry(entry, status) => {
                respond_entry(session, &entry, status, self.lifecycle.is_draining()).await
            }
            Served::Error(e) => respond_error(session, &e).await,
        }
    }
}

/// Per-request state.
pub struct RequestCtx {
    _in_flight: InFlight,
    /// The configuration this request is served with, from start to end.
    gateway: Arc<Gateway>,
    route: Option<usize>,
    upstream_uri: Option<http::Uri>,
    body_bytes: u64,
}

impl RequestCtx {
    fn route(&self) -> Option<&Route> {
        self.route.and_then(|i| self.gateway.routes.routes().get(i))
    }
}

/// Writes one of stoa's own JSON errors. The connection is only kept if the request body
/// was fully read, so an unread body can never be mistaken for the next request.
async fn respond_error(session: &mut Session, error: &StoaError) -> Result<()> {
    let body = error.body();
    let mut header = ResponseHeader::build(error.status(), Some(4))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("cache-control", "no-store")?;
    if let Some((name, value)) = error.extra_header() {
        header.insert_header(name, value)?;
    }
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// Writes a cached (or fetched) answer from memory, with `X-Cache` and `Age`.
async fn respond_entry(
    session: &mut Session,
    entry: &Entry,
    status: CacheStatus,
    draining: bool,
) -> Result<()> {
    let head_only = session.req_header().method == http::Method::HEAD;
    let mut header = entry.header.clone();
    if let Some(value) = status.header_value() {
        header.insert_header("x-cache", value)?;
    }
    header.insert_header("age", entry.age_secs(std::time::Instant::now()))?;
    if draining {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(entry.body.clone()), true)
            .await?;
    }
    Ok(())
}

/// Reads the whole request body, or says it is over `limit`.
async fn read_body(
    session: &mut Session,
    limit: u64,
) -> Result<std::result::Result<Bytes, StoaError>> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Ok(Err(StoaError::BodyTooLarge { limit }));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body.freeze()))
}

/// Request headers that must not be forwarded as they are.
fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Headers for a fetch whose answer may be shared: only what the answer may depend on
/// and the key covers, never credentials (unless keyed) nor Accept-Encoding (so the stored
/// body is the identity encoding every client can read).
fn shared_fetch_headers(req: &RequestHeader, settings: &CacheSettings) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    let always = [http::header::CONTENT_TYPE, http::header::ACCEPT];
    for name in always.iter().chain(settings.key_headers.iter()) {
        for value in req.headers.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// Headers for a fetch made for one client only: everything end-to-end, plus forwarding.
fn private_fetch_headers(req: &RequestHeader, client: Option<std::net::IpAddr>) -> http::HeaderMap {
    let mut headers = http::HeaderMap::with_capacity(req.headers.len() + 2);
    for (name, value) in req.headers.iter() {
        if !is_hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(ip) = client {
        let forwarded = forwarded_for(headers.get("x-forwarded-for"), ip);
        if let Ok(v) = http::HeaderValue::from_str(&forwarded) {
            headers.insert("x-forwarded-for", v);
        }
    }
    headers.insert("x-forwarded-proto", http::HeaderValue::from_static("http"));
    headers
}

/// The `X-Forwarded-For` value with `ip` appended to what a client sent.
fn forwarded_for(prior: Option<&http::HeaderValue>, ip: std::net::IpAddr) -> String {
    match prior.and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip.to_string(),
    }
}

/// A request carrying credentials the key does not cover must not share answers.
fn is_private_request(req: &RequestHeader, settings: &CacheSettings) -> bool {
    [http::header::AUTHORIZATION, http::header::COOKIE]
        .iter()
        .any(|h| req.headers.contains_key(h) && !settings.keys_on_header(h))
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
    let upstream = || route.map(|r| r.upstream().name.clone()).unwrap_or_default();
    let err = match e.etype() {
        ErrorType::HTTPStatus(413) => StoaError::BodyTooLarge {
            limit: max_body_bytes,
        },
        ErrorType::HTTPStatus(code) if (400..500).contains(code) => {
            StoaError::BadRequest(e.to_string())
        }
        ErrorType::ConnectTimedout => StoaError::UpstreamTimeout {
            upstream: upstream(),
            timeout_ms: route.map_or(0, |r| r.upstream().connect_timeout.as_millis()),
        },
        ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            StoaError::UpstreamTimeout {
                upstream: upstream(),
                timeout_ms: route.map_or(0, |r| r.upstream().timeout.as_millis()),
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
            ErrorSource::Downstream => match e.etype() {
                // The client is gone: nobody to answer.
                ErrorType::ReadError
                | ErrorType::WriteError
                | ErrorType::ConnectionClosed
                | ErrorType::ReadTimedout
                | ErrorType::WriteTimedout => return None,
                _ => StoaError::BadRequest(e.etype().as_str().to_string()),
            },
            ErrorSource::Internal | ErrorSource::Unset => StoaError::Internal(e.to_string()),
        },
    };
    Some(err)
}

#[async_trait]
impl ProxyHttp for StoaProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_flight: self.lifecycle.track(),
            gateway: self.gateway.load_full(),
            route: None,
            upstream_uri: None,
            body_bytes: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let gateway = ctx.gateway.clone();
        let req = session.req_header();
        let path = req.uri.path();
        let (index, route, captures) = match gateway.routes.lookup(&req.method, path) {
            Lookup::Found(index, route, captures) => (index, route, captures),
            Lookup::MethodNotAllowed(allow) => {
                let err = StoaError::MethodNotAllowed {
                    method: req.method.to_string(),
                    allow,
                };
                respond_error(session, &err).await?;
                return Ok(true);
            }
            Lookup::NotFound => {
                let err = StoaError::NoRoute {
                    path: path.to_string(),
                };
                respond_error(session, &err).await?;
                return Ok(true);
            }
        };
        if content_length(req).is_some_and(|n| n > gateway.max_body_bytes) {
            let err = StoaError::BodyTooLarge {
                limit: gateway.max_body_bytes,
            };
            respond_error(session, &err).await?;
            return Ok(true);
        }
        let uri = upstream_uri(
            &route.upstream().base_path,
            route.spec.rewrite.as_ref(),
            &captures,
            path,
            req.uri.query(),
        );
        ctx.route = Some(index);
        if let Some(cached) = route.cache.clone() {
            self.serve_cached(session, &gateway, &cached, uri).await?;
            return Ok(true);
        }
        let uri = match uri.parse::<http::Uri>() {
            Ok(uri) => uri,
            Err(e) => {
                let err = StoaError::BadRequest(format!("cannot build the upstream URI: {e}"));
                respond_error(session, &err).await?;
                return Ok(true);
            }
        };
        ctx.upstream_uri = Some(uri);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        match ctx.route() {
            Some(route) => Ok(Box::new(route.peer.clone())),
            None => Error::e_explain(ErrorType::InternalError, "no route selected"),
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > ctx.gateway.max_body_bytes {
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
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
        let Some(route) = ctx.route() else {
            return Error::e_explain(ErrorType::InternalError, "no route selected");
        };
        upstream_request
            .insert_header(http::header::HOST, route.upstream().host_header.as_str())?;
        if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
            let forwarded =
                forwarded_for(upstream_request.headers.get("x-forwarded-for"), client.ip());
            upstream_request.insert_header("x-forwarded-for", forwarded)?;
        }
        upstream_request.insert_header("x-forwarded-proto", "http")?;
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if self.lifecycle.is_draining() {
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
            if let Err(write_err) = respond_error(session, &err).await {
                tracing::debug!("could not send the error response: {write_err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}
