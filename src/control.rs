//! The control plane: hot reload, purge, refresh and warm-up. The admin listener and the
//! signal handlers call it; it never blocks the request path (a reload swaps one pointer).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::cache::engine::PurgeReport;
use crate::cache::key::CacheKey;
use crate::cache::origin::FetchRequest;
use crate::cache::purge::{Invalidation, PurgeWhat};
use crate::cache::tags::Tags;
use crate::cache::tier::{wall_now, Order, OrderWhat};
use crate::cache::{CacheStatus, CachedRoute, Served};
use crate::config::{self, Config, ConfigErrors, EnvOverrides};
use crate::error::StoaError;
use crate::gateway::{same_cached_answers, Gateway, Route, Shared};
use crate::lifecycle::Lifecycle;
use crate::routes::PathMode;

/// An optional listener address as a reload report shows it.
fn shown(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "none".to_string(), |a| a.to_string())
}

/// What a successful reload did.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    pub routes: usize,
    /// Cached routes whose entries were dropped because their settings changed.
    pub purged_routes: Vec<String>,
    pub purged_entries: usize,
    /// Settings that only take effect after a restart (listener addresses, threads).
    pub restart_needed: Vec<String>,
}

/// The outcome of the last configuration reload, shown on the status page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadRecord {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// `ok` or `error`.
    pub result: &'static str,
    /// The problems of a refused file, one sentence each (none on success).
    pub problems: Vec<String>,
}

/// The wall clock in Unix milliseconds.
fn wall_ms() -> u64 {
    u64::try_from(wall_now()).unwrap_or(0)
}

/// Which entries a purge reaches, and whether it removes them or marks them stale.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Every entry of this route (or, with `prefix` or `tags`, of this route only).
    pub route: Option<String>,
    /// Entries whose upstream path starts with this.
    pub prefix: Option<String>,
    /// The entry one request would be served from, derived exactly as when serving.
    pub request: Option<ExactRequest>,
    /// Entries carrying any of these tags.
    pub tags: Option<Vec<String>>,
    /// Mark the entries stale instead of removing them: the next request is answered from
    /// the stale copy while one revalidation runs.
    #[serde(default)]
    pub soft: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactRequest {
    #[serde(default = "get")]
    pub method: String,
    /// The client-facing path, with its query string if any.
    pub path: String,
    /// The JSON body, for body-keyed routes.
    pub body: Option<serde_json::Value>,
    /// Headers the route keys on.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

fn get() -> String {
    "GET".to_string()
}

/// What a refresh did.
#[derive(Debug, Serialize)]
pub struct RefreshReport {
    pub route: String,
    /// The upstream's refresh hook and the status it answered, when configured.
    pub hook: Option<String>,
    pub refetching: usize,
}

pub struct Control {
    config_path: PathBuf,
    env: EnvOverrides,
    pub gateway: Arc<ArcSwap<Gateway>>,
    pub shared: Shared,
    pub lifecycle: Arc<Lifecycle>,
    /// Reloads run one at a time.
    reloading: Mutex<()>,
    /// When the configuration in force was loaded (Unix milliseconds).
    loaded_at_ms: AtomicU64,
    /// The outcome of the last reload, for the status page.
    last_reload: Mutex<Option<ReloadRecord>>,
}

impl Control {
    pub fn new(
        config_path: PathBuf,
        env: EnvOverrides,
        gateway: Arc<ArcSwap<Gateway>>,
        shared: Shared,
        lifecycle: Arc<Lifecycle>,
    ) -> Arc<Self> {
        Arc::new(Control {
            config_path,
            env,
            gateway,
            shared,
            lifecycle,
            reloading: Mutex::new(()),
            loaded_at_ms: AtomicU64::new(wall_ms()),
            last_reload: Mutex::new(None),
        })
    }

    /// Reads and validates the configuration file again. A bad file changes nothing and
    /// every problem is returned; a good one replaces the whole runtime configuration at
    /// once (requests in flight finish on the old one). Entries of cached routes whose
    /// settings did not change survive, and so do the buckets of unchanged policies.
    pub fn reload(&self) -> Result<ReloadReport, ConfigErrors> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let result =
            config::load(&self.config_path, self.env).and_then(|config| self.apply(config));
        self.shared.metrics.config_reload(result.is_ok());
        let at_ms = wall_ms();
        let record = match &result {
            Ok(_) => {
                self.loaded_at_ms.store(at_ms, Ordering::Relaxed);
                ReloadRecord {
                    at_ms,
                    result: "ok",
                    problems: Vec::new(),
                }
            }
            Err(errors) => ReloadRecord {
                at_ms,
                result: "error",
                problems: errors.0.iter().map(|p| p.to_string()).collect(),
            },
        };
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
        match &result {
            Ok(report) => tracing::info!(?report, "configuration reloaded"),
            Err(errors) => tracing::error!(problems = %errors, "configuration reload refused"),
        }
        result
    }

    /// When the configuration in force was loaded (Unix milliseconds).
    pub fn loaded_at_ms(&self) -> u64 {
        self.loaded_at_ms.load(Ordering::Relaxed)
    }

    /// The outcome of the last reload (`None` before the first).
    pub fn last_reload(&self) -> Option<ReloadRecord> {
        self.last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn apply(&self, config: Config) -> Result<ReloadReport, ConfigErrors> {
        let old = self.gateway.load_full();
        let old_config = &old.config;
        // Settings fixed at start: a reload reports them and keeps the old values.
        let fixed = [
            (
                "server.listen",
                shown(config.server.listen),
                shown(old_config.server.listen),
            ),
            (
                "server.listen_tls",
                shown(config.server.tls.as_ref().map(|t| t.listen)),
                shown(old_config.server.tls.as_ref().map(|t| t.listen)),
            ),
            (
                "server.h2c",
                config.server.h2c.to_string(),
                old_config.server.h2c.to_string(),
            ),
            (
                "server.h2_max_concurrent_streams",
                config.server.h2_max_concurrent_streams.to_string(),
                old_config.server.h2_max_concurrent_streams.to_string(),
            ),
            (
                "admin.listen",
                config.admin.listen.to_string(),
                old_config.admin.listen.to_string(),
            ),
            (
                "server.threads",
                config.server.threads.to_string(),
                old_config.server.threads.to_string(),
            ),
            (
                "server.worker_model",
                format!("{:?}", config.server.worker_model).to_lowercase(),
                format!("{:?}", old_config.server.worker_model).to_lowercase(),
            ),
            (
                "server.front",
                config.server.front.to_string(),
                old_config.server.front.to_string(),
            ),
            (
                "server.front_forward",
                config.server.front_forward.to_string(),
                old_config.server.front_forward.to_string(),
            ),
            (
                "cache.max_bytes",
                config.cache.max_bytes.to_string(),
                old_config.cache.max_bytes.to_string(),
            ),
            ("cache.disk", disk_text(&config), disk_text(old_config)),
            ("cluster", cluster_text(&config), cluster_text(old_config)),
            ("tracing", tracing_text(&config), tracing_text(old_config)),
        ];
        let restart_needed = fixed
            .into_iter()
            .filter(|(_, new, old)| new != old)
            .map(|(key, _, old)| format!("{key}: still {old} until restart"))
            .collect();
        let routes = config.routes.len();
        let new_routes = config.routes.clone();
        let gateway = Gateway::new(Arc::new(config), &self.shared, Some(&old)).map_err(|e| {
            ConfigErrors(vec![config::Problem {
                path: String::new(),
                message: e.to_string(),
            }])
        })?;
        self.gateway.store(gateway);

        let mut purged_routes = Vec::new();
        let mut purged_entries = 0;
        for old_route in old_config.routes.iter().filter(|r| r.cache.is_some()) {
            let kept = new_routes
                .iter()
                .any(|new| same_cached_answers(old_route, new));
            if !kept {
                purged_entries += self.shared.cache.invalidate_here(Invalidation {
                    what: PurgeWhat::Route {
                        route: old_route.name.clone(),
                    },
                    soft: false,
                });
                purged_routes.push(old_route.name.clone());
            }
        }
        Ok(ReloadReport {
            routes,
            purged_routes,
            purged_entries,
            restart_needed,
        })
    }

    /// Asks every other node to reload its own configuration file (`POST /admin/reload`
    /// with `[cluster]`); whether the order was sent.
    pub async fn announce_reload(&self) -> bool {
        match &self.shared.cache.tier {
            Some(tier) => tier.announce(OrderWhat::Reload).await,
            None => false,
        }
    }

    /// Carries out an order another node broadcast: each node reloads its own file, or
    /// refreshes the keys of a route it holds. Results go to this node's log and metrics.
    pub fn obey(self: &Arc<Self>, order: Order) {
        let from = order.node;
        match order.what {
            OrderWhat::Reload => {
                tracing::info!(from = %from, "cluster: reload asked by another node");
                let control = self.clone();
                // The result is logged and counted by `reload`.
                tokio::task::spawn_blocking(move || control.reload());
            }
            OrderWhat::Refresh { route, since } => {
                let gateway = self.gateway.load();
                match gateway.cached_route(&route) {
                    Some(cached) => {
                        let refetching = self.shared.cache.refresh_route(cached, Some(since));
                        tracing::info!(from = %from, route = %route, refetching, "cluster: refresh asked by another node");
                    }
                    None => {
                        tracing::warn!(from = %from, route = %route, "cluster: refresh of a route not cached here")
                    }
                }
            }
        }
    }

    /// Applies a purge on every node (see [`CacheEngine::invalidate`]) and says what it hit.
    pub async fn purge(&self, req: &PurgeRequest) -> Result<PurgeReport, StoaError> {
        let what = match (&req.route, &req.prefix, &req.request, &req.tags) {
            (Some(route), None, None, None) => PurgeWhat::Route {
                route: route.clone(),
            },
            (route, Some(prefix), None, None) => PurgeWhat::Prefix {
                route: route.clone(),
                prefix: prefix.clone(),
            },
            (None, None, Some(exact), None) => {
                let (cached, key) = self.exact_key(exact)?;
                // Every variant of the request: the key without learned vary values.
                PurgeWhat::Key {
                    route: cached.name.clone(),
                    key: key.base().to_string(),
                }
            }
            (route, None, None, Some(tags)) => {
                if tags.is_empty() || tags.iter().any(String::is_empty) {
                    return Err(StoaError::BadRequest(
                        "tags must be a non-empty list of non-empty strings".into(),
                    ));
                }
                PurgeWhat::Tags {
                    tags: tags.clone(),
                    routes: route.as_ref().map(|r| vec![r.clone()]),
                }
            }
            _ => {
                return Err(StoaError::BadRequest(
                    "give one of: route, prefix (optionally with route), request, tags \
                     (optionally with route)"
                        .into(),
                ))
            }
        };
        let inv = Invalidation {
            what,
            soft: req.soft,
        };
        Ok(self.shared.cache.invalidate(inv).await)
    }

    /// The cached route and key a client request maps to.
    fn exact_key(&self, exact: &ExactRequest) -> Result<(Arc<CachedRoute>, CacheKey), StoaError> {
        let method = http::Method::from_bytes(exact.method.as_bytes())
            .map_err(|_| StoaError::BadRequest(format!("{:?} is not a method", exact.method)))?;
        let gateway = self.gateway.load();
        let (route, upstream_path) = gateway.resolve(&method, &exact.path, PathMode::Resolve)?;
        let cached = route.cache.clone().ok_or_else(|| {
            StoaError::BadRequest(format!("route {:?} is not cached", route.spec.name))
        })?;
        let body = exact
            .body
            .as_ref()
            .map(|b| b.to_string())
            .unwrap_or_default();
        let mut headers = http::HeaderMap::new();
        for (name, value) in &exact.headers {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| StoaError::BadRequest(format!("{name:?} is not a header name")))?;
            let value = http::HeaderValue::from_str(value)
                .map_err(|_| StoaError::BadRequest(format!("bad value for header {name}")))?;
            headers.insert(name, value);
        }
        let key = cached.key_for(&method, &upstream_path, body.as_bytes(), &headers)?;
        Ok((cached, key))
    }

    /// Calls the route's upstream refresh hook (if any), then refetches every cached key of
    /// the route in the background, single flight as always; clients keep getting the
    /// current copies until the new ones are in. Then the route's warm list is fetched.
    pub async fn refresh(&self, route_name: &str) -> Result<RefreshReport, StoaError> {
        let gateway = self.gateway.load_full();
        let cached =
            gateway
                .cached_route(route_name)
                .cloned()
                .ok_or_else(|| StoaError::NoRoute {
                    path: format!("cached route {route_name:?}"),
                })?;
        let mut hook_report = None;
        let link = gateway
            .routes
            .routes()
            .iter()
            .find(|r| r.spec.name == route_name)
            .and_then(|r| r.link.as_ref());
        if let (Some(hook), Some(link)) = (&cached.settings.refresh_hook, link) {
            let (client, upstream) = (link.client(), link.upstream());
            let base = &upstream.base_path;
            let answer = client
                .fetch(FetchRequest {
                    method: hook.method.clone(),
                    path_and_query: format!("{base}{}", hook.path),
                    headers: http::HeaderMap::new(),
                    body: Bytes::new(),
                    tags: Tags::new(),
                })
                .await?;
            if !answer.status.is_success() {
                return Err(StoaError::UpstreamFailed {
                    upstream: client.name().to_string(),
                    detail: format!("refresh hook answered {}", answer.status),
                });
            }
            hook_report = Some(format!(
                "{} {} -> {}",
                hook.method, hook.path, answer.status
            ));
        }
        // With the shared tier every node refreshes the keys it holds; the lease makes it
        // one upstream call per key cluster-wide.
        let since = match &self.shared.cache.tier {
            Some(tier) => {
                let since = wall_now();
                let what = OrderWhat::Refresh {
                    route: route_name.to_string(),
                    since,
                };
                if !tier.announce(what).await {
                    tracing::warn!(route = %route_name, "cluster: the refresh could not be sent to the other nodes");
                }
                Some(since)
            }
            None => None,
        };
        let refetching = self.shared.cache.refresh_route(&cached, since);
        if let Some(route) = gateway
            .routes
            .routes()
            .iter()
            .find(|r| r.spec.name == route_name)
        {
            self.warm_route(&gateway, route).await;
        }
        Ok(RefreshReport {
            route: route_name.to_string(),
            hook: hook_report,
            refetching,
        })
    }

    /// Fetches every route's warm list into the cache, at most `timeout` in all; returns
    /// how many warm requests ended with a cached answer.
    pub async fn warm_all(&self, timeout: Duration) -> usize {
        let gateway = self.gateway.load_full();
        let work = async {
            let mut warmed = 0;
            for route in gateway.routes.routes() {
                warmed += self.warm_route(&gateway, route).await;
            }
            warmed
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(n) => n,
            Err(_) => {
                tracing::warn!(?timeout, "cache warm-up did not finish in time");
                0
            }
        }
    }

    async fn warm_route(&self, gateway: &Gateway, route: &Route) -> usize {
        let Some(cached) = &route.cache else {
            return 0;
        };
        // Warm requests use the route's GET, or its POST for body-keyed POST routes.
        let lists = |m: &http::Method| route.spec.methods.as_ref().is_none_or(|ms| ms.contains(m));
        let method = if lists(&http::Method::GET) {
            http::Method::GET
        } else {
            http::Method::POST
        };
        let mut warmed = 0;
        for warm in &cached.settings.warm {
            let upstream_path = match gateway.resolve(&method, &warm.path, PathMode::Resolve) {
                Ok((_, upstream_path)) => upstream_path,
                Err(e) => {
                    tracing::warn!(path = %warm.path, "warm-up request not served: {e}");
                    continue;
                }
            };
            let body = Bytes::from(warm.body.clone().unwrap_or_default());
            let mut headers = http::HeaderMap::new();
            if !body.is_empty() {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
            }
            let key = match cached.key_for(&method, &upstream_path, &body, &headers) {
                Ok(key) => key,
                Err(e) => {
                    tracing::warn!(path = %warm.path, "warm-up request rejected: {e}");
                    continue;
                }
            };
            let client_path = warm.path.split('?').next().unwrap_or_default();
            let make_fetch = || {
                cached.shared_fetch(
                    method.clone(),
                    &upstream_path,
                    &key,
                    &headers,
                    None,
                    client_path,
                )
            };
            match self
                .shared
                .cache
                .serve(cached, &key, &headers, make_fetch)
                .await
            {
                Served::Entry(_, status) if status != CacheStatus::Bypass => warmed += 1,
                Served::Entry(..) => {}
                Served::Stream(..) => {
                    tracing::warn!(path = %warm.path, "warm-up answer is larger than max_entry_bytes: not stored")
                }
                Served::Error(e, _) => {
                    tracing::warn!(path = %warm.path, "warm-up fetch failed: {e}")
                }
            }
        }
        warmed
    }
}

/// `cache.disk` as the reload report names it.
fn disk_text(config: &Config) -> String {
    match &config.cache.disk {
        Some(d) => format!("{} ({} bytes)", d.path.display(), d.max_bytes),
        None => "off".to_string(),
    }
}

/// The `[cluster]` section as a reload compares it (it is fixed at start).
fn cluster_text(config: &Config) -> String {
    match &config.cluster {
        Some(c) => format!(
            "{} as {} (prefix {:?}, connect {:?}, commands {:?}, l2 up to {} bytes, lease {:?}, tls verify {}, ca {:x})",
            c.redis_display(),
            c.node_name,
            c.key_prefix,
            c.connect_timeout,
            c.command_timeout,
            c.l2_max_entry_bytes,
            c.lock_timeout,
            c.tls_verify,
            c.ca_pem
                .as_deref()
                .map_or(0, xxhash_rust::xxh3::xxh3_64)
        ),
        None => "off".to_string(),
    }
}

/// The `[tracing]` section as the reload reports it: read at start only.
fn tracing_text(config: &Config) -> String {
    match &config.tracing {
        None => "off".to_string(),
        Some(t) => format!(
            "{} (sample_ratio {}, service_name {:?})",
            t.otlp_endpoint, t.sample_ratio, t.service_name
        ),
    }
}
