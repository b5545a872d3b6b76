//! End to end: client connection deadlines and caps (`[server]` header, idle and body
//! timeouts, requests per connection, open connections) and a graceful stop under load, seen
//! from raw TCP sockets so that nothing retries or pools behind the test's back.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    demo_with, knobs, read_answer, read_until_closed, Api, EchoUpstream, RawAnswer, StoaProcess,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Sends a GET and reads its answer.
async fn get(stream: &mut TcpStream, buf: &mut Vec<u8>, path: &str) -> io::Result<RawAnswer> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: stoa\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    read_answer(stream, buf).await
}

/// How long until the server closed the connection (EOF or reset), and what it sent first.
/// Panics if it is still open after `limit`.
async fn wait_closed(stream: &mut TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let (got, closed) = read_until_closed(stream, limit).await;
    assert!(
        closed,
        "the connection is still open after {limit:?} (received {:?})",
        String::from_utf8_lossy(&got)
    );
    (started.elapsed(), got)
}

/// Writes `bytes` one at a time, `every` apart, until they run out or the peer is gone.
fn trickle(mut writer: tokio::net::tcp::OwnedWriteHalf, bytes: &'static [u8], every: Duration) {
    tokio::spawn(async move {
        for b in bytes {
            tokio::time::sleep(every).await;
            if writer.write_all(&[*b]).await.is_err() {
                return;
            }
        }
        // Keep the write side open (no FIN) a while longer.
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
}

fn assert_408(answer: &RawAnswer, what: &str) {
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(answer.closes(), "{answer:?}");
    let v = answer.json();
    assert_eq!(v["error"], "request_timeout", "{v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(message.contains(what), "{v}");
}

fn assert_between(elapsed: Duration, low_ms: u64, high_ms: u64, what: &str) {
    assert!(
        elapsed >= Duration::from_millis(low_ms) && elapsed <= Duration::from_millis(high_ms),
        "{what} after {elapsed:?}, expected {low_ms}..{high_ms} ms"
    );
}

/// A pass-through route (`/pass/...`) and a body-keyed cached route (`/cached`) in front of
/// an upstream that echoes what it received.
fn echo_routes(echo: &EchoUpstream) -> String {
    format!(
        "[upstreams.echo]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"pass\"\npath = \"/pass/{{*rest}}\"\nupstream = \"echo\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\", \"POST\"]\npath = \"/cached\"\n\
         upstream = \"echo\"\ncache = {{ ttl = \"1m\", key_body = true }}\n",
        echo.url()
    )
}

async fn connect(gw: &StoaProcess) -> TcpStream {
    TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_trickled_past_header_timeout_gets_408_json_then_close() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("header_timeout = \"700ms\"", &echo_routes(&echo)).await;
    let stream = connect(&gw).await;
    let (mut reader, writer) = stream.into_split();
    let started = Instant::now();
    trickle(
        writer,
        b"GET /pass/slow HTTP/1.1\r\nHost: stoa\r\nX-Slow: 1234567890\r\n\r\n",
        Duration::from_millis(150),
    );
    let (got, closed) = read_until_closed(&mut reader, Duration::from_secs(5)).await;
    assert!(
        closed,
        "still open after 5 s, received {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_between(
        started.elapsed(),
        600,
        3_000,
        "the trickling client was cut",
    );
    assert_408(&RawAnswer::parse(&got), "request head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_head_after_a_keepalive_request_is_cut_at_header_timeout() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with(
        "header_timeout = \"700ms\"\nkeepalive_timeout = \"30s\"",
        &echo_routes(&echo),
    )
    .await;
    let mut stream = connect(&gw).await;
    let mut buf = Vec::new();
    let first = get(&mut stream, &mut buf, "/pass/first").await.unwrap();
    assert_eq!(first.status, 200);
    assert!(!first.closes(), "{first:?}");
    // Idle a while (under the idle timeout), then start a head and never finish it.
    tokio::time::sleep(Duration::from_millis(900)).await;
    stream
        .write_all(b"GET /pass/second HTTP/1.1\r\nHost: st")
        .await
        .unwrap();
    let (elapsed, got) = wait_closed(&mut stream, Duration::from_secs(5)).await;
    assert_between(elapsed, 600, 3_000, "the partial head was cut");
    assert_408(&RawAnswer::parse(&got), "request head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_at_header_timeout_without_an_answer() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("header_timeout = \"700ms\"", &echo_routes(&echo)).await;
    let mut stream = connect(&gw).await;
    let (elapsed, got) = wait_closed(&mut stream, Duration::from_secs(5)).await;
    assert_between(elapsed, 600, 3_000, "the silent connection was closed");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_are_closed_after_keepalive_timeout() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with(
        "keepalive_timeout = \"800ms\"\nheader_timeout = \"10s\"",
        &echo_routes(&echo),
    )
    .await;
    let mut stream = connect(&gw).await;
    let mut buf = Vec::new();
    assert_eq!(
        get(&mut stream, &mut buf, "/pass/a").await.unwrap().status,
        200
    );
    // Used again within the idle timeout: still open, and the idle clock starts over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = get(&mut stream, &mut buf, "/pass/b").await.unwrap();
    assert_eq!(again.status, 200);
    assert!(!again.closes(), "{again:?}");
    let (elapsed, got) = wait_closed(&mut stream, Duration::from_secs(5)).await;
    assert_between(elapsed, 700, 3_000, "the idle connection was closed");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_slower_than_body_timeout_gets_408_json_on_every_kind_of_route() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with(
        "body_timeout = \"700ms\"\nheader_timeout = \"10s\"",
        &echo_routes(&echo),
    )
    .await;
    for path in ["/pass/upload", "/cached"] {
        let mut stream = connect(&gw).await;
        let started = Instant::now();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: stoa\r\nContent-Type: application/json\r\n\
             Content-Length: 40\r\n\r\n{{\"a\":"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (mut reader, writer) = stream.into_split();
        // One byte every 150 ms: each read is quick, the whole body is not.
        trickle(
            writer,
            b"\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}",
            Duration::from_millis(150),
        );
        let (got, closed) = read_until_closed(&mut reader, Duration::from_secs(5)).await;
        assert!(
            closed,
            "{path}: still open after 5 s, received {:?}",
            String::from_utf8_lossy(&got)
        );
        assert_between(started.elapsed(), 600, 3_000, path);
        assert_408(&RawAnswer::parse(&got), "request body");
    }
    assert_eq!(
        cached_fetches(&gw).await,
        0,
        "no slow body reached a cached fetch"
    );
}

/// Upstream fetches of the cached route, from the metrics.
async fn cached_fetches(gw: &StoaProcess) -> u64 {
    let m = gw.metrics().await;
    m.lines()
        .filter(|l| l.starts_with("stoa_upstream_fetches_total") && l.contains("route=\"cached\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_is_not_mistaken_for_a_slow_client() {
    // Every client deadline is shorter than the upstream's answer time.
    let voucher = demo_with(Api::Voucher, knobs(Api::Voucher, 1_500)).await;
    let gw = StoaProcess::start_with(
        "body_timeout = \"500ms\"\nheader_timeout = \"500ms\"\nkeepalive_timeout = \"500ms\"",
        &format!(
            "[upstreams.voucher]\nurl = \"{}\"\n\n[[routes]]\nname = \"voucher\"\n\
             methods = [\"POST\"]\npath = \"/api/v1/voucher\"\nupstream = \"voucher\"\n",
            voucher.url()
        ),
    )
    .await;
    let body = r#"{"customer_id":123,"country_code":"Peru","last_order_ts":"2021-10-26 00:00:00","first_order_ts":"2021-10-26 00:00:00","total_orders":14,"segment_name":"frequent_segment"}"#;
    let mut stream = connect(&gw).await;
    let req = format!(
        "POST /api/v1/voucher HTTP/1.1\r\nHost: stoa\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let answer = read_answer(&mut stream, &mut buf).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["voucher"], 2640);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_requests_caps_the_requests_of_one_connection() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("keepalive_requests = 3", &echo_routes(&echo)).await;
    let mut stream = connect(&gw).await;
    let mut buf = Vec::new();
    for i in 1..=3 {
        let a = get(&mut stream, &mut buf, &format!("/pass/{i}"))
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(
            a.closes(),
            i == 3,
            "answer {i}: {:?}",
            a.header("connection")
        );
    }
    let (_, got) = wait_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(got.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_refused_while_the_others_are_served() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("max_connections = 4", &echo_routes(&echo)).await;
    let mut open = Vec::new();
    for i in 0..4 {
        let mut stream = connect(&gw).await;
        let mut buf = Vec::new();
        let a = get(&mut stream, &mut buf, &format!("/pass/{i}"))
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        open.push((stream, buf));
    }
    // The fifth is closed without an answer.
    let mut fifth = connect(&gw).await;
    let _ = fifth
        .write_all(b"GET /pass/fifth HTTP/1.1\r\nHost: stoa\r\n\r\n")
        .await;
    let (_, got) = wait_closed(&mut fifth, Duration::from_secs(3)).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    // The four keep being served.
    for (i, (stream, buf)) in open.iter_mut().enumerate() {
        let a = get(stream, buf, &format!("/pass/again{i}")).await.unwrap();
        assert_eq!(a.status, 200);
    }
    // Once one leaves, a new connection is served.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut stream = connect(&gw).await;
        let mut buf = Vec::new();
        match get(&mut stream, &mut buf, "/pass/new").await {
            Ok(a) => {
                assert_eq!(a.status, 200);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("a freed slot was never given to a new connection: {e}"),
        }
    }
}

#[test]
fn stoa_check_validates_the_connection_settings_from_the_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let bad = common::write_temp(
        dir.path(),
        "bad.toml",
        "[server]\nheader_timeout = \"0s\"\nkeepalive_timeout = \"soon\"\nbody_timeout = 5\n\
         keepalive_requests = 0\nmax_connections = -1\n",
    );
    let (code, _, err) = common::stoa(&["check", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    for key in [
        "server.header_timeout",
        "server.keepalive_timeout",
        "server.body_timeout",
        "server.keepalive_requests",
        "server.max_connections",
    ] {
        assert!(err.contains(key), "{key} not reported:\n{err}");
    }
    let good = common::write_temp(
        dir.path(),
        "good.toml",
        "[server]\nheader_timeout = \"5s\"\nkeepalive_timeout = \"30s\"\nbody_timeout = \"20s\"\n\
         keepalive_requests = 100\nmax_connections = 500\n",
    );
    let (code, _, err) = common::stoa(&["check", "--config", good.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = common::stoa(
        &["check", "--config", good.to_str().unwrap()],
        &[("STOA_SERVER__MAX_CONNECTIONS", "0")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("server.max_connections"), "{err}");
}

/// What the keep-alive clients of the load test saw.
#[derive(Debug, Default)]
struct Tally {
    /// Complete 200 answers.
    ok: AtomicU64,
    /// Complete 200 answers received after the signal.
    ok_after_signal: AtomicU64,
    /// Connection attempts refused (the listener is closed).
    refused: AtomicU64,
    /// Requests written on an open connection that got no complete 200 (EOF, reset, other
    /// status): requests lost.
    lost: AtomicU64,
}

/// One keep-alive client: requests in a loop over one connection, a new connection after an
/// answer that closes it, until a connection attempt is refused or `until` passes.
async fn keepalive_client(
    port: u16,
    paths: [&'static str; 2],
    tally: Arc<Tally>,
    signalled: Arc<AtomicBool>,
    until: Instant,
) {
    let mut n = 0usize;
    while Instant::now() < until {
        let mut stream = match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => s,
            Err(_) => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let mut buf = Vec::new();
        loop {
            if Instant::now() >= until {
                return;
            }
            n += 1;
            let path = paths[n % 2];
            let answer =
                tokio::time::timeout(Duration::from_secs(10), get(&mut stream, &mut buf, path))
                    .await;
            match answer {
                Ok(Ok(a)) if a.status == 200 => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    if signalled.load(Ordering::Relaxed) {
                        tally.ok_after_signal.fetch_add(1, Ordering::Relaxed);
                    }
                    if a.closes() {
                        break;
                    }
                }
                other => {
                    eprintln!("lost a request on {path}: {other:?}");
                    tally.lost.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_keepalive_load_loses_no_accepted_request() {
    let restaurants = demo_with(Api::Restaurants, knobs(Api::Restaurants, 20)).await;
    let config = format!(
        "[upstreams.restaurants]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"pass\"\nmethods = [\"GET\"]\npath = \"/pass/{{id}}\"\n\
         upstream = \"restaurants\"\nrewrite = \"/api/restaurant/{{id}}\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\"]\npath = \"/cached/{{id}}\"\n\
         upstream = \"restaurants\"\nrewrite = \"/api/restaurant/{{id}}\"\n\
         cache = {{ ttl = \"1h\" }}\n",
        restaurants.url()
    );
    let mut gw = StoaProcess::start(&config).await;
    let tally = Arc::new(Tally::default());
    let signalled = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + Duration::from_secs(20);
    let clients: Vec<_> = (0..20)
        .map(|i| {
            // Half the clients mix pass-through and cache hits, half stay on pass-through.
            let paths = if i % 2 == 0 {
                ["/pass/dufva", "/cached/dufva"]
            } else {
                ["/pass/dufva", "/pass/dufva"]
            };
            tokio::spawn(keepalive_client(
                gw.port,
                paths,
                tally.clone(),
                signalled.clone(),
                until,
            ))
        })
        .collect();
    // Let the load settle, then stop stoa under it.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let ok_before = tally.ok.load(Ordering::Relaxed);
    assert!(ok_before > 0, "no load before the signal");
    signalled.store(true, Ordering::Relaxed);
    gw.signal(libc::SIGTERM);
    for client in clients {
        client.await.unwrap();
    }
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("stoa did not exit:\n{}", gw.log()));
    eprintln!("{tally:?}");
    assert_eq!(
        tally.lost.load(Ordering::Relaxed),
        0,
        "{tally:?}\n{}",
        gw.log()
    );
    assert_eq!(
        tally.refused.load(Ordering::Relaxed),
        20,
        "every client ends at a refused connection: {tally:?}"
    );
    assert_eq!(status.code(), Some(0), "{}", gw.log());
}
