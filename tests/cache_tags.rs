//! Cache tags end to end: a real stoa in front of a hand-written origin. Tags come from the
//! route's templates (`cache.tags`) and from the upstream (`Cache-Groups`, kept in the
//! answer; `Surrogate-Key` and `Cache-Tag`, removed from it); `POST /admin/purge
//! {"tags": [...]}` removes (or, soft, marks stale) what carries them; a
//! `Cache-Group-Invalidation` on the answer to an unsafe method invalidates those groups in
//! the cached routes of the same upstream. On both HTTP/1 lanes, and across nodes.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::quoted;
use common::redis::RedisServer;
use common::{path_of, serve_heads, text_answer, x_cache, StoaProcess};

const TOKEN: &str = "tags-token";

/// The upstream: `GET /api/restaurant/<id>` answers `<id>#<calls>` with CDN tag headers;
/// `POST /api/restaurant/<id>/rate` answers 200 with `Cache-Group-Invalidation: "menu-<id>"`;
/// `GET /api/loud` answers with a `Cache-Group-Invalidation` (to be ignored on a GET).
struct TagOrigin {
    port: u16,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl TagOrigin {
    async fn start() -> TagOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counted = calls.clone();
        serve_heads(listener, move |head| {
            let counted = counted.clone();
            async move {
                let method = head.split(' ').next().unwrap_or_default().to_string();
                let path = path_of(&head);
                let n = {
                    let mut calls = counted.lock().unwrap();
                    let n = calls.entry(path.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                tokio::time::sleep(Duration::from_millis(30)).await;
                if method == "POST" {
                    let id = path.split('/').nth(3).unwrap_or_default();
                    let extra = format!("cache-group-invalidation: \"menu-{id}\"\r\n");
                    return text_answer(200, &extra, "rated");
                }
                if path == "/api/loud" {
                    return text_answer(
                        200,
                        "cache-group-invalidation: \"menu-1\"\r\n",
                        &format!("loud#{n}"),
                    );
                }
                let id = path.rsplit('/').next().unwrap_or_default();
                let extra = format!(
                    "surrogate-key: sk-{id} sk-all\r\ncache-tag: ct-{id}, ct-all\r\n\
                     cache-groups: \"menu-{id}\", \"menus\"\r\n"
                );
                text_answer(200, &extra, &format!("{id}#{n}"))
            }
        });
        TagOrigin { port, calls }
    }

    fn calls(&self, path: &str) -> usize {
        *self.calls.lock().unwrap().get(path).unwrap_or(&0)
    }
}

fn config(origin: &TagOrigin, cluster: Option<(&str, &str)>) -> String {
    let cluster = match cluster {
        Some((redis, node)) => format!(
            "[cluster]\nredis = {}\nnode_name = \"{node}\"\ncommand_timeout = \"1s\"\n\n",
            quoted(redis)
        ),
        None => String::new(),
    };
    format!(
        r#"token = "{TOKEN}"

{cluster}[upstreams.menus]
url = "http://127.0.0.1:{port}"

[upstreams.other]
url = "http://127.0.0.1:{port}"

[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{{id}}"
upstream = "menus"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "60s", tags = ["restaurant:{{id}}", "restaurants"] }}

[[routes]]
name = "rate"
methods = ["POST"]
path = "/restaurant/{{id}}/rate"
upstream = "menus"
rewrite = "/api/restaurant/{{id}}/rate"

[[routes]]
name = "loud"
methods = ["GET"]
path = "/loud"
upstream = "menus"
rewrite = "/api/loud"

[[routes]]
name = "mirror"
methods = ["GET"]
path = "/mirror/{{id}}"
upstream = "other"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "60s" }}
"#,
        port = origin.port
    )
}

async fn get(node: &StoaProcess, path: &str) -> (String, String, reqwest::header::HeaderMap) {
    let r = reqwest::get(node.url(path)).await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let x = x_cache(&r);
    let headers = r.headers().clone();
    (r.text().await.unwrap(), x, headers)
}

async fn purge(node: &StoaProcess, body: serde_json::Value) -> serde_json::Value {
    node.purge(TOKEN, body).await
}

async fn warm(node: &StoaProcess, paths: &[&str]) {
    for path in paths {
        get(node, path).await;
        assert_eq!(get(node, path).await.1, "HIT", "{path} is stored");
    }
}

async fn tags_from_templates_and_the_upstream(server: &str) {
    let origin = TagOrigin::start().await;
    let node = StoaProcess::start_with(server, &config(&origin, None)).await;
    let (body, _, headers) = get(&node, "/restaurant/1").await;
    assert_eq!(body, "1#1");
    // The CDN fields are for caches; Cache-Groups goes on (RFC 9875).
    assert!(headers.get("surrogate-key").is_none(), "{headers:?}");
    assert!(headers.get("cache-tag").is_none(), "{headers:?}");
    assert_eq!(headers["cache-groups"], "\"menu-1\", \"menus\"");
    let hit = get(&node, "/restaurant/1").await;
    assert!(hit.2.get("surrogate-key").is_none() && hit.2.get("cache-tag").is_none());

    // Each kind of tag reaches exactly the entries carrying it.
    for (tag, gone, kept) in [
        ("restaurant:1", "/restaurant/1", "/restaurant/2"),
        ("sk-2", "/restaurant/2", "/restaurant/1"),
        ("ct-1", "/restaurant/1", "/restaurant/2"),
        ("menu-2", "/restaurant/2", "/restaurant/1"),
    ] {
        warm(&node, &["/restaurant/1", "/restaurant/2"]).await;
        let report = purge(&node, serde_json::json!({ "tags": [tag] })).await;
        assert_eq!(report["purged"], 1, "{tag}: {report}");
        assert_eq!(get(&node, gone).await.1, "MISS", "{tag}");
        assert_eq!(get(&node, kept).await.1, "HIT", "{tag}");
    }
    // A tag every entry of the route carries, and a tag restricted to one route.
    warm(&node, &["/restaurant/1", "/restaurant/2", "/mirror/1"]).await;
    let report = purge(&node, serde_json::json!({ "tags": ["restaurants"] })).await;
    assert_eq!(report["purged"], 2, "{report}");
    assert_eq!(get(&node, "/mirror/1").await.1, "HIT");
    warm(&node, &["/restaurant/1"]).await;
    let report = purge(
        &node,
        serde_json::json!({ "tags": ["sk-all"], "route": "mirror" }),
    )
    .await;
    assert_eq!(report["purged"], 1, "{report}");
    assert_eq!(get(&node, "/mirror/1").await.1, "MISS");
    assert_eq!(get(&node, "/restaurant/1").await.1, "HIT");
}

#[tokio::test]
async fn tags_from_templates_and_the_upstream_on_the_front() {
    tags_from_templates_and_the_upstream("").await;
}

#[tokio::test]
async fn tags_from_templates_and_the_upstream_on_the_proxy_lane() {
    tags_from_templates_and_the_upstream("front = false").await;
}

async fn group_invalidation(server: &str) {
    let origin = TagOrigin::start().await;
    let node = StoaProcess::start_with(server, &config(&origin, None)).await;
    warm(&node, &["/restaurant/1", "/restaurant/2", "/mirror/1"]).await;
    // On a GET's answer it is ignored.
    let (body, _, headers) = get(&node, "/loud").await;
    assert_eq!(body, "loud#1");
    assert!(headers.get("cache-group-invalidation").is_some());
    assert_eq!(get(&node, "/restaurant/1").await.1, "HIT");
    // On a POST's answer it invalidates the group, in the routes of the same upstream only,
    // before the answer reaches the client.
    let r = reqwest::Client::new()
        .post(node.url("/restaurant/1/rate"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&node, "/restaurant/1").await.1, "MISS");
    assert_eq!(get(&node, "/restaurant/2").await.1, "HIT");
    assert_eq!(get(&node, "/mirror/1").await.1, "HIT", "another upstream");
    assert_eq!(origin.calls("/api/restaurant/1"), 3);
}

#[tokio::test]
async fn cache_group_invalidation_on_a_write_on_the_front() {
    group_invalidation("").await;
}

#[tokio::test]
async fn cache_group_invalidation_on_a_write_on_the_proxy_lane() {
    group_invalidation("front = false").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soft_tag_purge_of_a_hot_key_under_load_costs_one_upstream_call() {
    let origin = TagOrigin::start().await;
    let node = StoaProcess::start(&config(&origin, None)).await;
    warm(&node, &["/restaurant/7"]).await;
    assert_eq!(origin.calls("/api/restaurant/7"), 1);
    let http = reqwest::Client::new();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..16)
        .map(|_| {
            let (http, url, stop) = (http.clone(), node.url("/restaurant/7"), stop.clone());
            tokio::spawn(async move {
                let mut seen = HashMap::<String, usize>::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http.get(&url).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let x = x_cache(&r);
                    let body = r.text().await.unwrap();
                    *seen.entry(format!("{x} {body}")).or_default() += 1;
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = purge(
        &node,
        serde_json::json!({ "tags": ["restaurant:7"], "soft": true }),
    )
    .await;
    assert_eq!(report["purged"], 1, "{report}");
    assert_eq!(report["soft"], true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = HashMap::<String, usize>::new();
    for task in load {
        for (k, n) in task.await.unwrap() {
            *seen.entry(k).or_default() += n;
        }
    }
    assert_eq!(
        origin.calls("/api/restaurant/7"),
        2,
        "one revalidation: {seen:?}"
    );
    assert!(seen.contains_key("STALE 7#1"), "{seen:?}");
    assert!(seen.contains_key("HIT 7#2"), "{seen:?}");
    assert!(
        seen.keys()
            .all(|k| k == "HIT 7#1" || k == "STALE 7#1" || k == "HIT 7#2"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_purge_on_one_node_reaches_every_node_and_redis() {
    let redis = RedisServer::start();
    let origin = TagOrigin::start().await;
    let mut nodes = Vec::new();
    for n in 0..3 {
        let text = config(&origin, Some((&redis.url(), &format!("node-{n}"))));
        nodes.push(StoaProcess::start(&text).await);
    }
    common::cluster::wait_redis_up(&nodes, true).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for node in &nodes {
        warm(node, &["/restaurant/1", "/restaurant/2"]).await;
    }
    assert_eq!(
        origin.calls("/api/restaurant/1"),
        1,
        "one fill cluster-wide"
    );
    let report = purge(&nodes[1], serde_json::json!({ "tags": ["menu-1"] })).await;
    assert_eq!(report["shared"], 1, "{report}");
    for n in 0..3 {
        assert_eq!(report["nodes"][format!("node-{n}")], 1, "{report}");
    }
    assert!(report.get("unconfirmed").is_none(), "{report}");
    for node in &nodes {
        assert_eq!(get(node, "/restaurant/2").await.1, "HIT");
    }
    let answers: Vec<String> = {
        let mut out = Vec::new();
        for node in &nodes {
            out.push(get(node, "/restaurant/1").await.0);
        }
        out
    };
    assert_eq!(answers, ["1#2", "1#2", "1#2"], "refetched once, shared");
    assert_eq!(origin.calls("/api/restaurant/1"), 2);
}
