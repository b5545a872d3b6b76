//! The shared second tier (`[cluster]`): stored answers in Redis next to every node's own
//! store, and one fetch per key cluster-wide.
//!
//! On a local miss the leader of the local flight (so one Redis conversation per key and
//! node) runs [`Tier::before_fetch`]: one script reads the entry and, when there is none
//! (or it is no longer fresh), takes the key's lease (`SET NX PX` with a random token). The
//! node that wins fetches; the others wait to be told of the fill on the `fill` channel
//! (one channel for every key, the key's hash in the message: one subscription per node),
//! then read the entry. A lease lives `cluster.lock_timeout` and is renewed by its holder
//! while the fetch runs; a holder that dies stops renewing, the lease expires, and the next
//! waiter to look takes it over. A waiter looks again when the lease's remaining time is up
//! and at least every [`RECHECK`] (a safety net should a message be lost).
//!
//! Entries are written as `MAGIC` (which holds the format version) + a MessagePack head +
//! the body. Deadlines are absolute wall-clock milliseconds, so every node agrees on
//! staleness; a promoted entry gets them back as `Instant`s. A value of another version, or
//! one whose full key differs from the asking key, is a miss.
//!
//! Redis degraded: [`Tier::before_fetch`] answers `Skip` at once (one atomic load) and the
//! node fetches on its own; nothing here fails a request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use pingora::http::ResponseHeader;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use redis::{Script, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::control::Validators;
use super::encoding::{Compressed, Variants};
use super::key::{self, CacheKey};
use super::origin::FetchRequest;
use super::purge::{Invalidation, PurgeWhat};
use super::store::{Entry, Lifetimes};
use super::tags::Tags;
use crate::cluster::{Cluster, ClusterError, PROBE_EVERY};
use crate::config::{Coding, RedisTarget};

/// The first bytes of every stored value: format name and version. A node that reads any
/// other prefix treats the value as a miss.
const MAGIC: &[u8; 5] = b"STOA\x02";

/// Longest wait between two looks at a key whose lease another node holds.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Reads the entry (when `ARGV[3]` is "1") or takes the lease.
/// Returns `{1, value}`, `{2}` (lease taken) or `{3, pttl}` (held by another node).
const ACQUIRE: &str = r"
if ARGV[3] == '1' then
  local v = redis.call('GET', KEYS[1])
  if v then return {1, v} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {3, redis.call('PTTL', KEYS[2]), redis.call('GET', KEYS[2]) or ''}
";

/// Stores the entry only while the lease is still ours, releases it, tells every node.
/// The lease is the fill's generation: an invalidation that ran since the lease was taken
/// deleted it (see [`PURGE_KEY`]), so a fill that read the upstream before that
/// invalidation is refused here, by Redis itself. Returns 1 (stored) or 0 (refused).
const FILL: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[3] then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// Releases the lease if still ours (compare and delete) and tells the waiters to look again.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
";

/// An invalidation of one key: its entry and the lease of a fill in flight go together (so
/// that fill cannot store what it read before), and the nodes waiting on that lease look
/// again. Returns how many entries went (0 or 1).
const PURGE_KEY: &str = r"
local n = redis.call('DEL', KEYS[1])
if redis.call('DEL', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return n
";

/// Ends the lease of a fill in flight (a tag purge: its answer's tags are not known yet).
const KILL_LEASE: &str = r"
if redis.call('DEL', KEYS[1]) == 1 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return 1
";

/// Extends the lease if still ours.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// The second tier's counters, registered whether or not a cluster is configured (so that
/// every dashboard series exists on every gateway).
#[derive(Clone)]
pub struct TierMetrics {
    hit: IntCounter,
    miss: IntCounter,
    stale: IntCounter,
    foreign: IntCounter,
    stored: IntCounter,
    too_large: IntCounter,
    refused: IntCounter,
    failed: IntCounter,
    won: IntCounter,
    waited: IntCounter,
    expired: IntCounter,
    purges_sent: IntCounter,
    purges_applied: IntCounter,
}

impl TierMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<TierMetrics> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "stoa_cache_l2_lookups_total",
                "Looks into the shared tier after a local miss, by result (hit, miss, stale, foreign: another format version or key)",
            ),
            &["result"],
        )?;
        let stores = IntCounterVec::new(
            Opts::new(
                "stoa_cache_l2_stores_total",
                "Fetched answers offered to the shared tier, by result (stored; too_large: kept local; refused: an invalidation ran while the fill was in flight; failed: Redis did not take it, the lease was given back)",
            ),
            &["result"],
        )?;
        let leases = IntCounterVec::new(
            Opts::new(
                "stoa_cache_l2_leases_total",
                "Cluster-wide fetch leases, by result (won, waited: another node was fetching, expired: taken over after waiting)",
            ),
            &["result"],
        )?;
        let purges = IntCounterVec::new(
            Opts::new(
                "stoa_cache_l2_purges_total",
                "Purges broadcast to the other nodes (sent) and received from them (applied)",
            ),
            &["direction"],
        )?;
        for c in [&lookups, &stores, &leases, &purges] {
            registry.register(Box::new(c.clone()))?;
        }
        Ok(TierMetrics {
            hit: lookups.with_label_values(&["hit"]),
            miss: lookups.with_label_values(&["miss"]),
            stale: lookups.with_label_values(&["stale"]),
            foreign: lookups.with_label_values(&["foreign"]),
            stored: stores.with_label_values(&["stored"]),
            too_large: stores.with_label_values(&["too_large"]),
            refused: stores.with_label_values(&["refused"]),
            failed: stores.with_label_values(&["failed"]),
            won: leases.with_label_values(&["won"]),
            waited: leases.with_label_values(&["waited"]),
            expired: leases.with_label_values(&["expired"]),
            purges_sent: purges.with_label_values(&["sent"]),
            purges_applied: purges.with_label_values(&["applied"]),
        })
    }

    /// (hits, misses, stored, leases won, waited, expired) for `/admin/cache`.
    pub fn snapshot(&self) -> [(&'static str, u64); 10] {
        [
            ("hits", self.hit.get()),
            (
                "misses",
                self.miss.get() + self.stale.get() + self.foreign.get(),
            ),
            ("stored", self.stored.get()),
            ("too_large", self.too_large.get()),
            ("refused", self.refused.get()),
            ("failed", self.failed.get()),
            ("leases_won", self.won.get()),
            ("leases_waited", self.waited.get()),
            ("leases_expired", self.expired.get()),
            ("purges_applied", self.purges_applied.get()),
        ]
    }
}

/// What to do before going upstream.
pub enum Before {
    /// A fresh entry from the shared tier, to promote and serve.
    Found(Arc<Entry>),
    /// This node fetches; hand the lease back through [`Tier::after_fetch`].
    Lease(Lease),
    /// No shared tier at the moment (degraded): fetch as a single node would.
    Skip,
    /// Another node's fetch outlived the route's `lock_timeout`.
    TimedOut,
}

impl Before {
    /// What the shared tier said, as a trace records it.
    pub fn name(&self) -> &'static str {
        match self {
            Before::Found(_) => "found",
            Before::Lease(_) => "lease",
            Before::Skip => "skip",
            Before::TimedOut => "timed_out",
        }
    }
}

/// The right to fetch a key cluster-wide; renewed in the background until dropped.
pub struct Lease {
    hash: String,
    token: String,
    /// In the route's index (and the set of leases) before the fetch started, so that an
    /// invalidation finds it: without that, nothing is stored in the shared tier.
    indexed: bool,
    renewing: tokio::task::JoinHandle<()>,
    /// The shared entry found no longer fresh but within its stale-if-error deadline: what
    /// this node serves should its fetch fail.
    pub stale: Option<Arc<Entry>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewing.abort();
    }
}

/// The shared tier of one node.
pub struct Tier {
    cluster: Arc<Cluster>,
    metrics: TierMetrics,
    /// Local waiters by key hash, woken by the `fill` channel.
    waiters: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
    acquire: Script,
    fill: Script,
    release: Script,
    renew: Script,
    purge_key: Script,
    kill_lease: Script,
    fill_channel: String,
    purge_channel: String,
    control_channel: String,
    ack_channel: String,
    /// Purges this node sent and waits to see confirmed, by id.
    pending_acks: Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Ack>>>,
    /// Per route, the wall-clock millisecond of its last admin refresh: a shared entry
    /// stored before it is not used (see [`Tier::mark_refreshed`]).
    refreshed: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier")
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// A purge as broadcast to the other nodes; each confirms it with an [`Ack`] of its `id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Purge {
    pub node: String,
    #[serde(default)]
    pub id: String,
    #[serde(flatten)]
    pub inv: Invalidation,
}

/// A node's confirmation that it applied a purge, with how many entries it hit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ack {
    pub id: String,
    pub node: String,
    pub purged: usize,
}

/// What the other nodes said of a purge.
#[derive(Debug, Default)]
pub struct Acks {
    /// Entries each confirming node hit.
    pub confirmed: std::collections::BTreeMap<String, usize>,
    /// Live nodes that did not confirm within `cluster.ack_timeout`.
    pub unconfirmed: Vec<String>,
}

/// A node is live while it has announced itself within this long (it does every
/// [`PROBE_EVERY`] while it listens for purges).
const LIVE_WITHIN: Duration = Duration::from_secs(3);

/// An order broadcast to every other node on the `control` channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    pub node: String,
    #[serde(flatten)]
    pub what: OrderWhat,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OrderWhat {
    /// Reload your own configuration file.
    Reload,
    /// The route was refreshed at `since` (wall-clock milliseconds): shared entries stored
    /// before then are outdated; refetch (once cluster-wide) the ones you hold.
    Refresh { route: String, since: i64 },
}

impl Tier {
    pub fn new(cluster: Arc<Cluster>, metrics: TierMetrics) -> Arc<Tier> {
        let prefix = cluster.settings().key_prefix.clone();
        Arc::new(Tier {
            cluster,
            metrics,
            waiters: Mutex::new(HashMap::new()),
            acquire: Script::new(ACQUIRE),
            fill: Script::new(FILL),
            release: Script::new(RELEASE),
            renew: Script::new(RENEW),
            purge_key: Script::new(PURGE_KEY),
            kill_lease: Script::new(KILL_LEASE),
            fill_channel: format!("{prefix}fill"),
            purge_channel: format!("{prefix}purge"),
            control_channel: format!("{prefix}control"),
            ack_channel: format!("{prefix}ack"),
            pending_acks: Mutex::new(HashMap::new()),
            refreshed: Mutex::new(HashMap::new()),
        })
    }

    pub fn is_up(&self) -> bool {
        self.cluster.is_up()
    }

    pub fn metrics(&self) -> &TierMetrics {
        &self.metrics
    }

    pub fn node_name(&self) -> &str {
        &self.cluster.settings().node_name
    }

    fn entry_key(&self, hash: &str) -> String {
        self.cluster.key(&["c:{", hash, "}"])
    }

    fn lease_key(&self, hash: &str) -> String {
        self.cluster.key(&["lease:{", hash, "}"])
    }

    fn index_key(&self, route: &str) -> String {
        self.cluster.key(&["idx:", route])
    }

    /// The set of route names that have an index.
    fn routes_key(&self) -> String {
        self.cluster.key(&["routes"])
    }

    /// The leases of fills in flight: `route\nhash` by the wall-clock millisecond they
    /// lapse unless renewed (a tag purge ends them all).
    fn leases_key(&self) -> String {
        self.cluster.key(&["leases"])
    }

    /// The entries carrying `tag`: `route\npath\nhash` by the end of their life.
    fn tag_key(&self, tag: &str) -> String {
        self.cluster.key(&["tag:", tag])
    }

    /// The live nodes, by the wall-clock millisecond each last announced itself.
    fn nodes_key(&self) -> String {
        self.cluster.key(&["nodes"])
    }

    /// Looks in the shared tier, takes the lease, or waits for the node that holds it.
    pub async fn before_fetch(self: &Arc<Self>, key: &CacheKey, patience: Duration) -> Before {
        if !self.is_up() {
            return Before::Skip;
        }
        let refreshed = self.refreshed_since(key.route());
        let hash = hash_of(key);
        let deadline = Instant::now() + patience;
        let entry_key = self.entry_key(&hash);
        let lease_key = self.lease_key(&hash);
        // The token names the fill's span when traces are on: a node that waits for this
        // lease links its own fill to it.
        let token = match crate::otel::current_ids() {
            Some(ids) => format!("{}:{:016x}@{ids}", self.node_name(), fastrand::u64(..)),
            None => format!("{}:{:016x}", self.node_name(), fastrand::u64(..)),
        };
        let lease_ms = self.cluster.settings().lock_timeout.as_millis().max(1) as u64;
        let waiter = self.wait_on(&hash);
        let mut read = true;
        let mut waited = false;
        let mut stale = None;
        loop {
            let notified = waiter.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let answer = self
                .cluster
                .run(|mut c| {
                    let mut call = self.acquire.key(&entry_key);
                    call.key(&lease_key).arg(&token).arg(lease_ms).arg(if read {
                        "1"
                    } else {
                        "0"
                    });
                    async move { call.invoke_async::<Value>(&mut c).await }
                })
                .await;
            let Ok(Value::Array(parts)) = answer else {
                return Before::Skip;
            };
            match parts.as_slice() {
                [Value::Int(1), Value::BulkString(bytes)] => {
                    match decode_stamped(bytes, key) {
                        Some((entry, stored_at))
                            if entry.is_fresh(Instant::now())
                                && refreshed.is_none_or(|since| stored_at > since) =>
                        {
                            self.metrics.hit.inc();
                            return Before::Found(Arc::new(entry));
                        }
                        Some((entry, _)) => {
                            self.metrics.stale.inc();
                            if Instant::now() < entry.error_until {
                                stale = Some(Arc::new(entry));
                            }
                        }
                        None => self.metrics.foreign.inc(),
                    }
                    // Not usable: take the lease without reading again.
                    read = false;
                    continue;
                }
                [Value::Int(2)] => {
                    if read {
                        self.metrics.miss.inc();
                    }
                    self.metrics.won.inc();
                    if waited {
                        self.metrics.expired.inc();
                    }
                    let mut lease = self.lease(key, hash, token, lease_key, lease_ms).await;
                    lease.stale = stale;
                    return Before::Lease(lease);
                }
                [Value::Int(3), Value::Int(pttl), holder @ ..] => {
                    if !waited {
                        // The trace shows whose fill, on which node, this one waited for.
                        if let [Value::BulkString(holder)] = holder {
                            crate::otel::link_current_to_token(holder, "lease");
                        }
                        if read {
                            self.metrics.miss.inc();
                        }
                        self.metrics.waited.inc();
                    }
                    waited = true;
                    read = true;
                    let now = Instant::now();
                    if now >= deadline {
                        return Before::TimedOut;
                    }
                    let lease_left = Duration::from_millis(u64::try_from(*pttl).unwrap_or(0));
                    let pause = (lease_left + Duration::from_millis(5))
                        .min(RECHECK)
                        .min(deadline - now);
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                _ => return Before::Skip,
            }
        }
    }

    /// From now on, shared entries of `route` stored at or before `since` (wall-clock
    /// milliseconds) count as outdated: the node that next needs one refetches it (once
    /// cluster-wide, under the lease) and the others read the new one. An admin refresh
    /// marks its route on every node.
    pub fn mark_refreshed(&self, route: &str, since: i64) {
        let mut map = self.refreshed.lock().unwrap_or_else(|p| p.into_inner());
        let at = map.entry(route.to_string()).or_insert(since);
        *at = (*at).max(since);
    }

    fn refreshed_since(&self, route: &str) -> Option<i64> {
        let map = self.refreshed.lock().unwrap_or_else(|p| p.into_inner());
        map.get(route).copied()
    }

    /// Tells every other node to carry out `what`; whether the order was sent.
    pub async fn announce(&self, what: OrderWhat) -> bool {
        let order = Order {
            node: self.node_name().to_string(),
            what,
        };
        let Ok(text) = serde_json::to_string(&order) else {
            return false;
        };
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&self.control_channel).arg(text);
        self.command(publish).await.is_ok()
    }

    /// Runs one command whose reply is an integer (PUBLISH, SADD, DEL); nothing when the
    /// tier is degraded.
    async fn command(&self, cmd: redis::Cmd) -> Result<i64, ClusterError> {
        self.cluster
            .run(|mut c| async move { cmd.query_async::<i64>(&mut c).await })
            .await
    }

    /// The lease just won, entered in the route's index and the set of leases before the
    /// fetch starts (an invalidation from then on finds it), renewed in the background.
    async fn lease(
        self: &Arc<Self>,
        key: &CacheKey,
        hash: String,
        token: String,
        lease_key: String,
        ms: u64,
    ) -> Lease {
        let index = self.index_key(key.route());
        let member = index_member(key, &hash);
        let leases = self.leases_key();
        let lease_member = lease_member(key, &hash, &token);
        let mut add = redis::cmd("SADD");
        add.arg(self.routes_key()).arg(key.route());
        let indexed = self
            .enter(&index, &member, &leases, &lease_member, ms)
            .await
            .is_ok()
            && self.command(add).await.is_ok();
        let tier = Arc::downgrade(self);
        let renew_token = token.clone();
        let renewing = tokio::spawn(async move {
            let every = Duration::from_millis((ms / 3).max(1));
            loop {
                tokio::time::sleep(every).await;
                let Some(tier) = tier.upgrade() else { return };
                let mut call = tier.renew.key(&lease_key);
                call.arg(&renew_token).arg(ms);
                let _ = tier
                    .cluster
                    .run(|mut c| async move { call.invoke_async::<Value>(&mut c).await })
                    .await;
                let _ = tier
                    .enter(&index, &member, &leases, &lease_member, ms)
                    .await;
            }
        });
        Lease {
            hash,
            token,
            indexed,
            renewing,
            stale: None,
        }
    }

    /// Puts a lease in its route's index and in the set of leases, for twice its life
    /// (renewed with it); scores only grow (`GT`), so an entry already indexed for longer
    /// keeps its place.
    async fn enter(
        &self,
        index: &str,
        member: &str,
        leases: &str,
        lease_member: &str,
        ms: u64,
    ) -> Result<(), ClusterError> {
        let until = wall_now() + 2 * i64::try_from(ms).unwrap_or(i64::MAX / 4);
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(index).arg("GT").arg(until).arg(member);
        self.command(zadd).await?;
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(leases).arg("GT").arg(until).arg(lease_member);
        self.command(zadd).await?;
        Ok(())
    }

    /// Stores `entry` (when given, storable and small enough) and releases the lease; either
    /// way the waiting nodes are told to look again. The entry's tags go into their indexes
    /// before it is stored (a tag purge that misses them has ended the lease first, and the
    /// store is refused). A store Redis fails (out of memory, say) gives the lease back at
    /// once, so the other nodes do not wait out its life.
    pub async fn after_fetch(&self, key: &CacheKey, lease: Lease, entry: Option<&Entry>) {
        lease.renewing.abort();
        let max = self.cluster.settings().l2_max_entry_bytes;
        let value = entry.filter(|_| lease.indexed).and_then(|e| {
            let size = e.body.len() + e.compressed().bodies().map(|(_, b)| b.len()).sum::<usize>();
            if size as u64 > max {
                self.metrics.too_large.inc();
                return None;
            }
            encode(e, key).map(|v| (v, e))
        });
        let lease_key = self.lease_key(&lease.hash);
        let mut stored = false;
        if let Some((value, entry)) = value {
            let now = Instant::now();
            let until = wall_ms(entry.error_until, now);
            let member = index_member(key, &lease.hash);
            let tagged = format!("{}\n{member}", key.route());
            let mut tags_in = true;
            for tag in entry.tag_names() {
                let tag_key = self.tag_key(tag);
                let mut zadd = redis::cmd("ZADD");
                zadd.arg(&tag_key).arg("GT").arg(until).arg(&tagged);
                tags_in &= self.command(zadd).await.is_ok();
                let mut prune = redis::cmd("ZREMRANGEBYSCORE");
                prune.arg(&tag_key).arg("-inf").arg(wall_now());
                let _ = self.command(prune).await;
            }
            if tags_in {
                let life = entry.error_until.saturating_duration_since(now);
                let ms = life.as_millis().max(1) as u64;
                let entry_key = self.entry_key(&lease.hash);
                let mut call = self.fill.key(&entry_key);
                call.key(&lease_key)
                    .arg(value)
                    .arg(ms)
                    .arg(&lease.token)
                    .arg(&self.fill_channel)
                    .arg(&lease.hash);
                let answer = self
                    .cluster
                    .run(|mut c| async move { call.invoke_async::<i64>(&mut c).await })
                    .await;
                match answer {
                    Ok(1) => {
                        stored = true;
                        self.metrics.stored.inc();
                        // The route's index, for purges by route, path or prefix.
                        let index = self.index_key(key.route());
                        let _ = self
                            .cluster
                            .run(|mut c| async move {
                                redis::pipe()
                                    .zrembyscore(&index, "-inf", wall_ms(Instant::now(), now))
                                    .ignore()
                                    .cmd("ZADD")
                                    .arg(&index)
                                    .arg("GT")
                                    .arg(until)
                                    .arg(member)
                                    .ignore()
                                    .query_async::<()>(&mut c)
                                    .await
                            })
                            .await;
                    }
                    Ok(_) => self.metrics.refused.inc(),
                    Err(e) => {
                        self.metrics.failed.inc();
                        tracing::debug!(error = %e, "cluster: the shared tier did not take a fill");
                    }
                }
            }
        }
        if !stored {
            let mut call = self.release.key(&lease_key);
            call.arg(&lease.token)
                .arg(&self.fill_channel)
                .arg(&lease.hash);
            // Tried even when a failed store just marked the tier degraded: otherwise the
            // other nodes wait out the lease.
            let _ = self
                .cluster
                .try_run(|mut c| async move { call.invoke_async::<Value>(&mut c).await })
                .await;
        }
        // This lease's own member only: the key's next lease (another fill's, taken once a
        // purge ended this one) stays where a tag purge finds it.
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.leases_key())
            .arg(lease_member(key, &lease.hash, &lease.token));
        let _ = self.command(zrem).await;
    }

    /// Removes the shared copies an invalidation names, and ends the leases of the fills in
    /// flight it may reach, before any node applies it to its own store (so that a node
    /// that drops its copy does not read the old one back). How many shared entries went;
    /// `None` when the tier is degraded.
    pub async fn purge_shared(&self, inv: &Invalidation) -> Option<usize> {
        if !self.is_up() {
            return None;
        }
        self.metrics.purges_sent.inc();
        let hashes: Vec<String> = match &inv.what {
            // The request's entry, and its variants from the route's index.
            PurgeWhat::Key { key, .. } => {
                let mut hashes = vec![hash_text(key)];
                hashes.extend(self.indexed_hashes(&inv.what).await);
                hashes
            }
            PurgeWhat::Tags { tags, routes } => self.tagged_hashes(tags, routes.as_deref()).await,
            what => self.indexed_hashes(what).await,
        };
        let removed = self
            .each_hash(hashes.into_iter(), |tier, hash| tier.purge_one(hash))
            .await;
        Some(removed)
    }

    /// The hashes a tag purge names, after the leases of every fill in flight (of the
    /// routes named) are ended: their tags are not known until they store, and they index
    /// them before they do.
    async fn tagged_hashes(&self, tags: &[String], routes: Option<&[String]>) -> Vec<String> {
        let in_routes = |route: &str| routes.is_none_or(|rs| rs.iter().any(|r| r == route));
        // Members past their score belong to fills that stopped renewing (their node died).
        let mut prune = redis::cmd("ZREMRANGEBYSCORE");
        prune.arg(self.leases_key()).arg("-inf").arg(wall_now());
        let _ = self.command(prune).await;
        let leases = self.members(&self.leases_key()).await;
        let ended: Vec<String> = leases
            .iter()
            .filter_map(|m| {
                let mut parts = m.splitn(3, '\n');
                Some((parts.next()?, parts.next()?))
            })
            .filter(|(route, _)| in_routes(route))
            .map(|(_, hash)| hash.to_string())
            .collect();
        self.each_hash(ended.into_iter(), |tier, hash| tier.end_lease(hash))
            .await;
        let mut hashes = Vec::new();
        for tag in tags {
            let tag_key = self.tag_key(tag);
            let mut named = Vec::new();
            for member in self.members(&tag_key).await {
                let mut parts = member.splitn(3, '\n');
                let hash = match (parts.next(), parts.next(), parts.next()) {
                    (Some(route), Some(_), Some(hash)) if in_routes(route) => hash.to_string(),
                    _ => continue,
                };
                hashes.push(hash);
                named.push(member);
            }
            // The members read, not the whole set: one a fill entered since (its lease taken
            // after the leases above were ended) stays, for the next purge of the tag.
            self.remove_members(&tag_key, &named).await;
        }
        hashes
    }

    /// The hashes a purge by route, path or prefix (or the variants of one request) names,
    /// from the routes' indexes (which hold the fills in flight too), taken out of them.
    async fn indexed_hashes(&self, what: &PurgeWhat) -> Vec<String> {
        let routes = match what {
            PurgeWhat::Route { route }
            | PurgeWhat::Path { route, .. }
            | PurgeWhat::Key { route, .. }
            | PurgeWhat::Prefix {
                route: Some(route), ..
            } => vec![route.clone()],
            // The routes with an index, from their set: one small read, where a scan of
            // the keyspace (KEYS) would block Redis for every client.
            PurgeWhat::Prefix { route: None, .. } => {
                let routes_key = self.routes_key();
                self.cluster
                    .run(|mut c| async move {
                        redis::cmd("SMEMBERS")
                            .arg(&routes_key)
                            .query_async::<Vec<String>>(&mut c)
                            .await
                    })
                    .await
                    .unwrap_or_default()
            }
            PurgeWhat::Tags { .. } => Vec::new(),
        };
        // A variant's hash starts with its base's (see `hash_of`).
        let variants_of = match what {
            PurgeWhat::Key { key, .. } => Some((key::path_of_text(key), hash_text(key) + ".")),
            _ => None,
        };
        let matches = |path: &str, hash: &str| match what {
            PurgeWhat::Path { path: p, .. } => path == p,
            PurgeWhat::Prefix { prefix, .. } => path.starts_with(prefix.as_str()),
            PurgeWhat::Key { .. } => variants_of
                .as_ref()
                .is_some_and(|(p, base)| *p == Some(path) && hash.starts_with(base.as_str())),
            _ => true,
        };
        let mut hashes = Vec::new();
        for route in routes {
            let index = self.index_key(&route);
            let doomed: Vec<String> = self
                .members(&index)
                .await
                .into_iter()
                .filter(|m| {
                    m.split_once('\n')
                        .is_some_and(|(path, hash)| matches(path, hash))
                })
                .collect();
            hashes.extend(
                doomed
                    .iter()
                    .filter_map(|m| m.split_once('\n'))
                    .map(|(_, hash)| hash.to_string()),
            );
            self.remove_members(&index, &doomed).await;
        }
        hashes
    }

    /// Runs `op` for every hash, many at once (the connection pipelines them); the sum of
    /// what they return.
    async fn each_hash<'a, F, Fut>(&'a self, hashes: impl Iterator<Item = String>, op: F) -> usize
    where
        F: Fn(&'a Self, String) -> Fut,
        Fut: std::future::Future<Output = usize> + 'a,
    {
        futures_util::stream::iter(hashes.map(|h| op(self, h)))
            .buffer_unordered(PURGE_PARALLEL)
            .fold(0, |sum, n| async move { sum + n })
            .await
    }

    /// [`PURGE_KEY`] for one hash: how many entries went.
    async fn purge_one(&self, hash: String) -> usize {
        let entry_key = self.entry_key(&hash);
        let lease_key = self.lease_key(&hash);
        let mut call = self.purge_key.key(&entry_key);
        call.key(&lease_key).arg(&self.fill_channel).arg(&hash);
        self.cluster
            .run(|mut c| async move { call.invoke_async::<i64>(&mut c).await })
            .await
            .map_or(0, |n| usize::try_from(n).unwrap_or(0))
    }

    /// [`KILL_LEASE`] for one hash.
    async fn end_lease(&self, hash: String) -> usize {
        let lease_key = self.lease_key(&hash);
        let mut call = self.kill_lease.key(&lease_key);
        call.arg(&self.fill_channel).arg(&hash);
        let _ = self
            .cluster
            .run(|mut c| async move { call.invoke_async::<i64>(&mut c).await })
            .await;
        0
    }

    /// Removes `members` from the sorted set `key`, a thousand at a time.
    async fn remove_members(&self, key: &str, members: &[String]) {
        for chunk in members.chunks(1000) {
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(key).arg(chunk);
            let _ = self.command(zrem).await;
        }
    }

    /// Every member of a sorted set.
    async fn members(&self, key: &str) -> Vec<String> {
        let key = key.to_string();
        self.cluster
            .run(|mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async::<Vec<String>>(&mut c)
                    .await
            })
            .await
            .unwrap_or_default()
    }

    /// Tells every other node to apply `inv`, and waits (at most `cluster.ack_timeout`)
    /// until every live node has said it did.
    pub async fn broadcast_purge(&self, inv: &Invalidation) -> Acks {
        let me = self.node_name().to_string();
        let mut acks = Acks::default();
        let live: Vec<String> = self
            .live_nodes()
            .await
            .into_iter()
            .filter(|n| *n != me)
            .collect();
        let id = format!("{me}:{:016x}", fastrand::u64(..));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.pending_acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), tx);
        let message = Purge {
            node: me,
            id: id.clone(),
            inv: inv.clone(),
        };
        let sent = match serde_json::to_string(&message) {
            Ok(text) => {
                let mut publish = redis::cmd("PUBLISH");
                publish.arg(&self.purge_channel).arg(text);
                self.command(publish).await.is_ok()
            }
            Err(_) => false,
        };
        if sent {
            let deadline = tokio::time::Instant::now() + self.cluster.settings().ack_timeout;
            while !live.iter().all(|n| acks.confirmed.contains_key(n)) {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(ack)) => {
                        acks.confirmed.insert(ack.node, ack.purged);
                    }
                    _ => break,
                }
            }
        }
        self.pending_acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        acks.unconfirmed = live
            .into_iter()
            .filter(|n| !acks.confirmed.contains_key(n))
            .collect();
        acks
    }

    /// The nodes that announced themselves within [`LIVE_WITHIN`].
    async fn live_nodes(&self) -> Vec<String> {
        let key = self.nodes_key();
        let since = wall_now() - LIVE_WITHIN.as_millis() as i64;
        self.cluster
            .run(|mut c| async move {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(since)
                    .arg("+inf")
                    .query_async::<Vec<String>>(&mut c)
                    .await
            })
            .await
            .unwrap_or_default()
    }

    /// Says this node is live: it listens for purges.
    async fn announce_self(&self) {
        let key = self.nodes_key();
        let now = wall_now();
        let me = self.node_name().to_string();
        let _ = self
            .cluster
            .run(|mut c| async move {
                redis::pipe()
                    .zadd(&key, &me, now)
                    .ignore()
                    .zrembyscore(&key, "-inf", now - 60_000)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
    }

    /// Says this node is gone (it stops listening), so purges do not wait for it.
    async fn leave(&self) {
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.nodes_key()).arg(self.node_name());
        let _ = self.command(zrem).await;
    }

    /// Registers this task as a waiter on `hash` until the guard is dropped.
    fn wait_on(self: &Arc<Self>, hash: &str) -> Waiter {
        let mut map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map
            .entry(hash.to_string())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        slot.1 += 1;
        Waiter {
            notify: slot.0.clone(),
            hash: hash.to_string(),
            tier: Arc::downgrade(self),
        }
    }

    fn wake(&self, hash: &str) {
        let map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((notify, _)) = map.get(hash) {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for (notify, _) in map.values() {
            notify.notify_waiters();
        }
    }

    /// Listens on the `fill`, `purge`, `ack` and `control` channels until `shutdown`,
    /// reconnecting after [`PROBE_EVERY`] when the connection is lost. `apply` applies a
    /// purge from another node to this node's store (how many entries it hit, confirmed to
    /// the sender); `obey` carries out another node's order. While subscribed, the node
    /// announces itself live every [`PROBE_EVERY`], so that purges wait for it.
    pub async fn listen(
        self: Arc<Self>,
        apply: impl Fn(&Invalidation) -> usize + Send,
        obey: impl Fn(Order) + Send,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let urls = match &self.cluster.settings().redis {
            RedisTarget::Single(url) => vec![url.clone()],
            // PUBLISH reaches every node of a Redis Cluster: one subscription is enough.
            RedisTarget::Cluster(seeds) => seeds.clone(),
        };
        let mut next = 0;
        loop {
            let url = &urls[next % urls.len()];
            next += 1;
            tokio::select! {
                _ = self.listen_once(url, &apply, &obey) => {}
                _ = &mut shutdown => {
                    self.leave().await;
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                _ = &mut shutdown => {
                    self.leave().await;
                    return;
                }
            }
        }
    }

    async fn listen_once(
        &self,
        url: &str,
        apply: &impl Fn(&Invalidation) -> usize,
        obey: &impl Fn(Order),
    ) {
        let connect_timeout = self.cluster.settings().connect_timeout;
        let Ok(client) = self.cluster.client(url) else {
            return;
        };
        let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(connect_timeout, client.get_async_pubsub()).await
        else {
            return;
        };
        for channel in [
            &self.fill_channel,
            &self.purge_channel,
            &self.ack_channel,
            &self.control_channel,
        ] {
            if pubsub.subscribe(channel).await.is_err() {
                return;
            }
        }
        // Fills may have been missed while not subscribed.
        self.wake_all();
        self.announce_self().await;
        let mut beat = tokio::time::interval(PROBE_EVERY);
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = beat.tick() => {
                    self.announce_self().await;
                    continue;
                }
            };
            let Some(message) = message else { return };
            let payload = message.get_payload_bytes();
            let channel = message.get_channel_name();
            if channel == self.fill_channel {
                if let Ok(hash) = std::str::from_utf8(payload) {
                    self.wake(hash);
                }
            } else if channel == self.ack_channel {
                if let Ok(ack) = serde_json::from_slice::<Ack>(payload) {
                    let pending = self.pending_acks.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(tx) = pending.get(&ack.id) {
                        let _ = tx.send(ack);
                    }
                }
            } else if channel == self.control_channel {
                match serde_json::from_slice::<Order>(payload) {
                    Ok(order) if order.node != self.node_name() => obey(order),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cluster: unreadable control message"),
                }
            } else {
                match serde_json::from_slice::<Purge>(payload) {
                    Ok(purge) if purge.node != self.node_name() => {
                        self.metrics.purges_applied.inc();
                        let purged = apply(&purge.inv);
                        self.confirm(purge.id, purged).await;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cluster: unreadable purge message"),
                }
            }
        }
    }

    /// Tells the node that sent purge `id` that this node applied it.
    async fn confirm(&self, id: String, purged: usize) {
        if id.is_empty() {
            return;
        }
        let ack = Ack {
            id,
            node: self.node_name().to_string(),
            purged,
        };
        let Ok(text) = serde_json::to_string(&ack) else {
            return;
        };
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&self.ack_channel).arg(text);
        let _ = self.command(publish).await;
    }
}

/// How many purge scripts run at once (pipelined on the connection).
const PURGE_PARALLEL: usize = 256;

/// A member of the set of leases: the key's route, its hash and the lease's token. The
/// token makes it this lease's alone: a fill winding up removes its own member, never that
/// of the key's next lease.
fn lease_member(key: &CacheKey, hash: &str, token: &str) -> String {
    format!("{}\n{hash}\n{token}", key.route())
}

/// A route index's member: the key's path and hash.
fn index_member(key: &CacheKey, hash: &str) -> String {
    format!("{}\n{hash}", key.path())
}

/// A registered waiter; leaves the map with the last one of its key.
struct Waiter {
    notify: Arc<Notify>,
    hash: String,
    tier: Weak<Tier>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let Some(tier) = self.tier.upgrade() else {
            return;
        };
        let mut map = tier.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = map.get_mut(&self.hash) {
            slot.1 = slot.1.saturating_sub(1);
            if slot.1 == 0 {
                map.remove(&self.hash);
            }
        }
    }
}

/// Tags read back, as a frozen set.
fn frozen(tags: &[String]) -> Tags {
    let mut set: Tags = tags.iter().map(String::as_str).collect();
    set.freeze();
    set
}

/// The key's name in Redis: a 128-bit hash of its full text, the same on every node. A
/// variant's (a key with learned vary values) is its base's, a dot, then its own, so that
/// an exact-request purge finds every variant in the route's index.
fn hash_of(key: &CacheKey) -> String {
    if key.vary_part().is_empty() {
        hash_text(key.as_str())
    } else {
        format!("{}.{}", hash_text(key.base()), hash_text(key.as_str()))
    }
}

fn hash_text(text: &str) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
}

/// The wall clock now, in milliseconds since the epoch.
pub fn wall_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `at` as wall-clock milliseconds since the epoch, `now` being the current moment.
fn wall_ms(at: Instant, now: Instant) -> i64 {
    wall_at(at, now, wall_now())
}

/// `at` as wall-clock milliseconds, `now` being the moment the wall clock read `wall`.
fn wall_at(at: Instant, now: Instant, wall: i64) -> i64 {
    if at >= now {
        wall + at.duration_since(now).as_millis() as i64
    } else {
        wall - now.duration_since(at).as_millis() as i64
    }
}

/// `ms` (wall clock) as an `Instant`, `now` being the current wall clock's moment.
fn instant_of(ms: i64, now: Instant, wall: i64) -> Instant {
    let delta = Duration::from_millis(ms.abs_diff(wall));
    if ms >= wall {
        now + delta
    } else {
        now.checked_sub(delta).unwrap_or(now)
    }
}

#[derive(Serialize, Deserialize)]
struct Head {
    key: String,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    stored_at: i64,
    upstream_age: u64,
    fresh_until: i64,
    revalidate_until: i64,
    error_until: i64,
    refresh_at: Option<i64>,
    shareable_with_authorization: bool,
    recipe: Option<Recipe>,
    /// The identity body's length; the compressed bodies follow it, in this order.
    body_len: u64,
    compressed: Vec<(String, u64)>,
    /// Every tag of the entry (the route's and the upstream's).
    tags: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Recipe {
    method: String,
    path_and_query: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// The route's tags, for a refetch.
    tags: Vec<String>,
}

fn pairs(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// `MAGIC`, the head's length (4 bytes, big-endian), the MessagePack head, the body, then
/// the compressed bodies (as made once by the node that fetched: nobody compresses again).
pub fn encode(entry: &Entry, key: &CacheKey) -> Option<Vec<u8>> {
    let compressed = entry.compressed();
    let now = Instant::now();
    let wall = wall_now();
    let head = Head {
        key: key.as_str().to_string(),
        status: entry.header.status.as_u16(),
        headers: pairs(&entry.header.headers),
        stored_at: wall_at(entry.stored_at, now, wall),
        upstream_age: entry.upstream_age,
        fresh_until: wall_at(entry.fresh_until, now, wall),
        revalidate_until: wall_at(entry.revalidate_until, now, wall),
        error_until: wall_at(entry.error_until, now, wall),
        refresh_at: entry.refresh_at.map(|at| wall_at(at, now, wall)),
        shareable_with_authorization: entry.shareable_with_authorization,
        recipe: entry.recipe.as_ref().map(|r| Recipe {
            method: r.method.as_str().to_string(),
            path_and_query: r.path_and_query.clone(),
            headers: pairs(&r.headers),
            body: r.body.to_vec(),
            tags: r.tags.iter().map(str::to_string).collect(),
        }),
        body_len: entry.body.len() as u64,
        compressed: compressed
            .bodies()
            .map(|(c, b)| (c.token().to_string(), b.len() as u64))
            .collect(),
        tags: entry.tag_names().map(str::to_string).collect(),
    };
    let head = rmp_serde::to_vec(&head).ok()?;
    let bodies = entry.body.len() + compressed.bodies().map(|(_, b)| b.len()).sum::<usize>();
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + head.len() + bodies);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u32::try_from(head.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&entry.body);
    for (_, body) in compressed.bodies() {
        out.extend_from_slice(body);
    }
    Some(out)
}

/// The entry in `bytes` if it is this version's and made for `key`.
pub fn decode(bytes: &[u8], key: &CacheKey) -> Option<Entry> {
    decode_stamped(bytes, key).map(|(entry, _)| entry)
}

/// [`decode`], with the wall-clock millisecond the entry was stored at.
pub fn decode_stamped(bytes: &[u8], key: &CacheKey) -> Option<(Entry, i64)> {
    // Only the bodies are kept: copied once, then shared by the entry's slices.
    let start = bodies_start(bytes)?;
    decode_shared(bytes, Bytes::copy_from_slice(&bytes[start..]), key)
}

/// [`decode_stamped`] of bytes owned already: the entry's bodies are slices of them.
pub fn decode_owned(bytes: Bytes, key: &CacheKey) -> Option<(Entry, i64)> {
    let start = bodies_start(&bytes)?;
    decode_shared(&bytes, bytes.slice(start..), key)
}

/// Where the bodies of the entry encoded in `bytes` start: after the magic, the head's
/// length and the head. `None` if `bytes` is not an entry or is cut inside its head.
fn bodies_start(bytes: &[u8]) -> Option<usize> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    Some(bytes.len() - (rest.len() - len))
}

/// The entry whose encoding is `bytes`, its bodies taken from `bodies` (the part of it
/// after the head, as shared bytes).
fn decode_shared(bytes: &[u8], bodies: Bytes, key: &CacheKey) -> Option<(Entry, i64)> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    let head = rest.get(..len)?;
    let head: Head = rmp_serde::from_slice(head).ok()?;
    if head.key != key.as_str() {
        return None;
    }
    let mut at = 0usize;
    let mut take = |n: u64| {
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= bodies.len() - at)?;
        let taken = bodies.slice(at..at + n);
        at += n;
        Some(taken)
    };
    let body = take(head.body_len)?;
    let mut compressed = Vec::with_capacity(head.compressed.len());
    for (token, n) in &head.compressed {
        compressed.push((Coding::parse(token)?, take(*n)?));
    }
    if at != bodies.len() {
        return None;
    }
    let status = http::StatusCode::from_u16(head.status).ok()?;
    let mut header = ResponseHeader::build_no_case(status, Some(head.headers.len())).ok()?;
    for (name, value) in head.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).ok()?;
        let value = http::HeaderValue::from_bytes(&value).ok()?;
        header.append_header(name, value).ok()?;
    }
    let recipe = match head.recipe {
        Some(r) => Some(Arc::new(FetchRequest {
            method: http::Method::from_bytes(r.method.as_bytes()).ok()?,
            path_and_query: r.path_and_query,
            headers: r
                .headers
                .into_iter()
                .map(|(k, v)| {
                    Some((
                        http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                        http::HeaderValue::from_bytes(&v).ok()?,
                    ))
                })
                .collect::<Option<http::HeaderMap>>()?,
            body: Bytes::from(r.body),
            tags: frozen(&r.tags),
        })),
        None => None,
    };
    let now = Instant::now();
    let wall = wall_now();
    let at = |ms: i64| instant_of(ms, now, wall);
    let validators = Validators::of(&header.headers);
    let variants = Variants::build(&header, Compressed::from_bodies(compressed)).ok()?;
    let life = Lifetimes {
        ttl: Duration::ZERO,
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        refresh_ahead: None,
    };
    let mut entry = Entry::new(header, body, key.byte_len(), now, life, recipe)
        .with_upstream_age(head.upstream_age)
        .with_validators(validators, head.shareable_with_authorization)
        .with_variants(variants)
        .with_tags(frozen(&head.tags));
    entry.stored_at = at(head.stored_at);
    entry.fresh_until = at(head.fresh_until);
    entry.revalidate_until = at(head.revalidate_until);
    entry.error_until = at(head.error_until);
    entry.refresh_at = head.refresh_at.map(at);
    Some((entry, head.stored_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::test_key;

    fn entry() -> Entry {
        let mut header = ResponseHeader::build(200, None).unwrap();
        header
            .append_header("content-type", "application/json")
            .unwrap();
        header.append_header("etag", "\"v1\"").unwrap();
        let life = Lifetimes {
            ttl: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(10),
            stale_if_error: Duration::from_secs(100),
            refresh_ahead: Some(0.5),
        };
        Entry::new(
            header,
            Bytes::from_static(b"{\"a\":1}"),
            10,
            Instant::now(),
            life,
            None,
        )
        .with_upstream_age(7)
    }

    #[test]
    fn compressed_bodies_come_back_as_variants() {
        let key = test_key("r", "/p");
        let mut e = entry();
        let gz = Bytes::from_static(b"\x1f\x8b-not-really-gzip");
        let variants = Variants::build(
            &e.header,
            Compressed::from_bodies(vec![(Coding::Gzip, gz.clone())]),
        )
        .unwrap();
        e = e.with_variants(variants);
        let back = decode(&encode(&e, &key).unwrap(), &key).unwrap();
        assert_eq!(back.body, e.body);
        // Decoded from owned bytes, the bodies are slices of them, the same.
        let (owned, _) = decode_owned(Bytes::from(encode(&e, &key).unwrap()), &key).unwrap();
        assert_eq!(owned.body, e.body);
        assert_eq!(
            owned.pick(Some(&http::HeaderValue::from_static("gzip"))).1,
            &gz
        );
        let mut cut = encode(&e, &key).unwrap();
        cut.pop();
        assert!(
            decode_owned(Bytes::from(cut), &key).is_none(),
            "a torn entry"
        );
        let accept = http::HeaderValue::from_static("gzip");
        let (head, body) = back.pick(Some(&accept));
        assert_eq!(body, &gz);
        assert_eq!(head.headers["content-encoding"], "gzip");
    }

    #[test]
    fn an_entry_survives_the_round_trip_with_its_deadlines() {
        let key = test_key("r", "/p");
        let e = entry();
        let bytes = encode(&e, &key).unwrap();
        assert!(bytes.starts_with(MAGIC));
        let back = decode(&bytes, &key).unwrap();
        assert_eq!(back.body, e.body);
        assert_eq!(back.header.status, e.header.status);
        assert_eq!(back.header.headers, e.header.headers);
        assert_eq!(back.upstream_age, 7);
        assert!(back.validators.is_some());
        let near = |a: Instant, b: Instant| {
            let d = if a > b { a - b } else { b - a };
            // Instants and the wall clock are read apart: a busy machine may pause between.
            d < Duration::from_millis(50)
        };
        assert!(near(back.fresh_until, e.fresh_until));
        assert!(near(back.revalidate_until, e.revalidate_until));
        assert!(near(back.error_until, e.error_until));
        assert!(near(back.refresh_at.unwrap(), e.refresh_at.unwrap()));
    }

    #[test]
    fn another_version_or_key_is_a_miss() {
        let key = test_key("r", "/p");
        let mut bytes = encode(&entry(), &key).unwrap();
        assert!(decode(&bytes, &test_key("r", "/q")).is_none());
        bytes[4] = 3;
        assert!(decode(&bytes, &key).is_none());
        assert!(decode(b"STOA", &key).is_none());
        assert!(decode(&[], &key).is_none());
    }
}
