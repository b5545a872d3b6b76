//! Logging: the tracing subscriber (text or JSON lines on stderr) and the access log.
//!
//! The access log does not go through tracing: each answered request is formatted into one
//! line ([`AccessRecord`], the same line the tracing subscriber would write for an INFO
//! event with target `stoa::access`, in text or JSON) and handed over a bounded channel to
//! one writer thread, which writes through a buffer to stderr or `log.access_log_file`.
//! When that channel is full the line is dropped and counted
//! ([`access_log_dropped`], `stoa_access_log_dropped_total`); a request never waits.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::cache::CacheStatus;
use crate::config::{LogFormat, LogSettings};

/// The target of access log lines, e.g. for `RUST_LOG=stoa::access=off`.
pub const ACCESS_TARGET: &str = "stoa::access";

/// Lines the access log channel holds before new ones are dropped.
const ACCESS_CHANNEL_LINES: usize = 16 * 1024;

/// The process's access log writer, installed by [`init`].
static ACCESS: OnceLock<AccessWriter> = OnceLock::new();

/// Keeps the log writers alive; dropping it flushes what is pending.
pub struct LogGuard {
    _tracing: WorkerGuard,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(access) = ACCESS.get() {
            access.flush(Duration::from_secs(5));
        }
    }
}

/// Installs the global subscriber, writing to stderr, and the `log` bridge so that
/// pingora's `log` records show as tracing events; and the access log writer (to
/// `settings.access_log_file`, else stderr) unless the filter turns `stoa::access` off.
///
/// Lines go through background writer threads, so a request never waits on a write; if a
/// writer falls far behind, lines are dropped rather than blocking. Keep the returned guard
/// alive: dropping it flushes what is pending.
///
/// `settings.level` is a filter such as `info` or `info,stoa=debug`; a non-empty `RUST_LOG`
/// replaces it. Fails on a bad filter, an access log file that cannot be opened, or if a
/// subscriber is already installed.
pub fn init(settings: &LogSettings) -> anyhow::Result<LogGuard> {
    let filter = filter(&settings.level, std::env::var("RUST_LOG").ok())?;
    let (writer, guard) = tracing_appender::non_blocking(io::stderr());
    // `try_init` also installs the `log` -> tracing bridge (tracing-subscriber's
    // default `tracing-log` feature).
    match settings.format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(io::stderr().is_terminal())
            .with_writer(writer)
            .finish()
            .try_init(),
        LogFormat::Json => json_subscriber(filter, writer).try_init(),
    }
    .context("cannot install the log subscriber")?;
    // Decided once: the filter (e.g. `RUST_LOG=warn` or `stoa::access=off`) can turn the
    // access log off; `log.access_log` switches it per configuration (reloadable).
    if tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
        let sink: Box<dyn Write + Send> = match &settings.access_log_file {
            Some(path) => Box::new(open_append(path)?),
            None => Box::new(io::stderr()),
        };
        let writer = AccessWriter::spawn(settings.format, sink, ACCESS_CHANNEL_LINES)
            .context("cannot start the access log writer")?;
        // Only `init` sets it, and a second `init` failed above (subscriber installed).
        let _ = ACCESS.set(writer);
    }
    Ok(LogGuard { _tracing: guard })
}

fn open_append(path: &Path) -> anyhow::Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the access log file {}", path.display()))
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
    /// Which code answered it (`answer`, `forward`, `proxy:<why>`: see `crate::lane`).
    pub lane: &'a str,
    /// Response body bytes sent.
    pub bytes: u64,
    /// Time from request to response.
    pub duration: Duration,
    /// Time the upstream fetch took, when this request made or waited on one.
    pub upstream_duration: Option<Duration>,
    pub request_id: &'a str,
}

/// Logs one request: one line with the fields `client method path route status cache lane
/// bytes duration upstream_duration request_id` and target `stoa::access`, as the tracing
/// subscriber formats an INFO event (text, or JSON with every field at the top level).
/// Durations are float seconds (like the metrics). `client` and `upstream_duration` are
/// left out when `None`; `cache` is the metrics label (`hit`, `miss`, …, `none`).
///
/// Costs the request one buffer (the line, freed by the writer thread) and a non-blocking
/// channel send; nothing when no writer is installed (the filter turned the log off).
pub fn access_log(rec: &AccessRecord) {
    if let Some(access) = ACCESS.get() {
        access.log(rec);
    }
}

/// Access log lines dropped so far because the writer fell behind (channel full).
pub fn access_log_dropped() -> u64 {
    ACCESS.get().map_or(0, AccessWriter::dropped)
}

enum Message {
    Line(Vec<u8>),
    /// Write out what is buffered, then answer.
    Flush(SyncSender<()>),
}

/// Formats access lines on the caller's thread and writes them on one writer thread.
pub struct AccessWriter {
    format: LogFormat,
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl AccessWriter {
    /// Starts the writer thread: lines to `sink` through a 64 KiB buffer, flushed whenever
    /// the channel (of `capacity` lines) runs empty.
    pub fn spawn(
        format: LogFormat,
        sink: Box<dyn Write + Send>,
        capacity: usize,
    ) -> io::Result<AccessWriter> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        std::thread::Builder::new()
            .name("stoa-access-log".into())
            .spawn(move || write_lines(rx, sink))?;
        Ok(AccessWriter {
            format,
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Formats `rec` and queues it; drops and counts it when the queue is full.
    pub fn log(&self, rec: &AccessRecord) {
        let mut line = Vec::with_capacity(320);
        format_line(&mut line, self.format, SystemTime::now(), rec);
        match self.tx.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until every line queued before this call is written out.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + timeout;
        let mut msg = Message::Flush(done_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        done_rx.recv_timeout(left).is_ok()
    }
}

/// While lines keep coming, how long the writer lets them gather before writing them out.
/// Senders never wake a sleeping writer, so under load a line costs no system call of its
/// own: the batch goes out in one write (or a few, 64 KiB each).
const ACCESS_BATCH_EVERY: Duration = Duration::from_millis(10);

/// The writer thread: until every sender is gone. Idle, it blocks on the channel (no
/// wake-ups while nothing is logged); busy, it writes everything queued every
/// [`ACCESS_BATCH_EVERY`], and goes back to blocking once a pass finds nothing.
fn write_lines(rx: Receiver<Message>, sink: Box<dyn Write + Send>) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, sink);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        loop {
            let mut wrote_any = false;
            loop {
                let msg = match next.take() {
                    Some(msg) => msg,
                    None => match rx.try_recv() {
                        Ok(msg) => msg,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            let _ = out.flush();
                            return;
                        }
                    },
                };
                wrote_any = true;
                match msg {
                    // A failed write (disk full, closed stderr) loses the line; nothing to tell.
                    Message::Line(line) => {
                        let _ = out.write_all(&line);
                    }
                    Message::Flush(done) => {
                        let _ = out.flush();
                        let _ = done.try_send(());
                    }
                }
            }
            let _ = out.flush();
            if !wrote_any {
                break;
            }
            std::thread::sleep(ACCESS_BATCH_EVERY);
        }
    }
    let _ = out.flush();
}

/// One access line, newline included, into `buf`: what tracing-subscriber's `fmt` layer
/// writes for the event (timestamps RFC 3339 in UTC with microseconds).
fn format_line(buf: &mut Vec<u8>, format: LogFormat, now: SystemTime, rec: &AccessRecord) {
    match format {
        LogFormat::Json => json_line(buf, now, rec),
        LogFormat::Text => {
            let ts = humantime::format_rfc3339_micros(now);
            // Writes into a Vec cannot fail.
            let _ = text_line(buf, ts, rec);
        }
    }
}

/// `now` as humantime's RFC 3339 with microseconds (`2026-12-02T07:44:36.838160Z`): the
/// part up to the seconds is formatted once per second per thread, the rest by hand.
fn push_timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    thread_local! {
        /// The last second formatted, and its `YYYY-MM-DDTHH:MM:SS`.
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            *text = humantime::format_rfc3339_seconds(whole).to_string();
            text.pop(); // the `Z`
            *second = secs;
        }
        buf.extend_from_slice(text.as_bytes());
    });
    let micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    buf.push(b'.');
    buf.extend_from_slice(&digits);
    buf.push(b'Z');
}

/// `,"key":` and `value` as a JSON string, escaped as serde_json escapes it.
fn push_string(buf: &mut Vec<u8>, key: &str, value: &str) {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(b"\":");
    if value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        // Writes into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, value);
    } else {
        buf.push(b'"');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'"');
    }
}

/// `,"key":` and `value` as a JSON number.
fn push_number(buf: &mut Vec<u8>, key: &str, value: u64) {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(b"\":");
    buf.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// `,"key":` and `value` in float seconds, as serde_json writes an `f64`.
fn push_seconds(buf: &mut Vec<u8>, key: &str, value: Duration) {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(b"\":");
    // Writes into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &value.as_secs_f64());
}

fn json_line(buf: &mut Vec<u8>, now: SystemTime, rec: &AccessRecord) {
    buf.extend_from_slice(b"{\"timestamp\":\"");
    push_timestamp(buf, now);
    buf.extend_from_slice(b"\",\"level\":\"INFO\"");
    if let Some(client) = rec.client {
        // Writes into a Vec cannot fail.
        let _ = write!(buf, ",\"client\":\"{client}\"");
    }
    push_string(buf, "method", rec.method);
    push_string(buf, "path", rec.path);
    push_string(buf, "route", rec.route);
    push_number(buf, "status", rec.status.into());
    push_string(buf, "cache", rec.cache.label());
    push_string(buf, "lane", rec.lane);
    push_number(buf, "bytes", rec.bytes);
    push_seconds(buf, "duration", rec.duration);
    if let Some(up) = rec.upstream_duration {
        push_seconds(buf, "upstream_duration", up);
    }
    push_string(buf, "request_id", rec.request_id);
    buf.extend_from_slice(b",\"target\":\"");
    buf.extend_from_slice(ACCESS_TARGET.as_bytes());
    buf.extend_from_slice(b"\"}\n");
}

fn text_line(
    buf: &mut Vec<u8>,
    ts: humantime::Rfc3339Timestamp,
    rec: &AccessRecord,
) -> io::Result<()> {
    write!(buf, "{ts}  INFO {ACCESS_TARGET}: ")?;
    if let Some(client) = rec.client {
        write!(buf, "client={client} ")?;
    }
    write!(
        buf,
        "method={:?} path={:?} route={:?} status={} cache={:?} lane={:?} bytes={} duration={:?}",
        rec.method,
        rec.path,
        rec.route,
        rec.status,
        rec.cache.label(),
        rec.lane,
        rec.bytes,
        rec.duration.as_secs_f64()
    )?;
    if let Some(up) = rec.upstream_duration {
        write!(buf, " upstream_duration={:?}", up.as_secs_f64())?;
    }
    writeln!(buf, " request_id={:?}", rec.request_id)
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
        parse(&buffer)
    }

    fn parse(buffer: &Buffer) -> Vec<serde_json::Value> {
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn record(request_id: &str) -> AccessRecord<'_> {
        AccessRecord {
            client: Some("127.0.0.1".parse().unwrap()),
            method: "GET",
            path: "/restaurant/7",
            route: "restaurant",
            status: 200,
            cache: CacheStatus::Miss,
            lane: "answer",
            bytes: 1234,
            duration: Duration::from_millis(1500),
            upstream_duration: Some(Duration::from_millis(1250)),
            request_id,
        }
    }

    fn line(format: LogFormat, rec: &AccessRecord) -> String {
        let mut buf = Vec::new();
        format_line(&mut buf, format, SystemTime::now(), rec);
        String::from_utf8(buf).unwrap()
    }

    /// The same event through the tracing subscriber, as the access log was written before.
    fn traced(rec: &AccessRecord) {
        tracing::info!(
            target: ACCESS_TARGET,
            client = rec.client.map(tracing::field::display),
            method = rec.method,
            path = rec.path,
            route = rec.route,
            status = rec.status,
            cache = rec.cache.label(),
            lane = rec.lane,
            bytes = rec.bytes,
            duration = rec.duration.as_secs_f64(),
            upstream_duration = rec.upstream_duration.map(|d| d.as_secs_f64()),
            request_id = rec.request_id,
        );
    }

    #[test]
    fn access_log_is_one_json_line_with_every_field() {
        let text = line(LogFormat::Json, &record("00ff00ff00ff00ff"));
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text}"
        );
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
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
        assert_eq!(line["lane"], "answer");
        assert_eq!(line["bytes"].as_u64(), Some(1234));
        assert_eq!(line["duration"].as_f64(), Some(1.5));
        assert_eq!(line["upstream_duration"].as_f64(), Some(1.25));
        assert_eq!(line["request_id"], "00ff00ff00ff00ff");
    }

    #[test]
    fn timestamps_are_humantimes_to_the_microsecond() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        // Within one second and across seconds, with micros that need leading zeros.
        for offset in [0, 7, 999_999, 1_000_000, 1_000_042, 86_400_123_456, 5] {
            let at = base + Duration::from_micros(offset);
            let mut ours = Vec::new();
            push_timestamp(&mut ours, at);
            let theirs = humantime::format_rfc3339_micros(at).to_string();
            assert_eq!(String::from_utf8(ours).unwrap(), theirs);
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for value in [
            "/plain/path",
            "quote\"back\\slash",
            "tab\tnew\nline\u{1}",
            "Köttbullar/ärtsoppa",
            "",
        ] {
            let mut ours = Vec::new();
            push_string(&mut ours, "path", value);
            let theirs = format!(",\"path\":{}", serde_json::to_string(value).unwrap());
            assert_eq!(String::from_utf8(ours).unwrap(), theirs);
        }
    }

    #[test]
    fn json_lines_match_the_tracing_subscriber_but_the_timestamp() {
        for rec in [
            record("a\"b\\c"),
            AccessRecord {
                client: None,
                upstream_duration: None,
                duration: Duration::from_micros(250),
                cache: CacheStatus::None,
                lane: "answer",
                ..record("1")
            },
        ] {
            let mut ours: serde_json::Value =
                serde_json::from_str(&line(LogFormat::Json, &rec)).unwrap();
            let mut theirs = json_lines("info", || traced(&rec)).remove(0);
            let ts = |v: &mut serde_json::Value| v.as_object_mut().unwrap().remove("timestamp");
            let (a, b) = (ts(&mut ours).unwrap(), ts(&mut theirs).unwrap());
            assert_eq!(
                a.as_str().unwrap().len(),
                b.as_str().unwrap().len(),
                "{a} {b}"
            );
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn text_lines_match_the_tracing_subscriber_but_the_timestamp() {
        let rec = record("00ff");
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter(filter("info", None).unwrap())
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || traced(&rec));
        let theirs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let ours = line(LogFormat::Text, &rec);
        let (_, theirs) = theirs.split_once(' ').unwrap();
        let (_, ours) = ours.split_once(' ').unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn absent_client_and_upstream_duration_are_left_out() {
        let rec = AccessRecord {
            client: None,
            method: "POST",
            path: "/get_clv",
            route: "clv",
            status: 429,
            cache: CacheStatus::None,
            lane: "answer",
            bytes: 0,
            duration: Duration::from_micros(250),
            upstream_duration: None,
            request_id: "1",
        };
        let v: serde_json::Value = serde_json::from_str(&line(LogFormat::Json, &rec)).unwrap();
        let obj = v.as_object().unwrap();
        assert!(!obj.contains_key("client") && !obj.contains_key("upstream_duration"));
        assert_eq!(obj["cache"], "none");
        assert_eq!(obj["duration"].as_f64(), Some(0.00025));
        let text = line(LogFormat::Text, &rec);
        assert!(
            !text.contains("client=") && !text.contains("upstream_duration="),
            "{text}"
        );
    }

    #[test]
    fn no_line_is_lost_while_the_writer_keeps_up() {
        let buffer = Buffer::default();
        let writer =
            Arc::new(AccessWriter::spawn(LogFormat::Json, Box::new(buffer.clone()), 4096).unwrap());
        // 4 threads x 2,000 lines in bursts of 500: each burst fits in the channel.
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for burst in 0..4 {
                        for i in 0..500 {
                            writer.log(&record(&format!("{t}-{burst}-{i}")));
                        }
                        assert!(writer.flush(Duration::from_secs(10)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(writer.flush(Duration::from_secs(10)));
        let lines = parse(&buffer);
        assert_eq!(lines.len(), 8000);
        assert_eq!(writer.dropped(), 0);
        let ids: std::collections::HashSet<&str> = lines
            .iter()
            .map(|l| l["request_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 8000);
    }

    /// A sink that blocks every write until the test lets it go.
    struct Stuck {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        out: Buffer,
    }

    impl io::Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.write(&[]).map(|_| ())
        }
    }

    #[test]
    fn lines_are_dropped_and_counted_when_the_channel_is_full() {
        let open = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let out = Buffer::default();
        let sink = Stuck {
            open: open.clone(),
            out: out.clone(),
        };
        let writer = AccessWriter::spawn(LogFormat::Text, Box::new(sink), 8).unwrap();
        // The writer's buffer (64 KiB) holds ~250 lines before it writes, and then blocks;
        // the channel holds 8 more. Every call returns at once.
        for i in 0..1000 {
            writer.log(&record(&i.to_string()));
        }
        let dropped = writer.dropped();
        assert!(dropped >= 1000 - 8 - 400, "dropped {dropped}");
        {
            let (lock, cv) = &*open;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }
        assert!(writer.flush(Duration::from_secs(10)));
        let written = String::from_utf8(out.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .count() as u64;
        assert_eq!(
            written + dropped,
            1000,
            "written {written}, dropped {dropped}"
        );
        assert_eq!(writer.dropped(), dropped);
    }

    /// A sink that counts the writes that reach it.
    #[derive(Clone, Default)]
    struct CountingSink {
        writes: Arc<AtomicU64>,
        out: Buffer,
    }

    impl io::Write for CountingSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_under_steady_load_are_written_in_batches() {
        let sink = CountingSink::default();
        let writer = AccessWriter::spawn(LogFormat::Json, Box::new(sink.clone()), 4096).unwrap();
        // 2,000 lines, one every 20 µs (50,000 lines/s): a writer that keeps up line by
        // line would write each on its own.
        for i in 0..2000 {
            writer.log(&record(&i.to_string()));
            let until = std::time::Instant::now() + Duration::from_micros(20);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        assert!(writer.flush(Duration::from_secs(10)));
        assert_eq!(parse(&sink.out).len(), 2000);
        let writes = sink.writes.load(Ordering::Relaxed);
        assert!(writes <= 200, "{writes} writes for 2,000 lines");
    }

    #[test]
    fn the_access_log_writes_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let file = open_append(&path).unwrap();
        let writer = AccessWriter::spawn(LogFormat::Json, Box::new(file), 64).unwrap();
        writer.log(&record("1"));
        writer.log(&record("2"));
        assert!(writer.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(open_append(&dir.path().join("no/such/dir.log")).is_err());
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
