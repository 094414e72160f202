//! The claim / complete / replay cycle in plain blocking code.
//!
//! ```text
//! cargo run --example blocking
//! ```

use std::time::Duration;

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Error, Fingerprint, IdempotencyKey,
    StoredResponse,
};

fn charge(amount_cents: u64) -> StoredResponse {
    println!("  -> charging {amount_cents} cents (this must happen once)");
    StoredResponse::new(201, format!("{{\"charged\":{amount_cents}}}"))
        .with_header("content-type", "application/json")
}

fn handle(engine: &Engine, key: &str, body: &[u8]) -> Result<StoredResponse, Error> {
    let request = ClaimRequest::new(
        "user123",
        IdempotencyKey::new(key)?,
        Fingerprint::of_request("POST", "/charges", body),
    );
    match engine.claim(request)? {
        ClaimOutcome::Claimed(lease) => {
            let response = charge(500);
            lease.complete(response.clone())?;
            Ok(response)
        }
        ClaimOutcome::Replay(stored) => {
            println!("  -> replayed the stored response");
            Ok(stored)
        }
        ClaimOutcome::InFlight { retry_after } => Ok(StoredResponse::new(
            409,
            format!("in flight, retry in {retry_after:?}"),
        )),
        ClaimOutcome::Mismatch => Ok(StoredResponse::new(422, "key reused with another body")),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("idempotency-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let engine = Engine::open(
        EngineConfig::new(dir.join("idempotency.db"))
            .lock_timeout(Duration::from_secs(30))
            .retention(Duration::from_secs(24 * 3600)),
    )?;
    let key = "5f0c7a52-0d7e-4b55-8e3c-1f6a2b9d4c11";

    println!("first request:");
    let first = handle(&engine, key, br#"{"amount":500}"#)?;
    println!(
        "  {} {}",
        first.status,
        String::from_utf8_lossy(&first.body)
    );

    println!("retry with the same key and body:");
    let retry = handle(&engine, key, br#"{"amount":500}"#)?;
    println!(
        "  {} {}",
        retry.status,
        String::from_utf8_lossy(&retry.body)
    );
    assert_eq!(first, retry);

    println!("same key, different body:");
    let other = handle(&engine, key, br#"{"amount":900}"#)?;
    println!(
        "  {} {}",
        other.status,
        String::from_utf8_lossy(&other.body)
    );

    println!("a lease dropped without completing frees the key:");
    let fp = Fingerprint::of_request("POST", "/charges", b"{}");
    let k = IdempotencyKey::new("another-key")?;
    if let ClaimOutcome::Claimed(lease) =
        engine.claim(ClaimRequest::new("user123", k.clone(), fp))?
    {
        println!("  fencing token {}", lease.fencing_token());
        drop(lease);
    }
    let again = engine.claim(ClaimRequest::new("user123", k, fp))?;
    println!(
        "  claim again: {}",
        matches!(again, ClaimOutcome::Claimed(_))
    );
    drop(again);

    engine.shutdown()?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
