//! End to end: the real gateway binary in front of real demo upstreams, over HTTP.

mod common;

use std::time::{Duration, Instant};

use common::{demo, demo_with, Api, EchoUpstream, Knobs, StoaProcess};
use serde_json::{json, Value};

const CLV_CUSTOMER: &str = "450e1c2cbd21687780153995f1be0c23";

fn upstream(name: &str, url: &str) -> String {
    format!("[upstreams.{name}]\nurl = \"{url}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n\n")
}

fn route(name: &str, methods: &str, path: &str, upstream: &str, rewrite: Option<&str>) -> String {
    let rewrite = rewrite
        .map(|r| format!("rewrite = \"{r}\"\n"))
        .unwrap_or_default();
    format!(
        "[[routes]]\nname = \"{name}\"\nmethods = {methods}\npath = \"{path}\"\nupstream = \"{upstream}\"\n{rewrite}\n"
    )
}

async fn json_of(r: reqwest::Response) -> Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

async fn assert_json_error(r: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let v = json_of(r).await;
    assert_eq!(v["error"], kind, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_seed_api_works_through_the_gateway() {
    let restaurants = demo(Api::Restaurants).await;
    let clv = demo_with(
        Api::Clv,
        Knobs {
            latency_ms: 20,
            ..Knobs::default_for(Api::Clv)
        },
    )
    .await;
    let voucher = demo(Api::Voucher).await;
    let orders = demo(Api::Orders).await;
    let campaigns = demo(Api::Campaigns).await;
    let config = [
        upstream("restaurants", &restaurants.url()),
        upstream("clv", &clv.url()),
        upstream("voucher", &voucher.url()),
        upstream("orders", &orders.url()),
        upstream("campaigns", &campaigns.url()),
        route(
            "restaurants",
            r#"["GET"]"#,
            "/restaurants",
            "restaurants",
            Some("/api/restaurant"),
        ),
        route(
            "restaurant",
            r#"["GET"]"#,
            "/restaurant/{id}",
            "restaurants",
            Some("/api/restaurant/{id}"),
        ),
        route("clv", r#"["GET"]"#, "/get_clv", "clv", None),
        route("voucher", r#"["POST"]"#, "/api/v1/voucher", "voucher", None),
        route(
            "product",
            r#"["GET", "DELETE"]"#,
            "/products/{id}",
            "orders",
            None,
        ),
        route("products", r#"["POST"]"#, "/products", "orders", None),
        route("orders", r#"["GET", "POST"]"#, "/orders", "orders", None),
        route("order", r#"["GET"]"#, "/orders/{id}", "orders", None),
        route(
            "campaign",
            r#"["GET"]"#,
            "/campaigns/{id}/",
            "campaigns",
            None,
        ),
    ]
    .concat();
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();

    // Restaurants: URI rewrite to the upstream's /api/ paths.
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(v["restaurant"]["title"], "Sven Dufva");
    assert_eq!(
        restaurants.stats().paths.get("GET /api/restaurant/dufva"),
        Some(&1)
    );
    let v = json_of(http.get(gw.url("/restaurants")).send().await.unwrap()).await;
    assert_eq!(v["restaurants"].as_array().unwrap().len(), 13);
    // The upstream's own 404 passes through unchanged.
    let r = http
        .get(gw.url("/restaurant/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(json_of(r).await, json!({"detail": "Restaurant not found"}));

    // CLV: GET with a JSON body.
    let r = http
        .get(gw.url("/get_clv"))
        .header("content-type", "application/json")
        .body(json!({ "customer_id": CLV_CUSTOMER }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["clv"], json!([244.9, 89.9]));

    // Voucher: POST JSON, and the upstream's 422 passes through.
    let body = json!({"customer_id": 123, "country_code": "Peru",
        "last_order_ts": "2021-10-26 00:00:00", "first_order_ts": "2021-10-26 00:00:00",
        "total_orders": 14, "segment_name": "frequent_segment"});
    let r = http
        .post(gw.url("/api/v1/voucher"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await, json!({"voucher": 2640}));
    let r = http
        .post(gw.url("/api/v1/voucher"))
        .json(&json!({"customer_id": 123}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    // Products and orders: writes go through, DELETE answers 204 and really deletes.
    let product = json!({"id": "the_argo", "title": "The Argo", "passenger_capacity": 50,
        "maximum_speed": 9, "in_stock": 3});
    let r = http
        .post(gw.url("/products"))
        .json(&product)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let v = json_of(http.get(gw.url("/products/the_argo")).send().await.unwrap()).await;
    assert_eq!(v["title"], "The Argo");
    let r = http
        .post(gw.url("/orders"))
        .json(&json!({"order_details": [{"product_id": "the_argo", "price": "10.50", "quantity": 2}]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let id = json_of(r).await["id"].as_u64().unwrap();
    let v = json_of(
        http.get(gw.url(&format!("/orders/{id}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["order_details"][0]["product_id"], "the_argo");
    let r = http
        .delete(gw.url("/products/the_argo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = http.get(gw.url("/products/the_argo")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(json_of(r).await["error"], "PRODUCT_NOT_FOUND");

    // Campaigns: cookie-bearing HTML; the client's cookie reaches the upstream and the
    // upstream's Set-Cookie reaches the client.
    let r = http.get(gw.url("/campaigns/1/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let mut cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let mut last = banner_of(&r.text().await.unwrap());
    for _ in 0..10 {
        let pair = cookie.split(';').next().unwrap().to_string();
        let r = http
            .get(gw.url("/campaigns/1/"))
            .header("cookie", &pair)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
        let banner = banner_of(&r.text().await.unwrap());
        assert_ne!(
            banner, last,
            "the upstream saw the cookie and never repeats a banner"
        );
        last = banner;
    }
    let r = http.get(gw.url("/campaigns/999/")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

fn banner_of(html: &str) -> String {
    let start = html.find("image_").expect("no banner image in page");
    html[start..].split('.').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_rewritten_uri_query_host_forwarding_headers_and_body() {
    let echo = EchoUpstream::start().await;
    let config = [
        upstream("echo", &echo.url()),
        route(
            "item",
            r#"["GET", "POST"]"#,
            "/items/{id}",
            "echo",
            Some("/api/v2/item/{id}"),
        ),
        route(
            "rest",
            "[\"GET\"]",
            "/files/{*path}",
            "echo",
            Some("/static/{path}"),
        ),
    ]
    .concat();
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();

    let v = json_of(
        http.get(gw.url("/items/42?b=2&a=1&a=0"))
            .header("x-forwarded-for", "10.1.2.3")
            .header("content-type", "application/json")
            .body(r#"{ "customer_id" : "a" }"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["method"], "GET");
    assert_eq!(v["target"], "/api/v2/item/42?b=2&a=1&a=0");
    assert_eq!(v["headers"]["host"], echo.addr.to_string());
    assert_eq!(v["headers"]["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(v["headers"]["x-forwarded-proto"], "http");
    assert_eq!(
        v["body"], r#"{ "customer_id" : "a" }"#,
        "bodies pass untouched"
    );

    let v = json_of(
        http.get(gw.url("/files/css/site.css"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["target"], "/static/css/site.css");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_json() {
    let echo = EchoUpstream::start().await;
    let config = format!(
        "{}{}",
        upstream("echo", &echo.url()),
        route("post", r#"["POST"]"#, "/post", "echo", None)
    );
    // The harness writes [server] itself; override the limit from the environment instead.
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();
    // Default limit is 1 MiB.
    let big = vec![b'x'; 1024 * 1024 + 1];
    let r = http
        .post(gw.url("/post"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_json_error(r, 413, "payload_too_large").await;

    // A chunked body (no Content-Length) is counted as it streams.
    let stream = futures_stream(big);
    let r = http
        .post(gw.url("/post"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_json_error(r, 413, "payload_too_large").await;

    // Under the limit it goes through.
    let r = http
        .post(gw.url("/post"))
        .body("small")
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await["body"], "small");
}

fn futures_stream(
    data: Vec<u8>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        data.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    tokio_stream::iter(chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_wrong_methods_get_json_errors() {
    let restaurants = demo(Api::Restaurants).await;
    let config = [
        upstream("restaurants", &restaurants.url()),
        route(
            "restaurant",
            r#"["GET"]"#,
            "/restaurant/{id}",
            "restaurants",
            Some("/api/restaurant/{id}"),
        ),
        route(
            "restaurant-delete",
            r#"["DELETE"]"#,
            "/restaurant/{id}",
            "restaurants",
            Some("/api/restaurant/{id}"),
        ),
    ]
    .concat();
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();

    let r = http.get(gw.url("/nope")).send().await.unwrap();
    let v = assert_json_error(r, 404, "not_found").await;
    assert!(v["message"].as_str().unwrap().contains("/nope"));

    let r = http
        .post(gw.url("/restaurant/dufva"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["allow"], "GET, HEAD, DELETE");
    assert_json_error(r, 405, "method_not_allowed").await;
    assert_eq!(restaurants.stats().total, 0, "nothing reached the upstream");

    // The connection stays usable after stoa's own errors.
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_gives_502_json() {
    let gone = demo(Api::Restaurants).await;
    let url = gone.url();
    drop(gone);
    let config = format!(
        "{}{}",
        upstream("restaurants", &url),
        route(
            "restaurant",
            r#"["GET"]"#,
            "/restaurant/{id}",
            "restaurants",
            None
        )
    );
    let gw = StoaProcess::start(&config).await;
    let r = reqwest::get(gw.url("/restaurant/dufva")).await.unwrap();
    let v = assert_json_error(r, 502, "upstream_unreachable").await;
    assert!(
        v["message"].as_str().unwrap().contains("restaurants"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_drops_the_connection_gives_502_json() {
    let flaky = demo_with(
        Api::Restaurants,
        Knobs {
            drop_rate: 1.0,
            ..Knobs::default_for(Api::Restaurants)
        },
    )
    .await;
    let config = format!(
        "{}{}",
        upstream("restaurants", &flaky.url()),
        route(
            "restaurant",
            r#"["GET"]"#,
            "/restaurant/{id}",
            "restaurants",
            None
        )
    );
    let gw = StoaProcess::start(&config).await;
    let r = reqwest::get(gw.url("/restaurant/dufva")).await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(flaky.stats().total >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_hangs_gives_504_json_within_the_timeout() {
    let hung = demo_with(
        Api::Restaurants,
        Knobs {
            latency_ms: 3_600_000,
            ..Knobs::default_for(Api::Restaurants)
        },
    )
    .await;
    let config = format!(
        "[upstreams.slow]\nurl = \"{}\"\ntimeout = \"300ms\"\n\n{}",
        hung.url(),
        route("restaurant", r#"["GET"]"#, "/restaurant/{id}", "slow", None)
    );
    let gw = StoaProcess::start(&config).await;
    let started = Instant::now();
    let r = reqwest::get(gw.url("/restaurant/dufva")).await.unwrap();
    let elapsed = started.elapsed();
    let v = assert_json_error(r, 504, "upstream_timeout").await;
    assert!(v["message"].as_str().unwrap().contains("300 ms"), "{v}");
    assert!(
        elapsed >= Duration::from_millis(290) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_then_exits_0() {
    let slow = demo_with(
        Api::Restaurants,
        Knobs {
            latency_ms: 1_500,
            ..Knobs::default_for(Api::Restaurants)
        },
    )
    .await;
    let config = format!(
        "{}{}",
        upstream("restaurants", &slow.url()),
        route(
            "restaurant",
            r#"["GET"]"#,
            "/restaurant/{id}",
            "restaurants",
            Some("/api/restaurant/{id}")
        )
    );
    let mut gw = StoaProcess::start(&config).await;
    let in_flight = tokio::spawn({
        let url = gw.url("/restaurant/dufva");
        async move { reqwest::get(url).await }
    });
    // Let the request reach the upstream, then ask stoa to stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while slow.stats().in_flight == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(slow.stats().in_flight, 1);
    gw.signal(libc::SIGTERM);

    // While draining, readiness is withdrawn so load balancers stop sending.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = reqwest::get(gw.admin_url("/readyz")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        reqwest::get(gw.admin_url("/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );

    let r = in_flight
        .await
        .unwrap()
        .expect("the in-flight request was cut off");
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["restaurant"]["title"], "Sven Dufva");
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("stoa did not exit:\n{}", gw.log()));
    assert_eq!(status.code(), Some(0), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_also_shuts_down_gracefully() {
    let restaurants = demo(Api::Restaurants).await;
    let config = format!(
        "{}{}",
        upstream("restaurants", &restaurants.url()),
        route(
            "restaurant",
            r#"["GET"]"#,
            "/restaurant/{id}",
            "restaurants",
            None
        )
    );
    let mut gw = StoaProcess::start(&config).await;
    gw.signal(libc::SIGINT);
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("no exit");
    assert_eq!(status.code(), Some(0), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_endpoints() {
    let restaurants = demo(Api::Restaurants).await;
    let config = format!(
        "{}{}",
        upstream("restaurants", &restaurants.url()),
        route(
            "restaurant",
            r#"["GET"]"#,
            "/restaurant/{id}",
            "restaurants",
            None
        )
    );
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();
    let r = http.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["status"], "ok");
    let r = http.get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.post(gw.admin_url("/healthz")).send().await.unwrap();
    assert_json_error(r, 405, "method_not_allowed").await;
    let r = http.get(gw.admin_url("/nope")).send().await.unwrap();
    assert_json_error(r, 404, "not_found").await;
}
