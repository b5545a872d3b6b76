//! The configuration file's format: plain serde structs, every one denying unknown keys.
//! Values are kept loose here (strings for durations, sizes, addresses) and checked by the
//! section files, so that every problem can be reported at once. The JSON Schema of the
//! file ([`RawFile`]) is derived from these structs.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::Deserialize;

/// A size: a number of bytes, or a string with a unit such as `"64KiB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

/// A duration: a string with a unit such as `"250ms"` or `"5s"`. Bare numbers are rejected
/// during validation with a hint, rather than guessed at.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Number(f64),
    Text(String),
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub listen_tls: Option<String>,
    pub tls: Option<RawServerTls>,
    pub h2c: Option<bool>,
    pub front: Option<bool>,
    pub front_forward: Option<bool>,
    pub h2_max_concurrent_streams: Option<i64>,
    pub threads: Option<i64>,
    #[schemars(extend("enum" = ["workers", "shared"]))]
    pub worker_model: Option<String>,
    pub max_body_bytes: Option<RawSize>,
    pub shutdown_timeout: Option<RawDuration>,
    pub trusted_proxies: Option<Vec<String>>,
    pub default_rate_limit: Option<String>,
    #[schemars(extend("enum" = ["draft", "legacy", "both", "none"]))]
    pub rate_limit_headers: Option<String>,
    #[schemars(extend("enum" = ["generate", "pass", "off"]))]
    pub request_id: Option<String>,
    pub warm_timeout: Option<RawDuration>,
    pub header_timeout: Option<RawDuration>,
    pub keepalive_timeout: Option<RawDuration>,
    pub body_timeout: Option<RawDuration>,
    pub keepalive_requests: Option<i64>,
    pub max_connections: Option<i64>,
}

/// `[server.tls]`: the certificate chain and private key of the TLS listener (PEM files).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub metrics: Option<bool>,
    pub token: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    #[schemars(extend("enum" = ["text", "json"]))]
    pub format: Option<String>,
    pub access_log: Option<bool>,
    /// Where access log lines go: a file, appended to (created if missing). Default: stderr,
    /// with the other log lines.
    pub access_log_file: Option<String>,
}

/// The `[tracing]` section: OpenTelemetry traces over OTLP/HTTP (read at start).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// The OTLP/HTTP collector's base URL, such as "http://127.0.0.1:4318" (spans go to
    /// `/v1/traces` under it). Absent: tracing is off.
    pub otlp_endpoint: Option<String>,
    /// The share of new traces kept, 0.0 to 1.0 (default 1.0). A client's sampled
    /// `traceparent` is always followed.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_ratio: Option<f64>,
    /// The `service.name` of the spans (default "stoa").
    pub service_name: Option<String>,
}

/// One `[rate_limits.<name>]` table, as written in the file.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub requests_per_second: Option<f64>,
    pub per_minute: Option<f64>,
    pub burst: Option<i64>,
    /// `"ip"` or `"header:<Header-Name>"`.
    #[schemars(regex(pattern = r"^(ip|header:.+)$"))]
    pub client: Option<String>,
    #[schemars(extend("enum" = ["all", "misses"]))]
    pub applies_to: Option<String>,
    #[schemars(extend("enum" = ["enforce", "dry_run"]))]
    pub mode: Option<String>,
    /// `"local"` (the default): buckets in this instance; `"cluster"`: buckets in the
    /// `[cluster]` Redis, shared by every instance.
    #[schemars(extend("enum" = ["local", "cluster"]))]
    pub scope: Option<String>,
}

/// The `[cluster]` section, as written in the file.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// `"redis://host:6379/0"`, or a list of Redis Cluster seed nodes.
    pub redis: Option<RawRedis>,
    pub node_name: Option<String>,
    pub key_prefix: Option<String>,
    pub connect_timeout: Option<RawDuration>,
    pub command_timeout: Option<RawDuration>,
    /// Answers larger than this stay in the local cache only (default 1MiB).
    pub l2_max_entry_bytes: Option<RawSize>,
    /// How long a node's lease on fetching a key lasts unless renewed (default "2s"): a
    /// node that dies mid-fetch holds the others up at most this long.
    pub lock_timeout: Option<RawDuration>,
    /// How long a purge waits for every live node to confirm it has applied it (default
    /// "2s"); past it, the purge answers with the nodes that did not confirm.
    pub ack_timeout: Option<RawDuration>,
    /// With `rediss://`: a PEM file of the CA certificates trusted for Redis instead of the
    /// system roots (a private CA).
    pub ca_file: Option<String>,
    /// With `rediss://`: `false` accepts any certificate Redis presents (default `true`).
    pub tls_verify: Option<bool>,
}

/// One Redis URL, or the seed nodes of a Redis Cluster.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawRedis {
    One(String),
    Seeds(Vec<String>),
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: String,
    pub connect_timeout: Option<RawDuration>,
    pub timeout: Option<RawDuration>,
    pub max_in_flight: Option<i64>,
    pub max_requests_per_second: Option<f64>,
    pub queue_timeout: Option<RawDuration>,
    /// PEM file of the CA certificates an https upstream's certificate is verified against,
    /// instead of the system roots.
    pub ca_file: Option<String>,
    /// `false`: an https upstream's certificate is not verified (warned at start).
    pub tls_verify: Option<bool>,
    /// PEM file of the client certificate (and chain) presented to an https upstream.
    pub client_cert: Option<String>,
    /// PEM file of the private key of `client_cert`.
    pub client_key: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub methods: Option<Vec<String>>,
    pub path: String,
    pub upstream: Option<String>,
    pub rewrite: Option<String>,
    pub cache: Option<RawCache>,
    pub legs: Option<Vec<RawLeg>>,
    pub respond: Option<serde_json::Value>,
    #[schemars(extend("enum" = ["fail", "partial"]))]
    pub on_leg_error: Option<String>,
    pub deadline: Option<RawDuration>,
    pub rate_limit: Option<String>,
    pub invalidates: Option<Vec<String>>,
}

/// A warm-up request: a path (with its query), or a path with a JSON body.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawWarm {
    Path(String),
    WithBody {
        path: String,
        body: serde_json::Value,
    },
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCacheSection {
    pub max_bytes: Option<RawSize>,
    pub max_entry_bytes: Option<RawSize>,
    /// The response field aimed at stoa alone (RFC 9213), read before `CDN-Cache-Control`
    /// and `Cache-Control` and removed from what clients get (default `Stoa-Cache-Control`).
    pub targeted_field: Option<String>,
    pub compression: Option<RawCompression>,
    /// A disk tier under the memory store: stored answers survive restarts, and the cache
    /// holds more (and larger answers) than memory. Looked up after memory, before the
    /// shared tier and the upstream. Without it nothing is written to disk.
    pub disk: Option<RawDisk>,
}

/// `[cache] disk = { path = "/var/cache/stoa", max_bytes = "10GiB" }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDisk {
    /// The directory of the disk tier's files, created if missing; one stoa process per
    /// directory.
    pub path: String,
    /// Bound on the bytes of the disk tier's data file (default 1GiB, at least 16MiB).
    pub max_bytes: Option<RawSize>,
}

/// `[cache.compression]`: how cached answers are compressed for clients that accept it.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCompression {
    /// Compress on every cached route that does not say otherwise (default true).
    pub enabled: Option<bool>,
    /// Content codings offered, in order of preference (default `["br", "zstd", "gzip"]`).
    #[schemars(extend("items" = { "enum": ["br", "zstd", "gzip"] }))]
    pub encodings: Option<Vec<String>>,
    /// Smallest body compressed (default 1024 bytes).
    pub min_bytes: Option<RawSize>,
    /// Media types compressed: `type/subtype`, `type/*` or a `+suffix`.
    pub types: Option<Vec<String>>,
}

/// `key_body = true` (the whole body) or `key_body = ["field", ...]`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawKeyBody {
    Whole(bool),
    Fields(Vec<String>),
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub ttl: RawDuration,
    pub stale_while_revalidate: Option<RawDuration>,
    pub stale_if_error: Option<RawDuration>,
    pub statuses: Option<BTreeMap<String, RawDuration>>,
    pub key_query: Option<Vec<String>>,
    pub key_body: Option<RawKeyBody>,
    pub key_headers: Option<Vec<String>>,
    #[schemars(extend("enum" = ["drop", "bypass"]))]
    pub unkeyed_body: Option<String>,
    pub lock_timeout: Option<RawDuration>,
    #[schemars(extend("enum" = ["serve_stale", "error", "bypass"]))]
    pub on_lock_timeout: Option<String>,
    pub refresh_ahead: Option<f64>,
    pub jitter: Option<f64>,
    pub ignore_upstream_cache_control: Option<bool>,
    /// Most variants (by the request headers the upstream's `Vary` names) stored per
    /// request: route, method, path, query and body (default 16).
    #[schemars(range(min = 1, max = 4096))]
    pub max_variants: Option<i64>,
    #[schemars(extend("enum" = ["route", "origin"]))]
    pub freshness: Option<String>,
    pub max_ttl: Option<RawDuration>,
    /// With `freshness = "origin"`, what an answer that states no freshness gets: `"ttl"`
    /// (the route's, the default) or `"heuristic"` (RFC 9111 §4.2.2).
    #[schemars(extend("enum" = ["ttl", "heuristic"]))]
    pub silent: Option<String>,
    pub warm: Option<Vec<RawWarm>>,
    pub refresh_hook: Option<String>,
    pub max_entry_bytes: Option<RawSize>,
    /// Compress this route's cached answers (default: `cache.compression.enabled`).
    pub compress: Option<bool>,
    /// Tags (surrogate keys) given to every answer this route stores, such as
    /// `"restaurant:{id}"`: a `{name}` is a parameter of the route's path, a query parameter
    /// listed in `key_query` or a body field listed in `key_body`.
    pub tags: Option<Vec<String>>,
}

/// One leg of an aggregate route (`[[routes.legs]]`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLeg {
    pub name: String,
    pub method: Option<String>,
    pub path: String,
    pub body: Option<serde_json::Value>,
    pub pick: Option<RawPick>,
    pub for_each: Option<String>,
    pub max_fan_out: Option<i64>,
    pub timeout: Option<RawDuration>,
    pub into: Option<String>,
}

/// `pick = "/pointer"` or `pick = { from = "/list", where = "name", equals = "{name}" }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawPick {
    Pointer(String),
    Find(RawFind),
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFind {
    #[serde(default)]
    pub from: String,
    #[serde(rename = "where")]
    pub field: String,
    pub equals: String,
    pub all: Option<bool>,
}

// Loading reads each section on its own instead, so that one bad section does not hide
// the others; this struct only gives the schema its top level.
/// A stoa configuration file (`stoa.toml`).
#[derive(JsonSchema)]
#[expect(dead_code, reason = "only its JSON Schema is used")]
#[serde(deny_unknown_fields)]
#[schemars(title = "stoa configuration")]
pub struct RawFile {
    pub server: Option<RawServer>,
    pub admin: Option<RawAdmin>,
    pub log: Option<RawLog>,
    /// OpenTelemetry traces (absent: off).
    pub tracing: Option<RawTracing>,
    pub cache: Option<RawCacheSection>,
    /// The Redis that several instances share (absent: nothing is shared).
    pub cluster: Option<RawCluster>,
    /// Named per-client rate-limit policies.
    pub rate_limits: Option<BTreeMap<String, RawPolicy>>,
    /// Named upstream services.
    pub upstreams: Option<BTreeMap<String, RawUpstream>>,
    pub routes: Option<Vec<RawRoute>>,
}

/// Written as text: bare numbers are read, then refused with a hint.
impl JsonSchema for RawDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration with a unit, such as \"250ms\", \"5s\", \"5m\" or \"1h 30m\".",
            "pattern": "^\\s*([0-9]+\\s*[a-zA-Zµ]+\\s*)+$|^\\s*0\\s*$",
            "examples": ["250ms", "5s", "5m"]
        })
    }
}

impl JsonSchema for RawSize {
    fn schema_name() -> Cow<'static, str> {
        "Size".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size: a number of bytes, or text with a unit such as \"64KiB\" or \"256MiB\".",
            "anyOf": [
                { "type": "integer", "minimum": 1 },
                { "type": "string", "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*[a-zA-Z]*\\s*$" }
            ],
            "examples": ["64KiB", "256MiB"]
        })
    }
}
