//! `stoa check`, the CLI and the shipped configuration files.

mod common;

use common::{repo_path, stoa, write_temp};

#[test]
fn every_shipped_config_passes_check() {
    let dir = repo_path("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{} failed check:\n{out}{err}", path.display());
        assert!(out.contains("configuration ok"), "{out}");
        checked += 1;
    }
    assert!(
        checked >= 6,
        "expected demo.toml and one file per seed, found {checked}"
    );
}

#[test]
fn a_broken_config_reports_every_mistake_and_exits_1() {
    let path = repo_path("tests/fixtures/broken.toml");
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let expected = [
        "colour: unknown section",
        "admin.tokn: unknown key \"tokn\"",
        "server.listen: \"localhost-8080\" is not an address",
        "server.threads: 0 is not between 1 and 1024",
        "server.max_body_bytes: \"lots\" is not a size",
        "upstreams.clv.timeout: \"soon\" is not a duration",
        "upstreams.menus.url: \"ftp://127.0.0.1:9001\": scheme \"ftp\" is not http",
        "routes[1].rewrite: \"/api/restaurant/{name}\" uses parameter {name}",
        "routes[2].upstream: no upstream named \"clvv\"",
        "routes[2].path: \"/get_clv\" matches the same requests as routes[0]",
        "routes[3].methods[0]: \"GE T\" is not a method",
        "routes[3].path: \"restaurants\" must start with '/'",
        "routes[3].name: \"clv\" is already the name of routes[0]",
    ];
    for line in expected {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
    assert!(err.contains("13 problem(s)"), "{err}");
}

#[test]
fn environment_overrides_apply_and_are_validated() {
    let demo = repo_path("config/demo.toml");
    let demo = demo.to_str().unwrap();
    let (code, out, _) = stoa(
        &["check", "--config", demo],
        &[("STOA_SERVER__LISTEN", "127.0.0.1:18181")],
    );
    assert_eq!(code, 0);
    assert!(out.contains("listening on 127.0.0.1:18181"), "{out}");

    let (code, _, err) = stoa(
        &["check", "--config", demo],
        &[("STOA_UPSTREAMS__CLV__TIMEOUT", "forever")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("upstreams.clv.timeout: \"forever\""), "{err}");
}

#[test]
fn a_missing_file_or_bad_toml_is_a_clear_error() {
    let (code, _, err) = stoa(&["check", "--config", "/nonexistent/stoa.toml"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read configuration file"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = write_temp(dir.path(), "bad.toml", "[server\nlisten = ");
    let (code, _, err) = stoa(&["check", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("1 problem(s)"), "{err}");
}

#[test]
fn help_and_version() {
    let (code, out, _) = stoa(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("stoa "), "{out}");
    let (code, out, _) = stoa(&["--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("check") && out.contains("--config"), "{out}");
    let (code, _, err) = stoa(&[], &[("STOA_CONFIG", "")]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_table_with_an_unknown_key_still_has_its_other_keys_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(
        dir.path(),
        "unknown-and-bad.toml",
        r#"
[upstreams.x]
url = "http://127.0.0.1:9"
timeout = "five seconds"
colour = 1

[[routes]]
name = "r"
methods = ["get"]
path = "/r"
upstream = "x"
cache = { ttl = "10x", bogus = 1 }
"#,
    );
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let expected = [
        "upstreams.x.colour: unknown key \"colour\"",
        "upstreams.x.timeout: \"five seconds\" is not a duration",
        "routes[0].cache.bogus: unknown key \"bogus\"",
        "routes[0].methods[0]: \"get\" is not GET: methods are case-sensitive",
    ];
    for line in expected {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
    assert!(err.contains("4 problem(s)"), "{err}");
}

#[test]
fn targeted_field_and_silent_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let text = |targeted: &str, freshness: &str| {
        format!(
            r#"
[cache]
targeted_field = "{targeted}"

[upstreams.x]
url = "http://127.0.0.1:9"

[[routes]]
name = "r"
methods = ["GET"]
path = "/r"
upstream = "x"
cache = {{ ttl = "10s", {freshness}silent = "heuristic" }}

[[routes]]
name = "s"
methods = ["GET"]
path = "/s"
upstream = "x"
cache = {{ ttl = "10s", freshness = "origin", silent = "sometimes" }}
"#
        )
    };
    let path = write_temp(dir.path(), "bad.toml", &text("Cache-Control", ""));
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let expected = [
        "cache.targeted_field: \"Cache-Control\" already has a meaning in HTTP or stoa",
        "routes[0].cache.silent: \"heuristic\" is how stoa treats an upstream that says \
         nothing of freshness: it applies only with freshness = \"origin\"",
        "routes[1].cache.silent: \"sometimes\" is not one of ttl",
    ];
    for line in expected {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
    assert!(err.contains("3 problem(s)"), "{err}");

    let path = write_temp(dir.path(), "names.toml", &text("Stoa Control", ""));
    let (code, _, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cache.targeted_field: \"Stoa Control\" is not a header name"),
        "{err}"
    );
    let path = write_temp(dir.path(), "hop.toml", &text("Keep-Alive", ""));
    let (_, _, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert!(
        err.contains("cache.targeted_field: \"Keep-Alive\" already has a meaning"),
        "{err}"
    );

    let good =
        text("Edge-Cache-Control", "freshness = \"origin\", ").replace("\"sometimes\"", "\"ttl\"");
    let path = write_temp(dir.path(), "good.toml", &good);
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration ok"), "{out}");
}

#[test]
fn bad_tag_templates_are_reported_with_their_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(
        dir.path(),
        "bad-tags.toml",
        r#"
[upstreams.menus]
url = "http://127.0.0.1:9"

[[routes]]
name = "restaurant"
methods = ["GET"]
path = "/restaurant/{id}"
upstream = "menus"
cache = { ttl = "10s", key_query = ["lang"], tags = ["restaurant:{id}", "lang:{lang}", "city:{city}", "", "r:{id", "menus}"] }
"#,
    );
    let (code, out, err) = stoa(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let expected = [
        "routes[0].cache.tags[2]: \"city:{city}\" uses {city}, which names no parameter of the route's path \"/restaurant/{id}\", no query parameter listed in key_query and no body field listed in key_body",
        "routes[0].cache.tags[3]: \"\" is empty",
        "routes[0].cache.tags[4]: \"r:{id\" has unbalanced braces",
        "routes[0].cache.tags[5]: \"menus}\" has unbalanced braces",
    ];
    for line in expected {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
    assert!(err.contains("4 problem(s)"), "{err}");
}

#[test]
fn the_shipped_schema_is_current() {
    let (code, out, err) = stoa(&["schema"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let shipped = std::fs::read_to_string(repo_path("config/stoa.schema.json")).unwrap();
    assert!(
        shipped == out,
        "config/stoa.schema.json is stale: run `stoa schema > config/stoa.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&out).unwrap();
    for section in [
        "server",
        "admin",
        "log",
        "cache",
        "rate_limits",
        "upstreams",
        "routes",
    ] {
        assert!(schema["properties"][section].is_object(), "{section}");
    }
    assert_eq!(schema["additionalProperties"], false);
}
