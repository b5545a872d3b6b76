//! The `[tracing]` section: OpenTelemetry traces exported over OTLP/HTTP. Read at start.

use super::raw::RawTracing;
use super::validate::Validator;

/// The `[tracing]` section, when it names a collector.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The collector's base URL (`http://host:4318`): spans go to `<it>/v1/traces`.
    pub otlp_endpoint: String,
    /// The share of new traces kept (0.0–1.0); a client's sampled trace is always kept.
    pub sample_ratio: f64,
    /// The `service.name` spans carry.
    pub service_name: String,
}

impl Validator<'_> {
    /// `Ok(None)`: tracing off (no endpoint); `Err(())`: a problem was recorded.
    pub(super) fn traces(&mut self, raw: RawTracing) -> Result<Option<TraceSettings>, ()> {
        let mut ok = true;
        let sample_ratio = raw.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            self.problem(
                "tracing.sample_ratio",
                format!("{sample_ratio} is not between 0.0 and 1.0"),
            );
            ok = false;
        }
        let service_name = raw.service_name.unwrap_or_else(|| "stoa".to_string());
        if service_name.trim().is_empty() {
            self.problem("tracing.service_name", "is empty");
            ok = false;
        }
        let endpoint = match raw.otlp_endpoint {
            None => None,
            Some(e) => match url::Url::parse(&e) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                    Some(e.trim_end_matches('/').to_string())
                }
                _ => {
                    self.problem(
                        "tracing.otlp_endpoint",
                        format!("{e:?} is not an http(s) URL like \"http://127.0.0.1:4318\""),
                    );
                    ok = false;
                    None
                }
            },
        };
        if !ok {
            return Err(());
        }
        Ok(endpoint.map(|otlp_endpoint| TraceSettings {
            otlp_endpoint,
            sample_ratio,
            service_name,
        }))
    }
}
