//! The whole validated configuration, put together from its sections: every section is
//! read and checked, then what spans sections (the default rate limit, listener
//! addresses, aggregate legs, invalidation, entry sizes) is checked across them.

use std::collections::BTreeMap;
use std::sync::Arc;

use figment::value::Dict;

use super::admin::AdminSettings;
use super::cache::CacheStoreSettings;
use super::capacity;
use super::cluster::{redact_url, ClusterSettings};
use super::limits::{PolicySettings, Scope, NO_RATE_LIMIT};
use super::log::LogSettings;
use super::problem::ConfigErrors;
use super::raw::RawTracing;
use super::raw::{RawAdmin, RawCacheSection, RawCluster, RawLog, RawServer};
use super::route::RouteSpec;
use super::server::ServerSettings;
use super::traces::TraceSettings;
use super::upstream::Upstream;
use super::validate::Validator;

/// The validated configuration the gateway is built from.
#[derive(Debug, Clone)]
pub struct Config {
    /// The merged configuration as read (file and environment), secrets redacted.
    pub source: serde_json::Value,
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    /// OpenTelemetry traces; `None`: off. Read at start.
    pub tracing: Option<TraceSettings>,
    pub cache: CacheStoreSettings,
    /// The Redis shared with other instances; `None`: nothing is shared.
    pub cluster: Option<ClusterSettings>,
    pub rate_limits: BTreeMap<String, PolicySettings>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub routes: Vec<RouteSpec>,
}

impl Config {
    /// A one-line summary for `stoa check`.
    pub fn summary(&self) -> String {
        let compressing = self
            .routes
            .iter()
            .filter(|r| r.cache.as_ref().is_some_and(|c| c.compression.is_some()))
            .count();
        let compression = &self.cache.compression;
        let codings: Vec<&str> = compression.encodings.iter().map(|c| c.token()).collect();
        let mut text = format!(
            "configuration ok: {} upstream(s), {} route(s) ({} cached, {} compressing stored answers of at least {} bytes with {}), listening on {}, admin on {}",
            self.upstreams.len(),
            self.routes.len(),
            self.routes.iter().filter(|r| r.cache.is_some()).count(),
            compressing,
            compression.min_bytes,
            if codings.is_empty() { "nothing".to_string() } else { codings.join(", ") },
            self.server.listeners(),
            self.admin.listen
        );
        if let Some(disk) = &self.cache.disk {
            text.push_str(&format!(
                "; disk tier in {} of {} bytes: memory keeps answers of at most {} bytes, the \
                 disk tier of at most {} bytes (larger ones than memory holds are kept on disk only), \
                 stored answers survive restarts",
                disk.path.display(),
                disk.max_bytes,
                capacity::largest_body(self.cache.max_bytes),
                capacity::largest_disk_body(disk.max_bytes),
            ));
        }
        if let Some(cluster) = &self.cluster {
            let shared: Vec<&str> = self
                .rate_limits
                .values()
                .filter(|p| p.scope == Scope::Cluster)
                .map(|p| p.name.as_str())
                .collect();
            text.push_str(&format!(
                "; cluster: node {:?} on {}{} (keys prefixed {:?}, commands bounded by {}), \
                 cached answers up to {} shared in Redis as a second tier, one fetch per \
                 key cluster-wide (a node's lease on a fetch lasts {} unless renewed), \
                 purges reach every node, and so do admin reloads (each node reads its own \
                 file) and refreshes (one refetch per key cluster-wide), \
                 rate limits shared by all instances: {}; without Redis each instance \
                 falls back to its own cache, flights and buckets",
                cluster.node_name,
                cluster.redis_display(),
                match (cluster.tls(), &cluster.ca_pem, cluster.tls_verify) {
                    (false, _, _) => "",
                    (true, _, false) =>
                        " over TLS, its certificate NOT verified (tls_verify = false)",
                    (true, Some(_), true) => " over TLS, its certificate checked against ca_file",
                    (true, None, true) =>
                        " over TLS, its certificate checked against the system roots",
                },
                cluster.key_prefix,
                humantime::format_duration(cluster.command_timeout),
                bytesize::ByteSize(cluster.l2_max_entry_bytes),
                humantime::format_duration(cluster.lock_timeout),
                if shared.is_empty() {
                    "none".to_string()
                } else {
                    shared.join(", ")
                }
            ));
        }
        if let Some(t) = &self.tracing {
            text.push_str(&format!(
                "; traces to {}/v1/traces as {:?}, keeping {} of new traces",
                t.otlp_endpoint, t.service_name, t.sample_ratio
            ));
        }
        text
    }
}

impl Config {
    /// What is allowed but unsafe, as `stoa check` prints it (and the start logs it).
    pub fn warnings(&self) -> Vec<String> {
        self.upstreams
            .values()
            .filter_map(|u| u.warning())
            .collect()
    }
}

impl Validator<'_> {
    /// Validates every section of the file and puts the typed settings together.
    pub(super) fn assemble(mut self, mut root: Dict) -> Result<Config, ConfigErrors> {
        let mut source = serde_json::to_value(&root).unwrap_or_default();
        if let Some(token) = source.pointer_mut("/admin/token") {
            *token = serde_json::Value::String("<redacted>".into());
        }
        redact_redis(&mut source);
        let server_raw: RawServer = match root.remove("server") {
            Some(v) => self.section("server", &v).unwrap_or_default(),
            None => RawServer::default(),
        };
        let admin_raw: RawAdmin = match root.remove("admin") {
            Some(v) => self.section("admin", &v).unwrap_or_default(),
            None => RawAdmin::default(),
        };
        let cache_raw: RawCacheSection = match root.remove("cache") {
            Some(v) => self.section("cache", &v).unwrap_or_default(),
            None => RawCacheSection::default(),
        };
        let log_raw: RawLog = match root.remove("log") {
            Some(v) => self.section("log", &v).unwrap_or_default(),
            None => RawLog::default(),
        };
        let tracing_raw: RawTracing = match root.remove("tracing") {
            Some(v) => self.section("tracing", &v).unwrap_or_default(),
            None => RawTracing::default(),
        };
        let cluster_raw: Option<RawCluster> = root
            .remove("cluster")
            .map(|v| self.section("cluster", &v).unwrap_or_default());
        let rate_limits_raw = root.remove("rate_limits");
        let upstreams_raw = root.remove("upstreams");
        let routes_raw = root.remove("routes");
        for key in root.keys() {
            self.problem(
                key.clone(),
                "unknown section (expected server, admin, log, tracing, cache, cluster, rate_limits, upstreams or routes)",
            );
        }

        let default_rate_limit = server_raw.default_rate_limit.clone();
        let server = self.server(server_raw);
        let log = self.log(log_raw);
        let tracing = self.traces(tracing_raw);
        let rate_limits = self.rate_limits(rate_limits_raw);
        if let Some(name) = &default_rate_limit {
            if !rate_limits.contains_key(name) {
                self.problem(
                    "server.default_rate_limit",
                    format!("no rate limit policy named {name:?}"),
                );
            }
        }
        let cluster_given = cluster_raw.is_some();
        let cluster = cluster_raw.and_then(|raw| self.cluster(raw));
        if !cluster_given {
            for policy in rate_limits.values().filter(|p| p.scope == Scope::Cluster) {
                self.problem(
                    format!("rate_limits.{}.scope", policy.name),
                    "\"cluster\" needs a [cluster] section",
                );
            }
        }
        let cache = self.cache_store(cache_raw);
        let admin = self.admin(admin_raw);
        if let (Some(s), Some(a)) = (&server, &admin) {
            if s.listen == Some(a.listen) {
                self.problem("admin.listen", "must differ from server.listen");
            }
            if s.tls.as_ref().is_some_and(|t| t.listen == a.listen) {
                self.problem("admin.listen", "must differ from server.listen_tls");
            }
        }
        let (upstreams, upstream_names) = self.upstreams(upstreams_raw);
        // Valid routes with their index in the file, for problem paths.
        let mut indexed = self.routes(routes_raw, &upstreams, &upstream_names, &rate_limits);
        self.link_aggregates(&mut indexed);
        self.check_invalidates(&indexed);
        if let Some(store) = &cache {
            self.cache_entry_limits(&mut indexed, store);
            self.cache_compression(&mut indexed, store);
            self.cache_targeted_field(&mut indexed, store);
        }
        let mut routes: Vec<RouteSpec> = indexed.into_iter().map(|(_, r)| r).collect();
        for route in &mut routes {
            match route.rate_limit.as_deref() {
                None => route.rate_limit = default_rate_limit.clone(),
                Some(NO_RATE_LIMIT) => route.rate_limit = None,
                Some(_) => {}
            }
        }

        match (server, admin, cache, log, tracing) {
            (Some(server), Some(admin), Some(cache), Some(log), Ok(tracing))
                if self.problems.is_empty() =>
            {
                Ok(Config {
                    source,
                    server,
                    admin,
                    log,
                    tracing,
                    cache,
                    cluster,
                    rate_limits,
                    upstreams,
                    routes,
                })
            }
            _ => Err(ConfigErrors(self.problems)),
        }
    }
}

/// Hides the password of Redis URLs in the configuration as read.
fn redact_redis(source: &mut serde_json::Value) {
    let Some(redis) = source.pointer_mut("/cluster/redis") else {
        return;
    };
    let urls: Vec<&mut serde_json::Value> = match redis {
        serde_json::Value::Array(items) => items.iter_mut().collect(),
        one => vec![one],
    };
    for url in urls {
        if let serde_json::Value::String(text) = url {
            *text = redact_url(text);
        }
    }
}
