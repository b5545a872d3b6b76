//! Limits and counters that must tell the truth, end to end: a "misses only" rate limit
//! never throttles the waiters of a flight in progress, and replacing a cached key is not
//! counted as an eviction. Real demo upstreams, the real gateway.

mod common;

use std::time::Duration;

use common::{calls, demo_with, knobs, sample, x_cache, Api, DemoServer, StoaProcess};
use serde_json::Value;
use stoa_demo::CLV_CUSTOMERS;

/// One CLV request (a GET with a JSON body) for `customer`: (status, X-Cache, body).
async fn clv(http: &reqwest::Client, gw: &StoaProcess, customer: &str) -> (u16, String, Value) {
    let r = http
        .get(gw.url("/get_clv"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"customer_id":"{customer}"}}"#))
        .send()
        .await
        .expect("request failed");
    let status = r.status().as_u16();
    let cache = x_cache(&r);
    let body = r.json().await.unwrap_or(Value::Null);
    (status, cache, body)
}

/// A gateway with the demo's `clv` route behind a small "misses only" policy: three
/// requests that would reach the upstream, then one a minute.
async fn clv_scene(latency_ms: u64) -> (DemoServer, StoaProcess) {
    let up = demo_with(Api::Clv, knobs(Api::Clv, latency_ms)).await;
    let config = format!(
        r#"[rate_limits.clv_misses]
per_minute = 1
burst = 3
client = "ip"
applies_to = "misses"

[upstreams.clv]
url = "{}"
connect_timeout = "1s"
timeout = "10s"

[[routes]]
name = "clv"
methods = ["GET"]
path = "/get_clv"
upstream = "clv"
cache = {{ ttl = "1h", key_body = ["customer_id"] }}
rate_limit = "clv_misses"
"#,
        up.url()
    );
    let gw = StoaProcess::start(&config).await;
    (up, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misses_policy_never_throttles_the_waiters_of_a_flight() {
    let (up, gw) = clv_scene(800).await;
    let http = reqwest::Client::new();
    let cold = CLV_CUSTOMERS[0];

    // 200 concurrent requests for one cold key: one fetch, and every request answered.
    let burst: Vec<_> = (0..200)
        .map(|_| {
            let http = http.clone();
            let url = gw.url("/get_clv");
            tokio::spawn(async move {
                let r = http
                    .get(url)
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"customer_id":"{cold}"}}"#))
                    .send()
                    .await
                    .expect("request failed");
                (r.status().as_u16(), x_cache(&r))
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in burst {
        answers.push(task.await.unwrap());
    }
    let refused = answers.iter().filter(|(s, _)| *s == 429).count();
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let misses = answers.iter().filter(|(_, c)| c == "MISS").count();
    assert_eq!(
        (ok, refused),
        (200, 0),
        "waiters of one flight are not misses: {answers:?}"
    );
    assert_eq!(misses, 1, "one request led the fetch: {answers:?}");
    assert!(
        answers
            .iter()
            .all(|(_, c)| matches!(c.as_str(), "MISS" | "COALESCED" | "HIT")),
        "{answers:?}"
    );
    assert_eq!(
        calls(&up, "GET /get_clv"),
        1,
        "one upstream call for the burst"
    );

    // Misses of other keys still count: two more fit in the burst of three, then 429.
    for customer in &CLV_CUSTOMERS[1..3] {
        let (status, cache, _) = clv(&http, &gw, customer).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"), "{customer}");
    }
    for customer in &CLV_CUSTOMERS[3..6] {
        let (status, cache, body) = clv(&http, &gw, customer).await;
        assert_eq!(status, 429, "{customer}: {body}");
        assert_eq!(body["error"], "rate_limited", "{body}");
        assert_eq!(cache, "BYPASS", "a 429 is answered before the cache");
    }
    assert_eq!(
        calls(&up, "GET /get_clv"),
        3,
        "refused misses never reached it"
    );

    // Hits are never throttled, even with the bucket empty.
    for _ in 0..10 {
        let (status, cache, _) = clv(&http, &gw, cold).await;
        assert_eq!((status, cache.as_str()), (200, "HIT"));
    }
    let text = gw.metrics().await;
    assert_eq!(
        sample(
            &text,
            r#"stoa_rate_limited_total{policy="clv_misses",route="clv"}"#
        ),
        Some(3.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_would_start_a_fetch_is_checked_even_after_a_flight() {
    // A burst of one is spent by the first miss; while its flight runs, waiters pass; once
    // it is over, a new key is a new fetch and is refused.
    let (up, gw) = clv_scene(300).await;
    let http = reqwest::Client::new();
    let first = tokio::spawn({
        let http = http.clone();
        let url = gw.url("/get_clv");
        async move {
            http.get(url)
                .body(format!(r#"{{"customer_id":"{}"}}"#, CLV_CUSTOMERS[0]))
                .send()
                .await
                .map(|r| (r.status().as_u16(), x_cache(&r)))
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, cache, _) = clv(&http, &gw, CLV_CUSTOMERS[0]).await;
    assert_eq!((status, cache.as_str()), (200, "COALESCED"));
    assert_eq!(first.await.unwrap().unwrap(), (200, "MISS".to_string()));
    for customer in &CLV_CUSTOMERS[1..3] {
        assert_eq!(clv(&http, &gw, customer).await.0, 200);
    }
    assert_eq!(clv(&http, &gw, CLV_CUSTOMERS[3]).await.0, 429);
    assert_eq!(calls(&up, "GET /get_clv"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_cached_key_is_not_an_eviction() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let config = format!(
        r#"[cache]
max_bytes = "256KiB"

[upstreams.restaurants]
url = "{}"
connect_timeout = "1s"
timeout = "5s"

[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{{id}}"
upstream = "restaurants"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "100ms", statuses = {{ 404 = "100ms" }} }}
"#,
        up.url()
    );
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();
    // The same key fetched five times: each fetch replaces the expired entry.
    for _ in 0..5 {
        let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
        assert_eq!((r.status().as_u16(), x_cache(&r)), (200, "MISS".into()));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(calls(&up, "GET /api/restaurant/dufva"), 5);
    let text = gw.metrics().await;
    assert_eq!(
        sample(&text, "stoa_cache_evictions_total"),
        Some(0.0),
        "replacements are not evictions:\n{text}"
    );
    assert_eq!(sample(&text, "stoa_cache_entries"), Some(1.0), "{text}");

    // Real evictions still count: many distinct keys overflow 256 KiB.
    for i in 0..400 {
        let r = http
            .get(gw.url(&format!("/restaurant/nobody-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    let text = gw.metrics().await;
    let evictions = sample(&text, "stoa_cache_evictions_total").unwrap_or(0.0);
    let entries = sample(&text, "stoa_cache_entries").unwrap_or(0.0);
    assert!(evictions > 0.0, "{text}");
    assert!(entries < 401.0, "{text}");
}
