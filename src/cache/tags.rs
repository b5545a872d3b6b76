//! Cache tags (surrogate keys): names an entry is stored under besides its key, so that
//! one purge drops every answer about, say, one restaurant.
//!
//! An entry's tags come from its route (`cache.tags`, see [`crate::config::TagTemplate`])
//! and from the upstream's answer:
//!
//! - `Cache-Groups` (RFC 9875 §2): a structured-field List (RFC 8941) of Strings, each one
//!   a group. A field that does not parse is ignored whole; members that are not Strings
//!   (tokens, numbers, inner lists) are ignored, and so are parameters. The header stays in
//!   the answer: it is meant for every cache on the way.
//! - `Surrogate-Key` (space-separated) and `Cache-Tag` (comma-separated): the CDN
//!   conventions. Both are taken out of the answer before it reaches clients, as CDNs do.
//!
//! `Cache-Group-Invalidation` (RFC 9875 §3), on the answer to an unsafe request, names the
//! groups whose entries to invalidate ([`group_invalidation`]).
//!
//! Tags compare byte for byte (case-sensitively), as RFC 9875 compares groups. An entry
//! holds at most [`MAX_TAGS`] tags of at most [`MAX_TAG_BYTES`] bytes (RFC 9875 asks for at
//! least 32 of 32 characters): beyond that the first ones are kept and the rest counted.
//!
//! Structured fields are parsed with the `sfv` crate, the version pingora builds with.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use sfv::{BareItem, Item, ListEntry, Parser};

pub use crate::config::{MAX_TAGS, MAX_TAG_BYTES};

/// `Cache-Groups` (RFC 9875): read, and kept in the answer.
pub const CACHE_GROUPS: HeaderName = HeaderName::from_static("cache-groups");
/// `Cache-Group-Invalidation` (RFC 9875 §3).
pub const CACHE_GROUP_INVALIDATION: HeaderName =
    HeaderName::from_static("cache-group-invalidation");
/// `Surrogate-Key`: space-separated tags, taken out of the answer.
pub const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
/// `Cache-Tag`: comma-separated tags, taken out of the answer.
pub const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// Bytes counted for each tag beyond its text, estimated: its place in the entry's list,
/// and the entry's key in the store's tag index (under the tag, and the key's own record).
const TAG_OVERHEAD: u64 = 64;

#[derive(Clone)]
enum List {
    /// While tags are added.
    Open(Vec<Box<str>>),
    /// Once the entry is built: one allocation, shared with the store's tag index.
    Frozen(Arc<[Box<str>]>),
}

impl Default for List {
    fn default() -> Self {
        List::Open(Vec::new())
    }
}

impl List {
    fn as_slice(&self) -> &[Box<str>] {
        match self {
            List::Open(v) => v,
            List::Frozen(a) => a,
        }
    }
}

/// A bounded set of tags, in the order first added, without duplicates: at most
/// [`MAX_TAGS`] tags of at most [`MAX_TAG_BYTES`] bytes each. A tag past either bound is
/// left out and counted ([`Tags::dropped`]); an empty one is ignored.
#[derive(Clone, Default)]
pub struct Tags {
    list: List,
    dropped: u32,
}

impl Tags {
    pub fn new() -> Self {
        Tags::default()
    }

    /// Adds `tag`; whether it was added (false: empty, already there, or dropped).
    pub fn insert(&mut self, tag: &str) -> bool {
        if tag.is_empty() || self.contains(tag) {
            return false;
        }
        if tag.len() > MAX_TAG_BYTES || self.len() >= MAX_TAGS {
            self.dropped = self.dropped.saturating_add(1);
            return false;
        }
        // Adding to a frozen set (rare): it is copied.
        if let List::Frozen(a) = &self.list {
            self.list = List::Open(a.to_vec());
        }
        if let List::Open(v) = &mut self.list {
            v.push(tag.into());
        }
        true
    }

    /// Makes the set compact (one shared allocation) once every tag is in; adding more
    /// still works, by copying it.
    pub fn freeze(&mut self) {
        if let List::Open(v) = &mut self.list {
            if !v.is_empty() {
                self.list = List::Frozen(std::mem::take(v).into());
            }
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.list.as_slice().iter().map(|t| &**t)
    }

    pub fn len(&self) -> usize {
        self.list.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.as_slice().is_empty()
    }

    pub fn contains(&self, tag: &str) -> bool {
        self.list.as_slice().iter().any(|t| &**t == tag)
    }

    /// Tags left out for being too long or one too many.
    pub fn dropped(&self) -> u32 {
        self.dropped
    }

    /// Bytes the tags weigh in the store: their text, and for each its slots in the entry
    /// and in the store's tag index.
    pub fn weight(&self) -> u64 {
        self.iter().map(|t| t.len() as u64 + TAG_OVERHEAD).sum()
    }

    /// The tags as the store's index keeps them beside the entry's key: the frozen list
    /// itself (no copy), `None` when there are none.
    pub(crate) fn shared(&self) -> Option<Arc<[Box<str>]>> {
        match &self.list {
            List::Frozen(a) => Some(a.clone()),
            List::Open(v) if v.is_empty() => None,
            List::Open(v) => Some(v.clone().into()),
        }
    }
}

impl<'a> Extend<&'a str> for Tags {
    fn extend<I: IntoIterator<Item = &'a str>>(&mut self, tags: I) {
        for tag in tags {
            self.insert(tag);
        }
    }
}

impl<'a> FromIterator<&'a str> for Tags {
    fn from_iter<I: IntoIterator<Item = &'a str>>(tags: I) -> Self {
        let mut out = Tags::new();
        out.extend(tags);
        out
    }
}

impl PartialEq for Tags {
    fn eq(&self, other: &Self) -> bool {
        self.list.as_slice() == other.list.as_slice() && self.dropped == other.dropped
    }
}

impl Eq for Tags {}

impl fmt::Debug for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_set();
        d.entries(self.iter());
        if self.dropped > 0 {
            d.entry(&format_args!("+{} dropped", self.dropped));
        }
        d.finish()
    }
}

/// Adds the tags of an upstream answer's head to `into`: `Cache-Groups` (kept in the
/// head), then `Surrogate-Key` and `Cache-Tag` (both taken out of it, every field line).
pub fn take_upstream_tags(headers: &mut HeaderMap, into: &mut Tags) {
    for group in sf_strings(headers, &CACHE_GROUPS) {
        into.insert(&group);
    }
    if headers.contains_key(SURROGATE_KEY) {
        for value in headers.get_all(SURROGATE_KEY) {
            if let Ok(text) = std::str::from_utf8(value.as_bytes()) {
                into.extend(text.split([' ', '\t']));
            }
        }
        headers.remove(SURROGATE_KEY);
    }
    if headers.contains_key(CACHE_TAG) {
        for value in headers.get_all(CACHE_TAG) {
            if let Ok(text) = std::str::from_utf8(value.as_bytes()) {
                into.extend(text.split(',').map(|t| t.trim_matches([' ', '\t'])));
            }
        }
        headers.remove(CACHE_TAG);
    }
}

/// The groups a `Cache-Group-Invalidation` field names (RFC 9875 §3), without duplicates,
/// in order; none if the field is absent or does not parse. Only for answers to unsafe
/// methods: the caller checks the method (the RFC has caches ignore it on safe ones).
/// Groups longer than [`MAX_TAG_BYTES`] are left out: no entry carries them.
pub fn group_invalidation(headers: &HeaderMap) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for group in sf_strings(headers, &CACHE_GROUP_INVALIDATION) {
        if !group.is_empty() && group.len() <= MAX_TAG_BYTES && !groups.contains(&group) {
            groups.push(group);
        }
    }
    groups
}

/// The String members of a structured-field List header, every field line combined
/// (RFC 8941 §4.2); none if it does not parse.
fn sf_strings(headers: &HeaderMap, name: &HeaderName) -> Vec<String> {
    let mut joined = Vec::new();
    for value in headers.get_all(name) {
        let line = value.as_bytes();
        if line.iter().all(|b| *b == b' ' || *b == b'\t') {
            continue;
        }
        if !joined.is_empty() {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(line);
    }
    if joined.is_empty() {
        return Vec::new();
    }
    let Ok(list) = Parser::parse_list(&joined) else {
        return Vec::new();
    };
    list.into_iter()
        .filter_map(|member| match member {
            ListEntry::Item(Item {
                bare_item: BareItem::String(s),
                ..
            }) => Some(s),
            _ => None,
        })
        .collect()
}

/// A JSON value as a tag template's body placeholder takes it: a string's text, a number
/// or a boolean as written in JSON; `None` for null, arrays and objects (no tag).
pub fn json_tag_value(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    fn taken(fields: &[(&str, &str)]) -> (Vec<String>, HeaderMap) {
        let mut h = head(fields);
        let mut tags = Tags::new();
        take_upstream_tags(&mut h, &mut tags);
        (tags.iter().map(String::from).collect(), h)
    }

    fn groups(value: &str) -> Vec<String> {
        taken(&[("cache-groups", value)]).0
    }

    #[test]
    fn the_rfc_9875_examples() {
        // §2: a response in the "scripts" group.
        assert_eq!(groups(r#""scripts""#), ["scripts"]);
        // §3: an unsafe request's answer invalidating two groups.
        let h = head(&[(
            "cache-group-invalidation",
            r#""eurovision-results", "kylie-minogue""#,
        )]);
        assert_eq!(
            group_invalidation(&h),
            ["eurovision-results", "kylie-minogue"]
        );
        assert!(group_invalidation(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn cache_groups_are_strings_of_a_structured_list() {
        // Quoting and escapes: the string's value, not its spelling.
        assert_eq!(
            groups(r#""a b", "quote\"d", "back\\slash", "","x""#),
            ["a b", "quote\"d", "back\\slash", "x"]
        );
        // Members that are not Strings are ignored; parameters too.
        assert_eq!(
            groups(r#"token, 42, 1.5, ?1, :aGk=:, ("in" "ner"), "kept";p=1;q"#),
            ["kept"]
        );
        // A field that does not parse is ignored whole.
        for bad in [
            r#""unterminated"#,
            r#""a",, "b""#,
            r#""a", "b","#,
            r#""a" "b""#,
            r#""bad \q escape""#,
            r#""a"; "b""#,
        ] {
            assert_eq!(groups(bad), Vec::<String>::new(), "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            CACHE_GROUPS,
            HeaderValue::from_bytes("\"caf\u{e9}\"".as_bytes()).unwrap(),
        );
        let mut tags = Tags::new();
        take_upstream_tags(&mut h, &mut tags);
        assert!(tags.is_empty(), "not ASCII: not a structured field");
        // Field lines combine into one list; an empty line adds nothing, a bad one spoils
        // the whole field.
        let lines = [
            ("cache-groups", r#""a", "b""#),
            ("cache-groups", ""),
            ("cache-groups", r#""c""#),
        ];
        assert_eq!(taken(&lines).0, ["a", "b", "c"]);
        let lines = [("cache-groups", r#""a""#), ("cache-groups", "(")];
        assert!(taken(&lines).0.is_empty());
    }

    #[test]
    fn cache_groups_stay_and_cdn_headers_go() {
        let (tags, h) = taken(&[
            ("cache-groups", r#""g1", "shared""#),
            ("surrogate-key", "s1  s2\tshared"),
            ("surrogate-key", "s3"),
            ("cache-tag", " c1 ,c2,, shared ,"),
            ("cache-tag", "c3"),
            ("content-type", "application/json"),
        ]);
        assert_eq!(tags, ["g1", "shared", "s1", "s2", "s3", "c1", "c2", "c3"]);
        assert!(h.get(SURROGATE_KEY).is_none());
        assert!(h.get(CACHE_TAG).is_none());
        assert_eq!(h[CACHE_GROUPS], r#""g1", "shared""#);
        assert_eq!(h["content-type"], "application/json");
        // An answer without them is left alone.
        let (tags, h) = taken(&[("content-type", "text/plain")]);
        assert!(tags.is_empty());
        assert_eq!(h.len(), 1);
        // Headers that are not UTF-8 give no tags, and still go.
        let mut h = HeaderMap::new();
        h.insert(SURROGATE_KEY, HeaderValue::from_bytes(b"a\xffb").unwrap());
        let mut tags = Tags::new();
        take_upstream_tags(&mut h, &mut tags);
        assert!(tags.is_empty() && h.is_empty());
    }

    #[test]
    fn invalidation_ignores_what_is_not_a_group() {
        let long = "x".repeat(MAX_TAG_BYTES + 1);
        let value = format!(r#""a", token, "b", "a", "{long}", "", ("c")"#);
        let h = head(&[("cache-group-invalidation", &value)]);
        assert_eq!(group_invalidation(&h), ["a", "b"]);
        let h = head(&[("cache-group-invalidation", r#""a", "#)]);
        assert!(group_invalidation(&h).is_empty());
    }

    #[test]
    fn the_set_is_bounded_and_deduplicated() {
        let mut tags = Tags::new();
        assert!(tags.insert("a"));
        assert!(!tags.insert("a"));
        assert!(!tags.insert(""));
        assert!(tags.insert("A"), "tags are case-sensitive");
        assert!(!tags.insert(&"x".repeat(MAX_TAG_BYTES + 1)));
        assert!(tags.insert(&"x".repeat(MAX_TAG_BYTES)));
        assert_eq!(tags.dropped(), 1);
        for i in 0..100 {
            tags.insert(&format!("t{i}"));
        }
        assert_eq!(tags.len(), MAX_TAGS);
        // The first ones are kept, the others counted.
        assert!(tags.contains("t0") && tags.contains("t60"));
        assert!(!tags.contains("t61"));
        assert_eq!(tags.dropped(), 1 + 39);
        assert!(!tags.insert("a"), "a duplicate is not counted as dropped");
        assert_eq!(tags.dropped(), 40);
        let order: Vec<&str> = tags.iter().take(3).collect();
        assert_eq!(order, ["a", "A", "x".repeat(MAX_TAG_BYTES).as_str()]);
    }

    #[test]
    fn frozen_tags_are_the_same_set_and_weigh_their_bytes() {
        let mut tags: Tags = ["restaurant:42", "menus", "menus"].into_iter().collect();
        let open = tags.clone();
        tags.freeze();
        assert_eq!(tags, open);
        assert_eq!(tags.len(), 2);
        assert!(tags.contains("menus") && !tags.contains("menu"));
        assert_eq!(tags.weight(), 13 + 5 + 2 * TAG_OVERHEAD);
        let shared = tags.shared().unwrap();
        assert!(
            matches!(&tags.list, List::Frozen(a) if Arc::ptr_eq(a, &shared)),
            "the index shares the entry's list"
        );
        // Still a set after it is frozen.
        assert!(!tags.insert("menus"));
        assert!(tags.insert("more"));
        assert_eq!(tags.len(), 3);
        let mut empty = Tags::new();
        empty.freeze();
        assert!(empty.is_empty() && empty.shared().is_none() && empty.weight() == 0);
        assert_eq!(format!("{open:?}"), r#"{"restaurant:42", "menus"}"#);
    }

    #[test]
    fn body_values_as_tag_text() {
        use serde_json::json;
        assert_eq!(json_tag_value(&json!("c1")).as_deref(), Some("c1"));
        assert_eq!(json_tag_value(&json!(42)).as_deref(), Some("42"));
        assert_eq!(json_tag_value(&json!(true)).as_deref(), Some("true"));
        for none in [json!(null), json!([1]), json!({"a": 1})] {
            assert_eq!(json_tag_value(&none), None);
        }
    }
}
