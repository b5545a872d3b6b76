//! An aggregate route's settings: its legs, how each picks from its answer, and how the
//! merged answer is shaped.

use std::time::Duration;

use serde_json::Value;

/// A reference inside a template, `{...}`: a route parameter (`{name}`), a query
/// parameter (`{query.region}`), the current fan-out element (`{item.identifier}`), or an
/// earlier leg's picked result (`{restaurant.menuUrl}`, `{menu.menu[*].dish}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `param`, `query`, `item` or a leg name.
    pub root: String,
    /// Field names below the root; `*` maps over an array.
    pub path: Vec<String>,
}

impl Reference {
    /// Parses the text between braces: `restaurant.menuUrl`, `menu.menu[*].dish`.
    pub fn parse(text: &str) -> Option<Reference> {
        let mut parts = Vec::new();
        for piece in text.split('.') {
            match piece.strip_suffix("[*]") {
                Some(name) => {
                    parts.push(name.to_string());
                    parts.push("*".to_string());
                }
                None => parts.push(piece.to_string()),
            }
        }
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let root = parts.remove(0);
        Some(Reference { root, path: parts })
    }
}

/// A string with `{reference}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub source: String,
    pub parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Text(String),
    Ref(Reference),
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {source:?}"))?
                + open;
            let inner = &rest[open + 1..close];
            let reference =
                Reference::parse(inner).ok_or_else(|| format!("{{{inner}}} is not a reference"))?;
            parts.push(TemplatePart::Ref(reference));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unbalanced '}}' in {source:?}"));
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_string()));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.parts.iter().filter_map(|p| match p {
            TemplatePart::Ref(r) => Some(r),
            TemplatePart::Text(_) => None,
        })
    }

    /// The single reference, when the whole template is one (then it yields a JSON value,
    /// not text).
    pub fn whole_reference(&self) -> Option<&Reference> {
        match self.parts.as_slice() {
            [TemplatePart::Ref(r)] => Some(r),
            _ => None,
        }
    }
}

/// A JSON shape whose strings may be templates (a body template or the `respond` shape).
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Template(Template),
    Array(Vec<Shape>),
    Object(Vec<(String, Shape)>),
    Literal(Value),
}

impl Shape {
    pub fn parse(value: &Value) -> Result<Shape, String> {
        Ok(match value {
            Value::String(s) => Shape::Template(Template::parse(s)?),
            Value::Array(items) => {
                Shape::Array(items.iter().map(Shape::parse).collect::<Result<_, _>>()?)
            }
            Value::Object(map) => Shape::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), Shape::parse(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => Shape::Literal(other.clone()),
        })
    }

    pub fn references(&self) -> Vec<&Reference> {
        match self {
            Shape::Template(t) => t.references().collect(),
            Shape::Array(items) => items.iter().flat_map(Shape::references).collect(),
            Shape::Object(fields) => fields.iter().flat_map(|(_, s)| s.references()).collect(),
            Shape::Literal(_) => Vec::new(),
        }
    }
}

/// What a leg keeps of its answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Pick {
    /// The whole answer.
    All,
    /// A JSON pointer (`/restaurant`).
    Pointer(String),
    /// The element(s) of the array at `from` whose field `field` equals `equals`, compared
    /// case-insensitively: the first one (a miss is a 404 listing the candidates), or all.
    Find {
        from: String,
        field: String,
        equals: Template,
        all: bool,
    },
}

/// What an aggregate does when a leg fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLegError {
    /// 502 JSON naming the leg.
    Fail,
    /// 200 with the good parts and an `errors` object naming the failed legs.
    Partial,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LegSpec {
    pub name: String,
    pub method: http::Method,
    /// A client-facing path through stoa's own routes, so that legs share cache entries
    /// (and single flight) with the direct routes.
    pub path: Template,
    pub body: Option<Shape>,
    pub pick: Pick,
    /// Repeat this leg over the array an earlier leg picked (`{item...}` in templates).
    pub for_each: Option<String>,
    pub max_fan_out: usize,
    pub timeout: Duration,
    /// Where the picked result goes in the default merged object.
    pub into: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AggregateSpec {
    pub legs: Vec<LegSpec>,
    pub on_leg_error: OnLegError,
    /// Bound on the whole aggregate.
    pub deadline: Duration,
    /// The answer's shape; `None`: every leg's result under its `into` key.
    pub respond: Option<Shape>,
}
