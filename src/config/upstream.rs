//! `[upstreams.<name>]`: where each upstream is, its timeouts, and the guard that protects
//! it (concurrency and pacing).

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use figment::value::Value;

use super::raw::{RawDuration, RawUpstream};
use super::upstream_tls::UpstreamTls;
use super::validate::Validator;

/// Largest accepted `max_in_flight`.
pub const MAX_IN_FLIGHT: u32 = 100_000;

/// An upstream service. Its host name is resolved once, when the configuration is loaded,
/// so that no request ever waits on DNS.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub url: String,
    pub addr: SocketAddr,
    /// The `Host` header sent upstream (`host` or `host:port`, as in the URL).
    pub host_header: String,
    /// A path prefix from the URL (`http://h/base` -> `/base`), prepended to every request.
    pub base_path: String,
    pub connect_timeout: Duration,
    /// Longest wait for any read from the upstream: the response head or the next body chunk.
    pub timeout: Duration,
    /// Concurrency and pacing limits protecting the upstream.
    pub guard: UpstreamGuardSettings,
    /// How it is spoken to over TLS: `Some` for an `https://` URL.
    pub tls: Option<UpstreamTls>,
}

impl Upstream {
    /// What `stoa check` and the start warn about: an https upstream whose certificate is
    /// not verified.
    pub fn warning(&self) -> Option<String> {
        match &self.tls {
            Some(tls) if !tls.verify => Some(format!(
                "upstreams.{}.tls_verify: false: the certificate of {} is not verified, so \
                 anyone on the path can pose as it",
                self.name, self.url
            )),
            _ => None,
        }
    }
}

/// Validated upstream protection of one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamGuardSettings {
    /// Most upstream fetches running at once; `None`: unbounded.
    pub max_in_flight: Option<u32>,
    /// Most upstream fetches started per second (evenly paced); `None`: unbounded.
    pub max_requests_per_second: Option<f64>,
    /// Longest a fetch waits for a slot before the request gets 503.
    pub queue_timeout: Duration,
}

impl Validator<'_> {
    /// The valid upstreams, and the names of all defined ones (valid or not), so that a
    /// route naming a broken upstream is not reported twice.
    pub(super) fn upstreams(
        &mut self,
        raw: Option<Value>,
    ) -> (BTreeMap<String, Arc<Upstream>>, Vec<String>) {
        let mut out = BTreeMap::new();
        let Some(raw) = raw else {
            return (out, Vec::new());
        };
        let Some(dict) = raw.into_dict() else {
            self.problem("upstreams", "must be a table of named upstreams");
            return (out, Vec::new());
        };
        let names = dict.keys().cloned().collect();
        for (name, value) in dict {
            let path = format!("upstreams.{name}");
            let name_ok = self.name_ok(&path, &name);
            let Some(raw) = self.section::<RawUpstream>(&path, &value) else {
                continue;
            };
            if let (Some(up), true) = (self.upstream(&path, &name, raw), name_ok) {
                out.insert(name, Arc::new(up));
            }
        }
        (out, names)
    }

    pub(super) fn upstream(
        &mut self,
        path: &str,
        name: &str,
        raw: RawUpstream,
    ) -> Option<Upstream> {
        let connect_timeout = self.duration(
            &format!("{path}.connect_timeout"),
            raw.connect_timeout.as_ref(),
            Duration::from_secs(2),
        );
        let timeout = self.duration(
            &format!("{path}.timeout"),
            raw.timeout.as_ref(),
            Duration::from_secs(30),
        );
        let queue_timeout = match &raw.queue_timeout {
            Some(RawDuration::Text(t)) if matches!(t.trim(), "0" | "0s" | "0ms") => {
                Some(Duration::ZERO)
            }
            other => self.duration(
                &format!("{path}.queue_timeout"),
                other.as_ref(),
                Duration::from_secs(1),
            ),
        };
        let guard = queue_timeout.and_then(|queue_timeout| {
            self.upstream_guard(
                path,
                raw.max_in_flight,
                raw.max_requests_per_second,
                queue_timeout,
            )
        });
        let url_path = format!("{path}.url");
        let target = match parse_upstream_url(&raw.url) {
            Ok(t) => Some(t),
            Err(msg) => {
                self.problem(url_path, msg);
                None
            }
        };
        let (addr, host_header, base_path, https_host) = target?;
        let tls = self.upstream_tls(path, &raw, https_host.as_deref()).ok()?;
        Some(Upstream {
            name: name.to_string(),
            url: raw.url,
            addr,
            host_header,
            base_path,
            connect_timeout: connect_timeout?,
            timeout: timeout?,
            guard: guard?,
            tls,
        })
    }

    /// Validates the protection keys of the upstream at `path` (e.g. `upstreams.clv`):
    /// `max_in_flight` (1 to [`MAX_IN_FLIGHT`]) and `max_requests_per_second` (greater than 0, at
    /// most `MAX_RATE_PER_SECOND`). `queue_timeout` comes already parsed; zero means "do not
    /// queue". Reports every problem; `None` when there was any.
    fn upstream_guard(
        &mut self,
        path: &str,
        max_in_flight: Option<i64>,
        max_requests_per_second: Option<f64>,
        queue_timeout: Duration,
    ) -> Option<UpstreamGuardSettings> {
        let before = self.problems.len();
        let max_in_flight = match max_in_flight {
            None => None,
            Some(n) if (1..=i64::from(MAX_IN_FLIGHT)).contains(&n) => Some(n as u32),
            Some(n) => {
                self.problem(
                    format!("{path}.max_in_flight"),
                    format!("{n} is not between 1 and {MAX_IN_FLIGHT}"),
                );
                None
            }
        };
        let max_requests_per_second = match max_requests_per_second {
            None => None,
            Some(r) => self.rate(&format!("{path}.max_requests_per_second"), r, 1.0),
        };
        (self.problems.len() == before).then_some(UpstreamGuardSettings {
            max_in_flight,
            max_requests_per_second,
            queue_timeout,
        })
    }
}

/// What an upstream URL gives: its resolved address, `Host` header, base path, and for an
/// https URL the host name TLS is spoken to (SNI, certificate name).
type UrlParts = (SocketAddr, String, String, Option<String>);

/// Splits an upstream URL into its resolved address, `Host` header, base path and TLS host.
fn parse_upstream_url(text: &str) -> Result<UrlParts, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        other => return Err(format!("{text:?}: scheme {other:?} is not http or https")),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{text:?}: credentials in upstream URLs are not supported"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{text:?}: an upstream URL takes no query or fragment"
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    let port = url
        .port_or_known_default()
        .unwrap_or(if https { 443 } else { 80 });
    let lookup_host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (lookup_host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{text:?}: cannot resolve {host}: {e}"))?
        .min_by_key(|a| a.is_ipv6())
        .ok_or_else(|| format!("{text:?}: {host} resolves to no address"))?;
    let host_header = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let base_path = url.path().trim_end_matches('/').to_string();
    let tls_host = https.then(|| lookup_host.to_string());
    Ok((addr, host_header, base_path, tls_host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::lines;

    #[test]
    fn upstream_urls_are_checked() {
        assert!(parse_upstream_url("ftp://127.0.0.1").is_err());
        assert!(parse_upstream_url("http://127.0.0.1/?q=1").is_err());
        assert!(parse_upstream_url("http://user:pw@127.0.0.1/").is_err());
        let (addr, host, base, tls) = parse_upstream_url("http://localhost").unwrap();
        assert_eq!(addr.port(), 80);
        assert_eq!(host, "localhost");
        assert_eq!(base, "");
        assert_eq!(tls, None);
        let (addr, host, _, tls) = parse_upstream_url("https://localhost/v1").unwrap();
        assert_eq!(addr.port(), 443);
        assert_eq!(host, "localhost");
        assert_eq!(tls.as_deref(), Some("localhost"));
    }

    #[test]
    fn upstream_guard_validation() {
        let figment = figment::Figment::new();
        let mut v = Validator::new(&figment);
        let ok = v.upstream_guard(
            "upstreams.u",
            Some(8),
            Some(50.0),
            Duration::from_millis(100),
        );
        assert_eq!(
            ok,
            Some(UpstreamGuardSettings {
                max_in_flight: Some(8),
                max_requests_per_second: Some(50.0),
                queue_timeout: Duration::from_millis(100),
            })
        );
        let bad = v.upstream_guard("upstreams.u", Some(0), Some(-3.0), Duration::ZERO);
        assert!(bad.is_none());
        let l = lines(&v.problems);
        assert_eq!(l.len(), 2);
        assert!(l[0].starts_with("upstreams.u.max_in_flight: 0 is not between 1"));
        assert!(l[1].starts_with("upstreams.u.max_requests_per_second: -3 is not"));
    }
}
