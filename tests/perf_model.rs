//! `server.request_id` and the proxy's workers (`server.threads`), end to end against the
//! real binary.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{
    calls, demo_with, knobs, read_until_closed, x_cache, Api, EchoUpstream, RawAnswer, StoaProcess,
};
use serde_json::Value;

fn echo_routes(echo: &EchoUpstream) -> String {
    format!(
        "[upstreams.echo]\nurl = \"{}\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"pass\"\nmethods = [\"GET\"]\npath = \"/pass/{{id}}\"\nupstream = \"echo\"\nrewrite = \"/echo/{{id}}\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\"]\npath = \"/cached/{{id}}\"\nupstream = \"echo\"\nrewrite = \"/echo/{{id}}\"\ncache = {{ ttl = \"60s\" }}\n",
        echo.url()
    )
}

/// Sends `GET path` with an optional raw `X-Request-Id`; returns the answer's id and the id
/// the upstream saw (from the echoed headers).
async fn ids(
    gw: &StoaProcess,
    path: &str,
    sent: Option<&[u8]>,
) -> (Option<String>, Option<String>) {
    let mut req = reqwest::Client::new().get(gw.url(path));
    if let Some(id) = sent {
        req = req.header(
            "x-request-id",
            reqwest::header::HeaderValue::from_bytes(id).unwrap(),
        );
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let answered = r
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_string());
    let v: Value = r.json().await.unwrap();
    let seen = v["headers"]["x-request-id"].as_str().map(String::from);
    (answered, seen)
}

fn is_generated(id: &Option<String>) -> bool {
    id.as_ref().is_some_and(|id| {
        id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_generate_keeps_a_valid_id_and_replaces_a_hostile_one() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("request_id = \"generate\"", &echo_routes(&echo)).await;
    for path in ["/pass/1", "/cached/1"] {
        let (answered, seen) = ids(&gw, path, Some(b"client-1")).await;
        assert_eq!(answered.as_deref(), Some("client-1"), "{path}");
        assert_eq!(seen.as_deref(), Some("client-1"), "{path}");
    }
    let long = [b'x'; 129];
    for (i, hostile) in [&long[..], b"a\tb", b"a b"].into_iter().enumerate() {
        let path = format!("/cached/h{i}");
        for path in ["/pass/2", path.as_str()] {
            let (answered, seen) = ids(&gw, path, Some(hostile)).await;
            assert!(is_generated(&answered), "{path}: {answered:?}");
            assert_eq!(seen, answered, "{path}");
        }
    }
    let (a, _) = ids(&gw, "/pass/3", None).await;
    let (b, _) = ids(&gw, "/pass/3", None).await;
    assert!(
        is_generated(&a) && is_generated(&b) && a != b,
        "{a:?} {b:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_pass_only_passes_a_clients_valid_id() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("request_id = \"pass\"", &echo_routes(&echo)).await;
    for path in ["/pass/1", "/cached/1"] {
        let (answered, seen) = ids(&gw, path, Some(b"client-1")).await;
        assert_eq!(answered.as_deref(), Some("client-1"), "{path}");
        assert_eq!(seen.as_deref(), Some("client-1"), "{path}");
    }
    for (path, sent) in [
        ("/pass/2", None),
        ("/cached/2", None),
        ("/pass/3", Some(&b"a\tb"[..])),
        ("/cached/3", Some(&b"a\tb"[..])),
    ] {
        assert_eq!(ids(&gw, path, sent).await, (None, None), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_off_sends_and_answers_none() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("request_id = \"off\"", &echo_routes(&echo)).await;
    for (path, sent) in [
        ("/pass/1", Some(&b"client-1"[..])),
        ("/cached/1", Some(&b"client-1"[..])),
        ("/pass/2", None),
        ("/cached/2", None),
    ] {
        assert_eq!(ids(&gw, path, sent).await, (None, None), "{path}");
    }
    // stoa's own answers carry none either.
    let r = reqwest::Client::new()
        .get(gw.url("/nowhere"))
        .header("x-request-id", "client-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().get("x-request-id").is_none());
}

/// CPU time (clock ticks, user and system) of the threads of process `pid` named `name` (a
/// worker's runtime thread and its blocking pool), or `None` if there is none.
fn thread_ticks(pid: u32, name: &str) -> Option<u64> {
    let mut ticks = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue;
        };
        // `tid (comm) state ...`: the name may hold spaces, so split at its parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != name {
            continue;
        }
        // Fields from the 3rd on; utime and stime are the 14th and 15th.
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        *ticks.get_or_insert(0) +=
            fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    ticks
}

/// With `threads = 2` there are two single-thread workers, and both serve: each worker's
/// thread spends CPU on requests arriving over fresh connections on the one port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_workers_serve_requests() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("threads = 2", &echo_routes(&echo)).await;
    let pid = gw.child.id();
    let worker_ticks = || {
        let (a, b) = (
            thread_ticks(pid, "stoa proxy 0"),
            thread_ticks(pid, "stoa proxy 1"),
        );
        (
            a.expect("no thread of worker 0"),
            b.expect("no thread of worker 1"),
        )
    };
    let before = worker_ticks();
    // Each request on a connection of its own, eight at a time, until both workers' threads
    // have spent 50 ms (5 ticks) of CPU or 30 s passed.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut spent = (0, 0);
    while Instant::now() < deadline {
        let batch: Vec<_> = (0..8)
            .map(|i| {
                let r = http.get(gw.url(&format!("/cached/{}", i % 4))).send();
                tokio::spawn(async move { r.await.map(|r| r.status().as_u16()) })
            })
            .collect();
        for r in batch {
            assert_eq!(r.await.unwrap().unwrap(), 200);
        }
        let now = worker_ticks();
        spent = (now.0 - before.0, now.1 - before.1);
        if spent.0 >= 5 && spent.1 >= 5 {
            break;
        }
    }
    assert!(
        spent.0 >= 5 && spent.1 >= 5,
        "CPU ticks of the two workers: {spent:?}"
    );
}

/// Single flight holds across workers: many concurrent requests for one cold key, over as
/// many connections (taken by both workers), make one upstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_flight_holds_across_workers() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 300)).await;
    let config = format!(
        "[log]\nformat = \"json\"\nlevel = \"info,stoa::connections=debug\"\n\n\
         [upstreams.up]\nurl = \"{}\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"restaurant\"\nmethods = [\"GET\"]\npath = \"/restaurant/{{id}}\"\n\
         rewrite = \"/api/restaurant/{{id}}\"\nupstream = \"up\"\ncache = {{ ttl = \"60s\" }}\n",
        up.url()
    );
    let gw = StoaProcess::start_with("threads = 2", &config).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = gw.url("/restaurant/dufva");
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let r = http.get(url).send().await.expect("request failed");
                (r.status().as_u16(), x_cache(&r), r.bytes().await.unwrap())
            })
        })
        .collect();
    let mut bodies = BTreeSet::new();
    let mut statuses = BTreeSet::new();
    for t in tasks {
        let (status, cache, body) = t.await.unwrap();
        assert_eq!(status, 200);
        statuses.insert(cache);
        bodies.insert(body);
    }
    assert_eq!(bodies.len(), 1, "every client got the same answer");
    assert_eq!(
        calls(&up, "GET /api/restaurant/dufva"),
        1,
        "one upstream call across the workers ({statuses:?})"
    );
    // Which worker accepted each connection: both took some.
    let workers: BTreeSet<u64> = gw
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "client connection accepted")
        .filter_map(|v| v["worker"].as_u64())
        .collect();
    assert_eq!(
        workers,
        BTreeSet::from([0, 1]),
        "the requests were taken by both workers"
    );
}

/// Connections that wait in the accept queue when the stop comes are answered, not reset:
/// stoa is frozen (SIGSTOP) while clients connect and send their requests, then gets
/// SIGTERM and resumes. Every one of them gets its 200 before stoa closes it, and stoa exits
/// cleanly. With 400 of them, the stop reaches the workers before they took them all: the
/// rest are taken from the queue by the drain (its log line says how many).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_queued_at_the_stop_are_answered() {
    use tokio::io::AsyncWriteExt;
    let echo = EchoUpstream::start().await;
    let mut gw = StoaProcess::start_with("threads = 2", &echo_routes(&echo)).await;
    let warm = reqwest::get(gw.url("/cached/1")).await.unwrap();
    assert_eq!(warm.status(), 200);
    gw.signal(libc::SIGSTOP);
    let mut queued = Vec::new();
    for i in 0..400 {
        // The kernel completes the handshakes: the connections wait in the queue.
        let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .unwrap();
        let path = if i % 2 == 0 { "/cached/1" } else { "/pass/1" };
        sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: stoa\r\n\r\n").as_bytes())
            .await
            .unwrap();
        queued.push(sock);
    }
    gw.signal(libc::SIGTERM);
    gw.signal(libc::SIGCONT);
    for (i, mut sock) in queued.into_iter().enumerate() {
        let (got, closed) = read_until_closed(&mut sock, Duration::from_secs(10)).await;
        let answer = RawAnswer::parse(&got);
        assert_eq!(
            answer.status,
            200,
            "connection {i}: {answer:?}\n{}",
            gw.log()
        );
        // Answered before the stop reached the workers (kept alive, then closed idle by the
        // drain) or after it (closing its connection): either way answered and closed.
        assert!(closed, "connection {i} left open: {answer:?}");
    }
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("stoa did not exit:\n{}", gw.log()));
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    eprintln!(
        "{}",
        gw.log()
            .lines()
            .filter(|l| l.contains("accept queue"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
