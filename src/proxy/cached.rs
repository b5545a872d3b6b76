//! Cached routes, answered entirely from `request_filter`: from memory, from the single
//! flight, or (private requests) from a fetch of their own.

use std::sync::Arc;
use std::time::Instant;

use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

use super::ctx::RequestCtx;
use super::{answer, body, limit, peer_addr};
use crate::cache::origin::FetchRequest;
use crate::cache::{CacheStatus, CachedRoute, Served};
use crate::config::CacheSettings;
use crate::connections;
use crate::gateway::Route;
use crate::lifecycle::Lifecycle;
use crate::upstream::headers::private_fetch_headers;

/// Answers a request on the cached route `route`, sent upstream as `upstream_path`.
pub async fn serve(
    session: &mut Session,
    ctx: &mut RequestCtx,
    lifecycle: &Lifecycle,
    route: &Route,
    cached: &Arc<CachedRoute>,
    upstream_path: String,
) -> Result<()> {
    let gateway = ctx.gateway.clone();
    let draining = lifecycle.is_draining();
    // Answers stoa gives before reaching the cache (400, 413, 429) did not use it.
    ctx.cache = CacheStatus::None;
    let body = match body::read_body(session, gateway.max_body_bytes).await? {
        Ok(body) => body,
        Err(e) => return answer::error(session, &e, &ctx.decorations(draining)).await,
    };
    connections::body_received(session);
    ctx.body_bytes = body.len() as u64;
    let req = session.req_header();
    let key = match cached.key_for(&req.method, &upstream_path, &body, &req.headers) {
        Ok(key) => key,
        Err(e) => return answer::error(session, &e, &ctx.decorations(draining)).await,
    };
    let private = is_private_request(req, &cached.settings) || cached.bypasses_for(&body);
    // A private request always fetches, so a `misses` policy counts it now; a shared one
    // only when it would lead a flight (`serve_miss` asks). The client is identified only
    // then, so hits cost nothing here.
    let peer = peer_addr(session);
    let miss_limit = limit::on_misses(route);
    let admit = |decision: &mut _, headers: &http::HeaderMap| match miss_limit {
        Some(limiter) => limit::admit(
            decision,
            route,
            limiter,
            peer,
            headers,
            &gateway.trusted_proxies,
        ),
        None => Ok(()),
    };
    if private {
        let admitted = match miss_limit {
            Some(limiter) => {
                limit::admit_async(&mut ctx.limit, route, limiter, &gateway, peer, &req.headers)
                    .await
            }
            None => Ok(()),
        };
        if let Err(e) = admitted {
            return answer::error(session, &e, &ctx.decorations(draining)).await;
        }
    }
    let req = session.req_header();
    // A HEAD is answered from the GET's answer.
    let method = if req.method == http::Method::HEAD {
        http::Method::GET
    } else {
        req.method.clone()
    };
    let asked = Instant::now();
    let served = if private {
        let fetch = FetchRequest {
            method,
            headers: private_fetch_headers(req, peer, &ctx.request_id),
            path_and_query: upstream_path,
            body,
        };
        // Boxed: the slow paths' futures are large and must not bloat every request's.
        Box::pin(gateway.cache.bypass(cached, fetch)).await
    } else {
        let request_id = &ctx.request_id;
        let decision = &mut ctx.limit;
        let make_fetch =
            || cached.shared_fetch(method, &upstream_path, &key, &req.headers, Some(request_id));
        match gateway.cache.serve_from_memory(cached, &key, make_fetch) {
            Ok(served) => served,
            Err((make_fetch, stale)) => {
                // A cluster-scope policy is asked now, before the flight (see `limit`).
                let shared = miss_limit.filter(|l| limit::shared_by(l, &gateway).is_some());
                let early = match shared {
                    Some(limiter) => Some(
                        limit::admit_async(decision, route, limiter, &gateway, peer, &req.headers)
                            .await,
                    ),
                    None => None,
                };
                let admit = || match early {
                    Some(checked) => checked,
                    None => admit(decision, &req.headers),
                };
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
    let draining = lifecycle.is_draining();
    let status = served_status(&served);
    ctx.cache = status;
    let went_upstream = match &served {
        Served::Entry(..) => matches!(
            status,
            CacheStatus::Miss | CacheStatus::Bypass | CacheStatus::Coalesced
        ),
        Served::Stream(..) => true,
        Served::Error(..) => status != CacheStatus::None,
    };
    if went_upstream {
        ctx.timing.upstream_elapsed = Some(asked.elapsed());
    }
    let deco = ctx.decorations(draining);
    match served {
        Served::Entry(entry, status) => answer::entry(session, &entry, status, &deco).await,
        Served::Stream(streaming, status) => {
            answer::stream(session, streaming, status, &deco).await
        }
        Served::Error(e, _) => answer::error(session, &e, &deco).await,
    }
}

fn served_status(served: &Served) -> CacheStatus {
    match served {
        Served::Entry(_, status) | Served::Stream(_, status) | Served::Error(_, status) => *status,
    }
}

/// Whether a request's answer must stay its own: it carries credentials (`Authorization`,
/// `Cookie`) the route's key does not cover.
pub fn is_private_request(req: &RequestHeader, settings: &CacheSettings) -> bool {
    [http::header::AUTHORIZATION, http::header::COOKIE]
        .iter()
        .any(|h| req.headers.contains_key(h) && !settings.keys_on_header(h))
}
