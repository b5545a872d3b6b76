//! The last error answers stoa gave itself (404, 405, 429, 502, 504, ...), for the status
//! page: a ring of [`KEPT`] records behind a lock, filled by [`record`] where stoa writes
//! its errors ([`crate::proxy::answer::error`]). Only error answers pay for it (a lock and a
//! few small strings); answers from the cache and the upstream never come here.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::StoaError;

/// How many error answers the ring keeps.
pub const KEPT: usize = 50;
/// Longest path and message kept of one error, in bytes (cut at a character boundary).
const MAX_TEXT: usize = 256;

/// One error answer.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorRecord {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub method: String,
    /// The request's path, without its query (which may carry secrets).
    pub path: String,
    /// The upstream the error names, if any.
    pub upstream: Option<String>,
    pub request_id: String,
}

static RING: Mutex<VecDeque<ErrorRecord>> = Mutex::new(VecDeque::new());
static TOTAL: AtomicU64 = AtomicU64::new(0);

/// Keeps one error answer (the oldest of [`KEPT`] goes).
pub fn record(method: &str, path: &str, err: &StoaError, request_id: &[u8]) {
    let upstream = match err {
        StoaError::UpstreamUnreachable { upstream, .. }
        | StoaError::UpstreamTimeout { upstream, .. }
        | StoaError::UpstreamFailed { upstream, .. }
        | StoaError::UpstreamTls { upstream, .. }
        | StoaError::Overloaded { upstream, .. } => Some(upstream.clone()),
        _ => None,
    };
    let entry = ErrorRecord {
        at_ms: now_ms(),
        status: err.status().as_u16(),
        kind: err.kind(),
        message: cut(&err.to_string()),
        method: cut(method),
        path: cut(path),
        upstream,
        request_id: cut(&String::from_utf8_lossy(request_id)),
    };
    TOTAL.fetch_add(1, Ordering::Relaxed);
    let mut ring = RING.lock().unwrap_or_else(|p| p.into_inner());
    if ring.len() == KEPT {
        ring.pop_front();
    }
    ring.push_back(entry);
}

/// The errors kept, newest first.
pub fn recent() -> Vec<ErrorRecord> {
    let ring = RING.lock().unwrap_or_else(|p| p.into_inner());
    ring.iter().rev().cloned().collect()
}

/// Error answers recorded since the process started (kept or not).
pub fn total() -> u64 {
    TOTAL.load(Ordering::Relaxed)
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    u64::try_from(crate::cache::tier::wall_now()).unwrap_or(0)
}

fn cut(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_string();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_errors_first_and_cuts_long_text() {
        let long = format!("/{}", "é".repeat(400));
        for i in 0..(KEPT + 7) {
            let path = if i == KEPT + 6 {
                long.clone()
            } else {
                format!("/ring-test/{i}")
            };
            record(
                "GET",
                &path,
                &StoaError::NoRoute { path: path.clone() },
                b"id",
            );
        }
        record(
            "GET",
            "/x",
            &StoaError::UpstreamTimeout {
                upstream: "slow".into(),
                timeout_ms: 5,
            },
            b"",
        );
        assert!(total() >= (KEPT + 8) as u64);
        let kept = recent();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].status, 504);
        assert_eq!(kept[0].kind, "upstream_timeout");
        assert_eq!(kept[0].upstream.as_deref(), Some("slow"));
        assert_eq!(kept[1].status, 404);
        assert!(kept[1].path.len() <= MAX_TEXT + '…'.len_utf8());
        assert!(kept[1].path.ends_with('…'));
        assert!(kept[1].message.len() <= MAX_TEXT + '…'.len_utf8());
        assert_eq!(kept[2].path, format!("/ring-test/{}", KEPT + 5));
    }
}
