//! The `Cache-Status` member (RFC 9211) stoa adds to every answer of a cached route, beside
//! `X-Cache`. The cache is named `stoa`; a `Cache-Status` from a cache behind stoa is kept
//! and stoa's member comes after it (the list runs from the origin towards the client).
//!
//! - `hit; ttl=N`: served from memory without going upstream; `ttl` is the remaining
//!   freshness in whole seconds, negative once stale (`detail=stale-while-revalidate`
//!   when a stale copy is served while one background refresh runs).
//! - `fwd=miss; fwd-status=S; stored; ttl=N`, or `fwd=miss; fwd-status=S; detail=<why>`
//!   when not stored; `collapsed` for a request that waited on another's fetch.
//! - `fwd=miss; stored; ttl=N; detail=shared-tier`: this node missed and the shared tier
//!   (`[cluster]`) had another node's answer; nothing went upstream.
//! - `hit; ttl=N; detail=disk`: this node's memory missed and its disk tier (`cache.disk`)
//!   had the answer; nothing went upstream.
//! - `fwd=stale; ttl=N; detail=stale-if-error`: the forward failed (an error, an upstream
//!   5xx, or no answer within `lock_timeout`) and the copy within `stale_if_error` served.
//! - `fwd=bypass; ...; detail=<why>`: went upstream around the cache.
//! - stoa's own errors: `detail=<error kind>`, with the `fwd` of the request that met it;
//!   without `fwd` when nothing went upstream (400, 413, 429 before the cache).

use std::fmt::Write as _;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use http::HeaderValue;

use crate::cache::store::Entry;
use crate::cache::{CacheStatus, NotStored, Served};

/// `Cache-Status`.
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// Why a request went around the cache, when the request itself says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BypassWhy {
    /// Credentials (`Authorization`, `Cookie`) the key does not cover.
    PrivateRequest,
    /// A body the key ignores, with `unkeyed_body = "bypass"`.
    UnkeyedBody,
}

impl BypassWhy {
    fn detail(self) -> &'static str {
        match self {
            BypassWhy::PrivateRequest => "private-request",
            BypassWhy::UnkeyedBody => "unkeyed-body",
        }
    }
}

/// The member for an answer from the cache engine. `from_memory`: answered by the fast path
/// (a hit, or a stale copy within stale-while-revalidate).
pub fn member(
    served: &Served,
    from_memory: bool,
    bypass: Option<BypassWhy>,
    now: Instant,
) -> Option<HeaderValue> {
    if let Served::Entry(entry, CacheStatus::Hit) = served {
        return Some(hit_member(ttl_secs(entry, now)));
    }
    // Room for the longest member without growing.
    let mut v = BytesMut::with_capacity(80);
    v.put_slice(b"stoa");
    let written = match served {
        Served::Entry(entry, status) => {
            entry_member(&mut v, entry, *status, from_memory, bypass, now)
        }
        Served::Stream(streaming, _) => write!(
            v,
            "; fwd=bypass; fwd-status={}; detail=too-large",
            streaming.status.as_u16()
        ),
        Served::Error(e, status) => {
            let fwd = match status {
                CacheStatus::Miss => "; fwd=miss",
                CacheStatus::Coalesced => "; fwd=miss; collapsed",
                CacheStatus::Bypass => "; fwd=bypass",
                _ => "",
            };
            write!(v, "{fwd}; detail={}", e.kind())
        }
    };
    written.ok()?;
    HeaderValue::from_maybe_shared(v.freeze()).ok()
}

thread_local! {
    /// The hit member this thread made last: hits within the same second share it.
    static LAST_HIT: std::cell::RefCell<Option<(i64, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `stoa; hit; ttl=N`, made once per `ttl` and thread in a row rather than once per hit.
fn hit_member(ttl: i64) -> HeaderValue {
    LAST_HIT.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((made_for, value)) = &*last {
            if *made_for == ttl {
                return value.clone();
            }
        }
        let mut v = BytesMut::with_capacity(32);
        v.put_slice(b"stoa; hit; ttl=");
        v.put_slice(itoa::Buffer::new().format(ttl).as_bytes());
        // Digits and ASCII: always a valid value.
        let value = HeaderValue::from_maybe_shared(v.freeze())
            .unwrap_or_else(|_| HeaderValue::from_static("stoa; hit"));
        *last = Some((ttl, value.clone()));
        value
    })
}

fn entry_member(
    v: &mut BytesMut,
    entry: &Entry,
    status: CacheStatus,
    from_memory: bool,
    bypass: Option<BypassWhy>,
    now: Instant,
) -> std::fmt::Result {
    let ttl = ttl_secs(entry, now);
    let fwd_status = entry.header.status.as_u16();
    match status {
        // Answered by `hit_member` before this.
        CacheStatus::Hit => {
            v.put_slice(b"; hit; ttl=");
            v.put_slice(itoa::Buffer::new().format(ttl).as_bytes());
            Ok(())
        }
        CacheStatus::Stale if from_memory => {
            write!(v, "; hit; ttl={ttl}; detail=stale-while-revalidate")
        }
        CacheStatus::Stale => write!(v, "; fwd=stale; ttl={ttl}; detail=stale-if-error"),
        // Another node's answer from the shared tier: nothing went upstream.
        CacheStatus::SharedHit => write!(v, "; fwd=miss; stored; ttl={ttl}; detail=shared-tier"),
        // This node's disk tier had it: nothing went upstream.
        CacheStatus::DiskHit => write!(v, "; hit; ttl={ttl}; detail=disk"),
        CacheStatus::Miss | CacheStatus::Coalesced => {
            v.put_slice(b"; fwd=miss");
            if status == CacheStatus::Coalesced {
                v.put_slice(b"; collapsed");
            }
            match entry.not_stored {
                None => write!(v, "; fwd-status={fwd_status}; stored; ttl={ttl}"),
                Some(why) => write!(v, "; fwd-status={fwd_status}; detail={}", why.detail()),
            }
        }
        CacheStatus::Bypass => {
            let why = match (bypass, entry.not_stored) {
                (Some(why), _) => why.detail(),
                // A waiter of a flight whose answer was personal asks for its own.
                (None, Some(why)) if why != NotStored::Status => why.detail(),
                (None, _) => "lock-timeout",
            };
            write!(v, "; fwd=bypass; fwd-status={fwd_status}; detail={why}")
        }
        CacheStatus::None => Err(std::fmt::Error),
    }
}

/// The remaining freshness in whole seconds, rounded away from zero: positive while fresh,
/// negative once stale, never 0.
fn ttl_secs(entry: &Entry, now: Instant) -> i64 {
    let secs =
        |d: std::time::Duration| i64::try_from(crate::ratelimit::ceil_secs(d)).unwrap_or(i64::MAX);
    if now < entry.fresh_until {
        secs(entry.fresh_until - now)
    } else {
        -secs(now - entry.fresh_until).max(1)
    }
}
