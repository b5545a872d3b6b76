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
    /// The address of the cleartext listener, an IP address and port such as `"0.0.0.0:8080"`
    /// or `"[::]:8080"` (default `"127.0.0.1:8080"`). May be left out when `listen_tls` is set,
    /// for a TLS listener only; a change needs a restart.
    pub listen: Option<String>,
    /// The address of the TLS listener, such as `"0.0.0.0:8443"`; needs `[server.tls]` and must
    /// differ from `listen` (default: no TLS listener). A change needs a restart.
    pub listen_tls: Option<String>,
    /// The certificate and key of the TLS listener; required with `listen_tls`, refused without
    /// it.
    pub tls: Option<RawServerTls>,
    /// Serve HTTP/2 with prior knowledge on the cleartext listener, beside HTTP/1.1 (default
    /// `false`). A change needs a restart.
    pub h2c: Option<bool>,
    /// Cached and aggregate routes and stoa's own errors on HTTP/1 connections are answered by
    /// stoa's HTTP/1 layer without pingora's proxy machinery (default `true`); `false` sends
    /// every connection to pingora's proxy. A change needs a restart.
    pub front: Option<bool>,
    /// With `front`, the HTTP/1.1 pass-through requests whose framing leaves nothing to
    /// interpret (no body or a `Content-Length` one, no `Transfer-Encoding`, `Upgrade` or
    /// `Expect`), and the HTTP/2 pass-through streams without a body, are forwarded by that
    /// layer's forwarder too (default `true`); `false` sends every pass-through request to
    /// pingora's proxy. A change needs a restart.
    pub front_forward: Option<bool>,
    /// Streams one HTTP/2 connection may have open at once, 1 to 10000 (default 100). A change
    /// needs a restart.
    pub h2_max_concurrent_streams: Option<i64>,
    /// Proxy threads, 1 to 1024 (default: the number of cores), arranged as `worker_model`
    /// says. A change needs a restart.
    pub threads: Option<i64>,
    /// How the proxy threads are arranged: `"workers"` (the default), one single-thread worker
    /// per thread taking connections from one shared socket, or `"shared"`, one service whose
    /// threads steal work from each other. A change needs a restart.
    #[schemars(extend("enum" = ["workers", "shared"]))]
    pub worker_model: Option<String>,
    /// Largest request body accepted, checked on `Content-Length` and while the body streams; a
    /// larger one is answered 413 (default `"1MiB"`).
    pub max_body_bytes: Option<RawSize>,
    /// How long a graceful shutdown (SIGTERM, SIGINT) waits for requests in flight before it
    /// stops (default `"30s"`).
    pub shutdown_timeout: Option<RawDuration>,
    /// Peers whose `X-Forwarded-For` is believed when identifying the client (per-client rate
    /// limits with `client = "ip"`, the access log): networks such as `"10.0.0.0/8"` or single
    /// addresses such as `"127.0.0.1"` (default: none, the peer address is the client).
    pub trusted_proxies: Option<Vec<String>>,
    /// The `[rate_limits.<name>]` policy applied to every route that names none (default:
    /// none); it must name a defined policy, and a route with `rate_limit = "off"` is exempt.
    pub default_rate_limit: Option<String>,
    /// The rate-limit headers on the answers of limited routes: `"draft"` (the default:
    /// `RateLimit-Policy` and `RateLimit`), `"legacy"` (`RateLimit-Limit`, `-Remaining`,
    /// `-Reset`), `"both"` or `"none"`. A 429 carries `Retry-After` whatever the setting.
    #[schemars(extend("enum" = ["draft", "legacy", "both", "none"]))]
    pub rate_limit_headers: Option<String>,
    /// What becomes of `X-Request-Id`: `"generate"` (the default) keeps a client's valid id and
    /// makes one otherwise, `"pass"` keeps only a client's valid id, `"off"` sends none
    /// upstream and answers none.
    #[schemars(extend("enum" = ["generate", "pass", "off"]))]
    pub request_id: Option<String>,
    /// Longest `/readyz` answers 503 while the routes' `cache.warm` requests are fetched at
    /// start; past it the instance reports ready anyway (default `"30s"`).
    pub warm_timeout: Option<RawDuration>,
    /// The whole request head must arrive within this, counted from the accept (first request)
    /// or from the head's first byte (later requests); else 408 and the connection is closed
    /// (default `"10s"`).
    pub header_timeout: Option<RawDuration>,
    /// A client connection idle between two requests is closed after this (default `"60s"`).
    pub keepalive_timeout: Option<RawDuration>,
    /// The whole request body must arrive within this, counted from when stoa starts reading it
    /// (not per read); else 408 and the connection is closed (default `"30s"`).
    pub body_timeout: Option<RawDuration>,
    /// Requests served on one client connection, 1 to 4294967295; the last answer carries
    /// `Connection: close` (default 1000).
    pub keepalive_requests: Option<i64>,
    /// Open client connections, cleartext and TLS together, 1 to 10000000; new ones beyond it
    /// are accepted and closed at once (default 10000).
    pub max_connections: Option<i64>,
}

/// `[server.tls]`: the certificate chain and private key of the TLS listener (PEM files).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    /// PEM file of the certificate chain, leaf first; required with `key`. Read again on reload
    /// (new handshakes get the new certificate).
    pub cert: Option<String>,
    /// PEM file of the private key of `cert` (PKCS#8, PKCS#1 or SEC1); it must match the
    /// certificate. Read again on reload.
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// The address of the admin listener (`/healthz`, `/readyz`, `/metrics`, the admin API), an
    /// IP address and port (default `"127.0.0.1:9901"`); must differ from `server.listen` and
    /// `server.listen_tls`. A change needs a restart.
    pub listen: Option<String>,
    /// Count requests for `/metrics` (default `true`).
    pub metrics: Option<bool>,
    /// The bearer token of the admin API (purge, refresh, reload, configuration), at least 8
    /// characters; without one (the default) the admin API answers 403. Better set from the
    /// environment, `STOA_ADMIN__TOKEN`.
    pub token: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// A log filter such as `"info"` or `"info,stoa=debug"` (default `"info"`); a non-empty
    /// `RUST_LOG` overrides it. Read at start: a reload does not change it.
    pub level: Option<String>,
    /// Log lines as `"text"` (the default) or `"json"` (one object per line), access lines
    /// included. Read at start: a reload does not change it.
    #[schemars(extend("enum" = ["text", "json"]))]
    pub format: Option<String>,
    /// One access log line per request, target `stoa::access` (default `true`).
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
    /// The sustained rate each client may make, requests per second (greater than 0, at most
    /// 1000000); give this or `per_minute`, not both.
    pub requests_per_second: Option<f64>,
    /// The sustained rate each client may make, requests per minute (greater than 0, at most
    /// 60000000); give this or `requests_per_second`, not both.
    pub per_minute: Option<f64>,
    /// Requests a client may make at once after being idle, 1 to 1000000 (default: one second's
    /// worth of the rate, rounded up, at least 1); an empty bucket must refill within 7 days.
    pub burst: Option<i64>,
    /// `"ip"` or `"header:<Header-Name>"`. `"ip"` (the default) is the peer's address, or the
    /// client's behind `server.trusted_proxies`; a header's value identifies the client, and a
    /// request without that header falls back to its address.
    #[schemars(regex(pattern = r"^(ip|header:.+)$"))]
    pub client: Option<String>,
    /// Which requests count: `"all"` (the default), or `"misses"`, only those that would reach
    /// the upstream (cache hits are never throttled).
    #[schemars(extend("enum" = ["all", "misses"]))]
    pub applies_to: Option<String>,
    /// `"enforce"` (the default) refuses a request over the limit with 429; `"dry_run"` counts
    /// and logs it but lets it through.
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
    /// `"redis://host:6379/0"`, or a list of Redis Cluster seed nodes. Required in
    /// `[cluster]`; `rediss://` for TLS (every seed alike), and a Redis Cluster has only
    /// database 0.
    pub redis: Option<RawRedis>,
    /// This instance's name in logs and in what it writes to Redis and to the other instances;
    /// give each instance its own. 1 to 64 letters, digits, `.`, `_` or `-` (default: the host
    /// name).
    pub node_name: Option<String>,
    /// Put before every key stoa writes in Redis, so that several deployments can share one
    /// Redis: at most 64 printable ASCII characters without spaces (default `"stoa:"`).
    pub key_prefix: Option<String>,
    /// Bound on establishing a connection to Redis (default `"1s"`).
    pub connect_timeout: Option<RawDuration>,
    /// Bound on every Redis command, from sending it to its answer (default `"200ms"`); a
    /// failed or late command marks Redis degraded: the instance skips it until a background
    /// `PING` is answered.
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
    /// Where the upstream is: `http://host[:port][/base]` or `https://...` (required); a base
    /// path prefixes every request, and the host is resolved once, when the configuration is
    /// loaded. No credentials in the URL.
    pub url: String,
    /// Bound on connecting to the upstream; past it the request gets 504 (default `"2s"`).
    pub connect_timeout: Option<RawDuration>,
    /// Bound on the upstream's answer (default `"30s"`): the wait for each read of a streamed
    /// answer, the whole fetch of an answer the cache stores; past it 504. Also the default
    /// `cache.lock_timeout` of the routes on this upstream.
    pub timeout: Option<RawDuration>,
    /// Most calls to this upstream at once, 1 to 100000 (default: unbounded); a call waits for
    /// a free slot up to `queue_timeout`.
    pub max_in_flight: Option<i64>,
    /// Most calls started per second on this upstream, evenly paced (greater than 0, at most
    /// 1000000; default: unbounded); a call waits for its turn up to `queue_timeout`.
    pub max_requests_per_second: Option<f64>,
    /// How long a call waits for a slot of `max_in_flight` or `max_requests_per_second` before
    /// the request gets 503 with `Retry-After` (default `"1s"`); `"0s"`: no waiting.
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
    /// The route's name, unique: 1 to 64 letters, digits, `_` or `-` (required). It labels the
    /// route's metrics and is how `invalidates`, purges and refreshes name it.
    pub name: String,
    /// The methods the route serves, case-sensitive tokens such as `"GET"` (default: every
    /// method; an aggregate route: GET). A cached route must list them: only GET, HEAD, and
    /// POST with `cache.key_body`, are cached; an aggregate route answers GET and HEAD only.
    pub methods: Option<Vec<String>>,
    /// The path template requests must match (required): literal segments, `{param}` for one
    /// segment and a trailing `{*rest}` for the remainder, e.g. `"/restaurant/{id}"`. The most
    /// specific route wins; two routes matching the same requests are an error.
    pub path: String,
    /// The `[upstreams.<name>]` the route calls; required unless the route has `legs` (an
    /// aggregate route takes none).
    pub upstream: Option<String>,
    /// The upstream path, a template using only parameters of `path`, e.g.
    /// `"/api/restaurant/{id}"` (default: the request's path); the query string is always kept.
    /// Not allowed on an aggregate route.
    pub rewrite: Option<String>,
    /// Caches the route's answers (default: a pass-through route, nothing cached). Not allowed
    /// on an aggregate route, whose answer is cached for the shortest TTL of the routes its
    /// legs reach.
    pub cache: Option<RawCache>,
    /// Makes the route an aggregate: the calls, through stoa's own routes, whose results are
    /// merged into its answer, in order (at least one). Such a route has no `upstream`,
    /// `rewrite` or `cache`.
    pub legs: Option<Vec<RawLeg>>,
    /// Aggregate routes: the answer's JSON shape, whose strings are templates such as
    /// `"{restaurant.name}"` (a string that is one reference yields that JSON value). Default:
    /// each leg's result under its `into` key.
    pub respond: Option<serde_json::Value>,
    /// Aggregate routes: what a failed leg does to the answer: `"fail"` (the default), 502
    /// naming the leg; `"partial"`, 200 with the good parts and an `errors` object.
    #[schemars(extend("enum" = ["fail", "partial"]))]
    pub on_leg_error: Option<String>,
    /// Aggregate routes: bound on the whole aggregate, legs included (default `"10s"`); a leg
    /// gets at most the time left.
    pub deadline: Option<RawDuration>,
    /// The `[rate_limits.<name>]` policy applied to this route, or `"off"` for none (default:
    /// `server.default_rate_limit`).
    pub rate_limit: Option<String>,
    /// Names of cached routes whose entries for the same upstream path are purged, on every
    /// instance, when a request on this route other than GET or HEAD gets a 2xx, before the
    /// answer reaches the client (default: none).
    pub invalidates: Option<Vec<String>>,
}

/// A warm-up request: a path (with its query), or a path with a JSON body.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawWarm {
    Path(String),
    WithBody {
        /// The path requested, matching the route's, with its query.
        path: String,
        /// The JSON request body sent (in TOML, an inline table or array).
        body: serde_json::Value,
    },
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCacheSection {
    /// Bound on the memory store's bytes, entries and their keys counted (default 256MiB);
    /// past it the least recently used entries are evicted. The store is split in shards
    /// and an entry must fit in one: about an eighth of this is the largest answer memory
    /// keeps (`stoa check` prints it); larger ones go to the disk tier when there is one.
    pub max_bytes: Option<RawSize>,
    /// The default of every route's `cache.max_entry_bytes`: the largest answer body the
    /// cache stores (default 8MiB, or what the cache can hold in one entry if less; more
    /// than that is a `stoa check` error). A larger answer is streamed to its client and
    /// not stored.
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
    /// Media types compressed: `type/subtype`, `type/*` or a `+suffix`. Default:
    /// `application/json`, `+json`, `text/*`, `application/javascript`, `application/xml`,
    /// `+xml`.
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
    /// How long a 200 answer stays fresh, greater than zero (required); with
    /// `freshness = "origin"`, only when the upstream states no freshness.
    pub ttl: RawDuration,
    /// After expiry, the stale copy is answered at once while one background refresh runs, for
    /// this long (default `"0s"`: off).
    pub stale_while_revalidate: Option<RawDuration>,
    /// After expiry, the stale copy is answered when the upstream fails (error, 5xx, timeout),
    /// for this long (default `"0s"`: off; a 5xx then goes to the client as the upstream gave
    /// it).
    pub stale_if_error: Option<RawDuration>,
    /// Other statuses cached, each with its own TTL, e.g. `{ 404 = "30s" }`: codes 100 to 599
    /// except 200, which uses `ttl` (default: none). A 5xx is never stored.
    pub statuses: Option<BTreeMap<String, RawDuration>>,
    /// The query parameters in the cache key, e.g. `["region"]`; the others are not sent
    /// upstream (default: every parameter).
    pub key_query: Option<Vec<String>>,
    /// `true`: the whole canonical JSON body is in the cache key; `["field", ...]`: those
    /// top-level fields of a JSON object body (default: none, see `unkeyed_body`). Needed to
    /// cache POST; a request without a JSON body then gets 400.
    pub key_body: Option<RawKeyBody>,
    /// Request headers in the cache key, names in any case, e.g. `["Accept-Language"]`
    /// (default: none); hop-by-hop and framing headers (`Host`, `Content-Length`,
    /// `Connection`...) cannot be keyed.
    pub key_headers: Option<Vec<String>>,
    /// A request body on a route without `key_body`: `"drop"` (the default) answers from the
    /// cache as if there were none, the body never going upstream; `"bypass"` sends the request
    /// upstream for this client only, nothing stored.
    #[schemars(extend("enum" = ["drop", "bypass"]))]
    pub unkeyed_body: Option<String>,
    /// Longest a request waits for the fetch of the same key it joined (single flight) before
    /// `on_lock_timeout` decides (default: the upstream's `timeout`).
    pub lock_timeout: Option<RawDuration>,
    /// What a request does past `lock_timeout`: `"serve_stale"` (the default) answers the stale
    /// copy if there is one, else 504; `"error"` answers 504; `"bypass"` goes to the upstream
    /// itself, nothing stored.
    #[schemars(extend("enum" = ["serve_stale", "error", "bypass"]))]
    pub on_lock_timeout: Option<String>,
    /// Fraction of the TTL, between 0 and 1 exclusive (e.g. 0.8), after which a request starts
    /// one background refresh of a fresh entry (default: none).
    pub refresh_ahead: Option<f64>,
    /// Up to this fraction of each TTL, 0 to 0.5 (e.g. 0.05), is taken off at random so that
    /// keys filled together do not expire together (default 0).
    pub jitter: Option<f64>,
    /// Do not read the upstream's `Cache-Control` nor its targeted fields: store even `private`
    /// and `no-store` answers, and take no freshness or stale windows from it (default
    /// `false`).
    pub ignore_upstream_cache_control: Option<bool>,
    /// Most variants (by the request headers the upstream's `Vary` names) stored per
    /// request: route, method, path, query and body (default 16).
    #[schemars(range(min = 1, max = 4096))]
    pub max_variants: Option<i64>,
    /// `"route"` (the default): an answer is fresh for `ttl` (or its `statuses` TTL);
    /// `"origin"`: for what the upstream says (`s-maxage`, `max-age`, `Expires`) less its
    /// `Age`, with `ttl` when it says nothing and `max_ttl` as a cap.
    #[schemars(extend("enum" = ["route", "origin"]))]
    pub freshness: Option<String>,
    /// With `freshness = "origin"` only: the longest freshness the upstream may give, not below
    /// `ttl` (default: no cap).
    pub max_ttl: Option<RawDuration>,
    /// With `freshness = "origin"`, what an answer that states no freshness gets: `"ttl"`
    /// (the route's, the default) or `"heuristic"` (RFC 9111 §4.2.2).
    #[schemars(extend("enum" = ["ttl", "heuristic"]))]
    pub silent: Option<String>,
    /// Requests fetched into the cache at start and after a refresh, holding `/readyz` at 503
    /// until done (at most `server.warm_timeout`): paths matching the route, with their query,
    /// or `{ path, body }` on a body-keyed route (only there).
    pub warm: Option<Vec<RawWarm>>,
    /// The upstream call `POST /admin/refresh/<route>` makes before refetching the route's
    /// entries: a path such as `"/refresh_data"` (GET), or a method and path such as
    /// `"POST /rebuild"` (default: none).
    pub refresh_hook: Option<String>,
    /// Largest answer body this route stores, at most what the store holds in one entry; a
    /// larger answer is streamed to its client uncached (default: `cache.max_entry_bytes`).
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
    /// The leg's name, how later legs and `respond` refer to its result (`{name.field}`)
    /// (required): 1 to 64 letters, digits, `_` or `-`, unique in the route and not `query`,
    /// `item` or a parameter of the route's path.
    pub name: String,
    /// The method of the leg's call: `"GET"` (the default) or `"POST"`.
    pub method: Option<String>,
    /// The path of the leg's call through stoa's own routes, starting with `/`, with
    /// `{references}` to route parameters, `{query.<name>}`, earlier legs, or `{item...}` in a
    /// `for_each` leg (required). It must reach a route that is not an aggregate.
    pub path: String,
    /// A JSON body template for the leg's call, whose strings may hold `{references}`, e.g.
    /// `{ customer_id = "{customer_id}" }` (default: no body).
    pub body: Option<serde_json::Value>,
    /// What the leg keeps of its answer: a JSON pointer such as `"/restaurant"` (nothing there
    /// fails the leg), or `{ from, where, equals, all }` to find an element of a list (default:
    /// the whole answer).
    pub pick: Option<RawPick>,
    /// The name of an earlier leg whose picked array this leg is repeated over, in parallel,
    /// with `{item...}` in its templates (default: one call).
    pub for_each: Option<String>,
    /// With `for_each`: most calls of one fan-out, 1 to 1000 (default 50); a longer array fails
    /// the leg.
    pub max_fan_out: Option<i64>,
    /// Bound on one call of the leg (default `"5s"`), within what is left of the route's
    /// `deadline`.
    pub timeout: Option<RawDuration>,
    /// The key of the leg's result in the default answer, when the route has no `respond`
    /// (default: the leg's `name`).
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
    /// JSON pointer to the array searched, such as `"/restaurants"` (default `""`: the answer
    /// itself).
    #[serde(default)]
    pub from: String,
    /// The field of each element compared with `equals` (required).
    #[serde(rename = "where")]
    pub field: String,
    /// The value looked for, a template such as `"{name}"`, compared as text,
    /// case-insensitively (required).
    pub equals: String,
    /// `false` (the default): the first match, none being a 404 that lists the candidates;
    /// `true`: the array of every match (possibly empty).
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
    /// The client listeners, their limits and deadlines, request ids and rate-limit defaults.
    pub server: Option<RawServer>,
    /// The admin listener: health, readiness, metrics and the admin API.
    pub admin: Option<RawAdmin>,
    /// Log level, line format and the access log.
    pub log: Option<RawLog>,
    /// OpenTelemetry traces (absent: off).
    pub tracing: Option<RawTracing>,
    /// The one in-memory store every cached route shares: its bound, the largest answer stored,
    /// compression of stored answers, and the field of cache directives aimed at stoa.
    pub cache: Option<RawCacheSection>,
    /// The Redis that several instances share (absent: nothing is shared).
    pub cluster: Option<RawCluster>,
    /// Named per-client rate-limit policies.
    pub rate_limits: Option<BTreeMap<String, RawPolicy>>,
    /// Named upstream services.
    pub upstreams: Option<BTreeMap<String, RawUpstream>>,
    /// The routes, matched most specific first: each a pass-through, a cached or an aggregate
    /// route.
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
