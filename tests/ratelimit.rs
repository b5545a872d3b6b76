//! Per-client rate limits and upstream protection end to end: the real gateway binary in
//! front of real demo upstreams, over loopback HTTP.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{demo_with, free_port, sample, Api, DemoServer, EchoUpstream, Knobs, StoaProcess};
use serde_json::Value;

fn knobs(latency_ms: u64) -> Knobs {
    Knobs {
        latency_ms,
        ..Knobs::default_for(Api::Restaurants)
    }
}

async fn restaurants(latency_ms: u64) -> DemoServer {
    demo_with(Api::Restaurants, knobs(latency_ms)).await
}

/// An `[upstreams.<name>]` section; `extra` holds more keys (e.g. `max_in_flight = 2`).
fn upstream(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[upstreams.{name}]\nurl = \"{url}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n{extra}\n\n"
    )
}

/// A `[[routes]]` entry for GET; `extra` holds more keys (`rewrite`, `cache`, `rate_limit`).
fn route(name: &str, path: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"{path}\"\nupstream = \"{upstream}\"\n{extra}\n\n"
    )
}

/// A `[rate_limits.<name>]` policy.
fn policy(name: &str, body: &str) -> String {
    format!("[rate_limits.{name}]\n{body}\n\n")
}

/// These tests read the `RateLimit-Limit/-Remaining/-Reset` trio, which is no longer the
/// default (the draft fields are: tests/http_semantics_status.rs).
const LEGACY: &str = "rate_limit_headers = \"legacy\"";

const TO_RESTAURANT: &str = "rewrite = \"/api/restaurant/{id}\"";

fn calls(upstream: &DemoServer, path: &str) -> u64 {
    upstream
        .stats()
        .paths
        .get(&format!("GET {path}"))
        .copied()
        .unwrap_or(0)
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().expect("header is text").to_string())
}

fn number(r: &reqwest::Response, name: &str) -> u64 {
    let text = header(r, name).unwrap_or_else(|| panic!("no {name} header ({})", r.status()));
    text.parse()
        .unwrap_or_else(|_| panic!("{name} is not a number: {text:?}"))
}

/// `(RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset)` of an answer.
fn rate(r: &reqwest::Response) -> (u64, u64, u64) {
    (
        number(r, "ratelimit-limit"),
        number(r, "ratelimit-remaining"),
        number(r, "ratelimit-reset"),
    )
}

fn has_rate_headers(r: &reqwest::Response) -> bool {
    ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"]
        .iter()
        .any(|h| r.headers().contains_key(*h))
}

fn x_cache(r: &reqwest::Response) -> String {
    header(r, "x-cache").unwrap_or_default()
}

async fn get(http: &reqwest::Client, url: &str) -> reqwest::Response {
    http.get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url} failed: {e}"))
}

async fn get_with(http: &reqwest::Client, url: &str, name: &str, value: &str) -> u16 {
    let r = http
        .get(url)
        .header(name, value)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url} failed: {e}"));
    let status = r.status().as_u16();
    r.bytes().await.unwrap();
    status
}

/// Checks one of stoa's JSON errors and returns its `Retry-After` (which must be there).
async fn assert_json_error(r: reqwest::Response, status: u16, kind: &str) -> u64 {
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/json")
    );
    let retry_after = number(&r, "retry-after");
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(v["error"], kind, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    retry_after
}

/// Checks a 429 answer of a limited route and returns its `Retry-After`.
async fn assert_rate_limited(r: reqwest::Response) -> u64 {
    let (limit, remaining, _) = rate(&r);
    assert!(limit >= 1);
    assert_eq!(remaining, 0, "a refused client has nothing left");
    assert_json_error(r, 429, "rate_limited").await
}

/// Sends one GET per URL, all at once; returns each answer's status and `X-Cache`, in order.
async fn concurrently(http: &reqwest::Client, urls: Vec<String>) -> Vec<(u16, String)> {
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let http = http.clone();
            tokio::spawn(async move {
                let r = get(&http, &url).await;
                let status = r.status().as_u16();
                let cache = x_cache(&r);
                if status == 503 {
                    assert_json_error(r, 503, "upstream_overloaded").await;
                } else {
                    r.bytes().await.unwrap();
                }
                (status, cache)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

fn count(answers: &[(u16, String)], status: u16) -> usize {
    answers.iter().filter(|(s, _)| *s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_burst_gets_429_and_is_admitted_after_waiting_retry_after() {
    let up = restaurants(0).await;
    let config = [
        policy("per_second", "requests_per_second = 1\nburst = 3"),
        policy("per_minute", "per_minute = 1\nburst = 5"),
        upstream("restaurants", &up.url(), ""),
        route(
            "fast",
            "/fast/{id}",
            "restaurants",
            &format!("{TO_RESTAURANT}\nrate_limit = \"per_second\""),
        ),
        route(
            "slow",
            "/slow/{id}",
            "restaurants",
            &format!("{TO_RESTAURANT}\nrate_limit = \"per_minute\""),
        ),
    ]
    .concat();
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let http = reqwest::Client::new();

    // One request a minute, burst 5: the headers of allowed answers count down exactly.
    // RateLimit-Reset is when the bucket is full again: one minute per used request.
    for used in 1..=5u64 {
        let r = get(&http, &gw.url("/slow/dufva")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(rate(&r), (5, 5 - used, 60 * used), "request {used}");
        assert!(!r.headers().contains_key("retry-after"));
        assert_eq!(
            r.json::<Value>().await.unwrap()["restaurant"]["title"],
            "Sven Dufva"
        );
    }
    let r = get(&http, &gw.url("/slow/dufva")).await;
    let (limit, _, reset) = rate(&r);
    assert_eq!(limit, 5);
    assert!((299..=300).contains(&reset), "RateLimit-Reset {reset}");
    let retry_after = assert_rate_limited(r).await;
    assert!(
        (59..=60).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert_eq!(
        calls(&up, "/api/restaurant/dufva"),
        5,
        "a refused request never reaches the upstream"
    );

    // One request a second, burst 3: the fourth is refused; waiting Retry-After admits one
    // more, and only one.
    for used in 1..=3u64 {
        let r = get(&http, &gw.url("/fast/haga")).await;
        assert_eq!(r.status(), 200, "request {used}");
        let (limit, remaining, reset) = rate(&r);
        assert_eq!(limit, 3);
        assert!(remaining <= 3 - used, "remaining {remaining} after {used}");
        assert!((1..=3).contains(&reset), "reset {reset}");
    }
    let r = get(&http, &gw.url("/fast/haga")).await;
    let retry_after = assert_rate_limited(r).await;
    assert_eq!(retry_after, 1);
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let r = get(&http, &gw.url("/fast/haga")).await;
    assert_eq!(r.status(), 200, "admitted after waiting Retry-After");
    assert_eq!(rate(&r).1, 0);
    let r = get(&http, &gw.url("/fast/haga")).await;
    assert_rate_limited(r).await;
    assert_eq!(calls(&up, "/api/restaurant/haga"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_limited_independently_by_api_key_and_by_peer_address() {
    let echo = EchoUpstream::start().await;
    let config = [
        policy(
            "by_key",
            "per_minute = 1\nburst = 2\nclient = \"header:X-API-Key\"",
        ),
        policy("by_ip", "per_minute = 1\nburst = 2\nclient = \"ip\""),
        upstream("echo", &echo.url(), ""),
        route("keyed", "/keyed", "echo", "rate_limit = \"by_key\""),
        route("who", "/who", "echo", "rate_limit = \"by_ip\""),
    ]
    .concat();
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let http = reqwest::Client::new();
    let keyed = gw.url("/keyed");

    // Two API keys from the same address: two buckets.
    assert_eq!(get_with(&http, &keyed, "X-API-Key", "key-a").await, 200);
    assert_eq!(get_with(&http, &keyed, "X-API-Key", "key-a").await, 200);
    assert_eq!(get_with(&http, &keyed, "X-API-Key", "key-a").await, 429);
    let r = http
        .get(&keyed)
        .header("X-API-Key", "key-b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(rate(&r), (2, 1, 60), "key-b starts with a full bucket");
    assert_eq!(get_with(&http, &keyed, "X-API-Key", "key-b").await, 200);
    assert_eq!(get_with(&http, &keyed, "X-API-Key", "key-b").await, 429);
    assert_eq!(get_with(&http, &keyed, "X-API-Key", "key-a").await, 429);
    // Without the header the client is its address: a third bucket.
    for expect in [200, 200, 429] {
        let r = get(&http, &keyed).await;
        assert_eq!(r.status().as_u16(), expect);
    }

    // Two peer addresses on loopback: 127.0.0.1 and 127.0.0.2 (Linux routes all of
    // 127.0.0.0/8 to the loopback interface).
    let who = gw.url("/who");
    let other = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    for expect in [200, 200, 429] {
        assert_eq!(get(&http, &who).await.status().as_u16(), expect);
    }
    let r = other.get(&who).send().await.unwrap_or_else(|e| {
        panic!("cannot connect from 127.0.0.2 (is 127.0.0.0/8 routed to loopback?): {e}")
    });
    assert_eq!(r.status(), 200, "another address has its own bucket");
    assert_eq!(rate(&r), (2, 1, 60));
    let seen: Value = r.json().await.unwrap();
    assert_eq!(
        seen["headers"]["x-forwarded-for"], "127.0.0.2",
        "stoa saw the second address as the peer"
    );
    assert_eq!(other.get(&who).send().await.unwrap().status(), 200);
    assert_rate_limited(other.get(&who).send().await.unwrap()).await;
    assert_rate_limited(get(&http, &who).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_a_trusted_proxy() {
    let echo = EchoUpstream::start().await;
    let config = [
        policy("by_ip", "per_minute = 1\nburst = 2"),
        upstream("echo", &echo.url(), ""),
        route("who", "/who", "echo", "rate_limit = \"by_ip\""),
    ]
    .concat();
    let http = reqwest::Client::new();
    let xff = "x-forwarded-for";

    // Nobody is trusted: a spoofed X-Forwarded-For changes nothing, all of these are one
    // client, 127.0.0.1.
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let who = gw.url("/who");
    assert_eq!(get_with(&http, &who, xff, "198.51.100.1").await, 200);
    assert_eq!(get_with(&http, &who, xff, "198.51.100.2").await, 200);
    assert_eq!(get_with(&http, &who, xff, "198.51.100.3").await, 429);
    assert_eq!(get(&http, &who).await.status(), 429);
    drop(gw);

    // The peer is a trusted proxy: each forwarded address is a client of its own.
    let gw = StoaProcess::start_with(
        &format!("{LEGACY}\ntrusted_proxies = [\"127.0.0.1/32\"]"),
        &config,
    )
    .await;
    let who = gw.url("/who");
    assert_eq!(get_with(&http, &who, xff, "198.51.100.1").await, 200);
    assert_eq!(get_with(&http, &who, xff, "198.51.100.1").await, 200);
    assert_eq!(get_with(&http, &who, xff, "198.51.100.1").await, 429);
    let r = http
        .get(&who)
        .header(xff, "198.51.100.2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a second forwarded client");
    assert_eq!(rate(&r), (2, 1, 60));
    // The right-most untrusted entry is the client: a forged entry to its left is ignored.
    assert_eq!(
        get_with(&http, &who, xff, "203.0.113.7, 198.51.100.1").await,
        429
    );
    // No header: the proxy itself is the client, with its own bucket.
    assert_eq!(get(&http, &who).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misses_only_policy_never_throttles_cache_hits() {
    let up = restaurants(0).await;
    let cached = format!("{TO_RESTAURANT}\ncache = {{ ttl = \"60s\" }}");
    let config = [
        policy(
            "misses",
            "per_minute = 1\nburst = 2\napplies_to = \"misses\"",
        ),
        policy("every", "per_minute = 1\nburst = 2\napplies_to = \"all\""),
        upstream("restaurants", &up.url(), ""),
        route(
            "misses",
            "/misses/{id}",
            "restaurants",
            &format!("{cached}\nrate_limit = \"misses\""),
        ),
        route(
            "every",
            "/every/{id}",
            "restaurants",
            &format!("{cached}\nrate_limit = \"every\""),
        ),
    ]
    .concat();
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let http = reqwest::Client::new();

    // One miss fills the entry and uses one of two requests.
    let r = get(&http, &gw.url("/misses/dufva")).await;
    assert_eq!((r.status().as_u16(), x_cache(&r)), (200, "MISS".into()));
    assert_eq!(rate(&r), (2, 1, 60));
    // Hits, far past the burst, all pass.
    let hits = concurrently(&http, vec![gw.url("/misses/dufva"); 50]).await;
    for (status, cache) in &hits {
        assert_eq!((*status, cache.as_str()), (200, "HIT"));
    }
    // Misses are still counted: one more is allowed, then new keys are refused.
    let r = get(&http, &gw.url("/misses/haga")).await;
    assert_eq!((r.status().as_u16(), x_cache(&r)), (200, "MISS".into()));
    assert_eq!(rate(&r).1, 0);
    assert_rate_limited(get(&http, &gw.url("/misses/glada")).await).await;
    assert_rate_limited(get(&http, &gw.url("/misses/jons")).await).await;
    for id in ["dufva", "haga"] {
        let r = get(&http, &gw.url(&format!("/misses/{id}"))).await;
        assert_eq!((r.status().as_u16(), x_cache(&r)), (200, "HIT".into()));
    }
    assert_eq!(calls(&up, "/api/restaurant/dufva"), 1);
    assert_eq!(calls(&up, "/api/restaurant/haga"), 1);
    assert_eq!(calls(&up, "/api/restaurant/glada"), 0);
    assert_eq!(calls(&up, "/api/restaurant/jons"), 0);

    // For contrast, `applies_to = "all"` counts hits too, and they carry the headers.
    let r = get(&http, &gw.url("/every/dufva")).await;
    assert_eq!((x_cache(&r), rate(&r)), ("MISS".into(), (2, 1, 60)));
    let r = get(&http, &gw.url("/every/dufva")).await;
    assert_eq!((x_cache(&r), rate(&r)), ("HIT".into(), (2, 0, 120)));
    assert_rate_limited(get(&http, &gw.url("/every/dufva")).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lets_everything_through_and_counts_what_would_have_been_refused() {
    let up = restaurants(0).await;
    let config = [
        policy("trial", "per_minute = 1\nburst = 2\nmode = \"dry_run\""),
        policy("strict", "per_minute = 1\nburst = 2\nmode = \"enforce\""),
        upstream("restaurants", &up.url(), ""),
        route(
            "trial",
            "/trial/{id}",
            "restaurants",
            &format!("{TO_RESTAURANT}\nrate_limit = \"trial\""),
        ),
        route(
            "strict",
            "/strict/{id}",
            "restaurants",
            &format!("{TO_RESTAURANT}\nrate_limit = \"strict\""),
        ),
    ]
    .concat();
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let http = reqwest::Client::new();
    let trial = "stoa_rate_limited_total{policy=\"trial\",route=\"trial\"}";
    let strict = "stoa_rate_limited_total{policy=\"strict\",route=\"strict\"}";
    let m = gw.metrics().await;
    assert_eq!(sample(&m, trial), Some(0.0), "{m}");

    for n in 1..=10u64 {
        let r = get(&http, &gw.url("/trial/dufva")).await;
        assert_eq!(r.status(), 200, "request {n}");
        assert!(
            !r.headers().contains_key("retry-after"),
            "a dry-run answer is a normal answer"
        );
        let (limit, remaining, _) = rate(&r);
        assert_eq!((limit, remaining), (2, 2u64.saturating_sub(n)));
        r.bytes().await.unwrap();
    }
    assert_eq!(calls(&up, "/api/restaurant/dufva"), 10);

    let mut refused = 0;
    for _ in 0..10 {
        let r = get(&http, &gw.url("/strict/haga")).await;
        refused += usize::from(r.status() == 429);
        r.bytes().await.unwrap();
    }
    assert_eq!(refused, 8);
    assert_eq!(calls(&up, "/api/restaurant/haga"), 2);

    let m = gw.metrics().await;
    assert_eq!(sample(&m, trial), Some(8.0), "{m}");
    assert_eq!(sample(&m, strict), Some(8.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_bounds_pass_through_requests_and_sheds_the_overflow() {
    // A generous client policy too: stoa's own 503 must carry the RateLimit headers.
    let roomy = policy("roomy", "requests_per_second = 1000\nburst = 1000");
    let limited = format!("{TO_RESTAURANT}\nrate_limit = \"roomy\"");

    // A queue long enough for three waves of two: everyone is served, two at a time.
    let up = restaurants(500).await;
    let config = [
        roomy.clone(),
        upstream(
            "restaurants",
            &up.url(),
            "max_in_flight = 2\nqueue_timeout = \"2s\"",
        ),
        route("pass", "/pass/{id}", "restaurants", &limited),
    ]
    .concat();
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let http = reqwest::Client::new();
    let answers = concurrently(&http, vec![gw.url("/pass/dufva"); 6]).await;
    assert_eq!(count(&answers, 200), 6, "{answers:?}");
    let stats = up.stats();
    assert_eq!(calls(&up, "/api/restaurant/dufva"), 6);
    assert_eq!(
        stats.max_in_flight, 2,
        "never more than two, and two reached"
    );
    drop(gw);

    // A short queue: two are served, the others give up after 100 ms with 503.
    let up = restaurants(1000).await;
    let config = [
        roomy,
        upstream(
            "restaurants",
            &up.url(),
            "max_in_flight = 2\nqueue_timeout = \"100ms\"",
        ),
        route("pass", "/pass/{id}", "restaurants", &limited),
    ]
    .concat();
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let answers = concurrently(&http, vec![gw.url("/pass/dufva"); 6]).await;
    assert_eq!(count(&answers, 200), 2, "{answers:?}");
    assert_eq!(count(&answers, 503), 4, "{answers:?}");
    assert_eq!(up.stats().max_in_flight, 2);
    assert_eq!(calls(&up, "/api/restaurant/dufva"), 2);

    // One more while the slots are busy: its 503 has Retry-After and the RateLimit headers.
    let busy = tokio::spawn({
        let (http, url) = (http.clone(), gw.url("/pass/haga"));
        async move { concurrently(&http, vec![url; 2]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(&http, &gw.url("/pass/dufva")).await;
    let (limit, _, _) = rate(&r);
    assert_eq!(limit, 1000);
    let retry_after = assert_json_error(r, 503, "upstream_overloaded").await;
    assert_eq!(retry_after, 1, "100 ms rounded up");
    assert_eq!(count(&busy.await.unwrap(), 200), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_misses_take_upstream_slots_too() {
    let cached = format!("{TO_RESTAURANT}\ncache = {{ ttl = \"60s\" }}");
    let ids = ["bikupan", "dufva", "glada", "haga", "hjulet", "hubben"];

    // Six cold keys at once, two slots, a long queue: all served, two at a time.
    let up = restaurants(500).await;
    let config = [
        upstream(
            "restaurants",
            &up.url(),
            "max_in_flight = 2\nqueue_timeout = \"2s\"",
        ),
        route("cached", "/cached/{id}", "restaurants", &cached),
    ]
    .concat();
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let http = reqwest::Client::new();
    let urls = ids.iter().map(|id| gw.url(&format!("/cached/{id}")));
    let answers = concurrently(&http, urls.collect()).await;
    for (status, cache) in &answers {
        assert_eq!((*status, cache.as_str()), (200, "MISS"), "{answers:?}");
    }
    assert_eq!(up.stats().total, 6);
    assert_eq!(up.stats().max_in_flight, 2);
    drop(gw);

    // A short queue: the misses that find no slot get 503, and nothing is stored for them.
    let up = restaurants(1000).await;
    let config = [
        upstream(
            "restaurants",
            &up.url(),
            "max_in_flight = 2\nqueue_timeout = \"100ms\"",
        ),
        route("cached", "/cached/{id}", "restaurants", &cached),
    ]
    .concat();
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let urls = ids.iter().map(|id| gw.url(&format!("/cached/{id}")));
    let answers = concurrently(&http, urls.collect()).await;
    assert_eq!(count(&answers, 200), 2, "{answers:?}");
    assert_eq!(count(&answers, 503), 4, "{answers:?}");
    assert_eq!(up.stats().total, 2);
    assert_eq!(up.stats().max_in_flight, 2);
    let shed: Vec<&str> = ids
        .iter()
        .zip(&answers)
        .filter(|(_, (s, _))| *s == 503)
        .map(|(id, _)| *id)
        .collect();
    let r = get(&http, &gw.url(&format!("/cached/{}", shed[0]))).await;
    assert_eq!(
        (r.status().as_u16(), x_cache(&r)),
        (200, "MISS".into()),
        "the overloaded answer was not cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_waiters_take_no_upstream_slot() {
    // One slot, a short queue: if the waiters of a flight queued for the slot they would
    // get 503.
    let up = restaurants(1000).await;
    let config = [
        upstream(
            "restaurants",
            &up.url(),
            "max_in_flight = 1\nqueue_timeout = \"100ms\"",
        ),
        route(
            "cached",
            "/cached/{id}",
            "restaurants",
            &format!("{TO_RESTAURANT}\ncache = {{ ttl = \"60s\" }}"),
        ),
        route("pass", "/pass/{id}", "restaurants", TO_RESTAURANT),
    ]
    .concat();
    let gw = StoaProcess::start_with(LEGACY, &config).await;
    let http = reqwest::Client::new();
    let flight = tokio::spawn({
        let (http, url) = (http.clone(), gw.url("/cached/dufva"));
        async move { concurrently(&http, vec![url; 30]).await }
    });
    // Meanwhile the fetch holds the upstream's only slot: a pass-through request on the
    // same upstream finds none.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(&http, &gw.url("/pass/haga")).await;
    assert_json_error(r, 503, "upstream_overloaded").await;

    let answers = flight.await.unwrap();
    assert_eq!(count(&answers, 200), 30, "{answers:?}");
    let misses = answers.iter().filter(|(_, c)| c == "MISS").count();
    assert_eq!(misses, 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|(_, c)| ["MISS", "COALESCED", "HIT"].contains(&c.as_str())),
        "{answers:?}"
    );
    assert_eq!(calls(&up, "/api/restaurant/dufva"), 1);
    assert_eq!(calls(&up, "/api/restaurant/haga"), 0);
    assert_eq!(up.stats().max_in_flight, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_rate_limit_covers_routes_naming_none_and_off_exempts() {
    let up = restaurants(0).await;
    let config = [
        policy("house", "per_minute = 1\nburst = 2"),
        policy("own", "per_minute = 1\nburst = 4"),
        upstream("restaurants", &up.url(), ""),
        route("plain", "/plain/{id}", "restaurants", TO_RESTAURANT),
        route(
            "exempt",
            "/exempt/{id}",
            "restaurants",
            &format!("{TO_RESTAURANT}\nrate_limit = \"off\""),
        ),
        route(
            "named",
            "/named/{id}",
            "restaurants",
            &format!("{TO_RESTAURANT}\nrate_limit = \"own\""),
        ),
    ]
    .concat();
    let gw = StoaProcess::start_with(
        &format!("{LEGACY}\ndefault_rate_limit = \"house\""),
        &config,
    )
    .await;
    let http = reqwest::Client::new();

    // No policy named: the default one.
    let r = get(&http, &gw.url("/plain/dufva")).await;
    assert_eq!((r.status().as_u16(), rate(&r)), (200, (2, 1, 60)));
    assert_eq!(get(&http, &gw.url("/plain/dufva")).await.status(), 200);
    assert_rate_limited(get(&http, &gw.url("/plain/dufva")).await).await;

    // "off": never limited, and no RateLimit headers.
    for _ in 0..20 {
        let r = get(&http, &gw.url("/exempt/dufva")).await;
        assert_eq!(r.status(), 200);
        assert!(!has_rate_headers(&r), "{:?}", r.headers());
    }

    // A route naming its own policy keeps it.
    for used in 1..=4u64 {
        let r = get(&http, &gw.url("/named/dufva")).await;
        assert_eq!(
            (r.status().as_u16(), rate(&r).0),
            (200, 4),
            "request {used}"
        );
    }
    assert_rate_limited(get(&http, &gw.url("/named/dufva")).await).await;

    let m = gw.metrics().await;
    let plain = "stoa_rate_limited_total{policy=\"house\",route=\"plain\"}";
    let named = "stoa_rate_limited_total{policy=\"own\",route=\"named\"}";
    assert_eq!(sample(&m, plain), Some(1.0), "{m}");
    assert_eq!(sample(&m, named), Some(1.0), "{m}");
    assert!(
        !m.lines()
            .any(|l| l.starts_with("stoa_rate_limited_total") && l.contains("route=\"exempt\"")),
        "an exempt route has no rate-limit series: {m}"
    );
    assert_eq!(calls(&up, "/api/restaurant/dufva"), 2 + 20 + 4);
}

/// A request body sent chunked (no `Content-Length`), in one chunk of `n` bytes.
fn chunked(n: usize) -> reqwest::Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(vec![b'x'; n])];
    reqwest::Body::wrap_stream(tokio_stream::iter(chunks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stoas_own_errors_on_a_limited_route_carry_the_ratelimit_headers() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let echo = EchoUpstream::start().await;
    let config = [
        policy("house", "per_minute = 1\nburst = 10"),
        upstream("dead", &dead, ""),
        upstream("echo", &echo.url(), ""),
        route("dead", "/dead", "dead", "rate_limit = \"house\""),
        "[[routes]]\nname = \"upload\"\nmethods = [\"POST\"]\npath = \"/upload\"\nupstream = \"echo\"\nrate_limit = \"house\"\n\n".to_string(),
        route(
            "lookup",
            "/lookup",
            "echo",
            "cache = { ttl = \"60s\" }\nrate_limit = \"house\"",
        ),
    ]
    .concat();
    let gw = StoaProcess::start_with(&format!("{LEGACY}\nmax_body_bytes = 64"), &config).await;
    let http = reqwest::Client::new();

    // Every case is tried before judging, so that one run shows all that lack the headers.
    let mut missing = Vec::new();
    let mut check = |case: &str, r: &reqwest::Response, status: u16| {
        assert_eq!(r.status().as_u16(), status, "{case}");
        assert_eq!(
            header(r, "content-type").as_deref(),
            Some("application/json"),
            "{case}"
        );
        if has_rate_headers(r) {
            assert_eq!(rate(r).0, 10, "{case}");
        } else {
            missing.push(format!("{case}: {status} without RateLimit headers"));
        }
    };

    // The upstream cannot be reached: stoa answers 502 itself.
    let r = get(&http, &gw.url("/dead")).await;
    check("pass-through, upstream unreachable", &r, 502);

    // Bodies over max_body_bytes (64 bytes): 413 from stoa.
    let r = http
        .post(gw.url("/upload"))
        .body(chunked(1024))
        .send()
        .await
        .unwrap();
    check("pass-through, chunked body too large", &r, 413);
    let r = http
        .post(gw.url("/upload"))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    check("pass-through, Content-Length too large", &r, 413);
    // (A GET body of unknown length is only sent when the request says it is chunked.)
    let r = http
        .get(gw.url("/lookup"))
        .header("transfer-encoding", "chunked")
        .body(chunked(1024))
        .send()
        .await
        .unwrap();
    check("cached route, chunked body too large", &r, 413);

    assert!(missing.is_empty(), "{missing:#?}");
}
