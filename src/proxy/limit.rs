//! Admission by a route's rate-limit policy.
//!
//! A policy counts every request of its routes, first of all (so that every answer of a
//! limited route, a 413 too, carries its state), except a `misses` policy on a cached
//! route: that one counts only the requests that would start an upstream fetch, and is
//! applied by [`super::cached`] when the cache says a request would. Hits, stale answers and
//! the waiters of a flight in progress are never counted by it.
//!
//! A `scope = "cluster"` policy is checked in the shared Redis ([`admit_async`]), awaited in
//! `request_filter`. Its `misses` variant is checked when a request finds no fresh entry in
//! this instance's memory, before it joins or leads the local single flight (the flight's
//! admission runs under a lock, where nothing may be awaited): so, unlike a local `misses`
//! policy, it also counts a request that then joins a fetch already in flight on this
//! instance. Hits are never counted by either.

use std::net::IpAddr;

use crate::cluster::Cluster;
use crate::config::{AppliesTo, Mode, Scope};
use crate::error::StoaError;
use crate::gateway::{Gateway, Route};
use crate::ratelimit::{client_key, ClientKey, Decision, RateLimiter};

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
    settle(decision, route, limiter, &client, checked)
}

/// The shared Redis that keeps `limiter`'s buckets: set for a `scope = "cluster"` policy
/// when the gateway has a cluster.
pub fn shared_by<'g>(limiter: &RateLimiter, gateway: &'g Gateway) -> Option<&'g Cluster> {
    match limiter.settings().scope {
        Scope::Cluster => gateway.cluster.as_deref(),
        Scope::Local => None,
    }
}

/// [`admit`], with a `scope = "cluster"` policy checked in the shared Redis (falling back to
/// the local bucket while it is degraded).
pub async fn admit_async(
    decision: &mut Option<Decision>,
    route: &Route,
    limiter: &RateLimiter,
    gateway: &Gateway,
    peer: Option<IpAddr>,
    headers: &http::HeaderMap,
) -> Result<(), StoaError> {
    let Some(cluster) = shared_by(limiter, gateway) else {
        return admit(
            decision,
            route,
            limiter,
            peer,
            headers,
            &gateway.trusted_proxies,
        );
    };
    let policy = limiter.settings();
    let client = client_key(peer, headers, &policy.client, &gateway.trusted_proxies);
    // Boxed: a round trip to Redis, and a future the hit path would otherwise carry.
    let checked = Box::pin(crate::ratelimit::cluster::check(limiter, cluster, &client)).await;
    settle(decision, route, limiter, &client, checked)
}

/// Counts and logs an over-limit decision, keeps it in `decision`; `Err` when refused.
fn settle(
    decision: &mut Option<Decision>,
    route: &Route,
    limiter: &RateLimiter,
    client: &ClientKey,
    checked: Decision,
) -> Result<(), StoaError> {
    let policy = limiter.settings();
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
