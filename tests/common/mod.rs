//! Test harness: starts the real `stoa` binary on ephemeral ports with a generated
//! configuration, in front of real upstream servers.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use stoa_demo::{Api, DemoServer, Knobs};

pub mod cluster;
pub mod h2;
pub mod redis;

pub const STOA: &str = env!("CARGO_BIN_EXE_stoa");

/// A port nobody listens on right now (bound, then released), never one this test
/// binary handed out before: the kernel may offer a just-released port again, and two
/// listeners of one configuration must not be given the same port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Starts a demo upstream on an ephemeral port with its default knobs.
pub async fn demo(api: Api) -> DemoServer {
    demo_with(api, Knobs::default_for(api)).await
}

pub async fn demo_with(api: Api, knobs: Knobs) -> DemoServer {
    DemoServer::start(api, "127.0.0.1:0".parse().unwrap(), knobs)
        .await
        .expect("demo upstream failed to start")
}

/// The `[server]` and `[admin]` sections for fresh ports, followed by `rest`.
pub fn config_with(rest: &str) -> (String, u16, u16) {
    config_with_server("", rest)
}

/// Like [`config_with`], with more `[server]` keys (one `key = value` per line).
pub fn config_with_server(server_extra: &str, rest: &str) -> (String, u16, u16) {
    let (port, admin) = (free_port(), free_port());
    // Two workers unless the test sets its own.
    let threads = if server_extra.contains("threads") {
        ""
    } else {
        "threads = 2\n"
    };
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n{threads}shutdown_timeout = \"10s\"\n{server_extra}\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n{rest}"
    );
    (text, port, admin)
}

/// A running gateway process, killed when dropped.
pub struct StoaProcess {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    server_extra: String,
}

impl StoaProcess {
    /// Writes `rest` (upstreams and routes) into a config with fresh ports and starts stoa.
    pub async fn start(rest: &str) -> StoaProcess {
        Self::start_with("", rest).await
    }

    /// Like [`StoaProcess::start`], with more `[server]` keys (e.g. `trusted_proxies = [...]`).
    /// `rest` may hold any other section (`[log]`, `[rate_limits.x]`, upstreams, routes).
    /// A port taken by someone else between choosing and binding it (another test's
    /// client connection, say) is retried on fresh ports.
    pub async fn start_with(server_extra: &str, rest: &str) -> StoaProcess {
        for _ in 0..4 {
            let mut gw = Self::spawn(server_extra, rest);
            match gw.ready_or_exit().await {
                Ok(()) => return gw,
                Err(log) if log.contains("in use") => continue,
                Err(log) => panic!("stoa exited early:\n{log}"),
            }
        }
        panic!("stoa found no free ports in four tries");
    }

    /// Starts stoa without waiting for it to be ready.
    pub fn spawn(server_extra: &str, rest: &str) -> StoaProcess {
        let (text, port, admin_port) = config_with_server(server_extra, rest);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stoa.toml");
        std::fs::write(&path, text).unwrap();
        let log = std::fs::File::create(dir.path().join("stoa.log")).unwrap();
        let child = Command::new(STOA)
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start stoa");
        StoaProcess {
            child,
            port,
            admin_port,
            dir,
            server_extra: server_extra.to_string(),
        }
    }

    /// Rewrites the configuration file with the same listeners and new `rest` (for reloads).
    pub fn rewrite_config(&self, rest: &str) {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nthreads = 2\nshutdown_timeout = \"10s\"\n{}\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n\n{rest}",
            self.port, self.server_extra, self.admin_port
        );
        std::fs::write(self.dir.path().join("stoa.toml"), text).unwrap();
    }

    pub async fn wait_ready(&mut self) {
        if let Err(log) = self.ready_or_exit().await {
            panic!("stoa exited early:\n{log}");
        }
    }

    /// Waits until stoa is ready; its log if it exits first.
    async fn ready_or_exit(&mut self) -> Result<(), String> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("({status})\n{}", self.log()));
            }
            if let Ok(r) = client.get(self.admin_url("/readyz")).send().await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("stoa never became ready:\n{}", self.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// A JSON view of the admin API (`GET path` with the admin token).
    pub async fn admin_json(&self, path: &str, token: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(self.admin_url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `POST /admin/purge` with `body`, which must answer 200: its report.
    pub async fn purge(&self, token: &str, body: serde_json::Value) -> serde_json::Value {
        let r = reqwest::Client::new()
            .post(self.admin_url("/admin/purge"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{body}");
        r.json().await.unwrap()
    }

    /// The metrics exposition from the admin listener.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .expect("metrics request failed")
            .text()
            .await
            .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stoa.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for StoaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `stoa` with arguments and returns (exit code, stdout, stderr).
pub fn stoa(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(STOA);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot run stoa");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn write_temp(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

/// A minimal upstream that answers every request with a JSON description of what it
/// received (method, target, headers, body). Used to check what stoa sends upstream.
pub struct EchoUpstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl EchoUpstream {
    pub async fn start() -> EchoUpstream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // Read one request: head, then a Content-Length body.
                        let Some(head_end) = read_head(&mut sock, &mut buf).await else {
                            return;
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                        let mut lines = head.split("\r\n");
                        let request_line = lines.next().unwrap_or_default().to_string();
                        let mut headers = serde_json::Map::new();
                        let mut length = 0usize;
                        let mut chunked = false;
                        for line in lines.filter(|l| !l.is_empty()) {
                            if let Some((k, v)) = line.split_once(':') {
                                let k = k.trim().to_ascii_lowercase();
                                if k == "content-length" {
                                    length = v.trim().parse().unwrap_or(0);
                                }
                                if k == "transfer-encoding" && v.trim() == "chunked" {
                                    chunked = true;
                                }
                                headers.insert(k, serde_json::Value::String(v.trim().to_string()));
                            }
                        }
                        // A chunked body is read to its last chunk before answering.
                        let body_end = loop {
                            let end = if chunked {
                                find(&buf[head_end..], b"0\r\n\r\n").map(|p| head_end + p + 5)
                            } else {
                                (buf.len() >= head_end + length).then_some(head_end + length)
                            };
                            if let Some(end) = end {
                                break end;
                            }
                            let mut chunk = [0u8; 4096];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let body = String::from_utf8_lossy(&buf[head_end..body_end]).into_owned();
                        buf.drain(..body_end);
                        let mut parts = request_line.split(' ');
                        let reply = serde_json::json!({
                            "method": parts.next(),
                            "target": parts.next(),
                            "headers": headers,
                            "body": body,
                        })
                        .to_string();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                            reply.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        EchoUpstream { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads from `sock` into `buf` until `buf` starts with a whole head (up to its blank
/// line); that head's length, or `None` when the peer is gone first.
pub async fn read_head(sock: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            return Some(pos + 4);
        }
        let mut chunk = [0u8; 4096];
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Serves every connection `listener` accepts: each request head read (bodies are not
/// read) gets the answer `answer` makes of it, written whole. The accept loop's task.
pub fn serve_heads<F, Fut>(
    listener: tokio::net::TcpListener,
    answer: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    use tokio::io::AsyncWriteExt;
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(end) = read_head(&mut sock, &mut buf).await {
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let resp = answer(head).await;
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

/// A `text/plain` answer: status `status`, the header lines `extra` (each ending in CRLF),
/// `Content-Length`, then `body`.
pub fn text_answer(status: u16, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The path of a request head's request line ("" when it has none).
pub fn path_of(head: &str) -> String {
    head.split(' ').nth(1).unwrap_or_default().to_string()
}

/// The value of one sample in a Prometheus exposition: `name{labels}` exactly as written
/// (labels in alphabetical order, as they are written: `stoa_requests_total{cache="hit",lane="answer",route="r",status="200"}`).
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// The default knobs of `api` with an added latency.
pub fn knobs(api: Api, latency_ms: u64) -> Knobs {
    Knobs {
        latency_ms,
        ..Knobs::default_for(api)
    }
}

/// How many requests a demo upstream got for `key` (`"GET /api/restaurant/dufva"`).
pub fn calls(up: &DemoServer, key: &str) -> u64 {
    up.stats().paths.get(key).copied().unwrap_or(0)
}

/// The `X-Cache` header of an answer ("" when absent).
pub fn x_cache(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

// ---- Raw sockets: what an HTTP client would normalise (header case, repeated headers,
// GET bodies, hostile targets, framing) is sent as written. ----

/// An answer read off a raw socket.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    /// Lower-case names, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawAnswer {
    /// An answer from its head (status line and header lines, without the blank line) and
    /// its body; the status is 0 when the status line has none.
    pub fn from_head(head: &str, body: String) -> RawAnswer {
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        RawAnswer {
            status,
            headers,
            body,
        }
    }

    /// A whole answer, as read until the connection closed; a chunked body is de-chunked.
    /// Panics when the head is incomplete or has no status.
    pub fn parse(bytes: &[u8]) -> RawAnswer {
        let text = String::from_utf8_lossy(bytes);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete answer: {text:?}"));
        let mut answer = RawAnswer::from_head(head, String::new());
        assert_ne!(answer.status, 0, "no status line: {head:?}");
        let chunked = answer
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        answer.body = if chunked {
            dechunk(body)
        } else {
            body.to_string()
        };
        answer
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `X-Cache` header ("" when absent).
    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }

    /// Whether the server closes the connection after this answer.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts a JSON error of stoa's own: status, content type and kind.
    pub fn assert_error(&self, status: u16, kind: &str, target: &str) {
        assert_eq!(self.status, status, "{target}: {self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{target}"
        );
        let v = self.json();
        assert_eq!(v["error"], kind, "{target}: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{target}: {v}"
        );
    }
}

/// The body of a chunked message, without its framing.
pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Reads one `Content-Length`-framed answer; bytes past it stay in `buf`. An EOF before the
/// answer is complete is an `UnexpectedEof` error.
pub async fn read_answer(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<RawAnswer> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("EOF after {} bytes of a head", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end - 4]).into_owned();
    let mut answer = RawAnswer::from_head(&head, String::new());
    let length: usize = answer
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "EOF inside a body",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    answer.body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    buf.drain(..head_end + length);
    Ok(answer)
}

/// Reads until the server closes the connection (EOF or reset) or `within` passes: what it
/// sent, and whether it closed.
pub async fn read_until_closed(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on a fresh connection, then [`read_until_closed`].
pub async fn raw_exchange(port: u16, request: &[u8], within: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncWriteExt;
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    sock.write_all(request).await.unwrap();
    read_until_closed(&mut sock, within).await
}

/// Sends a whole request as written and reads the answer until the connection closes.
pub async fn raw_send(port: u16, request: &str) -> RawAnswer {
    let (bytes, closed) = raw_exchange(port, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(closed, "no answer within 10 s");
    RawAnswer::parse(&bytes)
}

/// Sends `head_lines` (request line and headers, without the final blank line, each line
/// ending in CRLF), `Host` and `Connection: close`, and `body` with its `Content-Length`.
pub async fn raw_request(port: u16, head_lines: &str, body: &str) -> RawAnswer {
    let content_length = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    raw_send(
        port,
        &format!("{head_lines}Host: stoa\r\nConnection: close\r\n{content_length}\r\n{body}"),
    )
    .await
}
