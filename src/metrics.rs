//! Prometheus metrics: one [`Metrics`] owns a private registry and every stoa series.
//!
//! Handles are resolved once per route, upstream and rate-limit policy when a configuration
//! is built ([`Metrics::route`], [`Metrics::upstream`], [`Metrics::rate_limited`]) and again
//! on reload for new names. Recording through them costs a few atomic operations: no label
//! lookup, no formatting, no lock and no allocation per request once warm.
//!
//! Label values are bounded by the configuration: route, upstream and policy names, cache
//! statuses, fetch outcomes and HTTP status codes; never paths or client identities.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::cache::encoding::Counters;
use crate::cache::engine::Revalidations;
use crate::cache::purge::PurgeMetrics;
use crate::cache::tier::TierMetrics;
use crate::cache::vary::Refusals;
use crate::cache::CacheStatus;
use crate::config::Coding;
use crate::lane::Lane;

/// The `Content-Type` of [`Metrics::render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Latency buckets in seconds: from 100µs (memory hits) to 30s (slow upstream misses).
/// The usual timeouts (1 s to connect, 5 s and 10 s to answer) each have a bucket ending at
/// them and one just above: a request cut at a 5 s timeout takes 5.00x s and lands in
/// (5, 5.5], so a p99 made of such requests reads about 5.5 s, not the 9.6 s a (5, 10]
/// bucket would interpolate to.
pub const DURATION_BUCKETS: [f64; 23] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.25,
    2.5, 5.0, 5.5, 6.0, 7.5, 10.0, 11.0, 15.0, 30.0,
];

/// Status codes 100..=599 get one slot each; anything else shares the last one.
const STATUS_SLOTS: usize = 501;
const OTHER_STATUS_SLOT: usize = STATUS_SLOTS - 1;

/// How an upstream fetch ended: the `outcome` label of `stoa_upstream_fetches_total`.
/// The same on cached and pass-through routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FetchOutcome {
    /// The upstream answered with a status below 500 (a 404 is an answer, too).
    Ok,
    /// The upstream answered 5xx, or the connection or protocol failed.
    Error,
    /// The upstream did not answer in time.
    Timeout,
}

impl FetchOutcome {
    pub const ALL: [FetchOutcome; 3] =
        [FetchOutcome::Ok, FetchOutcome::Error, FetchOutcome::Timeout];

    /// The metrics label value.
    pub fn label(self) -> &'static str {
        match self {
            FetchOutcome::Ok => "ok",
            FetchOutcome::Error => "error",
            FetchOutcome::Timeout => "timeout",
        }
    }
}

/// Every stoa series, in a registry of its own (no global registry).
pub struct Metrics {
    registry: Registry,
    /// The series the status page does not read as families (latency histograms, which it
    /// takes from the routes' own handles, observed ones only, and per-route cache detail):
    /// most of a scrape's bulk with many routes. `/metrics` renders both registries.
    bulk: Registry,
    /// Each route's counter tables by name: a reload's handles share them, so they reach
    /// every series the route's earlier handles made (see [`RouteMetrics::each_count`]).
    route_cells: std::sync::Mutex<std::collections::HashMap<Box<str>, Arc<RouteCells>>>,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_fetches: IntCounterVec,
    upstream_duration: HistogramVec,
    coalesced_waiters: IntCounterVec,
    rate_limited: IntCounterVec,
    cache_entries: IntGauge,
    cache_bytes: IntGauge,
    cache_evictions: IntCounter,
    cache_too_large: IntCounterVec,
    compressions: IntCounterVec,
    compression_saved: IntCounterVec,
    cache_revalidations: IntCounterVec,
    cache_not_modified: IntCounterVec,
    cache_variants_refused: IntCounterVec,
    tier: TierMetrics,
    purges: PurgeMetrics,
    in_flight: IntGauge,
    reloads_ok: IntCounter,
    reloads_error: IntCounter,
    access_log_dropped: IntCounter,
    trace_spans_dropped: IntCounter,
}

impl Metrics {
    /// Registers every series; `stoa_build_info{version}` is set to 1 here.
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let bulk = Registry::new();
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
                labels,
            )
        };
        let requests = register(
            &bulk,
            IntCounterVec::new(
                Opts::new(
                    "stoa_requests_total",
                    "Requests answered, by route, HTTP status, cache status and lane (which \
                     code answered: answer, forward, proxy:<why>).",
                ),
                &["route", "status", "cache", "lane"],
            )?,
        )?;
        let request_duration = register(
            &bulk,
            histogram(
                "stoa_request_duration_seconds",
                "Time from request to response, by route and cache status.",
                &["route", "cache"],
            )?,
        )?;
        let upstream_fetches = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "stoa_upstream_fetches_total",
                    "Upstream fetches, by upstream, route and outcome (ok, error, timeout).",
                ),
                &["upstream", "route", "outcome"],
            )?,
        )?;
        let upstream_duration = register(
            &registry,
            histogram(
                "stoa_upstream_duration_seconds",
                "Duration of upstream fetches, whatever their outcome, by upstream.",
                &["upstream"],
            )?,
        )?;
        let coalesced_waiters = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "stoa_coalesced_waiters_total",
                    "Requests that waited for another request's upstream fetch, by route.",
                ),
                &["route"],
            )?,
        )?;
        let rate_limited = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "stoa_rate_limited_total",
                    "Requests refused with 429 by a rate limit, by route and policy.",
                ),
                &["route", "policy"],
            )?,
        )?;
        let cache_entries = register(
            &registry,
            IntGauge::new("stoa_cache_entries", "Entries in the response cache.")?,
        )?;
        let cache_bytes = register(
            &registry,
            IntGauge::new("stoa_cache_bytes", "Weight of the response cache in bytes.")?,
        )?;
        let cache_evictions = register(
            &registry,
            IntCounter::new(
                "stoa_cache_evictions_total",
                "Entries evicted from the response cache to stay within its size.",
            )?,
        )?;
        let cache_too_large = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "stoa_cache_too_large_total",
                    "Answers on cached routes larger than max_entry_bytes, streamed uncached, by route.",
                ),
                &["route"],
            )?,
        )?;
        let compressions = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "stoa_cache_compressions_total",
                    "Stored answers compressed, by encoding (br, zstd, gzip): once per entry and encoding.",
                ),
                &["encoding"],
            )?,
        )?;
        let compression_saved = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "stoa_cache_compression_saved_bytes_total",
                    "Bytes compression took off stored answers, by encoding.",
                ),
                &["encoding"],
            )?,
        )?;
        for coding in Coding::ALL {
            compressions.get_metric_with_label_values(&[coding.token()])?;
            compression_saved.get_metric_with_label_values(&[coding.token()])?;
        }
        let cache_revalidations = register(
            &bulk,
            IntCounterVec::new(
                Opts::new(
                    "stoa_cache_revalidations_total",
                    "Stored answers revalidated upstream, by route and result (not_modified, modified, failed).",
                ),
                &["route", "result"],
            )?,
        )?;
        let cache_not_modified = register(
            &bulk,
            IntCounterVec::new(
                Opts::new(
                    "stoa_cache_not_modified_total",
                    "304 answers stoa gave to clients' conditional requests from memory, by route.",
                ),
                &["route"],
            )?,
        )?;
        let cache_variants_refused = register(
            &bulk,
            IntCounterVec::new(
                Opts::new(
                    "stoa_cache_variants_refused_total",
                    "Answers on cached routes not stored for their Vary, by route and reason (max_variants: a new variant of a request with max_variants stored; max_vary_headers: it varies on more request headers than a route learns).",
                ),
                &["route", "reason"],
            )?,
        )?;
        let in_flight = register(
            &registry,
            IntGauge::new(
                "stoa_requests_in_flight",
                "Requests being handled right now.",
            )?,
        )?;
        let reloads = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "stoa_config_reloads_total",
                    "Configuration reloads, by result (ok, error).",
                ),
                &["result"],
            )?,
        )?;
        let access_log_dropped = register(
            &registry,
            IntCounter::new(
                "stoa_access_log_dropped_total",
                "Access log lines dropped because the log writer fell behind.",
            )?,
        )?;
        let trace_spans_dropped = register(
            &registry,
            IntCounter::new(
                "stoa_trace_spans_dropped_total",
                "Trace spans dropped: the export queue was full, or the collector did not take them.",
            )?,
        )?;
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "stoa_build_info",
                    "Always 1; the version label names the running build.",
                ),
                &["version"],
            )?,
        )?;
        build_info
            .get_metric_with_label_values(&[env!("CARGO_PKG_VERSION")])?
            .set(1);
        let tier = TierMetrics::register(&registry)?;
        let purges = PurgeMetrics::register(&registry)?;
        Ok(Metrics {
            tier,
            purges,
            reloads_ok: reloads.get_metric_with_label_values(&["ok"])?,
            reloads_error: reloads.get_metric_with_label_values(&["error"])?,
            registry,
            bulk,
            route_cells: Default::default(),
            requests,
            request_duration,
            upstream_fetches,
            upstream_duration,
            coalesced_waiters,
            rate_limited,
            cache_entries,
            cache_bytes,
            cache_evictions,
            cache_too_large,
            compressions,
            compression_saved,
            cache_revalidations,
            cache_not_modified,
            cache_variants_refused,
            in_flight,
            access_log_dropped,
            trace_spans_dropped,
        })
    }

    /// Handles for one route. `cached` says which `cache` values the route will report
    /// (hit, miss, stale, bypass, coalesced for a cached route; none otherwise): their
    /// latency histograms and `stoa_coalesced_waiters_total` are exported at zero from
    /// the start. Calling it again for the same name (on reload) continues the same series.
    pub fn route(&self, name: &str, cached: bool) -> prometheus::Result<RouteMetrics> {
        let cells = {
            let mut map = self.route_cells.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(name) {
                Some(cells) => cells.clone(),
                None => {
                    let cells = Arc::new(RouteCells {
                        by_cache: std::array::from_fn(|_| CacheSlot::default()),
                        coalesced: self
                            .coalesced_waiters
                            .get_metric_with_label_values(&[name])?,
                    });
                    map.insert(name.into(), cells.clone());
                    cells
                }
            }
        };
        let route = RouteMetrics {
            name: name.into(),
            requests: self.requests.clone(),
            durations: self.request_duration.clone(),
            cells,
        };
        // `shared_hit` exists only with `[cluster]`, `disk_hit` only with `cache.disk`: their
        // series appear with their first use.
        for cache in CacheStatus::ALL {
            let optional = matches!(cache, CacheStatus::SharedHit | CacheStatus::DiskHit);
            if cached == (cache != CacheStatus::None) && !optional {
                let histogram = self
                    .request_duration
                    .get_metric_with_label_values(&[name, cache.label()])?;
                // Stored unless an earlier handle of the route stored it (the same series).
                let _ = route.slot(cache).duration.set(histogram);
            }
        }
        Ok(route)
    }

    /// Handles for the fetches a route makes to an upstream; every outcome starts at zero.
    pub fn upstream(&self, upstream: &str, route: &str) -> prometheus::Result<UpstreamMetrics> {
        let fetches = |outcome: FetchOutcome| {
            self.upstream_fetches
                .get_metric_with_label_values(&[upstream, route, outcome.label()])
        };
        Ok(UpstreamMetrics {
            ok: fetches(FetchOutcome::Ok)?,
            error: fetches(FetchOutcome::Error)?,
            timeout: fetches(FetchOutcome::Timeout)?,
            duration: self
                .upstream_duration
                .get_metric_with_label_values(&[upstream])?,
        })
    }

    /// The counter of 429s a policy gives on a route (exported at zero from the start).
    pub fn rate_limited(&self, route: &str, policy: &str) -> prometheus::Result<IntCounter> {
        self.rate_limited
            .get_metric_with_label_values(&[route, policy])
    }

    /// The counter of a cached route's answers too large to store (exported at zero).
    pub fn cache_too_large(&self, route: &str) -> prometheus::Result<IntCounter> {
        self.cache_too_large.get_metric_with_label_values(&[route])
    }

    /// The counters of a cached route's answers not stored for their `Vary`, by reason
    /// (exported at zero).
    pub fn cache_variants_refused(&self, route: &str) -> prometheus::Result<Refusals> {
        let reason = |r: &str| {
            self.cache_variants_refused
                .get_metric_with_label_values(&[route, r])
        };
        Ok(Refusals {
            max_variants: reason("max_variants")?,
            max_vary_headers: reason("max_vary_headers")?,
        })
    }

    /// The counters of compressions done and bytes saved, by encoding (shared by every
    /// cached route).
    pub fn compressions(&self) -> prometheus::Result<Counters> {
        let pair = |c: Coding| -> prometheus::Result<(IntCounter, IntCounter)> {
            Ok((
                self.compressions
                    .get_metric_with_label_values(&[c.token()])?,
                self.compression_saved
                    .get_metric_with_label_values(&[c.token()])?,
            ))
        };
        Ok(Counters::new([
            pair(Coding::Br)?,
            pair(Coding::Zstd)?,
            pair(Coding::Gzip)?,
        ]))
    }

    /// The counters of a cached route's revalidations, by result (exported at zero).
    pub fn cache_revalidations(&self, route: &str) -> prometheus::Result<Revalidations> {
        let result = |r: &str| {
            self.cache_revalidations
                .get_metric_with_label_values(&[route, r])
        };
        Ok(Revalidations {
            not_modified: result("not_modified")?,
            modified: result("modified")?,
            failed: result("failed")?,
        })
    }

    /// The counter of 304s a cached route answers from memory (exported at zero).
    pub fn cache_not_modified(&self, route: &str) -> prometheus::Result<IntCounter> {
        self.cache_not_modified
            .get_metric_with_label_values(&[route])
    }

    /// Sets `stoa_cache_entries` and `stoa_cache_bytes` (e.g. from the store before a scrape).
    pub fn set_cache_stats(&self, entries: u64, bytes: u64) {
        self.cache_entries.set(saturating_i64(entries));
        self.cache_bytes.set(saturating_i64(bytes));
    }

    /// Counts `n` cache evictions.
    pub fn cache_evicted(&self, n: u64) {
        self.cache_evictions.inc_by(n);
    }

    /// Sets `stoa_requests_in_flight` from the count the process lifecycle keeps.
    pub fn set_in_flight(&self, n: u64) {
        self.in_flight.set(saturating_i64(n));
    }

    /// Counts one configuration reload attempt.
    pub fn config_reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.inc();
        } else {
            self.reloads_error.inc();
        }
    }

    /// The registry, for collectors of other modules.
    /// The shared cache tier's counters (at zero without `[cluster]`).
    pub fn purges(&self) -> &PurgeMetrics {
        &self.purges
    }

    pub fn tier(&self) -> &TierMetrics {
        &self.tier
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every series in the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.gather())
            .unwrap_or_else(|e| format!("# stoa: encoding metrics failed: {e}\n"))
    }

    /// Every family, as [`Metrics::render`] writes them, in name order.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.gather_light();
        families.extend(self.bulk.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        families
    }

    /// [`Metrics::gather`] without the bulk series (see `Metrics::bulk`): what the status
    /// page reads as families.
    pub fn gather_light(&self) -> Vec<prometheus::proto::MetricFamily> {
        // The access log counts its drops itself (it has no handle on the metrics).
        let dropped = crate::telemetry::access_log_dropped();
        let seen = self.access_log_dropped.get();
        if dropped > seen {
            self.access_log_dropped.inc_by(dropped - seen);
        }
        let dropped = crate::otel::spans_dropped();
        let seen = self.trace_spans_dropped.get();
        if dropped > seen {
            self.trace_spans_dropped.inc_by(dropped - seen);
        }
        self.registry.gather()
    }
}

/// What a route can answer, to create its common `stoa_requests_total` series at zero
/// (see [`RouteMetrics::expect`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteProfile<'a> {
    /// Answers come through the cache (cached and aggregate routes).
    pub cached: bool,
    /// Statuses the cache stores besides 200 (e.g. 404).
    pub cacheable: &'a [u16],
    /// Stale answers are possible (`stale_while_revalidate` or `stale_if_error`).
    pub stale: bool,
    /// A rate-limit policy applies, so 429s are possible.
    pub limited: bool,
}

impl RouteProfile<'_> {
    /// The (cache, status) pairs a route of this profile commonly answers: on a cached route
    /// 200 (and the other cacheable statuses) from every cache status it reports, 500, 502,
    /// 503 and 504 where the upstream is asked; on a pass-through route 200, 404, 500, 502, 503 and
    /// 504; and 429 when rate limited (`cache="bypass"` on a cached route, which answers it
    /// before the cache, `"none"` elsewhere). Bounded: a few dozen pairs per
    /// route. Other statuses still get their series, on first use.
    pub fn answers(&self) -> Vec<(CacheStatus, u16)> {
        let mut out = Vec::new();
        if self.cached {
            let mut served = vec![CacheStatus::Hit, CacheStatus::Miss, CacheStatus::Coalesced];
            if self.stale {
                served.push(CacheStatus::Stale);
            }
            for cache in served {
                out.push((cache, 200));
                out.extend(self.cacheable.iter().map(|&status| (cache, status)));
            }
            out.push((CacheStatus::Bypass, 200));
            for cache in [CacheStatus::Miss, CacheStatus::Coalesced] {
                // The upstream's own 500 and 503 pass through; 502 and 504 are stoa's.
                out.extend([500, 502, 503, 504].map(|status| (cache, status)));
            }
        } else {
            // The upstream's own common answers pass through, and stoa's 502 and 504.
            out.extend([200, 404, 500, 502, 503, 504].map(|status| (CacheStatus::None, status)));
        }
        if self.limited {
            let cache = if self.cached {
                CacheStatus::Bypass
            } else {
                CacheStatus::None
            };
            out.push((cache, 429));
        }
        out
    }
}

/// The request series of one route.
///
/// The `status` label is dynamic, so its counters are created lazily but looked up without
/// locks: per cache status and lane, a table with one `OnceLock<IntCounter>` per status code
/// 100..=599 (plus one slot, labelled `other`, for codes outside that range), itself
/// allocated on the first request with that cache status and lane. The first request with a
/// given (cache, lane, status) triple pays one registry lookup and the formatting of the
/// label; every later one is array indexes, an atomic load and an atomic add. A table is
/// about 8 KiB, and a route only allocates the tables of the (cache, lane) pairs it actually
/// reports (one or two, as a route's requests take one lane). A fixed set of
/// common codes would need a fallback (a lock or a map) for the rest; this keeps one path.
pub struct RouteMetrics {
    name: Box<str>,
    requests: IntCounterVec,
    durations: HistogramVec,
    cells: Arc<RouteCells>,
}

/// A route's series handles, shared by its handles across reloads.
struct RouteCells {
    by_cache: [CacheSlot; CacheStatus::ALL.len()],
    coalesced: IntCounter,
}

#[derive(Default)]
struct CacheSlot {
    duration: OnceLock<Histogram>,
    /// By lane ([`Lane::index`]).
    statuses: [OnceLock<StatusTable>; Lane::ALL.len()],
}

/// One (cache, lane) pair's counters by status code, and which of them exist (so reading
/// them all walks the few that do, not the 501 cells).
struct StatusTable {
    cells: Box<[OnceLock<IntCounter>]>,
    made: parking_lot::Mutex<Vec<u16>>,
}

impl StatusTable {
    fn new() -> StatusTable {
        StatusTable {
            cells: (0..STATUS_SLOTS).map(|_| OnceLock::new()).collect(),
            made: parking_lot::Mutex::new(Vec::new()),
        }
    }
}

impl RouteMetrics {
    /// Records one answered request: `stoa_requests_total` and `stoa_request_duration_seconds`.
    pub fn observe(&self, status: u16, cache: CacheStatus, lane: Lane, elapsed: Duration) {
        if let Some(counter) = self.status_counter(status, cache, lane) {
            counter.inc();
        }
        if let Some(histogram) = self.duration(cache) {
            histogram.observe(elapsed.as_secs_f64());
        }
    }

    /// Creates the `stoa_requests_total` series of these (cache, status) pairs at zero, so
    /// that the first burst of each is seen by `increase()` and `rate()` (a series that
    /// appears with its first value already counted hides that value).
    pub fn expect(&self, lane: Lane, answers: impl IntoIterator<Item = (CacheStatus, u16)>) {
        for (cache, status) in answers {
            self.status_counter(status, cache, lane);
        }
    }

    /// Counts one request that waited for another request's fetch.
    pub fn coalesced_waiter(&self) {
        self.cells.coalesced.inc();
    }

    /// This route's `stoa_request_duration_seconds` series that have observations, one
    /// per cache status (what the status page merges into its p50/p99).
    pub fn observed_durations(&self) -> impl Iterator<Item = prometheus::proto::Metric> + '_ {
        use prometheus::core::Metric as _;
        self.cells
            .by_cache
            .iter()
            .filter_map(|slot| slot.duration.get())
            .filter(|h| h.get_sample_count() > 0)
            .map(|h| h.metric())
    }

    /// Calls `each(cache, status, count)` for every `stoa_requests_total` series of this
    /// route, one call per lane (`status` 0 is the `other` series), reading the counters
    /// themselves: what a scrape would say, without building the series.
    pub fn each_count(&self, mut each: impl FnMut(CacheStatus, u16, u64)) {
        for cache in CacheStatus::ALL {
            for table in self.slot(cache).statuses.iter().filter_map(OnceLock::get) {
                let made = table.made.lock().clone();
                for index in made {
                    let index = usize::from(index);
                    if let Some(counter) = table.cells.get(index).and_then(OnceLock::get) {
                        let status = if index == OTHER_STATUS_SLOT {
                            0
                        } else {
                            u16::try_from(index + 100).unwrap_or(0)
                        };
                        each(cache, status, counter.get());
                    }
                }
            }
        }
    }

    /// This route's `stoa_coalesced_waiters_total`.
    pub fn coalesced_waiters(&self) -> u64 {
        self.cells.coalesced.get()
    }

    /// The route name these handles report.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn slot(&self, cache: CacheStatus) -> &CacheSlot {
        let index = match cache {
            CacheStatus::Hit => 0,
            CacheStatus::Miss => 1,
            CacheStatus::Stale => 2,
            CacheStatus::Bypass => 3,
            CacheStatus::Coalesced => 4,
            CacheStatus::None => 5,
            CacheStatus::SharedHit => 6,
            CacheStatus::DiskHit => 7,
        };
        &self.cells.by_cache[index]
    }

    fn status_counter(&self, status: u16, cache: CacheStatus, lane: Lane) -> Option<&IntCounter> {
        let table = self.slot(cache).statuses[lane.index()].get_or_init(StatusTable::new);
        let index = match status {
            100..=599 => usize::from(status - 100),
            _ => OTHER_STATUS_SLOT,
        };
        let cell = table.cells.get(index)?;
        if let Some(counter) = cell.get() {
            return Some(counter);
        }
        let label = match status {
            100..=599 => status.to_string(),
            _ => "other".to_string(),
        };
        let counter = self
            .requests
            .get_metric_with_label_values(&[&*self.name, &label, cache.label(), lane.label()])
            .ok()?;
        if cell.set(counter).is_ok() {
            if let Ok(index) = u16::try_from(index) {
                table.made.lock().push(index);
            }
        }
        cell.get()
    }

    fn duration(&self, cache: CacheStatus) -> Option<&Histogram> {
        let cell = &self.slot(cache).duration;
        if let Some(histogram) = cell.get() {
            return Some(histogram);
        }
        let histogram = self
            .durations
            .get_metric_with_label_values(&[&*self.name, cache.label()])
            .ok()?;
        Some(cell.get_or_init(|| histogram))
    }
}

/// The fetch series of one (upstream, route) pair.
pub struct UpstreamMetrics {
    ok: IntCounter,
    error: IntCounter,
    timeout: IntCounter,
    duration: Histogram,
}

impl UpstreamMetrics {
    /// Records one upstream fetch: `stoa_upstream_fetches_total` and
    /// `stoa_upstream_duration_seconds` (observed for every outcome).
    pub fn fetch(&self, outcome: FetchOutcome, elapsed: Duration) {
        match outcome {
            FetchOutcome::Ok => self.ok.inc(),
            FetchOutcome::Error => self.error.inc(),
            FetchOutcome::Timeout => self.timeout.inc(),
        }
        self.duration.observe(elapsed.as_secs_f64());
    }
}

fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> prometheus::Result<C> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The lines of `text` whose series name is exactly `name`.
    fn series<'a>(text: &'a str, name: &str) -> BTreeSet<&'a str> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .collect()
    }

    fn set(lines: &[&'static str]) -> BTreeSet<&'static str> {
        lines.iter().copied().collect()
    }

    #[test]
    fn recordings_render_as_exact_counter_lines() {
        let m = Metrics::new().unwrap();
        let restaurant = m.route("restaurant", true).unwrap();
        let upstream = m.upstream("restaurants", "restaurant").unwrap();
        let limited = m.rate_limited("restaurant", "default").unwrap();

        restaurant.observe(
            200,
            CacheStatus::Hit,
            Lane::Answer,
            Duration::from_micros(200),
        );
        restaurant.observe(
            200,
            CacheStatus::Hit,
            Lane::Answer,
            Duration::from_micros(300),
        );
        restaurant.observe(200, CacheStatus::Miss, Lane::Answer, ms(1200));
        restaurant.observe(404, CacheStatus::Miss, Lane::Answer, ms(40));
        restaurant.observe(200, CacheStatus::Coalesced, Lane::Answer, ms(900));
        restaurant.observe(1000, CacheStatus::Bypass, Lane::Answer, ms(1));
        restaurant.coalesced_waiter();
        upstream.fetch(FetchOutcome::Ok, ms(1100));
        upstream.fetch(FetchOutcome::Ok, ms(35));
        upstream.fetch(FetchOutcome::Timeout, ms(5000));
        limited.inc();
        limited.inc();
        limited.inc();
        m.set_cache_stats(10, 2048);
        m.cache_evicted(2);
        m.set_in_flight(4);
        m.config_reload(true);
        m.config_reload(false);
        m.config_reload(true);

        let text = m.render();
        assert_eq!(
            series(&text, "stoa_requests_total"),
            set(&[
                r#"stoa_requests_total{cache="bypass",lane="answer",route="restaurant",status="other"} 1"#,
                r#"stoa_requests_total{cache="coalesced",lane="answer",route="restaurant",status="200"} 1"#,
                r#"stoa_requests_total{cache="hit",lane="answer",route="restaurant",status="200"} 2"#,
                r#"stoa_requests_total{cache="miss",lane="answer",route="restaurant",status="200"} 1"#,
                r#"stoa_requests_total{cache="miss",lane="answer",route="restaurant",status="404"} 1"#,
            ])
        );
        assert_eq!(
            series(&text, "stoa_upstream_fetches_total"),
            set(&[
                r#"stoa_upstream_fetches_total{outcome="error",route="restaurant",upstream="restaurants"} 0"#,
                r#"stoa_upstream_fetches_total{outcome="ok",route="restaurant",upstream="restaurants"} 2"#,
                r#"stoa_upstream_fetches_total{outcome="timeout",route="restaurant",upstream="restaurants"} 1"#,
            ])
        );
        assert_eq!(
            series(&text, "stoa_coalesced_waiters_total"),
            set(&[r#"stoa_coalesced_waiters_total{route="restaurant"} 1"#])
        );
        assert_eq!(
            series(&text, "stoa_rate_limited_total"),
            set(&[r#"stoa_rate_limited_total{policy="default",route="restaurant"} 3"#])
        );
        assert_eq!(
            series(&text, "stoa_config_reloads_total"),
            set(&[
                r#"stoa_config_reloads_total{result="error"} 1"#,
                r#"stoa_config_reloads_total{result="ok"} 2"#,
            ])
        );
        assert_eq!(
            series(&text, "stoa_cache_entries"),
            set(&["stoa_cache_entries 10"])
        );
        assert_eq!(
            series(&text, "stoa_cache_bytes"),
            set(&["stoa_cache_bytes 2048"])
        );
        assert_eq!(
            series(&text, "stoa_cache_evictions_total"),
            set(&["stoa_cache_evictions_total 2"])
        );
        assert_eq!(
            series(&text, "stoa_requests_in_flight"),
            set(&["stoa_requests_in_flight 4"])
        );
        assert_eq!(
            series(&text, "stoa_request_duration_seconds_count"),
            set(&[
                r#"stoa_request_duration_seconds_count{cache="bypass",route="restaurant"} 1"#,
                r#"stoa_request_duration_seconds_count{cache="coalesced",route="restaurant"} 1"#,
                r#"stoa_request_duration_seconds_count{cache="hit",route="restaurant"} 2"#,
                r#"stoa_request_duration_seconds_count{cache="miss",route="restaurant"} 2"#,
                r#"stoa_request_duration_seconds_count{cache="stale",route="restaurant"} 0"#,
            ])
        );
        assert_eq!(
            series(&text, "stoa_upstream_duration_seconds_count"),
            set(&[r#"stoa_upstream_duration_seconds_count{upstream="restaurants"} 3"#])
        );
    }

    #[test]
    fn histograms_have_every_bucket() {
        let m = Metrics::new().unwrap();
        let route = m.route("restaurant", true).unwrap();
        route.observe(
            200,
            CacheStatus::Hit,
            Lane::Answer,
            Duration::from_micros(200),
        );
        route.observe(
            200,
            CacheStatus::Hit,
            Lane::Answer,
            Duration::from_micros(300),
        );
        route.observe(200, CacheStatus::Hit, Lane::Answer, Duration::from_secs(60));
        let text = m.render();

        let hit_buckets: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("stoa_request_duration_seconds_bucket{cache=\"hit\",")
                    && l.contains("route=\"restaurant\"")
            })
            .collect();
        assert_eq!(hit_buckets.len(), DURATION_BUCKETS.len() + 1, "{text}");
        for (line, le) in hit_buckets.iter().zip(DURATION_BUCKETS) {
            assert!(line.contains(&format!("le=\"{le}\"")), "{line}");
        }
        // Cumulative counts: nothing at 100µs, both fast hits by 250µs and 500µs, all at +Inf.
        assert!(hit_buckets[0].ends_with(" 0"), "{}", hit_buckets[0]);
        assert!(hit_buckets[1].contains("le=\"0.00025\"") && hit_buckets[1].ends_with(" 1"));
        assert!(hit_buckets[2].contains("le=\"0.0005\"") && hit_buckets[2].ends_with(" 2"));
        let last = DURATION_BUCKETS.len() - 1;
        assert!(hit_buckets[last].contains("le=\"30\"") && hit_buckets[last].ends_with(" 2"));
        assert!(
            hit_buckets[last + 1].contains("le=\"+Inf\"") && hit_buckets[last + 1].ends_with(" 3")
        );
        assert!(text.contains(
            "stoa_request_duration_seconds_sum{cache=\"hit\",route=\"restaurant\"} 60.0005"
        ));
        assert!(text
            .contains("stoa_request_duration_seconds_count{cache=\"hit\",route=\"restaurant\"} 3"));
    }

    #[test]
    fn build_info_and_zero_series_appear_before_any_request() {
        let m = Metrics::new().unwrap();
        let _clv = m.route("clv", true).unwrap();
        let _health = m.route("health", false).unwrap();
        let _fetch = m.upstream("clv", "clv").unwrap();
        let _limit = m.rate_limited("clv", "default").unwrap();
        let text = m.render();

        let version = env!("CARGO_PKG_VERSION");
        assert!(text.contains(&format!("stoa_build_info{{version=\"{version}\"}} 1\n")));
        for line in [
            r#"stoa_coalesced_waiters_total{route="clv"} 0"#,
            r#"stoa_coalesced_waiters_total{route="health"} 0"#,
            r#"stoa_upstream_fetches_total{outcome="ok",route="clv",upstream="clv"} 0"#,
            r#"stoa_upstream_fetches_total{outcome="error",route="clv",upstream="clv"} 0"#,
            r#"stoa_upstream_fetches_total{outcome="timeout",route="clv",upstream="clv"} 0"#,
            r#"stoa_upstream_duration_seconds_count{upstream="clv"} 0"#,
            r#"stoa_rate_limited_total{policy="default",route="clv"} 0"#,
            r#"stoa_request_duration_seconds_count{cache="hit",route="clv"} 0"#,
            r#"stoa_request_duration_seconds_count{cache="miss",route="clv"} 0"#,
            r#"stoa_request_duration_seconds_count{cache="none",route="health"} 0"#,
            r#"stoa_config_reloads_total{result="ok"} 0"#,
            r#"stoa_config_reloads_total{result="error"} 0"#,
            "stoa_cache_entries 0",
            "stoa_cache_bytes 0",
            "stoa_cache_evictions_total 0",
            "stoa_requests_in_flight 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        // Pass-through routes do not export cache-status histograms, nor cached ones `none`.
        assert!(!text.contains(r#"cache="hit",route="health""#));
        assert!(!text.contains(r#"cache="none",route="clv""#));
        // No status is known before the first request.
        assert!(series(&text, "stoa_requests_total").is_empty());
    }

    #[test]
    fn expected_answers_start_at_zero_and_stay_bounded() {
        let m = Metrics::new().unwrap();
        let cached = m.route("menu", true).unwrap();
        let profile = RouteProfile {
            cached: true,
            cacheable: &[404],
            stale: true,
            limited: true,
        };
        cached.expect(Lane::Answer, profile.answers());
        let pass = m.route("pass", false).unwrap();
        pass.expect(Lane::Forward, RouteProfile::default().answers());
        let text = m.render();
        for line in [
            r#"stoa_requests_total{cache="hit",lane="answer",route="menu",status="200"} 0"#,
            r#"stoa_requests_total{cache="hit",lane="answer",route="menu",status="404"} 0"#,
            r#"stoa_requests_total{cache="miss",lane="answer",route="menu",status="200"} 0"#,
            r#"stoa_requests_total{cache="miss",lane="answer",route="menu",status="502"} 0"#,
            r#"stoa_requests_total{cache="coalesced",lane="answer",route="menu",status="200"} 0"#,
            r#"stoa_requests_total{cache="stale",lane="answer",route="menu",status="200"} 0"#,
            r#"stoa_requests_total{cache="bypass",lane="answer",route="menu",status="200"} 0"#,
            r#"stoa_requests_total{cache="bypass",lane="answer",route="menu",status="429"} 0"#,
            r#"stoa_requests_total{cache="none",lane="forward",route="pass",status="200"} 0"#,
            r#"stoa_requests_total{cache="none",lane="forward",route="pass",status="504"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"cache="none",lane="forward",route="pass",status="429""#));
        assert!(!text.contains(r#"cache="hit",lane="forward",route="pass""#));
        assert!(profile.answers().len() <= 24);
        // Counting continues the pre-created series.
        cached.observe(200, CacheStatus::Coalesced, Lane::Answer, ms(1));
        assert!(m.render().contains(
            "stoa_requests_total{cache=\"coalesced\",lane=\"answer\",route=\"menu\",status=\"200\"} 1\n"
        ));
    }

    #[test]
    fn resolving_again_on_reload_continues_the_series() {
        let m = Metrics::new().unwrap();
        m.route("r", true)
            .unwrap()
            .observe(200, CacheStatus::Hit, Lane::Answer, ms(1));
        let again = m.route("r", true).unwrap();
        again.observe(200, CacheStatus::Hit, Lane::Answer, ms(1));
        again.coalesced_waiter();
        assert_eq!(again.name(), "r");
        let text = m.render();
        assert!(text.contains(
            "stoa_requests_total{cache=\"hit\",lane=\"answer\",route=\"r\",status=\"200\"} 2\n"
        ));
        assert!(text.contains("stoa_coalesced_waiters_total{route=\"r\"} 1\n"));
    }

    #[test]
    fn a_reloads_handles_read_every_series_the_earlier_ones_made() {
        let m = Metrics::new().unwrap();
        let first = m.route("r", true).unwrap();
        first.observe(503, CacheStatus::Miss, Lane::Answer, ms(2));
        first.observe(200, CacheStatus::SharedHit, Lane::Forward, ms(1));
        first.observe(1000, CacheStatus::Bypass, Lane::Answer, ms(1));
        let again = m.route("r", true).unwrap();
        let mut seen = Vec::new();
        again.each_count(|cache, status, n| {
            if n > 0 {
                seen.push((cache.label(), status, n));
            }
        });
        seen.sort();
        assert_eq!(
            seen,
            [("bypass", 0, 1), ("miss", 503, 1), ("shared_hit", 200, 1)]
        );
        // The observed latencies too, the lazily made shared_hit series among them.
        assert_eq!(again.observed_durations().count(), 3);
        // And the same numbers a scrape gives.
        let text = m.render();
        assert!(text.contains(
            "stoa_requests_total{cache=\"miss\",lane=\"answer\",route=\"r\",status=\"503\"} 1\n"
        ));
    }

    #[test]
    fn handles_are_shareable_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Metrics>();
        send_sync::<RouteMetrics>();
        send_sync::<UpstreamMetrics>();
    }

    /// A Metrics with every series populated, for format checks.
    fn populated() -> Metrics {
        let m = Metrics::new().unwrap();
        let route = m.route("restaurant", true).unwrap();
        route.observe(200, CacheStatus::Hit, Lane::Answer, ms(1));
        route.observe(502, CacheStatus::Miss, Lane::Answer, ms(30));
        route.coalesced_waiter();
        m.upstream("restaurants", "restaurant")
            .unwrap()
            .fetch(FetchOutcome::Error, ms(20));
        m.rate_limited("restaurant", "default").unwrap().inc();
        m.set_cache_stats(1, 100);
        m.cache_evicted(1);
        m.config_reload(true);
        m
    }

    #[test]
    fn every_family_has_help_type_and_base_unit_names() {
        let text = populated().render();
        let mut families = 0;
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line["# TYPE ".len()..].split(' ');
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                panic!("bad TYPE line {line}");
            };
            families += 1;
            assert!(name.starts_with("stoa_"), "{name}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{name}"),
                "gauge" => assert!(!name.ends_with("_total"), "{name}"),
                other => panic!("unexpected type {other} for {name}"),
            }
        }
        assert_eq!(families, 25, "{text}");
    }

    /// Every `stoa_*` name in the dashboard must be a series `render()` exposes.
    #[test]
    fn dashboard_queries_only_exposed_metrics() {
        let dashboard = include_str!("../dashboards/stoa-grafana.json");
        let parsed: serde_json::Value = serde_json::from_str(dashboard).unwrap();
        assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 7));

        // The `stoa_cluster_*` series exist only with `[cluster]`: registered here as a
        // gateway with one does.
        let metrics = populated();
        let settings = crate::config::ClusterSettings {
            redis: crate::config::RedisTarget::Single("redis://127.0.0.1:1/0".into()),
            node_name: "n".into(),
            key_prefix: "stoa:".into(),
            connect_timeout: std::time::Duration::from_secs(1),
            command_timeout: std::time::Duration::from_secs(1),
            l2_max_entry_bytes: 1,
            lock_timeout: std::time::Duration::from_secs(1),
            ack_timeout: std::time::Duration::from_secs(1),
            ca_pem: None,
            tls_verify: true,
        };
        let _cluster = crate::cluster::Cluster::new(settings, metrics.registry()).unwrap();
        // And with the disk tier's.
        crate::cache::disk::DiskMetrics::register(metrics.registry()).unwrap();
        let text = metrics.render();
        let exposed: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();

        let mut names = BTreeSet::new();
        let mut rest = dashboard;
        while let Some(at) = rest.find("stoa_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(&tail[..end]);
            rest = &tail[end..];
        }
        assert!(names.len() >= 7, "{names:?}");
        for name in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| exposed.contains(base))
                .unwrap_or(name);
            assert!(exposed.contains(base), "dashboard queries unknown {name}");
        }
    }

    /// Runs `promtool check metrics` on the output when `STOA_PROMTOOL` names the binary.
    #[test]
    fn promtool_accepts_the_output() {
        use std::io::Write;
        use std::process::{Command, Stdio};

        let Some(promtool) = std::env::var_os("STOA_PROMTOOL") else {
            eprintln!("STOA_PROMTOOL not set: skipping promtool check metrics");
            return;
        };
        let text = populated().render();
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool: {report}\n{text}");
        assert!(report.trim().is_empty(), "promtool: {report}");
    }
}
