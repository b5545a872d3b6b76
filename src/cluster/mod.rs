//! The Redis that several stoa instances share (`[cluster]`): one connection per process,
//! its health, and the one way to run a command on it.
//!
//! Client: the `redis` crate with tokio. A single Redis is reached through its
//! `ConnectionManager` (one multiplexed connection, reconnected on its own), a Redis Cluster
//! through `cluster-async` (one multiplexed connection per master, slots followed on their
//! own). Both are cheap to clone and shared by every request.
//!
//! Health is `up` or `degraded`. A command that fails or outlives `command_timeout` marks the
//! cluster degraded; while degraded, [`Cluster::run`] does not try Redis at all (so a dead or
//! partitioned Redis costs a request nothing) and its callers use their local fallback. A
//! background task ([`Cluster::maintain`]) connects, pings every [`PROBE_EVERY`] and marks the
//! cluster up again when Redis answers. Each transition is logged once and counted.
//!
//! This module imports only the configuration; the rate limiter (and later the cache) use it.

mod metrics;

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, RedisFuture, Value};

use crate::config::{ClusterSettings, RedisTarget};
pub use metrics::ClusterMetrics;

/// How often the background task checks Redis.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Why a command was not answered. Callers fall back to local state; none of these fails a
/// request.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis is marked degraded (or not connected yet): not tried.
    #[error("redis is degraded")]
    Degraded,
    /// The command outlived `command_timeout`.
    #[error("redis command timed out")]
    Timeout,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The health of the shared Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not connected yet.
    Connecting,
    Up,
    Degraded,
}

impl Health {
    fn from_u8(n: u8) -> Health {
        match n {
            1 => Health::Up,
            2 => Health::Degraded,
            _ => Health::Connecting,
        }
    }
}

/// A connection to a single Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// The shared Redis of this process.
pub struct Cluster {
    settings: ClusterSettings,
    connection: ArcSwapOption<Connection>,
    health: AtomicU8,
    metrics: ClusterMetrics,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &self.settings.redis_display())
            .field("health", &self.health())
            .finish()
    }
}

impl Cluster {
    /// A cluster handle for `settings`, not connected yet ([`Cluster::maintain`] connects),
    /// with its metrics registered in `registry`.
    pub fn new(
        settings: ClusterSettings,
        registry: &prometheus::Registry,
    ) -> prometheus::Result<Arc<Cluster>> {
        Ok(Arc::new(Cluster {
            settings,
            connection: ArcSwapOption::empty(),
            health: AtomicU8::new(0),
            metrics: ClusterMetrics::register(registry)?,
        }))
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Whether commands are tried: one relaxed atomic load.
    pub fn is_up(&self) -> bool {
        self.health.load(Ordering::Relaxed) == 1
    }

    /// Runs one command (`op` on a clone of the connection), bounded by `command_timeout`,
    /// timed and counted. Not tried while degraded; a failure marks the cluster degraded.
    pub async fn run<T, F>(&self, op: impl FnOnce(Connection) -> F) -> Result<T, ClusterError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return Err(ClusterError::Degraded);
        }
        let Some(connection) = self.connection.load_full() else {
            return Err(ClusterError::Degraded);
        };
        self.timed(op(Connection::clone(&connection))).await
    }

    /// [`Cluster::run`], tried even while degraded (when a connection exists): for what must
    /// not wait for the next probe, such as giving a lease back right after a failure.
    pub async fn try_run<T, F>(&self, op: impl FnOnce(Connection) -> F) -> Result<T, ClusterError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let Some(connection) = self.connection.load_full() else {
            return Err(ClusterError::Degraded);
        };
        self.timed(op(Connection::clone(&connection))).await
    }

    async fn timed<T>(
        &self,
        command: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.settings.command_timeout, command).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ClusterError::Redis(e)),
            Err(_) => Err(ClusterError::Timeout),
        };
        self.metrics
            .observe(started.elapsed(), result.as_ref().err());
        if let Err(e) = &result {
            self.set_health(Health::Degraded, Some(e));
        }
        result
    }

    fn set_health(&self, to: Health, cause: Option<&ClusterError>) {
        let was = Health::from_u8(self.health.swap(to as u8, Ordering::Relaxed));
        if was == to {
            return;
        }
        self.metrics.transition(to == Health::Up);
        let redis = self.settings.redis_display();
        match (to, cause) {
            (Health::Up, _) => {
                tracing::info!(redis = %redis, node = %self.settings.node_name, "cluster: redis up, shared state in use")
            }
            (_, Some(e)) => {
                tracing::warn!(redis = %redis, error = %e, "cluster: redis degraded, using local state until it answers again")
            }
            (_, None) => {
                tracing::warn!(redis = %redis, "cluster: redis degraded, using local state until it answers again")
            }
        }
    }

    /// Connects, then checks Redis every [`PROBE_EVERY`] until `shutdown` resolves: the
    /// cluster is marked up when a `PING` is answered, degraded when not.
    pub async fn maintain(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            self.probe().await;
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                _ = &mut shutdown => return,
            }
        }
    }

    /// One round of [`Cluster::maintain`].
    pub async fn probe(&self) {
        let connection = match self.connection.load_full() {
            Some(c) => c,
            None => match self.connect().await {
                Ok(c) => {
                    let c = Arc::new(c);
                    self.connection.store(Some(Arc::clone(&c)));
                    c
                }
                Err(e) => {
                    self.metrics.observe(Duration::ZERO, Some(&e));
                    self.set_health(Health::Degraded, Some(&e));
                    return;
                }
            },
        };
        let mut connection = Connection::clone(&connection);
        let ping = self
            .timed(async move {
                redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
            })
            .await;
        if ping.is_ok() {
            self.set_health(Health::Up, None);
        }
    }

    async fn connect(&self) -> Result<Connection, ClusterError> {
        let s = &self.settings;
        match &s.redis {
            RedisTarget::Single(url) => {
                let client = self.client(url)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(s.connect_timeout))
                    .set_response_timeout(Some(s.command_timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(PROBE_EVERY);
                // Lazy: connects on the first command, and again after a failure.
                Ok(Connection::Single(ConnectionManager::new_lazy_with_config(
                    client, config,
                )?))
            }
            RedisTarget::Cluster(seeds) => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.clone());
                if s.tls() && !s.tls_verify {
                    builder = builder.tls(redis::TlsMode::Insecure);
                }
                if let Some(pem) = &s.ca_pem {
                    builder = builder.certs(redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    });
                }
                let client = builder
                    .connection_timeout(s.connect_timeout)
                    .response_timeout(s.command_timeout)
                    .build()?;
                let connecting = client.get_async_connection();
                match tokio::time::timeout(s.connect_timeout, connecting).await {
                    Ok(c) => Ok(Connection::Cluster(c?)),
                    Err(_) => Err(ClusterError::Timeout),
                }
            }
        }
    }

    /// A client of the single Redis at `url`, with the TLS settings of `[cluster]` for
    /// `rediss://`: the CA of `ca_file` instead of the system roots, no verification with
    /// `tls_verify = false`.
    pub fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        let s = &self.settings;
        if !url.starts_with("rediss://") {
            return redis::Client::open(url);
        }
        let mut info = url.into_connection_info()?;
        if !s.tls_verify {
            let addr = match info.addr().clone() {
                redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    tls_params,
                    ..
                } => redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: true,
                    tls_params,
                },
                other => other,
            };
            info = info.set_addr(addr);
        }
        match &s.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(info),
        }
    }

    /// `key_prefix` followed by `parts`.
    pub fn key(&self, parts: &[&str]) -> String {
        let len = self.settings.key_prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut key = String::with_capacity(len);
        key.push_str(&self.settings.key_prefix);
        for part in parts {
            key.push_str(part);
        }
        key
    }
}
