//! Per-client rate limiting and upstream protection.
//!
//! - [`identity`]: who a request comes from ([`ClientKey`]): the peer address, the
//!   `X-Forwarded-For` client when the peer is a trusted proxy, or a header value.
//! - [`limiter`]: one [`RateLimiter`] per policy, keyed GCRA buckets from `governor`, and the
//!   [`Decision`] with its `RateLimit-*` / `Retry-After` headers.
//! - [`upstream`]: [`UpstreamGuard`], the per-upstream bound on concurrent fetches and on
//!   requests per second, with a bounded queue.
//!
//! Nothing here is global: every limiter is owned by whoever builds it from the configuration
//! (policies are validated in [`crate::config`]).

pub mod cluster;
pub mod identity;
pub mod limiter;
pub mod upstream;

pub use identity::{client_addr, client_key, ClientKey};
pub use limiter::{Decision, Pruned, RateLimiter};
pub use upstream::{Overloaded, UpstreamGuard, UpstreamPermit};

/// A duration in whole seconds, rounded up (`1.2 s` -> `2`, `0 s` -> `0`).
pub(crate) fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_types_are_send_and_sync() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<RateLimiter>();
        send_sync::<UpstreamGuard>();
        send_sync::<UpstreamPermit>();
        send_sync::<Decision>();
        send_sync::<ClientKey>();
    }

    #[test]
    fn seconds_round_up() {
        use std::time::Duration;
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
        assert_eq!(ceil_secs(Duration::MAX), u64::MAX);
    }
}
