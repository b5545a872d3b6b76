//! Path templates, URI rewriting and the route table, compiled once per configuration.
//!
//! A path template is made of `/`-separated segments, each either a literal, a `{param}`
//! (one non-empty segment) or, last only, `{*rest}` (the remainder, possibly empty).
//! When several routes match a request, the most specific one wins: segment by segment,
//! a literal beats a parameter, which beats a rest capture.

use std::fmt;

/// Why a template was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("must start with '/'")]
    NoLeadingSlash,
    #[error(
        "segment {0:?} mixes text and a parameter; a segment is either literal or one {{param}}"
    )]
    MixedSegment(String),
    #[error(
        "parameter name {0:?} is not valid (letters, digits and '_', not starting with a digit)"
    )]
    BadParamName(String),
    #[error("parameter {0:?} appears twice")]
    DuplicateParam(String),
    #[error("{{*{0}}} must be the last segment")]
    RestNotLast(String),
    #[error("unbalanced braces in {0:?}")]
    UnbalancedBraces(String),
    #[error("uses parameter {{{0}}}, which the route's path does not define")]
    UnknownParam(String),
    #[error("contains characters not allowed in a path: {0:?}")]
    BadCharacter(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
    Rest(String),
}

/// A compiled path template such as `/restaurant/{id}` or `/api/{*rest}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    source: String,
    segments: Vec<Segment>,
}

/// Parameters captured by a match, as slices of the request path (still percent-encoded).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Captures<'a> {
    values: Vec<(&'a str, &'a str)>,
}

impl<'a> Captures<'a> {
    /// The value captured for `name`, if the template defines it.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

fn valid_param_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `{name}` / `{*name}` if `seg` is exactly one such placeholder.
fn parse_placeholder(seg: &str) -> Result<Option<(bool, &str)>, TemplateError> {
    let opens = seg.matches('{').count();
    let closes = seg.matches('}').count();
    if opens == 0 && closes == 0 {
        return Ok(None);
    }
    if opens != 1 || closes != 1 {
        return Err(TemplateError::UnbalancedBraces(seg.to_string()));
    }
    let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else {
        return Err(TemplateError::MixedSegment(seg.to_string()));
    };
    let (rest, name) = match inner.strip_prefix('*') {
        Some(name) => (true, name),
        None => (false, inner),
    };
    if !valid_param_name(name) {
        return Err(TemplateError::BadParamName(name.to_string()));
    }
    Ok(Some((rest, name)))
}

fn check_path_chars(s: &str) -> Result<(), TemplateError> {
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err(TemplateError::BadCharacter(s.to_string()));
    }
    Ok(())
}

impl PathTemplate {
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let body = source
            .strip_prefix('/')
            .ok_or(TemplateError::NoLeadingSlash)?;
        check_path_chars(source)?;
        let raw: Vec<&str> = body.split('/').collect();
        let mut segments = Vec::with_capacity(raw.len());
        for (i, seg) in raw.iter().enumerate() {
            let segment = match parse_placeholder(seg)? {
                None => Segment::Literal((*seg).to_string()),
                Some((true, name)) => {
                    if i + 1 != raw.len() {
                        return Err(TemplateError::RestNotLast(name.to_string()));
                    }
                    Segment::Rest(name.to_string())
                }
                Some((false, name)) => Segment::Param(name.to_string()),
            };
            if let Segment::Param(n) | Segment::Rest(n) = &segment {
                if segments
                    .iter()
                    .any(|s| matches!(s, Segment::Param(m) | Segment::Rest(m) if m == n))
                {
                    return Err(TemplateError::DuplicateParam(n.clone()));
                }
            }
            segments.push(segment);
        }
        Ok(PathTemplate {
            source: source.to_string(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The names of the template's parameters and rest capture.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) | Segment::Rest(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Whether the template defines a parameter (or rest capture) of this name.
    pub fn has_param(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Param(n) | Segment::Rest(n) if n == name))
    }

    /// Matches a request path (without query string).
    pub fn matches<'a>(&'a self, path: &'a str) -> Option<Captures<'a>> {
        let mut rest = path.strip_prefix('/')?;
        let mut captures = Captures::default();
        for (i, segment) in self.segments.iter().enumerate() {
            if let Segment::Rest(name) = segment {
                captures.values.push((name.as_str(), rest));
                return Some(captures);
            }
            let (head, tail) = match rest.find('/') {
                Some(pos) => (&rest[..pos], Some(&rest[pos + 1..])),
                None => (rest, None),
            };
            match segment {
                Segment::Literal(lit) if lit != head => return None,
                Segment::Param(_) if head.is_empty() => return None,
                Segment::Param(name) => captures.values.push((name.as_str(), head)),
                _ => {}
            }
            let last = i + 1 == self.segments.len();
            match (tail, last) {
                (None, true) => return Some(captures),
                (Some(t), false) => rest = t,
                (None, false) => {
                    // `/api` still matches `/api/{*rest}` with an empty rest.
                    return match &self.segments[i + 1..] {
                        [Segment::Rest(name)] => {
                            captures.values.push((name.as_str(), ""));
                            Some(captures)
                        }
                        _ => None,
                    };
                }
                (Some(_), true) => return None,
            }
        }
        None
    }

    /// A sort key: higher is more specific (literal > param > rest, left to right, longer wins).
    fn specificity(&self) -> Vec<u8> {
        let mut key: Vec<u8> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(_) => 3,
                Segment::Param(_) => 2,
                Segment::Rest(_) => 1,
            })
            .collect();
        // Terminate so that a longer template of the same prefix ranks above a shorter one.
        key.push(0);
        key
    }

    /// Two templates are equivalent when they match exactly the same paths
    /// (same shape and literals, whatever the parameter names).
    pub fn equivalent(&self, other: &PathTemplate) -> bool {
        self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|(a, b)| match (a, b) {
                    (Segment::Literal(x), Segment::Literal(y)) => x == y,
                    (Segment::Param(_), Segment::Param(_)) => true,
                    (Segment::Rest(_), Segment::Rest(_)) => true,
                    _ => false,
                })
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RewritePart {
    Text(String),
    Param(String),
}

/// A rewrite template such as `/api/restaurant/{id}`, filled from a match's captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteTemplate {
    source: String,
    parts: Vec<RewritePart>,
}

impl RewriteTemplate {
    /// Parses a rewrite template and checks every parameter it uses exists in `path`.
    pub fn parse(source: &str, path: &PathTemplate) -> Result<Self, TemplateError> {
        if !source.starts_with('/') {
            return Err(TemplateError::NoLeadingSlash);
        }
        check_path_chars(source)?;
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if rest[..open].contains('}') {
                return Err(TemplateError::UnbalancedBraces(source.to_string()));
            }
            if open > 0 {
                parts.push(RewritePart::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| TemplateError::UnbalancedBraces(source.to_string()))?
                + open;
            let inner = &rest[open + 1..close];
            let name = inner.strip_prefix('*').unwrap_or(inner);
            if !valid_param_name(name) {
                return Err(TemplateError::BadParamName(name.to_string()));
            }
            if !path.has_param(name) {
                return Err(TemplateError::UnknownParam(name.to_string()));
            }
            parts.push(RewritePart::Param(name.to_string()));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError::UnbalancedBraces(source.to_string()));
        }
        if !rest.is_empty() {
            parts.push(RewritePart::Text(rest.to_string()));
        }
        Ok(RewriteTemplate {
            source: source.to_string(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Appends the rewritten path to `out`.
    pub fn render_into(&self, captures: &Captures<'_>, out: &mut String) {
        for part in &self.parts {
            match part {
                RewritePart::Text(t) => out.push_str(t),
                RewritePart::Param(name) => out.push_str(captures.get(name).unwrap_or("")),
            }
        }
    }
}

/// Builds the URI sent upstream: optional upstream base path, the rewritten (or original)
/// path, and the original query string, untouched.
pub fn upstream_uri(
    base_path: &str,
    rewrite: Option<&RewriteTemplate>,
    captures: &Captures<'_>,
    path: &str,
    query: Option<&str>,
) -> String {
    let mut out = String::with_capacity(base_path.len() + path.len() + 32);
    out.push_str(base_path);
    match rewrite {
        Some(t) => t.render_into(captures, &mut out),
        None => out.push_str(path),
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// What a route table needs to know of a route to match it.
pub trait Routable {
    fn path(&self) -> &PathTemplate;
    /// `None` means every method.
    fn methods(&self) -> Option<&[http::Method]>;
}

/// The outcome of looking a request up in a [`RouteTable`].
#[derive(Debug)]
pub enum Lookup<'a, R> {
    /// The route's index in [`RouteTable::routes`], the route and its captures.
    Found(usize, &'a R, Captures<'a>),
    /// The path matched routes, none of them for this method: the `Allow` header value.
    MethodNotAllowed(String),
    NotFound,
}

/// Routes sorted most specific first, so the first full match is the best one.
#[derive(Debug)]
pub struct RouteTable<R> {
    routes: Vec<R>,
}

impl<R: Routable> RouteTable<R> {
    pub fn new(mut routes: Vec<R>) -> Self {
        // Stable sort: among equally specific routes, file order is kept.
        routes.sort_by_key(|r| std::cmp::Reverse(r.path().specificity()));
        RouteTable { routes }
    }

    pub fn routes(&self) -> &[R] {
        &self.routes
    }

    pub fn lookup<'a>(&'a self, method: &http::Method, path: &'a str) -> Lookup<'a, R> {
        let mut path_matched = false;
        for (index, route) in self.routes.iter().enumerate() {
            let Some(captures) = route.path().matches(path) else {
                continue;
            };
            let allowed = match route.methods() {
                None => true,
                Some(ms) => {
                    ms.contains(method)
                        || (method == http::Method::HEAD && ms.contains(&http::Method::GET))
                }
            };
            if allowed {
                return Lookup::Found(index, route, captures);
            }
            path_matched = true;
        }
        if !path_matched {
            return Lookup::NotFound;
        }
        Lookup::MethodNotAllowed(self.allow_header(path))
    }

    fn allow_header(&self, path: &str) -> String {
        let mut allow: Vec<&str> = Vec::new();
        for route in &self.routes {
            if route.path().matches(path).is_none() {
                continue;
            }
            for m in route.methods().unwrap_or(&[]) {
                if !allow.contains(&m.as_str()) {
                    allow.push(m.as_str());
                }
                if m == http::Method::GET && !allow.contains(&"HEAD") {
                    allow.push("HEAD");
                }
            }
        }
        allow.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn t(s: &str) -> PathTemplate {
        PathTemplate::parse(s).unwrap()
    }

    #[test]
    fn literal_and_param_segments_match() {
        let tpl = t("/restaurant/{id}");
        let c = tpl.matches("/restaurant/dufva").unwrap();
        assert_eq!(c.get("id"), Some("dufva"));
        assert!(tpl.matches("/restaurant/").is_none());
        assert!(tpl.matches("/restaurant").is_none());
        assert!(tpl.matches("/restaurant/dufva/menu").is_none());
        assert!(tpl.matches("/restaurants/dufva").is_none());
    }

    #[test]
    fn trailing_slash_is_significant() {
        let tpl = t("/campaigns/{id}/");
        assert_eq!(tpl.matches("/campaigns/7/").unwrap().get("id"), Some("7"));
        assert!(tpl.matches("/campaigns/7").is_none());
        let root = t("/");
        assert!(root.matches("/").is_some());
        assert!(root.matches("/x").is_none());
    }

    #[test]
    fn rest_captures_the_remainder_including_empty() {
        let tpl = t("/api/{*rest}");
        assert_eq!(
            tpl.matches("/api/a/b/c").unwrap().get("rest"),
            Some("a/b/c")
        );
        assert_eq!(tpl.matches("/api/").unwrap().get("rest"), Some(""));
        assert_eq!(tpl.matches("/api").unwrap().get("rest"), Some(""));
        assert!(tpl.matches("/apix").is_none());
        let all = t("/{*path}");
        assert_eq!(all.matches("/x/y").unwrap().get("path"), Some("x/y"));
    }

    #[test]
    fn bad_templates_are_rejected_with_reasons() {
        assert_eq!(PathTemplate::parse("x"), Err(TemplateError::NoLeadingSlash));
        assert!(matches!(
            PathTemplate::parse("/a{id}"),
            Err(TemplateError::MixedSegment(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/{1x}"),
            Err(TemplateError::BadParamName(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/{a}/{a}"),
            Err(TemplateError::DuplicateParam(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/{*a}/b"),
            Err(TemplateError::RestNotLast(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/{a"),
            Err(TemplateError::UnbalancedBraces(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/a b"),
            Err(TemplateError::BadCharacter(_))
        ));
    }

    #[test]
    fn rewrite_fills_parameters_and_keeps_query() {
        let path = t("/restaurant/{id}");
        let rw = RewriteTemplate::parse("/api/restaurant/{id}", &path).unwrap();
        let caps = path.matches("/restaurant/dufva").unwrap();
        assert_eq!(
            upstream_uri(
                "",
                Some(&rw),
                &caps,
                "/restaurant/dufva",
                Some("lang=sv&x=1")
            ),
            "/api/restaurant/dufva?lang=sv&x=1"
        );
        assert_eq!(
            upstream_uri("/base", None, &caps, "/restaurant/dufva", None),
            "/base/restaurant/dufva"
        );
        let rest = t("/{*uri}");
        let rw = RewriteTemplate::parse("/api/{uri}", &rest).unwrap();
        let caps = rest.matches("/restaurant/dufva").unwrap();
        assert_eq!(
            upstream_uri("", Some(&rw), &caps, "/restaurant/dufva", None),
            "/api/restaurant/dufva"
        );
    }

    #[test]
    fn rewrite_may_only_use_parameters_of_the_path() {
        let path = t("/restaurant/{id}");
        assert_eq!(
            RewriteTemplate::parse("/api/{name}", &path),
            Err(TemplateError::UnknownParam("name".into()))
        );
        assert!(RewriteTemplate::parse("api/{id}", &path).is_err());
        assert!(RewriteTemplate::parse("/api/{id", &path).is_err());
        assert!(RewriteTemplate::parse("/api/id}", &path).is_err());
    }

    #[test]
    fn equivalence_ignores_parameter_names() {
        assert!(t("/a/{x}").equivalent(&t("/a/{y}")));
        assert!(!t("/a/{x}").equivalent(&t("/a/b")));
        assert!(!t("/a/{x}").equivalent(&t("/a/{*x}")));
    }

    struct R(&'static str, PathTemplate, Option<Vec<Method>>);
    impl Routable for R {
        fn path(&self) -> &PathTemplate {
            &self.1
        }
        fn methods(&self) -> Option<&[Method]> {
            self.2.as_deref()
        }
    }

    fn table() -> RouteTable<R> {
        RouteTable::new(vec![
            R("catch-all", t("/{*rest}"), None),
            R("product", t("/products/{id}"), Some(vec![Method::GET])),
            R("delete", t("/products/{id}"), Some(vec![Method::DELETE])),
            R("special", t("/products/special"), Some(vec![Method::GET])),
            R(
                "orders",
                t("/orders"),
                Some(vec![Method::GET, Method::POST]),
            ),
        ])
    }

    fn found(tbl: &RouteTable<R>, m: Method, p: &str) -> &'static str {
        match tbl.lookup(&m, p) {
            Lookup::Found(_, r, _) => r.0,
            other => panic!("expected a route for {m} {p}, got {other:?}"),
        }
    }

    impl fmt::Debug for R {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    #[test]
    fn most_specific_route_wins_and_methods_select() {
        let tbl = table();
        assert_eq!(found(&tbl, Method::GET, "/products/special"), "special");
        assert_eq!(found(&tbl, Method::GET, "/products/x"), "product");
        assert_eq!(found(&tbl, Method::HEAD, "/products/x"), "product");
        assert_eq!(found(&tbl, Method::DELETE, "/products/x"), "delete");
        // Not allowed on the specific routes, but the catch-all takes any method.
        assert_eq!(found(&tbl, Method::PUT, "/products/x"), "catch-all");
        assert_eq!(found(&tbl, Method::GET, "/elsewhere"), "catch-all");
    }

    #[test]
    fn wrong_method_gives_allow_and_unknown_path_gives_not_found() {
        let tbl = RouteTable::new(vec![
            R("product", t("/products/{id}"), Some(vec![Method::GET])),
            R("delete", t("/products/{id}"), Some(vec![Method::DELETE])),
        ]);
        match tbl.lookup(&Method::POST, "/products/x") {
            Lookup::MethodNotAllowed(allow) => assert_eq!(allow, "GET, HEAD, DELETE"),
            other => panic!("expected 405, got {other:?}"),
        }
        assert!(matches!(
            tbl.lookup(&Method::GET, "/nothing"),
            Lookup::NotFound
        ));
    }
}
