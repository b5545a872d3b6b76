//! Issue 13, items 8 and 9: `Cache-Status` (RFC 9211) on the answers of cached routes, and the
//! `RateLimit-Policy` / `RateLimit` structured fields of draft-ietf-httpapi-ratelimit-headers
//! (with the older `RateLimit-Limit/-Remaining/-Reset` trio behind `server.rate_limit_headers`).
//! Every field is parsed as an RFC 8941 structured field with the `sfv` crate.

mod common;

use common::{EchoUpstream, StoaProcess};
use sfv::{BareItem, Item, ListEntry, Parser};

/// The one item of a structured-field List header (panics on anything else).
fn list_item(r: &reqwest::Response, name: &str) -> Item {
    let value = r
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} ({}): {:?}", r.status(), r.headers()));
    let list = Parser::parse_list(value.as_bytes())
        .unwrap_or_else(|e| panic!("{name}: {value:?} is not a structured-field list: {e}"));
    assert_eq!(list.len(), 1, "{name}: {value:?}");
    match list.into_iter().next() {
        Some(ListEntry::Item(item)) => item,
        other => panic!("{name}: {value:?} is not an item: {other:?}"),
    }
}

fn int(item: &Item, param: &str) -> i64 {
    item.params
        .get(param)
        .and_then(BareItem::as_int)
        .unwrap_or_else(|| panic!("no integer {param} in {item:?}"))
}

/// A limited pass-through route in front of an echo origin: 3 requests at once, then one
/// every 20 s (`per_minute = 3`).
fn limited(origin: &EchoUpstream) -> String {
    format!(
        "[rate_limits.per_client]\nper_minute = 3\nburst = 3\n\n\
         [upstreams.echo]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"echo\"\nmethods = [\"GET\"]\npath = \"/echo\"\nupstream = \"echo\"\nrate_limit = \"per_client\"\n",
        origin.url()
    )
}

const TRIO: [&str; 3] = ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"];
const DRAFT: [&str; 2] = ["ratelimit-policy", "ratelimit"];

#[tokio::test]
async fn draft_ratelimit_fields_parse_count_down_and_explain_a_429() {
    let origin = EchoUpstream::start().await;
    let gw = StoaProcess::start(&limited(&origin)).await;
    let http = reqwest::Client::new();
    for expected in [2, 1, 0] {
        let r = http.get(gw.url("/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let policy = list_item(&r, "ratelimit-policy");
        assert_eq!(policy.bare_item.as_str(), Some("per_client"));
        // The bucket holds 3 and fills in 60 s.
        assert_eq!((int(&policy, "q"), int(&policy, "w")), (3, 60));
        let state = list_item(&r, "ratelimit");
        assert_eq!(state.bare_item.as_str(), Some("per_client"));
        assert_eq!(int(&state, "r"), expected, "{:?}", r.headers());
        // One more request's worth comes back within 20 s.
        assert_eq!(int(&state, "t"), 20);
        for name in TRIO {
            assert!(!r.headers().contains_key(name), "{name} by default");
        }
        assert!(!r.headers().contains_key("retry-after"));
    }
    let r = http.get(gw.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let state = list_item(&r, "ratelimit");
    assert_eq!(int(&state, "r"), 0);
    let t = int(&state, "t");
    assert!(t > 0 && t <= 20, "t={t}");
    let retry_after: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, t, "Retry-After and t name the same wait");
    let policy = list_item(&r, "ratelimit-policy");
    assert_eq!((int(&policy, "q"), int(&policy, "w")), (3, 60));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
}

#[tokio::test]
async fn legacy_setting_gives_the_trio_and_none_gives_no_fields() {
    let origin = EchoUpstream::start().await;
    let http = reqwest::Client::new();

    let gw = StoaProcess::start_with("rate_limit_headers = \"legacy\"", &limited(&origin)).await;
    let r = http.get(gw.url("/echo")).send().await.unwrap();
    let trio: Vec<String> = TRIO
        .iter()
        .map(|h| r.headers()[*h].to_str().unwrap().to_string())
        .collect();
    assert_eq!(trio, ["3", "2", "20"]);
    for name in DRAFT {
        assert!(!r.headers().contains_key(name), "{name} with legacy");
    }
    drop(gw);

    let gw = StoaProcess::start_with("rate_limit_headers = \"none\"", &limited(&origin)).await;
    for _ in 0..3 {
        let r = http.get(gw.url("/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        for name in TRIO.iter().chain(DRAFT.iter()) {
            assert!(!r.headers().contains_key(*name), "{name} with none");
        }
    }
    let r = http.get(gw.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(
        r.headers().contains_key("retry-after"),
        "a 429 keeps Retry-After"
    );
    for name in TRIO.iter().chain(DRAFT.iter()) {
        assert!(!r.headers().contains_key(*name), "{name} with none");
    }
}

// ---- item 8: Cache-Status (RFC 9211) ----

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{path_of, serve_heads, text_answer};

/// An origin answering by path: `/up/*` a 200 carrying a `Cache-Status` of a cache behind
/// stoa; `/cookie/*`, `/nostore/*`, `/private/*`, `/vary/*` a 200 with `Set-Cookie`,
/// `Cache-Control: no-store`, `Cache-Control: private`, `Vary: *`; `/teapot/*` a 418;
/// `/slow/*` a 200 after 300 ms; `/flip/*` the status in `flip`; `/big/*` a 200 of 5000
/// bytes; anything else a plain 200. Counts requests.
struct Origin {
    port: u16,
    calls: Arc<AtomicUsize>,
    flip: Arc<AtomicU16>,
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
        let calls = Arc::new(AtomicUsize::new(0));
        let flip = Arc::new(AtomicU16::new(200));
        let (c, f) = (calls.clone(), flip.clone());
        let task = serve_heads(listener, move |head| {
            let (calls, flip) = (c.clone(), f.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let path = path_of(&head);
                let segment = path.split('/').nth(1).unwrap_or_default();
                let (status, extra, body) = match segment {
                    "up" => (200, "Cache-Status: \"behind\"; hit\r\n", "up".to_string()),
                    "cookie" => (200, "Set-Cookie: a=b\r\n", "c".to_string()),
                    "nostore" => (200, "Cache-Control: no-store\r\n", "n".to_string()),
                    "private" => (200, "Cache-Control: private\r\n", "p".to_string()),
                    "vary" => (200, "Vary: *\r\n", "v".to_string()),
                    "teapot" => (418, "", "tea".to_string()),
                    "slow" => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        (200, "", "slow".to_string())
                    }
                    "flip" => {
                        let s = flip.load(Ordering::SeqCst);
                        (s, "", format!("status {s}"))
                    }
                    "big" => (200, "", "x".repeat(5000)),
                    _ => (200, "", "plain".to_string()),
                };
                text_answer(status, extra, &body)
            }
        });
        Origin {
            port,
            calls,
            flip,
            task,
        }
    }
}

/// stoa with cached routes on `origin`: `/c/{*rest}` (ttl 60 s, stale_if_error 60 s,
/// entries up to 1 KiB, bypass for unkeyed bodies), `/s/{*rest}` (ttl 1 s,
/// stale_while_revalidate 60 s), `/e/{*rest}` (ttl 1 s, stale_if_error 60 s), `/l/{*rest}` (limited to one request a minute) and
/// `/down/{*rest}` on an upstream that refuses connections.
async fn stoa_for(origin: &Origin) -> StoaProcess {
    stoa_with(origin, "").await
}

/// [`stoa_for`], with `server_extra` in its `[server]` section.
async fn stoa_with(origin: &Origin, server_extra: &str) -> StoaProcess {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let route = |name: &str, upstream: &str, cache: &str, extra: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"/{name}/{{*rest}}\"\n\
             upstream = \"{upstream}\"\nrewrite = \"/{{rest}}\"\ncache = {cache}\n{extra}\n\n"
        )
    };
    StoaProcess::start_with(server_extra, &format!(
        "[rate_limits.one]\nper_minute = 1\nburst = 1\n\n\
         [upstreams.o]\nurl = \"http://127.0.0.1:{}\"\ntimeout = \"5s\"\n\n\
         [upstreams.down]\nurl = \"http://127.0.0.1:{closed_port}\"\nconnect_timeout = \"1s\"\n\n{}{}{}{}{}",
        origin.port,
        route(
            "c",
            "o",
            r#"{ ttl = "60s", stale_if_error = "60s", max_entry_bytes = "1KiB", unkeyed_body = "bypass" }"#,
            ""
        ),
        route("s", "o", r#"{ ttl = "1s", stale_while_revalidate = "60s" }"#, ""),
        route("e", "o", r#"{ ttl = "1s", stale_if_error = "60s" }"#, ""),
        route("l", "o", r#"{ ttl = "60s" }"#, "rate_limit = \"one\""),
        route("down", "down", r#"{ ttl = "60s" }"#, ""),
    ))
    .await
}

/// The members of an answer's `Cache-Status`, every field line in order, parsed as one
/// RFC 8941 List.
fn cache_status(r: &reqwest::Response) -> Vec<Item> {
    let lines: Vec<&str> = r
        .headers()
        .get_all("cache-status")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        !lines.is_empty(),
        "no Cache-Status ({}): {:?}",
        r.status(),
        r.headers()
    );
    let joined = lines.join(", ");
    Parser::parse_list(joined.as_bytes())
        .unwrap_or_else(|e| panic!("Cache-Status {joined:?} is not a structured-field list: {e}"))
        .into_iter()
        .map(|m| match m {
            ListEntry::Item(item) => item,
            other => panic!("Cache-Status member {other:?} is not an item"),
        })
        .collect()
}

/// stoa's member: the last one, named by the token `stoa`.
fn stoa_member(r: &reqwest::Response) -> Item {
    let members = cache_status(r);
    let last = members.last().unwrap().clone();
    assert_eq!(last.bare_item.as_token(), Some("stoa"), "{members:?}");
    last
}

/// The member's parameters as `name` or `name=value` text, in order, without `ttl`'s value.
fn shape(item: &Item) -> Vec<String> {
    item.params
        .iter()
        .map(|(k, v)| match v {
            BareItem::Boolean(true) => k.clone(),
            _ if k == "ttl" => "ttl".to_string(),
            BareItem::Integer(i) => format!("{k}={i}"),
            BareItem::Token(t) => format!("{k}={t}"),
            BareItem::String(s) => format!("{k}={s}"),
            other => format!("{k}={other:?}"),
        })
        .collect()
}

async fn get(http: &reqwest::Client, gw: &StoaProcess, path: &str) -> reqwest::Response {
    http.get(gw.url(path)).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_stored_then_a_hit_counts_its_ttl_after_the_upstreams_member() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin).await;
    let http = reqwest::Client::new();

    let r = get(&http, &gw, "/c/up/1").await;
    assert_eq!(r.headers()["x-cache"], "MISS");
    let members = cache_status(&r);
    assert_eq!(members.len(), 2, "{members:?}");
    // The cache nearer the origin comes first; stoa appends its own member.
    assert_eq!(members[0].bare_item.as_str(), Some("behind"));
    assert_eq!(shape(&members[0]), ["hit"]);
    let stoa = &members[1];
    assert_eq!(stoa.bare_item.as_token(), Some("stoa"));
    assert_eq!(shape(stoa), ["fwd=miss", "fwd-status=200", "stored", "ttl"]);
    assert_eq!(int(stoa, "ttl"), 60);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(&http, &gw, "/c/up/1").await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    let members = cache_status(&r);
    assert_eq!(members.len(), 2, "{members:?}");
    assert_eq!(members[0].bare_item.as_str(), Some("behind"));
    assert_eq!(shape(&members[1]), ["hit", "ttl"]);
    let ttl = int(&members[1], "ttl");
    assert!((57..=59).contains(&ttl), "ttl={ttl}");
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_a_hit_keeps_the_upstreams_member_before_its_own() {
    let origin = Origin::start().await;
    let gw = stoa_with(&origin, "h2c = true").await;
    let send = common::h2::h2c(gw.port).await;
    let miss = h2_cache_status(&send, "/c/up/2").await;
    assert_eq!(miss.len(), 2, "{miss:?}");
    assert!(miss[1].starts_with("stoa; fwd=miss"), "{miss:?}");
    // Hits start from the entry's prepared HTTP/2 head: the upstream's line, then stoa's.
    for _ in 0..2 {
        let hit = h2_cache_status(&send, "/c/up/2").await;
        assert_eq!(hit.len(), 2, "{hit:?}");
        assert_eq!(hit[0], miss[0]);
        assert!(hit[1].starts_with("stoa; hit; ttl="), "{hit:?}");
    }
    // And a route whose upstream sends none: one member, stoa's.
    let miss = h2_cache_status(&send, "/c/plain/2").await;
    assert_eq!(miss.len(), 1, "{miss:?}");
    let hit = h2_cache_status(&send, "/c/plain/2").await;
    assert_eq!(hit.len(), 1, "{hit:?}");
    assert!(hit[0].starts_with("stoa; hit; ttl="), "{hit:?}");
    assert_eq!(origin.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_not_stored_says_why() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin).await;
    let http = reqwest::Client::new();
    for (path, status, detail) in [
        ("/c/cookie/1", 200, "set-cookie"),
        ("/c/nostore/1", 200, "no-store"),
        ("/c/private/1", 200, "private"),
        ("/c/vary/1", 200, "vary"),
        ("/c/teapot/1", 418, "status"),
    ] {
        let r = get(&http, &gw, path).await;
        assert_eq!(r.status().as_u16(), status);
        assert_eq!(r.headers()["x-cache"], "MISS", "{path}");
        assert_eq!(
            shape(&stoa_member(&r)),
            [
                "fwd=miss".to_string(),
                format!("fwd-status={status}"),
                format!("detail={detail}")
            ],
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_one_fetch_say_collapsed() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin).await;
    let http = reqwest::Client::new();
    let answers =
        futures_util::future::join_all((0..4).map(|_| get(&http, &gw, "/c/slow/1"))).await;
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
    let mut shapes: Vec<(String, Vec<String>)> = answers
        .iter()
        .map(|r| {
            let x_cache = r.headers()["x-cache"].to_str().unwrap().to_string();
            (x_cache, shape(&stoa_member(r)))
        })
        .collect();
    shapes.sort();
    let collapsed = (
        "COALESCED".to_string(),
        ["fwd=miss", "collapsed", "fwd-status=200", "stored", "ttl"]
            .map(String::from)
            .to_vec(),
    );
    let led = (
        "MISS".to_string(),
        ["fwd=miss", "fwd-status=200", "stored", "ttl"]
            .map(String::from)
            .to_vec(),
    );
    assert_eq!(
        shapes,
        [collapsed.clone(), collapsed.clone(), collapsed, led]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_copies_say_how_they_were_served() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin).await;
    let http = reqwest::Client::new();

    assert_eq!(
        get(&http, &gw, "/s/plain/1").await.headers()["x-cache"],
        "MISS"
    );
    assert_eq!(
        get(&http, &gw, "/e/flip/1").await.headers()["x-cache"],
        "MISS"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;

    // stale-while-revalidate: answered from memory, the request itself not forwarded.
    let r = get(&http, &gw, "/s/plain/1").await;
    assert_eq!(r.headers()["x-cache"], "STALE");
    let m = stoa_member(&r);
    assert_eq!(shape(&m), ["hit", "ttl", "detail=stale-while-revalidate"]);
    assert!(int(&m, "ttl") < 0, "{m:?}");

    // stale-if-error: forwarded because the copy was stale, the forward failed (503), and
    // the stale copy served.
    origin.flip.store(503, Ordering::SeqCst);
    // Let the background refresh the stale answer above started land first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = origin.calls.load(Ordering::SeqCst);
    let r = get(&http, &gw, "/e/flip/1").await;
    assert_eq!(
        origin.calls.load(Ordering::SeqCst),
        calls + 1,
        "went forward"
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "STALE");
    let m = stoa_member(&r);
    assert_eq!(shape(&m), ["fwd=stale", "ttl", "detail=stale-if-error"]);
    assert!(int(&m, "ttl") < 0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypasses_and_stoas_own_errors_say_why() {
    let origin = Origin::start().await;
    let gw = stoa_for(&origin).await;
    let http = reqwest::Client::new();

    let r = http
        .get(gw.url("/c/plain/1"))
        .header("authorization", "Bearer x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    assert_eq!(
        shape(&stoa_member(&r)),
        ["fwd=bypass", "fwd-status=200", "detail=private-request"]
    );

    let r = http
        .get(gw.url("/c/plain/2"))
        .body("{\"a\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    assert_eq!(
        shape(&stoa_member(&r)),
        ["fwd=bypass", "fwd-status=200", "detail=unkeyed-body"]
    );

    let r = get(&http, &gw, "/c/big/1").await;
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    assert_eq!(
        shape(&stoa_member(&r)),
        ["fwd=bypass", "fwd-status=200", "detail=too-large"]
    );
    assert_eq!(r.bytes().await.unwrap().len(), 5000);

    let r = get(&http, &gw, "/down/x").await;
    assert_eq!(r.status(), 502);
    assert_eq!(
        shape(&stoa_member(&r)),
        ["fwd=miss", "detail=upstream_unreachable"]
    );

    // A 429 given before the cache is asked: nothing went forward.
    assert_eq!(get(&http, &gw, "/l/plain/1").await.status(), 200);
    let r = get(&http, &gw, "/l/plain/2").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    assert_eq!(shape(&stoa_member(&r)), ["detail=rate_limited"]);
}

/// The `Cache-Status` lines of an HTTP/2 answer, in order (it has one `Age`).
async fn h2_cache_status(send: &h2::client::SendRequest<bytes::Bytes>, path: &str) -> Vec<String> {
    let (status, headers, _) = common::h2::get(send, path, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get_all("age").iter().count(), 1);
    headers
        .get_all("cache-status")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}
