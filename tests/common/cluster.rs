//! What the cluster tests share: an origin that counts its calls, a node's configuration on
//! a shared Redis, and three nodes that see it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{path_of, sample, serve_heads, text_answer, StoaProcess};

/// The admin token of every node.
pub const TOKEN: &str = "cluster-test-token";

/// An origin that answers `GET` with `answer #<n> for <path>` after `delay`, counting calls,
/// or `503` while `failing` is set.
pub struct Origin {
    pub port: u16,
    calls: Arc<AtomicUsize>,
    pub failing: Arc<AtomicBool>,
}

impl Origin {
    pub async fn start(delay: Duration) -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (counter, fail) = (calls.clone(), failing.clone());
        serve_heads(listener, move |head| {
            let (counter, fail) = (counter.clone(), fail.clone());
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(delay).await;
                if fail.load(Ordering::SeqCst) {
                    text_answer(503, "", "down")
                } else {
                    text_answer(200, "", &format!("answer #{n} for {}", path_of(&head)))
                }
            }
        });
        Origin {
            port,
            calls,
            failing,
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// `url` as a TOML string, for `cluster.redis`.
pub fn quoted(url: &str) -> String {
    format!("\"{url}\"")
}

/// A node's configuration after `[server]`: the cluster on `redis` (a TOML value: a quoted
/// URL or a list of seeds), the origin, the `items` route with `cache`, and `extra` (more
/// routes).
pub fn scene(redis: &str, node: &str, origin: &Origin, cache: &str, extra: &str) -> String {
    format!(
        r#"token = "{TOKEN}"

[cluster]
redis = {redis}
node_name = "{node}"
command_timeout = "300ms"
connect_timeout = "300ms"
lock_timeout = "1s"

[upstreams.origin]
url = "http://127.0.0.1:{}"
timeout = "10s"

[[routes]]
name = "items"
path = "/items/{{id}}"
methods = ["GET"]
upstream = "origin"
cache = {{ {cache} }}
{extra}"#,
        origin.port
    )
}

/// Three nodes on `redis` (a TOML value, as in [`scene`]), each seeing Redis up.
pub async fn three_nodes(redis: &str, origin: &Origin, cache: &str) -> Vec<StoaProcess> {
    let mut nodes = Vec::new();
    for n in 0..3 {
        let text = scene(redis, &format!("node-{n}"), origin, cache, "");
        nodes.push(StoaProcess::start(&text).await);
    }
    wait_redis_up(&nodes, true).await;
    nodes
}

/// Waits (15 s at most) until every node's `stoa_cluster_redis_up` says `up`.
pub async fn wait_redis_up(nodes: &[StoaProcess], up: bool) {
    let want = if up { 1.0 } else { 0.0 };
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in nodes {
        while sample(&node.metrics().await, "stoa_cluster_redis_up") != Some(want) {
            assert!(
                Instant::now() < deadline,
                "redis up={up} never seen:\n{}",
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
