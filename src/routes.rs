//! Path templates, URI rewriting and the route table, compiled once per configuration.
//!
//! A path template is made of `/`-separated segments, each either a literal, a `{param}`
//! (one non-empty segment) or, last only, `{*rest}` (the remainder, possibly empty).
//! When several routes match a request, the most specific one wins: segment by segment,
//! a literal beats a parameter, which beats a rest capture.

use std::borrow::Cow;
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
    #[error("is not a safe path: {0}")]
    UnsafePath(PathError),
    #[error("would never match a request (requests are normalised); write it as {0:?}")]
    NotNormal(String),
}

/// Checks the template's text, every placeholder replaced by `x`, in [`PathMode::Exact`];
/// `Ok` carries the normal form of that text.
fn check_template_path(source: &str) -> Result<String, TemplateError> {
    let mut sample = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find('{') {
        sample.push_str(&rest[..open]);
        sample.push('x');
        rest = rest[open..]
            .find('}')
            .map_or("", |close| &rest[open + close + 1..]);
    }
    sample.push_str(rest);
    let normal = normalize_path(&sample, PathMode::Exact).map_err(TemplateError::UnsafePath)?;
    Ok(normal.into_owned())
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
    /// Held in place up to four (a route's usual few): no allocation per request.
    values: smallvec::SmallVec<[(&'a str, &'a str); 4]>,
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
        check_template_path(source)?;
        let raw: Vec<&str> = body.split('/').collect();
        let mut segments = Vec::with_capacity(raw.len());
        for (i, seg) in raw.iter().enumerate() {
            let segment = match parse_placeholder(seg)? {
                None => {
                    // Requests are matched in normal form: `%7e` or `%2D` would never match.
                    let slashed = format!("/{seg}");
                    let normal = check_template_path(&slashed)?;
                    if normal != slashed {
                        return Err(TemplateError::NotNormal(normal[1..].to_string()));
                    }
                    Segment::Literal((*seg).to_string())
                }
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
        check_template_path(source)?;
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

/// Why a path was refused by [`normalize_path`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("'%' must be followed by two hexadecimal digits")]
    BadPercent,
    #[error("an encoded '/' or '\\' (%2F, %5C) cannot be part of a segment")]
    EncodedSeparator,
    #[error("'\\' is not a path separator")]
    Backslash,
    #[error("control characters (such as NUL) are not allowed in a path")]
    Control,
    #[error("percent-encoded bytes must form valid UTF-8")]
    BadUtf8,
    #[error("'..' climbs above the root")]
    AboveRoot,
    #[error("a dot segment with parameters ('..;') is not allowed")]
    DotWithParams,
    #[error("a dot segment ('.' or '..', in any encoding) is not allowed here")]
    DotSegment,
    #[error("an empty segment ('//') is not allowed here")]
    EmptySegment,
}

/// How [`normalize_path`] treats dot segments and repeated slashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathMode {
    /// A client's request: dot segments are resolved (RFC 3986 §5.2.4, but climbing above
    /// the root is an error) and repeated slashes are merged.
    Resolve,
    /// A path stoa assembled itself (an aggregate leg, the path sent upstream): a dot
    /// segment or an empty segment before the last is an error, never resolved.
    Exact,
}

/// Brings a path (without query) to the one form stoa routes, keys and forwards.
///
/// The policy, in both modes:
/// - `%XX` must be two hex digits; it is decoded when it stands for an unreserved character
///   (`A-Z a-z 0-9 - . _ ~`, so `%2e` is a dot) and otherwise kept, with upper-case digits;
/// - `%2F` and `%5C` (an encoded separator), a raw `\`, control characters (`%00` included)
///   and percent-encoded bytes that are not UTF-8 (overlong forms included) are errors;
/// - a dot segment followed by parameters (`..;x`, which some servers treat as `..`) is an error;
/// - dot and empty segments are resolved or refused as [`PathMode`] says.
///
/// The result never contains a dot segment, a `//` or anything that decodes to a separator,
/// so a `{param}` is always exactly one segment and a rewrite cannot be climbed out of.
/// - other bytes outside RFC 3986's `pchar` (`"`, `{`, `|`, non-ASCII) are percent-encoded.
///
/// A path of plain `pchar` bytes (no `%`, `\`, ...), without `//` or a segment starting
/// with `.`, is returned as is after one scan of a lookup table, without allocating.
pub fn normalize_path(path: &str, mode: PathMode) -> Result<Cow<'_, str>, PathError> {
    let mut prev = 0u8;
    for &b in path.as_bytes() {
        if !PLAIN[usize::from(b)] || (prev == b'/' && (b == b'/' || b == b'.')) {
            return normalize_slow(path, mode).map(Cow::Owned);
        }
        prev = b;
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    Ok(Cow::Borrowed(path))
}

/// Bytes a normal path holds as they are: RFC 3986 `pchar` except `%`, and `/`.
static PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(b as u8,
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~'
            | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
            | b':' | b'@' | b'/');
        b += 1;
    }
    table
};

/// Characters RFC 3986 calls unreserved: their percent-encoded form means the same.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn push_encoded(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// Appends `raw`'s normal form (ASCII only) to `out`; `decoded` is scratch space for the
/// UTF-8 check.
fn normalize_segment(raw: &str, out: &mut String, decoded: &mut Vec<u8>) -> Result<(), PathError> {
    let bytes = raw.as_bytes();
    decoded.clear();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        let d = match b {
            b'%' => {
                let hi = bytes.get(i).copied().and_then(hex_value);
                let lo = bytes.get(i + 1).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadPercent);
                };
                i += 2;
                let d = (hi << 4) | lo;
                match d {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0..=0x1f | 0x7f => return Err(PathError::Control),
                    _ if is_unreserved(d) => out.push(char::from(d)),
                    _ => push_encoded(out, d),
                }
                d
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::Control),
            _ if PLAIN[usize::from(b)] => {
                out.push(char::from(b));
                b
            }
            // `"`, `{`, `|`, non-ASCII...: encoded, as URL parsers do before sending.
            _ => {
                push_encoded(out, b);
                b
            }
        };
        decoded.push(d);
    }
    std::str::from_utf8(decoded).map_err(|_| PathError::BadUtf8)?;
    Ok(())
}

/// The careful path of [`normalize_path`], segment by segment.
fn normalize_slow(path: &str, mode: PathMode) -> Result<String, PathError> {
    let body = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut out = String::with_capacity(path.len());
    // Where each kept segment (with its leading '/') starts in `out`, for `..`.
    let mut starts: Vec<usize> = Vec::new();
    let mut decoded = Vec::new();
    let mut trailing_slash = false;
    let mut segments = body.split('/').peekable();
    while let Some(raw) = segments.next() {
        let last = segments.peek().is_none();
        let start = out.len();
        out.push('/');
        normalize_segment(raw, &mut out, &mut decoded)?;
        let segment = &out[start + 1..];
        let before_params = segment.split(';').next().unwrap_or(segment);
        let dots = matches!(before_params, "." | "..");
        if dots && before_params.len() != segment.len() {
            return Err(PathError::DotWithParams);
        }
        let climbs = segment == "..";
        if segment.is_empty() || dots {
            out.truncate(start);
            if mode == PathMode::Exact && (dots || !last) {
                return Err(if dots {
                    PathError::DotSegment
                } else {
                    PathError::EmptySegment
                });
            }
            if climbs {
                let previous = starts.pop().ok_or(PathError::AboveRoot)?;
                out.truncate(previous);
            }
            // `/a/.`, `/a/b/..` and `/a/` all end in a directory.
            trailing_slash = last;
        } else {
            starts.push(start);
            trailing_slash = false;
        }
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Builds the URI sent upstream: optional upstream base path, the rewritten (or original)
/// path, and the original query string, untouched.
///
/// `path` and the captures must come from a path brought to normal form by
/// [`normalize_path`]; the assembled path is checked once more in [`PathMode::Exact`], so
/// what the upstream receives has no dot segment, `//` or encoded separator: it stays
/// under the rewrite's prefix, whichever HTTP client or URL parser sends it.
pub fn upstream_uri(
    base_path: &str,
    rewrite: Option<&RewriteTemplate>,
    captures: &Captures<'_>,
    path: &str,
    query: Option<&str>,
) -> Result<String, PathError> {
    let mut out = String::with_capacity(base_path.len() + path.len() + 32);
    out.push_str(base_path);
    match rewrite {
        Some(t) => t.render_into(captures, &mut out),
        None => out.push_str(path),
    }
    if let Cow::Owned(normal) = normalize_path(&out, PathMode::Exact)? {
        out = normal;
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
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
            )
            .unwrap(),
            "/api/restaurant/dufva?lang=sv&x=1"
        );
        assert_eq!(
            upstream_uri("/base", None, &caps, "/restaurant/dufva", None).unwrap(),
            "/base/restaurant/dufva"
        );
        let rest = t("/{*uri}");
        let rw = RewriteTemplate::parse("/api/{uri}", &rest).unwrap();
        let caps = rest.matches("/restaurant/dufva").unwrap();
        assert_eq!(
            upstream_uri("", Some(&rw), &caps, "/restaurant/dufva", None).unwrap(),
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

    /// Hostile and harmless request paths: the normal form, or why it is refused.
    const RESOLVE_TABLE: &[(&str, Result<&str, PathError>)] = &[
        // Already normal: returned as is.
        ("/", Ok("/")),
        ("/restaurant/dufva", Ok("/restaurant/dufva")),
        ("/campaigns/7/", Ok("/campaigns/7/")),
        ("/a/b.json", Ok("/a/b.json")),
        ("/a/..b/c..", Ok("/a/..b/c..")),
        ("/a/...", Ok("/a/...")),
        ("/a/.well-known", Ok("/a/.well-known")),
        ("/caf\u{e9}", Ok("/caf%C3%A9")),
        ("/q/{\"a\"}|[x]^", Ok("/q/%7B%22a%22%7D%7C%5Bx%5D%5E")),
        // Dot segments, in every spelling, are resolved (RFC 3986 §5.2.4).
        ("/restaurant/./dufva", Ok("/restaurant/dufva")),
        ("/restaurant/%2e/dufva", Ok("/restaurant/dufva")),
        ("/restaurant/..", Ok("/")),
        ("/restaurant/dufva/..", Ok("/restaurant/")),
        ("/restaurant/dufva/.", Ok("/restaurant/dufva/")),
        ("/api/public/../../secret", Ok("/secret")),
        ("/api/public/../../../secret", Err(PathError::AboveRoot)),
        ("/c/../../secret", Err(PathError::AboveRoot)),
        ("/c/%2e%2e/%2e%2e/secret", Err(PathError::AboveRoot)),
        ("/c/%2E%2e/%2e%2E/secret", Err(PathError::AboveRoot)),
        ("/c/.%2e/.%2E/secret", Err(PathError::AboveRoot)),
        ("/..", Err(PathError::AboveRoot)),
        ("/a/b/../../..", Err(PathError::AboveRoot)),
        ("/a/b/../c", Ok("/a/c")),
        ("/a/%2e%2e/b", Ok("/b")),
        // Repeated slashes are merged.
        ("//", Ok("/")),
        ("//a", Ok("/a")),
        ("/c//secret", Ok("/c/secret")),
        ("/a///b//", Ok("/a/b/")),
        // Separators in disguise.
        ("/c/..%2f..%2fsecret", Err(PathError::EncodedSeparator)),
        ("/c/a%2Fb", Err(PathError::EncodedSeparator)),
        ("/c/a%5cb", Err(PathError::EncodedSeparator)),
        ("/c/..%5C..%5Csecret", Err(PathError::EncodedSeparator)),
        ("/c/..\\..\\secret", Err(PathError::Backslash)),
        ("/c/a\\b", Err(PathError::Backslash)),
        // Bad or hostile percent encoding.
        ("/c/%", Err(PathError::BadPercent)),
        ("/c/%2", Err(PathError::BadPercent)),
        ("/c/%zz", Err(PathError::BadPercent)),
        ("/c/%%32%65", Err(PathError::BadPercent)),
        ("/c/%c0%ae%c0%ae/secret", Err(PathError::BadUtf8)),
        ("/c/%e0%80%ae", Err(PathError::BadUtf8)),
        ("/c/%ff", Err(PathError::BadUtf8)),
        ("/c/%00", Err(PathError::Control)),
        ("/c/a%0d%0aX-Injected:%201", Err(PathError::Control)),
        ("/c/a\0b", Err(PathError::Control)),
        ("/c/%7f", Err(PathError::Control)),
        // Unreserved characters are decoded, the rest kept with upper-case digits.
        ("/restaurant/%64ufva", Ok("/restaurant/dufva")),
        (
            "/menu/Restaurang%20Bikupan",
            Ok("/menu/Restaurang%20Bikupan"),
        ),
        ("/menu/caf%c3%a9", Ok("/menu/caf%C3%A9")),
        ("/q/a%3fb%23c", Ok("/q/a%3Fb%23c")),
        ("/q/100%25", Ok("/q/100%25")),
        // Dot segments with parameters, which some servers read as dot segments.
        ("/c/..;/secret", Err(PathError::DotWithParams)),
        ("/c/.;x/secret", Err(PathError::DotWithParams)),
        (
            "/c/%2e%2e;jsessionid=1/secret",
            Err(PathError::DotWithParams),
        ),
        ("/c/a;b", Ok("/c/a;b")),
        // Not origin-form.
        ("", Err(PathError::NotAbsolute)),
        ("*", Err(PathError::NotAbsolute)),
        ("a/b", Err(PathError::NotAbsolute)),
    ];

    #[test]
    fn hostile_paths_are_normalised_or_refused() {
        for (input, expected) in RESOLVE_TABLE {
            let got = normalize_path(input, PathMode::Resolve);
            assert_eq!(
                got.as_deref().map_err(Clone::clone),
                expected.clone(),
                "{input:?}"
            );
            // The normal form is a fixed point, and safe to send as it is: neither the
            // fetch's URL parser nor pingora's URI type changes it.
            if let Ok(normal) = got {
                assert_eq!(
                    normalize_path(&normal, PathMode::Exact).as_deref(),
                    Ok(&*normal),
                    "{input:?}"
                );
                let url = url::Url::parse(&format!("http://127.0.0.1:1{normal}")).unwrap();
                assert_eq!(url.path(), normal, "{input:?}");
                assert_eq!(normal.parse::<http::Uri>().unwrap().path(), normal);
            }
        }
    }

    #[test]
    fn exact_mode_refuses_what_resolve_would_fix() {
        let table: &[(&str, Result<&str, PathError>)] = &[
            ("/restaurant/dufva", Ok("/restaurant/dufva")),
            ("/campaigns/7/", Ok("/campaigns/7/")),
            ("/", Ok("/")),
            (
                "/menu/Restaurang%20Bikupan",
                Ok("/menu/Restaurang%20Bikupan"),
            ),
            ("/restaurant/%64ufva", Ok("/restaurant/dufva")),
            ("/restaurant/..", Err(PathError::DotSegment)),
            ("/restaurant/.", Err(PathError::DotSegment)),
            ("/restaurant/%2E%2E", Err(PathError::DotSegment)),
            ("/restaurant/../x", Err(PathError::DotSegment)),
            ("/restaurant//menu", Err(PathError::EmptySegment)),
            ("//x", Err(PathError::EmptySegment)),
            (
                "/restaurant/..%2F..%2Fsecret",
                Err(PathError::EncodedSeparator),
            ),
        ];
        for (input, expected) in table {
            assert_eq!(
                normalize_path(input, PathMode::Exact)
                    .as_deref()
                    .map_err(Clone::clone),
                expected.clone(),
                "{input:?}"
            );
        }
    }

    #[test]
    fn normal_paths_are_borrowed_after_one_scan() {
        for path in ["/", "/restaurant/dufva", "/api/cached/a/b/", "/a/b.c..d"] {
            assert!(matches!(
                normalize_path(path, PathMode::Resolve),
                Ok(Cow::Borrowed(_))
            ));
            // The careful path agrees with the quick one.
            assert_eq!(normalize_slow(path, PathMode::Resolve).as_deref(), Ok(path));
        }
    }

    #[test]
    fn captures_of_a_normal_path_never_leave_the_rewrite_prefix() {
        let path = t("/c/{*rest}");
        let rw = RewriteTemplate::parse("/api/cached/{rest}", &path).unwrap();
        for input in ["/c/a/./b", "/c/a/../b", "/c/%2e%2e/x", "/c//x", "/c/"] {
            let normal = normalize_path(input, PathMode::Resolve).unwrap();
            let Some(caps) = path.matches(&normal) else {
                continue;
            };
            let uri = upstream_uri("", Some(&rw), &caps, &normal, None).unwrap();
            assert!(uri.starts_with("/api/cached/"), "{input:?} -> {uri}");
            assert!(!uri.contains("/.") && !uri.contains("//"), "{uri}");
        }
        // A rest capture left empty in the middle of a rewrite is refused, not sent.
        let rw = RewriteTemplate::parse("/api/{rest}/x", &path).unwrap();
        let caps = path.matches("/c").unwrap();
        assert_eq!(
            upstream_uri("", Some(&rw), &caps, "/c", None),
            Err(PathError::EmptySegment)
        );
    }

    #[test]
    fn templates_must_be_normal_and_safe() {
        assert!(matches!(
            PathTemplate::parse("/a/../{id}"),
            Err(TemplateError::UnsafePath(PathError::DotSegment))
        ));
        assert!(matches!(
            PathTemplate::parse("/a//{id}"),
            Err(TemplateError::UnsafePath(PathError::EmptySegment))
        ));
        assert_eq!(
            PathTemplate::parse("/caf%c3%a9/%7euser"),
            Err(TemplateError::NotNormal("caf%C3%A9".into()))
        );
        let path = t("/r/{id}");
        assert!(matches!(
            RewriteTemplate::parse("/api/./{id}", &path),
            Err(TemplateError::UnsafePath(PathError::DotSegment))
        ));
        assert!(matches!(
            RewriteTemplate::parse("/api/%2f/{id}", &path),
            Err(TemplateError::UnsafePath(PathError::EncodedSeparator))
        ));
        assert!(RewriteTemplate::parse("/api/item-{id}.json", &path).is_ok());
    }

    #[test]
    fn random_hostile_paths_never_panic_and_normal_forms_are_safe() {
        const PIECES: &[&str] = &[
            "/", "/", ".", "..", "%", "2", "e", "E", "f", "5", "c", "C", "0", "a", ";", "\\",
            "%2e", "%2F", "%c0", "%ae", "\u{e9}", "\0", "{", "~", "%7e",
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let mut path = String::from("/");
            for _ in 0..rng.usize(0..12) {
                path.push_str(PIECES[rng.usize(0..PIECES.len())]);
            }
            for mode in [PathMode::Resolve, PathMode::Exact] {
                let Ok(normal) = normalize_path(&path, mode) else {
                    continue;
                };
                assert!(normal.is_ascii(), "{path:?} -> {normal:?}");
                let again = normalize_path(&normal, PathMode::Exact);
                assert_eq!(again.as_deref(), Ok(&*normal), "{path:?}");
                for seg in normal.split('/').skip(1) {
                    assert!(seg != "." && seg != "..", "{path:?} -> {normal:?}");
                }
                assert!(!normal.contains("//"), "{path:?} -> {normal:?}");
                let url = url::Url::parse(&format!("http://127.0.0.1:1{normal}")).unwrap();
                assert_eq!(url.path(), normal, "{path:?}");
            }
        }
    }
}
