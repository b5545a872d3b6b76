//! A route's link to its upstream: where its pass-through requests go, the pooled client
//! its fetches use, and its fetch metrics, counted here for both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::ErrorType;

use super::client::{UpstreamClient, MAX_RESPONSE_BYTES};
use crate::cache::origin::{Answer, FetchRequest, Fetched, Origin, Pending};
use crate::config::Upstream;
use crate::error::StoaError;
use crate::metrics::{FetchOutcome, UpstreamMetrics};
use crate::ratelimit::UpstreamPermit;

/// One route's way to its upstream. Every call that reaches the upstream is counted in the
/// route's `stoa_upstream_*` series; one the upstream's protection limits turned away never
/// reached it and is not.
pub struct Link {
    upstream: Arc<Upstream>,
    /// Where pass-through requests go, through pingora's connector.
    pub peer: HttpPeer,
    /// The peer's `reuse_hash`: which idle upstream connections may carry its requests.
    pub pool_key: u64,
    client: UpstreamClient,
    metrics: Arc<UpstreamMetrics>,
}

impl Link {
    pub fn new(
        upstream: Arc<Upstream>,
        peer: HttpPeer,
        client: UpstreamClient,
        metrics: Arc<UpstreamMetrics>,
    ) -> Self {
        Link {
            upstream,
            pool_key: peer.reuse_hash(),
            peer,
            client,
            metrics,
        }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The pooled client, for calls not counted as the route's fetches (refresh hooks).
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// A slot of the upstream for a pass-through request; `Err` is the 503 to answer.
    pub async fn acquire(&self) -> Result<UpstreamPermit, StoaError> {
        self.client.acquire().await
    }

    /// Fetches through the upstream's slots and timeouts (see
    /// [`UpstreamClient::fetch_within`]), counted.
    pub async fn fetch_within(&self, req: FetchRequest, limit: usize) -> Result<Answer, StoaError> {
        let started = Instant::now();
        let result = self.client.fetch_within(req, limit).await;
        let outcome = match &result {
            Ok(Answer::Whole(f)) => Some(status_outcome(f.status.as_u16())),
            Ok(Answer::Streaming(s)) => Some(status_outcome(s.status.as_u16())),
            Err(StoaError::UpstreamTimeout { .. }) => Some(FetchOutcome::Timeout),
            Err(StoaError::Overloaded { .. }) => None,
            Err(_) => Some(FetchOutcome::Error),
        };
        if let Some(outcome) = outcome {
            self.metrics.fetch(outcome, started.elapsed());
        }
        result
    }

    /// Fetches and reads the whole answer, up to [`MAX_RESPONSE_BYTES`], counted (for
    /// aggregate legs to pass-through routes).
    pub async fn fetch_whole(&self, req: FetchRequest) -> Result<Fetched, StoaError> {
        match self.fetch_within(req, MAX_RESPONSE_BYTES).await? {
            Answer::Whole(fetched) => Ok(fetched),
            Answer::Streaming(_) => Err(self.client.too_large(MAX_RESPONSE_BYTES)),
        }
    }

    /// Counts a pass-through call that ended with `e` (pingora's error, if any) after the
    /// upstream answered `status` (0: no answer) within `took`.
    pub fn passed(&self, e: Option<&pingora::Error>, status: u16, took: Duration) {
        let outcome = match e.map(|e| e.etype()) {
            None => status_outcome(status),
            Some(ErrorType::ConnectTimedout)
            | Some(ErrorType::ReadTimedout)
            | Some(ErrorType::WriteTimedout) => FetchOutcome::Timeout,
            Some(_) => FetchOutcome::Error,
        };
        self.metrics.fetch(outcome, took);
    }
}

/// A cached route's upstream feeds its cache through the link, so every fetch is counted.
impl Origin for Link {
    fn fetch(&self, req: FetchRequest, limit: usize) -> Pending<'_, Answer> {
        Box::pin(self.fetch_within(req, limit))
    }
}

/// The upstream's own 5xx is an error of the fetch, on every kind of route.
fn status_outcome(status: u16) -> FetchOutcome {
    if status >= 500 {
        FetchOutcome::Error
    } else {
        FetchOutcome::Ok
    }
}
