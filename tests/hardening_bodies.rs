//! End-to-end: answers too large to cache on cached routes (streamed through uncached,
//! counted apart from evictions), and malformed requests answered as the client's error.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{raw_exchange, read_head, sample, x_cache, StoaProcess};
use tokio::io::AsyncWriteExt;

/// Bytes of the body pattern: byte `i` of every answer is `i % 251`, so a body cut,
/// doubled or reordered anywhere is caught.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// An upstream serving `GET /<anything>?size=N[&chunked=1][&ms=M]`: N pattern bytes, with
/// a Content-Length or chunked, after M ms. Counts the requests it got.
struct BigUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BigUpstream {
    async fn start() -> BigUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            // A whole number of pattern periods, so consecutive writes continue it.
            let block = Arc::new(pattern(251 * 256));
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (block, counter) = (block.clone(), counter.clone());
                tokio::spawn(async move {
                    let _ = serve_big(sock, &block, &counter).await;
                });
            }
        });
        BigUpstream {
            addr,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for BigUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_big(
    mut sock: tokio::net::TcpStream,
    block: &[u8],
    counter: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_head(&mut sock, &mut buf).await else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        counter.fetch_add(1, Ordering::SeqCst);
        let target = head.split(' ').nth(1).unwrap_or("/").to_string();
        let param = |name: &str| {
            target
                .split_once('?')
                .map(|(_, q)| q)
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        let size: usize = param("size").and_then(|s| s.parse().ok()).unwrap_or(100);
        let chunked = param("chunked").is_some();
        if let Some(ms) = param("ms").and_then(|s| s.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let framing = if chunked {
            "transfer-encoding: chunked".to_string()
        } else {
            format!("content-length: {size}")
        };
        sock.write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n{framing}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut left = size;
        while left > 0 {
            let piece = &block[..left.min(block.len())];
            if chunked {
                sock.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await?;
                sock.write_all(piece).await?;
                sock.write_all(b"\r\n").await?;
            } else {
                sock.write_all(piece).await?;
            }
            left -= piece.len();
        }
        if chunked {
            sock.write_all(b"0\r\n\r\n").await?;
        }
    }
}

/// `[cache]` and one cached route `big` at `/big/{*rest}` in front of `up`.
fn big_config(up: &BigUpstream, cache_section: &str, route_cache: &str) -> String {
    format!(
        "[cache]\n{cache_section}\n\n[upstreams.up]\nurl = \"{}\"\ntimeout = \"20s\"\n\n\
         [[routes]]\nname = \"big\"\nmethods = [\"GET\", \"HEAD\"]\npath = \"/big/{{*rest}}\"\n\
         upstream = \"up\"\nrewrite = \"/{{rest}}\"\ncache = {{ ttl = \"60s\"{route_cache} }}\n",
        up.url()
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Reads a whole answer, checking every byte against the pattern as it comes; returns
/// the `X-Cache` header and the length read.
async fn fetch_checked(http: &reqwest::Client, url: &str) -> (u16, String, usize) {
    let mut r = http.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let cache = x_cache(&r);
    let mut at = 0usize;
    while let Some(chunk) = r.chunk().await.unwrap() {
        for (i, b) in chunk.iter().enumerate() {
            assert_eq!(*b, ((at + i) % 251) as u8, "byte {} of {url}", at + i);
        }
        at += chunk.len();
    }
    (status, cache, at)
}

async fn metric(gw: &StoaProcess, series: &str) -> f64 {
    sample(&gw.metrics().await, series).unwrap_or_else(|| panic!("no {series}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_32_mib_is_streamed_through_not_a_502() {
    let up = BigUpstream::start().await;
    let gw = StoaProcess::start(&big_config(&up, "", "")).await;
    let http = client();
    let size = 40 * 1024 * 1024;
    for query in ["", "&chunked=1"] {
        let url = gw.url(&format!("/big/file?size={size}{query}"));
        let (status, cache, len) = fetch_checked(&http, &url).await;
        assert_eq!(
            (status, cache.as_str(), len),
            (200, "BYPASS", size),
            "{query}"
        );
    }
    assert_eq!(
        metric(&gw, "stoa_cache_too_large_total{route=\"big\"}").await,
        2.0
    );
    assert_eq!(metric(&gw, "stoa_cache_evictions_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_over_max_entry_bytes_bypass_the_cache_and_small_ones_are_stored() {
    let up = BigUpstream::start().await;
    let gw = StoaProcess::start(&big_config(&up, "max_entry_bytes = \"1MiB\"", "")).await;
    let http = client();
    // Too large by Content-Length, and found too large while reading (chunked).
    for query in ["size=3000000", "size=3000000&chunked=1"] {
        for _ in 0..2 {
            let url = gw.url(&format!("/big/a?{query}"));
            let (status, cache, len) = fetch_checked(&http, &url).await;
            assert_eq!((status, cache.as_str(), len), (200, "BYPASS", 3_000_000));
        }
    }
    assert_eq!(
        up.requests(),
        4,
        "never stored: every request went upstream"
    );
    // At the limit: stored.
    let url = gw.url("/big/b?size=1048576");
    assert_eq!(
        fetch_checked(&http, &url).await,
        (200, "MISS".into(), 1 << 20)
    );
    assert_eq!(
        fetch_checked(&http, &url).await,
        (200, "HIT".into(), 1 << 20)
    );
    // HEAD of a too-large answer: its head, no body.
    let r = http
        .head(gw.url("/big/c?size=3000000"))
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), x_cache(&r)), (200, "BYPASS".into()));
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        "3000000",
        "the upstream's length"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(&metrics, "stoa_cache_too_large_total{route=\"big\"}"),
        Some(5.0)
    );
    assert_eq!(sample(&metrics, "stoa_cache_evictions_total"), Some(0.0));
    assert_eq!(sample(&metrics, "stoa_cache_entries"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_may_lower_its_own_max_entry_bytes() {
    let up = BigUpstream::start().await;
    let config = big_config(&up, "", ", max_entry_bytes = \"100KiB\"");
    let gw = StoaProcess::start(&config).await;
    let http = client();
    let url = gw.url("/big/a?size=200000");
    assert_eq!(
        fetch_checked(&http, &url).await,
        (200, "BYPASS".into(), 200_000)
    );
    let url = gw.url("/big/a?size=50000");
    assert_eq!(
        fetch_checked(&http, &url).await,
        (200, "MISS".into(), 50_000)
    );
}

/// A store of 8 MiB holds at most about 1 MiB in one entry (it is split in shards). An
/// answer above that used to be fetched, silently not stored, and counted as an eviction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_store_cannot_hold_is_too_large_not_an_eviction() {
    let up = BigUpstream::start().await;
    let gw = StoaProcess::start(&big_config(&up, "max_bytes = \"8MiB\"", "")).await;
    let http = client();
    let url = gw.url("/big/a?size=1500000");
    for _ in 0..2 {
        assert_eq!(
            fetch_checked(&http, &url).await,
            (200, "BYPASS".into(), 1_500_000)
        );
    }
    let metrics = gw.metrics().await;
    assert_eq!(sample(&metrics, "stoa_cache_evictions_total"), Some(0.0));
    assert_eq!(
        sample(&metrics, "stoa_cache_too_large_total{route=\"big\"}"),
        Some(2.0)
    );
}

/// Requests waiting on a flight whose answer proves too large all get it: the leader
/// streams the fetch it led, each waiter streams one of its own. Nobody fetches twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_a_flight_with_a_too_large_answer_all_get_it() {
    let up = BigUpstream::start().await;
    let gw = StoaProcess::start(&big_config(&up, "max_entry_bytes = \"1MiB\"", "")).await;
    let http = client();
    for query in ["size=3000000&ms=300", "size=3000000&ms=300&chunked=1"] {
        let before = up.requests();
        let url = gw.url(&format!("/big/same?{query}"));
        let answers =
            futures_util::future::join_all((0..8).map(|_| fetch_checked(&http, &url))).await;
        for answer in answers {
            assert_eq!(answer, (200, "BYPASS".into(), 3_000_000), "{query}");
        }
        assert_eq!(up.requests() - before, 8, "one fetch per request: {query}");
    }
}

#[test]
fn check_rejects_max_entry_bytes_the_store_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let rest = "[cache]\nmax_bytes = \"8MiB\"\nmax_entry_bytes = \"4MiB\"\n\n\
        [upstreams.up]\nurl = \"http://127.0.0.1:9\"\n\n[[routes]]\nname = \"r\"\n\
        methods = [\"GET\"]\npath = \"/r\"\nupstream = \"up\"\n\
        cache = { ttl = \"1s\", max_entry_bytes = \"2MiB\" }\n";
    let (text, _, _) = common::config_with(rest);
    let path = common::write_temp(dir.path(), "stoa.toml", &text);
    let (code, out, err) = common::stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    let said = format!("{out}{err}");
    assert_ne!(code, 0, "{said}");
    assert!(
        said.contains("cache.max_entry_bytes: 4194304 bytes is more than the store holds"),
        "{said}"
    );
    assert!(
        said.contains("routes[0].cache.max_entry_bytes: 2097152 bytes"),
        "{said}"
    );
    // Within what the store holds: accepted.
    let ok = rest
        .replace("\"4MiB\"", "\"512KiB\"")
        .replace("\"2MiB\"", "\"900KiB\"");
    let (text, _, _) = common::config_with(&ok);
    let path = common::write_temp(dir.path(), "ok.toml", &text);
    let (code, out, err) = common::stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
}

// ---- Framing errors are the client's -------------------------------------------------

/// Sends `raw` on a fresh connection and reads until the server closes it or 3 s pass.
async fn exchange_text(port: u16, raw: &[u8]) -> String {
    let (answer, _) = raw_exchange(port, raw, Duration::from_secs(3)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The JSON body of a raw HTTP/1.1 answer with a Content-Length.
fn json_body(answer: &str) -> serde_json::Value {
    let (_, body) = answer.split_once("\r\n\r\n").expect("a whole head");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"))
}

fn framing_config(up: &BigUpstream) -> String {
    format!(
        "[upstreams.up]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\", \"POST\"]\npath = \"/c/{{*rest}}\"\n\
         upstream = \"up\"\nrewrite = \"/{{rest}}\"\ncache = {{ ttl = \"60s\", key_body = true }}\n\n\
         [[routes]]\nname = \"pass\"\npath = \"/p/{{*rest}}\"\nupstream = \"up\"\nrewrite = \"/{{rest}}\"\n",
        up.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_a_400_json_on_every_route_and_no_error_log() {
    let up = BigUpstream::start().await;
    let gw = StoaProcess::start(&framing_config(&up)).await;
    let bodies: [&[u8]; 3] = [
        b"zz\r\nhello\r\n0\r\n\r\n",          // not a chunk size
        b"5\r\nhelloXX0\r\n\r\n",             // no line end after the chunk
        b"ffffffffffffffffffff\r\nx\r\n\r\n", // a size that overflows
    ];
    // The upstream answers late, so that a pass-through request's body is read first.
    for path in ["/c/x", "/p/x?ms=500"] {
        if path.starts_with("/p/") {
            assert_eq!(up.requests(), 0, "nothing malformed reached the upstream");
        }
        for body in bodies {
            let mut raw = format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\ncontent-type: application/json\r\n\
                 transfer-encoding: chunked\r\n\r\n"
            )
            .into_bytes();
            raw.extend_from_slice(body);
            let answer = exchange_text(gw.port, &raw).await;
            assert!(answer.starts_with("HTTP/1.1 400 "), "{path}: {answer}");
            assert!(
                answer.to_ascii_lowercase().contains("connection: close"),
                "{path}: the connection cannot be reused: {answer}"
            );
            let json = json_body(&answer);
            assert_eq!(json["error"], "bad_request", "{path}: {answer}");
            let message = json["message"].as_str().unwrap();
            for internal in ["Invalid", "context", "internal", "Chunk"] {
                assert!(!message.contains(internal), "{path}: {message}");
            }
        }
    }
    let log = gw.log();
    assert!(
        !log.lines().any(|l| l.contains(" ERROR ")),
        "a client's mistake is not an error of stoa's:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_target_is_414_and_large_header_fields_are_431_as_json() {
    let up = BigUpstream::start().await;
    let gw = StoaProcess::start(&framing_config(&up)).await;
    for path in ["/c/", "/p/", "/nowhere/"] {
        let long = format!("{path}{}", "a".repeat(10 * 1024));
        let answer = exchange_text(
            gw.port,
            format!("GET {long} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 414 "), "{path}: {answer}");
        assert_eq!(json_body(&answer)["error"], "uri_too_long");

        let big = "b".repeat(70 * 1024);
        let raw =
            format!("GET {path}x HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
        let answer = exchange_text(gw.port, raw.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{path}: {answer}");
        assert_eq!(json_body(&answer)["error"], "header_fields_too_large");
    }
    // Just under the limits: served as usual.
    let fine = format!("/p/x?size=10&pad={}", "a".repeat(7 * 1024));
    let answer = exchange_text(
        gw.port,
        format!(
            "GET {fine} HTTP/1.1\r\nHost: a\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "b".repeat(60 * 1024)
        )
        .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(up.requests(), 1);
}
