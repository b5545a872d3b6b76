//! The documentation holds together: the configuration reference in the book is what
//! `scripts/config-reference.py` generates from `config/stoa.schema.json` and names every key
//! of the schema, every key of the schema has a description, the book under `docs/` builds
//! with mdbook, the README stays a short first page, and every relative link of the README
//! and of the book points to a file that exists.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const README_MAX_LINES: usize = 300;
const REFERENCE_PAGE: &str = "docs/src/reference/configuration.md";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what} exited with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_configuration_reference_is_what_the_schema_generates() {
    let out = Command::new("python3")
        .arg("scripts/config-reference.py")
        .arg("--check")
        .current_dir(root())
        .output()
        .expect("python3 runs (scripts/config-reference.py needs only its standard library)");
    assert!(
        out.status.success(),
        "{}\nregenerate the page with `make docs` or `python3 scripts/config-reference.py`",
        describe("scripts/config-reference.py --check", &out)
    );
}

/// The definition a `$ref` names (`#/$defs/X` or `#/definitions/X`), followed until a node
/// without `$ref`.
fn resolve<'a>(schema: &'a Value, mut node: &'a Value) -> &'a Value {
    for _ in 0..32 {
        let Some(reference) = node.get("$ref").and_then(Value::as_str) else {
            return node;
        };
        let (defs, name) = if let Some(name) = reference.strip_prefix("#/$defs/") {
            ("$defs", name)
        } else if let Some(name) = reference.strip_prefix("#/definitions/") {
            ("definitions", name)
        } else {
            panic!("unsupported $ref {reference}");
        };
        node = schema
            .get(defs)
            .and_then(|d| d.get(name))
            .unwrap_or_else(|| panic!("no definition {reference}"));
    }
    panic!("$ref chain too long at {node}");
}

/// Every key path under a key whose value is `node` and whose own path is `path`, with its
/// description: the keys of a table are `path.key`, the tables of a table of named tables
/// `path.<name>`, the elements of an array `path[]` (the notation of the reference page).
fn walk_value(
    schema: &Value,
    node: &Value,
    path: &str,
    depth: usize,
    out: &mut Vec<(String, String)>,
) {
    assert!(depth < 32, "the schema nests too deep at {path}");
    if !node.is_object() {
        return;
    }
    let node = resolve(schema, node);
    if let Some(properties) = node.get("properties").and_then(Value::as_object) {
        for (key, value) in properties {
            let child = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            out.push((child.clone(), key_description(schema, value)));
            walk_value(schema, value, &child, depth + 1, out);
        }
    }
    if let Some(extra) = node.get("additionalProperties") {
        walk_value(schema, extra, &format!("{path}.<name>"), depth + 1, out);
    }
    if let Some(items) = node.get("items") {
        walk_value(schema, items, &format!("{path}[]"), depth + 1, out);
    }
    for alternatives in ["anyOf", "oneOf"] {
        if let Some(variants) = node.get(alternatives).and_then(Value::as_array) {
            for variant in variants {
                walk_value(schema, variant, path, depth + 1, out);
            }
        }
    }
}

#[test]
fn every_key_of_the_schema_is_in_the_reference_page() {
    let schema: Value = serde_json::from_str(&read("config/stoa.schema.json"))
        .expect("config/stoa.schema.json is JSON");
    let mut keys = Vec::new();
    walk_value(&schema, &schema, "", 0, &mut keys);
    let paths: Vec<String> = keys.into_iter().map(|(p, _)| p).collect();
    for expected in [
        "server.listen",
        "upstreams.<name>.url",
        "routes[].cache.ttl",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "the schema walk found no {expected}: {paths:?}"
        );
    }
    let page = read(REFERENCE_PAGE);
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| !page.contains(&format!("`{p}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "{REFERENCE_PAGE} does not name these keys of the schema: {missing:?}\n\
         regenerate it with `make docs` or `python3 scripts/config-reference.py`"
    );
}

/// mdbook on PATH, else in `$CARGO_HOME/bin` or `~/.cargo/bin`.
fn mdbook() -> PathBuf {
    let on_path = Command::new("mdbook")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if on_path {
        return PathBuf::from("mdbook");
    }
    let mut homes = Vec::new();
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        homes.push(PathBuf::from(cargo_home));
    }
    if let Some(home) = std::env::var_os("HOME") {
        homes.push(PathBuf::from(home).join(".cargo"));
    }
    for home in homes {
        let candidate = home.join("bin").join("mdbook");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "mdbook is neither on PATH nor in ~/.cargo/bin: run scripts/install-mdbook.sh \
         (`make test` does) to install it"
    );
}

#[test]
fn the_book_builds() {
    let mdbook = mdbook();
    let dest = tempfile::tempdir().expect("a temporary directory");
    let out = Command::new(&mdbook)
        .arg("build")
        .arg("docs")
        .arg("-d")
        .arg(dest.path())
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{} does not run: {e}", mdbook.display()));
    assert!(
        out.status.success(),
        "{}",
        describe("mdbook build docs", &out)
    );
    for page in [
        "index.html",
        "configuration.html",
        "reference/configuration.html",
    ] {
        assert!(
            dest.path().join(page).is_file(),
            "mdbook build docs wrote no {page}"
        );
    }
}

#[test]
fn the_readme_is_a_short_first_page() {
    let lines = read("README.md").lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines, at most {README_MAX_LINES}: move the details into a \
         chapter of the book under docs/src/"
    );
}

/// Every Markdown file under `dir`, recursively.
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            markdown_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

/// The line without its inline code spans (`...`), which hold no links.
fn without_code_spans(line: &str) -> String {
    let mut kept = String::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 0 {
            kept.push_str(part);
        }
    }
    kept
}

/// The targets of the inline links and images of a Markdown text, code blocks and code spans
/// left out.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let line = without_code_spans(line);
        let mut rest = line.as_str();
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            let target = after[..end].split_whitespace().next().unwrap_or("");
            targets.push(target.to_string());
            rest = &after[end..];
        }
    }
    targets
}

fn is_relative(target: &str) -> bool {
    !(target.is_empty()
        || target.starts_with('#')
        || target.starts_with('/')
        || target.contains("://")
        || target.starts_with("mailto:"))
}

#[test]
fn relative_links_of_the_readme_and_the_book_point_to_files() {
    let root = root();
    let mut files = vec![root.join("README.md")];
    markdown_files(&root.join("docs/src"), &mut files);
    assert!(files.len() > 10, "the book has chapters: {files:?}");

    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let dir = file.parent().unwrap();
        for target in link_targets(&text) {
            if !is_relative(&target) {
                continue;
            }
            let file_part = target.split('#').next().unwrap_or("");
            if file_part.is_empty() {
                continue;
            }
            checked += 1;
            if !dir.join(file_part).exists() {
                let shown = file.strip_prefix(&root).unwrap_or(file);
                broken.push(format!("{}: {target}", shown.display()));
            }
        }
    }
    assert!(
        checked > 20,
        "found only {checked} relative links: is the scan right?"
    );
    assert!(
        broken.is_empty(),
        "links to missing files:\n{}",
        broken.join("\n")
    );
}

/// The description the reference page gives the key whose value is `node`, as
/// `scripts/config-reference.py` picks it: the key's own doc comment; for a table, a list of
/// tables or a table of named tables, else the doc comment of the table's struct. A named
/// value type's description (`Duration`, `Size`) is not the key's: it is given once, under
/// "Value types".
fn key_description(schema: &Value, node: &Value) -> String {
    let own = node
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !own.trim().is_empty() {
        return own.to_string();
    }
    let is_value_type = node
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .is_some_and(|name| {
            !name.starts_with("Raw") && resolve(schema, node).get("properties").is_none()
        });
    if is_value_type {
        return String::new();
    }
    let resolved = resolve(schema, node);
    let from_struct = resolved
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !from_struct.trim().is_empty() {
        return from_struct.to_string();
    }
    resolved
        .get("additionalProperties")
        .filter(|extra| extra.is_object())
        .map(|extra| resolve(schema, extra))
        .and_then(|extra| extra.get("description"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

#[test]
fn every_key_of_the_schema_has_a_description() {
    let schema: Value = serde_json::from_str(&read("config/stoa.schema.json"))
        .expect("config/stoa.schema.json is JSON");
    let mut keys = Vec::new();
    walk_value(&schema, &schema, "", 0, &mut keys);

    let missing: Vec<&str> = keys
        .iter()
        .filter(|(_, d)| d.trim().is_empty())
        .map(|(p, _)| p.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "{} keys of the schema have no description: {missing:?}\n\
         write a doc comment on each field in src/config/raw.rs, then regenerate the schema \
         (`cargo run --bin stoa -- schema > config/stoa.schema.json`) and the page \
         (`python3 scripts/config-reference.py`)",
        missing.len()
    );
}
