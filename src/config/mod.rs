//! Loading and validating the TOML configuration.
//!
//! The file is read with figment and merged with `STOA_<SECTION>__<KEY>` environment
//! overrides. Each section and each entry is deserialized on its own and then validated
//! into typed settings, collecting **every** problem with its key path, like `nginx -t`.

mod aggregate;
mod cache;
pub mod capacity;
mod limits;
mod raw;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::de::DeserializeOwned;

use crate::routes::{PathTemplate, RewriteTemplate};
use raw::{
    RawAdmin, RawCacheSection, RawDuration, RawLog, RawRoute, RawServer, RawSize, RawUpstream,
};

/// `rate_limit = "off"` exempts a route from `server.default_rate_limit`.
const NO_RATE_LIMIT: &str = "off";

/// Methods a route may list.
const KNOWN_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

pub use aggregate::spec::{
    AggregateSpec, LegSpec, OnLegError, Pick, Reference, Shape, Template, TemplatePart,
};
pub use cache::settings::{
    CacheSettings, KeyBody, KeyQuery, OnLockTimeout, RefreshHook, UnkeyedBody, WarmRequest,
};
pub use limits::{
    AppliesTo, ClientSource, Mode, PolicySettings, UpstreamGuardSettings, MAX_REFILL,
};

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "STOA_";

/// One thing wrong with a configuration, at a key path such as `routes[2].upstream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// The validated configuration the gateway is built from.
#[derive(Debug, Clone)]
pub struct Config {
    /// The merged configuration as read (file and environment), secrets redacted.
    pub source: serde_json::Value,
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub cache: CacheStoreSettings,
    pub rate_limits: BTreeMap<String, PolicySettings>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: u64,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed when identifying clients.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Longest `/readyz` stays 503 waiting for the cache warm-up.
    pub warm_timeout: Duration,
    /// Client connection limits and deadlines.
    pub connections: ConnectionLimits,
}

/// Deadlines and caps on client connections (`[server]` keys of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The whole request head must arrive within this, counted from the connection's
    /// accept (first request) or from the first byte of the head (later requests).
    pub header_timeout: Duration,
    /// An idle connection between two requests is closed after this.
    pub keepalive_timeout: Duration,
    /// The whole request body must arrive within this, counted from when stoa starts
    /// reading it.
    pub body_timeout: Duration,
    /// Requests served on one connection; the last answer carries `Connection: close`.
    pub keepalive_requests: u32,
    /// Open client connections; new ones beyond it are closed at once.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            keepalive_requests: 1000,
            max_connections: 10_000,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// A filter such as `info` or `info,stoa=debug`; `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
    /// One line per request (target `stoa::access`).
    pub access_log: bool,
}

/// The `[cache]` section: the one store all cached routes share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStoreSettings {
    /// Bound on the bytes held (bodies, headers and keys).
    pub max_bytes: u64,
    /// Largest answer body stored, for routes that do not say.
    pub max_entry_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Whether requests are counted for `/metrics`.
    pub metrics: bool,
    /// Bearer token for the admin API (purge, refresh, reload, config); without one the
    /// admin API is closed.
    pub token: Option<String>,
}

/// An upstream service. Its host name is resolved once, when the configuration is loaded,
/// so that no request ever waits on DNS.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub url: String,
    pub addr: SocketAddr,
    /// The `Host` header sent upstream (`host` or `host:port`, as in the URL).
    pub host_header: String,
    /// A path prefix from the URL (`http://h/base` -> `/base`), prepended to every request.
    pub base_path: String,
    pub connect_timeout: Duration,
    /// Longest wait for any read from the upstream: the response head or the next body chunk.
    pub timeout: Duration,
    /// Concurrency and pacing limits protecting the upstream.
    pub guard: UpstreamGuardSettings,
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    /// `None`: every method.
    pub methods: Option<Vec<http::Method>>,
    pub path: PathTemplate,
    /// `None` for aggregate routes, whose legs reach upstreams through other routes.
    pub upstream: Option<Arc<Upstream>>,
    /// Set on aggregate routes.
    pub aggregate: Option<Arc<AggregateSpec>>,
    pub rewrite: Option<RewriteTemplate>,
    /// `None`: a pass-through route.
    pub cache: Option<CacheSettings>,
    /// The rate-limit policy applied to this route, by name.
    pub rate_limit: Option<String>,
    /// Cached routes whose entries for the same upstream path a successful write here
    /// purges (e.g. `DELETE /products/{id}` invalidates `GET /products/{id}`).
    pub invalidates: Vec<String>,
}

impl Config {
    /// A one-line summary for `stoa check`.
    pub fn summary(&self) -> String {
        format!(
            "configuration ok: {} upstream(s), {} route(s) ({} cached), listening on {}, admin on {}",
            self.upstreams.len(),
            self.routes.len(),
            self.routes.iter().filter(|r| r.cache.is_some()).count(),
            self.server.listen,
            self.admin.listen
        )
    }
}

/// Where configuration values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvOverrides {
    /// Apply `STOA_<SECTION>__<KEY>` variables from the process environment.
    Apply,
    /// Use the file alone.
    Ignore,
}

/// Reads, merges and validates the configuration file at `path`.
pub fn load(path: &Path, env: EnvOverrides) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Problem {
            path: String::new(),
            message: format!("cannot read configuration file {}: {e}", path.display()),
        }])
    })?;
    load_str(&text, env)
}

/// Merges and validates configuration text.
pub fn load_str(text: &str, env: EnvOverrides) -> Result<Config, ConfigErrors> {
    let mut figment = Figment::from(Toml::string(text));
    if env == EnvOverrides::Apply {
        // Only `SECTION__KEY` variables are overrides; e.g. `STOA_CONFIG` is not.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
    }
    let root: Dict = figment.extract().map_err(|e| {
        ConfigErrors(
            e.into_iter()
                .map(|e| Problem {
                    path: e.path.join("."),
                    message: e.to_string(),
                })
                .collect(),
        )
    })?;
    Validator::new(&figment).run(root)
}

/// Collects problems while turning raw values into typed settings.
struct Validator<'f> {
    figment: &'f Figment,
    problems: Vec<Problem>,
}

impl<'f> Validator<'f> {
    fn new(figment: &'f Figment) -> Self {
        Validator {
            figment,
            problems: Vec::new(),
        }
    }

    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Deserializes one section or entry, reporting a failure at its path.
    fn section<T: DeserializeOwned>(&mut self, path: &str, value: &Value) -> Option<T> {
        match value.deserialize::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                let source = self
                    .figment
                    .get_metadata(value.tag())
                    .filter(|m| m.name.contains("environment"))
                    .map(|_| " (set from the environment)")
                    .unwrap_or("");
                for err in e {
                    let mut full = path.to_string();
                    for p in &err.path {
                        full.push('.');
                        full.push_str(p);
                    }
                    let message = match &err.kind {
                        figment::error::Kind::UnknownField(field, expected) => format!(
                            "unknown key {field:?} (expected one of: {})",
                            expected.join(", ")
                        ),
                        other => other.to_string(),
                    };
                    self.problem(full, format!("{message}{source}"));
                }
                None
            }
        }
    }

    fn run(mut self, mut root: Dict) -> Result<Config, ConfigErrors> {
        let mut source = serde_json::to_value(&root).unwrap_or_default();
        if let Some(token) = source.pointer_mut("/admin/token") {
            *token = serde_json::Value::String("<redacted>".into());
        }
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
        let rate_limits_raw = root.remove("rate_limits");
        let upstreams_raw = root.remove("upstreams");
        let routes_raw = root.remove("routes");
        for key in root.keys() {
            self.problem(
                key.clone(),
                "unknown section (expected server, admin, log, cache, rate_limits, upstreams or routes)",
            );
        }

        let default_rate_limit = server_raw.default_rate_limit.clone();
        let server = self.server(server_raw);
        let log = self.log(log_raw);
        let rate_limits = self.rate_limits(rate_limits_raw);
        if let Some(name) = &default_rate_limit {
            if !rate_limits.contains_key(name) {
                self.problem(
                    "server.default_rate_limit",
                    format!("no rate limit policy named {name:?}"),
                );
            }
        }
        let cache = self.cache_store(cache_raw);
        let admin = self.admin(admin_raw);
        if let (Some(s), Some(a)) = (&server, &admin) {
            if s.listen == a.listen {
                self.problem("admin.listen", "must differ from server.listen");
            }
        }
        let (upstreams, upstream_names) = self.upstreams(upstreams_raw);
        // Valid routes with their index in the file, for problem paths.
        let mut indexed = self.routes(routes_raw, &upstreams, &upstream_names, &rate_limits);
        self.link_aggregates(&mut indexed);
        self.check_invalidates(&indexed);
        if let Some(store) = &cache {
            self.cache_entry_limits(&mut indexed, store);
        }
        let mut routes: Vec<RouteSpec> = indexed.into_iter().map(|(_, r)| r).collect();
        for route in &mut routes {
            match route.rate_limit.as_deref() {
                None => route.rate_limit = default_rate_limit.clone(),
                Some(NO_RATE_LIMIT) => route.rate_limit = None,
                Some(_) => {}
            }
        }

        match (server, admin, cache, log) {
            (Some(server), Some(admin), Some(cache), Some(log)) if self.problems.is_empty() => {
                Ok(Config {
                    source,
                    server,
                    admin,
                    log,
                    cache,
                    rate_limits,
                    upstreams,
                    routes,
                })
            }
            _ => Err(ConfigErrors(self.problems)),
        }
    }

    fn address(&mut self, path: &str, value: Option<&str>, default: &str) -> Option<SocketAddr> {
        let text = value.unwrap_or(default);
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    path,
                    format!("{text:?} is not an address like \"127.0.0.1:8080\""),
                );
                None
            }
        }
    }

    fn duration(
        &mut self,
        path: &str,
        value: Option<&RawDuration>,
        default: Duration,
    ) -> Option<Duration> {
        let parsed = match value {
            None => return Some(default),
            Some(RawDuration::Number(n)) => Err(format!(
                "{n} has no unit; write a duration like \"{n}s\" or \"{n}ms\""
            )),
            Some(RawDuration::Text(t)) => humantime::parse_duration(t).map_err(|e| {
                format!("{t:?} is not a duration like \"250ms\", \"5s\" or \"5m\": {e}")
            }),
        };
        match parsed {
            Ok(d) if d.is_zero() => {
                self.problem(path, "must be greater than zero");
                None
            }
            Ok(d) => Some(d),
            Err(msg) => {
                self.problem(path, msg);
                None
            }
        }
    }

    fn size(&mut self, path: &str, value: Option<&RawSize>, default: u64) -> Option<u64> {
        let parsed = match value {
            None => return Some(default),
            Some(RawSize::Bytes(n)) => Ok(*n),
            Some(RawSize::Text(t)) => t
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| b.as_u64())
                .map_err(|e| format!("{t:?} is not a size like \"64KiB\" or \"256MiB\": {e}")),
        };
        match parsed {
            Ok(0) => {
                self.problem(path, "must be greater than zero");
                None
            }
            Ok(n) => Some(n),
            Err(msg) => {
                self.problem(path, msg);
                None
            }
        }
    }

    fn server(&mut self, raw: RawServer) -> Option<ServerSettings> {
        let listen = self.address("server.listen", raw.listen.as_deref(), "127.0.0.1:8080");
        let threads = match raw.threads {
            None => Some(2),
            Some(n) if (1..=1024).contains(&n) => Some(n as usize),
            Some(n) => {
                self.problem("server.threads", format!("{n} is not between 1 and 1024"));
                None
            }
        };
        let max_body_bytes = self.size(
            "server.max_body_bytes",
            raw.max_body_bytes.as_ref(),
            1024 * 1024,
        );
        let shutdown_timeout = self.duration(
            "server.shutdown_timeout",
            raw.shutdown_timeout.as_ref(),
            Duration::from_secs(30),
        );
        let warm_timeout = self.duration(
            "server.warm_timeout",
            raw.warm_timeout.as_ref(),
            Duration::from_secs(30),
        );
        let trusted_proxies = limits::parse_trusted_proxies(
            "server.trusted_proxies",
            raw.trusted_proxies.as_deref().unwrap_or_default(),
            &mut self.problems,
        );
        let connections = self.connection_limits(&raw);
        Some(ServerSettings {
            listen: listen?,
            threads: threads?,
            max_body_bytes: max_body_bytes?,
            shutdown_timeout: shutdown_timeout?,
            trusted_proxies,
            warm_timeout: warm_timeout?,
            connections: connections?,
        })
    }

    fn connection_limits(&mut self, raw: &RawServer) -> Option<ConnectionLimits> {
        let d = ConnectionLimits::default();
        let header_timeout = self.duration(
            "server.header_timeout",
            raw.header_timeout.as_ref(),
            d.header_timeout,
        );
        let keepalive_timeout = self.duration(
            "server.keepalive_timeout",
            raw.keepalive_timeout.as_ref(),
            d.keepalive_timeout,
        );
        let body_timeout = self.duration(
            "server.body_timeout",
            raw.body_timeout.as_ref(),
            d.body_timeout,
        );
        let keepalive_requests = match raw.keepalive_requests {
            None => Some(d.keepalive_requests),
            Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => u32::try_from(n).ok(),
            Some(n) => {
                self.problem(
                    "server.keepalive_requests",
                    format!("{n} is not between 1 and {}", u32::MAX),
                );
                None
            }
        };
        let max_connections = match raw.max_connections {
            None => Some(d.max_connections),
            Some(n) if (1..=10_000_000).contains(&n) => usize::try_from(n).ok(),
            Some(n) => {
                self.problem(
                    "server.max_connections",
                    format!("{n} is not between 1 and 10000000"),
                );
                None
            }
        };
        Some(ConnectionLimits {
            header_timeout: header_timeout?,
            keepalive_timeout: keepalive_timeout?,
            body_timeout: body_timeout?,
            keepalive_requests: keepalive_requests?,
            max_connections: max_connections?,
        })
    }

    fn admin(&mut self, raw: RawAdmin) -> Option<AdminSettings> {
        let listen = self.address("admin.listen", raw.listen.as_deref(), "127.0.0.1:9901")?;
        let token = raw.token.filter(|t| !t.is_empty());
        if token.as_ref().is_some_and(|t| t.len() < 8) {
            self.problem("admin.token", "must be at least 8 characters");
            return None;
        }
        Some(AdminSettings {
            listen,
            metrics: raw.metrics.unwrap_or(true),
            token,
        })
    }

    fn log(&mut self, raw: RawLog) -> Option<LogSettings> {
        let level = raw.level.unwrap_or_else(|| "info".to_string());
        let level_ok = tracing_subscriber::EnvFilter::try_new(&level).is_ok();
        if !level_ok {
            self.problem(
                "log.level",
                format!("{level:?} is not a level or filter like \"info\""),
            );
        }
        let format = match raw.format.as_deref() {
            None | Some("text") => Some(LogFormat::Text),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                self.problem("log.format", format!("{other:?} is not one of text, json"));
                None
            }
        };
        Some(LogSettings {
            level: level_ok.then_some(level)?,
            format: format?,
            access_log: raw.access_log.unwrap_or(true),
        })
    }

    fn rate_limits(&mut self, raw: Option<Value>) -> BTreeMap<String, PolicySettings> {
        let mut out = BTreeMap::new();
        let Some(raw) = raw else { return out };
        let Some(dict) = raw.into_dict() else {
            self.problem("rate_limits", "must be a table of named policies");
            return out;
        };
        for (name, value) in dict {
            let path = format!("rate_limits.{name}");
            if name == NO_RATE_LIMIT {
                self.problem(
                    &path,
                    format!("{NO_RATE_LIMIT:?} is reserved: it exempts a route"),
                );
                continue;
            }
            let Some(raw) = self.section::<limits::RawPolicy>(&path, &value) else {
                continue;
            };
            if let Some(policy) = limits::validate_policy(&path, &name, raw, &mut self.problems) {
                out.insert(name, policy);
            }
        }
        out
    }

    fn name_ok(&mut self, path: &str, name: &str) -> bool {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            self.problem(
                path,
                format!("name {name:?} must be 1-64 letters, digits, '_' or '-'"),
            );
        }
        ok
    }

    /// The valid upstreams, and the names of all defined ones (valid or not), so that a
    /// route naming a broken upstream is not reported twice.
    fn upstreams(&mut self, raw: Option<Value>) -> (BTreeMap<String, Arc<Upstream>>, Vec<String>) {
        let mut out = BTreeMap::new();
        let Some(raw) = raw else {
            return (out, Vec::new());
        };
        let Some(dict) = raw.into_dict() else {
            self.problem("upstreams", "must be a table of named upstreams");
            return (out, Vec::new());
        };
        let names = dict.keys().cloned().collect();
        for (name, value) in dict {
            let path = format!("upstreams.{name}");
            let name_ok = self.name_ok(&path, &name);
            let Some(raw) = self.section::<RawUpstream>(&path, &value) else {
                continue;
            };
            if let (Some(up), true) = (self.upstream(&path, &name, raw), name_ok) {
                out.insert(name, Arc::new(up));
            }
        }
        (out, names)
    }

    fn upstream(&mut self, path: &str, name: &str, raw: RawUpstream) -> Option<Upstream> {
        let connect_timeout = self.duration(
            &format!("{path}.connect_timeout"),
            raw.connect_timeout.as_ref(),
            Duration::from_secs(2),
        );
        let timeout = self.duration(
            &format!("{path}.timeout"),
            raw.timeout.as_ref(),
            Duration::from_secs(30),
        );
        let queue_timeout = match &raw.queue_timeout {
            Some(RawDuration::Text(t)) if matches!(t.trim(), "0" | "0s" | "0ms") => {
                Some(Duration::ZERO)
            }
            other => self.duration(
                &format!("{path}.queue_timeout"),
                other.as_ref(),
                Duration::from_secs(1),
            ),
        };
        let guard = queue_timeout.and_then(|queue_timeout| {
            limits::validate_upstream_guard(
                path,
                raw.max_in_flight,
                raw.max_requests_per_second,
                queue_timeout,
                &mut self.problems,
            )
        });
        let url_path = format!("{path}.url");
        let target = match parse_upstream_url(&raw.url) {
            Ok(t) => Some(t),
            Err(msg) => {
                self.problem(url_path, msg);
                None
            }
        };
        let (addr, host_header, base_path) = target?;
        Some(Upstream {
            name: name.to_string(),
            url: raw.url,
            addr,
            host_header,
            base_path,
            connect_timeout: connect_timeout?,
            timeout: timeout?,
            guard: guard?,
        })
    }

    fn routes(
        &mut self,
        raw: Option<Value>,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        upstream_names: &[String],
        rate_limits: &BTreeMap<String, PolicySettings>,
    ) -> Vec<(usize, RouteSpec)> {
        let Some(raw) = raw else { return Vec::new() };
        let Some(items) = raw.into_array() else {
            self.problem("routes", "must be an array of tables ([[routes]])");
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut shapes: Vec<RouteShape> = Vec::new();
        for (i, value) in items.iter().enumerate() {
            let path = format!("routes[{i}]");
            let Some(raw) = self.section::<RawRoute>(&path, value) else {
                continue;
            };
            if let Some(name) = &raw.rate_limit {
                if name != NO_RATE_LIMIT && !rate_limits.contains_key(name) {
                    self.problem(
                        format!("{path}.rate_limit"),
                        format!("no rate limit policy named {name:?}"),
                    );
                }
            }
            let (route, shape) = self.route(&path, raw, upstreams, upstream_names);
            self.check_route_conflicts(i, &shape, &shapes);
            shapes.push(shape);
            out.extend(route.map(|r| (i, r)));
        }
        out
    }

    fn route(
        &mut self,
        path: &str,
        mut raw: RawRoute,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        upstream_names: &[String],
    ) -> (Option<RouteSpec>, RouteShape) {
        let name_ok = self.name_ok(&format!("{path}.name"), &raw.name);
        let is_aggregate = raw.legs.is_some();
        let methods = match (raw.methods.take(), is_aggregate) {
            (None, false) => Some(None),
            (None, true) => Some(Some(vec![http::Method::GET])),
            (Some(list), _) => self.methods(&format!("{path}.methods"), &list).map(Some),
        };
        if is_aggregate {
            let only_reads = methods.as_ref().and_then(|m| m.as_ref()).is_some_and(|ms| {
                ms.iter()
                    .all(|m| m == http::Method::GET || m == http::Method::HEAD)
            });
            if methods.is_some() && !only_reads {
                self.problem(
                    format!("{path}.methods"),
                    "an aggregate route answers GET and HEAD only",
                );
            }
        }
        let template = match PathTemplate::parse(&raw.path) {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(format!("{path}.path"), format!("{:?} {e}", raw.path));
                None
            }
        };
        let aggregate = if is_aggregate {
            self.aggregate(path, &mut raw, template.as_ref())
                .map(|a| Some(Arc::new(a)))
        } else {
            Some(None)
        };
        let upstream = match (&raw.upstream, is_aggregate) {
            (_, true) => Some(None),
            (None, false) => {
                self.problem(
                    format!("{path}.upstream"),
                    "needs an upstream (or legs, for an aggregate route)",
                );
                None
            }
            (Some(name), false) => {
                if !upstream_names.contains(name) {
                    self.problem(
                        format!("{path}.upstream"),
                        format!("no upstream named {name:?}"),
                    );
                }
                upstreams.get(name).cloned().map(Some)
            }
        };
        let rewrite = match (&raw.rewrite, &template) {
            (Some(_), _) if is_aggregate => Some(None),
            (Some(text), Some(t)) => match RewriteTemplate::parse(text, t) {
                Ok(r) => Some(Some(r)),
                Err(e) => {
                    self.problem(format!("{path}.rewrite"), format!("{text:?} {e}"));
                    None
                }
            },
            (Some(_), None) => None,
            (None, _) => Some(None),
        };
        let cache = match (raw.cache.take(), &methods) {
            (None, _) => Some(None),
            (Some(_), _) if is_aggregate => Some(None),
            (Some(c), Some(ms)) => {
                let lock_timeout = upstream
                    .as_ref()
                    .and_then(|u| u.as_ref())
                    .map_or(Duration::from_secs(30), |u| u.timeout);
                self.cache_settings(
                    &format!("{path}.cache"),
                    c,
                    ms.as_deref(),
                    lock_timeout,
                    template.as_ref(),
                )
                .map(Some)
            }
            (Some(_), None) => None,
        };
        let shape = RouteShape {
            name: raw.name.clone(),
            methods: methods.clone().flatten(),
            path: template.clone(),
        };
        let route = (|| {
            name_ok.then_some(())?;
            Some(RouteSpec {
                name: raw.name,
                methods: methods?,
                path: template?,
                upstream: upstream?,
                aggregate: aggregate?,
                rewrite: rewrite?,
                cache: cache?,
                rate_limit: raw.rate_limit,
                invalidates: raw.invalidates.unwrap_or_default(),
            })
        })();
        (route, shape)
    }

    fn methods(&mut self, path: &str, list: &[String]) -> Option<Vec<http::Method>> {
        if list.is_empty() {
            self.problem(
                path,
                "must name at least one method (or be left out for all)",
            );
            return None;
        }
        let mut out: Vec<http::Method> = Vec::with_capacity(list.len());
        let mut ok = true;
        for (i, m) in list.iter().enumerate() {
            let valid = KNOWN_METHODS.contains(&m.as_str());
            match http::Method::from_bytes(m.as_bytes()) {
                Ok(method) if valid => {
                    if out.contains(&method) {
                        self.problem(format!("{path}[{i}]"), format!("{m} is listed twice"));
                        ok = false;
                    }
                    out.push(method);
                }
                _ => {
                    self.problem(
                        format!("{path}[{i}]"),
                        format!("{m:?} is not one of {}", KNOWN_METHODS.join(", ")),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// `invalidates` may only name cached routes.
    fn check_invalidates(&mut self, routes: &[(usize, RouteSpec)]) {
        for (i, route) in routes {
            for (j, target) in route.invalidates.iter().enumerate() {
                let cached = routes
                    .iter()
                    .any(|(_, r)| &r.name == target && r.cache.is_some());
                if !cached {
                    self.problem(
                        format!("routes[{i}].invalidates[{j}]"),
                        format!("no cached route named {target:?}"),
                    );
                }
            }
        }
    }

    /// Names must be unique, and no two routes may match the same requests.
    fn check_route_conflicts(&mut self, i: usize, route: &RouteShape, earlier: &[RouteShape]) {
        for (j, other) in earlier.iter().enumerate() {
            if other.name == route.name {
                self.problem(
                    format!("routes[{i}].name"),
                    format!("{:?} is already the name of routes[{j}]", route.name),
                );
            }
            let methods_overlap = match (&route.methods, &other.methods) {
                (None, _) | (_, None) => true,
                (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
            };
            let (Some(path), Some(other_path)) = (&route.path, &other.path) else {
                continue;
            };
            if methods_overlap && path.equivalent(other_path) {
                self.problem(
                    format!("routes[{i}].path"),
                    format!(
                        "{:?} matches the same requests as routes[{j}] ({:?}, path {:?})",
                        path.as_str(),
                        other.name,
                        other_path.as_str()
                    ),
                );
            }
        }
    }
}

/// What conflict checks need of a route, kept even when the route has other problems.
struct RouteShape {
    name: String,
    methods: Option<Vec<http::Method>>,
    path: Option<PathTemplate>,
}

/// Splits an upstream URL into its resolved address, `Host` header and base path.
fn parse_upstream_url(text: &str) -> Result<(SocketAddr, String, String), String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(format!(
                "{text:?}: https upstreams are not supported yet; use http"
            ))
        }
        other => return Err(format!("{text:?}: scheme {other:?} is not http")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{text:?}: credentials in upstream URLs are not supported"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{text:?}: an upstream URL takes no query or fragment"
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    let port = url.port_or_known_default().unwrap_or(80);
    let lookup_host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (lookup_host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{text:?}: cannot resolve {host}: {e}"))?
        .min_by_key(|a| a.is_ipv6())
        .ok_or_else(|| format!("{text:?}: {host} resolves to no address"))?;
    let host_header = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let base_path = url.path().trim_end_matches('/').to_string();
    Ok((addr, host_header, base_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match load_str(text, EnvOverrides::Ignore) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|p| p.to_string()).collect(),
        }
    }

    const GOOD: &str = r#"
        [server]
        listen = "127.0.0.1:18080"
        max_body_bytes = "64KiB"
        [admin]
        listen = "127.0.0.1:19901"
        [upstreams.menu]
        url = "http://127.0.0.1:9001/base/"
        timeout = "5s"
        [[routes]]
        name = "restaurant"
        methods = ["GET"]
        path = "/restaurant/{id}"
        upstream = "menu"
        rewrite = "/api/restaurant/{id}"
    "#;

    #[test]
    fn connection_limits_have_defaults_and_are_read() {
        let c = load_str(GOOD, EnvOverrides::Ignore).unwrap();
        assert_eq!(c.server.connections, ConnectionLimits::default());
        assert_eq!(c.server.connections.header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.connections.keepalive_requests, 1000);
        let text = GOOD.replace(
            "max_body_bytes = \"64KiB\"",
            "header_timeout = \"2s\"\nkeepalive_timeout = \"250ms\"\nbody_timeout = \"1m\"\n\
             keepalive_requests = 7\nmax_connections = 9",
        );
        let c = load_str(&text, EnvOverrides::Ignore).unwrap();
        assert_eq!(
            c.server.connections,
            ConnectionLimits {
                header_timeout: Duration::from_secs(2),
                keepalive_timeout: Duration::from_millis(250),
                body_timeout: Duration::from_secs(60),
                keepalive_requests: 7,
                max_connections: 9,
            }
        );
        let p = problems(&GOOD.replace(
            "max_body_bytes = \"64KiB\"",
            "keepalive_requests = 0\nmax_connections = 0\nheader_timeout = \"0s\"",
        ));
        assert_eq!(
            p,
            vec![
                "server.header_timeout: must be greater than zero".to_string(),
                format!(
                    "server.keepalive_requests: 0 is not between 1 and {}",
                    u32::MAX
                ),
                "server.max_connections: 0 is not between 1 and 10000000".to_string(),
            ]
        );
    }

    #[test]
    fn a_good_file_gives_typed_settings() {
        let c = load_str(GOOD, EnvOverrides::Ignore).unwrap();
        assert_eq!(c.server.max_body_bytes, 64 * 1024);
        assert_eq!(c.server.threads, 2);
        let up = &c.upstreams["menu"];
        assert_eq!(up.timeout, Duration::from_secs(5));
        assert_eq!(up.host_header, "127.0.0.1:9001");
        assert_eq!(up.base_path, "/base");
        assert_eq!(
            c.routes[0].rewrite.as_ref().unwrap().as_str(),
            "/api/restaurant/{id}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            bogus = 1
            [server]
            listen = "nowhere"
            max_body_bytes = "lots"
            shutdown_timeout = 5
            [upstreams.a]
            url = "ftp://x"
            [upstreams.b]
            url = "http://127.0.0.1:1"
            colour = "red"
            [[routes]]
            name = "one"
            path = "/x/{id}"
            upstream = "clvv"
            rewrite = "/y/{name}"
            [[routes]]
            name = "one"
            methods = ["get"]
            path = "no-slash"
            upstream = "a"
        "#;
        let p = problems(text);
        let expect = [
            "bogus: unknown section",
            "server.listen: \"nowhere\"",
            "server.max_body_bytes:",
            "server.shutdown_timeout: 5 has no unit",
            "upstreams.a.url:",
            "upstreams.b.colour: unknown key \"colour\"",
            "routes[0].upstream: no upstream named \"clvv\"",
            "routes[0].rewrite: \"/y/{name}\" uses parameter {name}",
            "routes[1].methods[0]:",
            "routes[1].path: \"no-slash\" must start with '/'",
            "routes[1].name: \"one\" is already the name of routes[0]",
        ];
        for e in expect {
            assert!(
                p.iter().any(|l| l.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    #[test]
    fn duplicate_names_and_overlapping_routes_are_errors() {
        let text = r#"
            [upstreams.u]
            url = "http://127.0.0.1:9"
            [[routes]]
            name = "a"
            methods = ["GET"]
            path = "/p/{id}"
            upstream = "u"
            [[routes]]
            name = "b"
            methods = ["GET", "POST"]
            path = "/p/{other}"
            upstream = "u"
            [[routes]]
            name = "c"
            methods = ["DELETE"]
            path = "/p/{id}"
            upstream = "u"
            [[routes]]
            name = "a"
            path = "/q"
            upstream = "u"
        "#;
        let p = problems(text);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(p[0]
            .starts_with("routes[1].path: \"/p/{other}\" matches the same requests as routes[0]"));
        assert!(p[1].starts_with("routes[3].name: \"a\" is already the name of routes[0]"));
    }

    #[test]
    fn cache_tables_are_validated() {
        let text = r#"
            [cache]
            max_bytes = "1MiB"
            [upstreams.u]
            url = "http://127.0.0.1:9"
            [[routes]]
            name = "ok"
            methods = ["GET", "HEAD"]
            path = "/ok/{id}"
            upstream = "u"
            cache = { ttl = "10s", stale_while_revalidate = "30s", statuses = { 404 = "30s" }, key_query = ["a"], key_headers = ["Accept-Language"], refresh_ahead = 0.8, jitter = 0.05, on_lock_timeout = "bypass" }
            [[routes]]
            name = "bad"
            methods = ["GET", "DELETE", "POST"]
            path = "/bad"
            upstream = "u"
            cache = { ttl = "0s", statuses = { 200 = "1s", 999 = "1s", 404 = "x" }, refresh_ahead = 1.5, jitter = 0.9, on_lock_timeout = "wait", key_body = [], colour = 1 }
        "#;
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].starts_with("routes[1].cache.colour: unknown key"),
            "{p:#?}"
        );

        let p = problems(&text.replace(", colour = 1", ""));
        let expect = [
            "routes[1].cache.ttl: must be greater than zero",
            "routes[1].cache.statuses.200:",
            "routes[1].cache.statuses.404: \"x\" is not a duration",
            "routes[1].cache.statuses.999: \"999\" is not an HTTP status code",
            "routes[1].cache.key_body:",
            "routes[1].cache.on_lock_timeout: \"wait\"",
            "routes[1].cache.refresh_ahead: 1.5",
            "routes[1].cache.jitter: 0.9",
            "routes[1].methods: DELETE cannot be cached",
            "routes[1].methods: POST cannot be cached",
        ];
        for e in expect {
            assert!(
                p.iter().any(|l| l.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");

        // The good route alone loads, with typed settings.
        let good_only = text
            .split("[[routes]]\n            name = \"bad\"")
            .next()
            .unwrap();
        let c = load_str(good_only, EnvOverrides::Ignore).unwrap();
        let cache = c.routes[0].cache.as_ref().unwrap();
        assert_eq!(cache.ttl_for(404), Some(Duration::from_secs(30)));
        assert_eq!(cache.ttl_for(500), None);
        assert_eq!(cache.key_headers[0].as_str(), "accept-language");
        assert_eq!(c.cache.max_bytes, 1024 * 1024);
    }

    #[test]
    fn aggregate_templates_are_validated() {
        let text = r#"
            [upstreams.u]
            url = "http://127.0.0.1:9"
            [[routes]]
            name = "list"
            methods = ["GET"]
            path = "/list"
            upstream = "u"
            cache = { ttl = "10s" }
            [[routes]]
            name = "item"
            methods = ["GET"]
            path = "/item/{id}"
            upstream = "u"
            cache = { ttl = "3s" }
            [[routes]]
            name = "good"
            path = "/good/{name}"
            respond = { first = "{a.x}", all = "{b}" }
            [[routes.legs]]
            name = "a"
            path = "/list"
            pick = { from = "/items", where = "name", equals = "{name}" }
            [[routes.legs]]
            name = "b"
            path = "/item/{a.id}"
            [[routes]]
            name = "bad"
            path = "/bad/{name}"
            upstream = "u"
            respond = { x = "{nobody.y}" }
            [[routes.legs]]
            name = "a"
            path = "/item/{b.id}"
            [[routes.legs]]
            name = "b"
            path = "/item/{colour}"
            for_each = "c"
            [[routes]]
            name = "loops"
            path = "/loops/{name}"
            [[routes.legs]]
            name = "c"
            path = "/good/{name}"
            [[routes.legs]]
            name = "d"
            path = "/nowhere"
        "#;
        let p = problems(text);
        let expect = [
            "routes[3].upstream: an aggregate route takes no upstream",
            "routes[3].legs[0].path: {b.id} is neither",
            "routes[3].legs[1].for_each: \"c\" is not an earlier leg",
            "routes[3].legs[1].path: {colour} is neither",
            "routes[3].respond: {nobody.y} is neither",
            "routes[4].legs[0].path: \"/good/{name}\" leads to aggregate route \"good\"",
            "routes[4].legs[1].path: GET \"/nowhere\" matches no route",
        ];
        for e in expect {
            assert!(
                p.iter().any(|l| l.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");

        let good_only = text
            .split("[[routes]]\n            name = \"bad\"")
            .next()
            .unwrap();
        let c = load_str(good_only, EnvOverrides::Ignore).unwrap();
        let good = c.routes.iter().find(|r| r.name == "good").unwrap();
        assert_eq!(
            good.cache.as_ref().unwrap().ttl,
            Duration::from_secs(3),
            "cached for the shortest TTL among its legs"
        );
    }

    #[test]
    fn same_address_for_admin_and_server_is_an_error() {
        let p = problems("[server]\nlisten = \"127.0.0.1:1\"\n[admin]\nlisten = \"127.0.0.1:1\"\n");
        assert_eq!(
            p,
            vec!["admin.listen: must differ from server.listen".to_string()]
        );
    }

    #[test]
    fn toml_syntax_errors_are_reported() {
        let p = problems("[server\nlisten = 1");
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn log_format_parses_lowercase() {
        let f: LogFormat = serde_json::from_str("\"json\"").unwrap();
        assert_eq!(f, LogFormat::Json);
        let f: LogFormat = serde_json::from_str("\"text\"").unwrap();
        assert_eq!(f, LogFormat::Text);
        assert!(serde_json::from_str::<LogFormat>("\"JSON\"").is_err());
    }

    #[test]
    fn upstream_urls_are_checked() {
        assert!(parse_upstream_url("https://127.0.0.1").is_err());
        assert!(parse_upstream_url("http://127.0.0.1/?q=1").is_err());
        assert!(parse_upstream_url("http://user:pw@127.0.0.1/").is_err());
        let (addr, host, base) = parse_upstream_url("http://localhost").unwrap();
        assert_eq!(addr.port(), 80);
        assert_eq!(host, "localhost");
        assert_eq!(base, "");
    }
}
