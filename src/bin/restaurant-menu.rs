//! `restaurant-menu`: this week's dishes of one lunch restaurant, asked through the stoa gateway.
//!
//! The gateway version of the restaurant seed's command-line script. It uses two routes of the
//! demo configuration:
//!
//! - `GET /menu/{name}` -> `{"name","region","dishes":[...],"menu_url","url","map_url"}`, or 404
//!   `{"error":"not_found","message":"...","names":[...]}` for a name the gateway does not know;
//! - `GET /restaurants` -> `{"restaurants":[{"name", ...}, ...],"url":"..."}`.
//!
//! A known name prints the dishes and links; an unknown name (or none) prints the numbered list of
//! restaurants. Both exit 0. A gateway that cannot be reached, or that answers with an error,
//! exits 1 with a message on stderr.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use reqwest::{StatusCode, Url};
use serde_json::Value;

/// Show this week's lunch menu of a restaurant in Uppsala or Solna, through the stoa gateway.
///
/// With a known restaurant name, prints its dishes and links; with no name or an unknown one,
/// prints the numbered list of restaurants. Quote names with spaces or special characters.
#[derive(Debug, Parser)]
#[command(name = "restaurant-menu", version, about, long_about)]
struct Cli {
    /// The restaurant's name, e.g. "Restaurang Bikupan" (matched case-insensitively).
    name: Option<String>,

    /// Base URL of the stoa gateway.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:8080",
        value_parser = parse_gateway
    )]
    gateway: Url,

    /// Give up on the gateway after this many seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    timeout: u64,
}

/// Accepts an absolute `http://` URL without query or fragment (this build speaks no TLS).
fn parse_gateway(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("not a URL ({e})"))?;
    if url.scheme() != "http" {
        return Err(format!(
            "only http:// gateways are supported, not {}://",
            url.scheme()
        ));
    }
    if url.host().is_none() {
        return Err("the URL has no host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not have a query or fragment".into());
    }
    Ok(url)
}

/// Why the command failed; printed on stderr, exit 1.
struct Failure(String);

/// What one call to the gateway brought back.
struct Answer {
    status: StatusCode,
    body: Value,
}

struct Gateway {
    client: reqwest::Client,
    base: Url,
    /// The base URL as shown in messages (no trailing slash).
    shown: String,
    timeout: Duration,
}

impl Gateway {
    /// The URL of `segments` below the base path, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http URL has a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// GETs `segments` and parses the body as JSON (whatever the status).
    async fn get(&self, segments: &[&str]) -> Result<Answer, Failure> {
        let url = self.url(segments);
        let response = self
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                Failure(format!(
                    "cannot reach the gateway at {}: {}",
                    self.shown,
                    self.reason(&e)
                ))
            })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| {
            Failure(format!(
                "reading the answer to GET {} from the gateway at {} failed: {}",
                url.path(),
                self.shown,
                self.reason(&e)
            ))
        })?;
        let body = match serde_json::from_slice(&bytes) {
            Ok(body) => body,
            Err(_) if !status.is_success() => {
                // An error page that is not JSON: keep its text for the message.
                Value::String(snippet(&String::from_utf8_lossy(&bytes)))
            }
            Err(e) => {
                return Err(Failure(format!(
                    "the gateway at {} answered GET {} with {} but not with JSON ({e})",
                    self.shown,
                    url.path(),
                    describe(status)
                )))
            }
        };
        Ok(Answer { status, body })
    }

    /// The innermost cause of a request error, which names the actual problem
    /// ("Connection refused (os error 111)") rather than the request.
    fn reason(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("no answer within {} s", self.timeout.as_secs());
        }
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        cause.to_string()
    }

    /// A gateway answer that is an error: status plus the gateway's own message.
    fn error(&self, what: &str, answer: &Answer) -> Failure {
        let detail = match &answer.body {
            Value::Object(map) => match map.get("message").and_then(Value::as_str) {
                Some(message) => message.to_string(),
                None => snippet(&answer.body.to_string()),
            },
            Value::String(text) if !text.is_empty() => text.clone(),
            _ => "no details given".to_string(),
        };
        Failure(format!(
            "the gateway at {} answered {what} with {}: {detail}",
            self.shown,
            describe(answer.status)
        ))
    }
}

/// "502 Bad Gateway".
fn describe(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The first line of `text`, shortened to about 200 characters.
fn snippet(text: &str) -> String {
    let line = text.trim().lines().next().unwrap_or("");
    let mut short: String = line.chars().take(200).collect();
    if short.len() < line.len() {
        short.push_str("...");
    }
    short
}

/// A string field, or `None` when absent, null or empty.
fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value
        .get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// "1. name" lines.
fn numbered(out: &mut String, names: &[String]) {
    for (i, name) in names.iter().enumerate() {
        out.push_str(&format!("{}. {name}\n", i + 1));
    }
}

/// The names of a JSON array of strings (non-strings are skipped).
fn strings(value: Option<&Value>) -> Option<Vec<String>> {
    let list = value?.as_array()?;
    Some(
        list.iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
    )
}

/// The menu of `name`, or the list of restaurants when the gateway does not know it.
async fn menu(gateway: &Gateway, name: &str) -> Result<String, Failure> {
    let answer = gateway.get(&["menu", name]).await?;
    let what = format!("GET {}", gateway.url(&["menu", name]).path());
    let mut out = String::new();
    match answer.status {
        StatusCode::OK => {
            let body = &answer.body;
            let Some(dishes) = body.get("dishes").and_then(Value::as_array) else {
                return Err(Failure(format!(
                    "the gateway at {} answered {what} without a list of dishes: {}",
                    gateway.shown,
                    snippet(&body.to_string())
                )));
            };
            let title = text(body, "name").unwrap_or(name);
            match text(body, "region") {
                Some(region) => out.push_str(&format!("{title} ({region})\n")),
                None => out.push_str(&format!("{title}\n")),
            }
            let dishes: Vec<&str> = dishes
                .iter()
                .filter_map(Value::as_str)
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .collect();
            if dishes.is_empty() {
                out.push_str("  No menu is published right now; see the menu link below.\n");
            }
            for dish in dishes {
                out.push_str(&format!("  - {dish}\n"));
            }
            for (label, key) in [
                ("Menu", "menu_url"),
                ("Homepage", "url"),
                ("Map", "map_url"),
            ] {
                if let Some(link) = text(body, key) {
                    out.push_str(&format!("{label}: {link}\n"));
                }
            }
            Ok(out)
        }
        StatusCode::NOT_FOUND => {
            // The aggregation route lists the names it knows; a 404 without them means the
            // gateway has no such route (or something else is listening there).
            let Some(names) = strings(answer.body.get("names")) else {
                return Err(gateway.error(&what, &answer));
            };
            out.push_str(&format!(
                "No restaurant named \"{name}\" was found. Restaurants:\n"
            ));
            numbered(&mut out, &names);
            Ok(out)
        }
        _ => Err(gateway.error(&what, &answer)),
    }
}

/// The numbered list of all restaurants.
async fn list(gateway: &Gateway) -> Result<String, Failure> {
    let answer = gateway.get(&["restaurants"]).await?;
    let what = format!("GET {}", gateway.url(&["restaurants"]).path());
    if answer.status != StatusCode::OK {
        return Err(gateway.error(&what, &answer));
    }
    let Some(restaurants) = answer.body.get("restaurants").and_then(Value::as_array) else {
        return Err(Failure(format!(
            "the gateway at {} answered {what} without a list of restaurants: {}",
            gateway.shown,
            snippet(&answer.body.to_string())
        )));
    };
    let names: Vec<String> = restaurants
        .iter()
        .filter_map(|r| text(r, "name"))
        .map(str::to_string)
        .collect();
    let mut out = String::from("Restaurants:\n");
    numbered(&mut out, &names);
    Ok(out)
}

async fn run(cli: Cli) -> Result<String, Failure> {
    let timeout = Duration::from_secs(cli.timeout);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("restaurant-menu/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Failure(format!("cannot set up the HTTP client: {e}")))?;
    let shown = cli.gateway.as_str().trim_end_matches('/').to_string();
    let gateway = Gateway {
        client,
        base: cli.gateway,
        shown,
        timeout,
    };
    match cli.name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => menu(&gateway, name).await,
        _ => list(&gateway).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("restaurant-menu: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(out) => {
            let mut stdout = io::stdout().lock();
            match stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                // A reader that stopped early (`| head`) is not an error.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("restaurant-menu: cannot write the output: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(Failure(message)) => {
            eprintln!("restaurant-menu: {message}");
            ExitCode::FAILURE
        }
    }
}
