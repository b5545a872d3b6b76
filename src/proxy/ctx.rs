//! The per-request context, grouped by concern: timing, route, cache, limit, upstream, lane.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::CacheStatus;
use crate::gateway::{Gateway, Route};
use crate::lifecycle::InFlight;
use crate::ratelimit::{Decision, UpstreamPermit};

use super::answer::Decorations;
use crate::error::StoaError;
use crate::lane::{Lane, Why};

/// Per-request state.
pub struct RequestCtx {
    _in_flight: InFlight,
    /// The configuration this request is served with, from start to end.
    pub gateway: Arc<Gateway>,
    pub request_id: http::HeaderValue,
    pub timing: Timing,
    /// The matched route's index in the gateway's table.
    pub route: Option<usize>,
    /// Request body bytes received so far.
    pub body_bytes: u64,
    /// How the request used the cache (see [`RequestCtx::cache_status`]).
    pub cache: CacheStatus,
    /// The `Cache-Status` member of an answer the cache engine gave (see
    /// [`super::cache_status`]).
    pub cache_status: Option<http::HeaderValue>,
    /// The rate-limit decision, whose headers go on every answer.
    pub limit: Option<Decision>,
    pub upstream: Upstream,
    /// Which code answers the request (chosen by the front; pingora's proxy for a request
    /// the front did not see).
    pub lane: Lane,
    /// The route lookup, when it was made before `request_filter` (by the front, to choose
    /// the lane): taken by `request_filter`, which looks the route up itself otherwise.
    pub routing: Option<Result<Routed, StoaError>>,
    /// The request's span (traces on only).
    pub trace: Option<crate::otel::RequestTrace>,
}

/// A request's route: its index in the gateway's table and the path and query sent
/// upstream.
#[derive(Debug)]
pub struct Routed {
    pub index: usize,
    pub uri: String,
}

/// When the request and its upstream call started, and how long the upstream took.
pub struct Timing {
    pub started: Instant,
    /// Set when a pass-through request asks for its peer.
    pub upstream_started: Option<Instant>,
    pub upstream_elapsed: Option<Duration>,
}

/// A pass-through request's call upstream.
#[derive(Default)]
pub struct Upstream {
    /// The URI sent upstream, taken when the upstream request is written.
    pub uri: Option<http::Uri>,
    /// The upstream path, kept for invalidation after writes.
    pub path: String,
    /// Held while the request uses one of the upstream's slots.
    pub permit: Option<UpstreamPermit>,
}

impl RequestCtx {
    pub fn new(in_flight: InFlight, gateway: Arc<Gateway>) -> Self {
        RequestCtx {
            _in_flight: in_flight,
            gateway,
            request_id: http::HeaderValue::from_static(""),
            timing: Timing {
                started: Instant::now(),
                upstream_started: None,
                upstream_elapsed: None,
            },
            route: None,
            body_bytes: 0,
            cache: CacheStatus::None,
            cache_status: None,
            limit: None,
            upstream: Upstream::default(),
            lane: Lane::Proxy(Why::Off),
            routing: None,
            trace: None,
        }
    }

    pub fn route(&self) -> Option<&Route> {
        self.route.and_then(|i| self.gateway.routes.routes().get(i))
    }

    pub fn decorations(&self, draining: bool) -> Decorations<'_> {
        Decorations {
            request_id: &self.request_id,
            rate: self.limit.as_ref(),
            rate_style: self.gateway.config.server.rate_limit_headers,
            close: draining,
            cache: self.cache_status().header_value(),
            cache_member: self.cache_status.as_ref(),
        }
    }

    /// How this request used the cache: the `X-Cache` a client sees and the `cache` label of
    /// the request metrics, one value for both. An answer a cached route gives before the
    /// cache is reached (400, 413, 429) bypassed it; other routes have none.
    pub fn cache_status(&self) -> CacheStatus {
        match self.cache {
            CacheStatus::None if self.route().is_some_and(|r| r.cache.is_some()) => {
                CacheStatus::Bypass
            }
            status => status,
        }
    }
}
