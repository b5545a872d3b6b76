//! The runtime form of a validated configuration: the compiled route table with, per
//! route, its upstream link, cache, rate limiter and metrics handles. The proxy reads it
//! once per request.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use prometheus::IntCounter;

use crate::aggregate::Aggregator;
use crate::cache::{CacheEngine, CacheStatus, CachedRoute, Source};
use crate::config::{Config, RouteSpec, Upstream};
use crate::error::StoaError;
use crate::metrics::{Metrics, RouteMetrics, RouteShape};
use crate::ratelimit::{RateLimiter, UpstreamGuard};
use crate::routes::{
    normalize_path, upstream_uri, Lookup, PathMode, PathTemplate, Routable, RouteTable,
};
use crate::upstream::{peer::peer_for, Link, UpstreamClient};

/// The route label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// A route as served.
pub struct Route {
    pub spec: RouteSpec,
    /// The way to the route's upstream, for pass-through requests and fetches alike
    /// (`None` on aggregate routes).
    pub link: Option<Arc<Link>>,
    /// Set on cached and aggregate routes, which are answered from `request_filter`.
    pub cache: Option<Arc<CachedRoute>>,
    pub limiter: Option<Arc<RateLimiter>>,
    pub metrics: RouteMetrics,
    pub rate_limited: Option<IntCounter>,
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
    pub fn upstream(&self) -> Option<&Upstream> {
        self.spec.upstream.as_deref()
    }
}

/// What outlives one configuration: the cache and the metrics registry.
pub struct Shared {
    pub cache: Arc<CacheEngine>,
    pub metrics: Arc<Metrics>,
}

/// Everything the request path needs, built once from a [`Config`].
pub struct Gateway {
    pub config: Arc<Config>,
    pub routes: RouteTable<Route>,
    pub max_body_bytes: u64,
    pub cache: Arc<CacheEngine>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// One limiter per policy, shared by the routes naming it.
    pub limiters: HashMap<String, Arc<RateLimiter>>,
    /// One guard per upstream.
    pub guards: HashMap<String, Arc<UpstreamGuard>>,
    pub unmatched: RouteMetrics,
    /// Record per-request metrics.
    pub record_metrics: bool,
    pub access_log: bool,
}

impl Gateway {
    /// Compiles `config`; cached routes share `shared.cache`, which outlives configurations.
    /// Rate limiters of policies and guards of upstreams unchanged since `previous` are
    /// kept, with their state (client buckets, calls in flight).
    pub fn new(
        config: Arc<Config>,
        shared: &Shared,
        previous: Option<&Gateway>,
    ) -> Result<Arc<Self>, StoaError> {
        let metrics = &shared.metrics;
        let metric_err = |e: prometheus::Error| StoaError::Internal(format!("metrics: {e}"));
        let limiters: HashMap<String, Arc<RateLimiter>> = config
            .rate_limits
            .iter()
            .map(|(name, policy)| {
                let kept = previous
                    .and_then(|p| p.limiters.get(name))
                    .filter(|l| l.settings() == policy)
                    .cloned();
                let limiter = kept.unwrap_or_else(|| Arc::new(RateLimiter::new(policy.clone())));
                (name.clone(), limiter)
            })
            .collect();
        let guards: HashMap<&str, Arc<UpstreamGuard>> = config
            .upstreams
            .iter()
            .map(|(name, up)| {
                let kept = previous
                    .and_then(|p| p.guards.get(name))
                    .filter(|g| g.settings() == &up.guard)
                    .cloned();
                let guard = kept.unwrap_or_else(|| Arc::new(UpstreamGuard::new(up.guard.clone())));
                (name.as_str(), guard)
            })
            .collect();
        let unmatched = metrics.route(UNMATCHED_ROUTE, false).map_err(metric_err)?;
        unmatched.expect([(CacheStatus::None, 404)]);
        let mut clients: HashMap<String, UpstreamClient> = HashMap::new();
        for (name, up) in &config.upstreams {
            if let Some(guard) = guards.get(name.as_str()) {
                clients.insert(
                    name.clone(),
                    UpstreamClient::new(up.clone(), guard.clone())?,
                );
            }
        }
        let build = |gateway: &Weak<Gateway>| -> Result<Vec<Route>, StoaError> {
            let mut routes = Vec::with_capacity(config.routes.len());
            for spec in &config.routes {
                let link = match &spec.upstream {
                    Some(up) => {
                        let client = clients.get(&up.name).cloned().ok_or_else(|| {
                            StoaError::Internal(format!("no client for {}", up.name))
                        })?;
                        let fetches = metrics.upstream(&up.name, &spec.name).map_err(metric_err)?;
                        Some(Arc::new(Link::new(
                            up.clone(),
                            peer_for(up),
                            client,
                            Arc::new(fetches),
                        )))
                    }
                    None => None,
                };
                let source = match (&spec.aggregate, &link) {
                    (Some(aggregate), _) => Some(Source::Aggregate(Aggregator::new(
                        spec.name.clone(),
                        spec.path.clone(),
                        aggregate.clone(),
                        gateway.clone(),
                    ))),
                    (None, Some(link)) if spec.cache.is_some() => {
                        Some(Source::Upstream(link.clone()))
                    }
                    _ => None,
                };
                let cached = match (&spec.cache, source) {
                    (Some(settings), Some(source)) => Some(Arc::new(CachedRoute {
                        name: spec.name.clone(),
                        settings: settings.clone(),
                        source,
                        too_large: metrics.cache_too_large(&spec.name).map_err(metric_err)?,
                    })),
                    _ => None,
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
                let route_metrics = metrics
                    .route(&spec.name, spec.cache.is_some())
                    .map_err(metric_err)?;
                route_metrics.expect(expected_answers(spec, limiter.is_some()));
                routes.push(Route {
                    link,
                    metrics: route_metrics,
                    spec: spec.clone(),
                    cache: cached,
                    limiter,
                    rate_limited,
                });
            }
            Ok(routes)
        };
        // Aggregate routes call back into the gateway that holds them.
        let mut failure = None;
        let gateway = Arc::new_cyclic(|weak| {
            let routes = build(weak).unwrap_or_else(|e| {
                failure = Some(e);
                Vec::new()
            });
            Gateway {
                config: Arc::clone(&config),
                guards: guards
                    .iter()
                    .map(|(name, guard)| (name.to_string(), guard.clone()))
                    .collect(),
                routes: RouteTable::new(routes),
                max_body_bytes: config.server.max_body_bytes,
                cache: shared.cache.clone(),
                trusted_proxies: config.server.trusted_proxies.clone(),
                limiters: limiters.clone(),
                unmatched,
                record_metrics: config.admin.metrics,
                access_log: config.log.access_log,
            }
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(gateway),
        }
    }
}

impl Gateway {
    /// The cached route named `name`.
    pub fn cached_route(&self, name: &str) -> Option<&Arc<CachedRoute>> {
        self.routes
            .routes()
            .iter()
            .find(|r| r.spec.name == name)
            .and_then(|r| r.cache.as_ref())
    }

    /// The route a request would take, and the upstream path and query it would be sent
    /// with. The path is brought to normal form in `mode` first (see
    /// [`crate::routes::normalize_path`]): `Resolve` for paths a person wrote, `Exact` for
    /// paths stoa filled from values, which must not climb or split a segment.
    pub fn resolve(
        &self,
        method: &http::Method,
        path_and_query: &str,
        mode: PathMode,
    ) -> Result<(&Route, String), StoaError> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let path = normalize_path(path, mode)?;
        let (index, uri) = match self.routes.lookup(method, &path) {
            Lookup::Found(index, route, captures) => {
                let uri = upstream_uri(
                    route.upstream().map_or("", |u| u.base_path.as_str()),
                    route.spec.rewrite.as_ref(),
                    &captures,
                    &path,
                    query,
                )?;
                (index, uri)
            }
            _ => {
                return Err(StoaError::NoRoute {
                    path: path.into_owned(),
                })
            }
        };
        let route = self
            .routes
            .routes()
            .get(index)
            .ok_or_else(|| StoaError::Internal("route vanished".into()))?;
        Ok((route, uri))
    }
}

/// Whether a cached route's stored answers are still valid under a new configuration:
/// same path, rewrite, upstream and cache settings.
pub fn same_cached_answers(old: &RouteSpec, new: &RouteSpec) -> bool {
    old.name == new.name
        && old.path.as_str() == new.path.as_str()
        && old.rewrite.as_ref().map(|r| r.as_str()) == new.rewrite.as_ref().map(|r| r.as_str())
        && old
            .upstream
            .as_ref()
            .map(|u| (u.addr, &u.base_path, &u.host_header))
            == new
                .upstream
                .as_ref()
                .map(|u| (u.addr, &u.base_path, &u.host_header))
        && old.aggregate == new.aggregate
        && old.cache == new.cache
}

/// The `stoa_requests_total` series a route starts with, at zero.
fn expected_answers(spec: &RouteSpec, limited: bool) -> Vec<(CacheStatus, u16)> {
    let cacheable: Vec<u16> = spec
        .cache
        .iter()
        .flat_map(|c| c.statuses.iter().map(|(status, _)| *status))
        .collect();
    RouteShape {
        cached: spec.cache.is_some(),
        cacheable: &cacheable,
        stale: spec
            .cache
            .as_ref()
            .is_some_and(|c| !c.stale_while_revalidate.is_zero() || !c.stale_if_error.is_zero()),
        limited,
    }
    .answers()
}
