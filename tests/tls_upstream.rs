//! HTTPS upstreams end to end: certificates made here with rcgen, an HTTPS upstream written
//! here on tokio-rustls (counting its TCP connections, TLS handshakes and requests), the
//! real stoa binary in front, on pass-through routes, cached routes and aggregate legs.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{stoa, x_cache, StoaProcess};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A private certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names`.
    fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth, None)
    }

    /// A client certificate.
    fn client(&self, name: &str) -> Leaf {
        self.leaf(&[name], ExtendedKeyUsagePurpose::ClientAuth, None)
    }

    fn leaf(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        not_after: Option<(i32, u8, u8)>,
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(y - 1, m, d);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Counts of what reached the upstream.
#[derive(Default)]
struct Counts {
    /// TCP connections accepted.
    accepted: AtomicUsize,
    /// TLS handshakes completed.
    handshakes: AtomicUsize,
    /// Requests answered.
    requests: AtomicUsize,
}

/// An HTTPS upstream answering every request with `{"path": <target>, "n": <count>}` on
/// keep-alive HTTP/1.1 connections, after `delay`.
struct TlsUpstream {
    port: u16,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    /// Serves with `leaf`; with `client_ca`, requires a client certificate issued by it.
    async fn start(leaf: &Leaf, client_ca: Option<&Ca>, delay: Duration) -> TlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let config = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.issuer.der().clone()).unwrap();
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        }
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn({
            let counts = counts.clone();
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    counts.accepted.fetch_add(1, Ordering::SeqCst);
                    let (acceptor, counts) = (acceptor.clone(), counts.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        counts.handshakes.fetch_add(1, Ordering::SeqCst);
                        serve(tls, &counts, delay).await;
                    });
                }
            }
        });
        TlsUpstream { port, counts, task }
    }

    fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }

    fn handshakes(&self) -> usize {
        self.counts.handshakes.load(Ordering::SeqCst)
    }

    fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }
}

/// Answers requests on one connection until the client closes it.
async fn serve(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    counts: &Counts,
    delay: Duration,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = common::find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let body_len = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            let mut chunk = [0u8; 4096];
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        let target = head.split(' ').nth(1).unwrap_or("").to_string();
        let n = counts.requests.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(delay).await;
        let body = serde_json::json!({ "path": target, "n": n }).to_string();
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if tls.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// An upstream `name` at `url` with `extra` keys, and three routes over it: `/<name>/pass/{id}`
/// (pass-through), `/<name>/cached/{id}` (cached 60 s) and `/<name>/both/{id}` (an aggregate
/// of the two).
fn routes_over(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[upstreams.{name}]
url = "{url}"
timeout = "5s"
{extra}

[[routes]]
name = "{name}-pass"
path = "/{name}/pass/{{id}}"
upstream = "{name}"
rewrite = "/item/{{id}}"

[[routes]]
name = "{name}-cached"
methods = ["GET"]
path = "/{name}/cached/{{id}}"
upstream = "{name}"
rewrite = "/item/{{id}}"
cache = {{ ttl = "60s" }}

[[routes]]
name = "{name}-both"
methods = ["GET"]
path = "/{name}/both/{{id}}"

[[routes.legs]]
name = "pass"
path = "/{name}/pass/{{id}}"

[[routes.legs]]
name = "cached"
path = "/{name}/cached/{{id}}"
"#
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(2000)
        .build()
        .unwrap()
}

async fn get(http: &reqwest::Client, url: String) -> (u16, String, Value) {
    let r = http.get(url).send().await.expect("request failed");
    let status = r.status().as_u16();
    let cache = x_cache(&r);
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, cache, v)
}

/// Asserts stoa's 502 naming the TLS failure.
fn assert_tls_error(status: u16, v: &Value, what: &str) {
    assert_eq!(status, 502, "{what}: {v}");
    assert_eq!(v["error"], "upstream_tls", "{what}: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("TLS")),
        "{what}: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_in_ca_file_serves_pass_through_cached_and_aggregate_routes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.server(&["localhost"]), None, Duration::ZERO).await;
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let config = routes_over(
        "sec",
        &format!("https://localhost:{}/v1", up.port),
        &format!("ca_file = {:?}", ca_file.display().to_string()),
    );
    let gw = StoaProcess::start(&config).await;
    let http = client();

    let (status, _, v) = get(&http, gw.url("/sec/pass/7")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["path"], "/v1/item/7");

    let (status, cache, v) = get(&http, gw.url("/sec/cached/8")).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"), "{v}");
    assert_eq!(v["path"], "/v1/item/8");
    let (status, cache, again) = get(&http, gw.url("/sec/cached/8")).await;
    assert_eq!((status, cache.as_str()), (200, "HIT"));
    assert_eq!(again, v);

    let (status, _, v) = get(&http, gw.url("/sec/both/9")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["pass"]["path"], "/v1/item/9", "{v}");
    assert_eq!(v["cached"]["path"], "/v1/item/9", "{v}");
    assert_eq!(up.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_or_misnamed_certificate_is_a_502_naming_tls_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let up = TlsUpstream::start(&ca.server(&["localhost"]), None, Duration::ZERO).await;
    let other_file = write(dir.path(), "other.pem", &other.pem());
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let mut config = routes_over(
        "other",
        &format!("https://localhost:{}", up.port),
        &format!("ca_file = {:?}", other_file.display().to_string()),
    );
    // The system roots do not know the private CA either.
    config += &routes_over("system", &format!("https://localhost:{}", up.port), "");
    // The right CA, but the certificate is for "localhost", not for the address.
    config += &routes_over(
        "byaddr",
        &format!("https://127.0.0.1:{}", up.port),
        &format!("ca_file = {:?}", ca_file.display().to_string()),
    );
    let gw = StoaProcess::start(&config).await;
    let http = client();
    for name in ["other", "system", "byaddr"] {
        for kind in ["pass", "cached", "both"] {
            let (status, _, v) = get(&http, gw.url(&format!("/{name}/{kind}/1"))).await;
            if kind == "both" {
                // An aggregate names the leg that failed; the leg's error is the TLS one.
                assert_eq!(status, 502, "{name}/{kind}: {v}");
                assert!(
                    v["message"].as_str().is_some_and(|m| m.contains("TLS")),
                    "{name}/{kind}: {v}"
                );
            } else {
                assert_tls_error(status, &v, &format!("{name}/{kind}"));
                // The reason is rustls' own, on either connector.
                assert!(
                    v["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("invalid peer certificate")),
                    "{name}/{kind}: {v}"
                );
            }
        }
    }
    assert_eq!(up.requests(), 0, "no request reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_over_https_cost_one_upstream_call() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.server(&["localhost"]), None, Duration::from_millis(300)).await;
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let config = routes_over(
        "sec",
        &format!("https://localhost:{}", up.port),
        &format!("ca_file = {:?}", ca_file.display().to_string()),
    );
    let gw = StoaProcess::start(&config).await;
    let http = client();
    let url = gw.url("/sec/cached/cold");
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let r = http.get(url).send().await.expect("request failed");
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        bodies.insert(body);
    }
    assert_eq!(bodies.len(), 1, "every client got the one answer");
    assert_eq!(up.requests(), 1);
    assert_eq!(up.handshakes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_requiring_a_client_certificate_gets_the_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.server(&["localhost"]), Some(&ca), Duration::ZERO).await;
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let client_leaf = ca.client("stoa");
    let cert = write(dir.path(), "client.pem", &client_leaf.cert);
    let key = write(dir.path(), "client.key", &client_leaf.key);
    let url = format!("https://localhost:{}", up.port);
    let trust = format!("ca_file = {:?}", ca_file.display().to_string());
    let mut config = routes_over("nocert", &url, &trust);
    config += &routes_over(
        "mtls",
        &url,
        &format!(
            "{trust}\nclient_cert = {:?}\nclient_key = {:?}",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let gw = StoaProcess::start(&config).await;
    let http = client();
    for kind in ["pass", "cached"] {
        let (status, _, v) = get(&http, gw.url(&format!("/nocert/{kind}/1"))).await;
        assert_tls_error(status, &v, &format!("without a client certificate, {kind}"));
    }
    assert_eq!(up.requests(), 0);
    for kind in ["pass", "cached", "both"] {
        let (status, _, v) = get(&http, gw.url(&format!("/mtls/{kind}/2"))).await;
        assert_eq!(status, 200, "with the client certificate, {kind}: {v}");
    }
    assert!(up.requests() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_connections_are_pooled_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let up = TlsUpstream::start(&ca.server(&["localhost"]), None, Duration::ZERO).await;
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let config = routes_over(
        "sec",
        &format!("https://localhost:{}", up.port),
        &format!("ca_file = {:?}", ca_file.display().to_string()),
    );
    let gw = StoaProcess::start(&config).await;
    let http = client();
    for i in 0..20 {
        let (status, _, v) = get(&http, gw.url(&format!("/sec/pass/{i}"))).await;
        assert_eq!(status, 200, "{v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pass_through = up.handshakes();
    assert!(
        (1..=2).contains(&pass_through),
        "20 sequential pass-through requests took {pass_through} TLS handshakes"
    );
    for i in 0..20 {
        let (status, cache, v) = get(&http, gw.url(&format!("/sec/cached/{i}"))).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"), "{v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fetches = up.handshakes() - pass_through;
    assert_eq!(
        fetches, 1,
        "20 sequential cached fetches took {fetches} TLS handshakes"
    );
    assert_eq!(up.requests(), 40);
    assert_eq!(up.accepted(), up.handshakes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_false_accepts_any_certificate_and_is_warned() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = Ca::new("unknown CA");
    let up = TlsUpstream::start(&unknown.server(&["elsewhere"]), None, Duration::ZERO).await;
    let config = routes_over(
        "lax",
        &format!("https://localhost:{}", up.port),
        "tls_verify = false",
    );
    let gw = StoaProcess::start(&config).await;
    let http = client();
    for kind in ["pass", "cached", "both"] {
        let (status, _, v) = get(&http, gw.url(&format!("/lax/{kind}/1"))).await;
        assert_eq!(status, 200, "{kind}: {v}");
    }
    let log = gw.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("upstreams.lax.tls_verify") && l.contains("WARN"))
            .count(),
        1,
        "{log}"
    );

    let path = write(dir.path(), "lax.toml", &common::config_with(&config).0);
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("warning: upstreams.lax.tls_verify: false"),
        "{out}"
    );
}

#[test]
fn stoa_check_names_each_bad_tls_file_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("test CA");
    let good = ca.client("stoa");
    let other = ca.client("other");
    let expired = ca.leaf(
        &["stoa"],
        ExtendedKeyUsagePurpose::ClientAuth,
        Some((2020, 1, 1)),
    );
    let missing = d.join("missing.pem");
    let not_pem = write(d, "not.pem", "just some text\n");
    let cert = write(d, "client.pem", &good.cert);
    let other_key = write(d, "other.key", &other.key);
    let key = write(d, "client.key", &good.key);
    let expired_cert = write(d, "expired.pem", &expired.cert);
    let expired_key = write(d, "expired.key", &expired.key);
    let s = |p: &Path| format!("{:?}", p.display().to_string());
    let upstream = |name: &str, keys: String| {
        format!("[upstreams.{name}]\nurl = \"https://localhost:1\"\n{keys}\n\n")
    };
    let rest = [
        upstream("a", format!("ca_file = {}", s(&missing))),
        upstream("b", format!("ca_file = {}", s(&not_pem))),
        upstream(
            "c",
            format!("client_cert = {}\nclient_key = {}", s(&cert), s(&other_key)),
        ),
        upstream(
            "d",
            format!(
                "client_cert = {}\nclient_key = {}",
                s(&expired_cert),
                s(&expired_key)
            ),
        ),
        upstream(
            "e",
            format!("client_cert = {}\nclient_key = {}", s(&cert), s(&not_pem)),
        ),
        upstream("f", format!("client_cert = {}", s(&cert))),
        format!(
            "[upstreams.g]\nurl = \"http://localhost:1\"\nclient_cert = {}\nclient_key = {}\n\n",
            s(&cert),
            s(&key)
        ),
        // A good one: no problem reported for it.
        upstream(
            "h",
            format!("client_cert = {}\nclient_key = {}", s(&cert), s(&key)),
        ),
    ]
    .concat();
    let path = write(d, "stoa.toml", &common::config_with(&rest).0);
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let expect = [
        format!("upstreams.a.ca_file: {}: cannot read", missing.display()),
        format!(
            "upstreams.b.ca_file: {}: no PEM certificate in it",
            not_pem.display()
        ),
        format!(
            "upstreams.c.client_key: {}: does not match the certificate in {}",
            other_key.display(),
            cert.display()
        ),
        format!(
            "upstreams.d.client_cert: {}: certificate",
            expired_cert.display()
        ),
        format!(
            "upstreams.e.client_key: {}: not a PEM private key file",
            not_pem.display()
        ),
        "upstreams.f.client_key: missing".to_string(),
        "upstreams.g.client_cert: applies to https upstreams only".to_string(),
        "upstreams.g.client_key: applies to https upstreams only".to_string(),
    ];
    for line in &expect {
        assert!(err.contains(line.as_str()), "missing {line:?} in:\n{err}");
    }
    assert!(err.contains("expired on"), "{err}");
    assert!(!err.contains("upstreams.h"), "{err}");
    assert!(
        err.contains(&format!("{} problem(s)", expect.len())),
        "{err}"
    );
}
