//! Validation of the `[cache]` section and of each route's `cache` table.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use crate::config::capacity;
use crate::config::raw::{RawCache, RawCacheSection, RawCompression, RawDisk, RawKeyBody, RawWarm};
use crate::config::validate::Validator;
use crate::config::RouteSpec;
use crate::routes::PathTemplate;
use settings::{
    CacheSettings, Coding, CompressionSettings, Freshness, KeyBody, KeyQuery, OnLockTimeout,
    RefreshHook, Silent, UnkeyedBody, WarmRequest, DEFAULT_TARGETED_FIELD,
};
use tags::{TagScope, TagTemplate, MAX_TAGS};

pub mod settings;
pub mod tags;

/// Request headers stoa sets itself for each hop: keying on them would forward a client's
/// framing to the upstream.
pub const UNKEYABLE_HEADERS: [&str; 9] = [
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Names the field aimed at stoa may not take: hop-by-hop fields, the fields HTTP caching
/// and framing rest on (RFC 9110, RFC 9111), the targeted field of CDNs (RFC 9213 §3) and
/// the fields stoa writes itself. Removing any of them from answers would break them.
const NOT_TARGETED_FIELDS: [&str; 29] = [
    // Hop by hop.
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    // Caching, validation and representation.
    "age",
    "cache-control",
    "cdn-cache-control",
    "content-encoding",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expires",
    "last-modified",
    "location",
    "pragma",
    "set-cookie",
    "vary",
    "www-authenticate",
    // stoa's own.
    "cache-status",
    "x-cache",
    "x-request-id",
];

/// The `[cache]` section: the one store all cached routes share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStoreSettings {
    /// Bound on the bytes held (bodies, headers and keys).
    pub max_bytes: u64,
    /// Largest answer body stored, for routes that do not say.
    pub max_entry_bytes: u64,
    /// `[cache.compression]`.
    pub compression: Arc<CompressionSettings>,
    /// The response field aimed at stoa alone (RFC 9213), lowercase.
    pub targeted_field: HeaderName,
    /// `cache.disk`: the disk tier, if any.
    pub disk: Option<DiskSettings>,
}

/// `cache.disk`: where the disk tier keeps its files and how many bytes they may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSettings {
    pub path: std::path::PathBuf,
    pub max_bytes: u64,
}

/// `cache.disk.max_bytes` when it is not given.
pub const DEFAULT_DISK_MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// Variants stored per request (route, method, path, query, body) when a route learned
/// vary headers and does not say.
pub const DEFAULT_MAX_VARIANTS: usize = 16;

/// Largest `max_variants` accepted.
const MAX_MAX_VARIANTS: i64 = 4096;

/// Largest answer stored when `[cache]` does not say (if the store can hold it).
pub const DEFAULT_MAX_ENTRY_BYTES: u64 = 8 * 1024 * 1024;

impl Validator<'_> {
    pub(super) fn cache_settings(
        &mut self,
        path: &str,
        raw: RawCache,
        methods: Option<&[http::Method]>,
        default_lock_timeout: Duration,
        template: Option<&PathTemplate>,
    ) -> Option<CacheSettings> {
        let ttl = self.duration(&format!("{path}.ttl"), Some(&raw.ttl), Duration::ZERO);
        let swr = self.optional_duration(
            &format!("{path}.stale_while_revalidate"),
            raw.stale_while_revalidate.as_ref(),
        );
        let sie = self.optional_duration(
            &format!("{path}.stale_if_error"),
            raw.stale_if_error.as_ref(),
        );
        let lock_timeout = self.duration(
            &format!("{path}.lock_timeout"),
            raw.lock_timeout.as_ref(),
            default_lock_timeout,
        );

        let mut statuses = Vec::new();
        let mut statuses_ok = true;
        for (code, ttl) in raw.statuses.unwrap_or_default() {
            let key = format!("{path}.statuses.{code}");
            let parsed = code.parse::<u16>().ok().filter(|c| (100..=599).contains(c));
            match parsed {
                None => {
                    self.problem(key, format!("{code:?} is not an HTTP status code"));
                    statuses_ok = false;
                }
                Some(200) => {
                    self.problem(key, "200 uses the route's ttl; list other statuses here");
                    statuses_ok = false;
                }
                Some(c) => match self.duration(&key, Some(&ttl), Duration::ZERO) {
                    Some(d) => statuses.push((c, d)),
                    None => statuses_ok = false,
                },
            }
        }

        let key_query = match raw.key_query {
            None => KeyQuery::All,
            Some(names) if names.iter().any(|n| n.is_empty()) => {
                self.problem(
                    format!("{path}.key_query"),
                    "parameter names must not be empty",
                );
                KeyQuery::All
            }
            Some(names) => KeyQuery::Only(names),
        };
        let key_body = match raw.key_body {
            None | Some(RawKeyBody::Whole(false)) => KeyBody::None,
            Some(RawKeyBody::Whole(true)) => KeyBody::Whole,
            Some(RawKeyBody::Fields(f)) if f.is_empty() || f.iter().any(|n| n.is_empty()) => {
                self.problem(
                    format!("{path}.key_body"),
                    "list JSON field names, or write true for the whole body",
                );
                KeyBody::None
            }
            Some(RawKeyBody::Fields(f)) => KeyBody::Fields(f),
        };
        let mut key_headers = Vec::new();
        for (i, name) in raw.key_headers.unwrap_or_default().iter().enumerate() {
            match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                Ok(h) if UNKEYABLE_HEADERS.contains(&h.as_str()) => self.problem(
                    format!("{path}.key_headers[{i}]"),
                    format!("{name:?} is set by stoa for each hop and cannot be in the key"),
                ),
                Ok(h) => key_headers.push(h),
                Err(_) => self.problem(
                    format!("{path}.key_headers[{i}]"),
                    format!("{name:?} is not a header name"),
                ),
            }
        }
        let unkeyed_body = match (raw.unkeyed_body.as_deref(), &key_body) {
            (None | Some("drop"), _) => Some(UnkeyedBody::Drop),
            (Some("bypass"), KeyBody::None) => Some(UnkeyedBody::Bypass),
            (Some("bypass"), _) => {
                self.problem(
                    format!("{path}.unkeyed_body"),
                    "this route keys on the body (key_body): no body is unkeyed",
                );
                None
            }
            (Some(other), _) => {
                self.problem(
                    format!("{path}.unkeyed_body"),
                    format!("{other:?} is not one of drop, bypass"),
                );
                None
            }
        };
        let on_lock_timeout = match raw.on_lock_timeout.as_deref() {
            None | Some("serve_stale") => Some(OnLockTimeout::ServeStale),
            Some("error") => Some(OnLockTimeout::Error),
            Some("bypass") => Some(OnLockTimeout::Bypass),
            Some(other) => {
                self.problem(
                    format!("{path}.on_lock_timeout"),
                    format!("{other:?} is not one of serve_stale, error, bypass"),
                );
                None
            }
        };
        let refresh_ahead = match raw.refresh_ahead {
            Some(f) if !(f > 0.0 && f < 1.0) => {
                self.problem(
                    format!("{path}.refresh_ahead"),
                    format!("{f} is not a fraction of the TTL between 0 and 1 (e.g. 0.8)"),
                );
                None
            }
            other => Some(other),
        };
        let jitter = match raw.jitter {
            None => Some(0.0),
            Some(j) if (0.0..=0.5).contains(&j) => Some(j),
            Some(j) => {
                self.problem(
                    format!("{path}.jitter"),
                    format!("{j} is not a fraction between 0 and 0.5 (e.g. 0.05)"),
                );
                None
            }
        };
        let max_variants = match raw.max_variants {
            None => Some(DEFAULT_MAX_VARIANTS),
            Some(n) if (1..=MAX_MAX_VARIANTS).contains(&n) => usize::try_from(n).ok(),
            Some(n) => {
                self.problem(
                    format!("{path}.max_variants"),
                    format!("{n} is not a number of variants from 1 to {MAX_MAX_VARIANTS}"),
                );
                None
            }
        };

        let freshness = match raw.freshness.as_deref() {
            None | Some("route") => Some(Freshness::Route),
            Some("origin") => Some(Freshness::Origin),
            Some(other) => {
                self.problem(
                    format!("{path}.freshness"),
                    format!(
                        "{other:?} is not one of route (the route's ttl), origin (the upstream's \
                         Cache-Control / Expires, the route's ttl when it says nothing)"
                    ),
                );
                None
            }
        };
        let max_ttl = match &raw.max_ttl {
            None => Some(None),
            Some(v) => {
                let key = format!("{path}.max_ttl");
                match (self.duration(&key, Some(v), Duration::ZERO), freshness) {
                    (None, _) => None,
                    (Some(_), Some(Freshness::Route)) => {
                        self.problem(
                            key,
                            "max_ttl caps the freshness the upstream gives: it applies only with \
                             freshness = \"origin\" (with freshness = \"route\", ttl is the freshness)",
                        );
                        None
                    }
                    (Some(max), _) => match ttl {
                        Some(ttl) if max < ttl => {
                            self.problem(
                                key,
                                format!(
                                    "{} is below the route's ttl ({}), which is the freshness when \
                                     the upstream says nothing: raise max_ttl or lower ttl",
                                    humantime::format_duration(max),
                                    humantime::format_duration(ttl)
                                ),
                            );
                            None
                        }
                        _ => Some(Some(max)),
                    },
                }
            }
        };

        let silent = match (raw.silent.as_deref(), freshness) {
            (None | Some("ttl"), _) => Some(Silent::Ttl),
            (Some("heuristic"), Some(Freshness::Route)) => {
                self.problem(
                    format!("{path}.silent"),
                    "\"heuristic\" is how stoa treats an upstream that says nothing of freshness: it \
                     applies only with freshness = \"origin\" (with freshness = \"route\", ttl is \
                     every answer's freshness)",
                );
                None
            }
            (Some("heuristic"), _) => Some(Silent::Heuristic),
            (Some(other), _) => {
                self.problem(
                    format!("{path}.silent"),
                    format!(
                        "{other:?} is not one of ttl (the route's ttl when the upstream states no \
                         freshness), heuristic (only what RFC 9111 §4.2.2 allows)"
                    ),
                );
                None
            }
        };

        // Only safe or pure methods may be cached, and a POST only when keyed on its body.
        let route_path = path.strip_suffix(".cache").unwrap_or(path);
        match methods {
            None => self.problem(
                format!("{route_path}.methods"),
                "a cached route must list its methods (GET, HEAD, or POST keyed on the body)",
            ),
            Some(ms) => {
                for m in ms {
                    let ok = m == http::Method::GET
                        || m == http::Method::HEAD
                        || (m == http::Method::POST && key_body != KeyBody::None);
                    if !ok {
                        self.problem(
                            format!("{route_path}.methods"),
                            format!(
                                "{m} cannot be cached (GET and HEAD can; POST only with key_body)"
                            ),
                        );
                    }
                }
            }
        }

        let mut warm = Vec::new();
        for (i, w) in raw.warm.unwrap_or_default().into_iter().enumerate() {
            let key = format!("{path}.warm[{i}]");
            let (request_path, body) = match w {
                RawWarm::Path(p) => (p, None),
                RawWarm::WithBody { path, body } => (path, Some(body.to_string())),
            };
            let bare = request_path.split('?').next().unwrap_or("");
            if template.is_some_and(|t| t.matches(bare).is_none()) {
                self.problem(
                    key,
                    format!("{request_path:?} does not match the route's path"),
                );
                continue;
            }
            if body.is_none() && key_body != KeyBody::None {
                self.problem(key, "this route keys on the body: give { path, body }");
                continue;
            }
            if body.is_some() && key_body == KeyBody::None {
                self.problem(
                    key,
                    "this route does not key on the body, so a warm-up body would not be sent: give the path only",
                );
                continue;
            }
            warm.push(WarmRequest {
                path: request_path,
                body,
            });
        }
        // Checked against the store, and defaulted, once the `[cache]` section is known.
        let max_entry_bytes = match &raw.max_entry_bytes {
            None => Some(0),
            Some(size) => self.size(&format!("{path}.max_entry_bytes"), Some(size), 0),
        };
        let refresh_hook = match raw.refresh_hook.as_deref().map(str::trim) {
            None => Some(None),
            Some(text) => {
                let (method, hook_path) = match text.split_once(' ') {
                    Some((m, p)) => (m.trim(), p.trim()),
                    None => ("GET", text),
                };
                match (
                    http::Method::from_bytes(method.as_bytes()),
                    hook_path.starts_with('/'),
                ) {
                    (Ok(m), true) if method.chars().all(|c| c.is_ascii_uppercase()) => {
                        Some(Some(RefreshHook {
                            method: m,
                            path: hook_path.to_string(),
                        }))
                    }
                    _ => {
                        self.problem(
                            format!("{path}.refresh_hook"),
                            format!("{text:?} is not an upstream call like \"/refresh_data\" or \"POST /rebuild\""),
                        );
                        None
                    }
                }
            }
        };

        let tags = self.tag_templates(path, raw.tags, template, &key_query, &key_body);

        Some(CacheSettings {
            tags: tags?,
            warm,
            refresh_hook: refresh_hook?,
            ttl: ttl?,
            stale_while_revalidate: swr?,
            stale_if_error: sie?,
            statuses: statuses_ok.then_some(statuses)?,
            key_query,
            key_body,
            key_headers,
            unkeyed_body: unkeyed_body?,
            lock_timeout: lock_timeout?,
            on_lock_timeout: on_lock_timeout?,
            refresh_ahead: refresh_ahead?,
            jitter: jitter?,
            max_variants: max_variants?,
            ignore_upstream_cache_control: raw.ignore_upstream_cache_control.unwrap_or(false),
            freshness: freshness?,
            max_ttl: max_ttl?,
            silent: silent?,
            // The `[cache]` one, once that section is known.
            targeted_field: HeaderName::from_static(DEFAULT_TARGETED_FIELD),
            max_entry_bytes: max_entry_bytes?,
            compress: raw.compress,
            compression: None,
        })
    }

    /// `cache.tags`: every template compiled against the parts of the route's key, every
    /// problem of every template reported.
    fn tag_templates(
        &mut self,
        path: &str,
        raw: Option<Vec<String>>,
        template: Option<&PathTemplate>,
        key_query: &KeyQuery,
        key_body: &KeyBody,
    ) -> Option<Vec<TagTemplate>> {
        let raw = raw.unwrap_or_default();
        let scope = TagScope {
            path: template,
            query: match key_query {
                KeyQuery::Only(names) => names,
                KeyQuery::All => &[],
            },
            body: match key_body {
                KeyBody::Fields(fields) => fields,
                KeyBody::None | KeyBody::Whole => &[],
            },
        };
        let mut ok = true;
        if raw.len() > MAX_TAGS {
            self.problem(
                format!("{path}.tags"),
                format!(
                    "lists {} tags; an answer carries at most {MAX_TAGS} (the first ones)",
                    raw.len()
                ),
            );
            ok = false;
        }
        let mut tags = Vec::with_capacity(raw.len());
        for (j, text) in raw.iter().enumerate() {
            match TagTemplate::parse(text, &scope) {
                Ok(t) => tags.push(t),
                Err(errors) => {
                    for e in errors {
                        self.problem(format!("{path}.tags[{j}]"), format!("{text:?} {e}"));
                    }
                    ok = false;
                }
            }
        }
        ok.then_some(tags)
    }

    /// The `[cache]` section: the store's bound and the largest answer it stores, by
    /// default 8 MiB or what the store can hold in one entry, if less.
    pub(super) fn cache_store(&mut self, raw: RawCacheSection) -> Option<CacheStoreSettings> {
        let max_bytes = self.size("cache.max_bytes", raw.max_bytes.as_ref(), 256 * 1024 * 1024)?;
        let disk = match raw.disk {
            Some(disk) => Some(self.disk(disk)?),
            None => None,
        };
        let disk_bytes = disk.as_ref().map_or(0, |d| d.max_bytes);
        let holds = largest_stored_body(max_bytes, disk_bytes);
        let max_entry_bytes = match &raw.max_entry_bytes {
            None => DEFAULT_MAX_ENTRY_BYTES.min(holds),
            // A problem is recorded either way; the routes are still checked.
            Some(size) => self
                .size("cache.max_entry_bytes", Some(size), 0)
                .and_then(|n| self.entry_fits("cache.max_entry_bytes", n, max_bytes, disk_bytes))
                .unwrap_or(holds),
        };
        if max_entry_bytes == 0 {
            self.problem(
                "cache.max_bytes",
                format!("{max_bytes} bytes is too small to hold any answer"),
            );
            return None;
        }
        let compression = self.compression(raw.compression.unwrap_or_default());
        let targeted_field = self.targeted_field(raw.targeted_field.as_deref());
        Some(CacheStoreSettings {
            max_bytes,
            max_entry_bytes,
            compression: Arc::new(compression?),
            targeted_field: targeted_field?,
            disk,
        })
    }

    /// `cache.disk`: a directory stoa can create and write in, and a bound that holds the
    /// tier's smallest number of blocks.
    fn disk(&mut self, raw: RawDisk) -> Option<DiskSettings> {
        let max_bytes = self.size(
            "cache.disk.max_bytes",
            raw.max_bytes.as_ref(),
            DEFAULT_DISK_MAX_BYTES,
        );
        if let Some(n) = max_bytes.filter(|n| *n < capacity::DISK_MIN_BYTES) {
            self.problem(
                "cache.disk.max_bytes",
                format!(
                    "{n} bytes is too small for the disk tier: at least {} bytes",
                    capacity::DISK_MIN_BYTES
                ),
            );
            return None;
        }
        let path = std::path::PathBuf::from(raw.path.trim());
        if raw.path.trim().is_empty() {
            self.problem("cache.disk.path", "must name a directory");
            return None;
        }
        if let Err(e) = writable_dir(&path) {
            self.problem(
                "cache.disk.path",
                format!("{}: cannot create or write in it: {e}", path.display()),
            );
            return None;
        }
        Some(DiskSettings {
            path,
            max_bytes: max_bytes?,
        })
    }

    /// `cache.targeted_field`: a field name of the upstream's answers that is not one HTTP or
    /// stoa gives another meaning.
    fn targeted_field(&mut self, raw: Option<&str>) -> Option<HeaderName> {
        let Some(text) = raw else {
            return Some(HeaderName::from_static(DEFAULT_TARGETED_FIELD));
        };
        let key = "cache.targeted_field";
        match HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes()) {
            Ok(name) if NOT_TARGETED_FIELDS.contains(&name.as_str()) => {
                self.problem(
                    key,
                    format!(
                        "{text:?} already has a meaning in HTTP or stoa, and stoa removes the field \
                         aimed at it from every answer: name a field of its own, such as \
                         \"Stoa-Cache-Control\""
                    ),
                );
                None
            }
            Ok(name) => Some(name),
            Err(_) => {
                self.problem(key, format!("{text:?} is not a header name"));
                None
            }
        }
    }

    /// Gives every cached route the `[cache]` section's `targeted_field`.
    pub(super) fn cache_targeted_field(
        &mut self,
        routes: &mut [(usize, RouteSpec)],
        store: &CacheStoreSettings,
    ) {
        for (_, route) in routes.iter_mut() {
            if let Some(cache) = route.cache.as_mut() {
                cache.targeted_field = store.targeted_field.clone();
            }
        }
    }

    /// `[cache.compression]`: every key checked, each problem explained.
    fn compression(&mut self, raw: RawCompression) -> Option<CompressionSettings> {
        let defaults = CompressionSettings::default();
        let mut ok = true;
        let encodings = match raw.encodings {
            None => defaults.encodings,
            Some(list) => {
                let mut out = Vec::new();
                for (i, token) in list.iter().enumerate() {
                    let key = format!("cache.compression.encodings[{i}]");
                    match Coding::parse(token.trim()) {
                        Some(c) if out.contains(&c) => {
                            self.problem(key, format!("{token:?} is listed twice"));
                            ok = false;
                        }
                        Some(c) => out.push(c),
                        None => {
                            self.problem(
                                key,
                                format!("{token:?} is not one of br, zstd, gzip (the codings stoa compresses with)"),
                            );
                            ok = false;
                        }
                    }
                }
                out
            }
        };
        let min_bytes = self.size(
            "cache.compression.min_bytes",
            raw.min_bytes.as_ref(),
            defaults.min_bytes,
        );
        let types = match raw.types {
            None => defaults.types,
            Some(list) => {
                let mut out = Vec::new();
                for (i, t) in list.iter().enumerate() {
                    let t = t.trim().to_ascii_lowercase();
                    let well_formed = match t.strip_prefix('+') {
                        Some(suffix) => !suffix.is_empty() && !suffix.contains('/'),
                        None => t
                            .split_once('/')
                            .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && a != "*"),
                    };
                    if well_formed {
                        out.push(t);
                    } else {
                        self.problem(
                            format!("cache.compression.types[{i}]"),
                            format!("{t:?} is not a media type: write \"application/json\", \"text/*\" or a suffix such as \"+json\""),
                        );
                        ok = false;
                    }
                }
                out
            }
        };
        let settings = CompressionSettings {
            enabled: raw.enabled.unwrap_or(defaults.enabled),
            encodings,
            min_bytes: min_bytes?,
            types,
        };
        ok.then_some(settings)
    }

    /// Gives every cached route its compression: its own `compress` switch, else
    /// `cache.compression.enabled`; a route that compresses with no encodings listed
    /// compresses nothing.
    pub(super) fn cache_compression(
        &mut self,
        routes: &mut [(usize, RouteSpec)],
        store: &CacheStoreSettings,
    ) {
        for (_, route) in routes.iter_mut() {
            let Some(cache) = route.cache.as_mut() else {
                continue;
            };
            let on = cache.compress.unwrap_or(store.compression.enabled)
                && !store.compression.encodings.is_empty();
            cache.compression = on.then(|| store.compression.clone());
        }
    }

    /// Gives every cached route its `max_entry_bytes` (its own, checked against the store,
    /// or the `[cache]` one).
    pub(super) fn cache_entry_limits(
        &mut self,
        routes: &mut [(usize, RouteSpec)],
        store: &CacheStoreSettings,
    ) {
        for (i, route) in routes.iter_mut() {
            let Some(cache) = route.cache.as_mut() else {
                continue;
            };
            cache.max_entry_bytes = match cache.max_entry_bytes {
                0 => store.max_entry_bytes,
                n => {
                    let path = format!("routes[{i}].cache.max_entry_bytes");
                    let disk = store.disk.as_ref().map_or(0, |d| d.max_bytes);
                    self.entry_fits(&path, n, store.max_bytes, disk)
                        .unwrap_or(n)
                }
            };
        }
    }

    /// `n` if a store of `max_bytes` (with a disk tier of `disk_bytes`, or none for 0) can
    /// hold an answer of `n` bytes, else a problem.
    fn entry_fits(&mut self, path: &str, n: u64, max_bytes: u64, disk_bytes: u64) -> Option<u64> {
        let holds = largest_stored_body(max_bytes, disk_bytes);
        if n <= holds {
            return Some(n);
        }
        let message = if disk_bytes == 0 {
            format!(
                "{n} bytes is more than the store holds in one entry: with cache.max_bytes = \
                 {max_bytes} it keeps answers of at most {holds} bytes (the bound is split in \
                 shards, and one entry must fit in one); raise cache.max_bytes, add a disk \
                 tier (cache.disk) or lower this"
            )
        } else {
            format!(
                "{n} bytes is more than the cache holds in one entry: memory (cache.max_bytes \
                 = {max_bytes}) keeps answers of at most {} bytes, the disk tier \
                 (cache.disk.max_bytes = {disk_bytes}) of at most {} bytes (an entry and its \
                 compressed copies share one of its blocks, a 16th of it up to 64 MiB); raise \
                 a bound or lower this",
                capacity::largest_body(max_bytes),
                capacity::largest_disk_body(disk_bytes),
            )
        };
        self.problem(path, message);
        None
    }

    /// A duration that may be left out (zero) or set to zero explicitly.
    fn optional_duration(
        &mut self,
        path: &str,
        value: Option<&super::raw::RawDuration>,
    ) -> Option<Duration> {
        use super::raw::RawDuration;
        // Zero in any unit ("0s", "0ms", "0m"), a bare "0" or the number 0: none.
        let zero =
            |t: &str| t.trim() == "0" || humantime::parse_duration(t.trim()) == Ok(Duration::ZERO);
        match value {
            None => Some(Duration::ZERO),
            Some(RawDuration::Text(t)) if zero(t) => Some(Duration::ZERO),
            Some(RawDuration::Number(n)) if *n == 0.0 => Some(Duration::ZERO),
            Some(v) => self.duration(path, Some(v), Duration::ZERO),
        }
    }
}

/// The largest answer body the cache stores: what memory holds in one entry, or the disk
/// tier (of `disk_bytes`, 0 for none) if it holds more.
pub fn largest_stored_body(max_bytes: u64, disk_bytes: u64) -> u64 {
    let memory = capacity::largest_body(max_bytes);
    if disk_bytes == 0 {
        return memory;
    }
    memory.max(capacity::largest_disk_body(disk_bytes))
}

/// Proves that the disk tier can use `dir`, without making it (validating a configuration
/// changes nothing on disk): a file can be written in it or, while it does not exist yet,
/// in the nearest directory above it that does, where the tier will make it at start.
fn writable_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => {
                at = std::path::Path::new(".");
                break;
            }
        }
    }
    if !at.is_dir() {
        let what = format!("{} is not a directory", at.display());
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, what));
    }
    let probe = at.join(format!(".stoa-check-{}", std::process::id()));
    std::fs::write(&probe, b"stoa")?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::problems;
    use crate::config::{load_str, EnvOverrides};

    #[test]
    fn a_stale_window_of_zero_in_any_unit_is_none() {
        let route = |window: &str| {
            format!(
                "[upstreams.u]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nname = \"r\"\n\
                 path = \"/r\"\nmethods = [\"GET\"]\nupstream = \"u\"\ncache = {{ ttl = \"10s\", \
                 stale_while_revalidate = {window}, stale_if_error = {window} }}\n"
            )
        };
        for zero in [r#""0ms""#, r#""0s""#, r#""0m""#, r#""0""#, "0"] {
            assert_eq!(problems(&route(zero)), Vec::<String>::new(), "{zero}");
        }
        for wrong in [r#""soon""#, "5"] {
            assert_eq!(problems(&route(wrong)).len(), 2, "{wrong}");
        }
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
        // The unknown key is reported, and the known keys beside it are still checked.
        let with_unknown = problems(text);
        assert!(
            with_unknown[0].starts_with("routes[1].cache.colour: unknown key"),
            "{with_unknown:#?}"
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
        assert_eq!(
            with_unknown[1..],
            p[..],
            "the same problems, beside the unknown key"
        );

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
    fn compression_is_validated_and_switched_per_route() {
        let routes = r#"
            [upstreams.u]
            url = "http://127.0.0.1:9"
            [[routes]]
            name = "on"
            methods = ["GET"]
            path = "/on"
            upstream = "u"
            cache = { ttl = "10s" }
            [[routes]]
            name = "off"
            methods = ["GET"]
            path = "/off"
            upstream = "u"
            cache = { ttl = "10s", compress = false }
        "#;
        let bad = format!(
            "[cache.compression]\nencodings = [\"gzip\", \"deflate\", \"gzip\"]\n\
             types = [\"json\", \"+\", \"text/*\"]\nmin_bytes = \"lots\"\n{routes}"
        );
        let p = problems(&bad);
        let expect = [
            "cache.compression.encodings[1]: \"deflate\" is not one of br, zstd, gzip",
            "cache.compression.encodings[2]: \"gzip\" is listed twice",
            "cache.compression.types[0]: \"json\" is not a media type",
            "cache.compression.types[1]: \"+\" is not a media type",
            "cache.compression.min_bytes:",
        ];
        for e in expect {
            assert!(
                p.iter().any(|l| l.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");

        let on = |c: &crate::config::Config, i: usize| {
            c.routes[i].cache.as_ref().unwrap().compression.is_some()
        };
        let c = load_str(routes, EnvOverrides::Ignore).unwrap();
        assert!(
            on(&c, 0) && !on(&c, 1),
            "on by default, off by the route's key"
        );
        let c = c.cache.compression;
        assert_eq!(c.min_bytes, 1024);
        assert_eq!(c.encodings.len(), 3);
        let text = format!(
            "[cache.compression]\nenabled = false\nencodings = [\"gzip\"]\n{}",
            routes.replace("compress = false", "compress = true")
        );
        let c = load_str(&text, EnvOverrides::Ignore).unwrap();
        assert!(
            !on(&c, 0) && on(&c, 1),
            "off globally, on by the route's key"
        );
        assert_eq!(
            c.cache.compression.encodings,
            vec![crate::config::Coding::Gzip]
        );
    }

    #[test]
    fn freshness_and_max_ttl_are_checked() {
        let route = |name: &str, cache: &str| {
            format!(
                "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"/{name}\"\n\
                 upstream = \"u\"\ncache = {cache}\n"
            )
        };
        let text = [
            "[upstreams.u]\nurl = \"http://127.0.0.1:9\"\n".to_string(),
            route("a", r#"{ ttl = "10s", freshness = "upstream" }"#),
            route("b", r#"{ ttl = "10s", max_ttl = "1m" }"#),
            route(
                "c",
                r#"{ ttl = "10s", freshness = "origin", max_ttl = "5s" }"#,
            ),
            route(
                "d",
                r#"{ ttl = "10s", freshness = "origin", max_ttl = "1m" }"#,
            ),
        ]
        .concat();
        let p = problems(&text);
        let expect = [
            "routes[0].cache.freshness: \"upstream\" is not one of route",
            "routes[1].cache.max_ttl: max_ttl caps the freshness the upstream gives: it applies only with freshness = \"origin\"",
            "routes[2].cache.max_ttl: 5s is below the route's ttl (10s)",
        ];
        for e in expect {
            assert!(
                p.iter().any(|l| l.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
        let d = route(
            "d",
            r#"{ ttl = "10s", freshness = "origin", max_ttl = "1m" }"#,
        );
        let c = load_str(
            &format!("{}{d}", &text[..text.find("[[routes]]").unwrap()]),
            EnvOverrides::Ignore,
        )
        .unwrap();
        let cache = c.routes[0].cache.as_ref().unwrap();
        assert_eq!(cache.freshness, super::Freshness::Origin);
        assert_eq!(cache.max_ttl, Some(Duration::from_secs(60)));
    }

    #[test]
    fn silent_and_targeted_field_are_checked_and_reach_every_cached_route() {
        let route = |name: &str, cache: &str| {
            format!(
                "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"/{name}\"\n\
                 upstream = \"u\"\ncache = {cache}\n"
            )
        };
        let upstream = "[upstreams.u]\nurl = \"http://127.0.0.1:9\"\n";
        let good = [
            route(
                "a",
                r#"{ ttl = "10s", freshness = "origin", silent = "heuristic" }"#,
            ),
            route(
                "b",
                r#"{ ttl = "10s", freshness = "origin", silent = "ttl" }"#,
            ),
            route("c", r#"{ ttl = "10s" }"#),
        ]
        .concat();
        let c = load_str(
            &format!("[cache]\ntargeted_field = \"Edge-Control\"\n{upstream}{good}"),
            EnvOverrides::Ignore,
        )
        .unwrap();
        assert_eq!(c.cache.targeted_field.as_str(), "edge-control");
        let silent: Vec<super::Silent> = c
            .routes
            .iter()
            .map(|r| r.cache.as_ref().unwrap().silent)
            .collect();
        assert_eq!(
            silent,
            [
                super::Silent::Heuristic,
                super::Silent::Ttl,
                super::Silent::Ttl
            ]
        );
        for r in &c.routes {
            assert_eq!(r.cache.as_ref().unwrap().targeted_field, "edge-control");
        }
        let c = load_str(&format!("{upstream}{good}"), EnvOverrides::Ignore).unwrap();
        assert_eq!(c.cache.targeted_field, "stoa-cache-control");
        assert_eq!(
            c.routes[2].cache.as_ref().unwrap().targeted_field,
            "stoa-cache-control"
        );

        let bad = [
            route("d", r#"{ ttl = "10s", silent = "heuristic" }"#),
            route(
                "e",
                r#"{ ttl = "10s", freshness = "origin", silent = "guess" }"#,
            ),
        ]
        .concat();
        for (field, why) in [
            ("Cache-Control", "already has a meaning"),
            ("CDN-Cache-Control", "already has a meaning"),
            ("Transfer-Encoding", "already has a meaning"),
            ("X-Cache", "already has a meaning"),
            ("Stoa Cache", "is not a header name"),
            ("", "is not a header name"),
        ] {
            let text = format!("[cache]\ntargeted_field = \"{field}\"\n{upstream}{bad}");
            let p = problems(&text);
            let expect = [
                format!("cache.targeted_field: \"{field}\" {why}"),
                "routes[0].cache.silent: \"heuristic\" is how stoa treats".to_string(),
                "routes[1].cache.silent: \"guess\" is not one of ttl".to_string(),
            ];
            for e in &expect {
                assert!(
                    p.iter().any(|l| l.starts_with(e.as_str())),
                    "missing {e:?} in {p:#?}"
                );
            }
            assert_eq!(p.len(), expect.len(), "{p:#?}");
        }
    }

    #[test]
    fn tag_templates_are_checked_against_the_key() {
        let text = r#"
            [upstreams.u]
            url = "http://127.0.0.1:9"
            [[routes]]
            name = "one"
            methods = ["GET"]
            path = "/restaurant/{id}"
            upstream = "u"
            cache = { ttl = "10s", key_query = ["lang"], tags = ["restaurant:{id}", "menus", "lang:{lang}:{id}"] }
            [[routes]]
            name = "two"
            methods = ["GET", "POST"]
            path = "/orders/{*rest}"
            upstream = "u"
            cache = { ttl = "10s", key_body = ["customer_id"], tags = ["customer:{customer_id}", "{rest}"] }
        "#;
        let c = load_str(text, EnvOverrides::Ignore).unwrap();
        let tags = |i: usize| -> Vec<String> {
            c.routes[i]
                .cache
                .as_ref()
                .unwrap()
                .tags
                .iter()
                .map(|t| t.to_string())
                .collect()
        };
        assert_eq!(tags(0), ["restaurant:{id}", "menus", "lang:{lang}:{id}"]);
        assert_eq!(tags(1), ["customer:{customer_id}", "{rest}"]);
        let t = &c.routes[0].cache.as_ref().unwrap().tags[2];
        let sources: Vec<_> = t.placeholders().collect();
        assert_eq!(
            sources,
            [
                ("lang", super::tags::TagSource::Query),
                ("id", super::tags::TagSource::Path)
            ]
        );

        let long = "x".repeat(129);
        let bad = format!(
            r#"
            [upstreams.u]
            url = "http://127.0.0.1:9"
            [[routes]]
            name = "one"
            methods = ["GET"]
            path = "/restaurant/{{id}}"
            upstream = "u"
            cache = {{ ttl = "10s", tags = ["r:{{ide}}", "", "r:{{id", "q:{{lang}}:{{city}}", "{long}", "{{1}}", "ok:{{id}}"] }}
        "#
        );
        let p = problems(&bad);
        let expect = [
            "routes[0].cache.tags[0]: \"r:{ide}\" uses {ide}, which names no parameter of the route's path \"/restaurant/{id}\"",
            "routes[0].cache.tags[1]: \"\" is empty",
            "routes[0].cache.tags[2]: \"r:{id\" has unbalanced braces",
            "routes[0].cache.tags[3]: \"q:{lang}:{city}\" uses {lang}",
            "routes[0].cache.tags[3]: \"q:{lang}:{city}\" uses {city}",
            "routes[0].cache.tags[4]: \"xxx",
            "routes[0].cache.tags[5]: \"{1}\" uses {1}, which is not a name",
        ];
        for e in expect {
            assert!(
                p.iter().any(|l| l.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        assert!(
            p[5].contains("is 129 bytes without its placeholders"),
            "{p:#?}"
        );
        assert_eq!(p.len(), expect.len(), "{p:#?}");

        let many: Vec<String> = (0..65).map(|i| format!("\"t{i}\"")).collect();
        let p = problems(&text.replace(
            r#"tags = ["restaurant:{id}", "menus", "lang:{lang}:{id}"]"#,
            &format!("tags = [{}]", many.join(", ")),
        ));
        assert_eq!(
            p,
            ["routes[0].cache.tags: lists 65 tags; an answer carries at most 64 (the first ones)"]
        );
    }

    #[test]
    fn max_variants_defaults_to_sixteen_and_is_checked() {
        let route = |cache: &str| {
            format!(
                "[upstreams.u]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nname = \"r\"\n\
                 methods = [\"GET\"]\npath = \"/r\"\nupstream = \"u\"\ncache = {cache}\n"
            )
        };
        let max = |cache: &str| {
            let c = load_str(&route(cache), EnvOverrides::Ignore).unwrap();
            c.routes[0].cache.as_ref().unwrap().max_variants
        };
        assert_eq!(max(r#"{ ttl = "10s" }"#), super::DEFAULT_MAX_VARIANTS);
        assert_eq!(max(r#"{ ttl = "10s", max_variants = 3 }"#), 3);
        for bad in ["0", "-1", "5000"] {
            let p = problems(&route(&format!(
                r#"{{ ttl = "10s", max_variants = {bad} }}"#
            )));
            assert!(
                p.iter()
                    .any(|l| l.starts_with("routes[0].cache.max_variants: ")),
                "{bad}: {p:#?}"
            );
        }
    }
}
