//! The idle upstream connections of the front's forwarder ([`super::forward`]), one pool per
//! proxy worker: a LIFO stack per peer behind a mutex, held only to push or pop.
//!
//! pingora's pool watches every idle connection with a task of its own, spawned each time a
//! connection comes back, and checks a taken one's peer address with a system call; here a
//! connection is checked when it is taken (one non-blocking read poll, no system call unless
//! the socket became readable: closed, reset or sent something unasked, it is dropped), and
//! one task per pool sweeps out the closed and the expired ones every quarter of
//! [`IDLE_TIMEOUT`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, ReadBuf};

use crate::upstream::peer::{IDLE_TIMEOUT, MAX_IDLE_PER_UPSTREAM};

/// An idle connection and when it became idle.
struct Idle {
    stream: Stream,
    since: Instant,
}

/// Idle connections by peer (pingora's `reuse_hash` of the peer).
type ByPeer = HashMap<u64, Vec<Idle>>;

#[derive(Default)]
pub struct IdlePool {
    idle: Arc<Mutex<ByPeer>>,
    sweeping: AtomicBool,
}

impl IdlePool {
    /// The most recently idle connection to the peer `key` that is still usable.
    pub fn take(&self, key: u64) -> Option<Stream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let stack = idle.get_mut(&key)?;
        while let Some(mut conn) = stack.pop() {
            if conn.since.elapsed() >= IDLE_TIMEOUT {
                // The rest became idle earlier still.
                stack.clear();
                return None;
            }
            if still_idle(&mut conn.stream) {
                return Some(conn.stream);
            }
        }
        None
    }

    /// Keeps a reusable connection to the peer `key` (dropped when the peer has
    /// [`MAX_IDLE_PER_UPSTREAM`] already). Call within the runtime the connection is
    /// registered with: the first call starts the sweeping task there.
    pub fn put(&self, key: u64, stream: Stream) {
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep_every(Arc::downgrade(&self.idle)));
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let stack = idle.entry(key).or_default();
        if stack.len() < MAX_IDLE_PER_UPSTREAM {
            stack.push(Idle {
                stream,
                since: Instant::now(),
            });
        }
    }
}

/// Drops the pool's closed and expired connections every quarter of [`IDLE_TIMEOUT`], until
/// the pool is gone.
async fn sweep_every(idle: Weak<Mutex<ByPeer>>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(idle) = idle.upgrade() else {
            return;
        };
        let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
        for stack in idle.values_mut() {
            stack.retain_mut(|c| c.since.elapsed() < IDLE_TIMEOUT && still_idle(&mut c.stream));
        }
        idle.retain(|_, stack| !stack.is_empty());
    }
}

/// An idle connection is still usable when reading it would wait: no end of stream, no
/// error, no bytes the peer was not asked for. One poll with a no-op waker: the runtime
/// knows the socket's readiness, so a quiet socket costs no system call.
fn still_idle(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    let read = std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_read(cx, &mut buf));
    let read = pin!(tokio::task::unconstrained(read));
    matches!(read.poll(&mut cx), Poll::Pending)
}
