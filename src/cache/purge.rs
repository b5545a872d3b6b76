//! What an invalidation names, and how it meets the keys stored and the fills in flight.
//!
//! The same description travels to the other nodes of a cluster (serde), so every node
//! applies exactly what the node that took the purge applied.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use super::key::CacheKey;

/// The entries an invalidation names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PurgeWhat {
    /// Every entry of a route.
    Route { route: String },
    /// The entries whose upstream path starts with `prefix`, of `route` or of every route.
    Prefix {
        route: Option<String>,
        prefix: String,
    },
    /// The entries of `route` made for exactly the upstream `path` (a write's `invalidates`).
    Path { route: String, path: String },
    /// The entries of one request: those whose key's base (the key without the values
    /// of learned vary headers, see [`CacheKey::base`]) is this, so every variant.
    Key { route: String, key: String },
    /// Every entry carrying one of these tags (route templates, `Cache-Groups`,
    /// `Surrogate-Key`, `Cache-Tag`), of every route, or of the routes named (those of one
    /// upstream, for `Cache-Group-Invalidation`, RFC 9875 §3).
    Tags {
        tags: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        routes: Option<Vec<String>>,
    },
}

/// An invalidation: what it names, and whether it removes the entries (hard) or marks
/// them stale (soft: the next request is answered from the stale copy while one
/// revalidation runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidation {
    #[serde(flatten)]
    pub what: PurgeWhat,
    #[serde(default)]
    pub soft: bool,
}

/// Whether an invalidation reaches a key, as far as the key tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// It names this key.
    Yes,
    /// It does not.
    No,
    /// It names tags, and the tags of an answer are known only once the answer is in: a
    /// fill in flight is checked against them when it is about to be stored.
    ByTags,
}

impl PurgeWhat {
    /// Whether this invalidation reaches `key`.
    pub fn reaches(&self, key: &CacheKey) -> Reach {
        let yes = |b: bool| if b { Reach::Yes } else { Reach::No };
        match self {
            PurgeWhat::Route { route } => yes(key.route() == route),
            PurgeWhat::Prefix { route, prefix } => {
                yes(route.as_deref().is_none_or(|r| r == key.route())
                    && key.path().starts_with(prefix.as_str()))
            }
            PurgeWhat::Path { route, path } => yes(key.route() == route && key.path() == path),
            PurgeWhat::Key { key: base, .. } => yes(key.base() == base),
            PurgeWhat::Tags { routes, .. } => match routes {
                Some(routes) if !routes.iter().any(|r| r == key.route()) => Reach::No,
                _ => Reach::ByTags,
            },
        }
    }

    /// The tags it names (none but for a tag purge).
    pub fn tags(&self) -> &[String] {
        match self {
            PurgeWhat::Tags { tags, .. } => tags,
            _ => &[],
        }
    }

    /// The `kind` label of the invalidation metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PurgeWhat::Route { .. } => "route",
            PurgeWhat::Prefix { .. } => "prefix",
            PurgeWhat::Path { .. } => "path",
            PurgeWhat::Key { .. } => "request",
            PurgeWhat::Tags { .. } => "tags",
        }
    }

    /// A short description for logs and answers.
    pub fn describe(&self) -> String {
        match self {
            PurgeWhat::Route { route } => format!("route {route}"),
            PurgeWhat::Prefix {
                route: Some(route),
                prefix,
            } => format!("prefix {prefix} of route {route}"),
            PurgeWhat::Prefix {
                route: None,
                prefix,
            } => format!("prefix {prefix}"),
            PurgeWhat::Path { route, path } => format!("path {path} of route {route}"),
            PurgeWhat::Key { route, .. } => format!("one request of route {route}"),
            PurgeWhat::Tags { tags, .. } => format!("tags {}", tags.join(", ")),
        }
    }
}

/// The invalidation counters, registered whether or not a cluster is configured.
#[derive(Clone)]
pub struct PurgeMetrics {
    invalidations: IntCounterVec,
    seconds: Histogram,
    fills_refused: IntCounter,
    unconfirmed: IntCounter,
    tags_dropped: IntCounter,
}

impl PurgeMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<PurgeMetrics> {
        let metrics = Self::new()?;
        registry.register(Box::new(metrics.invalidations.clone()))?;
        registry.register(Box::new(metrics.seconds.clone()))?;
        registry.register(Box::new(metrics.fills_refused.clone()))?;
        registry.register(Box::new(metrics.unconfirmed.clone()))?;
        registry.register(Box::new(metrics.tags_dropped.clone()))?;
        for kind in ["route", "prefix", "path", "request", "tags"] {
            for mode in ["hard", "soft"] {
                metrics.invalidations.with_label_values(&[kind, mode]);
            }
        }
        Ok(metrics)
    }

    fn new() -> prometheus::Result<PurgeMetrics> {
        Ok(PurgeMetrics {
            invalidations: IntCounterVec::new(
                Opts::new(
                    "stoa_cache_invalidations_total",
                    "Invalidations this instance took (admin purges, writes' invalidates, Cache-Group-Invalidation), by kind (route, prefix, path, request, tags) and mode (hard, soft)",
                ),
                &["kind", "mode"],
            )?,
            seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "stoa_cache_invalidation_seconds",
                    "Time from taking an invalidation to its acknowledgement (with [cluster]: every live instance applied it)",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )?,
            fills_refused: IntCounter::new(
                "stoa_cache_fills_refused_total",
                "Fills in flight that an invalidation kept from being stored (their answer went only to the requests already waiting)",
            )?,
            unconfirmed: IntCounter::new(
                "stoa_cache_invalidations_unconfirmed_total",
                "Invalidations answered after cluster.ack_timeout without every live instance's confirmation",
            )?,
            tags_dropped: IntCounter::new(
                "stoa_cache_tags_dropped_total",
                "Tags left off stored answers: past 64 per answer, or longer than 128 bytes (the first ones are kept)",
            )?,
        })
    }

    /// Counters of their own, for engines built without a registry (tests).
    pub fn unregistered() -> PurgeMetrics {
        Self::new().unwrap_or_else(|_| unreachable!("constant metric definitions"))
    }

    pub fn taken(&self, inv: &Invalidation, took: std::time::Duration, confirmed: bool) {
        let mode = if inv.soft { "soft" } else { "hard" };
        self.invalidations
            .with_label_values(&[inv.what.kind(), mode])
            .inc();
        self.seconds.observe(took.as_secs_f64());
        if !confirmed {
            self.unconfirmed.inc();
        }
    }

    pub fn fill_refused(&self) {
        self.fills_refused.inc();
    }

    pub fn tags_dropped(&self, n: u32) {
        if n > 0 {
            self.tags_dropped.inc_by(u64::from(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::test_key;

    #[test]
    fn each_kind_reaches_what_it_names() {
        let k = test_key("a", "/orders/12");
        let route = |r: &str| PurgeWhat::Route { route: r.into() };
        assert_eq!(route("a").reaches(&k), Reach::Yes);
        assert_eq!(route("b").reaches(&k), Reach::No);
        let prefix = |r: Option<&str>, p: &str| PurgeWhat::Prefix {
            route: r.map(str::to_string),
            prefix: p.into(),
        };
        assert_eq!(prefix(None, "/orders/1").reaches(&k), Reach::Yes);
        assert_eq!(prefix(Some("a"), "/orders/").reaches(&k), Reach::Yes);
        assert_eq!(prefix(Some("b"), "/orders/").reaches(&k), Reach::No);
        assert_eq!(prefix(None, "/orders/2").reaches(&k), Reach::No);
        let path = |p: &str| PurgeWhat::Path {
            route: "a".into(),
            path: p.into(),
        };
        assert_eq!(path("/orders/12").reaches(&k), Reach::Yes);
        assert_eq!(path("/orders/1").reaches(&k), Reach::No);
        let key = PurgeWhat::Key {
            route: "a".into(),
            key: k.as_str().into(),
        };
        assert_eq!(key.reaches(&k), Reach::Yes);
        assert_eq!(key.reaches(&test_key("a", "/orders/1")), Reach::No);
        let tags = |routes: Option<Vec<String>>| PurgeWhat::Tags {
            tags: vec!["t".into()],
            routes,
        };
        assert_eq!(tags(None).reaches(&k), Reach::ByTags);
        assert_eq!(tags(Some(vec!["a".into()])).reaches(&k), Reach::ByTags);
        assert_eq!(tags(Some(vec!["b".into()])).reaches(&k), Reach::No);
    }

    #[test]
    fn the_wire_form_is_flat_json() {
        let inv = Invalidation {
            what: PurgeWhat::Path {
                route: "a".into(),
                path: "/x".into(),
            },
            soft: true,
        };
        let text = serde_json::to_string(&inv).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"path","route":"a","path":"/x","soft":true}"#
        );
        assert_eq!(serde_json::from_str::<Invalidation>(&text).unwrap(), inv);
        let old = r#"{"kind":"route","route":"a"}"#;
        assert!(!serde_json::from_str::<Invalidation>(old).unwrap().soft);
    }
}
