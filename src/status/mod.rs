//! The status page of the admin listener: `GET /status` (one self-contained HTML page,
//! [`PAGE`]) and `GET /status.json` ([`view`]), which the page fetches every two seconds.
//!
//! The JSON view is read from the same registry `/metrics` renders, gathered once per call,
//! so every number in it is the one `/metrics` would give at that moment; a few values come
//! from where `/metrics` itself reads them (the store's size, the upstream guards' fetches
//! in flight, the cluster's health) and the last error answers from [`errors`]. Nothing of
//! it runs on the request path.

pub mod errors;

use std::collections::{BTreeMap, HashMap};

use prometheus::proto::{Metric, MetricFamily};
use serde_json::{json, Map, Value};

use crate::control::Control;
use crate::gateway::UNMATCHED_ROUTE;

/// The page, built into the binary.
pub const PAGE: &str = include_str!("page.html");

/// What one route's series add up to.
#[derive(Default)]
struct RouteSums {
    requests: u64,
    by_cache: BTreeMap<String, u64>,
    by_status: BTreeMap<String, u64>,
    durations: Buckets,
    rate_limited: u64,
    fetches: BTreeMap<String, u64>,
    too_large: u64,
    coalesced_waiters: u64,
}

/// Cumulative histogram buckets merged over series of the same bounds: `(upper bound,
/// cumulative count)`, ending with `+Inf` and the total count.
#[derive(Default)]
struct Buckets(Vec<(f64, u64)>);

impl Buckets {
    fn add(&mut self, metric: &Metric) {
        let h = metric.get_histogram();
        let mut merged: Vec<(f64, u64)> = h
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        merged.push((f64::INFINITY, h.get_sample_count()));
        if self.0.is_empty() {
            self.0 = merged;
        } else if self.0.len() == merged.len() {
            for (mine, theirs) in self.0.iter_mut().zip(merged) {
                mine.1 += theirs.1;
            }
        }
    }

    fn count(&self) -> u64 {
        self.0.last().map_or(0, |b| b.1)
    }

    /// The `q` quantile in seconds, interpolated within its bucket as Prometheus'
    /// `histogram_quantile` does; `None` without observations.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut lower = (0.0, 0u64);
        for &(upper, cumulative) in &self.0 {
            if cumulative as f64 >= rank {
                if upper.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = (cumulative - lower.1) as f64;
                if in_bucket == 0.0 {
                    return Some(upper);
                }
                let share = (rank - lower.1 as f64) / in_bucket;
                return Some(lower.0 + (upper - lower.0) * share);
            }
            lower = (upper, cumulative);
        }
        Some(lower.0)
    }

    /// The `q` quantile in milliseconds, rounded to a microsecond.
    fn quantile_ms(&self, q: f64) -> Value {
        self.quantile(q)
            .map_or(Value::Null, |s| json!((s * 1e6).round() / 1e3))
    }
}

fn label<'a>(metric: &'a Metric, name: &str) -> &'a str {
    metric
        .get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

fn counter(metric: &Metric) -> u64 {
    metric.get_counter().get_value() as u64
}

fn gauge(metric: &Metric) -> i64 {
    metric.get_gauge().get_value() as i64
}

/// The JSON view. The caller brings the gauges `/metrics` sets before a scrape up to date
/// first (see `AdminApp`).
pub fn view(control: &Control) -> Value {
    let metrics = &control.shared.metrics;
    // The bulk series (request counts and latencies, per-route cache detail) are not
    // gathered: requests and latencies come from the routes' own handles below (the same
    // counters, read in place; latencies of the observed series only).
    let families: Vec<MetricFamily> = metrics.gather_light();
    let gateway = control.gateway.load();

    let mut routes: HashMap<String, RouteSums> = HashMap::new();
    let mut upstream_fetches: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
    let mut upstream_durations: HashMap<String, Buckets> = HashMap::new();
    let mut scalars: BTreeMap<String, i64> = BTreeMap::new();
    let mut reloads: BTreeMap<String, u64> = BTreeMap::new();
    let mut version = env!("CARGO_PKG_VERSION").to_string();
    let mut l2: Map<String, Value> = Map::new();
    let mut cache_too_large = 0;

    for family in &families {
        let name = family.name();
        for m in family.get_metric() {
            match name {
                "stoa_rate_limited_total" => {
                    routes
                        .entry(label(m, "route").to_string())
                        .or_default()
                        .rate_limited += counter(m);
                }
                "stoa_cache_too_large_total" => {
                    let n = counter(m);
                    cache_too_large += n;
                    routes
                        .entry(label(m, "route").to_string())
                        .or_default()
                        .too_large += n;
                }
                "stoa_coalesced_waiters_total" => {
                    routes
                        .entry(label(m, "route").to_string())
                        .or_default()
                        .coalesced_waiters += counter(m);
                }
                "stoa_upstream_fetches_total" => {
                    let (outcome, n) = (label(m, "outcome").to_string(), counter(m));
                    *routes
                        .entry(label(m, "route").to_string())
                        .or_default()
                        .fetches
                        .entry(outcome.clone())
                        .or_default() += n;
                    *upstream_fetches
                        .entry(label(m, "upstream").to_string())
                        .or_default()
                        .entry(outcome)
                        .or_default() += n;
                }
                "stoa_upstream_duration_seconds" => upstream_durations
                    .entry(label(m, "upstream").to_string())
                    .or_default()
                    .add(m),
                "stoa_config_reloads_total" => {
                    reloads.insert(label(m, "result").to_string(), counter(m));
                }
                "stoa_build_info" => version = label(m, "version").to_string(),
                "stoa_cache_entries"
                | "stoa_cache_bytes"
                | "stoa_requests_in_flight"
                | "stoa_cluster_redis_up" => {
                    scalars.insert(name.to_string(), gauge(m));
                }
                "stoa_cache_evictions_total" | "stoa_access_log_dropped_total" => {
                    scalars.insert(name.to_string(), counter(m) as i64);
                }
                l2_name if l2_name.starts_with("stoa_cache_l2_") => {
                    let short = l2_name
                        .trim_start_matches("stoa_cache_l2_")
                        .trim_end_matches("_total");
                    let key = match m.get_label().first() {
                        Some(l) => format!("{short}_{}", l.value()),
                        None => short.to_string(),
                    };
                    l2.insert(key, json!(counter(m)));
                }
                _ => {}
            }
        }
    }

    for (name, handles) in gateway
        .routes
        .routes()
        .iter()
        .map(|r| (r.spec.name.as_str(), &r.metrics))
        .chain([(UNMATCHED_ROUTE, &gateway.unmatched)])
    {
        let sums = routes.entry(name.to_string()).or_default();
        handles.each_count(|cache, status, n| {
            sums.requests += n;
            *sums.by_cache.entry(cache.label().to_string()).or_default() += n;
            let status = match status {
                0 => "other".to_string(),
                code => code.to_string(),
            };
            *sums.by_status.entry(status).or_default() += n;
        });
        for series in handles.observed_durations() {
            sums.durations.add(&series);
        }
    }

    let recent = errors::recent();
    let mut route_json = |name: &str, kind: &str, path: &str, upstream: Option<&str>| {
        let sums = routes.remove(name).unwrap_or_default();
        let cache = |status: &str| sums.by_cache.get(status).copied().unwrap_or(0);
        let hits = cache("hit") + cache("shared_hit") + cache("disk_hit");
        let lookups = hits + cache("miss") + cache("coalesced") + cache("stale");
        let fetch = |outcome: &str| sums.fetches.get(outcome).copied().unwrap_or(0);
        json!({
            "name": name,
            "kind": kind,
            "path": path,
            "upstream": upstream,
            "requests": sums.requests,
            "cache": {
                "hit": cache("hit"),
                "shared_hit": cache("shared_hit"),
                "disk_hit": cache("disk_hit"),
                "miss": cache("miss"),
                "coalesced": cache("coalesced"),
                "stale": cache("stale"),
                "bypass": cache("bypass"),
            },
            "hit_ratio": (lookups > 0).then(|| hits as f64 / lookups as f64),
            "statuses": sums.by_status,
            "p50_ms": sums.durations.quantile_ms(0.5),
            "p99_ms": sums.durations.quantile_ms(0.99),
            "rate_limited": sums.rate_limited,
            "upstream_fetches": {
                "ok": fetch("ok"),
                "error": fetch("error"),
                "timeout": fetch("timeout"),
            },
            "upstream_errors": fetch("error") + fetch("timeout"),
            "coalesced_waiters": sums.coalesced_waiters,
            "too_large": sums.too_large,
        })
    };
    let mut route_list: Vec<Value> = gateway
        .routes
        .routes()
        .iter()
        .map(|route| {
            let spec = &route.spec;
            let kind = if spec.aggregate.is_some() {
                "aggregate"
            } else if route.cache.is_some() {
                "cached"
            } else {
                "pass"
            };
            route_json(
                &spec.name,
                kind,
                spec.path.as_str(),
                spec.upstream.as_deref().map(|u| u.name.as_str()),
            )
        })
        .collect();
    route_list.push(route_json(UNMATCHED_ROUTE, "unmatched", "", None));

    let upstreams: Vec<Value> = gateway
        .config
        .upstreams
        .values()
        .map(|up| {
            let fetches = upstream_fetches.remove(&up.name).unwrap_or_default();
            let fetch = |outcome: &str| fetches.get(outcome).copied().unwrap_or(0);
            let durations = upstream_durations.remove(&up.name).unwrap_or_default();
            let guard = gateway.guards.get(&up.name);
            let last_error = recent
                .iter()
                .find(|e| e.upstream.as_deref() == Some(up.name.as_str()))
                .map(|e| json!({"at_ms": e.at_ms, "status": e.status, "message": e.message}));
            json!({
                "name": up.name,
                "in_flight": guard.map(|g| g.in_flight()),
                "max_in_flight": up.guard.max_in_flight,
                "fetches": {"ok": fetch("ok"), "error": fetch("error"), "timeout": fetch("timeout")},
                "p50_ms": durations.quantile_ms(0.5),
                "p99_ms": durations.quantile_ms(0.99),
                "last_error": last_error,
            })
        })
        .collect();

    let store = &control.shared.cache.store;
    let scalar = |name: &str| scalars.get(name).copied().unwrap_or(0);
    let cluster = gateway.cluster.as_ref().map(|cluster| {
        json!({
            "node": cluster.settings().node_name,
            "health": format!("{:?}", cluster.health()).to_lowercase(),
            "redis_up": scalar("stoa_cluster_redis_up") == 1,
            "l2": l2,
        })
    });
    let reload = control.last_reload();
    json!({
        "generated_at_ms": errors::now_ms(),
        "config": {
            "version": version,
            "routes": gateway.routes.routes().len(),
            "upstreams": gateway.config.upstreams.len(),
            "loaded_at_ms": control.loaded_at_ms(),
            "reloads": {
                "ok": reloads.get("ok").copied().unwrap_or(0),
                "error": reloads.get("error").copied().unwrap_or(0),
            },
            "last_reload": reload,
        },
        "requests_in_flight": scalar("stoa_requests_in_flight"),
        "access_log_dropped": scalar("stoa_access_log_dropped_total"),
        "cache": {
            "entries": scalar("stoa_cache_entries"),
            "bytes": scalar("stoa_cache_bytes"),
            "max_bytes": store.max_bytes(),
            "evictions": scalar("stoa_cache_evictions_total"),
            "too_large": cache_too_large,
            "fills_in_flight": control.shared.cache.fetches_in_flight(),
            "disk": control.shared.cache.disk.as_deref().map(disk_json),
        },
        "cluster": cluster,
        "routes": route_list,
        "upstreams": upstreams,
        "errors": {
            "total": errors::total(),
            "kept": errors::KEPT,
            "recent": recent,
        },
    })
}

/// The disk tier's part of the cache section: its state, lookups and writes.
fn disk_json(disk: &crate::cache::disk::Disk) -> Value {
    let m = disk.metrics();
    json!({
        "ready": disk.is_ready(),
        "max_bytes": disk.max_bytes(),
        "lookups": {
            "hit": m.lookups("hit"),
            "stale": m.lookups("stale"),
            "miss": m.lookups("miss"),
            "purged": m.lookups("purged"),
            "damaged": m.lookups("damaged"),
            "error": m.lookups("error"),
            "not_ready": m.lookups("not_ready"),
        },
        "writes": {
            "written": m.writes("written"),
            "dropped": m.writes("dropped"),
            "error": m.writes("error"),
        },
        "written_bytes": m.written_bytes.get(),
        "read_bytes": m.read_bytes.get(),
        "recovery_seconds": m.recovery_seconds.get(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheStatus;
    use crate::lane::Lane;
    use crate::metrics::Metrics;
    use std::time::Duration;

    fn route_buckets(m: &Metrics, route: &str) -> Buckets {
        let mut b = Buckets::default();
        for family in m.gather() {
            if family.name() == "stoa_request_duration_seconds" {
                for metric in family.get_metric() {
                    if label(metric, "route") == route {
                        b.add(metric);
                    }
                }
            }
        }
        b
    }

    #[test]
    fn quantiles_interpolate_within_the_merged_buckets() {
        let m = Metrics::new().unwrap();
        let r = m.route("r", true).unwrap();
        assert_eq!(route_buckets(&m, "r").quantile(0.5), None);
        // 7 hits in (0.0001, 0.00025], 3 misses in (0.025, 0.05].
        for _ in 0..7 {
            r.observe(
                200,
                CacheStatus::Hit,
                Lane::Answer,
                Duration::from_micros(200),
            );
        }
        for _ in 0..3 {
            r.observe(
                200,
                CacheStatus::Miss,
                Lane::Answer,
                Duration::from_millis(40),
            );
        }
        let b = route_buckets(&m, "r");
        assert_eq!(b.count(), 10);
        let p50 = b.quantile(0.5).unwrap();
        assert!(p50 > 0.0001 && p50 <= 0.00025, "{p50}");
        let p99 = b.quantile(0.99).unwrap();
        assert!(p99 > 0.025 && p99 <= 0.05, "{p99}");
        // Beyond the last finite bound: that bound.
        r.observe(
            200,
            CacheStatus::Hit,
            Lane::Answer,
            Duration::from_secs(100),
        );
        let b = route_buckets(&m, "r");
        assert_eq!(b.quantile(1.0), Some(30.0));
    }
}
