//! The TLS listener and HTTP/2 to clients end to end: certificates made here with rcgen,
//! the real stoa binary, curl (HTTP/1.1 and HTTP/2 by ALPN, h2c with prior knowledge), the
//! `h2` crate as a well-behaved HTTP/2 client and raw HTTP/2 frames as misbehaving ones.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{demo_with, free_port, knobs, Api, EchoUpstream, StoaProcess};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A private certificate authority and a server certificate for `localhost` it issued.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// A certificate for localhost and 127.0.0.1 and its key (PEM).
    fn leaf(&self) -> (String, String) {
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA certificate, and a leaf as `cert.pem` and `key.pem`, into `dir`.
    fn install(&self, dir: &Path) -> PathBuf {
        let (cert, key) = self.leaf();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let ca = dir.join(format!("ca-{}.pem", fastrand_name()));
        std::fs::write(&ca, self.issuer.pem()).unwrap();
        ca
    }

    /// A TLS client trusting only this CA, offering `alpn`.
    fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

fn fastrand_name() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A stoa with a TLS listener (certificate files in `certs`) beside the cleartext one.
struct TlsGateway {
    gw: StoaProcess,
    tls_port: u16,
}

impl TlsGateway {
    async fn start(certs: &Path, server_extra: &str, rest: &str) -> TlsGateway {
        let tls_port = free_port();
        let extra = format!(
            "listen_tls = \"127.0.0.1:{tls_port}\"\n{server_extra}\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            certs.join("cert.pem").display(),
            certs.join("key.pem").display()
        );
        let gw = StoaProcess::start_with(&extra, rest).await;
        TlsGateway { gw, tls_port }
    }

    fn https(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.tls_port)
    }
}

/// Runs curl; its stdout (the body, then the HTTP version on a last line) and whether it
/// succeeded.
fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_version}"])
        .args(args)
        .output()
        .expect("curl is installed by scripts/install-deps.sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The body and HTTP version of a successful curl.
fn curl_ok(args: &[&str]) -> (Value, String) {
    let (ok, out) = curl(args);
    assert!(ok, "curl {args:?} failed: {out}");
    let (body, version) = out.rsplit_once('\n').unwrap();
    (
        serde_json::from_str(body).unwrap_or(Value::String(body.to_string())),
        version.to_string(),
    )
}

fn echo_route(echo: &EchoUpstream) -> String {
    format!(
        "[upstreams.echo]\nurl = \"{}\"\ntimeout = \"5s\"\n\n[[routes]]\nname = \"echo\"\npath = \"/echo\"\nupstream = \"echo\"\n",
        echo.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_listener_speaks_http11_and_http2_by_alpn_and_says_https_upstream() {
    let echo = EchoUpstream::start().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("stoa test CA").install(certs.path());
    let gw = TlsGateway::start(certs.path(), "", &echo_route(&echo)).await;
    let ca = ca.to_str().unwrap();
    let url = gw.https("/echo");
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (body, got) = curl_ok(&[flag, "--cacert", ca, &url]);
        assert_eq!(got, version, "{flag}");
        assert_eq!(body["headers"]["x-forwarded-proto"], "https", "{flag}");
    }
    // The cleartext listener beside it still says http.
    let (body, got) = curl_ok(&[&gw.gw.url("/echo")]);
    assert_eq!(got, "1.1");
    assert_eq!(body["headers"]["x-forwarded-proto"], "http");
    // Only TLS 1.2 and 1.3.
    let (ok, _) = curl(&["--tls-max", "1.1", "--cacert", ca, &url]);
    assert!(!ok, "TLS 1.1 must be refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_is_a_setting_of_the_cleartext_listener() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("h2c = true", &echo_route(&echo)).await;
    let url = gw.url("/echo");
    let (body, version) = curl_ok(&["--http2-prior-knowledge", &url]);
    assert_eq!(version, "2");
    assert_eq!(body["headers"]["x-forwarded-proto"], "http");
    // HTTP/1.1 clients are still served on the same listener.
    let (_, version) = curl_ok(&["--http1.1", &url]);
    assert_eq!(version, "1.1");

    // Off by default: prior knowledge gets no HTTP/2 answer.
    let plain = StoaProcess::start(&echo_route(&echo)).await;
    let (ok, out) = curl(&["--http2-prior-knowledge", &plain.url("/echo")]);
    assert!(!ok || !out.ends_with("\n2"), "{out}");
}

/// An HTTP/2 connection (by ALPN) to the TLS listener of `gw`, trusting `ca`.
async fn h2_over_tls(
    gw: &TlsGateway,
    ca: &Ca,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tls = tls_connect(gw.tls_port, ca, &[b"h2"])
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

async fn tls_connect(port: u16, ca: &Ca, alpn: &[&[u8]]) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").unwrap();
    ca.connector(alpn).connect(name, tcp).await
}

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2).
const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_h2_streams_on_one_connection_for_a_cold_key_cost_one_upstream_call() {
    let (up, certs, ca, rest) = cached_restaurant_over_tls(300).await;
    let gw = TlsGateway::start(certs.path(), "h2_max_concurrent_streams = 250", &rest).await;
    let (send, _conn) = h2_over_tls(&gw, &ca).await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let send = send.clone();
            tokio::spawn(async move { h2_get_tls(&send, "/restaurant/dufva").await })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    let mut misses = 0;
    for t in tasks {
        let (status, headers, body) = t.await.unwrap();
        assert_eq!(status, 200);
        for name in CONNECTION_SPECIFIC {
            assert!(!headers.contains_key(name), "{name} sent over HTTP/2");
        }
        let cache = headers["x-cache"].to_str().unwrap().to_string();
        assert!(
            ["MISS", "COALESCED", "HIT"].contains(&cache.as_str()),
            "{cache}"
        );
        misses += usize::from(cache == "MISS");
        bodies.insert(body);
    }
    assert_eq!(common::calls(&up, "GET /api/restaurant/dufva"), 1);
    assert_eq!(misses, 1);
    assert_eq!(bodies.len(), 1);
    // And a hit afterwards, on the same connection.
    let (status, headers, _) = h2_get_tls(&send, "/restaurant/dufva").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-cache"], "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_hits_start_from_a_prepared_head_and_carry_their_own_headers() {
    let (up, certs, ca, rest) = cached_restaurant_over_tls(0).await;
    for (server_extra, with_id) in [("", true), ("request_id = \"off\"", false)] {
        let gw = TlsGateway::start(certs.path(), server_extra, &rest).await;
        let (send, _conn) = h2_over_tls(&gw, &ca).await;
        let (status, _, fetched) = h2_get_tls(&send, "/restaurant/dufva").await;
        assert_eq!(status, 200);
        let mut ids = std::collections::HashSet::new();
        for _ in 0..3 {
            let (status, headers, body) = h2_get_tls(&send, "/restaurant/dufva").await;
            assert_eq!(status, 200);
            assert_eq!(body, fetched);
            assert_eq!(headers["x-cache"], "HIT");
            assert_eq!(headers.get_all("age").iter().count(), 1);
            assert!(headers["age"].to_str().unwrap().parse::<u64>().is_ok());
            assert_eq!(headers.get_all("date").iter().count(), 1);
            assert!(headers["date"].to_str().unwrap().ends_with(" GMT"));
            let members: Vec<_> = headers.get_all("cache-status").iter().collect();
            assert_eq!(members.len(), 1, "{members:?}");
            assert!(members[0].to_str().unwrap().starts_with("stoa; hit"));
            assert_eq!(headers["content-length"], body.len().to_string().as_str());
            // No placeholder of the prepared head is ever sent.
            for (name, value) in &headers {
                assert_ne!(value, "-", "{name}");
            }
            for name in CONNECTION_SPECIFIC {
                assert!(!headers.contains_key(name), "{name} sent over HTTP/2");
            }
            match headers.get("x-request-id") {
                Some(id) => {
                    assert!(with_id);
                    assert!(ids.insert(id.clone()), "an id answered twice");
                }
                None => assert!(!with_id, "no x-request-id"),
            }
        }
        assert_eq!(common::calls(&up, "GET /api/restaurant/dufva"), 1);
        up.reset_stats();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_errors_are_json_over_h2() {
    let echo = EchoUpstream::start().await;
    let dead = free_port();
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("stoa test CA");
    ca.install(certs.path());
    let rest = format!(
        "[rate_limits.tight]\nrequests_per_second = 1\nburst = 2\n\n{}\nrate_limit = \"tight\"\n\n\
         [upstreams.dead]\nurl = \"http://127.0.0.1:{dead}\"\ntimeout = \"2s\"\n\n\
         [[routes]]\nname = \"dead\"\npath = \"/dead\"\nupstream = \"dead\"\n",
        echo_route(&echo)
    );
    let gw = TlsGateway::start(certs.path(), "", &rest).await;
    let (send, _conn) = h2_over_tls(&gw, &ca).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (status, headers, body) = h2_get_tls(&send, "/echo").await;
        statuses.push(status);
        if status == 429 {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"], "rate_limited", "{v}");
            assert!(headers.contains_key("retry-after"));
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
    let (status, _, body) = h2_get_tls(&send, "/dead").await;
    assert_eq!(status, 502);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
    let (status, headers, body) = h2_get_tls(&send, "/nowhere").await;
    assert_eq!(status, 404);
    for name in CONNECTION_SPECIFIC {
        assert!(!headers.contains_key(name), "{name} sent over HTTP/2");
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"].is_string(), "{v}");
}

/// Waits until a new TLS connection trusting only `ca` succeeds (or panics after 10 s).
async fn until_served_by(gw: &TlsGateway, ca: &Ca) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if tls_connect(gw.tls_port, ca, &[b"h2"]).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the new certificate was never presented:\n{}", gw.gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_sighup_and_open_connections_keep_working() {
    let echo = EchoUpstream::start().await;
    let certs = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    old_ca.install(certs.path());
    let gw = TlsGateway::start(certs.path(), "", &echo_route(&echo)).await;
    let (held, _conn) = h2_over_tls(&gw, &old_ca).await;
    assert_eq!(h2_get_tls(&held, "/echo").await.0, 200);
    assert!(tls_connect(gw.tls_port, &new_ca, &[b"h2"]).await.is_err());

    new_ca.install(certs.path());
    gw.gw.signal(libc::SIGHUP);
    until_served_by(&gw, &new_ca).await;
    assert!(
        tls_connect(gw.tls_port, &old_ca, &[b"h2"]).await.is_err(),
        "new handshakes present the new certificate"
    );
    // The connection opened before the reload is still served.
    let (status, _, body) = h2_get_tls(&held, "/echo").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
}

const TOKEN: &str = "tls-test-admin-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_file_is_a_reload_error_that_changes_nothing() {
    let echo = EchoUpstream::start().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("stoa test CA");
    ca.install(certs.path());
    let rest = format!("token = \"{TOKEN}\"\n\n{}", echo_route(&echo));
    let gw = TlsGateway::start(certs.path(), "", &rest).await;
    let cert = certs.path().join("cert.pem");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let r = reqwest::Client::new()
        .post(gw.gw.admin_url("/admin/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(!r.status().is_success(), "{}", r.status());
    let text = r.text().await.unwrap();
    assert!(text.contains("server.tls.cert"), "{text}");
    assert!(text.contains(cert.to_str().unwrap()), "{text}");
    // A key that does not belong to the certificate is refused too.
    let (good_cert, _) = ca.leaf();
    std::fs::write(&cert, good_cert).unwrap();
    let r = reqwest::Client::new()
        .post(gw.gw.admin_url("/admin/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.contains("server.tls.key") && text.contains("does not match"),
        "{text}"
    );
    // New handshakes still present the certificate read at start.
    let (send, _conn) = h2_over_tls(&gw, &ca).await;
    assert_eq!(h2_get_tls(&send, "/echo").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_a_client_hello_is_closed_and_tls_connections_count() {
    let echo = EchoUpstream::start().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("stoa test CA");
    ca.install(certs.path());
    let gw = TlsGateway::start(
        certs.path(),
        "header_timeout = \"500ms\"\nmax_connections = 1",
        &echo_route(&echo),
    )
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", gw.tls_port))
        .await
        .unwrap();
    // While it is open, it is the one connection allowed: a TLS client is refused.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tls_connect(gw.tls_port, &ca, &[b"h2"]).await.is_err());
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the silent connection was never closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Its slot is free again.
    let (send, _conn) = h2_over_tls(&gw, &ca).await;
    assert_eq!(h2_get_tls(&send, "/echo").await.0, 200);
}

// ---------------------------------------------------------------------------------------
// Misbehaving HTTP/2 clients, written as raw frames on h2c.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A HEADERS frame (END_STREAM, END_HEADERS) for `GET path` on `stream`, HPACK-encoded
/// without indexing or Huffman.
fn get_headers(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
    block.push(0x04); // :path, literal without indexing
    block.push(path.len() as u8);
    block.extend_from_slice(path.as_bytes());
    block.push(0x01); // :authority
    block.push(9);
    block.extend_from_slice(b"localhost");
    frame(0x1, 0x5, stream, &block)
}

/// The connection preface, with SETTINGS granting `initial_window` per stream.
fn preface(initial_window: u32) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    let mut settings = vec![0x00, 0x04];
    settings.extend_from_slice(&initial_window.to_be_bytes());
    out.extend(frame(0x4, 0, 0, &settings));
    out
}

/// stoa's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// An upstream answering every request with `size` bytes, counting the bytes it managed to
/// write.
async fn big_upstream(size: usize) -> (u16, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let written = Arc::new(AtomicU64::new(0));
    let count = written.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if common::read_head(&mut sock, &mut buf).await.is_none() {
                    return;
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {size}\r\n\r\n"
                );
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if sock.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    left -= n;
                }
            });
        }
    });
    (port, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_client_never_reads_hold_bounded_memory_and_others_are_served() {
    const STREAMS: u32 = 100;
    const SIZE: usize = 16 * 1024 * 1024;
    let (up, written) = big_upstream(SIZE).await;
    let rest = format!(
        "[upstreams.big]\nurl = \"http://127.0.0.1:{up}\"\ntimeout = \"30s\"\n\n\
         [[routes]]\nname = \"big\"\npath = \"/big\"\nupstream = \"big\"\n"
    );
    let gw = StoaProcess::start_with("h2c = true", &rest).await;
    let pid = gw.child.id();
    let before = rss_kib(pid);

    // Opens streams on a big answer, grants the largest windows HTTP/2 allows, and never
    // reads a byte.
    let mut hog = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut out = preface(0x7fff_ffff);
    out.extend(frame(0x8, 0, 0, &0x7fff_0000u32.to_be_bytes()));
    for i in 0..STREAMS {
        out.extend(get_headers(1 + 2 * i, "/big"));
    }
    hog.write_all(&out).await.unwrap();
    // Once the buffers on the way are full, nothing moves: neither stoa's memory nor what
    // the upstream manages to write.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (grown, sent) = (
        rss_kib(pid).saturating_sub(before),
        written.load(Ordering::Relaxed),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (grown_later, sent_later) = (
        rss_kib(pid).saturating_sub(before),
        written.load(Ordering::Relaxed),
    );
    let asked = u64::from(STREAMS) * SIZE as u64;
    eprintln!(
        "rss grew {grown} KiB then {grown_later} KiB; the upstream wrote {sent} then \
         {sent_later} of {asked} bytes"
    );
    // At most 800 KiB a stream (the answers are 16 MiB each): a 64 KiB send buffer per
    // stream, the upstream connection and pingora's buffers (with h2's default 400 KiB send
    // buffers, stoa grows by about 100 MiB here).
    assert!(
        grown_later < u64::from(STREAMS) * 800,
        "stoa's memory grew by {grown_later} KiB for a client that reads nothing"
    );
    assert!(
        grown_later < grown + 8 * 1024,
        "stoa's memory kept growing: {grown} KiB, then {grown_later} KiB"
    );
    assert!(
        sent_later < asked / 2,
        "the upstream wrote {sent_later} of {asked} bytes"
    );
    assert!(
        sent_later - sent < 4 * 1024 * 1024,
        "the upstream kept writing: {sent}, then {sent_later} bytes"
    );

    // Another client is served meanwhile.
    let (ok, out) = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        &gw.url("/big"),
    ]);
    assert!(ok && out.ends_with("\n2"), "{out}");
    drop(hog);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_gets_goaway_and_others_are_served() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("h2c = true", &echo_route(&echo)).await;
    let mut attacker = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut out = preface(65_535);
    // HEADERS then RST_STREAM (CANCEL), over and over.
    for i in 0..5_000u32 {
        let stream = 1 + 2 * i;
        out.extend(get_headers(stream, "/echo"));
        out.extend(frame(0x3, 0, stream, &8u32.to_be_bytes()));
    }
    // Written in the background: stoa may close the connection before all of it is read.
    let (mut rd, mut wr) = attacker.split();
    let write = async {
        let _ = wr.write_all(&out).await;
    };
    let read = async {
        // Frames until GOAWAY, or the end of the connection.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = match tokio::time::timeout_at(deadline.into(), rd.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => return (None, true),
                Err(_) => return (None, false),
            };
            if n == 0 {
                return (None, true);
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            while buf.len() >= at + 9 {
                let len = (usize::from(buf[at]) << 16)
                    | (usize::from(buf[at + 1]) << 8)
                    | usize::from(buf[at + 2]);
                if buf.len() < at + 9 + len {
                    break;
                }
                if buf[at + 3] == 0x7 && len >= 8 {
                    let p = &buf[at + 9..at + 9 + len];
                    return (Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]])), true);
                }
                at += 9 + len;
            }
            buf.drain(..at);
        }
    };
    let (_, (goaway, ended)) = tokio::join!(write, read);
    assert!(
        ended,
        "the flooding connection was neither sent GOAWAY nor closed"
    );
    // ENHANCE_YOUR_CALM, when the GOAWAY got through before the close.
    if let Some(code) = goaway {
        assert_eq!(code, 0xb, "GOAWAY error code");
    }
    let (body, version) = curl_ok(&["--http2-prior-knowledge", &gw.url("/echo")]);
    assert_eq!(version, "2");
    assert_eq!(body["method"], "GET");
}

#[test]
fn stoa_check_names_each_bad_listener_tls_file_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("stoa test CA");
    let write = |name: &str, text: &str| {
        let path = d.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (cert, key) = ca.leaf();
    let (_, other_key) = ca.leaf();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let expired_key = KeyPair::generate().unwrap();
    let expired = params.signed_by(&expired_key, &ca.issuer).unwrap();
    let (cert, key, other_key) = (
        write("cert.pem", &cert),
        write("key.pem", &key),
        write("other.key", &other_key),
    );
    let (expired, expired_key) = (
        write("expired.pem", &expired.pem()),
        write("expired.key", &expired_key.serialize_pem()),
    );
    let missing = d.join("missing.pem").display().to_string();
    let not_pem = write("not.pem", "just some text\n");
    let cases = [
        (&missing, &key, "server.tls.cert", "cannot read"),
        (&not_pem, &key, "server.tls.cert", "no PEM certificate"),
        (&expired, &expired_key, "server.tls.cert", "expired on"),
        (&cert, &other_key, "server.tls.key", "does not match"),
        (&cert, &not_pem, "server.tls.key", "not a PEM private key"),
    ];
    for (cert_file, key_file, path, what) in cases {
        let config = format!(
            "[server]\nlisten_tls = \"127.0.0.1:8443\"\n[server.tls]\ncert = {cert_file:?}\nkey = {key_file:?}\n"
        );
        let file = d.join("stoa.toml");
        std::fs::write(&file, config).unwrap();
        let (code, out, err) = common::stoa(&["check", "--config", file.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{cert_file} {key_file}: {out}{err}");
        let named = if path.ends_with("cert") {
            cert_file
        } else {
            key_file
        };
        assert!(
            err.lines()
                .any(|l| l.contains(path) && l.contains(named.as_str()) && l.contains(what)),
            "{path} {what}: {err}"
        );
    }
    // Good files: the TLS listener is the only one.
    let config = format!(
        "[server]\nlisten_tls = \"127.0.0.1:8443\"\n[server.tls]\ncert = {cert:?}\nkey = {key:?}\n"
    );
    let file = d.join("stoa.toml");
    std::fs::write(&file, config).unwrap();
    let (code, out, err) = common::stoa(&["check", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("listening on 127.0.0.1:8443 (TLS), admin"),
        "{out}"
    );
    // listen_tls and [server.tls] go together.
    std::fs::write(&file, "[server]\nlisten_tls = \"127.0.0.1:8443\"\n").unwrap();
    let (code, _, err) = common::stoa(&["check", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("server.tls: missing"), "{err}");
}

/// Reads until the peer closes; how long that took (panics after `within`).
async fn closed_after(sock: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection was not closed within {within:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_have_deadlines_too() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with(
        "h2c = true\nheader_timeout = \"500ms\"\nkeepalive_timeout = \"1s\"",
        &echo_route(&echo),
    )
    .await;
    // Half a preface, then nothing: closed at the head deadline.
    let mut slow = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    slow.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let waited = closed_after(&mut slow, Duration::from_secs(5)).await;
    assert!(waited < Duration::from_secs(3), "{waited:?}");

    // A whole opening and one answered request, then silence: closed once idle for
    // keepalive_timeout.
    let mut idle = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut out = preface(65_535);
    out.extend(get_headers(1, "/echo"));
    idle.write_all(&out).await.unwrap();
    let waited = closed_after(&mut idle, Duration::from_secs(5)).await;
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

/// One GET over an HTTP/2 connection to the TLS listener: status, headers and body.
async fn h2_get_tls(
    send: &h2::client::SendRequest<Bytes>,
    path: &str,
) -> (u16, http::HeaderMap, Bytes) {
    common::h2::get_with_scheme(send, "https", path, &[]).await
}

/// The restaurants demo answering after `latency_ms`, a CA whose certificate is installed
/// in a new directory, and a cached route to the demo (the configuration after `[server]`).
async fn cached_restaurant_over_tls(
    latency_ms: u64,
) -> (common::DemoServer, tempfile::TempDir, Ca, String) {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, latency_ms)).await;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("stoa test CA");
    ca.install(certs.path());
    let rest = format!(
        "[upstreams.up]\nurl = \"{}\"\ntimeout = \"5s\"\n\n[[routes]]\nname = \"restaurant\"\n\
         methods = [\"GET\"]\npath = \"/restaurant/{{id}}\"\nrewrite = \"/api/restaurant/{{id}}\"\n\
         upstream = \"up\"\ncache = {{ ttl = \"60s\" }}\n",
        up.url()
    );
    (up, certs, ca, rest)
}
