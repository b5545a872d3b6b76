//! What an upstream answer says about its own caching (RFC 9111 §5.2.2, RFC 5861, and the
//! targeted fields of RFC 9213), read once when the answer is stored, the lifetime stoa
//! gives it, and the validators a stored answer keeps for conditional requests (RFC 9110 §13).

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderName, HeaderValue};
use sfv::{BareItem, ListEntry, Parser};

use super::NotStored;
use crate::config::Silent;

/// Largest delta-seconds value kept (RFC 9111 §1.2.2: 2^31).
const MAX_SECONDS: u64 = 1 << 31;

/// `CDN-Cache-Control` (RFC 9213 §3): second on stoa's target list, after its own field.
pub const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// The statuses RFC 9110 §15.1 defines as heuristically cacheable (RFC 9111 §4.2.2).
const HEURISTICALLY_CACHEABLE: [u16; 12] =
    [200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];

/// The response cache directives stoa acts on: those of the first targeted field on its
/// list that is present and valid (RFC 9213 §2.1), else those of `Cache-Control`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    /// `no-store`: not stored.
    pub no_store: bool,
    /// `private` without a field list: not stored (stoa is a shared cache).
    pub private: bool,
    /// `no-cache` without a field list: never served without revalidation.
    pub no_cache: bool,
    /// `no-cache="a, b"` (or `private="a, b"`): these fields are not stored.
    pub no_cache_fields: Vec<String>,
    pub public: bool,
    /// `must-revalidate` or `proxy-revalidate`: no stale serving once expired.
    pub must_revalidate: bool,
    pub s_maxage: Option<u64>,
    pub max_age: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// Read from a targeted field, whose cache ignores `Expires` (RFC 9213 §2.1).
    pub targeted: bool,
}

/// The freshness of an answer under `freshness = "origin"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Fresh this long: what the answer states (less its `Age`), else the route's TTL
    /// (`silent = "ttl"`) or a heuristic lifetime (less its `Age`).
    Fresh(Duration),
    /// It states none and none may be assumed (`silent = "heuristic"`): never reused
    /// without revalidation, so stored only when it has a validator.
    Revalidate,
    /// It states none and nothing else makes it storable (RFC 9111 §3): not `public`, and
    /// a status that is not heuristically cacheable.
    Unstorable,
}

impl Directives {
    /// The directives stoa follows for an answer with `headers` (RFC 9213 §2.1): those of the
    /// first field of its target list (`targeted_field`, then `CDN-Cache-Control`) that is
    /// present with a valid, non-empty value; then `Cache-Control` and `Expires` are not
    /// read. Without one, those of `Cache-Control`.
    pub fn parse_for(headers: &HeaderMap, targeted_field: &HeaderName) -> Directives {
        [targeted_field, &CDN_CACHE_CONTROL]
            .into_iter()
            .find_map(|name| Directives::targeted(headers, name))
            .unwrap_or_else(|| Directives::parse(headers))
    }

    /// The directives of the targeted field `name` (RFC 9213 §2.2): a Structured Field
    /// Dictionary (RFC 8941) over all its lines, parameters ignored. `None` when the field
    /// is absent, empty or not a valid Dictionary (the next on the list counts then).
    /// A duration that is not a non-negative Integer is 0 (stale, as in `Cache-Control`).
    fn targeted(headers: &HeaderMap, name: &HeaderName) -> Option<Directives> {
        let mut lines = headers.get_all(name).iter();
        let first = lines.next()?;
        let dictionary = match lines.next() {
            None => Parser::parse_dictionary(first.as_bytes()),
            // Lines are joined with commas (RFC 8941 §4.2).
            Some(_) => {
                let all: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
                Parser::parse_dictionary(&all.join(&b", "[..]))
            }
        };
        let dictionary = dictionary.ok().filter(|d| !d.is_empty())?;
        let mut d = Directives {
            targeted: true,
            ..Directives::default()
        };
        for (key, member) in &dictionary {
            let item = match member {
                ListEntry::Item(item) => Some(&item.bare_item),
                ListEntry::InnerList(_) => None,
            };
            // A directive given any value but false counts, `public` aside (only the
            // restrictive reading of a malformed value is safe).
            let set = !matches!(item, Some(BareItem::Boolean(false)));
            let seconds = || match item {
                Some(BareItem::Integer(n)) => u64::try_from(*n).map_or(0, |n| n.min(MAX_SECONDS)),
                _ => 0,
            };
            // A field list: a String (or a single Token); any other value counts as none.
            let fields = match item {
                Some(BareItem::String(s) | BareItem::Token(s)) => Some(s.as_str()),
                _ => None,
            };
            match key.as_str() {
                "no-store" => d.no_store = set,
                "public" => d.public = matches!(item, Some(BareItem::Boolean(true))),
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate |= set,
                "no-cache" => match fields {
                    Some(f) => d.no_cache_fields.extend(field_list(f)),
                    None => d.no_cache = set,
                },
                "private" => match fields {
                    Some(f) => d.no_cache_fields.extend(field_list(f)),
                    None => d.private = set,
                },
                "s-maxage" => d.s_maxage = Some(seconds()),
                "max-age" => d.max_age = Some(seconds()),
                "stale-while-revalidate" => d.stale_while_revalidate = Some(seconds()),
                "stale-if-error" => d.stale_if_error = Some(seconds()),
                _ => {}
            }
        }
        Some(d)
    }

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
                            Some(fields) => d.no_cache_fields.extend(field_list(fields)),
                            None => d.no_cache = true,
                        }
                        continue;
                    }
                    "private" => {
                        match value {
                            Some(fields) => d.no_cache_fields.extend(field_list(fields)),
                            None => d.private = true,
                        }
                        continue;
                    }
                    "no-store" => {
                        d.no_store = true;
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
            // A targeted field's cache ignores `Expires`.
            None if self.targeted => return None,
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

    /// The lifetime of an answer under `freshness = "origin"` whose status the route caches
    /// for `route_ttl`: what it states (see [`Directives::lifetime`]), else what `silent`
    /// gives one that says nothing. With `Silent::Heuristic`, only what RFC 9111 §4.2.2
    /// allows: for a heuristically cacheable status or a `public` answer, a tenth of the
    /// time since its `Last-Modified` (see [`heuristic_lifetime`]) at most `route_ttl`,
    /// less its `Age`; otherwise none.
    pub fn origin_lifetime(
        &self,
        headers: &HeaderMap,
        upstream_age: u64,
        status: u16,
        route_ttl: Duration,
        silent: Silent,
    ) -> Lifetime {
        if let Some(stated) = self.lifetime(headers, upstream_age) {
            return Lifetime::Fresh(stated);
        }
        match silent {
            Silent::Ttl => Lifetime::Fresh(route_ttl),
            Silent::Heuristic if !self.public && !HEURISTICALLY_CACHEABLE.contains(&status) => {
                Lifetime::Unstorable
            }
            Silent::Heuristic => heuristic_lifetime(headers, route_ttl)
                .map(|ttl| ttl.saturating_sub(Duration::from_secs(upstream_age)))
                .filter(|ttl| !ttl.is_zero())
                .map_or(Lifetime::Revalidate, Lifetime::Fresh),
        }
    }

    /// Why an answer so directed is not stored: `no-store`, else `private`.
    pub fn not_storable(&self) -> Option<NotStored> {
        if self.no_store {
            Some(NotStored::NoStore)
        } else if self.private {
            Some(NotStored::Private)
        } else {
            None
        }
    }

    /// Whether a request with `Authorization` may share the answer (RFC 9111 §3.5).
    pub fn shareable_with_authorization(&self) -> bool {
        self.public || self.s_maxage.is_some() || self.must_revalidate
    }
}

/// RFC 9111 §4.2.2: a tenth of the time from `Last-Modified` to `Date` (now when it has
/// none), at most `cap`; `None` without a `Last-Modified` that is a date before then.
pub fn heuristic_lifetime(headers: &HeaderMap, cap: Duration) -> Option<Duration> {
    let modified = headers.get(header::LAST_MODIFIED).and_then(http_date)?;
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or_else(SystemTime::now);
    let since = date.duration_since(modified).ok()?;
    Some((since / 10).min(cap))
}

/// The field names of a `no-cache="a, b"` or `private="a, b"` argument, lowercase.
fn field_list(fields: &str) -> impl Iterator<Item = String> + '_ {
    fields
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(str::to_ascii_lowercase)
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
    /// The field aimed at stoa the answer came with (its lines joined), kept apart from
    /// the stored head, which clients get: a `304` that does not carry it leaves it in
    /// force (RFC 9111 §4.3.4).
    pub targeted: Option<(HeaderName, HeaderValue)>,
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
            targeted: None,
        })
    }

    /// Keeps the field `name` of the upstream's `headers`, copied (see [`Validators`]).
    pub fn keeping(mut self, name: &HeaderName, headers: &HeaderMap) -> Validators {
        let lines: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
        if !lines.is_empty() {
            let joined = HeaderValue::from_bytes(&lines.join(&b", "[..])).ok();
            self.targeted = joined.map(|value| (name.clone(), value));
        }
        self
    }

    /// Puts the kept field aimed at stoa back into the headers of a `304` merged with the
    /// stored answer, unless the `304` carried its own.
    pub fn restore_targeted(&self, merged: &mut HeaderMap) {
        if let Some((name, value)) = &self.targeted {
            if !merged.contains_key(name) {
                merged.insert(name.clone(), value.clone());
            }
        }
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

    fn stoa() -> HeaderName {
        HeaderName::from_static("stoa-cache-control")
    }

    /// A head of `(name, value)` lines.
    fn head(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in lines {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    /// Header lines: `(name, value)`.
    type Lines<'a> = Vec<(&'a str, &'a str)>;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_first_valid_targeted_field_beats_cache_control_and_expires() {
        let far = httpdate::fmt_http_date(SystemTime::now() + secs(600));
        let cc = ("cache-control", "max-age=10, must-revalidate");
        let cdn = ("cdn-cache-control", "max-age=20");
        let own = ("stoa-cache-control", "max-age=30");
        // (lines, the max-age read, whether from a targeted field, what it is)
        let cases: [(Lines, Option<u64>, bool, &str); 12] = [
            (vec![cc], Some(10), false, "Cache-Control alone"),
            (
                vec![cc, cdn],
                Some(20),
                true,
                "CDN-Cache-Control beats Cache-Control",
            ),
            (
                vec![cc, cdn, own],
                Some(30),
                true,
                "stoa's field beats both",
            ),
            (
                vec![own, cc],
                Some(30),
                true,
                "whatever the order of the lines",
            ),
            (
                vec![cc, cdn, ("stoa-cache-control", "max-age=30, Max-Age=1")],
                Some(20),
                true,
                "an invalid Dictionary (upper case key) falls back to the next target",
            ),
            (
                vec![cc, ("cdn-cache-control", "max-age=\"20")],
                Some(10),
                false,
                "an invalid CDN-Cache-Control falls back to Cache-Control",
            ),
            (
                vec![cc, ("cdn-cache-control", ""), ("stoa-cache-control", " ")],
                Some(10),
                false,
                "empty targeted fields are ignored",
            ),
            (
                vec![cc, ("cdn-cache-control", "public")],
                None,
                true,
                "a targeted field without max-age: Cache-Control's is not read",
            ),
            (
                vec![cc, ("stoa-cache-control", "max-age=\"30\"")],
                Some(0),
                true,
                "a String max-age is not delta-seconds: stale",
            ),
            (
                vec![cc, ("stoa-cache-control", "max-age=-5")],
                Some(0),
                true,
                "a negative max-age: stale",
            ),
            (
                vec![cc, ("stoa-cache-control", "max-age=30;foo=bar")],
                Some(30),
                true,
                "parameters are ignored",
            ),
            (
                vec![
                    cc,
                    ("stoa-cache-control", "public"),
                    ("stoa-cache-control", "max-age=40"),
                ],
                Some(40),
                true,
                "the lines of a field make one Dictionary",
            ),
        ];
        for (lines, max_age, targeted, why) in cases {
            let d = Directives::parse_for(&head(&lines), &stoa());
            assert_eq!((d.max_age, d.targeted), (max_age, targeted), "{why}");
            assert_eq!(d.must_revalidate, !targeted, "{why}");
        }
        // A targeted field that states no lifetime gives none: `Expires` is not read.
        let h = head(&[("expires", &far), ("cdn-cache-control", "public")]);
        let d = Directives::parse_for(&h, &stoa());
        assert!(d.public && d.targeted);
        assert_eq!(d.lifetime(&h, 0), None);
        let h = head(&[("expires", &far)]);
        assert!(Directives::parse_for(&h, &stoa()).lifetime(&h, 0) > Some(secs(500)));
        // Another name on the list: `stoa-cache-control` is then just another field.
        let edge = HeaderName::from_static("edge-control");
        let h = head(&[own, ("edge-control", "s-maxage=5"), cdn]);
        let d = Directives::parse_for(&h, &edge);
        assert_eq!((d.s_maxage, d.max_age), (Some(5), None));
        assert_eq!(Directives::parse_for(&h, &stoa()).max_age, Some(30));
    }

    #[test]
    fn storing_decisions_come_from_the_targeted_field_too() {
        let not_storable =
            |lines: &[(&str, &str)]| Directives::parse_for(&head(lines), &stoa()).not_storable();
        let cases = [
            (
                vec![("cache-control", "no-store")],
                Some(NotStored::NoStore),
            ),
            (
                vec![("cache-control", "private, max-age=5")],
                Some(NotStored::Private),
            ),
            (
                vec![("cache-control", "private, no-store")],
                Some(NotStored::NoStore),
            ),
            (vec![("cache-control", "private=\"x-a\"")], None),
            (
                vec![
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "no-store"),
                ],
                Some(NotStored::NoStore),
            ),
            (
                vec![
                    ("cache-control", "max-age=60"),
                    ("stoa-cache-control", "private"),
                ],
                Some(NotStored::Private),
            ),
            // The targeted field allows what Cache-Control forbids browsers.
            (
                vec![
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=60"),
                ],
                None,
            ),
            (
                vec![
                    ("cache-control", "private"),
                    ("stoa-cache-control", "max-age=60"),
                ],
                None,
            ),
            // `no-store=?0` is false; a malformed value still forbids.
            (vec![("stoa-cache-control", "no-store=?0")], None),
            (
                vec![("stoa-cache-control", "no-store=1")],
                Some(NotStored::NoStore),
            ),
        ];
        for (lines, why) in cases {
            assert_eq!(not_storable(&lines), why, "{lines:?}");
        }
        let d = Directives::parse_for(
            &head(&[(
                "stoa-cache-control",
                "no-cache=\"Set-Cookie, X-A\", private=\"x-b\", proxy-revalidate, \
                 stale-while-revalidate=5, stale-if-error=7, s-maxage=9, public=?0",
            )]),
            &stoa(),
        );
        assert!(!d.no_cache && !d.private && !d.public && d.must_revalidate);
        assert_eq!(d.no_cache_fields, ["set-cookie", "x-a", "x-b"]);
        assert_eq!(
            (d.stale_while_revalidate, d.stale_if_error, d.s_maxage),
            (Some(5), Some(7), Some(9))
        );
        let d = Directives::parse_for(&head(&[("cdn-cache-control", "no-cache")]), &stoa());
        assert!(d.no_cache && d.no_cache_fields.is_empty());
    }

    #[test]
    fn heuristic_freshness_is_a_tenth_since_last_modified_capped_by_the_ttl() {
        let date = SystemTime::UNIX_EPOCH + secs(1_700_000_000);
        let at = |ago: u64| httpdate::fmt_http_date(date - secs(ago));
        let now = httpdate::fmt_http_date(date);
        let ttl = secs(60);
        let lifetime = |lines: &[(&str, &str)], status: u16, silent: Silent| {
            let h = head(lines);
            let upstream_age = lines
                .iter()
                .find(|(n, _)| *n == "age")
                .map_or(0, |(_, v)| v.parse().unwrap());
            Directives::parse_for(&h, &stoa()).origin_lifetime(
                &h,
                upstream_age,
                status,
                ttl,
                silent,
            )
        };
        use Lifetime::{Fresh, Revalidate, Unstorable};
        use Silent::{Heuristic, Ttl};
        let (lm_100, lm_2h) = (at(100), at(7200));
        let cases = [
            (
                vec![("date", &*now), ("last-modified", &*lm_100)],
                200,
                Heuristic,
                Fresh(secs(10)),
            ),
            (
                vec![("date", &*now), ("last-modified", &*lm_2h)],
                200,
                Heuristic,
                Fresh(ttl),
            ),
            (
                vec![("date", &*now), ("last-modified", &*lm_100), ("age", "4")],
                200,
                Heuristic,
                Fresh(secs(6)),
            ),
            (
                vec![("date", &*now), ("last-modified", &*lm_100), ("age", "10")],
                200,
                Heuristic,
                Revalidate,
            ),
            (
                vec![("date", &*now), ("last-modified", &*now)],
                200,
                Heuristic,
                Revalidate,
            ),
            // A Last-Modified after the Date, or not a date: nothing to go on.
            (
                vec![("date", &*lm_100), ("last-modified", &*now)],
                200,
                Heuristic,
                Revalidate,
            ),
            (
                vec![("last-modified", "yesterday")],
                200,
                Heuristic,
                Revalidate,
            ),
            (vec![("etag", "\"a\"")], 200, Heuristic, Revalidate),
            (vec![], 200, Ttl, Fresh(ttl)),
            (
                vec![("date", &*now), ("last-modified", &*lm_100)],
                200,
                Ttl,
                Fresh(ttl),
            ),
            // What the answer states comes first, in both modes.
            (
                vec![("cache-control", "max-age=3"), ("last-modified", &*lm_2h)],
                200,
                Heuristic,
                Fresh(secs(3)),
            ),
            (
                vec![("cdn-cache-control", "max-age=0")],
                302,
                Heuristic,
                Fresh(Duration::ZERO),
            ),
            // Not heuristically cacheable: storable only when marked public.
            (
                vec![("date", &*now), ("last-modified", &*lm_100)],
                302,
                Heuristic,
                Unstorable,
            ),
            (
                vec![
                    ("date", &*now),
                    ("last-modified", &*lm_100),
                    ("cache-control", "public"),
                ],
                302,
                Heuristic,
                Fresh(secs(10)),
            ),
            (
                vec![
                    ("date", &*now),
                    ("last-modified", &*lm_100),
                    ("stoa-cache-control", "public"),
                ],
                302,
                Heuristic,
                Fresh(secs(10)),
            ),
            (
                vec![("date", &*now), ("last-modified", &*lm_100)],
                302,
                Ttl,
                Fresh(ttl),
            ),
        ];
        for (lines, status, silent, expect) in cases {
            assert_eq!(
                lifetime(&lines, status, silent),
                expect,
                "{status} {silent:?} {lines:?}"
            );
        }
        // Without a Date, as of now: a tenth of the time since then.
        let since = |t: SystemTime| SystemTime::now().duration_since(t).unwrap();
        let before = since(date - secs(100)) / 10;
        let got = heuristic_lifetime(&head(&[("last-modified", &*lm_100)]), Duration::MAX);
        let after = since(date - secs(100)) / 10;
        assert!(
            got.is_some_and(|got| before <= got && got <= after),
            "{got:?}"
        );
    }

    #[test]
    fn only_heuristically_cacheable_statuses_get_a_heuristic_lifetime() {
        let date = SystemTime::UNIX_EPOCH + secs(1_700_000_000);
        let h = head(&[
            ("date", &httpdate::fmt_http_date(date)),
            ("last-modified", &httpdate::fmt_http_date(date - secs(100))),
        ]);
        let d = Directives::parse(&h);
        for status in 100..600 {
            let heuristic =
                [200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501].contains(&status);
            let expect = if heuristic {
                Lifetime::Fresh(secs(10))
            } else {
                Lifetime::Unstorable
            };
            let got = d.origin_lifetime(&h, 0, status, secs(60), Silent::Heuristic);
            assert_eq!(got, expect, "{status}");
        }
    }

    #[test]
    fn a_kept_targeted_field_comes_back_only_when_a_304_has_none() {
        let h = head(&[
            ("etag", "\"a\""),
            ("stoa-cache-control", "max-age=60"),
            ("stoa-cache-control", "public"),
        ]);
        let v = Validators::of(&h).unwrap().keeping(&stoa(), &h);
        let mut merged = head(&[("cache-control", "max-age=0")]);
        v.restore_targeted(&mut merged);
        assert_eq!(merged["stoa-cache-control"], "max-age=60, public");
        let mut own = head(&[("stoa-cache-control", "max-age=5")]);
        v.restore_targeted(&mut own);
        assert_eq!(own.get_all("stoa-cache-control").iter().count(), 1);
        assert_eq!(own["stoa-cache-control"], "max-age=5");
        let none = Validators::of(&h).unwrap().keeping(&stoa(), &head(&[]));
        assert!(none.targeted.is_none());
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
