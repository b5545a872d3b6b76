//! Every error stoa answers itself, and the one table from error to HTTP status.

use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;

/// An error answered to the client by stoa itself, as JSON
/// `{"error":"<kind>","message":"<sentence>"}`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoaError {
    #[error("no route matches {path}")]
    NoRoute { path: String },
    #[error("method {method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: String },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A request path stoa will not route or forward (see [`crate::routes::normalize_path`]).
    #[error("bad path: {0}")]
    BadPath(#[from] crate::routes::PathError),
    #[error("the request target is longer than the limit of {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("the request's header fields are larger than the limit of {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("the {what} did not arrive within {timeout_ms} ms")]
    RequestTimeout {
        what: &'static str,
        timeout_ms: u128,
    },
    #[error("upstream {upstream} could not be reached: {detail}")]
    UpstreamUnreachable { upstream: String, detail: String },
    #[error("upstream {upstream} did not answer within {timeout_ms} ms")]
    UpstreamTimeout { upstream: String, timeout_ms: u128 },
    #[error("upstream {upstream} failed: {detail}")]
    UpstreamFailed { upstream: String, detail: String },
    #[error("TLS to upstream {upstream} failed: {detail}")]
    UpstreamTls { upstream: String, detail: String },
    #[error("leg {leg:?} of {route} failed: {detail}")]
    LegFailed {
        route: String,
        leg: String,
        detail: String,
    },
    #[error(
        "too many requests under rate limit policy {policy}; retry after {retry_after_secs} s"
    )]
    RateLimited {
        policy: String,
        retry_after_secs: u64,
    },
    #[error("upstream {upstream} is at capacity; retry after {retry_after_secs} s")]
    Overloaded {
        upstream: String,
        retry_after_secs: u64,
    },
    #[error("stoa is not ready to serve")]
    NotReady,
    #[error("internal error: {0}")]
    Internal(String),
}

impl StoaError {
    /// The HTTP status for this error: the single place that decides it.
    pub fn status(&self) -> StatusCode {
        match self {
            StoaError::NoRoute { .. } => StatusCode::NOT_FOUND,
            StoaError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            StoaError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            StoaError::BadRequest(_) | StoaError::BadPath(_) => StatusCode::BAD_REQUEST,
            StoaError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            StoaError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            StoaError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            StoaError::UpstreamUnreachable { .. }
            | StoaError::UpstreamFailed { .. }
            | StoaError::UpstreamTls { .. }
            | StoaError::LegFailed { .. } => StatusCode::BAD_GATEWAY,
            StoaError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            StoaError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            StoaError::Overloaded { .. } | StoaError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            StoaError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable kind, the `error` field of the JSON body.
    pub fn kind(&self) -> &'static str {
        match self {
            StoaError::NoRoute { .. } => "not_found",
            StoaError::MethodNotAllowed { .. } => "method_not_allowed",
            StoaError::BodyTooLarge { .. } => "payload_too_large",
            StoaError::BadRequest(_) => "bad_request",
            StoaError::BadPath(_) => "bad_path",
            StoaError::UriTooLong { .. } => "uri_too_long",
            StoaError::HeadersTooLarge { .. } => "header_fields_too_large",
            StoaError::RequestTimeout { .. } => "request_timeout",
            StoaError::UpstreamUnreachable { .. } => "upstream_unreachable",
            StoaError::UpstreamTimeout { .. } => "upstream_timeout",
            StoaError::UpstreamTls { .. } => "upstream_tls",
            StoaError::UpstreamFailed { .. } | StoaError::LegFailed { .. } => "upstream_failed",
            StoaError::RateLimited { .. } => "rate_limited",
            StoaError::Overloaded { .. } => "upstream_overloaded",
            StoaError::NotReady => "not_ready",
            StoaError::Internal(_) => "internal",
        }
    }

    /// This error as a whole HTTP/1.1 answer that closes its connection: what a connection
    /// answers when no request could be read from it (a head too slow, too large or
    /// malformed).
    pub fn closing_answer(&self) -> Vec<u8> {
        let status = self.status();
        let body = self.body();
        let mut answer = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             cache-control: no-store\r\nconnection: close\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        if let Some((name, value)) = self.extra_header() {
            answer.push_str(&format!("{name}: {value}\r\n"));
        }
        answer.push_str("\r\n");
        let mut answer = answer.into_bytes();
        answer.extend_from_slice(&body);
        answer
    }

    /// The extra response header this error carries: `Allow` on 405, `Retry-After` on
    /// 429 and 503.
    pub fn extra_header(&self) -> Option<(&'static str, String)> {
        match self {
            StoaError::MethodNotAllowed { allow, .. } => Some(("allow", allow.clone())),
            StoaError::RateLimited {
                retry_after_secs, ..
            }
            | StoaError::Overloaded {
                retry_after_secs, ..
            } => Some(("retry-after", retry_after_secs.to_string())),
            _ => None,
        }
    }

    /// The JSON body sent to the client.
    pub fn body(&self) -> Bytes {
        json_error_body(self.kind(), &self.to_string())
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

/// Renders `{"error":kind,"message":message}`.
pub fn json_error_body(kind: &str, message: &str) -> Bytes {
    // Serializing two strings cannot fail; fall back to a fixed body all the same.
    serde_json::to_vec(&ErrorBody {
        error: kind,
        message,
    })
    .map(Bytes::from)
    .unwrap_or_else(|_| Bytes::from_static(br#"{"error":"internal","message":"error"}"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_json_with_kind_and_message() {
        let e = StoaError::MethodNotAllowed {
            method: "POST".into(),
            allow: "GET, HEAD".into(),
        };
        assert_eq!(e.status(), StatusCode::METHOD_NOT_ALLOWED);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"], "method_not_allowed");
        assert!(v["message"].as_str().unwrap().contains("GET, HEAD"));
        assert_eq!(e.extra_header(), Some(("allow", "GET, HEAD".to_string())));
        let e = StoaError::RateLimited {
            policy: "default".into(),
            retry_after_secs: 3,
        };
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.extra_header(), Some(("retry-after", "3".to_string())));
    }

    #[test]
    fn messages_with_quotes_stay_valid_json() {
        let e = StoaError::NoRoute {
            path: "/a\"b".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["message"], "no route matches /a\"b");
    }
}
