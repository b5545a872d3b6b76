//! Cluster-wide rate limits, end to end: three real stoa processes on one real redis-server
//! (started on a free port), in front of a small real origin. A `scope = "cluster"` policy
//! admits its burst once across the three; a local one admits it on each; with Redis stopped
//! every request is still answered (local fallback), and once Redis is back the shared
//! buckets are used again. Without `[cluster]`, nothing about Redis appears.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{sample, EchoUpstream, StoaProcess};

/// The rate-limit keys in Redis (`<prefix>rl:<policy>:<client>`); the shared cache tier keeps
/// keys of its own there too (its live nodes).
fn rate_keys(redis: &RedisServer) -> usize {
    redis
        .cli(&["--scan", "--pattern", "*rl:*"])
        .lines()
        .filter(|l| !l.is_empty())
        .count()
}

/// A pass-through route `/limited/{id}` behind the policy `p`, and `[cluster]` on `redis`.
fn scene(policy: &str, redis: Option<&RedisServer>, node: &str, up: &EchoUpstream) -> String {
    let cluster = match redis {
        Some(r) => format!(
            "[cluster]\nredis = \"{}\"\nnode_name = \"{node}\"\ncommand_timeout = \"250ms\"\nconnect_timeout = \"250ms\"\n",
            r.url()
        ),
        None => String::new(),
    };
    format!(
        r#"{cluster}
[rate_limits.p]
{policy}

[upstreams.echo]
url = "{}"
timeout = "5s"

[[routes]]
name = "limited"
path = "/limited/{{id}}"
upstream = "echo"
rate_limit = "p"
"#,
        up.url()
    )
}

async fn three_nodes(
    policy: &str,
    redis: Option<&RedisServer>,
    up: &EchoUpstream,
) -> Vec<StoaProcess> {
    let mut nodes = Vec::new();
    // The tests read the older RateLimit-Limit/-Remaining/-Reset trio.
    for n in 0..3 {
        let node = StoaProcess::start_with(
            "rate_limit_headers = \"legacy\"",
            &scene(policy, redis, &format!("node-{n}"), up),
        )
        .await;
        nodes.push(node);
    }
    nodes
}

/// Waits until every node says its Redis is up (or `up == false`: degraded).
async fn wait_redis_state(nodes: &[StoaProcess], up: bool) {
    let want = if up { 1.0 } else { 0.0 };
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in nodes {
        loop {
            let m = node.metrics().await;
            if sample(&m, "stoa_cluster_redis_up") == Some(want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis never became {}:\n{m}\n{}",
                if up { "up" } else { "degraded" },
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `rounds` requests per node, round-robin, one at a time: (status, headers) of each.
async fn round_robin(
    http: &reqwest::Client,
    nodes: &[StoaProcess],
    rounds: usize,
) -> Vec<(u16, reqwest::header::HeaderMap)> {
    let mut out = Vec::new();
    for i in 0..rounds * nodes.len() {
        let node = &nodes[i % nodes.len()];
        let r = http
            .get(node.url(&format!("/limited/{i}")))
            .send()
            .await
            .expect("request failed");
        out.push((r.status().as_u16(), r.headers().clone()));
    }
    out
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.parse().ok()
}

fn checks(m: &str, source: &str, result: &str) -> f64 {
    sample(
        m,
        &format!(r#"stoa_cluster_rate_limit_checks_total{{result="{result}",source="{source}"}}"#),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_policy_admits_its_burst_once_across_three_nodes() {
    let redis = RedisServer::start();
    let up = EchoUpstream::start().await;
    let policy = "per_minute = 1\nburst = 10\nscope = \"cluster\"";
    let nodes = three_nodes(policy, Some(&redis), &up).await;
    wait_redis_state(&nodes, true).await;
    let http = reqwest::Client::new();

    let answers = round_robin(&http, &nodes, 6).await;
    let admitted: Vec<_> = answers.iter().filter(|(s, _)| *s == 200).collect();
    // One request a minute refills: within this test's few seconds, at most one more.
    assert!(
        (10..=11).contains(&admitted.len()),
        "admitted {} of 18: {:?}",
        admitted.len(),
        answers.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    );
    // The first ten are the burst, counted down across the nodes as one bucket.
    let remaining: Vec<u64> = answers[..10]
        .iter()
        .map(|(s, h)| {
            assert_eq!(*s, 200);
            assert_eq!(header(h, "ratelimit-limit"), Some(10));
            header(h, "ratelimit-remaining").expect("remaining")
        })
        .collect();
    assert_eq!(remaining, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]);
    // A refusal is the same 429 as a local one: Retry-After until the next slot (a minute).
    let (status, h) = answers
        .iter()
        .rev()
        .find(|(s, _)| *s == 429)
        .expect("a 429");
    assert_eq!(*status, 429);
    let retry = header(h, "retry-after").expect("retry-after");
    assert!((50..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(header(h, "ratelimit-remaining"), Some(0));
    let reset = header(h, "ratelimit-reset").expect("reset");
    assert!((9 * 60..=10 * 60).contains(&reset), "reset {reset}");

    let mut from_redis = 0.0;
    for node in &nodes {
        let m = node.metrics().await;
        from_redis += checks(&m, "redis", "allowed") + checks(&m, "redis", "limited");
        assert_eq!(checks(&m, "local_fallback", "allowed"), 0.0, "{m}");
    }
    assert_eq!(from_redis, 18.0);
    assert_eq!(rate_keys(&redis), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_policy_admits_its_burst_on_each_node() {
    let redis = RedisServer::start();
    let up = EchoUpstream::start().await;
    let policy = "per_minute = 1\nburst = 10";
    let nodes = three_nodes(policy, Some(&redis), &up).await;
    wait_redis_state(&nodes, true).await;
    let http = reqwest::Client::new();

    let answers = round_robin(&http, &nodes, 12).await;
    let admitted = answers.iter().filter(|(s, _)| *s == 200).count();
    assert!((30..=33).contains(&admitted), "admitted {admitted} of 36");
    // Nothing went to Redis for it.
    assert_eq!(rate_keys(&redis), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_every_request_is_answered_and_redis_is_used_again_once_back() {
    let mut redis = RedisServer::start();
    let up = EchoUpstream::start().await;
    // A slow refill keeps the bucket's key in Redis for seconds, so the test can see it.
    let policy = "requests_per_second = 1\nburst = 1000\nscope = \"cluster\"";
    let nodes = three_nodes(policy, Some(&redis), &up).await;
    wait_redis_state(&nodes, true).await;
    let http = reqwest::Client::new();
    assert!(round_robin(&http, &nodes, 2)
        .await
        .iter()
        .all(|(s, _)| *s == 200));
    assert_eq!(rate_keys(&redis), 1);

    redis.stop();
    let started = Instant::now();
    // Concurrent requests on every node while Redis is gone: none fails.
    let tasks: Vec<_> = (0..90)
        .map(|i| {
            let http = http.clone();
            let url = nodes[i % 3].url(&format!("/limited/{i}"));
            tokio::spawn(async move {
                match http.get(url).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                }
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let outage = started.elapsed();
    wait_redis_state(&nodes, false).await;
    let mut fallback = 0.0;
    for node in &nodes {
        let m = node.metrics().await;
        fallback += checks(&m, "local_fallback", "allowed");
        assert!(
            sample(&m, r#"stoa_cluster_redis_transitions_total{to="degraded"}"#) == Some(1.0),
            "{m}"
        );
        let log = node.log();
        assert_eq!(log.matches("cluster: redis degraded").count(), 1, "{log}");
    }
    assert!(fallback >= 80.0, "local fallback checks {fallback}");
    eprintln!("90 requests with Redis stopped answered in {outage:?}");

    redis.restart();
    wait_redis_state(&nodes, true).await;
    assert_eq!(rate_keys(&redis), 0);
    let mut before = 0.0;
    for node in &nodes {
        before += checks(&node.metrics().await, "redis", "allowed");
    }
    assert!(round_robin(&http, &nodes, 2)
        .await
        .iter()
        .all(|(s, _)| *s == 200));
    let mut after = 0.0;
    for node in &nodes {
        after += checks(&node.metrics().await, "redis", "allowed");
    }
    assert_eq!(after - before, 6.0);
    assert_eq!(rate_keys(&redis), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cluster_section_nothing_is_shared() {
    let up = EchoUpstream::start().await;
    let nodes = three_nodes("per_minute = 1\nburst = 2", None, &up).await;
    let http = reqwest::Client::new();
    let answers = round_robin(&http, &nodes, 3).await;
    let admitted = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(admitted, 6);
    let m = nodes[0].metrics().await;
    assert!(!m.contains("stoa_cluster_"), "{m}");
    assert!(!nodes[0].log().contains("cluster"), "{}", nodes[0].log());

    // A cluster-scope policy needs the section.
    let dir = tempfile::tempdir().unwrap();
    let text = scene("per_minute = 1\nscope = \"cluster\"", None, "x", &up);
    let path = common::write_temp(dir.path(), "stoa.toml", &text);
    let (code, _out, err) = common::stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("rate_limits.p.scope: \"cluster\" needs a [cluster] section"),
        "{err}"
    );
}
