//! A model-based randomized test of "an acknowledged invalidation wins": real stoa
//! processes (one alone, and three on a real redis-server) in front of a versioned origin
//! whose answers are slow, so that fills race purges and writes. Clients read, write
//! through a route that `invalidates`, purge by every kind (exact request, path prefix,
//! route, the route's tags and the upstream's; hard and soft) through random nodes, while
//! short TTLs expire entries.
//!
//! The model: each key's version only grows; an invalidation acknowledged at time T (the
//! client has its answer) fixes a floor: the version the upstream had said for that key
//! before it was sent. Every read that starts after T must see at least that version; a
//! soft purge's floor holds for every answer but `STALE` (soft purge serves the marked
//! copy while it revalidates; no route here serves stale otherwise).
//!
//! The sequence of operations comes from a fixed seed (`STOA_MODEL_SEED`), its length from
//! `STOA_MODEL_OPS`; `loadtest/invalidation_model.sh` runs it longer.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::quoted;
use common::redis::{RedisCluster, RedisServer};
use common::{path_of, serve_heads, text_answer, StoaProcess};

const TOKEN: &str = "model-token";
const KEYS: usize = 6;

/// The upstream: per key a version; `GET /api/items/<k>` answers the version it read when
/// the request arrived, after a pause drawn from a seeded generator (0–250 ms), so a fill
/// may read a version that a write or purge replaces while it is on its way. `PUT` bumps
/// the key's version and answers the new one.
struct VersionedOrigin {
    port: u16,
    versions: Arc<Mutex<HashMap<String, u64>>>,
}

impl VersionedOrigin {
    async fn start(seed: u64) -> VersionedOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let versions: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed ^ 0xa5a5)));
        let state = versions.clone();
        serve_heads(listener, move |head| {
            let (state, rng) = (state.clone(), rng.clone());
            async move {
                let method = head.split(' ').next().unwrap_or_default().to_string();
                let path = path_of(&head);
                let key = path.rsplit('/').next().unwrap_or_default().to_string();
                if method == "PUT" {
                    let mut versions = state.lock().unwrap();
                    let v = versions.entry(key).or_insert(0);
                    *v += 1;
                    return text_answer(200, "", &v.to_string());
                }
                let read = *state.lock().unwrap().get(&key).unwrap_or(&0);
                let pause = rng.lock().unwrap().u64(0..250);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let tags = format!("surrogate-key: up-{key} up-all\r\n");
                text_answer(200, &tags, &read.to_string())
            }
        });
        VersionedOrigin { port, versions }
    }

    /// Makes the upstream's next version of `key` (as an out-of-band change would) and
    /// returns it.
    fn bump(&self, key: &str) -> u64 {
        let mut versions = self.versions.lock().unwrap();
        let v = versions.entry(key.to_string()).or_insert(0);
        *v += 1;
        *v
    }

    fn version(&self, key: &str) -> u64 {
        *self.versions.lock().unwrap().get(key).unwrap_or(&0)
    }
}

/// What the test knows each key must be at least, by the invalidations acknowledged so far.
#[derive(Default, Clone, Copy)]
struct Floor {
    /// From hard invalidations and writes: every answer.
    hard: u64,
    /// From soft purges too: every answer but STALE.
    any: u64,
}

#[derive(Default)]
struct Model {
    floors: HashMap<String, Floor>,
}

impl Model {
    fn floor(&self, key: &str) -> Floor {
        self.floors.get(key).copied().unwrap_or_default()
    }

    fn raise(&mut self, key: &str, version: u64, soft: bool) {
        let f = self.floors.entry(key.to_string()).or_default();
        f.any = f.any.max(version);
        if !soft {
            f.hard = f.hard.max(version);
        }
    }
}

/// A node's configuration; `cluster`: the Redis (a TOML value: a quoted URL or a list of
/// Redis Cluster seeds) and the node's name.
fn config(origin: &VersionedOrigin, cluster: Option<(&str, &str)>) -> String {
    config_with_disk(origin, cluster, None)
}

/// [`config`], with a disk tier (`cache.disk`) in `disk`.
fn config_with_disk(
    origin: &VersionedOrigin,
    cluster: Option<(&str, &str)>,
    disk: Option<&std::path::Path>,
) -> String {
    let disk = match disk {
        Some(dir) => format!(
            "[cache]\ndisk = {{ path = \"{}\", max_bytes = \"32MiB\" }}\n\n",
            dir.display()
        ),
        None => String::new(),
    };
    let cluster = match cluster {
        Some((redis, node)) => format!(
            "[cluster]\nredis = {redis}\nnode_name = \"{node}\"\ncommand_timeout = \"1s\"\nlock_timeout = \"2s\"\nack_timeout = \"3s\"\n\n"
        ),
        None => String::new(),
    };
    format!(
        r#"token = "{TOKEN}"

{disk}{cluster}[upstreams.origin]
url = "http://127.0.0.1:{port}"
timeout = "10s"

[[routes]]
name = "items"
methods = ["GET"]
path = "/items/{{id}}"
upstream = "origin"
rewrite = "/api/items/{{id}}"
cache = {{ ttl = "1s", lock_timeout = "10s", tags = ["item:{{id}}", "items"] }}

[[routes]]
name = "item-write"
methods = ["PUT"]
path = "/items/{{id}}"
upstream = "origin"
rewrite = "/api/items/{{id}}"
invalidates = ["items"]
"#,
        port = origin.port
    )
}

/// One violation of the model, with what led to it.
struct Stale {
    key: String,
    got: u64,
    floor: u64,
    x_cache: String,
    node: usize,
}

/// Runs `ops` operations from `seed` over `nodes`, 8 clients at once; the violations.
async fn run_model(
    nodes: &[StoaProcess],
    origin: &VersionedOrigin,
    seed: u64,
    ops: usize,
) -> (Vec<Stale>, usize) {
    let model = Arc::new(Mutex::new(Model::default()));
    let stale = Arc::new(Mutex::new(Vec::new()));
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let clients = 8;
    let per_client = ops.div_ceil(clients);
    let urls: Vec<(String, String)> = nodes.iter().map(|n| (n.url(""), n.admin_url(""))).collect();
    let tasks = (0..clients).map(|c| {
        let (model, stale, reads, http, urls) = (
            model.clone(),
            stale.clone(),
            reads.clone(),
            http.clone(),
            urls.clone(),
        );
        let origin = &*origin;
        async move {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(c as u64 * 7919));
            for _ in 0..per_client {
                let node = rng.usize(..urls.len());
                let (base, admin) = &urls[node];
                let key = format!("k{}", rng.usize(..KEYS));
                match rng.u8(..100) {
                    0..=64 => {
                        let floor = model.lock().unwrap().floor(&key);
                        let r = http
                            .get(format!("{base}/items/{key}"))
                            .send()
                            .await
                            .expect("read");
                        assert_eq!(r.status(), 200, "read {key}");
                        let x_cache = common::x_cache(&r);
                        let got: u64 = r.text().await.unwrap().parse().expect("a version");
                        reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let must = if x_cache == "STALE" {
                            floor.hard
                        } else {
                            floor.any
                        };
                        if got < must {
                            stale.lock().unwrap().push(Stale {
                                key,
                                got,
                                floor: must,
                                x_cache,
                                node,
                            });
                        }
                    }
                    65..=76 => {
                        let r = http
                            .put(format!("{base}/items/{key}"))
                            .send()
                            .await
                            .expect("write");
                        assert_eq!(r.status(), 200, "write {key}");
                        let v: u64 = r.text().await.unwrap().parse().expect("a version");
                        model.lock().unwrap().raise(&key, v, false);
                    }
                    77..=94 => {
                        let soft = rng.bool();
                        let version = origin.bump(&key);
                        // Every key the purge names, with the version the upstream has for
                        // it now (the others did not change: their floor is what they are).
                        let all = || (0..KEYS).map(|k| format!("k{k}")).collect();
                        let (body, named): (serde_json::Value, Vec<String>) = match rng.u8(..7) {
                            0 => (
                                serde_json::json!({"request": {"path": format!("/items/{key}")}}),
                                vec![key.clone()],
                            ),
                            1 => (
                                serde_json::json!({"prefix": format!("/api/items/{key}"), "route": "items"}),
                                vec![key.clone()],
                            ),
                            2 => (serde_json::json!({"route": "items"}), all()),
                            // The route's tags, from its templates ...
                            3 => (
                                serde_json::json!({"tags": [format!("item:{key}")]}),
                                vec![key.clone()],
                            ),
                            4 => (serde_json::json!({"tags": ["items"]}), all()),
                            // ... and the upstream's (`Surrogate-Key`).
                            5 => (
                                serde_json::json!({"tags": [format!("up-{key}")]}),
                                vec![key.clone()],
                            ),
                            _ => (serde_json::json!({"tags": ["up-all"]}), all()),
                        };
                        let mut body = body;
                        body["soft"] = serde_json::json!(soft);
                        let versions: Vec<(String, u64)> = named
                            .iter()
                            .map(|k| {
                                let v = if *k == key { version } else { origin.version(k) };
                                (k.clone(), v)
                            })
                            .collect();
                        let r = http
                            .post(format!("{admin}/admin/purge"))
                            .bearer_auth(TOKEN)
                            .json(&body)
                            .send()
                            .await
                            .expect("purge");
                        assert_eq!(r.status(), 200, "purge {body}");
                        let report: serde_json::Value = r.json().await.unwrap();
                        assert!(
                            report.get("unconfirmed").is_none() && report.get("degraded").is_none(),
                            "every node confirmed: {report}"
                        );
                        let mut m = model.lock().unwrap();
                        for (k, v) in versions {
                            m.raise(&k, v, soft);
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await,
                }
            }
        }
    });
    futures_util::future::join_all(tasks).await;
    let stale = std::mem::take(&mut *stale.lock().unwrap());
    (stale, reads.load(std::sync::atomic::Ordering::Relaxed))
}

fn seed() -> u64 {
    std::env::var("STOA_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed)
}

fn ops(default: usize) -> usize {
    std::env::var("STOA_MODEL_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn report(what: &str, stale: &[Stale], reads: usize, took: Duration) {
    eprintln!(
        "{what}: seed {:#x}, {reads} reads checked in {:.1} s, {} stale",
        seed(),
        took.as_secs_f64(),
        stale.len()
    );
    let lines: Vec<String> = stale
        .iter()
        .map(|s| {
            format!(
                "{} on node {}: version {} ({}) after an invalidation that made it {}",
                s.key, s.node, s.got, s.x_cache, s.floor
            )
        })
        .collect();
    assert!(
        stale.is_empty(),
        "{what}: reads older than an acknowledged invalidation:\n{}",
        lines.join("\n")
    );
    assert!(reads > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_never_serves_what_an_acknowledged_invalidation_replaced() {
    let origin = VersionedOrigin::start(seed()).await;
    let node = StoaProcess::start(&config(&origin, None)).await;
    let started = Instant::now();
    let (stale, reads) = run_model(std::slice::from_ref(&node), &origin, seed(), ops(400)).await;
    report("one node", &stale, reads, started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_with_a_disk_tier_never_serves_what_an_acknowledged_invalidation_replaced() {
    // A purge empties memory, not the disk: every read after it that memory misses looks
    // on disk, where the invalidation's rule must win as in memory.
    let origin = VersionedOrigin::start(seed()).await;
    let disk = tempfile::tempdir().unwrap();
    let node = StoaProcess::start(&config_with_disk(&origin, None, Some(disk.path()))).await;
    let started = Instant::now();
    let (stale, reads) = run_model(std::slice::from_ref(&node), &origin, seed(), ops(400)).await;
    report(
        "one node with a disk tier",
        &stale,
        reads,
        started.elapsed(),
    );
    let metrics = node.metrics().await;
    let disk_reads: f64 = ["hit", "stale", "purged"]
        .iter()
        .filter_map(|r| {
            common::sample(
                &metrics,
                &format!("stoa_cache_disk_lookups_total{{result=\"{r}\"}}"),
            )
        })
        .sum();
    assert!(disk_reads > 0.0, "the disk tier was never read:\n{metrics}");
}

/// Three nodes on `redis` (a TOML value), every one live before the first purge.
async fn three_nodes(redis: &str, origin: &VersionedOrigin) -> Vec<StoaProcess> {
    let mut nodes = Vec::new();
    for n in 0..3 {
        let text = config(origin, Some((redis, &format!("node-{n}"))));
        nodes.push(StoaProcess::start(&text).await);
    }
    common::cluster::wait_redis_up(&nodes, true).await;
    // Each announces itself live every second while it listens for purges.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_never_serve_what_an_acknowledged_invalidation_replaced() {
    let redis = RedisServer::start();
    let origin = VersionedOrigin::start(seed()).await;
    let nodes = three_nodes(&quoted(&redis.url()), &origin).await;
    let started = Instant::now();
    let (stale, reads) = run_model(&nodes, &origin, seed(), ops(400)).await;
    report("three nodes", &stale, reads, started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_a_redis_cluster_never_serve_what_an_invalidation_replaced() {
    let cluster = RedisCluster::start(3);
    let origin = VersionedOrigin::start(seed()).await;
    let nodes = three_nodes(&cluster.seeds_toml(), &origin).await;
    let started = Instant::now();
    let (stale, reads) = run_model(&nodes, &origin, seed(), ops(200)).await;
    report(
        "three nodes on a Redis Cluster",
        &stale,
        reads,
        started.elapsed(),
    );
}
