//! Aggregate routes end to end: legs through stoa's own routes and caches, fan-out,
//! failure policies and deadlines.

mod common;

use std::time::{Duration, Instant};

use common::{calls, demo_with, knobs, x_cache, Api, DemoServer, StoaProcess};
use serde_json::{json, Value};

const CUSTOMER: &str = "450e1c2cbd21687780153995f1be0c23";

/// Restaurant routes (cached), the menu and lunch aggregates, and `extra` routes first
/// (so a test can send one restaurant elsewhere).
fn config(menus_url: &str, on_leg_error: &str, leg_timeout: &str, extra: &str) -> String {
    format!(
        r#"
[upstreams.menus]
url = "{menus_url}"

[upstreams.dead]
url = "http://127.0.0.1:{dead}"
connect_timeout = "200ms"
{extra}
[[routes]]
name = "restaurants"
methods = ["GET"]
path = "/restaurants"
upstream = "menus"
rewrite = "/api/restaurant"
cache = {{ ttl = "60s" }}

[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{{id}}"
upstream = "menus"
rewrite = "/api/restaurant/{{id}}"
cache = {{ ttl = "30s" }}

[[routes]]
name = "menu"
methods = ["GET"]
path = "/menu/{{name}}"
respond = {{ name = "{{restaurant.name}}", region = "{{restaurant.region}}", dishes = "{{menu.menu[*].dish}}", menu_url = "{{restaurant.menuUrl}}", url = "{{restaurant.homepage}}", map_url = "{{menu.map_url}}" }}

[[routes.legs]]
name = "restaurant"
path = "/restaurants"
pick = {{ from = "/restaurants", where = "name", equals = "{{name}}" }}

[[routes.legs]]
name = "menu"
path = "/restaurant/{{restaurant.identifier}}"
pick = "/restaurant"

[[routes]]
name = "lunch"
methods = ["GET"]
path = "/lunch/{{region}}"
on_leg_error = "{on_leg_error}"
deadline = "1s"
respond = {{ region = "{{region}}", restaurants = "{{menus}}" }}

[[routes.legs]]
name = "list"
path = "/restaurants"
pick = {{ from = "/restaurants", where = "region", equals = "{{region}}", all = true }}

[[routes.legs]]
name = "menus"
path = "/restaurant/{{item.identifier}}"
for_each = "list"
pick = "/restaurant"
timeout = "{leg_timeout}"
"#,
        dead = common::free_port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_menu_of_a_restaurant_by_name_costs_one_list_and_one_menu_call() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 100)).await;
    let gw = StoaProcess::start(&config(&up.url(), "fail", "3s", "")).await;
    let http = reqwest::Client::new();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (http, url) = (http.clone(), gw.url("/menu/Restaurang%20Bikupan"));
            tokio::spawn(async move {
                let r = http.get(url).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let (status, menu) = &answers[0];
    assert_eq!(*status, 200);
    assert!(
        answers.iter().all(|a| a == &answers[0]),
        "200 identical answers"
    );
    assert_eq!(menu["name"], "Restaurang Bikupan");
    assert_eq!(menu["region"], "Uppsala");
    assert!(menu["dishes"].as_array().unwrap().len() >= 3, "{menu}");
    assert!(menu["dishes"][0].is_string());
    for field in ["menu_url", "url", "map_url"] {
        assert!(
            menu[field].as_str().unwrap().starts_with("http"),
            "{field}: {menu}"
        );
    }
    assert_eq!(calls(&up, "GET /api/restaurant"), 1, "one list call");
    assert_eq!(
        calls(&up, "GET /api/restaurant/bikupan"),
        1,
        "one menu call"
    );
    assert_eq!(up.stats().total, 2);

    // Names match case-insensitively; the merged answer is itself cached.
    let r = http
        .get(gw.url("/menu/restaurang%20BIKUPAN"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(gw.url("/menu/Restaurang%20Bikupan"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
    // The legs shared their entries with the direct routes.
    let r = http
        .get(gw.url("/restaurant/bikupan"))
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(up.stats().total, 2);

    // An unknown name: 404 JSON listing the names.
    let r = http.get(gw.url("/menu/Nowhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_found");
    assert_eq!(v["names"].as_array().unwrap().len(), 13);
    assert!(v["names"]
        .as_array()
        .unwrap()
        .contains(&json!("Sven Dufva")));
}

/// The identifiers of a region, from the upstream itself.
async fn identifiers(up: &DemoServer, region: &str) -> Vec<String> {
    let list: Value = reqwest::get(format!("{}/api/restaurant", up.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    up.reset_stats();
    list["restaurants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["region"] == region)
        .map(|r| r["identifier"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lunch_fans_out_to_exactly_the_restaurants_of_a_region() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 50)).await;
    let uppsala = identifiers(&up, "Uppsala").await;
    assert!(uppsala.len() >= 3);
    let gw = StoaProcess::start(&config(&up.url(), "fail", "3s", "")).await;
    let r = reqwest::get(gw.url("/lunch/Uppsala")).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["region"], "Uppsala");
    assert_eq!(v["restaurants"].as_array().unwrap().len(), uppsala.len());
    let stats = up.stats();
    let menu_calls: Vec<&String> = stats
        .paths
        .keys()
        .filter(|p| p.starts_with("GET /api/restaurant/"))
        .collect();
    assert_eq!(menu_calls.len(), uppsala.len(), "{menu_calls:?}");
    for id in &uppsala {
        assert_eq!(calls(&up, &format!("GET /api/restaurant/{id}")), 1, "{id}");
    }
    assert!(v.get("errors").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_leg_is_named_under_errors_with_partial_and_fails_the_whole_with_fail() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let uppsala = identifiers(&up, "Uppsala").await;
    let broken = uppsala[1].clone();
    // One Uppsala restaurant's menu route leads to an upstream that is down.
    let extra = format!(
        "\n[[routes]]\nname = \"broken\"\nmethods = [\"GET\"]\npath = \"/restaurant/{broken}\"\nupstream = \"dead\"\n"
    );

    let gw = StoaProcess::start(&config(&up.url(), "partial", "3s", &extra)).await;
    let r = reqwest::get(gw.url("/lunch/Uppsala")).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let errors = v["errors"].as_object().expect("an errors object");
    assert_eq!(errors.len(), 1, "{v}");
    assert_eq!(errors.keys().next().unwrap(), "menus[1]");
    let restaurants = v["restaurants"].as_array().unwrap();
    assert_eq!(restaurants.len(), uppsala.len());
    assert!(restaurants[1].is_null());
    assert_eq!(
        restaurants.iter().filter(|r| !r.is_null()).count(),
        uppsala.len() - 1
    );
    drop(gw);

    let gw = StoaProcess::start(&config(&up.url(), "fail", "3s", &extra)).await;
    let r = reqwest::get(gw.url("/lunch/Uppsala")).await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "upstream_failed");
    assert!(v["message"].as_str().unwrap().contains("menus[1]"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leg_timeout_ends_the_aggregate_within_the_deadline() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let gw = StoaProcess::start(&config(&up.url(), "fail", "300ms", "")).await;
    let http = reqwest::Client::new();
    // The list is cached first; then the menus hang.
    assert_eq!(
        http.get(gw.url("/restaurants"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    up.set_knobs(knobs(Api::Restaurants, 5_000));
    let started = Instant::now();
    let r = http.get(gw.url("/lunch/Solna")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no answer within 300 ms"),
        "{v}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "answered after {took:?} (deadline 1 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_template_builds_the_clv_call_and_shares_its_cache_entry() {
    let clv = demo_with(Api::Clv, knobs(Api::Clv, 50)).await;
    let config = format!(
        r#"
[upstreams.clv]
url = "{}"

[[routes]]
name = "clv"
methods = ["GET"]
path = "/get_clv"
upstream = "clv"
cache = {{ ttl = "1h", key_body = ["customer_id"] }}

[[routes]]
name = "customer-clv"
methods = ["GET"]
path = "/customers/{{customer_id}}/clv"
respond = "{{clv}}"

[[routes.legs]]
name = "clv"
path = "/get_clv"
body = {{ customer_id = "{{customer_id}}" }}
"#,
        clv.url()
    );
    let gw = StoaProcess::start(&config).await;
    let http = reqwest::Client::new();
    let r = http
        .get(gw.url(&format!("/customers/{CUSTOMER}/clv")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"customer_id": CUSTOMER, "clv": [244.9, 89.9]}));
    let r = http
        .get(gw.url("/get_clv"))
        .header("content-type", "application/json")
        .body(format!("{{ \"customer_id\": \"{CUSTOMER}\" }}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        x_cache(&r),
        "HIT",
        "the direct route answers from the leg's entry"
    );
    assert_eq!(calls(&clv, "GET /get_clv"), 1);
    let r = http
        .get(gw.url("/customers/0000/clv"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "the upstream's 422 fails the leg");
}

/// Runs the `restaurant-menu` command against `gateway`.
fn restaurant_menu(gateway: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_restaurant-menu"))
        .arg("--gateway")
        .arg(gateway)
        .args(args)
        .output()
        .expect("cannot run restaurant-menu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restaurant_menu_command_works_through_the_real_gateway() {
    let up = demo_with(Api::Restaurants, knobs(Api::Restaurants, 0)).await;
    let gw = StoaProcess::start(&config(&up.url(), "fail", "3s", "")).await;
    let base = gw.url("");
    let known = tokio::task::spawn_blocking({
        let base = base.clone();
        move || restaurant_menu(&base, &["Restaurang Bikupan"])
    })
    .await
    .unwrap();
    let (code, out, err) = known;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Restaurang Bikupan"), "{out}");
    assert!(out.contains("  - "), "dishes are listed: {out}");
    assert!(out.contains("http"), "links are printed: {out}");

    let (code, out, err) = tokio::task::spawn_blocking({
        let base = base.clone();
        move || restaurant_menu(&base, &["No Such Place"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1. ") && out.contains("13. "),
        "the numbered list: {out}"
    );

    let (code, out, _) = tokio::task::spawn_blocking(move || restaurant_menu(&base, &[]))
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("13. "), "{out}");

    let nobody = format!("http://127.0.0.1:{}", common::free_port());
    let (code, _, err) = tokio::task::spawn_blocking(move || restaurant_menu(&nobody, &["x"]))
        .await
        .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the gateway"), "{err}");
}
