//! stoa: a caching reverse proxy and API aggregator for slow JSON APIs, built on pingora.
//!
//! The binary is a thin shell around this library: [`config::load`] validates a TOML file
//! into a [`config::Config`], and [`app::run`] serves it.

pub mod admin;
pub mod aggregate;
pub mod app;
pub mod cache;
pub mod chunked;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod control;
pub mod error;
pub mod exchange;
pub mod front;
pub mod gateway;
pub mod lane;
pub mod lifecycle;
pub mod metrics;
pub mod otel;
pub mod proxy;
pub mod ratelimit;
pub mod routes;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod workers;
