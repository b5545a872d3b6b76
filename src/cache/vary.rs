//! Vary without configuration (RFC 9111 §4.1): the request headers a route's answers vary
//! on, learned from the upstream's `Vary` and remembered per route.
//!
//! An answer whose `Vary` names a request header the route's key does not cover was made
//! without the value other clients send: it is not stored nor handed to anyone, the header
//! is learned, and every request then keys on its normalised value (see
//! [`crate::cache::key`]) and sends it upstream on the shared fetch. The list is kept in
//! name order, so instances that learned the same headers make the same keys whatever order
//! they learned them in; it only grows (at most [`MAX_LEARNED`] names), so a key holding
//! fewer names than the route has was made before the route learned the others.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::{header, HeaderMap, HeaderName};

use crate::config::UNKEYABLE_HEADERS;

/// Most header names a route learns; an answer varying on more is not stored.
pub const MAX_LEARNED: usize = 8;

/// Why answers of a route were not stored for their variants.
pub struct Refusals {
    /// `stoa_cache_variants_refused_total{route,reason="max_variants"}`: a new variant of
    /// a request that has `max_variants` stored already.
    pub max_variants: prometheus::IntCounter,
    /// `...{reason="max_vary_headers"}`: an answer varying on headers beyond what the route
    /// may learn.
    pub max_vary_headers: prometheus::IntCounter,
}

/// The vary headers a route learned.
pub struct Learned {
    names: ArcSwap<Box<[HeaderName]>>,
    /// How many names: read first, so a route that learned nothing pays this one load.
    len: AtomicUsize,
    /// Held by the rare writer.
    learning: Mutex<()>,
    pub refused: Refusals,
}

impl Learned {
    /// A route's list, starting with `names` (those learned under the previous
    /// configuration, when its answers stay valid).
    pub fn new(names: &[HeaderName], refused: Refusals) -> Self {
        let mut names: Vec<HeaderName> = names.iter().take(MAX_LEARNED).cloned().collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let names = names.into_boxed_slice();
        Learned {
            len: AtomicUsize::new(names.len()),
            names: ArcSwap::from_pointee(names),
            learning: Mutex::new(()),
            refused,
        }
    }

    /// How many names the route learned.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names learned, in name order; `None` (one atomic load) while there are none.
    pub fn names(&self) -> Option<arc_swap::Guard<Arc<Box<[HeaderName]>>>> {
        (!self.is_empty()).then(|| self.names.load())
    }

    /// A copy of the names learned.
    pub fn snapshot(&self) -> Vec<HeaderName> {
        self.names().map(|n| n.to_vec()).unwrap_or_default()
    }

    /// Learns `new` (names not learned yet, or learned since); false, and nothing learned,
    /// when they would take the list over [`MAX_LEARNED`] (counted).
    pub fn learn(&self, new: &[HeaderName]) -> bool {
        let _writer = self.learning.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.names.load_full();
        let mut names: Vec<HeaderName> = current.to_vec();
        for name in new {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        if names.len() > MAX_LEARNED {
            self.refused.max_vary_headers.inc();
            return false;
        }
        if names.len() > current.len() {
            names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            let len = names.len();
            self.names.store(Arc::new(names.into_boxed_slice()));
            // After the list: a reader that sees the new length finds the names.
            self.len.store(len, Ordering::Release);
        }
        true
    }
}

/// What an answer's `Vary` names beyond the headers a key covers.
#[derive(Debug, PartialEq, Eq)]
pub enum Uncovered {
    /// Nothing: the answer fits every request with the key.
    None,
    /// Request headers that can be learned.
    Names(Vec<HeaderName>),
    /// `*`, a name that is not a header name, or a header stoa sets itself for each hop:
    /// never stored.
    Unlearnable,
}

/// The request headers `headers`' `Vary` names that neither `key_headers` nor `learned`
/// covers (`Accept-Encoding` is stoa's own compression's).
pub fn uncovered(
    headers: &HeaderMap,
    key_headers: &[HeaderName],
    learned: &[HeaderName],
) -> Uncovered {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(text) = value.to_str() else {
            return Uncovered::Unlearnable;
        };
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if token == "*" {
                return Uncovered::Unlearnable;
            }
            // Compared as written first: most answers name only covered headers.
            let is = |name: &HeaderName| name.as_str().eq_ignore_ascii_case(token);
            if token.eq_ignore_ascii_case(header::ACCEPT_ENCODING.as_str())
                || key_headers.iter().any(is)
                || learned.iter().any(is)
                || names.iter().any(is)
            {
                continue;
            }
            // In lower case, as header names are kept.
            let Ok(name) = HeaderName::from_bytes(token.as_bytes()) else {
                return Uncovered::Unlearnable;
            };
            if UNKEYABLE_HEADERS.contains(&name.as_str()) {
                return Uncovered::Unlearnable;
            }
            names.push(name);
        }
    }
    if names.is_empty() {
        Uncovered::None
    } else {
        Uncovered::Names(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusals() -> Refusals {
        let counter = || prometheus::IntCounter::new("c", "test").unwrap();
        Refusals {
            max_variants: counter(),
            max_vary_headers: counter(),
        }
    }

    fn vary(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::VARY, value.parse().unwrap());
        h
    }

    fn name(n: &'static str) -> HeaderName {
        HeaderName::from_static(n)
    }

    #[test]
    fn what_a_vary_names_beyond_the_key() {
        let keyed = [name("x-tenant")];
        let learned = [name("origin")];
        let cases = [
            ("Accept-Encoding", Uncovered::None),
            ("X-Tenant, origin", Uncovered::None),
            (
                "Accept-Language , Origin,, X-Other",
                Uncovered::Names(vec![name("accept-language"), name("x-other")]),
            ),
            ("accept-language, Accept-Language", {
                Uncovered::Names(vec![name("accept-language")])
            }),
            ("*", Uncovered::Unlearnable),
            ("Origin, *", Uncovered::Unlearnable),
            ("Host", Uncovered::Unlearnable),
            ("a b", Uncovered::Unlearnable),
        ];
        for (value, expected) in cases {
            assert_eq!(
                uncovered(&vary(value), &keyed, &learned),
                expected,
                "{value}"
            );
        }
        assert_eq!(
            uncovered(&HeaderMap::new(), &keyed, &learned),
            Uncovered::None
        );
    }

    #[test]
    fn a_route_learns_at_most_eight_names_all_or_nothing() {
        let learned = Learned::new(&[], refusals());
        assert!(learned.is_empty());
        assert!(learned.names().is_none());
        assert!(learned.learn(&[name("accept-language")]));
        assert!(learned.learn(&[name("accept-language")]), "known already");
        assert_eq!(learned.len(), 1);
        let more: Vec<HeaderName> = (0..7)
            .map(|i| HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap())
            .collect();
        assert!(learned.learn(&more));
        assert_eq!(learned.len(), MAX_LEARNED);
        assert!(!learned.learn(&[name("origin")]));
        assert_eq!(learned.refused.max_vary_headers.get(), 1);
        assert_eq!(learned.len(), MAX_LEARNED, "nothing learned past the bound");
        let names = learned.names().unwrap();
        assert_eq!(names[0], "accept-language");
        assert_eq!(names[1], "x-0");
        assert!(!names.contains(&name("origin")));
        // In name order, whatever the order learned.
        let learned = Learned::new(&[name("x-b")], refusals());
        assert!(learned.learn(&[name("x-c"), name("x-a")]));
        assert_eq!(learned.snapshot(), [name("x-a"), name("x-b"), name("x-c")]);
        // Two new names with room for one: neither.
        let learned = Learned::new(&more, refusals());
        assert!(!learned.learn(&[name("a"), name("b")]));
        assert_eq!(learned.len(), 7);
        assert_eq!(learned.snapshot(), more);
    }
}
