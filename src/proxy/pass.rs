//! Pass-through routes: a slot of the upstream, then pingora proxies to the route's peer;
//! the head sent upstream, invalidation after a successful write, the call's metrics.

use std::sync::Arc;
use std::time::Instant;

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::ErrorType;

use super::ctx::RequestCtx;
use crate::cache::purge::{Invalidation, PurgeWhat};
use crate::cache::tags::group_invalidation;
use crate::error::StoaError;
use crate::exchange::Exchange;
use crate::gateway::Route;
use crate::upstream::headers;
use crate::upstream::link::Link;

/// Takes one of the upstream's slots for the request and keeps the URI to send it to.
/// `Err` is the answer (503 over the upstream's limits, 400 for a URI that cannot be sent).
pub async fn prepare(ctx: &mut RequestCtx, route: &Route, uri: &str) -> Result<(), StoaError> {
    let Some(link) = &route.link else {
        return Err(StoaError::Internal(
            "a pass-through route has no upstream".into(),
        ));
    };
    ctx.upstream.permit = Some(link.acquire().await?);
    let parsed = uri
        .parse::<http::Uri>()
        .map_err(|e| StoaError::BadRequest(format!("cannot build the upstream URI: {e}")))?;
    if !route.spec.invalidates.is_empty() {
        ctx.upstream.path = parsed.path().to_string();
    }
    ctx.upstream.uri = Some(parsed);
    Ok(())
}

/// The route's peer; the upstream call starts now.
pub fn peer(ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
    Ok(Box::new(start_call(ctx)?.peer.clone()))
}

/// The route's link to its upstream (its peer, for the front's forwarder, which borrows
/// it rather than copying it); the upstream call starts now.
pub fn start_call(ctx: &mut RequestCtx) -> Result<Arc<Link>> {
    ctx.timing.upstream_started = Some(Instant::now());
    match ctx.route().and_then(|r| r.link.clone()) {
        Some(link) => Ok(link),
        None => Error::e_explain(ErrorType::InternalError, "no upstream for this route"),
    }
}

/// The upstream's answer head arrived: its time is taken.
pub fn answered(ctx: &mut RequestCtx) {
    if let Some(started) = ctx.timing.upstream_started {
        ctx.timing.upstream_elapsed = Some(started.elapsed());
    }
}

/// The head sent upstream: the rewritten URI and the forwarding headers. Run again for each
/// attempt (pingora's proxy retries with a new copy of the client's head), so the URI is
/// kept for the next one.
pub fn upstream_head(
    session: &Session,
    upstream_request: &mut RequestHeader,
    ctx: &mut RequestCtx,
) -> Result<()> {
    if let Some(uri) = &ctx.upstream.uri {
        upstream_request.set_uri(uri.clone());
    }
    if let Some(trace) = &mut ctx.trace {
        trace.attempt(upstream_request)?;
    }
    let Some(link) = ctx.route().and_then(|r| r.link.as_ref()) else {
        return Error::e_explain(ErrorType::InternalError, "no upstream for this route");
    };
    headers::forward(
        upstream_request,
        link.client().host_header(),
        session.peer_ip(),
        session.over_tls(),
        &ctx.request_id,
    )
}

/// The head [`upstream_head`] makes, and `body`, as the bytes to write upstream
/// ([`headers::forward_wire`]); `None` when pingora's session must write the head: a
/// sampled request (its attempt's span is the upstream's parent), a HEAD (the session reads
/// the answer by the method it wrote), or a target no request line may carry.
pub fn upstream_wire(
    session: &Session,
    ctx: &RequestCtx,
    body: Option<&[u8]>,
) -> Option<bytes::Bytes> {
    let req = session.req_header();
    if ctx.trace.is_some() || req.method == http::Method::HEAD {
        return None;
    }
    let link = ctx.route().and_then(|r| r.link.as_ref())?;
    let target = match &ctx.upstream.uri {
        // As `RequestHeader::set_uri` leaves it to be written.
        Some(uri) => uri
            .path_and_query()
            .map(|p| p.as_str())
            .or_else(|| uri.authority().map(|a| a.as_str()))
            .unwrap_or_default()
            .as_bytes(),
        None => req.raw_path(),
    };
    headers::forward_wire(
        req,
        target,
        link.client().host_header(),
        session.peer_ip(),
        session.over_tls(),
        &ctx.request_id,
        body,
    )
}

/// After a successful write (any method but GET and HEAD), purges the cached answers of
/// the routes it `invalidates` for the same upstream path, on every node, before the
/// write's answer goes to the client: once the client has its answer, no node serves what
/// the write changed, and no fill that read the upstream before it is stored.
pub async fn invalidate_after_write(
    session: &Session,
    response: &ResponseHeader,
    ctx: &RequestCtx,
) {
    let Some(route) = ctx.route() else {
        return;
    };
    let method = &session.req_header().method;
    let write = method != http::Method::GET && method != http::Method::HEAD;
    if !write {
        return;
    }
    // RFC 9875 §3: groups the upstream names on its answer to an unsafe method, for the
    // cached routes of the same upstream (on any answer but an error).
    let groups = group_invalidation(&response.headers);
    if !groups.is_empty() && response.status.as_u16() < 400 {
        invalidate_groups(route, groups, ctx).await;
    }
    if !response.status.is_success() || route.spec.invalidates.is_empty() {
        return;
    }
    let path = &ctx.upstream.path;
    for target in &route.spec.invalidates {
        let inv = Invalidation {
            what: PurgeWhat::Path {
                route: target.clone(),
                path: path.clone(),
            },
            soft: false,
        };
        let report = ctx.gateway.cache.invalidate(inv).await;
        if report.unconfirmed.is_empty() {
            tracing::debug!(route = %target, path = %path, purged = report.purged, "invalidated after a write");
        } else {
            tracing::warn!(route = %target, path = %path, unconfirmed = ?report.unconfirmed, "invalidated after a write; some nodes did not confirm");
        }
    }
}

/// Invalidates `groups` in the cached routes of the route's upstream.
async fn invalidate_groups(route: &Route, groups: Vec<String>, ctx: &RequestCtx) {
    let Some(upstream) = route.spec.upstream.as_ref().map(|u| u.name.as_str()) else {
        return;
    };
    let routes: Vec<String> = ctx
        .gateway
        .routes
        .routes()
        .iter()
        .filter(|r| {
            r.cache.is_some() && r.spec.upstream.as_ref().map(|u| u.name.as_str()) == Some(upstream)
        })
        .map(|r| r.spec.name.clone())
        .collect();
    if routes.is_empty() {
        return;
    }
    let inv = Invalidation {
        what: PurgeWhat::Tags {
            tags: groups,
            routes: Some(routes),
        },
        soft: false,
    };
    let report = ctx.gateway.cache.invalidate(inv).await;
    tracing::debug!(route = %route.spec.name, purged = report.purged, "Cache-Group-Invalidation applied");
}

/// Counts the upstream call of a pass-through request that ended with `e` and `status`.
pub fn count_call(ctx: &RequestCtx, e: Option<&Error>, status: u16) {
    let (Some(started), Some(link)) = (
        ctx.timing.upstream_started,
        ctx.route().and_then(|r| r.link.as_ref()),
    ) else {
        return;
    };
    let took = ctx
        .timing
        .upstream_elapsed
        .unwrap_or_else(|| started.elapsed());
    link.passed(e, status, took);
}
