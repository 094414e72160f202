//! Model-based test of the engine: random sequences of claims, completions, releases, dropped
//! leases, extensions, clock moves and restarts from several clients, checked step by step
//! against a small in-memory reference model.
//!
//! Failing seeds are kept in `proptest-regressions/model.txt` (committed). `PROPTEST_CASES`
//! overrides the number of cases (64 by default, so `cargo test` stays fast). With
//! `MODEL_TRACE=1` a failing run prints each step with the leases held before it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Error, Fingerprint, IdempotencyKey, Lease,
    ManualClock, StoredResponse,
};
use proptest::prelude::*;

#[cfg(feature = "postgres")]
mod pg;
use proptest::test_runner::FileFailurePersistence;

/// The manual clock starts here (ms since the epoch).
const T0: i64 = 1_700_000_000_000;
/// The engine's lock timeout and retention, in ms: tiny, so clock moves cross them often.
const LOCK_MS: i64 = 10;
const RETENTION_MS: i64 = 30;

const SCOPES: [&str; 3] = ["tenant-a", "tenant-b", ""];
const KEYS: [&str; 3] = ["k1", "k2", "order 7"];

#[derive(Debug, Clone)]
enum Op {
    /// A claim. `lock` and `retention` are optional per-claim overrides in ms.
    Claim {
        client: u8,
        scope: usize,
        key: usize,
        fp: u8,
        lock: Option<u64>,
        retention: Option<u64>,
        asynchronous: bool,
    },
    /// Complete the held lease at `lease % held.len()` with a response built from `seed`.
    Complete {
        lease: usize,
        seed: u8,
        asynchronous: bool,
    },
    Release {
        lease: usize,
        asynchronous: bool,
    },
    /// Drop the lease without completing it (fire-and-forget release).
    Drop {
        lease: usize,
    },
    Extend {
        lease: usize,
        by_ms: u64,
        asynchronous: bool,
    },
    Advance {
        ms: u64,
    },
    /// `shutdown()` and reopen: held leases become stale handles of a closed engine.
    Restart,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let ms = prop_oneof![
        Just(0u64),
        Just(1),
        Just(5),
        Just(9),
        Just(10),
        Just(11),
        Just(20),
        Just(29),
        Just(30),
        Just(31),
        Just(45),
    ];
    prop_oneof![
        8 => (
            0u8..4,
            0..SCOPES.len(),
            0..KEYS.len(),
            0u8..2,
            prop::option::weighted(0.2, prop_oneof![Just(1u64), Just(5), Just(25)]),
            prop::option::weighted(0.2, prop_oneof![Just(1u64), Just(12), Just(60)]),
            any::<bool>(),
        )
            .prop_map(|(client, scope, key, fp, lock, retention, asynchronous)| Op::Claim {
                client,
                scope,
                key,
                fp,
                lock,
                retention,
                asynchronous,
            }),
        4 => (any::<usize>(), any::<u8>(), any::<bool>())
            .prop_map(|(lease, seed, asynchronous)| Op::Complete { lease, seed, asynchronous }),
        2 => (any::<usize>(), any::<bool>())
            .prop_map(|(lease, asynchronous)| Op::Release { lease, asynchronous }),
        2 => any::<usize>().prop_map(|lease| Op::Drop { lease }),
        2 => (any::<usize>(), prop_oneof![Just(0u64), Just(5), Just(10), Just(25)], any::<bool>())
            .prop_map(|(lease, by_ms, asynchronous)| Op::Extend { lease, by_ms, asynchronous }),
        4 => ms.prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Restart),
    ]
}

fn fingerprint(fp: u8) -> Fingerprint {
    Fingerprint::of_request("POST", "/orders", &[fp])
}

/// A response that exercises every part of the stored format: the status, binary header
/// values, duplicate names, an empty body and both kinds of trailers.
fn response(seed: u8, serial: u64) -> StoredResponse {
    let mut r = StoredResponse::new(
        200 + u16::from(seed % 5),
        format!("body {serial} {seed}").into_bytes(),
    )
    .with_header("content-type", b"application/json".to_vec())
    .with_header("x-serial", serial.to_be_bytes().to_vec());
    if seed.is_multiple_of(3) {
        r = r.with_header("x-bin", vec![0u8, 255, seed]);
        r.body.clear();
    }
    match seed % 4 {
        0 => r.with_trailers(vec![("grpc-status".into(), b"0".to_vec())]),
        1 => r.with_trailers(Vec::new()),
        _ => r,
    }
}

#[derive(Debug, Clone)]
enum State {
    InFlight,
    Completed(StoredResponse),
}

/// A row as the database holds it (expired rows stay until something replaces or deletes them;
/// cleanup never runs in this test).
#[derive(Debug, Clone)]
struct Row {
    fp: u8,
    state: State,
    fence: u64,
    locked_until: i64,
    expires_at: i64,
}

struct Held {
    lease: Lease,
    record: (usize, usize),
    fence: u64,
    retention_ms: i64,
    /// The engine generation that handed the lease out; an older one is closed.
    generation: u64,
}

/// Where a case's engine keeps its records; restarts reopen the same place.
enum Store {
    Memory,
    File(tempfile::TempDir),
    /// A table of the test PostgreSQL server, with the manual clock as the database's.
    #[cfg(feature = "postgres")]
    Postgres(String),
}

#[derive(Clone, Copy)]
enum Backend {
    Memory,
    File,
    #[cfg(feature = "postgres")]
    Postgres,
}

struct Harness {
    store: Store,
    clock: Arc<ManualClock>,
    engine: Engine,
    generation: u64,
    rt: tokio::runtime::Runtime,
    rows: HashMap<(usize, usize), Row>,
    held: Vec<Held>,
    /// The largest fencing token handed out so far by this database.
    max_fence: u64,
    serial: u64,
}

fn config(store: &Store, clock: &Arc<ManualClock>) -> EngineConfig {
    let c = match store {
        Store::File(dir) => EngineConfig::new(dir.path().join("model.db")),
        Store::Memory => EngineConfig::in_memory(),
        #[cfg(feature = "postgres")]
        Store::Postgres(table) => EngineConfig::postgres(pg::url())
            .table(table.clone())
            .database_clock(clock.clone()),
    };
    c.lock_timeout(Duration::from_millis(LOCK_MS as u64))
        .retention(Duration::from_millis(RETENTION_MS as u64))
        // Cleanup never runs during a case: the model keeps expired rows until replaced.
        .cleanup(Duration::from_secs(3600), 1000)
        .read_connections(2)
        .clock(clock.clone())
}

impl Harness {
    fn new(backend: Backend) -> Harness {
        let store = match backend {
            Backend::Memory => Store::Memory,
            Backend::File => Store::File(tempfile::tempdir().unwrap()),
            #[cfg(feature = "postgres")]
            Backend::Postgres => Store::Postgres(pg::fresh_table()),
        };
        let clock = Arc::new(ManualClock::new(T0));
        let engine = Engine::open(config(&store, &clock)).unwrap();
        Harness {
            store,
            clock,
            engine,
            generation: 0,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            rows: HashMap::new(),
            held: Vec::new(),
            max_fence: 0,
            serial: 0,
        }
    }

    fn now(&self) -> i64 {
        use idempotency_rs::Clock;
        self.clock.now_ms()
    }

    /// The model's answer to "may this lease still act on its record?"
    fn owns(&self, h: &Held) -> bool {
        matches!(self.rows.get(&h.record), Some(r) if r.fence == h.fence && matches!(r.state, State::InFlight))
    }

    fn pick(&mut self, i: usize) -> Option<Held> {
        if self.held.is_empty() {
            None
        } else {
            let n = self.held.len();
            Some(self.held.swap_remove(i % n))
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Claim {
                client,
                scope,
                key,
                fp,
                lock,
                retention,
                asynchronous,
            } => self.claim(client, scope, key, fp, lock, retention, asynchronous),
            Op::Complete {
                lease,
                seed,
                asynchronous,
            } => {
                let Some(h) = self.pick(lease) else {
                    return Ok(());
                };
                self.serial += 1;
                let resp = response(seed, self.serial);
                let stale = h.generation != self.generation;
                let owns = self.owns(&h);
                let (record, retention_ms) = (h.record, h.retention_ms);
                let got = if asynchronous {
                    self.rt.block_on(h.lease.complete_async(resp.clone()))
                } else {
                    h.lease.complete(resp.clone())
                };
                if stale {
                    prop_assert!(matches!(got, Err(Error::Closed)), "stale complete: {got:?}");
                } else if owns {
                    prop_assert!(got.is_ok(), "complete of an owned lease: {got:?}");
                    let now = self.now();
                    let row = self.rows.get_mut(&record).unwrap();
                    row.state = State::Completed(resp);
                    row.locked_until = 0;
                    row.expires_at = now + retention_ms;
                } else {
                    prop_assert!(
                        matches!(got, Err(Error::LeaseLost)),
                        "lost complete: {got:?}"
                    );
                }
                Ok(())
            }
            Op::Release {
                lease,
                asynchronous,
            } => {
                let Some(h) = self.pick(lease) else {
                    return Ok(());
                };
                let stale = h.generation != self.generation;
                let owns = self.owns(&h);
                let record = h.record;
                let got = if asynchronous {
                    self.rt.block_on(h.lease.release_async())
                } else {
                    h.lease.release()
                };
                if stale {
                    prop_assert!(matches!(got, Err(Error::Closed)), "stale release: {got:?}");
                } else if owns {
                    prop_assert!(got.is_ok(), "release of an owned lease: {got:?}");
                    self.rows.remove(&record);
                } else {
                    prop_assert!(
                        matches!(got, Err(Error::LeaseLost)),
                        "lost release: {got:?}"
                    );
                }
                Ok(())
            }
            Op::Drop { lease } => {
                let Some(h) = self.pick(lease) else {
                    return Ok(());
                };
                if h.generation == self.generation && self.owns(&h) {
                    self.rows.remove(&h.record);
                }
                drop(h.lease);
                Ok(())
            }
            Op::Extend {
                lease,
                by_ms,
                asynchronous,
            } => {
                let Some(mut h) = self.pick(lease) else {
                    return Ok(());
                };
                let stale = h.generation != self.generation;
                let owns = self.owns(&h);
                let got = if asynchronous {
                    self.rt
                        .block_on(h.lease.extend_async(Duration::from_millis(by_ms)))
                } else {
                    h.lease.extend(Duration::from_millis(by_ms))
                };
                if stale {
                    prop_assert!(matches!(got, Err(Error::Closed)), "stale extend: {got:?}");
                } else if owns {
                    prop_assert!(got.is_ok(), "extend of an owned lease: {got:?}");
                    let until = self.now() + (by_ms as i64).max(1);
                    prop_assert_eq!(h.lease.locked_until(), at(until));
                    let row = self.rows.get_mut(&h.record).unwrap();
                    row.locked_until = until;
                    row.expires_at = row.expires_at.max(until + h.retention_ms);
                } else {
                    prop_assert!(matches!(got, Err(Error::LeaseLost)), "lost extend: {got:?}");
                }
                self.held.push(h);
                Ok(())
            }
            Op::Advance { ms } => {
                self.clock.advance(Duration::from_millis(ms));
                Ok(())
            }
            Op::Restart => {
                self.engine.shutdown().unwrap();
                prop_assert!(matches!(self.engine.shutdown(), Err(Error::Closed)));
                self.generation += 1;
                self.engine = Engine::open(config(&self.store, &self.clock)).unwrap();
                if matches!(self.store, Store::Memory) {
                    // A memory database starts empty, fencing tokens included.
                    self.rows.clear();
                    self.max_fence = 0;
                }
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn claim(
        &mut self,
        client: u8,
        scope: usize,
        key: usize,
        fp: u8,
        lock: Option<u64>,
        retention: Option<u64>,
        asynchronous: bool,
    ) -> Result<(), TestCaseError> {
        let mut req = ClaimRequest::new(
            SCOPES[scope],
            IdempotencyKey::new(KEYS[key]).unwrap(),
            fingerprint(fp),
        );
        if let Some(ms) = lock {
            req = req.lock_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = retention {
            req = req.retention(Duration::from_millis(ms));
        }
        let got = if asynchronous {
            self.rt.block_on(self.engine.claim_async(req))
        } else {
            self.engine.claim(req)
        };
        let got = got.map_err(|e| TestCaseError::fail(format!("claim failed: {e:?}")))?;
        let now = self.now();
        let lock_ms = lock.map_or(LOCK_MS, |ms| ms as i64).max(1);
        let retention_ms = retention.map_or(RETENTION_MS, |ms| ms as i64).max(1);
        let record = (scope, key);
        let row = self.rows.get(&record);
        let claimable = match row {
            None => true,
            Some(r) => {
                r.expires_at <= now
                    || (matches!(r.state, State::InFlight) && r.locked_until <= now && r.fp == fp)
            }
        };
        if claimable {
            let ClaimOutcome::Claimed(lease) = got else {
                return Err(TestCaseError::fail(format!(
                    "client {client}: expected Claimed for {record:?} (row {row:?}, now {now}), got {got:?}"
                )));
            };
            let fence = lease.fencing_token();
            prop_assert!(
                fence > self.max_fence,
                "fencing token {fence} not above {}",
                self.max_fence
            );
            prop_assert_eq!(lease.locked_until(), at(now + lock_ms));
            prop_assert_eq!(lease.lock_timeout(), Duration::from_millis(lock_ms as u64));
            prop_assert_eq!(lease.key().as_str(), KEYS[key]);
            self.max_fence = fence;
            self.rows.insert(
                record,
                Row {
                    fp,
                    state: State::InFlight,
                    fence,
                    locked_until: now + lock_ms,
                    expires_at: now + lock_ms + retention_ms,
                },
            );
            self.held.push(Held {
                lease,
                record,
                fence,
                retention_ms,
                generation: self.generation,
            });
            return Ok(());
        }
        let r = row.unwrap();
        match (&r.state, got) {
            (_, ClaimOutcome::Mismatch) if r.fp != fp => Ok(()),
            (State::InFlight, ClaimOutcome::InFlight { retry_after }) if r.fp == fp => {
                let expected = (r.locked_until - now).max(1) as u64;
                prop_assert_eq!(retry_after, Duration::from_millis(expected));
                Ok(())
            }
            (State::Completed(stored), ClaimOutcome::Replay(replayed)) if r.fp == fp => {
                prop_assert_eq!(&replayed, stored);
                Ok(())
            }
            (_, got) => Err(TestCaseError::fail(format!(
                "client {client}: claim of {record:?} with fp {fp} at {now}: model row {r:?}, engine said {got:?}"
            ))),
        }
    }
}

fn at(ms: i64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms as u64)
}

fn run(backend: Backend, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(backend);
    let trace = std::env::var_os("MODEL_TRACE").is_some();
    let mut log = Vec::new();
    for op in ops {
        if !trace {
            h.apply(op)?;
            continue;
        }
        log.push(format!(
            "t+{} {op:?} held={:?}",
            h.now() - T0,
            h.held
                .iter()
                .map(|x| (x.record, x.fence, x.generation))
                .collect::<Vec<_>>()
        ));
        if let Err(e) = h.apply(op) {
            eprintln!("FAILING RUN:\n{}\n{e}", log.join("\n"));
            return Err(e);
        }
    }
    // Every record the model says is live and completed replays; every in-flight one is
    // in flight. Checked through the public API with the right fingerprint.
    let keys: Vec<_> = h.rows.keys().copied().collect();
    for (scope, key) in keys {
        let fp = h.rows[&(scope, key)].fp;
        h.claim(0, scope, key, fp, None, None, false)?;
    }
    let held = std::mem::take(&mut h.held);
    drop(held);
    h.engine.shutdown().unwrap();
    Ok(())
}

fn proptest_config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 64;
    }
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proptest-regressions/model.txt"
    ))));
    config
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn engine_matches_model_in_memory(ops in prop::collection::vec(op_strategy(), 1..80)) {
        run(Backend::Memory, &ops)?;
    }

    #[test]
    fn engine_matches_model_on_file(ops in prop::collection::vec(op_strategy(), 1..80)) {
        run(Backend::File, &ops)?;
    }

    /// The same model, the same operations, on PostgreSQL: the writer's decisions are one
    /// copy, and this proves the SQL of each store makes the same ones.
    #[cfg(feature = "postgres")]
    #[test]
    fn engine_matches_model_on_postgres(ops in prop::collection::vec(op_strategy(), 1..80)) {
        run(Backend::Postgres, &ops)?;
    }
}
