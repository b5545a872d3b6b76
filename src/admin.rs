//! The admin listener: health, readiness and Prometheus metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::error::{json_error_body, StoaError};
use crate::gateway::Gateway;
use crate::lifecycle::Lifecycle;
use crate::metrics::{self, Metrics};

pub struct AdminApp {
    lifecycle: Arc<Lifecycle>,
    metrics: Arc<Metrics>,
    gateway: Arc<ArcSwap<Gateway>>,
    /// Evictions already added to the metrics counter.
    evictions_reported: AtomicU64,
}

const JSON: &str = "application/json";

impl AdminApp {
    pub fn new(
        lifecycle: Arc<Lifecycle>,
        metrics: Arc<Metrics>,
        gateway: Arc<ArcSwap<Gateway>>,
    ) -> Self {
        AdminApp {
            lifecycle,
            metrics,
            gateway,
            evictions_reported: AtomicU64::new(0),
        }
    }

    fn handle(&self, method: &http::Method, path: &str) -> (StatusCode, &'static str, Vec<u8>) {
        let read_only = method == http::Method::GET || method == http::Method::HEAD;
        match path {
            "/healthz" | "/readyz" | "/metrics" if !read_only => {
                error(&StoaError::MethodNotAllowed {
                    method: method.to_string(),
                    allow: "GET, HEAD".into(),
                })
            }
            "/healthz" => (StatusCode::OK, JSON, br#"{"status":"ok"}"#.to_vec()),
            "/readyz" if self.lifecycle.is_ready() => {
                (StatusCode::OK, JSON, br#"{"status":"ready"}"#.to_vec())
            }
            "/readyz" => {
                let why = if self.lifecycle.is_draining() {
                    "shutting down"
                } else {
                    "starting"
                };
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    JSON,
                    json_error_body("not_ready", why).to_vec(),
                )
            }
            "/metrics" => (
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                self.render_metrics().into_bytes(),
            ),
            _ => error(&StoaError::NoRoute {
                path: path.to_string(),
            }),
        }
    }

    /// Brings the gauges up to date, then renders the exposition.
    fn render_metrics(&self) -> String {
        let gateway = self.gateway.load();
        let store = &gateway.cache.store;
        self.metrics
            .set_cache_stats(store.len() as u64, store.bytes());
        let evictions = store.evictions();
        let before = self.evictions_reported.swap(evictions, Ordering::AcqRel);
        self.metrics.cache_evicted(evictions.saturating_sub(before));
        self.metrics.set_in_flight(self.lifecycle.in_flight());
        self.metrics.render()
    }
}

fn error(e: &StoaError) -> (StatusCode, &'static str, Vec<u8>) {
    (e.status(), JSON, e.body().to_vec())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (status, content_type, body) = self.handle(&req.method, req.uri.path());
        let mut builder = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .header(http::header::CACHE_CONTROL, "no-store");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            builder = builder.header(http::header::ALLOW, "GET, HEAD");
        }
        builder.body(body).unwrap_or_else(|_| {
            let mut r = Response::new(Vec::new());
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }
}
