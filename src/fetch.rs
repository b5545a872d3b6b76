//! Upstream fetches for cached routes: one pooled HTTP client per upstream, with the
//! upstream's timeouts, whose whole answer is read into memory.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use std::sync::Arc;

use crate::config::Upstream;
use crate::error::StoaError;
use crate::ratelimit::UpstreamGuard;

/// Largest upstream body a cached route reads into memory.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// A request to send upstream.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub method: Method,
    /// Path and query as sent upstream (after rewrite and base path).
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A complete upstream answer.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A pooled client for one upstream, within the upstream's protection limits.
#[derive(Clone)]
pub struct UpstreamClient {
    client: reqwest::Client,
    guard: Arc<UpstreamGuard>,
    name: String,
    base_url: String,
    host_header: HeaderValue,
    timeout: Duration,
    connect_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(upstream: &Upstream, guard: Arc<UpstreamGuard>) -> Result<Self, StoaError> {
        let client = reqwest::Client::builder()
            .connect_timeout(upstream.connect_timeout)
            .timeout(upstream.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StoaError::Internal(format!("cannot build the upstream client: {e}")))?;
        let host_header = HeaderValue::from_str(&upstream.host_header)
            .map_err(|e| StoaError::Internal(format!("bad Host header: {e}")))?;
        Ok(UpstreamClient {
            client,
            guard,
            name: upstream.name.clone(),
            base_url: format!("http://{}", upstream.addr),
            host_header,
            timeout: upstream.timeout,
            connect_timeout: upstream.connect_timeout,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `req` and reads the whole answer, holding one of the upstream's slots (waiting
    /// at most its `queue_timeout` for one). Errors are the ones stoa answers with.
    pub async fn fetch(&self, req: FetchRequest) -> Result<Fetched, StoaError> {
        let _permit = self
            .guard
            .acquire()
            .await
            .map_err(|o| StoaError::Overloaded {
                upstream: self.name.clone(),
                retry_after_secs: o.retry_after_secs,
            })?;
        let url = format!("{}{}", self.base_url, req.path_and_query);
        let mut headers = req.headers;
        headers.insert(http::header::HOST, self.host_header.clone());
        let mut builder = self.client.request(req.method, url).headers(headers);
        if !req.body.is_empty() {
            builder = builder.body(req.body);
        }
        let mut response = builder.send().await.map_err(|e| self.error(&e))?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.error(&e))? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(StoaError::UpstreamFailed {
                    upstream: self.name.clone(),
                    detail: format!("answer larger than {MAX_RESPONSE_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            status,
            headers,
            body: body.freeze(),
        })
    }

    fn error(&self, e: &reqwest::Error) -> StoaError {
        let upstream = self.name.clone();
        if e.is_timeout() {
            let timeout = if e.is_connect() {
                self.connect_timeout
            } else {
                self.timeout
            };
            StoaError::UpstreamTimeout {
                upstream,
                timeout_ms: timeout.as_millis(),
            }
        } else if e.is_connect() {
            StoaError::UpstreamUnreachable {
                upstream,
                detail: root_cause(e),
            }
        } else {
            StoaError::UpstreamFailed {
                upstream,
                detail: root_cause(e),
            }
        }
    }
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .finish()
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
