//! The status page of the admin listener (`/status`, `/status.json`): opened in a real
//! headless Chromium over WebDriver (`chromium` and `chromedriver`, which
//! `scripts/install-deps.sh` installs), and its JSON view read against `/metrics`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, sample, serve_heads, text_answer, StoaProcess};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const TOKEN: &str = "status-page-token";

/// A `[[routes]]` entry for GET.
fn route(name: &str, path: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"{path}\"\nupstream = \"origin\"\n{extra}\n\n"
    )
}

/// The admin token, a tight rate limit, the origin and three routes (two cached, one
/// pass-through); `more` adds routes.
fn config(origin: &str, more: &str) -> String {
    format!(
        "token = \"{TOKEN}\"\n\n\
         [rate_limits.tight]\nper_minute = 1\nburst = 1\n\n\
         [upstreams.origin]\nurl = \"{origin}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n\n{}{}{}{more}",
        route("alpha", "/alpha/{id}", "cache = { ttl = \"60s\" }"),
        route(
            "beta",
            "/beta/{id}",
            "cache = { ttl = \"60s\" }\nrate_limit = \"tight\""
        ),
        route("pass", "/pass/{id}", ""),
    )
}

/// A hand-written origin: `200 hello <path>` for every request.
async fn origin() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    serve_heads(listener, |head| async move {
        text_answer(200, "", &format!("hello {}", common::path_of(&head)))
    });
    url
}

async fn get(url: &str) -> reqwest::Response {
    reqwest::get(url).await.expect("request failed")
}

/// chromedriver on a free port, and one headless Chromium session through it; both end
/// when dropped (or at [`Browser::quit`]).
struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver"))
        else {
            panic!("chromium and chromedriver are needed: run scripts/install-deps.sh");
        };
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            client: None,
            driver,
            _profile: profile,
        };
        let webdriver = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while reqwest::get(format!("{webdriver}/status")).await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let user_data = format!("--user-data-dir={}", browser._profile.path().display());
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1400,900",
            &user_data,
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium, "args": args}),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&webdriver)
            .await
            .expect("no WebDriver session");
        browser.client = Some(client);
        browser
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("session open")
    }

    /// Ends the session (and Chromium with it), then chromedriver.
    async fn quit(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }

    /// The rendered page: each route's row as `{field: text}`, the error rows, the header's
    /// last reload and how many times the page has refreshed.
    async fn rendered(&self) -> Value {
        self.client()
            .execute(
                r##"
                const rows = {};
                for (const tr of document.querySelectorAll("#routes tr[data-route]")) {
                  const cells = {};
                  for (const td of tr.querySelectorAll("td[data-field]")) {
                    cells[td.dataset.field] = td.textContent;
                  }
                  rows[tr.dataset.route] = cells;
                }
                const errors = [...document.querySelectorAll("#errors tr")].map((tr) => ({
                  status: tr.dataset.status,
                  kind: tr.dataset.kind,
                  request: tr.querySelector('[data-field="request"]').textContent,
                }));
                return {
                  routes: rows,
                  errors,
                  reload: document.getElementById("reload").textContent,
                  refreshes: Number(document.body.dataset.refreshes),
                };
                "##,
                vec![],
            )
            .await
            .expect("script failed")
    }

    /// Waits (up to 20 s) until the rendered page satisfies `done`; the page then.
    async fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let page = self.rendered().await;
            if done(&page) {
                return page;
            }
            assert!(
                Instant::now() < deadline,
                "page never showed {what}: {page:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| format!("{dir}/{name}"))
        .find(|path| std::path::Path::new(path).is_file())
}

fn field<'a>(page: &'a Value, route: &str, field: &str) -> &'a str {
    page["routes"][route][field].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_live_counts_errors_and_a_reloaded_route() {
    let origin = origin().await;
    let gw = StoaProcess::start(&config(&origin, "")).await;

    // alpha: 3 misses and 7 hits, one after another.
    for (id, times) in [("1", 4), ("2", 3), ("3", 3)] {
        for _ in 0..times {
            let r = get(&gw.url(&format!("/alpha/{id}"))).await;
            assert_eq!(r.status(), 200);
        }
    }
    // beta: a miss, then the policy's 429.
    assert_eq!(get(&gw.url("/beta/1")).await.status(), 200);
    assert_eq!(get(&gw.url("/beta/1")).await.status(), 429);
    // pass: two pass-through requests.
    for _ in 0..2 {
        assert_eq!(get(&gw.url("/pass/1")).await.status(), 200);
    }
    // No route: stoa's 404.
    assert_eq!(get(&gw.url("/nowhere")).await.status(), 404);

    let browser = Browser::start().await;
    browser
        .client()
        .goto(&gw.admin_url("/status"))
        .await
        .unwrap();
    let title = browser.client().title().await.unwrap();
    assert_eq!(title, "stoa status");
    let page = browser
        .wait_for("the traffic", |p| {
            field(p, "alpha", "requests") == "10"
                && field(p, "beta", "requests") == "2"
                && field(p, "pass", "requests") == "2"
                && field(p, "unmatched", "requests") == "1"
        })
        .await;
    assert_eq!(field(&page, "alpha", "miss"), "3", "{page:#}");
    assert_eq!(field(&page, "alpha", "hit"), "7", "{page:#}");
    assert_eq!(field(&page, "alpha", "coalesced"), "0", "{page:#}");
    assert_eq!(field(&page, "alpha", "stale"), "0", "{page:#}");
    assert_eq!(field(&page, "alpha", "bypass"), "0", "{page:#}");
    assert_eq!(field(&page, "alpha", "hit_ratio"), "70.0%", "{page:#}");
    assert_eq!(field(&page, "alpha", "kind"), "cached", "{page:#}");
    assert_ne!(field(&page, "alpha", "p50"), "–", "{page:#}");
    assert_ne!(field(&page, "alpha", "p99"), "–", "{page:#}");
    assert_eq!(field(&page, "alpha", "upstream_errors"), "0", "{page:#}");
    assert_eq!(field(&page, "beta", "miss"), "1", "{page:#}");
    assert_eq!(field(&page, "beta", "bypass"), "1", "{page:#}");
    assert_eq!(field(&page, "beta", "rate_limited"), "1", "{page:#}");
    assert_eq!(field(&page, "beta", "4xx"), "1", "{page:#}");
    assert_eq!(field(&page, "pass", "kind"), "pass", "{page:#}");
    assert_eq!(field(&page, "pass", "hit"), "–", "{page:#}");
    assert_eq!(field(&page, "unmatched", "4xx"), "1", "{page:#}");
    let errors = page["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e["status"] == "404"
            && e["kind"] == "not_found"
            && e["request"] == "GET /nowhere"),
        "{page:#}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e["status"] == "429" && e["request"] == "GET /beta/1"),
        "{page:#}"
    );
    // The cache card: three alpha entries and beta's.
    let entries = browser
        .client()
        .find(Locator::Css("#cache-entries"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(entries, "4");

    let png = browser.client().screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    if let Some(path) = std::env::var_os("STOA_STATUS_SCREENSHOT") {
        std::fs::write(path, &png).unwrap();
    }

    // A reload adds a route: the open page shows it without being reopened.
    let refreshes = page["refreshes"].as_u64().unwrap();
    gw.rewrite_config(&config(&origin, &route("gamma", "/gamma/{id}", "")));
    let r = reqwest::Client::new()
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(get(&gw.url("/gamma/1")).await.status(), 200);
    let page = browser
        .wait_for("the new route", |p| {
            field(p, "gamma", "requests") == "1"
                && p["reload"].as_str().unwrap_or("").ends_with(" ok")
        })
        .await;
    assert!(page["refreshes"].as_u64().unwrap() > refreshes);
    assert_eq!(field(&page, "alpha", "requests"), "10", "{page:#}");
    browser.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_view_agrees_with_metrics() {
    let origin = origin().await;
    let gw = StoaProcess::start(&config(&origin, "")).await;
    for (id, times) in [("1", 4), ("2", 3), ("3", 3)] {
        for _ in 0..times {
            assert_eq!(get(&gw.url(&format!("/alpha/{id}"))).await.status(), 200);
        }
    }
    assert_eq!(get(&gw.url("/beta/1")).await.status(), 200);
    assert_eq!(get(&gw.url("/beta/1")).await.status(), 429);
    assert_eq!(get(&gw.url("/pass/1")).await.status(), 200);
    assert_eq!(get(&gw.url("/nowhere")).await.status(), 404);

    // The metrics of the last request are recorded just after its answer: wait for them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, metrics) = loop {
        let status: Value = get(&gw.admin_url("/status.json"))
            .await
            .json()
            .await
            .unwrap();
        let metrics = gw.metrics().await;
        let unmatched =
            r#"stoa_requests_total{cache="none",lane="answer",route="unmatched",status="404"}"#;
        if sample(&metrics, unmatched) == Some(1.0) && status["routes"][3]["requests"] == 1 {
            break (status, metrics);
        }
        assert!(Instant::now() < deadline, "{status:#}\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let routes: Vec<&str> = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(routes, ["alpha", "beta", "pass", "unmatched"]);
    let route = |name: &str| {
        status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
            .clone()
    };
    // Summed over the lanes, as the page shows a route's requests.
    let requests = |route: &str, cache: &str, code: u16| {
        let lanes = [
            "answer",
            "forward",
            "proxy:off",
            "proxy:h2",
            "proxy:framing",
            "proxy:headers",
            "proxy:target",
        ];
        lanes
            .iter()
            .map(|lane| {
                let series = format!(
                    r#"stoa_requests_total{{cache="{cache}",lane="{lane}",route="{route}",status="{code}"}}"#
                );
                sample(&metrics, &series).unwrap_or(0.0)
            })
            .sum::<f64>() as u64
    };
    let alpha = route("alpha");
    assert_eq!(alpha["cache"]["hit"], json!(requests("alpha", "hit", 200)));
    assert_eq!(
        alpha["cache"]["miss"],
        json!(requests("alpha", "miss", 200))
    );
    assert_eq!(alpha["cache"]["hit"], 7);
    assert_eq!(alpha["cache"]["miss"], 3);
    assert_eq!(alpha["requests"], 10);
    assert_eq!(alpha["hit_ratio"], 0.7);
    assert_eq!(alpha["statuses"]["200"], 10);
    assert_eq!(
        alpha["upstream_fetches"]["ok"],
        json!(sample(
            &metrics,
            r#"stoa_upstream_fetches_total{outcome="ok",route="alpha",upstream="origin"}"#
        )
        .unwrap() as u64)
    );
    let beta = route("beta");
    assert_eq!(
        beta["cache"]["bypass"],
        json!(requests("beta", "bypass", 429))
    );
    assert_eq!(beta["cache"]["bypass"], 1);
    assert_eq!(
        beta["rate_limited"],
        json!(sample(
            &metrics,
            r#"stoa_rate_limited_total{policy="tight",route="beta"}"#
        )
        .unwrap() as u64)
    );
    assert_eq!(beta["rate_limited"], 1);
    assert_eq!(
        route("pass")["requests"],
        json!(requests("pass", "none", 200))
    );
    assert_eq!(route("unmatched")["statuses"]["404"], 1);
    for (key, series) in [
        ("entries", "stoa_cache_entries"),
        ("bytes", "stoa_cache_bytes"),
        ("evictions", "stoa_cache_evictions_total"),
    ] {
        assert_eq!(
            status["cache"][key],
            json!(sample(&metrics, series).unwrap() as u64),
            "{key}"
        );
    }
    assert_eq!(status["cache"]["entries"], 4);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(status["config"]["version"], version);
    assert!(metrics.contains(&format!("stoa_build_info{{version=\"{version}\"}} 1")));
    assert_eq!(status["config"]["last_reload"], Value::Null);
    assert_eq!(status["cluster"], Value::Null);
    let upstreams = status["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 1);
    assert_eq!(upstreams[0]["name"], "origin");
    assert_eq!(upstreams[0]["in_flight"], 0);
    let recent = status["errors"]["recent"].as_array().unwrap();
    assert_eq!(recent[0]["status"], 404, "{recent:?}");
    assert_eq!(recent[0]["path"], "/nowhere");
    assert_eq!(recent[1]["status"], 429, "{recent:?}");
    assert_eq!(recent[1]["kind"], "rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_needs_the_same_access_as_metrics() {
    let origin = origin().await;
    let gw = StoaProcess::start(&config(&origin, "")).await;
    let client = reqwest::Client::new();
    for path in ["/metrics", "/status", "/status.json"] {
        // Open without the admin token, as /metrics is, even with one configured.
        let r = client.get(gw.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-store", "{path}");
        let r = client.head(gw.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "HEAD {path}");
        // Read only, as /metrics is.
        for method in [reqwest::Method::POST, reqwest::Method::DELETE] {
            let r = client
                .request(method.clone(), gw.admin_url(path))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 405, "{method} {path}");
            assert_eq!(r.headers()["allow"], "GET, HEAD", "{method} {path}");
        }
        // Not on the proxy listener.
        assert_eq!(get(&gw.url(path)).await.status(), 404, "{path}");
    }
    let r = get(&gw.admin_url("/status")).await;
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let page = r.text().await.unwrap();
    assert!(page.len() <= 150 * 1024, "{} bytes", page.len());
    // Self-contained: no external script, stylesheet, font or image.
    for outside in ["src=", "href=", "@import", "url(", "http://", "https://"] {
        assert!(!page.contains(outside), "the page loads {outside}");
    }
    let r = get(&gw.admin_url("/status.json")).await;
    assert_eq!(r.headers()["content-type"], "application/json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_view_answers_with_two_hundred_routes() {
    let origin = origin().await;
    let mut rest = format!(
        "[upstreams.origin]\nurl = \"{origin}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n\n"
    );
    for i in 0..200 {
        let cache = if i % 2 == 0 {
            "cache = { ttl = \"60s\" }"
        } else {
            ""
        };
        rest.push_str(&route(
            &format!("r{i:03}"),
            &format!("/r{i:03}/{{id}}"),
            cache,
        ));
    }
    let gw = StoaProcess::start(&rest).await;
    assert_eq!(get(&gw.url("/r007/x")).await.status(), 200);
    let r = get(&gw.admin_url("/status.json")).await;
    assert_eq!(r.status(), 200);
    let status: Value = r.json().await.unwrap();
    let routes = status["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 201, "200 routes and the unmatched requests");
    assert_eq!(status["config"]["routes"], 200);
    assert_eq!(routes[0]["name"], "r000");
    assert_eq!(routes[0]["kind"], "cached");
    assert_eq!(routes[199]["name"], "r199");
    assert_eq!(routes[199]["kind"], "pass");
    assert_eq!(routes[200]["name"], "unmatched");
}
