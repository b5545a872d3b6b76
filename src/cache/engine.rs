//! The cache engine: answers a cached route's request from memory, from the single flight
//! it leads or joins, or from a stale copy, following the route's settings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;

use super::control::{Directives, Lifetime, Validators};
use super::disk::{Disk, Found};
use super::encoding::{self, Compressed, Variants};
use super::flight::{self, Flights, Joined, Lead, Outcome};
use super::key::{self, CacheKey};
use super::origin::{has_no_body, Answer, FetchRequest, Fetched, Origin, Streaming};
use super::purge::{Invalidation, PurgeMetrics, PurgeWhat, Reach};
use super::store::{Entry, Lifetimes, Store};
use super::tags::{json_tag_value, take_upstream_tags, Tags};
use super::tier::{Before, Tier};
use super::vary::{self, Learned, Uncovered};
use super::{CacheStatus, NotStored};
use crate::config::{CacheSettings, Freshness, KeyBody, KeyQuery, OnLockTimeout, UnkeyedBody};
use crate::error::StoaError;
use crate::routes::{normalize_path, PathMode, PathTemplate};
use opentelemetry::trace::SpanKind;

/// A cached route's settings and the origin of its answers.
pub struct CachedRoute {
    pub name: String,
    /// The route's path template: the path parameters of its tag templates.
    pub path: PathTemplate,
    pub settings: CacheSettings,
    pub origin: Arc<dyn Origin>,
    /// The name errors report: the upstream's, or the aggregate route's.
    pub origin_name: String,
    /// `stoa_cache_too_large_total{route}`: answers larger than `max_entry_bytes`.
    pub too_large: prometheus::IntCounter,
    /// Compressions done and bytes saved, by coding (shared by every route).
    pub compressions: encoding::Counters,
    /// `stoa_cache_revalidations_total{route,result}`.
    pub revalidations: Revalidations,
    /// `stoa_cache_not_modified_total{route}`: 304s answered to clients from memory.
    pub not_modified: prometheus::IntCounter,
    /// The request headers its answers vary on, learned from the upstream's `Vary`.
    pub vary: Learned,
}

/// How the revalidations of a route's entries ended.
pub struct Revalidations {
    /// The upstream answered 304: the stored body was kept.
    pub not_modified: prometheus::IntCounter,
    /// It answered anything else: that answer replaced the entry.
    pub modified: prometheus::IntCounter,
    /// The fetch failed or the upstream answered 5xx.
    pub failed: prometheus::IntCounter,
}

impl CachedRoute {
    /// The cache key of a request on this route, from its upstream path and query (after
    /// rewrite), body and headers: the one derivation used for serving, purging and warming.
    pub fn key_for(
        &self,
        method: &http::Method,
        upstream_path_and_query: &str,
        body: &[u8],
        headers: &http::HeaderMap,
    ) -> Result<CacheKey, StoaError> {
        let (path, query) = match upstream_path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (upstream_path_and_query, None),
        };
        // One atomic load on a route that learned nothing.
        let learned = self.vary.names();
        key::derive(
            &key::KeyParts {
                route: &self.name,
                method,
                path,
                query,
                body,
                headers,
            },
            &self.settings.key_query,
            &self.settings.key_body,
            &self.settings.key_headers,
            learned.as_ref().map_or(&[], |names| &names[..]),
        )
    }

    /// The learned vary headers `key` holds.
    fn covered_by(&self, key: &CacheKey) -> Vec<header::HeaderName> {
        let mut names = self.vary.snapshot();
        names.retain(|name| key.vary_names().any(|held| held == name.as_str()));
        names
    }

    /// Learns the request headers an answer's `Vary` names that `covered` (with the key
    /// headers) does not, when the answer would be stored once they are covered; an
    /// answer that is not stored anyway teaches nothing.
    fn learn_from(
        &self,
        status: http::StatusCode,
        headers: &http::HeaderMap,
        covered: &[header::HeaderName],
    ) {
        let settings = &self.settings;
        let Uncovered::Names(names) = vary::uncovered(headers, &settings.key_headers, covered)
        else {
            return;
        };
        let all: Vec<header::HeaderName> = covered.iter().chain(&names).cloned().collect();
        if !status.is_server_error()
            && disposition_of(status, headers, settings, &all) == Disposition::Store
        {
            self.vary.learn(&names);
        }
    }

    /// `fetch` (made for `key` or a key with fewer learned headers) carrying the client's
    /// values of the learned vary headers `learned` too: the fetch for the key made with them.
    fn with_learned(
        &self,
        mut fetch: FetchRequest,
        learned: &[header::HeaderName],
        headers: &http::HeaderMap,
    ) -> FetchRequest {
        for name in learned {
            fetch.headers.remove(name);
            for value in headers.get_all(name) {
                fetch.headers.append(name.clone(), value.clone());
            }
        }
        fetch
    }

    /// Whether `key`, not stored yet, would be one variant too many of its request.
    fn variants_full(&self, store: &Store, key: &CacheKey) -> bool {
        key.varied() > 0
            && store.get(key).is_none()
            && store.count_path(key.route(), key.path(), |k| {
                k.varied() == key.varied() && k.base() == key.base()
            }) >= self.settings.max_variants
    }

    /// Whether a request with this body goes around the cache: a body the key ignores, on
    /// a route whose `unkeyed_body` is `bypass`.
    pub fn bypasses_for(&self, body: &[u8]) -> bool {
        !body.is_empty()
            && self.settings.key_body == KeyBody::None
            && self.settings.unkeyed_body == UnkeyedBody::Bypass
    }

    /// The upstream request whose answer every request with `key` shares: only what the
    /// key covers. The query keeps only the keyed parameters; the body is the canonical
    /// JSON in the key, sent as `application/json` (none when the route does not key on
    /// the body); of the client's `headers` only the key headers and the learned vary
    /// headers the key holds go, so no `Accept`, `Content-Type`, credentials or
    /// `Accept-Encoding` unless keyed or varied on. `request_id` is stoa's. `client_path`
    /// (the path the client asked for) gives the route's tag templates their path
    /// parameters.
    pub fn shared_fetch(
        &self,
        method: http::Method,
        upstream_path_and_query: &str,
        key: &CacheKey,
        headers: &http::HeaderMap,
        request_id: Option<&http::HeaderValue>,
        client_path: &str,
    ) -> FetchRequest {
        let settings = &self.settings;
        let mut sent = http::HeaderMap::new();
        for name in &settings.key_headers {
            for value in headers.get_all(name) {
                sent.append(name.clone(), value.clone());
            }
        }
        if key.varied() > 0 {
            if let Some(learned) = self.vary.names() {
                for name in learned.iter() {
                    if key.vary_names().any(|held| held == name.as_str()) {
                        for value in headers.get_all(name) {
                            sent.append(name.clone(), value.clone());
                        }
                    }
                }
            }
        }
        let body = match settings.key_body {
            KeyBody::None => Bytes::new(),
            KeyBody::Whole | KeyBody::Fields(_) => {
                if !sent.contains_key(header::CONTENT_TYPE) {
                    sent.insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                }
                Bytes::copy_from_slice(key.body().as_bytes())
            }
        };
        if let Some(id) = request_id {
            sent.insert("x-request-id", id.clone());
        }
        let path_and_query = keyed_query_only(upstream_path_and_query, &settings.key_query);
        let tags = self.route_tags(client_path, &path_and_query, key);
        FetchRequest {
            method,
            path_and_query,
            headers: sent,
            body,
            tags,
        }
    }

    /// The tags the route's templates (`cache.tags`) give the answer to this request: path
    /// parameters from the client's path, keyed query parameters from the query sent
    /// upstream, keyed body fields from the key's canonical JSON. A template whose value
    /// the request lacks gives no tag.
    fn route_tags(&self, client_path: &str, path_and_query: &str, key: &CacheKey) -> Tags {
        let mut tags = Tags::new();
        if self.settings.tags.is_empty() {
            return tags;
        }
        let path = normalize_path(client_path, PathMode::Resolve).ok();
        let captures = path.as_deref().and_then(|p| self.path.matches(p));
        let query = path_and_query.split_once('?').map_or("", |(_, q)| q);
        let body: Option<serde_json::Value> = serde_json::from_str(key.body()).ok();
        for template in &self.settings.tags {
            let rendered = template.render(
                |name| captures.as_ref().and_then(|c| c.get(name)),
                |name| {
                    url::form_urlencoded::parse(query.as_bytes())
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.into_owned())
                },
                |name| body.as_ref()?.get(name).and_then(json_tag_value),
            );
            if let Some(tag) = rendered {
                tags.insert(&tag);
            }
        }
        tags.freeze();
        tags
    }

    /// Asks the origin; an answer over the route's `max_entry_bytes` comes back as a stream.
    async fn fetch(&self, fetch: FetchRequest) -> Result<Answer, StoaError> {
        let limit = usize::try_from(self.settings.max_entry_bytes).unwrap_or(usize::MAX);
        self.origin.fetch(fetch, limit).await
    }

    /// A too-large answer as served, counted; a 5xx too goes to the client as the
    /// upstream gave it.
    fn stream(&self, mut streaming: Box<Streaming>) -> Served {
        self.too_large.inc();
        streaming.headers.remove(&self.settings.targeted_field);
        take_upstream_tags(&mut streaming.headers, &mut Tags::new());
        Served::Stream(streaming, CacheStatus::Bypass)
    }
}

/// `path_and_query` with only the query parameters the key covers, each as the client
/// encoded it, in the client's order.
fn keyed_query_only(path_and_query: &str, which: &KeyQuery) -> String {
    let (KeyQuery::Only(names), Some((path, query))) = (which, path_and_query.split_once('?'))
    else {
        return path_and_query.to_string();
    };
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(path);
    let mut sep = '?';
    for pair in query.split('&') {
        let keyed = url::form_urlencoded::parse(pair.as_bytes())
            .next()
            .is_some_and(|(name, _)| names.iter().any(|n| *n == name));
        if keyed {
            out.push(sep);
            out.push_str(pair);
            sep = '&';
        }
    }
    out
}

/// The answer to a request on a cached route, and how it was reached.
pub enum Served {
    Entry(Arc<Entry>, CacheStatus),
    /// An answer larger than the route's `max_entry_bytes`, never stored: written to the
    /// client as it arrives.
    Stream(Box<Streaming>, CacheStatus),
    Error(StoaError, CacheStatus),
}

/// What an invalidation did: the answer of the admin purge.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PurgeReport {
    /// Entries it hit on this node.
    pub purged: usize,
    pub soft: bool,
    /// Entries removed from the shared tier (with `[cluster]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<usize>,
    /// With `[cluster]`, Redis was degraded: applied on this node only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
    /// Entries it hit on each node that confirmed it, this one included (with `[cluster]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<std::collections::BTreeMap<String, usize>>,
    /// Live nodes that did not confirm it within `cluster.ack_timeout`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed: Vec<String>,
}

/// The store and the flights, shared by every cached route.
pub struct CacheEngine {
    pub store: Store,
    flights: Flights,
    /// The shared second tier, with `[cluster]`.
    pub tier: Option<Arc<Tier>>,
    /// This node's disk tier, with `cache.disk`.
    pub disk: Option<Arc<Disk>>,
    purges: PurgeMetrics,
}

impl std::fmt::Debug for CacheEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheEngine")
            .field("entries", &self.store.len())
            .field("bytes", &self.store.bytes())
            .field("fetches_in_flight", &self.flights.in_flight())
            .finish()
    }
}

impl CacheEngine {
    pub fn new(max_bytes: u64) -> Arc<Self> {
        Self::with_tier(max_bytes, None, PurgeMetrics::unregistered())
    }

    /// An engine with the shared second tier `tier` (see [`Tier`]), counting invalidations
    /// in `purges`.
    pub fn with_tier(max_bytes: u64, tier: Option<Arc<Tier>>, purges: PurgeMetrics) -> Arc<Self> {
        Self::with_tiers(max_bytes, tier, None, purges)
    }

    /// An engine with the shared tier `tier` and the disk tier `disk` (see [`Disk`]):
    /// lookups go memory, disk, shared tier, upstream.
    pub fn with_tiers(
        max_bytes: u64,
        tier: Option<Arc<Tier>>,
        disk: Option<Arc<Disk>>,
        purges: PurgeMetrics,
    ) -> Arc<Self> {
        Arc::new(CacheEngine {
            store: Store::new(max_bytes),
            flights: Flights::default(),
            tier,
            disk,
            purges,
        })
    }

    /// Applies an invalidation on every node and answers once it is in force everywhere:
    /// the shared tier's copies (and the leases of fills in flight there) go first, then
    /// this node's fills in flight and entries, then every other live node applies it and
    /// says so (or the wait, bounded by `cluster.ack_timeout`, ends and the answer names
    /// the nodes that did not confirm).
    pub async fn invalidate(&self, inv: Invalidation) -> PurgeReport {
        let taken = Instant::now();
        let shared = match &self.tier {
            Some(tier) => tier.purge_shared(&inv).await,
            None => None,
        };
        let purged = self.apply_local(&inv);
        let mut report = PurgeReport {
            purged,
            soft: inv.soft,
            shared,
            degraded: self.tier.is_some() && shared.is_none(),
            nodes: None,
            unconfirmed: Vec::new(),
        };
        if let (Some(tier), false) = (&self.tier, report.degraded) {
            let acks = tier.broadcast_purge(&inv).await;
            let mut nodes = acks.confirmed;
            nodes.insert(tier.node_name().to_string(), purged);
            report.nodes = Some(nodes);
            report.unconfirmed = acks.unconfirmed;
        }
        let confirmed = report.unconfirmed.is_empty() && !report.degraded;
        self.purges.taken(&inv, taken.elapsed(), confirmed);
        report
    }

    /// [`CacheEngine::invalidate`] without waiting: applied on this node now, the shared
    /// tier's copies removed in the background (a reload, which each node runs itself).
    pub fn invalidate_here(&self, inv: Invalidation) -> usize {
        if let (Some(tier), Ok(runtime)) = (&self.tier, tokio::runtime::Handle::try_current()) {
            let tier = tier.clone();
            let inv = inv.clone();
            runtime.spawn(async move { tier.purge_shared(&inv).await });
        }
        self.apply_local(&inv)
    }

    /// Applies an invalidation to this node only (one another node broadcast, or the local
    /// part of [`CacheEngine::invalidate`]): the fills in flight it reaches are detached
    /// and never stored, then the stored entries it names are removed (hard) or marked
    /// stale (soft). How many entries it hit.
    pub fn apply_local(&self, inv: &Invalidation) -> usize {
        // On disk as a rule: in force before memory is purged (naming every entry it
        // reaches meanwhile), timed after it (every entry stored before is older).
        let Some(disk) = &self.disk else {
            return self.apply_memory(inv);
        };
        disk.invalidate_begin(inv);
        let hit = self.apply_memory(inv);
        disk.invalidate_end(inv, super::tier::wall_now());
        hit
    }

    /// [`CacheEngine::apply_local`] on the fills in flight and the memory store.
    fn apply_memory(&self, inv: &Invalidation) -> usize {
        self.flights.invalidate(&inv.what);
        if inv.soft {
            return self.mark_stale(&inv.what);
        }
        match &inv.what {
            PurgeWhat::Route { route } => self.store.remove_route(route),
            PurgeWhat::Prefix { route, prefix } => {
                self.store.remove_prefix(route.as_deref(), prefix)
            }
            PurgeWhat::Path { route, path } => self.store.remove_path(route, path),
            PurgeWhat::Key { route, key } => self
                .store
                .keys_of(route)
                .into_iter()
                .filter(|k| k.base() == key)
                .map(|k| usize::from(self.store.remove(&k)))
                .sum(),
            PurgeWhat::Tags { .. } => self
                .tagged(&inv.what)
                .iter()
                .map(|k| usize::from(self.store.remove(k)))
                .sum(),
        }
    }

    /// The stored keys a tag purge names.
    fn tagged(&self, what: &PurgeWhat) -> Vec<Arc<CacheKey>> {
        let tags: Vec<&str> = what.tags().iter().map(String::as_str).collect();
        let mut keys = self.store.keys_of_tags(&tags);
        keys.retain(|k| what.reaches(k) != Reach::No);
        keys
    }

    /// Marks the stored entries `what` names stale (soft purge); how many.
    fn mark_stale(&self, what: &PurgeWhat) -> usize {
        let keys: Vec<Arc<CacheKey>> = match what {
            PurgeWhat::Tags { .. } => self.tagged(what),
            _ => self
                .store
                .entries()
                .map(|(k, _)| k)
                .filter(|k| what.reaches(k) == Reach::Yes)
                .collect(),
        };
        keys.iter()
            .filter_map(|k| self.store.get(k))
            .filter(|entry| entry.mark_stale())
            .count()
    }

    /// Entries and bytes per route name.
    pub fn route_counts(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        let mut out = std::collections::BTreeMap::new();
        for (k, e) in self.store.entries() {
            let slot: &mut (u64, u64) = out.entry(k.route().to_string()).or_default();
            slot.0 += 1;
            slot.1 += e.weight();
        }
        out
    }

    /// Fetches every stored key of `route` again in the background, single flight as
    /// always; the current entries keep being served until their replacements are in.
    /// Returns how many refetches started.
    ///
    /// With the shared tier, `since` (wall-clock milliseconds) is the moment of the admin
    /// refresh: shared entries stored before it are outdated, so a key is fetched once
    /// cluster-wide (by whichever node takes its lease) and every other node refreshing it
    /// reads the new entry from the tier.
    pub fn refresh_route(self: &Arc<Self>, route: &Arc<CachedRoute>, since: Option<i64>) -> usize {
        if let (Some(tier), Some(since)) = (&self.tier, since) {
            tier.mark_refreshed(&route.name, since);
        }
        let mut started = 0;
        for k in self.store.keys_of(&route.name) {
            let Some(entry) = self.store.get(&k) else {
                continue;
            };
            let (Some(recipe), Some(lead)) = (&entry.recipe, self.flights.lead_if_idle(&k)) else {
                continue;
            };
            self.spawn_fetch(route.clone(), lead, (**recipe).clone(), None, None, false);
            started += 1;
        }
        started
    }

    pub fn fetches_in_flight(&self) -> usize {
        self.flights.in_flight()
    }

    /// The fast path: answers from memory when the entry for `key` is fresh, or stale
    /// within stale-while-revalidate (then one background refresh starts, as it does once
    /// a fresh entry passes its refresh-ahead point). Otherwise gives `make_fetch` back with
    /// the stale copy that may still serve on error, for [`CacheEngine::serve_miss`].
    /// `now`: the request's clock reading, which its answer's `Age` and `Cache-Status` use too.
    #[allow(clippy::result_large_err)]
    pub fn serve_from_memory<F: FnOnce() -> FetchRequest>(
        self: &Arc<Self>,
        route: &Arc<CachedRoute>,
        key: &CacheKey,
        make_fetch: F,
        now: Instant,
    ) -> Result<Served, (F, Option<Arc<Entry>>)> {
        let current = self.store.get(key);
        if let Some(entry) = &current {
            let marked_stale = entry.is_marked_stale();
            if now < entry.fresh_until && !marked_stale {
                if entry.refresh_at.is_some_and(|at| now >= at) {
                    self.refresh(route, entry, key, make_fetch);
                }
                return Ok(Served::Entry(entry.clone(), CacheStatus::Hit));
            }
            // A copy a soft purge marked is served so too while it would have been fresh.
            if now < entry.revalidate_until {
                self.refresh(route, entry, key, make_fetch);
                return Ok(Served::Entry(entry.clone(), CacheStatus::Stale));
            }
        }
        Err((make_fetch, current.filter(|e| now < e.error_until)))
    }

    /// Serves a request whose cache key is `key`. `make_fetch` builds the upstream request;
    /// it is called at most once, only when the upstream must be asked. `headers`: the
    /// request's, whose values of newly learned vary headers its answer is made with.
    pub async fn serve(
        self: &Arc<Self>,
        route: &Arc<CachedRoute>,
        key: &CacheKey,
        headers: &http::HeaderMap,
        make_fetch: impl FnOnce() -> FetchRequest,
    ) -> Served {
        match self.serve_from_memory(route, key, make_fetch, Instant::now()) {
            Ok(served) => served,
            Err((make_fetch, stale)) => {
                self.serve_miss(route, key, stale, make_fetch, || Ok(()), headers)
                    .await
            }
        }
    }

    /// The slow path: leads or joins the single flight for `key` and waits for its outcome
    /// (at most `lock_timeout`), falling back on `stale` as the route's settings allow.
    ///
    /// `admit` is asked (at most once) only when this request is about to reach the upstream
    /// itself: under the flight lock just before it would lead a new fetch, or before a
    /// waiter goes upstream on its own (private answer, lock timeout with `bypass`). A
    /// request that joins a flight in progress, or finds the answer stored by a flight that
    /// just ended, is never asked. Its `Err` is answered with the cache not consulted.
    ///
    /// When the route learns a vary header from the flight's answer (or learned one since
    /// `key` was made), that answer was made without this request's value of it: the
    /// request is served under its key with the learned headers' values from `headers`,
    /// through that key's own single flight (a new variant, or one stored already).
    pub async fn serve_miss(
        self: &Arc<Self>,
        route: &Arc<CachedRoute>,
        key: &CacheKey,
        stale: Option<Arc<Entry>>,
        make_fetch: impl FnOnce() -> FetchRequest,
        admit: impl FnOnce() -> Result<(), StoaError>,
        headers: &http::HeaderMap,
    ) -> Served {
        let mut admit = Some(admit);
        let mut flown = self.fly(route, key, stale, make_fetch, &mut admit).await;
        let mut rekeyed: Option<CacheKey> = None;
        // Each round holds more learned headers than the last: at most one per header.
        loop {
            let fetch = match flown {
                Flown::Served(served) => return served,
                Flown::Rekey(fetch) => fetch,
            };
            let learned = route.vary.snapshot();
            let key = rekeyed.as_ref().unwrap_or(key).with_vary(&learned, headers);
            let fetch = route.with_learned(fetch, &learned, headers);
            flown = match self.serve_from_memory(route, &key, move || fetch, Instant::now()) {
                Ok(served) => Flown::Served(served),
                Err((make_fetch, stale)) => {
                    self.fly(route, &key, stale, make_fetch, &mut admit).await
                }
            };
            rekeyed = Some(key);
        }
    }

    /// One round of [`CacheEngine::serve_miss`]: the single flight of `key`.
    async fn fly<F: FnOnce() -> FetchRequest>(
        self: &Arc<Self>,
        route: &Arc<CachedRoute>,
        key: &CacheKey,
        stale: Option<Arc<Entry>>,
        make_fetch: F,
        admit: &mut Option<impl FnOnce() -> Result<(), StoaError>>,
    ) -> Flown {
        let joined = self.flights.join_traced(
            key,
            || {
                // Made before the route learned a vary header: under the key with it instead.
                if route.vary.len() > key.varied() {
                    return Some(None);
                }
                if let Some(fresh) = self.store.get(key).filter(|e| e.is_fresh(Instant::now())) {
                    return Some(Some(Served::Entry(fresh, CacheStatus::Hit)));
                }
                let refused = admit.take().and_then(|admit| admit().err());
                refused.map(|e| Some(Served::Error(e, CacheStatus::None)))
            },
            crate::otel::start_fill,
        );
        let settings = &route.settings;
        let (slot, leader, later) = match joined {
            Err(Some(served)) => return Flown::Served(served),
            Err(None) => return Flown::Rekey(make_fetch()),
            Ok(Joined::Lead(lead, slot)) => {
                let fetch = make_fetch();
                // The leader keeps a copy: it may have to go upstream itself (lock timeout
                // with `bypass`, or a too-large answer another request took).
                let spare = Some(Box::new(fetch.clone()));
                // An expired entry with validators is revalidated rather than refetched.
                let validated = self.store.get(key).filter(|e| e.validators.is_some());
                self.spawn_fetch(route.clone(), lead, fetch, None, validated, true);
                (slot, true, Later::Built(spare))
            }
            Ok(Joined::Wait(slot, fill)) => {
                // The trace shows whose fill this request waited for.
                if let Some(fill) = &fill {
                    crate::otel::link_current(fill, "coalesced");
                }
                (slot, false, Later::Lazy(make_fetch))
            }
        };

        // How this request met the upstream: it led the fetch, or waited on another's.
        let how = if leader {
            CacheStatus::Miss
        } else {
            CacheStatus::Coalesced
        };
        let outcome = tokio::time::timeout(settings.lock_timeout, flight::wait(slot)).await;
        // A failed fetch may have left the shared tier's stale copy in the store.
        let stale = match (stale, &outcome) {
            (
                None,
                Ok(Some(
                    Outcome::Failed(_)
                    | Outcome::ServerError(_)
                    | Outcome::TooLarge {
                        server_error: true, ..
                    },
                )),
            ) => self
                .store
                .get(key)
                .filter(|e| Instant::now() < e.error_until),
            (stale, _) => stale,
        };
        let served = match outcome {
            Ok(Some(Outcome::Shared(entry))) => Served::Entry(entry, how),
            Ok(Some(Outcome::FromTier(entry))) if leader => {
                Served::Entry(entry, CacheStatus::SharedHit)
            }
            Ok(Some(Outcome::FromTier(entry))) => Served::Entry(entry, how),
            // A copy a soft invalidation named, or past its freshness, serves as stale.
            Ok(Some(Outcome::FromDisk(entry))) if !entry.is_fresh(Instant::now()) => {
                Served::Entry(entry, CacheStatus::Stale)
            }
            Ok(Some(Outcome::FromDisk(entry))) if leader => {
                Served::Entry(entry, CacheStatus::DiskHit)
            }
            Ok(Some(Outcome::FromDisk(entry))) => Served::Entry(entry, how),
            // The answer varies on a header the route learned from it (or since `key` was
            // made): made without this request's value, it goes to nobody.
            Ok(Some(Outcome::Private(entry)))
                if entry.not_stored == Some(NotStored::Vary) && route.vary.len() > key.varied() =>
            {
                match later.take() {
                    Some(fetch) => return Flown::Rekey(fetch),
                    None => Served::Error(StoaError::Internal("no request to send".into()), how),
                }
            }
            Ok(Some(Outcome::Private(entry))) if leader => match stale {
                Some(stale) if entry.header.status.is_server_error() => {
                    Served::Entry(stale, CacheStatus::Stale)
                }
                _ => Served::Entry(entry, CacheStatus::Miss),
            },
            // The upstream's own 5xx answer: passed on as it is, unless a stale copy serves.
            Ok(Some(Outcome::ServerError(entry))) => match stale {
                Some(stale) => Served::Entry(stale, CacheStatus::Stale),
                None => Served::Entry(entry, how),
            },
            Ok(Some(Outcome::TooLarge {
                stream,
                shared,
                server_error,
            })) => {
                if let (true, Some(stale)) = (server_error, stale) {
                    return Flown::Served(Served::Entry(stale, CacheStatus::Stale));
                }
                let taken = (leader || shared).then(|| flight::take(&stream)).flatten();
                // Let go of the stream now if nobody took it: it holds an upstream slot.
                drop(stream);
                match (taken, later.take()) {
                    (Some(streaming), _) => route.stream(streaming),
                    (None, Some(fetch)) => self.bypass(route, fetch).await,
                    (None, None) => {
                        Served::Error(StoaError::Internal("no request to send".into()), how)
                    }
                }
            }
            Ok(Some(Outcome::Private(_))) => match later.take() {
                Some(fetch) => self.bypass_admitted(route, fetch, admit.take()).await,
                None => Served::Error(StoaError::Internal("no request to send".into()), how),
            },
            Ok(Some(Outcome::Failed(err))) => match stale {
                Some(entry) => Served::Entry(entry, CacheStatus::Stale),
                None => Served::Error(err, how),
            },
            Ok(None) => Served::Error(
                StoaError::Internal("the upstream fetch ended without an answer".into()),
                how,
            ),
            Err(_) => {
                let timeout = StoaError::UpstreamTimeout {
                    upstream: route.origin_name.clone(),
                    timeout_ms: settings.lock_timeout.as_millis(),
                };
                match (settings.on_lock_timeout, stale) {
                    (OnLockTimeout::ServeStale, Some(entry)) => {
                        Served::Entry(entry, CacheStatus::Stale)
                    }
                    (OnLockTimeout::Bypass, _) => match later.take() {
                        Some(fetch) => self.bypass_admitted(route, fetch, admit.take()).await,
                        None => Served::Error(timeout, how),
                    },
                    _ => Served::Error(timeout, how),
                }
            }
        };
        Flown::Served(served)
    }

    /// [`CacheEngine::bypass`], once `admit` (if not asked yet) lets the request through.
    async fn bypass_admitted(
        &self,
        route: &CachedRoute,
        fetch: FetchRequest,
        admit: Option<impl FnOnce() -> Result<(), StoaError>>,
    ) -> Served {
        if let Some(Err(e)) = admit.map(|admit| admit()) {
            return Served::Error(e, CacheStatus::None);
        }
        self.bypass(route, fetch).await
    }

    /// Asks the upstream without the cache: nothing is stored or shared.
    pub async fn bypass(&self, route: &CachedRoute, fetch: FetchRequest) -> Served {
        match route.fetch(fetch).await {
            Ok(Answer::Whole(fetched)) => {
                let none = Compressed::none();
                let settings = &route.settings;
                match fetched_to_entry(fetched, settings, &[], 0, Instant::now(), None, none) {
                    Ok((entry, _)) => Served::Entry(entry, CacheStatus::Bypass),
                    Err(e) => Served::Error(e, CacheStatus::Bypass),
                }
            }
            Ok(Answer::Streaming(streaming)) => route.stream(streaming),
            Err(e) => Served::Error(e, CacheStatus::Bypass),
        }
    }

    /// Starts one background refresh of `entry`, unless one is running already.
    fn refresh(
        self: &Arc<Self>,
        route: &Arc<CachedRoute>,
        entry: &Arc<Entry>,
        key: &CacheKey,
        make_fetch: impl FnOnce() -> FetchRequest,
    ) {
        if !entry.claim_refresh() {
            return;
        }
        match self.flights.lead_if_idle(key) {
            Some(lead) => self.spawn_fetch(
                route.clone(),
                lead,
                make_fetch(),
                Some(entry.clone()),
                entry.validators.is_some().then(|| entry.clone()),
                false,
            ),
            None => entry.release_refresh(),
        }
    }

    /// Runs the fetch in its own task: a client that goes away cancels nothing. With
    /// `validated`, the stored entry is revalidated: the fetch asks with its validators,
    /// and a `304` refreshes it (body kept) instead of a new answer replacing it.
    fn spawn_fetch(
        self: &Arc<Self>,
        route: Arc<CachedRoute>,
        lead: Lead,
        mut fetch: FetchRequest,
        refreshing: Option<Arc<Entry>>,
        validated: Option<Arc<Entry>>,
        has_client: bool,
    ) {
        let engine = self.clone();
        let recipe = Arc::new(owned_request(&fetch));
        let validated = validated.filter(|entry| ask_conditionally(&mut fetch, entry));
        let mut lead = lead;
        // Traces on: the upstream sees the fill's span as the parent of its work.
        let span = lead.take_span();
        match &span {
            Some(span) => {
                crate::otel::attr(span, "stoa.route", route.name.clone());
                crate::otel::inject(span, &mut fetch.headers);
            }
            None => crate::otel::inject_unsampled(&mut fetch.headers),
        }
        let fill = async move {
            // This node's disk tier first, unless memory holds a copy (a refresh or a
            // revalidation): the disk holds that one or an older one.
            let fetch = match (&engine.disk, &refreshing, &validated) {
                (Some(disk), None, None) => match engine.from_disk(disk, &route, lead, fetch).await
                {
                    Ok(()) => return,
                    Err((back, fetch)) => {
                        lead = back;
                        fetch
                    }
                },
                _ => fetch,
            };
            // The shared tier next: an entry another node stored, or the lease to fetch.
            let mut lease = None;
            if let Some(tier) = &engine.tier {
                let patience = route.settings.lock_timeout;
                let redis = crate::otel::child(None, "stoa.tier.lease", SpanKind::Client);
                let before = tier.before_fetch(lead.key(), patience).await;
                if let Some(redis) = &redis {
                    crate::otel::attr(redis, "db.system.name", "redis");
                    crate::otel::attr(redis, "stoa.tier.result", before.name());
                    crate::otel::end(redis);
                }
                match before {
                    Before::Found(entry) => {
                        let key = lead.key().clone();
                        let stored = lead.store_unless_invalidated(
                            |tag| entry.has_tag(tag),
                            || {
                                engine.store.insert(key.clone(), entry.clone());
                                // Kept on this node's disk too: a restart needs no trip
                                // to the shared tier for it.
                                if let Some(disk) = &engine.disk {
                                    disk.write(&key, &entry);
                                }
                            },
                        );
                        if !stored {
                            engine.purges.fill_refused();
                        }
                        lead.finish(Outcome::FromTier(entry));
                        return;
                    }
                    Before::Lease(l) => lease = Some(l),
                    Before::Skip => {}
                    Before::TimedOut => {
                        if let Some(entry) = &refreshing {
                            entry.release_refresh();
                        }
                        lead.finish(Outcome::Failed(StoaError::UpstreamTimeout {
                            upstream: route.origin_name.clone(),
                            timeout_ms: patience.as_millis(),
                        }));
                        return;
                    }
                }
            }
            let call = crate::otel::child(None, "stoa.upstream", SpanKind::Client);
            let answer = route.fetch(fetch).await;
            if let Some(call) = &call {
                let status = match &answer {
                    Ok(Answer::Whole(fetched)) => i64::from(fetched.status.as_u16()),
                    Ok(Answer::Streaming(streaming)) => i64::from(streaming.status.as_u16()),
                    Err(_) => 0,
                };
                crate::otel::attr(call, "http.response.status_code", status);
                crate::otel::end(call);
            }
            if validated.is_some() {
                let status = match &answer {
                    Ok(Answer::Whole(fetched)) => Some(fetched.status),
                    Ok(Answer::Streaming(streaming)) => Some(streaming.status),
                    Err(_) => None,
                };
                let counter = match status {
                    Some(http::StatusCode::NOT_MODIFIED) => &route.revalidations.not_modified,
                    Some(s) if !s.is_server_error() => &route.revalidations.modified,
                    _ => &route.revalidations.failed,
                };
                counter.inc();
            }
            let (outcome, stored) = match answer {
                Ok(Answer::Whole(fetched)) => match &validated {
                    // The body is unchanged: the stored compressed bodies are kept, with
                    // heads built anew from the merged one.
                    Some(stored) if fetched.status == http::StatusCode::NOT_MODIFIED => {
                        let fetched = merge_not_modified(stored, fetched);
                        let compressed = if route.settings.compression.is_some() {
                            stored.compressed()
                        } else {
                            Compressed::none()
                        };
                        engine.settle(&route, &lead, fetched, recipe, compressed)
                    }
                    _ => {
                        // Compressed (and an encoded answer decoded) off the request
                        // path, before the entry is weighed and stored.
                        let covered = route.covered_by(lead.key());
                        let store = disposition(&fetched, &route.settings, &covered)
                            == Disposition::Store
                            && !fetched.status.is_server_error();
                        let limit =
                            usize::try_from(route.settings.max_entry_bytes).unwrap_or(usize::MAX);
                        let compression = route.settings.compression.clone();
                        let counters = &route.compressions;
                        match encoding::prepare(compression, counters, fetched, store, limit).await
                        {
                            Ok((fetched, compressed)) => {
                                engine.settle(&route, &lead, fetched, recipe, compressed)
                            }
                            Err(e) => (Outcome::Failed(e), false),
                        }
                    }
                },
                Ok(Answer::Streaming(streaming)) => {
                    // Whatever was stored under this key is outdated now, unless this is
                    // an upstream error (the stored copy may serve instead).
                    let server_error = streaming.status.is_server_error();
                    if !server_error {
                        engine.store.remove(lead.key());
                    }
                    let covered = route.covered_by(lead.key());
                    let shared = !disposition_of(
                        streaming.status,
                        &streaming.headers,
                        &route.settings,
                        &covered,
                    )
                    .is_private();
                    // A personal answer is for the leader only; a refresh has none.
                    let stream = (shared || has_client).then_some(streaming);
                    let outcome = Outcome::TooLarge {
                        stream: flight::handoff(stream),
                        shared,
                        server_error,
                    };
                    (outcome, false)
                }
                Err(e) => (Outcome::Failed(e), false),
            };
            if let (Outcome::Failed(_) | Outcome::ServerError(_), Some(entry)) =
                (&outcome, &refreshing)
            {
                entry.release_refresh();
            }
            // The fetch failed and this node holds no copy: the shared tier's one, within its
            // stale-if-error deadline, goes into the store for the waiters to serve.
            let failed = matches!(
                outcome,
                Outcome::Failed(_)
                    | Outcome::ServerError(_)
                    | Outcome::TooLarge {
                        server_error: true,
                        ..
                    }
            );
            if let (true, Some(stale)) = (failed, lease.as_ref().and_then(|l| l.stale.clone())) {
                if engine.store.get(lead.key()).is_none() && Instant::now() < stale.error_until {
                    let key = lead.key().clone();
                    lead.store_unless_invalidated(
                        |tag| stale.has_tag(tag),
                        || {
                            engine.store.insert(key, stale.clone());
                        },
                    );
                }
            }
            // Only what this node stored goes to the shared tier: not a fill an
            // invalidation refused.
            let stored = match &outcome {
                Outcome::Shared(entry) if stored => Some(entry.clone()),
                _ => None,
            };
            let key = lead.key().clone();
            if crate::otel::enabled() {
                let cx = opentelemetry::Context::current();
                crate::otel::attr(&cx, "stoa.fill.outcome", outcome.name());
                crate::otel::attr(&cx, "stoa.fill.stored", stored.is_some());
            }
            lead.finish(outcome);
            if let (Some(tier), Some(lease)) = (&engine.tier, lease) {
                tier.after_fetch(&key, lease, stored.as_deref()).await;
            }
        };
        tokio::spawn(crate::otel::within(span, fill));
    }

    /// The leader's look in the disk tier: a fresh entry is promoted into memory (when no
    /// invalidation reached the flight meanwhile) and ends the flight; one within its
    /// stale-while-revalidate window, or named by a soft invalidation, too, served stale
    /// while one refresh runs. Otherwise the flight and its fetch are given back.
    #[allow(clippy::result_large_err)]
    async fn from_disk(
        self: &Arc<Self>,
        disk: &Disk,
        route: &Arc<CachedRoute>,
        lead: Lead,
        fetch: FetchRequest,
    ) -> Result<(), (Lead, FetchRequest)> {
        let (entry, soft) = match disk.lookup(lead.key()).await {
            Found::Entry(entry) => (entry, false),
            Found::Stale(entry) => (entry, true),
            Found::Miss => return Err((lead, fetch)),
        };
        let now = Instant::now();
        if soft {
            entry.mark_stale();
        }
        let fresh = entry.is_fresh(now);
        let key = lead.key().clone();
        if !fresh && now >= entry.revalidate_until {
            // Past serving, not past stale-if-error: in memory for the fetch's waiters to
            // fall back on should it fail, as an expired copy in memory would be.
            if now < entry.error_until && self.store.get(&key).is_none() {
                lead.store_unless_invalidated(
                    |tag| entry.has_tag(tag),
                    || {
                        self.store.insert(key.clone(), entry.clone());
                    },
                );
            }
            return Err((lead, fetch));
        }
        let stored = lead.store_unless_invalidated(
            |tag| entry.has_tag(tag),
            || {
                self.store.insert(key.clone(), entry.clone());
            },
        );
        if !stored {
            self.purges.fill_refused();
        }
        lead.finish(Outcome::FromDisk(entry.clone()));
        if !fresh || entry.refresh_at.is_some_and(|at| now >= at) {
            self.refresh(route, &entry, &key, move || fetch);
        }
        Ok(())
    }

    /// Turns an upstream answer into an outcome, storing it when cacheable and no
    /// invalidation reached the fill while it was in flight; whether it was stored. An
    /// answer whose `Vary` names request headers the key does not hold teaches them to the
    /// route first (see [`CachedRoute::learn_from`]), and is not stored.
    fn settle(
        &self,
        route: &CachedRoute,
        lead: &Lead,
        fetched: Fetched,
        recipe: Arc<FetchRequest>,
        compressed: Compressed,
    ) -> (Outcome, bool) {
        let key = lead.key();
        let covered = route.covered_by(key);
        route.learn_from(fetched.status, &fetched.headers, &covered);
        match fetched_to_entry(
            fetched,
            &route.settings,
            &covered,
            key.byte_len(),
            Instant::now(),
            Some(recipe),
            compressed,
        ) {
            Err(e) => (Outcome::Failed(e), false),
            Ok((mut entry, Disposition::Store)) if route.variants_full(&self.store, key) => {
                route.vary.refused.max_variants.inc();
                if let Some(fresh) = Arc::get_mut(&mut entry) {
                    fresh.not_stored = Some(NotStored::Variants);
                }
                (Outcome::Shared(entry), false)
            }
            Ok((entry, Disposition::Store)) => {
                self.purges.tags_dropped(entry.tags().dropped());
                let mut held = false;
                let stored = lead.store_unless_invalidated(
                    |tag| entry.has_tag(tag),
                    || {
                        // Checked again where stores are one at a time.
                        if route.variants_full(&self.store, key) {
                            route.vary.refused.max_variants.inc();
                            return;
                        }
                        held = self.store.insert(key.clone(), entry.clone());
                        match &self.disk {
                            // Larger than memory holds in one entry: on disk only.
                            Some(disk) => disk.write(key, &entry),
                            // Within max_entry_bytes, but its head and key tip it over
                            // what the store holds in one entry.
                            None if !held => route.too_large.inc(),
                            None => {}
                        }
                    },
                );
                if !stored {
                    self.purges.fill_refused();
                }
                (Outcome::Shared(entry), held)
            }
            Ok((entry, Disposition::Share)) => (Outcome::Shared(entry), false),
            Ok((entry, Disposition::Private(_))) => (Outcome::Private(entry), false),
            Ok((entry, Disposition::ServerError)) => (Outcome::ServerError(entry), false),
        }
    }
}

/// How one round of a miss ended.
enum Flown {
    Served(Served),
    /// The route learned a vary header the round's key does not hold: serve the request
    /// under the key that does, with this request sent upstream if need be.
    Rekey(FetchRequest),
}

/// A request to send upstream later, if at all: built already, or built on demand.
enum Later<F> {
    Built(Option<Box<FetchRequest>>),
    Lazy(F),
}

impl<F: FnOnce() -> FetchRequest> Later<F> {
    fn take(self) -> Option<FetchRequest> {
        match self {
            Later::Built(fetch) => fetch.map(|f| *f),
            Later::Lazy(make) => Some(make()),
        }
    }
}

/// What may be done with an upstream answer.
#[derive(Debug, PartialEq, Eq)]
enum Disposition {
    /// Cacheable: store it and hand it to every waiter.
    Store,
    /// Not cacheable by status, but the same answer for everyone asking now.
    Share,
    /// Personal (`Set-Cookie`, `private`, `no-store`, an unkeyed `Vary`): the leader only.
    Private(NotStored),
    /// The upstream's own 5xx: never stored, handed to every waiter of the flight that
    /// has no stale copy to serve instead.
    ServerError,
}

impl Disposition {
    fn is_private(&self) -> bool {
        matches!(self, Disposition::Private(_))
    }

    /// Why an answer so disposed is not stored.
    fn not_stored(&self) -> Option<NotStored> {
        match self {
            Disposition::Store => None,
            Disposition::Private(why) => Some(*why),
            Disposition::Share | Disposition::ServerError => Some(NotStored::Status),
        }
    }
}

/// `learned`: the learned vary headers the answer's key holds.
fn fetched_to_entry(
    mut fetched: Fetched,
    settings: &CacheSettings,
    learned: &[header::HeaderName],
    key_len: usize,
    now: Instant,
    recipe: Option<Arc<FetchRequest>>,
    compressed: Compressed,
) -> Result<(Arc<Entry>, Disposition), StoaError> {
    // The route's tags and the upstream's (`Cache-Groups` stays in the answer; the CDN
    // fields `Surrogate-Key` and `Cache-Tag` go).
    let mut tags = recipe.as_ref().map_or_else(Tags::new, |r| r.tags.clone());
    take_upstream_tags(&mut fetched.headers, &mut tags);
    tags.freeze();
    let status = fetched.status.as_u16();
    let server_error = fetched.status.is_server_error();
    let disposition = match disposition(&fetched, settings, learned) {
        Disposition::Private(why) => Disposition::Private(why),
        _ if server_error => Disposition::ServerError,
        d => d,
    };
    let upstream_age = upstream_age(&fetched.headers);
    // Read once here; the hit path reads only what the entry keeps.
    let cc = if settings.ignore_upstream_cache_control {
        Directives::default()
    } else {
        Directives::parse_for(&fetched.headers, &settings.targeted_field)
    };
    let origin = settings.freshness == Freshness::Origin;
    // An answer that states no lifetime and is given none (`silent = "heuristic"`).
    let mut unstated = None;
    let ttl = match settings.ttl_for(status) {
        _ if server_error || cc.no_cache => Duration::ZERO,
        None => Duration::ZERO,
        Some(route_ttl) if origin => {
            let (headers, silent) = (&fetched.headers, settings.silent);
            let ttl = match cc.origin_lifetime(headers, upstream_age, status, route_ttl, silent) {
                Lifetime::Fresh(ttl) => ttl,
                none => {
                    unstated = Some(none);
                    Duration::ZERO
                }
            };
            settings.max_ttl.map_or(ttl, |max| ttl.min(max))
        }
        Some(route_ttl) => route_ttl,
    };
    let ttl = if settings.jitter > 0.0 {
        ttl.mul_f64(1.0 - settings.jitter * fastrand::f64())
    } else {
        ttl
    };
    let secs = |s: Option<u64>, route: Duration| s.map_or(route, Duration::from_secs);
    // An answer given no lifetime is not served stale either: it is always revalidated.
    let must_revalidate = cc.must_revalidate || unstated.is_some();
    let (stale_while_revalidate, stale_if_error) = if cc.no_cache || (origin && must_revalidate) {
        (Duration::ZERO, Duration::ZERO)
    } else if origin {
        (
            secs(cc.stale_while_revalidate, settings.stale_while_revalidate),
            secs(cc.stale_if_error, settings.stale_if_error),
        )
    } else {
        (settings.stale_while_revalidate, settings.stale_if_error)
    };
    let mut header = ResponseHeader::build_no_case(fetched.status, Some(fetched.headers.len() + 3))
        .map_err(|e| StoaError::Internal(e.to_string()))?;
    // The origin hands over end-to-end headers only (see `Origin`); the length is set anew,
    // and not at all on answers that have no body (204, 304); the upstream's `Age` is kept
    // apart and added to the time in stoa; fields named by `no-cache="..."` are not kept, nor
    // the field aimed at stoa (kept with the validators, for a revalidation's 304).
    for (name, value) in &fetched.headers {
        if name == header::CONTENT_LENGTH
            || name == header::AGE
            || *name == settings.targeted_field
            || cc.no_cache_fields.iter().any(|f| f == name.as_str())
        {
            continue;
        }
        header
            .append_header(owned_name(name), owned_value(value))
            .map_err(|e| StoaError::Internal(e.to_string()))?;
    }
    // From the stored copies (see `owned_value`), not the client's buffer.
    let validators = Validators::of(&header.headers)
        .map(|v| v.keeping(&settings.targeted_field, &fetched.headers));
    let body = if has_no_body(fetched.status) {
        Bytes::new()
    } else {
        header
            .insert_header(header::CONTENT_LENGTH, fetched.body.len())
            .map_err(|e| StoaError::Internal(e.to_string()))?;
        fetched.body
    };
    // Most answers from an entry are hits: say so once here, not on every request.
    header
        .insert_header("x-cache", "HIT")
        .map_err(|e| StoaError::Internal(e.to_string()))?;
    if status == 200 && !header.headers.contains_key(header::ACCEPT_RANGES) {
        let _ = header.insert_header(header::ACCEPT_RANGES, "bytes");
    }
    let life = Lifetimes {
        ttl,
        stale_while_revalidate,
        stale_if_error,
        refresh_ahead: settings.refresh_ahead,
    };
    // A `no-cache` answer is stored only when it can be revalidated, and then revalidated
    // on every request (it is never fresh).
    let revalidate_always = (cc.no_cache || unstated == Some(Lifetime::Revalidate))
        && validators.is_some()
        && !server_error;
    let shareable = cc.shareable_with_authorization();
    // Every answer of a route that compresses varies by `Accept-Encoding`. The validators
    // above are the identity head's: revalidation asks with the upstream's own `ETag`.
    if settings.compression.is_some() {
        encoding::add_vary(&mut header)?;
    }
    let variants = Variants::build(&header, compressed)?;
    let disposition = match disposition {
        Disposition::Store if revalidate_always && settings.ttl_for(status).is_some() => {
            Disposition::Store
        }
        Disposition::Store if ttl.is_zero() => Disposition::Share,
        d => d,
    };
    // A cacheable status that is not stored was either `no-cache` without a validator, given
    // no lifetime, or already stale when it arrived (origin freshness of zero).
    let not_stored = match disposition.not_stored() {
        Some(NotStored::Status) if !server_error && cc.no_cache => Some(NotStored::NoCache),
        Some(NotStored::Status) if !server_error && unstated.is_some() => {
            Some(NotStored::NoFreshness)
        }
        Some(NotStored::Status) if !server_error && settings.ttl_for(status).is_some() => {
            Some(NotStored::Expired)
        }
        other => other,
    };
    let entry = Arc::new(
        Entry::new(header, body, key_len, now, life, recipe)
            .with_upstream_age(upstream_age)
            .with_validators(validators, shareable)
            .with_not_stored(not_stored)
            .with_variants(variants)
            .with_tags(tags),
    );
    Ok((entry, disposition))
}

/// Adds the stored validators of `entry` to `fetch` (`If-None-Match`, `If-Modified-Since`);
/// whether it has any.
fn ask_conditionally(fetch: &mut FetchRequest, entry: &Entry) -> bool {
    let Some(v) = &entry.validators else {
        return false;
    };
    if let Some(etag) = &v.etag {
        fetch.headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = &v.last_modified {
        fetch
            .headers
            .insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
    true
}

/// The stored answer refreshed by a `304` (RFC 9111 §4.3.4): each header the 304 carries
/// replaces the stored ones of that name, framing aside; status and body stay.
fn merge_not_modified(stored: &Entry, not_modified: Fetched) -> Fetched {
    let framing = |name: &header::HeaderName| {
        name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == "x-cache"
    };
    let mut headers = http::HeaderMap::with_capacity(stored.header.headers.len() + 2);
    for (name, value) in stored.header.headers.iter() {
        if !framing(name) && !not_modified.headers.contains_key(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &not_modified.headers {
        if !framing(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(validators) = &stored.validators {
        validators.restore_targeted(&mut headers);
    }
    Fetched {
        status: stored.header.status,
        headers,
        body: stored.body.clone(),
    }
}

/// The upstream's `Age` in seconds (RFC 9111 §5.1): the first value that is a
/// non-negative integer, capped at 2^31; a malformed one is ignored (0).
fn upstream_age(headers: &http::HeaderMap) -> u64 {
    const MAX_AGE: u64 = 1 << 31;
    headers
        .get_all(header::AGE)
        .iter()
        .find_map(|v| {
            let digits = v.as_bytes();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            // All digits: too large to parse means larger than the cap.
            Some(
                std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse::<u64>().ok())
                    .map_or(MAX_AGE, |a| a.min(MAX_AGE)),
            )
        })
        .unwrap_or(0)
}

/// A copy of a header name in its own allocation. Parsed names and values may be slices
/// of the HTTP client's read buffer; storing them would keep that whole buffer alive for
/// as long as the entry lives (kilobytes per entry, unaccounted).
fn owned_name(name: &header::HeaderName) -> header::HeaderName {
    header::HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone())
}

/// A copy of a header value in its own allocation (see [`owned_name`]).
fn owned_value(value: &http::HeaderValue) -> http::HeaderValue {
    http::HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone())
}

/// A copy of a request in its own allocations, to keep with a stored entry.
fn owned_request(fetch: &FetchRequest) -> FetchRequest {
    FetchRequest {
        tags: fetch.tags.clone(),
        method: fetch.method.clone(),
        path_and_query: fetch.path_and_query.clone(),
        headers: fetch
            .headers
            .iter()
            .map(|(k, v)| (owned_name(k), owned_value(v)))
            .collect(),
        body: Bytes::copy_from_slice(&fetch.body),
    }
}

fn disposition(
    fetched: &Fetched,
    settings: &CacheSettings,
    learned: &[header::HeaderName],
) -> Disposition {
    disposition_of(fetched.status, &fetched.headers, settings, learned)
}

/// `learned`: the learned vary headers the answer's key holds, beside the key headers.
fn disposition_of(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    settings: &CacheSettings,
    learned: &[header::HeaderName],
) -> Disposition {
    if headers.contains_key(header::SET_COOKIE) {
        return Disposition::Private(NotStored::SetCookie);
    }
    if !settings.ignore_upstream_cache_control {
        let private = Directives::parse_for(headers, &settings.targeted_field).not_storable();
        if let Some(why) = private {
            return Disposition::Private(why);
        }
    }
    if vary::uncovered(headers, &settings.key_headers, learned) != Uncovered::None {
        return Disposition::Private(NotStored::Vary);
    }
    if settings.ttl_for(status.as_u16()).is_some() {
        Disposition::Store
    } else {
        Disposition::Share
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::origin::Pending;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An origin that answers every request with its path, after a pause, counting fetches.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl Origin for Counting {
        fn fetch(&self, req: FetchRequest, _limit: usize) -> Pending<'_, Answer> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(Answer::Whole(Fetched {
                    status: http::StatusCode::OK,
                    headers: http::HeaderMap::new(),
                    body: Bytes::from(req.path_and_query),
                }))
            })
        }
    }

    fn route(name: &str, origin: Arc<Counting>) -> Arc<CachedRoute> {
        let settings = CacheSettings {
            ttl: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            statuses: Vec::new(),
            key_query: KeyQuery::All,
            key_body: KeyBody::None,
            key_headers: Vec::new(),
            unkeyed_body: UnkeyedBody::Drop,
            lock_timeout: Duration::from_secs(5),
            on_lock_timeout: OnLockTimeout::Error,
            refresh_ahead: None,
            jitter: 0.0,
            ignore_upstream_cache_control: false,
            freshness: Freshness::Route,
            max_ttl: None,
            silent: crate::config::Silent::Ttl,
            targeted_field: header::HeaderName::from_static("stoa-cache-control"),
            warm: Vec::new(),
            refresh_hook: None,
            max_entry_bytes: 1 << 20,
            compress: None,
            compression: None,
            tags: Vec::new(),
            max_variants: 16,
        };
        let counter = || prometheus::IntCounter::new("counter", "test").unwrap();
        let too_large = counter();
        let compressions = encoding::Counters::new([
            (counter(), counter()),
            (counter(), counter()),
            (counter(), counter()),
        ]);
        Arc::new(CachedRoute {
            name: name.to_string(),
            path: crate::routes::PathTemplate::parse("/{*rest}").unwrap(),
            settings,
            origin,
            origin_name: "test".to_string(),
            too_large,
            compressions,
            revalidations: Revalidations {
                not_modified: counter(),
                modified: counter(),
                failed: counter(),
            },
            not_modified: counter(),
            vary: Learned::new(
                &[],
                vary::Refusals {
                    max_variants: counter(),
                    max_vary_headers: counter(),
                },
            ),
        })
    }

    async fn get(engine: &Arc<CacheEngine>, route: &Arc<CachedRoute>, path: &str) -> Served {
        let headers = http::HeaderMap::new();
        let key = route
            .key_for(&http::Method::GET, path, b"", &headers)
            .unwrap();
        let fetch = || route.shared_fetch(http::Method::GET, path, &key, &headers, None, path);
        engine.serve(route, &key, &headers, fetch).await
    }

    #[tokio::test]
    async fn any_origin_feeds_the_cache_once_per_key() {
        let engine = CacheEngine::new(1 << 20);
        let origin = Arc::new(Counting::default());
        let a = route("a", origin.clone());
        let b = route("b", origin.clone());
        let calls = (0..20).map(|_| get(&engine, &a, "/x"));
        for served in futures_util::future::join_all(calls).await {
            let Served::Entry(entry, _) = served else {
                panic!("an answer from the origin");
            };
            assert_eq!(entry.body, "/x");
        }
        assert_eq!(origin.0.load(Ordering::SeqCst), 1, "one fetch for one key");
        assert!(matches!(
            get(&engine, &a, "/x").await,
            Served::Entry(_, CacheStatus::Hit)
        ));
        get(&engine, &a, "/y").await;
        get(&engine, &b, "/x").await;
        assert_eq!(origin.0.load(Ordering::SeqCst), 3);

        let hard = |what| Invalidation { what, soft: false };
        let path = PurgeWhat::Path {
            route: "a".into(),
            path: "/x".into(),
        };
        assert_eq!(engine.apply_local(&hard(path)), 1);
        let route = PurgeWhat::Route { route: "b".into() };
        assert_eq!(engine.apply_local(&hard(route)), 1);
        assert_eq!(engine.store.len(), 1, "a's /y stays");
        assert!(matches!(
            get(&engine, &a, "/y").await,
            Served::Entry(_, CacheStatus::Hit)
        ));
    }

    /// An origin whose answer is the version it read when the fetch began; fetches wait
    /// at the gate while it is shut.
    struct Versioned {
        version: AtomicUsize,
        calls: AtomicUsize,
        gate: tokio::sync::watch::Sender<bool>,
    }

    impl Versioned {
        fn new() -> Arc<Self> {
            Arc::new(Versioned {
                version: AtomicUsize::new(1),
                calls: AtomicUsize::new(0),
                gate: tokio::sync::watch::channel(true).0,
            })
        }
    }

    impl Origin for Versioned {
        fn fetch(&self, _req: FetchRequest, _limit: usize) -> Pending<'_, Answer> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let read = self.version.load(Ordering::SeqCst);
            let mut gate = self.gate.subscribe();
            Box::pin(async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok(Answer::Whole(Fetched {
                    status: http::StatusCode::OK,
                    headers: http::HeaderMap::new(),
                    body: Bytes::from(format!("v{read}")),
                }))
            })
        }
    }

    fn versioned_route(origin: Arc<Versioned>) -> Arc<CachedRoute> {
        let counting = route("r", Arc::new(Counting::default()));
        let mut route = Arc::try_unwrap(counting).ok().unwrap();
        route.origin = origin;
        Arc::new(route)
    }

    fn body_of(served: &Served) -> (String, CacheStatus) {
        match served {
            Served::Entry(entry, status) => {
                (String::from_utf8_lossy(&entry.body).into_owned(), *status)
            }
            _ => panic!("an entry"),
        }
    }

    #[tokio::test]
    async fn a_purge_during_a_fill_is_not_undone_by_it() {
        let engine = CacheEngine::new(1 << 20);
        let origin = Versioned::new();
        let route = versioned_route(origin.clone());
        origin.gate.send_replace(false);
        // A fill reads version 1, then waits.
        let before = tokio::spawn({
            let (engine, route) = (engine.clone(), route.clone());
            async move { get(&engine, &route, "/k").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let joined = tokio::spawn({
            let (engine, route) = (engine.clone(), route.clone());
            async move { get(&engine, &route, "/k").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The upstream changes, then the purge is acknowledged.
        origin.version.store(2, Ordering::SeqCst);
        let purge = Invalidation {
            what: PurgeWhat::Path {
                route: "r".into(),
                path: "/k".into(),
            },
            soft: false,
        };
        engine.apply_local(&purge);
        // A request after it starts a new fetch rather than joining the old one.
        let after = tokio::spawn({
            let (engine, route) = (engine.clone(), route.clone());
            async move { get(&engine, &route, "/k").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(origin.calls.load(Ordering::SeqCst), 2);
        origin.gate.send_replace(true);
        // Those that joined before the purge get what the old fill read ...
        assert_eq!(body_of(&before.await.unwrap()).0, "v1");
        assert_eq!(body_of(&joined.await.unwrap()).0, "v1");
        // ... and everything after it the new version, from memory too.
        assert_eq!(body_of(&after.await.unwrap()).0, "v2");
        assert_eq!(
            body_of(&get(&engine, &route, "/k").await),
            ("v2".into(), CacheStatus::Hit)
        );
        assert_eq!(origin.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_fill_an_invalidation_reached_is_never_stored() {
        // Whatever the order of the fill's end and the request after the purge.
        let engine = CacheEngine::new(1 << 20);
        let origin = Versioned::new();
        let route = versioned_route(origin.clone());
        origin.gate.send_replace(false);
        let before = tokio::spawn({
            let (engine, route) = (engine.clone(), route.clone());
            async move { get(&engine, &route, "/k").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        origin.version.store(2, Ordering::SeqCst);
        let purge = Invalidation {
            what: PurgeWhat::Route { route: "r".into() },
            soft: false,
        };
        engine.apply_local(&purge);
        origin.gate.send_replace(true);
        assert_eq!(body_of(&before.await.unwrap()).0, "v1");
        assert!(engine.store.is_empty(), "the raced fill was not stored");
        assert_eq!(
            body_of(&get(&engine, &route, "/k").await),
            ("v2".into(), CacheStatus::Miss)
        );
    }

    #[tokio::test]
    async fn a_soft_purge_serves_stale_while_one_refresh_runs() {
        let engine = CacheEngine::new(1 << 20);
        let origin = Versioned::new();
        let route = versioned_route(origin.clone());
        assert_eq!(body_of(&get(&engine, &route, "/k").await).0, "v1");
        origin.version.store(2, Ordering::SeqCst);
        origin.gate.send_replace(false);
        let soft = Invalidation {
            what: PurgeWhat::Prefix {
                route: None,
                prefix: "/".into(),
            },
            soft: true,
        };
        assert_eq!(engine.apply_local(&soft), 1);
        assert_eq!(engine.apply_local(&soft), 0, "marked once");
        for _ in 0..50 {
            assert_eq!(
                body_of(&get(&engine, &route, "/k").await),
                ("v1".into(), CacheStatus::Stale)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(origin.calls.load(Ordering::SeqCst), 2, "one refresh");
        origin.gate.send_replace(true);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            body_of(&get(&engine, &route, "/k").await),
            ("v2".into(), CacheStatus::Hit)
        );
        assert_eq!(origin.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn only_keyed_query_parameters_are_sent() {
        let only = KeyQuery::Only(vec!["region".into(), "a b".into()]);
        let cases = [
            ("/p", "/p"),
            ("/p?utm=x", "/p"),
            ("/p?utm=x&region=S%C3%B6&b=1", "/p?region=S%C3%B6"),
            ("/p?region=1&region=2&a+b=3", "/p?region=1&region=2&a+b=3"),
            ("/p?a%20b=3&&region", "/p?a%20b=3&region"),
            ("/p?", "/p"),
        ];
        for (given, sent) in cases {
            assert_eq!(keyed_query_only(given, &only), sent, "{given}");
        }
        assert_eq!(keyed_query_only("/p?z=1&a=2", &KeyQuery::All), "/p?z=1&a=2");
    }

    /// An origin that answers with the `Accept-Language` it was asked in (`-` for none)
    /// and the `Vary` in `vary`, after a pause, counting fetches.
    struct Languages {
        vary: std::sync::Mutex<&'static str>,
        calls: AtomicUsize,
    }

    impl Languages {
        fn new(vary: &'static str) -> Arc<Self> {
            Arc::new(Languages {
                vary: std::sync::Mutex::new(vary),
                calls: AtomicUsize::new(0),
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Origin for Languages {
        fn fetch(&self, req: FetchRequest, _limit: usize) -> Pending<'_, Answer> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let vary = *self.vary.lock().unwrap();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let language = req
                    .headers
                    .get(header::ACCEPT_LANGUAGE)
                    .map_or("-".to_string(), |v| v.to_str().unwrap().to_string());
                let mut headers = http::HeaderMap::new();
                if !vary.is_empty() {
                    headers.insert(header::VARY, http::HeaderValue::from_static(vary));
                }
                Ok(Answer::Whole(Fetched {
                    status: http::StatusCode::OK,
                    headers,
                    body: Bytes::from(language),
                }))
            })
        }
    }

    fn language_route(origin: Arc<Languages>, max_variants: usize) -> Arc<CachedRoute> {
        let counting = route("r", Arc::new(Counting::default()));
        let mut route = Arc::try_unwrap(counting).ok().unwrap();
        route.origin = origin;
        route.settings.max_variants = max_variants;
        Arc::new(route)
    }

    async fn get_in(
        engine: &Arc<CacheEngine>,
        route: &Arc<CachedRoute>,
        path: &str,
        language: Option<&str>,
    ) -> (String, CacheStatus) {
        let mut headers = http::HeaderMap::new();
        if let Some(language) = language {
            headers.insert(header::ACCEPT_LANGUAGE, language.parse().unwrap());
        }
        let key = route
            .key_for(&http::Method::GET, path, b"", &headers)
            .unwrap();
        let fetch = || route.shared_fetch(http::Method::GET, path, &key, &headers, None, path);
        body_of(&engine.serve(route, &key, &headers, fetch).await)
    }

    #[tokio::test]
    async fn a_vary_is_learned_and_each_client_gets_an_answer_made_with_its_header() {
        let engine = CacheEngine::new(1 << 20);
        let origin = Languages::new("Accept-Language");
        let route = language_route(origin.clone(), 16);
        // The first answer was made without the client's language: asked again with it.
        assert_eq!(
            get_in(&engine, &route, "/p", Some("sv")).await,
            ("sv".into(), CacheStatus::Miss)
        );
        assert_eq!(origin.calls(), 2);
        assert_eq!(route.vary.snapshot(), [header::ACCEPT_LANGUAGE]);
        assert_eq!(
            get_in(&engine, &route, "/p", Some(" SV ")).await,
            ("sv".into(), CacheStatus::Hit),
            "the same language, normalised"
        );
        assert_eq!(
            get_in(&engine, &route, "/p", Some("en")).await,
            ("en".into(), CacheStatus::Miss)
        );
        assert_eq!(
            get_in(&engine, &route, "/p", None).await,
            ("-".into(), CacheStatus::Miss)
        );
        assert_eq!(origin.calls(), 4, "one call per new variant");
        for (language, body) in [(Some("sv"), "sv"), (Some("en"), "en"), (None, "-")] {
            assert_eq!(
                get_in(&engine, &route, "/p", language).await,
                (body.into(), CacheStatus::Hit)
            );
        }
        // Another path of the route: keyed on the language from its first request on.
        assert_eq!(
            get_in(&engine, &route, "/q", Some("fi")).await,
            ("fi".into(), CacheStatus::Miss)
        );
        assert_eq!(origin.calls(), 5);
        assert_eq!(engine.store.len(), 4);

        // An exact-request purge names the key's base: every variant of the request goes.
        let headers = http::HeaderMap::new();
        let key = route
            .key_for(&http::Method::GET, "/p", b"", &headers)
            .unwrap();
        assert_ne!(key.base(), key.as_str());
        let exact = Invalidation {
            what: PurgeWhat::Key {
                route: "r".into(),
                key: key.base().to_string(),
            },
            soft: false,
        };
        assert_eq!(engine.apply_local(&exact), 3);
        assert_eq!(engine.store.len(), 1, "/q stays");
        assert_eq!(
            get_in(&engine, &route, "/p", Some("sv")).await,
            ("sv".into(), CacheStatus::Miss)
        );
        assert_eq!(origin.calls(), 6, "no second learning");
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_learning_and_one_flight_per_variant() {
        let engine = CacheEngine::new(1 << 20);
        let origin = Languages::new("accept-language");
        let route = language_route(origin.clone(), 16);
        let languages = ["sv", "en", "sv", "fi", "en", "sv", "sv", "fi"];
        let calls = languages
            .iter()
            .map(|l| get_in(&engine, &route, "/p", Some(l)));
        let answers = futures_util::future::join_all(calls).await;
        for (language, (body, _)) in languages.iter().zip(&answers) {
            assert_eq!(body, language);
        }
        assert_eq!(
            origin.calls(),
            1 + 3,
            "the first answer, then one per language"
        );
        // A key made before the route learned goes to the key with the language at once.
        let late = language_route(origin.clone(), 16);
        let mut headers = http::HeaderMap::new();
        headers.insert(header::ACCEPT_LANGUAGE, "da".parse().unwrap());
        let old = late
            .key_for(&http::Method::GET, "/p", b"", &headers)
            .unwrap();
        assert!(late.vary.learn(&[header::ACCEPT_LANGUAGE]));
        let fetch = || late.shared_fetch(http::Method::GET, "/p", &old, &headers, None, "/p");
        let served = engine.serve(&late, &old, &headers, fetch).await;
        assert_eq!(body_of(&served), ("da".into(), CacheStatus::Miss));
        assert_eq!(origin.calls(), 5, "one call");
    }

    #[tokio::test]
    async fn max_variants_and_vary_star_are_not_stored() {
        let engine = CacheEngine::new(1 << 20);
        let origin = Languages::new("Accept-Language");
        let route = language_route(origin.clone(), 2);
        get_in(&engine, &route, "/p", Some("sv")).await;
        get_in(&engine, &route, "/p", Some("en")).await;
        assert_eq!(origin.calls(), 3);
        for _ in 0..2 {
            assert_eq!(
                get_in(&engine, &route, "/p", Some("fi")).await,
                ("fi".into(), CacheStatus::Miss),
                "a third variant is served, not stored"
            );
        }
        assert_eq!(origin.calls(), 5);
        assert_eq!(route.vary.refused.max_variants.get(), 2);
        assert_eq!(engine.store.len(), 2);
        // Another request has room for its own.
        assert_eq!(
            get_in(&engine, &route, "/p?x=1", Some("fi")).await,
            ("fi".into(), CacheStatus::Miss)
        );
        assert_eq!(
            get_in(&engine, &route, "/p?x=1", Some("fi")).await,
            ("fi".into(), CacheStatus::Hit)
        );

        let star = Languages::new("*");
        let route = language_route(star.clone(), 16);
        for _ in 0..2 {
            let (_, status) = get_in(&engine, &route, "/s", Some("sv")).await;
            assert_eq!(status, CacheStatus::Miss);
        }
        assert_eq!(star.calls(), 2);
        assert!(route.vary.is_empty());
    }

    #[test]
    fn a_shared_fetch_carries_the_learned_headers_its_key_holds() {
        let route = language_route(Languages::new(""), 16);
        let mut headers = http::HeaderMap::new();
        headers.insert(header::ACCEPT_LANGUAGE, "sv".parse().unwrap());
        headers.insert(header::ORIGIN, "https://a.example".parse().unwrap());
        let before = route
            .key_for(&http::Method::GET, "/p", b"", &headers)
            .unwrap();
        let sent = route.shared_fetch(http::Method::GET, "/p", &before, &headers, None, "/p");
        assert!(sent.headers.is_empty(), "{:?}", sent.headers);
        assert!(route.vary.learn(&[header::ACCEPT_LANGUAGE]));
        let after = route
            .key_for(&http::Method::GET, "/p", b"", &headers)
            .unwrap();
        assert_eq!(after.base(), before.as_str());
        let sent = route.shared_fetch(http::Method::GET, "/p", &after, &headers, None, "/p");
        assert_eq!(sent.headers.len(), 1);
        assert_eq!(sent.headers[header::ACCEPT_LANGUAGE], "sv");
        // A key made before learning sends only what it holds.
        let sent = route.shared_fetch(http::Method::GET, "/p", &before, &headers, None, "/p");
        assert!(sent.headers.is_empty());
    }
}
