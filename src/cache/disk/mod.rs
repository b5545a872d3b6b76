//! The disk tier (`cache.disk`): stored answers kept in files under the memory store, so
//! that they survive restarts and the cache holds more, and larger answers, than memory.
//!
//! The files are foyer's block engine: entries appended into fixed-size blocks, the oldest
//! block evicted whole when the bound is reached, each entry with a checksum of its key
//! and value; its index is rebuilt from the blocks at start (in the background: lookups
//! are misses until it is done). A damaged or partial entry fails its checksum and is a
//! miss, and is dropped from the index.
//!
//! The value is the entry as the shared tier writes it ([`super::tier::encode`]): the
//! full key, the head, deadlines as wall-clock milliseconds, the body and its compressed
//! copies. A value whose key is not the asking key, or that does not decode, is a miss.
//!
//! Writes go through a bounded queue to one writer task, off the request path: an entry is
//! written when it is stored in memory (so that every entry memory holds at a stop is on
//! disk at the next start). A full queue drops the write (counted), never waits.
//! Invalidations are not applied to the files but kept as [`rules`] every read is checked
//! against.
//!
//! The engine runs on a runtime of its own (one thread for its flushers and the writer,
//! and the blocking pool for file I/O); a lookup runs on the proxy worker that asks, and
//! waits there for the file read.

pub mod rules;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foyer::{
    BlockEngineConfig, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder, Load,
    RecoverMode,
};
use parking_lot::Mutex;
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, watch};

use super::key::CacheKey;
use super::purge::Invalidation;
use super::store::Entry;
use super::tier::{decode_owned, encode, wall_now};
use crate::config::{capacity, DiskSettings};
use rules::{Rules, Verdict};

/// Writes waiting for the writer; past it a write is dropped.
const QUEUE: usize = 4096;

/// The foyer memory part is not used (reads and writes go to its disk store only): the
/// least it accepts.
const FOYER_MEMORY: usize = 64 * 1024;

/// The tier could not be set up at all.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cache.disk: cannot start the disk tier's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cache.disk.path {0}: another stoa process uses this directory (each needs its own)")]
    InUse(String),
    #[error("cache.disk.path {0}: cannot lock the directory: {1}")]
    Lock(String, std::io::Error),
}

/// The file whose lock says a process uses the tier's directory.
const LOCK_FILE: &str = "stoa.lock";

/// Takes the directory for this process: an exclusive lock on its [`LOCK_FILE`], held as
/// long as the returned file is open (the system lets it go when the process ends, however
/// it ends). Two processes writing one engine's files would each overwrite what the other
/// indexed.
fn lock_dir(dir: &Path) -> Result<std::fs::File, DiskError> {
    let shown = || dir.display().to_string();
    std::fs::create_dir_all(dir).map_err(|e| DiskError::Lock(shown(), e))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|e| DiskError::Lock(shown(), e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DiskError::InUse(shown())),
        Err(std::fs::TryLockError::Error(e)) => Err(DiskError::Lock(shown(), e)),
    }
}

/// What a lookup found.
pub enum Found {
    /// An entry no rule names.
    Entry(Arc<Entry>),
    /// An entry a soft invalidation named: serve it stale while one revalidation runs.
    Stale(Arc<Entry>),
    /// Nothing usable.
    Miss,
}

type Foyer = HybridCache<String, Bytes>;

/// One write: the key and the entry as stored in memory.
type Write = (Arc<CacheKey>, Arc<Entry>);

/// The disk tier of one process.
pub struct Disk {
    /// Held open for the process's life: the directory's lock (see [`lock_dir`]).
    _lock: std::fs::File,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    store: Arc<OnceLock<Foyer>>,
    ready: watch::Receiver<bool>,
    writes: mpsc::Sender<Write>,
    rules: Rules,
    metrics: DiskMetrics,
    max_bytes: u64,
    /// A failing rules file is logged once.
    rules_failing: AtomicBool,
    /// Writes queued and not yet handed to the engine.
    pending: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("max_bytes", &self.max_bytes)
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Disk {
    /// Starts the tier in `settings.path`: its runtime now, the recovery of its index in
    /// the background. A directory another process uses is an error (the process does not
    /// start); one whose files cannot be opened leaves the tier off (logged once, every
    /// write counted as failed).
    pub fn open(settings: &DiskSettings, metrics: DiskMetrics) -> Result<Arc<Disk>, DiskError> {
        let lock = lock_dir(&settings.path)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("stoa-disk")
            .enable_all()
            .build()
            .map_err(DiskError::Runtime)?;
        let handle = runtime.handle().clone();
        let (rules, problem) = Rules::load(&settings.path, wall_now());
        if let Some(problem) = problem {
            tracing::warn!(
                "cache.disk: the invalidations kept could not be read ({problem}): no entry \
                 stored before this start is served"
            );
        }
        metrics.capacity.set(settings.max_bytes as i64);
        let (ready_tx, ready) = watch::channel(false);
        let (writes, queue) = mpsc::channel(QUEUE);
        let store = Arc::new(OnceLock::new());
        let pending = Arc::new(AtomicUsize::new(0));
        let disk = Arc::new(Disk {
            _lock: lock,
            runtime: Mutex::new(Some(runtime)),
            store: store.clone(),
            ready,
            writes,
            rules,
            metrics: metrics.clone(),
            max_bytes: settings.max_bytes,
            rules_failing: AtomicBool::new(false),
            pending: pending.clone(),
        });
        let path = settings.path.clone();
        let max_bytes = settings.max_bytes;
        handle.spawn(async move {
            let started = Instant::now();
            match build(&path, max_bytes).await {
                Ok(foyer) => {
                    let took = started.elapsed();
                    metrics.recovery_seconds.set(took.as_secs_f64());
                    tracing::info!(
                        path = %path.display(),
                        took_ms = took.as_millis() as u64,
                        "cache.disk: disk tier open"
                    );
                    let _ = store.set(foyer);
                }
                Err(e) => {
                    tracing::error!(
                        path = %path.display(),
                        "cache.disk: cannot open the disk tier, running without it: {e}"
                    );
                }
            }
            let _ = ready_tx.send(true);
            write_all(queue, store, metrics, pending, Health::new(path)).await;
        });
        Ok(disk)
    }

    /// Whether the index is recovered (or the tier failed to open): lookups are misses
    /// until then.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until [`Disk::is_ready`].
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// The entry stored on disk for `key`, read against the invalidation rules.
    pub async fn lookup(&self, key: &Arc<CacheKey>) -> Found {
        let Some(store) = self.store.get() else {
            self.metrics.lookup("not_ready");
            return Found::Miss;
        };
        // Read here: the engine's file reads run on its runtime's blocking pool.
        let name = key.as_str();
        let indexed = store.storage().may_contains(name);
        let loaded = store.storage().load(name).await;
        let bytes = match loaded {
            Ok(Load::Entry { value, .. }) => value,
            Ok(Load::Piece { piece, .. }) => piece.value().clone(),
            // The index named it, the read did not give it back: its checksum failed (it
            // was dropped from the index), or its block was evicted meanwhile.
            Ok(Load::Miss) if indexed => {
                self.metrics.damaged.inc();
                self.metrics.lookup("damaged");
                return Found::Miss;
            }
            Ok(_) => {
                self.metrics.lookup("miss");
                return Found::Miss;
            }
            Err(e) => {
                self.metrics.lookup("error");
                tracing::debug!("cache.disk: read failed: {e}");
                return Found::Miss;
            }
        };
        self.metrics.read_bytes.inc_by(bytes.len() as u64);
        let Some((entry, stored_at)) = decode_owned(bytes, key) else {
            // Readable but not an entry of this key and version.
            store.storage().delete(name);
            self.metrics.damaged.inc();
            self.metrics.lookup("damaged");
            return Found::Miss;
        };
        match self.rules.verdict(key, &entry, stored_at) {
            Verdict::Keep => {
                self.metrics.lookup("hit");
                Found::Entry(Arc::new(entry))
            }
            Verdict::Stale => {
                self.metrics.lookup("stale");
                Found::Stale(Arc::new(entry))
            }
            Verdict::Gone => {
                store.storage().delete(name);
                self.metrics.lookup("purged");
                Found::Miss
            }
        }
    }

    /// Queues `entry`, just stored in memory under `key`, for writing; a full queue drops it.
    pub fn write(&self, key: &Arc<CacheKey>, entry: &Arc<Entry>) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.writes.try_send((key.clone(), entry.clone())).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.write("dropped");
        }
    }

    /// Starts recording an invalidation, before it is applied to memory (see
    /// [`Rules::begin`]).
    pub fn invalidate_begin(&self, inv: &Invalidation) {
        self.rules.begin(inv);
    }

    /// Ends recording an invalidation once memory is purged, at wall-clock `at`, as a rule
    /// every later read is checked against, written down before this returns.
    pub fn invalidate_end(&self, inv: &Invalidation, at: i64) {
        match self.rules.end(inv, at) {
            Ok(()) => {
                self.rules_failing.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.write("error");
                if !self.rules_failing.swap(true, Ordering::Relaxed) {
                    tracing::error!("{e}; the invalidation holds until the next restart");
                }
            }
        }
    }

    /// Writes out what is queued and closes the files (at a stop), within `limit`.
    pub fn close(&self, limit: Duration) {
        let store = self.store.clone();
        let pending = self.pending.clone();
        let Some(runtime) = self.runtime.lock().take() else {
            return;
        };
        let flushed = runtime.block_on(async move {
            tokio::time::timeout(limit, async move {
                while pending.load(Ordering::Acquire) > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if let Some(store) = store.get() {
                    if let Err(e) = store.close().await {
                        tracing::warn!("cache.disk: closing the disk tier: {e}");
                    }
                }
            })
            .await
            .is_ok()
        });
        if !flushed {
            tracing::warn!("cache.disk: writes still queued at the stop were left out");
        }
        runtime.shutdown_background();
    }

    /// The tier's bound on disk.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Its counters, for the status page.
    pub fn metrics(&self) -> &DiskMetrics {
        &self.metrics
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.lock().take() {
            runtime.shutdown_background();
        }
    }
}

/// Opens foyer's block engine in `dir`, recovering what it holds.
async fn build(dir: &Path, max_bytes: u64) -> anyhow::Result<Foyer> {
    let block = capacity::disk_block_bytes(max_bytes) as usize;
    let device = FsDeviceBuilder::new(dir)
        .with_capacity(max_bytes as usize)
        .build()?;
    let foyer = HybridCacheBuilder::new()
        .with_name("stoa-disk")
        .memory(FOYER_MEMORY)
        .with_shards(1)
        .storage()
        .with_engine_config(BlockEngineConfig::new(device).with_block_size(block))
        .with_recover_mode(RecoverMode::Quiet)
        .build()
        .await?;
    Ok(foyer)
}

/// The writer: encodes each queued entry and hands it to the engine, whose flushers write
/// whole buffers of entries. Writes queued before the tier opened wait for it.
async fn write_all(
    mut queue: mpsc::Receiver<Write>,
    store: Arc<OnceLock<Foyer>>,
    metrics: DiskMetrics,
    pending: Arc<AtomicUsize>,
    mut health: Health,
) {
    let mut failing = false;
    while let Some((key, entry)) = queue.recv().await {
        if health.takes_writes().await {
            write_one(&store, &metrics, &mut failing, &key, &entry);
        } else {
            metrics.write("error");
        }
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often the writer proves that the directory still takes writes.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The file the writer's probe writes and removes.
const PROBE_FILE: &str = ".stoa-probe";

/// Whether the tier's directory takes writes, proved at most every [`PROBE_EVERY`] by
/// writing a page to a new file, syncing and removing it: a full disk (the engine's files
/// are made at full size, so it is the page that does not fit) or a failing one is seen
/// here, where the engine's own flushers only log. While it does not, writes are left out
/// (counted as `error`); the change is logged once each way.
struct Health {
    dir: std::path::PathBuf,
    checked: Option<Instant>,
    ok: bool,
}

impl Health {
    fn new(dir: std::path::PathBuf) -> Health {
        Health {
            dir,
            checked: None,
            ok: true,
        }
    }

    async fn takes_writes(&mut self) -> bool {
        if self.checked.is_some_and(|at| at.elapsed() < PROBE_EVERY) {
            return self.ok;
        }
        self.checked = Some(Instant::now());
        let probe = self.dir.join(PROBE_FILE);
        let wrote = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&probe)?;
            let written = file.write_all(&[0u8; 4096]).and_then(|()| file.sync_data());
            let removed = std::fs::remove_file(&probe);
            written.and(removed)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match (self.ok, wrote) {
            (true, Err(e)) => {
                self.ok = false;
                tracing::warn!(
                    path = %self.dir.display(),
                    "cache.disk: the disk tier's directory refuses writes ({e}): writes are \
                     left out (counted) until it takes them again; requests are not affected"
                );
            }
            (false, Ok(())) => {
                self.ok = true;
                tracing::info!(
                    path = %self.dir.display(),
                    "cache.disk: the disk tier's directory takes writes again"
                );
            }
            _ => {}
        }
        self.ok
    }
}

/// Hands one entry to the engine.
fn write_one(
    store: &OnceLock<Foyer>,
    metrics: &DiskMetrics,
    failing: &mut bool,
    key: &Arc<CacheKey>,
    entry: &Arc<Entry>,
) {
    {
        let Some(foyer) = store.get() else {
            metrics.write("error");
            if !*failing {
                *failing = true;
                tracing::warn!("cache.disk: the disk tier is off: writes are left out");
            }
            return;
        };
        let Some(bytes) = encode(entry, key) else {
            metrics.write("error");
            return;
        };
        let len = bytes.len() as u64;
        match foyer
            .storage_writer(key.as_str().to_string())
            .force()
            .insert(Bytes::from(bytes))
        {
            Some(_) => {
                metrics.written_bytes.inc_by(len);
                metrics.write("written");
            }
            None => metrics.write("dropped"),
        }
    }
}

/// The disk tier's counters.
#[derive(Clone)]
pub struct DiskMetrics {
    lookups: IntCounterVec,
    writes: IntCounterVec,
    pub damaged: IntCounter,
    pub written_bytes: IntCounter,
    pub read_bytes: IntCounter,
    pub capacity: IntGauge,
    pub recovery_seconds: Gauge,
}

impl DiskMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<DiskMetrics> {
        let m = Self::new()?;
        registry.register(Box::new(m.lookups.clone()))?;
        registry.register(Box::new(m.writes.clone()))?;
        registry.register(Box::new(m.damaged.clone()))?;
        registry.register(Box::new(m.written_bytes.clone()))?;
        registry.register(Box::new(m.read_bytes.clone()))?;
        registry.register(Box::new(m.capacity.clone()))?;
        registry.register(Box::new(m.recovery_seconds.clone()))?;
        for result in LOOKUPS {
            m.lookups.with_label_values(&[result]);
        }
        for result in WRITES {
            m.writes.with_label_values(&[result]);
        }
        Ok(m)
    }

    fn new() -> prometheus::Result<DiskMetrics> {
        Ok(DiskMetrics {
            lookups: IntCounterVec::new(
                Opts::new(
                    "stoa_cache_disk_lookups_total",
                    "Lookups in the disk tier after a memory miss, by result: hit, stale (named by a soft invalidation), miss, purged (named by an invalidation), damaged (failed its checksum or did not decode), error (the read failed), not_ready (the index was still being recovered)",
                ),
                &["result"],
            )?,
            writes: IntCounterVec::new(
                Opts::new(
                    "stoa_cache_disk_writes_total",
                    "Entries written to the disk tier, by result: written (handed to the engine), dropped (the queue was full), error (the tier is off or the entry could not be encoded, or the invalidations file could not be written)",
                ),
                &["result"],
            )?,
            damaged: IntCounter::new(
                "stoa_cache_disk_damaged_total",
                "Entries read from the disk tier that failed their checksum or did not decode: misses, dropped from the index",
            )?,
            written_bytes: IntCounter::new(
                "stoa_cache_disk_written_bytes_total",
                "Bytes of entries handed to the disk tier",
            )?,
            read_bytes: IntCounter::new(
                "stoa_cache_disk_read_bytes_total",
                "Bytes of entries read from the disk tier",
            )?,
            capacity: IntGauge::new(
                "stoa_cache_disk_capacity_bytes",
                "The disk tier's bound (cache.disk.max_bytes)",
            )?,
            recovery_seconds: Gauge::new(
                "stoa_cache_disk_recovery_seconds",
                "How long opening the disk tier and recovering its index took at start",
            )?,
        })
    }

    /// Counters of their own (tests).
    pub fn unregistered() -> DiskMetrics {
        Self::new().unwrap_or_else(|_| unreachable!("constant metric definitions"))
    }

    fn lookup(&self, result: &str) {
        self.lookups.with_label_values(&[result]).inc();
    }

    fn write(&self, result: &str) {
        self.writes.with_label_values(&[result]).inc();
    }

    /// Lookups with this result so far.
    pub fn lookups(&self, result: &str) -> u64 {
        self.lookups.with_label_values(&[result]).get()
    }

    /// Writes with this result so far.
    pub fn writes(&self, result: &str) -> u64 {
        self.writes.with_label_values(&[result]).get()
    }
}

const LOOKUPS: [&str; 7] = [
    "hit",
    "stale",
    "miss",
    "purged",
    "damaged",
    "error",
    "not_ready",
];
const WRITES: [&str; 3] = ["written", "dropped", "error"];
