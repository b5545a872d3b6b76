//! Cluster-scope policies (`scope = "cluster"`): the same GCRA as [`super::limiter`], with each
//! client's theoretical arrival time kept in the shared Redis, so that the rate and burst are
//! for all instances together.
//!
//! One check is one `EVALSHA` round trip (the script is sent with `EVAL`/`SCRIPT LOAD` once
//! per Redis when it does not know it yet): atomic, on Redis's own clock (`TIME`), so every
//! instance agrees. The key expires once the bucket is full again. When Redis is degraded or
//! the command fails, the policy's local bucket decides instead (counted in
//! `stoa_cluster_rate_limit_checks_total{source="local_fallback"}`), so no request fails
//! because Redis did.

use std::fmt::Write as _;
use std::sync::LazyLock;

use redis::Script;

use super::ceil_secs;
use super::identity::ClientKey;
use super::limiter::{Decision, RateLimiter};
use crate::cluster::Cluster;
use crate::config::Mode;

/// GCRA with `T` = `ARGV[1]` microseconds and burst `B` = `ARGV[2]`, as governor computes it:
/// a request at `now` conforms when `now >= tat - (B - 1) * T` and then moves `tat` to
/// `max(tat, now) + T`; a refused one changes nothing. Answers
/// `{allowed, wait_us, full_in_us, remaining}`.
const GCRA: &str = include_str!("gcra.lua");

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GCRA));

/// Counts one request of `client` against `limiter`'s policy in Redis, or in the local bucket
/// while Redis is degraded or when the command fails.
pub async fn check(limiter: &RateLimiter, cluster: &Cluster, client: &ClientKey) -> Decision {
    if cluster.is_up() {
        let key = bucket_key(cluster, &limiter.settings().name, client);
        let interval_us = limiter
            .interval()
            .as_micros()
            .clamp(1, u128::from(u64::MAX)) as u64;
        let burst = limiter.burst();
        let answer = cluster
            .run(|mut connection| async move {
                SCRIPT
                    .key(key)
                    .arg(interval_us)
                    .arg(burst)
                    .invoke_async::<(i64, i64, i64, i64)>(&mut connection)
                    .await
            })
            .await;
        if let Ok(answer) = answer {
            let decision = decide(limiter, answer);
            cluster
                .metrics()
                .rate_limit_checked(true, decision.over_limit);
            return decision;
        }
    }
    let decision = limiter.check(client);
    cluster
        .metrics()
        .rate_limit_checked(false, decision.over_limit);
    decision
}

/// `<prefix>rl:<policy>:<client>`.
fn bucket_key(cluster: &Cluster, policy: &str, client: &ClientKey) -> String {
    let mut key = cluster.key(&["rl:", policy, ":"]);
    match client {
        ClientKey::Ip(ip) => {
            let _ = write!(key, "ip:{ip}");
        }
        ClientKey::Header(value) => {
            key.push_str("h:");
            key.push_str(value);
        }
    }
    key
}

/// The [`Decision`] for the script's answer, with the same meaning as a local one.
fn decide(
    limiter: &RateLimiter,
    (allowed, wait_us, full_us, remaining): (i64, i64, i64, i64),
) -> Decision {
    let limit = limiter.burst();
    let micros = |n: i64| std::time::Duration::from_micros(n.max(0) as u64);
    if allowed == 1 {
        Decision {
            allowed: true,
            over_limit: false,
            limit,
            remaining: u32::try_from(remaining.max(0)).unwrap_or(limit).min(limit),
            reset_secs: ceil_secs(micros(full_us)),
            retry_after_secs: None,
            fields: limiter.fields(),
        }
    } else {
        Decision {
            allowed: limiter.settings().mode == Mode::DryRun,
            over_limit: true,
            limit,
            remaining: 0,
            reset_secs: ceil_secs(micros(full_us)),
            retry_after_secs: Some(ceil_secs(micros(wait_us)).max(1)),
            fields: limiter.fields(),
        }
    }
}
