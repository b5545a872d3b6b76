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
//! no allocation.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, Tracer as _};
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
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
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
        if !enabled() {
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
        let span = tracer
            .span_builder(method.to_string())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", uri.path().to_string()),
            ])
            .start_with_context(tracer, &parent);
        Some(RequestTrace {
            cx: parent.with_span(span),
            method: method.clone(),
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

    /// [`RequestTrace::inject`] for a head pingora sends upstream (pass-through routes).
    pub fn inject_head(&self, head: &mut pingora::http::RequestHeader) -> pingora::Result<()> {
        let mut fields = http::HeaderMap::new();
        inject(&self.cx, &mut fields);
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
    pub fn finish(self, route: Option<&str>, cache: Option<&str>, status: u16) {
        let span = self.cx.span();
        if let Some(route) = route {
            span.set_attribute(KeyValue::new("http.route", route.to_string()));
            span.update_name(format!("{} {route}", self.method));
        }
        if let Some(cache) = cache {
            span.set_attribute(KeyValue::new("stoa.cache", cache.to_string()));
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

/// Writes `cx`'s span as `traceparent` / `tracestate` into `headers`, replacing any.
pub fn inject(cx: &Context, headers: &mut http::HeaderMap) {
    headers.remove("traceparent");
    headers.remove("tracestate");
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// A span of stoa's work under `parent` (or the current context's span; a new trace when
/// there is none): `None` when traces are off.
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
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .start_with_context(tracer, parent);
    Some(parent.with_span(span))
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
