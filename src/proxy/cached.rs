//! Cached routes, answered entirely from `request_filter`: from memory, from the single
//! flight, or (private requests) from a fetch of their own.

use std::sync::Arc;
use std::time::Instant;

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use super::answer::{Decorations, Hit};
use super::cache_status::{self, BypassWhy};
use super::ctx::RequestCtx;
use super::range::{self, Ranged};
use super::{answer, body, limit};
use crate::cache::control::Validators;
use crate::cache::origin::FetchRequest;
use crate::cache::store::Entry;
use crate::cache::tags::Tags;
use crate::cache::{CacheStatus, CachedRoute, Served};
use crate::config::CacheSettings;
use crate::connections;
use crate::exchange::Exchange;
use crate::gateway::Route;
use crate::lifecycle::Lifecycle;
use crate::upstream::headers::private_fetch_headers;

/// Answers a request on the cached route `route`, sent upstream as `upstream_path`: writes
/// the answer, or leaves an answer from an entry whole to the caller to write (`Some`).
pub async fn serve(
    session: &mut impl Exchange,
    ctx: &mut RequestCtx,
    lifecycle: &Lifecycle,
    route: &Route,
    cached: &Arc<CachedRoute>,
    upstream_path: String,
) -> Result<Option<Hit>> {
    let gateway = ctx.gateway.clone();
    let draining = lifecycle.is_draining();
    // Answers stoa gives before reaching the cache (400, 413, 429) did not use it.
    ctx.cache = CacheStatus::None;
    let body = match body::read_body(session, gateway.max_body_bytes).await? {
        Ok(body) => body,
        Err(e) => return written(answer::error(session, &e, &ctx.decorations(draining)).await),
    };
    connections::body_received(session);
    ctx.body_bytes = body.len() as u64;
    let req = session.req_header();
    let key = match cached.key_for(&req.method, &upstream_path, &body, &req.headers) {
        Ok(key) => key,
        Err(e) => return written(answer::error(session, &e, &ctx.decorations(draining)).await),
    };
    let mut bypass_why = if is_private_request(req, &cached.settings) {
        Some(BypassWhy::PrivateRequest)
    } else if cached.bypasses_for(&body) {
        Some(BypassWhy::UnkeyedBody)
    } else {
        None
    };
    // RFC 9111 §3.5: a request with credentials may have a stored answer the upstream
    // marked for sharing (`public`, `s-maxage`, `must-revalidate`), while it is fresh.
    // Otherwise it goes upstream on its own as before; its answer is never stored.
    let mut shared_hit = None;
    if bypass_why.is_some() && may_share_with_authorization(req, &cached.settings, &body, cached) {
        shared_hit = gateway
            .cache
            .store
            .get(&key)
            .filter(|e| e.shareable_with_authorization && e.is_fresh(Instant::now()));
        if shared_hit.is_some() {
            bypass_why = None;
        }
    }
    let private = bypass_why.is_some();
    // A private request always fetches, so a `misses` policy counts it now; a shared one
    // only when it would lead a flight (`serve_miss` asks). The client is identified only
    // then, so hits cost nothing here.
    let peer = session.peer_ip();
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
            return written(answer::error(session, &e, &ctx.decorations(draining)).await);
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
    let mut from_memory = false;
    let served = if let Some(entry) = shared_hit {
        from_memory = true;
        Served::Entry(entry, CacheStatus::Hit)
    } else if private {
        let mut fetch = FetchRequest {
            method,
            headers: private_fetch_headers(req, peer, session.over_tls(), &ctx.request_id),
            path_and_query: upstream_path,
            body,
            tags: Tags::new(),
        };
        if let Some(trace) = &ctx.trace {
            trace.inject(&mut fetch.headers);
        }
        // Boxed: the slow paths' futures are large and must not bloat every request's.
        Box::pin(gateway.cache.bypass(cached, fetch)).await
    } else {
        // No id upstream when there is none (`server.request_id`).
        let request_id = Some(&ctx.request_id).filter(|id| !id.is_empty());
        let decision = &mut ctx.limit;
        let make_fetch = || {
            cached.shared_fetch(
                method,
                &upstream_path,
                &key,
                &req.headers,
                request_id,
                req.uri.path(),
            )
        };
        // Traces on: the lookup's span, and the request's context for the slow path.
        let trace = ctx.trace.as_ref().map(|t| t.context().clone());
        let lookup = trace.as_ref().and_then(crate::otel::lookup);
        let looked = gateway
            .cache
            .serve_from_memory(cached, &key, make_fetch, asked);
        if let Some(lookup) = lookup {
            crate::otel::end_lookup(lookup, looked.is_ok());
        }
        match looked {
            Ok(served) => {
                from_memory = true;
                served
            }
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
                let miss =
                    gateway
                        .cache
                        .serve_miss(cached, &key, stale, make_fetch, admit, &req.headers);
                Box::pin(crate::otel::within(trace, miss)).await
            }
        }
    };
    // Read again: the process may have begun draining while this request waited.
    let draining = lifecycle.is_draining();
    let status = served_status(&served);
    ctx.cache = status;
    // An answer from memory was looked at `asked`; one from upstream, now.
    let now = if from_memory { asked } else { Instant::now() };
    ctx.cache_status = cache_status::member(&served, from_memory, bypass_why, now);
    let went_upstream = match &served {
        Served::Entry(..) => matches!(
            status,
            CacheStatus::Miss
                | CacheStatus::Bypass
                | CacheStatus::Coalesced
                | CacheStatus::SharedHit
        ),
        Served::Stream(..) => true,
        Served::Error(..) => status != CacheStatus::None,
    };
    if went_upstream {
        ctx.timing.upstream_elapsed = Some(asked.elapsed());
    }
    let deco = ctx.decorations(draining);
    let done = match served {
        Served::Entry(entry, status)
            if answers_not_modified(session.req_header(), &entry, status) =>
        {
            cached.not_modified.inc();
            not_modified(session, &entry, status, &deco, now).await
        }
        Served::Entry(entry, status) => {
            // A request without `Range` pays one header lookup here.
            if session
                .req_header()
                .headers
                .contains_key(http::header::RANGE)
            {
                let ranged = ranged(session.req_header(), &entry, status);
                if ranged != Ranged::Whole {
                    return written(
                        answer::part(session, &entry, status, ranged, &deco, now).await,
                    );
                }
            }
            return Ok(Some(Hit { entry, status, now }));
        }
        Served::Stream(streaming, status) => {
            answer::stream(session, streaming, status, &deco).await
        }
        Served::Error(e, _) => answer::error(session, &e, &deco).await,
    };
    written(done)
}

/// An answer written here: nothing left to the caller.
fn written(done: Result<()>) -> Result<Option<Hit>> {
    done.map(|()| None)
}

/// Whether a client's conditional GET or HEAD is answered `304` from this entry: a 200
/// the cache gave (not a bypass, whose request carried the client's conditions upstream).
/// A request without `If-None-Match` / `If-Modified-Since` costs two header lookups.
fn answers_not_modified(req: &RequestHeader, entry: &Entry, status: CacheStatus) -> bool {
    let headers = &req.headers;
    (headers.contains_key(http::header::IF_NONE_MATCH)
        || headers.contains_key(http::header::IF_MODIFIED_SINCE))
        && (req.method == http::Method::GET || req.method == http::Method::HEAD)
        && status != CacheStatus::Bypass
        && entry.header.status == http::StatusCode::OK
        && Validators::not_modified(entry.validators.as_deref(), headers)
}

/// How a GET with `Range` is answered from this entry (RFC 9110 §14.2): only a 200 the
/// cache gave (a bypass's request carried its `Range` upstream), over the representation
/// the client's `Accept-Encoding` picks.
fn ranged(req: &RequestHeader, entry: &Entry, status: CacheStatus) -> Ranged {
    if req.method != http::Method::GET
        || status == CacheStatus::Bypass
        || entry.header.status != http::StatusCode::OK
    {
        return Ranged::Whole;
    }
    let (stored, body) = entry.pick(req.headers.get(http::header::ACCEPT_ENCODING));
    range::select(&req.headers, &stored.headers, body.len() as u64)
}

/// Writes a `304` for `entry` (RFC 9110 §15.4.5): the fields a 200 would carry that
/// guide caches (from the variant the client's `Accept-Encoding` picks), with `Age` and
/// `X-Cache`; no body, no `Content-Length`.
async fn not_modified(
    session: &mut impl Exchange,
    entry: &Entry,
    status: CacheStatus,
    deco: &Decorations<'_>,
    now: Instant,
) -> Result<()> {
    use http::header;
    let mut head = ResponseHeader::build(http::StatusCode::NOT_MODIFIED, Some(10))?;
    // The head a 200 would have had for this client's `Accept-Encoding`: a compressed
    // variant's weak `ETag` and `Vary`.
    let (stored, _) = entry.pick(session.req_header().headers.get(header::ACCEPT_ENCODING));
    for name in [
        header::ETAG,
        header::DATE,
        header::CACHE_CONTROL,
        header::EXPIRES,
        header::VARY,
        header::CONTENT_LOCATION,
    ] {
        for value in stored.headers.get_all(&name) {
            head.append_header(name.clone(), value.clone())?;
        }
    }
    head.insert_header(header::AGE, entry.age_secs(now))?;
    if let Some(value) = status.header_value() {
        head.insert_header("x-cache", value)?;
    }
    deco.apply(&mut head)?;
    if deco.close {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(head), true).await
}

/// Whether a private request is private only for its `Authorization` (no `Cookie` the key
/// does not cover, no bypassing body), so that a stored answer may serve it.
fn may_share_with_authorization(
    req: &RequestHeader,
    settings: &CacheSettings,
    body: &[u8],
    cached: &CachedRoute,
) -> bool {
    let cookie_keyed_or_absent = !req.headers.contains_key(http::header::COOKIE)
        || settings.keys_on_header(&http::header::COOKIE);
    req.headers.contains_key(http::header::AUTHORIZATION)
        && cookie_keyed_or_absent
        && !cached.bypasses_for(body)
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
