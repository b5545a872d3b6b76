//! The access log's own writer: `log.access_log_file`, one JSON line per request, nothing on
//! stderr, the dropped-lines counter, and the switch.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{sample, stoa, write_temp, EchoUpstream, StoaProcess};
use serde_json::Value;

fn config(echo: &EchoUpstream, log: &str) -> String {
    format!(
        "[log]\n{log}\n\n\
         [upstreams.echo]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\"]\npath = \"/cached/{{id}}\"\nupstream = \"echo\"\n\
         rewrite = \"/echo/{{id}}\"\ncache = {{ ttl = \"60s\" }}\n\n\
         [[routes]]\nname = \"pass\"\nmethods = [\"GET\"]\npath = \"/pass/{{id}}\"\nupstream = \"echo\"\n\
         rewrite = \"/echo/{{id}}\"\n",
        echo.url()
    )
}

/// Lines of `path` once it holds at least `n` (or after 10 s, whatever it holds).
async fn lines_of(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_go_to_the_file_one_json_line_per_request() {
    let echo = EchoUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let log = format!(
        "format = \"json\"\naccess_log = true\naccess_log_file = \"{}\"",
        file.display()
    );
    let gw = StoaProcess::start(&config(&echo, &log)).await;
    let http = reqwest::Client::new();

    // 300 requests from 6 clients at once: hits, misses, pass-through and 404s.
    let mut expected: HashMap<String, (String, u16)> = HashMap::new();
    let mut tasks = Vec::new();
    for c in 0..6 {
        let http = http.clone();
        let mut cases = Vec::new();
        for i in 0..50 {
            let path = match i % 3 {
                0 => format!("/cached/{}", i % 7),
                1 => format!("/pass/{i}"),
                _ => format!("/nowhere/{i}"),
            };
            let id = format!("access-{c}-{i}");
            let status = if i % 3 == 2 { 404 } else { 200 };
            expected.insert(id.clone(), (path.clone(), status));
            cases.push((gw.url(&path), id, status));
        }
        tasks.push(tokio::spawn(async move {
            for (url, id, status) in cases {
                let r = http
                    .get(&url)
                    .header("x-request-id", &id)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), status, "{url}");
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let lines = lines_of(&file, expected.len()).await;
    assert_eq!(lines.len(), expected.len(), "{}", lines.join("\n"));
    let mut seen = HashMap::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["target"], "stoa::access", "{line}");
        assert_eq!(v["level"], "INFO", "{line}");
        let id = v["request_id"].as_str().unwrap().to_string();
        let (path, status) = expected
            .get(&id)
            .unwrap_or_else(|| panic!("unexpected line {line}"));
        assert_eq!(v["path"], path.as_str(), "{line}");
        assert_eq!(v["status"].as_u64(), Some(u64::from(*status)), "{line}");
        *seen.entry(id).or_insert(0) += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "a request logged twice");
    assert_eq!(seen.len(), expected.len());

    // Nothing of it on stderr, and no line dropped.
    assert!(!gw.log().contains("stoa::access"), "{}", gw.log());
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(&metrics, "stoa_access_log_dropped_total"),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_file_access_lines_stay_on_stderr_and_off_means_off() {
    let echo = EchoUpstream::start().await;
    let on = StoaProcess::start(&config(&echo, "access_log = true")).await;
    let off = StoaProcess::start(&config(&echo, "access_log = false")).await;
    for gw in [&on, &off] {
        let r = reqwest::Client::new()
            .get(gw.url("/pass/1"))
            .header("x-request-id", "text-line-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !on.log().contains("text-line-1") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let line = on
        .log()
        .lines()
        .find(|l| l.contains("stoa::access"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no access line:\n{}", on.log()));
    assert!(
        line.contains(" INFO stoa::access: client=127.0.0.1 method=\"GET\" path=\"/pass/1\"")
            && line.ends_with("request_id=\"text-line-1\""),
        "{line}"
    );
    assert!(!off.log().contains("stoa::access"), "{}", off.log());
}

#[test]
fn check_names_an_access_log_file_in_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[server]\nlisten = \"127.0.0.1:18081\"\n[admin]\nlisten = \"127.0.0.1:18082\"\n\
                [log]\naccess_log_file = \"/no/such/dir/access.log\"\n\
                [upstreams.u]\nurl = \"http://127.0.0.1:9\"\n\
                [[routes]]\nname = \"r\"\npath = \"/r\"\nupstream = \"u\"\n";
    let path = write_temp(dir.path(), "stoa.toml", text);
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("log.access_log_file") && err.contains("/no/such/dir"),
        "{out}{err}"
    );
}

/// Each line names the request's lane: `answer` for what stoa answers (a hit, a miss, its
/// own errors, a head it refuses), `forward` for a plain pass-through request, and
/// `proxy:<why>` for what pingora's proxy serves (here a chunked body: `proxy:framing`;
/// `server.front = false`: `proxy:off`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_names_the_lane_that_answered() {
    use tokio::io::AsyncWriteExt;
    let echo = EchoUpstream::start().await;
    let post_route = "\n[[routes]]\nname = \"post\"\nmethods = [\"POST\"]\npath = \"/post\"\nupstream = \"echo\"\n";
    for (front, lanes) in [
        (
            true,
            [
                ("/cached/1", "answer"),
                ("/cached/1", "answer"),
                ("/pass/1", "forward"),
                ("/nowhere", "answer"),
                ("/post", "proxy:framing"),
                ("/", "answer"),
            ],
        ),
        (
            false,
            [
                ("/cached/1", "proxy:off"),
                ("/cached/1", "proxy:off"),
                ("/pass/1", "proxy:off"),
                ("/nowhere", "proxy:off"),
                ("/post", "proxy:off"),
                ("/", "proxy:off"),
            ],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("access.log");
        let log = format!(
            "format = \"json\"\naccess_log = true\naccess_log_file = \"{}\"",
            file.display()
        );
        let config = format!("{}{post_route}", config(&echo, &log));
        let gw = StoaProcess::start_with(&format!("front = {front}"), &config).await;
        let http = reqwest::Client::new();
        for (path, _) in &lanes[..4] {
            http.get(gw.url(path))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
        let chunked = "POST /post HTTP/1.1\r\nHost: stoa\r\nTransfer-Encoding: chunked\r\n\
                       Connection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
        let (answer, _) =
            common::raw_exchange(gw.port, chunked.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        // An HTTP/1.1 request without `Host`: the front refuses it (400); pingora's proxy,
        // with the front off, routes it.
        let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .unwrap();
        sock.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        common::read_until_closed(&mut sock, Duration::from_secs(5)).await;
        let expected = lanes.len();
        let lines = lines_of(&file, expected).await;
        // Sorted: a request's line may be written after the next request's answer.
        let mut got: Vec<(String, String)> = lines
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["path"].as_str().unwrap().to_string(),
                    v["lane"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut want: Vec<(String, String)> = lanes[..expected]
            .iter()
            .map(|(p, l)| (p.to_string(), l.to_string()))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "front = {front}");
        let metrics = gw.metrics().await;
        let first = if front { "answer" } else { "proxy:off" };
        let series = format!(
            "stoa_requests_total{{cache=\"hit\",lane=\"{first}\",route=\"cached\",status=\"200\"}}"
        );
        assert_eq!(sample(&metrics, &series), Some(1.0), "{metrics}");
    }
}
