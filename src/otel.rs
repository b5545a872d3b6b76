//! OpenTelemetry traces (`[tracing]`): a span per request, its cache lookup, the fill that
//! fetched its answer (with a link to it from every request that waited on a fill it did
//! not start), the upstream call and the shared tier's Redis lease. W3C `traceparent` /
//! `tracestate` are read from clients and sent upstream with stoa's span as parent.
//!
//! Spans go to an OTLP/HTTP (protobuf) collector through the SDK's batch processor, on a
//! thread of its own, off the request path; its queue is bounded and what does not fit
//! (or fails to export) is counted in `stoa_trace_spans_dropped_total`.
//!
//! Off (no `otlp_endpoint`), every entry point is one atomic load and a branch: no span,
//! no allocation. On, the sampling decision comes first and costs a random draw (or a look
//! at the client's `traceparent` flags): a request left out of the sample creates no span,
//! context or attribute at all, and neither does the work it starts.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;

pub use opentelemetry::context::FutureExt;

use crate::config::TraceSettings;

/// Spans waiting for export at most; more are dropped (and counted).
const QUEUE: usize = 4096;
/// How often a batch goes to the collector.
const EXPORT_EVERY: Duration = Duration::from_millis(500);
/// How long one export may take: a dead or slow collector costs the exporter thread that.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

static ON: AtomicBool = AtomicBool::new(false);
static TRACING: OnceLock<Tracing> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// `sample_ratio` scaled to `u64::MAX`: a root trace is kept when a random `u64` is below.
static KEEP_BELOW: AtomicU64 = AtomicU64::new(0);

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// Whether traces are on: the one check every entry point makes first.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Spans dropped so far: the export queue was full, or the collector refused or missed them.
pub fn spans_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Starts the exporter (call once, at start); `None` leaves traces off.
pub fn init(settings: Option<&TraceSettings>) -> anyhow::Result<()> {
    let Some(settings) = settings else {
        return Ok(());
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", settings.otlp_endpoint))
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let pending = Arc::new(AtomicUsize::new(0));
    let batches = BatchSpanProcessor::builder(Counted {
        inner: exporter,
        pending: pending.clone(),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(QUEUE)
            .with_max_export_batch_size(512)
            .with_scheduled_delay(EXPORT_EVERY)
            .build(),
    )
    .build();
    // The sample is drawn before any span exists (see `RequestTrace::start`): what reaches
    // the SDK is kept.
    let sampler = Sampler::AlwaysOn;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Bounded {
            inner: batches,
            pending,
        })
        .with_sampler(sampler)
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build();
    use opentelemetry::trace::TracerProvider as _;
    let tracer = provider.tracer("stoa");
    if TRACING.set(Tracing { provider, tracer }).is_ok() {
        KEEP_BELOW.store(keep_below(settings.sample_ratio), Ordering::Relaxed);
        ON.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// Exports what is queued (at most a few seconds), at shutdown.
pub fn shutdown() {
    if let Some(t) = TRACING.get() {
        ON.store(false, Ordering::Relaxed);
        let _ = t.provider.shutdown_with_timeout(Duration::from_secs(5));
    }
}

/// The threshold [`KEEP_BELOW`] holds for `ratio` (0.0 keeps nothing, 1.0 everything).
fn keep_below(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio > 0.0 {
        // Exact enough: the ratio is a sampling rate, not a count.
        (ratio * u64::MAX as f64) as u64
    } else {
        0
    }
}

/// Whether a request is in the sample: a client's `traceparent` decides by its `sampled`
/// flag (W3C Trace Context, as a parent-based sampler would); without one, a random draw
/// against `sample_ratio`. A malformed `traceparent` counts as absent.
fn sampled(headers: &http::HeaderMap) -> bool {
    if let Some(flags) = headers
        .get("traceparent")
        .and_then(|v| parent_flags(v.as_bytes()))
    {
        return flags & 1 == 1;
    }
    let below = KEEP_BELOW.load(Ordering::Relaxed);
    below == u64::MAX || fastrand::u64(..) < below
}

/// The trace flags of a well-formed version-00 `traceparent`
/// (`00-<32 hex>-<16 hex>-<2 hex>`), or of a later version's first 55 bytes.
fn parent_flags(v: &[u8]) -> Option<u8> {
    if v.len() < 55 || (v.len() > 55 && (v.starts_with(b"00") || v[55] != b'-')) {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' || v.starts_with(b"ff") {
        return None;
    }
    let hex = |b: &[u8]| -> Option<u64> {
        std::str::from_utf8(b)
            .ok()
            .filter(|s| {
                s.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            })
            .and_then(|s| u64::from_str_radix(s, 16).ok())
    };
    hex(&v[..2])?;
    // An all-zero trace or parent id is invalid.
    let trace = (hex(&v[3..19])?, hex(&v[19..35])?);
    let parent = hex(&v[36..52])?;
    if trace == (0, 0) || parent == 0 {
        return None;
    }
    u8::try_from(hex(&v[53..55])?).ok()
}

fn tracer() -> Option<&'static SdkTracer> {
    if !enabled() {
        return None;
    }
    TRACING.get().map(|t| &t.tracer)
}

/// One request's span, from the request head to the access log line.
pub struct RequestTrace {
    cx: Context,
    method: http::Method,
    /// The span of the current upstream attempt of a pass-through request, and how many
    /// attempts there were.
    attempt: Option<Context>,
    attempts: i64,
}

impl RequestTrace {
    /// The request's span, child of the client's `traceparent` if it sent one; `None` when
    /// traces are off.
    #[inline]
    pub fn start(
        method: &http::Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
    ) -> Option<RequestTrace> {
        if !enabled() || !sampled(headers) {
            return None;
        }
        Self::start_slow(method, uri, headers)
    }

    #[cold]
    fn start_slow(
        method: &http::Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
    ) -> Option<RequestTrace> {
        let tracer = tracer()?;
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let name = method_name(method);
        let span = tracer
            .span_builder(name.clone())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new(
                    "http.request.method",
                    opentelemetry::StringValue::from(name),
                ),
                KeyValue::new("url.path", uri.path().to_string()),
            ])
            .start_with_context(tracer, &parent);
        Some(RequestTrace {
            cx: parent.with_span(span),
            method: method.clone(),
            attempt: None,
            attempts: 0,
        })
    }

    /// The context the request's work runs in (its span the parent of what it starts).
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// Puts this request's span in `headers` as the `traceparent` (and `tracestate`) the
    /// upstream sees, in place of the client's.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        inject(&self.cx, headers);
    }

    /// A pass-through request's next upstream attempt: its own span (client kind), the
    /// parent `head` names upstream. An attempt before it (a retry on a new connection)
    /// ends here, marked retried.
    pub fn attempt(&mut self, head: &mut pingora::http::RequestHeader) -> pingora::Result<()> {
        if let Some(before) = self.attempt.take() {
            attr(&before, "stoa.retried", true);
            before
                .span()
                .set_status(opentelemetry::trace::Status::error("retried"));
            end(&before);
        }
        self.attempts += 1;
        let attempt = child(Some(&self.cx), "stoa.upstream", SpanKind::Client);
        let Some(attempt) = attempt else {
            return Ok(());
        };
        attr(&attempt, "stoa.attempt", self.attempts);
        let mut fields = http::HeaderMap::new();
        inject(&attempt, &mut fields);
        self.attempt = Some(attempt);
        head.remove_header("traceparent");
        head.remove_header("tracestate");
        for (name, value) in fields {
            if let Some(name) = name {
                head.insert_header(name, value)?;
            }
        }
        Ok(())
    }

    /// Ends the span with what the access log line says.
    pub fn finish(
        self,
        route: Option<&str>,
        lane: &'static str,
        cache: Option<&'static str>,
        status: u16,
    ) {
        if let Some(attempt) = &self.attempt {
            attr(attempt, "http.response.status_code", i64::from(status));
            if status >= 500 || status == 0 {
                attempt
                    .span()
                    .set_status(opentelemetry::trace::Status::error(""));
            }
            end(attempt);
        }
        let span = self.cx.span();
        if let Some(route) = route {
            span.set_attribute(KeyValue::new("http.route", route.to_string()));
            span.update_name(format!("{} {route}", self.method));
        }
        span.set_attribute(KeyValue::new("stoa.lane", lane));
        if let Some(cache) = cache {
            span.set_attribute(KeyValue::new("stoa.cache", cache));
        }
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 || status == 0 {
            span.set_status(opentelemetry::trace::Status::error(""));
        }
        span.end();
    }
}

/// A method's name for a span: the common ones without an allocation.
fn method_name(method: &http::Method) -> std::borrow::Cow<'static, str> {
    let name = match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        _ => return method.to_string().into(),
    };
    std::borrow::Cow::Borrowed(name)
}

/// Writes `cx`'s span as `traceparent` / `tracestate` into `headers`, replacing any.
pub fn inject(cx: &Context, headers: &mut http::HeaderMap) {
    headers.remove("traceparent");
    headers.remove("tracestate");
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// Gives a fetch left out of the sample a `traceparent` of its own, unsampled (flags
/// `00`), replacing any: the upstream can still tie its logs to one fetch, and no span is
/// made. Nothing when traces are off.
pub fn inject_unsampled(headers: &mut http::HeaderMap) {
    if !enabled() {
        return;
    }
    let (trace, span) = (fastrand::u128(1..), fastrand::u64(1..));
    let value = format!("00-{trace:032x}-{span:016x}-00");
    headers.remove("tracestate");
    if let Ok(value) = http::HeaderValue::from_str(&value) {
        headers.insert("traceparent", value);
    }
}

/// A span of stoa's work under `parent` (or the current context's span): `None` when
/// traces are off or there is no span to be a child of (the work of a request left out of
/// the sample).
pub fn child(parent: Option<&Context>, name: &'static str, kind: SpanKind) -> Option<Context> {
    let tracer = tracer()?;
    let current;
    let parent = match parent {
        Some(p) => p,
        None => {
            current = Context::current();
            &current
        }
    };
    if !parent.has_active_span() {
        return None;
    }
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .start_with_context(tracer, parent);
    Some(parent.with_span(span))
}

/// The span of one call of an aggregate's leg, under the current one (the aggregate's
/// fill): the leg's own request, lookup and fill run within it.
pub fn leg(name: &str, method: &http::Method, path: &str) -> Option<Context> {
    let cx = child(None, "stoa.aggregate.leg", SpanKind::Internal)?;
    attr(&cx, "stoa.leg", name.to_string());
    attr(&cx, "http.request.method", method.to_string());
    attr(&cx, "url.path", path.to_string());
    Some(cx)
}

/// Ends a leg's span with the status its call answered (0: none, timed out or failed).
pub fn end_leg(cx: &Context, status: u16) {
    attr(cx, "http.response.status_code", i64::from(status));
    if status == 0 || status >= 400 {
        cx.span()
            .set_status(opentelemetry::trace::Status::error(""));
    }
    end(cx);
}

/// The span of a cache lookup in memory, under the request's.
pub fn lookup(request: &Context) -> Option<Context> {
    child(Some(request), "stoa.cache.lookup", SpanKind::Internal)
}

/// Ends a lookup's span: whether memory answered.
pub fn end_lookup(lookup: Context, answered: bool) {
    attr(&lookup, "stoa.cache.found", answered);
    end(&lookup);
}

/// A fill's span, child of the request that led it (the current context); its context is
/// what the fill's waiters link to.
pub fn start_fill() -> Option<Context> {
    child(None, "stoa.fill", SpanKind::Internal)
}

/// The span context of `cx`'s span, for a link.
pub fn span_context(cx: &Context) -> SpanContext {
    cx.span().span_context().clone()
}

/// Links the current span (a request that waited) to the span that answered it.
pub fn link_current(to: &SpanContext, why: &'static str) {
    if !enabled() || !to.is_valid() {
        return;
    }
    let cx = Context::current();
    let span = cx.span();
    span.add_link(to.clone(), vec![KeyValue::new("stoa.link", why)]);
    span.set_attribute(KeyValue::new("stoa.coalesced", true));
}

/// The current span as `<trace id>-<span id>` (hex), to name it across nodes; `None` when
/// traces are off or no span is current.
pub fn current_ids() -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| format!("{}-{}", sc.trace_id(), sc.span_id()))
}

/// Links the current span to the span a lease token names (`...@<trace id>-<span id>`, see
/// [`current_ids`]), a fill on another node this one waited for.
pub fn link_current_to_token(token: &[u8], why: &'static str) {
    if !enabled() {
        return;
    }
    let Some(ids) = token
        .iter()
        .rposition(|&b| b == b'@')
        .and_then(|at| std::str::from_utf8(&token[at + 1..]).ok())
    else {
        return;
    };
    let Some((trace, span)) = ids.split_once('-') else {
        return;
    };
    let (Ok(trace), Ok(span)) = (TraceId::from_hex(trace), SpanId::from_hex(span)) else {
        return;
    };
    let to = SpanContext::new(trace, span, TraceFlags::SAMPLED, true, Default::default());
    if !to.is_valid() {
        return;
    }
    let cx = Context::current();
    if cx.has_active_span() {
        cx.span()
            .add_link(to, vec![KeyValue::new("stoa.link", why)]);
    }
}

/// Sets an attribute on `cx`'s span.
pub fn attr(cx: &Context, key: &'static str, value: impl Into<opentelemetry::Value>) {
    cx.span().set_attribute(KeyValue::new(key, value));
}

/// Ends `cx`'s span now (it also ends when the last context holding it is dropped).
pub fn end(cx: &Context) {
    cx.span().end();
}

/// Runs `fut` with `cx` current, when there is one.
pub async fn within<F: Future>(cx: Option<Context>, fut: F) -> F::Output {
    match cx {
        Some(cx) => fut.with_context(cx).await,
        None => fut.await,
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The batch processor, bounded by what is queued or being exported: a span past
/// [`QUEUE`] is dropped and counted here (the SDK's own count of drops is private).
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    pending: Arc<AtomicUsize>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.pending.fetch_add(1, Ordering::Relaxed) >= QUEUE {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting the spans of batches that failed as dropped.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    pending: Arc<AtomicUsize>,
}

/// Takes a batch's spans off the pending count however its export ends.
struct Done(Arc<AtomicUsize>, usize);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let done = Done(self.pending.clone(), batch.len());
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            if result.is_err() {
                DROPPED.fetch_add(done.1 as u64, Ordering::Relaxed);
            }
            drop(done);
            result
        }
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::{keep_below, parent_flags};

    #[test]
    fn a_traceparents_flags_are_read_only_from_a_well_formed_one() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parent_flags(tp.as_bytes()), Some(1));
        let off = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(parent_flags(off.as_bytes()), Some(0));
        // A later version may append fields after a dash.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert_eq!(parent_flags(later.as_bytes()), Some(1));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parent_flags(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn the_sample_threshold_spans_nothing_to_everything() {
        assert_eq!(keep_below(0.0), 0);
        assert_eq!(keep_below(1.0), u64::MAX);
        let tenth = keep_below(0.1) as f64 / u64::MAX as f64;
        assert!((tenth - 0.1).abs() < 1e-9, "{tenth}");
    }
}
