//! Cache keys: route name, method, rewritten path, and the variant: chosen query
//! parameters, canonical JSON of the chosen body fields (or the whole body) and chosen
//! headers.
//!
//! Canonical JSON has its object keys sorted and no insignificant white space, with
//! numbers as parsed, so `{"customer_id":"a"}` and `{ "customer_id" : "a" }` share a key.
//!
//! A route that learned from its upstream's `Vary` which request headers its answers depend
//! on (see [`crate::cache::vary`]) adds their normalised values after all that: the key
//! without them is the key's *base*, the same for every variant of one request.

use std::hash::{BuildHasher, Hash, Hasher};
use std::ops::Range;
use std::sync::LazyLock;

use http::{HeaderMap, HeaderName, Method};
use quick_cache::DefaultHashBuilder;
use serde_json::Value;

use crate::config::{KeyBody, KeyQuery};
use crate::error::StoaError;

/// Separates the parts of a key; cannot occur in a path, an encoded query or a header name.
const SEP: char = '\n';

/// Hashes every key once, when it is made; seeded once per process.
static HASHER: LazyLock<DefaultHashBuilder> = LazyLock::new(DefaultHashBuilder::default);

/// Opens the learned-vary part of a key; cannot begin a header name, so it cannot be
/// mistaken for a key header's line.
const VARY_MARK: &str = "@vary";

/// A cache key: route, method, path and variant, held in one string (one allocation, as
/// a request's key is made on every request) with where each part lies, and its hash.
#[derive(Debug, Clone)]
pub struct CacheKey {
    text: String,
    route: Range<usize>,
    path: Range<usize>,
    body: Range<usize>,
    /// The end of the base: the key without its learned-vary part.
    base: usize,
    /// How many of the route's learned vary headers the key holds.
    varied: u8,
    hash: u64,
}

impl CacheKey {
    /// The route name.
    pub fn route(&self) -> &str {
        &self.text[self.route.clone()]
    }

    /// The rewritten (upstream) path the key was made for.
    pub fn path(&self) -> &str {
        &self.text[self.path.clone()]
    }

    /// The canonical JSON body the key holds ("" on routes that do not key on the body):
    /// what a shared fetch sends.
    pub fn body(&self) -> &str {
        &self.text[self.body.clone()]
    }

    /// The whole key, as every node derives it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The key without the values of learned vary headers: shared by every variant of
    /// one request (what an exact-request purge names). The whole key when it has none.
    pub fn base(&self) -> &str {
        &self.text[..self.base]
    }

    /// The learned-vary part ("" when the key has none).
    pub fn vary_part(&self) -> &str {
        &self.text[self.base..]
    }

    /// How many of its route's learned vary headers the key holds (a route's learned list
    /// only grows: fewer than the route has means the key was made before it learned more).
    pub fn varied(&self) -> usize {
        usize::from(self.varied)
    }

    /// The names of the learned vary headers the key holds.
    pub fn vary_names(&self) -> impl Iterator<Item = &str> {
        self.vary_part()
            .split(SEP)
            .skip(1)
            .filter_map(|line| line.split_once('=').map(|(name, _)| name))
    }

    /// The key of the same request with the values of `learned` (all the route's learned
    /// vary headers) taken from `headers`, in place of those it holds.
    pub fn with_vary(&self, learned: &[HeaderName], headers: &HeaderMap) -> CacheKey {
        let mut text = String::with_capacity(self.base + vary_len(learned, headers));
        text.push_str(self.base());
        push_vary(&mut text, learned, headers);
        CacheKey {
            hash: HASHER.hash_one(text.as_str()),
            text,
            route: self.route.clone(),
            path: self.path.clone(),
            body: self.body.clone(),
            base: self.base,
            varied: varied_count(learned),
        }
    }

    /// Bytes held, for weighing entries.
    pub fn byte_len(&self) -> usize {
        self.text.len()
    }
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.text == other.text
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The inputs of a key, borrowed from the request.
pub struct KeyParts<'a> {
    pub route: &'a str,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub body: &'a [u8],
    pub headers: &'a HeaderMap,
}

/// Derives the key; a body that is not valid JSON on a body-keyed route is a 400.
/// `learned`: the vary headers the route learned (none on most routes), whose normalised
/// values end the key.
pub fn derive(
    parts: &KeyParts<'_>,
    key_query: &KeyQuery,
    key_body: &KeyBody,
    key_headers: &[HeaderName],
    learned: &[HeaderName],
) -> Result<CacheKey, StoaError> {
    let mut key = String::with_capacity(
        parts.route.len() + parts.path.len() + 64 + vary_len(learned, parts.headers),
    );
    key.push_str(parts.route);
    let route = 0..key.len();
    key.push(SEP);
    // HEAD is answered from the GET entry.
    let method = if parts.method == Method::HEAD {
        "GET"
    } else {
        parts.method.as_str()
    };
    key.push_str(method);
    key.push(SEP);
    let path_start = key.len();
    key.push_str(parts.path);
    let path = path_start..key.len();
    key.push(SEP);
    push_query(&mut key, parts.query, key_query);
    key.push(SEP);
    let body_start = key.len();
    push_body(&mut key, parts.body, key_body)?;
    let body = body_start..key.len();
    key.push(SEP);
    for name in key_headers {
        key.push_str(name.as_str());
        key.push('=');
        let mut first = true;
        for value in parts.headers.get_all(name) {
            if !first {
                key.push(',');
            }
            first = false;
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
        key.push(SEP);
    }
    let base = key.len();
    push_vary(&mut key, learned, parts.headers);
    Ok(CacheKey {
        hash: HASHER.hash_one(key.as_str()),
        text: key,
        route,
        path,
        body,
        base,
        varied: varied_count(learned),
    })
}

/// Request headers whose values are compared without regard to case: their normalised
/// values are lower-cased (language tags, media types, charsets, origins' scheme and host).
const CASE_INSENSITIVE: [&str; 4] = ["accept", "accept-charset", "accept-language", "origin"];

fn varied_count(learned: &[HeaderName]) -> u8 {
    u8::try_from(learned.len()).unwrap_or(u8::MAX)
}

/// At least the bytes [`push_vary`] writes, so the key is allocated once.
fn vary_len(learned: &[HeaderName], headers: &HeaderMap) -> usize {
    if learned.is_empty() {
        return 0;
    }
    let values: usize = learned
        .iter()
        .map(|name| {
            let lines: usize = headers.get_all(name).iter().map(|v| v.len() + 1).sum();
            // Lossy decoding may write 3 bytes for one.
            name.as_str().len() + 2 + 3 * lines
        })
        .sum();
    VARY_MARK.len() + 1 + values
}

/// Writes the learned-vary part: a mark line, then `name=value` per learned header, its
/// value normalised: the field lines joined by `,`, each list element trimmed, runs of
/// white space in it made one space, empty elements left out, and lower-cased for the
/// headers in [`CASE_INSENSITIVE`]. An absent header and an empty one are the same.
fn push_vary(key: &mut String, learned: &[HeaderName], headers: &HeaderMap) {
    if learned.is_empty() {
        return;
    }
    key.push_str(VARY_MARK);
    key.push(SEP);
    for name in learned {
        key.push_str(name.as_str());
        key.push('=');
        let lower = CASE_INSENSITIVE.contains(&name.as_str());
        let mut first = true;
        for value in headers.get_all(name) {
            let text = String::from_utf8_lossy(value.as_bytes());
            for element in text.split(',') {
                let mut words = element.split_ascii_whitespace();
                let Some(word) = words.next() else {
                    continue;
                };
                if !first {
                    key.push(',');
                }
                first = false;
                push_word(key, word, lower);
                for word in words {
                    key.push(' ');
                    push_word(key, word, lower);
                }
            }
        }
        key.push(SEP);
    }
}

fn push_word(key: &mut String, word: &str, lower: bool) {
    if lower {
        key.extend(word.chars().map(|c| c.to_ascii_lowercase()));
    } else {
        key.push_str(word);
    }
}

/// The upstream path of a key's text (as [`CacheKey::path`] gives it), for those that hold
/// only the text.
pub fn path_of_text(text: &str) -> Option<&str> {
    text.split(SEP).nth(2)
}

fn push_query(key: &mut String, query: Option<&str>, which: &KeyQuery) {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return;
    };
    let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(name, _)| match which {
            KeyQuery::All => true,
            KeyQuery::Only(names) => names.iter().any(|n| n == name),
        })
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect();
    // Stable: repeated parameters keep their relative order.
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let encoded = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    key.push_str(&encoded);
}

fn push_body(key: &mut String, body: &[u8], which: &KeyBody) -> Result<(), StoaError> {
    let fields = match which {
        KeyBody::None => return Ok(()),
        KeyBody::Whole => None,
        KeyBody::Fields(fields) => Some(fields),
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(StoaError::BadRequest(
            "this route needs a JSON request body".into(),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| StoaError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    let canonical = match fields {
        None => value,
        Some(fields) => {
            let Value::Object(mut object) = value else {
                return Err(StoaError::BadRequest(
                    "request body must be a JSON object".into(),
                ));
            };
            // A field left out stays out: it is not the same request as an explicit null.
            let chosen: serde_json::Map<String, Value> = fields
                .iter()
                .filter_map(|f| Some((f.clone(), object.remove(f)?)))
                .collect();
            Value::Object(chosen)
        }
    };
    // serde_json's map is ordered by key, so this writes canonical JSON.
    key.push_str(&canonical.to_string());
    Ok(())
}

/// The key of a GET of `path` on `route`, with no variant.
#[cfg(test)]
pub fn test_key(route: &str, path: &str) -> CacheKey {
    let headers = HeaderMap::new();
    let parts = KeyParts {
        route,
        method: &Method::GET,
        path,
        query: None,
        body: b"",
        headers: &headers,
    };
    derive(&parts, &KeyQuery::All, &KeyBody::None, &[], &[]).expect("a key without a body")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(
        path: &str,
        query: Option<&str>,
        body: &str,
        kq: KeyQuery,
        kb: KeyBody,
    ) -> Result<CacheKey, StoaError> {
        let headers = HeaderMap::new();
        derive(
            &KeyParts {
                route: "r",
                method: &Method::GET,
                path,
                query,
                body: body.as_bytes(),
                headers: &headers,
            },
            &kq,
            &kb,
            &[],
            &[],
        )
    }

    #[test]
    fn canonical_json_ignores_white_space_and_key_order() {
        let a = key(
            "/c",
            None,
            r#"{"customer_id":"a","x":1}"#,
            KeyQuery::All,
            KeyBody::Whole,
        )
        .unwrap();
        let b = key(
            "/c",
            None,
            "{ \"x\" : 1 ,\n \"customer_id\" : \"a\" }",
            KeyQuery::All,
            KeyBody::Whole,
        )
        .unwrap();
        assert_eq!(a, b);
        let c = key(
            "/c",
            None,
            r#"{"customer_id":"b","x":1}"#,
            KeyQuery::All,
            KeyBody::Whole,
        )
        .unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn chosen_fields_ignore_the_rest() {
        let f = || KeyBody::Fields(vec!["customer_id".into()]);
        let a = key(
            "/c",
            None,
            r#"{"customer_id":"a","noise":1}"#,
            KeyQuery::All,
            f(),
        )
        .unwrap();
        let b = key("/c", None, r#"{ "customer_id" : "a" }"#, KeyQuery::All, f()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.body(), r#"{"customer_id":"a"}"#);
        let absent = key("/c", None, r#"{"noise":1}"#, KeyQuery::All, f()).unwrap();
        let null = key("/c", None, r#"{"customer_id":null}"#, KeyQuery::All, f()).unwrap();
        assert_ne!(absent, null);
        assert_eq!(absent.body(), "{}");
        let text = key(
            "/c",
            None,
            "{\"customer_id\":\"a\\nb\"}",
            KeyQuery::All,
            f(),
        )
        .unwrap();
        assert_eq!(text.body(), "{\"customer_id\":\"a\\nb\"}");
        assert_eq!(
            key("/c", None, "x", KeyQuery::All, KeyBody::None)
                .unwrap()
                .body(),
            ""
        );
    }

    #[test]
    fn bad_or_missing_json_is_a_400() {
        let e = key("/c", None, "{nope", KeyQuery::All, KeyBody::Whole).unwrap_err();
        assert_eq!(e.status(), 400);
        let e = key("/c", None, "", KeyQuery::All, KeyBody::Whole).unwrap_err();
        assert_eq!(e.status(), 400);
        let e = key(
            "/c",
            None,
            "[1]",
            KeyQuery::All,
            KeyBody::Fields(vec!["a".into()]),
        )
        .unwrap_err();
        assert_eq!(e.status(), 400);
        // Routes that do not key on the body ignore it.
        assert!(key("/c", None, "{nope", KeyQuery::All, KeyBody::None).is_ok());
    }

    #[test]
    fn query_parameters_are_sorted_and_filtered() {
        let a = key("/p", Some("b=2&a=1"), "", KeyQuery::All, KeyBody::None).unwrap();
        let b = key("/p", Some("a=1&b=2"), "", KeyQuery::All, KeyBody::None).unwrap();
        assert_eq!(a, b);
        let only = || KeyQuery::Only(vec!["a".into()]);
        let c = key("/p", Some("a=1&utm=x"), "", only(), KeyBody::None).unwrap();
        let d = key("/p", Some("utm=y&a=1"), "", only(), KeyBody::None).unwrap();
        assert_eq!(c, d);
        let e = key("/p", Some("a=2"), "", only(), KeyBody::None).unwrap();
        assert_ne!(c, e);
        assert_eq!(c.route(), "r");
        assert_eq!(c.path(), "/p");
    }

    #[test]
    fn chosen_headers_are_part_of_the_key() {
        let mut h1 = HeaderMap::new();
        h1.insert("accept-language", "sv".parse().unwrap());
        let mut h2 = HeaderMap::new();
        h2.insert("accept-language", "en".parse().unwrap());
        let names = [HeaderName::from_static("accept-language")];
        let k = |h: &HeaderMap| {
            derive(
                &KeyParts {
                    route: "r",
                    method: &Method::GET,
                    path: "/",
                    query: None,
                    body: b"",
                    headers: h,
                },
                &KeyQuery::All,
                &KeyBody::None,
                &names,
                &[],
            )
            .unwrap()
        };
        assert_ne!(k(&h1), k(&h2));
        assert_eq!(k(&h1), k(&h1.clone()));
        assert_eq!(k(&h1).base(), k(&h1).as_str(), "no learned part");
    }

    fn learned_key(headers: &[(&str, &str)], learned: &[HeaderName]) -> CacheKey {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        derive(
            &KeyParts {
                route: "r",
                method: &Method::GET,
                path: "/p",
                query: Some("a=1"),
                body: b"",
                headers: &map,
            },
            &KeyQuery::All,
            &KeyBody::None,
            &[HeaderName::from_static("x-keyed")],
            learned,
        )
        .unwrap()
    }

    #[test]
    fn learned_headers_end_the_key_with_normalised_values() {
        let learned = [
            HeaderName::from_static("accept-language"),
            HeaderName::from_static("x-token"),
        ];
        let k = |h: &[(&str, &str)]| learned_key(h, &learned);
        let plain = learned_key(&[("x-keyed", "k")], &[]);
        let a = k(&[("x-keyed", "k"), ("accept-language", "en-US, sv;q=0.8")]);
        assert_eq!(a.base(), plain.as_str(), "the base is the key without them");
        assert_eq!(plain.base(), plain.as_str());
        assert_eq!(plain.vary_part(), "");
        assert_eq!(a.varied(), 2);
        assert_eq!(plain.varied(), 0);
        assert_eq!(
            a.vary_names().collect::<Vec<_>>(),
            ["accept-language", "x-token"]
        );
        assert_eq!(plain.vary_names().count(), 0);
        assert_eq!(
            a.vary_part(),
            "@vary\naccept-language=en-us,sv;q=0.8\nx-token=\n"
        );
        assert_eq!((a.route(), a.path()), ("r", "/p"));
        // Trimmed, white space collapsed, lower-cased, field lines joined, empties dropped.
        for same in [
            "  EN-us ,\tsv;q=0.8 ",
            "en-US,,sv;q=0.8",
            "en-us , sv;q=0.8,",
        ] {
            assert_eq!(
                k(&[("x-keyed", "k"), ("accept-language", same)]),
                a,
                "{same:?}"
            );
        }
        assert_eq!(
            k(&[
                ("x-keyed", "k"),
                ("accept-language", "en-US"),
                ("accept-language", "sv;q=0.8"),
            ]),
            a
        );
        assert_ne!(k(&[("x-keyed", "k"), ("accept-language", "sv")]), a);
        // Inner white space is kept as one space; other headers keep their case.
        let spaced = k(&[("x-token", "a   b")]);
        assert!(spaced.vary_part().contains("x-token=a b\n"));
        assert_ne!(k(&[("x-token", "A")]), k(&[("x-token", "a")]));
        // Absent and empty are the same.
        assert_eq!(k(&[("x-token", "")]), k(&[]));
        // The key headers stay in the base.
        assert_ne!(k(&[("x-keyed", "other")]).base(), a.base());
    }

    #[test]
    fn a_key_made_again_with_more_learned_headers() {
        let learned = [HeaderName::from_static("origin")];
        let mut headers = HeaderMap::new();
        headers.insert("origin", "HTTPS://A.Example".parse().unwrap());
        let before = learned_key(&[("origin", "HTTPS://A.Example")], &[]);
        let again = before.with_vary(&learned, &headers);
        let derived = learned_key(&[("origin", "HTTPS://A.Example")], &learned);
        assert_eq!(again, derived);
        assert_eq!(again.as_str(), derived.as_str());
        assert_eq!(again.varied(), 1);
        assert_eq!(again.base(), before.as_str());
        assert!(again.vary_part().ends_with("origin=https://a.example\n"));
        assert_eq!(
            again.with_vary(&learned, &HeaderMap::new()).base(),
            before.as_str(),
            "made from the base, not on top of the old values"
        );
        assert_eq!(path_of_text(again.as_str()), Some("/p"));
    }
}
