//! The response cache: key derivation, storage, single flight and freshness, in front of
//! an [`Origin`] it knows only by its trait.

pub mod control;
pub mod disk;
pub mod encoding;
pub mod engine;
pub mod flight;
pub mod key;
pub mod origin;
pub mod purge;
pub mod store;
pub mod tags;
pub mod tier;
pub mod vary;

pub use engine::{CacheEngine, CachedRoute, Served};
pub use origin::Origin;

/// Why an upstream answer was not stored: the `detail` of its `Cache-Status` (RFC 9211).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// `Cache-Control: private`.
    Private,
    /// `Cache-Control: no-store`.
    NoStore,
    /// A `Set-Cookie` header.
    SetCookie,
    /// A `Vary` on a header the key does not cover and the route cannot learn (`*`, a
    /// hop's own header, or beyond the headers a route learns).
    Vary,
    /// A new variant of a request that has `max_variants` stored already.
    Variants,
    /// A status the route does not cache (no ttl for it, or an upstream 5xx).
    Status,
    /// `Cache-Control: no-cache` without a validator to revalidate it with.
    NoCache,
    /// Stale on arrival: the origin's freshness lifetime was zero.
    Expired,
    /// No lifetime stated, none assumed (`silent = "heuristic"`), and no validator to
    /// revalidate it with (or a status that is not heuristically cacheable).
    NoFreshness,
}

impl NotStored {
    /// The `detail` token.
    pub fn detail(self) -> &'static str {
        match self {
            NotStored::Private => "private",
            NotStored::NoStore => "no-store",
            NotStored::SetCookie => "set-cookie",
            NotStored::Vary => "vary",
            NotStored::Variants => "max-variants",
            NotStored::Status => "status",
            NotStored::NoCache => "no-cache",
            NotStored::Expired => "expired",
            NotStored::NoFreshness => "no-freshness",
        }
    }
}

/// How a response on a cached route was produced: the `X-Cache` header (*contract*) and
/// the `cache` label of the request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    /// Served fresh from memory.
    Hit,
    /// This request led the upstream fetch and got its result.
    Miss,
    /// Served an expired copy (stale-while-revalidate or stale-if-error).
    Stale,
    /// Went to the upstream without the cache (private request or response, lock timeout).
    Bypass,
    /// Waited for another request's fetch and got its result.
    Coalesced,
    /// Not a cached route.
    None,
    /// This request led the fetch, and another node's answer in the shared tier served it
    /// (`X-Cache: MISS`: this node's memory missed; `Cache-Status` says `detail=shared-tier`).
    SharedHit,
    /// This request led the fill and the disk tier (`cache.disk`) had the answer, now in
    /// memory again (`X-Cache: HIT`; `Cache-Status` says `detail=disk`).
    DiskHit,
}

impl CacheStatus {
    pub const ALL: [CacheStatus; 8] = [
        CacheStatus::Hit,
        CacheStatus::Miss,
        CacheStatus::Stale,
        CacheStatus::Bypass,
        CacheStatus::Coalesced,
        CacheStatus::None,
        CacheStatus::SharedHit,
        CacheStatus::DiskHit,
    ];

    /// The `X-Cache` header value; `None` for routes without a cache.
    pub fn header_value(self) -> Option<&'static str> {
        match self {
            CacheStatus::Hit | CacheStatus::DiskHit => Some("HIT"),
            CacheStatus::Miss | CacheStatus::SharedHit => Some("MISS"),
            CacheStatus::Stale => Some("STALE"),
            CacheStatus::Bypass => Some("BYPASS"),
            CacheStatus::Coalesced => Some("COALESCED"),
            CacheStatus::None => None,
        }
    }

    /// The metrics label value.
    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::None => "none",
            CacheStatus::SharedHit => "shared_hit",
            CacheStatus::DiskHit => "disk_hit",
        }
    }
}
