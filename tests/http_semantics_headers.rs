//! Issue 13, items 4 and 5: answers without a body carry no `Content-Length` from a cached
//! route, headers an upstream answer names in `Connection` are neither stored nor passed
//! on, and extension methods are routed by a route that lists them. A small origin sets
//! each header in turn; raw sockets show what a client would otherwise hide.

mod common;

use std::net::SocketAddr;

use common::{config_with, raw_request, read_head, stoa, write_temp, RawAnswer, StoaProcess};

/// An origin answering one request per connection, by the last path segment:
/// `no-content` (204 with `Content-Length: 0`), `not-modified` (304 with
/// `Content-Length: 0`), `connection` (200 naming `X-Secret` in `Connection`), anything
/// else 200 with the request's method as the body.
struct Origin {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    async fn start() -> Origin {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let Some(end) = read_head(&mut sock, &mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let mut parts = head.split(' ');
                    let method = parts.next().unwrap_or_default().to_string();
                    let target = parts.next().unwrap_or_default().to_string();
                    let answer = match target.rsplit('/').next().unwrap_or_default() {
                        "no-content" => "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\
                                         X-Origin: 1\r\nConnection: close\r\n\r\n"
                            .to_string(),
                        "not-modified" => "HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\
                                           ETag: \"v1\"\r\nConnection: close\r\n\r\n"
                            .to_string(),
                        "connection" => "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                                         Content-Length: 2\r\nConnection: x-secret, close\r\n\
                                         X-Secret: 1\r\nKeep-Alive: timeout=5\r\n\
                                         X-Kept: yes\r\n\r\nok"
                            .to_string(),
                        _ => format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{method}",
                            method.len()
                        ),
                    };
                    let _ = sock.write_all(answer.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Origin { addr, task }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The origin as `[upstreams.origin]`, a cached route on `/c/{name}` and a pass-through
/// route on `/p/{name}`, then `extra`.
fn config(origin: &Origin, extra: &str) -> String {
    format!(
        "[upstreams.origin]\nurl = \"http://{}\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\"]\npath = \"/c/{{name}}\"\n\
         upstream = \"origin\"\ncache = {{ ttl = \"60s\", statuses = {{ 204 = \"60s\", 304 = \"60s\" }} }}\n\n\
         [[routes]]\nname = \"pass\"\nmethods = [\"GET\"]\npath = \"/p/{{name}}\"\nupstream = \"origin\"\n\n\
         {extra}",
        origin.addr
    )
}

async fn send(gw: &StoaProcess, method: &str, path: &str) -> RawAnswer {
    raw_request(gw.port, &format!("{method} {path} HTTP/1.1\r\n"), "").await
}

// ---- item 4: no Content-Length on 204 and 304, Connection-named headers dropped ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_without_a_body_of_a_cached_route_carry_no_content_length() {
    let origin = Origin::start().await;
    let gw = StoaProcess::start(&config(&origin, "")).await;
    for (path, status) in [("/c/no-content", 204), ("/c/not-modified", 304)] {
        for round in ["MISS", "HIT"] {
            let answer = send(&gw, "GET", path).await;
            assert_eq!(answer.status, status, "{path} {round}: {answer:?}");
            assert_eq!(answer.x_cache(), round, "{path}: {answer:?}");
            assert_eq!(
                answer.header("content-length"),
                None,
                "{path} {round}: {answer:?}"
            );
            assert_eq!(
                answer.header("transfer-encoding"),
                None,
                "{path}: {answer:?}"
            );
            assert_eq!(answer.body, "", "{path} {round}");
        }
    }
    let hit = send(&gw, "GET", "/c/no-content").await;
    assert_eq!(hit.header("x-origin"), Some("1"), "{hit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_named_in_connection_are_neither_stored_nor_passed_on() {
    let origin = Origin::start().await;
    let gw = StoaProcess::start(&config(&origin, "")).await;
    for (path, round) in [
        ("/c/connection", "MISS"),
        ("/c/connection", "HIT"),
        ("/p/connection", ""),
    ] {
        let answer = send(&gw, "GET", path).await;
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        assert_eq!(answer.x_cache(), round, "{path}: {answer:?}");
        assert_eq!(answer.body, "ok", "{path}");
        assert_eq!(answer.header("x-kept"), Some("yes"), "{path}: {answer:?}");
        assert_eq!(
            answer.header("x-secret"),
            None,
            "{path} {round}: {answer:?}"
        );
        assert_eq!(
            answer.header("keep-alive"),
            None,
            "{path} {round}: {answer:?}"
        );
        assert_eq!(answer.header("content-length"), Some("2"), "{path}");
        let connection = answer.header("connection").unwrap_or_default();
        assert!(
            !connection.to_ascii_lowercase().contains("x-secret"),
            "{path}: {answer:?}"
        );
    }
}

// ---- item 5: extension methods ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_listing_extension_methods_routes_them() {
    let origin = Origin::start().await;
    let routes = "[[routes]]\nname = \"ext\"\nmethods = [\"PURGE\", \"M-SEARCH\"]\n\
                  path = \"/x/{name}\"\nupstream = \"origin\"\n";
    let text = config(&origin, routes);

    let dir = tempfile::tempdir().unwrap();
    let (full, _, _) = config_with(&text);
    let path = write_temp(dir.path(), "ext.toml", &full);
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");

    for bad in ["\"GE T\"", "\"\"", "\"get\""] {
        let broken = text.replace("\"PURGE\"", bad);
        let (full, _, _) = config_with(&broken);
        let path = write_temp(dir.path(), "bad.toml", &full);
        let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{bad} accepted: {out}{err}");
        assert!(err.contains("routes[2].methods[0]"), "{bad}: {err}");
    }
    // A cached route still caches only GET, HEAD and body-keyed POST.
    let cached_purge = text.replace(
        "methods = [\"GET\"]\npath = \"/c/",
        "methods = [\"GET\", \"PURGE\"]\npath = \"/c/",
    );
    let (full, _, _) = config_with(&cached_purge);
    let path = write_temp(dir.path(), "cached.toml", &full);
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("PURGE cannot be cached"), "{err}");

    let gw = StoaProcess::start(&text).await;
    for method in ["PURGE", "M-SEARCH"] {
        let answer = send(&gw, method, "/x/thing").await;
        assert_eq!(answer.status, 200, "{method}: {answer:?}");
        assert_eq!(answer.body, method, "{method} did not reach the origin");
    }
    let other = send(&gw, "GET", "/x/thing").await;
    assert_eq!(other.status, 405, "{other:?}");
    let allow = other.header("allow").unwrap_or_default();
    assert!(
        allow.contains("PURGE") && allow.contains("M-SEARCH"),
        "{allow}"
    );
}
