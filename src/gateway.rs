//! The runtime form of a validated configuration: the compiled route table with, per
//! route, its upstream peer, cache, rate limiter and metrics handles. The proxy reads it
//! once per request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pingora::upstreams::peer::HttpPeer;
use prometheus::IntCounter;

use crate::cache::{CacheEngine, CachedRoute};
use crate::config::{Config, RouteSpec, Upstream};
use crate::error::StoaError;
use crate::fetch::UpstreamClient;
use crate::metrics::{Metrics, RouteMetrics, UpstreamMetrics};
use crate::ratelimit::{RateLimiter, UpstreamGuard};
use crate::routes::{PathTemplate, Routable, RouteTable};

/// How long an idle pooled upstream connection is kept.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The route label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// A route as served.
pub struct Route {
    pub spec: RouteSpec,
    pub peer: HttpPeer,
    /// Set on cached routes, which are answered from `request_filter`.
    pub cache: Option<Arc<CachedRoute>>,
    pub limiter: Option<Arc<RateLimiter>>,
    /// Protects the upstream of pass-through requests (cached fetches hold it in their client).
    pub guard: Arc<UpstreamGuard>,
    pub metrics: RouteMetrics,
    pub rate_limited: Option<IntCounter>,
    /// Pass-through calls to the upstream.
    pub upstream_metrics: Arc<UpstreamMetrics>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route").field("spec", &self.spec).finish()
    }
}

impl Routable for Route {
    fn path(&self) -> &PathTemplate {
        &self.spec.path
    }
    fn methods(&self) -> Option<&[http::Method]> {
        self.spec.methods.as_deref()
    }
}

impl Route {
    pub fn upstream(&self) -> &Upstream {
        &self.spec.upstream
    }
}

/// What outlives one configuration: the cache and the metrics registry.
pub struct Shared {
    pub cache: Arc<CacheEngine>,
    pub metrics: Arc<Metrics>,
}

/// Everything the request path needs, built once from a [`Config`].
pub struct Gateway {
    pub routes: RouteTable<Route>,
    pub max_body_bytes: u64,
    pub cache: Arc<CacheEngine>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// One limiter per policy, shared by the routes naming it.
    pub limiters: HashMap<String, Arc<RateLimiter>>,
    pub unmatched: RouteMetrics,
    /// Record per-request metrics.
    pub record_metrics: bool,
    pub access_log: bool,
}

impl Gateway {
    /// Compiles `config`; cached routes share `shared.cache`, which outlives configurations.
    pub fn new(config: &Config, shared: &Shared) -> Result<Arc<Self>, StoaError> {
        let metrics = &shared.metrics;
        let metric_err = |e: prometheus::Error| StoaError::Internal(format!("metrics: {e}"));
        let limiters: HashMap<String, Arc<RateLimiter>> = config
            .rate_limits
            .iter()
            .map(|(name, policy)| (name.clone(), Arc::new(RateLimiter::new(policy.clone()))))
            .collect();
        let guards: HashMap<&str, Arc<UpstreamGuard>> = config
            .upstreams
            .iter()
            .map(|(name, up)| {
                (
                    name.as_str(),
                    Arc::new(UpstreamGuard::new(up.guard.clone())),
                )
            })
            .collect();
        let mut clients: HashMap<&str, UpstreamClient> = HashMap::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        for spec in &config.routes {
            let upstream_name = spec.upstream.name.as_str();
            let guard = guards
                .get(upstream_name)
                .cloned()
                .ok_or_else(|| StoaError::Internal(format!("no guard for {upstream_name}")))?;
            let upstream_metrics = Arc::new(
                metrics
                    .upstream(upstream_name, &spec.name)
                    .map_err(metric_err)?,
            );
            let cached = match &spec.cache {
                None => None,
                Some(settings) => {
                    let client = match clients.get(upstream_name) {
                        Some(c) => c.clone(),
                        None => {
                            let c = UpstreamClient::new(&spec.upstream, guard.clone())?;
                            clients.insert(upstream_name, c.clone());
                            c
                        }
                    };
                    Some(Arc::new(CachedRoute {
                        name: spec.name.clone(),
                        settings: settings.clone(),
                        client,
                        fetch_metrics: upstream_metrics.clone(),
                    }))
                }
            };
            let limiter = spec
                .rate_limit
                .as_ref()
                .and_then(|name| limiters.get(name).cloned());
            let rate_limited = match &spec.rate_limit {
                Some(policy) => Some(
                    metrics
                        .rate_limited(&spec.name, policy)
                        .map_err(metric_err)?,
                ),
                None => None,
            };
            routes.push(Route {
                peer: peer_for(&spec.upstream),
                metrics: metrics
                    .route(&spec.name, spec.cache.is_some())
                    .map_err(metric_err)?,
                spec: spec.clone(),
                cache: cached,
                limiter,
                guard,
                rate_limited,
                upstream_metrics,
            });
        }
        Ok(Arc::new(Gateway {
            routes: RouteTable::new(routes),
            max_body_bytes: config.server.max_body_bytes,
            cache: shared.cache.clone(),
            trusted_proxies: config.server.trusted_proxies.clone(),
            limiters,
            unmatched: metrics.route(UNMATCHED_ROUTE, false).map_err(metric_err)?,
            record_metrics: config.admin.metrics,
            access_log: config.log.access_log,
        }))
    }
}

fn peer_for(upstream: &Upstream) -> HttpPeer {
    let mut peer = HttpPeer::new(upstream.addr, false, String::new());
    peer.options.connection_timeout = Some(upstream.connect_timeout);
    peer.options.read_timeout = Some(upstream.timeout);
    peer.options.write_timeout = Some(upstream.timeout);
    peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
    peer
}
