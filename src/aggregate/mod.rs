//! Aggregate routes: one request fans out to several legs, each through stoa's own routes
//! (and so through their caches and single flights), and the picked parts are merged into
//! one JSON answer. An aggregate is an origin of the cache.

pub mod legs;
pub mod run;

pub use legs::{LegCall, Legs, LegsHandle};
pub use run::Aggregator;
