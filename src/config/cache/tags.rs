//! Tag templates: the tags (surrogate keys) a cached route gives each answer it stores,
//! such as `restaurant:{id}`, compiled once from the route's `cache.tags`.
//!
//! A `{name}` placeholder names, in this order, a parameter of the route's path, a query
//! parameter listed in `key_query` or a body field listed in `key_body`: only parts of the
//! cache key, so that every request sharing an entry gives it the same tags.

use std::fmt;

use crate::routes::PathTemplate;

/// Most tags one entry carries; the first ones are kept.
pub const MAX_TAGS: usize = 64;

/// Longest tag, in bytes; a longer one is not kept.
pub const MAX_TAG_BYTES: usize = 128;

/// Where a placeholder's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagSource {
    /// A parameter (or rest capture) of the route's path template.
    Path,
    /// A query parameter named in the route's `key_query`.
    Query,
    /// A field of the JSON body named in the route's `key_body`.
    Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(Box<str>),
    Value { name: Box<str>, source: TagSource },
}

/// A compiled tag template: literal text and placeholders, each with where its value
/// comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTemplate {
    source: Box<str>,
    parts: Box<[Part]>,
}

/// What the names of a template may refer to: the parts of a route's cache key.
#[derive(Debug, Clone, Copy)]
pub struct TagScope<'a> {
    /// The route's path template; `None` when it did not parse (names are then not
    /// checked against it, nor anything else: the route is reported already).
    pub path: Option<&'a PathTemplate>,
    /// The query parameters the key holds by name (`key_query`).
    pub query: &'a [String],
    /// The body fields the key holds by name (`key_body`).
    pub body: &'a [String],
}

impl TagScope<'_> {
    fn source_of(&self, name: &str) -> Option<TagSource> {
        if self.path.is_none_or(|p| p.has_param(name)) {
            Some(TagSource::Path)
        } else if self.query.iter().any(|q| q == name) {
            Some(TagSource::Query)
        } else if self.body.iter().any(|b| b == name) {
            Some(TagSource::Body)
        } else {
            None
        }
    }
}

/// Why a tag template was rejected; a template may have several. Each reads after the
/// template's text, as `stoa check` prints it (`"r:{ide}" uses {ide}, which ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagTemplateError {
    #[error("is empty: write a tag such as \"menus\" or \"restaurant:{{id}}\"")]
    Empty,
    #[error("has unbalanced braces: write {{name}} for a value, and no other brace")]
    UnbalancedBraces,
    #[error(
        "uses {{{0}}}, which is not a name (letters, digits and '_', not starting with a digit)"
    )]
    BadName(String),
    #[error(
        "uses {{{name}}}, which names no parameter of the route's path {path:?}, no query \
         parameter listed in key_query and no body field listed in key_body (a tag is made \
         from the cache key, so that every request sharing an entry gives it the same tags)"
    )]
    UnknownName { name: String, path: String },
    #[error(
        "is {0} bytes without its placeholders; a tag is at most {MAX_TAG_BYTES} bytes \
         (longer ones are not kept)"
    )]
    TooLong(usize),
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl TagTemplate {
    /// Compiles `source`, every name looked up in `scope`; every problem it has, if any.
    /// `{*rest}` is read as `{rest}`, as in rewrite templates.
    pub fn parse(source: &str, scope: &TagScope<'_>) -> Result<Self, Vec<TagTemplateError>> {
        if source.is_empty() {
            return Err(vec![TagTemplateError::Empty]);
        }
        let mut errors = Vec::new();
        let mut parts = Vec::new();
        let mut literal_bytes = 0;
        let mut rest = source;
        let mut balanced = true;
        while !rest.is_empty() {
            let Some(open) = rest.find(['{', '}']) else {
                literal_bytes += rest.len();
                parts.push(Part::Text(rest.into()));
                break;
            };
            if open > 0 {
                literal_bytes += open;
                parts.push(Part::Text(rest[..open].into()));
            }
            let after = &rest[open + 1..];
            let close = after.find(['{', '}']);
            match (rest.as_bytes()[open], close) {
                (b'{', Some(close)) if after.as_bytes()[close] == b'}' => {
                    let inner = &after[..close];
                    let name = inner.strip_prefix('*').unwrap_or(inner);
                    if !valid_name(name) {
                        errors.push(TagTemplateError::BadName(inner.to_string()));
                    } else {
                        match scope.source_of(name) {
                            Some(source) => parts.push(Part::Value {
                                name: name.into(),
                                source,
                            }),
                            None => errors.push(TagTemplateError::UnknownName {
                                name: name.to_string(),
                                path: scope
                                    .path
                                    .map(|p| p.as_str().to_string())
                                    .unwrap_or_default(),
                            }),
                        }
                    }
                    rest = &after[close + 1..];
                }
                // A `}` first, a `{` inside a placeholder or one never closed.
                _ => {
                    balanced = false;
                    break;
                }
            }
        }
        if !balanced {
            errors.insert(0, TagTemplateError::UnbalancedBraces);
        } else if literal_bytes > MAX_TAG_BYTES {
            errors.push(TagTemplateError::TooLong(literal_bytes));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(TagTemplate {
            source: source.into(),
            parts: parts.into(),
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The placeholders, in order, with where each value comes from.
    pub fn placeholders(&self) -> impl Iterator<Item = (&str, TagSource)> {
        self.parts.iter().filter_map(|p| match p {
            Part::Value { name, source } => Some((&**name, *source)),
            Part::Text(_) => None,
        })
    }

    /// Whether some placeholder takes its value from `source` (e.g. whether the body is
    /// needed at all).
    pub fn uses(&self, source: TagSource) -> bool {
        self.placeholders().any(|(_, s)| s == source)
    }

    /// The tag for one request: each placeholder filled by the function of its source
    /// (`path`: the match's captures; `query`: the decoded value of a query parameter;
    /// `body`: a JSON field as text), values inserted as given. `None` when a value is
    /// absent: then the request's entry does not get this tag. The length is not checked
    /// here: the entry's tag set leaves out a tag that is too long.
    pub fn render<'p>(
        &self,
        path: impl Fn(&str) -> Option<&'p str>,
        query: impl Fn(&str) -> Option<String>,
        body: impl Fn(&str) -> Option<String>,
    ) -> Option<String> {
        let mut out = String::with_capacity(self.source.len() + 16);
        for part in self.parts.iter() {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Value { name, source } => match source {
                    TagSource::Path => out.push_str(path(name)?),
                    TagSource::Query => out.push_str(&query(name)?),
                    TagSource::Body => out.push_str(&body(name)?),
                },
            }
        }
        Some(out)
    }
}

impl fmt::Display for TagTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope_parse(
        source: &str,
        path: &str,
        query: &[&str],
        body: &[&str],
    ) -> Result<TagTemplate, Vec<TagTemplateError>> {
        let path = PathTemplate::parse(path).unwrap();
        let query: Vec<String> = query.iter().map(|s| s.to_string()).collect();
        let body: Vec<String> = body.iter().map(|s| s.to_string()).collect();
        let scope = TagScope {
            path: Some(&path),
            query: &query,
            body: &body,
        };
        TagTemplate::parse(source, &scope)
    }

    fn parse(source: &str) -> Result<TagTemplate, Vec<TagTemplateError>> {
        scope_parse(source, "/r/{id}/{*rest}", &["city"], &["customer_id"])
    }

    #[test]
    fn names_resolve_to_path_then_query_then_body() {
        let t = parse("r:{id}:{city}:{customer_id}:{*rest}").unwrap();
        let sources: Vec<_> = t.placeholders().collect();
        assert_eq!(
            sources,
            [
                ("id", TagSource::Path),
                ("city", TagSource::Query),
                ("customer_id", TagSource::Body),
                ("rest", TagSource::Path),
            ]
        );
        assert!(t.uses(TagSource::Body));
        // A name both in the path and in key_query is the path's.
        let t = scope_parse("{id}", "/r/{id}", &["id"], &["id"]).unwrap();
        assert_eq!(t.placeholders().next(), Some(("id", TagSource::Path)));
        let t = scope_parse("{id}", "/r", &["id"], &["id"]).unwrap();
        assert_eq!(t.placeholders().next(), Some(("id", TagSource::Query)));
        assert!(!t.uses(TagSource::Body));
        assert_eq!(parse("menus").unwrap().placeholders().count(), 0);
        assert_eq!(parse("menus").unwrap().to_string(), "menus");
    }

    #[test]
    fn render_fills_each_placeholder_from_its_source() {
        let t = parse("r:{id}/{city}/{customer_id}").unwrap();
        let tag = t.render(
            |n| (n == "id").then_some("42"),
            |n| (n == "city").then(|| "uppsala".to_string()),
            |n| (n == "customer_id").then(|| "c1".to_string()),
        );
        assert_eq!(tag.as_deref(), Some("r:42/uppsala/c1"));
        // An absent value: no tag.
        let none = t.render(|_| Some("42"), |_| None, |_| Some("c1".into()));
        assert_eq!(none, None);
        assert_eq!(
            parse("menus")
                .unwrap()
                .render(|_| None, |_| None, |_| None)
                .as_deref(),
            Some("menus")
        );
        // Values are inserted as given, braces and all.
        let t = parse("{id}").unwrap();
        assert_eq!(
            t.render(|_| Some("{x}"), |_| None, |_| None).as_deref(),
            Some("{x}")
        );
    }

    #[test]
    fn every_problem_of_a_template_is_reported() {
        let unknown = |name: &str| TagTemplateError::UnknownName {
            name: name.into(),
            path: "/r/{id}/{*rest}".into(),
        };
        assert_eq!(parse(""), Err(vec![TagTemplateError::Empty]));
        assert_eq!(
            parse("a:{nope}:{id}:{other}"),
            Err(vec![unknown("nope"), unknown("other")])
        );
        assert_eq!(
            parse("{1x}{}{id}"),
            Err(vec![
                TagTemplateError::BadName("1x".into()),
                TagTemplateError::BadName(String::new()),
            ])
        );
        for bad in ["{id", "id}", "a{b{id}}", "{id}}", "}{", "{{id}}"] {
            assert_eq!(
                parse(bad),
                Err(vec![TagTemplateError::UnbalancedBraces]),
                "{bad}"
            );
        }
        // An unknown name is still reported beside unbalanced braces.
        assert_eq!(
            parse("{nope}{"),
            Err(vec![TagTemplateError::UnbalancedBraces, unknown("nope")])
        );
        let long = "x".repeat(MAX_TAG_BYTES + 1);
        assert_eq!(
            parse(&format!("{long}{{id}}")),
            Err(vec![TagTemplateError::TooLong(MAX_TAG_BYTES + 1)])
        );
        // Placeholders do not count towards the length.
        let exact = "x".repeat(MAX_TAG_BYTES);
        assert!(parse(&format!("{exact}{{id}}")).is_ok());
    }

    #[test]
    fn without_a_path_template_names_are_not_checked() {
        let scope = TagScope {
            path: None,
            query: &[],
            body: &[],
        };
        assert!(TagTemplate::parse("{anything}", &scope).is_ok());
        assert!(TagTemplate::parse("{anything", &scope).is_err());
    }
}
