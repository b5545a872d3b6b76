//! The `[log]` section: level filter, line format, access log.

use super::raw::RawLog;
use super::validate::Validator;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// A filter such as `info` or `info,stoa=debug`; `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
    /// One line per request (target `stoa::access`).
    pub access_log: bool,
}

impl Validator<'_> {
    pub(super) fn log(&mut self, raw: RawLog) -> Option<LogSettings> {
        let level = raw.level.unwrap_or_else(|| "info".to_string());
        let level_ok = tracing_subscriber::EnvFilter::try_new(&level).is_ok();
        if !level_ok {
            self.problem(
                "log.level",
                format!("{level:?} is not a level or filter like \"info\""),
            );
        }
        let format = match raw.format.as_deref() {
            None | Some("text") => Some(LogFormat::Text),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                self.problem("log.format", format!("{other:?} is not one of text, json"));
                None
            }
        };
        Some(LogSettings {
            level: level_ok.then_some(level)?,
            format: format?,
            access_log: raw.access_log.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_lowercase() {
        let f: LogFormat = serde_json::from_str("\"json\"").unwrap();
        assert_eq!(f, LogFormat::Json);
        let f: LogFormat = serde_json::from_str("\"text\"").unwrap();
        assert_eq!(f, LogFormat::Text);
        assert!(serde_json::from_str::<LogFormat>("\"JSON\"").is_err());
    }
}
