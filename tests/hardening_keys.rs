//! What a shared fetch may carry (only what the key covers), the admin API's bearer scheme
//! in any case, and the `X-Cache` header of the errors of cached routes. Raw sockets where an
//! HTTP client would normalise what is sent (header case, repeated headers, GET bodies).

mod common;

use std::time::Duration;

use common::{
    demo_with, free_port, knobs, raw_request, raw_send, stoa, write_temp, Api, EchoUpstream,
    RawAnswer, StoaProcess,
};

/// `GET path` with extra header lines (each ending in CRLF) and a body.
async fn get(gw: &StoaProcess, path: &str, headers: &str, body: &str) -> RawAnswer {
    raw_request(gw.port, &format!("GET {path} HTTP/1.1\r\n{headers}"), body).await
}

/// The echo upstream as `[upstreams.echo]`, then `routes`.
fn with_echo(echo: &EchoUpstream, routes: &str) -> String {
    format!(
        "[upstreams.echo]\nurl = \"{}\"\ntimeout = \"5s\"\n\n{routes}",
        echo.url()
    )
}

/// A cached route `name` on the echo upstream at `path` with the given `cache` table.
fn cached_route(name: &str, path: &str, cache: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"{path}\"\nupstream = \"echo\"\ncache = {cache}\n\n"
    )
}

// ---- item 2: the shared fetch carries only what the key covers ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_body_the_key_ignores_never_reaches_the_upstream_nor_the_next_client() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&with_echo(
        &echo,
        &cached_route("plain", "/plain/{id}", r#"{ ttl = "60s" }"#),
    ))
    .await;

    let first = get(
        &gw,
        "/plain/1",
        "Content-Type: text/x-evil\r\nAccept: application/x-anything\r\n",
        "poison",
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.x_cache(), "MISS");
    let seen = first.json();
    assert_eq!(seen["body"], "", "the unkeyed body was sent upstream");
    assert!(
        seen["headers"].get("content-type").is_none(),
        "unkeyed Content-Type sent upstream: {seen}"
    );
    assert!(
        seen["headers"].get("content-length").is_none() || seen["headers"]["content-length"] == "0",
        "{seen}"
    );
    assert_ne!(
        seen["headers"]["accept"], "application/x-anything",
        "unkeyed Accept sent upstream"
    );
    assert!(seen["headers"]["x-request-id"].is_string(), "{seen}");

    // Everyone else gets the answer the first request produced: one without its body.
    let second = get(&gw, "/plain/1", "Accept: application/json\r\n", "").await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.json(), seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_unkeyed_body_bypass_a_body_goes_around_the_cache() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&with_echo(
        &echo,
        &cached_route(
            "own",
            "/own/{id}",
            r#"{ ttl = "60s", unkeyed_body = "bypass" }"#,
        ),
    ))
    .await;

    let mine = get(&gw, "/own/1", "", "mine").await;
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert_eq!(mine.x_cache(), "BYPASS");
    assert_eq!(
        mine.json()["body"],
        "mine",
        "a private fetch carries the body"
    );

    // Nothing was stored or shared: the next request without a body misses.
    let plain = get(&gw, "/own/1", "", "").await;
    assert_eq!(plain.x_cache(), "MISS");
    assert_eq!(plain.json()["body"], "");

    let other = get(&gw, "/own/1", "", "other").await;
    assert_eq!(other.x_cache(), "BYPASS");
    assert_eq!(other.json()["body"], "other", "not served from the entry");

    let again = get(&gw, "/own/1", "", "").await;
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.json(), plain.json());
}

#[test]
fn stoa_check_validates_unkeyed_body() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[upstreams.echo]\nurl = \"http://127.0.0.1:9\"\n\n\
        [[routes]]\nname = \"a\"\nmethods = [\"GET\"]\npath = \"/a\"\nupstream = \"echo\"\n\
        cache = { ttl = \"1s\", unkeyed_body = \"keep\" }\n\n\
        [[routes]]\nname = \"b\"\nmethods = [\"GET\"]\npath = \"/b\"\nupstream = \"echo\"\n\
        cache = { ttl = \"1s\", key_body = true, unkeyed_body = \"bypass\" }\n\n\
        [[routes]]\nname = \"c\"\nmethods = [\"GET\"]\npath = \"/c\"\nupstream = \"echo\"\n\
        cache = { ttl = \"1s\", warm = [{ path = \"/c\", body = { x = 1 } }] }\n\n\
        [[routes]]\nname = \"d\"\nmethods = [\"GET\"]\npath = \"/d\"\nupstream = \"echo\"\n\
        cache = { ttl = \"1s\", unkeyed_body = \"drop\" }\n\n\
        [[routes]]\nname = \"e\"\nmethods = [\"GET\"]\npath = \"/e\"\nupstream = \"echo\"\n\
        cache = { ttl = \"1s\", unkeyed_body = \"bypass\" }\n";
    let path = write_temp(dir.path(), "stoa.toml", text);
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let all = format!("{out}{err}");
    for expected in [
        "routes[0].cache.unkeyed_body: \"keep\" is not one of drop, bypass",
        "routes[1].cache.unkeyed_body:",
        "routes[2].cache.warm[0]:",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    assert!(!all.contains("routes[3]"), "{all}");
    assert!(!all.contains("routes[4]"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_and_content_type_reach_the_upstream_only_when_keyed() {
    let echo = EchoUpstream::start().await;
    let routes = [
        cached_route("plain", "/plain/{id}", r#"{ ttl = "60s" }"#),
        cached_route(
            "neg",
            "/neg/{id}",
            r#"{ ttl = "60s", key_headers = ["Accept", "CONTENT-type"] }"#,
        ),
    ]
    .concat();
    let gw = StoaProcess::start(&with_echo(&echo, &routes)).await;

    // Not keyed: one client's Accept does not decide what everyone gets.
    let first = get(&gw, "/plain/2", "Accept: application/x-anything\r\n", "").await;
    assert_eq!(first.x_cache(), "MISS");
    assert_ne!(first.json()["headers"]["accept"], "application/x-anything");
    let second = get(&gw, "/plain/2", "Accept: application/json\r\n", "").await;
    assert_eq!(second.x_cache(), "HIT");

    // Keyed (names in any case): forwarded, and each value its own entry.
    let odd = get(&gw, "/neg/1", "ACCEPT: application/x-anything\r\n", "").await;
    assert_eq!(odd.x_cache(), "MISS");
    assert_eq!(odd.json()["headers"]["accept"], "application/x-anything");
    let json = get(&gw, "/neg/1", "accept: application/json\r\n", "").await;
    assert_eq!(json.x_cache(), "MISS", "another Accept is another entry");
    assert_eq!(json.json()["headers"]["accept"], "application/json");
    let odd_again = get(&gw, "/neg/1", "Accept: application/x-anything\r\n", "").await;
    assert_eq!(odd_again.x_cache(), "HIT");
    assert_eq!(odd_again.json(), odd.json());
    let json_again = get(&gw, "/neg/1", "Accept: application/json\r\n", "").await;
    assert_eq!(json_again.x_cache(), "HIT");
    assert_eq!(json_again.json(), json.json());

    // Several Accept lines: their own entry, all of them sent.
    let both = "Accept: text/a\r\nAccept: text/b\r\n";
    let many = get(&gw, "/neg/1", both, "").await;
    assert_eq!(many.x_cache(), "MISS");
    let sent = many.json()["headers"]["accept"].clone();
    assert!(sent == "text/b" || sent == "text/a, text/b", "{sent}");
    assert_eq!(get(&gw, "/neg/1", both, "").await.x_cache(), "HIT");
    assert_eq!(
        get(&gw, "/neg/1", "Accept: text/b\r\n", "").await.x_cache(),
        "MISS",
        "one of the values is not the same request"
    );

    // A keyed Content-Type goes upstream too.
    let typed = get(&gw, "/neg/1", "Content-Type: text/x-one\r\n", "").await;
    assert_eq!(typed.x_cache(), "MISS");
    assert_eq!(typed.json()["headers"]["content-type"], "text/x-one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_keyed_query_parameters_reach_the_upstream() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&with_echo(
        &echo,
        &cached_route("q", "/q", r#"{ ttl = "60s", key_query = ["region"] }"#),
    ))
    .await;
    let first = get(&gw, "/q?evil=1&region=S%C3%B6&utm=x", "", "").await;
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(first.json()["target"], "/q?region=S%C3%B6");
    let second = get(&gw, "/q?region=S%C3%B6&evil=2", "", "").await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.json(), first.json());
    let none = get(&gw, "/q?evil=3", "", "").await;
    assert_eq!(none.x_cache(), "MISS");
    assert_eq!(none.json()["target"], "/q");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_keyed_on_fields_sends_only_those_fields_as_json() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&with_echo(
        &echo,
        &cached_route(
            "clv",
            "/clv",
            r#"{ ttl = "60s", key_body = ["customer_id"] }"#,
        ),
    ))
    .await;
    let first = get(
        &gw,
        "/clv",
        "Content-Type: text/x-evil\r\n",
        r#"{"noise":"x","customer_id":"a"}"#,
    )
    .await;
    assert_eq!(first.x_cache(), "MISS");
    let seen = first.json();
    assert_eq!(seen["body"], r#"{"customer_id":"a"}"#);
    assert_eq!(seen["headers"]["content-type"], "application/json");
    let second = get(&gw, "/clv", "", r#"{ "customer_id" : "a", "noise": "y" }"#).await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.json(), seen);
    // A missing field is not a null one.
    let empty = get(&gw, "/clv", "", "{}").await;
    assert_eq!(empty.x_cache(), "MISS");
    assert_eq!(empty.json()["body"], "{}");
    let null = get(&gw, "/clv", "", r#"{"customer_id":null}"#).await;
    assert_eq!(null.x_cache(), "MISS");
    assert_eq!(null.json()["body"], r#"{"customer_id":null}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_legs_and_warm_up_send_only_keyed_parts() {
    let echo = EchoUpstream::start().await;
    let routes = format!(
        r#"{plain}{warmed}[[routes]]
name = "agg"
methods = ["GET"]
path = "/agg/{{id}}"

[[routes.legs]]
name = "leg"
path = "/plain/{{id}}"
body = {{ evil = "{{id}}" }}
"#,
        plain = cached_route("plain", "/plain/{id}", r#"{ ttl = "60s" }"#),
        warmed = cached_route(
            "warmed",
            "/warmed",
            r#"{ ttl = "60s", key_body = ["customer_id"], warm = [{ path = "/warmed", body = { customer_id = "w", noise = 1 } }] }"#,
        ),
    );
    let gw = StoaProcess::start(&with_echo(&echo, &routes)).await;

    let agg = get(&gw, "/agg/7", "", "").await;
    assert_eq!(agg.status, 200, "{}", agg.body);
    let leg = &agg.json()["leg"];
    assert_eq!(leg["target"], "/plain/7");
    assert_eq!(
        leg["body"], "",
        "a leg's body reached a fetch that ignores it"
    );
    assert!(leg["headers"].get("content-type").is_none(), "{leg}");

    let warm = get(&gw, "/warmed", "", r#"{"customer_id":"w"}"#).await;
    assert_eq!(warm.x_cache(), "HIT", "warmed at start");
    let seen = warm.json();
    assert_eq!(seen["body"], r#"{"customer_id":"w"}"#);
    assert_eq!(seen["headers"]["content-type"], "application/json");
}

// ---- item 3: the admin API's bearer scheme ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_accepts_the_bearer_scheme_in_any_case_and_nothing_else() {
    const TOKEN: &str = "hardening-admin-token";
    let gw = StoaProcess::start(&format!("token = \"{TOKEN}\"\n")).await;
    let ask = |authorization: String| {
        let port = gw.admin_port;
        async move {
            raw_request(
                port,
                &format!("GET /admin/config HTTP/1.1\r\nAuthorization: {authorization}\r\n"),
                "",
            )
            .await
        }
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        for gap in [" ", "   ", "\t", " \t "] {
            let r = ask(format!("{scheme}{gap}{TOKEN}")).await;
            assert_eq!(r.status, 200, "{scheme:?}{gap:?}: {}", r.body);
        }
    }
    let wrong = [
        String::new(),
        "Bearer".to_string(),
        "Bearer ".to_string(),
        format!("Bearer{TOKEN}"),
        format!("Basic {TOKEN}"),
        format!("Bearers {TOKEN}"),
        format!("Bearer {}", TOKEN.to_uppercase()),
        format!("Bearer {TOKEN}x"),
        format!("Bearer {TOKEN} {TOKEN}"),
        format!("Bearer x{TOKEN}"),
    ];
    for authorization in wrong {
        let r = ask(authorization.clone()).await;
        assert_eq!(r.status, 401, "{authorization:?} was accepted");
        assert_eq!(r.json()["error"], "unauthorized");
    }
}

// ---- item 8: errors of cached routes say how the cache was used ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_cached_routes_carry_x_cache() {
    let echo = EchoUpstream::start().await;
    let slow = demo_with(Api::Restaurants, knobs(Api::Restaurants, 2000)).await;
    let failing = demo_with(
        Api::Restaurants,
        common::Knobs {
            latency_ms: 300,
            error_rate: 1.0,
            drop_rate: 0.0,
        },
    )
    .await;
    let config = format!(
        r#"[rate_limits.tight]
requests_per_second = 1
burst = 1

[upstreams.dead]
url = "http://127.0.0.1:{dead}"
connect_timeout = "500ms"

[upstreams.slow]
url = "{slow}"
timeout = "5s"

[upstreams.failing]
url = "{failing}"
timeout = "5s"

{echo_routes}[[routes]]
name = "dead"
methods = ["GET"]
path = "/dead/{{id}}"
upstream = "dead"
cache = {{ ttl = "60s" }}

[[routes]]
name = "dead_pass"
methods = ["GET"]
path = "/dead-pass/{{id}}"
upstream = "dead"

[[routes]]
name = "slow"
methods = ["GET"]
path = "/slow/{{id}}"
upstream = "slow"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "60s", lock_timeout = "200ms", on_lock_timeout = "error" }}

[[routes]]
name = "failing"
methods = ["GET"]
path = "/failing/{{id}}"
upstream = "failing"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "60s" }}
"#,
        dead = free_port(),
        slow = slow.url(),
        failing = failing.url(),
        echo_routes = with_echo(
            &echo,
            &[
                cached_route(
                    "clv",
                    "/clv",
                    r#"{ ttl = "60s", key_body = ["customer_id"] }"#
                ),
                cached_route("tight", "/tight", r#"{ ttl = "60s" }"#)
                    .replace("cache =", "rate_limit = \"tight\"\ncache ="),
            ]
            .concat()
        ),
    );
    let gw = StoaProcess::start_with("max_body_bytes = \"1KiB\"", &config).await;

    // 502 on a cold miss: the upstream refuses connections.
    let r = get(&gw, "/dead/1", "", "").await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.json()["error"], "upstream_unreachable");
    assert_eq!(r.x_cache(), "MISS");

    // A request that may not share (credentials the key does not cover) went around it.
    let r = get(&gw, "/dead/1", "Authorization: Bearer x\r\n", "").await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.x_cache(), "BYPASS");

    // The upstream answers 500: its own answer, passed on to the leader and a waiter alike,
    // both saying how they met it.
    let port = gw.port;
    let leader =
        tokio::spawn(async move { raw_request(port, "GET /failing/dufva HTTP/1.1\r\n", "").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = get(&gw, "/failing/dufva", "", "").await;
    let leader = leader.await.unwrap();
    assert_eq!((leader.status, waiter.status), (500, 500));
    assert_eq!(leader.json()["error"], "INTERNAL");
    assert_eq!(waiter.json()["error"], "INTERNAL");
    assert_eq!((leader.x_cache(), waiter.x_cache()), ("MISS", "COALESCED"));

    // A pass-through route has no cache to name.
    let r = get(&gw, "/dead-pass/1", "", "").await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.header("x-cache"), None);

    // 504 when the fetch outlasts lock_timeout (on_lock_timeout = "error").
    let r = get(&gw, "/slow/dufva", "", "").await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.x_cache(), "MISS");
    // ... and for a request that joined that fetch.
    let r = get(&gw, "/slow/dufva", "", "").await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.x_cache(), "COALESCED");

    // 400 bad JSON and 413 on a body-keyed route never reached the cache.
    let r = get(&gw, "/clv", "", "{nope").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "bad_request");
    assert_eq!(r.x_cache(), "BYPASS");
    let big = format!(r#"{{"customer_id":"{}"}}"#, "a".repeat(2048));
    let r = get(&gw, "/clv", "", &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"], "payload_too_large");
    assert_eq!(r.x_cache(), "BYPASS");
    // The same, streamed without a Content-Length.
    let chunked = format!(
        "GET /clv HTTP/1.1\r\nHost: stoa\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let r = raw_send(gw.port, &chunked).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.x_cache(), "BYPASS");

    // 429 from the route's policy.
    let first = get(&gw, "/tight", "", "").await;
    assert_eq!(first.status, 200);
    let r = get(&gw, "/tight", "", "").await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"], "rate_limited");
    assert_eq!(r.x_cache(), "BYPASS");
}
