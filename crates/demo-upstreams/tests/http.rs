//! End-to-end tests: start demo servers on port 0 and talk HTTP to them.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use stoa_demo::{Api, DemoServer, Knobs, Stats, CLV_CUSTOMERS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start(api: Api) -> DemoServer {
    DemoServer::start(api, any_port(), Knobs::default())
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[tokio::test]
async fn restaurants_answer_like_the_real_api() {
    let server = start(Api::Restaurants).await;
    let http = client();
    let base = server.url();

    let index: Value = http
        .get(format!("{base}/api/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        index,
        json!({"entities": ["restaurant"], "url": format!("{base}/api/")})
    );

    let list: Value = http
        .get(format!("{base}/api/restaurant"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["restaurants"].as_array().unwrap().len(), 13);
    assert_eq!(list["url"], format!("{base}/api/restaurant"));

    let response = http
        .get(format!("{base}/api/restaurant/dufva"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = response.text().await.unwrap();
    assert!(body.starts_with(r#"{"restaurant":{"location":"Uppsala","map_url":"https://www.openstreetmap.org/#map=19/59.84298/17.64096","menu":[{"dish":"#));
    assert!(body.ends_with(&format!(r#""title":"Sven Dufva","url":"http://svendufva.se/"}},"url":"{base}/api/restaurant/dufva"}}"#)));

    let with_host = http
        .get(format!("{base}/api/restaurant/hjulet"))
        .header("host", "menus.example:80")
        .send()
        .await
        .unwrap();
    let with_host: Value = with_host.json().await.unwrap();
    assert_eq!(with_host["restaurant"]["menu"], json!([]));
    assert_eq!(
        with_host["url"],
        "http://menus.example:80/api/restaurant/hjulet"
    );

    let missing = http
        .get(format!("{base}/api/restaurant/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.json::<Value>().await.unwrap(),
        json!({"detail": "Restaurant not found"})
    );

    let unmatched = http.get(format!("{base}/elsewhere")).send().await.unwrap();
    assert_eq!(unmatched.status(), StatusCode::NOT_FOUND);

    // Control endpoints are not counted.
    let stats: Stats = http
        .get(format!("{base}/__stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, server.stats());
    assert_eq!(stats.total, 6);
    assert_eq!(stats.routes["GET /api/restaurant/{id}"], 3);
    assert_eq!(stats.routes["GET /api/restaurant"], 1);
    assert_eq!(stats.routes["GET /api/"], 1);
    assert_eq!(stats.routes["GET <unmatched>"], 1);
    assert_eq!(stats.paths["GET /api/restaurant/dufva"], 1);
    assert_eq!(stats.paths["GET /api/restaurant/nope"], 1);
    assert_eq!((stats.in_flight, stats.max_in_flight), (0, 1));

    let reset = http
        .post(format!("{base}/__stats/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), StatusCode::NO_CONTENT);
    assert_eq!(server.stats(), Stats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_are_exact_under_concurrency() {
    let server = start(Api::Restaurants).await;
    let http = client();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let http = http.clone();
            let id = ["dufva", "bikupan", "glada", "haga"][i % 4];
            let url = format!("{}/api/restaurant/{id}", server.url());
            tokio::spawn(async move { http.get(url).send().await.unwrap().status() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let stats = server.stats();
    assert_eq!(stats.total, 200);
    assert_eq!(stats.routes["GET /api/restaurant/{id}"], 200);
    assert_eq!(stats.paths["GET /api/restaurant/dufva"], 50);
    assert_eq!(stats.paths.values().sum::<u64>(), 200);
    assert_eq!(stats.in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_with_latency() {
    let knobs = Knobs {
        latency_ms: 1_000,
        ..Knobs::default()
    };
    let server = DemoServer::start(Api::Voucher, any_port(), knobs)
        .await
        .unwrap();
    let http = client();
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..25)
        .map(|_| {
            let request = http.get(format!("{}/healthz", server.url()));
            tokio::spawn(async move { request.send().await.unwrap().status() })
        })
        .collect();
    // All 25 end up sleeping at once (a tokio sleep never holds a thread).
    while server.stats().in_flight < 25 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.stats().in_flight, 25);
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "latency must not serialize requests"
    );
    let stats = server.stats();
    assert_eq!(
        (stats.total, stats.in_flight, stats.max_in_flight),
        (25, 0, 25)
    );
    server.reset_stats();
    assert_eq!(server.stats().max_in_flight, 0);
}

#[tokio::test]
async fn drop_rate_closes_the_connection_without_a_response() {
    let server = start(Api::Restaurants).await;
    server.set_knobs(Knobs {
        drop_rate: 1.0,
        ..Knobs::default()
    });
    let err = client()
        .get(format!("{}/api/restaurant/dufva", server.url()))
        .send()
        .await
        .expect_err("a dropped connection must not produce a response");
    assert!(err.status().is_none());

    // Byte level: not a single response byte comes back.
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream
        .write_all(b"GET /api/restaurant/dufva HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(received.is_empty());

    // Dropped requests are counted; control endpoints keep working.
    assert_eq!(server.stats().total, 2);
    let knobs: Knobs = client()
        .put(format!("{}/__knobs", server.url()))
        .json(&json!({"drop_rate": 0.0, "error_rate": 1.0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        knobs,
        Knobs {
            error_rate: 1.0,
            ..Knobs::default()
        }
    );
    let failed = client()
        .get(format!("{}/api/", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        failed.text().await.unwrap(),
        r#"{"error":"INTERNAL","message":"injected failure"}"#
    );
}

#[tokio::test]
async fn knobs_endpoint_validates() {
    let server = start(Api::Orders).await;
    let http = client();
    let url = format!("{}/__knobs", server.url());
    let current: Knobs = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(current, Knobs::default());
    for bad in [r#"{"error_rate":2}"#, r#"{"latency":5}"#, "nope"] {
        let response = http.put(&url).body(bad).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "BAD_REQUEST");
    }
    let updated: Knobs = http
        .put(&url)
        .body(r#"{"latency_ms":7}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(updated.latency_ms, 7);
    assert_eq!(server.knobs(), updated);
    assert_eq!(server.stats().total, 0);
}

#[tokio::test]
async fn dropping_the_server_refuses_connections() {
    let server = start(Api::Restaurants).await;
    let addr = server.addr();
    // A pooled keep-alive connection exists before the drop.
    let http = client();
    let url = format!("{}/api/", server.url());
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    drop(server);
    let err = TcpStream::connect(addr)
        .await
        .expect_err("port must be closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(http.get(&url).send().await.is_err());

    // The port can be taken again (the upstream "comes back").
    let again = DemoServer::start(Api::Restaurants, addr, Knobs::default())
        .await
        .unwrap();
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    again.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_hanging_server_on_a_multi_thread_runtime() {
    let server = DemoServer::start(
        Api::Clv,
        any_port(),
        Knobs {
            latency_ms: 3_600_000,
            ..Knobs::default()
        },
    )
    .await
    .unwrap();
    let addr = server.addr();
    let request = client()
        .get(format!("{}/get_clv", server.url()))
        .json(&json!({"customer_id": CLV_CUSTOMERS[0]}))
        .send();
    let pending = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.stats().in_flight, 1);
    drop(server);
    assert!(TcpStream::connect(addr).await.is_err());
    let result = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the hanging request ends once the server is dropped")
        .unwrap();
    assert!(result.is_err());
}

#[tokio::test]
async fn clv_model_and_refresh() {
    let server = start(Api::Clv).await;
    let http = client();
    let get_clv = |customer: &str| {
        http.get(format!("{}/get_clv", server.url()))
            .header("content-type", "application/json")
            .body(format!(r#"{{"customer_id": "{customer}"}}"#))
            .send()
    };
    let example: Value = get_clv(CLV_CUSTOMERS[0])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        example,
        json!({"customer_id": "450e1c2cbd21687780153995f1be0c23", "clv": [244.9, 89.9]})
    );
    let other = get_clv(CLV_CUSTOMERS[5]).await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    let unknown = get_clv("ffffffffffffffffffffffffffffffff").await.unwrap();
    assert_eq!(unknown.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        unknown.json::<Value>().await.unwrap(),
        json!({"detail": "customer not found"})
    );
    for body in ["", "{", r#"{"customer":"x"}"#] {
        let bad = http
            .get(format!("{}/get_clv", server.url()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), StatusCode::INTERNAL_SERVER_ERROR, "{body:?}");
        assert_eq!(bad.json::<Value>().await.unwrap()["status"], 500);
    }

    let refreshed: Value = http
        .get(format!("{}/refresh_data", server.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refreshed, json!({"code": 200, "message": "OK"}));
    let after: Value = get_clv(CLV_CUSTOMERS[0])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(after["clv"], json!([244.7, 89.7]));
    assert_eq!(server.stats().routes["GET /refresh_data"], 1);
    assert_eq!(server.stats().routes["GET /get_clv"], 7);
}

#[tokio::test]
async fn voucher_example_and_validation() {
    let server = start(Api::Voucher).await;
    let http = client();
    let url = format!("{}/api/v1/voucher", server.url());
    let health: Value = http
        .get(format!("{}/healthz", server.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, json!({"status": "ok"}));
    let example = json!({"customer_id": 123, "country_code": "Peru","last_order_ts": "2021-10-26 00:00:00",
        "first_order_ts": "2021-10-26 00:00:00", "total_orders": 14, "segment_name": "frequent_segment"});
    let answer: Value = http
        .post(&url)
        .json(&example)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer, json!({"voucher": 2640}));

    let bad = http
        .post(&url)
        .json(&json!({"customer_id": 1, "country_code": "Chile", "total_orders": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = bad.json().await.unwrap();
    let locs: Vec<_> = body["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| error["loc"][1].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        locs,
        [
            "country_code",
            "last_order_ts",
            "first_order_ts",
            "segment_name"
        ]
    );
    assert_eq!(body["detail"][0]["type"], "value_error");

    let wrong_method = http.get(&url).send().await.unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        wrong_method.json::<Value>().await.unwrap(),
        json!({"detail": "Method Not Allowed"})
    );
    assert_eq!(server.stats().routes["GET /api/v1/voucher"], 1);
}

#[tokio::test]
async fn orders_store_really_changes() {
    let server = start(Api::Orders).await;
    let http = client();
    let base = server.url();

    let odyssey: Value = http
        .get(format!("{base}/products/the_odyssey"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        odyssey,
        json!({"id":"the_odyssey","title":"The Odyssey","passenger_capacity":101,"maximum_speed":5,"in_stock":10})
    );

    let product = json!({"id":"the_zephyr","title":"The Zephyr","passenger_capacity":20,"maximum_speed":40,"in_stock":4});
    let created = http
        .post(format!("{base}/products"))
        .json(&product)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::OK);
    assert_eq!(
        created.json::<Value>().await.unwrap(),
        json!({"id": "the_zephyr"})
    );
    let invalid = http
        .post(format!("{base}/products"))
        .json(&json!({"id":"x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        invalid.json::<Value>().await.unwrap()["error"],
        "VALIDATION_ERROR"
    );
    let not_json = http
        .post(format!("{base}/products"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(
        not_json.json::<Value>().await.unwrap()["error"],
        "BAD_REQUEST"
    );

    let order =
        json!({"order_details":[{"product_id":"the_zephyr","price":"100000.99","quantity":1}]});
    let order_id: Value = http
        .post(format!("{base}/orders"))
        .json(&order)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(order_id, json!({"id": 1}));
    let unknown_product = json!({"order_details":[{"product_id":"nope","price":"1","quantity":1}]});
    let rejected = http
        .post(format!("{base}/orders"))
        .json(&unknown_product)
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        rejected.json::<Value>().await.unwrap()["error"],
        "PRODUCT_NOT_FOUND"
    );

    let fetched: Value = http
        .get(format!("{base}/orders/1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        fetched,
        json!({"id":1,"order_details":[{"id":1,"product_id":"the_zephyr","price":"100000.99","quantity":1,
            "image":"http://www.example.com/airship/images/the_zephyr.jpg",
            "product":{"id":"the_zephyr","title":"The Zephyr","passenger_capacity":20,"maximum_speed":40,"in_stock":3}}]})
    );

    let deleted = http
        .delete(format!("{base}/products/the_zephyr"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert!(deleted.bytes().await.unwrap().is_empty());
    let gone = http
        .get(format!("{base}/products/the_zephyr"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        gone.json::<Value>().await.unwrap()["error"],
        "PRODUCT_NOT_FOUND"
    );
    let again = http
        .delete(format!("{base}/products/the_zephyr"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);

    let list: Value = http
        .get(format!("{base}/orders"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["order_details"][0]["product"], Value::Null);
    let missing = http.get(format!("{base}/orders/99")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"],
        "ORDER_NOT_FOUND"
    );
    assert_eq!(server.stats().routes["DELETE /products/{id}"], 2);
}

#[tokio::test]
async fn campaigns_rotate_banners_per_client() {
    let server = start(Api::Campaigns).await;
    let http = client();
    let url = format!("{}/campaigns/7/", server.url());
    let mut last: Option<String> = None;
    for _ in 0..30 {
        let mut request = http.get(&url);
        if let Some(cookie) = &last {
            request = request.header("cookie", format!("sessionid=x; {cookie}"));
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "text/html; charset=utf-8"
        );
        assert_eq!(response.headers()["vary"], "Cookie");
        let cookie = response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.text().await.unwrap();
        let banner = cookie
            .strip_prefix("last_banner_7=")
            .and_then(|rest| rest.strip_suffix("; Path=/"))
            .unwrap()
            .to_owned();
        assert!(body.contains(&format!(
            r#"<img src="/campaigns/banners/image_{banner}.png""#
        )));
        assert!((185..=195).contains(&body.len()), "{}", body.len());
        if let Some(previous) = &last {
            assert_ne!(
                previous,
                &format!("last_banner_7={banner}"),
                "same banner twice in a row"
            );
        }
        last = Some(format!("last_banner_7={banner}"));
    }
    for bad in ["0", "51", "abc"] {
        let response = http
            .get(format!("{}/campaigns/{bad}/", server.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
    }
    let png = http
        .get(format!("{}/campaigns/banners/image_12.png", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG"));
}

#[test]
fn demo_server_can_be_shared_across_tasks() {
    fn check<T: Send + Sync + 'static>() {}
    check::<DemoServer>();
}

#[tokio::test]
async fn every_api_starts_with_its_default_knobs() {
    let http = client();
    for api in Api::ALL {
        let server = DemoServer::start(api, any_port(), Knobs::default_for(api))
            .await
            .unwrap();
        assert_eq!(server.api(), api);
        assert_eq!(
            server.url(),
            format!("http://127.0.0.1:{}", server.addr().port())
        );
        let knobs: Knobs = http
            .get(format!("{}/__knobs", server.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(knobs, Knobs::default_for(api));
        server.shutdown().await;
    }
}
