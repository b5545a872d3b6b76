//! Aggregate routes: one request fans out to several legs, each through stoa's own routes
//! (and so through their caches and single flights), and the picked parts are merged into
//! one JSON answer.

pub mod run;

pub use run::Aggregator;
