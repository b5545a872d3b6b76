//! `[rate_limits.<name>]` policies: who is a client, how fast it may go, which requests
//! count, and whether the limit is enforced.

use std::collections::BTreeMap;
use std::time::Duration;

use figment::value::Value;
use http::HeaderName;

use super::raw::RawPolicy;
use super::validate::Validator;

/// `rate_limit = "off"` exempts a route from `server.default_rate_limit`.
pub(super) const NO_RATE_LIMIT: &str = "off";

/// Highest accepted rate, per second, for a client policy or an upstream.
pub const MAX_RATE_PER_SECOND: f64 = 1_000_000.0;
/// Largest accepted burst.
pub const MAX_BURST: u32 = 1_000_000;
/// Longest accepted time for an empty bucket to fill again (`burst / rate`). It bounds how
/// long an idle client's state is kept, and keeps governor's nanosecond arithmetic in range.
pub const MAX_REFILL: Duration = Duration::from_secs(7 * 24 * 3600);

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

/// Which rate-limit headers the answers of a limited route carry (`server.rate_limit_headers`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RateLimitHeaders {
    /// `RateLimit-Policy` and `RateLimit`, the structured fields of
    /// draft-ietf-httpapi-ratelimit-headers.
    #[default]
    Draft,
    /// The older `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
    Legacy,
    /// Both sets.
    Both,
    /// Neither (a 429 still says `Retry-After`).
    None,
}

impl RateLimitHeaders {
    pub fn draft(self) -> bool {
        matches!(self, RateLimitHeaders::Draft | RateLimitHeaders::Both)
    }

    pub fn legacy(self) -> bool {
        matches!(self, RateLimitHeaders::Legacy | RateLimitHeaders::Both)
    }
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

impl Validator<'_> {
    pub(super) fn rate_limits(&mut self, raw: Option<Value>) -> BTreeMap<String, PolicySettings> {
        let mut out = BTreeMap::new();
        let Some(raw) = raw else { return out };
        let Some(dict) = raw.into_dict() else {
            self.problem("rate_limits", "must be a table of named policies");
            return out;
        };
        for (name, value) in dict {
            let path = format!("rate_limits.{name}");
            if name == NO_RATE_LIMIT {
                self.problem(
                    &path,
                    format!("{NO_RATE_LIMIT:?} is reserved: it exempts a route"),
                );
                continue;
            }
            let Some(raw) = self.section::<RawPolicy>(&path, &value) else {
                continue;
            };
            if let Some(policy) = self.policy(&path, &name, raw) {
                out.insert(name, policy);
            }
        }
        out
    }

    /// Validates one policy found at `path` (e.g. `rate_limits.default`), reporting every
    /// problem. Returns `None` when there was any.
    fn policy(&mut self, path: &str, name: &str, raw: RawPolicy) -> Option<PolicySettings> {
        let before = self.problems.len();

        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            self.problem(
                path,
                format!("name {name:?} must be 1-64 letters, digits, '_' or '-'"),
            );
        }

        let rate = match (raw.requests_per_second, raw.per_minute) {
            (Some(_), Some(_)) => {
                self.problem(
                    path,
                    "give either requests_per_second or per_minute, not both",
                );
                None
            }
            (None, None) => {
                self.problem(path, "needs a rate: requests_per_second or per_minute");
                None
            }
            (Some(r), None) => self.rate(&format!("{path}.requests_per_second"), r, 1.0),
            (None, Some(r)) => self.rate(&format!("{path}.per_minute"), r, 60.0),
        };

        let burst_path = format!("{path}.burst");
        let burst = match raw.burst {
            None => rate.map(|r| r.ceil().clamp(1.0, f64::from(MAX_BURST)) as u32),
            Some(b) if (1..=i64::from(MAX_BURST)).contains(&b) => Some(b as u32),
            Some(b) => {
                self.problem(&burst_path, format!("{b} is not between 1 and {MAX_BURST}"));
                None
            }
        };
        if let (Some(r), Some(b)) = (rate, burst) {
            let refill = f64::from(b) / r;
            if refill > MAX_REFILL.as_secs_f64() {
                self.problem(
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
                        self.problem(
                            format!("{path}.client"),
                            format!("{h:?} is not a valid header name"),
                        );
                        None
                    }
                },
                _ => {
                    self.problem(
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
                self.problem(
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
                self.problem(
                    format!("{path}.mode"),
                    format!("{other:?} is not \"enforce\" or \"dry_run\""),
                );
                None
            }
        };

        if self.problems.len() != before {
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
    pub(super) fn rate(&mut self, path: &str, value: f64, unit_secs: f64) -> Option<f64> {
        let max = MAX_RATE_PER_SECOND * unit_secs;
        if value.is_finite() && value > 0.0 && value <= max {
            Some(value / unit_secs)
        } else {
            self.problem(
                path,
                format!("{value} is not a number greater than 0 and at most {max}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use figment::providers::{Format, Toml};
    use figment::Figment;

    use super::*;
    use crate::config::tests::lines;

    fn raw(toml_text: &str) -> RawPolicy {
        Figment::from(Toml::string(toml_text))
            .extract()
            .expect("test policy parses")
    }

    #[test]
    fn defaults_fill_in() {
        let figment = figment::Figment::new();
        let mut v = Validator::new(&figment);
        let s = v
            .policy(
                "rate_limits.default",
                "default",
                raw("requests_per_second = 2.5"),
            )
            .unwrap();
        assert!(v.problems.is_empty());
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
        let s = v.policy("rate_limits.slow",
            "slow",
            raw("per_minute = 30\nclient = \"header:X-API-Key\"\napplies_to = \"misses\"\nmode = \"dry_run\""))
        .unwrap();
        assert!(v.problems.is_empty());
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
        let figment = figment::Figment::new();
        let mut v = Validator::new(&figment);
        let r = v.policy(
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
        );
        assert!(r.is_none());
        let expect = [
            "rate_limits.a: give either requests_per_second or per_minute, not both",
            "rate_limits.a.burst: 0 is not between 1 and 1000000",
            "rate_limits.a.client: \"cookie\" is not \"ip\" or \"header:<Header-Name>\"",
            "rate_limits.a.applies_to: \"hits\" is not \"all\" or \"misses\"",
            "rate_limits.a.mode: \"log\" is not \"enforce\" or \"dry_run\"",
        ];
        assert_eq!(lines(&v.problems), expect);

        let figment = figment::Figment::new();
        let mut v = Validator::new(&figment);
        let r = v.policy(
            "rate_limits.b c",
            "b c",
            RawPolicy {
                client: Some("header: ".into()),
                ..RawPolicy::default()
            },
        );
        assert!(r.is_none());
        assert_eq!(
            lines(&v.problems),
            [
                "rate_limits.b c: name \"b c\" must be 1-64 letters, digits, '_' or '-'",
                "rate_limits.b c: needs a rate: requests_per_second or per_minute",
                "rate_limits.b c.client: \"header: \" is not \"ip\" or \"header:<Header-Name>\"",
            ]
        );
    }

    #[test]
    fn rates_and_bursts_are_bounded() {
        let figment = figment::Figment::new();
        let mut v = Validator::new(&figment);
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
            assert!(v.policy("r.x", "x", r).is_none());
        }
        let l = lines(&v.problems);
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
        let figment = figment::Figment::new();
        let mut v = Validator::new(&figment);
        let r = RawPolicy {
            requests_per_second: Some(1.0),
            client: Some("header:X Key".into()),
            ..RawPolicy::default()
        };
        assert!(v.policy("r.y", "y", r).is_none());
        assert_eq!(
            lines(&v.problems),
            ["r.y.client: \"X Key\" is not a valid header name"]
        );
    }
}
