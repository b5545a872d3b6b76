//! The rate-limit parts of the configuration file and their validation.
//!
//! Like the rest of the configuration, every problem is collected with its key path
//! (`rate_limits.default.burst`), so that `stoa check` can list them all at once.

use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;

use crate::config::Problem;

/// Highest accepted rate, per second, for a client policy or an upstream.
pub const MAX_RATE_PER_SECOND: f64 = 1_000_000.0;
/// Largest accepted burst.
pub const MAX_BURST: u32 = 1_000_000;
/// Longest accepted time for an empty bucket to fill again (`burst / rate`). It bounds how
/// long an idle client's state is kept, and keeps governor's nanosecond arithmetic in range.
pub const MAX_REFILL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest accepted `max_in_flight`.
pub const MAX_IN_FLIGHT: u32 = 100_000;

/// One `[rate_limits.<name>]` table, as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub requests_per_second: Option<f64>,
    pub per_minute: Option<f64>,
    pub burst: Option<i64>,
    pub client: Option<String>,
    pub applies_to: Option<String>,
    pub mode: Option<String>,
}

/// A validated rate-limit policy. `PartialEq` lets a reload keep the state of unchanged
/// policies.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySettings {
    pub name: String,
    /// Sustained rate; `per_minute` is converted (`per_minute / 60`).
    pub rate_per_second: f64,
    /// Requests a client may make at once after being idle.
    pub burst: u32,
    pub client: ClientSource,
    pub applies_to: AppliesTo,
    pub mode: Mode,
}

/// What identifies a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSource {
    /// The client address, or the client behind trusted proxies.
    Ip,
    /// The value of this request header; requests without it fall back to the address.
    Header(HeaderName),
}

/// Which requests of a route count against the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppliesTo {
    /// Every request.
    All,
    /// Only requests that would reach the upstream: cache hits are never throttled.
    Misses,
}

/// What happens to a request over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refused with 429.
    Enforce,
    /// Counted and logged, but let through.
    DryRun,
}

fn push(problems: &mut Vec<Problem>, path: impl Into<String>, message: impl Into<String>) {
    problems.push(Problem {
        path: path.into(),
        message: message.into(),
    });
}

/// Validates one policy found at `path` (e.g. `rate_limits.default`), pushing every problem
/// onto `problems`. Returns `None` when there was any.
pub fn validate_policy(
    path: &str,
    name: &str,
    raw: RawPolicy,
    problems: &mut Vec<Problem>,
) -> Option<PolicySettings> {
    let before = problems.len();

    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !name_ok {
        push(
            problems,
            path,
            format!("name {name:?} must be 1-64 letters, digits, '_' or '-'"),
        );
    }

    let rate = match (raw.requests_per_second, raw.per_minute) {
        (Some(_), Some(_)) => {
            push(
                problems,
                path,
                "give either requests_per_second or per_minute, not both",
            );
            None
        }
        (None, None) => {
            push(
                problems,
                path,
                "needs a rate: requests_per_second or per_minute",
            );
            None
        }
        (Some(r), None) => rate(problems, &format!("{path}.requests_per_second"), r, 1.0),
        (None, Some(r)) => rate(problems, &format!("{path}.per_minute"), r, 60.0),
    };

    let burst_path = format!("{path}.burst");
    let burst = match raw.burst {
        None => rate.map(|r| r.ceil().clamp(1.0, f64::from(MAX_BURST)) as u32),
        Some(b) if (1..=i64::from(MAX_BURST)).contains(&b) => Some(b as u32),
        Some(b) => {
            push(
                problems,
                &burst_path,
                format!("{b} is not between 1 and {MAX_BURST}"),
            );
            None
        }
    };
    if let (Some(r), Some(b)) = (rate, burst) {
        let refill = f64::from(b) / r;
        if refill > MAX_REFILL.as_secs_f64() {
            push(
                problems,
                &burst_path,
                format!(
                    "a burst of {b} takes {} to refill at this rate; at most {} is allowed",
                    humantime::format_duration(Duration::from_secs(refill as u64)),
                    humantime::format_duration(MAX_REFILL)
                ),
            );
        }
    }

    let client = match raw.client.as_deref() {
        None | Some("ip") => Some(ClientSource::Ip),
        Some(text) => match text.strip_prefix("header:").map(str::trim) {
            Some(h) if !h.is_empty() => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) => Some(ClientSource::Header(name)),
                Err(_) => {
                    push(
                        problems,
                        format!("{path}.client"),
                        format!("{h:?} is not a valid header name"),
                    );
                    None
                }
            },
            _ => {
                push(
                    problems,
                    format!("{path}.client"),
                    format!("{text:?} is not \"ip\" or \"header:<Header-Name>\""),
                );
                None
            }
        },
    };

    let applies_to = match raw.applies_to.as_deref() {
        None | Some("all") => Some(AppliesTo::All),
        Some("misses") => Some(AppliesTo::Misses),
        Some(other) => {
            push(
                problems,
                format!("{path}.applies_to"),
                format!("{other:?} is not \"all\" or \"misses\""),
            );
            None
        }
    };

    let mode = match raw.mode.as_deref() {
        None | Some("enforce") => Some(Mode::Enforce),
        Some("dry_run") => Some(Mode::DryRun),
        Some(other) => {
            push(
                problems,
                format!("{path}.mode"),
                format!("{other:?} is not \"enforce\" or \"dry_run\""),
            );
            None
        }
    };

    if problems.len() != before {
        return None;
    }
    Some(PolicySettings {
        name: name.to_string(),
        rate_per_second: rate?,
        burst: burst?,
        client: client?,
        applies_to: applies_to?,
        mode: mode?,
    })
}

/// Checks a rate given per `unit_secs` seconds; returns it per second.
fn rate(problems: &mut Vec<Problem>, path: &str, value: f64, unit_secs: f64) -> Option<f64> {
    let max = MAX_RATE_PER_SECOND * unit_secs;
    if value.is_finite() && value > 0.0 && value <= max {
        Some(value / unit_secs)
    } else {
        push(
            problems,
            path,
            format!("{value} is not a number greater than 0 and at most {max}"),
        );
        None
    }
}

/// Parses `server.trusted_proxies`: CIDRs such as `"10.0.0.0/8"`, or bare addresses
/// (`"127.0.0.1"` means `/32`, an IPv6 address `/128`). Each bad entry is reported at
/// `path[i]`; the good ones are returned.
pub fn parse_trusted_proxies(
    path: &str,
    list: &[String],
    problems: &mut Vec<Problem>,
) -> Vec<IpNet> {
    let mut out = Vec::with_capacity(list.len());
    for (i, text) in list.iter().enumerate() {
        let t = text.trim();
        let net = t
            .parse::<IpNet>()
            .map(|n| n.trunc())
            .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from));
        match net {
            Ok(n) => out.push(n),
            Err(_) => push(
                problems,
                format!("{path}[{i}]"),
                format!("{text:?} is not a network like \"10.0.0.0/8\" or an address like \"127.0.0.1\""),
            ),
        }
    }
    out
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

/// Validates the protection keys of the upstream at `path` (e.g. `upstreams.clv`):
/// `max_in_flight` (1 to [`MAX_IN_FLIGHT`]) and `max_requests_per_second` (greater than 0, at
/// most [`MAX_RATE_PER_SECOND`]). `queue_timeout` comes already parsed; zero means "do not
/// queue". Pushes every problem; `None` when there was any.
pub fn validate_upstream_guard(
    path: &str,
    max_in_flight: Option<i64>,
    max_requests_per_second: Option<f64>,
    queue_timeout: Duration,
    problems: &mut Vec<Problem>,
) -> Option<UpstreamGuardSettings> {
    let before = problems.len();
    let max_in_flight = match max_in_flight {
        None => None,
        Some(n) if (1..=i64::from(MAX_IN_FLIGHT)).contains(&n) => Some(n as u32),
        Some(n) => {
            push(
                problems,
                format!("{path}.max_in_flight"),
                format!("{n} is not between 1 and {MAX_IN_FLIGHT}"),
            );
            None
        }
    };
    let max_requests_per_second = match max_requests_per_second {
        None => None,
        Some(r) => rate(problems, &format!("{path}.max_requests_per_second"), r, 1.0),
    };
    (problems.len() == before).then_some(UpstreamGuardSettings {
        max_in_flight,
        max_requests_per_second,
        queue_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(problems: &[Problem]) -> Vec<String> {
        problems.iter().map(|p| p.to_string()).collect()
    }

    fn raw(toml_text: &str) -> RawPolicy {
        figment::Figment::from(figment::providers::Toml::string(toml_text))
            .extract()
            .expect("test policy parses")
    }

    use figment::providers::Format;

    #[test]
    fn defaults_fill_in() {
        let mut p = Vec::new();
        let s = validate_policy(
            "rate_limits.default",
            "default",
            raw("requests_per_second = 2.5"),
            &mut p,
        )
        .unwrap();
        assert!(p.is_empty());
        assert_eq!(
            s,
            PolicySettings {
                name: "default".into(),
                rate_per_second: 2.5,
                burst: 3,
                client: ClientSource::Ip,
                applies_to: AppliesTo::All,
                mode: Mode::Enforce,
            }
        );
        let s = validate_policy(
            "rate_limits.slow",
            "slow",
            raw("per_minute = 30\nclient = \"header:X-API-Key\"\napplies_to = \"misses\"\nmode = \"dry_run\""),
            &mut p,
        )
        .unwrap();
        assert!(p.is_empty());
        assert_eq!(s.rate_per_second, 0.5);
        assert_eq!(s.burst, 1);
        assert_eq!(
            s.client,
            ClientSource::Header(HeaderName::from_static("x-api-key"))
        );
        assert_eq!(s.applies_to, AppliesTo::Misses);
        assert_eq!(s.mode, Mode::DryRun);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let r: Result<RawPolicy, _> =
            figment::Figment::from(figment::providers::Toml::string("rps = 1")).extract();
        assert!(r.is_err());
    }

    #[test]
    fn every_policy_problem_is_reported_with_its_path() {
        let mut p = Vec::new();
        let r = validate_policy(
            "rate_limits.a",
            "a",
            RawPolicy {
                requests_per_second: Some(1.0),
                per_minute: Some(60.0),
                burst: Some(0),
                client: Some("cookie".into()),
                applies_to: Some("hits".into()),
                mode: Some("log".into()),
            },
            &mut p,
        );
        assert!(r.is_none());
        let expect = [
            "rate_limits.a: give either requests_per_second or per_minute, not both",
            "rate_limits.a.burst: 0 is not between 1 and 1000000",
            "rate_limits.a.client: \"cookie\" is not \"ip\" or \"header:<Header-Name>\"",
            "rate_limits.a.applies_to: \"hits\" is not \"all\" or \"misses\"",
            "rate_limits.a.mode: \"log\" is not \"enforce\" or \"dry_run\"",
        ];
        assert_eq!(lines(&p), expect);

        let mut p = Vec::new();
        let r = validate_policy(
            "rate_limits.b c",
            "b c",
            RawPolicy {
                client: Some("header: ".into()),
                ..RawPolicy::default()
            },
            &mut p,
        );
        assert!(r.is_none());
        assert_eq!(
            lines(&p),
            [
                "rate_limits.b c: name \"b c\" must be 1-64 letters, digits, '_' or '-'",
                "rate_limits.b c: needs a rate: requests_per_second or per_minute",
                "rate_limits.b c.client: \"header: \" is not \"ip\" or \"header:<Header-Name>\"",
            ]
        );
    }

    #[test]
    fn rates_and_bursts_are_bounded() {
        let mut p = Vec::new();
        for (rps, pm, burst) in [
            (Some(0.0), None, None),
            (Some(-1.0), None, None),
            (Some(f64::NAN), None, None),
            (Some(f64::INFINITY), None, None),
            (Some(2e6), None, None),
            (None, Some(0.0), None),
            (Some(1.0), None, Some(-5)),
            (Some(1.0), None, Some(i64::MAX)),
            (None, Some(1.0), Some(1_000_000)),
        ] {
            let r = RawPolicy {
                requests_per_second: rps,
                per_minute: pm,
                burst,
                ..RawPolicy::default()
            };
            assert!(validate_policy("r.x", "x", r, &mut p).is_none());
        }
        let l = lines(&p);
        assert_eq!(l.len(), 9, "{l:#?}");
        assert!(l[5].starts_with("r.x.per_minute: 0 is not"), "{l:#?}");
        assert!(
            l[8].starts_with("r.x.burst: a burst of 1000000 takes"),
            "{l:#?}"
        );
        assert!(l[..5]
            .iter()
            .all(|l| l.starts_with("r.x.requests_per_second: ")));

        // A header name with a bad character.
        let mut p = Vec::new();
        let r = RawPolicy {
            requests_per_second: Some(1.0),
            client: Some("header:X Key".into()),
            ..RawPolicy::default()
        };
        assert!(validate_policy("r.y", "y", r, &mut p).is_none());
        assert_eq!(
            lines(&p),
            ["r.y.client: \"X Key\" is not a valid header name"]
        );
    }

    #[test]
    fn trusted_proxies_parse_and_report() {
        let mut p = Vec::new();
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
        let nets = parse_trusted_proxies("server.trusted_proxies", &list, &mut p);
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
        let l = lines(&p);
        assert_eq!(l.len(), 2);
        assert!(l[0].starts_with("server.trusted_proxies[5]: \"nope\""));
        assert!(l[1].starts_with("server.trusted_proxies[6]: \"10.0.0.0/33\""));
    }

    #[test]
    fn upstream_guard_validation() {
        let mut p = Vec::new();
        let ok = validate_upstream_guard(
            "upstreams.u",
            Some(8),
            Some(50.0),
            Duration::from_millis(100),
            &mut p,
        );
        assert_eq!(
            ok,
            Some(UpstreamGuardSettings {
                max_in_flight: Some(8),
                max_requests_per_second: Some(50.0),
                queue_timeout: Duration::from_millis(100),
            })
        );
        let bad =
            validate_upstream_guard("upstreams.u", Some(0), Some(-3.0), Duration::ZERO, &mut p);
        assert!(bad.is_none());
        let l = lines(&p);
        assert_eq!(l.len(), 2);
        assert!(l[0].starts_with("upstreams.u.max_in_flight: 0 is not between 1"));
        assert!(l[1].starts_with("upstreams.u.max_requests_per_second: -3 is not"));
    }
}
