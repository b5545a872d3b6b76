//! Observability end to end: `/metrics` values after known traffic, the exposition checked
//! by promtool, readiness and metrics while draining, the JSON access log, request ids and
//! the Grafana dashboard against the live series. Real demo upstreams, the real gateway.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{
    demo_with, knobs, repo_path, sample, x_cache, Api, DemoServer, EchoUpstream, Knobs, StoaProcess,
};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn upstream(name: &str, url: &str) -> String {
    format!("[upstreams.{name}]\nurl = \"{url}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n\n")
}

/// One `[[routes]]` table; `extra` holds more keys (`cache = {...}`, `rate_limit = "..."`).
fn route(name: &str, path: &str, upstream: &str, rewrite: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"{path}\"\nupstream = \"{upstream}\"\nrewrite = \"{rewrite}\"\n{extra}\n\n"
    )
}

fn request_id_of(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("no X-Request-Id in {:?}", r.headers()))
        .to_str()
        .unwrap()
        .to_string()
}

fn is_generated_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The sample lines of the series called exactly `name` (any labels).
fn series(text: &str, name: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .map(str::to_string)
        .collect()
}

/// Compares the sample lines of `name` with `expected`, noting any difference.
fn expect_series(problems: &mut Vec<String>, text: &str, name: &str, expected: &[String]) {
    let got = series(text, name);
    let want: BTreeSet<String> = expected.iter().cloned().collect();
    if got != want {
        problems.push(format!(
            "{name}:\n    missing:    {:?}\n    unexpected: {:?}",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        ));
    }
}

/// The exposition once every request has been logged: metrics are recorded in the
/// `logging` phase, after the answer is sent, and the in-flight count drops after that.
async fn settled_metrics(gw: &StoaProcess) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = gw.metrics().await;
        if sample(&text, "stoa_requests_in_flight") == Some(0.0) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "requests still in flight after 10 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `cond` holds, up to `timeout`.
async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// A gateway with every kind of route: `menu` (cached, in front of `restaurants`),
/// `broken` (cached, in front of an upstream that always answers 500) and `limited`
/// (pass-through, rate limited by policy `tight`: a burst of 1, then 1 a minute).
struct Scene {
    restaurants: DemoServer,
    _broken: DemoServer,
    gw: StoaProcess,
}

impl Scene {
    async fn start() -> Scene {
        let restaurants = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
        let broken = demo_with(
            Api::Restaurants,
            Knobs {
                error_rate: 1.0,
                ..knobs(Api::Restaurants, 0)
            },
        )
        .await;
        let config = [
            "[rate_limits.tight]\nper_minute = 1\nburst = 1\n\n".to_string(),
            upstream("restaurants", &restaurants.url()),
            upstream("broken", &broken.url()),
            route(
                "menu",
                "/restaurant/{id}",
                "restaurants",
                "/api/restaurant/{id}",
                "cache = { ttl = \"60s\" }",
            ),
            route(
                "broken",
                "/broken/{id}",
                "broken",
                "/api/restaurant/{id}",
                "cache = { ttl = \"60s\" }",
            ),
            route(
                "limited",
                "/limited/{id}",
                "restaurants",
                "/api/restaurant/{id}",
                "rate_limit = \"tight\"",
            ),
        ]
        .concat();
        let gw = StoaProcess::start(&config).await;
        Scene {
            restaurants,
            _broken: broken,
            gw,
        }
    }

    async fn get(&self, http: &reqwest::Client, path: &str) -> (u16, String) {
        let r = http.get(self.gw.url(path)).send().await.unwrap();
        let out = (r.status().as_u16(), x_cache(&r));
        r.bytes().await.unwrap();
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_exact_counts_after_a_known_sequence_of_requests() {
    let scene = Scene::start().await;
    let http = reqwest::Client::new();

    // Before any request: zero-valued series for every configured route, nothing in flight.
    let text = settled_metrics(&scene.gw).await;
    // Each route's common answers are exported at zero from the start, so that the first
    // burst of each is seen by `increase()`; nothing is counted yet.
    let before = series(&text, "stoa_requests_total");
    for line in [
        r#"stoa_requests_total{cache="coalesced",lane="answer",route="menu",status="200"} 0"#,
        r#"stoa_requests_total{cache="miss",lane="answer",route="broken",status="502"} 0"#,
        r#"stoa_requests_total{cache="none",lane="forward",route="limited",status="429"} 0"#,
        r#"stoa_requests_total{cache="none",lane="answer",route="unmatched",status="404"} 0"#,
    ] {
        assert!(before.contains(line), "no {line} in\n{text}");
    }
    assert!(before.iter().all(|l| l.ends_with(" 0")), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"stoa_rate_limited_total{policy="tight",route="limited"}"#
        ),
        Some(0.0),
        "{text}"
    );

    // 1 miss, then 3 hits.
    assert_eq!(
        scene.get(&http, "/restaurant/bikupan").await,
        (200, "MISS".into())
    );
    for _ in 0..3 {
        assert_eq!(
            scene.get(&http, "/restaurant/bikupan").await,
            (200, "HIT".into())
        );
    }

    // A coalesced burst: a slow fetch of a cold key, joined by 4 more requests.
    scene.restaurants.set_knobs(knobs(Api::Restaurants, 1_500));
    let burst = |http: &reqwest::Client| {
        let (http, url) = (http.clone(), scene.gw.url("/restaurant/haga"));
        tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            let out = (r.status().as_u16(), x_cache(&r));
            r.bytes().await.unwrap();
            out
        })
    };
    let leader = burst(&http);
    assert!(
        wait_until(Duration::from_secs(5), || scene
            .restaurants
            .stats()
            .in_flight
            == 1)
        .await,
        "the leader's fetch never reached the upstream"
    );
    let waiters: Vec<_> = (0..4).map(|_| burst(&http)).collect();
    assert_eq!(leader.await.unwrap(), (200, "MISS".into()));
    for w in waiters {
        assert_eq!(w.await.unwrap(), (200, "COALESCED".into()));
    }
    scene.restaurants.set_knobs(knobs(Api::Restaurants, 0));

    // Burst 1 on a pass-through route: the second request is refused.
    assert_eq!(
        scene.get(&http, "/limited/bikupan").await,
        (200, String::new())
    );
    assert_eq!(
        scene.get(&http, "/limited/bikupan").await,
        (429, String::new())
    );
    // The upstream answers 500: its own 500 for the client, nothing stored.
    assert_eq!(scene.get(&http, "/broken/bikupan").await.0, 500);
    // No route.
    assert_eq!(scene.get(&http, "/nope").await.0, 404);

    let text = settled_metrics(&scene.gw).await;
    let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut problems = Vec::new();
    // The request series that counted something (the others stay at zero).
    let counted: String = text
        .lines()
        .filter(|l| !(l.starts_with("stoa_requests_total{") && l.ends_with(" 0")))
        .collect::<Vec<_>>()
        .join("\n");
    expect_series(
        &mut problems,
        &counted,
        "stoa_requests_total",
        &lines(&[
            r#"stoa_requests_total{cache="miss",lane="answer",route="menu",status="200"} 2"#,
            r#"stoa_requests_total{cache="hit",lane="answer",route="menu",status="200"} 3"#,
            r#"stoa_requests_total{cache="coalesced",lane="answer",route="menu",status="200"} 4"#,
            r#"stoa_requests_total{cache="none",lane="forward",route="limited",status="200"} 1"#,
            r#"stoa_requests_total{cache="none",lane="forward",route="limited",status="429"} 1"#,
            // The request led the fetch that failed: a miss on a cached route. `none`
            // means "the cache was not consulted" (pass-through routes, and answers given
            // before the cache such as 429), and the dashboard's hit ratio divides by
            // `cache!="none"`.
            r#"stoa_requests_total{cache="miss",lane="answer",route="broken",status="500"} 1"#,
            r#"stoa_requests_total{cache="none",lane="answer",route="unmatched",status="404"} 1"#,
        ]),
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_upstream_fetches_total",
        &lines(&[
            r#"stoa_upstream_fetches_total{outcome="ok",route="menu",upstream="restaurants"} 2"#,
            r#"stoa_upstream_fetches_total{outcome="error",route="menu",upstream="restaurants"} 0"#,
            r#"stoa_upstream_fetches_total{outcome="timeout",route="menu",upstream="restaurants"} 0"#,
            r#"stoa_upstream_fetches_total{outcome="ok",route="broken",upstream="broken"} 0"#,
            r#"stoa_upstream_fetches_total{outcome="error",route="broken",upstream="broken"} 1"#,
            r#"stoa_upstream_fetches_total{outcome="timeout",route="broken",upstream="broken"} 0"#,
            r#"stoa_upstream_fetches_total{outcome="ok",route="limited",upstream="restaurants"} 1"#,
            r#"stoa_upstream_fetches_total{outcome="error",route="limited",upstream="restaurants"} 0"#,
            r#"stoa_upstream_fetches_total{outcome="timeout",route="limited",upstream="restaurants"} 0"#,
        ]),
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_coalesced_waiters_total",
        &lines(&[
            r#"stoa_coalesced_waiters_total{route="menu"} 4"#,
            r#"stoa_coalesced_waiters_total{route="broken"} 0"#,
            r#"stoa_coalesced_waiters_total{route="limited"} 0"#,
            r#"stoa_coalesced_waiters_total{route="unmatched"} 0"#,
        ]),
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_rate_limited_total",
        &lines(&[r#"stoa_rate_limited_total{policy="tight",route="limited"} 1"#]),
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_request_duration_seconds_count",
        &lines(&[
            r#"stoa_request_duration_seconds_count{cache="hit",route="menu"} 3"#,
            r#"stoa_request_duration_seconds_count{cache="miss",route="menu"} 2"#,
            r#"stoa_request_duration_seconds_count{cache="coalesced",route="menu"} 4"#,
            r#"stoa_request_duration_seconds_count{cache="stale",route="menu"} 0"#,
            r#"stoa_request_duration_seconds_count{cache="bypass",route="menu"} 0"#,
            r#"stoa_request_duration_seconds_count{cache="hit",route="broken"} 0"#,
            r#"stoa_request_duration_seconds_count{cache="miss",route="broken"} 1"#,
            r#"stoa_request_duration_seconds_count{cache="coalesced",route="broken"} 0"#,
            r#"stoa_request_duration_seconds_count{cache="stale",route="broken"} 0"#,
            r#"stoa_request_duration_seconds_count{cache="bypass",route="broken"} 0"#,
            r#"stoa_request_duration_seconds_count{cache="none",route="limited"} 2"#,
            r#"stoa_request_duration_seconds_count{cache="none",route="unmatched"} 1"#,
        ]),
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_upstream_duration_seconds_count",
        &lines(&[
            r#"stoa_upstream_duration_seconds_count{upstream="restaurants"} 3"#,
            r#"stoa_upstream_duration_seconds_count{upstream="broken"} 1"#,
        ]),
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_cache_entries",
        &lines(&["stoa_cache_entries 2"]),
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_cache_evictions_total",
        &lines(&["stoa_cache_evictions_total 0"]),
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_requests_in_flight",
        &lines(&["stoa_requests_in_flight 0"]),
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_build_info",
        &[format!("stoa_build_info{{version=\"{VERSION}\"}} 1")],
    );
    expect_series(
        &mut problems,
        &text,
        "stoa_config_reloads_total",
        &lines(&[
            r#"stoa_config_reloads_total{result="ok"} 0"#,
            r#"stoa_config_reloads_total{result="error"} 0"#,
        ]),
    );
    match sample(&text, "stoa_cache_bytes") {
        Some(bytes) if bytes > 0.0 => {}
        other => problems.push(format!("stoa_cache_bytes: {other:?}, expected > 0")),
    }
    // The upstream saw exactly the fetches counted.
    let calls = |key: &str| {
        scene
            .restaurants
            .stats()
            .paths
            .get(key)
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(
        calls("GET /api/restaurant/bikupan"),
        2,
        "1 miss + 1 pass-through"
    );
    assert_eq!(
        calls("GET /api/restaurant/haga"),
        1,
        "one fetch for the burst"
    );
    assert!(
        problems.is_empty(),
        "/metrics differs from the traffic sent:\n{}\n\nexposition:\n{text}",
        problems.join("\n")
    );
}

/// `STOA_PROMTOOL`, else `promtool` on `PATH`.
fn promtool() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("STOA_PROMTOOL").filter(|p| !p.is_empty()) {
        return path.into();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool not found: set STOA_PROMTOOL to its path or put it on PATH; \
                 run scripts/install-promtool.sh (as root) to install it (`make test` does)"
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_live_exposition() {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let promtool = promtool();
    let scene = Scene::start().await;
    let http = reqwest::Client::new();
    // Every kind of series: hit and miss, 429, an upstream's 500 on a cached route, 404.
    assert_eq!(scene.get(&http, "/restaurant/bikupan").await.0, 200);
    assert_eq!(scene.get(&http, "/restaurant/bikupan").await.0, 200);
    assert_eq!(scene.get(&http, "/limited/bikupan").await.0, 200);
    assert_eq!(scene.get(&http, "/limited/bikupan").await.0, 429);
    assert_eq!(scene.get(&http, "/broken/bikupan").await.0, 500);
    assert_eq!(scene.get(&http, "/nope").await.0, 404);

    let r = reqwest::get(scene.gw.admin_url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "{content_type}"
    );
    let text = r.text().await.unwrap();
    assert!(!series(&text, "stoa_requests_total").is_empty(), "{text}");

    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed: {report}\n{text}"
    );
    assert!(report.trim().is_empty(), "promtool: {report}\n{text}");
}

type InFlightRequest = tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>;

/// A gateway in front of a slow upstream, with a pass-through request (`/pass/bikupan`)
/// and a cached-route request (`/cached/haga`) both waiting on that upstream.
struct TwoInFlight {
    slow: DemoServer,
    gw: StoaProcess,
    requests: Vec<(&'static str, InFlightRequest)>,
}

impl TwoInFlight {
    async fn start(latency_ms: u64) -> TwoInFlight {
        let slow = demo_with(Api::Restaurants, knobs(Api::Restaurants, latency_ms)).await;
        let config = [
            upstream("restaurants", &slow.url()),
            route(
                "pass",
                "/pass/{id}",
                "restaurants",
                "/api/restaurant/{id}",
                "",
            ),
            route(
                "cached",
                "/cached/{id}",
                "restaurants",
                "/api/restaurant/{id}",
                "cache = { ttl = \"60s\" }",
            ),
        ]
        .concat();
        let gw = StoaProcess::start(&config).await;
        let text = settled_metrics(&gw).await;
        assert_eq!(sample(&text, "stoa_requests_in_flight"), Some(0.0));
        let requests = ["/pass/bikupan", "/cached/haga"]
            .into_iter()
            .map(|path| {
                let url = gw.url(path);
                let task: InFlightRequest = tokio::spawn(async move { reqwest::get(url).await });
                (path, task)
            })
            .collect();
        assert!(
            wait_until(Duration::from_secs(5), || slow.stats().in_flight == 2).await,
            "both requests should be waiting on the upstream"
        );
        TwoInFlight { slow, gw, requests }
    }

    /// Waits for both answers: (path, answer).
    async fn answers(&mut self) -> Vec<(&'static str, reqwest::Response)> {
        let mut out = Vec::new();
        for (path, task) in self.requests.drain(..) {
            let r = task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("the in-flight request {path} was cut off: {e}"));
            assert_eq!(r.status(), 200, "{path}");
            out.push((path, r));
        }
        out
    }

    async fn exits_0(&mut self) {
        let status = self
            .gw
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("stoa did not exit:\n{}", self.gw.log()));
        assert_eq!(status.code(), Some(0), "{}", self.gw.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_draining_metrics_are_served_and_count_the_requests_in_flight() {
    // tests/gateway.rs covers /readyz 503, /healthz 200, the drained request's answer and
    // exit 0 for one pass-through request. Here: both kinds of routes in flight at once,
    // the in-flight gauge before and during the drain, /metrics served while draining, and
    // the access log of the drained requests flushed before exit.
    let mut t = TwoInFlight::start(2_000).await;
    let text = t.gw.metrics().await;
    assert_eq!(
        sample(&text, "stoa_requests_in_flight"),
        Some(2.0),
        "{text}"
    );

    t.gw.signal(libc::SIGTERM);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = http.get(t.gw.admin_url("/readyz")).send().await.unwrap();
        if r.status() == 503 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"], "not_ready", "{v}");
            assert!(
                v["message"].as_str().unwrap().contains("shutting down"),
                "{v}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Draining: metrics are still served, and still count both requests.
    let r = http.get(t.gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(
        sample(&text, "stoa_requests_in_flight"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("stoa_build_info{{version=\"{VERSION}\"}}")),
        Some(1.0)
    );
    assert_eq!(t.slow.stats().in_flight, 2, "still waiting on the upstream");

    for (path, r) in t.answers().await {
        let v: Value = r.json().await.unwrap();
        assert!(v["restaurant"]["title"].is_string(), "{path}: {v}");
    }
    t.exits_0().await;

    // The access log of the drained requests was flushed before the process ended.
    let log = t.gw.log();
    for path in ["/pass/bikupan", "/cached/haga"] {
        assert!(
            log.lines()
                .any(|l| l.contains("stoa::access") && l.contains(path)),
            "no access line for {path}:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_finished_while_draining_close_the_connection() {
    // A request that started before SIGTERM and is answered during the drain must say
    // `Connection: close`, so that its client sends nothing more on that connection.
    let mut t = TwoInFlight::start(1_000).await;
    t.gw.signal(libc::SIGTERM);
    let mut kept_open = Vec::new();
    for (path, r) in t.answers().await {
        let connection = r
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap().to_ascii_lowercase());
        if connection.as_deref() != Some("close") {
            kept_open.push(format!("{path}: Connection {connection:?}"));
        }
    }
    t.exits_0().await;
    assert!(
        kept_open.is_empty(),
        "answers sent while draining kept the connection open: {kept_open:?}"
    );
}

/// The JSON objects of the access log in `log`.
fn access_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "stoa::access")
        .collect()
}

fn echo_config(echo: &EchoUpstream) -> String {
    [
        upstream("echo", &echo.url()),
        route(
            "cached",
            "/cached/{id}",
            "echo",
            "/echo/{id}",
            "cache = { ttl = \"60s\" }",
        ),
        route("pass", "/pass/{id}", "echo", "/echo/{id}", ""),
    ]
    .concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_with_every_field() {
    let echo = EchoUpstream::start().await;
    let config = format!(
        "[log]\nformat = \"json\"\naccess_log = true\n\n{}",
        echo_config(&echo)
    );
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();

    // (path, request id, status, cache, route, went upstream)
    let cases = [
        ("/cached/1", "obs-miss-1", 200, "miss", "cached", true),
        ("/cached/1", "obs-hit-1", 200, "hit", "cached", false),
        ("/pass/2", "obs-pass-1", 200, "none", "pass", true),
        ("/nowhere", "obs-404-1", 404, "none", "unmatched", false),
    ];
    let mut sizes = Vec::new();
    for (path, id, status, _, _, _) in cases {
        let r = http
            .get(gw.url(&format!("{path}?q=1")))
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        sizes.push(r.bytes().await.unwrap().len() as u64);
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = access_lines(&gw.log());
        if lines.len() >= cases.len() {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} access lines after 10 s:\n{}",
            lines.len(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(lines.len(), cases.len(), "{lines:#?}");
    for ((path, id, status, cache, route, upstream), bytes) in cases.into_iter().zip(sizes) {
        let line = lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line with request_id {id}: {lines:#?}"));
        let timestamp = line["timestamp"].as_str().unwrap_or_default();
        assert!(
            timestamp.len() >= 20 && timestamp.contains('T'),
            "timestamp {timestamp:?} in {line}"
        );
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["target"], "stoa::access", "{line}");
        assert_eq!(line["client"], "127.0.0.1", "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["path"], path, "the path without the query: {line}");
        assert_eq!(line["route"], route, "{line}");
        assert_eq!(line["status"].as_u64(), Some(u64::from(status)), "{line}");
        assert_eq!(line["cache"], cache, "{line}");
        assert_eq!(line["bytes"].as_u64(), Some(bytes), "{line}");
        let duration = line["duration"]
            .as_f64()
            .unwrap_or_else(|| panic!("no duration: {line}"));
        assert!((0.0..10.0).contains(&duration), "{line}");
        match line.get("upstream_duration") {
            Some(d) if upstream => {
                let d = d.as_f64().unwrap_or_else(|| panic!("{line}"));
                assert!(d >= 0.0 && d <= duration, "{line}");
            }
            None if !upstream => {}
            other => panic!("upstream_duration {other:?} for {path} ({cache}): {line}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_access_log_lines_when_the_access_log_is_off() {
    let echo = EchoUpstream::start().await;
    let config = format!(
        "[log]\nformat = \"json\"\naccess_log = false\n\n{}",
        echo_config(&echo)
    );
    let mut gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();
    for path in ["/cached/1", "/cached/1", "/pass/1", "/nowhere"] {
        let r = http.get(gw.url(path)).send().await.unwrap();
        r.bytes().await.unwrap();
    }
    // Metrics still count them.
    let text = settled_metrics(&gw).await;
    assert_eq!(
        sample(
            &text,
            r#"stoa_requests_total{cache="none",lane="forward",route="pass",status="200"}"#
        ),
        Some(1.0),
        "{text}"
    );
    // Stop the process so that everything written is flushed, then look.
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("no exit");
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    let log = gw.log();
    let json: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        json.iter().any(|v| v["message"] == "stoa stopped"),
        "the log was written, as JSON, to the end:\n{log}"
    );
    assert!(
        !log.contains("stoa::access"),
        "access lines despite access_log = false:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_reach_the_upstream_and_come_back() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&echo_config(&echo)).await;
    let http = reqwest::Client::new();
    let get = |path: &str, id: Option<&str>| {
        let mut req = http.get(gw.url(path));
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let id = request_id_of(&r);
            let cache = x_cache(&r);
            let v: Value = r.json().await.unwrap();
            (
                id,
                cache,
                v["headers"]["x-request-id"].as_str().map(String::from),
            )
        }
    };

    // Pass-through: the client's id goes upstream and comes back.
    let (id, _, seen) = get("/pass/1", Some("client-id-1")).await;
    assert_eq!(id, "client-id-1");
    assert_eq!(seen.as_deref(), Some("client-id-1"));
    // Without one: a new id, the same upstream and back.
    let (id, _, seen) = get("/pass/1", None).await;
    assert!(is_generated_id(&id), "{id}");
    assert_eq!(seen.as_deref(), Some(id.as_str()));
    let (other, _, _) = get("/pass/1", None).await;
    assert_ne!(other, id, "every request gets its own id");
    // An id that is not sane (spaces, or too long) is replaced.
    for bad in ["has spaces".to_string(), "x".repeat(129)] {
        let (id, _, seen) = get("/pass/1", Some(&bad)).await;
        assert!(is_generated_id(&id), "{bad:?} -> {id}");
        assert_eq!(seen.as_deref(), Some(id.as_str()));
    }

    // Cached route, a miss: the id of the request that fetched goes upstream.
    let (id, cache, seen) = get("/cached/1", Some("client-id-2")).await;
    assert_eq!((id.as_str(), cache.as_str()), ("client-id-2", "MISS"));
    assert_eq!(seen.as_deref(), Some("client-id-2"));
    let (id, cache, seen) = get("/cached/2", None).await;
    assert_eq!(cache, "MISS");
    assert!(is_generated_id(&id), "{id}");
    assert_eq!(seen.as_deref(), Some(id.as_str()));
    // A hit answers with this request's own id (the stored body shows the fetcher's).
    let (id, cache, seen) = get("/cached/1", Some("client-id-3")).await;
    assert_eq!((id.as_str(), cache.as_str()), ("client-id-3", "HIT"));
    assert_eq!(seen.as_deref(), Some("client-id-2"));
    let (id, cache, _) = get("/cached/1", None).await;
    assert_eq!(cache, "HIT");
    assert!(is_generated_id(&id), "{id}");

    // stoa's own answers carry it too.
    let r = http
        .get(gw.url("/nowhere"))
        .header("x-request-id", "client-id-4")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(request_id_of(&r), "client-id-4");
    let r = http.get(gw.url("/nowhere")).send().await.unwrap();
    assert!(is_generated_id(&request_id_of(&r)));
}

/// Every `stoa_*` name in `text` (letters and underscores).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("stoa_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Whether the exposition has samples of `name` (a histogram's `_bucket`, `_sum` and
/// `_count` included) under a `# TYPE` line for its family.
fn exposed(text: &str, name: &str) -> bool {
    let family = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| {
            name.strip_suffix(suffix)
                .filter(|base| text.contains(&format!("# TYPE {base} histogram\n")))
        })
        .unwrap_or(name);
    let typed = text
        .lines()
        .any(|l| l.strip_prefix("# TYPE ").and_then(|t| t.split(' ').next()) == Some(family));
    let sampled = if family == name && text.contains(&format!("# TYPE {name} histogram\n")) {
        !series(text, &format!("{name}_count")).is_empty()
    } else {
        !series(text, name).is_empty()
    };
    typed && sampled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_only_series_the_live_gateway_exports() {
    let path = repo_path("dashboards/stoa-grafana.json");
    let dashboard = std::fs::read_to_string(&path).unwrap();
    let parsed: Value = serde_json::from_str(&dashboard)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    let panels = parsed["panels"].as_array().expect("no panels");
    assert!(!panels.is_empty());
    let names = metric_names(&dashboard);
    assert!(names.len() >= 7, "{names:?}");
    // Every query names only stoa series that exist.
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !metric_names(expr).is_empty(),
                "a query without a stoa series in {:?}: {expr}",
                panel["title"]
            );
        }
    }

    // The cluster panels' `stoa_cluster_*` series exist only on a gateway with `[cluster]`
    // (tests/cluster_cache.rs checks them there), the disk tier's `stoa_cache_disk_*` only
    // with `cache.disk` (tests/disk_tier.rs); every other series exists everywhere.
    let names: BTreeSet<String> = names
        .into_iter()
        .filter(|n| !n.starts_with("stoa_cluster_") && !n.starts_with("stoa_cache_disk_"))
        .collect();
    let scene = Scene::start().await;
    // Before any traffic every series but the request counter (its status label is only
    // known once a request is answered) is exported, at zero.
    let text = settled_metrics(&scene.gw).await;
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| n.as_str() != "stoa_requests_total" && !exposed(&text, n))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, absent from a fresh gateway's /metrics:\n{text}"
    );
    let http = reqwest::Client::new();
    assert_eq!(scene.get(&http, "/nope").await.0, 404);
    let text = settled_metrics(&scene.gw).await;
    let missing: Vec<&String> = names.iter().filter(|n| !exposed(&text, n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, absent from /metrics:\n{text}"
    );
}
