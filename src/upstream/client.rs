//! Fetches (cached routes, aggregate legs, refresh hooks): one pooled HTTP client per
//! upstream, with the upstream's timeouts. An answer is read into memory up to a limit; a
//! larger one is handed over as a stream, to be written to its client chunk by chunk.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::error::{self, Failure};
use super::headers;
use super::peer::{IDLE_TIMEOUT, MAX_IDLE_PER_UPSTREAM};
use crate::cache::origin::{Answer, FetchRequest, Fetched, Pending, Rest, Streaming};
use crate::config::{Upstream, UpstreamTls};
use crate::error::StoaError;
use crate::ratelimit::{UpstreamGuard, UpstreamPermit};

/// Largest upstream body read whole where it must be whole (aggregate legs, refresh hooks).
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// The unread part of a streamed answer: still on the upstream connection, holding the
/// upstream slot until dropped.
struct UpstreamRest {
    response: reqwest::Response,
    client: UpstreamClient,
    _permit: UpstreamPermit,
}

impl Rest for UpstreamRest {
    /// An upstream that stalls longer than its `timeout` between two reads fails the stream.
    fn next_chunk(&mut self) -> Pending<'_, Option<Bytes>> {
        Box::pin(async move {
            self.response
                .chunk()
                .await
                .map_err(|e| self.client.error(&e))
        })
    }

    fn too_large(&self, limit: usize) -> StoaError {
        self.client.too_large(limit)
    }
}

/// A pooled client for one upstream, within the upstream's protection limits.
#[derive(Clone)]
pub struct UpstreamClient {
    client: reqwest::Client,
    guard: Arc<UpstreamGuard>,
    upstream: Arc<Upstream>,
    base_url: String,
    host_header: HeaderValue,
}

impl UpstreamClient {
    pub fn new(upstream: Arc<Upstream>, guard: Arc<UpstreamGuard>) -> Result<Self, StoaError> {
        // `timeout` bounds each read; [`UpstreamClient::fetch_within`] bounds the whole
        // answer it holds, while a streamed answer may take as long as its client reads.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(upstream.connect_timeout)
            .read_timeout(upstream.timeout)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_PER_UPSTREAM)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none());
        let base_url = match &upstream.tls {
            None => format!("http://{}", upstream.addr),
            Some(tls) => {
                builder = tls_settings(builder, &upstream, tls)?;
                format!("https://{}", upstream.host_header)
            }
        };
        let client = builder
            .build()
            .map_err(|e| StoaError::Internal(format!("cannot build the upstream client: {e}")))?;
        let host_header = HeaderValue::from_str(&upstream.host_header)
            .map_err(|e| StoaError::Internal(format!("bad Host header: {e}")))?;
        Ok(UpstreamClient {
            client,
            guard,
            base_url,
            host_header,
            upstream,
        })
    }

    /// The `Host` header sent upstream, prepared once.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    pub fn name(&self) -> &str {
        &self.upstream.name
    }

    /// One of the upstream's slots, waiting at most its `queue_timeout`; `Err` is the 503.
    pub async fn acquire(&self) -> Result<UpstreamPermit, StoaError> {
        self.guard
            .acquire()
            .await
            .map_err(|o| error::overloaded(&self.upstream, o))
    }

    /// Sends `req` and reads the whole answer, up to [`MAX_RESPONSE_BYTES`].
    pub async fn fetch(&self, req: FetchRequest) -> Result<Fetched, StoaError> {
        match self.fetch_within(req, MAX_RESPONSE_BYTES).await? {
            Answer::Whole(fetched) => Ok(fetched),
            Answer::Streaming(_) => Err(self.too_large(MAX_RESPONSE_BYTES)),
        }
    }

    /// Sends `req`, holding one of the upstream's slots (waiting at most its
    /// `queue_timeout` for one), and reads the answer if it is at most `limit` bytes; a
    /// larger one (by its `Content-Length`, or found while reading) comes back as a stream
    /// after at most `limit` bytes were read. Reading what is held takes at most the
    /// upstream's `timeout`. Errors are the ones stoa answers with.
    pub async fn fetch_within(&self, req: FetchRequest, limit: usize) -> Result<Answer, StoaError> {
        let permit = self.acquire().await?;
        let timeout = self.upstream.timeout;
        match tokio::time::timeout(timeout, self.read_within(req, limit, permit)).await {
            Ok(answer) => answer,
            Err(_) => Err(Failure::Timeout.into_error(Some(&self.upstream))),
        }
    }

    async fn read_within(
        &self,
        req: FetchRequest,
        limit: usize,
        permit: UpstreamPermit,
    ) -> Result<Answer, StoaError> {
        let url = format!("{}{}", self.base_url, req.path_and_query);
        let mut headers = req.headers;
        headers.insert(http::header::HOST, self.host_header.clone());
        let mut builder = self.client.request(req.method, url).headers(headers);
        if !req.body.is_empty() {
            builder = builder.body(req.body);
        }
        let mut response = builder.send().await.map_err(|e| self.error(&e))?;
        let status = response.status();
        // Interim answers (`100 Continue`, `103 Early Hints`) are read past by the client,
        // so the answer here is the final one; a `101` (no upgrade was asked for) is a
        // broken answer, never one to store or pass on.
        if status.is_informational() {
            return Err(Failure::Failed(format!(
                "a {status} answer to a request without an upgrade"
            ))
            .into_error(Some(&self.upstream)));
        }
        // Only end-to-end headers go on: nothing hop-by-hop or named in `Connection` is
        // stored or replayed.
        let headers = headers::end_to_end_response(response.headers())
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Ok(self.streaming(status, headers, Default::default(), response, permit));
        }
        // Chunks as they come (no copying, no growing buffer); copied once into a body of
        // its own at the end, or passed on as they are if the answer proves too large.
        let mut chunks = std::collections::VecDeque::new();
        let mut len = 0;
        while let Some(chunk) = response.chunk().await.map_err(|e| self.error(&e))? {
            len += chunk.len();
            chunks.push_back(chunk);
            if len > limit {
                return Ok(self.streaming(status, headers, chunks, response, permit));
            }
        }
        drop(permit);
        let mut body = BytesMut::with_capacity(len);
        for chunk in chunks {
            body.extend_from_slice(&chunk);
        }
        Ok(Answer::Whole(Fetched {
            status,
            headers,
            body: body.freeze(),
        }))
    }

    fn streaming(
        &self,
        status: StatusCode,
        headers: HeaderMap,
        read: std::collections::VecDeque<Bytes>,
        response: reqwest::Response,
        permit: UpstreamPermit,
    ) -> Answer {
        let rest = UpstreamRest {
            response,
            client: self.clone(),
            _permit: permit,
        };
        Answer::Streaming(Box::new(Streaming::new(
            self.upstream.name.clone(),
            status,
            headers,
            read,
            Box::new(rest),
        )))
    }

    pub(super) fn too_large(&self, limit: usize) -> StoaError {
        Failure::Failed(format!("answer larger than {limit} bytes"))
            .into_error(Some(&self.upstream))
    }

    fn error(&self, e: &reqwest::Error) -> StoaError {
        Failure::of_client(e).into_error(Some(&self.upstream))
    }
}

/// The TLS settings of the pooled client of an https upstream: the same as its pingora
/// peer's (see [`super::peer::peer_for`]). The URL keeps the host name, for SNI and the
/// certificate check, and the name is pinned to the address resolved at load, so that no
/// request waits on DNS.
fn tls_settings(
    mut builder: reqwest::ClientBuilder,
    upstream: &Upstream,
    tls: &UpstreamTls,
) -> Result<reqwest::ClientBuilder, StoaError> {
    let bad = |what: &str, e: reqwest::Error| {
        StoaError::Internal(format!("upstream {}: unusable {what}: {e}", upstream.name))
    };
    if tls.server_name.parse::<std::net::IpAddr>().is_err() {
        builder = builder.resolve(&tls.server_name, upstream.addr);
    }
    if !tls.verify {
        builder = builder.danger_accept_invalid_certs(true);
    }
    if let Some(ca) = &tls.ca {
        builder = builder.tls_built_in_root_certs(false);
        for der in ca.iter() {
            let cert = reqwest::Certificate::from_der(der).map_err(|e| bad("ca_file", e))?;
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(client) = &tls.client {
        let identity =
            reqwest::Identity::from_pem(&client.pem).map_err(|e| bad("client_cert", e))?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("name", &self.upstream.name)
            .field("base_url", &self.base_url)
            .finish()
    }
}
