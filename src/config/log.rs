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
    /// Where access log lines go; `None`: stderr, with the other log lines. Read at start.
    pub access_log_file: Option<std::path::PathBuf>,
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
        let access_log_file = match raw.access_log_file {
            None => Some(None),
            Some(file) if file.trim().is_empty() => {
                self.problem(
                    "log.access_log_file",
                    "is empty; leave it out to write access lines to stderr",
                );
                None
            }
            Some(file) => {
                let path = std::path::PathBuf::from(file);
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => std::path::PathBuf::from("."),
                };
                if path.is_dir() {
                    self.problem(
                        "log.access_log_file",
                        format!("{} is a directory; name a file", path.display()),
                    );
                    None
                } else if !dir.is_dir() {
                    self.problem(
                        "log.access_log_file",
                        format!(
                            "the directory {} does not exist (the file is created, its directory is not)",
                            dir.display()
                        ),
                    );
                    None
                } else {
                    Some(Some(path))
                }
            }
        };
        Some(LogSettings {
            level: level_ok.then_some(level)?,
            format: format?,
            access_log: raw.access_log.unwrap_or(true),
            access_log_file: access_log_file?,
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
