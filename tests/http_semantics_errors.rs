//! Issue 13, items 1 and 2: an upstream's own 5xx on a cached route goes to the client as
//! the upstream gave it (not stoa's 502), and the upstream's `Age` is kept and added to the
//! time in stoa. A small origin of the test's own sets each status and header in turn.

mod common;

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{path_of, raw_send, serve_heads, text_answer, RawAnswer, StoaProcess};

/// An origin answering by path: `/busy/*` a 503 with `Retry-After: 120` (after `delay`),
/// `/flip/*` the status in `flip` (200 or 503), `/big/*` a 503 with a 5000-byte body,
/// `/age/*` a 200 with `Age: 2000`, `/badage/*` a 200 with `Age: -5`. Counts requests.
struct Origin {
    port: u16,
    calls: Arc<AtomicUsize>,
    flip: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    async fn start(delay: Duration) -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(AtomicUsize::new(0));
        let flip = Arc::new(AtomicU16::new(200));
        let (c, f) = (calls.clone(), flip.clone());
        let task = serve_heads(listener, move |head| {
            let (calls, flip) = (c.clone(), f.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let path = path_of(&head);
                let (status, extra, body) = if path.starts_with("/busy/") {
                    tokio::time::sleep(delay).await;
                    (503, "Retry-After: 120\r\n", "busy, come back".to_string())
                } else if path.starts_with("/flip/") {
                    let s = flip.load(Ordering::SeqCst);
                    (s, "", format!("status {s}"))
                } else if path.starts_with("/big/") {
                    (503, "Retry-After: 7\r\n", "x".repeat(5000))
                } else if path.starts_with("/age/") {
                    (200, "Age: 2000\r\n", "aged".to_string())
                } else {
                    (200, "Age: -5\r\n", "odd age".to_string())
                };
                text_answer(status, extra, &body)
            }
        });
        Origin {
            port,
            calls,
            flip,
            task,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// stoa with one cached route `/c/{*rest}` on `origin`, with the given `cache` table.
async fn stoa_for(origin: &Origin, cache: &str) -> StoaProcess {
    StoaProcess::start(&format!(
        "[upstreams.o]\nurl = \"http://127.0.0.1:{}\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"c\"\nmethods = [\"GET\"]\npath = \"/c/{{*rest}}\"\n\
         upstream = \"o\"\nrewrite = \"/{{rest}}\"\ncache = {cache}\n",
        origin.port
    ))
    .await
}

async fn get(gw: &StoaProcess, path: &str) -> RawAnswer {
    raw_send(
        gw.port,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
    .await
}

// ---- item 1: an upstream's 5xx is passed on, not replaced by stoa's 502 ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_503_reaches_every_waiter_as_given_and_is_not_stored() {
    let origin = Origin::start(Duration::from_millis(300)).await;
    let gw = stoa_for(&origin, r#"{ ttl = "60s" }"#).await;

    let answers = futures_util::future::join_all((0..4).map(|_| get(&gw, "/c/busy/1"))).await;
    assert_eq!(origin.calls(), 1, "one flight for the four");
    let mut how: Vec<&str> = answers.iter().map(|a| a.x_cache()).collect();
    how.sort_unstable();
    assert_eq!(how, ["COALESCED", "COALESCED", "COALESCED", "MISS"]);
    for a in &answers {
        assert_eq!(a.status, 503, "{}", a.body);
        assert_eq!(a.header("retry-after"), Some("120"));
        assert_eq!(a.header("content-type"), Some("text/plain"));
        assert_eq!(a.body, "busy, come back");
    }

    let again = get(&gw, "/c/busy/1").await;
    assert_eq!(again.status, 503);
    assert_eq!(again.x_cache(), "MISS", "the 503 was not stored");
    assert_eq!(origin.calls(), 2);

    let metrics = gw.metrics().await;
    assert!(
        metrics
            .contains(r#"stoa_upstream_fetches_total{outcome="error",route="c",upstream="o"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_within_stale_if_error_serves_instead_of_an_upstream_503() {
    let origin = Origin::start(Duration::ZERO).await;
    let gw = stoa_for(&origin, r#"{ ttl = "300ms", stale_if_error = "1m" }"#).await;
    let first = get(&gw, "/c/flip/1").await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"));

    origin.flip.store(503, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stale = get(&gw, "/c/flip/1").await;
    assert_eq!((stale.status, stale.x_cache()), (200, "STALE"));
    assert_eq!(stale.body, "status 200");
    // Without a copy the 503 itself.
    let cold = get(&gw, "/c/flip/2").await;
    assert_eq!((cold.status, cold.x_cache()), (503, "MISS"));
    assert_eq!(cold.body, "status 503");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_upstream_503_is_streamed_through() {
    let origin = Origin::start(Duration::ZERO).await;
    let gw = stoa_for(&origin, r#"{ ttl = "60s", max_entry_bytes = "1KiB" }"#).await;
    let a = get(&gw, "/c/big/1").await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.x_cache(), "BYPASS");
    assert_eq!(a.header("retry-after"), Some("7"));
    assert_eq!(a.body.len(), 5000);
}

// ---- item 2: Age = the upstream's Age + time in stoa ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_age_is_kept_and_added_to_the_time_in_stoa() {
    let origin = Origin::start(Duration::ZERO).await;
    let gw = stoa_for(&origin, r#"{ ttl = "60s" }"#).await;
    let miss = get(&gw, "/c/age/1").await;
    assert_eq!(miss.x_cache(), "MISS");
    assert_eq!(miss.header("age"), Some("2000"));

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let hit = get(&gw, "/c/age/1").await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.header("age"), Some("2001"));
    assert_eq!(origin.calls(), 1);

    // A malformed Age is ignored: only stoa's own time, and only one Age header.
    let odd = get(&gw, "/c/badage/1").await;
    assert_eq!(odd.header("age"), Some("0"));
    assert_eq!(odd.headers.iter().filter(|(k, _)| k == "age").count(), 1);
}
