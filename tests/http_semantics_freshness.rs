//! Issue 13, items 3, 6 and 7: `no-cache` answers, freshness from the origin, and
//! conditional requests (304s from memory, revalidation upstream). A small origin of the
//! test's own answers each path with the headers the test sets, answers a matching
//! `If-None-Match` with a 304, and records every request it gets.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{path_of, raw_send, sample, serve_heads, RawAnswer, StoaProcess};

#[derive(Clone, Default)]
struct Reply {
    status: u16,
    /// Header lines, each ending in CRLF.
    headers: String,
    body: String,
    /// Answer a request whose `If-None-Match` holds this tag with a 304.
    etag: Option<String>,
    /// Header lines of that 304.
    headers_304: String,
    delay: Duration,
}

fn reply(headers: &str, body: &str) -> Reply {
    Reply {
        status: 200,
        headers: headers.to_string(),
        body: body.to_string(),
        ..Reply::default()
    }
}

struct Origin {
    port: u16,
    replies: Arc<Mutex<HashMap<String, Reply>>>,
    /// Every request head received, in order.
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    async fn start() -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let replies: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r, s) = (replies.clone(), seen.clone());
        let task = serve_heads(listener, move |head| {
            let (replies, seen) = (r.clone(), s.clone());
            async move {
                seen.lock().unwrap().push(head.clone());
                let reply = replies.lock().unwrap().get(&path_of(&head)).cloned();
                let reply = reply.unwrap_or_else(|| Reply {
                    status: 404,
                    ..Reply::default()
                });
                tokio::time::sleep(reply.delay).await;
                let inm = header_of(&head, "if-none-match");
                match (&reply.etag, inm) {
                    (Some(tag), Some(inm)) if inm.contains(tag.as_str()) => format!(
                        "HTTP/1.1 304 Not Modified\r\netag: {tag}\r\n{}\r\n",
                        reply.headers_304
                    ),
                    _ => format!(
                        "HTTP/1.1 {} X\r\n{}{}content-length: {}\r\n\r\n{}",
                        reply.status,
                        reply
                            .etag
                            .as_ref()
                            .map(|t| format!("etag: {t}\r\n"))
                            .unwrap_or_default(),
                        reply.headers,
                        reply.body.len(),
                        reply.body
                    ),
                }
            }
        });
        Origin {
            port,
            replies,
            seen,
            task,
        }
    }

    fn set(&self, path: &str, reply: Reply) {
        self.replies.lock().unwrap().insert(path.to_string(), reply);
    }

    /// The request heads `path` got.
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

    /// How many requests for `path` were conditional.
    fn conditional_calls(&self, path: &str) -> usize {
        self.heads(path)
            .iter()
            .filter(|h| header_of(h, "if-none-match").is_some())
            .count()
    }
}

fn header_of(head: &str, name: &str) -> Option<String> {
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
}

/// stoa with cached routes on `origin`: each `(name, cache table)` serves `/<name>/{*rest}`
/// as the origin's `/{rest}`.
async fn stoa_for(origin: &Origin, routes: &[(&str, &str)]) -> StoaProcess {
    let mut text = format!(
        "[upstreams.o]\nurl = \"http://127.0.0.1:{}\"\ntimeout = \"5s\"\n",
        origin.port
    );
    for (name, cache) in routes {
        text.push_str(&format!(
            "\n[[routes]]\nname = \"{name}\"\nmethods = [\"GET\", \"HEAD\"]\n\
             path = \"/{name}/{{*rest}}\"\nupstream = \"o\"\nrewrite = \"/{{rest}}\"\n\
             cache = {cache}\n"
        ));
    }
    StoaProcess::start(&text).await
}

async fn get(gw: &StoaProcess, path: &str) -> RawAnswer {
    get_with(gw, "GET", path, "").await
}

/// A request with extra header lines (each ending in CRLF).
async fn get_with(gw: &StoaProcess, method: &str, path: &str, extra: &str) -> RawAnswer {
    raw_send(
        gw.port,
        &format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n"),
    )
    .await
}

fn http_date(at: SystemTime) -> String {
    httpdate::fmt_http_date(at)
}

async fn metric(gw: &StoaProcess, series: &str) -> f64 {
    sample(&gw.metrics().await, series).unwrap_or(-1.0)
}

// ---- item 6: freshness from the origin ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_freshness_s_maxage_beats_max_age_beats_expires_less_age_capped() {
    let origin = Origin::start().await;
    let now = SystemTime::now();
    let date = format!("date: {}\r\n", http_date(now));
    let in_secs = |s: u64| http_date(now + Duration::from_secs(s));
    let far = format!("expires: {}\r\n", in_secs(600));
    origin.set(
        "/s",
        reply(
            &format!("cache-control: max-age=60, s-maxage=1\r\n{date}{far}"),
            "s",
        ),
    );
    origin.set(
        "/m",
        reply(&format!("cache-control: max-age=1\r\n{date}{far}"), "m"),
    );
    origin.set(
        "/e",
        reply(&format!("{date}expires: {}\r\n", in_secs(3)), "e"),
    );
    origin.set("/bad", reply(&format!("{date}expires: soon\r\n"), "bad"));
    origin.set("/silent", reply("", "silent"));
    origin.set(
        "/age",
        reply("cache-control: max-age=3\r\nage: 2\r\n", "age"),
    );
    origin.set("/cap", reply("cache-control: max-age=60\r\n", "cap"));
    let gw = stoa_for(
        &origin,
        &[
            ("o", r#"{ ttl = "60s", freshness = "origin" }"#),
            (
                "cap",
                r#"{ ttl = "1s", freshness = "origin", max_ttl = "1s" }"#,
            ),
            ("r", r#"{ ttl = "60s" }"#),
        ],
    )
    .await;
    for p in [
        "/o/s",
        "/o/m",
        "/o/e",
        "/o/bad",
        "/o/silent",
        "/o/age",
        "/cap/cap",
        "/r/m",
    ] {
        assert_eq!(get(&gw, p).await.x_cache(), "MISS", "{p}");
    }
    // An Expires that is not a date: already expired, not stored.
    assert_eq!(get(&gw, "/o/bad").await.x_cache(), "MISS");
    assert_eq!(origin.calls("/bad"), 2);

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let expect = [
        ("/o/s", "MISS", "s-maxage=1 beats max-age=60"),
        ("/o/m", "MISS", "max-age=1 beats Expires"),
        ("/o/e", "HIT", "Expires - Date = 3 s"),
        (
            "/o/silent",
            "HIT",
            "the route's ttl when the origin is silent",
        ),
        ("/o/age", "MISS", "max-age=3 less Age 2"),
        ("/cap/cap", "MISS", "max-age=60 capped at max_ttl 1 s"),
        ("/r/m", "HIT", "freshness = route ignores max-age"),
    ];
    for (path, x_cache, why) in expect {
        assert_eq!(get(&gw, path).await.x_cache(), x_cache, "{path}: {why}");
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(get(&gw, "/o/e").await.x_cache(), "MISS", "Expires passed");
    assert_eq!(origin.calls("/e"), 2);
    assert_eq!(origin.calls("/silent"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn must_revalidate_disables_stale_and_stale_directives_override_the_route() {
    let origin = Origin::start().await;
    let paths = [
        (
            "/mr",
            "max-age=1, must-revalidate, stale-while-revalidate=30",
        ),
        ("/pr", "max-age=1, proxy-revalidate"),
        ("/swr", "max-age=1, stale-while-revalidate=30"),
        ("/sie0", "max-age=1, stale-if-error=0"),
        ("/sie", "max-age=1"),
    ];
    for (path, cc) in paths {
        origin.set(path, reply(&format!("cache-control: {cc}\r\n"), "first"));
    }
    let gw = stoa_for(
        &origin,
        &[(
            "o",
            r#"{ ttl = "60s", freshness = "origin", stale_if_error = "30s" }"#,
        )],
    )
    .await;
    for (path, _) in paths {
        assert_eq!(get(&gw, &format!("/o{path}")).await.x_cache(), "MISS");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The route has no stale_while_revalidate; the directive gives one.
    let swr = get(&gw, "/o/swr").await;
    assert_eq!((swr.x_cache(), swr.body.as_str()), ("STALE", "first"));
    // must-revalidate overrides the directive: a miss, not a stale copy.
    assert_eq!(get(&gw, "/o/mr").await.x_cache(), "MISS");

    // The upstream fails: the route's stale_if_error serves, unless the answer said
    // stale-if-error=0 or proxy-revalidate.
    let failing = Reply {
        status: 503,
        body: "down".into(),
        ..Reply::default()
    };
    for path in ["/pr", "/sie0", "/sie"] {
        origin.set(path, failing.clone());
    }
    let sie = get(&gw, "/o/sie").await;
    assert_eq!((sie.status, sie.x_cache()), (200, "STALE"));
    for path in ["/o/pr", "/o/sie0"] {
        let a = get(&gw, path).await;
        assert_eq!((a.status, a.body.as_str()), (503, "down"), "{path}");
    }
}

// ---- item 3: no-cache ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_without_a_validator_is_not_stored_but_still_coalesces() {
    let origin = Origin::start().await;
    origin.set(
        "/nc",
        Reply {
            delay: Duration::from_millis(300),
            ..reply("cache-control: no-cache\r\n", "nc")
        },
    );
    let gw = stoa_for(&origin, &[("o", r#"{ ttl = "60s" }"#)]).await;
    let answers = futures_util::future::join_all((0..4).map(|_| get(&gw, "/o/nc"))).await;
    let mut how: Vec<&str> = answers.iter().map(|a| a.x_cache()).collect();
    how.sort_unstable();
    assert_eq!(how, ["COALESCED", "COALESCED", "COALESCED", "MISS"]);
    assert_eq!(origin.calls("/nc"), 1, "one flight for the four");
    for _ in 0..2 {
        let a = get(&gw, "/o/nc").await;
        assert_eq!(
            (a.status, a.x_cache(), a.body.as_str()),
            (200, "MISS", "nc")
        );
    }
    assert_eq!(origin.calls("/nc"), 3, "never served from store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_with_a_validator_is_revalidated_on_every_request() {
    let origin = Origin::start().await;
    origin.set(
        "/v",
        Reply {
            etag: Some("\"v1\"".into()),
            delay: Duration::from_millis(200),
            ..reply(
                "cache-control: no-cache=\"x-secret\", no-cache\r\nx-secret: s\r\n",
                "payload",
            )
        },
    );
    // `no-cache="field"` alone: the answer is stored, without that field.
    origin.set(
        "/field",
        reply(
            "cache-control: no-cache=\"X-Secret\"\r\nx-secret: s\r\n",
            "f",
        ),
    );
    let gw = stoa_for(&origin, &[("o", r#"{ ttl = "60s" }"#)]).await;
    let first = get(&gw, "/o/v").await;
    assert_eq!((first.x_cache(), first.body.as_str()), ("MISS", "payload"));
    assert_eq!(first.header("x-secret"), None);
    for round in 1..=2 {
        let a = get(&gw, "/o/v").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, "payload", "the stored body, after a 304");
        assert_eq!(a.x_cache(), "MISS");
        assert_eq!(origin.conditional_calls("/v"), round);
    }
    let last = origin.heads("/v").pop().unwrap();
    assert_eq!(header_of(&last, "if-none-match").as_deref(), Some("\"v1\""));
    // Concurrent requests share one revalidation.
    let answers = futures_util::future::join_all((0..5).map(|_| get(&gw, "/o/v"))).await;
    assert!(answers.iter().all(|a| a.body == "payload"));
    assert_eq!(origin.conditional_calls("/v"), 3);
    assert_eq!(
        metric(
            &gw,
            r#"stoa_cache_revalidations_total{result="not_modified",route="o"}"#
        )
        .await,
        3.0
    );

    let f = get(&gw, "/o/field").await;
    assert_eq!((f.x_cache(), f.header("x-secret")), ("MISS", None));
    assert_eq!(get(&gw, "/o/field").await.x_cache(), "HIT");

    // The switch keeps its meaning: the upstream's Cache-Control is not read.
    let ignoring = stoa_for(
        &origin,
        &[(
            "o",
            r#"{ ttl = "60s", ignore_upstream_cache_control = true }"#,
        )],
    )
    .await;
    get(&ignoring, "/o/v").await;
    assert_eq!(get(&ignoring, "/o/v").await.x_cache(), "HIT");
}

// ---- item 7: conditional requests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_conditional_request_gets_304_from_memory() {
    let origin = Origin::start().await;
    let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let lm = http_date(modified);
    origin.set(
        "/v",
        Reply {
            etag: Some("\"abc\"".into()),
            ..reply(
                &format!(
                    "cache-control: max-age=60\r\nlast-modified: {lm}\r\nvary: accept-encoding\r\n\
                     content-location: /v.json\r\nx-other: 1\r\n"
                ),
                "body",
            )
        },
    );
    let gw = stoa_for(&origin, &[("o", r#"{ ttl = "60s" }"#)]).await;
    // A cold key: stoa fetches the whole answer (no conditional upstream), then answers 304.
    let cold = get_with(&gw, "GET", "/o/v", "If-None-Match: \"abc\"\r\n").await;
    assert_eq!((cold.status, cold.x_cache()), (304, "MISS"));
    assert_eq!(origin.conditional_calls("/v"), 0);

    let before = http_date(modified - Duration::from_secs(10));
    let cases = [
        ("If-None-Match: \"abc\"\r\n", 304),
        ("If-None-Match: W/\"abc\"\r\n", 304),
        ("If-None-Match: \"x\", \"abc\"\r\n", 304),
        ("If-None-Match: *\r\n", 304),
        ("If-None-Match: \"zzz\"\r\n", 200),
        // If-None-Match takes precedence over If-Modified-Since.
        (
            &*format!("If-None-Match: \"zzz\"\r\nIf-Modified-Since: {lm}\r\n"),
            200,
        ),
        (&*format!("If-Modified-Since: {lm}\r\n"), 304),
        (&*format!("If-Modified-Since: {before}\r\n"), 200),
        ("If-Modified-Since: not a date\r\n", 200),
    ];
    for (extra, status) in &cases {
        let a = get_with(&gw, "GET", "/o/v", extra).await;
        assert_eq!(a.status, *status, "{extra}");
        assert_eq!(a.x_cache(), "HIT", "{extra}");
        if *status == 304 {
            assert_eq!(a.body, "", "{extra}");
            assert_eq!(a.header("content-length"), None, "{extra}");
            assert_eq!(a.header("transfer-encoding"), None, "{extra}");
            assert_eq!(a.header("etag"), Some("\"abc\""));
            assert_eq!(a.header("cache-control"), Some("max-age=60"));
            assert_eq!(a.header("vary"), Some("accept-encoding"));
            assert_eq!(a.header("content-location"), Some("/v.json"));
            assert!(a.header("age").is_some());
            assert_eq!(a.header("x-other"), None);
        } else {
            assert_eq!(a.body, "body");
        }
    }
    let head = get_with(&gw, "HEAD", "/o/v", "If-None-Match: \"abc\"\r\n").await;
    assert_eq!(head.status, 304);
    assert_eq!(origin.calls("/v"), 1, "every answer from memory");
    assert_eq!(
        metric(&gw, r#"stoa_cache_not_modified_total{route="o"}"#).await,
        7.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_entry_is_revalidated_once_and_a_304_keeps_the_body() {
    let origin = Origin::start().await;
    let body = "b".repeat(2000);
    origin.set(
        "/r",
        Reply {
            etag: Some("\"r1\"".into()),
            headers_304: "cache-control: max-age=60\r\nx-custom: new\r\n".into(),
            delay: Duration::from_millis(300),
            ..reply(
                "cache-control: max-age=1\r\nx-custom: old\r\nx-kept: yes\r\n",
                &body,
            )
        },
    );
    let gw = stoa_for(
        &origin,
        &[("o", r#"{ ttl = "60s", freshness = "origin" }"#)],
    )
    .await;
    let first = get(&gw, "/o/r").await;
    assert_eq!(first.header("x-custom"), Some("old"));
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let answers = futures_util::future::join_all((0..200).map(|_| get(&gw, "/o/r"))).await;
    assert_eq!(origin.calls("/r"), 2, "one revalidation for 200 requests");
    assert_eq!(origin.conditional_calls("/r"), 1);
    let mut misses = 0;
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(a.body, body, "the stored body, not refetched");
        assert_eq!(a.header("content-length"), Some("2000"));
        assert_eq!(
            a.header("x-custom"),
            Some("new"),
            "the 304's headers replace"
        );
        assert_eq!(a.header("x-kept"), Some("yes"), "the others stay");
        assert_eq!(a.header("cache-control"), Some("max-age=60"));
        match a.x_cache() {
            "MISS" => misses += 1,
            // A request that arrives once the flight is over finds the refreshed entry.
            other => assert!(other == "COALESCED" || other == "HIT", "{other}"),
        }
    }
    assert_eq!(misses, 1);
    // The 304's max-age=60 applies now.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&gw, "/o/r").await.x_cache(), "HIT");
    assert_eq!(origin.calls("/r"), 2);

    // A 200 to a revalidation replaces the entry.
    let gw2 = stoa_for(&origin, &[("o", r#"{ ttl = "1s" }"#)]).await;
    origin.set(
        "/q",
        Reply {
            etag: Some("\"q1\"".into()),
            ..reply("", "one")
        },
    );
    get(&gw2, "/o/q").await;
    origin.set("/q", reply("etag: \"q2\"\r\n", "two"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = get(&gw2, "/o/q").await;
    assert_eq!((a.x_cache(), a.body.as_str()), ("MISS", "two"));
    assert_eq!(origin.conditional_calls("/q"), 1);
    assert_eq!(get(&gw2, "/o/q").await.x_cache(), "HIT");
    assert_eq!(
        metric(
            &gw2,
            r#"stoa_cache_revalidations_total{result="modified",route="o"}"#
        )
        .await,
        1.0
    );
}

// ---- item 6: RFC 9111 §3.5, requests with Authorization ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_shares_only_answers_marked_for_sharing() {
    let origin = Origin::start().await;
    origin.set(
        "/pub",
        reply("cache-control: public, max-age=60\r\n", "pub"),
    );
    origin.set("/smax", reply("cache-control: s-maxage=60\r\n", "smax"));
    origin.set("/plain", reply("", "plain"));
    let gw = stoa_for(&origin, &[("o", r#"{ ttl = "60s" }"#)]).await;
    let auth = "Authorization: Bearer alice\r\n";

    // Filled by anonymous requests.
    for p in ["/o/pub", "/o/smax", "/o/plain"] {
        assert_eq!(get(&gw, p).await.x_cache(), "MISS");
    }
    for p in ["/o/pub", "/o/smax"] {
        let a = get_with(&gw, "GET", p, auth).await;
        assert_eq!(a.x_cache(), "HIT", "{p}: marked for sharing");
    }
    let plain = get_with(&gw, "GET", "/o/plain", auth).await;
    assert_eq!(
        plain.x_cache(),
        "BYPASS",
        "not marked: the request's own fetch"
    );
    let own = origin.heads("/plain").pop().unwrap();
    assert_eq!(
        header_of(&own, "authorization").as_deref(),
        Some("Bearer alice")
    );
    // With a cookie too, it stays private.
    let cookie = get_with(&gw, "GET", "/o/pub", &format!("{auth}Cookie: a=1\r\n")).await;
    assert_eq!(cookie.x_cache(), "BYPASS");

    // A request with credentials never fills the cache, even with a public answer.
    origin.set(
        "/cold",
        reply("cache-control: public, max-age=60\r\n", "cold"),
    );
    assert_eq!(
        get_with(&gw, "GET", "/o/cold", auth).await.x_cache(),
        "BYPASS"
    );
    assert_eq!(get(&gw, "/o/cold").await.x_cache(), "MISS");
    assert_eq!(origin.calls("/pub"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_refresh_revalidates_too() {
    let origin = Origin::start().await;
    origin.set(
        "/b",
        Reply {
            etag: Some("\"b1\"".into()),
            headers_304: "x-round: 2\r\n".into(),
            ..reply("x-round: 1\r\n", "kept")
        },
    );
    let gw = stoa_for(
        &origin,
        &[("o", r#"{ ttl = "1s", stale_while_revalidate = "30s" }"#)],
    )
    .await;
    get(&gw, "/o/b").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = get(&gw, "/o/b").await;
    assert_eq!(
        (stale.x_cache(), stale.header("x-round")),
        ("STALE", Some("1"))
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while origin.calls("/b") < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(origin.conditional_calls("/b"), 1);
    let hit = get(&gw, "/o/b").await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(
        (hit.body.as_str(), hit.header("x-round")),
        ("kept", Some("2"))
    );
}
