//! The `[cluster]` section: the Redis (or Redis Cluster) that several stoa instances share.
//! Absent, stoa shares nothing and needs no Redis.

use std::time::Duration;

use super::raw::{RawCluster, RawRedis};
use super::validate::Validator;

/// Where the shared Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis (or Valkey) server: `redis://host:6379/0`.
    Single(String),
    /// The seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// A validated `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub redis: RedisTarget,
    /// This instance's name in logs and in what it writes to Redis; defaults to the host name.
    pub node_name: String,
    /// Put before every key stoa writes, so that several deployments can share one Redis.
    pub key_prefix: String,
    /// Bound on establishing a connection to Redis.
    pub connect_timeout: Duration,
    /// Bound on every command, from sending it to having its answer.
    pub command_timeout: Duration,
    /// Answers larger than this are not put in the shared tier (they stay in this node's).
    pub l2_max_entry_bytes: u64,
    /// The life of a lease on fetching a key, renewed by its holder while it fetches.
    pub lock_timeout: Duration,
    /// How long a purge waits for every live node to confirm it.
    pub ack_timeout: Duration,
    /// With `rediss://`: the CA certificates (PEM) trusted instead of the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// With `rediss://`: whether Redis's certificate is verified.
    pub tls_verify: bool,
}

impl ClusterSettings {
    /// Whether stoa speaks TLS to Redis (`rediss://`).
    pub fn tls(&self) -> bool {
        match &self.redis {
            RedisTarget::Single(url) => url.starts_with("rediss://"),
            RedisTarget::Cluster(seeds) => seeds.iter().any(|s| s.starts_with("rediss://")),
        }
    }

    /// The Redis address(es) without passwords, for logs and `stoa check`.
    pub fn redis_display(&self) -> String {
        match &self.redis {
            RedisTarget::Single(url) => redact_url(url),
            RedisTarget::Cluster(seeds) => {
                let seeds: Vec<String> = seeds.iter().map(|s| redact_url(s)).collect();
                format!("Redis Cluster [{}]", seeds.join(", "))
            }
        }
    }
}

/// `url` with its password, if any, replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only fails for URLs that cannot have a password, which this one has.
            let _ = parsed.set_password(Some("<redacted>"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

const DEFAULT_PREFIX: &str = "stoa:";
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(200);
const DEFAULT_L2_MAX_ENTRY_BYTES: u64 = 1 << 20;
const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(2);

impl Validator<'_> {
    pub(super) fn cluster(&mut self, raw: RawCluster) -> Option<ClusterSettings> {
        let before = self.problems.len();
        let tls = match &raw.redis {
            Some(RawRedis::One(url)) => url.starts_with("rediss://"),
            Some(RawRedis::Seeds(seeds)) => {
                let n = seeds.iter().filter(|s| s.starts_with("rediss://")).count();
                if n != 0 && n != seeds.len() {
                    self.problem(
                        "cluster.redis",
                        "the seed nodes mix redis:// and rediss://: use one for all",
                    );
                }
                n != 0
            }
            None => false,
        };
        let redis = match raw.redis {
            None => {
                self.problem(
                    "cluster.redis",
                    "is required: \"redis://host:6379/0\", or a list of Redis Cluster seed nodes",
                );
                None
            }
            Some(RawRedis::One(url)) => self
                .redis_url("cluster.redis", &url, true)
                .then_some(RedisTarget::Single(url)),
            Some(RawRedis::Seeds(seeds)) if seeds.is_empty() => {
                self.problem(
                    "cluster.redis",
                    "the list of Redis Cluster seed nodes is empty",
                );
                None
            }
            Some(RawRedis::Seeds(seeds)) => {
                let mut ok = true;
                for (i, url) in seeds.iter().enumerate() {
                    ok &= self.redis_url(&format!("cluster.redis[{i}]"), url, false);
                }
                ok.then_some(RedisTarget::Cluster(seeds))
            }
        };
        let node_name = match raw.node_name {
            Some(name) => name,
            None => host_name(),
        };
        let name_ok = !node_name.is_empty()
            && node_name.len() <= 64
            && node_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            self.problem(
                "cluster.node_name",
                format!("{node_name:?} must be 1-64 letters, digits, '.', '_' or '-'"),
            );
        }
        let key_prefix = raw.key_prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        if key_prefix.len() > 64 || key_prefix.chars().any(|c| !c.is_ascii_graphic()) {
            self.problem(
                "cluster.key_prefix",
                format!(
                    "{key_prefix:?} must be at most 64 printable ASCII characters without spaces"
                ),
            );
        }
        let connect_timeout = self.duration(
            "cluster.connect_timeout",
            raw.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let command_timeout = self.duration(
            "cluster.command_timeout",
            raw.command_timeout.as_ref(),
            DEFAULT_COMMAND_TIMEOUT,
        );
        let l2_max_entry_bytes = self.size(
            "cluster.l2_max_entry_bytes",
            raw.l2_max_entry_bytes.as_ref(),
            DEFAULT_L2_MAX_ENTRY_BYTES,
        );
        let lock_timeout = self.duration(
            "cluster.lock_timeout",
            raw.lock_timeout.as_ref(),
            DEFAULT_LOCK_TIMEOUT,
        );
        let ack_timeout = self.duration(
            "cluster.ack_timeout",
            raw.ack_timeout.as_ref(),
            DEFAULT_ACK_TIMEOUT,
        );
        for (key, set) in [
            ("ca_file", raw.ca_file.is_some()),
            ("tls_verify", raw.tls_verify.is_some()),
        ] {
            if set && !tls {
                self.problem(
                    format!("cluster.{key}"),
                    "applies to rediss:// (TLS) only; the redis url is redis://",
                );
            }
        }
        let ca_pem = match (&raw.ca_file, tls) {
            (Some(file), true) => self
                .certificates("cluster.ca_file", file)
                .map(|(_, pem)| pem),
            _ => None,
        };
        if self.problems.len() != before {
            return None;
        }
        Some(ClusterSettings {
            redis: redis?,
            node_name,
            key_prefix,
            connect_timeout: connect_timeout?,
            command_timeout: command_timeout?,
            l2_max_entry_bytes: l2_max_entry_bytes?,
            lock_timeout: lock_timeout?,
            ack_timeout: ack_timeout?,
            ca_pem,
            tls_verify: raw.tls_verify.unwrap_or(true),
        })
    }

    /// Checks one Redis URL; a Redis Cluster seed (`single == false`) has no database number.
    fn redis_url(&mut self, path: &str, text: &str, single: bool) -> bool {
        let url = match url::Url::parse(text) {
            Ok(url) => url,
            Err(e) => {
                self.problem(
                    path,
                    format!("{text:?} is not a URL like \"redis://host:6379/0\": {e}"),
                );
                return false;
            }
        };
        match url.scheme() {
            "redis" | "rediss" => {}
            other => {
                self.problem(
                    path,
                    format!("scheme {other:?} is not \"redis\" or \"rediss\""),
                );
                return false;
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            self.problem(path, format!("{text:?} names no host"));
            return false;
        }
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() {
            if db.parse::<u16>().is_err() {
                self.problem(path, format!("{db:?} is not a database number"));
                return false;
            }
            if !single && db != "0" {
                self.problem(path, "a Redis Cluster has only database 0");
                return false;
            }
        }
        true
    }
}

/// The host name, from the environment or the kernel; `"stoa"` when neither says.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "stoa".to_string())
}

#[cfg(test)]
mod tests {
    use crate::config::tests::problems;
    use crate::config::{load_str, EnvOverrides};

    use super::*;

    #[test]
    fn absent_means_no_cluster() {
        let c = load_str(crate::config::tests::GOOD, EnvOverrides::Ignore).unwrap();
        assert!(c.cluster.is_none());
    }

    #[test]
    fn defaults_fill_in() {
        let c = load_str(
            "[cluster]\nredis = \"redis://127.0.0.1:6379/2\"\nnode_name = \"a-1\"\n",
            EnvOverrides::Ignore,
        )
        .unwrap();
        let s = c.cluster.unwrap();
        assert_eq!(
            s.redis,
            RedisTarget::Single("redis://127.0.0.1:6379/2".into())
        );
        assert_eq!(s.node_name, "a-1");
        assert_eq!(s.key_prefix, "stoa:");
        assert_eq!(s.connect_timeout, Duration::from_secs(1));
        assert_eq!(s.command_timeout, Duration::from_millis(200));
        assert_eq!(s.l2_max_entry_bytes, 1 << 20);
        assert_eq!(s.lock_timeout, Duration::from_secs(2));
        let c = load_str(
            "[cluster]\nredis = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\ncommand_timeout = \"50ms\"\n",
            EnvOverrides::Ignore,
        )
        .unwrap();
        let s = c.cluster.unwrap();
        assert_eq!(
            s.redis,
            RedisTarget::Cluster(vec![
                "redis://10.0.0.1:7000".into(),
                "redis://10.0.0.2:7000".into()
            ])
        );
        assert!(!s.node_name.is_empty());
        assert_eq!(s.command_timeout, Duration::from_millis(50));
    }

    #[test]
    fn every_cluster_problem_is_reported() {
        let p = problems(
            "[cluster]\nredis = \"http://x\"\nnode_name = \"a b\"\nkey_prefix = \"p x\"\nconnect_timeout = 5\ncommand_timeout = \"0s\"\n",
        );
        assert_eq!(
            p,
            [
                "cluster.redis: scheme \"http\" is not \"redis\" or \"rediss\"",
                "cluster.node_name: \"a b\" must be 1-64 letters, digits, '.', '_' or '-'",
                "cluster.key_prefix: \"p x\" must be at most 64 printable ASCII characters without spaces",
                "cluster.connect_timeout: 5 has no unit; write a duration like \"5s\" or \"5ms\"",
                "cluster.command_timeout: must be greater than zero",
            ]
        );
        assert_eq!(
            problems("[cluster]\nredis = [\"redis://a:1/3\", \"rediss://b:2\"]\n"),
            [
                "cluster.redis: the seed nodes mix redis:// and rediss://: use one for all",
                "cluster.redis[0]: a Redis Cluster has only database 0",
            ]
        );
        assert_eq!(
            problems(
                "[cluster]\nredis = \"redis://a\"\nca_file = \"/x.pem\"\ntls_verify = false\n"
            ),
            [
                "cluster.ca_file: applies to rediss:// (TLS) only; the redis url is redis://",
                "cluster.tls_verify: applies to rediss:// (TLS) only; the redis url is redis://",
            ]
        );
        let c = load_str(
            "[cluster]\nredis = \"rediss://r.example:6380/0\"\ntls_verify = false\n",
            EnvOverrides::Ignore,
        )
        .unwrap();
        let s = c.cluster.unwrap();
        assert!(s.tls() && !s.tls_verify && s.ca_pem.is_none());
        assert_eq!(
            problems("[cluster]\nredis = []\n"),
            ["cluster.redis: the list of Redis Cluster seed nodes is empty"]
        );
        assert_eq!(
            problems("[cluster]\nnode_name = \"x\"\n"),
            ["cluster.redis: is required: \"redis://host:6379/0\", or a list of Redis Cluster seed nodes"]
        );
        assert_eq!(
            problems("[cluster]\nredis = \"redis://h/x\"\n"),
            ["cluster.redis: \"x\" is not a database number"]
        );
    }

    #[test]
    fn cluster_scope_needs_the_cluster_section() {
        let policy = "[rate_limits.g]\nper_minute = 1\nburst = 10\nscope = \"cluster\"\n";
        assert_eq!(
            problems(policy),
            ["rate_limits.g.scope: \"cluster\" needs a [cluster] section"]
        );
        let text = format!("{policy}[cluster]\nredis = \"redis://127.0.0.1:6379\"\n");
        let c = load_str(&text, EnvOverrides::Ignore).unwrap();
        assert_eq!(c.rate_limits["g"].scope, crate::config::Scope::Cluster);
        assert_eq!(
            problems("[rate_limits.g]\nper_minute = 1\nscope = \"world\"\n"),
            ["rate_limits.g.scope: \"world\" is not \"local\" or \"cluster\""]
        );
    }

    #[test]
    fn passwords_stay_out_of_sight() {
        let c = load_str(
            "[cluster]\nredis = \"redis://:s3cret@127.0.0.1:6379/0\"\n",
            EnvOverrides::Ignore,
        )
        .unwrap();
        let s = c.cluster.as_ref().unwrap();
        assert!(
            !s.redis_display().contains("s3cret"),
            "{}",
            s.redis_display()
        );
        assert!(!c.source.to_string().contains("s3cret"), "{}", c.source);
        assert!(!c.summary().contains("s3cret"));
        assert!(c.summary().contains("cluster"), "{}", c.summary());
    }
}
