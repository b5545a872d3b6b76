//! The `[server]` section: the client listener, its threads, body bound, deadlines and
//! connection caps, and the proxies whose `X-Forwarded-For` is believed.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rustls::sign::CertifiedKey;

use super::limits::RateLimitHeaders;
use super::raw::{RawServer, RawServerTls};
use super::validate::Validator;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// The cleartext listener (`server.listen`); absent when only `listen_tls` is set.
    pub listen: Option<SocketAddr>,
    /// The TLS listener (`server.listen_tls` and `[server.tls]`).
    pub tls: Option<ServerTls>,
    /// HTTP/2 with prior knowledge on the cleartext listener (`server.h2c`).
    pub h2c: bool,
    /// HTTP/1 requests stoa answers itself skip pingora's proxy (`server.front`; see
    /// `crate::front`).
    pub front: bool,
    /// The front also forwards the HTTP/1 pass-through requests whose framing leaves nothing
    /// to interpret, and the HTTP/2 pass-through streams without a body
    /// (`server.front_forward`; see `crate::front::forward`).
    pub front_forward: bool,
    /// Streams one HTTP/2 connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// Threads of the proxy (`server.threads`), arranged as `worker_model` says.
    pub threads: usize,
    /// How the proxy's threads are arranged (`server.worker_model`).
    pub worker_model: WorkerModel,
    /// What becomes of `X-Request-Id` (`server.request_id`).
    pub request_id: RequestIdMode,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: u64,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed when identifying clients.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Longest `/readyz` stays 503 waiting for the cache warm-up.
    pub warm_timeout: Duration,
    /// Client connection limits and deadlines.
    pub connections: ConnectionLimits,
    /// Which rate-limit headers answers of limited routes carry.
    pub rate_limit_headers: RateLimitHeaders,
}

/// How the proxy's threads are arranged (`server.worker_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerModel {
    /// `threads` workers of one thread each, with no work stealing, taking connections from
    /// one shared accept queue.
    Workers,
    /// One proxy service whose `threads` threads steal work from each other.
    Shared,
}

/// What stoa does with request ids (`server.request_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestIdMode {
    /// Keep a client's valid `X-Request-Id`, else make one; sent upstream and answered.
    Generate,
    /// Only a client's valid `X-Request-Id` is sent upstream and answered.
    Pass,
    /// No `X-Request-Id` upstream or in answers.
    Off,
}

/// The TLS listener: its address and its certificate, read and checked when the
/// configuration is loaded (so a reload re-reads the files).
#[derive(Clone)]
pub struct ServerTls {
    pub listen: SocketAddr,
    pub cert_file: String,
    pub key_file: String,
    /// The chain and key the handshakes present.
    pub certified: Arc<CertifiedKey>,
}

/// The private key stays out of logs.
impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("listen", &self.listen)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ServerSettings {
    /// An address the proxy accepts connections on (the cleartext one if there is one).
    pub fn any_listen(&self) -> SocketAddr {
        match (&self.listen, &self.tls) {
            (Some(addr), _) => *addr,
            (None, Some(tls)) => tls.listen,
            // Validation makes sure one of the two is there.
            (None, None) => SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }

    /// Every address the proxy listens on, as `stoa check` and the start log show them.
    pub fn listeners(&self) -> String {
        let mut out = Vec::new();
        if let Some(addr) = self.listen {
            out.push(addr.to_string());
        }
        if let Some(tls) = &self.tls {
            out.push(format!("{} (TLS)", tls.listen));
        }
        out.join(" and ")
    }
}

/// The default of `server.threads`: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(1024))
}

/// Largest `server.h2_max_concurrent_streams`.
const MAX_STREAMS: i64 = 10_000;

/// Deadlines and caps on client connections (`[server]` keys of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The whole request head must arrive within this, counted from the connection's
    /// accept (first request) or from the first byte of the head (later requests).
    pub header_timeout: Duration,
    /// An idle connection between two requests is closed after this.
    pub keepalive_timeout: Duration,
    /// The whole request body must arrive within this, counted from when stoa starts
    /// reading it.
    pub body_timeout: Duration,
    /// Requests served on one connection; the last answer carries `Connection: close`.
    pub keepalive_requests: u32,
    /// Open client connections; new ones beyond it are closed at once.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            keepalive_requests: 1000,
            max_connections: 10_000,
        }
    }
}

impl Validator<'_> {
    pub(super) fn server(&mut self, raw: RawServer) -> Option<ServerSettings> {
        // Without either listener, the cleartext one on its default address.
        let listen = match (&raw.listen, &raw.listen_tls) {
            (None, Some(_)) => Some(None),
            (text, _) => self
                .address("server.listen", text.as_deref(), "127.0.0.1:8080")
                .map(Some),
        };
        let tls = self.server_tls(raw.listen_tls.as_deref(), raw.tls.as_ref());
        let h2_max_concurrent_streams = match raw.h2_max_concurrent_streams {
            None => Some(100),
            Some(n) if (1..=MAX_STREAMS).contains(&n) => u32::try_from(n).ok(),
            Some(n) => {
                self.problem(
                    "server.h2_max_concurrent_streams",
                    format!("{n} is not between 1 and {MAX_STREAMS}"),
                );
                None
            }
        };
        let threads = match raw.threads {
            None => Some(default_threads()),
            Some(n) if (1..=1024).contains(&n) => Some(n as usize),
            Some(n) => {
                self.problem("server.threads", format!("{n} is not between 1 and 1024"));
                None
            }
        };
        let worker_model = match raw.worker_model.as_deref() {
            None | Some("workers") => Some(WorkerModel::Workers),
            Some("shared") => Some(WorkerModel::Shared),
            Some(other) => {
                self.problem(
                    "server.worker_model",
                    format!(
                        "{other:?} is not \"workers\" (single-thread workers) or \"shared\" \
                         (one work-stealing service)"
                    ),
                );
                None
            }
        };
        let request_id = match raw.request_id.as_deref() {
            None | Some("generate") => Some(RequestIdMode::Generate),
            Some("pass") => Some(RequestIdMode::Pass),
            Some("off") => Some(RequestIdMode::Off),
            Some(other) => {
                self.problem(
                    "server.request_id",
                    format!(
                        "{other:?} is not \"generate\" (keep a client's valid X-Request-Id, else \
                         make one), \"pass\" (only a client's valid one) or \"off\" (none)"
                    ),
                );
                None
            }
        };
        let max_body_bytes = self.size(
            "server.max_body_bytes",
            raw.max_body_bytes.as_ref(),
            1024 * 1024,
        );
        let shutdown_timeout = self.duration(
            "server.shutdown_timeout",
            raw.shutdown_timeout.as_ref(),
            Duration::from_secs(30),
        );
        let warm_timeout = self.duration(
            "server.warm_timeout",
            raw.warm_timeout.as_ref(),
            Duration::from_secs(30),
        );
        let trusted_proxies = self.trusted_proxies(
            "server.trusted_proxies",
            raw.trusted_proxies.as_deref().unwrap_or_default(),
        );
        let connections = self.connection_limits(&raw);
        let rate_limit_headers = match raw.rate_limit_headers.as_deref() {
            None | Some("draft") => Some(RateLimitHeaders::Draft),
            Some("legacy") => Some(RateLimitHeaders::Legacy),
            Some("both") => Some(RateLimitHeaders::Both),
            Some("none") => Some(RateLimitHeaders::None),
            Some(other) => {
                self.problem(
                    "server.rate_limit_headers",
                    format!(
                        "{other:?} is not \"draft\" (RateLimit-Policy and RateLimit), \"legacy\" \
                         (RateLimit-Limit, -Remaining, -Reset), \"both\" or \"none\""
                    ),
                );
                None
            }
        };
        if let (Some(Some(plain)), Ok(Some(tls))) = (&listen, &tls) {
            if *plain == tls.listen {
                self.problem("server.listen_tls", "must differ from server.listen");
            }
        }
        Some(ServerSettings {
            listen: listen?,
            tls: tls.ok()?,
            h2c: raw.h2c.unwrap_or(false),
            front: raw.front.unwrap_or(true),
            front_forward: raw.front_forward.unwrap_or(true),
            h2_max_concurrent_streams: h2_max_concurrent_streams?,
            threads: threads?,
            worker_model: worker_model?,
            request_id: request_id?,
            max_body_bytes: max_body_bytes?,
            shutdown_timeout: shutdown_timeout?,
            trusted_proxies,
            warm_timeout: warm_timeout?,
            connections: connections?,
            rate_limit_headers: rate_limit_headers?,
        })
    }

    pub(super) fn connection_limits(&mut self, raw: &RawServer) -> Option<ConnectionLimits> {
        let d = ConnectionLimits::default();
        let header_timeout = self.duration(
            "server.header_timeout",
            raw.header_timeout.as_ref(),
            d.header_timeout,
        );
        let keepalive_timeout = self.duration(
            "server.keepalive_timeout",
            raw.keepalive_timeout.as_ref(),
            d.keepalive_timeout,
        );
        let body_timeout = self.duration(
            "server.body_timeout",
            raw.body_timeout.as_ref(),
            d.body_timeout,
        );
        let keepalive_requests = match raw.keepalive_requests {
            None => Some(d.keepalive_requests),
            Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => u32::try_from(n).ok(),
            Some(n) => {
                self.problem(
                    "server.keepalive_requests",
                    format!("{n} is not between 1 and {}", u32::MAX),
                );
                None
            }
        };
        let max_connections = match raw.max_connections {
            None => Some(d.max_connections),
            Some(n) if (1..=10_000_000).contains(&n) => usize::try_from(n).ok(),
            Some(n) => {
                self.problem(
                    "server.max_connections",
                    format!("{n} is not between 1 and 10000000"),
                );
                None
            }
        };
        Some(ConnectionLimits {
            header_timeout: header_timeout?,
            keepalive_timeout: keepalive_timeout?,
            body_timeout: body_timeout?,
            keepalive_requests: keepalive_requests?,
            max_connections: max_connections?,
        })
    }

    /// `server.listen_tls` and `[server.tls]`, which go together. `Err(())` when a problem
    /// was reported.
    fn server_tls(
        &mut self,
        listen: Option<&str>,
        raw: Option<&RawServerTls>,
    ) -> Result<Option<ServerTls>, ()> {
        let (listen, raw) = match (listen, raw) {
            (None, None) => return Ok(None),
            (Some(listen), Some(raw)) => (listen, raw),
            (Some(_), None) => {
                self.problem(
                    "server.tls",
                    "missing: server.listen_tls needs [server.tls] with cert and key",
                );
                return Err(());
            }
            (None, Some(_)) => {
                self.problem(
                    "server.listen_tls",
                    "missing: [server.tls] needs the address of the TLS listener",
                );
                return Err(());
            }
        };
        let addr = self.address("server.listen_tls", Some(listen), "");
        let (cert_file, key_file) = match (&raw.cert, &raw.key) {
            (Some(cert), Some(key)) => (cert, key),
            (cert, key) => {
                for (name, value) in [("cert", cert), ("key", key)] {
                    if value.is_none() {
                        self.problem(
                            format!("server.tls.{name}"),
                            "missing: the TLS listener needs both cert and key (PEM files)",
                        );
                    }
                }
                return Err(());
            }
        };
        let pair = self.key_pair(("server.tls.cert", cert_file), ("server.tls.key", key_file));
        match (addr, pair) {
            (Some(listen), Some(pair)) => Ok(Some(ServerTls {
                listen,
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
                certified: pair.certified,
            })),
            _ => Err(()),
        }
    }

    /// Parses `server.trusted_proxies`: CIDRs such as `"10.0.0.0/8"`, or bare addresses
    /// (`"127.0.0.1"` means `/32`, an IPv6 address `/128`). Each bad entry is reported at
    /// `path[i]`; the good ones are returned.
    fn trusted_proxies(&mut self, path: &str, list: &[String]) -> Vec<IpNet> {
        let mut out = Vec::with_capacity(list.len());
        for (i, text) in list.iter().enumerate() {
            let t = text.trim();
            let net = t
                .parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from));
            match net {
                Ok(n) => out.push(n),
                Err(_) => self.problem(format!("{path}[{i}]"),
                    format!("{text:?} is not a network like \"10.0.0.0/8\" or an address like \"127.0.0.1\""),
                ),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use crate::config::tests::{lines, problems, GOOD};
    use crate::config::EnvOverrides;

    #[test]
    fn connection_limits_have_defaults_and_are_read() {
        let c = load_str(GOOD, EnvOverrides::Ignore).unwrap();
        assert_eq!(c.server.connections, ConnectionLimits::default());
        assert_eq!(c.server.connections.header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.connections.keepalive_requests, 1000);
        let text = GOOD.replace(
            "max_body_bytes = \"64KiB\"",
            "header_timeout = \"2s\"\nkeepalive_timeout = \"250ms\"\nbody_timeout = \"1m\"\n\
             keepalive_requests = 7\nmax_connections = 9",
        );
        let c = load_str(&text, EnvOverrides::Ignore).unwrap();
        assert_eq!(
            c.server.connections,
            ConnectionLimits {
                header_timeout: Duration::from_secs(2),
                keepalive_timeout: Duration::from_millis(250),
                body_timeout: Duration::from_secs(60),
                keepalive_requests: 7,
                max_connections: 9,
            }
        );
        let p = problems(&GOOD.replace(
            "max_body_bytes = \"64KiB\"",
            "keepalive_requests = 0\nmax_connections = 0\nheader_timeout = \"0s\"",
        ));
        assert_eq!(
            p,
            vec![
                "server.header_timeout: must be greater than zero".to_string(),
                format!(
                    "server.keepalive_requests: 0 is not between 1 and {}",
                    u32::MAX
                ),
                "server.max_connections: 0 is not between 1 and 10000000".to_string(),
            ]
        );
    }

    #[test]
    fn rate_limit_headers_default_to_the_draft_and_are_read() {
        let c = load_str(GOOD, EnvOverrides::Ignore).unwrap();
        assert_eq!(c.server.rate_limit_headers, RateLimitHeaders::Draft);
        for (text, style) in [
            ("legacy", RateLimitHeaders::Legacy),
            ("both", RateLimitHeaders::Both),
            ("none", RateLimitHeaders::None),
            ("draft", RateLimitHeaders::Draft),
        ] {
            let c = load_str(
                &GOOD.replace(
                    "max_body_bytes = \"64KiB\"",
                    &format!("rate_limit_headers = \"{text}\""),
                ),
                EnvOverrides::Ignore,
            )
            .unwrap();
            assert_eq!(c.server.rate_limit_headers, style);
        }
        let p = problems(&GOOD.replace(
            "max_body_bytes = \"64KiB\"",
            "rate_limit_headers = \"ietf\"",
        ));
        assert_eq!(
            p,
            [
                "server.rate_limit_headers: \"ietf\" is not \"draft\" (RateLimit-Policy and \
              RateLimit), \"legacy\" (RateLimit-Limit, -Remaining, -Reset), \"both\" or \"none\""
            ]
        );
    }

    #[test]
    fn request_id_defaults_to_generate_and_is_read() {
        for (text, mode) in [
            ("generate", RequestIdMode::Generate),
            ("pass", RequestIdMode::Pass),
            ("off", RequestIdMode::Off),
        ] {
            let c = load_str(
                &GOOD.replace(
                    "max_body_bytes = \"64KiB\"",
                    &format!("request_id = \"{text}\""),
                ),
                EnvOverrides::Ignore,
            )
            .unwrap();
            assert_eq!(c.server.request_id, mode);
        }
        let p = problems(&GOOD.replace("max_body_bytes = \"64KiB\"", "request_id = \"uuid\""));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("server.request_id: \"uuid\" is not \"generate\""),
            "{p:?}"
        );
    }

    #[test]
    fn front_is_on_by_default_and_can_be_turned_off() {
        let c = load_str(GOOD, EnvOverrides::Ignore).unwrap();
        assert!(c.server.front && c.server.front_forward);
        for (key, front, forward) in [("front", false, true), ("front_forward", true, false)] {
            let off = GOOD.replace("max_body_bytes = \"64KiB\"", &format!("{key} = false"));
            let c = load_str(&off, EnvOverrides::Ignore).unwrap();
            assert_eq!((c.server.front, c.server.front_forward), (front, forward));
            let p =
                problems(&GOOD.replace("max_body_bytes = \"64KiB\"", &format!("{key} = \"yes\"")));
            assert_eq!(p.len(), 1, "{key}: {p:?}");
        }
    }

    #[test]
    fn worker_model_defaults_to_workers_and_is_read() {
        for (text, model) in [
            ("workers", WorkerModel::Workers),
            ("shared", WorkerModel::Shared),
        ] {
            let c = load_str(
                &GOOD.replace(
                    "max_body_bytes = \"64KiB\"",
                    &format!("worker_model = \"{text}\""),
                ),
                EnvOverrides::Ignore,
            )
            .unwrap();
            assert_eq!(c.server.worker_model, model);
        }
        let p = problems(&GOOD.replace("max_body_bytes = \"64KiB\"", "worker_model = \"steal\""));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("server.worker_model: \"steal\" is not \"workers\""),
            "{p:?}"
        );
    }

    #[test]
    fn trusted_proxies_parse_and_report() {
        let figment = figment::Figment::new();
        let mut v = Validator::new(&figment);
        let list: Vec<String> = [
            "10.0.0.0/8",
            "127.0.0.1",
            "::1",
            "fd00::/8",
            "10.1.2.3/16",
            "nope",
            "10.0.0.0/33",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let nets = v.trusted_proxies("server.trusted_proxies", &list);
        let shown: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.0/8",
                "127.0.0.1/32",
                "::1/128",
                "fd00::/8",
                "10.1.0.0/16"
            ]
        );
        let l = lines(&v.problems);
        assert_eq!(l.len(), 2);
        assert!(l[0].starts_with("server.trusted_proxies[5]: \"nope\""));
        assert!(l[1].starts_with("server.trusted_proxies[6]: \"10.0.0.0/33\""));
    }
}
