//! The proxy's workers (`server.threads`) and their one accept queue.
//!
//! stoa binds the proxy's listening sockets itself ([`ListenSockets`]) and keeps them until
//! the drain. Each worker is a pingora service on a runtime of its own that runs stoa's own
//! accept loop on a duplicate of every socket (the same socket, so one accept queue for all: no connection
//! waits behind a busy worker's queue while another is idle). All workers share the
//! configuration, the cache, the limiters and the [`Lifecycle`]; each has its own upstream
//! connection pool (pingora's connector of its proxy app).
//!
//! On stop, the workers' accept loops end together (the lifecycle's stop watch) and each
//! closes its duplicate; the sockets stay open through stoa's own handles, so a connection
//! arriving meanwhile waits in the queue. Once every worker stopped accepting, the last one
//! accepts whatever is left in the queue (until the kernel has nothing more) and serves it
//! (each answer closes its connection: the drain has begun), then closes the sockets. No
//! connection the kernel accepted is dropped unanswered: only one arriving in the
//! microseconds between that last accept and the close is refused.
//!
//! The accept loop is stoa's, not pingora's listening service's: a connection's task holds
//! only the connection's own future (pingora's keeps room for a TLS handshake in every
//! connection's task, about 10 KiB, for as long as the connection lives), and its stream
//! has no read or write buffer of its own (see `crate::connections`).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service as ServiceTrait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::connections::Listener;
use crate::lifecycle::Lifecycle;

/// `accept` out of file descriptors (Linux's `EMFILE`).
const EMFILE: i32 = 24;

/// The accept queue's length (as pingora's own listeners).
const BACKLOG: i32 = 65535;

/// The proxy's listening sockets, bound by stoa, each with the address string its workers
/// listen on.
#[derive(Debug, Default)]
pub struct ListenSockets {
    sockets: Vec<(String, TcpListener)>,
}

impl ListenSockets {
    /// Binds `addr` (non-blocking, with the full accept queue).
    pub fn bind(&mut self, addr: SocketAddr) -> io::Result<()> {
        // std sets SO_REUSEADDR, as pingora does for the sockets it binds.
        let socket = TcpListener::bind(addr)?;
        socket2::SockRef::from(&socket).listen(BACKLOG)?;
        socket.set_nonblocking(true)?;
        self.sockets.push((addr.to_string(), socket));
        Ok(())
    }
}

/// What the workers share about their listening sockets and their stop.
#[derive(Debug)]
pub struct Workers {
    /// Workers that serve (or will).
    total: AtomicUsize,
    /// Workers whose accept loops ended.
    stopped: AtomicUsize,
    /// The listening sockets, until the last worker swept their queues and closed them.
    sockets: Mutex<Option<ListenSockets>>,
    /// `true` once the queues are swept and the sockets closed.
    swept: watch::Sender<bool>,
}

impl Workers {
    pub fn new(sockets: ListenSockets, total: usize) -> Arc<Self> {
        Arc::new(Workers {
            total: AtomicUsize::new(total),
            stopped: AtomicUsize::new(0),
            sockets: Mutex::new(Some(sockets)),
            swept: watch::channel(false).0,
        })
    }

    fn sockets(&self) -> MutexGuard<'_, Option<ListenSockets>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker's listening sockets: a duplicate of each socket under its address, which the
    /// worker's accept loop owns (and closes when it ends).
    fn table(&self) -> io::Result<Vec<(String, TcpListener)>> {
        let guard = self.sockets();
        let Some(sockets) = guard.as_ref() else {
            return Err(io::Error::other("the listening sockets are closed"));
        };
        sockets
            .sockets
            .iter()
            .map(|(addr, socket)| Ok((addr.clone(), socket.try_clone()?)))
            .collect()
    }

    /// A worker that could not start: the others no longer wait for it.
    fn abandon(&self) {
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    /// A worker's accept loops ended. Returns whether it was the last one.
    fn accept_stopped(&self) -> bool {
        self.stopped.fetch_add(1, Ordering::AcqRel) + 1 >= self.total.load(Ordering::Acquire)
    }

    /// Accepts every connection left in the sockets' queues, then closes the sockets.
    fn sweep(&self) -> Vec<TcpStream> {
        let mut left = Vec::new();
        if let Some(sockets) = self.sockets().take() {
            for (addr, socket) in &sockets.sockets {
                loop {
                    match socket.accept() {
                        Ok((stream, _)) => left.push(stream),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::warn!(listen = %addr, "accepting a queued connection: {e}");
                            break;
                        }
                    }
                }
            }
            // Dropping `sockets` closes them: from here the kernel refuses connections.
        }
        self.swept.send_replace(true);
        left
    }

    /// Waits (up to `deadline`) until the queues are swept.
    async fn wait_swept(&self, deadline: Instant) {
        let mut swept = self.swept.subscribe();
        let _ = tokio::time::timeout_at(deadline, swept.wait_for(|&s| s)).await;
    }
}

/// A connection accepted from the queue after the workers stopped.
fn stream(accepted: TcpStream) -> io::Result<Stream> {
    accepted.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(accepted)?;
    let peer = tcp.peer_addr()?;
    Ok(accepted_stream(tcp, peer))
}

/// An accepted connection as pingora's accept makes it (`TCP_NODELAY`, a socket digest that
/// knows the peer), without read or write buffers.
fn accepted_stream(tcp: tokio::net::TcpStream, peer: SocketAddr) -> Stream {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY on an accepted connection: {e}");
    }
    let fd = tcp.as_raw_fd();
    let mut stream = L4Stream::from(tcp);
    let digest = SocketDigest::from_raw_fd(fd);
    let _ = digest.peer_addr.set(Some(peer.into()));
    stream.set_socket_digest(digest);
    Box::new(stream)
}

/// Accepts connections on `socket` until `stop` says so, each served by `app` on a task of
/// its own.
async fn accept_loop<A: ServerApp + Send + Sync + 'static>(
    socket: TcpListener,
    app: Arc<Served<A>>,
    mut stop: ShutdownWatch,
) {
    let socket = match tokio::net::TcpListener::from_std(socket) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::error!("cannot accept on a listening socket: {e}");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            changed = stop.changed() => match changed {
                Ok(()) if !*stop.borrow() => continue,
                _ => break,
            },
        };
        match accepted {
            Ok((tcp, peer)) => {
                let (listener, stop) = (app.0.clone(), stop.clone());
                tokio::spawn(async move {
                    listener
                        .process_new(accepted_stream(tcp, peer), &stop)
                        .await;
                });
            }
            Err(e) => {
                tracing::error!("accept failed: {e}");
                // Out of descriptors: accept would fail again at once; let others close.
                if e.raw_os_error() == Some(EMFILE) {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// A worker's app: the proxy behind its [`Listener`], which, when the worker's accept
/// loops end, takes part in the stop of all workers before it drains.
pub struct Served<A>(Arc<Listener<A>>, Arc<Workers>);

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Served<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.0.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        let (listener, workers) = (&self.0, &self.1);
        // Answers close their connections from here, those of the swept ones included.
        listener.begin_drain();
        let deadline = Instant::now() + listener.shutdown_timeout();
        if workers.accept_stopped() {
            let left = workers.sweep();
            if !left.is_empty() {
                tracing::info!(
                    connections = left.len(),
                    "serving the connections left in the accept queue"
                );
            }
            let mut serving = Vec::with_capacity(left.len());
            for accepted in left {
                match stream(accepted) {
                    Ok(stream) => {
                        let listener = listener.clone();
                        serving.push(tokio::spawn(async move {
                            let never = watch::channel(false).1;
                            listener.process_new(stream, &never).await;
                        }));
                    }
                    Err(e) => tracing::warn!("serving a queued connection: {e}"),
                }
            }
            // Each of them is answered (and closed) before this worker's drain counts what
            // is left open, so none is taken for idle and closed unanswered.
            let _ =
                tokio::time::timeout_at(deadline, futures_util::future::join_all(serving)).await;
        } else {
            workers.wait_swept(deadline).await;
        }
        listener.cleanup().await;
    }
}

/// One worker: stoa's accept loops on the shared sockets, stopped by
/// [`Lifecycle::stop_accepting`] rather than by pingora's shutdown broadcast, which comes
/// only after the drain.
pub struct Worker<A> {
    name: String,
    app: Arc<Served<A>>,
    addrs: Vec<String>,
    threads: usize,
    workers: Arc<Workers>,
    lifecycle: Arc<Lifecycle>,
}

impl<A: ServerApp + Send + Sync + 'static> Worker<A> {
    /// A worker named `name` serving `listener` on every shared socket with `threads`
    /// threads.
    pub fn new(
        name: String,
        listener: Listener<A>,
        workers: Arc<Workers>,
        lifecycle: Arc<Lifecycle>,
        threads: usize,
    ) -> Self {
        let addrs: Vec<String> = workers
            .sockets()
            .as_ref()
            .map(|s| s.sockets.iter().map(|(addr, _)| addr.clone()).collect())
            .unwrap_or_default();
        Worker {
            name,
            app: Arc::new(Served(Arc::new(listener), workers.clone())),
            addrs,
            threads,
            workers,
            lifecycle,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServiceTrait for Worker<A> {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        // Should pingora shut down by itself, the proxy stops as well.
        let lifecycle = self.lifecycle.clone();
        tokio::spawn(async move {
            while shutdown.changed().await.is_ok() {
                if *shutdown.borrow() {
                    lifecycle.stop_accepting();
                    return;
                }
            }
        });
        let table = match self.workers.table() {
            Ok(table) => table,
            Err(e) => {
                tracing::error!(worker = self.name, "cannot start a proxy worker: {e}");
                self.workers.abandon();
                self.lifecycle.mark_proxy_closed();
                return;
            }
        };
        let stop = self.lifecycle.stop_watch();
        let loops: Vec<_> = table
            .into_iter()
            .map(|(_, socket)| tokio::spawn(accept_loop(socket, self.app.clone(), stop.clone())))
            .collect();
        futures_util::future::join_all(loops).await;
        self.app.cleanup().await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.addrs.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_accepts_what_is_queued_then_closes_the_socket() {
        let mut sockets = ListenSockets::default();
        sockets.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = sockets.sockets[0].1.local_addr().unwrap();
        let workers = Workers::new(sockets, 2);
        // Connections the kernel accepted into the queue, not yet taken by any worker.
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        assert!(!workers.accept_stopped(), "one worker still accepts");
        assert!(workers.accept_stopped(), "the last worker stopped");
        let left = workers.sweep();
        assert_eq!(left.len(), clients.len());
        assert!(*workers.swept.borrow());
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "the socket is closed after the sweep"
        );
        assert!(workers.table().is_err(), "no socket left to hand out");
    }

    #[test]
    fn each_worker_gets_its_own_descriptor_of_the_same_socket() {
        let mut sockets = ListenSockets::default();
        sockets.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (key, addr) = (
            sockets.sockets[0].0.clone(),
            sockets.sockets[0].1.local_addr().unwrap(),
        );
        let workers = Workers::new(sockets, 2);
        let (mut a, mut b) = (workers.table().unwrap(), workers.table().unwrap());
        let ((key_a, la), (key_b, lb)) = (a.remove(0), b.remove(0));
        assert_eq!((&key_a, &key_b), (&key, &key));
        assert_ne!(la.as_raw_fd(), lb.as_raw_fd());
        assert_eq!(la.local_addr().unwrap(), addr);
        assert_eq!(lb.local_addr().unwrap(), addr);
        // Closing one worker's descriptor leaves the socket listening.
        drop(la);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(workers.sweep().len(), 1);
    }
}
