//! Operations end to end: hot reload, the admin API (purge, refresh, config, cache),
//! invalidation on writes and cache warm-up.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{calls, demo_with, knobs, sample, x_cache, Api, StoaProcess};
use serde_json::{json, Value};

const TOKEN: &str = "test-admin-token-123";
const CUSTOMER: &str = "450e1c2cbd21687780153995f1be0c23";

/// The admin token line (inside `[admin]`), the upstream and routes.
fn restaurant_config(url: &str, list_ttl: &str, extra_routes: &str) -> String {
    format!(
        r#"token = "{TOKEN}"

[upstreams.menus]
url = "{url}"

[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{{id}}"
upstream = "menus"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "60s" }}

[[routes]]
name = "list"
methods = ["GET"]
path = "/restaurants"
upstream = "menus"
rewrite = "/api/restaurant"
cache = {{ ttl = "{list_ttl}" }}
{extra_routes}"#
    )
}

async fn admin_post(
    gw: &StoaProcess,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(gw.admin_url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_keeps_unchanged_entries_and_fails_no_request() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let gw = StoaProcess::start(&restaurant_config(&up.url(), "60s", "")).await;
    let http = reqwest::Client::new();
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/dufva")).send().await.unwrap()),
        "MISS"
    );
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurants")).send().await.unwrap()),
        "MISS"
    );

    // A bounded loop of requests runs through the reload.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (http, url) = (http.clone(), gw.url("/restaurant/dufva"));
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(10) {
                    match http.get(&url).send().await {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The list's TTL changes and a new route appears; the restaurant route is unchanged.
    let new_route = r#"
[[routes]]
name = "index"
methods = ["GET"]
path = "/index"
upstream = "menus"
rewrite = "/api/"
"#;
    gw.rewrite_config(&restaurant_config(&up.url(), "30s", new_route));
    let r = admin_post(&gw, "/admin/reload", Some(TOKEN), None).await;
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert_eq!(
        report["report"]["purged_routes"],
        json!(["list"]),
        "{report}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the reload"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);

    let r = http.get(gw.url("/index")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the new route answers");
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/dufva")).send().await.unwrap()),
        "HIT"
    );
    assert_eq!(
        calls(&up, "GET /api/restaurant/dufva"),
        1,
        "the unchanged route kept its entry"
    );
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurants")).send().await.unwrap()),
        "MISS"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(&metrics, r#"stoa_config_reloads_total{result="ok"}"#),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_changes_nothing_and_lists_every_problem() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let mut gw = StoaProcess::start(&restaurant_config(&up.url(), "60s", "")).await;
    let http = reqwest::Client::new();
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/dufva")).send().await.unwrap()),
        "MISS"
    );

    let broken = restaurant_config(
        &up.url(),
        "forever",
        "\n[[routes]]\nname = \"x\"\npath = \"/x\"\nupstream = \"nowhere\"\n",
    );
    gw.rewrite_config(&broken);
    let r = admin_post(&gw, "/admin/reload", Some(TOKEN), None).await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_config");
    let problems: Vec<String> = serde_json::from_value(v["problems"].clone()).unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("routes[1].cache.ttl: \"forever\"")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("routes[2].upstream: no upstream named \"nowhere\"")),
        "{problems:?}"
    );

    // SIGHUP with the same broken file: refused too, and counted.
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), x_cache(&r).as_str()),
        (200, "HIT"),
        "serving continues unchanged"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(&metrics, r#"stoa_config_reloads_total{result="error"}"#),
        Some(2.0)
    );
    assert!(
        gw.log().contains("routes[2].upstream: no upstream named"),
        "the problems are logged"
    );

    // A good file through SIGHUP is taken.
    gw.rewrite_config(&restaurant_config(&up.url(), "60s", "\n[[routes]]\nname = \"index\"\nmethods = [\"GET\"]\npath = \"/index\"\nupstream = \"menus\"\nrewrite = \"/api/\"\n"));
    gw.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = http.get(gw.url("/index")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP reload never took effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.wait_exit(Duration::from_millis(10)).await.is_none(),
        "still running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_the_token_and_removes_only_what_it_names() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let gw = StoaProcess::start(&restaurant_config(&up.url(), "60s", "")).await;
    let http = reqwest::Client::new();
    for path in ["/restaurant/dufva", "/restaurant/haga", "/restaurants"] {
        assert_eq!(
            x_cache(&http.get(gw.url(path)).send().await.unwrap()),
            "MISS"
        );
    }
    let exact = json!({"request": {"method": "GET", "path": "/restaurant/dufva"}});
    let r = admin_post(&gw, "/admin/purge", None, Some(exact.clone())).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    let r = admin_post(
        &gw,
        "/admin/purge",
        Some("wrong-token-value"),
        Some(exact.clone()),
    )
    .await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/dufva")).send().await.unwrap()),
        "HIT"
    );

    let r = admin_post(&gw, "/admin/purge", Some(TOKEN), Some(exact)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["purged"], 1);
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/dufva")).send().await.unwrap()),
        "MISS"
    );
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/haga")).send().await.unwrap()),
        "HIT",
        "only the purged entry went"
    );

    // By upstream path prefix, then by route.
    let r = admin_post(
        &gw,
        "/admin/purge",
        Some(TOKEN),
        Some(json!({"prefix": "/api/restaurant/"})),
    )
    .await;
    assert_eq!(r.json::<Value>().await.unwrap()["purged"], 2);
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurants")).send().await.unwrap()),
        "HIT"
    );
    let r = admin_post(
        &gw,
        "/admin/purge",
        Some(TOKEN),
        Some(json!({"route": "list"})),
    )
    .await;
    assert_eq!(r.json::<Value>().await.unwrap()["purged"], 1);
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurants")).send().await.unwrap()),
        "MISS"
    );

    let r = admin_post(
        &gw,
        "/admin/purge",
        Some(TOKEN),
        Some(json!({"colour": "red"})),
    )
    .await;
    assert_eq!(r.status(), 400);

    // The cache view and the redacted configuration.
    http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    let cache: Value = gw.admin_json("/admin/cache", TOKEN).await;
    assert_eq!(cache["routes"]["restaurant"]["entries"], 1, "{cache}");
    assert_eq!(cache["entries"], 2, "{cache}");
    assert_eq!(cache["routes"]["list"]["entries"], 1, "{cache}");
    let config: Value = gw.admin_json("/admin/config", TOKEN).await;
    assert_eq!(config["admin"]["token"], "<redacted>");
    assert_eq!(config["routes"][0]["name"], "restaurant");
    assert!(!config.to_string().contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_is_closed() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let config =
        restaurant_config(&up.url(), "60s", "").replace(&format!("token = \"{TOKEN}\""), "");
    let gw = StoaProcess::start(&config).await;
    let r = admin_post(&gw, "/admin/reload", Some(TOKEN), None).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_calls_the_hook_once_and_refetches_while_serving_stale_copies() {
    let clv = demo_with(Api::Clv, knobs(Api::Clv, 300)).await;
    let config = format!(
        r#"token = "{TOKEN}"

[upstreams.clv]
url = "{}"

[[routes]]
name = "clv"
methods = ["GET"]
path = "/get_clv"
upstream = "clv"
cache = {{ ttl = "1h", key_body = ["customer_id"], refresh_hook = "/refresh_data" }}
"#,
        clv.url()
    );
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();
    let get = |customer: &str| {
        http.get(gw.url("/get_clv"))
            .header("content-type", "application/json")
            .body(json!({ "customer_id": customer }).to_string())
            .send()
    };
    let other = stoa_demo::CLV_CUSTOMERS[1];
    let before_a: Value = get(CUSTOMER).await.unwrap().json().await.unwrap();
    let before_b: Value = get(other).await.unwrap().json().await.unwrap();
    assert_eq!(calls(&clv, "GET /get_clv"), 2);

    let r = admin_post(&gw, "/admin/refresh/clv", Some(TOKEN), None).await;
    assert_eq!(r.status(), 202);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["refetching"], 2, "{report}");
    assert_eq!(
        calls(&clv, "GET /refresh_data"),
        1,
        "the refresh hook ran once"
    );

    // While the refetches run (300 ms upstream), clients get the old copies at once.
    let r = get(CUSTOMER).await.unwrap();
    assert_eq!((r.status().as_u16(), x_cache(&r).as_str()), (200, "HIT"));
    assert_eq!(r.json::<Value>().await.unwrap(), before_a);

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now_a: Value = get(CUSTOMER).await.unwrap().json().await.unwrap();
        if now_a != before_a {
            assert_eq!(now_a["clv"], json!([244.7, 89.7]), "the refreshed value");
            break;
        }
        assert!(Instant::now() < deadline, "the entry was never refetched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The two refetches run side by side; the other one may land a moment later.
    loop {
        let now_b: Value = get(other).await.unwrap().json().await.unwrap();
        if now_b != before_b {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other entry was never refetched"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        calls(&clv, "GET /get_clv"),
        4,
        "each cached customer refetched once"
    );
    assert_eq!(calls(&clv, "GET /refresh_data"), 1);

    let r = admin_post(&gw, "/admin/refresh/nope", Some(TOKEN), None).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_writes_invalidate_the_cached_reads_they_change() {
    let orders = demo_with(Api::Orders, knobs(Api::Orders, 0)).await;
    let config = format!(
        r#"
[upstreams.orders]
url = "{}"

[[routes]]
name = "product"
methods = ["GET"]
path = "/products/{{id}}"
upstream = "orders"
cache = {{ ttl = "1h", statuses = {{ 404 = "1h" }} }}

[[routes]]
name = "product-delete"
methods = ["DELETE"]
path = "/products/{{id}}"
upstream = "orders"
invalidates = ["product"]

[[routes]]
name = "orders"
methods = ["GET"]
path = "/orders"
upstream = "orders"
cache = {{ ttl = "1h" }}

[[routes]]
name = "order-create"
methods = ["POST"]
path = "/orders"
upstream = "orders"
invalidates = ["orders"]
"#,
        orders.url()
    );
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();
    assert_eq!(
        x_cache(
            &http
                .get(gw.url("/products/the_odyssey"))
                .send()
                .await
                .unwrap()
        ),
        "MISS"
    );
    assert_eq!(
        x_cache(
            &http
                .get(gw.url("/products/the_odyssey"))
                .send()
                .await
                .unwrap()
        ),
        "HIT"
    );
    let list_before: Value = http
        .get(gw.url("/orders"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        x_cache(&http.get(gw.url("/orders")).send().await.unwrap()),
        "HIT"
    );

    let r = http
        .delete(gw.url("/products/the_odyssey"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = http
        .get(gw.url("/products/the_odyssey"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), x_cache(&r).as_str()),
        (404, "MISS"),
        "the delete purged the cached read"
    );
    assert_eq!(calls(&orders, "GET /products/the_odyssey"), 2);

    let product = orders.stats(); // products other than the deleted one still exist upstream
    assert!(product.total > 0);
    let some_product = json!({"id": "the_argo", "title": "The Argo", "passenger_capacity": 50, "maximum_speed": 9, "in_stock": 3});
    assert!(http
        .post(orders.url() + "/products")
        .json(&some_product)
        .send()
        .await
        .unwrap()
        .status()
        .is_success());
    let r = http
        .post(gw.url("/orders"))
        .json(&json!({"order_details": [{"product_id": "the_argo", "price": "10.00", "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let r = http.get(gw.url("/orders")).send().await.unwrap();
    assert_eq!(
        x_cache(&r),
        "MISS",
        "placing an order purged the cached list"
    );
    let list_after: Value = r.json().await.unwrap();
    assert_ne!(list_after, list_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_holds_readiness_until_the_warm_list_is_cached() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 700)).await;
    let config = format!(
        r#"
[upstreams.menus]
url = "{}"

[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{{id}}"
upstream = "menus"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "1h", warm = ["/restaurant/dufva", "/restaurant/haga"] }}
"#,
        up.url()
    );
    let mut gw = StoaProcess::spawn("", &config);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut saw_warming = false;
    loop {
        assert!(Instant::now() < deadline, "never ready:\n{}", gw.log());
        if let Ok(r) = http.get(gw.admin_url("/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
            let v: Value = r.json().await.unwrap();
            if v["message"] == "warming the cache" {
                saw_warming = true;
                assert_eq!(
                    http.get(gw.admin_url("/healthz"))
                        .send()
                        .await
                        .unwrap()
                        .status(),
                    200
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        saw_warming,
        "/readyz answered 503 while the warm list was fetched"
    );
    gw.wait_ready().await;
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    assert_eq!(x_cache(&r), "HIT", "the first client request is a hit");
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/haga")).send().await.unwrap()),
        "HIT"
    );
    assert_eq!(up.stats().total, 2);
}
