//! End to end: the HTTP/1 front (`server.front`), which answers cached routes and stoa's
//! own errors itself and hands everything else to pingora's proxy. Seen from raw sockets,
//! so that heads can be cut, bodies sent with their heads, and lanes mixed on one connection.

mod common;

use std::time::Duration;

use common::{
    dechunk, raw_exchange, read_answer, read_head, read_until_closed, serve_heads, text_answer,
    EchoUpstream, RawAnswer, StoaProcess,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A pass-through route (`/pass/...`) and a cached route (`/cached/{id}`) on an upstream
/// that echoes what it received.
fn routes(echo: &EchoUpstream) -> String {
    format!(
        "[upstreams.echo]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"pass\"\npath = \"/pass/{{*rest}}\"\nupstream = \"echo\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\"]\npath = \"/cached/{{id}}\"\n\
         upstream = \"echo\"\nrewrite = \"/items/{{id}}\"\ncache = {{ ttl = \"1m\" }}\n",
        echo.url()
    )
}

async fn send(sock: &mut TcpStream, buf: &mut Vec<u8>, request: &str) -> RawAnswer {
    sock.write_all(request.as_bytes()).await.unwrap();
    read_answer(sock, buf).await.unwrap()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: stoa\r\n\r\n")
}

/// Cached, pass-through and unmatched requests take turns on one keep-alive connection:
/// each is answered as its route says, and the connection stays open throughout.
async fn lanes_take_turns_on_one_connection(gw: &StoaProcess) {
    let mut sock = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut buf = Vec::new();
    let first = send(&mut sock, &mut buf, &get("/cached/a")).await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"), "{first:?}");
    assert_eq!(first.json()["target"], "/items/a");

    let pass = send(&mut sock, &mut buf, &get("/pass/x?q=1")).await;
    assert_eq!(pass.status, 200, "{pass:?}");
    assert_eq!(pass.json()["target"], "/pass/x?q=1");
    assert!(pass.header("x-cache").is_none(), "{pass:?}");

    let hit = send(&mut sock, &mut buf, &get("/cached/a")).await;
    assert_eq!((hit.status, hit.x_cache()), (200, "HIT"), "{hit:?}");
    assert_eq!(hit.body, first.body);

    let missing = send(&mut sock, &mut buf, &get("/nowhere")).await;
    missing.assert_error(404, "not_found", "/nowhere");

    let post = "POST /pass/form HTTP/1.1\r\nHost: stoa\r\nContent-Length: 11\r\n\r\nhello=world";
    let posted = send(&mut sock, &mut buf, post).await;
    assert_eq!(posted.status, 200, "{posted:?}");
    assert_eq!(posted.json()["body"], "hello=world");

    let again = send(&mut sock, &mut buf, &get("/cached/a")).await;
    assert_eq!((again.status, again.x_cache()), (200, "HIT"), "{again:?}");
    assert!(!again.closes(), "{again:?}");
}

#[tokio::test]
async fn cached_pass_through_and_unmatched_requests_share_a_keepalive_connection() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    lanes_take_turns_on_one_connection(&gw).await;
}

#[tokio::test]
async fn with_the_front_off_every_request_is_answered_the_same_way() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("front = false", &routes(&echo)).await;
    lanes_take_turns_on_one_connection(&gw).await;
}

/// A head that does not arrive in one read goes to pingora's proxy, which reads the rest:
/// the answer is the one a whole head gets, and the cache entry is the same.
#[tokio::test]
async fn a_head_arriving_in_pieces_is_answered_like_a_whole_one() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    let mut sock = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut buf = Vec::new();
    for (path, x_cache) in [("/cached/b", "MISS"), ("/cached/b", "HIT")] {
        let request = get(path);
        let (start, rest) = request.split_at(9);
        sock.write_all(start.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        sock.write_all(rest.as_bytes()).await.unwrap();
        let answer = read_answer(&mut sock, &mut buf).await.unwrap();
        assert_eq!(
            (answer.status, answer.x_cache()),
            (200, x_cache),
            "{answer:?}"
        );
    }
    // A whole head for the same key on the same connection: the entry the pieces stored.
    let whole = send(&mut sock, &mut buf, &get("/cached/b")).await;
    assert_eq!((whole.status, whole.x_cache()), (200, "HIT"), "{whole:?}");
}

/// A request body that came in the same read as its head reaches the upstream whole, on a
/// pass-through route (the proxy parses the bytes the front read) and as a chunked body.
#[tokio::test]
async fn a_body_read_with_its_head_reaches_the_upstream_whole() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    let mut sock = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut buf = Vec::new();
    let body = "x".repeat(3000);
    let request = format!(
        "PUT /pass/big HTTP/1.1\r\nHost: stoa\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = send(&mut sock, &mut buf, &request).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["body"], body.as_str());

    let chunked = "POST /pass/chunks HTTP/1.1\r\nHost: stoa\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let answer = send(&mut sock, &mut buf, chunked).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let sent = answer.json()["body"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(dechunk(&sent), "hello world", "{sent:?}");
}

/// Writes `requests` in one write, then reads one answer for each, in order, on the same
/// connection; the connection then still serves a request.
async fn pipelined(gw: &StoaProcess, requests: &[String]) -> Vec<RawAnswer> {
    let mut sock = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    sock.write_all(requests.concat().as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let read = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut sock, &mut buf));
        match read.await {
            Ok(Ok(answer)) => answers.push(answer),
            other => panic!("answer {i} to {request:?}: {other:?}; before it: {answers:#?}"),
        }
    }
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
    let after = send(&mut sock, &mut buf, &get("/nowhere/after")).await;
    after.assert_error(404, "not_found", "/nowhere/after");
    answers
}

/// Requests written together on one connection (pipelining, RFC 9112 §9.3) are all
/// answered, in order, whatever lane each takes: a miss, a pass-through request, a hit, and
/// stoa's 404.
#[tokio::test]
async fn three_pipelined_requests_get_three_answers_in_order() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    let requests = [
        get("/cached/three"),
        get("/pass/three"),
        get("/cached/three"),
    ];
    let answers = pipelined(&gw, &requests).await;
    assert_eq!((answers[0].status, answers[0].x_cache()), (200, "MISS"));
    assert_eq!(answers[0].json()["target"], "/items/three");
    assert_eq!(answers[1].json()["target"], "/pass/three");
    assert_eq!((answers[2].status, answers[2].x_cache()), (200, "HIT"));
}

/// Sixteen requests in one write: hits, misses, pass-through with and without a body,
/// requests pingora's proxy takes (a `Connection` header that names another; with and without
/// a body), stoa's 404, 405 and 400. Each gets its own answer, in order, on the one connection.
#[tokio::test]
async fn sixteen_pipelined_requests_of_every_lane_are_answered_in_order() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: stoa\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let by_proxy = "GET /pass/proxied HTTP/1.1\r\nHost: stoa\r\nConnection: keep-alive, x-hop\r\n\
                    x-hop: 1\r\n\r\n"
        .to_string();
    // Its body comes with it: pingora's proxy reads it, and not a byte past it.
    let by_proxy_post = "POST /pass/z HTTP/1.1\r\nHost: stoa\r\nConnection: keep-alive, x-hop\r\n\
                         Content-Length: 5\r\n\r\nz=1&2"
        .to_string();
    let requests = vec![
        get("/cached/p1"),
        get("/pass/a?x=1"),
        get("/cached/p1"),
        get("/nowhere"),
        post("/pass/form", "hello=world"),
        get("/cached/%zz"),
        by_proxy,
        get("/cached/p2"),
        "DELETE /cached/p1 HTTP/1.1\r\nHost: stoa\r\n\r\n".to_string(),
        get("/cached/p2"),
        post("/pass/second", "{\"n\":2}"),
        by_proxy_post,
        get("/cached/p3"),
        get("/cached/p1"),
        get("/nowhere/else"),
        get("/pass/last"),
    ];
    let answers = pipelined(&gw, &requests).await;
    let cached = |i: usize, x_cache: &str, id: &str| {
        let a = &answers[i];
        assert_eq!((a.status, a.x_cache()), (200, x_cache), "{i}: {a:?}");
        assert_eq!(a.json()["target"], format!("/items/{id}"), "{i}: {a:?}");
    };
    let passed = |i: usize, target: &str| {
        let a = &answers[i];
        assert_eq!(a.status, 200, "{i}: {a:?}");
        assert_eq!(a.json()["target"], target, "{i}: {a:?}");
    };
    cached(0, "MISS", "p1");
    passed(1, "/pass/a?x=1");
    cached(2, "HIT", "p1");
    answers[3].assert_error(404, "not_found", "/nowhere");
    passed(4, "/pass/form");
    assert_eq!(answers[4].json()["body"], "hello=world");
    assert_eq!(
        (answers[5].status, answers[5].json()["error"].as_str()),
        (400, Some("bad_path"))
    );
    passed(6, "/pass/proxied");
    cached(7, "MISS", "p2");
    assert_eq!(answers[8].status, 405, "{:?}", answers[8]);
    cached(9, "HIT", "p2");
    passed(10, "/pass/second");
    assert_eq!(answers[10].json()["body"], "{\"n\":2}");
    passed(11, "/pass/z");
    assert_eq!(answers[11].json()["body"], "z=1&2");
    cached(12, "MISS", "p3");
    cached(13, "HIT", "p1");
    answers[14].assert_error(404, "not_found", "/nowhere/else");
    passed(15, "/pass/last");
}

/// A chunked request body goes to pingora's proxy, which reads it and not a byte past it:
/// requests written after it on the same connection are answered, in order, whether the
/// body came in the front's first read, was longer than it, or ended with trailers.
#[tokio::test]
async fn requests_pipelined_after_a_chunked_body_on_the_proxy_lane_are_answered() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    let chunked = |path: &str, chunks: &[&str], trailers: &str| {
        let mut body = String::new();
        for chunk in chunks {
            body.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        format!(
            "POST {path} HTTP/1.1\r\nHost: stoa\r\nTransfer-Encoding: chunked\r\n\r\n\
             {body}0\r\n{trailers}\r\n"
        )
    };
    let long = "y".repeat(9000);
    let requests = vec![
        chunked("/pass/c1", &["hello", " world"], ""),
        get("/pass/after-c1"),
        get("/cached/c"),
        chunked("/pass/c2", &[&long, "z"], "X-Sum: 1\r\n"),
        chunked("/pass/c3", &["a"], ""),
        get("/cached/c"),
        get("/pass/after-c3"),
    ];
    let answers = pipelined(&gw, &requests).await;
    let passed = |i: usize, target: &str| {
        let a = &answers[i];
        assert_eq!(a.status, 200, "{i}: {a:?}");
        assert_eq!(a.json()["target"], target, "{i}: {a:?}");
        a.json()["body"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(dechunk(&passed(0, "/pass/c1")), "hello world");
    passed(1, "/pass/after-c1");
    assert_eq!(answers[2].x_cache(), "MISS", "{:?}", answers[2]);
    assert_eq!(dechunk(&passed(3, "/pass/c2")), format!("{long}z"));
    assert_eq!(dechunk(&passed(4, "/pass/c3")), "a");
    assert_eq!(answers[5].x_cache(), "HIT", "{:?}", answers[5]);
    passed(6, "/pass/after-c3");
}

/// `close` in any `Connection` field closes the connection after the answer (RFC 9112
/// §9.6), on the front's lanes and on pingora's proxy (whose session reads only the first
/// field): the request written after it is not answered.
#[tokio::test]
async fn a_close_in_a_second_connection_field_closes_the_connection() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    for (lane, first) in [
        ("answer", "GET /cached/close HTTP/1.1\r\nHost: stoa\r\n"),
        ("forward", "GET /pass/close HTTP/1.1\r\nHost: stoa\r\n"),
        (
            "proxy",
            "GET http://stoa/pass/close HTTP/1.1\r\nHost: stoa\r\n",
        ),
    ] {
        for fields in [
            "Connection: keep-alive\r\nConnection: close\r\n",
            "Connection: keep-alive, close\r\n",
        ] {
            let request = format!("{first}{fields}\r\n{}", get("/nowhere/after"));
            let (bytes, closed) =
                raw_exchange(gw.port, request.as_bytes(), Duration::from_secs(10)).await;
            let text = String::from_utf8_lossy(&bytes);
            assert!(closed, "{lane}, {fields:?}: still open after {text:?}");
            assert_eq!(
                text.matches("HTTP/1.1 ").count(),
                1,
                "{lane}, {fields:?}: {text:?}"
            );
            assert!(
                text.starts_with("HTTP/1.1 200"),
                "{lane}, {fields:?}: {text:?}"
            );
        }
    }
}

/// SIGTERM: a connection waiting in the front for its next request is closed once the
/// drain is over, and the process exits without waiting for `shutdown_timeout` (10 s).
#[tokio::test]
async fn sigterm_closes_connections_idle_in_the_front() {
    let echo = EchoUpstream::start().await;
    let mut gw = StoaProcess::start(&routes(&echo)).await;
    let mut sock = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut buf = Vec::new();
    let answer = send(&mut sock, &mut buf, &get("/cached/d")).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let started = std::time::Instant::now();
    gw.signal(libc::SIGTERM);
    let (got, closed) = read_until_closed(&mut sock, Duration::from_secs(5)).await;
    assert!(closed && got.is_empty(), "closed: {closed}, got {got:?}");
    let status = gw.wait_exit(Duration::from_secs(5)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// `server.front` is read at start: a reload that changes it says so and changes nothing.
#[tokio::test]
async fn a_reload_that_turns_the_front_off_says_it_needs_a_restart() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    let path = gw.dir.path().join("stoa.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("[server]\n", "[server]\nfront = false\n", 1),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gw.log().contains("configuration reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.log().contains("server.front: still true until restart"),
        "{}",
        gw.log()
    );
    lanes_take_turns_on_one_connection(&gw).await;
}

/// The headers two answers must agree on: all but `Date` and `Age` (the clock's), the
/// framing of a body that depends on the gateway's port (the upstream echoes its request),
/// and the values of the rate limiter's headers that count time and tokens.
fn comparable(answer: &RawAnswer) -> Vec<(String, String)> {
    let mut headers: Vec<_> = answer
        .headers
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "date" | "age" | "content-length"))
        .map(|(k, v)| match k.as_str() {
            "ratelimit" | "ratelimit-remaining" | "ratelimit-reset" => (k.clone(), String::new()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    headers.sort();
    headers
}

/// The answers to `requests` on one connection; the connection must close after them.
async fn answers_on_one_connection(gw: &StoaProcess, requests: &[String]) -> Vec<RawAnswer> {
    let mut sock = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for request in requests {
        let answer = if request.starts_with("HEAD") {
            sock.write_all(request.as_bytes()).await.unwrap();
            let end = read_head(&mut sock, &mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..end - 4]).into_owned();
            buf.drain(..end);
            RawAnswer::from_head(&head, String::new())
        } else {
            send(&mut sock, &mut buf, request).await
        };
        assert!(answer.header("date").is_some() && answer.header("age").is_some());
        got.push(answer);
    }
    let (rest, closed) = read_until_closed(&mut sock, Duration::from_secs(5)).await;
    assert!(closed && rest.is_empty(), "{rest:?}");
    got
}

/// Answers from the cache, which the front writes as bytes past pingora's session, carry
/// the headers pingora's session gives them (`server.front = false`): a miss, hits, a HEAD,
/// a compressed variant, a conditional request, a request that closes; on a route without
/// a rate limit and on one with (its headers on every answer).
#[tokio::test]
async fn answers_the_front_writes_from_the_cache_carry_the_sessions_headers() {
    let echo = EchoUpstream::start().await;
    let rest = format!(
        "[rate_limits.generous]\nrequests_per_second = 1000\nburst = 1000\n\n{}\n\
         [[routes]]\nname = \"limited\"\nmethods = [\"GET\"]\npath = \"/limited/{{id}}\"\n\
         upstream = \"echo\"\nrewrite = \"/items/{{id}}\"\ncache = {{ ttl = \"1m\" }}\n\
         rate_limit = \"generous\"\n",
        routes(&echo)
    );
    let server = "rate_limit_headers = \"both\"";
    let front = StoaProcess::start_with(server, &rest).await;
    let proxy = StoaProcess::start_with(&format!("{server}\nfront = false"), &rest).await;
    for route in ["cached", "limited"] {
        // A query long enough for the echoed answer to be stored compressed too.
        let target = format!("/{route}/e?pad={}", "ab".repeat(800));
        let requests = [
            ("GET", "X-Request-Id: r-1"),
            ("GET", "X-Request-Id: r-2"),
            ("HEAD", "X-Request-Id: r-3"),
            ("GET", "Accept-Encoding: gzip\r\nX-Request-Id: r-4"),
            ("GET", "If-None-Match: \"nope\"\r\nX-Request-Id: r-5"),
            ("GET", "Connection: close\r\nX-Request-Id: r-6"),
        ]
        .map(|(method, headers)| {
            format!("{method} {target} HTTP/1.1\r\nHost: stoa\r\n{headers}\r\n\r\n")
        });
        let ours = answers_on_one_connection(&front, &requests).await;
        let theirs = answers_on_one_connection(&proxy, &requests).await;
        let x_cache: Vec<_> = ours.iter().map(|a| a.x_cache()).collect();
        assert_eq!(
            x_cache,
            ["MISS", "HIT", "HIT", "HIT", "HIT", "HIT"],
            "{route}"
        );
        assert_eq!(ours[3].header("content-encoding"), Some("gzip"));
        assert!(ours[5].closes(), "{:?}", ours[5]);
        for answer in [&ours[0], &ours[1], &ours[4], &ours[5]] {
            let length: usize = answer.header("content-length").unwrap().parse().unwrap();
            assert_eq!(answer.body.len(), length, "{answer:?}");
            let upstream_target = target.replace(&format!("/{route}/"), "/items/");
            assert_eq!(answer.json()["target"], upstream_target.as_str());
        }
        for answer in &ours {
            let limited = answer.header("ratelimit-policy").is_some()
                && answer.header("ratelimit-remaining").is_some();
            assert_eq!(limited, route == "limited", "{answer:?}");
        }
        for ((a, b), request) in ours.iter().zip(&theirs).zip(&requests) {
            assert_eq!(a.status, b.status, "{request}");
            assert_eq!(comparable(a), comparable(b), "{request}");
        }
    }
}

/// The answer that ends a connection (`server.keepalive_requests`, HTTP/1.0 without
/// keep-alive) says `Connection: close`, and the connection closes after it.
#[tokio::test]
async fn cached_answers_that_end_a_connection_say_so_and_close_it() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("keepalive_requests = 3", &routes(&echo)).await;
    let mut sock = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut buf = Vec::new();
    for (i, x_cache) in ["MISS", "HIT", "HIT"].into_iter().enumerate() {
        let answer = send(&mut sock, &mut buf, &get("/cached/f")).await;
        assert_eq!(answer.x_cache(), x_cache, "{answer:?}");
        assert_eq!(answer.closes(), i == 2, "request {}: {answer:?}", i + 1);
    }
    let (rest, closed) = read_until_closed(&mut sock, Duration::from_secs(5)).await;
    assert!(closed && rest.is_empty(), "{rest:?}");

    let mut sock = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let http10 = "GET /cached/f HTTP/1.0\r\nHost: stoa\r\n\r\n";
    let answer = send(&mut sock, &mut buf, http10).await;
    assert_eq!(
        (answer.status, answer.x_cache()),
        (200, "HIT"),
        "{answer:?}"
    );
    assert!(!answer
        .headers
        .iter()
        .any(|(k, v)| k == "connection" && v == "keep-alive"));
    let (rest, closed) = read_until_closed(&mut sock, Duration::from_secs(5)).await;
    assert!(closed && rest.is_empty(), "{rest:?}");
}

/// A GET whose JSON body came in the same read as its head (a body-keyed route) is answered
/// from the cache as the session answers it, and the connection goes on with the next
/// request: the body was read whole before the answer went out.
#[tokio::test]
async fn a_body_keyed_get_is_answered_from_the_cache_and_the_connection_goes_on() {
    let echo = EchoUpstream::start().await;
    let rest = format!(
        "{}\n[[routes]]\nname = \"keyed\"\nmethods = [\"GET\"]\npath = \"/keyed\"\n\
         upstream = \"echo\"\ncache = {{ ttl = \"1m\", key_body = [\"id\"] }}\n",
        routes(&echo)
    );
    let front = StoaProcess::start(&rest).await;
    let proxy = StoaProcess::start_with("front = false", &rest).await;
    let with_body = |body: &str, extra: &str| {
        format!(
            "GET /keyed HTTP/1.1\r\nHost: stoa\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nX-Request-Id: k\r\n{extra}\r\n{body}",
            body.len()
        )
    };
    let requests = [
        with_body(r#"{"id": 1}"#, ""),
        with_body(r#"{ "id" : 1 }"#, ""),
        with_body(r#"{"id": 2}"#, ""),
        "GET /cached/g HTTP/1.1\r\nHost: stoa\r\nX-Request-Id: k\r\n\r\n".to_string(),
        with_body(r#"{"id": 2}"#, "Connection: close\r\n"),
    ];
    let ours = answers_on_one_connection(&front, &requests).await;
    let theirs = answers_on_one_connection(&proxy, &requests).await;
    let x_cache: Vec<_> = ours.iter().map(|a| a.x_cache()).collect();
    assert_eq!(x_cache, ["MISS", "HIT", "MISS", "MISS", "HIT"]);
    assert_eq!(ours[1].body, ours[0].body);
    assert_ne!(ours[2].body, ours[0].body);
    for ((a, b), request) in ours.iter().zip(&theirs).zip(&requests) {
        let length: usize = a.header("content-length").unwrap().parse().unwrap();
        assert_eq!(a.body.len(), length, "{request}");
        assert_eq!(a.status, b.status, "{request}");
        assert_eq!(comparable(a), comparable(b), "{request}");
    }
}

/// Sends `request` (bytes) on a fresh connection and reads the answer until the close.
async fn refused(gw: &StoaProcess, request: &[u8]) -> RawAnswer {
    let (bytes, closed) = raw_exchange(gw.port, request, Duration::from_secs(10)).await;
    assert!(
        closed,
        "still open after {:?}",
        String::from_utf8_lossy(&bytes)
    );
    let answer = RawAnswer::parse(&bytes);
    assert!(answer.closes(), "{answer:?}");
    answer
}

/// Heads that break HTTP/1.1's rules get stoa's JSON errors, whatever route they name (a
/// cached one, a pass-through one), and the connection closes: no `Host` on HTTP/1.1, two
/// `Host`s, `Content-Length`s that differ, a target with bytes a URI cannot hold, a target
/// over 64 KiB, an absolute-form target for another host, a head over 1 MiB.
#[tokio::test]
async fn heads_that_break_the_rules_get_stoas_json_errors() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    for path in ["/cached/strict", "/pass/strict"] {
        let cases: Vec<(Vec<u8>, u16, &str)> = vec![
            (
                format!("GET {path} HTTP/1.1\r\n\r\n").into_bytes(),
                400,
                "bad_request",
            ),
            (
                format!("GET {path} HTTP/1.1\r\nHost: stoa\r\nHost: stoa\r\n\r\n").into_bytes(),
                400,
                "bad_request",
            ),
            (
                format!(
                    "POST {path} HTTP/1.1\r\nHost: stoa\r\nContent-Length: 3\r\n\
                     Content-Length: 4\r\n\r\nabcd"
                )
                .into_bytes(),
                400,
                "bad_request",
            ),
            (
                [
                    format!("GET {path}").as_bytes(),
                    b"\xff\xfe HTTP/1.1\r\nHost: stoa\r\n\r\n",
                ]
                .concat(),
                400,
                "bad_request",
            ),
            (
                format!(
                    "GET {path}?q={} HTTP/1.1\r\nHost: stoa\r\n\r\n",
                    "a".repeat(70 * 1024)
                )
                .into_bytes(),
                414,
                "uri_too_long",
            ),
            (
                format!("GET http://elsewhere{path} HTTP/1.1\r\nHost: stoa\r\n\r\n").into_bytes(),
                400,
                "bad_request",
            ),
            (
                format!(
                    "GET {path} HTTP/1.1\r\nHost: stoa\r\n{}\r\n",
                    format!("x-big: {}\r\n", "b".repeat(8000)).repeat(132)
                )
                .into_bytes(),
                431,
                "header_fields_too_large",
            ),
        ];
        for (request, status, kind) in cases {
            let shown = String::from_utf8_lossy(&request[..request.len().min(80)]).into_owned();
            refused(&gw, &request)
                .await
                .assert_error(status, kind, &shown);
        }
    }
}

/// What reaches the upstream of a request whose head repeats one `Content-Length` and pads
/// a value with white space: one `Content-Length` line, the value trimmed (RFC 9110 §8.6,
/// §5.5); on the forwarder's lane and on pingora's proxy's alike.
#[tokio::test]
async fn repeated_lengths_are_folded_and_values_trimmed_before_going_upstream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Answers each head with the head itself.
    let _up = serve_heads(listener, |head| async move { text_answer(200, "", &head) });
    let config = format!(
        "[upstreams.up]\nurl = \"http://127.0.0.1:{port}\"\n\n\
         [[routes]]\nname = \"pass\"\npath = \"/pass/{{*rest}}\"\nupstream = \"up\"\n"
    );
    let gw = StoaProcess::start(&config).await;
    for extra in ["", "Connection: keep-alive, x-hop\r\nx-hop: 1\r\n"] {
        let request = format!(
            "POST /pass/fold HTTP/1.1\r\nHost: stoa\r\nContent-Length: 3\r\ncontent-length: 3\r\n\
             X-Pad: \t spaced out \t\r\n{extra}Connection: close\r\n\r\nabc"
        );
        let (bytes, _) = raw_exchange(gw.port, request.as_bytes(), Duration::from_secs(10)).await;
        let answer = RawAnswer::parse(&bytes);
        assert_eq!(answer.status, 200, "{answer:?}");
        let seen = answer.body.to_ascii_lowercase();
        assert_eq!(
            seen.matches("content-length:").count(),
            1,
            "{extra:?}: {seen}"
        );
        assert!(seen.contains("content-length: 3\r\n"), "{seen}");
        assert!(seen.contains("x-pad: spaced out\r\n"), "{extra:?}: {seen}");
    }
}
