//! What feeds the cache: the [`Origin`] trait, the request it is asked and the answers it
//! gives. The upstream client and aggregate routes implement it; the cache knows neither.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};

use super::tags::Tags;
use crate::error::StoaError;

/// A future an [`Origin`] or a [`Rest`] returns.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoaError>> + Send + 'a>>;

/// Where a cached route's answers come from.
pub trait Origin: Send + Sync {
    /// Answers `req`: whole if its body is at most `limit` bytes, else as a stream. Errors
    /// are the ones stoa answers with; the origin counts its own fetches.
    fn fetch(&self, req: FetchRequest, limit: usize) -> Pending<'_, Answer>;
}

/// The part of a body not read yet, still with its origin.
pub trait Rest: Send {
    /// The next piece of the body; `None` at its end.
    fn next_chunk(&mut self) -> Pending<'_, Option<Bytes>>;

    /// The error for a body over `limit` bytes where it had to be read whole (the origin
    /// says how its failures are answered).
    fn too_large(&self, limit: usize) -> StoaError;
}

/// A request to send upstream.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub method: Method,
    /// Path and query as sent upstream (after rewrite and base path).
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The tags the route's templates give the answer (`cache.tags`); never sent upstream.
    /// Kept with the entry's recipe, so that a refetch tags its answer alike.
    pub tags: Tags,
}

/// A complete upstream answer. Its headers are end-to-end only: the origin has dropped the
/// hop-by-hop ones and those the answer's `Connection` header names.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An upstream answer: read whole, or larger than the limit it was read with.
#[derive(Debug)]
pub enum Answer {
    Whole(Fetched),
    Streaming(Box<Streaming>),
}

/// An answer too large to hold: its head, the bytes read before that was known, and the
/// rest still with the origin (which may hold an upstream slot until this is dropped).
pub struct Streaming {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The name errors report.
    origin: String,
    /// Body chunks already read, sent (and freed) before the rest.
    read: VecDeque<Bytes>,
    rest: Box<dyn Rest>,
}

impl Streaming {
    pub fn new(
        origin: String,
        status: StatusCode,
        headers: HeaderMap,
        read: VecDeque<Bytes>,
        rest: Box<dyn Rest>,
    ) -> Self {
        Streaming {
            status,
            headers,
            origin,
            read,
            rest,
        }
    }

    /// The next piece of the body; `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoaError> {
        if let Some(read) = self.read.pop_front() {
            return Ok(Some(read));
        }
        self.rest.next_chunk().await
    }

    /// Reads the rest into memory, up to `limit` bytes in all (for aggregate legs).
    pub async fn collect(mut self, limit: usize) -> Result<Bytes, StoaError> {
        let mut body = BytesMut::new();
        while let Some(chunk) = self.next_chunk().await? {
            if body.len() + chunk.len() > limit {
                return Err(self.rest.too_large(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("upstream", &self.origin)
            .field("status", &self.status)
            .finish()
    }
}

/// Whether an answer with `status` carries no body and so no `Content-Length` of its own
/// (1xx, 204 and 304: RFC 9110 §8.6).
pub fn has_no_body(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}
