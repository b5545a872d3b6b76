//! End to end: pass-through requests the HTTP/1 front forwards itself
//! (`server.front_forward`), against the same requests through pingora's proxy
//! (`front_forward = false`). A scripted origin records every request head it receives and
//! on which of its connections; the clients are raw sockets.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{find, read_answer, read_until_closed, RawAnswer, StoaProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the origin received: the connection (numbered from 0 in accept order) and the
/// request head and body.
#[derive(Debug, Clone)]
struct Received {
    connection: usize,
    head: String,
    body: String,
}

/// An origin that answers by path (see [`answer_for`]) and records what it received.
struct Origin {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to a request for `path` with `method`; `None`: close the connection without
/// answering. `/close` answers without a length and closes; `/slow` answers after 2 s.
fn answer_for(method: &str, path: &str) -> Option<String> {
    let body = format!(r#"{{"path":"{path}"}}"#);
    let answer = match path {
        "/hangup" => return None,
        "/chunked" => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                       transfer-encoding: chunked\r\n\r\n\
                       5\r\n{\"a\":\r\n3\r\n1, \r\n7\r\n\"b\": 2}\r\n0\r\n\r\n"
            .to_string(),
        "/close" => format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{body}"
        ),
        "/empty" => "HTTP/1.1 204 No Content\r\nx-kind: empty\r\n\r\n".to_string(),
        // Says 100 bytes, sends 9, and closes (see `serve`).
        "/short" => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: 100\r\n\r\n{\"cut\":1}"
            .to_string(),
        // Says 7 bytes and sends more: what follows is not an answer to anything.
        "/overlong" => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                        content-length: 7\r\n\r\n{\"a\":1}HTTP/1.1 200 OK\r\n\r\n"
            .to_string(),
        "/not-modified" => "HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n".to_string(),
        "/hints" => format!(
            "HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
        "/teapot" => format!(
            "HTTP/1.1 418 I'm a teapot\r\ncontent-type: application/json\r\n\
             retry-after: 120\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
        _ => {
            // Hop-by-hop headers, one of them named by `Connection`, beside end-to-end ones.
            let shown = if method == "HEAD" { "" } else { body.as_str() };
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: x-drop\r\n\
                 x-drop: 1\r\nkeep-alive: timeout=5\r\nproxy-authenticate: Basic\r\n\
                 x-keep: 1\r\ncontent-length: {}\r\n\r\n{shown}",
                body.len()
            )
        }
    };
    Some(answer)
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = received.clone();
        let task = tokio::spawn(async move {
            let mut connection = 0;
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, connection, log.clone()));
                connection += 1;
            }
        });
        Origin {
            port,
            received,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// Reads one request from `sock` (bytes past it stay in `buf`): its head and its
/// `Content-Length` body; `None` when the peer is gone first.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String)> {
    let head_end = common::read_head(sock, buf).await?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    buf.drain(..head_end + length);
    Some((head, body))
}

/// Serves one connection: each request is recorded and answered.
async fn serve(mut sock: TcpStream, connection: usize, log: Arc<Mutex<Vec<Received>>>) {
    let mut buf = Vec::new();
    while let Some((head, body)) = read_request(&mut sock, &mut buf).await {
        let mut line = head.split(' ');
        let method = line.next().unwrap_or_default().to_string();
        let path = line.next().unwrap_or_default().to_string();
        log.lock().unwrap().push(Received {
            connection,
            head,
            body,
        });
        if path == "/slow" {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let Some(answer) = answer_for(&method, &path) else {
            return;
        };
        if path == "/split" {
            // The body in two writes, apart: the answer reaches stoa in pieces.
            let (first, rest) = answer.as_bytes().split_at(answer.len() - 5);
            let _ = sock.write_all(first).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if sock.write_all(rest).await.is_err() {
                return;
            }
            continue;
        }
        if sock.write_all(answer.as_bytes()).await.is_err() || path == "/close" || path == "/short"
        {
            return;
        }
    }
}

/// One pass-through route to `origin` (no rewrite, a 500 ms upstream timeout) and one to a
/// closed port.
fn routes(origin: &Origin) -> String {
    let closed = common::free_port();
    format!(
        "[upstreams.origin]\nurl = \"{}\"\ntimeout = \"500ms\"\n\n\
         [upstreams.nowhere]\nurl = \"http://127.0.0.1:{closed}\"\n\n\
         [[routes]]\nname = \"pass\"\npath = \"/{{*rest}}\"\nupstream = \"origin\"\n\n\
         [[routes]]\nname = \"gone\"\npath = \"/gone/{{*rest}}\"\nupstream = \"nowhere\"\n",
        origin.url()
    )
}

/// The requests every gateway gets, in order, each on its own line of the script: the
/// request as written, and whether it ends the connection's turn (read until closed).
fn script() -> Vec<(String, bool)> {
    let get =
        |path: &str, extra: &str| format!("GET {path} HTTP/1.1\r\nHost: stoa.test\r\n{extra}\r\n");
    vec![
        (get("/plain?q=1", ""), false),
        (
            get(
                "/plain",
                "Connection: keep-alive\r\nKeep-Alive: timeout=9\r\nTE: trailers\r\n\
                 Proxy-Authorization: Basic eA==\r\nX-Forwarded-For: 10.0.0.1\r\n\
                 X-Request-Id: from-the-client-0001\r\n",
            ),
            false,
        ),
        (
            "HEAD /plain HTTP/1.1\r\nHost: stoa.test\r\n\r\n".to_string(),
            false,
        ),
        (
            "POST /form HTTP/1.1\r\nHost: stoa.test\r\nContent-Type: text/plain\r\n\
             Content-Length: 11\r\n\r\nhello=world"
                .to_string(),
            false,
        ),
        (get("/chunked", ""), false),
        (get("/empty", ""), false),
        (get("/not-modified", "If-None-Match: \"v1\"\r\n"), false),
        (get("/hints", ""), false),
        (get("/teapot", ""), false),
        (get("/close", ""), false),
        (get("/plain", "Connection: close\r\n"), true),
        (get("/slow", ""), true),
        (get("/hangup", ""), true),
        (get("/gone/x", ""), true),
    ]
}

/// An answer with what changes from one run to the next left out: the date, the request
/// id stoa made, and the upstream's timing in `Cache-Status`-like detail. Its header lines
/// are ordered by name, the lines of one name kept in their order: the order of lines of
/// different names carries no meaning (RFC 9110 §5.3), that of one name's lines does.
fn comparable(answer: &RawAnswer) -> (u16, Vec<(String, String)>, String) {
    let mut headers: Vec<(String, String)> = answer
        .headers
        .iter()
        .filter(|(k, _)| k != "date" && k != "x-request-id")
        .cloned()
        .collect();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    (answer.status, headers, answer.body.clone())
}

/// A received head with its request id left out (stoa makes a new one per request) and
/// the origin's port in `Host` as `PORT`, the header lines sorted.
fn comparable_head(received: &Received, port: u16) -> (String, Vec<String>, String) {
    let host = format!("host: 127.0.0.1:{port}");
    let mut lines = received.head.trim_end().split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut headers: Vec<String> = lines
        .filter(|l| !l.to_ascii_lowercase().starts_with("x-request-id:"))
        .map(str::to_ascii_lowercase)
        .map(|h| {
            if h == host {
                "host: 127.0.0.1:PORT".into()
            } else {
                h
            }
        })
        .collect();
    headers.sort();
    (request_line, headers, received.body.clone())
}

/// Runs the script against the gateway on `port`; the answers in order (the final ones;
/// an informational answer is checked here and left out).
async fn run_script(port: u16) -> Vec<RawAnswer> {
    let mut answers = Vec::new();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = Vec::new();
    for (request, ends) in script() {
        sock.write_all(request.as_bytes()).await.unwrap();
        let answer = if ends {
            let (mut bytes, closed) = read_until_closed(&mut sock, Duration::from_secs(10)).await;
            assert!(closed, "{request:?}: the connection stayed open");
            bytes.splice(0..0, buf.drain(..));
            sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            RawAnswer::parse(&bytes)
        } else if request.starts_with("HEAD") {
            head_only(&mut sock, &mut buf).await
        } else if request.contains("/hints") {
            let early = read_answer(&mut sock, &mut buf).await.unwrap();
            assert_eq!(early.status, 103, "{early:?}");
            assert_eq!(
                early.header("link"),
                Some("</style.css>; rel=preload"),
                "{early:?}"
            );
            read_answer(&mut sock, &mut buf).await.unwrap()
        } else {
            framed(&mut sock, &mut buf).await
        };
        answers.push(answer);
    }
    answers
}

/// An answer to a HEAD: its head only, whatever its `Content-Length` says.
async fn head_only(sock: &mut TcpStream, buf: &mut Vec<u8>) -> RawAnswer {
    let end = common::read_head(sock, buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..end - 4]).into_owned();
    buf.drain(..end);
    RawAnswer::from_head(&head, String::new())
}

/// An answer framed by `Content-Length` or chunked (read to its last chunk, de-chunked).
async fn framed(sock: &mut TcpStream, buf: &mut Vec<u8>) -> RawAnswer {
    let end = common::read_head(sock, buf).await.unwrap();
    let chunked = String::from_utf8_lossy(&buf[..end])
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        return read_answer(sock, buf).await.unwrap();
    }
    loop {
        if let Some(end) = find(buf, b"\r\n0\r\n\r\n") {
            let bytes: Vec<u8> = buf.drain(..end + 7).collect();
            return RawAnswer::parse(&bytes);
        }
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await.unwrap();
        assert!(n > 0, "EOF inside a chunked answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Every request of the script gets the same answer, and sends the origin the same head
/// and body, whether the front forwards it or pingora's proxy does.
#[tokio::test]
async fn the_front_forwards_as_pingoras_proxy_does() {
    let origin_front = Origin::start().await;
    let origin_proxy = Origin::start().await;
    // One worker each: which idle upstream connections a request finds (and so whether a
    // failed one is retried) does not depend on which worker took the connection.
    let front = StoaProcess::start_with("threads = 1", &routes(&origin_front)).await;
    let proxy =
        StoaProcess::start_with("threads = 1\nfront_forward = false", &routes(&origin_proxy)).await;
    let by_front = run_script(front.port).await;
    let by_proxy = run_script(proxy.port).await;

    for (((request, _), a), b) in script().iter().zip(&by_front).zip(&by_proxy) {
        assert_eq!(comparable(a), comparable(b), "{request:?}");
    }
    let heads_front: Vec<_> = origin_front
        .received()
        .iter()
        .map(|r| comparable_head(r, origin_front.port))
        .collect();
    let heads_proxy: Vec<_> = origin_proxy
        .received()
        .iter()
        .map(|r| comparable_head(r, origin_proxy.port))
        .collect();
    assert_eq!(heads_front, heads_proxy);

    // What both did, spelled out for the first requests and the failures.
    let plain = &by_front[0];
    assert_eq!(plain.status, 200, "{plain:?}");
    assert_eq!(plain.header("x-keep"), Some("1"));
    for dropped in ["x-drop", "keep-alive", "proxy-authenticate"] {
        assert_eq!(plain.header(dropped), None, "{dropped}: {plain:?}");
    }
    let (request_line, headers, _) = &heads_front[1];
    assert_eq!(request_line, "GET /plain HTTP/1.1");
    assert!(
        headers.contains(&"host: 127.0.0.1:PORT".to_string()),
        "{headers:?}"
    );
    assert!(headers.contains(&"x-forwarded-for: 10.0.0.1, 127.0.0.1".to_string()));
    assert!(headers.contains(&"x-forwarded-proto: http".to_string()));
    for hop in ["connection", "keep-alive", "te:", "proxy-authorization"] {
        assert!(
            !headers.iter().any(|h| h.starts_with(hop)),
            "{hop}: {headers:?}"
        );
    }
    assert_eq!(heads_front[3].2, "hello=world");
    assert_eq!(by_front[4].body, r#"{"a":1, "b": 2}"#);
    assert_eq!(by_front[7].status, 200, "{:?}", by_front[7]);
    assert_eq!(by_front[8].header("retry-after"), Some("120"));
    by_front[11].assert_error(504, "upstream_timeout", "/slow");
    by_front[12].assert_error(502, "upstream_failed", "/hangup");
    by_front[13].assert_error(502, "upstream_unreachable", "/gone/x");
}

/// Requests the front forwards and requests it leaves to pingora's proxy (here: ones whose
/// `Connection` header names another header) take different upstream pools; with
/// `front_forward = false` one connection serves them all.
#[tokio::test]
async fn forwardable_requests_take_the_fronts_own_upstream_connections() {
    let origin = Origin::start().await;
    let front = StoaProcess::start(&routes(&origin)).await;
    let nominated = "GET /plain HTTP/1.1\r\nHost: stoa.test\r\nConnection: x-custom\r\n\
                     X-Custom: 1\r\n\r\n";
    let plain = "GET /plain HTTP/1.1\r\nHost: stoa.test\r\n\r\n";
    let mut sock = TcpStream::connect(("127.0.0.1", front.port)).await.unwrap();
    let mut buf = Vec::new();
    for request in [plain, plain, nominated, nominated, plain] {
        sock.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut sock, &mut buf).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let connections: Vec<usize> = origin.received().iter().map(|r| r.connection).collect();
    assert_eq!(connections[0], connections[1], "{connections:?}");
    assert_eq!(connections[2], connections[3], "{connections:?}");
    assert_ne!(connections[0], connections[2], "{connections:?}");
    assert_eq!(connections[4], connections[0], "{connections:?}");
    // Whichever lane: the nominated header never reaches the origin.
    for received in origin.received() {
        assert!(
            !received.head.to_ascii_lowercase().contains("x-custom"),
            "{received:?}"
        );
    }

    let origin = Origin::start().await;
    let proxy = StoaProcess::start_with("front_forward = false", &routes(&origin)).await;
    let mut sock = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    for request in [plain, nominated, plain] {
        sock.write_all(request.as_bytes()).await.unwrap();
        read_answer(&mut sock, &mut buf).await.unwrap();
    }
    let connections: Vec<usize> = origin.received().iter().map(|r| r.connection).collect();
    assert_eq!(connections, [0, 0, 0]);
}

/// An upstream that sends more than its answer's length: the client gets the answer as
/// long as it said, and the connection that carried the rest is not used again, so the
/// next request gets its own answer. Both lanes.
#[tokio::test]
async fn bytes_past_an_answers_length_are_never_taken_for_the_next_answer() {
    for server in ["threads = 1", "threads = 1\nfront_forward = false"] {
        let origin = Origin::start().await;
        let front = StoaProcess::start_with(server, &routes(&origin)).await;
        let mut sock = TcpStream::connect(("127.0.0.1", front.port)).await.unwrap();
        let mut buf = Vec::new();
        for (path, body) in [
            ("/overlong", r#"{"a":1}"#),
            ("/plain", r#"{"path":"/plain"}"#),
            ("/overlong", r#"{"a":1}"#),
        ] {
            let request = format!("GET {path} HTTP/1.1\r\nHost: stoa.test\r\n\r\n");
            sock.write_all(request.as_bytes()).await.unwrap();
            let answer = read_answer(&mut sock, &mut buf).await.unwrap();
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (200, body),
                "{server}: {answer:?}"
            );
        }
        let connections: Vec<usize> = origin.received().iter().map(|r| r.connection).collect();
        assert_ne!(connections[0], connections[1], "{server}: {connections:?}");
    }
}

/// When an [`answers_once`] origin closes a connection after answering its first request.
#[derive(Clone, Copy)]
enum ThenClose {
    /// As the next request arrives, without answering it: what a kept-alive connection
    /// looks like when the upstream timed it out just as it was reused.
    OnTheNextRequest,
    /// After a while, as an upstream with a short keep-alive timeout does.
    After(Duration),
}

/// An origin that answers the first request of each connection with `body`, then closes
/// the connection as `then` says. Its port, the request line of each request it answered,
/// its task.
async fn answers_once(
    body: &'static str,
    then: ThenClose,
) -> (u16, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(Mutex::new(Vec::new()));
    let log = served.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some((head, _)) = read_request(&mut sock, &mut buf).await else {
                    return;
                };
                let line = head.lines().next().unwrap_or_default().to_owned();
                log.lock().unwrap().push(line);
                let answer = common::text_answer(200, "", body);
                if sock.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                match then {
                    ThenClose::OnTheNextRequest => {
                        let _ = common::read_head(&mut sock, &mut buf).await;
                    }
                    ThenClose::After(pause) => tokio::time::sleep(pause).await,
                }
            });
        }
    });
    (port, served, task)
}

/// One pass-through route for every path to the upstream on `port`.
fn route_to(port: u16) -> String {
    format!(
        "[upstreams.origin]\nurl = \"http://127.0.0.1:{port}\"\n\n\
         [[routes]]\nname = \"all\"\npath = \"/{{*rest}}\"\nupstream = \"origin\"\n"
    )
}

/// An answer framed by its length is passed on whole when its body comes in pieces, and the
/// connection goes on; one the upstream cuts short closes the client's connection after
/// what came (or before anything), so the client sees it short, never as complete, and
/// stoa goes on answering.
/// Both lanes: the front's forwarder (which sends such answers past pingora's session) and
/// pingora's proxy.
#[tokio::test]
async fn an_answer_cut_short_by_the_upstream_closes_the_connection() {
    for server in ["threads = 1", "threads = 1\nfront_forward = false"] {
        let origin = Origin::start().await;
        let config = format!("[log]\naccess_log = true\n\n{}", routes(&origin));
        let front = StoaProcess::start_with(server, &config).await;
        let mut sock = TcpStream::connect(("127.0.0.1", front.port)).await.unwrap();
        let mut buf = Vec::new();
        for _ in 0..2 {
            sock.write_all(b"GET /split HTTP/1.1\r\nHost: stoa.test\r\n\r\n")
                .await
                .unwrap();
            let answer = read_answer(&mut sock, &mut buf).await.unwrap();
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (200, r#"{"path":"/split"}"#),
                "{server}"
            );
        }
        sock.write_all(b"GET /short HTTP/1.1\r\nHost: stoa.test\r\n\r\n")
            .await
            .unwrap();
        let (bytes, closed) = read_until_closed(&mut sock, Duration::from_secs(10)).await;
        assert!(
            closed,
            "{server}: the connection stays open after a short answer"
        );
        // The front sends what came; pingora's proxy, which holds a head with a length
        // back until its body is written, may send nothing at all.
        let text = String::from_utf8_lossy(&bytes);
        if server == "threads = 1" || !bytes.is_empty() {
            assert!(text.starts_with("HTTP/1.1 200"), "{server}: {text}");
            assert!(
                text.to_ascii_lowercase().contains("content-length: 100"),
                "{server}: {text}"
            );
            let (_, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(body.len() < 100, "{server}: {text}");
        }
        if server == "threads = 1" {
            // The front records the answer once sent: the 9 bytes that came, not the 100
            // its head announced.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let line = loop {
                let log = front.log();
                if let Some(line) = log.lines().find(|l| l.contains("path=\"/short\"")) {
                    break line.to_string();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no access line:\n{log}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            assert!(
                line.contains("status=200") && line.contains("bytes=9 "),
                "{line}"
            );
        }
        let mut again = TcpStream::connect(("127.0.0.1", front.port)).await.unwrap();
        again
            .write_all(b"GET /plain HTTP/1.1\r\nHost: stoa.test\r\n\r\n")
            .await
            .unwrap();
        let answer = read_answer(&mut again, &mut Vec::new()).await.unwrap();
        assert_eq!(answer.status, 200, "{server}");
    }
}

/// A kept-alive upstream connection the origin closes as a request arrives on it: a GET
/// is sent again on a new connection and answered, with the route's rewrite as the first
/// time; a POST is not sent twice (502), as pingora's proxy does. Both lanes: the front's
/// forwarder and pingora's proxy (`front_forward = false`).
#[tokio::test]
async fn an_idempotent_request_on_a_connection_the_upstream_closed_is_sent_again() {
    for server in ["threads = 1", "threads = 1\nfront_forward = false"] {
        let (port, served, task) = answers_once("once", ThenClose::OnTheNextRequest).await;
        let routes = format!(
            "[upstreams.origin]\nurl = \"http://127.0.0.1:{port}\"\n\n\
             [[routes]]\nname = \"api\"\npath = \"/r/{{id}}\"\nupstream = \"origin\"\n\
             rewrite = \"/api/{{id}}\"\n"
        );
        let front = StoaProcess::start_with(server, &routes).await;
        let mut sock = TcpStream::connect(("127.0.0.1", front.port)).await.unwrap();
        let mut buf = Vec::new();
        for _ in 0..3 {
            sock.write_all(b"GET /r/x HTTP/1.1\r\nHost: stoa.test\r\n\r\n")
                .await
                .unwrap();
            let answer = read_answer(&mut sock, &mut buf).await.unwrap();
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (200, "once"),
                "{server}: {answer:?}"
            );
        }
        // The second and third GETs were each sent twice: once on the connection that
        // closed, then on a new one, rewritten both times.
        assert_eq!(
            *served.lock().unwrap(),
            vec!["GET /api/x HTTP/1.1"; 3],
            "{server}"
        );
        // The third connection is idle in the pool: a POST on it is not sent again.
        let post = "POST /r/x HTTP/1.1\r\nHost: stoa.test\r\nContent-Length: 2\r\n\r\nhi";
        sock.write_all(post.as_bytes()).await.unwrap();
        let (bytes, _) = read_until_closed(&mut sock, Duration::from_secs(10)).await;
        RawAnswer::parse(&bytes).assert_error(502, "upstream_failed", "POST");
        assert_eq!(served.lock().unwrap().len(), 3, "{server}");
        task.abort();
    }
}

/// A pooled connection the upstream closed while it was idle is not used again: a POST
/// (never sent twice) after the close still reaches the upstream, on a new connection.
#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_taken() {
    let pause = ThenClose::After(Duration::from_millis(20));
    let (port, served, task) = answers_once("fresh", pause).await;
    let front = StoaProcess::start(&route_to(port)).await;
    let mut sock = TcpStream::connect(("127.0.0.1", front.port)).await.unwrap();
    let mut buf = Vec::new();
    for request in [
        "GET /x HTTP/1.1\r\nHost: stoa.test\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: stoa.test\r\nContent-Length: 2\r\n\r\nhi",
        "POST /x HTTP/1.1\r\nHost: stoa.test\r\nContent-Length: 2\r\n\r\nhi",
    ] {
        sock.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut sock, &mut buf).await.unwrap();
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, "fresh"),
            "{answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(served.lock().unwrap().len(), 3);
    task.abort();
}

/// An HTTP/2 request on the cleartext listener (h2c): status, headers, body. With a body,
/// it is sent in a DATA frame after the head.
async fn h2_request(
    send: &h2::client::SendRequest<bytes::Bytes>,
    method: &str,
    path: &str,
    body: Option<&'static str>,
) -> (u16, Vec<(String, String)>, String) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://stoa.test{path}"));
    if path.contains("cookies") {
        // As browsers send them over HTTP/2: a field per cookie (RFC 9113 §8.2.3).
        req = req.header("cookie", "a=1").header("cookie", "b=2");
    }
    let body = body.map(|b| bytes::Bytes::from_static(b.as_bytes()));
    let (status, got, data) = common::h2::request(send, req.body(()).unwrap(), body).await;
    let mut headers: Vec<(String, String)> = got
        .iter()
        .filter(|(k, _)| *k != "date" && *k != "x-request-id")
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    headers.sort();
    (status, headers, String::from_utf8_lossy(&data).into_owned())
}

/// HTTP/2 streams without a body are forwarded by the front's forwarder (lane `forward`),
/// answered through pingora's HTTP/2 session, with the same answers, and the same heads
/// at the origin, as pingora's proxy gives them (`front_forward = false`), a HEAD included;
/// a stream with a body stays with pingora's proxy (lane `proxy:h2`).
#[tokio::test]
async fn http2_streams_without_a_body_are_forwarded_as_pingoras_proxy_does() {
    let paths = [
        "/plain?q=1",
        "/chunked",
        "/empty",
        "/not-modified",
        "/hints",
        "/teapot",
        "/close",
        "/overlong",
        "/split",
        "/plain",
        "/plain?cookies",
        "/gone/x",
        "/slow",
    ];
    let mut answers = Vec::new();
    let mut heads = Vec::new();
    for server in [
        "threads = 1\nh2c = true",
        "threads = 1\nh2c = true\nfront_forward = false",
    ] {
        let origin = Origin::start().await;
        let config = format!("[log]\naccess_log = true\n\n{}", routes(&origin));
        let gw = StoaProcess::start_with(server, &config).await;
        let send = common::h2::h2c(gw.port).await;
        let mut got = Vec::new();
        for path in paths {
            got.push(h2_request(&send, "GET", path, None).await);
        }
        got.push(h2_request(&send, "HEAD", "/plain", None).await);
        got.push(h2_request(&send, "POST", "/form", Some("hello=world")).await);
        answers.push(got);
        heads.push(
            origin
                .received()
                .iter()
                .map(|r| comparable_head(r, origin.port))
                .collect::<Vec<_>>(),
        );
        // The lanes, from the access log.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let lanes = loop {
            let log = gw.log();
            let lanes: Vec<String> = log
                .lines()
                .filter_map(|l| l.split_once(" lane=\"")?.1.split_once('"'))
                .map(|(lane, _)| lane.to_string())
                .collect();
            if lanes.len() > paths.len() + 1 || std::time::Instant::now() > deadline {
                break lanes;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let forwarded = lanes.iter().filter(|l| *l == "forward").count();
        let proxied = lanes.iter().filter(|l| *l == "proxy:h2").count();
        if server.contains("front_forward = false") {
            assert_eq!((forwarded, proxied), (0, paths.len() + 2), "{lanes:?}");
        } else {
            assert_eq!((forwarded, proxied), (paths.len() + 1, 1), "{lanes:?}");
        }
    }
    for (i, (forwarded, proxied)) in answers[0].iter().zip(&answers[1]).enumerate() {
        let what = paths.get(i).copied().unwrap_or("HEAD /plain, POST /form");
        assert_eq!(forwarded, proxied, "{what}");
    }
    assert_eq!(heads[0], heads[1]);
    // Cookie fields reach the HTTP/1.1 upstream as one line.
    let cookies = heads[0]
        .iter()
        .find(|(line, ..)| line.contains("cookies"))
        .map(|(_, headers, _)| headers.iter().filter(|h| h.starts_with("cookie:")).cloned())
        .unwrap()
        .collect::<Vec<_>>();
    assert_eq!(cookies, ["cookie: a=1; b=2"]);
}
