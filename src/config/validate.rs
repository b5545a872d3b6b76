//! The one way every section is validated: a [`Validator`] collects each problem with its
//! key path while turning raw values into typed settings. Each section adds its own
//! methods to it in its own file.

use std::net::SocketAddr;
use std::time::Duration;

use figment::value::Value;
use figment::Figment;
use serde::de::DeserializeOwned;

use super::problem::Problem;
use super::raw::{RawDuration, RawSize};

/// Collects problems while turning raw values into typed settings.
pub(super) struct Validator<'f> {
    figment: &'f Figment,
    pub(super) problems: Vec<Problem>,
}

impl<'f> Validator<'f> {
    pub(super) fn new(figment: &'f Figment) -> Self {
        Validator {
            figment,
            problems: Vec::new(),
        }
    }

    pub(super) fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Deserializes one section or entry, reporting a failure at its path. An unknown key,
    /// at any depth, is reported and set aside, and the rest is read again: so the known
    /// keys beside it are still validated and every problem shows in one run.
    pub(super) fn section<T: DeserializeOwned>(&mut self, path: &str, value: &Value) -> Option<T> {
        let source = self
            .figment
            .get_metadata(value.tag())
            .filter(|m| m.name.contains("environment"))
            .map(|_| " (set from the environment)")
            .unwrap_or("");
        let mut value = value.clone();
        loop {
            match value.deserialize::<T>() {
                Ok(v) => return Some(v),
                Err(e) => {
                    let mut set_aside = false;
                    for err in e {
                        if matches!(err.kind, figment::error::Kind::UnknownField(..)) {
                            set_aside |= remove_at(&mut value, &err.path);
                        }
                        self.report(path, &err, source);
                    }
                    if !set_aside {
                        return None;
                    }
                }
            }
        }
    }

    /// Reports one deserialization error of the section at `path`.
    fn report(&mut self, path: &str, err: &figment::Error, source: &str) {
        let mut full = path.to_string();
        for p in &err.path {
            full.push('.');
            full.push_str(p);
        }
        let message = match &err.kind {
            figment::error::Kind::UnknownField(field, expected) => format!(
                "unknown key {field:?} (expected one of: {})",
                expected.join(", ")
            ),
            other => other.to_string(),
        };
        self.problem(full, format!("{message}{source}"));
    }

    pub(super) fn address(
        &mut self,
        path: &str,
        value: Option<&str>,
        default: &str,
    ) -> Option<SocketAddr> {
        let text = value.unwrap_or(default);
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    path,
                    format!("{text:?} is not an address like \"127.0.0.1:8080\""),
                );
                None
            }
        }
    }

    pub(super) fn duration(
        &mut self,
        path: &str,
        value: Option<&RawDuration>,
        default: Duration,
    ) -> Option<Duration> {
        let parsed = match value {
            None => return Some(default),
            Some(RawDuration::Number(n)) => Err(format!(
                "{n} has no unit; write a duration like \"{n}s\" or \"{n}ms\""
            )),
            Some(RawDuration::Text(t)) => humantime::parse_duration(t).map_err(|e| {
                format!("{t:?} is not a duration like \"250ms\", \"5s\" or \"5m\": {e}")
            }),
        };
        match parsed {
            Ok(d) if d.is_zero() => {
                self.problem(path, "must be greater than zero");
                None
            }
            Ok(d) => Some(d),
            Err(msg) => {
                self.problem(path, msg);
                None
            }
        }
    }

    pub(super) fn size(
        &mut self,
        path: &str,
        value: Option<&RawSize>,
        default: u64,
    ) -> Option<u64> {
        let parsed = match value {
            None => return Some(default),
            Some(RawSize::Bytes(n)) => Ok(*n),
            Some(RawSize::Text(t)) => t
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| b.as_u64())
                .map_err(|e| format!("{t:?} is not a size like \"64KiB\" or \"256MiB\": {e}")),
        };
        match parsed {
            Ok(0) => {
                self.problem(path, "must be greater than zero");
                None
            }
            Ok(n) => Some(n),
            Err(msg) => {
                self.problem(path, msg);
                None
            }
        }
    }

    pub(super) fn name_ok(&mut self, path: &str, name: &str) -> bool {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            self.problem(
                path,
                format!("name {name:?} must be 1-64 letters, digits, '_' or '-'"),
            );
        }
        ok
    }
}

/// Removes the key at `path` (table keys and array indices) from `value`; `false` when
/// there is none.
fn remove_at(value: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut current = value;
    for step in parents {
        let next = match current {
            Value::Dict(_, dict) => dict.get_mut(step),
            Value::Array(_, items) => step.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        };
        let Some(next) = next else {
            return false;
        };
        current = next;
    }
    match current {
        Value::Dict(_, dict) => dict.remove(last).is_some(),
        _ => false,
    }
}
