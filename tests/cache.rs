//! The response cache end to end: real demo upstreams, the real gateway, upstream calls
//! counted by the demo upstreams' `/__stats`.

mod common;

use std::time::{Duration, Instant};

use common::{calls, demo_with, knobs, x_cache, Api, DemoServer, Knobs, StoaProcess};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CUSTOMER: &str = "450e1c2cbd21687780153995f1be0c23";

/// A gateway caching `GET /restaurant/{id}` (rewritten to `/api/restaurant/{id}`) with
/// the given `cache` table, in front of `upstream`.
async fn gateway_for_restaurant(upstream: &DemoServer, cache: &str) -> StoaProcess {
    let route = format!(
        "name = \"restaurant\"\nmethods = [\"GET\"]\npath = \"/restaurant/{{id}}\"\nrewrite = \"/api/restaurant/{{id}}\"\ncache = {cache}"
    );
    gateway(upstream, &route).await
}

/// A gateway with one cached route `name` in front of `upstream`.
async fn gateway(upstream: &DemoServer, route: &str) -> StoaProcess {
    let config = format!(
        "[upstreams.up]\nurl = \"{}\"\ntimeout = \"5s\"\n\n[[routes]]\nupstream = \"up\"\n{route}\n",
        upstream.url()
    );
    StoaProcess::start(&config).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(2000)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_on_a_cold_key_cost_one_upstream_call() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 200)).await;
    let gw = gateway_for_restaurant(&up, r#"{ ttl = "60s" }"#).await;
    let http = client();
    let url = gw.url("/restaurant/dufva");
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let r = http.get(url).send().await.expect("request failed");
                let status = r.status().as_u16();
                let cache = x_cache(&r);
                (status, cache, r.bytes().await.unwrap())
            })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    let mut misses = 0;
    for t in tasks {
        let (status, cache, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            ["MISS", "COALESCED", "HIT"].contains(&cache.as_str()),
            "{cache}"
        );
        misses += usize::from(cache == "MISS");
        bodies.insert(body);
    }
    assert_eq!(
        calls(&up, "GET /api/restaurant/dufva"),
        1,
        "exactly one upstream call"
    );
    assert_eq!(misses, 1, "one request led the fetch");
    assert_eq!(bodies.len(), 1, "1,000 identical answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_load_costs_at_most_one_call_per_ttl_window_and_nobody_waits_on_refresh() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 100)).await;
    let gw = gateway_for_restaurant(&up, r#"{ ttl = "1s", stale_while_revalidate = "10s" }"#).await;
    let http = client();
    let url = gw.url("/restaurant/dufva");
    // Fill the entry, then keep 8 clients busy for 5 s.
    assert_eq!(x_cache(&http.get(&url).send().await.unwrap()), "MISS");
    let started = Instant::now();
    let load = Duration::from_secs(5);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while started.elapsed() < load {
                    let r = http.get(&url).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    seen.push(x_cache(&r));
                    r.bytes().await.unwrap();
                }
                seen
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        for cache in w.await.unwrap() {
            total += 1;
            // With stale-while-revalidate every answer comes from memory at once.
            assert!(
                cache == "HIT" || cache == "STALE",
                "a client waited: {cache}"
            );
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let upstream = calls(&up, "GET /api/restaurant/dufva");
    let windows = elapsed.ceil() as u64 + 1;
    assert!(total > 100, "only {total} requests in the load phase");
    assert!(
        upstream <= windows,
        "{upstream} upstream calls in {elapsed:.1}s ({windows} TTL windows)"
    );
    assert!(
        upstream >= 3,
        "the entry was refreshed as it expired ({upstream} calls)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_nothing() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 400)).await;
    let gw = gateway_for_restaurant(&up, r#"{ ttl = "60s" }"#).await;
    // The first client starts the fetch and hangs up at once.
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    sock.write_all(b"GET /restaurant/haga HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(sock);
    let http = client();
    let others: Vec<_> = (0..20)
        .map(|_| {
            let (http, url) = (http.clone(), gw.url("/restaurant/haga"));
            tokio::spawn(async move {
                let r = http.get(url).send().await.unwrap();
                (r.status().as_u16(), x_cache(&r))
            })
        })
        .collect();
    // Each joins the fetch the first client started, or (on a slow machine, after it ended)
    // finds its answer stored: never a fetch of its own, which a cancelled fetch would need.
    for o in others {
        let (status, cache) = o.await.unwrap();
        assert_eq!(status, 200);
        assert!(cache == "COALESCED" || cache == "HIT", "{cache}");
    }
    let r = http.get(gw.url("/restaurant/haga")).send().await.unwrap();
    assert_eq!(x_cache(&r), "HIT", "the entry was stored");
    assert_eq!(calls(&up, "GET /api/restaurant/haga"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_serve_stale_or_pass_through_and_are_never_cached() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let gw = gateway_for_restaurant(&up, r#"{ ttl = "300ms", stale_if_error = "1m" }"#).await;
    let http = client();
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    assert_eq!(x_cache(&r), "MISS");
    let fresh = r.text().await.unwrap();

    up.set_knobs(Knobs {
        error_rate: 1.0,
        ..knobs(Api::Restaurants, 0)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Expired, upstream failing, a stale copy present: STALE.
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "STALE");
    assert_eq!(r.text().await.unwrap(), fresh);
    // No copy at all: the upstream's own 500 as it gave it, and nothing cached.
    let r = http.get(gw.url("/restaurant/haga")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(x_cache(&r), "MISS");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "INTERNAL");
    let before = calls(&up, "GET /api/restaurant/haga");
    let r = http.get(gw.url("/restaurant/haga")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        calls(&up, "GET /api/restaurant/haga"),
        before + 1,
        "the failure was not cached"
    );

    up.set_knobs(knobs(Api::Restaurants, 0));
    let r = http.get(gw.url("/restaurant/haga")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "MISS");
}

async fn lock_timeout_case(policy: &str, with_stale: bool) -> (u16, String, u64) {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let gw = gateway(
        &up,
        &format!(
            r#"name = "restaurant"
methods = ["GET"]
path = "/restaurant/{{id}}"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "200ms", stale_if_error = "1m", lock_timeout = "150ms", on_lock_timeout = "{policy}" }}"#
        ),
    )
    .await;
    let http = client();
    if with_stale {
        assert_eq!(
            http.get(gw.url("/restaurant/dufva"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    up.set_knobs(knobs(Api::Restaurants, 600));
    let started = Instant::now();
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    let waited = started.elapsed().as_millis() as u64;
    let (status, cache) = (r.status().as_u16(), x_cache(&r));
    if status == 504 {
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "upstream_timeout");
    }
    (status, cache, waited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeout_policies_behave_as_configured() {
    // serve_stale with a stale copy: the copy, as soon as the lock times out.
    let (status, cache, waited) = lock_timeout_case("serve_stale", true).await;
    assert_eq!((status, cache.as_str()), (200, "STALE"));
    assert!(waited < 550, "waited {waited} ms");
    // serve_stale without one, and error: 504 JSON.
    let (status, _, _) = lock_timeout_case("serve_stale", false).await;
    assert_eq!(status, 504);
    let (status, _, waited) = lock_timeout_case("error", true).await;
    assert_eq!(status, 504);
    assert!(waited < 550, "waited {waited} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeout_bypass_goes_upstream_for_waiters() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 500)).await;
    let gw = gateway_for_restaurant(
        &up,
        r#"{ ttl = "60s", lock_timeout = "100ms", on_lock_timeout = "bypass" }"#,
    )
    .await;
    let http = client();
    let leader = tokio::spawn({
        let (http, url) = (http.clone(), gw.url("/restaurant/dufva"));
        async move { http.get(url).send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(x_cache(&r), "BYPASS");
    // The leader's own wait times out too: it also goes upstream itself, while its fetch
    // still fills the cache.
    let l = leader.await.unwrap();
    assert_eq!((l.status().as_u16(), x_cache(&l).as_str()), (200, "BYPASS"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(calls(&up, "GET /api/restaurant/dufva"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_are_keyed_canonically_and_bad_json_never_reaches_the_upstream() {
    let up = demo_with(Api::Clv, knobs(Api::Clv, 20)).await;
    let gw = gateway(
        &up,
        r#"name = "clv"
methods = ["GET"]
path = "/get_clv"
cache = { ttl = "1h", key_body = ["customer_id"] }"#,
    )
    .await;
    let http = client();
    let get = |body: String| {
        let (http, url) = (http.clone(), gw.url("/get_clv"));
        async move {
            http.get(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = get(format!(r#"{{"customer_id":"{CUSTOMER}"}}"#)).await;
    assert_eq!(x_cache(&r), "MISS");
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["clv"], json!([244.9, 89.9]));
    let r = get(format!("{{ \"customer_id\" :\n \"{CUSTOMER}\" }}")).await;
    assert_eq!(x_cache(&r), "HIT", "white space does not make a new entry");
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    assert_eq!(calls(&up, "GET /get_clv"), 1);

    let other = stoa_demo::CLV_CUSTOMERS
        .iter()
        .find(|c| **c != CUSTOMER)
        .unwrap();
    let r = get(format!(r#"{{"customer_id":"{other}"}}"#)).await;
    assert_eq!(x_cache(&r), "MISS", "another customer is another entry");
    assert_eq!(calls(&up, "GET /get_clv"), 2);

    for bad in ["{nope", "", "[1,2]"] {
        let r = get(bad.to_string()).await;
        assert_eq!(r.status(), 400, "{bad:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "bad_request");
    }
    assert_eq!(
        calls(&up, "GET /get_clv"),
        2,
        "bad JSON cost no upstream call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_answers_and_credentialed_requests_are_never_shared() {
    let campaigns = demo_with(Api::Campaigns, knobs(Api::Campaigns, 0)).await;
    // Even a (mis)configured cache on a cookie-setting route must not mix clients.
    let gw = gateway(
        &campaigns,
        r#"name = "campaign"
methods = ["GET"]
path = "/campaigns/{id}/"
cache = { ttl = "60s" }"#,
    )
    .await;
    let http = client();
    let r = http.get(gw.url("/campaigns/3/")).send().await.unwrap();
    assert!(r.headers().contains_key("set-cookie"));
    assert_eq!(x_cache(&r), "MISS");
    let r = http.get(gw.url("/campaigns/3/")).send().await.unwrap();
    assert_eq!(x_cache(&r), "MISS", "a Set-Cookie answer was not stored");
    let r = http
        .get(gw.url("/campaigns/3/"))
        .header("cookie", "last_banner_3=1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        x_cache(&r),
        "BYPASS",
        "a cookie-bearing request goes upstream itself"
    );
    let page_a = r.text().await.unwrap();
    assert!(
        !page_a.contains("image_1.png"),
        "the upstream saw this client's cookie"
    );
    assert_eq!(campaigns.stats().total, 3);

    let restaurants = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let gw = gateway_for_restaurant(&restaurants, r#"{ ttl = "60s" }"#).await;
    let r = http
        .get(gw.url("/restaurant/dufva"))
        .header("authorization", "Bearer alice")
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "BYPASS");
    let r = http.get(gw.url("/restaurant/dufva")).send().await.unwrap();
    assert_eq!(
        x_cache(&r),
        "MISS",
        "the credentialed answer was not stored for others"
    );
    let r = http
        .get(gw.url("/restaurant/dufva"))
        .header("authorization", "Bearer bob")
        .send()
        .await
        .unwrap();
    assert_eq!(
        x_cache(&r),
        "BYPASS",
        "the shared entry is not served to credentialed requests"
    );
    assert_eq!(calls(&restaurants, "GET /api/restaurant/dufva"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_is_cached_with_its_own_ttl() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let gw = gateway_for_restaurant(&up, r#"{ ttl = "60s", statuses = { 404 = "300ms" } }"#).await;
    let http = client();
    let key = "GET /api/restaurant/nowhere";
    let r = http
        .get(gw.url("/restaurant/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), x_cache(&r).as_str()), (404, "MISS"));
    let r = http
        .get(gw.url("/restaurant/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), x_cache(&r).as_str()), (404, "HIT"));
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"detail": "Restaurant not found"})
    );
    assert_eq!(calls(&up, key), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = http
        .get(gw.url("/restaurant/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "MISS", "the 404 expired after its own TTL");
    assert_eq!(calls(&up, key), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_refreshes_a_hot_key_before_it_expires() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 50)).await;
    let gw = gateway_for_restaurant(&up, r#"{ ttl = "1s", refresh_ahead = 0.5 }"#).await;
    let http = client();
    let key = "GET /api/restaurant/dufva";
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/dufva")).send().await.unwrap()),
        "MISS"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Past half its life: answered from memory, and one refresh starts in the background.
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/dufva")).send().await.unwrap()),
        "HIT"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(calls(&up, key), 2, "refreshed ahead of expiry");
    // The original copy would have expired by now; the refreshed one is fresh.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        x_cache(&http.get(gw.url("/restaurant/dufva")).send().await.unwrap()),
        "HIT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_answered_from_the_get_entry_and_other_keys_stay_apart() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let gw = gateway(
        &up,
        r#"name = "list"
methods = ["GET", "HEAD"]
path = "/restaurants"
rewrite = "/api/restaurant"
cache = { ttl = "60s", key_query = ["region"] }"#,
    )
    .await;
    let http = client();
    let r = http
        .get(gw.url("/restaurants?region=Solna&utm=a"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "MISS");
    let len = r.bytes().await.unwrap().len();
    let r = http
        .head(gw.url("/restaurants?utm=b&region=Solna"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.headers()["content-length"], len.to_string().as_str());
    let r = http
        .get(gw.url("/restaurants?region=Uppsala"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(calls(&up, "GET /api/restaurant"), 2);
    // Age grows on hits.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = http
        .get(gw.url("/restaurants?region=Solna"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["age"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_on_cached_routes_get_413() {
    let up = demo_with(Api::Voucher, knobs(Api::Voucher, 0)).await;
    let gw = gateway(
        &up,
        r#"name = "voucher"
methods = ["POST"]
path = "/api/v1/voucher"
cache = { ttl = "1h", key_body = true }"#,
    )
    .await;
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let body = vec![b' '; 1024 * 1024 + 10];
    let head = format!(
        "POST /api/v1/voucher HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let _ = sock.write_all(&body).await;
    let _ = sock.write_all(b"\r\n0\r\n\r\n").await;
    let mut answer = vec![0u8; 4096];
    let n = sock.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    assert_eq!(up.stats().total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_stays_within_max_bytes_and_counts_evictions() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let config = format!(
        "[cache]\nmax_bytes = \"32KiB\"\n\n[upstreams.up]\nurl = \"{}\"\n\n[[routes]]\nname = \"list\"\nupstream = \"up\"\nmethods = [\"GET\"]\npath = \"/restaurants\"\nrewrite = \"/api/restaurant\"\ncache = {{ ttl = \"60s\" }}\n",
        up.url()
    );
    let gw = StoaProcess::start(&config).await;
    let http = client();
    let mut stored = 0;
    for page in 0..40 {
        let r = http
            .get(gw.url(&format!("/restaurants?page={page}")))
            .send()
            .await
            .unwrap();
        assert_eq!(x_cache(&r), "MISS");
        stored += r.bytes().await.unwrap().len();
    }
    assert!(
        stored > 3 * 32 * 1024,
        "the test must overfill the store ({stored} bytes)"
    );
    let metrics = gw.metrics().await;
    let bytes = common::sample(&metrics, "stoa_cache_bytes").unwrap();
    let entries = common::sample(&metrics, "stoa_cache_entries").unwrap();
    let evictions = common::sample(&metrics, "stoa_cache_evictions_total").unwrap();
    assert!(bytes <= 32.0 * 1024.0, "{bytes} bytes held");
    assert!(
        bytes > 0.0 && (1.0..40.0).contains(&entries),
        "{entries} entries"
    );
    assert!(
        evictions >= 40.0 - entries,
        "{evictions} evictions for {entries} entries kept"
    );
    // The newest answers are still served from memory.
    let r = http
        .get(gw.url("/restaurants?page=39"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
}
