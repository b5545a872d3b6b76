//! The HTTP server behind every demo API: accept loop, knobs and stats middleware, control
//! endpoints, and real connection drops.

use std::fmt;
use std::future::poll_fn;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rand::Rng as _;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt as _;

use crate::knobs::{KnobsPatch, SharedKnobs};
use crate::respond::{self, DropConnection, LocalAddr};
use crate::stats::{StatsRecorder, UNMATCHED_ROUTE};
use crate::{campaigns, clv, orders, restaurants, voucher, Api, Knobs, Stats};

/// Paths under this prefix are control endpoints: never counted, never delayed or failed.
const CONTROL_PREFIX: &str = "/__";

/// Pending connections the kernel queues for us (tests open a thousand at once).
const LISTEN_BACKLOG: u32 = 4096;

/// State shared by the server's tasks and its [`DemoServer`] handle.
#[derive(Debug)]
struct Shared {
    knobs: SharedKnobs,
    stats: Arc<StatsRecorder>,
    /// Set once the server is shut down or dropped: requests still arriving on open
    /// connections get their connection closed.
    closed: AtomicBool,
}

/// The listening socket, behind a lock only so that [`Drop`] can close it synchronously.
type SharedListener = Arc<Mutex<Option<TcpListener>>>;

/// A running demo upstream. Dropping it closes the listening socket at once (connecting is
/// then refused) and aborts every open connection.
pub struct DemoServer {
    api: Api,
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: SharedListener,
    stop: Arc<Notify>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for DemoServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoServer")
            .field("api", &self.api)
            .field("addr", &self.addr)
            .field("knobs", &self.knobs())
            .finish_non_exhaustive()
    }
}

impl DemoServer {
    /// Binds `addr` (port 0 picks a free port), spawns the server on the current tokio
    /// runtime and returns once it is listening.
    pub async fn start(api: Api, addr: SocketAddr, knobs: Knobs) -> anyhow::Result<DemoServer> {
        let listener = bind(addr).with_context(|| format!("cannot listen on {addr} for {api}"))?;
        let local = listener
            .local_addr()
            .context("listening socket has no address")?;
        let shared = Arc::new(Shared {
            knobs: SharedKnobs::new(knobs),
            stats: Arc::new(StatsRecorder::default()),
            closed: AtomicBool::new(false),
        });
        let app = App {
            api: api_router(api, Arc::clone(&shared))?,
            control: control_router(Arc::clone(&shared)),
            shared: Arc::clone(&shared),
            local,
        };
        let listener: SharedListener = Arc::new(Mutex::new(Some(listener)));
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(accept_loop(
            Arc::new(app),
            Arc::clone(&listener),
            Arc::clone(&stop),
        ));
        tracing::debug!(%api, addr = %local, "demo upstream listening");
        Ok(DemoServer {
            api,
            addr: local,
            shared,
            listener,
            stop,
            task: Some(task),
        })
    }

    /// Which API this server plays.
    pub fn api(&self) -> Api {
        self.api
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT` of the server (a wildcard bind address is shown as loopback).
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The current knobs.
    pub fn knobs(&self) -> Knobs {
        self.shared.knobs.get()
    }

    /// Replaces the knobs (rates are clamped into `[0, 1]`); applies from the next request on.
    pub fn set_knobs(&self, knobs: Knobs) {
        self.shared.knobs.set(knobs);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats.snapshot()
    }

    /// Zeroes the counters (requests in flight stay in `in_flight`).
    pub fn reset_stats(&self) {
        self.shared.stats.reset();
    }

    /// Stops listening, closes every open connection and waits until that is done.
    pub async fn shutdown(mut self) {
        self.close_listener();
        self.stop.notify_one();
        if let Some(task) = self.task.take() {
            if let Err(err) = task.await {
                if err.is_panic() {
                    tracing::error!(api = %self.api, "demo server task panicked");
                }
            }
        }
    }

    fn close_listener(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(listener);
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.close_listener();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets a test restart an upstream on the port it just dropped (TIME_WAIT leftovers).
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Everything a connection needs to answer requests.
struct App {
    api: Router,
    control: Router,
    shared: Arc<Shared>,
    local: SocketAddr,
}

async fn accept_loop(app: Arc<App>, listener: SharedListener, stop: Arc<Notify>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Idle keep-alive connections stay open until the client closes them: hyper's default
    // 30 s header-read timeout would close pooled proxy connections mid-test, at random.
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(None);
    let builder = Arc::new(builder);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.notified() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept(&listener) => match accepted {
                Some(Ok((stream, peer))) => {
                    connections.spawn(serve_connection(
                        Arc::clone(&app),
                        Arc::clone(&builder),
                        stream,
                        peer,
                    ));
                }
                Some(Err(err)) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None => break,
            },
        }
    }
    // Closes every open connection (their tasks are cancelled and their sockets dropped).
    connections.shutdown().await;
}

/// Accepts one connection, or `None` once the listener has been closed.
async fn accept(
    listener: &Mutex<Option<TcpListener>>,
) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
    poll_fn(|cx| {
        let guard = listener.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(listener) => listener.poll_accept(cx).map(Some),
            None => Poll::Ready(None),
        }
    })
    .await
}

async fn serve_connection(
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
    }
    let service = hyper::service::service_fn(move |request| handle(Arc::clone(&app), request));
    if let Err(err) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
    }
}

/// The error a request's service returns to make hyper close the connection unanswered.
#[derive(Debug)]
struct ConnectionDropped;

impl fmt::Display for ConnectionDropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for ConnectionDropped {}

async fn handle(
    app: Arc<App>,
    request: hyper::Request<Incoming>,
) -> Result<Response, ConnectionDropped> {
    if app.shared.closed.load(Ordering::Acquire) {
        return Err(ConnectionDropped);
    }
    let mut request = request.map(Body::new);
    request.extensions_mut().insert(LocalAddr(app.local));
    let router = if request.uri().path().starts_with(CONTROL_PREFIX) {
        app.control.clone()
    } else {
        app.api.clone()
    };
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if response.extensions().get::<DropConnection>().is_some() {
        return Err(ConnectionDropped);
    }
    Ok(response)
}

/// The API's routes wrapped in the knobs and stats middleware (fallbacks included).
fn api_router(api: Api, shared: Arc<Shared>) -> anyhow::Result<Router> {
    let routes = match api {
        Api::Restaurants => restaurants::router()?,
        Api::Clv => clv::router(),
        Api::Voucher => voucher::router(),
        Api::Orders => orders::router(),
        Api::Campaigns => campaigns::router(),
    };
    Ok(routes.layer(middleware::from_fn_with_state(shared, knobs_and_stats)))
}

/// Counts the request on arrival, then applies latency, drops and injected errors.
async fn knobs_and_stats(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
    let _in_flight = shared
        .stats
        .record(request.method().as_str(), route, request.uri().path());
    let knobs = shared.knobs.get();
    if knobs.latency_ms > 0 {
        tokio::time::sleep(knobs.latency()).await;
    }
    if chance(knobs.drop_rate) {
        let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
        response.extensions_mut().insert(DropConnection);
        return response;
    }
    if chance(knobs.error_rate) {
        return respond::injected_failure();
    }
    next.run(request).await
}

/// True with probability `rate` (0 never, 1 always).
fn chance(rate: f64) -> bool {
    rate > 0.0 && (rate >= 1.0 || rand::rng().random::<f64>() < rate)
}

/// `/__stats`, `/__stats/reset` and `/__knobs`.
fn control_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/__stats", get(get_stats))
        .route("/__stats/reset", post(reset_stats))
        .route("/__knobs", get(get_knobs).put(put_knobs))
        .fallback(|| async { control_error(StatusCode::NOT_FOUND, "no such control endpoint") })
        .method_not_allowed_fallback(|| async {
            control_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .with_state(shared)
}

async fn get_stats(State(shared): State<Arc<Shared>>) -> Response {
    respond::json(StatusCode::OK, &shared.stats.snapshot())
}

async fn reset_stats(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.stats.reset();
    StatusCode::NO_CONTENT
}

async fn get_knobs(State(shared): State<Arc<Shared>>) -> Response {
    respond::json(StatusCode::OK, &shared.knobs.get())
}

async fn put_knobs(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let patch: KnobsPatch = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(err) => {
            return control_error(StatusCode::BAD_REQUEST, &format!("invalid knobs: {err}"))
        }
    };
    let knobs = patch.apply(shared.knobs.get());
    if let Err(message) = knobs.validate() {
        return control_error(StatusCode::BAD_REQUEST, &message);
    }
    shared.knobs.set(knobs);
    respond::json(StatusCode::OK, &shared.knobs.get())
}

fn control_error(status: StatusCode, message: &str) -> Response {
    let code = if status == StatusCode::NOT_FOUND {
        "NOT_FOUND"
    } else {
        "BAD_REQUEST"
    };
    respond::json(
        status,
        &serde_json::json!({"error": code, "message": message}),
    )
}
