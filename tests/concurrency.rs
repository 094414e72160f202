//! Many callers claiming the same key at the same moment: exactly one wins, everyone else is
//! told the request is in flight or gets the winner's stored response, byte for byte.
//!
//! 1,000 rounds, each with a fresh key and 64 callers released together by a barrier; the
//! winner completes at a random point of the round, so both `InFlight` and `Replay` answers
//! occur. Once with 64 threads and blocking `claim`, once with 64 tasks and `claim_async` on a
//! multi-threaded tokio runtime.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Error, Fingerprint, IdempotencyKey, Lease,
    StoredResponse,
};

const CALLERS: usize = 64;
const ROUNDS: usize = 1000;
/// The engine's lock timeout: no lease may time out during the test.
const LOCK: Duration = Duration::from_secs(600);

/// A small deterministic PRNG (splitmix64): the point in each round where the winner completes.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// How many callers (the winner included) must have their answer before the winner completes:
/// 1 (at once) to 64 (after everyone, so nobody sees the replay).
fn completion_point(round: usize) -> usize {
    1 + (mix(round as u64) % CALLERS as u64) as usize
}

fn request(round: usize) -> ClaimRequest {
    ClaimRequest::new(
        "tenant",
        IdempotencyKey::new(format!("round-{round}")).unwrap(),
        Fingerprint::of_request("POST", "/transfers", format!("{round}").as_bytes()),
    )
}

fn response(round: usize, winner: usize) -> StoredResponse {
    StoredResponse::new(201, format!("round {round} won by {winner}").into_bytes())
        .with_header("x-round", (round as u64).to_be_bytes().to_vec())
        .with_header("x-bin", vec![0u8, 255, (winner % 256) as u8])
}

/// What one round saw. Callers never panic (a panicking caller would leave the others waiting
/// at the barrier forever): they record what they saw, and [`check`] judges it afterwards.
#[derive(Default)]
struct Round {
    answered: AtomicUsize,
    claimed: AtomicUsize,
    winner: AtomicUsize,
    fence: AtomicU64,
    in_flight: AtomicUsize,
    /// Every replay a caller got, compared with the winner's response afterwards.
    replayed: Mutex<Vec<StoredResponse>>,
    /// Anything else: errors, mismatches, bad retry times.
    failures: Mutex<Vec<String>>,
}

impl Round {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }

    /// Records a caller's answer; a winner gets its lease back.
    fn record(&self, me: usize, outcome: Result<ClaimOutcome, Error>) -> Option<Lease> {
        self.answered.fetch_add(1, Ordering::SeqCst);
        match outcome {
            Ok(ClaimOutcome::Claimed(lease)) => {
                self.claimed.fetch_add(1, Ordering::SeqCst);
                self.winner.store(me, Ordering::SeqCst);
                self.fence.store(lease.fencing_token(), Ordering::SeqCst);
                Some(lease)
            }
            Ok(ClaimOutcome::InFlight { retry_after }) => {
                if retry_after.is_zero() || retry_after > LOCK {
                    self.fail(format!("retry_after {retry_after:?}"));
                }
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                None
            }
            Ok(ClaimOutcome::Replay(r)) => {
                self.replayed.lock().unwrap().push(r);
                None
            }
            Ok(ClaimOutcome::Mismatch) => {
                self.fail("Mismatch".into());
                None
            }
            Err(e) => {
                self.fail(format!("claim failed: {e:?}"));
                None
            }
        }
    }
}

fn rounds() -> Arc<Vec<Round>> {
    Arc::new((0..ROUNDS).map(|_| Round::default()).collect())
}

/// The checks once every round is over.
fn check(engine: &Engine, rounds: &[Round]) {
    let mut last_fence = 0;
    let (mut in_flight, mut replays) = (0, 0);
    for (i, round) in rounds.iter().enumerate() {
        let failures = round.failures.lock().unwrap();
        assert!(failures.is_empty(), "round {i}: {failures:?}");
        assert_eq!(
            round.claimed.load(Ordering::SeqCst),
            1,
            "round {i}: exactly one winner"
        );
        assert_eq!(round.answered.load(Ordering::SeqCst), CALLERS);
        let winner = round.winner.load(Ordering::SeqCst);
        let expected = response(i, winner);
        let replayed = round.replayed.lock().unwrap();
        for r in replayed.iter() {
            assert_eq!(
                r, &expected,
                "round {i}: a replay that is not the winner's response"
            );
        }
        let fence = round.fence.load(Ordering::SeqCst);
        assert!(
            fence > last_fence,
            "round {i}: fencing token {fence} after {last_fence}"
        );
        last_fence = fence;
        let (f, r) = (round.in_flight.load(Ordering::SeqCst), replayed.len());
        assert_eq!(f + r, CALLERS - 1, "round {i}");
        in_flight += f;
        replays += r;
        // After the round, the key replays the winner's response.
        match engine.claim(request(i)).unwrap() {
            ClaimOutcome::Replay(r) => assert_eq!(r, expected, "round {i}"),
            other => panic!("round {i}: expected a replay afterwards, got {other:?}"),
        }
    }
    eprintln!(
        "{ROUNDS} rounds x {CALLERS} callers: {in_flight} InFlight, {replays} Replay answers"
    );
    assert!(in_flight > 0, "no caller ever saw the record in flight");
    assert!(replays > 0, "no caller ever got a replay during a round");
}

fn engine(dir: &tempfile::TempDir) -> Engine {
    Engine::open(EngineConfig::new(dir.path().join("race.db")).lock_timeout(LOCK)).unwrap()
}

#[test]
fn one_winner_per_round_with_threads() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir);
    let rounds = rounds();
    let barrier = Arc::new(Barrier::new(CALLERS));
    let threads: Vec<_> = (0..CALLERS)
        .map(|me| {
            let (engine, rounds, barrier) = (engine.clone(), rounds.clone(), barrier.clone());
            std::thread::spawn(move || {
                for (i, round) in rounds.iter().enumerate() {
                    barrier.wait();
                    let outcome = engine.claim(request(i));
                    if let Some(lease) = round.record(me, outcome) {
                        let point = completion_point(i);
                        while round.answered.load(Ordering::SeqCst) < point {
                            std::thread::yield_now();
                        }
                        if let Err(e) = lease.complete(response(i, me)) {
                            round.fail(format!("complete failed: {e:?}"));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    check(&engine, &rounds);
}

#[test]
fn one_winner_per_round_with_async_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir);
    let rounds = rounds();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..ROUNDS {
            let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
            let tasks: Vec<_> = (0..CALLERS)
                .map(|me| {
                    let (engine, rounds, barrier) =
                        (engine.clone(), rounds.clone(), barrier.clone());
                    tokio::spawn(async move {
                        let round = &rounds[i];
                        barrier.wait().await;
                        let outcome = engine.claim_async(request(i)).await;
                        if let Some(lease) = round.record(me, outcome) {
                            let point = completion_point(i);
                            while round.answered.load(Ordering::SeqCst) < point {
                                tokio::task::yield_now().await;
                            }
                            if let Err(e) = lease.complete_async(response(i, me)).await {
                                round.fail(format!("complete failed: {e:?}"));
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
    });
    check(&engine, &rounds);
}
