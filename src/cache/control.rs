//! What an upstream answer says about its own caching (RFC 9111 §5.2.2, RFC 5861), read
//! once when the answer is stored, and the validators a stored answer keeps for
//! conditional requests (RFC 9110 §13).

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderValue};

/// Largest delta-seconds value kept (RFC 9111 §1.2.2: 2^31).
const MAX_SECONDS: u64 = 1 << 31;

/// The response `Cache-Control` directives stoa acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    /// `no-cache` without a field list: never served without revalidation.
    pub no_cache: bool,
    /// `no-cache="a, b"`: these fields are not stored.
    pub no_cache_fields: Vec<String>,
    pub public: bool,
    /// `must-revalidate` or `proxy-revalidate`: no stale serving once expired.
    pub must_revalidate: bool,
    pub s_maxage: Option<u64>,
    pub max_age: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl Directives {
    /// Reads every `Cache-Control` line of `headers`. Names are case-insensitive; the
    /// first occurrence of a directive counts; a duration that is not delta-seconds is 0
    /// (RFC 9111 §4.2.1: such an answer is stale).
    pub fn parse(headers: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        let mut seen: u16 = 0;
        for line in headers.get_all(header::CACHE_CONTROL) {
            let Ok(line) = std::str::from_utf8(line.as_bytes()) else {
                continue;
            };
            for (name, value) in Items(line) {
                let name = name.to_ascii_lowercase();
                let (bit, slot) = match name.as_str() {
                    "s-maxage" => (1, Some(&mut d.s_maxage)),
                    "max-age" => (2, Some(&mut d.max_age)),
                    "stale-while-revalidate" => (4, Some(&mut d.stale_while_revalidate)),
                    "stale-if-error" => (8, Some(&mut d.stale_if_error)),
                    "no-cache" => {
                        match value {
                            Some(fields) => d.no_cache_fields.extend(
                                fields
                                    .split(',')
                                    .map(str::trim)
                                    .filter(|f| !f.is_empty())
                                    .map(str::to_ascii_lowercase),
                            ),
                            None => d.no_cache = true,
                        }
                        continue;
                    }
                    "public" => {
                        d.public = true;
                        continue;
                    }
                    "must-revalidate" | "proxy-revalidate" => {
                        d.must_revalidate = true;
                        continue;
                    }
                    _ => continue,
                };
                if seen & bit != 0 {
                    continue;
                }
                seen |= bit;
                if let Some(slot) = slot {
                    *slot = Some(value.map_or(0, delta_seconds));
                }
            }
        }
        d
    }

    /// The freshness lifetime the upstream gives, less its `Age` (RFC 9111 §4.2.1):
    /// `s-maxage`, else `max-age`, else `Expires - Date` (an `Expires` that is not a date
    /// means already expired); `None` when it says nothing.
    pub fn lifetime(&self, headers: &HeaderMap, upstream_age: u64) -> Option<Duration> {
        let secs = match self.s_maxage.or(self.max_age) {
            Some(secs) => Duration::from_secs(secs),
            None => {
                let expires = headers.get(header::EXPIRES)?;
                let Some(expires) = http_date(expires) else {
                    return Some(Duration::ZERO);
                };
                let date = headers
                    .get(header::DATE)
                    .and_then(http_date)
                    .unwrap_or_else(SystemTime::now);
                expires.duration_since(date).unwrap_or(Duration::ZERO)
            }
        };
        Some(secs.saturating_sub(Duration::from_secs(upstream_age)))
    }

    /// Whether a request with `Authorization` may share the answer (RFC 9111 §3.5).
    pub fn shareable_with_authorization(&self) -> bool {
        self.public || self.s_maxage.is_some() || self.must_revalidate
    }
}

fn delta_seconds(value: &str) -> u64 {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    value
        .parse::<u64>()
        .map_or(MAX_SECONDS, |s| s.min(MAX_SECONDS))
}

/// An HTTP-date header value.
pub fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?).ok()
}

/// The directives of one `Cache-Control` line: names with their values, a quoted value
/// unquoted (commas inside quotes do not split).
struct Items<'a>(&'a str);

impl<'a> Iterator for Items<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let rest = self.0.trim_start_matches([',', ' ', '\t']);
            if rest.is_empty() {
                self.0 = rest;
                return None;
            }
            let end = rest.find([',', '=']).unwrap_or(rest.len());
            let name = rest[..end].trim();
            let after = &rest[end..];
            let Some(value) = after.strip_prefix('=') else {
                self.0 = after;
                if name.is_empty() {
                    continue;
                }
                return Some((name, None));
            };
            let value = value.trim_start();
            let (value, rest) = match value.strip_prefix('"') {
                Some(quoted) => match quoted.find('"') {
                    Some(close) => (&quoted[..close], &quoted[close + 1..]),
                    None => (quoted, ""),
                },
                None => {
                    let end = value.find(',').unwrap_or(value.len());
                    (value[..end].trim(), &value[end..])
                }
            };
            // Anything after a quoted value up to the next comma is not part of it.
            self.0 = rest.find(',').map_or("", |i| &rest[i..]);
            if name.is_empty() {
                continue;
            }
            return Some((name, Some(value)));
        }
    }
}

/// A stored answer's validators, read once when it is stored.
#[derive(Debug, Clone)]
pub struct Validators {
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<HeaderValue>,
    /// `last_modified` as a time, to compare with a client's `If-Modified-Since`.
    pub modified_at: Option<SystemTime>,
}

impl Validators {
    pub fn of(headers: &HeaderMap) -> Option<Validators> {
        let etag = headers.get(header::ETAG).cloned();
        let last_modified = headers.get(header::LAST_MODIFIED).cloned();
        if etag.is_none() && last_modified.is_none() {
            return None;
        }
        let modified_at = last_modified.as_ref().and_then(http_date);
        Some(Validators {
            etag,
            last_modified,
            modified_at,
        })
    }

    /// Whether a client's conditional GET/HEAD is answered `304` (RFC 9110 §13.2.2):
    /// `If-None-Match` (weak comparison, `*`, lists) when present, else
    /// `If-Modified-Since` against `Last-Modified`.
    pub fn not_modified(validators: Option<&Validators>, request: &HeaderMap) -> bool {
        let mut inm = request.get_all(header::IF_NONE_MATCH).iter().peekable();
        if inm.peek().is_some() {
            let etag = validators
                .and_then(|v| v.etag.as_ref())
                .and_then(|e| e.to_str().ok());
            return inm.any(|line| {
                line.to_str().is_ok_and(|line| {
                    line.trim() == "*" || etag.is_some_and(|etag| weak_match(line, etag))
                })
            });
        }
        let (Some(since), Some(modified)) = (
            request.get(header::IF_MODIFIED_SINCE).and_then(http_date),
            validators.and_then(|v| v.modified_at),
        ) else {
            return false;
        };
        modified <= since
    }
}

/// Whether any entity tag of the list `line` matches `etag` by weak comparison
/// (RFC 9110 §8.8.3.2: the opaque tags are equal, `W/` aside).
fn weak_match(line: &str, etag: &str) -> bool {
    let opaque = |tag: &str| {
        let tag = tag.trim();
        tag.strip_prefix("W/").unwrap_or(tag).to_string()
    };
    let stored = opaque(etag);
    let mut rest = line;
    loop {
        rest = rest.trim_start_matches([',', ' ', '\t']);
        if rest.is_empty() {
            return false;
        }
        let body = rest.strip_prefix("W/").unwrap_or(rest);
        let (tag, after) = match body.strip_prefix('"') {
            Some(quoted) => match quoted.find('"') {
                Some(close) => (&body[..close + 2], &quoted[close + 1..]),
                None => return false,
            },
            None => {
                let end = body.find(',').unwrap_or(body.len());
                (&body[..end], &body[end..])
            }
        };
        if tag.trim() == stored {
            return true;
        }
        rest = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(lines: &[&str]) -> Directives {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(header::CACHE_CONTROL, HeaderValue::from_str(l).unwrap());
        }
        Directives::parse(&h)
    }

    #[test]
    fn directives_are_read_with_quotes_lists_and_case() {
        let d = cc(&[
            "Public, S-MAXAGE=10, max-age=\"20\"",
            "no-cache=\"Set-Cookie, X-A\", stale-while-revalidate=5, max-age=99",
        ]);
        assert!(d.public && !d.no_cache && !d.must_revalidate);
        assert_eq!(d.s_maxage, Some(10));
        assert_eq!(d.max_age, Some(20), "the first max-age counts");
        assert_eq!(d.stale_while_revalidate, Some(5));
        assert_eq!(d.no_cache_fields, ["set-cookie", "x-a"]);
        let d = cc(&["no-cache, proxy-revalidate, max-age=abc, stale-if-error=99999999999"]);
        assert!(d.no_cache && d.must_revalidate);
        assert_eq!(d.max_age, Some(0), "an invalid max-age is stale");
        assert_eq!(d.stale_if_error, Some(MAX_SECONDS));
    }

    #[test]
    fn entity_tags_compare_weakly() {
        assert!(weak_match("\"a\"", "\"a\""));
        assert!(weak_match("W/\"a\"", "\"a\""));
        assert!(weak_match("\"x\", W/\"a\"", "W/\"a\""));
        assert!(weak_match("\"x,y\", \"a\"", "\"a\""));
        assert!(!weak_match("\"x,y\"", "\"y\""));
        assert!(!weak_match("\"ab\"", "\"a\""));
    }
}
