//! The disk tier (`cache.disk`) end to end: the real binary with its disk directory in a
//! temporary directory, in front of a real upstream that counts its calls and numbers its
//! answers (`answer #<n> for <path>`), so that a wrong, old or mixed answer shows.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{path_of, raw_send, sample, serve_heads, stoa, text_answer, x_cache, StoaProcess};

const TOKEN: &str = "disk-token";

/// An origin answering `GET` with `answer #<n> for <path>` after `delay` (a path under
/// `/big/` with that line and `size` bytes of padding), counting calls.
struct Origin {
    port: u16,
    calls: Arc<AtomicUsize>,
}

impl Origin {
    async fn start(delay: Duration, size: usize) -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        serve_heads(listener, move |head| {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(delay).await;
                let path = path_of(&head);
                let mut body = format!("answer #{n} for {path}");
                if path.starts_with("/big/") {
                    body.push('\n');
                    body.push_str(&"x".repeat(size));
                }
                text_answer(200, "", &body)
            }
        });
        Origin { port, calls }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// The configuration after `[server]`: the disk tier in `dir`, two routes on the origin.
fn scene(origin: &Origin, dir: &Path, cache: &str, route_cache: &str) -> String {
    format!(
        r#"token = "{TOKEN}"

[cache]
{cache}
disk = {{ path = "{dir}", max_bytes = "64MiB" }}

[upstreams.origin]
url = "http://127.0.0.1:{port}"
timeout = "10s"

[[routes]]
name = "items"
path = "/items/{{id}}"
methods = ["GET"]
upstream = "origin"
cache = {{ ttl = "300s", tags = ["item:{{id}}", "items"] {route_cache} }}

[[routes]]
name = "other"
path = "/other/{{id}}"
methods = ["GET"]
upstream = "origin"
cache = {{ ttl = "300s" }}

[[routes]]
name = "big"
path = "/big/{{id}}"
methods = ["GET"]
upstream = "origin"
cache = {{ ttl = "300s" }}
"#,
        dir = dir.display(),
        port = origin.port,
    )
}

async fn get(node: &StoaProcess, path: &str) -> (String, String, String) {
    let r = reqwest::get(node.url(path)).await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let x = x_cache(&r);
    let status = r
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.text().await.unwrap(), x, status)
}

async fn purge(node: &StoaProcess, body: serde_json::Value) -> serde_json::Value {
    node.purge(TOKEN, body).await
}

/// Stops `node` with SIGTERM and waits for it to exit.
async fn stop(mut node: StoaProcess) {
    node.signal(libc::SIGTERM);
    assert!(
        node.wait_exit(Duration::from_secs(20)).await.is_some(),
        "stoa did not stop:\n{}",
        node.log()
    );
}

/// Whether `body` is an answer the origin could have given for `path`, whole.
fn is_answer_for(body: &str, path: &str) -> bool {
    let first = body.lines().next().unwrap_or_default();
    let Some(rest) = first.strip_prefix("answer #") else {
        return false;
    };
    let Some((n, for_path)) = rest.split_once(" for ") else {
        return false;
    };
    n.parse::<usize>().is_ok() && for_path == path
}

fn lookups(metrics: &str, result: &str) -> f64 {
    sample(
        metrics,
        &format!("stoa_cache_disk_lookups_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn entries_survive_a_restart_and_are_hits_without_the_upstream() {
    let origin = Origin::start(Duration::ZERO, 0).await;
    let disk = tempfile::tempdir().unwrap();
    let text = scene(&origin, disk.path(), "", "");
    let node = StoaProcess::start(&text).await;
    let n = 300;
    let mut bodies = Vec::new();
    for i in 0..n {
        let (body, x, _) = get(&node, &format!("/items/{i}")).await;
        assert_eq!(x, "MISS");
        bodies.push(body);
    }
    assert_eq!(origin.calls(), n);
    stop(node).await;

    let started = Instant::now();
    let node = StoaProcess::start(&text).await;
    let (body, x, status) = get(&node, "/items/0").await;
    let first_hit = started.elapsed();
    assert_eq!((body.as_str(), x.as_str()), (bodies[0].as_str(), "HIT"));
    assert!(status.contains("detail=disk"), "{status}");
    assert!(first_hit < Duration::from_secs(2), "{first_hit:?}");
    for (i, before) in bodies.iter().enumerate().skip(1) {
        let (body, x, _) = get(&node, &format!("/items/{i}")).await;
        assert_eq!((&body, x.as_str()), (before, "HIT"), "/items/{i}");
    }
    assert_eq!(origin.calls(), n, "nothing went upstream after the restart");
    // Promoted into memory: a hit from memory now, no disk read.
    let (_, x, status) = get(&node, "/items/1").await;
    assert_eq!(x, "HIT");
    assert!(!status.contains("disk"), "{status}");
    let metrics = node.metrics().await;
    assert_eq!(lookups(&metrics, "hit"), n as f64, "{metrics}");
    // The status page's cache section.
    let status: serde_json::Value = reqwest::get(node.admin_url("/status.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let disk_status = &status["cache"]["disk"];
    assert_eq!(disk_status["ready"], true, "{status}");
    assert_eq!(disk_status["lookups"]["hit"], n, "{status}");
    assert_eq!(disk_status["max_bytes"], 64 * 1024 * 1024, "{status}");
    assert!(
        sample(
            &metrics,
            "stoa_requests_total{cache=\"disk_hit\",lane=\"answer\",route=\"items\",status=\"200\"}"
        )
        .is_some()
            || metrics.contains("cache=\"disk_hit\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn purges_of_every_kind_before_a_restart_still_win_after_it() {
    let origin = Origin::start(Duration::ZERO, 0).await;
    let disk = tempfile::tempdir().unwrap();
    let text = scene(&origin, disk.path(), "", "");
    let node = StoaProcess::start(&text).await;
    let paths = [
        "/other/1",  // route purge
        "/items/p1", // prefix purge
        "/items/e1", // exact request purge
        "/items/t1", // tag purge
        "/items/s1", // soft purge
        "/items/k1", // kept
    ];
    let mut first = Vec::new();
    for path in paths {
        first.push(get(&node, path).await.0);
    }
    purge(&node, serde_json::json!({ "route": "other" })).await;
    purge(&node, serde_json::json!({ "prefix": "/items/p" })).await;
    purge(
        &node,
        serde_json::json!({ "request": { "path": "/items/e1" } }),
    )
    .await;
    purge(&node, serde_json::json!({ "tags": ["item:t1"] })).await;
    purge(
        &node,
        serde_json::json!({ "route": "items", "prefix": "/items/s", "soft": true }),
    )
    .await;
    stop(node).await;

    let node = StoaProcess::start(&text).await;
    let calls = origin.calls();
    for (path, before) in paths.iter().zip(&first).take(4) {
        let (body, x, _) = get(&node, path).await;
        assert_eq!(x, "MISS", "{path}: a purged entry came back from disk");
        assert_ne!(&body, before, "{path}");
        assert!(is_answer_for(&body, path), "{path}: {body}");
    }
    assert_eq!(origin.calls(), calls + 4);
    // The soft purge: the old copy, stale, while one revalidation runs.
    let (body, x, _) = get(&node, "/items/s1").await;
    assert_eq!((&body, x.as_str()), (&first[4], "STALE"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (body, x, _) = get(&node, "/items/s1").await;
        if x == "HIT" && body != first[4] {
            break;
        }
        assert!(Instant::now() < deadline, "never refreshed: {x} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.calls(), calls + 5, "one revalidation");
    let (body, x, _) = get(&node, "/items/k1").await;
    assert_eq!((&body, x.as_str()), (&first[5], "HIT"));
    let metrics = node.metrics().await;
    assert_eq!(lookups(&metrics, "purged"), 4.0, "{metrics}");
}

#[tokio::test]
async fn a_purge_during_a_fill_is_not_undone_by_the_disk() {
    let origin = Origin::start(Duration::from_millis(400), 0).await;
    let disk = tempfile::tempdir().unwrap();
    let text = scene(&origin, disk.path(), "", "");
    let node = StoaProcess::start(&text).await;
    // A fill starts, the purge lands while it runs, then a request after the purge.
    let url = node.url("/items/race");
    let raced = tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    purge(&node, serde_json::json!({ "route": "items" })).await;
    let (after, _, _) = get(&node, "/items/race").await;
    let raced = raced.await.unwrap().unwrap();
    assert!(raced.starts_with("answer #1 "), "{raced}");
    assert!(after.starts_with("answer #2 "), "{after}");
    let (again, x, _) = get(&node, "/items/race").await;
    assert_eq!((&again, x.as_str()), (&after, "HIT"));
    stop(node).await;
    let node = StoaProcess::start(&text).await;
    let (body, x, _) = get(&node, "/items/race").await;
    assert_eq!((&body, x.as_str()), (&after, "HIT"), "never the raced fill");
}

#[tokio::test]
async fn a_kill_mid_writes_then_damaged_files_never_give_a_wrong_answer() {
    let origin = Origin::start(Duration::ZERO, 0).await;
    let disk = tempfile::tempdir().unwrap();
    let text = scene(&origin, disk.path(), "", "");
    let mut node = StoaProcess::start(&text).await;
    // Writes in flight when the process is killed.
    let client = reqwest::Client::new();
    let n = 200;
    let mut served = std::collections::HashMap::new();
    for i in 0..n {
        let path = format!("/items/{i}");
        let body = client
            .get(node.url(&path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        served.insert(path, body);
    }
    node.signal(libc::SIGKILL);
    node.wait_exit(Duration::from_secs(10)).await.unwrap();
    drop(node);

    let check = |node: StoaProcess, served: std::collections::HashMap<String, String>| async move {
        let mut hits = 0;
        for i in 0..n {
            let path = format!("/items/{i}");
            let (body, x, _) = get(&node, &path).await;
            assert!(is_answer_for(&body, &path), "{path}: {body}");
            if x == "HIT" {
                hits += 1;
                assert_eq!(
                    Some(&body),
                    served.get(&path),
                    "{path}: a hit of another answer"
                );
            }
        }
        (node, hits)
    };
    let node = StoaProcess::start(&text).await;
    let (node, hits) = check(node, served.clone()).await;
    // Whatever reached the files before the kill is served; the rest is fetched again.
    assert!(hits <= n);
    stop(node).await;

    // Damage every data file in many places.
    let mut damaged = 0;
    for file in std::fs::read_dir(disk.path()).unwrap() {
        let path = file.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("foyer")
        {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        // Entries start on 4 KiB pages: a byte inside every third one's page.
        let mut at = 4096 + 200;
        while at < bytes.len() {
            bytes[at] ^= 0x5a;
            at += 3 * 4096;
            damaged += 1;
        }
        std::fs::write(&path, bytes).unwrap();
    }
    assert!(damaged > 0, "no data files in {}", disk.path().display());
    let node = StoaProcess::start(&text).await;
    let mut served_now = std::collections::HashMap::new();
    for i in 0..n {
        let path = format!("/items/{i}");
        let (body, _, _) = get(&node, &path).await;
        assert!(is_answer_for(&body, &path), "{path}: {body}");
        served_now.insert(path, body);
    }
    let metrics = node.metrics().await;
    let damaged_seen = sample(&metrics, "stoa_cache_disk_damaged_total").unwrap_or(0.0);
    assert!(lookups(&metrics, "hit") < n as f64, "{metrics}");
    // A damaged entry fails its checksum: a miss, counted, dropped from the index.
    let hits = lookups(&metrics, "hit");
    assert!(damaged_seen > 0.0, "{metrics}");
    assert!(hits > 0.0, "{metrics}");
    assert_eq!(
        hits + damaged_seen + lookups(&metrics, "miss"),
        n as f64,
        "{metrics}"
    );
    // The bodies served after the damage are those the origin gave (checked above) and,
    // for hits, the ones served before.
    for (path, body) in &served_now {
        if !served.values().any(|b| b == body) {
            assert!(is_answer_for(body, path));
        }
    }
}

#[tokio::test]
async fn an_answer_too_big_for_a_memory_shard_is_stored_on_disk_and_hit() {
    // Memory of 8 MiB keeps answers up to about 1 MiB; the disk tier's blocks of 4 MiB
    // hold one of 1.5 MiB.
    let origin = Origin::start(Duration::ZERO, 1536 * 1024).await;
    let disk = tempfile::tempdir().unwrap();
    let text = scene(
        &origin,
        disk.path(),
        "max_bytes = \"8MiB\"\nmax_entry_bytes = \"1800KiB\"",
        "",
    );
    let node = StoaProcess::start(&text).await;
    let (body, x, _) = get(&node, "/big/1").await;
    assert_eq!(x, "MISS");
    assert!(body.len() > 1536 * 1024);
    for _ in 0..3 {
        let (again, x, status) = get(&node, "/big/1").await;
        assert_eq!(x, "HIT", "{status}");
        assert!(status.contains("detail=disk"), "{status}");
        assert_eq!(again, body);
    }
    assert_eq!(origin.calls(), 1);
    let metrics = node.metrics().await;
    assert_eq!(
        sample(&metrics, "stoa_cache_too_large_total{route=\"big\"}"),
        Some(0.0),
        "{metrics}"
    );
    // A node with the disk tier exports every series of the dashboard's disk panels.
    let dashboard =
        std::fs::read_to_string(common::repo_path("dashboards/stoa-grafana.json")).unwrap();
    let mut named = 0;
    for (at, _) in dashboard.match_indices("stoa_cache_disk_") {
        let tail = &dashboard[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        named += 1;
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "the dashboard queries {name}, absent from /metrics"
        );
    }
    assert!(named >= 6, "{named}");
}

#[test]
fn stoa_check_refuses_a_disk_path_that_cannot_be_created_and_makes_none() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let config = dir.path().join("stoa.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [cache]\ndisk = {{ path = \"{}\", max_bytes = \"1MiB\" }}\n",
        file.join("below").display()
    );
    std::fs::write(&config, text).unwrap();
    let (code, out, err) = stoa(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("cache.disk.max_bytes"), "{err}");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"1MiB\"", "\"1GiB\"");
    std::fs::write(&config, text).unwrap();
    let (code, out, err) = stoa(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("cache.disk.path"), "{err}");
    assert!(err.contains("cannot create or write"), "{err}");

    // A directory not made yet passes where it would be made, and checking does not make it.
    let later = dir.path().join("not-yet").join("cache");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            &file.join("below").display().to_string(),
            &later.display().to_string(),
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"127.0.0.1:1\"",
        );
    std::fs::write(&config, text).unwrap();
    let (code, out, err) = stoa(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !dir.path().join("not-yet").exists(),
        "stoa check made the directory"
    );
}

/// The server lines of the lanes: the front (with h2c beside it) and pingora's proxy.
const LANES: [(&str, &str); 2] = [("front", "h2c = true"), ("proxy", "front = false")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_hits_on_both_http1_lanes_and_over_http2() {
    let origin = Origin::start(Duration::ZERO, 0).await;
    for (lane, server) in LANES {
        let disk = tempfile::tempdir().unwrap();
        let text = scene(&origin, disk.path(), "", "");
        let node = StoaProcess::start_with(server, &text).await;
        let (a, _, _) = get(&node, "/items/a").await;
        let (b, _, _) = get(&node, "/items/b").await;
        stop(node).await;
        let calls = origin.calls();
        let node = StoaProcess::start_with(server, &text).await;
        let answer = raw_send(
            node.port,
            "GET /items/a HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!((answer.status, answer.x_cache()), (200, "HIT"), "{lane}");
        assert_eq!(answer.body, a, "{lane}");
        let status = answer.header("cache-status").unwrap_or_default();
        assert!(status.contains("detail=disk"), "{lane}: {status}");
        if server.contains("h2c") {
            let send = common::h2::h2c(node.port).await;
            let (code, headers, body) = common::h2::get(&send, "/items/b", &[]).await;
            assert_eq!(
                (code, headers["x-cache"].to_str().unwrap()),
                (200, "HIT"),
                "{lane} h2"
            );
            assert_eq!(body, b.as_bytes(), "{lane} h2");
            let status = headers["cache-status"].to_str().unwrap();
            assert!(status.contains("detail=disk"), "{lane} h2: {status}");
        }
        assert_eq!(origin.calls(), calls, "{lane}");
    }
}

#[tokio::test]
async fn an_expired_disk_entry_still_serves_stale_if_error_after_a_restart() {
    let origin = common::cluster::Origin::start(Duration::ZERO).await;
    let disk = tempfile::tempdir().unwrap();
    let text = format!(
        r#"[cache]
disk = {{ path = "{}", max_bytes = "64MiB" }}

[upstreams.origin]
url = "http://127.0.0.1:{}"
timeout = "5s"

[[routes]]
name = "items"
path = "/items/{{id}}"
methods = ["GET"]
upstream = "origin"
cache = {{ ttl = "1s", stale_if_error = "60s" }}
"#,
        disk.path().display(),
        origin.port
    );
    let node = StoaProcess::start(&text).await;
    let (first, x, _) = get(&node, "/items/1").await;
    assert_eq!(x, "MISS");
    stop(node).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    origin.failing.store(true, Ordering::SeqCst);
    let node = StoaProcess::start(&text).await;
    let (body, x, status) = get(&node, "/items/1").await;
    assert_eq!((&body, x.as_str()), (&first, "STALE"), "{status}");
    assert!(status.contains("stale-if-error"), "{status}");
    origin.failing.store(false, Ordering::SeqCst);
    let (body, x, _) = get(&node, "/items/1").await;
    assert_eq!(x, "MISS");
    assert_ne!(body, first);
}

#[tokio::test]
async fn a_second_process_on_the_same_directory_refuses_to_start() {
    let origin = Origin::start(Duration::ZERO, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let text = scene(&origin, dir.path(), "", "");
    let first = StoaProcess::start(&text).await;
    let (_, x, _) = get(&first, "/items/1").await;
    assert_eq!(x, "MISS");
    let mut second = StoaProcess::spawn("", &text);
    let status = second
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("a second stoa served the same directory:\n{}", second.log()));
    assert!(!status.success());
    assert!(
        second
            .log()
            .contains("another stoa process uses this directory"),
        "{}",
        second.log()
    );
    // The first one serves on, from disk too.
    let (_, x, _) = get(&first, "/items/1").await;
    assert_eq!(x, "HIT");
    stop(first).await;
    // Its lock went with it: a new process takes the directory and its entries.
    let again = StoaProcess::start(&text).await;
    let (_, x, status) = get(&again, "/items/1").await;
    assert_eq!(x, "HIT", "{status}");
    assert!(status.contains("detail=disk"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_from_the_shared_tier_is_kept_on_this_nodes_disk() {
    let mut redis = common::redis::RedisServer::start();
    let origin = Origin::start(Duration::ZERO, 0).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let redis_url = redis.url();
    let config = |n: usize| {
        format!(
            "{}\n[cluster]\nredis = \"{redis_url}\"\nnode_name = \"node-{n}\"\n",
            scene(&origin, dirs[n].path(), "", ""),
        )
    };
    let mut nodes = vec![
        StoaProcess::start(&config(0)).await,
        StoaProcess::start(&config(1)).await,
    ];
    common::cluster::wait_redis_up(&nodes, true).await;
    let (b, a) = (nodes.pop().unwrap(), nodes.pop().unwrap());
    let (body, x, _) = get(&a, "/items/1").await;
    assert_eq!(x, "MISS");
    // node-1 takes node-0's answer from Redis.
    let (shared, x, status) = get(&b, "/items/1").await;
    assert_eq!((x.as_str(), shared.as_str()), ("MISS", body.as_str()));
    assert!(status.contains("detail=shared-tier"), "{status}");
    assert_eq!(origin.calls(), 1);
    stop(b).await;
    stop(a).await;
    // Without Redis now: node-1's own disk answers after its restart.
    redis.stop();
    let b = StoaProcess::start(&config(1)).await;
    let (again, x, status) = get(&b, "/items/1").await;
    assert_eq!((x.as_str(), again.as_str()), ("HIT", body.as_str()));
    assert!(status.contains("detail=disk"), "{status}");
    assert_eq!(origin.calls(), 1);
}

fn writes(metrics: &str, result: &str) -> f64 {
    sample(
        metrics,
        &format!("stoa_cache_disk_writes_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Waits (10 s at most) until the writes counted as `result` reach `at_least`.
async fn wait_writes(node: &StoaProcess, result: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = node.metrics().await;
        if writes(&metrics, result) >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "writes {result} never reached {at_least}:\n{metrics}\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_directory_that_refuses_writes_costs_writes_not_requests() {
    let origin = Origin::start(Duration::ZERO, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let node = StoaProcess::start(&scene(&origin, dir.path(), "", "")).await;
    get(&node, "/items/1").await;
    wait_writes(&node, "written", 1.0).await;
    // A directory where the writer's probe writes its page: every write there fails, as on
    // a full or failing disk (the tests may run as root, whom permissions do not stop).
    let probe = dir.path().join(".stoa-probe");
    std::fs::create_dir(&probe).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 2..6 {
        let (body, x, _) = get(&node, &format!("/items/{i}")).await;
        assert_eq!(x, "MISS");
        assert!(is_answer_for(&body, &format!("/items/{i}")), "{body}");
    }
    wait_writes(&node, "error", 4.0).await;
    let written = writes(&node.metrics().await, "written");
    // Another probe, still refused: logged once all the same.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    get(&node, "/items/6").await;
    wait_writes(&node, "error", 5.0).await;
    assert_eq!(writes(&node.metrics().await, "written"), written);
    assert_eq!(
        node.log().matches("refuses writes").count(),
        1,
        "{}",
        node.log()
    );
    // Memory serves on.
    let (_, x, _) = get(&node, "/items/3").await;
    assert_eq!(x, "HIT");

    // The directory takes writes again: so does the tier.
    std::fs::remove_dir(&probe).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    get(&node, "/items/7").await;
    wait_writes(&node, "written", written + 1.0).await;
    assert!(node.log().contains("takes writes again"), "{}", node.log());
}
