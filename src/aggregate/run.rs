//! Running an aggregate: legs in order, each through stoa's own routes (so through their
//! caches and single flights), fan-out legs in parallel, then the merged answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{Map, Value};

use super::legs::{Legs, LegsHandle};
use crate::cache::origin::{Answer, FetchRequest, Fetched, Origin, Pending};
use crate::config::{
    AggregateSpec, LegSpec, OnLegError, Pick, Reference, Shape, Template, TemplatePart,
};
use crate::error::StoaError;
use crate::routes::PathTemplate;

/// Characters escaped when a value is placed in a path segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Runs one aggregate route's legs.
pub struct Aggregator {
    route: String,
    path: PathTemplate,
    spec: Arc<AggregateSpec>,
    /// The routes of the gateway this route belongs to (a reload makes a new one).
    legs: Arc<LegsHandle>,
}

/// Why a leg gave no result.
#[derive(Debug)]
enum LegError {
    /// A find selector matched nothing: the aggregate answers 404 listing the candidates.
    NotFound {
        from: String,
        field: String,
        wanted: String,
        candidates: Vec<Value>,
    },
    Failed(String),
}

/// What templates can reference while a request is aggregated.
struct Scope {
    params: BTreeMap<String, String>,
    query: BTreeMap<String, String>,
    legs: Map<String, Value>,
}

impl Aggregator {
    pub fn new(
        route: String,
        path: PathTemplate,
        spec: Arc<AggregateSpec>,
        legs: Arc<LegsHandle>,
    ) -> Self {
        Aggregator {
            route,
            path,
            spec,
            legs,
        }
    }

    /// Answers the aggregate for a client path (with its query).
    async fn aggregate(&self, path_and_query: &str) -> Result<Fetched, StoaError> {
        let legs = self
            .legs
            .get()
            .ok_or_else(|| StoaError::Internal("the configuration was replaced".into()))?;
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, q),
            None => (path_and_query, ""),
        };
        let captures = self
            .path
            .matches(path)
            .ok_or_else(|| StoaError::Internal(format!("{path} does not match {}", self.path)))?;
        let params = self
            .path
            .param_names()
            .filter_map(|name| {
                let raw = captures.get(name)?;
                Some((
                    name.to_string(),
                    percent_decode_str(raw).decode_utf8_lossy().into_owned(),
                ))
            })
            .collect();
        let query = url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let mut scope = Scope {
            params,
            query,
            legs: Map::new(),
        };
        let mut errors = Map::new();
        let deadline = Instant::now() + self.spec.deadline;

        for leg in &self.spec.legs {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let results = if let Some(each) = &leg.for_each {
                let items = match scope.legs.get(each) {
                    Some(Value::Array(items)) => items.clone(),
                    Some(Value::Null) => Vec::new(),
                    _ => {
                        return Err(self.failed(
                            leg,
                            format!("{each:?} did not give an array to repeat over"),
                        ));
                    }
                };
                if items.len() > leg.max_fan_out {
                    return Err(self.failed(
                        leg,
                        format!(
                            "{} items exceed max_fan_out = {}",
                            items.len(),
                            leg.max_fan_out
                        ),
                    ));
                }
                let calls = items
                    .iter()
                    .map(|item| self.leg(&*legs, leg, &scope, Some(item), remaining));
                let outcomes = futures_util::future::join_all(calls).await;
                let mut values = Vec::with_capacity(outcomes.len());
                for (i, outcome) in outcomes.into_iter().enumerate() {
                    match outcome {
                        Ok(v) => values.push(v),
                        Err(e) => {
                            let name = format!("{}[{i}]", leg.name);
                            let message = self.settle_error(&name, e)?;
                            errors.insert(name, Value::String(message));
                            values.push(Value::Null);
                        }
                    }
                }
                Ok(Value::Array(values))
            } else {
                self.leg(&*legs, leg, &scope, None, remaining).await
            };
            let value = match results {
                Ok(v) => v,
                Err(LegError::NotFound {
                    from,
                    field,
                    wanted,
                    candidates,
                }) => return not_found(&from, &field, &wanted, candidates),
                Err(LegError::Failed(detail)) => match self.spec.on_leg_error {
                    OnLegError::Fail => return Err(self.failed(leg, detail)),
                    OnLegError::Partial => {
                        errors.insert(leg.name.clone(), Value::String(detail));
                        Value::Null
                    }
                },
            };
            scope.legs.insert(leg.name.clone(), value);
        }

        let mut answer = match &self.spec.respond {
            Some(shape) => render_shape(shape, &scope, None),
            None => Value::Object(
                self.spec
                    .legs
                    .iter()
                    .map(|l| {
                        (
                            l.into.clone(),
                            scope.legs.get(&l.name).cloned().unwrap_or(Value::Null),
                        )
                    })
                    .collect(),
            ),
        };
        if !errors.is_empty() {
            match &mut answer {
                Value::Object(map) => {
                    map.insert("errors".into(), Value::Object(errors));
                }
                other => {
                    *other = serde_json::json!({ "result": other.take(), "errors": errors });
                }
            }
        }
        Ok(json_answer(StatusCode::OK, &answer))
    }

    /// A fan-out element's error: the message to record under `errors` (partial), or the
    /// error that fails the whole aggregate.
    fn settle_error(&self, name: &str, e: LegError) -> Result<String, StoaError> {
        let detail = match e {
            LegError::NotFound { field, wanted, .. } => {
                format!("no element with {field} {wanted:?}")
            }
            LegError::Failed(detail) => detail,
        };
        match self.spec.on_leg_error {
            OnLegError::Partial => Ok(detail),
            OnLegError::Fail => Err(StoaError::LegFailed {
                route: self.route.clone(),
                leg: name.to_string(),
                detail,
            }),
        }
    }

    fn failed(&self, leg: &LegSpec, detail: String) -> StoaError {
        StoaError::LegFailed {
            route: self.route.clone(),
            leg: leg.name.clone(),
            detail,
        }
    }

    /// One call of a leg: render, call through stoa's routes, check the status, pick.
    async fn leg(
        &self,
        legs: &dyn Legs,
        leg: &LegSpec,
        scope: &Scope,
        item: Option<&Value>,
        remaining: Duration,
    ) -> Result<Value, LegError> {
        let path = render_text(&leg.path, scope, item, true);
        let body = leg
            .body
            .as_ref()
            .map(|b| Bytes::from(render_shape(b, scope, item).to_string()))
            .unwrap_or_default();
        let span = crate::otel::leg(&leg.name, &leg.method, &path);
        let call = crate::otel::within(span.clone(), legs.call(&leg.method, &path, body));
        let timeout = leg.timeout.min(remaining);
        let answered = tokio::time::timeout(timeout, call).await;
        if let Some(span) = &span {
            let status = match &answered {
                Ok(Ok((status, _))) => status.as_u16(),
                _ => 0,
            };
            crate::otel::end_leg(span, status);
        }
        let (status, body) = match answered {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(LegError::Failed(e)),
            Err(_) => {
                return Err(LegError::Failed(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                )))
            }
        };
        if !status.is_success() {
            return Err(LegError::Failed(format!(
                "{} {path} answered {status}",
                leg.method
            )));
        }
        let value: Value = serde_json::from_slice(&body).map_err(|e| {
            LegError::Failed(format!("{path} answered something that is not JSON: {e}"))
        })?;
        pick(&leg.pick, value, scope, item)
    }
}

/// Boxed: legs fetch through the cache, which may run an aggregate again, and a future's
/// type must not contain itself.
impl Origin for Aggregator {
    fn fetch(&self, req: FetchRequest, _limit: usize) -> Pending<'_, Answer> {
        Box::pin(async move { self.aggregate(&req.path_and_query).await.map(Answer::Whole) })
    }
}

fn pick(how: &Pick, value: Value, scope: &Scope, item: Option<&Value>) -> Result<Value, LegError> {
    match how {
        Pick::All => Ok(value),
        Pick::Pointer(p) => value
            .pointer(p)
            .cloned()
            .ok_or_else(|| LegError::Failed(format!("the answer has nothing at {p}"))),
        Pick::Find {
            from,
            field,
            equals,
            all,
        } => {
            let wanted = render_text(equals, scope, item, false);
            let Some(Value::Array(list)) = value.pointer(from) else {
                return Err(LegError::Failed(format!(
                    "the answer has no array at {from:?}"
                )));
            };
            let matches = |v: &Value| {
                v.get(field)
                    .map(|f| text_of(f).to_lowercase() == wanted.to_lowercase())
                    .unwrap_or(false)
            };
            if *all {
                return Ok(Value::Array(
                    list.iter().filter(|v| matches(v)).cloned().collect(),
                ));
            }
            match list.iter().find(|v| matches(v)) {
                Some(found) => Ok(found.clone()),
                None => Err(LegError::NotFound {
                    from: from.clone(),
                    field: field.clone(),
                    wanted,
                    candidates: list.iter().filter_map(|v| v.get(field).cloned()).collect(),
                }),
            }
        }
    }
}

/// 404 JSON naming what was looked for and listing the candidates (`names` for `name`).
fn not_found(
    from: &str,
    field: &str,
    wanted: &str,
    candidates: Vec<Value>,
) -> Result<Fetched, StoaError> {
    let mut body = Map::new();
    body.insert("error".into(), Value::String("not_found".into()));
    body.insert(
        "message".into(),
        Value::String(format!("no entry of {from} has {field} {wanted:?}")),
    );
    body.insert(format!("{field}s"), Value::Array(candidates));
    Ok(json_answer(StatusCode::NOT_FOUND, &Value::Object(body)))
}

fn json_answer(status: StatusCode, value: &Value) -> Fetched {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Fetched {
        status,
        headers,
        body: Bytes::from(value.to_string()),
    }
}

/// The JSON value a reference points at (`null` when absent).
fn resolve(r: &Reference, scope: &Scope, item: Option<&Value>) -> Value {
    let start = match r.root.as_str() {
        "query" => {
            let name = r.path.first().map(String::as_str).unwrap_or("");
            return scope
                .query
                .get(name)
                .map_or(Value::Null, |v| Value::String(v.clone()));
        }
        "item" => item.cloned().unwrap_or(Value::Null),
        root => match scope.params.get(root) {
            Some(p) if r.path.is_empty() => return Value::String(p.clone()),
            _ => scope.legs.get(root).cloned().unwrap_or(Value::Null),
        },
    };
    walk(&start, &r.path)
}

/// Follows field names; `*` maps the rest over an array.
fn walk(value: &Value, path: &[String]) -> Value {
    match path.split_first() {
        None => value.clone(),
        Some((first, rest)) if first == "*" => match value {
            Value::Array(items) => Value::Array(items.iter().map(|v| walk(v, rest)).collect()),
            _ => Value::Null,
        },
        Some((first, rest)) => value.get(first).map_or(Value::Null, |v| walk(v, rest)),
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A template as text; values placed in a path are percent-encoded.
fn render_text(t: &Template, scope: &Scope, item: Option<&Value>, in_path: bool) -> String {
    let mut out = String::new();
    for part in &t.parts {
        match part {
            TemplatePart::Text(s) => out.push_str(s),
            TemplatePart::Ref(r) => {
                let text = text_of(&resolve(r, scope, item));
                if in_path {
                    out.extend(utf8_percent_encode(&text, SEGMENT));
                } else {
                    out.push_str(&text);
                }
            }
        }
    }
    out
}

/// A shape with its references filled: a template that is one reference yields that
/// JSON value; others yield text.
fn render_shape(shape: &Shape, scope: &Scope, item: Option<&Value>) -> Value {
    match shape {
        Shape::Template(t) => match t.whole_reference() {
            Some(r) => resolve(r, scope, item),
            None => Value::String(render_text(t, scope, item, false)),
        },
        Shape::Array(items) => {
            Value::Array(items.iter().map(|s| render_shape(s, scope, item)).collect())
        }
        Shape::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, s)| (k.clone(), render_shape(s, scope, item)))
                .collect(),
        ),
        Shape::Literal(v) => v.clone(),
    }
}
