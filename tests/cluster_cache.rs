//! The shared cache tier, end to end: three real stoa processes on one real redis-server
//! (or a real three-master Redis Cluster) in front of one small origin that counts its calls.
//! A cold key costs the origin one call cluster-wide; a node that dies holding the lease
//! costs at most one more; a purge on one node reaches the others and Redis; Redis going
//! away fails no request.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{quoted, three_nodes, wait_redis_up, Origin, TOKEN};
use common::redis::{RedisCluster, RedisServer};
use common::{sample, x_cache, StoaProcess};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// `n` concurrent GETs of `path`, round-robin over `nodes`: (status, body) of each.
async fn stampede(nodes: &[StoaProcess], path: &str, n: usize) -> Vec<(u16, String)> {
    let http = client();
    let requests = (0..n).map(|i| {
        let url = nodes[i % nodes.len()].url(path);
        let http = http.clone();
        async move {
            match http.get(url).send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        }
    });
    futures_util::future::join_all(requests).await
}

async fn one_cold_key_costs_one_call(redis: &str) {
    let origin = Origin::start(Duration::from_millis(300)).await;
    let nodes = three_nodes(redis, &origin, "ttl = \"60s\", lock_timeout = \"10s\"").await;
    let answers = stampede(&nodes, "/items/cold", 1000).await;
    assert_eq!(origin.calls(), 1, "one upstream call for three nodes");
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body, "answer #1 for /items/cold");
    }
    // The other nodes took it from the shared tier, not from the upstream.
    let mut l2_hits = 0.0;
    for node in &nodes {
        let m = node.metrics().await;
        l2_hits += sample(&m, "stoa_cache_l2_lookups_total{result=\"hit\"}").unwrap_or(0.0);
    }
    assert!(
        l2_hits >= 2.0,
        "nodes that did not fetch read the shared tier"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_over_three_nodes_cost_one_upstream_call() {
    let redis = RedisServer::start();
    one_cold_key_costs_one_call(&quoted(&redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cluster_works_like_a_single_redis() {
    let cluster = RedisCluster::start(3);
    one_cold_key_costs_one_call(&cluster.seeds_toml()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_most_one_call_per_ttl_window_under_load() {
    let redis = RedisServer::start();
    let origin = Origin::start(Duration::from_millis(50)).await;
    let nodes = three_nodes(&quoted(&redis.url()), &origin, "ttl = \"1s\"").await;
    let started = Instant::now();
    let run = Duration::from_millis(3500);
    let mut failed = 0;
    while started.elapsed() < run {
        for (status, _) in stampede(&nodes, "/items/busy", 30).await {
            failed += usize::from(status != 200);
        }
    }
    assert_eq!(failed, 0);
    // Every node expires the entry at the same wall-clock moment: one refetch per window.
    let windows = run.as_secs_f64().ceil() as usize + 1;
    let calls = origin.calls();
    assert!(calls <= windows, "{calls} calls for {windows} ttl windows");
    assert!(calls >= 3, "the entry did expire: {calls} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_holder_that_dies_costs_at_most_one_more_call() {
    let redis = RedisServer::start();
    let origin = Origin::start(Duration::from_millis(1500)).await;
    let nodes = three_nodes(
        &quoted(&redis.url()),
        &origin,
        "ttl = \"60s\", lock_timeout = \"10s\"",
    )
    .await;
    let http = client();
    let leader_url = nodes[0].url("/items/slow");
    let leader = tokio::spawn({
        let http = http.clone();
        async move { http.get(leader_url).send().await.map(|r| r.status()) }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.calls() == 0 {
        assert!(Instant::now() < deadline, "the first node never asked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let others = tokio::spawn({
        let n1 = nodes[1].url("/items/slow");
        let n2 = nodes[2].url("/items/slow");
        let http = http.clone();
        async move {
            let requests = (0..40).map(|i| {
                let url = if i % 2 == 0 { n1.clone() } else { n2.clone() };
                let http = http.clone();
                async move {
                    match http.get(url).send().await {
                        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                        Err(e) => (0, e.to_string()),
                    }
                }
            });
            futures_util::future::join_all(requests).await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    nodes[0].signal(libc::SIGKILL);
    let _ = leader.await;
    let answers = others.await.unwrap();
    let calls = origin.calls();
    assert!(calls <= 2, "{calls} upstream calls");
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body, &format!("answer #{calls} for /items/slow"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_on_one_node_reaches_the_others_and_redis() {
    let redis = RedisServer::start();
    let origin = Origin::start(Duration::ZERO).await;
    let nodes = three_nodes(&quoted(&redis.url()), &origin, "ttl = \"60s\"").await;
    let http = client();
    let get = |n: usize| http.get(nodes[n].url("/items/p")).send();
    assert_eq!(x_cache(&get(0).await.unwrap()), "MISS");
    get(1).await.unwrap();
    assert_eq!(
        x_cache(&get(1).await.unwrap()),
        "HIT",
        "B holds it in memory"
    );
    assert_eq!(origin.calls(), 1);
    let r = http
        .post(nodes[0].admin_url("/admin/purge"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"request": {"method": "GET", "path": "/items/p"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The broadcast is asynchronous; it lands within moments.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = get(1).await.unwrap();
        if x_cache(&r) == "MISS" {
            break;
        }
        assert!(Instant::now() < deadline, "B still serves the purged entry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        origin.calls(),
        2,
        "not found in Redis either: fetched again"
    );
    let cache: serde_json::Value = nodes[1].admin_json("/admin/cache", TOKEN).await;
    assert_eq!(cache["l2"]["up"], true, "{cache}");
    assert!(cache["l2"]["purges_applied"].as_u64() >= Some(1), "{cache}");

    // A node with [cluster] exports every series of the dashboard's cluster panels.
    let dashboard =
        std::fs::read_to_string(common::repo_path("dashboards/stoa-grafana.json")).unwrap();
    let text = nodes[1].metrics().await;
    let mut rest = dashboard.as_str();
    while let Some(at) = rest.find("stoa_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        rest = &tail[end..];
        if !name.starts_with("stoa_cluster_") && !name.starts_with("stoa_cache_l2_") {
            continue;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| text.contains(&format!("# TYPE {f} ")))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, absent from a clustered node:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_under_load_fails_nothing_and_is_used_again_when_back() {
    let mut redis = RedisServer::start();
    let origin = Origin::start(Duration::from_millis(20)).await;
    let nodes = three_nodes(&quoted(&redis.url()), &origin, "ttl = \"60s\"").await;
    let mut failed = 0;
    let mut round = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if round == 3 {
            redis.stop();
        }
        for (status, _) in stampede(&nodes, &format!("/items/k{}", round % 5), 30).await {
            failed += usize::from(status != 200);
        }
        round += 1;
    }
    assert_eq!(failed, 0, "no request fails because Redis did");
    wait_redis_up(&nodes, false).await;
    redis.restart();
    wait_redis_up(&nodes, true).await;
    let before = origin.calls();
    let answers = stampede(&nodes, "/items/after", 300).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    assert_eq!(
        origin.calls(),
        before + 1,
        "shared again: one call cluster-wide"
    );
}
