//! Targeted cache control (RFC 9213) and heuristic freshness (RFC 9111 §4.2.2). A small origin
//! of the test's own answers each path with the header lines the test gives it (a matching
//! `If-None-Match` gets a 304 with the lines given for it) and counts its requests; the
//! answers clients get are read on the front (the default) and on pingora's proxy lane
//! (`server.front = false`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{path_of, raw_send, serve_heads, text_answer, RawAnswer, StoaProcess};

#[derive(Clone, Default)]
struct Reply {
    status: u16,
    /// Header lines, each ending in CRLF.
    headers: String,
    body: String,
    /// Answer an `If-None-Match` holding this tag with a 304 ...
    etag: Option<String>,
    /// ... carrying these header lines.
    headers_304: String,
}

fn ok(headers: &str, body: &str) -> Reply {
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
    async fn start(replies: &[(&str, Reply)]) -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let replies: Arc<Mutex<HashMap<String, Reply>>> = Arc::new(Mutex::new(
            replies
                .iter()
                .map(|(p, r)| (p.to_string(), r.clone()))
                .collect(),
        ));
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r, s) = (replies.clone(), seen.clone());
        let task = serve_heads(listener, move |head| {
            let (replies, seen) = (r.clone(), s.clone());
            async move {
                seen.lock().unwrap().push(head.clone());
                let reply = replies.lock().unwrap().get(&path_of(&head)).cloned();
                let Some(reply) = reply else {
                    return text_answer(404, "", "none");
                };
                let etag = reply.etag.as_deref();
                match (etag, header_of(&head, "if-none-match")) {
                    (Some(tag), Some(inm)) if inm.contains(tag) => format!(
                        "HTTP/1.1 304 Not Modified\r\netag: {tag}\r\n{}\r\n",
                        reply.headers_304
                    ),
                    _ => {
                        let tag = etag.map(|t| format!("etag: {t}\r\n")).unwrap_or_default();
                        let extra = format!("{tag}{}", reply.headers);
                        text_answer(reply.status, &extra, &reply.body)
                    }
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

    fn heads(&self, path: &str) -> Vec<String> {
        let prefix = format!("GET {path} ");
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|h| h.starts_with(&prefix))
            .cloned()
            .collect()
    }

    fn calls(&self, path: &str) -> usize {
        self.heads(path).len()
    }

    fn conditional_calls(&self, path: &str) -> usize {
        let heads = self.heads(path);
        heads
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

/// stoa on `server_extra` with `rest` after `[upstreams.o]` on `origin`; each route of
/// `routes` (name, cache table or "" for none, more keys) serves `/<name>/{*rest}` as the
/// origin's `/{rest}`.
async fn stoa_for(
    origin: &Origin,
    server_extra: &str,
    head: &str,
    routes: &[(&str, &str)],
) -> StoaProcess {
    let mut text = format!(
        "{head}\n[upstreams.o]\nurl = \"http://127.0.0.1:{}\"\ntimeout = \"5s\"\n",
        origin.port
    );
    for (name, cache) in routes {
        let cache = if cache.is_empty() {
            String::new()
        } else {
            format!("cache = {cache}\n")
        };
        text.push_str(&format!(
            "\n[[routes]]\nname = \"{name}\"\nmethods = [\"GET\", \"HEAD\"]\n\
             path = \"/{name}/{{*rest}}\"\nupstream = \"o\"\nrewrite = \"/{{rest}}\"\n{cache}"
        ));
    }
    StoaProcess::start_with(server_extra, &text).await
}

async fn get(gw: &StoaProcess, path: &str) -> RawAnswer {
    raw_send(
        gw.port,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// `(X-Cache, body)` of a GET.
async fn how(gw: &StoaProcess, path: &str) -> (String, String) {
    let a = get(gw, path).await;
    (a.x_cache().to_string(), a.body)
}

fn http_date(at: SystemTime) -> String {
    httpdate::fmt_http_date(at)
}

/// Every answer's stoa field is gone, whatever the lane, the route or the way it was
/// answered; `CDN-Cache-Control` and `Cache-Control` go on as the origin gave them.
fn assert_passed_on(a: &RawAnswer, cdn: Option<&str>, cc: Option<&str>, what: &str) {
    assert_eq!(a.header("stoa-cache-control"), None, "{what}");
    assert_eq!(a.header("cdn-cache-control"), cdn, "{what}");
    assert_eq!(a.header("cache-control"), cc, "{what}");
}

async fn targeted_fields_on(server_extra: &str) {
    let lines = |cc: &str, cdn: &str, own: &str| {
        let mut s = String::new();
        for (name, value) in [
            ("Cache-Control", cc),
            ("CDN-Cache-Control", cdn),
            ("Stoa-Cache-Control", own),
        ] {
            if !value.is_empty() {
                s.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        s
    };
    let origin = Origin::start(&[
        // stoa's own field beats both others.
        (
            "/own",
            ok(&lines("max-age=60", "max-age=60", "max-age=1"), "own"),
        ),
        // CDN-Cache-Control beats Cache-Control.
        ("/cdn", ok(&lines("max-age=60", "max-age=1", ""), "cdn")),
        // ... also to store what Cache-Control keeps from browsers and shared caches.
        (
            "/cdn-long",
            ok(&lines("no-store", "max-age=60", ""), "long"),
        ),
        // An invalid stoa field (an upper-case key) is not read: CDN-Cache-Control is.
        (
            "/bad",
            ok(
                &lines("max-age=60", "max-age=1", "max-age=60, Max-Age=60"),
                "bad",
            ),
        ),
        // no-store aimed at stoa.
        (
            "/no-store",
            ok(&lines("max-age=60", "max-age=60", "no-store"), "ns"),
        ),
        // Larger than the route's max_entry_bytes: streamed through.
        (
            "/big",
            ok(&lines("", "max-age=60", "max-age=60"), &"b".repeat(4000)),
        ),
        // A 304 without the stoa field leaves the stored answer's in force.
        (
            "/reval",
            Reply {
                etag: Some("\"r1\"".into()),
                headers_304: "cache-control: max-age=0\r\n".into(),
                ..ok(&lines("max-age=0", "", "max-age=1"), "reval")
            },
        ),
    ])
    .await;
    let gw = stoa_for(
        &origin,
        server_extra,
        "",
        &[
            ("o", r#"{ ttl = "60s", freshness = "origin" }"#),
            (
                "big",
                r#"{ ttl = "60s", freshness = "origin", max_entry_bytes = "1KiB" }"#,
            ),
            ("r", r#"{ ttl = "60s" }"#),
            ("p", ""),
        ],
    )
    .await;

    // What clients get: never stoa's field, the others as they were.
    let answers = [
        ("/o/own", "MISS", Some("max-age=60"), Some("max-age=60")),
        ("/o/own", "HIT", Some("max-age=60"), Some("max-age=60")),
        ("/o/cdn", "MISS", Some("max-age=1"), Some("max-age=60")),
        ("/o/cdn-long", "MISS", Some("max-age=60"), Some("no-store")),
        ("/o/cdn-long", "HIT", Some("max-age=60"), Some("no-store")),
        ("/o/bad", "MISS", Some("max-age=1"), Some("max-age=60")),
        (
            "/o/no-store",
            "MISS",
            Some("max-age=60"),
            Some("max-age=60"),
        ),
        (
            "/o/no-store",
            "MISS",
            Some("max-age=60"),
            Some("max-age=60"),
        ),
        ("/big/big", "BYPASS", Some("max-age=60"), None),
        ("/o/reval", "MISS", None, Some("max-age=0")),
        ("/r/cdn-long", "MISS", Some("max-age=60"), Some("no-store")),
        ("/r/cdn-long", "HIT", Some("max-age=60"), Some("no-store")),
        (
            "/r/no-store",
            "MISS",
            Some("max-age=60"),
            Some("max-age=60"),
        ),
        (
            "/r/no-store",
            "MISS",
            Some("max-age=60"),
            Some("max-age=60"),
        ),
        ("/p/own", "", Some("max-age=60"), Some("max-age=60")),
        ("/p/no-store", "", Some("max-age=60"), Some("max-age=60")),
        ("/p/big", "", Some("max-age=60"), None),
    ];
    for (path, x_cache, cdn, cc) in answers {
        let a = get(&gw, path).await;
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.x_cache(), x_cache, "{path}");
        assert_passed_on(&a, cdn, cc, path);
    }
    let ns = get(&gw, "/o/no-store").await;
    let cache_status = ns.header("cache-status").unwrap_or_default();
    assert!(cache_status.ends_with("detail=no-store"), "{cache_status}");
    assert_eq!(
        origin.calls("/no-store"),
        6,
        "never stored: 3 on o, 2 on r (and 1 passed through)"
    );

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let expect = [
        ("/o/own", "MISS", "stoa's max-age=1 beats the others' 60"),
        ("/o/cdn", "MISS", "CDN-Cache-Control's max-age=1 beats 60"),
        (
            "/o/cdn-long",
            "HIT",
            "CDN-Cache-Control's max-age=60 beats no-store",
        ),
        ("/o/bad", "MISS", "the invalid stoa field is not read"),
        ("/r/cdn-long", "HIT", "freshness = route: the route's ttl"),
    ];
    for (path, x_cache, why) in expect {
        assert_eq!(how(&gw, path).await.0, x_cache, "{path}: {why}");
    }
    // Revalidated: the 304 says max-age=0 in Cache-Control only, so the stored stoa field
    // (max-age=1) still counts: stored again, fresh for a second.
    let a = get(&gw, "/o/reval").await;
    assert_eq!((a.x_cache(), a.body.as_str()), ("MISS", "reval"));
    assert_passed_on(&a, None, Some("max-age=0"), "/o/reval after a 304");
    assert_eq!(origin.conditional_calls("/reval"), 1);
    let a = get(&gw, "/o/reval").await;
    assert_eq!(a.x_cache(), "HIT", "the kept field gives a second");
    assert_passed_on(&a, None, Some("max-age=0"), "/o/reval hit");
    assert_eq!(origin.calls("/reval"), 2);

    // A 304 that brings its own stoa field replaces the kept one.
    origin.set(
        "/reval",
        Reply {
            etag: Some("\"r1\"".into()),
            headers_304: "stoa-cache-control: no-cache\r\n".into(),
            ..ok("cache-control: max-age=60\r\n", "reval")
        },
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for round in 2..=3 {
        let a = get(&gw, "/o/reval").await;
        assert_eq!((a.x_cache(), a.body.as_str()), ("MISS", "reval"));
        assert_passed_on(&a, None, Some("max-age=0"), "/o/reval after no-cache");
        assert_eq!(origin.conditional_calls("/reval"), round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_fields_decide_for_stoa_and_its_own_never_reaches_clients_front() {
    targeted_fields_on("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_fields_decide_for_stoa_and_its_own_never_reaches_clients_proxy_lane() {
    targeted_fields_on("front = false").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_targeted_field_is_the_one_read_and_removed() {
    let origin = Origin::start(&[(
        "/x",
        ok(
            "cache-control: max-age=60\r\nedge-control: max-age=1\r\n\
             stoa-cache-control: max-age=60\r\n",
            "x",
        ),
    )])
    .await;
    let head = "[cache]\ntargeted_field = \"Edge-Control\"\n";
    let routes = [("o", r#"{ ttl = "60s", freshness = "origin" }"#), ("p", "")];
    for lane in ["", "front = false"] {
        let gw = stoa_for(&origin, lane, head, &routes).await;
        for path in ["/o/x", "/p/x"] {
            let a = get(&gw, path).await;
            assert_eq!(a.header("edge-control"), None, "{lane} {path}");
            assert_eq!(
                a.header("stoa-cache-control"),
                Some("max-age=60"),
                "{lane} {path}: no longer stoa's"
            );
        }
        assert_eq!(how(&gw, "/o/x").await.0, "HIT");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            how(&gw, "/o/x").await.0,
            "MISS",
            "{lane}: edge-control's 1 s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heuristic_silence_follows_rfc_9111_and_the_default_keeps_the_route_ttl() {
    let now = SystemTime::now();
    let ago = |s: u64| http_date(now - Duration::from_secs(s));
    let dated = |lm: &str| format!("date: {}\r\nlast-modified: {lm}\r\n", http_date(now));
    let origin = Origin::start(&[
        // A tenth of 10 s: 1 s.
        ("/recent", ok(&dated(&ago(10)), "recent")),
        // A tenth of a day, capped at the route's ttl (3 s).
        ("/old", ok(&dated(&ago(86_400)), "old")),
        // Nothing to go on, nothing to revalidate with.
        ("/silent", ok("", "silent")),
        // Nothing to go on, but a validator: stored, revalidated on every request.
        (
            "/tagged",
            Reply {
                etag: Some("\"t1\"".into()),
                ..ok("", "tagged")
            },
        ),
        // 302 is not heuristically cacheable, unless marked public.
        (
            "/found",
            Reply {
                status: 302,
                ..ok(&format!("location: /x\r\n{}", dated(&ago(100))), "found")
            },
        ),
        (
            "/found-public",
            Reply {
                status: 302,
                ..ok(
                    &format!(
                        "location: /x\r\ncache-control: public\r\n{}",
                        dated(&ago(100))
                    ),
                    "found",
                )
            },
        ),
        // What the answer states comes first.
        (
            "/stated",
            ok(
                &format!("cdn-cache-control: max-age=60\r\n{}", dated(&ago(10))),
                "s",
            ),
        ),
    ])
    .await;
    let gw = stoa_for(
        &origin,
        "",
        "",
        &[
            (
                "h",
                r#"{ ttl = "3s", freshness = "origin", silent = "heuristic", statuses = { 302 = "3s" } }"#,
            ),
            ("t", r#"{ ttl = "3s", freshness = "origin", statuses = { 302 = "3s" } }"#),
        ],
    )
    .await;
    let paths = [
        "/recent",
        "/old",
        "/silent",
        "/tagged",
        "/found",
        "/found-public",
        "/stated",
    ];
    for p in paths {
        for route in ["/h", "/t"] {
            let path = format!("{route}{p}");
            assert_eq!(how(&gw, &path).await.0, "MISS", "{path}");
        }
    }
    let second = [
        ("/h/recent", "HIT", "1 s from Last-Modified"),
        ("/h/old", "HIT", "3 s: the ttl caps the heuristic"),
        ("/h/silent", "MISS", "no lifetime, no validator: not stored"),
        ("/h/tagged", "MISS", "no lifetime: revalidated"),
        ("/h/found", "MISS", "302 is not heuristically cacheable"),
        ("/h/found-public", "HIT", "public allows the heuristic"),
        ("/h/stated", "HIT", "max-age=60 stated"),
    ];
    for (path, x_cache, why) in second {
        let a = get(&gw, path).await;
        assert_eq!(a.x_cache(), x_cache, "{path}: {why}");
        if path == "/h/silent" || path == "/h/found" {
            let cs = a.header("cache-status").unwrap_or_default();
            assert!(cs.ends_with("detail=no-freshness"), "{path}: {cs}");
        }
    }
    assert_eq!(origin.conditional_calls("/tagged"), 1, "h revalidated");
    // The default: the route's ttl for every one of them.
    for p in paths {
        let path = format!("/t{p}");
        assert_eq!(how(&gw, &path).await.0, "HIT", "{path}");
    }

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let third = [
        ("/h/recent", "MISS", "its second is over"),
        ("/h/old", "HIT", "still within the ttl"),
        ("/h/stated", "HIT", "max-age=60 stated"),
        ("/t/recent", "HIT", "the route's ttl"),
    ];
    for (path, x_cache, why) in third {
        assert_eq!(how(&gw, path).await.0, x_cache, "{path}: {why}");
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(how(&gw, "/h/old").await.0, "MISS", "capped at the ttl");
    assert_eq!(
        how(&gw, "/h/stated").await.0,
        "HIT",
        "not capped by the ttl"
    );
}
