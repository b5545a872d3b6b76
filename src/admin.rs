//! The admin listener: health and readiness (metrics and the admin API join it later).

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::error::{json_error_body, StoaError};
use crate::lifecycle::Lifecycle;

pub struct AdminApp {
    lifecycle: Arc<Lifecycle>,
}

impl AdminApp {
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        AdminApp { lifecycle }
    }

    fn handle(&self, method: &http::Method, path: &str) -> (StatusCode, Vec<u8>) {
        let read_only = method == http::Method::GET || method == http::Method::HEAD;
        match path {
            "/healthz" | "/readyz" if !read_only => error(&StoaError::MethodNotAllowed {
                method: method.to_string(),
                allow: "GET, HEAD".into(),
            }),
            "/healthz" => (StatusCode::OK, br#"{"status":"ok"}"#.to_vec()),
            "/readyz" if self.lifecycle.is_ready() => {
                (StatusCode::OK, br#"{"status":"ready"}"#.to_vec())
            }
            "/readyz" => {
                let why = if self.lifecycle.is_draining() {
                    "shutting down"
                } else {
                    "starting"
                };
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json_error_body("not_ready", why).to_vec(),
                )
            }
            _ => error(&StoaError::NoRoute {
                path: path.to_string(),
            }),
        }
    }
}

fn error(e: &StoaError) -> (StatusCode, Vec<u8>) {
    (e.status(), e.body().to_vec())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (status, body) = self.handle(&req.method, req.uri.path());
        let mut builder = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
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
