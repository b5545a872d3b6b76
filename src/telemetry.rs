//! Logging: the tracing subscriber (text or JSON lines on stderr) and the access log.
//!
//! Each answered request is one INFO event with target `stoa::access` ([`access_log`]);
//! with [`LogFormat::Json`] that is one JSON object per line, fields at the top level.

use std::io::{self, IsTerminal};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::cache::CacheStatus;
use crate::config::LogFormat;

/// The target of access log events, e.g. for `RUST_LOG=stoa::access=off`.
pub const ACCESS_TARGET: &str = "stoa::access";

/// Installs the global subscriber, writing to stderr, and the `log` bridge so that
/// pingora's `log` records show as tracing events.
///
/// Lines go through a background writer thread, so a request never waits on a write to
/// stderr; if that writer falls far behind, lines are dropped rather than blocking. Keep
/// the returned guard alive: dropping it flushes what is pending.
///
/// `level` is a filter such as `info` or `info,stoa=debug`; a non-empty `RUST_LOG`
/// replaces it. Fails on a bad filter or if a subscriber is already installed.
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<WorkerGuard> {
    let filter = filter(level, std::env::var("RUST_LOG").ok())?;
    let (writer, guard) = tracing_appender::non_blocking(io::stderr());
    // `try_init` also installs the `log` -> tracing bridge (tracing-subscriber's
    // default `tracing-log` feature).
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(io::stderr().is_terminal())
            .with_writer(writer)
            .finish()
            .try_init(),
        LogFormat::Json => json_subscriber(filter, writer).try_init(),
    }
    .context("cannot install the log subscriber")?;
    Ok(guard)
}

/// The filter: `RUST_LOG` when set and non-empty, else `level`.
fn filter(level: &str, rust_log: Option<String>) -> anyhow::Result<EnvFilter> {
    match rust_log.filter(|s| !s.trim().is_empty()) {
        Some(env) => EnvFilter::try_new(&env).with_context(|| format!("bad RUST_LOG {env:?}")),
        None => EnvFilter::try_new(level).with_context(|| format!("bad log level {level:?}")),
    }
}

/// The JSON lines subscriber: `timestamp` (RFC 3339, UTC), `level`, the event's fields
/// and `target`, all at the top level of one object per line.
fn json_subscriber<W>(filter: EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .finish()
}

/// One answered request, as the access log records it.
#[derive(Debug, Clone)]
pub struct AccessRecord<'a> {
    /// The client's address, when known: the one the rate limiter knows it by.
    pub client: Option<IpAddr>,
    pub method: &'a str,
    /// The request path as the client sent it (no query string).
    pub path: &'a str,
    /// The matched route's name.
    pub route: &'a str,
    pub status: u16,
    pub cache: CacheStatus,
    /// Response body bytes sent.
    pub bytes: u64,
    /// Time from request to response.
    pub duration: Duration,
    /// Time the upstream fetch took, when this request made or waited on one.
    pub upstream_duration: Option<Duration>,
    pub request_id: &'a str,
}

/// Logs one request: a single INFO event with target `stoa::access` and the fields
/// `client method path route status cache bytes duration upstream_duration request_id`.
/// Durations are float seconds (like the metrics). `client` and `upstream_duration` are
/// left out when `None`; `cache` is the metrics label (`hit`, `miss`, …, `none`).
pub fn access_log(rec: &AccessRecord) {
    tracing::info!(
        target: ACCESS_TARGET,
        client = rec.client.map(tracing::field::display),
        method = rec.method,
        path = rec.path,
        route = rec.route,
        status = rec.status,
        cache = rec.cache.label(),
        bytes = rec.bytes,
        duration = rec.duration.as_secs_f64(),
        upstream_duration = rec.upstream_duration.map(|d| d.as_secs_f64()),
        request_id = rec.request_id,
    );
}

/// A request id: 16 lowercase hex digits from a thread-local fast RNG (seeded once per
/// thread, no system call per id).
pub fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u64(..);
    let digits: Vec<u8> = (0..16)
        .map(|i| HEX[((n >> (60 - 4 * i)) & 0xf) as usize])
        .collect();
    // Only ASCII hex digits were written.
    String::from_utf8(digits).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` under the JSON subscriber and returns the lines it wrote.
    fn json_lines(level: &str, f: impl FnOnce()) -> Vec<serde_json::Value> {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = json_subscriber(filter(level, None).unwrap(), move || sink.clone());
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn access_log_is_one_json_line_with_every_field() {
        let lines = json_lines("info", || {
            access_log(&AccessRecord {
                client: Some("127.0.0.1".parse().unwrap()),
                method: "GET",
                path: "/restaurant/7",
                route: "restaurant",
                status: 200,
                cache: CacheStatus::Miss,
                bytes: 1234,
                duration: Duration::from_millis(1500),
                upstream_duration: Some(Duration::from_millis(1250)),
                request_id: "00ff00ff00ff00ff",
            })
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        let timestamp = line["timestamp"].as_str().unwrap();
        assert!(
            timestamp.len() >= 20 && timestamp.contains('T'),
            "{timestamp}"
        );
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], "stoa::access");
        assert_eq!(line["client"], "127.0.0.1");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["path"], "/restaurant/7");
        assert_eq!(line["route"], "restaurant");
        assert_eq!(line["status"].as_u64(), Some(200));
        assert_eq!(line["cache"], "miss");
        assert_eq!(line["bytes"].as_u64(), Some(1234));
        assert_eq!(line["duration"].as_f64(), Some(1.5));
        assert_eq!(line["upstream_duration"].as_f64(), Some(1.25));
        assert_eq!(line["request_id"], "00ff00ff00ff00ff");
    }

    #[test]
    fn absent_client_and_upstream_duration_are_left_out() {
        let lines = json_lines("info", || {
            access_log(&AccessRecord {
                client: None,
                method: "POST",
                path: "/get_clv",
                route: "clv",
                status: 429,
                cache: CacheStatus::None,
                bytes: 0,
                duration: Duration::from_micros(250),
                upstream_duration: None,
                request_id: "1",
            })
        });
        assert_eq!(lines.len(), 1);
        let obj = lines[0].as_object().unwrap();
        assert!(!obj.contains_key("client") && !obj.contains_key("upstream_duration"));
        assert_eq!(obj["cache"], "none");
        assert_eq!(obj["duration"].as_f64(), Some(0.00025));
    }

    #[test]
    fn access_log_can_be_filtered_out() {
        let lines = json_lines("info,stoa::access=off", || {
            access_log(&AccessRecord {
                client: None,
                method: "GET",
                path: "/",
                route: "r",
                status: 200,
                cache: CacheStatus::Hit,
                bytes: 1,
                duration: Duration::ZERO,
                upstream_duration: None,
                request_id: "1",
            });
            tracing::info!(target: "stoa::other", "kept");
        });
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["message"], "kept");
    }

    #[test]
    fn rust_log_overrides_the_level_and_bad_filters_fail() {
        assert!(filter("info", None).is_ok());
        let f = filter("info", Some("stoa=trace".into())).unwrap();
        assert!(f.to_string().contains("stoa=trace"));
        let f = filter("warn", Some("  ".into())).unwrap();
        assert_eq!(f.to_string(), "warn");
        assert!(filter("info", Some("stoa=loud".into())).is_err());
        assert!(filter("=#!", None).is_err());
    }

    #[test]
    fn request_ids_are_16_hex_digits_and_distinct() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids
            .iter()
            .all(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())));
    }
}
