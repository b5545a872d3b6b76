//! Builds the pingora server from a validated configuration and runs it until shutdown.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::protocols::http::v2::server::H2Options;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::AdminApp;
use crate::cache::disk::{Disk, DiskMetrics};
use crate::cache::tier::Tier;
use crate::cache::CacheEngine;
use crate::cluster::Cluster;
use crate::config::WorkerModel;
use crate::config::{Config, EnvOverrides};
use crate::connections::Listener;
use crate::control::Control;
use crate::front::forward::Forwarder;
use crate::front::Front;
use crate::gateway::{Gateway, Shared};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;

use crate::proxy::{PassThrough, StoaProxy};
use crate::workers::{ListenSockets, Worker, Workers};

/// How long to wait for the proxy listener to accept its first probe before giving up on
/// readiness (the process keeps serving, and `/readyz` stays 503).
const READINESS_DEADLINE: Duration = Duration::from_secs(30);

/// Serves `config` (read from `config_path`, which SIGHUP and the admin API reload) until
/// SIGTERM or SIGINT, then drains in-flight requests and returns.
pub fn run(config: Config, config_path: PathBuf, env: EnvOverrides) -> anyhow::Result<()> {
    // The proxy's listening sockets are stoa's own (see `crate::workers`); the admin
    // listener is pingora's, checked here so that a taken port fails the start at once.
    let mut sockets = ListenSockets::default();
    for (what, addr) in [
        ("server.listen", config.server.listen),
        (
            "server.listen_tls",
            config.server.tls.as_ref().map(|t| t.listen),
        ),
    ] {
        let Some(addr) = addr else { continue };
        sockets
            .bind(addr)
            .with_context(|| format!("{what}: cannot listen on {addr}"))?;
    }
    std::net::TcpListener::bind(config.admin.listen)
        .with_context(|| format!("admin.listen: cannot listen on {}", config.admin.listen))?;

    let lifecycle = Lifecycle::new();
    let metrics = Arc::new(Metrics::new().context("cannot set up metrics")?);
    let cluster = match &config.cluster {
        Some(settings) => Some(
            Cluster::new(settings.clone(), metrics.registry())
                .context("cannot set up cluster metrics")?,
        ),
        None => None,
    };
    let tier = cluster
        .as_ref()
        .map(|c| Tier::new(c.clone(), metrics.tier().clone()));
    let disk = match &config.cache.disk {
        Some(settings) => {
            let disk_metrics = DiskMetrics::register(metrics.registry())
                .context("cannot set up disk tier metrics")?;
            Some(Disk::open(settings, disk_metrics)?)
        }
        None => None,
    };
    let cache = CacheEngine::with_tiers(
        config.cache.max_bytes,
        tier,
        disk.clone(),
        metrics.purges().clone(),
    );
    let shared = Shared {
        cache: cache.clone(),
        metrics: metrics.clone(),
        cluster: cluster.clone(),
    };
    let gateway = Arc::new(ArcSwap::new(Gateway::new(
        Arc::new(config.clone()),
        &shared,
        None,
    )?));
    let control = Control::new(config_path, env, gateway.clone(), shared, lifecycle.clone());

    let threads = config.server.threads;
    // `workers`: one single-thread service per worker, no work stealing; `shared`: one
    // service whose threads steal work.
    let (services, threads_per_service) = match config.server.worker_model {
        WorkerModel::Workers => (threads, 1),
        WorkerModel::Shared => (1, threads),
    };
    let conf = ServerConf {
        threads: threads_per_service,
        work_stealing: config.server.worker_model == WorkerModel::Shared,
        // stoa drains in-flight requests itself (see `SignalWatch`), so pingora need not wait.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let server_conf = server.configuration.clone();

    lifecycle.set_proxy_workers(services);
    let workers = Workers::new(sockets, services);
    let mut proxies = Vec::with_capacity(services);
    for worker in 0..services {
        // The front's forwarder, which also takes pingora's proxy's HTTP/2 pass-through
        // streams without a body; `server.front = false` leaves every request to pingora.
        let forwarder = (config.server.front && config.server.front_forward)
            .then(|| Arc::new(Forwarder::new(&server_conf)));
        let pass_through = forwarder.clone().map(|f| -> Arc<dyn PassThrough> { f });
        let mut proxy_app = pingora::proxy::http_proxy(
            &server_conf,
            StoaProxy::new(gateway.clone(), lifecycle.clone()).with_pass_through(pass_through),
        );
        let mut options = HttpServerOptions::default();
        options.h2c = config.server.h2c;
        // An HTTP/2 connection with no open stream is closed as an idle HTTP/1.1 one is.
        options.h2_idle_timeout = Some(config.server.connections.keepalive_timeout);
        proxy_app.server_options = Some(options);
        proxy_app.h2_options = Some(h2_options(config.server.h2_max_concurrent_streams));
        let front = Front::new(
            proxy_app,
            gateway.clone(),
            lifecycle.clone(),
            &config.server,
            forwarder,
        );
        let mut listener = Listener::new(front, gateway.clone(), lifecycle.clone())
            .with_h2c(config.server.h2c)
            .with_worker(worker);
        if let Some(tls) = &config.server.tls {
            // The TLS listener accepts plain TCP: stoa makes the handshakes itself, under the
            // connection deadlines (see `Listener`).
            listener = listener.with_tls(
                tls.listen,
                crate::tls::acceptor(gateway.clone(), tls.certified.clone())?,
            );
        }
        proxies.push(Worker::new(
            format!("stoa proxy {worker}"),
            listener,
            workers.clone(),
            lifecycle.clone(),
            threads_per_service,
        ));
    }

    let mut admin = Service::new("stoa admin".to_string(), AdminApp::new(control.clone()));
    admin.add_tcp(&config.admin.listen.to_string());
    admin.threads = Some(1);

    let probe = background_service(
        "stoa readiness",
        ReadinessProbe {
            addr: config.server.any_listen(),
            control: control.clone(),
            warm_timeout: config.server.warm_timeout,
        },
    );
    let reloader = background_service(
        "stoa reload on SIGHUP",
        ReloadOnHangup {
            control: control.clone(),
        },
    );

    let pruner = background_service("stoa rate-limit pruner", Pruner { gateway });

    for proxy in proxies {
        server.add_service(proxy);
    }
    server.add_service(admin);
    server.add_service(probe);
    server.add_service(pruner);
    server.add_service(reloader);
    if let Some(cluster) = cluster {
        tracing::info!(
            redis = %cluster.settings().redis_display(),
            node = %cluster.settings().node_name,
            "cluster: connecting to the shared Redis"
        );
        server.add_service(background_service(
            "stoa cluster",
            ClusterLink {
                cluster,
                cache,
                control: Arc::downgrade(&control),
            },
        ));
    }

    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        listen = %config.server.listeners(),
        admin = %config.admin.listen,
        routes = config.routes.len(),
        "stoa starting"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(SignalWatch {
            lifecycle,
            timeout: config.server.shutdown_timeout,
        }),
    });
    if let Some(disk) = disk {
        disk.close(DISK_CLOSE_LIMIT);
    }
    tracing::info!("stoa stopped");
    Ok(())
}

/// How long a stop waits for the disk tier to write what is queued.
const DISK_CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// Bytes one HTTP/2 stream may have in flight either way (the flow-control window stoa
/// grants, and its send buffer per stream: what a client that does not read can hold up).
const H2_STREAM_WINDOW: u32 = 64 * 1024;
/// The flow-control window stoa grants a whole connection.
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Largest decoded header list accepted on HTTP/2 (as pingora's default).
const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams a client may reset before stoa accepted them (rapid reset); past it the
/// connection gets GOAWAY.
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams stoa may reset for a client's protocol errors before it closes the connection.
const H2_MAX_LOCAL_RESETS: usize = 64;

/// The HTTP/2 settings of client connections: bounded streams, windows, buffers and resets.
fn h2_options(max_concurrent_streams: u32) -> H2Options {
    let mut options = H2Options::default();
    options
        .max_concurrent_streams(max_concurrent_streams)
        .initial_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buffer_size(H2_STREAM_WINDOW as usize)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_RESETS));
    options
}

/// Marks the process listening once the proxy listener accepts connections, then warms
/// the cache (bounded by `server.warm_timeout`); `/readyz` turns 200 after both.
struct ReadinessProbe {
    addr: SocketAddr,
    control: Arc<Control>,
    warm_timeout: Duration,
}

#[async_trait]
impl BackgroundService for ReadinessProbe {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let lifecycle = &self.control.lifecycle;
        let target = connectable(self.addr);
        let deadline = tokio::time::Instant::now() + READINESS_DEADLINE;
        while tokio::time::Instant::now() < deadline {
            if tokio::net::TcpStream::connect(target).await.is_ok() {
                lifecycle.mark_listening();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !lifecycle.is_listening() {
            tracing::error!(listen = %self.addr, "proxy listener never accepted a connection");
            return;
        }
        // Warming (and readiness) waits for the disk tier's index: what it holds is
        // served before anything is fetched again.
        if let Some(disk) = &self.control.shared.cache.disk {
            let _ = tokio::time::timeout(self.warm_timeout, disk.wait_ready()).await;
        }
        let warmed = self.control.warm_all(self.warm_timeout).await;
        lifecycle.mark_warmed();
        tracing::info!(listen = %self.addr, warmed, "ready");
    }
}

/// SIGHUP reloads the configuration file.
struct ReloadOnHangup {
    control: Arc<Control>,
}

#[async_trait]
impl BackgroundService for ReloadOnHangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot watch SIGHUP: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hangups.recv() => {
                    let control = self.control.clone();
                    // Reading the file and building clients is blocking work.
                    let _ = tokio::task::spawn_blocking(move || control.reload()).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// How often idle clients' rate-limit state is dropped.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// A prune round that forgot at least this many clients, or shrank tables by at least
/// [`RELEASE_AFTER_BYTES`], asks the allocator to give its free pages back at once.
pub const RELEASE_AFTER_DROPPED: usize = 65_536;
/// See [`RELEASE_AFTER_DROPPED`].
pub const RELEASE_AFTER_BYTES: usize = 4 << 20;

/// The allocator's "give free memory back" call, set by the binary that chose the allocator
/// ([`set_memory_release`]).
static RELEASE_MEMORY: OnceLock<fn(bool)> = OnceLock::new();

/// Sets what the rate-limit pruner calls after each round: `release(true)` after a round
/// that dropped many clients (see [`RELEASE_AFTER_DROPPED`]), `release(false)` otherwise.
/// The `stoa` binary passes mimalloc's `mi_collect`: mimalloc returns freed pages to the
/// system only after a delay and only when some thread of the process allocates or collects
/// again, so an idle server kept the memory of a flood it had already forgotten. Unset (as
/// in tests, on the system allocator), nothing is called. Only the first call counts.
pub fn set_memory_release(release: fn(bool)) {
    let _ = RELEASE_MEMORY.set(release);
}

/// Keeps rate-limiter memory bounded: clients whose buckets are full again are forgotten.
struct Pruner {
    gateway: Arc<ArcSwap<Gateway>>,
}

#[async_trait]
impl BackgroundService for Pruner {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let (mut dropped, mut released) = (0, 0);
                    for limiter in self.gateway.load().limiters.values() {
                        let pruned = limiter.prune();
                        dropped += pruned.dropped;
                        released += pruned.released_bytes;
                    }
                    let many = dropped >= RELEASE_AFTER_DROPPED || released >= RELEASE_AFTER_BYTES;
                    if many {
                        tracing::debug!(dropped, released_bytes = released, "rate-limit clients pruned");
                    }
                    if let Some(release) = RELEASE_MEMORY.get() {
                        release(many);
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Keeps the connection to the shared Redis and its health ([`Cluster::maintain`]).
/// With the shared cache tier, also listens for fills, and for purges and orders (reload,
/// refresh) from other nodes.
struct ClusterLink {
    cluster: Arc<Cluster>,
    cache: Arc<CacheEngine>,
    /// Carries out the other nodes' orders (reload, refresh).
    control: std::sync::Weak<Control>,
}

#[async_trait]
impl BackgroundService for ClusterLink {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut stop_maintain = shutdown.clone();
        let mut stop_listen = shutdown;
        let maintain = Arc::clone(&self.cluster).maintain(async move {
            let _ = stop_maintain.changed().await;
        });
        let listen = async {
            let Some(tier) = self.cache.tier.clone() else {
                return;
            };
            let cache = Arc::downgrade(&self.cache);
            let apply = move |inv: &crate::cache::purge::Invalidation| {
                cache.upgrade().map_or(0, |cache| cache.apply_local(inv))
            };
            let control = self.control.clone();
            let obey = move |order: crate::cache::tier::Order| {
                if let Some(control) = control.upgrade() {
                    control.obey(order);
                }
            };
            tier.listen(apply, obey, async move {
                let _ = stop_listen.changed().await;
            })
            .await;
        };
        tokio::join!(maintain, listen);
    }
}

/// A wildcard listen address is probed on loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// SIGTERM and SIGINT both shut down gracefully: `/readyz` turns 503 and the proxy's
/// listening socket closes at once; in-flight requests finish (up to
/// `server.shutdown_timeout`) while every answer closes its connection; idle connections
/// are closed; then pingora stops its other services (the admin listener last).
struct SignalWatch {
    lifecycle: Arc<Lifecycle>,
    timeout: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for SignalWatch {
    async fn recv(&self) -> ShutdownSignal {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                tracing::info!(
                    in_flight = self.lifecycle.in_flight(),
                    "{name} received: draining"
                );
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("cannot watch shutdown signals: {e}");
                std::future::pending::<()>().await;
            }
        }
        self.lifecycle.stop_accepting();
        // The proxy service drains once its listener is closed (`Listener::cleanup`); a
        // second more than its bound covers the closing of idle connections.
        let deadline = tokio::time::Instant::now() + self.timeout + Duration::from_secs(1);
        while !self.lifecycle.is_proxy_closed() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if self.lifecycle.drained(left).await {
            tracing::info!("all in-flight requests finished");
        } else {
            tracing::warn!(
                in_flight = self.lifecycle.in_flight(),
                "shutdown timeout reached with requests still in flight"
            );
        }
        ShutdownSignal::GracefulTerminate
    }
}
