//! stoa as a real Prometheus server sees it: the shipped scrape configuration (checked by
//! promtool, and used with a 1 s interval) scrapes a running gateway in front of real demo
//! upstreams under a known traffic mix; then every expression of the Grafana dashboard is
//! evaluated through Prometheus's HTTP API and the key ones are compared with what was sent.
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool`): `make test` installs it
//! through scripts/install-promtool.sh. Without it these tests fail; they never skip.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    calls, demo_with, free_port, knobs, repo_path, sample, write_temp, x_cache, Api, DemoServer,
    Knobs, StoaProcess,
};
use serde_json::Value;
use stoa_demo::CLV_CUSTOMERS;

/// `STOA_<VAR>` if set, else `name` on `PATH`; a missing binary fails the test.
fn tool(var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return path.into();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: set {var} to its path or put it on PATH; \
                 run scripts/install-promtool.sh (as root) to install Debian's prometheus \
                 package (`make test` does)"
            )
        })
}

/// The shipped scrape configuration with every `scrape_interval` set to `interval` and the
/// admin target replaced by `target`.
fn shipped_config(interval: &str, target: &str) -> String {
    let text = std::fs::read_to_string(repo_path("deploy/prometheus.yml")).unwrap();
    assert!(text.contains("127.0.0.1:9901"), "{text}");
    text.lines()
        .map(|line| match line.split_once("scrape_interval:") {
            Some((indent, _)) => format!("{indent}scrape_interval: {interval}"),
            None => line.replace("127.0.0.1:9901", target),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn promtool_check_config(path: &Path) -> (bool, String) {
    let promtool = tool("STOA_PROMTOOL", "promtool");
    let out = Command::new(&promtool)
        .args(["check", "config"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

#[test]
fn the_shipped_scrape_config_is_valid_at_any_interval() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, report) = promtool_check_config(&repo_path("deploy/prometheus.yml"));
    assert!(ok, "promtool check config deploy/prometheus.yml: {report}");
    for interval in ["1s", "2s", "5s", "30s", "1m"] {
        let path = write_temp(
            dir.path(),
            &format!("prometheus-{interval}.yml"),
            &shipped_config(interval, "127.0.0.1:9901"),
        );
        let (ok, report) = promtool_check_config(&path);
        assert!(ok, "scrape_interval {interval}: {report}");
    }
}

/// A Prometheus server on an ephemeral port with a data directory of its own; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Prometheus {
    async fn start(config: &str) -> Prometheus {
        let binary = tool("STOA_PROMETHEUS", "prometheus");
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_temp(dir.path(), "prometheus.yml", config);
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let mut prometheus = Prometheus {
            child,
            port,
            dir,
            http: reqwest::Client::new(),
        };
        prometheus.wait_ready().await;
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("http://127.0.0.1:{}/-/ready", self.port);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("prometheus never became ready:\n{}", self.log());
    }

    /// An instant query through `/api/v1/query`, at `time` (Unix seconds) or now: the
    /// result vector as (labels, value).
    async fn query(&self, expr: &str, time: Option<f64>) -> Vec<(BTreeMap<String, String>, f64)> {
        let mut params = vec![("query", expr.to_string())];
        if let Some(t) = time {
            params.push(("time", format!("{t:.3}")));
        }
        let r = self
            .http
            .get(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query(&params)
            .send()
            .await
            .expect("query request failed");
        let body: Value = r.json().await.expect("query answer is not JSON");
        assert_eq!(body["status"], "success", "{expr}: {body}");
        let data = &body["data"];
        let rows = match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![serde_json::json!({"metric": {}, "value": data["result"]})],
            other => panic!("{expr}: unexpected result type {other:?}: {body}"),
        };
        rows.iter()
            .map(|row| {
                let labels = row["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let value = row["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("{expr}: bad sample {row}"));
                (labels, value)
            })
            .collect()
    }

    /// Waits until a scrape that started after `after` (Unix seconds) is stored; returns
    /// that scrape's timestamp.
    async fn scraped_after(&self, after: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rows = self.query(r#"max(timestamp(up{job="stoa"}))"#, None).await;
            if let Some(&(_, ts)) = rows.first() {
                if ts > after {
                    let up = self.query(r#"up{job="stoa"}"#, Some(ts)).await;
                    assert_eq!(up.len(), 1, "{up:?}");
                    assert_eq!(up[0].1, 1.0, "the scrape failed:\n{}", self.log());
                    return ts;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no scrape of stoa after {after}: {rows:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn upstream(name: &str, url: &str) -> String {
    format!("[upstreams.{name}]\nurl = \"{url}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n\n")
}

fn route(name: &str, path: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"{path}\"\nupstream = \"{upstream}\"\n{extra}\n\n"
    )
}

/// The upstreams and the gateway of the traffic mix.
struct Scene {
    restaurants: DemoServer,
    clv: DemoServer,
    _broken: DemoServer,
    _slow: DemoServer,
    gw: StoaProcess,
}

impl Scene {
    async fn start() -> Scene {
        let restaurants = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
        let clv = demo_with(Api::Clv, knobs(Api::Clv, 400)).await;
        let broken = demo_with(
            Api::Restaurants,
            Knobs {
                error_rate: 1.0,
                ..knobs(Api::Restaurants, 0)
            },
        )
        .await;
        // Slower than the 5 s timeout: cut at 5 s.
        let slow = demo_with(Api::Restaurants, knobs(Api::Restaurants, 6_000)).await;
        let to_restaurant = "rewrite = \"/api/restaurant/{id}\"";
        let config = [
            "[rate_limits.clv_misses]\nper_minute = 1\nburst = 3\napplies_to = \"misses\"\n\n"
                .to_string(),
            "[rate_limits.tight]\nper_minute = 1\nburst = 1\n\n".to_string(),
            upstream("restaurants", &restaurants.url()),
            upstream("clv", &clv.url()),
            upstream("broken", &broken.url()),
            upstream("slow", &slow.url()),
            route(
                "menu",
                "/restaurant/{id}",
                "restaurants",
                &format!("{to_restaurant}\ncache = {{ ttl = \"1s\" }}"),
            ),
            route(
                "clv",
                "/get_clv",
                "clv",
                "cache = { ttl = \"1h\", key_body = [\"customer_id\"] }\nrate_limit = \"clv_misses\"",
            ),
            route(
                "broken",
                "/broken/{id}",
                "broken",
                &format!("{to_restaurant}\ncache = {{ ttl = \"60s\" }}"),
            ),
            route("broken-pass", "/broken-pass/{id}", "broken", to_restaurant),
            route(
                "slow",
                "/slow/{id}",
                "slow",
                &format!("{to_restaurant}\ncache = {{ ttl = \"60s\" }}"),
            ),
            route(
                "pass",
                "/pass/{id}",
                "restaurants",
                &format!("{to_restaurant}\nrate_limit = \"tight\""),
            ),
        ]
        .concat();
        let gw = StoaProcess::start(&config).await;
        Scene {
            restaurants,
            clv,
            _broken: broken,
            _slow: slow,
            gw,
        }
    }
}

/// What the clients saw: answers by (route, cache label, status).
#[derive(Default)]
struct Sent(BTreeMap<(String, String, u16), u64>);

impl Sent {
    fn add(&mut self, route: &str, status: u16, x_cache: &str) {
        // The `cache` label is the X-Cache value in lower case; no X-Cache: not consulted.
        let cache = if x_cache.is_empty() {
            "none".to_string()
        } else {
            x_cache.to_ascii_lowercase()
        };
        *self.0.entry((route.into(), cache, status)).or_default() += 1;
    }

    fn count(&self, which: impl Fn(&str, &str, u16) -> bool) -> f64 {
        self.0
            .iter()
            .filter(|((r, c, s), _)| which(r, c, *s))
            .map(|(_, n)| *n as f64)
            .sum()
    }
}

async fn get(http: &reqwest::Client, url: String) -> (u16, String) {
    let r = http.get(url).send().await.expect("request failed");
    let out = (r.status().as_u16(), x_cache(&r));
    r.bytes().await.unwrap();
    out
}

async fn get_clv(http: &reqwest::Client, url: String, customer: &str) -> (u16, String) {
    let r = http
        .get(url)
        .header("content-type", "application/json")
        .body(format!(r#"{{"customer_id":"{customer}"}}"#))
        .send()
        .await
        .expect("request failed");
    let out = (r.status().as_u16(), x_cache(&r));
    r.bytes().await.unwrap();
    out
}

/// Answers the cache gives with its own header (errors carry no X-Cache): the expected label.
fn label_of(route: &str, status: u16, x_cache: String) -> String {
    match (route, status) {
        ("broken", 502) | ("slow", 504) => "MISS".into(),
        _ => x_cache,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// Notes `what` in `problems` unless `got` is `want` (up to rounding).
fn check(problems: &mut Vec<String>, what: &str, got: f64, want: f64) {
    if !close(got, want) {
        problems.push(format!("{what}: {got}, expected {want}"));
    }
}

/// Every `expr` of the dashboard's panels, with the panel title.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_path("dashboards/stoa-grafana.json")).unwrap();
    let parsed: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in parsed["panels"].as_array().expect("no panels") {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.clone(), expr.to_string()));
            }
        }
    }
    assert!(out.len() >= 10, "{out:?}");
    out
}

/// The range every rate is taken over: longer than the whole test, so `rate(x[5m]) * 300`
/// is the exact increase (series start at zero, and queries are evaluated at a scrape).
const WINDOW: &str = "5m";
const WINDOW_SECS: f64 = 300.0;

/// A dashboard expression with Grafana's variables given values: every instance, the
/// routes matching `route`, and the fixed window.
fn substitute(expr: &str, route: &str) -> String {
    expr.replace("$__rate_interval", WINDOW)
        .replace("$instance", ".*")
        .replace("$route", route)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sees_exactly_the_traffic_sent() {
    let scene = Scene::start().await;
    let target = format!("127.0.0.1:{}", scene.gw.admin_port);
    let prometheus = Prometheus::start(&shipped_config("1s", &target)).await;
    // One scrape before any request: every series that exists at zero is seen at zero.
    prometheus.scraped_after(0.0).await;

    let http = reqwest::Client::new();
    let url = |path: &str| scene.gw.url(path);
    let mut sent = Sent::default();

    // Cut at the upstream's 5 s timeout, while everything else runs.
    let slow = tokio::spawn({
        let (http, url) = (http.clone(), url("/slow/bikupan"));
        async move { get(&http, url).await }
    });

    // A miss, then hits.
    for expected in ["MISS", "HIT", "HIT", "HIT"] {
        let (status, cache) = get(&http, url("/restaurant/bikupan")).await;
        assert_eq!((status, cache.as_str()), (200, expected));
        sent.add("menu", status, &cache);
    }

    // A coalesced burst on one cold CLV key: one fetch for all of it.
    let burst: Vec<_> = (0..50)
        .map(|_| {
            let (http, url) = (http.clone(), url("/get_clv"));
            tokio::spawn(async move { get_clv(&http, url, CLV_CUSTOMERS[0]).await })
        })
        .collect();
    let mut coalesced = 0.0;
    for task in burst {
        let (status, cache) = task.await.unwrap();
        assert_eq!(status, 200, "{cache}");
        coalesced += f64::from(u8::from(cache == "COALESCED"));
        sent.add("clv", status, &cache);
    }
    assert_eq!(sent.count(|r, c, _| r == "clv" && c == "miss"), 1.0);
    assert!(coalesced >= 10.0, "the burst barely coalesced: {coalesced}");
    assert_eq!(calls(&scene.clv, "GET /get_clv"), 1);
    for _ in 0..5 {
        let (status, cache) = get_clv(&http, url("/get_clv"), CLV_CUSTOMERS[0]).await;
        assert_eq!((status, cache.as_str()), (200, "HIT"));
        sent.add("clv", status, &cache);
    }
    // Misses of other keys: two fit in the policy's burst of three, then 429.
    for (customer, expected) in CLV_CUSTOMERS[1..5].iter().zip([200, 200, 429, 429]) {
        let (status, cache) = get_clv(&http, url("/get_clv"), customer).await;
        assert_eq!(status, expected, "{customer}");
        sent.add("clv", status, &cache);
    }

    // Pass-through: a burst of one, then 429.
    for expected in [200, 429] {
        let (status, cache) = get(&http, url("/pass/bikupan")).await;
        assert_eq!((status, cache.as_str()), (expected, ""));
        sent.add("pass", status, &cache);
    }
    // The upstream answers 500: passed on as it is, on the cached route too.
    let (status, cache) = get(&http, url("/broken/bikupan")).await;
    assert_eq!(status, 500);
    sent.add("broken", status, &label_of("broken", status, cache));
    let (status, cache) = get(&http, url("/broken-pass/bikupan")).await;
    assert_eq!((status, cache.as_str()), (500, ""));
    sent.add("broken-pass", status, &cache);
    // No route.
    let (status, _) = get(&http, url("/nope")).await;
    assert_eq!(status, 404);
    sent.add("unmatched", status, "");

    let (status, cache) = slow.await.unwrap();
    assert_eq!(status, 504);
    sent.add("slow", status, &label_of("slow", status, cache));
    // The menu entry (1 s) has expired: fetched again, replacing it in the store.
    let (status, cache) = get(&http, url("/restaurant/bikupan")).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"));
    sent.add("menu", status, &cache);
    assert_eq!(calls(&scene.restaurants, "GET /api/restaurant/bikupan"), 3);

    // Every request logged, then one more scrape; queries are evaluated at that scrape.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&scene.gw.metrics().await, "stoa_requests_in_flight") != Some(0.0) {
        assert!(Instant::now() < deadline, "requests still in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at = Some(prometheus.scraped_after(unix_now()).await);

    let mut problems = Vec::new();

    // Requests by (route, cache, status): exactly what the clients saw.
    let rows = prometheus
        .query(
            &format!("sum by (route, cache, status) (increase(stoa_requests_total[{WINDOW}]))"),
            at,
        )
        .await;
    let mut seen = BTreeMap::new();
    for (labels, value) in rows {
        if value != 0.0 {
            let key = (
                labels["route"].clone(),
                labels["cache"].clone(),
                labels["status"].parse::<u16>().unwrap_or(0),
            );
            seen.insert(key, value);
        }
    }
    let expected: BTreeMap<_, f64> = sent.0.iter().map(|(k, v)| (k.clone(), *v as f64)).collect();
    if seen.len() != expected.len() || seen.iter().any(|(k, v)| !close(*v, expected[k])) {
        problems.push(format!(
            "increase(stoa_requests_total) by route, cache, status:\n  sent: {expected:?}\n  seen: {seen:?}"
        ));
    }

    let scalar = |expr: String| {
        let prometheus = &prometheus;
        async move {
            let rows = prometheus.query(&expr, at).await;
            assert_eq!(rows.len(), 1, "{expr}: {rows:?}");
            rows[0].1
        }
    };
    check(
        &mut problems,
        "coalesced waiters",
        scalar(format!(
            "sum(increase(stoa_coalesced_waiters_total{{route=\"clv\"}}[{WINDOW}]))"
        ))
        .await,
        coalesced,
    );
    check(
        &mut problems,
        "clv fetches (the burst cost one)",
        scalar(format!(
            "sum(increase(stoa_upstream_fetches_total{{route=\"clv\"}}[{WINDOW}]))"
        ))
        .await,
        3.0,
    );
    for (route, outcome, want) in [
        ("menu", "ok", 2.0),
        ("pass", "ok", 1.0),
        ("broken", "error", 1.0),
        ("broken-pass", "error", 1.0),
        ("slow", "timeout", 1.0),
    ] {
        check(
            &mut problems,
            &format!("fetches of {route} with outcome {outcome}"),
            scalar(format!(
                "sum(increase(stoa_upstream_fetches_total{{route=\"{route}\",outcome=\"{outcome}\"}}[{WINDOW}]))"
            ))
            .await,
            want,
        );
    }

    // Every dashboard expression returns data; the key ones match the traffic.
    let cached_requests = sent.count(|_, c, _| c != "none");
    let hits = sent.count(|_, c, _| c == "hit");
    let served_without_fetch = sent.count(|_, c, _| matches!(c, "hit" | "stale" | "coalesced"));
    for (title, expr) in dashboard_queries() {
        // The Redis panel's series exist only on a gateway with `[cluster]` (this one has
        // none); tests/cluster_cache.rs checks them on one that has. The disk tier's only
        // with `cache.disk` (tests/disk_tier.rs).
        if expr.contains("stoa_cluster_") || expr.contains("stoa_cache_disk_") {
            continue;
        }
        let all = substitute(&expr, ".*");
        let rows = prometheus.query(&all, at).await;
        if rows.is_empty() {
            problems.push(format!("{title}: no data for {all}"));
            continue;
        }
        let one = |rows: &[(BTreeMap<String, String>, f64)]| rows.first().map_or(f64::NAN, |r| r.1);
        let by = |rows: &[(BTreeMap<String, String>, f64)], label: &str, value: &str| {
            rows.iter()
                .filter(|(l, _)| l.get(label).map(String::as_str) == Some(value))
                .map(|(_, v)| *v)
                .sum::<f64>()
        };
        let rate_of = |n: f64| n / WINDOW_SECS;
        if expr.starts_with("sum(rate(stoa_requests_total") && expr.contains("cache=\"hit\"}") {
            check(
                &mut problems,
                &format!("{title}: hit ratio"),
                one(&rows),
                hits / cached_requests,
            );
        } else if expr.contains("cache=~\"hit|stale|coalesced\"") {
            check(
                &mut problems,
                &format!("{title}: served without a fetch of their own"),
                one(&rows),
                served_without_fetch / cached_requests,
            );
        } else if expr.starts_with("sum by (route) (rate(stoa_requests_total") {
            for route in [
                "menu",
                "clv",
                "pass",
                "broken",
                "broken-pass",
                "slow",
                "unmatched",
            ] {
                check(
                    &mut problems,
                    &format!("{title}: {route}"),
                    by(&rows, "route", route),
                    rate_of(sent.count(|r, _, _| r == route)),
                );
            }
        } else if expr.starts_with("sum by (lane) (rate(stoa_requests_total") {
            // Every request has a lane; these are all HTTP/1 and plain, so stoa answers
            // or forwards each.
            let all: f64 = rows.iter().map(|(_, v)| *v).sum();
            check(
                &mut problems,
                &format!("{title}: every request"),
                all,
                rate_of(sent.count(|_, _, _| true)),
            );
            check(
                &mut problems,
                &format!("{title}: answer and forward"),
                by(&rows, "lane", "answer") + by(&rows, "lane", "forward"),
                all,
            );
        } else if expr.starts_with("sum(rate(stoa_requests_total") {
            check(
                &mut problems,
                &format!("{title}: requests on cached routes"),
                one(&rows),
                rate_of(cached_requests),
            );
        } else if expr.starts_with("sum(rate(stoa_upstream_fetches_total") {
            // menu 2, clv 3, broken 1, slow 1; not the pass-through routes' 2.
            check(
                &mut problems,
                &format!("{title}: fetches of cached routes"),
                one(&rows),
                rate_of(7.0),
            );
        } else if expr.starts_with("sum(rate(stoa_coalesced_waiters_total") {
            check(
                &mut problems,
                &format!("{title}: coalesced"),
                one(&rows),
                rate_of(coalesced),
            );
        } else if expr.contains("stoa_rate_limited_total") {
            check(
                &mut problems,
                &format!("{title}: clv"),
                by(&rows, "route", "clv"),
                rate_of(2.0),
            );
            check(
                &mut problems,
                &format!("{title}: pass"),
                by(&rows, "route", "pass"),
                rate_of(1.0),
            );
        } else if expr.contains("stoa_cache_evictions_total") {
            check(
                &mut problems,
                &format!("{title}: evictions"),
                one(&rows),
                0.0,
            );
        } else if expr.contains("stoa_cache_entries") {
            // menu, clv (3 customers), the 502/504 are not stored.
            check(&mut problems, &format!("{title}: entries"), one(&rows), 4.0);
        } else if expr.contains("stoa_requests_in_flight") {
            check(
                &mut problems,
                &format!("{title}: in flight"),
                one(&rows),
                0.0,
            );
        } else if expr.starts_with("sum by (upstream, outcome)") {
            for (upstream, outcome, n) in [
                ("restaurants", "ok", 3.0),
                ("clv", "ok", 3.0),
                ("broken", "error", 2.0),
                ("slow", "timeout", 1.0),
            ] {
                let got = rows
                    .iter()
                    .filter(|(l, _)| l["upstream"] == upstream && l["outcome"] == outcome)
                    .map(|(_, v)| *v)
                    .sum();
                check(
                    &mut problems,
                    &format!("{title}: {upstream} {outcome}"),
                    got,
                    rate_of(n),
                );
            }
        } else if expr.starts_with("histogram_quantile(0.99, sum by (le, cache)") {
            // The request cut at the 5 s timeout: its p99 is within the (5, 5.5] bucket.
            let slow = prometheus.query(&substitute(&expr, "slow"), at).await;
            let p99 = by(&slow, "cache", "miss");
            if !(5.0..=5.5).contains(&p99) {
                problems.push(format!(
                    "{title}: p99 of the request cut at 5 s reads {p99} s"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "Prometheus disagrees with the traffic sent:\n{}\n\nexposition:\n{}",
        problems.join("\n"),
        scene.gw.metrics().await
    );
}
