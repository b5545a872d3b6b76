//! Paths never escape a route's rewrite: hostile request targets, sent over raw sockets
//! (HTTP clients would clean them up first), on pass-through, cached and aggregate routes.
//! The upstreams record what they received.

mod common;

use std::sync::{Arc, Mutex};

use common::{demo, raw_request, read_head, Api, RawAnswer, StoaProcess};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// An upstream that records every request target it receives. `GET /api/list` answers a
/// list whose identifiers try to climb out of a path; everything else answers
/// `{"target": "<what was received>"}`.
struct Recorder {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

const HOSTILE_LIST: &str =
    r#"{"items":[{"id":"../../secret"},{"id":"a/b"},{"id":".."},{"id":"."},{"id":"ok"}]}"#;

impl Recorder {
    async fn start() -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // Requests without bodies only (GETs): one head at a time.
                        let Some(end) = read_head(&mut sock, &mut buf).await else {
                            return;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let target = head.split(' ').nth(1).unwrap_or_default().to_string();
                        record.lock().unwrap().push(target.clone());
                        let body = if target == "/api/list" {
                            HOSTILE_LIST.to_string()
                        } else {
                            serde_json::json!({ "target": target }).to_string()
                        };
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Recorder { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The targets received since the last call.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `GET <target>` exactly as written and reads the whole answer.
async fn raw_get(port: u16, target: &str) -> RawAnswer {
    raw_request(port, &format!("GET {target} HTTP/1.1\r\n"), "").await
}

fn routes(upstream_url: &str) -> String {
    format!(
        r#"
[upstreams.up]
url = "{upstream_url}"
connect_timeout = "1s"
timeout = "5s"

[[routes]]
name = "public"
methods = ["GET"]
path = "/api/public/{{*rest}}"
upstream = "up"
rewrite = "/internal/public/{{rest}}"

[[routes]]
name = "cached"
methods = ["GET"]
path = "/c/{{*rest}}"
upstream = "up"
rewrite = "/api/cached/{{rest}}"
cache = {{ ttl = "60s" }}

[[routes]]
name = "list"
methods = ["GET"]
path = "/list"
upstream = "up"
rewrite = "/api/list"
cache = {{ ttl = "60s" }}

[[routes]]
name = "item"
methods = ["GET"]
path = "/item/{{id}}"
upstream = "up"
rewrite = "/api/item/{{id}}"
cache = {{ ttl = "60s" }}

[[routes]]
name = "each"
methods = ["GET"]
path = "/each"
on_leg_error = "partial"

[[routes.legs]]
name = "list"
path = "/list"
pick = "/items"

[[routes.legs]]
name = "items"
path = "/item/{{item.id}}"
for_each = "list"

[[routes]]
name = "one"
methods = ["GET"]
path = "/one"

[[routes.legs]]
name = "thing"
path = "/item/{{query.id}}"
"#
    )
}

/// Every target the upstream received stays under `prefix` and holds no dot segment,
/// encoded dot or encoded separator.
fn assert_all_under(seen: &[String], prefix: &str) {
    for target in seen {
        let path = target.split('?').next().unwrap_or_default();
        assert!(path.starts_with(prefix), "{target} is outside {prefix}");
        let lower = path.to_ascii_lowercase();
        for bad in ["/./", "/../", "//", "%2e", "%2f", "%5c", "\\"] {
            assert!(!lower.contains(bad), "{target} contains {bad}");
        }
        assert!(!path.ends_with("/.") && !path.ends_with("/.."), "{target}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_rest_route_never_fetches_outside_its_rewrite() {
    let up = Recorder::start().await;
    let gw = StoaProcess::start(&routes(&up.url())).await;

    // Climbing above the root, in every spelling: 400, nothing fetched.
    for target in [
        "/c/../../secret",
        "/c/%2e%2e/%2e%2e/secret",
        "/c/%2E%2e/%2e%2E/secret",
        "/c/.%2e/.%2e/secret",
        "/c/x/../../../secret",
    ] {
        raw_get(gw.port, target)
            .await
            .assert_error(400, "bad_path", target);
    }
    // Separators in disguise, bad encodings, NUL: 400, nothing fetched.
    for target in [
        "/c/..%2f..%2fsecret",
        "/c/..%2F..%2Fsecret",
        "/c/..\\..\\secret",
        "/c/..%5c..%5csecret",
        "/c/%c0%ae%c0%ae/secret",
        "/c/%zz",
        "/c/a%00b",
        "/c/..;/secret",
    ] {
        raw_get(gw.port, target)
            .await
            .assert_error(400, "bad_path", target);
    }
    // `/c/..` is `/`, which no route serves: never the upstream's `/api/`.
    for target in ["/c/..", "/c/%2e%2e", "/c/x/../.."] {
        let r = raw_get(gw.port, target).await;
        r.assert_error(404, "not_found", target);
    }
    assert_eq!(up.take(), Vec::<String>::new(), "nothing reached upstream");

    // Within the route, dot segments and repeated slashes resolve to one entry.
    let first = raw_get(gw.port, "/c/x/./y").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.json()["target"], "/api/cached/x/y");
    for target in [
        "/c/x/y",
        "/c/x//y",
        "/c/x/z/../y",
        "/c/x/%2e/%79",
        "/c//x/y",
    ] {
        let r = raw_get(gw.port, target).await;
        assert_eq!(r.status, 200, "{target}: {r:?}");
        assert_eq!(r.header("x-cache"), Some("HIT"), "{target}");
        assert_eq!(r.json()["target"], "/api/cached/x/y", "{target}");
    }
    assert_eq!(up.take(), vec!["/api/cached/x/y".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_rewrite_never_forwards_a_climbing_path() {
    let up = Recorder::start().await;
    let gw = StoaProcess::start(&routes(&up.url())).await;

    // Out of the route once resolved (to `/secret`, which no route serves).
    for target in [
        "/api/public/../../secret",
        "/api/public/%2e%2e/%2e%2e/secret",
        "/api/public/.%2E/.%2E/secret",
    ] {
        raw_get(gw.port, target)
            .await
            .assert_error(404, "not_found", target);
    }
    for target in [
        "/api/public/../../../secret",
        "/api/public/..%2f..%2f..%2fsecret",
        "/api/public/..\\..\\..\\secret",
        "/api/public/%5c..%5csecret",
        "/api/public/a%00",
    ] {
        raw_get(gw.port, target)
            .await
            .assert_error(400, "bad_path", target);
    }
    assert_eq!(up.take(), Vec::<String>::new(), "nothing reached upstream");

    // Inside the route: forwarded in normal form, the query untouched.
    let r = raw_get(gw.port, "/api/public/./a//b/../c?x=../y").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["target"], "/internal/public/a/c?x=../y");
    let r = raw_get(gw.port, "/api/public/%7Euser/caf%c3%a9").await;
    assert_eq!(r.json()["target"], "/internal/public/~user/caf%C3%A9");
    let seen = up.take();
    assert_eq!(seen.len(), 2);
    assert_all_under(&seen, "/internal/public/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restaurant_dot_dot_is_not_the_api_index_and_is_not_cached() {
    let restaurants = demo(Api::Restaurants).await;
    // As in the demo configuration: a cached rewrite and the upstream's own paths.
    let config = format!(
        r#"
[upstreams.restaurants]
url = "{}"

[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{{id}}"
upstream = "restaurants"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "10s", statuses = {{ 404 = "30s" }} }}

[[routes]]
name = "restaurants-api"
methods = ["GET"]
path = "/api/{{*rest}}"
upstream = "restaurants"
"#,
        restaurants.url()
    );
    let gw = StoaProcess::start(&config).await;
    for target in ["/restaurant/..", "/restaurant/%2e%2e", "/restaurant/.%2E"] {
        let r = raw_get(gw.port, target).await;
        r.assert_error(404, "not_found", target);
        assert_eq!(r.header("x-cache"), None, "{target}");
    }
    for target in [
        "/restaurant/../..",
        "/restaurant/..%2f",
        "/restaurant/..%2Fapi",
    ] {
        raw_get(gw.port, target)
            .await
            .assert_error(400, "bad_path", target);
    }
    assert_eq!(restaurants.stats().total, 0, "{:?}", restaurants.stats());
    // Twice more: still not an entry of the restaurant route.
    let r = raw_get(gw.port, "/restaurant/..").await;
    assert_eq!(r.status, 404);
    assert_eq!(restaurants.stats().total, 0);

    // `/restaurant/./dufva` and `/restaurant/dufva` are one entry.
    let r = raw_get(gw.port, "/restaurant/./dufva").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(r.json()["restaurant"]["title"], "Sven Dufva");
    let r = raw_get(gw.port, "/restaurant/dufva").await;
    assert_eq!(r.header("x-cache"), Some("HIT"));
    let r = raw_get(gw.port, "/restaurant/%64ufva").await;
    assert_eq!(r.header("x-cache"), Some("HIT"));
    let stats = restaurants.stats();
    assert_eq!(stats.total, 1, "{stats:?}");
    assert_eq!(stats.paths.get("GET /api/restaurant/dufva"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_legs_cannot_be_steered_by_values() {
    let up = Recorder::start().await;
    let gw = StoaProcess::start(&routes(&up.url())).await;

    // Identifiers from the upstream's own answer: "../../secret", "a/b", "..", "." and "ok".
    let r = raw_get(gw.port, "/each").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["items"][4]["target"], "/api/item/ok", "{v}");
    for i in 0..4 {
        assert_eq!(v["items"][i], Value::Null, "{v}");
        assert!(v["errors"][format!("items[{i}]")].is_string(), "{v}");
    }
    let mut seen = up.take();
    seen.sort();
    assert_eq!(seen, vec!["/api/item/ok", "/api/list"], "{v}");

    // Values from the client's query string are held to the same rule.
    for id in ["..", ".", "%2e%2e", "..%2F..%2Fsecret", "a%2Fb", "a%5Cb"] {
        let target = format!("/one?id={id}");
        let r = raw_get(gw.port, &target).await;
        r.assert_error(502, "upstream_failed", &target);
    }
    assert_eq!(up.take(), Vec::<String>::new(), "nothing reached upstream");
    let r = raw_get(gw.port, "/one?id=ok").await;
    assert_eq!(r.json()["thing"]["target"], "/api/item/ok", "{r:?}");
    assert_all_under(&up.take(), "/api/item/");
}
