//! The runtime form of a validated configuration: the compiled route table with, per
//! route, its upstream link, cache, rate limiter and metrics handles. The proxy reads it
//! once per request.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use prometheus::IntCounter;

use crate::aggregate::{Aggregator, LegCall, Legs, LegsHandle};
use crate::cache::origin::FetchRequest;
use crate::cache::tags::Tags;
use crate::cache::vary::Learned;
use crate::cache::{CacheEngine, CacheStatus, CachedRoute, Origin, Served};
use crate::cluster::Cluster;
use crate::config::{Config, RouteSpec, Upstream};
use crate::error::StoaError;
use crate::lane::{Lane, Why};
use crate::metrics::{Metrics, RouteMetrics, RouteProfile};
use crate::ratelimit::{RateLimiter, UpstreamGuard};
use crate::routes::{
    normalize_path, upstream_uri, Lookup, PathMode, PathTemplate, Routable, RouteTable,
};
use crate::upstream::MAX_RESPONSE_BYTES;
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
    /// The Redis shared with other instances (`[cluster]`), fixed at start.
    pub cluster: Option<Arc<Cluster>>,
}

/// Everything the request path needs, built once from a [`Config`].
pub struct Gateway {
    pub config: Arc<Config>,
    pub routes: RouteTable<Route>,
    pub max_body_bytes: u64,
    pub cache: Arc<CacheEngine>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The Redis shared with other instances, if any.
    pub cluster: Option<Arc<Cluster>>,
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
        let lane = if config.server.front {
            Lane::Answer
        } else {
            Lane::Proxy(Why::Off)
        };
        unmatched.expect(lane, [(CacheStatus::None, 404)]);
        let mut clients: HashMap<String, UpstreamClient> = HashMap::new();
        for (name, up) in &config.upstreams {
            if let Some(guard) = guards.get(name.as_str()) {
                clients.insert(
                    name.clone(),
                    UpstreamClient::new(up.clone(), guard.clone())?,
                );
            }
        }
        // Aggregate routes call the routes of the gateway that holds them: set once it is built.
        let legs = Arc::new(LegsHandle::default());
        let parts = Parts {
            metrics,
            clients: &clients,
            limiters: &limiters,
            legs: &legs,
            previous,
            front: (config.server.front, config.server.front_forward),
        };
        let routes = config
            .routes
            .iter()
            .map(|spec| compile_route(spec, &parts))
            .collect::<Result<Vec<_>, _>>()?;
        let gateway = Arc::new(Gateway {
            config: Arc::clone(&config),
            guards: guards
                .into_iter()
                .map(|(name, guard)| (name.to_string(), guard))
                .collect(),
            routes: RouteTable::new(routes),
            max_body_bytes: config.server.max_body_bytes,
            cache: shared.cache.clone(),
            trusted_proxies: config.server.trusted_proxies.clone(),
            cluster: shared.cluster.clone(),
            limiters,
            unmatched,
            record_metrics: config.admin.metrics,
            access_log: config.log.access_log,
        });
        let weak: Weak<Gateway> = Arc::downgrade(&gateway);
        legs.set(weak);
        Ok(gateway)
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
        let found = match self.routes.lookup(method, &path) {
            Lookup::Found(index, route, captures) => Some((
                index,
                upstream_uri(
                    route.upstream().map_or("", |u| u.base_path.as_str()),
                    route.spec.rewrite.as_ref(),
                    &captures,
                    &path,
                    query,
                ),
            )),
            _ => None,
        };
        let Some((index, uri)) = found else {
            return Err(StoaError::NoRoute {
                path: path.into_owned(),
            });
        };
        let uri = uri?;
        let route = self
            .routes
            .routes()
            .get(index)
            .ok_or_else(|| StoaError::Internal("route vanished".into()))?;
        Ok((route, uri))
    }
}

impl Legs for Gateway {
    fn call(&self, method: &http::Method, path: &str, body: Bytes) -> LegCall<'_> {
        let method = method.clone();
        let path = path.to_string();
        Box::pin(async move { self.leg(method, &path, body).await })
    }
}

impl Gateway {
    /// One aggregate leg: resolved through the route table, fetched through the route's
    /// cache when it has one (like a client's request), else from its upstream.
    async fn leg(
        &self,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(http::StatusCode, Bytes), String> {
        // Exact: a value such as ".." or "a/b" (from a parameter or an earlier answer) is an
        // error, never a way to another route or out of the rewrite's prefix.
        let (route, upstream_path) =
            self.resolve(&method, path, PathMode::Exact)
                .map_err(|e| match e {
                    StoaError::NoRoute { .. } => format!("{method} {path} matches no route"),
                    e => format!("{method} {path}: {e}"),
                })?;
        let mut headers = http::HeaderMap::new();
        if !body.is_empty() {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        let fetch = FetchRequest {
            method,
            path_and_query: upstream_path,
            headers,
            body,
            tags: Tags::new(),
        };
        let Some(cached) = &route.cache else {
            // Through the route's link: its upstream's slots, and counted as its fetches.
            let link = route
                .link
                .as_ref()
                .ok_or_else(|| format!("route {} has no upstream", route.spec.name))?;
            let fetched = link.fetch_whole(fetch).await.map_err(|e| e.to_string())?;
            return Ok((fetched.status, fetched.body));
        };
        let key = cached
            .key_for(
                &fetch.method,
                &fetch.path_and_query,
                &fetch.body,
                &fetch.headers,
            )
            .map_err(|e| e.to_string())?;
        // Like a client's request: the shared fetch carries only what the key covers, and
        // a body the key ignores is dropped or goes around the cache.
        let served = if cached.bypasses_for(&fetch.body) {
            self.cache.bypass(cached, fetch).await
        } else {
            let shared = || {
                cached.shared_fetch(
                    fetch.method.clone(),
                    &fetch.path_and_query,
                    &key,
                    &fetch.headers,
                    None,
                    path.split('?').next().unwrap_or_default(),
                )
            };
            self.cache.serve(cached, &key, &fetch.headers, shared).await
        };
        match served {
            Served::Entry(entry, _) => Ok((entry.header.status, entry.body.clone())),
            // Legs are merged whole, within the whole-answer limit.
            Served::Stream(streaming, _) => {
                let status = streaming.status;
                let body = (*streaming).collect(MAX_RESPONSE_BYTES).await;
                Ok((status, body.map_err(|e| e.to_string())?))
            }
            Served::Error(e, _) => Err(e.to_string()),
        }
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

/// What the routes of one configuration share.
struct Parts<'a> {
    metrics: &'a Metrics,
    clients: &'a HashMap<String, UpstreamClient>,
    limiters: &'a HashMap<String, Arc<RateLimiter>>,
    legs: &'a Arc<LegsHandle>,
    /// The configuration before a reload.
    previous: Option<&'a Gateway>,
    /// `server.front` and `server.front_forward`: the lanes routes usually take.
    front: (bool, bool),
}

/// A route as served: its peer, cache and origin, limiter and metrics.
fn compile_route(spec: &RouteSpec, parts: &Parts<'_>) -> Result<Route, StoaError> {
    let link = match &spec.upstream {
        Some(up) => {
            let client = parts
                .clients
                .get(&up.name)
                .cloned()
                .ok_or_else(|| StoaError::Internal(format!("no client for {}", up.name)))?;
            let fetches = parts
                .metrics
                .upstream(&up.name, &spec.name)
                .map_err(metric_err)?;
            Some(Arc::new(Link::new(
                up.clone(),
                peer_for(up),
                client,
                Arc::new(fetches),
            )))
        }
        None => None,
    };
    let origin: Option<(Arc<dyn Origin>, String)> = match (&spec.aggregate, &link) {
        (Some(aggregate), _) => Some((
            Arc::new(Aggregator::new(
                spec.name.clone(),
                spec.path.clone(),
                aggregate.clone(),
                parts.legs.clone(),
            )),
            spec.name.clone(),
        )),
        (None, Some(link)) if spec.cache.is_some() => {
            Some((link.clone(), link.upstream().name.clone()))
        }
        _ => None,
    };
    let cached = match (&spec.cache, origin) {
        (Some(settings), Some((origin, origin_name))) => Some(Arc::new(CachedRoute {
            name: spec.name.clone(),
            path: spec.path.clone(),
            settings: settings.clone(),
            origin,
            origin_name,
            too_large: parts
                .metrics
                .cache_too_large(&spec.name)
                .map_err(metric_err)?,
            compressions: parts.metrics.compressions().map_err(metric_err)?,
            revalidations: parts
                .metrics
                .cache_revalidations(&spec.name)
                .map_err(metric_err)?,
            not_modified: parts
                .metrics
                .cache_not_modified(&spec.name)
                .map_err(metric_err)?,
            vary: Learned::new(
                &learned_before(spec, parts.previous),
                parts
                    .metrics
                    .cache_variants_refused(&spec.name)
                    .map_err(metric_err)?,
            ),
        })),
        _ => None,
    };
    let limiter = spec
        .rate_limit
        .as_ref()
        .and_then(|name| parts.limiters.get(name).cloned());
    let rate_limited = match &spec.rate_limit {
        Some(policy) => Some(
            parts
                .metrics
                .rate_limited(&spec.name, policy)
                .map_err(metric_err)?,
        ),
        None => None,
    };
    let route_metrics = parts
        .metrics
        .route(&spec.name, spec.cache.is_some())
        .map_err(metric_err)?;
    route_metrics.expect(
        usual_lane(spec, parts.front),
        expected_answers(spec, limiter.is_some()),
    );
    Ok(Route {
        link,
        metrics: route_metrics,
        spec: spec.clone(),
        cache: cached,
        limiter,
        rate_limited,
    })
}

/// The vary headers the route learned under the previous configuration, when its stored
/// answers stay valid (their keys hold those headers' values).
fn learned_before(spec: &RouteSpec, previous: Option<&Gateway>) -> Vec<http::HeaderName> {
    previous
        .into_iter()
        .flat_map(|p| p.routes.routes())
        .find(|old| same_cached_answers(&old.spec, spec))
        .and_then(|old| old.cache.as_ref())
        .map(|cached| cached.vary.snapshot())
        .unwrap_or_default()
}

fn metric_err(e: prometheus::Error) -> StoaError {
    StoaError::Internal(format!("metrics: {e}"))
}

/// The lane a route's HTTP/1 requests usually take, whose series start at zero: stoa
/// answers cached and aggregate routes; the front forwards pass-through requests when it
/// does (`front`: `server.front` and `server.front_forward`), pingora's proxy otherwise.
fn usual_lane(spec: &RouteSpec, front: (bool, bool)) -> Lane {
    match front {
        (false, _) => Lane::Proxy(Why::Off),
        _ if spec.cache.is_some() || spec.aggregate.is_some() => Lane::Answer,
        (true, true) => Lane::Forward,
        (true, false) => Lane::Proxy(Why::Off),
    }
}

/// The `stoa_requests_total` series a route starts with, at zero.
fn expected_answers(spec: &RouteSpec, limited: bool) -> Vec<(CacheStatus, u16)> {
    let cacheable: Vec<u16> = spec
        .cache
        .iter()
        .flat_map(|c| c.statuses.iter().map(|(status, _)| *status))
        .collect();
    RouteProfile {
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
