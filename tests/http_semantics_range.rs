//! Byte ranges of cached answers (RFC 9110 §14) and interim answers of the upstream: a
//! GET with one byte range gets its part (206) from the stored 200, on every lane (the
//! front, pingora's proxy, HTTP/2); a range past the end gets 416; several or invalid
//! ranges, a failed `If-Range` and a HEAD get the whole answer; a cold key is filled
//! whole, once, without `Range` upstream; an upstream's `103 Early Hints` before its 200
//! is never what is stored. A small origin of the test's own answers each path with the
//! headers the test sets and records every request head it gets.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{path_of, raw_send, read_answer, read_head, RawAnswer, StoaProcess};
use tokio::io::AsyncWriteExt;

/// Twenty bytes, each telling its position.
const BODY: &str = "0123456789abcdefghij";

#[derive(Clone, Default)]
struct Reply {
    /// Written before the answer: interim answers (`HTTP/1.1 103 ...`), whole.
    interim: String,
    status: u16,
    /// Header lines, each ending in CRLF.
    headers: String,
    body: Vec<u8>,
    delay: Duration,
}

fn reply(headers: &str, body: &[u8]) -> Reply {
    Reply {
        status: 200,
        headers: headers.to_string(),
        body: body.to_vec(),
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
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (replies, seen) = (r.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(end) = read_head(&mut sock, &mut buf).await {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        seen.lock().unwrap().push(head.clone());
                        let reply = replies.lock().unwrap().get(&path_of(&head)).cloned();
                        let reply = reply.unwrap_or(Reply {
                            status: 404,
                            ..Reply::default()
                        });
                        if !reply.interim.is_empty() {
                            // Sent on its own, before the final answer is ready.
                            if sock.write_all(reply.interim.as_bytes()).await.is_err() {
                                return;
                            }
                            let _ = sock.flush().await;
                        }
                        tokio::time::sleep(reply.delay).await;
                        let mut out = format!(
                            "HTTP/1.1 {} X\r\n{}content-length: {}\r\n\r\n",
                            reply.status,
                            reply.headers,
                            reply.body.len()
                        )
                        .into_bytes();
                        out.extend_from_slice(&reply.body);
                        if sock.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
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

    /// Asserts that no request for `path` carried `Range` or `If-Range`.
    fn assert_no_range_sent(&self, path: &str) {
        for head in self.heads(path) {
            let lower = head.to_ascii_lowercase();
            assert!(
                !lower.contains("\r\nrange:") && !lower.contains("\r\nif-range:"),
                "a range went upstream: {head:?}"
            );
        }
    }
}

/// stoa on `origin` with the `[server]` keys `server`: a cached route `/c/{*rest}` for the
/// origin's `/{rest}`.
async fn stoa_for(origin: &Origin, server: &str) -> StoaProcess {
    let rest = format!(
        "[upstreams.o]\nurl = \"http://127.0.0.1:{}\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"c\"\nmethods = [\"GET\", \"HEAD\"]\npath = \"/c/{{*rest}}\"\n\
         upstream = \"o\"\nrewrite = \"/{{rest}}\"\ncache = {{ ttl = \"60s\" }}\n",
        origin.port
    );
    StoaProcess::start_with(server, &rest).await
}

/// A request with extra header lines (each ending in CRLF), on its own connection.
async fn ask(gw: &StoaProcess, method: &str, path: &str, extra: &str) -> RawAnswer {
    raw_send(
        gw.port,
        &format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n"),
    )
    .await
}

async fn ranged(gw: &StoaProcess, path: &str, range: &str) -> RawAnswer {
    ask(gw, "GET", path, &format!("Range: {range}\r\n")).await
}

/// Asserts a 206 of `BODY` with the bytes `first..=last`.
fn assert_part(a: &RawAnswer, first: usize, last: usize, x_cache: &str, what: &str) {
    assert_eq!(a.status, 206, "{what}: {a:?}");
    let range = format!("bytes {first}-{last}/{}", BODY.len());
    assert_eq!(a.header("content-range"), Some(range.as_str()), "{what}");
    let length = (last - first + 1).to_string();
    assert_eq!(a.header("content-length"), Some(length.as_str()), "{what}");
    assert_eq!(a.body, BODY[first..=last], "{what}");
    assert_eq!(a.x_cache(), x_cache, "{what}");
}

/// The server lines of the lanes: the front (with h2c beside it) and pingora's proxy.
const LANES: [(&str, &str); 2] = [("front", "h2c = true"), ("proxy", "front = false")];

fn plain(origin: &Origin) {
    origin.set(
        "/p",
        reply(
            "content-type: text/plain\r\netag: \"v1\"\r\ncache-control: max-age=60\r\n",
            BODY.as_bytes(),
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_on_a_hit_is_a_206_with_the_stored_head_on_the_http1_lanes() {
    let origin = Origin::start().await;
    plain(&origin);
    for (lane, server) in LANES {
        let gw = stoa_for(&origin, server).await;
        let whole = ask(&gw, "GET", "/c/p", "").await;
        assert_eq!((whole.status, whole.x_cache()), (200, "MISS"), "{lane}");
        assert_eq!(whole.header("accept-ranges"), Some("bytes"), "{lane}");
        assert_eq!(whole.body, BODY, "{lane}");

        let part = ranged(&gw, "/c/p", "bytes=2-5").await;
        assert_part(&part, 2, 5, "HIT", lane);
        assert_eq!(part.header("etag"), Some("\"v1\""), "{lane}");
        assert_eq!(part.header("accept-ranges"), Some("bytes"), "{lane}");
        assert_eq!(part.header("content-type"), Some("text/plain"), "{lane}");
        assert!(part.header("age").is_some(), "{lane}: {part:?}");
        assert!(part.header("date").is_some(), "{lane}: {part:?}");
        assert!(part.header("x-request-id").is_some(), "{lane}: {part:?}");
        let status = part.header("cache-status").unwrap_or_default();
        assert!(status.contains("hit"), "{lane}: {status}");
        assert_part(&ranged(&gw, "/c/p", "bytes=0-0").await, 0, 0, "HIT", lane);
        assert_part(&ranged(&gw, "/c/p", "bytes=15-").await, 15, 19, "HIT", lane);
        assert_part(&ranged(&gw, "/c/p", "bytes=-3").await, 17, 19, "HIT", lane);
        assert_part(&ranged(&gw, "/c/p", "bytes=-50").await, 0, 19, "HIT", lane);
        assert_part(
            &ranged(&gw, "/c/p", "bytes=10-99").await,
            10,
            19,
            "HIT",
            lane,
        );
        assert_part(&ranged(&gw, "/c/p", "bytes= 3-4,").await, 3, 4, "HIT", lane);

        // On a kept-alive connection: a part, then the whole, then a part again, each
        // framed by its length.
        let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .unwrap();
        let mut buf = Vec::new();
        for (range, want) in [
            (Some("bytes=1-3"), "123"),
            (None, BODY),
            (Some("bytes=-2"), "ij"),
        ] {
            let line = range.map_or(String::new(), |r| format!("Range: {r}\r\n"));
            let req = format!("GET /c/p HTTP/1.1\r\nHost: t\r\n{line}\r\n");
            sock.write_all(req.as_bytes()).await.unwrap();
            let a = read_answer(&mut sock, &mut buf).await.unwrap();
            let status = if range.is_some() { 206 } else { 200 };
            assert_eq!((a.status, a.body.as_str()), (status, want), "{lane}: {a:?}");
            assert!(!a.closes(), "{lane}: {a:?}");
        }
        assert_eq!(origin.calls("/p"), 1, "{lane}: every answer from the entry");
        origin.seen.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_on_a_hit_is_a_206_over_http2() {
    let origin = Origin::start().await;
    plain(&origin);
    let gw = stoa_for(&origin, "h2c = true").await;
    let send = common::h2::h2c(gw.port).await;
    let (status, headers, body) = common::h2::get(&send, "/c/p", &[]).await;
    assert_eq!((status, &body[..]), (200, BODY.as_bytes()));
    assert_eq!(headers["x-cache"], "MISS");
    assert_eq!(headers["accept-ranges"], "bytes");

    let (status, headers, body) = common::h2::get(&send, "/c/p", &[("range", "bytes=4-7")]).await;
    assert_eq!((status, &body[..]), (206, &b"4567"[..]), "{headers:?}");
    assert_eq!(headers["content-range"], "bytes 4-7/20");
    assert_eq!(headers["content-length"], "4");
    assert_eq!(headers["x-cache"], "HIT");
    assert_eq!(headers["etag"], "\"v1\"");
    assert!(headers.contains_key("age"), "{headers:?}");

    let (status, headers, body) = common::h2::get(&send, "/c/p", &[("range", "bytes=20-")]).await;
    assert_eq!((status, body.len()), (416, 0), "{headers:?}");
    assert_eq!(headers["content-range"], "bytes */20");

    let (status, _, body) = common::h2::get(&send, "/c/p", &[("range", "bytes=0-1,5-6")]).await;
    assert_eq!((status, &body[..]), (200, BODY.as_bytes()));
    assert_eq!(origin.calls("/p"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_past_the_end_is_a_416_with_the_length() {
    let origin = Origin::start().await;
    plain(&origin);
    for (lane, server) in LANES {
        let gw = stoa_for(&origin, server).await;
        assert_eq!(ask(&gw, "GET", "/c/p", "").await.status, 200, "{lane}");
        for range in [
            "bytes=20-",
            "bytes=20-30",
            "bytes=-0",
            "bytes=99999999999999999999-",
        ] {
            let a = ranged(&gw, "/c/p", range).await;
            assert_eq!(a.status, 416, "{lane} {range}: {a:?}");
            assert_eq!(
                a.header("content-range"),
                Some("bytes */20"),
                "{lane} {range}"
            );
            assert_eq!(a.header("content-length"), Some("0"), "{lane} {range}");
            assert_eq!(a.body, "", "{lane} {range}");
            assert_eq!(a.x_cache(), "HIT", "{lane} {range}");
            assert!(a.header("x-request-id").is_some(), "{lane} {range}: {a:?}");
        }
        // Several ranges none of which overlaps: 416 too.
        let a = ranged(&gw, "/c/p", "bytes=30-40, 50-").await;
        assert_eq!(a.status, 416, "{lane}: {a:?}");
        assert_eq!(origin.calls("/p"), 1, "{lane}");
        origin.seen.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_invalid_or_foreign_ranges_and_a_head_get_the_whole_answer() {
    let origin = Origin::start().await;
    plain(&origin);
    origin.set(
        "/none",
        reply(
            "content-type: text/plain\r\naccept-ranges: none\r\n",
            BODY.as_bytes(),
        ),
    );
    for (lane, server) in LANES {
        let gw = stoa_for(&origin, server).await;
        assert_eq!(ask(&gw, "GET", "/c/p", "").await.status, 200, "{lane}");
        for range in [
            "bytes=0-1,5-6",
            "bytes=0-1, 30-40",
            "bytes=1-0",
            "bytes=a-b",
            "bytes=5",
            "bytes = 1-2",
            "items=0-1",
            "",
        ] {
            let a = ranged(&gw, "/c/p", range).await;
            assert_eq!((a.status, a.body.as_str()), (200, BODY), "{lane} {range:?}");
            assert_eq!(a.header("content-range"), None, "{lane} {range:?}");
            assert_eq!(a.x_cache(), "HIT", "{lane} {range:?}");
        }
        // Two Range lines are no single ranges-specifier.
        let a = ask(
            &gw,
            "GET",
            "/c/p",
            "Range: bytes=0-1\r\nRange: bytes=2-3\r\n",
        )
        .await;
        assert_eq!((a.status, a.body.as_str()), (200, BODY), "{lane}");
        // An upstream that refuses ranges keeps its word, and its header.
        let a = ranged(&gw, "/c/none", "bytes=0-1").await;
        assert_eq!((a.status, a.body.as_str()), (200, BODY), "{lane}: {a:?}");
        let accept: Vec<_> = a
            .headers
            .iter()
            .filter(|(k, _)| k == "accept-ranges")
            .collect();
        assert_eq!(
            accept,
            [&("accept-ranges".to_string(), "none".to_string())],
            "{lane}"
        );
        // HEAD ignores Range: the whole answer's head.
        let a = ask(&gw, "HEAD", "/c/p", "Range: bytes=0-1\r\n").await;
        assert_eq!(a.status, 200, "{lane}: {a:?}");
        assert_eq!(a.header("content-length"), Some("20"), "{lane}");
        assert_eq!(a.header("content-range"), None, "{lane}");
        assert_eq!(a.body, "", "{lane}");
        assert_eq!(origin.calls("/p"), 1, "{lane}");
        assert_eq!(origin.calls("/none"), 1, "{lane}");
        origin.seen.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_range_applies_the_range_only_when_it_matches_and_if_none_match_comes_first() {
    let origin = Origin::start().await;
    let modified = SystemTime::now() - Duration::from_secs(3600);
    let date = httpdate::fmt_http_date(modified);
    origin.set(
        "/v",
        reply(
            &format!(
                "content-type: text/plain\r\netag: \"v1\"\r\nlast-modified: {date}\r\n\
                 cache-control: max-age=60\r\n"
            ),
            BODY.as_bytes(),
        ),
    );
    origin.set(
        "/w",
        reply(
            "content-type: text/plain\r\netag: W/\"w1\"\r\ncache-control: max-age=60\r\n",
            BODY.as_bytes(),
        ),
    );
    let gw = stoa_for(&origin, "").await;
    assert_eq!(ask(&gw, "GET", "/c/v", "").await.status, 200);
    assert_eq!(ask(&gw, "GET", "/c/w", "").await.status, 200);
    let with = |path: &'static str, if_range: String| {
        let gw = &gw;
        async move {
            ask(
                gw,
                "GET",
                path,
                &format!("Range: bytes=1-2\r\nIf-Range: {if_range}\r\n"),
            )
            .await
        }
    };
    let later = httpdate::fmt_http_date(modified + Duration::from_secs(1));
    let earlier = httpdate::fmt_http_date(modified - Duration::from_secs(1));
    let cases = [
        ("/c/v", "\"v1\"".to_string(), 206, "the stored strong tag"),
        ("/c/v", "\"v2\"".to_string(), 200, "another tag"),
        (
            "/c/v",
            "W/\"v1\"".to_string(),
            200,
            "a weak tag never matches",
        ),
        ("/c/v", date.clone(), 206, "the exact Last-Modified"),
        ("/c/v", later, 200, "a later date"),
        ("/c/v", earlier, 200, "an earlier date"),
        ("/c/v", "soon".to_string(), 200, "neither tag nor date"),
        ("/c/w", "\"w1\"".to_string(), 200, "the stored tag is weak"),
        ("/c/w", "W/\"w1\"".to_string(), 200, "weak against weak"),
        ("/c/w", date.clone(), 200, "no Last-Modified"),
    ];
    for (path, if_range, status, why) in cases {
        let a = with(path, if_range.clone()).await;
        assert_eq!(a.status, status, "{path} If-Range {if_range}: {why}: {a:?}");
        let body = if status == 206 { "12" } else { BODY };
        assert_eq!(a.body, body, "{path} If-Range {if_range}: {why}");
    }
    // A failed If-Range sends the whole even for a range past the end.
    let a = ask(
        &gw,
        "GET",
        "/c/v",
        "Range: bytes=50-\r\nIf-Range: \"v0\"\r\n",
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (200, BODY));
    // If-None-Match is evaluated first: a match is a 304, whatever the range.
    for extra in ["", "If-Range: \"v1\"\r\n"] {
        let a = ask(
            &gw,
            "GET",
            "/c/v",
            &format!("Range: bytes=1-2\r\n{extra}If-None-Match: \"v1\"\r\n"),
        )
        .await;
        assert_eq!((a.status, a.body.as_str()), (304, ""), "{extra:?}: {a:?}");
    }
    // A non-matching If-None-Match leaves the range to be served.
    let a = ask(
        &gw,
        "GET",
        "/c/v",
        "Range: bytes=1-2\r\nIf-None-Match: \"v0\"\r\n",
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (206, "12"), "{a:?}");
    assert_eq!(origin.calls("/v") + origin.calls("/w"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_on_a_cold_key_fills_the_whole_entry_once_without_range_upstream() {
    let origin = Origin::start().await;
    plain(&origin);
    for (lane, server) in LANES {
        let gw = stoa_for(&origin, server).await;
        let a = ask(
            &gw,
            "GET",
            "/c/p",
            "Range: bytes=0-3\r\nIf-Range: \"v1\"\r\n",
        )
        .await;
        assert_part(&a, 0, 3, "MISS", lane);
        let whole = ask(&gw, "GET", "/c/p", "").await;
        assert_eq!((whole.status, whole.body.as_str()), (200, BODY), "{lane}");
        assert_eq!(whole.x_cache(), "HIT", "{lane}: the whole entry was stored");
        assert_eq!(origin.calls("/p"), 1, "{lane}");
        origin.assert_no_range_sent("/p");
        origin.seen.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_different_ranges_on_a_cold_key_share_one_fetch_and_get_their_own_part() {
    let origin = Origin::start().await;
    origin.set(
        "/slow",
        Reply {
            delay: Duration::from_millis(1000),
            ..reply("content-type: text/plain\r\n", BODY.as_bytes())
        },
    );
    let gw = Arc::new(stoa_for(&origin, "").await);
    let ranges = [
        (Some("bytes=0-4"), 0, 4),
        (Some("bytes=5-9"), 5, 9),
        (Some("bytes=-5"), 15, 19),
        (None, 0, 19),
    ];
    let tasks: Vec<_> = ranges
        .iter()
        .map(|&(range, first, last)| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let extra = range.map_or(String::new(), |r| format!("Range: {r}\r\n"));
                (ask(&gw, "GET", "/c/slow", &extra).await, range, first, last)
            })
        })
        .collect();
    let mut seen = Vec::new();
    for task in tasks {
        let (a, range, first, last) = task.await.unwrap();
        match range {
            Some(range) => assert_part(&a, first, last, a.x_cache(), range),
            None => assert_eq!((a.status, a.body.as_str()), (200, BODY)),
        }
        seen.push(a.x_cache().to_string());
    }
    seen.sort();
    assert_eq!(seen, ["COALESCED", "COALESCED", "COALESCED", "MISS"]);
    assert_eq!(origin.calls("/slow"), 1);
    origin.assert_no_range_sent("/slow");
}

/// A JSON body of about 30 KB that compresses well.
fn big_json() -> String {
    let items: Vec<String> = (0..600)
        .map(|i| format!("{{\"id\":{i},\"dish\":\"dish number {}\"}}", i % 41))
        .collect();
    format!("{{\"menu\":[{}]}}", items.join(","))
}

/// GET with headers, the body as bytes (a compressed body is no text).
async fn get_bytes(gw: &StoaProcess, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(gw.url(path));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_a_compressed_variant_is_over_its_compressed_bytes() {
    let origin = Origin::start().await;
    let json = big_json();
    origin.set(
        "/big",
        reply(
            "content-type: application/json\r\netag: \"b1\"\r\n",
            json.as_bytes(),
        ),
    );
    let gw = stoa_for(&origin, "").await;
    let gzip = [("accept-encoding", "gzip")];
    let whole = get_bytes(&gw, "/c/big", &gzip).await;
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["content-encoding"], "gzip");
    let zipped = whole.bytes().await.unwrap();
    assert!(zipped.len() < json.len() / 2, "{} bytes", zipped.len());

    let part = get_bytes(
        &gw,
        "/c/big",
        &[("accept-encoding", "gzip"), ("range", "bytes=10-99")],
    )
    .await;
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-encoding"], "gzip");
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 10-99/{}", zipped.len()).as_str()
    );
    assert_eq!(part.headers()["etag"], "W/\"b1\"");
    assert_eq!(part.bytes().await.unwrap(), zipped.slice(10..100));

    // The identity representation's range, for a client that takes no coding.
    let part = get_bytes(&gw, "/c/big", &[("range", "bytes=-10")]).await;
    assert_eq!(part.status(), 206);
    assert!(part.headers().get("content-encoding").is_none());
    let n = json.len();
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes {}-{}/{n}", n - 10, n - 1).as_str()
    );
    assert_eq!(part.bytes().await.unwrap(), json.as_bytes()[n - 10..]);

    // The compressed variant's tag is weak: a strong If-Range never matches it, and does
    // match the identity answer.
    let strong = ("if-range", "\"b1\"");
    let a = get_bytes(
        &gw,
        "/c/big",
        &[("accept-encoding", "gzip"), ("range", "bytes=0-9"), strong],
    )
    .await;
    assert_eq!(a.status(), 200);
    assert_eq!(a.bytes().await.unwrap(), zipped);
    let a = get_bytes(&gw, "/c/big", &[("range", "bytes=0-9"), strong]).await;
    assert_eq!(a.status(), 206);
    assert_eq!(a.bytes().await.unwrap(), json.as_bytes()[..10]);
    // Past the end of the compressed bytes, within the identity ones.
    let past = format!("bytes={}-", zipped.len());
    let a = get_bytes(
        &gw,
        "/c/big",
        &[("accept-encoding", "gzip"), ("range", &past)],
    )
    .await;
    assert_eq!(a.status(), 416);
    assert_eq!(
        a.headers()["content-range"],
        format!("bytes */{}", zipped.len()).as_str()
    );
    assert_eq!(origin.calls("/big"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_hints_answer_before_the_200_is_never_what_is_stored() {
    let origin = Origin::start().await;
    origin.set(
        "/early",
        Reply {
            interim: "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
                .to_string(),
            delay: Duration::from_millis(100),
            ..reply(
                "content-type: text/plain\r\ncache-control: max-age=60\r\n",
                BODY.as_bytes(),
            )
        },
    );
    origin.set(
        "/continue",
        Reply {
            interim: "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\
                      link: </a.js>; rel=preload\r\n\r\n"
                .to_string(),
            ..reply("content-type: text/plain\r\n", BODY.as_bytes())
        },
    );
    for (lane, server) in LANES {
        let gw = stoa_for(&origin, server).await;
        for path in ["/early", "/continue"] {
            let url = format!("/c{path}");
            let first = ask(&gw, "GET", &url, "").await;
            assert_eq!(first.status, 200, "{lane} {path}: {first:?}");
            assert_eq!(first.body, BODY, "{lane} {path}");
            assert_eq!(first.x_cache(), "MISS", "{lane} {path}");
            let again = ask(&gw, "GET", &url, "").await;
            assert_eq!(again.status, 200, "{lane} {path}: {again:?}");
            assert_eq!(again.body, BODY, "{lane} {path}");
            assert_eq!(again.x_cache(), "HIT", "{lane} {path}");
            assert_eq!(again.header("link"), None, "{lane} {path}: a hint's header");
            assert_part(&ranged(&gw, &url, "bytes=3-4").await, 3, 4, "HIT", lane);
            assert_eq!(origin.calls(path), 1, "{lane} {path}");
        }
        origin.seen.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_without_an_upgrade_is_a_failed_fetch_never_stored() {
    let origin = Origin::start().await;
    origin.set(
        "/switch",
        Reply {
            status: 101,
            headers: "upgrade: websocket\r\nconnection: upgrade\r\n".to_string(),
            ..Reply::default()
        },
    );
    let gw = stoa_for(&origin, "").await;
    for round in 1..=2 {
        let a = ask(&gw, "GET", "/c/switch", "").await;
        assert_eq!(a.status, 502, "round {round}: {a:?}");
        assert_eq!(origin.calls("/switch"), round, "nothing stored");
    }
}
