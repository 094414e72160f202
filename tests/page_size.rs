//! `EngineConfig::page_size`: the page size of a file the engine creates (issue #18). A new
//! file takes it and keeps it; an existing one keeps its own; a size SQLite cannot use is
//! refused before anything is touched.

use std::path::Path;

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Error, Fingerprint, IdempotencyKey,
    StoredResponse,
};

fn request(key: &str) -> ClaimRequest {
    ClaimRequest::new(
        "s",
        IdempotencyKey::new(key).unwrap(),
        Fingerprint::of_request("POST", "/orders", b"{}"),
    )
}

fn page_size(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap()
}

fn round_trip(engine: &Engine, key: &str) {
    // A response larger than a 1 KiB page: it spills into overflow pages and comes back whole.
    let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    match engine.claim(request(key)).unwrap() {
        ClaimOutcome::Claimed(lease) => lease
            .complete(StoredResponse::new(201, body.clone()))
            .unwrap(),
        other => panic!("expected Claimed, got {}", name(&other)),
    }
    match engine.claim(request(key)).unwrap() {
        ClaimOutcome::Replay(r) => assert_eq!(r.body, body),
        other => panic!("expected a replay, got {}", name(&other)),
    }
}

fn name(outcome: &ClaimOutcome) -> &'static str {
    match outcome {
        ClaimOutcome::Claimed(_) => "Claimed",
        ClaimOutcome::Replay(_) => "Replay",
        ClaimOutcome::InFlight { .. } => "InFlight",
        ClaimOutcome::Mismatch => "Mismatch",
    }
}

#[test]
fn a_new_file_takes_the_page_size_and_keeps_it() {
    for size in [1024u32, 2048, 8192] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let engine = Engine::open(EngineConfig::new(&path).page_size(size)).unwrap();
        round_trip(&engine, "a");
        engine.shutdown().unwrap();
        drop(engine);
        assert_eq!(page_size(&path), i64::from(size));
        // Reopened with the default, or another size: the file keeps its own.
        let configs = [
            EngineConfig::new(&path),
            EngineConfig::new(&path).page_size(4096),
        ];
        for (i, config) in configs.into_iter().enumerate() {
            let engine = Engine::open(config).unwrap();
            match engine.claim(request("a")).unwrap() {
                ClaimOutcome::Replay(r) => assert_eq!(r.body.len(), 5000),
                other => panic!("expected a replay, got {}", name(&other)),
            }
            round_trip(&engine, &format!("b{i}"));
            engine.shutdown().unwrap();
            drop(engine);
            assert_eq!(page_size(&path), i64::from(size));
        }
    }
}

#[test]
fn an_existing_file_keeps_its_page_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    Engine::open(EngineConfig::new(&path))
        .unwrap()
        .shutdown()
        .unwrap();
    assert_eq!(page_size(&path), 4096);
    let engine = Engine::open(EngineConfig::new(&path).page_size(1024)).unwrap();
    round_trip(&engine, "a");
    engine.shutdown().unwrap();
    assert_eq!(page_size(&path), 4096);
}

#[test]
fn a_page_size_sqlite_cannot_use_is_refused_before_the_file_is_made() {
    let dir = tempfile::tempdir().unwrap();
    for size in [0u32, 256, 1000, 3000, 131_072] {
        let path = dir.path().join(format!("db-{size}"));
        match Engine::open(EngineConfig::new(&path).page_size(size)) {
            Err(Error::InvalidConfig { reason }) => {
                assert!(reason.contains("page_size"), "{reason}")
            }
            other => panic!("{size}: expected InvalidConfig, got {other:?}"),
        }
        assert!(!path.exists(), "{size}: the file was created");
    }
    // In memory too (nothing to create, the check is the same).
    assert!(matches!(
        Engine::open(EngineConfig::in_memory().page_size(100)),
        Err(Error::InvalidConfig { .. })
    ));
    let engine = Engine::open(EngineConfig::in_memory().page_size(2048)).unwrap();
    round_trip(&engine, "m");
}
