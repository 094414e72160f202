//! The engine's `tracing` events carry what an operator searches logs by: the scope and key as
//! fields, the outcome and the fencing token, at the levels the crate docs give (claims at
//! debug, failed calls at warn, store failures at error).

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use idempotency_rs::{Engine, EngineConfig, Error, StoredResponse};
use support::{claimed, request};

/// Every line the subscriber wrote.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// The tests here run one at a time: `tracing` caches whether a call site is enabled across
/// every subscriber alive, and a call site first reached on one test's thread (with no
/// subscriber) while another test's subscriber is being made can stay disabled for that
/// subscriber, which drops its events (seen in CI, about 1 run in 40). A process has one
/// subscriber; these tests have several.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` under a subscriber of its own at `level`.
fn logged(level: tracing::Level, f: impl FnOnce()) -> String {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    lines.text()
}

#[test]
fn claims_carry_scope_key_outcome_and_fence() {
    let _serial = one_at_a_time();
    let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    let mut fence = 0;
    let text = logged(tracing::Level::DEBUG, || {
        let lease = claimed(engine.claim(request("order-17")).unwrap());
        fence = lease.fencing_token();
        lease.complete(StoredResponse::new(201, "ok")).unwrap();
        let _ = engine.claim(request("order-17")).unwrap();
    });
    let lines: Vec<&str> = text.lines().collect();
    let claimed_line = lines
        .iter()
        .find(|l| l.contains("outcome=\"claimed\""))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(claimed_line.contains("DEBUG"), "{claimed_line}");
    assert!(
        claimed_line.contains("scope=s key=order-17")
            && claimed_line.contains(&format!("fence={fence}")),
        "{claimed_line}"
    );
    let completed = lines
        .iter()
        .find(|l| l.contains("op=\"complete\""))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        completed.contains(&format!("key=order-17 fence={fence}")),
        "{completed}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("scope=s key=order-17 outcome=\"replayed\"")),
        "{text}"
    );
    // At info, no claim is logged.
    let quiet = logged(tracing::Level::INFO, || {
        let _ = engine.claim(request("order-18")).unwrap();
    });
    assert!(quiet.is_empty(), "{quiet}");
}

#[test]
fn failures_are_warnings_or_errors_with_their_kind() {
    let _serial = one_at_a_time();
    let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    let lease = claimed(engine.claim(request("held")).unwrap());
    let fence = lease.fencing_token();
    // An operator frees the key under its token: the holder's completion is refused.
    assert_eq!(
        engine.force_release("s", "held", fence).unwrap(),
        idempotency_rs::admin::Change::Done
    );
    let text = logged(tracing::Level::WARN, || {
        assert!(matches!(
            lease.complete(StoredResponse::new(201, "late")),
            Err(Error::LeaseLost)
        ));
    });
    assert!(
        text.contains("WARN")
            && text.contains(&format!(
                "key=held fence={fence} op=\"complete\" kind=\"lease_lost\""
            )),
        "{text}"
    );
    engine.shutdown().unwrap();
    // A closed engine refuses at debug: the layers answer it (503), nothing to warn about.
    let text = logged(tracing::Level::DEBUG, || {
        assert!(engine.claim(request("late")).is_err());
    });
    assert!(
        text.contains("DEBUG") && text.contains("scope=s key=late op=\"claim\" kind=\"closed\""),
        "{text}"
    );
}
