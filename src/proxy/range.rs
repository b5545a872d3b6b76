//! Byte ranges of answers from the cache (RFC 9110 §14): what a GET's `Range` and
//! `If-Range` ask of a stored 200, read against the representation the client gets (the
//! identity body or the compressed variant its `Accept-Encoding` picks).
//!
//! One byte range is answered `206 Partial Content` with that part; several ranges get
//! the whole answer (RFC 9110 §14.2 allows it), unless none of them overlaps the
//! representation (`416`). A `Range` that is not a valid `bytes` ranges-specifier is
//! ignored, as is one whose `If-Range` does not hold.

use http::{header, HeaderMap, HeaderValue};

use crate::cache::control::http_date;

/// How a ranged request is answered from a representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranged {
    /// The whole representation (`200`): the range is ignored.
    Whole,
    /// `206 Partial Content`: bytes `first..=last` of the `len` bytes.
    Part { first: u64, last: u64, len: u64 },
    /// `416 Range Not Satisfiable`: no range overlaps the `len` bytes.
    Unsatisfiable { len: u64 },
}

/// What the request headers `request` (which hold a `Range`) ask of a representation
/// with the headers `stored` and `len` bytes: the `If-Range` validator, when there is
/// one, must hold (RFC 9110 §13.1.5), and the representation must not refuse ranges
/// (`Accept-Ranges: none`).
pub fn select(request: &HeaderMap, stored: &HeaderMap, len: u64) -> Ranged {
    let mut lines = request.get_all(header::RANGE).iter();
    let (Some(range), None) = (lines.next(), lines.next()) else {
        // None, or two `Range` lines: no single ranges-specifier.
        return Ranged::Whole;
    };
    if let Some(if_range) = request.get(header::IF_RANGE) {
        if !if_range_holds(if_range, stored) {
            return Ranged::Whole;
        }
    }
    if stored
        .get_all(header::ACCEPT_RANGES)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"none"))
    {
        return Ranged::Whole;
    }
    parse(range.as_bytes(), len)
}

/// One range-spec (RFC 9110 §14.1.1), before it is held against a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    /// `first-last` or `first-` (to the end).
    From { first: u64, last: Option<u64> },
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

impl Spec {
    /// This range over `len` bytes.
    fn over(self, len: u64) -> Ranged {
        match self {
            Spec::From { first, .. } if first >= len => Ranged::Unsatisfiable { len },
            Spec::From { first, last } => Ranged::Part {
                first,
                last: last.map_or(len - 1, |last| last.min(len - 1)),
                len,
            },
            Spec::Suffix(0) => Ranged::Unsatisfiable { len },
            // Satisfiable, but there is no byte to send: the whole (empty) answer.
            Spec::Suffix(_) if len == 0 => Ranged::Whole,
            Spec::Suffix(n) => Ranged::Part {
                first: len.saturating_sub(n),
                last: len - 1,
                len,
            },
        }
    }
}

/// What the `Range` value `value` asks of `len` bytes (RFC 9110 §14.1.2): a part for one
/// valid byte range, the whole for several (unless none is satisfiable), and the whole
/// for anything that is not a valid `bytes` ranges-specifier.
pub fn parse(value: &[u8], len: u64) -> Ranged {
    let Ok(value) = std::str::from_utf8(value) else {
        return Ranged::Whole;
    };
    let Some((unit, set)) = value.trim_matches(OWS).split_once('=') else {
        return Ranged::Whole;
    };
    if !unit.eq_ignore_ascii_case("bytes") {
        return Ranged::Whole;
    }
    let mut answer = None;
    // A list (RFC 9110 §5.6.1): whitespace around its elements, empty elements skipped.
    for spec in set.split(',').map(|s| s.trim_matches(OWS)) {
        if spec.is_empty() {
            continue;
        }
        let Some(spec) = spec_of(spec) else {
            return Ranged::Whole;
        };
        let ranged = spec.over(len);
        answer = Some(match (answer, ranged) {
            (None, _) => ranged,
            // Several ranges: unsatisfiable if none overlaps, else the whole answer.
            (Some(before @ Ranged::Unsatisfiable { .. }), Ranged::Unsatisfiable { .. }) => before,
            (Some(_), _) => Ranged::Whole,
        });
    }
    answer.unwrap_or(Ranged::Whole)
}

/// Optional whitespace (RFC 9110 §5.6.3).
const OWS: [char; 2] = [' ', '\t'];

fn spec_of(spec: &str) -> Option<Spec> {
    let (first, last) = spec.split_once('-')?;
    if first.is_empty() {
        return Some(Spec::Suffix(digits(last)?));
    }
    let first = digits(first)?;
    if last.is_empty() {
        return Some(Spec::From { first, last: None });
    }
    let last = digits(last)?;
    // RFC 9110 §14.1.1: a last-pos before the first-pos makes the whole set invalid.
    (last >= first).then_some(Spec::From {
        first,
        last: Some(last),
    })
}

/// `1*DIGIT` as a number, past `u64::MAX` kept at it (a position past any length).
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// Whether the `If-Range` validator `value` holds for the representation with the
/// headers `stored` (RFC 9110 §13.1.5): a strong entity tag equal to its strong `ETag`,
/// or an HTTP-date equal to its `Last-Modified`. A weak tag never holds.
pub fn if_range_holds(value: &HeaderValue, stored: &HeaderMap) -> bool {
    let asked = value.as_bytes().trim_ascii();
    if asked.starts_with(b"\"") {
        return is_entity_tag(asked)
            && stored
                .get(header::ETAG)
                .is_some_and(|etag| etag.as_bytes().trim_ascii() == asked);
    }
    if asked.starts_with(b"W/") {
        return false;
    }
    match (
        http_date(value),
        stored.get(header::LAST_MODIFIED).and_then(http_date),
    ) {
        (Some(asked), Some(modified)) => asked == modified,
        _ => false,
    }
}

/// A strong entity tag: `"` opaque characters `"`.
fn is_entity_tag(tag: &[u8]) -> bool {
    tag.len() >= 2
        && tag.starts_with(b"\"")
        && tag.ends_with(b"\"")
        && !tag[1..tag.len() - 1].contains(&b'"')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(first: u64, last: u64, len: u64) -> Ranged {
        Ranged::Part { first, last, len }
    }

    const WHOLE: Ranged = Ranged::Whole;

    fn none(len: u64) -> Ranged {
        Ranged::Unsatisfiable { len }
    }

    #[test]
    fn one_byte_range_is_a_part_of_the_length() {
        let cases = [
            ("bytes=0-0", 10, part(0, 0, 10)),
            ("bytes=0-9", 10, part(0, 9, 10)),
            ("bytes=2-5", 10, part(2, 5, 10)),
            ("bytes=2-", 10, part(2, 9, 10)),
            ("bytes=9-", 10, part(9, 9, 10)),
            ("bytes=3-100", 10, part(3, 9, 10)),
            ("bytes=-1", 10, part(9, 9, 10)),
            ("bytes=-5", 3, part(0, 2, 3)),
            ("bytes=-3", 3, part(0, 2, 3)),
            ("BYTES=1-1", 3, part(1, 1, 3)),
            ("Bytes=1-", 3, part(1, 2, 3)),
            // Whitespace around list elements, empty elements.
            ("bytes= 1-2 ", 10, part(1, 2, 10)),
            ("bytes=\t1-2", 10, part(1, 2, 10)),
            ("bytes=1-2,", 10, part(1, 2, 10)),
            ("bytes=, ,1-2", 10, part(1, 2, 10)),
            (" bytes=1-2", 10, part(1, 2, 10)),
            // Numbers past u64: a last past the end, a suffix longer than the body.
            ("bytes=0-99999999999999999999999", 10, part(0, 9, 10)),
            ("bytes=-99999999999999999999999", 10, part(0, 9, 10)),
            ("bytes=0-18446744073709551615", 4, part(0, 3, 4)),
            ("bytes=007-008", 10, part(7, 8, 10)),
        ];
        for (value, len, want) in cases {
            assert_eq!(parse(value.as_bytes(), len), want, "{value} of {len}");
        }
    }

    #[test]
    fn ranges_past_the_end_are_unsatisfiable() {
        let cases = [
            ("bytes=5-", 5, none(5)),
            ("bytes=5-9", 5, none(5)),
            ("bytes=-0", 5, none(5)),
            ("bytes=0-", 0, none(0)),
            ("bytes=99999999999999999999999-", 10, none(10)),
            ("bytes=18446744073709551615-", 10, none(10)),
            ("bytes=5-6,7-", 5, none(5)),
            ("bytes=-0,9-", 5, none(5)),
        ];
        for (value, len, want) in cases {
            assert_eq!(parse(value.as_bytes(), len), want, "{value} of {len}");
        }
    }

    #[test]
    fn several_ranges_and_invalid_or_foreign_ones_get_the_whole() {
        let cases = [
            // Several ranges, at least one satisfiable.
            ("bytes=0-1,5-6", 10),
            ("bytes=0-1, 20-30", 10),
            ("bytes=20-30,-2", 10),
            ("bytes=0-0,0-0", 10),
            // Invalid: the whole header is ignored.
            ("bytes=1-0", 10),
            ("bytes=0-1,3-2", 10),
            ("bytes=5", 10),
            ("bytes=-", 10),
            ("bytes=", 10),
            ("bytes=,", 10),
            ("bytes=--1", 10),
            ("bytes=a-b", 10),
            ("bytes=+1-2", 10),
            ("bytes=1 -2", 10),
            ("bytes=1- 2", 10),
            ("bytes=0x1-2", 10),
            ("bytes = 1-2", 10),
            ("bytes", 10),
            ("", 10),
            ("1-2", 10),
            // Another unit.
            ("items=0-1", 10),
            ("bytes2=0-1", 10),
            // A suffix of an empty body: nothing to send but the empty whole.
            ("bytes=-5", 0),
        ];
        for (value, len) in cases {
            assert_eq!(parse(value.as_bytes(), len), WHOLE, "{value} of {len}");
        }
        assert_eq!(parse(b"bytes=\xff0-1", 10), WHOLE, "not UTF-8");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const MODIFIED: &str = "Tue, 15 Nov 1994 08:12:31 GMT";

    #[test]
    fn if_range_holds_for_an_equal_strong_tag_or_the_exact_date() {
        let stored = headers(&[("etag", "\"v1\""), ("last-modified", MODIFIED)]);
        let holds = |v: &str| if_range_holds(&HeaderValue::from_str(v).unwrap(), &stored);
        assert!(holds("\"v1\""));
        assert!(holds(" \"v1\" "));
        assert!(!holds("\"v2\""));
        assert!(!holds("W/\"v1\""), "a weak tag never holds");
        assert!(!holds("\"v1\", \"v2\""), "a list is not one tag");
        assert!(!holds("\"v1"));
        assert!(holds(MODIFIED));
        assert!(holds("Tuesday, 15-Nov-94 08:12:31 GMT"), "the same date");
        assert!(!holds("Tue, 15 Nov 1994 08:12:32 GMT"), "a later date");
        assert!(!holds("Tue, 15 Nov 1994 08:12:30 GMT"), "an earlier date");
        assert!(!holds("yesterday"));

        // A weak stored tag never matches strongly; no Last-Modified: no date holds.
        let weak = headers(&[("etag", "W/\"v1\"")]);
        let holds = |v: &str| if_range_holds(&HeaderValue::from_str(v).unwrap(), &weak);
        assert!(!holds("\"v1\""));
        assert!(!holds("W/\"v1\""));
        assert!(!holds(MODIFIED));
    }

    #[test]
    fn select_reads_if_range_accept_ranges_and_one_range_line() {
        let stored = headers(&[("etag", "\"v1\""), ("accept-ranges", "bytes")]);
        let select_with =
            |pairs: &[(&str, &str)], stored: &HeaderMap| select(&headers(pairs), stored, 10);
        assert_eq!(
            select_with(&[("range", "bytes=1-2")], &stored),
            part(1, 2, 10)
        );
        assert_eq!(
            select_with(&[("range", "bytes=1-2"), ("if-range", "\"v1\"")], &stored),
            part(1, 2, 10)
        );
        assert_eq!(
            select_with(&[("range", "bytes=1-2"), ("if-range", "\"v0\"")], &stored),
            WHOLE
        );
        // A failed If-Range sends the whole, even for a range past the end.
        assert_eq!(
            select_with(&[("range", "bytes=20-"), ("if-range", "\"v0\"")], &stored),
            WHOLE
        );
        assert_eq!(
            select_with(&[("range", "bytes=20-"), ("if-range", "\"v1\"")], &stored),
            none(10)
        );
        assert_eq!(
            select_with(&[("range", "bytes=1-2"), ("range", "bytes=3-4")], &stored),
            WHOLE,
            "two Range lines"
        );
        assert_eq!(select_with(&[], &stored), WHOLE);
        let refused = headers(&[("accept-ranges", "None")]);
        assert_eq!(select_with(&[("range", "bytes=1-2")], &refused), WHOLE);
    }
}
