//! Validation of aggregate routes: legs, picks, templates and the answer's shape.

use std::time::Duration;

use crate::config::raw::{RawLeg, RawPick, RawRoute};
use crate::config::validate::Validator;
use crate::config::{CacheSettings, KeyBody, KeyQuery, OnLockTimeout, RouteSpec, UnkeyedBody};
use crate::routes::{Lookup, PathTemplate, RouteTable};
use spec::{AggregateSpec, LegSpec, OnLegError, Pick, Reference, Shape, Template, TemplatePart};

pub mod spec;

/// Most parallel calls one fan-out leg may make.
const MAX_FAN_OUT_LIMIT: usize = 1000;

impl Validator<'_> {
    /// Validates the aggregate parts of a route (`legs`, `respond`, `on_leg_error`,
    /// `deadline`). References may name route parameters, `query.<name>`, earlier legs and,
    /// in a fan-out leg, `item`.
    pub(super) fn aggregate(
        &mut self,
        path: &str,
        raw: &mut RawRoute,
        template: Option<&PathTemplate>,
    ) -> Option<AggregateSpec> {
        let legs_raw = raw.legs.take().unwrap_or_default();
        if legs_raw.is_empty() {
            self.problem(
                format!("{path}.legs"),
                "an aggregate route needs at least one leg",
            );
        }
        for (key, present) in [
            ("upstream", raw.upstream.is_some()),
            ("rewrite", raw.rewrite.is_some()),
            ("cache", raw.cache.is_some()),
        ] {
            if present {
                self.problem(
                    format!("{path}.{key}"),
                    "an aggregate route takes no upstream, rewrite or cache of its own: its legs have them",
                );
            }
        }
        let on_leg_error = match raw.on_leg_error.as_deref() {
            None | Some("fail") => Some(OnLegError::Fail),
            Some("partial") => Some(OnLegError::Partial),
            Some(other) => {
                self.problem(
                    format!("{path}.on_leg_error"),
                    format!("{other:?} is not one of fail, partial"),
                );
                None
            }
        };
        let deadline = self.duration(
            &format!("{path}.deadline"),
            raw.deadline.as_ref(),
            Duration::from_secs(10),
        );

        let mut legs: Vec<LegSpec> = Vec::new();
        let mut ok = true;
        for (i, leg) in legs_raw.into_iter().enumerate() {
            let leg_path = format!("{path}.legs[{i}]");
            match self.leg(&leg_path, leg, &legs, template) {
                Some(l) => legs.push(l),
                None => ok = false,
            }
        }
        let respond = match raw.respond.take() {
            None => Some(None),
            Some(value) => match Shape::parse(&value) {
                Ok(shape) => {
                    let names: Vec<&str> = legs.iter().map(|l| l.name.as_str()).collect();
                    for r in shape.references() {
                        self.check_reference(
                            &format!("{path}.respond"),
                            r,
                            template,
                            &names,
                            false,
                        );
                    }
                    Some(Some(shape))
                }
                Err(e) => {
                    self.problem(format!("{path}.respond"), e);
                    None
                }
            },
        };
        Some(AggregateSpec {
            legs: ok.then_some(legs)?,
            on_leg_error: on_leg_error?,
            deadline: deadline?,
            respond: respond?,
        })
    }

    fn leg(
        &mut self,
        path: &str,
        raw: RawLeg,
        earlier: &[LegSpec],
        template: Option<&PathTemplate>,
    ) -> Option<LegSpec> {
        let before = self.problems.len();
        self.name_ok(&format!("{path}.name"), &raw.name);
        if earlier.iter().any(|l| l.name == raw.name) {
            self.problem(
                format!("{path}.name"),
                format!("{:?} names an earlier leg", raw.name),
            );
        }
        if ["query", "item"].contains(&raw.name.as_str())
            || template.is_some_and(|t| t.has_param(&raw.name))
        {
            self.problem(
                format!("{path}.name"),
                format!(
                    "{:?} is taken by a route parameter or a built-in name",
                    raw.name
                ),
            );
        }
        let names: Vec<&str> = earlier.iter().map(|l| l.name.as_str()).collect();
        if let Some(each) = &raw.for_each {
            if !names.contains(&each.as_str()) {
                self.problem(
                    format!("{path}.for_each"),
                    format!("{each:?} is not an earlier leg"),
                );
            }
        }
        let fan_out = raw.for_each.is_some();
        let method = raw.method.as_deref().unwrap_or("GET");
        let method = match http::Method::from_bytes(method.as_bytes()) {
            Ok(m) if ["GET", "POST"].contains(&method) => Some(m),
            _ => {
                self.problem(
                    format!("{path}.method"),
                    format!("{method:?} is not GET or POST"),
                );
                None
            }
        };
        let leg_template = match Template::parse(&raw.path) {
            Ok(t) if raw.path.starts_with('/') => {
                for r in t.references() {
                    self.check_reference(&format!("{path}.path"), r, template, &names, fan_out);
                }
                Some(t)
            }
            Ok(_) => {
                self.problem(format!("{path}.path"), "must start with '/'");
                None
            }
            Err(e) => {
                self.problem(format!("{path}.path"), e);
                None
            }
        };
        let body = match &raw.body {
            None => Some(None),
            Some(v) => match Shape::parse(v) {
                Ok(shape) => {
                    for r in shape.references() {
                        self.check_reference(&format!("{path}.body"), r, template, &names, fan_out);
                    }
                    Some(Some(shape))
                }
                Err(e) => {
                    self.problem(format!("{path}.body"), e);
                    None
                }
            },
        };
        let pick = match raw.pick {
            None => Some(Pick::All),
            Some(RawPick::Pointer(p)) if p.is_empty() || p.starts_with('/') => {
                Some(Pick::Pointer(p))
            }
            Some(RawPick::Pointer(p)) => {
                self.problem(
                    format!("{path}.pick"),
                    format!("{p:?} is not a JSON pointer like \"/restaurant\""),
                );
                None
            }
            Some(RawPick::Find(find)) => match Template::parse(&find.equals) {
                Ok(equals) if find.from.is_empty() || find.from.starts_with('/') => {
                    for r in equals.references() {
                        self.check_reference(
                            &format!("{path}.pick.equals"),
                            r,
                            template,
                            &names,
                            fan_out,
                        );
                    }
                    Some(Pick::Find {
                        from: find.from,
                        field: find.field,
                        equals,
                        all: find.all.unwrap_or(false),
                    })
                }
                Ok(_) => {
                    self.problem(
                        format!("{path}.pick.from"),
                        "must be a JSON pointer like \"/restaurants\"",
                    );
                    None
                }
                Err(e) => {
                    self.problem(format!("{path}.pick.equals"), e);
                    None
                }
            },
        };
        let max_fan_out = match raw.max_fan_out {
            None => 50,
            Some(n) if (1..=MAX_FAN_OUT_LIMIT as i64).contains(&n) => n as usize,
            Some(n) => {
                self.problem(
                    format!("{path}.max_fan_out"),
                    format!("{n} is not between 1 and {MAX_FAN_OUT_LIMIT}"),
                );
                0
            }
        };
        let timeout = self.duration(
            &format!("{path}.timeout"),
            raw.timeout.as_ref(),
            Duration::from_secs(5),
        );
        if self.problems.len() > before {
            return None;
        }
        Some(LegSpec {
            into: raw.into.unwrap_or_else(|| raw.name.clone()),
            name: raw.name,
            method: method?,
            path: leg_template?,
            body: body?,
            pick: pick?,
            for_each: raw.for_each,
            max_fan_out,
            timeout: timeout?,
        })
    }

    fn check_reference(
        &mut self,
        path: &str,
        r: &Reference,
        template: Option<&PathTemplate>,
        earlier_legs: &[&str],
        fan_out: bool,
    ) {
        let known = match r.root.as_str() {
            "query" => r.path.len() == 1,
            "item" => fan_out,
            root if r.path.is_empty() && template.is_some_and(|t| t.has_param(root)) => true,
            root => earlier_legs.contains(&root),
        };
        if !known {
            self.problem(
                path.to_string(),
                format!(
                    "{{{}}} is neither a route parameter, query.<name>, item (in a for_each leg) nor an earlier leg",
                    std::iter::once(r.root.as_str())
                        .chain(r.path.iter().map(String::as_str))
                        .collect::<Vec<_>>()
                        .join(".")
                ),
            );
        }
    }

    /// Every leg must lead to a route that is not itself an aggregate; the aggregate's
    /// answer is cached for the shortest TTL among the routes its legs reach.
    pub(super) fn link_aggregates(&mut self, routes: &mut [(usize, RouteSpec)]) {
        let table = RouteTable::new(routes.iter().map(|(_, r)| RouteForLegs::from(r)).collect());
        let mut updates = Vec::new();
        for (k, (i, route)) in routes.iter().enumerate() {
            let Some(aggregate) = &route.aggregate else {
                continue;
            };
            let mut ttl: Option<Duration> = None;
            for (j, leg) in aggregate.legs.iter().enumerate() {
                let sample = sample_path(&leg.path);
                match table.lookup(&leg.method, &sample) {
                    Lookup::Found(_, target, _) if target.aggregate => self.problem(
                        format!("routes[{i}].legs[{j}].path"),
                        format!(
                            "{:?} leads to aggregate route {:?}: legs must reach plain routes",
                            leg.path.source, target.name
                        ),
                    ),
                    Lookup::Found(_, target, _) => {
                        let leg_ttl = target.ttl.unwrap_or(Duration::ZERO);
                        ttl = Some(ttl.map_or(leg_ttl, |t| t.min(leg_ttl)));
                    }
                    _ => self.problem(
                        format!("routes[{i}].legs[{j}].path"),
                        format!("{} {:?} matches no route", leg.method, leg.path.source),
                    ),
                };
            }
            updates.push((
                k,
                aggregate_cache(ttl.unwrap_or(Duration::ZERO), aggregate.deadline),
            ));
        }
        for (k, cache) in updates {
            routes[k].1.cache = Some(cache);
        }
    }
}

/// The cache settings of an aggregate's merged answer.
fn aggregate_cache(ttl: Duration, deadline: Duration) -> CacheSettings {
    CacheSettings {
        ttl,
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        statuses: Vec::new(),
        key_query: KeyQuery::All,
        key_body: KeyBody::None,
        key_headers: Vec::new(),
        unkeyed_body: UnkeyedBody::Drop,
        lock_timeout: deadline + Duration::from_secs(1),
        on_lock_timeout: OnLockTimeout::Error,
        refresh_ahead: None,
        jitter: 0.0,
        ignore_upstream_cache_control: false,
        freshness: crate::config::Freshness::Route,
        max_ttl: None,
        silent: crate::config::Silent::Ttl,
        // The `[cache]` one, filled in with the other routes'.
        targeted_field: http::HeaderName::from_static(crate::config::DEFAULT_TARGETED_FIELD),
        warm: Vec::new(),
        refresh_hook: None,
        // The `[cache]` default, filled in with the other routes'.
        max_entry_bytes: 0,
        compress: None,
        max_variants: crate::config::cache::DEFAULT_MAX_VARIANTS,
        compression: None,
        tags: Vec::new(),
    }
}

/// A concrete path for a leg template, to find the route it reaches: each reference
/// becomes one segment of placeholder text.
fn sample_path(template: &Template) -> String {
    template
        .parts
        .iter()
        .map(|p| match p {
            TemplatePart::Text(t) => t.as_str(),
            TemplatePart::Ref(_) => "x",
        })
        .collect()
}

/// What route resolution needs of a route spec, during validation.
struct RouteForLegs {
    name: String,
    path: PathTemplate,
    methods: Option<Vec<http::Method>>,
    aggregate: bool,
    ttl: Option<Duration>,
}

impl From<&RouteSpec> for RouteForLegs {
    fn from(r: &RouteSpec) -> Self {
        RouteForLegs {
            name: r.name.clone(),
            path: r.path.clone(),
            methods: r.methods.clone(),
            aggregate: r.aggregate.is_some(),
            ttl: r.cache.as_ref().map(|c| c.ttl),
        }
    }
}

impl crate::routes::Routable for RouteForLegs {
    fn path(&self) -> &PathTemplate {
        &self.path
    }
    fn methods(&self) -> Option<&[http::Method]> {
        self.methods.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::problems;
    use crate::config::{load_str, EnvOverrides};

    #[test]
    fn aggregate_templates_are_validated() {
        let text = r#"
            [upstreams.u]
            url = "http://127.0.0.1:9"
            [[routes]]
            name = "list"
            methods = ["GET"]
            path = "/list"
            upstream = "u"
            cache = { ttl = "10s" }
            [[routes]]
            name = "item"
            methods = ["GET"]
            path = "/item/{id}"
            upstream = "u"
            cache = { ttl = "3s" }
            [[routes]]
            name = "good"
            path = "/good/{name}"
            respond = { first = "{a.x}", all = "{b}" }
            [[routes.legs]]
            name = "a"
            path = "/list"
            pick = { from = "/items", where = "name", equals = "{name}" }
            [[routes.legs]]
            name = "b"
            path = "/item/{a.id}"
            [[routes]]
            name = "bad"
            path = "/bad/{name}"
            upstream = "u"
            respond = { x = "{nobody.y}" }
            [[routes.legs]]
            name = "a"
            path = "/item/{b.id}"
            [[routes.legs]]
            name = "b"
            path = "/item/{colour}"
            for_each = "c"
            [[routes]]
            name = "loops"
            path = "/loops/{name}"
            [[routes.legs]]
            name = "c"
            path = "/good/{name}"
            [[routes.legs]]
            name = "d"
            path = "/nowhere"
        "#;
        let p = problems(text);
        let expect = [
            "routes[3].upstream: an aggregate route takes no upstream",
            "routes[3].legs[0].path: {b.id} is neither",
            "routes[3].legs[1].for_each: \"c\" is not an earlier leg",
            "routes[3].legs[1].path: {colour} is neither",
            "routes[3].respond: {nobody.y} is neither",
            "routes[4].legs[0].path: \"/good/{name}\" leads to aggregate route \"good\"",
            "routes[4].legs[1].path: GET \"/nowhere\" matches no route",
        ];
        for e in expect {
            assert!(
                p.iter().any(|l| l.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");

        let good_only = text
            .split("[[routes]]\n            name = \"bad\"")
            .next()
            .unwrap();
        let c = load_str(good_only, EnvOverrides::Ignore).unwrap();
        let good = c.routes.iter().find(|r| r.name == "good").unwrap();
        assert_eq!(
            good.cache.as_ref().unwrap().ttl,
            Duration::from_secs(3),
            "cached for the shortest TTL among its legs"
        );
    }
}
