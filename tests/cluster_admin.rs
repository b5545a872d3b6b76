//! Admin orders across the shared tier, end to end: three real stoa processes on one real
//! redis-server. A reload on one node makes every node reload its own file; a refresh on one
//! node costs the upstream one call cluster-wide and every node then answers the new body;
//! a node with no copy of its own serves the shared one within stale-if-error when the
//! upstream fails; a Redis that speaks only TLS is shared through `rediss://` and `ca_file`.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::cluster::{quoted, scene, three_nodes, Origin, TOKEN};
use common::redis::RedisServer;
use common::{sample, x_cache, StoaProcess};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

async fn reloads(node: &StoaProcess, result: &str) -> f64 {
    let series = format!("stoa_config_reloads_total{{result=\"{result}\"}}");
    sample(&node.metrics().await, &series).unwrap_or(0.0)
}

async fn get(http: &reqwest::Client, node: &StoaProcess, path: &str) -> (u16, String, String) {
    let r = http.get(node.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let cache = x_cache(&r);
    (status, cache, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_on_one_node_reloads_every_node_from_its_own_file() {
    let redis = RedisServer::start();
    let origin = Origin::start(Duration::ZERO).await;
    let nodes = three_nodes(&quoted(&redis.url()), &origin, "ttl = \"60s\"").await;
    let http = reqwest::Client::new();
    let (status, _, _) = get(&http, &nodes[1], "/extra/x").await;
    assert_eq!(status, 404, "no such route yet");

    // Only B's file changes: a new route.
    let extra = "\n[[routes]]\nname = \"extra\"\npath = \"/extra/{id}\"\nupstream = \"origin\"\n";
    nodes[1].rewrite_config(&scene(
        &quoted(&redis.url()),
        "node-1",
        &origin,
        "ttl = \"60s\"",
        extra,
    ));

    let r = http
        .post(nodes[0].admin_url("/admin/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: serde_json::Value = r.json().await.unwrap();
    assert_eq!(report["broadcast"], true, "{report}");

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, body) = get(&http, &nodes[1], "/extra/x").await;
        if status == 200 {
            assert_eq!(body, "answer #1 for /extra/x");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never reloaded:\n{}",
            nodes[1].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every node reloaded once, its own file; A not twice (its own order comes back to it).
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloads(&nodes[2], "ok").await < 1.0 {
        assert!(Instant::now() < deadline, "C never reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for node in &nodes {
        assert_eq!(reloads(node, "ok").await, 1.0, "{}", node.log());
        assert_eq!(reloads(node, "error").await, 0.0);
    }
    // A and C read files without the new route.
    assert_eq!(get(&http, &nodes[0], "/extra/x").await.0, 404);
    assert_eq!(get(&http, &nodes[2], "/extra/x").await.0, 404);
    assert!(nodes[1].log().contains("reload asked by another node"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_on_one_node_costs_one_call_and_reaches_every_node() {
    let redis = RedisServer::start();
    let origin = Origin::start(Duration::ZERO).await;
    let nodes = three_nodes(&quoted(&redis.url()), &origin, "ttl = \"60s\"").await;
    let http = reqwest::Client::new();
    let first = "answer #1 for /items/r";
    assert_eq!(get(&http, &nodes[0], "/items/r").await.2, first);
    for node in &nodes[1..] {
        assert_eq!(get(&http, node, "/items/r").await.2, first);
        let (_, cache, body) = get(&http, node, "/items/r").await;
        assert_eq!(
            (cache.as_str(), body.as_str()),
            ("HIT", first),
            "held in memory"
        );
    }
    assert_eq!(origin.calls(), 1);

    let r = http
        .post(nodes[0].admin_url("/admin/refresh/items"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let second = "answer #2 for /items/r";
    let deadline = Instant::now() + Duration::from_secs(5);
    for node in &nodes {
        loop {
            let (status, _, body) = get(&http, node, "/items/r").await;
            assert_eq!(status, 200);
            if body == second {
                break;
            }
            assert_eq!(body, first);
            assert!(
                Instant::now() < deadline,
                "still the old body:\n{}",
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every node holds the new entry; the upstream was asked once for three nodes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in &nodes {
        let (_, cache, body) = get(&http, node, "/items/r").await;
        assert_eq!((cache.as_str(), body.as_str()), ("HIT", second));
    }
    assert_eq!(origin.calls(), 2, "one refetch cluster-wide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_a_copy_serves_the_shared_one_within_stale_if_error() {
    let redis = RedisServer::start();
    let origin = Origin::start(Duration::ZERO).await;
    let nodes = three_nodes(
        &quoted(&redis.url()),
        &origin,
        "ttl = \"1s\", stale_if_error = \"60s\"",
    )
    .await;
    let http = reqwest::Client::new();
    let (_, cache, body) = get(&http, &nodes[0], "/items/s").await;
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("MISS", "answer #1 for /items/s")
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    origin.failing.store(true, Ordering::SeqCst);

    // B never held the entry: the shared copy serves, marked stale.
    let (status, cache, body) = get(&http, &nodes[1], "/items/s").await;
    assert_eq!(status, 200, "{body}\n{}", nodes[1].log());
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("STALE", "answer #1 for /items/s")
    );
    assert_eq!(origin.calls(), 2, "the upstream was asked, and failed");
    // And again, from several requests at once on C.
    let answers =
        futures_util::future::join_all((0..10).map(|_| http.get(nodes[2].url("/items/s")).send()))
            .await;
    for r in answers {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "answer #1 for /items/s");
    }

    // Once the upstream answers again, the next fetch replaces it.
    origin.failing.store(false, Ordering::SeqCst);
    let (status, _, body) = get(&http, &nodes[1], "/items/s").await;
    assert_eq!(status, 200);
    assert!(
        body.starts_with("answer #") && body != "answer #1 for /items/s",
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_purge_across_routes_clears_the_shared_tier_without_keys() {
    let redis = RedisServer::start();
    let origin = Origin::start(Duration::ZERO).await;
    let extra = "\n[[routes]]\nname = \"things\"\npath = \"/things/{id}\"\nmethods = [\"GET\"]\n\
                 upstream = \"origin\"\ncache = { ttl = \"60s\" }\n";
    let mut nodes = Vec::new();
    for n in 0..2 {
        let text = scene(
            &quoted(&redis.url()),
            &format!("node-{n}"),
            &origin,
            "ttl = \"60s\"",
            extra,
        );
        nodes.push(StoaProcess::start(&text).await);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in &nodes {
        while sample(&node.metrics().await, "stoa_cluster_redis_up") != Some(1.0) {
            assert!(Instant::now() < deadline, "redis never up:\n{}", node.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let http = reqwest::Client::new();
    for path in ["/items/a", "/items/b", "/things/a"] {
        assert_eq!(get(&http, &nodes[0], path).await.1, "MISS");
    }
    assert_eq!(origin.calls(), 3);
    // The shared entries are stored once the answers are out: wait for all three.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(
        &nodes[0].metrics().await,
        "stoa_cache_l2_stores_total{result=\"stored\"}",
    ) != Some(3.0)
    {
        assert!(Instant::now() < deadline, "never stored in the shared tier");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let r = http
        .post(nodes[0].admin_url("/admin/purge"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"prefix": "/items/"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // B is told once the shared copies are gone.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let cache: serde_json::Value = nodes[1].admin_json("/admin/cache", TOKEN).await;
        if cache["l2"]["purges_applied"].as_u64() >= Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "B was never told: {cache}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B never held the entries: it reads the shared tier, where the purge removed /items/*
    // but not /things/*.
    assert_eq!(
        get(&http, &nodes[1], "/things/a").await.2,
        "answer #3 for /things/a"
    );
    assert_eq!(origin.calls(), 3);
    assert_eq!(
        get(&http, &nodes[1], "/items/a").await.2,
        "answer #4 for /items/a"
    );
    assert_eq!(origin.calls(), 4);
    let stats = redis.cli(&["info", "commandstats"]);
    assert!(stats.contains("cmdstat_smembers"), "{stats}");
    assert!(
        !stats.contains("cmdstat_keys:"),
        "KEYS blocks Redis:\n{stats}"
    );
}

/// A private CA's certificate (PEM), and a certificate and key for `localhost` it issued.
fn private_ca() -> (String, String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "stoa test redis CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (issuer.pem(), cert.pem(), key.serialize_pem())
}

async fn redis_up(node: &StoaProcess) -> bool {
    sample(&node.metrics().await, "stoa_cluster_redis_up") == Some(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_share_a_redis_that_speaks_only_tls() {
    let (ca, cert, key) = private_ca();
    let redis = RedisServer::start_tls(&cert, &key, &ca);
    let origin = Origin::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("redis-ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let url = redis.url();
    assert!(url.starts_with("rediss://localhost:"), "{url}");
    let tls = |node: &str, extra: &str| {
        let text = scene(&quoted(&url), node, &origin, "ttl = \"60s\"", "");
        let lease = "lock_timeout = \"1s\"\n";
        text.replacen(lease, &format!("{lease}{extra}\n"), 1)
    };
    let with_ca = format!("ca_file = {:?}", ca_file.display().to_string());
    let a = StoaProcess::start(&tls("node-a", &with_ca)).await;
    let b = StoaProcess::start(&tls("node-b", &with_ca)).await;
    // Without the CA, the system roots do not know Redis's certificate: no shared tier.
    let c = StoaProcess::start(&tls("node-c", "")).await;
    // tls_verify = false takes any certificate.
    let d = StoaProcess::start(&tls("node-d", "tls_verify = false")).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in [&a, &b, &d] {
        while !redis_up(node).await {
            assert!(Instant::now() < deadline, "redis never up:\n{}", node.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        !redis_up(&c).await,
        "an unknown CA was accepted:\n{}",
        c.log()
    );
    // Its first refused handshake may still be under way on a busy machine.
    while !c.log().contains("redis degraded") {
        assert!(Instant::now() < deadline, "no degraded tier:\n{}", c.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let http = reqwest::Client::new();
    let first = "answer #1 for /items/t";
    assert_eq!(get(&http, &a, "/items/t").await.2, first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(
        &a.metrics().await,
        "stoa_cache_l2_stores_total{result=\"stored\"}",
    ) != Some(1.0)
    {
        assert!(Instant::now() < deadline, "never stored in the shared tier");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        get(&http, &b, "/items/t").await.2,
        first,
        "B read it from Redis"
    );
    assert_eq!(
        get(&http, &d, "/items/t").await.2,
        first,
        "D read it from Redis"
    );
    assert_eq!(origin.calls(), 1);
    assert_eq!(
        get(&http, &c, "/items/t").await.2,
        "answer #2 for /items/t",
        "C has no shared tier: it fetched on its own"
    );
    let keys = redis.cli(&["dbsize"]);
    assert!(keys.trim().parse::<u64>().unwrap_or(0) >= 1, "{keys}");
}
