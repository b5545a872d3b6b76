//! Every request stoa sends upstream: peers and pools, timeouts, the header policy, the one
//! mapping of upstream failures into [`crate::error::StoaError`], and fetch metrics.
//!
//! Pass-through requests ride pingora's connector to the route's [`HttpPeer`]; cached
//! fetches, aggregate legs and refresh hooks ride one pooled client per upstream
//! ([`UpstreamClient`]). Both are built here from the same settings, send the same headers
//! ([`headers`]), map failures the same way ([`error`]) and are counted the same way
//! ([`Link`]). Both speak TLS to `https://` upstreams with the same settings, on one stack
//! (rustls with the ring provider).
//!
//! [`HttpPeer`]: pingora::upstreams::peer::HttpPeer

pub mod client;
pub mod error;
pub mod headers;
pub mod link;
pub mod peer;

pub use client::{UpstreamClient, MAX_RESPONSE_BYTES};
pub use link::Link;
