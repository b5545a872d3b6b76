//! Loading and validating the TOML configuration: the ground floor every other module
//! builds on, importing none of them.
//!
//! The file is read with figment and merged with `STOA_<SECTION>__<KEY>` environment
//! overrides. Each section and each entry is deserialized on its own ([`raw`], the file
//! format) and then validated into typed settings, one file per section, collecting
//! **every** problem with its key path, like `nginx -t`.

mod admin;
mod aggregate;
mod assemble;
mod cache;
pub mod capacity;
mod cluster;
mod limits;
mod log;
mod problem;
mod raw;
mod route;
mod schema;
mod server;
mod traces;
mod upstream;
mod upstream_tls;
mod validate;

use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::value::Dict;
use figment::Figment;

pub use admin::AdminSettings;
pub use aggregate::spec::{
    AggregateSpec, LegSpec, OnLegError, Pick, Reference, Shape, Template, TemplatePart,
};
pub use assemble::Config;
pub use cache::settings::{
    CacheSettings, Coding, CompressionSettings, Freshness, KeyBody, KeyQuery, OnLockTimeout,
    RefreshHook, Silent, UnkeyedBody, WarmRequest, DEFAULT_TARGETED_FIELD,
};
pub use cache::tags::{
    TagScope, TagSource, TagTemplate, TagTemplateError, MAX_TAGS, MAX_TAG_BYTES,
};
pub use cache::{CacheStoreSettings, DiskSettings, UNKEYABLE_HEADERS};
pub use cluster::{redact_url, ClusterSettings, RedisTarget};
pub use limits::{
    AppliesTo, ClientSource, Mode, PolicySettings, RateLimitHeaders, Scope, MAX_REFILL,
};
pub use log::{LogFormat, LogSettings};
pub use problem::{ConfigErrors, Problem};
pub use route::RouteSpec;
pub use schema::schema_json;
pub use server::{ConnectionLimits, RequestIdMode, ServerSettings, WorkerModel};
pub use traces::TraceSettings;
pub use upstream::{Upstream, UpstreamGuardSettings};
pub use upstream_tls::{ClientIdentity, UpstreamTls};
use validate::Validator;

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "STOA_";

/// Where configuration values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvOverrides {
    /// Apply `STOA_<SECTION>__<KEY>` variables from the process environment.
    Apply,
    /// Use the file alone.
    Ignore,
}

/// Reads, merges and validates the configuration file at `path`.
pub fn load(path: &Path, env: EnvOverrides) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Problem {
            path: String::new(),
            message: format!("cannot read configuration file {}: {e}", path.display()),
        }])
    })?;
    load_str(&text, env)
}

/// Merges and validates configuration text.
pub fn load_str(text: &str, env: EnvOverrides) -> Result<Config, ConfigErrors> {
    let mut figment = Figment::from(Toml::string(text));
    if env == EnvOverrides::Apply {
        // Only `SECTION__KEY` variables are overrides; e.g. `STOA_CONFIG` is not.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
    }
    let root: Dict = figment.extract().map_err(|e| {
        ConfigErrors(
            e.into_iter()
                .map(|e| Problem {
                    path: e.path.join("."),
                    message: e.to_string(),
                })
                .collect(),
        )
    })?;
    Validator::new(&figment).assemble(root)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Problems as `stoa check` prints them.
    pub(super) fn lines(problems: &[Problem]) -> Vec<String> {
        problems.iter().map(|p| p.to_string()).collect()
    }

    /// Every problem `text` has, as `stoa check` prints them.
    pub(super) fn problems(text: &str) -> Vec<String> {
        match load_str(text, EnvOverrides::Ignore) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|p| p.to_string()).collect(),
        }
    }

    pub(super) const GOOD: &str = r#"
        [server]
        listen = "127.0.0.1:18080"
        max_body_bytes = "64KiB"
        [admin]
        listen = "127.0.0.1:19901"
        [upstreams.menu]
        url = "http://127.0.0.1:9001/base/"
        timeout = "5s"
        [[routes]]
        name = "restaurant"
        methods = ["GET"]
        path = "/restaurant/{id}"
        upstream = "menu"
        rewrite = "/api/restaurant/{id}"
    "#;

    #[test]
    fn a_good_file_gives_typed_settings() {
        let c = load_str(GOOD, EnvOverrides::Ignore).unwrap();
        assert_eq!(c.server.max_body_bytes, 64 * 1024);
        assert_eq!(c.server.threads, server::default_threads());
        assert_eq!(c.server.request_id, RequestIdMode::Generate);
        assert_eq!(c.server.worker_model, WorkerModel::Workers);
        let up = &c.upstreams["menu"];
        assert_eq!(up.timeout, Duration::from_secs(5));
        assert_eq!(up.host_header, "127.0.0.1:9001");
        assert_eq!(up.base_path, "/base");
        assert_eq!(
            c.routes[0].rewrite.as_ref().unwrap().as_str(),
            "/api/restaurant/{id}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            bogus = 1
            [server]
            listen = "nowhere"
            max_body_bytes = "lots"
            shutdown_timeout = 5
            [upstreams.a]
            url = "ftp://x"
            [upstreams.b]
            url = "http://127.0.0.1:1"
            colour = "red"
            [[routes]]
            name = "one"
            path = "/x/{id}"
            upstream = "clvv"
            rewrite = "/y/{name}"
            [[routes]]
            name = "one"
            methods = ["get"]
            path = "no-slash"
            upstream = "a"
        "#;
        let p = problems(text);
        let expect = [
            "bogus: unknown section",
            "server.listen: \"nowhere\"",
            "server.max_body_bytes:",
            "server.shutdown_timeout: 5 has no unit",
            "upstreams.a.url:",
            "upstreams.b.colour: unknown key \"colour\"",
            "routes[0].upstream: no upstream named \"clvv\"",
            "routes[0].rewrite: \"/y/{name}\" uses parameter {name}",
            "routes[1].methods[0]:",
            "routes[1].path: \"no-slash\" must start with '/'",
            "routes[1].name: \"one\" is already the name of routes[0]",
        ];
        for e in expect {
            assert!(
                p.iter().any(|l| l.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    #[test]
    fn same_address_for_admin_and_server_is_an_error() {
        let p = problems("[server]\nlisten = \"127.0.0.1:1\"\n[admin]\nlisten = \"127.0.0.1:1\"\n");
        assert_eq!(
            p,
            vec!["admin.listen: must differ from server.listen".to_string()]
        );
    }

    #[test]
    fn toml_syntax_errors_are_reported() {
        let p = problems("[server\nlisten = 1");
        assert_eq!(p.len(), 1);
    }
}
