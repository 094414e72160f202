//! The properties the fuzz targets check, shared with `tests/fuzz_corpus.rs`.
//!
//! Each `check_*` function takes the raw fuzz input and panics when a property fails. The fuzz
//! targets (`fuzz/fuzz_targets/*.rs`) call them under libFuzzer; the test replays every file of
//! `fuzz/corpus/<target>/` through the same functions on stable, so an input that once broke a
//! property is checked on every `cargo test`.
//!
//! Only `idempotency_rs` and `serde_json` are used (both reachable from the root crate's tests),
//! so the input is decoded by hand rather than with `arbitrary`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idempotency_rs::contract::{KeyPolicy, ProblemKind, canonical_json, parse_key_value};
use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Error, Fingerprint, HeaderList,
    IdempotencyKey, Lease, ManualClock, StoredResponse, decode_headers,
};
use serde_json::Value;
use serde_json::value::RawValue;

// ---------------------------------------------------------------------------------------------
// Idempotency-Key header parser
// ---------------------------------------------------------------------------------------------

/// `parse_key_value` under both policies: never panics; an accepted key re-validates; the
/// RFC 8941 quoted form of an accepted key parses to the same key; a UUID key is also an
/// opaque key (up to case).
pub(crate) fn check_key_header(data: &[u8]) {
    let uuid = parse_key_value(data, KeyPolicy::Uuid);
    let opaque = parse_key_value(data, KeyPolicy::Opaque);
    for (policy, parsed) in [(KeyPolicy::Uuid, &uuid), (KeyPolicy::Opaque, &opaque)] {
        match parsed {
            Ok(key) => {
                let again = IdempotencyKey::new(key.as_str())
                    .unwrap_or_else(|e| panic!("accepted key {key:?} does not re-validate: {e}"));
                assert_eq!(&again, key);
                let quoted = sf_string(key.as_str());
                match parse_key_value(&quoted, policy) {
                    Ok(q) => assert_eq!(&q, key, "quoted form {quoted:?} names another key"),
                    Err(p) => panic!("quoted form {quoted:?} of {key:?} refused: {p:?}"),
                }
                // The key's own text, sent bare, names the same key when it is a bare token.
                let text = key.as_str().as_bytes();
                if !text.contains(&b',') && text.first() != Some(&b'"') {
                    assert_eq!(parse_key_value(text, policy).as_ref().ok(), Some(key));
                }
            }
            Err(problem) => assert!(
                matches!(
                    problem.kind,
                    ProblemKind::KeyInvalid | ProblemKind::KeyRepeated
                ),
                "unexpected problem {:?}",
                problem.kind
            ),
        }
    }
    if let Ok(u) = &uuid {
        assert_eq!(u.as_str().len(), 36);
        assert_eq!(u.as_str(), u.as_str().to_ascii_lowercase());
        let o = opaque
            .as_ref()
            .unwrap_or_else(|p| panic!("a UUID key is refused as opaque: {p:?}"));
        assert_eq!(o.as_str().to_ascii_lowercase(), u.as_str());
    }
}

/// RFC 8941 sf-string of printable ASCII text.
fn sf_string(text: &str) -> Vec<u8> {
    let mut out = vec![b'"'];
    for b in text.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

// ---------------------------------------------------------------------------------------------
// Stored header-list decoder
// ---------------------------------------------------------------------------------------------

/// `decode_headers` on arbitrary bytes: never panics; what decodes re-encodes (in the postcard
/// wire format, written independently here) to bytes that decode to the same list, and that
/// encoding is a fixed point.
pub(crate) fn check_decode_headers(data: &[u8]) {
    let Ok(list) = decode_headers(data) else {
        return;
    };
    let payload: usize = list.iter().map(|(n, v)| n.len() + v.len()).sum();
    assert!(payload <= data.len(), "decoded more bytes than were given");
    let encoded = encode_header_list(&list);
    let again =
        decode_headers(&encoded).unwrap_or_else(|e| panic!("re-encoded list does not decode: {e}"));
    assert_eq!(again, list);
    assert_eq!(encode_header_list(&again), encoded);
    // The canonical encoding is never longer than what was accepted.
    assert!(encoded.len() <= data.len());
}

/// postcard's encoding of `Vec<(&str, &[u8])>`: a LEB128 length, then each name and value as a
/// LEB128 length and the bytes.
fn encode_header_list(list: &HeaderList) -> Vec<u8> {
    fn varint(mut n: usize, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    let mut out = Vec::new();
    varint(list.len(), &mut out);
    for (name, value) in list {
        varint(name.len(), &mut out);
        out.extend_from_slice(name.as_bytes());
        varint(value.len(), &mut out);
        out.extend_from_slice(value);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Canonical JSON
// ---------------------------------------------------------------------------------------------

/// `canonical_json`: never panics; accepts exactly what serde_json accepts (but for numbers
/// beyond f64's range, which `serde_json::Value` refuses); is idempotent; gives
/// the same bytes for the same document written with reversed key order, other white space and
/// `\u` escapes; and gives other bytes when any one number of the document is changed (issue
/// #13: numbers beyond 64 bits or f64 once collapsed into one fingerprint).
///
/// The document is rewritten from serde_json's `RawValue`s, which keep each number's text:
/// going through `serde_json::Value` would change the numbers themselves.
pub(crate) fn check_canonical_json(data: &[u8]) {
    let parsed = serde_json::from_slice::<Value>(data);
    let Some(canon) = canonical_json(data) else {
        assert!(parsed.is_err(), "valid JSON refused");
        return;
    };
    // serde_json::Value refuses numbers beyond f64's range, which are valid JSON and which
    // canonical_json keeps as written.
    if let Err(e) = &parsed {
        assert!(
            e.to_string().starts_with("number out of range"),
            "invalid JSON accepted: {e}"
        );
    }
    let twice = canonical_json(&canon).unwrap_or_else(|| {
        panic!(
            "canonical output is not JSON: {:?}",
            String::from_utf8_lossy(&canon)
        )
    });
    assert_eq!(
        String::from_utf8_lossy(&twice),
        String::from_utf8_lossy(&canon),
        "canonical_json is not idempotent"
    );
    let raw: &RawValue = serde_json::from_slice(data).expect("serde_json accepted it above");
    // Where an object repeats a key, its members keep their order (the order of members with
    // one key is part of the canonical form).
    let repeated = has_repeated_keys(raw);
    let mut numbers = 0;
    let mut rewritten = Vec::new();
    write_rewritten(raw, &mut rewritten, 0, !repeated, None, &mut numbers);
    let other = canonical_json(&rewritten).unwrap_or_else(|| {
        panic!(
            "re-serialised document is not JSON: {:?}",
            String::from_utf8_lossy(&rewritten)
        )
    });
    assert_eq!(
        String::from_utf8_lossy(&other),
        String::from_utf8_lossy(&canon),
        "key order, white space or escapes changed the canonical form"
    );
    for n in 0..numbers.min(16) {
        let mut changed = Vec::new();
        write_rewritten(raw, &mut changed, 0, true, Some(n), &mut 0);
        let changed = canonical_json(&changed).expect("a changed digit is still JSON");
        assert_ne!(
            String::from_utf8_lossy(&changed),
            String::from_utf8_lossy(&canon),
            "changing number {n} did not change the canonical form"
        );
    }
}

/// An object's members in document order, repeated keys included.
fn members(raw: &RawValue) -> Vec<(String, &RawValue)> {
    struct Members;
    impl<'de> serde::de::Visitor<'de> for Members {
        type Value = Vec<(String, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = map.next_entry()? {
                out.push(entry);
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    serde::Deserializer::deserialize_map(&mut de, Members).unwrap()
}

fn items(raw: &RawValue) -> Vec<&RawValue> {
    serde_json::from_str(raw.get()).unwrap()
}

/// True when an object of the document names one key twice.
fn has_repeated_keys(raw: &RawValue) -> bool {
    match raw.get().as_bytes()[0] {
        b'{' => {
            let members = members(raw);
            let mut keys: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
            keys.sort_unstable();
            keys.windows(2).any(|w| w[0] == w[1])
                || members.iter().any(|(_, v)| has_repeated_keys(v))
        }
        b'[' => items(raw).into_iter().any(has_repeated_keys),
        _ => false,
    }
}

/// Serialises the document with each object's members in reverse order (when `reverse`), new
/// lines, indentation, tabs and spaces around the punctuation, strings with every non-ASCII
/// character escaped as `\uXXXX`, and numbers as written, except the number `change`
/// (counting from 0 in this walk), whose last digit is replaced by another. Counts the numbers
/// in `count`.
fn write_rewritten(
    raw: &RawValue,
    out: &mut Vec<u8>,
    indent: usize,
    reverse: bool,
    change: Option<usize>,
    count: &mut usize,
) {
    let text = raw.get();
    let pad = |out: &mut Vec<u8>, n: usize| {
        out.push(b'\n');
        out.extend(std::iter::repeat_n(b' ', n * 2));
    };
    match text.as_bytes()[0] {
        b'{' => {
            let mut members = members(raw);
            if reverse {
                members.reverse();
            }
            out.extend_from_slice(b"{ ");
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b" ,");
                }
                pad(out, indent + 1);
                write_escaped(&k, out);
                out.extend_from_slice(b" : ");
                write_rewritten(v, out, indent + 1, reverse, change, count);
            }
            pad(out, indent);
            out.extend_from_slice(b" }");
        }
        b'[' => {
            out.extend_from_slice(b"[\t");
            for (i, v) in items(raw).into_iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                pad(out, indent + 1);
                write_rewritten(v, out, indent + 1, reverse, change, count);
            }
            out.extend_from_slice(b"\t]");
        }
        b'"' => write_escaped(&serde_json::from_str::<String>(text).unwrap(), out),
        b'-' | b'0'..=b'9' => {
            let mut number = text.as_bytes().to_vec();
            if change == Some(*count) {
                // A number always ends in a digit; another digit keeps it a number.
                let last = number.last_mut().unwrap();
                *last = if *last == b'7' { b'3' } else { b'7' };
            }
            *count += 1;
            out.extend_from_slice(&number);
        }
        _ => out.extend_from_slice(text.as_bytes()),
    }
}

fn write_escaped(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{u:04X}").as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

// ---------------------------------------------------------------------------------------------
// The engine against a reference model
// ---------------------------------------------------------------------------------------------

const T0: i64 = 1_700_000_000_000;
const DEFAULT_LOCK_MS: i64 = 40;
const DEFAULT_RETENTION_MS: i64 = 100;
const MAX_OPS: usize = 96;

/// Reads the fuzz input a byte at a time; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    InFlight { locked_until: i64 },
    Completed(StoredResponse),
}

#[derive(Debug, Clone)]
struct Record {
    fp: u8,
    fence: u64,
    state: State,
    expires_at: i64,
}

/// What the reference model says a claim gets.
#[derive(Debug, PartialEq)]
enum Expected {
    Claimed { fence: u64, locked_until: i64 },
    Replay(StoredResponse),
    InFlight { retry_after_ms: i64 },
    Mismatch,
}

/// The reference model: a map from (scope, key) to a record, a fence counter and the time.
#[derive(Default)]
struct Model {
    records: HashMap<(u8, u8), Record>,
    fence: u64,
    now: i64,
}

impl Model {
    fn claim(&mut self, id: (u8, u8), fp: u8, lock_ms: i64, retention_ms: i64) -> Expected {
        let now = self.now;
        let take = match self.records.get(&id) {
            None => true,
            Some(r) if r.expires_at <= now => true,
            Some(r) => match r.state {
                State::InFlight { locked_until } => locked_until <= now && r.fp == fp,
                State::Completed(_) => false,
            },
        };
        if take {
            self.fence += 1;
            let locked_until = now + lock_ms;
            self.records.insert(
                id,
                Record {
                    fp,
                    fence: self.fence,
                    state: State::InFlight { locked_until },
                    expires_at: locked_until + retention_ms,
                },
            );
            return Expected::Claimed {
                fence: self.fence,
                locked_until,
            };
        }
        let r = &self.records[&id];
        if r.fp != fp {
            return Expected::Mismatch;
        }
        match &r.state {
            State::InFlight { locked_until } => Expected::InFlight {
                retry_after_ms: (locked_until - now).max(1),
            },
            State::Completed(resp) => Expected::Replay(resp.clone()),
        }
    }

    /// The in-flight record the lease `(id, fence)` still owns.
    fn owned(&mut self, id: (u8, u8), fence: u64) -> Option<&mut Record> {
        self.records
            .get_mut(&id)
            .filter(|r| r.fence == fence && matches!(r.state, State::InFlight { .. }))
    }

    fn complete(&mut self, h: &Held, resp: StoredResponse) -> bool {
        let now = self.now;
        match self.owned(h.id, h.fence) {
            Some(r) => {
                r.state = State::Completed(resp);
                r.expires_at = now + h.retention_ms;
                true
            }
            None => false,
        }
    }

    fn release(&mut self, h: &Held) -> bool {
        if self.owned(h.id, h.fence).is_some() {
            self.records.remove(&h.id);
            true
        } else {
            false
        }
    }

    fn extend(&mut self, h: &Held, by_ms: i64) -> Option<i64> {
        let until = self.now + by_ms;
        let r = self.owned(h.id, h.fence)?;
        r.state = State::InFlight {
            locked_until: until,
        };
        r.expires_at = r.expires_at.max(until + h.retention_ms);
        Some(until)
    }
}

/// A lease the driver holds, with what the model knows about it.
struct Held {
    lease: Lease,
    id: (u8, u8),
    fence: u64,
    retention_ms: i64,
}

fn scope_name(s: u8) -> &'static str {
    ["tenant-a", "tenant-b"][usize::from(s)]
}

fn fingerprint(fp: u8) -> Fingerprint {
    Fingerprint::of_request("POST", "/orders", &[fp])
}

fn ms(t: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(t).unwrap())
}

fn response(input: &mut Input<'_>) -> StoredResponse {
    let status = 100 + u16::from(input.byte()) * 2;
    let body_len = usize::from(input.byte() % 16);
    let mut resp = StoredResponse::new(status, input.bytes(body_len));
    let flags = input.byte();
    for i in 0..(flags & 3) {
        let len = usize::from(input.byte() % 8);
        resp = resp.with_header(format!("x-h{i}"), input.bytes(len));
    }
    if flags & 4 != 0 {
        let len = usize::from(input.byte() % 8);
        resp = resp.with_trailers(vec![("grpc-status".into(), input.bytes(len))]);
    }
    resp
}

/// Drives an in-memory engine on a [`ManualClock`] with the commands the input spells out
/// (claim, complete, release, drop, extend, advance the clock) and checks every answer against
/// the reference model.
///
/// Dropping a lease sends its release without waiting; to keep the comparison deterministic the
/// driver then calls `extend` on a barrier lease, which the writer handles after that release
/// (lease commands are processed in the order they were sent).
pub(crate) fn check_engine(data: &[u8]) {
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Engine::open(
        EngineConfig::in_memory()
            .clock(clock.clone())
            .lock_timeout(Duration::from_millis(DEFAULT_LOCK_MS as u64))
            .retention(Duration::from_millis(DEFAULT_RETENTION_MS as u64))
            // Cleanup runs on the real clock: keep it out of the way so the model is exact.
            .cleanup(Duration::from_secs(24 * 3600), 1000),
    )
    .unwrap();
    let mut model = Model {
        now: T0,
        ..Model::default()
    };
    let barrier_key = IdempotencyKey::new("barrier").unwrap();
    let barrier_lock = Duration::from_secs(1_000_000_000);
    let mut barrier = match engine
        .claim(ClaimRequest::new("barrier", barrier_key, fingerprint(0)).lock_timeout(barrier_lock))
        .unwrap()
    {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("barrier claim: {other:?}"),
    };
    model.fence = barrier.fencing_token();

    let mut held: Vec<Held> = Vec::new();
    let mut input = Input(data);
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = input.byte();
        let pick = usize::from(input.byte());
        match op % 8 {
            // claim (three of eight opcodes: claims drive everything else)
            0..=2 => {
                let id = (pick as u8 & 1, (pick as u8 >> 1) % 3);
                let fp = (pick as u8 >> 3) % 2;
                let lock_ms = match input.byte() {
                    0..=127 => None,
                    b => Some(i64::from(b - 127)),
                };
                let retention_ms = match input.byte() {
                    0..=127 => None,
                    b => Some(i64::from(b - 127) * 2),
                };
                let key = IdempotencyKey::new(format!("key-{}", id.1)).unwrap();
                let mut req = ClaimRequest::new(scope_name(id.0), key.clone(), fingerprint(fp));
                if let Some(l) = lock_ms {
                    req = req.lock_timeout(Duration::from_millis(l as u64));
                }
                if let Some(r) = retention_ms {
                    req = req.retention(Duration::from_millis(r as u64));
                }
                let lock_ms = lock_ms.unwrap_or(DEFAULT_LOCK_MS);
                let retention_ms = retention_ms.unwrap_or(DEFAULT_RETENTION_MS);
                let expected = model.claim(id, fp, lock_ms, retention_ms);
                let got = engine.claim(req).unwrap();
                match (got, expected) {
                    (
                        ClaimOutcome::Claimed(lease),
                        Expected::Claimed {
                            fence,
                            locked_until,
                        },
                    ) => {
                        assert_eq!(lease.fencing_token(), fence);
                        assert_eq!(lease.locked_until(), ms(locked_until));
                        assert_eq!(lease.key(), &key);
                        held.push(Held {
                            lease,
                            id,
                            fence,
                            retention_ms,
                        });
                    }
                    (ClaimOutcome::Replay(got), Expected::Replay(want)) => assert_eq!(got, want),
                    (
                        ClaimOutcome::InFlight { retry_after },
                        Expected::InFlight { retry_after_ms },
                    ) => {
                        assert_eq!(retry_after, Duration::from_millis(retry_after_ms as u64));
                    }
                    (ClaimOutcome::Mismatch, Expected::Mismatch) => {}
                    (got, want) => panic!("claim {id:?} fp {fp}: engine {got:?}, model {want:?}"),
                }
            }
            // complete
            3 if !held.is_empty() => {
                let h = held.swap_remove(pick % held.len());
                let resp = response(&mut input);
                let owned = model.complete(&h, resp.clone());
                check_lease_result(h.lease.complete(resp), owned, "complete");
            }
            // release
            4 if !held.is_empty() => {
                let h = held.swap_remove(pick % held.len());
                let owned = model.release(&h);
                check_lease_result(h.lease.release(), owned, "release");
            }
            // drop: a fire-and-forget release, then the barrier
            5 if !held.is_empty() => {
                let h = held.swap_remove(pick % held.len());
                model.release(&h);
                drop(h.lease);
                barrier.extend(barrier_lock).unwrap();
            }
            // extend
            6 if !held.is_empty() => {
                let i = pick % held.len();
                let by_ms = i64::from(input.byte()) + 1;
                let want = model.extend(&held[i], by_ms);
                let h = &mut held[i];
                match (h.lease.extend(Duration::from_millis(by_ms as u64)), want) {
                    (Ok(()), Some(until)) => assert_eq!(h.lease.locked_until(), ms(until)),
                    (Err(Error::LeaseLost), None) => {}
                    (got, want) => panic!("extend: engine {got:?}, model {want:?}"),
                }
            }
            // advance the clock (also the fallback of lease commands with no lease held)
            _ => {
                let by = i64::from(input.byte()) + (pick as i64 % 4) * 64;
                clock.advance(Duration::from_millis(by as u64));
                model.now += by;
            }
        }
    }
    // Every record the model holds is what a fresh claim with its fingerprint sees.
    let mut ids: Vec<_> = model.records.keys().copied().collect();
    ids.sort_unstable();
    for id in ids {
        let fp = model.records[&id].fp;
        let key = IdempotencyKey::new(format!("key-{}", id.1)).unwrap();
        let want = model.claim(id, fp, DEFAULT_LOCK_MS, DEFAULT_RETENTION_MS);
        let got = engine
            .claim(ClaimRequest::new(scope_name(id.0), key, fingerprint(fp)))
            .unwrap();
        match (&got, &want) {
            (ClaimOutcome::Claimed(l), Expected::Claimed { fence, .. }) => {
                assert_eq!(l.fencing_token(), *fence);
            }
            (ClaimOutcome::Replay(g), Expected::Replay(w)) => assert_eq!(g, w),
            (ClaimOutcome::InFlight { .. }, Expected::InFlight { .. })
            | (ClaimOutcome::Mismatch, Expected::Mismatch) => {}
            _ => panic!("final claim {id:?}: engine {got:?}, model {want:?}"),
        }
    }
    drop(held);
    drop(barrier);
    engine.shutdown().unwrap();
}

fn check_lease_result(got: Result<(), Error>, owned: bool, what: &str) {
    match (got, owned) {
        (Ok(()), true) | (Err(Error::LeaseLost), false) => {}
        (got, owned) => panic!("{what}: engine {got:?}, model owns the record: {owned}"),
    }
}
