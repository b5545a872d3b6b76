//! Realistic, deterministic demo versions of the five upstream APIs that stoa fronts.
//!
//! Each API runs as its own HTTP server ([`DemoServer`]) with *knobs* (added latency, injected
//! errors, dropped connections) and *stats* (request counts per route and per path, in-flight
//! high-water mark), both reachable from Rust and over HTTP:
//!
//! - `GET /__stats` returns [`Stats`] as JSON, `POST /__stats/reset` resets it (204);
//! - `GET /__knobs` returns [`Knobs`], `PUT /__knobs` with a partial [`Knobs`] JSON updates them.
//!
//! The control endpoints are neither counted nor subject to the knobs.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use stoa_demo::{Api, DemoServer, Knobs};
//! let server = DemoServer::start(Api::Restaurants, "127.0.0.1:0".parse()?, Knobs::default()).await?;
//! let body = reqwest::get(format!("{}/api/restaurant/dufva", server.url())).await?.text().await?;
//! assert_eq!(server.stats().routes["GET /api/restaurant/{id}"], 1);
//! # drop(body); Ok(()) }
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod campaigns;
pub mod clv;
pub mod knobs;
pub mod orders;
pub mod restaurants;
pub mod server;
pub mod stats;
pub mod voucher;

mod respond;

pub use clv::CLV_CUSTOMERS;
pub use knobs::Knobs;
pub use server::DemoServer;
pub use stats::Stats;

/// One of the five demo upstream APIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// Restaurant menu API (`/api/restaurant/{id}`), default port 9001.
    Restaurants,
    /// CLV calculator (`GET /get_clv` with a JSON body), default port 7787, ~200 ms per call.
    Clv,
    /// Voucher API (`POST /api/v1/voucher`), default port 8000.
    Voucher,
    /// Products and orders gateway (`/products`, `/orders`), default port 8002.
    Orders,
    /// Banner campaigns (`/campaigns/{id}/`, HTML with a cookie), default port 8003.
    Campaigns,
}

impl Api {
    /// All five APIs, in a fixed order.
    pub const ALL: [Api; 5] = [
        Api::Restaurants,
        Api::Clv,
        Api::Voucher,
        Api::Orders,
        Api::Campaigns,
    ];

    /// The lowercase name used on the command line, in stats and in `Display`/`FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            Api::Restaurants => "restaurants",
            Api::Clv => "clv",
            Api::Voucher => "voucher",
            Api::Orders => "orders",
            Api::Campaigns => "campaigns",
        }
    }

    /// The port the `stoa-demo` binary listens on by default for this API.
    pub fn default_port(self) -> u16 {
        match self {
            Api::Restaurants => 9001,
            Api::Clv => 7787,
            Api::Voucher => 8000,
            Api::Orders => 8002,
            Api::Campaigns => 8003,
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Error returned when parsing an unknown API name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownApi(pub String);

impl fmt::Display for UnknownApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown API {:?} (expected one of: restaurants, clv, voucher, orders, campaigns)",
            self.0
        )
    }
}

impl std::error::Error for UnknownApi {}

impl FromStr for Api {
    type Err = UnknownApi;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Api::ALL
            .into_iter()
            .find(|api| api.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| UnknownApi(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_names_round_trip() {
        for api in Api::ALL {
            assert_eq!(api.to_string().parse::<Api>(), Ok(api));
        }
        assert_eq!("CLV".parse::<Api>(), Ok(Api::Clv));
        assert!("nope".parse::<Api>().is_err());
    }
}
