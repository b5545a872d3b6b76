//! Small helpers shared by the API modules: typed responses, request URLs, lenient JSON values.

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::header::{CONTENT_TYPE, HOST};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

/// The local address of the connection a request arrived on (inserted by the server).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalAddr(pub SocketAddr);

/// A response extension telling the server to close the connection instead of answering.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropConnection;

/// A JSON response from a serializable value.
pub(crate) fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => with_type(status, "application/json", body),
        Err(err) => internal_error(&format!("could not encode the response: {err}")),
    }
}

/// A JSON response from an already encoded body.
pub(crate) fn json_raw(status: StatusCode, body: impl Into<Body>) -> Response {
    with_type(status, "application/json", body)
}

/// An HTML response.
pub(crate) fn html(status: StatusCode, body: impl Into<Body>) -> Response {
    with_type(status, "text/html; charset=utf-8", body)
}

/// A response with the given content type.
pub(crate) fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Body>,
) -> Response {
    let mut response = (status, body.into()).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// `{"error":"INTERNAL","message":...}` with status 500.
pub(crate) fn internal_error(message: &str) -> Response {
    json(
        StatusCode::INTERNAL_SERVER_ERROR,
        &serde_json::json!({"error": "INTERNAL", "message": message}),
    )
}

/// The response of an injected failure (the `error_rate` knob).
pub(crate) fn injected_failure() -> Response {
    json_raw(
        StatusCode::INTERNAL_SERVER_ERROR,
        r#"{"error":"INTERNAL","message":"injected failure"}"#,
    )
}

/// The URL of the request as received: `http://` + Host header (else the URI's authority, else
/// the local address) + path.
pub(crate) fn request_url(headers: &HeaderMap, uri: &Uri, local: Option<SocketAddr>) -> String {
    let host = headers
        .get(HOST)
        .and_then(|value| value.to_str().ok())
        .filter(|host| !host.is_empty())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|authority| authority.to_string()))
        .or_else(|| local.map(|addr| addr.to_string()))
        .unwrap_or_else(|| "localhost".to_owned());
    format!("http://{host}{}", uri.path())
}

/// An integer as lenient Python validators accept it: a JSON integer or a string holding one.
pub(crate) fn lenient_int(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_from_host_header_or_fallbacks() {
        let uri: Uri = "/api/restaurant/dufva?x=1".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(
            request_url(&headers, &uri, Some("127.0.0.1:9".parse().unwrap())),
            "http://127.0.0.1:9/api/restaurant/dufva"
        );
        headers.insert(HOST, HeaderValue::from_static("menus.local:9001"));
        assert_eq!(
            request_url(&headers, &uri, None),
            "http://menus.local:9001/api/restaurant/dufva"
        );
    }

    #[test]
    fn lenient_ints() {
        assert_eq!(lenient_int(&serde_json::json!(14)), Some(14));
        assert_eq!(lenient_int(&serde_json::json!(" 14 ")), Some(14));
        assert_eq!(lenient_int(&serde_json::json!(1.5)), None);
        assert_eq!(lenient_int(&serde_json::json!(true)), None);
    }
}
