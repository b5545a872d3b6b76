//! How an aggregate reaches stoa's own routes: through [`Legs`], which the gateway holding
//! the aggregate implements, so aggregation never names the gateway.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use http::{Method, StatusCode};

/// A leg's answer (status and body), or the message recorded for the leg.
pub type LegCall<'a> =
    Pin<Box<dyn Future<Output = Result<(StatusCode, Bytes), String>> + Send + 'a>>;

/// Stoa's own routes, as aggregate legs call them.
pub trait Legs: Send + Sync {
    /// Answers `method path` with `body` (JSON, or empty) the way a client's request would
    /// be answered: through the route's cache and single flight when it has them.
    fn call(&self, method: &Method, path: &str, body: Bytes) -> LegCall<'_>;
}

/// The routes an aggregate calls, set once the gateway holding it is built. Weak: the
/// gateway holds the aggregate.
#[derive(Default)]
pub struct LegsHandle(OnceLock<Weak<dyn Legs>>);

impl LegsHandle {
    /// Sets the routes; only the first call counts.
    pub fn set(&self, legs: Weak<dyn Legs>) {
        let _first = self.0.set(legs);
    }

    /// The routes, while their gateway is in use.
    pub fn get(&self) -> Option<Arc<dyn Legs>> {
        self.0.get()?.upgrade()
    }
}
