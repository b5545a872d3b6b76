//! Admission by a route's rate-limit policy.
//!
//! A policy counts every request of its routes, first of all (so that every answer of a
//! limited route, a 413 too, carries its state), except a `misses` policy on a cached
//! route: that one counts only the requests that would start an upstream fetch, and is
//! applied by [`super::cached`] when the cache says a request would. Hits, stale answers and
//! the waiters of a flight in progress are never counted by it.

use std::net::IpAddr;

use crate::config::{AppliesTo, Mode};
use crate::error::StoaError;
use crate::gateway::Route;
use crate::ratelimit::{client_key, Decision, RateLimiter};

/// The limiter that counts every request of `route`, if any.
pub fn on_every_request(route: &Route) -> Option<&RateLimiter> {
    route
        .limiter
        .as_deref()
        .filter(|limiter| !misses_only(route, limiter))
}

/// The limiter that counts only the requests of `route` that would fetch, if any.
pub fn on_misses(route: &Route) -> Option<&RateLimiter> {
    route
        .limiter
        .as_deref()
        .filter(|limiter| misses_only(route, limiter))
}

fn misses_only(route: &Route, limiter: &RateLimiter) -> bool {
    route.cache.is_some() && limiter.settings().applies_to == AppliesTo::Misses
}

/// Counts one request from `peer` against `limiter`, keeping the decision in `decision`
/// (its headers go on the answer). `Err` is the 429 to answer.
pub fn admit(
    decision: &mut Option<Decision>,
    route: &Route,
    limiter: &RateLimiter,
    peer: Option<IpAddr>,
    headers: &http::HeaderMap,
    trusted_proxies: &[ipnet::IpNet],
) -> Result<(), StoaError> {
    let policy = limiter.settings();
    let client = client_key(peer, headers, &policy.client, trusted_proxies);
    let checked = limiter.check(&client);
    if checked.over_limit {
        if let Some(counter) = &route.rate_limited {
            counter.inc();
        }
        if policy.mode == Mode::DryRun {
            tracing::info!(route = %route.spec.name, policy = %policy.name, client = ?client, "rate limit exceeded (dry run)");
        }
    }
    let refused = !checked.allowed;
    let retry_after_secs = checked.retry_after_secs.unwrap_or(1);
    *decision = Some(checked);
    if refused {
        return Err(StoaError::RateLimited {
            policy: policy.name.clone(),
            retry_after_secs,
        });
    }
    Ok(())
}
