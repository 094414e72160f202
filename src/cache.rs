//! The replay cache: completed records that were replayed recently, kept in memory so that a
//! storm of retries does not go through SQLite for every one.
//!
//! **Why it is safe.** A completed record never changes before it expires: a claim only takes
//! over an in-flight record whose lock timed out, or a record that has expired; `complete`,
//! `release` and `extend` only touch in-flight records. So (fingerprint, response, expiry) read
//! once stays true until `expires_at`, which every lookup checks against the engine's clock.
//! Only records that are on disk are cached (a read connection's replay, after the check that
//! its completion was flushed; see `syncer.rs`).
//!
//! **Deleted records.** A record deleted through this engine ([`Engine::forget`]) is dropped
//! from the cache at once, and a tombstone keeps a lookup that read it just before the delete
//! from putting it back. A record deleted some other way (another instance's engine on a shared
//! PostgreSQL store, or SQL by hand) cannot be seen: every entry also lives at most
//! [`EngineConfig::replay_cache_max_age`] (10 s by default) after it was read, so that is the
//! longest such a record is still replayed.
//!
//! [`Engine::forget`]: crate::Engine::forget
//! [`EngineConfig::replay_cache_max_age`]: crate::EngineConfig::replay_cache_max_age
//!
//! **Bounded.** The budget is in bytes (bodies, headers and trailers, plus a fixed overhead per
//! entry), split over a few shards so the two tokio workers rarely meet on a lock. Each shard
//! evicts in insertion order (the oldest replay first); a response larger than a quarter of a
//! shard's budget is never cached.

use std::collections::VecDeque;

use crate::key::IdMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::fingerprint::Fingerprint;
use crate::record::Decision;
use crate::response::StoredResponse;

const SHARDS: usize = 8;

/// Bytes counted for an entry on top of its response (map slot, queue slot, allocations).
const ENTRY_OVERHEAD: usize = 160;

/// How long a forgotten record's tombstone keeps it out of the cache: longer than any lookup
/// that read it before it was deleted can take (their statements are bounded by the busy or
/// statement timeout).
const TOMBSTONE_LIFE: Duration = Duration::from_secs(120);

/// A completed record as read from disk.
#[derive(Debug, Clone)]
pub(crate) struct Completed {
    pub fingerprint: [u8; 32],
    pub expires_at: i64,
    pub response: Arc<StoredResponse>,
    /// A store whose clock is not the engine's (PostgreSQL: the server's) also bounds the entry
    /// by a monotonic deadline, so that a step of the engine host's wall clock cannot keep it
    /// past the record's expiry on the server.
    pub deadline: Option<std::time::Instant>,
}

impl Completed {
    /// What a claim with this fingerprint gets.
    pub(crate) fn decide(&self, fingerprint: &Fingerprint) -> Decision {
        if self.fingerprint == *fingerprint.as_bytes() {
            Decision::Replay(StoredResponse::clone(&self.response))
        } else {
            Decision::Mismatch
        }
    }
}

pub(crate) struct ReplayCache {
    shards: Box<[Mutex<Shard>]>,
    shard_budget: usize,
    /// The longest an entry lives after it was read.
    max_age: Duration,
}

#[derive(Default)]
struct Shard {
    map: IdMap<Entry>,
    /// Insertion order, with the sequence number of the insertion: an id whose entry was
    /// replaced or removed since is skipped when it comes up.
    order: VecDeque<([u8; 32], u64)>,
    bytes: usize,
    next_seq: u64,
    /// Records forgotten recently, with when their tombstone ends: not cached until then.
    tombstones: IdMap<Instant>,
}

struct Entry {
    record: Completed,
    size: usize,
    seq: u64,
}

impl ReplayCache {
    /// A cache of about `budget` bytes; `None` when the budget is too small to hold anything.
    /// Entries live at most `max_age` after they were read.
    pub(crate) fn new(budget: usize, max_age: Duration) -> Option<ReplayCache> {
        let shard_budget = budget / SHARDS;
        if shard_budget < 4 * ENTRY_OVERHEAD || max_age.is_zero() {
            return None;
        }
        Some(ReplayCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_budget,
            max_age,
        })
    }

    /// Drops the record `id` (deleted from the store), and keeps it out for a while: a lookup
    /// that read it just before the delete must not put it back.
    pub(crate) fn forget(&self, id: &[u8; 32]) {
        let mut shard = self.shard(id).lock();
        shard.remove(id);
        let now = Instant::now();
        shard.tombstones.retain(|_, until| *until > now);
        if let Some(until) = now.checked_add(TOMBSTONE_LIFE) {
            shard.tombstones.insert(*id, until);
        }
    }

    fn shard(&self, id: &[u8; 32]) -> &Mutex<Shard> {
        // The id is a SHA-256: any byte is uniform.
        &self.shards[id[0] as usize % SHARDS]
    }

    /// The record if it is cached and has not expired at `now`.
    pub(crate) fn get(&self, id: &[u8; 32], now: i64) -> Option<Completed> {
        let mut shard = self.shard(id).lock();
        match shard.map.get(id) {
            Some(e)
                if e.record.expires_at > now
                    && e.record
                        .deadline
                        .is_none_or(|d| std::time::Instant::now() < d) =>
            {
                Some(e.record.clone())
            }
            Some(_) => {
                shard.remove(id);
                None
            }
            None => None,
        }
    }

    /// Caches a record just read from disk (a no-op for one too large to be worth it).
    pub(crate) fn insert(&self, id: [u8; 32], mut record: Completed) {
        let size = ENTRY_OVERHEAD + response_size(&record.response);
        if size > self.shard_budget / 4 {
            return;
        }
        let now = Instant::now();
        // A max age too long for an `Instant` (`Duration::MAX`) bounds nothing.
        if let Some(oldest) = now.checked_add(self.max_age) {
            record.deadline = Some(record.deadline.map_or(oldest, |d| d.min(oldest)));
        }
        let mut shard = self.shard(&id).lock();
        if !shard.tombstones.is_empty() {
            match shard.tombstones.get(&id) {
                Some(until) if *until > now => return,
                Some(_) => {
                    shard.tombstones.remove(&id);
                }
                None => {}
            }
        }
        shard.remove(&id);
        let seq = shard.next_seq;
        shard.next_seq += 1;
        shard.order.push_back((id, seq));
        shard.bytes += size;
        shard.map.insert(id, Entry { record, size, seq });
        while shard.bytes > self.shard_budget {
            let Some((old, old_seq)) = shard.order.pop_front() else {
                break;
            };
            if shard.map.get(&old).is_some_and(|e| e.seq == old_seq) {
                shard.remove(&old);
            }
        }
        // Entries removed on expiry leave their queue slot behind: drop those now and then.
        if shard.order.len() > 2 * shard.map.len() + 64 {
            let Shard { map, order, .. } = &mut *shard;
            order.retain(|(id, seq)| map.get(id).is_some_and(|e| e.seq == *seq));
        }
    }

    /// Bytes held now (for tests and diagnostics).
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }
}

impl Shard {
    fn remove(&mut self, id: &[u8; 32]) {
        if let Some(e) = self.map.remove(id) {
            self.bytes -= e.size;
        }
    }
}

/// Bytes counted for a response: [`StoredResponse::size`] plus the allocations of each header
/// and trailer entry (two heap buffers and the tuple).
fn response_size(r: &StoredResponse) -> usize {
    let entries = r.headers.len() + r.trailers.as_ref().map_or(0, Vec::len);
    r.size() + 48 * entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: usize, expires_at: i64) -> Completed {
        Completed {
            deadline: None,
            fingerprint: [7; 32],
            expires_at,
            response: Arc::new(StoredResponse::new(201, vec![b'x'; body])),
        }
    }

    fn id(i: u32) -> [u8; 32] {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_le_bytes());
        id
    }

    #[test]
    fn hits_until_expiry_then_misses() {
        let cache = ReplayCache::new(1 << 20, Duration::from_secs(10)).unwrap();
        cache.insert(id(1), record(10, 100));
        assert!(cache.get(&id(1), 99).is_some());
        assert!(cache.get(&id(1), 100).is_none());
        // The expired entry is gone, bytes included.
        assert_eq!(cache.bytes(), 0);
        assert!(cache.get(&id(1), 0).is_none());
    }

    #[test]
    fn stays_within_its_budget_and_keeps_the_newest() {
        let budget = 64 * 1024;
        let cache = ReplayCache::new(budget, Duration::from_secs(10)).unwrap();
        for i in 0..10_000 {
            cache.insert(id(i), record(100, i64::MAX));
            assert!(cache.bytes() <= budget);
        }
        assert!(cache.get(&id(9_999), 0).is_some());
        assert!(cache.get(&id(0), 0).is_none());
        // Re-inserting the same ids (replaced entries, stale queue slots) keeps it bounded.
        for round in 0..50 {
            for i in 0..100 {
                cache.insert(id(i), record(100 + round, i64::MAX));
            }
        }
        assert!(cache.bytes() <= budget);
        for s in cache.shards.iter() {
            let s = s.lock();
            assert!(s.order.len() <= 2 * s.map.len() + 64 + 1);
        }
    }

    #[test]
    fn large_responses_and_tiny_budgets_are_not_cached() {
        let cache = ReplayCache::new(64 * 1024, Duration::from_secs(10)).unwrap();
        cache.insert(id(1), record(64 * 1024, i64::MAX));
        assert!(cache.get(&id(1), 0).is_none());
        assert!(ReplayCache::new(0, Duration::from_secs(10)).is_none());
    }

    #[test]
    fn forgotten_records_are_dropped_and_kept_out() {
        let cache = ReplayCache::new(1 << 20, Duration::from_secs(10)).unwrap();
        cache.insert(id(1), record(10, i64::MAX));
        cache.forget(&id(1));
        assert!(cache.get(&id(1), 0).is_none());
        // A lookup that read the record before the delete cannot put it back.
        cache.insert(id(1), record(10, i64::MAX));
        assert!(cache.get(&id(1), 0).is_none());
        // Other records are not affected.
        cache.insert(id(2), record(10, i64::MAX));
        assert!(cache.get(&id(2), 0).is_some());
    }

    #[test]
    fn entries_live_at_most_the_max_age() {
        let cache = ReplayCache::new(1 << 20, Duration::from_millis(30)).unwrap();
        cache.insert(id(1), record(10, i64::MAX));
        assert!(cache.get(&id(1), 0).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(cache.get(&id(1), 0).is_none());
        assert!(ReplayCache::new(1 << 20, Duration::ZERO).is_none());
    }

    #[test]
    fn decides_replay_or_mismatch_by_fingerprint() {
        let r = record(3, i64::MAX);
        let same = Fingerprint::from_bytes([7; 32]);
        let other = Fingerprint::from_bytes([8; 32]);
        assert!(matches!(r.decide(&same), Decision::Replay(resp) if resp.body == b"xxx"));
        assert!(matches!(r.decide(&other), Decision::Mismatch));
    }
}
