//! The shared tier's own guards, against a real redis-server, through the tier's API: a
//! fill whose lease an invalidation ended is refused by Redis itself (the fill script
//! checks the lease), a fill Redis cannot store (out of memory) gives its lease back at
//! once instead of holding the other nodes for the lease's life, and a Redis that hangs is
//! counted as timing out.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use stoa::cache::key::{derive, CacheKey, KeyParts};
use stoa::cache::purge::{Invalidation, PurgeWhat};
use stoa::cache::store::{Entry, Lifetimes};
use stoa::cache::tier::{Before, Tier, TierMetrics};
use stoa::cluster::Cluster;
use stoa::config::{ClusterSettings, KeyBody, KeyQuery, RedisTarget};

use common::redis::RedisServer;

fn settings(redis: &RedisServer, node: &str) -> ClusterSettings {
    ClusterSettings {
        redis: RedisTarget::Single(redis.url()),
        node_name: node.into(),
        key_prefix: "guard:".into(),
        connect_timeout: Duration::from_secs(1),
        command_timeout: Duration::from_secs(1),
        l2_max_entry_bytes: 64 << 20,
        lock_timeout: Duration::from_secs(5),
        ack_timeout: Duration::from_secs(1),
        ca_pem: None,
        tls_verify: true,
    }
}

/// A node's tier, connected.
async fn tier(redis: &RedisServer, node: &str) -> (Arc<Tier>, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let cluster = Cluster::new(settings(redis, node), &registry).unwrap();
    cluster.probe().await;
    assert!(cluster.is_up(), "redis answers");
    let metrics = TierMetrics::register(&registry).unwrap();
    (Tier::new(cluster, metrics), registry)
}

fn key(path: &str) -> CacheKey {
    let parts = KeyParts {
        route: "items",
        method: &http::Method::GET,
        path,
        query: None,
        body: b"",
        headers: &http::HeaderMap::new(),
    };
    derive(&parts, &KeyQuery::All, &KeyBody::None, &[], &[]).unwrap()
}

fn entry(body: Vec<u8>) -> Entry {
    let header = ResponseHeader::build(200, None).unwrap();
    let life = Lifetimes {
        ttl: Duration::from_secs(60),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        refresh_ahead: None,
    };
    Entry::new(header, Bytes::from(body), 16, Instant::now(), life, None)
}

fn counter(registry: &prometheus::Registry, result: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "stoa_cache_l2_stores_total")
        .flat_map(|f| f.get_metric())
        .find(|m| m.get_label().iter().any(|l| l.value() == result))
        .map_or(0, |m| m.get_counter().get_value() as u64)
}

async fn lease(tier: &Arc<Tier>, k: &CacheKey) -> stoa::cache::tier::Lease {
    match tier.before_fetch(k, Duration::from_secs(1)).await {
        Before::Lease(lease) => lease,
        Before::Found(_) => panic!("nothing stored yet"),
        Before::Skip => panic!("the tier is up"),
        Before::TimedOut => panic!("nobody else holds the lease"),
    }
}

#[tokio::test]
async fn a_fill_that_raced_an_invalidation_is_refused_by_redis() {
    let redis = RedisServer::start();
    let (a, a_metrics) = tier(&redis, "a").await;
    let (b, _) = tier(&redis, "b").await;
    for what in [
        PurgeWhat::Path {
            route: "items".into(),
            path: "/api/items/1".into(),
        },
        PurgeWhat::Route {
            route: "items".into(),
        },
        PurgeWhat::Prefix {
            route: None,
            prefix: "/api/".into(),
        },
        PurgeWhat::Tags {
            tags: vec!["anything".into()],
            routes: None,
        },
    ] {
        let k = key("/api/items/1");
        // Node a takes the lease and reads the upstream ...
        let held = lease(&a, &k).await;
        // ... node b's purge is acknowledged while a's fill is in flight ...
        let inv = Invalidation {
            what: what.clone(),
            soft: false,
        };
        b.purge_shared(&inv).await.expect("the tier is up");
        // ... and a's fill, which read the upstream before it, is refused by Redis.
        let refused = counter(&a_metrics, "refused");
        a.after_fetch(&k, held, Some(&entry(b"old".to_vec()))).await;
        assert_eq!(counter(&a_metrics, "refused"), refused + 1, "{what:?}");
        match b.before_fetch(&k, Duration::from_secs(1)).await {
            Before::Lease(l) => b.after_fetch(&k, l, None).await,
            _ => panic!("{what:?}: the raced fill must not be in the shared tier"),
        }
    }
    // Without an invalidation the same fill is stored, and found.
    let k = key("/api/items/2");
    let held = lease(&a, &k).await;
    a.after_fetch(&k, held, Some(&entry(b"new".to_vec()))).await;
    assert_eq!(counter(&a_metrics, "stored"), 1);
    assert!(matches!(
        b.before_fetch(&k, Duration::from_secs(1)).await,
        Before::Found(_)
    ));
}

/// A fill whose lease a purge ended finishes (refused) after another node took the key's
/// next lease: winding up, it must not take that next lease out of the set of leases, or a
/// tag purge that follows would not find it, and a fill that read the upstream before that
/// purge would be stored.
#[tokio::test]
async fn a_refused_fill_winding_up_leaves_the_next_lease_where_purges_find_it() {
    let redis = RedisServer::start();
    let (a, _) = tier(&redis, "a").await;
    let (b, b_metrics) = tier(&redis, "b").await;
    let k = key("/api/items/1");
    // Node a's fill is in flight when a purge of its path ends its lease ...
    let first = lease(&a, &k).await;
    let path = Invalidation {
        what: PurgeWhat::Path {
            route: "items".into(),
            path: "/api/items/1".into(),
        },
        soft: false,
    };
    a.purge_shared(&path).await.expect("the tier is up");
    // ... node b takes the key's next lease and reads the upstream ...
    let second = lease(&b, &k).await;
    // ... node a's fill comes back and is refused ...
    a.after_fetch(&k, first, Some(&entry(b"older".to_vec())))
        .await;
    // ... then a tag purge is acknowledged while b's fill is in flight.
    let tags = Invalidation {
        what: PurgeWhat::Tags {
            tags: vec!["anything".into()],
            routes: None,
        },
        soft: false,
    };
    a.purge_shared(&tags).await.expect("the tier is up");
    let refused = counter(&b_metrics, "refused");
    b.after_fetch(&k, second, Some(&entry(b"old".to_vec())))
        .await;
    assert_eq!(
        counter(&b_metrics, "refused"),
        refused + 1,
        "the fill that read the upstream before the tag purge is refused"
    );
    assert_eq!(counter(&b_metrics, "stored"), 0);
}

#[tokio::test]
async fn a_fill_redis_cannot_store_gives_the_lease_back_at_once() {
    let redis = RedisServer::start();
    let (a, a_metrics) = tier(&redis, "a").await;
    let (b, _) = tier(&redis, "b").await;
    assert_eq!(
        redis
            .command("CONFIG SET maxmemory-policy noeviction")
            .as_deref(),
        Some("+OK")
    );
    let used: u64 = redis
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let limit = format!("CONFIG SET maxmemory {}", used + (256 << 10));
    assert_eq!(redis.command(&limit).as_deref(), Some("+OK"));
    let k = key("/api/big");
    let held = lease(&a, &k).await;
    // Two MiB: more than Redis may hold now.
    a.after_fetch(&k, held, Some(&entry(vec![b'x'; 2 << 20])))
        .await;
    assert_eq!(counter(&a_metrics, "failed"), 1);
    // The lease is gone from Redis ...
    assert_eq!(redis.cli(&["KEYS", "guard:lease:*"]).trim(), "");
    // ... so once Redis has room again, node b gets it at once, not after its five seconds.
    assert_eq!(
        redis.command("CONFIG SET maxmemory 0").as_deref(),
        Some("+OK")
    );
    let asked = Instant::now();
    let l = lease(&b, &k).await;
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "the lease was given back"
    );
    b.after_fetch(&k, l, None).await;
}

#[tokio::test]
async fn a_hung_redis_is_counted_as_timeouts_not_connection_errors() {
    let redis = RedisServer::start();
    let registry = prometheus::Registry::new();
    let mut s = settings(&redis, "a");
    s.command_timeout = Duration::from_millis(200);
    let cluster = Cluster::new(s, &registry).unwrap();
    cluster.probe().await;
    assert!(cluster.is_up());
    redis.signal("STOP");
    cluster.probe().await;
    redis.signal("CONT");
    let errors = |kind: &str| {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "stoa_cluster_redis_errors_total")
            .flat_map(|f| f.get_metric())
            .find(|m| m.get_label().iter().any(|l| l.value() == kind))
            .map_or(0, |m| m.get_counter().get_value() as u64)
    };
    assert_eq!(errors("timeout"), 1);
    assert_eq!(errors("connection"), 0);
    assert!(!cluster.is_up(), "degraded while it hangs");
}
