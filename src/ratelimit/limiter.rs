//! One keyed rate limiter per policy: a GCRA bucket per client, from `governor`.
//!
//! # How the answer headers are computed
//!
//! With `T` the interval between requests at the sustained rate (`1 / rate`) and `B` the
//! burst, governor keeps for each client a "theoretical arrival time" `tat`; a request at
//! `now` conforms when `now >= tat - (B - 1) * T`, and moves `tat` to `max(tat, now) + T`.
//! The bucket is full again once `now >= tat`.
//!
//! - `RateLimit-Limit`: `B`.
//! - `RateLimit-Remaining`: governor's `StateSnapshot::remaining_burst_capacity()` taken
//!   at the moment this request was admitted (after counting it); `0` when refused.
//! - `Retry-After` (refused only): governor's `NotUntil::wait_time_from(clock.now())`,
//!   rounded **up** to whole seconds and at least 1. Refused requests do not consume
//!   anything, so a client that waits this long (and sends nothing meanwhile) is admitted.
//! - `RateLimit-Reset`: seconds until the bucket is full again, rounded up. When refused it
//!   is exact: `wait + (B - 1) * T`. When admitted, governor only exposes the remaining
//!   count `R`, which places `tat - now` within `((B - R - 1) * T, (B - R) * T]`; the upper
//!   end is used, so the value is never too early (it may be late by less than `T`).
//!
//! The structured fields of draft-ietf-httpapi-ratelimit-headers (`server.rate_limit_headers
//! = "draft"`, the default), with the policy's name as the quota policy:
//!
//! - `RateLimit-Policy: "<name>";q=<q>;w=<w>`: `w` is the time an empty bucket takes to fill
//!   (`B * T`), rounded up to whole seconds and at least 1; `q = max(B, floor(w / T))`, so
//!   `q / w` is the sustained rate and `q` is never below the burst. A GCRA bucket is a
//!   sliding window: `B` requests at once, then one more every `T`.
//! - `RateLimit: "<name>";r=<r>;t=<t>`: `r` is `RateLimit-Remaining`; `t` is the seconds
//!   until more quota is available (the draft's wording since its -10 revision): when
//!   refused, the `Retry-After` wait (the same number); when admitted, `T` rounded up, the
//!   longest it can take for one more request's worth to come back.

use std::mem::size_of;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, StateStore};
use governor::Quota;
use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue};

use super::ceil_secs;
use super::identity::ClientKey;
use crate::config::{Mode, PolicySettings, RateLimitHeaders, MAX_REFILL};

/// `RateLimit-Limit`.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`.
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`.
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// What the draft fields of one policy need, built once per limiter.
#[derive(Debug, PartialEq, Eq)]
pub struct PolicyFields {
    /// The whole `RateLimit-Policy` value.
    policy: HeaderValue,
    /// The policy name as a structured-field string (`"name"`), the start of `RateLimit`.
    name: Bytes,
    /// `T` rounded up to whole seconds.
    refill_secs: u64,
}

impl PolicyFields {
    fn new(name: &str, burst: u32, interval: Duration) -> Self {
        // Policy names are 1-64 letters, digits, '_' or '-' (validated), so quoting is all a
        // structured-field string needs; escape anyway rather than trust it.
        let mut quoted = String::with_capacity(name.len() + 2);
        quoted.push('"');
        for c in name
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control())
        {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        let nanos = interval.as_nanos().max(1);
        let fill = interval.saturating_mul(burst);
        let window = ceil_secs(fill).max(1);
        let per_window =
            u64::try_from(u128::from(window) * 1_000_000_000 / nanos).unwrap_or(u64::MAX);
        let quota = per_window.max(u64::from(burst));
        let policy = format!("{quoted};q={quota};w={window}");
        PolicyFields {
            policy: HeaderValue::from_str(&policy)
                .unwrap_or_else(|_| HeaderValue::from_static("\"stoa\"")),
            name: Bytes::from(quoted),
            refill_secs: ceil_secs(interval).max(1),
        }
    }
}

/// The per-client buckets of one policy.
///
/// `C` is the clock; it is only ever changed by tests, which drive a
/// [`governor::clock::FakeRelativeClock`].
pub struct RateLimiter<C: Clock = DefaultClock> {
    settings: PolicySettings,
    limiter: governor::RateLimiter<ClientKey, Store, C, StateInformationMiddleware>,
    /// The same map the limiter uses, for measuring it.
    store: Arc<DashMapStateStore<ClientKey>>,
    /// `T`: time for one request's worth of capacity to come back.
    interval: Duration,
    /// `B`, as used by the bucket.
    burst: u32,
    /// The draft header pieces of this policy.
    fields: Arc<PolicyFields>,
}

impl RateLimiter<DefaultClock> {
    /// A limiter for `settings` on the real (monotonic) clock.
    pub fn new(settings: PolicySettings) -> Self {
        Self::with_clock(settings, DefaultClock::default())
    }
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Let the request through. `false` only when over the limit in enforce mode.
    pub allowed: bool,
    /// The request was over the limit (also in dry-run mode, where it is let through).
    pub over_limit: bool,
    /// The burst: most requests a rested client may make at once.
    pub limit: u32,
    /// Requests the client may still make right now.
    pub remaining: u32,
    /// Seconds until the client's bucket is full again (rounded up).
    pub reset_secs: u64,
    /// When over the limit: seconds to wait before the next request is admitted
    /// (rounded up, at least 1).
    pub retry_after_secs: Option<u64>,
    /// The policy's draft header pieces.
    pub fields: Arc<PolicyFields>,
}

impl Decision {
    /// The rate-limit headers of every answer on a limited route, in the given style
    /// (`RateLimit-Policy` and `RateLimit`, and/or `RateLimit-Limit`, `-Remaining` and
    /// `-Reset`), and `Retry-After` on a refused one whatever the style (a dry-run answer is
    /// a normal answer and gets no `Retry-After`).
    pub fn headers(
        &self,
        style: RateLimitHeaders,
    ) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
        let retry = match (self.allowed, self.retry_after_secs) {
            (false, Some(s)) => Some((http::header::RETRY_AFTER, HeaderValue::from(s))),
            _ => None,
        };
        let legacy = style.legacy();
        let draft = style.draft();
        [
            draft.then(|| (RATELIMIT_POLICY, self.fields.policy.clone())),
            draft.then(|| self.ratelimit()).flatten(),
            legacy.then(|| (RATELIMIT_LIMIT, HeaderValue::from(self.limit))),
            legacy.then(|| (RATELIMIT_REMAINING, HeaderValue::from(self.remaining))),
            legacy.then(|| (RATELIMIT_RESET, HeaderValue::from(self.reset_secs))),
            retry,
        ]
        .into_iter()
        .flatten()
    }

    /// `RateLimit: "<name>";r=<remaining>;t=<seconds until more quota>`.
    fn ratelimit(&self) -> Option<(HeaderName, HeaderValue)> {
        let t = match (self.allowed && !self.over_limit, self.retry_after_secs) {
            (false, Some(wait)) => wait,
            _ => self.fields.refill_secs.min(self.reset_secs.max(1)),
        };
        let mut value = BytesMut::with_capacity(self.fields.name.len() + 48);
        value.put_slice(&self.fields.name);
        write!(value, ";r={};t={t}", self.remaining).ok()?;
        HeaderValue::from_maybe_shared(value.freeze())
            .ok()
            .map(|v| (RATELIMIT, v))
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A limiter for `settings` on the given clock.
    ///
    /// Settings outside the ranges [`super::validate_policy`] accepts never panic: the
    /// burst is raised to at least 1 and the interval kept within 1 ns and `MAX_REFILL / B`.
    pub fn with_clock(settings: PolicySettings, clock: C) -> Self {
        let burst = NonZeroU32::new(settings.burst).unwrap_or(NonZeroU32::MIN);
        let longest = MAX_REFILL / burst.get();
        let interval = Duration::try_from_secs_f64(1.0 / settings.rate_per_second)
            .unwrap_or(longest)
            .clamp(
                Duration::from_nanos(1),
                longest.max(Duration::from_nanos(1)),
            );
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let store = Arc::new(DashMapStateStore::<ClientKey>::default());
        let limiter = governor::RateLimiter::<_, _, _, StateInformationMiddleware>::new(
            quota,
            Store(Arc::clone(&store)),
            clock,
        );
        let interval = quota.replenish_interval();
        let burst = quota.burst_size().get();
        RateLimiter {
            fields: Arc::new(PolicyFields::new(&settings.name, burst, interval)),
            settings,
            limiter,
            store,
            interval,
            burst,
        }
    }

    /// The policy this limiter enforces.
    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// `T`, the time for one request's worth of capacity to come back.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The policy's draft header pieces, shared by its decisions.
    pub fn fields(&self) -> Arc<PolicyFields> {
        Arc::clone(&self.fields)
    }

    /// `B`, the burst as the bucket uses it.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Counts one request of `key` and says whether it may pass.
    ///
    /// Cheap and non-blocking: a lookup in a sharded map (the key is cloned only for a new
    /// client) and one atomic update; no lock is held beyond the call. Refused requests
    /// consume nothing.
    pub fn check(&self, key: &ClientKey) -> Decision {
        let limit = self.burst;
        match self.limiter.check_key(key) {
            Ok(snapshot) => self.admitted(&snapshot),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                let full_in = wait.saturating_add(self.span(limit - 1));
                Decision {
                    allowed: self.settings.mode == Mode::DryRun,
                    over_limit: true,
                    limit,
                    remaining: 0,
                    reset_secs: ceil_secs(full_in),
                    retry_after_secs: Some(ceil_secs(wait).max(1)),
                    fields: Arc::clone(&self.fields),
                }
            }
        }
    }

    fn admitted(&self, snapshot: &StateSnapshot) -> Decision {
        let limit = self.burst;
        let remaining = snapshot.remaining_burst_capacity().min(limit);
        Decision {
            allowed: true,
            over_limit: false,
            limit,
            remaining,
            reset_secs: ceil_secs(self.span(limit - remaining)),
            retry_after_secs: None,
            fields: Arc::clone(&self.fields),
        }
    }

    /// `n * T`, saturating.
    fn span(&self, n: u32) -> Duration {
        self.interval.checked_mul(n).unwrap_or(Duration::MAX)
    }

    /// Drops the state of clients whose bucket is full again (they are indistinguishable
    /// from new ones); when that left the table mostly empty (its capacity more than
    /// [`SHRINK_FACTOR`] times the clients left, plus [`SHRINK_SLACK`]), shrinks it to fit,
    /// so that a flood of client ids does not keep its table. A table that lost less than
    /// that keeps its capacity: the clients of the next period reuse it instead of growing
    /// it again on the request path. Meant to run periodically, off the request path; it
    /// locks one shard of the table at a time, and a shrink rehashes only the clients left
    /// in that shard: few, since it shrinks only when most were dropped.
    pub fn prune(&self) -> Pruned {
        let before = self.store.len();
        // Before the retain: a removal may leave a tombstone, which the table's reported
        // capacity (entries plus room left before it must grow) no longer counts although
        // its slot is still allocated; before, it is what the table grew to.
        let capacity = self.store.capacity();
        self.limiter.retain_recent();
        let left = self.store.len();
        let mut released_bytes = 0;
        if capacity > SHRINK_FACTOR * left + SHRINK_SLACK {
            self.limiter.shrink_to_fit();
            released_bytes = capacity.saturating_sub(self.store.capacity()) * SLOT_BYTES;
        }
        Pruned {
            dropped: before.saturating_sub(left),
            left,
            released_bytes,
        }
    }

    /// Slots in the client table: the clients it can hold before it grows (after
    /// removals, an underestimate of the slots allocated until the table is rehashed).
    pub fn capacity(&self) -> usize {
        self.store.capacity()
    }

    /// Clients currently tracked (an estimate while requests are being checked).
    pub fn tracked_clients(&self) -> usize {
        self.limiter.len()
    }

    /// Approximate bytes held by the client table: its capacity times the size of one slot
    /// (key, state and hash-table control byte). The text of header keys (at most 128 bytes
    /// each) is a separate small heap allocation per client, not counted here.
    pub fn approx_memory_bytes(&self) -> usize {
        size_of::<Self>() + self.store.capacity() * SLOT_BYTES
    }
}

/// What one [`RateLimiter::prune`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Clients forgotten (an estimate while requests are being checked).
    pub dropped: usize,
    /// Clients still tracked.
    pub left: usize,
    /// Bytes of table the shrink gave back to the allocator (0 when the table kept its
    /// capacity); the key text of dropped header clients comes on top.
    pub released_bytes: usize,
}

/// The table is shrunk after a prune when its capacity is more than this many times the
/// clients left (plus [`SHRINK_SLACK`]): most of it was dropped.
pub const SHRINK_FACTOR: usize = 4;
/// Tables of up to this many slots are never shrunk: they cost little (about 40 bytes a
/// slot) and shrinking them saves nothing worth a regrowth.
pub const SHRINK_SLACK: usize = 4096;

/// One slot of the client table: key, state and the hash table's control byte.
const SLOT_BYTES: usize = size_of::<(ClientKey, InMemoryState)>() + 1;

/// governor's DashMap store, shared so that the limiter can also be measured.
struct Store(Arc<DashMapStateStore<ClientKey>>);

impl StateStore for Store {
    type Key = ClientKey;

    fn measure_and_replace<T, F, E>(&self, key: &ClientKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        StateStore::measure_and_replace(&*self.0, key, f)
    }
}

impl ShrinkableKeyedStateStore<ClientKey> for Store {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below)
    }

    fn shrink_to_fit(&self) {
        self.0.shrink_to_fit()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AppliesTo, ClientSource, Scope};
    use governor::clock::FakeRelativeClock;
    use std::net::{IpAddr, Ipv4Addr};

    fn policy(rate_per_second: f64, burst: u32, mode: Mode) -> PolicySettings {
        PolicySettings {
            name: "test".into(),
            rate_per_second,
            burst,
            client: ClientSource::Ip,
            applies_to: AppliesTo::All,
            mode,
            scope: Scope::Local,
        }
    }

    fn ip(n: u32) -> ClientKey {
        ClientKey::Ip(IpAddr::V4(Ipv4Addr::from(n)))
    }

    fn fake(
        rate: f64,
        burst: u32,
        mode: Mode,
    ) -> (RateLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            RateLimiter::with_clock(policy(rate, burst, mode), clock.clone()),
            clock,
        )
    }

    #[test]
    fn burst_then_refusal_with_honest_retry_after_on_a_fake_clock() {
        // One request every 2 s, burst 3.
        let (rl, clock) = fake(0.5, 3, Mode::Enforce);
        let k = ip(1);
        let got: Vec<(u32, u64)> = (0..3)
            .map(|_| {
                let d = rl.check(&k);
                assert!(d.allowed && !d.over_limit && d.retry_after_secs.is_none());
                (d.remaining, d.reset_secs)
            })
            .collect();
        assert_eq!(got, [(2, 2), (1, 4), (0, 6)]);

        let d = rl.check(&k);
        assert!(!d.allowed && d.over_limit);
        assert_eq!((d.remaining, d.limit), (0, 3));
        assert_eq!(d.retry_after_secs, Some(2));
        assert_eq!(d.reset_secs, 6);

        // Refusals consume nothing: one nanosecond short of the wait is still too early ...
        clock.advance(Duration::from_secs(2) - Duration::from_nanos(1));
        let d = rl.check(&k);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, Some(1));
        // ... and waiting the full Retry-After succeeds.
        clock.advance(Duration::from_nanos(1));
        let d = rl.check(&k);
        assert!(d.allowed);
        assert_eq!((d.remaining, d.reset_secs), (0, 6));

        // A rested client has its full burst again.
        clock.advance(Duration::from_secs(6));
        assert_eq!(rl.check(&k).remaining, 2);
    }

    #[test]
    fn fractional_waits_round_up() {
        // 4 per second: 250 ms per request, burst 1.
        let (rl, clock) = fake(4.0, 1, Mode::Enforce);
        let k = ip(7);
        assert!(rl.check(&k).allowed);
        clock.advance(Duration::from_millis(100));
        let d = rl.check(&k);
        assert!(!d.allowed);
        // 150 ms left: Retry-After is 1 s, and the bucket is full in 150 ms too.
        assert_eq!((d.retry_after_secs, d.reset_secs), (Some(1), 1));
        clock.advance(Duration::from_millis(150));
        assert!(rl.check(&k).allowed);
    }

    #[test]
    fn waiting_retry_after_succeeds_on_the_real_clock() {
        let rl = RateLimiter::new(policy(1.0, 2, Mode::Enforce));
        let k = ip(2);
        assert!(rl.check(&k).allowed);
        assert!(rl.check(&k).allowed);
        let d = rl.check(&k);
        assert!(!d.allowed);
        let wait = d.retry_after_secs.expect("retry after");
        assert_eq!(wait, 1);
        std::thread::sleep(Duration::from_secs(wait));
        assert!(rl.check(&k).allowed);
    }

    #[test]
    fn keys_are_limited_independently() {
        let (rl, _clock) = fake(1.0, 2, Mode::Enforce);
        let (a, b) = (ip(1), ClientKey::Header("key-b".into()));
        assert!(rl.check(&a).allowed);
        assert!(rl.check(&a).allowed);
        assert!(!rl.check(&a).allowed);
        let d = rl.check(&b);
        assert!(d.allowed);
        assert_eq!(d.remaining, 1);
        assert!(rl.check(&b).allowed);
        assert!(!rl.check(&b).allowed);
        assert_eq!(rl.tracked_clients(), 2);
    }

    #[test]
    fn dry_run_lets_through_but_counts() {
        let (rl, _clock) = fake(1.0, 1, Mode::DryRun);
        let k = ip(3);
        assert!(!rl.check(&k).over_limit);
        for _ in 0..5 {
            let d = rl.check(&k);
            assert!(d.allowed && d.over_limit);
            assert_eq!(d.retry_after_secs, Some(1));
            let names: Vec<HeaderName> = d
                .headers(RateLimitHeaders::Legacy)
                .map(|(n, _)| n)
                .collect();
            assert_eq!(
                names,
                [RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET]
            );
        }
    }

    #[test]
    fn headers_of_admitted_and_refused_answers() {
        let (rl, _clock) = fake(10.0, 20, Mode::Enforce);
        let k = ip(4);
        let d = rl.check(&k);
        let h: Vec<(String, String)> = d
            .headers(RateLimitHeaders::Legacy)
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            h,
            [
                ("ratelimit-limit".to_string(), "20".to_string()),
                ("ratelimit-remaining".into(), "19".into()),
                ("ratelimit-reset".into(), "1".into()),
            ]
        );
        for _ in 0..19 {
            assert!(rl.check(&k).allowed);
        }
        let d = rl.check(&k);
        let h: Vec<(String, String)> = d
            .headers(RateLimitHeaders::Legacy)
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            h,
            [
                ("ratelimit-limit".to_string(), "20".to_string()),
                ("ratelimit-remaining".into(), "0".into()),
                ("ratelimit-reset".into(), "2".into()),
                ("retry-after".into(), "1".into()),
            ]
        );
    }

    fn draft(d: &Decision) -> Vec<(String, String)> {
        d.headers(RateLimitHeaders::Draft)
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect()
    }

    #[test]
    fn draft_fields_map_the_bucket() {
        // One request every 2 s, burst 3: the bucket fills in 6 s.
        let (rl, clock) = fake(0.5, 3, Mode::Enforce);
        let k = ip(1);
        let policy = (
            "ratelimit-policy".to_string(),
            "\"test\";q=3;w=6".to_string(),
        );
        assert_eq!(
            draft(&rl.check(&k)),
            [
                policy.clone(),
                ("ratelimit".into(), "\"test\";r=2;t=2".into())
            ]
        );
        rl.check(&k);
        rl.check(&k);
        clock.advance(Duration::from_millis(500));
        // Refused: r=0, t is the Retry-After wait (1.5 s, rounded up).
        assert_eq!(
            draft(&rl.check(&k)),
            [
                policy,
                ("ratelimit".into(), "\"test\";r=0;t=2".into()),
                ("retry-after".into(), "2".into()),
            ]
        );
        // None: only Retry-After, on a refusal.
        let names: Vec<HeaderName> = rl
            .check(&k)
            .headers(RateLimitHeaders::None)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, [http::header::RETRY_AFTER]);
        let both: Vec<HeaderName> = rl
            .check(&ip(2))
            .headers(RateLimitHeaders::Both)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            both,
            [
                RATELIMIT_POLICY,
                RATELIMIT,
                RATELIMIT_LIMIT,
                RATELIMIT_REMAINING,
                RATELIMIT_RESET
            ]
        );
    }

    #[test]
    fn draft_quota_is_the_rate_over_a_whole_second_window() {
        // 100 per second, burst 1: the bucket fills in 10 ms; a 1 s window holds 100.
        let (rl, _clock) = fake(100.0, 1, Mode::Enforce);
        assert_eq!(draft(&rl.check(&ip(1)))[0].1, "\"test\";q=100;w=1");
        // 3 per second, burst 5: 5/3 s, so w=2 and q=6.
        let (rl, _clock) = fake(3.0, 5, Mode::Enforce);
        assert_eq!(draft(&rl.check(&ip(1)))[0].1, "\"test\";q=6;w=2");
        // 10 per second, burst 20.
        let (rl, _clock) = fake(10.0, 20, Mode::Enforce);
        assert_eq!(
            draft(&rl.check(&ip(1))),
            [
                (
                    "ratelimit-policy".to_string(),
                    "\"test\";q=20;w=2".to_string()
                ),
                ("ratelimit".into(), "\"test\";r=19;t=1".into()),
            ]
        );
    }

    #[test]
    fn settings_out_of_range_do_not_panic() {
        for (rate, burst) in [
            (0.0, 0),
            (-1.0, 1),
            (f64::NAN, 5),
            (f64::INFINITY, u32::MAX),
            (1e-12, u32::MAX),
            (1e12, 1),
        ] {
            let rl = RateLimiter::new(policy(rate, burst, Mode::Enforce));
            let k = ip(9);
            for _ in 0..3 {
                let d = rl.check(&k);
                assert!(d.remaining <= d.limit);
            }
            rl.prune();
        }
    }

    #[test]
    fn prune_keeps_clients_that_are_not_rested() {
        let (rl, clock) = fake(1.0, 5, Mode::Enforce);
        for _ in 0..5 {
            rl.check(&ip(1));
        }
        rl.check(&ip(2));
        clock.advance(Duration::from_secs(3));
        rl.prune();
        // ip(2) was full again after 1 s; ip(1) needs 5 s.
        assert_eq!(rl.tracked_clients(), 1);
        assert_eq!(rl.check(&ip(1)).remaining, 2);
    }

    #[test]
    fn a_prune_that_drops_most_clients_shrinks_the_table() {
        // One request every 100 ms, burst 20: a client that made one request is rested
        // (and dropped) 200 ms later.
        let (rl, clock) = fake(10.0, 20, Mode::Enforce);
        for n in 0..50_000 {
            rl.check(&ClientKey::Header(format!("key-{n}").into()));
        }
        let full = rl.capacity();
        assert!(full >= 50_000, "{full}");
        clock.advance(Duration::from_millis(150));
        // 100 clients keep sending: they are not rested at the prune.
        for n in 0..100 {
            for _ in 0..10 {
                rl.check(&ip(n));
            }
        }
        clock.advance(Duration::from_millis(100));
        let pruned = rl.prune();
        assert_eq!((pruned.dropped, pruned.left), (50_000, 100));
        assert_eq!(rl.tracked_clients(), 100);
        let left = rl.capacity();
        assert!(left <= SHRINK_FACTOR * 100 + SHRINK_SLACK, "{left} slots");
        assert!(pruned.released_bytes >= (full - left) * 30, "{pruned:?}");
        // The survivors kept their state: 10 of 20 used, one back after 100 ms, one more
        // now (a forgotten client would have 19 left).
        assert_eq!(rl.check(&ip(1)).remaining, 10);
        assert!(rl.check(&ClientKey::Header("key-1".into())).allowed);
    }

    #[test]
    fn a_prune_that_drops_a_few_clients_keeps_the_capacity() {
        let (rl, clock) = fake(10.0, 20, Mode::Enforce);
        for n in 0..20_000 {
            rl.check(&ip(n));
        }
        clock.advance(Duration::from_millis(150));
        // Half of them come back before the prune.
        for n in 0..10_000 {
            rl.check(&ip(n));
        }
        clock.advance(Duration::from_millis(100));
        let capacity = rl.capacity();
        let pruned = rl.prune();
        assert_eq!((pruned.dropped, pruned.left), (10_000, 10_000));
        assert_eq!(pruned.released_bytes, 0);
        // Not rehashed: the next period's clients reuse the table instead of growing it
        // again. (A removal that leaves a tombstone takes one from the reported capacity;
        // a shrink to fit would have left about 11,000 to 14,000.)
        assert!(
            rl.capacity() + pruned.dropped >= capacity,
            "{}",
            rl.capacity()
        );
    }

    #[test]
    fn small_tables_are_left_as_they_are() {
        let (rl, clock) = fake(10.0, 20, Mode::Enforce);
        for n in 0..500 {
            rl.check(&ip(n));
        }
        let capacity = rl.capacity();
        assert!(capacity <= SHRINK_SLACK, "{capacity}");
        clock.advance(Duration::from_secs(1));
        let pruned = rl.prune();
        assert_eq!((pruned.dropped, pruned.released_bytes), (500, 0));
        // Not rehashed (tombstones aside, see above).
        assert!(
            rl.capacity() + pruned.dropped >= capacity,
            "{}",
            rl.capacity()
        );
    }

    /// Current resident set size of this process, where the platform says.
    fn rss_bytes() -> Option<usize> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    #[test]
    fn a_flood_of_distinct_clients_is_pruned_away() {
        const N: u32 = 100_000;
        let (rl, clock) = fake(10.0, 20, Mode::Enforce);
        let empty = rl.approx_memory_bytes();
        let rss_before = rss_bytes();
        for n in 0..N {
            // Half IPv4 addresses, half short API keys.
            let key = if n % 2 == 0 {
                ip(n)
            } else {
                ClientKey::Header(format!("k{n}").into())
            };
            assert!(rl.check(&key).allowed);
        }
        assert_eq!(rl.tracked_clients(), N as usize);
        let full = rl.approx_memory_bytes();
        let rss_full = rss_bytes();

        // Nobody is rested yet: pruning keeps everyone.
        rl.prune();
        assert_eq!(rl.tracked_clients(), N as usize);

        // Each client made one request: its bucket is full 100 ms later. governor keeps a
        // state one interval longer than needed, so advance by two intervals and a bit.
        clock.advance(Duration::from_millis(250));
        rl.prune();
        assert_eq!(rl.tracked_clients(), 0);
        let after = rl.approx_memory_bytes();
        let rss_after = rss_bytes();
        eprintln!(
            "keyed state for {N} clients: table ~{full} bytes (empty {empty}, after prune {after}); \
             RSS before {rss_before:?}, full {rss_full:?}, after prune {rss_after:?}"
        );
        assert!(full > 2_000_000, "{full}");
        assert!(after < 64 * 1024, "{after}");

        // Still works after shrinking.
        assert!(rl.check(&ip(1)).allowed);
        assert_eq!(rl.tracked_clients(), 1);
    }
}
