//! The layer's handling of what clients send, through the public API: canonical JSON against
//! the implementation before issue #18 (copied below as the oracle: the fingerprints of stored
//! requests were taken over its bytes, so a retry after an upgrade must canonicalise to the
//! same bytes), `parse_key_value` and `Contract::fingerprint` against their rules, and the key
//! and scope headers and the stored response headers through a real Axum server over TCP.
//! From a review of the layer's speed-ups (commit 5a3fef0), which found the scope header
//! trimmed of Unicode white space (`scope_header_values_that_differ_are_different_scopes`).

mod http_client;
use http_client::{
    RESPONSE_HEADERS, axum_side, client, key, outcome, raw, raw_post, send, send_body,
};

use std::sync::atomic::Ordering;

use idempotency_rs::contract::{
    Begin, Config, Contract, Incoming, KeyPolicy, ProblemKind, canonical_json, is_stored_header,
    parse_key_value,
};
use idempotency_rs::{Engine, EngineConfig, Fingerprint};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// canonical_json before 5a3fef0 (shims/contract/canonical.rs), verbatim.
// ---------------------------------------------------------------------------------------------
mod reference {
    #![allow(dead_code, unreachable_pub, clippy::all)]
    use serde::de::IgnoredAny;

    pub(crate) fn canonical_json(bytes: &[u8]) -> Option<Vec<u8>> {
        // JSON is UTF-8 text (serde_json's `IgnoredAny` does not look inside strings), and
        // serde_json decides the grammar; the writer below then only meets valid documents, and
        // still answers `None` rather than panic if it did not. A number beyond f64's range
        // (`1e400`) is valid JSON: it is kept as written, where `serde_json::Value` refuses it.
        let text = std::str::from_utf8(bytes).ok()?;
        serde_json::from_str::<IgnoredAny>(text).ok()?;
        let mut reader = Reader {
            bytes,
            at: 0,
            depth: 0,
        };
        let mut out = Vec::with_capacity(bytes.len());
        reader.value(&mut out)?;
        reader.skip_ws();
        (reader.at == bytes.len()).then_some(out)
    }

    /// Canonical bytes of an already parsed value (see [`canonical_json`]).
    ///
    /// A [`serde_json::Value`] has already lost whatever its numbers did not fit (without
    /// serde_json's `arbitrary_precision`, integers beyond 64 bits and decimals beyond `f64`), so
    /// canonicalise the request's bytes with [`canonical_json`] where you have them.
    pub fn canonical_value(value: &serde_json::Value) -> Vec<u8> {
        let text = serde_json::to_vec(value).unwrap_or_default();
        canonical_json(&text).unwrap_or(text)
    }

    /// serde_json's nesting limit (its `Value` refuses a document nested this deep; its
    /// `IgnoredAny` does not check).
    const MAX_DEPTH: usize = 128;

    /// A cursor over a document serde_json has accepted.
    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
        /// Arrays and objects open at the cursor.
        depth: usize,
    }

    impl<'a> Reader<'a> {
        fn skip_ws(&mut self) {
            while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
                self.at += 1;
            }
        }

        fn peek(&mut self) -> Option<u8> {
            self.skip_ws();
            self.bytes.get(self.at).copied()
        }

        fn expect(&mut self, byte: u8) -> Option<()> {
            (self.peek()? == byte).then(|| self.at += 1)
        }

        /// Writes the canonical form of the value at the cursor.
        fn value(&mut self, out: &mut Vec<u8>) -> Option<()> {
            match self.peek()? {
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth >= MAX_DEPTH {
                        return None;
                    }
                    let done = if self.bytes[self.at] == b'{' {
                        self.object(out)
                    } else {
                        self.array(out)
                    };
                    self.depth -= 1;
                    done
                }
                b'"' => {
                    let raw = self.string_token()?;
                    write_string(raw, out)
                }
                // A number or a literal: copied as written.
                _ => {
                    let start = self.at;
                    while let Some(b) = self.bytes.get(self.at) {
                        if !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' | b'a'..=b'z')
                        {
                            break;
                        }
                        self.at += 1;
                    }
                    (self.at > start).then(|| out.extend_from_slice(&self.bytes[start..self.at]))
                }
            }
        }

        fn array(&mut self, out: &mut Vec<u8>) -> Option<()> {
            self.expect(b'[')?;
            out.push(b'[');
            if self.peek()? == b']' {
                self.at += 1;
                out.push(b']');
                return Some(());
            }
            loop {
                self.value(out)?;
                match self.peek()? {
                    b',' => {
                        self.at += 1;
                        out.push(b',');
                    }
                    b']' => {
                        self.at += 1;
                        out.push(b']');
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }

        fn object(&mut self, out: &mut Vec<u8>) -> Option<()> {
            self.expect(b'{')?;
            // (decoded key, canonical "key":value)
            let mut members: Vec<(String, Vec<u8>)> = Vec::new();
            if self.peek()? == b'}' {
                self.at += 1;
            } else {
                loop {
                    if self.peek()? != b'"' {
                        return None;
                    }
                    let key = decode_string(self.string_token()?)?;
                    self.expect(b':')?;
                    // serde_json's escaping of the decoded key: what `write_string` gives its token.
                    let mut member = serde_json::to_vec(&key).ok()?;
                    member.push(b':');
                    self.value(&mut member)?;
                    members.push((key, member));
                    match self.peek()? {
                        b',' => self.at += 1,
                        b'}' => {
                            self.at += 1;
                            break;
                        }
                        _ => return None,
                    }
                }
            }
            // Stable: members with one key keep their order.
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (_, member)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(member);
            }
            out.push(b'}');
            Some(())
        }

        /// The string token at the cursor, quotes included.
        fn string_token(&mut self) -> Option<&'a [u8]> {
            let start = self.at;
            self.at += 1;
            loop {
                match *self.bytes.get(self.at)? {
                    b'"' => {
                        self.at += 1;
                        let bytes: &'a [u8] = self.bytes;
                        return Some(&bytes[start..self.at]);
                    }
                    b'\\' => self.at += 2,
                    _ => self.at += 1,
                }
            }
        }
    }

    fn decode_string(raw: &[u8]) -> Option<String> {
        if !raw.contains(&b'\\') {
            return std::str::from_utf8(&raw[1..raw.len() - 1])
                .ok()
                .map(str::to_owned);
        }
        serde_json::from_slice(raw).ok()
    }

    /// A string token in serde_json's escaping: `"` and `\` escaped, control characters as `\n`,
    /// `\t`, ... or `\u00XX`, everything else (non-ASCII included) as UTF-8. A token without a
    /// backslash is already in that form (a valid one holds no `"` nor control character).
    fn write_string(raw: &[u8], out: &mut Vec<u8>) -> Option<()> {
        if !raw.contains(&b'\\') {
            out.extend_from_slice(raw);
            return Some(());
        }
        serde_json::to_writer(&mut *out, &decode_string(raw)?).ok()
    }
}

// ---------------------------------------------------------------------------------------------
// canonical_json: differential against the previous implementation
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Key tokens (without quotes): plain, escaped spellings of the same key, surrogate pairs,
/// control characters, non-ASCII, keys that sort next to each other.
const KEYS: &[&str] = &[
    "a",
    "b",
    "ab",
    "aa",
    "",
    "A",
    "B",
    "Z",
    "_",
    "~",
    "z",
    "a b",
    "\\u0061",
    "\\u0062",
    "\\u0041",
    "a\\u0062",
    "\\n",
    "\\t",
    "\\r\\n",
    "\\b\\f",
    "\\u0000",
    "a\\u0000",
    "\\u001f",
    "\\u007f",
    "\u{7f}",
    "\\/",
    "/",
    "\\\\",
    "\\\"",
    "z\\\"q",
    "é",
    "\\u00e9",
    "\\u00E9",
    "e\u{301}",
    "😀",
    "\\ud83d\\ude00",
    "\\uD83D\\uDE00",
    "\u{fffd}",
    "\\ufffd",
    "\u{2028}",
    "\\u2028",
    "日本",
    "\\u65e5\\u672c",
    "日\\u672c",
    "ß",
    "\u{10ffff}",
    "\\udbff\\udfff",
    "key",
    "keys",
    "k\\u0065y",
    "id",
    "ID",
    "amount",
    "currency",
    "items",
    "0",
    "1",
    "10",
    "9",
];

const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "1.0",
    "1e0",
    "1E+2",
    "-0.0e-0",
    "1e400",
    "-1e400",
    "18446744073709551617",
    "-9223372036854775809",
    "0.1000000000000000055511151231257827",
    "123456789012345678901890",
    "1.2345678901234567e+23",
    "5e-324",
    "2.5",
];

const STRINGS: &[&str] = &[
    "\"\"",
    "\"x\"",
    "\"\\u0041\\/\"",
    "\"é\\t\"",
    "\"\\ud83d\\ude00\"",
    "\"😀\"",
    "\"\\u0000\"",
    "\"\\\"\\\\\"",
    "\"\\b\\f\\n\\r\\t\"",
    "\"\\u001F\"",
    "\"\\u007f\"",
    "\"a,b:c{}[]\"",
    "\"\\uDBFF\\uDFFF\"",
    "\"\u{2029}\"",
];

const WS: &[&str] = &["", "", "", " ", "\n", "\t", "\r\n", "  \t "];

fn ws(r: &mut Rng) -> &'static str {
    r.pick(WS)
}

/// A valid JSON document of at most `depth` more levels.
fn gen_value(r: &mut Rng, depth: usize, out: &mut String) {
    let kind = if depth == 0 { r.below(4) } else { r.below(9) };
    match kind {
        0 => out.push_str(r.pick(NUMBERS)),
        1 => out.push_str(r.pick(STRINGS)),
        2 => out.push_str(r.pick(&["true", "false", "null"])),
        3 => out.push_str(r.pick(&["[]", "{}", "[ ]", "{ }", "{\n}"])),
        4 | 5 => {
            out.push('[');
            let n = r.below(5);
            for i in 0..n {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(ws(r));
                gen_value(r, depth - 1, out);
                out.push_str(ws(r));
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            // Sometimes many members (the sort), sometimes already sorted (the fast path).
            let n = if r.below(10) == 0 {
                20 + r.below(40)
            } else {
                r.below(7)
            };
            let mut keys: Vec<&str> = (0..n).map(|_| r.pick(KEYS)).collect();
            match r.below(4) {
                0 => keys.sort_unstable(),
                1 => {
                    keys.sort_unstable();
                    keys.reverse();
                }
                _ => {}
            }
            // Repeat a key now and then.
            if n > 1 && r.below(3) == 0 {
                let k = keys[r.below(n)];
                let at = r.below(n);
                keys[at] = k;
            }
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(ws(r));
                out.push('"');
                out.push_str(k);
                out.push('"');
                out.push_str(ws(r));
                out.push(':');
                out.push_str(ws(r));
                gen_value(r, depth - 1, out);
                out.push_str(ws(r));
            }
            out.push('}');
        }
    }
}

fn same_as_before(doc: &[u8]) -> Result<(), String> {
    let new = canonical_json(doc);
    let old = reference::canonical_json(doc);
    if new == old {
        return Ok(());
    }
    let show = |v: &Option<Vec<u8>>| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    Err(format!(
        "canonical_json changed its output for {:?}\n  before: {:?}\n  now:    {:?}",
        String::from_utf8_lossy(doc),
        show(&old),
        show(&new)
    ))
}

#[test]
fn canonical_json_hand_picked_documents_as_before() {
    let deep_obj = |d: usize| "{\"b\":1,\"a\":".repeat(d) + "0" + &"}".repeat(d);
    let mut docs: Vec<String> = vec![
        "{}".into(),
        "[]".into(),
        " {} ".into(),
        "{\"a\":{},\"\":{}}".into(),
        r#"{"b":1,"a":2}"#.into(),
        r#"{"a":1,"a":2}"#.into(),
        r#"{"a":2,"a":1}"#.into(),
        r#"{"a":1,"b":0,"a":2}"#.into(),
        r#"{"b":0,"a":2,"a":1}"#.into(),
        r#"{"\u0061":1,"a":2}"#.into(),
        r#"{"a":1,"\u0061":2}"#.into(),
        r#"{"b":1,"\u0061":2}"#.into(),
        r#"{"\u0062":1,"a":2}"#.into(),
        r#"{"\u0062":1,"\u0061":2}"#.into(),
        r#"{"😀":1,"\ud83d\ude00":2,"\uD83D\uDE00":3,"\uffff":4}"#.into(),
        r#"{"\ud83d\ude00":1,"\uffff":2}"#.into(),
        r#"{"\uffff":2,"😀":1}"#.into(),
        r#"{"é":1,"\u00e9":2,"e":3,"f":4}"#.into(),
        r#"{"\u0000":1,"":2,"\u001f":3," ":4}"#.into(),
        r##"{"\"":1,"\\":2,"!":3,"#":4}"##.into(),
        r#"{"\/":1,"/":2,".":3}"#.into(),
        "{\"\u{7f}\":1,\"\\u007f\":2,\"~\":3}".into(),
        "{\"\u{2028}\":1,\"\\u2028\":2}".into(),
        r#"{"z":{"y":[{"d":1,"c":{"f":[],"e":{"h":0,"g":0}}},{"b":2,"a":1}],"x":0},"a":[{"c":3,"b":[{"z":1,"a":2}]}]}"#.into(),
        r#"[{"b":1,"a":2},{"a":1,"b":2},[{"d":{"f":1,"e":2},"c":3}]]"#.into(),
        r#"{"a":[{"b":1,"a":{"d":1,"c":1}}],"A":0}"#.into(),
        r#"{ "b" : [ 1 , 2 ] , "a" : { "y" : null , "x" : true } }"#.into(),
        "{\"b\"\r\n:\t1,\n\"a\":2}".into(),
        r#"{"k":"\u0041\n\t\"\\\/\b\f\r"}"#.into(),
        r#"{"k":"\ud83d\ude00\u00e9\u0000"}"#.into(),
        // Invalid documents: both must refuse them.
        "{\"a\":1,}".into(),
        "{\"a\" 1}".into(),
        "{\"a\":}".into(),
        "{\"a\":1 \"b\":2}".into(),
        "{\"\\ud800\":1}".into(),
        "{\"\\udc00\":1}".into(),
        "{\"\\ud83d\\u0041\":1}".into(),
        "{\"\\x\":1}".into(),
        "{\"a\u{1}\":1}".into(),
        "{\"a\":1}}".into(),
        "{\"a\":1} x".into(),
        "{\"a\":1}\u{0}".into(),
        "{1:2}".into(),
        "{'a':1}".into(),
        "[1,]".into(),
        "[\"a\":1]".into(),
        "{\"a\":01}".into(),
        "{\"a\":NaN}".into(),
        "{\"a\":tru}".into(),
        "{\"a\":truex}".into(),
        "".into(),
        " ".into(),
    ];
    for d in [120, 125, 126, 127, 128, 129, 130, 200] {
        docs.push("[".repeat(d) + &"]".repeat(d));
        docs.push("{\"a\":".repeat(d) + "1" + &"}".repeat(d));
        docs.push(deep_obj(d));
        docs.push("[{\"z\":1,\"y\":".repeat(d / 2) + "[]" + &"}]".repeat(d / 2));
        docs.push(format!(
            "{{\"b\":2,\"a\":{}}}",
            "[".repeat(d) + &"]".repeat(d)
        ));
    }
    let mut failures = Vec::new();
    for doc in &docs {
        if let Err(e) = same_as_before(doc.as_bytes()) {
            failures.push(e);
        }
    }
    // Not UTF-8 and broken bytes.
    for doc in [
        &b"{\"\xff\":1}"[..],
        b"{\"a\":\"\xc3\"}",
        b"{\"\xed\xa0\x80\":1}",
        b"\xef\xbb\xbf{}",
        b"{\"a\":1}\xff",
    ] {
        if let Err(e) = same_as_before(doc) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The canonical form itself, for a few documents (pins what both must give).
    let canon = |s: &str| String::from_utf8(canonical_json(s.as_bytes()).unwrap()).unwrap();
    assert_eq!(
        canon(r#"{"b":1,"\u0061":2,"a":3}"#),
        r#"{"a":2,"a":3,"b":1}"#
    );
    assert_eq!(
        canon(r#"{"\uffff":1,"\ud83d\ude00":2}"#),
        "{\"\u{ffff}\":1,\"😀\":2}",
        "keys sort by UTF-8 bytes, not UTF-16 units"
    );
    assert_eq!(
        canon(r#"[{"b":{"d":1,"c":2},"a":[{"f":1,"e":2}]}]"#),
        r#"[{"a":[{"e":2,"f":1}],"b":{"c":2,"d":1}}]"#
    );
}

#[test]
fn canonical_json_generated_documents_as_before() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut failures = Vec::new();
    let mut valid = 0usize;
    for i in 0..12_000 {
        let mut doc = String::new();
        doc.push_str(ws(&mut r));
        gen_value(&mut r, 1 + i % 6, &mut doc);
        doc.push_str(ws(&mut r));
        let mut bytes = doc.into_bytes();
        // One document in three is broken: a byte removed, inserted or replaced, or cut short.
        if i % 3 == 2 && !bytes.is_empty() {
            let at = r.below(bytes.len());
            let junk = [
                b'"', b',', b':', b'{', b'}', b'[', b']', b'\\', b' ', 0xff, 0x01, b'a',
            ];
            match r.below(4) {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, junk[r.below(junk.len())]),
                2 => bytes[at] = junk[r.below(junk.len())],
                _ => bytes.truncate(at),
            }
        }
        if canonical_json(&bytes).is_some() {
            valid += 1;
        }
        if let Err(e) = same_as_before(&bytes) {
            failures.push(e);
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        valid > 7_000,
        "the generator made too few valid documents: {valid}"
    );
}

#[test]
fn canonical_json_large_documents_as_before() {
    // One object of 20 000 members in reverse order, each holding an object out of order.
    let mut doc = String::from("{");
    for i in (0..20_000).rev() {
        if i != 19_999 {
            doc.push(',');
        }
        doc.push_str(&format!(
            "\"k{i:05}\":{{\"z\":[{i},{{\"y\":1,\"x\":\"\\u00e9{i}\"}}],\"\\u0061\":{i}}}"
        ));
    }
    doc.push('}');
    same_as_before(doc.as_bytes()).unwrap();
    // An array of many small objects, already in order (the fast path).
    let arr = format!(
        "[{}]",
        (0..20_000)
            .map(|i| format!("{{\"a\":{i},\"b\":[{i}],\"c\":{{\"d\":null}}}}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    same_as_before(arr.as_bytes()).unwrap();
    // One key repeated many times: stable order must hold.
    let dup = format!(
        "{{\"b\":0,{}}}",
        (0..5_000)
            .map(|i| format!("\"a\":{i}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    same_as_before(dup.as_bytes()).unwrap();
}

/// Key order and white space do not matter, at every level; values and duplicates' order do.
#[test]
fn canonical_json_ignores_order_and_space_only() {
    let a = r#"{"x":[{"b":2,"a":{"d":[1,{"f":0,"e":1}],"c":"\u00e9"}}],"w":{"\u0062":1,"a":2}}"#;
    let b = "{ \"w\" : { \"a\" : 2 , \"b\" : 1 } ,\n \"x\" : [ { \"a\" : { \"c\" : \"é\" , \"d\" : [ 1 , { \"e\" : 1 , \"f\" : 0 } ] } , \"b\" : 2 } ] }";
    assert_eq!(canonical_json(a.as_bytes()), canonical_json(b.as_bytes()));
    assert_ne!(
        canonical_json(br#"{"a":1,"a":2}"#),
        canonical_json(br#"{"a":2,"a":1}"#),
        "the order of a repeated key's members must count"
    );
    assert_ne!(canonical_json(b"[1,2]"), canonical_json(b"[2,1]"));
    // Idempotent.
    let once = canonical_json(a.as_bytes()).unwrap();
    assert_eq!(canonical_json(&once).unwrap(), once);
}

// ---------------------------------------------------------------------------------------------
// parse_key_value and Contract::fingerprint, against the previous rules
// ---------------------------------------------------------------------------------------------

const U: &str = "0b6f5a3e-9a7c-4c1e-8f2a-2d8b4f1e6c3a";

#[test]
fn parse_key_value_as_before() {
    let upper = U.to_ascii_uppercase();
    let cases: Vec<(Vec<u8>, KeyPolicy, Result<&str, ProblemKind>)> = vec![
        (U.into(), KeyPolicy::Uuid, Ok(U)),
        (upper.clone().into(), KeyPolicy::Uuid, Ok(U)),
        (format!("\"{upper}\"").into(), KeyPolicy::Uuid, Ok(U)),
        (format!(" \t{upper}\t ").into(), KeyPolicy::Uuid, Ok(U)),
        (format!("\"{U}\" ").into(), KeyPolicy::Uuid, Ok(U)),
        (
            format!("\" {U}\"").into(),
            KeyPolicy::Uuid,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            format!("{{{U}}}").into(),
            KeyPolicy::Uuid,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            U.replace('-', "").into(),
            KeyPolicy::Uuid,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            format!("urn:uuid:{U}").into(),
            KeyPolicy::Uuid,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            format!("{U},{U}").into(),
            KeyPolicy::Uuid,
            Err(ProblemKind::KeyRepeated),
        ),
        (
            format!("{U}, {U}").into(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyRepeated),
        ),
        (
            b"a,b".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyRepeated),
        ),
        (b"\"a,b\"".to_vec(), KeyPolicy::Opaque, Ok("a,b")),
        (
            b"\"a\", \"b\"".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (b"Order-1".to_vec(), KeyPolicy::Opaque, Ok("Order-1")),
        (b"  Order-1  ".to_vec(), KeyPolicy::Opaque, Ok("Order-1")),
        (
            b"\" a \"".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            b"\"a\\\"b\\\\c\"".to_vec(),
            KeyPolicy::Opaque,
            Ok("a\"b\\c"),
        ),
        (
            b"\"a\\nb\"".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            b"\"\"".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            b"".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            b" \t ".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            b"caf\xc3\xa9".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            b"\xff\xfe".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            b"\"caf\xc3\xa9\"".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            b"a\x01b".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            b"a\tb".to_vec(),
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (vec![b'k'; 255], KeyPolicy::Opaque, Ok("")),
        (
            vec![b'k'; 256],
            KeyPolicy::Opaque,
            Err(ProblemKind::KeyInvalid),
        ),
        (
            "é".repeat(18).into(),
            KeyPolicy::Uuid,
            Err(ProblemKind::KeyInvalid),
        ),
    ];
    let mut failures = Vec::new();
    for (raw, policy, want) in cases {
        let got = parse_key_value(&raw, policy);
        let ok = match (&got, &want) {
            (Ok(k), Ok("")) => k.as_str().len() == 255,
            (Ok(k), Ok(w)) => k.as_str() == *w,
            (Err(p), Err(kind)) => p.kind == *kind,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "parse_key_value({:?}, {policy:?}): want {want:?}, got {:?}",
                String::from_utf8_lossy(&raw),
                got.map(|k| k.as_str().to_owned()).map_err(|p| p.kind)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn fingerprint_as_before() {
    let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    let on = Contract::new(engine.clone(), Config::default());
    let off = Contract::new(engine, Config::default().canonicalize_json(false));
    let body = br#"{ "b": 1, "a": [true, {"d": null, "c": "x"}] }"#;
    let canon = canonical_json(body).unwrap();
    let mut failures = Vec::new();
    for method in [
        "POST", "post", "Post", "pOST", "PATCH", "patch", "M-SEARCH", "m-search", "PÖST", "pöst",
        "", "X_1",
    ] {
        let up = method.to_ascii_uppercase();
        for (ct, expected_json) in [
            (Some(&b"application/json"[..]), true),
            (Some(&b"Application/Problem+JSON; charset=utf-8"[..]), true),
            (Some(&b"text/plain"[..]), false),
            (None, false),
        ] {
            let want = if expected_json {
                Fingerprint::of_parts(&[up.as_bytes(), b"/p?q=1", &canon])
            } else {
                Fingerprint::of_request(&up, "/p?q=1", body)
            };
            if on.fingerprint(method, "/p?q=1", ct, body) != want {
                failures.push(format!("canonical on, {method:?}, {ct:?}"));
            }
            let raw = Fingerprint::of_request(&up, "/p?q=1", body);
            if off.fingerprint(method, "/p?q=1", ct, body) != raw {
                failures.push(format!("canonical off, {method:?}, {ct:?}"));
            }
        }
    }
    // An invalid JSON body under a JSON content type is fingerprinted as received.
    let bad = b"{\"a\":1,}";
    assert_eq!(
        on.fingerprint("post", "/p", Some(b"application/json"), bad),
        Fingerprint::of_request("POST", "/p", bad)
    );
    assert!(
        failures.is_empty(),
        "fingerprint differs from the previous rule: {failures:?}"
    );
}

/// `Pending::finish` (the public completion) stores only `is_stored_header` names, in order,
/// duplicates kept, names matched case-insensitively.
#[tokio::test]
async fn finish_stores_only_stored_headers_in_order() {
    let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    let contract = Contract::new(engine, Config::default());
    let key = parse_key_value(U.as_bytes(), KeyPolicy::Uuid).unwrap();
    let incoming = Incoming {
        method: "POST",
        path_and_query: "/x",
        route: "/x",
        content_type: None,
        body: b"hi",
    };
    let headers: Vec<(String, Vec<u8>)> = [
        ("x-a", "1"),
        ("Content-Length", "2"),
        ("set-cookie", "s=1"),
        ("DATE", "Mon, 01 Jan 2001 00:00:00 GMT"),
        ("x-a", "2"),
        ("Transfer-Encoding", "chunked"),
        ("Keep-Alive", "timeout=5"),
        ("set-cookie", "s=2"),
        ("connection", "close"),
        ("TE", "trailers"),
        ("trailer", "x-t"),
        ("upgrade", "h2c"),
        ("proxy-authenticate", "Basic"),
        ("proxy-authorization", "x"),
        ("proxy-connection", "keep-alive"),
        ("x-a", "3"),
        ("Location", "/orders/1"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
    .collect();
    let Begin::Run(pending) = contract.begin(String::new(), key.clone(), incoming).await else {
        panic!("first request not run");
    };
    pending.finish(201, &headers, b"created").await;
    let Begin::Replay(stored) = contract.begin(String::new(), key, incoming).await else {
        panic!("retry not replayed");
    };
    let got: Vec<(String, String)> = stored
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    let want: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| is_stored_header(n))
        .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
        .chain([("idempotent-replayed".to_string(), "true".to_string())])
        .collect();
    assert_eq!(got, want);
    assert_eq!(stored.status, 201);
    assert_eq!(stored.body, b"created");
    for n in [
        "content-length",
        "date",
        "transfer-encoding",
        "keep-alive",
        "connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            !is_stored_header(n) && !is_stored_header(&n.to_ascii_uppercase()),
            "{n}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A real Axum server over TCP
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_header_counts() {
    let s = axum_side::start().await;
    let c = client();
    let url = format!("{}/echo", s.base);
    let user: (&str, &[u8]) = ("x-user-id", b"u1");
    let (a, b, k3) = (key(), key(), key());
    // Zero keys: passes through (runs each time), or 400 key-missing where required.
    assert!(
        outcome(send(&c, &url, &[user]).await)
            .await
            .starts_with("201 {\"key\":null")
    );
    assert!(
        outcome(send(&c, &url, &[user]).await)
            .await
            .starts_with("201 {\"key\":null")
    );
    assert_eq!(
        outcome(send(&c, &format!("{}/strict/echo", s.base), &[user]).await).await,
        "400 key-missing"
    );
    // One key: runs, then replays.
    let first = outcome(send(&c, &url, &[user, ("idempotency-key", a.as_bytes())]).await).await;
    assert!(first.starts_with("201 {"), "{first}");
    let again = outcome(send(&c, &url, &[user, ("idempotency-key", a.as_bytes())]).await).await;
    assert_eq!(again, first.replacen("201", "201 replayed", 1));
    // Two and three header lines, equal or not: 400 key-repeated.
    for lines in [
        vec![a.as_bytes(), b.as_bytes()],
        vec![b.as_bytes(), b.as_bytes()],
        vec![a.as_bytes(), b.as_bytes(), k3.as_bytes()],
        vec![k3.as_bytes(), k3.as_bytes(), k3.as_bytes()],
        vec![b"".as_slice(), k3.as_bytes()],
        vec![b"not a key".as_slice(), k3.as_bytes(), b"x".as_slice()],
    ] {
        let mut h = vec![user];
        h.extend(lines.iter().map(|v| ("idempotency-key", *v)));
        assert_eq!(
            outcome(send(&c, &url, &h).await).await,
            "400 key-repeated",
            "{lines:?}"
        );
        // Also where the key is required and on the opaque policy.
        let strict = format!("{}/strict/echo", s.base);
        assert_eq!(
            outcome(send(&c, &strict, &h).await).await,
            "400 key-repeated"
        );
        let opaque = format!("{}/opaque/echo", s.base);
        assert_eq!(
            outcome(send(&c, &opaque, &h).await).await,
            "400 key-repeated"
        );
    }
    // Folded into one line.
    let folded = format!("{a}, {b}");
    assert_eq!(
        outcome(send(&c, &url, &[user, ("idempotency-key", folded.as_bytes())]).await).await,
        "400 key-repeated"
    );
    assert_eq!(
        outcome(
            send(
                &c,
                &format!("{}/opaque/echo", s.base),
                &[user, ("idempotency-key", b"k1,k2")]
            )
            .await
        )
        .await,
        "400 key-repeated"
    );
    // 2 plain runs, 1 keyed run; no refused request ran.
    assert_eq!(s.runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_forms_uuid_case_quotes_whitespace() {
    let s = axum_side::start().await;
    let c = client();
    let url = format!("{}/echo", s.base);
    let user: (&str, &[u8]) = ("x-user-id", b"u1");
    let k = key();
    let upper = k.to_ascii_uppercase();
    let first = outcome(send(&c, &url, &[user, ("idempotency-key", upper.as_bytes())]).await).await;
    let v: Value = serde_json::from_str(first.trim_start_matches("201 ")).unwrap();
    assert_eq!(
        v["key"],
        k.as_str(),
        "an upper-case UUID must be normalised to lower case"
    );
    assert_eq!(v["scope"], "u1");
    // The same key in other spellings replays.
    let mixed: String = k
        .chars()
        .enumerate()
        .map(|(i, ch)| {
            if i % 2 == 0 {
                ch.to_ascii_uppercase()
            } else {
                ch
            }
        })
        .collect();
    for form in [
        k.clone(),
        format!("\"{upper}\""),
        format!("\"{k}\""),
        mixed,
        format!("  {k}\t"),
    ] {
        let got =
            outcome(send(&c, &url, &[user, ("idempotency-key", form.as_bytes())]).await).await;
        assert_eq!(
            got,
            first.replacen("201", "201 replayed", 1),
            "form {form:?}"
        );
    }
    // Raw bytes on the wire: white space around the value, in a quoted value.
    let (st, body) = raw(
        s.addr,
        &raw_post(
            "/echo",
            format!("X-User-ID: u1\r\nIdempotency-Key:\t  \"{upper}\" \t\r\n").as_bytes(),
            "{\"a\":1}",
        ),
    )
    .await;
    assert_eq!((st, body.contains(&k)), (201, true), "{body}");
    let (st, body) = raw(
        s.addr,
        &raw_post(
            "/echo",
            format!("X-User-ID: u1\r\nIdempotency-Key: \" {k}\"\r\n").as_bytes(),
            "{\"a\":1}",
        ),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("key-invalid"), "{body}");
    // Opaque keys keep their case; quoted and bare are one key.
    let o = format!("{}/opaque/echo", s.base);
    let first = outcome(send(&c, &o, &[user, ("idempotency-key", b"Order-42")]).await).await;
    assert!(first.contains("\"key\":\"Order-42\""), "{first}");
    let again = outcome(send(&c, &o, &[user, ("idempotency-key", b"\"Order-42\"")]).await).await;
    assert_eq!(again, first.replacen("201", "201 replayed", 1));
    let lower = outcome(send(&c, &o, &[user, ("idempotency-key", b"order-42")]).await).await;
    assert!(
        lower.starts_with("201 {") && lower.contains("\"key\":\"order-42\""),
        "{lower}"
    );
    let quoted_comma = outcome(send(&c, &o, &[user, ("idempotency-key", b"\"a,b\"")]).await).await;
    assert!(quoted_comma.contains("\"key\":\"a,b\""), "{quoted_comma}");
    let escaped = outcome(send(&c, &o, &[user, ("idempotency-key", br#""a\"b\\c""#)]).await).await;
    assert!(escaped.contains(r#""key":"a\"b\\c""#), "{escaped}");
    assert_eq!(s.runs.load(Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_bytes_are_key_invalid() {
    let s = axum_side::start().await;
    let c = client();
    let user: (&str, &[u8]) = ("x-user-id", b"u1");
    for path in ["/echo", "/opaque/echo"] {
        let url = format!("{}{path}", s.base);
        for bad in [
            &b"caf\xc3\xa9"[..],
            b"\xff\xfe\xfd",
            b"\x80",
            b"k\xa0",
            b"\"caf\xc3\xa9\"",
            b"\"\xff\"",
            b"\"unterminated",
            b"\"\"",
            b"a\tb",
            b"\"a\\nb\"",
        ] {
            assert_eq!(
                outcome(send(&c, &url, &[user, ("idempotency-key", bad)]).await).await,
                "400 key-invalid",
                "{path} {:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // An empty header line.
        let (st, body) = raw(
            s.addr,
            &raw_post(path, b"X-User-ID: u1\r\nIdempotency-Key:\r\n", "{}"),
        )
        .await;
        assert!(
            st == 400 && body.contains("key-invalid"),
            "{path}: {st} {body}"
        );
        let (st, body) = raw(
            s.addr,
            &raw_post(path, b"X-User-ID: u1\r\nIdempotency-Key:  \t \r\n", "{}"),
        )
        .await;
        assert!(
            st == 400 && body.contains("key-invalid"),
            "{path}: {st} {body}"
        );
    }
    // UUID-like but not a UUID.
    let url = format!("{}/echo", s.base);
    let k = key();
    for bad in [
        k.replace('-', ""),
        format!("{{{k}}}"),
        format!("urn:uuid:{k}"),
        k.replacen('a', "g", 1) + "a",
    ] {
        assert_eq!(
            outcome(send(&c, &url, &[user, ("idempotency-key", bad.as_bytes())]).await).await,
            "400 key-invalid",
            "{bad}"
        );
    }
    assert_eq!(s.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_header_rules() {
    let s = axum_side::start().await;
    let c = client();
    let url = format!("{}/echo", s.base);
    let k = key();
    let kh: (&str, &[u8]) = ("idempotency-key", k.as_bytes());
    // Absent, repeated (two or three lines, equal or not), blank: 400 scope-missing.
    for users in [
        vec![],
        vec![&b"u1"[..], b"u1"],
        vec![&b"u1"[..], b"u2"],
        vec![&b"u1"[..], b"u2", b"u3"],
        vec![&b""[..]],
        vec![&b""[..], b"u1"],
    ] {
        let mut h = vec![kh];
        h.extend(users.iter().map(|u| ("x-user-id", *u)));
        assert_eq!(
            outcome(send(&c, &url, &h).await).await,
            "400 scope-missing",
            "{users:?}"
        );
    }
    let (st, body) = raw(
        s.addr,
        &raw_post(
            "/echo",
            format!("Idempotency-Key: {k}\r\nX-User-ID:  \t \r\n").as_bytes(),
            "{}",
        ),
    )
    .await;
    assert!(st == 400 && body.contains("scope-missing"), "{st} {body}");
    // Not UTF-8, or over 1024 bytes: 400 scope-invalid.
    assert_eq!(
        outcome(send(&c, &url, &[kh, ("x-user-id", b"\xff\xfe")]).await).await,
        "400 scope-invalid"
    );
    let long = "u".repeat(1025);
    assert_eq!(
        outcome(send(&c, &url, &[kh, ("x-user-id", long.as_bytes())]).await).await,
        "400 scope-invalid"
    );
    assert_eq!(s.runs.load(Ordering::SeqCst), 0);
    // One scope header: runs; the scope is trimmed; another user is another scope.
    let first = outcome(send(&c, &url, &[kh, ("x-user-id", b"u1")]).await).await;
    assert!(first.contains("\"scope\":\"u1\""), "{first}");
    let (st, body) = raw(
        s.addr,
        &raw_post(
            "/echo",
            format!("Idempotency-Key: {k}\r\nx-user-id:\t u1 \r\n").as_bytes(),
            "{\"a\":1}",
        ),
    )
    .await;
    assert_eq!(st, 201);
    assert!(body.contains("\"run\":1"), "same scope must replay: {body}");
    let other = outcome(send(&c, &url, &[kh, ("x-user-id", b"u2")]).await).await;
    assert!(
        other.starts_with("201 {") && other.contains("\"scope\":\"u2\""),
        "{other}"
    );
    let over =
        outcome(send(&c, &url, &[kh, ("x-user-id", "u".repeat(1024).as_bytes())]).await).await;
    assert!(over.starts_with("201 {"), "{over}");
    // A scope header on a layer without one is ignored: one shared scope.
    let shared = format!("{}/shared/echo", s.base);
    let a = outcome(
        send(
            &c,
            &shared,
            &[kh, ("x-user-id", b"u1"), ("x-user-id", b"u2")],
        )
        .await,
    )
    .await;
    assert!(a.contains("\"scope\":\"\""), "{a}");
    let b = outcome(send(&c, &shared, &[kh]).await).await;
    assert_eq!(b, a.replacen("201", "201 replayed", 1));
    assert_eq!(s.runs.load(Ordering::SeqCst), 4);
}

/// HTTP methods are compared case-insensitively by the contract (the crate docs and
/// tests/middleware.rs): a lower-case `post` is covered and fingerprinted as `POST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_case_method() {
    let s = axum_side::start().await;
    let c = client();
    let url = format!("{}/echo", s.base);
    let k = key();
    let first = outcome(
        send(
            &c,
            &url,
            &[("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())],
        )
        .await,
    )
    .await;
    assert!(first.starts_with("201 {"), "{first}");
    let lower = reqwest::Method::from_bytes(b"post").unwrap();
    let r = c
        .request(lower.clone(), &url)
        .header("x-user-id", "u1")
        .header("idempotency-key", &k)
        .header("content-type", "application/json")
        .body("{ \"a\" : 1 }")
        .send()
        .await
        .unwrap();
    assert_eq!(outcome(r).await, first.replacen("201", "201 replayed", 1));
    // A covered lower-case method with a bad key is refused like POST.
    let r = c
        .request(lower, &url)
        .header("x-user-id", "u1")
        .header("idempotency-key", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(outcome(r).await, "400 key-invalid");
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
}

/// A mismatch through the server: same key, another body is 422; the same JSON written
/// differently (key order, white space, escapes) replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_replay_or_mismatch() {
    let s = axum_side::start().await;
    let c = client();
    let url = format!("{}/echo", s.base);
    let k = key();
    let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
    let doc = br#"{"z":{"y":[{"d":1,"c":{"f":[],"e":"\u00e9"}}],"x":0},"a":[{"c":3,"b":[{"z":1,"a":2}]}],"a":0}"#;
    let first = outcome(send_body(&c, &url, &h, doc).await).await;
    assert!(first.starts_with("201 {"), "{first}");
    let same = "{ \"\\u007a\" : { \"x\" : 0, \"y\" : [ { \"c\" : { \"e\" : \"é\", \"f\" : [ ] }, \"d\" : 1 } ] },\n \"a\" : [ { \"b\" : [ { \"a\" : 2, \"z\" : 1 } ], \"c\" : 3 } ], \"a\" : 0 }";
    assert_eq!(
        outcome(send_body(&c, &url, &h, same.as_bytes()).await).await,
        first.replacen("201", "201 replayed", 1)
    );
    // The repeated key's members in the other order: another request.
    let swapped = br#"{"a":0,"z":{"y":[{"d":1,"c":{"f":[],"e":"\u00e9"}}],"x":0},"a":[{"c":3,"b":[{"z":1,"a":2}]}]}"#;
    assert_eq!(
        outcome(send_body(&c, &url, &h, swapped).await).await,
        "422 key-reused"
    );
    let other = br#"{"z":{"y":[{"d":1,"c":{"f":[],"e":"e"}}],"x":0},"a":[{"c":3,"b":[{"z":1,"a":2}]}],"a":0}"#;
    assert_eq!(
        outcome(send_body(&c, &url, &h, other).await).await,
        "422 key-reused"
    );
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
}

fn header_pairs(h: &reqwest::header::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Response headers: the stored ones replay in order, duplicates kept; the ones
/// `is_stored_header` refuses are not stored, so the replay does not carry them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_headers_replay_in_order_and_the_others_do_not() {
    let s = axum_side::start().await;
    let c = client();
    let url = format!("{}/headers", s.base);
    let k = key();
    let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
    let first = send(&c, &url, &h).await;
    assert_eq!(first.status(), 200);
    let first_headers = header_pairs(first.headers());
    let first_body = first.bytes().await.unwrap();
    let again = send(&c, &url, &h).await;
    assert_eq!(again.status(), 200);
    let again_headers = header_pairs(again.headers());
    let again_body = again.bytes().await.unwrap();
    assert_eq!(again_body, first_body);
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
    // The first answer carries what the handler set, unstored headers included (else the
    // checks below prove nothing).
    for (name, value) in RESPONSE_HEADERS {
        assert!(
            first_headers.contains(&(name.to_string(), value.to_string())),
            "the first answer lacks {name}: {value}: {first_headers:?}"
        );
    }

    let stored_names = ["x-a", "set-cookie", "location", "content-type", "x-run"];
    let pick = |l: &[(String, String)]| -> Vec<(String, String)> {
        l.iter()
            .filter(|(n, _)| stored_names.contains(&n.as_str()))
            .cloned()
            .collect()
    };
    let want: Vec<(String, String)> = RESPONSE_HEADERS
        .iter()
        .filter(|(n, _)| is_stored_header(n))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .chain([("x-run".to_string(), "1".to_string())])
        .collect();
    // HeaderMap groups a name's values; compare per name, in order.
    let by_name = |l: &[(String, String)], name: &str| -> Vec<String> {
        l.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    };
    for name in stored_names {
        assert_eq!(
            by_name(&pick(&again_headers), name),
            by_name(&want, name),
            "replayed {name}"
        );
    }
    assert_eq!(
        pick(&again_headers),
        pick(&first_headers),
        "replayed headers differ in order"
    );
    assert_eq!(by_name(&again_headers, "idempotent-replayed"), vec!["true"]);
    assert!(by_name(&first_headers, "idempotent-replayed").is_empty());
    for name in [
        "proxy-authenticate",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
    ] {
        assert!(
            by_name(&again_headers, name).is_empty(),
            "{name} must not be stored, but the replay has {:?}",
            by_name(&again_headers, name)
        );
    }
    assert!(
        !by_name(&again_headers, "date").contains(&"Mon, 01 Jan 2001 00:00:00 GMT".to_string()),
        "the handler's Date was stored and replayed: {again_headers:?}"
    );
    assert_eq!(
        by_name(&again_headers, "content-length"),
        vec![again_body.len().to_string()]
    );
}

/// The storage limit counts only the stored headers: `/headers` answers about 114 bytes of
/// stored headers and body plus about 130 bytes of headers that are not stored. Under a
/// 200-byte limit it is stored and replayed; under a 100-byte limit the record gets the 410
/// `response-not-stored` marker and the handler does not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_limit_counts_stored_headers_only() {
    let s = axum_side::start().await;
    let c = client();
    let url = format!("{}/small/headers", s.base);
    let k = key();
    let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
    let first = send(&c, &url, &h).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotency-stored").is_none());
    let again = send(&c, &url, &h).await;
    assert_eq!(
        again.status(),
        200,
        "should replay the stored response, the unstored headers do not count"
    );
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
    let url = format!("{}/tiny/headers", s.base);
    let k = key();
    let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
    let first = send(&c, &url, &h).await;
    assert_eq!(
        first.status(),
        200,
        "an oversized response still goes to the client"
    );
    assert_eq!(first.headers().get_all("x-a").iter().count(), 3);
    let again = send(&c, &url, &h).await;
    assert_eq!(outcome(again).await, "410 response-not-stored");
    assert_eq!(s.runs.load(Ordering::SeqCst), 2);
}

/// Not from 5a3fef0 (the parent behaves the same): the scope header value is trimmed with
/// `str::trim`, which removes Unicode white space (U+00A0, U+3000, U+0085, ...), not only the
/// HTTP OWS (space, tab) that hyper already strips. Two different header values then name one
/// scope, and one tenant is replayed the other's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_header_values_that_differ_are_different_scopes() {
    let s = axum_side::start().await;
    let c = client();
    let url = format!("{}/echo", s.base);
    let k = key();
    let first = outcome(
        send(
            &c,
            &url,
            &[("idempotency-key", k.as_bytes()), ("x-user-id", b"alice")],
        )
        .await,
    )
    .await;
    assert!(first.starts_with("201 {"), "{first}");
    let mut merged = Vec::new();
    for other in [
        "\u{a0}alice",
        "alice\u{3000}",
        "\u{85}alice",
        "alice\u{2028}",
    ] {
        let got = outcome(
            send(
                &c,
                &url,
                &[
                    ("idempotency-key", k.as_bytes()),
                    ("x-user-id", other.as_bytes()),
                ],
            )
            .await,
        )
        .await;
        if got.contains("replayed") || got.contains("\"scope\":\"alice\"") {
            merged.push(format!("{other:?} -> {got}"));
        }
    }
    assert!(
        merged.is_empty(),
        "scope header values other than `alice` were taken as scope `alice` (Unicode trim in \
         Contract::scope_from_header), so they share alice's records: {merged:#?}"
    );
}
