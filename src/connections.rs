//! Client connections: the deadlines and caps of `[server]` and the order of a graceful stop.
//!
//! pingora reads a request head with a per-read timeout only (a client trickling one byte at
//! a time is never cut), waits for the next request on a keep-alive connection forever and
//! accepts any number of connections. stoa therefore
//! - makes the TLS handshake of connections to the TLS listener itself, within
//!   `server.header_timeout` of the accept (a client that never sends its ClientHello is
//!   closed), after counting the connection;
//! - wraps every accepted stream in a [`Guarded`] stream, which knows which phase its
//!   connection is in (reading a head, reading a body, idle between requests) and enforces
//!   that phase's deadline; the proxy tells it when a head and a body are complete. It also
//!   buffers an answer's small writes in a buffer it takes for the answer and gives back once
//!   the answer is flushed (the accepted stream has no buffers of its own: see
//!   `crate::workers`), so an idle connection holds no buffer; and it can fence reads at the end of a request
//!   ([`fence`]), so that pingora's proxy never reads the next request's bytes;
//! - serves the proxy through [`Listener`], which counts open connections (refusing those
//!   beyond `server.max_connections`) and, once the listening sockets are closed, drains the
//!   connections before idle ones are closed;
//! - hands the proxy's workers a shutdown signal of their own (`crate::workers`), so that
//!   SIGTERM stops accepting first while in-flight requests keep running.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use futures_util::task::AtomicWaker;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::protocols::ALPN;
use pingora::protocols::{Peek, Ssl, IO};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::chunked::{Chunked, Fed};
use crate::config::ConnectionLimits;
use crate::error::StoaError;
use crate::exchange::Exchange;
use crate::gateway::Gateway;
use crate::lifecycle::{Lifecycle, OpenConnection};

/// How many bytes of an answer's small writes [`Guarded`] gathers into one write to the
/// socket (pingora's default write buffer, about one TCP segment).
const WRITE_BUFFER: usize = 1460;

/// No fence on reads (see [`fence`]).
const UNFENCED: u64 = u64::MAX;

/// Reads fenced at the end of a chunked body (see [`fence_chunked`]).
const CHUNKED: u64 = u64::MAX - 1;

/// After the last in-flight request, how long a draining process still waits for requests
/// already on their way over idle keep-alive connections before it closes those.
const IDLE_LINGER: Duration = Duration::from_millis(200);

/// How often the drain checks its counters.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// What a connection is waiting for.
const HEAD: u8 = 0;
const BODY: u8 = 1;
/// The body is in (or there is none): the answer is being made; no deadline of ours.
const ANSWER: u8 = 2;
const IDLE: u8 = 3;
/// An HTTP/2 connection past its preface: its streams are bounded by flow control and
/// `server.h2_max_concurrent_streams`, an idle one is closed by pingora after
/// `server.keepalive_timeout`; no deadline of ours.
const H2: u8 = 4;

/// The first bytes of HTTP/2's connection preface (`PRI * HTTP/2.0`); no HTTP/1.1 method
/// starts so.
const H2_PREFACE_START: &[u8] = b"PRI ";
/// The bytes an HTTP/2 client sends first: the 24-byte preface and a SETTINGS frame's
/// header. They are due within `server.header_timeout` of the accept.
const H2_OPENING: usize = 24 + 9;

/// The error a read returns when the request body missed `server.body_timeout`; the proxy
/// answers it with 408 (see [`body_timed_out`]).
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {} ms", .0.as_millis())]
pub struct BodyTimedOut(pub Duration);

/// Whether a pingora error comes from a missed body deadline, and which.
pub fn body_timed_out(e: &pingora::Error) -> Option<Duration> {
    e.root_cause()
        .downcast_ref::<io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<BodyTimedOut>())
        .map(|t| t.0)
}

/// Tells the task serving a connection to drop it (the deadline of an idle connection or of a
/// request head passed), without going through pingora's error path and its error log.
#[derive(Debug, Default)]
struct Cut {
    fired: AtomicBool,
    waker: AtomicWaker,
}

impl Cut {
    fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves once [`Cut::fire`] was called.
    fn wait(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.fired.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.fired.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// An accepted client stream that enforces the deadline of the phase its connection is in:
/// `header_timeout` for a request head (from the accept for the first request, from the
/// first byte for later ones), `body_timeout` for a whole request body, `keepalive_timeout`
/// between requests. The hot path costs a phase check per read and a clock read per read that
/// has to wait; the one timer of a connection is only moved when it would fire too late.
#[derive(Debug)]
pub struct Guarded {
    /// Declared before `inner`, so it is dropped first: the connection's slot under
    /// `max_connections` is free before the socket closes, and a client that sees the close
    /// may connect again at once.
    _open: OpenConnection,
    inner: Stream,
    limits: ConnectionLimits,
    /// Written by the proxy through `&self` (the same task that polls the stream).
    phase: AtomicU8,
    requests: AtomicU32,
    /// The phase the read side last saw, when that phase's wait began, and whether bytes of
    /// the current head arrived.
    seen: u8,
    since: Option<Instant>,
    head_bytes: bool,
    timer: Option<Pin<Box<Sleep>>>,
    cut: Arc<Cut>,
    /// HTTP/2: chosen by ALPN, or the first bytes were its preface.
    h2: bool,
    /// The connection may open with HTTP/2's preface (`server.h2c`, cleartext).
    h2c: bool,
    /// Bytes of the HTTP/2 opening received so far.
    h2_bytes: usize,
    /// An answer's small writes, sent together when full or flushed. Taken at the first
    /// write of an answer and given back when it is flushed: empty, without capacity, while
    /// the connection is idle.
    out: Vec<u8>,
    /// How many of `out`'s bytes the socket has taken (a flush may take several writes).
    out_sent: usize,
    /// How many more bytes reads may return ([`UNFENCED`]: any; [`CHUNKED`]: up to the
    /// end of `chunked`); at 0 a read waits.
    fence: AtomicU64,
    /// The framing of the chunked body reads are fenced at, as far as it was read.
    chunked: parking_lot::Mutex<Option<Box<Chunked>>>,
}

impl Guarded {
    fn new(
        open: OpenConnection,
        inner: Stream,
        limits: ConnectionLimits,
        cut: Arc<Cut>,
        accepted: Instant,
        (h2, h2c): (bool, bool),
    ) -> Self {
        Guarded {
            _open: open,
            inner,
            limits,
            phase: AtomicU8::new(HEAD),
            requests: AtomicU32::new(0),
            seen: HEAD,
            // The first head is due `header_timeout` after the accept (a TLS handshake
            // included).
            since: Some(accepted),
            head_bytes: false,
            timer: None,
            cut,
            h2,
            h2c,
            h2_bytes: 0,
            out: Vec::new(),
            out_sent: 0,
            fence: AtomicU64::new(UNFENCED),
            chunked: parking_lot::Mutex::new(None),
        }
    }

    /// Writes `out` to the socket until it is empty.
    fn poll_send_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_sent < self.out.len() {
            let rest = &self.out[self.out_sent..];
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.out_sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.out_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Gathers `len` bytes into `out`, when they fit in [`WRITE_BUFFER`]: whether they
    /// will (`out` is sent first when they would not fit after it).
    fn poll_gather(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.out.len() + len > WRITE_BUFFER {
            ready!(self.poll_send_out(cx))?;
        }
        if len >= WRITE_BUFFER {
            return Poll::Ready(Ok(false));
        }
        if self.out.capacity() == 0 {
            self.out.reserve_exact(WRITE_BUFFER);
        }
        Poll::Ready(Ok(true))
    }

    /// The request head is parsed. Returns whether the connection may carry another request
    /// after this one (`server.keepalive_requests`).
    fn head_received(&self, has_body: bool) -> bool {
        self.phase
            .store(if has_body { BODY } else { ANSWER }, Ordering::Relaxed);
        let served = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        served < self.limits.keepalive_requests
    }

    fn body_received(&self) {
        self.phase.store(ANSWER, Ordering::Relaxed);
    }

    fn request_done(&self) {
        self.phase.store(IDLE, Ordering::Relaxed);
    }

    /// A read had to wait: arms the deadline of the phase, and acts on it once it passed.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let limit = match self.seen {
            HEAD => self.limits.header_timeout,
            BODY => self.limits.body_timeout,
            IDLE => self.limits.keepalive_timeout,
            _ => return Poll::Pending,
        };
        let now = Instant::now();
        let deadline = *self.since.get_or_insert(now) + limit;
        if now >= deadline {
            return self.expire(cx);
        }
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() > deadline {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        let mut fired = timer.as_mut().poll(cx).is_ready();
        if fired {
            // The timer of an earlier deadline: move it to this one and register again.
            timer.as_mut().reset(deadline);
            fired = timer.as_mut().poll(cx).is_ready();
        }
        if fired {
            return self.expire(cx);
        }
        Poll::Pending
    }

    fn expire(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.seen {
            BODY => {
                let e = BodyTimedOut(self.limits.body_timeout);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, e)))
            }
            phase => {
                // An HTTP/1.1 answer is no use to an HTTP/2 client.
                if phase == HEAD && self.head_bytes && !self.h2 {
                    self.answer_408(cx);
                }
                tracing::debug!(
                    phase = if phase == HEAD { "head" } else { "idle" },
                    "closing a client connection at its deadline"
                );
                self.cut.fire();
                Poll::Pending
            }
        }
    }

    /// Best effort: the connection is closed right after, whatever happens here.
    fn answer_408(&mut self, cx: &mut Context<'_>) {
        let err = StoaError::RequestTimeout {
            what: "request head",
            timeout_ms: self.limits.header_timeout.as_millis(),
        };
        let answer = err.closing_answer();
        let mut inner = Pin::new(&mut self.inner);
        if let Poll::Ready(Ok(n)) = inner.as_mut().poll_write(cx, &answer) {
            if n == answer.len() {
                let _ = inner.as_mut().poll_flush(cx);
                let _ = inner.as_mut().poll_shutdown(cx);
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase.load(Ordering::Relaxed);
        if phase != this.seen {
            this.seen = phase;
            this.since = None;
            this.head_bytes = false;
        }
        let fence = this.fence.load(Ordering::Relaxed);
        if fence == CHUNKED {
            return this.poll_read_chunked(cx, buf);
        }
        if fence == 0 {
            // The request's bytes are all read: the next request's wait in the socket.
            return Poll::Pending;
        }
        if fence != UNFENCED && (buf.remaining() as u64) > fence {
            let mut limited = buf.take(fence as usize);
            let read = Pin::new(&mut *this).poll_read(cx, &mut limited);
            let n = limited.filled().len();
            // SAFETY: `limited` is the start of `buf`'s unfilled part; `n` bytes of it were
            // filled.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            return read;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if fence != UNFENCED {
                    this.fence
                        .store(fence - got.len() as u64, Ordering::Relaxed);
                }
                if !got.is_empty()
                    && this.seen == HEAD
                    && !this.head_bytes
                    && this.requests.load(Ordering::Relaxed) == 0
                    && (this.h2
                        || (this.h2c && this.h2_bytes == 0 && got.starts_with(H2_PREFACE_START)))
                {
                    // HTTP/2 (by ALPN, or h2c with prior knowledge): once its opening is in,
                    // no deadline of ours.
                    this.h2 = true;
                    this.h2_bytes += got.len();
                    if this.h2_bytes >= H2_OPENING {
                        this.phase.store(H2, Ordering::Relaxed);
                        this.seen = H2;
                        this.since = None;
                    }
                    return Poll::Ready(Ok(()));
                }
                if buf.filled().len() > before && (this.seen == HEAD || this.seen == IDLE) {
                    if this.seen == IDLE {
                        // The first bytes of the next request: its head is now due.
                        this.phase.store(HEAD, Ordering::Relaxed);
                        this.seen = HEAD;
                        this.since = None;
                    }
                    this.head_bytes = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.wait(cx),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if ready!(this.poll_gather(cx, buf.len()))? {
            this.out.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    /// Sends what was gathered and gives the buffer back: the answer is out.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_out(cx))?;
        this.out = Vec::new();
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_out(cx))?;
        this.out = Vec::new();
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Pieces of one answer written together (the front's byte writer): one write as
        // they are, with nothing gathered before them to send first.
        if this.out.is_empty() && bufs.len() > 1 {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        if ready!(this.poll_gather(cx, len))? {
            for b in bufs {
                this.out.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Implements pingora's stream traits but `Peek` (shutdown, id, TLS, timing, proxy and
/// socket digests) for a wrapper of a [`Stream`] in its field `inner`, by asking `inner`.
macro_rules! delegate_stream_traits {
    ($wrapper:ty) => {
        #[async_trait::async_trait]
        impl pingora::protocols::Shutdown for $wrapper {
            async fn shutdown(&mut self) {
                pingora::protocols::Shutdown::shutdown(&mut *self.inner).await
            }
        }

        impl pingora::protocols::UniqueID for $wrapper {
            fn id(&self) -> pingora::protocols::UniqueIDType {
                pingora::protocols::UniqueID::id(&*self.inner)
            }
        }

        impl pingora::protocols::Ssl for $wrapper {
            fn get_ssl_digest(&self) -> Option<std::sync::Arc<pingora::protocols::tls::SslDigest>> {
                pingora::protocols::Ssl::get_ssl_digest(&*self.inner)
            }

            fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
                pingora::protocols::Ssl::selected_alpn_proto(&*self.inner)
            }
        }

        impl pingora::protocols::GetTimingDigest for $wrapper {
            fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
                pingora::protocols::GetTimingDigest::get_timing_digest(&*self.inner)
            }

            fn get_read_pending_time(&self) -> std::time::Duration {
                pingora::protocols::GetTimingDigest::get_read_pending_time(&*self.inner)
            }

            fn get_write_pending_time(&self) -> std::time::Duration {
                pingora::protocols::GetTimingDigest::get_write_pending_time(&*self.inner)
            }
        }

        impl pingora::protocols::GetProxyDigest for $wrapper {
            fn get_proxy_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::raw_connect::ProxyDigest>> {
                pingora::protocols::GetProxyDigest::get_proxy_digest(&*self.inner)
            }

            fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
                pingora::protocols::GetProxyDigest::set_proxy_digest(&mut *self.inner, digest)
            }
        }

        impl pingora::protocols::GetSocketDigest for $wrapper {
            fn get_socket_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::SocketDigest>> {
                pingora::protocols::GetSocketDigest::get_socket_digest(&*self.inner)
            }

            fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
                pingora::protocols::GetSocketDigest::set_socket_digest(&mut *self.inner, digest)
            }
        }
    };
}
pub(crate) use delegate_stream_traits;

delegate_stream_traits!(Guarded);

/// pingora peeks at the first bytes of a cleartext connection for HTTP/2's preface when
/// `server.h2c` is on, waiting for all of them: the head deadline bounds the wait.
#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let deadline = self.since.unwrap_or_else(Instant::now) + self.limits.header_timeout;
        match tokio::time::timeout_at(deadline, self.inner.try_peek(buf)).await {
            Ok(peeked) => peeked,
            Err(_) => {
                tracing::debug!("closing a client connection at its deadline: no preface");
                self.cut.fire();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request head in time",
                ))
            }
        }
    }
}

impl Guarded {
    /// A read fenced at the end of a chunked body: it takes no more than the body has left
    /// whatever its bytes are, then follows the body's framing through what it took.
    fn poll_read_chunked(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(mut body) = self.chunked.get_mut().take() else {
            self.fence.store(UNFENCED, Ordering::Relaxed);
            return Pin::new(self).poll_read(cx, buf);
        };
        self.fence.store(body.most(), Ordering::Relaxed);
        let before = buf.filled().len();
        let read = Pin::new(&mut *self).poll_read(cx, buf);
        let fence = match body.feed(&buf.filled()[before..]) {
            Fed::End(_) => 0,
            Fed::Invalid => UNFENCED,
            Fed::More => {
                *self.chunked.get_mut() = Some(body);
                CHUNKED
            }
        };
        self.fence.store(fence, Ordering::Relaxed);
        read
    }
}

/// The guarded stream under a session, if it is one.
fn guarded(session: &impl Exchange) -> Option<&Guarded> {
    let stream: &dyn IO = &**session.stream()?;
    stream.as_any().downcast_ref::<Guarded>()
}

/// Fences the reads of a connection's stream: at most `bytes` more are read (`None`: no
/// fence), and a read past them waits. The front fences the bytes of a request it hands to
/// pingora's proxy, which otherwise reads on into the next request (its body reads, its
/// probe of an idle client) and, not keeping those bytes, closes the connection.
pub fn fence(stream: &Stream, bytes: Option<u64>) {
    let stream: &dyn IO = &**stream;
    if let Some(conn) = stream.as_any().downcast_ref::<Guarded>() {
        conn.fence
            .store(bytes.unwrap_or(UNFENCED), Ordering::Relaxed);
        conn.chunked.lock().take();
    }
}

/// Fences the reads of a connection's stream at the end of the chunked request body whose
/// framing so far is `body` (the bytes read before it were fed to it): pingora's proxy
/// reads the body, and no byte past it.
pub fn fence_chunked(stream: &Stream, body: Chunked) {
    let stream: &dyn IO = &**stream;
    if let Some(conn) = stream.as_any().downcast_ref::<Guarded>() {
        *conn.chunked.lock() = Some(Box::new(body));
        conn.fence.store(CHUNKED, Ordering::Relaxed);
    }
}

/// Bytes of a next request were read with the last one (pipelining): its head is due
/// within `server.header_timeout`, as if its first bytes had just arrived.
pub fn head_begun(stream: &Stream) {
    let stream: &dyn IO = &**stream;
    if let Some(conn) = stream.as_any().downcast_ref::<Guarded>() {
        conn.phase.store(HEAD, Ordering::Relaxed);
    }
}

/// The proxy read a request head: the body deadline starts (if there is a body), and the
/// answer closes the connection if it is the connection's last (`server.keepalive_requests`).
pub fn head_received(session: &mut impl Exchange) {
    let has_body = !session.is_body_empty();
    let Some(may_continue) = guarded(session).map(|conn| conn.head_received(has_body)) else {
        return;
    };
    if !may_continue {
        session.set_keepalive(None);
    }
    // The whole-body deadline bounds every body read; pingora's own per-read timeout
    // (60 s) would cut a longer `server.body_timeout` short, and without a body it could
    // never fire: no timer for reads that cannot wait.
    session.set_read_timeout(None);
}

/// The proxy read the whole request body.
pub fn body_received(session: &impl Exchange) {
    if let Some(conn) = guarded(session) {
        conn.body_received();
    }
}

/// The request is answered: the connection is idle until the next one.
pub fn request_done(session: &impl Exchange) {
    if let Some(conn) = guarded(session) {
        conn.request_done();
    }
}

/// The served app (the proxy) as pingora serves it: counts connections, guards their
/// streams, and orders the drain once the listening socket is closed.
pub struct Listener<A> {
    app: Arc<A>,
    gateway: Arc<ArcSwap<Gateway>>,
    lifecycle: Arc<Lifecycle>,
    /// Given to pingora for every connection; set once the drain begins, so that pingora
    /// answers the next request of each connection with `Connection: close`.
    drain_tx: watch::Sender<bool>,
    drain_rx: watch::Receiver<bool>,
    /// Seconds (since `started`) of the last warning about refused connections.
    last_refusal_warning: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
    /// The TLS listener's address and handshakes, if there is one.
    tls: Option<(SocketAddr, Acceptor)>,
    /// HTTP/2 with prior knowledge on the cleartext listener (`server.h2c`).
    h2c: bool,
    /// Which proxy worker this is (for the debug log).
    worker: usize,
}

impl<A> Listener<A> {
    pub fn new(app: A, gateway: Arc<ArcSwap<Gateway>>, lifecycle: Arc<Lifecycle>) -> Self {
        let (drain_tx, drain_rx) = watch::channel(false);
        Listener {
            app: Arc::new(app),
            gateway,
            lifecycle,
            drain_tx,
            drain_rx,
            last_refusal_warning: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
            tls: None,
            h2c: false,
            worker: 0,
        }
    }

    /// The proxy worker this listener serves in.
    pub fn with_worker(mut self, worker: usize) -> Self {
        self.worker = worker;
        self
    }

    /// Cleartext connections may speak HTTP/2 with prior knowledge.
    pub fn with_h2c(mut self, h2c: bool) -> Self {
        self.h2c = h2c;
        self
    }

    /// Connections accepted on `addr` speak TLS, with the handshakes of `acceptor`.
    pub fn with_tls(mut self, addr: SocketAddr, acceptor: Acceptor) -> Self {
        self.tls = Some((addr, acceptor));
        self
    }

    /// The TLS handshake of a connection accepted on the TLS listener, bounded by
    /// `deadline`, with whether it is TLS and whether ALPN chose HTTP/2; the stream as it
    /// was for a connection to the cleartext listener. `None`: the handshake failed or was
    /// too slow, and the connection is dropped.
    async fn handshake(
        &self,
        open: OpenConnection,
        stream: Stream,
        deadline: Instant,
    ) -> Option<(OpenConnection, Stream, bool, bool)> {
        let Some((addr, acceptor)) = &self.tls else {
            return Some((open, stream, false, false));
        };
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let on_tls = local.is_some_and(|local| {
            local.port() == addr.port() && (addr.ip().is_unspecified() || local.ip() == addr.ip())
        });
        if !on_tls {
            return Some((open, stream, false, false));
        }
        let l4 = match stream.into_any().downcast::<L4Stream>() {
            Ok(l4) => *l4,
            Err(_) => {
                tracing::error!("a TLS listener connection is not a TCP stream");
                return None;
            }
        };
        // Held here (not in the timeout) so the socket it owns closes when this function
        // returns, after `open` is dropped: the slot is free before the client sees the close.
        let handshake = acceptor.tls_handshake(l4);
        tokio::pin!(handshake);
        match tokio::time::timeout_at(deadline, &mut handshake).await {
            Ok(Ok(tls)) => {
                let h2 = matches!(tls.selected_alpn_proto(), Some(ALPN::H2));
                Some((open, Box::new(tls), true, h2))
            }
            Ok(Err(e)) => {
                drop(open);
                tracing::debug!("TLS handshake failed: {e}");
                None
            }
            Err(_) => {
                drop(open);
                tracing::debug!("closing a client connection: no TLS handshake in time");
                None
            }
        }
    }

    /// From here on every answer closes its connection.
    pub fn begin_drain(&self) {
        self.lifecycle.begin_drain();
        self.drain_tx.send_replace(true);
    }

    /// How long the drain may take (`server.shutdown_timeout`).
    pub fn shutdown_timeout(&self) -> Duration {
        self.gateway.load().config.server.shutdown_timeout
    }

    /// At most one warning a second about connections refused at `max_connections`.
    fn warn_refused(&self, max: usize) {
        let now = self.started.elapsed().as_secs() + 1;
        let last = self.last_refusal_warning.load(Ordering::Relaxed);
        if now > last
            && self
                .last_refusal_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                max_connections = max,
                "refusing client connections: server.max_connections reached"
            );
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Listener<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Read per connection, so a reload applies to the connections opened after it.
        let limits = self.gateway.load().config.server.connections;
        let Some(open) = self.lifecycle.open_connection(limits.max_connections) else {
            self.warn_refused(limits.max_connections);
            // Dropping the stream closes the connection at once.
            return None;
        };
        tracing::debug!(worker = self.worker, "client connection accepted");
        let accepted = Instant::now();
        // Boxed: the handshake's state is large, and the connection's task keeps its own
        // future for as long as the connection lives.
        let (open, stream, tls, h2) =
            Box::pin(self.handshake(open, stream, accepted + limits.header_timeout)).await?;
        let h2c = self.h2c && !tls;
        let cut = Arc::new(Cut::default());
        let stream: Stream = Box::new(Guarded::new(
            open,
            stream,
            limits,
            cut.clone(),
            accepted,
            (h2, h2c),
        ));
        tokio::select! {
            biased;
            _ = self.app.process_new(stream, &self.drain_rx) => {}
            () = cut.wait() => {}
        }
        None
    }

    /// Called once the workers stopped accepting and the listening sockets are closed (see
    /// `crate::workers::Served`): new connections are refused by the kernel from here on.
    /// Every answer now closes its
    /// connection; in-flight requests finish (up to `server.shutdown_timeout`), requests
    /// already sent on idle connections get a short while to arrive, then idle connections
    /// are closed.
    async fn cleanup(&self) {
        let deadline = Instant::now() + self.shutdown_timeout();
        self.begin_drain();
        let mut quiet_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if self.lifecycle.open_connections() == 0 || now >= deadline {
                break;
            }
            if self.lifecycle.in_flight() == 0 {
                let since = *quiet_since.get_or_insert(now);
                if now >= since + IDLE_LINGER {
                    break;
                }
            } else {
                quiet_since = None;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        tracing::info!(
            in_flight = self.lifecycle.in_flight(),
            open_connections = self.lifecycle.open_connections(),
            "proxy drained: closing idle connections"
        );
        // Wakes the connections parked waiting for a next request: they close.
        self.app.cleanup().await;
        self.lifecycle.mark_proxy_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A guarded stream on one end of a loopback connection, and the other end.
    async fn pair() -> (Guarded, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let inner: Stream = Box::new(L4Stream::from(accepted.unwrap().0));
        let open = Lifecycle::new().open_connection(1).unwrap();
        let limits = ConnectionLimits::default();
        let cut = Arc::new(Cut::default());
        let guarded = Guarded::new(open, inner, limits, cut, Instant::now(), (false, false));
        (guarded, client.unwrap())
    }

    #[tokio::test]
    async fn small_writes_go_out_together_and_the_buffer_is_given_back() {
        let (mut conn, mut client) = pair().await;
        assert_eq!(conn.out.capacity(), 0, "no buffer before an answer");
        conn.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        conn.write_all(b"content-length: 2\r\n\r\nok")
            .await
            .unwrap();
        assert!(conn.out.capacity() > 0, "gathered, not yet sent");
        conn.flush().await.unwrap();
        assert_eq!(
            conn.out.capacity(),
            0,
            "the buffer goes back with the answer"
        );
        let mut got = vec![0u8; 40];
        let n = client.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        // A large write goes straight out, after what was gathered before it.
        conn.write_all(b"head").await.unwrap();
        let body = vec![b'x'; 3 * WRITE_BUFFER];
        conn.write_all(&body).await.unwrap();
        conn.flush().await.unwrap();
        let mut got = vec![0u8; 4 + body.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert_eq!(conn.out.capacity(), 0);
    }

    #[tokio::test]
    async fn a_fenced_stream_reads_no_further_than_its_fence() {
        let (mut conn, mut client) = pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\nNEXT")
            .await
            .unwrap();
        conn.fence.store(18, Ordering::Relaxed);
        let mut got = vec![0u8; 64];
        let mut n = 0;
        while n < 18 {
            n += conn.read(&mut got[n..]).await.unwrap();
        }
        assert_eq!(&got[..n], b"GET / HTTP/1.1\r\n\r\n");
        // At the fence a read waits, leaving the next request's bytes in the socket.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), conn.read(&mut got)).await;
        assert!(waited.is_err(), "read past the fence");
        conn.fence.store(UNFENCED, Ordering::Relaxed);
        let n = conn.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"NEXT");
    }

    /// Fenced at a chunked body's end: big reads take the body, trailers included, and not
    /// a byte of what follows, however the body's bytes arrive.
    #[tokio::test]
    async fn a_chunked_fence_reads_to_the_bodys_end_and_no_further() {
        let body: &[u8] =
            b"5\r\nhello\r\n1a;x=y\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nT: 1\r\n\r\n";
        for split in [body.len(), 1, 7, 17] {
            let (mut conn, mut client) = pair().await;
            // The first 3 bytes came with the head, before the fence.
            let mut chunked = Chunked::default();
            assert_eq!(chunked.feed(&body[..3]), Fed::More);
            conn.fence.store(CHUNKED, Ordering::Relaxed);
            *conn.chunked.get_mut() = Some(Box::new(chunked));
            let mut rest = body[3..].to_vec();
            rest.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            let writer = tokio::spawn(async move {
                for piece in rest.chunks(split) {
                    client.write_all(piece).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                client
            });
            let mut got = Vec::new();
            let mut buf = vec![0u8; 4096];
            while got.len() < body.len() - 3 {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "split {split}: closed early");
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, &body[3..], "split {split}");
            let waited =
                tokio::time::timeout(std::time::Duration::from_millis(50), conn.read(&mut buf));
            assert!(waited.await.is_err(), "split {split}: read past the body");
            let _client = writer.await.unwrap();
            conn.fence.store(UNFENCED, Ordering::Relaxed);
            let n = conn.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /next"), "split {split}");
        }
    }
}
