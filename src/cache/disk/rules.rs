//! Invalidations as rules the disk tier's entries are read against (as bans are in
//! Varnish): the tier keeps no index of its keys, routes, paths or tags, so an invalidation
//! is not applied to the entries on disk but remembered with the wall-clock millisecond it
//! was applied. An entry read from disk that was stored at or before a hard rule naming it
//! is a miss (and deleted); at or before a soft rule, a stale copy revalidated once.
//!
//! The same rule meets a write still queued when the invalidation lands: its entry was
//! stored before, so it is never served. Rules are kept in a file of the tier's directory,
//! written and synced before the invalidation is acknowledged, so they hold after a
//! restart. They are bounded: past [`MAX_RULES`] the oldest goes, and the `floor` rises to
//! its time (every entry stored at or before the floor is a miss).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::cache::key::CacheKey;
use crate::cache::purge::{Invalidation, PurgeWhat, Reach};
use crate::cache::store::Entry;

/// Rules kept; an older one is folded into the floor.
pub const MAX_RULES: usize = 4096;

/// An entry stored within this many milliseconds after a rule is read against it too: the
/// wall clock is read apart from the entry's own clock.
const SLACK_MS: i64 = 2;

/// The time of a rule being applied: later than every entry.
const PENDING: i64 = i64::MAX - SLACK_MS;

/// The rules file's name in the tier's directory.
const FILE: &str = "stoa-invalidations.json";

/// What the rules say of an entry read from disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No rule names it.
    Keep,
    /// A soft rule does: serve it stale while one revalidation runs.
    Stale,
    /// A hard rule (or the floor) does: a miss.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Rule {
    /// Wall-clock milliseconds when it was applied.
    at: i64,
    soft: bool,
    what: PurgeWhat,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Kept {
    /// Every entry stored at or before this is a miss.
    floor: i64,
    rules: Vec<Rule>,
}

/// The rules of one disk tier.
pub struct Rules {
    kept: Mutex<Kept>,
    file: Option<PathBuf>,
}

/// The rules file could not be written: the invalidation holds in memory (and for this
/// process), not after a restart.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the disk tier's invalidations to {path}: {source}")]
pub struct RulesError {
    path: String,
    source: std::io::Error,
}

impl Rules {
    /// Rules in memory only (tests).
    pub fn in_memory() -> Rules {
        Rules {
            kept: Mutex::new(Kept::default()),
            file: None,
        }
    }

    /// The rules kept in `dir`. A file that cannot be read back whole raises the floor to
    /// `now`: what the tier held before can no longer be told apart, so none of it serves.
    pub fn load(dir: &Path, now: i64) -> (Rules, Option<String>) {
        let file = dir.join(FILE);
        let (kept, problem) = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<Kept>(&bytes) {
                Ok(kept) => (kept, None),
                Err(e) => (
                    Kept {
                        floor: now,
                        rules: Vec::new(),
                    },
                    Some(format!("{}: {e}", file.display())),
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Kept::default(), None),
            Err(e) => (
                Kept {
                    floor: now,
                    rules: Vec::new(),
                },
                Some(format!("{}: {e}", file.display())),
            ),
        };
        let rules = Rules {
            kept: Mutex::new(kept),
            file: Some(file),
        };
        (rules, problem)
    }

    /// Records `inv`, applied at `at` (wall-clock milliseconds), and writes the rules down.
    pub fn record(&self, inv: &Invalidation, at: i64) -> Result<(), RulesError> {
        self.begin(inv);
        self.end(inv, at)
    }

    /// Starts recording `inv`, before it is applied to memory: until [`Rules::end`], the
    /// rule names every entry it reaches whenever it was stored, so an entry stored (or
    /// read from disk) while memory is being purged is covered too.
    pub fn begin(&self, inv: &Invalidation) {
        let mut kept = self.kept.lock();
        // The same invalidation again only moves its time.
        kept.rules
            .retain(|r| !(r.soft == inv.soft && r.what == inv.what));
        kept.rules.push(Rule {
            at: PENDING,
            soft: inv.soft,
            what: inv.what.clone(),
        });
    }

    /// Ends recording `inv` once memory is purged, at `at` (wall-clock milliseconds, read
    /// after memory was purged), and writes the rules down.
    pub fn end(&self, inv: &Invalidation, at: i64) -> Result<(), RulesError> {
        let mut kept = self.kept.lock();
        match kept
            .rules
            .iter_mut()
            .find(|r| r.soft == inv.soft && r.what == inv.what)
        {
            Some(rule) if rule.at == PENDING => rule.at = at,
            Some(rule) => rule.at = rule.at.max(at),
            None => kept.rules.push(Rule {
                at,
                soft: inv.soft,
                what: inv.what.clone(),
            }),
        }
        while kept.rules.len() > MAX_RULES {
            let oldest = kept.rules.remove(0);
            if oldest.at != PENDING {
                kept.floor = kept.floor.max(oldest.at);
            }
        }
        match &self.file {
            Some(file) => write_synced(file, &kept),
            None => Ok(()),
        }
    }

    /// What the rules say of `entry`, stored under `key` at `stored_at` (wall-clock ms).
    pub fn verdict(&self, key: &CacheKey, entry: &Entry, stored_at: i64) -> Verdict {
        let kept = self.kept.lock();
        if stored_at <= kept.floor + SLACK_MS {
            return Verdict::Gone;
        }
        let mut verdict = Verdict::Keep;
        for rule in kept.rules.iter().rev() {
            if stored_at > rule.at + SLACK_MS {
                continue;
            }
            let names = match rule.what.reaches(key) {
                Reach::Yes => true,
                Reach::No => false,
                Reach::ByTags => rule.what.tags().iter().any(|t| entry.has_tag(t)),
            };
            if names {
                if !rule.soft {
                    return Verdict::Gone;
                }
                verdict = Verdict::Stale;
            }
        }
        verdict
    }

    /// How many rules are kept.
    pub fn len(&self) -> usize {
        self.kept.lock().rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes `kept` to a new file, syncs it, renames it over `file` and syncs the directory:
/// a crash leaves the old rules or the new ones, never a mix.
fn write_synced(file: &Path, kept: &Kept) -> Result<(), RulesError> {
    let err = |source| RulesError {
        path: file.display().to_string(),
        source,
    };
    let bytes = serde_json::to_vec(kept).map_err(|e| err(std::io::Error::other(e)))?;
    let tmp = file.with_extension("json.tmp");
    let mut out = std::fs::File::create(&tmp).map_err(err)?;
    out.write_all(&bytes).map_err(err)?;
    out.sync_all().map_err(err)?;
    std::fs::rename(&tmp, file).map_err(err)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use pingora::http::ResponseHeader;

    use super::*;
    use crate::cache::key::test_key;
    use crate::cache::store::Lifetimes;
    use crate::cache::tags::Tags;

    fn entry(tags: &[&str]) -> Entry {
        let life = Lifetimes {
            ttl: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            refresh_ahead: None,
        };
        let header = ResponseHeader::build(200, None).unwrap();
        let tags: Tags = tags.iter().copied().collect();
        Entry::new(header, Bytes::new(), 1, Instant::now(), life, None).with_tags(tags)
    }

    fn hard(what: PurgeWhat) -> Invalidation {
        Invalidation { what, soft: false }
    }

    #[test]
    fn each_kind_names_what_it_names_and_only_what_was_stored_before() {
        let rules = Rules::in_memory();
        let key = test_key("r", "/a/b");
        let other = test_key("s", "/x");
        let e = entry(&["t1"]);
        let cases = [
            PurgeWhat::Route { route: "r".into() },
            PurgeWhat::Prefix {
                route: None,
                prefix: "/a/".into(),
            },
            PurgeWhat::Path {
                route: "r".into(),
                path: "/a/b".into(),
            },
            PurgeWhat::Key {
                route: "r".into(),
                key: key.base().to_string(),
            },
            PurgeWhat::Tags {
                tags: vec!["t1".into()],
                routes: None,
            },
        ];
        for (i, what) in cases.into_iter().enumerate() {
            let at = 1_000 * (i as i64 + 1);
            rules.record(&hard(what), at).unwrap();
            assert_eq!(rules.verdict(&key, &e, at - 10), Verdict::Gone, "{i}");
            assert_eq!(rules.verdict(&key, &e, at + 100), Verdict::Keep, "{i}");
            assert_eq!(rules.verdict(&other, &entry(&[]), at - 10), Verdict::Keep);
        }
    }

    #[test]
    fn soft_rules_serve_stale_and_hard_ones_win() {
        let rules = Rules::in_memory();
        let key = test_key("r", "/p");
        let e = entry(&[]);
        let soft = Invalidation {
            what: PurgeWhat::Route { route: "r".into() },
            soft: true,
        };
        rules.record(&soft, 100).unwrap();
        assert_eq!(rules.verdict(&key, &e, 50), Verdict::Stale);
        rules
            .record(&hard(PurgeWhat::Route { route: "r".into() }), 200)
            .unwrap();
        assert_eq!(rules.verdict(&key, &e, 50), Verdict::Gone);
        assert_eq!(rules.verdict(&key, &e, 150), Verdict::Gone);
        assert_eq!(rules.verdict(&key, &e, 250), Verdict::Keep);
    }

    #[test]
    fn a_rule_being_applied_names_entries_stored_after_it_began() {
        let rules = Rules::in_memory();
        let key = test_key("r", "/p");
        let inv = hard(PurgeWhat::Route { route: "r".into() });
        rules.begin(&inv);
        assert_eq!(rules.verdict(&key, &entry(&[]), 1_000_000), Verdict::Gone);
        rules.end(&inv, 500).unwrap();
        assert_eq!(rules.verdict(&key, &entry(&[]), 400), Verdict::Gone);
        assert_eq!(rules.verdict(&key, &entry(&[]), 1_000_000), Verdict::Keep);
    }

    #[test]
    fn bounded_by_raising_the_floor() {
        let rules = Rules::in_memory();
        let key = test_key("r", "/p");
        for i in 0..(MAX_RULES as i64 + 10) {
            let what = PurgeWhat::Path {
                route: "other".into(),
                path: format!("/{i}"),
            };
            rules.record(&hard(what), 10 + i).unwrap();
        }
        assert_eq!(rules.len(), MAX_RULES);
        assert_eq!(rules.verdict(&key, &entry(&[]), 15), Verdict::Gone);
        assert_eq!(rules.verdict(&key, &entry(&[]), 100_000), Verdict::Keep);
    }

    #[test]
    fn kept_across_a_restart_and_a_damaged_file_keeps_nothing_old() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key("r", "/p");
        let (rules, problem) = Rules::load(dir.path(), 0);
        assert!(problem.is_none());
        rules
            .record(&hard(PurgeWhat::Route { route: "r".into() }), 500)
            .unwrap();
        let (again, _) = Rules::load(dir.path(), 0);
        assert_eq!(again.verdict(&key, &entry(&[]), 400), Verdict::Gone);
        std::fs::write(dir.path().join(FILE), b"{\"floor\":").unwrap();
        let (damaged, problem) = Rules::load(dir.path(), 9_000);
        assert!(problem.is_some());
        assert_eq!(damaged.verdict(&key, &entry(&[]), 8_000), Verdict::Gone);
        assert_eq!(damaged.verdict(&key, &entry(&[]), 9_500), Verdict::Keep);
    }
}
