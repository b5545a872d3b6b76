//! The one way every section is validated: a [`Validator`] collects each problem with its
//! key path while turning raw values into typed settings. Each section adds its own
//! methods to it in its own file.

use std::net::SocketAddr;
use std::time::Duration;

use figment::value::{Dict, Value};
use figment::Figment;
use serde::de::DeserializeOwned;

use super::limits::NO_RATE_LIMIT;
use super::raw::{RawAdmin, RawCacheSection, RawDuration, RawLog, RawServer, RawSize};
use super::route::RouteSpec;
use super::{Config, ConfigErrors, Problem};

/// Collects problems while turning raw values into typed settings.
pub(super) struct Validator<'f> {
    figment: &'f Figment,
    pub(super) problems: Vec<Problem>,
}

impl<'f> Validator<'f> {
    pub(super) fn new(figment: &'f Figment) -> Self {
        Validator {
            figment,
            problems: Vec::new(),
        }
    }

    pub(super) fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Deserializes one section or entry, reporting a failure at its path. An unknown key,
    /// at any depth, is reported and set aside, and the rest is read again: so the known
    /// keys beside it are still validated and every problem shows in one run.
    pub(super) fn section<T: DeserializeOwned>(&mut self, path: &str, value: &Value) -> Option<T> {
        let source = self
            .figment
            .get_metadata(value.tag())
            .filter(|m| m.name.contains("environment"))
            .map(|_| " (set from the environment)")
            .unwrap_or("");
        let mut value = value.clone();
        loop {
            match value.deserialize::<T>() {
                Ok(v) => return Some(v),
                Err(e) => {
                    let mut set_aside = false;
                    for err in e {
                        if matches!(err.kind, figment::error::Kind::UnknownField(..)) {
                            set_aside |= remove_at(&mut value, &err.path);
                        }
                        self.report(path, &err, source);
                    }
                    if !set_aside {
                        return None;
                    }
                }
            }
        }
    }

    /// Reports one deserialization error of the section at `path`.
    fn report(&mut self, path: &str, err: &figment::Error, source: &str) {
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

    pub(super) fn run(mut self, mut root: Dict) -> Result<Config, ConfigErrors> {
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

    pub(super) fn address(
        &mut self,
        path: &str,
        value: Option<&str>,
        default: &str,
    ) -> Option<SocketAddr> {
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

    pub(super) fn duration(
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

    pub(super) fn size(
        &mut self,
        path: &str,
        value: Option<&RawSize>,
        default: u64,
    ) -> Option<u64> {
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

    pub(super) fn name_ok(&mut self, path: &str, name: &str) -> bool {
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
}

/// Removes the key at `path` (table keys and array indices) from `value`; `false` when
/// there is none.
fn remove_at(value: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut current = value;
    for step in parents {
        let next = match current {
            Value::Dict(_, dict) => dict.get_mut(step),
            Value::Array(_, items) => step.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        };
        let Some(next) = next else {
            return false;
        };
        current = next;
    }
    match current {
        Value::Dict(_, dict) => dict.remove(last).is_some(),
        _ => false,
    }
}
