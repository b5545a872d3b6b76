//! The admin listener: health, readiness, Prometheus metrics and the status page
//! (`/status`, `/status.json`), open to anyone who can reach the (by default loopback)
//! address; and the admin API (reload, purge, refresh,
//! config, cache), which needs `Authorization: Bearer <admin.token>` (the scheme in any case).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::control::{Control, PurgeRequest};
use crate::error::{json_error_body, StoaError};
use crate::metrics;
use crate::status;

/// Largest admin request body read.
const MAX_ADMIN_BODY: usize = 64 * 1024;
const JSON: &str = "application/json";

pub struct AdminApp {
    control: Arc<Control>,
    /// Evictions already added to the metrics counter.
    evictions_reported: AtomicU64,
}

/// An answer of the admin listener.
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
    allow: Option<String>,
}

impl Answer {
    fn json(status: StatusCode, value: serde_json::Value) -> Self {
        Answer {
            status,
            content_type: JSON,
            body: value.to_string().into_bytes(),
            allow: None,
        }
    }

    fn error(e: &StoaError) -> Self {
        let allow = match e {
            StoaError::MethodNotAllowed { allow, .. } => Some(allow.clone()),
            _ => None,
        };
        Answer {
            status: e.status(),
            content_type: JSON,
            body: e.body().to_vec(),
            allow,
        }
    }

    fn plain_error(status: StatusCode, kind: &str, message: &str) -> Self {
        Answer {
            status,
            content_type: JSON,
            body: json_error_body(kind, message).to_vec(),
            allow: None,
        }
    }
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched in any case
/// (RFC 9110 §11.1) and any run of spaces or tabs may separate it from the token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches([' ', '\t']))
}

impl AdminApp {
    pub fn new(control: Arc<Control>) -> Self {
        AdminApp {
            control,
            evictions_reported: AtomicU64::new(0),
        }
    }

    /// `None` when the request carries the admin token; else the answer refusing it.
    fn authorize(&self, session: &ServerSession) -> Option<Answer> {
        let gateway = self.control.gateway.load();
        let Some(token) = gateway.config.admin.token.as_deref() else {
            return Some(Answer::plain_error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the admin API is closed: set admin.token (or STOA_ADMIN__TOKEN)",
            ));
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
            None
        } else {
            Some(Answer::plain_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <admin.token>",
            ))
        }
    }

    async fn handle(&self, session: &mut ServerSession) -> Answer {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let read_only = method == Method::GET || method == Method::HEAD;
        let wrong_method = || {
            Answer::error(&StoaError::MethodNotAllowed {
                method: method.to_string(),
                allow: "GET, HEAD".into(),
            })
        };
        match path.as_str() {
            "/healthz" | "/readyz" | "/metrics" | "/status" | "/status.json" if !read_only => {
                wrong_method()
            }
            "/healthz" => Answer::json(StatusCode::OK, json!({"status": "ok"})),
            "/readyz" => {
                let lifecycle = &self.control.lifecycle;
                if lifecycle.is_ready() {
                    Answer::json(StatusCode::OK, json!({"status": "ready"}))
                } else {
                    Answer::plain_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not_ready",
                        lifecycle.not_ready_reason(),
                    )
                }
            }
            "/metrics" => Answer {
                status: StatusCode::OK,
                content_type: metrics::CONTENT_TYPE,
                body: self.render_metrics().into_bytes(),
                allow: None,
            },
            // The status page and its JSON view: open as `/metrics` is.
            "/status" => Answer {
                status: StatusCode::OK,
                content_type: "text/html; charset=utf-8",
                body: status::PAGE.as_bytes().to_vec(),
                allow: None,
            },
            "/status.json" => {
                self.refresh_gauges();
                Answer::json(StatusCode::OK, status::view(&self.control))
            }
            p if p.starts_with("/admin/") => {
                if let Some(refusal) = self.authorize(session) {
                    return refusal;
                }
                self.admin_api(session, &method, p).await
            }
            _ => Answer::error(&StoaError::NoRoute { path }),
        }
    }

    async fn admin_api(&self, session: &mut ServerSession, method: &Method, path: &str) -> Answer {
        let control = &self.control;
        match (method.as_str(), path) {
            ("POST", "/admin/reload") => {
                // With [cluster], every other node reloads its own file too.
                let broadcast = control.announce_reload().await;
                let control = control.clone();
                match tokio::task::spawn_blocking(move || control.reload()).await {
                    Ok(Ok(report)) => Answer::json(
                        StatusCode::OK,
                        json!({"result": "ok", "report": report, "broadcast": broadcast}),
                    ),
                    Ok(Err(errors)) => Answer::json(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({
                            "error": "invalid_config",
                            "message": "the configuration was not changed",
                            "problems": errors.0.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                            "broadcast": broadcast,
                        }),
                    ),
                    Err(e) => Answer::error(&StoaError::Internal(e.to_string())),
                }
            }
            ("POST", "/admin/purge") => {
                let body = match read_body(session).await {
                    Ok(body) => body,
                    Err(e) => return Answer::error(&e),
                };
                let request: PurgeRequest = match serde_json::from_slice(&body) {
                    Ok(r) => r,
                    Err(e) => {
                        return Answer::error(&StoaError::BadRequest(format!(
                            "purge takes {{\"route\"}}, {{\"prefix\"}}, {{\"request\"}} or {{\"tags\"}}, and {{\"soft\"}}: {e}"
                        )))
                    }
                };
                match control.purge(&request).await {
                    Ok(report) => Answer::json(StatusCode::OK, json!(report)),
                    Err(e) => Answer::error(&e),
                }
            }
            ("POST", p) if p.starts_with("/admin/refresh/") => {
                let route = &p["/admin/refresh/".len()..];
                match control.refresh(route).await {
                    Ok(report) => Answer::json(StatusCode::ACCEPTED, json!(report)),
                    Err(e) => Answer::error(&e),
                }
            }
            ("GET", "/admin/config") => {
                let gateway = control.gateway.load();
                Answer::json(StatusCode::OK, gateway.config.source.clone())
            }
            ("GET", "/admin/cache") => {
                let cache = &control.shared.cache;
                let mut routes: serde_json::Map<String, serde_json::Value> = cache
                    .route_counts()
                    .into_iter()
                    .map(|(route, (entries, bytes))| {
                        (route, json!({"entries": entries, "bytes": bytes}))
                    })
                    .collect();
                // Every cached route: the request headers it learned its answers vary on.
                let gateway = control.gateway.load();
                for route in gateway.routes.routes() {
                    let Some(cached) = &route.cache else { continue };
                    let learned: Vec<String> = cached
                        .vary
                        .snapshot()
                        .iter()
                        .map(|name| name.to_string())
                        .collect();
                    let slot = routes
                        .entry(route.spec.name.clone())
                        .or_insert_with(|| json!({"entries": 0, "bytes": 0}));
                    slot["vary"] = json!({
                        "learned": learned,
                        "max_learned": crate::cache::vary::MAX_LEARNED,
                        "max_variants": cached.settings.max_variants,
                    });
                }
                Answer::json(
                    StatusCode::OK,
                    json!({
                        "entries": cache.store.len(),
                        "bytes": cache.store.bytes(),
                        "max_bytes": cache.store.max_bytes(),
                        "evictions": cache.store.evictions(),
                        "fetches_in_flight": cache.fetches_in_flight(),
                        "routes": routes,
                        "l2": cache.tier.as_ref().map(|tier| {
                            let mut l2: serde_json::Map<String, serde_json::Value> = tier
                                .metrics()
                                .snapshot()
                                .into_iter()
                                .map(|(name, n)| (name.to_string(), json!(n)))
                                .collect();
                            l2.insert("up".into(), json!(tier.is_up()));
                            l2
                        }),
                    }),
                )
            }
            (_, "/admin/reload" | "/admin/purge" | "/admin/config" | "/admin/cache") => {
                Answer::error(&StoaError::MethodNotAllowed {
                    method: method.to_string(),
                    allow: if path.ends_with("config") || path.ends_with("cache") {
                        "GET".into()
                    } else {
                        "POST".into()
                    },
                })
            }
            _ => Answer::error(&StoaError::NoRoute {
                path: path.to_string(),
            }),
        }
    }

    /// Brings the gauges up to date, then renders the exposition.
    fn render_metrics(&self) -> String {
        self.refresh_gauges();
        self.control.shared.metrics.render()
    }

    /// Sets the gauges a scrape reads (cache size and evictions, requests in flight).
    fn refresh_gauges(&self) {
        let control = &self.control;
        let store = &control.shared.cache.store;
        let metrics = &control.shared.metrics;
        metrics.set_cache_stats(store.len() as u64, store.bytes());
        let evictions = store.evictions();
        let before = self.evictions_reported.swap(evictions, Ordering::AcqRel);
        metrics.cache_evicted(evictions.saturating_sub(before));
        metrics.set_in_flight(control.lifecycle.in_flight());
    }
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, StoaError> {
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err(StoaError::BodyTooLarge {
                        limit: MAX_ADMIN_BODY as u64,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.to_vec()),
            Err(e) => return Err(StoaError::BadRequest(e.to_string())),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let answer = self.handle(session).await;
        let mut builder = Response::builder()
            .status(answer.status)
            .header(http::header::CONTENT_TYPE, answer.content_type)
            .header(http::header::CONTENT_LENGTH, answer.body.len())
            .header(http::header::CACHE_CONTROL, "no-store");
        if let Some(allow) = answer.allow {
            builder = builder.header(http::header::ALLOW, allow);
        }
        builder.body(answer.body).unwrap_or_else(|_| {
            let mut r = Response::new(Vec::new());
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, constant_time_eq};

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-123", b"secret-token-124"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for value in [
            "Bearer t0k",
            "bearer t0k",
            "BEARER\tt0k",
            "bEaReR   t0k",
            " Bearer \t t0k ",
        ] {
            assert_eq!(bearer_token(value), Some("t0k"), "{value:?}");
        }
        for value in [
            "",
            "Bearer",
            "Bearer ",
            "Bearert0k",
            "Basic t0k",
            "Bearers t0k",
        ] {
            assert_ne!(bearer_token(value), Some("t0k"), "{value:?}");
        }
    }
}
