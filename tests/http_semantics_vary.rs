//! Vary without configuration (RFC 9111 §4.1): a route learns the request headers its
//! upstream's answers vary on, keys on their values, and gives every client an answer made
//! with its own. A small origin of the test's own answers in the `Accept-Language` it was
//! asked in and records every request head it gets.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{path_of, sample, serve_heads, text_answer, StoaProcess};
use serde_json::{json, Value};

const TOKEN: &str = "vary-admin-token-0123";

/// An origin answering `/lang/*` (and `/slow/*`, after 300 ms) with `Vary: Accept-Language`
/// and the `Accept-Language` it was asked in as the body (`-` for none), `/star/*` with
/// `Vary: *`. Keeps every request head.
struct Origin {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of header `name` in a request head (`name` in lower case).
fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

impl Origin {
    async fn start() -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let s = seen.clone();
        let task = serve_heads(listener, move |head| {
            let seen = s.clone();
            async move {
                seen.lock().unwrap().push(head.clone());
                let path = path_of(&head);
                let language = header_of(&head, "accept-language").unwrap_or("-".into());
                match path.split('/').nth(1).unwrap_or_default() {
                    "star" => text_answer(200, "Vary: *\r\n", "star"),
                    "slow" => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        text_answer(200, "Vary: Accept-Language\r\n", &language)
                    }
                    _ => text_answer(200, "Vary: Accept-Language\r\n", &language),
                }
            }
        });
        Origin { port, seen, task }
    }

    /// The request heads `path` got, in order.
    fn heads(&self, path: &str) -> Vec<String> {
        let prefix = format!("GET {path} ");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.starts_with(&prefix))
            .cloned()
            .collect()
    }

    fn calls(&self, path: &str) -> usize {
        self.heads(path).len()
    }
}

/// stoa on `origin` with the routes `/v/{*rest}` (ttl 60 s) and `/m/{*rest}` (ttl 60 s,
/// two variants per request), both sent upstream as `/{rest}`; `server` adds `[server]` lines.
async fn stoa_for(origin: &Origin, server: &str) -> StoaProcess {
    let route = |name: &str, cache: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"/{name}/{{*rest}}\"\n\
             upstream = \"o\"\nrewrite = \"/{{rest}}\"\ncache = {cache}\n\n"
        )
    };
    StoaProcess::start_with(
        server,
        &format!(
            "token = \"{TOKEN}\"\n\n[upstreams.o]\nurl = \"http://127.0.0.1:{}\"\ntimeout = \"5s\"\n\n{}{}",
            origin.port,
            route("v", r#"{ ttl = "60s" }"#),
            route("m", r#"{ ttl = "60s", max_variants = 2 }"#),
        ),
    )
    .await
}

/// The status, body and `X-Cache` of a GET of `path` in `language` (none: no header).
async fn get(gw: &StoaProcess, path: &str, language: Option<&str>) -> (u16, String, String) {
    let mut req = reqwest::Client::new().get(gw.url(path));
    if let Some(language) = language {
        req = req.header("accept-language", language);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let x_cache = r.headers()["x-cache"].to_str().unwrap().to_string();
    (status, r.text().await.unwrap(), x_cache)
}

/// The body and `X-Cache` of a 200.
async fn got(gw: &StoaProcess, path: &str, language: Option<&str>) -> (String, String) {
    let (status, body, x_cache) = get(gw, path, language).await;
    assert_eq!(status, 200, "{path} {language:?}: {body}");
    (body, x_cache)
}

fn pair(body: &str, x_cache: &str) -> (String, String) {
    (body.to_string(), x_cache.to_string())
}

async fn purge(gw: &StoaProcess, what: Value) -> Value {
    gw.purge(TOKEN, what).await
}

/// The server lines of the lanes: stoa's front, and pingora's proxy.
const LANES: [(&str, &str); 2] = [("front", ""), ("proxy", "front = false")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_vary_gives_each_client_an_answer_in_its_own_language_on_both_lanes() {
    for (lane, server) in LANES {
        let origin = Origin::start().await;
        let gw = stoa_for(&origin, server).await;
        // The first answer was made without the client's language: stoa learns the header
        // and asks again with it.
        assert_eq!(
            got(&gw, "/v/lang/1", Some("sv")).await,
            pair("sv", "MISS"),
            "{lane}"
        );
        let heads = origin.heads("/lang/1");
        assert_eq!(heads.len(), 2, "{lane}: {heads:#?}");
        assert_eq!(header_of(&heads[0], "accept-language"), None, "{lane}");
        assert_eq!(
            header_of(&heads[1], "accept-language").as_deref(),
            Some("sv"),
            "{lane}"
        );
        assert_eq!(
            got(&gw, "/v/lang/1", Some("sv")).await,
            pair("sv", "HIT"),
            "{lane}"
        );
        // Another language is a new variant: one call, then hits.
        assert_eq!(
            got(&gw, "/v/lang/1", Some("en")).await,
            pair("en", "MISS"),
            "{lane}"
        );
        assert_eq!(origin.calls("/lang/1"), 3, "{lane}");
        assert_eq!(
            origin.heads("/lang/1")[2]
                .to_lowercase()
                .matches("accept-language: en")
                .count(),
            1,
            "{lane}"
        );
        for _ in 0..3 {
            assert_eq!(
                got(&gw, "/v/lang/1", Some("en")).await,
                pair("en", "HIT"),
                "{lane}"
            );
            assert_eq!(
                got(&gw, "/v/lang/1", Some("sv")).await,
                pair("sv", "HIT"),
                "{lane}"
            );
        }
        // The same language written otherwise (case, white space) shares the variant.
        assert_eq!(
            got(&gw, "/v/lang/1", Some(" SV ")).await,
            pair("sv", "HIT"),
            "{lane}"
        );
        // No language is a variant too.
        assert_eq!(
            got(&gw, "/v/lang/1", None).await,
            pair("-", "MISS"),
            "{lane}"
        );
        assert_eq!(
            got(&gw, "/v/lang/1", None).await,
            pair("-", "HIT"),
            "{lane}"
        );
        // Another path of the route keys on the language from its first request on.
        assert_eq!(
            got(&gw, "/v/lang/2", Some("fi")).await,
            pair("fi", "MISS"),
            "{lane}"
        );
        assert_eq!(origin.calls("/lang/2"), 1, "{lane}");
        assert_eq!(origin.calls("/lang/1"), 4, "{lane}");

        let cache = gw.admin_json("/admin/cache", TOKEN).await;
        assert_eq!(
            cache["routes"]["v"]["vary"]["learned"],
            json!(["accept-language"]),
            "{lane}: {cache}"
        );
        assert_eq!(cache["routes"]["v"]["entries"], 4, "{lane}: {cache}");
        assert_eq!(
            cache["routes"]["m"]["vary"],
            json!({"learned": [], "max_learned": 8, "max_variants": 2}),
            "{lane}: {cache}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_cost_one_call_more_than_their_languages() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin, "").await;
    let languages = ["sv", "en", "sv", "fi", "en", "sv", "fi", "sv"];
    let answers =
        futures_util::future::join_all(languages.iter().map(|l| got(&gw, "/v/slow/1", Some(l))))
            .await;
    for (language, (body, _)) in languages.iter().zip(&answers) {
        assert_eq!(body, language);
    }
    // The first answer, then one flight per language.
    assert_eq!(origin.calls("/slow/1"), 1 + 3, "{answers:?}");
    for language in ["sv", "en", "fi"] {
        assert_eq!(
            got(&gw, "/v/slow/1", Some(language)).await,
            pair(language, "HIT")
        );
    }
    assert_eq!(origin.calls("/slow/1"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_star_is_never_stored() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin, "").await;
    for _ in 0..3 {
        let r = reqwest::get(gw.url("/v/star/1")).await.unwrap();
        assert_eq!(r.headers()["x-cache"], "MISS");
        let status = r.headers()["cache-status"].to_str().unwrap().to_string();
        assert!(status.ends_with("detail=vary"), "{status}");
    }
    assert_eq!(origin.calls("/star/1"), 3);
    let cache = gw.admin_json("/admin/cache", TOKEN).await;
    assert_eq!(
        cache["routes"]["v"]["vary"]["learned"],
        json!([]),
        "{cache}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_has_at_most_max_variants_stored() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin, "").await;
    assert_eq!(got(&gw, "/m/lang/1", Some("sv")).await, pair("sv", "MISS"));
    assert_eq!(got(&gw, "/m/lang/1", Some("en")).await, pair("en", "MISS"));
    assert_eq!(origin.calls("/lang/1"), 3);
    // A third language is answered in its language, not stored, and counted.
    for _ in 0..2 {
        let r = reqwest::Client::new()
            .get(gw.url("/m/lang/1"))
            .header("accept-language", "fi")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-cache"], "MISS");
        let status = r.headers()["cache-status"].to_str().unwrap().to_string();
        assert!(status.ends_with("detail=max-variants"), "{status}");
        assert_eq!(r.text().await.unwrap(), "fi");
    }
    assert_eq!(origin.calls("/lang/1"), 5);
    assert_eq!(got(&gw, "/m/lang/1", Some("sv")).await, pair("sv", "HIT"));
    assert_eq!(got(&gw, "/m/lang/1", Some("en")).await, pair("en", "HIT"));
    let metrics = gw.metrics().await;
    let refused = |reason: &str| {
        sample(
            &metrics,
            &format!(r#"stoa_cache_variants_refused_total{{reason="{reason}",route="m"}}"#),
        )
    };
    assert_eq!(refused("max_variants"), Some(2.0), "{metrics}");
    assert_eq!(refused("max_vary_headers"), Some(0.0));
    // Another request of the route has room for its own.
    assert_eq!(got(&gw, "/m/lang/2", Some("fi")).await, pair("fi", "MISS"));
    assert_eq!(got(&gw, "/m/lang/2", Some("fi")).await, pair("fi", "HIT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_request_purge_and_a_route_purge_reach_every_variant() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin, "").await;
    for language in ["sv", "en"] {
        got(&gw, "/v/lang/1", Some(language)).await;
        assert_eq!(got(&gw, "/v/lang/1", Some(language)).await.1, "HIT");
    }
    got(&gw, "/v/lang/2", Some("sv")).await;
    assert_eq!(origin.calls("/lang/1"), 3);

    // The request named without any language: every language of it goes.
    let report = purge(&gw, json!({"request": {"path": "/v/lang/1"}})).await;
    assert_eq!(report["purged"], 2, "{report}");
    assert_eq!(got(&gw, "/v/lang/2", Some("sv")).await, pair("sv", "HIT"));
    for language in ["sv", "en"] {
        assert_eq!(
            got(&gw, "/v/lang/1", Some(language)).await,
            pair(language, "MISS")
        );
    }
    assert_eq!(
        origin.calls("/lang/1"),
        5,
        "learned once: one call per variant"
    );

    let report = purge(&gw, json!({"route": "v"})).await;
    assert_eq!(report["purged"], 3, "{report}");
    for language in ["sv", "en"] {
        assert_eq!(
            got(&gw, "/v/lang/1", Some(language)).await,
            pair(language, "MISS")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_shared_tier_variants_are_shared_and_an_exact_purge_reaches_them_all() {
    let redis = common::redis::RedisServer::start();
    let origin = Origin::start().await;
    let mut nodes = Vec::new();
    for n in 0..2 {
        let rest = format!(
            "token = \"{TOKEN}\"\n\n[cluster]\nredis = \"{}\"\nnode_name = \"node-{n}\"\n\
             command_timeout = \"300ms\"\nconnect_timeout = \"300ms\"\nlock_timeout = \"1s\"\n\n\
             [upstreams.o]\nurl = \"http://127.0.0.1:{}\"\ntimeout = \"5s\"\n\n\
             [[routes]]\nname = \"v\"\nmethods = [\"GET\"]\npath = \"/v/{{*rest}}\"\n\
             upstream = \"o\"\nrewrite = \"/{{rest}}\"\ncache = {{ ttl = \"60s\" }}\n",
            redis.url(),
            origin.port
        );
        nodes.push(StoaProcess::start(&rest).await);
    }
    common::cluster::wait_redis_up(&nodes, true).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(got(a, "/v/lang/1", Some("sv")).await, pair("sv", "MISS"));
    assert_eq!(got(a, "/v/lang/1", Some("en")).await, pair("en", "MISS"));
    assert_eq!(origin.calls("/lang/1"), 3);
    // B learns the header from its own first answer, then finds A's variants in Redis.
    assert_eq!(got(b, "/v/lang/1", Some("sv")).await, pair("sv", "MISS"));
    assert_eq!(got(b, "/v/lang/1", Some("en")).await, pair("en", "MISS"));
    assert_eq!(origin.calls("/lang/1"), 4, "B's learning call only");
    assert_eq!(got(b, "/v/lang/1", Some("en")).await, pair("en", "HIT"));

    let report = purge(a, json!({"request": {"path": "/v/lang/1"}})).await;
    assert_eq!(report["shared"], 2, "both variants left Redis: {report}");
    assert_eq!(report["nodes"]["node-1"], 2, "{report}");
    for (node, language) in [(b, "sv"), (a, "en")] {
        assert_eq!(
            got(node, "/v/lang/1", Some(language)).await,
            pair(language, "MISS")
        );
    }
    assert_eq!(
        origin.calls("/lang/1"),
        6,
        "fetched again, not read from Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_keeps_the_route_keeps_what_it_learned() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin, "").await;
    assert_eq!(got(&gw, "/v/lang/1", Some("sv")).await, pair("sv", "MISS"));
    assert_eq!(origin.calls("/lang/1"), 2);
    let r = reqwest::Client::new()
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cache = gw.admin_json("/admin/cache", TOKEN).await;
    assert_eq!(
        cache["routes"]["v"]["vary"]["learned"],
        json!(["accept-language"]),
        "{cache}"
    );
    assert_eq!(got(&gw, "/v/lang/1", Some("sv")).await, pair("sv", "HIT"));
    assert_eq!(got(&gw, "/v/lang/1", Some("en")).await, pair("en", "MISS"));
    assert_eq!(origin.calls("/lang/1"), 3, "no second learning");
}
