//! The cluster's metrics: Redis health, command latency and errors, and the decisions of
//! cluster-scope rate limits.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::ClusterError;

/// Handles resolved once, so that recording is a few atomic operations.
#[derive(Clone)]
pub struct ClusterMetrics {
    up: IntGauge,
    command_seconds: Histogram,
    errors_timeout: IntCounter,
    errors_connection: IntCounter,
    errors_other: IntCounter,
    to_up: IntCounter,
    to_degraded: IntCounter,
    limit_redis_allowed: IntCounter,
    limit_redis_limited: IntCounter,
    limit_local_allowed: IntCounter,
    limit_local_limited: IntCounter,
}

impl ClusterMetrics {
    pub(super) fn register(registry: &Registry) -> prometheus::Result<ClusterMetrics> {
        let up = IntGauge::new(
            "stoa_cluster_redis_up",
            "1 while the shared Redis answers, 0 while degraded (local state in use)",
        )?;
        let command_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "stoa_cluster_redis_command_duration_seconds",
                "Time of each command sent to the shared Redis",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "stoa_cluster_redis_errors_total",
                "Commands to the shared Redis that failed, by kind (timeout, connection, other)",
            ),
            &["kind"],
        )?;
        let transitions = IntCounterVec::new(
            Opts::new(
                "stoa_cluster_redis_transitions_total",
                "Changes of the shared Redis's health, by the state entered",
            ),
            &["to"],
        )?;
        let checks = IntCounterVec::new(
            Opts::new(
                "stoa_cluster_rate_limit_checks_total",
                "Checks of cluster-scope rate limits, by where the bucket was (redis, or local_fallback while Redis is degraded) and result (allowed, limited)",
            ),
            &["source", "result"],
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(command_seconds.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(checks.clone()))?;
        Ok(ClusterMetrics {
            up,
            command_seconds,
            errors_timeout: errors.with_label_values(&["timeout"]),
            errors_connection: errors.with_label_values(&["connection"]),
            errors_other: errors.with_label_values(&["other"]),
            to_up: transitions.with_label_values(&["up"]),
            to_degraded: transitions.with_label_values(&["degraded"]),
            limit_redis_allowed: checks.with_label_values(&["redis", "allowed"]),
            limit_redis_limited: checks.with_label_values(&["redis", "limited"]),
            limit_local_allowed: checks.with_label_values(&["local_fallback", "allowed"]),
            limit_local_limited: checks.with_label_values(&["local_fallback", "limited"]),
        })
    }

    /// One command's time (not for commands that were not tried) and its error, if any.
    pub(super) fn observe(&self, elapsed: Duration, error: Option<&ClusterError>) {
        if !elapsed.is_zero() {
            self.command_seconds.observe(elapsed.as_secs_f64());
        }
        match error {
            None | Some(ClusterError::Degraded) => {}
            // The client's own response timeout (as long as `command_timeout`) may fire
            // first: a Redis that hangs is a timeout, whoever noticed.
            Some(ClusterError::Timeout) => self.errors_timeout.inc(),
            Some(ClusterError::Redis(e)) if e.is_timeout() => self.errors_timeout.inc(),
            Some(ClusterError::Redis(e)) if e.is_io_error() || e.is_connection_dropped() => {
                self.errors_connection.inc()
            }
            Some(ClusterError::Redis(_)) => self.errors_other.inc(),
        }
    }

    pub(super) fn transition(&self, up: bool) {
        self.up.set(i64::from(up));
        if up {
            self.to_up.inc();
        } else {
            self.to_degraded.inc();
        }
    }

    /// One check of a cluster-scope rate limit: decided in Redis or by the local fallback.
    pub fn rate_limit_checked(&self, in_redis: bool, over_limit: bool) {
        match (in_redis, over_limit) {
            (true, false) => self.limit_redis_allowed.inc(),
            (true, true) => self.limit_redis_limited.inc(),
            (false, false) => self.limit_local_allowed.inc(),
            (false, true) => self.limit_local_limited.inc(),
        }
    }
}
