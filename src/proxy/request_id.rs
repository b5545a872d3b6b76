//! `X-Request-Id` (`server.request_id`): a client's valid id is kept; otherwise, in
//! `generate` mode, one is made without a random draw or a heap allocation per id.
//!
//! A made id is 16 lowercase hex digits: a random 16-bit prefix drawn once per process, an
//! 8-bit slot per generating thread, and a 40-bit per-thread counter starting at a random
//! point. The digits are written into a per-thread buffer that 256 ids share, so an id costs
//! a counter increment, 16 table look-ups and a reference count.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::BytesMut;
use http::HeaderValue;
use pingora::http::RequestHeader;

use crate::config::RequestIdMode;

/// Longest client id kept.
pub const MAX_LEN: usize = 128;

const HEX: &[u8; 16] = b"0123456789abcdef";
const ID_LEN: usize = 16;
/// Bytes of the per-thread buffer ids are cut from.
const ARENA: usize = ID_LEN * 256;
const COUNTER_BITS: u32 = 40;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;

static PROCESS_PREFIX: OnceLock<u64> = OnceLock::new();
static NEXT_SLOT: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static MAKER: RefCell<Maker> = RefCell::new(Maker::new());
}

/// No id: nothing is sent upstream or answered.
pub fn none() -> HeaderValue {
    HeaderValue::from_static("")
}

/// Whether a client's id is kept: 1 to [`MAX_LEN`] visible ASCII characters.
pub fn is_valid(id: &HeaderValue) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.as_bytes().iter().all(u8::is_ascii_graphic)
}

/// The id of a request under `mode` (empty: none).
///
/// Marked sensitive: HTTP/2's header compression (HPACK) then sends it as a literal never
/// indexed, instead of adding a value used once to the connection's table, where each new
/// id would push out the entries the next answers reuse (`content-type`, `x-cache`, ...).
pub fn for_request(req: &RequestHeader, mode: RequestIdMode) -> HeaderValue {
    if mode == RequestIdMode::Off {
        return none();
    }
    let mut id = match req.headers.get("x-request-id") {
        Some(id) if is_valid(id) => id.clone(),
        _ if mode == RequestIdMode::Generate => generate(),
        _ => return none(),
    };
    id.set_sensitive(true);
    id
}

/// A new id (see the module's documentation).
pub fn generate() -> HeaderValue {
    MAKER.with(|maker| maker.borrow_mut().next())
}

struct Maker {
    /// The process prefix and this thread's slot, in the high 24 bits.
    base: u64,
    count: u64,
    arena: BytesMut,
}

impl Maker {
    fn new() -> Self {
        let prefix = *PROCESS_PREFIX.get_or_init(|| fastrand::u64(..) & 0xffff);
        let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) & 0xff;
        Maker {
            base: (prefix << 48) | (slot << COUNTER_BITS),
            count: fastrand::u64(..),
            arena: BytesMut::new(),
        }
    }

    fn next(&mut self) -> HeaderValue {
        let n = self.base | (self.count & COUNTER_MASK);
        self.count = self.count.wrapping_add(1);
        let mut digits = [0u8; ID_LEN];
        for (i, d) in digits.iter_mut().enumerate() {
            *d = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
        }
        if self.arena.capacity() - self.arena.len() < ID_LEN {
            self.arena = BytesMut::with_capacity(ARENA);
        }
        self.arena.extend_from_slice(&digits);
        // Hex digits are always a valid header value.
        HeaderValue::from_maybe_shared(self.arena.split().freeze())
            .unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_id(id: &str) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-request-id", id).unwrap();
        req
    }

    #[test]
    fn made_ids_are_16_hex_digits_distinct_and_share_the_process_prefix() {
        let ids: std::collections::HashSet<HeaderValue> = (0..2000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 2000);
        let other = std::thread::spawn(generate).join().unwrap();
        for id in ids.iter().chain([&other]) {
            assert_eq!(id.len(), 16);
            assert!(id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert_eq!(&id.as_bytes()[..4], &other.as_bytes()[..4]);
        }
        assert!(!ids.contains(&other));
    }

    #[test]
    fn modes_keep_make_or_drop_ids() {
        let bare = RequestHeader::build("GET", b"/", None).unwrap();
        let good = with_id("abc-1");
        let long = with_id(&"x".repeat(MAX_LEN + 1));
        let spaced = with_id("a b");
        use RequestIdMode::*;
        assert_eq!(for_request(&good, Generate), "abc-1");
        assert_eq!(for_request(&good, Pass), "abc-1");
        assert_eq!(for_request(&good, Off), "");
        // Never indexed by HPACK (see `for_request`).
        assert!(for_request(&good, Pass).is_sensitive());
        assert!(for_request(&bare, Generate).is_sensitive());
        for req in [&bare, &long, &spaced] {
            assert_eq!(for_request(req, Generate).len(), 16);
            assert_eq!(for_request(req, Pass), "");
            assert_eq!(for_request(req, Off), "");
        }
        assert_eq!(
            for_request(&with_id(&"x".repeat(MAX_LEN)), Pass).len(),
            MAX_LEN
        );
    }
}
