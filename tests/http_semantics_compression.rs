//! Issue 13, item 10: stored answers are compressed once per entry and coding (br, zstd,
//! gzip) for clients whose `Accept-Encoding` takes one, identity for the rest, with
//! `Vary: Accept-Encoding` on every answer of the route. A small origin sets the content
//! types, sizes and encodings in question; the test client decodes nothing by itself.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{read_head, sample, StoaProcess};

/// A JSON body of about 30 KB that compresses well, the same on every call.
fn big_json() -> String {
    let items: Vec<String> = (0..600)
        .map(|i| {
            format!(
                "{{\"id\":{i},\"dish\":\"dish number {}\",\"price\":{}}}",
                i % 41,
                i % 17
            )
        })
        .collect();
    format!("{{\"menu\":[{}]}}", items.join(","))
}

fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(body).unwrap();
    enc.finish().unwrap()
}

/// Decodes a body in `coding` with the codecs' own crates.
fn decode(coding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::stream::decode_all(body).unwrap(),
        other => panic!("unexpected coding {other}"),
    }
    out
}

/// An origin answering one request per connection, by the last path segment: `big` (JSON,
/// `ETag: "v1"`), `small` (a short JSON), `binary` (image/png), `gzipped` (JSON sent
/// gzip-encoded whatever the request asked), `reval` (the big JSON with `ETag: "r1"` and
/// `X-Round: 1`; a request with `If-None-Match` gets a 304 with `X-Round: 2`). It counts
/// requests and keeps the `Accept-Encoding` and `If-None-Match` each carried.
struct Origin {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    accept_encodings: Arc<Mutex<Vec<Option<String>>>>,
    if_none_match: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

fn header_line(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

impl Origin {
    async fn start() -> Origin {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let accept_encodings = Arc::new(Mutex::new(Vec::new()));
        let if_none_match = Arc::new(Mutex::new(Vec::new()));
        let (c, ae, inm) = (
            calls.clone(),
            accept_encodings.clone(),
            if_none_match.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (c, ae, inm) = (c.clone(), ae.clone(), inm.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let Some(end) = read_head(&mut sock, &mut buf).await else {
                        return;
                    };
                    c.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let sent = header_line(&head, "accept-encoding");
                    ae.lock().unwrap().push(sent);
                    let conditional = header_line(&head, "if-none-match");
                    inm.lock().unwrap().push(conditional.clone());
                    let target = head.split(' ').nth(1).unwrap_or_default().to_string();
                    if target.ends_with("/reval") && conditional.is_some() {
                        let head = "HTTP/1.1 304 Not Modified\r\nETag: \"r1\"\r\n\
                                    X-Round: 2\r\nConnection: close\r\n\r\n";
                        let _ = sock.write_all(head.as_bytes()).await;
                        let _ = sock.shutdown().await;
                        return;
                    }
                    let (ctype, extra, body): (&str, &str, Vec<u8>) =
                        match target.rsplit('/').next().unwrap_or_default() {
                            "small" => ("application/json", "", b"{\"ok\":true}".to_vec()),
                            "binary" => ("image/png", "", vec![b'a'; 20_000]),
                            "gzipped" => (
                                "application/json",
                                "Content-Encoding: gzip\r\nETag: \"g1\"\r\n",
                                gzip(big_json().as_bytes()),
                            ),
                            "reval" => (
                                "application/json",
                                "ETag: \"r1\"\r\nX-Round: 1\r\n",
                                big_json().into_bytes(),
                            ),
                            _ => (
                                "application/json",
                                "ETag: \"v1\"\r\n",
                                big_json().into_bytes(),
                            ),
                        };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n{extra}\
                         Content-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(&body).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Origin {
            addr,
            calls,
            accept_encodings,
            if_none_match,
            task,
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The origin as `[upstreams.origin]`, a cached route on `/c/{name}` (compressing by
/// default), one on `/plain/{name}` with `compress = false`, then `extra`.
async fn start(origin: &Origin, extra: &str) -> StoaProcess {
    start_with(origin, "", extra).await
}

/// [`start`], with `server_extra` in the `[server]` section.
async fn start_with(origin: &Origin, server_extra: &str, extra: &str) -> StoaProcess {
    StoaProcess::start_with(
        server_extra,
        &format!(
            "[upstreams.origin]\nurl = \"http://{}\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\", \"HEAD\"]\npath = \"/c/{{name}}\"\n\
         upstream = \"origin\"\ncache = {{ ttl = \"60s\" }}\n\n\
         [[routes]]\nname = \"plain\"\nmethods = [\"GET\"]\npath = \"/plain/{{name}}\"\n\
         upstream = \"origin\"\ncache = {{ ttl = \"60s\", compress = false }}\n\n{extra}",
            origin.addr
        ),
    )
    .await
}

struct Got {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn vary_names_accept_encoding(&self) -> bool {
        self.headers.get_all("vary").iter().any(|v| {
            v.to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("accept-encoding")
        })
    }
}

async fn get(method: reqwest::Method, url: &str, accept_encoding: Option<&str>) -> Got {
    // No decompression feature: the client neither asks for nor decodes any coding itself.
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(ae) = accept_encoding {
        req = req.header("accept-encoding", ae);
    }
    let r = req.send().await.unwrap();
    Got {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

async fn get_ae(url: &str, accept_encoding: Option<&str>) -> Got {
    get(reqwest::Method::GET, url, accept_encoding).await
}

fn compressions(metrics: &str, coding: &str) -> f64 {
    sample(
        metrics,
        &format!("stoa_cache_compressions_total{{encoding=\"{coding}\"}}"),
    )
    .unwrap_or_else(|| panic!("no compressions series for {coding}:\n{metrics}"))
}

#[tokio::test]
async fn each_encoding_decodes_to_the_identity_bytes_with_vary_on_misses_and_hits() {
    let origin = Origin::start().await;
    let gw = start(&origin, "").await;
    let url = gw.url("/c/big");
    let identity = big_json().into_bytes();

    let miss = get_ae(&url, None).await;
    assert_eq!(miss.status, 200);
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    assert!(miss.vary_names_accept_encoding(), "{:?}", miss.headers);
    assert_eq!(miss.header("content-encoding"), None);
    assert_eq!(miss.body, identity);

    for coding in ["br", "zstd", "gzip"] {
        let got = get_ae(&url, Some(coding)).await;
        assert_eq!(got.status, 200, "{coding}");
        assert_eq!(got.header("x-cache"), Some("HIT"), "{coding}");
        assert!(
            got.vary_names_accept_encoding(),
            "{coding}: {:?}",
            got.headers
        );
        assert_eq!(got.header("content-encoding"), Some(coding));
        assert_eq!(
            got.header("content-length"),
            Some(got.body.len().to_string().as_str()),
            "{coding}"
        );
        assert!(
            got.body.len() < identity.len() / 4,
            "{coding}: {} bytes",
            got.body.len()
        );
        assert_eq!(decode(coding, &got.body), identity, "{coding}");
    }
    let hit = get_ae(&url, Some("identity")).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert!(hit.vary_names_accept_encoding());
    assert_eq!(hit.header("content-encoding"), None);
    assert_eq!(hit.body, identity);
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1, "one fetch");

    // A miss asked with gzip is answered compressed too.
    let miss = get_ae(&gw.url("/c/other"), Some("gzip")).await;
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    assert_eq!(miss.header("content-encoding"), Some("gzip"));
    assert!(miss.vary_names_accept_encoding());
    assert_eq!(decode("gzip", &miss.body), identity);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_each_variant_is_answered_from_its_own_prepared_head() {
    let origin = Origin::start().await;
    let gw = start_with(&origin, "h2c = true", "").await;
    let send = common::h2::h2c(gw.port).await;
    let identity = big_json().into_bytes();
    let (status, _, body) =
        common::h2::get(&send, "/c/big", &[("accept-encoding", "identity")]).await;
    assert_eq!((status, &body[..]), (200, &identity[..]));
    // Twice each, in turns: every variant's head is built once and used again.
    for _ in 0..2 {
        for coding in ["br", "gzip", "identity"] {
            let (status, headers, body) =
                common::h2::get(&send, "/c/big", &[("accept-encoding", coding)]).await;
            assert_eq!(status, 200, "{coding}");
            assert_eq!(headers["x-cache"], "HIT", "{coding}");
            assert_eq!(
                headers["content-length"],
                body.len().to_string().as_str(),
                "{coding}"
            );
            let encoding = headers.get("content-encoding").map(|v| v.to_str().unwrap());
            if coding == "identity" {
                assert_eq!(encoding, None);
                assert_eq!(body, identity);
            } else {
                assert_eq!(encoding, Some(coding));
                assert_eq!(decode(coding, &body), identity, "{coding}");
            }
            assert_eq!(headers.get_all("age").iter().count(), 1, "{coding}");
            assert_eq!(headers.get_all("cache-status").iter().count(), 1);
        }
    }
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1, "one fetch");
}

#[tokio::test]
async fn q_values_choose_the_encoding() {
    let origin = Origin::start().await;
    let gw = start(&origin, "").await;
    let url = gw.url("/c/big");
    let cases = [
        ("gzip, deflate, br, zstd", Some("br")),
        ("gzip, zstd", Some("zstd")),
        ("br;q=0.5, gzip", Some("gzip")),
        ("br;q=0, zstd;q=0, gzip;q=0.1", Some("gzip")),
        ("*", Some("br")),
        ("*;q=0.5, br;q=0", Some("zstd")),
        ("br;q=0, zstd;q=0, gzip;q=0", None),
        ("gzip;q=0.4, identity", None),
        ("deflate", None),
        ("", None),
    ];
    for (accept, want) in cases {
        let got = get_ae(&url, Some(accept)).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-encoding"), want, "{accept:?}");
        assert!(got.vary_names_accept_encoding(), "{accept:?}");
    }
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn small_binary_and_switched_off_answers_stay_identity() {
    let origin = Origin::start().await;
    let gw = start(&origin, "").await;
    for path in ["/c/small", "/c/binary", "/plain/big"] {
        for _ in 0..2 {
            let got = get_ae(&gw.url(path), Some("gzip, br, zstd")).await;
            assert_eq!(got.status, 200, "{path}");
            assert_eq!(got.header("content-encoding"), None, "{path}");
            assert_eq!(
                got.header("content-length"),
                Some(got.body.len().to_string().as_str())
            );
            // Only the route that compresses says it varies.
            assert_eq!(
                got.vary_names_accept_encoding(),
                path != "/plain/big",
                "{path}"
            );
        }
    }
    let metrics = gw.metrics().await;
    for coding in ["br", "zstd", "gzip"] {
        assert_eq!(compressions(&metrics, coding), 0.0, "{coding}");
    }
}

#[tokio::test]
async fn a_hit_costs_no_compression_after_the_first() {
    let origin = Origin::start().await;
    let gw = start(&origin, "").await;
    let url = gw.url("/c/big");
    let first = get_ae(&url, Some("gzip")).await;
    assert_eq!(first.header("content-encoding"), Some("gzip"));
    let metrics = gw.metrics().await;
    // Compressed once per coding when stored, before any client asks for br or zstd.
    for coding in ["br", "zstd", "gzip"] {
        assert_eq!(compressions(&metrics, coding), 1.0, "{coding}");
    }
    let saved = sample(
        &metrics,
        "stoa_cache_compression_saved_bytes_total{encoding=\"gzip\"}",
    )
    .unwrap();
    assert_eq!(
        saved,
        (big_json().len() - first.body.len()) as f64,
        "bytes saved by gzip"
    );
    for accept in ["gzip", "br", "zstd", "gzip, br", "identity"].repeat(10) {
        let got = get_ae(&url, Some(accept)).await;
        assert_eq!(got.header("x-cache"), Some("HIT"));
    }
    let metrics = gw.metrics().await;
    for coding in ["br", "zstd", "gzip"] {
        assert_eq!(
            compressions(&metrics, coding),
            1.0,
            "{coding} after 50 hits"
        );
    }
}

#[tokio::test]
async fn an_upstream_gzip_answer_is_stored_decoded() {
    let origin = Origin::start().await;
    let gw = start(&origin, "").await;
    let url = gw.url("/c/gzipped");
    let identity = big_json().into_bytes();
    let plain = get_ae(&url, None).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(
        plain.body, identity,
        "decoded for a client that asked for none"
    );
    assert_eq!(plain.header("etag"), Some("W/\"g1\""));
    let gz = get_ae(&url, Some("gzip")).await;
    assert_eq!(gz.header("x-cache"), Some("HIT"));
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(decode("gzip", &gz.body), identity);
    let br = get_ae(&url, Some("br")).await;
    assert_eq!(decode("br", &br.body), identity);
    // The shared fetch asked for no coding.
    assert_eq!(*origin.accept_encodings.lock().unwrap(), vec![None]);
}

#[tokio::test]
async fn a_compressed_variant_has_a_weak_etag_and_head_gives_its_headers() {
    let origin = Origin::start().await;
    let gw = start(&origin, "").await;
    let url = gw.url("/c/big");
    let identity = get_ae(&url, None).await;
    assert_eq!(identity.header("etag"), Some("\"v1\""));
    let gz = get_ae(&url, Some("gzip")).await;
    // Weak on the variant (its bytes differ), the same opaque tag: a client's
    // `If-None-Match: W/"v1"` compares equal to either (weak comparison, RFC 9110 §13.1.2).
    assert_eq!(gz.header("etag"), Some("W/\"v1\""));
    let head = get(reqwest::Method::HEAD, &url, Some("gzip")).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-encoding"), Some("gzip"));
    assert_eq!(
        head.header("content-length"),
        Some(gz.body.len().to_string().as_str())
    );
    assert_eq!(head.header("etag"), Some("W/\"v1\""));
    assert!(head.vary_names_accept_encoding());
    let head = get(reqwest::Method::HEAD, &url, None).await;
    assert_eq!(head.header("content-encoding"), None);
    assert_eq!(
        head.header("content-length"),
        Some(identity.body.len().to_string().as_str())
    );
}

#[tokio::test]
async fn an_entry_is_weighed_with_its_variants() {
    let origin = Origin::start().await;
    let gw = start(&origin, "").await;
    let store_bytes = |metrics: String| sample(&metrics, "stoa_cache_bytes").unwrap() as u64;
    // The same answer, stored on a route that does not compress, then on one that does.
    let plain = get_ae(&gw.url("/plain/big"), None).await;
    assert_eq!(plain.body.len(), big_json().len());
    let without = store_bytes(gw.metrics().await);
    let mut compressed_bytes = 0;
    for coding in ["br", "zstd", "gzip"] {
        compressed_bytes += get_ae(&gw.url("/c/big"), Some(coding)).await.body.len() as u64;
    }
    let with = store_bytes(gw.metrics().await) - without;
    // Give or take the few bytes the route names and paths differ by.
    assert!(
        with + 16 >= without + compressed_bytes,
        "the compressing route's entry weighs {with}, the other {without}, variants {compressed_bytes}"
    );
    // And no more than the variants and their heads (a few hundred bytes each).
    assert!(
        with <= without + compressed_bytes + 3 * 512,
        "{with} vs {without}"
    );
}

/// `Cache-Status` without its `ttl` (which counts down between two requests).
fn cache_status_kind(got: &Got) -> String {
    let value = got.header("cache-status").expect("Cache-Status");
    value
        .split(';')
        .map(str::trim)
        .filter(|p| !p.starts_with("ttl="))
        .collect::<Vec<_>>()
        .join("; ")
}

async fn get_conditional(url: &str, accept_encoding: Option<&str>, if_none_match: &str) -> Got {
    let mut req = reqwest::Client::new()
        .get(url)
        .header("if-none-match", if_none_match);
    if let Some(ae) = accept_encoding {
        req = req.header("accept-encoding", ae);
    }
    let r = req.send().await.unwrap();
    Got {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

#[tokio::test]
async fn a_conditional_request_on_a_compressed_variant_gets_304_from_memory() {
    let origin = Origin::start().await;
    let gw = start(&origin, "").await;
    let url = gw.url("/c/big");
    let gz = get_ae(&url, Some("gzip")).await;
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("etag"), Some("W/\"v1\""));
    let identity_hit = get_ae(&url, None).await;
    let gz_hit = get_ae(&url, Some("gzip")).await;
    assert_eq!(
        (gz_hit.header("x-cache"), identity_hit.header("x-cache")),
        (Some("HIT"), Some("HIT"))
    );
    assert_eq!(cache_status_kind(&gz_hit), cache_status_kind(&identity_hit));

    // The variant's own weak tag, asked by clients taking a compressed answer.
    for accept in ["gzip", "br", "zstd, gzip;q=0.5"] {
        let got = get_conditional(&url, Some(accept), "W/\"v1\"").await;
        assert_eq!(got.status, 304, "{accept}");
        assert!(got.body.is_empty());
        assert_eq!(got.header("etag"), Some("W/\"v1\""), "{accept}");
        assert!(got.vary_names_accept_encoding(), "{accept}");
        assert_eq!(got.header("content-encoding"), None);
        assert_eq!(got.header("content-length"), None);
        assert_eq!(got.header("x-cache"), Some("HIT"));
        assert_eq!(cache_status_kind(&got), cache_status_kind(&identity_hit));
    }
    // An identity client gets the identity head's strong tag, still with Vary.
    let got = get_conditional(&url, None, "\"v1\"").await;
    assert_eq!(got.status, 304);
    assert_eq!(got.header("etag"), Some("\"v1\""));
    assert!(got.vary_names_accept_encoding());
    // Another tag: the whole compressed answer.
    let got = get_conditional(&url, Some("gzip"), "W/\"v0\"").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert_eq!(decode("gzip", &got.body), big_json().into_bytes());

    assert_eq!(origin.calls.load(Ordering::SeqCst), 1, "all from memory");
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(&metrics, "stoa_cache_not_modified_total{route=\"cached\"}"),
        Some(4.0)
    );
}

#[tokio::test]
async fn a_revalidated_entry_keeps_its_compressed_variants() {
    let origin = Origin::start().await;
    let gw = start(
        &origin,
        "[[routes]]\nname = \"short\"\nmethods = [\"GET\"]\npath = \"/r/{name}\"\n\
         upstream = \"origin\"\ncache = { ttl = \"1s\" }\n",
    )
    .await;
    let url = gw.url("/r/reval");
    let identity = big_json().into_bytes();
    let first = get_ae(&url, Some("br")).await;
    assert_eq!(first.header("content-encoding"), Some("br"));
    assert_eq!(first.header("x-round"), Some("1"));
    let metrics = gw.metrics().await;
    let weight_before = sample(&metrics, "stoa_cache_bytes").unwrap();
    for coding in ["br", "zstd", "gzip"] {
        assert_eq!(compressions(&metrics, coding), 1.0, "{coding}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    // Expired: revalidated upstream with the identity head's strong tag, answered 304.
    let gz = get_ae(&url, Some("gzip")).await;
    assert_eq!(gz.status, 200);
    assert_eq!(gz.header("x-cache"), Some("MISS"));
    assert_eq!(
        *origin.if_none_match.lock().unwrap(),
        vec![None, Some("\"r1\"".to_string())],
        "revalidation asks with the upstream's own ETag, not the weakened one"
    );
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(
        gz.header("content-length"),
        Some(gz.body.len().to_string().as_str())
    );
    assert_eq!(decode("gzip", &gz.body), identity);
    assert_eq!(gz.header("x-round"), Some("2"), "the 304's headers applied");
    assert_eq!(gz.header("etag"), Some("W/\"r1\""));
    assert!(gz.vary_names_accept_encoding());
    assert!(
        cache_status_kind(&gz).contains("fwd=miss; fwd-status=200; stored"),
        "{:?}",
        gz.header("cache-status")
    );

    for coding in ["br", "zstd"] {
        let got = get_ae(&url, Some(coding)).await;
        assert_eq!(got.header("x-cache"), Some("HIT"));
        assert_eq!(got.header("content-encoding"), Some(coding));
        assert_eq!(got.header("x-round"), Some("2"));
        assert_eq!(got.header("etag"), Some("W/\"r1\""));
        assert_eq!(decode(coding, &got.body), identity);
    }
    let plain = get_ae(&url, None).await;
    assert_eq!(plain.header("x-cache"), Some("HIT"));
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("etag"), Some("\"r1\""));
    assert_eq!(plain.header("x-round"), Some("2"));
    assert_eq!(plain.body, identity);

    assert_eq!(origin.calls.load(Ordering::SeqCst), 2);
    let metrics = gw.metrics().await;
    for coding in ["br", "zstd", "gzip"] {
        assert_eq!(
            compressions(&metrics, coding),
            1.0,
            "{coding}: no new compression"
        );
    }
    assert_eq!(
        sample(
            &metrics,
            "stoa_cache_revalidations_total{result=\"not_modified\",route=\"short\"}"
        ),
        Some(1.0)
    );
    // The same bodies and heads of the same sizes: the entry weighs what it did.
    let weight_after = sample(&metrics, "stoa_cache_bytes").unwrap();
    assert!(
        (weight_after - weight_before).abs() < 64.0,
        "{weight_before} before, {weight_after} after"
    );
}
