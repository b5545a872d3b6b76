//! `[[routes]]`: method and path template, upstream and rewrite, and the checks across
//! routes (unique names, no two routes matching the same requests, `invalidates`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use figment::value::Value;

use super::limits::NO_RATE_LIMIT;
use super::raw::RawRoute;
use super::upstream::Upstream;
use super::validate::Validator;
use super::{AggregateSpec, CacheSettings, PolicySettings};
use crate::routes::{PathTemplate, RewriteTemplate};

/// The standard methods (RFC 9110 §9): any other token is an extension method, but one
/// that spells a standard method in other case is a mistake (methods are case-sensitive).
const STANDARD_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

/// Whether `m` is a method token (RFC 9110 §9.1, §5.6.2: one or more `tchar`s).
fn is_token(m: &str) -> bool {
    !m.is_empty()
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    /// `None`: every method.
    pub methods: Option<Vec<http::Method>>,
    pub path: PathTemplate,
    /// `None` for aggregate routes, whose legs reach upstreams through other routes.
    pub upstream: Option<Arc<Upstream>>,
    /// Set on aggregate routes.
    pub aggregate: Option<Arc<AggregateSpec>>,
    pub rewrite: Option<RewriteTemplate>,
    /// `None`: a pass-through route.
    pub cache: Option<CacheSettings>,
    /// The rate-limit policy applied to this route, by name.
    pub rate_limit: Option<String>,
    /// Cached routes whose entries for the same upstream path a successful write here
    /// purges (e.g. `DELETE /products/{id}` invalidates `GET /products/{id}`).
    pub invalidates: Vec<String>,
}

impl Validator<'_> {
    pub(super) fn routes(
        &mut self,
        raw: Option<Value>,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        upstream_names: &[String],
        rate_limits: &BTreeMap<String, PolicySettings>,
    ) -> Vec<(usize, RouteSpec)> {
        let Some(raw) = raw else { return Vec::new() };
        let Some(items) = raw.into_array() else {
            self.problem("routes", "must be an array of tables ([[routes]])");
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut seen: Vec<RouteForConflicts> = Vec::new();
        for (i, value) in items.iter().enumerate() {
            let path = format!("routes[{i}]");
            let Some(raw) = self.section::<RawRoute>(&path, value) else {
                continue;
            };
            if let Some(name) = &raw.rate_limit {
                if name != NO_RATE_LIMIT && !rate_limits.contains_key(name) {
                    self.problem(
                        format!("{path}.rate_limit"),
                        format!("no rate limit policy named {name:?}"),
                    );
                }
            }
            let (route, matcher) = self.route(&path, raw, upstreams, upstream_names);
            self.check_route_conflicts(i, &matcher, &seen);
            seen.push(matcher);
            out.extend(route.map(|r| (i, r)));
        }
        out
    }

    fn route(
        &mut self,
        path: &str,
        mut raw: RawRoute,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        upstream_names: &[String],
    ) -> (Option<RouteSpec>, RouteForConflicts) {
        let name_ok = self.name_ok(&format!("{path}.name"), &raw.name);
        let is_aggregate = raw.legs.is_some();
        let methods = match (raw.methods.take(), is_aggregate) {
            (None, false) => Some(None),
            (None, true) => Some(Some(vec![http::Method::GET])),
            (Some(list), _) => self.methods(&format!("{path}.methods"), &list).map(Some),
        };
        if is_aggregate {
            let only_reads = methods.as_ref().and_then(|m| m.as_ref()).is_some_and(|ms| {
                ms.iter()
                    .all(|m| m == http::Method::GET || m == http::Method::HEAD)
            });
            if methods.is_some() && !only_reads {
                self.problem(
                    format!("{path}.methods"),
                    "an aggregate route answers GET and HEAD only",
                );
            }
        }
        let template = match PathTemplate::parse(&raw.path) {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(format!("{path}.path"), format!("{:?} {e}", raw.path));
                None
            }
        };
        let aggregate = if is_aggregate {
            self.aggregate(path, &mut raw, template.as_ref())
                .map(|a| Some(Arc::new(a)))
        } else {
            Some(None)
        };
        let upstream = match (&raw.upstream, is_aggregate) {
            (_, true) => Some(None),
            (None, false) => {
                self.problem(
                    format!("{path}.upstream"),
                    "needs an upstream (or legs, for an aggregate route)",
                );
                None
            }
            (Some(name), false) => {
                if !upstream_names.contains(name) {
                    self.problem(
                        format!("{path}.upstream"),
                        format!("no upstream named {name:?}"),
                    );
                }
                upstreams.get(name).cloned().map(Some)
            }
        };
        let rewrite = match (&raw.rewrite, &template) {
            (Some(_), _) if is_aggregate => Some(None),
            (Some(text), Some(t)) => match RewriteTemplate::parse(text, t) {
                Ok(r) => Some(Some(r)),
                Err(e) => {
                    self.problem(format!("{path}.rewrite"), format!("{text:?} {e}"));
                    None
                }
            },
            (Some(_), None) => None,
            (None, _) => Some(None),
        };
        let cache = match (raw.cache.take(), &methods) {
            (None, _) => Some(None),
            (Some(_), _) if is_aggregate => Some(None),
            (Some(c), Some(ms)) => {
                let lock_timeout = upstream
                    .as_ref()
                    .and_then(|u| u.as_ref())
                    .map_or(Duration::from_secs(30), |u| u.timeout);
                self.cache_settings(
                    &format!("{path}.cache"),
                    c,
                    ms.as_deref(),
                    lock_timeout,
                    template.as_ref(),
                )
                .map(Some)
            }
            (Some(_), None) => None,
        };
        let matcher = RouteForConflicts {
            name: raw.name.clone(),
            methods: methods.clone().flatten(),
            path: template.clone(),
        };
        let route = (|| {
            name_ok.then_some(())?;
            Some(RouteSpec {
                name: raw.name,
                methods: methods?,
                path: template?,
                upstream: upstream?,
                aggregate: aggregate?,
                rewrite: rewrite?,
                cache: cache?,
                rate_limit: raw.rate_limit,
                invalidates: raw.invalidates.unwrap_or_default(),
            })
        })();
        (route, matcher)
    }

    fn methods(&mut self, path: &str, list: &[String]) -> Option<Vec<http::Method>> {
        if list.is_empty() {
            self.problem(
                path,
                "must name at least one method (or be left out for all)",
            );
            return None;
        }
        let mut out: Vec<http::Method> = Vec::with_capacity(list.len());
        let mut ok = true;
        for (i, m) in list.iter().enumerate() {
            if !is_token(m) {
                self.problem(
                    format!("{path}[{i}]"),
                    format!("{m:?} is not a method: a method is a token (letters, digits, !#$%&'*+-.^_`|~)"),
                );
                ok = false;
                continue;
            }
            if let Some(standard) = STANDARD_METHODS
                .iter()
                .find(|s| s.eq_ignore_ascii_case(m) && **s != m.as_str())
            {
                self.problem(
                    format!("{path}[{i}]"),
                    format!("{m:?} is not {standard}: methods are case-sensitive"),
                );
                ok = false;
                continue;
            }
            match http::Method::from_bytes(m.as_bytes()) {
                Ok(method) => {
                    if out.contains(&method) {
                        self.problem(format!("{path}[{i}]"), format!("{m} is listed twice"));
                        ok = false;
                    }
                    out.push(method);
                }
                Err(_) => {
                    self.problem(format!("{path}[{i}]"), format!("{m:?} is not a method"));
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// `invalidates` may only name cached routes.
    pub(super) fn check_invalidates(&mut self, routes: &[(usize, RouteSpec)]) {
        for (i, route) in routes {
            for (j, target) in route.invalidates.iter().enumerate() {
                let cached = routes
                    .iter()
                    .any(|(_, r)| &r.name == target && r.cache.is_some());
                if !cached {
                    self.problem(
                        format!("routes[{i}].invalidates[{j}]"),
                        format!("no cached route named {target:?}"),
                    );
                }
            }
        }
    }

    /// Names must be unique, and no two routes may match the same requests.
    fn check_route_conflicts(
        &mut self,
        i: usize,
        route: &RouteForConflicts,
        earlier: &[RouteForConflicts],
    ) {
        for (j, other) in earlier.iter().enumerate() {
            if other.name == route.name {
                self.problem(
                    format!("routes[{i}].name"),
                    format!("{:?} is already the name of routes[{j}]", route.name),
                );
            }
            let methods_overlap = match (&route.methods, &other.methods) {
                (None, _) | (_, None) => true,
                (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
            };
            let (Some(path), Some(other_path)) = (&route.path, &other.path) else {
                continue;
            };
            if methods_overlap && path.equivalent(other_path) {
                self.problem(
                    format!("routes[{i}].path"),
                    format!(
                        "{:?} matches the same requests as routes[{j}] ({:?}, path {:?})",
                        path.as_str(),
                        other.name,
                        other_path.as_str()
                    ),
                );
            }
        }
    }
}

/// What conflict checks need of a route, kept even when the route has other problems.
struct RouteForConflicts {
    name: String,
    methods: Option<Vec<http::Method>>,
    path: Option<PathTemplate>,
}

#[cfg(test)]
mod tests {
    use crate::config::tests::problems;

    #[test]
    fn duplicate_names_and_overlapping_routes_are_errors() {
        let text = r#"
            [upstreams.u]
            url = "http://127.0.0.1:9"
            [[routes]]
            name = "a"
            methods = ["GET"]
            path = "/p/{id}"
            upstream = "u"
            [[routes]]
            name = "b"
            methods = ["GET", "POST"]
            path = "/p/{other}"
            upstream = "u"
            [[routes]]
            name = "c"
            methods = ["DELETE"]
            path = "/p/{id}"
            upstream = "u"
            [[routes]]
            name = "a"
            path = "/q"
            upstream = "u"
        "#;
        let p = problems(text);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(p[0]
            .starts_with("routes[1].path: \"/p/{other}\" matches the same requests as routes[0]"));
        assert!(p[1].starts_with("routes[3].name: \"a\" is already the name of routes[0]"));
    }
}
