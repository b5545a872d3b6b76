//! A route's cache settings, as validated from its `cache` table.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use super::tags::TagTemplate;

/// Which query parameters are part of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyQuery {
    All,
    Only(Vec<String>),
}

/// Which part of the JSON request body is part of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBody {
    None,
    Whole,
    Fields(Vec<String>),
}

/// What a waiter does when the fetch it waits for takes longer than `lock_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLockTimeout {
    /// Serve the stale copy if there is one, else answer 504.
    ServeStale,
    /// Answer 504.
    Error,
    /// Go to the upstream without the cache.
    Bypass,
}

/// What a route that does not key on the body does with a request that carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnkeyedBody {
    /// Serve the request from the cache as if it had no body; the body never goes upstream.
    Drop,
    /// Send the request, body and all, to the upstream for this client only (`X-Cache: BYPASS`).
    Bypass,
}

/// Where an answer's freshness comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The route's `ttl` (and status TTLs), whatever the upstream says.
    Route,
    /// The upstream's `Cache-Control` (`s-maxage`, `max-age`) or `Expires`, less its `Age`;
    /// the route's TTL when it says nothing, capped at `max_ttl`.
    Origin,
}

/// What an answer that states no freshness of its own gets, with `freshness = "origin"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silent {
    /// The route's `ttl` (or status TTL): the operator's word.
    Ttl,
    /// Only what RFC 9111 §4.2.2 allows: a heuristic lifetime from `Last-Modified` for a
    /// heuristically cacheable status (or a `public` answer), at most the route's TTL;
    /// otherwise none, so that it is never reused without revalidation.
    Heuristic,
}

/// The name of the response field aimed at stoa alone (RFC 9213) when `[cache]` does not
/// name one.
pub const DEFAULT_TARGETED_FIELD: &str = "stoa-cache-control";

/// A request fetched into the cache at start and after a refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmRequest {
    /// The client-facing path, possibly with a query string.
    pub path: String,
    /// A JSON body, for body-keyed routes.
    pub body: Option<String>,
}

/// An upstream call that tells the upstream to rebuild its data (e.g. `GET /refresh_data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshHook {
    pub method: http::Method,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// Freshness of a 200 answer.
    pub ttl: Duration,
    /// After expiry, serve the stale copy at once while one background refresh runs.
    pub stale_while_revalidate: Duration,
    /// After expiry, serve the stale copy when the upstream fails.
    pub stale_if_error: Duration,
    /// Other cacheable statuses, each with its own TTL (e.g. 404 for 30 s).
    pub statuses: Vec<(u16, Duration)>,
    pub key_query: KeyQuery,
    pub key_body: KeyBody,
    pub key_headers: Vec<HeaderName>,
    /// What a request body does on a route that does not key on it.
    pub unkeyed_body: UnkeyedBody,
    pub lock_timeout: Duration,
    pub on_lock_timeout: OnLockTimeout,
    /// Fraction of the TTL after which a request triggers a background refresh.
    pub refresh_ahead: Option<f64>,
    /// Up to this fraction is taken off each TTL at random, so keys filled together do not
    /// expire together.
    pub jitter: f64,
    /// Most variants stored per request (route, method, path, query, body) once the route
    /// learned vary headers; a new one beyond is not stored.
    pub max_variants: usize,
    /// Cache even when the upstream says `Cache-Control: no-store` or `private`.
    pub ignore_upstream_cache_control: bool,
    pub freshness: Freshness,
    /// Cap on the freshness the upstream may give (origin freshness only).
    pub max_ttl: Option<Duration>,
    /// What an answer that states no freshness gets (origin freshness only).
    pub silent: Silent,
    /// The response field aimed at stoa alone (`cache.targeted_field`): read before
    /// `CDN-Cache-Control` and `Cache-Control`, never passed on.
    pub targeted_field: HeaderName,
    pub warm: Vec<WarmRequest>,
    pub refresh_hook: Option<RefreshHook>,
    /// Largest answer body stored; a larger one is streamed to its client uncached. The
    /// route's own `max_entry_bytes`, else the `[cache]` one.
    pub max_entry_bytes: u64,
    /// The route's own `compress` switch; `None` follows `cache.compression.enabled`.
    pub compress: Option<bool>,
    /// How this route's stored answers are compressed; `None`: they are not.
    pub compression: Option<Arc<CompressionSettings>>,
    /// The tags every answer stored for this route gets (`cache.tags`), besides those the
    /// upstream sends.
    pub tags: Vec<TagTemplate>,
}

/// A content coding stoa compresses cached answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    Br,
    Zstd,
    Gzip,
}

impl Coding {
    pub const ALL: [Coding; 3] = [Coding::Br, Coding::Zstd, Coding::Gzip];

    /// The `Content-Encoding` token (and metrics label).
    pub fn token(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Zstd => "zstd",
            Coding::Gzip => "gzip",
        }
    }

    pub fn parse(token: &str) -> Option<Coding> {
        Coding::ALL
            .into_iter()
            .find(|c| c.token().eq_ignore_ascii_case(token))
    }
}

/// `[cache.compression]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionSettings {
    pub enabled: bool,
    /// Offered in this order of preference when a client accepts several equally.
    pub encodings: Vec<Coding>,
    /// Smaller bodies stay identity.
    pub min_bytes: u64,
    /// Lowercase media types: `type/subtype`, `type/*` or `+suffix`.
    pub types: Vec<String>,
}

/// The media types compressed when `types` is not given.
pub const DEFAULT_COMPRESSED_TYPES: [&str; 6] = [
    "application/json",
    "+json",
    "text/*",
    "application/javascript",
    "application/xml",
    "+xml",
];

impl Default for CompressionSettings {
    fn default() -> Self {
        CompressionSettings {
            enabled: true,
            encodings: Coding::ALL.to_vec(),
            min_bytes: 1024,
            types: DEFAULT_COMPRESSED_TYPES.map(String::from).to_vec(),
        }
    }
}

impl CompressionSettings {
    /// Whether a body of this `Content-Type` is worth compressing.
    pub fn compresses_type(&self, content_type: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(content_type) else {
            return false;
        };
        let media = text.split(';').next().unwrap_or("").trim();
        let Some((top, sub)) = media.split_once('/') else {
            return false;
        };
        self.types.iter().any(|t| {
            if let Some(suffix) = t.strip_prefix('+') {
                sub.rsplit_once('+')
                    .is_some_and(|(_, s)| s.eq_ignore_ascii_case(suffix))
            } else if let Some(t_top) = t.strip_suffix("/*") {
                top.eq_ignore_ascii_case(t_top)
            } else {
                media.eq_ignore_ascii_case(t)
            }
        })
    }
}

impl CacheSettings {
    /// The TTL for an upstream status, if that status is cacheable.
    pub fn ttl_for(&self, status: u16) -> Option<Duration> {
        if status == 200 {
            return Some(self.ttl);
        }
        self.statuses
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, ttl)| *ttl)
    }

    /// Whether the key includes this request header (so requests carrying it may share).
    pub fn keys_on_header(&self, name: &HeaderName) -> bool {
        self.key_headers.contains(name)
    }
}
