//! The lean path end to end: the real stoa-floor binary with `--path lean` between a raw-socket
//! client and a small HTTP/1.1 origin written here on tokio, each on an ephemeral port.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const MIB: usize = 1024 * 1024;
const BIG: usize = 5 * MIB;
/// Longest a test waits for the other side to show that a body streams.
const STREAM_WAIT: Duration = Duration::from_secs(5);

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// stoa-floor, killed when dropped.
struct Floor {
    child: Child,
    addr: SocketAddr,
}

impl Floor {
    async fn start(peer: SocketAddr, extra: &[&str]) -> Floor {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("address");
        let child = Command::new(env!("CARGO_BIN_EXE_stoa-floor"))
            .args(["--listen", &addr.to_string(), "--peer", &peer.to_string()])
            .args(["--path", "lean", "--threads", "1"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start stoa-floor");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "stoa-floor did not listen on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Floor { child, addr }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The origin: counts connections; its answers depend on the path.
///   GET /small            200, Content-Length, "hello <n>" (n counts requests)
///   POST /upload          reads the body (Content-Length or chunked), checks the pattern,
///                         then answers 5 MiB with Content-Length: 1 MiB, a wait for
///                         `release`, the rest
///   GET /chunked          200 chunked: "first ", a wait for `release`, "second", the last chunk
///   GET /silent           reads the request and never answers
///   GET /bye              200 "bye", then closes the connection (no Connection header: a
///                         kept-alive connection the origin drops while it idles)
#[derive(Default)]
struct Origin {
    connections: AtomicUsize,
    requests: AtomicUsize,
    /// Body bytes of the current upload received so far.
    received: AtomicUsize,
    upload_ok: AtomicBool,
    /// Set by the client once it has seen the first part of a streamed answer.
    release: Notify,
    /// The origin waited for `release` in vain: the answer did not stream.
    not_streamed: AtomicBool,
}

async fn origin() -> (Arc<Origin>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the origin");
    let addr = listener.local_addr().expect("origin address");
    let state = Arc::new(Origin::default());
    let s = state.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            s.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s.clone(), conn));
        }
    });
    (state, addr)
}

/// Request or response head: the first line and lower-cased header names.
struct Head {
    line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
    fn content_length(&self) -> Option<usize> {
        self.get("content-length")
            .map(|v| v.parse().expect("a Content-Length"))
    }
}

async fn read_head(r: &mut BufReader<OwnedReadHalf>) -> Option<Head> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut head = Head {
        line: line.trim_end().to_string(),
        headers: Vec::new(),
    };
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            return Some(head);
        }
        let (n, v) = h.split_once(':').expect("a header line");
        head.headers
            .push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
}

/// Reads a body framed as `head` says, handing each piece to `each`.
async fn read_body(r: &mut BufReader<OwnedReadHalf>, head: &Head, mut each: impl FnMut(&[u8])) {
    let mut buf = vec![0u8; 64 * 1024];
    if head.chunked() {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.expect("a chunk size");
            let size = usize::from_str_radix(size.trim_end(), 16).expect("a hex chunk size");
            let mut left = size;
            while left > 0 {
                let n = left.min(buf.len());
                r.read_exact(&mut buf[..n]).await.expect("chunk data");
                each(&buf[..n]);
                left -= n;
            }
            let mut crlf = String::new();
            r.read_line(&mut crlf).await.expect("the chunk's CRLF");
            if size == 0 {
                return;
            }
        }
    }
    let mut left = head.content_length().unwrap_or(0);
    while left > 0 {
        let want = left.min(buf.len());
        let n = r.read(&mut buf[..want]).await.expect("body");
        assert!(n > 0, "the body ended {left} bytes early");
        each(&buf[..n]);
        left -= n;
    }
}

async fn serve(s: Arc<Origin>, conn: TcpStream) {
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    while let Some(head) = read_head(&mut r).await {
        let n = s.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let path = head.line.split(' ').nth(1).unwrap_or("").to_string();
        let mut pos = 0;
        let mut ok = true;
        s.received.store(0, Ordering::SeqCst);
        read_body(&mut r, &head, |piece| {
            for &b in piece {
                ok &= b == pattern(pos);
                pos += 1;
            }
            s.received.store(pos, Ordering::SeqCst);
        })
        .await;
        match path.as_str() {
            "/small" => {
                let body = format!("hello {n}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                    body.len()
                );
                w.write_all(answer.as_bytes()).await.expect("answer");
            }
            "/upload" => {
                s.upload_ok.store(ok && pos == BIG, Ordering::SeqCst);
                let body: Vec<u8> = (0..BIG).map(pattern).collect();
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
                w.write_all(head.as_bytes()).await.expect("head");
                w.write_all(&body[..MIB]).await.expect("first MiB");
                s.wait_release().await;
                w.write_all(&body[MIB..]).await.expect("the rest");
            }
            "/chunked" => {
                w.write_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst \r\n",
                )
                .await
                .expect("first chunk");
                s.wait_release().await;
                w.write_all(b"6\r\nsecond\r\n0\r\n\r\n")
                    .await
                    .expect("last chunks");
            }
            "/bye" => {
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
                    .await
                    .expect("answer");
                return;
            }
            "/silent" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            other => panic!("the origin has no {other}"),
        }
    }
}

impl Origin {
    async fn wait_release(&self) {
        if tokio::time::timeout(STREAM_WAIT, self.release.notified())
            .await
            .is_err()
        {
            self.not_streamed.store(true, Ordering::SeqCst);
        }
    }
}

struct Client {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let (r, w) = TcpStream::connect(addr)
            .await
            .expect("connect to stoa-floor")
            .into_split();
        Client {
            r: BufReader::new(r),
            w,
        }
    }

    async fn get(&mut self, path: &str) -> (Head, Vec<u8>) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: origin\r\n\r\n");
        self.w.write_all(req.as_bytes()).await.expect("request");
        self.answer().await
    }

    async fn answer(&mut self) -> (Head, Vec<u8>) {
        let head = read_head(&mut self.r).await.expect("an answer");
        let mut body = Vec::new();
        read_body(&mut self.r, &head, |p| body.extend_from_slice(p)).await;
        (head, body)
    }
}

fn status(head: &Head) -> u16 {
    head.line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_both_sides_alive() {
    let (origin, peer) = origin().await;
    let floor = Floor::start(peer, &[]).await;
    let mut client = Client::connect(floor.addr).await;
    for i in 1..=20 {
        let (head, body) = client.get("/small").await;
        assert_eq!(status(&head), 200, "request {i}");
        assert_eq!(body, format!("hello {i}").as_bytes(), "request {i}");
        assert_eq!(head.get("connection"), Some("keep-alive"), "request {i}");
    }
    assert_eq!(origin.requests.load(Ordering::SeqCst), 20);
    assert_eq!(
        origin.connections.load(Ordering::SeqCst),
        1,
        "20 sequential requests over one upstream connection"
    );
}

/// `--path raw` (no HTTP session at all) keeps both sides alive as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_path_keeps_both_sides_alive() {
    let (origin, peer) = origin().await;
    let floor = Floor::start(peer, &["--path", "raw"]).await;
    let mut client = Client::connect(floor.addr).await;
    for i in 1..=20 {
        let (head, body) = client.get("/small").await;
        assert_eq!(status(&head), 200, "request {i}");
        assert_eq!(body, format!("hello {i}").as_bytes(), "request {i}");
    }
    assert_eq!(origin.requests.load(Ordering::SeqCst), 20);
    assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_both_sides_alive_with_pingoras_pool() {
    let (origin, peer) = origin().await;
    let floor = Floor::start(peer, &["--pool", "pingora"]).await;
    let mut client = Client::connect(floor.addr).await;
    for i in 1..=20 {
        let (head, body) = client.get("/small").await;
        assert_eq!(status(&head), 200, "request {i}");
        assert_eq!(body, format!("hello {i}").as_bytes(), "request {i}");
    }
    assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
}

/// 5 MiB up (chunked) and 5 MiB down (Content-Length), each seen by the other end while the
/// sender still holds most of it back: neither direction is buffered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_five_mib_both_ways() {
    let (origin, peer) = origin().await;
    let floor = Floor::start(peer, &[]).await;
    let mut client = Client::connect(floor.addr).await;
    let body: Vec<u8> = (0..BIG).map(pattern).collect();
    client
        .w
        .write_all(b"POST /upload HTTP/1.1\r\nHost: origin\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .expect("head");
    let chunk = |data: &[u8]| {
        let mut c = format!("{:x}\r\n", data.len()).into_bytes();
        c.extend_from_slice(data);
        c.extend_from_slice(b"\r\n");
        c
    };
    client
        .w
        .write_all(&chunk(&body[..MIB]))
        .await
        .expect("first MiB");
    let deadline = Instant::now() + STREAM_WAIT;
    while origin.received.load(Ordering::SeqCst) < MIB {
        assert!(
            Instant::now() < deadline,
            "the origin got {} bytes of the first MiB: the request body is not streamed",
            origin.received.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for piece in body[MIB..].chunks(256 * 1024) {
        client.w.write_all(&chunk(piece)).await.expect("body");
    }
    client.w.write_all(b"0\r\n\r\n").await.expect("last chunk");

    let head = read_head(&mut client.r).await.expect("an answer");
    assert_eq!(status(&head), 200);
    let mut got = 0usize;
    let mut ok = true;
    let mut released = false;
    read_body(&mut client.r, &head, |p| {
        for &b in p {
            ok &= b == pattern(got);
            got += 1;
        }
        if !released && got >= MIB / 2 {
            origin.release.notify_one();
            released = true;
        }
    })
    .await;
    assert!(
        origin.upload_ok.load(Ordering::SeqCst),
        "the origin got the 5 MiB intact"
    );
    assert_eq!(got, BIG);
    assert!(ok, "the answer came back intact");
    assert!(
        !origin.not_streamed.load(Ordering::SeqCst),
        "the answer's first MiB did not reach the client before the rest was sent"
    );
    // The connection goes on.
    let (head, _) = client.get("/small").await;
    assert_eq!(status(&head), 200);
    assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_chunked_answer() {
    let (origin, peer) = origin().await;
    let floor = Floor::start(peer, &[]).await;
    let mut client = Client::connect(floor.addr).await;
    client
        .w
        .write_all(b"GET /chunked HTTP/1.1\r\nHost: origin\r\n\r\n")
        .await
        .expect("request");
    let head = read_head(&mut client.r).await.expect("an answer");
    assert_eq!(status(&head), 200);
    assert!(
        head.chunked(),
        "the answer stays chunked: {:?}",
        head.headers
    );
    let mut body = Vec::new();
    read_body(&mut client.r, &head, |p| {
        if body.is_empty() {
            origin.release.notify_one(); // the first chunk is here; let the origin go on
        }
        body.extend_from_slice(p);
    })
    .await;
    assert_eq!(body, b"first second");
    assert!(
        !origin.not_streamed.load(Ordering::SeqCst),
        "the first chunk did not reach the client before the last was sent"
    );
    let (head, body) = client.get("/small").await;
    assert_eq!(
        status(&head),
        200,
        "the connection goes on after a chunked answer"
    );
    assert_eq!(body, b"hello 2");
    assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
}

/// Upstream connections the origin closed while they sat in the pool are not used for the
/// next request (or, if one is, the request is sent again on a new connection): no 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skips_upstream_connections_the_origin_closed() {
    for pool in ["own", "pingora"] {
        let (origin, peer) = origin().await;
        let floor = Floor::start(peer, &["--pool", pool]).await;
        let mut client = Client::connect(floor.addr).await;
        for i in 1..=5 {
            let (head, body) = client.get("/bye").await;
            assert_eq!(status(&head), 200, "pool {pool}, request {i}");
            assert_eq!(body, b"bye", "pool {pool}, request {i}");
        }
        assert_eq!(origin.connections.load(Ordering::SeqCst), 5, "pool {pool}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_502_when_nothing_listens() {
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let floor = Floor::start(closed, &[]).await;
    let mut client = Client::connect(floor.addr).await;
    let (head, body) = client.get("/small").await;
    assert_eq!(status(&head), 502);
    assert_eq!(head.get("content-type"), Some("application/json"));
    let body = String::from_utf8(body).expect("UTF-8");
    assert!(
        body.starts_with(r#"{"error":"upstream_unreachable","message":""#) && body.ends_with("\"}"),
        "{body}"
    );
    // The downstream connection stays usable.
    let (head, _) = client.get("/small").await;
    assert_eq!(status(&head), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_504_when_the_upstream_is_silent() {
    let (_origin, peer) = origin().await;
    let floor = Floor::start(peer, &["--timeout", "0.3"]).await;
    let mut client = Client::connect(floor.addr).await;
    let started = Instant::now();
    let (head, body) = client.get("/silent").await;
    assert_eq!(status(&head), 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    let body = String::from_utf8(body).expect("UTF-8");
    assert!(
        body.starts_with(r#"{"error":"upstream_timeout","#),
        "{body}"
    );
}
